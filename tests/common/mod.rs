//! Shared helpers of the whole-flow tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The checkout.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A model directory's `model.json`, parsed.
pub fn manifest(model: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(model.join("model.json")).unwrap()).unwrap()
}

/// The venv's Python, with a clear message when the set-up has not run.
pub fn python() -> PathBuf {
    let py = root().join(".venv/bin/python");
    assert!(py.exists(), "{} missing: run scripts/setup.sh (or scripts/test.sh) first", py.display());
    assert!(
        std::env::var_os("ANOMALY_INSPECTOR_ROOT").is_some(),
        "run the tests through scripts/test.sh (or `source scripts/env.sh` first): the rclpy peer needs its environment"
    );
    py
}

/// The Magnetic-Tile data set beside the checkout, if present.
pub fn magnetic_tile() -> Option<PathBuf> {
    let p = root().join("../shared/data/magnetic_tile");
    if p.join("train/good").is_dir() {
        Some(p)
    } else {
        eprintln!("skipping the real-data part: {} not found", p.display());
        None
    }
}

/// Sets the variables every ROS process of the tests must have: loopback discovery and a
/// domain of its own (per test, so tests never see each other's nodes).
pub fn ros_env(cmd: &mut Command, domain: u32, ros_home: &Path) {
    cmd.env("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        .env("ROS_DOMAIN_ID", domain.to_string())
        .env("ROS_HOME", ros_home)
        .env("ROS_LOG_DIR", ros_home.join("log"));
}

/// A child process that is stopped with SIGTERM (not SIGKILL: Fast DDS would leave
/// shared-memory files behind) when dropped.
pub struct Proc(pub Option<Child>);

impl Proc {
    /// Sends SIGTERM and waits up to 10 s; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.0.take()?;
        // SAFETY: kill(2) with our own child's pid; no memory is involved.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM)
        };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

/// What a peer run beside a node came to.
#[allow(dead_code)] // not every test file that includes this module runs a peer
pub struct PeerRun {
    /// The peer's exit.
    pub peer: std::process::ExitStatus,
    /// Whether the node was still running when the peer ended.
    pub node_alive: bool,
    /// The node's exit after SIGTERM.
    pub node_exit: Option<std::process::ExitStatus>,
    /// The node's log (also printed).
    pub log: String,
}

/// Runs `peer` to its end beside `node` (its output in `log`), then stops the node.
#[allow(dead_code)]
pub fn run_peer_beside(node: &mut Proc, peer: &mut Command, log: &Path) -> PeerRun {
    let peer = peer.status().expect("run the peer");
    let node_alive = node.0.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
    let node_exit = node.stop();
    let log = std::fs::read_to_string(log).unwrap();
    eprintln!("--- node log ---\n{log}");
    PeerRun { peer, node_alive, node_exit, log }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a synthetic data set under `dir/data` and fits a PatchCore model named `name` on its
/// good images (CPU), in `dir/models/<name>`. Returns the data set and the model directory.
pub fn synthetic_model(
    dir: &Path,
    cfg: &anomaly_inspector::synthetic::SyntheticConfig,
    name: &str,
) -> (anomaly_inspector::dataset::MvtecDataset, PathBuf) {
    let data = dir.join("data");
    anomaly_inspector::synthetic::generate_dataset(&data, cfg).unwrap();
    let ds = anomaly_inspector::dataset::MvtecDataset::open(&data).unwrap();
    let model = dir.join("models").join(name);
    anomaly_inspector::training::fit_patchcore(
        &ds.train_good,
        "synthetic",
        &anomaly_inspector::config::PatchCoreConfig::default(),
        &anomaly_inspector::config::default_backbone_weights(),
        tch::Device::Cpu,
        &model,
        &anomaly_inspector::training::FitOptions { name: name.into(), ..Default::default() },
        &mut |_, _, _| {},
    )
    .unwrap();
    (ds, model)
}

/// Large frames with small defects, for tiled models: 2x2 mosaics (512x512) of the built-in
/// 256x256 parts. `frames` is an MVTec-layout set of 12 good mosaics; `good` and `scratch` are
/// two test frames, the second with a scratched part in its bottom-right cell.
pub struct MosaicData {
    /// The training set (`train/good/*.png`).
    pub frames: PathBuf,
    /// A good test frame.
    pub good: PathBuf,
    /// A test frame with one scratch, in the bottom-right cell.
    pub scratch: PathBuf,
}

impl MosaicData {
    /// Writes the data under `dir`.
    pub fn write(dir: &Path) -> Self {
        let data = dir.join("parts");
        let cfg = anomaly_inspector::synthetic::SyntheticConfig {
            n_train: 12,
            n_test_good: 4,
            n_test_per_defect: 1,
            ..Default::default()
        };
        anomaly_inspector::synthetic::generate_dataset(&data, &cfg).unwrap();
        let sorted = |sub: &str| {
            let mut v: Vec<PathBuf> = std::fs::read_dir(data.join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
            v.sort();
            v
        };
        let good = sorted("train/good");
        let frames = dir.join("frames");
        std::fs::create_dir_all(frames.join("train/good")).unwrap();
        for i in 0..good.len() {
            let cells = [&good[i], &good[(i + 1) % 12], &good[(i + 5) % 12], &good[(i + 7) % 12]];
            Self::mosaic(cells).save(frames.join(format!("train/good/{i:03}.png"))).unwrap();
        }
        let (test_good, scratch) = (sorted("test/good"), sorted("test/scratch"));
        let input = dir.join("large_frames");
        std::fs::create_dir_all(&input).unwrap();
        let this = Self { frames, good: input.join("a_good.png"), scratch: input.join("b_scratch.png") };
        Self::mosaic([&test_good[0], &test_good[1], &test_good[2], &test_good[3]]).save(&this.good).unwrap();
        Self::mosaic([&test_good[0], &test_good[1], &test_good[2], &scratch[0]]).save(&this.scratch).unwrap();
        this
    }

    /// Whether a region's centre lies in the scratched (bottom-right) cell.
    pub fn in_scratched_cell(x: u32, y: u32, width: u32, height: u32) -> bool {
        x + width / 2 >= 256 && y + height / 2 >= 256
    }

    fn mosaic(cells: [&PathBuf; 4]) -> image::RgbImage {
        let mut frame = image::RgbImage::new(512, 512);
        for (i, cell) in cells.iter().enumerate() {
            let img = image::open(cell).unwrap().to_rgb8();
            image::imageops::replace(&mut frame, &img, 256 * (i as i64 % 2), 256 * (i as i64 / 2));
        }
        frame
    }
}

/// Starts the node binary on loopback in `domain` with `-p device:=cpu` and `params`
/// (each `name:=value`), its output going to `log`.
#[cfg(feature = "ros")]
pub fn start_node(domain: u32, ros_home: &Path, params: &[String], log: &Path) -> Proc {
    std::fs::create_dir_all(ros_home).unwrap();
    let out = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_anomaly_inspector_node"));
    cmd.args(["--ros-args", "-p", "device:=cpu"]);
    for p in params {
        cmd.args(["-p", p]);
    }
    cmd.stdout(out.try_clone().unwrap()).stderr(out);
    ros_env(&mut cmd, domain, ros_home);
    Proc(Some(cmd.spawn().expect("start anomaly_inspector_node")))
}
