//! # comfyfleet
//!
//! Run ComfyUI workflows reliably on a fleet of heterogeneous backends. This facade turns a
//! [`FleetConfig`] into a running [`Fleet`] and re-exports the crates underneath:
//!
//! * [`core`] — vocabulary and the `Backend`, `FailoverStrategy`, `TaskStore` traits;
//! * [`engine`] — the scheduler and the default `SmartFailover` strategy;
//! * [`testkit`] (feature `simulated`, on by default) — simulated backends and conformance suites.
//!
//! Backends by feature: `comfyui` (self-hosted ComfyUI servers, [`ComfyUiServer`]),
//! `runninghub` (RunningHub cloud accounts, [`RunningHubAccount`]), `simulated`
//! ([`SimulatedBackend`]); all on by default.
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
#[cfg(feature = "ssh")]
mod ssh;
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

#[cfg(feature = "ssh")]
pub use comfyfleet_ssh as ssh_client;
#[cfg(feature = "ssh")]
pub use comfyfleet_ssh::installer::{InstallError, Registry, SshInstaller};
#[cfg(feature = "ssh")]
pub use ssh::SshInstance;

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

/// The public RunningHub host, the default [`RunningHubAccount::base_url`].
pub const RUNNINGHUB_BASE_URL: &str = "https://www.runninghub.cn";

/// One RunningHub account (API key) as a backend (feature `runninghub`; see
/// `docs/backends/runninghub.md`).
///
/// The key comes from the environment variable named by `api_key_env` (read when the fleet
/// starts; preferred) or from `api_key` in the configuration. It is a [`SecretString`]: it
/// appears in no `Debug` output, error or log line.
///
/// [`SecretString`]: secrecy::SecretString
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningHubAccount {
    /// Its id in the fleet.
    pub id: String,
    /// The API host (default `https://www.runninghub.cn`; `https://www.runninghub.ai`, or a
    /// simulator).
    #[serde(default = "runninghub_base_url")]
    pub base_url: String,
    /// The API key itself. Prefer [`RunningHubAccount::api_key_env`].
    #[serde(default)]
    pub api_key: Option<secrecy::SecretString>,
    /// The name of an environment variable holding the API key, e.g. `RUNNINGHUB_API_KEY`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// `instanceType` sent with each task (e.g. `"plus"`); default: RunningHub's.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// `usePersonalQueue` sent with each task.
    #[serde(default)]
    pub use_personal_queue: bool,
    /// Most tasks of ours at once (the key's concurrency limit). Default 1.
    #[serde(default = "one")]
    pub max_concurrent: u32,
    /// The hosted workflow id used for full API-format workflows (jobs without a
    /// `RunningHubWorkflow` / `RunningHubAiApp` marker node). Without it only jobs that name a
    /// hosted workflow or AI app run here.
    #[serde(default)]
    pub default_workflow_id: Option<String>,
    /// First interval between status checks, in seconds (the first check runs right after
    /// create). Default 1.
    #[serde(default)]
    pub poll_min_secs: Option<f64>,
    /// Longest interval between status checks, in seconds. Default 5.
    #[serde(default)]
    pub poll_max_secs: Option<f64>,
    /// Warn when a task stays in one state this long, in seconds. Default 120.
    #[serde(default)]
    pub stuck_after_secs: Option<f64>,
    /// Connect to the task socket (`netWssUrl`) as an accelerator; polling runs regardless.
    /// Default true.
    #[serde(default = "yes")]
    pub use_websocket: bool,
    /// Labels for routing constraints.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn runninghub_base_url() -> String {
    RUNNINGHUB_BASE_URL.to_owned()
}

fn yes() -> bool {
    true
}

impl RunningHubAccount {
    /// An account at the public host whose key is in the environment variable `api_key_env`.
    pub fn from_env(id: &str, api_key_env: &str) -> Self {
        RunningHubAccount {
            id: id.to_owned(),
            base_url: runninghub_base_url(),
            api_key: None,
            api_key_env: Some(api_key_env.to_owned()),
            instance_type: None,
            use_personal_queue: false,
            max_concurrent: 1,
            default_workflow_id: None,
            poll_min_secs: None,
            poll_max_secs: None,
            stuck_after_secs: None,
            use_websocket: true,
            labels: std::collections::BTreeMap::new(),
        }
    }

    /// The API key: from `api_key_env` (looked up with `lookup`) or `api_key`. Errors name the
    /// variable, never the key.
    #[cfg_attr(not(feature = "runninghub"), allow(dead_code))]
    fn resolve_key(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<secrecy::SecretString, String> {
        use secrecy::ExposeSecret;
        match (&self.api_key, &self.api_key_env) {
            (Some(_), Some(var)) => Err(format!(
                "give api_key or api_key_env, not both (api_key_env = {var:?})"
            )),
            (None, None) => Err(
                "needs api_key_env (the name of an environment variable holding the API key, e.g. \"RUNNINGHUB_API_KEY\") or api_key".into(),
            ),
            (Some(key), None) => {
                let k = key.expose_secret().trim();
                if k.is_empty() {
                    Err("api_key is empty".into())
                } else {
                    Ok(secrecy::SecretString::from(k.to_owned()))
                }
            }
            (None, Some(var)) => {
                if var.trim().is_empty() {
                    return Err("api_key_env must name an environment variable".into());
                }
                match lookup(var) {
                    Some(v) if !v.trim().is_empty() => {
                        Ok(secrecy::SecretString::from(v.trim().to_owned()))
                    }
                    Some(_) => Err(format!(
                        "the environment variable {var} (api_key_env) is empty; set it to the RunningHub API key"
                    )),
                    None => Err(format!(
                        "the environment variable {var} (api_key_env) is not set; set it to the RunningHub API key"
                    )),
                }
            }
        }
    }
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
    /// A RunningHub account (feature `runninghub`).
    #[serde(rename = "runninghub")]
    RunningHub(RunningHubAccount),
    /// A remote GPU instance over SSH (feature `ssh`).
    #[cfg(feature = "ssh")]
    Ssh(SshInstance),
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
    /// Several orchestrator processes share the store: backend capacity is counted in the
    /// store across all of them, blocks and open circuits are shared. Default: on for
    /// `postgres://` stores, off otherwise (set it for several workers on one SQLite file).
    pub shared_store: Option<bool>,
    /// The engine's name in leases and logs (default: `engine-<uuid>`; unique per process).
    pub owner: Option<String>,
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
            shared_store: None,
            owner: None,
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

/// A store URL fit for errors and logs: a password (and the query string, which may carry
/// one) hidden.
pub fn redact_store_url(url: &str) -> String {
    comfyfleet_core::install::redact_url(url)
}

/// What [`open_store_set`] opens: jobs, installs, and the input files when the store holds
/// them (`None`: the fleet keeps them beside the store or in memory).
pub type StoreSet = (
    Arc<dyn TaskStore>,
    Arc<dyn comfyfleet_core::InstallStore>,
    Option<Arc<dyn comfyfleet_core::InputStore>>,
);

/// Whether a store URL names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Opens the store a URL names: `memory:`, `sqlite:PATH` (feature `sqlite`; the directory is
/// created if missing) or `postgres://…` (feature `postgres`; migrated on open).
pub async fn open_store(url: &str) -> Result<Arc<dyn TaskStore>, FleetError> {
    Ok(open_stores(url).await?.0)
}

/// [`open_store`], plus the same store as an [`InstallStore`](comfyfleet_core::InstallStore).
pub async fn open_stores(
    url: &str,
) -> Result<(Arc<dyn TaskStore>, Arc<dyn comfyfleet_core::InstallStore>), FleetError> {
    let (tasks, installs, _) = open_store_set(url).await?;
    Ok((tasks, installs))
}

/// The job store, install store and — where the store keeps them itself (PostgreSQL) — the
/// input-file store a URL names. See [`open_store`].
pub async fn open_store_set(url: &str) -> Result<StoreSet, FleetError> {
    let err = |reason: String| FleetError::Store {
        url: redact_store_url(url),
        reason,
    };
    if url == "memory:" {
        let store = Arc::new(MemoryStore::new());
        return Ok((store.clone(), store, None));
    }
    if let Some(path) = sqlite_path(url) {
        #[cfg(feature = "sqlite")]
        {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
            }
            let store = Arc::new(
                comfyfleet_store_sqlite::SqliteStore::open(&path)
                    .await
                    .map_err(|e| err(e.to_string()))?,
            );
            return Ok((store.clone(), store, None));
        }
        #[cfg(not(feature = "sqlite"))]
        return Err(err(format!(
            "{} needs the `sqlite` feature",
            path.display()
        )));
    }
    if is_postgres(url) {
        #[cfg(feature = "postgres")]
        {
            // The store's errors name the database with its password redacted; `err` would
            // repeat the URL as given, so say only where.
            let store = Arc::new(
                comfyfleet_store_postgres::PostgresStore::connect(url)
                    .await
                    .map_err(|e| FleetError::Store {
                        url: redact_store_url(url),
                        reason: e.to_string(),
                    })?,
            );
            return Ok((store.clone(), store.clone(), Some(store)));
        }
        #[cfg(not(feature = "postgres"))]
        return Err(err("postgres:// needs the `postgres` feature".into()));
    }
    Err(err(
        "unknown store; use sqlite:PATH, postgres://USER@HOST/DB or memory:".into(),
    ))
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
    /// Send jobs to cloud backends (label `tier = "cloud"`; RunningHub backends have it unless
    /// their labels say otherwise) only when the owned GPUs' expected wait is long. `None`
    /// (default): every backend is used alike.
    pub spill_over: Option<SpillOverSettings>,
    /// A registry file for custom-node installs by name (`{"packs": {name: {git, rev,
    /// classes}}}`; see `docs/backends/ssh.md`).
    pub install_registry: Option<std::path::PathBuf>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            store: DEFAULT_STORE.into(),
            backends: Vec::new(),
            engine: EngineSettings::default(),
            spill_over: None,
            install_registry: None,
        }
    }
}

/// `[spill_over]`: when jobs may go to the cloud (see `comfyfleet_engine::SpillOver`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpillOverSettings {
    /// Expected local wait (seconds) above which a job may go to the cloud.
    pub threshold_secs: f64,
    /// Most jobs on cloud backends at once (all cloud backends together).
    pub max_cloud_in_flight: u32,
    /// Keep work off the cloud when the account's balance (coins or money) is below this.
    #[serde(default)]
    pub min_budget: Option<f64>,
    /// Run time assumed for a workflow before one is learned (seconds, default 60).
    #[serde(default = "sixty")]
    pub default_duration_secs: f64,
}

fn sixty() -> f64 {
    60.0
}

impl SpillOverSettings {
    fn to_engine(&self) -> Result<comfyfleet_engine::SpillOver, FleetError> {
        Ok(comfyfleet_engine::SpillOver {
            threshold: secs("spill_over.threshold_secs", self.threshold_secs)?,
            max_cloud_in_flight: self.max_cloud_in_flight,
            min_budget: self.min_budget,
            default_duration: secs(
                "spill_over.default_duration_secs",
                self.default_duration_secs,
            )?,
        })
    }
}

#[cfg(feature = "ssh")]
fn load_registry(config: &FleetConfig) -> Result<Registry, FleetError> {
    match &config.install_registry {
        Some(path) => Registry::from_file(path).map_err(|e| FleetError::Backend {
            id: "install_registry".into(),
            reason: e.to_string(),
        }),
        None => Ok(Registry::default()),
    }
}

/// Only the custom-node installer of `config` (no engine, no job processing, no resuming of
/// other processes' installs), for short-lived tools such as `comfyfleet install-nodes`: it
/// starts, follows and cancels installs in the configured store. `None` when the configuration
/// has no SSH instances.
#[cfg(feature = "ssh")]
pub async fn start_installer(config: &FleetConfig) -> Result<Option<SshInstaller>, FleetError> {
    let (_, install_store) = open_stores(&config.store).await?;
    let mut b = SshInstaller::builder(install_store).registry(load_registry(config)?);
    let mut any = false;
    for backend in &config.backends {
        if let BackendConfig::Ssh(s) = backend {
            let built = s.build(&|var| std::env::var(var).ok()).await?;
            b = b.instance(built.instance, built.session);
            any = true;
        }
    }
    Ok(any.then(|| b.build()))
}

/// A running fleet: an engine over a store and backends.
pub struct Fleet {
    engine: Engine,
    simulated: Vec<(String, Arc<dyn Backend>)>,
    #[cfg(feature = "ssh")]
    installer: Option<SshInstaller>,
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
        #[cfg_attr(not(feature = "ssh"), allow(unused_variables))]
        let (store, install_store, store_inputs) = open_store_set(&config.store).await?;
        let mut backends: Vec<(String, Arc<dyn Backend>)> = Vec::new();
        #[cfg(feature = "ssh")]
        let mut instances = Vec::new();
        for b in &config.backends {
            #[cfg(feature = "ssh")]
            if let BackendConfig::Ssh(s) = b {
                let built = s.build(&|var| std::env::var(var).ok()).await?;
                backends.push((s.id.clone(), Arc::new(built.backend) as Arc<dyn Backend>));
                instances.push((built.instance, built.session));
                continue;
            }
            backends.push(build_backend(b)?);
        }
        #[cfg(not(feature = "ssh"))]
        if config.install_registry.is_some() {
            return Err(FleetError::Backend {
                id: "install_registry".into(),
                reason: "installs need the `ssh` feature".into(),
            });
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
            shared_store: e.shared_store.unwrap_or_else(|| is_postgres(&config.store)),
            owner: e
                .owner
                .clone()
                .unwrap_or_else(|| EngineConfig::default().owner),
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
        let strategy = SmartFailover::new(SmartFailoverConfig {
            spill_over: config
                .spill_over
                .as_ref()
                .map(SpillOverSettings::to_engine)
                .transpose()?,
            ..SmartFailoverConfig::default()
        });
        let mut builder = Engine::builder(store, Arc::new(strategy))
            .backends(backends.iter().map(|(_, b)| b.clone()))
            .config(engine_config);
        // Input files live next to a SQLite database, so accepted uploads survive restarts; a
        // PostgreSQL store keeps them itself, for every process.
        if let Some(inputs) = store_inputs {
            builder = builder.inputs(inputs);
        } else if let Some(db) = sqlite_path(&config.store) {
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
        #[cfg(feature = "ssh")]
        let installer = if instances.is_empty() {
            None
        } else {
            let refresh = engine.clone();
            let mut b = SshInstaller::builder(install_store)
                .registry(load_registry(&config)?)
                // New packs change what the instance can run: refresh the catalogues now, so
                // missing-node routing sees them without waiting for the next interval.
                .on_installed(move |_instance| {
                    let engine = refresh.clone();
                    tokio::spawn(async move { engine.refresh_inventories().await });
                });
            for (instance, session) in instances {
                b = b.instance(instance, session);
            }
            let installer = b.build();
            // Installs an earlier run left unfinished continue (and end in their true state).
            if let Err(e) = installer.recover().await {
                tracing::warn!(error = %e, "resuming unfinished installs failed");
            }
            Some(installer)
        };
        Ok(Fleet {
            engine,
            simulated: backends,
            #[cfg(feature = "ssh")]
            installer,
        })
    }

    /// The engine: submit, cancel, subscribe, inspect.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The custom-node installer, when the fleet has SSH instances (feature `ssh`).
    #[cfg(feature = "ssh")]
    pub fn installer(&self) -> Option<&SshInstaller> {
        self.installer.as_ref()
    }

    /// The backends as built.
    pub fn backends(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.simulated.iter().map(|(_, b)| b)
    }

    /// Stops taking work and waits (up to 10 s) for running attempts; the rest are handed back
    /// for reattachment.
    pub async fn shutdown(&self) {
        // Installs stay `running` in the store and resume at the next start.
        #[cfg(feature = "ssh")]
        if let Some(i) = &self.installer {
            i.shutdown();
        }
        self.engine.shutdown(Duration::from_secs(10)).await;
    }
}

fn build_backend(config: &BackendConfig) -> Result<(String, Arc<dyn Backend>), FleetError> {
    match config {
        // Built by `Fleet::start` (it needs to bind a port).
        #[cfg(feature = "ssh")]
        BackendConfig::Ssh(s) => Err(FleetError::Backend {
            id: s.id.clone(),
            reason: "SSH instances are built by Fleet::start".into(),
        }),
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
        #[cfg(feature = "runninghub")]
        BackendConfig::RunningHub(r) => {
            let backend =
                comfyfleet_runninghub::RunningHubBackend::new(runninghub_config(r, |var| {
                    std::env::var(var).ok()
                })?)
                .map_err(|e| FleetError::Backend {
                    id: r.id.clone(),
                    reason: e.to_string(),
                })?;
            Ok((r.id.clone(), Arc::new(backend) as Arc<dyn Backend>))
        }
        #[cfg(not(feature = "runninghub"))]
        BackendConfig::RunningHub(r) => Err(FleetError::Backend {
            id: r.id.clone(),
            reason: "RunningHub backends need the `runninghub` feature".into(),
        }),
    }
}

/// The backend's settings from a configuration entry, the key read with `lookup`.
#[cfg(feature = "runninghub")]
fn runninghub_config(
    r: &RunningHubAccount,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<comfyfleet_runninghub::RunningHubConfig, FleetError> {
    let bad = |reason: String| FleetError::Backend {
        id: r.id.clone(),
        reason,
    };
    if r.id.trim().is_empty() {
        return Err(bad("id must not be empty".into()));
    }
    if r.max_concurrent == 0 {
        return Err(bad("max_concurrent must be at least 1".into()));
    }
    let url =
        url::Url::parse(&r.base_url).map_err(|e| bad(format!("base_url {:?}: {e}", r.base_url)))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad(format!(
            "base_url {:?}: must be an http or https URL",
            r.base_url
        )));
    }
    let key = r.resolve_key(lookup).map_err(bad)?;
    let international = url.host_str().is_some_and(|h| h.ends_with("runninghub.ai"));
    let positive = |field: &str, v: Option<f64>| -> Result<Option<Duration>, FleetError> {
        match v {
            None => Ok(None),
            Some(s) => match Duration::try_from_secs_f64(s) {
                Ok(d) if !d.is_zero() => Ok(Some(d)),
                _ => Err(bad(format!(
                    "{field} must be a positive number of seconds, got {s}"
                ))),
            },
        }
    };
    let mut config = comfyfleet_runninghub::RunningHubConfig::new(&r.id, url, key);
    config.client.instance_type = r
        .instance_type
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    config.client.use_personal_queue = r.use_personal_queue;
    config.max_concurrent = r.max_concurrent;
    config.default_workflow_id = match r.default_workflow_id.as_deref().map(str::trim) {
        Some("") => return Err(bad("default_workflow_id must not be empty".into())),
        other => other.map(str::to_owned),
    };
    if let Some(d) = positive("poll_min_secs", r.poll_min_secs)? {
        config.poll_min = d;
    }
    if let Some(d) = positive("poll_max_secs", r.poll_max_secs)? {
        config.poll_max = d;
    }
    if config.poll_min > config.poll_max {
        return Err(bad(format!(
            "poll_min_secs ({}) must not exceed poll_max_secs ({})",
            config.poll_min.as_secs_f64(),
            config.poll_max.as_secs_f64()
        )));
    }
    if let Some(d) = positive("stuck_after_secs", r.stuck_after_secs)? {
        config.stuck_after = d;
    }
    config.use_websocket = r.use_websocket;
    if international {
        config.task_page_base = "https://www.runninghub.ai/task/detail/".into();
    }
    config.labels = r.labels.clone();
    // A paid cloud account: spill-over (when configured) uses it only when local waits are long.
    config
        .labels
        .entry("tier".to_owned())
        .or_insert_with(|| comfyfleet_engine::CLOUD_TIER.to_owned());
    Ok(config)
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
    async fn spill_over_settings_parse_and_reach_the_strategy() {
        let c: FleetConfig = serde_json::from_value(serde_json::json!({
            "store": "memory:",
            "spill_over": {"threshold_secs": 120, "max_cloud_in_flight": 4, "min_budget": 50}
        }))
        .unwrap();
        let s = c.spill_over.as_ref().unwrap();
        assert_eq!(s.default_duration_secs, 60.0);
        let e = s.to_engine().unwrap();
        assert_eq!(e.threshold, Duration::from_secs(120));
        assert_eq!(e.max_cloud_in_flight, 4);
        assert_eq!(e.min_budget, Some(50.0));
        assert!(Fleet::start(c).await.is_ok());
        let bad: Result<FleetConfig, _> = serde_json::from_value(serde_json::json!({
            "spill_over": {"threshold_secs": 1, "max_cloud_in_flight": 1, "treshold": 2}
        }));
        assert!(bad.unwrap_err().to_string().contains("treshold"));
        let neg = FleetConfig {
            spill_over: Some(SpillOverSettings {
                threshold_secs: -1.0,
                max_cloud_in_flight: 1,
                min_budget: None,
                default_duration_secs: 60.0,
            }),
            ..mem()
        };
        let err = Fleet::start(neg).await.unwrap_err();
        assert!(err.to_string().contains("threshold_secs"), "{err}");
    }

    #[tokio::test]
    async fn bad_configs_get_clear_errors() {
        // Nothing listens on port 1: a quick, clear refusal that never shows the password.
        let err = Fleet::start(FleetConfig {
            store: "postgres://fleet:hunter2@127.0.0.1:1/x".into(),
            ..mem()
        })
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cannot connect to PostgreSQL"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
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

    #[cfg(feature = "runninghub")]
    fn toml(text: &str) -> Result<FleetConfig, String> {
        use figment::providers::Format;
        figment::Figment::from(figment::providers::Toml::string(text))
            .extract()
            .map_err(|e| e.to_string())
    }

    #[cfg(feature = "runninghub")]
    #[test]
    fn runninghub_entries_parse_from_toml() {
        let c = toml(
            r#"
            store = "memory:"

            [[backends]]
            kind = "runninghub"
            id = "rh-1"
            api_key_env = "RUNNINGHUB_API_KEY"
            instance_type = "plus"
            use_personal_queue = true
            max_concurrent = 3
            default_workflow_id = "1987654321"
            poll_min_secs = 0.5
            poll_max_secs = 4
            labels = { cloud = "runninghub" }

            [[backends]]
            kind = "runninghub"
            id = "rh-2"
            base_url = "https://www.runninghub.ai"
            api_key = "sk-inline"
            "#,
        )
        .unwrap();
        let [BackendConfig::RunningHub(a), BackendConfig::RunningHub(b)] = &c.backends[..] else {
            panic!("{:?}", c.backends);
        };
        assert_eq!(a.id, "rh-1");
        assert_eq!(a.base_url, RUNNINGHUB_BASE_URL);
        assert_eq!(RUNNINGHUB_BASE_URL, comfyfleet_runninghub::DEFAULT_BASE_URL);
        assert_eq!(a.api_key_env.as_deref(), Some("RUNNINGHUB_API_KEY"));
        assert!(a.api_key.is_none());
        assert_eq!(a.instance_type.as_deref(), Some("plus"));
        assert!(a.use_personal_queue);
        assert_eq!(a.max_concurrent, 3);
        assert_eq!(a.default_workflow_id.as_deref(), Some("1987654321"));
        assert_eq!(a.labels["cloud"], "runninghub");
        assert!(a.use_websocket);
        let cfg =
            runninghub_config(a, |v| (v == "RUNNINGHUB_API_KEY").then(|| "k".into())).unwrap();
        assert_eq!(cfg.max_concurrent, 3);
        assert_eq!(cfg.poll_min, Duration::from_millis(500));
        assert_eq!(cfg.poll_max, Duration::from_secs(4));
        assert_eq!(cfg.client.instance_type.as_deref(), Some("plus"));
        assert!(cfg.client.use_personal_queue);
        assert_eq!(cfg.default_workflow_id.as_deref(), Some("1987654321"));
        assert_eq!(
            cfg.task_page("1"),
            "https://www.runninghub.cn/task/detail/1"
        );
        assert_eq!(b.base_url, "https://www.runninghub.ai");
        assert_eq!(b.max_concurrent, 1);
        let cfg = runninghub_config(b, |_| None).unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&cfg.client.api_key),
            "sk-inline"
        );
        assert!(cfg.task_page("1").starts_with("https://www.runninghub.ai/"));
        // Typos are errors, not defaults.
        let e = toml("[[backends]]\nkind = \"runninghub\"\nid = \"x\"\napi_key_var = \"K\"\n")
            .unwrap_err();
        assert!(e.contains("api_key_var"), "{e}");
    }

    #[cfg(feature = "runninghub")]
    #[tokio::test]
    async fn a_missing_runninghub_key_is_a_clear_error() {
        let account = RunningHubAccount::from_env("rh-1", "RUNNINGHUB_API_KEY");
        let e = runninghub_config(&account, |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rh-1") && e.contains("RUNNINGHUB_API_KEY") && e.contains("not set"),
            "{e}"
        );
        let e = runninghub_config(&account, |_| Some("  \n".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("RUNNINGHUB_API_KEY") && e.contains("empty"),
            "{e}"
        );
        let cfg = runninghub_config(&account, |_| Some(" sk-1\n".into())).unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&cfg.client.api_key),
            "sk-1"
        );
        // Through `Fleet::start`, with the real environment (a variable nobody sets).
        let var = format!("COMFYFLEET_TEST_UNSET_{}", JobId::new()).replace('-', "_");
        let e = Fleet::start(FleetConfig {
            backends: vec![BackendConfig::RunningHub(RunningHubAccount::from_env(
                "rh-1", &var,
            ))],
            ..mem()
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains(&var) && e.contains("not set"), "{e}");
        let mut neither = account.clone();
        neither.api_key_env = None;
        let e = runninghub_config(&neither, |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("api_key_env"), "{e}");
        let mut both = account.clone();
        both.api_key = Some("sk-both".into());
        let e = runninghub_config(&both, |_| Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not both") && !e.contains("sk-both"), "{e}");
        let mut bad = account.clone();
        bad.base_url = "ftp://example.com".into();
        let e = runninghub_config(&bad, |_| Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("http or https"), "{e}");
        let mut bad = account.clone();
        bad.max_concurrent = 0;
        let e = runninghub_config(&bad, |_| Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_concurrent"), "{e}");
        let mut bad = account;
        bad.poll_min_secs = Some(10.0);
        let e = runninghub_config(&bad, |_| Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("poll_min_secs"), "{e}");
    }

    #[cfg(feature = "runninghub")]
    #[test]
    fn the_runninghub_key_never_shows_in_debug() {
        let secret = "sk-very-secret-4242";
        let c = toml(&format!(
            "[[backends]]\nkind = \"runninghub\"\nid = \"rh-1\"\napi_key = \"{secret}\"\n"
        ))
        .unwrap();
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains(secret), "{shown}");
        let BackendConfig::RunningHub(a) = &c.backends[0] else {
            panic!()
        };
        let cfg = runninghub_config(a, |_| None).unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains(secret), "{shown}");
        let backend = comfyfleet_runninghub::RunningHubBackend::new(cfg).unwrap();
        let shown = format!("{backend:?}");
        assert!(!shown.contains(secret), "{shown}");
        // A key from the environment is no different.
        let env = RunningHubAccount::from_env("rh-2", "K");
        let cfg = runninghub_config(&env, |_| Some(secret.into())).unwrap();
        assert!(!format!("{cfg:?} {env:?}").contains(secret));
    }

    /// A real mixed fleet: a ComfyUI server (simulator over HTTP/WS) and a RunningHub account
    /// (simulator), with spill-over. A hosted-workflow job runs only on RunningHub; a plain job
    /// goes to the idle owned GPU first, and when that server accepts and hangs, the job fails
    /// over to the cloud and keeps its id.
    #[cfg(all(feature = "runninghub", feature = "comfyui", feature = "simulated"))]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mixed_fleet_fails_over_from_a_hung_comfyui_to_runninghub() {
        use comfyfleet_testkit::runninghub_sim::{
            DEFAULT_API_KEY, RunningHubSim, RunningHubSimConfig,
        };
        use comfyfleet_testkit::{ComfyUiSim, SimConfig};
        let rh = RunningHubSim::start(RunningHubSimConfig::scaled(0.01))
            .await
            .unwrap();
        let gpu = ComfyUiSim::start(SimConfig::scaled(0.05)).await.unwrap();
        let c = toml(&format!(
            "store = \"memory:\"\n\
             [engine]\nstart_timeout_secs = 1.0\n\
             [[backends]]\nkind = \"comfyui\"\nid = \"gpu\"\nurl = \"{}\"\n\
             [[backends]]\nkind = \"runninghub\"\nid = \"cloud\"\nbase_url = \"{}\"\napi_key = \"{DEFAULT_API_KEY}\"\n\
             default_workflow_id = \"plain\"\npoll_min_secs = 0.05\npoll_max_secs = 0.2\n\
             [spill_over]\nthreshold_secs = 5\nmax_cloud_in_flight = 2\n",
            gpu.base_url(),
            rh.base_url()
        ))
        .unwrap();
        let fleet = Fleet::start(c).await.unwrap();
        fleet.engine().refresh_inventories().await;
        let engine = fleet.engine().clone();
        let wait = |id| {
            let engine = engine.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(60), engine.wait_for(id))
                    .await
                    .expect("the job ends")
                    .unwrap()
            }
        };
        // Hosted workflow: only the cloud has the marker class.
        let hosted = Workflow::from_json(
            r#"{"rh": {"class_type": "RunningHubWorkflow", "inputs": {"workflow_id": "w-1"}},
                "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}}}"#,
        )
        .unwrap();
        let job = wait(fleet.engine().submit(JobSpec::new(hosted)).await.unwrap()).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        let backends: Vec<&str> = job.attempts.iter().map(|a| a.backend.as_str()).collect();
        assert_eq!(backends, ["cloud"]);
        // A plain job on a hung owned GPU: start timeout there, then the cloud, one id.
        gpu.faults().set_hang_after_accept(true);
        let plain = fleet
            .engine()
            .submit(
                JobSpec::new(comfyfleet_testkit::workflows::invert())
                    .only_on([BackendId::new("gpu"), BackendId::new("cloud")]),
            )
            .await
            .unwrap();
        let job = wait(plain).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        assert_eq!(job.id, plain);
        // Spill-over prefers the idle owned GPU; once it is blocked for this workflow (60 s)
        // the expected local wait exceeds the 5 s threshold and the cloud takes the job.
        let backends: Vec<&str> = job.attempts.iter().map(|a| a.backend.as_str()).collect();
        assert_eq!(backends, ["gpu", "cloud"]);
        assert!(rh.tasks().iter().any(|t| t.workflow_id == "plain"));
        fleet.shutdown().await;
        gpu.shutdown().await;
        rh.shutdown().await;
    }

    /// A fleet with a RunningHub account runs a hosted-workflow job on the simulator.
    #[cfg(all(feature = "runninghub", feature = "simulated"))]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runninghub_account_runs_a_hosted_workflow_on_the_simulator() {
        use comfyfleet_testkit::runninghub_sim::{
            DEFAULT_API_KEY, RunningHubSim, RunningHubSimConfig,
        };
        let sim = RunningHubSim::start(RunningHubSimConfig::scaled(0.01))
            .await
            .unwrap();
        let c = toml(&format!(
            "store = \"memory:\"\n[[backends]]\nkind = \"runninghub\"\nid = \"rh-1\"\nbase_url = \"{}\"\napi_key = \"{DEFAULT_API_KEY}\"\npoll_min_secs = 0.05\npoll_max_secs = 0.2\n",
            sim.base_url()
        ))
        .unwrap();
        let fleet = Fleet::start(c).await.unwrap();
        let wf = Workflow::from_json(
            r#"{"rh": {"class_type": "RunningHubWorkflow", "inputs": {"workflow_id": "1987654321"}},
                "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}}}"#,
        )
        .unwrap();
        let id = fleet.engine().submit(JobSpec::new(wf)).await.unwrap();
        let job = tokio::time::timeout(Duration::from_secs(60), fleet.engine().wait_for(id))
            .await
            .expect("the job ends")
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        assert_eq!(sim.tasks()[0].workflow_id, "1987654321");
        fleet.shutdown().await;
        sim.shutdown().await;
    }
}
