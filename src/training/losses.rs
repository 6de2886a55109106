//! DRAEM's training losses: SSIM (structural similarity) and the focal loss, as differentiable
//! tch expressions.
//!
//! Both are written here by hand: tch has neither, and no crate offers them on tch tensors
//! with gradients (image-quality crates work on CPU pixel buffers). Each is a handful of
//! tensor operations.
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Normalised 1-D Gaussian `[k]` of standard deviation `sigma`.
fn gaussian_1d(k: i64, sigma: f64, device: Device) -> Result<Tensor> {
    let r = (k / 2) as f64;
    let g: Vec<f32> = (0..k).map(|i| (-((i as f64 - r).powi(2)) / (2.0 * sigma * sigma)).exp() as f32).collect();
    let sum: f32 = g.iter().sum();
    let g: Vec<f32> = g.iter().map(|v| v / sum).collect();
    Ok(Tensor::f_from_slice(&g)?.f_to_device(device)?)
}

/// Mean SSIM (Wang et al., "Image quality assessment: from error visibility to structural
/// similarity", 2004) of two batches `[N, C, H, W]` whose values span `data_range` (1.0 for
/// 0..1 images); a scalar tensor, differentiable. Local statistics use a `window` x `window`
/// Gaussian (odd `window`; DRAEM: 11, sigma 1.5) with zero padding of window/2, as DRAEM's
/// reference code does; constants C1 = (0.01 L)², C2 = (0.03 L)².
pub fn ssim(a: &Tensor, b: &Tensor, window: i64, sigma: f64, data_range: f64) -> Result<Tensor> {
    let s = a.size();
    if s.len() != 4 || s != b.size() {
        return Err(Error::Config(format!("ssim needs two [N, C, H, W] tensors of one shape, got {s:?} and {:?}", b.size())));
    }
    if window < 1 || window % 2 == 0 || sigma.is_nan() || sigma <= 0.0 {
        return Err(Error::Config(format!("ssim window {window} must be odd and sigma {sigma} > 0")));
    }
    let c = s[1];
    let g = gaussian_1d(window, sigma, a.device())?;
    let kernel = g
        .f_unsqueeze(1)?
        .f_matmul(&g.f_unsqueeze(0)?)?
        .f_expand([c, 1, window, window], false)?
        .f_contiguous()?
        .f_to_kind(a.kind())?;
    let pad = window / 2;
    let filt = |x: &Tensor| x.f_conv2d(&kernel, None::<Tensor>, [1, 1], [pad, pad], [1, 1], c);
    let mu_a = filt(a)?;
    let mu_b = filt(b)?;
    let mu_aa = mu_a.f_mul(&mu_a)?;
    let mu_bb = mu_b.f_mul(&mu_b)?;
    let mu_ab = mu_a.f_mul(&mu_b)?;
    let var_a = filt(&a.f_mul(a)?)?.f_sub(&mu_aa)?;
    let var_b = filt(&b.f_mul(b)?)?.f_sub(&mu_bb)?;
    let cov = filt(&a.f_mul(b)?)?.f_sub(&mu_ab)?;
    let c1 = (0.01 * data_range).powi(2);
    let c2 = (0.03 * data_range).powi(2);
    let num = mu_ab.f_mul_scalar(2.0)?.f_add_scalar(c1)?.f_mul(&cov.f_mul_scalar(2.0)?.f_add_scalar(c2)?)?;
    let den = mu_aa.f_add(&mu_bb)?.f_add_scalar(c1)?.f_mul(&var_a.f_add(&var_b)?.f_add_scalar(c2)?)?;
    Ok(num.f_div(&den)?.f_mean(Kind::Float)?)
}

/// Focal loss (Lin et al., "Focal loss for dense object detection", 2017) of two-class pixel
/// logits `[N, 2, H, W]` against a binary mask `[N, 1, H, W]` (1 = anomalous): the mean over
/// pixels of `-(1 - p_t)^gamma * log p_t`, p_t the softmax probability of the true class
/// (DRAEM: gamma 2, no class weights). A scalar tensor, differentiable.
pub fn focal_loss(logits: &Tensor, mask: &Tensor, gamma: f64) -> Result<Tensor> {
    let (ls, ms) = (logits.size(), mask.size());
    if ls.len() != 4 || ls[1] != 2 || ms.len() != 4 || ms[1] != 1 || ls[0] != ms[0] || ls[2..] != ms[2..] {
        return Err(Error::Config(format!(
            "focal loss needs logits [N, 2, H, W] and a mask [N, 1, H, W], got {ls:?} and {ms:?}"
        )));
    }
    let log_p = logits.f_log_softmax(1, Kind::Float)?;
    let mask = mask.f_to_kind(Kind::Float)?;
    let target = Tensor::f_cat(&[mask.f_neg()?.f_add_scalar(1.0)?, mask], 1)?;
    let log_pt = log_p.f_mul(&target)?.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?;
    let weight = log_pt.f_exp()?.f_neg()?.f_add_scalar(1.0)?.f_pow_tensor_scalar(gamma)?;
    Ok(weight.f_mul(&log_pt)?.f_neg()?.f_mean(Kind::Float)?)
}

/// An error naming `loss` unless its logits and targets have one shape.
fn same_shape(loss: &str, logits: &Tensor, targets: &Tensor) -> Result<()> {
    if logits.size() == targets.size() {
        return Ok(());
    }
    Err(Error::Config(format!("{loss} needs logits and targets of one shape, got {:?} and {:?}", logits.size(), targets.size())))
}

/// Sigmoid focal loss (torchvision's `sigmoid_focal_loss` without class weighting, as
/// SuperSimpleNet uses it) of logits against 0/1 targets of the same shape: the mean of
/// `BCE(x, t) * (1 - p_t)^gamma`, p_t = sigmoid(x) for t = 1 and 1 - sigmoid(x) for t = 0.
pub fn sigmoid_focal_loss(logits: &Tensor, targets: &Tensor, gamma: f64) -> Result<Tensor> {
    same_shape("focal loss", logits, targets)?;
    let t = targets.f_to_kind(Kind::Float)?;
    let p = logits.f_sigmoid()?;
    let ce = logits.f_binary_cross_entropy_with_logits(&t, None::<Tensor>, None::<Tensor>, tch::Reduction::None)?;
    // 1 - p_t = p + t - 2 p t
    let one_minus_pt = p.f_add(&t)?.f_sub(&p.f_mul(&t)?.f_mul_scalar(2.0)?)?;
    Ok(ce.f_mul(&one_minus_pt.f_pow_tensor_scalar(gamma)?)?.f_mean(Kind::Float)?)
}

/// SuperSimpleNet's truncated L1 on map logits against a 0/1 mask of the same shape: normal
/// cells are pushed below `-margin`, anomalous ones above `+margin`, and nothing further (so the
/// map is not over-fitted): `mean(max(x + margin, 0))` over normal cells plus
/// `mean(max(margin - x, 0))` over anomalous ones, each 0 when there are none.
pub fn truncated_l1(logits: &Tensor, mask: &Tensor, margin: f64) -> Result<Tensor> {
    same_shape("truncated L1", logits, mask)?;
    let m = mask.f_to_kind(Kind::Float)?.f_gt(0.5)?.f_to_kind(Kind::Float)?;
    let normal = m.f_neg()?.f_add_scalar(1.0)?;
    let part = |weight: &Tensor, excess: Tensor| -> Result<Tensor> {
        let n = weight.f_sum(Kind::Float)?;
        // Divided by max(n, 1): an empty part contributes 0 and keeps the graph.
        Ok(excess.f_clamp_min(0.0)?.f_mul(weight)?.f_sum(Kind::Float)?.f_div(&n.f_clamp_min(1.0)?)?)
    };
    let true_loss = part(&normal, logits.f_add_scalar(margin)?)?;
    let fake_loss = part(&m, logits.f_neg()?.f_add_scalar(margin)?)?;
    Ok(true_loss.f_add(&fake_loss)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_of_identical_images_is_one_and_of_different_below() {
        tch::manual_seed(0);
        let a = Tensor::rand([2, 3, 40, 36], (Kind::Float, Device::Cpu));
        let same = ssim(&a, &a.copy(), 11, 1.5, 1.0).unwrap().double_value(&[]);
        assert!((same - 1.0).abs() < 1e-5, "{same}");
        let noisy = (&a + Tensor::randn([2, 3, 40, 36], (Kind::Float, Device::Cpu)) * 0.1).clamp(0.0, 1.0);
        let s_noisy = ssim(&a, &noisy, 11, 1.5, 1.0).unwrap().double_value(&[]);
        let other = Tensor::rand([2, 3, 40, 36], (Kind::Float, Device::Cpu));
        let s_other = ssim(&a, &other, 11, 1.5, 1.0).unwrap().double_value(&[]);
        assert!(s_noisy < 0.99 && s_other < s_noisy, "{s_noisy} {s_other}");
        // symmetric, and a brightness shift of a flat image lowers it
        let back = ssim(&noisy, &a, 11, 1.5, 1.0).unwrap().double_value(&[]);
        assert!((back - s_noisy).abs() < 1e-5);
        let flat = Tensor::full([1, 1, 16, 16], 0.5, (Kind::Float, Device::Cpu));
        assert!(ssim(&flat, &(&flat + 0.2), 7, 1.5, 1.0).unwrap().double_value(&[]) < 0.95);
        assert!(ssim(&a, &flat, 11, 1.5, 1.0).is_err());
    }

    #[test]
    fn ssim_has_gradients() {
        let a = Tensor::rand([1, 3, 20, 20], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::rand([1, 3, 20, 20], (Kind::Float, Device::Cpu));
        let loss: Tensor = 1.0 - ssim(&a, &b, 11, 1.5, 1.0).unwrap();
        loss.backward();
        assert!(a.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn sigmoid_focal_loss_hand_case() {
        // x = 0: p = 0.5, BCE = ln 2, (1 - p_t)^4 = 1/16, whatever the target.
        let zeros = Tensor::zeros([2, 1, 1, 2], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([2, 1, 1, 2]);
        let l = sigmoid_focal_loss(&zeros, &t, 4.0).unwrap().double_value(&[]);
        assert!((l - std::f64::consts::LN_2 / 16.0).abs() < 1e-6, "{l}");
        // x = ln 3: p = 0.75. t = 1: -ln 0.75 * 0.25^2; t = 0: -ln 0.25 * 0.75^2 (gamma 2).
        let x = Tensor::from_slice(&[3f32.ln(), 3f32.ln()]);
        let t = Tensor::from_slice(&[1.0f32, 0.0]);
        let l = sigmoid_focal_loss(&x, &t, 2.0).unwrap().double_value(&[]);
        let want = (-(0.75f64.ln()) * 0.0625 + -(0.25f64.ln()) * 0.5625) / 2.0;
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        // gamma 0 is the plain binary cross entropy.
        let ce = sigmoid_focal_loss(&x, &t, 0.0).unwrap().double_value(&[]);
        assert!((ce - (-(0.75f64.ln()) - 0.25f64.ln()) / 2.0).abs() < 1e-6);
        assert!(sigmoid_focal_loss(&x, &Tensor::zeros([3], (Kind::Float, Device::Cpu)), 2.0).is_err());
    }

    #[test]
    fn truncated_l1_hand_case_and_empty_parts() {
        // normal cells at -1 (below -0.5: no loss) and 0 (0.5); anomalous at 2 (no loss) and 0 (0.5).
        let x = Tensor::from_slice(&[-1.0f32, 0.0, 2.0, 0.0]);
        let m = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 1.0]);
        let l = truncated_l1(&x, &m, 0.5).unwrap().double_value(&[]);
        assert!((l - (0.25 + 0.25)).abs() < 1e-6, "{l}");
        // No anomalous cell: only the normal part, and it has a gradient.
        let x = Tensor::from_slice(&[0.5f32, -2.0]).set_requires_grad(true);
        let l = truncated_l1(&x, &Tensor::zeros([2], (Kind::Float, Device::Cpu)), 0.5).unwrap();
        assert!((l.double_value(&[]) - 0.5).abs() < 1e-6);
        l.backward();
        assert_eq!(Vec::<f32>::try_from(&x.grad()).unwrap(), vec![0.5, 0.0]);
        assert!(truncated_l1(&x, &Tensor::zeros([3], (Kind::Float, Device::Cpu)), 0.5).is_err());
    }

    #[test]
    fn focal_loss_hand_case() {
        // Equal logits: p_t = 0.5 everywhere, loss = -(0.5)^2 ln 0.5 = 0.25 ln 2.
        let logits = Tensor::zeros([1, 2, 2, 2], (Kind::Float, Device::Cpu));
        let mask = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([1, 1, 2, 2]);
        let l = focal_loss(&logits, &mask, 2.0).unwrap().double_value(&[]);
        assert!((l - 0.25 * std::f64::consts::LN_2).abs() < 1e-6, "{l}");
        // One pixel: logits (0, ln 3) give p1 = 0.75. Target 1: -(0.25)^2 ln 0.75; target 0:
        // -(0.75)^2 ln 0.25. gamma 0 is the cross entropy.
        let logits = Tensor::from_slice(&[0.0f32, 3f32.ln()]).view([1, 2, 1, 1]);
        let one = Tensor::ones([1, 1, 1, 1], (Kind::Float, Device::Cpu));
        let zero = Tensor::zeros([1, 1, 1, 1], (Kind::Float, Device::Cpu));
        let l1 = focal_loss(&logits, &one, 2.0).unwrap().double_value(&[]);
        let l0 = focal_loss(&logits, &zero, 2.0).unwrap().double_value(&[]);
        assert!((l1 - (-(0.25f64.powi(2)) * 0.75f64.ln())).abs() < 1e-6, "{l1}");
        assert!((l0 - (-(0.75f64.powi(2)) * 0.25f64.ln())).abs() < 1e-6, "{l0}");
        let ce = focal_loss(&logits, &one, 0.0).unwrap().double_value(&[]);
        assert!((ce + 0.75f64.ln()).abs() < 1e-6);
        assert!(focal_loss(&logits, &Tensor::zeros([1, 2, 1, 1], (Kind::Float, Device::Cpu)), 2.0).is_err());
    }
}
