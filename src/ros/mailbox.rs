//! The mailbox between the subscriptions, the conversion thread and the inference thread.
//!
//! It holds at most one frame (the newest; a replaced frame is counted as dropped, so latency
//! never grows when frames arrive faster than inference) and a queue of commands (parameter
//! changes, model loads, teach-in), which go first.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;
use r2r::std_msgs::msg::Header;

use super::convert::Frame;
use super::{recovered, LockOrRecover as _};
use crate::error::catch_panic;

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

/// What the inference thread is handed next.
pub enum Work<C> {
    /// A converted frame (or why it could not be converted).
    Frame(PreparedFrame),
    /// A command, before any frame.
    Command(C),
    /// Nothing arrived within the tick: time for periodic checks.
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
pub struct Mailbox<C> {
    state: Mutex<MailboxState<C>>,
    /// Signals the inference thread: a command or a converted frame.
    work_ready: Condvar,
    /// Signals the conversion thread: a raw frame, a free slot, or the inference thread waiting.
    raw_ready: Condvar,
    /// Frames replaced before inference could take them.
    pub dropped: AtomicU64,
    /// Frames received.
    pub received: AtomicU64,
}

struct MailboxState<C> {
    frame: Option<(Frame, Instant)>,
    prepared: Option<PreparedFrame>,
    commands: VecDeque<C>,
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

impl<C> Default for Mailbox<C> {
    fn default() -> Self {
        Self {
            state: Mutex::new(MailboxState {
                frame: None,
                prepared: None,
                commands: VecDeque::new(),
                closed: false,
                inference_idle: false,
                convert_not_before: None,
                convert_ms: 0.0,
                inspect_ms: 0.0,
            }),
            work_ready: Condvar::new(),
            raw_ready: Condvar::new(),
            dropped: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }
}

impl<C> Mailbox<C> {
    /// Puts a frame; a frame still waiting is replaced and counted as dropped.
    pub fn put_frame(&self, frame: Frame) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut s = self.state.locked();
        if s.frame.replace((frame, Instant::now())).is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.raw_ready.notify_one();
    }

    /// Drops the frames waiting (raw and converted), e.g. when the node stops inspecting. They
    /// are not counted as dropped: nobody was going to inspect them.
    pub fn discard_frames(&self) {
        let mut s = self.state.locked();
        s.frame = None;
        s.prepared = None;
    }

    /// Queues a command (handled before the next frame).
    pub fn put_command(&self, command: C) {
        let mut s = self.state.locked();
        s.commands.push_back(command);
        self.work_ready.notify_one();
    }

    /// Stops the conversion and inference threads.
    pub fn close(&self) {
        self.state.locked().closed = true;
        self.work_ready.notify_all();
        self.raw_ready.notify_all();
    }

    /// The conversion thread: raw frames -> RGB, one ahead of inference, until closed.
    pub fn convert_frames(&self) {
        loop {
            let (frame, received) = {
                let mut s = self.state.locked();
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
                        (true, Some(t)) => recovered(self.raw_ready.wait_timeout(s, t - now)).0,
                        _ => recovered(self.raw_ready.wait(s)),
                    };
                }
                match s.frame.take() {
                    Some(frame) => frame,
                    None => continue,
                }
            };
            let t0 = Instant::now();
            let rgb = catch_panic("frame conversion", || frame.to_rgb()).map_err(|e| (e, frame.describe()));
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let header = frame.into_header();
            let mut s = self.state.locked();
            s.convert_ms = running_mean(s.convert_ms, ms);
            s.prepared = Some(PreparedFrame { header, received, rgb, convert_ms: ms });
            self.work_ready.notify_one();
        }
    }

    /// Called by the inference thread when it has inspected a frame in `ms`.
    pub fn inspection_done(&self, ms: f64) {
        let mut s = self.state.locked();
        s.inspect_ms = running_mean(s.inspect_ms, ms);
    }

    /// The next work for the inference thread: a command, else the converted frame, else a
    /// tick after `tick`; `None` once the mailbox is closed.
    pub fn take(&self, tick: Duration) -> Option<Work<C>> {
        let mut s = self.state.locked();
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
            s = recovered(self.work_ready.wait_timeout(s, deadline - now)).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use r2r::sensor_msgs::msg::Image;

    /// The mailbox's commands are the inference thread's business; a name stands for one here.
    type Mb = Mailbox<&'static str>;

    fn frame(width: u32, tag: &str) -> Frame {
        let mut m = Image { width, height: 2, encoding: "rgb8".into(), step: width * 3, ..Default::default() };
        m.data = vec![7; (width * 2 * 3) as usize];
        m.header.frame_id = tag.into();
        Frame::Raw(m)
    }

    fn mailbox_with_conversion_thread() -> (Arc<Mb>, std::thread::JoinHandle<()>) {
        let mb = Arc::new(Mb::default());
        let conv = {
            let mb = mb.clone();
            std::thread::spawn(move || mb.convert_frames())
        };
        (mb, conv)
    }

    fn take_frame(mb: &Mb) -> PreparedFrame {
        for _ in 0..50 {
            if let Some(Work::Frame(f)) = mb.take(Duration::from_millis(100)) {
                return f;
            }
        }
        panic!("no frame came through the conversion thread");
    }

    fn wait_converted(mb: &Mb) {
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
        mb.put_command("load /nowhere");
        assert!(matches!(mb.take(Duration::from_millis(10)), Some(Work::Command("load /nowhere"))));
        let f = take_frame(&mb);
        let (err, described) = f.rgb.expect_err("5 bytes cannot hold a 4x2 rgb8 frame");
        assert!(described.contains("4x2 'rgb8'"), "{described}");
        assert_eq!(err.kind(), "data_too_short", "{err}");
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
