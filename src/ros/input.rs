//! The camera input: the subscription on `image` (or `image/compressed`) that feeds the
//! mailbox, and with `input_qos: auto` its reliability following the camera's publishers.
//!
//! Why follow them: a frame over 512 KB travels between processes as UDP fragments unless the
//! publisher's Fast DDS shared-memory segment holds it, and a best-effort reader loses the
//! frames whose fragments it misses (measured: 12 of 30 frames of 640x480 rgb8, none above
//! 1 MP). A reliable camera (image_transport's default) resends them to a reliable reader. A
//! best-effort camera matches only a best-effort reader. So `auto` starts best effort, which
//! matches every camera, and becomes reliable once every publisher on the topic is reliable.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use r2r::qos::ReliabilityPolicy;
use r2r::sensor_msgs::msg::{CompressedImage, Image};
use r2r::QosProfile;

use super::convert::Frame;
use super::inference::Shared;
use super::params::{InputQos, InputTransport};
use super::LockOrRecover as _;

/// How often the publishers' QoS is read again.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long the old subscription keeps reading after `auto` subscribes again: a frame already
/// on its way to the old reader (sent before the new one matched) still arrives.
const OVERLAP: Duration = Duration::from_secs(2);

/// While an old and a new subscription both read, a frame may come through both: the second
/// copy (the same stamp as the frame just before it) is dropped. Only then: a camera that
/// stamps every frame alike (some set zero) loses nothing otherwise.
#[derive(Default)]
struct Overlap {
    active: AtomicBool,
    last_stamp: Mutex<Option<(i32, u32)>>,
}

impl Overlap {
    /// Whether a frame with `stamp` is new (not the other reader's copy of the one before).
    fn admit(&self, stamp: (i32, u32)) -> bool {
        let mut last = self.last_stamp.locked();
        let copy = self.active.load(Ordering::Relaxed) && *last == Some(stamp);
        *last = Some(stamp);
        !copy
    }
}

/// The subscription and what it is following.
pub struct CameraInput {
    transport: InputTransport,
    mode: InputQos,
    reliable: bool,
    /// The input's name after namespace and remapping (auto only; `None`: not found).
    resolved: Option<String>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The previous subscription's task, reading on until the given time (auto's switch).
    retiring: Option<(tokio::task::JoinHandle<()>, Instant)>,
    overlap: Arc<Overlap>,
    next_check: Instant,
    logger: String,
}

/// The subscription's QoS: newest frame only.
fn input_qos(reliable: bool) -> QosProfile {
    if reliable {
        QosProfile::default().keep_last(1)
    } else {
        QosProfile::sensor_data().keep_last(1)
    }
}

impl CameraInput {
    /// Subscribes (best effort for `auto` until the publishers are known).
    pub fn start(
        node: &mut r2r::Node,
        rt: &tokio::runtime::Runtime,
        shared: &Arc<Shared>,
        transport: InputTransport,
        mode: InputQos,
        logger: &str,
    ) -> anyhow::Result<Self> {
        let reliable = mode == InputQos::Reliable;
        let resolved = if mode == InputQos::Auto { resolve(node, transport) } else { None };
        if mode == InputQos::Auto {
            match &resolved {
                Some(t) => r2r::log_info!(logger, "input_qos auto: '{t}' is read best effort until its publishers are known"),
                None => r2r::log_warn!(logger, "input_qos auto: cannot find the input's resolved name; staying best effort"),
            }
        }
        let mut input = Self {
            transport,
            mode,
            reliable,
            resolved,
            task: None,
            retiring: None,
            overlap: Arc::default(),
            next_check: Instant::now(),
            logger: logger.into(),
        };
        input.subscribe(node, rt, shared)?;
        Ok(input)
    }

    /// The relative name subscribed to.
    pub fn topic(&self) -> &'static str {
        match self.transport {
            InputTransport::Raw => "image",
            InputTransport::Compressed => "image/compressed",
        }
    }

    fn subscribe(&mut self, node: &mut r2r::Node, rt: &tokio::runtime::Runtime, shared: &Arc<Shared>) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let qos = input_qos(self.reliable);
        let shared = shared.clone();
        let overlap = self.overlap.clone();
        let task = match self.transport {
            InputTransport::Raw => {
                let mut sub = node.subscribe::<Image>("image", qos).context("cannot subscribe to 'image'")?;
                rt.spawn(async move {
                    while let Some(msg) = sub.next().await {
                        if shared.is_active() && overlap.admit((msg.header.stamp.sec, msg.header.stamp.nanosec)) {
                            shared.mailbox.put_frame(Frame::Raw(msg));
                        }
                    }
                })
            }
            InputTransport::Compressed => {
                let mut sub = node
                    .subscribe::<CompressedImage>("image/compressed", qos)
                    .context("cannot subscribe to 'image/compressed'")?;
                rt.spawn(async move {
                    while let Some(msg) = sub.next().await {
                        if shared.is_active() && overlap.admit((msg.header.stamp.sec, msg.header.stamp.nanosec)) {
                            shared.mailbox.put_frame(Frame::Compressed(msg));
                        }
                    }
                })
            }
        };
        // The old subscription reads on for OVERLAP, then its stream goes with its task (r2r
        // drops the reader on its next message).
        if let Some(old) = self.task.replace(task) {
            self.retire_now();
            self.overlap.active.store(true, Ordering::Relaxed);
            self.retiring = Some((old, Instant::now() + OVERLAP));
        }
        Ok(())
    }

    /// Ends the previous subscription, if one is still reading.
    fn retire_now(&mut self) {
        if let Some((old, _)) = self.retiring.take() {
            old.abort();
            self.overlap.active.store(false, Ordering::Relaxed);
        }
    }

    /// With `auto`: reads the publishers' reliability (at most once a second) and subscribes
    /// again when it no longer fits. Call it from the executor loop.
    pub fn follow_publishers(&mut self, node: &mut r2r::Node, rt: &tokio::runtime::Runtime, shared: &Arc<Shared>) {
        if self.retiring.as_ref().is_some_and(|(_, until)| Instant::now() >= *until) {
            self.retire_now();
        }
        if self.mode != InputQos::Auto || Instant::now() < self.next_check {
            return;
        }
        self.next_check = Instant::now() + CHECK_EVERY;
        let Some(topic) = self.resolved.clone() else { return };
        let Ok(publishers) = node.get_publishers_info_by_topic(&topic, false) else { return };
        if publishers.is_empty() {
            return;
        }
        let all_reliable = publishers.iter().all(|p| p.qos_profile.reliability == ReliabilityPolicy::Reliable);
        if all_reliable == self.reliable {
            return;
        }
        self.reliable = all_reliable;
        let who: Vec<String> = publishers
            .iter()
            .map(|p| format!("{}/{} {:?}", p.node_namespace.trim_end_matches('/'), p.node_name, p.qos_profile.reliability))
            .collect();
        match self.subscribe(node, rt, shared) {
            Ok(()) => r2r::log_info!(
                &self.logger,
                "input_qos auto: '{topic}' now read {} (publishers: {})",
                if all_reliable { "reliable" } else { "best effort" },
                who.join(", ")
            ),
            Err(e) => r2r::log_error!(&self.logger, "input_qos auto: cannot subscribe again to '{topic}': {e:#}"),
        }
    }
}

/// The input's name as rcl resolves it (namespace, remapping): r2r offers no call for it, so a
/// publisher is made on the same relative name (remapped by the same rules) and removed again;
/// the input is the topic on which this node has one publisher more while the probe exists.
/// Comparing counts, not looking for any topic of the type with a publisher of ours, matters:
/// the node's own heatmap and overlay are `Image` topics too (a camera followed on
/// `anomaly/heatmap` read reliable forever and answered no best-effort camera). It never
/// publishes.
fn resolve(node: &mut r2r::Node, transport: InputTransport) -> Option<String> {
    let (Ok(name), Ok(namespace)) = (node.name(), node.namespace()) else { return None };
    let ours = |node: &r2r::Node, type_name: &str| -> Vec<(String, usize)> {
        let topics = node.get_topic_names_and_types().unwrap_or_default();
        topics
            .into_iter()
            .filter(|(_, types)| types.iter().any(|t| t == type_name))
            .map(|(t, _)| {
                let publishers = node.get_publishers_info_by_topic(&t, false).unwrap_or_default();
                let n = publishers.iter().filter(|p| p.node_name == name && p.node_namespace == namespace).count();
                (t, n)
            })
            .collect()
    };
    let type_name = match transport {
        InputTransport::Raw => "sensor_msgs/msg/Image",
        InputTransport::Compressed => "sensor_msgs/msg/CompressedImage",
    };
    let before = ours(node, type_name);
    let after = match transport {
        InputTransport::Raw => {
            let probe = node.create_publisher::<Image>("image", QosProfile::default()).ok()?;
            let after = ours(node, type_name);
            node.destroy_publisher(probe);
            after
        }
        InputTransport::Compressed => {
            let probe = node.create_publisher::<CompressedImage>("image/compressed", QosProfile::default()).ok()?;
            let after = ours(node, type_name);
            node.destroy_publisher(probe);
            after
        }
    };
    probe_topic(&before, &after)
}

/// The one topic whose count of our publishers grew between `before` and `after`; `None` when
/// not exactly one did (the name stays unknown rather than guessed).
fn probe_topic(before: &[(String, usize)], after: &[(String, usize)]) -> Option<String> {
    let count = |t: &str| before.iter().find(|(b, _)| b == t).map_or(0, |(_, n)| *n);
    let mut grown = after.iter().filter(|(t, n)| *n > count(t)).map(|(t, _)| t.clone());
    let first = grown.next()?;
    grown.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::{probe_topic, Ordering, Overlap};

    fn counts(v: &[(&str, usize)]) -> Vec<(String, usize)> {
        v.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    #[test]
    fn the_probe_topic_is_the_one_that_grew_not_the_first_of_ours() {
        // Our heatmap sorts before the input and is ours too: it must not be chosen.
        let before = counts(&[("/anomaly/heatmap", 1), ("/anomaly/overlay", 1), ("/image", 0)]);
        let after = counts(&[("/anomaly/heatmap", 1), ("/anomaly/overlay", 1), ("/image", 1)]);
        assert_eq!(probe_topic(&before, &after).as_deref(), Some("/image"));
        // A topic new to the graph (remapped input nobody published yet).
        let after = counts(&[("/anomaly/heatmap", 1), ("/anomaly/overlay", 1), ("/cam/raw", 1)]);
        assert_eq!(probe_topic(&before, &after).as_deref(), Some("/cam/raw"));
        // Input remapped onto our own heatmap: one more publisher of ours there.
        let after = counts(&[("/anomaly/heatmap", 2), ("/anomaly/overlay", 1)]);
        assert_eq!(probe_topic(&before, &after).as_deref(), Some("/anomaly/heatmap"));
    }

    #[test]
    fn no_name_is_guessed_when_nothing_or_two_grew() {
        let before = counts(&[("/image", 0)]);
        assert_eq!(probe_topic(&before, &before), None);
        let after = counts(&[("/image", 1), ("/other", 1)]);
        assert_eq!(probe_topic(&before, &after), None);
    }

    #[test]
    fn only_an_overlap_drops_the_second_copy_of_a_frame() {
        let o = Overlap::default();
        assert!(o.admit((0, 0)) && o.admit((0, 0)), "a camera stamping every frame alike keeps them all");
        o.active.store(true, Ordering::Relaxed);
        assert!(o.admit((5, 1)));
        assert!(!o.admit((5, 1)), "the other reader's copy");
        assert!(o.admit((5, 2)) && o.admit((5, 1)), "new stamps, and an older one again, pass");
        o.active.store(false, Ordering::Relaxed);
        assert!(o.admit((5, 1)));
    }
}
