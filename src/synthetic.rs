//! The demo's built-in data: a procedurally rendered brushed-metal surface and four kinds of
//! surface defect, written as an MVTec AD layout data set (see [`crate::dataset`]).
//!
//! The project must not ship a third-party data set, so the demo, the tests and a first
//! model are built from these images. They are meant to look like a real inspection camera's
//! view of a machined part: a grey metal surface with fine directional brushing, a smooth
//! illumination fall-off and per-part variation in brightness, brushing angle and tint; defects
//! have the contrast of real ones (clearly visible to a person, small against the image).
//!
//! Everything is drawn with the ChaCha8 generator, seeded from (`seed`, image index, purpose),
//! so the same seed gives byte-identical files on every run.
use std::f32::consts::PI;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::error::{Error, Result};

/// Smallest image side rendered; smaller requests are raised to it (defects need some room).
pub const MIN_SIZE: u32 = 32;
/// Largest image side rendered; larger requests are lowered to it.
pub const MAX_SIZE: u32 = 4096;
/// A pixel belongs to a defect's mask when the defect changed it by at least this many grey
/// levels (about three times the sensor-noise level), or lies inside the defect's body.
pub const MASK_MIN_DELTA: f32 = 5.0;

/// How to generate a synthetic data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// Seed of every random choice; the same seed gives identical files.
    pub seed: u64,
    /// Side of the square images in pixels.
    pub size: u32,
    /// Defect-free training images.
    pub n_train: usize,
    /// Defect-free test images.
    pub n_test_good: usize,
    /// Test images of each defect kind.
    pub n_test_per_defect: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self { seed: 7, size: 256, n_train: 80, n_test_good: 6, n_test_per_defect: 6 }
    }
}

/// What [`generate_dataset`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetSummary {
    /// The data set root.
    pub root: PathBuf,
    /// Side of the images in pixels.
    pub size: u32,
    /// Images in `train/good`.
    pub n_train: usize,
    /// Images in `test/good`.
    pub n_test_good: usize,
    /// Defective images in `test/<kind>`, all kinds together.
    pub n_test_defect: usize,
    /// The defect folders written, in [`DefectKind::ALL`] order.
    pub defect_types: Vec<String>,
}

/// The kinds of defect the generator draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DefectKind {
    /// Thin dark or bright line segments, slightly curved, sometimes in parallel groups.
    Scratch,
    /// A shallow elliptical depression, lit from one side: a bright and a dark wall.
    Dent,
    /// One to three small dark pits or bright specks.
    Spot,
    /// A soft, irregular, discoloured patch (rust-brown or dark oil).
    Stain,
}

impl DefectKind {
    /// Every kind, in the order data sets list them.
    pub const ALL: [DefectKind; 4] = [Self::Scratch, Self::Dent, Self::Spot, Self::Stain];

    /// The folder name (`scratch`, `dent`, `spot`, `stain`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Scratch => "scratch",
            Self::Dent => "dent",
            Self::Spot => "spot",
            Self::Stain => "stain",
        }
    }
}

impl fmt::Display for DefectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DefectKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| Error::Config(format!("defect kind '{s}': use scratch, dent, spot or stain")))
    }
}

/// Stream purposes, so that texture and defect draws never share random numbers.
const PURPOSE_TEXTURE: u64 = 1;
const PURPOSE_DEFECT: u64 = 2;

fn rng_for(seed: u64, index: u64, purpose: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.set_stream(index);
    rng
}

/// A uniform draw from `lo..hi`, or the middle when the range is empty (tiny images), because
/// `gen_range` panics on an empty range.
fn uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        (lo + hi) / 2.0
    }
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    rng.sample(StandardNormal)
}

fn smoothstep(edge0: f32, edge1: f32, x: f32) -> f32 {
    let t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// A surface being rendered, as float layers so that defects can change the texture itself
/// (a dent burnishes the brushing away) and not only paint over it.
struct Surface {
    size: usize,
    /// Base brightness and illumination.
    shading: Vec<f32>,
    /// Brushing streaks and lines, around 0.
    texture: Vec<f32>,
    /// Sensor noise, around 0.
    grain: Vec<f32>,
    /// Per-image colour cast of the metal.
    tint: [f32; 3],
    /// Brushing direction (radians from horizontal), for defects that must avoid it.
    brush_angle: f32,
    /// Direction light comes from, for shaded defects.
    light: (f32, f32),
}

/// A defect's contribution, with the mask of where it was drawn.
struct Defect {
    /// Grey-level change.
    delta: Vec<f32>,
    /// Per-channel colour change.
    colour: Vec<[f32; 3]>,
    /// Factor on the surface texture (1 = untouched).
    texture_gain: Vec<f32>,
    /// Where the defect's body is, 0..1 (besides what `delta` and `colour` show).
    body: Vec<f32>,
}

impl Defect {
    fn new(n: usize) -> Self {
        Self { delta: vec![0.0; n], colour: vec![[0.0; 3]; n], texture_gain: vec![1.0; n], body: vec![0.0; n] }
    }
}

/// Value noise along one axis: random knots `spacing` apart, smoothly interpolated.
fn smooth_knots(knots: &[f32], pos: f32) -> f32 {
    let last = knots.len() - 1;
    let p = pos.clamp(0.0, last as f32);
    let i = (p.floor() as usize).min(last);
    let j = (i + 1).min(last);
    let t = p - i as f32;
    let t = t * t * (3.0 - 2.0 * t);
    knots[i] + (knots[j] - knots[i]) * t
}

/// A field of streaks along the brushing direction: across it, a new random value every
/// `across` pixels (linearly interpolated); along it, values that drift smoothly over
/// `along` pixels, so each streak fades in and out like real brushing marks.
fn streak_field(rng: &mut ChaCha8Rng, size: usize, angle: f32, across: f32, along: f32) -> Vec<f32> {
    let (c, s) = (angle.cos(), angle.sin());
    // The rotated coordinates of the image corners bound the grid.
    let extent = size as f32 * 1.5 + 4.0;
    let nv = (extent / across).ceil() as usize + 2;
    let nu = (extent / along).ceil() as usize + 2;
    let grid: Vec<f32> = (0..nv * nu).map(|_| normal(rng)).collect();
    let half = size as f32 / 2.0;
    // Linear across (streaks have sharp-ish sides), smoothstep along (they fade gently).
    let cell = |p: f32, n: usize, smooth: bool| {
        let p = p.clamp(0.0, (n - 1) as f32);
        let i = (p.floor() as usize).min(n - 1);
        let t = p - i as f32;
        (i, (i + 1).min(n - 1), if smooth { t * t * (3.0 - 2.0 * t) } else { t })
    };
    let mut out = Vec::with_capacity(size * size);
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (x as f32 - half, y as f32 - half);
            let (i0, i1, tv) = cell((-dx * s + dy * c + extent / 2.0) / across, nv, false);
            let (j0, j1, tu) = cell((dx * c + dy * s + extent / 2.0) / along, nu, true);
            let row0 = grid[i0 * nu + j0] + (grid[i0 * nu + j1] - grid[i0 * nu + j0]) * tu;
            let row1 = grid[i1 * nu + j0] + (grid[i1 * nu + j1] - grid[i1 * nu + j0]) * tu;
            out.push(row0 + (row1 - row0) * tv);
        }
    }
    out
}

/// Renders the defect-free surface of image `index`.
fn render_surface(seed: u64, index: u64, size: u32) -> Surface {
    let size = size.clamp(MIN_SIZE, MAX_SIZE) as usize;
    let s = size as f32;
    let k = s / 256.0;
    let mut rng = rng_for(seed, index, PURPOSE_TEXTURE);

    // Per-part variation: brightness, brushing angle, colour cast, light position.
    let base = 132.0 + 5.0 * normal(&mut rng);
    let brush_angle = (1.5 * normal(&mut rng)).clamp(-4.0, 4.0).to_radians();
    let cast = 0.008 * normal(&mut rng);
    let tint = [0.985 + cast, 1.0, 1.02 - cast];
    let light_angle = rng.gen_range(-2.4f32..-0.7);
    let light = (light_angle.cos(), light_angle.sin());

    // Illumination: a linear fall-off across the part and a broad highlight of the ring light.
    let grad_dir = rng.gen_range(0.0..2.0 * PI);
    let grad_amp = rng.gen_range(4.0f32..10.0);
    let (hx, hy) = (rng.gen_range(-0.2f32..1.2) * s, rng.gen_range(-0.2f32..1.2) * s);
    let h_sigma = rng.gen_range(0.45f32..0.9) * s;
    let h_amp = rng.gen_range(6.0f32..14.0);
    let mut shading = Vec::with_capacity(size * size);
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (x as f32 / s - 0.5, y as f32 / s - 0.5);
            let gradient = grad_amp * 2.0 * (fx * grad_dir.cos() + fy * grad_dir.sin());
            let d2 = (x as f32 - hx).powi(2) + (y as f32 - hy).powi(2);
            let highlight = h_amp * (-d2 / (2.0 * h_sigma * h_sigma)).exp();
            shading.push(base + gradient + highlight - h_amp * 0.4);
        }
    }

    // Brushing: fine dense streaks, broader bands, and a few longer brush lines.
    let fine = streak_field(&mut rng, size, brush_angle, 1.0, 18.0 * k.max(0.5));
    let bands = streak_field(&mut rng, size, brush_angle, 3.5 * k.max(0.5), 70.0 * k.max(0.5));
    let fine_amp = rng.gen_range(3.0f32..4.5);
    let band_amp = rng.gen_range(2.0f32..3.5);
    let mut texture: Vec<f32> = fine.iter().zip(&bands).map(|(f, b)| fine_amp * f + band_amp * b).collect();
    let n_lines = rng.gen_range(1..=4);
    for _ in 0..n_lines {
        let amp = rng.gen_range(4.0f32..8.0) * if rng.gen_bool(0.6) { -1.0 } else { 1.0 };
        let len = rng.gen_range(0.3f32..1.0) * s;
        let (cx, cy) = (rng.gen_range(0.0..s), rng.gen_range(0.0..s));
        let (dx, dy) = (brush_angle.cos(), brush_angle.sin());
        let a = (cx - dx * len / 2.0, cy - dy * len / 2.0);
        let b = (cx + dx * len / 2.0, cy + dy * len / 2.0);
        draw_segment(&mut texture, size, a, b, 0.6, |t| amp * fade(t, 0.25));
    }

    let grain: Vec<f32> = (0..size * size).map(|_| 1.6 * normal(&mut rng)).collect();
    Surface { size, shading, texture, grain, tint, brush_angle, light }
}

/// 0 at both ends of 0..1, 1 in the middle; `edge` is the fraction spent fading.
fn fade(t: f32, edge: f32) -> f32 {
    smoothstep(0.0, edge, t) * smoothstep(1.0, 1.0 - edge, t)
}

/// Adds an anti-aliased line from `a` to `b`, `width` pixels wide, whose value at fraction `t`
/// of its length is `value(t)`. Where it overlaps what is already drawn the larger magnitude
/// wins, so segments of a polyline do not double up at their joints.
fn draw_segment(layer: &mut [f32], size: usize, a: (f32, f32), b: (f32, f32), width: f32, value: impl Fn(f32) -> f32) {
    let half = width / 2.0;
    let reach = half + 1.0;
    let x0 = (a.0.min(b.0) - reach).floor().max(0.0) as usize;
    let y0 = (a.1.min(b.1) - reach).floor().max(0.0) as usize;
    let x1 = ((a.0.max(b.0) + reach).ceil().max(0.0) as usize).min(size - 1);
    let y1 = ((a.1.max(b.1) + reach).ceil().max(0.0) as usize).min(size - 1);
    let (ex, ey) = (b.0 - a.0, b.1 - a.1);
    let len2 = (ex * ex + ey * ey).max(1e-6);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let (px, py) = (x as f32 - a.0, y as f32 - a.1);
            let t = ((px * ex + py * ey) / len2).clamp(0.0, 1.0);
            let dist = ((px - t * ex).powi(2) + (py - t * ey).powi(2)).sqrt();
            // Coverage of a pixel by a line of this width: a box filter's 1-pixel ramp.
            let coverage = (half + 0.5 - dist).clamp(0.0, 1.0);
            if coverage <= 0.0 {
                continue;
            }
            let v = coverage * value(t);
            let cell = &mut layer[y * size + x];
            if v.abs() > cell.abs() {
                *cell = v;
            }
        }
    }
}

/// A curved scratch (quadratic Bézier) across the brushing, with varying depth along it.
fn draw_scratch(rng: &mut ChaCha8Rng, surface: &Surface, defect: &mut Defect) {
    let s = surface.size as f32;
    let k = s / 256.0;
    // At least 25 degrees off the brushing direction: a scratch along it would be a brush line.
    let offset = rng.gen_range(25.0f32..155.0).to_radians();
    let angle = surface.brush_angle + offset;
    let len = rng.gen_range(0.2f32..0.5) * s;
    let (dx, dy) = (angle.cos(), angle.sin());
    let margin = 6.0 * k.max(1.0);
    let span_x = (dx.abs() * len / 2.0 + margin).min(s / 2.0 - 1.0);
    let span_y = (dy.abs() * len / 2.0 + margin).min(s / 2.0 - 1.0);
    let cx = uniform(rng, span_x, s - span_x);
    let cy = uniform(rng, span_y, s - span_y);
    let bend = rng.gen_range(-0.12f32..0.12) * len;
    let sign = if rng.gen_bool(0.6) { -1.0 } else { 1.0 };
    let contrast = rng.gen_range(28.0f32..46.0);
    let width = rng.gen_range(1.2f32..2.6) * k.max(0.6);
    let n_lines = if rng.gen_bool(0.35) { rng.gen_range(2..=3) } else { 1 };
    let mut layer = vec![0.0f32; surface.size * surface.size];
    for line in 0..n_lines {
        // Companion lines: parallel, a few pixels away, shorter and fainter.
        let shift = line as f32 * rng.gen_range(3.0f32..6.0) * k.max(0.6);
        let (ox, oy) = (-dy * shift, dx * shift);
        let part = if line == 0 { 1.0 } else { rng.gen_range(0.4f32..0.8) };
        let strength = if line == 0 { 1.0 } else { rng.gen_range(0.5f32..0.8) };
        let start = if line == 0 { 0.0 } else { rng.gen_range(0.0..1.0 - part) };
        let p0 = (cx - dx * len / 2.0 + ox, cy - dy * len / 2.0 + oy);
        let p2 = (cx + dx * len / 2.0 + ox, cy + dy * len / 2.0 + oy);
        let p1 = (cx - dy * bend + ox, cy + dx * bend + oy);
        let bezier = |t: f32| {
            let u = 1.0 - t;
            (u * u * p0.0 + 2.0 * u * t * p1.0 + t * t * p2.0, u * u * p0.1 + 2.0 * u * t * p1.1 + t * t * p2.1)
        };
        // Depth wanders along the scratch: knots every ~10 pixels.
        let knots: Vec<f32> = (0..((len * part / 10.0) as usize).max(2) + 1).map(|_| rng.gen_range(0.55f32..1.0)).collect();
        let steps = ((len * part) as usize).max(4);
        let w = if line == 0 { width } else { width * 0.8 };
        for i in 0..steps {
            let (t0, t1) = (i as f32 / steps as f32, (i + 1) as f32 / steps as f32);
            let a = bezier(start + part * t0);
            let b = bezier(start + part * t1);
            let depth = strength * fade(t0, 0.12) * smooth_knots(&knots, t0 * (knots.len() - 1) as f32);
            draw_segment(&mut layer, surface.size, a, b, w, |_| sign * contrast * depth);
        }
    }
    for (d, l) in defect.delta.iter_mut().zip(&layer) {
        *d += l;
    }
}

/// A shallow dent: a smooth elliptical bowl, shaded by the light direction, brushing burnished
/// away inside.
fn draw_dent(rng: &mut ChaCha8Rng, surface: &Surface, defect: &mut Defect) {
    let s = surface.size as f32;
    let k = s / 256.0;
    let a = rng.gen_range(8.0f32..17.0) * k;
    let b = a * rng.gen_range(0.55f32..1.0);
    let rot = rng.gen_range(0.0..PI);
    let margin = a + 4.0;
    let (cx, cy) = (uniform(rng, margin, s - margin), uniform(rng, margin, s - margin));
    let shade = rng.gen_range(14.0f32..22.0);
    let darken = rng.gen_range(6.0f32..12.0);
    let (cr, sr) = (rot.cos(), rot.sin());
    // Bowl height at a point: (1 - r^2)^2 inside the ellipse, 0 outside.
    let height = |x: f32, y: f32| {
        let (dx, dy) = (x - cx, y - cy);
        let (u, v) = ((dx * cr + dy * sr) / a, (-dx * sr + dy * cr) / b);
        let r2 = u * u + v * v;
        if r2 < 1.0 {
            (1.0 - r2) * (1.0 - r2)
        } else {
            0.0
        }
    };
    let (lx, ly) = surface.light;
    let n = surface.size;
    let (x0, x1) = (((cx - a - 2.0).max(0.0)) as usize, ((cx + a + 2.0) as usize).min(n - 1));
    let (y0, y1) = (((cy - a - 2.0).max(0.0)) as usize, ((cy + a + 2.0) as usize).min(n - 1));
    for y in y0..=y1 {
        for x in x0..=x1 {
            let (fx, fy) = (x as f32, y as f32);
            let h = height(fx, fy);
            // How fast the bowl deepens away from the light (central difference, 1 pixel),
            // scaled to the dent's size: in a depression the wall nearer the light is in shadow
            // and the far wall, which faces the light, is bright.
            let slope = (height(fx + lx, fy + ly) - height(fx - lx, fy - ly)) / 2.0 * b;
            let i = y * n + x;
            defect.delta[i] += shade * slope - darken * h;
            // Burnished smooth only in the bowl's body, which the mask covers (body >= 0.5).
            defect.texture_gain[i] = 1.0 - 0.8 * smoothstep(0.5, 0.9, h);
            // The whole bowl is defect, also where light and darkening happen to cancel.
            defect.body[i] = defect.body[i].max(smoothstep(0.0, 0.06, h));
        }
    }
}

/// One to three small pits (dark) or specks (bright) with soft edges, close together.
fn draw_spots(rng: &mut ChaCha8Rng, surface: &Surface, defect: &mut Defect) {
    let s = surface.size as f32;
    let k = s / 256.0;
    let n_spots = rng.gen_range(1..=3);
    let cluster = 14.0 * k.max(0.5);
    let margin = cluster + 10.0 * k.max(0.5) + 2.0;
    let (cx, cy) = (uniform(rng, margin, s - margin), uniform(rng, margin, s - margin));
    let sign = if rng.gen_bool(0.7) { -1.0 } else { 1.0 };
    let n = surface.size;
    for spot in 0..n_spots {
        let (px, py) =
            if spot == 0 { (cx, cy) } else { (cx + rng.gen_range(-cluster..cluster), cy + rng.gen_range(-cluster..cluster)) };
        let a = rng.gen_range(3.5f32..7.0) * k.max(0.5);
        let b = a * rng.gen_range(0.6f32..1.0);
        let rot = rng.gen_range(0.0..PI);
        let contrast = rng.gen_range(36.0f32..58.0) * if spot == 0 { 1.0 } else { rng.gen_range(0.6f32..1.0) };
        let (cr, sr) = (rot.cos(), rot.sin());
        let (x0, x1) = (((px - a - 2.0).max(0.0)) as usize, ((px + a + 2.0) as usize).min(n - 1));
        let (y0, y1) = (((py - a - 2.0).max(0.0)) as usize, ((py + a + 2.0) as usize).min(n - 1));
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (dx, dy) = (x as f32 - px, y as f32 - py);
                let (u, v) = ((dx * cr + dy * sr) / a, (-dx * sr + dy * cr) / b);
                let r = (u * u + v * v).sqrt();
                let p = smoothstep(1.0, 0.55, r);
                let i = y * n + x;
                let value = sign * contrast * p;
                if value.abs() > defect.delta[i].abs() {
                    defect.delta[i] = value;
                }
                defect.body[i] = defect.body[i].max(p);
            }
        }
    }
}

/// A soft irregular patch: rust-brown or dark oil, darker at its rim where the liquid dried.
fn draw_stain(rng: &mut ChaCha8Rng, surface: &Surface, defect: &mut Defect) {
    let s = surface.size as f32;
    let k = s / 256.0;
    let radius = rng.gen_range(16.0f32..34.0) * k;
    let aspect = rng.gen_range(0.65f32..1.0);
    let rot = rng.gen_range(0.0..PI);
    // The outline wobbles: a few low harmonics of the angle.
    let harmonics: Vec<(f32, f32, f32)> =
        (2..=5).map(|m| (m as f32, rng.gen_range(0.0f32..0.11), rng.gen_range(0.0..2.0 * PI))).collect();
    let max_r = radius * (1.0 + harmonics.iter().map(|h| h.1).sum::<f32>());
    let margin = max_r + 3.0;
    let (cx, cy) = (uniform(rng, margin, s - margin), uniform(rng, margin, s - margin));
    let rust = rng.gen_bool(0.6);
    let (darken, colour) = if rust {
        (rng.gen_range(6.0f32..12.0), [rng.gen_range(8.0f32..13.0), rng.gen_range(-1.0f32..2.0), rng.gen_range(-16.0f32..-10.0)])
    } else {
        (rng.gen_range(14.0f32..22.0), [rng.gen_range(-5.0f32..-2.0), rng.gen_range(-3.0f32..0.0), rng.gen_range(2.0f32..6.0)])
    };
    // Mottling inside: two random plane waves.
    let waves: Vec<(f32, f32, f32)> = (0..2)
        .map(|_| (rng.gen_range(0.0..2.0 * PI), rng.gen_range(0.04f32..0.12) / k.max(0.25), rng.gen_range(0.0..2.0 * PI)))
        .collect();
    let (cr, sr) = (rot.cos(), rot.sin());
    let n = surface.size;
    let (x0, x1) = (((cx - max_r - 2.0).max(0.0)) as usize, ((cx + max_r + 2.0) as usize).min(n - 1));
    let (y0, y1) = (((cy - max_r - 2.0).max(0.0)) as usize, ((cy + max_r + 2.0) as usize).min(n - 1));
    for y in y0..=y1 {
        for x in x0..=x1 {
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            let (u, v) = (dx * cr + dy * sr, (-dx * sr + dy * cr) / aspect);
            let theta = v.atan2(u);
            let outline = radius * (1.0 + harmonics.iter().map(|&(m, amp, ph)| amp * (m * theta + ph).cos()).sum::<f32>());
            let rho = (u * u + v * v).sqrt() / outline;
            let inside = smoothstep(1.0, 0.7, rho);
            if inside <= 0.0 {
                continue;
            }
            let mottle = 0.8
                + 0.1
                    * waves
                        .iter()
                        .map(|&(dir, freq, ph)| ((x as f32 * dir.cos() + y as f32 * dir.sin()) * freq + ph).sin())
                        .sum::<f32>();
            let rim = (-((rho - 0.88) / 0.08).powi(2)).exp();
            let strength = inside * mottle;
            let i = y * n + x;
            defect.delta[i] += -darken * strength - 5.0 * rim * inside;
            for (out, tint) in defect.colour[i].iter_mut().zip(colour) {
                *out += tint * strength;
            }
            defect.body[i] = defect.body[i].max(inside);
        }
    }
}

/// Composes the layers into 8-bit RGB, and the mask of where `defect` shows.
fn compose(surface: &Surface, defect: Option<&Defect>) -> (RgbImage, GrayImage) {
    let n = surface.size as u32;
    let mut image = RgbImage::new(n, n);
    let mut mask = GrayImage::new(n, n);
    for (i, (px, m)) in image.pixels_mut().zip(mask.pixels_mut()).enumerate() {
        let (gain, delta, colour, body) = match defect {
            Some(d) => (d.texture_gain[i], d.delta[i], d.colour[i], d.body[i]),
            None => (1.0, 0.0, [0.0; 3], 0.0),
        };
        let grey = surface.shading[i] + surface.texture[i] * gain + surface.grain[i] + delta;
        let mut rgb = [0u8; 3];
        for c in 0..3 {
            rgb[c] = (grey * surface.tint[c] + colour[c]).round().clamp(0.0, 255.0) as u8;
        }
        *px = Rgb(rgb);
        // What the defect adds to each channel (before rounding), largest of the three.
        let visible = (0..3).fold(0.0f32, |a, c| a.max((delta * surface.tint[c] + colour[c]).abs()));
        if visible >= MASK_MIN_DELTA || body >= 0.5 {
            *m = Luma([255]);
        }
    }
    (image, mask)
}

/// A defect-free image: image `index` of the series that `seed` defines (`size` is clamped to
/// `MIN_SIZE..=MAX_SIZE`).
pub fn render_good(seed: u64, index: u64, size: u32) -> RgbImage {
    compose(&render_surface(seed, index, size), None).0
}

/// Image `index` of the series with a defect of `kind` drawn on it, and its mask (255 where the
/// defect changed the image by at least [`MASK_MIN_DELTA`] grey levels or lies inside the
/// defect's body). The surface is the same as `render_good(seed, index, size)`.
pub fn render_defect(seed: u64, index: u64, size: u32, kind: DefectKind) -> (RgbImage, GrayImage) {
    let surface = render_surface(seed, index, size);
    let kind_id = DefectKind::ALL.iter().position(|&k| k == kind).unwrap_or(0) as u64;
    let mut rng = rng_for(seed, index, PURPOSE_DEFECT + 16 * kind_id);
    let mut defect = Defect::new(surface.size * surface.size);
    match kind {
        DefectKind::Scratch => draw_scratch(&mut rng, &surface, &mut defect),
        DefectKind::Dent => draw_dent(&mut rng, &surface, &mut defect),
        DefectKind::Spot => draw_spots(&mut rng, &surface, &mut defect),
        DefectKind::Stain => draw_stain(&mut rng, &surface, &mut defect),
    }
    compose(&surface, Some(&defect))
}

/// Writes an MVTec AD layout data set of PNGs under `root`: `train/good`, `test/good`,
/// `test/<kind>` and `ground_truth/<kind>/<stem>_mask.png` for every [`DefectKind`]. Files are
/// named `000.png`, `001.png`, ...; existing files of the same names are overwritten, others
/// left alone. Every image has its own index in the series, so no two share a surface.
pub fn generate_dataset(root: &Path, cfg: &SyntheticConfig) -> Result<DatasetSummary> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&cfg.size) {
        return Err(Error::Config(format!("synthetic image size {}: use {MIN_SIZE}..={MAX_SIZE}", cfg.size)));
    }
    if cfg.n_train == 0 {
        return Err(Error::Config("synthetic data set needs at least one training image (n_train)".into()));
    }
    let name = |i: usize, suffix: &str| format!("{i:03}{suffix}.png");
    let mut index = 0u64;
    let train_dir = root.join("train").join("good");
    for i in 0..cfg.n_train {
        let img = render_good(cfg.seed, index, cfg.size);
        crate::imaging::save_png(&train_dir.join(name(i, "")), &img)?;
        index += 1;
    }
    let test_good = root.join("test").join("good");
    for i in 0..cfg.n_test_good {
        let img = render_good(cfg.seed, index, cfg.size);
        crate::imaging::save_png(&test_good.join(name(i, "")), &img)?;
        index += 1;
    }
    let mut defect_types = Vec::new();
    if cfg.n_test_per_defect > 0 {
        for kind in DefectKind::ALL {
            let test_dir = root.join("test").join(kind.name());
            let mask_dir = root.join("ground_truth").join(kind.name());
            for i in 0..cfg.n_test_per_defect {
                let (img, mask) = render_defect(cfg.seed, index, cfg.size, kind);
                crate::imaging::save_png(&test_dir.join(name(i, "")), &img)?;
                crate::imaging::save_png(&mask_dir.join(name(i, "_mask")), &mask)?;
                index += 1;
            }
            defect_types.push(kind.name().to_string());
        }
    }
    Ok(DatasetSummary {
        root: root.to_path_buf(),
        size: cfg.size,
        n_train: cfg.n_train,
        n_test_good: cfg.n_test_good,
        n_test_defect: cfg.n_test_per_defect * defect_types.len(),
        defect_types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::MvtecDataset;

    #[test]
    fn deterministic_from_seed() {
        assert_eq!(render_good(3, 5, 64), render_good(3, 5, 64));
        assert_ne!(render_good(3, 5, 64), render_good(4, 5, 64));
        for kind in DefectKind::ALL {
            assert_eq!(render_defect(3, 9, 96, kind), render_defect(3, 9, 96, kind));
        }
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let cfg = SyntheticConfig { seed: 11, size: 64, n_train: 3, n_test_good: 2, n_test_per_defect: 2 };
        generate_dataset(a.path(), &cfg).unwrap();
        generate_dataset(b.path(), &cfg).unwrap();
        let da = MvtecDataset::open(a.path()).unwrap();
        for (pa, pb) in da.train_good.iter().zip(&MvtecDataset::open(b.path()).unwrap().train_good) {
            assert_eq!(std::fs::read(pa).unwrap(), std::fs::read(pb).unwrap());
        }
        for s in &da.test {
            let other = b.path().join(s.path.strip_prefix(a.path()).unwrap());
            assert_eq!(std::fs::read(&s.path).unwrap(), std::fs::read(other).unwrap());
        }
    }

    #[test]
    fn writes_mvtec_layout() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SyntheticConfig { seed: 1, size: 96, n_train: 4, n_test_good: 2, n_test_per_defect: 2 };
        let summary = generate_dataset(dir.path(), &cfg).unwrap();
        assert_eq!(summary.defect_types, vec!["scratch", "dent", "spot", "stain"]);
        assert_eq!((summary.n_train, summary.n_test_good, summary.n_test_defect), (4, 2, 8));
        assert!(dir.path().join("train/good/000.png").is_file());
        assert!(dir.path().join("ground_truth/stain/001_mask.png").is_file());
        let ds = MvtecDataset::open(dir.path()).unwrap();
        assert_eq!(ds.train_good.len(), 4);
        assert_eq!((ds.n_test_good(), ds.n_test_anomalous()), (2, 8));
        for s in ds.test.iter().filter(|s| s.is_anomalous()) {
            let img = crate::imaging::load(&s.path).unwrap();
            assert_eq!(img.dimensions(), (96, 96));
            let mask = crate::dataset::load_mask(s.mask.as_ref().unwrap(), 96, 96).unwrap();
            let on = mask.pixels().filter(|p| p.0[0] == 255).count();
            assert!(on > 3 && on < 96 * 96 / 4, "{}: {on} mask pixels", s.path.display());
        }
        assert!(matches!(generate_dataset(dir.path(), &SyntheticConfig { size: 8, ..cfg.clone() }), Err(Error::Config(_))));
        assert!(matches!(generate_dataset(dir.path(), &SyntheticConfig { n_train: 0, ..cfg }), Err(Error::Config(_))));
    }

    #[test]
    fn good_images_differ() {
        let a = render_good(7, 0, 128);
        let b = render_good(7, 1, 128);
        let mean = |img: &RgbImage| img.pixels().map(|p| p.0[1] as f64).sum::<f64>() / (128.0 * 128.0);
        let diff = a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count();
        assert!(diff > 128 * 128 / 2, "only {diff} pixels differ");
        // A plausible metal grey, not saturated.
        for img in [&a, &b] {
            let m = mean(img);
            assert!((90.0..180.0).contains(&m), "mean {m}");
            assert!(img.pixels().all(|p| p.0[1] > 20 && p.0[1] < 240));
        }
    }

    #[test]
    fn masks_cover_what_was_drawn() {
        for seed in 0..3 {
            for kind in DefectKind::ALL {
                let good = render_good(seed, 4, 128);
                let (bad, mask) = render_defect(seed, 4, 128, kind);
                assert_eq!(mask.dimensions(), bad.dimensions());
                let mut on = 0;
                let mut visible_inside = 0;
                for ((g, b), m) in good.pixels().zip(bad.pixels()).zip(mask.pixels()) {
                    let d = (0..3).map(|c| (g.0[c] as i32 - b.0[c] as i32).abs()).max().unwrap();
                    let inside = m.0[0] == 255;
                    assert!(m.0[0] == 0 || inside);
                    // Outside the mask the defect changed nothing visible.
                    // (MASK_MIN_DELTA less a hair, times the tint, plus rounding.)
                    assert!(inside || d <= 6, "{kind} seed {seed}: change {d} outside the mask");
                    on += inside as u32;
                    visible_inside += (inside && d >= 5) as u32;
                }
                assert!(on >= 6, "{kind} seed {seed}: mask has {on} pixels");
                assert!(visible_inside * 2 >= on, "{kind} seed {seed}: {visible_inside} of {on} visible");
            }
        }
    }

    #[test]
    fn small_and_odd_sizes_work() {
        for size in [0, 1, 33, 77] {
            let img = render_good(1, 1, size);
            assert_eq!(img.width(), size.clamp(MIN_SIZE, MAX_SIZE));
            for kind in DefectKind::ALL {
                let (img, mask) = render_defect(1, 2, size, kind);
                assert_eq!(img.dimensions(), mask.dimensions());
            }
        }
        assert_eq!("Stain".parse::<DefectKind>().unwrap(), DefectKind::Stain);
        assert!(matches!("crack".parse::<DefectKind>(), Err(Error::Config(_))));
    }
}
