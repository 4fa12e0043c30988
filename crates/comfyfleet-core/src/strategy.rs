//! The [`FailoverStrategy`] trait: where a job goes, and what a failure means.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::backend::{Capabilities, Health, Inventory};
use crate::error::ExecutionError;
use crate::event::{FleetEvent, Skip};
use crate::ids::BackendId;
use crate::job::JobRecord;
use crate::time::Timestamp;
use crate::workflow::{Workflow, WorkflowHash};

/// Whether a backend takes new work, as the operator and the engine see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Availability {
    /// Takes work.
    Active,
    /// Finishes what it has, takes nothing new (operator's drain).
    Draining,
    /// A cancelled execution would not stop: nothing new until a health check passes.
    Quarantined {
        /// Why.
        reason: String,
    },
}

/// A backend as the strategy sees it when placing one job.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The backend.
    pub id: BackendId,
    /// What it can do.
    pub capabilities: Capabilities,
    /// What it has (shared: placing a job copies no inventories).
    pub inventory: std::sync::Arc<Inventory>,
    /// Our executions running there now.
    pub in_flight: u32,
    /// Latest health check.
    pub health: Health,
    /// Operator / engine state.
    pub availability: Availability,
}

impl Candidate {
    /// Executions it can still take.
    pub fn free_slots(&self) -> u32 {
        self.capabilities
            .max_concurrent
            .saturating_sub(self.in_flight)
    }

    /// Load in [0, ∞): in-flight over capacity, plus the backend's own queue if it reports one.
    pub fn load(&self) -> f64 {
        let cap = f64::from(self.capabilities.max_concurrent.max(1));
        let extra = f64::from(
            self.health
                .queue_depth
                .unwrap_or(0)
                .saturating_sub(self.in_flight),
        );
        (f64::from(self.in_flight) + extra) / cap
    }
}

/// Where a job goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// Run it here.
    Run {
        /// The chosen backend.
        backend: BackendId,
        /// Backends passed over and why.
        skipped: Vec<Skip>,
    },
    /// Nothing can take it now; look again later.
    Wait {
        /// Why (shown to the user).
        reason: String,
        /// When something changes (a block runs out); `None`: when capacity frees.
        until: Option<Timestamp>,
        /// Backends passed over and why.
        skipped: Vec<Skip>,
    },
    /// No backend in the fleet can ever run it as things stand (e.g. nobody has a node class).
    Impossible {
        /// Why; recorded as the job's failure.
        error: ExecutionError,
        /// Backends passed over and why.
        skipped: Vec<Skip>,
    },
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again after `delay` (where: the next `pick` decides; blocks keep it away from the
    /// backend that failed).
    Retry {
        /// How long to wait first.
        delay: Duration,
    },
    /// Do not try again.
    GiveUp,
}

/// Decides where jobs go and what failures mean.
#[async_trait]
pub trait FailoverStrategy: Send + Sync + 'static {
    /// Chooses a backend for `job` (whose effective workflow is `workflow`) among `candidates`.
    async fn pick(
        &self,
        job: &JobRecord,
        workflow: &Workflow,
        candidates: &[Candidate],
        now: Timestamp,
    ) -> Placement;

    /// An attempt on `backend` failed with `error`.
    async fn on_failure(
        &self,
        job: &JobRecord,
        workflow: &Workflow,
        backend: &BackendId,
        error: &ExecutionError,
        now: Timestamp,
    ) -> Decision;

    /// An attempt on `backend` succeeded after `run_time`.
    async fn on_success(
        &self,
        job: &JobRecord,
        workflow: &Workflow,
        backend: &BackendId,
        run_time: Duration,
        now: Timestamp,
    );

    /// A health check of `backend` came back.
    async fn on_health(&self, backend: &BackendId, health: &Health, now: Timestamp) {
        let _ = (backend, health, now);
    }

    /// Fleet events the strategy produced since the last call (blocks, unblocks, circuit
    /// changes); `now` lets it notice blocks that ran out.
    fn take_notices(&self, now: Timestamp) -> Vec<FleetEvent> {
        let _ = now;
        Vec::new()
    }

    /// What currently keeps work away from backends (blocks, open circuits), for operators
    /// and for the other orchestrators sharing the store. The default answer is "nothing".
    fn restrictions(&self, now: Timestamp) -> Vec<Restriction> {
        let _ = now;
        Vec::new()
    }

    /// Restrictions in force across the fleet (from [`crate::TaskStore::share_restrictions`]):
    /// another orchestrator blocked a backend for a workflow or opened its circuit. A strategy
    /// that keeps such state applies those it does not have yet (or has with an earlier
    /// `until`). The default ignores them.
    fn adopt(&self, restrictions: &[Restriction], now: Timestamp) {
        let _ = (restrictions, now);
    }
}

/// Something that keeps a backend from getting (some) work for a while, as reported by
/// [`FailoverStrategy::restrictions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Restriction {
    /// The backend.
    pub backend: BackendId,
    /// `blocked` (one workflow structure) or `circuit_open` (everything).
    pub kind: RestrictionKind,
    /// The workflow structure it applies to (`blocked` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structure: Option<WorkflowHash>,
    /// When it lifts.
    pub until: Timestamp,
    /// Why.
    pub reason: String,
}

/// The kind of a [`Restriction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RestrictionKind {
    /// Jobs of one workflow structure are kept away after a failure there.
    Blocked,
    /// Repeated transient failures: no work at all until the cooldown ends.
    CircuitOpen,
}
