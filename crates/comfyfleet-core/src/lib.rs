//! # comfyfleet-core
//!
//! The vocabulary of comfyfleet: jobs ([`JobSpec`], [`JobRecord`], [`JobState`], [`Attempt`]),
//! workflows ([`Workflow`] with content and structure hashes), progress, events and the error
//! taxonomy — and the three traits everything else plugs into:
//!
//! * [`Backend`] — one place that can run a workflow;
//! * [`FailoverStrategy`] — where a job goes and what a failure means;
//! * [`TaskStore`] — durable job state (with [`MemoryStore`] in this crate).
//!
//! Plus [`InstallStore`] for durable custom-node installs ([`install`]).
//!
//! This crate does no network or disk I/O.
//!
//! ```
//! use comfyfleet_core::{JobSpec, MemoryStore, NewJob, TaskStore, Timestamp, Workflow};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let workflow = Workflow::from_json(r#"{
//!     "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64}},
//!     "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}
//! }"#)?;
//! let store = MemoryStore::new();
//! let now = Timestamp::from_millis(1_000);
//! let job = store.enqueue(NewJob::new(JobSpec::new(workflow)), now).await?;
//! let claimed = store.claim("engine-1", std::time::Duration::from_secs(30), now).await?;
//! assert_eq!(claimed.unwrap().lease.job, job.id);
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

#![deny(missing_docs)]

pub mod backend;
pub mod error;
pub mod event;
pub mod ids;
pub mod inputs;
pub mod install;
pub mod job;
pub mod memory;
pub mod progress;
pub mod store;
pub mod strategy;
pub mod time;
pub mod transition;
pub mod workflow;

pub use backend::{
    Backend, ByteStream, CancelAck, Capabilities, Execution, ExecutionEvent, ExecutionStream,
    Health, Inventory, SubmitRequest,
};
pub use error::{BackendError, ErrorDetail, ErrorKind, ExecutionError, StoreError, TimeoutPhase};
pub use event::{Event, EventKind, FleetEvent, Skip};
pub use ids::{BackendId, InstallId, JobId, RemoteRef};
pub use inputs::{InputStore, MemoryInputs};
pub use install::{
    InstallEvent, InstallEventKind, InstallFilter, InstallPhase, InstallRecord, InstallSpec,
    InstallSpecError, InstallState, InstallStore, InstalledPack, ModelProgress, ModelSpec,
    ModelStatus, NodeCounts, NodeProgress, NodeSpec, NodeStatus, RequirementsStatus,
};
pub use job::{
    Artifact, Attempt, AttemptOutcome, CancelStep, Constraints, JobRecord, JobSpec, JobState,
    JobSummary, LeaseInfo, NodeTiming, PhaseDeadline, SpecError, TimeoutOverrides, Upload,
    content_type_for,
};
pub use memory::MemoryStore;
pub use progress::{Progress, ProgressTracker};
pub use store::{
    AttemptStart, AttemptUpdate, CancelOutcome, CancelResult, Claimed, Completion, Enqueued,
    EventQuery, Failure, HeartbeatAck, JobFilter, JobPage, Lease, NewJob, ReapAction, ReapItem,
    ReapOptions, ReapReason, ReapReport, StateCounts, TaskStore,
};
pub use strategy::{
    Availability, Candidate, Decision, FailoverStrategy, Placement, Restriction, RestrictionKind,
};
pub use time::{Clock, ManualClock, SystemClock, Timestamp, TokioClock};
pub use workflow::{InputOverrides, ModelRef, NodeId, Workflow, WorkflowError, WorkflowHash};
