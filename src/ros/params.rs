//! Node parameters, declared up front with descriptions (`ros2 param describe` shows them),
//! parsed once into [`Settings`] (enums and checked ranges) at the boundary.
use std::path::PathBuf;

use r2r::indexmap::IndexMap;
use r2r::{Parameter, ParameterValue, RosParams};

use crate::{DeviceChoice, Error, Plane, PostprocessConfig, Precision, Result, Roi};

/// Raw ROS parameters as the user sets them (`--ros-args -p`, a params file, or at run time).
///
/// Each field's doc comment is one line on purpose: r2r takes a field's first doc line as the
/// description that `ros2 param describe` and `--help` show.
#[derive(Clone, Debug, RosParams)]
pub struct NodeParams {
    /// Model directory (written by `anomaly_inspector fit` or the teach service). Changing it at run time loads the new model between two frames; on failure the old one stays.
    pub model: String,
    /// Directory where the teach service writes new models (empty = the current model's parent).
    pub model_root: String,
    /// Inference device: auto, cpu or cuda. Read at start-up.
    pub device: String,
    /// CPU threads libtorch uses for inference; 0 (the default) = the cores other processes leave free, at least one, re-read every second (more threads than free cores makes each frame several times slower). Read at start-up.
    pub inference_threads: i64,
    /// Number format on the CPU: auto (bfloat16 where the CPU multiplies it natively, about a quarter faster at the same AUROC; float32 elsewhere) or float32 (the same scores on every machine). Read at start-up.
    pub precision: String,
    /// Normalised image-score threshold for is_anomalous (0.5 = the model's calibrated threshold).
    pub threshold: f64,
    /// Defect regions smaller than this many pixels are not reported.
    pub min_region_area: i64,
    /// Input transport: raw (sensor_msgs/Image on `image`) or compressed (sensor_msgs/CompressedImage on `image/compressed`). Read at start-up.
    pub input_transport: String,
    /// Input QoS: auto (best effort, becoming reliable once every publisher on the input is reliable, so that large frames from a reliable camera are resent rather than lost), sensor_data (best effort, REP-2003) or reliable. Read at start-up.
    pub input_qos: String,
    /// Output QoS of results, images and markers: reliable (REP-2003 default for results) or best_effort (e.g. over a lossy wireless link). Read at start-up.
    pub output_qos: String,
    /// Region of interest [x, y, width, height] in input pixels; only this part of each frame is inspected (results stay in full-frame pixels). Empty or all zeros = the whole frame.
    pub roi: IntList,
    /// Publish the colour heatmap, overlay and 32FC1 anomaly map (turn off to save bandwidth).
    pub publish_images: bool,
    /// Publish defect regions as visualization_msgs/MarkerArray on anomaly/markers.
    pub publish_markers: bool,
    /// Distance (m) from the camera to the inspected surface, for 3-D markers; with camera_info received, regions are projected onto the plane z = working_distance. 0 = no projection.
    pub working_distance: f64,
    /// Surface plane [a, b, c, d] (a x + b y + c z = d, camera optical frame); overrides working_distance when set.
    pub surface_plane: FloatList,
    /// Marker scale (m per pixel) when no 3-D projection is available: regions are drawn on the image plane of the frame_id.
    pub marker_pixel_size: f64,
    /// Inspected frames the node keeps (newest first) so that ~/label can store one by its header stamp; 0 = labelling off. Memory: this many frames (30 RGB frames of 640x480: 28 MB; of 5 MP: 450 MB).
    pub label_buffer_frames: i64,
    /// Managed (lifecycle) start-up: true = start unconfigured and wait for a lifecycle manager (configure loads the model, activate starts inspecting); false = configure and activate at once. Read at start-up.
    pub managed: bool,
}

impl Default for NodeParams {
    fn default() -> Self {
        Self {
            model: crate::project_root().join("models/demo_patchcore").to_string_lossy().into_owned(),
            model_root: String::new(),
            device: "auto".into(),
            inference_threads: 0,
            precision: "auto".into(),
            threshold: 0.5,
            min_region_area: PostprocessConfig::default().min_region_area as i64,
            input_transport: "raw".into(),
            input_qos: "auto".into(),
            output_qos: "reliable".into(),
            roi: IntList::default(),
            publish_images: true,
            publish_markers: true,
            working_distance: 0.0,
            surface_plane: FloatList::default(),
            marker_pixel_size: 0.001,
            label_buffer_frames: DEFAULT_LABEL_BUFFER_FRAMES as i64,
            managed: false,
        }
    }
}

// r2r 0.9.7's RosParams derive has no array parameters ("TODO: Implement array parameters"
// in its source), so the two list types implement the trait by hand.
macro_rules! list_param {
    ($name:ident, $elem:ty, $variant:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct $name(pub Vec<$elem>);

        impl RosParams for $name {
            fn register_parameters(
                &mut self,
                prefix: &str,
                param: Option<Parameter>,
                params: &mut IndexMap<String, Parameter>,
            ) -> r2r::Result<()> {
                if let Some(cli) = params.shift_remove(prefix) {
                    self.set_parameter("", &cli.value)?;
                }
                let mut param = param.unwrap_or_else(|| Parameter::new(ParameterValue::NotSet));
                param.value = ParameterValue::$variant(self.0.clone());
                params.insert(prefix.to_owned(), param);
                Ok(())
            }

            fn get_parameter(&mut self, name: &str) -> r2r::Result<ParameterValue> {
                match name {
                    "" => Ok(ParameterValue::$variant(self.0.clone())),
                    _ => Err(r2r::Error::InvalidParameterName { name: name.to_owned() }),
                }
            }

            fn set_parameter(&mut self, name: &str, value: &ParameterValue) -> r2r::Result<()> {
                self.check_parameter(name, value)?;
                if let ParameterValue::$variant(v) = value {
                    self.0 = v.clone();
                }
                Ok(())
            }

            fn check_parameter(&self, name: &str, value: &ParameterValue) -> r2r::Result<()> {
                if !name.is_empty() {
                    return Err(r2r::Error::InvalidParameterName { name: name.to_owned() });
                }
                match value {
                    ParameterValue::$variant(_) => Ok(()),
                    _ => Err(r2r::Error::InvalidParameterType { name: String::new(), ty: stringify!($variant) }),
                }
            }
        }
    };
}
list_param!(IntList, i64, IntegerArray, "An integer-array parameter.");
list_param!(FloatList, f64, DoubleArray, "A double-array parameter.");

/// Frames kept for ~/label by default: enough for an operator to label the part just rejected
/// at a few frames per second.
pub const DEFAULT_LABEL_BUFFER_FRAMES: usize = 30;
/// The most frames ~/label may keep (memory: one frame each).
pub const MAX_LABEL_BUFFER_FRAMES: i64 = 1000;

/// Parameters read only at start-up. Changing them at run time is refused (as rclcpp does for
/// read-only parameters) rather than accepted and silently ignored.
pub const STARTUP_ONLY: [&str; 7] =
    ["device", "inference_threads", "precision", "input_transport", "input_qos", "output_qos", "managed"];

/// [`NodeParams`] as the parameter services see them: a new value is stored only when the whole
/// set still parses (and, for `model`, names a readable model), so the caller of
/// `set_parameters` gets the reason in its reply, the node logs it, and the old value stays.
#[derive(Clone, Debug, Default)]
pub struct CheckedParams {
    /// The values as set: what `get_parameters` answers.
    pub values: NodeParams,
    /// The values last put in force by the inference thread. A change is applied to these, not
    /// to `values`, which may already hold later changes whose events are still queued (and
    /// which may yet be refused); a refused change puts `values` back to these.
    pub in_force: NodeParams,
    /// Where refusals are logged (empty: not logged).
    pub logger: String,
}

impl std::ops::Deref for CheckedParams {
    type Target = NodeParams;
    fn deref(&self) -> &NodeParams {
        &self.values
    }
}

impl std::ops::DerefMut for CheckedParams {
    fn deref_mut(&mut self) -> &mut NodeParams {
        &mut self.values
    }
}

impl CheckedParams {
    /// Parameters logging their refusals to `logger`.
    pub fn new(values: NodeParams, logger: &str) -> Self {
        Self { in_force: values.clone(), values, logger: logger.into() }
    }

    /// Puts parameter `name` back to the value in force; returns it (for r2r's own copy and the
    /// log), `None` for an unknown name.
    pub fn revert(&mut self, name: &str) -> Option<ParameterValue> {
        let old = self.in_force.clone().get_parameter(name).ok()?;
        self.values.set_parameter(name, &old).ok()?;
        Some(old)
    }

    /// Why `name = value` is refused, if it is (the type is checked by r2r first).
    pub fn refusal(&self, name: &str, value: &ParameterValue) -> Option<String> {
        let mut candidate = self.values.clone();
        if let Err(e) = candidate.set_parameter(name, value) {
            return Some(e.to_string());
        }
        if let Err(e) = candidate.settings() {
            return Some(e.to_string());
        }
        let mut current = self.values.clone();
        let changed = current.get_parameter(name).ok().as_ref() != Some(value);
        if changed && STARTUP_ONLY.contains(&name) {
            return Some(format!("{name} is read at start-up only; restart the node to change it"));
        }
        // The cheap part of loading: a missing directory or a damaged or foreign model.json is
        // refused here, with the reason in the reply; damaged weights are found by the load.
        if name == "model" && changed {
            if let Err(e) = crate::Inspector::check_model_dir(std::path::Path::new(candidate.model.trim())) {
                return Some(e.to_string());
            }
        }
        None
    }

    /// The refusal as r2r's error (the set_parameters reply says "Parameter <name> conversion
    /// failed: refused: <why>"), logged.
    fn refuse(&self, name: &str, value: &ParameterValue) -> r2r::Result<()> {
        self.values.check_parameter(name, value)?;
        let Some(why) = self.refusal(name, value) else { return Ok(()) };
        if !self.logger.is_empty() {
            let old = self.values.clone().get_parameter(name).map(|v| format!("{v:?}")).unwrap_or_default();
            r2r::log_error!(&self.logger, "parameter {name} = {value:?} refused: {why}; it stays {old}");
        }
        Err(r2r::Error::ParameterValueConv { name: name.into(), msg: format!("refused: {why}") })
    }
}

impl RosParams for CheckedParams {
    fn register_parameters(
        &mut self,
        prefix: &str,
        param: Option<Parameter>,
        params: &mut IndexMap<String, Parameter>,
    ) -> r2r::Result<()> {
        // Start-up values (command line, params file) are checked as a whole by the node.
        self.values.register_parameters(prefix, param, params)
    }

    fn get_parameter(&mut self, name: &str) -> r2r::Result<ParameterValue> {
        self.values.get_parameter(name)
    }

    fn set_parameter(&mut self, name: &str, value: &ParameterValue) -> r2r::Result<()> {
        self.refuse(name, value)?;
        self.values.set_parameter(name, value)
    }

    fn check_parameter(&self, name: &str, value: &ParameterValue) -> r2r::Result<()> {
        self.refuse(name, value)
    }
}

/// How frames arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputTransport {
    /// sensor_msgs/Image on `image`.
    Raw,
    /// sensor_msgs/CompressedImage (jpeg, png) on `image/compressed`.
    Compressed,
}

/// Input QoS choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputQos {
    /// Best effort until every publisher on the input is reliable, then reliable (src/ros/input.rs).
    Auto,
    /// Best effort, shallow queue (REP-2003 sensor data).
    SensorData,
    /// Reliable, shallow queue.
    Reliable,
}

/// Parameters parsed and checked: what the node actually uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Model directory.
    pub model: PathBuf,
    /// Where taught models go.
    pub model_root: PathBuf,
    /// Inference device.
    pub device: DeviceChoice,
    /// libtorch CPU threads (None = the cores other processes leave free: [`crate::ThreadGovernor`]).
    pub inference_threads: Option<usize>,
    /// Number format on the CPU.
    pub precision: Precision,
    /// Normalised threshold.
    pub threshold: f32,
    /// Post-processing.
    pub postprocess: PostprocessConfig,
    /// Input transport.
    pub input_transport: InputTransport,
    /// Input QoS.
    pub input_qos: InputQos,
    /// Whether outputs are published reliably (else best effort).
    pub output_reliable: bool,
    /// Region of interest (None = whole frame).
    pub roi: Option<Roi>,
    /// Whether heatmap/overlay/map images are published.
    pub publish_images: bool,
    /// Whether markers are published.
    pub publish_markers: bool,
    /// Surface plane for 3-D markers, if configured.
    pub surface_plane: Option<Plane>,
    /// Metres per pixel for image-plane markers.
    pub marker_pixel_size: f64,
    /// Inspected frames kept for ~/label (0 = labelling off).
    pub label_buffer_frames: usize,
    /// Start unconfigured and wait for a lifecycle manager.
    pub managed: bool,
}

impl NodeParams {
    /// Parses and range-checks every value (parse at the boundary).
    pub fn settings(&self) -> Result<Settings> {
        let device: DeviceChoice = self.device.parse()?;
        let precision: Precision = self.precision.parse()?;
        let inference_threads = match self.inference_threads {
            0 => None,
            n @ 1..=1024 => Some(n as usize),
            n => {
                return Err(Error::Config(format!(
                    "inference_threads {n}: use 1..=1024, or 0 for the cores other processes leave free"
                )))
            }
        };
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::Config(format!("threshold {}: must be within 0..=1", self.threshold)));
        }
        if self.min_region_area < 0 || self.min_region_area > u32::MAX as i64 {
            return Err(Error::Config(format!("min_region_area {}: must be >= 0", self.min_region_area)));
        }
        if self.model.trim().is_empty() {
            return Err(Error::Config("model is empty: set it to a model directory".into()));
        }
        let input_transport = match self.input_transport.as_str() {
            "raw" => InputTransport::Raw,
            "compressed" => InputTransport::Compressed,
            other => return Err(Error::Config(format!("input_transport '{other}': use raw or compressed"))),
        };
        let input_qos = match self.input_qos.as_str() {
            "auto" => InputQos::Auto,
            "sensor_data" => InputQos::SensorData,
            "reliable" => InputQos::Reliable,
            other => return Err(Error::Config(format!("input_qos '{other}': use auto, sensor_data or reliable"))),
        };
        let output_reliable = match self.output_qos.as_str() {
            "reliable" => true,
            "best_effort" => false,
            other => return Err(Error::Config(format!("output_qos '{other}': use reliable or best_effort"))),
        };
        let roi = match self.roi.0.as_slice() {
            [] => None,
            r if r.iter().all(|&v| v == 0) => None,
            &[x, y, w, h] if x >= 0 && y >= 0 && w > 0 && h > 0 && [x, y, w, h].iter().all(|&v| v <= u32::MAX as i64) => {
                Some(Roi { x: x as u32, y: y as u32, width: w as u32, height: h as u32 })
            }
            other => return Err(Error::Config(format!("roi {other:?}: use [x, y, width, height] with width, height > 0"))),
        };
        let surface_plane = match (self.surface_plane.0.as_slice(), self.working_distance) {
            (&[a, b, c, d], _) => Some(Plane::new([a, b, c, d])?),
            ([], 0.0) => None,
            ([], w) if w > 0.0 && w.is_finite() => Some(Plane::at_distance(w)?),
            ([], w) => return Err(Error::Config(format!("working_distance {w}: must be > 0 (or 0 for none)"))),
            (other, _) => return Err(Error::Config(format!("surface_plane {other:?}: use [a, b, c, d]"))),
        };
        if !(self.marker_pixel_size > 0.0 && self.marker_pixel_size.is_finite()) {
            return Err(Error::Config(format!("marker_pixel_size {}: must be > 0", self.marker_pixel_size)));
        }
        if !(0..=MAX_LABEL_BUFFER_FRAMES).contains(&self.label_buffer_frames) {
            return Err(Error::Config(format!(
                "label_buffer_frames {}: use 0..={MAX_LABEL_BUFFER_FRAMES} (0 = labelling off)",
                self.label_buffer_frames
            )));
        }
        let model: PathBuf = self.model.clone().into();
        let model_root = if self.model_root.trim().is_empty() {
            model.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| PathBuf::from("."))
        } else {
            self.model_root.clone().into()
        };
        Ok(Settings {
            model,
            model_root,
            device,
            inference_threads,
            precision,
            threshold: self.threshold as f32,
            postprocess: PostprocessConfig { min_region_area: self.min_region_area as u32 },
            input_transport,
            input_qos,
            output_reliable,
            roi,
            publish_images: self.publish_images,
            publish_markers: self.publish_markers,
            surface_plane,
            marker_pixel_size: self.marker_pixel_size,
            label_buffer_frames: self.label_buffer_frames as usize,
            managed: self.managed,
        })
    }
}

/// `value` as rcl_interfaces/ParameterValue, for /parameter_events (r2r keeps its own
/// conversion private, and publishes no events itself).
pub fn value_msg(value: &ParameterValue) -> r2r::rcl_interfaces::msg::ParameterValue {
    let mut m = r2r::rcl_interfaces::msg::ParameterValue::default();
    // The PARAMETER_* type constants of rcl_interfaces/ParameterType.
    match value.clone() {
        ParameterValue::NotSet => m.type_ = 0,
        ParameterValue::Bool(b) => (m.type_, m.bool_value) = (1, b),
        ParameterValue::Integer(i) => (m.type_, m.integer_value) = (2, i),
        ParameterValue::Double(d) => (m.type_, m.double_value) = (3, d),
        ParameterValue::String(s) => (m.type_, m.string_value) = (4, s),
        ParameterValue::ByteArray(v) => (m.type_, m.byte_array_value) = (5, v),
        ParameterValue::BoolArray(v) => (m.type_, m.bool_array_value) = (6, v),
        ParameterValue::IntegerArray(v) => (m.type_, m.integer_array_value) = (7, v),
        ParameterValue::DoubleArray(v) => (m.type_, m.double_array_value) = (8, v),
        ParameterValue::StringArray(v) => (m.type_, m.string_array_value) = (9, v),
    }
    m
}

/// A /parameter_events message from `node` (its fully qualified name): `new` parameters
/// declared, `changed` ones set, as rclcpp and rclpy announce them.
pub fn parameter_event(
    node: &str,
    stamp: r2r::builtin_interfaces::msg::Time,
    new: &[(String, ParameterValue)],
    changed: &[(String, ParameterValue)],
) -> r2r::rcl_interfaces::msg::ParameterEvent {
    let msgs = |list: &[(String, ParameterValue)]| {
        list.iter().map(|(name, v)| r2r::rcl_interfaces::msg::Parameter { name: name.clone(), value: value_msg(v) }).collect()
    };
    r2r::rcl_interfaces::msg::ParameterEvent {
        stamp,
        node: node.to_string(),
        new_parameters: msgs(new),
        changed_parameters: msgs(changed),
        deleted_parameters: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_refused() {
        let p = NodeParams::default();
        let s = p.settings().unwrap();
        assert_eq!(s.device, DeviceChoice::Auto);
        assert_eq!(s.threshold, 0.5);
        assert_eq!(s.roi, None);
        assert_eq!(s.surface_plane, None);
        assert_eq!(s.input_transport, InputTransport::Raw);
        assert_eq!(s.model_root, crate::project_root().join("models"));
        assert!(NodeParams { threshold: 1.5, ..p.clone() }.settings().is_err());
        assert!(NodeParams { device: "tpu".into(), ..p.clone() }.settings().is_err());
        assert!(NodeParams { min_region_area: -1, ..p.clone() }.settings().is_err());
        assert!(NodeParams { model: " ".into(), ..p.clone() }.settings().is_err());
        assert!(NodeParams { input_transport: "theora".into(), ..p.clone() }.settings().is_err());
        assert!(s.output_reliable);
        assert!(!NodeParams { output_qos: "best_effort".into(), ..p.clone() }.settings().unwrap().output_reliable);
        assert!(NodeParams { output_qos: "sometimes".into(), ..p.clone() }.settings().is_err());
        assert!(NodeParams { roi: IntList(vec![0, 0, 10]), ..p.clone() }.settings().is_err());
        assert!(NodeParams { roi: IntList(vec![0, 0, 0, 10]), ..p.clone() }.settings().is_err());
        assert!(NodeParams { working_distance: -0.3, ..p.clone() }.settings().is_err());
        assert!(NodeParams { marker_pixel_size: 0.0, ..p.clone() }.settings().is_err());
        assert_eq!(s.inference_threads, None);
        assert_eq!(NodeParams { inference_threads: 3, ..p.clone() }.settings().unwrap().inference_threads, Some(3));
        assert!(NodeParams { inference_threads: -1, ..p.clone() }.settings().is_err());
        assert_eq!(s.precision, Precision::Auto);
        assert_eq!(NodeParams { precision: "float32".into(), ..p.clone() }.settings().unwrap().precision, Precision::Float32);
        assert!(NodeParams { precision: "int4".into(), ..p.clone() }.settings().is_err());
    }

    #[test]
    fn checked_params_refuse_with_a_reason_and_keep_the_old_value() {
        let mut p = CheckedParams::default();
        let err = p.set_parameter("threshold", &ParameterValue::Double(-0.5)).unwrap_err().to_string();
        assert!(err.contains("threshold -0.5: must be within 0..=1"), "{err}");
        assert_eq!(p.threshold, 0.5);
        // Twice: r2r calls set_parameter again even when its own copy says "unchanged".
        assert!(p.set_parameter("threshold", &ParameterValue::Double(-0.5)).is_err());
        assert_eq!(p.threshold, 0.5);
        assert!(p.set_parameter("threshold", &ParameterValue::String("high".into())).is_err());
        let err = p.set_parameter("input_qos", &ParameterValue::String("bogus".into())).unwrap_err().to_string();
        assert!(err.contains("use auto, sensor_data or reliable"), "{err}");
        let err = p.set_parameter("input_qos", &ParameterValue::String("reliable".into())).unwrap_err().to_string();
        assert!(err.contains("start-up only"), "{err}");
        let err = p.set_parameter("inference_threads", &ParameterValue::Integer(1)).unwrap_err().to_string();
        assert!(err.contains("start-up only"), "{err}");
        // The value in force may be set again (a params file applied twice).
        p.set_parameter("input_qos", &ParameterValue::String("auto".into())).unwrap();
        assert!(p.set_parameter("roi", &ParameterValue::IntegerArray(vec![0, 0, -5, 10])).is_err());
        assert_eq!(p.roi, IntList::default());
        let err = p.set_parameter("model", &ParameterValue::String("/nonexistent/model".into())).unwrap_err().to_string();
        assert!(err.contains("no such model directory"), "{err}");
        p.set_parameter("threshold", &ParameterValue::Double(0.7)).unwrap();
        p.set_parameter("roi", &ParameterValue::IntegerArray(vec![1, 2, 3, 4])).unwrap();
        assert_eq!((p.threshold, p.settings().unwrap().roi.map(|r| r.width)), (0.7, Some(3)));
    }

    #[test]
    fn parameter_values_become_rcl_messages_of_their_type() {
        let m = value_msg(&ParameterValue::Double(0.6));
        assert_eq!((m.type_, m.double_value), (3, 0.6));
        let m = value_msg(&ParameterValue::IntegerArray(vec![1, 2]));
        assert_eq!((m.type_, m.integer_array_value), (7, vec![1, 2]));
        assert_eq!((value_msg(&ParameterValue::Bool(true)).type_, value_msg(&ParameterValue::String("a".into())).type_), (1, 4));
        let e = parameter_event("/ns/n", Default::default(), &[], &[("threshold".into(), ParameterValue::Double(0.7))]);
        assert_eq!((e.node.as_str(), e.new_parameters.len(), e.changed_parameters[0].name.as_str()), ("/ns/n", 0, "threshold"));
    }

    #[test]
    fn every_parameter_has_a_whole_description() {
        // r2r takes only a field's first doc line: a description cut at a line break would end
        // mid-sentence in `ros2 param describe` and `--help`.
        let mut declared = IndexMap::new();
        NodeParams::default().register_parameters("", None, &mut declared).unwrap();
        assert_eq!(declared.len(), 18);
        for (name, p) in &declared {
            let d = p.description.trim();
            assert!(d.len() > 20 && (d.ends_with('.') || d.ends_with(')')), "{name}: '{d}'");
        }
    }

    #[test]
    fn label_buffer_frames_is_range_checked() {
        assert_eq!(NodeParams::default().settings().unwrap().label_buffer_frames, DEFAULT_LABEL_BUFFER_FRAMES);
        let off = NodeParams { label_buffer_frames: 0, ..NodeParams::default() };
        assert_eq!(off.settings().unwrap().label_buffer_frames, 0);
        for bad in [-1, MAX_LABEL_BUFFER_FRAMES + 1] {
            let p = NodeParams { label_buffer_frames: bad, ..NodeParams::default() };
            assert!(p.settings().unwrap_err().to_string().contains("label_buffer_frames"), "{bad} accepted");
        }
    }

    #[test]
    fn roi_and_plane_are_parsed() {
        let p = NodeParams { roi: IntList(vec![10, 20, 300, 200]), working_distance: 0.5, ..NodeParams::default() };
        let s = p.settings().unwrap();
        assert_eq!(s.roi, Some(Roi { x: 10, y: 20, width: 300, height: 200 }));
        assert_eq!(s.surface_plane, Some(Plane::at_distance(0.5).unwrap()));
        let p = NodeParams { surface_plane: FloatList(vec![0.0, 0.0, 2.0, 1.0]), ..p };
        assert_eq!(p.settings().unwrap().surface_plane, Some(Plane::at_distance(0.5).unwrap()));
        let p = NodeParams { roi: IntList(vec![0, 0, 0, 0]), ..NodeParams::default() };
        assert_eq!(p.settings().unwrap().roi, None);
    }
}
