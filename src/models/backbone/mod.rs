//! Feature extractors: the native [`EfficientNetLite0`] (ImageNet weights, the default) and
//! any TorchScript module ([`TorchScriptBackbone`]), behind one [`Backbone`] type that returns
//! the feature maps named in [`BackboneConfig::layers`], in config order.
//!
//! Layer names are parsed once, in [`Backbone::new`]: `stage1`..`stage7` for EfficientNet-Lite0,
//! output indices `0`, `1`, ... for TorchScript. A probe forward at construction measures each
//! layer's channel count and stride, so callers know the feature sizes before the first frame.
pub mod efficientnet_lite;
#[cfg(test)]
mod reference_tests;
pub mod torchscript;

use std::path::Path;

use tch::{Device, Kind, Tensor};

pub use efficientnet_lite::EfficientNetLite0;
pub use torchscript::TorchScriptBackbone;

use crate::config::{BackboneConfig, BackboneKind};
use crate::error::{Error, Result};

/// Side of the square probe input used to measure feature channels and strides.
const PROBE_SIZE: i64 = 64;
/// A second, larger probe for TorchScript modules traced with sizes baked in.
const PROBE_SIZE_FALLBACK: i64 = 256;

#[derive(Debug)]
enum Net {
    EfficientNet(Box<EfficientNetLite0>),
    TorchScript(TorchScriptBackbone),
}

/// A feature extractor with its configured layers.
///
/// [`Backbone::features`] maps `[N, 3, H, W]` normalised images to one `[N, C_i, H_i, W_i]`
/// tensor per configured layer, where `C_i = feature_channels()[i]` and
/// `H_i ~ H / feature_strides()[i]`.
#[derive(Debug)]
pub struct Backbone {
    net: Net,
    kind: BackboneKind,
    /// Configured layer names, as written in the config.
    layers: Vec<String>,
    /// Per configured layer: the stage (0-based) or output index it reads.
    indices: Vec<usize>,
    feature_channels: Vec<i64>,
    feature_strides: Vec<i64>,
    device: Device,
}

const EFFICIENTNET_LAYERS: &str = "stage1, stage2, stage3, stage4, stage5, stage6, stage7";

/// Parses layer names into 0-based stage / output indices (errors are [`Error::Config`]).
fn parse_layers(kind: BackboneKind, layers: &[String]) -> Result<Vec<usize>> {
    if layers.is_empty() {
        return Err(Error::Config(match kind {
            BackboneKind::EfficientnetLite0 => {
                format!("backbone.layers is empty: name at least one of {EFFICIENTNET_LAYERS}")
            }
            BackboneKind::Torchscript => "backbone.layers is empty: name at least one output index (0, 1, ...)".into(),
        }));
    }
    let mut indices = Vec::with_capacity(layers.len());
    for name in layers {
        let trimmed = name.trim();
        let index = match kind {
            BackboneKind::EfficientnetLite0 => trimmed
                .to_ascii_lowercase()
                .strip_prefix("stage")
                .and_then(|k| k.parse::<usize>().ok())
                .filter(|k| (1..=efficientnet_lite::NUM_STAGES).contains(k))
                .map(|k| k - 1)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "backbone layer '{name}' is not an EfficientNet-Lite0 layer; valid layers: {EFFICIENTNET_LAYERS}"
                    ))
                })?,
            BackboneKind::Torchscript => trimmed.parse::<usize>().map_err(|_| {
                Error::Config(format!(
                    "backbone layer '{name}' is not a TorchScript output index; valid layers: 0, 1, ... (the position of the output in what forward returns)"
                ))
            })?,
        };
        if indices.contains(&index) {
            return Err(Error::Config(format!("backbone layer '{name}' is listed twice")));
        }
        indices.push(index);
    }
    Ok(indices)
}

impl Backbone {
    /// Loads the network `cfg` names (`weights`: the EfficientNet-Lite0 safetensors file or the
    /// TorchScript module) onto `device` and checks `cfg.layers` against it.
    ///
    /// Errors: [`Error::Config`] for an unknown layer name (listing the valid ones),
    /// [`Error::Model`] for a missing or unusable weight file.
    pub fn new(cfg: &BackboneConfig, weights: &Path, device: Device) -> Result<Self> {
        let indices = parse_layers(cfg.kind, &cfg.layers)?;
        let net = match cfg.kind {
            BackboneKind::EfficientnetLite0 => {
                let mut n = EfficientNetLite0::load(weights, device)?.into_inference_form()?;
                if crate::device::computes_in_bf16(device) {
                    n.use_bfloat16()?;
                }
                Net::EfficientNet(Box::new(n))
            }
            BackboneKind::Torchscript => Net::TorchScript(TorchScriptBackbone::new(weights, device)?),
        };
        let mut backbone = Self {
            net,
            kind: cfg.kind,
            layers: cfg.layers.clone(),
            indices,
            feature_channels: Vec::new(),
            feature_strides: Vec::new(),
            device,
        };
        backbone.probe(weights)?;
        Ok(backbone)
    }

    /// Runs a dummy forward to check the layers and measure channels and strides.
    fn probe(&mut self, weights: &Path) -> Result<()> {
        let run = |size: i64| -> Result<Vec<Tensor>> {
            let x = Tensor::f_zeros([1, 3, size, size], (Kind::Float, self.device))?;
            match &self.net {
                Net::EfficientNet(net) => {
                    let upto = self.indices.iter().max().map_or(1, |i| i + 1);
                    net.forward_stages(&x, upto)
                }
                Net::TorchScript(net) => net.forward(&x),
            }
        };
        let (size, outputs) = match run(PROBE_SIZE) {
            Ok(outputs) => (PROBE_SIZE, outputs),
            Err(first) => match (&self.net, run(PROBE_SIZE_FALLBACK)) {
                (Net::TorchScript(_), Ok(outputs)) => (PROBE_SIZE_FALLBACK, outputs),
                _ => {
                    return Err(Error::model(
                        weights,
                        format!("forward on a 1x3x{PROBE_SIZE}x{PROBE_SIZE} zero probe failed: {first}"),
                    ))
                }
            },
        };
        let mut channels = Vec::with_capacity(self.indices.len());
        let mut strides = Vec::with_capacity(self.indices.len());
        for (name, &index) in self.layers.iter().zip(&self.indices) {
            let t = outputs.get(index).ok_or_else(|| {
                let n = outputs.len();
                let valid: Vec<String> = (0..n).map(|i| i.to_string()).collect();
                Error::Config(format!(
                    "backbone layer '{name}': the TorchScript module {} returns {n} output(s); valid layers: {}",
                    weights.display(),
                    valid.join(", ")
                ))
            })?;
            let s = t.size();
            if s.len() != 4 || s[0] != 1 || s[2] < 1 {
                return Err(Error::model(
                    weights,
                    format!(
                        "output {index} (layer '{name}') has shape {s:?} for a 1x3x{size}x{size} input; expected [1, C, H, W]"
                    ),
                ));
            }
            channels.push(s[1]);
            strides.push(((size as f64) / (s[2] as f64)).round().max(1.0) as i64);
        }
        self.feature_channels = channels;
        self.feature_strides = strides;
        Ok(())
    }

    /// Feature maps for `x` (`[N, 3, H, W]`, normalised, on [`Self::device`]): one
    /// `[N, C_i, H_i, W_i]` tensor per configured layer, in config order. Runs without gradients.
    pub fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match &self.net {
            Net::EfficientNet(net) => {
                let upto = self.indices.iter().max().map_or(1, |i| i + 1);
                let outputs = net.forward_stages(x, upto)?;
                Ok(self.indices.iter().map(|&i| outputs[i].shallow_clone()).collect())
            }
            Net::TorchScript(net) => {
                let outputs = net.forward(x)?;
                self.layers
                    .iter()
                    .zip(&self.indices)
                    .map(|(name, &i)| {
                        let t = outputs.get(i).ok_or_else(|| {
                            Error::model(
                                net.path(),
                                format!("layer '{name}' needs output {i} but forward returned {} output(s)", outputs.len()),
                            )
                        })?;
                        if t.dim() != 4 {
                            return Err(Error::model(
                                net.path(),
                                format!("output {i} (layer '{name}') has shape {:?}; expected [N, C, H, W]", t.size()),
                            ));
                        }
                        Ok(t.shallow_clone())
                    })
                    .collect()
            }
        }
    }

    /// The network family.
    pub fn kind(&self) -> BackboneKind {
        self.kind
    }

    /// The configured layer names, in the order [`Self::features`] returns them.
    pub fn layers(&self) -> &[String] {
        &self.layers
    }

    /// Channels `C_i` of each configured layer.
    pub fn feature_channels(&self) -> &[i64] {
        &self.feature_channels
    }

    /// Stride of each configured layer relative to the input (input height / feature height,
    /// measured on a square probe; e.g. 8 for EfficientNet `stage3`).
    pub fn feature_strides(&self) -> &[i64] {
        &self.feature_strides
    }

    /// The device the network lives on.
    pub fn device(&self) -> Device {
        self.device
    }
}

/// The set-up's EfficientNet-Lite0 weights, for tests that need the real network; `None` (with a
/// note on stderr, so the test can return early) on a checkout where `scripts/setup.sh` has not run.
#[cfg(test)]
pub(crate) fn lite0_weights_for_tests() -> Option<std::path::PathBuf> {
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet_lite0.safetensors");
    if weights.is_file() {
        Some(weights)
    } else {
        eprintln!("skipping: {} not found (run scripts/setup.sh)", weights.display());
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: BackboneKind, layers: &[&str]) -> BackboneConfig {
        BackboneConfig { kind, layers: layers.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn backbone_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Backbone>();
    }

    #[test]
    fn layer_names_are_parsed_at_the_boundary() {
        let eff = BackboneKind::EfficientnetLite0;
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_layers(eff, &names(&["stage3", "stage5"])).unwrap(), [2, 4]);
        assert_eq!(parse_layers(eff, &names(&["Stage7", " stage1 "])).unwrap(), [6, 0]);
        for bad in ["layer3", "stage0", "stage8", "stage", "3", ""] {
            let err = parse_layers(eff, &names(&[bad])).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad}: {err}");
            assert!(err.to_string().contains("stage1, stage2"), "{err}");
        }
        assert!(matches!(parse_layers(eff, &[]), Err(Error::Config(_))));
        assert!(matches!(parse_layers(eff, &names(&["stage2", "stage2"])), Err(Error::Config(_))));

        let ts = BackboneKind::Torchscript;
        assert_eq!(parse_layers(ts, &names(&["1", "0"])).unwrap(), [1, 0]);
        for bad in ["stage1", "-1", "x"] {
            let err = parse_layers(ts, &names(&[bad])).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_layer_is_config_error_before_loading() {
        let missing = Path::new("/nonexistent/weights.safetensors");
        let err = Backbone::new(&cfg(BackboneKind::EfficientnetLite0, &["layer2"]), missing, Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        let err = Backbone::new(&cfg(BackboneKind::EfficientnetLite0, &["stage2"]), missing, Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Model { .. }), "{err}");
    }

    /// A TorchScript "feature extractor" returning (2x2 average, 4x4 average stacked with its
    /// double): 3 channels at stride 2, 6 channels at stride 4.
    fn script_module(path: &Path) {
        crate::models::backbone::torchscript::tests::write_script_module(
            path,
            "Tuple[Tensor, Tensor]",
            "    _0 = torch.avg_pool2d(x, [2, 2], [2, 2], [0, 0])\n    \
             _1 = torch.avg_pool2d(x, [4, 4], [4, 4], [0, 0])\n    \
             _2 = torch.cat([_1, torch.mul(_1, 2.)], 1)\n    \
             return (_0, _2)",
        );
    }

    #[test]
    fn torchscript_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("extractor.pt");
        script_module(&file);

        let backbone = Backbone::new(&cfg(BackboneKind::Torchscript, &["1"]), &file, Device::Cpu).unwrap();
        assert_eq!(backbone.kind(), BackboneKind::Torchscript);
        assert_eq!(backbone.feature_channels(), [6]);
        assert_eq!(backbone.feature_strides(), [4]);
        let x = Tensor::randn([2, 3, 48, 40], (Kind::Float, Device::Cpu));
        let features = backbone.features(&x).unwrap();
        assert_eq!(features.len(), 1);
        assert_eq!(features[0].size(), vec![2, 6, 12, 10]);
        let p4 = x.avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None);
        let expected = Tensor::cat(&[&p4, &(&p4 * 2.0)], 1);
        assert!(features[0].allclose(&expected, 1e-5, 1e-6, false));

        // both outputs, in config order
        let both = Backbone::new(&cfg(BackboneKind::Torchscript, &["1", "0"]), &file, Device::Cpu).unwrap();
        assert_eq!(both.feature_channels(), [6, 3]);
        assert_eq!(both.feature_strides(), [4, 2]);
        let f = both.features(&x).unwrap();
        assert_eq!(f[1].size(), vec![2, 3, 24, 20]);

        // an index past the outputs is a config error naming the valid ones
        let err = Backbone::new(&cfg(BackboneKind::Torchscript, &["2"]), &file, Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        assert!(err.to_string().contains("valid layers: 0, 1"), "{err}");

        // wrong input is an error, not a panic
        assert!(backbone.features(&Tensor::zeros([5], (Kind::Float, Device::Cpu))).is_err());
    }

    #[test]
    fn corrupt_torchscript_is_model_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("corrupt.pt");
        std::fs::write(&file, vec![0u8; 1000]).unwrap();
        let err = Backbone::new(&cfg(BackboneKind::Torchscript, &["0"]), &file, Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Model { .. }), "{err}");
        // a truncated real module
        let good = dir.path().join("good.pt");
        script_module(&good);
        let bytes = std::fs::read(&good).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        let err = Backbone::new(&cfg(BackboneKind::Torchscript, &["0"]), &file, Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Model { .. }), "{err}");
    }

    #[test]
    fn efficientnet_backbone_when_weights_present() {
        let Some(weights) = lite0_weights_for_tests() else { return };
        let backbone =
            Backbone::new(&cfg(BackboneKind::EfficientnetLite0, &["stage5", "stage3"]), &weights, Device::Cpu).unwrap();
        assert_eq!(backbone.feature_channels(), [112, 40]);
        assert_eq!(backbone.feature_strides(), [16, 8]);
        let x = Tensor::randn([1, 3, 96, 128], (Kind::Float, Device::Cpu));
        let f = backbone.features(&x).unwrap();
        assert_eq!(f[0].size(), vec![1, 112, 6, 8]);
        assert_eq!(f[1].size(), vec![1, 40, 12, 16]);
        let bad = Tensor::randn([1, 1, 96, 128], (Kind::Float, Device::Cpu));
        assert!(backbone.features(&bad).is_err());
    }
}
