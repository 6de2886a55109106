//! The inference thread: it takes commands and converted frames from the mailbox, inspects
//! each frame with the model in force, publishes the outcome and keeps the status.
//!
//! The thread is long-lived on purpose: every OS thread that runs torch ops builds its own
//! OpenMP pool, and a pool that hops between threads makes frames pay for new pools
//! (PLATFORM.md, 67-157 ms). Teach-in fits run on a thread of their own, beside it.
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;
use r2r::anomaly_inspector_msgs::msg::AnomalyResult;
// tokio's watch channel, named so that no line reads like a libtorch path (tests/layering.rs).
use tokio::sync::watch as latest;
use tokio::sync::{broadcast, oneshot};

use super::labelling::{RecentFrame, RecentFrames, Stamp};
use super::lifecycle::{Lifecycle, State};
use super::mailbox::{Mailbox, PreparedFrame, Work};
use super::params::Settings;
use super::publishing::{FrameInfo, ImagePublishers, ImageThread, ResultPublishers};
use super::status::{median, ErrorLog, Status};
use super::LockOrRecover as _;
use crate::training::{teach, Cancel, FitOptions, FitStage, TeachBase, TeachRequest};
use crate::{InferenceThread, Inspector, InspectorOptions, LabelStore, Method, PinholeCamera, ThreadGovernor};

/// The outcome of a teach-in, for the service reply.
#[derive(Debug)]
pub struct TeachOutcome {
    /// Where the model went (empty on failure).
    pub model_path: PathBuf,
    /// Frames used.
    pub frames_used: u32,
    /// Seconds spent fitting.
    pub fit_seconds: f32,
    /// Good labels (from ~/label) the fit used.
    pub labels_good: u32,
    /// Defective labels the fit used (0 for a method that learns from good images only).
    pub labels_defective: u32,
    /// Model id of the new model, or why it failed.
    pub result: Result<String, String>,
}

impl TeachOutcome {
    fn failed(frames_used: u32, fit_seconds: f32, why: String) -> Self {
        Self { model_path: PathBuf::new(), frames_used, fit_seconds, labels_good: 0, labels_defective: 0, result: Err(why) }
    }
}

/// How far a teach-in is (the ~/teach action's feedback).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TeachProgress {
    /// collecting, fitting or installing.
    pub stage: &'static str,
    /// Good frames collected so far.
    pub frames_collected: u32,
    /// Good frames asked for.
    pub frames_requested: u32,
    /// While fitting: what the fit does now.
    pub fit_step: &'static str,
    /// While fitting: how far that step is.
    pub done: u32,
    /// While fitting: the step's total.
    pub total: u32,
}

/// A teach-in's request, as the services and the action hand it to the inference thread.
pub struct TeachOrder {
    /// Frames to collect.
    pub frames: usize,
    /// Model directory name under model_root.
    pub name: String,
    /// The method to fit (None: the method of the model in force).
    pub method: Option<Method>,
    /// Give up collecting after this.
    pub deadline: Instant,
    /// Progress for the caller (the action's feedback).
    pub progress: latest::Sender<TeachProgress>,
    /// Set by the caller to stop collecting or fitting.
    pub cancel: Cancel,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<TeachOutcome>,
}

/// FitStage as the feedback names it.
fn fit_step(stage: FitStage) -> &'static str {
    match stage {
        FitStage::Loading => "loading",
        FitStage::Training => "training",
        FitStage::Features => "features",
        FitStage::Coreset => "coreset",
        FitStage::Calibration => "calibration",
        FitStage::SelfCheck => "self_check",
    }
}

/// Work for the inference thread besides frames.
pub enum Command {
    /// New parameter values; the reply says whether they are in force (a model that does not
    /// load is refused and the current one stays).
    Settings(Settings, oneshot::Sender<Result<(), String>>),
    /// Load a model directory and switch to it; replies with its id or why not.
    LoadModel(PathBuf, oneshot::Sender<Result<String, String>>),
    /// Collect frames and fit a new model.
    Teach(TeachOrder),
    /// A model fitted by a teach-in, ready to switch to, with its outcome (result to fill in).
    Install(Box<Inspector>, TeachOutcome, oneshot::Sender<TeachOutcome>),
    /// The inference thread's part of a lifecycle transition; the reply says whether it is done.
    Lifecycle(LifecycleStep, oneshot::Sender<Result<(), String>>),
    /// The model in force described ([`Inspector::describe`]); null when none is loaded.
    Describe(oneshot::Sender<serde_json::Value>),
}

/// What a lifecycle transition asks of the inference thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleStep {
    /// configure: load and check the model named by the parameters (an error if it does not load).
    Configure,
    /// deactivate: finish the frame under way, drop waiting frames, end a teach-in.
    Quiesce,
    /// cleanup, shutdown, error processing: as `Quiesce`, then free the model.
    Unload,
}

/// A result with the time its frame arrived (for the inspect service's "fresh frame" rule).
#[derive(Clone)]
pub struct Published {
    /// When the frame arrived at the node.
    pub received: Instant,
    /// The result as published.
    pub result: AnomalyResult,
}

/// Shared between the inference thread and the async side (subscriptions, services,
/// diagnostics).
pub struct Shared {
    /// Frames and commands for the inference thread.
    pub mailbox: Mailbox<Command>,
    /// Status for diagnostics and services.
    pub status: Mutex<Status>,
    /// Latest camera intrinsics from camera_info.
    pub camera: Mutex<Option<PinholeCamera>>,
    /// Every published result, for the inspect service.
    pub results: broadcast::Sender<Published>,
    /// The lifecycle state: frames are taken and inspected only when it is active.
    pub lifecycle: Mutex<Lifecycle>,
    /// The last frames inspected, for ~/label.
    pub recent: Mutex<RecentFrames>,
}

impl Shared {
    /// The lifecycle state now.
    pub fn lifecycle_state(&self) -> State {
        self.lifecycle.locked().state()
    }

    /// Whether frames are inspected (lifecycle state active).
    pub fn is_active(&self) -> bool {
        self.lifecycle_state() == State::Active
    }
}

/// A teach-in collecting frames.
struct TeachJob {
    order: TeachOrder,
    collected: Vec<RgbImage>,
}

impl TeachJob {
    fn report(&self) {
        let frames_collected = self.collected.len() as u32;
        let frames_requested = self.order.frames as u32;
        let p = TeachProgress { stage: "collecting", frames_collected, frames_requested, ..Default::default() };
        let _ = self.order.progress.send(p);
    }
}

fn inspector_options(settings: &Settings) -> InspectorOptions {
    InspectorOptions { device: settings.device, threshold: settings.threshold, postprocess: settings.postprocess.clone() }
}

/// Loads and checks a model on the configured device, logging what happened.
fn load_inspector(path: &std::path::Path, settings: &Settings, logger: &str) -> Result<Inspector, String> {
    let mut warn = |w: String| r2r::log_error!(logger, "{w}");
    let insp = Inspector::load_checked(path, &inspector_options(settings), &mut warn).map_err(|e| e.to_string())?;
    r2r::log_info!(
        logger,
        "model '{}' ({}) loaded from {} on device {}",
        insp.model_id(),
        insp.method(),
        path.display(),
        insp.device_name()
    );
    Ok(insp)
}

fn update_status_model(status: &Mutex<Status>, inspector: Option<&Inspector>) {
    let mut st = status.locked();
    st.model_id = inspector.map(|i| i.model_id().to_string());
    st.method = inspector.map(|i| i.method().to_string()).unwrap_or_default();
    st.device = inspector.map(Inspector::device_name).unwrap_or_default();
}

/// The inference thread's state between frames.
struct InferenceLoop {
    shared: Arc<Shared>,
    settings: Settings,
    inspector: Option<Inspector>,
    teach: Option<TeachJob>,
    errors: ErrorLog,
    logger: String,
    /// Configured (lifecycle): a model was asked for. Unconfigured, parameter changes of
    /// `model` are only noted and `~/load_model` is refused.
    configured: bool,
}

/// The inference thread's loop; returns when the mailbox is closed. `configure_now`: load the
/// model at once (an unmanaged node); else wait for the lifecycle's configure.
pub fn run(
    shared: Arc<Shared>,
    settings: Settings,
    results: ResultPublishers,
    images: ImagePublishers,
    logger: String,
    configure_now: bool,
) {
    let _inference = InferenceThread::enter(settings.inference_threads);
    // Before the first model is built: each keeps the format it was built with.
    crate::set_precision(settings.precision);
    // inference_threads 0: as many threads as other processes leave cores free, re-read each second.
    let mut governor = settings.inference_threads.is_none().then(ThreadGovernor::new);
    let loaded = if configure_now { load_inspector(&settings.model, &settings, &logger).map(Some) } else { Ok(None) };
    let inspector = match loaded {
        Ok(i) => i,
        Err(e) => {
            r2r::log_error!(
                &logger,
                "cannot load model: {e}. Frames are dropped until a valid model is set \
                 (parameter 'model', or the ~/load_model or ~/teach service)"
            );
            None
        }
    };
    update_status_model(&shared.status, inspector.as_ref());
    let mut state = InferenceLoop {
        errors: ErrorLog::new(&logger),
        shared: shared.clone(),
        settings,
        inspector,
        teach: None,
        logger,
        configured: configure_now,
    };
    let mut images = match ImageThread::start(images) {
        Ok(t) => t,
        Err(e) => {
            r2r::log_error!(&state.logger, "cannot start the image output thread: {e}; the node stops inspecting");
            return;
        }
    };
    let conversion = {
        let shared = shared.clone();
        std::thread::Builder::new().name("frame_conversion".into()).spawn(move || shared.mailbox.convert_frames())
    };
    let conversion = match conversion {
        Ok(c) => c,
        Err(e) => {
            r2r::log_error!(&state.logger, "cannot start the frame conversion thread: {e}; the node stops inspecting");
            images.stop();
            return;
        }
    };

    while let Some(work) = shared.mailbox.take(Duration::from_millis(200)) {
        state.expire_teach_in();
        match work {
            Work::Tick => {}
            Work::Command(cmd) => state.handle_command(cmd),
            Work::Frame(frame) => {
                if let Some(threads) = governor.as_mut().and_then(ThreadGovernor::update) {
                    r2r::log_debug!(&state.logger, "inference threads now {threads} (the cores other processes leave free)");
                }
                state.inspect(frame, &results, &mut images)
            }
        }
    }
    let skipped = images.stop();
    let _ = conversion.join();
    let st = shared.status.locked().clone();
    r2r::log_info!(
        &state.logger,
        "inference thread stopped: {} frames inspected, {} dropped as stale, {} rejected; \
         images of {} frames skipped while the image thread was busy; last {} frames: latency median \
         {:.2} ms, node overhead (conversion, ROI, messages) median {:.2} ms, waiting for inference median {:.2} ms",
        st.inspected,
        shared.mailbox.dropped.load(Ordering::Relaxed),
        st.rejected,
        skipped,
        st.recent_latency_ms.len(),
        median(&st.recent_latency_ms),
        median(&st.recent_overhead_ms),
        median(&st.recent_wait_ms)
    );
}

impl InferenceLoop {
    /// A teach-in that ran out of time or was cancelled fails; nothing else changes.
    fn expire_teach_in(&mut self) {
        let ended = |j: &TeachJob| Instant::now() > j.order.deadline || j.order.cancel.is_cancelled();
        if !self.teach.as_ref().is_some_and(ended) {
            return;
        }
        if let Some(job) = self.teach.take() {
            let (got, asked) = (job.collected.len(), job.order.frames);
            let msg = if job.order.cancel.is_cancelled() {
                format!("cancelled after collecting {got} of {asked} frames")
            } else {
                format!("collected {got} of {asked} frames before the timeout: is the camera publishing?")
            };
            r2r::log_error!(&self.logger, "teach-in failed: {msg}");
            let _ = job.order.reply.send(TeachOutcome::failed(0, 0.0, msg));
        }
    }

    /// Inspects one converted frame and publishes the outcome; a frame that cannot be used is
    /// logged (once per kind) and counted.
    fn inspect(&mut self, frame: PreparedFrame, results: &ResultPublishers, images: &mut ImageThread) {
        let PreparedFrame { header, received, rgb, convert_ms } = frame;
        let taken = Instant::now();
        let shared = &self.shared;
        // Taken just before a deactivation: not inspected.
        if !shared.is_active() {
            return;
        }
        let Some(insp) = self.inspector.as_ref() else {
            self.errors.report(&shared.status, "no_model", "no model loaded".into());
            return;
        };
        let rgb = match rgb {
            Ok(rgb) => rgb,
            Err((e, described)) => {
                self.errors.report(&shared.status, e.kind(), format!("frame {described}: {e}"));
                return;
            }
        };
        let (inspection, part) = match insp.inspect_within(&rgb, self.settings.roi) {
            Ok(i) => i,
            Err(e) => {
                self.errors.report(&shared.status, e.kind(), format!("inspection failed: {e}"));
                return;
            }
        };
        shared.mailbox.inspection_done(inspection.elapsed.as_secs_f64() * 1e3);
        let rgb = Arc::new(rgb);
        let recent = RecentFrame { stamp: Stamp::of(&header.stamp), frame: rgb.clone(), roi: self.settings.roi };
        shared.recent.locked().keep(self.settings.label_buffer_frames, recent);
        if let Some(job) = self.teach.as_mut() {
            // Teach-in learns what the model sees: the ROI when one is set.
            job.collected.push(part.unwrap_or_else(|| rgb.as_ref().clone()));
            job.report();
            if job.collected.len() >= job.order.frames {
                if let Some(job) = self.teach.take() {
                    start_fit(job, shared, &self.settings, insp, &self.logger);
                }
            }
        }
        let camera = *shared.camera.locked();
        let info = FrameInfo { header: &header, received, model_id: insp.model_id(), method: insp.method() };
        let result = results.publish(&info, &inspection, camera.as_ref(), &self.settings, &self.logger);
        let latency_ms = received.elapsed().as_secs_f64() * 1e3;
        let inspect_ms = inspection.elapsed.as_secs_f64() * 1e3;
        if self.settings.publish_images {
            // Drawn and published on the image thread while the next frame is inspected.
            images.offer(&header, inspection, rgb);
        }
        let first = {
            let mut st = shared.status.locked();
            let own_ms = convert_ms + taken.elapsed().as_secs_f64() * 1e3 - inspect_ms;
            st.record(latency_ms, own_ms, (latency_ms - inspect_ms - own_ms).max(0.0));
            st.inspected == 1
        };
        let _ = shared.results.send(Published { received, result });
        if first {
            r2r::log_info!(&self.logger, "first frame inspected in {inspect_ms:.1} ms");
        }
    }

    fn handle_command(&mut self, cmd: Command) {
        let logger = self.logger.as_str();
        match cmd {
            Command::Settings(mut new, reply) => {
                let mut outcome = Ok(());
                // Unconfigured, the new model is only noted: configure loads it.
                if new.model != self.settings.model && self.configured {
                    match load_inspector(&new.model, &new, logger) {
                        Ok(i) => self.inspector = Some(i),
                        Err(e) => {
                            r2r::log_error!(logger, "cannot load model {}: {e}; the current model stays", new.model.display());
                            // The model in force stays the one teach-ins take their backbone from.
                            new.model = self.settings.model.clone();
                            outcome = Err(e);
                        }
                    }
                }
                if let Some(insp) = self.inspector.as_mut() {
                    if let Err(e) = insp.set_threshold(new.threshold) {
                        r2r::log_error!(logger, "{e}");
                    }
                    insp.set_postprocess(&new.postprocess);
                }
                self.settings = new;
                let _ = reply.send(outcome);
            }
            Command::LoadModel(_, reply) if !self.configured => {
                let state = self.shared.lifecycle_state().label();
                let _ = reply.send(Err(format!(
                    "the node is {state} (lifecycle): configure it first, which loads the model named by parameter 'model' \
                     (ros2 lifecycle set <node> configure)"
                )));
            }
            Command::LoadModel(path, reply) => {
                let outcome = load_inspector(&path, &self.settings, logger).map(|i| {
                    let id = i.model_id().to_string();
                    self.inspector = Some(i);
                    self.settings.model = path.clone();
                    id
                });
                if let Err(e) = &outcome {
                    r2r::log_error!(logger, "cannot load model {}: {e}; the current model stays", path.display());
                }
                let _ = reply.send(outcome);
            }
            Command::Teach(order) => {
                if self.teach.is_some() {
                    let _ = order.reply.send(TeachOutcome::failed(0, 0.0, "a teach-in is already running".into()));
                } else if self.inspector.is_none() {
                    // Frames are only collected after inspection, which needs a model.
                    let _ = order.reply.send(TeachOutcome::failed(
                        0,
                        0.0,
                        "no model is loaded to take the configuration from; load one first (~/load_model)".into(),
                    ));
                } else if let Some(taken) = [order.name.clone(), format!("{}.frames", order.name)]
                    .iter()
                    .map(|n| self.settings.model_root.join(n))
                    .find(|p| p.exists())
                {
                    let why = format!("{} exists and a teach-in never overwrites: choose another model_name", taken.display());
                    let _ = order.reply.send(TeachOutcome::failed(0, 0.0, why));
                } else {
                    r2r::log_info!(logger, "teach-in: collecting {} good frames for model '{}'", order.frames, order.name);
                    let job = TeachJob { collected: Vec::with_capacity(order.frames), order };
                    job.report();
                    self.teach = Some(job);
                }
            }
            Command::Install(insp, mut outcome, reply) => {
                let id = insp.model_id().to_string();
                r2r::log_info!(logger, "teach-in: switching to the new model '{id}' ({})", outcome.model_path.display());
                let mut insp = *insp;
                let _ = insp.set_threshold(self.settings.threshold);
                insp.set_postprocess(&self.settings.postprocess);
                self.inspector = Some(insp);
                self.settings.model = outcome.model_path.clone();
                outcome.result = Ok(id);
                let _ = reply.send(outcome);
            }
            Command::Lifecycle(step, reply) => {
                let _ = reply.send(self.lifecycle_step(step));
            }
            Command::Describe(reply) => {
                let _ = reply.send(self.inspector.as_ref().map(Inspector::describe).unwrap_or_default());
            }
        }
        update_status_model(&self.shared.status, self.inspector.as_ref());
    }
}

impl InferenceLoop {
    /// The inference thread's part of a lifecycle transition. Frames stop at the subscription
    /// once the state leaves active; the ones already waiting are dropped here.
    fn lifecycle_step(&mut self, step: LifecycleStep) -> Result<(), String> {
        let logger = self.logger.as_str();
        if step != LifecycleStep::Configure {
            self.shared.mailbox.discard_frames();
            if let Some(job) = self.teach.take() {
                let why = format!("teach-in ended by the lifecycle ({step:?}) after {} frames", job.collected.len());
                r2r::log_warn!(logger, "{why}");
                let _ = job.order.reply.send(TeachOutcome::failed(0, 0.0, why));
            }
        }
        match step {
            LifecycleStep::Configure => {
                let model = self.settings.model.clone();
                let inspector = load_inspector(&model, &self.settings, logger)
                    .map_err(|e| format!("cannot load model {}: {e}", model.display()))?;
                self.inspector = Some(inspector);
                self.configured = true;
            }
            LifecycleStep::Quiesce => {}
            LifecycleStep::Unload => {
                if let Some(insp) = self.inspector.take() {
                    r2r::log_info!(logger, "model '{}' freed", insp.model_id());
                }
                self.configured = false;
            }
        }
        Ok(())
    }
}

/// Fits the taught model on a thread of its own, so inspection goes on meanwhile; the frames and
/// the labels it learned from are kept beside the model (`<model>.frames/`, an MVTec-layout data
/// set) so the teach-in can be audited and redone.
fn start_fit(job: TeachJob, shared: &Arc<Shared>, settings: &Settings, current: &Inspector, logger: &str) {
    let TeachJob { order, collected } = job;
    let base = TeachBase::of(current);
    let method = order.method.unwrap_or_else(|| base.method());
    let request = TeachRequest {
        out: settings.model_root.join(&order.name),
        frames_dir: settings.model_root.join(format!("{}.frames", order.name)),
        name: order.name.clone(),
        method,
        labels: Some(LabelStore::new(&settings.model_root.join("labels"))),
    };
    let shared = shared.clone();
    let log = logger.to_string();
    r2r::log_info!(
        logger,
        "teach-in: {} frames collected, fitting {} with {} and the labels in {}",
        collected.len(),
        request.out.display(),
        method.as_str(),
        settings.model_root.join("labels").display()
    );
    let spawned = std::thread::Builder::new().name("teach-fit".into()).spawn(move || {
        let t0 = Instant::now();
        let n = collected.len() as u32;
        let options = FitOptions { cancel: order.cancel.clone(), ..FitOptions::default() };
        let (frames_collected, frames_requested) = (n, order.frames as u32);
        let mut progress = |stage: FitStage, done: usize, total: usize| {
            let p = TeachProgress {
                stage: "fitting",
                frames_collected,
                frames_requested,
                fit_step: fit_step(stage),
                done: done as u32,
                total: total as u32,
            };
            let _ = order.progress.send(p);
        };
        let fitted = teach(&collected, &base, &request, &options, &mut progress);
        let secs = t0.elapsed().as_secs_f32();
        match fitted {
            Ok(taught) => {
                if let Some(check) = &taught.inspector.manifest().training.self_check {
                    r2r::log_info!(&log, "teach-in: {check}");
                }
                let unused = if taught.used_defective { 0 } else { taught.labels.defective };
                if unused > 0 {
                    r2r::log_warn!(
                        &log,
                        "teach-in: {unused} defective labels kept but not used: {} learns from good frames only",
                        method.as_str()
                    );
                }
                let _ = order.progress.send(TeachProgress {
                    stage: "installing",
                    frames_collected,
                    frames_requested,
                    ..Default::default()
                });
                let outcome = TeachOutcome {
                    model_path: request.out,
                    frames_used: n,
                    fit_seconds: secs,
                    labels_good: taught.labels.good as u32,
                    labels_defective: (taught.labels.defective - unused) as u32,
                    result: Err(String::new()),
                };
                shared.mailbox.put_command(Command::Install(Box::new(taught.inspector), outcome, order.reply))
            }
            Err(e) => {
                r2r::log_error!(&log, "teach-in failed: {e}");
                let _ = order.reply.send(TeachOutcome::failed(n, secs, e.to_string()));
            }
        }
    });
    if let Err(e) = spawned {
        r2r::log_error!(logger, "teach-in: cannot start the fitting thread: {e}");
    }
}
