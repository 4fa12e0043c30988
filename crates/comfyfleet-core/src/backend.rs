//! The [`Backend`] trait: one place that can run a workflow (a ComfyUI server, a RunningHub
//! account, a remote GPU instance), and what it reports while it runs one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::error::{BackendError, ExecutionError};
use crate::ids::{BackendId, JobId, RemoteRef};
use crate::job::{Artifact, Upload};
use crate::workflow::{NodeId, Workflow};

/// A stream of execution events; it ends after the terminal event (or early, if the connection to
/// the execution was lost: the engine then treats the execution as lost and may reattach).
pub type ExecutionStream = Pin<Box<dyn Stream<Item = ExecutionEvent> + Send + 'static>>;

/// A stream of bytes (artifact downloads).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, BackendError>> + Send + 'static>>;

/// What a backend can do. Callers check capabilities instead of matching on backend kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capabilities {
    /// Most executions it runs at once (the engine never dispatches more).
    pub max_concurrent: u32,
    /// It can interrupt a running execution (not only dequeue a pending one).
    pub interrupt: bool,
    /// It can restart its worker process (the last step of the force-cancel ladder).
    pub restart: bool,
    /// It accepts input uploads.
    pub uploads: bool,
    /// It runs hosted workflows by id (RunningHub) rather than only full graphs.
    pub hosted_workflows: bool,
    /// It reports its queue position (so the start clock can wait for the queue head).
    pub queue_position: bool,
    /// It can find an execution again after an orchestrator restart.
    pub reattach: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            max_concurrent: 1,
            interrupt: true,
            restart: false,
            uploads: false,
            hosted_workflows: false,
            queue_position: false,
            reattach: true,
        }
    }
}

/// What a backend has: the routing inventory. A job whose workflow needs a node class or model
/// file the backend lacks never goes there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Inventory {
    /// Node classes installed (`None`: unknown, assume anything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_classes: Option<BTreeSet<String>>,
    /// Model files present (`None`: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<BTreeSet<String>>,
    /// Labels (`gpu = "a100"`, `region = "eu"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form facts (VRAM, versions) for display.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facts: BTreeMap<String, String>,
}

impl Inventory {
    /// The first requirement of `workflow` this inventory lacks, as a reason to skip it.
    pub fn missing_for(&self, workflow: &Workflow) -> Option<String> {
        if let Some(classes) = &self.node_classes {
            for c in workflow.required_classes() {
                if !classes.contains(&c) {
                    return Some(format!("no node class {c}"));
                }
            }
        }
        if let Some(models) = &self.models {
            for m in workflow.referenced_models() {
                // Models are often referenced with a sub-folder (`sdxl/base.safetensors`).
                let base = m.file.rsplit(['/', '\\']).next().unwrap_or(&m.file);
                if !models.contains(&m.file) && !models.iter().any(|have| have.ends_with(base)) {
                    return Some(format!(
                        "no model file {} (node {} input {})",
                        m.file, m.node, m.input
                    ));
                }
            }
        }
        None
    }
}

/// The backend's own view of its health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// It answers and can take work.
    pub healthy: bool,
    /// Executions queued or running on it, ours and others' (when known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u32>,
    /// Details (`connection refused`, `VRAM 3.1 GiB free`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Health {
    /// Healthy with no details.
    pub fn ok() -> Self {
        Health {
            healthy: true,
            queue_depth: None,
            detail: String::new(),
        }
    }

    /// Unhealthy, with a reason.
    pub fn down(detail: impl Into<String>) -> Self {
        Health {
            healthy: false,
            queue_depth: None,
            detail: detail.into(),
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct SubmitRequest {
    /// The job (for the backend's logs and client ids).
    pub job: JobId,
    /// The attempt number.
    pub attempt: u32,
    /// The workflow with overrides applied.
    pub workflow: Workflow,
    /// Input files to make available first.
    pub uploads: Vec<Upload>,
}

/// The answer to a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CancelAck {
    /// A pending execution was removed from the backend's queue.
    Dequeued,
    /// An interrupt was sent to the running execution; it ends at the next node boundary.
    InterruptSent,
    /// The backend does not know the execution (already finished or lost).
    NotFound,
}

/// A submitted (or reattached) execution: its remote id and its events.
pub struct Execution {
    /// The backend's id for it.
    pub remote: RemoteRef,
    /// Its events, ending with a terminal one.
    pub events: ExecutionStream,
}

impl fmt::Debug for Execution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Execution")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// What a backend reports about one execution.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ExecutionEvent {
    /// The backend has it.
    Accepted,
    /// It waits in the backend's queue with `position` executions ahead (0: it is next). The
    /// start clock runs only while the position is 0.
    Queued {
        /// Executions ahead of it.
        position: u32,
    },
    /// It started running.
    Started,
    /// A node started.
    NodeStarted {
        /// The node.
        node: NodeId,
    },
    /// The running node made progress (`value` of `max`, possibly floats).
    Progress {
        /// The node.
        node: NodeId,
        /// Steps done.
        value: f64,
        /// Steps in all.
        max: f64,
    },
    /// These nodes were served from cache.
    Cached {
        /// The nodes.
        nodes: Vec<NodeId>,
    },
    /// A node finished.
    NodeFinished {
        /// The node.
        node: NodeId,
    },
    /// A node produced outputs.
    NodeOutput {
        /// The node.
        node: NodeId,
        /// The outputs.
        artifacts: Vec<Artifact>,
    },
    /// A preview image (not stored).
    Preview {
        /// The node.
        node: Option<NodeId>,
        /// Encoded image bytes.
        bytes: Bytes,
    },
    /// Terminal: done.
    Succeeded {
        /// All outputs.
        artifacts: Vec<Artifact>,
    },
    /// Terminal: failed.
    Failed {
        /// Why.
        error: ExecutionError,
    },
    /// Terminal: interrupted (by our cancel).
    Interrupted,
    /// Something people following the job should see — where to look at the remote task, a
    /// task stuck in one state unusually long. Stored as a job `warning` event; not progress
    /// (it does not reset the node clock).
    Notice {
        /// The text (no secrets).
        message: String,
    },
}

impl ExecutionEvent {
    /// Whether this ends the execution.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ExecutionEvent::Succeeded { .. }
                | ExecutionEvent::Failed { .. }
                | ExecutionEvent::Interrupted
        )
    }
}

/// One place that can run a workflow.
///
/// Implementations must be cheap to clone behind an `Arc`, put a timeout on every network call,
/// and never block the async runtime.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Its name in the fleet.
    fn id(&self) -> &BackendId;

    /// What kind of backend it is (`comfyui`, `runninghub`, `ssh`, `fake`).
    fn kind(&self) -> &'static str;

    /// What it can do.
    fn capabilities(&self) -> Capabilities;

    /// What it has (node classes, models, labels), refreshed by the implementation as it sees fit.
    async fn inventory(&self) -> Result<Inventory, BackendError>;

    /// Whether it can take work now.
    async fn health(&self) -> Health;

    /// Starts an execution. Returns once the backend has it (or refused it: a validation error is
    /// `Deterministic`, an unknown node class `BackendSpecific` with
    /// [`crate::ErrorDetail::MissingNode`]).
    async fn submit(&self, request: SubmitRequest) -> Result<Execution, BackendError>;

    /// Cancels an execution: dequeue if pending, interrupt if running. Must only ever affect this
    /// execution, never another client's.
    async fn cancel(&self, remote: &RemoteRef) -> Result<CancelAck, BackendError>;

    /// Finds an execution again after an orchestrator restart. `Ok(None)`: the backend no longer
    /// knows it (it finished long ago and was forgotten, or the server restarted).
    async fn reattach(&self, remote: &RemoteRef) -> Result<Option<Execution>, BackendError>;

    /// Restarts the backend's worker process (only with `capabilities().restart`).
    async fn restart(&self) -> Result<(), BackendError> {
        Err(BackendError::NotSupported {
            backend: self.id().clone(),
            operation: "restart",
        })
    }

    /// Makes an input file available (only with `capabilities().uploads`).
    async fn upload(&self, upload: &Upload, bytes: Bytes) -> Result<(), BackendError> {
        let _ = (upload, bytes);
        Err(BackendError::NotSupported {
            backend: self.id().clone(),
            operation: "upload",
        })
    }

    /// Streams an artifact's bytes.
    async fn fetch(&self, artifact: &Artifact) -> Result<ByteStream, BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inventory_names_the_first_missing_requirement() {
        let wf = Workflow::from_value(json!({
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl/base.safetensors"}},
            "2": {"class_type": "FleetNoSuchNode", "inputs": {"m": ["1", 0]}}
        }))
        .unwrap();
        assert_eq!(
            Inventory::default().missing_for(&wf),
            None,
            "unknown inventory accepts anything"
        );
        let mut inv = Inventory {
            node_classes: Some(BTreeSet::from(["CheckpointLoaderSimple".to_string()])),
            ..Inventory::default()
        };
        assert_eq!(
            inv.missing_for(&wf).as_deref(),
            Some("no node class FleetNoSuchNode")
        );
        inv.node_classes
            .as_mut()
            .unwrap()
            .insert("FleetNoSuchNode".into());
        inv.models = Some(BTreeSet::from(["other.safetensors".to_string()]));
        assert!(
            inv.missing_for(&wf)
                .unwrap()
                .starts_with("no model file sdxl/base.safetensors")
        );
        inv.models
            .as_mut()
            .unwrap()
            .insert("base.safetensors".into());
        assert_eq!(inv.missing_for(&wf), None);
    }
}
