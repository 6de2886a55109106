//! Camera frame -> network input: resize to the model's size and normalise, on the device.
use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::config::{Normalization, PreprocessConfig, Resize};
use crate::error::{Error, Result};

const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Turns RGB frames into normalised `[N, 3, H, W]` float tensors on one device.
#[derive(Debug)]
pub struct Preprocessor {
    config: PreprocessConfig,
    device: Device,
    /// `[1, 3, 1, 1]` scale and shift: `x01 * scale + shift` gives the normalised value.
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
        let scale: Vec<f32> = std.iter().map(|s| (1.0 / s) as f32).collect();
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

    /// Whether every frame becomes the same input size (so that frames can be batched).
    pub fn fixed_size(&self) -> bool {
        self.config.resize == Resize::Stretch
    }

    /// The network input size `(height, width)` of a `width` x `height` frame.
    pub fn size_for(&self, width: u32, height: u32) -> (i64, i64) {
        let (th, tw) = self.input_size();
        match self.config.resize {
            Resize::Stretch => (th, tw),
            Resize::KeepAspect => {
                let (w, h) = (f64::from(width), f64::from(height));
                let scale = ((th * tw) as f64 / (w * h)).sqrt().min(1.0);
                // Multiples of 32 keep every backbone stage's grid aligned with the input.
                let side = |v: f64| (((v * scale) / 32.0).round() as i64 * 32).max(64);
                (side(h), side(w))
            }
        }
    }

    /// One frame -> `[1, 3, H, W]` float32 on the device. The u8 pixels travel to the device
    /// as they are (a quarter of the bytes of floats) and are resized and normalised there.
    pub fn frame(&self, image: &RgbImage) -> Result<Tensor> {
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::BadImage(format!("image has zero size {w}x{h}")));
        }
        let hwc = Tensor::f_from_slice(image.as_raw())?.f_view([h as i64, w as i64, 3])?;
        let chw = hwc.f_to_device(self.device)?.f_permute([2, 0, 1])?.f_unsqueeze(0)?;
        let x01 = chw.f_to_kind(Kind::Float)?.f_div_scalar(255.0)?;
        let (th, tw) = self.size_for(w, h);
        let resized = if (h as i64, w as i64) == (th, tw) {
            x01
        } else {
            // Antialiased bilinear, so that a 1280x1024 frame and a 256x256 training image of the
            // same part look alike to the network.
            x01.f_internal_upsample_bilinear2d_aa([th, tw], false, None, None)?
        };
        Ok(resized.f_mul(&self.scale)?.f_add(&self.shift)?)
    }

    /// Several frames -> `[N, 3, H, W]`; frames of different input sizes (keep_aspect) cannot
    /// share a batch.
    pub fn batch(&self, images: &[RgbImage]) -> Result<Tensor> {
        let frames = images.iter().map(|im| self.frame(im)).collect::<Result<Vec<_>>>()?;
        if frames.windows(2).any(|f| f[0].size() != f[1].size()) {
            return Err(Error::Config(
                "frames of different input sizes (resize keep_aspect) cannot be batched; use batches of 1".into(),
            ));
        }
        Ok(Tensor::f_cat(&frames, 0)?)
    }
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
}
