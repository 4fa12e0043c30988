//! # `RunningHubSim`: an in-process RunningHub OpenAPI server on loopback
//!
//! Serves the endpoints of the RunningHub API reference (`shared/reference/runninghub-api.md`) with per-key state, so
//! a RunningHub client can be tested against every answer the field report saw, including the
//! production failure of seed 000 (a task that finished while the client, stuck on a silent
//! `netWssUrl` socket behind a slow proxy, kept showing `RUNNING`).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use comfyfleet_testkit::runninghub_sim::{RunningHubSim, RunningHubSimConfig, DEFAULT_API_KEY};
//! let sim = RunningHubSim::start(RunningHubSimConfig::scaled(0.01)).await?;
//! let url = sim.base_url(); // "http://127.0.0.1:PORT", use it as the RunningHub base URL
//! sim.faults().set_silent_websocket(true);
//! sim.faults().set_proxy_delay(std::time::Duration::from_millis(200));
//! sim.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! ## Behaviour
//!
//! * Envelope `{code, msg, data}`, HTTP 200 for every API-level outcome. The key is read from
//!   `apiKey` (or `apikey`) in the JSON body, else from `Authorization: Bearer`. An unknown or
//!   missing key answers 401 `API key invalid` or 806 ([`UnknownKeyAnswer`]).
//! * Each task's timeline is fixed at create: `QUEUED` for `queue_time`, `RUNNING` for
//!   `run_time` ([`WorkflowSpec`], per `workflowId`/`webappId`, scaled by `time_scale`), then
//!   `SUCCESS` or `FAILED`. Phases are computed from `tokio::time::Instant`, so a paused clock
//!   works and nothing runs in the background.
//! * `/task/openapi/status` answers `{code: 0, msg: "SUCCESS", data: "<STATUS>"}`; a cancelled
//!   task reports `FAILED`.
//! * `/task/openapi/outputs` while pending answers `data = null` with either `code = 804/813`
//!   or `code = 0` and `msg = APIKEY_TASK_IS_RUNNING/QUEUED` ([`PendingVariant`]; default:
//!   alternating per task, the first poll gets the non-zero code). Success: the output list;
//!   failure (and cancel): 805 with `data.failedReason`.
//! * Concurrency limit: a create is refused with 814 when the key already has
//!   `concurrency_limit` *current* tasks (queued + running; finished and cancelled tasks do not
//!   count), so `queued + running <= limit` at every instant.
//! * Balance: coins/money drop by a task's cost when it reaches `SUCCESS` (failed and cancelled
//!   tasks are free); a create whose cost exceeds the remaining coins minus the cost of the key's
//!   current tasks answers 416 (`enforce_balance`).
//! * Output `fileUrl`s point at `GET /files/<taskId>/<name>` (deterministic PNG bytes); uploads
//!   at `GET /files/upload/<fileName>`.
//! * `netWssUrl` is `ws://<addr>/ws/c_instance?...&taskId=<id>`: by default it sends a ComfyUI
//!   style `status`, `execution_start`, `progress` ticks, `executed` + `execution_success` (or
//!   `execution_error` / `execution_interrupted`) and closes; with
//!   [`RunningHubFaultConfig::silent_websocket`] it accepts and never sends anything.

mod config;
mod server;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

pub use config::{
    ApiKeyConfig, DEFAULT_API_KEY, FailedReason, HttpErrors, PendingVariant, RunningHubFaultConfig,
    RunningHubFaults, RunningHubSimConfig, RunningHubStats, Trigger, UnknownKeyAnswer,
    WorkflowSpec, codes,
};

/// A task as the simulator sees it now (for assertions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    /// `taskId`.
    pub task_id: String,
    /// The key that created it.
    pub api_key: String,
    /// `workflowId` or `webappId` (empty for a bare `workflow` JSON string).
    pub workflow_id: String,
    /// `QUEUED`, `RUNNING`, `SUCCESS`, `FAILED` or `CANCELLED`.
    pub status: String,
    /// `webhookUrl` given at create (accepted, never called).
    pub webhook_url: Option<String>,
}

/// A running simulated RunningHub. Dropping it (or [`RunningHubSim::shutdown`]) stops it.
#[derive(Debug)]
pub struct RunningHubSim {
    inner: Arc<server::Inner>,
    serve: Mutex<Option<JoinHandle<()>>>,
}

impl RunningHubSim {
    /// Bind `config.addr` and start serving.
    pub async fn start(config: RunningHubSimConfig) -> io::Result<RunningHubSim> {
        let listener = tokio::net::TcpListener::bind(config.addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(server::Inner::new(config, addr));
        let router = server::router(inner.clone());
        let stop = inner.shutdown.clone();
        let serve = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(RunningHubSim {
            inner,
            serve: Mutex::new(Some(serve)),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash): the RunningHub base URL to configure.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &RunningHubSimConfig {
        &self.inner.config
    }

    /// The fault knobs; changes apply immediately.
    pub fn faults(&self) -> &RunningHubFaults {
        &self.inner.faults
    }

    /// Counters so far (the per-key maxima are computed from the task timelines now).
    pub fn stats(&self) -> RunningHubStats {
        self.inner.stats()
    }

    /// Every task, oldest first.
    pub fn tasks(&self) -> Vec<TaskInfo> {
        let now = tokio::time::Instant::now();
        let st = self.inner.state();
        let mut v: Vec<_> = st.tasks.values().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v.into_iter()
            .map(|t| TaskInfo {
                task_id: t.id.clone(),
                api_key: t.key.clone(),
                workflow_id: t.workflow_id.clone(),
                status: match t.phase(now) {
                    server::Phase::Queued => "QUEUED",
                    server::Phase::Running => "RUNNING",
                    server::Phase::Success => "SUCCESS",
                    server::Phase::Failed => "FAILED",
                    server::Phase::Cancelled => "CANCELLED",
                }
                .to_owned(),
                webhook_url: t.webhook_url.clone(),
            })
            .collect()
    }

    /// The bytes `GET /files/<task_id>/<name>` serves for a task output.
    pub fn output_bytes(task_id: &str, name: &str) -> Vec<u8> {
        let ext = name.rsplit_once('.').map_or("png", |(_, e)| e);
        server::output_bytes(task_id, name, ext)
    }

    /// Stop the server: the port closes, open sockets end.
    pub async fn shutdown(self) {
        self.inner.shutdown.cancel();
        let handle = self.serve.lock().ok().and_then(|mut g| g.take());
        if let Some(mut h) = handle
            && tokio::time::timeout(Duration::from_secs(2), &mut h)
                .await
                .is_err()
        {
            h.abort();
            let _ = h.await;
        }
    }
}

impl Drop for RunningHubSim {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
        if let Ok(mut g) = self.serve.lock()
            && let Some(h) = g.take()
        {
            h.abort();
        }
    }
}
