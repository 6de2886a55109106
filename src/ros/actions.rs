//! The node's actions: `~/inspect` (anomaly_inspector_msgs/action/Inspect), the verdict on one
//! or more fresh frames with feedback after each, and `~/teach` (action/Teach), a teach-in with
//! feedback on the frames collected and the fit's progress; both cancellable. Behaviour trees
//! run work that may take seconds through actions (a BT action node can be halted; a service
//! call cannot); the services of the same names stay for quick calls and scripts.
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::{select, Either};
use futures::StreamExt;
use r2r::anomaly_inspector_msgs::action::{Inspect, Teach};
use r2r::anomaly_inspector_msgs::msg::AnomalyResult;

use super::inference::{Shared, TeachProgress};
use super::params::CheckedParams;
use super::services::{
    inactive, next_fresh, no_result_reason, start_teach, teach_outcome, timeout_or, NodeParamMap, TeachAsk, TeachReply,
    DEFAULT_INSPECT_TIMEOUT_S,
};

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

/// Creates the action servers and serves their goals on `rt`, each on its own task.
pub fn spawn_actions(
    node: &mut r2r::Node,
    rt: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    params: &Arc<Mutex<CheckedParams>>,
    node_params: &NodeParamMap,
    logger: &str,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut goals =
        node.create_action_server::<Inspect::Action>("~/inspect").context("cannot create the ~/inspect action server")?;
    let (sh, log) = (shared.clone(), logger.to_string());
    rt.spawn(async move {
        while let Some(request) = goals.next().await {
            let (shared, logger) = (sh.clone(), log.clone());
            tokio::spawn(async move { run_inspect_goal(request, &shared, &logger).await });
        }
    });

    let mut teach_goals =
        node.create_action_server::<Teach::Action>("~/teach").context("cannot create the ~/teach action server")?;
    let (sh, log, prm, np) = (shared.clone(), logger.to_string(), params.clone(), node_params.clone());
    rt.spawn(async move {
        while let Some(request) = teach_goals.next().await {
            let (shared, logger, params, node_params) = (sh.clone(), log.clone(), prm.clone(), np.clone());
            tokio::spawn(async move { run_teach_goal(request, &shared, &params, &node_params, &logger).await });
        }
    });
    Ok(())
}

fn teach_result(r: TeachReply) -> Teach::Result {
    Teach::Result {
        success: r.success,
        message: r.message,
        model_path: r.model_path,
        frames_used: r.frames_used,
        labels_good: r.labels_good,
        labels_defective: r.labels_defective,
        fit_seconds: r.fit_seconds,
    }
}

fn teach_feedback(p: &TeachProgress) -> Teach::Feedback {
    Teach::Feedback {
        stage: p.stage.into(),
        frames_collected: p.frames_collected,
        frames_requested: p.frames_requested,
        fit_step: p.fit_step.into(),
        done: p.done,
        total: p.total,
    }
}

/// One teach-in goal: accepted (a refusal is an abort with the reason), feedback on every
/// change of progress, a cancel stops collecting or fitting (nothing of it stays on disk).
async fn run_teach_goal(
    request: r2r::ActionServerGoalRequest<Teach::Action>,
    shared: &Shared,
    params: &Mutex<CheckedParams>,
    node_params: &NodeParamMap,
    logger: &str,
) {
    let g = request.goal.clone();
    let (mut goal, mut cancels) = match request.accept() {
        Ok(accepted) => accepted,
        Err(e) => {
            r2r::log_error!(logger, "~/teach action: cannot accept a goal: {e}");
            return;
        }
    };
    let ask = TeachAsk { num_frames: g.num_frames, model_name: &g.model_name, timeout_s: g.timeout_s, method: &g.method };
    let mut started = match start_teach(shared, &ask, logger) {
        Ok(s) => s,
        Err(message) => {
            let _ = goal.abort(teach_result(TeachReply { message, ..Default::default() }));
            return;
        }
    };
    let mut cancelled = false;
    // Once the fitting thread has ended its progress channel is closed: stop polling it (it
    // would answer at once, every time, until the outcome comes).
    let mut progress_open = true;
    let outcome = loop {
        tokio::select! {
            outcome = &mut started.reply => break outcome.map_err(|_| "node shutting down".to_string()),
            changed = started.progress.changed(), if progress_open => {
                if changed.is_ok() {
                    let feedback = teach_feedback(&started.progress.borrow_and_update());
                    let _ = goal.publish_feedback(feedback);
                } else {
                    progress_open = false;
                }
            }
            cancel = cancels.next(), if !cancelled => match cancel {
                Some(cancel) => {
                    cancel.accept();
                    cancelled = true;
                    // The fit stops at its next step and cleans up; its outcome still comes.
                    started.cancel.cancel();
                    r2r::log_info!(logger, "~/teach action: cancel requested");
                }
                None => cancelled = true,
            },
        }
    };
    // The last stage ("installing") is sent just before the install that sends the outcome,
    // so both can be ready at once and `select!` may take the outcome first: publish it now.
    // Asked of the value, not the channel: the fitting thread has ended and dropped its sender
    // by then, and the channel's `has_changed` answers a closed channel with an error.
    let pending = {
        let last = started.progress.borrow_and_update();
        last.has_changed().then(|| teach_feedback(&last))
    };
    if let Some(feedback) = pending {
        let _ = goal.publish_feedback(feedback);
    }
    let reply = teach_outcome(outcome, params, node_params);
    if reply.success {
        let _ = goal.succeed(teach_result(reply));
    } else if cancelled {
        let _ = goal.cancel(teach_result(reply));
    } else {
        let _ = goal.abort(teach_result(reply));
    }
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
