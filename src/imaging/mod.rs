//! Image decoding and conversion: camera frames (sensor_msgs/Image layout) and JPEG/PNG bytes or
//! files become 8-bit RGB images, the one format the rest of the pipeline works on.
//!
//! Everything here treats its input as untrusted: the size fields of a camera message and the
//! header of a compressed image are checked before any large allocation, so a corrupt or hostile
//! message produces an [`Error`] instead of a panic or an out-of-memory abort.
use std::fmt;
use std::io::Cursor;
use std::path::Path;
use std::str::FromStr;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// Largest frame accepted, in pixels (8192 x 8192): far above any inspection camera, far below
/// what would exhaust memory.
pub const MAX_PIXELS: u64 = 8192 * 8192;

/// Largest accepted width or height, so that a thin but absurd frame (1 x 10^9) is refused too.
pub const MAX_SIDE: u32 = 16384;

/// Bytes the decoder may allocate for one image. An 8192 x 8192 16-bit RGBA PNG needs 512 MiB;
/// anything a header claims beyond that is refused before the pixel buffer is allocated.
pub const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;

/// Pixel layouts of uncompressed camera frames that can be converted, named as in
/// sensor_msgs/image_encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PixelEncoding {
    /// 8-bit red, green, blue.
    Rgb8,
    /// 8-bit blue, green, red (OpenCV's order; also `8UC3`).
    Bgr8,
    /// 8-bit red, green, blue, alpha (alpha is ignored).
    Rgba8,
    /// 8-bit blue, green, red, alpha (alpha is ignored; also `8UC4`).
    Bgra8,
    /// 8-bit grey (also `8UC1`).
    Mono8,
    /// 16-bit grey (also `16UC1`); reduced to 8 bits by keeping the high byte.
    Mono16,
}

/// The encoding names [`PixelEncoding::from_str`] accepts, for error messages and documentation.
pub const SUPPORTED_ENCODINGS: &str =
    "rgb8, bgr8, rgba8, bgra8, mono8, mono16, 8UC1, 8UC3, 8UC4, 16UC1";

impl PixelEncoding {
    /// Bytes one pixel occupies in the frame's data.
    pub fn bytes_per_pixel(self) -> u32 {
        match self {
            Self::Rgb8 | Self::Bgr8 => 3,
            Self::Rgba8 | Self::Bgra8 => 4,
            Self::Mono8 => 1,
            Self::Mono16 => 2,
        }
    }

    /// The canonical sensor_msgs name (`rgb8`, `bgr8`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rgb8 => "rgb8",
            Self::Bgr8 => "bgr8",
            Self::Rgba8 => "rgba8",
            Self::Bgra8 => "bgra8",
            Self::Mono8 => "mono8",
            Self::Mono16 => "mono16",
        }
    }
}

impl fmt::Display for PixelEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PixelEncoding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        // sensor_msgs names are lower case, the OpenCV-style aliases upper case; drivers are not
        // always consistent, so the match ignores case.
        match s.trim().to_ascii_lowercase().as_str() {
            "rgb8" => Ok(Self::Rgb8),
            "bgr8" | "8uc3" => Ok(Self::Bgr8),
            "rgba8" => Ok(Self::Rgba8),
            "bgra8" | "8uc4" => Ok(Self::Bgra8),
            "mono8" | "8uc1" => Ok(Self::Mono8),
            "mono16" | "16uc1" => Ok(Self::Mono16),
            _ => Err(Error::BadImage(format!(
                "unsupported pixel encoding '{s}': supported are {SUPPORTED_ENCODINGS} \
                 (compressed images go through sensor_msgs/CompressedImage)"
            ))),
        }
    }
}

/// A borrowed view of an uncompressed camera frame; the fields mean what they mean in
/// sensor_msgs/Image, so a message converts without copying its data.
#[derive(Clone, Copy, Debug)]
pub struct RawImage<'a> {
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Bytes from the start of one row to the start of the next (at least `width` times the
    /// bytes per pixel; more when the driver pads rows).
    pub step: u32,
    /// Pixel layout.
    pub encoding: PixelEncoding,
    /// Byte order of 16-bit samples; only `Mono16` has any.
    pub is_bigendian: bool,
    /// The pixel data, `height` rows of `step` bytes (the last row may omit its padding).
    pub data: &'a [u8],
}

/// Refuses sizes no camera produces, before anything is allocated for them.
fn check_dimensions(width: u32, height: u32) -> std::result::Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!(
            "image is {width}x{height}: width and height must be at least 1"
        ));
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(format!(
            "image is {width}x{height}: each side must be at most {MAX_SIDE} pixels"
        ));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > MAX_PIXELS {
        return Err(format!(
            "image is {width}x{height} = {pixels} pixels: at most {MAX_PIXELS} (8192x8192) are accepted"
        ));
    }
    Ok(())
}

/// Converts a camera frame to 8-bit RGB in one pass over its rows.
///
/// Row padding (`step` larger than a row) is skipped. `Mono16` keeps the high byte of each
/// sample (value / 256), which maps the full 16-bit range onto 0..255; a camera that fills only
/// the low 10 or 12 bits therefore looks dark, as it would in any 8-bit viewer. Alpha is dropped.
pub fn to_rgb(raw: &RawImage) -> Result<RgbImage> {
    check_dimensions(raw.width, raw.height).map_err(Error::BadImage)?;
    let bpp = raw.encoding.bytes_per_pixel();
    // u64 arithmetic: width * bpp and height * step can overflow u32 on lying headers.
    let row_bytes = u64::from(raw.width) * u64::from(bpp);
    let step = u64::from(raw.step);
    if step < row_bytes {
        return Err(Error::BadImage(format!(
            "step {step} is smaller than a row: width {} x {bpp} bytes per pixel ({}) = {row_bytes} bytes",
            raw.width, raw.encoding
        )));
    }
    let needed = (u64::from(raw.height) - 1) * step + row_bytes;
    if (raw.data.len() as u64) < needed {
        return Err(Error::BadImage(format!(
            "data has {} bytes, a {}x{} {} frame with step {step} needs at least {needed}",
            raw.data.len(),
            raw.width,
            raw.height,
            raw.encoding
        )));
    }
    // Both fit in usize now: needed <= data.len().
    let (row_bytes, step) = (row_bytes as usize, step as usize);
    let mut out = Vec::with_capacity(raw.width as usize * raw.height as usize * 3);
    for y in 0..raw.height as usize {
        let row = &raw.data[y * step..y * step + row_bytes];
        match raw.encoding {
            PixelEncoding::Rgb8 => out.extend_from_slice(row),
            PixelEncoding::Bgr8 => row
                .chunks_exact(3)
                .for_each(|p| out.extend_from_slice(&[p[2], p[1], p[0]])),
            PixelEncoding::Rgba8 => row
                .chunks_exact(4)
                .for_each(|p| out.extend_from_slice(&p[..3])),
            PixelEncoding::Bgra8 => row
                .chunks_exact(4)
                .for_each(|p| out.extend_from_slice(&[p[2], p[1], p[0]])),
            PixelEncoding::Mono8 => row.iter().for_each(|&v| out.extend_from_slice(&[v, v, v])),
            PixelEncoding::Mono16 => {
                let hi = usize::from(!raw.is_bigendian);
                row.chunks_exact(2)
                    .for_each(|p| out.extend_from_slice(&[p[hi], p[hi], p[hi]]));
            }
        }
    }
    RgbImage::from_raw(raw.width, raw.height, out)
        .ok_or_else(|| Error::BadImage("internal: converted buffer has the wrong size".into()))
}

/// The decoder limits: both the per-side and the allocation bound apply before pixel data is
/// read, so a header that lies about the size costs nothing.
fn decode_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    limits
}

/// Whether an end-of-image marker follows the last start-of-scan marker.
///
/// The JPEG decoder fills a scan that ends early with grey and reports success, and a frame cut
/// short in transit would then look like a large defect. Entropy-coded data cannot contain
/// either marker (its 0xFF bytes are followed by 0x00 or a restart marker), so the test is exact
/// for the main image; an embedded thumbnail comes before the main scan and does not fool it.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    match bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) {
        Some(sos) => bytes[sos + 2..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

/// Decodes a compressed image in whatever colour type it has, within [`decode_limits`] and
/// [`MAX_PIXELS`]. Errors are plain messages so that callers can add a file name.
fn decode_any(bytes: &[u8]) -> std::result::Result<DynamicImage, String> {
    if bytes.is_empty() {
        return Err("no data (0 bytes)".into());
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the header: {e}"))?;
    if reader.format().is_none() {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "not a PNG or JPEG image (first bytes: {})",
            head.join(" ")
        ));
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        return Err(format!(
            "truncated JPEG ({} bytes): no end-of-image marker after the last scan",
            bytes.len()
        ));
    }
    reader.limits(decode_limits());
    let decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height)?;
    DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())
}

/// Decodes a JPEG or PNG image held in memory to 8-bit RGB (16-bit PNGs are scaled down,
/// grey and alpha images expanded or flattened by dropping alpha).
pub fn decode(bytes: &[u8]) -> Result<RgbImage> {
    decode_any(bytes)
        .map(DynamicImage::into_rgb8)
        .map_err(Error::Decode)
}

/// Decodes a JPEG or PNG image held in memory to 8-bit grey (for masks).
pub fn decode_gray(bytes: &[u8]) -> Result<image::GrayImage> {
    decode_any(bytes)
        .map(DynamicImage::into_luma8)
        .map_err(Error::Decode)
}

/// Reads and decodes a JPEG or PNG file to 8-bit RGB; errors name the file.
pub fn load(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_any(&bytes)
        .map(DynamicImage::into_rgb8)
        .map_err(|e| Error::Decode(format!("{}: {e}", path.display())))
}

/// Reads and decodes a JPEG or PNG file to 8-bit grey (masks); errors name the file.
pub fn load_gray(path: &Path) -> Result<image::GrayImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_any(&bytes)
        .map(DynamicImage::into_luma8)
        .map_err(|e| Error::Decode(format!("{}: {e}", path.display())))
}

/// Writes an image as PNG, creating missing parent folders; errors name the file.
pub fn save_png<P, C>(path: &Path, image: &image::ImageBuffer<P, C>) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| match e {
            image::ImageError::IoError(io) => Error::io(path, io),
            other => Error::Decode(format!("{}: cannot encode PNG: {other}", path.display())),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(
        width: u32,
        height: u32,
        step: u32,
        encoding: PixelEncoding,
        data: &[u8],
    ) -> RawImage<'_> {
        RawImage {
            width,
            height,
            step,
            encoding,
            is_bigendian: false,
            data,
        }
    }

    fn bad_image_message(r: Result<RgbImage>) -> String {
        match r {
            Err(Error::BadImage(m)) => m,
            other => panic!("expected BadImage, got {other:?}"),
        }
    }

    #[test]
    fn encoding_names() {
        for (name, enc) in [
            ("rgb8", PixelEncoding::Rgb8),
            ("bgr8", PixelEncoding::Bgr8),
            ("rgba8", PixelEncoding::Rgba8),
            ("bgra8", PixelEncoding::Bgra8),
            ("mono8", PixelEncoding::Mono8),
            ("mono16", PixelEncoding::Mono16),
            ("8UC1", PixelEncoding::Mono8),
            ("16UC1", PixelEncoding::Mono16),
            ("8UC3", PixelEncoding::Bgr8),
            ("8UC4", PixelEncoding::Bgra8),
        ] {
            assert_eq!(name.parse::<PixelEncoding>().unwrap(), enc, "{name}");
        }
        assert_eq!(PixelEncoding::Rgb8.bytes_per_pixel(), 3);
        assert_eq!(PixelEncoding::Bgra8.bytes_per_pixel(), 4);
        assert_eq!(PixelEncoding::Mono8.bytes_per_pixel(), 1);
        assert_eq!(PixelEncoding::Mono16.bytes_per_pixel(), 2);
        assert_eq!(
            PixelEncoding::Mono16
                .to_string()
                .parse::<PixelEncoding>()
                .unwrap(),
            PixelEncoding::Mono16
        );
        match "yuv422".parse::<PixelEncoding>() {
            Err(Error::BadImage(m)) => assert!(
                m.contains("yuv422") && m.contains("bgr8") && m.contains("16UC1"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn colour_encodings() {
        // Two pixels: (10, 20, 30) and (40, 50, 60) in RGB.
        let cases: [(PixelEncoding, Vec<u8>); 4] = [
            (PixelEncoding::Rgb8, vec![10, 20, 30, 40, 50, 60]),
            (PixelEncoding::Bgr8, vec![30, 20, 10, 60, 50, 40]),
            (PixelEncoding::Rgba8, vec![10, 20, 30, 255, 40, 50, 60, 0]),
            (PixelEncoding::Bgra8, vec![30, 20, 10, 255, 60, 50, 40, 7]),
        ];
        for (enc, data) in cases {
            let img = to_rgb(&raw(2, 1, 2 * enc.bytes_per_pixel(), enc, &data)).unwrap();
            assert_eq!(img.dimensions(), (2, 1));
            assert_eq!(img.as_raw(), &vec![10, 20, 30, 40, 50, 60], "{enc}");
        }
    }

    #[test]
    fn mono_encodings() {
        let img = to_rgb(&raw(2, 1, 2, PixelEncoding::Mono8, &[7, 200])).unwrap();
        assert_eq!(img.as_raw(), &vec![7, 7, 7, 200, 200, 200]);
        // Little endian: 0x1234 is stored 34 12, high byte 0x12.
        let img = to_rgb(&raw(
            2,
            1,
            4,
            PixelEncoding::Mono16,
            &[0x34, 0x12, 0xff, 0xab],
        ))
        .unwrap();
        assert_eq!(img.as_raw(), &vec![0x12, 0x12, 0x12, 0xab, 0xab, 0xab]);
        let mut be = raw(2, 1, 4, PixelEncoding::Mono16, &[0x12, 0x34, 0xab, 0xff]);
        be.is_bigendian = true;
        assert_eq!(
            to_rgb(&be).unwrap().as_raw(),
            &vec![0x12, 0x12, 0x12, 0xab, 0xab, 0xab]
        );
    }

    #[test]
    fn padded_step_is_skipped() {
        // 2x2 bgr8 with 2 bytes of padding per row; the last row's padding is absent.
        let data = [1, 2, 3, 4, 5, 6, 99, 99, 7, 8, 9, 10, 11, 12];
        let img = to_rgb(&raw(2, 2, 8, PixelEncoding::Bgr8, &data)).unwrap();
        assert_eq!(img.as_raw(), &vec![3, 2, 1, 6, 5, 4, 9, 8, 7, 12, 11, 10]);
        // mono16 with padding, big endian.
        let data = [0x10, 0, 0x20, 0, 0xee, 0x30, 0, 0x40, 0];
        let mut r = raw(2, 2, 5, PixelEncoding::Mono16, &data[..9]);
        r.is_bigendian = true;
        assert_eq!(to_rgb(&r).unwrap().get_pixel(1, 1).0, [0x40; 3]);
        assert_eq!(to_rgb(&r).unwrap().get_pixel(0, 1).0, [0x30; 3]);
    }

    #[test]
    fn invalid_frames_are_refused() {
        let data = vec![0u8; 64];
        let m = bad_image_message(to_rgb(&raw(0, 2, 6, PixelEncoding::Rgb8, &data)));
        assert!(m.contains("0x2"), "{m}");
        let m = bad_image_message(to_rgb(&raw(2, 0, 6, PixelEncoding::Rgb8, &data)));
        assert!(m.contains("2x0"), "{m}");
        let m = bad_image_message(to_rgb(&raw(4, 2, 11, PixelEncoding::Rgb8, &data)));
        assert!(m.contains("step 11") && m.contains("12"), "{m}");
        let m = bad_image_message(to_rgb(&raw(4, 6, 12, PixelEncoding::Rgb8, &data)));
        assert!(m.contains("64 bytes") && m.contains("72"), "{m}");
        // Exactly enough without the last row's padding is fine, one byte less is not.
        assert!(to_rgb(&raw(2, 2, 8, PixelEncoding::Rgb8, &data[..14])).is_ok());
        let m = bad_image_message(to_rgb(&raw(2, 2, 8, PixelEncoding::Rgb8, &data[..13])));
        assert!(m.contains("13 bytes") && m.contains("14"), "{m}");
        let m = bad_image_message(to_rgb(&raw(
            MAX_SIDE + 1,
            1,
            u32::MAX,
            PixelEncoding::Mono8,
            &data,
        )));
        assert!(m.contains("16385") && m.contains("16384"), "{m}");
        let m = bad_image_message(to_rgb(&raw(
            1,
            MAX_SIDE + 1,
            1,
            PixelEncoding::Mono8,
            &data,
        )));
        assert!(m.contains("16385"), "{m}");
        let m = bad_image_message(to_rgb(&raw(
            16384,
            16384,
            16384,
            PixelEncoding::Mono8,
            &data,
        )));
        assert!(m.contains("268435456") && m.contains("67108864"), "{m}");
        // Lying sizes that would overflow u32 arithmetic.
        let m = bad_image_message(to_rgb(&raw(
            16384,
            4096,
            u32::MAX,
            PixelEncoding::Bgra8,
            &data,
        )));
        assert!(m.contains("needs at least"), "{m}");
    }

    fn sample_image() -> RgbImage {
        RgbImage::from_fn(24, 16, |x, y| {
            image::Rgb([(x * 10) as u8, (y * 15) as u8, 128])
        })
    }

    fn encode(img: &RgbImage, format: image::ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
        bytes
    }

    fn decode_message(r: Result<RgbImage>) -> String {
        match r {
            Err(Error::Decode(m)) => m,
            other => panic!("expected Decode, got {other:?}"),
        }
    }

    #[test]
    fn decodes_png_and_jpeg() {
        let img = sample_image();
        assert_eq!(decode(&encode(&img, image::ImageFormat::Png)).unwrap(), img);
        let jpeg = decode(&encode(&img, image::ImageFormat::Jpeg)).unwrap();
        assert_eq!(jpeg.dimensions(), (24, 16));
        let err = jpeg
            .pixels()
            .zip(img.pixels())
            .map(|(a, b)| (a[0] as i32 - b[0] as i32).abs())
            .max()
            .unwrap();
        assert!(err < 40, "JPEG error {err}");
        let gray = decode_gray(&encode(&img, image::ImageFormat::Png)).unwrap();
        assert_eq!(gray.dimensions(), (24, 16));
    }

    #[test]
    fn corrupt_and_truncated_bytes_are_decode_errors() {
        let img = sample_image();
        for format in [image::ImageFormat::Png, image::ImageFormat::Jpeg] {
            let bytes = encode(&img, format);
            // A PNG cut inside its 12-byte end chunk still holds every pixel and may decode;
            // any cut into the pixel data must not.
            for cut in [4, 20, bytes.len() / 2, bytes.len() - 13, bytes.len() - 1] {
                if format == image::ImageFormat::Png && cut > bytes.len() - 12 {
                    continue;
                }
                assert!(
                    matches!(decode(&bytes[..cut]), Err(Error::Decode(_))),
                    "{format:?} cut at {cut} of {}",
                    bytes.len()
                );
            }
            let mut corrupt = bytes.clone();
            for b in corrupt
                .iter_mut()
                .skip(bytes.len() / 3)
                .take(bytes.len() / 3)
            {
                *b ^= 0x5a;
            }
            // A JPEG with garbage in its entropy-coded data may still decode to (wrong) pixels;
            // what matters is that nothing panics and a PNG's checksums catch it.
            let r = decode(&corrupt);
            if format == image::ImageFormat::Png {
                decode_message(r);
            }
        }
        let m = decode_message(decode(&[]));
        assert!(m.contains("0 bytes"), "{m}");
        decode_message(decode(b"GIF89a is not among the enabled formats"));
        let m = decode_message(decode(b"\x01\x02\x03 random bytes"));
        assert!(m.contains("01 02 03"), "{m}");
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A valid small PNG whose IHDR (with a correct checksum) claims `width` x `height`.
    fn lying_png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = encode(&sample_image(), image::ImageFormat::Png);
        // Signature (8), length (4), "IHDR" (4), width, height ..., CRC after 13 data bytes.
        bytes[16..20].copy_from_slice(&width.to_be_bytes());
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    #[test]
    fn lying_headers_do_not_allocate() {
        assert_eq!(decode(&lying_png(24, 16)).unwrap(), sample_image());
        decode_message(decode(&lying_png(100_000, 100_000)));
        decode_message(decode(&lying_png(20_000, 8)));
        let m = decode_message(decode(&lying_png(9000, 9000)));
        assert!(m.contains("9000x9000"), "{m}");
    }

    #[test]
    fn load_names_missing_file() {
        let path = Path::new("/nonexistent/dir/frame.png");
        match load(path) {
            Err(Error::Io { path: p, .. }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/a.png");
        save_png(&file, &sample_image()).unwrap();
        assert_eq!(load(&file).unwrap(), sample_image());
        std::fs::write(&file, b"\x89PNG\r\n\x1a\n broken").unwrap();
        let m = decode_message(load(&file));
        assert!(m.contains("a.png"), "{m}");
    }
}
