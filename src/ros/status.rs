//! What the node knows about itself: counters and latencies of recent frames, the error log
//! that writes each kind of error once, and the /diagnostics message built from them.
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use r2r::diagnostic_msgs::msg::{DiagnosticArray, DiagnosticStatus, KeyValue};
use r2r::std_msgs::msg::Header;

use super::LockOrRecover as _;

/// What the node reports on /diagnostics and in service errors.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Model id, when one is loaded.
    pub model_id: Option<String>,
    /// Method of the loaded model.
    pub method: String,
    /// Device description.
    pub device: String,
    /// Frames inspected.
    pub inspected: u64,
    /// Frames refused (bad data, no model...).
    pub rejected: u64,
    /// Frames refused, by kind (the [`crate::FrameFault`] names, `no_model`, ...).
    pub rejected_by_kind: BTreeMap<&'static str, u64>,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Latencies (frame received -> result published) of recent frames, ms.
    pub recent_latency_ms: VecDeque<f64>,
    /// The node's own work in each of those latencies, ms: conversion, ROI, messages (the
    /// time the inference thread spent on the frame less [`crate::Inspection::elapsed`], plus the
    /// conversion), measured on the same frame so that a busy machine slows both sides alike.
    pub recent_overhead_ms: VecDeque<f64>,
    /// The rest of each latency, ms: waiting for the inference thread (an earlier frame's
    /// inspection) and for the conversion thread, i.e. queueing when frames come fast.
    pub recent_wait_ms: VecDeque<f64>,
    /// Times of recent inspections, for the rate.
    pub recent_times: VecDeque<Instant>,
}

impl Status {
    /// Counts one inspected frame with its latency split (ms).
    pub fn record(&mut self, latency_ms: f64, overhead_ms: f64, wait_ms: f64) {
        self.inspected += 1;
        let now = Instant::now();
        for (recent, value) in [
            (&mut self.recent_latency_ms, latency_ms),
            (&mut self.recent_overhead_ms, overhead_ms),
            (&mut self.recent_wait_ms, wait_ms),
        ] {
            recent.push_back(value);
            if recent.len() > 100 {
                recent.pop_front();
            }
        }
        self.recent_times.push_back(now);
        while self.recent_times.front().is_some_and(|t| now.duration_since(*t) > Duration::from_secs(5)) {
            self.recent_times.pop_front();
        }
    }

    /// Inspections per second over the last 5 s.
    pub fn rate_hz(&self) -> f64 {
        match (self.recent_times.front(), self.recent_times.back()) {
            (Some(a), Some(b)) if self.recent_times.len() > 1 && b > a => {
                (self.recent_times.len() - 1) as f64 / b.duration_since(*a).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// Logs the first error of each kind and counts the rest, so a camera sending a bad encoding at
/// 30 Hz does not flood the log.
pub struct ErrorLog {
    logger: String,
    seen: HashSet<&'static str>,
}

impl ErrorLog {
    /// An error log writing to `logger`.
    pub fn new(logger: &str) -> Self {
        Self { logger: logger.into(), seen: HashSet::new() }
    }

    /// Logs `message` if it is the first of its `kind`, and counts it in `status`.
    pub fn report(&mut self, status: &Mutex<Status>, kind: &'static str, message: String) {
        if self.seen.insert(kind) {
            r2r::log_error!(&self.logger, "{message} (frame dropped; further '{kind}' errors are counted, not logged)");
        }
        let mut st = status.locked();
        st.rejected += 1;
        *st.rejected_by_kind.entry(kind).or_default() += 1;
        st.last_error = Some(message);
    }
}

/// Median of `values` (0 when empty).
pub fn median(values: &VecDeque<f64>) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
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
    lifecycle: &str,
) -> DiagnosticArray {
    let lat = &status.recent_latency_ms;
    let mean = if lat.is_empty() { 0.0 } else { lat.iter().sum::<f64>() / lat.len() as f64 };
    let max = lat.iter().cloned().fold(0.0, f64::max);
    let rate = status.rate_hz();
    let (level, message) = match (&status.model_id, rate > 0.0, &status.last_error) {
        // Not inspecting on purpose: a lifecycle manager holds it there.
        _ if lifecycle != "active" => (OK, format!("{lifecycle} (lifecycle): not inspecting")),
        (None, _, _) => (ERROR, "no model loaded".to_string()),
        (Some(_), false, Some(e)) if received > status.inspected => (WARN, format!("frames rejected: {e}")),
        (Some(_), false, _) => (WARN, "no frames inspected in the last 5 s".to_string()),
        (Some(_), true, _) => (OK, format!("inspecting at {rate:.1} Hz")),
    };
    let kv = |k: &str, v: String| KeyValue { key: k.into(), value: v };
    let mut values = vec![
        kv("lifecycle_state", lifecycle.to_string()),
        kv("model", status.model_id.clone().unwrap_or_default()),
        kv("method", status.method.clone()),
        kv("device", status.device.clone()),
        kv("rate_hz", format!("{rate:.2}")),
        kv("latency_mean_ms", format!("{mean:.1}")),
        kv("latency_max_ms", format!("{max:.1}")),
        kv("node_overhead_median_ms", format!("{:.2}", median(&status.recent_overhead_ms))),
        kv("queue_wait_median_ms", format!("{:.2}", median(&status.recent_wait_ms))),
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
