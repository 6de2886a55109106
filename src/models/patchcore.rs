//! PatchCore: Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
//!
//! Normality is a memory bank of locally aggregated patch features of a pretrained CNN,
//! computed on defect-free images and thinned by greedy k-center coreset selection. A test
//! patch's anomaly score is its distance to the nearest bank entry; the image score is the
//! largest patch score, reweighted by how isolated that nearest entry is in the bank.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::config::PatchCoreConfig;
use crate::error::{Error, Result};
use crate::models::backbone::Backbone;
use crate::models::bank_index::BankIndex;
use crate::models::{coreset, ModelOutput};

/// Rows of the memory bank compared at once in nearest-neighbour search: with one frame's
/// ~1000 patches the `[queries, rows]` block (16 MB) stays in the CPU's last-level cache.
const KNN_CHUNK: i64 = 4_096;
/// Largest `[queries, bank rows]` distance block computed at once: a batch of frames is split
/// into blocks of this many elements.
const KNN_BLOCK: i64 = 4_194_304;

/// Defect-free patch features, `[M, D]` float32 on the model's device.
#[derive(Debug)]
pub struct MemoryBank {
    features: Tensor,
    /// `[M]` squared norms of the rows, computed once for every search.
    sq_norms: Tensor,
}

impl MemoryBank {
    /// Wraps `[M, D]` features (M >= 1).
    pub fn new(features: Tensor) -> Result<Self> {
        let size = features.size();
        if size.len() != 2 || size[0] < 1 || size[1] < 1 {
            return Err(Error::Config(format!("memory bank must be [M, D] with M, D >= 1, got {size:?}")));
        }
        let features = features.f_to_kind(Kind::Float)?.f_contiguous()?;
        let sq_norms = features.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(1, false, Kind::Float)?;
        Ok(Self { features, sq_norms })
    }

    /// Greedy k-center coreset (PatchCore paper, Alg. 1) of `features` `[N, D]`, keeping `n`
    /// rows. Distances are computed in a `projection_dim` Gaussian random projection (the paper's
    /// Johnson-Lindenstrauss trick), which keeps the selection cheap for wide features. On the
    /// CPU the exact selection is found with triangle-inequality pruning ([`coreset`]); on a GPU
    /// each step is one mat-vec over all rows. `on_step(done, total)` reports progress.
    pub fn coreset(
        features: &Tensor,
        n: i64,
        projection_dim: i64,
        seed: u64,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let total = features.size()[0];
        if n >= total {
            return Self::new(features.shallow_clone());
        }
        let _guard = tch::no_grad_guard();
        let device = features.device();
        let dim = features.size()[1];
        let projected = if dim > projection_dim {
            tch::manual_seed(seed as i64);
            let proj = Tensor::f_randn([dim, projection_dim], (Kind::Float, Device::Cpu))?
                .f_div_scalar((projection_dim as f64).sqrt())?
                .f_to_device(device)?;
            features.f_matmul(&proj)?
        } else {
            features.shallow_clone()
        };
        // Start from a seeded random row, as the paper does.
        let start = (seed % total as u64) as i64;
        let selected = if device == Device::Cpu {
            let pdim = projected.size()[1] as usize;
            let points = Vec::<f32>::try_from(projected.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?)?;
            let anchors = coreset::sample_rows(total as usize, coreset::anchor_count(total as usize), seed);
            coreset::greedy_k_center(&points, pdim, n as usize, start as usize, &anchors, on_step)
                .into_iter()
                .map(|i| i as i64)
                .collect()
        } else {
            greedy_on_device(&projected, n, start, on_step)?
        };
        let index = Tensor::f_from_slice(&selected)?.f_to_device(device)?;
        Self::new(features.f_index_select(0, &index)?)
    }

    /// Number of stored patches.
    pub fn len(&self) -> i64 {
        self.features.size()[0]
    }

    /// Never true: a bank has at least one row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Feature dimension D.
    pub fn dim(&self) -> i64 {
        self.features.size()[1]
    }

    /// The `[M, D]` features.
    pub fn features(&self) -> &Tensor {
        &self.features
    }

    /// Distances and indices of the `k` nearest bank rows of each query `[Q, D]`:
    /// returns (`[Q, k]` Euclidean distances ascending, `[Q, k]` int64 indices).
    /// Queries and bank are both taken in chunks, so memory stays bounded whatever their sizes.
    pub fn nearest(&self, queries: &Tensor, k: i64) -> Result<(Tensor, Tensor)> {
        let n_queries = queries.size()[0];
        let per_chunk = (KNN_BLOCK / KNN_CHUNK.min(self.len())).max(1);
        if n_queries <= per_chunk {
            return self.nearest_block(queries, k);
        }
        let mut dists = Vec::new();
        let mut indices = Vec::new();
        let mut start = 0;
        while start < n_queries {
            let len = per_chunk.min(n_queries - start);
            let (d, i) = self.nearest_block(&queries.f_narrow(0, start, len)?, k)?;
            dists.push(d);
            indices.push(i);
            start += len;
        }
        Ok((Tensor::f_cat(&dists, 0)?, Tensor::f_cat(&indices, 0)?))
    }

    /// [`MemoryBank::nearest`] for one block of queries, scanning the bank in chunks.
    fn nearest_block(&self, queries: &Tensor, k: i64) -> Result<(Tensor, Tensor)> {
        let k = k.min(self.len());
        let q_sq = queries.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(1, true, Kind::Float)?;
        let q_m2 = queries.f_mul_scalar(-2.0)?;
        let mut best: Option<(Tensor, Tensor)> = None;
        let mut start = 0;
        while start < self.len() {
            let len = KNN_CHUNK.min(self.len() - start);
            let chunk = self.features.f_narrow(0, start, len)?;
            let c_sq = self.sq_norms.f_narrow(0, start, len)?;
            // |q - c|^2 = |q|^2 + (|c|^2 - 2 q.c): the bracket in one fused matmul-add; |q|^2 is the
            // same along a row, so it is added after the reduction (one pass less over the block),
            // and the clamp guards the tiny negatives of cancellation.
            let partial = c_sq.f_unsqueeze(0)?.f_addmm(&q_m2, &chunk.f_tr()?)?;
            let (d, i) = if k == 1 {
                // min is a plain reduction; topk would sort.
                partial.f_min_dim(1, true)?
            } else {
                partial.f_topk(k.min(len), 1, false, true)?
            };
            let d = d.f_add(&q_sq)?.f_clamp_min(0.0)?;
            let i = i.f_add_scalar(start)?;
            best = Some(match best {
                None => (d, i),
                Some((bd, bi)) => {
                    let d_all = Tensor::f_cat(&[bd, d], 1)?;
                    let i_all = Tensor::f_cat(&[bi, i], 1)?;
                    let (d, pos) = d_all.f_topk(k, 1, false, true)?;
                    (d, i_all.f_gather(1, &pos, false)?)
                }
            });
            start += len;
        }
        let (d2, idx) = best.expect("bank has at least one row");
        Ok((d2.f_sqrt()?, idx))
    }
}

/// A fitted PatchCore model: backbone + memory bank. An unfitted one cannot exist: get one
/// from [`PatchCore::fit`] or from a saved model ([`crate::model_file`]).
#[derive(Debug)]
pub struct PatchCore {
    backbone: Backbone,
    bank: MemoryBank,
    config: PatchCoreConfig,
    blur: Option<Tensor>,
    /// Approximate search index, when `config.knn_probes > 0` and the bank is on the CPU.
    index: Option<BankIndex>,
}

/// Why a fit went as it did: sizes and timings for logs and the model file.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct FitSummary {
    /// Training images used.
    pub n_images: usize,
    /// Patch features extracted before the coreset.
    pub n_patches: i64,
    /// Rows kept in the memory bank.
    pub bank_size: i64,
    /// Feature dimension.
    pub feature_dim: i64,
    /// Seconds spent extracting features.
    pub extract_seconds: f64,
    /// Seconds spent on the coreset.
    pub coreset_seconds: f64,
}

/// Progress of [`PatchCore::fit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitProgress {
    /// Features of this many more images extracted.
    Images(usize),
    /// Memory-bank rows chosen so far, of the total.
    Coreset {
        /// Rows chosen.
        done: usize,
        /// Rows to choose.
        total: usize,
    },
}

impl PatchCore {
    /// Assembles a model from its parts (used by the model loader).
    pub fn new(backbone: Backbone, bank: MemoryBank, config: &PatchCoreConfig) -> Result<Self> {
        config.validate()?;
        let blur = gaussian_kernel(config.blur_sigma, bank.features.device())?;
        let index = if config.knn_probes > 0 && bank.features.device() == Device::Cpu {
            Some(BankIndex::new(&bank.features, config.knn_probes, config.seed)?)
        } else {
            None
        };
        Ok(Self { backbone, bank, config: config.clone(), blur, index })
    }

    /// Fits a memory bank on defect-free images given as normalised batches `[B, 3, H, W]`.
    /// `progress` hears of each batch and of the coreset's steps (progress bars).
    pub fn fit(
        backbone: Backbone,
        batches: impl IntoIterator<Item = Result<Tensor>>,
        config: &PatchCoreConfig,
        mut progress: impl FnMut(FitProgress),
    ) -> Result<(Self, FitSummary)> {
        config.validate()?;
        let _guard = tch::no_grad_guard();
        let t0 = std::time::Instant::now();
        let mut feats = Vec::new();
        let mut n_images = 0;
        for batch in batches {
            let batch = batch?;
            let n = batch.size()[0] as usize;
            let emb = embed(&backbone, &batch, config.neighbourhood)?;
            feats.push(flatten_patches(&emb)?);
            n_images += n;
            progress(FitProgress::Images(n));
        }
        if feats.is_empty() {
            return Err(Error::Config("no training images: PatchCore needs at least one good image".into()));
        }
        let all = Tensor::f_cat(&feats, 0)?;
        drop(feats);
        let extract_seconds = t0.elapsed().as_secs_f64();
        let n_patches = all.size()[0];
        let keep = ((n_patches as f64 * config.coreset_ratio).ceil() as i64)
            .clamp(1, config.max_bank_size as i64);
        let t1 = std::time::Instant::now();
        let bank = MemoryBank::coreset(&all, keep, config.coreset_projection_dim, config.seed, &mut |done, total| {
            progress(FitProgress::Coreset { done, total })
        })?;
        let summary = FitSummary {
            n_images,
            n_patches,
            bank_size: bank.len(),
            feature_dim: bank.dim(),
            extract_seconds,
            coreset_seconds: t1.elapsed().as_secs_f64(),
        };
        Ok((Self::new(backbone, bank, config)?, summary))
    }

    /// The model's configuration.
    pub fn config(&self) -> &PatchCoreConfig {
        &self.config
    }

    /// The memory bank.
    pub fn memory_bank(&self) -> &MemoryBank {
        &self.bank
    }

    /// The feature extractor.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// Nearest bank row of each patch feature `[Q, D]`, exact or approximate as configured
    /// (`knn_probes`): (`[Q, 1]` distances, `[Q, 1]` int64 indices).
    pub fn nearest_patches(&self, patches: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.index {
            Some(index) => index.nearest(patches),
            None => self.bank.nearest(patches, 1),
        }
    }

    /// Scores a normalised batch `[N, 3, H, W]`: image scores `[N]` (reweighted maximum patch
    /// distance) and anomaly maps `[N, 1, H, W]` (upsampled, Gaussian-smoothed patch distances).
    pub fn forward(&self, x: &Tensor) -> Result<ModelOutput> {
        let _guard = tch::no_grad_guard();
        let size = x.size();
        if size.len() != 4 || size[1] != 3 {
            return Err(Error::BadImage(format!("PatchCore expects [N, 3, H, W], got {size:?}")));
        }
        let (n, h, w) = (size[0], size[2], size[3]);
        let emb = embed(&self.backbone, x, self.config.neighbourhood)?;
        let (fh, fw) = (emb.size()[2], emb.size()[3]);
        let patches = flatten_patches(&emb)?; // [N*fh*fw, D]
        let (dist, idx) = self.nearest_patches(&patches)?;
        let patch_scores = dist.f_view([n, fh * fw])?;
        let nearest_idx = idx.f_view([n, fh * fw])?;

        // Image score: the paper's reweighting of the most anomalous patch (Eq. 7).
        let (max_scores, argmax) = patch_scores.f_max_dim(1, false)?;
        let mut image_scores = Vec::with_capacity(n as usize);
        for i in 0..n {
            let p = argmax.f_int64_value(&[i])?;
            let s_star = max_scores.f_double_value(&[i])?;
            let test_patch = patches.f_get(i * fh * fw + p)?.f_unsqueeze(0)?;
            let m_star = self.bank.features.f_get(nearest_idx.f_int64_value(&[i, p])?)?.f_unsqueeze(0)?;
            let k = self.config.num_neighbors.min(self.bank.len());
            // Neighbourhood of m* in the bank (m* itself comes first, at distance 0).
            let (_, support) = self.bank.nearest(&m_star, k)?;
            let support_feats = self.bank.features.f_index_select(0, &support.f_view([-1])?)?;
            let d = Tensor::f_cdist(&test_patch, &support_feats, 2.0, None)?.f_view([-1])?;
            let weight = 1.0 - d.f_softmax(0, Kind::Float)?.f_double_value(&[0])?;
            image_scores.push((weight * s_star) as f32);
        }
        let image_scores = Tensor::f_from_slice(&image_scores)?;

        let maps = patch_scores
            .f_view([n, 1, fh, fw])?
            .f_upsample_bilinear2d([h, w], false, None, None)?;
        let maps = match &self.blur {
            Some(kernel) => blur(&maps, kernel)?,
            None => maps,
        };
        Ok(ModelOutput { image_scores, anomaly_maps: maps })
    }
}

/// Plain greedy k-center with one mat-vec per step over `[N, D]` points on their device (the
/// GPU path of [`MemoryBank::coreset`]): row indices in selection order.
fn greedy_on_device(points: &Tensor, n: i64, start: i64, on_step: &mut dyn FnMut(usize, usize)) -> Result<Vec<i64>> {
    let total = points.size()[0];
    let sq_norms = points.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(1, false, Kind::Float)?;
    let mut current = start;
    let mut min_dist = Tensor::f_full([total], f64::INFINITY, (Kind::Float, points.device()))?;
    let mut selected = Vec::with_capacity(n as usize);
    for step in 0..n {
        selected.push(current);
        let centre = points.f_get(current)?;
        // |x - c|^2 = |x|^2 - 2 x.c + |c|^2
        let dist = sq_norms
            .f_sub(&points.f_mv(&centre)?.f_mul_scalar(2.0)?)?
            .f_add_scalar(sq_norms.f_get(current)?.f_double_value(&[])?)?;
        min_dist = min_dist.f_minimum(&dist)?;
        current = min_dist.f_argmax(0, false)?.f_int64_value(&[])?;
        if step % 256 == 255 || step + 1 == n {
            on_step(step as usize + 1, n as usize);
        }
    }
    Ok(selected)
}

/// Locally aware patch features: each configured layer average-pooled over a
/// `neighbourhood`² window, upsampled to the first (finest) layer's grid and concatenated.
/// `[N, 3, H, W]` -> `[N, D, h, w]`.
pub fn embed(backbone: &Backbone, x: &Tensor, neighbourhood: i64) -> Result<Tensor> {
    let maps = backbone.features(x)?;
    let first = maps.first().ok_or_else(|| Error::Config("backbone returned no features".into()))?;
    let (h, w) = (first.size()[2], first.size()[3]);
    let pad = neighbourhood / 2;
    let mut parts = Vec::with_capacity(maps.len());
    for m in &maps {
        let pooled = m.f_avg_pool2d([neighbourhood, neighbourhood], [1, 1], [pad, pad], false, true, None)?;
        let pooled = if pooled.size()[2..] == [h, w] {
            pooled
        } else {
            pooled.f_upsample_bilinear2d([h, w], false, None, None)?
        };
        parts.push(pooled);
    }
    Ok(Tensor::f_cat(&parts, 1)?)
}

/// `[N, D, h, w]` -> `[N*h*w, D]`, row-major over (image, y, x).
pub fn flatten_patches(emb: &Tensor) -> Result<Tensor> {
    let d = emb.size()[1];
    Ok(emb.f_permute([0, 2, 3, 1])?.f_reshape([-1, d])?.f_contiguous()?)
}

/// 1-D Gaussian kernel `[K]` with K = 2*ceil(4 sigma) + 1 (anomalib's choice), or None for sigma 0.
fn gaussian_kernel(sigma: f64, device: Device) -> Result<Option<Tensor>> {
    if sigma <= 0.0 {
        return Ok(None);
    }
    let radius = (4.0 * sigma).ceil() as i64;
    let xs: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i as f64).powi(2) / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let sum: f32 = xs.iter().sum();
    let xs: Vec<f32> = xs.iter().map(|v| v / sum).collect();
    Ok(Some(Tensor::f_from_slice(&xs)?.f_to_device(device)?))
}

/// Separable Gaussian blur of `[N, 1, H, W]` with reflect padding (no dark borders).
fn blur(maps: &Tensor, kernel: &Tensor) -> Result<Tensor> {
    let k = kernel.size()[0];
    let r = k / 2;
    let (h, w) = (maps.size()[2], maps.size()[3]);
    // Reflect padding needs pad < size; small maps fall back to replicate.
    let mode = if r < h && r < w { "reflect" } else { "replicate" };
    let padded = maps.f_pad([r, r, r, r], mode, None)?;
    let kx = kernel.f_view([1, 1, 1, k])?;
    let ky = kernel.f_view([1, 1, k, 1])?;
    let out = padded.f_conv2d(&kx, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)?;
    Ok(out.f_conv2d(&ky, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)?)
}

/// Writes the memory bank to a safetensors file (key `memory_bank`).
pub fn save_memory_bank(bank: &MemoryBank, path: &Path) -> Result<()> {
    let cpu = bank.features.f_to_device(Device::Cpu)?;
    Tensor::write_safetensors(&[("memory_bank", &cpu)], path)?;
    Ok(())
}

/// Reads a memory bank written by [`save_memory_bank`] onto `device`.
pub fn load_memory_bank(path: &Path, device: Device) -> Result<MemoryBank> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| Error::model(path, format!("cannot read memory bank: {e}")))?;
    let (_, t) = tensors
        .into_iter()
        .find(|(k, _)| k == "memory_bank")
        .ok_or_else(|| Error::model(path, "no 'memory_bank' tensor in file"))?;
    MemoryBank::new(t.f_to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_matches_brute_force_across_chunks() {
        tch::manual_seed(1);
        let bank = Tensor::randn([KNN_CHUNK + 123, 8], (Kind::Float, Device::Cpu));
        let q = Tensor::randn([17, 8], (Kind::Float, Device::Cpu));
        let mb = MemoryBank::new(bank.shallow_clone()).unwrap();
        let (d, i) = mb.nearest(&q, 3).unwrap();
        let full = Tensor::cdist(&q, &bank, 2.0, None::<i64>);
        let (bd, bi) = full.topk(3, 1, false, true);
        assert!(d.allclose(&bd, 1e-3, 1e-3, false), "distances differ");
        assert_eq!(Vec::<i64>::try_from(i.view([-1])).unwrap(), Vec::<i64>::try_from(bi.view([-1])).unwrap());
    }

    #[test]
    fn coreset_covers_clusters_better_than_the_first_rows() {
        // Four tight clusters, the first 400 rows all from cluster 0: a 4-row coreset must pick
        // one row per cluster, so every point is within the cluster radius of the coreset.
        let mut rows = Vec::new();
        let centres = [[0.0f32, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]];
        for c in 0..4 {
            for j in 0..(if c == 0 { 400 } else { 50 }) {
                let jitter = (j % 7) as f32 * 0.01;
                rows.push(centres[c][0] + jitter);
                rows.push(centres[c][1] - jitter);
            }
        }
        let feats = Tensor::from_slice(&rows).view([-1, 2]);
        let bank = MemoryBank::coreset(&feats, 4, 128, 0, &mut |_, _| {}).unwrap();
        assert_eq!(bank.len(), 4);
        let (d, _) = bank.nearest(&feats, 1).unwrap();
        assert!(d.max().double_value(&[]) < 0.2, "a cluster was missed");
    }

    #[test]
    fn coreset_is_deterministic_for_a_seed() {
        tch::manual_seed(3);
        let feats = Tensor::randn([500, 64], (Kind::Float, Device::Cpu));
        let a = MemoryBank::coreset(&feats, 50, 16, 7, &mut |_, _| {}).unwrap();
        let b = MemoryBank::coreset(&feats, 50, 16, 7, &mut |_, _| {}).unwrap();
        assert!(a.features().equal(b.features()));
    }

    #[test]
    fn gaussian_blur_keeps_mass_and_flat_maps() {
        let k = gaussian_kernel(4.0, Device::Cpu).unwrap().unwrap();
        assert_eq!(k.size(), vec![33]);
        assert!((k.sum(Kind::Float).double_value(&[]) - 1.0).abs() < 1e-5);
        let flat = Tensor::full([1, 1, 40, 50], 2.5, (Kind::Float, Device::Cpu));
        let out = blur(&flat, &k).unwrap();
        assert_eq!(out.size(), vec![1, 1, 40, 50]);
        assert!((out - 2.5).abs().max().double_value(&[]) < 1e-4);
        // a spike spreads but keeps its peak where it was
        let spike = Tensor::zeros([1, 1, 40, 50], (Kind::Float, Device::Cpu));
        let _ = spike.get(0).get(0).get(20).get(25).fill_(1.0);
        let out = blur(&spike, &k).unwrap();
        let flat_idx = out.view([-1]).argmax(0, false).int64_value(&[]);
        assert_eq!(flat_idx, 20 * 50 + 25);
    }

    #[test]
    fn memory_bank_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bank.safetensors");
        let bank = MemoryBank::new(Tensor::randn([10, 4], (Kind::Float, Device::Cpu))).unwrap();
        save_memory_bank(&bank, &path).unwrap();
        let back = load_memory_bank(&path, Device::Cpu).unwrap();
        assert!(back.features().equal(bank.features()));
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = load_memory_bank(&path, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("cannot read memory bank"), "{err}");
    }
}
