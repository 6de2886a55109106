//! sensor_msgs / anomaly_inspector_msgs <-> core types. Parsing happens here, at the boundary.
use image::RgbImage;
use r2r::anomaly_inspector_msgs::msg::{AnomalyResult, DefectRegion as DefectRegionMsg};
use r2r::builtin_interfaces::msg::Duration as DurationMsg;
use r2r::sensor_msgs::msg::{Image, RegionOfInterest};
use r2r::std_msgs::msg::Header;

use crate::error::Result;
use crate::imaging::{self, PixelEncoding, RawImage};
use crate::inspector::Inspection;
use crate::postprocess::DefectRegion;

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
pub fn result_msg(header: &Header, inspection: &Inspection, model_id: &str, method: &str, elapsed: std::time::Duration) -> AnomalyResult {
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
