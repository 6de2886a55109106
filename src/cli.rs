//! The command line of `anomaly_inspector`: every subcommand's arguments, typed. It lives in the
//! library so that its grammar can be tested without running the program; the binary parses,
//! dispatches to the library, draws progress bars and prints.
use std::path::PathBuf;

use clap::{ArgMatches, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::bench::parse_frame_size;
#[cfg(doc)]
use crate::config::options::refuse_other_methods_options;
use crate::config::options::{PatchCoreOptions, SharedModelOptions, TrainingOptions};
use crate::config::{DeviceChoice, Precision};
use crate::evaluation::{CalibrateOptions, EvalOptions};
use crate::model_file::Method;
use crate::synthetic::SyntheticConfig;
use crate::training::FitOptions;

/// The command line of `anomaly_inspector`.
#[derive(Parser, Debug)]
#[command(name = "anomaly_inspector", version, about = "Surface anomaly detection: fit, predict, demo data")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Number format on the CPU: auto (bfloat16 where the CPU multiplies it natively, about a
    /// quarter faster at the same AUROC; float32 elsewhere) or float32 (the same scores on every
    /// machine)
    #[arg(long, global = true, value_enum, default_value_t = Precision::Auto)]
    pub precision: Precision,
}

impl Cli {
    /// Parses `args` (the program's name first), keeping the matches as well: `fit` asks them
    /// which options were typed ([`refuse_other_methods_options`]).
    pub fn try_parse_with_matches<I, T>(args: I) -> Result<(Self, ArgMatches), clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        Ok((Self::from_arg_matches(&matches)?, matches))
    }
}

/// The subcommands.
// Parsed once per run: boxing fit's larger arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fit a model on the defect-free images (train/good) of an MVTec-layout folder (SuperSimpleNet
    /// also on labelled defective ones in train/<type>/).
    #[command(
        after_help = "The options most fits need; `fit --help` lists every option: PatchCore's search and map, the \
                      backbone, the training schedule.",
        after_long_help = "Every default was chosen on the mean over several data sets (README, \"Defaults chosen on \
                           the mean over every set\"); a model keeps the settings it was fitted with."
    )]
    Fit(FitArgs),
    /// Score images with a model; write heatmap and overlay PNGs and one JSON line per image.
    Predict(PredictArgs),
    /// Write the built-in synthetic data set (MVTec layout) used by the demo and the tests.
    Synth(SynthArgs),
    /// Evaluate a model on the labelled test images of an MVTec-layout folder: image AUROC,
    /// F1-max, pixel AUROC, AUPRO, per defect type, and speed; writes a JSON report.
    Eval(EvalArgs),
    /// Set a model's thresholds at the best F1 on labelled validation images (good and
    /// defective, with masks; not the images you evaluate on). The old model.json is kept.
    Calibrate(CalibrateArgs),
    /// Time the engine's stages (decode, preprocess, network, kNN, post-processing) against the
    /// model's own forward + kNN, and the kNN against memory-bank size; prints a table.
    Bench(BenchArgs),
}

/// `anomaly_inspector fit`.
#[derive(Args, Debug)]
pub struct FitArgs {
    /// Data set root with train/good/*.png|jpg (MVTec AD layout).
    #[arg(long)]
    pub data: PathBuf,
    /// Model directory to write (an existing one is kept as <out>.previous).
    #[arg(long)]
    pub out: PathBuf,
    /// Detection method.
    #[arg(long, value_enum, default_value_t = Method::Patchcore)]
    pub method: Method,
    /// Options every method takes.
    #[command(flatten)]
    pub shared: SharedModelOptions,
    /// Hold out every N-th good image for calibration (PatchCore adds them to its bank after).
    #[arg(long, default_value_t = FitOptions::default().holdout_every, hide_short_help = true)]
    pub holdout_every: usize,
    /// Synthetic-defect copies of held-out images to score after the fit, a sanity figure
    /// that needs no defective image (0: skip).
    #[arg(long, default_value_t = FitOptions::default().self_check_images, value_name = "IMAGES", hide_short_help = true)]
    pub self_check: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Name shown as model_id in results (default: the directory name).
    #[arg(long, default_value = "")]
    pub name: String,
    /// PatchCore's own options (the backbone's also SuperSimpleNet's).
    #[command(flatten, next_help_heading = "PatchCore options")]
    pub patchcore: PatchCoreOptions,
    /// The trained methods' options.
    #[command(flatten, next_help_heading = "Training options (DRAEM, SuperSimpleNet)")]
    pub training: TrainingOptions,
}

/// `anomaly_inspector predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model directory written by `fit`.
    #[arg(long)]
    pub model: PathBuf,
    /// Images or directories of images.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output directory for <stem>_heatmap.png, <stem>_overlay.png and results.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Normalised threshold (0.5 = calibrated).
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f32,
    /// Minimum region area in pixels.
    #[arg(long)]
    pub min_region_area: Option<u32>,
}

/// `anomaly_inspector synth`.
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Where to write the data set.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = SyntheticConfig::default().seed)]
    pub seed: u64,
    /// Defect-free training images.
    #[arg(long, default_value_t = SyntheticConfig::default().n_train)]
    pub n_train: usize,
}

/// `anomaly_inspector eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model directory written by `fit`.
    #[arg(long)]
    pub model: PathBuf,
    /// Data set root in the MVTec AD layout: test/<good|defect>/ images and
    /// ground_truth/<defect>/<stem>_mask.png masks.
    #[arg(long)]
    pub data: PathBuf,
    /// The JSON report to write.
    #[arg(long)]
    pub json: PathBuf,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// What to evaluate and how.
    #[command(flatten)]
    pub options: EvalOptions,
}

/// `anomaly_inspector calibrate`.
#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// Model directory written by `fit` (its model.json is rewritten; the old one is kept as
    /// model.json.previous).
    #[arg(long)]
    pub model: PathBuf,
    /// Validation images in the MVTec AD layout: test/good/, test/<defect>/ and
    /// ground_truth/<defect>/<stem>_mask.png. Use images kept apart from the ones you evaluate on.
    #[arg(long)]
    pub data: PathBuf,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// How to compare pixels.
    #[command(flatten)]
    pub options: CalibrateOptions,
    /// Print the thresholds found without changing the model.
    #[arg(long)]
    pub dry_run: bool,
}

/// `anomaly_inspector bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model directories to time (each at each --frame size).
    #[arg(long, required = true)]
    pub model: Vec<PathBuf>,
    /// Image whose pixels are used as the frame (resized to each --frame size).
    #[arg(long)]
    pub image: PathBuf,
    /// Frame sizes WxH fed to the engine.
    #[arg(long, value_delimiter = ',', default_value = "640x480", value_parser = parse_frame_size)]
    pub frame: Vec<(u32, u32)>,
    /// Timed repetitions per stage (medians are reported).
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// libtorch CPU threads (as the node's inference_threads; default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Memory-bank sizes for the kNN scaling table (`--bank-rows` with no sizes: skip it).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1000,5000,20000,40000,100000")]
    pub bank_rows: Vec<i64>,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Also write the numbers as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::options::{refuse_other_methods_options, Preset};
    use crate::config::BackboneKind;

    /// `fit --data d --out m` plus `extra`: the parsed arguments and the fit subcommand's matches.
    fn fit(extra: &[&str]) -> (FitArgs, ArgMatches) {
        let args = ["anomaly_inspector", "fit", "--data", "d", "--out", "m"].iter().chain(extra);
        let (cli, matches) = Cli::try_parse_with_matches(args).unwrap();
        let Command::Fit(fit) = cli.command else { panic!("not fit: {cli:?}") };
        (fit, matches.subcommand_matches("fit").unwrap().clone())
    }

    #[test]
    fn fit_defaults_are_patchcore_with_the_built_in_backbone_and_draem_cpu_small() {
        let (a, m) = fit(&[]);
        assert_eq!(
            (a.method, a.patchcore.backbone, a.training.preset),
            (Method::Patchcore, BackboneKind::EfficientnetLite0, Preset::CpuSmall)
        );
        assert_eq!((a.holdout_every, a.training.checkpoint_every, a.device), (5, 250, DeviceChoice::Auto));
        refuse_other_methods_options(a.method, &m).unwrap();
        let (a, _) = fit(&["--method", "draem", "--preset", "paper", "--backbone", "torchscript"]);
        assert_eq!(
            (a.method, a.training.preset, a.patchcore.backbone),
            (Method::Draem, Preset::Paper, BackboneKind::Torchscript)
        );
        for bad in [["--method", "knn"], ["--preset", "huge"], ["--backbone", "resnet"]] {
            let args = ["anomaly_inspector", "fit", "--data", "d", "--out", "m"].iter().chain(&bad);
            assert!(Cli::try_parse_with_matches(args).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fit_short_help_shows_the_options_most_fits_need_and_long_help_every_one() {
        let mut cli = Cli::command();
        cli.build();
        let fit = cli.find_subcommand_mut("fit").unwrap();
        let options = |help: &str| help.lines().filter(|l| l.trim_start().starts_with("--")).count();
        let (short, long) = (fit.render_help().to_string(), fit.render_long_help().to_string());
        for everyday in ["--data", "--out", "--method", "--image-size", "--device", "--tiles", "--preset", "--epochs", "--resume"]
        {
            assert!(short.contains(everyday) && long.contains(everyday), "{everyday}");
        }
        for expert in ["--guided-bandwidth", "--knn-probes", "--density-neighbors", "--noise-std", "--holdout-every"] {
            assert!(!short.contains(expert) && long.contains(expert), "{expert}");
        }
        assert!(options(&short) <= 15 && options(&long) >= 35, "short {} long {}", options(&short), options(&long));
        assert!(short.contains("`fit --help` lists every option"), "{short}");
    }

    #[test]
    fn precision_is_one_option_for_every_subcommand() {
        let parse =
            |args: &[&str]| Cli::try_parse_with_matches(["anomaly_inspector"].iter().chain(args)).map(|(c, _)| c.precision);
        let eval = ["eval", "--model", "m", "--data", "d", "--json", "j"];
        assert_eq!(parse(&eval).unwrap(), Precision::Auto);
        let typed = [&eval[..], &["--precision", "float32"]].concat();
        assert_eq!(parse(&typed).unwrap(), Precision::Float32);
        assert_eq!(parse(&["--precision", "float32", "synth", "--out", "o"]).unwrap(), Precision::Float32);
        assert!(parse(&[&eval[..], &["--precision", "half"]].concat()).is_err());
    }

    #[test]
    fn fit_refuses_the_other_methods_options_by_name() {
        let (a, m) = fit(&["--method", "draem", "--keep-aspect", "--layers", "stage3", "--steps", "5"]);
        let msg = refuse_other_methods_options(a.method, &m).unwrap_err().to_string();
        assert!(msg.contains("another method") && msg.ends_with("--layers, --keep-aspect"), "{msg}");
        let (a, m) = fit(&["--epochs", "2", "--checkpoint-every", "0", "--image-size", "128"]);
        let msg = refuse_other_methods_options(a.method, &m).unwrap_err().to_string();
        assert!(msg.contains("training options") && msg.ends_with("--epochs, --checkpoint-every"), "{msg}");
        let (a, m) = fit(&["--method", "draem", "--epochs", "2", "--image-size", "128", "--seed", "3"]);
        refuse_other_methods_options(a.method, &m).unwrap();
    }

    #[test]
    fn eval_calibrate_and_bench_options_keep_their_defaults_and_ranges() {
        let parse = |args: &[&str]| {
            Cli::try_parse_with_matches(std::iter::once(&"anomaly_inspector").chain(args)).map(|(c, _)| c.command)
        };
        let Ok(Command::Eval(e)) = parse(&["eval", "--model", "m", "--data", "d", "--json", "j"]) else { panic!() };
        assert_eq!(
            e.options,
            EvalOptions { split: crate::evaluation::TestSplit::All, limit_per_type: None, pixel_max_side: 256 }
        );
        assert!(parse(&["eval", "--model", "m", "--data", "d", "--json", "j", "--pixel-max-side", "4"]).is_err());
        let Ok(Command::Calibrate(c)) = parse(&["calibrate", "--model", "m", "--data", "d"]) else { panic!() };
        assert_eq!((c.options.pixel_max_side, c.dry_run), (256, false));
        let Ok(Command::Bench(b)) = parse(&["bench", "--model", "m", "--image", "i", "--frame", "64x48,256x256"]) else {
            panic!()
        };
        assert_eq!(b.frame, vec![(64, 48), (256, 256)]);
        assert_eq!(b.bank_rows, vec![1000, 5000, 20000, 40000, 100000]);
        let Ok(Command::Bench(b)) = parse(&["bench", "--model", "m", "--image", "i", "--bank-rows"]) else { panic!() };
        assert!(b.bank_rows.is_empty(), "--bank-rows without sizes skips the table");
        assert!(parse(&["bench", "--model", "m", "--image", "i", "--frame", "64y48"]).is_err());
        assert!(parse(&["bench", "--model", "m", "--image", "i", "--frame", "8x8"]).is_err(), "sides below 16 are refused");
    }
}
