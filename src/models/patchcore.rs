//! PatchCore: Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
//!
//! Normality is a memory bank of locally aggregated patch features of a pretrained CNN,
//! computed on defect-free images and thinned by greedy k-center coreset selection. A test
//! patch's anomaly score is its distance to the nearest bank entry; the image score is the
//! largest patch score, reweighted by how isolated that nearest entry is in the bank.
//!
//! Optionally (`density_neighbors`, on by default) a distance is divided by the local spacing of
//! the bank at the nearest entry, in the spirit of Breunig et al.'s local outlier factor
//! (SIGMOD 2000): the scale of "normal" differs between tight and loose clusters of patches.
//!
//! Optionally (`guided_bandwidth`, on by default) the map is drawn from patch scores smoothed
//! among the frame's own similar-looking patches, a bilateral filter (Tomasi and Manduchi, ICCV
//! 1998) guided by the patch features as in non-local means (Buades et al., CVPR 2005): a defect
//! of one texture then scores as a whole, not only at its most anomalous patches.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::config::{PatchCoreConfig, Resize, Search};
use crate::error::{Error, Result};
use crate::models::backbone::Backbone;
use crate::models::bank_index::BankIndex;
use crate::models::layers::{blur, gaussian_kernel, upsample_blurred};
use crate::models::{coreset, ModelOutput};

/// Rows of the memory bank compared at once in nearest-neighbour search: with one frame's
/// ~1000 patches the `[queries, rows]` block (16 MB) stays in the CPU's last-level cache.
const KNN_CHUNK: i64 = 4_096;
/// Rows compared at once when only the distance to the nearest row is wanted
/// ([`MemoryBank::nearest_distances`]): a `[1 000, 1 024]` block stays in a core's L2 cache while
/// it is reduced. Measured in float32 on 2 AVX2 cores (pitting model, 960 patches x 4 160 rows):
/// 512 / 1 024 rows about the same, 4 096 slower (README "Speed").
const DISTANCE_CHUNK: i64 = 1_024;
/// Largest `[queries, bank rows]` distance block computed at once: a batch of frames is split
/// into blocks of this many elements.
const KNN_BLOCK: i64 = 4_194_304;

/// With tiles (`resize: tiles`), the share of each tile's patches kept by its own greedy
/// k-center selection before the bank is chosen among all tiles' survivors. Tiles multiply the
/// patches of a fit (BSData at native scale: 1.6 M, ten times a resized frame's) and the
/// coreset's cost with them (404 s alone); a selection within one tile of ~1000 patches is cheap
/// and keeps its outliers first, which is what the bank's selection wants (README, "Large
/// frames, small defects").
const TILE_PRESELECT: f64 = 0.25;

/// Defect-free patch features, `[M, D]` float32 on the model's device.
#[derive(Debug)]
pub struct MemoryBank {
    features: Tensor,
    /// `[M]` squared norms of the rows, computed once for every search.
    sq_norms: Tensor,
    /// `(k, [M] spacing)` when scores are divided by the spacing: computed once by
    /// [`PatchCore::new`] or loaded with the bank, and saved with it.
    spacing: Option<(i64, Tensor)>,
    /// The rows for a bfloat16 search, where the CPU computes in it ([`crate::device::computes_in_bf16`]).
    bf16: Option<Bf16Rows>,
}

/// A bank's rows for the nearest-row search in bfloat16 (issue 18: 3.2 vs 5.0 ms for 1024
/// patches against 3 300 rows on 2 cores with AMX). Centred on their mean, so that the squared
/// norms, of which the search subtracts twice the dot products, stay small in bfloat16's 8 bits.
#[derive(Debug)]
struct Bf16Rows {
    /// `[1, D]` float32 mean of the rows.
    mean: Tensor,
    /// `[M, D]` bfloat16 rows minus the mean.
    centred: Tensor,
    /// `[M]` bfloat16 squared norms of the centred rows.
    sq_norms: Tensor,
}

impl Bf16Rows {
    fn new(features: &Tensor) -> Result<Self> {
        let mean = features.f_mean_dim(0, true, Kind::Float)?;
        let centred = features.f_sub(&mean)?;
        let sq_norms = centred.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(1, false, Kind::Float)?.f_to_kind(Kind::BFloat16)?;
        Ok(Self { mean, centred: centred.f_to_kind(Kind::BFloat16)?, sq_norms })
    }

    fn subset(&self, rows: &Tensor) -> Result<Self> {
        Ok(Self {
            mean: self.mean.shallow_clone(),
            centred: self.centred.f_index_select(0, rows)?,
            sq_norms: self.sq_norms.f_index_select(0, rows)?,
        })
    }
}

impl MemoryBank {
    /// Wraps `[M, D]` features (M >= 1); searched in bfloat16 where the CPU computes in it.
    pub fn new(features: Tensor) -> Result<Self> {
        let bf16 = crate::device::computes_in_bf16(features.device());
        Self::with_search(features, bf16)
    }

    /// [`MemoryBank::new`], searched in bfloat16 or not as `bf16` says.
    pub(crate) fn with_search(features: Tensor, bf16: bool) -> Result<Self> {
        let size = features.size();
        if size.len() != 2 || size[0] < 1 || size[1] < 1 {
            return Err(Error::Config(format!("memory bank must be [M, D] with M, D >= 1, got {size:?}")));
        }
        let features = features.f_to_kind(Kind::Float)?.f_contiguous()?;
        let sq_norms = features.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(1, false, Kind::Float)?;
        let bf16 = if bf16 { Some(Bf16Rows::new(&features)?) } else { None };
        Ok(Self { features, sq_norms, spacing: None, bf16 })
    }

    /// Greedy k-center coreset (PatchCore paper, Alg. 1) of `features` `[N, D]`, keeping `n`
    /// rows ([`coreset_rows`]).
    pub fn coreset(
        features: &Tensor,
        n: i64,
        projection_dim: i64,
        seed: u64,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let rows = coreset_rows(features, n, 0, projection_dim, seed, on_step)?;
        Self::new(features.f_index_select(0, &rows)?)
    }

    /// The bank of the given rows only (`rows`: `[R]` int64, R >= 1), sharing nothing.
    pub fn subset(&self, rows: &Tensor) -> Result<Self> {
        if rows.numel() == 0 {
            return Err(Error::Config("a memory bank subset needs at least one row".into()));
        }
        Ok(Self {
            features: self.features.f_index_select(0, rows)?,
            sq_norms: self.sq_norms.f_index_select(0, rows)?,
            spacing: None,
            bf16: self.bf16.as_ref().map(|b| b.subset(rows)).transpose()?,
        })
    }

    /// `[M]` local spacing of the bank: each row's distance to its `k`-th nearest other row
    /// (k >= 1; the last other row when the bank is smaller). Floored at a tenth of the mean
    /// spacing, so that duplicated rows (a bank of a featureless part) cannot divide by zero; a
    /// bank of one row, or of identical rows, has spacing 1 everywhere (raw distances).
    pub fn spacing(&self, k: i64) -> Result<Tensor> {
        if let Some((cached_k, spacing)) = &self.spacing {
            if *cached_k == k {
                return Ok(spacing.shallow_clone());
            }
        }
        if k < 1 {
            return Err(Error::Config(format!("bank spacing needs k >= 1, got {k}")));
        }
        // The row itself is among its own k + 1 nearest (at distance 0, or tied with a duplicate),
        // so the last of them is the k-th nearest other row.
        let (d, _) = self.nearest(&self.features, k + 1)?;
        let kth = d.f_select(1, d.size()[1] - 1)?.f_contiguous()?;
        let floor = 0.1 * kth.f_mean(Kind::Float)?.f_double_value(&[])?;
        if self.len() < 2 || !(floor > 0.0) {
            return Ok(kth.f_ones_like()?);
        }
        Ok(kth.f_clamp_min(floor)?)
    }

    /// Keeps `spacing` `[M]` (from [`MemoryBank::spacing`] with this `k`, or a saved bank) for
    /// later calls and for [`save_memory_bank`].
    fn keep_spacing(&mut self, k: i64, spacing: Tensor) -> Result<()> {
        if spacing.size() != [self.len()] {
            return Err(Error::Config(format!("bank spacing must be [{}], got {:?}", self.len(), spacing.size())));
        }
        self.spacing = Some((k, spacing));
        Ok(())
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
    /// The nearest row (k = 1) comes from a bfloat16 search where the bank has one: its distance
    /// is then computed in float32 and is the exact distance to that row, which is the nearest
    /// one or within bfloat16's rounding of it (same AUROC on the shared sets, README "Speed").
    pub fn nearest(&self, queries: &Tensor, k: i64) -> Result<(Tensor, Tensor)> {
        let block = |q: &Tensor| match &self.bf16 {
            Some(rows) if k == 1 => self.nearest_block_bf16(rows, q),
            _ => self.nearest_block(q, k),
        };
        let mut dists = Vec::new();
        let mut indices = Vec::new();
        for q in self.query_blocks(queries, KNN_CHUNK)? {
            let (d, i) = block(&q)?;
            dists.push(d);
            indices.push(i);
        }
        Ok((Tensor::f_cat(&dists, 0)?, Tensor::f_cat(&indices, 0)?))
    }

    /// The Euclidean distance from each query `[Q, D]` to its nearest bank row, `[Q, 1]`, without
    /// which row it is: the same values as [`MemoryBank::nearest`] with `k = 1`, faster where the
    /// search is in float32, because a plain minimum is vectorised and a minimum with its index
    /// is not (960 patches x 4 160 rows on 2 AVX2 cores: 12.5-13.9 ms against 19.7-22.4 ms,
    /// README "Speed"). A bfloat16 search needs the row to measure the distance exactly, so
    /// there it is [`MemoryBank::nearest`].
    pub fn nearest_distances(&self, queries: &Tensor) -> Result<Tensor> {
        if self.bf16.is_some() {
            return Ok(self.nearest(queries, 1)?.0);
        }
        let mut dists = Vec::new();
        for q in self.query_blocks(queries, DISTANCE_CHUNK)? {
            dists.push(self.distance_block(&q)?);
        }
        Ok(Tensor::f_cat(&dists, 0)?)
    }

    /// `queries` split into blocks whose `[queries, rows]` distance block, `chunk` rows at a time,
    /// stays within [`KNN_BLOCK`] elements (one block for a frame's patches).
    fn query_blocks(&self, queries: &Tensor, chunk: i64) -> Result<Vec<Tensor>> {
        let n_queries = queries.size()[0];
        let per_block = (KNN_BLOCK / chunk.min(self.len())).max(1);
        let mut blocks = Vec::new();
        let mut start = 0;
        while start < n_queries {
            let len = per_block.min(n_queries - start);
            blocks.push(queries.f_narrow(0, start, len)?);
            start += len;
        }
        if blocks.is_empty() {
            blocks.push(queries.shallow_clone());
        }
        Ok(blocks)
    }

    /// The squared distances less `|q|^2` between queries (given as `-2 q`, `[Q, D]`) and the bank
    /// rows `start..start + len`: `[Q, len]`. |q - c|^2 = |q|^2 + (|c|^2 - 2 q.c): the bracket in
    /// one fused matmul-add; |q|^2 is the same along a row, so the callers add it after their
    /// reduction (one pass less over the block) and clamp the tiny negatives of cancellation.
    /// One function for both float32 searches, so that they find the very same minimum.
    fn partial_sq_distances(&self, q_m2: &Tensor, start: i64, len: i64) -> Result<Tensor> {
        let rows = self.features.f_narrow(0, start, len)?;
        Ok(self.sq_norms.f_narrow(0, start, len)?.f_unsqueeze(0)?.f_addmm(q_m2, &rows.f_tr()?)?)
    }

    /// [`MemoryBank::nearest_distances`] for one block of queries `[Q, D]`: `[Q, 1]`.
    fn distance_block(&self, queries: &Tensor) -> Result<Tensor> {
        let q_sq = queries.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(1, true, Kind::Float)?;
        let q_m2 = queries.f_mul_scalar(-2.0)?;
        let mut mins = Vec::new();
        let mut start = 0;
        while start < self.len() {
            let len = DISTANCE_CHUNK.min(self.len() - start);
            mins.push(self.partial_sq_distances(&q_m2, start, len)?.f_amin([1].as_slice(), true)?);
            start += len;
        }
        let nearest = Tensor::f_cat(&mins, 1)?.f_amin([1].as_slice(), true)?;
        Ok(nearest.f_add(&q_sq)?.f_clamp_min(0.0)?.f_sqrt()?)
    }

    /// The nearest row of each query of a block `[Q, D]` found in bfloat16 `rows`, scanning them
    /// in chunks: (`[Q, 1]` float32 distances to it, `[Q, 1]` int64 indices).
    fn nearest_block_bf16(&self, rows: &Bf16Rows, queries: &Tensor) -> Result<(Tensor, Tensor)> {
        let q_m2 = queries.f_sub(&rows.mean)?.f_mul_scalar(-2.0)?.f_to_kind(Kind::BFloat16)?;
        let mut best: Option<(Tensor, Tensor)> = None;
        let mut start = 0;
        while start < self.len() {
            let len = KNN_CHUNK.min(self.len() - start);
            // |c|^2 - 2 q.c: the distance less |q|^2, which is the same along a row.
            let partial = rows
                .sq_norms
                .f_narrow(0, start, len)?
                .f_unsqueeze(0)?
                .f_addmm(&q_m2, &rows.centred.f_narrow(0, start, len)?.f_tr()?)?;
            let (d, i) = partial.f_min_dim(1, true)?;
            let i = i.f_add_scalar(start)?;
            best = Some(match best {
                None => (d, i),
                Some((bd, bi)) => {
                    let closer = d.f_lt_tensor(&bd)?;
                    (d.f_where_self(&closer, &bd)?, i.f_where_self(&closer, &bi)?)
                }
            });
            start += len;
        }
        let Some((_, idx)) = best else {
            return Err(Error::Config("the memory bank is empty: re-fit the model".into()));
        };
        let nearest = self.features.f_index_select(0, &idx.f_view([-1])?)?;
        let d = queries.f_sub(&nearest)?.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(1, true, Kind::Float)?.f_sqrt()?;
        Ok((d, idx))
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
            let partial = self.partial_sq_distances(&q_m2, start, len)?;
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
        let Some((d2, idx)) = best else {
            return Err(Error::Config("the memory bank is empty: re-fit the model".into()));
        };
        Ok((d2.f_sqrt()?, idx))
    }
}

/// SPADE's image retrieval (Cohen and Hoshen 2020) over a memory bank built image by image:
/// which training image each bank row came from, and each training image's descriptor (the
/// mean and standard deviation of its patch features, centred and scaled over the training images).
/// A frame's patches are then compared only with the rows of the training images most like it.
#[derive(Debug)]
pub struct ImageRetrieval {
    /// `[M]` int64: the training image (0..I) of each bank row.
    image_of_row: Tensor,
    /// `[I, 2D]` standardised descriptors of the training images.
    descriptors: Tensor,
    /// `[2D]` mean of the raw descriptors over the training images, and the scale of each
    /// dimension (one value per half).
    mean: Tensor,
    std: Tensor,
}

impl ImageRetrieval {
    /// Wraps the parts (as [`PatchCore::fit`] made them or a model file holds them) for a
    /// bank of `bank_rows` rows, checking that they fit together.
    pub fn new(image_of_row: Tensor, raw_descriptors: &Tensor, bank_rows: i64) -> Result<Self> {
        let (rows, desc) = (image_of_row.size(), raw_descriptors.size());
        if rows != [bank_rows] || desc.len() != 2 || desc[0] < 1 {
            return Err(Error::Config(format!(
                "image retrieval needs [{bank_rows}] row owners and [I, 2D] descriptors, got {rows:?} and {desc:?}"
            )));
        }
        let image_of_row = image_of_row.f_to_kind(Kind::Int64)?;
        let (lo, hi) = (image_of_row.f_min()?.f_int64_value(&[])?, image_of_row.f_max()?.f_int64_value(&[])?);
        if lo < 0 || hi >= desc[0] {
            return Err(Error::Config(format!(
                "bank rows name training images {lo}..={hi}, but there are {} descriptors",
                desc[0]
            )));
        }
        let raw = raw_descriptors.f_to_kind(Kind::Float)?;
        let mean = raw.f_mean_dim(0, false, Kind::Float)?;
        // Standardised per dimension (what retrieved best on Magnetic-Tile's 513 images), but no
        // dimension's scale below a tenth of the descriptor's overall spread: one that hardly
        // varies (few training images, a short teach-in) must not have its noise blown up to
        // full weight. On Magnetic-Tile no dimension is that flat.
        let centred = raw.f_sub(&mean)?;
        let overall = centred.f_pow_tensor_scalar(2)?.f_mean(Kind::Float)?.f_sqrt()?;
        let floor = overall.f_mul_scalar(0.1)?.f_clamp_min(1e-6)?;
        let std = raw.f_std_dim(0, false, false)?.f_maximum(&floor)?;
        let descriptors = centred.f_div(&std)?;
        Ok(Self { image_of_row, descriptors, mean, std })
    }

    /// Number of training images.
    pub fn n_images(&self) -> i64 {
        self.descriptors.size()[0]
    }

    /// `[M]` training image of each bank row.
    pub fn image_of_row(&self) -> &Tensor {
        &self.image_of_row
    }

    /// `[I, 2D]` raw (unstandardised) descriptors, as stored in a model file.
    pub fn raw_descriptors(&self) -> Result<Tensor> {
        Ok(self.descriptors.f_mul(&self.std)?.f_add(&self.mean)?)
    }

    /// Bank rows of the `k` training images whose descriptors are nearest to that of one
    /// frame's patch features `[P, D]`: `[R]` int64 row indices.
    pub fn rows_for(&self, patches: &Tensor, k: usize) -> Result<Tensor> {
        let q = image_descriptor(patches)?.f_sub(&self.mean)?.f_div(&self.std)?.f_unsqueeze(0)?;
        let d = Tensor::f_cdist(&q, &self.descriptors, 2.0, None)?.f_view([-1])?;
        let (_, images) = d.f_topk((k as i64).min(self.n_images()), 0, false, false)?;
        let owned = self.image_of_row.f_unsqueeze(1)?.f_eq_tensor(&images.f_unsqueeze(0)?)?.f_any_dim(1, false)?;
        Ok(owned.f_nonzero()?.f_view([-1])?)
    }
}

/// One image's descriptor for [`ImageRetrieval`]: its patch features `[P, D]` -> `[2D]`, the
/// mean and the standard deviation of each feature over the image (texture statistics).
pub fn image_descriptor(patches: &Tensor) -> Result<Tensor> {
    let mean = patches.f_mean_dim(0, false, Kind::Float)?;
    let std = patches.f_std_dim(0, false, false)?;
    Ok(Tensor::f_cat(&[mean, std], 0)?)
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
    /// Rows by training image, when the bank was fitted image by image (`retrieval_images`).
    retrieval: Option<ImageRetrieval>,
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
    /// Assembles a model from `config` (checked where it was made: parsed from model.json or
    /// by [`PatchCore::fit`]) and its fitted parts, on their device (used by the model loader).
    /// `retrieval` must be there when `config.search` is [`Search::Retrieval`].
    pub fn new(
        config: &PatchCoreConfig,
        backbone: Backbone,
        mut bank: MemoryBank,
        retrieval: Option<ImageRetrieval>,
    ) -> Result<Self> {
        if let (Search::Retrieval { images }, None) = (config.search, &retrieval) {
            return Err(Error::Config(format!(
                "retrieval_images is {images} but this memory bank was fitted as one whole, without the training \
                 image of each row: set retrieval_images to 0, or re-fit with --retrieval-images"
            )));
        }
        let blur = gaussian_kernel(config.map.blur_sigma, bank.features.device())?;
        let index = match config.search {
            Search::Approximate { probes } if bank.features.device() == Device::Cpu => {
                Some(BankIndex::new(&bank.features, probes, config.seed)?)
            }
            _ => None,
        };
        match config.density_neighbors {
            Some(k) => {
                let spacing = bank.spacing(k)?;
                bank.keep_spacing(k, spacing)?;
            }
            None => bank.spacing = None,
        }
        Ok(Self { backbone, bank, config: config.clone(), blur, index, retrieval })
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
        let gathered = Gathered::from_batches(&backbone, batches, config, 0, &mut progress)?;
        if gathered.n_images == 0 {
            return Err(Error::Config("no training images: PatchCore needs at least one good image".into()));
        }
        let (n_images, n_patches) = (gathered.n_images, gathered.n_patches);
        let (bank, retrieval, coreset_seconds) = if gathered.by_image {
            let t = std::time::Instant::now();
            let (bank, retrieval) = bank_by_image(gathered.feats, &Tensor::f_stack(&gathered.descriptors, 0)?, config)?;
            (bank, Some(retrieval), gathered.coreset_seconds + t.elapsed().as_secs_f64())
        } else {
            let all = Tensor::f_cat(&gathered.feats, 0)?;
            let t = std::time::Instant::now();
            let bank = select_bank(&all, 0, n_patches, config, &mut progress)?;
            (bank, None, gathered.coreset_seconds + t.elapsed().as_secs_f64())
        };
        let summary = FitSummary {
            n_images,
            n_patches,
            bank_size: bank.len(),
            feature_dim: bank.dim(),
            extract_seconds: t0.elapsed().as_secs_f64() - coreset_seconds,
            coreset_seconds,
        };
        Ok((Self::new(config, backbone, bank, retrieval)?, summary))
    }

    /// The model grown with more defect-free images (`batches`, as for [`PatchCore::fit`]), as
    /// if they had been among its training images: the greedy selection goes on from the bank's
    /// rows over the new patches, to the coreset ratio of all patches (image by image with
    /// retrieval: each new image's own selection is added). `fitted` is what the fit reported;
    /// the summary returned counts both. This is how `fit` builds its bank from every good image
    /// after calibrating on held-out ones with the bank of the others.
    pub fn grown(
        self,
        fitted: &FitSummary,
        batches: impl IntoIterator<Item = Result<Tensor>>,
        mut progress: impl FnMut(FitProgress),
    ) -> Result<(Self, FitSummary)> {
        let _guard = tch::no_grad_guard();
        let t0 = std::time::Instant::now();
        let Self { backbone, bank, config, retrieval, .. } = self;
        let gathered = Gathered::from_batches(&backbone, batches, &config, fitted.n_images, &mut progress)?;
        let n_patches = fitted.n_patches + gathered.n_patches;
        let t = std::time::Instant::now();
        let (bank, retrieval) = match retrieval {
            Some(retrieval) => {
                // Each earlier image's rows, in its own selection order (the bank keeps them together).
                let owners = Vec::<i64>::try_from(&retrieval.image_of_row.f_to_device(Device::Cpu)?)?;
                let mut per_image = Vec::new();
                let mut start = 0;
                while start < owners.len() {
                    let end = owners[start..].iter().position(|&o| o != owners[start]).map_or(owners.len(), |n| start + n);
                    per_image.push(bank.features.f_narrow(0, start as i64, (end - start) as i64)?);
                    start = end;
                }
                per_image.extend(gathered.feats);
                let mut descriptors = vec![retrieval.raw_descriptors()?];
                descriptors.extend(
                    gathered.descriptors.into_iter().map(|d| d.f_unsqueeze(0)).collect::<std::result::Result<Vec<_>, _>>()?,
                );
                let (bank, retrieval) = bank_by_image(per_image, &Tensor::f_cat(&descriptors, 0)?, &config)?;
                (bank, Some(retrieval))
            }
            None => {
                let mut all = vec![bank.features.shallow_clone()];
                all.extend(gathered.feats);
                (select_bank(&Tensor::f_cat(&all, 0)?, bank.len(), n_patches, &config, &mut progress)?, None)
            }
        };
        let coreset_seconds = gathered.coreset_seconds + t.elapsed().as_secs_f64();
        let summary = FitSummary {
            n_images: fitted.n_images + gathered.n_images,
            n_patches,
            bank_size: bank.len(),
            feature_dim: bank.dim(),
            extract_seconds: fitted.extract_seconds + t0.elapsed().as_secs_f64() - coreset_seconds,
            coreset_seconds: fitted.coreset_seconds + coreset_seconds,
        };
        Ok((Self::new(&config, backbone, bank, retrieval)?, summary))
    }

    /// The model's configuration.
    pub fn config(&self) -> &PatchCoreConfig {
        &self.config
    }

    /// The memory bank.
    pub fn memory_bank(&self) -> &MemoryBank {
        &self.bank
    }

    /// The training image of each bank row, when the bank was fitted image by image.
    pub fn image_retrieval(&self) -> Option<&ImageRetrieval> {
        self.retrieval.as_ref()
    }

    /// The feature extractor.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// Nearest bank row of each patch feature of `n_frames` frames, `[n_frames*P, D]`, as
    /// configured ([`Search`]): exact, approximate or among each frame's most similar training
    /// images: (`[Q, 1]` distances, `[Q, 1]` int64 bank indices). The indices come back when
    /// `with_rows` asks for them, or where the search finds them anyway (retrieval, the index);
    /// an exact search of the whole bank without them takes [`MemoryBank::nearest_distances`]
    /// (the same distances, faster).
    pub fn nearest_patches(&self, patches: &Tensor, n_frames: i64, with_rows: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (dist, idx) = match (self.config.search, &self.retrieval, &self.index) {
            (Search::Retrieval { images }, Some(retrieval), _) => {
                self.nearest_in_similar_images(retrieval, images, patches, n_frames.max(1))?
            }
            (_, _, Some(index)) => index.nearest(patches)?,
            _ if with_rows => self.bank.nearest(patches, 1)?,
            _ => return Ok((self.bank.nearest_distances(patches)?, None)),
        };
        Ok((dist, Some(idx)))
    }

    /// Anomaly scores of patch features `[n_frames*P, D]`: the distance to the nearest bank row
    /// ([`Self::nearest_patches`]), divided by the bank's spacing there with `density_neighbors`:
    /// `[Q, 1]` scores, and the `[Q, 1]` int64 bank indices where the search found them.
    pub fn patch_scores(&self, patches: &Tensor, n_frames: i64) -> Result<(Tensor, Option<Tensor>)> {
        let spacing = self.bank.spacing.as_ref().map(|(_, spacing)| spacing);
        let (dist, idx) = self.nearest_patches(patches, n_frames, spacing.is_some())?;
        match (spacing, &idx) {
            (Some(spacing), Some(rows)) => {
                Ok((dist.f_div(&spacing.f_index_select(0, &rows.f_view([-1])?)?.f_view([-1, 1])?)?, idx))
            }
            // Without density the distance is the score (rows are only asked for with it).
            _ => Ok((dist, idx)),
        }
    }

    /// [`Self::nearest_patches`] with SPADE's retrieval: the patches `[N*P, D]` of `n` frames, each
    /// frame's searched only among the rows of its `images` most similar training images:
    /// (`[N*P, 1]` distances, `[N*P, 1]` indices into the whole bank).
    fn nearest_in_similar_images(
        &self,
        retrieval: &ImageRetrieval,
        images: usize,
        patches: &Tensor,
        n: i64,
    ) -> Result<(Tensor, Tensor)> {
        let per_frame = patches.size()[0] / n;
        let mut dists = Vec::with_capacity(n as usize);
        let mut indices = Vec::with_capacity(n as usize);
        for i in 0..n {
            let own = patches.f_narrow(0, i * per_frame, per_frame)?;
            let rows = retrieval.rows_for(&own, images)?;
            let (d, local) = self.bank.subset(&rows)?.nearest(&own, 1)?;
            dists.push(d);
            indices.push(rows.f_index_select(0, &local.f_view([-1])?)?.f_view([-1, 1])?);
        }
        Ok((Tensor::f_cat(&dists, 0)?, Tensor::f_cat(&indices, 0)?))
    }

    /// Scores a normalised batch `[N, 3, H, W]`: image scores `[N]` (reweighted maximum patch
    /// distance) and anomaly maps `[N, 1, H, W]` (patch distances, with `guided_bandwidth`
    /// smoothed among similar patches, then upsampled and Gaussian-smoothed; with
    /// `coarse_blur_sigma`, nowhere below their wide smoothing).
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
        let (scores, idx) = self.patch_scores(&patches, n)?;
        let patch_scores = scores.f_view([n, fh * fw])?;
        let nearest_idx = idx.map(|i| i.f_view([n, fh * fw])).transpose()?;

        // Image score: the paper's reweighting of the most anomalous patch (Eq. 7). The weight
        // comes from raw distances (how isolated m* is); the score it weighs may be normalised.
        let (max_scores, argmax) = patch_scores.f_max_dim(1, false)?;
        let mut image_scores = Vec::with_capacity(n as usize);
        for i in 0..n {
            let p = argmax.f_int64_value(&[i])?;
            let s_star = max_scores.f_double_value(&[i])?;
            let test_patch = patches.f_get(i * fh * fw + p)?.f_unsqueeze(0)?;
            // m*, the bank row nearest to that patch: searched again for it alone where the
            // search skipped the indices (one row against the bank: microseconds).
            let row = match &nearest_idx {
                Some(idx) => idx.f_int64_value(&[i, p])?,
                None => self.bank.nearest(&test_patch, 1)?.1.f_int64_value(&[0, 0])?,
            };
            let m_star = self.bank.features.f_get(row)?.f_unsqueeze(0)?;
            let k = self.config.num_neighbors.min(self.bank.len());
            // Neighbourhood of m* in the bank (m* itself comes first, at distance 0).
            let (_, support) = self.bank.nearest(&m_star, k)?;
            let support_feats = self.bank.features.f_index_select(0, &support.f_view([-1])?)?;
            let d = Tensor::f_cdist(&test_patch, &support_feats, 2.0, None)?.f_view([-1])?;
            let weight = 1.0 - d.f_softmax(0, Kind::Float)?.f_double_value(&[0])?;
            image_scores.push((weight * s_star) as f32);
        }
        let image_scores = Tensor::f_from_slice(&image_scores)?;

        let smoothing = &self.config.map;
        let map_scores = match smoothing.guided_bandwidth {
            Some(bandwidth) => {
                let sigma_cells = smoothing.guided_sigma * fh as f64 / h as f64;
                guided_smoothing(&patch_scores, &patches, fw, bandwidth, sigma_cells)?
            }
            None => patch_scores,
        };
        let grid = map_scores.f_view([n, 1, fh, fw])?;
        let maps = upsample_blurred(&grid, h, w, self.blur.as_ref())?;
        let maps = match coarse_map(&grid, smoothing.coarse_blur_sigma.unwrap_or(0.0), h, w)? {
            Some(coarse) => maps.f_maximum(&coarse)?,
            None => maps,
        };
        Ok(ModelOutput { image_scores, anomaly_maps: maps })
    }
}

/// Patch features of training images as the bank's selection takes them: every patch for a
/// whole-bank fit, or each frame's own greedy pre-selection (image by image for retrieval, tile
/// by tile with tiles).
struct Gathered {
    /// `[P, D]` blocks: one per batch (whole bank), per tile, or per image in selection order.
    feats: Vec<Tensor>,
    /// `[2D]` per image (retrieval only).
    descriptors: Vec<Tensor>,
    /// Whether `feats` holds one block per image (retrieval).
    by_image: bool,
    n_images: usize,
    /// Patches seen, before any pre-selection (the coreset ratio is of these).
    n_patches: i64,
    /// Seconds of the pre-selections.
    coreset_seconds: f64,
}

impl Gathered {
    /// Runs `backbone` over `batches`; images are numbered from `first_image` (the seeds of
    /// their own selections), each batch is reported to `progress`.
    fn from_batches(
        backbone: &Backbone,
        batches: impl IntoIterator<Item = Result<Tensor>>,
        config: &PatchCoreConfig,
        first_image: usize,
        progress: &mut impl FnMut(FitProgress),
    ) -> Result<Self> {
        let by_image = matches!(config.search, Search::Retrieval { .. });
        let tiled = matches!(config.preprocess.resize, Resize::Tiles { .. });
        let coreset = &config.coreset;
        let mut gathered =
            Self { feats: Vec::new(), descriptors: Vec::new(), by_image, n_images: 0, n_patches: 0, coreset_seconds: 0.0 };
        for batch in batches {
            let batch = batch?;
            let n = batch.size()[0];
            let patches = flatten_patches(&embed(backbone, &batch, config.neighbourhood)?)?;
            gathered.n_patches += patches.size()[0];
            // Image by image (retrieval) or tile by tile: each frame of the batch keeps its own
            // greedy selection of `share` of its patches, in selection order.
            let share = if by_image { Some(coreset.ratio) } else { tiled.then_some(TILE_PRESELECT) };
            if let Some(share) = share {
                let per_frame = patches.size()[0] / n;
                let keep = ((per_frame as f64 * share).ceil() as i64).max(1);
                let t = std::time::Instant::now();
                for j in 0..n {
                    let own = patches.f_narrow(0, j * per_frame, per_frame)?;
                    if by_image {
                        gathered.descriptors.push(image_descriptor(&own)?);
                    }
                    let seed = config.seed.wrapping_add((first_image + gathered.n_images) as u64 + j as u64);
                    let rows = coreset_rows(&own, keep, 0, coreset.projection_dim, seed, &mut |_, _| {})?;
                    gathered.feats.push(own.f_index_select(0, &rows)?);
                }
                gathered.coreset_seconds += t.elapsed().as_secs_f64();
            } else {
                gathered.feats.push(patches);
            }
            gathered.n_images += n as usize;
            progress(FitProgress::Images(n as usize));
        }
        Ok(gathered)
    }
}

/// The whole bank: `config`'s coreset ratio of `n_patches` (at most its row limit) chosen from
/// `candidates` `[N, D]`, whose first `chosen` rows are a selection already made.
fn select_bank(
    candidates: &Tensor,
    chosen: i64,
    n_patches: i64,
    config: &PatchCoreConfig,
    progress: &mut impl FnMut(FitProgress),
) -> Result<MemoryBank> {
    let coreset = &config.coreset;
    // The ratio is of every patch seen, tiles' pre-selections or not.
    let keep = ((n_patches as f64 * coreset.ratio).ceil() as i64).clamp(1, coreset.max_rows as i64).min(candidates.size()[0]);
    if chosen > 0 && keep <= chosen {
        // At the row limit already: the selection made stays as it is.
        return MemoryBank::new(candidates.f_narrow(0, 0, chosen)?);
    }
    let rows = coreset_rows(candidates, keep, chosen, coreset.projection_dim, config.seed, &mut |done, total| {
        progress(FitProgress::Coreset { done, total })
    })?;
    MemoryBank::new(candidates.f_index_select(0, &rows)?)
}

/// The bank built image by image (retrieval): `per_image` rows of each training image in its
/// own selection order, `descriptors` `[I, 2D]` raw. Over the row limit every image keeps the
/// same prefix of its selection (a prefix of a greedy k-center selection is itself one).
fn bank_by_image(
    mut per_image: Vec<Tensor>,
    descriptors: &Tensor,
    config: &PatchCoreConfig,
) -> Result<(MemoryBank, ImageRetrieval)> {
    let cap = (config.coreset.max_rows / per_image.len().max(1)).max(1) as i64;
    let mut owners = Vec::new();
    for (i, f) in per_image.iter_mut().enumerate() {
        if f.size()[0] > cap {
            *f = f.f_narrow(0, 0, cap)?;
        }
        owners.extend(std::iter::repeat_n(i as i64, f.size()[0] as usize));
    }
    let bank = MemoryBank::new(Tensor::f_cat(&per_image, 0)?)?;
    let owners = Tensor::f_from_slice(&owners)?.f_to_device(bank.features.device())?;
    let retrieval = ImageRetrieval::new(owners, descriptors, bank.len())?;
    Ok((bank, retrieval))
}

/// Rows of `features` `[N, D]` chosen by greedy k-center (PatchCore paper, Alg. 1), `[min(n, N)]`
/// int64 in selection order (so any prefix is itself a coreset). The first `chosen` rows of
/// `features` are a selection already made (a fitted bank's rows, when the bank grows with more
/// images): they come first, in order, and the selection goes on from them; with none chosen it
/// starts from a seeded random row, as the paper does. Distances are computed in a
/// `projection_dim` Gaussian random projection (the paper's Johnson-Lindenstrauss trick), which
/// keeps the selection cheap for wide features. On the CPU the exact selection is found with
/// triangle-inequality pruning ([`coreset`]); on a GPU each step is one mat-vec over all rows.
/// `on_step(done, total)` reports progress.
pub fn coreset_rows(
    features: &Tensor,
    n: i64,
    chosen: i64,
    projection_dim: i64,
    seed: u64,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let total = features.size()[0];
    let device = features.device();
    if n >= total {
        return Ok(Tensor::f_arange(total, (Kind::Int64, device))?);
    }
    let _guard = tch::no_grad_guard();
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
    let first: Vec<usize> =
        if chosen > 0 { (0..chosen.min(total) as usize).collect() } else { vec![(seed % total as u64) as usize] };
    let selected: Vec<i64> = if device == Device::Cpu {
        let pdim = projected.size()[1] as usize;
        let points = Vec::<f32>::try_from(projected.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?)?;
        let anchors = coreset::sample_rows(total as usize, coreset::anchor_count(total as usize), seed);
        coreset::greedy_k_center(&points, pdim, n as usize, &first, &anchors, on_step).into_iter().map(|i| i as i64).collect()
    } else {
        greedy_on_device(&projected, n, &first, on_step)?
    };
    Ok(Tensor::f_from_slice(&selected)?.f_to_device(device)?)
}

/// Plain greedy k-center with one mat-vec per step over `[N, D]` points on their device (the
/// GPU path of [`coreset_rows`]): row indices in selection order, beginning with `first`.
fn greedy_on_device(points: &Tensor, n: i64, first: &[usize], on_step: &mut dyn FnMut(usize, usize)) -> Result<Vec<i64>> {
    let total = points.size()[0];
    let sq_norms = points.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(1, false, Kind::Float)?;
    let mut current = 0;
    let mut min_dist = Tensor::f_full([total], f64::INFINITY, (Kind::Float, points.device()))?;
    let mut selected = Vec::with_capacity(n as usize);
    for step in 0..n {
        if let Some(&row) = first.get(step as usize) {
            current = row as i64;
        }
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
        let pooled =
            if pooled.size()[2..] == [h, w] { pooled } else { pooled.f_upsample_bilinear2d([h, w], false, None, None)? };
        parts.push(pooled);
    }
    Ok(Tensor::f_cat(&parts, 1)?)
}

/// `[N, D, h, w]` -> `[N*h*w, D]`, row-major over (image, y, x).
pub fn flatten_patches(emb: &Tensor) -> Result<Tensor> {
    let d = emb.size()[1];
    Ok(emb.f_permute([0, 2, 3, 1])?.f_reshape([-1, d])?.f_contiguous()?)
}

/// The smoothing PatchCore applies to its maps: Gaussian of `sigma` pixels on `[N, 1, H, W]`
/// (returned unchanged for sigma 0). The model itself keeps its kernel; the studies call this.
#[cfg(feature = "studies")]
pub fn gaussian_blur(maps: &Tensor, sigma: f64) -> Result<Tensor> {
    match gaussian_kernel(sigma, maps.device())? {
        Some(kernel) => blur(maps, &kernel),
        None => Ok(maps.shallow_clone()),
    }
}

/// The wide smoothing of `coarse_blur_sigma` (input pixels): patch scores `[N, 1, fh, fw]` of
/// an `h x w` input -> `[N, 1, h, w]`, or None when `sigma_px` is 0. Blurred on the patch grid,
/// then upsampled: the same map within interpolation, from 64 times fewer pixels (stride 8) with
/// an 8 times shorter kernel than a blur at full size.
pub fn coarse_map(grid: &Tensor, sigma_px: f64, h: i64, w: i64) -> Result<Option<Tensor>> {
    let fh = grid.size()[2];
    match gaussian_kernel(sigma_px * fh as f64 / h as f64, grid.device())? {
        Some(kernel) => Ok(Some(blur(grid, &kernel)?.f_upsample_bilinear2d([h, w], false, None, None)?)),
        None => Ok(None),
    }
}

/// Feature-guided smoothing of patch scores (`guided_bandwidth`, its doc has the weights):
/// scores `[N, P]` of N frames of P = fh*fw patches, rows of width `fw`, with the frames' patch
/// features `[N*P, D]` -> `[N, P]`, each score the weighted mean of its own frame's. `sigma_cells`
/// is the spatial reach in patch-grid cells. Written here because the bilateral filters of
/// imageproc and OpenCV take an intensity image as their guide, not a D-dimensional feature per
/// pixel. Weights are built in blocks of query rows, so memory stays near 4M floats per block
/// whatever the image size.
pub fn guided_smoothing(scores: &Tensor, patches: &Tensor, fw: i64, bandwidth: f64, sigma_cells: f64) -> Result<Tensor> {
    let (n, p) = (scores.size()[0], scores.size()[1]);
    let device = patches.device();
    let cell = Tensor::f_arange(p, (Kind::Float, device))?;
    let ys = cell.f_div_scalar(fw as f64)?.f_floor()?;
    let xs = cell.f_remainder(fw as f64)?;
    let block = (4_000_000 / p).max(1);
    let mut frames = Vec::with_capacity(n as usize);
    for i in 0..n {
        let f = patches.f_narrow(0, i * p, p)?;
        let s = scores.f_get(i)?.f_to_kind(Kind::Float)?.f_unsqueeze(1)?; // [P, 1]
        let sq = f.f_mul(&f)?.f_sum_dim_intlist(1, false, Kind::Float)?; // [P]
        let sq_dist = |rows: &Tensor| -> Result<Tensor> {
            let fr = f.f_index_select(0, rows)?;
            let cross = fr.f_matmul(&f.f_transpose(0, 1)?)?;
            let d = sq.f_index_select(0, rows)?.f_unsqueeze(1)?.f_add(&sq.f_unsqueeze(0)?)?.f_sub(&cross.f_mul_scalar(2.0)?)?;
            Ok(d.f_clamp_min(0.0)?)
        };
        // The bandwidth is relative to how different this frame's patches are from each other
        // (the median over up to 1024 evenly spaced rows), so one setting suits any texture.
        let step = ((p + 1023) / 1024).max(1);
        let sample = Tensor::f_arange_start_step(0, p, step, (Kind::Int64, device))?;
        let median = sq_dist(&sample)?.f_median()?.f_double_value(&[])?.max(1e-12);
        let feature_scale = -1.0 / (2.0 * bandwidth * bandwidth * median);
        let space_scale = -1.0 / (2.0 * sigma_cells * sigma_cells);
        let mut smoothed = Vec::new();
        let mut start = 0;
        while start < p {
            let len = block.min(p - start);
            let rows = Tensor::f_arange_start(start, start + len, (Kind::Int64, device))?;
            let dy = ys.f_index_select(0, &rows)?.f_unsqueeze(1)?.f_sub(&ys.f_unsqueeze(0)?)?;
            let dx = xs.f_index_select(0, &rows)?.f_unsqueeze(1)?.f_sub(&xs.f_unsqueeze(0)?)?;
            let space = dy.f_mul(&dy)?.f_add(&dx.f_mul(&dx)?)?;
            // Each row's own weight is exp(0) = 1, so the sums below are never zero.
            let w = sq_dist(&rows)?.f_mul_scalar(feature_scale)?.f_add(&space.f_mul_scalar(space_scale)?)?.f_exp()?;
            smoothed.push(w.f_matmul(&s)?.f_div(&w.f_sum_dim_intlist(1, true, Kind::Float)?)?);
            start += len;
        }
        frames.push(Tensor::f_cat(&smoothed, 0)?.f_view([1, p])?);
    }
    Ok(Tensor::f_cat(&frames, 0)?.f_to_kind(scores.kind())?)
}

/// Key of the bank's spacing for `k` in a bank file: the `k` is in the name, so that a model.json
/// edited to another `density_neighbors` computes its own instead of using a stale one.
fn spacing_key(k: i64) -> String {
    format!("spacing_k{k}")
}

/// Writes the memory bank to a safetensors file (key `memory_bank`; with image retrieval also
/// `image_of_row` and `image_descriptors`; with density normalisation `spacing_k<k>`).
pub fn save_memory_bank(bank: &MemoryBank, retrieval: Option<&ImageRetrieval>, path: &Path) -> Result<()> {
    let mut tensors = vec![("memory_bank".to_string(), bank.features.f_to_device(Device::Cpu)?)];
    if let Some((k, spacing)) = &bank.spacing {
        tensors.push((spacing_key(*k), spacing.f_to_device(Device::Cpu)?));
    }
    if let Some(r) = retrieval {
        tensors.push(("image_of_row".into(), r.image_of_row.f_to_device(Device::Cpu)?));
        tensors.push(("image_descriptors".into(), r.raw_descriptors()?.f_to_device(Device::Cpu)?));
    }
    Tensor::write_safetensors(&tensors, path)?;
    Ok(())
}

/// Reads a memory bank written by [`save_memory_bank`] onto `device`, with its image retrieval
/// when the file has one (banks fitted as one whole, and older files, have none) and its spacing
/// for `density_neighbors` when saved (otherwise [`PatchCore::new`] computes it).
pub fn load_memory_bank(
    path: &Path,
    device: Device,
    density_neighbors: Option<i64>,
) -> Result<(MemoryBank, Option<ImageRetrieval>)> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| Error::model(path, format!("cannot read memory bank: {e}")))?;
    let take = |key: &str| tensors.iter().find(|(k, _)| k == key).map(|(_, t)| t.shallow_clone());
    let features = take("memory_bank").ok_or_else(|| Error::model(path, "no 'memory_bank' tensor in file"))?;
    let mut bank = MemoryBank::new(features.f_to_device(device)?)?;
    if let Some((k, spacing)) = density_neighbors.and_then(|k| take(&spacing_key(k)).map(|s| (k, s))) {
        let spacing = spacing.f_to_kind(Kind::Float)?.f_to_device(device)?;
        bank.keep_spacing(k, spacing).map_err(|e| Error::model(path, e.to_string()))?;
    }
    let retrieval = match (take("image_of_row"), take("image_descriptors")) {
        (Some(rows), Some(desc)) => Some(
            ImageRetrieval::new(rows.f_to_device(device)?, &desc.f_to_device(device)?, bank.len())
                .map_err(|e| Error::model(path, e.to_string()))?,
        ),
        (None, None) => None,
        _ => return Err(Error::model(path, "image retrieval needs both 'image_of_row' and 'image_descriptors'")),
    };
    Ok((bank, retrieval))
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
        // Without the rows: the very numbers of the nearest row's distance, over bank chunks of
        // another size, and over several query blocks (rows * queries > KNN_BLOCK).
        let exact = MemoryBank::with_search(bank.shallow_clone(), false).unwrap();
        let d1 = exact.nearest(&q, 1).unwrap().0;
        assert!(exact.nearest_distances(&q).unwrap().equal(&d1));
        let many = Tensor::randn([KNN_BLOCK / DISTANCE_CHUNK + 5, 8], (Kind::Float, Device::Cpu));
        let d_many = exact.nearest_distances(&many).unwrap();
        assert_eq!(d_many.size(), vec![KNN_BLOCK / DISTANCE_CHUNK + 5, 1]);
        assert!(d_many.allclose(&Tensor::cdist(&many, &bank, 2.0, None::<i64>).amin([1].as_slice(), true), 1e-3, 1e-3, false));
    }

    #[test]
    fn the_bfloat16_search_finds_the_nearest_row_or_one_as_near_and_measures_it_exactly() {
        // Patch-like rows: clustered, away from the origin, across bank chunks and query blocks.
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        let centres = Tensor::randn([20, 152], opts).f_mul_scalar(3.0).unwrap().f_add_scalar(5.0).unwrap();
        let pick = Tensor::randint(20, [KNN_CHUNK + 900], (Kind::Int64, Device::Cpu));
        let bank = centres.index_select(0, &pick) + Tensor::randn([KNN_CHUNK + 900, 152], opts);
        let pick = Tensor::randint(20, [5000], (Kind::Int64, Device::Cpu));
        let q = centres.index_select(0, &pick) + Tensor::randn([5000, 152], opts).f_mul_scalar(1.2).unwrap();
        let exact = MemoryBank::with_search(bank.shallow_clone(), false).unwrap();
        let fast = MemoryBank::with_search(bank.shallow_clone(), true).unwrap();
        let (d, i) = exact.nearest(&q, 1).unwrap();
        let (fd, fi) = fast.nearest(&q, 1).unwrap();
        assert_eq!((fd.size(), fi.size()), (vec![5000, 1], vec![5000, 1]));
        // The distance is the float32 distance to the row found ...
        let found = bank.index_select(0, &fi.view([-1]));
        let to_found = (&q - found).pow_tensor_scalar(2).sum_dim_intlist(1, true, Kind::Float).sqrt();
        assert!(fd.allclose(&to_found, 1e-4, 1e-4, false));
        // ... never nearer than the nearest (up to the float32 search's own rounding, ~2e-5), and
        // at most a rounding farther.
        let excess = (&fd - &d).f_div(&d).unwrap();
        assert!(excess.min().double_value(&[]) >= -1e-4, "{}", excess.min().double_value(&[]));
        // bfloat16 keeps 8 bits: |c|^2 - 2 q.c (here ~2 000, the squared distances ~370) is
        // rounded by up to ~0.4 %, so a row up to a few per cent farther can win a near tie.
        let (worst, mean) = (excess.max().double_value(&[]), excess.mean(Kind::Float).double_value(&[]));
        assert!(worst < 0.05 && mean < 0.002, "excess distance: worst {worst}, mean {mean}");
        let same = fi.eq_tensor(&i).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        // Noise in 152 dimensions makes many near ties (distances concentrate), so the row differs
        // often here while the distance hardly does.
        assert!(same > 0.7, "the same row for {same} of the queries");
        // k > 1 (the bank's spacing) is always exact.
        let (d3, _) = fast.nearest(&q, 3).unwrap();
        assert!(d3.narrow(1, 0, 1).allclose(&d, 1e-3, 1e-3, false));
        // A subset searches its own rows in bfloat16 too.
        let rows = Tensor::arange_start(100, 300, (Kind::Int64, Device::Cpu));
        let (sd, si) = fast.subset(&rows).unwrap().nearest(&q, 1).unwrap();
        assert!(si.max().int64_value(&[]) < 200);
        let own = bank.index_select(0, &rows.index_select(0, &si.view([-1])));
        assert!(sd.allclose(&(&q - own).pow_tensor_scalar(2).sum_dim_intlist(1, true, Kind::Float).sqrt(), 1e-4, 1e-4, false));
    }

    #[test]
    fn coreset_covers_clusters_better_than_the_first_rows() {
        // Four tight clusters, the first 400 rows all from cluster 0: a 4-row coreset must pick
        // one row per cluster, so every point is within the cluster radius of the coreset.
        let mut rows = Vec::new();
        let centres = [[0.0f32, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]];
        for (c, centre) in centres.iter().enumerate() {
            for j in 0..(if c == 0 { 400 } else { 50 }) {
                let jitter = (j % 7) as f32 * 0.01;
                rows.push(centre[0] + jitter);
                rows.push(centre[1] - jitter);
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

    /// One 64x64 frame: a 16x16 region of one texture (feature near e0) in a background of
    /// another (near e1), the region scoring 0.3 with a 4x4 hot spot of 1.0, the background 0.
    fn textured_frame() -> (Tensor, Tensor) {
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        let inside = |y: i64, x: i64| (20..36).contains(&y) && (20..36).contains(&x);
        let hot = |y: i64, x: i64| (26..30).contains(&y) && (26..30).contains(&x);
        let mut feats = Vec::new();
        let mut scores = Vec::new();
        for y in 0..64 {
            for x in 0..64 {
                feats.extend_from_slice(if inside(y, x) { &[1.0f32, 0.0, 0.0, 0.0] } else { &[0.0, 1.0, 0.0, 0.0] });
                scores.push(if hot(y, x) {
                    1.0f32
                } else if inside(y, x) {
                    0.3
                } else {
                    0.0
                });
            }
        }
        let feats = Tensor::from_slice(&feats).view([4096, 4]) + Tensor::randn([4096, 4], opts) * 0.05;
        (Tensor::from_slice(&scores).view([1, 4096]), feats)
    }

    #[test]
    fn guided_smoothing_fills_a_region_of_one_texture_without_spreading_out_of_it() {
        let (scores, feats) = textured_frame();
        let out = guided_smoothing(&scores, &feats, 64, 0.4, 6.0).unwrap();
        assert_eq!(out.size(), [1, 4096]);
        let grid = out.view([64, 64]);
        let region = grid.narrow(0, 20, 16).narrow(1, 20, 16);
        // The region's plain patches rise towards the hot spot, the hot spot falls towards them:
        // the region scores more as a whole.
        let corner = region.double_value(&[0, 0]);
        assert!(corner > 0.31, "region corner {corner}");
        assert!(region.max().double_value(&[]) < 0.95, "hot spot {}", region.max().double_value(&[]));
        // A background patch right next to the region looks nothing like it and stays near 0,
        // where a Gaussian of the same reach would lift it.
        let beside = grid.double_value(&[28, 19]);
        assert!(beside.abs() < 1e-3, "background beside the region {beside}");
        assert!(grid.narrow(0, 0, 16).abs().max().double_value(&[]) < 1e-3);
    }

    #[test]
    fn guided_smoothing_keeps_frames_apart() {
        let (scores, feats) = textured_frame();
        let alone = guided_smoothing(&scores, &feats, 64, 0.4, 6.0).unwrap();
        // A second frame, the same features but scoring 5 everywhere, changes nothing in the first
        // (and, flat, stays flat itself).
        let both = guided_smoothing(
            &Tensor::cat(&[&scores, &scores.full_like(5.0)], 0),
            &Tensor::cat(&[&feats, &feats], 0),
            64,
            0.4,
            6.0,
        )
        .unwrap();
        assert!((both.get(0) - alone.get(0)).abs().max().double_value(&[]) < 1e-5);
        assert!((both.get(1) - 5.0).abs().max().double_value(&[]) < 1e-4);
    }

    #[test]
    fn coarse_map_fills_a_wide_plateau_but_not_a_spike() {
        assert!(coarse_map(&Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu)), 0.0, 256, 256).unwrap().is_none());
        // A flat grid stays flat (the blur keeps the level).
        let flat = coarse_map(&Tensor::full([1, 1, 32, 32], 3.0, (Kind::Float, Device::Cpu)), 32.0, 256, 256).unwrap().unwrap();
        assert_eq!(flat.size(), [1, 1, 256, 256]);
        assert!((flat - 3.0).abs().max().double_value(&[]) < 1e-4);
        // A plateau of +1 over the lower half of a 32x32 grid (stride 8): 32 input pixels = 4 cells.
        let plateau = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
        let _ = plateau.narrow(2, 16, 16).fill_(1.0);
        let m = coarse_map(&plateau, 32.0, 256, 256).unwrap().unwrap();
        assert!(m.double_value(&[0, 0, 230, 128]) > 0.95, "deep inside the plateau");
        assert!(m.double_value(&[0, 0, 25, 128]) < 0.05, "far outside it");
        // One high patch is spread out: its peak falls well below the fine map's.
        let spike = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
        let _ = spike.get(0).get(0).get(16).get(16).fill_(10.0);
        let m = coarse_map(&spike, 32.0, 256, 256).unwrap().unwrap();
        assert!(m.max().double_value(&[]) < 1.0, "peak {}", m.max().double_value(&[]));
    }

    /// A bank of four 1-D points at 0, 1, 3 and 7.
    fn line_bank() -> MemoryBank {
        MemoryBank::new(Tensor::from_slice(&[0.0f32, 1.0, 3.0, 7.0]).view([4, 1])).unwrap()
    }

    #[test]
    fn spacing_is_the_distance_to_the_kth_other_row() {
        let bank = line_bank();
        let s = |k| Vec::<f32>::try_from(bank.spacing(k).unwrap()).unwrap();
        assert_eq!(s(1), [1.0, 1.0, 2.0, 4.0]);
        assert_eq!(s(2), [3.0, 2.0, 3.0, 6.0]);
        assert_eq!(s(9), [7.0, 6.0, 4.0, 7.0], "k beyond the bank: the farthest other row");
        assert!(bank.spacing(0).is_err());
        // Three duplicates: their spacing 0 is floored at a tenth of the mean (1.25).
        let dup = MemoryBank::new(Tensor::from_slice(&[2.0f32, 2.0, 2.0, 7.0]).view([4, 1])).unwrap();
        assert_eq!(Vec::<f32>::try_from(dup.spacing(1).unwrap()).unwrap(), [0.125, 0.125, 0.125, 5.0]);
        let same = MemoryBank::new(Tensor::ones([3, 2], (Kind::Float, Device::Cpu))).unwrap();
        assert_eq!(Vec::<f32>::try_from(same.spacing(1).unwrap()).unwrap(), [1.0, 1.0, 1.0]);
    }

    #[test]
    fn spacing_round_trips_through_the_bank_file_under_its_k() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bank.safetensors");
        let mut bank = line_bank();
        // A stand-in spacing, so that a loaded bank visibly uses the file's and not its own.
        bank.keep_spacing(2, Tensor::from_slice(&[9.0f32, 8.0, 7.0, 6.0])).unwrap();
        save_memory_bank(&bank, None, &path).unwrap();
        let (back, _) = load_memory_bank(&path, Device::Cpu, Some(2)).unwrap();
        assert_eq!(Vec::<f32>::try_from(back.spacing(2).unwrap()).unwrap(), [9.0, 8.0, 7.0, 6.0]);
        // Another k (model.json edited) computes its own.
        let (back, _) = load_memory_bank(&path, Device::Cpu, Some(1)).unwrap();
        assert_eq!(Vec::<f32>::try_from(back.spacing(1).unwrap()).unwrap(), [1.0, 1.0, 2.0, 4.0]);
        assert!(bank.keep_spacing(2, Tensor::ones([3], (Kind::Float, Device::Cpu))).is_err(), "wrong length");
    }

    #[test]
    fn patch_scores_divide_distances_by_the_spacing_at_the_nearest_row() {
        let Some(weights) = crate::models::backbone::lite0_weights_for_tests() else { return };
        tch::manual_seed(11);
        let config = PatchCoreConfig { density_neighbors: Some(2), ..PatchCoreConfig::default() };
        let backbone = Backbone::new(&config.backbone, &weights, Device::Cpu).unwrap();
        let dim = backbone.feature_channels().iter().sum::<i64>();
        // Two clusters, one tight and one loose: the same step off each scores differently.
        let tight = Tensor::randn([20, dim], (Kind::Float, Device::Cpu)) * 0.1;
        let loose = Tensor::randn([20, dim], (Kind::Float, Device::Cpu)) * 2.0 + 50.0;
        let bank = MemoryBank::new(Tensor::cat(&[tight, loose], 0)).unwrap();
        let model = PatchCore::new(&config, backbone, bank, None).unwrap();
        let step = Tensor::full([1, dim], 3.0 / (dim as f64).sqrt(), (Kind::Float, Device::Cpu));
        let queries = Tensor::cat(&[step.shallow_clone(), step + 50.0], 0);
        let (raw, idx) = model.nearest_patches(&queries, 1, true).unwrap();
        let idx = idx.expect("rows asked for");
        let (scores, same_idx) = model.patch_scores(&queries, 1).unwrap();
        assert!(idx.equal(&same_idx.expect("density needs the rows")));
        let spacing = model.memory_bank().spacing(2).unwrap().index_select(0, &idx.view([-1])).view([-1, 1]);
        assert!(scores.allclose(&(&raw / &spacing), 1e-5, 1e-6, false));
        // Raw, the query by the loose cluster is the farther; relative to the spacing, the one off
        // the tight cluster is the more anomalous.
        let (r, s) = (Vec::<f32>::try_from(raw.view([-1])).unwrap(), Vec::<f32>::try_from(scores.view([-1])).unwrap());
        assert!(r[0] < r[1] && s[0] > 2.0 * s[1], "raw {r:?}, normalised {s:?}");
        let plain = PatchCore::new(
            &PatchCoreConfig { density_neighbors: None, ..config.clone() },
            Backbone::new(&config.backbone, &weights, Device::Cpu).unwrap(),
            MemoryBank::new(model.memory_bank().features().shallow_clone()).unwrap(),
            None,
        )
        .unwrap();
        assert!(plain.patch_scores(&queries, 1).unwrap().0.equal(&raw), "0 = the paper's raw distances");
    }

    #[test]
    fn memory_bank_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bank.safetensors");
        let bank = MemoryBank::new(Tensor::randn([10, 4], (Kind::Float, Device::Cpu))).unwrap();
        save_memory_bank(&bank, None, &path).unwrap();
        let (back, retrieval) = load_memory_bank(&path, Device::Cpu, None).unwrap();
        assert!(retrieval.is_none());
        assert!(back.features().equal(bank.features()));
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = load_memory_bank(&path, Device::Cpu, None).unwrap_err().to_string();
        assert!(err.contains("cannot read memory bank"), "{err}");
    }

    /// Four training images of two kinds (rows 0..4 from images 0, 1 of kind A; rows 4..8 from
    /// images 2, 3 of kind B: features offset by 5, equally spread, so that the spread half of
    /// the descriptor differs only by sampling noise), two bank rows per image.
    fn two_kinds() -> (Tensor, Tensor, ImageRetrieval) {
        tch::manual_seed(5);
        let images: Vec<Tensor> = (0..4).map(|i| if i < 2 { kind_a(50) } else { kind_b(50) }).collect();
        let descriptors = Tensor::stack(&images.iter().map(|p| image_descriptor(p).unwrap()).collect::<Vec<_>>(), 0);
        let owners = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2, 3, 3]);
        let retrieval = ImageRetrieval::new(owners, &descriptors, 8).unwrap();
        (descriptors, kind_b(40), retrieval)
    }

    fn kind_a(n: i64) -> Tensor {
        Tensor::randn([n, 6], (Kind::Float, Device::Cpu))
    }

    fn kind_b(n: i64) -> Tensor {
        Tensor::randn([n, 6], (Kind::Float, Device::Cpu)) + 5.0
    }

    /// Two kinds of 64x64 frames `[n, 3, 64, 64]`: noise (seeded), and smooth stripes.
    fn noise_frames(n: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([n, 3, 64, 64], (Kind::Float, Device::Cpu))
    }

    fn stripe_frames(n: i64) -> Tensor {
        let opts = (Kind::Float, Device::Cpu);
        let stripes = Tensor::arange(64, opts).f_div_scalar(3.0).unwrap().sin().view([1, 1, 1, 64]);
        let gain = Tensor::arange(n, opts).f_add_scalar(1.0).unwrap().view([n, 1, 1, 1]);
        stripes.expand([n, 3, 64, 64], false).f_mul(&gain).unwrap()
    }

    #[test]
    fn a_grown_bank_goes_on_from_the_fitted_one_and_learns_the_new_images() {
        let Some(weights) = crate::models::backbone::lite0_weights_for_tests() else { return };
        let mut config = PatchCoreConfig::default();
        config.preprocess.image_size = [64, 64];
        let backbone = || Backbone::new(&config.backbone, &weights, Device::Cpu).unwrap();
        let (model, fitted) = PatchCore::fit(backbone(), [Ok(noise_frames(4, 1))], &config, |_| {}).unwrap();
        let stripes = stripe_frames(2);
        let before = Vec::<f32>::try_from(model.forward(&stripes).unwrap().image_scores).unwrap();
        let first_rows = model.memory_bank().features().shallow_clone();

        let mut heard = Vec::new();
        let (grown, summary) = model.grown(&fitted, [Ok(stripes.shallow_clone())], |p| heard.push(p)).unwrap();
        assert_eq!(summary.n_images, 6);
        assert_eq!(summary.n_patches, fitted.n_patches * 6 / 4);
        let want = (summary.n_patches as f64 * config.coreset.ratio).ceil() as i64;
        assert_eq!(grown.memory_bank().len(), want);
        assert!(heard.contains(&FitProgress::Images(2)));
        // The fitted selection is kept, in order, and goes on.
        assert!(grown.memory_bank().features().narrow(0, 0, first_rows.size()[0]).equal(&first_rows));
        // Frames like the new images are now normal.
        let after = Vec::<f32>::try_from(grown.forward(&stripes).unwrap().image_scores).unwrap();
        for (b, a) in before.iter().zip(&after) {
            assert!(*a < 0.5 * b, "stripes scored {b} before and {a} after growing");
        }

        // Image by image (retrieval): the new images get their own rows and descriptors.
        config.search = Search::Retrieval { images: 2 };
        let (model, fitted) = PatchCore::fit(backbone(), [Ok(noise_frames(4, 1))], &config, |_| {}).unwrap();
        let (grown, summary) = model.grown(&fitted, [Ok(stripes.shallow_clone())], |_| {}).unwrap();
        let retrieval = grown.image_retrieval().unwrap();
        assert_eq!((retrieval.n_images(), summary.n_images), (6, 6));
        let owners = Vec::<i64>::try_from(retrieval.image_of_row()).unwrap();
        assert!((0..6).all(|i| owners.contains(&i)), "{owners:?}");
        let after = Vec::<f32>::try_from(grown.forward(&stripes).unwrap().image_scores).unwrap();
        for (b, a) in before.iter().zip(&after) {
            assert!(*a < 0.5 * b, "retrieval: stripes scored {b} before and {a} after growing");
        }
    }

    #[test]
    fn retrieval_searches_only_the_rows_of_similar_images() {
        let (descriptors, query_b, retrieval) = two_kinds();
        assert_eq!(retrieval.n_images(), 4);
        assert_eq!(Vec::<i64>::try_from(retrieval.rows_for(&query_b, 2).unwrap()).unwrap(), vec![4, 5, 6, 7]);
        let query_a = kind_a(40);
        assert_eq!(Vec::<i64>::try_from(retrieval.rows_for(&query_a, 2).unwrap()).unwrap(), vec![0, 1, 2, 3]);
        // more images asked for than there are: all rows
        assert_eq!(retrieval.rows_for(&query_a, 10).unwrap().size(), vec![8]);
        // the stored (raw) descriptors come back as they went in
        assert!(retrieval.raw_descriptors().unwrap().allclose(&descriptors, 1e-4, 1e-4, false));
    }

    #[test]
    fn retrieval_refuses_parts_that_do_not_fit_the_bank() {
        let (descriptors, _, _) = two_kinds();
        let err = ImageRetrieval::new(Tensor::from_slice(&[0i64, 1, 2]), &descriptors, 8).unwrap_err().to_string();
        assert!(err.contains("[8] row owners"), "{err}");
        let err = ImageRetrieval::new(Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2, 3, 4]), &descriptors, 8).unwrap_err().to_string();
        assert!(err.contains("0..=4") && err.contains("4 descriptors"), "{err}");
    }

    #[test]
    fn retrieval_round_trips_through_the_bank_file() {
        let (_, query_b, retrieval) = two_kinds();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bank.safetensors");
        let bank = MemoryBank::new(Tensor::randn([8, 6], (Kind::Float, Device::Cpu))).unwrap();
        save_memory_bank(&bank, Some(&retrieval), &path).unwrap();
        let (back, back_retrieval) = load_memory_bank(&path, Device::Cpu, None).unwrap();
        let back_retrieval = back_retrieval.expect("retrieval saved with the bank");
        assert!(back.features().equal(bank.features()));
        assert!(back_retrieval.image_of_row().equal(retrieval.image_of_row()));
        assert!(back_retrieval.rows_for(&query_b, 2).unwrap().equal(&retrieval.rows_for(&query_b, 2).unwrap()));
        // one of the two retrieval tensors alone is a damaged file
        let rows = retrieval.image_of_row().shallow_clone();
        Tensor::write_safetensors(&[("memory_bank", bank.features()), ("image_of_row", &rows)], &path).unwrap();
        let err = load_memory_bank(&path, Device::Cpu, None).unwrap_err().to_string();
        assert!(err.contains("needs both"), "{err}");
    }

    #[test]
    fn a_bank_subset_keeps_the_rows_and_their_norms() {
        let bank = MemoryBank::new(Tensor::randn([10, 4], (Kind::Float, Device::Cpu))).unwrap();
        let rows = Tensor::from_slice(&[7i64, 2]);
        let sub = bank.subset(&rows).unwrap();
        assert!(sub.features().equal(&bank.features().index_select(0, &rows)));
        let q = bank.features().get(2).unsqueeze(0);
        let (d, i) = sub.nearest(&q, 1).unwrap();
        assert_eq!(i.int64_value(&[0, 0]), 1);
        assert!(d.double_value(&[0, 0]) < 1e-3);
        assert!(bank.subset(&Tensor::from_slice::<i64>(&[])).is_err());
    }
}
