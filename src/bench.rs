//! Where the time goes: per-stage timings of the engine for one model and frame size, next to
//! the floor (the model's own forward pass and kNN, nothing else), and how the kNN grows with
//! the memory-bank size. Behind `anomaly_inspector bench` and `scripts/bench.sh`; numbers, not
//! assertions (these machines are shared and noisy, so targets live here and not in tests).
use std::time::Instant;

use image::RgbImage;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::imaging::{self, PixelEncoding, RawImage};
use crate::model_file::AnomalyModel;
use crate::models::patchcore::{embed, flatten_patches, MemoryBank};
use crate::Inspector;
use crate::{Error, Result};

/// Median milliseconds of each stage of one inspected frame.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageTimes {
    /// PNG bytes -> RGB image (what a compressed-image frame costs on top).
    pub decode_png_ms: f64,
    /// rgb8 message data -> RGB image (the raw-image path of the node).
    pub convert_ms: f64,
    /// RGB image -> normalised `[1, 3, H, W]` tensor on the device.
    pub preprocess_ms: f64,
    /// PatchCore: backbone and neighbourhood aggregation. DRAEM: both networks.
    pub network_ms: f64,
    /// PatchCore: nearest-neighbour search over the memory bank (exact or approximate, as the
    /// model is configured). DRAEM: 0.
    pub knn_ms: f64,
    /// The model's full forward (network + kNN + score reweighting, map upsampling and blur).
    pub forward_ms: f64,
    /// Map normalisation, copy to the CPU, resize to the frame, regions.
    pub postprocess_ms: f64,
    /// [`Inspector::inspect`] on an RGB frame: preprocess + forward + post-processing.
    pub engine_ms: f64,
    /// The floor: network + kNN run back to back on a ready tensor.
    pub floor_ms: f64,
}

/// One model at one frame size.
#[derive(Clone, Debug, Serialize)]
pub struct EngineBench {
    /// Model name.
    pub model: String,
    /// "patchcore" or "draem".
    pub method: String,
    /// Network input side in pixels.
    pub input_size: i64,
    /// Frame width x height fed to the engine.
    pub frame: [u32; 2],
    /// Memory-bank rows (PatchCore).
    pub bank_size: Option<i64>,
    /// Memory-bank feature dimension (PatchCore).
    pub bank_dim: Option<i64>,
    /// Device, e.g. "cpu".
    pub device: String,
    /// Timed repetitions per stage (after warm-up).
    pub iterations: usize,
    /// Medians per stage.
    pub stages: StageTimes,
    /// engine / floor - 1: what the engine adds above the model's own work.
    pub engine_overhead: f64,
    /// Resident memory after the runs and its peak, MiB (whole process).
    pub rss_mib: f64,
    /// Peak resident memory, MiB.
    pub peak_rss_mib: f64,
}

impl EngineBench {
    /// The header of the table [`Self::table_row`] writes rows of.
    pub fn table_header() -> String {
        format!(
            "{:<22} {:>5} {:>9} {:>7} | {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>8} | {:>6}",
            "model",
            "input",
            "frame",
            "bank",
            "png",
            "convert",
            "preproc",
            "network",
            "knn",
            "forward",
            "post",
            "engine",
            "floor",
            "overhead",
            "RSS MiB"
        )
    }

    /// One line of the stage table: milliseconds per stage, overhead and memory.
    pub fn table_row(&self) -> String {
        let (s, [w, h]) = (&self.stages, self.frame);
        format!(
            "{:<22} {:>5} {:>9} {:>7} | {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} | {:>7.2} {:>7.2} {:>7.1}% | {:>6.0}",
            self.model, self.input_size, format!("{w}x{h}"), self.bank_size.map_or("-".into(), |b| b.to_string()),
            s.decode_png_ms, s.convert_ms, s.preprocess_ms, s.network_ms, s.knn_ms, s.forward_ms, s.postprocess_ms,
            s.engine_ms, s.floor_ms, self.engine_overhead * 100.0, self.rss_mib
        )
    }
}

/// Times the engine's stages for `inspector` on `frame`, `iterations` times each (plus two
/// warm-up runs). `png` is the frame encoded as PNG (for the decode stage).
pub fn bench_engine(inspector: &Inspector, frame: &RgbImage, png: &[u8], iterations: usize) -> Result<EngineBench> {
    let _guard = tch::no_grad_guard();
    let iterations = iterations.max(1);
    let (model, pre) = inspector.parts();
    let raw = RawImage {
        width: frame.width(),
        height: frame.height(),
        step: frame.width() * 3,
        encoding: PixelEncoding::Rgb8,
        is_bigendian: false,
        data: frame.as_raw(),
    };
    let device = inspector.device();
    // With tiles, the network's input is the frame's batch of tiles, all in one forward.
    let x = pre.inputs(frame)?.0;

    let decode_png_ms = median_ms(iterations, || imaging::decode(png).map(drop))?;
    let convert_ms = median_ms(iterations, || imaging::to_rgb(&raw).map(drop))?;
    let preprocess_ms = median_ms(iterations, || pre.inputs(frame).map(|t| sync(&t.0, device)))?;
    let forward_ms = median_ms(iterations, || model.forward(&x).map(|o| sync(&o.anomaly_maps, device)))?;
    let engine_ms = median_ms(iterations, || inspector.inspect(frame).map(drop))?;
    let (network_ms, knn_ms, floor_ms, bank_size) = match model {
        AnomalyModel::PatchCore(m) => {
            let n = m.config().neighbourhood;
            let frames = x.size()[0];
            let patches = || flatten_patches(&embed(m.backbone(), &x, n)?);
            let network = median_ms(iterations, || patches().map(|t| sync(&t, device)))?;
            let q = patches()?;
            let bank = m.memory_bank();
            let knn = median_ms(iterations, || m.patch_scores(&q, frames).map(|(d, _)| sync(&d, device)))?;
            let floor = median_ms(iterations, || {
                let q = patches()?;
                m.patch_scores(&q, frames).map(|(d, _)| sync(&d, device))
            })?;
            (network, knn, floor, Some((bank.len(), bank.dim())))
        }
        AnomalyModel::Draem(m) => {
            let network = median_ms(iterations, || m.forward(&x).map(|o| sync(&o.anomaly_maps, device)))?;
            (network, 0.0, network, None)
        }
        AnomalyModel::SuperSimpleNet(m) => {
            let network = median_ms(iterations, || m.forward(&x).map(|o| sync(&o.anomaly_maps, device)))?;
            (network, 0.0, network, None)
        }
    };
    let out = pre.run(frame, &|x| model.forward(x))?;
    let postprocess_ms = median_ms(iterations, || inspector.conclude(&out, frame.width(), frame.height()).map(drop))?;
    let (rss_mib, peak_rss_mib) = memory_mib();
    Ok(EngineBench {
        model: inspector.model_id().to_string(),
        method: inspector.method().to_string(),
        input_size: pre.input_size().0,
        frame: [frame.width(), frame.height()],
        bank_size: bank_size.map(|b| b.0),
        bank_dim: bank_size.map(|b| b.1),
        device: crate::device::describe(device),
        iterations,
        stages: StageTimes {
            decode_png_ms,
            convert_ms,
            preprocess_ms,
            network_ms,
            knn_ms,
            forward_ms,
            postprocess_ms,
            engine_ms,
            floor_ms,
        },
        engine_overhead: engine_ms / floor_ms - 1.0,
        rss_mib,
        peak_rss_mib,
    })
}

/// kNN cost against memory-bank size: random `[rows, dim]` banks, `queries` query patches.
#[derive(Clone, Debug, Serialize)]
pub struct KnnScaling {
    /// Bank rows.
    pub bank_rows: i64,
    /// Feature dimension.
    pub dim: i64,
    /// Query patches (one image's worth).
    pub queries: i64,
    /// Median milliseconds of one exact 1-NN search.
    pub knn_ms: f64,
}

/// What `anomaly_inspector bench --json` writes.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The device, in words.
    pub device: String,
    /// One row per model and frame size.
    pub engine: Vec<EngineBench>,
    /// kNN time against bank size (empty when not asked for).
    pub knn_scaling: Vec<KnnScaling>,
}

impl BenchReport {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        crate::evaluation::json_text(self, true)
    }
}

/// A frame size written `WxH` (`640x480`), each side 16..=8192.
pub fn parse_frame_size(s: &str) -> Result<(u32, u32)> {
    let bad = |why: &str| Error::Config(format!("frame size '{s}': {why}"));
    let (w, h) = s.split_once('x').ok_or_else(|| bad("write WxH, e.g. 640x480"))?;
    let side = |v: &str| v.trim().parse::<u32>().map_err(|e| bad(&e.to_string()));
    let (w, h) = (side(w)?, side(h)?);
    if !(16..=8192).contains(&w) || !(16..=8192).contains(&h) {
        return Err(bad("each side must be 16..=8192"));
    }
    Ok((w, h))
}

/// Times [`MemoryBank::nearest`] for each of `rows` bank sizes.
pub fn bench_knn_scaling(rows: &[i64], dim: i64, queries: i64, device: Device, iterations: usize) -> Result<Vec<KnnScaling>> {
    let _guard = tch::no_grad_guard();
    tch::manual_seed(0);
    let q = Tensor::f_randn([queries, dim], (Kind::Float, device))?;
    rows.iter()
        .map(|&r| {
            let bank = MemoryBank::new(Tensor::f_randn([r, dim], (Kind::Float, device))?)?;
            let knn_ms = median_ms(iterations, || bank.nearest(&q, 1).map(|(d, _)| sync(&d, device)))?;
            Ok(KnnScaling { bank_rows: r, dim, queries, knn_ms })
        })
        .collect()
}

/// Waits for queued device work so that a timing covers the work that made `_result` (CUDA
/// runs asynchronously).
fn sync(_result: &Tensor, device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median wall time of `iterations` calls of `f` after two warm-up calls, in ms.
fn median_ms(iterations: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// (current, peak) resident memory of this process in MiB, from /proc (0 where unavailable).
pub fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
