//! # comfyfleet
//!
//! Run ComfyUI workflows reliably on a fleet of heterogeneous backends. This facade turns a
//! [`FleetConfig`] into a running [`Fleet`] and re-exports the crates underneath:
//!
//! * [`core`] — vocabulary and the `Backend`, `FailoverStrategy`, `TaskStore` traits;
//! * [`engine`] — the scheduler and the default `SmartFailover` strategy;
//! * [`testkit`] (feature `simulated`, on by default) — simulated backends and conformance suites.
//!
//! ```
//! use comfyfleet::{Fleet, FleetConfig, BackendConfig, SimulatedBackend};
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let config = FleetConfig {
//!     store: "memory:".into(),
//!     backends: vec![BackendConfig::Simulated(SimulatedBackend::named("gpu-1"))],
//!     ..FleetConfig::default()
//! };
//! let fleet = Fleet::start(config).await?;
//! let id = fleet.engine().submit(comfyfleet::JobSpec::new(comfyfleet::testkit::workflows::invert())).await?;
//! let job = fleet.engine().wait_for(id).await?;
//! assert_eq!(job.state, comfyfleet::JobState::Succeeded);
//! fleet.shutdown().await;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

#![deny(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

mod inputs;
pub use inputs::DirInputs;

use serde::Deserialize;

pub use comfyfleet_core as core;
pub use comfyfleet_core::{
    Backend, BackendId, Event, EventKind, FleetEvent, JobId, JobRecord, JobSpec, JobState,
    MemoryStore, TaskStore, Workflow,
};
pub use comfyfleet_engine as engine;
pub use comfyfleet_engine::{Engine, EngineConfig, SmartFailover, SmartFailoverConfig};
#[cfg(feature = "simulated")]
pub use comfyfleet_testkit as testkit;

/// Why a fleet could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The store URL names a store this build does not have, or is malformed.
    #[error("store {url:?}: {reason}")]
    Store {
        /// The URL as configured.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A backend entry is invalid.
    #[error("backend {id:?}: {reason}")]
    Backend {
        /// The backend's id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The engine refused the setup (e.g. two backends with one id).
    #[error(transparent)]
    Engine(#[from] comfyfleet_engine::EngineError),
}

/// A simulated backend: an in-process fake ComfyUI with queue semantics and optional faults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedBackend {
    /// Its id in the fleet.
    pub id: String,
    /// Executions at once.
    #[serde(default = "one")]
    pub capacity: u32,
    /// Node classes it has (`None`: anything).
    #[serde(default)]
    pub node_classes: Option<Vec<String>>,
    /// This many of its first submissions are accepted and never start (a hung server).
    #[serde(default)]
    pub hang_first: u32,
    /// Seconds per node without a `seconds` input.
    #[serde(default)]
    pub node_seconds: f64,
}

fn one() -> u32 {
    1
}

impl SimulatedBackend {
    /// A healthy simulated backend of capacity 1.
    pub fn named(id: &str) -> Self {
        SimulatedBackend {
            id: id.to_owned(),
            capacity: 1,
            node_classes: None,
            hang_first: 0,
            node_seconds: 0.0,
        }
    }
}

/// A self-hosted ComfyUI server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComfyUiServer {
    /// Its id in the fleet.
    pub id: String,
    /// Its base URL, e.g. `http://gpu-1:8188`.
    pub url: String,
    /// Extra prompts kept queued on it so its GPU never idles (0: one at a time).
    #[serde(default)]
    pub prefetch: u32,
    /// Labels for routing constraints.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// One backend of the fleet.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum BackendConfig {
    /// A simulated backend (feature `simulated`).
    Simulated(SimulatedBackend),
    /// A ComfyUI server (feature `comfyui`).
    #[serde(rename = "comfyui")]
    ComfyUi(ComfyUiServer),
}

/// Engine settings as they appear in configuration (seconds).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    /// Start timeout in seconds (0: off).
    pub start_timeout_secs: f64,
    /// Node timeout in seconds (0: off).
    pub node_timeout_secs: f64,
    /// Backend queue-wait limit in seconds (0: off).
    pub queue_timeout_secs: f64,
    /// Cancel grace in seconds.
    pub cancel_grace_secs: f64,
    /// Lease length in seconds (a dead orchestrator's jobs are reclaimed after it).
    pub lease_ttl_secs: f64,
    /// Heartbeat interval in seconds (must be well under the lease).
    pub heartbeat_secs: f64,
    /// Reaper / maintenance interval in seconds.
    pub maintenance_secs: f64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        let d = EngineConfig::default();
        EngineSettings {
            start_timeout_secs: d.start_timeout.as_secs_f64(),
            node_timeout_secs: d.node_timeout.as_secs_f64(),
            queue_timeout_secs: d.queue_timeout.as_secs_f64(),
            cancel_grace_secs: d.cancel_grace.as_secs_f64(),
            lease_ttl_secs: d.lease_ttl.as_secs_f64(),
            heartbeat_secs: d.heartbeat_interval.as_secs_f64(),
            maintenance_secs: d.maintenance_interval.as_secs_f64(),
        }
    }
}

/// Shorthands for [`EngineSettings`].
#[derive(Debug)]
pub struct EngineSettingsBuilder;

impl EngineSettingsBuilder {
    /// Defaults with another start timeout (seconds).
    pub fn start_timeout(secs: f64) -> EngineSettings {
        EngineSettings {
            start_timeout_secs: secs,
            ..EngineSettings::default()
        }
    }
}

fn secs(field: &'static str, v: f64) -> Result<Duration, FleetError> {
    Duration::try_from_secs_f64(v).map_err(|_| FleetError::Backend {
        id: "engine".into(),
        reason: format!("{field} must be a non-negative number of seconds, got {v}"),
    })
}

/// The default store: SQLite at [`default_store_path`].
pub const DEFAULT_STORE: &str = "sqlite:";

/// Where the default SQLite database lives: `$COMFYFLEET_DATA_DIR/comfyfleet.db`, else
/// `$XDG_DATA_HOME/comfyfleet/comfyfleet.db`, else `~/.local/share/comfyfleet/comfyfleet.db`.
pub fn default_store_path() -> std::path::PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    let dir = env("COMFYFLEET_DATA_DIR")
        .or_else(|| env("XDG_DATA_HOME").map(|d| d.join("comfyfleet")))
        .or_else(|| env("HOME").map(|h| h.join(".local/share/comfyfleet")))
        .unwrap_or_else(|| std::path::PathBuf::from(".comfyfleet"));
    dir.join("comfyfleet.db")
}

/// The database file a store URL names (`sqlite:PATH`; `sqlite:` alone is the default path).
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    Some(if rest.is_empty() {
        default_store_path()
    } else {
        std::path::PathBuf::from(rest)
    })
}

/// Opens the store a URL names: `memory:`, or `sqlite:PATH` (feature `sqlite`; the directory is
/// created if missing). `postgres://` arrives with its store crate.
pub async fn open_store(url: &str) -> Result<Arc<dyn TaskStore>, FleetError> {
    let err = |reason: String| FleetError::Store {
        url: url.to_owned(),
        reason,
    };
    if url == "memory:" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    if let Some(path) = sqlite_path(url) {
        #[cfg(feature = "sqlite")]
        {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
            }
            let store = comfyfleet_store_sqlite::SqliteStore::open(&path)
                .await
                .map_err(|e| err(e.to_string()))?;
            return Ok(Arc::new(store));
        }
        #[cfg(not(feature = "sqlite"))]
        return Err(err(format!(
            "{} needs the `sqlite` feature",
            path.display()
        )));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Err(err(
            "this build has no PostgreSQL store yet; use sqlite:PATH or memory:".into(),
        ));
    }
    Err(err("unknown store; use sqlite:PATH or memory:".into()))
}

/// What a fleet is made of.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Where jobs are kept: `sqlite:PATH` (default `sqlite:`, at [`default_store_path`]) or
    /// `memory:`.
    pub store: String,
    /// The backends.
    pub backends: Vec<BackendConfig>,
    /// Engine settings.
    pub engine: EngineSettings,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            store: DEFAULT_STORE.into(),
            backends: Vec::new(),
            engine: EngineSettings::default(),
        }
    }
}

/// A running fleet: an engine over a store and backends.
pub struct Fleet {
    engine: Engine,
    simulated: Vec<(String, Arc<dyn Backend>)>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("engine", &self.engine)
            .field(
                "backends",
                &self.simulated.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Fleet {
    /// Builds the store and backends from `config` and starts the engine.
    pub async fn start(config: FleetConfig) -> Result<Fleet, FleetError> {
        let store = open_store(&config.store).await?;
        let mut backends: Vec<(String, Arc<dyn Backend>)> = Vec::new();
        for b in &config.backends {
            backends.push(build_backend(b)?);
        }
        let e = &config.engine;
        let engine_config = EngineConfig {
            start_timeout: secs("start_timeout_secs", e.start_timeout_secs)?,
            node_timeout: secs("node_timeout_secs", e.node_timeout_secs)?,
            queue_timeout: secs("queue_timeout_secs", e.queue_timeout_secs)?,
            cancel_grace: secs("cancel_grace_secs", e.cancel_grace_secs)?,
            lease_ttl: secs("lease_ttl_secs", e.lease_ttl_secs)?,
            heartbeat_interval: secs("heartbeat_secs", e.heartbeat_secs)?,
            maintenance_interval: secs("maintenance_secs", e.maintenance_secs)?,
            ..EngineConfig::default()
        };
        if engine_config.heartbeat_interval.is_zero()
            || engine_config.heartbeat_interval * 2 > engine_config.lease_ttl
            || engine_config.maintenance_interval.is_zero()
        {
            return Err(FleetError::Backend {
                id: "engine".into(),
                reason: "heartbeat_secs and maintenance_secs must be positive and heartbeat_secs at most half of lease_ttl_secs".into(),
            });
        }
        let mut builder = Engine::builder(store, Arc::new(SmartFailover::default()))
            .backends(backends.iter().map(|(_, b)| b.clone()))
            .config(engine_config);
        // Input files live next to a SQLite database, so accepted uploads survive restarts.
        if let Some(db) = sqlite_path(&config.store) {
            let dir = db
                .parent()
                .map(|d| d.join("inputs"))
                .unwrap_or_else(|| std::path::PathBuf::from("inputs"));
            let inputs = DirInputs::open(&dir).map_err(|e| FleetError::Store {
                url: config.store.clone(),
                reason: e.to_string(),
            })?;
            builder = builder.inputs(Arc::new(inputs));
        }
        let engine = builder.build()?;
        engine.start();
        Ok(Fleet {
            engine,
            simulated: backends,
        })
    }

    /// The engine: submit, cancel, subscribe, inspect.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The backends as built.
    pub fn backends(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.simulated.iter().map(|(_, b)| b)
    }

    /// Stops taking work and waits (up to 10 s) for running attempts; the rest are handed back
    /// for reattachment.
    pub async fn shutdown(&self) {
        self.engine.shutdown(Duration::from_secs(10)).await;
    }
}

fn build_backend(config: &BackendConfig) -> Result<(String, Arc<dyn Backend>), FleetError> {
    match config {
        #[cfg(feature = "simulated")]
        BackendConfig::Simulated(s) => {
            use comfyfleet_testkit::{FakeBackend, Fault};
            if s.id.trim().is_empty() {
                return Err(FleetError::Backend {
                    id: s.id.clone(),
                    reason: "id must not be empty".into(),
                });
            }
            if s.capacity == 0 {
                return Err(FleetError::Backend {
                    id: s.id.clone(),
                    reason: "capacity must be at least 1".into(),
                });
            }
            let node =
                Duration::try_from_secs_f64(s.node_seconds).map_err(|_| FleetError::Backend {
                    id: s.id.clone(),
                    reason: format!("node_seconds must be non-negative, got {}", s.node_seconds),
                })?;
            let mut b = FakeBackend::builder(&s.id)
                .capacity(s.capacity)
                .node_duration(node)
                .ticks(20)
                .faults((0..s.hang_first).map(|_| Fault::HangBeforeStart));
            if let Some(classes) = &s.node_classes {
                b = b.node_classes(classes.iter().cloned());
            }
            let backend: Arc<dyn Backend> = b.build();
            Ok((s.id.clone(), backend))
        }
        #[cfg(not(feature = "simulated"))]
        BackendConfig::Simulated(s) => Err(FleetError::Backend {
            id: s.id.clone(),
            reason: "simulated backends need the `simulated` feature".into(),
        }),
        #[cfg(feature = "comfyui")]
        BackendConfig::ComfyUi(c) => {
            let bad = |reason: String| FleetError::Backend {
                id: c.id.clone(),
                reason,
            };
            if c.id.trim().is_empty() {
                return Err(bad("id must not be empty".into()));
            }
            let url = url::Url::parse(&c.url).map_err(|e| bad(format!("url {:?}: {e}", c.url)))?;
            let mut config = comfyfleet_comfyui::ComfyUiConfig::new(&c.id, url);
            config.prefetch = c.prefetch;
            config.labels = c.labels.clone();
            let backend =
                comfyfleet_comfyui::ComfyUiBackend::new(config).map_err(|e| bad(e.to_string()))?;
            Ok((c.id.clone(), Arc::new(backend) as Arc<dyn Backend>))
        }
        #[cfg(not(feature = "comfyui"))]
        BackendConfig::ComfyUi(c) => Err(FleetError::Backend {
            id: c.id.clone(),
            reason: "ComfyUI backends need the `comfyui` feature".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests never touch the user's data directory.
    fn mem() -> FleetConfig {
        FleetConfig {
            store: "memory:".into(),
            ..FleetConfig::default()
        }
    }

    #[tokio::test]
    async fn bad_configs_get_clear_errors() {
        let err = Fleet::start(FleetConfig {
            store: "postgres://db/x".into(),
            ..mem()
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("no PostgreSQL store yet"), "{err}");
        let err = Fleet::start(FleetConfig {
            store: "sqlite:/proc/nope/x.db".into(),
            ..mem()
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("/proc/nope"), "{err}");
        let err = Fleet::start(FleetConfig {
            store: "redis://x".into(),
            ..mem()
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("unknown store"), "{err}");
        let mut zero = SimulatedBackend::named("gpu-1");
        zero.capacity = 0;
        let err = Fleet::start(FleetConfig {
            backends: vec![BackendConfig::Simulated(zero)],
            ..mem()
        })
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("capacity must be at least 1"),
            "{err}"
        );
        let dup = vec![
            BackendConfig::Simulated(SimulatedBackend::named("gpu-1")),
            BackendConfig::Simulated(SimulatedBackend::named("gpu-1")),
        ];
        let err = Fleet::start(FleetConfig {
            backends: dup,
            ..mem()
        })
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("two backends are named gpu-1"),
            "{err}"
        );
        let mut neg = mem();
        neg.engine.start_timeout_secs = -1.0;
        assert!(
            Fleet::start(neg)
                .await
                .unwrap_err()
                .to_string()
                .contains("start_timeout_secs")
        );
    }

    #[tokio::test]
    async fn comfyui_entries_are_checked() {
        let c: FleetConfig = serde_json::from_str(
            r#"{"store": "memory:", "backends": [{"kind": "comfyui", "id": "gpu-1", "url": "ftp://x"}]}"#,
        )
        .unwrap();
        let err = Fleet::start(c).await.unwrap_err();
        assert!(
            err.to_string().contains("base URL must be http or https"),
            "{err}"
        );
        let c: FleetConfig = serde_json::from_str(
            r#"{"store": "memory:", "backends": [{"kind": "comfyui", "id": "gpu-1", "url": "not a url"}]}"#,
        )
        .unwrap();
        assert!(
            Fleet::start(c)
                .await
                .unwrap_err()
                .to_string()
                .contains("url \"not a url\"")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sqlite_store_url_opens_and_keeps_jobs() {
        let dir = std::env::temp_dir().join(format!("comfyfleet-facade-{}", JobId::new()));
        let url = format!("sqlite:{}", dir.join("sub/fleet.db").display());
        let store = open_store(&url).await.unwrap();
        let id = store
            .enqueue(
                comfyfleet_core::NewJob::new(JobSpec::new(
                    Workflow::from_json(r#"{"1":{"class_type":"A"}}"#).unwrap(),
                )),
                comfyfleet_core::Timestamp::EPOCH,
            )
            .await
            .unwrap()
            .id;
        drop(store);
        let again = open_store(&url).await.unwrap();
        assert!(again.get(id).await.unwrap().is_some(), "kept across reopen");
        std::fs::remove_dir_all(dir).ok();
        assert_eq!(sqlite_path("sqlite:"), Some(default_store_path()));
        assert_eq!(
            sqlite_path("sqlite:///var/x.db"),
            Some(std::path::PathBuf::from("/var/x.db"))
        );
    }

    #[test]
    fn config_parses_from_json_and_rejects_unknown_fields() {
        let c: FleetConfig = serde_json::from_str(
            r#"{"backends": [{"kind": "simulated", "id": "gpu-1", "capacity": 2}], "engine": {"start_timeout_secs": 3}}"#,
        )
        .unwrap();
        assert_eq!(c.backends.len(), 1);
        assert_eq!(c.engine.start_timeout_secs, 3.0);
        assert!(serde_json::from_str::<FleetConfig>(r#"{"backendz": []}"#).is_err());
    }
}
