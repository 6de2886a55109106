//! Adam (Kingma and Ba, ICLR 2015) with its state in plain tensors. tch's own optimiser keeps
//! its moment estimates inside libtorch where they cannot be saved, so a resumed training would
//! restart them from zero; this one writes them into the checkpoint and a resumed run continues
//! exactly where the interrupted one stopped. Same update as `torch.optim.Adam` (no amsgrad),
//! or `torch.optim.AdamW` with per-variable learning rates and decoupled weight decay.
use std::path::Path;

use tch::{nn, Kind, Tensor};

use crate::error::{Error, Result};

/// Adam over the trainable variables of a VarStore.
#[derive(Debug)]
pub struct Adam {
    /// (name, variable), sorted by name.
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Adam {
    /// Adam with PyTorch's defaults (betas 0.9, 0.999; eps 1e-8) over the trainable variables
    /// of `vars` (BatchNorm running statistics are not trainable and are left alone).
    pub fn new(vars: &nn::VarStore) -> Result<Self> {
        let mut params: Vec<(String, Tensor)> = vars.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let m = params.iter().map(|(_, p)| p.f_zeros_like()).collect::<std::result::Result<Vec<_>, _>>()?;
        let v = params.iter().map(|(_, p)| p.f_zeros_like()).collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self { params, m, v, t: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8 })
    }

    /// Steps taken so far (the bias-correction counter).
    pub fn steps_taken(&self) -> i64 {
        self.t
    }

    /// Zeroes the gradients of the variables.
    pub fn zero_grad(&mut self) -> Result<()> {
        for (_, p) in &self.params {
            let mut g = p.f_grad()?;
            if g.defined() {
                let _ = g.f_detach_()?;
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// One update with learning rate `lr` from the gradients in the variables.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.step_decoupled(&|_| (lr, 0.0))
    }

    /// One AdamW update (Loshchilov and Hutter, ICLR 2019, as `torch.optim.AdamW`): each
    /// variable, by name, gets its learning rate and decoupled weight decay from
    /// `lr_and_decay`, and shrinks by `lr * decay` before the Adam step.
    pub fn step_decoupled(&mut self, lr_and_decay: &dyn Fn(&str) -> (f64, f64)) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (((name, p), m), v) in self.params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
            let g = p.f_grad()?;
            if !g.defined() {
                continue;
            }
            let (lr, decay) = lr_and_decay(name);
            if decay != 0.0 {
                let _ = p.f_mul_scalar_(1.0 - lr * decay)?;
            }
            let _ = m.f_mul_scalar_(self.beta1)?;
            let _ = m.f_add_(&g.f_mul_scalar(1.0 - self.beta1)?)?;
            let _ = v.f_mul_scalar_(self.beta2)?;
            let _ = v.f_add_(&g.f_mul(&g)?.f_mul_scalar(1.0 - self.beta2)?)?;
            let denom = v.f_sqrt()?.f_div_scalar(bc2.sqrt())?.f_add_scalar(self.eps)?;
            let _ = p.f_sub_(&m.f_div(&denom)?.f_mul_scalar(lr / bc1)?)?;
        }
        Ok(())
    }

    /// Scales the gradients so that their joint L2 norm is at most `max_norm` (as
    /// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let mut total = 0.0;
        for (_, p) in &self.params {
            let g = p.f_grad()?;
            if g.defined() {
                total += g.f_square()?.f_sum(Kind::Float)?.f_double_value(&[])?;
            }
        }
        let norm = total.sqrt();
        if norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for (_, p) in &self.params {
                let mut g = p.f_grad()?;
                if g.defined() {
                    let _ = g.f_mul_scalar_(scale)?;
                }
            }
        }
        Ok(norm)
    }

    /// Writes the state (moments per variable and the step counter) to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let t = Tensor::f_from_slice(&[self.t])?;
        let mut named: Vec<(String, Tensor)> = vec![("t".into(), t)];
        for ((name, _), (m, v)) in self.params.iter().zip(self.m.iter().zip(&self.v)) {
            named.push((format!("m.{name}"), m.f_to_device(tch::Device::Cpu)?));
            named.push((format!("v.{name}"), v.f_to_device(tch::Device::Cpu)?));
        }
        Tensor::write_safetensors(&named, path).map_err(|e| Error::model(path, format!("cannot write optimiser state: {e}")))
    }

    /// Reads a state written by [`Adam::save`] for the same variables.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let tensors =
            Tensor::read_safetensors(path).map_err(|e| Error::model(path, format!("cannot read optimiser state: {e}")))?;
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let get = |key: &str| map.get(key).ok_or_else(|| Error::model(path, format!("optimiser state lacks '{key}'")));
        let t = get("t")?.f_to_kind(Kind::Int64)?.f_int64_value(&[0])?;
        let _guard = tch::no_grad_guard();
        for ((name, _), (m, v)) in self.params.iter().zip(self.m.iter_mut().zip(self.v.iter_mut())) {
            m.f_copy_(get(&format!("m.{name}"))?).map_err(|e| Error::model(path, format!("optimiser state of {name}: {e}")))?;
            v.f_copy_(get(&format!("v.{name}"))?).map_err(|e| Error::model(path, format!("optimiser state of {name}: {e}")))?;
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn matches_a_hand_computed_first_step_and_round_trips() {
        let vars = nn::VarStore::new(Device::Cpu);
        let w = vars.root().f_var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0])).unwrap();
        let _stat = vars.root().f_zeros_no_train("stat", &[2]).unwrap();
        let mut adam = Adam::new(&vars).unwrap();
        assert_eq!(adam.params.len(), 1, "non-trainable variables are not optimised");
        // loss = sum(w^2): gradient 2w; Adam's first step moves each weight by lr * sign(g).
        adam.zero_grad().unwrap();
        (&w * &w).sum(Kind::Float).backward();
        adam.step(0.1).unwrap();
        let after = Vec::<f32>::try_from(&w).unwrap();
        assert!((after[0] - 0.9).abs() < 1e-6 && (after[1] + 1.9).abs() < 1e-6, "{after:?}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adam.safetensors");
        adam.save(&path).unwrap();
        let mut other = Adam::new(&vars).unwrap();
        other.load(&path).unwrap();
        assert_eq!(other.steps_taken(), 1);
        assert!(other.m[0].equal(&adam.m[0]) && other.v[0].equal(&adam.v[0]));
    }

    #[test]
    fn decoupled_decay_shrinks_before_the_step_and_clipping_caps_the_norm() {
        let vars = nn::VarStore::new(Device::Cpu);
        let w = vars.root().f_var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0])).unwrap();
        let mut adam = Adam::new(&vars).unwrap();
        (&w * &w).sum(Kind::Float).backward();
        // Gradient (2, -4): norm sqrt(20); clipped to 1 it points the same way.
        let norm = adam.clip_grad_norm(1.0).unwrap();
        assert!((norm - 20f64.sqrt()).abs() < 1e-5);
        let g = Vec::<f32>::try_from(&w.grad()).unwrap();
        assert!(((g[0] * g[0] + g[1] * g[1]).sqrt() - 1.0).abs() < 1e-4 && g[0] > 0.0 && g[1] < 0.0, "{g:?}");
        // AdamW: w * (1 - lr * decay) - lr * sign(g) on the first step: 1 * 0.95 - 0.1, -2 * 0.95 + 0.1.
        adam.step_decoupled(&|name| if name == "w" { (0.1, 0.5) } else { (0.0, 0.0) }).unwrap();
        let after = Vec::<f32>::try_from(&w).unwrap();
        assert!((after[0] - 0.85).abs() < 1e-5 && (after[1] + 1.8).abs() < 1e-5, "{after:?}");
    }
}
