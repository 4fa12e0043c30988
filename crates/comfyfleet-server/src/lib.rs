//! The comfyfleet service: a JSON API under `/v1` (OpenAPI document at `/v1/openapi.json`,
//! generated from the handlers), live events as SSE and WebSocket with resume, bearer-token
//! auth, Prometheus metrics, signed webhooks and the dashboard at `/`. Started with an
//! [`SshInstaller`] ([`Server::start_with_installer`]), it also serves custom-node installs on
//! the fleet's SSH instances (`/v1/installs`, with live events per install).
//!
//! ```no_run
//! # async fn run(engine: comfyfleet::Engine) -> Result<(), comfyfleet_server::ServerError> {
//! use comfyfleet_server::{Server, ServerConfig};
//!
//! let server = Server::start(engine, ServerConfig::default()).await?;
//! println!("dashboard: {}", server.url());
//! // ... until Ctrl-C:
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! See `docs/api.md` for the routes and conventions.

mod api;
mod auth;
mod error;
mod events;
mod installs;
mod metrics;
mod routes;
mod webhooks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use comfyfleet::{Engine, SshInstaller};
use secrecy::SecretString;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use api::*;
pub use error::{ApiError, ErrorBody};
pub use webhooks::signature as webhook_signature;

/// The service's settings (`[server]` in the configuration file).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where to listen. Default `127.0.0.1:8330`. Without tokens only loopback addresses are
    /// allowed.
    pub bind: SocketAddr,
    /// Bearer tokens; any of them is accepted. Empty: no auth (loopback only).
    pub tokens: Vec<SecretString>,
    /// Origins allowed to call the API from browsers (CORS). Empty (default): CORS off.
    pub cors_origins: Vec<String>,
    /// Largest JSON body in bytes (default 8 MiB).
    pub max_body_bytes: usize,
    /// Largest multipart body (submit with files, `/v1/inputs`) in bytes (default 256 MiB).
    pub max_upload_bytes: usize,
    /// Secret for webhook signatures; jobs may ask for a webhook only when it is set.
    pub webhook_secret: Option<SecretString>,
    /// Tries per webhook delivery (default 8; exponential backoff from 1 s, at most 2 min apart).
    pub webhook_tries: usize,
    /// Allow webhooks to loopback and private addresses (default `false`: a submitter must not
    /// make the service call its neighbours).
    pub webhook_allow_private: bool,
    /// Where `POST /v1/maintenance/backup` and pruning write backups. `None`: backups are refused.
    pub backup_dir: Option<PathBuf>,
    /// Events buffered for slow live clients before they are told they lagged (default 4096).
    pub event_buffer: usize,
    /// How often the event tail polls the store for other processes' events (ms, default 500).
    pub event_poll_ms: u64,
    /// Seconds a non-streaming request may take before `503` (default 30).
    pub request_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8330)),
            tokens: Vec::new(),
            cors_origins: Vec::new(),
            max_body_bytes: 8 << 20,
            max_upload_bytes: 256 << 20,
            webhook_secret: None,
            webhook_tries: 8,
            webhook_allow_private: false,
            backup_dir: None,
            event_buffer: 4096,
            event_poll_ms: 500,
            request_timeout_secs: 30,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("bind", &self.bind)
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("cors_origins", &self.cors_origins)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("webhook_tries", &self.webhook_tries)
            .field("webhook_allow_private", &self.webhook_allow_private)
            .field("backup_dir", &self.backup_dir)
            .field("event_buffer", &self.event_buffer)
            .field("event_poll_ms", &self.event_poll_ms)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .finish()
    }
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Refusing to listen beyond loopback without a token.
    #[error(
        "refusing to listen on {0} without a token: anyone on the network could submit and cancel jobs; set a token (server.tokens or COMFYFLEET_TOKEN) or bind to a loopback address"
    )]
    InsecureBind(SocketAddr),
    /// A setting is invalid.
    #[error("invalid server setting: {0}")]
    Config(String),
    /// The store did not answer at start-up.
    #[error("the store is unavailable: {0}")]
    Store(String),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What the handlers share.
pub(crate) struct Shared {
    pub(crate) engine: Engine,
    /// Custom-node installs on the fleet's SSH instances (`None`: the fleet has none).
    pub(crate) installer: Option<SshInstaller>,
    pub(crate) config: ServerConfig,
    pub(crate) hub: Arc<events::Hub>,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) webhooks: Arc<webhooks::Webhooks>,
    pub(crate) stop: CancellationToken,
    pub(crate) webhook_stop: CancellationToken,
}

pub(crate) type AppState = Arc<Shared>;

/// A running server.
pub struct Server {
    addr: SocketAddr,
    shared: AppState,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Checks the settings, binds, and serves in the background. The engine should be started
    /// (the server never starts or stops it). Without an installer: the install routes answer
    /// as for a fleet without SSH instances (see [`Server::start_with_installer`]).
    pub async fn start(engine: Engine, config: ServerConfig) -> Result<Server, ServerError> {
        Server::start_with_installer(engine, None, config).await
    }

    /// [`Server::start`], serving custom-node installs (`/v1/installs`,
    /// `/v1/instances/{name}/packs`) through `installer` — typically
    /// [`Fleet::installer`](comfyfleet::Fleet::installer). The server never starts, recovers or
    /// shuts the installer down; its owner does.
    pub async fn start_with_installer(
        engine: Engine,
        installer: Option<SshInstaller>,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        if config.tokens.is_empty() && !config.bind.ip().is_loopback() {
            return Err(ServerError::InsecureBind(config.bind));
        }
        use secrecy::ExposeSecret;
        if config
            .tokens
            .iter()
            .any(|t| t.expose_secret().trim().is_empty())
        {
            return Err(ServerError::Config("tokens must not be empty".into()));
        }
        if config
            .webhook_secret
            .as_ref()
            .is_some_and(|s| s.expose_secret().len() < 16)
        {
            return Err(ServerError::Config(
                "webhook_secret must be at least 16 characters".into(),
            ));
        }
        for o in &config.cors_origins {
            if o.parse::<axum::http::HeaderValue>().is_err() || !o.contains("://") {
                return Err(ServerError::Config(format!(
                    "cors_origins: {o:?} is not an origin like https://example.com"
                )));
            }
        }
        if config.max_body_bytes == 0 || config.max_upload_bytes == 0 || config.event_buffer == 0 {
            return Err(ServerError::Config(
                "max_body_bytes, max_upload_bytes and event_buffer must be positive".into(),
            ));
        }
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.bind,
            source,
        })?;
        if config.tokens.is_empty() {
            tracing::warn!(%addr, "no API token configured: listening on loopback only, without auth");
        } else {
            tracing::info!(%addr, tokens = config.tokens.len(), "bearer-token auth on");
        }

        let stop = CancellationToken::new();
        // Webhook deliveries outlive `stop` by the shutdown grace period.
        let webhook_stop = CancellationToken::new();
        let hub = events::Hub::new(config.event_buffer);
        // Before serving: live streams start "now", and the tail (metrics, webhooks) continues
        // from here.
        let last = tokio::time::timeout(
            Duration::from_secs(30),
            events::last_event_id(engine.store().as_ref()),
        )
        .await
        .map_err(|_| ServerError::Store("the store did not answer within 30 s".into()))?
        .map_err(|e| ServerError::Store(e.to_string()))?;
        events::start_at(&hub, last);
        let metrics = Arc::new(metrics::Metrics::new());
        let webhooks = Arc::new(webhooks::Webhooks::new(
            config
                .webhook_secret
                .clone()
                .map(|secret| webhooks::WebhookSettings {
                    secret,
                    timeout: Duration::from_secs(10),
                    tries: config.webhook_tries.max(1),
                    first_delay: Duration::from_secs(1),
                    max_delay: Duration::from_secs(120),
                    allow_private: config.webhook_allow_private,
                }),
            webhook_stop.clone(),
        ));
        let shared = Arc::new(Shared {
            engine: engine.clone(),
            installer,
            config: config.clone(),
            hub: hub.clone(),
            metrics: metrics.clone(),
            webhooks: webhooks.clone(),
            stop: stop.clone(),
            webhook_stop: webhook_stop.clone(),
        });

        let tasks = TaskTracker::new();
        {
            let engine = engine.clone();
            let store = engine.store().clone();
            let metrics = metrics.clone();
            let webhooks = webhooks.clone();
            let tasks2 = tasks.clone();
            let on_event = move |e: &comfyfleet_core::Event| {
                metrics.observe(e);
                if webhooks.enabled() && e.kind.terminal_state().is_some() {
                    let store = store.clone();
                    let webhooks = webhooks.clone();
                    let e = e.clone();
                    tasks2.spawn(async move {
                        match store.get(e.job).await {
                            Ok(Some(job)) => webhooks.deliver(&job, &e),
                            Ok(None) => {}
                            Err(err) => tracing::warn!(job = %e.job, error = %err, "webhook: reading the job failed"),
                        }
                    });
                }
            };
            tasks.spawn(events::run_tail(
                engine,
                hub,
                Duration::from_millis(config.event_poll_ms.max(10)),
                on_event,
                stop.clone(),
            ));
        }

        // Histogram samples wait in the recorder until drained; without this a service nobody
        // scrapes would keep every job's samples forever.
        tasks.spawn(metrics::upkeep_loop(
            metrics::UPKEEP_EVERY,
            stop.clone(),
            move || metrics.upkeep(),
        ));

        let app = routes::app(shared.clone());
        let serve_stop = stop.clone();
        tasks.spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move { serve_stop.cancelled().await })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        });
        Ok(Server {
            addr,
            shared,
            tasks,
        })
    }

    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: the dashboard, and the base of the API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections, ends live streams, waits (up to 10 s) for requests in flight
    /// and webhook deliveries. The engine keeps running.
    pub async fn shutdown(self) {
        self.shared.stop.cancel();
        self.tasks.close();
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            self.tasks.wait().await;
            self.shared.webhooks.wait().await;
        })
        .await;
        if waited.is_err() {
            tracing::warn!("shutdown: webhook deliveries still retrying after 10 s are abandoned");
        }
        self.shared.webhook_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.webhooks.wait()).await;
    }
}

/// The OpenAPI document the server serves at `/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes::openapi()
}
