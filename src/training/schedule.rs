//! The seeded schedule of a training run: which samples each optimiser step sees and the
//! generator of its random draws. Both are functions of (seed, step) alone, so a run resumed
//! from a checkpoint at step s continues exactly as the uninterrupted run would.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const PURPOSE_SHUFFLE: u64 = 0x5348_5546;
const PURPOSE_ANOMALY: u64 = 0x414E_4F4D;

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

/// The generator of step `step`'s random draws (simulated anomalies).
pub(crate) fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ PURPOSE_ANOMALY);
    rng.set_stream(step as u64);
    rng
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
}
