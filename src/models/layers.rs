//! Layers shared by the models: BatchNorm with its statistics stored under the upstream
//! (PyTorch) variable names, so weights load by path.
use tch::{nn, Tensor};

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

#[cfg(test)]
mod tests {
    use super::*;

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
