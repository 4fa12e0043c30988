//! Events: what happened to a job ([`Event`], persisted by the store with a global id and a
//! per-job sequence number) and to the fleet ([`FleetEvent`], live only).

use serde::{Deserialize, Serialize};

use crate::error::ExecutionError;
use crate::ids::{BackendId, JobId, RemoteRef};
use crate::job::{Artifact, CancelStep, JobState};
use crate::progress::Progress;
use crate::time::Timestamp;
use crate::workflow::{NodeId, WorkflowHash};

/// A backend passed over when placing a job, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Skip {
    /// The backend.
    pub backend: BackendId,
    /// Why (`no node class FleetNoSuchNode`, `blocked for this workflow until …`).
    pub reason: String,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// The job was accepted.
    Submitted {
        /// Its priority.
        priority: i32,
    },
    /// The job cannot be placed now.
    Waiting {
        /// Why.
        reason: String,
        /// When it will be looked at again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<Timestamp>,
    },
    /// An attempt was sent to a backend.
    Dispatched {
        /// Attempt number.
        attempt: u32,
        /// The backend chosen.
        backend: BackendId,
        /// Backends passed over and why.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        skipped: Vec<Skip>,
    },
    /// After a restart, a still-running remote execution was found and resumed.
    Reattached {
        /// Attempt number.
        attempt: u32,
        /// The backend.
        backend: BackendId,
        /// The remote execution.
        remote: RemoteRef,
    },
    /// The backend accepted the execution.
    Accepted {
        /// Attempt number.
        attempt: u32,
        /// The backend's id for it.
        remote: RemoteRef,
    },
    /// The execution waits in the backend's own queue.
    Queued {
        /// Attempt number.
        attempt: u32,
        /// Executions ahead of it (0: next).
        position: u32,
    },
    /// The execution started.
    Started {
        /// Attempt number.
        attempt: u32,
    },
    /// A node started.
    NodeStarted {
        /// Attempt number.
        attempt: u32,
        /// The node.
        #[cfg_attr(feature = "openapi", schema(value_type = String))]
        node: NodeId,
        /// Its class.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        class_type: Option<String>,
    },
    /// A node finished (or was served from cache).
    NodeFinished {
        /// Attempt number.
        attempt: u32,
        /// The node.
        #[cfg_attr(feature = "openapi", schema(value_type = String))]
        node: NodeId,
        /// Served from cache.
        #[serde(default)]
        cached: bool,
    },
    /// Overall progress (coalesced: at most a few per second).
    Progress {
        /// Attempt number.
        attempt: u32,
        /// The snapshot.
        progress: Progress,
    },
    /// A node produced outputs.
    Output {
        /// Attempt number.
        attempt: u32,
        /// The node.
        #[cfg_attr(feature = "openapi", schema(value_type = String))]
        node: NodeId,
        /// What it produced.
        artifacts: Vec<Artifact>,
    },
    /// Something looks wrong but the job goes on (a task stuck in one state unusually long).
    Warning {
        /// What.
        message: String,
    },
    /// An attempt failed.
    AttemptFailed {
        /// Attempt number.
        attempt: u32,
        /// Where.
        backend: BackendId,
        /// Why.
        error: ExecutionError,
        /// When the job will be retried (`None`: it will not).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at: Option<Timestamp>,
    },
    /// A user asked to cancel.
    CancelRequested {
        /// Force-cancel (also stops a running execution).
        force: bool,
    },
    /// A step of the force-cancel ladder.
    CancelStepTaken {
        /// Attempt number.
        attempt: u32,
        /// The step.
        step: CancelStep,
    },
    /// The job was requeued because the orchestrator holding it stopped.
    Requeued {
        /// Why.
        reason: String,
        /// How many times this happened to the job.
        crash_requeues: u32,
    },
    /// Terminal: done.
    Succeeded {
        /// Attempt number.
        attempt: u32,
        /// Where it ran.
        backend: BackendId,
        /// Outputs.
        artifacts: Vec<Artifact>,
    },
    /// Terminal: gave up.
    Failed {
        /// Why.
        error: ExecutionError,
    },
    /// Terminal: cancelled.
    Cancelled {
        /// Why / by whom.
        reason: String,
    },
}

impl EventKind {
    /// The state this event moves the job into, if it is a terminal event.
    pub fn terminal_state(&self) -> Option<JobState> {
        match self {
            EventKind::Succeeded { .. } => Some(JobState::Succeeded),
            EventKind::Failed { .. } => Some(JobState::Failed),
            EventKind::Cancelled { .. } => Some(JobState::Cancelled),
            _ => None,
        }
    }

    /// Stable snake-case name of the variant.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Submitted { .. } => "submitted",
            EventKind::Waiting { .. } => "waiting",
            EventKind::Dispatched { .. } => "dispatched",
            EventKind::Reattached { .. } => "reattached",
            EventKind::Accepted { .. } => "accepted",
            EventKind::Queued { .. } => "queued",
            EventKind::Started { .. } => "started",
            EventKind::NodeStarted { .. } => "node_started",
            EventKind::NodeFinished { .. } => "node_finished",
            EventKind::Progress { .. } => "progress",
            EventKind::Output { .. } => "output",
            EventKind::Warning { .. } => "warning",
            EventKind::AttemptFailed { .. } => "attempt_failed",
            EventKind::CancelRequested { .. } => "cancel_requested",
            EventKind::CancelStepTaken { .. } => "cancel_step_taken",
            EventKind::Requeued { .. } => "requeued",
            EventKind::Succeeded { .. } => "succeeded",
            EventKind::Failed { .. } => "failed",
            EventKind::Cancelled { .. } => "cancelled",
        }
    }
}

/// A job event as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Global, store-assigned, increasing id (a live-events client resumes after it).
    pub id: u64,
    /// The job.
    pub job: JobId,
    /// Per-job sequence number, from 1, strictly increasing.
    pub seq: u32,
    /// When.
    pub at: Timestamp,
    /// What.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Fleet-level happenings, published live next to job events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FleetEvent {
    /// A job event (already stored).
    Job(Event),
    /// A backend is blocked for one workflow structure.
    BackendBlocked {
        /// The backend.
        backend: BackendId,
        /// The workflow structure hash.
        structure: WorkflowHash,
        /// Until when.
        until: Timestamp,
        /// Why.
        reason: String,
    },
    /// The block ran out.
    BackendUnblocked {
        /// The backend.
        backend: BackendId,
        /// The workflow structure hash.
        structure: WorkflowHash,
    },
    /// The backend's circuit breaker opened: no work until it recovers.
    CircuitOpened {
        /// The backend.
        backend: BackendId,
        /// Until when at least.
        until: Timestamp,
        /// Why.
        reason: String,
    },
    /// The circuit closed again.
    CircuitClosed {
        /// The backend.
        backend: BackendId,
    },
    /// A backend was quarantined (a cancelled execution would not stop): no new work until it
    /// proves healthy.
    BackendQuarantined {
        /// The backend.
        backend: BackendId,
        /// Why.
        reason: String,
    },
    /// A backend left quarantine.
    BackendReleased {
        /// The backend.
        backend: BackendId,
    },
    /// A subscriber fell behind and missed this many events; it should re-read state.
    Lagged {
        /// How many were dropped for it.
        missed: u64,
    },
}
