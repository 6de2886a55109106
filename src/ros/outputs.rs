//! Messages built from an inspection besides the result itself: RViz markers, the 32FC1 map,
//! and /diagnostics.
use r2r::builtin_interfaces::msg::Duration as DurationMsg;
use r2r::diagnostic_msgs::msg::{DiagnosticArray, DiagnosticStatus, KeyValue};
use r2r::geometry_msgs::msg::{Point, Pose, Quaternion, Vector3};
use r2r::sensor_msgs::msg::Image;
use r2r::std_msgs::msg::{ColorRGBA, Header};
use r2r::visualization_msgs::msg::{Marker, MarkerArray};

use super::params::Settings;
use super::worker::Status;
use crate::camera::PinholeCamera;
use crate::postprocess::{AnomalyMap, DefectRegion};

// visualization_msgs/Marker constants.
const SPHERE: i32 = 2;
const LINE_STRIP: i32 = 4;
const TEXT_VIEW_FACING: i32 = 9;
const ADD: i32 = 0;
const DELETEALL: i32 = 3;

/// Namespace of the region markers in RViz.
pub const MARKER_NS: &str = "anomaly_regions";

/// Pixel -> point in the header's frame: projected onto the surface plane when camera_info and
/// a plane are known, else on the image plane at `marker_pixel_size` metres per pixel
/// (x right, y down, as in the optical frame).
fn to_point(u: f64, v: f64, camera: Option<&PinholeCamera>, settings: &Settings) -> Point {
    if let (Some(cam), Some(plane)) = (camera, settings.surface_plane.as_ref()) {
        if let Some(p) = cam.intersect(u, v, plane) {
            return Point { x: p.x, y: p.y, z: p.z };
        }
    }
    Point { x: u * settings.marker_pixel_size, y: v * settings.marker_pixel_size, z: 0.0 }
}

fn colour(r: f32, g: f32, b: f32) -> ColorRGBA {
    ColorRGBA { r, g, b, a: 1.0 }
}

fn identity_pose() -> Pose {
    Pose { orientation: Quaternion { x: 0.0, y: 0.0, z: 0.0, w: 1.0 }, ..Default::default() }
}

/// Markers for the regions of one frame: first a DELETEALL (so regions of earlier frames never
/// linger), then per region a box outline, a sphere at the centroid (the point a robot would
/// go to) and a text label with the peak score.
pub fn region_markers(
    header: &Header,
    regions: &[DefectRegion],
    camera: Option<&PinholeCamera>,
    settings: &Settings,
) -> MarkerArray {
    let mut markers = vec![Marker { header: header.clone(), ns: MARKER_NS.into(), action: DELETEALL, ..Default::default() }];
    let projected = camera.is_some() && settings.surface_plane.is_some();
    // Marker sizes: a few pixels' worth on the image plane, or a few millimetres in 3-D.
    let line = if projected { 0.001 } else { 2.0 * settings.marker_pixel_size };
    for (i, r) in regions.iter().enumerate() {
        let (x0, y0) = (f64::from(r.x), f64::from(r.y));
        let (x1, y1) = (x0 + f64::from(r.width), y0 + f64::from(r.height));
        let corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)];
        let base = Marker {
            header: header.clone(),
            ns: MARKER_NS.into(),
            action: ADD,
            pose: identity_pose(),
            lifetime: DurationMsg { sec: 0, nanosec: 0 },
            ..Default::default()
        };
        markers.push(Marker {
            id: (3 * i) as i32,
            type_: LINE_STRIP,
            scale: Vector3 { x: line, y: 0.0, z: 0.0 },
            color: colour(1.0, 0.0, 1.0),
            points: corners.iter().map(|&(u, v)| to_point(u, v, camera, settings)).collect(),
            ..base.clone()
        });
        let c = to_point(r.centroid_x, r.centroid_y, camera, settings);
        let size = 4.0 * line;
        markers.push(Marker {
            id: (3 * i + 1) as i32,
            type_: SPHERE,
            pose: Pose { position: c.clone(), ..identity_pose() },
            scale: Vector3 { x: size, y: size, z: size },
            color: colour(1.0, 0.2, 0.0),
            ..base.clone()
        });
        let label = to_point(x0, y0, camera, settings);
        markers.push(Marker {
            id: (3 * i + 2) as i32,
            type_: TEXT_VIEW_FACING,
            pose: Pose { position: Point { z: label.z - 2.0 * size, ..label }, ..identity_pose() },
            scale: Vector3 { x: 0.0, y: 0.0, z: 6.0 * line },
            color: colour(1.0, 1.0, 1.0),
            text: format!("{:.2} ({} px)", r.peak_score, r.area_px),
            ..base
        });
    }
    MarkerArray { markers }
}

/// The anomaly map as a 32FC1 image (normalised scores, 0.5 = pixel threshold) with `header`.
pub fn map_image(header: &Header, map: &AnomalyMap) -> Image {
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

// diagnostic_msgs/DiagnosticStatus levels.
const OK: u8 = 0;
const WARN: u8 = 1;
const ERROR: u8 = 2;

/// One DiagnosticArray for the node: OK while frames are inspected, WARN when frames are
/// rejected or none arrived recently, ERROR without a model.
pub fn diagnostics(
    stamp: r2r::builtin_interfaces::msg::Time,
    node_name: &str,
    status: &Status,
    received: u64,
    dropped: u64,
) -> DiagnosticArray {
    let lat = &status.recent_latency_ms;
    let mean = if lat.is_empty() { 0.0 } else { lat.iter().sum::<f64>() / lat.len() as f64 };
    let max = lat.iter().cloned().fold(0.0, f64::max);
    let rate = status.rate_hz();
    let (level, message) = match (&status.model_id, rate > 0.0, &status.last_error) {
        (None, _, _) => (ERROR, "no model loaded".to_string()),
        (Some(_), false, Some(e)) if received > status.inspected => (WARN, format!("frames rejected: {e}")),
        (Some(_), false, _) => (WARN, "no frames inspected in the last 5 s".to_string()),
        (Some(_), true, _) => (OK, format!("inspecting at {rate:.1} Hz")),
    };
    let kv = |k: &str, v: String| KeyValue { key: k.into(), value: v };
    let mut values = vec![
        kv("model", status.model_id.clone().unwrap_or_default()),
        kv("method", status.method.clone()),
        kv("device", status.device.clone()),
        kv("rate_hz", format!("{rate:.2}")),
        kv("latency_mean_ms", format!("{mean:.1}")),
        kv("latency_max_ms", format!("{max:.1}")),
        kv("node_overhead_median_ms", format!("{:.2}", super::worker::median(&status.recent_overhead_ms))),
        kv("queue_wait_median_ms", format!("{:.2}", super::worker::median(&status.recent_wait_ms))),
        kv("frames_received", received.to_string()),
        kv("frames_inspected", status.inspected.to_string()),
        kv("frames_dropped", dropped.to_string()),
        kv("frames_rejected", status.rejected.to_string()),
        kv("last_error", status.last_error.clone().unwrap_or_default()),
    ];
    // One count per kind of refused frame (rejected_step_too_small, rejected_truncated, ...), so
    // a monitor sees which fault a camera has without reading the log.
    values.extend(status.rejected_by_kind.iter().map(|(kind, n)| kv(&format!("rejected_{kind}"), n.to_string())));
    DiagnosticArray {
        header: Header { stamp, frame_id: String::new() },
        status: vec![DiagnosticStatus {
            level,
            name: format!("{node_name}: anomaly inspection"),
            message,
            hardware_id: status.device.clone(),
            values,
        }],
    }
}
