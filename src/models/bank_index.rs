//! Approximate nearest-neighbour search over a PatchCore memory bank with an inverted file
//! (IVF; Jégou, Douze, Schmid, "Product Quantization for Nearest Neighbor Search", TPAMI 2011,
//! the coarse quantizer of Sec. IV): the bank is split into cells by k-means, and a query is
//! compared only with the members of the `probes` cells whose centres are nearest to it.
//!
//! The exact search costs `queries x bank rows x dim` and grows with the bank; with ~sqrt(M)
//! cells and a few probes this touches a few percent of the rows, trading a little accuracy (a
//! query's true nearest row may sit in a cell that was not probed: the distance found is then
//! a little too large) for a lot of speed on large banks. Written by hand because no
//! maintained pure-Rust crate offers an IVF, and faiss would add a C++ build to the project.
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::models::coreset::{sample_rows, sq_dist};

/// Lloyd iterations of the k-means that places the cells.
const KMEANS_ITERATIONS: usize = 10;

/// The bank's rows grouped into k-means cells, for approximate 1-NN search on the CPU.
#[derive(Debug)]
pub struct BankIndex {
    dim: usize,
    /// Cell centres, `[cells, dim]` row-major.
    centroids: Vec<f32>,
    /// Bank rows grouped by cell, `[M, dim]` row-major.
    rows: Vec<f32>,
    /// Bank row index of each grouped row.
    ids: Vec<i64>,
    /// Cell `c` holds grouped rows `offsets[c]..offsets[c + 1]`.
    offsets: Vec<usize>,
    probes: usize,
}

impl BankIndex {
    /// Builds the index of `bank` `[M, D]` with about sqrt(M) cells, searched with `probes` cells
    /// per query (more probes: closer to exact, slower). Deterministic for a `seed`.
    pub fn new(bank: &Tensor, probes: usize, seed: u64) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let size = bank.size();
        if size.len() != 2 || size[0] < 1 || probes < 1 {
            return Err(Error::Config(format!("bank index needs an [M, D] bank and probes >= 1, got {size:?}, {probes}")));
        }
        let (m, dim) = (size[0] as usize, size[1] as usize);
        let bank = bank.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
        let cells = ((m as f64).sqrt().round() as usize).clamp(1, m);
        let start = sample_rows(m, cells, seed).into_iter().map(|i| i as i64).collect::<Vec<_>>();
        let mut centroids = bank.f_index_select(0, &Tensor::f_from_slice(&start)?)?;
        let bank_sq = bank.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(1, true, Kind::Float)?;
        let mut assignment = Tensor::f_zeros([m as i64], (Kind::Int64, Device::Cpu))?;
        for _ in 0..KMEANS_ITERATIONS {
            // Nearest centre of every row (|x|^2 - 2 x.c + |c|^2), then the cells' means; a cell
            // that lost all its rows keeps its old centre.
            let c_sq = centroids.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(1, false, Kind::Float)?;
            let d2 = bank_sq.f_sub(&bank.f_matmul(&centroids.f_tr()?)?.f_mul_scalar(2.0)?)?.f_add(&c_sq)?;
            assignment = d2.f_argmin(1, false)?;
            let sums =
                Tensor::f_zeros([cells as i64, dim as i64], (Kind::Float, Device::Cpu))?.f_index_add(0, &assignment, &bank)?;
            let counts = Tensor::f_zeros([cells as i64], (Kind::Float, Device::Cpu))?.f_index_add(
                0,
                &assignment,
                &Tensor::f_ones([m as i64], (Kind::Float, Device::Cpu))?,
            )?;
            let filled = counts.f_gt(0.0)?.f_unsqueeze(1)?;
            let means = sums.f_div(&counts.f_clamp_min(1.0)?.f_unsqueeze(1)?)?;
            centroids = means.f_where_self(&filled, &centroids)?;
        }
        let cell_of = Vec::<i64>::try_from(&assignment)?;
        let flat = Vec::<f32>::try_from(bank.f_view([-1])?)?;
        let mut counts = vec![0usize; cells];
        for &c in &cell_of {
            counts[c as usize] += 1;
        }
        let mut offsets = Vec::with_capacity(cells + 1);
        let mut end = 0;
        offsets.push(end);
        for c in &counts {
            end += c;
            offsets.push(end);
        }
        let mut fill = offsets.clone();
        let mut rows = vec![0f32; m * dim];
        let mut ids = vec![0i64; m];
        for (row, &c) in cell_of.iter().enumerate() {
            let pos = fill[c as usize];
            fill[c as usize] += 1;
            rows[pos * dim..(pos + 1) * dim].copy_from_slice(&flat[row * dim..(row + 1) * dim]);
            ids[pos] = row as i64;
        }
        let centroids = Vec::<f32>::try_from(centroids.f_contiguous()?.f_view([-1])?)?;
        Ok(Self { dim, centroids, rows, ids, offsets, probes: probes.min(cells) })
    }

    /// Number of cells.
    pub fn cells(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Approximate nearest bank row of each query `[Q, D]` (any device; searched on the CPU):
    /// (`[Q, 1]` Euclidean distances, `[Q, 1]` int64 bank row indices), like
    /// [`crate::models::patchcore::MemoryBank::nearest`] with k = 1.
    pub fn nearest(&self, queries: &Tensor) -> Result<(Tensor, Tensor)> {
        let size = queries.size();
        if size.len() != 2 || size[1] as usize != self.dim {
            return Err(Error::Config(format!("queries must be [Q, {}], got {size:?}", self.dim)));
        }
        let device = queries.device();
        let q = Vec::<f32>::try_from(queries.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?)?;
        let n = size[0] as usize;
        let mut dist = vec![0f32; n];
        let mut idx = vec![0i64; n];
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(8);
        let per_thread = n.div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for ((qs, ds), is) in q.chunks(per_thread * self.dim).zip(dist.chunks_mut(per_thread)).zip(idx.chunks_mut(per_thread))
            {
                scope.spawn(move || {
                    let mut near_cells: Vec<(f32, usize)> = Vec::with_capacity(self.cells());
                    for ((query, d), i) in qs.chunks_exact(self.dim).zip(ds.iter_mut()).zip(is.iter_mut()) {
                        (*d, *i) = self.search(query, &mut near_cells);
                    }
                });
            }
        });
        let dist = Tensor::f_from_slice(&dist)?.f_view([-1, 1])?.f_to_device(device)?;
        let idx = Tensor::f_from_slice(&idx)?.f_view([-1, 1])?.f_to_device(device)?;
        Ok((dist, idx))
    }

    /// One query: (distance, bank row) of the nearest member of the `probes` nearest cells.
    fn search(&self, query: &[f32], near_cells: &mut Vec<(f32, usize)>) -> (f32, i64) {
        near_cells.clear();
        near_cells.extend(self.centroids.chunks_exact(self.dim).map(|c| sq_dist(query, c)).zip(0..));
        if self.probes < near_cells.len() {
            near_cells.select_nth_unstable_by(self.probes - 1, |a, b| a.0.total_cmp(&b.0));
        }
        let mut best = (f32::INFINITY, 0i64);
        for &(_, cell) in &near_cells[..self.probes] {
            for pos in self.offsets[cell]..self.offsets[cell + 1] {
                let d2 = sq_dist(query, &self.rows[pos * self.dim..(pos + 1) * self.dim]);
                if d2 < best.0 {
                    best = (d2, self.ids[pos]);
                }
            }
        }
        (best.0.max(0.0).sqrt(), best.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::patchcore::MemoryBank;

    #[test]
    fn all_probes_is_exact_and_few_probes_stay_close() {
        tch::manual_seed(3);
        // Clustered bank: 40 clusters of 50 rows.
        let centres = Tensor::randn([40, 24], (Kind::Float, Device::Cpu)) * 4.0;
        let bank =
            centres.repeat_interleave_self_int(50, Some(0), None) + Tensor::randn([2000, 24], (Kind::Float, Device::Cpu)) * 0.5;
        let queries =
            centres.repeat_interleave_self_int(5, Some(0), None) + Tensor::randn([200, 24], (Kind::Float, Device::Cpu)) * 0.6;
        let exact = MemoryBank::with_search(bank.shallow_clone(), false).unwrap(); // float32: exact
        let (d_exact, i_exact) = exact.nearest(&queries, 1).unwrap();

        let full = BankIndex::new(&bank, usize::MAX, 0).unwrap();
        assert_eq!(full.cells(), 45); // round(sqrt(2000))
        let (d_full, i_full) = full.nearest(&queries).unwrap();
        assert!((&d_full - &d_exact).abs().max().double_value(&[]) < 1e-3);
        assert_eq!(Vec::<i64>::try_from(i_full.view([-1])).unwrap(), Vec::<i64>::try_from(i_exact.view([-1])).unwrap());

        let few = BankIndex::new(&bank, 3, 0).unwrap();
        let (d_few, i_few) = few.nearest(&queries).unwrap();
        // Never closer than the truth; on clustered data nearly always the same row.
        assert!((&d_few - &d_exact).min().double_value(&[]) > -1e-3);
        let same = i_few.eq_tensor(&i_exact).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!(same > 0.9, "only {same} of the approximate neighbours are exact");
    }
}
