//! Request and response bodies that are the API's own (the rest are core types, serialized as
//! they are: `JobRecord`, `JobPage`, `Event`, `ReapReport`, …).

use std::collections::BTreeMap;

use comfyfleet::engine::BackendStatus;
use comfyfleet_core::install::{InstallEvent, InstallRecord, InstalledPack, NodeCounts};
use comfyfleet_core::{
    Availability, BackendId, CancelOutcome, Constraints, Health, InputOverrides, InstallId, JobId,
    JobSpec, JobState, Restriction, TimeoutOverrides, Upload, Workflow,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A job to run. Only `workflow` is required.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The API-format workflow (`{"3": {"class_type": "KSampler", "inputs": {…}}, …}`).
    pub workflow: Workflow,
    /// Widget values to replace before running: node id → input name → value.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub inputs: InputOverrides,
    /// Input files stored with `POST /v1/inputs` (or sent as parts of a multipart submit).
    #[serde(default)]
    pub uploads: Vec<Upload>,
    /// Higher runs first; ties by age.
    #[serde(default)]
    pub priority: i32,
    /// Whole-job deadline, milliseconds from submission.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Most executions (1–100, default 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Clock overrides.
    #[serde(default)]
    pub timeouts: TimeoutOverrides,
    /// Labels for filtering.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where it may run.
    #[serde(default)]
    pub constraints: Constraints,
    /// Submitting twice with the same key yields the same job.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// `http(s)` URL told when the job ends (signed; needs the server's `webhook_secret`).
    #[serde(default)]
    pub webhook: Option<String>,
}

impl SubmitRequest {
    /// The job spec it describes.
    pub fn into_spec(self) -> JobSpec {
        let mut spec = JobSpec::new(self.workflow);
        spec.inputs = self.inputs;
        spec.uploads = self.uploads;
        spec.priority = self.priority;
        spec.deadline_ms = self.deadline_ms;
        if let Some(n) = self.max_attempts {
            spec.max_attempts = n;
        }
        spec.timeouts = self.timeouts;
        spec.labels = self.labels;
        spec.constraints = self.constraints;
        spec.idempotency_key = self.idempotency_key;
        spec.webhook = self.webhook;
        spec
    }
}

/// A stored job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SubmitResponse {
    /// Its id.
    pub id: JobId,
    /// `false` when the idempotency key matched an existing job (that job's id is returned).
    pub created: bool,
    /// Its state now.
    pub state: JobState,
}

/// `GET /v1/jobs` filters.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Comma-separated states (`pending,running`).
    pub state: Option<String>,
    /// Jobs whose latest attempt ran on this backend.
    pub backend: Option<String>,
    /// `key=value`.
    pub label: Option<String>,
    /// Error message contains this text.
    pub error: Option<String>,
    /// Created at or after (ms since epoch).
    pub created_after: Option<u64>,
    /// Created before (ms since epoch).
    pub created_before: Option<u64>,
    /// Page cursor: the `next` of the previous page.
    pub before: Option<JobId>,
    /// Page size (1–1000, default 50).
    pub limit: Option<u32>,
}

/// Counts of jobs by state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CountsResponse {
    /// State → count (every state is listed).
    pub counts: BTreeMap<JobState, u64>,
    /// All jobs.
    pub total: u64,
}

/// `?force=true` turns a cancel into a force-cancel.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CancelQuery {
    /// Stop a running execution too (the cancel ladder).
    #[serde(default)]
    pub force: bool,
}

/// What a cancel did.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CancelResponse {
    /// The job.
    pub id: JobId,
    /// What happened.
    pub outcome: CancelOutcome,
}

/// Cancel many jobs.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchCancelRequest {
    /// The jobs (at most 1,000).
    pub ids: Vec<JobId>,
    /// Force-cancel (stop running executions too).
    #[serde(default)]
    pub force: bool,
}

/// One job's result in a batch cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchCancelResult {
    /// Was pending or waiting: now cancelled.
    Cancelled,
    /// Running: the cancel ladder is stopping it.
    CancelRequested,
    /// A force-cancel was already under way.
    AlreadyRequested,
    /// Running and `force` was not set: left alone.
    Running,
    /// Already succeeded, failed or cancelled.
    AlreadyTerminal,
    /// No such job.
    NotFound,
    /// The store failed for this one; retry it.
    Error,
}

/// One job's line in a batch cancel answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchCancelItem {
    /// The job.
    pub id: JobId,
    /// What happened.
    pub result: BatchCancelResult,
    /// Details (the terminal state, the error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The batch cancel answer, one item per id, in request order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchCancelResponse {
    /// Per-id results.
    pub results: Vec<BatchCancelItem>,
}

/// `?after=<event id>&limit=` for stored events.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events with a larger id.
    pub after: Option<u64>,
    /// At most this many (1–1000, default 1000).
    pub limit: Option<u32>,
}

/// `?after=<event id>` for live streams.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Resume after this event id (SSE clients may send `Last-Event-ID` instead).
    pub after: Option<u64>,
}

/// A backend as the service shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BackendView {
    /// Its id.
    pub id: BackendId,
    /// `comfyui`, `simulated`, …
    pub kind: String,
    /// Executions it runs at once.
    pub capacity: u32,
    /// Our executions running there now.
    pub in_flight: u32,
    /// Latest health check.
    pub health: Health,
    /// Active, draining or quarantined.
    pub availability: Availability,
    /// What the failover strategy keeps away from it now.
    pub blocks: Vec<Restriction>,
    /// Installed node classes (`null`: unknown).
    pub node_classes: Option<usize>,
    /// Models it has (`null`: unknown).
    pub models: Option<usize>,
}

impl From<BackendStatus> for BackendView {
    fn from(b: BackendStatus) -> Self {
        BackendView {
            id: b.id,
            kind: b.kind.to_owned(),
            capacity: b.capabilities.max_concurrent,
            in_flight: b.in_flight,
            health: b.health,
            availability: b.availability,
            blocks: b.restrictions,
            node_classes: b.inventory.node_classes.as_ref().map(|c| c.len()),
            models: b.inventory.models.as_ref().map(|m| m.len()),
        }
    }
}

/// Run the reaper.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReapRequest {
    /// Report what would change without changing anything (default `true`: say `false` to act).
    #[serde(default = "yes")]
    pub dry_run: bool,
    /// Treat running jobs without progress for this long as stuck (seconds).
    #[serde(default)]
    pub stuck_after_secs: Option<f64>,
}

fn yes() -> bool {
    true
}

/// Take a backup.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {}

/// Where a backup went.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BackupResponse {
    /// The backup file on the server's disk.
    pub path: String,
}

/// Delete old finished jobs.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Delete jobs that finished more than this many seconds ago (at least 60).
    pub older_than_secs: u64,
    /// Skip the automatic backup taken first.
    #[serde(default)]
    pub no_backup: bool,
}

/// What pruning did.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PruneResponse {
    /// Jobs deleted.
    pub pruned: u64,
    /// The backup taken first, if any.
    pub backup: Option<String>,
}

/// `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StatusResponse {
    /// `ok`, `ready` or `not_ready`.
    pub status: &'static str,
    /// Why not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Healthy backends (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends_healthy: Option<usize>,
    /// All backends (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends_total: Option<usize>,
}

// ---------------------------------------------------------------------------------------------
// Installs

/// An install as the API shows it: the stored record with its URLs redacted (the fields of
/// `InstallRecord`), plus counts over its packs.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InstallView {
    /// The record (credentials and query strings in URLs hidden).
    #[serde(flatten)]
    pub install: InstallRecord,
    /// Counts over the packs (`processed/total`, succeeded, failed).
    pub counts: NodeCounts,
}

impl InstallView {
    /// The redacted view of a stored record: the only form in which a record leaves the server.
    pub fn of(record: &InstallRecord) -> InstallView {
        InstallView {
            install: record.redacted(),
            counts: record.counts(),
        }
    }
}

/// `GET /v1/installs`: installs, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InstallList {
    /// The installs.
    pub installs: Vec<InstallView>,
}

/// `GET /v1/installs` filters.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InstallListQuery {
    /// Only installs on this instance.
    pub instance: Option<String>,
    /// Comma-separated states (`queued,running`).
    pub state: Option<String>,
    /// Page cursor: installs created before this one (the last id of the previous page).
    pub before: Option<InstallId>,
    /// Page size (1–1000, default 50).
    pub limit: Option<u32>,
}

/// `GET /v1/installs/{id}/events` options.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InstallEventsQuery {
    /// Only events with a larger `seq` (SSE clients may send `Last-Event-ID` instead).
    pub after: Option<u64>,
    /// `json` for one page of stored events as JSON (like `Accept: application/json`), `sse`
    /// (default) for the live stream.
    pub format: Option<String>,
    /// Page size of the JSON form (1–1000, default 1000).
    pub limit: Option<u32>,
}

/// One page of an install's stored events, oldest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InstallEventPage {
    /// The events (`seq` from 1).
    pub events: Vec<InstallEvent>,
}

/// `GET /v1/instances/{name}/packs`: what is recorded as installed and verified there.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InstancePacks {
    /// The packs, by name.
    pub packs: Vec<InstalledPack>,
}
