//! Random malformed requests at every route of the table against one running server: random
//! bytes, truncated or mutated JSON (wrong types in the right fields, huge numbers, deep
//! nesting), random content types, multipart with bad boundaries, random query strings, path
//! segments, methods and tokens. The server must never answer 5xx, and every 4xx must carry the
//! JSON error body `{code, message}`.
//!
//! Every case runs (the seed is fixed, so a run is reproducible); the violations are collected
//! and reported together, one example per (method, route, status), rather than stopping at the
//! first one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use comfyfleet_core::JobState;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::TestServer;
use crate::routes::{Answer, ROUTES, enable_all, valid_body, ws_upgrade};

/// Cases per route (every route of the table gets as many): each is one request (plus
/// clean-up), a few ms apiece. `COMFYFLEET_FUZZ_CASES=<n>` sets another number (for a longer
/// hunt).
const CASES_PER_ROUTE: u32 = 24;

fn cases_per_route() -> u32 {
    std::env::var("COMFYFLEET_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(CASES_PER_ROUTE)
}
const SEED: u64 = 0x00C0_FFEE_F1EE_7001;

/// One random request.
#[derive(Clone)]
struct Case {
    template: &'static str,
    method: String,
    path: String,
    query: Option<String>,
    auth: Auth,
    content_type: Option<String>,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
    ws_handshake: bool,
}

#[derive(Debug, Clone, Copy)]
enum Auth {
    Token,
    None,
    Wrong,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        let body: String = if body.len() > 300 {
            format!(
                "{}… ({} bytes)",
                &body[..body.floor_char_boundary(300)],
                self.body.len()
            )
        } else {
            body.into_owned()
        };
        write!(
            f,
            "{} {}{} [{}] auth={:?} content-type={:?} headers={:?}{} body={body:?}",
            self.method,
            self.path,
            self.query
                .as_deref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default(),
            self.template,
            self.auth,
            self.content_type,
            self.headers,
            if self.ws_handshake {
                " +ws-handshake"
            } else {
                ""
            },
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

const JOB: &str = "{job}";

fn garbage() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9._~-]{0,40}",
        // Percent-encoded random bytes (invalid UTF-8 included).
        prop::collection::vec(any::<u8>(), 0..24)
            .prop_map(|b| b.iter().map(|c| format!("%{c:02X}")).collect::<String>()),
        Just("x".repeat(600)),
        Just("%00".to_owned()),
        Just("..".to_owned()),
        Just("%2F..%2F".to_owned()),
        Just("\u{1F600}".to_owned()),
    ]
}

/// A value for `{id}`: the real job (filled in later) or backend, another id, or garbage.
fn id_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(JOB.to_owned()),
        2 => Just("gpu-0".to_owned()),
        2 => any::<u128>().prop_map(uuid_like),
        1 => Just("00000000-0000-0000-0000-000000000000".to_owned()),
        1 => Just("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF".to_owned()),
        3 => garbage(),
    ]
}

fn uuid_like(n: u128) -> String {
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn index_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_owned()),
        Just("1".to_owned()),
        Just("-1".to_owned()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_owned()),
        Just("1e3".to_owned()),
        any::<u32>().prop_map(|n| n.to_string()),
        garbage(),
    ]
}

fn query_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just("99999999999999999999999999999".to_owned()),
        Just("1.5".to_owned()),
        Just("-0".to_owned()),
        Just("true".to_owned()),
        Just("pending,running".to_owned()),
        Just("pending,,bogus".to_owned()),
        Just("k=v".to_owned()),
        Just("=".to_owned()),
        any::<u128>().prop_map(uuid_like),
        Just(String::new()),
        garbage(),
    ]
}

fn query() -> impl Strategy<Value = Option<String>> {
    let key = prop::sample::select(vec![
        "state",
        "backend",
        "label",
        "error",
        "created_after",
        "created_before",
        "before",
        "limit",
        "after",
        "force",
        "dry_run",
        "instance",
        "format",
        "zzz",
    ]);
    prop_oneof![
        3 => Just(None),
        4 => prop::collection::vec((key, query_value()), 1..4).prop_map(|kv| {
            Some(kv.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"))
        }),
        1 => garbage().prop_map(Some),
        1 => Just(Some("&&&=&=".to_owned())),
        1 => Just(Some("limit=1&limit=2".to_owned())),
    ]
}

/// Odd JSON values to put in the right fields. `"__HUGE__"` becomes a number no integer or
/// float type holds, `"__DEEP__"` becomes 5,000 levels of nesting.
fn odd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(1.0e308)),
        Just(json!(1.0e19)),
        Just(json!(0.5)),
        Just(json!("__HUGE__")),
        Just(json!("__DEEP__")),
        "[ -~]{0,20}".prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
        Just(json!([1, "a", null])),
        Just(json!({"1": {"class_type": 5, "inputs": []}})),
        Just(json!({"1": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}})),
        Just(json!([{"name": "../x", "sha256": "zz", "size": -1}])),
        Just(json!({"3": {"seed": {"deep": [1, 2]}}})),
        Just(json!("x".repeat(5000))),
    ]
}

const FIELDS: &[&str] = &[
    "workflow",
    "inputs",
    "uploads",
    "priority",
    "deadline_ms",
    "max_attempts",
    "timeouts",
    "labels",
    "constraints",
    "idempotency_key",
    "webhook",
    "ids",
    "force",
    "dry_run",
    "stuck_after_secs",
    "older_than_secs",
    "no_backup",
    "prority",
    "instance",
    "nodes",
    "models",
    "restart",
];

#[derive(Debug, Clone)]
enum Mutation {
    Set(&'static str, Value),
    Remove(&'static str),
    /// Replace the whole body.
    Whole(Value),
}

/// The fields of a route's JSON body.
fn route_fields(template: &str) -> &'static [&'static str] {
    match template {
        "/v1/jobs" => &FIELDS[..11],
        "/v1/jobs/cancel" => &["ids", "force"],
        "/v1/maintenance/reap" => &["dry_run", "stuck_after_secs"],
        "/v1/maintenance/prune" => &["older_than_secs", "no_backup"],
        "/v1/installs" => &["instance", "nodes", "models", "restart"],
        _ => FIELDS,
    }
}

/// A mutation, most often of one of the route's own fields.
fn mutation(template: &str) -> impl Strategy<Value = Mutation> + use<> {
    let field = prop_oneof![
        3 => prop::sample::select(route_fields(template).to_vec()),
        1 => prop::sample::select(FIELDS.to_vec()),
    ];
    prop_oneof![
        4 => (field.clone(), odd_value()).prop_map(|(f, v)| Mutation::Set(f, v)),
        1 => field.prop_map(Mutation::Remove),
        1 => odd_value().prop_map(Mutation::Whole),
    ]
}

fn render_json(v: &Value) -> String {
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    v.to_string()
        .replace("\"__HUGE__\"", "1e400")
        .replace("\"__DEEP__\"", &deep)
}

#[derive(Debug, Clone)]
enum BodyKind {
    None,
    /// The route's valid body (or `{}`), mutated, maybe truncated at a fraction (per mille).
    Json(Vec<Mutation>, Option<u16>),
    /// Random bytes.
    Bytes(Vec<u8>),
    /// A multipart body: parts (name, file name, content), and how the boundary is broken.
    Multipart(Vec<(String, Option<String>, Vec<u8>)>, BadBoundary),
}

#[derive(Debug, Clone, Copy)]
enum BadBoundary {
    No,
    /// The header names another boundary than the body uses.
    Mismatch,
    /// No closing delimiter.
    Unterminated,
    /// No boundary parameter at all.
    Missing,
    /// An empty boundary parameter.
    Empty,
}

fn part() -> impl Strategy<Value = (String, Option<String>, Vec<u8>)> {
    let name = prop_oneof![
        Just("spec".to_owned()),
        Just("file".to_owned()),
        "[a-z]{0,8}"
    ];
    let file_name = prop_oneof![
        Just(None),
        Just(Some("cat.png".to_owned())),
        Just(Some("../evil.png".to_owned())),
        Just(Some(".hidden".to_owned())),
        Just(Some(String::new())),
        Just(Some("a\"b.png".to_owned())),
        "[a-z]{1,8}\\.[a-z]{1,3}".prop_map(Some),
    ];
    let content = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (prop::collection::vec(mutation("/v1/jobs"), 0..3)).prop_map(|ms| {
            let mut v = json!({"workflow": comfyfleet_testkit::workflows::invert()});
            for m in &ms {
                apply(&mut v, m);
            }
            render_json(&v).into_bytes()
        }),
    ];
    (name, file_name, content)
}

fn body(template: &str) -> impl Strategy<Value = BodyKind> + use<> {
    let boundary = prop_oneof![
        3 => Just(BadBoundary::No),
        1 => Just(BadBoundary::Mismatch),
        1 => Just(BadBoundary::Unterminated),
        1 => Just(BadBoundary::Missing),
        1 => Just(BadBoundary::Empty),
    ];
    prop_oneof![
        1 => Just(BodyKind::None),
        5 => (prop::collection::vec(mutation(template), 1..4), prop::option::weighted(0.3, 0u16..1000))
            .prop_map(|(m, t)| BodyKind::Json(m, t)),
        2 => prop::collection::vec(any::<u8>(), 0..256).prop_map(BodyKind::Bytes),
        2 => (prop::collection::vec(part(), 0..4), boundary)
            .prop_map(|(p, b)| BodyKind::Multipart(p, b)),
    ]
}

fn content_type_for(kind: &BodyKind) -> BoxedStrategy<Option<String>> {
    let random = prop_oneof![
        Just(None),
        Just(Some("application/json".to_owned())),
        Just(Some("application/json; charset=utf-16".to_owned())),
        Just(Some("text/plain".to_owned())),
        Just(Some("application/octet-stream".to_owned())),
        Just(Some("multipart/form-data".to_owned())),
        Just(Some("multipart/form-data; boundary=XyZ".to_owned())),
        Just(Some("multipart/mixed; boundary=XyZ".to_owned())),
        Just(Some("application/x-www-form-urlencoded".to_owned())),
        Just(Some(";;;".to_owned())),
        "[ -~]{0,30}".prop_map(Some),
    ];
    match kind {
        // The right one most of the time, anything sometimes.
        BodyKind::Json(..) => prop_oneof![
            3 => Just(Some("application/json".to_owned())),
            1 => random,
        ]
        .boxed(),
        // The content type is built with the body.
        BodyKind::Multipart(..) => Just(None).boxed(),
        _ => random.boxed(),
    }
}

fn apply(v: &mut Value, m: &Mutation) {
    match m {
        Mutation::Set(k, val) => {
            if let Some(o) = v.as_object_mut() {
                o.insert((*k).to_owned(), val.clone());
            }
        }
        Mutation::Remove(k) => {
            if let Some(o) = v.as_object_mut() {
                o.remove(*k);
            }
        }
        Mutation::Whole(val) => *v = val.clone(),
    }
}

const BOUNDARY: &str = "fuzzBoundary7MA4YWxkTrZu0gW";

/// The bytes and content type of a body.
fn render_body(template: &str, kind: &BodyKind) -> (Vec<u8>, Option<String>) {
    match kind {
        BodyKind::None => (Vec::new(), None),
        BodyKind::Json(ms, cut) => {
            let mut v = valid_body(template).unwrap_or_else(|| json!({}));
            for m in ms {
                apply(&mut v, m);
            }
            let mut s = render_json(&v).into_bytes();
            if let Some(c) = cut {
                s.truncate(s.len() * usize::from(*c) / 1000);
            }
            (s, None)
        }
        BodyKind::Bytes(b) => (b.clone(), None),
        BodyKind::Multipart(parts, bad) => {
            let mut out = Vec::new();
            for (name, file_name, content) in parts {
                out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
                let mut disp = format!("Content-Disposition: form-data; name=\"{name}\"");
                if let Some(f) = file_name {
                    disp.push_str(&format!("; filename=\"{f}\""));
                }
                out.extend_from_slice(disp.as_bytes());
                out.extend_from_slice(b"\r\n\r\n");
                out.extend_from_slice(content);
                out.extend_from_slice(b"\r\n");
            }
            if !matches!(bad, BadBoundary::Unterminated) {
                out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
            }
            let ct = match bad {
                BadBoundary::No | BadBoundary::Unterminated => {
                    format!("multipart/form-data; boundary={BOUNDARY}")
                }
                BadBoundary::Mismatch => "multipart/form-data; boundary=other".to_owned(),
                BadBoundary::Missing => "multipart/form-data".to_owned(),
                BadBoundary::Empty => "multipart/form-data; boundary=".to_owned(),
            };
            (out, Some(ct))
        }
    }
}

/// Cases for one route: mostly almost-valid requests (the route's method, the token, the real
/// ids), each dimension broken some of the time.
fn case(route: (&'static str, &'static str)) -> impl Strategy<Value = Case> {
    let any_method = prop::sample::select(vec![
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS",
    ]);
    let auth = prop_oneof![8 => Just(Auth::Token), 1 => Just(Auth::None), 1 => Just(Auth::Wrong)];
    let headers = prop_oneof![
        4 => Just(Vec::new()),
        1 => query_value().prop_map(|v| vec![("last-event-id".to_owned(), v)]),
        1 => garbage().prop_map(|v| vec![("sec-websocket-protocol".to_owned(), format!("bearer.{v}"))]),
        // Browsers' cross-site markers (the CSRF guard answers 403 to POSTs).
        1 => prop::sample::select(vec![
            ("origin", "https://evil.example"),
            ("origin", "null"),
            ("origin", "http://127.0.0.1"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-origin"),
        ])
        .prop_map(|(k, v)| vec![(k.to_owned(), v.to_owned())]),
    ];
    let body = body(route.1);
    (
        prop::option::weighted(0.2, any_method),
        id_segment(),
        index_segment(),
        prop::option::weighted(0.1, garbage()),
        query(),
        auth,
        body,
        headers,
        prop::bool::weighted(0.4),
    )
        .prop_flat_map(
            |(other_method, id, index, extra, query, auth, kind, headers, ws)| {
                let ct = content_type_for(&kind);
                (
                    Just((
                        other_method,
                        id,
                        index,
                        extra,
                        query,
                        auth,
                        kind,
                        headers,
                        ws,
                    )),
                    ct,
                )
            },
        )
        .prop_map(
            move |((other_method, id, index, extra, query, auth, kind, headers, ws), ct)| {
                let (m, template) = route;
                let mut path = template
                    .replace("{id}", &id)
                    .replace("{name}", &id)
                    .replace("{index}", &index);
                if let Some(e) = extra {
                    path.push('/');
                    path.push_str(&e);
                }
                let (body, multipart_ct) = render_body(template, &kind);
                Case {
                    template,
                    method: other_method.unwrap_or(m).to_owned(),
                    path,
                    query,
                    auth,
                    content_type: multipart_ct.or(ct),
                    body,
                    headers,
                    ws_handshake: template.ends_with("/ws") && ws,
                }
            },
        )
}

// ---------------------------------------------------------------------------------------------
// Running

/// Sends a case: the status (0: no answer) and the violation, if any.
async fn run(t: &TestServer, job: &str, c: &Case) -> (u16, Option<String>) {
    let mut path = c.path.replace(JOB, job);
    if let Some(q) = &c.query {
        path.push('?');
        path.push_str(q);
    }
    let url = t.url(&path);
    let m: Method = c.method.parse().expect("method");
    let mut rb = t.http.request(m.clone(), &url);
    match c.auth {
        Auth::Token => rb = rb.bearer_auth(crate::harness::TOKEN),
        Auth::Wrong => rb = rb.bearer_auth("not-the-token"),
        Auth::None => {}
    }
    if c.ws_handshake {
        rb = ws_upgrade(rb);
    }
    for (k, v) in &c.headers {
        rb = rb.header(k, v);
    }
    if let Some(ct) = &c.content_type {
        rb = rb.header("content-type", ct);
    }
    if !c.body.is_empty() || c.method == "POST" {
        rb = rb.body(c.body.clone());
    }
    let r = match rb.timeout(Duration::from_secs(20)).send().await {
        Ok(r) => r,
        // A request reqwest itself refuses to build is not the server's business.
        Err(e) if e.is_builder() => return (0, None),
        Err(e) => return (0, Some(format!("request failed: {e}"))),
    };
    let status = r.status().as_u16();
    if !(400..600).contains(&status) {
        // Successes, streams and upgrades: the headers are enough.
        drop(r);
        if c.path.contains("drain") {
            enable_all(t).await;
        }
        return (status, None);
    }
    let a = Answer::read(r).await;
    if status >= 500 {
        return (status, Some(format!("server error: {:?}", a.text)));
    }
    if m == Method::HEAD {
        // No body to a HEAD; the content type still says JSON.
        if !a.content_type.starts_with("application/json") {
            return (
                status,
                Some(format!("HEAD error with content-type {:?}", a.content_type)),
            );
        }
        return (status, None);
    }
    (status, a.error_body().err())
}

/// Violations, one example per (method, route, status).
#[derive(Default)]
struct Violations {
    seen: BTreeMap<(String, &'static str, u16), (usize, String, String)>,
    statuses: BTreeMap<u16, usize>,
    cases: usize,
}

impl Violations {
    fn record(
        &mut self,
        method: &str,
        template: &'static str,
        case: &dyn fmt::Debug,
        status: u16,
        violation: Option<String>,
    ) {
        self.cases += 1;
        *self.statuses.entry(status).or_default() += 1;
        if let Some(what) = violation {
            self.seen
                .entry((method.to_owned(), template, status))
                .and_modify(|v| v.0 += 1)
                .or_insert_with(|| (1, format!("{case:?}"), what));
        }
    }

    fn finish(self, title: &str) {
        eprintln!(
            "{title}: {} requests; statuses {:?}",
            self.cases, self.statuses
        );
        if self.seen.is_empty() {
            return;
        }
        let list: Vec<String> = self
            .seen
            .iter()
            .map(|((m, route, status), (n, case, what))| {
                format!("{m} {route} → {status} ({n}×): {what}\n      e.g. {case}")
            })
            .collect();
        panic!(
            "{title}: {} kind(s) of violation in {} requests:\n  - {}",
            list.len(),
            self.cases,
            list.join("\n  - ")
        );
    }
}

/// A server with one finished job (its id) on a runtime of its own.
fn server() -> (tokio::runtime::Runtime, TestServer, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let t = rt.block_on(TestServer::start());
    let job = rt.block_on(async {
        let id = t.submit_sleep(0.01).await;
        assert_eq!(t.wait_terminal(id).await.state, JobState::Succeeded);
        id.to_string()
    });
    (rt, t, job)
}

/// After all that, the server still serves and runs jobs.
fn still_works(rt: &tokio::runtime::Runtime, t: &TestServer) {
    rt.block_on(async {
        enable_all(t).await;
        let r = t.get("/healthz").send().await.expect("healthz");
        assert_eq!(r.status(), 200);
        let id = t.submit_sleep(0.01).await;
        assert_eq!(t.wait_terminal(id).await.state, JobState::Succeeded);
    });
}

/// The properties of a JSON request body's schema (one level of nesting: `timeouts.node_ms`).
fn body_fields(doc: &Value, schema: &Value) -> Vec<Vec<String>> {
    let resolve = |v: &Value| -> Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                doc["components"]["schemas"][r.trim_start_matches("#/components/schemas/")].clone()
            }
            None => v.clone(),
        }
    };
    let mut out = Vec::new();
    let top = resolve(schema);
    for (k, v) in top["properties"].as_object().into_iter().flatten() {
        out.push(vec![k.clone()]);
        let inner = resolve(v);
        for sub in inner["properties"]
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
        {
            out.push(vec![k.clone(), sub.clone()]);
        }
    }
    out
}

fn set_path(v: &mut Value, path: &[String], val: Value) {
    let mut cur = v;
    for (i, k) in path.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        let o = cur.as_object_mut().expect("an object");
        if i + 1 == path.len() {
            o.insert(k.clone(), val);
            return;
        }
        cur = o.entry(k.clone()).or_insert_with(|| json!({}));
    }
}

/// Odd values for the sweep: every `Just` of [`odd_value`] and a few more numbers.
fn sweep_values() -> Vec<Value> {
    vec![
        Value::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(1),
        json!(i64::MIN),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(0.5),
        json!(-0.0),
        json!(1.0e19),
        json!(1.0e300),
        json!(-1.0e300),
        json!(f64::MIN_POSITIVE),
        json!("__HUGE__"),
        json!("__DEEP__"),
        json!(""),
        json!("x".repeat(5000)),
        json!("\u{0}"),
        json!([]),
        json!({}),
        json!([1, "a", null]),
        json!({"1": {"class_type": 5, "inputs": []}}),
        json!({"1": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}),
        json!([{"name": "../x", "sha256": "zz", "size": -1}]),
    ]
}

/// A sweep rather than a sample: every field of every JSON body in the document (one level of
/// nesting too) and every query parameter, each set to each odd value in turn, the rest of the
/// request valid. Never a 5xx; every 4xx is the JSON error body.
#[test]
fn every_documented_field_and_query_parameter_with_odd_values() {
    let (rt, t, job) = server();
    let doc = serde_json::to_value(comfyfleet_server::openapi()).expect("doc");
    let mut v = Violations::default();
    for (m, template) in ROUTES {
        let op = &doc["paths"][template][m.to_ascii_lowercase()];
        let path = template
            .replace(
                "{id}",
                if template.starts_with("/v1/backends") {
                    "gpu-0"
                } else {
                    &job
                },
            )
            .replace("{name}", "gpu-0")
            .replace("{index}", "0");
        // Bodies.
        if let Some(schema) = op["requestBody"]["content"]["application/json"].get("schema") {
            let base = valid_body(template).unwrap_or_else(|| json!({}));
            for field in body_fields(&doc, schema) {
                for val in sweep_values() {
                    let mut b = base.clone();
                    set_path(&mut b, &field, val);
                    let body = render_json(&b);
                    let case = format!(
                        "{m} {path} with {} = {}",
                        field.join("."),
                        &body[..body.len().min(200)]
                    );
                    let (status, violation) =
                        rt.block_on(send_sweep(&t, m, &path, Some(body), template));
                    v.record(m, template, &case, status, violation);
                }
            }
        }
        // Query parameters.
        for p in op["parameters"].as_array().into_iter().flatten() {
            if p["in"] != "query" {
                continue;
            }
            let name = p["name"].as_str().expect("name");
            for val in sweep_query_values(&job) {
                let q = format!("{path}?{name}={val}");
                let body = valid_body(template).map(|b| b.to_string());
                let case = format!("{m} {q}");
                let (status, violation) = rt.block_on(send_sweep(&t, m, &q, body, template));
                v.record(m, template, &case, status, violation);
            }
        }
    }
    still_works(&rt, &t);
    rt.block_on(t.shutdown());
    v.finish("odd values in every field");
}

fn sweep_query_values(job: &str) -> Vec<String> {
    vec![
        String::new(),
        "0".into(),
        "-1".into(),
        "1".into(),
        "1000".into(),
        "1001".into(),
        i64::MAX.to_string(),
        u64::MAX.to_string(),
        "18446744073709551616".into(),
        "1.5".into(),
        "1e3".into(),
        "true".into(),
        "pending,running,retry_wait,succeeded,failed,cancelled".into(),
        "pending,,".into(),
        "k=v".into(),
        "%00".into(),
        "%FF%FE".into(),
        "x".repeat(3000),
        job.to_owned(),
        "00000000-0000-0000-0000-000000000000".into(),
    ]
}

async fn send_sweep(
    t: &TestServer,
    m: &str,
    path: &str,
    body: Option<String>,
    template: &'static str,
) -> (u16, Option<String>) {
    let c = Case {
        template,
        method: m.to_owned(),
        path: path.to_owned(),
        query: None,
        auth: Auth::Token,
        content_type: body.as_ref().map(|_| "application/json".to_owned()),
        body: body.map(String::into_bytes).unwrap_or_default(),
        headers: Vec::new(),
        ws_handshake: template.ends_with("/ws"),
    };
    run(t, "", &c).await
}

/// Random requests at every route: never a 5xx; every 4xx has the JSON error body.
#[test]
fn random_requests_never_5xx_and_every_4xx_is_json() {
    let (rt, t, job) = server();
    let started = Instant::now();
    let mut v = Violations::default();
    let per_route = cases_per_route();
    for (i, route) in ROUTES.iter().enumerate() {
        let mut runner = TestRunner::new(Config {
            cases: per_route,
            rng_seed: RngSeed::Fixed(SEED ^ i as u64),
            failure_persistence: None,
            ..Config::default()
        });
        let v = RefCell::new(&mut v);
        let result = runner.run(&case(*route), |c| {
            let (status, violation) = rt.block_on(run(&t, &job, &c));
            v.borrow_mut()
                .record(&c.method, c.template, &c, status, violation);
            Ok(())
        });
        result.expect("the runner");
    }
    assert_eq!(v.cases, (per_route as usize) * ROUTES.len());
    still_works(&rt, &t);
    rt.block_on(t.shutdown());
    eprintln!("fuzz: seed {SEED:#x}, {:.1?}", started.elapsed());
    v.finish("random requests");
}
