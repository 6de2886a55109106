//! The anomaly_inspector ROS 2 node. Everything lives in `anomaly_inspector::ros`.
fn main() -> anyhow::Result<()> {
    anomaly_inspector::ros::run()
}
