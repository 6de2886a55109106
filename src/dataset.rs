//! Data sets in the MVTec AD folder layout (also used by MPDD and by VisA once converted):
//!
//! ```text
//! <root>/train/good/*.png            defect-free training images (required)
//! <root>/train/<defect>/*.png         labelled defective training images (optional; masks below
//!                                     make them fully labelled, without one only the verdict is known)
//! <root>/test/good/*.png             defect-free test images (optional)
//! <root>/test/<defect>/*.png         defective test images, one folder per defect type (optional)
//! <root>/ground_truth/<defect>/<stem>_mask.png   pixel masks, 255 = defect (optional)
//! ```
//!
//! Listing is sorted by name so that training (coreset sampling) and evaluation see the same
//! order on every machine.
use std::path::{Path, PathBuf};

use image::GrayImage;

use crate::error::{Error, Result};

/// File extensions taken as images (compared without regard to case).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "bmp"];

/// One test image and what is known about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestSample {
    /// The image file.
    pub path: PathBuf,
    /// The defect type (the folder name); `None` for a good image.
    pub defect: Option<String>,
    /// The ground-truth mask, where the data set has one.
    pub mask: Option<PathBuf>,
}

impl TestSample {
    /// Whether the image shows a defect.
    pub fn is_anomalous(&self) -> bool {
        self.defect.is_some()
    }
}

/// What the labels of a data set's training images allow a method to learn from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Supervision {
    /// Good images only (`train/good`): unsupervised.
    GoodOnly,
    /// Defective images with their verdict only (no masks): weakly labelled.
    ImageLabels,
    /// Every defective image with a mask: fully labelled.
    PixelMasks,
    /// Some defective images with masks, some without.
    Mixed,
}

impl Supervision {
    /// The regime of training on good images and the labelled `defective` ones.
    pub fn of(defective: &[TestSample]) -> Self {
        let with_mask = defective.iter().filter(|s| s.mask.is_some()).count();
        match (defective.len(), with_mask) {
            (0, _) => Supervision::GoodOnly,
            (_, 0) => Supervision::ImageLabels,
            (n, m) if n == m => Supervision::PixelMasks,
            _ => Supervision::Mixed,
        }
    }

    /// How it is said in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Supervision::GoodOnly => "unsupervised (good images only)",
            Supervision::ImageLabels => "weakly labelled (defective images without masks)",
            Supervision::PixelMasks => "fully labelled (defective images with masks)",
            Supervision::Mixed => "mixed (defective images with and without masks)",
        }
    }
}

/// An MVTec-layout data set: its training images and its labelled test images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MvtecDataset {
    /// The folder that holds `train/` (and maybe `test/`, `ground_truth/`).
    pub root: PathBuf,
    /// `train/good` images, sorted.
    pub train_good: Vec<PathBuf>,
    /// Labelled defective training images (`train/<defect>/`), sorted by folder then name, each
    /// with its mask when `ground_truth/` has one; empty for the usual good-only layout.
    pub train_defective: Vec<TestSample>,
    /// Test images, sorted by folder (defect type) then file name; empty without `test/`.
    pub test: Vec<TestSample>,
}

/// Whether `path` names an image file by its extension; hidden files (`.DS_Store`,
/// `._x.png` from macOS archives) are not images.
pub fn is_image(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    let ext_ok =
        path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)));
    !hidden && ext_ok && path.is_file()
}

/// Sorted entries of `dir` that pass `keep`.
fn list_sorted(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if keep(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The image files among `inputs`: a directory's images (sorted), any other path as given, so
/// that a missing or broken file is reported where it is read, among the others.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut images = Vec::new();
    for path in inputs {
        if path.is_dir() {
            images.extend(list_sorted(path, is_image)?);
        } else {
            images.push(path.clone());
        }
    }
    Ok(images)
}

impl MvtecDataset {
    /// Lists the data set at `root`. `train/good` must hold at least one image; `test/` and
    /// `ground_truth/` are optional, and a defective image without a mask gets `mask: None`.
    pub fn open(root: &Path) -> Result<Self> {
        let layout = "expected the MVTec AD layout: train/good/*.png|jpg (required), \
                      test/<good|defect>/*.png|jpg and ground_truth/<defect>/<name>_mask.png (optional)";
        let dataset_err = |reason: String| Error::Dataset { path: root.to_path_buf(), reason };
        if !root.is_dir() {
            return Err(dataset_err(format!("not a directory; {layout}")));
        }
        let train_dir = root.join("train").join("good");
        if !train_dir.is_dir() {
            return Err(dataset_err(format!("no train/good folder; {layout}")));
        }
        let train_good = list_sorted(&train_dir, is_image)?;
        if train_good.is_empty() {
            return Err(dataset_err(format!(
                "train/good holds no images (extensions {}); {layout}",
                IMAGE_EXTENSIONS.join(", ")
            )));
        }

        let test = labelled_images(root, &root.join("test"), true)?;
        let train_defective = labelled_images(root, &root.join("train"), false)?;
        // A defect's masks share one folder for train/ and test/, and eval must never score an
        // image that training used: one file name in both is refused, not guessed at.
        for t in &train_defective {
            if let Some(twin) = test.iter().find(|s| s.defect == t.defect && s.path.file_name() == t.path.file_name()) {
                return Err(dataset_err(format!(
                    "{} is both a training and a test image ({}): evaluation would score an image training used, \
                     and ground_truth/{} could not tell their masks apart; keep it in one of the two folders",
                    t.path.display(),
                    twin.path.display(),
                    t.defect.as_deref().unwrap_or("")
                )));
            }
        }
        Ok(Self { root: root.to_path_buf(), train_good, train_defective, test })
    }

    /// What the training labels allow: good only, or defective images with or without masks.
    pub fn supervision(&self) -> Supervision {
        Supervision::of(&self.train_defective)
    }

    /// One line on the training labels for `fit` to print, e.g. "200 good training images; 12
    /// defective of 3 types (8 with masks): mixed (...)".
    pub fn training_labels(&self) -> String {
        let good = format!("{} good training images", self.train_good.len());
        if self.train_defective.is_empty() {
            return format!("{good}: {}", Supervision::GoodOnly.describe());
        }
        let mut types: Vec<&str> = self.train_defective.iter().filter_map(|s| s.defect.as_deref()).collect();
        types.dedup();
        let masks = self.train_defective.iter().filter(|s| s.mask.is_some()).count();
        format!(
            "{good}; {} defective of {} type{} ({masks} with masks): {}",
            self.train_defective.len(),
            types.len(),
            if types.len() == 1 { "" } else { "s" },
            self.supervision().describe()
        )
    }

    /// The defect types present in the test set, sorted.
    pub fn defect_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.test.iter().filter_map(|s| s.defect.clone()).collect();
        types.dedup();
        types
    }

    /// Number of good test images.
    pub fn n_test_good(&self) -> usize {
        self.test.iter().filter(|s| !s.is_anomalous()).count()
    }

    /// Number of defective test images.
    pub fn n_test_anomalous(&self) -> usize {
        self.test.iter().filter(|s| s.is_anomalous()).count()
    }
}

/// The images in the type folders of `dir` (`test/` or `train/`), sorted by folder then name, with
/// their masks from `root/ground_truth/`. `good` is kept only when `keep_good` (train/good is
/// listed on its own); hidden folders are skipped; a missing `dir` is empty.
fn labelled_images(root: &Path, dir: &Path, keep_good: bool) -> Result<Vec<TestSample>> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for type_dir in list_sorted(dir, Path::is_dir)? {
        let Some(kind) = type_dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if kind.starts_with('.') || (kind == "good" && !keep_good) {
            continue;
        }
        let defect = (kind != "good").then_some(kind);
        for path in list_sorted(&type_dir, is_image)? {
            let mask = defect.as_deref().and_then(|d| find_mask(root, d, &path));
            out.push(TestSample { path, defect: defect.clone(), mask });
        }
    }
    Ok(out)
}

/// The mask of a defective image: `ground_truth/<defect>/<stem>_mask.png` (MVTec AD), else
/// the same stem with `.png` (some conversions keep the image's name).
fn find_mask(root: &Path, defect: &str, image: &Path) -> Option<PathBuf> {
    let stem = image.file_stem()?.to_str()?;
    let dir = root.join("ground_truth").join(defect);
    [format!("{stem}_mask.png"), format!("{stem}.png")].into_iter().map(|name| dir.join(name)).find(|p| p.is_file())
}

/// Loads a ground-truth mask as 0/255 at `width` x `height` (nearest-neighbour resizing keeps
/// it binary).
///
/// Pixels at or above 128 are defect; a mask whose maximum is 1 (some conversions store labels
/// 0/1) counts every non-zero pixel instead.
pub fn load_mask(path: &Path, width: u32, height: u32) -> Result<GrayImage> {
    if width == 0 || height == 0 {
        return Err(Error::BadImage(format!("mask size {width}x{height}: both sides must be at least 1")));
    }
    let mut mask = crate::imaging::load_gray(path)?;
    let cut = if mask.pixels().all(|p| p.0[0] <= 1) { 1 } else { 128 };
    for p in mask.pixels_mut() {
        p.0[0] = if p.0[0] >= cut { 255 } else { 0 };
    }
    if mask.dimensions() != (width, height) {
        mask = image::imageops::resize(&mask, width, height, image::imageops::FilterType::Nearest);
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch_png(path: &Path, w: u32, h: u32, value: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(w, h, image::Luma([value])).save(path).unwrap();
    }

    #[test]
    fn opens_mvtec_layout() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        touch_png(&r.join("train/good/001.png"), 4, 4, 10);
        touch_png(&r.join("train/good/000.PNG"), 4, 4, 10);
        std::fs::write(r.join("train/good/notes.txt"), "x").unwrap();
        std::fs::write(r.join("train/good/.hidden.png"), "x").unwrap();
        touch_png(&r.join("test/good/000.png"), 4, 4, 10);
        touch_png(&r.join("test/scratch/001.png"), 4, 4, 10);
        touch_png(&r.join("test/scratch/000.png"), 4, 4, 10);
        touch_png(&r.join("test/crack/000.png"), 4, 4, 10);
        touch_png(&r.join("ground_truth/scratch/000_mask.png"), 4, 4, 255);
        touch_png(&r.join("ground_truth/crack/000.png"), 4, 4, 255);

        let ds = MvtecDataset::open(r).unwrap();
        assert_eq!(ds.root, r);
        assert_eq!(ds.train_good, vec![r.join("train/good/000.PNG"), r.join("train/good/001.png")]);
        let names: Vec<_> = ds.test.iter().map(|s| s.path.strip_prefix(r).unwrap().to_path_buf()).collect();
        assert_eq!(
            names,
            ["test/crack/000.png", "test/good/000.png", "test/scratch/000.png", "test/scratch/001.png"].map(PathBuf::from)
        );
        assert_eq!(ds.test[0].defect.as_deref(), Some("crack"));
        assert_eq!(ds.test[0].mask, Some(r.join("ground_truth/crack/000.png")));
        assert!(!ds.test[1].is_anomalous() && ds.test[1].mask.is_none());
        assert_eq!(ds.test[2].mask, Some(r.join("ground_truth/scratch/000_mask.png")));
        assert!(ds.test[3].is_anomalous() && ds.test[3].mask.is_none());
        assert_eq!(ds.defect_types(), vec!["crack".to_string(), "scratch".to_string()]);
        assert_eq!((ds.n_test_good(), ds.n_test_anomalous()), (1, 3));
        // Deterministic.
        assert_eq!(MvtecDataset::open(r).unwrap(), ds);
    }

    #[test]
    fn labelled_defects_in_train_set_the_supervision() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        touch_png(&r.join("train/good/000.png"), 4, 4, 10);
        let ds = MvtecDataset::open(r).unwrap();
        assert!(ds.train_defective.is_empty());
        assert_eq!(ds.supervision(), Supervision::GoodOnly);
        assert!(ds.training_labels().starts_with("1 good training images: unsupervised"), "{}", ds.training_labels());
        // Image-level labels only: no masks.
        touch_png(&r.join("train/crack/010.png"), 4, 4, 200);
        touch_png(&r.join("train/.cache/x.png"), 4, 4, 200);
        let ds = MvtecDataset::open(r).unwrap();
        assert_eq!(ds.train_defective.len(), 1);
        assert_eq!(ds.train_defective[0].defect.as_deref(), Some("crack"));
        assert_eq!(ds.supervision(), Supervision::ImageLabels);
        // A mask for it: fully labelled; a second type without one: mixed. A mask without an
        // image changes nothing.
        touch_png(&r.join("ground_truth/crack/010_mask.png"), 4, 4, 255);
        touch_png(&r.join("ground_truth/crack/099_mask.png"), 4, 4, 255);
        assert_eq!(MvtecDataset::open(r).unwrap().supervision(), Supervision::PixelMasks);
        touch_png(&r.join("train/scratch/000.png"), 4, 4, 200);
        let ds = MvtecDataset::open(r).unwrap();
        assert_eq!(ds.supervision(), Supervision::Mixed);
        assert_eq!(ds.train_defective[0].mask, Some(r.join("ground_truth/crack/010_mask.png")));
        assert_eq!(
            ds.training_labels(),
            format!("1 good training images; 2 defective of 2 types (1 with masks): {}", Supervision::Mixed.describe())
        );
        // Test images are unaffected, and train/good never counts as a defect.
        assert!(ds.test.is_empty());
        // The same file in train/ and test/ is refused with both paths named.
        touch_png(&r.join("test/crack/011.png"), 4, 4, 200);
        assert!(MvtecDataset::open(r).is_ok(), "different names are fine");
        touch_png(&r.join("test/crack/010.png"), 4, 4, 200);
        match MvtecDataset::open(r) {
            Err(Error::Dataset { reason, .. }) => {
                assert!(reason.contains("train/crack/010.png") && reason.contains("test/crack/010.png"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn train_only_is_enough() {
        let dir = tempfile::tempdir().unwrap();
        touch_png(&dir.path().join("train/good/a.jpg"), 2, 2, 0);
        let ds = MvtecDataset::open(dir.path()).unwrap();
        assert_eq!(ds.train_good.len(), 1);
        assert!(ds.test.is_empty());
    }

    #[test]
    fn bad_layouts_say_what_is_expected() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for (setup, needle) in [(0, "no train/good"), (1, "no images")] {
            if setup == 1 {
                std::fs::create_dir_all(r.join("train/good")).unwrap();
                std::fs::write(r.join("train/good/readme.txt"), "x").unwrap();
            }
            match MvtecDataset::open(r) {
                Err(Error::Dataset { path, reason }) => {
                    assert_eq!(path, r);
                    assert!(reason.contains(needle) && reason.contains("train/good/*.png|jpg"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        match MvtecDataset::open(&r.join("missing")) {
            Err(Error::Dataset { reason, .. }) => {
                assert!(reason.contains("not a directory"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn masks_are_binary_and_resized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.png");
        let mut m = GrayImage::new(4, 2);
        m.put_pixel(0, 0, image::Luma([255]));
        m.put_pixel(1, 0, image::Luma([200]));
        m.put_pixel(2, 0, image::Luma([100]));
        m.save(&path).unwrap();
        let loaded = load_mask(&path, 4, 2).unwrap();
        assert_eq!(loaded.as_raw(), &vec![255, 255, 0, 0, 0, 0, 0, 0]);
        let big = load_mask(&path, 8, 4).unwrap();
        assert_eq!(big.dimensions(), (8, 4));
        assert!(big.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        assert_eq!(big.get_pixel(0, 0).0[0], 255);
        assert_eq!(big.get_pixel(7, 3).0[0], 0);
        // 0/1 label masks.
        let mut labels = GrayImage::new(2, 1);
        labels.put_pixel(1, 0, image::Luma([1]));
        labels.save(&path).unwrap();
        assert_eq!(load_mask(&path, 2, 1).unwrap().as_raw(), &vec![0, 255]);
        assert!(matches!(load_mask(&path, 0, 1), Err(Error::BadImage(_))));
        assert!(matches!(load_mask(&dir.path().join("none.png"), 2, 1), Err(Error::Io { .. })));
    }

    #[test]
    fn real_dataset_if_present() {
        let root = Path::new("/work/shared/data/magnetic_tile");
        if !root.join("train/good").is_dir() {
            eprintln!("skipping: {} not present", root.display());
            return;
        }
        let ds = MvtecDataset::open(root).unwrap();
        assert!(ds.train_good.len() > 100);
        assert!(ds.n_test_good() > 0 && ds.n_test_anomalous() > 0);
        assert!(ds.test.iter().filter(|s| s.is_anomalous()).all(|s| s.mask.is_some()));
        let sample = ds.test.iter().find(|s| s.is_anomalous()).unwrap();
        let img = crate::imaging::load(&sample.path).unwrap();
        let mask = load_mask(sample.mask.as_ref().unwrap(), img.width(), img.height()).unwrap();
        assert_eq!(mask.dimensions(), img.dimensions());
        assert!(mask.pixels().any(|p| p.0[0] == 255));
    }
}
