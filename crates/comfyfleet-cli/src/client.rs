//! A small typed client for the service's HTTP API (`docs/api.md`): JSON calls with a timeout
//! each, errors from the `{code, message, details}` body, multipart input uploads, and a resuming
//! reader for the server-sent event streams. Rendering lives in the command modules, not here.
//!
//! The bearer token is a [`SecretString`]: it goes into the `Authorization` header and nowhere
//! else (not into URLs, `Debug` output or error messages).

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where the client commands look for a server when neither `--server` nor `COMFYFLEET_SERVER`
/// names one: the service's default bind address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8330";

/// Most time one ordinary API call may take, from connect to the last byte of the answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most time an input upload may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// Most time to establish a TCP (and TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An event stream is dead when nothing (not even the 15 s keep-alive comment) arrived this long.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Exit codes shared by every command (also listed in `comfyfleet --help`).
pub mod exit {
    /// A job failed, or a command failed for another reason.
    pub const FAILED: i32 = 1;
    /// Not found; for `run`: a job was cancelled (or ended neither succeeded nor failed).
    pub const NOT_FOUND_OR_CANCELLED: i32 = 2;
    /// The server refused the token (or none was given).
    pub const UNAUTHORIZED: i32 = 3;
    /// The server could not be reached or did not answer in time.
    pub const UNREACHABLE: i32 = 4;
    /// Interrupted (Ctrl-C) while following; the jobs keep running.
    pub const INTERRUPTED: i32 = 130;
}

/// Why an API call did not succeed.
#[derive(Debug)]
pub enum ClientError {
    /// The server answered with an error status and (usually) a `{code, message, details}` body.
    Api {
        /// HTTP status.
        status: u16,
        /// The machine-readable code (`not_found`, `invalid`, …; `http_<status>` if the body had
        /// none).
        code: String,
        /// The human-readable message.
        message: String,
        /// Extra detail, as sent.
        details: Value,
    },
    /// No answer: connection refused, reset, DNS, TLS, or the call timed out.
    Unreachable {
        /// The server's base URL.
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// An answer that is not what the API promises.
    Protocol(String),
    /// A local problem before anything was sent (e.g. an unreadable upload).
    Local(String),
}

impl ClientError {
    /// The process exit code this error maps to.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Api { status: 401, .. } | ClientError::Api { status: 403, .. } => {
                exit::UNAUTHORIZED
            }
            ClientError::Api { status: 404, .. } => exit::NOT_FOUND_OR_CANCELLED,
            ClientError::Api { .. } | ClientError::Protocol(_) | ClientError::Local(_) => {
                exit::FAILED
            }
            ClientError::Unreachable { .. } => exit::UNREACHABLE,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Api {
                status,
                code,
                message,
                details,
            } => {
                write!(f, "{message} ({code}, HTTP {status})")?;
                if !details.is_null() {
                    let d = details.to_string();
                    let cut: String = d.chars().take(600).collect();
                    write!(
                        f,
                        "\n  details: {cut}{}",
                        if cut.len() < d.len() { "…" } else { "" }
                    )?;
                }
                if *status == 401 {
                    f.write_str("; set COMFYFLEET_TOKEN to one of the server's tokens")?;
                }
                Ok(())
            }
            ClientError::Unreachable { server, reason } => {
                write!(f, "cannot reach the server at {server}: {reason}")?;
                if server == DEFAULT_SERVER {
                    f.write_str(" (start one with `comfyfleet serve`, or pass --server URL)")?;
                }
                Ok(())
            }
            ClientError::Protocol(m) => write!(f, "unexpected answer from the server: {m}"),
            ClientError::Local(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ClientError {}

/// Installs the one TLS provider of the workspace (ring); idempotent. reqwest is built with
/// `rustls-no-provider` and panics when it finds none.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client for one server.
#[derive(Clone)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
    streams: reqwest::Client,
    token: Option<Arc<SecretString>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl Client {
    /// A client for the server at `base` (`http://host:port`, optionally with a path prefix),
    /// sending `token` as a bearer token when given.
    pub fn new(base: &str, token: Option<SecretString>) -> Result<Client, ClientError> {
        let mut base = Url::parse(base.trim())
            .map_err(|e| ClientError::Local(format!("--server {base:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ClientError::Local(format!(
                "--server {base}: must be an http:// or https:// URL"
            )));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(ClientError::Local(
                "--server: put no credentials in the URL; set COMFYFLEET_TOKEN instead".into(),
            ));
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        base.set_query(None);
        base.set_fragment(None);
        install_tls_provider();
        let build = |read_timeout: Option<Duration>| {
            let mut b = reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .user_agent(concat!("comfyfleet-cli/", env!("CARGO_PKG_VERSION")));
            if let Some(t) = read_timeout {
                b = b.read_timeout(t);
            }
            b.build()
                .map_err(|e| ClientError::Local(format!("building the HTTP client: {e}")))
        };
        Ok(Client {
            base,
            http: build(None)?,
            streams: build(Some(STREAM_READ_TIMEOUT))?,
            token: token.map(Arc::new),
        })
    }

    /// The server's base URL as given (with a trailing `/`).
    pub fn base(&self) -> &str {
        self.base.as_str()
    }

    /// The absolute URL of an API path (`v1/jobs`, without a leading `/`) with query pairs.
    pub fn url(&self, path: &str, query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        let joined = format!("{}{}", self.base.path(), path.trim_start_matches('/'));
        url.set_path(&joined);
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        url
    }

    fn request(&self, http: &reqwest::Client, method: Method, url: Url) -> RequestBuilder {
        let rb = http.request(method, url);
        match &self.token {
            Some(t) => rb.bearer_auth(t.expose_secret()),
            None => rb,
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> ClientError {
        let reason = if e.is_timeout() {
            "no answer in time".to_string()
        } else if e.is_connect() {
            format!("connection failed: {}", root_cause(e))
        } else {
            root_cause(e)
        };
        ClientError::Unreachable {
            server: self.base.as_str().trim_end_matches('/').to_owned(),
            reason,
        }
    }

    /// Sends a request and decodes a JSON answer (or the API error).
    async fn call<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T, ClientError> {
        let resp = rb.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| {
            ClientError::Protocol(format!(
                "{e} in {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
        })
    }

    /// `GET path?query` → JSON.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        let rb = self
            .request(&self.http, Method::GET, self.url(path, query))
            .timeout(CALL_TIMEOUT);
        self.call(rb).await
    }

    /// `POST path?query` with a JSON body → JSON.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        body: &Value,
    ) -> Result<T, ClientError> {
        let rb = self
            .request(&self.http, Method::POST, self.url(path, query))
            .timeout(CALL_TIMEOUT)
            .json(body);
        self.call(rb).await
    }

    /// Uploads input files (`POST /v1/inputs`, one multipart part per file, named by its file
    /// name) and returns the `Upload` entries to put into a submit request's `uploads`.
    pub async fn upload_inputs(&self, files: &[PathBuf]) -> Result<Vec<Value>, ClientError> {
        let mut form = reqwest::multipart::Form::new();
        for path in files {
            let name = input_name(path)?;
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|e| ClientError::Local(format!("--upload {}: {e}", path.display())))?;
            form = form.part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name(name),
            );
        }
        let rb = self
            .request(&self.http, Method::POST, self.url("v1/inputs", &[]))
            .timeout(UPLOAD_TIMEOUT)
            .multipart(form);
        self.call(rb).await
    }

    /// A resuming reader of the server-sent events at `path` (`v1/events`,
    /// `v1/jobs/{id}/events/stream`), starting after event `after` when given.
    pub fn events(&self, path: &str, after: Option<u64>) -> EventSource {
        EventSource {
            client: self.clone(),
            path: path.to_owned(),
            after,
            parser: SseParser::default(),
            body: None,
            queue: VecDeque::new(),
            failures: 0,
            connections: 0,
        }
    }

    /// Opens an event stream once (no retries); the answer is checked for an error status.
    async fn open_stream(
        &self,
        path: &str,
        last_id: Option<&str>,
        after: Option<u64>,
    ) -> Result<reqwest::Response, ClientError> {
        let after = last_id
            .map(str::to_owned)
            .or_else(|| after.map(|a| a.to_string()));
        let query: Vec<(&str, String)> = after.iter().map(|a| ("after", a.clone())).collect();
        let mut rb = self
            .request(&self.streams, Method::GET, self.url(path, &query))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_id {
            rb = rb.header("Last-Event-ID", id);
        }
        // Only the response head is bounded; the body streams for as long as it lives.
        let resp = tokio::time::timeout(CALL_TIMEOUT, rb.send())
            .await
            .map_err(|_| ClientError::Unreachable {
                server: self.base.as_str().trim_end_matches('/').to_owned(),
                reason: "no answer in time".into(),
            })?
            .map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = tokio::time::timeout(CALL_TIMEOUT, resp.bytes())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(api_error(status, &body));
        }
        Ok(resp)
    }
}

/// The name an uploaded file gets: its file name.
fn input_name(path: &Path) -> Result<String, ClientError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            ClientError::Local(format!(
                "--upload {}: needs a file name in UTF-8",
                path.display()
            ))
        })
}

/// The innermost cause of a reqwest error (`Connection refused`), which says more than the
/// outer "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The error an answer with a non-success status stands for.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        details: Value,
    }
    let parsed: Option<Body> = serde_json::from_slice(body).ok();
    let (code, message, details) = match parsed {
        Some(b) => (b.code, b.message, b.details),
        None => (None, None, Value::Null),
    };
    let message = message.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)])
            .trim()
            .to_owned();
        if text.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
        } else {
            text
        }
    });
    ClientError::Api {
        status: status.as_u16(),
        code: code.unwrap_or_else(|| format!("http_{}", status.as_u16())),
        message,
        details,
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `id:` field, if it had one (fleet events have none).
    pub id: Option<String>,
    /// Its `event:` field (`message` when absent): `job`, `fleet`, `lagged`, …
    pub event: String,
    /// Its `data:` lines joined with `\n`.
    pub data: String,
}

/// An incremental parser of the `text/event-stream` format (WHATWG HTML, "server-sent events"):
/// lines end with `\n`, `\r\n` or `\r`; a blank line ends an event; `:` starts a comment.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    data: String,
    has_data: bool,
    event: String,
    /// The `id:` of the event being received.
    block_id: Option<String>,
    /// The last event ID buffer: committed to `last_id` when an event block ends.
    id_buffer: Option<String>,
    last_id: Option<String>,
}

impl SseParser {
    /// Feeds bytes; complete events are appended to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out);
                }
                _ => self.line.push(b),
            }
        }
    }

    /// The id to resume after (`Last-Event-ID`): the last `id:` field seen.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// Forgets a partly received event (after a dropped connection); keeps the id of the last
    /// complete one.
    pub fn reset_partial(&mut self) {
        self.line.clear();
        self.after_cr = false;
        self.id_buffer = self.last_id.clone();
        self.clear_block();
    }

    fn clear_block(&mut self) {
        self.data.clear();
        self.has_data = false;
        self.event.clear();
        self.block_id = None;
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let raw = std::mem::take(&mut self.line);
        let line = String::from_utf8_lossy(&raw);
        if line.is_empty() {
            // As browsers do: the id counts once its event is complete, not when its line is
            // read, so a connection dropped mid-event resumes before that event.
            self.last_id = self.id_buffer.clone();
            if self.has_data {
                out.push(SseEvent {
                    id: self.block_id.take(),
                    event: if self.event.is_empty() {
                        "message".into()
                    } else {
                        std::mem::take(&mut self.event)
                    },
                    data: std::mem::take(&mut self.data),
                });
            }
            self.clear_block();
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = value.to_owned(),
            "id" if !value.contains('\0') => {
                self.block_id = Some(value.to_owned());
                self.id_buffer = (!value.is_empty()).then(|| value.to_owned());
            }
            _ => {} // `retry:` and unknown fields: our reconnect policy is our own
        }
    }
}

type BodyStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// How many connection attempts in a row may fail (or end without an event) before the reader
/// gives up.
const MAX_FAILURES: u32 = 6;

/// A server-sent event stream that survives dropped connections: it reconnects with
/// `Last-Event-ID` (and `?after=`), so the server sends exactly the events missed. The caller
/// decides when the stream is finished (e.g. after a job's terminal event) and stops reading.
pub struct EventSource {
    client: Client,
    path: String,
    after: Option<u64>,
    parser: SseParser,
    body: Option<BodyStream>,
    queue: VecDeque<SseEvent>,
    failures: u32,
    connections: u32,
}

impl fmt::Debug for EventSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSource")
            .field("path", &self.path)
            .field("last_event_id", &self.parser.last_event_id())
            .field("connections", &self.connections)
            .finish()
    }
}

impl EventSource {
    /// How many times a connection was opened (1 + reconnects).
    #[cfg(test)]
    pub fn connections(&self) -> u32 {
        self.connections
    }

    /// The next event. Errors: the server refused the stream (4xx: unknown job, bad token), or
    /// it could not be (re)connected [`MAX_FAILURES`] times in a row.
    pub async fn next(&mut self) -> Result<SseEvent, ClientError> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                self.failures = 0;
                return Ok(ev);
            }
            let Some(body) = self.body.as_mut() else {
                if self.failures > 0 {
                    let backoff = Duration::from_millis(100 << self.failures.min(5));
                    tokio::time::sleep(backoff).await;
                }
                self.connections += 1;
                match self
                    .client
                    .open_stream(&self.path, self.parser.last_event_id(), self.after)
                    .await
                {
                    Ok(resp) => self.body = Some(Box::pin(resp.bytes_stream())),
                    Err(e @ ClientError::Api { status, .. }) if status < 500 => return Err(e),
                    Err(e) => {
                        self.failures += 1;
                        if self.failures >= MAX_FAILURES {
                            return Err(e);
                        }
                    }
                }
                continue;
            };
            match body.next().await {
                Some(Ok(chunk)) => {
                    let mut out = Vec::new();
                    self.parser.feed(&chunk, &mut out);
                    self.queue.extend(out);
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "event stream dropped; reconnecting");
                    self.drop_connection();
                    if self.failures >= MAX_FAILURES {
                        return Err(self.client.unreachable(&e));
                    }
                }
                None => {
                    self.drop_connection();
                    if self.failures >= MAX_FAILURES {
                        return Err(ClientError::Protocol(format!(
                            "the event stream {} keeps ending without events",
                            self.path
                        )));
                    }
                }
            }
        }
    }

    fn drop_connection(&mut self) {
        self.body = None;
        self.parser.reset_partial();
        // A connection that ends counts against the limit until an event arrives on the next.
        self.failures += 1;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn parse(chunks: &[&[u8]]) -> (Vec<SseEvent>, Option<String>) {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out);
        }
        let last = p.last_event_id().map(str::to_owned);
        (out, last)
    }

    fn ev(id: Option<&str>, event: &str, data: &str) -> SseEvent {
        SseEvent {
            id: id.map(str::to_owned),
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn sse_events_parse_with_any_line_ending_and_chunking() {
        let text = b"id: 7\nevent: job\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: fleet\ndata: x\ndata: y\n\n";
        let (all, last) = parse(&[text]);
        assert_eq!(
            all,
            vec![ev(Some("7"), "job", "{\"a\":1}"), ev(None, "fleet", "x\ny")]
        );
        assert_eq!(last.as_deref(), Some("7"), "fleet events keep the last id");
        // Byte by byte, with CRLF split across chunks, gives the same.
        let crlf = String::from_utf8_lossy(text).replace('\n', "\r\n");
        let bytes: Vec<&[u8]> = crlf.as_bytes().chunks(1).collect();
        assert_eq!(parse(&bytes).0, all);
        let cr = String::from_utf8_lossy(text).replace('\n', "\r");
        assert_eq!(parse(&[cr.as_bytes()]).0, all);
    }

    #[test]
    fn sse_edge_cases() {
        // No space after the colon, a field without a colon, an unknown field, no data.
        let (out, last) = parse(&[b"id:3\nevent:lagged\nretry: 10\nfoo\n\nid: 4\n\ndata\n\n"]);
        assert_eq!(out, vec![ev(None, "message", "")]);
        assert_eq!(last.as_deref(), Some("4"));
        // An unfinished event is not emitted, and its id does not count yet.
        let (out, last) = parse(&[b"id: 1\ndata: x\n\nid: 9\ndata: half"]);
        assert_eq!(out.len(), 1);
        assert_eq!(last.as_deref(), Some("1"));
    }

    #[test]
    fn api_errors_carry_the_message_and_map_to_exit_codes() {
        let e = api_error(
            StatusCode::NOT_FOUND,
            br#"{"code":"not_found","message":"no job 0190","details":null}"#,
        );
        assert_eq!(e.to_string(), "no job 0190 (not_found, HTTP 404)");
        assert_eq!(e.exit_code(), exit::NOT_FOUND_OR_CANCELLED);
        let e = api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"code":"invalid","message":"bad workflow","details":{"node":"3"}}"#,
        );
        assert_eq!(
            e.to_string(),
            "bad workflow (invalid, HTTP 422)\n  details: {\"node\":\"3\"}"
        );
        assert_eq!(e.exit_code(), exit::FAILED);
        let e = api_error(StatusCode::UNAUTHORIZED, b"");
        assert_eq!(e.exit_code(), exit::UNAUTHORIZED);
        assert!(e.to_string().contains("COMFYFLEET_TOKEN"), "{e}");
        let e = api_error(StatusCode::BAD_GATEWAY, b"upstream <b>down</b>");
        assert!(e.to_string().contains("upstream"), "{e}");
        assert!(matches!(&e, ClientError::Api { code, .. } if code == "http_502"));
        assert_eq!(e.exit_code(), exit::FAILED);
    }

    #[test]
    fn urls_keep_a_path_prefix_and_the_token_stays_out_of_debug() {
        let c = Client::new("http://h:1/fleet", Some(SecretString::from("s3cr3t-token"))).unwrap();
        assert_eq!(
            c.url("v1/jobs", &[("state", "pending,running".into())])
                .as_str(),
            "http://h:1/fleet/v1/jobs?state=pending%2Crunning"
        );
        assert_eq!(c.url("/healthz", &[]).as_str(), "http://h:1/fleet/healthz");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(Client::new("ftp://h", None).is_err());
        assert!(Client::new("http://u:p@h", None).is_err());
        assert!(Client::new("not a url", None).is_err());
    }

    /// A tiny SSE server: the first connection sends events 1 and 2 and drops mid-event; the
    /// second must ask for `Last-Event-ID: 2` and gets 3 (terminal), then the stream ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn event_source_resumes_after_a_dropped_connection() {
        use axum::http::HeaderMap;
        use std::sync::Mutex;
        /// What each connection sent: `Last-Event-ID`, `?after=`, `Authorization`.
        type Seen = Vec<(Option<String>, Option<String>, Option<String>)>;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let seen2 = seen.clone();
        let app = axum::Router::new().route(
            "/v1/jobs/{id}/events/stream",
            axum::routing::get(
                move |headers: HeaderMap,
                      axum::extract::Query(q): axum::extract::Query<
                    std::collections::HashMap<String, String>,
                >| {
                    let seen = seen2.clone();
                    async move {
                        let last = headers
                            .get("last-event-id")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let auth = headers
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_owned());
                        seen.lock()
                            .unwrap()
                            .push((last.clone(), q.get("after").cloned(), auth));
                        let body = match last.as_deref() {
                            None => "id: 1\nevent: job\ndata: one\n\n: ping\n\nid: 2\nevent: job\ndata: two\n\nid: 3\nevent: job\ndata: thr",
                            Some(_) => "event: fleet\ndata: f\n\nid: 3\nevent: job\ndata: three\n\n",
                        };
                        ([("content-type", "text/event-stream")], body)
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client =
            Client::new(&format!("http://{addr}"), Some(SecretString::from("tok"))).unwrap();
        let mut es = client.events("v1/jobs/x/events/stream", Some(0));
        let mut got = Vec::new();
        while got.last().map(|e: &SseEvent| e.data.as_str()) != Some("three") {
            got.push(es.next().await.unwrap());
        }
        let data: Vec<_> = got.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["one", "two", "f", "three"]);
        assert_eq!(es.connections(), 2);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0], (None, Some("0".into()), Some("Bearer tok".into())));
        assert_eq!(seen[1].0.as_deref(), Some("2"));
        assert_eq!(seen[1].1.as_deref(), Some("2"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_servers_and_refused_streams_are_errors_not_loops() {
        // A port nobody listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let c = Client::new(&format!("http://{addr}"), None).unwrap();
        let e = c.get::<Value>("healthz", &[]).await.unwrap_err();
        assert_eq!(e.exit_code(), exit::UNREACHABLE, "{e}");
        assert!(e.to_string().contains("cannot reach"), "{e}");

        let app = axum::Router::new().route(
            "/v1/events",
            axum::routing::get(|| async {
                (
                    axum::http::StatusCode::UNAUTHORIZED,
                    axum::Json(serde_json::json!({"code": "unauthorized", "message": "missing or wrong token", "details": null})),
                )
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let c = Client::new(&format!("http://{addr}"), None).unwrap();
        let e = c.events("v1/events", None).next().await.unwrap_err();
        assert_eq!(e.exit_code(), exit::UNAUTHORIZED);
        assert!(e.to_string().contains("missing or wrong token"), "{e}");
    }
}
