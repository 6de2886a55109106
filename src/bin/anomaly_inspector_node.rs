//! The anomaly_inspector ROS 2 node. Everything lives in `anomaly_inspector::ros`.
fn main() -> anyhow::Result<()> {
    // Our own options come before --ros-args; everything after it is ROS's.
    let own: Vec<String> = std::env::args().skip(1).take_while(|a| a != "--ros-args").collect();
    if own.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", anomaly_inspector::ros::node::usage());
        return Ok(());
    }
    if own.iter().any(|a| a == "-V" || a == "--version") {
        println!("anomaly_inspector_node {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    anomaly_inspector::ros::run()
}
