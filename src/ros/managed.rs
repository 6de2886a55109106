//! The node as a managed (lifecycle) node: the five standard lifecycle services, the
//! `~/transition_event` topic, and the work each transition does here.
//!
//! | transition | work |
//! |---|---|
//! | configure | load and check the model named by parameter `model` (failure: back to unconfigured) |
//! | activate | frames are taken and inspected again |
//! | deactivate | frames stop at the subscription; the frame under way finishes, waiting ones are dropped, a teach-in ends |
//! | cleanup | as deactivate, and the model is freed |
//! | shutdown | from any primary state: as cleanup; the node then waits for its process to end |
//! | error processing | after a transition's error (the inference thread gone): as cleanup, then unconfigured |
//!
//! Services other than these answer while the node is inactive, `~/inspect` and `~/teach` with
//! "inactive". /diagnostics goes on in every state, with the state in it: a cell's monitor
//! wants to see a node that is up but inactive. No bond heartbeat (Nav2's lifecycle manager
//! runs without one when its `bond_timeout` is 0).
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use r2r::lifecycle_msgs::msg::{State as StateMsg, Transition, TransitionDescription, TransitionEvent};
use r2r::lifecycle_msgs::srv::{ChangeState, GetAvailableStates, GetAvailableTransitions, GetState};
use r2r::QosProfile;
use tokio::sync::oneshot;

use super::inference::{Command, LifecycleStep, Shared};
use super::lifecycle::{graph, outcome_edge, Edge, Outcome, Refusal, Request, State};
use super::LockOrRecover as _;

/// Runs lifecycle transitions and announces each change of state.
pub struct Transitions {
    shared: Arc<Shared>,
    /// In a mutex because r2r's publishers are Send but not Sync.
    events: Mutex<r2r::Publisher<TransitionEvent>>,
    logger: String,
}

fn state_msg(state: State) -> StateMsg {
    StateMsg { id: state.id(), label: state.label().into() }
}

fn description(edge: Edge) -> TransitionDescription {
    TransitionDescription {
        transition: Transition { id: edge.id, label: edge.label.into() },
        start_state: state_msg(edge.start),
        goal_state: state_msg(edge.goal),
    }
}

impl Transitions {
    /// Creates `~/transition_event`.
    pub fn new(node: &mut r2r::Node, shared: Arc<Shared>, logger: &str) -> anyhow::Result<Self> {
        let events = node.create_publisher::<TransitionEvent>("~/transition_event", QosProfile::default().keep_last(10))?;
        Ok(Self { shared, events: Mutex::new(events), logger: logger.to_string() })
    }

    fn announce(&self, edge: Edge) {
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let d = description(edge);
        let _ = self.events.locked().publish(&TransitionEvent {
            timestamp,
            transition: d.transition,
            start_state: d.start_state,
            goal_state: d.goal_state,
        });
        r2r::log_info!(&self.logger, "lifecycle: {} -> {} ({})", edge.start.label(), edge.goal.label(), edge.label);
    }

    /// An unmanaged start: configure and activate at once. The inference thread loads the
    /// model itself, as before lifecycles: a model that does not load leaves the node active,
    /// dropping frames until one is set.
    pub fn start_active(&self) {
        for request in [Request::Configure, Request::Activate] {
            let begun = self.shared.lifecycle.locked().begin(request);
            match begun {
                Ok(edge) => self.announce(edge),
                Err(e) => r2r::log_error!(&self.logger, "lifecycle: {e}"),
            }
            self.finish(Outcome::Success);
        }
    }

    fn finish(&self, outcome: Outcome) -> Option<Edge> {
        let edge = self.shared.lifecycle.locked().finish(outcome);
        if let Some(edge) = edge {
            self.announce(edge);
        }
        edge
    }

    /// Runs `request` to its end (through error processing when its work fails badly).
    /// `Ok(true)` when its work succeeded, as `~/change_state` reports it.
    pub async fn run(&self, request: Request) -> Result<bool, Refusal> {
        let edge = self.shared.lifecycle.locked().begin(request)?;
        self.announce(edge);
        let outcome = self.work(edge.goal).await;
        let after = self.finish(outcome);
        if after.map(|e| e.goal) == Some(State::ErrorProcessing) {
            let recovered = self.work(State::ErrorProcessing).await;
            self.finish(recovered);
        }
        Ok(outcome == Outcome::Success)
    }

    /// The work of transition state `busy`, done by the inference thread (which finishes the
    /// frame under way first: commands go before frames).
    async fn work(&self, busy: State) -> Outcome {
        let step = match busy {
            State::Configuring => LifecycleStep::Configure,
            State::Deactivating => LifecycleStep::Quiesce,
            State::CleaningUp | State::ShuttingDown | State::ErrorProcessing => LifecycleStep::Unload,
            // Activation only opens the gate, which the state change itself does.
            _ => return Outcome::Success,
        };
        let (tx, rx) = oneshot::channel();
        self.shared.mailbox.put_command(Command::Lifecycle(step, tx));
        match rx.await {
            Ok(Ok(())) => Outcome::Success,
            Ok(Err(why)) => {
                r2r::log_error!(&self.logger, "lifecycle: {} failed: {why}", busy.label());
                self.shared.status.locked().last_error = Some(why);
                Outcome::Failure
            }
            Err(_) => {
                let why = format!("{}: the inference thread has stopped", busy.label());
                r2r::log_error!(&self.logger, "lifecycle: {why}");
                self.shared.status.locked().last_error = Some(why);
                Outcome::Error
            }
        }
    }

    /// The transitions a client may ask for now; during a transition, its possible outcomes.
    fn available(&self) -> Vec<Edge> {
        let lifecycle = self.shared.lifecycle.locked().clone();
        let state = lifecycle.state();
        if state.is_primary() {
            lifecycle.available().iter().map(|r| r.edge()).collect()
        } else {
            [Outcome::Success, Outcome::Failure, Outcome::Error].into_iter().filter_map(|o| outcome_edge(state, o)).collect()
        }
    }
}

/// Creates the lifecycle services and answers them on `rt`.
pub fn spawn_lifecycle_services(
    node: &mut r2r::Node,
    rt: &tokio::runtime::Runtime,
    transitions: &Arc<Transitions>,
) -> anyhow::Result<()> {
    let qos = QosProfile::services_default();

    let mut change = node.create_service::<ChangeState::Service>("~/change_state", qos.clone())?;
    let t = transitions.clone();
    rt.spawn(async move {
        while let Some(req) = change.next().await {
            let t = t.clone();
            // On its own task: a configure that loads a model must not hold up get_state.
            tokio::spawn(async move {
                let asked = &req.message.transition;
                let found = t.shared.lifecycle.locked().find(asked.id, &asked.label);
                let success = match found {
                    Ok(request) => t.run(request).await,
                    Err(e) => Err(e),
                };
                let success = success.unwrap_or_else(|e| {
                    r2r::log_warn!(&t.logger, "lifecycle: change_state refused: {e}");
                    false
                });
                let _ = req.respond(ChangeState::Response { success });
            });
        }
    });

    let mut get_state = node.create_service::<GetState::Service>("~/get_state", qos.clone())?;
    let sh = transitions.shared.clone();
    rt.spawn(async move {
        while let Some(req) = get_state.next().await {
            let _ = req.respond(GetState::Response { current_state: state_msg(sh.lifecycle_state()) });
        }
    });

    let mut states = node.create_service::<GetAvailableStates::Service>("~/get_available_states", qos.clone())?;
    rt.spawn(async move {
        while let Some(req) = states.next().await {
            let _ = req.respond(GetAvailableStates::Response { available_states: State::ALL.map(state_msg).to_vec() });
        }
    });

    let mut available = node.create_service::<GetAvailableTransitions::Service>("~/get_available_transitions", qos.clone())?;
    let t = transitions.clone();
    rt.spawn(async move {
        while let Some(req) = available.next().await {
            let available_transitions = t.available().into_iter().map(description).collect();
            let _ = req.respond(GetAvailableTransitions::Response { available_transitions });
        }
    });

    // rclcpp serves the whole graph with the same service type.
    let mut whole = node.create_service::<GetAvailableTransitions::Service>("~/get_transition_graph", qos)?;
    rt.spawn(async move {
        while let Some(req) = whole.next().await {
            let available_transitions = graph().into_iter().map(description).collect();
            let _ = req.respond(GetAvailableTransitions::Response { available_transitions });
        }
    });
    Ok(())
}
