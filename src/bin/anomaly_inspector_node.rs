//! The anomaly_inspector ROS 2 node. Everything lives in `anomaly_inspector::ros`.
#[cfg(feature = "ros")]
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

/// A build without the `ros` feature (a workstation without ROS) has no node; this binary exists
/// only so that the package's binaries are the same in every build (see Cargo.toml).
#[cfg(not(feature = "ros"))]
fn main() -> std::process::ExitCode {
    eprintln!(
        "anomaly_inspector_node was built without the `ros` feature (cargo --no-default-features): \
         there is no node in this build. Rebuild with the default features, on a machine with ROS 2 \
         (scripts/setup.sh), to get it; the CLI `anomaly_inspector` works in both builds."
    );
    std::process::ExitCode::from(2)
}
