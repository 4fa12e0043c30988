//! Shared state, per-key task timelines, the HTTP handlers and the task WebSocket.

use crate::multipart::parse_multipart;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket};
use axum::extract::{FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{
    ApiKeyConfig, FailedReason, PendingVariant, RunningHubFaults, RunningHubSimConfig,
    RunningHubStats, UnknownKeyAnswer, codes,
};

/// Where a task is at a given instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Queued,
    Running,
    Success,
    Failed,
    Cancelled,
}

impl Phase {
    fn as_status(self) -> &'static str {
        match self {
            Phase::Queued => "QUEUED",
            Phase::Running => "RUNNING",
            Phase::Success => "SUCCESS",
            // A cancelled task reports FAILED (RunningHub has no separate status in the sources).
            Phase::Failed | Phase::Cancelled => "FAILED",
        }
    }
    fn is_current(self) -> bool {
        matches!(self, Phase::Queued | Phase::Running)
    }
}

/// One task: its whole timeline is fixed at create (only a cancel changes it), so every phase is
/// computed from `tokio::time::Instant::now()` (a paused clock works).
#[derive(Clone, Debug)]
pub(crate) struct Task {
    pub(crate) id: String,
    pub(crate) key: String,
    pub(crate) workflow_id: String,
    pub(crate) client_id: String,
    pub(crate) created: Instant,
    /// Real (scaled) durations.
    pub(crate) queue_for: Duration,
    /// `None`: never finishes.
    pub(crate) run_for: Option<Duration>,
    /// Simulated run time in seconds (`taskCostTime`).
    pub(crate) cost_secs: u64,
    pub(crate) failure: Option<FailedReason>,
    pub(crate) outputs: usize,
    pub(crate) file_type: String,
    pub(crate) output_node_id: String,
    pub(crate) cost_coins: u64,
    pub(crate) cost_money: f64,
    pub(crate) cancelled: Option<Instant>,
    pub(crate) pending_polls: u64,
    pub(crate) webhook_url: Option<String>,
}

impl Task {
    pub(crate) fn start(&self) -> Instant {
        self.created + self.queue_for
    }
    pub(crate) fn end(&self) -> Option<Instant> {
        self.run_for.map(|r| self.start() + r)
    }
    pub(crate) fn phase(&self, now: Instant) -> Phase {
        if let Some(c) = self.cancelled
            && now >= c
        {
            return Phase::Cancelled;
        }
        if now < self.start() {
            return Phase::Queued;
        }
        match self.end() {
            Some(e) if now >= e => {
                if self.failure.is_some() {
                    Phase::Failed
                } else {
                    Phase::Success
                }
            }
            _ => Phase::Running,
        }
    }
    /// When the task stopped being current (`None`: still current or never will stop).
    fn stop(&self) -> Option<Instant> {
        match (self.cancelled, self.end()) {
            (Some(c), Some(e)) => Some(c.min(e)),
            (c, e) => c.or(e),
        }
    }
    fn output_names(&self) -> Vec<String> {
        (1..=self.outputs)
            .map(|i| format!("ComfyUI_{i:05}_.{}", self.file_type))
            .collect()
    }
}

#[derive(Debug, Default)]
pub(crate) struct TaskState {
    pub(crate) tasks: HashMap<String, Task>,
    next: u64,
    uploads: HashMap<String, Bytes>,
}

/// Everything the handlers share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: RunningHubSimConfig,
    pub(crate) faults: RunningHubFaults,
    stats: Mutex<RunningHubStats>,
    state: Mutex<TaskState>,
    pub(crate) addr: SocketAddr,
    pub(crate) shutdown: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Largest number of overlapping `[from, to)` intervals.
fn max_overlap(mut iv: Vec<(Instant, Instant)>) -> u64 {
    let mut ev: Vec<(Instant, i64)> = Vec::with_capacity(iv.len() * 2);
    for (a, b) in iv.drain(..) {
        if a < b {
            ev.push((a, 1));
            ev.push((b, -1));
        }
    }
    // Ends sort before starts at the same instant.
    ev.sort();
    let (mut cur, mut max) = (0i64, 0i64);
    for (_, d) in ev {
        cur += d;
        max = max.max(cur);
    }
    u64::try_from(max).unwrap_or(0)
}

impl Inner {
    pub(crate) fn new(config: RunningHubSimConfig, addr: SocketAddr) -> Inner {
        Inner {
            faults: RunningHubFaults::new(config.faults.clone()),
            config,
            stats: Mutex::new(RunningHubStats::default()),
            state: Mutex::new(TaskState::default()),
            addr,
            shutdown: CancellationToken::new(),
        }
    }
    pub(crate) fn state(&self) -> MutexGuard<'_, TaskState> {
        lock(&self.state)
    }
    pub(crate) fn stat(&self, f: impl FnOnce(&mut RunningHubStats)) {
        f(&mut lock(&self.stats));
    }
    pub(crate) fn stats(&self) -> RunningHubStats {
        let mut s = lock(&self.stats).clone();
        let now = Instant::now();
        let st = self.state();
        let mut running: BTreeMap<String, Vec<(Instant, Instant)>> = BTreeMap::new();
        let mut current: BTreeMap<String, Vec<(Instant, Instant)>> = BTreeMap::new();
        for t in st.tasks.values() {
            let bound = t.stop().map_or(now, |x| x.min(now));
            running
                .entry(t.key.clone())
                .or_default()
                .push((t.start(), bound));
            current
                .entry(t.key.clone())
                .or_default()
                .push((t.created, bound));
        }
        s.max_running_per_key = running
            .into_iter()
            .map(|(k, v)| (k, max_overlap(v)))
            .collect();
        s.max_current_per_key = current
            .into_iter()
            .map(|(k, v)| (k, max_overlap(v)))
            .collect();
        s
    }
    pub(crate) fn scaled(&self, d: Duration) -> Duration {
        let s = self.config.time_scale;
        if s.is_finite() && s > 0.0 {
            d.mul_f64(s)
        } else {
            Duration::ZERO
        }
    }
    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn fired(&self) {
        self.stat(|s| s.faults_fired += 1);
    }
    /// Coins and money a key has left: initial balance minus the cost of its succeeded tasks.
    fn balance(&self, st: &TaskState, key: &str, acct: &ApiKeyConfig, now: Instant) -> (u64, f64) {
        let (mut coins, mut money) = (acct.coins, acct.money);
        for t in st.tasks.values().filter(|t| t.key == key) {
            if t.phase(now) == Phase::Success {
                coins = coins.saturating_sub(t.cost_coins);
                money -= t.cost_money;
            }
        }
        (coins, money.max(0.0))
    }
}

// ---- responses ---------------------------------------------------------------------------------

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The `{code, msg, data}` envelope, always HTTP 200.
fn envelope(code: i64, msg: &str, data: Value) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"code": code, "msg": msg, "data": data}),
    )
}

fn ok(data: Value) -> Response {
    envelope(codes::OK, codes::MSG_SUCCESS, data)
}

fn params_invalid() -> Response {
    envelope(
        codes::PARAMS_INVALID,
        codes::MSG_PARAMS_INVALID,
        Value::Null,
    )
}

fn not_found_task() -> Response {
    envelope(
        codes::TASK_NOT_FOUND,
        codes::MSG_TASK_NOT_FOUND,
        Value::Null,
    )
}

fn http_text(status: u16, body: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = Response::new(Body::from(body.to_owned()));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    r
}

fn not_found_http(path: &str) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"timestamp": now_ms(), "status": 404, "error": "Not Found", "path": path}),
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0))
}

// ---- routing -----------------------------------------------------------------------------------

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new().fallback(dispatch).with_state(inner)
}

fn label(path: &str) -> String {
    if path.starts_with("/files/") {
        "/files".to_owned()
    } else if path.starts_with("/ws/") || path == "/ws" {
        "/ws".to_owned()
    } else {
        path.to_owned()
    }
}

async fn dispatch(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let lab = label(&path);
    inner.stat(|s| {
        s.http_requests += 1;
        *s.requests.entry(lab.clone()).or_default() += 1;
    });
    let faults = inner.faults.get();
    let is_api = lab != "/files" && lab != "/ws";
    let mut delay = faults.proxy_delay;
    if is_api {
        delay += faults.response_delay;
        delay += faults
            .endpoint_delays
            .get(&path)
            .copied()
            .unwrap_or_default();
    }
    if lab == "/ws" {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if faults.hang_websocket_handshake {
            inner.fired();
            while inner.faults.get().hang_websocket_handshake {
                tokio::select! {
                    () = inner.shutdown.cancelled() => return http_text(503, "shutting down"),
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
        return websocket(inner, req).await;
    }
    if let Some(status) = inner.faults.http_error_for(&path) {
        inner.fired();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let reason = StatusCode::from_u16(status)
            .ok()
            .and_then(|c| c.canonical_reason())
            .unwrap_or("Error");
        return http_text(
            status,
            &format!("<html><body><h1>{status} {reason}</h1></body></html>"),
        );
    }
    let resp = route(&inner, &method, &path, req).await;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json && inner.faults.fire(|f| &mut f.malformed_json) {
        inner.fired();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let cut = bytes.slice(..bytes.len() / 2);
        let mut parts = parts;
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::from(cut));
    }
    resp
}

async fn route(inner: &Arc<Inner>, method: &Method, path: &str, req: Request) -> Response {
    match (method.as_str(), path) {
        ("POST", "/task/openapi/create") => with_json(inner, req, create_workflow).await,
        ("POST", "/task/openapi/ai-app/run") => with_json(inner, req, create_app).await,
        ("POST", "/task/openapi/status") => with_json(inner, req, status).await,
        ("POST", "/task/openapi/outputs") => with_json(inner, req, outputs).await,
        ("POST", "/task/openapi/cancel") => with_json(inner, req, cancel).await,
        ("POST", "/api/openapi/getJsonApiFormat") => with_json(inner, req, json_api_format).await,
        ("POST", "/uc/openapi/accountStatus") => with_json(inner, req, account_status).await,
        ("GET", "/openapi/v2/queue/status") => queue_status(inner, req.headers()),
        ("POST", "/openapi/v2/media/upload/binary") => upload(inner, req).await,
        ("GET", p) if p.starts_with("/files/") => file(inner, p),
        _ => not_found_http(path),
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    Some(t.trim().to_owned())
}

/// The key: `apiKey` (or `apikey`) in the body, else the Bearer header.
fn key_of(headers: &HeaderMap, body: Option<&Value>) -> Option<String> {
    body.and_then(|b| {
        b.get("apiKey")
            .or_else(|| b.get("apikey"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    })
    .or_else(|| bearer(headers))
}

/// A known key and its account, or the configured auth error.
#[allow(clippy::result_large_err)]
fn auth(inner: &Inner, key: Option<String>) -> Result<(String, ApiKeyConfig), Response> {
    if let Some(k) = key
        && let Some(acct) = inner.config.keys.get(&k)
    {
        return Ok((k, acct.clone()));
    }
    inner.stat(|s| s.auth_failures += 1);
    Err(match inner.config.unknown_key {
        UnknownKeyAnswer::Invalid401 => {
            envelope(codes::KEY_INVALID, codes::MSG_KEY_INVALID, Value::Null)
        }
        UnknownKeyAnswer::UserNotFound806 => envelope(
            codes::USER_NOT_FOUND,
            codes::MSG_USER_NOT_FOUND,
            Value::Null,
        ),
    })
}

type Handler = fn(&Arc<Inner>, &str, &ApiKeyConfig, &Value) -> Response;

async fn with_json(inner: &Arc<Inner>, req: Request, h: Handler) -> Response {
    let headers = req.headers().clone();
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), 64 * 1024 * 1024).await else {
        return params_invalid();
    };
    let body: Value = if bytes.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v @ Value::Object(_)) => v,
            _ => return params_invalid(),
        }
    };
    match auth(inner, key_of(&headers, Some(&body))) {
        Ok((key, acct)) => h(inner, &key, &acct, &body),
        Err(r) => r,
    }
}

/// A string or number field as a string.
fn id_field(body: &Value, name: &str) -> Option<String> {
    match body.get(name)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

// ---- tasks -------------------------------------------------------------------------------------

fn create_workflow(inner: &Arc<Inner>, key: &str, acct: &ApiKeyConfig, body: &Value) -> Response {
    let workflow_id = id_field(body, "workflowId");
    if let Some(w) = body.get("workflow").filter(|w| !w.is_null()) {
        let parsed = w
            .as_str()
            .and_then(|s| serde_json::from_str::<Value>(s).ok());
        if !matches!(parsed, Some(Value::Object(_))) {
            return envelope(
                codes::VALIDATE_PROMPT_FAILED,
                codes::MSG_VALIDATE_PROMPT_FAILED,
                Value::Null,
            );
        }
    } else if workflow_id.is_none() {
        return params_invalid();
    }
    create(inner, key, acct, body, workflow_id.unwrap_or_default())
}

fn create_app(inner: &Arc<Inner>, key: &str, acct: &ApiKeyConfig, body: &Value) -> Response {
    match id_field(body, "webappId") {
        Some(id) => create(inner, key, acct, body, id),
        None => params_invalid(),
    }
}

fn create(
    inner: &Arc<Inner>,
    key: &str,
    acct: &ApiKeyConfig,
    body: &Value,
    workflow_id: String,
) -> Response {
    if let Some(list) = body.get("nodeInfoList").filter(|l| !l.is_null()) {
        let valid = list.as_array().is_some_and(|items| {
            items.iter().all(|i| {
                id_field(i, "nodeId").is_some()
                    && i.get("fieldName").and_then(Value::as_str).is_some()
            })
        });
        if !valid {
            return params_invalid();
        }
    }
    let spec = inner
        .config
        .workflows
        .get(&workflow_id)
        .unwrap_or(&inner.config.default_workflow)
        .clone();
    let faults = inner.faults.get();
    let now = Instant::now();
    let mut st = inner.state();
    let current = st
        .tasks
        .values()
        .filter(|t| t.key == key && t.phase(now).is_current())
        .count();
    if current >= acct.concurrency_limit {
        drop(st);
        inner.stat(|s| s.tasks_rejected_limit += 1);
        return envelope(codes::QUEUE_LIMIT, codes::MSG_QUEUE_LIMIT, Value::Null);
    }
    if inner.config.enforce_balance {
        let (coins, _) = inner.balance(&st, key, acct, now);
        let reserved: u64 = st
            .tasks
            .values()
            .filter(|t| t.key == key && t.phase(now).is_current())
            .map(|t| t.cost_coins)
            .sum();
        if coins < reserved.saturating_add(spec.cost_coins) {
            return envelope(
                codes::NOT_ENOUGH_WALLET,
                codes::MSG_NOT_ENOUGH_WALLET,
                Value::Null,
            );
        }
    }
    let mut hang = spec.hang || faults.hang_workflows.contains(&workflow_id);
    if inner.faults.fire(|f| &mut f.hang_tasks) {
        inner.fired();
        hang = true;
    }
    let mut failure = spec.failure.clone();
    if inner.faults.fire(|f| &mut f.fail_tasks) {
        inner.fired();
        failure = Some(FailedReason::default());
    }
    st.next += 1;
    let id = (1_989_754_960_986_390_000u64 + st.next).to_string();
    let client_id = uuid::Uuid::new_v4().simple().to_string();
    let task = Task {
        id: id.clone(),
        key: key.to_owned(),
        workflow_id,
        client_id: client_id.clone(),
        created: now,
        queue_for: inner.scaled(spec.queue_time),
        run_for: (!hang).then(|| inner.scaled(spec.run_time)),
        cost_secs: spec.run_time.as_secs(),
        failure,
        outputs: spec.outputs,
        file_type: spec.file_type.clone(),
        output_node_id: spec.output_node_id.clone(),
        cost_coins: spec.cost_coins,
        cost_money: spec.cost_money,
        cancelled: None,
        pending_polls: 0,
        webhook_url: body
            .get("webhookUrl")
            .and_then(Value::as_str)
            .map(str::to_owned),
    };
    let phase = task.phase(now);
    st.tasks.insert(id.clone(), task);
    drop(st);
    inner.stat(|s| s.tasks_created += 1);
    let tips = json!({"result": true, "error": null, "outputs_to_execute": [spec.output_node_id], "node_errors": {}});
    ok(json!({
        "taskId": id,
        "taskStatus": phase.as_status(),
        "clientId": client_id,
        "promptTips": tips.to_string(),
        "netWssUrl": format!("ws://{}/ws/c_instance?c_host=127.0.0.1&c_port=8188&clientId={client_id}&taskId={id}", inner.addr),
    }))
}

/// Look up a task of this key.
fn with_task<R>(
    inner: &Inner,
    key: &str,
    body: &Value,
    f: impl FnOnce(&mut Task, Instant) -> R,
) -> Option<R> {
    let id = id_field(body, "taskId")?;
    let now = Instant::now();
    let mut st = inner.state();
    let t = st.tasks.get_mut(&id).filter(|t| t.key == key)?;
    Some(f(t, now))
}

fn status(inner: &Arc<Inner>, key: &str, _: &ApiKeyConfig, body: &Value) -> Response {
    match with_task(inner, key, body, |t, now| t.phase(now)) {
        Some(p) => ok(json!(p.as_status())),
        None => not_found_task(),
    }
}

fn failed_reason_json(r: &FailedReason) -> Value {
    json!({
        "node_name": r.node_name,
        "node_id": r.node_id,
        "exception_message": r.exception_message,
        "exception_type": r.exception_type,
        "traceback": r.traceback,
        "current_inputs": r.current_inputs,
        "current_outputs": r.current_outputs,
    })
}

fn pending(variant: PendingVariant, polls: u64, code: i64, msg: &str) -> Response {
    let nonzero = match variant {
        PendingVariant::NonZeroCode => true,
        PendingVariant::ZeroCode => false,
        PendingVariant::Alternate => polls % 2 == 1,
    };
    envelope(if nonzero { code } else { codes::OK }, msg, Value::Null)
}

fn outputs(inner: &Arc<Inner>, key: &str, _: &ApiKeyConfig, body: &Value) -> Response {
    let base = inner.base_url();
    let cfg = &inner.config;
    let r = with_task(inner, key, body, |t, now| match t.phase(now) {
        Phase::Queued => {
            t.pending_polls += 1;
            pending(
                cfg.queued_variant,
                t.pending_polls,
                codes::QUEUED,
                codes::MSG_QUEUED,
            )
        }
        Phase::Running => {
            t.pending_polls += 1;
            pending(
                cfg.running_variant,
                t.pending_polls,
                codes::RUNNING,
                codes::MSG_RUNNING,
            )
        }
        Phase::Success => {
            let money = (t.cost_money > 0.0).then(|| format!("{:.3}", t.cost_money));
            let list: Vec<Value> = t
                .output_names()
                .into_iter()
                .map(|n| {
                    json!({
                        "fileUrl": format!("{base}/files/{}/{n}", t.id),
                        "fileType": t.file_type,
                        "taskCostTime": t.cost_secs.to_string(),
                        "nodeId": t.output_node_id,
                        "consumeCoins": t.cost_coins.to_string(),
                        "consumeMoney": money,
                        "thirdPartyConsumeMoney": null,
                    })
                })
                .collect();
            ok(Value::Array(list))
        }
        Phase::Failed => {
            let r = t.failure.clone().unwrap_or_default();
            envelope(
                codes::TASK_FAILED,
                codes::MSG_TASK_FAILED,
                json!({"failedReason": failed_reason_json(&r)}),
            )
        }
        Phase::Cancelled => {
            let r = FailedReason {
                node_name: String::new(),
                node_id: String::new(),
                exception_message: "Task cancelled by user".to_owned(),
                exception_type: "InterruptProcessingException".to_owned(),
                traceback: String::new(),
                current_inputs: "{}".to_owned(),
                current_outputs: "[]".to_owned(),
            };
            envelope(
                codes::TASK_FAILED,
                codes::MSG_TASK_FAILED,
                json!({"failedReason": failed_reason_json(&r)}),
            )
        }
    });
    r.unwrap_or_else(not_found_task)
}

fn cancel(inner: &Arc<Inner>, key: &str, _: &ApiKeyConfig, body: &Value) -> Response {
    let r = with_task(inner, key, body, |t, now| {
        if t.phase(now).is_current() {
            t.cancelled = Some(now);
            true
        } else {
            false
        }
    });
    match r {
        Some(cancelled) => {
            if cancelled {
                inner.stat(|s| s.tasks_cancelled += 1);
            }
            ok(Value::Null)
        }
        None => not_found_task(),
    }
}

/// The built-in hosted workflow (LoadImage → SaveImage).
pub(crate) const BUILTIN_WORKFLOW: &str = r#"{"1":{"inputs":{"image":"example.png"},"class_type":"LoadImage","_meta":{"title":"Load Image"}},"9":{"inputs":{"filename_prefix":"ComfyUI","images":["1",0]},"class_type":"SaveImage","_meta":{"title":"Save Image"}}}"#;

fn json_api_format(inner: &Arc<Inner>, _: &str, _: &ApiKeyConfig, body: &Value) -> Response {
    let Some(id) = id_field(body, "workflowId") else {
        return params_invalid();
    };
    let text = inner
        .config
        .hosted_workflows
        .get(&id)
        .cloned()
        .unwrap_or_else(|| BUILTIN_WORKFLOW.to_owned());
    ok(Value::String(text))
}

fn account_status(inner: &Arc<Inner>, key: &str, acct: &ApiKeyConfig, _: &Value) -> Response {
    let now = Instant::now();
    let st = inner.state();
    let (coins, money) = inner.balance(&st, key, acct, now);
    let current = st
        .tasks
        .values()
        .filter(|t| t.key == key && t.phase(now).is_current())
        .count();
    drop(st);
    ok(json!({
        "remainCoins": coins.to_string(),
        "currentTaskCounts": current.to_string(),
        "remainMoney": format!("{money:.3}"),
        "currency": acct.currency,
        "apiType": acct.api_type,
    }))
}

fn queue_status(inner: &Arc<Inner>, headers: &HeaderMap) -> Response {
    let (key, acct) = match auth(inner, bearer(headers)) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let now = Instant::now();
    let st = inner.state();
    let (mut running, mut queued) = (0u64, 0u64);
    for t in st.tasks.values().filter(|t| t.key == key) {
        match t.phase(now) {
            Phase::Running => running += 1,
            Phase::Queued => queued += 1,
            _ => {}
        }
    }
    drop(st);
    ok(json!({
        "apiKeyType": acct.api_type,
        "concurrentLimit": acct.concurrency_limit,
        "runningCount": running,
        "queuedCount": queued,
        "totalCurrentTasks": running + queued,
    }))
}

// ---- uploads and files -------------------------------------------------------------------------

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

async fn upload(inner: &Arc<Inner>, req: Request) -> Response {
    let headers = req.headers().clone();
    let max = usize::try_from(inner.config.max_upload_size).unwrap_or(usize::MAX);
    let limit = max.saturating_mul(2).saturating_add(1 << 20);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        envelope(
            codes::FILE_TOO_LARGE,
            codes::MSG_FILE_TOO_LARGE,
            Value::Null,
        )
    };
    if declared.is_some_and(|n| n > limit) {
        return match auth(inner, bearer(&headers)) {
            Ok(_) => too_large(),
            Err(r) => r,
        };
    }
    let Ok(body) = axum::body::to_bytes(req.into_body(), limit).await else {
        return too_large();
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts = parse_multipart(ct, &body).unwrap_or_default();
    let form_key = parts
        .iter()
        .find(|p| p.name == "apiKey" || p.name == "apikey")
        .map(|p| String::from_utf8_lossy(&p.data).trim().to_owned());
    if let Err(r) = auth(inner, bearer(&headers).or(form_key)) {
        return r;
    }
    let Some(file) = parts.iter().find(|p| p.name == "file") else {
        return params_invalid();
    };
    if file.data.len() > max {
        return too_large();
    }
    let ext = file
        .filename
        .as_deref()
        .and_then(|f| f.rsplit_once('.'))
        .map(|(_, e)| e.to_ascii_lowercase())
        .filter(|e| !e.is_empty() && e.len() <= 8 && e.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "png".to_owned());
    let name = format!("api/{:016x}.{ext}", fnv(&file.data));
    inner
        .state()
        .uploads
        .insert(name.clone(), file.data.clone());
    inner.stat(|s| s.uploads += 1);
    let url = format!("{}/files/upload/{name}", inner.base_url());
    ok(json!({"fileName": name, "downloadUrl": url}))
}

/// Deterministic output bytes: a 64×64 PNG whose colours derive from the task id and file name
/// (other file types: 256 deterministic bytes).
pub(crate) fn output_bytes(task_id: &str, name: &str, file_type: &str) -> Vec<u8> {
    let seed = fnv(format!("{task_id}/{name}").as_bytes());
    if file_type != "png" {
        let mut x = seed;
        return (0..256)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x & 0xff) as u8
            })
            .collect();
    }
    let (w, h) = (64u32, 64u32);
    let [r0, g0, b0, ..] = seed.to_le_bytes();
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            data.push(r0.wrapping_add((x * 4) as u8));
            data.push(g0.wrapping_add((y * 4) as u8));
            data.push(b0);
        }
    }
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let _ = enc.add_text_chunk("taskId".to_owned(), task_id.to_owned());
        if let Ok(mut wr) = enc.write_header() {
            let _ = wr.write_image_data(&data);
            let _ = wr.finish();
        }
    }
    buf
}

fn file(inner: &Arc<Inner>, path: &str) -> Response {
    let rest = path.trim_start_matches("/files/");
    let bytes_and_type = if let Some(name) = rest.strip_prefix("upload/") {
        inner
            .state()
            .uploads
            .get(name)
            .map(|b| (b.to_vec(), guess_type(name)))
    } else {
        let (task_id, name) = rest.split_once('/').unwrap_or((rest, ""));
        let now = Instant::now();
        let st = inner.state();
        st.tasks
            .get(task_id)
            .filter(|t| {
                t.phase(now) == Phase::Success && t.output_names().iter().any(|n| n == name)
            })
            .map(|t| (output_bytes(&t.id, name, &t.file_type), guess_type(name)))
    };
    match bytes_and_type {
        Some((b, ct)) => {
            let mut r = Response::new(Body::from(b));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            r
        }
        None => not_found_http(path),
    }
}

fn guess_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()) {
        Some(e) if e == "png" => "image/png",
        Some(e) if e == "jpg" || e == "jpeg" => "image/jpeg",
        Some(e) if e == "webp" => "image/webp",
        Some(e) if e == "mp4" => "video/mp4",
        Some(e) if e == "gif" => "image/gif",
        _ => "application/octet-stream",
    }
}

// ---- the task WebSocket (`netWssUrl`) ----------------------------------------------------------

async fn websocket(inner: Arc<Inner>, req: Request) -> Response {
    let query = req.uri().query().unwrap_or("").to_owned();
    let (mut parts, _) = req.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    let task_id = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "taskId")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    ws.on_upgrade(move |socket| ws_session(inner, socket, task_id))
}

/// Wait until `deadline`; `false` when the client went away or the simulator stopped.
async fn wait_until(inner: &Inner, socket: &mut WebSocket, deadline: Instant) -> bool {
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return true,
            () = inner.shutdown.cancelled() => return false,
            m = socket.recv() => match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return false,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn send(inner: &Inner, socket: &mut WebSocket, msg: Value) -> bool {
    let ok = socket
        .send(Message::Text(msg.to_string().into()))
        .await
        .is_ok();
    if ok {
        inner.stat(|s| s.ws_messages_sent += 1);
    }
    ok
}

async fn ws_session(inner: Arc<Inner>, mut socket: WebSocket, task_id: String) {
    inner.stat(|s| s.ws_connections += 1);
    if inner.faults.get().silent_websocket {
        // Seed 000: the socket is open, reads are accepted, nothing is ever written.
        inner.fired();
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let _ = wait_until(&inner, &mut socket, far).await;
        return;
    }
    let snapshot = |inner: &Inner| inner.state().tasks.get(&task_id).cloned();
    let Some(task) = snapshot(&inner) else {
        let _ = socket.send(Message::Close(None)).await;
        return;
    };
    let pid = task.id.clone();
    let node = task.output_node_id.clone();
    let status = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}, "sid": task.client_id}});
    if !send(&inner, &mut socket, status).await {
        return;
    }
    if !wait_until(&inner, &mut socket, task.start()).await {
        return;
    }
    let cancelled =
        |inner: &Inner| snapshot(inner).is_none_or(|t| t.phase(Instant::now()) == Phase::Cancelled);
    if cancelled(&inner) {
        let _ = send(
            &inner,
            &mut socket,
            json!({"type": "execution_interrupted", "data": {"prompt_id": pid}}),
        )
        .await;
        let _ = socket.send(Message::Close(None)).await;
        return;
    }
    if !send(
        &inner,
        &mut socket,
        json!({"type": "execution_start", "data": {"prompt_id": pid, "timestamp": now_ms()}}),
    )
    .await
    {
        return;
    }
    let interval = inner
        .scaled(inner.config.ws_progress_interval)
        .max(Duration::from_millis(1));
    let steps = task.run_for.map(|r| {
        let n = r.as_nanos().div_ceil(interval.as_nanos().max(1));
        u64::try_from(n).unwrap_or(u64::MAX).max(1)
    });
    let mut i: u64 = 0;
    loop {
        i += 1;
        let mut deadline =
            task.start() + interval.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
        if let Some(e) = task.end() {
            deadline = deadline.min(e);
        }
        if !wait_until(&inner, &mut socket, deadline).await {
            return;
        }
        if cancelled(&inner) {
            let _ = send(
                &inner,
                &mut socket,
                json!({"type": "execution_interrupted", "data": {"prompt_id": pid}}),
            )
            .await;
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
        // A task that never finishes sends no progress; the socket stays open (until cancel).
        if let Some(n) = steps {
            let msg = json!({"type": "progress", "data": {"value": i.min(n), "max": n, "prompt_id": pid, "node": node}});
            if !send(&inner, &mut socket, msg).await {
                return;
            }
            if i >= n {
                break;
            }
        }
    }
    let end = match &task.failure {
        Some(r) => {
            let mut d = failed_reason_json(r);
            if let Value::Object(m) = &mut d {
                m.insert("prompt_id".to_owned(), json!(pid));
            }
            json!({"type": "execution_error", "data": d})
        }
        None => {
            let images: Vec<Value> = task
                .output_names()
                .into_iter()
                .map(|n| json!({"filename": n, "subfolder": "", "type": "output"}))
                .collect();
            let _ = send(&inner, &mut socket, json!({"type": "executed", "data": {"node": node, "display_node": node, "output": {"images": images}, "prompt_id": pid}})).await;
            json!({"type": "execution_success", "data": {"prompt_id": pid, "timestamp": now_ms()}})
        }
    };
    let _ = send(&inner, &mut socket, end).await;
    let _ = socket.send(Message::Close(None)).await;
}
