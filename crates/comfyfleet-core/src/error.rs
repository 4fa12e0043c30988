//! The error taxonomy. The failover strategy reads [`ErrorKind`] to decide what a failure means:
//! never retry a deterministic failure, block a backend for a workflow on a backend-specific one,
//! back off and retry a transient one.

use serde::{Deserialize, Serialize};

use crate::ids::{BackendId, JobId};
use crate::workflow::{NodeId, WorkflowError};

/// What a failure means for retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad input (validation error, bad value): the same job fails the same way everywhere.
    /// Never retried.
    Deterministic,
    /// Something about this backend (missing node type, out of memory, model file absent): block
    /// this backend for this workflow and try another.
    BackendSpecific,
    /// Network trouble, 5xx, timeouts, a lost connection: retry with backoff.
    Transient,
    /// The job was cancelled.
    Cancelled,
    /// A bug or broken invariant in comfyfleet itself.
    Internal,
}

impl ErrorKind {
    /// The kind of a ComfyUI node exception (ComfyUI's `execution_error`, RunningHub's
    /// `failedReason`): out of memory, CUDA, missing modules or files say "this machine" —
    /// [`ErrorKind::BackendSpecific`], worth another backend; anything else is about the input —
    /// [`ErrorKind::Deterministic`].
    pub fn of_node_exception(exception_type: &str, message: &str) -> ErrorKind {
        let t = exception_type.to_ascii_lowercase();
        let m = message.to_ascii_lowercase();
        let machine = t.contains("outofmemory")
            || t.contains("cuda")
            || t.ends_with("modulenotfounderror")
            || t.ends_with("importerror")
            || t.ends_with("filenotfounderror")
            || t.ends_with("oserror")
            || t.ends_with("runtimeerror")
            || m.contains("out of memory")
            || m.contains("cuda error")
            || m.contains("no kernel image");
        if machine {
            ErrorKind::BackendSpecific
        } else {
            ErrorKind::Deterministic
        }
    }

    /// Whether another attempt can possibly help.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::BackendSpecific | ErrorKind::Transient | ErrorKind::Internal
        )
    }
}

/// Which supervision clock ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TimeoutPhase {
    /// The job waited too long in a queue (ours before any backend took it, or a backend's own
    /// queue behind other executions).
    Queued,
    /// The backend's submit call did not answer.
    Dispatch,
    /// Accepted and at the head of the backend's queue, but never started.
    Start,
    /// A running node sent no event for too long.
    NodeSilence,
    /// The whole job ran past its deadline.
    Total,
    /// Fetching outputs took too long.
    Download,
}

impl TimeoutPhase {
    /// Stable lower-case name (`start`, `node_silence`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutPhase::Queued => "queued",
            TimeoutPhase::Dispatch => "dispatch",
            TimeoutPhase::Start => "start",
            TimeoutPhase::NodeSilence => "node_silence",
            TimeoutPhase::Total => "total",
            TimeoutPhase::Download => "download",
        }
    }
}

/// Extra, machine-readable detail about a failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ErrorDetail {
    /// The backend lacks a node class the workflow uses.
    MissingNode {
        /// The class it lacks.
        class_type: String,
    },
    /// A supervision clock ran out.
    Timeout {
        /// Which one.
        phase: TimeoutPhase,
        /// Its length in milliseconds.
        after_ms: u64,
    },
    /// Validation errors per node, as the backend reported them.
    Validation {
        /// Node id → messages.
        #[cfg_attr(feature = "openapi", schema(value_type = Vec<(String, Vec<String>)>))]
        nodes: Vec<(NodeId, Vec<String>)>,
    },
    /// An exception raised inside a node.
    Exception {
        /// The exception's type (`torch.OutOfMemoryError`).
        exception_type: String,
    },
    /// The backend lost the execution (restarted, evicted): it is gone.
    Lost,
}

/// Why an execution failed, as the backend or the engine saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[error("{kind:?}: {message}")]
pub struct ExecutionError {
    /// What it means for retries.
    pub kind: ErrorKind,
    /// Human-readable message, verbatim from the backend where there is one.
    pub message: String,
    /// The node that failed, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub node: Option<NodeId>,
    /// Machine-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<ErrorDetail>,
}

impl ExecutionError {
    /// An error of a kind with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ExecutionError {
            kind,
            message: message.into(),
            node: None,
            detail: None,
        }
    }

    /// Bad input; never retried.
    pub fn deterministic(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Deterministic, message)
    }

    /// Backend-specific; the backend is blocked for the workflow.
    pub fn backend_specific(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BackendSpecific, message)
    }

    /// Transient; retried with backoff.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }

    /// The backend lacks a node class.
    pub fn missing_node(class_type: impl Into<String>, node: Option<NodeId>) -> Self {
        let class_type = class_type.into();
        ExecutionError {
            kind: ErrorKind::BackendSpecific,
            message: format!("node class {class_type} is not installed on this backend"),
            node,
            detail: Some(ErrorDetail::MissingNode { class_type }),
        }
    }

    /// A supervision clock ran out. Timeouts are treated like backend-specific failures (block
    /// the backend for this workflow, go elsewhere), but keep their own detail.
    pub fn timeout(phase: TimeoutPhase, after: std::time::Duration, node: Option<NodeId>) -> Self {
        let what = match phase {
            TimeoutPhase::Queued => "job waited in a queue for too long".to_string(),
            TimeoutPhase::Dispatch => "backend did not answer the submit call".to_string(),
            TimeoutPhase::Start => {
                "execution was accepted but did not start (server may be stuck)".to_string()
            }
            TimeoutPhase::NodeSilence => match &node {
                Some(n) => format!("node {n} sent no progress"),
                None => "no node event arrived".to_string(),
            },
            TimeoutPhase::Total => "job ran past its deadline".to_string(),
            TimeoutPhase::Download => "fetching outputs took too long".to_string(),
        };
        ExecutionError {
            kind: ErrorKind::Transient,
            message: format!(
                "{} timeout after {} ms: {what}",
                phase.as_str(),
                after.as_millis()
            ),
            node,
            detail: Some(ErrorDetail::Timeout {
                phase,
                after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// The job was cancelled.
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Cancelled, message)
    }

    /// Sets the node.
    pub fn with_node(mut self, node: impl Into<NodeId>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Sets the detail.
    pub fn with_detail(mut self, detail: ErrorDetail) -> Self {
        self.detail = Some(detail);
        self
    }

    /// The timeout phase, if this is a timeout.
    pub fn timeout_phase(&self) -> Option<TimeoutPhase> {
        match &self.detail {
            Some(ErrorDetail::Timeout { phase, .. }) => Some(*phase),
            _ => None,
        }
    }

    /// The missing class, if this is a missing-node failure.
    pub fn missing_class(&self) -> Option<&str> {
        match &self.detail {
            Some(ErrorDetail::MissingNode { class_type }) => Some(class_type),
            _ => None,
        }
    }
}

/// Errors from a [`crate::Backend`] call (as opposed to a failed execution).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The call failed; the kind says whether to retry.
    #[error(transparent)]
    Execution(#[from] ExecutionError),
    /// The backend does not support this operation (see its capabilities).
    #[error("backend {backend} does not support {operation}")]
    NotSupported {
        /// The backend.
        backend: BackendId,
        /// The operation (`restart`, `upload`, …).
        operation: &'static str,
    },
    /// No such remote execution or artifact.
    #[error("not found: {0}")]
    NotFound(String),
}

impl BackendError {
    /// The error as an execution failure (what an attempt records).
    pub fn into_execution_error(self) -> ExecutionError {
        match self {
            BackendError::Execution(e) => e,
            e @ BackendError::NotSupported { .. } => ExecutionError::deterministic(e.to_string()),
            BackendError::NotFound(what) => ExecutionError::transient(format!("not found: {what}"))
                .with_detail(ErrorDetail::Lost),
        }
    }
}

/// Errors from a [`crate::TaskStore`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No such job.
    #[error("job {0} not found")]
    NotFound(JobId),
    /// A fenced write came from an attempt that no longer holds the lease (it expired and the job
    /// was reclaimed, or the job is no longer running). The caller must stop working on the job.
    #[error("lease lost for job {job} attempt {attempt}")]
    LeaseLost {
        /// The job.
        job: JobId,
        /// The attempt that lost it.
        attempt: u32,
    },
    /// The operation is not allowed in the job's current state.
    #[error("job {job}: cannot {operation} a job in state {state}")]
    InvalidTransition {
        /// The job.
        job: JobId,
        /// Its current state.
        state: crate::job::JobState,
        /// What was attempted.
        operation: &'static str,
    },
    /// The request itself was malformed (a limit of zero, an unknown filter value, …).
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// The store does not support this operation (e.g. backup of an in-memory store).
    #[error("store does not support {0}")]
    NotSupported(&'static str),
    /// No such install.
    #[error("install {0} not found")]
    InstallNotFound(crate::ids::InstallId),
    /// The write conflicts with the stored state: an instance already has an active install,
    /// or another writer changed the record first.
    #[error("conflict: {0}")]
    Conflict(String),
    /// [`crate::AttemptStart::capacity`]: the backend already runs that many attempts.
    #[error("backend {backend} is at its capacity of {capacity} across the fleet")]
    BackendFull {
        /// The backend.
        backend: crate::ids::BackendId,
        /// Its capacity.
        capacity: u32,
    },
    /// The database file or server is unusable: corrupt, foreign, from a newer schema.
    #[error("store is unusable: {0}")]
    Unusable(String),
    /// I/O, connection or database failure; may succeed if retried.
    #[error("store backend error: {0}")]
    Backend(String),
}

impl StoreError {
    /// Whether retrying the same call can help.
    pub fn is_temporary(&self) -> bool {
        matches!(self, StoreError::Backend(_))
    }
}

impl From<WorkflowError> for ExecutionError {
    fn from(e: WorkflowError) -> Self {
        ExecutionError::deterministic(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_exceptions_about_the_machine_are_backend_specific() {
        for (t, m) in [
            ("torch.OutOfMemoryError", "Allocation on device"),
            ("RuntimeError", "CUDA error: an illegal memory access"),
            ("ModuleNotFoundError", "No module named 'x'"),
            ("Exception", "CUDA out of memory"),
        ] {
            assert_eq!(
                ErrorKind::of_node_exception(t, m),
                ErrorKind::BackendSpecific,
                "{t}"
            );
        }
        for (t, m) in [
            ("ValueError", "bad width"),
            ("Exception", "prompt too long"),
        ] {
            assert_eq!(
                ErrorKind::of_node_exception(t, m),
                ErrorKind::Deterministic,
                "{t}"
            );
        }
    }
    use std::time::Duration;

    #[test]
    fn kinds_and_helpers() {
        assert!(!ErrorKind::Deterministic.is_retryable());
        assert!(!ErrorKind::Cancelled.is_retryable());
        assert!(ErrorKind::Transient.is_retryable());
        let e = ExecutionError::missing_node("FleetNoSuchNode", Some("2".into()));
        assert_eq!(e.missing_class(), Some("FleetNoSuchNode"));
        assert_eq!(e.kind, ErrorKind::BackendSpecific);
        let t = ExecutionError::timeout(TimeoutPhase::Start, Duration::from_secs(5), None);
        assert_eq!(t.timeout_phase(), Some(TimeoutPhase::Start));
        assert!(
            t.message.contains("start timeout after 5000 ms"),
            "{}",
            t.message
        );
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["detail"]["type"], "timeout");
        assert_eq!(json["detail"]["phase"], "start");
        let back: ExecutionError = serde_json::from_value(json).unwrap();
        assert_eq!(back, t);
    }
}
