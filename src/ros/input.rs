//! The camera input: the subscription on `image` (or `image/compressed`) that feeds the
//! mailbox, and with `input_qos: auto` its reliability following the camera's publishers.
//!
//! Why follow them: a frame over 512 KB travels between processes as UDP fragments unless the
//! publisher's Fast DDS shared-memory segment holds it, and a best-effort reader loses the
//! frames whose fragments it misses (measured: 12 of 30 frames of 640x480 rgb8, none above
//! 1 MP). A reliable camera (image_transport's default) resends them to a reliable reader. A
//! best-effort camera matches only a best-effort reader. So `auto` starts best effort, which
//! matches every camera, and becomes reliable once every publisher on the topic is reliable.
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use r2r::qos::ReliabilityPolicy;
use r2r::sensor_msgs::msg::{CompressedImage, Image};
use r2r::QosProfile;

use super::convert::Frame;
use super::inference::Shared;
use super::params::{InputQos, InputTransport};

/// How often the publishers' QoS is read again.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The subscription and what it is following.
pub struct CameraInput {
    transport: InputTransport,
    mode: InputQos,
    reliable: bool,
    /// The input's name after namespace and remapping (auto only; `None`: not found).
    resolved: Option<String>,
    task: Option<tokio::task::JoinHandle<()>>,
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
        let mut input =
            Self { transport, mode, reliable, resolved, task: None, next_check: Instant::now(), logger: logger.into() };
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
        let task = match self.transport {
            InputTransport::Raw => {
                let mut sub = node.subscribe::<Image>("image", qos).context("cannot subscribe to 'image'")?;
                rt.spawn(async move {
                    while let Some(msg) = sub.next().await {
                        if shared.is_active() {
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
                        if shared.is_active() {
                            shared.mailbox.put_frame(Frame::Compressed(msg));
                        }
                    }
                })
            }
        };
        // The old subscription's stream goes with its task (r2r drops the reader on its next
        // message); the newest frame is kept by the mailbox either way.
        if let Some(old) = self.task.replace(task) {
            old.abort();
        }
        Ok(())
    }

    /// With `auto`: reads the publishers' reliability (at most once a second) and subscribes
    /// again when it no longer fits. Call it from the executor loop.
    pub fn follow_publishers(&mut self, node: &mut r2r::Node, rt: &tokio::runtime::Runtime, shared: &Arc<Shared>) {
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
/// publisher is made on the same relative name (remapped by the same rules), found among the
/// topics' publishers by this node's name and namespace, and removed again. It never
/// publishes.
fn resolve(node: &mut r2r::Node, transport: InputTransport) -> Option<String> {
    let (Ok(name), Ok(namespace)) = (node.name(), node.namespace()) else { return None };
    let find = |node: &r2r::Node, type_name: &str| -> Option<String> {
        let topics = node.get_topic_names_and_types().ok()?;
        topics.into_iter().filter(|(_, types)| types.iter().any(|t| t == type_name)).map(|(t, _)| t).find(|t| {
            let publishers = node.get_publishers_info_by_topic(t, false).unwrap_or_default();
            publishers.iter().any(|p| p.node_name == name && p.node_namespace == namespace)
        })
    };
    match transport {
        InputTransport::Raw => {
            let probe = node.create_publisher::<Image>("image", QosProfile::default()).ok()?;
            let found = find(node, "sensor_msgs/msg/Image");
            node.destroy_publisher(probe);
            found
        }
        InputTransport::Compressed => {
            let probe = node.create_publisher::<CompressedImage>("image/compressed", QosProfile::default()).ok()?;
            let found = find(node, "sensor_msgs/msg/CompressedImage");
            node.destroy_publisher(probe);
            found
        }
    }
}
