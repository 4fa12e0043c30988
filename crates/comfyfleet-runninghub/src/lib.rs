//! # comfyfleet-runninghub
//!
//! The RunningHub cloud backend for comfyfleet (see `shared/reference/runninghub-api.md` in the
//! project for the API, and seed 000 for the production failure this design answers: finished
//! tasks shown RUNNING until a 600 s timeout).
//!
//! * [`classify`] — the one classifier of RunningHub answers: `msg` before `code`, progress
//!   markers never errors, an empty output list a valid success (pure, table- and
//!   property-tested).
//! * [`client`] — [`RunningHubClient`], a typed client of the OpenAPI: every call has its own
//!   timeout; transport failures ([`client::TransportError`]) are kept apart from API verdicts;
//!   the API key is a `secrecy::SecretString` and appears in no `Debug`, log or error.
//! * [`RunningHubBackend`] — the [`comfyfleet_core::Backend`]: create, then HTTP polling of the
//!   status **immediately** and then at an adaptive interval (1 s growing to 5 s by default);
//!   transient errors are logged and retried and never end the monitor; `814` at create is
//!   back-pressure (wait, create again, shrink the effective capacity); outputs become
//!   [`comfyfleet_core::Artifact`]s with the `fileUrl` in the locator.
//!
//! ## Which jobs run here: hosted workflows and AI apps
//!
//! The backend sees only the [`comfyfleet_core::SubmitRequest`] (the workflow, not the job's
//! labels), so the hosted workflow id travels **inside the workflow**, as a marker node:
//!
//! ```json
//! {
//!   "rh": {"class_type": "RunningHubWorkflow", "inputs": {"workflow_id": "1987654321"}},
//!   "6":  {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}}
//! }
//! ```
//!
//! * A `RunningHubWorkflow` node (input `workflow_id`) → `/task/openapi/create` with that
//!   `workflowId`; every widget value (non-link input) of every other node becomes a
//!   `nodeInfoList` entry `{nodeId, fieldName, fieldValue}`, so the job's `inputs` overrides
//!   work as usual.
//! * A `RunningHubAiApp` node (input `webapp_id`) → `/task/openapi/ai-app/run`, likewise.
//! * No marker → the whole API-format graph is sent as a JSON string in `workflow`, with the
//!   configured [`RunningHubConfig::default_workflow_id`]; without one the submit fails as
//!   backend-specific (the job goes elsewhere).
//!
//! Why a node and not a label: it reaches the backend, it is part of the content hash (two
//! hosted workflows never look like the same computation), and routing works by itself — a
//! ComfyUI backend whose inventory lists its node classes lacks `RunningHubWorkflow` and is
//! skipped, while this backend's inventory reports unknown node classes (`None`). To pin jobs
//! to RunningHub anyway, give the backend a label ([`RunningHubConfig::labels`]) and put it in
//! the job's `constraints.labels`.
//!
//! Uploaded inputs: [`comfyfleet_core::Backend::upload`] sends the file to
//! `/openapi/v2/media/upload/binary` and remembers the `fileName` RunningHub gave it; at submit,
//! any widget value equal to the upload's name is replaced by that `fileName`.
//!
//! ## Events
//!
//! RunningHub reports no node events, so the stream is: `Accepted`; `Queued { position: 1 }`
//! when a check first says QUEUED (the position is unknown but the task waits behind others, so the
//! engine's queue clock runs, not its start clock); `Started` at each check that says RUNNING (a
//! liveness signal that resets the engine's node-silence clock); then `Succeeded` with the
//! outputs (progress events from the task socket in between, when it works), or `Failed` with
//! `failedReason` classified like a ComfyUI `execution_error`
//! (out-of-memory/CUDA: backend-specific; others: deterministic), or `Interrupted` after our
//! cancel. A task RunningHub no longer knows (807) ends the stream without a terminal event
//! (the engine treats the execution as lost). The task page link
//! (`https://www.runninghub.cn/task/detail/<taskId>`) and the elapsed time are in the log lines
//! and in failure messages; a warning is logged when a task stays in one state longer than
//! [`RunningHubConfig::stuck_after`] (and again at each doubling).
//!
//! ## Errors and back-pressure
//!
//! * Transport failures (timeout, connection refused, HTTP 5xx, a body that is not an envelope)
//!   are transient: the monitor logs and retries them and never stops on them; `submit`
//!   returns them as `Transient`.
//! * `806`/`401` mark the backend misconfigured: `health` is down and `submit` refuses without
//!   calling RunningHub (as `BackendSpecific`, so the job goes to another backend) until an
//!   account check succeeds again.
//! * `814` at create: the effective capacity drops to what is running, `submit` waits
//!   ([`RunningHubConfig::backpressure_wait`], doubling) and creates again, for at most
//!   [`RunningHubConfig::backpressure_max_wait`] (keep it below the engine's dispatch timeout,
//!   30 s by default), then answers `Transient`. Each finished task gives one slot back, and a
//!   `concurrentLimit` from the queue status (read by `health`) caps it.
//! * A validation failure in the create answer's `promptTips` is `Deterministic` (the task, if
//!   one was created, is cancelled).
//!
//! ## The task socket (`netWssUrl`): an accelerator only
//!
//! With [`RunningHubConfig::use_websocket`] (the default) a separate task connects to the
//! `netWssUrl` of the create answer, with its own connect timeout. Its ComfyUI-style
//! `execution_start`/`executing`/`progress` messages become `Started`/`NodeStarted`/`Progress`
//! events, and an `execution_success`/`execution_error`/`execution_interrupted` message (or the
//! socket closing) wakes the monitor for an immediate status check. The socket never decides an
//! outcome and nothing waits on it: a socket that never connects, or connects and stays silent
//! (seed 000), changes nothing but how soon the end is seen. A reattached task is polled only.
//!
#![deny(missing_docs)]

mod backend;
pub mod classify;
pub mod client;
mod config;

pub use backend::{
    AI_APP_CLASS, HOSTED_WORKFLOW_CLASS, RunningHubBackend, artifacts_from_outputs, task_request,
};
pub use client::{ClientConfig, RunningHubClient};
pub use config::{DEFAULT_BASE_URL, RunningHubConfig};
