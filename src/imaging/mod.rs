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

use crate::error::{Error, FrameFault, Result};

/// Largest frame accepted, in pixels (8192 x 8192): far above any inspection camera, far below
/// what would exhaust memory.
pub const MAX_PIXELS: u64 = 8192 * 8192;

/// Largest accepted width or height, so that a thin but absurd frame (1 x 10^9) is refused too.
pub const MAX_SIDE: u32 = 16384;

/// Bytes the decoder may allocate for one image. An 8192 x 8192 16-bit RGBA PNG needs 512 MiB;
/// anything a header claims beyond that is refused before the pixel buffer is allocated.
pub const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;

/// How far float samples may stray outside 0..1 before the frame is refused: filter overshoot
/// is clamped, but a 0..255 scale or a wrong byte order (values like 1e30) must not be read as
/// a white or black frame.
pub const FLOAT_SLACK: f32 = 0.5;

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
    /// 32-bit float grey (`32FC1`), intensities in 0..1.
    Mono32F,
    /// 32-bit float, three channels in OpenCV's blue, green, red order (`32FC3`, as cv_bridge
    /// reads any 3-channel image), intensities in 0..1.
    Bgr32F,
}

/// The encoding names [`PixelEncoding::from_str`] accepts, for error messages and documentation.
pub const SUPPORTED_ENCODINGS: &str = "rgb8, bgr8, rgba8, bgra8, mono8, mono16, 8UC1, 8UC3, 8UC4, 16UC1, 32FC1, 32FC3";

impl PixelEncoding {
    /// Bytes one pixel occupies in the frame's data.
    pub fn bytes_per_pixel(self) -> u32 {
        match self {
            Self::Rgb8 | Self::Bgr8 => 3,
            Self::Rgba8 | Self::Bgra8 => 4,
            Self::Mono8 => 1,
            Self::Mono16 => 2,
            Self::Mono32F => 4,
            Self::Bgr32F => 12,
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
            Self::Mono32F => "32FC1",
            Self::Bgr32F => "32FC3",
        }
    }

    /// Whether samples are wider than a byte, so that `is_bigendian` matters.
    pub fn has_byte_order(self) -> bool {
        matches!(self, Self::Mono16 | Self::Mono32F | Self::Bgr32F)
    }
}

impl fmt::Display for PixelEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string from a message, made safe for a log line: control characters escaped and at most
/// `max` characters kept (a hostile publisher must not be able to flood or forge log lines).
pub fn printable(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).flat_map(char::escape_debug).collect();
    if s.chars().nth(max).is_some() {
        out.push_str(&format!("... ({} bytes)", s.len()));
    }
    out
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
            "32fc1" => Ok(Self::Mono32F),
            "32fc3" => Ok(Self::Bgr32F),
            _ => Err(Error::frame(
                FrameFault::UnsupportedEncoding,
                format!(
                    "unsupported pixel encoding '{}': supported are {SUPPORTED_ENCODINGS} \
                     (compressed images go through sensor_msgs/CompressedImage)",
                    printable(s, 40)
                ),
            )),
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
    /// Byte order of multi-byte samples (`Mono16` and the float encodings); ignored for 8-bit
    /// encodings, which have none.
    pub is_bigendian: bool,
    /// The pixel data, `height` rows of `step` bytes (the last row may omit its padding).
    pub data: &'a [u8],
}

/// Refuses sizes no camera produces, before anything is allocated for them.
fn check_dimensions(width: u32, height: u32) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::frame(
            FrameFault::ZeroSize,
            format!("image is {width}x{height}: width and height must be at least 1"),
        ));
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(Error::frame(
            FrameFault::TooLarge,
            format!("image is {width}x{height}: each side must be at most {MAX_SIDE} pixels"),
        ));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > MAX_PIXELS {
        return Err(Error::frame(
            FrameFault::TooLarge,
            format!("image is {width}x{height} = {pixels} pixels: at most {MAX_PIXELS} (8192x8192) are accepted"),
        ));
    }
    Ok(())
}

/// Float samples -> 8 bits, with the checks that keep a float frame from being misread.
#[derive(Default)]
struct FloatCheck {
    non_finite: u64,
    first_bad: Option<(usize, usize)>,
    out_of_range: u64,
    min: f32,
    max: f32,
}

impl FloatCheck {
    fn intensity(&mut self, v: f32, x: usize, y: usize) -> u8 {
        if !v.is_finite() {
            self.non_finite += 1;
            self.first_bad.get_or_insert((x, y));
            return 0;
        }
        if !(-FLOAT_SLACK..=1.0 + FLOAT_SLACK).contains(&v) {
            if self.out_of_range == 0 {
                (self.min, self.max) = (v, v);
            }
            self.out_of_range += 1;
            self.min = self.min.min(v);
            self.max = self.max.max(v);
            self.first_bad.get_or_insert((x, y));
            return 0;
        }
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    }

    fn verdict(&self, raw: &RawImage) -> Result<()> {
        let samples = u64::from(raw.width) * u64::from(raw.height) * (u64::from(raw.encoding.bytes_per_pixel()) / 4);
        let (x, y) = self.first_bad.unwrap_or_default();
        if self.non_finite > 0 {
            return Err(Error::frame(
                FrameFault::NonFinite,
                format!(
                    "{} of {samples} samples of the {} frame are NaN or infinite (first at pixel ({x}, {y})); \
                     float frames must hold finite intensities in 0..1",
                    self.non_finite, raw.encoding
                ),
            ));
        }
        if self.out_of_range > 0 {
            return Err(Error::frame(
                FrameFault::OutOfRange,
                format!(
                    "{} of {samples} samples of the {} frame (is_bigendian {}) lie outside 0..1 (from {:e} to {:e}, \
                     first at pixel ({x}, {y})): float frames must hold intensities in 0..1; is the byte order or \
                     the scale (0..255?) wrong?",
                    self.out_of_range,
                    raw.encoding,
                    u8::from(raw.is_bigendian),
                    self.min,
                    self.max
                ),
            ));
        }
        Ok(())
    }
}

fn f32_at(b: &[u8], big_endian: bool) -> f32 {
    let b = [b[0], b[1], b[2], b[3]];
    if big_endian {
        f32::from_be_bytes(b)
    } else {
        f32::from_le_bytes(b)
    }
}

/// Converts a camera frame to 8-bit RGB in one pass over its rows.
///
/// Row padding (`step` larger than a row) is skipped. `Mono16` keeps the high byte of each
/// sample (value / 256), which maps the full 16-bit range onto 0..255; a camera that fills only
/// the low 10 or 12 bits therefore looks dark, as it would in any 8-bit viewer. Alpha is dropped.
/// Float frames (`32FC1`, `32FC3`) hold intensities in 0..1 (the OpenCV convention); a frame with
/// NaN, infinite or far out-of-range samples is refused rather than guessed at.
pub fn to_rgb(raw: &RawImage) -> Result<RgbImage> {
    check_dimensions(raw.width, raw.height)?;
    let bpp = raw.encoding.bytes_per_pixel();
    // u64 arithmetic: width * bpp and height * step can overflow u32 on lying headers.
    let row_bytes = u64::from(raw.width) * u64::from(bpp);
    let step = u64::from(raw.step);
    if step < row_bytes {
        return Err(Error::frame(
            FrameFault::StepTooSmall,
            format!(
                "step {step} is smaller than a row: width {} x {bpp} bytes per pixel ({}) = {row_bytes} bytes",
                raw.width, raw.encoding
            ),
        ));
    }
    let needed = (u64::from(raw.height) - 1) * step + row_bytes;
    if (raw.data.len() as u64) < needed {
        return Err(Error::frame(
            FrameFault::DataTooShort,
            format!(
                "data has {} bytes, a {}x{} {} frame with step {step} needs at least {needed}",
                raw.data.len(),
                raw.width,
                raw.height,
                raw.encoding
            ),
        ));
    }
    // Both fit in usize now: needed <= data.len().
    let (row_bytes, step) = (row_bytes as usize, step as usize);
    let mut out = Vec::with_capacity(raw.width as usize * raw.height as usize * 3);
    let mut floats = FloatCheck::default();
    let be = raw.is_bigendian;
    for y in 0..raw.height as usize {
        let row = &raw.data[y * step..y * step + row_bytes];
        match raw.encoding {
            PixelEncoding::Rgb8 => out.extend_from_slice(row),
            PixelEncoding::Bgr8 => row.chunks_exact(3).for_each(|p| out.extend_from_slice(&[p[2], p[1], p[0]])),
            PixelEncoding::Rgba8 => row.chunks_exact(4).for_each(|p| out.extend_from_slice(&p[..3])),
            PixelEncoding::Bgra8 => row.chunks_exact(4).for_each(|p| out.extend_from_slice(&[p[2], p[1], p[0]])),
            PixelEncoding::Mono8 => row.iter().for_each(|&v| out.extend_from_slice(&[v, v, v])),
            PixelEncoding::Mono16 => {
                let hi = usize::from(!be);
                row.chunks_exact(2).for_each(|p| out.extend_from_slice(&[p[hi], p[hi], p[hi]]));
            }
            PixelEncoding::Mono32F => row.chunks_exact(4).enumerate().for_each(|(x, p)| {
                let v = floats.intensity(f32_at(p, be), x, y);
                out.extend_from_slice(&[v, v, v]);
            }),
            PixelEncoding::Bgr32F => row.chunks_exact(12).enumerate().for_each(|(x, p)| {
                let b = floats.intensity(f32_at(&p[0..4], be), x, y);
                let g = floats.intensity(f32_at(&p[4..8], be), x, y);
                let r = floats.intensity(f32_at(&p[8..12], be), x, y);
                out.extend_from_slice(&[r, g, b]);
            }),
        }
    }
    floats.verdict(raw)?;
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

fn first_bytes(bytes: &[u8]) -> String {
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    head.join(" ")
}

/// A decoder error as a frame fault: limits mean a lying size, an early end of data a cut.
fn decode_fault(e: image::ImageError) -> Error {
    use image::ImageError;
    let fault = match &e {
        ImageError::Limits(_) => FrameFault::TooLarge,
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => FrameFault::Truncated,
        _ => FrameFault::Corrupt,
    };
    Error::frame(fault, e.to_string())
}

/// Decodes a compressed image in whatever colour type it has, within [`decode_limits`] and
/// [`MAX_PIXELS`]. Errors are [`Error::Frame`]; file readers turn them into [`Error::Decode`]
/// with the file name.
fn decode_any(bytes: &[u8]) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::frame(FrameFault::Truncated, "no data (0 bytes)"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::frame(FrameFault::Corrupt, format!("cannot read the header: {e}")))?;
    if reader.format().is_none() {
        return Err(Error::frame(FrameFault::Corrupt, format!("not a PNG or JPEG image (first bytes: {})", first_bytes(bytes))));
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        return Err(Error::frame(
            FrameFault::Truncated,
            format!("truncated JPEG ({} bytes): no end-of-image marker after the last scan", bytes.len()),
        ));
    }
    reader.limits(decode_limits());
    let decoder = reader.into_decoder().map_err(|e| match e {
        // The decoder's own words ("Image size exceeds limit") do not say the size: read it from
        // the header alone (no pixel buffer) for a message that does.
        image::ImageError::Limits(_) => {
            header_dimensions(bytes).and_then(|(w, h)| check_dimensions(w, h).err()).unwrap_or_else(|| decode_fault(e))
        }
        other => decode_fault(other),
    })?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height)?;
    DynamicImage::from_decoder(decoder).map_err(decode_fault)
}

/// Width and height as the header states them, or None.
fn header_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?;
    reader.no_limits();
    reader.into_dimensions().ok()
}

/// A frame error as a file error (CLI, data sets): the file's name and the details.
fn file_error(path: Option<&Path>, e: Error) -> Error {
    let message = match e {
        Error::Frame { message, .. } => message,
        other => other.to_string(),
    };
    match path {
        Some(p) => Error::Decode(format!("{}: {message}", p.display())),
        None => Error::Decode(message),
    }
}

/// Decodes a JPEG or PNG image held in memory to 8-bit RGB (16-bit PNGs are scaled down,
/// grey and alpha images expanded or flattened by dropping alpha).
pub fn decode(bytes: &[u8]) -> Result<RgbImage> {
    decode_any(bytes).map(DynamicImage::into_rgb8).map_err(|e| file_error(None, e))
}

/// Decodes a JPEG or PNG image held in memory to 8-bit grey (for masks).
pub fn decode_gray(bytes: &[u8]) -> Result<image::GrayImage> {
    decode_any(bytes).map(DynamicImage::into_luma8).map_err(|e| file_error(None, e))
}

/// The `format` of a sensor_msgs/CompressedImage, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressedFormat {
    /// JPEG (`jpeg`, `jpg`, or image_transport's `<encoding>; jpeg compressed <encoding>`).
    Jpeg,
    /// PNG (`png`, or `<encoding>; png compressed <encoding>`).
    Png,
    /// Empty format: some drivers leave it unset; the data says what it is.
    Unspecified,
}

/// The `format` strings [`CompressedFormat::from_str`] accepts, for messages.
pub const SUPPORTED_FORMATS: &str =
    "jpeg, png, image_transport's '<encoding>; jpeg compressed <encoding>' or '... png compressed ...', or empty";

impl FromStr for CompressedFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        if lower.is_empty() {
            return Ok(Self::Unspecified);
        }
        let unknown = |why: &str| {
            Error::frame(
                FrameFault::UnknownFormat,
                format!("format '{}' {why}: accepted are {SUPPORTED_FORMATS}", printable(s, 40)),
            )
        };
        // compressedDepth carries its own header before the PNG and is depth, not intensity.
        if lower.contains("compresseddepth") {
            return Err(unknown("is a compressedDepth (depth map) transport, which is not supported"));
        }
        let tokens: Vec<&str> = lower.split(|c: char| c == ';' || c.is_whitespace()).collect();
        let jpeg = tokens.iter().any(|t| matches!(*t, "jpeg" | "jpg"));
        let png = tokens.contains(&"png");
        match (jpeg, png) {
            (true, false) => Ok(Self::Jpeg),
            (false, true) => Ok(Self::Png),
            (true, true) => Err(unknown("names both JPEG and PNG")),
            (false, false) => Err(unknown("is neither JPEG nor PNG")),
        }
    }
}

/// Decodes the data of a CompressedImage to 8-bit RGB. The data must be a JPEG or PNG, decoded
/// by its content as image_transport does (check `format` with [`CompressedFormat`] first);
/// errors are [`Error::Frame`] with the fault (truncated, corrupt, too large...).
pub fn decode_compressed(bytes: &[u8]) -> Result<RgbImage> {
    const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    let is_jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
    let is_png = bytes.starts_with(PNG_SIGNATURE);
    if !bytes.is_empty() && !is_jpeg && !is_png {
        // Only a prefix of a signature: the frame was cut short, not replaced by garbage.
        let cut = PNG_SIGNATURE.starts_with(bytes) || [0xFF, 0xD8].starts_with(bytes);
        return Err(Error::frame(
            if cut { FrameFault::Truncated } else { FrameFault::Corrupt },
            format!("{} bytes that are not a JPEG or PNG image (first bytes: {})", bytes.len(), first_bytes(bytes)),
        ));
    }
    decode_any(bytes).map(DynamicImage::into_rgb8)
}

/// Reads and decodes a JPEG or PNG file to 8-bit RGB; errors name the file.
pub fn load(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_any(&bytes).map(DynamicImage::into_rgb8).map_err(|e| file_error(Some(path), e))
}

/// Reads and decodes a JPEG or PNG file to 8-bit grey (masks); errors name the file.
pub fn load_gray(path: &Path) -> Result<image::GrayImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_any(&bytes).map(DynamicImage::into_luma8).map_err(|e| file_error(Some(path), e))
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
    image.save_with_format(path, image::ImageFormat::Png).map_err(|e| match e {
        image::ImageError::IoError(io) => Error::io(path, io),
        other => Error::Decode(format!("{}: cannot encode PNG: {other}", path.display())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(width: u32, height: u32, step: u32, encoding: PixelEncoding, data: &[u8]) -> RawImage<'_> {
        RawImage { width, height, step, encoding, is_bigendian: false, data }
    }

    fn fault(r: Result<RgbImage>) -> (FrameFault, String) {
        match r {
            Err(Error::Frame { fault, message }) => (fault, message),
            other => panic!("expected a frame error, got {other:?}"),
        }
    }

    /// The message of a frame error, which must be of kind `want`.
    fn message_of(want: FrameFault, r: Result<RgbImage>) -> String {
        let (got, m) = fault(r);
        assert_eq!(got, want, "{m}");
        m
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
        assert_eq!(PixelEncoding::Mono16.to_string().parse::<PixelEncoding>().unwrap(), PixelEncoding::Mono16);
        assert_eq!("32FC1".parse::<PixelEncoding>().unwrap(), PixelEncoding::Mono32F);
        assert_eq!("32fc3".parse::<PixelEncoding>().unwrap(), PixelEncoding::Bgr32F);
        match "yuv422".parse::<PixelEncoding>() {
            Err(Error::Frame { fault: FrameFault::UnsupportedEncoding, message: m }) => {
                assert!(m.contains("yuv422") && m.contains("bgr8") && m.contains("16UC1"), "{m}")
            }
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
        let img = to_rgb(&raw(2, 1, 4, PixelEncoding::Mono16, &[0x34, 0x12, 0xff, 0xab])).unwrap();
        assert_eq!(img.as_raw(), &vec![0x12, 0x12, 0x12, 0xab, 0xab, 0xab]);
        let mut be = raw(2, 1, 4, PixelEncoding::Mono16, &[0x12, 0x34, 0xab, 0xff]);
        be.is_bigendian = true;
        assert_eq!(to_rgb(&be).unwrap().as_raw(), &vec![0x12, 0x12, 0x12, 0xab, 0xab, 0xab]);
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
        use FrameFault::*;
        let data = vec![0u8; 64];
        let m = message_of(ZeroSize, to_rgb(&raw(0, 2, 6, PixelEncoding::Rgb8, &data)));
        assert!(m.contains("0x2"), "{m}");
        let m = message_of(ZeroSize, to_rgb(&raw(2, 0, 6, PixelEncoding::Rgb8, &data)));
        assert!(m.contains("2x0"), "{m}");
        let m = message_of(StepTooSmall, to_rgb(&raw(4, 2, 11, PixelEncoding::Rgb8, &data)));
        assert!(m.contains("step 11") && m.contains("12"), "{m}");
        let m = message_of(DataTooShort, to_rgb(&raw(4, 6, 12, PixelEncoding::Rgb8, &data)));
        assert!(m.contains("64 bytes") && m.contains("72"), "{m}");
        // Exactly enough without the last row's padding is fine, one byte less is not.
        assert!(to_rgb(&raw(2, 2, 8, PixelEncoding::Rgb8, &data[..14])).is_ok());
        let m = message_of(DataTooShort, to_rgb(&raw(2, 2, 8, PixelEncoding::Rgb8, &data[..13])));
        assert!(m.contains("13 bytes") && m.contains("14"), "{m}");
        let m = message_of(TooLarge, to_rgb(&raw(MAX_SIDE + 1, 1, u32::MAX, PixelEncoding::Mono8, &data)));
        assert!(m.contains("16385") && m.contains("16384"), "{m}");
        let m = message_of(TooLarge, to_rgb(&raw(1, MAX_SIDE + 1, 1, PixelEncoding::Mono8, &data)));
        assert!(m.contains("16385"), "{m}");
        let m = message_of(TooLarge, to_rgb(&raw(20000, 20000, 60000, PixelEncoding::Rgb8, &data)));
        assert!(m.contains("20000x20000") && m.contains("at most 16384"), "{m}");
        let m = message_of(TooLarge, to_rgb(&raw(16384, 16384, 16384, PixelEncoding::Mono8, &data)));
        assert!(m.contains("268435456") && m.contains("67108864"), "{m}");
        // Lying sizes that would overflow u32 arithmetic.
        let m = message_of(DataTooShort, to_rgb(&raw(16384, 4096, u32::MAX, PixelEncoding::Bgra8, &data)));
        assert!(m.contains("needs at least"), "{m}");
        let m = message_of(StepTooSmall, to_rgb(&raw(8192, 2, 8192 * 12 - 1, PixelEncoding::Bgr32F, &data)));
        assert!(m.contains("12 bytes per pixel"), "{m}");
    }

    fn f32_bytes(values: &[f32], big_endian: bool) -> Vec<u8> {
        values.iter().flat_map(|v| if big_endian { v.to_be_bytes() } else { v.to_le_bytes() }).collect()
    }

    #[test]
    fn float_frames_honour_byte_order_and_refuse_non_finite_samples() {
        for be in [false, true] {
            let data = f32_bytes(&[0.0, 0.5, 1.0, 1.2, -0.1, 20.0 / 255.0], be);
            let mut r = raw(6, 1, 24, PixelEncoding::Mono32F, &data);
            r.is_bigendian = be;
            let img = to_rgb(&r).unwrap();
            let grey: Vec<u8> = img.pixels().map(|p| p[0]).collect();
            assert_eq!(grey, vec![0, 128, 255, 255, 0, 20], "big endian {be}");
            // 32FC3 is blue, green, red.
            let data = f32_bytes(&[0.0, 0.5, 1.0, 1.0, 0.0, 0.0], be);
            let mut r = raw(2, 1, 24, PixelEncoding::Bgr32F, &data);
            r.is_bigendian = be;
            assert_eq!(to_rgb(&r).unwrap().as_raw(), &vec![255, 128, 0, 0, 0, 255]);
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let data = f32_bytes(&[0.5, 0.5, bad, 0.5], false);
            let m = message_of(FrameFault::NonFinite, to_rgb(&raw(2, 2, 8, PixelEncoding::Mono32F, &data)));
            assert!(m.contains("1 of 4 samples") && m.contains("pixel (0, 1)"), "{m}");
            let data = f32_bytes(&[0.5, 0.5, 0.5, 0.5, 0.5, bad], false);
            let m = message_of(FrameFault::NonFinite, to_rgb(&raw(2, 1, 24, PixelEncoding::Bgr32F, &data)));
            assert!(m.contains("32FC3") && m.contains("pixel (1, 0)"), "{m}");
        }
        // A 0..255 scale, and little-endian data that claims to be big endian: refused, not read
        // as a white or a noise frame.
        let data = f32_bytes(&[0.0, 17.0, 255.0, 128.0], false);
        let m = message_of(FrameFault::OutOfRange, to_rgb(&raw(4, 1, 16, PixelEncoding::Mono32F, &data)));
        assert!(m.contains("3 of 4") && m.contains("2.55e2"), "{m}");
        let values: Vec<f32> = (0..64).map(|i| i as f32 / 63.0).collect();
        let data = f32_bytes(&values, false);
        let mut lying = raw(8, 8, 32, PixelEncoding::Mono32F, &data);
        lying.is_bigendian = true;
        let (f, m) = fault(to_rgb(&lying));
        assert!(matches!(f, FrameFault::OutOfRange | FrameFault::NonFinite), "{m}");
        assert!(m.contains("is_bigendian 1") || f == FrameFault::NonFinite, "{m}");
        // 8-bit encodings have no byte order: the flag changes nothing.
        let mut r = raw(2, 1, 6, PixelEncoding::Rgb8, &[1, 2, 3, 4, 5, 6]);
        r.is_bigendian = true;
        assert_eq!(to_rgb(&r).unwrap().as_raw(), &vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn hostile_strings_are_cut_and_escaped_in_messages() {
        let long = format!("evil\nname{}", "x".repeat(10_000));
        let m = match long.parse::<PixelEncoding>() {
            Err(e) => e.to_string(),
            Ok(_) => panic!("parsed"),
        };
        assert!(m.len() < 400 && m.contains(&format!("{} bytes", long.len())), "{m}");
        let m = "a\nb\u{1b}[31m".parse::<PixelEncoding>().unwrap_err().to_string();
        assert!(!m.contains('\n') && !m.contains('\u{1b}'), "{m}");
    }

    #[test]
    fn compressed_formats() {
        use CompressedFormat::*;
        for (s, f) in [
            ("jpeg", Jpeg),
            ("JPG", Jpeg),
            ("png", Png),
            ("", Unspecified),
            ("rgb8; jpeg compressed bgr8", Jpeg),
            ("mono16; png compressed mono16", Png),
        ] {
            assert_eq!(s.parse::<CompressedFormat>().unwrap(), f, "{s}");
        }
        for s in ["theora", "h264", "16UC1; compressedDepth png", "jpeg png", "webp"] {
            match s.parse::<CompressedFormat>() {
                Err(Error::Frame { fault: FrameFault::UnknownFormat, message }) => {
                    assert!(message.contains(s) && message.contains("accepted are"), "{message}")
                }
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    fn sample_image() -> RgbImage {
        RgbImage::from_fn(24, 16, |x, y| image::Rgb([(x * 10) as u8, (y * 15) as u8, 128]))
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
        let err = jpeg.pixels().zip(img.pixels()).map(|(a, b)| (a[0] as i32 - b[0] as i32).abs()).max().unwrap();
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
                assert!(matches!(decode(&bytes[..cut]), Err(Error::Decode(_))), "{format:?} cut at {cut} of {}", bytes.len());
            }
            let mut corrupt = bytes.clone();
            for b in corrupt.iter_mut().skip(bytes.len() / 3).take(bytes.len() / 3) {
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

    #[test]
    fn compressed_frames_say_what_is_wrong() {
        use FrameFault::*;
        let img = sample_image();
        let png = encode(&img, image::ImageFormat::Png);
        let jpeg = encode(&img, image::ImageFormat::Jpeg);
        assert_eq!(decode_compressed(&png).unwrap(), img);
        assert_eq!(decode_compressed(&jpeg).unwrap().dimensions(), (24, 16));
        let m = message_of(Truncated, decode_compressed(&jpeg[..jpeg.len() / 2]));
        assert!(m.contains("truncated JPEG"), "{m}");
        message_of(Truncated, decode_compressed(&png[..png.len() / 2]));
        message_of(Truncated, decode_compressed(&png[..5]));
        message_of(Truncated, decode_compressed(&[]));
        let m = message_of(Corrupt, decode_compressed(b"\x01\x02\x03 random bytes"));
        assert!(m.contains("not a JPEG or PNG") && m.contains("01 02 03"), "{m}");
        let mut flipped = png.clone();
        let n = flipped.len();
        flipped[n / 2] ^= 0xff;
        message_of(Corrupt, decode_compressed(&flipped));
        let m = message_of(TooLarge, decode_compressed(&lying_png(20_000, 20_000)));
        assert!(m.contains("image is 20000x20000") && m.contains("at most 16384"), "{m}");
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
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
