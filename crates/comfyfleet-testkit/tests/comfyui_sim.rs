//! `ComfyUiSim` over real loopback HTTP/WebSocket.
//!
//! * `fidelity_with_recorded_traces`: one row per recorded trace (testdata/comfyui-traces, a real
//!   ComfyUI 0.3.64). Each row drives the simulator with the requests the trace shows, records
//!   what it answers and sends, normalises ids/timestamps/numbers/file counters and runs of
//!   progress ticks, and compares with the trace; a mismatch prints a line diff.
//! * focused tests: routing and error statuses, the queue heap, delete, interrupts, broadcast
//!   leakage, `/view` PNGs, uploads, restart, validation, caching, and every fault knob.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use comfyfleet_testkit::comfyui_sim::{
    ComfyUiSim, FaultConfig, HangMidNode, HttpErrors, SimConfig, Trigger,
};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

// ---- helpers ----------------------------------------------------------------------------------

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().unwrap()
}

fn cid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Raw text of a workflow file (key order preserved, as a Python client would send it).
fn workflow(name: &str) -> String {
    std::fs::read_to_string(testdata().join("workflows").join(name)).unwrap()
}

fn body(prompt_raw: &str, client_id: Option<&str>) -> String {
    match client_id {
        Some(c) => format!("{{\"prompt\": {prompt_raw}, \"client_id\": \"{c}\"}}"),
        None => format!("{{\"prompt\": {prompt_raw}}}"),
    }
}

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    bytes: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.bytes)))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
    fn content_type(&self) -> String {
        self.headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

async fn send(rb: reqwest::RequestBuilder) -> Resp {
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap().to_vec();
    Resp {
        status,
        headers,
        bytes,
    }
}

async fn get(c: &reqwest::Client, url: String) -> Resp {
    send(c.get(url)).await
}

async fn post(c: &reqwest::Client, url: String, raw: impl Into<String>) -> Resp {
    send(
        c.post(url)
            .header("content-type", "application/json")
            .body(raw.into()),
    )
    .await
}

async fn submit(
    c: &reqwest::Client,
    sim: &ComfyUiSim,
    prompt_raw: &str,
    client_id: Option<&str>,
) -> String {
    let r = post(
        c,
        format!("{}/prompt", sim.base_url()),
        body(prompt_raw, client_id),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["prompt_id"].as_str().unwrap().to_owned()
}

async fn history(c: &reqwest::Client, sim: &ComfyUiSim, pid: &str) -> Value {
    get(c, format!("{}/history/{pid}", sim.base_url()))
        .await
        .json()
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client that logs every JSON message it reads.
struct Ws {
    s: WsStream,
    log: Vec<Value>,
}

enum Next {
    Msg(Value),
    Timeout,
    Closed,
}

impl Ws {
    async fn connect(sim: &ComfyUiSim, client_id: &str) -> Ws {
        let (s, _) = tokio_tungstenite::connect_async(sim.ws_url(client_id))
            .await
            .unwrap();
        Ws { s, log: Vec::new() }
    }

    async fn next_within(&mut self, d: Duration) -> Next {
        loop {
            match tokio::time::timeout(d, self.s.next()).await {
                Err(_) => return Next::Timeout,
                Ok(None) | Ok(Some(Err(_))) => return Next::Closed,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    self.log.push(v.clone());
                    return Next::Msg(v);
                }
                Ok(Some(Ok(Message::Close(_)))) => return Next::Closed,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    async fn next(&mut self) -> Value {
        match self.next_within(Duration::from_secs(10)).await {
            Next::Msg(v) => v,
            Next::Timeout => panic!("no WebSocket message within 10 s; log: {:#?}", self.log),
            Next::Closed => panic!("WebSocket closed; log: {:#?}", self.log),
        }
    }

    /// Read until `pred` matches; returns the messages read (inclusive).
    async fn until(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let m = self.next().await;
            out.push(m.clone());
            if pred(&m) {
                return out;
            }
        }
    }

    async fn until_done(&mut self, pid: &str) -> Vec<Value> {
        self.until(|m| is_done(m, pid)).await
    }

    /// Everything that arrives within `d`.
    async fn quiet(&mut self, d: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return out;
            }
            match self.next_within(left).await {
                Next::Msg(m) => out.push(m),
                Next::Timeout | Next::Closed => return out,
            }
        }
    }
}

fn is_done(m: &Value, pid: &str) -> bool {
    m["type"] == "executing" && m["data"]["node"].is_null() && m["data"]["prompt_id"] == pid
}

fn types(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["type"].as_str().unwrap().to_owned())
        .collect()
}

// ---- normalisation and diff -------------------------------------------------------------------

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// `prefix_NNNNN_.png` → (prefix, counter).
fn split_counter(s: &str) -> Option<(&str, &str)> {
    let stem = s.strip_suffix("_.png")?;
    let (prefix, digits) = stem.rsplit_once('_')?;
    (digits.len() == 5 && digits.chars().all(|c| c.is_ascii_digit())).then_some((prefix, digits))
}

/// Placeholders numbered by first appearance, shared by a row's HTTP and WS records.
#[derive(Default)]
struct Norm {
    ids: HashMap<String, String>,
    numbers: HashMap<String, String>,
    files: HashMap<String, String>,
}

impl Norm {
    fn id(&mut self, s: &str) -> String {
        let n = self.ids.len();
        let kind = if is_uuid(s) { "uuid" } else { "cid" };
        self.ids
            .entry(s.to_owned())
            .or_insert_with(|| format!("<{kind}:{n}>"))
            .clone()
    }
    fn number(&mut self, v: &Value) -> Value {
        let n = self.numbers.len();
        let t = if v.is_f64() { "f" } else { "i" };
        json!(
            self.numbers
                .entry(v.to_string())
                .or_insert_with(|| format!("<num:{n}:{t}>"))
                .clone()
        )
    }
    fn string(&mut self, s: &str) -> Value {
        if is_uuid(s) || is_hex32(s) {
            return json!(self.id(s));
        }
        if let Some((prefix, _)) = split_counter(s) {
            let n = self.files.len();
            let tag = self
                .files
                .entry(s.to_owned())
                .or_insert_with(|| format!("{n}"))
                .clone();
            return json!(format!("{prefix}_<counter:{tag}>_.png"));
        }
        json!(s)
    }
    fn value(&mut self, v: &Value) -> Value {
        match v {
            Value::String(s) => self.string(s),
            Value::Array(a) => {
                let is_item =
                    a.len() == 5 && a[0].is_number() && a[1].as_str().is_some_and(is_uuid);
                a.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        if is_item && i == 0 {
                            self.number(x)
                        } else {
                            self.value(x)
                        }
                    })
                    .collect()
            }
            Value::Object(o) => {
                let mut out = serde_json::Map::new();
                for (k, x) in o {
                    let key = if is_uuid(k) { self.id(k) } else { k.clone() };
                    let val = match (k.as_str(), x) {
                        ("timestamp", Value::Number(_)) => json!("<ts>"),
                        ("number", Value::Number(_)) => self.number(x),
                        _ => self.value(x),
                    };
                    out.insert(key, val);
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }
    /// A WS message: progress values depend on timing; keep only their JSON type.
    fn ws(&mut self, m: &Value) -> Value {
        let mut m = m.clone();
        let tag = |v: &Value| json!(if v.is_f64() { "<float>" } else { "<int>" });
        if m["type"] == "progress" {
            m["data"]["value"] = tag(&m["data"]["value"]);
        }
        if m["type"] == "progress_state"
            && let Some(nodes) = m["data"]["nodes"].as_object_mut()
        {
            for n in nodes.values_mut() {
                if n["state"] == "running" && n["max"] != json!(1.0) {
                    n["value"] = tag(&n["value"]);
                }
            }
        }
        self.value(&m)
    }
}

/// Compact JSON with sorted keys (independent of serde_json's `preserve_order`).
fn canon(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            let inner: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", json!(k), canon(&o[k.as_str()])))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(canon).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// Collapse runs of repeated progress ticks (blocks of 1 or 2 identical tick lines).
fn collapse(lines: Vec<String>) -> Vec<String> {
    let is_tick = |l: &String| {
        l.contains("\"type\":\"progress\"") || l.contains("\"type\":\"progress_state\"")
    };
    let mut v = lines;
    loop {
        let before = v.len();
        for len in [2usize, 1] {
            let mut i = 0;
            while i + 2 * len <= v.len() {
                let a = &v[i..i + len];
                let b = &v[i + len..i + 2 * len];
                if a == b && a.iter().all(is_tick) {
                    v.drain(i + len..i + 2 * len);
                } else {
                    i += 1;
                }
            }
        }
        if v.len() == before {
            return v;
        }
    }
}

/// Line diff (LCS): `  same`, `- expected only`, `+ got only`.
fn diff(expected: &[String], got: &[String]) -> String {
    let (n, m) = (expected.len(), got.len());
    let mut dp = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            dp[i][j] = if expected[i] == got[j] {
                dp[i + 1][j + 1] + 1
            } else {
                dp[i + 1][j].max(dp[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    let short = |s: &str| {
        if s.len() > 400 {
            format!("{}…", &s[..400])
        } else {
            s.to_owned()
        }
    };
    while i < n || j < m {
        if i < n && j < m && expected[i] == got[j] {
            out += &format!("    {}\n", short(&expected[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || dp[i + 1][j] >= dp[i][j + 1]) {
            out += &format!("  - {}\n", expected[i]);
            i += 1;
        } else {
            out += &format!("  + {}\n", got[j]);
            j += 1;
        }
    }
    out
}

/// What a row observed: WS messages of our client and HTTP exchanges
/// (`{method, path, status, response?, content_type?, head_hex?}`).
#[derive(Default)]
struct Rec {
    ws: Vec<Value>,
    http: Vec<Value>,
}

impl Rec {
    fn http(&mut self, method: &str, path: &str, r: &Resp) {
        let mut e = json!({"method": method, "path": path, "status": r.status});
        if !r.bytes.is_empty() {
            e["response"] = r.json();
        }
        self.http.push(e);
    }
    fn lines(&self) -> (Vec<String>, Vec<String>) {
        let mut n = Norm::default();
        let http = self.http.iter().map(|h| canon(&n.value(h))).collect();
        let ws = self.ws.iter().map(|m| canon(&n.ws(m))).collect();
        (collapse(ws), http)
    }
}

/// Raw text of the `n`-th `POST /prompt` request's `prompt` in a trace (key order preserved).
fn trace_prompt(name: &str, n: usize) -> String {
    let text = std::fs::read_to_string(
        testdata()
            .join("comfyui-traces")
            .join(format!("{name}.jsonl")),
    )
    .unwrap();
    let line = text
        .lines()
        .filter(|l| l.contains("\"method\": \"POST\", \"path\": \"/prompt\""))
        .nth(n)
        .unwrap();
    let after = &line[line.find("\"request\": ").unwrap()..];
    let start = after.find("\"prompt\": ").unwrap() + "\"prompt\": ".len();
    let bytes = after.as_bytes();
    let (mut depth, mut in_str, mut esc) = (0, false, false);
    for (j, &c) in bytes.iter().enumerate().skip(start) {
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return after[start..=j].to_owned();
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced prompt in {name}");
}

/// What the trace recorded, minus steps whose outcome depends on timing.
fn expected(name: &str, skip: &[&str]) -> Rec {
    let text = std::fs::read_to_string(
        testdata()
            .join("comfyui-traces")
            .join(format!("{name}.jsonl")),
    )
    .unwrap();
    let mut rec = Rec::default();
    for line in text.lines() {
        let d: Value = serde_json::from_str(line).unwrap();
        match d["dir"].as_str() {
            Some("ws") => rec.ws.push(d["message"].clone()),
            Some("http") => {
                let key = format!(
                    "{} {}",
                    d["method"].as_str().unwrap(),
                    d["path"].as_str().unwrap()
                );
                if skip.contains(&key.as_str()) {
                    continue;
                }
                let mut e =
                    json!({"method": d["method"], "path": d["path"], "status": d["status"]});
                for k in ["response", "content_type", "head_hex"] {
                    if let Some(v) = d.get(k) {
                        e[k] = v.clone();
                    }
                }
                rec.http.push(e);
            }
            _ => {}
        }
    }
    rec
}

fn view_rec(rec: &mut Rec, r: &Resp) {
    rec.http.push(json!({
        "method": "GET", "path": "/view", "status": r.status,
        "content_type": r.content_type(),
        "head_hex": r.bytes.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>(),
    }));
}

/// The `GET /view` of the first image in a history entry.
async fn view_first_output(c: &reqwest::Client, sim: &ComfyUiSim, entry: &Value) -> Resp {
    let img = entry["outputs"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()["images"][0]
        .clone();
    let url = format!(
        "{}/view?filename={}&subfolder={}&type={}",
        sim.base_url(),
        img["filename"].as_str().unwrap(),
        img["subfolder"].as_str().unwrap(),
        img["type"].as_str().unwrap()
    );
    get(c, url).await
}

/// Drive one row exactly as its trace did.
async fn drive(name: &str, sim: &ComfyUiSim) -> Rec {
    let c = client();
    let base = sim.base_url();
    let mut rec = Rec::default();
    match name {
        "invert" | "progress" | "runtime_error" => {
            let id = cid();
            let mut ws = Ws::connect(sim, &id).await;
            let r = post(
                &c,
                format!("{base}/prompt"),
                body(&trace_prompt(name, 0), Some(&id)),
            )
            .await;
            rec.http("POST", "/prompt", &r);
            let pid = r.json()["prompt_id"].as_str().unwrap().to_owned();
            ws.until_done(&pid).await;
            let h = get(&c, format!("{base}/history/{pid}")).await;
            rec.http("GET", "/history/{prompt_id}", &h);
            if name != "runtime_error" {
                let v = view_first_output(&c, sim, &h.json()[pid.as_str()]).await;
                view_rec(&mut rec, &v);
            }
            rec.ws = ws.log;
        }
        "validation_error" => {
            let r = post(
                &c,
                format!("{base}/prompt"),
                body(&trace_prompt(name, 0), Some(&cid())),
            )
            .await;
            rec.http("POST", "/prompt", &r);
        }
        "missing_node" => {
            let r = post(
                &c,
                format!("{base}/prompt"),
                body(&trace_prompt(name, 0), Some(&cid())),
            )
            .await;
            rec.http("POST", "/prompt", &r);
            rec.http("GET", "/queue", &get(&c, format!("{base}/queue")).await);
        }
        "interrupt" => {
            let id = cid();
            let mut ws = Ws::connect(sim, &id).await;
            let r = post(
                &c,
                format!("{base}/prompt"),
                body(&trace_prompt(name, 0), Some(&id)),
            )
            .await;
            rec.http("POST", "/prompt", &r);
            let pid = r.json()["prompt_id"].as_str().unwrap().to_owned();
            ws.until(|m| m["type"] == "execution_start").await;
            rec.http("GET", "/queue", &get(&c, format!("{base}/queue")).await);
            let mut ticks = 0;
            ws.until(|m| {
                ticks += usize::from(m["type"] == "progress");
                ticks == 3
            })
            .await;
            let i = post(
                &c,
                format!("{base}/interrupt"),
                json!({"prompt_id": pid}).to_string(),
            )
            .await;
            rec.http("POST", "/interrupt", &i);
            ws.until_done(&pid).await;
            rec.http(
                "GET",
                "/history/{prompt_id}",
                &get(&c, format!("{base}/history/{pid}")).await,
            );
            rec.ws = ws.log;
        }
        "queued" => {
            let id = cid();
            let mut ws = Ws::connect(sim, &id).await;
            let r1 = post(
                &c,
                format!("{base}/prompt"),
                body(&trace_prompt(name, 0), Some(&id)),
            )
            .await;
            rec.http("POST", "/prompt", &r1);
            let p1 = r1.json()["prompt_id"].as_str().unwrap().to_owned();
            ws.until(|m| m["type"] == "progress").await;
            let r2 = post(
                &c,
                format!("{base}/prompt"),
                body(&trace_prompt(name, 1), Some(&id)),
            )
            .await;
            rec.http("POST", "/prompt", &r2);
            let p2 = r2.json()["prompt_id"].as_str().unwrap().to_owned();
            rec.http("GET", "/queue", &get(&c, format!("{base}/queue")).await);
            ws.until_done(&p1).await;
            ws.until_done(&p2).await;
            for p in [&p1, &p2] {
                rec.http(
                    "GET",
                    "/history/{prompt_id}",
                    &get(&c, format!("{base}/history/{p}")).await,
                );
            }
            rec.ws = ws.log;
        }
        "cached" => {
            let id = cid();
            let mut ws = Ws::connect(sim, &id).await;
            let mut pids = Vec::new();
            for n in 0..2 {
                let r = post(
                    &c,
                    format!("{base}/prompt"),
                    body(&trace_prompt(name, n), Some(&id)),
                )
                .await;
                rec.http("POST", "/prompt", &r);
                let pid = r.json()["prompt_id"].as_str().unwrap().to_owned();
                ws.until_done(&pid).await;
                pids.push(pid);
            }
            for p in &pids {
                rec.http(
                    "GET",
                    "/history/{prompt_id}",
                    &get(&c, format!("{base}/history/{p}")).await,
                );
            }
            rec.ws = ws.log;
        }
        "restart_lost" => {
            let pid = uuid::Uuid::new_v4().to_string();
            let raw = format!(
                "{{\"prompt\": {}, \"prompt_id\": \"{pid}\"}}",
                trace_prompt(name, 0)
            );
            rec.http(
                "POST",
                "/prompt",
                &post(&c, format!("{base}/prompt"), raw).await,
            );
            // The trace's recorder summarised this /queue answer to ids.
            let q = loop {
                let q = get(&c, format!("{base}/queue")).await.json();
                if !q["queue_running"].as_array().unwrap().is_empty() {
                    break q;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            let ids = |k: &str| {
                q[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i[1].clone())
                    .collect::<Vec<_>>()
            };
            let summary =
                json!({"running_ids": ids("queue_running"), "pending_ids": ids("queue_pending")});
            rec.http.push(
                json!({"method": "GET", "path": "/queue", "status": 200, "response": summary}),
            );
            rec.http(
                "GET",
                "/history/{prompt_id}",
                &get(&c, format!("{base}/history/{pid}")).await,
            );
            sim.restart().await;
            let c = client();
            rec.http(
                "GET",
                "/history/{prompt_id}",
                &get(&c, format!("{base}/history/{pid}")).await,
            );
            rec.http("GET", "/queue", &get(&c, format!("{base}/queue")).await);
        }
        other => panic!("no driver for {other}"),
    }
    rec
}

/// (trace, HTTP steps not replayed because their answer depends on timing)
const SESSION_A: &[(&str, &[&str])] = &[
    ("invert", &[]),
    ("progress", &[]),
    ("runtime_error", &[]),
    ("validation_error", &[]),
    ("missing_node", &[]),
    ("restart_lost", &[]),
];
/// The recorded order on the second server: `queued` finds node 1 cached by `interrupt`.
const SESSION_B: &[(&str, &[&str])] = &[
    ("interrupt", &[]),
    ("queued", &[]),
    // The trace's GET /queue raced the second (fully cached, instant) prompt.
    ("cached", &["GET /queue"]),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fidelity_with_recorded_traces() {
    let mut failures = Vec::new();
    let mut report = String::new();
    for session in [SESSION_A, SESSION_B] {
        // TestSleep 5 s → 500 ms: room for the requests that must land mid-node.
        let sim = ComfyUiSim::start(SimConfig::scaled(0.1)).await.unwrap();
        for (name, skip) in session {
            let t0 = Instant::now();
            let got = drive(name, &sim).await;
            let want = expected(name, skip);
            let (gw, gh) = got.lines();
            let (ww, wh) = want.lines();
            let ok = gw == ww && gh == wh;
            report += &format!(
                "{:<18} {:>6.0} ms  ws {:>3} msgs ({:>2} after collapsing ticks)  http {}  {}\n",
                name,
                t0.elapsed().as_secs_f64() * 1000.0,
                got.ws.len(),
                gw.len(),
                gh.len(),
                if ok { "ok" } else { "MISMATCH" }
            );
            if !ok {
                failures.push(format!(
                    "=== {name}: WebSocket (expected -, got +)\n{}=== {name}: HTTP (expected -, got +)\n{}",
                    diff(&ww, &gw),
                    diff(&wh, &gh)
                ));
            }
        }
        sim.shutdown().await;
    }
    eprintln!("{report}");
    assert!(
        failures.is_empty(),
        "trace mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_comparator_catches_reordering_and_value_changes() {
    let want = expected("invert", &[]);
    let (ww, wh) = want.lines();
    // Swap two WS messages: the diff shows them.
    let mut swapped = expected("invert", &[]);
    swapped.ws.swap(4, 5);
    let (sw, _) = swapped.lines();
    assert_ne!(sw, ww);
    let d = diff(&ww, &sw);
    assert!(d.contains("\n  - ") || d.starts_with("  - "), "{d}");
    // Change a value shape (float → int) inside progress_state.
    let mut shape = expected("invert", &[]);
    shape.ws[5]["data"]["nodes"]["1"]["value"] = json!(0);
    assert_ne!(shape.lines().0, ww);
    // Change the history status.
    let mut status = expected("invert", &[]);
    status.http[1]["response"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .next()
        .unwrap()["status"]["completed"] = json!(false);
    assert_ne!(status.lines().1, wh);
    // Timing-dependent tick counts do not matter.
    let mut ticks = expected("progress", &[]);
    let pos = ticks
        .ws
        .iter()
        .position(|m| m["type"] == "progress")
        .unwrap();
    let pair = [ticks.ws[pos - 1].clone(), ticks.ws[pos].clone()];
    ticks.ws.splice(pos + 1..pos + 1, pair);
    assert_eq!(ticks.lines().0, expected("progress", &[]).lines().0);
}

// ---- focused tests ----------------------------------------------------------------------------

async fn sim(scale: f64) -> ComfyUiSim {
    ComfyUiSim::start(SimConfig::scaled(scale)).await.unwrap()
}

fn sleep_prompt(seconds: f64, color: u32) -> String {
    format!(
        r#"{{"1": {{"class_type": "EmptyImage", "inputs": {{"width": 64, "height": 64, "batch_size": 1, "color": {color}}}}},
 "2": {{"class_type": "TestSleep", "inputs": {{"value": ["1", 0], "seconds": {seconds:?}}}}},
 "3": {{"class_type": "SaveImage", "inputs": {{"images": ["2", 0], "filename_prefix": "t_sleep"}}}}}}"#
    )
}

fn invert_prompt(color: u32, prefix: &str) -> String {
    format!(
        r#"{{"1": {{"class_type": "EmptyImage", "inputs": {{"width": 64, "height": 64, "batch_size": 1, "color": {color}}}}},
 "2": {{"class_type": "ImageInvert", "inputs": {{"image": ["1", 0]}}}},
 "3": {{"class_type": "SaveImage", "inputs": {{"images": ["2", 0], "filename_prefix": "{prefix}"}}}}}}"#
    )
}

/// The history entry once the prompt finished.
async fn finished(c: &reqwest::Client, sim: &ComfyUiSim, pid: &str) -> Value {
    for _ in 0..5000 {
        if let Some(e) = history(c, sim, pid).await.get(pid) {
            return e.clone();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{pid} never finished");
}

async fn wait_running(c: &reqwest::Client, sim: &ComfyUiSim, pid: &str) {
    for _ in 0..2000 {
        let q = get(c, format!("{}/queue", sim.base_url())).await.json();
        if q["queue_running"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i[1] == pid)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{pid} never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_api_alias_and_aiohttp_statuses() {
    let sim = ComfyUiSim::start(SimConfig {
        max_upload_size: 4096,
        ..SimConfig::scaled(0.01)
    })
    .await
    .unwrap();
    let c = client();
    let b = sim.base_url();
    // /api alias for every route, not twice.
    let plain = get(&c, format!("{b}/prompt")).await;
    let api = get(&c, format!("{b}/api/prompt")).await;
    assert_eq!(
        (plain.status, plain.json()),
        (200, json!({"exec_info": {"queue_remaining": 0}}))
    );
    assert_eq!(api.json(), plain.json());
    assert_eq!(get(&c, format!("{b}/api/api/prompt")).await.status, 404);
    assert_eq!(
        get(&c, format!("{b}/api/features")).await.json(),
        json!({"supports_preview_metadata": true, "max_upload_size": 4096.0})
    );
    let mut ws =
        tokio_tungstenite::connect_async(format!("ws://{}/api/ws?clientId=alias", sim.addr()))
            .await
            .unwrap()
            .0;
    let first: Value =
        serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(
        first,
        json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "alias"}})
    );
    // Unknown route, wrong method.
    let r = get(&c, format!("{b}/nope")).await;
    assert_eq!((r.status, r.text()), (404, "404: Not Found".to_owned()));
    let r = get(&c, format!("{b}/interrupt")).await;
    assert_eq!(
        (r.status, r.text()),
        (405, "405: Method Not Allowed".to_owned())
    );
    assert_eq!(send(c.delete(format!("{b}/api/queue"))).await.status, 405);
    // Empty-body 200s.
    for (path, body) in [
        ("/queue", "{\"clear\": true}"),
        ("/history", "{\"clear\": true}"),
        ("/interrupt", ""),
        ("/free", "{\"free_memory\": true}"),
    ] {
        let r = post(&c, format!("{b}/api{path}"), body).await;
        assert_eq!((r.status, r.bytes.len()), (200, 0), "{path}");
    }
    // 413 at/over --max-upload-size.
    let big = format!("{{\"prompt\": {{}}, \"pad\": \"{}\"}}", "x".repeat(5000));
    let r = post(&c, format!("{b}/prompt"), big).await;
    assert_eq!(r.status, 413);
    assert!(
        r.text()
            .starts_with("Maximum request body size 4096 exceeded"),
        "{}",
        r.text()
    );
    // Origin/Host rule: loopback Host with another Origin → 403; matching or absent → fine.
    let r = send(
        c.get(format!("{b}/prompt"))
            .header("Origin", "http://evil.example"),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = send(c.get(format!("{b}/prompt")).header("Origin", b.clone())).await;
    assert_eq!(r.status, 200);
    let r = send(
        c.get(format!("{b}/prompt"))
            .header("Origin", "http://127.0.0.1"),
    )
    .await;
    assert_eq!(r.status, 200, "ports compared only when both have one");
    assert_eq!(
        send(c.request(reqwest::Method::OPTIONS, format!("{b}/prompt")))
            .await
            .status,
        200
    );
    // Catalogue routes.
    let info = get(&c, format!("{b}/object_info")).await.json();
    for class in [
        "EmptyImage",
        "ImageInvert",
        "SaveImage",
        "TestSleep",
        "PreviewImage",
        "LoadImage",
        "ImageScale",
        "ImageBlur",
    ] {
        let e = &info[class];
        for k in [
            "input",
            "input_order",
            "output",
            "output_is_list",
            "output_name",
            "name",
            "display_name",
            "description",
            "python_module",
            "category",
            "output_node",
        ] {
            assert!(e.get(k).is_some(), "{class}.{k}");
        }
    }
    assert_eq!(info["SaveImage"]["output_node"], true);
    assert_eq!(
        info["EmptyImage"]["input"]["required"]["width"],
        json!(["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}])
    );
    assert_eq!(
        get(&c, format!("{b}/object_info/ImageInvert")).await.json()["ImageInvert"]["input"]["required"]
            ["image"],
        json!(["IMAGE"])
    );
    assert_eq!(
        get(&c, format!("{b}/object_info/Nope")).await.json(),
        json!({})
    );
    let stats = get(&c, format!("{b}/system_stats")).await.json();
    assert_eq!(stats["system"]["comfyui_version"], "0.3.64");
    assert_eq!(stats["devices"][0]["type"], "cpu");
    assert!(stats["devices"][0]["index"].is_null());
    let models = get(&c, format!("{b}/models")).await.json();
    assert!(models.as_array().unwrap().contains(&json!("checkpoints")));
    assert_eq!(
        get(&c, format!("{b}/models/checkpoints")).await.json(),
        json!([])
    );
    assert_eq!(get(&c, format!("{b}/models/nope")).await.status, 404);
    assert_eq!(get(&c, format!("{b}/embeddings")).await.json(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_bodies_answer_500_text() {
    let sim = sim(0.01).await;
    let c = client();
    let b = sim.base_url();
    for path in ["/prompt", "/queue", "/history", "/free", "/api/prompt"] {
        let r = post(&c, format!("{b}{path}"), "{not json").await;
        assert_eq!(r.status, 500, "{path}");
        assert!(r.content_type().starts_with("text/plain"), "{path}");
    }
    // /interrupt treats a bad body as {} → a global interrupt.
    let r = post(&c, format!("{b}/interrupt"), "{not json").await;
    assert_eq!(r.status, 200);
    assert_eq!(sim.stats().interrupts_global, 1);
    // No "prompt" → 400 no_prompt (and the number counter still advanced).
    let r = post(&c, format!("{b}/prompt"), "{}").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "no_prompt");
    let pid = submit(&c, &sim, &invert_prompt(1, "n"), None).await;
    let h = finished(&c, &sim, &pid).await;
    assert_eq!(
        h["prompt"][0], 1,
        "the counter is consumed even by rejected prompts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_is_a_python_heap_with_float_and_front_numbers() {
    let sim = sim(0.01).await;
    let c = client();
    let b = sim.base_url();
    let mut ws = Ws::connect(&sim, "watcher").await;
    sim.faults().set_hang_after_accept(true);
    let blocker = submit(&c, &sim, &invert_prompt(7, "blocker"), Some("watcher")).await;
    wait_running(&c, &sim, &blocker).await;
    let mut numbers_of = HashMap::new();
    numbers_of.insert(blocker.clone(), json!(0));
    for n in [5, 3, 4, 1, 2] {
        let raw = format!(
            "{{\"prompt\": {}, \"number\": {n}, \"client_id\": \"watcher\"}}",
            invert_prompt(n, "heap")
        );
        let r = post(&c, format!("{b}/prompt"), raw).await.json();
        assert_eq!(
            r["number"],
            json!(f64::from(n)),
            "client numbers become floats"
        );
        numbers_of.insert(
            r["prompt_id"].as_str().unwrap().to_owned(),
            r["number"].clone(),
        );
    }
    let q = get(&c, format!("{b}/queue")).await.json();
    let numbers: Vec<Value> = q["queue_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[0].clone())
        .collect();
    assert_eq!(
        numbers,
        vec![json!(1.0), json!(2.0), json!(4.0), json!(5.0), json!(3.0)],
        "heap array, not sorted"
    );
    assert_eq!(q["queue_running"][0][1], blocker);
    // front: the server counter negated (the counter is 1 after the blocker).
    let raw = format!(
        "{{\"prompt\": {}, \"front\": true, \"client_id\": \"watcher\"}}",
        invert_prompt(9, "front")
    );
    let r = post(&c, format!("{b}/prompt"), raw).await.json();
    assert_eq!(r["number"], json!(-1));
    numbers_of.insert(
        r["prompt_id"].as_str().unwrap().to_owned(),
        r["number"].clone(),
    );
    let q = get(&c, format!("{b}/queue")).await.json();
    assert_eq!(q["queue_pending"][0][0], json!(-1));
    assert_eq!(
        get(&c, format!("{b}/prompt")).await.json()["exec_info"]["queue_remaining"],
        7
    );
    // Released: they run in heap order (the blocker, front, then 1.0, 2.0, …).
    sim.faults().set_hang_after_accept(false);
    let mut order = Vec::new();
    ws.until(|m| {
        if m["type"] == "execution_start" {
            order.push(numbers_of[m["data"]["prompt_id"].as_str().unwrap()].clone());
        }
        order.len() == 7
    })
    .await;
    assert_eq!(
        order,
        vec![
            json!(0),
            json!(-1),
            json!(1.0),
            json!(2.0),
            json!(3.0),
            json!(4.0),
            json!(5.0)
        ]
    );
    assert_eq!(sim.stats().max_concurrent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_pending_broadcasts_status_and_leaves_no_history() {
    let sim = sim(0.01).await;
    let c = client();
    let b = sim.base_url();
    let mut ws = Ws::connect(&sim, "owner").await;
    sim.faults().set_hang_after_accept(true);
    let blocker = submit(&c, &sim, &invert_prompt(1, "d"), None).await;
    wait_running(&c, &sim, &blocker).await;
    let a = submit(&c, &sim, &invert_prompt(2, "d"), Some("owner")).await;
    let bb = submit(&c, &sim, &invert_prompt(3, "d"), Some("owner")).await;
    let seen = ws
        .until(|m| m["data"]["status"]["exec_info"]["queue_remaining"] == 3)
        .await;
    assert_eq!(
        types(&seen),
        vec!["status"; 5],
        "connect, put, take, put, put"
    );
    // Unknown id: nothing. Pending id: one status.
    post(
        &c,
        format!("{b}/queue"),
        json!({"delete": ["nope", a]}).to_string(),
    )
    .await;
    assert_eq!(
        ws.next().await,
        json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 2}}}})
    );
    assert!(ws.quiet(Duration::from_millis(100)).await.is_empty());
    // The last pending item: wipe_queue + queue_updated → two statuses.
    post(
        &c,
        format!("{b}/queue"),
        json!({"delete": [bb]}).to_string(),
    )
    .await;
    let msgs = vec![ws.next().await, ws.next().await];
    assert_eq!(types(&msgs), vec!["status", "status"]);
    assert!(ws.quiet(Duration::from_millis(100)).await.is_empty());
    assert!(
        msgs.iter()
            .all(|m| m["data"]["status"]["exec_info"]["queue_remaining"] == 1)
    );
    // The running prompt is never deleted.
    post(
        &c,
        format!("{b}/queue"),
        json!({"delete": [blocker]}).to_string(),
    )
    .await;
    assert_eq!(
        get(&c, format!("{b}/queue")).await.json()["queue_running"][0][1],
        blocker
    );
    sim.faults().set_hang_after_accept(false);
    finished(&c, &sim, &blocker).await;
    assert_eq!(history(&c, &sim, &a).await, json!({}));
    assert_eq!(history(&c, &sim, &bb).await, json!({}));
    assert_eq!(sim.stats().prompts_deleted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_by_id_only_hits_that_prompt() {
    let sim = sim(0.1).await;
    let c = client();
    let b = sim.base_url();
    let mut wa = Ws::connect(&sim, "alice").await;
    let mut wb = Ws::connect(&sim, "bob").await;
    let pa = submit(&c, &sim, &sleep_prompt(5.0, 11), Some("alice")).await;
    let pb = submit(&c, &sim, &invert_prompt(12, "bob"), Some("bob")).await;
    wa.until(|m| m["type"] == "progress").await;
    // Bob's prompt is pending, so an interrupt naming it is a no-op.
    post(
        &c,
        format!("{b}/interrupt"),
        json!({"prompt_id": pb}).to_string(),
    )
    .await;
    wa.until(|m| m["type"] == "progress").await;
    assert_eq!(sim.stats().interrupts_ignored, 1);
    assert_eq!(
        history(&c, &sim, &pa).await,
        json!({}),
        "alice keeps running"
    );
    wa.until(|m| m["type"] == "progress").await;
    // Naming alice's running prompt interrupts it…
    post(
        &c,
        format!("{b}/interrupt"),
        json!({"prompt_id": pa}).to_string(),
    )
    .await;
    let tail = wa.until_done(&pa).await;
    let int = tail
        .iter()
        .find(|m| m["type"] == "execution_interrupted")
        .unwrap();
    assert_eq!(int["data"]["node_id"], "2");
    assert_eq!(int["data"]["node_type"], "TestSleep");
    assert_eq!(int["data"]["executed"], json!(["1"]));
    assert_eq!(
        &types(&tail)[tail.len() - 3..],
        ["execution_interrupted", "status", "executing"]
    );
    // …and bob's prompt survives and runs.
    let bob = wb.until_done(&pb).await;
    assert!(types(&bob).contains(&"execution_success".to_owned()));
    let ha = history(&c, &sim, &pa).await;
    assert_eq!(ha[&pa]["status"]["status_str"], "error");
    assert_eq!(ha[&pa]["status"]["messages"][2][0], "execution_interrupted");
    assert_eq!(
        history(&c, &sim, &pb).await[&pb]["status"]["status_str"],
        "success"
    );
    assert_eq!(sim.stats().interrupts_by_id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_server_interrupt_ignores_the_prompt_id() {
    let sim = ComfyUiSim::start(SimConfig {
        faults: FaultConfig {
            interrupt_ignores_prompt_id: true,
            ..FaultConfig::default()
        },
        ..SimConfig::scaled(0.1)
    })
    .await
    .unwrap();
    let c = client();
    let mut ws = Ws::connect(&sim, "c").await;
    let p = submit(&c, &sim, &sleep_prompt(5.0, 21), Some("c")).await;
    ws.until(|m| m["type"] == "progress").await;
    post(
        &c,
        format!("{}/interrupt", sim.base_url()),
        json!({"prompt_id": "someone-else"}).to_string(),
    )
    .await;
    let tail = ws.until_done(&p).await;
    assert!(types(&tail).contains(&"execution_interrupted".to_owned()));
    assert_eq!(sim.stats().interrupts_global, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_without_client_id_leak_progress_and_interrupts_to_everyone() {
    let sim = sim(0.05).await;
    let c = client();
    let mut monitor = Ws::connect(&sim, "monitor").await;
    let p = submit(&c, &sim, &sleep_prompt(0.5, 31), None).await;
    let seen = monitor
        .until(|m| {
            m["type"] == "status"
                && m["data"]["status"]["exec_info"]["queue_remaining"] == 0
                && m["data"].get("sid").is_none()
        })
        .await;
    let kinds = types(&seen);
    assert!(
        kinds.contains(&"progress".to_owned()) && kinds.contains(&"progress_state".to_owned()),
        "{kinds:?}"
    );
    for private in [
        "execution_start",
        "execution_cached",
        "executing",
        "executed",
        "execution_success",
    ] {
        assert!(
            !kinds.contains(&private.to_owned()),
            "{private} must not leak: {kinds:?}"
        );
    }
    assert!(
        seen.iter()
            .filter(|m| m["type"] == "progress")
            .all(|m| m["data"]["prompt_id"] == p)
    );
    // execution_interrupted is broadcast too.
    let p2 = submit(&c, &sim, &sleep_prompt(5.0, 32), None).await;
    monitor
        .until(|m| m["type"] == "progress" && m["data"]["prompt_id"] == p2)
        .await;
    post(&c, format!("{}/interrupt", sim.base_url()), "").await;
    let tail = monitor
        .until(|m| m["type"] == "execution_interrupted")
        .await;
    assert_eq!(tail.last().unwrap()["data"]["prompt_id"], p2);
    assert_eq!(monitor.next().await["type"], "status");
    assert!(
        monitor.quiet(Duration::from_millis(100)).await.is_empty(),
        "no executing null without client_id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_serves_real_pngs_and_rejects_bad_paths() {
    let sim = sim(0.01).await;
    let c = client();
    let b = sim.base_url();
    let mut ws = Ws::connect(&sim, "v").await;
    let p = submit(
        &c,
        &sim,
        &invert_prompt(0xFF0000, "sub/fleet_view"),
        Some("v"),
    )
    .await;
    ws.until_done(&p).await;
    let img = history(&c, &sim, &p).await[&p]["outputs"]["3"]["images"][0].clone();
    assert_eq!(
        img,
        json!({"filename": "fleet_view_00001_.png", "subfolder": "sub", "type": "output"})
    );
    let r = get(
        &c,
        format!("{b}/view?filename=fleet_view_00001_.png&subfolder=sub&type=output"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type(), "image/png");
    let mut dec = png::Decoder::new(std::io::Cursor::new(r.bytes.clone()))
        .read_info()
        .unwrap();
    let mut buf = vec![0; dec.output_buffer_size().unwrap()];
    let info = dec.next_frame(&mut buf).unwrap();
    assert_eq!(
        (info.width, info.height, info.color_type),
        (64, 64, png::ColorType::Rgb)
    );
    assert_eq!(&buf[..3], &[0, 255, 255], "red inverted is cyan");
    let text = dec
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "prompt")
        .unwrap()
        .text
        .clone();
    assert!(
        text.starts_with("{\"1\": {\"class_type\": \"EmptyImage\", \"inputs\": {\"width\": 64"),
        "{text}"
    );
    // Annotated filename, other types, errors.
    assert_eq!(
        get(
            &c,
            format!("{b}/view?filename=fleet_view_00001_.png%20%5Boutput%5D&subfolder=sub")
        )
        .await
        .status,
        200
    );
    assert_eq!(
        get(&c, format!("{b}/view?filename=../x.png")).await.status,
        400
    );
    assert_eq!(
        get(&c, format!("{b}/view?filename=/etc/passwd"))
            .await
            .status,
        400
    );
    assert_eq!(
        get(&c, format!("{b}/view?filename=a.png&type=bogus"))
            .await
            .status,
        400
    );
    assert_eq!(
        get(&c, format!("{b}/view?filename=a.png&subfolder=../../etc"))
            .await
            .status,
        403
    );
    assert_eq!(
        get(&c, format!("{b}/view?filename=missing.png"))
            .await
            .status,
        404
    );
    assert_eq!(get(&c, format!("{b}/view")).await.status, 404);
    assert!(sim.file("output", "sub", "fleet_view_00001_.png").is_some());
    // The counter continues from the files on disk.
    let p2 = submit(
        &c,
        &sim,
        &invert_prompt(0x00FF00, "sub/fleet_view"),
        Some("v"),
    )
    .await;
    ws.until_done(&p2).await;
    assert_eq!(
        history(&c, &sim, &p2).await[&p2]["outputs"]["3"]["images"][0]["filename"],
        "fleet_view_00002_.png"
    );
}

async fn upload(c: &reqwest::Client, sim: &ComfyUiSim, name: &str, data: Vec<u8>) -> Resp {
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(data).file_name(name.to_owned()),
        )
        .text("type", "input");
    send(
        c.post(format!("{}/upload/image", sim.base_url()))
            .multipart(form),
    )
    .await
}

fn tiny_png(rgb: [u8; 3]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, 2, 2);
        e.set_color(png::ColorType::Rgb);
        e.set_depth(png::BitDepth::Eight);
        let mut w = e.write_header().unwrap();
        w.write_image_data(&rgb.repeat(4)).unwrap();
        w.finish().unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_dedupes_renames_and_feeds_load_image() {
    let sim = sim(0.01).await;
    let c = client();
    let (x, y) = (tiny_png([10, 20, 30]), tiny_png([200, 100, 0]));
    assert_eq!(
        upload(&c, &sim, "a.png", x.clone()).await.json(),
        json!({"name": "a.png", "subfolder": "", "type": "input"})
    );
    assert_eq!(
        upload(&c, &sim, "a.png", x.clone()).await.json()["name"],
        "a.png",
        "identical bytes reused"
    );
    assert_eq!(
        upload(&c, &sim, "a.png", y.clone()).await.json()["name"],
        "a (1).png",
        "different bytes renamed"
    );
    assert_eq!(
        upload(&c, &sim, "a.png", y.clone()).await.json()["name"],
        "a (1).png"
    );
    let no_file = reqwest::multipart::Form::new().text("type", "input");
    assert_eq!(
        send(
            c.post(format!("{}/upload/image", sim.base_url()))
                .multipart(no_file)
        )
        .await
        .status,
        400
    );
    // LoadImage lists the files, validates existence, and runs.
    let info = get(&c, format!("{}/object_info/LoadImage", sim.base_url()))
        .await
        .json();
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!(["a (1).png", "a.png"])
    );
    let load = |f: &str| {
        format!(
            r#"{{"1": {{"class_type": "LoadImage", "inputs": {{"image": "{f}"}}}}, "2": {{"class_type": "PreviewImage", "inputs": {{"images": ["1", 0]}}}}}}"#
        )
    };
    let r = post(
        &c,
        format!("{}/prompt", sim.base_url()),
        body(&load("nope.png"), None),
    )
    .await;
    assert_eq!(r.status, 400);
    let e = r.json();
    assert_eq!(e["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(
        e["node_errors"]["1"]["errors"][0]["type"],
        "custom_validation_failed"
    );
    assert_eq!(
        e["node_errors"]["1"]["errors"][0]["details"],
        "image - Invalid image file: nope.png"
    );
    let mut ws = Ws::connect(&sim, "u").await;
    let p = submit(&c, &sim, &load("a (1).png"), Some("u")).await;
    ws.until_done(&p).await;
    let img = history(&c, &sim, &p).await[&p]["outputs"]["2"]["images"][0].clone();
    assert_eq!(img["type"], "temp");
    assert!(
        img["filename"]
            .as_str()
            .unwrap()
            .starts_with("ComfyUI_temp_")
    );
    let v = get(
        &c,
        format!(
            "{}/view?filename={}&type=temp",
            sim.base_url(),
            img["filename"].as_str().unwrap()
        ),
    )
    .await;
    let mut dec = png::Decoder::new(std::io::Cursor::new(v.bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; dec.output_buffer_size().unwrap()];
    dec.next_frame(&mut buf).unwrap();
    assert_eq!(&buf[..3], &[200, 100, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_forgets_queue_history_counter_and_sockets_but_keeps_files() {
    let sim = sim(0.05).await;
    let c = client();
    let mut ws = Ws::connect(&sim, "r").await;
    let done = submit(&c, &sim, &invert_prompt(5, "keep"), Some("r")).await;
    ws.until_done(&done).await;
    let running = submit(&c, &sim, &sleep_prompt(5.0, 6), Some("r")).await;
    let pending = submit(&c, &sim, &invert_prompt(7, "p"), Some("r")).await;
    ws.until(|m| m["type"] == "progress").await;
    sim.restart().await;
    // The socket is cut (no close frame needed).
    loop {
        match ws.next_within(Duration::from_secs(5)).await {
            Next::Closed => break,
            Next::Timeout => panic!("socket survived the restart"),
            Next::Msg(_) => {}
        }
    }
    let c = client();
    for p in [&done, &running, &pending] {
        assert_eq!(history(&c, &sim, p).await, json!({}));
    }
    assert_eq!(
        get(&c, format!("{}/queue", sim.base_url())).await.json(),
        json!({"queue_running": [], "queue_pending": []})
    );
    let r = post(
        &c,
        format!("{}/prompt", sim.base_url()),
        body(&invert_prompt(5, "keep"), None),
    )
    .await;
    assert_eq!(r.json()["number"], 0, "the counter restarts");
    assert_eq!(
        get(
            &c,
            format!("{}/view?filename=keep_00001_.png", sim.base_url())
        )
        .await
        .status,
        200,
        "files survive"
    );
    let mut ws = Ws::connect(&sim, "r").await;
    assert_eq!(ws.next().await["type"], "status");
    assert_eq!(sim.stats().restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_catalogue_and_partial_acceptance() {
    let sim = sim(0.01).await;
    let c = client();
    let b = sim.base_url();
    let reject = |raw: String| {
        let c = c.clone();
        let url = format!("{b}/prompt");
        async move {
            let r = post(&c, url, body(&raw, None)).await;
            assert_eq!(r.status, 400, "{}", r.text());
            r.json()
        }
    };
    let e = reject(r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 64, "batch_size": 1, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "v"}}}"#.to_owned()).await;
    assert_eq!(
        e["node_errors"]["1"]["errors"][0],
        json!({
            "type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1", "details": "width",
            "extra_info": {"input_name": "width", "input_config": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}], "received_value": 0}
        })
    );
    assert_eq!(e["node_errors"]["1"]["dependent_outputs"], json!(["2"]));
    let e = reject(r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}"#.to_owned()).await;
    assert_eq!(
        e,
        json!({"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}, "node_errors": {}})
    );
    let e = reject(r#"{"1": {"inputs": {}}}"#.to_owned()).await;
    assert_eq!(
        e["error"]["message"],
        "Cannot execute because a node is missing the class_type property."
    );
    let e = reject(r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": "wide", "height": 8, "batch_size": 1}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}"#.to_owned()).await;
    let kinds: Vec<&str> = e["node_errors"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|n| {
            n["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["type"].as_str().unwrap())
        })
        .collect();
    assert!(
        kinds.contains(&"invalid_input_type") && kinds.contains(&"required_input_missing"),
        "{kinds:?}"
    );
    let e = reject(r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": "m"}}}"#.to_owned()).await;
    assert_eq!(
        e["node_errors"]["2"]["errors"][0]["type"],
        "return_type_mismatch"
    );
    assert_eq!(
        e["error"]["details"],
        "Return type mismatch between linked nodes: images, received_type(MASK) mismatch input_type(IMAGE)"
    );
    // Partial acceptance: one good output, one bad → 200 with node_errors, only the good runs.
    let raw = r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": "5"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "good"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 99999, "height": 8, "batch_size": 1, "color": 0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bad"}}}"#;
    let r = post(&c, format!("{b}/prompt"), body(raw, Some("pa"))).await;
    assert_eq!(r.status, 200);
    let ok = r.json();
    assert_eq!(
        ok["node_errors"]["3"]["errors"][0]["type"],
        "value_bigger_than_max"
    );
    let pid = ok["prompt_id"].as_str().unwrap().to_owned();
    let q = finished(&c, &sim, &pid).await;
    assert_eq!(q["prompt"][4], json!(["2"]));
    assert_eq!(
        q["prompt"][2]["1"]["inputs"]["color"], 5,
        "widget values are coerced in place"
    );
    assert_eq!(
        q["outputs"].as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_resubmission_is_cached_until_free_memory() {
    let sim = sim(0.01).await;
    let c = client();
    let mut ws = Ws::connect(&sim, "k").await;
    let go = async |ws: &mut Ws| {
        let p = submit(&c, &sim, &invert_prompt(0x123456, "cache"), Some("k")).await;
        let msgs = ws.until_done(&p).await;
        (p, msgs)
    };
    let (p1, m1) = go(&mut ws).await;
    let (p2, m2) = go(&mut ws).await;
    let cached = |m: &[Value]| {
        m.iter().find(|x| x["type"] == "execution_cached").unwrap()["data"]["nodes"].clone()
    };
    assert_eq!(cached(&m1), json!([]));
    assert_eq!(cached(&m2), json!(["1", "2", "3"]));
    assert_eq!(
        types(&m2).iter().filter(|t| *t == "executing").count(),
        1,
        "only executing null"
    );
    assert_eq!(
        types(&m2).iter().filter(|t| *t == "executed").count(),
        1,
        "only the output node"
    );
    let (cr, sr) = (&c, &sim);
    let out = async |p: &str| {
        history(cr, sr, p).await[p]["outputs"]["3"]["images"][0]["filename"].clone()
    };
    assert_eq!(out(&p1).await, out(&p2).await, "old filename from cache");
    post(
        &c,
        format!("{}/free", sim.base_url()),
        json!({"free_memory": true}).to_string(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (p3, m3) = go(&mut ws).await;
    assert_eq!(cached(&m3), json!([]));
    assert_ne!(out(&p3).await, out(&p1).await);
}

/// Top-level keys of a JSON object in document order (serde_json's `Value` may sort them).
fn key_order(text: &[u8]) -> Vec<String> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keys, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Keys, A::Error> {
                    let mut out = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        m.next_value::<serde::de::IgnoredAny>()?;
                        out.push(k);
                    }
                    Ok(Keys(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Keys>(text).unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_ordered_capped_paged_and_deletable() {
    let sim = ComfyUiSim::start(SimConfig {
        history_cap: 3,
        ..SimConfig::scaled(0.01)
    })
    .await
    .unwrap();
    let c = client();
    let b = sim.base_url();
    let mut ws = Ws::connect(&sim, "h").await;
    let mut pids = Vec::new();
    for i in 0..6 {
        let p = submit(&c, &sim, &invert_prompt(100 + i, "h"), Some("h")).await;
        ws.until_done(&p).await;
        pids.push(p);
    }
    // Cap 3: an insert drops the oldest only when there are already more than 3 → 4 kept.
    let all = get(&c, format!("{b}/history")).await;
    assert_eq!(key_order(&all.bytes), pids[2..].to_vec(), "oldest → newest");
    assert_eq!(
        key_order(&get(&c, format!("{b}/history?max_items=2")).await.bytes),
        pids[4..].to_vec()
    );
    assert_eq!(
        key_order(
            &get(&c, format!("{b}/history?max_items=2&offset=1"))
                .await
                .bytes
        ),
        pids[3..5].to_vec()
    );
    assert_eq!(
        key_order(&get(&c, format!("{b}/history?offset=3")).await.bytes),
        pids[5..].to_vec()
    );
    assert_eq!(
        get(&c, format!("{b}/history?max_items=x")).await.status,
        500
    );
    post(
        &c,
        format!("{b}/history"),
        json!({"delete": [pids[5]]}).to_string(),
    )
    .await;
    assert_eq!(history(&c, &sim, &pids[5]).await, json!({}));
    post(
        &c,
        format!("{b}/history"),
        json!({"clear": true}).to_string(),
    )
    .await;
    assert_eq!(get(&c, format!("{b}/history")).await.json(), json!({}));
    assert!(
        ws.quiet(Duration::from_millis(50)).await.is_empty(),
        "history changes send no WS event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_flags_are_negotiated_on_the_first_message_only() {
    let sim = sim(0.01).await;
    let mut ws = Ws::connect(&sim, "ff").await;
    assert_eq!(ws.next().await["data"]["sid"], "ff");
    // Invalid JSON does not count as the first message.
    ws.s.send(Message::text("{oops")).await.unwrap();
    ws.s.send(Message::text(
        json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        ws.next().await,
        json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": 104857600.0}})
    );
    ws.s.send(Message::text(
        json!({"type": "feature_flags", "data": {}}).to_string(),
    ))
    .await
    .unwrap();
    assert!(
        ws.quiet(Duration::from_millis(100)).await.is_empty(),
        "only the first message negotiates"
    );
    let mut other = Ws::connect(&sim, "").await;
    let sid = other.next().await["data"]["sid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        sid.len() == 32 && sid.chars().all(|c| c.is_ascii_hexdigit()),
        "a uuid4().hex sid: {sid}"
    );
    other
        .s
        .send(Message::text(json!({"type": "hello"}).to_string()))
        .await
        .unwrap();
    other
        .s
        .send(Message::text(
            json!({"type": "feature_flags", "data": {}}).to_string(),
        ))
        .await
        .unwrap();
    assert!(other.quiet(Duration::from_millis(100)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_hang_after_accept() {
    let sim = sim(0.01).await;
    let c = client();
    let mut ws = Ws::connect(&sim, "a").await;
    ws.next().await;
    sim.faults().set_hang_after_accept(true);
    let p = submit(&c, &sim, &invert_prompt(1, "haa"), Some("a")).await;
    let seen = vec![ws.next().await, ws.next().await];
    assert_eq!(types(&seen), vec!["status", "status"], "put and take");
    assert!(
        ws.quiet(Duration::from_millis(150)).await.is_empty(),
        "then nothing"
    );
    wait_running(&c, &sim, &p).await;
    post(&c, format!("{}/interrupt", sim.base_url()), "").await;
    assert!(
        ws.quiet(Duration::from_millis(100)).await.is_empty(),
        "a stuck worker ignores interrupts"
    );
    sim.faults().set_hang_after_accept(false);
    let rest = ws.until_done(&p).await;
    assert!(
        types(&rest).contains(&"execution_success".to_owned()),
        "the flag is reset when the prompt starts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_hang_mid_node_until_interrupted() {
    let sim = sim(0.01).await;
    let c = client();
    let mut ws = Ws::connect(&sim, "m").await;
    sim.faults().set_hang_mid_node(Some(HangMidNode {
        class_type: Some("TestSleep".into()),
        ignore_interrupt: false,
    }));
    let p = submit(&c, &sim, &sleep_prompt(1.0, 41), Some("m")).await;
    ws.until(|m| m["type"] == "executing" && m["data"]["node"] == "2")
        .await;
    let quiet = ws.quiet(Duration::from_millis(200)).await;
    assert!(
        quiet.is_empty(),
        "the node stopped sending: {:?}",
        types(&quiet)
    );
    assert_eq!(history(&c, &sim, &p).await, json!({}));
    post(
        &c,
        format!("{}/interrupt", sim.base_url()),
        json!({"prompt_id": p}).to_string(),
    )
    .await;
    let tail = ws.until_done(&p).await;
    assert_eq!(
        types(&tail),
        vec!["execution_interrupted", "status", "executing"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_hang_mid_node_ignoring_interrupt() {
    let sim = sim(0.01).await;
    let c = client();
    let mut ws = Ws::connect(&sim, "i").await;
    sim.faults().set_hang_mid_node(Some(HangMidNode {
        class_type: None,
        ignore_interrupt: true,
    }));
    let p = submit(&c, &sim, &invert_prompt(51, "ign"), Some("i")).await;
    ws.until(|m| m["type"] == "executing" && m["data"]["node"] == "1")
        .await;
    post(&c, format!("{}/interrupt", sim.base_url()), "").await;
    assert!(
        ws.quiet(Duration::from_millis(200)).await.is_empty(),
        "interrupt ignored while stuck"
    );
    // Cleared: node 1 finishes; the pending interrupt flag stops the next node (cooperative).
    sim.faults().set_hang_mid_node(None);
    let tail = ws.until_done(&p).await;
    let int = tail
        .iter()
        .find(|m| m["type"] == "execution_interrupted")
        .unwrap();
    assert_eq!(int["data"]["node_id"], "2");
    assert_eq!(int["data"]["executed"], json!(["1"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_silent_websocket() {
    let sim = sim(0.01).await;
    let c = client();
    sim.faults().set_silent_websocket(true);
    let mut silent = Ws::connect(&sim, "s").await;
    let p = submit(&c, &sim, &invert_prompt(61, "sil"), Some("s")).await;
    assert!(
        silent.quiet(Duration::from_millis(200)).await.is_empty(),
        "upgrade accepted, nothing sent"
    );
    assert_eq!(
        finished(&c, &sim, &p).await["status"]["status_str"],
        "success"
    );
    sim.faults().set_silent_websocket(false);
    let mut ws = Ws::connect(&sim, "s").await;
    assert_eq!(ws.next().await["type"], "status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_drop_all_sockets_mid_run_then_reconnect_gets_executing() {
    let sim = sim(0.05).await;
    let c = client();
    let mut ws = Ws::connect(&sim, "d").await;
    let p = submit(&c, &sim, &sleep_prompt(4.0, 71), Some("d")).await;
    ws.until(|m| m["type"] == "progress").await;
    sim.drop_all_sockets();
    loop {
        match ws.next_within(Duration::from_secs(5)).await {
            Next::Closed => break,
            Next::Timeout => panic!("socket not dropped"),
            Next::Msg(_) => {}
        }
    }
    // Reconnect while the prompt runs: status (with sid) then `executing {node}` without prompt_id.
    let mut again = Ws::connect(&sim, "d").await;
    let first = again.next().await;
    assert_eq!(first["data"]["sid"], "d");
    assert_eq!(
        again.next().await,
        json!({"type": "executing", "data": {"node": "2"}})
    );
    let tail = again.until_done(&p).await;
    assert!(types(&tail).contains(&"execution_success".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_http_delay_lets_ws_events_overtake_the_response() {
    let sim = sim(0.01).await;
    let mut ws = Ws::connect(&sim, "late").await;
    ws.next().await;
    sim.faults().set_http_delay(Duration::from_millis(300));
    let t0 = Instant::now();
    let url = format!("{}/prompt", sim.base_url());
    let pending = tokio::spawn(async move {
        post(
            &client(),
            url,
            body(&invert_prompt(81, "late"), Some("late")),
        )
        .await
    });
    ws.until(|m| m["type"] == "execution_success").await;
    assert!(
        !pending.is_finished(),
        "events arrived before the HTTP response"
    );
    let r = pending.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(t0.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_http_errors_and_malformed_json() {
    let sim = sim(0.01).await;
    let c = client();
    let b = sim.base_url();
    sim.faults().set_http_errors(Some(HttpErrors {
        status: 503,
        trigger: Trigger::Next(2),
        path_contains: Some("/queue".into()),
    }));
    assert_eq!(
        get(&c, format!("{b}/prompt")).await.status,
        200,
        "other paths unaffected"
    );
    assert_eq!(get(&c, format!("{b}/queue")).await.status, 503);
    assert_eq!(get(&c, format!("{b}/api/queue")).await.status, 503);
    assert_eq!(get(&c, format!("{b}/queue")).await.status, 200);
    sim.faults().set_http_errors(Some(HttpErrors {
        status: 500,
        trigger: Trigger::Probability(1.0),
        path_contains: None,
    }));
    let r = post(
        &c,
        format!("{b}/prompt"),
        body(&invert_prompt(1, "x"), None),
    )
    .await;
    assert_eq!(
        (r.status, r.text().starts_with("500 Internal Server Error")),
        (500, true)
    );
    assert_eq!(
        sim.stats().prompts_received,
        0,
        "failed requests are not processed"
    );
    sim.faults().set_http_errors(None);
    sim.faults().set_malformed_json(Trigger::Next(1));
    let bad = get(&c, format!("{b}/queue")).await;
    assert_eq!(bad.status, 200);
    assert!(bad.content_type().starts_with("application/json"));
    assert!(
        serde_json::from_slice::<Value>(&bad.bytes).is_err(),
        "{}",
        bad.text()
    );
    assert!(serde_json::from_slice::<Value>(&get(&c, format!("{b}/queue")).await.bytes).is_ok());
    assert_eq!(sim.stats().faults_fired, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_missing_node_class_and_installed_custom_nodes() {
    let sim = ComfyUiSim::start(SimConfig {
        extra_node_classes: [("FleetCustomSaver".to_owned(), true)].into(),
        ..SimConfig::scaled(0.01)
    })
    .await
    .unwrap();
    let c = client();
    let b = sim.base_url();
    assert!(sim.remove_node_class("ImageInvert"));
    let r = post(
        &c,
        format!("{b}/prompt"),
        body(&invert_prompt(1, "gone"), None),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"error": {"type": "invalid_prompt", "message": "Cannot execute because node ImageInvert does not exist.", "details": "Node ID '#2'", "extra_info": {}}, "node_errors": {}})
    );
    assert_eq!(
        get(&c, format!("{b}/object_info/ImageInvert")).await.json(),
        json!({})
    );
    assert!(sim.restore_builtin_class("ImageInvert"));
    assert_eq!(
        post(
            &c,
            format!("{b}/prompt"),
            body(&invert_prompt(1, "back"), None)
        )
        .await
        .status,
        200
    );
    // Custom classes: declared at start or installed at run time.
    sim.install_node_class("FleetCustomFilter", false);
    let info = get(&c, format!("{b}/object_info")).await.json();
    assert_eq!(info["FleetCustomSaver"]["output_node"], true);
    assert_eq!(info["FleetCustomFilter"]["output"], json!(["*"]));
    let raw = r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "FleetCustomFilter", "inputs": {"x": ["1", 0]}},
        "3": {"class_type": "FleetCustomSaver", "inputs": {"x": ["2", 0]}}}"#;
    let mut ws = Ws::connect(&sim, "cu").await;
    let p = submit(&c, &sim, raw, Some("cu")).await;
    let msgs = ws.until_done(&p).await;
    assert!(types(&msgs).contains(&"execution_success".to_owned()));
    assert!(
        !types(&msgs).contains(&"executed".to_owned()),
        "no UI output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_ws_duplicate_reorder_and_drop() {
    let sim = sim(0.01).await;
    let c = client();
    // Duplicate: every bus message twice (the connect status is sent directly, once).
    sim.faults().set_ws_duplicate(Trigger::Always);
    let mut ws = Ws::connect(&sim, "dup").await;
    let p = submit(&c, &sim, &invert_prompt(91, "dup"), Some("dup")).await;
    ws.until_done(&p).await;
    ws.quiet(Duration::from_millis(50)).await;
    let log = &ws.log;
    assert_eq!(log[0]["data"]["sid"], "dup");
    assert_eq!((log.len() - 1) % 2, 0);
    assert!(log[1..].chunks(2).all(|pair| pair[0] == pair[1]));
    sim.faults().clear();
    // Reorder: each message is held and sent after the next one.
    sim.faults().set_ws_reorder(Trigger::Always);
    let mut ws = Ws::connect(&sim, "re").await;
    let p = submit(&c, &sim, &invert_prompt(92, "re"), Some("re")).await;
    let msgs = ws.until_done(&p).await;
    let t = types(&msgs);
    let pos = |k: &str| t.iter().position(|x| x == k).unwrap();
    assert!(pos("execution_cached") < pos("execution_start"), "{t:?}");
    sim.faults().clear();
    // Drop: the next message (the queue-put status) is lost.
    sim.faults().set_ws_drop(Trigger::Next(1));
    let mut ws = Ws::connect(&sim, "dr").await;
    let p = submit(&c, &sim, &invert_prompt(93, "dr"), Some("dr")).await;
    let msgs = ws.until_done(&p).await;
    assert_eq!(
        types(&msgs)[..3],
        ["status", "status", "execution_start"],
        "connect + take only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_evict_history_right_after_the_write() {
    let sim = sim(0.01).await;
    let c = client();
    sim.faults().set_evict_history(Trigger::Always);
    let mut ws = Ws::connect(&sim, "ev").await;
    let p = submit(&c, &sim, &invert_prompt(95, "ev"), Some("ev")).await;
    let msgs = ws.until_done(&p).await;
    assert!(types(&msgs).contains(&"execution_success".to_owned()));
    assert_eq!(
        history(&c, &sim, &p).await,
        json!({}),
        "gone although it finished"
    );
}

async fn reconnect_case(bug: bool) -> Vec<Value> {
    let sim = sim(0.01).await;
    sim.faults().set_reconnect_unregisters_new_socket(bug);
    let c = client();
    let mut old = Ws::connect(&sim, "same").await;
    old.next().await;
    let mut new = Ws::connect(&sim, "same").await;
    new.next().await;
    old.s.close(None).await.unwrap();
    while let Next::Msg(_) = old.next_within(Duration::from_secs(5)).await {}
    let p = submit(&c, &sim, &invert_prompt(97, "rc"), Some("same")).await;
    assert_eq!(
        finished(&c, &sim, &p).await["status"]["status_str"],
        "success"
    );
    if bug {
        new.quiet(Duration::from_millis(100)).await
    } else {
        new.until_done(&p).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_bug_old_handler_unregisters_the_new_socket() {
    assert!(
        reconnect_case(true).await.is_empty(),
        "0.3.64: the new socket is deaf"
    );
    let fixed = reconnect_case(false).await;
    assert!(
        types(&fixed).contains(&"execution_success".to_owned()),
        "fixed behaviour: the new socket gets events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_what_happened() {
    let sim = sim(0.01).await;
    let c = client();
    let b = sim.base_url();
    let mut ws = Ws::connect(&sim, "st").await;
    let p = submit(&c, &sim, &invert_prompt(99, "st"), Some("st")).await;
    ws.until_done(&p).await;
    post(
        &c,
        format!("{b}/prompt"),
        body(&workflow("missing_node.json"), None),
    )
    .await;
    post(
        &c,
        format!("{b}/interrupt"),
        json!({"prompt_id": "x"}).to_string(),
    )
    .await;
    let s = sim.stats();
    assert_eq!(
        (s.prompts_received, s.prompts_accepted, s.prompts_rejected),
        (2, 1, 1)
    );
    assert_eq!(
        (s.prompts_started, s.prompts_executed, s.prompts_succeeded),
        (1, 1, 1)
    );
    assert_eq!(
        (
            s.interrupts_ignored,
            s.interrupts_global,
            s.interrupts_by_id
        ),
        (1, 0, 0)
    );
    assert_eq!(s.nodes_executed, 3);
    assert_eq!(s.max_concurrent, 1);
    assert_eq!(s.ws_connections, 1);
    assert!(s.ws_messages_sent >= 10 && s.http_requests >= 4, "{s:?}");
    assert!(sim.node_classes().contains(&"TestSleep".to_owned()));
}

// ---- custom nodes directory and restart --------------------------------------------------------

/// A pack folder in `root`, with `init` as its `__init__.py` (none if `None`).
fn write_pack(root: &std::path::Path, folder: &str, init: Option<&str>) {
    let dir = root.join(folder);
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(text) = init {
        std::fs::write(dir.join("__init__.py"), text).unwrap();
    }
}

/// Custom classes loaded from a custom nodes directory: name → `python_module`.
fn custom_classes(info: &Value) -> std::collections::BTreeMap<String, String> {
    info.as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "TestSleep")
        .filter_map(|(name, def)| {
            let module = def["python_module"].as_str().unwrap();
            module
                .starts_with("custom_nodes.")
                .then(|| (name.clone(), module.to_owned()))
        })
        .collect()
}

/// Wait (generously) until the restart counter reaches `n`: the old process is gone and the new
/// one is in its 503 window.
async fn wait_restarts(sim: &ComfyUiSim, n: u64) {
    for _ in 0..3000 {
        if sim.stats().restarts >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("restart {n} never happened");
}

/// Wait (generously) until the restarted server answers again; fresh connections each time.
async fn wait_ready(sim: &ComfyUiSim) {
    for _ in 0..3000 {
        if !sim.is_restarting()
            && let Ok(r) = client()
                .get(format!("{}/api/system_stats", sim.base_url()))
                .send()
                .await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_nodes_dir_packs_load_and_a_manager_reboot_rescans_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_pack(
        root,
        "ComfyUI-Alpha",
        Some(
            "import os\n\nclass AlphaOne:\n    pass\n\nNODE_CLASS_MAPPINGS = {\n    \"AlphaOne\": AlphaOne,  # the first\n    # \"AlphaCommented\": AlphaOne,\n    \"AlphaTwo\": make_node({\"nested\": 1}),\n}\nNODE_DISPLAY_NAME_MAPPINGS = {\"AlphaOne\": \"Alpha One\"}\n",
        ),
    );
    write_pack(
        root,
        "beta_pack",
        Some("NODE_CLASS_MAPPINGS = {'BetaNode': BetaNode}\n"),
    );
    write_pack(root, "NoMappings", Some("WEB_DIRECTORY = './js'\n"));
    write_pack(root, "NoInit", None);
    write_pack(
        root,
        "Gamma.disabled",
        Some("NODE_CLASS_MAPPINGS = {'GammaNode': G}\n"),
    );
    write_pack(
        root,
        ".hidden",
        Some("NODE_CLASS_MAPPINGS = {'HiddenNode': H}\n"),
    );
    write_pack(
        root,
        "Shadow",
        Some("NODE_CLASS_MAPPINGS = {'SaveImage': Mine, 'ShadowNode': S}\n"),
    );
    std::fs::write(root.join("notes.txt"), "NODE_CLASS_MAPPINGS = {'Txt': 1}").unwrap();

    // time_scale 0.01: the 300 s restart takes 3 s of real time.
    let sim = ComfyUiSim::start(
        SimConfig::scaled(0.01)
            .custom_nodes_dir(root)
            .restart_delay(Duration::from_secs(300)),
    )
    .await
    .unwrap();
    let b = sim.base_url();
    let c = client();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        sim.custom_node_packs(),
        vec![
            ("ComfyUI-Alpha".to_owned(), s(&["AlphaOne", "AlphaTwo"])),
            ("Shadow".to_owned(), s(&["SaveImage", "ShadowNode"])),
            ("beta_pack".to_owned(), s(&["BetaNode"])),
        ]
    );
    let info = get(&c, format!("{b}/api/object_info")).await.json();
    let expected: std::collections::BTreeMap<String, String> = [
        ("AlphaOne", "custom_nodes.ComfyUI-Alpha"),
        ("AlphaTwo", "custom_nodes.ComfyUI-Alpha"),
        ("BetaNode", "custom_nodes.beta_pack"),
        ("ShadowNode", "custom_nodes.Shadow"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(custom_classes(&info), expected);
    assert_eq!(
        info["SaveImage"]["python_module"], "nodes",
        "a pack cannot replace a built-in class"
    );
    let one = get(&c, format!("{b}/object_info/AlphaOne")).await.json();
    assert_eq!(one.as_object().unwrap().len(), 1);
    assert_eq!(
        one["AlphaOne"]["python_module"],
        "custom_nodes.ComfyUI-Alpha"
    );
    assert_eq!(one["AlphaOne"]["category"], "custom/ComfyUI-Alpha");
    assert_eq!(one["AlphaOne"]["output"], json!(["*"]));

    // A prompt through two pack classes validates and runs (pass-through).
    let raw = r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "AlphaOne", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "BetaNode", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "pack"}}}"#;
    let p = submit(&c, &sim, raw, None).await;
    let entry = finished(&c, &sim, &p).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    assert_eq!(
        entry["outputs"]["4"]["images"][0]["filename"],
        "pack_00001_.png"
    );

    // A pack cloned after start is not loaded until a restart.
    write_pack(
        root,
        "ComfyUI-Delta",
        Some("NODE_CLASS_MAPPINGS = {\"DeltaNode\": DeltaNode}\n"),
    );
    assert_eq!(
        get(&c, format!("{b}/api/object_info/DeltaNode"))
            .await
            .json(),
        json!({})
    );
    // A prompt in flight when the restart comes is lost.
    let lost = submit(&c, &sim, &sleep_prompt(1000.0, 3), None).await;
    wait_running(&c, &sim, &lost).await;

    let r = get(&c, format!("{b}/api/manager/reboot")).await;
    assert_eq!(r.status, 200);
    wait_restarts(&sim, 1).await;
    // The restart window: every request answers 503.
    assert!(sim.is_restarting());
    let during = get(&client(), format!("{b}/api/object_info")).await;
    assert_eq!(during.status, 503, "{}", during.text());
    let during = get(&client(), format!("{b}/prompt")).await;
    assert_eq!(during.status, 503);
    wait_ready(&sim).await;

    let c = client();
    let info = get(&c, format!("{b}/api/object_info")).await.json();
    assert_eq!(
        info["DeltaNode"]["python_module"],
        "custom_nodes.ComfyUI-Delta"
    );
    assert!(
        sim.custom_node_packs()
            .iter()
            .any(|(f, cl)| f == "ComfyUI-Delta" && cl == &s(&["DeltaNode"]))
    );
    assert_eq!(history(&c, &sim, &lost).await, json!({}), "lost");
    assert_eq!(
        get(&c, format!("{b}/history")).await.json(),
        json!({}),
        "history is gone"
    );
    assert_eq!(
        get(&c, format!("{b}/queue")).await.json(),
        json!({"queue_running": [], "queue_pending": []})
    );

    // Disabling a pack and rebooting (the route without `/api`) unloads it.
    std::fs::rename(
        root.join("ComfyUI-Delta"),
        root.join("ComfyUI-Delta.disabled"),
    )
    .unwrap();
    assert_eq!(get(&c, format!("{b}/manager/reboot")).await.status, 200);
    wait_restarts(&sim, 2).await;
    wait_ready(&sim).await;
    let c = client();
    assert_eq!(
        get(&c, format!("{b}/object_info/DeltaNode")).await.json(),
        json!({})
    );
    assert!(get(&c, format!("{b}/object_info/AlphaTwo")).await.json()["AlphaTwo"].is_object());
    assert_eq!(sim.stats().restarts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_like_the_real_manager_drops_the_connection_and_restarts() {
    let sim = ComfyUiSim::start(SimConfig::scaled(0.01)).await.unwrap();
    sim.faults().set_reboot_without_response(true);
    let b = sim.base_url();
    let mut ws = Ws::connect(&sim, "rb").await;
    assert_eq!(ws.next().await["type"], "status");
    let r = client().get(format!("{b}/api/manager/reboot")).send().await;
    assert!(r.is_err(), "no answer: {r:?}");
    loop {
        match ws.next_within(Duration::from_secs(5)).await {
            Next::Closed => break,
            Next::Timeout => panic!("socket survived the reboot"),
            Next::Msg(_) => {}
        }
    }
    wait_restarts(&sim, 1).await;
    wait_ready(&sim).await;
    // `restart()` itself returns once the server answers again.
    sim.restart().await;
    assert!(!sim.is_restarting());
    assert_eq!(get(&client(), format!("{b}/api/queue")).await.status, 200);
    assert_eq!(sim.stats().restarts, 2);
}

#[tokio::test(start_paused = true)]
async fn the_restart_delay_runs_on_tokio_time() {
    let sim = ComfyUiSim::start(SimConfig::default().restart_delay(Duration::from_secs(30)))
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    sim.restart().await;
    assert!(
        t0.elapsed() >= Duration::from_secs(30),
        "{:?}",
        t0.elapsed()
    );
    assert!(!sim.is_restarting());
    assert_eq!(sim.stats().restarts, 1);
    sim.shutdown().await;
}
