//! Camera frame -> network input: resize to the model's size (or cut into tiles of it) and
//! normalise, on the device; and, for tiles, the model's outputs stitched back into the frame's.
use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::config::{Normalization, PreprocessConfig, Resize};
use crate::error::{Error, Result};
use crate::models::ModelOutput;

/// Tiles per forward pass: one batch amortises a GPU launch; on the CPU the batch only bounds
/// memory (a 5 MP frame at native scale is ~140 tiles).
const TILE_BATCH: usize = 16;

const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Turns RGB frames into normalised `[N, 3, H, W]` float tensors on one device.
#[derive(Debug)]
pub struct Preprocessor {
    config: PreprocessConfig,
    device: Device,
    /// `[1, 3, 1, 1]` scale and shift: `x * scale + shift` gives the normalised value of a
    /// 0..255 value `x` (the division by 255 folded into `scale`).
    scale: Tensor,
    shift: Tensor,
}

impl Preprocessor {
    /// A preprocessor for `config`, producing tensors on `device`.
    pub fn new(config: &PreprocessConfig, device: Device) -> Result<Self> {
        let (mean, std) = match config.normalization {
            Normalization::Imagenet => (IMAGENET_MEAN, IMAGENET_STD),
            // (x - 127) / 128 on 0..255 == (x01 - 127/255) / (128/255)
            Normalization::Symmetric => ([127.0 / 255.0; 3], [128.0 / 255.0; 3]),
        };
        let scale: Vec<f32> = std.iter().map(|s| (1.0 / (255.0 * s)) as f32).collect();
        let shift: Vec<f32> = mean.iter().zip(std.iter()).map(|(m, s)| (-m / s) as f32).collect();
        let scale = Tensor::f_from_slice(&scale)?.f_view([1, 3, 1, 1])?.f_to_device(device)?;
        let shift = Tensor::f_from_slice(&shift)?.f_view([1, 3, 1, 1])?.f_to_device(device)?;
        Ok(Self { config: config.clone(), device, scale, shift })
    }

    /// Network input size `(height, width)` (with `resize: keep_aspect`, the largest area;
    /// [`Self::size_for`] gives each frame's).
    pub fn input_size(&self) -> (i64, i64) {
        (self.config.image_size[0] as i64, self.config.image_size[1] as i64)
    }

    /// Whether every network input has the same size (so that frames, or tiles, can be batched).
    pub fn fixed_size(&self) -> bool {
        self.config.resize != Resize::KeepAspect
    }

    /// Whether frames are cut into tiles (each frame's inputs are then a batch).
    pub fn tiled(&self) -> bool {
        matches!(self.config.resize, Resize::Tiles { .. })
    }

    /// How a `width` x `height` frame is cut into tiles, when this preprocessor tiles.
    pub fn tile_grid(&self, width: u32, height: u32) -> Option<TileGrid> {
        let Resize::Tiles { scale, overlap } = self.config.resize else { return None };
        let tile = self.input_size();
        // A frame smaller than one tile (after scaling) is scaled up to it on that side.
        let side = |v: u32, t: i64| ((f64::from(v) * scale).round() as i64).max(t);
        let frame = (side(height, tile.0), side(width, tile.1));
        Some(TileGrid {
            frame,
            tile,
            ys: tile_origins(frame.0, tile.0, overlap),
            xs: tile_origins(frame.1, tile.1, overlap),
            ramp: ((tile.0.min(tile.1) as f64 * overlap) as i64).max(1),
        })
    }

    /// The network input size `(height, width)` of a `width` x `height` frame.
    pub fn size_for(&self, width: u32, height: u32) -> (i64, i64) {
        let (th, tw) = self.input_size();
        match self.config.resize {
            Resize::Stretch | Resize::Tiles { .. } => (th, tw),
            Resize::KeepAspect => {
                let (w, h) = (f64::from(width), f64::from(height));
                let scale = ((th * tw) as f64 / (w * h)).sqrt().min(1.0);
                // Multiples of 32 keep every backbone stage's grid aligned with the input.
                let side = |v: f64| (((v * scale) / 32.0).round() as i64 * 32).max(64);
                (side(h), side(w))
            }
        }
    }

    /// One frame -> its network inputs, float32 on the device: `[1, 3, H, W]`, or with tiles
    /// `[T, 3, th, tw]` (row by row) and the grid that [`TileGrid::stitch`]es their maps back.
    pub fn inputs(&self, image: &RgbImage) -> Result<(Tensor, Option<TileGrid>)> {
        let Some(grid) = self.tile_grid(image.width(), image.height()) else { return Ok((self.frame(image)?, None)) };
        let whole = self.resized(image, grid.frame)?;
        let (th, tw) = grid.tile;
        let mut tiles = Vec::with_capacity(grid.count());
        for &y in &grid.ys {
            for &x in &grid.xs {
                tiles.push(whole.f_narrow(2, y, th)?.f_narrow(3, x, tw)?);
            }
        }
        Ok((Tensor::f_cat(&tiles, 0)?, Some(grid)))
    }

    /// Runs `forward` on `image` as this preprocessor feeds the network: one output for the
    /// frame (`[1]` score, `[1, 1, H, W]` map). With tiles, batches of tiles go through
    /// `forward`, the image score is the largest tile's and the maps are stitched.
    pub fn run(&self, image: &RgbImage, forward: &dyn Fn(&Tensor) -> Result<ModelOutput>) -> Result<ModelOutput> {
        let (x, grid) = self.inputs(image)?;
        let Some(grid) = grid else { return forward(&x) };
        let mut scores = Vec::new();
        let mut maps = Vec::new();
        for chunk in x.f_split(TILE_BATCH as i64, 0)? {
            let out = forward(&chunk)?;
            scores.push(out.image_scores);
            maps.push(out.anomaly_maps);
        }
        let image_scores = Tensor::f_cat(&scores, 0)?.f_amax([0i64].as_slice(), true)?;
        Ok(ModelOutput { image_scores, anomaly_maps: grid.stitch(&Tensor::f_cat(&maps, 0)?)? })
    }

    /// One frame -> `[1, 3, H, W]` float32 on the device, resized as configured (with tiles:
    /// the whole frame at the tile grid's scale). The u8 pixels travel to the device as they
    /// are (a quarter of the bytes of floats) and are resized and normalised there.
    pub fn frame(&self, image: &RgbImage) -> Result<Tensor> {
        let (w, h) = image.dimensions();
        match self.tile_grid(w, h) {
            Some(grid) => self.resized(image, grid.frame),
            None => self.resized(image, self.size_for(w, h)),
        }
    }

    /// `image` -> `[1, 3, th, tw]`, normalised.
    fn resized(&self, image: &RgbImage, (th, tw): (i64, i64)) -> Result<Tensor> {
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::BadImage(format!("image has zero size {w}x{h}")));
        }
        let hwc = Tensor::f_from_slice(image.as_raw())?.f_view([h as i64, w as i64, 3])?;
        // [1, 3, H, W] in shape, the pixels left interleaved (channels-last) in memory.
        let nchw = hwc.f_to_device(self.device)?.f_permute([2, 0, 1])?.f_unsqueeze(0)?;
        let resized = if (h as i64, w as i64) == (th, tw) {
            nchw.f_to_kind(Kind::Float)?
        } else if self.device == Device::Cpu {
            // Antialiased bilinear, so that a 1280x1024 frame and a 256x256 training image of the
            // same part look alike to the network. On the CPU libtorch resizes interleaved bytes
            // on a vectorised path of its own: 1024x417 -> 384x160 in 0.47 ms with the conversion
            // to floats after it, against 1.48 ms for floats (1.09 planar); the pixels come out
            // rounded to whole bytes, as a camera's would be.
            nchw.f_internal_upsample_bilinear2d_aa([th, tw], false, None, None)?.f_to_kind(Kind::Float)?
        } else {
            // CUDA resizes floats only.
            nchw.f_contiguous()?.f_to_kind(Kind::Float)?.f_internal_upsample_bilinear2d_aa([th, tw], false, None, None)?
        };
        Ok(resized.f_mul(&self.scale)?.f_add(&self.shift)?)
    }

    /// Several frames -> `[N, 3, H, W]` (with tiles: every frame's tiles, frame after frame);
    /// frames of different input sizes (keep_aspect) cannot share a batch.
    pub fn batch(&self, images: &[RgbImage]) -> Result<Tensor> {
        let frames = images.iter().map(|im| Ok(self.inputs(im)?.0)).collect::<Result<Vec<_>>>()?;
        // With tiles only the tile shape must match: frames of other sizes just have more tiles.
        let skip = usize::from(self.tiled());
        if frames.windows(2).any(|f| f[0].size()[skip..] != f[1].size()[skip..]) {
            return Err(Error::Config(
                "frames of different input sizes (resize keep_aspect) cannot be batched; use batches of 1".into(),
            ));
        }
        Ok(Tensor::f_cat(&frames, 0)?)
    }
}

/// Where the tiles of one frame lie: the frame scaled to `frame` (height, width), cut into tiles
/// of `tile` at the origins `ys` x `xs` (row by row, as [`Preprocessor::inputs`] orders them).
#[derive(Clone, Debug, PartialEq)]
pub struct TileGrid {
    /// The scaled frame's `(height, width)`: the stitched map's size.
    pub frame: (i64, i64),
    /// A tile's `(height, width)`: the network input size.
    pub tile: (i64, i64),
    /// Top rows of the tile rows.
    pub ys: Vec<i64>,
    /// Left columns of the tile columns.
    pub xs: Vec<i64>,
    /// Pixels over which a tile's weight rises from its edge to full in the stitched map.
    ramp: i64,
}

impl TileGrid {
    /// Number of tiles.
    pub fn count(&self) -> usize {
        self.ys.len() * self.xs.len()
    }

    /// Tile maps `[T, 1, th, tw]` (in [`Preprocessor::inputs`]' order) -> the frame's map
    /// `[1, 1, H, W]`: each pixel the weighted mean of the tiles over it, each tile's weight
    /// falling linearly towards its edges over the overlap, where its network saw the least
    /// context (zero padding), but never to zero, so the frame's own edges keep their tile.
    pub fn stitch(&self, maps: &Tensor) -> Result<Tensor> {
        let (th, tw) = self.tile;
        if maps.size() != [self.count() as i64, 1, th, tw] {
            return Err(Error::BadImage(format!(
                "tile maps {:?} do not fit a grid of {} tiles of {th}x{tw}",
                maps.size(),
                self.count()
            )));
        }
        let options = (maps.kind(), maps.device());
        let edge = |n: i64| -> Result<Tensor> {
            let i = Tensor::f_arange(n, options)?;
            let from_edge = i.f_minimum(&i.f_neg()?.f_add_scalar((n - 1) as f64)?)?.f_add_scalar(1.0)?;
            Ok(from_edge.f_div_scalar(self.ramp as f64)?.f_clamp_max(1.0)?)
        };
        let weight = edge(th)?.f_view([th, 1])?.f_mul(&edge(tw)?.f_view([1, tw])?)?;
        let sum = Tensor::f_zeros([1, 1, self.frame.0, self.frame.1], options)?;
        let total = Tensor::f_zeros([1, 1, self.frame.0, self.frame.1], options)?;
        let mut t = 0;
        for &y in &self.ys {
            for &x in &self.xs {
                let weighted = maps.f_narrow(0, t, 1)?.f_mul(&weight)?;
                // In place on views of the sums (the returned handles are those views).
                let _ = sum.f_narrow(2, y, th)?.f_narrow(3, x, tw)?.f_add_(&weighted)?;
                let _ = total.f_narrow(2, y, th)?.f_narrow(3, x, tw)?.f_add_(&weight)?;
                t += 1;
            }
        }
        Ok(sum.f_div(&total)?)
    }
}

/// Origins of tiles of side `tile` covering `0..len` with about `overlap` of a side shared:
/// as few tiles as that allows, spread evenly, the first at 0 and the last flush with the end.
fn tile_origins(len: i64, tile: i64, overlap: f64) -> Vec<i64> {
    if len <= tile {
        return vec![0];
    }
    let stride = ((tile as f64 * (1.0 - overlap)).floor() as i64).max(1);
    let n = (len - tile + stride - 1) / stride + 1;
    (0..n).map(|i| ((i * (len - tile)) as f64 / (n - 1) as f64).round() as i64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_normalisation_of_a_flat_image() {
        let cfg = PreprocessConfig { image_size: [8, 12], normalization: Normalization::Imagenet, ..Default::default() };
        let p = Preprocessor::new(&cfg, Device::Cpu).unwrap();
        let img = RgbImage::from_pixel(20, 10, image::Rgb([255, 0, 128]));
        let x = p.frame(&img).unwrap();
        assert_eq!(x.size(), vec![1, 3, 8, 12]);
        let r = x.double_value(&[0, 0, 3, 5]);
        let g = x.double_value(&[0, 1, 3, 5]);
        let b = x.double_value(&[0, 2, 3, 5]);
        assert!((r - (1.0 - 0.485) / 0.229).abs() < 1e-4, "{r}");
        assert!((g - (0.0 - 0.456) / 0.224).abs() < 1e-4, "{g}");
        assert!((b - (128.0 / 255.0 - 0.406) / 0.225).abs() < 1e-4, "{b}");
    }

    #[test]
    fn symmetric_normalisation_matches_tf_convention() {
        let cfg = PreprocessConfig { image_size: [4, 4], normalization: Normalization::Symmetric, ..Default::default() };
        let p = Preprocessor::new(&cfg, Device::Cpu).unwrap();
        let img = RgbImage::from_pixel(4, 4, image::Rgb([255, 127, 0]));
        let x = p.frame(&img).unwrap();
        assert!((x.double_value(&[0, 0, 0, 0]) - 1.0).abs() < 1e-5);
        assert!(x.double_value(&[0, 1, 0, 0]).abs() < 1e-5);
        assert!((x.double_value(&[0, 2, 0, 0]) + 127.0 / 128.0).abs() < 1e-5);
    }

    #[test]
    fn channel_order_survives_the_layout_change() {
        let cfg = PreprocessConfig { image_size: [2, 2], normalization: Normalization::Symmetric, ..Default::default() };
        let p = Preprocessor::new(&cfg, Device::Cpu).unwrap();
        let mut img = RgbImage::new(2, 2);
        img.put_pixel(1, 0, image::Rgb([255, 0, 0]));
        let x = p.frame(&img).unwrap();
        assert!(x.double_value(&[0, 0, 0, 1]) > 0.99);
        assert!(x.double_value(&[0, 0, 0, 0]) < -0.99);
        assert!(x.double_value(&[0, 1, 0, 1]) < -0.99);
        let batch = p.batch(&[img.clone(), img]).unwrap();
        assert_eq!(batch.size(), vec![2, 3, 2, 2]);
    }

    #[test]
    fn keep_aspect_scales_down_to_the_area_and_keeps_the_shape() {
        let cfg = PreprocessConfig { image_size: [256, 256], resize: Resize::KeepAspect, ..Default::default() };
        let p = Preprocessor::new(&cfg, Device::Cpu).unwrap();
        assert!(!p.fixed_size());
        // 599x244 (area 146 156 > 65 536): scale 0.670 -> 401x163 -> multiples of 32.
        assert_eq!(p.size_for(599, 244), (160, 416));
        // Small enough already: never scaled up, only rounded.
        assert_eq!(p.size_for(122, 285), (288, 128));
        assert_eq!(p.size_for(20, 10), (64, 64));
        let img = RgbImage::from_pixel(599, 244, image::Rgb([10, 20, 30]));
        assert_eq!(p.frame(&img).unwrap().size(), vec![1, 3, 160, 416]);
        let other = RgbImage::from_pixel(122, 285, image::Rgb([10, 20, 30]));
        assert!(p.batch(&[img.clone(), other]).is_err());
        assert_eq!(p.batch(&[img.clone(), img]).unwrap().size(), vec![2, 3, 160, 416]);
        let stretch = Preprocessor::new(&PreprocessConfig::default(), Device::Cpu).unwrap();
        assert!(stretch.fixed_size());
        assert_eq!(stretch.size_for(599, 244), (256, 256));
    }

    fn tiler(scale: f64) -> Preprocessor {
        let cfg = PreprocessConfig { image_size: [256, 256], resize: Resize::tiles(scale), ..Default::default() };
        Preprocessor::new(&cfg, Device::Cpu).unwrap()
    }

    #[test]
    fn tiles_cover_the_frame_with_the_overlap_asked_the_last_flush_with_the_edge() {
        assert_eq!(tile_origins(1024, 256, 0.25), vec![0, 192, 384, 576, 768]);
        assert_eq!(tile_origins(417, 256, 0.25), vec![0, 161]);
        assert_eq!(tile_origins(1000, 256, 0.0), vec![0, 248, 496, 744], "no overlap asked: only the rounding's");
        assert_eq!(tile_origins(256, 256, 0.25), vec![0]);
        assert_eq!(tile_origins(100, 256, 0.25), vec![0]);
        // BSData's 1024x417 at native scale: 5 x 2 tiles; at half scale the short side is
        // scaled up to one tile.
        let grid = tiler(1.0).tile_grid(1024, 417).unwrap();
        assert_eq!((grid.frame, grid.count()), ((417, 1024), 10));
        let half = tiler(0.5).tile_grid(1024, 417).unwrap();
        assert_eq!((half.frame, half.ys.clone(), half.xs.clone()), ((256, 512), vec![0], vec![0, 128, 256]));
        assert!(tiler(1.0).fixed_size() && tiler(1.0).tiled());
        assert!(Preprocessor::new(&PreprocessConfig::default(), Device::Cpu).unwrap().tile_grid(1024, 417).is_none());
    }

    /// A 300x600 frame whose pixels all differ: red = column, green = row.
    fn gradient_frame() -> RgbImage {
        RgbImage::from_fn(600, 300, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x / 7 + y / 5) % 256) as u8]))
    }

    #[test]
    fn each_tile_is_its_part_of_the_scaled_frame() {
        let p = tiler(1.0);
        let frame = gradient_frame();
        let (tiles, grid) = p.inputs(&frame).unwrap();
        let grid = grid.unwrap();
        assert_eq!((grid.ys.clone(), grid.xs.clone()), (vec![0, 44], vec![0, 172, 344]));
        assert_eq!(tiles.size(), vec![6, 3, 256, 256]);
        let whole = p.frame(&frame).unwrap();
        assert_eq!(whole.size(), vec![1, 3, 300, 600]);
        // Tile 4 = second row, second column.
        let expected = whole.narrow(2, 44, 256).narrow(3, 172, 256);
        assert!(tiles.get(4).unsqueeze(0).equal(&expected));
        // A batch of two frames holds both frames' tiles.
        assert_eq!(p.batch(&[frame.clone(), frame.clone()]).unwrap().size(), vec![12, 3, 256, 256]);
        // Frames of other sizes batch too (Magnetic-Tile's images all differ): 6 + 1 tiles.
        let small = RgbImage::new(200, 180);
        assert_eq!(p.batch(&[frame, small.clone()]).unwrap().size(), vec![7, 3, 256, 256]);
        // Without tiles, kept aspect ratios still cannot share a batch.
        let keep =
            Preprocessor::new(&PreprocessConfig { resize: Resize::KeepAspect, ..Default::default() }, Device::Cpu).unwrap();
        assert!(keep.batch(&[gradient_frame(), small]).is_err());
    }

    #[test]
    fn stitched_maps_are_the_tiles_maps_in_place_and_the_score_the_largest_tile() {
        let p = tiler(1.0);
        let frame = gradient_frame();
        // A model whose map is its input's first channel and whose score is the tile's mean:
        // stitched, the map must be the frame's first channel wherever tiles overlap.
        let calls = std::cell::Cell::new(0);
        let forward = |x: &Tensor| -> Result<ModelOutput> {
            calls.set(calls.get() + 1);
            Ok(ModelOutput {
                image_scores: x.mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float),
                anomaly_maps: x.narrow(1, 0, 1),
            })
        };
        let out = p.run(&frame, &forward).unwrap();
        assert_eq!(calls.get(), 1, "6 tiles go through in one batch");
        let whole = p.frame(&frame).unwrap();
        assert_eq!(out.anomaly_maps.size(), vec![1, 1, 300, 600]);
        let diff = (out.anomaly_maps - whole.narrow(1, 0, 1)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "stitched map differs from the frame by {diff}");
        let (tiles, _) = p.inputs(&frame).unwrap();
        let best = tiles.mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float).max().double_value(&[]);
        assert_eq!(out.image_scores.size(), vec![1]);
        assert!((out.image_scores.double_value(&[0]) - best).abs() < 1e-6);
    }

    #[test]
    fn stitching_weighs_tiles_down_towards_their_edges() {
        let grid = tiler(1.0).tile_grid(448, 256).unwrap(); // two tiles side by side, at 0 and 192
        assert_eq!(grid.xs, vec![0, 192]);
        let maps = Tensor::cat(
            &[
                Tensor::zeros([1, 1, 256, 256], (Kind::Float, Device::Cpu)),
                Tensor::ones([1, 1, 256, 256], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let map = grid.stitch(&maps).unwrap();
        let at = |x: i64| map.double_value(&[0, 0, 128, x]);
        assert_eq!((at(0), at(191), at(256), at(447)), (0.0, 0.0, 1.0, 1.0), "one tile only: its own value");
        // In the shared band the left tile fades out and the right one in, monotonically.
        let band: Vec<f64> = (192..256).map(at).collect();
        assert!(band.windows(2).all(|w| w[1] >= w[0]) && band[0] < 0.1 && band[63] > 0.9, "{band:?}");
        assert!((at(223) - 0.5).abs() < 0.05, "the middle of the band is an even mix: {}", at(223));
        assert!(grid.stitch(&maps.narrow(0, 0, 1)).is_err(), "a map short is refused");
    }
}
