//! The ROS 2 interface (behind the `ros` cargo feature): parameters, topics, message
//! conversion. It talks to the core through [`crate::Inspector`] and knows nothing of tensors.
//!
//! Topics (relative names, so `--ros-args -r __ns:=/cell1` and remapping work as usual):
//!
//! | topic | type | QoS |
//! |---|---|---|
//! | `image` (in) | sensor_msgs/Image | sensor data (best effort, depth 1) |
//! | `anomaly/result` | anomaly_inspector_msgs/AnomalyResult | reliable, depth 10 |
//! | `anomaly/score` | std_msgs/Float32 | reliable, depth 10 |
//! | `anomaly/heatmap` | sensor_msgs/Image (rgb8, turbo) | reliable, depth 2 |
//! | `anomaly/overlay` | sensor_msgs/Image (rgb8) | reliable, depth 2 |
pub mod convert;
pub mod node;
pub mod params;

pub use node::run;
