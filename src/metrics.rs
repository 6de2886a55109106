//! The metrics that anomaly-detection papers report, with anomalib's definitions:
//!
//! - **image AUROC**: area under the ROC curve of the image scores against the image labels
//!   (good = negative, defective = positive): [`auroc`];
//! - **F1-max**: the best F1 score over all thresholds (anomalib's "F1-adaptive threshold"),
//!   prediction = `score >= threshold`: [`f1_max`];
//! - **pixel AUROC**: the same AUROC over every pixel of every test image, ground-truth mask
//!   pixels positive: [`PixelScores`] + [`pixel_metrics`];
//! - **AUPRO**: area under the per-region-overlap curve (Bergmann et al., "The MVTec Anomaly
//!   Detection Dataset", IJCV 2021) up to a false-positive rate of 0.3 ([`AUPRO_FPR_LIMIT`]),
//!   divided by that limit so that a perfect map scores 1: [`aupro`], [`pixel_metrics`].
//!
//! Everything here is exact, with no threshold grid: the scores are sorted once (O(n log n)),
//! then one sweep walks the distinct scores from the highest down. Tied scores form a single
//! step of a curve (a diagonal segment; the trapezoid rule over tie groups), as in
//! scikit-learn's `roc_auc_score` and torchmetrics' `binary_auroc`, so a constant score gives
//! an AUROC of 0.5, never whatever order the sort happened to leave the ties in.
//!
//! Per-region overlap: every 8-connected component of a ground-truth mask is one region. At a
//! threshold t, the PRO is the mean over all regions (of all images) of the fraction of the
//! region's pixels scoring `>= t`; the FPR is the fraction of all defect-free pixels (of all
//! images, good images included) scoring `>= t`. This is the MVTec AD reference evaluation
//! (`compute_pro` + `trapezoid(.., x_max=0.3)` / 0.3). anomalib's `AUPRO` computes the same
//! curve as the mean of per-region ROC curves (which share their FPR axis) resampled on a
//! common grid, and also divides the area by the FPR limit; without the resampling, this one is
//! exact.
//!
//! Memory: pixel metrics keep one `(f32 score, u32 region)` pair per pixel (8 bytes) and sort
//! it in place; several sorted sets (say, the good images and each defect type) are combined by
//! merging, without copies, so per-type and overall metrics share one sort.
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::ops::AddAssign;

use image::{GrayImage, Luma};
use imageproc::region_labelling::{connected_components, Connectivity};

use crate::error::{Error, Result};

/// The FPR up to which AUPRO integrates, as in the MVTec AD paper and anomalib.
pub const AUPRO_FPR_LIMIT: f64 = 0.3;

/// Area under the ROC curve of `scores` (higher = more anomalous) against `labels`
/// (`true` = anomalous).
///
/// Exact: the probability that a random positive scores higher than a random negative, ties
/// counting one half (the trapezoid over tie groups). Needs equal lengths, at least one sample
/// of each class and no NaN score (infinite scores are fine).
pub fn auroc(scores: &[f32], labels: &[bool]) -> Result<f64> {
    let (sorted, n_pos, n_neg) = sorted_labelled(scores, labels, "AUROC")?;
    let groups = TieGroups::new(sorted.iter().map(|&(s, l)| (s, Counts::of(l))));
    Ok(roc_area(groups.map(|(_, c)| c), n_pos, n_neg))
}

/// The best F1 score over all thresholds, and the threshold that reaches it (prediction:
/// anomalous when `score >= threshold`).
///
/// Every distinct score is tried as the threshold; where several reach the best F1, the
/// highest of them is returned. Same requirements as [`auroc`] (both classes present).
pub fn f1_max(scores: &[f32], labels: &[bool]) -> Result<(f64, f32)> {
    let (sorted, n_pos, _) = sorted_labelled(scores, labels, "F1")?;
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut best = (-1.0f64, f32::INFINITY);
    for (score, c) in TieGroups::new(sorted.iter().map(|&(s, l)| (s, Counts::of(l)))) {
        tp += c.pos;
        fp += c.neg;
        // F1 = 2 TP / (2 TP + FP + FN) and TP + FN = P.
        let f1 = 2.0 * tp as f64 / (tp + fp + n_pos) as f64;
        if f1 > best.0 {
            best = (f1, score);
        }
    }
    Ok(best)
}

/// F1 when everything scored >= `threshold` is called anomalous. Needs at least one anomalous
/// sample (F1 is undefined without); good samples may be absent.
pub fn f1_at(scores: &[f32], labels: &[bool], threshold: f32) -> Result<f64> {
    if scores.len() != labels.len() {
        return Err(Error::Config(format!("F1: {} scores but {} labels", scores.len(), labels.len())));
    }
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 {
        return Err(Error::Config("F1 needs at least one anomalous sample".into()));
    }
    let flagged = scores.iter().filter(|&&s| s >= threshold).count();
    let tp = scores.iter().zip(labels).filter(|&(&s, &l)| l && s >= threshold).count();
    Ok(2.0 * tp as f64 / (flagged + positives) as f64)
}

/// AUPRO of anomaly `maps` against ground-truth `masks` (`true` = defect), integrated up to
/// `fpr_limit` and divided by it (use [`AUPRO_FPR_LIMIT`]).
///
/// Image `i` is `widths[i]` pixels wide, row-major; its map and mask must have the same length,
/// a multiple of the width. Images without defects only add defect-free pixels. At least one
/// image must have a defect, and at least one pixel must be defect-free. For large sets (and
/// for pixel AUROC and AUPRO in one pass) use [`PixelScores`] and [`pixel_metrics`].
pub fn aupro(maps: &[&[f32]], masks: &[&[bool]], widths: &[u32], fpr_limit: f64) -> Result<f64> {
    if maps.len() != masks.len() || maps.len() != widths.len() {
        return Err(Error::Config(format!(
            "AUPRO: {} maps, {} masks and {} widths: need one of each per image",
            maps.len(),
            masks.len(),
            widths.len()
        )));
    }
    let mut pixels = PixelScores::with_capacity(maps.iter().map(|m| m.len()).sum());
    for ((map, mask), &width) in maps.iter().zip(masks).zip(widths) {
        pixels.add_image(map, mask, width)?;
    }
    Ok(pixel_metrics(&[&pixels.into_sorted()], fpr_limit)?.aupro)
}

/// Pixel scores and ground truth of a set of images, collected for [`pixel_metrics`].
///
/// Keeps one `(score, region)` pair per pixel (8 bytes), region 0 meaning defect-free and
/// regions numbered across all images of the set. Collect, then
/// [`into_sorted`](PixelScores::into_sorted).
#[derive(Clone, Debug, Default)]
pub struct PixelScores {
    pixels: Vec<(f32, u32)>,
    /// Pixel count of region `r` at index `r - 1`.
    region_sizes: Vec<u32>,
    n_negative: u64,
}

impl PixelScores {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set with room for `pixels` pixels.
    pub fn with_capacity(pixels: usize) -> Self {
        Self { pixels: Vec::with_capacity(pixels), ..Self::default() }
    }

    /// Adds one image: its anomaly `map` and ground-truth `mask` (`true` = defect), both
    /// row-major and `width` pixels wide. The mask's 8-connected components become regions.
    /// Refuses mismatched sizes and NaN scores (leaving the set unchanged).
    pub fn add_image(&mut self, map: &[f32], mask: &[bool], width: u32) -> Result<()> {
        if map.len() != mask.len() {
            return Err(Error::Config(format!("pixel metrics: anomaly map has {} pixels, mask {}", map.len(), mask.len())));
        }
        if width == 0 || map.len() % width as usize != 0 {
            return Err(Error::Config(format!("pixel metrics: {} pixels do not make rows of width {width}", map.len())));
        }
        if map.iter().any(|s| s.is_nan()) {
            return Err(Error::Config("pixel metrics: the anomaly map holds NaN scores".into()));
        }
        let height = (map.len() / width as usize) as u32;
        let offset = self.region_sizes.len() as u32;
        let labels = if mask.iter().any(|&m| m) {
            // A background border of one pixel: imageproc 0.25's connected_components panics
            // when an image needs as many provisional labels as it has pixels (a 1x1 defect).
            let gray = GrayImage::from_fn(width + 2, height + 2, |x, y| {
                let inside = (1..=width).contains(&x) && (1..=height).contains(&y);
                let defect = inside && mask[(y - 1) as usize * width as usize + (x - 1) as usize];
                Luma([if defect { 255 } else { 0 }])
            });
            let padded = connected_components(&gray, Connectivity::Eight, Luma([0u8]));
            let labels: Vec<u32> =
                (1..=height).flat_map(|y| (1..=width).map(move |x| (x, y))).map(|(x, y)| padded.get_pixel(x, y).0[0]).collect();
            let n = labels.iter().copied().max().unwrap_or(0) as usize;
            self.region_sizes.resize(offset as usize + n, 0);
            for &l in labels.iter().filter(|&&l| l > 0) {
                self.region_sizes[offset as usize + l as usize - 1] += 1;
            }
            Some(labels)
        } else {
            None
        };
        self.pixels.reserve(map.len());
        for (i, &score) in map.iter().enumerate() {
            let region = match &labels {
                Some(l) if l[i] > 0 => offset + l[i],
                _ => {
                    self.n_negative += 1;
                    0
                }
            };
            // -0.0 and 0.0 are the same score; keep the sort from separating them.
            self.pixels.push((if score == 0.0 { 0.0 } else { score }, region));
        }
        Ok(())
    }

    /// Number of pixels collected.
    pub fn len(&self) -> usize {
        self.pixels.len()
    }

    /// Whether no pixel was collected.
    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// Number of defect pixels.
    pub fn n_positive(&self) -> u64 {
        self.pixels.len() as u64 - self.n_negative
    }

    /// Number of defect-free pixels.
    pub fn n_negative(&self) -> u64 {
        self.n_negative
    }

    /// Number of ground-truth regions (8-connected components of the masks).
    pub fn n_regions(&self) -> usize {
        self.region_sizes.len()
    }

    /// Sorts the pixels by descending score (in place, no copy) for [`pixel_metrics`].
    pub fn into_sorted(mut self) -> SortedPixelScores {
        self.pixels.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        SortedPixelScores(self)
    }
}

/// A [`PixelScores`] sorted by descending score: the input of [`pixel_metrics`].
#[derive(Clone, Debug)]
pub struct SortedPixelScores(PixelScores);

impl SortedPixelScores {
    /// The collected set (pixels in descending score order).
    pub fn scores(&self) -> &PixelScores {
        &self.0
    }
}

/// Pixel-level results of [`pixel_metrics`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PixelMetrics {
    /// Pixel AUROC.
    pub auroc: f64,
    /// AUPRO up to the FPR limit, divided by it.
    pub aupro: f64,
    /// Pixels evaluated.
    pub n_pixels: u64,
    /// Defect pixels among them.
    pub n_positive: u64,
    /// Ground-truth regions.
    pub n_regions: u64,
}

/// Pixel AUROC and AUPRO (up to `fpr_limit`, in (0, 1]) over the union of `sets`, in one
/// sweep. The sets are merged on the fly (O(n log k) for k sets), not copied, so one sorted set
/// of good images can serve in every per-defect-type evaluation.
pub fn pixel_metrics(sets: &[&SortedPixelScores], fpr_limit: f64) -> Result<PixelMetrics> {
    if !(fpr_limit > 0.0 && fpr_limit <= 1.0) {
        return Err(Error::Config(format!("AUPRO FPR limit {fpr_limit}: must be in (0, 1]")));
    }
    let n_neg: u64 = sets.iter().map(|s| s.0.n_negative).sum();
    let n_pos: u64 = sets.iter().map(|s| s.0.n_positive()).sum();
    let n_regions: u64 = sets.iter().map(|s| s.0.region_sizes.len() as u64).sum();
    if n_pos == 0 || n_neg == 0 {
        return Err(Error::Config(format!(
            "pixel metrics need defect and defect-free pixels; got {n_pos} defect and {n_neg} defect-free"
        )));
    }
    let steps = merge_desc(sets).map(|(score, set, region)| {
        let step = if region == 0 {
            PixelStep { counts: Counts { pos: 0, neg: 1 }, overlap: 0.0 }
        } else {
            let size = sets[set].0.region_sizes[region as usize - 1];
            PixelStep { counts: Counts { pos: 1, neg: 0 }, overlap: 1.0 / f64::from(size) }
        };
        (score, step)
    });

    let mut roc = RocArea::default();
    let mut pro = ProArea::new(fpr_limit);
    let (mut fp, mut overlap) = (0u64, 0.0f64);
    for (_, step) in TieGroups::new(steps) {
        roc.add(step.counts);
        fp += step.counts.neg;
        overlap += step.overlap;
        pro.to(fp as f64 / n_neg as f64, (overlap / n_regions as f64).min(1.0));
    }
    Ok(PixelMetrics {
        auroc: roc.value(n_pos, n_neg),
        aupro: pro.area / fpr_limit,
        n_pixels: n_pos + n_neg,
        n_positive: n_pos,
        n_regions,
    })
}

// ---------------------------------------------------------------------------------------------

/// (score, label) pairs sorted by descending score, positives, negatives.
type SortedLabelled = (Vec<(f32, bool)>, u64, u64);

/// Checks (scores, labels) and returns them sorted by descending score with the class counts.
fn sorted_labelled(scores: &[f32], labels: &[bool], what: &str) -> Result<SortedLabelled> {
    if scores.len() != labels.len() {
        return Err(Error::Config(format!("{what}: {} scores but {} labels", scores.len(), labels.len())));
    }
    if scores.iter().any(|s| s.is_nan()) {
        return Err(Error::Config(format!("{what}: NaN among the scores")));
    }
    let n_pos = labels.iter().filter(|&&l| l).count() as u64;
    let n_neg = labels.len() as u64 - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return Err(Error::Config(format!("{what} needs both classes; got {n_pos} anomalous and {n_neg} good samples")));
    }
    let mut sorted: Vec<(f32, bool)> = scores.iter().zip(labels).map(|(&s, &l)| (if s == 0.0 { 0.0 } else { s }, l)).collect();
    sorted.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    Ok((sorted, n_pos, n_neg))
}

/// Positive and negative counts of a tie group.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    pos: u64,
    neg: u64,
}

impl Counts {
    fn of(label: bool) -> Self {
        Counts { pos: u64::from(label), neg: u64::from(!label) }
    }
}

impl AddAssign for Counts {
    fn add_assign(&mut self, o: Self) {
        self.pos += o.pos;
        self.neg += o.neg;
    }
}

/// Counts plus the summed region overlap (1 / region size per defect pixel) of a tie group.
#[derive(Clone, Copy, Debug, Default)]
struct PixelStep {
    counts: Counts,
    overlap: f64,
}

impl AddAssign for PixelStep {
    fn add_assign(&mut self, o: Self) {
        self.counts += o.counts;
        self.overlap += o.overlap;
    }
}

/// Folds a descending `(score, weight)` stream into one `(score, summed weight)` per distinct
/// score: one step of a curve per tie group.
struct TieGroups<I: Iterator> {
    inner: std::iter::Peekable<I>,
}

impl<I: Iterator> TieGroups<I> {
    fn new(inner: I) -> Self {
        Self { inner: inner.peekable() }
    }
}

impl<I, W> Iterator for TieGroups<I>
where
    I: Iterator<Item = (f32, W)>,
    W: AddAssign,
{
    type Item = (f32, W);

    fn next(&mut self) -> Option<(f32, W)> {
        let (score, mut weight) = self.inner.next()?;
        while let Some((_, w)) = self.inner.next_if(|(s, _)| *s == score) {
            weight += w;
        }
        Some((score, weight))
    }
}

/// Twice the ROC area in units of one (positive, negative) pair, in exact integers: each tie
/// group with `dp` positives and `dn` negatives adds the trapezoid `dn * (2 tp_before + dp)`.
#[derive(Default)]
struct RocArea {
    tp: u64,
    twice_area: u128,
}

impl RocArea {
    fn add(&mut self, c: Counts) {
        self.twice_area += u128::from(c.neg) * u128::from(2 * self.tp + c.pos);
        self.tp += c.pos;
    }

    fn value(&self, n_pos: u64, n_neg: u64) -> f64 {
        self.twice_area as f64 / (2.0 * n_pos as f64 * n_neg as f64)
    }
}

fn roc_area(groups: impl Iterator<Item = Counts>, n_pos: u64, n_neg: u64) -> f64 {
    let mut roc = RocArea::default();
    groups.for_each(|c| roc.add(c));
    roc.value(n_pos, n_neg)
}

/// Trapezoid area under a curve that starts at (0, 0), from x = 0 to `limit`, the last segment
/// cut at the limit by linear interpolation.
struct ProArea {
    limit: f64,
    x: f64,
    y: f64,
    area: f64,
    done: bool,
}

impl ProArea {
    fn new(limit: f64) -> Self {
        Self { limit, x: 0.0, y: 0.0, area: 0.0, done: false }
    }

    /// Extends the curve to (`x`, `y`); `x` never decreases.
    fn to(&mut self, x: f64, y: f64) {
        if self.done {
            return;
        }
        if x >= self.limit {
            // x > self.x here: self.x < limit <= x.
            let y_at = self.y + (y - self.y) * (self.limit - self.x) / (x - self.x);
            self.area += (self.limit - self.x) * (self.y + y_at) / 2.0;
            self.done = true;
        } else {
            self.area += (x - self.x) * (self.y + y) / 2.0;
        }
        self.x = x;
        self.y = y;
    }
}

/// f32 ordered by `total_cmp` (no NaN reaches here).
#[derive(Clone, Copy, PartialEq)]
struct Key(f32);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// `(score, set index, region)` of every pixel of `sets`, highest score first (k-way merge).
fn merge_desc<'a>(sets: &'a [&'a SortedPixelScores]) -> impl Iterator<Item = (f32, usize, u32)> + 'a {
    let mut next = vec![0usize; sets.len()];
    let mut heap: BinaryHeap<(Key, Reverse<usize>)> =
        sets.iter().enumerate().filter_map(|(i, s)| s.0.pixels.first().map(|p| (Key(p.0), Reverse(i)))).collect();
    std::iter::from_fn(move || {
        let (Key(score), Reverse(i)) = heap.pop()?;
        let pixels = &sets[i].0.pixels;
        let region = pixels[next[i]].1;
        next[i] += 1;
        if let Some(p) = pixels.get(next[i]) {
            heap.push((Key(p.0), Reverse(i)));
        }
        Some((score, i, region))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// O(n^2) reference: P(score_pos > score_neg) + P(=) / 2.
    fn auroc_pairs(scores: &[f32], labels: &[bool]) -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for (s, _) in scores.iter().zip(labels).filter(|p| *p.1) {
            for (t, _) in scores.iter().zip(labels).filter(|p| !*p.1) {
                den += 1.0;
                num += if s > t {
                    1.0
                } else if s == t {
                    0.5
                } else {
                    0.0
                };
            }
        }
        num / den
    }

    #[test]
    fn auroc_hand_cases() {
        let labels = [false, false, true, true];
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &labels).unwrap(), 1.0);
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &labels).unwrap(), 0.0);
        // scikit-learn's documentation example: pairs (0.35 > 0.1), (0.35 < 0.4), (0.8 > both).
        assert_eq!(auroc(&[0.1, 0.4, 0.35, 0.8], &labels).unwrap(), 0.75);
        // All tied: one diagonal step.
        assert_eq!(auroc(&[0.5; 4], &labels).unwrap(), 0.5);
        // Partial tie: pos {0.5, 0.8} vs neg {0.5, 0.2} -> (0.5 + 1 + 1 + 1) / 4.
        assert_eq!(auroc(&[0.5, 0.2, 0.5, 0.8], &labels).unwrap(), 0.875);
        // -0.0 == 0.0, infinities are ordinary scores.
        assert_eq!(auroc(&[0.0, -0.0, -0.0, 0.0], &labels).unwrap(), 0.5);
        assert_eq!(auroc(&[f32::NEG_INFINITY, 1.0, f32::INFINITY, 2.0], &labels).unwrap(), 1.0);
    }

    #[test]
    fn auroc_matches_pairwise_count_with_many_ties() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for n in [2usize, 5, 40, 300] {
            let scores: Vec<f32> = (0..n).map(|_| rng.gen_range(0..8) as f32 / 4.0).collect();
            let mut labels: Vec<bool> = (0..n).map(|_| rng.gen_bool(0.4)).collect();
            labels[0] = true;
            labels[1] = false;
            let fast = auroc(&scores, &labels).unwrap();
            assert!(close(fast, auroc_pairs(&scores, &labels)), "n={n}");
            // Pixel path (one image, mask = labels) and a split into two merged sets agree.
            let mut one = PixelScores::new();
            one.add_image(&scores, &labels, n as u32).unwrap();
            let m = pixel_metrics(&[&one.into_sorted()], 0.3).unwrap();
            assert!(close(m.auroc, fast));
            let k = n / 2;
            let (mut a, mut b) = (PixelScores::new(), PixelScores::new());
            a.add_image(&scores[..k], &labels[..k], 1).unwrap();
            b.add_image(&scores[k..], &labels[k..], 1).unwrap();
            let m2 = pixel_metrics(&[&a.into_sorted(), &b.into_sorted()], 0.3).unwrap();
            assert!(close(m2.auroc, fast));
            assert_eq!((m2.n_pixels, m2.n_positive), (n as u64, labels.iter().filter(|&&l| l).count() as u64));
        }
    }

    #[test]
    fn f1_hand_case() {
        // Thresholds, high to low, with P = 2 (F1 = 2TP / (TP + FP + P)):
        // 0.8: TP 1 FP 0 -> 2/3; 0.4: TP 1 FP 1 -> 1/2; 0.35: TP 2 FP 1 -> 4/5; 0.1: TP 2 FP 2 -> 2/3.
        let (f1, t) = f1_max(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
        assert!(close(f1, 0.8));
        assert_eq!(t, 0.35);
        let (f1, t) = f1_max(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]).unwrap();
        assert_eq!((f1, t), (1.0, 0.8));
        // Tied scores cannot be split: everything at 0.5 is predicted anomalous -> 2*2/(2+2+2).
        let (f1, t) = f1_max(&[0.5; 4], &[false, false, true, true]).unwrap();
        assert!(close(f1, 2.0 / 3.0));
        assert_eq!(t, 0.5);
        // At a given threshold: the same counts as above, and f1_max's threshold gives its F1.
        let (scores, labels) = ([0.1, 0.4, 0.35, 0.8], [false, false, true, true]);
        assert!(close(f1_at(&scores, &labels, 0.35).unwrap(), 0.8));
        assert!(close(f1_at(&scores, &labels, 0.8).unwrap(), 2.0 / 3.0));
        assert!(close(f1_at(&scores, &labels, 0.1).unwrap(), 2.0 / 3.0));
        assert_eq!(f1_at(&scores, &labels, 0.9).unwrap(), 0.0);
        assert!(f1_at(&scores, &[false; 4], 0.5).is_err());
        assert!(f1_at(&scores, &labels[..3], 0.5).is_err());
    }

    // 4x4 mask with two regions (8-connectivity keeps them apart: no shared edge or corner):
    //   A A . .
    //   . . . .
    //   . . . .
    //   . . . B
    // 3 defect pixels, 13 defect-free.
    fn two_regions() -> Vec<bool> {
        let mut m = vec![false; 16];
        m[0] = true;
        m[1] = true;
        m[15] = true;
        m
    }

    fn map_from(mask: &[bool], f: impl Fn(usize, bool) -> f32) -> Vec<f32> {
        mask.iter().enumerate().map(|(i, &m)| f(i, m)).collect()
    }

    #[test]
    fn aupro_hand_cases() {
        let mask = two_regions();
        // Perfect: at threshold 1 both regions are fully covered at FPR 0 -> PRO 1 from the start.
        let perfect = map_from(&mask, |_, m| if m { 1.0 } else { 0.0 });
        assert!(close(aupro(&[&perfect], &[&mask], &[4], 0.3).unwrap(), 1.0));
        // A good image (all zero) adds only negatives: still perfect.
        let good_map = vec![0.0f32; 16];
        let good_mask = vec![false; 16];
        assert!(close(aupro(&[&perfect, &good_map], &[&mask, &good_mask], &[4, 4], 0.3).unwrap(), 1.0));

        // A scores 1, background 0.5, B 0: curve (0,0) -> (0, 0.5) [A] -> (1, 0.5) [13 neg]
        // -> (1, 1) [B]. Mean PRO over FPR 0..0.3 is 0.5.
        let half = map_from(&mask, |i, m| {
            if !m {
                0.5
            } else if i == 15 {
                0.0
            } else {
                1.0
            }
        });
        assert!(close(aupro(&[&half], &[&mask], &[4], 0.3).unwrap(), 0.5));
        // B tied with the background instead: (0, 0.5) -> (1, 1) in one diagonal step;
        // PRO(0.3) = 0.65, area = 0.3 * (0.5 + 0.65) / 2, / 0.3 -> 0.575.
        let tied = map_from(&mask, |i, m| if m && i != 15 { 1.0 } else { 0.0 });
        assert!(close(aupro(&[&tied], &[&mask], &[4], 0.3).unwrap(), 0.575));
        // Reversed map: PRO stays 0 until every negative is taken -> 0.
        let reversed = map_from(&mask, |_, m| if m { 0.0 } else { 1.0 });
        assert!(close(aupro(&[&reversed], &[&mask], &[4], 0.3).unwrap(), 0.0));
    }

    #[test]
    fn aupro_interpolates_at_the_limit() {
        // 4x4, one region = the top-left 2x2 block (4 px), 12 defect-free pixels.
        // Region scores 0.9 0.9 | 0.5 0.2; negatives 0.8 0.7 0.6 0.5, the other 8 at 0.1.
        // Curve: (0, .5) [0.9] (1/12, .5) (2/12, .5) (3/12, .5) [0.8..0.6]
        //        (4/12, .75) [0.5: one pos + one neg, diagonal] (4/12, 1) [0.2] (1, 1) [0.1].
        // To 0.3: 0.25 * 0.5 = 0.125, then 0.25 -> 0.3 on the diagonal, PRO(0.3) = 0.5 + 0.25 * 0.6
        // = 0.65: + 0.05 * (0.5 + 0.65) / 2 = 0.02875 -> 0.15375 / 0.3 = 0.5125.
        // To 1: 0.125 + (1/12) * 0.625 + (2/3) * 1 = 81/96.
        let mut mask = vec![false; 16];
        let mut map = vec![0.1f32; 16];
        for (i, s) in [(0, 0.9), (1, 0.9), (4, 0.5), (5, 0.2)] {
            mask[i] = true;
            map[i] = s;
        }
        for (i, s) in [(2, 0.8), (3, 0.7), (6, 0.6), (7, 0.5)] {
            map[i] = s;
        }
        assert!(close(aupro(&[&map], &[&mask], &[4], 0.3).unwrap(), 0.5125));
        assert!(close(aupro(&[&map], &[&mask], &[4], 1.0).unwrap(), 81.0 / 96.0));
        // The limit exactly on a curve point (3/12 = 0.25): 0.125 / 0.25.
        assert!(close(aupro(&[&map], &[&mask], &[4], 0.25).unwrap(), 0.5));
    }

    #[test]
    fn regions_are_8_connected_and_numbered_across_images() {
        // Diagonal neighbours join; a gap separates.
        //   X . . X
        //   . X . .
        let mask = [true, false, false, true, false, true, false, false];
        let mut p = PixelScores::new();
        p.add_image(&[0.0; 8], &mask, 4).unwrap();
        assert_eq!(p.n_regions(), 2);
        assert_eq!((p.n_positive(), p.n_negative(), p.len()), (3, 5, 8));
        p.add_image(&[0.0; 8], &mask, 2).unwrap();
        // As a 2-wide image: rows [X .] [. X] [. X] [. .] -> one region of 3.
        assert_eq!(p.n_regions(), 3);
        assert_eq!(p.region_sizes, vec![2, 1, 3]);
        p.add_image(&[0.0; 4], &[false; 4], 2).unwrap();
        assert_eq!((p.n_regions(), p.n_negative()), (3, 14));
        // 1x1 and one-row images (imageproc alone panics on a 1x1 defect).
        p.add_image(&[0.5], &[true], 1).unwrap();
        p.add_image(&[0.5, 0.5, 0.5], &[true, false, true], 3).unwrap();
        assert_eq!(p.region_sizes, vec![2, 1, 3, 1, 1, 1]);
        assert_eq!((p.n_positive(), p.n_negative()), (9, 15));
    }

    #[test]
    fn errors_are_config_errors() {
        let is_config = |r: Result<f64>| matches!(r, Err(Error::Config(_)));
        assert!(is_config(auroc(&[0.1, 0.2], &[true, true])));
        assert!(is_config(auroc(&[0.1, 0.2], &[false, false])));
        assert!(is_config(auroc(&[], &[])));
        assert!(is_config(auroc(&[0.1, 0.2], &[true])));
        assert!(is_config(auroc(&[0.1, f32::NAN], &[true, false])));
        assert!(f1_max(&[0.1, 0.2], &[true, true]).is_err());
        assert!(f1_max(&[f32::NAN, 0.2], &[true, false]).is_err());

        let mask = two_regions();
        let map = vec![0.0f32; 16];
        assert!(is_config(aupro(&[&map], &[&mask], &[4], 0.0)));
        assert!(is_config(aupro(&[&map], &[&mask], &[4], 1.5)));
        assert!(is_config(aupro(&[&map], &[&mask], &[4], f64::NAN)));
        assert!(is_config(aupro(&[&map], &[&mask], &[], 0.3)));
        assert!(is_config(aupro(&[&map], &[&mask], &[5], 0.3)));
        assert!(is_config(aupro(&[&map], &[&mask], &[0], 0.3)));
        assert!(is_config(aupro(&[&map[..8]], &[&mask], &[4], 0.3)));
        assert!(is_config(aupro(&[&map], &[&[false; 16][..]], &[4], 0.3)));
        assert!(is_config(aupro(&[&map], &[&[true; 16][..]], &[4], 0.3)));
        let mut nan = map.clone();
        nan[3] = f32::NAN;
        assert!(is_config(aupro(&[&nan], &[&mask], &[4], 0.3)));
        let mut p = PixelScores::new();
        assert!(p.add_image(&nan, &mask, 4).is_err());
        assert!(p.is_empty() && p.n_regions() == 0);
    }
}
