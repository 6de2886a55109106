//! Simulated anomalies for DRAEM training (Zavrtanik et al., ICCV 2021, Sec. 3.3): a Perlin
//! noise field thresholded into an irregular blob mask, filled with an augmented texture that
//! is blended into a defect-free image with a random opacity.
//!
//! The paper takes its textures from the Describable Textures Dataset; nothing is downloaded
//! here. Textures come from a [`TextureSource`]: images (the training images themselves by
//! default, or a user folder), randomly rotated, flipped and changed in tone and colour, or
//! procedural textures (coloured fractal noise with stripes) drawn on the fly.
//!
//! Every random choice comes from the `ChaCha8Rng` the caller passes in, so a seed fixes every
//! mask and texture.
use std::f32::consts::{PI, SQRT_2};

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use crate::config::DraemConfig;
use crate::error::{Error, Result};

/// Perlin's quintic fade curve 6t^5 - 15t^4 + 10t^3.
fn fade(t: f32) -> f32 {
    t * t * t * (t * (t * 6.0 - 15.0) + 10.0)
}

/// 2-D gradient (Perlin) noise, `height * width` values row-major, roughly within -1..1 (the
/// reference code's sqrt(2) scaling). `cells = (rows, cols)`: lattice cells across the image's
/// height and width. The sampling grid is rotated by `angle` radians about the image centre,
/// which stands in for the reference's rotation of the noise image (and leaves no empty
/// corners). Gradients are drawn from `rng`.
pub fn perlin_noise(rng: &mut ChaCha8Rng, height: usize, width: usize, cells: (f32, f32), angle: f32) -> Vec<f32> {
    let (h, w) = (height as f32, width as f32);
    let (cy, cx) = (h / 2.0, w / 2.0);
    let (c, s) = (angle.cos(), angle.sin());
    // Rotated coordinates stay within the circumscribed circle: size the lattice for it.
    let r = (cx * cx + cy * cy).sqrt() + 1.0;
    let (sx, sy) = (cells.1 / w, cells.0 / h);
    let (x0, y0) = (((cx - r) * sx).floor() as i64, ((cy - r) * sy).floor() as i64);
    let nx = (((cx + r) * sx).ceil() as i64 - x0 + 2) as usize;
    let ny = (((cy + r) * sy).ceil() as i64 - y0 + 2) as usize;
    let gradients: Vec<(f32, f32)> = (0..nx * ny)
        .map(|_| {
            let a = rng.gen_range(0.0..2.0 * PI);
            (a.cos(), a.sin())
        })
        .collect();
    let mut out = Vec::with_capacity(height * width);
    for y in 0..height {
        for x in 0..width {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let gx = (cx + c * dx - s * dy) * sx;
            let gy = (cy + s * dx + c * dy) * sy;
            let (fx, fy) = (gx - gx.floor(), gy - gy.floor());
            let i = (gx.floor() as i64 - x0).clamp(0, nx as i64 - 2) as usize;
            let j = (gy.floor() as i64 - y0).clamp(0, ny as i64 - 2) as usize;
            let dot = |ii: usize, jj: usize, ox: f32, oy: f32| {
                let (a, b) = gradients[jj * nx + ii];
                a * ox + b * oy
            };
            let n00 = dot(i, j, fx, fy);
            let n10 = dot(i + 1, j, fx - 1.0, fy);
            let n01 = dot(i, j + 1, fx, fy - 1.0);
            let n11 = dot(i + 1, j + 1, fx - 1.0, fy - 1.0);
            let (u, v) = (fade(fx), fade(fy));
            let top = n00 + u * (n10 - n00);
            let bottom = n01 + u * (n11 - n01);
            out.push(SQRT_2 * (top + v * (bottom - top)));
        }
    }
    out
}

/// How masks are drawn: 2^k lattice cells per side with k uniform in `scale_log2` (drawn
/// separately for rows and columns), a random rotation, and a threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskParams {
    /// Inclusive range of k.
    pub scale_log2: [u32; 2],
    /// Noise above this is anomalous.
    pub threshold: f32,
}

impl MaskParams {
    /// The parameters of a DRAEM configuration.
    pub fn of(config: &DraemConfig) -> Self {
        Self { scale_log2: config.perlin_scale_log2, threshold: config.perlin_threshold as f32 }
    }
}

/// A binary anomaly mask (`height * width` values, each 0.0 or 1.0, row-major) that is never
/// empty: an empty draw (possible with coarse noise and a high threshold) is redrawn, and after
/// eight empty draws the top of the last noise field is taken.
pub fn perlin_mask(rng: &mut ChaCha8Rng, height: usize, width: usize, params: &MaskParams) -> Vec<f32> {
    let [lo, hi] = params.scale_log2;
    let mut noise = Vec::new();
    for _ in 0..8 {
        let ky = rng.gen_range(lo..=hi);
        let kx = rng.gen_range(lo..=hi);
        let angle = rng.gen_range(-PI / 2.0..PI / 2.0);
        noise = perlin_noise(rng, height, width, ((1u32 << ky) as f32, (1u32 << kx) as f32), angle);
        if noise.iter().any(|&v| v > params.threshold) {
            return noise.iter().map(|&v| if v > params.threshold { 1.0 } else { 0.0 }).collect();
        }
    }
    let (min, max) = noise.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let cut = max - 0.2 * (max - min);
    noise.iter().map(|&v| if v >= cut { 1.0 } else { 0.0 }).collect()
}

/// A procedural texture `[3, height, width]` with values in 0..1: two random colours mixed by
/// fractal Perlin noise (2-3 octaves), sometimes modulated by stripes or speckle.
pub fn procedural_texture(rng: &mut ChaCha8Rng, height: usize, width: usize) -> Result<Tensor> {
    let n = height * width;
    let mut field = vec![0.0f32; n];
    let base = rng.gen_range(1..=4u32);
    let octaves = rng.gen_range(2..=3u32);
    let angle = rng.gen_range(-PI..PI);
    for o in 0..octaves {
        let cells = (1u32 << (base + o).min(8)) as f32;
        let aspect = rng.gen_range(0.5f32..2.0);
        let layer = perlin_noise(rng, height, width, (cells, (cells * aspect).max(1.0)), angle);
        let amp = 0.5f32.powi(o as i32);
        for (f, v) in field.iter_mut().zip(layer) {
            *f += amp * v;
        }
    }
    let (min, max) = field.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let span = (max - min).max(1e-6);
    let colours: [[f32; 3]; 2] = [[rng.gen(), rng.gen(), rng.gen()], [rng.gen(), rng.gen(), rng.gen()]];
    let stripes = rng.gen_bool(0.5).then(|| (rng.gen_range(2.0f32..16.0), rng.gen_range(0.0..PI), rng.gen_range(0.0..2.0 * PI)));
    let speckle = rng.gen_bool(0.3);
    let mut out = vec![0.0f32; 3 * n];
    for y in 0..height {
        for x in 0..width {
            let i = y * width + x;
            let t = (field[i] - min) / span;
            let mut gain = 1.0;
            if let Some((freq, dir, phase)) = stripes {
                let p = (x as f32 * dir.cos() + y as f32 * dir.sin()) / width as f32;
                gain *= 0.6 + 0.4 * (0.5 + 0.5 * (2.0 * PI * freq * p + phase).sin());
            }
            if speckle {
                gain *= rng.gen_range(0.8f32..1.2);
            }
            for ch in 0..3 {
                let v = colours[0][ch] * (1.0 - t) + colours[1][ch] * t;
                out[ch * n + i] = (v * gain).clamp(0.0, 1.0);
            }
        }
    }
    Ok(Tensor::f_from_slice(&out)?.f_view([3, height as i64, width as i64])?)
}

/// Random tone and colour changes of a texture `[3, H, W]` (0..1) -> `[3, H, W]` (0..1): a
/// random quarter turn (half turn for non-square images) and flip, then three different
/// operations out of gamma, brightness/contrast, sharpening, hue/saturation, solarisation,
/// posterisation, inversion and autocontrast (the paper picks three of nine imgaug ops).
pub fn augment_texture(texture: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let s = texture.size();
    let square = s[1] == s[2];
    let k = if square { rng.gen_range(0..4) } else { 2 * rng.gen_range(0..2) };
    let mut t = texture.f_rot90(k, [1, 2])?;
    if rng.gen_bool(0.5) {
        t = t.f_flip([2])?;
    }
    let mut ops: Vec<u8> = (0..8).collect();
    ops.shuffle(rng);
    for op in &ops[..3] {
        t = match op {
            0 => t.f_clamp_min(1e-6)?.f_pow_tensor_scalar(rng.gen_range(0.5f64..2.0))?,
            1 => t.f_mul_scalar(rng.gen_range(0.8f64..1.2))?.f_add_scalar(rng.gen_range(-30.0f64..30.0) / 255.0)?,
            2 => {
                let blurred = t.f_unsqueeze(0)?.f_avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None)?.f_squeeze_dim(0)?;
                let amount = rng.gen_range(0.5f64..2.0);
                t.f_add(&t.f_sub(&blurred)?.f_mul_scalar(amount)?)?
            }
            3 => {
                let mut perm = [0i64, 1, 2];
                perm.shuffle(rng);
                let t = t.f_index_select(0, &Tensor::f_from_slice(&perm)?.f_to_device(t.device())?)?;
                let grey = t.f_mean_dim([0i64].as_slice(), true, Kind::Float)?;
                grey.f_add(&t.f_sub(&grey)?.f_mul_scalar(rng.gen_range(0.5f64..1.5))?)?
            }
            4 => {
                let th = rng.gen_range(32.0f64..128.0) / 255.0;
                let inverted = t.f_neg()?.f_add_scalar(1.0)?;
                inverted.f_where_self(&t.f_ge(th)?, &t)?
            }
            5 => {
                let levels = (1u32 << rng.gen_range(2..=5u32)) as f64;
                t.f_mul_scalar(levels)?.f_floor()?.f_div_scalar(levels)?
            }
            6 => t.f_neg()?.f_add_scalar(1.0)?,
            _ => {
                let flat = t.f_reshape([3, -1])?;
                let lo = flat.f_amin([1i64].as_slice(), true)?.f_unsqueeze(2)?;
                let hi = flat.f_amax([1i64].as_slice(), true)?.f_unsqueeze(2)?;
                t.f_sub(&lo)?.f_div(&hi.f_sub(&lo)?.f_clamp_min(1e-3)?)?
            }
        }
        .f_clamp(0.0, 1.0)?;
    }
    Ok(t)
}

/// Where textures come from.
#[derive(Debug)]
pub enum TextureSource {
    /// Images `[M, 3, H, W]` (uint8, the training size), picked at random and augmented.
    Images(Tensor),
    /// [`procedural_texture`].
    Procedural,
}

/// Makes training batches with simulated anomalies.
#[derive(Debug)]
pub struct AnomalySynthesizer {
    source: TextureSource,
    mask: MaskParams,
    probability: f64,
    max_beta: f64,
}

impl AnomalySynthesizer {
    /// A synthesizer with the mask, probability and opacity settings of `config`; image
    /// sources must be `[M >= 1, 3, H, W]` uint8.
    pub fn new(source: TextureSource, config: &DraemConfig) -> Result<Self> {
        if let TextureSource::Images(t) = &source {
            let s = t.size();
            if s.len() != 4 || s[0] < 1 || s[1] != 3 || t.kind() != Kind::Uint8 {
                return Err(Error::Config(format!("anomaly source images must be [M >= 1, 3, H, W] uint8, got {s:?}")));
            }
        }
        Ok(Self { source, mask: MaskParams::of(config), probability: config.anomaly_probability, max_beta: config.max_beta })
    }

    /// One texture `[3, H, W]` (0..1, float) on `device`.
    fn texture(&self, rng: &mut ChaCha8Rng, h: i64, w: i64, device: tch::Device) -> Result<Tensor> {
        let raw = match &self.source {
            TextureSource::Images(images) => {
                let i = rng.gen_range(0..images.size()[0]);
                let img = images.f_get(i)?.f_to_device(device)?.f_to_kind(Kind::Float)?.f_div_scalar(255.0)?;
                let s = img.size();
                if (s[1], s[2]) == (h, w) {
                    img
                } else {
                    img.f_unsqueeze(0)?.f_upsample_bilinear2d([h, w], false, None, None)?.f_squeeze_dim(0)?
                }
            }
            TextureSource::Procedural => procedural_texture(rng, h as usize, w as usize)?.f_to_device(device)?,
        };
        let t = augment_texture(&raw, rng)?;
        // A quarter turn of a non-square source cannot happen (see augment_texture), so the
        // size is (h, w) again; make sure of it anyway.
        let s = t.size();
        if (s[1], s[2]) != (h, w) {
            return Ok(t.f_unsqueeze(0)?.f_upsample_bilinear2d([h, w], false, None, None)?.f_squeeze_dim(0)?);
        }
        Ok(t)
    }

    /// Simulates anomalies in a batch of clean images `[B, 3, H, W]` (float, 0..1): each image
    /// gets one with probability `anomaly_probability`. Returns the images `[B, 3, H, W]`
    /// (0..1) and the masks `[B, 1, H, W]` (0.0 or 1.0; all zero where none was simulated).
    /// Blending as in the paper: `I (1 - M) + (1 - beta) A M + beta I M`, beta uniform in
    /// `0..max_beta`.
    pub fn synthesize(&self, clean: &Tensor, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor)> {
        let s = clean.size();
        if s.len() != 4 || s[1] != 3 {
            return Err(Error::BadImage(format!("expected [B, 3, H, W], got {s:?}")));
        }
        let (b, h, w) = (s[0], s[2], s[3]);
        let device = clean.device();
        let mut masks = Vec::with_capacity((b * h * w) as usize);
        let mut textures = Vec::with_capacity(b as usize);
        let mut betas = Vec::with_capacity(b as usize);
        for _ in 0..b {
            if self.probability > 0.0 && rng.gen_bool(self.probability) {
                masks.extend(perlin_mask(rng, h as usize, w as usize, &self.mask));
                textures.push(self.texture(rng, h, w, device)?);
                betas.push(if self.max_beta > 0.0 { rng.gen_range(0.0..self.max_beta) as f32 } else { 0.0 });
            } else {
                masks.extend(std::iter::repeat_n(0.0f32, (h * w) as usize));
                textures.push(Tensor::f_zeros([3, h, w], (Kind::Float, device))?);
                betas.push(0.0);
            }
        }
        let m = Tensor::f_from_slice(&masks)?.f_view([b, 1, h, w])?.f_to_device(device)?;
        let beta = Tensor::f_from_slice(&betas)?.f_view([b, 1, 1, 1])?.f_to_device(device)?;
        let a = Tensor::f_stack(&textures, 0)?;
        let clean = clean.f_to_kind(Kind::Float)?;
        // inside = (1 - beta) A + beta I
        let inside = a.f_mul(&beta.f_neg()?.f_add_scalar(1.0)?)?.f_add(&clean.f_mul(&beta)?)?;
        let out = clean.f_mul(&m.f_neg()?.f_add_scalar(1.0)?)?.f_add(&inside.f_mul(&m)?)?;
        Ok((out, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tch::Device;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn masks_are_deterministic_binary_and_never_empty() {
        let p = MaskParams { scale_log2: [0, 5], threshold: 0.5 };
        assert_eq!(perlin_mask(&mut rng(3), 64, 80, &p), perlin_mask(&mut rng(3), 64, 80, &p));
        assert_ne!(perlin_mask(&mut rng(3), 64, 80, &p), perlin_mask(&mut rng(4), 64, 80, &p));
        let mut r = rng(9);
        let mut coverage = 0.0;
        for (h, w) in [(64, 64), (65, 33), (128, 96), (32, 32)] {
            for _ in 0..20 {
                let m = perlin_mask(&mut r, h, w, &p);
                assert_eq!(m.len(), h * w);
                assert!(m.iter().all(|&v| v == 0.0 || v == 1.0));
                let on = m.iter().filter(|&&v| v == 1.0).count();
                assert!(on > 0, "empty mask at {h}x{w}");
                coverage += on as f64 / (h * w) as f64;
            }
        }
        let mean = coverage / 80.0;
        assert!(mean > 0.01 && mean < 0.5, "mean coverage {mean}");
        // A threshold the noise never reaches still gives a non-empty mask.
        let high = MaskParams { scale_log2: [0, 0], threshold: 0.99 };
        assert!(perlin_mask(&mut rng(1), 40, 40, &high).contains(&1.0));
    }

    #[test]
    fn noise_is_smooth_and_bounded() {
        let n = perlin_noise(&mut rng(5), 64, 64, (4.0, 4.0), 0.3);
        assert!(n.iter().all(|v| v.abs() <= 1.5), "out of range");
        // neighbours differ little: about 16 px per cell
        let max_step = (0..63).map(|x| (n[10 * 64 + x] - n[10 * 64 + x + 1]).abs()).fold(0.0f32, f32::max);
        assert!(max_step < 0.25, "{max_step}");
        let spread = n.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        assert!(spread > 0.2, "{spread}");
    }

    #[test]
    fn textures_are_in_range_and_seeded() {
        let a = procedural_texture(&mut rng(2), 48, 40).unwrap();
        assert_eq!(a.size(), vec![3, 48, 40]);
        assert!(a.equal(&procedural_texture(&mut rng(2), 48, 40).unwrap()));
        let img = Tensor::rand([3, 32, 32], (Kind::Float, Device::Cpu));
        for seed in 0..20 {
            let t = augment_texture(&img, &mut rng(seed)).unwrap();
            assert_eq!(t.size(), vec![3, 32, 32]);
            assert!(t.min().double_value(&[]) >= 0.0 && t.max().double_value(&[]) <= 1.0);
        }
        let wide = Tensor::rand([3, 16, 24], (Kind::Float, Device::Cpu));
        for seed in 0..8 {
            assert_eq!(augment_texture(&wide, &mut rng(seed)).unwrap().size(), vec![3, 16, 24]);
        }
    }

    #[test]
    fn synthesis_changes_only_masked_pixels() {
        let images = (Tensor::rand([5, 3, 40, 40], (Kind::Float, Device::Cpu)) * 255.0).to_kind(Kind::Uint8);
        let clean = Tensor::rand([6, 3, 40, 40], (Kind::Float, Device::Cpu));
        for (source, p) in [(TextureSource::Images(images), 1.0), (TextureSource::Procedural, 0.5)] {
            let cfg = DraemConfig { anomaly_probability: p, ..DraemConfig::cpu_small() };
            let synth = AnomalySynthesizer::new(source, &cfg).unwrap();
            let (aug, mask) = synth.synthesize(&clean, &mut rng(1)).unwrap();
            let (aug2, mask2) = synth.synthesize(&clean, &mut rng(1)).unwrap();
            assert!(aug.equal(&aug2) && mask.equal(&mask2), "not deterministic");
            assert_eq!(aug.size(), vec![6, 3, 40, 40]);
            assert_eq!(mask.size(), vec![6, 1, 40, 40]);
            let changed = (&aug - &clean).abs().amax([1i64].as_slice(), true).gt(1e-6).to_kind(Kind::Float);
            let inverse: Tensor = 1.0 - &mask;
            let outside = (&changed * &inverse).sum(Kind::Float).double_value(&[]);
            assert_eq!(outside, 0.0, "pixels changed outside the mask");
            let per_image = mask.sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float);
            let with = Vec::<f32>::try_from(&per_image).unwrap().iter().filter(|&&v| v > 0.0).count();
            if p == 1.0 {
                assert_eq!(with, 6);
            }
            assert!(aug.min().double_value(&[]) >= 0.0 && aug.max().double_value(&[]) <= 1.0);
        }
        let none = DraemConfig { anomaly_probability: 0.0, ..DraemConfig::cpu_small() };
        let synth = AnomalySynthesizer::new(TextureSource::Procedural, &none).unwrap();
        let (aug, mask) = synth.synthesize(&clean, &mut rng(1)).unwrap();
        assert!(aug.equal(&clean) && mask.sum(Kind::Float).double_value(&[]) == 0.0);
    }
}
