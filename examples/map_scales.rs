//! The study behind README's "Two-scale map": pixel AUROC and AUPRO of one model's patch
//! distances under the paper's map (`blur_sigma`), a wider blur alone, and the maximum of the
//! paper's map and a wide one (`coarse_blur_sigma`), for each scale given.
//!
//!   cargo run --release --example map_scales -- <model dir> <MVTec-layout dir> [24,32,48]
//!
//! Maps and masks are stretched to 256x256 and not calibrated, so the numbers sit a little below
//! `eval`'s; they compare the variants with each other. Choose scales on a validation split.
use std::path::PathBuf;

use anomaly_inspector::dataset::{load_mask, MvtecDataset};
use anomaly_inspector::imaging;
use anomaly_inspector::metrics::{pixel_metrics, PixelScores, AUPRO_FPR_LIMIT};
use anomaly_inspector::model_file::{self, AnomalyModel};
use anomaly_inspector::models::patchcore::{coarse_map, embed, flatten_patches, gaussian_blur};
use anomaly_inspector::preprocess::Preprocessor;
use tch::Device;

const SIDE: i64 = 256;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: map_scales <model dir> <MVTec-layout dir> [sigma,sigma,...]";
    let model_dir = PathBuf::from(args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?);
    let root = PathBuf::from(args.get(2).ok_or_else(|| anyhow::anyhow!(usage))?);
    let scales: Vec<f64> = match args.get(3) {
        Some(s) => s.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![24.0, 32.0, 48.0],
    };
    let _guard = tch::no_grad_guard();
    let AnomalyModel::PatchCore(model) = model_file::load(&model_dir, Device::Cpu)?.model else {
        anyhow::bail!("{}: a PatchCore model is needed", model_dir.display())
    };
    let cfg = model.config().clone();
    let pre = Preprocessor::new(&cfg.preprocess, Device::Cpu)?;
    let data = MvtecDataset::open(&root)?;
    let mut names = vec![format!("blur {} (one scale)", cfg.map.blur_sigma)];
    for s in &scales {
        names.push(format!("blur {s} alone"));
        names.push(format!("max(blur {}, coarse {s})", cfg.map.blur_sigma));
    }
    let mut pixels = vec![PixelScores::new(); names.len()];
    for sample in &data.test {
        let img = imaging::load(&sample.path)?;
        let (w, h) = img.dimensions();
        let e = embed(model.backbone(), &pre.frame(&img)?, cfg.neighbourhood)?;
        let (fh, fw) = (e.size()[2], e.size()[3]);
        let grid = model.patch_scores(&flatten_patches(&e)?, 1)?.0.view([1, 1, fh, fw]);
        let up = grid.upsample_bilinear2d([SIDE, SIDE], false, None, None);
        let mask: Vec<bool> = match &sample.mask {
            Some(m) if sample.defect.is_some() => {
                image::imageops::resize(&load_mask(m, w, h)?, SIDE as u32, SIDE as u32, image::imageops::FilterType::Nearest)
                    .pixels()
                    .map(|p| p.0[0] > 0)
                    .collect()
            }
            _ => vec![false; (SIDE * SIDE) as usize],
        };
        let fine = gaussian_blur(&up, cfg.map.blur_sigma)?;
        let mut maps = vec![fine.shallow_clone()];
        for &s in &scales {
            maps.push(gaussian_blur(&up, s)?);
            let coarse = coarse_map(&grid, s, SIDE, SIDE)?.unwrap_or_else(|| fine.shallow_clone());
            maps.push(fine.maximum(&coarse));
        }
        for (set, map) in pixels.iter_mut().zip(&maps) {
            set.add_image(&Vec::<f32>::try_from(map.view([-1]))?, &mask, SIDE as u32)?;
        }
    }
    println!("map | pixel AUROC | AUPRO@0.3");
    for (name, set) in names.iter().zip(pixels) {
        let m = pixel_metrics(&[&set.into_sorted()], AUPRO_FPR_LIMIT)?;
        println!("{name} | {:.3} | {:.3}", m.auroc, m.aupro);
    }
    Ok(())
}
