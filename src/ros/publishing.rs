//! Everything the node publishes per frame: the result, score and verdict, the region markers
//! (on the inference thread, at once), and the map, heatmap and overlay pictures (on an image
//! thread of their own, so that the verdict never waits for pictures).
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Instant;

use image::RgbImage;
use r2r::anomaly_inspector_msgs::msg::AnomalyResult;
use r2r::builtin_interfaces::msg::Duration as DurationMsg;
use r2r::geometry_msgs::msg::{Point, Pose, Quaternion, Vector3};
use r2r::sensor_msgs::msg::Image;
use r2r::std_msgs::msg::{Bool, ColorRGBA, Float32, Header};
use r2r::visualization_msgs::msg::{Marker, MarkerArray};
use r2r::QosProfile;

use super::convert;
use super::params::Settings;
use crate::{DefectRegion, Inspection, PictureSet, PinholeCamera};

/// The publishers of one frame's verdict, used on the inference thread.
pub struct ResultPublishers {
    result: r2r::Publisher<AnomalyResult>,
    score: r2r::Publisher<Float32>,
    verdict: r2r::Publisher<Bool>,
    markers: r2r::Publisher<MarkerArray>,
}

/// The publishers of one frame's pictures, moved into the image thread.
pub struct ImagePublishers {
    heatmap: r2r::Publisher<Image>,
    overlay: r2r::Publisher<Image>,
    map: r2r::Publisher<Image>,
}

/// Creates every per-frame publisher: results reliable (or best effort when `output_reliable` is
/// false) with depth 10, pictures with depth 2, the verdict latched.
pub fn create(node: &mut r2r::Node, output_reliable: bool) -> r2r::Result<(ResultPublishers, ImagePublishers)> {
    let qos = |depth: usize| {
        let q = QosProfile::default().keep_last(depth);
        if output_reliable {
            q
        } else {
            q.best_effort()
        }
    };
    let results = ResultPublishers {
        result: node.create_publisher("anomaly/result", qos(10))?,
        score: node.create_publisher("anomaly/score", qos(10))?,
        // Latched, so a behaviour tree that subscribes late still gets the latest verdict.
        verdict: node.create_publisher("anomaly/verdict", qos(1).transient_local())?,
        markers: node.create_publisher("anomaly/markers", qos(10))?,
    };
    let images = ImagePublishers {
        heatmap: node.create_publisher("anomaly/heatmap", qos(2))?,
        overlay: node.create_publisher("anomaly/overlay", qos(2))?,
        map: node.create_publisher("anomaly/map", qos(2))?,
    };
    Ok((results, images))
}

/// What the inference thread knows of a frame besides its inspection.
pub struct FrameInfo<'a> {
    /// The input's header, copied into every output.
    pub header: &'a Header,
    /// When the frame arrived at the node.
    pub received: Instant,
    /// The model that inspected it.
    pub model_id: &'a str,
    /// Its method name.
    pub method: &'a str,
}

impl ResultPublishers {
    /// Publishes the result, score, verdict and (when `settings` say so) the region markers, in
    /// 3-D when `camera` and a surface plane are known; returns the result as published. A
    /// publisher that fails is logged to `logger` and the rest still go out.
    pub fn publish(
        &self,
        frame: &FrameInfo<'_>,
        inspection: &Inspection,
        camera: Option<&PinholeCamera>,
        settings: &Settings,
        logger: &str,
    ) -> AnomalyResult {
        let result = convert::result_msg(frame.header, inspection, frame.model_id, frame.method, frame.received.elapsed());
        if let Err(e) = self.result.publish(&result) {
            r2r::log_warn!(logger, "cannot publish result: {e}");
        }
        let _ = self.score.publish(&Float32 { data: inspection.score });
        let _ = self.verdict.publish(&Bool { data: inspection.is_anomalous });
        if settings.publish_markers {
            let _ = self.markers.publish(&region_markers(frame.header, &inspection.regions, camera, settings));
        }
        result
    }
}

/// What the image thread needs to draw one frame's map, heatmap and overlay.
struct ImageJob {
    header: Header,
    inspection: Inspection,
    frame: std::sync::Arc<RgbImage>,
}

/// The image thread: draws and publishes anomaly/map, anomaly/heatmap and anomaly/overlay for
/// the frames handed to it while the next frame is inspected.
pub struct ImageThread {
    jobs: SyncSender<ImageJob>,
    thread: JoinHandle<()>,
    /// Frames whose pictures were skipped because the thread was still busy.
    pub skipped: u64,
}

impl ImageThread {
    /// Starts the thread, which owns `publishers` until [`ImageThread::stop`].
    pub fn start(publishers: ImagePublishers) -> std::io::Result<Self> {
        let (jobs, queue) = sync_channel::<ImageJob>(1);
        let thread = std::thread::Builder::new().name("image_outputs".into()).spawn(move || {
            for job in queue {
                // Only what someone subscribes to is drawn (as image_pipeline's nodes do): at
                // 1280x1024 the three pictures took about 30 ms of the two cores, which the next
                // frame's inspection then waited for.
                let wanted = PictureSet {
                    map: has_subscribers(&publishers.map),
                    heatmap: has_subscribers(&publishers.heatmap),
                    overlay: has_subscribers(&publishers.overlay),
                };
                let pictures = job.inspection.pictures(&job.frame, wanted);
                if let Some(map) = pictures.map {
                    let _ = publishers.map.publish(&convert::map_to_image(&job.header, &map));
                }
                if let Some(heatmap) = pictures.heatmap {
                    let _ = publishers.heatmap.publish(&convert::rgb_to_image(&job.header, heatmap));
                }
                if let Some(overlay) = pictures.overlay {
                    let _ = publishers.overlay.publish(&convert::rgb_to_image(&job.header, overlay));
                }
            }
        })?;
        Ok(Self { jobs, thread, skipped: 0 })
    }

    /// Hands over one frame's pictures; when the thread is still busy with an earlier frame,
    /// this frame's pictures are skipped (and counted) rather than delay the next verdict.
    pub fn offer(&mut self, header: &Header, inspection: Inspection, frame: std::sync::Arc<RgbImage>) {
        if let Err(TrySendError::Full(_)) = self.jobs.try_send(ImageJob { header: header.clone(), inspection, frame }) {
            self.skipped += 1;
        }
    }

    /// Lets the thread finish its last job and stop; returns the number of skipped frames.
    pub fn stop(self) -> u64 {
        drop(self.jobs);
        let _ = self.thread.join();
        self.skipped
    }
}

/// Whether anyone (in this process or another) subscribes to `publisher`'s topic; when that
/// cannot be told, yes: a picture too many is better than one missing.
fn has_subscribers(publisher: &r2r::Publisher<Image>) -> bool {
    publisher.get_inter_process_subscription_count().map_or(true, |n| n > 0)
}

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
fn region_markers(header: &Header, regions: &[DefectRegion], camera: Option<&PinholeCamera>, settings: &Settings) -> MarkerArray {
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
