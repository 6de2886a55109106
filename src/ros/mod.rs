//! The ROS 2 interface (behind the `ros` cargo feature): parameters, topics, services, message
//! conversion. It talks to the core through [`crate::Inspector`] (and the teach-in entry
//! [`crate::training::teach`]) and knows nothing of tensors: no libtorch path appears in this
//! folder, and core items come from the crate's curated re-exports (tests/layering.rs keeps
//! both so).
//!
//! One file per job, each using only those above it in this list:
//! - [`lifecycle`]: the managed-node state machine (states, transitions, ids), pure
//! - [`params`]: parameters declared up front, parsed into [`params::Settings`]
//! - [`convert`]: sensor_msgs / anomaly_inspector_msgs <-> core types
//! - [`mailbox`]: the newest frame, its converted successor and the command queue; the
//!   conversion thread
//! - [`status`]: counters and latencies, the once-per-kind error log, /diagnostics
//! - [`publishing`]: the output publishers, markers, the 32FC1 map, the image thread
//! - [`labelling`]: the last frames inspected, by stamp, and `~/label`, which stores one with
//!   the operator's label for teach-in
//! - [`inference`]: the inference thread: commands, models, frames, teach-in
//! - [`input`]: the camera subscription; with `input_qos: auto`, reliability following the camera
//! - [`services`]: `~/inspect`, `~/teach`, `~/load_model`, `~/set_threshold`, `~/describe`
//! - [`actions`]: `~/inspect` and `~/teach` as actions (feedback, cancel)
//! - [`managed`]: the lifecycle services and `~/transition_event`, and each transition's work
//! - [`node`]: wiring, parameter events, the executor loop
//!
//! All names are relative, so `--ros-args -r __ns:=/cell1` and remapping work as usual:
//!
//! | name | type | QoS / notes |
//! |---|---|---|
//! | `image` (in) | sensor_msgs/Image | best effort, reliable once the camera is (`input_qos`) |
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
//! | `~/label` | anomaly_inspector_msgs/srv/Label | a recent frame (by stamp) as good or defective |
//! | `~/inspect` (action) | anomaly_inspector_msgs/action/Inspect | N frames, feedback per frame |
//! | `~/teach` (action) | anomaly_inspector_msgs/action/Teach | teach-in with feedback, cancellable |
//! | `~/describe` | std_srvs/Trigger | JSON: model, thresholds, training summary, parameters |
//! | `~/change_state`, `~/get_state`, ... | lifecycle_msgs/srv | managed node (`managed`) |
mod actions;
pub mod convert;
mod inference;
mod input;
mod labelling;
pub mod lifecycle;
mod mailbox;
mod managed;
pub mod node;
pub mod params;
mod publishing;
mod services;
mod status;

pub use node::run;

use std::sync::{LockResult, Mutex, MutexGuard};

/// A lock that a panicked holder does not make unusable. The node's shared state (status
/// counters, camera intrinsics, parameters, the mailbox) stays valid whatever a thread was doing
/// when it panicked, and the node must keep serving; so a poisoned lock is simply taken over.
trait LockOrRecover<T> {
    /// The guard, poisoned or not.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> LockOrRecover<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        recovered(self.lock())
    }
}

/// What a lock (or a condition variable's wait on it) hands back, poisoned or not.
fn recovered<G>(result: LockResult<G>) -> G {
    result.unwrap_or_else(|e| e.into_inner())
}
