//! [`RunningHubBackend`]: the [`Backend`] implementation.
//!
//! * `submit` waits for a free slot of the key (its effective capacity shrinks on `814` and
//!   grows back as tasks end), uploads nothing itself (the engine calls `upload` first), creates
//!   the task, and starts a monitor.
//! * The monitor checks `/task/openapi/status` **immediately** after create, then at an
//!   adaptive interval (`poll_min` growing by `poll_growth` to `poll_max` while the state does
//!   not change). Every call has its own timeout; a transport error or an unexpected answer is
//!   logged and retried, never allowed to end the monitor. When the status says the task ended,
//!   the outputs are fetched (that answer also carries `failedReason`).
//! * The `netWssUrl` push channel is not used: polling is the one path (see the crate docs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use comfyfleet_core::{
    Artifact, Backend, BackendError, BackendId, ByteStream, CancelAck, Capabilities, ErrorDetail,
    Execution, ExecutionError, ExecutionEvent, Health, Inventory, RemoteRef, SubmitRequest, Upload,
    Workflow,
};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::classify::Verdict;
use crate::client::{
    Answer, CreatedTask, NodeInfo, OutputFile, RunningHubClient, TaskRequest, TransportError,
};
use crate::config::RunningHubConfig;

/// The marker node class of a job that runs a workflow hosted on RunningHub (input
/// `workflow_id`). See the crate docs.
pub const HOSTED_WORKFLOW_CLASS: &str = "RunningHubWorkflow";
/// The marker node class of a job that runs a RunningHub AI app (input `webapp_id`).
pub const AI_APP_CLASS: &str = "RunningHubAiApp";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn transient(msg: impl Into<String>) -> BackendError {
    BackendError::Execution(ExecutionError::transient(msg))
}

fn from_transport(e: TransportError) -> BackendError {
    transient(e.to_string())
}

/// How many tasks of ours may run now, how many do, and who waits for a slot (first come,
/// first served: a submit that has waited longest gets the next free slot, so later jobs never
/// jump the queue and starve earlier ones into a back-pressure timeout).
#[derive(Debug)]
struct Slots {
    in_flight: u32,
    effective: u32,
    waiters: std::collections::VecDeque<u64>,
    next_ticket: u64,
}

struct Shared {
    config: RunningHubConfig,
    client: RunningHubClient,
    slots: Mutex<Slots>,
    /// Woken when a slot frees up or the queue changes.
    slot_freed: Notify,
    /// upload `sha256:name` → RunningHub `fileName`.
    uploaded: Mutex<HashMap<String, String>>,
    /// Tasks we asked to cancel.
    cancelled: Mutex<std::collections::HashSet<String>>,
    /// Last configuration error seen (806/401); cleared by a healthy account check.
    config_error: Mutex<Option<String>>,
    shutdown: CancellationToken,
}

impl Shared {
    /// Joins the queue for a slot; `front` keeps a submit's place after an 814.
    fn enqueue(&self, front: Option<u64>) -> u64 {
        let mut s = lock(&self.slots);
        match front {
            Some(t) => {
                s.waiters.push_front(t);
                t
            }
            None => {
                let t = s.next_ticket;
                s.next_ticket += 1;
                s.waiters.push_back(t);
                t
            }
        }
    }

    /// Takes a slot if `ticket` is first in line and one is free.
    fn try_reserve(&self, ticket: u64) -> bool {
        let mut s = lock(&self.slots);
        if s.waiters.front() == Some(&ticket) && s.in_flight < s.effective {
            s.waiters.pop_front();
            s.in_flight += 1;
            true
        } else {
            false
        }
    }

    /// Leaves the queue (gave up, or the submit was cancelled).
    fn leave(&self, ticket: u64) {
        let mut s = lock(&self.slots);
        s.waiters.retain(|t| *t != ticket);
        drop(s);
        self.slot_freed.notify_waiters();
    }

    fn release(&self, finished: bool) {
        let mut s = lock(&self.slots);
        s.in_flight = s.in_flight.saturating_sub(1);
        if finished && s.effective < self.config.max_concurrent {
            // A task ended: probe one more slot.
            s.effective += 1;
        }
        drop(s);
        self.slot_freed.notify_waiters();
    }

    fn back_pressure(&self) {
        let mut s = lock(&self.slots);
        // Our reservation is counted in `in_flight`: the others already fill the key.
        s.effective = s.in_flight.saturating_sub(1).max(1);
    }

    fn set_limit(&self, limit: u32) {
        let mut s = lock(&self.slots);
        s.effective = limit.clamp(1, self.config.max_concurrent.max(1));
    }
}

/// A place in the slot queue; leaving it (drop: gave up, or the submit future was cancelled)
/// lets the next one in.
struct Ticket<'a> {
    shared: &'a Shared,
    ticket: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.shared.leave(self.ticket);
    }
}

/// One RunningHub account as a backend. Cheap to clone; monitors stop when the last clone is
/// dropped.
#[derive(Clone)]
pub struct RunningHubBackend {
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl std::fmt::Debug for RunningHubBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningHubBackend")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl RunningHubBackend {
    /// Creates the backend. Fails only when the HTTP client cannot be built.
    pub fn new(config: RunningHubConfig) -> Result<Self, BackendError> {
        let client = RunningHubClient::new(config.client.clone()).map_err(from_transport)?;
        let shutdown = CancellationToken::new();
        let effective = config.max_concurrent.max(1);
        Ok(RunningHubBackend {
            shared: Arc::new(Shared {
                config,
                client,
                slots: Mutex::new(Slots {
                    in_flight: 0,
                    effective,
                    waiters: std::collections::VecDeque::new(),
                    next_ticket: 0,
                }),
                slot_freed: Notify::new(),
                uploaded: Mutex::new(HashMap::new()),
                cancelled: Mutex::new(Default::default()),
                config_error: Mutex::new(None),
                shutdown: shutdown.clone(),
            }),
            _stop: Arc::new(StopOnDrop(shutdown)),
        })
    }

    /// The API client.
    pub fn client(&self) -> &RunningHubClient {
        &self.shared.client
    }

    /// Tasks it may run at once now (shrinks on `814`, never above `max_concurrent`).
    pub fn effective_capacity(&self) -> u32 {
        lock(&self.shared.slots).effective
    }

    /// Tasks of ours running or queued on RunningHub now.
    pub fn in_flight(&self) -> u32 {
        lock(&self.shared.slots).in_flight
    }

    /// The RunningHub `fileName` an upload got, if it was uploaded by this backend.
    pub fn uploaded_file_name(&self, upload: &Upload) -> Option<String> {
        lock(&self.shared.uploaded)
            .get(&upload_key(upload))
            .cloned()
    }

    fn start_monitor(
        &self,
        task_id: &str,
        initial: Phase,
        reserved: bool,
        wss: Option<String>,
    ) -> Execution {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(ExecutionEvent::Accepted);
        let shared = self.shared.clone();
        let id = task_id.to_owned();
        let wake = Arc::new(Notify::new());
        let stop = shared.shutdown.child_token();
        if let Some(url) = wss.filter(|_| shared.config.use_websocket) {
            tokio::spawn(socket_task(
                url,
                id.clone(),
                tx.clone(),
                wake.clone(),
                stop.clone(),
                shared.config.websocket_connect_timeout,
            ));
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = monitor(&shared, &id, initial, &tx, &wake) => {}
                _ = stop.cancelled() => {}
            }
            stop.cancel();
            if reserved {
                shared.release(true);
            }
            lock(&shared.cancelled).remove(&id);
        });
        Execution {
            remote: RemoteRef::new(task_id),
            events: Box::pin(receiver_stream(rx)),
        }
    }
}

/// The task's push channel, as an accelerator only: progress messages become events, and the
/// end of the execution (or of the socket) wakes the monitor for an immediate status check. It
/// never decides an outcome and nothing waits for it: connecting has its own timeout, and the
/// monitor polls whether or not the socket ever speaks.
async fn socket_task(
    url: String,
    task_id: String,
    tx: mpsc::UnboundedSender<ExecutionEvent>,
    wake: Arc<Notify>,
    stop: CancellationToken,
    connect_timeout: std::time::Duration,
) {
    let connect = tokio::time::timeout(connect_timeout, tokio_tungstenite::connect_async(url));
    let mut socket = tokio::select! {
        _ = stop.cancelled() => return,
        r = connect => match r {
            Ok(Ok((socket, _))) => socket,
            Ok(Err(e)) => {
                debug!(task = %task_id, error = %e, "task socket unavailable; polling only");
                return;
            }
            Err(_) => {
                debug!(task = %task_id, "task socket did not connect in time; polling only");
                return;
            }
        },
    };
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = socket.next() => m,
        };
        let text = match msg {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => t,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | None | Some(Err(_)) => {
                // The socket ended: maybe the task did. Ask now rather than at the next tick.
                wake.notify_one();
                return;
            }
            Some(Ok(_)) => continue,
        };
        let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
            continue;
        };
        let data = v.get("data").cloned().unwrap_or(Value::Null);
        let node = data.get("node").and_then(|n| match n {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
        let event = match v.get("type").and_then(Value::as_str) {
            Some("execution_start") => Some(ExecutionEvent::Started),
            Some("executing") => node.map(|node| ExecutionEvent::NodeStarted { node }),
            Some("progress") => {
                let value = data.get("value").and_then(Value::as_f64);
                let max = data.get("max").and_then(Value::as_f64);
                match (node, value, max) {
                    (Some(node), Some(value), Some(max)) => {
                        Some(ExecutionEvent::Progress { node, value, max })
                    }
                    _ => None,
                }
            }
            Some("execution_success" | "execution_error" | "execution_interrupted") => {
                wake.notify_one();
                None
            }
            _ => None,
        };
        if let Some(e) = event
            && tx.send(e).is_err()
        {
            return;
        }
    }
}

fn receiver_stream(
    mut rx: mpsc::UnboundedReceiver<ExecutionEvent>,
) -> impl futures::Stream<Item = ExecutionEvent> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn upload_key(u: &Upload) -> String {
    format!("{}:{}", u.sha256, u.name)
}

fn str_input(node: &Value, key: &str) -> Option<String> {
    match node.get("inputs")?.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn is_link(v: &Value) -> bool {
    matches!(
        v.as_array().map(Vec::as_slice),
        Some([Value::String(_), Value::Number(_)])
    )
}

/// Builds the create request for a workflow (pure).
///
/// * A node of class [`HOSTED_WORKFLOW_CLASS`] with input `workflow_id` → a hosted workflow run;
///   every widget value (non-link input) of every other node becomes a `nodeInfoList` entry.
/// * A node of class [`AI_APP_CLASS`] with input `webapp_id` → an AI app run, likewise.
/// * Otherwise → the full graph, sent as a JSON string with `default_workflow_id`.
///
/// String values equal to an uploaded input's name are replaced by RunningHub's `fileName` for
/// it (`uploads`: name → fileName).
pub fn task_request(
    workflow: &Workflow,
    default_workflow_id: Option<&str>,
    uploads: &HashMap<String, String>,
) -> Result<TaskRequest, ExecutionError> {
    let graph = workflow.graph();
    let marker = graph.iter().find(|(_, n)| {
        matches!(
            n.get("class_type").and_then(Value::as_str),
            Some(HOSTED_WORKFLOW_CLASS | AI_APP_CLASS)
        )
    });
    let swap = |v: &Value| -> Value {
        match v {
            Value::String(s) => uploads
                .get(s)
                .map_or_else(|| v.clone(), |f| Value::String(f.clone())),
            other => other.clone(),
        }
    };
    if let Some((marker_id, node)) = marker {
        let mut list = Vec::new();
        for (id, n) in graph {
            if id == marker_id {
                continue;
            }
            let Some(inputs) = n.get("inputs").and_then(Value::as_object) else {
                continue;
            };
            for (name, v) in inputs {
                if is_link(v) {
                    continue;
                }
                list.push(NodeInfo {
                    node_id: id.clone(),
                    field_name: name.clone(),
                    field_value: swap(v),
                });
            }
        }
        let class = node.get("class_type").and_then(Value::as_str);
        return if class == Some(AI_APP_CLASS) {
            let webapp_id = str_input(node, "webapp_id").ok_or_else(|| {
                ExecutionError::deterministic(format!(
                    "node {marker_id} ({AI_APP_CLASS}) needs a webapp_id input"
                ))
                .with_node(marker_id.clone())
            })?;
            Ok(TaskRequest::AiApp {
                webapp_id,
                node_info_list: list,
            })
        } else {
            let workflow_id = str_input(node, "workflow_id").ok_or_else(|| {
                ExecutionError::deterministic(format!(
                    "node {marker_id} ({HOSTED_WORKFLOW_CLASS}) needs a workflow_id input"
                ))
                .with_node(marker_id.clone())
            })?;
            Ok(TaskRequest::Hosted {
                workflow_id,
                node_info_list: list,
            })
        };
    }
    let Some(workflow_id) = default_workflow_id else {
        return Err(ExecutionError::backend_specific(
            "this RunningHub backend has no default_workflow_id, so it runs only hosted \
             workflows (a RunningHubWorkflow node) and AI apps (a RunningHubAiApp node)",
        ));
    };
    let mut full = Map::new();
    for (id, n) in graph {
        let mut n = n.clone();
        if let Some(inputs) = n.get_mut("inputs").and_then(Value::as_object_mut) {
            for v in inputs.values_mut() {
                *v = swap(v);
            }
        }
        full.insert(id.clone(), n);
    }
    Ok(TaskRequest::Full {
        workflow_id: workflow_id.to_owned(),
        workflow: Value::Object(full),
    })
}

/// `fileType`/extension → artifact kind and MIME type.
fn kind_of(file_type: &str, url: &str) -> (&'static str, Option<&'static str>) {
    let ext = if file_type.is_empty() {
        url.rsplit('/')
            .next()
            .and_then(|f| f.split('?').next())
            .and_then(|f| f.rsplit_once('.').map(|(_, e)| e))
            .unwrap_or("")
    } else {
        file_type
    };
    match ext.to_ascii_lowercase().as_str() {
        "png" => ("image", Some("image/png")),
        "jpg" | "jpeg" => ("image", Some("image/jpeg")),
        "webp" => ("image", Some("image/webp")),
        "gif" => ("image", Some("image/gif")),
        "mp4" => ("video", Some("video/mp4")),
        "webm" => ("video", Some("video/webm")),
        "mov" => ("video", Some("video/quicktime")),
        "wav" => ("audio", Some("audio/wav")),
        "mp3" => ("audio", Some("audio/mpeg")),
        "flac" => ("audio", Some("audio/flac")),
        "txt" => ("text", Some("text/plain")),
        "json" => ("text", Some("application/json")),
        _ => ("file", None),
    }
}

/// The outputs list → artifacts (`fileUrl` in the locator, cost and time fields under `meta`).
pub fn artifacts_from_outputs(backend: &BackendId, task_id: &str, data: &Value) -> Vec<Artifact> {
    OutputFile::list_from(data)
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let (kind, content_type) = kind_of(&f.file_type, &f.file_url);
            let filename = f
                .file_url
                .rsplit('/')
                .next()
                .and_then(|s| s.split('?').next())
                .filter(|s| !s.is_empty())
                .map_or_else(|| format!("{task_id}_{i}"), str::to_owned);
            Artifact {
                node: f.node_id.clone(),
                filename,
                kind: kind.to_owned(),
                content_type: content_type.map(str::to_owned),
                size: None,
                sha256: None,
                backend: backend.clone(),
                locator: json!({
                    "fileUrl": f.file_url,
                    "fileType": f.file_type,
                    "taskId": task_id,
                    "meta": Value::Object(f.extra),
                }),
            }
        })
        .collect()
}

/// What the monitor last knew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Unknown,
    Queued,
    Running,
}

enum Ended {
    Success,
    Failed(Option<ExecutionError>),
}

async fn monitor(
    shared: &Shared,
    task_id: &str,
    initial: Phase,
    tx: &mpsc::UnboundedSender<ExecutionEvent>,
    wake: &Notify,
) {
    let cfg = &shared.config;
    let link = cfg.task_page(task_id);
    let started = Instant::now();
    let mut phase = initial;
    let mut since = Instant::now();
    let mut next_warning = cfg.stuck_after;
    let mut interval = cfg.poll_min;
    let mut checks: u64 = 0;
    let mut queued_sent = false;
    info!(backend = %cfg.id, task = task_id, %link, "monitoring RunningHub task");
    let _ = tx.send(ExecutionEvent::Notice {
        message: format!("RunningHub task {task_id}: {link}"),
    });
    let ended = loop {
        if tx.is_closed() {
            debug!(task = task_id, "event receiver dropped; monitor stops");
            return;
        }
        checks += 1;
        let answer = shared.client.status(task_id).await;
        let elapsed = started.elapsed();
        let verdict = match answer {
            Ok(Answer { verdict, .. }) => verdict,
            Err(e) => {
                warn!(task = task_id, %link, elapsed_s = elapsed.as_secs(), check = checks, error = %e,
                    "status check failed; retrying");
                Verdict::Malformed {
                    reason: e.to_string(),
                }
            }
        };
        let new_phase = match verdict {
            Verdict::Queued => Phase::Queued,
            Verdict::Running => Phase::Running,
            Verdict::Succeeded(_) => break Ended::Success,
            Verdict::Failed(_) if lock(&shared.cancelled).contains(task_id) => {
                let _ = tx.send(ExecutionEvent::Interrupted);
                return;
            }
            Verdict::Failed(_) => break Ended::Failed(None),
            Verdict::TaskGone { msg } => {
                if lock(&shared.cancelled).contains(task_id) {
                    let _ = tx.send(ExecutionEvent::Interrupted);
                } else {
                    warn!(task = task_id, %link, msg, "RunningHub no longer knows the task");
                }
                // Ending the stream without a terminal event: the engine treats it as lost.
                return;
            }
            Verdict::Config { code, msg } => {
                *lock(&shared.config_error) = Some(format!("{code} {msg}"));
                let e = Verdict::Config { code, msg }.to_error();
                if let Some(e) = e {
                    let _ = tx.send(ExecutionEvent::Failed { error: e });
                }
                return;
            }
            Verdict::Other { code, msg } => {
                let e = ExecutionError::backend_specific(format!(
                    "RunningHub status {}: {msg} (task {link})",
                    code.map_or_else(|| "?".to_string(), |c| c.to_string())
                ));
                let _ = tx.send(ExecutionEvent::Failed { error: e });
                return;
            }
            Verdict::Malformed { .. }
            | Verdict::BackPressure { .. }
            | Verdict::InputError { .. } => {
                // Not an answer about the task: ask again.
                phase
            }
        };
        if new_phase != phase {
            debug!(
                task = task_id,
                ?new_phase,
                elapsed_s = elapsed.as_secs(),
                "state changed"
            );
            phase = new_phase;
            since = Instant::now();
            next_warning = cfg.stuck_after;
            interval = cfg.poll_min;
        } else {
            interval = interval.mul_f64(cfg.poll_growth.max(1.0)).min(cfg.poll_max);
        }
        match phase {
            // RunningHub gives no queue position: "behind others" keeps the engine's start
            // clock off and its queue clock on.
            // Sent once per stretch in the queue (each one is a stored job event).
            Phase::Queued if !queued_sent => {
                queued_sent = true;
                let _ = tx.send(ExecutionEvent::Queued { position: 1 });
            }
            Phase::Queued => {}
            // Each confirmed RUNNING is a liveness signal (no node events exist).
            Phase::Running => {
                queued_sent = false;
                let _ = tx.send(ExecutionEvent::Started);
            }
            Phase::Unknown => {}
        }
        let in_state = since.elapsed();
        if phase != Phase::Unknown && in_state >= next_warning {
            warn!(task = task_id, %link, state = ?phase, in_state_s = in_state.as_secs(),
                elapsed_s = elapsed.as_secs(), "RunningHub task has been in one state unusually long");
            let state = match phase {
                Phase::Queued => "queued",
                Phase::Running => "running",
                Phase::Unknown => "in an unknown state",
            };
            let _ = tx.send(ExecutionEvent::Notice {
                message: format!(
                    "RunningHub task {task_id} has been {state} for {}s ({}s since it was created): {link}",
                    in_state.as_secs(),
                    elapsed.as_secs()
                ),
            });
            next_warning = next_warning.saturating_mul(2);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = wake.notified() => debug!(task = task_id, "task socket says it ended; checking now"),
        }
    };
    // It ended: the outputs answer carries the files or the failure reason.
    let mut tries = 0;
    loop {
        tries += 1;
        if tx.is_closed() {
            return;
        }
        let answer = shared.client.outputs(task_id).await;
        let elapsed = started.elapsed();
        match answer {
            Ok(Answer {
                verdict: Verdict::Succeeded(data),
                ..
            }) => {
                let mut artifacts = artifacts_from_outputs(&cfg.id, task_id, &data);
                if cfg.checksum_outputs {
                    checksum(&shared.client, &mut artifacts).await;
                }
                info!(task = task_id, %link, elapsed_s = elapsed.as_secs(), outputs = artifacts.len(),
                    "RunningHub task succeeded");
                if matches!(ended, Ended::Failed(_)) {
                    warn!(
                        task = task_id,
                        "status said FAILED but outputs are there; taking them"
                    );
                }
                let _ = tx.send(ExecutionEvent::Succeeded { artifacts });
                return;
            }
            Ok(Answer {
                verdict: Verdict::Failed(mut e),
                ..
            }) => {
                if lock(&shared.cancelled).contains(task_id) {
                    let _ = tx.send(ExecutionEvent::Interrupted);
                    return;
                }
                e.message = format!("{} (task {link}, after {} s)", e.message, elapsed.as_secs());
                let _ = tx.send(ExecutionEvent::Failed { error: e });
                return;
            }
            Ok(Answer {
                verdict: Verdict::TaskGone { .. },
                ..
            }) => return,
            Ok(Answer { verdict, .. }) => {
                debug!(task = task_id, ?verdict, "outputs not ready yet");
                if matches!(verdict, Verdict::Other { .. } | Verdict::Config { .. }) {
                    if let Some(e) = verdict.to_error() {
                        let _ = tx.send(ExecutionEvent::Failed { error: e });
                    }
                    return;
                }
            }
            Err(e) => {
                warn!(task = task_id, %link, error = %e, "outputs call failed; retrying");
            }
        }
        if tries >= cfg.outputs_tries.max(1) {
            let error = match &ended {
                Ended::Failed(Some(e)) => e.clone(),
                Ended::Failed(None) => ExecutionError::deterministic(format!(
                    "RunningHub task failed and gave no reason (task {link})"
                ))
                .with_detail(ErrorDetail::Exception {
                    exception_type: "unknown".into(),
                }),
                Ended::Success => ExecutionError::transient(format!(
                    "RunningHub task finished but its outputs could not be read (task {link})"
                )),
            };
            let _ = tx.send(ExecutionEvent::Failed { error });
            return;
        }
        tokio::time::sleep(cfg.poll_min).await;
    }
}

/// Downloads each output once to record its size and checksum.
async fn checksum(client: &RunningHubClient, artifacts: &mut [Artifact]) {
    for a in artifacts.iter_mut() {
        let Some(url) = a.locator.get("fileUrl").and_then(Value::as_str) else {
            continue;
        };
        let resp = match client.download(url).await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                warn!(file = %a.filename, status = %r.status(), "output not downloadable");
                continue;
            }
            Err(e) => {
                warn!(file = %a.filename, error = %e, "output not downloadable");
                continue;
            }
        };
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stream = resp.bytes_stream();
        let mut ok = true;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => {
                    size += c.len() as u64;
                    hasher.update(&c);
                }
                Err(e) => {
                    warn!(file = %a.filename, error = %e.without_url(), "output download broke off");
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            a.size = Some(size);
            a.sha256 = Some(
                hasher
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            );
        }
    }
}

#[async_trait]
impl Backend for RunningHubBackend {
    fn id(&self) -> &BackendId {
        &self.shared.config.id
    }

    fn kind(&self) -> &'static str {
        "runninghub"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_concurrent: self.shared.config.max_concurrent.max(1),
            interrupt: true,
            restart: false,
            uploads: true,
            hosted_workflows: true,
            queue_position: false,
            reattach: true,
        }
    }

    async fn inventory(&self) -> Result<Inventory, BackendError> {
        let cfg = &self.shared.config;
        let mut facts = std::collections::BTreeMap::new();
        facts.insert(
            "base_url".to_owned(),
            cfg.client.base_url.as_str().to_owned(),
        );
        if let Some(t) = &cfg.client.instance_type {
            facts.insert("instance_type".to_owned(), t.clone());
        }
        if let Some(w) = &cfg.default_workflow_id {
            facts.insert("default_workflow_id".to_owned(), w.clone());
        }
        // The account's balance, for the spill-over budget check (`remain_coins`,
        // `remain_money`); refreshed with the inventory. Missing when the account status
        // cannot be read — a strategy with a minimum budget then keeps work off the cloud.
        if let Ok(Answer {
            verdict: Verdict::Succeeded(data),
            ..
        }) = self.shared.client.account_status().await
        {
            for (from, to) in [
                ("remainCoins", "remain_coins"),
                ("remainMoney", "remain_money"),
            ] {
                let v = match data.get(from) {
                    Some(Value::Number(n)) => n.as_f64(),
                    Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
                    _ => None,
                };
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    facts.insert(to.to_owned(), v.to_string());
                }
            }
        }
        Ok(Inventory {
            node_classes: None,
            models: None,
            labels: cfg.labels.clone(),
            facts,
        })
    }

    async fn health(&self) -> Health {
        let client = &self.shared.client;
        match client.account_status().await {
            Ok(Answer {
                verdict: Verdict::Succeeded(_),
                ..
            }) => {
                *lock(&self.shared.config_error) = None;
            }
            Ok(Answer {
                verdict: Verdict::Config { code, msg },
                ..
            }) => {
                let d = format!("RunningHub rejects the API key ({code} {msg})");
                *lock(&self.shared.config_error) = Some(d.clone());
                return Health::down(d);
            }
            Ok(Answer { verdict, .. }) => {
                return Health::down(format!("account status: {verdict:?}"));
            }
            Err(e) => return Health::down(e.to_string()),
        }
        let mut health = Health::ok();
        match client.queue_status().await {
            Ok(Answer {
                verdict: Verdict::Succeeded(data),
                ..
            }) => {
                let n = |k: &str| {
                    data.get(k)
                        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
                        .and_then(|n| u32::try_from(n).ok())
                };
                health.queue_depth = n("totalCurrentTasks").or_else(|| {
                    Some(n("runningCount")?.saturating_add(n("queuedCount").unwrap_or(0)))
                });
                if let Some(limit) = n("concurrentLimit").filter(|l| *l > 0) {
                    self.shared.set_limit(limit);
                }
            }
            Ok(Answer {
                verdict: Verdict::Config { code, msg },
                ..
            }) => return Health::down(format!("RunningHub rejects the API key ({code} {msg})")),
            Ok(_) | Err(_) => health.detail = "queue status unavailable".into(),
        }
        health
    }

    async fn submit(&self, request: SubmitRequest) -> Result<Execution, BackendError> {
        let shared = &self.shared;
        let cfg = &shared.config;
        if let Some(e) = lock(&shared.config_error).clone() {
            return Err(BackendError::Execution(ExecutionError::backend_specific(
                format!("RunningHub backend {} is misconfigured: {e}", cfg.id),
            )));
        }
        let names: HashMap<String, String> = {
            let up = lock(&shared.uploaded);
            request
                .uploads
                .iter()
                .filter_map(|u| up.get(&upload_key(u)).map(|f| (u.name.clone(), f.clone())))
                .collect()
        };
        let task = task_request(
            &request.workflow,
            cfg.default_workflow_id.as_deref(),
            &names,
        )?;
        let deadline = Instant::now() + cfg.backpressure_max_wait;
        let mut wait = cfg.backpressure_wait;
        let mut queued = Some(Ticket {
            shared,
            ticket: shared.enqueue(None),
        });
        loop {
            let ticket = match &queued {
                Some(t) => t.ticket,
                None => {
                    return Err(transient("RunningHub submit lost its place in line"));
                }
            };
            if !shared.try_reserve(ticket) {
                // Wait for a slot to free up (woken at once), re-checking now and then.
                let notified = shared.slot_freed.notified();
                if Instant::now() >= deadline {
                    return Err(transient(format!(
                        "RunningHub backend {} is at its concurrency limit",
                        cfg.id
                    )));
                }
                let _ =
                    tokio::time::timeout_at(deadline.min(Instant::now() + wait), notified).await;
                continue;
            }
            // We hold a slot; our place in line is used up.
            if let Some(t) = queued.take() {
                std::mem::forget(t);
            }
            let answer = match shared.client.create(&task).await {
                Ok(a) => a,
                Err(e) => {
                    shared.release(false);
                    return Err(from_transport(e));
                }
            };
            match answer.verdict {
                Verdict::Succeeded(data) => {
                    let Some(created) = CreatedTask::from_data(&data) else {
                        shared.release(false);
                        return Err(transient("RunningHub create answered without a taskId"));
                    };
                    let initial = match created.task_status.as_deref() {
                        Some("QUEUED") => Phase::Queued,
                        Some("RUNNING") => Phase::Running,
                        _ => Phase::Unknown,
                    };
                    info!(backend = %cfg.id, job = %request.job, attempt = request.attempt,
                        task = %created.task_id, link = %cfg.task_page(&created.task_id),
                        "RunningHub task created");
                    return Ok(self.start_monitor(
                        &created.task_id,
                        initial,
                        true,
                        created.net_wss_url.clone(),
                    ));
                }
                Verdict::BackPressure { msg } => {
                    shared.back_pressure();
                    // Back to the head of the line: this submit has waited longest.
                    queued = Some(Ticket {
                        shared,
                        ticket: shared.enqueue(Some(ticket)),
                    });
                    shared.release(false);
                    if Instant::now() + wait > deadline {
                        return Err(transient(format!(
                            "RunningHub personal queue stayed full (814 {msg})"
                        )));
                    }
                    info!(backend = %cfg.id, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        effective = self.effective_capacity(), "814: personal queue full; waiting to create again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(cfg.poll_max.max(cfg.backpressure_wait));
                }
                Verdict::Failed(e) => {
                    shared.release(false);
                    // A refused graph may still have a task id: make sure it does not run.
                    if let Some(created) = CreatedTask::from_data(&answer.envelope.data) {
                        let _ = shared.client.cancel(&created.task_id).await;
                    }
                    return Err(e.into());
                }
                Verdict::Config { code, msg } => {
                    shared.release(false);
                    *lock(&shared.config_error) = Some(format!("{code} {msg}"));
                    let e = Verdict::Config { code, msg }.to_error();
                    return Err(e.map_or_else(|| transient("configuration error"), Into::into));
                }
                other => {
                    shared.release(false);
                    let e = other
                        .to_error()
                        .unwrap_or_else(|| ExecutionError::transient("unexpected create answer"));
                    return Err(e.into());
                }
            }
        }
    }

    async fn cancel(&self, remote: &RemoteRef) -> Result<CancelAck, BackendError> {
        let id = remote.as_str();
        let before = self.shared.client.status(id).await.ok().map(|a| a.verdict);
        lock(&self.shared.cancelled).insert(id.to_owned());
        let answer = self
            .shared
            .client
            .cancel(id)
            .await
            .map_err(from_transport)?;
        match answer.verdict {
            Verdict::Succeeded(_) => Ok(match before {
                Some(Verdict::Queued) => CancelAck::Dequeued,
                _ => CancelAck::InterruptSent,
            }),
            Verdict::TaskGone { .. } => Ok(CancelAck::NotFound),
            other => Err(other
                .to_error()
                .unwrap_or_else(|| ExecutionError::transient("unexpected cancel answer"))
                .into()),
        }
    }

    async fn reattach(&self, remote: &RemoteRef) -> Result<Option<Execution>, BackendError> {
        let id = remote.as_str();
        let answer = self
            .shared
            .client
            .status(id)
            .await
            .map_err(from_transport)?;
        let initial = match answer.verdict {
            Verdict::TaskGone { .. } => return Ok(None),
            Verdict::Queued => Phase::Queued,
            Verdict::Running => Phase::Running,
            Verdict::Succeeded(_) | Verdict::Failed(_) => Phase::Unknown,
            other => {
                return Err(other
                    .to_error()
                    .unwrap_or_else(|| ExecutionError::transient("unexpected status answer"))
                    .into());
            }
        };
        // A reattached task counts against the key's slots like any other.
        let reserved = {
            let mut s = lock(&self.shared.slots);
            s.in_flight += 1;
            true
        };
        Ok(Some(self.start_monitor(id, initial, reserved, None)))
    }

    async fn upload(&self, upload: &Upload, bytes: Bytes) -> Result<(), BackendError> {
        let key = upload_key(upload);
        if lock(&self.shared.uploaded).contains_key(&key) {
            return Ok(());
        }
        let answer = self
            .shared
            .client
            .upload(&upload.name, bytes)
            .await
            .map_err(from_transport)?;
        match answer.verdict {
            Verdict::Succeeded(data) => {
                let name = data
                    .get("fileName")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                lock(&self.shared.uploaded).insert(key, name);
                Ok(())
            }
            other => Err(other
                .to_error()
                .map(|mut e| {
                    e.message = format!("upload {}: {}", upload.name, e.message);
                    e
                })
                .unwrap_or_else(|| ExecutionError::transient("unexpected upload answer"))
                .into()),
        }
    }

    async fn fetch(&self, artifact: &Artifact) -> Result<ByteStream, BackendError> {
        if artifact.backend != self.shared.config.id {
            return Err(BackendError::NotFound(format!(
                "{} is on backend {}",
                artifact.filename, artifact.backend
            )));
        }
        let url = artifact
            .locator
            .get("fileUrl")
            .and_then(Value::as_str)
            .ok_or_else(|| BackendError::NotFound(format!("{}: no fileUrl", artifact.filename)))?;
        let resp = self
            .shared
            .client
            .download(url)
            .await
            .map_err(from_transport)?;
        let status = resp.status();
        if status.as_u16() == 404 || status.as_u16() == 410 {
            return Err(BackendError::NotFound(artifact.filename.clone()));
        }
        if !status.is_success() {
            return Err(transient(format!(
                "downloading {}: HTTP {status}",
                artifact.filename
            )));
        }
        let name = artifact.filename.clone();
        Ok(Box::pin(resp.bytes_stream().map(move |r| {
            r.map_err(|e| transient(format!("downloading {name}: {}", e.without_url())))
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(v: Value) -> Workflow {
        Workflow::from_value(v).unwrap()
    }

    #[test]
    fn hosted_marker_builds_node_info_list() {
        let w = wf(json!({
            "rh": {"class_type": HOSTED_WORKFLOW_CLASS, "inputs": {"workflow_id": "1987"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
            "10": {"class_type": "LoadImage", "inputs": {"image": "in.png"}}
        }));
        let uploads = HashMap::from([("in.png".to_owned(), "api/abc.png".to_owned())]);
        let TaskRequest::Hosted {
            workflow_id,
            node_info_list,
        } = task_request(&w, None, &uploads).unwrap()
        else {
            panic!()
        };
        assert_eq!(workflow_id, "1987");
        assert!(node_info_list.iter().all(|n| n.field_name != "clip"));
        assert!(node_info_list.contains(&NodeInfo {
            node_id: "6".into(),
            field_name: "text".into(),
            field_value: json!("a cat")
        }));
        assert!(node_info_list.contains(&NodeInfo {
            node_id: "10".into(),
            field_name: "image".into(),
            field_value: json!("api/abc.png")
        }));
        assert_eq!(node_info_list.len(), 3);
    }

    #[test]
    fn full_workflow_needs_a_default_id() {
        let w = wf(json!({"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}}}));
        let e = task_request(&w, None, &HashMap::new()).unwrap_err();
        assert_eq!(e.kind, comfyfleet_core::ErrorKind::BackendSpecific);
        let uploads = HashMap::from([("in.png".to_owned(), "api/abc.png".to_owned())]);
        let TaskRequest::Full {
            workflow_id,
            workflow,
        } = task_request(&w, Some("42"), &uploads).unwrap()
        else {
            panic!()
        };
        assert_eq!(workflow_id, "42");
        assert_eq!(workflow["1"]["inputs"]["image"], "api/abc.png");
        let app = wf(json!({"a": {"class_type": AI_APP_CLASS, "inputs": {"webapp_id": 77}}}));
        assert!(matches!(
            task_request(&app, None, &HashMap::new()).unwrap(),
            TaskRequest::AiApp { webapp_id, .. } if webapp_id == "77"
        ));
        let bad = wf(json!({"a": {"class_type": HOSTED_WORKFLOW_CLASS, "inputs": {}}}));
        assert_eq!(
            task_request(&bad, None, &HashMap::new()).unwrap_err().kind,
            comfyfleet_core::ErrorKind::Deterministic
        );
    }

    #[test]
    fn outputs_become_artifacts() {
        let data = json!([{"fileUrl": "https://cdn.x/out/ComfyUI_0001.png?sig=1", "fileType": "png",
            "nodeId": "9", "taskCostTime": "12", "consumeCoins": "3"}, {"nodeId": "1"}]);
        let a = artifacts_from_outputs(&BackendId::new("rh"), "t1", &data);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].node, "9");
        assert_eq!(a[0].filename, "ComfyUI_0001.png");
        assert_eq!(a[0].kind, "image");
        assert_eq!(a[0].content_type.as_deref(), Some("image/png"));
        assert_eq!(
            a[0].locator["fileUrl"],
            "https://cdn.x/out/ComfyUI_0001.png?sig=1"
        );
        assert_eq!(a[0].locator["meta"]["consumeCoins"], "3");
        assert_eq!(a[0].locator["taskId"], "t1");
        assert!(artifacts_from_outputs(&BackendId::new("rh"), "t", &json!([])).is_empty());
    }
}
