//! The node's services: `~/inspect` (the verdict on the next fresh frame, for behaviour
//! trees), `~/teach` (fit a new model on the next good frames), `~/load_model` and
//! `~/set_threshold`, and `~/describe` (what the node runs, for a cell's logs). Each answers
//! from its own task, so a slow one never holds up another.
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use r2r::anomaly_inspector_msgs::msg::AnomalyResult;
use r2r::anomaly_inspector_msgs::srv::{Inspect, LoadModel, SetThreshold, Teach};
use r2r::std_srvs::srv::Trigger;
use r2r::QosProfile;
// tokio's watch channel, named so that no line reads like a libtorch path (tests/layering.rs).
use tokio::sync::watch as latest;
use tokio::sync::{broadcast, oneshot};

use super::inference::{Command, Published, Shared, TeachOrder, TeachOutcome, TeachProgress};
use super::lifecycle::State;
use super::params::{CheckedParams, NodeParams};
use super::LockOrRecover as _;
use crate::training::Cancel;
use crate::Method;

/// r2r's own copy of the parameter values: it decides whether a set_parameters call is a change
/// (and so raises an event), so services that change a parameter must update it too.
pub type NodeParamMap = Arc<Mutex<r2r::indexmap::IndexMap<String, r2r::Parameter>>>;

/// Stores `value` for `name` in r2r's copy (see [`NodeParamMap`]). Never call it holding our
/// struct's lock: r2r's get_parameters takes the map's lock, then ours.
pub fn store(node_params: &NodeParamMap, name: &str, value: r2r::ParameterValue) {
    if let Some(p) = node_params.locked().get_mut(name) {
        p.value = value;
    }
}

/// Records a model switched to by a service as the `model` parameter, so that the parameter
/// tells the truth and a later parameter change does not load the previous model again.
fn model_in_force(params: &Mutex<CheckedParams>, node_params: &NodeParamMap, path: &std::path::Path) {
    let model = path.to_string_lossy().into_owned();
    {
        let mut p = params.locked();
        p.values.model = model.clone();
        p.in_force.model = model.clone();
    }
    store(node_params, "model", r2r::ParameterValue::String(model));
}

/// `~/inspect`'s wait for a fresh frame when the request names none (service and action).
pub(super) const DEFAULT_INSPECT_TIMEOUT_S: f32 = 5.0;
const DEFAULT_TEACH_FRAMES: u32 = 30;
/// Teach-in frames are held in memory until the fit (500 frames of 1280x1024 RGB: 2 GB), and
/// PatchCore needs far fewer; a larger request is refused rather than risk the node's memory.
pub const MAX_TEACH_FRAMES: u32 = 500;
const DEFAULT_TEACH_TIMEOUT_S: f32 = 120.0;

pub(super) fn timeout_or(value: f32, default: f32) -> Duration {
    Duration::from_secs_f32(if value > 0.0 && value.is_finite() { value.min(3600.0) } else { default })
}

/// The next result whose frame arrived at or after `asked`, waiting at most `wait`; `None` on
/// timeout or when the node stops.
pub(super) async fn next_fresh(rx: &mut broadcast::Receiver<Published>, asked: Instant, wait: Duration) -> Option<Published> {
    let fresh = async {
        loop {
            match rx.recv().await {
                Ok(p) if p.received >= asked => return Some(p),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    };
    tokio::time::timeout(wait, fresh).await.ok().flatten()
}

/// Why no result came: the most useful thing the node knows.
pub(super) fn no_result_reason(shared: &Shared, waited: Duration) -> String {
    let st = shared.status.locked().clone();
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

/// Why a service that needs frames cannot be served now: the node is not active (lifecycle).
pub(super) fn inactive(shared: &Shared) -> Option<String> {
    let state = shared.lifecycle_state();
    match state {
        State::Active => None,
        State::Finalized => Some("inactive: the node is finalized (lifecycle shut down); restart it".into()),
        _ => Some(format!(
            "inactive: the node is {} (lifecycle); activate it first (ros2 lifecycle set <node> activate)",
            state.label()
        )),
    }
}

/// The parameters in force as JSON (name -> value), as `ros2 param dump` would list them.
fn parameters_json(mut params: NodeParams) -> serde_json::Value {
    use r2r::RosParams;
    let mut declared = r2r::indexmap::IndexMap::new();
    // register_parameters takes &mut self, though it only reads the values.
    if params.register_parameters("", None, &mut declared).is_err() {
        return serde_json::Value::Null;
    }
    let value = |v: &r2r::ParameterValue| -> serde_json::Value {
        use r2r::ParameterValue as V;
        match v {
            V::Bool(b) => (*b).into(),
            V::Integer(i) => (*i).into(),
            V::Double(d) => (*d).into(),
            V::String(s) => s.clone().into(),
            V::IntegerArray(a) => a.clone().into(),
            V::DoubleArray(a) => a.clone().into(),
            other => format!("{other:?}").into(),
        }
    };
    declared.iter().map(|(k, p)| (k.clone(), value(&p.value))).collect::<serde_json::Map<_, _>>().into()
}

/// A teach-in request's fields, as the service and the action both carry them.
pub(super) struct TeachAsk<'a> {
    pub num_frames: u32,
    pub model_name: &'a str,
    pub timeout_s: f32,
    pub method: &'a str,
}

/// A teach-in under way: its outcome to come, its progress, and its cancel flag.
pub(super) struct TeachStarted {
    pub reply: oneshot::Receiver<TeachOutcome>,
    pub progress: latest::Receiver<TeachProgress>,
    pub cancel: Cancel,
}

/// Checks a teach-in request and hands it to the inference thread, or says why not.
pub(super) fn start_teach(shared: &Shared, ask: &TeachAsk<'_>, logger: &str) -> Result<TeachStarted, String> {
    if let Some(message) = inactive(shared) {
        return Err(message);
    }
    let frames = if ask.num_frames == 0 { DEFAULT_TEACH_FRAMES } else { ask.num_frames };
    let bad_name = |n: &str| n.contains('/') || n.contains("..") || n.starts_with('.');
    let name = if ask.model_name.trim().is_empty() {
        format!("taught_{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
    } else {
        ask.model_name.trim().to_string()
    };
    let method = match ask.method.trim() {
        "" => Ok(None),
        m => m.parse::<Method>().map(Some).map_err(|e| e.to_string()),
    };
    let refusal = if frames < 2 {
        Some(format!("num_frames {frames}: need at least 2 good frames (one to fit, one to calibrate)"))
    } else if frames > MAX_TEACH_FRAMES {
        Some(format!("num_frames {frames}: at most {MAX_TEACH_FRAMES} frames (they are held in memory until the fit)"))
    } else if bad_name(&name) {
        Some(format!("model_name '{name}': use a plain directory name (no '/', no leading '.')"))
    } else {
        method.as_ref().err().cloned()
    };
    if let Some(message) = refusal {
        r2r::log_error!(logger, "teach refused: {message}");
        return Err(message);
    }
    let (reply_tx, reply) = oneshot::channel();
    let (progress_tx, progress) = latest::channel(TeachProgress::default());
    let cancel = Cancel::default();
    let deadline = Instant::now() + timeout_or(ask.timeout_s, DEFAULT_TEACH_TIMEOUT_S);
    shared.mailbox.put_command(Command::Teach(TeachOrder {
        frames: frames as usize,
        name,
        method: method.ok().flatten(),
        deadline,
        progress: progress_tx,
        cancel: cancel.clone(),
        reply: reply_tx,
    }));
    Ok(TeachStarted { reply, progress, cancel })
}

/// A teach-in's reply fields (service response and action result alike).
#[derive(Default)]
pub(super) struct TeachReply {
    pub success: bool,
    pub message: String,
    pub model_path: String,
    pub frames_used: u32,
    pub labels_good: u32,
    pub labels_defective: u32,
    pub fit_seconds: f32,
}

/// The reply to a finished teach-in; a new model becomes the `model` parameter.
pub(super) fn teach_outcome(
    outcome: Result<TeachOutcome, String>,
    params: &Mutex<CheckedParams>,
    node_params: &NodeParamMap,
) -> TeachReply {
    let o = match outcome {
        Ok(o) => o,
        Err(message) => return TeachReply { message, ..Default::default() },
    };
    if o.result.is_ok() {
        model_in_force(params, node_params, &o.model_path);
    }
    TeachReply {
        success: o.result.is_ok(),
        message: match &o.result {
            Ok(id) => format!(
                "model '{id}' fitted on {} frames and {} good + {} defective labels, in use",
                o.frames_used, o.labels_good, o.labels_defective
            ),
            Err(e) => e.clone(),
        },
        model_path: o.model_path.to_string_lossy().into_owned(),
        frames_used: o.frames_used,
        labels_good: o.labels_good,
        labels_defective: o.labels_defective,
        fit_seconds: o.fit_seconds,
    }
}

/// Creates the services and answers them on `rt`.
pub fn spawn_services(
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
                if let Some(message) = inactive(&sh) {
                    let _ = req.respond(Inspect::Response { success: false, message, result: AnomalyResult::default() });
                    return;
                }
                let asked = Instant::now();
                let wait = timeout_or(req.message.timeout_s, DEFAULT_INSPECT_TIMEOUT_S);
                let mut rx = sh.results.subscribe();
                let response = match next_fresh(&mut rx, asked, wait).await {
                    Some(p) => Inspect::Response { success: true, message: String::new(), result: p.result },
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

    // std_srvs/Trigger: any tool can call it; the message is one JSON document.
    let mut describe = node.create_service::<Trigger::Service>("~/describe", qos.clone())?;
    let sh = shared.clone();
    let prm = params.clone();
    let name = node.fully_qualified_name().unwrap_or_default();
    rt.spawn(async move {
        while let Some(req) = describe.next().await {
            let (sh, prm, name) = (sh.clone(), prm.clone(), name.clone());
            tokio::spawn(async move {
                let (tx, rx) = oneshot::channel();
                sh.mailbox.put_command(Command::Describe(tx));
                let model = tokio::time::timeout(Duration::from_secs(10), rx).await.ok().and_then(Result::ok);
                let st = sh.status.locked().clone();
                let in_force = prm.locked().in_force.clone();
                let text = serde_json::json!({
                    "node": name,
                    "lifecycle_state": sh.lifecycle_state().label(),
                    "model": model.unwrap_or_default(),
                    "parameters": parameters_json(in_force),
                    "frames_received": sh.mailbox.received.load(Ordering::Relaxed),
                    "frames_inspected": st.inspected,
                    "frames_rejected": st.rejected,
                    "last_error": st.last_error,
                    "version": env!("CARGO_PKG_VERSION"),
                });
                let _ = req.respond(Trigger::Response { success: true, message: text.to_string() });
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
            let m = &req.message;
            let asked =
                TeachAsk { num_frames: m.num_frames, model_name: &m.model_name, timeout_s: m.timeout_s, method: &m.method };
            let started = start_teach(&sh, &asked, &log);
            let (prm, np) = (prm.clone(), np.clone());
            tokio::spawn(async move {
                let outcome = match started {
                    Ok(t) => t.reply.await.map_err(|_| "node shutting down".to_string()),
                    Err(message) => Err(message),
                };
                let o = teach_outcome(outcome, &prm, &np);
                let response = Teach::Response {
                    success: o.success,
                    message: o.message,
                    model_path: o.model_path,
                    frames_used: o.frames_used,
                    labels_good: o.labels_good,
                    labels_defective: o.labels_defective,
                    fit_seconds: o.fit_seconds,
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
                let mut p = prm.locked();
                let candidate = NodeParams { threshold: f64::from(t), ..p.in_force.clone() };
                match candidate.settings() {
                    Ok(s) => {
                        p.values.threshold = f64::from(t);
                        p.in_force.threshold = f64::from(t);
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
                store(&np, "threshold", r2r::ParameterValue::Double(f64::from(t)));
            }
            let _ = req.respond(response);
        }
    });
    Ok(())
}
