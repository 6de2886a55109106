//! From a model's per-pixel anomaly scores to what an operator sees: connected defect regions
//! with boxes and scores, a colour heatmap, and the inspected image with both drawn on it.
use std::ops::Range;

use image::{Rgb, RgbImage};
use imageproc::rect::Rect;
use imageproc::region_labelling::{connected_components, Connectivity};

use crate::error::{Error, Result};

/// For each of `out` resized columns (or rows): the two source indices and the weight of the
/// second, pixel centres aligned.
fn bilinear_taps(out: u32, src: u32) -> Vec<(usize, usize, f32)> {
    let scale = f64::from(src) / f64::from(out);
    (0..out)
        .map(|o| {
            let pos = ((f64::from(o) + 0.5) * scale - 0.5).clamp(0.0, f64::from(src - 1));
            let i0 = pos.floor() as usize;
            let i1 = (i0 + 1).min(src as usize - 1);
            (i0, i1, (pos - i0 as f64) as f32)
        })
        .collect()
}

/// Per-pixel anomaly scores of one image, row-major; higher means more anomalous.
///
/// The model produces it at network-input size; [`AnomalyMap::resized`] brings it to the
/// original image's size so that regions are reported in the camera's pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct AnomalyMap {
    width: u32,
    height: u32,
    data: Vec<f32>,
}

impl AnomalyMap {
    /// This map placed at (`x`, `y`) inside a `width` x `height` map of zeros, e.g. the map of
    /// a region-of-interest crop inside the full frame. Errors when it does not fit.
    pub fn placed_in(&self, width: u32, height: u32, x: u32, y: u32) -> Result<AnomalyMap> {
        if u64::from(x) + u64::from(self.width) > u64::from(width) || u64::from(y) + u64::from(self.height) > u64::from(height) {
            return Err(Error::BadImage(format!(
                "a {}x{} map at ({x}, {y}) does not fit in {width}x{height}",
                self.width, self.height
            )));
        }
        let mut data = vec![0.0f32; width as usize * height as usize];
        for (row, src) in self.data.chunks_exact(self.width as usize).enumerate() {
            let start = (y as usize + row) * width as usize + x as usize;
            data[start..start + self.width as usize].copy_from_slice(src);
        }
        AnomalyMap::new(width, height, data)
    }

    /// A map of `width` x `height` scores; `data` must hold exactly that many, and the map must
    /// not be empty (an empty map has no maximum and no size to resize from).
    pub fn new(width: u32, height: u32, data: Vec<f32>) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::BadImage(format!("anomaly map is {width}x{height}: both sides must be at least 1")));
        }
        let expected = u64::from(width) * u64::from(height);
        if data.len() as u64 != expected {
            return Err(Error::BadImage(format!("anomaly map of {width}x{height} needs {expected} scores, got {}", data.len())));
        }
        Ok(Self { width, height, data })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// All scores, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The map's scores, giving back the buffer.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The score at (`x`, `y`); `None` outside the map.
    pub fn get(&self, x: u32, y: u32) -> Option<f32> {
        if x < self.width && y < self.height {
            Some(self.data[y as usize * self.width as usize + x as usize])
        } else {
            None
        }
    }

    /// The highest score (the usual image-level anomaly score). NaN scores are ignored; NaN
    /// only when every score is NaN.
    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::NAN, f32::max)
    }

    /// The map bilinearly resampled to `width` x `height` (pixel centres aligned, as
    /// `torch.nn.functional.interpolate(..., align_corners=False)`). A side of 0 is taken as 1.
    ///
    /// Written here because `image::imageops::resize` clamps float samples to 0..1, and scores
    /// (feature distances) are not bounded by 1.
    pub fn resized(&self, width: u32, height: u32) -> AnomalyMap {
        let (width, height) = (width.max(1), height.max(1));
        self.resized_part(width, height, 0..width, 0..height)
    }

    /// The `cols` x `rows` part of `self.resized(width, height)`, computed alone: the same
    /// numbers without the rest of a large frame. Ranges are clipped to the resized map; `width`
    /// and `height` must be at least 1.
    fn resized_part(&self, width: u32, height: u32, cols: Range<u32>, rows: Range<u32>) -> AnomalyMap {
        let cols = cols.start.min(width)..cols.end.min(width).max(cols.start.min(width));
        let rows = rows.start.min(height)..rows.end.min(height).max(rows.start.min(height));
        let (pw, ph) = (cols.len() as u32, rows.len() as u32);
        let sw = self.width as usize;
        if (width, height) == (self.width, self.height) {
            let data = rows.flat_map(|y| &self.data[y as usize * sw + cols.start as usize..y as usize * sw + cols.end as usize]);
            return AnomalyMap { width: pw, height: ph, data: data.copied().collect() };
        }
        let xs = &bilinear_taps(width, self.width)[cols.start as usize..cols.end as usize];
        let ys = &bilinear_taps(height, self.height)[rows.start as usize..rows.end as usize];
        let mut data = Vec::with_capacity(xs.len() * ys.len());
        for &(y0, y1, ty) in ys {
            let (r0, r1) = (&self.data[y0 * sw..(y0 + 1) * sw], &self.data[y1 * sw..(y1 + 1) * sw]);
            for &(x0, x1, tx) in xs {
                // a + (b - a) * t keeps equal neighbours exactly equal (constant maps stay constant).
                let top = r0[x0] + (r0[x1] - r0[x0]) * tx;
                let bottom = r1[x0] + (r1[x1] - r1[x0]) * tx;
                data.push(top + (bottom - top) * ty);
            }
        }
        AnomalyMap { width: pw, height: ph, data }
    }

    /// The map smoothed with a Gaussian of standard deviation `sigma` pixels (PatchCore smooths
    /// its patch-level map with sigma = 4); a `sigma` that is not positive and finite returns the
    /// map unchanged.
    pub fn blurred(&self, sigma: f32) -> AnomalyMap {
        if !(sigma.is_finite() && sigma > 0.0) {
            return self.clone();
        }
        let Some(buffer) = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(self.width, self.height, self.data.clone())
        else {
            return self.clone();
        };
        let blurred = imageproc::filter::gaussian_blur_f32(&buffer, sigma);
        AnomalyMap { width: self.width, height: self.height, data: blurred.into_raw() }
    }
}

/// One connected region of anomalous pixels; every coordinate is in the map's pixels.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DefectRegion {
    /// Left column of the bounding box.
    pub x: u32,
    /// Top row of the bounding box.
    pub y: u32,
    /// Bounding box width.
    pub width: u32,
    /// Bounding box height.
    pub height: u32,
    /// Number of pixels in the region.
    pub area_px: u32,
    /// Highest score in the region.
    pub peak_score: f32,
    /// Mean score over the region's pixels.
    pub mean_score: f32,
    /// Score-weighted centroid, column (pixel (x, y) counts as the point (x, y)).
    pub centroid_x: f64,
    /// Score-weighted centroid, row.
    pub centroid_y: f64,
}

impl DefectRegion {
    /// The region moved by (`dx`, `dy`) pixels, e.g. from a region-of-interest crop back into
    /// the full frame.
    pub fn offset(&self, dx: u32, dy: u32) -> DefectRegion {
        DefectRegion {
            x: self.x + dx,
            y: self.y + dy,
            centroid_x: self.centroid_x + f64::from(dx),
            centroid_y: self.centroid_y + f64::from(dy),
            ..self.clone()
        }
    }

    /// The region with box and centroid scaled by (`sx`, `sy`), e.g. from map to image pixels.
    /// The box grows outward to whole pixels; the area and scores stay as measured.
    pub fn scaled(&self, sx: f64, sy: f64) -> DefectRegion {
        let x0 = (f64::from(self.x) * sx).floor().max(0.0);
        let y0 = (f64::from(self.y) * sy).floor().max(0.0);
        let x1 = (f64::from(self.x + self.width) * sx).ceil().max(x0 + 1.0);
        let y1 = (f64::from(self.y + self.height) * sy).ceil().max(y0 + 1.0);
        DefectRegion {
            x: x0 as u32,
            y: y0 as u32,
            width: (x1 - x0) as u32,
            height: (y1 - y0) as u32,
            // Pixel centres map as (c + 0.5) * s - 0.5, like the bilinear resize.
            centroid_x: (self.centroid_x + 0.5) * sx - 0.5,
            centroid_y: (self.centroid_y + 0.5) * sy - 0.5,
            ..self.clone()
        }
    }
}

/// Running totals of one connected component.
#[derive(Clone)]
struct Accumulator {
    min_x: u32,
    min_y: u32,
    max_x: u32,
    max_y: u32,
    count: u32,
    peak: f32,
    sum: f64,
    weighted_x: f64,
    weighted_y: f64,
    plain_x: f64,
    plain_y: f64,
}

impl Default for Accumulator {
    fn default() -> Self {
        Self {
            min_x: u32::MAX,
            min_y: u32::MAX,
            max_x: 0,
            max_y: 0,
            count: 0,
            peak: f32::NEG_INFINITY,
            sum: 0.0,
            weighted_x: 0.0,
            weighted_y: 0.0,
            plain_x: 0.0,
            plain_y: 0.0,
        }
    }
}

/// Regions of 8-connected pixels with score >= `threshold`, those smaller than `min_area`
/// pixels dropped, largest first (ties: higher peak, then top-left first). A NaN threshold
/// or NaN scores never count as anomalous.
pub fn find_regions(map: &AnomalyMap, threshold: f32, min_area: u32) -> Vec<DefectRegion> {
    // Most frames on a line show good parts: nothing to label, no labelling pass.
    if !map.data.iter().any(|&v| v >= threshold) {
        return Vec::new();
    }
    // A one-pixel background border around the mask: imageproc 0.25's connected_components
    // panics on a 1x1 foreground image (a 1x1 camera frame must not crash the node).
    let mask = image::GrayImage::from_fn(map.width + 2, map.height + 2, |x, y| {
        let inside = x >= 1 && y >= 1 && x <= map.width && y <= map.height;
        let v = if inside { map.data[(y - 1) as usize * map.width as usize + (x - 1) as usize] } else { f32::NAN };
        image::Luma([if v >= threshold { 255 } else { 0 }])
    });
    let padded = connected_components(&mask, Connectivity::Eight, image::Luma([0u8]));
    let labels = image::imageops::crop_imm(&padded, 1, 1, map.width, map.height).to_image();
    let n_labels = labels.pixels().map(|p| p.0[0]).max().unwrap_or(0) as usize;
    if n_labels == 0 {
        return Vec::new();
    }
    let mut acc = vec![Accumulator::default(); n_labels + 1];
    for (x, y, label) in labels.enumerate_pixels() {
        let label = label.0[0] as usize;
        if label == 0 {
            continue;
        }
        let v = map.data[y as usize * map.width as usize + x as usize];
        let a = &mut acc[label];
        a.min_x = a.min_x.min(x);
        a.min_y = a.min_y.min(y);
        a.max_x = a.max_x.max(x);
        a.max_y = a.max_y.max(y);
        a.count += 1;
        a.peak = a.peak.max(v);
        a.sum += f64::from(v);
        a.weighted_x += f64::from(v) * f64::from(x);
        a.weighted_y += f64::from(v) * f64::from(y);
        a.plain_x += f64::from(x);
        a.plain_y += f64::from(y);
    }
    let mut regions: Vec<DefectRegion> = acc
        .into_iter()
        .filter(|a| a.count > 0 && a.count >= min_area)
        .map(|a| {
            let n = f64::from(a.count);
            // Weighting by score needs positive weights; with a threshold at or below zero the
            // plain centroid is the meaningful one.
            let (cx, cy) = if a.sum > 0.0 && a.peak > 0.0 && a.sum.is_finite() {
                (a.weighted_x / a.sum, a.weighted_y / a.sum)
            } else {
                (a.plain_x / n, a.plain_y / n)
            };
            DefectRegion {
                x: a.min_x,
                y: a.min_y,
                width: a.max_x - a.min_x + 1,
                height: a.max_y - a.min_y + 1,
                area_px: a.count,
                peak_score: a.peak,
                mean_score: (a.sum / n) as f32,
                centroid_x: cx,
                centroid_y: cy,
            }
        })
        .collect();
    regions
        .sort_by(|a, b| b.area_px.cmp(&a.area_px).then(b.peak_score.total_cmp(&a.peak_score)).then((a.y, a.x).cmp(&(b.y, b.x))));
    regions
}

/// [`find_regions`] of `map.resized(width, height)`, with the resize done only where regions
/// can be. A resized score is a weighted mean of (at most) four source scores, so a frame pixel
/// reaches `threshold` only next to a source score that does; the part of the frame around
/// those is resized and labelled, nothing else. The same regions, at a cost that follows the
/// defects instead of the frame (a 5 MP frame's whole map is 20 MB, and most frames show good
/// parts).
pub fn find_regions_resized(map: &AnomalyMap, width: u32, height: u32, threshold: f32, min_area: u32) -> Vec<DefectRegion> {
    let (width, height) = (width.max(1), height.max(1));
    if !threshold.is_finite() {
        return find_regions(&map.resized(width, height), threshold, min_area);
    }
    // The weighted mean is computed in f32: allow it a rounding above its largest source.
    let near = threshold - threshold.abs().max(1.0) * 1e-5;
    let (mut c0, mut c1, mut r0, mut r1) = (usize::MAX, 0, usize::MAX, 0);
    for (i, _) in map.data.iter().enumerate().filter(|(_, &v)| v >= near) {
        let (x, y) = (i % map.width as usize, i / map.width as usize);
        (c0, c1, r0, r1) = (c0.min(x), c1.max(x), r0.min(y), r1.max(y));
    }
    if c0 == usize::MAX {
        return Vec::new();
    }
    // The resized columns (rows) whose two taps touch c0..=c1 (r0..=r1).
    let span = |taps: Vec<(usize, usize, f32)>, lo: usize, hi: usize| -> Range<u32> {
        let start = taps.iter().position(|&(_, i1, _)| i1 >= lo).unwrap_or(taps.len());
        let end = taps.iter().rposition(|&(i0, _, _)| i0 <= hi).map_or(0, |e| e + 1);
        start as u32..end.max(start) as u32
    };
    let (cols, rows) = (span(bilinear_taps(width, map.width), c0, c1), span(bilinear_taps(height, map.height), r0, r1));
    if cols.is_empty() || rows.is_empty() {
        return Vec::new();
    }
    let (dx, dy) = (cols.start, rows.start);
    let part = map.resized_part(width, height, cols, rows);
    find_regions(&part, threshold, min_area).iter().map(|r| r.offset(dx, dy)).collect()
}

/// Position of `v` in `lo..hi` as 0..1 (clamped; NaN and an empty or inverted range count as
/// a step at `lo`).
fn normalised(v: f32, lo: f32, hi: f32) -> f32 {
    if v.is_nan() || lo.is_nan() || v < lo {
        return 0.0;
    }
    if hi.is_nan() || hi <= lo {
        return 1.0;
    }
    ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
}

/// The turbo colour of a 0..1 value.
fn turbo(t: f32) -> Rgb<u8> {
    let c = colorous::TURBO.eval_continuous(f64::from(t));
    Rgb([c.r, c.g, c.b])
}

/// The map as a turbo-coloured image: `lo` (and below, and NaN) near-black blue, rising through
/// blue, green and yellow to dark red at `hi` (and above).
pub fn heatmap(map: &AnomalyMap, lo: f32, hi: f32) -> RgbImage {
    // A 256-entry table: one colour-map evaluation per level instead of per pixel.
    let lut: Vec<Rgb<u8>> = (0..256).map(|i| turbo(i as f32 / 255.0)).collect();
    RgbImage::from_fn(map.width, map.height, |x, y| {
        let t = normalised(map.data[y as usize * map.width as usize + x as usize], lo, hi);
        lut[(t * 255.0).round() as usize]
    })
}

/// Opacity of the heatmap at `hi`: the surface must stay visible beneath it.
const MAX_ALPHA: f32 = 0.65;
/// Opacity where the score reaches the threshold, so that flagged pixels stand out.
const THRESHOLD_ALPHA: f32 = 0.45;
/// Opacity just below the threshold. Scores of a good surface sit well below it and should
/// barely tint the picture, hence the cubic ramp from `lo` up to this value.
const BELOW_THRESHOLD_ALPHA: f32 = 0.3;

/// Heatmap opacity for score `v`.
fn overlay_alpha(v: f32, lo: f32, hi: f32, threshold: f32) -> f32 {
    if v.is_nan() || v < lo {
        0.0
    } else if v >= threshold {
        THRESHOLD_ALPHA + (MAX_ALPHA - THRESHOLD_ALPHA) * normalised(v, threshold, hi)
    } else {
        BELOW_THRESHOLD_ALPHA * normalised(v, lo, threshold).powi(3)
    }
}

/// Region boxes: magenta does not occur in the turbo map, so boxes stay visible over it.
const BOX_COLOUR: Rgb<u8> = Rgb([255, 0, 255]);

/// The image with the heatmap blended over it and the region boxes drawn.
///
/// The heatmap colours scores from `lo` to `hi`. Nothing is blended below `lo`; from there the
/// opacity grows slowly to 0.3 just below `threshold`, so a good surface stays clear, then jumps
/// to 0.45 at `threshold` (the flagged area shows its outline) and grows to 0.65 at `hi`. A map of
/// another size than the image is resized to it first, and `regions` (in the map's pixels) are
/// scaled the same way; boxes are two pixels thick.
pub fn overlay(image: &RgbImage, map: &AnomalyMap, lo: f32, hi: f32, threshold: f32, regions: &[DefectRegion]) -> RgbImage {
    let (w, h) = image.dimensions();
    let mut out = image.clone();
    if w == 0 || h == 0 {
        return out;
    }
    // Regions are in the given map's pixels; scale them with it.
    let (sx, sy) = (f64::from(w) / f64::from(map.width), f64::from(h) / f64::from(map.height));
    let resized;
    let map = if (map.width, map.height) == (w, h) {
        map
    } else {
        resized = map.resized(w, h);
        &resized
    };
    let lut: Vec<Rgb<u8>> = (0..256).map(|i| turbo(i as f32 / 255.0)).collect();
    for (x, y, px) in out.enumerate_pixels_mut() {
        let v = map.data[y as usize * w as usize + x as usize];
        let alpha = overlay_alpha(v, lo, hi, threshold);
        if alpha <= 0.0 {
            continue;
        }
        let c = lut[(normalised(v, lo, hi) * 255.0).round() as usize];
        for k in 0..3 {
            px.0[k] = (f32::from(px.0[k]) * (1.0 - alpha) + f32::from(c.0[k]) * alpha).round() as u8;
        }
    }
    for region in regions {
        let r = if (sx, sy) == (1.0, 1.0) { region.clone() } else { region.scaled(sx, sy) };
        // Clip to the image: a region from another map could lie partly outside.
        if r.x >= w || r.y >= h || r.width == 0 || r.height == 0 {
            continue;
        }
        let bw = r.width.min(w - r.x);
        let bh = r.height.min(h - r.y);
        let outer = Rect::at(r.x as i32, r.y as i32).of_size(bw, bh);
        imageproc::drawing::draw_hollow_rect_mut(&mut out, outer, BOX_COLOUR);
        if bw > 2 && bh > 2 {
            let inner = Rect::at(r.x as i32 + 1, r.y as i32 + 1).of_size(bw - 2, bh - 2);
            imageproc::drawing::draw_hollow_rect_mut(&mut out, inner, BOX_COLOUR);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::Strategy;

    /// 10x8 map with two blobs: a 2x2 square and a 3-pixel diagonal (8-connected only).
    fn two_blobs() -> AnomalyMap {
        let mut data = vec![0.0f32; 80];
        let mut set = |x: usize, y: usize, v: f32| data[y * 10 + x] = v;
        set(1, 1, 0.6);
        set(2, 1, 0.8);
        set(1, 2, 0.6);
        set(2, 2, 1.0);
        set(6, 4, 0.5);
        set(7, 5, 0.5);
        set(8, 6, 0.9);
        set(5, 0, 0.49);
        AnomalyMap::new(10, 8, data).unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn map_basics() {
        assert!(matches!(AnomalyMap::new(3, 2, vec![0.0; 5]), Err(Error::BadImage(_))));
        assert!(matches!(AnomalyMap::new(0, 2, vec![]), Err(Error::BadImage(_))));
        let m = AnomalyMap::new(3, 2, vec![0.0, 1.0, f32::NAN, 3.0, 0.5, -1.0]).unwrap();
        assert_eq!((m.width(), m.height(), m.data().len()), (3, 2, 6));
        assert_eq!(m.get(0, 1), Some(3.0));
        assert_eq!(m.get(3, 0), None);
        assert_eq!(m.get(0, 2), None);
        assert_eq!(m.max(), 3.0);
        assert!(AnomalyMap::new(1, 1, vec![f32::NAN]).unwrap().max().is_nan());
    }

    #[test]
    fn two_blobs_two_regions() {
        let regions = find_regions(&two_blobs(), 0.5, 1);
        assert_eq!(regions.len(), 2, "{regions:?}");
        let a = &regions[0];
        assert_eq!((a.x, a.y, a.width, a.height, a.area_px), (1, 1, 2, 2, 4));
        assert_eq!(a.peak_score, 1.0);
        assert!(close(a.mean_score as f64, 0.75));
        assert!(close(a.centroid_x, 4.8 / 3.0), "{}", a.centroid_x);
        assert!(close(a.centroid_y, 4.6 / 3.0), "{}", a.centroid_y);
        let b = &regions[1];
        assert_eq!((b.x, b.y, b.width, b.height, b.area_px), (6, 4, 3, 3, 3));
        assert!(close(b.peak_score as f64, 0.9));
        assert!(close(b.mean_score as f64, 1.9 / 3.0));
        assert!(close(b.centroid_x, 13.7 / 1.9));
        assert!(close(b.centroid_y, 9.9 / 1.9));
        // Serialisable for the ROS/JSON output.
        let json = serde_json::to_string(a).unwrap();
        let back: DefectRegion = serde_json::from_str(&json).unwrap();
        assert_eq!((back.x, back.area_px, back.peak_score), (a.x, a.area_px, a.peak_score));
        assert!(close(back.centroid_x, a.centroid_x));
    }

    #[test]
    fn min_area_and_threshold_filter() {
        let map = two_blobs();
        let regions = find_regions(&map, 0.5, 4);
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].area_px, 4);
        assert!(find_regions(&map, 0.5, 5).is_empty());
        assert!(find_regions(&map, 1.5, 0).is_empty());
        assert!(find_regions(&map, f32::NAN, 0).is_empty());
        // The 0.49 pixel joins nothing at 0.5 but forms its own region at 0.4.
        assert_eq!(find_regions(&map, 0.4, 1).len(), 3);
        // Everything at threshold 0: one region covering the map, plain centroid where weights vanish.
        let zero = AnomalyMap::new(4, 3, vec![0.0; 12]).unwrap();
        let r = find_regions(&zero, 0.0, 1);
        assert_eq!((r.len(), r[0].area_px, r[0].width, r[0].height), (1, 12, 4, 3));
        assert!(close(r[0].centroid_x, 1.5) && close(r[0].centroid_y, 1.0));
    }

    #[test]
    fn regions_of_the_resized_part_are_those_of_the_whole_resized_map() {
        // Upscaled (a camera frame), downscaled, equal, stretched one way: regions and the numbers
        // inside them must not change when only the part around the hot scores is resized.
        let blobs = two_blobs();
        for (w, h) in [(10, 8), (97, 61), (5, 4), (10, 33), (1, 1), (640, 480)] {
            for t in [0.5, 0.45, 0.7, 0.0, -1.0, 2.0] {
                let whole = find_regions(&blobs.resized(w, h), t, 1);
                let part = find_regions_resized(&blobs, w, h, t, 1);
                assert_eq!(part.len(), whole.len(), "{w}x{h} t {t}");
                for (p, q) in part.iter().zip(&whole) {
                    assert_eq!(
                        (p.x, p.y, p.width, p.height, p.area_px),
                        (q.x, q.y, q.width, q.height, q.area_px),
                        "{w}x{h} t {t}"
                    );
                    assert_eq!((p.peak_score, p.mean_score), (q.peak_score, q.mean_score));
                    assert!(close(p.centroid_x, q.centroid_x) && close(p.centroid_y, q.centroid_y));
                }
            }
        }
        let part = blobs.resized_part(97, 61, 10..40, 5..9);
        let whole = blobs.resized(97, 61);
        assert_eq!((part.width(), part.height()), (30, 4));
        assert_eq!(part.get(3, 2), whole.get(13, 7));
        assert!(find_regions_resized(&blobs, 640, 480, f32::NAN, 0).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn regions_of_the_resized_part_match_on_random_maps(
            (w, h, data) in (1u32..12, 1u32..12).prop_flat_map(|(w, h)| {
                (proptest::strategy::Just(w), proptest::strategy::Just(h),
                 proptest::collection::vec(proptest::prop_oneof![3 => 0.0f32..1.0, 1 => proptest::strategy::Just(0.5f32)], (w * h) as usize))
            }),
            out_w in 1u32..90, out_h in 1u32..90, t in 0.3f32..0.8,
        ) {
            let map = AnomalyMap::new(w, h, data).unwrap();
            let whole = find_regions(&map.resized(out_w, out_h), t, 1);
            let part = find_regions_resized(&map, out_w, out_h, t, 1);
            proptest::prop_assert_eq!(part.len(), whole.len());
            for (p, q) in part.iter().zip(&whole) {
                proptest::prop_assert_eq!((p.x, p.y, p.width, p.height, p.area_px), (q.x, q.y, q.width, q.height, q.area_px));
                proptest::prop_assert_eq!(p.peak_score, q.peak_score);
            }
        }
    }

    #[test]
    fn resize_is_bilinear_and_keeps_constants() {
        let c = AnomalyMap::new(7, 5, vec![2.5; 35]).unwrap();
        for (w, h) in [(23, 11), (3, 2), (1, 1), (7, 5), (224, 224)] {
            let r = c.resized(w, h);
            assert_eq!((r.width(), r.height()), (w, h));
            assert!(r.data().iter().all(|&v| v == 2.5), "{w}x{h}");
        }
        let ramp = AnomalyMap::new(2, 1, vec![0.0, 1.0]).unwrap().resized(4, 1);
        assert_eq!(ramp.data(), &[0.0, 0.25, 0.75, 1.0]);
        assert_eq!(c.resized(0, 0).data().len(), 1);
        // Scores above 1 survive (image's resize would clamp them).
        let big = AnomalyMap::new(2, 2, vec![5.0, 7.0, 9.0, 11.0]).unwrap().resized(8, 8);
        assert_eq!(big.max(), 11.0);
    }

    #[test]
    fn blur_spreads_but_keeps_level() {
        let c = AnomalyMap::new(16, 16, vec![3.0; 256]).unwrap().blurred(2.0);
        assert!(c.data().iter().all(|&v| (v - 3.0).abs() < 1e-4));
        let mut data = vec![0.0; 256];
        data[8 * 16 + 8] = 10.0;
        let spike = AnomalyMap::new(16, 16, data).unwrap();
        let b = spike.blurred(1.5);
        assert!(b.max() < 10.0 && b.get(9, 8).unwrap() > 0.0);
        assert_eq!(spike.blurred(0.0), spike);
        assert_eq!(spike.blurred(f32::NAN), spike);
    }

    #[test]
    fn heatmap_uses_turbo_ends() {
        let map = AnomalyMap::new(5, 1, vec![0.0, 1.0, -3.0, 9.0, f32::NAN]).unwrap();
        let img = heatmap(&map, 0.0, 1.0);
        let lo = img.get_pixel(0, 0).0;
        let hi = img.get_pixel(1, 0).0;
        assert_ne!(lo, hi);
        // colorous' turbo (d3's polynomial fit) starts near black with a blue cast, (34, 23, 27),
        // turns blue at once, and ends dark red, (144, 12, 0).
        assert!(lo.iter().all(|&v| v < 60), "{lo:?}");
        let low_blue = heatmap(&AnomalyMap::new(1, 1, vec![0.08]).unwrap(), 0.0, 1.0).get_pixel(0, 0).0;
        assert!(low_blue[2] > low_blue[0] + 60 && low_blue[2] > low_blue[1] + 30, "{low_blue:?}");
        assert!(hi[0] > 100 && hi[1] < 30 && hi[2] < 30, "{hi:?}");
        assert_eq!(img.get_pixel(2, 0).0, lo, "below lo clamps");
        assert_eq!(img.get_pixel(3, 0).0, hi, "above hi clamps");
        assert_eq!(img.get_pixel(4, 0).0, lo, "NaN is lo");
        // A middle value is neither end (turbo is green-yellow in the middle).
        let mid = heatmap(&AnomalyMap::new(1, 1, vec![0.5]).unwrap(), 0.0, 1.0).get_pixel(0, 0).0;
        assert!(mid[1] > 150, "{mid:?}");
    }

    #[test]
    fn overlay_blends_and_draws_boxes() {
        let image = RgbImage::from_pixel(10, 8, Rgb([100, 100, 100]));
        let map = two_blobs();
        let regions = find_regions(&map, 0.5, 1);
        let out = overlay(&image, &map, 0.3, 1.0, 0.5, &regions);
        assert_eq!(out.dimensions(), (10, 8));
        // Below lo: untouched; box corners: magenta.
        assert_eq!(out.get_pixel(0, 7).0, [100, 100, 100]);
        assert_eq!(out.get_pixel(1, 1).0, BOX_COLOUR.0);
        assert_eq!(out.get_pixel(8, 6).0, BOX_COLOUR.0);
        // The 0.49 pixel is above lo: blended, not boxed.
        assert_ne!(out.get_pixel(5, 0).0, [100, 100, 100]);
        assert_ne!(out.get_pixel(5, 0).0, BOX_COLOUR.0);

        // A map at half the image size is resized, and its regions scaled with it.
        let big = RgbImage::from_pixel(20, 16, Rgb([100, 100, 100]));
        let out = overlay(&big, &map, 0.3, 1.0, 0.5, &regions);
        assert_eq!(out.dimensions(), (20, 16));
        assert_eq!(out.get_pixel(2, 2).0, BOX_COLOUR.0);
        assert_eq!(out.get_pixel(5, 5).0, BOX_COLOUR.0);
        assert_eq!(out.get_pixel(19, 0).0, [100, 100, 100]);
        let s = regions[0].scaled(2.0, 2.0);
        // Opacity: none below lo, faint well below the threshold, a step at it, most at hi.
        assert_eq!(overlay_alpha(0.1, 0.2, 1.0, 0.5), 0.0);
        assert!(overlay_alpha(0.3, 0.2, 1.0, 0.5) < 0.02);
        assert!(overlay_alpha(0.49, 0.2, 1.0, 0.5) < BELOW_THRESHOLD_ALPHA);
        assert_eq!(overlay_alpha(0.5, 0.2, 1.0, 0.5), THRESHOLD_ALPHA);
        assert_eq!(overlay_alpha(2.0, 0.2, 1.0, 0.5), MAX_ALPHA);
        assert_eq!(overlay_alpha(f32::NAN, 0.2, 1.0, 0.5), 0.0);
        assert_eq!((s.x, s.y, s.width, s.height), (2, 2, 4, 4));
    }

    #[test]
    fn tiny_maps_do_not_panic() {
        let one = AnomalyMap::new(1, 1, vec![1.0]).unwrap();
        let r = find_regions(&one, 0.5, 1);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].x, r[0].y, r[0].width, r[0].height, r[0].area_px), (0, 0, 1, 1, 1));
        let row = AnomalyMap::new(3, 1, vec![1.0, 0.0, 1.0]).unwrap();
        assert_eq!(find_regions(&row, 0.5, 1).len(), 2);
    }

    #[test]
    fn placed_map_and_offset_region_land_in_the_full_frame() {
        let small = AnomalyMap::new(2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let big = small.placed_in(5, 4, 3, 1).unwrap();
        assert_eq!(big.get(3, 1), Some(1.0));
        assert_eq!(big.get(4, 2), Some(4.0));
        assert_eq!(big.get(0, 0), Some(0.0));
        assert_eq!(big.data().iter().sum::<f32>(), 10.0);
        assert!(small.placed_in(5, 4, 4, 1).is_err());
        let regions = find_regions(&big, 2.5, 1);
        let r = regions[0].clone();
        let moved = r.offset(10, 20);
        assert_eq!((moved.x, moved.y, moved.width), (r.x + 10, r.y + 20, r.width));
        assert_eq!(moved.centroid_x, r.centroid_x + 10.0);
    }
}
