//! The anomaly_inspector node: subscribe, keep the newest frame, inspect it on a dedicated
//! inference thread, publish results with the input's header.
//!
//! Threads: the ROS executor (`spin_once` loop, main thread), a small tokio runtime that moves
//! incoming frames into a one-slot mailbox and handles parameter events, and one inference
//! thread. The inference thread is long-lived on purpose: every OS thread that runs torch ops
//! builds its own OpenMP pool, and tokio's blocking pool reaps idle threads, which would make
//! the next frame pay for a new pool (PLATFORM.md, 67-157 ms).
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use r2r::anomaly_inspector_msgs::msg::AnomalyResult;
use r2r::sensor_msgs::msg::Image;
use r2r::std_msgs::msg::Float32;
use r2r::QosProfile;

use super::convert;
use super::params::{NodeParams, Settings};
use crate::inspector::Inspector;
use crate::postprocess::{heatmap, overlay};

/// Node name used when none is given by `--ros-args -r __node:=...`.
pub const NODE_NAME: &str = "anomaly_inspector";

/// One-frame mailbox: a new frame replaces an unprocessed one (counted as dropped), so latency
/// never grows when frames arrive faster than inference.
#[derive(Default)]
struct FrameSlot {
    state: Mutex<SlotState>,
    ready: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct SlotState {
    frame: Option<(Image, Instant)>,
    closed: bool,
}

impl FrameSlot {
    fn put(&self, msg: Image) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.frame.replace((msg, Instant::now())).is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.ready.notify_one();
    }

    fn take(&self) -> Option<(Image, Instant)> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if s.closed {
                return None;
            }
            if let Some(f) = s.frame.take() {
                return Some(f);
            }
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
    }
}

/// Logs the first error of each kind and counts the rest, so a camera sending a bad encoding at
/// 30 Hz does not flood the log.
struct ErrorLog {
    logger: String,
    seen: HashSet<String>,
    count: u64,
}

impl ErrorLog {
    fn report(&mut self, kind: &str, message: &str) {
        self.count += 1;
        if self.seen.insert(kind.to_string()) {
            r2r::log_error!(&self.logger, "{message} (frame dropped; further '{kind}' errors are counted, not logged)");
        }
    }
}

fn error_kind(e: &crate::Error) -> &'static str {
    match e {
        crate::Error::BadImage(_) => "bad image",
        crate::Error::Decode(_) => "decode",
        crate::Error::Io { .. } => "io",
        crate::Error::Model { .. } => "model",
        crate::Error::Config(_) => "config",
        crate::Error::Dataset { .. } => "dataset",
        crate::Error::Torch(_) => "inference",
    }
}

struct Publishers {
    result: r2r::Publisher<AnomalyResult>,
    score: r2r::Publisher<Float32>,
    heatmap: r2r::Publisher<Image>,
    overlay: r2r::Publisher<Image>,
}

fn load_inspector(settings: &Settings, logger: &str) -> Option<Inspector> {
    let device = match crate::device::resolve(settings.device) {
        Ok(d) => d,
        Err(e) => {
            r2r::log_error!(logger, "{e}; falling back to the CPU");
            tch::Device::Cpu
        }
    };
    match Inspector::new(&settings.model, device, &settings.postprocess) {
        Ok(mut insp) => {
            if let Err(e) = insp.set_threshold(settings.threshold) {
                r2r::log_error!(logger, "{e}; keeping 0.5");
            }
            r2r::log_info!(
                logger,
                "model '{}' ({}) loaded from {} on device {}",
                insp.model_id(),
                insp.method(),
                settings.model.display(),
                crate::device::describe(insp.device())
            );
            Some(insp)
        }
        Err(e) => {
            r2r::log_error!(
                logger,
                "cannot load model: {e}. Frames are dropped until a valid model is set \
                 (ros2 param set <node> model <dir>)"
            );
            None
        }
    }
}

fn inference_loop(
    slot: Arc<FrameSlot>,
    settings_rx: mpsc::Receiver<Settings>,
    mut settings: Settings,
    pubs: Publishers,
    logger: String,
) {
    let _guard = tch::no_grad_guard();
    let mut inspector = load_inspector(&settings, &logger);
    let mut errors = ErrorLog { logger: logger.clone(), seen: HashSet::new(), count: 0 };
    let mut processed: u64 = 0;
    while let Some((msg, received)) = slot.take() {
        // Apply parameter changes between frames, never during one.
        while let Ok(new) = settings_rx.try_recv() {
            if new.model != settings.model || inspector.is_none() {
                if let Some(fresh) = load_inspector(&new, &logger) {
                    inspector = Some(fresh);
                }
            } else if let Some(insp) = inspector.as_mut() {
                if let Err(e) = insp.set_threshold(new.threshold) {
                    r2r::log_error!(&logger, "{e}");
                }
                insp.set_postprocess(&new.postprocess);
            }
            settings = new;
        }
        let Some(insp) = inspector.as_ref() else {
            errors.report("no model", "no model loaded");
            continue;
        };
        let rgb = match convert::image_to_rgb(&msg) {
            Ok(rgb) => rgb,
            Err(e) => {
                errors.report(error_kind(&e), &format!("frame {}x{} '{}': {e}", msg.width, msg.height, msg.encoding));
                continue;
            }
        };
        let inspection = match insp.inspect(&rgb) {
            Ok(i) => i,
            Err(e) => {
                errors.report(error_kind(&e), &format!("inference failed: {e}"));
                continue;
            }
        };
        let header = &msg.header;
        let result = convert::result_msg(header, &inspection, insp.model_id(), insp.method(), received.elapsed());
        if let Err(e) = pubs.result.publish(&result) {
            errors.report("publish", &format!("cannot publish result: {e}"));
        }
        let _ = pubs.score.publish(&Float32 { data: inspection.score });
        if settings.publish_images {
            let hm = heatmap(&inspection.map, 0.0, 1.0);
            let _ = pubs.heatmap.publish(&convert::rgb_to_image(header, hm));
            let ov = overlay(&rgb, &inspection.map, 0.0, 1.0, 0.5, &inspection.regions);
            let _ = pubs.overlay.publish(&convert::rgb_to_image(header, ov));
        }
        processed += 1;
        if processed == 1 {
            r2r::log_info!(&logger, "first frame inspected in {:.1} ms", inspection.elapsed.as_secs_f64() * 1e3);
        }
    }
    r2r::log_info!(
        &logger,
        "inference thread stopped: {processed} frames inspected, {} dropped as stale, {} rejected",
        slot.dropped.load(Ordering::Relaxed),
        errors.count
    );
}

/// Runs the node until SIGINT/SIGTERM. ROS arguments (`--ros-args -p ... -r ...`) come from
/// the command line, as for any ROS 2 node.
pub fn run() -> anyhow::Result<()> {
    // Before any tch call: make sure a CUDA libtorch registers its backend.
    let cuda = crate::device::load_cuda_backend();

    let ctx = r2r::Context::create().context("cannot initialise ROS 2 (rcl_init)")?;
    let mut node = r2r::Node::create(ctx, NODE_NAME, "").context("cannot create the ROS 2 node")?;
    let logger = node.logger().to_string();
    if let Ok(lib) = &cuda {
        r2r::log_info!(&logger, "CUDA backend registered ({lib})");
    }

    let params = Arc::new(Mutex::new(NodeParams::default()));
    let (param_handler, mut param_events) = node
        .make_derived_parameter_handler(params.clone())
        .context("cannot declare parameters")?;
    let initial = params.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let settings = initial.settings().unwrap_or_else(|e| {
        r2r::log_error!(&logger, "invalid parameters: {e}; using the defaults for all of them");
        NodeParams::default().settings().expect("defaults are valid")
    });

    let mut image_sub = node
        .subscribe::<Image>("image", QosProfile::sensor_data())
        .context("cannot subscribe to 'image'")?;
    let pubs = Publishers {
        result: node.create_publisher("anomaly/result", QosProfile::default().keep_last(10))?,
        score: node.create_publisher("anomaly/score", QosProfile::default().keep_last(10))?,
        heatmap: node.create_publisher("anomaly/heatmap", QosProfile::default().keep_last(2))?,
        overlay: node.create_publisher("anomaly/overlay", QosProfile::default().keep_last(2))?,
    };

    let slot = Arc::new(FrameSlot::default());
    let (settings_tx, settings_rx) = mpsc::channel::<Settings>();
    let worker = {
        let slot = slot.clone();
        let logger = logger.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || inference_loop(slot, settings_rx, settings, pubs, logger))
            .context("cannot start the inference thread")?
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.spawn(param_handler);
    {
        let slot = slot.clone();
        rt.spawn(async move {
            while let Some(msg) = image_sub.next().await {
                slot.put(msg);
            }
        });
    }
    {
        let logger = logger.clone();
        let params = params.clone();
        rt.spawn(async move {
            while let Some((name, value)) = param_events.next().await {
                let current = params.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match current.settings() {
                    Ok(s) => {
                        r2r::log_info!(&logger, "parameter {name} set to {value:?}");
                        let _ = settings_tx.send(s);
                    }
                    Err(e) => r2r::log_error!(&logger, "parameter {name} = {value:?} refused: {e}; previous value stays in force"),
                }
            }
        });
    }
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

    r2r::log_info!(&logger, "waiting for images on '{}'", "image");
    while !shutdown.load(Ordering::SeqCst) {
        node.spin_once(Duration::from_millis(20));
    }
    r2r::log_info!(&logger, "shutting down");
    slot.close();
    let _ = worker.join();
    drop(rt);
    Ok(())
}
