//! Wiring of the anomaly_inspector node: parameters, subscriptions, publishers, services,
//! diagnostics, and the executor loop. The work itself happens in [`super::worker`].
//!
//! Threads: the ROS executor (`spin_once` loop, main thread), a small tokio runtime for
//! subscriptions, services and parameter events, one inference thread, and a short-lived
//! thread per teach-in fit.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use r2r::anomaly_inspector_msgs::msg::AnomalyResult;
use r2r::anomaly_inspector_msgs::srv::{Inspect, LoadModel, SetThreshold, Teach};
use r2r::diagnostic_msgs::msg::DiagnosticArray;
use r2r::sensor_msgs::msg::{CameraInfo, CompressedImage, Image};
use r2r::QosProfile;
use tokio::sync::{broadcast, oneshot};

use super::outputs;
use super::params::{CheckedParams, InputQos, InputTransport, NodeParams};
use super::worker::{self, Command, Frame, Mailbox, Publishers, Shared, Status};
use crate::camera::PinholeCamera;

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

/// Runs the node until SIGINT/SIGTERM. ROS arguments (`--ros-args -p ... -r ...`) come from
/// the command line, as for any ROS 2 node.
pub fn run() -> anyhow::Result<()> {
    // Before any tch call: make sure a CUDA libtorch registers its backend.
    let cuda = crate::device::load_cuda_backend();

    let ctx = r2r::Context::create().context("cannot initialise ROS 2 (rcl_init)")?;
    let mut node = r2r::Node::create(ctx, NODE_NAME, "").context("cannot create the ROS 2 node")?;
    let logger = node.logger().to_string();
    let node_name = node.name().unwrap_or_else(|_| NODE_NAME.into());
    if let Ok(lib) = &cuda {
        r2r::log_info!(&logger, "CUDA backend registered ({lib})");
    }

    let params = Arc::new(Mutex::new(CheckedParams::new(NodeParams::default(), &logger)));
    let (param_handler, mut param_events) =
        node.make_derived_parameter_handler(params.clone()).context("cannot declare parameters")?;
    // r2r's own copy of the values (list/describe services); kept in step when a load fails.
    let node_params = node.params.clone();
    let initial = params.lock().unwrap_or_else(|e| e.into_inner()).values.clone();
    if initial.settings().is_ok() {
        remember_good(&initial);
    }
    let settings = initial.settings().unwrap_or_else(|e| {
        r2r::log_error!(&logger, "invalid parameters: {e}; using the defaults for all of them");
        NodeParams::default().settings().expect("defaults are valid")
    });

    let input_qos = match settings.input_qos {
        InputQos::SensorData => QosProfile::sensor_data().keep_last(1),
        InputQos::Reliable => QosProfile::default().keep_last(1),
    };
    let out_qos = |depth: usize| {
        let q = QosProfile::default().keep_last(depth);
        if settings.output_reliable {
            q
        } else {
            q.best_effort()
        }
    };
    let results_qos = out_qos(10);
    let images_qos = out_qos(2);
    let pubs = Publishers {
        result: node.create_publisher("anomaly/result", results_qos.clone())?,
        score: node.create_publisher("anomaly/score", results_qos.clone())?,
        // Latched, so a behaviour tree that subscribes late still gets the latest verdict.
        verdict: node.create_publisher("anomaly/verdict", out_qos(1).transient_local())?,
        heatmap: node.create_publisher("anomaly/heatmap", images_qos.clone())?,
        overlay: node.create_publisher("anomaly/overlay", images_qos.clone())?,
        map: node.create_publisher("anomaly/map", images_qos)?,
        markers: node.create_publisher("anomaly/markers", results_qos)?,
    };
    let diagnostics_pub = node.create_publisher::<DiagnosticArray>("/diagnostics", QosProfile::default().keep_last(10))?;

    let (results_tx, _) = broadcast::channel(8);
    let shared = Arc::new(Shared {
        mailbox: Mailbox::default(),
        status: Mutex::new(Status::default()),
        camera: Mutex::new(None),
        results: results_tx,
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.spawn(param_handler);

    // Frames -> mailbox.
    let input_topic = match settings.input_transport {
        InputTransport::Raw => {
            let mut sub = node.subscribe::<Image>("image", input_qos).context("cannot subscribe to 'image'")?;
            let shared = shared.clone();
            rt.spawn(async move {
                while let Some(msg) = sub.next().await {
                    shared.mailbox.put_frame(Frame::Raw(msg));
                }
            });
            "image"
        }
        InputTransport::Compressed => {
            let mut sub = node
                .subscribe::<CompressedImage>("image/compressed", input_qos)
                .context("cannot subscribe to 'image/compressed'")?;
            let shared = shared.clone();
            rt.spawn(async move {
                while let Some(msg) = sub.next().await {
                    shared.mailbox.put_frame(Frame::Compressed(msg));
                }
            });
            "image/compressed"
        }
    };
    {
        let mut sub = node.subscribe::<CameraInfo>("camera_info", QosProfile::default().keep_last(1))?;
        let shared = shared.clone();
        let logger = logger.clone();
        rt.spawn(async move {
            let mut warned = false;
            while let Some(info) = sub.next().await {
                match PinholeCamera::from_k(&info.k) {
                    Ok(cam) => *shared.camera.lock().unwrap_or_else(|e| e.into_inner()) = Some(cam),
                    Err(e) if !warned => {
                        warned = true;
                        r2r::log_warn!(&logger, "camera_info ignored: {e}");
                    }
                    Err(_) => {}
                }
            }
        });
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
                let mut candidate = last_good();
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
                let refused = refused.map(|e| (e, revert(&mut params.lock().unwrap_or_else(|e| e.into_inner()), &name)));
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
                        update_good(|g| {
                            let _ = g.set_parameter(&name, &value);
                        });
                        r2r::log_info!(&logger, "parameter {name} set to {value:?}");
                    }
                }
            }
        });
    }

    spawn_services(&mut node, &rt, &shared, &params, &node_params, &logger)?;

    // Diagnostics at 1 Hz.
    {
        let shared = shared.clone();
        let clock = node.get_ros_clock();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let status = shared.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let stamp = clock
                    .lock()
                    .ok()
                    .and_then(|mut c| c.get_now().ok())
                    .map(|d| r2r::Clock::to_builtin_time(&d))
                    .unwrap_or_default();
                let msg = outputs::diagnostics(
                    stamp,
                    &node_name,
                    &status,
                    shared.mailbox.received.load(Ordering::Relaxed),
                    shared.mailbox.dropped.load(Ordering::Relaxed),
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
            .spawn(move || worker::run(shared, settings, pubs, logger))
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
        node.spin_once(Duration::from_millis(10));
    }
    r2r::log_info!(&logger, "shutting down");
    shared.mailbox.close();
    let _ = worker.join();
    drop(rt);
    Ok(())
}

/// Puts parameter `name` back to the last value in force in our struct; returns it (for r2r's
/// copy, see [`store`], and the log).
fn revert(params: &mut NodeParams, name: &str) -> Option<r2r::ParameterValue> {
    use r2r::RosParams;
    let mut good = LAST_GOOD.lock().unwrap_or_else(|e| e.into_inner());
    let good = good.get_or_insert_with(NodeParams::default);
    let old = good.get_parameter(name).ok()?;
    params.set_parameter(name, &old).ok()?;
    Some(old)
}

/// r2r's own copy of the parameter values: it decides whether a set_parameters call is a change
/// (and so raises an event), so services that change a parameter must update it too.
type NodeParamMap = Arc<Mutex<r2r::indexmap::IndexMap<String, r2r::Parameter>>>;

/// Stores `value` for `name` in r2r's copy (see [`NodeParamMap`]). Never call it holding our
/// struct's lock: r2r's get_parameters takes the map's lock, then ours.
fn store(node_params: &NodeParamMap, name: &str, value: r2r::ParameterValue) {
    if let Some(p) = node_params.lock().unwrap_or_else(|e| e.into_inner()).get_mut(name) {
        p.value = value;
    }
}

/// Records a model switched to by a service as the `model` parameter, so that the parameter
/// tells the truth and a later parameter change does not load the previous model again.
fn model_in_force(params: &Mutex<CheckedParams>, node_params: &NodeParamMap, path: &std::path::Path) {
    let model = path.to_string_lossy().into_owned();
    {
        let mut p = params.lock().unwrap_or_else(|e| e.into_inner());
        p.model = model.clone();
        update_good(|g| g.model = model.clone());
    }
    store(node_params, "model", r2r::ParameterValue::String(model));
}

/// The last parameter set that parsed (for [`revert`]).
static LAST_GOOD: Mutex<Option<NodeParams>> = Mutex::new(None);

fn remember_good(params: &NodeParams) {
    *LAST_GOOD.lock().unwrap_or_else(|e| e.into_inner()) = Some(params.clone());
}

/// The parameter values last put in force.
fn last_good() -> NodeParams {
    LAST_GOOD.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(NodeParams::default).clone()
}

/// Changes the values last put in force (one parameter that was just applied).
fn update_good(change: impl FnOnce(&mut NodeParams)) {
    change(LAST_GOOD.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(NodeParams::default));
}

const DEFAULT_INSPECT_TIMEOUT_S: f32 = 5.0;
const DEFAULT_TEACH_FRAMES: u32 = 30;
/// Teach-in frames are held in memory until the fit (500 frames of 1280x1024 RGB: 2 GB), and
/// PatchCore needs far fewer; a larger request is refused rather than risk the node's memory.
pub const MAX_TEACH_FRAMES: u32 = 500;
const DEFAULT_TEACH_TIMEOUT_S: f32 = 120.0;

fn timeout_or(value: f32, default: f32) -> Duration {
    Duration::from_secs_f32(if value > 0.0 && value.is_finite() { value.min(3600.0) } else { default })
}

/// Why no result came: the most useful thing the node knows.
fn no_result_reason(shared: &Shared, waited: Duration) -> String {
    let st = shared.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let received = shared.mailbox.received.load(Ordering::Relaxed);
    match (&st.model_id, received, &st.last_error) {
        (None, _, _) => "no model loaded (set parameter 'model' or call ~/load_model or ~/teach)".into(),
        (_, 0, _) => format!(
            "no frame arrived within {:.1} s: is the camera publishing on the remapped 'image' topic?",
            waited.as_secs_f32()
        ),
        (_, _, Some(e)) => format!("no fresh frame inspected within {:.1} s; last error: {e}", waited.as_secs_f32()),
        _ => format!("no fresh frame inspected within {:.1} s", waited.as_secs_f32()),
    }
}

fn spawn_services(
    node: &mut r2r::Node,
    rt: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    params: &Arc<Mutex<CheckedParams>>,
    node_params: &NodeParamMap,
    logger: &str,
) -> anyhow::Result<()> {
    let qos = QosProfile::services_default();

    let mut inspect = node.create_service::<Inspect::Service>("~/inspect", qos.clone())?;
    let sh = shared.clone();
    rt.spawn(async move {
        while let Some(req) = inspect.next().await {
            let sh = sh.clone();
            // Each call waits on its own task, so several trees can ask at once.
            tokio::spawn(async move {
                let asked = Instant::now();
                let wait = timeout_or(req.message.timeout_s, DEFAULT_INSPECT_TIMEOUT_S);
                let mut rx = sh.results.subscribe();
                let fresh = tokio::time::timeout(wait, async {
                    loop {
                        match rx.recv().await {
                            Ok(p) if p.received >= asked => return Some(p.result),
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(broadcast::error::RecvError::Closed) => return None,
                        }
                    }
                })
                .await
                .ok()
                .flatten();
                let response = match fresh {
                    Some(result) => Inspect::Response { success: true, message: String::new(), result },
                    None => Inspect::Response {
                        success: false,
                        message: no_result_reason(&sh, wait),
                        result: AnomalyResult::default(),
                    },
                };
                let _ = req.respond(response);
            });
        }
    });

    let mut teach = node.create_service::<Teach::Service>("~/teach", qos.clone())?;
    let sh = shared.clone();
    let log = logger.to_string();
    let prm = params.clone();
    let np = node_params.clone();
    rt.spawn(async move {
        while let Some(req) = teach.next().await {
            let frames = if req.message.num_frames == 0 { DEFAULT_TEACH_FRAMES } else { req.message.num_frames };
            let bad_name = |n: &str| n.contains('/') || n.contains("..") || n.starts_with('.');
            let name = if req.message.model_name.trim().is_empty() {
                format!(
                    "taught_{}",
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
                )
            } else {
                req.message.model_name.trim().to_string()
            };
            if !(2..=MAX_TEACH_FRAMES).contains(&frames) || bad_name(&name) {
                let message = if frames < 2 {
                    format!("num_frames {frames}: need at least 2 good frames (one to fit, one to calibrate)")
                } else if frames > MAX_TEACH_FRAMES {
                    format!("num_frames {frames}: at most {MAX_TEACH_FRAMES} frames (they are held in memory until the fit)")
                } else {
                    format!("model_name '{name}': use a plain directory name (no '/', no leading '.')")
                };
                r2r::log_error!(&log, "teach refused: {message}");
                let _ = req.respond(Teach::Response { success: false, message, ..Default::default() });
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let deadline = Instant::now() + timeout_or(req.message.timeout_s, DEFAULT_TEACH_TIMEOUT_S);
            sh.mailbox.put_command(Command::Teach { frames: frames as usize, name, deadline, reply: tx });
            let (prm, np) = (prm.clone(), np.clone());
            tokio::spawn(async move {
                let response = match rx.await {
                    Ok(o) => {
                        if o.result.is_ok() {
                            model_in_force(&prm, &np, &o.model_path);
                        }
                        Teach::Response {
                            success: o.result.is_ok(),
                            message: match &o.result {
                                Ok(id) => format!("model '{id}' fitted on {} frames and in use", o.frames_used),
                                Err(e) => e.clone(),
                            },
                            model_path: o.model_path.to_string_lossy().into_owned(),
                            frames_used: o.frames_used,
                            fit_seconds: o.fit_seconds,
                        }
                    }
                    Err(_) => Teach::Response { success: false, message: "node shutting down".into(), ..Default::default() },
                };
                let _ = req.respond(response);
            });
        }
    });

    let mut load = node.create_service::<LoadModel::Service>("~/load_model", qos.clone())?;
    let sh = shared.clone();
    let prm = params.clone();
    let np = node_params.clone();
    rt.spawn(async move {
        while let Some(req) = load.next().await {
            let path = PathBuf::from(req.message.model.trim());
            let (tx, rx) = oneshot::channel();
            sh.mailbox.put_command(Command::LoadModel(path.clone(), tx));
            let prm = prm.clone();
            let np = np.clone();
            tokio::spawn(async move {
                let response = match rx.await {
                    Ok(Ok(id)) => {
                        model_in_force(&prm, &np, &path);
                        LoadModel::Response { success: true, message: format!("model '{id}' in use"), model_id: id }
                    }
                    Ok(Err(e)) => LoadModel::Response { success: false, message: e, model_id: String::new() },
                    Err(_) => {
                        LoadModel::Response { success: false, message: "node shutting down".into(), model_id: String::new() }
                    }
                };
                let _ = req.respond(response);
            });
        }
    });

    let mut threshold = node.create_service::<SetThreshold::Service>("~/set_threshold", qos)?;
    let sh = shared.clone();
    let prm = params.clone();
    let np = node_params.clone();
    let log = logger.to_string();
    rt.spawn(async move {
        while let Some(req) = threshold.next().await {
            let t = req.message.threshold;
            let response = {
                let mut p = prm.lock().unwrap_or_else(|e| e.into_inner());
                let candidate = NodeParams { threshold: t as f64, ..last_good() };
                match candidate.settings() {
                    Ok(s) => {
                        p.threshold = t as f64;
                        update_good(|g| g.threshold = t as f64);
                        let (tx, _) = oneshot::channel();
                        sh.mailbox.put_command(Command::Settings(s, tx));
                        r2r::log_info!(&log, "threshold set to {t}");
                        SetThreshold::Response { success: true, message: format!("threshold {t} in force from the next frame") }
                    }
                    Err(e) => {
                        r2r::log_error!(&log, "set_threshold {t} refused: {e}; the threshold stays {}", p.threshold);
                        SetThreshold::Response { success: false, message: e.to_string() }
                    }
                }
            };
            if response.success {
                store(&np, "threshold", r2r::ParameterValue::Double(t as f64));
            }
            let _ = req.respond(response);
        }
    });
    Ok(())
}
