//! The seeded schedule of a training run: which samples each optimiser step sees and the
//! generator of its random draws. Both are functions of (seed, step) alone, so a run resumed
//! from a checkpoint at step s continues exactly as the uninterrupted run would.
use rand::seq::SliceRandom;
use rand::Rng as _;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const PURPOSE_SHUFFLE: u64 = 0x5348_5546;
const PURPOSE_ANOMALY: u64 = 0x414E_4F4D;
const PURPOSE_DEFECTS: u64 = 0x4445_4645;
const PURPOSE_LIGHT: u64 = 0x4C49_4748;

/// The seeded order of the training samples in `epoch`.
fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ PURPOSE_SHUFFLE);
    rng.set_stream(epoch as u64);
    let mut order: Vec<i64> = (0..n as i64).collect();
    order.shuffle(&mut rng);
    order
}

/// Indices of the samples of step `step`: batches of `batch` run through seeded per-epoch
/// shuffles of the `n` samples. `cache` keeps the current epoch's order between calls.
pub(crate) fn batch_indices(seed: u64, step: usize, batch: usize, n: usize, cache: &mut Option<(usize, Vec<i64>)>) -> Vec<i64> {
    (0..batch)
        .map(|i| {
            let g = step * batch + i;
            let (epoch, pos) = (g / n, g % n);
            let (_, order) = match cache.take() {
                Some(same) if same.0 == epoch => cache.insert(same),
                _ => cache.insert((epoch, epoch_order(seed, epoch, n))),
            };
            order[pos]
        })
        .collect()
}

/// The order of a run whose samples are `n_good` good images (indices `0..n_good`) followed by
/// `n_defective` labelled defects: with `defect_share` > 0 and defects present, each batch takes
/// that share of its slots from the defects (each through its own seeded shuffles, cycled) and
/// the rest from the good images, so a few defects among many good images are in every step; an
/// epoch is one pass over the good images. Otherwise one shuffle over all samples, as
/// [`batch_indices`].
pub(crate) struct SampleOrder {
    seed: u64,
    good_slots: usize,
    defect_slots: usize,
    n_good: usize,
    n_defective: usize,
    good_cache: Option<(usize, Vec<i64>)>,
    defect_cache: Option<(usize, Vec<i64>)>,
}

impl SampleOrder {
    /// The order for batches of `batch` (at least 1).
    pub(crate) fn new(seed: u64, batch: usize, n_good: usize, n_defective: usize, defect_share: f64) -> Self {
        let batch = batch.max(1);
        let wanted = (batch as f64 * defect_share).round() as usize;
        let defect_slots =
            if n_defective > 0 && n_good > 0 && defect_share > 0.0 && batch > 1 { wanted.clamp(1, batch - 1) } else { 0 };
        let (good_slots, n_good, n_defective) =
            if defect_slots == 0 { (batch, n_good + n_defective, 0) } else { (batch - defect_slots, n_good, n_defective) };
        Self { seed, good_slots, defect_slots, n_good, n_defective, good_cache: None, defect_cache: None }
    }

    /// Optimiser steps per epoch.
    pub(crate) fn steps_per_epoch(&self) -> usize {
        self.n_good.div_ceil(self.good_slots)
    }

    /// Sample indices of `step`.
    pub(crate) fn indices(&mut self, step: usize) -> Vec<i64> {
        let mut idx = batch_indices(self.seed, step, self.good_slots, self.n_good, &mut self.good_cache);
        if self.defect_slots > 0 {
            let seed = self.seed ^ PURPOSE_DEFECTS;
            let defects = batch_indices(seed, step, self.defect_slots, self.n_defective, &mut self.defect_cache);
            idx.extend(defects.into_iter().map(|i| i + self.n_good as i64));
        }
        idx
    }
}

/// The generator of step `step`'s random draws (simulated anomalies).
pub(crate) fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ PURPOSE_ANOMALY);
    rng.set_stream(step as u64);
    rng
}

/// Brightness gains for `n` images, each drawn uniformly from `1 ± jitter`, a function of
/// (seed, stream) alone: one per image of a step (DRAEM, stream = step) or of the feature cache
/// (SuperSimpleNet). All 1 when `jitter` is 0.
pub(crate) fn brightness_gains(seed: u64, stream: u64, n: usize, jitter: f64) -> Vec<f32> {
    if jitter <= 0.0 {
        return vec![1.0; n];
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ PURPOSE_LIGHT);
    rng.set_stream(stream);
    (0..n).map(|_| (1.0 + rng.gen_range(-jitter..=jitter)) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_order_covers_each_epoch_once() {
        let mut cache = None;
        let n = 7;
        let all: Vec<i64> = (0..7).flat_map(|s| batch_indices(3, s, 2, n, &mut cache)).collect();
        // 14 samples = 2 epochs, each a permutation of 0..7
        for epoch in all.chunks(7) {
            let mut e = epoch.to_vec();
            e.sort();
            assert_eq!(e, (0..7).collect::<Vec<_>>());
        }
        assert_ne!(&all[..7], &all[7..], "epochs should be shuffled differently");
        let mut fresh = None;
        assert_eq!(batch_indices(3, 5, 2, n, &mut fresh), all[10..12].to_vec());
    }

    #[test]
    fn brightness_gains_stay_in_range_and_repeat_per_stream() {
        let g = brightness_gains(4, 7, 200, 0.1);
        assert!(g.iter().all(|&x| (0.9..=1.1).contains(&x)), "{g:?}");
        assert!(g.iter().any(|&x| x < 0.95) && g.iter().any(|&x| x > 1.05), "not spread: {g:?}");
        assert_eq!(brightness_gains(4, 7, 200, 0.1), g);
        assert_ne!(brightness_gains(4, 8, 200, 0.1), g);
        assert_eq!(brightness_gains(4, 7, 3, 0.0), vec![1.0; 3]);
    }

    #[test]
    fn labelled_defects_take_their_share_of_every_batch() {
        // 10 good, 3 defects, batches of 8 with a quarter for defects: 6 good + 2 defects.
        let mut order = SampleOrder::new(1, 8, 10, 3, 0.25);
        assert_eq!(order.steps_per_epoch(), 2);
        let steps: Vec<Vec<i64>> = (0..6).map(|s| order.indices(s)).collect();
        for idx in &steps {
            assert_eq!(idx.len(), 8);
            assert!(idx[..6].iter().all(|&i| i < 10) && idx[6..].iter().all(|&i| (10..13).contains(&i)), "{idx:?}");
        }
        // The defects cycle through their own shuffles: 6 steps x 2 slots = 4 passes over 3.
        let seen: Vec<i64> = steps.iter().flat_map(|s| s[6..].to_vec()).collect();
        for pass in seen.chunks(3).take(4) {
            let mut p = pass.to_vec();
            p.sort();
            assert_eq!(p, vec![10, 11, 12]);
        }
        // Deterministic, and a fresh order gives any step the same samples (resumable).
        assert_eq!(SampleOrder::new(1, 8, 10, 3, 0.25).indices(4), steps[4]);
        // No defects, no share, or batch 1: one shuffle over all samples, as batch_indices.
        let mut cache = None;
        assert_eq!(SampleOrder::new(1, 4, 10, 3, 0.0).indices(2), batch_indices(1, 2, 4, 13, &mut cache));
        assert_eq!(SampleOrder::new(1, 4, 10, 0, 0.5).steps_per_epoch(), 3);
        assert_eq!(SampleOrder::new(1, 1, 10, 3, 0.5).indices(0).len(), 1);
    }
}
