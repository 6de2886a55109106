//! The layering rules of ARCHITECTURE.md, checked on the source: the ROS layer reaches the core
//! through one door (the `Inspector` and the crate's curated re-exports, the teach-in entry in
//! `training`, the error vocabulary, and the image conversions in `convert.rs`), and never
//! touches libtorch.
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    files
}

fn ros_sources() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ros");
    let files = rust_files(&dir);
    assert!(files.len() >= 5, "src/ros has {} files: did it move?", files.len());
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect()
}

/// The module path right after each `crate::` in `text`, e.g. `imaging` for
/// `crate::imaging::to_rgb`, or `` for `crate::{Inspector, Roi}` and `crate::Inspector`.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let segment: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            // A lower-case name followed by `::` is a module; `Inspector::new` is an item's.
            let is_module = after[segment.len()..].starts_with("::") && segment.starts_with(|c: char| c.is_lowercase());
            found.push((n + 1, if is_module { segment } else { String::new() }));
            rest = after;
        }
    }
    found
}

#[test]
fn the_ros_layer_never_touches_libtorch() {
    for (file, text) in ros_sources() {
        for (n, line) in text.lines().enumerate() {
            assert!(!line.contains("tch::"), "src/ros/{file}:{}: the ROS layer uses libtorch: {line}", n + 1);
        }
    }
}

#[test]
fn the_ros_layer_reaches_the_core_through_one_door() {
    // Module paths the ROS layer may name; everything else comes from the crate root's
    // re-exports (Inspector, Inspection, Roi, AnomalyMap, DefectRegion, PinholeCamera, ...).
    let allowed = |file: &str, module: &str| match module {
        "" => true,
        "error" | "training" => true,
        // Message conversion decodes and converts frames: the imaging module is its job.
        "imaging" => file == "convert.rs",
        _ => false,
    };
    let mut checked = 0;
    for (file, text) in ros_sources() {
        for (line, module) in crate_paths(&text) {
            checked += 1;
            assert!(
                allowed(&file, &module),
                "src/ros/{file}:{line}: the ROS layer reaches into crate::{module}; use the Inspector or a \
                 re-export at the crate root instead"
            );
        }
    }
    assert!(checked > 5, "only {checked} crate paths found: is the scan broken?");
}

#[test]
fn the_scan_sees_module_paths_and_root_items() {
    let paths = crate_paths("use crate::{Inspector, Roi};\nlet x = crate::models::patchcore::embed(); crate::Inspector::new()");
    let modules: Vec<&str> = paths.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(modules, ["", "models", ""]);
}
