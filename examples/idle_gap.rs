//! Does a pause between frames slow the next inspection? In the node the cores rest while a
//! frame travels (OpenMP workers stop spinning, caches cool); the engine benchmark runs frames
//! back to back. This times `Inspector::inspect` alternately right after the previous frame and
//! after a pause, in one process, so the machine's drift falls on both alike.
//!
//!   cargo run --release --example idle_gap -- <model dir> <image> <pause ms> [spawn]
//!
//! The image is resized to 640x480 (bilinear, as `scripts/image_peer.py` does); `spawn` runs on
//! a new thread, as the node's inference does. Measured on 2 AVX2 cores (PatchCore 256 of
//! `scripts/bench.sh`, 8 192 rows; 7 December 2026), medians of 40 each: back to back 40.2 /
//! 36.4 / 40.9 ms, after a pause of 1 / 5 / 20 ms 43.6 / 37.3 / 42.2 ms, and the same within
//! 1.5 % after 3 ms in four more runs whose absolute times moved from 45 to 61 ms.
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(image), Some(pause)) = (args.get(1), args.get(2), args.get(3)) else {
        anyhow::bail!("usage: idle_gap <model dir> <image> <pause ms> [spawn]");
    };
    let model = std::path::PathBuf::from(model);
    let image = image::open(image)?.to_rgb8();
    let pause_ms: u64 = pause.parse()?;
    let spawn = args.get(4).is_some_and(|s| s == "spawn");
    let run = move || -> anyhow::Result<()> {
        let frame = image::imageops::resize(&image, 640, 480, image::imageops::FilterType::Triangle);
        let inspector = anomaly_inspector::Inspector::new(&model, tch::Device::Cpu, &Default::default())?;
        let _guard = tch::no_grad_guard();
        for _ in 0..3 {
            inspector.inspect(&frame)?;
        }
        let (mut back_to_back, mut after_pause) = (Vec::new(), Vec::new());
        for i in 0..80 {
            let paused = i % 2 == 1;
            if paused {
                std::thread::sleep(Duration::from_millis(pause_ms));
            }
            let t = Instant::now();
            inspector.inspect(&frame)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if paused {
                after_pause.push(ms)
            } else {
                back_to_back.push(ms)
            }
        }
        println!(
            "back to back {:.1} ms, after a {pause_ms} ms pause {:.1} ms (medians of 40)",
            median(back_to_back),
            median(after_pause)
        );
        Ok(())
    };
    if spawn {
        std::thread::spawn(run).join().map_err(|_| anyhow::anyhow!("the inspection thread panicked"))?
    } else {
        run()
    }
}
