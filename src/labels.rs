//! The operator's labels: frames marked good or defective (with where the defect is, when it
//! was drawn), kept as an MVTec AD layout data set so that `fit --data` reads them like any
//! other set and a teach-in links them into the data set it fits on.
//!
//! Layout under the store's root: `train/good/<name>.png`, `train/<defect_type>/<name>.png`
//! and, for a drawn defect, `ground_truth/<defect_type>/<name>_mask.png` (0/255). Every file is
//! written to a hidden temporary file, synced and renamed, so a store never holds half a label
//! whatever happens to the process.
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, RgbImage};

use crate::dataset::is_image;
use crate::error::{Error, Result};
use crate::Roi;

/// The defect type of a defective label that names none.
pub const DEFAULT_DEFECT_TYPE: &str = "defective";

/// Where a defect is, as the operator drew it, in the pixels of the whole frame.
#[derive(Clone, Debug, PartialEq)]
pub enum DefectArea {
    /// An axis-aligned box.
    Box(Roi),
    /// A polygon (x, y) of at least 3 points; closed implicitly.
    Polygon(Vec<[f32; 2]>),
    /// A mask of the frame's size: non-zero is defect.
    Mask(GrayImage),
}

impl DefectArea {
    /// The area as a 0/255 mask of a `width` x `height` frame; an error when it does not fit
    /// the frame or covers no pixel.
    pub fn to_mask(&self, width: u32, height: u32) -> Result<GrayImage> {
        let mut mask = GrayImage::new(width, height);
        match self {
            DefectArea::Box(b) => {
                if b.width == 0 || b.height == 0 {
                    return Err(Error::Label(format!("box {}x{}: width and height must be at least 1", b.width, b.height)));
                }
                if u64::from(b.x) + u64::from(b.width) > u64::from(width)
                    || u64::from(b.y) + u64::from(b.height) > u64::from(height)
                {
                    return Err(Error::Label(format!(
                        "box [x {}, y {}, {}x{}] exceeds the {width}x{height} frame",
                        b.x, b.y, b.width, b.height
                    )));
                }
                for y in b.y..b.y + b.height {
                    for x in b.x..b.x + b.width {
                        mask.put_pixel(x, y, Luma([255]));
                    }
                }
            }
            DefectArea::Polygon(points) => {
                if points.iter().any(|p| !p[0].is_finite() || !p[1].is_finite()) {
                    return Err(Error::Label("polygon has a non-finite coordinate".into()));
                }
                // imageproc's polygon fill refuses a closing point equal to the first (it panics).
                let mut vertices: Vec<imageproc::point::Point<i32>> =
                    points.iter().map(|p| imageproc::point::Point::new(p[0].round() as i32, p[1].round() as i32)).collect();
                vertices.dedup();
                while vertices.len() > 1 && vertices.first() == vertices.last() {
                    vertices.pop();
                }
                if vertices.len() < 3 {
                    return Err(Error::Label(format!(
                        "polygon with {} distinct points: draw at least 3 (or send a box)",
                        vertices.len()
                    )));
                }
                imageproc::drawing::draw_polygon_mut(&mut mask, &vertices, Luma([255]));
            }
            DefectArea::Mask(m) => {
                if m.dimensions() != (width, height) {
                    return Err(Error::Label(format!(
                        "mask is {}x{}, the frame {width}x{height}: send a mask of the frame's size",
                        m.width(),
                        m.height()
                    )));
                }
                for (out, p) in mask.pixels_mut().zip(m.pixels()) {
                    out.0[0] = if p.0[0] > 0 { 255 } else { 0 };
                }
            }
        }
        if mask.pixels().all(|p| p.0[0] == 0) {
            return Err(Error::Label(format!("the defect area covers no pixel of the {width}x{height} frame")));
        }
        Ok(mask)
    }
}

/// What a frame was labelled.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// A good part.
    Good,
    /// A defective part of `defect_type` (a plain folder name), with its mask (0/255, the
    /// stored image's size) when the operator drew where the defect is.
    Defective {
        /// The folder name under `train/` and `ground_truth/`.
        defect_type: String,
        /// Where the defect is, or `None` for a verdict only.
        mask: Option<GrayImage>,
    },
}

impl Verdict {
    /// A short word for messages: "good", or the defect type.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Good => "good".into(),
            Verdict::Defective { defect_type, mask: Some(_) } => format!("{defect_type} (with its area)"),
            Verdict::Defective { defect_type, mask: None } => format!("{defect_type} (verdict only)"),
        }
    }
}

/// How many labels a store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LabelCounts {
    /// Images in `train/good/`.
    pub good: usize,
    /// Images in the defect type folders.
    pub defective: usize,
    /// Of the defective images, those with a mask.
    pub defective_with_mask: usize,
}

/// One stored label.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredLabel {
    /// The image file.
    pub image: PathBuf,
    /// The mask file, for a defect with its area.
    pub mask: Option<PathBuf>,
    /// The earlier label of the same name this one replaced (its description), if any.
    pub replaced: Option<String>,
}

/// A folder of labelled frames in the MVTec AD layout (see the module's documentation).
#[derive(Clone, Debug)]
pub struct LabelStore {
    root: PathBuf,
}

impl LabelStore {
    /// The store at `root` (created on the first label).
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores `image` as `name` with `verdict`, replacing an earlier label of the same name
    /// (which may have had another verdict). `name` is a plain file stem; a mask must have the
    /// image's size.
    pub fn add(&self, name: &str, image: &RgbImage, verdict: &Verdict) -> Result<StoredLabel> {
        check_plain_name(name, "label name")?;
        let (folder, mask) = match verdict {
            Verdict::Good => ("good", None),
            Verdict::Defective { defect_type, mask } => {
                check_plain_name(defect_type, "defect type")?;
                if defect_type == "good" {
                    return Err(Error::Label("defect type 'good': a defect needs another name".into()));
                }
                (defect_type.as_str(), mask.as_ref())
            }
        };
        if let Some(m) = mask {
            if m.dimensions() != image.dimensions() {
                return Err(Error::Label(format!(
                    "mask is {}x{}, the image {}x{}",
                    m.width(),
                    m.height(),
                    image.width(),
                    image.height()
                )));
            }
        }
        let earlier = self.find(name)?;
        let image_path = self.root.join("train").join(folder).join(format!("{name}.png"));
        let mask_path = self.root.join("ground_truth").join(folder).join(format!("{name}_mask.png"));
        // A stale mask beside the new image would make a verdict-only label a drawn one.
        if mask.is_none() {
            remove_if_present(&mask_path)?;
        }
        if let Some(m) = mask {
            save_png_atomically(&mask_path, m)?;
        }
        // The image last: once it is listed, its mask is already in place.
        save_png_atomically(&image_path, image)?;
        let mut replaced = None;
        for (old_image, old_verdict) in earlier {
            if old_image != image_path {
                remove_if_present(&old_image)?;
                if let Some(t) = old_verdict.strip_prefix("defect:") {
                    remove_if_present(&self.root.join("ground_truth").join(t).join(format!("{name}_mask.png")))?;
                }
            }
            replaced = Some(old_verdict.trim_start_matches("defect:").to_string());
        }
        Ok(StoredLabel { image: image_path, mask: mask.map(|_| mask_path), replaced })
    }

    /// The images stored as `name` (any verdict), with "good" or "defect:<type>".
    fn find(&self, name: &str) -> Result<Vec<(PathBuf, String)>> {
        let mut found = Vec::new();
        for (folder, images) in self.folders()? {
            for p in images {
                if p.file_stem().is_some_and(|s| s == name) {
                    let what = if folder == "good" { "good".to_string() } else { format!("defect:{folder}") };
                    found.push((p, what));
                }
            }
        }
        Ok(found)
    }

    /// Every folder under `train/` (sorted) with its images (sorted); empty before any label.
    fn folders(&self) -> Result<Vec<(String, Vec<PathBuf>)>> {
        let train = self.root.join("train");
        if !train.is_dir() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&train).map_err(|e| Error::io(&train, e))? {
            let dir = entry.map_err(|e| Error::io(&train, e))?.path();
            let Some(folder) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
            if !dir.is_dir() || folder.starts_with('.') {
                continue;
            }
            let mut images = Vec::new();
            for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                let p = e.map_err(|e| Error::io(&dir, e))?.path();
                if is_image(&p) {
                    images.push(p);
                }
            }
            images.sort();
            out.push((folder, images));
        }
        out.sort();
        Ok(out)
    }

    /// How many labels the store holds.
    pub fn counts(&self) -> Result<LabelCounts> {
        let mut counts = LabelCounts::default();
        for (folder, images) in self.folders()? {
            if folder == "good" {
                counts.good += images.len();
                continue;
            }
            counts.defective += images.len();
            let masks = self.root.join("ground_truth").join(&folder);
            counts.defective_with_mask += images
                .iter()
                .filter(|p| p.file_stem().and_then(|s| s.to_str()).is_some_and(|s| masks.join(format!("{s}_mask.png")).is_file()))
                .count();
        }
        Ok(counts)
    }

    /// Puts every label into the data set at `dataset` (same layout; names prefixed with
    /// `label_` so they never meet the data set's own files), hard-linked where the file system
    /// allows, else copied: the store stays as it is. Returns what was put there.
    pub fn link_into(&self, dataset: &Path) -> Result<LabelCounts> {
        let mut linked = LabelCounts::default();
        for (folder, images) in self.folders()? {
            for image in images {
                let Some(stem) = image.file_stem().and_then(|s| s.to_str()) else { continue };
                let ext = image.extension().and_then(|e| e.to_str()).unwrap_or("png");
                let mask = self.root.join("ground_truth").join(&folder).join(format!("{stem}_mask.png"));
                if folder == "good" {
                    linked.good += 1;
                } else {
                    linked.defective += 1;
                    if mask.is_file() {
                        linked.defective_with_mask += 1;
                        let to = dataset.join("ground_truth").join(&folder).join(format!("label_{stem}_mask.png"));
                        link_or_copy(&mask, &to)?;
                    }
                }
                // The image after its mask, as in `add`.
                link_or_copy(&image, &dataset.join("train").join(&folder).join(format!("label_{stem}.{ext}")))?;
            }
        }
        Ok(linked)
    }
}

/// Refuses anything but a plain file or folder name (letters, digits, '_', '-', '.'; not
/// starting with '.'), so a label can never write outside its store.
fn check_plain_name(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Label(format!("{what} '{name}': use letters, digits, '_', '-' or '.' (not first), at most 100")))
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).map_err(|e| Error::io(to, e))?;
    }
    Ok(())
}

/// Writes `image` as PNG to `path` through a hidden temporary file in the same folder, synced
/// before the rename: `path` holds the old file or the whole new one, never a part.
pub fn save_png_atomically<P>(path: &Path, image: &image::ImageBuffer<P, Vec<P::Subpixel>>) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
{
    use std::io::Write as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> Result<()> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
            .map_err(|e| Error::Decode(format!("{}: cannot encode PNG: {e}", path.display())))?;
        let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        file.write_all(&bytes).map_err(|e| Error::io(&tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    };
    let written = write();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself survives a power cut once the folder is synced (best effort: not every
    // file system lets a folder be opened for it).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl DefectArea {
    /// The area as a mask of the part of a `width` x `height` frame the model inspects (`roi`;
    /// None: all of it); an error when it does not fit the frame or misses the roi.
    pub fn to_mask_within(&self, width: u32, height: u32, roi: Option<Roi>) -> Result<GrayImage> {
        mask_within(&self.to_mask(width, height)?, roi)
    }
}

/// `mask` (of the whole frame) cut to `roi`, as the model sees the frame; an error when no
/// defect pixel lies inside it.
fn mask_within(mask: &GrayImage, roi: Option<Roi>) -> Result<GrayImage> {
    let Some(r) = roi else { return Ok(mask.clone()) };
    let cut = image::imageops::crop_imm(mask, r.x, r.y, r.width, r.height).to_image();
    if cut.dimensions() != (r.width, r.height) || cut.pixels().all(|p| p.0[0] == 0) {
        return Err(Error::Label(format!(
            "the defect area lies outside the roi [x {}, y {}, {}x{}] the model inspects",
            r.x, r.y, r.width, r.height
        )));
    }
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging;

    fn frame(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb([v, v, v]))
    }

    fn defect(t: &str, mask: Option<GrayImage>) -> Verdict {
        Verdict::Defective { defect_type: t.into(), mask }
    }

    #[test]
    fn areas_become_masks_of_the_frame_and_bad_areas_are_refused() {
        let b = DefectArea::Box(Roi { x: 2, y: 1, width: 3, height: 2 }).to_mask(8, 6).unwrap();
        assert_eq!(b.pixels().filter(|p| p.0[0] == 255).count(), 6);
        assert_eq!(b.get_pixel(2, 1).0[0], 255);
        assert_eq!(b.get_pixel(5, 1).0[0], 0);
        assert!(DefectArea::Box(Roi { x: 6, y: 0, width: 3, height: 1 }).to_mask(8, 6).is_err(), "box past the edge");
        assert!(DefectArea::Box(Roi { x: 0, y: 0, width: 0, height: 1 }).to_mask(8, 6).is_err(), "empty box");

        // A closed triangle (last point = first) is the same as an open one.
        let tri = vec![[1.0, 1.0], [6.0, 1.0], [1.0, 5.0], [1.0, 1.0]];
        let p = DefectArea::Polygon(tri).to_mask(8, 6).unwrap();
        assert_eq!(p.get_pixel(2, 2).0[0], 255);
        assert_eq!(p.get_pixel(6, 5).0[0], 0);
        let line = DefectArea::Polygon(vec![[1.0, 1.0], [3.0, 3.0], [3.0, 3.0]]);
        assert!(line.to_mask(8, 6).unwrap_err().to_string().contains("2 distinct points"));
        let outside = DefectArea::Polygon(vec![[100.0, 100.0], [120.0, 100.0], [110.0, 120.0]]);
        assert!(outside.to_mask(8, 6).unwrap_err().to_string().contains("covers no pixel"));
        assert!(DefectArea::Polygon(vec![[f32::NAN, 0.0], [1.0, 1.0], [2.0, 0.0]]).to_mask(8, 6).is_err());

        let mut m = GrayImage::new(8, 6);
        m.put_pixel(3, 3, Luma([1]));
        let mm = DefectArea::Mask(m).to_mask(8, 6).unwrap();
        assert_eq!(mm.get_pixel(3, 3).0[0], 255, "any non-zero value is defect");
        let err = DefectArea::Mask(GrayImage::new(4, 4)).to_mask(8, 6).unwrap_err().to_string();
        assert!(err.contains("4x4") && err.contains("8x6"), "{err}");
        assert!(DefectArea::Mask(GrayImage::new(8, 6)).to_mask(8, 6).is_err(), "an empty mask marks nothing");
    }

    #[test]
    fn masks_are_cut_to_the_roi_the_model_sees() {
        let mask = DefectArea::Box(Roi { x: 6, y: 0, width: 2, height: 2 }).to_mask(8, 6).unwrap();
        let cut = mask_within(&mask, Some(Roi { x: 4, y: 0, width: 4, height: 6 })).unwrap();
        assert_eq!(cut.dimensions(), (4, 6));
        assert_eq!(cut.get_pixel(2, 0).0[0], 255);
        assert!(mask_within(&mask, Some(Roi { x: 0, y: 0, width: 4, height: 6 })).is_err(), "defect outside the roi");
        assert_eq!(mask_within(&mask, None).unwrap(), mask);
    }

    #[test]
    fn labels_are_stored_in_the_mvtec_layout_and_relabelling_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let store = LabelStore::new(&dir.path().join("labels"));
        assert_eq!(store.counts().unwrap(), LabelCounts::default(), "an absent store is empty");
        let img = frame(8, 6, 100);
        let mask = DefectArea::Box(Roi { x: 1, y: 1, width: 2, height: 2 }).to_mask(8, 6).unwrap();

        let a = store.add("s1", &img, &Verdict::Good).unwrap();
        assert_eq!(a.image, store.root().join("train/good/s1.png"));
        assert_eq!(a.replaced, None);
        store.add("s2", &img, &defect("scratch", Some(mask.clone()))).unwrap();
        store.add("s3", &img, &defect("dent", None)).unwrap();
        let c = store.counts().unwrap();
        assert_eq!((c.good, c.defective, c.defective_with_mask), (1, 2, 1));

        // The store is a data set fit can read: masks where drawn, verdicts elsewhere.
        let ds = crate::dataset::MvtecDataset::open(store.root()).unwrap();
        assert_eq!(ds.train_good.len(), 1);
        assert_eq!(ds.train_defective.len(), 2);
        let scratch = ds.train_defective.iter().find(|s| s.defect.as_deref() == Some("scratch")).unwrap();
        assert_eq!(imaging::load_gray(scratch.mask.as_ref().unwrap()).unwrap(), mask);
        assert!(ds.train_defective.iter().any(|s| s.defect.as_deref() == Some("dent") && s.mask.is_none()));

        // Relabelled good -> scratch without area: the old image goes, no stale mask appears.
        let r = store.add("s1", &img, &defect("scratch", None)).unwrap();
        assert_eq!(r.replaced.as_deref(), Some("good"));
        // Relabelled with area -> verdict only in the same folder: the old mask goes.
        store.add("s2", &img, &defect("scratch", None)).unwrap();
        let c = store.counts().unwrap();
        assert_eq!((c.good, c.defective, c.defective_with_mask), (0, 3, 0));
        assert!(!store.root().join("ground_truth/scratch/s2_mask.png").exists());
        // And a defect relabelled good loses its mask too.
        store.add("s4", &img, &defect("dent", Some(mask.clone()))).unwrap();
        store.add("s4", &img, &Verdict::Good).unwrap();
        assert!(!store.root().join("ground_truth/dent/s4_mask.png").exists());
        assert!(store.root().join("train/good/s4.png").is_file());
        let leftovers: Vec<_> = walk(store.root()).into_iter().filter(|p| p.to_string_lossy().contains(".tmp-")).collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn bad_labels_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LabelStore::new(dir.path());
        let img = frame(8, 6, 1);
        for bad in ["../x", "a/b", ".hidden", "", "good"] {
            assert!(store.add("s", &img, &defect(bad, None)).is_err(), "defect type {bad:?} accepted");
        }
        assert!(store.add("../s", &img, &Verdict::Good).is_err());
        let small = GrayImage::from_pixel(4, 4, Luma([255]));
        assert!(store.add("s", &img, &defect("scratch", Some(small))).unwrap_err().to_string().contains("4x4"));
        assert_eq!(store.counts().unwrap(), LabelCounts::default());
    }

    #[test]
    fn labels_link_into_a_teach_in_data_set_under_their_own_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = LabelStore::new(&dir.path().join("labels"));
        let img = frame(8, 6, 7);
        let mask = DefectArea::Box(Roi { x: 1, y: 1, width: 2, height: 2 }).to_mask(8, 6).unwrap();
        store.add("s1", &img, &Verdict::Good).unwrap();
        store.add("s2", &img, &defect("scratch", Some(mask))).unwrap();
        let ds_root = dir.path().join("taught.frames");
        imaging::save_png(&ds_root.join("train/good/0000.png"), &img).unwrap();
        let c = store.link_into(&ds_root).unwrap();
        assert_eq!((c.good, c.defective, c.defective_with_mask), (1, 1, 1));
        let ds = crate::dataset::MvtecDataset::open(&ds_root).unwrap();
        assert_eq!(ds.train_good.len(), 2);
        assert!(ds.train_defective[0].mask.is_some());
        assert!(store.root().join("train/good/s1.png").is_file(), "the store keeps its files");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
