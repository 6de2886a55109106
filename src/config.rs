//! Typed configuration with every default in one place. The same structs are read from
//! `config/*.yaml` parameters (node) and from command-line options (CLI), and stored inside
//! each model file so that a model knows how it was built.
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};

pub mod options;

/// Where inference runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// CUDA when a CUDA libtorch and a GPU are present, else CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// The first CUDA GPU; an error when there is none.
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" | "cuda:0" => Ok(Self::Cuda),
            other => Err(Error::Config(format!("device '{other}': use auto, cpu or cuda"))),
        }
    }
}

/// The number format the CPU computes the backbone's convolutions and the nearest-neighbour
/// search in (GPUs compute in float32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bfloat16 where the CPU multiplies it natively (AVX-512 BF16 or AMX: the engine about a
    /// quarter faster at the same AUROC, README "Speed"), float32 elsewhere.
    #[default]
    Auto,
    /// float32 everywhere: the same scores on every machine, to the last digits.
    Float32,
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "float32" | "fp32" => Ok(Self::Float32),
            other => Err(Error::Config(format!("precision '{other}': use auto or float32"))),
        }
    }
}

/// Which feature extractor a PatchCore model uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    /// Native EfficientNet-Lite0 with ImageNet weights (the default; ships with the set-up).
    #[default]
    #[value(name = "efficientnet_lite0")]
    EfficientnetLite0,
    /// Any TorchScript module whose `forward(x)` returns a tensor, or a tuple/list of tensors.
    Torchscript,
}

/// The feature extractor and the layers PatchCore takes features from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackboneConfig {
    /// Network family.
    pub kind: BackboneKind,
    /// Layers to take features from, shallow to deep. EfficientNet-Lite0: `stage1`..`stage7`
    /// (strides 2, 4, 8, 16, 16, 32, 32). TorchScript: output indices `0`, `1`, ...
    pub layers: Vec<String>,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self { kind: BackboneKind::EfficientnetLite0, layers: vec!["stage3".into(), "stage5".into()] }
    }
}

/// Pixel normalisation applied after scaling to 0..1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// ImageNet mean/std (torchvision convention).
    #[default]
    Imagenet,
    /// (x - 127) / 128 on 0..255 values (the TensorFlow EfficientNet-Lite convention).
    Symmetric,
}

/// How a frame's shape becomes the network input's shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// Stretched to exactly `image_size` (PatchCore's and anomalib's usual input).
    #[default]
    Stretch,
    /// Aspect ratio kept: scaled down (never up) until the area is at most that of
    /// `image_size`, each side rounded to a multiple of 32 (at least 64). For parts imaged at
    /// one scale but cut to different shapes, whose texture a stretch would distort
    /// differently in every image. PatchCore only (its network takes any input shape).
    KeepAspect,
    /// Tiled: the frame is scaled by `scale` (1 = the camera's own pixels) and cut into
    /// overlapping tiles of `image_size`, each a network input; the maps are stitched back and
    /// the image score is the largest tile's. For small defects on large frames, which a resize
    /// of the whole frame to `image_size` shrinks below one patch. The model is fitted on tiles
    /// of the good images, cut the same way. PatchCore only.
    Tiles {
        /// Frame scale before cutting (0 < scale <= 4; 1 = native pixels, 0.5 = half).
        scale: f64,
        /// Fraction of a tile's side shared with its neighbour (0 <= overlap <= 0.75); the
        /// stitched map weighs each tile down towards its edges over the shared band.
        overlap: f64,
    },
}

impl Resize {
    /// Tiles of the camera's own pixels with a quarter of each side shared (`fit --tiles 1`).
    pub fn tiles(scale: f64) -> Self {
        Resize::Tiles { scale, overlap: 0.25 }
    }

    /// Checks the tiling's ranges (the other modes have none).
    pub fn validate(&self) -> Result<()> {
        if let Resize::Tiles { scale, overlap } = *self {
            if !(scale > 0.0 && scale <= 4.0) {
                return Err(Error::Config(format!("tiles scale {scale}: must be in (0, 4] (1 = the camera's own pixels)")));
            }
            if !(0.0..=0.75).contains(&overlap) {
                return Err(Error::Config(format!("tiles overlap {overlap}: must be in 0..=0.75 (a fraction of the tile side)")));
            }
        }
        Ok(())
    }
}

/// How a camera frame becomes a network input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreprocessConfig {
    /// Network input size `[height, width]`; frames are resized (not cropped) to it, or, with
    /// `resize: keep_aspect`, to at most its area.
    pub image_size: [u32; 2],
    /// Pixel normalisation.
    pub normalization: Normalization,
    /// Stretch to `image_size` or keep the aspect ratio.
    pub resize: Resize,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self { image_size: [256, 256], normalization: Normalization::Imagenet, resize: Resize::Stretch }
    }
}

/// How the memory bank is chosen from the training patches: greedy k-center coreset.
#[derive(Clone, Debug, PartialEq)]
pub struct CoresetConfig {
    /// Fraction of training patches kept (0..=1).
    pub ratio: f64,
    /// Upper bound on memory-bank rows, whatever the ratio gives (bounds memory and kNN cost).
    pub max_rows: usize,
    /// Dimension of the random projection the selection runs in. 64 halves the cost of 128 and
    /// chose as well as the exact selection on Magnetic-Tile (README, "Fit speed").
    pub projection_dim: i64,
}

/// How each frame's patches find their nearest memory-bank rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// The whole bank, exactly (the paper's).
    Exact,
    /// Approximate on the CPU, over the `probes` nearest of about sqrt(bank rows) k-means
    /// cells: much faster on large banks, at a small measured accuracy cost (README, "Speed").
    /// A GPU always searches exactly.
    Approximate {
        /// Cells searched per patch (>= 1).
        probes: usize,
    },
    /// SPADE's image retrieval step (Cohen and Hoshen, "Sub-Image Anomaly Detection with Deep
    /// Pyramid Correspondences", 2020): only the rows of the `images` training images whose
    /// feature statistics are nearest to the frame's. Needs a bank fitted with it (each training
    /// image then keeps its own coreset, tagged with the image). Faster than a whole-bank search
    /// and, on Magnetic-Tile, more accurate (README).
    Retrieval {
        /// Training images searched per frame (>= 1).
        images: usize,
    },
}

/// How a frame's patch scores become its anomaly map.
#[derive(Clone, Debug, PartialEq)]
pub struct MapSmoothing {
    /// Standard deviation (input pixels) of the Gaussian that smooths the map (paper: 4).
    pub blur_sigma: f64,
    /// A second, wide smoothing (input pixels): each pixel scores at least the Gaussian-weighted
    /// mean of the patch scores around it at this scale. Small sharp defects keep the
    /// `blur_sigma` map's peaks; a large, low-contrast defect (a band of another texture, whose
    /// patches each look normal) is filled in from its border. Off by default: 32 raised pixel
    /// AUROC on Magnetic-Tile, but on the mean over the three shared sets it gained nothing and
    /// cost AUPRO and time (README, "Defaults chosen on the mean over every set").
    pub coarse_blur_sigma: Option<f64>,
    /// Feature-guided smoothing of each frame's patch scores before the map is drawn: each
    /// patch takes the mean score of the patches of the same frame that look like it, each
    /// weighed by exp(-|f_p - f_q|^2 / (2 b^2 m)) with b this bandwidth and m the frame's median
    /// squared feature distance, and by the Gaussian of `guided_sigma` on their distance. A
    /// defect region of one texture (uneven surface, say) then scores as a whole, its plain
    /// patches lifted by its most anomalous ones, without spreading into the different-looking
    /// normal surface around it (a bilateral filter, guided by the patch features instead of
    /// intensity). The image score is left as the paper's. Off by default: 0.45 raised pixel
    /// AUROC on Magnetic-Tile, but on the mean over the three shared sets it lowered pixel AUROC
    /// and AUPRO and cost a fifth of the frame time (README).
    pub guided_bandwidth: Option<f64>,
    /// Spatial reach (input pixels) of the feature-guided smoothing: the standard deviation of
    /// the Gaussian on the distance between two patches. Kept as given when the smoothing is off.
    pub guided_sigma: f64,
}

/// PatchCore settings (Roth et al., "Towards Total Recall in Industrial Anomaly Detection").
///
/// In model.json the settings are one flat object whose switches are "0 = off" (the file format
/// of every model written so far); here every option is typed, and
/// parsing that object checks it once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PatchCoreFile", into = "PatchCoreFile")]
pub struct PatchCoreConfig {
    /// Feature extractor and layers.
    pub backbone: BackboneConfig,
    /// Input size and normalisation. By default the aspect ratio is kept (at most 256x256's
    /// area), so that a texture keeps its scale in every image, whatever the part's outline;
    /// on Magnetic-Tile this raised pixel AUROC and AUPRO against a stretch (README). A
    /// model.json that names no `resize` (written before it existed) stretches, as fitted.
    pub preprocess: PreprocessConfig,
    /// Side of the local neighbourhood averaged around each patch (paper: 3).
    pub neighbourhood: i64,
    /// How the memory bank is chosen.
    pub coreset: CoresetConfig,
    /// Neighbours used for the paper's image-score reweighting.
    pub num_neighbors: i64,
    /// Local density normalisation (`None`: the paper's raw distances): each patch's distance to
    /// its nearest bank row is divided by that row's distance to its k-th nearest other row, so
    /// that a step off a tight cluster of normal patches (a smooth texture) counts as much as a
    /// longer one off a loose cluster (a streaky one), as in the local outlier factor. Off by
    /// default: 5 raised image AUROC on Magnetic-Tile, but lowered it on the mean over the three
    /// shared sets (screws 0.761 -> 0.588; README).
    pub density_neighbors: Option<i64>,
    /// How the bank is searched at inference.
    pub search: Search,
    /// How patch scores become the map.
    pub map: MapSmoothing,
    /// Seed of every random choice (projection, coreset start, search cells), for reproducible
    /// models.
    pub seed: u64,
}

impl Default for PatchCoreConfig {
    fn default() -> Self {
        Self {
            backbone: BackboneConfig::default(),
            preprocess: PreprocessConfig { resize: Resize::KeepAspect, ..PreprocessConfig::default() },
            neighbourhood: 3,
            coreset: CoresetConfig { ratio: 0.1, max_rows: 40_000, projection_dim: 64 },
            num_neighbors: 9,
            // Chosen on the mean over every shared set (README): the three per-frame extras
            // below are off; each is one fit option away.
            density_neighbors: None,
            search: Search::Exact,
            map: MapSmoothing { blur_sigma: 4.0, coarse_blur_sigma: None, guided_bandwidth: None, guided_sigma: 48.0 },
            seed: 0,
        }
    }
}

impl PatchCoreConfig {
    /// Checks ranges; call at the boundary (CLI, model file, parameters).
    pub fn validate(&self) -> Result<()> {
        let [h, w] = self.preprocess.image_size;
        if !(32..=2048).contains(&h) || !(32..=2048).contains(&w) {
            return Err(Error::Config(format!("image_size {h}x{w}: each side must be 32..=2048")));
        }
        self.preprocess.resize.validate()?;
        if !(self.coreset.ratio > 0.0 && self.coreset.ratio <= 1.0) {
            return Err(Error::Config(format!("coreset_ratio {}: must be in (0, 1]", self.coreset.ratio)));
        }
        if self.neighbourhood < 1 || self.neighbourhood % 2 == 0 {
            return Err(Error::Config(format!("neighbourhood {}: must be odd and >= 1", self.neighbourhood)));
        }
        if self.backbone.layers.is_empty() {
            return Err(Error::Config("backbone.layers is empty: name at least one layer".into()));
        }
        if self.num_neighbors < 1 || self.coreset.max_rows < 1 || self.coreset.projection_dim < 1 {
            return Err(Error::Config("num_neighbors, max_bank_size and coreset_projection_dim must be >= 1".into()));
        }
        match self.search {
            Search::Approximate { probes: 0 } | Search::Retrieval { images: 0 } => {
                return Err(Error::Config("knn_probes and retrieval_images count from 1 (0 = off)".into()))
            }
            Search::Exact | Search::Approximate { .. } | Search::Retrieval { .. } => {}
        }
        let map = &self.map;
        if !(map.blur_sigma >= 0.0) {
            return Err(Error::Config(format!("blur_sigma {}: must be >= 0", map.blur_sigma)));
        }
        if let Some(s) = map.coarse_blur_sigma.filter(|s| !(*s > 0.0 && *s <= 1024.0)) {
            return Err(Error::Config(format!("coarse_blur_sigma {s}: must be in 0..=1024 (0 = off)")));
        }
        if let Some(k) = self.density_neighbors.filter(|k| !(1..=1024).contains(k)) {
            return Err(Error::Config(format!("density_neighbors {k}: must be in 0..=1024 (0 = off)")));
        }
        if let Some(b) = map.guided_bandwidth.filter(|b| !(*b > 0.0 && *b <= 100.0)) {
            return Err(Error::Config(format!("guided_bandwidth {b}: must be in 0..=100 (0 = off)")));
        }
        if !(map.guided_sigma > 0.0 && map.guided_sigma <= 4096.0) {
            return Err(Error::Config(format!("guided_sigma {}: must be in (0, 4096] input pixels", map.guided_sigma)));
        }
        Ok(())
    }
}

/// [`PatchCoreConfig`] as model.json stores it: one flat object whose switches are "0 = off".
/// Keys added after the first models were written default to off, so that such a model scores,
/// and its maps and thresholds stay, as fitted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PatchCoreFile {
    backbone: BackboneConfig,
    #[serde(default)]
    preprocess: PreprocessConfig,
    neighbourhood: i64,
    coreset_ratio: f64,
    max_bank_size: usize,
    coreset_projection_dim: i64,
    num_neighbors: i64,
    blur_sigma: f64,
    #[serde(default)]
    coarse_blur_sigma: f64,
    #[serde(default)]
    density_neighbors: i64,
    #[serde(default)]
    guided_bandwidth: f64,
    guided_sigma: f64,
    seed: u64,
    knn_probes: usize,
    retrieval_images: usize,
}

impl Default for PatchCoreFile {
    /// Today's defaults for every key but the switches named above, which the field-level serde
    /// defaults turn off.
    fn default() -> Self {
        PatchCoreConfig::default().into()
    }
}

impl From<PatchCoreConfig> for PatchCoreFile {
    fn from(c: PatchCoreConfig) -> Self {
        let (knn_probes, retrieval_images) = c.search.switches();
        Self {
            backbone: c.backbone,
            preprocess: c.preprocess,
            neighbourhood: c.neighbourhood,
            coreset_ratio: c.coreset.ratio,
            max_bank_size: c.coreset.max_rows,
            coreset_projection_dim: c.coreset.projection_dim,
            num_neighbors: c.num_neighbors,
            blur_sigma: c.map.blur_sigma,
            coarse_blur_sigma: c.map.coarse_blur_sigma.unwrap_or(0.0),
            density_neighbors: c.density_neighbors.unwrap_or(0),
            guided_bandwidth: c.map.guided_bandwidth.unwrap_or(0.0),
            guided_sigma: c.map.guided_sigma,
            seed: c.seed,
            knn_probes,
            retrieval_images,
        }
    }
}

impl Search {
    /// The search the file format's (and the command line's) two "0 = off" switches name; both
    /// on is an error, since each speeds up the search in its own way.
    pub fn from_switches(knn_probes: usize, retrieval_images: usize) -> Result<Self> {
        match (knn_probes, retrieval_images) {
            (0, 0) => Ok(Search::Exact),
            (probes, 0) => Ok(Search::Approximate { probes }),
            (0, images) => Ok(Search::Retrieval { images }),
            (_, _) => Err(Error::Config(
                "retrieval_images and knn_probes both speed up the search in their own way: set one of them to 0".into(),
            )),
        }
    }

    /// The two switches (`knn_probes`, `retrieval_images`) of this search, 0 = off.
    pub fn switches(self) -> (usize, usize) {
        match self {
            Search::Exact => (0, 0),
            Search::Approximate { probes } => (probes, 0),
            Search::Retrieval { images } => (0, images),
        }
    }
}

impl TryFrom<PatchCoreFile> for PatchCoreConfig {
    type Error = Error;
    fn try_from(f: PatchCoreFile) -> Result<Self> {
        let search = Search::from_switches(f.knn_probes, f.retrieval_images)?;
        // "0 = off"; a negative value stays, for validate() to refuse with its range.
        let off_at_zero = |v: f64| (v != 0.0).then_some(v);
        let config = Self {
            backbone: f.backbone,
            preprocess: f.preprocess,
            neighbourhood: f.neighbourhood,
            coreset: CoresetConfig {
                ratio: f.coreset_ratio,
                max_rows: f.max_bank_size,
                projection_dim: f.coreset_projection_dim,
            },
            num_neighbors: f.num_neighbors,
            density_neighbors: (f.density_neighbors != 0).then_some(f.density_neighbors),
            search,
            map: MapSmoothing {
                blur_sigma: f.blur_sigma,
                coarse_blur_sigma: off_at_zero(f.coarse_blur_sigma),
                guided_bandwidth: off_at_zero(f.guided_bandwidth),
                guided_sigma: f.guided_sigma,
            },
            seed: f.seed,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Where DRAEM's simulated anomalies take their appearance from. The paper blends in textures
/// of the Describable Textures Dataset; nothing is downloaded here, so the default is the
/// training images themselves, randomly augmented and shuffled (a defect then looks like a
/// misplaced, recoloured piece of another part).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalySource {
    /// Other training images, randomly rotated, flipped and changed in tone and colour.
    #[default]
    TrainingImages,
    /// Procedural textures drawn on the fly: coloured fractal Perlin noise, stripes, spots.
    Procedural,
    /// The images of a folder (a texture collection, say), randomly augmented.
    Folder(PathBuf),
}

impl FromStr for AnomalySource {
    type Err = Error;
    /// `training_images` (or `training`), `procedural`, or the path of an existing folder.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "training_images" | "training" | "train" | "" => Ok(Self::TrainingImages),
            "procedural" => Ok(Self::Procedural),
            path if std::path::Path::new(path).is_dir() => Ok(Self::Folder(PathBuf::from(path))),
            other => Err(Error::Config(format!(
                "anomaly source '{other}': use training_images, procedural or an existing folder of images"
            ))),
        }
    }
}

/// Where SuperSimpleNet's image score comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ImageScore {
    /// Chosen by `fit` from the training data ([`ImageScore::for_supervision`]); a model file
    /// always holds one of the other two.
    #[default]
    Auto,
    /// The classification head's output (SuperSimpleNet).
    Classifier,
    /// The maximum of the smoothed anomaly map (SimpleNet).
    MapMax,
}

impl ImageScore {
    /// The score a fit under `supervision` uses: `Auto` becomes the map's maximum on good images
    /// only and the classification head once labelled defects exist; the others stay. Measured
    /// on the shared sets (README, "SuperSimpleNet's image score"): without labels the head
    /// learns only the simulated anomalies and the map's peak ranks real defects better on the
    /// mean (evaluation halves 0.685 -> 0.719); with 20 labelled defects the head is far ahead
    /// (screws 0.979 against 0.680).
    pub fn for_supervision(self, supervision: crate::dataset::Supervision) -> Self {
        match (self, supervision) {
            (Self::Auto, crate::dataset::Supervision::GoodOnly) => Self::MapMax,
            (Self::Auto, _) => Self::Classifier,
            (chosen, _) => chosen,
        }
    }

    /// How it is said in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Auto => "chosen by the labels found",
            Self::Classifier => "the classification head",
            Self::MapMax => "the anomaly map's maximum",
        }
    }
}

/// SuperSimpleNet settings (Rolih, Fučka, Skočaj, "No Label Left Behind: A Unified Surface
/// Defect Detection Model for all Supervision Regimes", JIM 2024; from SimpleNet, CVPR 2023).
/// The network shapes and the training run are here and are stored in model.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SuperSimpleNetConfig {
    /// Input size and normalisation (stretched to one size: the heads see a fixed grid).
    pub preprocess: PreprocessConfig,
    /// The frozen feature extractor and its layers (shallow to deep).
    pub backbone: BackboneConfig,
    /// The feature grid is the largest layer's size times this (paper: 2).
    pub upscale: i64,
    /// Side of the neighbourhood averaged around each feature (paper: 3).
    pub pool: i64,
    /// Hidden channels of the segmentation head's 1x1 layers (paper: 1024).
    pub seg_hidden: i64,
    /// Channels of the classification head's convolution (paper: 128).
    pub cls_channels: i64,
    /// Kernel side of the classification head's convolution (paper: 5).
    pub cls_kernel: i64,
    /// Standard deviation of the Gaussian noise that simulates anomalies in the features, which
    /// are standardised per channel first. The paper's 0.015 (on Wide-ResNet features) does not
    /// train on ours (loss flat); 1.0 was best on the mean over the shared sets (README).
    pub noise_std: f64,
    /// Perlin noise above this marks where noise is added (paper: 0.2).
    pub perlin_threshold: f64,
    /// Perlin cells per side as powers of two, inclusive (paper: 1 to 32).
    pub perlin_scale_log2: [u32; 2],
    /// Passes over the training images.
    pub epochs: usize,
    /// Images per optimiser step (each also seen with simulated anomalies: twice as many rows).
    pub batch_size: usize,
    /// Share of each batch drawn from the labelled defective images when there are any (the
    /// rest from the good ones), so that a few defects among many good images are in every
    /// step; 0 = one shuffle over all images. 0.25 was best on the mean over the shared sets
    /// with 20 labelled defects (README). Models written before it existed read 0.
    #[serde(default)]
    pub defect_share: f64,
    /// Largest change of brightness a good training image gets before its features are cached:
    /// each is scaled by a gain drawn from `1 ± brightness_jitter` (seeded), so that a cell's
    /// lighting drift is not taken for a defect (README, "Lighting drift"). Models written
    /// before it existed read 0.
    #[serde(default)]
    pub brightness_jitter: f64,
    /// AdamW learning rate of the feature adaptor (paper: 1e-4).
    pub adaptor_lr: f64,
    /// AdamW learning rate of the two heads (paper: 2e-4).
    pub head_lr: f64,
    /// AdamW weight decay of the adaptor (PyTorch's default, 1e-2) and of the heads (1e-5).
    pub weight_decay: [f64; 2],
    /// Fractions of the epochs after which the learning rates are multiplied by `lr_decay`.
    pub lr_milestones: Vec<f64>,
    /// Factor at each milestone (paper: 0.4).
    pub lr_decay: f64,
    /// Margin of the truncated L1 loss on the map logits (paper: 0.5).
    pub truncation: f64,
    /// Focal loss exponent (paper: 4).
    pub focal_gamma: f64,
    /// Standard deviation in pixels of the Gaussian blur of the upsampled map (paper: 4).
    pub blur_sigma: f64,
    /// Where the image score comes from: the classification head (the paper's), the map's
    /// maximum (SimpleNet's), or `auto` (the presets): the map's maximum when trained on good
    /// images only, the head with labelled defects. `fit` stores the one it used.
    pub image_score: ImageScore,
    /// Seed of the initial weights, the simulated anomalies and the order of the images.
    pub seed: u64,
}

impl Default for SuperSimpleNetConfig {
    fn default() -> Self {
        Self::cpu_small()
    }
}

impl SuperSimpleNetConfig {
    /// The paper's network and schedule at 256 px, on this project's EfficientNet-Lite0 features
    /// (the noise in the units of those features, see `noise_std`).
    pub fn paper() -> Self {
        Self {
            preprocess: PreprocessConfig { resize: Resize::Stretch, ..Default::default() },
            backbone: BackboneConfig::default(),
            upscale: 2,
            pool: 3,
            seg_hidden: 1024,
            cls_channels: 128,
            cls_kernel: 5,
            noise_std: 1.0,
            perlin_threshold: 0.2,
            perlin_scale_log2: [0, 5],
            epochs: 300,
            batch_size: 32,
            defect_share: 0.25,
            brightness_jitter: 0.0,
            adaptor_lr: 1e-4,
            head_lr: 2e-4,
            weight_decay: [1e-2, 1e-5],
            lr_milestones: vec![0.8, 0.9],
            lr_decay: 0.4,
            truncation: 0.5,
            focal_gamma: 4.0,
            blur_sigma: 4.0,
            image_score: ImageScore::Auto,
            seed: 0,
        }
    }

    /// Minutes on 2 CPU cores: the paper's feature grid without the upscaling, smaller heads and
    /// fewer epochs, and good images seen at up to ±10 % brightness (chosen by measurement:
    /// README, "SuperSimpleNet" and "Lighting drift").
    pub fn cpu_small() -> Self {
        Self { upscale: 1, seg_hidden: 256, cls_channels: 32, cls_kernel: 3, epochs: 40, brightness_jitter: 0.1, ..Self::paper() }
    }

    /// Checks ranges; call at the boundary (CLI, model file).
    pub fn validate(&self) -> Result<()> {
        let [h, w] = self.preprocess.image_size;
        if !(32..=2048).contains(&h) || !(32..=2048).contains(&w) {
            return Err(Error::Config(format!("image_size {h}x{w}: each side must be 32..=2048 for SuperSimpleNet")));
        }
        if self.preprocess.resize != Resize::Stretch {
            return Err(Error::Config("SuperSimpleNet trains on one stretched input size (no keep_aspect or tiles)".into()));
        }
        if self.backbone.layers.is_empty() {
            return Err(Error::Config("SuperSimpleNet needs at least one backbone layer".into()));
        }
        let ranges = [
            ("upscale", self.upscale, 1, 4),
            ("pool", self.pool, 1, 9),
            ("seg_hidden", self.seg_hidden, 1, 4096),
            ("cls_channels", self.cls_channels, 1, 1024),
            ("cls_kernel", self.cls_kernel, 1, 9),
        ];
        for (name, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return Err(Error::Config(format!("{name} {v}: must be {lo}..={hi}")));
            }
        }
        if self.pool % 2 == 0 || self.cls_kernel % 2 == 0 {
            return Err(Error::Config(format!(
                "pool {} and cls_kernel {} must be odd (the grid keeps its size)",
                self.pool, self.cls_kernel
            )));
        }
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(Error::Config("epochs and batch_size must be at least 1".into()));
        }
        if !(0.0..0.5).contains(&self.brightness_jitter) {
            return Err(Error::Config(format!("brightness_jitter {}: must be within 0..0.5", self.brightness_jitter)));
        }
        if !(0.0..=0.9).contains(&self.defect_share) {
            return Err(Error::Config(format!("defect_share {}: must be 0..=0.9", self.defect_share)));
        }
        let positive = [("noise_std", self.noise_std), ("adaptor_lr", self.adaptor_lr), ("head_lr", self.head_lr)];
        if let Some((name, v)) = positive.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::Config(format!("{name} {v}: must be a positive number")));
        }
        let [lo, hi] = self.perlin_scale_log2;
        if lo > hi || hi > 8 {
            return Err(Error::Config(format!("perlin_scale_log2 [{lo}, {hi}]: need lo <= hi <= 8")));
        }
        if !(self.lr_decay > 0.0 && self.lr_decay <= 1.0) || self.lr_milestones.iter().any(|m| !(0.0..=1.0).contains(m)) {
            return Err(Error::Config("lr_decay must be in (0, 1] and lr_milestones in [0, 1]".into()));
        }
        Ok(())
    }
}

/// DRAEM settings (Zavrtanik, Kristan, Skočaj, "DRAEM – A discriminatively trained
/// reconstruction embedding for surface anomaly detection", ICCV 2021). Everything that shapes
/// the networks or the training run is here and is stored in model.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DraemConfig {
    /// Input size and normalisation. Simulated anomalies are made, and SSIM is computed, on
    /// 0..1 pixel values; the networks see the normalised ones.
    pub preprocess: PreprocessConfig,
    /// Channels of the reconstructive sub-network's first block (paper: 128); deeper blocks
    /// use 2, 4 and 8 times as many. The discriminative U-Net uses half of it (paper: 64).
    pub base_width: i64,
    /// Optimiser steps (one batch each). The paper's 700 epochs of an MVTec AD category are
    /// about 20 000 steps of 8 images.
    pub steps: usize,
    /// Training images per step.
    pub batch_size: usize,
    /// Adam learning rate (paper: 1e-4).
    pub lr: f64,
    /// Fractions of `steps` after which the learning rate is multiplied by `lr_decay`
    /// (paper: after 80 % and 90 % of training, by 0.2).
    pub lr_milestones: Vec<f64>,
    /// Factor applied at each milestone.
    pub lr_decay: f64,
    /// Seed of the initial weights, the sample order and every simulated anomaly.
    pub seed: u64,
    /// Where simulated anomalies take their texture from.
    pub anomaly_source: AnomalySource,
    /// Probability that a training image gets a simulated anomaly (paper: 0.5).
    pub anomaly_probability: f64,
    /// Largest opacity factor beta: the anomaly keeps between `1 - max_beta` and all of the
    /// source texture, the rest is the image underneath (paper: 0.8).
    pub max_beta: f64,
    /// Range `[lo, hi]` of k: the Perlin noise has 2^k lattice cells per image side, drawn
    /// separately for each axis (paper: 0..=5, that is 1 to 32 cells).
    pub perlin_scale_log2: [u32; 2],
    /// Perlin noise above this value is anomalous (paper: 0.5).
    pub perlin_threshold: f64,
    /// Largest change of brightness of a training image: each image of each step is scaled by a
    /// gain drawn from `1 ± brightness_jitter` (seeded) before anomalies are simulated, so that a
    /// cell's lighting drift is not taken for a defect (README, "Lighting drift"). Models written
    /// before it existed read 0.
    #[serde(default)]
    pub brightness_jitter: f64,
    /// Side of the window the anomaly map is averaged over before its maximum is taken as the
    /// image score (paper: 21 at 256 px); odd.
    pub score_pool: i64,
}

impl Default for DraemConfig {
    fn default() -> Self {
        Self::paper()
    }
}

impl DraemConfig {
    /// The paper's setting: 256 px, base width 128 (about 97 M parameters), batch 8,
    /// Adam 1e-4, about 700 epochs of an MVTec AD category. Needs a GPU (hours on one).
    pub fn paper() -> Self {
        Self {
            preprocess: PreprocessConfig {
                image_size: [256, 256],
                normalization: Normalization::Imagenet,
                resize: Resize::Stretch,
            },
            base_width: 128,
            steps: 20_000,
            batch_size: 8,
            lr: 1e-4,
            lr_milestones: vec![0.8, 0.9],
            lr_decay: 0.2,
            seed: 0,
            anomaly_source: AnomalySource::TrainingImages,
            anomaly_probability: 0.5,
            max_beta: 0.8,
            perlin_scale_log2: [0, 5],
            perlin_threshold: 0.5,
            brightness_jitter: 0.0,
            score_pool: 21,
        }
    }

    /// A setting that trains on 2 CPU cores in a few minutes: 128 px, base width 16 (about
    /// 1.5 M parameters), batch 4, 600 steps, a higher learning rate to make the short run
    /// count, the score window scaled with the image, and training images at up to ±10 %
    /// brightness (README, "Lighting drift").
    pub fn cpu_small() -> Self {
        Self {
            preprocess: PreprocessConfig { image_size: [128, 128], ..Default::default() },
            base_width: 16,
            steps: 600,
            batch_size: 4,
            lr: 5e-4,
            perlin_scale_log2: [0, 4],
            brightness_jitter: 0.1,
            score_pool: 11,
            ..Self::paper()
        }
    }

    /// Channels of the discriminative U-Net's first block: half the base width (paper 64 for 128).
    pub fn discriminative_width(&self) -> i64 {
        (self.base_width / 2).max(1)
    }

    /// Checks ranges; call at the boundary (CLI, model file, parameters).
    pub fn validate(&self) -> Result<()> {
        let [h, w] = self.preprocess.image_size;
        // Five 2x poolings in the discriminative encoder: at 64 px its deepest map is 2x2.
        if !(64..=2048).contains(&h) || !(64..=2048).contains(&w) {
            return Err(Error::Config(format!("image_size {h}x{w}: each side must be 64..=2048 for DRAEM")));
        }
        if self.preprocess.resize != Resize::Stretch {
            return Err(Error::Config(
                "resize keep_aspect and tiles are for PatchCore; DRAEM trains on one stretched input size".into(),
            ));
        }
        if !(2..=512).contains(&self.base_width) {
            return Err(Error::Config(format!("base_width {}: must be 2..=512 (paper: 128)", self.base_width)));
        }
        if self.steps == 0 || self.batch_size == 0 {
            return Err(Error::Config("steps and batch_size must be >= 1".into()));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::Config(format!("lr {}: must be > 0", self.lr)));
        }
        if self.lr_milestones.iter().any(|m| !(*m > 0.0 && *m <= 1.0)) || !(self.lr_decay > 0.0 && self.lr_decay <= 1.0) {
            return Err(Error::Config("lr_milestones must be fractions in (0, 1] and lr_decay in (0, 1]".into()));
        }
        if !(0.0..0.5).contains(&self.brightness_jitter) {
            return Err(Error::Config(format!("brightness_jitter {}: must be within 0..0.5", self.brightness_jitter)));
        }
        if !(0.0..=1.0).contains(&self.anomaly_probability) {
            return Err(Error::Config(format!("anomaly_probability {}: must be within 0..=1", self.anomaly_probability)));
        }
        if !(0.0..1.0).contains(&self.max_beta) {
            return Err(Error::Config(format!("max_beta {}: must be within 0..1", self.max_beta)));
        }
        let [lo, hi] = self.perlin_scale_log2;
        if lo > hi || hi > 8 {
            return Err(Error::Config(format!("perlin_scale_log2 [{lo}, {hi}]: need lo <= hi <= 8")));
        }
        if !(self.perlin_threshold > -1.0 && self.perlin_threshold < 1.0) {
            return Err(Error::Config(format!("perlin_threshold {}: must be within (-1, 1)", self.perlin_threshold)));
        }
        if self.score_pool < 1 || self.score_pool % 2 == 0 {
            return Err(Error::Config(format!("score_pool {}: must be odd and >= 1", self.score_pool)));
        }
        Ok(())
    }
}

/// Post-processing: anomaly map to defect regions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostprocessConfig {
    /// Regions smaller than this many input-image pixels are ignored.
    pub min_region_area: u32,
}

impl Default for PostprocessConfig {
    fn default() -> Self {
        Self { min_region_area: 25 }
    }
}

/// Default location of the converted ImageNet EfficientNet-Lite0 weights (made by the set-up).
pub fn default_backbone_weights() -> PathBuf {
    crate::project_root().join("models/efficientnet_lite0.safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_image_score_is_the_map_maximum_without_labels_and_the_head_with_them() {
        use crate::dataset::Supervision::*;
        assert_eq!(SuperSimpleNetConfig::cpu_small().image_score, ImageScore::Auto);
        assert_eq!(ImageScore::Auto.for_supervision(GoodOnly), ImageScore::MapMax);
        for labelled in [ImageLabels, PixelMasks, Mixed] {
            assert_eq!(ImageScore::Auto.for_supervision(labelled), ImageScore::Classifier);
            assert_eq!(ImageScore::MapMax.for_supervision(labelled), ImageScore::MapMax, "a choice stays");
        }
        assert_eq!(ImageScore::Classifier.for_supervision(GoodOnly), ImageScore::Classifier);
    }

    #[test]
    fn draem_presets_are_valid_and_serde_fills_defaults() {
        for cfg in [DraemConfig::paper(), DraemConfig::cpu_small(), DraemConfig::default()] {
            cfg.validate().unwrap();
        }
        assert_eq!(DraemConfig::paper().base_width, 128);
        assert_eq!(DraemConfig::paper().discriminative_width(), 64);
        assert_eq!(DraemConfig::paper().lr, 1e-4);
        let partial: DraemConfig =
            serde_json::from_str(r#"{"base_width": 8, "anomaly_source": {"folder": "/textures"}}"#).unwrap();
        assert_eq!(partial.base_width, 8);
        assert_eq!(partial.steps, DraemConfig::default().steps);
        assert_eq!(partial.anomaly_source, AnomalySource::Folder("/textures".into()));
        let json = serde_json::to_string(&DraemConfig::cpu_small()).unwrap();
        assert_eq!(serde_json::from_str::<DraemConfig>(&json).unwrap(), DraemConfig::cpu_small());
        assert!(serde_json::from_str::<DraemConfig>(r#"{"base_widht": 8}"#).is_err(), "typos are refused");
        // A model written before the brightness jitter existed was trained without it.
        assert_eq!(partial.brightness_jitter, 0.0);
    }

    #[test]
    fn supersimplenet_presets_are_valid_and_old_models_read_no_brightness_jitter() {
        for cfg in [SuperSimpleNetConfig::paper(), SuperSimpleNetConfig::cpu_small()] {
            cfg.validate().unwrap();
        }
        // The CPU presets learn lighting drift (README, "Lighting drift"); the paper's stay the paper's.
        assert_eq!(SuperSimpleNetConfig::cpu_small().brightness_jitter, 0.1);
        assert_eq!(DraemConfig::cpu_small().brightness_jitter, 0.1);
        assert_eq!((SuperSimpleNetConfig::paper().brightness_jitter, DraemConfig::paper().brightness_jitter), (0.0, 0.0));
        let old: SuperSimpleNetConfig = serde_json::from_str(r#"{"epochs": 3}"#).unwrap();
        assert_eq!((old.epochs, old.brightness_jitter, old.defect_share), (3, 0.0, 0.0));
        for jitter in [0.5, -0.1, f64::NAN] {
            let c = SuperSimpleNetConfig { brightness_jitter: jitter, ..SuperSimpleNetConfig::cpu_small() };
            assert!(c.validate().unwrap_err().to_string().contains("brightness_jitter"), "{jitter}");
        }
    }

    #[test]
    fn a_patchcore_model_json_from_before_the_coarse_map_and_density_keeps_them_off() {
        assert_eq!(PatchCoreConfig::default().map.coarse_blur_sigma, None);
        assert_eq!(PatchCoreConfig::default().density_neighbors, None);
        assert_eq!(PatchCoreConfig::default().map.guided_bandwidth, None);
        let old: PatchCoreConfig = serde_json::from_str(r#"{"blur_sigma": 4.0, "coreset_ratio": 0.1}"#).unwrap();
        assert_eq!(old.map.coarse_blur_sigma, None, "an older model's maps and thresholds stay as fitted");
        assert_eq!(old.density_neighbors, None, "an older model's scores and thresholds stay as fitted");
        assert_eq!(old.map.guided_bandwidth, None, "an older model's maps stay as fitted");
        assert_eq!(PatchCoreConfig::default().preprocess.resize, Resize::KeepAspect);
        assert_eq!(old.preprocess.resize, Resize::Stretch, "an older model.json has its preprocess, stretch if it names none");
        assert_eq!(old.neighbourhood, PatchCoreConfig::default().neighbourhood, "other absent keys take the defaults");
        let json = serde_json::to_string(&PatchCoreConfig::default()).unwrap();
        assert_eq!(serde_json::from_str::<PatchCoreConfig>(&json).unwrap(), PatchCoreConfig::default());
        let with_map = |f: fn(&mut MapSmoothing)| {
            let mut c = PatchCoreConfig::default();
            f(&mut c.map);
            c.validate().unwrap_err().to_string()
        };
        assert!(with_map(|m| m.coarse_blur_sigma = Some(-1.0)).contains("coarse_blur_sigma"));
        assert!(with_map(|m| m.guided_bandwidth = Some(f64::NAN)).contains("guided_bandwidth"));
        assert!(with_map(|m| m.guided_sigma = 0.0).contains("guided_sigma"));
        let bad = PatchCoreConfig { density_neighbors: Some(-1), ..PatchCoreConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("density_neighbors"));
    }

    #[test]
    fn model_json_switches_become_typed_options_and_round_trip_as_written() {
        // The flat form every model.json has: "0 = off", the two search speed-ups exclusive.
        let json = r#"{"knn_probes": 4, "coarse_blur_sigma": 0, "density_neighbors": 7, "guided_bandwidth": 0,
                       "guided_sigma": 20, "max_bank_size": 150}"#;
        let c: PatchCoreConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.search, Search::Approximate { probes: 4 });
        assert_eq!((c.map.coarse_blur_sigma, c.map.guided_bandwidth, c.map.guided_sigma), (None, None, 20.0));
        assert_eq!((c.density_neighbors, c.coreset.max_rows), (Some(7), 150));
        let written = serde_json::to_value(&c).unwrap();
        for (key, value) in [("knn_probes", 4.0), ("retrieval_images", 0.0), ("coarse_blur_sigma", 0.0), ("guided_sigma", 20.0)] {
            assert_eq!(written[key].as_f64(), Some(value), "{key}: {written}");
        }
        let retrieval: PatchCoreConfig = serde_json::from_str(r#"{"retrieval_images": 3}"#).unwrap();
        assert_eq!(retrieval.search, Search::Retrieval { images: 3 });
        let both = serde_json::from_str::<PatchCoreConfig>(r#"{"retrieval_images": 3, "knn_probes": 2}"#).unwrap_err();
        assert!(both.to_string().contains("set one of them to 0"), "{both}");
        let negative = serde_json::from_str::<PatchCoreConfig>(r#"{"coarse_blur_sigma": -2}"#).unwrap_err();
        assert!(negative.to_string().contains("coarse_blur_sigma -2"), "{negative}");
        assert!(serde_json::from_str::<PatchCoreConfig>(r#"{"blur_sigmaa": 2}"#).is_err(), "typos are refused");
    }

    #[test]
    fn tiles_are_written_with_their_settings_and_checked() {
        let mut c = PatchCoreConfig::default();
        c.preprocess.resize = Resize::tiles(0.5);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["preprocess"]["resize"], serde_json::json!({"tiles": {"scale": 0.5, "overlap": 0.25}}), "{json}");
        assert_eq!(serde_json::from_value::<PatchCoreConfig>(json).unwrap(), c);
        c.validate().unwrap();
        for (scale, overlap, what) in
            [(0.0, 0.25, "scale"), (5.0, 0.25, "scale"), (f64::NAN, 0.25, "scale"), (1.0, 0.8, "overlap")]
        {
            c.preprocess.resize = Resize::Tiles { scale, overlap };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("tiles {what}")), "{e}");
        }
        let mut d = DraemConfig::cpu_small();
        d.preprocess.resize = Resize::tiles(1.0);
        assert!(d.validate().unwrap_err().to_string().contains("for PatchCore"));
    }

    #[test]
    fn draem_validation_and_anomaly_source_parsing() {
        let bad = |f: fn(&mut DraemConfig)| {
            let mut c = DraemConfig::cpu_small();
            f(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.preprocess.image_size = [32, 128]));
        assert!(bad(|c| c.base_width = 1));
        assert!(bad(|c| c.steps = 0));
        assert!(bad(|c| c.lr = 0.0));
        assert!(bad(|c| c.score_pool = 4));
        assert!(bad(|c| c.max_beta = 1.0));
        assert!(bad(|c| c.perlin_scale_log2 = [3, 2]));
        assert!(bad(|c| c.lr_milestones = vec![1.5]));
        assert!(bad(|c| c.brightness_jitter = 0.5));
        assert!(bad(|c| c.brightness_jitter = f64::NAN));
        assert_eq!("procedural".parse::<AnomalySource>().unwrap(), AnomalySource::Procedural);
        assert_eq!("training_images".parse::<AnomalySource>().unwrap(), AnomalySource::TrainingImages);
        let dir = std::env::temp_dir();
        assert_eq!(dir.to_str().unwrap().parse::<AnomalySource>().unwrap(), AnomalySource::Folder(dir.clone()));
        assert!("/no/such/folder".parse::<AnomalySource>().is_err());
    }
}
