//! Wiring of the anomaly_inspector node: parameters, subscriptions, publishers, services,
//! diagnostics, and the executor loop. The work itself happens in [`super::inference`].
//!
//! Threads: the ROS executor (`spin_once` loop, main thread), a small tokio runtime for
//! subscriptions, services and parameter events, one inference thread, and a short-lived
//! thread per teach-in fit.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use r2r::diagnostic_msgs::msg::DiagnosticArray;
use r2r::rcl_interfaces::msg::ParameterEvent;
use r2r::sensor_msgs::msg::CameraInfo;
use r2r::QosProfile;
use tokio::sync::{broadcast, oneshot};

use super::actions::spawn_actions;
use super::inference::{self, Command, Shared};
use super::input::CameraInput;
use super::labelling::{spawn_label_service, RecentFrames};
use super::lifecycle::Lifecycle;
use super::mailbox::Mailbox;
use super::managed::{spawn_lifecycle_services, Transitions};
use super::params::{parameter_event, CheckedParams, NodeParams};
use super::services::{spawn_services, store};
use super::status::{diagnostics, Status};
use super::{publishing, LockOrRecover as _};
use crate::PinholeCamera;

/// How long one executor turn waits when nothing arrives. Messages and requests end the wait at
/// once; the timeout only paces the shutdown flag and the input's publisher check (each second).
/// Why not shorter: each turn costs about 0.2 ms of CPU, and on a small machine every wake-up
/// beside the inference's OpenMP threads stalls them (with 10 ms the idle node took 2.2 % of a
/// core in 100 wake-ups a second).
const SPIN_TIMEOUT: Duration = Duration::from_millis(100);

/// Node name used when none is given by `--ros-args -r __node:=...`.
pub const NODE_NAME: &str = "anomaly_inspector";

/// Names the node subscribes to (relative; remap them in launch files).
pub const INPUT_NAMES: [&str; 3] = ["image", "image/compressed", "camera_info"];

/// Names the node publishes (relative, except /diagnostics).
pub const OUTPUT_NAMES: [&str; 8] = [
    "anomaly/result",
    "anomaly/score",
    "anomaly/verdict",
    "anomaly/heatmap",
    "anomaly/overlay",
    "anomaly/map",
    "anomaly/markers",
    "/diagnostics",
];

/// What `anomaly_inspector_node --help` prints: how to run it, every parameter with its default
/// and description (the same text `ros2 param describe` shows), and the names it uses.
pub fn usage() -> String {
    use r2r::RosParams;
    let mut declared = r2r::indexmap::IndexMap::new();
    let mut text = format!(
        "{NODE_NAME}_node {}: surface anomaly detection on camera images (ROS 2 node)\n\n\
         Usage: {NODE_NAME}_node [--help | --version] [--ros-args -p <name>:=<value> ... -r <from>:=<to> ...]\n\n\
         Parameters (-p name:=value, or a params file with --params-file):\n",
        env!("CARGO_PKG_VERSION")
    );
    match NodeParams::default().register_parameters("", None, &mut declared) {
        Ok(()) => {
            for (name, p) in &declared {
                text.push_str(&format!("  {name} (default {}):\n", parameter_value(&p.value)));
                // Wrapped at about 90 columns, for a terminal.
                let mut line = String::new();
                for word in p.description.split_whitespace() {
                    if !line.is_empty() && line.len() + word.len() > 84 {
                        text.push_str(&format!("      {line}\n"));
                        line.clear();
                    }
                    if !line.is_empty() {
                        line.push(' ');
                    }
                    line.push_str(word);
                }
                text.push_str(&format!("      {line}\n"));
            }
        }
        Err(e) => text.push_str(&format!("  (cannot list them: {e})\n")),
    }
    text.push_str(&format!(
        "\nSubscribes (relative names; remap with -r): {}\nPublishes: {}\n\
         Services: ~/inspect, ~/teach, ~/label, ~/load_model, ~/set_threshold, ~/describe, and the lifecycle services \
         (~/change_state, ~/get_state, ~/get_available_states, ~/get_available_transitions, \
         ~/get_transition_graph; events on ~/transition_event)\n\
         Keep DDS on this machine with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and your own ROS_DOMAIN_ID.\n",
        INPUT_NAMES.join(", "),
        OUTPUT_NAMES.join(", ")
    ));
    text
}

/// A parameter value as it is written on the command line.
fn parameter_value(value: &r2r::ParameterValue) -> String {
    use r2r::ParameterValue as V;
    match value {
        V::String(s) if s.is_empty() => "''".into(),
        V::String(s) => s.clone(),
        V::Bool(b) => b.to_string(),
        V::Integer(i) => i.to_string(),
        V::Double(d) => format!("{d:?}"),
        V::IntegerArray(v) => format!("{v:?}"),
        V::DoubleArray(v) => format!("{v:?}"),
        other => format!("{other:?}"),
    }
}

/// The ROS clock's time now, as message stamps carry it (zero if the clock cannot be read).
fn ros_time(clock: &Mutex<r2r::Clock>) -> r2r::builtin_interfaces::msg::Time {
    clock.lock().ok().and_then(|mut c| c.get_now().ok()).map(|d| r2r::Clock::to_builtin_time(&d)).unwrap_or_default()
}

/// The environment variables Fast DDS reads its XML profiles from (new name, old name).
const FASTDDS_PROFILES_ENV: [&str; 2] = ["FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE"];

/// Gives the node's own DDS participant `config/fastdds_large_frames.xml` (a 64 MiB
/// shared-memory segment), unless the user chose a profile: Fast DDS puts a sample into shared
/// memory only when it fits the publisher's segment (512 KB by default), and the node publishes
/// heatmaps, overlays and 32FC1 maps of the camera's size, which otherwise go over UDP in
/// fragments and reach RViz late or not at all (README, "QoS and large frames"). Returns what
/// was done, for the log. Call it before the ROS context exists and before other threads run.
fn use_large_frames_profile() -> String {
    if let Some((name, value)) = FASTDDS_PROFILES_ENV.iter().find_map(|n| std::env::var_os(n).map(|v| (n, v))) {
        return format!(
            "Fast DDS profile from {name}={} (yours; config/fastdds_large_frames.xml not used)",
            value.to_string_lossy()
        );
    }
    let profile = crate::project_root().join("config/fastdds_large_frames.xml");
    if !profile.is_file() {
        return format!(
            "{} not found: Fast DDS defaults, so heatmaps and maps above 512 KB travel over UDP to local subscribers",
            profile.display()
        );
    }
    // Edition 2021: set_var is safe here, and no other thread exists yet to race it.
    std::env::set_var(FASTDDS_PROFILES_ENV[0], &profile);
    format!("Fast DDS profile {} (large frames through shared memory)", profile.display())
}

/// Runs the node until SIGINT/SIGTERM. ROS arguments (`--ros-args -p ... -r ...`) come from
/// the command line, as for any ROS 2 node.
pub fn run() -> anyhow::Result<()> {
    // Before any tch call: make sure a CUDA libtorch registers its backend.
    let cuda = crate::load_cuda_backend();
    // Before the DDS participant exists, and before any other thread does.
    let profile = use_large_frames_profile();

    let ctx = r2r::Context::create().context("cannot initialise ROS 2 (rcl_init)")?;
    let mut node = r2r::Node::create(ctx, NODE_NAME, "").context("cannot create the ROS 2 node")?;
    let logger = node.logger().to_string();
    let node_name = node.name().unwrap_or_else(|_| NODE_NAME.into());
    if let Ok(lib) = &cuda {
        r2r::log_info!(&logger, "CUDA backend registered ({lib})");
    }
    r2r::log_info!(&logger, "{profile}");

    let params = Arc::new(Mutex::new(CheckedParams::new(NodeParams::default(), &logger)));
    let (param_handler, mut param_events) =
        node.make_derived_parameter_handler(params.clone()).context("cannot declare parameters")?;
    // r2r's own copy of the values (list/describe services); kept in step when a load fails.
    let node_params = node.params.clone();
    let settings = {
        let mut p = params.locked();
        // The start-up values (command line, params file), checked as a whole; the defaults if
        // they do not parse.
        p.in_force = p.values.clone();
        match p.values.settings() {
            Ok(s) => s,
            Err(e) => {
                r2r::log_error!(&logger, "invalid parameters: {e}; using the defaults for all of them");
                p.in_force = NodeParams::default();
                p.in_force.settings().context("the default parameters do not parse")?
            }
        }
    };

    let (result_pubs, image_pubs) =
        publishing::create(&mut node, settings.output_reliable).context("cannot create the output publishers")?;
    let diagnostics_pub = node.create_publisher::<DiagnosticArray>("/diagnostics", QosProfile::default().keep_last(10))?;

    let (results_tx, _) = broadcast::channel(8);
    let shared = Arc::new(Shared {
        mailbox: Mailbox::default(),
        status: Mutex::new(Status::default()),
        camera: Mutex::new(None),
        results: results_tx,
        lifecycle: Mutex::new(Lifecycle::default()),
        recent: Mutex::new(RecentFrames::default()),
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.spawn(param_handler);

    // Frames -> mailbox.
    let mut input = CameraInput::start(&mut node, &rt, &shared, settings.input_transport, settings.input_qos, &logger)?;
    let input_topic = input.topic();
    {
        let mut sub = node.subscribe::<CameraInfo>("camera_info", QosProfile::default().keep_last(1))?;
        let shared = shared.clone();
        let logger = logger.clone();
        rt.spawn(async move {
            let mut warned = false;
            while let Some(info) = sub.next().await {
                match PinholeCamera::from_k(&info.k) {
                    Ok(cam) => *shared.camera.locked() = Some(cam),
                    Err(e) if !warned => {
                        warned = true;
                        r2r::log_warn!(&logger, "camera_info ignored: {e}");
                    }
                    Err(_) => {}
                }
            }
        });
    }

    // r2r publishes no /parameter_events: the node announces its declared values, then each
    // change it takes, as rclcpp and rclpy nodes do (rqt_reconfigure and parameter event
    // handlers listen there).
    let parameter_events = node
        .create_publisher::<ParameterEvent>("/parameter_events", QosProfile::parameter_events())
        .context("cannot create the /parameter_events publisher")?;
    let qualified_name = node.fully_qualified_name().unwrap_or_else(|_| format!("/{NODE_NAME}"));
    let ros_now = {
        let clock = node.get_ros_clock();
        move || ros_time(&clock)
    };
    {
        let declared: Vec<_> = node_params.locked().iter().map(|(k, p)| (k.clone(), p.value.clone())).collect();
        let _ = parameter_events.publish(&parameter_event(&qualified_name, ros_now(), &declared, &[]));
    }

    // Parameter changes -> inference thread. Values that do not parse never get here
    // (CheckedParams refuses them in the set_parameters reply); a model that does not load is
    // refused here: the parameter goes back to the model in force.
    {
        let logger = logger.clone();
        let params = params.clone();
        let shared = shared.clone();
        let node_params = node_params.clone();
        rt.spawn(async move {
            while let Some((name, value)) = param_events.next().await {
                use r2r::RosParams;
                // Each change is applied to the values last in force, not to our struct: by now
                // the struct may already hold later changes whose events are still queued (and
                // which may yet be refused).
                let mut candidate = params.locked().in_force.clone();
                let parsed = candidate
                    .set_parameter(&name, &value)
                    .map_err(|e| e.to_string())
                    .and_then(|()| candidate.settings().map_err(|e| e.to_string()));
                let refused = match parsed {
                    Ok(settings) => {
                        let (tx, rx) = oneshot::channel();
                        shared.mailbox.put_command(Command::Settings(settings, tx));
                        match rx.await {
                            Ok(Err(e)) => Some(e),
                            Ok(Ok(())) | Err(_) => None,
                        }
                    }
                    Err(e) => Some(e),
                };
                let refused = refused.map(|e| (e, params.locked().revert(&name)));
                match refused {
                    Some((e, restored)) => {
                        // Our struct's lock is released: r2r takes its map's lock first.
                        if let Some(old) = &restored {
                            store(&node_params, &name, old.clone());
                        }
                        let restored = restored.map(|v| format!("{v:?}")).unwrap_or_else(|| "unchanged".into());
                        r2r::log_error!(&logger, "parameter {name} = {value:?} refused: {e}; it stays {restored}");
                    }
                    None => {
                        let _ = params.locked().in_force.set_parameter(&name, &value);
                        r2r::log_info!(&logger, "parameter {name} set to {value:?}");
                        let changed = [(name.clone(), value.clone())];
                        let _ = parameter_events.publish(&parameter_event(&qualified_name, ros_now(), &[], &changed));
                    }
                }
            }
        });
    }

    spawn_services(&mut node, &rt, &shared, &params, &node_params, &logger)?;
    spawn_label_service(&mut node, &rt, &shared, &params, &logger)?;
    spawn_actions(&mut node, &rt, &shared, &params, &node_params, &logger)?;
    let transitions = Arc::new(Transitions::new(&mut node, shared.clone(), &logger).context("cannot create ~/transition_event")?);
    spawn_lifecycle_services(&mut node, &rt, &transitions).context("cannot create the lifecycle services")?;
    let managed = settings.managed;
    if managed {
        r2r::log_info!(&logger, "managed start-up: unconfigured until a lifecycle manager configures and activates the node");
    } else {
        transitions.start_active();
    }

    // Diagnostics at 1 Hz.
    {
        let shared = shared.clone();
        let clock = node.get_ros_clock();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let status = shared.status.locked().clone();
                let stamp = ros_time(&clock);
                let msg = diagnostics(
                    stamp,
                    &node_name,
                    &status,
                    shared.mailbox.received.load(Ordering::Relaxed),
                    shared.mailbox.dropped.load(Ordering::Relaxed),
                    shared.lifecycle_state().label(),
                );
                let _ = diagnostics_pub.publish(&msg);
            }
        });
    }

    let worker = {
        let shared = shared.clone();
        let logger = logger.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || inference::run(shared, settings, result_pubs, image_pubs, logger, !managed))
            .context("cannot start the inference thread")?
    };

    let shutdown = Arc::new(AtomicBool::new(false));
    {
        let shutdown = shutdown.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            shutdown.store(true, Ordering::SeqCst);
        });
    }

    r2r::log_info!(&logger, "waiting for frames on '{input_topic}'");
    while !shutdown.load(Ordering::SeqCst) {
        node.spin_once(SPIN_TIMEOUT);
        input.follow_publishers(&mut node, &rt, &shared);
    }
    r2r::log_info!(&logger, "shutting down");
    shared.mailbox.close();
    let _ = worker.join();
    drop(rt);
    Ok(())
}
