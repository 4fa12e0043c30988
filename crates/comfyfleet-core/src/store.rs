//! The [`TaskStore`] trait: durable job state.
//!
//! The contract every implementation follows (and `comfyfleet-testkit`'s conformance suite
//! checks):
//!
//! * **States.** `pending → running → succeeded | failed | cancelled`, `running → retry_wait →
//!   running`, `running → pending` (released unplaced), `pending | retry_wait → cancelled`.
//! * **Claim** picks the due job (`run_at <= now`, state `pending` or `retry_wait`) with the
//!   highest priority, then the oldest (submission order), sets it `running`, increments
//!   `claims` — the **fencing token** carried in the [`Lease`] — and sets the lease owner and
//!   expiry. Claim never takes a job whose lease merely expired: the reaper requeues those.
//! * **Fencing.** Every write made under a lease (`heartbeat`, `release`, `start_attempt`,
//!   `update_attempt`, `complete`, `fail`, `ack_cancel`, `detach`) succeeds only while the job is
//!   `running` with `claims == lease.attempt`; otherwise it returns [`StoreError::LeaseLost`] and
//!   changes nothing. An expired lease is *not* lost until someone reclaims the job: a late
//!   heartbeat from a slow-but-alive owner renews it.
//! * **Cancel** moves `pending`/`retry_wait` to `cancelled` at once; on a `running` job it
//!   answers [`CancelOutcome::Running`] and changes nothing. **Force-cancel** does the same for
//!   `pending`/`retry_wait` and, on a `running` job, sets `cancel_requested_at` (returned to the
//!   lease holder by the next heartbeat); the holder stops the remote execution and calls
//!   `ack_cancel`. If the run completes first, `complete` wins and the job stays `succeeded`.
//! * **Attempts.** `fail` with a retry time moves the job to `retry_wait` only while
//!   `counted_attempts() < max_attempts` and the job's deadline (if any) is after the retry
//!   time; otherwise to `failed`.
//! * **Reaper** ([`TaskStore::reap`]): a `running` job whose lease expired is finalised as
//!   `cancelled` if a cancel was requested, else requeued (`retry_wait`, `run_at = now`,
//!   `crash_requeues + 1`, the running attempt closed as `lease_expired` with its remote kept for
//!   reattachment), or `failed` once `crash_requeues` reached the cap. A `running` job with a live
//!   lease whose progress is older than `stuck_after`, or whose phase deadline or job deadline has
//!   passed, has its attempt closed as `timed_out` and is retried or failed like `fail`. A
//!   `pending`/`retry_wait` job past its deadline is failed. `dry_run` reports the same items and
//!   changes nothing.
//! * **Events.** Every state change appends its event(s) in the same transaction; each event gets
//!   a global increasing `id` and a per-job `seq` (1, 2, 3, …). Methods return the events they
//!   appended so the caller can publish them.
//! * **Fine print** (pinned by the conformance suite, so every store behaves alike):
//!   `ack_cancel` cancels even without a prior force-cancel; `detach` keeps a pending cancel
//!   request for the next holder, while `release` and `fail` honour it at once; a running job
//!   with no attempt yet is never reaped for deadlines or silence (only for lease expiry); when
//!   several reap reasons apply the order is lease expiry, job deadline, phase deadline, no
//!   progress, and every limit triggers exactly at its instant; a retry must come strictly before
//!   the job's deadline; an idempotency key matches any stored job, finished or not, until it is
//!   pruned; a duplicate job id is `InvalidInput`; `list` returns `next = None` exactly on the
//!   last page. Event sequences per transition are those of `MemoryStore`.
//! * **Fleet capacity.** `start_attempt` with [`AttemptStart::capacity`] counts the backend's
//!   open attempts (any job, any owner) and refuses with [`StoreError::BackendFull`] at the
//!   capacity, atomically with the insert: orchestrators sharing a store never run more than
//!   a backend's capacity between them. `backend_load` reports the same counts.
//! * No implementation holds a transaction across a call to a backend (the trait makes that
//!   impossible: every method is one short unit of work).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{ExecutionError, StoreError};
use crate::event::{Event, EventKind, Skip};
use crate::ids::{BackendId, JobId, RemoteRef};
use crate::job::{
    Artifact, AttemptOutcome, CancelStep, JobRecord, JobSpec, JobState, JobSummary, NodeTiming,
    PhaseDeadline,
};
use crate::progress::Progress;
use crate::strategy::Restriction;
use crate::time::Timestamp;

/// A job to enqueue. The caller picks the id (`JobId::new()`), so that a retried enqueue after a
/// lost answer is harmless when combined with an idempotency key.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The id.
    pub id: JobId,
    /// What to run.
    pub spec: JobSpec,
}

impl NewJob {
    /// A job with a fresh id.
    pub fn new(spec: JobSpec) -> Self {
        NewJob {
            id: JobId::new(),
            spec,
        }
    }
}

/// The answer to an enqueue.
#[derive(Debug, Clone)]
pub struct Enqueued {
    /// The job's id (an existing job's id if the idempotency key matched).
    pub id: JobId,
    /// False when the idempotency key matched an existing job: nothing was added.
    pub created: bool,
    /// Events appended.
    pub events: Vec<Event>,
}

/// Proof of a claim: the fencing token every later write carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Lease {
    /// The job.
    pub job: JobId,
    /// The claim number (`JobRecord::claims` at claim time).
    pub attempt: u32,
    /// Who holds it.
    pub owner: String,
}

/// A claimed job.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The lease.
    pub lease: Lease,
    /// The job as it is now (state `running`).
    pub job: JobRecord,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// A force-cancel is pending: stop the remote execution and `ack_cancel`.
    pub cancel_requested: bool,
    /// The new lease expiry.
    pub expires_at: Timestamp,
}

/// A new attempt.
#[derive(Debug, Clone)]
pub struct AttemptStart {
    /// Where it runs.
    pub backend: BackendId,
    /// The remote execution, when continuing one (reattach).
    pub remote: Option<RemoteRef>,
    /// It continues an earlier attempt's remote execution.
    pub reattached: bool,
    /// Backends passed over and why.
    pub skipped: Vec<Skip>,
    /// The first supervision phase.
    pub phase: Option<PhaseDeadline>,
    /// The backend's capacity across every orchestrator sharing the store: the store refuses
    /// the attempt with [`StoreError::BackendFull`] (changing nothing) while the backend already
    /// has this many open attempts. `None`: not checked (one orchestrator counts its own).
    pub capacity: Option<u32>,
}

/// Things that happened during an attempt, written together (progress writes are coalesced by
/// the engine: a few per second at most, never one per tick).
#[derive(Debug, Clone, Default)]
pub struct AttemptUpdate {
    /// The remote id, once accepted.
    pub remote: Option<RemoteRef>,
    /// When it started running on the backend.
    pub started_at: Option<Timestamp>,
    /// The current supervision phase.
    pub phase: Option<PhaseDeadline>,
    /// Latest progress (also marks a sign of life for the reaper).
    pub progress: Option<Progress>,
    /// Events to append, in order.
    pub events: Vec<EventKind>,
}

/// A finished attempt.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    /// All outputs.
    pub artifacts: Vec<Artifact>,
    /// Per-node timings.
    pub nodes: Vec<NodeTiming>,
    /// Final progress (100 %).
    pub progress: Option<Progress>,
}

/// A failed attempt.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Why.
    pub error: ExecutionError,
    /// How the attempt ended (`failed`, `timed_out`, `cancelled`).
    pub outcome: AttemptOutcome,
    /// Per-node timings so far.
    pub nodes: Vec<NodeTiming>,
    /// Retry at this time (`None`: give up). The store still fails the job if no attempts are
    /// left or the deadline would pass.
    pub retry_at: Option<Timestamp>,
    /// Force-cancel steps to record.
    pub cancel_steps: Vec<CancelStep>,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The job is now `cancelled`.
    Cancelled,
    /// Force-cancel of a running job: the lease holder was asked to stop it.
    CancelRequested,
    /// A force-cancel was already pending.
    AlreadyRequested,
    /// Plain cancel of a running job: nothing changed (use force).
    Running,
    /// The job had already ended in this state.
    AlreadyTerminal(JobState),
}

/// The answer to a cancel.
#[derive(Debug, Clone)]
pub struct CancelResult {
    /// What happened.
    pub outcome: CancelOutcome,
    /// Events appended.
    pub events: Vec<Event>,
}

/// What the reaper looks for.
#[derive(Debug, Clone)]
pub struct ReapOptions {
    /// Report only; change nothing.
    pub dry_run: bool,
    /// A running job with a live lease and no progress for this long is stuck (`None`: only
    /// deadlines count).
    pub stuck_after: Option<Duration>,
    /// A job whose orchestrator died this many times is failed instead of requeued.
    pub max_crash_requeues: u32,
}

impl Default for ReapOptions {
    fn default() -> Self {
        ReapOptions {
            dry_run: false,
            stuck_after: None,
            max_crash_requeues: 3,
        }
    }
}

/// Why the reaper picked a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReapReason {
    /// The lease ran out: the orchestrator holding it is gone.
    LeaseExpired,
    /// No progress for longer than `stuck_after`.
    NoProgress,
    /// The running attempt's phase deadline passed.
    PhaseDeadline,
    /// The job's own deadline passed.
    JobDeadline,
}

/// What the reaper does (or would do) to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReapAction {
    /// Back to `retry_wait`, to be reattached or retried.
    Requeue,
    /// To `failed`.
    Fail,
    /// To `cancelled` (a force-cancel whose owner died).
    Cancel,
}

/// One job the reaper found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReapItem {
    /// The job.
    pub job: JobId,
    /// Its state when found.
    pub state: JobState,
    /// The claim number.
    pub attempt: u32,
    /// The lease owner, if running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The backend of the running attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendId>,
    /// Time since the job was submitted, in ms.
    pub age_ms: u64,
    /// When progress was last recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_at: Option<Timestamp>,
    /// Why.
    pub reason: ReapReason,
    /// What is (or would be) done.
    pub action: ReapAction,
}

/// The reaper's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReapReport {
    /// Whether anything was changed.
    pub dry_run: bool,
    /// What was found, ordered by job id.
    pub items: Vec<ReapItem>,
    /// Events appended by a real run (empty for a dry run), for the caller to publish.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

/// A list query. Newest first; paginate with `before` (the last id of the previous page).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobFilter {
    /// Only these states (empty: all).
    #[serde(default)]
    pub states: Vec<JobState>,
    /// Only jobs whose latest attempt ran here.
    #[serde(default)]
    pub backend: Option<BackendId>,
    /// Only jobs with this label (`key`, `value`).
    #[serde(default)]
    pub label: Option<(String, String)>,
    /// Submitted at or after.
    #[serde(default)]
    pub created_after: Option<Timestamp>,
    /// Submitted before.
    #[serde(default)]
    pub created_before: Option<Timestamp>,
    /// Error message contains this text (case-insensitive).
    #[serde(default)]
    pub error_contains: Option<String>,
    /// Jobs older than this id only (keyset pagination).
    #[serde(default)]
    pub before: Option<JobId>,
    /// Page size, 1 to 1000 (0: 100).
    #[serde(default)]
    pub limit: u32,
}

impl JobFilter {
    /// The page size after defaults and bounds.
    pub fn effective_limit(&self) -> Result<usize, StoreError> {
        match self.limit {
            0 => Ok(100),
            n @ 1..=1000 => Ok(n as usize),
            n => Err(StoreError::InvalidInput(format!(
                "limit must be 1 to 1000, got {n}"
            ))),
        }
    }

    /// Whether a job matches (for stores that filter in memory).
    pub fn matches(&self, job: &JobRecord) -> bool {
        if !self.states.is_empty() && !self.states.contains(&job.state) {
            return false;
        }
        if let Some(b) = &self.backend
            && job.attempts.last().map(|a| &a.backend) != Some(b)
        {
            return false;
        }
        if let Some((k, v)) = &self.label
            && job.spec.labels.get(k) != Some(v)
        {
            return false;
        }
        if self.created_after.is_some_and(|t| job.created_at < t) {
            return false;
        }
        if self.created_before.is_some_and(|t| job.created_at >= t) {
            return false;
        }
        if let Some(text) = &self.error_contains {
            let needle = text.to_lowercase();
            match &job.error {
                Some(e) if e.message.to_lowercase().contains(&needle) => {}
                _ => return false,
            }
        }
        if let Some(before) = self.before
            && job.id >= before
        {
            return false;
        }
        true
    }
}

/// A page of jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobPage {
    /// The jobs, newest first.
    pub jobs: Vec<JobSummary>,
    /// Pass as `before` for the next page (`None`: this was the last).
    pub next: Option<JobId>,
}

/// Jobs per state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StateCounts(pub BTreeMap<JobState, u64>);

impl StateCounts {
    /// The count for one state.
    pub fn get(&self, s: JobState) -> u64 {
        self.0.get(&s).copied().unwrap_or(0)
    }

    /// All jobs.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// An event query: one job's events or everyone's, after an id.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// One job (`None`: all).
    pub job: Option<JobId>,
    /// Only events with a larger id.
    pub after: Option<u64>,
    /// At most this many (0: 1000).
    pub limit: u32,
}

/// Durable job state. See the module documentation for the contract.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Adds a job (state `pending`, `run_at = now`) and its `submitted` event. With an
    /// idempotency key already in the store, returns the existing job and adds nothing.
    async fn enqueue(&self, job: NewJob, now: Timestamp) -> Result<Enqueued, StoreError>;

    /// Claims the next due job for `owner`, with a lease of `lease_ttl`.
    async fn claim(
        &self,
        owner: &str,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<Option<Claimed>, StoreError>;

    /// Renews the lease; tells the holder whether a force-cancel is pending.
    async fn heartbeat(
        &self,
        lease: &Lease,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<HeartbeatAck, StoreError>;

    /// Gives a claimed job back unplaced (`pending`, `run_at`, `wait_reason = reason`) with a
    /// `waiting` event. No attempt is recorded.
    async fn release(
        &self,
        lease: &Lease,
        run_at: Timestamp,
        reason: &str,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError>;

    /// Records a new attempt (and its `dispatched` or `reattached` event).
    async fn start_attempt(
        &self,
        lease: &Lease,
        start: AttemptStart,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError>;

    /// Records what happened during the running attempt.
    async fn update_attempt(
        &self,
        lease: &Lease,
        update: AttemptUpdate,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError>;

    /// The running attempt succeeded: job `succeeded`, with its outputs.
    async fn complete(
        &self,
        lease: &Lease,
        completion: Completion,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError>;

    /// The running attempt failed (or was never started: then pass the error and no attempt is
    /// closed). The job goes to `retry_wait` or `failed`.
    async fn fail(
        &self,
        lease: &Lease,
        failure: Failure,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError>;

    /// Cancels a pending or retry-waiting job.
    async fn cancel(
        &self,
        id: JobId,
        reason: &str,
        now: Timestamp,
    ) -> Result<CancelResult, StoreError>;

    /// Cancels a job whatever its state; a running job's holder is asked to stop it.
    async fn force_cancel(
        &self,
        id: JobId,
        reason: &str,
        now: Timestamp,
    ) -> Result<CancelResult, StoreError>;

    /// The lease holder stopped a force-cancelled execution: job `cancelled`.
    async fn ack_cancel(
        &self,
        lease: &Lease,
        steps: Vec<CancelStep>,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError>;

    /// The holder shuts down and hands a running job back for reattachment: the attempt is
    /// closed as `detached` (remote kept), the job goes to `retry_wait` with `run_at = now`.
    /// Not counted as a crash requeue.
    async fn detach(&self, lease: &Lease, now: Timestamp) -> Result<Vec<Event>, StoreError>;

    /// Finds (and unless `dry_run`, handles) stuck jobs.
    async fn reap(&self, options: &ReapOptions, now: Timestamp) -> Result<ReapReport, StoreError>;

    /// One job.
    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;

    /// A page of jobs.
    async fn list(&self, filter: &JobFilter) -> Result<JobPage, StoreError>;

    /// Jobs per state.
    async fn counts(&self) -> Result<StateCounts, StoreError>;

    /// Events in id order.
    async fn events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError>;

    /// Deletes terminal jobs that finished before `finished_before`, with their events; returns
    /// how many jobs were deleted. A store that is also an [`crate::InstallStore`] deletes
    /// finished installs older than the cutoff with their events too (not counted; the
    /// recorded packs stay).
    async fn prune(&self, finished_before: Timestamp) -> Result<u64, StoreError>;

    /// Writes a consistent copy of the store to `dest`.
    async fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        let _ = dest;
        Err(StoreError::NotSupported("backup"))
    }

    /// Open attempts (started, not yet ended) per backend, across every orchestrator sharing
    /// the store; backends without one are absent. What [`AttemptStart::capacity`] is checked
    /// against.
    async fn backend_load(&self) -> Result<BTreeMap<BackendId, u32>, StoreError> {
        Err(StoreError::NotSupported("backend_load"))
    }

    /// Shares restrictions (workflow blocks, open circuits) between orchestrators: stores
    /// `mine` (a restriction already stored for the same backend, kind and structure keeps the
    /// later `until`), forgets those that lifted by `now`, and returns every one still in force,
    /// in (backend, kind, structure) order.
    async fn share_restrictions(
        &self,
        mine: &[Restriction],
        now: Timestamp,
    ) -> Result<Vec<Restriction>, StoreError> {
        let _ = (mine, now);
        Err(StoreError::NotSupported("share_restrictions"))
    }

    /// A wake-up hint shared by orchestrators: the value changes when another process
    /// enqueued, released or requeued a job, or appended events (PostgreSQL's `LISTEN/NOTIFY`).
    /// Only a hint: a lost one delays, never loses, work, as callers keep polling. `None`: the
    /// store has no such channel.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Takes or renews the maintenance leadership for `ttl`; true if `owner` leads now.
    async fn try_lead(
        &self,
        owner: &str,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<bool, StoreError>;
}
