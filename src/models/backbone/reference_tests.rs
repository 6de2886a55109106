//! Checks the native EfficientNet-Lite0 against outputs PyTorch computed with the same ImageNet
//! weights (`../shared/reference/efficientnet_lite0_reference.safetensors`, see its README):
//! every stage output of a real photo (224x224) and of a non-square synthetic input (256x320),
//! the logits, and the photo's top-1 class (88, "macaw").
//!
//! Skips (passes, with a note on stderr) where the reference or the weights are not present.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::efficientnet_lite::{EfficientNetLite0, NUM_STAGES};
use tch::{Device, Kind, Tensor};

/// Stage outputs must agree with PyTorch to this max abs difference.
const TOLERANCE: f64 = 1e-3;

fn paths() -> Option<(PathBuf, PathBuf)> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let reference = manifest.join("../shared/reference/efficientnet_lite0_reference.safetensors");
    let weights = manifest.join("models/efficientnet_lite0.safetensors");
    for p in [&reference, &weights] {
        if !p.is_file() {
            eprintln!("skipping: {} not found (run scripts/setup.sh)", p.display());
            return None;
        }
    }
    Some((reference, weights))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn check(model: &EfficientNetLite0, reference: &HashMap<String, Tensor>, prefix: &str) -> Tensor {
    let input = &reference[&format!("{prefix}_input")];
    let stages = model.forward_stages(input, NUM_STAGES).unwrap();
    assert_eq!(stages.len(), NUM_STAGES);
    for (k, out) in stages.iter().enumerate() {
        let expected = &reference[&format!("{prefix}_stage{}", k + 1)];
        let err = max_abs(out, expected);
        let scale = expected.abs().max().double_value(&[]);
        eprintln!("{prefix} stage{}: shape {:?}, max abs error {err:.3e} (max |value| {scale:.2})", k + 1, out.size());
        assert!(err < TOLERANCE, "{prefix} stage{}: max abs error {err}", k + 1);
    }
    let logits = model.forward_logits(input).unwrap();
    let expected = &reference[&format!("{prefix}_logits")];
    let err = max_abs(&logits, expected);
    eprintln!("{prefix} logits: max abs error {err:.3e}");
    assert!(err < TOLERANCE, "{prefix} logits: max abs error {err}");
    logits
}

#[test]
fn efficientnet_lite0_matches_pytorch_reference() {
    let Some((reference, weights)) = paths() else { return };
    let reference: HashMap<String, Tensor> = Tensor::read_safetensors(&reference).unwrap().into_iter().collect();
    let model = EfficientNetLite0::load(&weights, Device::Cpu).unwrap();

    let logits = check(&model, &reference, "photo");
    let top1 = logits.argmax(1, false).int64_value(&[0]);
    assert_eq!(top1, 88, "photo top-1 should be 88 (macaw)");
    let probs = logits.softmax(1, Kind::Float);
    eprintln!("photo top-1 {top1} with p = {:.3}", probs.double_value(&[0, 88]));

    let _ = check(&model, &reference, "synthetic");
}

/// The same check on the inference form (BatchNorm folded into the convolutions, channels-last),
/// which rounds differently: measured about 2.5e-4 max abs deviation on values up to ~50.
#[test]
fn inference_form_stays_close_to_pytorch_reference() {
    let Some((reference, weights)) = paths() else { return };
    let reference: HashMap<String, Tensor> = Tensor::read_safetensors(&reference).unwrap().into_iter().collect();
    let model = EfficientNetLite0::load(&weights, Device::Cpu).unwrap().into_inference_form().unwrap();
    let logits = check(&model, &reference, "photo");
    assert_eq!(logits.argmax(1, false).int64_value(&[0]), 88);
    let _ = check(&model, &reference, "synthetic");
}

/// `new` + `VarStore::load` (the generic tch route, ignoring the file's extra
/// `num_batches_tracked` keys) gives the same model as `load`.
#[test]
fn varstore_route_matches_pytorch_reference() {
    let Some((reference, weights)) = paths() else { return };
    let reference: HashMap<String, Tensor> = Tensor::read_safetensors(&reference).unwrap().into_iter().collect();
    let mut vs = tch::nn::VarStore::new(Device::Cpu);
    let model = EfficientNetLite0::new(&vs.root()).unwrap();
    vs.load(&weights).unwrap();
    vs.freeze();
    let _ = check(&model, &reference, "photo");
}
