//! Jobs: what a user submits ([`JobSpec`]), where it stands ([`JobState`], [`JobRecord`]) and what
//! each try did ([`Attempt`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ExecutionError;
use crate::error::TimeoutPhase;
use crate::ids::{BackendId, JobId, RemoteRef};
use crate::progress::Progress;
use crate::time::Timestamp;
use crate::workflow::{InputOverrides, NodeId, Workflow, WorkflowError};

/// Default number of executions a job may have.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Per-job overrides of the engine's supervision clocks, in milliseconds (0 turns a clock off).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TimeoutOverrides {
    /// Start timeout: accepted and at the head of the backend's queue, but not started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<u64>,
    /// Node timeout: no event from the running node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ms: Option<u64>,
    /// Node timeout per node class; wins over `node_ms`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_class_ms: BTreeMap<String, u64>,
}

/// Where a job may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Constraints {
    /// Only these backends (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendId>,
    /// Backend labels that must match (`gpu = "a100"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A file the workflow needs on the backend (an image for `LoadImage`), identified by content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Upload {
    /// The name the workflow refers to.
    pub name: String,
    /// SHA-256 of the bytes, hex; uploads are deduplicated per backend by it.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Everything a user submits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobSpec {
    /// The API-format workflow.
    pub workflow: Workflow,
    /// Widget values to replace before running.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = BTreeMap<String, BTreeMap<String, Value>>)
    )]
    pub inputs: InputOverrides,
    /// Input files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uploads: Vec<Upload>,
    /// Higher runs first; ties by age.
    #[serde(default)]
    pub priority: i32,
    /// Whole-job deadline in milliseconds from submission (`None`: no deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Most executions the job may have (at least 1).
    #[serde(default = "default_max_attempts")]
    #[cfg_attr(feature = "openapi", schema(default = default_max_attempts))]
    pub max_attempts: u32,
    /// Clock overrides.
    #[serde(default)]
    pub timeouts: TimeoutOverrides,
    /// Free-form labels for filtering (`project = "cats"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Where it may run.
    #[serde(default)]
    pub constraints: Constraints,
    /// Submitting twice with the same key yields the same job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// An `http(s)` URL told (by `POST`) when the job ends; the service delivers it, signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

impl JobSpec {
    /// A spec with defaults: priority 0, no deadline, 3 attempts.
    pub fn new(workflow: Workflow) -> Self {
        JobSpec {
            workflow,
            inputs: InputOverrides::new(),
            uploads: Vec::new(),
            priority: 0,
            deadline_ms: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeouts: TimeoutOverrides::default(),
            labels: BTreeMap::new(),
            constraints: Constraints::default(),
            idempotency_key: None,
            webhook: None,
        }
    }

    /// Sets the priority.
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }

    /// Sets the most executions.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Sets the whole-job deadline.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Adds a label.
    pub fn label(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    /// Restricts the job to these backends.
    pub fn only_on(mut self, backends: impl IntoIterator<Item = BackendId>) -> Self {
        self.constraints.backends = backends.into_iter().collect();
        self
    }

    /// Checks the spec as a whole; the workflow was validated when it was built.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.max_attempts == 0 {
            return Err(SpecError::Invalid("max_attempts must be at least 1".into()));
        }
        if self.max_attempts > 100 {
            return Err(SpecError::Invalid(
                "max_attempts must be at most 100".into(),
            ));
        }
        if let Some(k) = &self.idempotency_key
            && (k.is_empty() || k.len() > 256)
        {
            return Err(SpecError::Invalid(
                "idempotency_key must be 1 to 256 characters".into(),
            ));
        }
        for u in &self.uploads {
            crate::inputs::check_input_name(&u.name)
                .map_err(|e| SpecError::Invalid(e.to_string()))?;
            if u.sha256.len() != 64 || !u.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(SpecError::Invalid(format!(
                    "upload {}: sha256 must be 64 hex digits",
                    u.name
                )));
            }
        }
        if let Some(w) = &self.webhook
            && !(w.len() <= 2048 && (w.starts_with("http://") || w.starts_with("https://")))
        {
            return Err(SpecError::Invalid(
                "webhook must be an http:// or https:// URL of at most 2048 characters".into(),
            ));
        }
        if self.deadline_ms == Some(0) {
            return Err(SpecError::Invalid("deadline_ms must be positive".into()));
        }
        self.effective_workflow()?;
        Ok(())
    }

    /// The workflow with the input overrides applied.
    pub fn effective_workflow(&self) -> Result<Workflow, WorkflowError> {
        self.workflow.with_overrides(&self.inputs)
    }
}

/// Why a spec was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The workflow (after overrides) is invalid.
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
    /// Some other field is invalid.
    #[error("{0}")]
    Invalid(String),
}

/// Where a job stands. `pending → running → succeeded | failed | cancelled`, with
/// `retry_wait → running` between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its first execution (or for a backend to become available).
    Pending,
    /// Claimed by an engine; an attempt is being placed or runs.
    Running,
    /// A failed attempt will be retried at `run_at`.
    RetryWait,
    /// Done, with outputs.
    Succeeded,
    /// Gave up; `error` says why.
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl JobState {
    /// All states, in lifecycle order.
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Running,
        JobState::RetryWait,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// Succeeded, failed or cancelled: nothing will change it again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::RetryWait => "retry_wait",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown job state {s:?} (pending, running, retry_wait, succeeded, failed, cancelled)")
            })
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The backend finished it.
    Succeeded,
    /// The backend (or the engine) reported a failure.
    Failed,
    /// A supervision clock ran out.
    TimedOut,
    /// Cancelled by a user.
    Cancelled,
    /// The orchestrator holding it died (its lease expired); the remote may still run.
    LeaseExpired,
    /// The orchestrator shut down and handed it back for reattachment.
    Detached,
}

/// One node's run inside an attempt (profiling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeTiming {
    /// The node.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub node: NodeId,
    /// Its class, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_type: Option<String>,
    /// When it started (for a cached node: when the cache hit was reported).
    pub started_at: Timestamp,
    /// When it finished; `None` if it never did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Timestamp>,
    /// Served from the backend's cache.
    #[serde(default)]
    pub cached: bool,
}

/// A step of the force-cancel ladder, recorded on the attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CancelStep {
    /// When it was taken.
    pub at: Timestamp,
    /// What was done: `remote_cancel`, `restart_backend`, `quarantine_backend`.
    pub action: String,
    /// What came of it.
    pub result: String,
}

/// The current supervision phase of a running attempt and when it runs out; stored so that it
/// survives a restart and is visible to users and the reaper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PhaseDeadline {
    /// Which clock guards the attempt now.
    pub phase: TimeoutPhase,
    /// When it runs out (`None`: that clock is off).
    pub deadline: Option<Timestamp>,
}

/// One execution of a job on one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Attempt {
    /// The claim (fencing token) that made this attempt.
    pub number: u32,
    /// Where it ran.
    pub backend: BackendId,
    /// The backend's id for it, once accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteRef>,
    /// When it was dispatched.
    pub dispatched_at: Timestamp,
    /// When it started running on the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Timestamp>,
    /// How it ended (`None`: still running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AttemptOutcome>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ExecutionError>,
    /// Per-node timings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeTiming>,
    /// This attempt continues an earlier one's remote execution after a restart.
    #[serde(default)]
    pub reattached: bool,
    /// Force-cancel ladder steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cancel_steps: Vec<CancelStep>,
}

/// An output of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Artifact {
    /// The node that produced it.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub node: NodeId,
    /// File name.
    pub filename: String,
    /// `image`, `video`, `audio`, `text`, …
    pub kind: String,
    /// MIME type when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Size in bytes once fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// SHA-256 of the bytes once fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The backend that holds it.
    pub backend: BackendId,
    /// Backend-specific locator (ComfyUI `{filename, subfolder, type}`, a RunningHub `fileUrl`).
    #[serde(default)]
    pub locator: Value,
}

/// The MIME type of an output file by its extension, for the formats ComfyUI workflows write
/// (`None`: unknown; serve it as `application/octet-stream`).
pub fn content_type_for(filename: &str) -> Option<&'static str> {
    let (_, ext) = filename.rsplit_once('.')?;
    Some(match ext.to_ascii_lowercase().as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "glb" => "model/gltf-binary",
        "txt" => "text/plain",
        "json" => "application/json",
        _ => return None,
    })
}

/// The owner and expiry of a running job's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseInfo {
    /// The engine instance holding it.
    pub owner: String,
    /// When it runs out unless renewed.
    pub expires_at: Timestamp,
}

/// Everything a store knows about a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobRecord {
    /// The id.
    pub id: JobId,
    /// What was submitted.
    pub spec: JobSpec,
    /// Where it stands.
    pub state: JobState,
    /// Submission time.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// When it may next be claimed (pending / retry_wait).
    pub run_at: Timestamp,
    /// Whole-job deadline, from `spec.deadline_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// Number of claims so far: the fencing token of the current lease.
    pub claims: u32,
    /// Executions so far.
    pub attempts: Vec<Attempt>,
    /// Times the job was requeued because its orchestrator died.
    pub crash_requeues: u32,
    /// The current lease (running only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseInfo>,
    /// A force-cancel is pending for the lease holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<Timestamp>,
    /// Latest progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// When progress (or any sign of life from the backend) was last recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_at: Option<Timestamp>,
    /// The supervision phase of the running attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PhaseDeadline>,
    /// Why a pending job is not running (every backend blocked, busy, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_reason: Option<String>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ExecutionError>,
    /// Outputs (succeeded only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    /// When it reached a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Sequence number of its last event.
    pub last_seq: u32,
}

impl JobRecord {
    /// The running (last, unfinished) attempt.
    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|a| a.outcome.is_none())
    }

    /// Executions that count towards `max_attempts` (reattachments continue an earlier one).
    pub fn counted_attempts(&self) -> u32 {
        u32::try_from(self.attempts.iter().filter(|a| !a.reattached).count()).unwrap_or(u32::MAX)
    }

    /// A short view for lists.
    pub fn summary(&self) -> JobSummary {
        JobSummary {
            id: self.id,
            state: self.state,
            priority: self.spec.priority,
            created_at: self.created_at,
            updated_at: self.updated_at,
            attempts: u32::try_from(self.attempts.len()).unwrap_or(u32::MAX),
            backend: self.attempts.last().map(|a| a.backend.clone()),
            percent: self.progress.as_ref().map(|p| p.percent),
            error: self.error.as_ref().map(|e| e.message.clone()),
            wait_reason: self.wait_reason.clone(),
            labels: self.spec.labels.clone(),
        }
    }
}

/// A job in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobSummary {
    /// The id.
    pub id: JobId,
    /// Where it stands.
    pub state: JobState,
    /// Its priority.
    pub priority: i32,
    /// Submission time.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// Executions so far.
    pub attempts: u32,
    /// The backend of the latest attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendId>,
    /// Latest percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f32>,
    /// Error message, if failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_reason: Option<String>,
    /// Its labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wf() -> Workflow {
        Workflow::from_value(json!({"1": {"class_type": "A"}})).unwrap()
    }

    #[test]
    fn spec_validation_names_the_field() {
        assert!(JobSpec::new(wf()).validate().is_ok());
        let e = JobSpec::new(wf()).max_attempts(0).validate().unwrap_err();
        assert!(e.to_string().contains("max_attempts"));
        let e = JobSpec::new(wf())
            .idempotency_key("")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("idempotency_key"));
        let mut s = JobSpec::new(wf());
        s.inputs
            .entry("9".into())
            .or_default()
            .insert("x".into(), json!(1));
        assert!(matches!(
            s.validate(),
            Err(SpecError::Workflow(
                WorkflowError::OverrideUnknownNode { .. }
            ))
        ));
    }

    #[test]
    fn spec_json_round_trip_and_defaults() {
        let s: JobSpec =
            serde_json::from_value(json!({"workflow": {"1": {"class_type": "A"}}})).unwrap();
        assert_eq!(s.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(s.priority, 0);
        let bad = serde_json::from_value::<JobSpec>(
            json!({"workflow": {"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}}}),
        );
        assert!(bad.unwrap_err().to_string().contains("does not exist"));
        let back: JobSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn states_parse_and_print() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        }
        assert!(
            "runnin"
                .parse::<JobState>()
                .unwrap_err()
                .contains("unknown job state")
        );
        assert!(JobState::Cancelled.is_terminal() && !JobState::RetryWait.is_terminal());
    }
}
