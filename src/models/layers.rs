//! Layers shared by the models: BatchNorm with its statistics stored under the upstream
//! (PyTorch) variable names, so weights load by path, and the Gaussian smoothing of anomaly maps.
use tch::{nn, Device, Tensor};

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

/// Separable Gaussian blur of `[N, 1, H, W]` with reflect padding (no dark borders).
pub(crate) fn blur(maps: &Tensor, kernel: &Tensor) -> Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

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
