//! Greedy k-center selection (Sener & Savarese, "Active Learning for Convolutional Neural
//! Networks: A Core-Set Approach", ICLR 2018), the coreset step of PatchCore (Alg. 1).
//!
//! Each step picks the point farthest from everything picked so far. Done plainly, a step
//! touches all N points (N = 525k patches for Magnetic-Tile at 256 px), so keeping 40k of them
//! costs 40k full passes: over 30 minutes on two CPU cores. The result here is the same
//! selection (the same farthest point each step, up to float rounding), found with the triangle
//! inequality so that most points are never looked at again once their neighbourhood is well
//! covered (Elkan's trick for k-means, applied to k-center):
//!
//! * points are grouped around G anchor points, each group stored contiguously with its radius
//!   and each point's distance to its anchor;
//! * a group is skipped when even its nearest possible member is farther from the new centre
//!   than the group's current largest gap (nothing in it can change);
//! * inside a visited group, a point is skipped when `|d(c, anchor) - d(x, anchor)|` already
//!   exceeds its current distance to the selection.
//!
//! Written by hand because no maintained crate offers k-center selection, and expressing the
//! loop as tensor ops allocates several N-sized tensors per step, which is what made it slow.

/// Points per group aimed at when choosing the number of anchors; a group (~512 x 128 floats)
/// stays in the L2 cache while it is updated.
const POINTS_PER_GROUP: usize = 512;

/// Rows of `[n, dim]` row-major `points` chosen by greedy k-center, in selection order. The
/// selection begins with the distinct rows `first`, in their order: one start row for a fresh
/// selection, or the rows a selection already holds when it goes on over more points (a bank
/// grown with more images). `anchors` are the rows used to group points (any distinct rows;
/// spread-out ones prune best). `on_step(done, total)` is called every few hundred steps.
///
/// Returns `n_select.min(n)` row indices, `first` among them (all of it when `n_select` allows).
pub fn greedy_k_center(
    points: &[f32],
    dim: usize,
    n_select: usize,
    first: &[usize],
    anchors: &[usize],
    on_step: &mut dyn FnMut(usize, usize),
) -> Vec<usize> {
    // Below ~50k points a step takes well under a millisecond and threads cost more than they save.
    let n = points.len() / dim.max(1);
    let threads = if n < 50_000 { 1 } else { std::thread::available_parallelism().map_or(1, |t| t.get()).min(8) };
    select(points, dim, n_select, first, anchors, threads, on_step)
}

/// [`greedy_k_center`] on `threads` threads.
fn select(
    points: &[f32],
    dim: usize,
    n_select: usize,
    first: &[usize],
    anchors: &[usize],
    threads: usize,
    on_step: &mut dyn FnMut(usize, usize),
) -> Vec<usize> {
    assert!(dim > 0 && points.len() % dim == 0, "points must be [n, dim]");
    let n = points.len() / dim;
    let n_select = n_select.min(n);
    if n_select == 0 {
        return Vec::new();
    }
    assert!(!first.is_empty() && first.iter().all(|&r| r < n) && !anchors.is_empty(), "a first row and an anchor needed");
    let groups = Groups::new(points, dim, anchors);

    // Per point (in group order): squared distance to the selection so far.
    let mut min_d2 = vec![f32::INFINITY; n];
    // Per group: largest min_d2 among its members and where it is.
    let mut group_max = vec![f32::INFINITY; groups.len()];
    let mut group_argmax: Vec<usize> = groups.ranges.iter().map(|r| r.start).collect();

    // The groups are split into contiguous blocks of about equal point counts, one per thread;
    // each step updates the blocks in parallel.
    let blocks = groups.blocks(threads);

    let mut selected = Vec::with_capacity(n_select);
    let mut current = 0; // set from `first` at step 0
    let mut centre = vec![0f32; dim];
    for step in 0..n_select {
        if let Some(&row) = first.get(step) {
            current = groups.position_of[row];
        }
        selected.push(groups.original[current]);
        centre.copy_from_slice(groups.row(current));
        if blocks.len() == 1 {
            groups.update(0..groups.len(), &centre, &mut min_d2, &mut group_max, &mut group_argmax);
        } else {
            std::thread::scope(|scope| {
                let (mut d2_rest, mut max_rest, mut arg_rest) = (&mut min_d2[..], &mut group_max[..], &mut group_argmax[..]);
                for block in &blocks {
                    let points_in = groups.ranges[block.end - 1].end - groups.ranges[block.start].start;
                    let (d2, d2_tail) = std::mem::take(&mut d2_rest).split_at_mut(points_in);
                    let (gm, gm_tail) = std::mem::take(&mut max_rest).split_at_mut(block.len());
                    let (ga, ga_tail) = std::mem::take(&mut arg_rest).split_at_mut(block.len());
                    (d2_rest, max_rest, arg_rest) = (d2_tail, gm_tail, ga_tail);
                    let (groups, centre, block) = (&groups, &centre, block.clone());
                    scope.spawn(move || groups.update(block, centre, d2, gm, ga));
                }
            });
        }
        // Farthest point overall = farthest of the groups' farthest points.
        let mut far = (f32::NEG_INFINITY, 0);
        for (g, &m) in group_max.iter().enumerate() {
            if m > far.0 {
                far = (m, group_argmax[g]);
            }
        }
        current = far.1;
        if step % 256 == 255 || step + 1 == n_select {
            on_step(step + 1, n_select);
        }
    }
    selected
}

/// The same selection without pruning: the reference the pruned version is tested against and
/// what the GPU path computes with tensor ops.
#[cfg(test)]
pub fn greedy_k_center_plain(points: &[f32], dim: usize, n_select: usize, first: &[usize]) -> Vec<usize> {
    let n = points.len() / dim;
    let mut min_d2 = vec![f32::INFINITY; n];
    let mut selected = Vec::with_capacity(n_select.min(n));
    let mut current = first[0];
    for step in 0..n_select.min(n) {
        if let Some(&row) = first.get(step) {
            current = row;
        }
        selected.push(current);
        let c = &points[current * dim..(current + 1) * dim];
        let mut far = (f32::NEG_INFINITY, 0);
        for (p, m) in min_d2.iter_mut().enumerate() {
            let d2 = sq_dist(c, &points[p * dim..(p + 1) * dim]);
            if d2 < *m {
                *m = d2;
            }
            if *m > far.0 {
                far = (*m, p);
            }
        }
        current = far.1;
    }
    selected
}

/// A sensible number of anchors for `n` points.
pub fn anchor_count(n: usize) -> usize {
    (n / POINTS_PER_GROUP).clamp(1, 4096)
}

/// `count` distinct rows of `0..n`, drawn with `seed` (the anchors).
pub fn sample_rows(n: usize, count: usize, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rand::seq::index::sample(&mut rng, n, count.min(n)).into_vec()
}

/// Points regrouped by nearest anchor, each group contiguous.
struct Groups {
    dim: usize,
    /// Point rows in group order, `[n, dim]`.
    data: Vec<f32>,
    /// Original row of each point in group order.
    original: Vec<usize>,
    /// Group-order position of each original row.
    position_of: Vec<usize>,
    /// Distance of each point (group order) to its anchor.
    to_anchor: Vec<f32>,
    /// Anchor rows, `[G, dim]`.
    anchors: Vec<f32>,
    /// Largest member distance to the anchor, per group.
    radius: Vec<f32>,
    /// Group-order positions of each group's members.
    ranges: Vec<std::ops::Range<usize>>,
}

impl Groups {
    fn new(points: &[f32], dim: usize, anchor_rows: &[usize]) -> Self {
        let n = points.len() / dim;
        let anchors: Vec<f32> = anchor_rows.iter().flat_map(|&r| points[r * dim..(r + 1) * dim].iter().copied()).collect();
        let n_groups = anchor_rows.len();
        // Nearest anchor of every point: n x G distances, the one O(n G dim) pass of the set-up,
        // split over the cores.
        let nearest_of = |x: &[f32]| {
            let mut best = (0, f32::INFINITY);
            for (g, a) in anchors.chunks_exact(dim).enumerate() {
                let d2 = sq_dist(x, a);
                if d2 < best.1 {
                    best = (g, d2);
                }
            }
            best
        };
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(16);
        let rows_per_thread = n.div_ceil(threads).max(1);
        let nearest: Vec<(usize, f32)> = std::thread::scope(|scope| {
            let handles: Vec<_> = points
                .chunks(rows_per_thread * dim)
                .map(|part| scope.spawn(move || part.chunks_exact(dim).map(nearest_of).collect::<Vec<_>>()))
                .collect();
            // A worker only computes distances; should it panic, the panic goes on here.
            handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        });
        let mut counts = vec![0usize; n_groups];
        for &(g, _) in &nearest {
            counts[g] += 1;
        }
        let mut ranges = Vec::with_capacity(n_groups);
        let mut offset = 0;
        for &c in &counts {
            ranges.push(offset..offset + c);
            offset += c;
        }
        let mut fill: Vec<usize> = ranges.iter().map(|r| r.start).collect();
        let mut original = vec![0; n];
        let mut position_of = vec![0; n];
        let mut to_anchor = vec![0f32; n];
        let mut data = vec![0f32; n * dim];
        let mut radius = vec![0f32; n_groups];
        for (row, &(g, d2)) in nearest.iter().enumerate() {
            let pos = fill[g];
            fill[g] += 1;
            original[pos] = row;
            position_of[row] = pos;
            let d = d2.sqrt();
            to_anchor[pos] = d;
            radius[g] = radius[g].max(d);
            data[pos * dim..(pos + 1) * dim].copy_from_slice(&points[row * dim..(row + 1) * dim]);
        }
        Self { dim, data, original, position_of, to_anchor, anchors, radius, ranges }
    }

    fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Splits the groups into at most `parts` contiguous blocks of about equal point counts.
    fn blocks(&self, parts: usize) -> Vec<std::ops::Range<usize>> {
        let n = self.original.len();
        let mut blocks = Vec::with_capacity(parts);
        let mut start = 0;
        for g in 0..self.len() {
            let filled = self.ranges[g].end;
            if filled * parts >= n * (blocks.len() + 1) || g + 1 == self.len() {
                blocks.push(start..g + 1);
                start = g + 1;
            }
        }
        blocks.retain(|b| !b.is_empty());
        blocks
    }

    /// Takes the new selection `centre` into account for `block` of groups. The slices hold the
    /// block's part of the per-point and per-group state: `min_d2` starts at the block's first
    /// point, `group_max`/`group_argmax` at its first group; positions stored are global.
    fn update(
        &self,
        block: std::ops::Range<usize>,
        centre: &[f32],
        min_d2: &mut [f32],
        group_max: &mut [f32],
        group_argmax: &mut [usize],
    ) {
        let (first_group, first_point) = (block.start, self.ranges[block.start].start);
        for g in block {
            let to_anchor = sq_dist(centre, self.anchor(g)).sqrt();
            let gap = to_anchor - self.radius[g];
            let slot = g - first_group;
            if gap > 0.0 && gap * gap >= group_max[slot] {
                continue; // no member can be closer to the new centre than to the selection
            }
            let mut best = (f32::NEG_INFINITY, self.ranges[g].start);
            for p in self.ranges[g].clone() {
                let m = &mut min_d2[p - first_point];
                let lower = to_anchor - self.to_anchor[p];
                if lower * lower < *m {
                    let d2 = sq_dist(centre, self.row(p));
                    if d2 < *m {
                        *m = d2;
                    }
                }
                if *m > best.0 {
                    best = (*m, p);
                }
            }
            group_max[slot] = best.0;
            group_argmax[slot] = best.1;
        }
    }

    fn row(&self, pos: usize) -> &[f32] {
        &self.data[pos * self.dim..(pos + 1) * self.dim]
    }

    fn anchor(&self, g: usize) -> &[f32] {
        &self.anchors[g * self.dim..(g + 1) * self.dim]
    }
}

/// Squared Euclidean distance. Eight independent accumulators let the compiler vectorise the
/// loop (a single running sum is a serial dependency chain it may not reorder).
#[inline]
pub(crate) fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += (x - y) * (x - y);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Clustered points (like patch features: many near-duplicates, some outliers).
    fn clustered(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..12).map(|_| (0..dim).map(|_| rng.gen_range(-5.0..5.0)).collect()).collect();
        (0..n)
            .flat_map(|_| {
                let c = &centres[rng.gen_range(0..centres.len())];
                let spread = if rng.gen_bool(0.05) { 2.0 } else { 0.3 };
                c.iter().map(|v| v + rng.gen_range(-spread..spread)).collect::<Vec<f32>>()
            })
            .collect()
    }

    #[test]
    fn pruned_selection_equals_the_plain_one() {
        for (n, dim, k, groups) in [(3000, 16, 300, 20), (2000, 37, 1999, 7), (500, 8, 50, 1), (800, 128, 120, 64)] {
            let pts = clustered(n, dim, n as u64);
            let anchors: Vec<usize> = (0..groups).map(|g| g * n / groups).collect();
            let plain = greedy_k_center_plain(&pts, dim, k, &[5]);
            for threads in [1, 2, 3] {
                let pruned = select(&pts, dim, k, &[5], &anchors, threads, &mut |_, _| {});
                assert_eq!(plain, pruned, "n {n} dim {dim} k {k} groups {groups} threads {threads}");
            }
        }
    }

    #[test]
    fn a_selection_goes_on_from_rows_already_chosen() {
        let (n, dim) = (2000, 12);
        let pts = clustered(n, dim, 3);
        let anchors: Vec<usize> = (0..9).map(|g| g * n / 9).collect();
        let whole = select(&pts, dim, 400, &[7], &anchors, 1, &mut |_, _| {});
        // Going on from the selection's own first 150 rows ends where the whole selection does.
        for threads in [1, 2] {
            let resumed = select(&pts, dim, 400, &whole[..150], &anchors, threads, &mut |_, _| {});
            assert_eq!(resumed, whole, "threads {threads}");
        }
        // Rows chosen elsewhere are kept in their order, and the rest is the plain greedy's choice.
        let given = [1999, 3, 1000, 42];
        let resumed = select(&pts, dim, 300, &given, &anchors, 2, &mut |_, _| {});
        assert_eq!(&resumed[..4], &given);
        assert_eq!(resumed, greedy_k_center_plain(&pts, dim, 300, &given));
    }

    #[test]
    fn selection_is_distinct_and_reports_progress() {
        let pts = clustered(1000, 4, 1);
        let mut last = (0, 0);
        let sel = greedy_k_center(&pts, 4, 600, &[0], &[0, 10, 500], &mut |d, t| last = (d, t));
        let mut uniq = sel.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 600);
        assert_eq!(last, (600, 600));
        // Asking for more than there are returns every point once.
        assert_eq!(greedy_k_center(&pts, 4, 5000, &[0], &[3], &mut |_, _| {}).len(), 1000);
    }

    #[test]
    fn squared_distance_matches_the_definition() {
        let a: Vec<f32> = (0..13).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..13).map(|i| (i * i) as f32 * 0.1).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        assert!((sq_dist(&a, &b) - want).abs() < 1e-3 * want);
    }
}
