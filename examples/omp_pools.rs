//! Why the node runs torch ops on one thread only: inspection on a second OS thread while the
//! first thread's OpenMP pool is still alive (its workers spin-wait) is much slower.
//!
//!   cargo run --release --example omp_pools -- <model dir> main,spawn,main
//!
//! Each step loads the model and times `Inspector::inspect` on a 640x480 frame (median of 40)
//! on the main thread or on a new thread. Measured on 2 CPU cores, libgomp's default wait
//! policy: main 49.7 ms, then spawned 69.7 ms, then main 45.2 ms; with OMP_WAIT_POLICY=ACTIVE
//! main 45.8, spawned 92.5. Two spawned threads one after the other: 47.6, 49.1 (the first
//! thread's pool ends with it).
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_inspect(model: &std::path::Path, n: usize) -> anyhow::Result<f64> {
    let frame = image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x * y) % 239) as u8]));
    let post = anomaly_inspector::PostprocessConfig::default();
    let inspector = anomaly_inspector::Inspector::new(model, tch::Device::Cpu, &post)?;
    let _guard = tch::no_grad_guard();
    inspector.inspect(&frame)?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        inspector.inspect(&frame)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(steps)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: omp_pools <model dir> <steps, e.g. main,spawn,main>");
    };
    let model = std::path::PathBuf::from(model);
    for step in steps.split(',') {
        let ms = match step {
            "main" => time_inspect(&model, 40)?,
            "spawn" => {
                let m = model.clone();
                std::thread::spawn(move || time_inspect(&m, 40)).join().map_err(|_| anyhow::anyhow!("thread panicked"))??
            }
            other => anyhow::bail!("unknown step '{other}': use main or spawn"),
        };
        println!("{step:<6} {ms:6.1} ms per frame");
    }
    Ok(())
}
