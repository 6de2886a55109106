//! Link settings that let the binaries run with an almost empty environment
//! (see ../shared/PLATFORM.md and the README's "platform notes").
//!
//! - rpath to libtorch (`DEP_TCH_LIBTORCH_LIB`, exported by torch-sys): tch's own rpath does not
//!   reach a downstream binary.
//! - with the `ros` feature: rpaths to every ament prefix's `lib/` and to the ROS wheels'
//!   `ros_*.libs` directories (their own RPATHs are wrong once installed), and libpython3.11
//!   linked explicitly (the wheels' typesupport libraries need CPython symbols).
//! - DT_RPATH rather than RUNPATH, so that `dlopen("libtorch_cuda.so")` at start-up searches it.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=AMENT_PREFIX_PATH");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let mut rpaths: Vec<PathBuf> = Vec::new();

    if std::env::var_os("CARGO_FEATURE_ROS").is_some() {
        let prefixes = std::env::var("AMENT_PREFIX_PATH").unwrap_or_default();
        for prefix in prefixes.split(':').filter(|p| !p.is_empty()) {
            let prefix = Path::new(prefix);
            rpaths.push(prefix.join("lib"));
            let site = prefix.join("lib/python3.11/site-packages");
            if let Ok(entries) = std::fs::read_dir(&site) {
                let mut libs: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                        name.starts_with("ros_") && name.ends_with(".libs")
                    })
                    .collect();
                libs.sort();
                rpaths.extend(libs);
            }
        }
        // Every target (node, tests) that may pull in librcl needs it.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-lpython3.11");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }

    let torch_lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .ok()
        .map(PathBuf::from)
        .or_else(|| std::env::var("LIBTORCH").ok().map(|p| PathBuf::from(p).join("lib")));
    if let Some(dir) = torch_lib {
        println!("cargo:rustc-env=ANOMALY_INSPECTOR_TORCH_LIB={}", dir.display());
        rpaths.push(dir);
    } else {
        println!("cargo:rustc-env=ANOMALY_INSPECTOR_TORCH_LIB=");
    }

    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
    for p in rpaths {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", p.display());
    }
}
