//! The node's action: `~/inspect` (anomaly_inspector_msgs/action/Inspect), the verdict on one
//! or more fresh frames with feedback after each, cancellable. Behaviour trees run work that
//! may take seconds through actions (a BT action node can be halted; a service call cannot);
//! the `~/inspect` service stays for one quick look.
use std::sync::Arc;
use std::time::Instant;

use futures::future::{select, Either};
use futures::StreamExt;
use r2r::anomaly_inspector_msgs::action::Inspect;
use r2r::anomaly_inspector_msgs::msg::AnomalyResult;

use super::inference::Shared;
use super::services::{inactive, next_fresh, no_result_reason, timeout_or, DEFAULT_INSPECT_TIMEOUT_S};

/// The most frames one goal may ask for: every verdict is kept until the goal ends.
pub const MAX_INSPECT_FRAMES: u32 = 1000;

/// The verdicts gathered for one goal, in order.
#[derive(Default)]
struct Gathered {
    results: Vec<AnomalyResult>,
}

impl Gathered {
    /// The goal's result: anomalous when any frame is, with the highest score (0 for none).
    fn result(self, success: bool, message: String) -> Inspect::Result {
        let is_anomalous = self.results.iter().any(|r| r.is_anomalous);
        let max_score = self.results.iter().map(|r| r.score).reduce(f32::max).unwrap_or(0.0);
        Inspect::Result { success, message, is_anomalous, max_score, results: self.results }
    }
}

/// Why a goal cannot start; `None`: it can.
fn refusal(shared: &Shared, frames: u32) -> Option<String> {
    inactive(shared).or_else(|| {
        (frames > MAX_INSPECT_FRAMES).then(|| format!("num_frames {frames}: at most {MAX_INSPECT_FRAMES} frames per goal"))
    })
}

/// Creates the action server and serves its goals on `rt`, each on its own task.
pub fn spawn_actions(
    node: &mut r2r::Node,
    rt: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    logger: &str,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut goals =
        node.create_action_server::<Inspect::Action>("~/inspect").context("cannot create the ~/inspect action server")?;
    let shared = shared.clone();
    let logger = logger.to_string();
    rt.spawn(async move {
        while let Some(request) = goals.next().await {
            let (shared, logger) = (shared.clone(), logger.clone());
            tokio::spawn(async move { run_inspect_goal(request, &shared, &logger).await });
        }
    });
    Ok(())
}

/// One goal: accepted (a refusal is an abort with a reason, which a plain rejection cannot
/// carry), then consecutive fresh results until `num_frames`, a timeout or a cancel.
async fn run_inspect_goal(request: r2r::ActionServerGoalRequest<Inspect::Action>, shared: &Shared, logger: &str) {
    let frames = request.goal.num_frames.max(1);
    let wait = timeout_or(request.goal.timeout_s, DEFAULT_INSPECT_TIMEOUT_S);
    let (mut goal, mut cancels) = match request.accept() {
        Ok(accepted) => accepted,
        Err(e) => {
            r2r::log_error!(logger, "~/inspect action: cannot accept a goal: {e}");
            return;
        }
    };
    if let Some(message) = refusal(shared, frames) {
        let _ = goal.abort(Gathered::default().result(false, message));
        return;
    }
    let asked = Instant::now();
    let mut rx = shared.results.subscribe();
    let mut got = Gathered::default();
    while got.results.len() < frames as usize {
        let done = got.results.len();
        match select(Box::pin(next_fresh(&mut rx, asked, wait)), cancels.next()).await {
            Either::Left((Some(published), _)) => {
                let feedback = Inspect::Feedback {
                    frames_done: done as u32 + 1,
                    frames_requested: frames,
                    last_result: published.result.clone(),
                };
                let _ = goal.publish_feedback(feedback);
                got.results.push(published.result);
            }
            Either::Left((None, _)) => {
                let why = inactive(shared).unwrap_or_else(|| no_result_reason(shared, wait));
                let _ = goal.abort(got.result(false, format!("{why} (after {done} of {frames} frames)")));
                return;
            }
            Either::Right((Some(cancel), _)) => {
                cancel.accept();
                let _ = goal.cancel(got.result(false, format!("cancelled after {done} of {frames} frames")));
                return;
            }
            // The server is gone (node shutting down): nobody to answer.
            Either::Right((None, _)) => return,
        }
    }
    let anomalous = got.results.iter().filter(|r| r.is_anomalous).count();
    let _ = goal.succeed(got.result(true, format!("{frames} frames inspected, {anomalous} anomalous")));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(score: f32, is_anomalous: bool) -> AnomalyResult {
        AnomalyResult { score, is_anomalous, ..AnomalyResult::default() }
    }

    #[test]
    fn a_part_is_anomalous_when_any_frame_is_and_reports_the_highest_score() {
        let got = Gathered { results: vec![verdict(0.4, false), verdict(1.7, true), verdict(0.9, false)] };
        let r = got.result(true, String::new());
        assert!(r.success && r.is_anomalous);
        assert_eq!(r.max_score, 1.7);
        assert_eq!(r.results.len(), 3);
        let good = Gathered { results: vec![verdict(0.4, false), verdict(0.2, false)] }.result(true, String::new());
        assert!(!good.is_anomalous);
        assert_eq!(good.max_score, 0.4);
    }

    #[test]
    fn no_frame_means_no_verdict_and_a_zero_score() {
        let r = Gathered::default().result(false, "no camera".into());
        assert!(!r.success && !r.is_anomalous && r.results.is_empty());
        assert_eq!(r.max_score, 0.0);
        assert_eq!(r.message, "no camera");
    }
}
