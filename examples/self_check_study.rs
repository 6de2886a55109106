//! The study behind README's "Self-check on synthetic defects": does the image AUROC on synthetic
//! defects pasted into held-out good images (no real defect needed) rank a part's settings the
//! way its real defects do? If it did, `fit` could choose settings per part from good images.
//!
//!   python scripts/compare_sets.py --split validation --out OUT --configs ...   # fits + real AUROC
//!   cargo run --release --features studies --example self_check_study -- <data root> OUT [images [set,set]]
//!
//! For every set with models under `OUT/models/<set>/<setting>` and eval reports
//! `OUT/reports/<set>_<setting>.json` (compare_sets' layout), it scores each family of synthetic
//! defects below on the model's held-out good images (the same split as `fit`), prints every
//! setting's real image AUROC beside them and, per family, Spearman's rho between the two over
//! the settings, per set and averaged. A few pasted images per family are written to
//! `OUT/self_check_samples/` to look at.
use std::path::{Path, PathBuf};

use anomaly_inspector::dataset::MvtecDataset;
use anomaly_inspector::imaging;
use anomaly_inspector::model_file;
use anomaly_inspector::preprocess::Preprocessor;
use anomaly_inspector::self_check::{self, SelfCheckPlan, SyntheticDefects};
use anomaly_inspector::training::{split_holdout, FitOptions};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Device;

/// The families compared: DRAEM's blobs over the whole frame, faint ones, and single small
/// defects (a window of 5-20 % of each side), plain and faint.
fn families() -> Vec<(&'static str, SyntheticDefects)> {
    let whole = SyntheticDefects::default();
    let small = SyntheticDefects { extent: [0.05, 0.2], scale_log2: [0, 2], opacity: [1.0, 1.0] };
    vec![
        ("whole", whole),
        ("faint", SyntheticDefects { opacity: [0.2, 0.6], ..whole }),
        ("small", small),
        ("small faint", SyntheticDefects { opacity: [0.3, 0.8], ..small }),
    ]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: self_check_study <data root> <compare_sets out> [images [set,set,...]]";
    let data_root = PathBuf::from(args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?);
    let out = PathBuf::from(args.get(2).ok_or_else(|| anyhow::anyhow!(usage))?);
    let n: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(40);
    let _guard = tch::no_grad_guard();
    let families = families();
    let samples = out.join("self_check_samples");
    std::fs::create_dir_all(&samples)?;
    let mut rhos: Vec<Vec<f64>> = vec![Vec::new(); families.len()];
    let mut sets: Vec<PathBuf> = std::fs::read_dir(out.join("models"))?.map(|e| Ok(e?.path())).collect::<anyhow::Result<_>>()?;
    sets.sort();
    if let Some(only) = args.get(4) {
        let wanted: Vec<&str> = only.split(',').collect();
        sets.retain(|p| p.file_name().is_some_and(|n| wanted.iter().any(|w| n == *w)));
    }
    for set_models in sets {
        let set = set_models.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let data = MvtecDataset::open(&data_root.join(&set))?;
        let (_, holdout) = split_holdout(&data.train_good, FitOptions::default().holdout_every);
        write_samples(&holdout, &families, &samples, &set)?;
        let mut settings: Vec<PathBuf> = std::fs::read_dir(&set_models)?.map(|e| Ok(e?.path())).collect::<anyhow::Result<_>>()?;
        settings.sort();
        println!("\n{set}: {} held-out good images, {n} synthetic-defect copies per family", holdout.len());
        print!("{:<10} {:>9}", "setting", "real");
        for (name, _) in &families {
            print!(" {name:>11}");
        }
        println!();
        let mut real = Vec::new();
        let mut synthetic: Vec<Vec<f64>> = vec![Vec::new(); families.len()];
        for dir in &settings {
            let setting = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let report = out.join("reports").join(format!("{set}_{setting}.json"));
            if !report.is_file() {
                println!("{setting:<10} (no eval report: left out)");
                continue;
            }
            let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
            let auroc = r["image_auroc"].as_f64().ok_or_else(|| anyhow::anyhow!("{}: no image_auroc", report.display()))?;
            let loaded = model_file::load(dir, Device::Cpu)?;
            let pre = Preprocessor::new(loaded.manifest.preprocess(), Device::Cpu)?;
            let forward = |x: &tch::Tensor| loaded.model.forward(x);
            let good = holdout
                .iter()
                .map(|p| Ok(pre.run(&imaging::load(p)?, &forward)?.image_scores.f_double_value(&[0])? as f32))
                .collect::<anyhow::Result<Vec<f32>>>()?;
            print!("{setting:<10} {auroc:>9.3}");
            real.push(auroc);
            for (i, (_, defects)) in families.iter().enumerate() {
                let check = self_check::run(
                    &holdout,
                    &good,
                    &SelfCheckPlan { images: n, defects: *defects, seed: 0 },
                    &pre,
                    &forward,
                    &mut |_, _| {},
                )?;
                print!(" {:>11.3}", check.image_auroc);
                synthetic[i].push(check.image_auroc);
            }
            println!();
        }
        print!("{:<10} {:>9}", "rho", "");
        for (i, s) in synthetic.iter().enumerate() {
            let rho = spearman(s, &real);
            print!(" {:>11}", rho.map(|r| format!("{r:+.2}")).unwrap_or_else(|| "-".into()));
            rhos[i].extend(rho);
        }
        println!();
    }
    println!("\nmean rho over the sets (a constant figure counts as no information, rho 0):");
    for ((name, _), r) in families.iter().zip(&rhos) {
        println!("  {name:<12} {:+.2} ({} sets)", r.iter().sum::<f64>() / r.len().max(1) as f64, r.len());
    }
    Ok(())
}

/// Two pasted images per family of the first held-out images, to look at.
fn write_samples(holdout: &[PathBuf], families: &[(&str, SyntheticDefects)], dir: &Path, set: &str) -> anyhow::Result<()> {
    for (name, defects) in families {
        for i in 0..2.min(holdout.len()) {
            let clean = imaging::load(&holdout[i])?;
            let texture = imaging::load(&holdout[(i + 1) % holdout.len()])?;
            let (image, _) = self_check::paste(&clean, &texture, defects, &mut ChaCha8Rng::seed_from_u64(i as u64))?;
            imaging::save_png(&dir.join(format!("{set}_{}_{i}.png", name.replace(' ', "_"))), &image)?;
        }
    }
    Ok(())
}

/// Spearman's rank correlation (ties share their mean rank); 0 when either list is constant
/// (the figure then carries no ranking), None for fewer than 3 values.
fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() < 3 || a.len() != b.len() {
        return None;
    }
    let ranks = |v: &[f64]| -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            for k in i..=j {
                r[order[k]] = (i + j) as f64 / 2.0 + 1.0;
            }
            i = j + 1;
        }
        r
    };
    let (ra, rb) = (ranks(a), ranks(b));
    let m = (a.len() + 1) as f64 / 2.0;
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - m) * (y - m)).sum();
    let (va, vb): (f64, f64) = (ra.iter().map(|x| (x - m).powi(2)).sum(), rb.iter().map(|y| (y - m).powi(2)).sum());
    Some(if va == 0.0 || vb == 0.0 { 0.0 } else { cov / (va * vb).sqrt() })
}
