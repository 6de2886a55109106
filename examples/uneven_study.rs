//! The measurements behind README's "Searching only similar training images": what image-level
//! context does for PatchCore's pixel AUROC on Magnetic-Tile's "uneven" tiles.
//!
//!   cargo run --release --example uneven_study -- ../shared/data/magnetic_tile [K,K,...]
//!
//! Features (default backbone, 256 px) are extracted once; every training image keeps its own
//! 10 % coreset, as `fit --retrieval-images` does; then each variant scores the same test
//! features. Search: the whole bank (K = 0), the K training images nearest by descriptor
//! (`fit --retrieval-images K`), or (`VOTES=1`) the K training images that hold most of the
//! frame's nearest rows. Maps: as they are, minus the image's median patch score, or plus the
//! image score. Raw maps and masks stretched to 256x256, no calibration, so numbers sit a little
//! below `eval`'s; they compare variants with each other.
use std::path::PathBuf;

use anyhow::Context as _;

use anomaly_inspector::config::Search;
use anomaly_inspector::dataset::{load_mask, MvtecDataset};
use anomaly_inspector::metrics::{auroc, pixel_metrics, PixelScores, AUPRO_FPR_LIMIT};
use anomaly_inspector::models::backbone::Backbone;
use anomaly_inspector::models::patchcore::{embed, flatten_patches, gaussian_blur};
use anomaly_inspector::preprocess::Preprocessor;
use anomaly_inspector::{imaging, PatchCore, PatchCoreConfig};
use tch::{Device, Kind, Tensor};

const SIDE: i64 = 256;

/// How a variant turns patch distances into a map.
#[derive(Clone, Copy, Debug)]
enum MapMode {
    Raw,
    MinusImageMedian,
    PlusImageScore,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(args.get(1).ok_or_else(|| anyhow::anyhow!("usage: uneven_study <MVTec-layout dir> [K,K,...]"))?);
    let ks: Vec<usize> = match args.get(2) {
        Some(s) => s.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![5, 20],
    };
    let votes = std::env::var_os("VOTES").is_some();
    let _guard = tch::no_grad_guard();
    // The bank `fit --retrieval-images` builds, without its row limit (every image keeps its 10 %).
    let mut cfg = PatchCoreConfig { search: Search::Retrieval { images: 1 }, ..PatchCoreConfig::default() };
    cfg.coreset.max_rows = usize::MAX;
    let backbone = Backbone::new(&cfg.backbone, &anomaly_inspector::config::default_backbone_weights(), Device::Cpu)?;
    let pre = Preprocessor::new(&cfg.preprocess, Device::Cpu)?;
    let data = MvtecDataset::open(&root)?;
    let (fit, _) = anomaly_inspector::training::split_holdout(&data.train_good, 5);
    let frames = fit.iter().map(|p| pre.frame(&imaging::load(p)?));
    let (model, _) = PatchCore::fit(backbone, frames, &cfg, |_| {})?;
    let bank = model.memory_bank();
    let retrieval = model.image_retrieval().context("a bank fitted image by image has its retrieval")?;
    let owners = retrieval.image_of_row();
    let features = |p: &PathBuf| -> anyhow::Result<(Tensor, (i64, i64))> {
        let e = embed(model.backbone(), &pre.frame(&imaging::load(p)?)?, cfg.neighbourhood)?;
        Ok((flatten_patches(&e)?, (e.size()[2], e.size()[3])))
    };
    eprintln!("{} training images, bank {} x {}", fit.len(), bank.len(), bank.dim());

    let variants: Vec<usize> = std::iter::once(0).chain(ks).collect();
    let modes = [MapMode::Raw, MapMode::MinusImageMedian, MapMode::PlusImageScore];
    let types: Vec<String> = std::iter::once("good".to_string()).chain(data.defect_types()).collect();
    let mut pixels = vec![vec![vec![PixelScores::new(); types.len()]; modes.len()]; variants.len()];
    let mut image_scores = vec![Vec::new(); variants.len()];
    for sample in &data.test {
        let group = sample.defect.as_ref().map_or(0, |d| types.iter().position(|t| t == d).unwrap_or(0));
        let (f, (fh, fw)) = features(&sample.path)?;
        let (w, h) = imaging::load(&sample.path)?.dimensions();
        let mask: Vec<bool> = match (&sample.defect, &sample.mask) {
            (Some(_), Some(m)) => {
                image::imageops::resize(&load_mask(m, w, h)?, SIDE as u32, SIDE as u32, image::imageops::FilterType::Nearest)
                    .pixels()
                    .map(|p| p.0[0] > 0)
                    .collect()
            }
            _ => vec![false; (SIDE * SIDE) as usize],
        };
        let (whole, nearest) = bank.nearest(&f, 1)?;
        for (v, &k) in variants.iter().enumerate() {
            let dist = if k == 0 {
                whole.shallow_clone()
            } else {
                let subset = if votes {
                    let count = Tensor::zeros([retrieval.n_images()], (Kind::Float, Device::Cpu)).index_add(
                        0,
                        &owners.index_select(0, &nearest.view([-1])),
                        &Tensor::ones([nearest.size()[0]], (Kind::Float, Device::Cpu)),
                    );
                    let (_, top) = count.topk(k as i64, 0, true, false);
                    owners.unsqueeze(1).eq_tensor(&top.unsqueeze(0)).any_dim(1, false).nonzero().view([-1])
                } else {
                    retrieval.rows_for(&f, k)?
                };
                bank.subset(&subset)?.nearest(&f, 1)?.0
            };
            let score = dist.max().double_value(&[]);
            image_scores[v].push((score as f32, group != 0));
            let map = gaussian_blur(
                &dist.view([1, 1, fh, fw]).upsample_bilinear2d([SIDE, SIDE], false, None, None),
                cfg.map.blur_sigma,
            )?;
            let median = dist.median().double_value(&[]);
            for (m, mode) in modes.iter().enumerate() {
                let map = match mode {
                    MapMode::Raw => map.shallow_clone(),
                    MapMode::MinusImageMedian => &map - median,
                    MapMode::PlusImageScore => &map + score,
                };
                pixels[v][m][group].add_image(&Vec::<f32>::try_from(map.view([-1]))?, &mask, SIDE as u32)?;
            }
        }
    }

    println!(
        "search ({}) | map | image AUROC | pixel AUROC | AUPRO | pixel AUROC per type",
        if votes { "votes" } else { "descriptors" }
    );
    for (v, &k) in variants.iter().enumerate() {
        let (scores, labels): (Vec<f32>, Vec<bool>) = image_scores[v].iter().copied().unzip();
        let image_auroc = auroc(&scores, &labels)?;
        for (m, mode) in modes.iter().enumerate() {
            let sorted: Vec<_> = std::mem::take(&mut pixels[v][m]).into_iter().map(PixelScores::into_sorted).collect();
            let all = pixel_metrics(&sorted.iter().collect::<Vec<_>>(), AUPRO_FPR_LIMIT)?;
            let per_type = (1..types.len())
                .map(|t| Ok(format!("{} {:.3}", types[t], pixel_metrics(&[&sorted[0], &sorted[t]], AUPRO_FPR_LIMIT)?.auroc)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            println!("K {k:>3} | {mode:?} | {image_auroc:.3} | {:.3} | {:.3} | {}", all.auroc, all.aupro, per_type.join(" "));
        }
    }
    Ok(())
}
