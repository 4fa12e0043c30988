//! Every route over the real socket: the route table against the OpenAPI document, auth, every
//! documented error status with the `{code, message}` body, and every success path.
//!
//! Tests that check many routes collect every mismatch and fail once with the whole list (see
//! [`Checks`]), so one run shows everything that is off.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comfyfleet_core::{JobId, JobState, TaskStore};
use comfyfleet_server::{Server, ServerConfig, ServerError};
use comfyfleet_store_sqlite::SqliteStore;
use comfyfleet_testkit::workflows;
use futures::StreamExt;
use reqwest::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::multipart::{Form, Part};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};

use crate::harness::{Options, SseReader, TOKEN, TestServer};

/// Every `(method, path template)` the server serves: the documented API plus the dashboard.
pub(crate) const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/assets/app.js"),
    ("GET", "/assets/app.css"),
    ("GET", "/v1/openapi.json"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/counts"),
    ("GET", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("POST", "/v1/jobs/cancel"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/v1/jobs/{id}/outputs/{index}"),
    ("GET", "/v1/events"),
    ("GET", "/v1/jobs/{id}/events/stream"),
    ("GET", "/v1/events/ws"),
    ("GET", "/v1/jobs/{id}/events/ws"),
    ("POST", "/v1/inputs"),
    ("POST", "/v1/installs"),
    ("GET", "/v1/installs"),
    ("GET", "/v1/installs/{id}"),
    ("POST", "/v1/installs/{id}/cancel"),
    ("GET", "/v1/installs/{id}/events"),
    ("GET", "/v1/instances/{name}/packs"),
    ("GET", "/v1/backends"),
    ("GET", "/v1/backends/{id}"),
    ("POST", "/v1/backends/{id}/drain"),
    ("POST", "/v1/backends/{id}/enable"),
    ("POST", "/v1/maintenance/reap"),
    ("POST", "/v1/maintenance/backup"),
    ("POST", "/v1/maintenance/prune"),
];

/// The only routes allowed to be missing from the OpenAPI document.
pub(crate) const DASHBOARD: &[&str] = &["/", "/assets/app.js", "/assets/app.css"];

/// Routes open without a token even when one is configured.
pub(crate) const OPEN: &[&str] = &[
    "/healthz",
    "/readyz",
    "/",
    "/assets/app.js",
    "/assets/app.css",
];

/// The job routes with an `{id}` (a job id) in the path.
fn job_routes() -> impl Iterator<Item = (&'static str, &'static str)> {
    ROUTES
        .iter()
        .copied()
        .filter(|(_, p)| p.starts_with("/v1/jobs/{id}"))
}

pub(crate) fn method(m: &str) -> Method {
    m.parse().expect("an HTTP method")
}

/// The template with real values: `{id}` is `backend` under `/v1/backends`, else `job` (an
/// install id under `/v1/installs`); `{name}` (an instance) is `backend`; `{index}` is 0.
pub(crate) fn fill(template: &str, job: &str, backend: &str) -> String {
    let id = if template.starts_with("/v1/backends/") {
        backend
    } else {
        job
    };
    template
        .replace("{id}", id)
        .replace("{name}", backend)
        .replace("{index}", "0")
}

pub(crate) fn is_ws(path: &str) -> bool {
    path.ends_with("/ws")
}

/// The headers of a WebSocket handshake (so the WebSocket routes get past the upgrade
/// extractor and answer what the route itself says).
pub(crate) fn ws_upgrade(rb: RequestBuilder) -> RequestBuilder {
    rb.header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
}

/// A request with the token, with the WebSocket handshake headers on the WebSocket routes.
fn call(t: &TestServer, m: &str, path: &str) -> RequestBuilder {
    let rb = t.req(method(m), path);
    if is_ws(path) { ws_upgrade(rb) } else { rb }
}

/// An answer read whole.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub content_type: String,
    pub text: String,
    pub www_authenticate: Option<String>,
}

impl Answer {
    pub(crate) async fn read(r: Response) -> Answer {
        let status = r.status().as_u16();
        let content_type = r
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let www_authenticate = r
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = r
            .text()
            .await
            .unwrap_or_else(|e| format!("<body unreadable: {e}>"));
        Answer {
            status,
            content_type,
            text,
            www_authenticate,
        }
    }

    /// The JSON error body `{code: string, message: string, details?}`, or why it is not one.
    pub(crate) fn error_body(&self) -> Result<Value, String> {
        if !self.content_type.starts_with("application/json") {
            return Err(format!(
                "{}: content-type {:?}, not JSON; body {:?}",
                self.status, self.content_type, self.text
            ));
        }
        let v: Value = serde_json::from_str(&self.text)
            .map_err(|e| format!("{}: body is not JSON ({e}): {:?}", self.status, self.text))?;
        match (
            v.get("code").and_then(Value::as_str),
            v.get("message").and_then(Value::as_str),
        ) {
            (Some(_), Some(_)) => Ok(v),
            _ => Err(format!(
                "{}: body is not {{code: string, message: string}}: {}",
                self.status, self.text
            )),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {:?}", self.status, self.text))
    }
}

/// Collects mismatches; [`Checks::finish`] fails with all of them.
#[derive(Default)]
pub(crate) struct Checks(Vec<String>);

impl Checks {
    pub(crate) fn fail(&mut self, msg: String) {
        self.0.push(msg);
    }

    pub(crate) fn that(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.fail(msg());
        }
    }

    /// `r` must be `status` with the JSON error body and `code`. Returns the body when it is one.
    pub(crate) async fn error(
        &mut self,
        what: &str,
        r: Result<Response, reqwest::Error>,
        status: u16,
        code: &str,
    ) -> Option<Value> {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                self.fail(format!("{what}: request failed: {e}"));
                return None;
            }
        };
        let a = Answer::read(r).await;
        if a.status != status {
            self.fail(format!(
                "{what}: expected {status} {code}, got {} {:?}",
                a.status, a.text
            ));
            return None;
        }
        match a.error_body() {
            Ok(v) => {
                if v["code"] != code {
                    self.fail(format!("{what}: expected code {code:?}, got {v}"));
                }
                Some(v)
            }
            Err(e) => {
                self.fail(format!("{what}: {e}"));
                None
            }
        }
    }

    pub(crate) fn finish(self, title: &str) {
        assert!(
            self.0.is_empty(),
            "{title}: {} mismatch(es):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

async fn send(rb: RequestBuilder) -> Answer {
    Answer::read(rb.send().await.expect("request")).await
}

/// A server with a finished (succeeded) job; returns its id.
async fn with_finished_job(t: &TestServer) -> JobId {
    let id = t.submit_sleep(0.01).await;
    assert_eq!(t.wait_terminal(id).await.state, JobState::Succeeded);
    id
}

/// Re-enables both backends (after a test or a case that may have drained them).
pub(crate) async fn enable_all(t: &TestServer) {
    for b in ["gpu-0", "gpu-1"] {
        let r = t
            .post(&format!("/v1/backends/{b}/enable"))
            .send()
            .await
            .expect("enable");
        assert_eq!(r.status(), 200, "enable {b}");
    }
}

async fn wait_state(t: &TestServer, id: JobId, want: JobState) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = t.engine.get(id).await.unwrap().unwrap().state;
        if s == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} stayed {s:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn doc_json() -> Value {
    serde_json::to_value(comfyfleet_server::openapi()).expect("the document serializes")
}

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// `(METHOD, path)` of every operation in the document.
fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in item.as_object().expect("path item").keys() {
            if HTTP_METHODS.contains(&m.as_str()) {
                out.insert((m.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// The routes that take a JSON body.
pub(crate) const JSON_ROUTES: &[&str] = &[
    "/v1/jobs",
    "/v1/installs",
    "/v1/jobs/cancel",
    "/v1/maintenance/reap",
    "/v1/maintenance/backup",
    "/v1/maintenance/prune",
];

/// A small valid JSON body for a JSON route (harmless: a dry run, an empty batch, …).
pub(crate) fn valid_body(path: &str) -> Option<Value> {
    Some(match path {
        "/v1/jobs" => json!({"workflow": workflows::invert()}),
        "/v1/jobs/cancel" => json!({"ids": []}),
        // Valid; refused (422) only because the test server has no such instance.
        "/v1/installs" => {
            json!({"instance": "gpu-0", "nodes": [{"git": "https://example.com/pack.git"}]})
        }
        "/v1/maintenance/reap" => json!({"dry_run": true}),
        "/v1/maintenance/backup" => json!({}),
        "/v1/maintenance/prune" => json!({"older_than_secs": 604800}),
        _ => return None,
    })
}

/// A request the route takes as it is documented: the token, the WebSocket handshake, a
/// valid body, a file for `/v1/inputs`.
fn call_valid(t: &TestServer, m: &str, template: &str, path: &str) -> RequestBuilder {
    let rb = call(t, m, path);
    if let Some(b) = valid_body(template) {
        rb.json(&b)
    } else if template == "/v1/inputs" {
        rb.multipart(Form::new().part("f", Part::bytes(&b"x"[..]).file_name("x.txt")))
    } else {
        rb
    }
}

fn small_limits() -> Options {
    Options {
        config: ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            max_body_bytes: 1024,
            max_upload_bytes: 64 * 1024,
            ..ServerConfig::default()
        },
        ..Options::default()
    }
}

async fn sqlite_server(dir: &tempfile::TempDir) -> TestServer {
    let store = SqliteStore::open(dir.path().join("fleet.db"))
        .await
        .expect("sqlite store");
    TestServer::with(Options {
        store: Some(Arc::new(store) as Arc<dyn TaskStore>),
        ..Options::default()
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The table

/// The table is exactly the document's operations plus the dashboard, both ways.
#[test]
fn route_table_matches_the_openapi_document() {
    let doc = doc_json();
    let documented = documented_operations(&doc);
    let mut table = BTreeSet::new();
    for (m, p) in ROUTES {
        assert!(
            table.insert((m.to_string(), p.to_string())),
            "{m} {p} twice in ROUTES"
        );
    }
    let undocumented: Vec<_> = table
        .iter()
        .filter(|(_, p)| !DASHBOARD.contains(&p.as_str()))
        .filter(|op| !documented.contains(*op))
        .collect();
    let untested: Vec<_> = documented
        .iter()
        .filter(|op| !table.contains(*op))
        .collect();
    let dashboard_documented: Vec<_> = documented
        .iter()
        .filter(|(_, p)| DASHBOARD.contains(&p.as_str()))
        .collect();
    assert!(
        undocumented.is_empty() && untested.is_empty(),
        "served but missing from the OpenAPI document: {undocumented:?}; \
         in the document but not in the route table: {untested:?}"
    );
    // Not an error in itself, but then DASHBOARD is stale.
    assert!(dashboard_documented.is_empty(), "{dashboard_documented:?}");
}

/// Every route in the table is served (no 405, and no "no route" 404, with real ids and the
/// token — this server has no installer, so an install id is an unknown one), and paths next
/// to them are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_in_the_table_is_served() {
    let t = TestServer::start().await;
    let job = with_finished_job(&t).await.to_string();
    let mut c = Checks::default();
    for (m, p) in ROUTES {
        let path = fill(p, &job, "gpu-0");
        let r = call(&t, m, &path).send().await.expect("request");
        let status = r.status().as_u16();
        // Streams: the headers are enough; a 404 says whose it is.
        let unrouted = if status == 404 {
            let a = Answer::read(r).await;
            a.text.contains("no route")
        } else {
            drop(r);
            false
        };
        c.that(!unrouted && status != 405, || {
            format!("{m} {path}: {status}, as if the route did not exist")
        });
    }
    // And the table is not a catch-all.
    for path in [
        "/v1/nope".to_owned(),
        format!("/v1/jobs/{job}/nope"),
        format!("/v1/jobs/{job}/outputs/0/extra"),
        "/v1/backends/gpu-0/nope".to_owned(),
        format!("/v1/installs/{job}/nope"),
        "/v1/instances/gpu-0".to_owned(),
        "/v2/jobs".to_owned(),
        "/assets/nope.js".to_owned(),
    ] {
        c.error(
            &format!("GET {path}"),
            t.get(&path).send().await,
            404,
            "not_found",
        )
        .await;
    }
    enable_all(&t).await;
    c.finish("serving the route table");
    t.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Auth

/// With a token configured, every `/v1` route and `/metrics` answer 401 (JSON, and
/// `WWW-Authenticate: Bearer`) without the token or with a wrong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_v1_route_and_metrics_need_the_token() {
    let t = TestServer::start().await;
    let job = with_finished_job(&t).await.to_string();
    let mut c = Checks::default();
    let guarded: Vec<_> = ROUTES
        .iter()
        .filter(|(_, p)| p.starts_with("/v1/") || *p == "/metrics")
        .collect();
    assert_eq!(guarded.len(), ROUTES.len() - OPEN.len());
    let wrong: [(&str, Option<String>); 6] = [
        ("no Authorization", None),
        ("a wrong token", Some("Bearer wrong-token".to_owned())),
        (
            "a prefix of the token",
            Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        ),
        (
            "the token plus a character",
            Some(format!("Bearer {TOKEN}x")),
        ),
        ("the token without Bearer", Some(TOKEN.to_owned())),
        ("Basic auth", Some("Basic dXNlcjpwYXNz".to_owned())),
    ];
    for (m, p) in guarded {
        let path = fill(p, &job, "gpu-0");
        for (how, auth) in &wrong {
            let mut rb = t.http.request(method(m), t.url(&path));
            if is_ws(&path) {
                rb = ws_upgrade(rb);
            }
            if let Some(a) = auth {
                rb = rb.header("authorization", a);
            }
            // A body that would be fine with the token: auth must come first anyway.
            if *m == "POST" {
                rb = rb.json(&json!({}));
            }
            let what = format!("{m} {path} with {how}");
            let a = send(rb).await;
            if a.status != 401 {
                c.fail(format!(
                    "{what}: expected 401, got {} {:?}",
                    a.status, a.text
                ));
                continue;
            }
            match a.error_body() {
                Ok(v) if v["code"] == "unauthorized" => {}
                Ok(v) => c.fail(format!("{what}: code {}", v["code"])),
                Err(e) => c.fail(format!("{what}: {e}")),
            }
            c.that(a.www_authenticate.as_deref() == Some("Bearer"), || {
                format!("{what}: WWW-Authenticate {:?}", a.www_authenticate)
            });
        }
    }
    // The WebSocket routes also take the token as the `bearer.<token>` subprotocol; a wrong
    // one there is refused too.
    let r = ws_upgrade(t.http.get(t.url("/v1/events/ws")))
        .header("sec-websocket-protocol", "bearer.wrong")
        .send()
        .await;
    c.error(
        "GET /v1/events/ws with subprotocol bearer.wrong",
        r,
        401,
        "unauthorized",
    )
    .await;
    // Unknown routes: auth runs before routing, so 401 without the token, 404 with it.
    let r = t.http.get(t.url("/v1/nope")).send().await;
    c.error("GET /v1/nope without a token", r, 401, "unauthorized")
        .await;
    let r = t.get("/v1/nope").send().await;
    c.error("GET /v1/nope with the token", r, 404, "not_found")
        .await;
    c.finish("auth on /v1 and /metrics");
    t.shutdown().await;
}

/// `/healthz`, `/readyz` and the dashboard answer without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_dashboard_are_open() {
    let t = TestServer::start().await;
    let mut c = Checks::default();
    for path in OPEN {
        let a = send(t.http.get(t.url(path))).await;
        c.that(a.status == 200, || {
            format!(
                "GET {path} without a token: expected 200, got {} {:?}",
                a.status, a.text
            )
        });
    }
    c.finish("open routes");
    t.shutdown().await;
}

/// Without a token the server refuses any non-loopback address and serves on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_server_binds_loopback_only() {
    let t = TestServer::with(Options {
        token: false,
        ..Options::default()
    })
    .await;
    assert!(t.base.starts_with("http://127.0.0.1:"), "{}", t.base);
    let a = send(t.get("/v1/jobs")).await;
    assert_eq!(a.status, 200, "no token configured, no auth: {}", a.text);
    for bind in ["0.0.0.0:0", "[::]:0"] {
        let bind: std::net::SocketAddr = bind.parse().unwrap();
        let r = Server::start(
            t.engine.clone(),
            ServerConfig {
                bind,
                ..ServerConfig::default()
            },
        )
        .await;
        match r {
            Err(ServerError::InsecureBind(a)) => assert_eq!(a, bind),
            Err(e) => panic!("{bind}: expected InsecureBind, got {e}"),
            Ok(s) => {
                let url = s.url();
                s.shutdown().await;
                panic!("{bind}: started without a token at {url}");
            }
        }
    }
    // Loopback explicitly, IPv4: fine.
    let s = Server::start(
        t.engine.clone(),
        ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        },
    )
    .await
    .expect("loopback without a token starts");
    let a = send(t.http.get(format!("{}/healthz", s.url()))).await;
    assert_eq!(a.status, 200);
    s.shutdown().await;
    t.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Errors

/// 404 JSON for unknown jobs on every job route, unknown backends, unknown output indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_jobs_backends_and_outputs_are_404() {
    let t = TestServer::start().await;
    let real = with_finished_job(&t).await;
    let unknown = JobId::new().to_string();
    let mut c = Checks::default();
    let routes: Vec<_> = job_routes().collect();
    assert_eq!(routes.len(), 6, "{routes:?}");
    for (m, p) in routes {
        let path = fill(p, &unknown, "gpu-0");
        let what = format!("{m} {path} (unknown job)");
        c.error(&what, call(&t, m, &path).send().await, 404, "not_found")
            .await;
    }
    for (m, p) in ROUTES
        .iter()
        .filter(|(_, p)| p.starts_with("/v1/backends/{id}"))
    {
        for backend in ["gpu-9", "nope", "GPU-0"] {
            let path = fill(p, "", backend);
            let what = format!("{m} {path} (unknown backend)");
            c.error(&what, call(&t, m, &path).send().await, 404, "not_found")
                .await;
        }
    }
    let n = t.engine.get(real).await.unwrap().unwrap().artifacts.len();
    for index in [n, n + 1, 99, usize::MAX] {
        let path = format!("/v1/jobs/{real}/outputs/{index}");
        let what = format!("GET {path} (no such output)");
        c.error(&what, t.get(&path).send().await, 404, "not_found")
            .await;
    }
    c.finish("404s");
    t.shutdown().await;
}

/// 400 JSON for a malformed job id or output index in the path, and malformed queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_ids_and_queries_are_400() {
    let t = TestServer::start().await;
    let job = with_finished_job(&t).await.to_string();
    let mut c = Checks::default();
    for (m, p) in job_routes() {
        for bad in ["not-a-uuid", "123", "0192f0c1-zzzz-7000-8000-000000000000"] {
            let path = fill(p, bad, "gpu-0");
            let what = format!("{m} {path} (malformed job id)");
            c.error(&what, call(&t, m, &path).send().await, 400, "bad_request")
                .await;
        }
    }
    for bad in ["abc", "-1", "1.5", "99999999999999999999999999"] {
        let path = format!("/v1/jobs/{job}/outputs/{bad}");
        let what = format!("GET {path} (malformed index)");
        c.error(&what, t.get(&path).send().await, 400, "bad_request")
            .await;
    }
    let queries: Vec<(&str, String)> = vec![
        ("GET", "/v1/jobs?limit=abc".into()),
        ("GET", "/v1/jobs?limit=0".into()),
        ("GET", "/v1/jobs?limit=1001".into()),
        ("GET", "/v1/jobs?limit=-1".into()),
        ("GET", "/v1/jobs?state=bogus".into()),
        ("GET", "/v1/jobs?state=pending,bogus".into()),
        ("GET", "/v1/jobs?label=no-equals-sign".into()),
        ("GET", "/v1/jobs?before=not-an-id".into()),
        ("GET", "/v1/jobs?created_after=yesterday".into()),
        ("GET", "/v1/jobs?created_before=99999999999999999999".into()),
        ("GET", "/v1/jobs?created_after=18446744073709551615".into()),
        ("GET", "/v1/jobs?nope=1".into()),
        ("GET", format!("/v1/jobs/{job}/events?after=abc")),
        ("GET", format!("/v1/jobs/{job}/events?limit=0")),
        ("GET", format!("/v1/jobs/{job}/events?limit=5000")),
        ("GET", format!("/v1/jobs/{job}/events?nope=1")),
        ("POST", format!("/v1/jobs/{job}/cancel?force=maybe")),
        ("POST", format!("/v1/jobs/{job}/cancel?nope=1")),
        ("GET", "/v1/events?after=abc".into()),
        ("GET", "/v1/events?after=-5".into()),
        ("GET", format!("/v1/jobs/{job}/events/stream?after=abc")),
        ("GET", "/v1/events/ws?after=abc".into()),
        ("GET", format!("/v1/jobs/{job}/events/ws?after=abc")),
    ];
    for (m, path) in &queries {
        let what = format!("{m} {path}");
        c.error(&what, call(&t, m, path).send().await, 400, "bad_request")
            .await;
    }
    // A malformed Last-Event-ID header on the SSE routes.
    for path in [
        "/v1/events".to_owned(),
        format!("/v1/jobs/{job}/events/stream"),
    ] {
        let r = t.get(&path).header("last-event-id", "abc").send().await;
        c.error(
            &format!("GET {path} with Last-Event-ID: abc"),
            r,
            400,
            "bad_request",
        )
        .await;
    }
    c.finish("400s for paths and queries");
    t.shutdown().await;
}

/// 405 JSON for every method a path does not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_are_405() {
    let t = TestServer::start().await;
    let job = with_finished_job(&t).await.to_string();
    let mut c = Checks::default();
    let mut served: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (m, p) in ROUTES {
        served.entry(p).or_default().insert(m);
    }
    for (p, methods) in &served {
        let path = fill(p, &job, "gpu-0");
        for m in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if methods.contains(m) {
                continue;
            }
            let what = format!("{m} {path}");
            c.error(
                &what,
                t.req(method(m), &path).send().await,
                405,
                "method_not_allowed",
            )
            .await;
        }
    }
    c.finish("405s");
    t.shutdown().await;
}

/// A plain GET (no WebSocket handshake) on the WebSocket routes is a client error with the
/// JSON error body like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_routes_without_a_handshake_answer_json_errors() {
    let t = TestServer::start().await;
    let job = with_finished_job(&t).await;
    let mut c = Checks::default();
    for path in [
        "/v1/events/ws".to_owned(),
        format!("/v1/jobs/{job}/events/ws"),
        format!("/v1/jobs/{}/events/ws", JobId::new()),
    ] {
        let a = send(t.get(&path)).await;
        c.that((400..500).contains(&a.status), || {
            format!("GET {path} without a handshake: {} {:?}", a.status, a.text)
        });
        if let Err(e) = a.error_body() {
            c.fail(format!("GET {path} without a handshake: {e}"));
        }
    }
    c.finish("WebSocket routes without a handshake");
    t.shutdown().await;
}

/// Numbers at the edges of their types: a 4xx or a success, never a 5xx, and the engine keeps
/// running jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_numbers_never_answer_5xx() {
    let t = TestServer::start().await;
    let job = with_finished_job(&t).await;
    let mut c = Checks::default();
    // Beyond what a Duration holds: invalid.
    for secs in [json!(1.0e300), json!(u64::MAX)] {
        let what = format!("POST /v1/maintenance/reap with stuck_after_secs {secs}");
        let r = t
            .post("/v1/maintenance/reap")
            .json(&json!({"dry_run": true, "stuck_after_secs": secs}))
            .send()
            .await;
        c.error(&what, r, 422, "invalid").await;
    }
    // Huge but representable: taken.
    let a = send(
        t.post("/v1/maintenance/reap")
            .json(&json!({"dry_run": true, "stuck_after_secs": 1.0e19})),
    )
    .await;
    c.that(a.status == 200, || {
        format!("reap with stuck_after_secs 1e19: {} {}", a.status, a.text)
    });
    let a = send(
        t.post("/v1/maintenance/prune")
            .json(&json!({"older_than_secs": u64::MAX, "no_backup": true})),
    )
    .await;
    c.that(a.status == 200, || {
        format!("prune older_than_secs u64::MAX: {} {}", a.status, a.text)
    });
    let a = send(t.post("/v1/jobs").json(&json!({
        "workflow": workflows::invert(),
        "deadline_ms": u64::MAX,
        "timeouts": {"start_ms": u64::MAX, "node_ms": u64::MAX, "node_class_ms": {"SaveImage": u64::MAX}},
        "priority": i32::MIN,
        "max_attempts": 100,
    })))
    .await;
    c.that(a.status == 202, || {
        format!("submit with extreme numbers: {} {}", a.status, a.text)
    });
    if a.status == 202 {
        let id: JobId = a.json()["id"].as_str().unwrap().parse().unwrap();
        let state = t.wait_terminal(id).await.state;
        c.that(state == JobState::Succeeded, || {
            format!("the extreme job ended {state:?}")
        });
    }
    for path in [
        format!("/v1/jobs?created_after={}", i64::MAX),
        format!("/v1/jobs?created_before={}&limit=1000", i64::MAX),
        format!("/v1/jobs/{job}/events?after={}", u64::MAX),
    ] {
        let a = send(t.get(&path)).await;
        c.that(a.status == 200, || {
            format!("GET {path}: {} {}", a.status, a.text)
        });
    }
    let r = t
        .get(&format!("/v1/jobs/{job}/events/stream?after={}", u64::MAX))
        .send()
        .await;
    match r {
        // The job has ended and nothing comes after u64::MAX: 204 (an EventSource stops).
        Ok(r) => c.that(r.status() == 200 || r.status() == 204, || {
            format!("SSE after u64::MAX: {}", r.status())
        }),
        Err(e) => c.fail(format!("SSE after u64::MAX: {e}")),
    }
    let id = t.submit_sleep(0.01).await;
    assert_eq!(
        t.wait_terminal(id).await.state,
        JobState::Succeeded,
        "the engine still runs jobs"
    );
    c.finish("extreme numbers");
    t.shutdown().await;
}

/// 409 for transitions the job's state (or the store) forbids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_transitions_are_409() {
    let t = TestServer::start().await;
    let mut c = Checks::default();
    let done = with_finished_job(&t).await;
    for q in ["", "?force=true", "?force=false"] {
        let path = format!("/v1/jobs/{done}/cancel{q}");
        if let Some(v) = c
            .error(
                &format!("POST {path} (finished job)"),
                t.post(&path).send().await,
                409,
                "conflict",
            )
            .await
        {
            c.that(v["details"]["state"] == "succeeded", || {
                format!("{path}: details {v}")
            });
        }
    }
    let running = t.submit_sleep(30.0).await;
    wait_state(&t, running, JobState::Running).await;
    let path = format!("/v1/jobs/{running}/cancel");
    if let Some(v) = c
        .error(
            &format!("POST {path} (running, no force)"),
            t.post(&path).send().await,
            409,
            "conflict",
        )
        .await
    {
        c.that(v["details"]["state"] == "running", || {
            format!("{path}: details {v}")
        });
    }
    // Left alone.
    assert_eq!(
        t.engine.get(running).await.unwrap().unwrap().state,
        JobState::Running
    );
    // The harness's MemoryStore cannot be backed up: documented as 409.
    let r = t
        .post("/v1/maintenance/backup")
        .json(&json!({}))
        .send()
        .await;
    c.error(
        "POST /v1/maintenance/backup on a MemoryStore",
        r,
        409,
        "conflict",
    )
    .await;
    // Pruning backs up first: same.
    let r = t
        .post("/v1/maintenance/prune")
        .json(&json!({"older_than_secs": 604800}))
        .send()
        .await;
    c.error(
        "POST /v1/maintenance/prune on a MemoryStore",
        r,
        409,
        "conflict",
    )
    .await;
    let r = t
        .post(&format!("/v1/jobs/{running}/cancel?force=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    t.wait_terminal(running).await;
    c.finish("409s");
    t.shutdown().await;
}

/// 422 for well-formed but invalid bodies; 400 for malformed JSON; 415 for other media types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bodies_are_422_malformed_400_and_wrong_media_415() {
    let t = TestServer::start().await;
    let mut c = Checks::default();
    let wf = serde_json::to_value(workflows::invert()).unwrap();
    let invalid_submits: Vec<(&str, Value)> = vec![
        ("no workflow", json!({})),
        (
            "a node without class_type",
            json!({"workflow": {"1": {"inputs": {}}}}),
        ),
        ("an empty workflow", json!({"workflow": {}})),
        ("a workflow that is a list", json!({"workflow": [1, 2]})),
        (
            "a link to a missing node",
            json!({"workflow": {"1": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}}}}),
        ),
        ("max_attempts 0", json!({"workflow": wf, "max_attempts": 0})),
        (
            "max_attempts 101",
            json!({"workflow": wf, "max_attempts": 101}),
        ),
        (
            "max_attempts -1",
            json!({"workflow": wf, "max_attempts": -1}),
        ),
        ("deadline_ms 0", json!({"workflow": wf, "deadline_ms": 0})),
        (
            "priority a string",
            json!({"workflow": wf, "priority": "high"}),
        ),
        (
            "priority beyond i32",
            json!({"workflow": wf, "priority": 1u64 << 40}),
        ),
        (
            "labels not strings",
            json!({"workflow": wf, "labels": {"a": 1}}),
        ),
        (
            "unknown field prority",
            json!({"workflow": wf, "prority": 5}),
        ),
        (
            "an empty idempotency_key",
            json!({"workflow": wf, "idempotency_key": ""}),
        ),
        (
            "an unknown upload",
            json!({"workflow": wf, "uploads": [{"name": "cat.png", "sha256": "0".repeat(64), "size": 3}]}),
        ),
        (
            "an upload with a bad sha256",
            json!({"workflow": wf, "uploads": [{"name": "cat.png", "sha256": "xyz", "size": 3}]}),
        ),
        (
            "an upload with a path as name",
            json!({"workflow": wf, "uploads": [{"name": "../cat.png", "sha256": "0".repeat(64), "size": 3}]}),
        ),
        (
            "a webhook without webhook_secret on the server",
            json!({"workflow": wf, "webhook": "https://example.com/hook"}),
        ),
        (
            "inputs for a missing node",
            json!({"workflow": wf, "inputs": {"99": {"text": "x"}}}),
        ),
    ];
    for (what, body) in &invalid_submits {
        let r = t.post("/v1/jobs").json(body).send().await;
        c.error(&format!("POST /v1/jobs with {what}"), r, 422, "invalid")
            .await;
    }
    let invalid_others: Vec<(&str, &str, Value)> = vec![
        (
            "/v1/jobs/cancel",
            "ids not job ids",
            json!({"ids": ["nope"]}),
        ),
        ("/v1/jobs/cancel", "no ids", json!({"force": true})),
        (
            "/v1/jobs/cancel",
            "an unknown field",
            json!({"ids": [], "forse": true}),
        ),
        (
            "/v1/jobs/cancel",
            "over 1000 ids",
            json!({"ids": (0..1001).map(|_| JobId::new()).collect::<Vec<_>>()}),
        ),
        (
            "/v1/maintenance/reap",
            "stuck_after_secs 0",
            json!({"stuck_after_secs": 0}),
        ),
        (
            "/v1/maintenance/reap",
            "stuck_after_secs -5",
            json!({"stuck_after_secs": -5}),
        ),
        (
            "/v1/maintenance/reap",
            "dry_run a string",
            json!({"dry_run": "yes"}),
        ),
        (
            "/v1/maintenance/reap",
            "an unknown field",
            json!({"dryrun": true}),
        ),
        (
            "/v1/maintenance/prune",
            "older_than_secs 10",
            json!({"older_than_secs": 10}),
        ),
        ("/v1/maintenance/prune", "no older_than_secs", json!({})),
        (
            "/v1/maintenance/prune",
            "older_than_secs -1",
            json!({"older_than_secs": -1}),
        ),
        (
            "/v1/maintenance/backup",
            "an unknown field",
            json!({"to": "/etc"}),
        ),
    ];
    for (path, what, body) in &invalid_others {
        let r = t.post(path).json(body).send().await;
        c.error(&format!("POST {path} with {what}"), r, 422, "invalid")
            .await;
    }
    // Malformed JSON: 400 on every JSON route.
    for path in JSON_ROUTES {
        let valid = valid_body(path).expect("a JSON route").to_string();
        for (what, body) in [
            ("truncated JSON", "{".to_owned()),
            ("a truncated key", r#"{"wor"#.to_owned()),
            (
                "a truncated valid body",
                valid[..valid.len() - 1].to_owned(),
            ),
            ("not JSON", "hello".to_owned()),
            ("an empty body", String::new()),
            ("trailing garbage after a valid body", format!("{valid} x")),
        ] {
            let r = t
                .post(path)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            c.error(&format!("POST {path} with {what}"), r, 400, "bad_request")
                .await;
        }
        // Not JSON at all: 415.
        for ct in ["text/plain", "application/x-www-form-urlencoded"] {
            let r = t
                .post(path)
                .header("content-type", ct)
                .body(r#"{"workflow": {}}"#)
                .send()
                .await;
            c.error(
                &format!("POST {path} as {ct}"),
                r,
                415,
                "unsupported_media_type",
            )
            .await;
        }
        let r = t.post(path).body("{}").send().await;
        c.error(
            &format!("POST {path} without a content type"),
            r,
            415,
            "unsupported_media_type",
        )
        .await;
    }
    // /v1/inputs takes multipart only.
    let r = t.post("/v1/inputs").json(&json!({})).send().await;
    c.error("POST /v1/inputs as JSON", r, 415, "unsupported_media_type")
        .await;
    // Multipart that is malformed, or holds no file parts: 400; a file named like a path: 422.
    let r = t
        .post("/v1/inputs")
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body("--ABC\r\nnot a part\r\n--ABC--\r\n")
        .send()
        .await;
    c.error(
        "POST /v1/inputs with a wrong boundary",
        r,
        400,
        "bad_request",
    )
    .await;
    let r = t
        .post("/v1/inputs")
        .multipart(Form::new().text("note", "no file here"))
        .send()
        .await;
    c.error(
        "POST /v1/inputs with a non-file part",
        r,
        400,
        "bad_request",
    )
    .await;
    let r = t
        .post("/v1/inputs")
        .multipart(Form::new().part("f", Part::bytes(&b"x"[..]).file_name("../evil.png")))
        .send()
        .await;
    c.error(
        "POST /v1/inputs with file name ../evil.png",
        r,
        422,
        "invalid",
    )
    .await;
    let r = t
        .post("/v1/jobs")
        .multipart(Form::new().part("f", Part::bytes(&b"x"[..]).file_name("a.png")))
        .send()
        .await;
    c.error(
        "POST /v1/jobs multipart without spec",
        r,
        400,
        "bad_request",
    )
    .await;
    let r = t
        .post("/v1/jobs")
        .multipart(Form::new().text("spec", "{not json"))
        .send()
        .await;
    c.error(
        "POST /v1/jobs multipart with a malformed spec",
        r,
        400,
        "bad_request",
    )
    .await;
    let r = t
        .post("/v1/jobs")
        .multipart(Form::new().text(
            "spec",
            json!({"workflow": wf, "max_attempts": 0}).to_string(),
        ))
        .send()
        .await;
    c.error(
        "POST /v1/jobs multipart with an invalid spec",
        r,
        422,
        "invalid",
    )
    .await;
    // Nothing was stored by any of that.
    let counts = send(t.get("/v1/jobs/counts")).await.json();
    c.that(counts["total"] == 0, || {
        format!("invalid submits stored jobs: {counts}")
    });
    c.finish("422/400/415 for bodies");
    t.shutdown().await;
}

/// 413 for JSON bodies over `max_body_bytes` and multipart bodies over `max_upload_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limits_are_413() {
    let t = TestServer::with(small_limits()).await;
    let mut c = Checks::default();
    let wf = serde_json::to_value(workflows::invert()).unwrap();
    // Valid JSON, just too large (2 KiB against 1 KiB).
    let big_submit = json!({"workflow": wf, "labels": {"pad": "x".repeat(2048)}});
    let r = t.post("/v1/jobs").json(&big_submit).send().await;
    c.error(
        "POST /v1/jobs with 2 KiB of JSON",
        r,
        413,
        "payload_too_large",
    )
    .await;
    let big_cancel = json!({"ids": (0..60).map(|_| JobId::new()).collect::<Vec<_>>()});
    assert!(big_cancel.to_string().len() > 2048);
    let r = t.post("/v1/jobs/cancel").json(&big_cancel).send().await;
    c.error(
        "POST /v1/jobs/cancel with 2 KiB of JSON",
        r,
        413,
        "payload_too_large",
    )
    .await;
    // Whitespace-padded, otherwise valid bodies.
    for (path, body) in [
        ("/v1/maintenance/reap", r#"{"dry_run": true}"#),
        ("/v1/maintenance/backup", "{}"),
        ("/v1/maintenance/prune", r#"{"older_than_secs": 604800}"#),
    ] {
        let padded = format!("{}{body}", " ".repeat(2048));
        let r = t
            .post(path)
            .header("content-type", "application/json")
            .body(padded)
            .send()
            .await;
        c.error(
            &format!("POST {path} with 2 KiB of JSON"),
            r,
            413,
            "payload_too_large",
        )
        .await;
    }
    // Multipart over max_upload_bytes (64 KiB).
    let big = vec![7u8; 100 * 1024];
    let r = t
        .post("/v1/inputs")
        .multipart(Form::new().part("f", Part::bytes(big.clone()).file_name("big.bin")))
        .send()
        .await;
    c.error("POST /v1/inputs with 100 KiB", r, 413, "payload_too_large")
        .await;
    let spec = json!({"workflow": wf}).to_string();
    let r = t
        .post("/v1/jobs")
        .multipart(
            Form::new()
                .text("spec", spec.clone())
                .part("f", Part::bytes(big).file_name("big.bin")),
        )
        .send()
        .await;
    c.error(
        "POST /v1/jobs multipart with 100 KiB",
        r,
        413,
        "payload_too_large",
    )
    .await;
    // The spec part of a multipart submit is JSON: max_body_bytes.
    let big_spec = json!({"workflow": wf, "labels": {"pad": "x".repeat(2048)}}).to_string();
    let r = t
        .post("/v1/jobs")
        .multipart(Form::new().text("spec", big_spec))
        .send()
        .await;
    c.error(
        "POST /v1/jobs multipart with a 2 KiB spec",
        r,
        413,
        "payload_too_large",
    )
    .await;
    // Under the limits, the same routes work.
    let r = t
        .post("/v1/jobs")
        .json(&json!({"workflow": wf}))
        .send()
        .await
        .unwrap();
    c.that(r.status() == 202, || {
        format!("a small submit: {}", r.status())
    });
    let r = t
        .post("/v1/inputs")
        .multipart(Form::new().part("f", Part::bytes(vec![1u8; 1000]).file_name("small.bin")))
        .send()
        .await
        .unwrap();
    c.that(r.status() == 200, || {
        format!("a small upload: {}", r.status())
    });
    c.finish("413s");
    t.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Success paths

fn ids_of(page: &Value) -> Vec<String> {
    page["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_owned())
        .collect()
}

/// List with filters and pagination, and counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_pagination_and_counts() {
    let t = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({
            "workflow": workflows::sleep(0.01),
            "labels": {"batch": if i % 2 == 0 { "even" } else { "odd" }, "n": i.to_string()},
        });
        let r = t.post("/v1/jobs").json(&body).send().await.unwrap();
        assert_eq!(r.status(), 202);
        assert!(
            r.headers()["location"]
                .to_str()
                .unwrap()
                .starts_with("/v1/jobs/"),
            "{:?}",
            r.headers()
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["created"], true);
        assert_eq!(v["state"], "pending");
        ids.push(v["id"].as_str().unwrap().parse::<JobId>().unwrap());
        // Distinct creation milliseconds, for the created_after/before filters.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for id in &ids {
        assert_eq!(t.wait_terminal(*id).await.state, JobState::Succeeded);
    }
    // One that stays pending: both backends drained.
    for b in ["gpu-0", "gpu-1"] {
        assert_eq!(
            t.post(&format!("/v1/backends/{b}/drain"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let pending = t.submit_sleep(0.01).await;
    let newest_first: Vec<String> = std::iter::once(pending)
        .chain(ids.iter().rev().copied())
        .map(|i| i.to_string())
        .collect();

    let page = send(t.get("/v1/jobs")).await.json();
    assert_eq!(ids_of(&page), newest_first, "newest first: {page}");
    assert!(page["next"].is_null(), "{page}");

    // Pages of 2, following `next`.
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &next {
            None => "/v1/jobs?limit=2".to_owned(),
            Some(n) => format!("/v1/jobs?limit=2&before={n}"),
        };
        let page = send(t.get(&path)).await.json();
        let got = ids_of(&page);
        assert!(got.len() <= 2, "{path}: {page}");
        seen.extend(got);
        pages += 1;
        assert!(pages < 10, "pagination does not end");
        match page["next"].as_str() {
            Some(n) => next = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, newest_first, "pages of 2 cover all, once, in order");

    // Filters.
    let page = send(t.get("/v1/jobs?label=batch=even")).await.json();
    let want: Vec<String> = [ids[4], ids[2], ids[0]]
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(ids_of(&page), want, "label=batch=even: {page}");
    let page = send(t.get("/v1/jobs?label=batch%3Dodd")).await.json();
    assert_eq!(ids_of(&page).len(), 2, "label=batch%3Dodd: {page}");
    let page = send(t.get("/v1/jobs?label=batch=none")).await.json();
    assert!(ids_of(&page).is_empty(), "{page}");
    let page = send(t.get("/v1/jobs?state=pending")).await.json();
    assert_eq!(ids_of(&page), [pending.to_string()], "{page}");
    let page = send(t.get("/v1/jobs?state=succeeded,failed")).await.json();
    assert_eq!(ids_of(&page).len(), 5, "{page}");
    let page = send(t.get("/v1/jobs?state=pending,succeeded&limit=3"))
        .await
        .json();
    assert_eq!(ids_of(&page), newest_first[..3], "{page}");
    let page = send(t.get("/v1/jobs?state=failed,cancelled")).await.json();
    assert!(ids_of(&page).is_empty(), "{page}");
    let page = send(t.get("/v1/jobs?state=succeeded&label=batch=odd&limit=1"))
        .await
        .json();
    assert_eq!(ids_of(&page), [ids[3].to_string()], "{page}");
    assert_eq!(page["next"], ids[3].to_string(), "{page}");
    let third = t.engine.get(ids[2]).await.unwrap().unwrap();
    let after = third.created_at.as_millis();
    let page = send(t.get(&format!("/v1/jobs?created_after={after}&state=succeeded")))
        .await
        .json();
    let want: Vec<String> = ids[2..].iter().rev().map(|i| i.to_string()).collect();
    assert_eq!(ids_of(&page), want, "created_after={after}: {page}");
    let page = send(t.get(&format!("/v1/jobs?created_before={after}")))
        .await
        .json();
    let want: Vec<String> = ids[..2].iter().rev().map(|i| i.to_string()).collect();
    assert_eq!(ids_of(&page), want, "created_before={after}: {page}");
    let backend = third
        .attempts
        .last()
        .map(|a| a.backend.as_str().to_owned())
        .expect("the attempt's backend");
    let page = send(t.get(&format!("/v1/jobs?backend={backend}")))
        .await
        .json();
    assert!(
        ids_of(&page).contains(&ids[2].to_string()),
        "backend={backend}: {page}"
    );
    for j in page["jobs"].as_array().unwrap() {
        assert_eq!(j["backend"], backend.as_str(), "{page}");
    }

    // Counts.
    let counts = send(t.get("/v1/jobs/counts")).await.json();
    assert_eq!(counts["total"], 6, "{counts}");
    assert_eq!(counts["counts"]["succeeded"], 5, "{counts}");
    assert_eq!(counts["counts"]["pending"], 1, "{counts}");
    for s in JobState::ALL {
        assert!(
            counts["counts"].get(s.as_str()).is_some(),
            "every state listed: {counts}"
        );
    }
    enable_all(&t).await;
    t.wait_terminal(pending).await;
    t.shutdown().await;
}

/// Get a job, its events (with `after` and `limit`), its outputs, and its live streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_events_outputs_and_live_streams() {
    let t = TestServer::start().await;
    let id = with_finished_job(&t).await;

    let job = send(t.get(&format!("/v1/jobs/{id}"))).await;
    assert_eq!(job.status, 200);
    assert!(
        job.content_type.starts_with("application/json"),
        "{}",
        job.content_type
    );
    let job = job.json();
    assert_eq!(job["id"], id.to_string());
    assert_eq!(job["state"], "succeeded");

    let events = send(t.get(&format!("/v1/jobs/{id}/events"))).await.json();
    let events = events.as_array().expect("a list").clone();
    assert!(events.len() >= 4, "{events:?}");
    assert_eq!(events[0]["type"], "submitted");
    assert_eq!(events.last().unwrap()["type"], "succeeded");
    let ids: Vec<u64> = events.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    let second = ids[1];
    let after = send(t.get(&format!("/v1/jobs/{id}/events?after={second}")))
        .await
        .json();
    let after_ids: Vec<u64> = after
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(after_ids, ids[2..]);
    let limited = send(t.get(&format!("/v1/jobs/{id}/events?after={second}&limit=1")))
        .await
        .json();
    assert_eq!(limited.as_array().unwrap().len(), 1);
    assert_eq!(limited[0]["id"], ids[2]);
    let none = send(t.get(&format!(
        "/v1/jobs/{id}/events?after={}",
        ids.last().unwrap()
    )))
    .await;
    assert_eq!(none.status, 200);
    assert_eq!(none.json(), json!([]));

    // Outputs: every artifact downloads with its content type.
    let artifacts = job["artifacts"].as_array().unwrap();
    assert!(!artifacts.is_empty(), "{job}");
    for (i, a) in artifacts.iter().enumerate() {
        let r = t
            .get(&format!("/v1/jobs/{id}/outputs/{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let ct = r.headers()[CONTENT_TYPE].to_str().unwrap().to_owned();
        let want = a["content_type"].as_str().unwrap_or("image/png");
        assert_eq!(ct, want, "artifact {i}: {a}");
        let bytes = r.bytes().await.unwrap();
        // (The fake backend's PNG signature is UTF-8 encoded, see jobs.rs.)
        assert!(
            bytes.starts_with(b"\x89PNG") || bytes.starts_with(b"\xc2\x89PNG"),
            "artifact {i} is the fake backend's PNG: {:?}",
            &bytes[..bytes.len().min(8)]
        );
        if let Some(size) = a["size"].as_u64() {
            assert_eq!(bytes.len() as u64, size);
        }
    }

    // SSE: the job's stream replays and ends after the terminal event.
    let r = t
        .get(&format!("/v1/jobs/{id}/events/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut sse = SseReader::new(r);
    let mut got = Vec::new();
    while let Some(m) = sse.next().await {
        assert_eq!(m.event, "job");
        got.push(m.id.unwrap());
    }
    assert_eq!(got, ids);
    let r = t
        .get(&format!("/v1/jobs/{id}/events/stream?after={second}"))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(r);
    let mut got = Vec::new();
    while let Some(m) = sse.next().await {
        got.push(m.id.unwrap());
    }
    assert_eq!(got, ids[2..]);
    // The global stream: first event after `after`.
    let r = t
        .get(&format!("/v1/events?after={second}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut sse = SseReader::new(r);
    let first = loop {
        let m = sse.next().await.expect("an event");
        if m.event == "job" {
            break m;
        }
    };
    assert_eq!(first.id, Some(ids[2]));
    drop(sse);

    // WebSocket: the job's stream, with the token as a header, then closed after the end.
    let ws_base = t.base.replacen("http://", "ws://", 1);
    let got = ws_job_events(&format!("{ws_base}/v1/jobs/{id}/events/ws"), None).await;
    assert_eq!(got, ids);
    // With the token as the `bearer.<token>` subprotocol, resuming after the second event.
    let got = ws_job_events(
        &format!("{ws_base}/v1/jobs/{id}/events/ws?after={second}"),
        Some(&format!("comfyfleet, bearer.{TOKEN}")),
    )
    .await;
    assert_eq!(got, ids[2..]);
    // The global WebSocket: upgrades and sends the first event after `after`.
    let (mut ws, resp) = ws_connect(&format!("{ws_base}/v1/events/ws?after={second}"), None).await;
    assert_eq!(resp, 101);
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = ws.next().await.expect("a message").expect("ws");
            if let tokio_tungstenite::tungstenite::Message::Text(s) = m {
                let v: Value = serde_json::from_str(&s).unwrap();
                if v["stream"] == "job" {
                    return v;
                }
            }
        }
    })
    .await
    .expect("a job event within 10 s");
    assert_eq!(first["event"]["id"], ids[2]);
    drop(ws);
    t.shutdown().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(url: &str, subprotocol: Option<&str>) -> (Ws, u16) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    match subprotocol {
        Some(p) => {
            req.headers_mut()
                .insert("sec-websocket-protocol", p.parse().unwrap());
        }
        None => {
            req.headers_mut()
                .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        }
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    if subprotocol.is_some() {
        assert_eq!(
            resp.headers()["sec-websocket-protocol"],
            "comfyfleet",
            "the server selects `comfyfleet`, never echoing the token"
        );
    }
    (ws, resp.status().as_u16())
}

/// The event ids a job's WebSocket sends until the server closes it (code 1000).
async fn ws_job_events(url: &str, subprotocol: Option<&str>) -> Vec<u64> {
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, status) = ws_connect(url, subprotocol).await;
    assert_eq!(status, 101);
    let mut ids = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = ws.next().await {
            match m.expect("ws") {
                Message::Text(s) => {
                    let v: Value = serde_json::from_str(&s).unwrap();
                    if v["stream"] == "job" {
                        ids.push(v["event"]["id"].as_u64().unwrap());
                    }
                }
                Message::Close(f) => {
                    assert_eq!(f.map(|f| u16::from(f.code)), Some(1000));
                    break;
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the job's WebSocket closes after the terminal event");
    ids
}

/// Upload inputs, submit a job referencing them; submit multipart with a spec and a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_upload_and_multipart_submit() {
    let t = TestServer::start().await;
    let png = b"\x89PNG\r\n\x1a\nnot really a png".to_vec();
    let r = t
        .post("/v1/inputs")
        .multipart(
            Form::new()
                .part(
                    "a",
                    Part::bytes(png.clone())
                        .file_name("cat.png")
                        .mime_str("image/png")
                        .unwrap(),
                )
                .part("b", Part::bytes(&b"hello"[..]).file_name("note.txt")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let uploads: Value = r.json().await.unwrap();
    let uploads = uploads.as_array().expect("a list").clone();
    assert_eq!(uploads.len(), 2, "{uploads:?}");
    assert_eq!(uploads[0]["name"], "cat.png");
    assert_eq!(uploads[0]["size"], png.len());
    let sha = uploads[0]["sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    assert_eq!(uploads[1]["name"], "note.txt");
    assert_eq!(uploads[1]["size"], 5);

    // Referencing the upload: accepted and stored with it.
    let wf = serde_json::to_value(workflows::invert()).unwrap();
    let r = t
        .post("/v1/jobs")
        .json(&json!({"workflow": wf, "uploads": [uploads[0]]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    let id: JobId = v["id"].as_str().unwrap().parse().unwrap();
    let job = send(t.get(&format!("/v1/jobs/{id}"))).await.json();
    assert_eq!(job["spec"]["uploads"][0]["sha256"], sha, "{job}");

    // Multipart submit: the spec part plus a file part, which becomes an upload.
    let r = t
        .post("/v1/jobs")
        .multipart(
            Form::new()
                .text(
                    "spec",
                    json!({"workflow": wf, "labels": {"via": "multipart"}}).to_string(),
                )
                .part("file", Part::bytes(&b"dog bytes"[..]).file_name("dog.png")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["created"], true);
    let id2: JobId = v["id"].as_str().unwrap().parse().unwrap();
    let job = send(t.get(&format!("/v1/jobs/{id2}"))).await.json();
    assert_eq!(job["spec"]["labels"]["via"], "multipart", "{job}");
    let ups = job["spec"]["uploads"].as_array().unwrap();
    assert_eq!(ups.len(), 1, "{job}");
    assert_eq!(ups[0]["name"], "dog.png");
    assert_eq!(ups[0]["size"], 9);
    // The stored file is the one sent: uploading the same bytes again gives the same sha.
    let r = t
        .post("/v1/inputs")
        .multipart(Form::new().part("x", Part::bytes(&b"dog bytes"[..]).file_name("dog.png")))
        .send()
        .await
        .unwrap();
    let again: Value = r.json().await.unwrap();
    assert_eq!(again[0]["sha256"], ups[0]["sha256"]);

    // The fake backends take no uploads; end both jobs so shutdown is quick.
    for id in [id, id2] {
        let _ = t
            .post(&format!("/v1/jobs/{id}/cancel?force=true"))
            .send()
            .await;
        t.wait_terminal(id).await;
    }
    t.shutdown().await;
}

/// Backends: list, get, drain (state `draining`, no new work), enable; cancel of a pending job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_drain_enable_and_cancel_of_a_pending_job() {
    let t = TestServer::start().await;
    let list = send(t.get("/v1/backends")).await.json();
    let names: BTreeSet<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["gpu-0", "gpu-1"]), "{list}");
    for b in list.as_array().unwrap() {
        assert_eq!(b["availability"]["state"], "active", "{b}");
        assert_eq!(b["kind"], "fake");
        assert!(b["capacity"].as_u64().unwrap() >= 1, "{b}");
    }
    let one = send(t.get("/v1/backends/gpu-1")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], "gpu-1");

    for b in ["gpu-0", "gpu-1"] {
        let v = send(t.post(&format!("/v1/backends/{b}/drain"))).await;
        assert_eq!(v.status, 200, "{}", v.text);
        let v = v.json();
        assert_eq!(v["id"], b);
        assert_eq!(v["availability"]["state"], "draining", "{v}");
        // Draining twice is fine.
        let v = send(t.post(&format!("/v1/backends/{b}/drain"))).await;
        assert_eq!(v.status, 200, "{}", v.text);
    }
    let v = send(t.get("/v1/backends/gpu-0")).await.json();
    assert_eq!(v["availability"]["state"], "draining", "{v}");

    // Nothing takes work: the job stays pending; a plain cancel cancels it.
    let id = t.submit_sleep(0.01).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        t.engine.get(id).await.unwrap().unwrap().state,
        JobState::Pending
    );
    let v = send(t.post(&format!("/v1/jobs/{id}/cancel"))).await;
    assert_eq!(v.status, 200, "{}", v.text);
    let v = v.json();
    assert_eq!(v["id"], id.to_string());
    assert_eq!(v["outcome"], "cancelled");
    assert_eq!(t.wait_terminal(id).await.state, JobState::Cancelled);
    // Batch cancel answers one result per id.
    let p2 = t.submit_sleep(0.01).await;
    let v = send(
        t.post("/v1/jobs/cancel")
            .json(&json!({"ids": [p2, id, JobId::new()]})),
    )
    .await;
    assert_eq!(v.status, 200, "{}", v.text);
    let results: Vec<Value> = v.json()["results"].as_array().unwrap().clone();
    let kinds: Vec<&str> = results
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["cancelled", "already_terminal", "not_found"]);

    for b in ["gpu-0", "gpu-1"] {
        let v = send(t.post(&format!("/v1/backends/{b}/enable"))).await;
        assert_eq!(v.status, 200, "{}", v.text);
        assert_eq!(v.json()["availability"]["state"], "active");
    }
    // Work flows again.
    let id = t.submit_sleep(0.01).await;
    assert_eq!(t.wait_terminal(id).await.state, JobState::Succeeded);
    t.shutdown().await;
}

/// Reap (dry run and real), backup and prune on a SQLite store: the backup files exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_reap_backup_and_prune_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let t = sqlite_server(&dir).await;
    let id = with_finished_job(&t).await;

    let v = send(
        t.post("/v1/maintenance/reap")
            .json(&json!({"dry_run": true})),
    )
    .await;
    assert_eq!(v.status, 200, "{}", v.text);
    let v = v.json();
    assert_eq!(v["dry_run"], true, "{v}");
    assert!(v["items"].is_array(), "{v}");
    // The default is a dry run too.
    let v = send(t.post("/v1/maintenance/reap").json(&json!({}))).await;
    assert_eq!(v.status, 200, "{}", v.text);
    assert_eq!(v.json()["dry_run"], true);
    let v = send(
        t.post("/v1/maintenance/reap")
            .json(&json!({"dry_run": false, "stuck_after_secs": 3600})),
    )
    .await;
    assert_eq!(v.status, 200, "{}", v.text);
    let v = v.json();
    assert_eq!(v["dry_run"], false, "{v}");
    assert_eq!(v["items"], json!([]), "nothing to reap: {v}");

    let v = send(t.post("/v1/maintenance/backup").json(&json!({}))).await;
    assert_eq!(v.status, 200, "{}", v.text);
    let path = v.json()["path"].as_str().expect("path").to_owned();
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("backup {path}: {e}"));
    assert!(meta.len() > 0, "{path} is empty");
    // The backup is a SQLite database holding the job.
    let copy = SqliteStore::open(&path).await.expect("the backup opens");
    assert!(
        copy.get(id).await.unwrap().is_some(),
        "the backup has the job"
    );

    let v = send(
        t.post("/v1/maintenance/prune")
            .json(&json!({"older_than_secs": 604800})),
    )
    .await;
    assert_eq!(v.status, 200, "{}", v.text);
    let v = v.json();
    assert_eq!(v["pruned"], 0, "{v}");
    let backup = v["backup"].as_str().expect("a backup was taken first");
    assert!(std::path::Path::new(backup).exists(), "{backup}");
    assert_ne!(backup, path);
    let v = send(
        t.post("/v1/maintenance/prune")
            .json(&json!({"older_than_secs": 60, "no_backup": true})),
    )
    .await;
    assert_eq!(v.status, 200, "{}", v.text);
    assert!(v.json()["backup"].is_null());
    // The job is recent: still there.
    assert_eq!(send(t.get(&format!("/v1/jobs/{id}"))).await.status, 200);
    t.shutdown().await;
}

/// Reap on the default (MemoryStore) server: a dry run works; what a real run answers must be
/// a documented status of the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_reap_on_a_memory_store() {
    let t = TestServer::start().await;
    with_finished_job(&t).await;
    let v = send(
        t.post("/v1/maintenance/reap")
            .json(&json!({"dry_run": true})),
    )
    .await;
    assert_eq!(v.status, 200, "{}", v.text);
    assert_eq!(v.json()["dry_run"], true);
    let v = send(
        t.post("/v1/maintenance/reap")
            .json(&json!({"dry_run": false})),
    )
    .await;
    let documented = documented_statuses(&doc_json(), "POST", "/v1/maintenance/reap");
    assert!(
        documented.contains(&v.status.to_string()),
        "POST /v1/maintenance/reap {{dry_run:false}} on a MemoryStore with a backup_dir answers \
         {} {}, which the document does not list ({documented:?})",
        v.status,
        v.text
    );
    assert_eq!(v.status, 200, "a real reap: {}", v.text);
    t.shutdown().await;
}

/// `/healthz`, `/readyz`, `/metrics` and `/v1/openapi.json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_the_openapi_document() {
    let t = TestServer::start().await;
    let h = send(t.get("/healthz")).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json(), json!({"status": "ok"}));
    let r = send(t.get("/readyz")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = r.json();
    assert_eq!(r["status"], "ready");
    assert_eq!(r["backends_total"], 2);

    with_finished_job(&t).await;
    // Counters come from the event tail: poll until they show.
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let m = send(t.get("/metrics")).await;
        assert_eq!(m.status, 200);
        assert!(
            m.content_type.starts_with("text/plain"),
            "{}",
            m.content_type
        );
        if m.text.contains("comfyfleet_attempts_total") || Instant::now() > deadline {
            break m.text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        text.contains("comfyfleet_jobs{state=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(text.contains("comfyfleet_attempts_total"), "{text}");
    assert!(
        text.contains("comfyfleet_backend_healthy{backend=\"gpu-0\"} 1"),
        "{text}"
    );

    let d = send(t.get("/v1/openapi.json")).await;
    assert_eq!(d.status, 200);
    assert!(
        d.content_type.starts_with("application/json"),
        "{}",
        d.content_type
    );
    let v = d.json();
    assert!(
        v["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        v["openapi"]
    );
    assert_eq!(
        v,
        doc_json(),
        "the served document is comfyfleet_server::openapi()"
    );
    t.shutdown().await;
}

fn documented_statuses(doc: &Value, m: &str, template: &str) -> BTreeSet<String> {
    doc["paths"][template][m.to_ascii_lowercase()]["responses"]
        .as_object()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default()
}

/// Every status the routes answer to ordinary mistakes is listed in the route's responses
/// (405 excepted: it is the answer of no operation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_answered_is_documented() {
    let t = TestServer::start().await;
    let job = with_finished_job(&t).await.to_string();
    let doc = doc_json();
    let mut c = Checks::default();
    let unknown = JobId::new().to_string();
    for (m, p) in ROUTES.iter().filter(|(_, p)| !DASHBOARD.contains(p)) {
        let documented = documented_statuses(&doc, m, p);
        let mut tries: Vec<(String, RequestBuilder)> = Vec::new();
        let real = fill(p, &job, "gpu-0");
        tries.push(("a valid request".into(), call_valid(&t, m, p, &real)));
        if p.contains("{id}") {
            let id = if p.starts_with("/v1/backends") {
                "nope"
            } else {
                unknown.as_str()
            };
            let path = fill(p, id, id);
            tries.push(("an unknown id".into(), call(&t, m, &path)));
            let path = fill(p, "not-a-uuid", "not-a-uuid");
            tries.push(("a malformed id".into(), call(&t, m, &path)));
        }
        if p.contains("{index}") {
            let path = fill(p, &job, "").replace("/outputs/0", "/outputs/abc");
            tries.push(("a malformed index".into(), call(&t, m, &path)));
        }
        tries.push((
            "an unknown query parameter".into(),
            call_valid(&t, m, p, &format!("{real}?zzz=1")),
        ));
        if *m == "POST" {
            tries.push(("no body".into(), call(&t, m, &real)));
            tries.push((
                "a malformed JSON body".into(),
                call(&t, m, &real)
                    .header("content-type", "application/json")
                    .body("{"),
            ));
            tries.push((
                "a text/plain body".into(),
                call(&t, m, &real)
                    .header("content-type", "text/plain")
                    .body("{}"),
            ));
            tries.push((
                "a JSON body of the wrong shape".into(),
                call(&t, m, &real).json(&json!({"zzz": [1, 2]})),
            ));
        }
        tries.push(("no token".into(), {
            let rb = t.http.request(method(m), t.url(&real));
            if is_ws(p) { ws_upgrade(rb) } else { rb }
        }));
        for (how, rb) in tries {
            let r = rb.send().await.expect("request");
            let status = r.status().as_u16();
            drop(r);
            if status != 405 && !documented.contains(&status.to_string()) {
                c.fail(format!(
                    "{m} {p} with {how}: answered {status}, documented {documented:?}"
                ));
            }
        }
        enable_all(&t).await;
    }
    c.finish("statuses answered but not in the OpenAPI document");
    t.shutdown().await;
}
