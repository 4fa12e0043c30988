//! aiohttp-like routing (with the `/api` alias), middlewares (the 503 of a restart, Origin/Host
//! 403, CORS, fault knobs) and every REST handler, plus ComfyUI-Manager's `/manager/reboot`.

use std::sync::Arc;

use axum::Router;
use futures::StreamExt;

use crate::multipart::parse_multipart;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

use super::catalogue::node_info;
use super::json::{self, J, Obj, jobj};
use super::py;
use super::queue::{QueueItem, heap_push, heapify};
use super::server::{self, Inner};
use super::validate::{Rejected, validate_prompt};
use super::ws;

#[derive(Clone)]
pub(crate) struct AppState {
    inner: Arc<Inner>,
    generation: CancellationToken,
}

pub(crate) fn router(inner: Arc<Inner>, generation: CancellationToken) -> Router {
    Router::new()
        .fallback(dispatch)
        .with_state(AppState { inner, generation })
}

// ---- responses ---------------------------------------------------------------------------------

fn json_response(status: StatusCode, body: &J) -> Response {
    let mut r = Response::new(Body::from(body.to_json()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn ok_json(body: &J) -> Response {
    json_response(StatusCode::OK, body)
}

/// `web.Response(status=N)`: empty body, `application/octet-stream`.
fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// aiohttp's answer to an unhandled exception in a handler.
fn server_error() -> Response {
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "500 Internal Server Error\n\nServer got itself in trouble".to_owned(),
    )
}

fn status_text(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if code == StatusCode::INTERNAL_SERVER_ERROR {
        return server_error();
    }
    text(
        code,
        format!(
            "{}: {}",
            code.as_u16(),
            code.canonical_reason().unwrap_or("Error")
        ),
    )
}

fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "404: Not Found".to_owned())
}

// ---- routing ----------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Root,
    Ws,
    Embeddings,
    Models,
    ModelsFolder,
    Extensions,
    UploadImage,
    UploadMask,
    View,
    ViewMetadata,
    SystemStats,
    Features,
    Prompt,
    ObjectInfo,
    ObjectInfoClass,
    History,
    HistoryId,
    Queue,
    Interrupt,
    Free,
    ManagerReboot,
}

fn match_route(path: &str) -> Option<(Route, &'static [Method], Option<String>)> {
    const G: &[Method] = &[Method::GET];
    const P: &[Method] = &[Method::POST];
    const GP: &[Method] = &[Method::GET, Method::POST];
    let fixed = match path {
        "/" => Some((Route::Root, G)),
        "/ws" => Some((Route::Ws, G)),
        "/embeddings" => Some((Route::Embeddings, G)),
        "/models" => Some((Route::Models, G)),
        "/extensions" => Some((Route::Extensions, G)),
        "/upload/image" => Some((Route::UploadImage, P)),
        "/upload/mask" => Some((Route::UploadMask, P)),
        "/view" => Some((Route::View, G)),
        "/system_stats" => Some((Route::SystemStats, G)),
        "/features" => Some((Route::Features, G)),
        "/prompt" => Some((Route::Prompt, GP)),
        "/object_info" => Some((Route::ObjectInfo, G)),
        "/history" => Some((Route::History, GP)),
        "/queue" => Some((Route::Queue, GP)),
        "/interrupt" => Some((Route::Interrupt, P)),
        "/free" => Some((Route::Free, P)),
        "/manager/reboot" => Some((Route::ManagerReboot, G)),
        _ => None,
    };
    if let Some((r, m)) = fixed {
        return Some((r, m, None));
    }
    let (head, param) = path.strip_prefix('/')?.split_once('/')?;
    if param.is_empty() || param.contains('/') {
        return None;
    }
    let r = match head {
        "models" => Route::ModelsFolder,
        "view_metadata" => Route::ViewMetadata,
        "object_info" => Route::ObjectInfoClass,
        "history" => Route::HistoryId,
        _ => return None,
    };
    Some((r, G, Some(pct_decode(param))))
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

// ---- middlewares ------------------------------------------------------------------------------

fn split_host_port(netloc: &str) -> (Option<String>, Option<u16>) {
    let hostport = netloc.rsplit_once('@').map_or(netloc, |(_, h)| h);
    if let Some(rest) = hostport.strip_prefix('[') {
        let (h, after) = rest.split_once(']').unwrap_or((rest, ""));
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (Some(h.to_ascii_lowercase()), port);
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => (Some(h.to_ascii_lowercase()), p.parse().ok()),
        None if hostport.is_empty() => (None, None),
        None => (Some(hostport.to_ascii_lowercase()), None),
    }
}

fn is_loopback(host: Option<&str>) -> bool {
    match host {
        None => false,
        Some(h) => match h.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.is_loopback(),
            Err(_) => h == "localhost" || h.ends_with(".localhost"),
        },
    }
}

/// `create_origin_only_middleware`: 403 when Host is loopback and Origin's host differs.
fn origin_rejected(headers: &HeaderMap) -> bool {
    let (Some(host), Some(origin)) = (headers.get(header::HOST), headers.get(header::ORIGIN))
    else {
        return false;
    };
    let host = String::from_utf8_lossy(host.as_bytes()).to_ascii_lowercase();
    let origin = String::from_utf8_lossy(origin.as_bytes()).to_string();
    let origin_netloc = origin
        .split_once("//")
        .map_or("", |(_, r)| r.split('/').next().unwrap_or(""));
    let mut origin_domain = Some(origin_netloc.to_ascii_lowercase());
    let (host_name, host_port) = split_host_port(&host);
    let (origin_name, origin_port) = split_host_port(origin_netloc);
    let loopback = is_loopback(host_name.as_deref());
    let mut host_domain = Some(host.clone());
    if origin_port.is_none() {
        host_domain = host_name;
    }
    if host_port.is_none() {
        origin_domain = origin_name;
    }
    match (host_domain, origin_domain) {
        (Some(h), Some(o)) if loopback && !h.is_empty() && !o.is_empty() => h != o,
        _ => false,
    }
}

fn add_cors(inner: &Inner, mut r: Response) -> Response {
    if let Some(origin) = &inner.config.cors_origin {
        let h = r.headers_mut();
        if let Ok(v) = HeaderValue::from_str(origin) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST, GET, DELETE, PUT, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Content-Type, Authorization"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    r
}

async fn dispatch(State(app): State<AppState>, req: Request) -> Response {
    let inner = app.inner.clone();
    inner.stat(|s| s.http_requests += 1);
    let path = req.uri().path().to_owned();
    let route_path = match path.strip_prefix("/api") {
        Some(rest) if rest.starts_with('/') => rest.to_owned(),
        _ => path.clone(),
    };
    let matched = match_route(&route_path);
    let is_ws = matches!(matched, Some((Route::Ws, _, _)));
    if inner.is_starting() {
        // Restarting: the new process is still loading (a real one would not listen yet).
        return status_text(503);
    }
    if !is_ws && let Some(status) = inner.faults.http_error_for(&path) {
        inner.stat(|s| s.faults_fired += 1);
        return status_text(status);
    }
    if inner.config.cors_origin.is_none() && origin_rejected(req.headers()) {
        return empty(StatusCode::FORBIDDEN);
    }
    if req.method() == Method::OPTIONS {
        return add_cors(&inner, empty(StatusCode::OK));
    }
    let resp = match matched {
        None => not_found(),
        Some((route, methods, param)) => {
            let m = if req.method() == Method::HEAD {
                Method::GET
            } else {
                req.method().clone()
            };
            if !methods.contains(&m) {
                let allow = methods
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(",");
                let mut r = text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "405: Method Not Allowed".to_owned(),
                );
                if let Ok(v) = HeaderValue::from_str(&allow) {
                    r.headers_mut().insert(header::ALLOW, v);
                }
                r
            } else {
                handle(&app, route, m, param, req).await
            }
        }
    };
    if is_ws {
        return resp;
    }
    let resp = maybe_malform(&inner, resp).await;
    let delay = inner.faults.get().http_delay;
    if !delay.is_zero() {
        inner.stat(|s| s.faults_fired += 1);
        tokio::time::sleep(delay).await;
    }
    add_cors(&inner, resp)
}

async fn maybe_malform(inner: &Inner, resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_json || resp.status().as_u16() > 400 || !inner.fire(|f| &mut f.malformed_json) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let s = String::from_utf8_lossy(&bytes).into_owned();
    let mut cut = s.len() / 2;
    while cut > 0 && !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let broken = if cut < 1 {
        "{".to_owned()
    } else {
        s[..cut].to_owned()
    };
    let mut parts = parts;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(broken))
}

async fn read_body(inner: &Inner, req: Request) -> Result<(HeaderMap, Bytes), Response> {
    let max = usize::try_from(inner.config.max_upload_size).unwrap_or(usize::MAX);
    let too_large = |actual: usize| {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Maximum request body size {max} exceeded, actual body size {actual}"),
        )
    };
    let headers = req.headers().clone();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared
        && n >= max
    {
        return Err(too_large(n));
    }
    match axum::body::to_bytes(req.into_body(), max.saturating_sub(1)).await {
        Ok(b) => Ok((headers, b)),
        Err(_) => Err(too_large(max)),
    }
}

async fn read_json(inner: &Inner, req: Request) -> Result<J, Response> {
    let (_, body) = read_body(inner, req).await?;
    json::parse(&body).map_err(|_| server_error())
}

async fn handle(
    app: &AppState,
    route: Route,
    method: Method,
    param: Option<String>,
    req: Request,
) -> Response {
    let inner = &app.inner;
    let post = method == Method::POST;
    match route {
        Route::Root => {
            let mut r = Response::new(Body::from(
                "<!DOCTYPE html><html><head><title>ComfyUI</title></head><body>comfyfleet ComfyUI 0.3.64 simulator</body></html>",
            ));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-store, must-revalidate"),
            );
            r
        }
        Route::Ws => websocket(app, req).await,
        Route::Embeddings => {
            let names: Vec<J> = model_files(inner, "embeddings")
                .iter()
                .map(|n| J::from(py::splitext(n).0))
                .collect();
            ok_json(&J::Arr(names))
        }
        Route::Models => ok_json(&J::from(model_folders(inner))),
        Route::ModelsFolder => {
            let folder = param.unwrap_or_default();
            if !model_folders(inner).contains(&folder) {
                return empty(StatusCode::NOT_FOUND);
            }
            ok_json(&J::from(model_files(inner, &folder)))
        }
        Route::Extensions => ok_json(&J::Arr(Vec::new())),
        Route::UploadImage | Route::UploadMask => upload(inner, req).await,
        Route::View => view(inner, &Query::parse(req.uri().query())),
        Route::ViewMetadata => empty(StatusCode::NOT_FOUND),
        Route::SystemStats => ok_json(&system_stats(inner)),
        Route::Features => ok_json(&inner.features()),
        Route::Prompt if post => post_prompt(inner, req).await,
        Route::Prompt => {
            let st = inner.state();
            ok_json(&Inner::queue_info(&st))
        }
        Route::ObjectInfo => {
            let files = input_files(inner);
            let mut out = Obj::new();
            for def in inner.catalogue().all() {
                out.insert(def.name.clone(), node_info(def, &files));
            }
            ok_json(&J::Obj(out))
        }
        Route::ObjectInfoClass => {
            let files = input_files(inner);
            let mut out = Obj::new();
            if let Some(def) = param.as_deref().and_then(|c| inner.catalogue().get(c)) {
                out.insert(def.name.clone(), node_info(&def, &files));
            }
            ok_json(&J::Obj(out))
        }
        Route::History if post => post_history(inner, req).await,
        Route::History => get_history(inner, &Query::parse(req.uri().query())),
        Route::HistoryId => {
            let id = param.unwrap_or_default();
            let st = inner.state();
            let mut out = Obj::new();
            if let Some(e) = st.history.get(&id) {
                out.insert(id, e.clone());
            }
            ok_json(&J::Obj(out))
        }
        Route::Queue if post => post_queue(inner, req).await,
        Route::Queue => {
            let st = inner.state();
            ok_json(&jobj! {
                "queue_running" => st.running.iter().map(QueueItem::to_j).collect::<Vec<_>>(),
                "queue_pending" => st.queue.iter().map(QueueItem::to_j).collect::<Vec<_>>(),
            })
        }
        Route::Interrupt => post_interrupt(inner, req).await,
        Route::Free => post_free(inner, req).await,
        Route::ManagerReboot => manager_reboot(inner).await,
    }
}

// ---- handlers ---------------------------------------------------------------------------------

/// ComfyUI-Manager's `GET /manager/reboot`: 200, then a restart once the answer is out (with
/// `reboot_without_response`: no answer, the connection drops, like the real `os.execv`).
async fn manager_reboot(inner: &Arc<Inner>) -> Response {
    // Every later request sees the restart at once, even before the old process is gone.
    inner
        .starting
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let silent = inner.faults.get().reboot_without_response;
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
    let task_inner = inner.clone();
    tokio::spawn(async move {
        if !silent {
            // The body is dropped once written; give hyper a moment to flush it.
            let _ = sent_rx.await;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        server::restart(&task_inner, std::time::Duration::ZERO).await;
    });
    if silent {
        // The restart kills this connection (and this future with it).
        return std::future::pending::<Response>().await;
    }
    let body = futures::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::new())]).map(
        move |chunk| {
            // Dropped with the body: tells the restart task the answer is out.
            let _sent = &sent_tx;
            chunk
        },
    );
    let mut r = Response::new(Body::from_stream(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn websocket(app: &AppState, req: Request) -> Response {
    let (mut parts, _) = req.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(rej) => return rej.into_response(),
    };
    let sid = Query::parse(parts.uri.query())
        .get("clientId")
        .unwrap_or("")
        .to_owned();
    let inner = app.inner.clone();
    let generation = app.generation.clone();
    upgrade
        .max_message_size(256 << 20)
        .on_upgrade(move |socket| ws::handle(inner, generation, socket, sid))
}

async fn post_prompt(inner: &Arc<Inner>, req: Request) -> Response {
    let data = match read_json(inner, req).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    inner.stat(|s| s.prompts_received += 1);
    let J::Obj(data) = data else {
        return server_error();
    };
    let number = match data.get("number") {
        Some(n) => match py::py_float(n) {
            Ok(f) => f,
            Err(_) => return server_error(),
        },
        None => {
            let mut st = inner.state();
            let mut n = st.number;
            if data.get("front").is_some_and(py::truthy) {
                n = -n;
            }
            st.number += 1;
            J::from(n)
        }
    };
    let Some(prompt) = data.get("prompt") else {
        inner.stat(|s| s.prompts_rejected += 1);
        let error = jobj! {"type" => "no_prompt", "message" => "No prompt provided", "details" => "No prompt provided", "extra_info" => jobj!{}};
        return json_response(
            StatusCode::BAD_REQUEST,
            &jobj! {"error" => error, "node_errors" => jobj!{}},
        );
    };
    let J::Obj(mut prompt) = prompt.clone() else {
        return server_error();
    };
    let prompt_id = match data.get("prompt_id") {
        Some(v) => py::py_str(v),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let validated = {
        let cat = inner.catalogue();
        let files = inner.files();
        validate_prompt(
            &cat,
            &files,
            &mut prompt,
            data.get("partial_execution_targets"),
        )
    };
    let mut extra_data = data.get("extra_data").cloned().unwrap_or_else(J::obj);
    if let Some(c) = data.get("client_id") {
        match &mut extra_data {
            J::Obj(o) => o.insert("client_id", c.clone()),
            _ => return server_error(),
        }
    }
    match validated {
        Ok((outputs, node_errors)) => {
            {
                let mut st = inner.state();
                st.seq += 1;
                let item = QueueItem {
                    number: number.clone(),
                    prompt_id: prompt_id.clone(),
                    prompt,
                    extra_data,
                    outputs,
                    seq: st.seq,
                };
                heap_push(&mut st.queue, item);
                inner.queue_updated(&st);
            }
            inner.wake.notify_one();
            inner.stat(|s| s.prompts_accepted += 1);
            ok_json(
                &jobj! {"prompt_id" => prompt_id, "number" => number, "node_errors" => node_errors},
            )
        }
        Err(Rejected::Invalid { error, node_errors }) => {
            inner.stat(|s| s.prompts_rejected += 1);
            json_response(
                StatusCode::BAD_REQUEST,
                &jobj! {"error" => error, "node_errors" => node_errors},
            )
        }
        Err(Rejected::Crash) => server_error(),
    }
}

fn ids_of(v: &J) -> Option<Vec<J>> {
    match v {
        J::Arr(a) => Some(a.clone()),
        J::Obj(o) => Some(o.keys().map(J::from).collect()),
        J::Str(s) => Some(s.chars().map(|c| J::from(c.to_string())).collect()),
        _ => None,
    }
}

async fn post_queue(inner: &Inner, req: Request) -> Response {
    let data = match read_json(inner, req).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let J::Obj(data) = data else {
        return server_error();
    };
    let mut st = inner.state();
    if data.get("clear").is_some_and(py::truthy) {
        st.queue.clear();
        inner.queue_updated(&st);
    }
    if let Some(d) = data.get("delete") {
        let Some(ids) = ids_of(d) else {
            return server_error();
        };
        for id in ids {
            let Some(x) = st
                .queue
                .iter()
                .position(|item| py::py_eq(&J::from(item.prompt_id.as_str()), &id))
            else {
                continue;
            };
            if st.queue.len() == 1 {
                st.queue.clear();
                inner.queue_updated(&st);
            } else {
                st.queue.remove(x);
                heapify(&mut st.queue);
            }
            inner.queue_updated(&st);
            inner.stat(|s| s.prompts_deleted += 1);
        }
    }
    empty(StatusCode::OK)
}

async fn post_history(inner: &Inner, req: Request) -> Response {
    let data = match read_json(inner, req).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let J::Obj(data) = data else {
        return server_error();
    };
    let mut st = inner.state();
    if data.get("clear").is_some_and(py::truthy) {
        st.history.clear();
    }
    if let Some(d) = data.get("delete") {
        let Some(ids) = ids_of(d) else {
            return server_error();
        };
        for id in ids {
            if let J::Str(id) = id {
                st.history.remove(&id);
            }
        }
    }
    empty(StatusCode::OK)
}

fn get_history(inner: &Inner, q: &Query) -> Response {
    let parse = |k: &str| -> Result<Option<i64>, ()> {
        match q.get(k) {
            None => Ok(None),
            Some(v) => py::py_int(&J::from(v)).map_err(|_| ()).map(|j| j.as_i64()),
        }
    };
    let (Ok(max_items), Ok(offset)) = (parse("max_items"), parse("offset")) else {
        return server_error();
    };
    let st = inner.state();
    let mut offset = offset.unwrap_or(-1);
    if offset < 0
        && let Some(m) = max_items
    {
        offset = st.history.len() as i64 - m;
    }
    let mut out = Obj::new();
    for (i, (k, v)) in st.history.iter().enumerate() {
        if i as i64 >= offset {
            out.insert(k.clone(), v.clone());
            if max_items.is_some_and(|m| out.len() as i64 >= m) {
                break;
            }
        }
    }
    ok_json(&J::Obj(out))
}

async fn post_interrupt(inner: &Inner, req: Request) -> Response {
    let (_, body) = match read_body(inner, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let data = json::parse(&body).unwrap_or_else(|_| J::obj());
    let J::Obj(data) = data else {
        return server_error();
    };
    let prompt_id = data.get("prompt_id").filter(|p| py::truthy(p));
    let ignore_id = inner.faults.get().interrupt_ignores_prompt_id;
    match prompt_id {
        Some(pid) if !ignore_id => {
            let running = inner
                .state()
                .running
                .as_ref()
                .is_some_and(|item| py::py_eq(&J::from(item.prompt_id.as_str()), pid));
            if running {
                inner
                    .interrupt
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                inner.stat(|s| s.interrupts_by_id += 1);
            } else {
                inner.stat(|s| s.interrupts_ignored += 1);
            }
        }
        _ => {
            if prompt_id.is_some() {
                inner.stat(|s| s.faults_fired += 1);
            }
            inner
                .interrupt
                .store(true, std::sync::atomic::Ordering::SeqCst);
            inner.stat(|s| s.interrupts_global += 1);
        }
    }
    empty(StatusCode::OK)
}

async fn post_free(inner: &Inner, req: Request) -> Response {
    let data = match read_json(inner, req).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let J::Obj(data) = data else {
        return server_error();
    };
    {
        let mut st = inner.state();
        if data.get("unload_models").is_some_and(py::truthy) {
            st.unload_models = true;
        }
        if data.get("free_memory").is_some_and(py::truthy) {
            st.free_memory = true;
        }
    }
    inner.wake.notify_one();
    empty(StatusCode::OK)
}

fn input_files(inner: &Inner) -> Vec<String> {
    let f = inner.files();
    f.files_in(&f.input_dir())
}

const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "latent_upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
];

fn model_folders(inner: &Inner) -> Vec<String> {
    let mut v: Vec<String> = MODEL_FOLDERS.iter().map(|s| (*s).to_owned()).collect();
    for k in inner.config.models.keys() {
        if !v.contains(k) {
            v.push(k.clone());
        }
    }
    v
}

fn model_files(inner: &Inner, folder: &str) -> Vec<String> {
    let mut v = inner.config.models.get(folder).cloned().unwrap_or_default();
    v.sort();
    v.dedup();
    v
}

fn system_stats(inner: &Inner) -> J {
    let port = inner.addr.lock().map(|a| a.port()).unwrap_or(0);
    let ram_total: u64 = 25_199_304_704;
    let ram_free: u64 = 23_600_000_000;
    jobj! {
        "system" => jobj!{
            "os" => "posix",
            "ram_total" => ram_total,
            "ram_free" => ram_free,
            "comfyui_version" => "0.3.64",
            "required_frontend_version" => "1.27.10",
            "installed_templates_version" => "0.1.95",
            "required_templates_version" => "0.1.95",
            "python_version" => "3.11.7 (main, Dec  8 2023, 18:56:58) [GCC 12.2.0]",
            "pytorch_version" => "2.8.0+cpu",
            "embedded_python" => false,
            "argv" => vec![J::from("main.py"), J::from("--cpu"), J::from("--port"), J::from(port.to_string())],
        },
        "devices" => vec![jobj!{
            "name" => "cpu",
            "type" => "cpu",
            "index" => J::Null,
            "vram_total" => ram_total,
            "vram_free" => ram_free,
            "torch_vram_total" => ram_total,
            "torch_vram_free" => ram_free,
        }],
    }
}

fn guess_type(name: &str) -> &'static str {
    let ext = py::splitext(name).1.to_ascii_lowercase();
    match ext.as_str() {
        ".png" => "image/png",
        ".jpg" | ".jpeg" => "image/jpeg",
        ".webp" => "image/webp",
        ".gif" => "image/gif",
        ".json" => "application/json",
        ".txt" => "text/plain",
        ".mp4" => "video/mp4",
        ".webm" => "video/webm",
        ".wav" => "audio/x-wav",
        ".mp3" => "audio/mpeg",
        ".flac" => "audio/flac",
        _ => "application/octet-stream",
    }
}

/// `GET /view` (no `preview=`/`channel=` re-encoding: the stored file is served as is).
fn view(inner: &Inner, q: &Query) -> Response {
    let Some(filename) = q.get("filename") else {
        return empty(StatusCode::NOT_FOUND);
    };
    let files = inner.files();
    let (filename, dir) = files.annotated(filename);
    if filename.is_empty() {
        return empty(StatusCode::BAD_REQUEST);
    }
    if filename.starts_with('/') || filename.contains("..") {
        return empty(StatusCode::BAD_REQUEST);
    }
    let dir = match dir {
        Some(d) => Some(d),
        None => files.dir_by_type(q.get("type").unwrap_or("output")),
    };
    let Some(mut output_dir) = dir else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if let Some(sub) = q.get("subfolder") {
        let full = py::join(&output_dir, sub);
        if py::commonpath(&py::abspath(&full, files.base()), &output_dir) != output_dir {
            return empty(StatusCode::FORBIDDEN);
        }
        output_dir = full;
    }
    let name = py::basename(&filename).to_owned();
    let path = py::join(&output_dir, &name);
    let Some(bytes) = files.read(&path) else {
        return empty(StatusCode::NOT_FOUND);
    };
    let mut r = Response::new(Body::from(bytes));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(guess_type(&name)),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("filename=\"{name}\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

/// `POST /upload/image` (and `/upload/mask`, saved as a plain upload).
async fn upload(inner: &Inner, req: Request) -> Response {
    let (headers, body) = match read_body(inner, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(parts) = parse_multipart(ct, &body) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let field = |n: &str| {
        parts
            .iter()
            .find(|p| p.name == n && p.filename.is_none())
            .map(|p| String::from_utf8_lossy(&p.data).into_owned())
    };
    let Some(image) = parts.iter().find(|p| p.name == "image") else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let Some(mut filename) = image.filename.clone().filter(|f| !f.is_empty()) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let upload_type = field("type").unwrap_or_else(|| "input".to_owned());
    let mut files = inner.files();
    let Some(upload_dir) = files.dir_by_type(&upload_type) else {
        return server_error();
    };
    let subfolder = field("subfolder").unwrap_or_default();
    let full = py::join(&upload_dir, &py::normpath(&subfolder));
    let mut filepath = py::abspath(&py::join(&full, &filename), files.base());
    if py::commonpath(&upload_dir, &filepath) != upload_dir {
        return empty(StatusCode::BAD_REQUEST);
    }
    let overwrite = field("overwrite").is_some_and(|o| o == "true" || o == "1");
    let (stem, ext) = py::splitext(&filename);
    let mut duplicate = false;
    if !overwrite {
        let mut i = 1;
        while files.exists(&filepath) {
            if files.read(&filepath).is_some_and(|b| b == image.data) {
                duplicate = true;
                break;
            }
            filename = format!("{stem} ({i}){ext}");
            filepath = py::join(&full, &filename);
            i += 1;
        }
    }
    if !duplicate {
        files.write(&filepath, image.data.clone());
    }
    ok_json(&jobj! {"name" => filename, "subfolder" => subfolder, "type" => upload_type})
}
