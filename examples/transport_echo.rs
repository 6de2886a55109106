//! The transport floor under the node's end-to-end time (issue 18, point 4): an r2r node that
//! answers every `sensor_msgs/Image` on `image` at once with an `AnomalyResult` carrying its
//! header and nothing else. `scripts/image_peer.py` timed against it (as `scripts/bench.sh` does
//! after the node) measures what the rclpy peer, DDS and r2r cost for a frame of that size: what
//! any node, ours too, pays before and after its own work.
//!
//!   source scripts/env.sh && cargo run --release --example transport_echo
//!
//! The subscription reads like the node's once it is reliable (keep last 1); the reply goes out
//! reliably, as the node's results do.
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use r2r::anomaly_inspector_msgs::msg::AnomalyResult;
use r2r::sensor_msgs::msg::Image;
use r2r::QosProfile;

fn main() -> anyhow::Result<()> {
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, "transport_echo", "")?;
    let mut frames = node.subscribe::<Image>("image", QosProfile::default().keep_last(1))?;
    let results = node.create_publisher::<AnomalyResult>("anomaly/result", QosProfile::default())?;
    eprintln!("transport_echo: answering every frame on 'image' with an empty anomaly/result");
    loop {
        node.spin_once(Duration::from_millis(10));
        // Every frame that arrived during the spin, answered in order.
        while let Some(Some(frame)) = frames.next().now_or_never() {
            // The frame's bytes are in memory, as the node has them before converting.
            let reply = AnomalyResult { header: frame.header, ..Default::default() };
            results.publish(&reply)?;
        }
    }
}
