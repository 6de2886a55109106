//! The good-only self-check of `fit`: how well a fitted model tells held-out good images from
//! copies of them with synthetic defects, measured without a single real defect.
//!
//! The defects are DRAEM's simulated anomalies (Zavrtanik et al., "DRAEM - A discriminatively
//! trained reconstruction embedding for surface anomaly detection", ICCV 2021, Sec. 3.3): a
//! Perlin-noise blob mask filled with an augmented texture, blended in with a random opacity.
//! The texture is another held-out good image of the same part, so a defect looks like the
//! part's own surface out of place, and nothing is downloaded. The masks leave out DRAEM's
//! coarsest noise (one blob over half the frame), which every setting finds: only defects of at
//! most about a quarter of the frame tell settings apart.
//!
//! The images are pasted at the frame's own size and go through the model's own preprocessing
//! (tiles included), so the figure is what `inspect` would do with them. Whether it ranks
//! settings as real defects do is a measured question (README, "Self-check on synthetic
//! defects"); it is a sanity figure, not a promise.
use std::path::PathBuf;

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::DraemConfig;
use crate::error::{Error, Result};
use crate::imaging;
use crate::metrics;
use crate::models::perlin::{AnomalySynthesizer, TextureSource};
use crate::models::ModelOutput;
use crate::preprocess::Preprocessor;

/// What the synthetic defects look like.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyntheticDefects {
    /// The side of the window a defect lies in, as a share of the frame's sides, drawn uniformly
    /// in this range (1 = the whole frame, as DRAEM; 0.1 = a tenth of each side).
    pub extent: [f32; 2],
    /// Perlin cells per frame side, as powers of two (inclusive range): more cells, smaller blobs.
    pub scale_log2: [u32; 2],
    /// How much of the defect shows, drawn uniformly in this range (1 = DRAEM's paste as it is,
    /// 0.3 = a faint one).
    pub opacity: [f32; 2],
}

impl Default for SyntheticDefects {
    /// 4 to 32 cells per side (DRAEM draws 1 to 32) at full opacity.
    fn default() -> Self {
        Self { extent: [1.0, 1.0], scale_log2: [2, 5], opacity: [1.0, 1.0] }
    }
}
/// Pixel AUROC is computed on maps of at most this many pixels (larger maps are average-pooled,
/// their masks with them), so that a tiled model's stitched maps do not need gigabytes to sort.
const MAX_MAP_PIXELS: i64 = 256 * 256;

/// The self-check's result, kept in the model's `model.json` (`training.self_check`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelfCheck {
    /// Image AUROC: held-out good images (negatives) against synthetic-defect copies (positives).
    pub image_auroc: f64,
    /// Pixel AUROC over the synthetic-defect images: pasted pixels against the rest.
    pub pixel_auroc: f64,
    /// Held-out good images scored.
    pub n_good: usize,
    /// Synthetic-defect images scored.
    pub n_synthetic: usize,
    /// What the defects looked like (the defaults where a model.json does not say).
    #[serde(default)]
    pub defects: SyntheticDefects,
    /// Seed of the masks and textures (the same seed gives the same defects).
    pub seed: u64,
    /// Wall time of pasting and scoring.
    pub seconds: f64,
}

impl std::fmt::Display for SelfCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "self-check on synthetic defects: image AUROC {:.3}, pixel AUROC {:.3} ({} synthetic-defect copies of {} held-out good images)",
            self.image_auroc, self.pixel_auroc, self.n_synthetic, self.n_good
        )
    }
}

/// How many synthetic-defect images, of what kind, from which seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SelfCheckPlan {
    /// Synthetic-defect copies of held-out images to score.
    pub images: usize,
    /// What the defects look like.
    pub defects: SyntheticDefects,
    /// Copy `i` draws from the seed `seed + i`.
    pub seed: u64,
}

/// Pastes `plan.images` synthetic defects into copies of the `holdout` images (cycling through
/// them, one seed per copy) and scores them with `forward` through `pre`. `good_scores` are the
/// held-out images' own image scores (one per image, from calibration). `progress(done, total)`
/// is called per image.
pub fn run(
    holdout: &[PathBuf],
    good_scores: &[f32],
    plan: &SelfCheckPlan,
    pre: &Preprocessor,
    forward: &dyn Fn(&Tensor) -> Result<ModelOutput>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SelfCheck> {
    let SelfCheckPlan { images: n_synthetic, defects, seed } = *plan;
    if holdout.is_empty() || good_scores.len() != holdout.len() || n_synthetic == 0 {
        return Err(Error::Config(format!(
            "the self-check needs held-out images with one score each and at least one synthetic image (got {} images, {} scores, {n_synthetic} copies)",
            holdout.len(),
            good_scores.len()
        )));
    }
    let started = std::time::Instant::now();
    let mut image_scores = Vec::with_capacity(n_synthetic);
    let mut pixel_scores = Vec::new();
    let mut pixel_labels = Vec::new();
    // Copy i is image i with the texture of image i + 1 (itself when it is the only one), so
    // each texture is the next copy's image: every image is decoded once per pass.
    let mut clean = imaging::load(&holdout[0])?;
    for i in 0..n_synthetic {
        let texture = imaging::load(&holdout[(i + 1) % holdout.len()])?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(i as u64));
        let (defective, mask) = paste(&clean, &texture, &defects, &mut rng)?;
        let out = pre.run(&defective, forward)?;
        image_scores.push(out.image_scores.f_double_value(&[0])? as f32);
        let (map, mask) = comparable(&out.anomaly_maps, &mask)?;
        pixel_scores.extend(Vec::<f32>::try_from(&map)?);
        pixel_labels.extend(Vec::<f32>::try_from(&mask)?.into_iter().map(|v| v > 0.5));
        progress(i + 1, n_synthetic);
        clean = texture;
    }
    let scores: Vec<f32> = good_scores.iter().chain(&image_scores).copied().collect();
    let labels: Vec<bool> = (0..scores.len()).map(|i| i >= good_scores.len()).collect();
    Ok(SelfCheck {
        image_auroc: metrics::auroc(&scores, &labels)?,
        pixel_auroc: metrics::auroc(&pixel_scores, &pixel_labels)?,
        n_good: good_scores.len(),
        n_synthetic,
        defects,
        seed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `clean` with one synthetic defect drawn as `defects` says, its texture from `texture`:
/// (the image, its mask `[1, 1, H, W]` of 0.0/1.0 at the image's size).
pub fn paste(
    clean: &RgbImage,
    texture: &RgbImage,
    defects: &SyntheticDefects,
    rng: &mut ChaCha8Rng,
) -> Result<(RgbImage, Tensor)> {
    let draw = |rng: &mut ChaCha8Rng, [lo, hi]: [f32; 2]| if hi > lo { rng.gen_range(lo..=hi) } else { lo };
    let x = chw_u8(clean)?.f_unsqueeze(0)?.f_to_kind(Kind::Float)?.f_div_scalar(255.0)?;
    let (h, w) = (x.size()[2], x.size()[3]);
    // The window the defect lies in: a share of each side, somewhere in the frame.
    let extent = draw(rng, defects.extent).clamp(0.0, 1.0);
    let (wh, ww) =
        (((h as f32 * extent).round() as i64).clamp(1.min(h), h), ((w as f32 * extent).round() as i64).clamp(1.min(w), w));
    let (y0, x0) = (rng.gen_range(0..=h - wh), rng.gen_range(0..=w - ww));
    let config = DraemConfig { anomaly_probability: 1.0, perlin_scale_log2: defects.scale_log2, ..DraemConfig::default() };
    let synthesizer = AnomalySynthesizer::new(TextureSource::Images(chw_u8(texture)?.f_unsqueeze(0)?), &config)?;
    let window = x.f_narrow(2, y0, wh)?.f_narrow(3, x0, ww)?;
    let (pasted, window_mask) = synthesizer.synthesize(&window, rng)?;
    let opacity = draw(rng, defects.opacity) as f64;
    let blended = window.f_add(&pasted.f_sub(&window)?.f_mul_scalar(opacity)?)?;
    let mut defective = x.f_empty_like()?;
    defective.f_copy_(&x)?;
    defective.f_narrow(2, y0, wh)?.f_narrow(3, x0, ww)?.f_copy_(&blended)?;
    let mask = Tensor::f_zeros([1, 1, h, w], (Kind::Float, Device::Cpu))?;
    mask.f_narrow(2, y0, wh)?.f_narrow(3, x0, ww)?.f_copy_(&window_mask)?;
    let (w, h) = clean.dimensions();
    let hwc = defective
        .f_mul_scalar(255.0)?
        .f_round()?
        .f_clamp(0.0, 255.0)?
        .f_to_kind(Kind::Uint8)?
        .f_squeeze_dim(0)?
        .f_permute([1, 2, 0])?
        .f_contiguous()?;
    let image = RgbImage::from_raw(w, h, Vec::<u8>::try_from(&hwc.f_view([-1])?)?)
        .ok_or_else(|| Error::BadImage(format!("a synthetic defect of a {w}x{h} image lost its size")))?;
    Ok((image, mask))
}

/// An RGB image as a `[3, H, W]` uint8 tensor on the CPU.
fn chw_u8(image: &RgbImage) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    Ok(Tensor::f_from_slice(image.as_raw())?.f_view([h as i64, w as i64, 3])?.f_permute([2, 0, 1])?)
}

/// A map `[1, 1, h, w]` (any device) and a mask `[1, 1, H, W]` brought to one grid of at most
/// [`MAX_MAP_PIXELS`] on the CPU: the mask resized to the map (area average), both pooled when
/// the map is larger. Returns (map, mask fraction), flat.
fn comparable(map: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = map.size();
    let (h, w) = (s[s.len() - 2], s[s.len() - 1]);
    let map = map.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_view([1, 1, h, w])?;
    let mask = mask.f_to_device(Device::Cpu)?.f_adaptive_avg_pool2d([h, w])?;
    let factor = ((h * w) as f64 / MAX_MAP_PIXELS as f64).sqrt().ceil().max(1.0) as i64;
    let (map, mask) = if factor > 1 {
        let size = [(h / factor).max(1), (w / factor).max(1)];
        (map.f_adaptive_avg_pool2d(size)?, mask.f_adaptive_avg_pool2d(size)?)
    } else {
        (map, mask)
    };
    Ok((map.f_view([-1])?, mask.f_view([-1])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PreprocessConfig;

    fn plain(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb([v, v, v]))
    }

    #[test]
    fn pasting_changes_only_the_masked_pixels_and_is_seeded() {
        let clean = plain(70, 50, 128);
        let mut texture = plain(40, 30, 0);
        for (x, y, p) in texture.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 6) as u8, (y * 8) as u8, 200]);
        }
        let full = SyntheticDefects::default();
        let (a, mask) = paste(&clean, &texture, &full, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        let (b, _) = paste(&clean, &texture, &full, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        assert_eq!(a, b, "the same seed must give the same defect");
        assert_eq!(a.dimensions(), (70, 50));
        assert_eq!(mask.size(), vec![1, 1, 50, 70]);
        let m = Vec::<f32>::try_from(&mask.f_view([-1]).unwrap()).unwrap();
        let masked = m.iter().filter(|&&v| v > 0.5).count();
        assert!(masked > 0 && masked < m.len(), "mask covers {masked} of {} pixels", m.len());
        for (i, p) in a.pixels().enumerate() {
            if m[i] == 0.0 {
                assert_eq!(p.0, [128, 128, 128], "pixel {i} changed outside the mask");
            }
        }
        assert!(a.pixels().any(|p| p.0 != [128, 128, 128]), "nothing was pasted");
        // At opacity 0 nothing shows; at 0.5 every change is about half as large.
        let at = |opacity| SyntheticDefects { opacity: [opacity, opacity], ..full };
        let (none, _) = paste(&clean, &texture, &at(0.0), &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        assert_eq!(none, clean);
        let (half, _) = paste(&clean, &texture, &at(0.5), &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        for (p, q) in half.pixels().zip(a.pixels()) {
            for c in 0..3 {
                let (d_half, d_full) = (p.0[c] as f32 - 128.0, q.0[c] as f32 - 128.0);
                assert!((d_half - 0.5 * d_full).abs() <= 1.0, "{d_half} vs {d_full}");
            }
        }
    }

    #[test]
    fn a_record_without_the_defects_reads_as_the_defaults() {
        // model.json files written before `defects` was recorded must still load.
        let old = r#"{"image_auroc": 0.9, "pixel_auroc": 0.8, "n_good": 4, "n_synthetic": 6, "seed": 0, "seconds": 1.0}"#;
        let check: SelfCheck = serde_json::from_str(old).unwrap();
        assert_eq!(check.defects, SyntheticDefects::default());
        assert_eq!((check.n_good, check.n_synthetic), (4, 6));
    }

    #[test]
    fn a_small_extent_keeps_the_defect_in_a_window_of_that_share_of_the_frame() {
        let clean = plain(200, 100, 128);
        let texture = plain(50, 50, 10);
        let small = SyntheticDefects { extent: [0.1, 0.1], scale_log2: [0, 1], opacity: [1.0, 1.0] };
        let mut places = std::collections::HashSet::new();
        for seed in 0..6 {
            let (_, mask) = paste(&clean, &texture, &small, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            let m = Vec::<f32>::try_from(&mask.f_view([-1]).unwrap()).unwrap();
            let on: Vec<(usize, usize)> = (0..m.len()).filter(|&i| m[i] > 0.5).map(|i| (i % 200, i / 200)).collect();
            assert!(!on.is_empty());
            let (x0, x1) = (on.iter().map(|p| p.0).min().unwrap(), on.iter().map(|p| p.0).max().unwrap());
            let (y0, y1) = (on.iter().map(|p| p.1).min().unwrap(), on.iter().map(|p| p.1).max().unwrap());
            assert!(x1 - x0 < 20 && y1 - y0 < 10, "seed {seed}: defect spans {}x{} px", x1 - x0 + 1, y1 - y0 + 1);
            places.insert((x0, y0));
        }
        assert!(places.len() > 1, "the window never moved");
    }

    #[test]
    fn a_model_that_sees_the_pasted_pixels_scores_one_and_a_blind_one_a_half() {
        // Forward functions on the preprocessed input: "sees" = how far each pixel is from its
        // image's median (its map and its maximum), which on plain images is the paste; "blind" =
        // a constant.
        let pre = Preprocessor::new(&PreprocessConfig { image_size: [32, 48], ..Default::default() }, Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..4 {
            let p = dir.path().join(format!("{i}.png"));
            // Plain images of two greys: each one's texture (the next image) differs from it.
            let im = plain(96, 64, if i % 2 == 0 { 30 } else { 220 });
            imaging::save_png(&p, &im).unwrap();
            paths.push(p);
        }
        let sees = |x: &Tensor| -> Result<ModelOutput> {
            let s = x.size();
            let (median, _) = x.f_reshape([s[0], 3, -1])?.f_median_dim(2, true)?;
            let map = x.f_sub(&median.f_unsqueeze(3)?)?.f_abs()?.f_sum_dim_intlist([1i64].as_slice(), true, Kind::Float)?;
            let n = map.size()[0];
            Ok(ModelOutput { image_scores: map.f_reshape([n, -1])?.f_amax([1i64].as_slice(), false)?, anomaly_maps: map })
        };
        let blind = |x: &Tensor| -> Result<ModelOutput> {
            let s = x.size();
            Ok(ModelOutput {
                image_scores: Tensor::f_zeros([s[0]], (Kind::Float, Device::Cpu))?,
                anomaly_maps: Tensor::f_zeros([s[0], 1, s[2], s[3]], (Kind::Float, Device::Cpu))?,
            })
        };
        let good = [0.0f32; 4];
        let mut calls = 0;
        let plan = SelfCheckPlan { images: 6, defects: SyntheticDefects::default(), seed: 7 };
        let seen = run(&paths, &good, &plan, &pre, &sees, &mut |_, _| calls += 1).unwrap();
        assert_eq!(calls, 6);
        assert_eq!((seen.n_good, seen.n_synthetic), (4, 6));
        assert_eq!(seen.image_auroc, 1.0, "{seen}");
        assert!(seen.pixel_auroc > 0.95, "{seen}");
        let none = run(&paths, &good, &plan, &pre, &blind, &mut |_, _| {}).unwrap();
        assert_eq!((none.image_auroc, none.pixel_auroc), (0.5, 0.5));
        assert!(run(&paths, &good[..3], &plan, &pre, &blind, &mut |_, _| {}).is_err(), "scores must match images");
    }
}
