//! The `fit` command's model options, beside the configurations they fill. Each group of options
//! is one clap [`Args`] struct that applies itself to the configurations it fills, so a new
//! setting is added in one place, and which options belong to which method is known from the
//! structs themselves (plus the few a second method shares, [`refuse_other_methods_options`]).
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};

use crate::config::{
    default_backbone_weights, AnomalySource, BackboneConfig, BackboneKind, DraemConfig, ImageScore, PatchCoreConfig, Resize,
    Search, SuperSimpleNetConfig,
};
use crate::model_file::Method;
use crate::training::{read_checkpoint_state, read_supersimplenet_checkpoint, DraemTrainOptions, SuperSimpleNetTrainOptions};
use crate::{Error, Result};

/// Options every method takes.
#[derive(Args, Clone, Debug, Default, PartialEq)]
pub struct SharedModelOptions {
    /// Network input size in pixels (square).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Seed for every random choice.
    #[arg(long, hide_short_help = true)]
    pub seed: Option<u64>,
}

impl SharedModelOptions {
    /// Applies the options given to any method's input size and seed.
    pub fn apply(&self, preprocess: &mut crate::config::PreprocessConfig, seed: &mut u64) {
        if let Some(s) = self.image_size {
            preprocess.image_size = [s, s];
        }
        set(seed, self.seed);
    }
}

/// PatchCore's options of `fit`; each one left out keeps [`PatchCoreConfig::default`]'s value.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct PatchCoreOptions {
    /// PatchCore, SuperSimpleNet: feature extractor, efficientnet_lite0 (built in) or torchscript
    /// (give --backbone-weights).
    #[arg(long, value_enum, default_value_t = BackboneKind::EfficientnetLite0, hide_short_help = true)]
    pub backbone: BackboneKind,
    /// PatchCore, SuperSimpleNet: backbone weights, safetensors for efficientnet_lite0, a
    /// TorchScript .pt for torchscript.
    #[arg(long, hide_short_help = true)]
    pub backbone_weights: Option<PathBuf>,
    /// PatchCore, SuperSimpleNet: backbone layers, comma separated (efficientnet_lite0:
    /// stage1..stage7; torchscript: 0,1,..).
    #[arg(long, value_delimiter = ',', hide_short_help = true)]
    pub layers: Option<Vec<String>>,
    /// PatchCore: keep each image's aspect ratio, scaled down to at most the input's area (the
    /// default; the flag stays for scripts that name it).
    #[arg(long, conflicts_with = "stretch", hide_short_help = true)]
    pub keep_aspect: bool,
    /// PatchCore: stretch each image to the square input instead (the paper's and anomalib's
    /// input; the default before December 2026).
    #[arg(long, conflicts_with = "keep_aspect", hide_short_help = true)]
    pub stretch: bool,
    /// PatchCore: cut each frame into overlapping tiles of the input size after scaling it by
    /// SCALE (1 = the camera's own pixels, 0.5 = half), instead of resizing the whole frame:
    /// for small defects on large frames. The bank is fitted on tiles of the good images;
    /// time grows with the number of tiles (README, "Large frames, small defects").
    #[arg(long, value_name = "SCALE", conflicts_with_all = ["keep_aspect", "stretch"])]
    pub tiles: Option<f64>,
    /// Fraction of patches kept in the memory bank.
    #[arg(long, hide_short_help = true)]
    pub coreset_ratio: Option<f64>,
    /// Upper bound on memory-bank rows, whatever the ratio gives (default 40000; bounds memory
    /// and the search's cost).
    #[arg(long, hide_short_help = true)]
    pub max_bank_size: Option<usize>,
    /// Nearest-neighbour search the model will use: 0 = exact (default), N = approximate over
    /// the N nearest k-means cells of the bank (faster on large float32 banks; slower than the
    /// exact search where that runs in bfloat16, see README "Speed").
    #[arg(long, hide_short_help = true)]
    pub knn_probes: Option<usize>,
    /// Search each frame's patches only among those of the K training images most like it
    /// (SPADE's image retrieval; each training image keeps its own coreset). 0 = the whole bank
    /// (default). Faster, and more accurate on Magnetic-Tile (README).
    #[arg(long)]
    pub retrieval_images: Option<usize>,
    /// Dimension of the random projection the coreset is chosen in (at least the feature
    /// dimension: no projection, exact greedy k-center).
    #[arg(long, hide_short_help = true)]
    pub coreset_dim: Option<i64>,
    /// Side of the square of neighbouring patches averaged into each patch feature (odd; the
    /// paper's 3). Larger sees more context per patch.
    #[arg(long, hide_short_help = true)]
    pub neighbourhood: Option<i64>,
    /// Gaussian smoothing of the anomaly map, in network-input pixels (the paper's 4). Larger
    /// favours large, low-contrast defects over small sharp ones.
    #[arg(long, hide_short_help = true)]
    pub blur_sigma: Option<f64>,
    /// PatchCore: a second, wide smoothing in network-input pixels (off by default; 32 helped
    /// large low-contrast defects on Magnetic-Tile; 0 = off): each
    /// pixel scores at least the smoothed mean around it, so large low-contrast defects fill in
    /// while small sharp ones keep their peaks.
    #[arg(long, hide_short_help = true)]
    pub coarse_blur_sigma: Option<f64>,
    /// PatchCore: divide each patch distance by the bank's local spacing at its nearest row, the
    /// distance from that row to its K-th nearest other row (off by default: the paper's raw
    /// distances; 5 helped Magnetic-Tile; 0 = off).
    #[arg(long, value_name = "K", hide_short_help = true)]
    pub density_neighbors: Option<i64>,
    /// PatchCore: smooth each frame's patch scores among the patches that look alike (off by
    /// default; 0.45 helped Magnetic-Tile: the feature bandwidth relative to the frame's median
    /// feature distance; 0 = off), so that a defect region of one texture scores as a whole.
    #[arg(long, value_name = "B", hide_short_help = true)]
    pub guided_bandwidth: Option<f64>,
    /// PatchCore: spatial reach of that smoothing, in network-input pixels (default 48).
    #[arg(long, value_name = "PX", hide_short_help = true)]
    pub guided_sigma: Option<f64>,
}

impl PatchCoreOptions {
    /// Applies the options given to `cfg`. A TorchScript backbone without `--layers` takes its
    /// first output, since the EfficientNet stage names mean nothing to it. The command line's
    /// "0 = off" becomes the config's `None`; `--knn-probes` with `--retrieval-images` is refused.
    pub fn apply(&self, cfg: &mut PatchCoreConfig) -> Result<()> {
        self.apply_backbone(&mut cfg.backbone);
        if self.keep_aspect {
            cfg.preprocess.resize = Resize::KeepAspect;
        }
        if self.stretch {
            cfg.preprocess.resize = Resize::Stretch;
        }
        if let Some(scale) = self.tiles {
            cfg.preprocess.resize = Resize::tiles(scale);
        }
        set(&mut cfg.coreset.ratio, self.coreset_ratio);
        set(&mut cfg.coreset.max_rows, self.max_bank_size);
        set(&mut cfg.coreset.projection_dim, self.coreset_dim);
        let (probes, images) = cfg.search.switches();
        cfg.search = Search::from_switches(self.knn_probes.unwrap_or(probes), self.retrieval_images.unwrap_or(images))?;
        set(&mut cfg.neighbourhood, self.neighbourhood);
        set(&mut cfg.map.blur_sigma, self.blur_sigma);
        set(&mut cfg.map.coarse_blur_sigma, self.coarse_blur_sigma.map(|s| (s != 0.0).then_some(s)));
        set(&mut cfg.density_neighbors, self.density_neighbors.map(|k| (k != 0).then_some(k)));
        set(&mut cfg.map.guided_bandwidth, self.guided_bandwidth.map(|b| (b != 0.0).then_some(b)));
        set(&mut cfg.map.guided_sigma, self.guided_sigma);
        Ok(())
    }

    /// Applies the backbone options (also SuperSimpleNet's) to `backbone`.
    pub fn apply_backbone(&self, backbone: &mut BackboneConfig) {
        backbone.kind = self.backbone;
        match &self.layers {
            Some(layers) => backbone.layers = layers.clone(),
            None if self.backbone == BackboneKind::Torchscript => backbone.layers = vec!["0".into()],
            None => {}
        }
    }

    /// The backbone's weights file: the one given, or the built-in EfficientNet-Lite0's.
    pub fn backbone_weights(&self) -> Result<PathBuf> {
        match (&self.backbone_weights, self.backbone) {
            (Some(w), _) => Ok(w.clone()),
            (None, BackboneKind::EfficientnetLite0) => Ok(default_backbone_weights()),
            (None, BackboneKind::Torchscript) => {
                Err(Error::Config("--backbone torchscript needs --backbone-weights <module.pt>".into()))
            }
        }
    }
}

/// Starting settings of the trained methods (`fit --preset`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Minutes on 2 CPU cores (DraemConfig::cpu_small, SuperSimpleNetConfig::cpu_small).
    #[default]
    CpuSmall,
    /// The paper's network and schedule: a GPU's work (DraemConfig::paper, SuperSimpleNetConfig::paper).
    Paper,
}

impl Preset {
    /// The preset's DRAEM configuration.
    pub fn draem(self) -> DraemConfig {
        match self {
            Self::CpuSmall => DraemConfig::cpu_small(),
            Self::Paper => DraemConfig::paper(),
        }
    }

    /// The preset's SuperSimpleNet configuration.
    pub fn supersimplenet(self) -> SuperSimpleNetConfig {
        match self {
            Self::CpuSmall => SuperSimpleNetConfig::cpu_small(),
            Self::Paper => SuperSimpleNetConfig::paper(),
        }
    }
}

/// The training options of `fit` for the methods that train networks (DRAEM, SuperSimpleNet);
/// each one left out keeps the preset's (or the checkpoint's) value.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct TrainingOptions {
    /// Starting settings, cpu-small (minutes on 2 CPU cores) or paper (the paper's
    /// network and schedule: a GPU's work).
    #[arg(long, value_enum, default_value_t = Preset::CpuSmall)]
    pub preset: Preset,
    /// DRAEM: optimiser steps in all (when resuming, counted from the very start).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Passes over the training images (DRAEM: instead of --steps; SuperSimpleNet: rounded up).
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<f64>,
    /// DRAEM: channels of the first reconstructive block (paper 128); the discriminative
    /// U-Net uses half.
    #[arg(long, hide_short_help = true)]
    pub base_width: Option<i64>,
    /// Training images per step.
    #[arg(long, hide_short_help = true)]
    pub batch_size: Option<usize>,
    /// Learning rate (DRAEM: Adam's; SuperSimpleNet: the heads', the adaptor's is half of it,
    /// as in the paper).
    #[arg(long, hide_short_help = true)]
    pub lr: Option<f64>,
    /// SuperSimpleNet: standard deviation of the noise that simulates anomalies in the
    /// (standardised) features.
    #[arg(long, hide_short_help = true)]
    pub noise_std: Option<f64>,
    /// SuperSimpleNet: share of each batch taken from the labelled defective images in
    /// train/<type>/ when there are any (0 = one shuffle over all images).
    #[arg(long, hide_short_help = true)]
    pub defect_share: Option<f64>,
    /// Largest relative change of brightness each good training image gets (a gain drawn from
    /// 1 ± this, seeded), so that lighting drift in the cell is not taken for a defect.
    #[arg(long, hide_short_help = true)]
    pub brightness_jitter: Option<f64>,
    /// SuperSimpleNet: where the image score comes from: auto (the map's maximum on good images
    /// only, the classification head with labelled defects), classifier or map-max.
    #[arg(long, value_enum, hide_short_help = true)]
    pub image_score: Option<ImageScore>,
    /// DRAEM: where simulated anomalies take their texture from: training_images (default),
    /// procedural, or a folder of images.
    #[arg(long, hide_short_help = true)]
    pub anomaly_source: Option<AnomalySource>,
    /// Write a checkpoint into <out>/checkpoint every N steps (SuperSimpleNet: at the end of the
    /// epoch that reaches them; 0: only at the end).
    #[arg(long, default_value_t = DraemTrainOptions::default().checkpoint_every, hide_short_help = true)]
    pub checkpoint_every: usize,
    /// Continue the training in <out>/checkpoint with its settings; --steps or --epochs may
    /// extend it.
    #[arg(long)]
    pub resume: bool,
}

impl TrainingOptions {
    /// The DRAEM configuration the options apply to: with `--resume` the one of the checkpoint
    /// in `out`, else the preset's.
    pub fn starting_draem(&self, out: &Path) -> Result<DraemConfig> {
        if self.resume {
            Ok(read_checkpoint_state(out)?.config)
        } else {
            Ok(self.preset.draem())
        }
    }

    /// Applies the options given to `cfg`. `--epochs` becomes steps over `n_fit_images`, the
    /// training images left after the hold-out, in batches of the (final) batch size.
    pub fn apply_draem(&self, cfg: &mut DraemConfig, n_fit_images: usize) {
        set(&mut cfg.base_width, self.base_width);
        set(&mut cfg.batch_size, self.batch_size);
        set(&mut cfg.lr, self.lr);
        set(&mut cfg.anomaly_source, self.anomaly_source.clone());
        set(&mut cfg.brightness_jitter, self.brightness_jitter);
        if let Some(s) = self.steps {
            cfg.steps = s;
        } else if let Some(e) = self.epochs {
            cfg.steps = (e * n_fit_images as f64 / cfg.batch_size.max(1) as f64).ceil().max(1.0) as usize;
        }
    }

    /// Checkpointing and resuming, as the DRAEM trainer takes them.
    pub fn draem_train_options(&self) -> DraemTrainOptions {
        DraemTrainOptions { checkpoint_every: self.checkpoint_every, resume: self.resume }
    }

    /// The SuperSimpleNet configuration the options apply to: with `--resume` the one of the
    /// checkpoint in `out`, else the preset's.
    pub fn starting_supersimplenet(&self, out: &Path) -> Result<SuperSimpleNetConfig> {
        if self.resume {
            Ok(read_supersimplenet_checkpoint(out)?.config)
        } else {
            Ok(self.preset.supersimplenet())
        }
    }

    /// Applies the options given to `cfg` (`--lr` sets the heads' rate, the adaptor's half).
    pub fn apply_supersimplenet(&self, cfg: &mut SuperSimpleNetConfig) {
        set(&mut cfg.batch_size, self.batch_size);
        set(&mut cfg.noise_std, self.noise_std);
        set(&mut cfg.defect_share, self.defect_share);
        set(&mut cfg.brightness_jitter, self.brightness_jitter);
        set(&mut cfg.image_score, self.image_score);
        if let Some(lr) = self.lr {
            (cfg.head_lr, cfg.adaptor_lr) = (lr, lr / 2.0);
        }
        if let Some(e) = self.epochs {
            cfg.epochs = e.ceil().max(1.0) as usize;
        }
    }

    /// Checkpointing and resuming, as the SuperSimpleNet trainer takes them.
    pub fn supersimplenet_train_options(&self) -> SuperSimpleNetTrainOptions {
        SuperSimpleNetTrainOptions { checkpoint_every: self.checkpoint_every, resume: self.resume }
    }
}

/// The PatchCore options SuperSimpleNet takes too (it stands on the same backbone).
const SUPERSIMPLENET_FROM_PATCHCORE: [&str; 3] = ["--backbone", "--backbone-weights", "--layers"];
/// The training options only SuperSimpleNet takes.
const SUPERSIMPLENET_ONLY: [&str; 3] = ["--noise-std", "--defect-share", "--image-score"];
/// The training options only DRAEM takes.
const DRAEM_ONLY: [&str; 3] = ["--steps", "--base-width", "--anomaly-source"];

/// Refuses the options of the methods not chosen that were given on the command line (they
/// would be ignored silently otherwise). `matches` are those of the command that flattens
/// [`PatchCoreOptions`] and [`TrainingOptions`].
pub fn refuse_other_methods_options(method: Method, matches: &ArgMatches) -> Result<()> {
    let patchcore = given_on_command_line::<PatchCoreOptions>(matches);
    let training = given_on_command_line::<TrainingOptions>(matches);
    let (given, what) = match method {
        Method::Patchcore => (training, "training options given without --method draem or supersimplenet (add one)"),
        Method::Draem => {
            let mut given = patchcore;
            given.extend(training.into_iter().filter(|o| SUPERSIMPLENET_ONLY.contains(&o.as_str())));
            (given, "options of another method given with --method draem (DRAEM trains its own networks: drop them)")
        }
        Method::Supersimplenet => {
            let mut given: Vec<String> =
                patchcore.into_iter().filter(|o| !SUPERSIMPLENET_FROM_PATCHCORE.contains(&o.as_str())).collect();
            given.extend(training.into_iter().filter(|o| DRAEM_ONLY.contains(&o.as_str())));
            (given, "options of another method given with --method supersimplenet (drop them)")
        }
    };
    if given.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!("{what}: {}", given.join(", "))))
}

/// The options of `T` (as `--long-name`) that the user typed, defaults not counted.
fn given_on_command_line<T: Args>(matches: &ArgMatches) -> Vec<String> {
    // The struct's own arguments, read off a scratch command, so no list can fall out of date.
    let cmd = T::augment_args(clap::Command::new("options"));
    cmd.get_arguments()
        .filter(|arg| matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine))
        .map(|arg| format!("--{}", arg.get_long().unwrap_or(arg.get_id().as_str())))
        .collect()
}

/// Overwrites `field` with `value` when the option was given.
fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    /// A stand-in for `fit`'s arguments: the method plus both methods' options.
    #[derive(Parser, Debug)]
    struct Fit {
        #[arg(long, value_enum, default_value_t = Method::Patchcore)]
        method: Method,
        #[command(flatten)]
        shared: SharedModelOptions,
        #[command(flatten)]
        patchcore: PatchCoreOptions,
        #[command(flatten)]
        training: TrainingOptions,
    }

    fn parse(args: &[&str]) -> (Fit, ArgMatches) {
        let matches = Fit::command().try_get_matches_from(std::iter::once("fit").chain(args.iter().copied())).unwrap();
        (Fit::from_arg_matches(&matches).unwrap(), matches)
    }

    #[test]
    fn patchcore_options_fill_the_config_and_leave_the_rest_at_the_defaults() {
        let (fit, _) =
            parse(&["--coreset-ratio", "0.2", "--stretch", "--guided-sigma", "20", "--image-size", "128", "--seed", "7"]);
        let mut cfg = PatchCoreConfig::default();
        fit.patchcore.apply(&mut cfg).unwrap();
        fit.shared.apply(&mut cfg.preprocess, &mut cfg.seed);
        let defaults = PatchCoreConfig::default();
        let expected = PatchCoreConfig {
            coreset: crate::config::CoresetConfig { ratio: 0.2, ..defaults.coreset.clone() },
            map: crate::config::MapSmoothing { guided_sigma: 20.0, ..defaults.map.clone() },
            seed: 7,
            preprocess: crate::config::PreprocessConfig {
                image_size: [128, 128],
                resize: Resize::Stretch,
                ..PatchCoreConfig::default().preprocess
            },
            ..PatchCoreConfig::default()
        };
        assert_eq!(cfg, expected);
        assert_eq!(fit.patchcore.backbone_weights().unwrap(), default_backbone_weights());

        let (fit, _) = parse(&["--backbone", "torchscript"]);
        let mut cfg = PatchCoreConfig::default();
        fit.patchcore.apply(&mut cfg).unwrap();
        assert_eq!((cfg.backbone.kind, cfg.backbone.layers), (BackboneKind::Torchscript, vec!["0".to_string()]));
        assert!(fit.patchcore.backbone_weights().unwrap_err().to_string().contains("--backbone-weights"));
        assert!(Fit::command().try_get_matches_from(["fit", "--keep-aspect", "--stretch"]).is_err(), "one resize only");
    }

    #[test]
    fn draem_options_fill_the_preset_and_turn_epochs_into_steps() {
        let (fit, _) = parse(&["--method", "draem", "--preset", "paper", "--lr", "0.001", "--anomaly-source", "procedural"]);
        let mut cfg = fit.training.starting_draem(Path::new("/nonexistent")).unwrap();
        fit.training.apply_draem(&mut cfg, 10);
        assert_eq!(cfg, DraemConfig { lr: 0.001, anomaly_source: AnomalySource::Procedural, ..DraemConfig::paper() });
        let (fit, _) = parse(&["--method", "draem", "--epochs", "2.5", "--batch-size", "4"]);
        let mut cfg = fit.training.starting_draem(Path::new("/nonexistent")).unwrap();
        fit.training.apply_draem(&mut cfg, 10);
        assert_eq!((cfg.steps, cfg.base_width), (7, DraemConfig::cpu_small().base_width), "ceil(2.5 * 10 / 4)");
        let train = fit.training.draem_train_options();
        assert_eq!((train.checkpoint_every, train.resume), (DraemTrainOptions::default().checkpoint_every, false));
    }

    #[test]
    fn the_other_methods_options_are_refused_by_name_and_defaults_do_not_count() {
        let (_, m) = parse(&["--steps", "5", "--resume", "--preset", "paper", "--coreset-ratio", "0.2"]);
        let msg = refuse_other_methods_options(Method::Patchcore, &m).unwrap_err().to_string();
        assert!(msg.contains("training options") && msg.contains("--preset, --steps, --resume"), "{msg}");
        assert!(!msg.contains("--coreset-ratio") && !msg.contains("--checkpoint-every"), "{msg}");

        let (_, m) = parse(&["--method", "draem", "--keep-aspect", "--backbone", "torchscript", "--steps", "5"]);
        let msg = refuse_other_methods_options(Method::Draem, &m).unwrap_err().to_string();
        assert!(msg.contains("another method") && msg.contains("--backbone, --keep-aspect"), "{msg}");
        assert!(!msg.contains("--steps"), "{msg}");

        // Shared options and each method's own are fine.
        let (_, m) = parse(&["--method", "draem", "--steps", "5", "--image-size", "96", "--seed", "1"]);
        refuse_other_methods_options(Method::Draem, &m).unwrap();
        let (_, m) = parse(&["--coreset-ratio", "0.2", "--image-size", "96"]);
        refuse_other_methods_options(Method::Patchcore, &m).unwrap();

        // SuperSimpleNet shares the backbone with PatchCore and the training options with DRAEM.
        let ok = [
            "--method",
            "supersimplenet",
            "--layers",
            "stage3",
            "--epochs",
            "3",
            "--preset",
            "paper",
            "--lr",
            "0.01",
            "--image-score",
            "map-max",
        ];
        let (fit, m) = parse(&ok);
        refuse_other_methods_options(Method::Supersimplenet, &m).unwrap();
        let mut cfg = fit.training.starting_supersimplenet(Path::new("/nonexistent")).unwrap();
        fit.training.apply_supersimplenet(&mut cfg);
        fit.patchcore.apply_backbone(&mut cfg.backbone);
        let expected = SuperSimpleNetConfig {
            epochs: 3,
            head_lr: 0.01,
            adaptor_lr: 0.005,
            image_score: ImageScore::MapMax,
            backbone: BackboneConfig { layers: vec!["stage3".into()], ..BackboneConfig::default() },
            ..SuperSimpleNetConfig::paper()
        };
        assert_eq!(cfg, expected);
        let (_, m) = parse(&["--method", "supersimplenet", "--coreset-ratio", "0.2", "--steps", "5", "--base-width", "8"]);
        let msg = refuse_other_methods_options(Method::Supersimplenet, &m).unwrap_err().to_string();
        assert!(msg.ends_with("--coreset-ratio, --steps, --base-width"), "{msg}");
        let (_, m) = parse(&["--method", "draem", "--image-score", "classifier"]);
        let msg = refuse_other_methods_options(Method::Draem, &m).unwrap_err().to_string();
        assert!(msg.ends_with("--image-score"), "{msg}");
    }
}
