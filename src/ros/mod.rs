//! The ROS 2 interface (behind the `ros` cargo feature): parameters, topics, services, message
//! conversion. It talks to the core through [`crate::Inspector`] and knows nothing of tensors.
//!
//! All names are relative, so `--ros-args -r __ns:=/cell1` and remapping work as usual:
//!
//! | name | type | QoS / notes |
//! |---|---|---|
//! | `image` (in) | sensor_msgs/Image | sensor data (overridable: `input_qos`) |
//! | `image/compressed` (in) | sensor_msgs/CompressedImage | with `input_transport: compressed` |
//! | `camera_info` (in) | sensor_msgs/CameraInfo | optional, for 3-D markers |
//! | `anomaly/result` | anomaly_inspector_msgs/AnomalyResult | reliable, depth 10 |
//! | `anomaly/score` | std_msgs/Float32 | reliable |
//! | `anomaly/verdict` | std_msgs/Bool | reliable, transient local (latched) |
//! | `anomaly/map` | sensor_msgs/Image 32FC1 | normalised scores |
//! | `anomaly/heatmap`, `anomaly/overlay` | sensor_msgs/Image rgb8 | for people in RViz |
//! | `anomaly/markers` | visualization_msgs/MarkerArray | boxes, centroids, labels |
//! | `/diagnostics` | diagnostic_msgs/DiagnosticArray | 1 Hz |
//! | `~/inspect`, `~/teach`, `~/load_model`, `~/set_threshold` | anomaly_inspector_msgs/srv | services |
pub mod convert;
pub mod node;
pub mod outputs;
pub mod params;
pub mod worker;

pub use node::run;
