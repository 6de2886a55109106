//! sensor_msgs / anomaly_inspector_msgs <-> core types. Parsing happens here, at the boundary.
use image::RgbImage;
use r2r::anomaly_inspector_msgs::msg::{AnomalyResult, DefectRegion as DefectRegionMsg};
use r2r::builtin_interfaces::msg::Duration as DurationMsg;
use r2r::sensor_msgs::msg::{CompressedImage, Image, RegionOfInterest};
use r2r::std_msgs::msg::Header;

use crate::imaging::{self, CompressedFormat};
use crate::{AnomalyMap, DefectRegion, Inspection, PixelEncoding, RawImage, Result};

/// A camera frame as it arrived.
pub enum Frame {
    /// sensor_msgs/Image.
    Raw(Image),
    /// sensor_msgs/CompressedImage.
    Compressed(CompressedImage),
}

impl Frame {
    /// The header, copied into every output of this frame.
    pub fn into_header(self) -> Header {
        match self {
            Frame::Raw(m) => m.header,
            Frame::Compressed(m) => m.header,
        }
    }

    /// The fields that say what the frame claims to be, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Frame::Raw(m) => format!(
                "{}x{} '{}' (step {}, {} bytes, is_bigendian {})",
                m.width,
                m.height,
                imaging::printable(&m.encoding, 40),
                m.step,
                m.data.len(),
                m.is_bigendian
            ),
            Frame::Compressed(m) => format!("compressed '{}' ({} bytes)", imaging::printable(&m.format, 40), m.data.len()),
        }
    }

    /// The frame as RGB, every size field checked.
    pub fn to_rgb(&self) -> Result<RgbImage> {
        match self {
            Frame::Raw(m) => image_to_rgb(m),
            Frame::Compressed(m) => compressed_to_rgb(m),
        }
    }
}

/// A borrowed core view of a sensor_msgs/Image (no pixel copy).
pub fn raw_image(msg: &Image) -> Result<RawImage<'_>> {
    let encoding: PixelEncoding = msg.encoding.parse()?;
    Ok(RawImage {
        width: msg.width,
        height: msg.height,
        step: msg.step,
        encoding,
        is_bigendian: msg.is_bigendian != 0,
        data: &msg.data,
    })
}

/// sensor_msgs/Image -> RGB image, validating every size field.
pub fn image_to_rgb(msg: &Image) -> Result<RgbImage> {
    imaging::to_rgb(&raw_image(msg)?)
}

/// sensor_msgs/CompressedImage -> RGB image: `format` must name JPEG or PNG (or be empty); the
/// data is decoded by its content, with the size limits of [`imaging::decode_compressed`].
pub fn compressed_to_rgb(msg: &CompressedImage) -> Result<RgbImage> {
    let _checked: CompressedFormat = msg.format.parse()?;
    imaging::decode_compressed(&msg.data)
}

/// An rgb8 sensor_msgs/Image carrying `header` (copied from the input, as image_pipeline does).
pub fn rgb_to_image(header: &Header, image: RgbImage) -> Image {
    let (width, height) = image.dimensions();
    Image {
        header: header.clone(),
        height,
        width,
        encoding: "rgb8".into(),
        is_bigendian: 0,
        step: width * 3,
        data: image.into_raw(),
    }
}

/// The anomaly map as a 32FC1 image (normalised scores, 0.5 = pixel threshold) with `header`.
pub fn map_to_image(header: &Header, map: &AnomalyMap) -> Image {
    let mut data = Vec::with_capacity(map.data().len() * 4);
    for v in map.data() {
        data.extend_from_slice(&v.to_le_bytes());
    }
    Image {
        header: header.clone(),
        height: map.height(),
        width: map.width(),
        encoding: "32FC1".into(),
        is_bigendian: 0,
        step: map.width() * 4,
        data,
    }
}

fn region_msg(r: &DefectRegion) -> DefectRegionMsg {
    DefectRegionMsg {
        bbox: RegionOfInterest { x_offset: r.x, y_offset: r.y, width: r.width, height: r.height, do_rectify: false },
        area_px: r.area_px,
        peak_score: r.peak_score,
        mean_score: r.mean_score,
        centroid_x: r.centroid_x,
        centroid_y: r.centroid_y,
    }
}

/// The AnomalyResult for one inspected frame.
pub fn result_msg(
    header: &Header,
    inspection: &Inspection,
    model_id: &str,
    method: &str,
    elapsed: std::time::Duration,
) -> AnomalyResult {
    AnomalyResult {
        header: header.clone(),
        score: inspection.score,
        raw_score: inspection.raw_score,
        threshold: inspection.threshold,
        is_anomalous: inspection.is_anomalous,
        model_id: model_id.into(),
        method: method.into(),
        regions: inspection.regions.iter().map(region_msg).collect(),
        inference_time: DurationMsg { sec: elapsed.as_secs() as i32, nanosec: elapsed.subsec_nanos() },
    }
}

#[cfg(test)]
mod tests {
    //! Message-level properties: whatever a publisher puts in the fields, the conversion the
    //! node runs never panics, and it agrees with the core's view of the same fields.
    use super::*;
    use crate::Error;
    use proptest::prelude::*;

    fn encoding_name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec![
                "rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "8UC1", "8UC3", "8UC4", "16UC1", "32FC1",
                "32FC3", "RGB8", " mono8 ", "yuv422", "bayer_rggb8", "16UC3", "64FC1", "",
            ])
            .prop_map(String::from),
            1 => ".{0,64}",
        ]
    }

    fn image_msg() -> impl Strategy<Value = Image> {
        let side = prop_oneof![6 => 0u32..20, 1 => any::<u32>(), 1 => Just(20_000u32)];
        let step = prop_oneof![6 => 0u32..260, 1 => any::<u32>()];
        (encoding_name(), side.clone(), side, step, any::<u8>(), prop::collection::vec(any::<u8>(), 0..5000)).prop_map(
            |(encoding, width, height, step, is_bigendian, data)| Image {
                encoding,
                width,
                height,
                step,
                is_bigendian,
                data,
                ..Default::default()
            },
        )
    }

    proptest! {
        #[test]
        fn any_image_message_converts_or_is_refused_as_a_bad_frame(msg in image_msg()) {
            match image_to_rgb(&msg) {
                Ok(img) => {
                    prop_assert_eq!(img.dimensions(), (msg.width, msg.height));
                    // Agrees with the core's conversion of the same fields.
                    let raw = raw_image(&msg).unwrap();
                    prop_assert_eq!(imaging::to_rgb(&raw).unwrap(), img);
                }
                Err(Error::Frame { message, .. }) => prop_assert!(message.len() < 1000),
                Err(other) => prop_assert!(false, "not a frame error: {}", other),
            }
        }

        #[test]
        fn every_non_zero_is_bigendian_means_big_endian(flag in 1u8..=255, data in prop::collection::vec(any::<u8>(), 8)) {
            for encoding in ["mono16", "32FC1"] {
                let msg = |f: u8| Image { encoding: encoding.into(), width: 2, height: 1, step: 8, is_bigendian: f, data: data.clone(), ..Default::default() };
                prop_assert_eq!(image_to_rgb(&msg(flag)).ok(), image_to_rgb(&msg(1)).ok());
            }
        }

        #[test]
        fn any_compressed_message_decodes_or_is_refused_as_a_bad_frame(
            format in prop_oneof![Just("jpeg".to_string()), Just("png".to_string()), Just(String::new()), ".{0,40}"],
            data in prop::collection::vec(any::<u8>(), 0..2000),
        ) {
            let msg = CompressedImage { format, data, ..Default::default() };
            match compressed_to_rgb(&msg) {
                Ok(img) => prop_assert!(img.width() >= 1 && img.height() >= 1),
                Err(Error::Frame { message, .. }) => prop_assert!(message.len() < 1000),
                Err(other) => prop_assert!(false, "not a frame error: {}", other),
            }
        }
    }

    #[test]
    fn compressed_format_is_checked_before_the_data() {
        let png = {
            let mut b = Vec::new();
            RgbImage::new(3, 2).write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png).unwrap();
            b
        };
        for (format, ok) in [("png", true), ("rgb8; png compressed rgb8", true), ("", true), ("jpeg", true), ("theora", false)] {
            let msg = CompressedImage { format: format.into(), data: png.clone(), ..Default::default() };
            assert_eq!(compressed_to_rgb(&msg).is_ok(), ok, "{format}");
        }
    }
}
