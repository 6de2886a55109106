//! `~/label`: the operator marks a frame the node inspected recently as good or defective
//! (with where the defect is, when drawn). The inference thread keeps the last
//! `label_buffer_frames` frames by header stamp ([`RecentFrames`]); the service finds the one
//! asked for and stores it, as the model saw it (the roi), in the label store under
//! `<model_root>/labels/` ([`crate::LabelStore`]), from which `~/teach` learns.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use image::{GrayImage, RgbImage};
use r2r::anomaly_inspector_msgs::srv::Label;
use r2r::builtin_interfaces::msg::Time;
use r2r::QosProfile;

use super::convert::image_to_rgb;
use super::inference::Shared;
use super::params::CheckedParams;
use super::LockOrRecover as _;
use crate::{DefectArea, LabelCounts, LabelStore, Roi, StoredLabel, Verdict};

/// A frame's header stamp, the key the operator labels it by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    sec: i32,
    nanosec: u32,
}

impl Stamp {
    /// The stamp of a header.
    pub fn of(t: &Time) -> Self {
        Self { sec: t.sec, nanosec: t.nanosec }
    }

    /// The label's file name: sortable by time, unique per stamp.
    fn file_stem(self) -> String {
        format!("stamp_{}_{:09}", self.sec, self.nanosec)
    }
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:09}", self.sec, self.nanosec)
    }
}

/// One inspected frame, whole (shared with the image thread, not copied), and the roi the model
/// inspected in it.
#[derive(Clone)]
pub struct RecentFrame {
    /// Its header stamp.
    pub stamp: Stamp,
    /// The whole frame as RGB.
    pub frame: Arc<RgbImage>,
    /// The part the model inspected (None: all of it).
    pub roi: Option<Roi>,
}

/// The last frames the node inspected, newest last.
#[derive(Default)]
pub struct RecentFrames {
    frames: VecDeque<RecentFrame>,
}

impl RecentFrames {
    /// Keeps `frame`, dropping the oldest beyond `capacity` (0 keeps none).
    pub fn keep(&mut self, capacity: usize, frame: RecentFrame) {
        if capacity > 0 {
            self.frames.push_back(frame);
        }
        while self.frames.len() > capacity {
            self.frames.pop_front();
        }
    }

    /// The frame with `stamp` (the newest when stamps repeat), or why there is none.
    pub fn find(&self, stamp: Stamp, capacity: usize) -> Result<RecentFrame, String> {
        if let Some(f) = self.frames.iter().rev().find(|f| f.stamp == stamp) {
            return Ok(f.clone());
        }
        Err(match (self.frames.front(), self.frames.back()) {
            _ if capacity == 0 => "labelling is off (parameter label_buffer_frames is 0)".into(),
            (Some(first), Some(last)) => format!(
                "no inspected frame has stamp {stamp}: the node keeps the last {} ({} .. {}; parameter \
                 label_buffer_frames = {capacity}); label a stamp from a recent AnomalyResult",
                self.frames.len(),
                first.stamp,
                last.stamp
            ),
            _ => "no frame inspected yet: label a frame after its AnomalyResult was published".into(),
        })
    }
}

// anomaly_inspector_msgs/srv/Label constants (r2r generates them as bindgen types, not u8).
const GOOD: u8 = 1;
const DEFECTIVE: u8 = 2;

/// A `~/label` request, parsed at the boundary.
#[derive(Debug)]
struct LabelRequest {
    stamp: Stamp,
    /// None: good; Some(type): defective.
    defect_type: Option<String>,
    area: Option<DefectArea>,
}

fn parse_request(req: &Label::Request) -> Result<LabelRequest, String> {
    let has_box = req.box_.width > 0 || req.box_.height > 0 || req.box_.x_offset > 0 || req.box_.y_offset > 0;
    let has_polygon = !req.polygon.points.is_empty();
    let has_mask = req.mask.width > 0 || req.mask.height > 0 || !req.mask.data.is_empty();
    if [has_box, has_polygon, has_mask].iter().filter(|&&b| b).count() > 1 {
        return Err("send at most one of box, polygon and mask".into());
    }
    let area = if has_box {
        let b = &req.box_;
        Some(DefectArea::Box(Roi { x: b.x_offset, y: b.y_offset, width: b.width, height: b.height }))
    } else if has_polygon {
        Some(DefectArea::Polygon(req.polygon.points.iter().map(|p| [p.x, p.y]).collect()))
    } else if has_mask {
        let rgb = image_to_rgb(&req.mask).map_err(|e| format!("mask: {e}"))?;
        let gray = GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| image::Luma([rgb.get_pixel(x, y).0[0]]));
        Some(DefectArea::Mask(gray))
    } else {
        None
    };
    let defect_type = match req.label {
        GOOD if area.is_some() => {
            return Err("a good frame has no defect area: send label DEFECTIVE (2) with a box, polygon or mask".into())
        }
        GOOD if !req.defect_type.trim().is_empty() => {
            return Err(format!("a good frame has no defect type (got '{}')", req.defect_type))
        }
        GOOD => None,
        DEFECTIVE => Some(match req.defect_type.trim() {
            "" => crate::DEFAULT_DEFECT_TYPE.to_string(),
            t => t.to_string(),
        }),
        other => return Err(format!("label {other}: use GOOD (1) or DEFECTIVE (2)")),
    };
    Ok(LabelRequest { stamp: Stamp::of(&req.stamp), defect_type, area })
}

/// Stores `frame` with the parsed label: the part the model saw, the area cut to it.
fn store_label(frame: &RecentFrame, req: LabelRequest, store: &LabelStore) -> crate::Result<(StoredLabel, LabelCounts)> {
    let (w, h) = frame.frame.dimensions();
    let verdict = match req.defect_type {
        None => Verdict::Good,
        Some(defect_type) => {
            let mask = match &req.area {
                Some(area) => Some(area.to_mask_within(w, h, frame.roi)?),
                None => None,
            };
            Verdict::Defective { defect_type, mask }
        }
    };
    let stored = match frame.roi {
        Some(roi) => store.add(&req.stamp.file_stem(), &roi.crop(&frame.frame)?, &verdict)?,
        None => store.add(&req.stamp.file_stem(), &frame.frame, &verdict)?,
    };
    Ok((stored, store.counts()?))
}

/// Creates `~/label` and answers it on `rt`; files are written on a blocking thread.
pub fn spawn_label_service(
    node: &mut r2r::Node,
    rt: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    params: &Arc<Mutex<CheckedParams>>,
    logger: &str,
) -> anyhow::Result<()> {
    let mut service = node.create_service::<Label::Service>("~/label", QosProfile::services_default())?;
    let (shared, params, logger) = (shared.clone(), params.clone(), logger.to_string());
    rt.spawn(async move {
        while let Some(req) = service.next().await {
            let settings = params.locked().in_force.settings();
            let (shared, logger) = (shared.clone(), logger.clone());
            tokio::spawn(async move {
                let answer = match settings {
                    Err(e) => Err(format!("the parameters in force do not parse: {e}")),
                    Ok(settings) => {
                        let found = parse_request(&req.message).and_then(|parsed| {
                            let frame = shared.recent.locked().find(parsed.stamp, settings.label_buffer_frames)?;
                            Ok((parsed, frame))
                        });
                        match found {
                            Err(e) => Err(e),
                            Ok((parsed, frame)) => {
                                let store = LabelStore::new(&settings.model_root.join("labels"));
                                let defective = parsed.defect_type.is_some();
                                let stamp = parsed.stamp;
                                let written = tokio::task::spawn_blocking(move || store_label(&frame, parsed, &store)).await;
                                match written {
                                    Ok(Ok(stored)) => Ok((stored, defective, stamp)),
                                    Ok(Err(e)) => Err(e.to_string()),
                                    Err(e) => Err(format!("storing the label failed: {e}")),
                                }
                            }
                        }
                    }
                };
                let method = shared.status.locked().method.clone();
                let response = match answer {
                    Ok(((stored, counts), defective, stamp)) => {
                        let mut message = format!("frame {stamp} labelled");
                        if let Some(old) = &stored.replaced {
                            message.push_str(&format!(" (replaces its earlier label: {old})"));
                        }
                        if defective && method != "supersimplenet" {
                            message.push_str(&format!(
                                "; the model in force ({method}) learns from good frames only: ~/teach with method \
                                 supersimplenet learns from defective labels"
                            ));
                        }
                        r2r::log_info!(&logger, "~/label: {message} -> {}", stored.image.display());
                        Label::Response {
                            success: true,
                            message,
                            path: stored.image.to_string_lossy().into_owned(),
                            good: counts.good as u32,
                            defective: counts.defective as u32,
                            defective_with_region: counts.defective_with_mask as u32,
                        }
                    }
                    Err(message) => {
                        r2r::log_error!(&logger, "~/label refused: {message}");
                        Label::Response { success: false, message, ..Default::default() }
                    }
                };
                let _ = req.respond(response);
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recent(sec: i32) -> RecentFrame {
        RecentFrame { stamp: Stamp { sec, nanosec: 5 }, frame: Arc::new(RgbImage::new(4, 4)), roi: None }
    }

    #[test]
    fn recent_frames_keep_the_newest_and_say_what_they_hold() {
        let mut r = RecentFrames::default();
        let err = r.find(Stamp { sec: 1, nanosec: 5 }, 3).err().unwrap();
        assert!(err.contains("no frame inspected yet"), "{err}");
        for s in 1..=5 {
            r.keep(3, recent(s));
        }
        assert!(r.find(Stamp { sec: 5, nanosec: 5 }, 3).is_ok());
        assert!(r.find(Stamp { sec: 3, nanosec: 5 }, 3).is_ok());
        let err = r.find(Stamp { sec: 2, nanosec: 5 }, 3).err().unwrap();
        assert!(err.contains("last 3 (3.000000005 .. 5.000000005") && err.contains("label_buffer_frames = 3"), "{err}");
        // Shrinking to 0 keeps nothing and says labelling is off.
        r.keep(0, recent(6));
        assert!(r.find(Stamp { sec: 6, nanosec: 5 }, 0).err().unwrap().contains("labelling is off"));
    }

    fn request(label: u8) -> Label::Request {
        Label::Request { label, stamp: Time { sec: 7, nanosec: 1 }, ..Default::default() }
    }

    #[test]
    fn the_label_constants_are_the_messages() {
        assert_eq!((GOOD, DEFECTIVE), (Label::Request::GOOD as u8, Label::Request::DEFECTIVE as u8));
    }

    #[test]
    fn requests_are_parsed_at_the_boundary() {
        let good = parse_request(&request(GOOD)).unwrap();
        assert_eq!((good.stamp, good.defect_type, good.area), (Stamp { sec: 7, nanosec: 1 }, None, None));
        let weak = parse_request(&request(DEFECTIVE)).unwrap();
        assert_eq!(weak.defect_type.as_deref(), Some("defective"));
        assert!(weak.area.is_none());
        assert!(parse_request(&request(0)).unwrap_err().contains("use GOOD (1) or DEFECTIVE (2)"));

        let mut boxed = request(DEFECTIVE);
        boxed.defect_type = "scratch".into();
        boxed.box_.width = 3;
        boxed.box_.height = 2;
        let b = parse_request(&boxed).unwrap();
        assert_eq!(b.defect_type.as_deref(), Some("scratch"));
        assert_eq!(b.area, Some(DefectArea::Box(Roi { x: 0, y: 0, width: 3, height: 2 })));

        let mut both = boxed.clone();
        both.polygon.points.push(r2r::geometry_msgs::msg::Point32 { x: 1.0, y: 1.0, z: 0.0 });
        assert!(parse_request(&both).unwrap_err().contains("at most one"));
        let mut good_with_box = boxed.clone();
        good_with_box.label = GOOD;
        good_with_box.defect_type.clear();
        assert!(parse_request(&good_with_box).unwrap_err().contains("no defect area"));

        let mut bad_mask = request(DEFECTIVE);
        bad_mask.mask.width = 4;
        bad_mask.mask.height = 4;
        bad_mask.mask.encoding = "mono8".into();
        bad_mask.mask.step = 4;
        bad_mask.mask.data = vec![0; 7];
        assert!(parse_request(&bad_mask).unwrap_err().starts_with("mask: "), "truncated mask data accepted");
    }

    #[test]
    fn a_label_stores_what_the_model_saw() {
        let dir = tempfile::tempdir().unwrap();
        let store = LabelStore::new(dir.path());
        let mut frame = recent(9);
        frame.frame = Arc::new(RgbImage::from_fn(8, 6, |x, _| image::Rgb([x as u8, 0, 0])));
        frame.roi = Some(Roi { x: 4, y: 0, width: 4, height: 6 });
        let req = LabelRequest {
            stamp: frame.stamp,
            defect_type: Some("dent".into()),
            area: Some(DefectArea::Box(Roi { x: 5, y: 1, width: 2, height: 2 })),
        };
        let (stored, counts) = store_label(&frame, req, &store).unwrap();
        assert_eq!((counts.defective, counts.defective_with_mask), (1, 1));
        let image = image::open(&stored.image).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (4, 6));
        assert_eq!(image.get_pixel(0, 0).0[0], 4, "the roi's first column");
        let mask = image::open(stored.mask.unwrap()).unwrap().to_luma8();
        assert_eq!(mask.get_pixel(1, 1).0[0], 255);
        assert_eq!(mask.get_pixel(0, 1).0[0], 0);
        // A box outside the roi is refused, and nothing is stored.
        let outside = LabelRequest {
            stamp: Stamp { sec: 10, nanosec: 0 },
            defect_type: Some("dent".into()),
            area: Some(DefectArea::Box(Roi { x: 0, y: 0, width: 2, height: 2 })),
        };
        assert!(store_label(&frame, outside, &store).unwrap_err().to_string().contains("outside the roi"));
        assert_eq!(store.counts().unwrap().defective, 1);
    }
}
