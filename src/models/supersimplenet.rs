//! SuperSimpleNet: Rolih, Fučka, Skočaj, "No Label Left Behind: A Unified Surface Defect
//! Detection Model for all Supervision Regimes", Journal of Intelligent Manufacturing 2024
//! (from "SuperSimpleNet", ICPR 2024, and SimpleNet, Liu et al., CVPR 2023).
//!
//! A frozen pretrained backbone gives feature maps; they are upscaled to one grid, concatenated
//! and averaged over small neighbourhoods ([`patch_features`]). A 1x1 feature adaptor turns them
//! into the segmentation head's input. In training, anomalies are simulated in feature space
//! ([`FeatureAnomalies`]): Gaussian noise inside binary Perlin masks, added to a copy of every
//! image's features, so the network learns what "off the normal features" looks like without
//! any real defect; labelled defects, where the user has them, join with their masks or
//! verdicts. The segmentation head (1x1, BatchNorm, LeakyReLU, 1x1) gives the map logits; the
//! classification head (a conv block on the raw features and the map, max- and mean-pooled, and
//! a linear layer over them and the map's own max and mean) gives the image logit.
//!
//! Variable names mirror anomalib's `SupersimplenetModel` state dict (`adaptor.projection.*`,
//! `segdec.seg_head.{0,1,3}.*`, `segdec.cls_conv.{0,1}.*`, `segdec.cls_fc.*`), without the
//! backbone, which stays frozen and is stored on its own.
use std::fmt;
use std::path::Path;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::config::{ImageScore, SuperSimpleNetConfig};
use crate::dataset::Supervision;
use crate::error::{Error, Result};
use crate::models::backbone::Backbone;
use crate::models::layers::{gaussian_kernel, upsample_blurred, BatchNorm};
use crate::models::perlin::{perlin_mask, MaskParams};
use crate::models::ModelOutput;

const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

/// Whether BatchNorm uses the batch's statistics (and updates its running ones) or the running
/// ones: training and inference are two calls, never a stored mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Train,
    Eval,
}

/// Backbone feature maps `[N, C_i, H_i, W_i]` (shallow to deep) -> `[N, ΣC_i, h, w]`: every map
/// resized (bilinear) to the first (largest) map's size times `upscale`, concatenated, then
/// averaged over `pool` x `pool` neighbourhoods (padding counted as in the paper, so the
/// grid keeps its size).
pub fn patch_features(layers: &[Tensor], upscale: i64, pool: i64) -> Result<Tensor> {
    let first = layers.first().ok_or_else(|| Error::Config("no feature maps".into()))?;
    let s = first.size();
    let (h, w) = (s[2] * upscale, s[3] * upscale);
    let resized = layers.iter().map(|t| Ok(t.f_upsample_bilinear2d([h, w], false, None, None)?)).collect::<Result<Vec<_>>>()?;
    let cat = Tensor::f_cat(&resized, 1)?;
    if pool == 1 {
        return Ok(cat);
    }
    Ok(cat.f_avg_pool2d([pool, pool], [1, 1], [pool / 2, pool / 2], false, true, None)?)
}

/// `[shape]` from a normal distribution with standard deviation `std` (Xavier: sqrt(2 / (fan_in
/// + fan_out))), drawn from `rng`.
fn xavier_normal(rng: &mut ChaCha8Rng, shape: &[i64], fan_in: i64, fan_out: i64) -> Result<Tensor> {
    let std = (2.0 / (fan_in + fan_out) as f64).sqrt();
    let normal = Normal::new(0.0f32, std as f32).map_err(|e| Error::Config(format!("init: {e}")))?;
    let values: Vec<f32> = (0..shape.iter().product::<i64>()).map(|_| normal.sample(rng)).collect();
    Ok(Tensor::f_from_slice(&values)?.f_view(shape)?)
}

/// PyTorch's default bias: uniform in +-1/sqrt(fan_in).
fn default_bias(rng: &mut ChaCha8Rng, n: i64, fan_in: i64) -> Result<Tensor> {
    let b = 1.0 / (fan_in as f32).sqrt();
    let values: Vec<f32> = (0..n).map(|_| rng.gen_range(-b..b)).collect();
    Ok(Tensor::f_from_slice(&values)?)
}

/// A square convolution with "same" padding, its weight `[c_out, c_in, k, k]` and an optional
/// bias, Xavier-initialised as the paper's `init_weights`.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    pad: i64,
}

impl Conv {
    fn new(vars: &nn::Path, c_in: i64, c_out: i64, k: i64, bias: bool, rng: &mut ChaCha8Rng) -> Result<Self> {
        let weight = vars.f_var_copy("weight", &xavier_normal(rng, &[c_out, c_in, k, k], c_in * k * k, c_out * k * k)?)?;
        let bias = if bias { Some(vars.f_var_copy("bias", &default_bias(rng, c_out, c_in * k * k)?)?) } else { None };
        Ok(Self { weight, bias, pad: k / 2 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_conv2d(&self.weight, self.bias.as_ref(), [1, 1], [self.pad, self.pad], [1, 1], 1)?)
    }
}

/// BatchNorm with the paper's initialisation (weight 1, bias 0).
fn batch_norm(vars: &nn::Path, channels: i64) -> Result<BatchNorm> {
    BatchNorm::new(vars, channels, BN_EPS)
}

fn norm(bn: &BatchNorm, x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Train => bn.training(x, BN_MOMENTUM),
        Mode::Eval => bn.inference(x),
    }
}

/// The heads' raw outputs for a batch.
#[derive(Debug)]
pub struct HeadOutput {
    /// `[N, 1, h, w]` anomaly logits on the feature grid.
    pub map: Tensor,
    /// `[N]` image anomaly logits.
    pub score: Tensor,
}

/// The trainable part of SuperSimpleNet: feature adaptor, segmentation head and classification
/// head, for features of `channels` channels.
#[derive(Debug)]
pub struct SuperSimpleNetNet {
    /// `[1, C, 1, 1]` per-channel mean and standard deviation of the training features
    /// (`feature_norm.*`, not in anomalib): the features are standardised before anything else,
    /// because EfficientNet-Lite0's vary with a standard deviation of 2.5-3.6 per channel, where
    /// the paper's noise (0.015) is meant for Wide-ResNet features of a far smaller scale.
    feature_mean: Tensor,
    feature_std: Tensor,
    adaptor: Conv,
    seg_in: Conv,
    seg_bn: BatchNorm,
    seg_out: Conv,
    cls_conv: Conv,
    cls_bn: BatchNorm,
    cls_fc_weight: Tensor,
    cls_fc_bias: Tensor,
    /// Whether the classification head's gradient stops at the map (unsupervised training:
    /// yes, as in the paper; with real labelled defects the two heads learn together).
    stop_grad: bool,
}

impl SuperSimpleNetNet {
    /// The networks for features of `channels` channels, as `config` shapes them, initialised
    /// from `seed` (the same seed gives the same weights).
    pub fn new(vars: &nn::Path, channels: i64, config: &SuperSimpleNetConfig, seed: u64, stop_grad: bool) -> Result<Self> {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (hidden, cls, k) = (config.seg_hidden, config.cls_channels, config.cls_kernel);
        let seg = vars / "segdec" / "seg_head";
        let cls_path = vars / "segdec" / "cls_conv";
        let fc = vars / "segdec" / "cls_fc";
        let fc_in = 2 * cls + 2;
        let norm = vars / "feature_norm";
        Ok(Self {
            feature_mean: norm.f_zeros_no_train("mean", &[1, channels, 1, 1])?,
            feature_std: norm.f_ones_no_train("std", &[1, channels, 1, 1])?,
            adaptor: Conv::new(&(vars / "adaptor" / "projection"), channels, channels, 1, true, &mut rng)?,
            seg_in: Conv::new(&(&seg / "0"), channels, hidden, 1, true, &mut rng)?,
            seg_bn: batch_norm(&(&seg / "1"), hidden)?,
            seg_out: Conv::new(&(&seg / "3"), hidden, 1, 1, false, &mut rng)?,
            cls_conv: Conv::new(&(&cls_path / "0"), channels + 1, cls, k, true, &mut rng)?,
            cls_bn: batch_norm(&(&cls_path / "1"), cls)?,
            cls_fc_weight: fc.f_var_copy("weight", &xavier_normal(&mut rng, &[1, fc_in], fc_in, 1)?)?,
            cls_fc_bias: fc.f_var_copy("bias", &default_bias(&mut rng, 1, fc_in)?)?,
            stop_grad,
        })
    }

    /// Sets the standardisation from the training features `[M, C, h, w]` (before training).
    pub fn set_feature_statistics(&self, features: &Tensor) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let dims = [0i64, 2, 3];
        let mean = features.f_mean_dim(dims.as_slice(), true, Kind::Float)?;
        // A channel that never varies is left unscaled rather than divided by zero.
        let std = features.f_std_dim(dims.as_slice(), true, true)?.f_clamp_min(1e-6)?;
        self.feature_mean.shallow_clone().f_copy_(&mean)?;
        self.feature_std.shallow_clone().f_copy_(&std)?;
        Ok(())
    }

    /// Standardised features `[N, C, h, w]` of patch features `[N, C, h, w]`.
    fn standardise(&self, features: &Tensor) -> Result<Tensor> {
        Ok(features.f_sub(&self.feature_mean)?.f_div(&self.feature_std)?)
    }

    /// Adapted features `[N, C, h, w]` of standardised features `[N, C, h, w]`.
    fn adapt(&self, features: &Tensor) -> Result<Tensor> {
        self.adaptor.forward(features)
    }

    /// The heads on `seg_features` (adapted) and `cls_features` (the raw patch features, as in
    /// the journal version), both `[N, C, h, w]`.
    fn heads(&self, seg_features: &Tensor, cls_features: &Tensor, mode: Mode) -> Result<HeadOutput> {
        let normed = norm(&self.seg_bn, &self.seg_in.forward(seg_features)?, mode)?;
        // LeakyReLU with the paper's slope 0.2 (tch's leaky_relu has PyTorch's default 0.01).
        let hidden = normed.f_where_self(&normed.f_ge(0.0)?, &normed.f_mul_scalar(0.2)?)?;
        let map = self.seg_out.forward(&hidden)?;
        let map_for_cls = if self.stop_grad { map.f_detach()? } else { map.shallow_clone() };
        let both = Tensor::f_cat(&[cls_features.shallow_clone(), map_for_cls.shallow_clone()], 1)?;
        let conv = norm(&self.cls_bn, &self.cls_conv.forward(&both)?, mode)?.f_relu()?;
        let n = conv.size()[0];
        let flat = conv.f_flatten(2, 3)?;
        let map_flat = map_for_cls.f_flatten(2, 3)?;
        let pooled = Tensor::f_cat(
            &[
                flat.f_amax([2i64].as_slice(), false)?,
                flat.f_mean_dim([2i64].as_slice(), false, Kind::Float)?,
                map_flat.f_amax([2i64].as_slice(), false)?,
                map_flat.f_mean_dim([2i64].as_slice(), false, Kind::Float)?,
            ],
            1,
        )?;
        let score = pooled.f_linear(&self.cls_fc_weight, Some(&self.cls_fc_bias))?.f_reshape([n])?;
        Ok(HeadOutput { map, score })
    }

    /// Inference on patch features `[N, C, h, w]` (running BatchNorm statistics).
    pub fn forward(&self, features: &Tensor) -> Result<HeadOutput> {
        let features = self.standardise(features)?;
        self.heads(&self.adapt(&features)?, &features, Mode::Eval)
    }

    /// Training on patch features `[B, C, h, w]` with simulated anomalies: each image is seen
    /// twice, once as it is and once with noise where `anomalies` draws it (where it is not
    /// already defective). `masks` `[B, 1, h, w]` and `labels` `[B]` are the known defects (0 for
    /// good images). Returns the heads' outputs and the targets `[2B, 1, h, w]`, `[2B]`.
    pub fn forward_train(
        &self,
        features: &Tensor,
        masks: &Tensor,
        labels: &Tensor,
        anomalies: &FeatureAnomalies,
        rng: &mut ChaCha8Rng,
    ) -> Result<(HeadOutput, Tensor, Tensor)> {
        let features = self.standardise(features)?;
        let adapted = self.adapt(&features)?;
        let noised = anomalies.apply(&adapted, &features, masks, labels, rng)?;
        let out = self.heads(&noised.adapted, &noised.features, Mode::Train)?;
        Ok((out, noised.masks, noised.labels))
    }
}

/// Features with simulated anomalies and what they now show.
#[derive(Debug)]
pub struct NoisedFeatures {
    /// `[2B, C, h, w]` adapted features, the second half with noise.
    pub adapted: Tensor,
    /// `[2B, C, h, w]` raw patch features with the same noise.
    pub features: Tensor,
    /// `[2B, 1, h, w]` 0/1 targets: known defects and simulated ones.
    pub masks: Tensor,
    /// `[2B]` 0/1 image targets.
    pub labels: Tensor,
}

/// The feature-level anomaly simulator: Gaussian noise inside binary Perlin masks.
#[derive(Clone, Debug)]
pub struct FeatureAnomalies {
    /// Noise standard deviation.
    pub noise_std: f64,
    /// Perlin mask shape.
    pub mask: MaskParams,
}

impl FeatureAnomalies {
    /// The simulator `config` describes.
    pub fn new(config: &SuperSimpleNetConfig) -> Self {
        Self {
            noise_std: config.noise_std,
            mask: MaskParams { scale_log2: config.perlin_scale_log2, threshold: config.perlin_threshold as f32 },
        }
    }

    /// Duplicates the batch and adds noise to the copies where a Perlin mask is on and the image
    /// is not already known to be defective there (half of the copies, drawn at random, get no
    /// mask: they stay good). Every draw comes from `rng`.
    pub fn apply(
        &self,
        adapted: &Tensor,
        features: &Tensor,
        masks: &Tensor,
        labels: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<NoisedFeatures> {
        let s = adapted.size();
        if s.len() != 4 || features.size() != s || masks.size() != [s[0], 1, s[2], s[3]] || labels.size() != [s[0]] {
            return Err(Error::Config(format!(
                "feature anomalies need adapted and raw features [B, C, h, w], masks [B, 1, h, w] and labels [B]; got {s:?}, {:?}, {:?}, {:?}",
                features.size(),
                masks.size(),
                labels.size()
            )));
        }
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let device = adapted.device();
        // The first half stays as it is; the second half gets the Perlin masks.
        let mut perlin = vec![0.0f32; (b * h * w) as usize];
        let mut noise = Vec::with_capacity((b * c * h * w) as usize);
        let normal = Normal::new(0.0f32, self.noise_std as f32).map_err(|e| Error::Config(format!("noise: {e}")))?;
        for i in 0..b as usize {
            if rng.gen_bool(0.5) {
                let m = perlin_mask(rng, h as usize, w as usize, &self.mask);
                perlin[i * (h * w) as usize..(i + 1) * (h * w) as usize].copy_from_slice(&m);
            }
        }
        for _ in 0..b * c * h * w {
            noise.push(normal.sample(rng));
        }
        let masks = masks.f_to_kind(Kind::Float)?;
        let perlin = Tensor::f_from_slice(&perlin)?.f_view([b, 1, h, w])?.f_to_device(device)?;
        // No noise where a real defect already is.
        let noise_mask = perlin.f_mul(&masks.f_neg()?.f_add_scalar(1.0)?)?;
        let noise = Tensor::f_from_slice(&noise)?.f_view([b, c, h, w])?.f_to_device(device)?.f_mul(&noise_mask)?;
        let both_masks = Tensor::f_cat(&[masks.shallow_clone(), masks.f_add(&noise_mask)?.f_clamp(0.0, 1.0)?], 0)?;
        let simulated = noise_mask.f_flatten(1, 3)?.f_amax([1i64].as_slice(), false)?;
        let labels = labels.f_to_kind(Kind::Float)?;
        let both_labels = Tensor::f_cat(&[labels.shallow_clone(), labels.f_add(&simulated)?.f_clamp(0.0, 1.0)?], 0)?;
        Ok(NoisedFeatures {
            adapted: Tensor::f_cat(&[adapted.shallow_clone(), adapted.f_add(&noise)?], 0)?,
            features: Tensor::f_cat(&[features.shallow_clone(), features.f_add(&noise)?], 0)?,
            masks: both_masks,
            labels: both_labels,
        })
    }
}

/// Patch features of a normalised batch `[N, 3, H, W]` as `config` takes them from `backbone`:
/// `[N, C, h, w]` with C the configured layers' channels together and (h, w) the first layer's
/// grid times `config.upscale`. No gradients (the backbone stays frozen).
pub fn extract_features(backbone: &Backbone, x: &Tensor, config: &SuperSimpleNetConfig) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    patch_features(&backbone.features(x)?, config.upscale, config.pool)
}

/// How a SuperSimpleNet model was trained, for logs and model.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SuperSimpleNetFitSummary {
    /// Good training images (held-out ones excluded).
    pub n_good: usize,
    /// Labelled defective training images.
    pub n_defective: usize,
    /// Of those, the ones with a mask.
    pub n_masks: usize,
    /// What the labels amount to.
    pub supervision: Supervision,
    /// Passes over the training samples (over every resumed run).
    pub epochs: usize,
    /// Optimiser steps in all.
    pub steps: usize,
    /// Samples per step (each also seen with simulated anomalies).
    pub batch_size: usize,
    /// The epoch this run resumed from; None when it started from scratch.
    pub resumed_from_epoch: Option<usize>,
    /// Trainable parameters (the frozen backbone excluded).
    pub parameters: i64,
    /// `[C, h, w]` of the cached patch features.
    pub feature_shape: [i64; 3],
    /// Seconds spent extracting (and caching) the backbone features.
    pub feature_seconds: f64,
    /// Seconds spent training in this run.
    pub train_seconds: f64,
    /// Mean loss of the last epoch.
    pub final_loss: f64,
}

/// A trained SuperSimpleNet: the frozen backbone, the trained adaptor and heads, and the
/// configuration they were built with. Get one from [`crate::training::fit_supersimplenet`]
/// or load one with [`SuperSimpleNet::load`].
pub struct SuperSimpleNet {
    vars: nn::VarStore,
    backbone: Backbone,
    net: SuperSimpleNetNet,
    config: SuperSimpleNetConfig,
    /// The map's smoothing kernel (None for blur_sigma 0).
    blur: Option<Tensor>,
    /// The image score is the map's maximum (else the classification head's).
    score_from_map: bool,
}

impl fmt::Debug for SuperSimpleNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SuperSimpleNet")
            .field("device", &self.vars.device())
            .field("layers", &self.config.backbone.layers)
            .field("image_size", &self.config.preprocess.image_size)
            .finish()
    }
}

impl SuperSimpleNet {
    /// Loads a model: the backbone from `backbone_weights`, the adaptor and heads `config`
    /// describes from `weights` (written by [`SuperSimpleNet::save`]), onto `device`.
    pub fn load(config: &SuperSimpleNetConfig, backbone_weights: &Path, weights: &Path, device: Device) -> Result<Self> {
        config.validate()?;
        let backbone = Backbone::new(&config.backbone, backbone_weights, device)?;
        let mut vars = nn::VarStore::new(device);
        let channels = backbone.feature_channels().iter().sum();
        let net = SuperSimpleNetNet::new(&vars.root(), channels, config, config.seed, true)?;
        vars.load(weights).map_err(|e| {
            Error::model(
                weights,
                format!("cannot load SuperSimpleNet weights ({e}); do the layers and head sizes in model.json match?"),
            )
        })?;
        Self::from_trained(vars, backbone, net, config)
    }

    /// Wraps a trained network (the training loop's result).
    pub(crate) fn from_trained(
        vars: nn::VarStore,
        backbone: Backbone,
        net: SuperSimpleNetNet,
        config: &SuperSimpleNetConfig,
    ) -> Result<Self> {
        let blur = gaussian_kernel(config.blur_sigma, vars.device())?;
        let score_from_map = score_from_map(config.image_score)?;
        Ok(Self { vars, backbone, net, config: config.clone(), blur, score_from_map })
    }

    /// Writes the adaptor's and the heads' variables (BatchNorm statistics included).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.vars.save(path).map_err(|e| Error::model(path, format!("cannot write SuperSimpleNet weights: {e}")))
    }

    /// Scores a normalised batch `[N, 3, H, W]`: image scores `[N]` = sigmoid of the
    /// classification head's logit (or the map's maximum, as `image_score` says), anomaly maps `[N, 1, H, W]` = sigmoid of the segmentation
    /// logits upsampled (bilinear) and smoothed. Both lie in 0..1, so thresholds are ratios.
    pub fn forward(&self, x: &Tensor) -> Result<ModelOutput> {
        let _guard = tch::no_grad_guard();
        let (h, w) = (x.size()[2], x.size()[3]);
        let out = self.net.forward(&extract_features(&self.backbone, x, &self.config)?)?;
        let maps = upsample_blurred(&out.map, h, w, self.blur.as_ref())?;
        let anomaly_maps = maps.f_sigmoid()?;
        let image_scores = if self.score_from_map {
            anomaly_maps.f_flatten(1, 3)?.f_amax([1i64].as_slice(), false)?
        } else {
            out.score.f_sigmoid()?
        };
        Ok(ModelOutput { image_scores, anomaly_maps })
    }

    /// The frozen feature extractor.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// The configuration the model was built and trained with.
    pub fn config(&self) -> &SuperSimpleNetConfig {
        &self.config
    }
}

/// Whether a trained model scores images by the map's maximum; `auto` is `fit`'s to resolve
/// (by the labels it trains on), so a model holding it was not written by `fit`.
fn score_from_map(image_score: ImageScore) -> Result<bool> {
    match image_score {
        ImageScore::MapMax => Ok(true),
        ImageScore::Classifier => Ok(false),
        ImageScore::Auto => Err(Error::Config(
            "image_score auto in a trained model: fit chooses it from the labels; set classifier or map_max in model.json".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tch::Device;

    fn small() -> SuperSimpleNetConfig {
        SuperSimpleNetConfig { seg_hidden: 16, cls_channels: 8, cls_kernel: 3, ..SuperSimpleNetConfig::paper() }
    }

    #[test]
    fn a_trained_model_names_its_image_score() {
        assert!(score_from_map(ImageScore::MapMax).unwrap());
        assert!(!score_from_map(ImageScore::Classifier).unwrap());
        assert!(score_from_map(ImageScore::Auto).unwrap_err().to_string().contains("classifier or map_max"));
    }

    #[test]
    fn patch_features_share_one_grid_and_average_neighbourhoods() {
        let a = Tensor::ones([2, 3, 8, 10], (Kind::Float, Device::Cpu));
        let b = Tensor::ones([2, 5, 4, 5], (Kind::Float, Device::Cpu)) * 2.0;
        let f = patch_features(&[a.shallow_clone(), b], 2, 3).unwrap();
        assert_eq!(f.size(), vec![2, 8, 16, 20]);
        // Constant maps stay constant inside (padding counts as zeros at the border, as the paper's).
        assert!((f.double_value(&[1, 0, 5, 5]) - 1.0).abs() < 1e-6);
        assert!((f.double_value(&[1, 7, 5, 5]) - 2.0).abs() < 1e-6);
        assert!((f.double_value(&[0, 0, 0, 0]) - 4.0 / 9.0).abs() < 1e-6, "corner: 4 of 9 cells inside");
        assert_eq!(patch_features(&[a], 1, 1).unwrap().size(), vec![2, 3, 8, 10]);
        assert!(patch_features(&[], 1, 3).is_err());
    }

    #[test]
    fn heads_have_the_documented_shapes_names_and_seeded_weights() {
        let cfg = small();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = SuperSimpleNetNet::new(&vs.root(), 12, &cfg, 7, true).unwrap();
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        for want in [
            "adaptor.projection.weight",
            "segdec.seg_head.0.weight",
            "segdec.seg_head.1.running_var",
            "segdec.seg_head.3.weight",
            "segdec.cls_conv.0.bias",
            "segdec.cls_conv.1.weight",
            "segdec.cls_fc.weight",
            "segdec.cls_fc.bias",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n == "segdec.seg_head.3.bias"), "the last seg layer has no bias");
        let x = Tensor::randn([3, 12, 6, 7], (Kind::Float, Device::Cpu));
        let out = net.forward(&x).unwrap();
        assert_eq!(out.map.size(), vec![3, 1, 6, 7]);
        assert_eq!(out.score.size(), vec![3]);
        // Same seed, same weights; another seed, others.
        let again = nn::VarStore::new(Device::Cpu);
        let twin = SuperSimpleNetNet::new(&again.root(), 12, &cfg, 7, true).unwrap();
        assert!(twin.forward(&x).unwrap().score.allclose(&out.score, 1e-6, 1e-6, false));
        let other = nn::VarStore::new(Device::Cpu);
        let diff = SuperSimpleNetNet::new(&other.root(), 12, &cfg, 8, true).unwrap();
        assert!(!diff.forward(&x).unwrap().score.allclose(&out.score, 1e-6, 1e-6, false));
    }

    #[test]
    fn simulated_anomalies_double_the_batch_and_keep_known_defects() {
        let cfg = SuperSimpleNetConfig { noise_std: 0.5, perlin_scale_log2: [0, 2], ..small() };
        let gen = FeatureAnomalies::new(&cfg);
        let (b, c, h, w) = (16, 4, 8, 8);
        let adapted = Tensor::zeros([b, c, h, w], (Kind::Float, Device::Cpu));
        let features = Tensor::ones([b, c, h, w], (Kind::Float, Device::Cpu));
        // Image 0 is a known defect over its left half.
        let masks = Tensor::zeros([b, 1, h, w], (Kind::Float, Device::Cpu));
        let _ = masks.get(0).narrow(2, 0, 4).fill_(1.0);
        let labels = Tensor::zeros([b], (Kind::Float, Device::Cpu));
        let _ = labels.get(0).fill_(1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let out = gen.apply(&adapted, &features, &masks, &labels, &mut rng).unwrap();
        assert_eq!(out.adapted.size(), vec![2 * b, c, h, w]);
        assert_eq!(out.masks.size(), vec![2 * b, 1, h, w]);
        assert_eq!(out.labels.size(), vec![2 * b]);
        // The first half is untouched.
        assert_eq!(out.adapted.narrow(0, 0, b).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(out.masks.narrow(0, 0, b).equal(&masks) && out.labels.narrow(0, 0, b).equal(&labels));
        // In the copies, noise lies exactly inside the new targets and never on the known defect.
        let noisy = out.adapted.narrow(0, b, b).abs().amax([1i64].as_slice(), true).gt(0.0).to_kind(Kind::Float);
        let new_targets = out.masks.narrow(0, b, b) - &masks;
        assert!(noisy.equal(&new_targets), "noise outside its mask");
        assert_eq!((noisy.get(0).narrow(2, 0, 4)).sum(Kind::Float).double_value(&[]), 0.0, "noise on the known defect");
        // The same noise went into the raw features.
        let in_features = out.features.narrow(0, b, b).f_sub(&features).unwrap();
        assert!(in_features.allclose(&out.adapted.narrow(0, b, b), 1e-5, 1e-6, false));
        // About half the copies got a simulated anomaly; their labels say so; the known defect stays 1.
        let with = Vec::<f32>::try_from(&out.labels.narrow(0, b, b)).unwrap();
        let simulated = (1..b as usize).filter(|&i| with[i] == 1.0).count();
        assert!((3..=13).contains(&simulated), "{simulated} of {} copies", b - 1);
        assert_eq!(with[0], 1.0);
        for i in 1..b {
            let any = new_targets.get(i).sum(Kind::Float).double_value(&[]) > 0.0;
            assert_eq!(any, with[i as usize] == 1.0, "label of copy {i}");
        }
        // Seeded.
        let again = gen.apply(&adapted, &features, &masks, &labels, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        assert!(again.adapted.equal(&out.adapted));
        assert!(gen.apply(&adapted, &features, &masks.narrow(0, 0, 3), &labels, &mut rng).is_err());
    }

    #[test]
    fn the_map_gradient_reaches_the_classifier_only_without_stop_grad() {
        let cfg = small();
        for stop in [true, false] {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = SuperSimpleNetNet::new(&vs.root(), 6, &cfg, 3, stop).unwrap();
            let x = Tensor::randn([4, 6, 5, 5], (Kind::Float, Device::Cpu));
            let masks = Tensor::zeros([4, 1, 5, 5], (Kind::Float, Device::Cpu));
            let labels = Tensor::zeros([4], (Kind::Float, Device::Cpu));
            let gen = FeatureAnomalies::new(&cfg);
            let (out, _, _) = net.forward_train(&x, &masks, &labels, &gen, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
            // Only the score's loss: the seg head learns from it only when the gradient flows.
            out.score.sum(Kind::Float).backward();
            let g = net.seg_out.weight.grad();
            let reached = g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0;
            assert_eq!(reached, !stop, "stop_grad {stop}");
        }
    }
}
