//! The inference thread and its mailbox.
//!
//! The mailbox holds at most one frame (the newest; a replaced frame is counted as dropped, so
//! latency never grows when frames arrive faster than inference) and a queue of commands
//! (parameter changes, model loads, teach-in), which go first. The thread is long-lived on
//! purpose: every OS thread that runs torch ops builds its own OpenMP pool, and a pool that
//! hops between threads makes frames pay for new pools (PLATFORM.md, 67-157 ms).
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;
use r2r::anomaly_inspector_msgs::msg::AnomalyResult;
use r2r::sensor_msgs::msg::{CompressedImage, Image};
use r2r::std_msgs::msg::{Bool, Float32, Header};
use r2r::visualization_msgs::msg::MarkerArray;
use tokio::sync::{broadcast, oneshot};

use super::convert;
use super::outputs;
use super::params::{Roi, Settings};
use crate::camera::PinholeCamera;
use crate::inspector::{Inspection, Inspector};
use crate::postprocess::{heatmap, overlay};

/// A camera frame as it arrived.
pub enum Frame {
    /// sensor_msgs/Image.
    Raw(Image),
    /// sensor_msgs/CompressedImage.
    Compressed(CompressedImage),
}

impl Frame {
    fn into_header(self) -> Header {
        match self {
            Frame::Raw(m) => m.header,
            Frame::Compressed(m) => m.header,
        }
    }

    fn describe(&self) -> String {
        use crate::imaging::printable;
        match self {
            Frame::Raw(m) => format!(
                "{}x{} '{}' (step {}, {} bytes, is_bigendian {})",
                m.width,
                m.height,
                printable(&m.encoding, 40),
                m.step,
                m.data.len(),
                m.is_bigendian
            ),
            Frame::Compressed(m) => format!("compressed '{}' ({} bytes)", printable(&m.format, 40), m.data.len()),
        }
    }

    fn to_rgb(&self) -> crate::Result<RgbImage> {
        match self {
            Frame::Raw(m) => convert::image_to_rgb(m),
            Frame::Compressed(m) => convert::compressed_to_rgb(m),
        }
    }
}

/// The outcome of a teach-in, for the service reply.
#[derive(Debug)]
pub struct TeachOutcome {
    /// Where the model went (empty on failure).
    pub model_path: PathBuf,
    /// Frames used.
    pub frames_used: u32,
    /// Seconds spent fitting.
    pub fit_seconds: f32,
    /// Model id of the new model, or why it failed.
    pub result: Result<String, String>,
}

/// Work for the inference thread besides frames.
pub enum Command {
    /// New parameter values; the reply says whether they are in force (a model that does not
    /// load is refused and the current one stays).
    Settings(Settings, oneshot::Sender<Result<(), String>>),
    /// Load a model directory and switch to it; replies with its id or why not.
    LoadModel(PathBuf, oneshot::Sender<Result<String, String>>),
    /// Collect frames and fit a new model.
    Teach {
        /// Frames to collect.
        frames: usize,
        /// Model directory name under model_root.
        name: String,
        /// Give up collecting after this.
        deadline: Instant,
        /// Where the outcome goes.
        reply: oneshot::Sender<TeachOutcome>,
    },
    /// A model fitted by a teach-in, ready to switch to.
    Install(Box<Inspector>, PathBuf, u32, f32, oneshot::Sender<TeachOutcome>),
}

/// A frame converted to RGB by the conversion thread (or why it could not be).
pub struct PreparedFrame {
    /// The frame's header, copied into every output.
    pub header: Header,
    /// When the frame arrived at the node.
    pub received: Instant,
    /// The frame as RGB, or the conversion error with a description of the frame.
    pub rgb: Result<RgbImage, (crate::Error, String)>,
    /// Time the conversion took, ms.
    pub convert_ms: f64,
}

enum Work {
    Frame(PreparedFrame),
    Command(Command),
    Tick,
}

/// The newest frame, its converted successor and the command queue, shared by the subscription
/// callbacks, the conversion thread and the inference thread.
///
/// Two stages, so that converting (and decoding) frame n+1 overlaps inspecting frame n: the
/// conversion thread takes the newest raw frame when the inference thread is about to need it
/// (its expected end less the expected conversion time, or at once when it waits), so no work
/// is spent on frames that would be replaced and the frame inspected is as fresh as without
/// the overlap. No torch op runs on the conversion thread: a second OpenMP pool on the same
/// cores slows inference (measured: 70 vs 47 ms per frame; examples/omp_pools.rs).
#[derive(Default)]
pub struct Mailbox {
    state: Mutex<MailboxState>,
    /// Signals the inference thread: a command or a converted frame.
    work_ready: Condvar,
    /// Signals the conversion thread: a raw frame, a free slot, or the inference thread waiting.
    raw_ready: Condvar,
    /// Frames replaced before inference could take them.
    pub dropped: AtomicU64,
    /// Frames received.
    pub received: AtomicU64,
}

#[derive(Default)]
struct MailboxState {
    frame: Option<(Frame, Instant)>,
    prepared: Option<PreparedFrame>,
    commands: VecDeque<Command>,
    closed: bool,
    /// The inference thread is waiting for work.
    inference_idle: bool,
    /// When the conversion of the next frame should start: the inference thread's expected end
    /// less the expected conversion time.
    convert_not_before: Option<Instant>,
    /// Running means (ms) of conversion and of inspection, for the timing above.
    convert_ms: f64,
    inspect_ms: f64,
}

/// Running mean with weight 1/8 on the newest value (the first value is taken as it is).
fn running_mean(mean: f64, value: f64) -> f64 {
    if mean == 0.0 {
        value
    } else {
        mean + (value - mean) / 8.0
    }
}

impl Mailbox {
    /// Puts a frame; a frame still waiting is replaced and counted as dropped.
    pub fn put_frame(&self, frame: Frame) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.frame.replace((frame, Instant::now())).is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.raw_ready.notify_one();
    }

    /// Queues a command (handled before the next frame).
    pub fn put_command(&self, command: Command) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.commands.push_back(command);
        self.work_ready.notify_one();
    }

    /// Stops the conversion and inference threads.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.work_ready.notify_all();
        self.raw_ready.notify_all();
    }

    /// The conversion thread: raw frames -> RGB, one ahead of inference, until closed.
    fn convert_frames(&self) {
        loop {
            let (frame, received) = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if s.closed {
                        return;
                    }
                    let now = Instant::now();
                    let waiting = s.frame.is_some() && s.prepared.is_none();
                    let due = s.inference_idle || s.convert_not_before.is_none_or(|t| now >= t);
                    if waiting && due {
                        break;
                    }
                    s = match (waiting, s.convert_not_before) {
                        (true, Some(t)) => self.raw_ready.wait_timeout(s, t - now).unwrap_or_else(|e| e.into_inner()).0,
                        _ => self.raw_ready.wait(s).unwrap_or_else(|e| e.into_inner()),
                    };
                }
                s.frame.take().expect("checked above")
            };
            let t0 = Instant::now();
            let rgb = guarded("frame conversion", || frame.to_rgb()).map_err(|e| (e, frame.describe()));
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let header = frame.into_header();
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.convert_ms = running_mean(s.convert_ms, ms);
            s.prepared = Some(PreparedFrame { header, received, rgb, convert_ms: ms });
            self.work_ready.notify_one();
        }
    }

    /// Called by the inference thread when it has inspected a frame in `ms`.
    fn inspection_done(&self, ms: f64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.inspect_ms = running_mean(s.inspect_ms, ms);
    }

    fn take(&self, tick: Duration) -> Option<Work> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + tick;
        loop {
            if s.closed {
                return None;
            }
            if let Some(c) = s.commands.pop_front() {
                s.inference_idle = false;
                return Some(Work::Command(c));
            }
            if let Some(f) = s.prepared.take() {
                s.inference_idle = false;
                // The next conversion is due when this frame's inspection is about to end. Set
                // here, under the same lock that frees the slot: set later, the conversion
                // thread would see the previous frame's (past) time and convert at once, and
                // the frame would wait a whole inspection (measured: 38 ms median at 60 Hz).
                let lead = Duration::from_secs_f64((s.inspect_ms - s.convert_ms).max(0.0) / 1e3);
                s.convert_not_before = Some(Instant::now() + lead);
                self.raw_ready.notify_one();
                return Some(Work::Frame(f));
            }
            let now = Instant::now();
            if now >= deadline {
                s.inference_idle = false;
                return Some(Work::Tick);
            }
            if !s.inference_idle {
                s.inference_idle = true;
                self.raw_ready.notify_one();
            }
            s = self.work_ready.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// What the node reports on /diagnostics and in service errors.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Model id, when one is loaded.
    pub model_id: Option<String>,
    /// Method of the loaded model.
    pub method: String,
    /// Device description.
    pub device: String,
    /// Frames inspected.
    pub inspected: u64,
    /// Frames refused (bad data, no model...).
    pub rejected: u64,
    /// Frames refused, by kind (the [`crate::error::FrameFault`] names, `no_model`, ...).
    pub rejected_by_kind: BTreeMap<&'static str, u64>,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Latencies (frame received -> result published) of recent frames, ms.
    pub recent_latency_ms: VecDeque<f64>,
    /// The node's own work in each of those latencies, ms: conversion, ROI, messages (the
    /// time the inference thread spent on the frame less [`Inspection::elapsed`], plus the
    /// conversion), measured on the same frame so that a busy machine slows both sides alike.
    pub recent_overhead_ms: VecDeque<f64>,
    /// The rest of each latency, ms: waiting for the inference thread (an earlier frame's
    /// inspection) and for the conversion thread, i.e. queueing when frames come fast.
    pub recent_wait_ms: VecDeque<f64>,
    /// Times of recent inspections, for the rate.
    pub recent_times: VecDeque<Instant>,
}

impl Status {
    fn record(&mut self, latency_ms: f64, overhead_ms: f64, wait_ms: f64) {
        self.inspected += 1;
        let now = Instant::now();
        for (recent, value) in [
            (&mut self.recent_latency_ms, latency_ms),
            (&mut self.recent_overhead_ms, overhead_ms),
            (&mut self.recent_wait_ms, wait_ms),
        ] {
            recent.push_back(value);
            if recent.len() > 100 {
                recent.pop_front();
            }
        }
        self.recent_times.push_back(now);
        while self.recent_times.front().is_some_and(|t| now.duration_since(*t) > Duration::from_secs(5)) {
            self.recent_times.pop_front();
        }
    }

    /// Inspections per second over the last 5 s.
    pub fn rate_hz(&self) -> f64 {
        match (self.recent_times.front(), self.recent_times.back()) {
            (Some(a), Some(b)) if self.recent_times.len() > 1 && b > a => {
                (self.recent_times.len() - 1) as f64 / b.duration_since(*a).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// A result with the time its frame arrived (for the inspect service's "fresh frame" rule).
#[derive(Clone)]
pub struct Published {
    /// When the frame arrived at the node.
    pub received: Instant,
    /// The result as published.
    pub result: AnomalyResult,
}

/// Everything the inference thread publishes to.
pub struct Publishers {
    /// anomaly/result
    pub result: r2r::Publisher<AnomalyResult>,
    /// anomaly/score
    pub score: r2r::Publisher<Float32>,
    /// anomaly/verdict (latched)
    pub verdict: r2r::Publisher<Bool>,
    /// anomaly/heatmap
    pub heatmap: r2r::Publisher<Image>,
    /// anomaly/overlay
    pub overlay: r2r::Publisher<Image>,
    /// anomaly/map (32FC1)
    pub map: r2r::Publisher<Image>,
    /// anomaly/markers
    pub markers: r2r::Publisher<MarkerArray>,
}

/// Shared state between the inference thread and the async side.
pub struct Shared {
    /// The mailbox.
    pub mailbox: Mailbox,
    /// Status for diagnostics and services.
    pub status: Mutex<Status>,
    /// Latest camera intrinsics from camera_info.
    pub camera: Mutex<Option<PinholeCamera>>,
    /// Every published result, for the inspect service.
    pub results: broadcast::Sender<Published>,
}

/// Logs the first error of each kind and counts the rest, so a camera sending a bad encoding at
/// 30 Hz does not flood the log.
struct ErrorLog {
    logger: String,
    seen: HashSet<&'static str>,
}

impl ErrorLog {
    fn report(&mut self, shared: &Shared, kind: &'static str, message: String) {
        if self.seen.insert(kind) {
            r2r::log_error!(&self.logger, "{message} (frame dropped; further '{kind}' errors are counted, not logged)");
        }
        let mut st = shared.status.lock().unwrap_or_else(|e| e.into_inner());
        st.rejected += 1;
        *st.rejected_by_kind.entry(kind).or_default() += 1;
        st.last_error = Some(message);
    }
}

/// The kind under which an error is logged once and counted.
fn error_kind(e: &crate::Error) -> &'static str {
    match e {
        crate::Error::Frame { fault, .. } => fault.as_str(),
        crate::Error::BadImage(_) => "bad_image",
        crate::Error::Decode(_) => "decode",
        crate::Error::Io { .. } => "io",
        crate::Error::Model { .. } => "model",
        crate::Error::Config(_) => "config",
        crate::Error::Dataset { .. } => "dataset",
        crate::Error::Torch(_) => "inference",
    }
}

/// Runs `f`, turning a panic (a bug in a decoder or in libtorch) into an error, so that one frame
/// can never take the inference thread, and with it the node's service, down.
fn guarded<T>(what: &str, f: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(crate::Error::Torch(tch::TchError::Torch(format!("internal error in {what}: {why}"))))
    })
}

/// Loads a model on the configured device, logging what happened.
pub fn load_inspector(path: &std::path::Path, settings: &Settings, logger: &str) -> Result<Inspector, String> {
    let device = crate::device::resolve(settings.device).unwrap_or_else(|e| {
        r2r::log_error!(logger, "{e}; falling back to the CPU");
        tch::Device::Cpu
    });
    let mut insp = guarded("model loading", || Inspector::new(path, device, &settings.postprocess)).map_err(|e| e.to_string())?;
    insp.set_threshold(settings.threshold).map_err(|e| e.to_string())?;
    // A model whose files load but cannot score (a memory bank of the wrong width, NaN from a
    // damaged file) would fail on every frame: refuse it now, while the current one can stay.
    let probe = RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
    match guarded("the test frame", || insp.inspect(&probe)) {
        Ok(i) if i.raw_score.is_finite() => {}
        Ok(i) => {
            return Err(format!(
                "model {}: a plain grey test frame scores {} (not a finite number): the model files are damaged; \
                 re-fit the model or copy it again",
                path.display(),
                i.raw_score
            ))
        }
        Err(e) => {
            return Err(format!(
                "model {}: fails on a plain grey test frame ({e}): the model files are damaged or do not fit \
                 together; re-fit the model",
                path.display()
            ))
        }
    }
    r2r::log_info!(
        logger,
        "model '{}' ({}) loaded from {} on device {}",
        insp.model_id(),
        insp.method(),
        path.display(),
        crate::device::describe(insp.device())
    );
    Ok(insp)
}

/// The `roi` part of `rgb`, with its offset; an error when it does not lie inside the frame.
fn crop(rgb: &RgbImage, r: Roi) -> crate::Result<(RgbImage, u32, u32)> {
    let (w, h) = rgb.dimensions();
    if u64::from(r.x) + u64::from(r.width) > u64::from(w) || u64::from(r.y) + u64::from(r.height) > u64::from(h) {
        return Err(crate::Error::frame(
            crate::error::FrameFault::RoiOutsideFrame,
            format!(
                "roi [{}, {}, {}, {}] exceeds the {w}x{h} frame: set parameter 'roi' to a part of the frame",
                r.x, r.y, r.width, r.height
            ),
        ));
    }
    Ok((image::imageops::crop_imm(rgb, r.x, r.y, r.width, r.height).to_image(), r.x, r.y))
}

/// Inspects `rgb` (or its ROI) and returns the inspection in full-frame pixels, with the ROI's
/// pixels when there is one (the frame itself is not copied when there is none).
fn inspect_frame(insp: &Inspector, rgb: &RgbImage, roi: Option<Roi>) -> crate::Result<(Inspection, Option<RgbImage>)> {
    let Some(roi) = roi else { return Ok((insp.inspect(rgb)?, None)) };
    let (part, dx, dy) = crop(rgb, roi)?;
    let mut inspection = insp.inspect(&part)?;
    inspection.map = inspection.map.placed_in(rgb.width(), rgb.height(), dx, dy)?;
    inspection.regions = inspection.regions.iter().map(|r| r.offset(dx, dy)).collect();
    Ok((inspection, Some(part)))
}

struct TeachJob {
    frames: usize,
    name: String,
    deadline: Instant,
    collected: Vec<RgbImage>,
    reply: oneshot::Sender<TeachOutcome>,
}

/// The inference thread's loop; returns when the mailbox is closed.
pub fn run(shared: Arc<Shared>, mut settings: Settings, pubs: Publishers, logger: String) {
    let _guard = tch::no_grad_guard();
    if let Some(n) = settings.inference_threads {
        // Before the first torch op of this thread, so that its OpenMP pool has this size.
        tch::set_num_threads(n as i32);
    }
    let mut inspector = match load_inspector(&settings.model, &settings, &logger) {
        Ok(i) => Some(i),
        Err(e) => {
            r2r::log_error!(
                &logger,
                "cannot load model: {e}. Frames are dropped until a valid model is set \
                 (parameter 'model', or the ~/load_model or ~/teach service)"
            );
            None
        }
    };
    update_status_model(&shared, inspector.as_ref());
    let mut errors = ErrorLog { logger: logger.clone(), seen: HashSet::new() };
    let mut teach: Option<TeachJob> = None;
    let Publishers {
        result: result_pub,
        score: score_pub,
        verdict: verdict_pub,
        heatmap: heatmap_pub,
        overlay: overlay_pub,
        map: map_pub,
        markers: markers_pub,
    } = pubs;
    let (images, image_jobs) = std::sync::mpsc::sync_channel::<ImageJob>(1);
    let image_thread = std::thread::Builder::new()
        .name("image_outputs".into())
        .spawn(move || publish_images(image_jobs, map_pub, heatmap_pub, overlay_pub))
        .expect("start the image output thread");
    let mut images_skipped: u64 = 0;
    let conversion = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("frame_conversion".into())
            .spawn(move || shared.mailbox.convert_frames())
            .expect("start the frame conversion thread")
    };

    while let Some(work) = shared.mailbox.take(Duration::from_millis(200)) {
        // A teach-in that ran out of time fails; nothing else changes.
        if teach.as_ref().is_some_and(|j| Instant::now() > j.deadline) {
            let job = teach.take().expect("checked");
            let msg = format!(
                "collected {} of {} frames before the timeout: is the camera publishing?",
                job.collected.len(),
                job.frames
            );
            r2r::log_error!(&logger, "teach-in failed: {msg}");
            let _ =
                job.reply.send(TeachOutcome { model_path: PathBuf::new(), frames_used: 0, fit_seconds: 0.0, result: Err(msg) });
        }
        let PreparedFrame { header, received, rgb, convert_ms } = match work {
            Work::Tick => continue,
            Work::Command(cmd) => {
                handle_command(cmd, &shared, &mut settings, &mut inspector, &mut teach, &logger);
                continue;
            }
            Work::Frame(f) => f,
        };
        let taken = Instant::now();
        let Some(insp) = inspector.as_ref() else {
            errors.report(&shared, "no_model", "no model loaded".into());
            continue;
        };
        let rgb = match rgb {
            Ok(rgb) => rgb,
            Err((e, described)) => {
                errors.report(&shared, error_kind(&e), format!("frame {described}: {e}"));
                continue;
            }
        };
        let inspected = guarded("inspection", || inspect_frame(insp, &rgb, settings.roi));
        let (inspection, part) = match inspected {
            Ok(i) => i,
            Err(e) => {
                errors.report(&shared, error_kind(&e), format!("inspection failed: {e}"));
                continue;
            }
        };
        shared.mailbox.inspection_done(inspection.elapsed.as_secs_f64() * 1e3);
        if let Some(job) = teach.as_mut() {
            // Teach-in learns what the model sees: the ROI when one is set.
            job.collected.push(part.unwrap_or_else(|| rgb.clone()));
            if job.collected.len() >= job.frames {
                start_fit(teach.take().expect("present"), &shared, &settings, insp, &logger);
            }
        }
        let header = &header;
        let result = convert::result_msg(header, &inspection, insp.model_id(), insp.method(), received.elapsed());
        if let Err(e) = result_pub.publish(&result) {
            r2r::log_warn!(&logger, "cannot publish result: {e}");
        }
        let _ = score_pub.publish(&Float32 { data: inspection.score });
        let _ = verdict_pub.publish(&Bool { data: inspection.is_anomalous });
        if settings.publish_markers {
            let camera = *shared.camera.lock().unwrap_or_else(|e| e.into_inner());
            let markers = outputs::region_markers(header, &inspection.regions, camera.as_ref(), &settings);
            let _ = markers_pub.publish(&markers);
        }
        let latency_ms = received.elapsed().as_secs_f64() * 1e3;
        if settings.publish_images {
            // Drawn and published on the image thread while the next frame is inspected; when
            // it is still busy with an earlier frame, this frame's pictures are skipped (the
            // verdict above is what must never wait).
            let job = ImageJob { header: header.clone(), map: inspection.map, regions: inspection.regions, frame: rgb };
            if let Err(std::sync::mpsc::TrySendError::Full(_)) = images.try_send(job) {
                images_skipped += 1;
            }
        }
        let first = {
            let mut st = shared.status.lock().unwrap_or_else(|e| e.into_inner());
            let inspect_ms = inspection.elapsed.as_secs_f64() * 1e3;
            let own_ms = convert_ms + taken.elapsed().as_secs_f64() * 1e3 - inspect_ms;
            st.record(latency_ms, own_ms, (latency_ms - inspect_ms - own_ms).max(0.0));
            st.inspected == 1
        };
        let _ = shared.results.send(Published { received, result });
        if first {
            r2r::log_info!(&logger, "first frame inspected in {:.1} ms", inspection.elapsed.as_secs_f64() * 1e3);
        }
    }
    drop(images);
    let _ = image_thread.join();
    let _ = conversion.join();
    let st = shared.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
    r2r::log_info!(
        &logger,
        "inference thread stopped: {} frames inspected, {} dropped as stale, {} rejected; \
         images of {} frames skipped while the image thread was busy; last {} frames: latency median \
         {:.2} ms, node overhead (conversion, ROI, messages) median {:.2} ms, waiting for inference median {:.2} ms",
        st.inspected,
        shared.mailbox.dropped.load(Ordering::Relaxed),
        st.rejected,
        images_skipped,
        st.recent_latency_ms.len(),
        median(&st.recent_latency_ms),
        median(&st.recent_overhead_ms),
        median(&st.recent_wait_ms)
    );
}

/// Median of `values` (0 when empty).
pub fn median(values: &VecDeque<f64>) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// What the image thread needs to draw one frame's map, heatmap and overlay.
struct ImageJob {
    header: Header,
    map: crate::postprocess::AnomalyMap,
    regions: Vec<crate::postprocess::DefectRegion>,
    frame: RgbImage,
}

/// The image thread: draws and publishes anomaly/map, anomaly/heatmap and anomaly/overlay,
/// until the inference thread hangs up.
fn publish_images(
    jobs: std::sync::mpsc::Receiver<ImageJob>,
    map_pub: r2r::Publisher<Image>,
    heatmap_pub: r2r::Publisher<Image>,
    overlay_pub: r2r::Publisher<Image>,
) {
    for job in jobs {
        let _ = map_pub.publish(&outputs::map_image(&job.header, &job.map));
        let _ = heatmap_pub.publish(&convert::rgb_to_image(&job.header, heatmap(&job.map, 0.0, 1.0)));
        let ov = overlay(&job.frame, &job.map, 0.0, 1.0, 0.5, &job.regions);
        let _ = overlay_pub.publish(&convert::rgb_to_image(&job.header, ov));
    }
}

fn update_status_model(shared: &Shared, inspector: Option<&Inspector>) {
    let mut st = shared.status.lock().unwrap_or_else(|e| e.into_inner());
    st.model_id = inspector.map(|i| i.model_id().to_string());
    st.method = inspector.map(|i| i.method().to_string()).unwrap_or_default();
    st.device = inspector.map(|i| crate::device::describe(i.device())).unwrap_or_default();
}

fn handle_command(
    cmd: Command,
    shared: &Shared,
    settings: &mut Settings,
    inspector: &mut Option<Inspector>,
    teach: &mut Option<TeachJob>,
    logger: &str,
) {
    match cmd {
        Command::Settings(mut new, reply) => {
            let mut outcome = Ok(());
            if new.model != settings.model {
                match load_inspector(&new.model, &new, logger) {
                    Ok(i) => *inspector = Some(i),
                    Err(e) => {
                        r2r::log_error!(logger, "cannot load model {}: {e}; the current model stays", new.model.display());
                        // The model in force stays the one teach-ins take their backbone from.
                        new.model = settings.model.clone();
                        outcome = Err(e);
                    }
                }
            }
            if let Some(insp) = inspector.as_mut() {
                if let Err(e) = insp.set_threshold(new.threshold) {
                    r2r::log_error!(logger, "{e}");
                }
                insp.set_postprocess(&new.postprocess);
            }
            *settings = new;
            let _ = reply.send(outcome);
        }
        Command::LoadModel(path, reply) => {
            let outcome = load_inspector(&path, settings, logger).map(|i| {
                let id = i.model_id().to_string();
                *inspector = Some(i);
                settings.model = path.clone();
                id
            });
            if let Err(e) = &outcome {
                r2r::log_error!(logger, "cannot load model {}: {e}; the current model stays", path.display());
            }
            let _ = reply.send(outcome);
        }
        Command::Teach { frames, name, deadline, reply } => {
            if teach.is_some() {
                let _ = reply.send(TeachOutcome {
                    model_path: PathBuf::new(),
                    frames_used: 0,
                    fit_seconds: 0.0,
                    result: Err("a teach-in is already running".into()),
                });
            } else if inspector.is_none() {
                // Frames are only collected after inspection; without any model, collect anyway
                // is impossible here, so say what to do.
                let _ = reply.send(TeachOutcome {
                    model_path: PathBuf::new(),
                    frames_used: 0,
                    fit_seconds: 0.0,
                    result: Err("no model is loaded to take the configuration from; load one first (~/load_model)".into()),
                });
            } else {
                r2r::log_info!(logger, "teach-in: collecting {frames} good frames for model '{name}'");
                *teach = Some(TeachJob { frames, name, deadline, collected: Vec::with_capacity(frames), reply });
            }
        }
        Command::Install(insp, path, frames_used, fit_seconds, reply) => {
            let id = insp.model_id().to_string();
            r2r::log_info!(logger, "teach-in: switching to the new model '{id}' ({})", path.display());
            let mut insp = *insp;
            let _ = insp.set_threshold(settings.threshold);
            insp.set_postprocess(&settings.postprocess);
            *inspector = Some(insp);
            settings.model = path.clone();
            let _ = reply.send(TeachOutcome { model_path: path, frames_used, fit_seconds, result: Ok(id) });
        }
    }
    update_status_model(shared, inspector.as_ref());
}

/// Fits the taught model on a thread of its own, so inspection goes on meanwhile; the frames are
/// kept beside the model (`<model>.frames/train/good/`) so the teach-in can be audited and redone.
fn start_fit(job: TeachJob, shared: &Arc<Shared>, settings: &Settings, current: &Inspector, logger: &str) {
    // A teach-in fits PatchCore: with the current model's settings when it is one.
    let (config, weights) = match current.manifest().patchcore.clone() {
        Some(c) => {
            // A model carries its backbone.
            let w = settings.model.join(crate::model_file::backbone_file(c.backbone.kind));
            (c, w)
        }
        None => (crate::config::PatchCoreConfig::default(), crate::config::default_backbone_weights()),
    };
    let out = settings.model_root.join(&job.name);
    let frames_dir = settings.model_root.join(format!("{}.frames", job.name));
    let device = current.device();
    let settings = settings.clone();
    let shared = shared.clone();
    let log = logger.to_string();
    r2r::log_info!(logger, "teach-in: {} frames collected, fitting {}", job.collected.len(), out.display());
    let spawned = std::thread::Builder::new().name("teach-fit".into()).spawn(move || {
        let _guard = tch::no_grad_guard();
        let t0 = Instant::now();
        let n = job.collected.len() as u32;
        let fitted = guarded("the teach-in fit", || -> crate::Result<Inspector> {
            let good = frames_dir.join("train/good");
            std::fs::create_dir_all(&good).map_err(|e| crate::Error::io(&good, e))?;
            let mut paths = Vec::new();
            for (i, img) in job.collected.iter().enumerate() {
                let p = good.join(format!("{i:04}.png"));
                crate::imaging::save_png(&p, img)?;
                paths.push(p);
            }
            crate::training::fit_patchcore(
                &paths,
                &frames_dir.to_string_lossy(),
                &config,
                &weights,
                device,
                &out,
                &crate::training::FitOptions { name: job.name.clone(), ..Default::default() },
                &mut |_, _, _| {},
            )?;
            Inspector::new(&out, device, &settings.postprocess)
        });
        let secs = t0.elapsed().as_secs_f32();
        match fitted {
            Ok(insp) => shared.mailbox.put_command(Command::Install(Box::new(insp), out, n, secs, job.reply)),
            Err(e) => {
                r2r::log_error!(&log, "teach-in failed: {e}");
                let _ = job.reply.send(TeachOutcome {
                    model_path: PathBuf::new(),
                    frames_used: n,
                    fit_seconds: secs,
                    result: Err(e.to_string()),
                });
            }
        }
    });
    if let Err(e) = spawned {
        r2r::log_error!(logger, "teach-in: cannot start the fitting thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(width: u32, tag: &str) -> Frame {
        let mut m = Image { width, height: 2, encoding: "rgb8".into(), step: width * 3, ..Default::default() };
        m.data = vec![7; (width * 2 * 3) as usize];
        m.header.frame_id = tag.into();
        Frame::Raw(m)
    }

    fn mailbox_with_conversion_thread() -> (Arc<Mailbox>, std::thread::JoinHandle<()>) {
        let mb = Arc::new(Mailbox::default());
        let conv = {
            let mb = mb.clone();
            std::thread::spawn(move || mb.convert_frames())
        };
        (mb, conv)
    }

    fn take_frame(mb: &Mailbox) -> PreparedFrame {
        for _ in 0..50 {
            if let Some(Work::Frame(f)) = mb.take(Duration::from_millis(100)) {
                return f;
            }
        }
        panic!("no frame came through the conversion thread");
    }

    fn wait_converted(mb: &Mailbox) {
        for _ in 0..500 {
            if mb.state.lock().unwrap().prepared.is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("the conversion thread did not convert the waiting frame");
    }

    #[test]
    fn frames_are_converted_one_ahead_and_the_newest_is_never_lost() {
        let (mb, conv) = mailbox_with_conversion_thread();
        mb.put_frame(frame(4, "a"));
        let a = take_frame(&mb);
        assert_eq!(a.header.frame_id, "a");
        assert_eq!(a.rgb.as_ref().map(|i| i.dimensions()).ok(), Some((4, 2)));

        // While "a" is inspected, "b" is converted; "c" waits raw and is replaced by "d".
        mb.put_frame(frame(5, "b"));
        wait_converted(&mb);
        mb.put_frame(frame(6, "c"));
        mb.put_frame(frame(7, "d"));
        mb.inspection_done(1.0);
        assert_eq!(take_frame(&mb).header.frame_id, "b");
        let d = take_frame(&mb);
        assert_eq!(d.header.frame_id, "d");
        assert_eq!(d.rgb.as_ref().map(|i| i.width()).ok(), Some(7));
        assert_eq!(mb.received.load(Ordering::Relaxed), 4);
        assert_eq!(mb.dropped.load(Ordering::Relaxed), 1);

        mb.close();
        conv.join().expect("the conversion thread stops when the mailbox closes");
        assert!(mb.take(Duration::from_millis(10)).is_none());
    }

    #[test]
    fn a_frame_that_cannot_be_converted_arrives_as_its_error_and_commands_go_first() {
        let (mb, conv) = mailbox_with_conversion_thread();
        let mut bad = Image { width: 4, height: 2, encoding: "rgb8".into(), step: 12, ..Default::default() };
        bad.data = vec![0; 5];
        mb.put_frame(Frame::Raw(bad));
        wait_converted(&mb);
        let (tx, _rx) = oneshot::channel();
        mb.put_command(Command::LoadModel(PathBuf::from("/nowhere"), tx));
        assert!(matches!(mb.take(Duration::from_millis(10)), Some(Work::Command(Command::LoadModel(..)))));
        let f = take_frame(&mb);
        let (err, described) = f.rgb.err().expect("5 bytes cannot hold a 4x2 rgb8 frame");
        assert!(described.contains("4x2 'rgb8'"), "{described}");
        assert_eq!(error_kind(&err), "data_too_short", "{err}");
        mb.close();
        conv.join().unwrap();
    }

    #[test]
    fn conversion_waits_until_inference_is_about_to_need_the_frame() {
        let (mb, conv) = mailbox_with_conversion_thread();
        // Inspections take ~400 ms and conversion ~0: once a frame is handed out, the next one
        // is converted near the end of its inspection, not at once, however soon it arrives.
        mb.inspection_done(400.0);
        mb.put_frame(frame(4, "x"));
        assert_eq!(take_frame(&mb).header.frame_id, "x");
        mb.put_frame(frame(4, "y"));
        std::thread::sleep(Duration::from_millis(100));
        assert!(mb.state.lock().unwrap().prepared.is_none(), "converted long before it was due");
        // An idle inference thread gets it at once.
        let t0 = Instant::now();
        assert_eq!(take_frame(&mb).header.frame_id, "y");
        assert!(t0.elapsed() < Duration::from_millis(250), "{:?}", t0.elapsed());
        mb.close();
        conv.join().unwrap();
    }
}
