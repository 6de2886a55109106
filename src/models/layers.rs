//! Layers shared by the models: BatchNorm with its statistics stored under the upstream
//! (PyTorch) variable names, so weights load by path, and the Gaussian smoothing of anomaly maps.
use tch::{nn, Device, Kind, Tensor};

use crate::error::Result;

/// BatchNorm over channels: `weight`, `bias`, `running_mean`, `running_var` under its path.
#[derive(Debug)]
pub(crate) struct BatchNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) running_mean: Tensor,
    pub(crate) running_var: Tensor,
    /// Added to the variance (TF EfficientNet-Lite 1e-3, PyTorch's default 1e-5).
    pub(crate) eps: f64,
}

impl BatchNorm {
    /// A BatchNorm of `channels` at `vars` (identity until weights are loaded).
    pub(crate) fn new(vars: &nn::Path, channels: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vars.f_ones("weight", &[channels])?,
            bias: vars.f_zeros("bias", &[channels])?,
            running_mean: vars.f_zeros_no_train("running_mean", &[channels])?,
            running_var: vars.f_ones_no_train("running_var", &[channels])?,
            eps,
        })
    }

    /// `[N, C, H, W]` normalised with the running statistics.
    pub(crate) fn inference(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false, 0.0)
    }

    /// `[N, C, H, W]` normalised with the batch's statistics; the running ones move by
    /// `momentum` towards them (training only).
    pub(crate) fn training(&self, x: &Tensor, momentum: f64) -> Result<Tensor> {
        self.apply(x, true, momentum)
    }

    fn apply(&self, x: &Tensor, train: bool, momentum: f64) -> Result<Tensor> {
        Ok(x.f_batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            momentum,
            self.eps,
            true,
        )?)
    }
}

/// 1-D Gaussian kernel `[K]` with K = 2*ceil(4 sigma) + 1 (anomalib's choice), or None for sigma 0.
pub(crate) fn gaussian_kernel(sigma: f64, device: Device) -> Result<Option<Tensor>> {
    if sigma <= 0.0 {
        return Ok(None);
    }
    let radius = (4.0 * sigma).ceil() as i64;
    let xs: Vec<f32> = (-radius..=radius).map(|i| (-(i as f64).powi(2) / (2.0 * sigma * sigma)).exp() as f32).collect();
    let sum: f32 = xs.iter().sum();
    let xs: Vec<f32> = xs.iter().map(|v| v / sum).collect();
    Ok(Some(Tensor::f_from_slice(&xs)?.f_to_device(device)?))
}

/// The padding [`blur`] uses for a radius `r` on an `h x w` map: reflect needs pad < size, so
/// small maps fall back to replicate.
fn padding_mode(r: i64, h: i64, w: i64) -> &'static str {
    if r < h && r < w {
        "reflect"
    } else {
        "replicate"
    }
}

/// Separable Gaussian blur of `[N, 1, H, W]` with reflect padding (no dark borders).
pub(crate) fn blur(maps: &Tensor, kernel: &Tensor) -> Result<Tensor> {
    let k = kernel.size()[0];
    let r = k / 2;
    let (h, w) = (maps.size()[2], maps.size()[3]);
    let mode = padding_mode(r, h, w);
    let padded = maps.f_pad([r, r, r, r], mode, None)?;
    let kx = kernel.f_view([1, 1, 1, k])?;
    let ky = kernel.f_view([1, 1, k, 1])?;
    let out = padded.f_conv2d(&kx, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)?;
    Ok(out.f_conv2d(&ky, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)?)
}

/// Bilinear upsampling (align_corners false) of `[N, 1, fh, fw]` grids to `[N, 1, h, w]`, then,
/// with a `kernel`, [`blur`]: the same maps as those two steps, computed as `A · grid · Bᵀ`.
///
/// Both steps are linear and separable, so each axis is one small matrix (`A` `[h, fh]`, `B`
/// `[w, fw]`, built by applying the two steps to an identity). Why by hand: libtorch convolves a
/// one-channel map with a 33-tap kernel slowly (1.35 ms for 256x256 on 2 CPU cores, against
/// about 0.1 ms for the two products; `examples/speed_levers.rs`).
pub(crate) fn upsample_blurred(grid: &Tensor, h: i64, w: i64, kernel: Option<&Tensor>) -> Result<Tensor> {
    let size = grid.size();
    if size.len() != 4 || size[1] != 1 {
        return Err(tch::TchError::Shape(format!("maps must be [N, 1, h, w], got {size:?}")).into());
    }
    // The padding blur() would choose for the upsampled map.
    let mode = padding_mode(kernel.map_or(0, |k| k.size()[0] / 2), h, w);
    let a = axis_operator(size[2], h, kernel, mode, grid.device())?;
    let b = axis_operator(size[3], w, kernel, mode, grid.device())?;
    Ok(a.f_matmul(&grid.f_to_kind(Kind::Float)?)?.f_matmul(&b.f_tr()?)?)
}

/// `[n_out, n_in]`: 1-D bilinear upsampling of `n_in` samples to `n_out`, then the Gaussian
/// `kernel` (if any) with `mode` padding, as one matrix (each column the image of a unit vector).
fn axis_operator(n_in: i64, n_out: i64, kernel: Option<&Tensor>, mode: &str, device: Device) -> Result<Tensor> {
    let eye = Tensor::f_eye(n_in, (Kind::Float, device))?.f_view([1, 1, n_in, n_in])?;
    // Along the last axis the size stays n_in: bilinear at scale 1 is the identity.
    let up = eye.f_upsample_bilinear2d([n_out, n_in], false, None, None)?;
    let out = match kernel {
        Some(k) => {
            let taps = k.size()[0];
            let r = taps / 2;
            up.f_pad([0, 0, r, r], mode, None)?.f_conv2d(
                &k.f_view([1, 1, taps, 1])?,
                None::<Tensor>,
                [1, 1],
                [0, 0],
                [1, 1],
                1,
            )?
        }
        None => up,
    };
    Ok(out.f_view([n_out, n_in])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsample_blurred_equals_upsampling_then_blurring() {
        tch::manual_seed(5);
        // Reflect padding (large maps), replicate (maps smaller than the kernel), no blur.
        for (fh, fw, h, w, sigma) in [(32, 32, 256, 256, 4.0), (20, 48, 160, 384, 4.0), (3, 2, 12, 9, 4.0), (7, 5, 56, 40, 0.0)] {
            let grid = Tensor::rand([2, 1, fh, fw], (Kind::Float, Device::Cpu));
            let kernel = gaussian_kernel(sigma, Device::Cpu).unwrap();
            let up = grid.upsample_bilinear2d([h, w], false, None, None);
            let want = match &kernel {
                Some(k) => blur(&up, k).unwrap(),
                None => up,
            };
            let got = upsample_blurred(&grid, h, w, kernel.as_ref()).unwrap();
            assert_eq!(got.size(), vec![2, 1, h, w]);
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{fh}x{fw} -> {h}x{w} sigma {sigma}: differs by {diff}");
        }
        assert!(upsample_blurred(&Tensor::zeros([1, 2, 4, 4], (Kind::Float, Device::Cpu)), 8, 8, None).is_err());
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
    fn inference_uses_running_statistics_and_training_updates_them() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let bn = BatchNorm::new(&vs.root(), 1, 1e-5).unwrap();
        tch::no_grad(|| {
            let _ = bn.running_mean.shallow_clone().fill_(2.0);
            let _ = bn.running_var.shallow_clone().fill_(4.0);
        });
        let x = Tensor::from_slice(&[2.0f32, 4.0, 6.0, 8.0]).view([4, 1, 1, 1]);
        let y = bn.inference(&x).unwrap();
        // (x - 2) / sqrt(4 + 1e-5)
        assert!((y.double_value(&[3, 0, 0, 0]) - 3.0).abs() < 1e-4);
        let t = bn.training(&x, 0.5).unwrap();
        // Batch mean 5, biased var 5: (8 - 5) / sqrt(5).
        assert!((t.double_value(&[3, 0, 0, 0]) - 3.0 / 5f64.sqrt()).abs() < 1e-4);
        assert!((bn.running_mean.double_value(&[0]) - 3.5).abs() < 1e-6, "2 + 0.5 * (5 - 2)");
    }
}
