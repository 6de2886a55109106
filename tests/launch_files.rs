//! ROS launch cannot run on the project's machines, so the launch files, parameter YAML and
//! RViz config are checked statically: every package, executable, parameter file, parameter
//! name, launch argument, remapped name and RViz topic they mention must exist.
#![cfg(feature = "ros")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::collections::BTreeSet;
use std::process::Command;

use anomaly_inspector::ros::node::{INPUT_NAMES, OUTPUT_NAMES};
use anomaly_inspector::ros::params::NodeParams;
use common::{python, root};
use r2r::RosParams;

fn declared_params() -> BTreeSet<String> {
    let mut map = r2r::indexmap::IndexMap::new();
    NodeParams::default().register_parameters("", None, &mut map).unwrap();
    map.keys().cloned().collect()
}

fn scan() -> serde_json::Value {
    let out = Command::new(python()).arg(root().join("tests/peers/launch_check.py")).arg(root()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn strs(v: &serde_json::Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap_or("").to_string()).collect()
}

#[test]
fn launch_files_reference_only_what_exists() {
    let scan = scan();
    let params = declared_params();
    assert!(params.contains("model") && params.contains("threshold"), "{params:?}");
    let package = std::fs::read_to_string(root().join("package.xml")).unwrap();
    let bins: BTreeSet<String> = std::fs::read_dir(root().join("src/bin"))
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let launches = scan["launch"].as_array().unwrap();
    assert!(launches.len() >= 2, "one-camera and multi-camera launch files expected");
    for l in launches {
        let file = l["file"].as_str().unwrap();
        assert_eq!(l["has_generate"], true, "{file}: no generate_launch_description");
        let declared: BTreeSet<String> = strs(&l["declared"]).into_iter().collect();
        for used in strs(&l["used"]) {
            assert!(declared.contains(&used), "{file}: LaunchConfiguration('{used}') is never declared");
        }
        for f in strs(&l["files"]) {
            assert!(root().join(&f).is_file(), "{file}: references {f}, which does not exist");
        }
        let nodes = l["nodes"].as_array().unwrap();
        assert!(!nodes.is_empty(), "{file}: starts no node");
        for n in nodes {
            let pkg = n["package"].as_str().unwrap();
            assert!(package.contains(&format!("<name>{pkg}</name>")), "{file}: unknown package {pkg}");
            let exe = n["executable"].as_str().unwrap();
            assert!(bins.contains(exe), "{file}: no executable {exe} in src/bin");
            for p in strs(&n["inline_params"]) {
                assert!(params.contains(&p), "{file}: parameter {p} is not declared by the node");
            }
            for r in strs(&n["remap_from"]) {
                assert!(INPUT_NAMES.contains(&r.as_str()), "{file}: remaps '{r}', which the node does not use");
            }
        }
    }
    for y in scan["yaml"].as_array().unwrap() {
        for p in strs(&y["params"]) {
            assert!(params.contains(&p), "{}: parameter {p} is not declared by the node", y["file"]);
        }
    }
    let rviz = std::fs::read_to_string(root().join("config/anomaly_inspector.rviz")).unwrap();
    let topics: Vec<&str> = rviz.lines().filter_map(|l| l.trim().strip_prefix("Value: anomaly/")).collect();
    assert!(topics.len() >= 3, "RViz should show overlay, heatmap and markers");
    for t in topics {
        assert!(
            OUTPUT_NAMES.contains(&format!("anomaly/{t}").as_str()),
            "RViz shows anomaly/{t}, which the node does not publish"
        );
    }
}

#[test]
fn parameter_yaml_loads_into_the_node() {
    // Start the node with the shipped YAML: every value must parse (types and ranges).
    let tmp = tempfile::tempdir().unwrap();
    let ros_home = tmp.path().join("ros");
    std::fs::create_dir_all(&ros_home).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_anomaly_inspector_node"));
    cmd.current_dir(root())
        .args(["--ros-args", "--params-file"])
        .arg(root().join("config/anomaly_inspector.yaml"))
        .args(["-p", "device:=cpu"]);
    common::ros_env(&mut cmd, 95, &ros_home);
    let log = tmp.path().join("node.log");
    let f = std::fs::File::create(&log).unwrap();
    cmd.stdout(f.try_clone().unwrap()).stderr(f);
    let mut node = common::Proc(Some(cmd.spawn().unwrap()));
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(20) {
        if std::fs::read_to_string(&log).unwrap().contains("waiting for frames") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let exit = node.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!("{text}");
    assert!(text.contains("waiting for frames on 'image'"), "node did not start with the YAML");
    assert!(!text.contains("invalid parameters"), "the shipped YAML has an invalid value");
    assert!(exit.is_some_and(|e| e.success()));
}

#[test]
fn help_prints_usage_with_every_parameter_and_exits_without_starting_the_node() {
    let tmp = tempfile::tempdir().unwrap();
    for flag in ["--help", "-h"] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_anomaly_inspector_node"));
        cmd.arg(flag).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        // Were --help ignored, the node would start and spin: its DDS traffic stays on loopback.
        common::ros_env(&mut cmd, 99, &tmp.path().join("ros"));
        let mut child = cmd.spawn().unwrap();
        let t0 = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if t0.elapsed() > std::time::Duration::from_secs(60) {
                common::Proc(Some(child)).stop();
                panic!("{flag}: still running after 60 s: it started the node instead of printing usage");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        assert!(status.success(), "{flag}: {status:?}\n{out}");
        assert!(out.contains("Usage: anomaly_inspector_node"), "{out}");
        for name in declared_params() {
            assert!(out.contains(&format!("  {name} (default ")), "{flag}: parameter {name} missing:\n{out}");
        }
        for name in INPUT_NAMES.iter().chain(OUTPUT_NAMES.iter()) {
            assert!(out.contains(name), "{flag}: {name} missing:\n{out}");
        }
        assert!(out.contains("Region of interest"), "descriptions are printed:\n{out}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_anomaly_inspector_node")).arg("--version").output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn package_xml_depends_on_every_interface_package_the_node_uses() {
    // colcon (and rosdep) build and install only what package.xml names.
    let package = std::fs::read_to_string(root().join("package.xml")).unwrap();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut used = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices("r2r::") {
            let name: String = text[i + 5..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if name.ends_with("_msgs") || name.ends_with("_interfaces") {
                used.insert(name);
            }
        }
    }
    assert!(used.contains("lifecycle_msgs") && used.contains("sensor_msgs"), "{used:?}");
    for name in used {
        assert!(package.contains(&format!("<depend>{name}</depend>")), "package.xml does not depend on {name}");
    }
}
