//! Fuzzing of what the node does with camera data before any model sees it: the raw frame
//! conversion (sensor_msgs/Image fields -> RGB) and the compressed decoder (CompressedImage
//! bytes -> RGB), with proptest, plus a replay of the hand corpus in tests/corpus/.
//!
//! The properties: never a panic; either Ok with exactly the declared dimensions (and the pixels
//! a reference conversion gives), or a frame error whose fault is the first rule the input broke.
//! No ROS needed (the message-level properties are in src/ros/convert.rs). A longer run:
//! `PROPTEST_CASES=20000 cargo test --release --test fuzz_decoding`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
use std::path::{Path, PathBuf};

use anomaly_inspector::imaging::{self, CompressedFormat, PixelEncoding, RawImage, MAX_PIXELS, MAX_SIDE};
use anomaly_inspector::{Error, FrameFault};
use image::RgbImage;
use proptest::prelude::*;
use serde_json::Value;

const ENCODINGS: [PixelEncoding; 8] = [
    PixelEncoding::Rgb8,
    PixelEncoding::Bgr8,
    PixelEncoding::Rgba8,
    PixelEncoding::Bgra8,
    PixelEncoding::Mono8,
    PixelEncoding::Mono16,
    PixelEncoding::Mono32F,
    PixelEncoding::Bgr32F,
];

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// The outcome as the corpus names it: "ok" or the fault.
fn outcome(r: &anomaly_inspector::Result<RgbImage>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(Error::Frame { fault, .. }) => fault.as_str().into(),
        Err(other) => format!("not a frame error: {other}"),
    }
}

/// One pixel as the reference conversion reads it: straight from the definition of each
/// encoding, independent of the row loop under test.
fn reference_pixel(raw: &RawImage, x: usize, y: usize) -> Option<[u8; 3]> {
    let bpp = raw.encoding.bytes_per_pixel() as usize;
    let at = y * raw.step as usize + x * bpp;
    let p = &raw.data[at..at + bpp];
    let float = |i: usize| {
        let b = [p[i], p[i + 1], p[i + 2], p[i + 3]];
        let v = if raw.is_bigendian { f32::from_be_bytes(b) } else { f32::from_le_bytes(b) };
        (v.is_finite() && (-0.5..=1.5).contains(&v)).then(|| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
    };
    Some(match raw.encoding {
        PixelEncoding::Rgb8 | PixelEncoding::Rgba8 => [p[0], p[1], p[2]],
        PixelEncoding::Bgr8 | PixelEncoding::Bgra8 => [p[2], p[1], p[0]],
        PixelEncoding::Mono8 => [p[0]; 3],
        PixelEncoding::Mono16 => {
            let v = if raw.is_bigendian { u16::from_be_bytes([p[0], p[1]]) } else { u16::from_le_bytes([p[0], p[1]]) };
            [(v >> 8) as u8; 3]
        }
        PixelEncoding::Mono32F => [float(0)?; 3],
        PixelEncoding::Bgr32F => [float(8)?, float(4)?, float(0)?],
    })
}

/// The fault the first broken rule gives, or None when the sizes are consistent.
fn expected_size_fault(raw: &RawImage) -> Option<FrameFault> {
    let (w, h) = (u64::from(raw.width), u64::from(raw.height));
    if w == 0 || h == 0 {
        return Some(FrameFault::ZeroSize);
    }
    if raw.width > MAX_SIDE || raw.height > MAX_SIDE || w * h > MAX_PIXELS {
        return Some(FrameFault::TooLarge);
    }
    let row = w * u64::from(raw.encoding.bytes_per_pixel());
    if u64::from(raw.step) < row {
        return Some(FrameFault::StepTooSmall);
    }
    if (raw.data.len() as u64) < (h - 1) * u64::from(raw.step) + row {
        return Some(FrameFault::DataTooShort);
    }
    None
}

/// Checks one conversion against the rules and the reference; a failure message otherwise.
fn check_conversion(raw: &RawImage) -> Result<(), TestCaseError> {
    let result = imaging::to_rgb(raw);
    if let Some(fault) = expected_size_fault(raw) {
        prop_assert_eq!(outcome(&result), fault.as_str(), "{:?}", raw.encoding);
        return Ok(());
    }
    // Sizes are consistent: only float samples can still make it fail.
    let mut any_bad = false;
    let mut bad_is_non_finite = false;
    for y in 0..raw.height as usize {
        for x in 0..raw.width as usize {
            if reference_pixel(raw, x, y).is_none() {
                any_bad = true;
            }
        }
    }
    if any_bad {
        // NaN/Inf wins over out-of-range when both are present.
        for y in 0..raw.height as usize {
            let row = &raw.data[y * raw.step as usize..][..(raw.width * raw.encoding.bytes_per_pixel()) as usize];
            bad_is_non_finite |= row.chunks_exact(4).any(|b| {
                let b = [b[0], b[1], b[2], b[3]];
                !(if raw.is_bigendian { f32::from_be_bytes(b) } else { f32::from_le_bytes(b) }).is_finite()
            });
        }
        let want = if bad_is_non_finite { FrameFault::NonFinite } else { FrameFault::OutOfRange };
        prop_assert_eq!(outcome(&result), want.as_str());
        return Ok(());
    }
    let img = match result {
        Ok(img) => img,
        Err(e) => return Err(TestCaseError::fail(format!("a consistent {:?} frame was refused: {e}", raw.encoding))),
    };
    prop_assert_eq!(img.dimensions(), (raw.width, raw.height));
    prop_assert_eq!(img.as_raw().len() as u64, u64::from(raw.width) * u64::from(raw.height) * 3);
    for (x, y, p) in img.enumerate_pixels() {
        prop_assert_eq!(Some(p.0), reference_pixel(raw, x as usize, y as usize), "pixel ({}, {})", x, y);
    }
    Ok(())
}

/// A side: mostly small (so that data can match it), sometimes zero, at or past the limits, or
/// anything at all.
fn side() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 1u32..24,
        1 => Just(0u32),
        1 => (MAX_SIDE - 2)..(MAX_SIDE + 3),
        1 => Just(20_000u32),
        1 => any::<u32>(),
    ]
}

/// Data for a frame: the right length, a little short or long, or any length; float frames
/// mostly carry valid intensities (else nearly every case would be refused for NaN).
fn frame() -> impl Strategy<Value = (PixelEncoding, u32, u32, u32, bool, Vec<u8>)> {
    (prop::sample::select(ENCODINGS.to_vec()), side(), side(), any::<bool>()).prop_flat_map(|(enc, w, h, be)| {
        let row = u64::from(w) * u64::from(enc.bytes_per_pixel());
        let step = prop_oneof![
            4 => Just(row.min(u64::from(u32::MAX)) as u32),
            3 => (0u32..9).prop_map(move |pad| (row + u64::from(pad)).min(u64::from(u32::MAX)) as u32),
            1 => (1u32..5).prop_map(move |less| row.saturating_sub(u64::from(less)) as u32),
            1 => any::<u32>(),
        ];
        (Just(enc), Just(w), Just(h), step, Just(be)).prop_flat_map(move |(enc, w, h, step, be)| {
            let needed = (u64::from(h).max(1) - 1) * u64::from(step) + row;
            let len = if needed <= 64 * 1024 {
                prop_oneof![
                    4 => Just(needed as usize),
                    1 => 0usize..=needed as usize,
                    1 => (needed as usize)..(needed as usize + 40),
                ]
                .boxed()
            } else {
                (0usize..2048).boxed()
            };
            let floats = matches!(enc, PixelEncoding::Mono32F | PixelEncoding::Bgr32F);
            let data = len.prop_flat_map(move |n| {
                let valid_floats = prop::collection::vec(-0.7f32..1.7, n / 4).prop_map(move |v| {
                    let mut d: Vec<u8> = v.iter().flat_map(|f| if be { f.to_be_bytes() } else { f.to_le_bytes() }).collect();
                    d.resize(n, 0);
                    d
                });
                if floats {
                    prop_oneof![3 => valid_floats, 1 => prop::collection::vec(any::<u8>(), n)].boxed()
                } else {
                    prop::collection::vec(any::<u8>(), n).boxed()
                }
            });
            (Just(enc), Just(w), Just(h), Just(step), Just(be), data)
        })
    })
}

/// Small valid images of every colour type the decoders handle, encoded.
fn seeds() -> Vec<Vec<u8>> {
    let rgb = RgbImage::from_fn(13, 7, |x, y| image::Rgb([(x * 19) as u8, (y * 31) as u8, ((x + y) * 7) as u8]));
    let dynamic = image::DynamicImage::ImageRgb8(rgb);
    let mut out = Vec::new();
    for img in [
        dynamic.clone(),
        image::DynamicImage::ImageLuma8(dynamic.to_luma8()),
        image::DynamicImage::ImageRgba8(dynamic.to_rgba8()),
        image::DynamicImage::ImageLuma16(dynamic.to_luma16()),
    ] {
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        out.push(png);
    }
    for img in [dynamic.clone(), image::DynamicImage::ImageLuma8(dynamic.to_luma8())] {
        let mut jpeg = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        out.push(jpeg);
    }
    // The corpus's valid files too (progressive JPEG, palette PNG...).
    for entry in std::fs::read_dir(corpus().join("compressed")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("ok") {
            out.push(std::fs::read(path).unwrap());
        }
    }
    out
}

fn check_decoded(r: &anomaly_inspector::Result<RgbImage>) -> Result<(), TestCaseError> {
    match r {
        Ok(img) => {
            let (w, h) = img.dimensions();
            prop_assert!(w >= 1 && h >= 1 && w <= MAX_SIDE && h <= MAX_SIDE);
            prop_assert!(u64::from(w) * u64::from(h) <= MAX_PIXELS);
            prop_assert_eq!(img.as_raw().len() as u64, u64::from(w) * u64::from(h) * 3);
        }
        Err(Error::Frame { message, .. }) => prop_assert!(!message.is_empty() && message.len() < 1000, "{}", message),
        Err(other) => prop_assert!(false, "not a frame error: {}", other),
    }
    Ok(())
}

proptest! {
    #[test]
    fn raw_frames_convert_or_are_refused_for_the_first_broken_rule(
        (enc, w, h, step, be, data) in frame()
    ) {
        let raw = RawImage { width: w, height: h, step, encoding: enc, is_bigendian: be, data: &data };
        check_conversion(&raw)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        check_decoded(&imaging::decode_compressed(&bytes))?;
    }

    #[test]
    fn mutated_png_and_jpeg_never_panic_the_decoder(
        seed in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
        splice in prop::option::of((any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..64))),
    ) {
        let seeds = seeds();
        let mut bytes = seed.get(&seeds).clone();
        for (at, x) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        if let Some((at, junk)) = splice {
            let i = at.index(bytes.len());
            bytes.splice(i..i, junk);
        }
        if let Some(at) = cut {
            bytes.truncate(at.index(bytes.len()));
        }
        check_decoded(&imaging::decode_compressed(&bytes))?;
    }

    #[test]
    fn any_cut_of_a_jpeg_or_into_png_pixel_data_is_refused(seed in any::<prop::sample::Index>(), at in any::<prop::sample::Index>()) {
        let seeds = seeds();
        let bytes = seed.get(&seeds);
        // A PNG cut inside its 12-byte end chunk still holds every pixel, and so does a JPEG cut
        // in what follows its end-of-image marker; any earlier cut does not.
        let end = if bytes.starts_with(b"\x89PNG") {
            bytes.len() - 12
        } else {
            bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]).unwrap() + 1
        };
        let keep = at.index(end);
        let r = imaging::decode_compressed(&bytes[..keep]);
        prop_assert!(matches!(r, Err(Error::Frame { fault: FrameFault::Truncated | FrameFault::Corrupt, .. })),
            "{} bytes of {}: {:?}", keep, bytes.len(), r.map(|i| i.dimensions()));
    }

    #[test]
    fn encoding_and_format_strings_never_panic_and_stay_short_in_messages(s in ".{0,300}") {
        for msg in [s.parse::<PixelEncoding>().err(), s.parse::<CompressedFormat>().err()].into_iter().flatten() {
            let msg = msg.to_string();
            prop_assert!(msg.len() < 800, "{}", msg);
            prop_assert!(!msg.contains('\n') && !msg.contains('\u{1b}'), "{}", msg);
        }
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn raw_corpus_replays_with_the_expected_outcome() {
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(corpus().join("raw_frames.json")).unwrap()).unwrap();
    assert!(cases.len() >= 40, "corpus lost cases: {}", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let data = hex(c["data_hex"].as_str().unwrap());
        let n = |k: &str| c[k].as_u64().unwrap() as u32;
        let parsed = c["encoding"].as_str().unwrap().parse::<PixelEncoding>();
        let got = match parsed {
            Ok(encoding) => {
                let raw = RawImage {
                    width: n("width"),
                    height: n("height"),
                    step: n("step"),
                    encoding,
                    is_bigendian: c["is_bigendian"].as_u64().unwrap() != 0,
                    data: &data,
                };
                let r = imaging::to_rgb(&raw);
                if let Ok(img) = &r {
                    assert_eq!(img.dimensions(), (raw.width, raw.height), "{}", c["name"]);
                }
                outcome(&r)
            }
            Err(e) => outcome(&Err(e)),
        };
        if got != c["expect"].as_str().unwrap() {
            failures.push(format!("{}: expected {}, got {got}", c["name"], c["expect"]));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn compressed_corpus_replays_with_the_expected_outcome() {
    let dir = corpus();
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("compressed.json")).unwrap()).unwrap();
    let files = expected["files"].as_object().unwrap();
    let on_disk = std::fs::read_dir(dir.join("compressed")).unwrap().count();
    assert_eq!(files.len(), on_disk, "every corpus file needs an expected outcome in compressed.json");
    assert!(files.len() >= 25);
    let mut failures = Vec::new();
    for (name, want) in files {
        let bytes = std::fs::read(Path::new(&dir).join("compressed").join(name)).unwrap();
        let r = imaging::decode_compressed(&bytes);
        let got = outcome(&r);
        if got != want.as_str().unwrap() {
            failures.push(format!("{name}: expected {want}, got {got} ({:?})", r.err().map(|e| e.to_string())));
        }
    }
    for (format, want) in expected["formats"].as_object().unwrap() {
        let got = match format.parse::<CompressedFormat>() {
            Ok(_) => "ok".to_string(),
            Err(e) => outcome(&Err(e)),
        };
        if got != want.as_str().unwrap() {
            failures.push(format!("format {format:?}: expected {want}, got {got}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
