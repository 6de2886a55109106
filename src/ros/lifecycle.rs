//! The managed-node (lifecycle) state machine of the ROS 2 design (design.ros2.org, "Managed
//! nodes"), with the ids and labels of `lifecycle_msgs` and rcl's default machine, so that
//! `ros2 lifecycle`, Nav2's lifecycle manager and any rclpy client see a standard node.
//!
//! Pure bookkeeping: which transitions a state allows, where each leads, and what a transition's
//! outcome makes of it. The node does the work of each transition (src/ros/managed.rs). Written
//! here because r2r has no lifecycle support.

/// A state: the four primary states, the transition states the node passes through while it
/// works, and `Unknown` (listed by the standard, never entered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// lifecycle_msgs/State PRIMARY_STATE_UNKNOWN.
    Unknown,
    /// Constructed, no model loaded.
    Unconfigured,
    /// Model loaded and checked; no frame is inspected.
    Inactive,
    /// Inspecting frames and publishing.
    Active,
    /// Shut down; only the process's end follows.
    Finalized,
    /// Loading the model.
    Configuring,
    /// Freeing the model.
    CleaningUp,
    /// Shutting down.
    ShuttingDown,
    /// Starting to inspect.
    Activating,
    /// Stopping inspection.
    Deactivating,
    /// Recovering from a transition that raised an error.
    ErrorProcessing,
}

impl State {
    /// Every state, in id order (what `~/get_available_states` lists).
    pub const ALL: [State; 11] = [
        State::Unknown,
        State::Unconfigured,
        State::Inactive,
        State::Active,
        State::Finalized,
        State::Configuring,
        State::CleaningUp,
        State::ShuttingDown,
        State::Activating,
        State::Deactivating,
        State::ErrorProcessing,
    ];

    /// The `lifecycle_msgs/State` id.
    pub fn id(self) -> u8 {
        match self {
            State::Unknown => 0,
            State::Unconfigured => 1,
            State::Inactive => 2,
            State::Active => 3,
            State::Finalized => 4,
            State::Configuring => 10,
            State::CleaningUp => 11,
            State::ShuttingDown => 12,
            State::Activating => 13,
            State::Deactivating => 14,
            State::ErrorProcessing => 15,
        }
    }

    /// The label rcl gives it.
    pub fn label(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Unconfigured => "unconfigured",
            State::Inactive => "inactive",
            State::Active => "active",
            State::Finalized => "finalized",
            State::Configuring => "configuring",
            State::CleaningUp => "cleaningup",
            State::ShuttingDown => "shuttingdown",
            State::Activating => "activating",
            State::Deactivating => "deactivating",
            State::ErrorProcessing => "errorprocessing",
        }
    }

    /// Whether a client may ask for a transition from here (a transition state is busy).
    pub fn is_primary(self) -> bool {
        self.id() < 10
    }
}

/// What a transition's work came to (rcl's CALLBACK_SUCCESS, _FAILURE and _ERROR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: on to the goal state.
    Success,
    /// Not done, nothing broken (e.g. the model does not load): back to the start state.
    Failure,
    /// Something broke: to ErrorProcessing.
    Error,
}

/// A transition a client can ask for, from the primary state it leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Unconfigured -> Configuring.
    Configure,
    /// Inactive -> CleaningUp.
    Cleanup,
    /// Inactive -> Activating.
    Activate,
    /// Active -> Deactivating.
    Deactivate,
    /// Unconfigured -> ShuttingDown.
    UnconfiguredShutdown,
    /// Inactive -> ShuttingDown.
    InactiveShutdown,
    /// Active -> ShuttingDown.
    ActiveShutdown,
}

/// One edge of the graph, as `lifecycle_msgs/TransitionDescription` carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    /// `lifecycle_msgs/Transition` id.
    pub id: u8,
    /// rcl's label.
    pub label: &'static str,
    /// Where it starts.
    pub start: State,
    /// Where it leads.
    pub goal: State,
}

impl Request {
    /// Every request, in id order.
    pub const ALL: [Request; 7] = [
        Request::Configure,
        Request::Cleanup,
        Request::Activate,
        Request::Deactivate,
        Request::UnconfiguredShutdown,
        Request::InactiveShutdown,
        Request::ActiveShutdown,
    ];

    /// The edge from its primary state to its transition state.
    pub fn edge(self) -> Edge {
        use State::*;
        let (id, label, start, goal) = match self {
            Request::Configure => (1, "configure", Unconfigured, Configuring),
            Request::Cleanup => (2, "cleanup", Inactive, CleaningUp),
            Request::Activate => (3, "activate", Inactive, Activating),
            Request::Deactivate => (4, "deactivate", Active, Deactivating),
            Request::UnconfiguredShutdown => (5, "unconfigured_shutdown", Unconfigured, ShuttingDown),
            Request::InactiveShutdown => (6, "inactive_shutdown", Inactive, ShuttingDown),
            Request::ActiveShutdown => (7, "active_shutdown", Active, ShuttingDown),
        };
        Edge { id, label, start, goal }
    }
}

/// The edge that leaves a transition state with `outcome` (rcl's `*_success`, `*_failure`,
/// `*_error` transitions, ids 10-62); `None` for a primary state.
pub fn outcome_edge(from: State, outcome: Outcome) -> Option<Edge> {
    use State::*;
    // (base id, labels of success, failure, error, goal on success, goal on failure)
    let (base, labels, success, failure) = match from {
        Configuring => (10, ["configure_success", "configure_failure", "configure_error"], Inactive, Unconfigured),
        CleaningUp => (20, ["cleanup_success", "cleanup_failure", "cleanup_error"], Unconfigured, Inactive),
        Activating => (30, ["activate_success", "activate_failure", "activate_error"], Active, Inactive),
        Deactivating => (40, ["deactivate_success", "deactivate_failure", "deactivate_error"], Inactive, Active),
        ShuttingDown => (50, ["shutdown_success", "shutdown_failure", "shutdown_error"], Finalized, Finalized),
        // Recovery that fails ends the node's life.
        ErrorProcessing => {
            (60, ["errorprocessing_success", "errorprocessing_failure", "errorprocessing_error"], Unconfigured, Finalized)
        }
        Unknown | Unconfigured | Inactive | Active | Finalized => return None,
    };
    let error_goal = if from == ErrorProcessing { Finalized } else { ErrorProcessing };
    let (index, goal) = match outcome {
        Outcome::Success => (0, success),
        Outcome::Failure => (1, failure),
        Outcome::Error => (2, error_goal),
    };
    Some(Edge { id: base + index as u8, label: labels[index], start: from, goal })
}

/// Every edge of the machine (what `~/get_transition_graph` lists).
pub fn graph() -> Vec<Edge> {
    let requested = Request::ALL.iter().map(|r| r.edge());
    let outcomes = State::ALL
        .iter()
        .flat_map(|&s| [Outcome::Success, Outcome::Failure, Outcome::Error].into_iter().filter_map(move |o| outcome_edge(s, o)));
    requested.chain(outcomes).collect()
}

/// Why a requested transition was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The id or label names no transition the current state allows.
    #[error("transition {asked} is not available in state '{state}' (available: {available})")]
    NotAvailable {
        /// What was asked, as "id N" or "'label'".
        asked: String,
        /// The current state's label.
        state: &'static str,
        /// The labels that are.
        available: String,
    },
    /// Another transition is under way.
    #[error("the node is busy in transition state '{0}'")]
    Busy(&'static str),
}

/// The node's lifecycle: its state, and the rules for changing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    state: State,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self { state: State::Unconfigured }
    }
}

impl Lifecycle {
    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The transitions a client may ask for now (none while one is under way, or once
    /// finalized).
    pub fn available(&self) -> Vec<Request> {
        Request::ALL.into_iter().filter(|r| r.edge().start == self.state).collect()
    }

    /// The transition a `lifecycle_msgs/Transition` names: by label when it has one (as rclcpp
    /// does: `ros2 service call` leaves the id 0), else by id; "shutdown" means the current
    /// state's shutdown. Only transitions available now are found.
    pub fn find(&self, id: u8, label: &str) -> Result<Request, Refusal> {
        if !self.state.is_primary() {
            return Err(Refusal::Busy(self.state.label()));
        }
        let found = self.available().into_iter().find(|r| {
            let e = r.edge();
            if label.is_empty() {
                e.id == id
            } else {
                e.label == label || (label == "shutdown" && e.goal == State::ShuttingDown)
            }
        });
        found.ok_or_else(|| self.not_available(if label.is_empty() { format!("id {id}") } else { format!("'{label}'") }))
    }

    /// The refusal of `asked`, naming what the current state allows.
    fn not_available(&self, asked: String) -> Refusal {
        let available = self.available().iter().map(|r| r.edge().label).collect::<Vec<_>>().join(", ");
        Refusal::NotAvailable { asked, state: self.state.label(), available }
    }

    /// Starts `request`: into its transition state. Returns the edge taken (for the
    /// transition event).
    pub fn begin(&mut self, request: Request) -> Result<Edge, Refusal> {
        let edge = request.edge();
        if !self.state.is_primary() {
            return Err(Refusal::Busy(self.state.label()));
        }
        if edge.start != self.state {
            return Err(self.not_available(format!("'{}'", edge.label)));
        }
        self.state = edge.goal;
        Ok(edge)
    }

    /// Ends the transition under way with `outcome`: to its goal, back, or to ErrorProcessing
    /// (and from there to Unconfigured or Finalized). Returns the edge taken; `None` when no
    /// transition was under way (nothing changes).
    pub fn finish(&mut self, outcome: Outcome) -> Option<Edge> {
        let edge = outcome_edge(self.state, outcome)?;
        self.state = edge.goal;
        Some(edge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    fn at(state: State) -> Lifecycle {
        Lifecycle { state }
    }

    #[test]
    fn the_normal_life_of_a_node() {
        let mut l = Lifecycle::default();
        assert_eq!(l.state(), Unconfigured);
        for (request, busy, done) in [
            (Request::Configure, Configuring, Inactive),
            (Request::Activate, Activating, Active),
            (Request::Deactivate, Deactivating, Inactive),
            (Request::Cleanup, CleaningUp, Unconfigured),
            (Request::UnconfiguredShutdown, ShuttingDown, Finalized),
        ] {
            assert_eq!(l.begin(request).map(|e| e.goal), Ok(busy));
            assert_eq!(l.state(), busy);
            assert_eq!(l.finish(Outcome::Success).map(|e| e.goal), Some(done));
        }
        assert!(l.available().is_empty(), "finalized is the end");
    }

    #[test]
    fn every_outcome_of_every_transition_lands_where_rcl_says() {
        // (transition state, success, failure, error)
        for (from, success, failure, error) in [
            (Configuring, Inactive, Unconfigured, ErrorProcessing),
            (CleaningUp, Unconfigured, Inactive, ErrorProcessing),
            (Activating, Active, Inactive, ErrorProcessing),
            (Deactivating, Inactive, Active, ErrorProcessing),
            (ShuttingDown, Finalized, Finalized, ErrorProcessing),
            (ErrorProcessing, Unconfigured, Finalized, Finalized),
        ] {
            for (outcome, goal) in [(Outcome::Success, success), (Outcome::Failure, failure), (Outcome::Error, error)] {
                let mut l = at(from);
                let edge = l.finish(outcome).unwrap();
                assert_eq!((edge.start, edge.goal, l.state()), (from, goal, goal), "{from:?} {outcome:?}");
            }
        }
    }

    #[test]
    fn ids_and_labels_are_the_standard_ones() {
        assert_eq!(State::ALL.map(State::id), [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15]);
        assert_eq!(Request::ALL.map(|r| r.edge().id), [1, 2, 3, 4, 5, 6, 7]);
        let e = outcome_edge(Deactivating, Outcome::Error).unwrap();
        assert_eq!((e.id, e.label), (42, "deactivate_error"));
        let e = outcome_edge(ErrorProcessing, Outcome::Failure).unwrap();
        assert_eq!((e.id, e.label), (61, "errorprocessing_failure"));
        // 7 requests + 6 transition states x 3 outcomes, each once, every label found.
        let g = graph();
        assert_eq!(g.len(), 25);
        assert!(g.iter().all(|e| !e.label.is_empty()));
        let mut ids: Vec<u8> = g.iter().map(|e| e.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 25);
    }

    #[test]
    fn refused_transitions_change_nothing() {
        // Every request from every state it does not start from.
        for state in State::ALL {
            for request in Request::ALL {
                let mut l = at(state);
                if request.edge().start == state {
                    continue;
                }
                assert!(l.begin(request).is_err(), "{request:?} from {state:?}");
                assert_eq!(l.state(), state);
            }
        }
        // A transition under way refuses a second one, whatever it is.
        let mut l = Lifecycle::default();
        l.begin(Request::Configure).unwrap();
        assert_eq!(l.find(3, ""), Err(Refusal::Busy("configuring")));
        assert_eq!(l.begin(Request::Configure), Err(Refusal::Busy("configuring")));
        // finish() in a primary state is not a transition.
        let mut l = at(Active);
        assert_eq!(l.finish(Outcome::Success), None);
        assert_eq!(l.state(), Active);
    }

    #[test]
    fn requests_are_found_by_label_first_then_by_id() {
        let l = at(Inactive);
        assert_eq!(l.find(3, ""), Ok(Request::Activate));
        assert_eq!(l.find(0, "activate"), Ok(Request::Activate));
        // rclcpp: the label wins over the id.
        assert_eq!(l.find(2, "activate"), Ok(Request::Activate));
        assert_eq!(l.find(0, "shutdown"), Ok(Request::InactiveShutdown));
        assert_eq!(l.find(0, "inactive_shutdown"), Ok(Request::InactiveShutdown));
        assert_eq!(at(Active).find(0, "shutdown"), Ok(Request::ActiveShutdown));
        assert_eq!(at(Unconfigured).find(5, ""), Ok(Request::UnconfiguredShutdown));
        let refused = l.find(4, "").unwrap_err().to_string();
        assert!(refused.contains("id 4") && refused.contains("'inactive'") && refused.contains("cleanup, activate"), "{refused}");
        assert!(l.find(0, "explode").is_err());
        assert!(at(Finalized).find(0, "shutdown").is_err());
    }

    #[test]
    fn available_transitions_per_primary_state() {
        let labels = |s: State| at(s).available().iter().map(|r| r.edge().label).collect::<Vec<_>>();
        assert_eq!(labels(Unconfigured), ["configure", "unconfigured_shutdown"]);
        assert_eq!(labels(Inactive), ["cleanup", "activate", "inactive_shutdown"]);
        assert_eq!(labels(Active), ["deactivate", "active_shutdown"]);
        assert!(labels(Finalized).is_empty() && labels(Configuring).is_empty());
    }
}
