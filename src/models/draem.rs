//! DRAEM: Zavrtanik, Kristan, Skočaj, "DRAEM – A discriminatively trained reconstruction
//! embedding for surface anomaly detection", ICCV 2021.
//!
//! Two networks are trained together on defect-free images into which anomalies are simulated
//! ([`crate::models::perlin`]): a reconstructive encoder-decoder learns to turn an image with
//! a simulated anomaly back into the clean image, and a discriminative U-Net, given the image
//! and its reconstruction side by side, learns to segment where they differ. Nothing is
//! pretrained. At inference the U-Net's anomaly probability (softmax channel 1) is the anomaly
//! map; the image score is the maximum of that map averaged over a `score_pool`² window.
//!
//! Variable names mirror anomalib's `DraemModel` state dict
//! (`reconstructive_subnetwork.encoder.block1.0.weight`, ...,
//! `discriminative_subnetwork.decoder_segment.fin_out.0.bias`; BatchNorm without
//! `num_batches_tracked`), so an anomalib checkpoint converted to safetensors (prefix `model.`
//! removed) loads with `base_width` 128.
//!
//! Unlike the reference code, every upsampling goes to the exact size of the matching encoder
//! level, so any input of at least 32 px per side works, not only multiples of 32.
use std::fmt;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::config::DraemConfig;
use crate::error::{Error, Result};
use crate::models::layers::BatchNorm;
use crate::models::ModelOutput;

const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;
/// Smallest input side: the discriminative encoder halves the input five times.
pub const MIN_INPUT_SIDE: i64 = 32;

/// Whether BatchNorm uses batch statistics (and updates its running ones) or the running ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Train,
    Eval,
}

/// Source of initial values: a seeded generator, or none (zeros, to be overwritten by a load).
type InitRng = Option<ChaCha8Rng>;

/// `[shape]` uniform in `-bound..bound` from `rng`, or zeros without one.
fn uniform(rng: &mut InitRng, shape: &[i64], bound: f64) -> Result<Tensor> {
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = match rng {
        Some(r) => (0..n).map(|_| r.gen_range(-bound as f32..bound as f32)).collect(),
        None => vec![0.0; n as usize],
    };
    Ok(Tensor::f_from_slice(&values)?.f_view(shape)?)
}

/// 3x3 convolution, padding 1 (`nn.Conv2d(c_in, c_out, 3, padding=1)`).
#[derive(Debug)]
struct Conv3x3 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv3x3 {
    fn new(vars: &nn::Path, c_in: i64, c_out: i64, rng: &mut InitRng) -> Result<Self> {
        let fan_in = (c_in * 9) as f64;
        // He et al. uniform for ReLU networks; bias as PyTorch does it.
        let weight = uniform(rng, &[c_out, c_in, 3, 3], (6.0 / fan_in).sqrt())?;
        let bias = uniform(rng, &[c_out], 1.0 / fan_in.sqrt())?;
        Ok(Self { weight: vars.f_var_copy("weight", &weight)?, bias: vars.f_var_copy("bias", &bias)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_conv2d(&self.weight, Some(&self.bias), [1, 1], [1, 1], [1, 1], 1)?)
    }
}

/// Conv 3x3 -> BatchNorm -> ReLU, with the conv at `vars/conv_key` and the norm at `vars/bn_key`
/// (the indices of the layers inside anomalib's `nn.Sequential`).
#[derive(Debug)]
struct ConvBnRelu {
    conv: Conv3x3,
    bn: BatchNorm,
}

impl ConvBnRelu {
    fn new(vars: &nn::Path, keys: (&str, &str), c_in: i64, c_out: i64, rng: &mut InitRng) -> Result<Self> {
        Ok(Self { conv: Conv3x3::new(&(vars / keys.0), c_in, c_out, rng)?, bn: BatchNorm::new(&(vars / keys.1), c_out, BN_EPS)? })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        let y = match mode {
            Mode::Train => self.bn.training(&y, BN_MOMENTUM)?,
            Mode::Eval => self.bn.inference(&y)?,
        };
        Ok(y.f_relu()?)
    }
}

/// Two ConvBnRelu (`Sequential` indices 0,1 and 3,4): `[N, c_in, h, w]` -> `[N, c_out, h, w]`.
#[derive(Debug)]
struct DoubleConv {
    first: ConvBnRelu,
    second: ConvBnRelu,
}

impl DoubleConv {
    fn new(vars: &nn::Path, c_in: i64, c_mid: i64, c_out: i64, rng: &mut InitRng) -> Result<Self> {
        Ok(Self {
            first: ConvBnRelu::new(vars, ("0", "1"), c_in, c_mid, rng)?,
            second: ConvBnRelu::new(vars, ("3", "4"), c_mid, c_out, rng)?,
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.second.forward(&self.first.forward(x, mode)?, mode)
    }
}

/// Bilinear upsampling (align_corners) to a given size, then ConvBnRelu (indices 1, 2).
#[derive(Debug)]
struct Up {
    conv: ConvBnRelu,
}

impl Up {
    fn new(vars: &nn::Path, c_in: i64, c_out: i64, rng: &mut InitRng) -> Result<Self> {
        Ok(Self { conv: ConvBnRelu::new(vars, ("1", "2"), c_in, c_out, rng)? })
    }

    /// `[N, c_in, h, w]` -> `[N, c_out, size.0, size.1]`.
    fn forward(&self, x: &Tensor, size: (i64, i64), mode: Mode) -> Result<Tensor> {
        let up = x.f_upsample_bilinear2d([size.0, size.1], true, None, None)?;
        self.conv.forward(&up, mode)
    }
}

fn max_pool(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?)
}

fn spatial(x: &Tensor) -> (i64, i64) {
    let s = x.size();
    (s[2], s[3])
}

/// The reconstructive sub-network: an encoder-decoder without skip connections,
/// `[N, 3, H, W]` -> `[N, 3, H, W]` (no output activation, like the reference).
#[derive(Debug)]
pub struct ReconstructiveSubNetwork {
    encoder: [DoubleConv; 5],
    up: [Up; 4],
    db: [DoubleConv; 4],
    fin_out: Conv3x3,
}

impl ReconstructiveSubNetwork {
    fn new(vars: &nn::Path, b: i64, rng: &mut InitRng) -> Result<Self> {
        let enc = vars / "encoder";
        let dec = vars / "decoder";
        let encoder = [
            DoubleConv::new(&(&enc / "block1"), 3, b, b, rng)?,
            DoubleConv::new(&(&enc / "block2"), b, 2 * b, 2 * b, rng)?,
            DoubleConv::new(&(&enc / "block3"), 2 * b, 4 * b, 4 * b, rng)?,
            DoubleConv::new(&(&enc / "block4"), 4 * b, 8 * b, 8 * b, rng)?,
            DoubleConv::new(&(&enc / "block5"), 8 * b, 8 * b, 8 * b, rng)?,
        ];
        let up = [
            Up::new(&(&dec / "up1"), 8 * b, 8 * b, rng)?,
            Up::new(&(&dec / "up2"), 4 * b, 4 * b, rng)?,
            Up::new(&(&dec / "up3"), 2 * b, 2 * b, rng)?,
            Up::new(&(&dec / "up4"), b, b, rng)?,
        ];
        let db = [
            DoubleConv::new(&(&dec / "db1"), 8 * b, 8 * b, 4 * b, rng)?,
            DoubleConv::new(&(&dec / "db2"), 4 * b, 4 * b, 2 * b, rng)?,
            DoubleConv::new(&(&dec / "db3"), 2 * b, 2 * b, b, rng)?,
            DoubleConv::new(&(&dec / "db4"), b, b, b, rng)?,
        ];
        let fin_out = Conv3x3::new(&(&dec / "fin_out" / "0"), b, 3, rng)?;
        Ok(Self { encoder, up, db, fin_out })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        // Encoder: block1 at full size, then pool-block four times; remember the sizes so the
        // decoder returns to them exactly (odd sizes included).
        let mut sizes = Vec::with_capacity(4);
        let mut h = self.encoder[0].forward(x, mode)?;
        for block in &self.encoder[1..] {
            sizes.push(spatial(&h));
            h = block.forward(&max_pool(&h)?, mode)?;
        }
        for (i, (up, db)) in self.up.iter().zip(&self.db).enumerate() {
            h = db.forward(&up.forward(&h, sizes[3 - i], mode)?, mode)?;
        }
        self.fin_out.forward(&h)
    }
}

/// The discriminative sub-network: a U-Net with six encoder levels,
/// `[N, 6, H, W]` (image and reconstruction) -> `[N, 2, H, W]` logits (normal, anomalous).
#[derive(Debug)]
pub struct DiscriminativeSubNetwork {
    encoder: [DoubleConv; 6],
    up: [Up; 5],
    db: [DoubleConv; 5],
    fin_out: Conv3x3,
}

impl DiscriminativeSubNetwork {
    fn new(vars: &nn::Path, b: i64, rng: &mut InitRng) -> Result<Self> {
        let enc = vars / "encoder_segment";
        let dec = vars / "decoder_segment";
        let encoder = [
            DoubleConv::new(&(&enc / "block1"), 6, b, b, rng)?,
            DoubleConv::new(&(&enc / "block2"), b, 2 * b, 2 * b, rng)?,
            DoubleConv::new(&(&enc / "block3"), 2 * b, 4 * b, 4 * b, rng)?,
            DoubleConv::new(&(&enc / "block4"), 4 * b, 8 * b, 8 * b, rng)?,
            DoubleConv::new(&(&enc / "block5"), 8 * b, 8 * b, 8 * b, rng)?,
            DoubleConv::new(&(&enc / "block6"), 8 * b, 8 * b, 8 * b, rng)?,
        ];
        let up = [
            Up::new(&(&dec / "up_b"), 8 * b, 8 * b, rng)?,
            Up::new(&(&dec / "up1"), 8 * b, 4 * b, rng)?,
            Up::new(&(&dec / "up2"), 4 * b, 2 * b, rng)?,
            Up::new(&(&dec / "up3"), 2 * b, b, rng)?,
            Up::new(&(&dec / "up4"), b, b, rng)?,
        ];
        let db = [
            DoubleConv::new(&(&dec / "db_b"), 16 * b, 8 * b, 8 * b, rng)?,
            DoubleConv::new(&(&dec / "db1"), 12 * b, 4 * b, 4 * b, rng)?,
            DoubleConv::new(&(&dec / "db2"), 6 * b, 2 * b, 2 * b, rng)?,
            DoubleConv::new(&(&dec / "db3"), 3 * b, b, b, rng)?,
            DoubleConv::new(&(&dec / "db4"), 2 * b, b, b, rng)?,
        ];
        let fin_out = Conv3x3::new(&(&dec / "fin_out" / "0"), b, 2, rng)?;
        Ok(Self { encoder, up, db, fin_out })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        // Each encoder level's output is the skip of the decoder level of the same size.
        let mut h = self.encoder[0].forward(x, mode)?;
        let mut skips = Vec::with_capacity(self.encoder.len());
        for block in &self.encoder[1..] {
            let next = block.forward(&max_pool(&h)?, mode)?;
            skips.push(std::mem::replace(&mut h, next));
        }
        for (up, db) in self.up.iter().zip(&self.db) {
            let Some(skip) = skips.pop() else {
                return Err(Error::Config("DRAEM's decoder has more levels than its encoder".into()));
            };
            let u = up.forward(&h, spatial(&skip), mode)?;
            h = db.forward(&Tensor::f_cat(&[u, skip], 1)?, mode)?;
        }
        self.fin_out.forward(&h)
    }
}

/// What a training pass returns (gradients tracked).
#[derive(Debug)]
pub struct TrainOutput {
    /// `[N, 3, H, W]` reconstruction, in the input's normalised space.
    pub reconstruction: Tensor,
    /// `[N, 2, H, W]` discriminative logits (channel 1 = anomalous).
    pub logits: Tensor,
}

/// The two DRAEM networks. Built with random (seeded) weights by [`DraemNet::new`] for
/// training; the model that inspects images is a trained [`Draem`].
#[derive(Debug)]
pub struct DraemNet {
    reconstructive: ReconstructiveSubNetwork,
    discriminative: DiscriminativeSubNetwork,
    score_pool: i64,
}

impl DraemNet {
    /// Creates the variables under `vars` (`reconstructive_subnetwork.*`,
    /// `discriminative_subnetwork.*`) with weights drawn from `config.seed` (He-uniform
    /// convolutions, unit BatchNorm), independent of libtorch's global generator.
    pub fn new(config: &DraemConfig, vars: &nn::Path) -> Result<Self> {
        let mut rng = Some(ChaCha8Rng::seed_from_u64(config.seed ^ 0xD4AE_0000_0000_0001));
        Self::build(vars, config, &mut rng)
    }

    /// The variables with zero weights, to be overwritten by a load.
    fn for_loading(vars: &nn::Path, config: &DraemConfig) -> Result<Self> {
        Self::build(vars, config, &mut None)
    }

    fn build(vars: &nn::Path, config: &DraemConfig, rng: &mut InitRng) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            reconstructive: ReconstructiveSubNetwork::new(&(vars / "reconstructive_subnetwork"), config.base_width, rng)?,
            discriminative: DiscriminativeSubNetwork::new(
                &(vars / "discriminative_subnetwork"),
                config.discriminative_width(),
                rng,
            )?,
            score_pool: config.score_pool,
        })
    }

    fn check_input(x: &Tensor) -> Result<()> {
        let s = x.size();
        if s.len() != 4 || s[1] != 3 || s[2] < MIN_INPUT_SIDE || s[3] < MIN_INPUT_SIDE {
            return Err(Error::BadImage(format!("DRAEM expects [N, 3, H, W] with H, W >= {MIN_INPUT_SIDE}, got {s:?}")));
        }
        Ok(())
    }

    fn run(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        Self::check_input(x)?;
        let reconstruction = self.reconstructive.forward(x, mode)?;
        let joined = Tensor::f_cat(&[x, &reconstruction], 1)?;
        let logits = self.discriminative.forward(&joined, mode)?;
        Ok((reconstruction, logits))
    }

    /// Inference on a normalised batch `[N, 3, H, W]` (running BatchNorm statistics, no
    /// gradients): anomaly maps `[N, 1, H, W]` = softmax channel 1 of the logits, image scores
    /// `[N]` = max of the maps averaged over `score_pool`² windows.
    pub fn forward(&self, x: &Tensor) -> Result<ModelOutput> {
        let _guard = tch::no_grad_guard();
        let (_, logits) = self.run(x, Mode::Eval)?;
        let anomaly_maps = logits.f_softmax(1, Kind::Float)?.f_narrow(1, 1, 1)?;
        let image_scores = image_scores(&anomaly_maps, self.score_pool)?;
        Ok(ModelOutput { image_scores, anomaly_maps })
    }

    /// Inference that also returns the reconstruction: (`[N, 3, H, W]` reconstruction in the
    /// input's normalised space, [`ModelOutput`]). For looking at what the model does.
    pub fn forward_with_reconstruction(&self, x: &Tensor) -> Result<(Tensor, ModelOutput)> {
        let _guard = tch::no_grad_guard();
        let (reconstruction, logits) = self.run(x, Mode::Eval)?;
        let anomaly_maps = logits.f_softmax(1, Kind::Float)?.f_narrow(1, 1, 1)?;
        let image_scores = image_scores(&anomaly_maps, self.score_pool)?;
        Ok((reconstruction, ModelOutput { image_scores, anomaly_maps }))
    }

    /// Training pass on a normalised batch `[N, 3, H, W]` (N >= 2 advisable): BatchNorm uses
    /// and updates batch statistics, gradients are tracked. Returns the reconstruction
    /// `[N, 3, H, W]` and the logits `[N, 2, H, W]`.
    pub fn forward_train(&self, x: &Tensor) -> Result<TrainOutput> {
        let (reconstruction, logits) = self.run(x, Mode::Train)?;
        Ok(TrainOutput { reconstruction, logits })
    }
}

/// Image scores `[N]` of anomaly maps `[N, 1, H, W]`: the maximum of the maps averaged over
/// `pool`² windows (stride 1, zero padding counted, as in the reference code).
pub fn image_scores(maps: &Tensor, pool: i64) -> Result<Tensor> {
    let pooled = if pool > 1 {
        maps.f_avg_pool2d([pool, pool], [1, 1], [pool / 2, pool / 2], false, true, None)?
    } else {
        maps.shallow_clone()
    };
    let n = pooled.size()[0];
    Ok(pooled.f_reshape([n, -1])?.f_amax([1i64].as_slice(), false)?)
}

/// Loss values of a step (or means over steps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Losses {
    /// Mean squared error of the reconstruction (0..1 pixel values).
    pub l2: f64,
    /// 1 - SSIM of the reconstruction.
    pub ssim: f64,
    /// Focal loss of the predicted mask.
    pub focal: f64,
    /// The sum that is minimised.
    pub total: f64,
}

/// How a DRAEM model was trained, for logs and model.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DraemFitSummary {
    /// Training images (held-out ones excluded).
    pub n_images: usize,
    /// Optimiser steps in all (over every resumed run).
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// The step this run resumed from; None when it started from scratch.
    pub resumed_from_step: Option<usize>,
    /// Trainable parameters.
    pub parameters: i64,
    /// Seconds spent training in this run.
    pub train_seconds: f64,
    /// Mean losses over the last (up to 50) steps.
    pub final_losses: Losses,
}

/// A trained DRAEM model: the networks, their variables and the configuration they were built
/// with. Get one from [`crate::training::fit_draem`] or load one with [`Draem::load`].
pub struct Draem {
    vars: nn::VarStore,
    net: DraemNet,
    config: DraemConfig,
}

impl fmt::Debug for Draem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Draem")
            .field("device", &self.vars.device())
            .field("base_width", &self.config.base_width)
            .field("image_size", &self.config.preprocess.image_size)
            .finish()
    }
}

impl Draem {
    /// Loads the networks `config` describes from weights written by [`Draem::save`]
    /// (safetensors at `path`) onto `device`.
    pub fn load(config: &DraemConfig, path: &Path, device: Device) -> Result<Self> {
        let mut vars = nn::VarStore::new(device);
        let net = DraemNet::for_loading(&vars.root(), config)?;
        vars.load(path).map_err(|e| {
            Error::model(path, format!("cannot load DRAEM weights ({e}); is base_width {} right?", config.base_width))
        })?;
        Ok(Self { vars, net, config: config.clone() })
    }

    /// Wraps trained networks (the training loop's result).
    pub(crate) fn from_trained(vars: nn::VarStore, net: DraemNet, config: &DraemConfig) -> Self {
        Self { vars, net, config: config.clone() }
    }

    /// Writes the weights (every variable, BatchNorm running statistics included) to a
    /// safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.vars.save(path).map_err(|e| Error::model(path, format!("cannot write DRAEM weights: {e}")))
    }

    /// Scores a normalised batch `[N, 3, H, W]`: image scores `[N]`, anomaly maps `[N, 1, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<ModelOutput> {
        self.net.forward(x)
    }

    /// The networks.
    pub fn net(&self) -> &DraemNet {
        &self.net
    }

    /// The configuration the model was built and trained with.
    pub fn config(&self) -> &DraemConfig {
        &self.config
    }

    /// The variables (weights and BatchNorm statistics).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vars
    }
}

/// Trainable parameters in `vars`.
pub fn parameter_count(vars: &nn::VarStore) -> i64 {
    vars.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(base_width: i64) -> DraemConfig {
        DraemConfig {
            base_width,
            preprocess: crate::config::PreprocessConfig { image_size: [64, 64], ..Default::default() },
            ..DraemConfig::cpu_small()
        }
    }

    #[test]
    fn shapes_for_odd_sizes() {
        let vars = nn::VarStore::new(Device::Cpu);
        let net = DraemNet::new(&small(4), &vars.root()).unwrap();
        for (h, w) in [(64, 64), (65, 71), (33, 97), (32, 32)] {
            let x = Tensor::randn([2, 3, h, w], (Kind::Float, Device::Cpu));
            let out = net.forward(&x).unwrap();
            assert_eq!(out.anomaly_maps.size(), vec![2, 1, h, w]);
            assert_eq!(out.image_scores.size(), vec![2]);
            let p = &out.anomaly_maps;
            assert!(p.min().double_value(&[]) >= 0.0 && p.max().double_value(&[]) <= 1.0);
            let t = net.forward_train(&x).unwrap();
            assert_eq!(t.reconstruction.size(), vec![2, 3, h, w]);
            assert_eq!(t.logits.size(), vec![2, 2, h, w]);
            assert!(t.logits.requires_grad());
        }
        let err = net.forward(&Tensor::zeros([1, 3, 31, 64], (Kind::Float, Device::Cpu))).unwrap_err();
        assert!(matches!(err, Error::BadImage(_)), "{err}");
        assert!(net.forward(&Tensor::zeros([1, 1, 64, 64], (Kind::Float, Device::Cpu))).is_err());
    }

    #[test]
    fn variable_names_follow_anomalib() {
        let vars = nn::VarStore::new(Device::Cpu);
        let _net = DraemNet::new(&small(4), &vars.root()).unwrap();
        let v = vars.variables();
        for key in [
            "reconstructive_subnetwork.encoder.block1.0.weight",
            "reconstructive_subnetwork.encoder.block1.4.running_var",
            "reconstructive_subnetwork.encoder.block5.3.bias",
            "reconstructive_subnetwork.decoder.up1.1.weight",
            "reconstructive_subnetwork.decoder.up4.2.running_mean",
            "reconstructive_subnetwork.decoder.db4.3.weight",
            "reconstructive_subnetwork.decoder.fin_out.0.weight",
            "discriminative_subnetwork.encoder_segment.block6.4.weight",
            "discriminative_subnetwork.decoder_segment.up_b.1.weight",
            "discriminative_subnetwork.decoder_segment.db_b.0.weight",
            "discriminative_subnetwork.decoder_segment.fin_out.0.bias",
        ] {
            assert!(v.contains_key(key), "missing {key}");
        }
        // base 4: discriminative width 2, so db_b takes 16 * 2 channels
        assert_eq!(v["discriminative_subnetwork.decoder_segment.db_b.0.weight"].size(), vec![16, 32, 3, 3]);
        assert_eq!(v["reconstructive_subnetwork.decoder.fin_out.0.weight"].size(), vec![3, 4, 3, 3]);
        assert!(!v["reconstructive_subnetwork.encoder.block1.1.running_mean"].requires_grad());
    }

    #[test]
    fn init_is_seeded_and_save_load_round_trips() {
        let cfg = small(4);
        let a = nn::VarStore::new(Device::Cpu);
        let net_a = DraemNet::new(&cfg, &a.root()).unwrap();
        let b = nn::VarStore::new(Device::Cpu);
        let _net_b = DraemNet::new(&cfg, &b.root()).unwrap();
        let key = "discriminative_subnetwork.encoder_segment.block3.0.weight";
        assert!(a.variables()[key].equal(&b.variables()[key]));
        let c = nn::VarStore::new(Device::Cpu);
        let _ = DraemNet::new(&DraemConfig { seed: 1, ..cfg.clone() }, &c.root()).unwrap();
        assert!(!a.variables()[key].equal(&c.variables()[key]));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("draem.safetensors");
        let model = Draem::from_trained(a, net_a, &cfg);
        model.save(&path).unwrap();
        let back = Draem::load(&cfg, &path, Device::Cpu).unwrap();
        let x = Tensor::randn([1, 3, 64, 64], (Kind::Float, Device::Cpu));
        let (o1, o2) = (model.forward(&x).unwrap(), back.forward(&x).unwrap());
        assert!(o1.anomaly_maps.allclose(&o2.anomaly_maps, 1e-6, 1e-6, false));
        let err = Draem::load(&small(8), &path, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("base_width"), "{err}");
    }

    #[test]
    fn model_is_send() {
        // The node moves a loaded model to its inference thread.
        fn send<T: Send>() {}
        send::<Draem>();
        send::<crate::model_file::AnomalyModel>();
    }

    #[test]
    fn image_score_is_the_max_of_the_window_mean() {
        let mut m = Tensor::zeros([1, 1, 9, 9], (Kind::Float, Device::Cpu));
        let _ = m.get(0).get(0).get(4).get(4).fill_(9.0);
        let s = image_scores(&m, 3).unwrap();
        assert!((s.double_value(&[0]) - 1.0).abs() < 1e-6);
        let s = image_scores(&m, 1).unwrap();
        assert!((s.double_value(&[0]) - 9.0).abs() < 1e-6);
        let _ = m.fill_(0.5);
        // zero padding is counted: the centre window is the full one
        assert!((image_scores(&m, 3).unwrap().double_value(&[0]) - 0.5).abs() < 1e-6);
    }
}
