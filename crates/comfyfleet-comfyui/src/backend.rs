//! [`ComfyUiBackend`]: the [`Backend`] implementation.
//!
//! * One long-lived WebSocket per server (`socket_task`), with its own client id, reconnecting
//!   with backoff and pinging so a dead socket is noticed (ComfyUI says nothing while idle).
//!   Messages are routed by `prompt_id` to the prompt's monitor; messages for other clients'
//!   prompts (broadcast leakage) are dropped.
//! * Per prompt, a monitor (`monitor`) that feeds a [`PromptTracker`] from the socket **and**
//!   checks `/api/queue` then `/api/history/{id}` from the moment of submission, backing off
//!   while the socket works and polling fast while it does not. Whichever sees the end first
//!   wins. A prompt in neither queue nor history is gone (server restarted, evicted, deleted).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use comfyfleet_core::{
    Artifact, Backend, BackendError, BackendId, ByteStream, CancelAck, Capabilities, ErrorDetail,
    Execution, ExecutionError, ExecutionEvent, Health, Inventory, RemoteRef, SubmitRequest, Upload,
};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;

use crate::config::ComfyUiConfig;
use crate::protocol::{
    BinaryMessage, QueueState, ServerMessage, classify_submit_error, decode_binary, decode_text,
    parse_history, queue_state,
};
use crate::tracker::PromptTracker;

/// How long a healthy socket may lag behind the history before the history's word is taken.
const HISTORY_GRACE: Duration = Duration::from_millis(100);

/// ComfyUI frames can be one full-size image: allow large ones deliberately.
const MAX_FRAME: usize = 256 << 20;

enum Signal {
    Msg(ServerMessage),
    Preview(Option<String>, Bytes),
}

struct Shared {
    config: ComfyUiConfig,
    http: reqwest::Client,
    client_id: String,
    /// prompt id → (registration number, sender). A monitor removes only its own registration:
    /// a reattach may have replaced it.
    watchers: Mutex<HashMap<String, (u64, mpsc::UnboundedSender<Signal>)>>,
    registrations: std::sync::atomic::AtomicU64,
    running_prompt: Mutex<Option<String>>,
    cancelled: Mutex<HashSet<String>>,
    uploaded: Mutex<HashSet<String>>,
    consumed: Mutex<VecDeque<(Instant, String)>>,
    connected: watch::Sender<bool>,
    /// When the socket last delivered anything (ComfyUI broadcasts `status` on every queue
    /// change, so a healthy socket speaks right after each submit; a silent one never does).
    last_socket_message: Mutex<Option<Instant>>,
    max_body: std::sync::atomic::AtomicU64,
    shutdown: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain bookkeeping behind these locks; keep going after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A self-hosted ComfyUI server. Cheap to clone; the socket task stops when the last clone is
/// dropped.
#[derive(Clone)]
pub struct ComfyUiBackend {
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl std::fmt::Debug for ComfyUiBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComfyUiBackend")
            .field("id", &self.shared.config.id)
            .field("base_url", &redacted(&self.shared.config.base_url))
            .finish_non_exhaustive()
    }
}

/// The URL without user info (credentials never reach logs).
fn redacted(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

fn transient(msg: impl Into<String>) -> BackendError {
    BackendError::Execution(ExecutionError::transient(msg))
}

impl ComfyUiBackend {
    /// Creates the backend and starts its socket task (inside a tokio runtime). Fails only on a
    /// bad URL; an unreachable server is reported by `health` and retried by the socket task.
    pub fn new(config: ComfyUiConfig) -> Result<Self, BackendError> {
        match config.base_url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(BackendError::Execution(ExecutionError::deterministic(
                    format!(
                        "backend {}: base URL must be http or https, not {other}",
                        config.id
                    ),
                )));
            }
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A stall timeout, not a total one: outputs and uploads can be large. JSON calls add
        // their own total timeout per request.
        let http = reqwest::Client::builder()
            .read_timeout(config.http_timeout)
            .connect_timeout(config.http_timeout)
            .build()
            .map_err(|e| transient(format!("building the HTTP client: {e}")))?;
        let (connected, _) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            client_id: uuid::Uuid::new_v4().simple().to_string(),
            max_body: std::sync::atomic::AtomicU64::new(config.max_body),
            config,
            http,
            watchers: Mutex::new(HashMap::new()),
            registrations: std::sync::atomic::AtomicU64::new(0),
            running_prompt: Mutex::new(None),
            cancelled: Mutex::new(HashSet::new()),
            uploaded: Mutex::new(HashSet::new()),
            consumed: Mutex::new(VecDeque::new()),
            connected,
            last_socket_message: Mutex::new(None),
            shutdown: shutdown.clone(),
        });
        tokio::spawn(socket_task(Arc::downgrade(&shared), shutdown.clone()));
        tokio::spawn(history_sweeper(Arc::downgrade(&shared), shutdown.clone()));
        Ok(ComfyUiBackend {
            shared,
            _stop: Arc::new(StopOnDrop(shutdown)),
        })
    }

    /// The WebSocket client id this backend uses.
    pub fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    /// Whether the socket is connected now.
    pub fn socket_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }
}

impl Shared {
    fn url(&self, path: &str) -> Result<Url, BackendError> {
        self.config.base_url.join(path).map_err(|e| {
            BackendError::Execution(ExecutionError::deterministic(format!(
                "bad URL {path}: {e}"
            )))
        })
    }

    async fn get_json(&self, path: &str) -> Result<Value, BackendError> {
        let resp = self
            .http
            .get(self.url(path)?)
            .timeout(self.config.http_timeout)
            .send()
            .await
            .map_err(|e| transient(format!("GET {path}: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(if status.as_u16() == 404 {
                BackendError::NotFound(path.to_owned())
            } else {
                transient(format!("GET {path}: HTTP {status}"))
            });
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| transient(format!("GET {path}: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| transient(format!("GET {path}: not JSON: {e}")))
    }

    async fn post_json(&self, path: &str, body: &Value) -> Result<(u16, String), BackendError> {
        let resp = self
            .http
            .post(self.url(path)?)
            .json(body)
            .timeout(self.config.http_timeout)
            .send()
            .await
            .map_err(|e| transient(format!("POST {path}: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| transient(format!("POST {path}: {e}")))?;
        Ok((status, text))
    }

    fn route(&self, msg: ServerMessage) {
        let target = match msg.prompt_id() {
            Some(p) => Some(p.to_owned()),
            // The reconnect `executing` and old servers' `progress` carry no id: they are about
            // the running prompt.
            None => match &msg {
                ServerMessage::Executing { .. } | ServerMessage::Progress { .. } => {
                    lock(&self.running_prompt).clone()
                }
                _ => None,
            },
        };
        match &msg {
            ServerMessage::ExecutionStart { prompt_id } => {
                *lock(&self.running_prompt) = Some(prompt_id.clone())
            }
            ServerMessage::ExecutionSuccess { prompt_id }
            | ServerMessage::ExecutionInterrupted { prompt_id, .. }
            | ServerMessage::Executing {
                prompt_id: Some(prompt_id),
                node: None,
            } => {
                let mut r = lock(&self.running_prompt);
                if r.as_deref() == Some(prompt_id.as_str()) {
                    *r = None;
                }
            }
            _ => {}
        }
        if let Some(t) = target
            && let Some((_, w)) = lock(&self.watchers).get(&t)
        {
            let _ = w.send(Signal::Msg(msg));
        }
    }

    fn route_binary(&self, frame: &Bytes) {
        let Ok(m) = decode_binary(frame) else { return };
        let (prompt, node, image) = match m {
            BinaryMessage::Preview { image, .. } => {
                (lock(&self.running_prompt).clone(), None, image)
            }
            BinaryMessage::PreviewWithMetadata { metadata, image } => (
                metadata
                    .get("prompt_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                metadata
                    .get("node_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                image,
            ),
            _ => return,
        };
        if let Some(p) = prompt
            && let Some((_, w)) = lock(&self.watchers).get(&p)
        {
            let _ = w.send(Signal::Preview(node, image));
        }
    }

    async fn queue(&self) -> Result<Value, BackendError> {
        self.get_json("api/queue").await
    }

    async fn history(&self, prompt_id: &str) -> Result<Value, BackendError> {
        self.get_json(&format!("api/history/{prompt_id}")).await
    }

    /// Downloads each output once to record its size and checksum.
    async fn checksum(&self, artifacts: &mut [Artifact]) -> Result<(), ExecutionError> {
        for a in artifacts.iter_mut() {
            let mut stream = fetch_stream(self, a).await.map_err(|e| {
                ExecutionError::transient(format!("fetching output {}: {e}", a.filename))
            })?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    ExecutionError::transient(format!("fetching output {}: {e}", a.filename))
                })?;
                size += chunk.len() as u64;
                hasher.update(&chunk);
            }
            a.size = Some(size);
            a.sha256 = Some(
                hasher
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            );
        }
        Ok(())
    }
}

async fn fetch_stream(shared: &Shared, artifact: &Artifact) -> Result<ByteStream, BackendError> {
    let loc = &artifact.locator;
    let mut url = shared.url("api/view")?;
    url.query_pairs_mut()
        .append_pair(
            "filename",
            loc.get("filename")
                .and_then(Value::as_str)
                .unwrap_or(&artifact.filename),
        )
        .append_pair(
            "subfolder",
            loc.get("subfolder").and_then(Value::as_str).unwrap_or(""),
        )
        .append_pair(
            "type",
            loc.get("type").and_then(Value::as_str).unwrap_or("output"),
        );
    let resp = shared
        .http
        .get(url)
        .send()
        .await
        .map_err(|e| transient(format!("GET /api/view: {e}")))?;
    match resp.status().as_u16() {
        200 => {}
        404 => return Err(BackendError::NotFound(artifact.filename.clone())),
        s => {
            return Err(transient(format!(
                "GET /api/view {}: HTTP {s}",
                artifact.filename
            )));
        }
    }
    Ok(Box::pin(resp.bytes_stream().map(|r| {
        r.map_err(|e| transient(format!("reading output: {e}")))
    })))
}

fn ws_url(base: &Url, client_id: &str) -> Result<Url, String> {
    let mut url = base.join("api/ws").map_err(|e| e.to_string())?;
    let scheme = if base.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    url.set_scheme(scheme)
        .map_err(|()| "cannot set the ws scheme".to_string())?;
    url.query_pairs_mut().append_pair("clientId", client_id);
    Ok(url)
}

/// Keeps one WebSocket open: connect, read everything (a socket that stops reading can stall the
/// server for every client), ping, reconnect with backoff.
async fn socket_task(shared: std::sync::Weak<Shared>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(s) = shared.upgrade() else { return };
        let url = match ws_url(&s.config.base_url, &s.client_id) {
            Ok(u) => u,
            Err(e) => {
                warn!(backend = %s.config.id, error = %e, "no WebSocket URL; polling only");
                return;
            }
        };
        let ping_every = s.config.ping_interval;
        let connect_timeout = s.config.connect_timeout.max(Duration::from_secs(1));
        let id = s.config.id.clone();
        drop(s);
        let config = WebSocketConfig::default()
            .max_frame_size(Some(MAX_FRAME))
            .max_message_size(Some(MAX_FRAME));
        let attempt = tokio::time::timeout(
            connect_timeout,
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true),
        );
        let ws = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        match ws {
            Ok(Ok((mut ws, _))) => {
                backoff = Duration::from_millis(100);
                if let Some(s) = shared.upgrade() {
                    s.connected.send_replace(true);
                }
                debug!(backend = %id, "socket connected");
                let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
                let mut last_heard = Instant::now();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            let _ = ws.close(None).await;
                            return;
                        }
                        _ = ping.tick() => {
                            if last_heard.elapsed() > ping_every * 2 {
                                warn!(backend = %id, "socket silent past two pings; reconnecting");
                                break;
                            }
                            if ws.send(Message::Ping(Bytes::new())).await.is_err() {
                                break;
                            }
                        }
                        m = ws.next() => {
                            last_heard = Instant::now();
                            let Some(s) = shared.upgrade() else { return };
                            if matches!(m, Some(Ok(Message::Text(_) | Message::Binary(_)))) {
                                // Only real messages count as speaking, not pings or pongs.
                                *lock(&s.last_socket_message) = Some(last_heard);
                            }
                            match m {
                                Some(Ok(Message::Text(t))) => match decode_text(t.as_str()) {
                                    Ok(msg) => s.route(msg),
                                    Err(e) => debug!(backend = %id, error = %e, "ignored a message"),
                                },
                                Some(Ok(Message::Binary(b))) => s.route_binary(&b),
                                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                                Some(Ok(_)) => {}
                            }
                        }
                    }
                }
                let _ = ws.close(None).await;
                if let Some(s) = shared.upgrade() {
                    s.connected.send_replace(false);
                }
                info!(backend = %id, "socket closed; reconnecting");
            }
            Ok(Err(e)) => debug!(backend = %id, error = %e, "socket connect failed"),
            Err(_) => debug!(backend = %id, "socket connect timed out"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Deletes history entries of finished prompts after the retention time, so the server's
/// memory does not grow with every job (protocol §7.9).
async fn history_sweeper(shared: std::sync::Weak<Shared>, shutdown: CancellationToken) {
    let every = match shared.upgrade() {
        Some(s) => (s.config.history_retention / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(30)),
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(s) = shared.upgrade() else { return };
        let due: Vec<String> = {
            let mut c = lock(&s.consumed);
            let mut due = Vec::new();
            while c
                .front()
                .is_some_and(|(at, _)| at.elapsed() >= s.config.history_retention)
            {
                if let Some((_, id)) = c.pop_front() {
                    due.push(id);
                }
            }
            due
        };
        if !due.is_empty()
            && let Err(e) = s.post_json("api/history", &json!({ "delete": due })).await
        {
            debug!(error = %e, "could not delete consumed history entries");
        }
    }
}

/// Watches one prompt until it ends; sends its events into `tx`.
async fn monitor(
    shared: Arc<Shared>,
    prompt_id: String,
    (registration, mut rx): Registration,
    tx: mpsc::UnboundedSender<ExecutionEvent>,
) {
    let cfg = shared.config.clone();
    let mut tracker = PromptTracker::new(prompt_id.clone(), cfg.id.clone());
    let mut connected = shared.connected.subscribe();
    let mut delay = cfg.poll_min;
    let mut next_poll = Instant::now();
    let mut last_position: Option<u32> = None;
    let shutdown = shared.shutdown.clone();
    let mut terminal: Option<ExecutionEvent> = None;
    // The history can answer before the socket delivers the prompt's last messages (two
    // connections race). With a healthy socket, give it a moment to finish the story first.
    let mut from_history: Option<(crate::protocol::HistoryOutcome, Instant)> = None;
    // Whether the socket has said anything about this prompt: a silent socket gets no grace.
    let mut socket_spoke = false;
    // The socket dropped at some point: messages (an `executed`) may be missing, so a success
    // seen on the socket takes its outputs from the history.
    let mut socket_gap = !*connected.borrow();
    let mut terminal_from_socket = false;
    while terminal.is_none() {
        let history_due = from_history.as_ref().map(|(_, at)| *at);
        tokio::select! {
            _ = async { tokio::time::sleep_until(history_due.unwrap_or_else(Instant::now)).await }, if history_due.is_some() => {
                if let Some((outcome, _)) = from_history.take() {
                    for ev in tracker.handle_history(&outcome) {
                        if ev.is_terminal() { terminal = Some(ev) } else { let _ = tx.send(ev); }
                    }
                }
            }
            _ = shutdown.cancelled() => break,
            _ = tx.closed() => break,
            sig = rx.recv() => match sig {
                Some(Signal::Msg(m)) => {
                    socket_spoke = true;
                    for ev in tracker.handle(&m) {
                        if ev.is_terminal() {
                            terminal = Some(ev);
                            terminal_from_socket = true;
                        } else {
                            let _ = tx.send(ev);
                        }
                    }
                    if tracker.needs_history() {
                        next_poll = Instant::now();
                    }
                }
                Some(Signal::Preview(node, bytes)) => { let _ = tx.send(ExecutionEvent::Preview { node, bytes }); }
                None => break,
            },
            _ = connected.changed() => {
                if !*connected.borrow() {
                    socket_gap = true;
                    // The socket broke: polling becomes the primary path.
                    delay = cfg.poll_min;
                    next_poll = Instant::now();
                }
            }
            _ = tokio::time::sleep_until(next_poll) => {
                let socket_ok = *connected.borrow();
                match poll_once(&shared, &prompt_id).await {
                    Ok(Polled::Done(outcome)) => {
                        // Alive: it spoke about this prompt, or about anything lately (the
                        // queue `status` broadcasts); a silent socket gets no grace.
                        let socket_alive = socket_spoke
                            || lock(&shared.last_socket_message)
                                .is_some_and(|t| t.elapsed() < cfg.ping_interval * 2);
                        if socket_ok && socket_alive && !tracker.needs_history() {
                            if from_history.is_none() {
                                from_history = Some((outcome, Instant::now() + HISTORY_GRACE));
                            }
                        } else {
                            for ev in tracker.handle_history(&outcome) {
                                if ev.is_terminal() { terminal = Some(ev) } else { let _ = tx.send(ev); }
                            }
                        }
                    }
                    Ok(Polled::Queue(QueueState::Pending(p))) => {
                        if last_position != Some(p) && !tracker.is_started() {
                            last_position = Some(p);
                            let _ = tx.send(ExecutionEvent::Queued { position: p });
                        }
                    }
                    Ok(Polled::Queue(QueueState::Running)) => {
                        if last_position != Some(0) && !tracker.is_started() {
                            last_position = Some(0);
                            let _ = tx.send(ExecutionEvent::Queued { position: 0 });
                        }
                        // Without a socket, "running" is the best sign of a start we get. With a
                        // healthy socket, only execution_start counts: a hung server can hold a
                        // prompt in queue_running without ever starting it.
                        if !socket_ok && !tracker.is_started() {
                            for ev in tracker.handle(&ServerMessage::ExecutionStart { prompt_id: prompt_id.clone() }) {
                                let _ = tx.send(ev);
                            }
                        }
                    }
                    Ok(Polled::Queue(QueueState::Absent)) | Ok(Polled::Gone) => {
                        let ev = if lock(&shared.cancelled).contains(&prompt_id) {
                            ExecutionEvent::Interrupted
                        } else {
                            ExecutionEvent::Failed {
                                error: ExecutionError::transient(format!(
                                    "ComfyUI no longer knows prompt {prompt_id} (server restarted, history evicted or deleted)"
                                ))
                                .with_detail(ErrorDetail::Lost),
                            }
                        };
                        terminal = Some(ev);
                    }
                    Err(e) => debug!(prompt = %prompt_id, error = %e, "status check failed; will retry"),
                }
                let cap = if socket_ok { cfg.poll_max } else { cfg.poll_degraded };
                next_poll = Instant::now() + delay.min(cap);
                delay = (delay * 2).min(cap);
            }
        }
    }
    shared.unregister(&prompt_id, registration);
    lock(&shared.cancelled).remove(&prompt_id);
    if let Some(mut ev) = terminal {
        if terminal_from_socket
            && socket_gap
            && let ExecutionEvent::Succeeded { artifacts } = &mut ev
        {
            // The history entry is written right after the success message; give it a moment.
            for _ in 0..20 {
                if let Ok(h) = shared.history(&prompt_id).await
                    && let Some(crate::protocol::HistoryOutcome::Succeeded(outputs)) =
                        parse_history(&h, &prompt_id)
                {
                    let from_history = crate::protocol::history_artifacts(&cfg.id, &outputs);
                    if from_history.len() > artifacts.len() {
                        *artifacts = from_history;
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        if let ExecutionEvent::Succeeded { artifacts } = &mut ev
            && let Err(e) = shared.checksum(artifacts).await
        {
            ev = ExecutionEvent::Failed { error: e };
        }
        lock(&shared.consumed).push_back((Instant::now(), prompt_id));
        let _ = tx.send(ev);
    }
}

enum Polled {
    Done(crate::protocol::HistoryOutcome),
    Queue(QueueState),
    Gone,
}

/// Queue first, then history: a prompt that finishes between the two calls is then seen in the
/// history, never mistaken for gone.
async fn poll_once(shared: &Shared, prompt_id: &str) -> Result<Polled, BackendError> {
    let queue = shared.queue().await?;
    let state = queue_state(&queue, prompt_id);
    let history = shared.history(prompt_id).await?;
    if let Some(outcome) = parse_history(&history, prompt_id) {
        return Ok(Polled::Done(outcome));
    }
    Ok(match state {
        QueueState::Absent => Polled::Gone,
        s => Polled::Queue(s),
    })
}

type Registration = (u64, mpsc::UnboundedReceiver<Signal>);

impl Shared {
    fn register(&self, prompt_id: &str) -> Registration {
        let (tx, rx) = mpsc::unbounded_channel();
        let n = self
            .registrations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.watchers).insert(prompt_id.to_owned(), (n, tx));
        (n, rx)
    }

    fn unregister(&self, prompt_id: &str, registration: u64) {
        let mut w = lock(&self.watchers);
        if w.get(prompt_id).is_some_and(|(n, _)| *n == registration) {
            w.remove(prompt_id);
        }
    }
}

impl ComfyUiBackend {
    fn start_monitor(&self, prompt_id: &str, rx: Registration) -> Execution {
        let (tx, events) = mpsc::unbounded_channel();
        let _ = tx.send(ExecutionEvent::Accepted);
        tokio::spawn(monitor(self.shared.clone(), prompt_id.to_owned(), rx, tx));
        Execution {
            remote: RemoteRef::new(prompt_id),
            events: Box::pin(tokio_stream_wrapper(events)),
        }
    }

    fn register(&self, prompt_id: &str) -> Registration {
        self.shared.register(prompt_id)
    }
}

fn tokio_stream_wrapper(
    mut rx: mpsc::UnboundedReceiver<ExecutionEvent>,
) -> impl futures::Stream<Item = ExecutionEvent> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[async_trait]
impl Backend for ComfyUiBackend {
    fn id(&self) -> &BackendId {
        &self.shared.config.id
    }

    fn kind(&self) -> &'static str {
        "comfyui"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_concurrent: 1 + self.shared.config.prefetch,
            interrupt: true,
            restart: false,
            uploads: true,
            hosted_workflows: false,
            queue_position: true,
            reattach: true,
        }
    }

    async fn inventory(&self) -> Result<Inventory, BackendError> {
        let s = &self.shared;
        let info = s.get_json("api/object_info").await?;
        let classes = info
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let mut models = std::collections::BTreeSet::new();
        if let Ok(folders) = s.get_json("api/models").await {
            for folder in folders
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if let Ok(files) = s.get_json(&format!("api/models/{folder}")).await {
                    models.extend(
                        files
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .map(str::to_owned),
                    );
                }
            }
        }
        if let Ok(features) = s.get_json("api/features").await
            && let Some(limit) = features.get("max_upload_size").and_then(Value::as_f64)
            && limit >= 1.0
        {
            let limit = (limit as u64).min(s.config.max_body);
            s.max_body
                .store(limit, std::sync::atomic::Ordering::Relaxed);
        }
        let mut facts = std::collections::BTreeMap::new();
        if let Ok(stats) = s.get_json("api/system_stats").await {
            if let Some(v) = stats
                .pointer("/system/comfyui_version")
                .and_then(Value::as_str)
            {
                facts.insert("comfyui_version".into(), v.to_owned());
            }
            if let Some(d) = stats.pointer("/devices/0") {
                for k in ["name", "vram_total", "vram_free"] {
                    if let Some(v) = d.get(k).filter(|v| !v.is_null()) {
                        facts.insert(
                            format!("device_{k}"),
                            v.to_string().trim_matches('"').to_owned(),
                        );
                    }
                }
            }
        }
        Ok(Inventory {
            node_classes: Some(classes),
            models: Some(models),
            labels: s.config.labels.clone(),
            facts,
        })
    }

    async fn health(&self) -> Health {
        match self.shared.get_json("api/system_stats").await {
            Ok(_) => {
                let depth = self
                    .shared
                    .get_json("api/prompt")
                    .await
                    .ok()
                    .and_then(|v| {
                        v.pointer("/exec_info/queue_remaining")
                            .and_then(Value::as_u64)
                    })
                    .and_then(|d| u32::try_from(d).ok());
                Health {
                    healthy: true,
                    queue_depth: depth,
                    detail: if self.socket_connected() {
                        String::new()
                    } else {
                        "WebSocket down; polling".into()
                    },
                }
            }
            Err(e) => Health::down(e.to_string()),
        }
    }

    async fn submit(&self, request: SubmitRequest) -> Result<Execution, BackendError> {
        let prompt_id = uuid::Uuid::new_v4().to_string();
        // Registered before the POST: the prompt's first events can beat the HTTP answer.
        let rx = self.register(&prompt_id);
        let mut connected = self.shared.connected.subscribe();
        let _ = tokio::time::timeout(
            self.shared.config.connect_timeout,
            connected.wait_for(|c| *c),
        )
        .await;
        let body = json!({
            "prompt": request.workflow.to_value(),
            "client_id": self.shared.client_id,
            "prompt_id": prompt_id,
            "extra_data": {"comfyfleet": {"job": request.job.to_string(), "attempt": request.attempt}},
        });
        let size = body.to_string().len() as u64;
        let limit = self
            .shared
            .max_body
            .load(std::sync::atomic::Ordering::Relaxed);
        if size >= limit {
            self.shared.unregister(&prompt_id, rx.0);
            return Err(BackendError::Execution(ExecutionError::deterministic(
                format!(
                    "the workflow is {size} bytes; {} accepts requests under {limit} bytes",
                    self.shared.config.id
                ),
            )));
        }
        let answer = self.shared.post_json("api/prompt", &body).await;
        let (status, text) = match answer {
            Ok(a) => a,
            Err(e) => {
                self.shared.unregister(&prompt_id, rx.0);
                // The server may have queued it before the connection broke: make sure it does
                // not run unattended.
                let me = self.clone();
                let id = prompt_id.clone();
                tokio::spawn(async move {
                    let _ = me.cancel(&RemoteRef::new(id)).await;
                });
                return Err(e);
            }
        };
        if status != 200 {
            self.shared.unregister(&prompt_id, rx.0);
            return Err(classify_submit_error(status, &text).into());
        }
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let server_id = v
            .get("prompt_id")
            .and_then(Value::as_str)
            .unwrap_or(&prompt_id)
            .to_owned();
        let node_errors = v
            .get("node_errors")
            .and_then(Value::as_object)
            .filter(|m| !m.is_empty());
        if let Some(errors) = node_errors {
            // Partial acceptance: some outputs would silently not run. Refuse the whole job.
            let _ = self
                .shared
                .post_json("api/queue", &json!({"delete": [server_id]}))
                .await;
            self.shared.unregister(&prompt_id, rx.0);
            let body = json!({"error": {"message": "some outputs failed validation"}, "node_errors": errors});
            return Err(classify_submit_error(400, &body.to_string()).into());
        }
        let rx = if server_id != prompt_id {
            // An old server ignored our id and minted its own.
            self.shared.unregister(&prompt_id, rx.0);
            self.register(&server_id)
        } else {
            rx
        };
        Ok(self.start_monitor(&server_id, rx))
    }

    async fn cancel(&self, remote: &RemoteRef) -> Result<CancelAck, BackendError> {
        let id = remote.as_str();
        let queue = self.shared.queue().await?;
        match queue_state(&queue, id) {
            QueueState::Pending(_) => {
                lock(&self.shared.cancelled).insert(id.to_owned());
                self.shared
                    .post_json("api/queue", &json!({"delete": [id]}))
                    .await?;
                // It may have started between the two calls: then interrupt it (still ours).
                if queue_state(&self.shared.queue().await?, id) == QueueState::Running {
                    self.shared
                        .post_json("api/interrupt", &json!({"prompt_id": id}))
                        .await?;
                    return Ok(CancelAck::InterruptSent);
                }
                Ok(CancelAck::Dequeued)
            }
            QueueState::Running => {
                // Checked it is ours first: servers that ignore prompt_id interrupt globally.
                lock(&self.shared.cancelled).insert(id.to_owned());
                self.shared
                    .post_json("api/interrupt", &json!({"prompt_id": id}))
                    .await?;
                Ok(CancelAck::InterruptSent)
            }
            QueueState::Absent => Ok(CancelAck::NotFound),
        }
    }

    async fn reattach(&self, remote: &RemoteRef) -> Result<Option<Execution>, BackendError> {
        let id = remote.as_str();
        let rx = self.register(id);
        match poll_once(&self.shared, id).await {
            Ok(Polled::Gone) => {
                self.shared.unregister(id, rx.0);
                Ok(None)
            }
            Ok(_) => Ok(Some(self.start_monitor(id, rx))),
            Err(e) => {
                self.shared.unregister(id, rx.0);
                Err(e)
            }
        }
    }

    async fn upload(&self, upload: &Upload, bytes: Bytes) -> Result<(), BackendError> {
        let key = format!("{}:{}", upload.sha256, upload.name);
        if lock(&self.shared.uploaded).contains(&key) {
            return Ok(());
        }
        let actual: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if actual != upload.sha256 {
            return Err(BackendError::Execution(ExecutionError::deterministic(
                format!("upload {}: content does not match its sha256", upload.name),
            )));
        }
        let part = reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(upload.name.clone());
        let form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("overwrite", "true");
        let resp = self
            .shared
            .http
            .post(self.shared.url("api/upload/image")?)
            .multipart(form)
            .send()
            .await
            .map_err(|e| transient(format!("upload {}: {e}", upload.name)))?;
        let status = resp.status();
        if !status.is_success() {
            let kind_transient = status.is_server_error();
            let msg = format!("upload {}: HTTP {status}", upload.name);
            return Err(if kind_transient {
                transient(msg)
            } else {
                BackendError::Execution(ExecutionError::deterministic(msg))
            });
        }
        lock(&self.shared.uploaded).insert(key);
        Ok(())
    }

    async fn fetch(&self, artifact: &Artifact) -> Result<ByteStream, BackendError> {
        if artifact.backend != self.shared.config.id {
            return Err(BackendError::NotFound(format!(
                "{} is on backend {}",
                artifact.filename, artifact.backend
            )));
        }
        fetch_stream(&self.shared, artifact).await
    }
}
