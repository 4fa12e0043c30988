//! A server over a real socket: MemoryStore (or SQLite), fake backends, a reqwest client.

use std::sync::Arc;
use std::time::Duration;

use comfyfleet::{Engine, EngineConfig, MemoryStore, SmartFailover};
use comfyfleet_core::{JobId, JobRecord, TaskStore};
use comfyfleet_server::{Server, ServerConfig};
use comfyfleet_testkit::{FakeBackend, workflows};
use serde_json::Value;

pub const TOKEN: &str = "test-token-0123456789";

pub struct TestServer {
    pub server: Option<Server>,
    pub engine: Engine,
    #[allow(dead_code)] // not every test file uses it
    pub backends: Vec<Arc<FakeBackend>>,
    pub base: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
    pub _dir: tempfile::TempDir,
}

pub struct Options {
    pub token: bool,
    pub node_duration: Duration,
    pub backends: usize,
    pub config: ServerConfig,
    pub store: Option<Arc<dyn TaskStore>>,
    /// Serves installs through it (`Server::start_with_installer`).
    pub installer: Option<comfyfleet::SshInstaller>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token: true,
            node_duration: Duration::from_millis(20),
            backends: 2,
            config: ServerConfig {
                bind: "127.0.0.1:0".parse().expect("addr"),
                ..ServerConfig::default()
            },
            store: None,
            installer: None,
        }
    }
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::with(Options::default()).await
    }

    pub async fn with(o: Options) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn TaskStore> = o.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        let backends: Vec<Arc<FakeBackend>> = (0..o.backends)
            .map(|i| {
                FakeBackend::builder(&format!("gpu-{i}"))
                    .standard_nodes()
                    .node_duration(o.node_duration)
                    .ticks(4)
                    .build()
            })
            .collect();
        let engine = Engine::builder(store, Arc::new(SmartFailover::default()))
            .backends(
                backends
                    .iter()
                    .map(|b| b.clone() as Arc<dyn comfyfleet_core::Backend>),
            )
            .config(EngineConfig {
                progress_flush: Duration::from_millis(10),
                ..EngineConfig::default()
            })
            .build()
            .expect("engine");
        engine.start();
        let mut config = o.config;
        config
            .backup_dir
            .get_or_insert_with(|| dir.path().join("backups"));
        if o.token {
            config.tokens = vec![TOKEN.into()];
        }
        let server = Server::start_with_installer(engine.clone(), o.installer, config)
            .await
            .expect("server");
        let base = server.url();
        TestServer {
            server: Some(server),
            engine,
            backends,
            base,
            http: client(),
            token: o.token.then(|| TOKEN.to_owned()),
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.req(reqwest::Method::GET, path)
    }

    /// `GET path` as JSON (any status).
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("JSON body")
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.req(reqwest::Method::POST, path)
    }

    /// Submits a sleep workflow (seconds of fake node time) and returns its id.
    pub async fn submit_sleep(&self, seconds: f64) -> JobId {
        let body = serde_json::json!({ "workflow": workflows::sleep(seconds) });
        let r = self
            .post("/v1/jobs")
            .json(&body)
            .send()
            .await
            .expect("submit");
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
        let v: Value = r.json().await.expect("json");
        v["id"].as_str().expect("id").parse().expect("job id")
    }

    pub async fn wait_terminal(&self, id: JobId) -> JobRecord {
        tokio::time::timeout(Duration::from_secs(60), self.engine.wait_for(id))
            .await
            .expect("job did not finish within 60 s")
            .expect("wait_for")
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.engine.shutdown(Duration::from_secs(5)).await;
    }
}

/// Reads an SSE response into (id, event, data) triples until `stop` says so or the stream ends.
pub struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

#[derive(Debug, Clone)]
pub struct SseMsg {
    pub id: Option<u64>,
    pub event: String,
    pub data: String,
}

impl SseMsg {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        SseReader {
            resp,
            buf: String::new(),
        }
    }

    /// The next message (keep-alive comments skipped); `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<SseMsg> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let mut msg = SseMsg {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        msg.id = v.trim().parse().ok();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        msg.event = v.trim().to_owned();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !msg.data.is_empty() {
                            msg.data.push('\n');
                        }
                        msg.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        any = true;
                    }
                }
                if any {
                    return Some(msg);
                }
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(30), self.resp.chunk()).await {
                Ok(Ok(Some(c))) => self.buf.push_str(&String::from_utf8_lossy(&c)),
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => panic!("no SSE data for 30 s"),
            }
        }
    }
}
