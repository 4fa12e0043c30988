//! [`SshInstaller`]: custom-node installs on remote instances as durable, verified operations.
//!
//! [`SshInstaller::start`] validates an [`InstallSpec`], resolves registry names, stores a
//! queued [`InstallRecord`] (refused with a conflict when the instance already has an active
//! install) and returns it at once; the install then runs in the background:
//!
//! 1. per pack, one fixed remote script clones or fetches the repository and checks out the
//!    pinned ref, then a second one installs its `requirements.txt` with the instance's Python —
//!    each streaming its output over the SSH channel, every line an [`InstallEventKind::Output`]
//!    event; user values reach the scripts only as positional arguments (`"$1"`), never as shell
//!    text, and scripts mark their results with a per-run nonce so a pack's own output cannot
//!    forge them;
//! 2. model files are downloaded (skipped when present with the right hash);
//! 3. ComfyUI is restarted and `/object_info` (through a port forward on the same connection) is
//!    checked for each pack's classes — exit codes are not trusted: a pack is `succeeded` only
//!    when ComfyUI actually loaded classes from its module (and every class the spec or the
//!    registry expects); verified packs are recorded per instance, so the next install of the
//!    same commit is skipped.
//!
//! Every step is written to the [`InstallStore`] before the next begins. After an orchestrator
//! restart, [`SshInstaller::recover`] resumes unfinished installs: finished packs keep their
//! result, the interrupted step is rerun (all steps are idempotent; the interrupted remote
//! command died with the connection, as it runs on a PTY), and verification decides the true
//! final state.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use comfyfleet_core::install::{
    InstallEvent, InstallEventKind, InstallFilter, InstallPhase, InstallRecord, InstallSpec,
    InstallSpecError, InstallState, InstallStore, InstalledPack, ModelStatus, NodeProgress,
    NodeSpec, NodeStatus, RequirementsStatus, redact_url, validate_class, validate_git_url,
    validate_rev,
};
use comfyfleet_core::{Clock, InstallId, StoreError, SystemClock};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::SshSession;
use crate::{ExitStatus, ProcessEvent};

/// How ComfyUI on an instance is restarted after packs changed.
#[derive(Clone)]
pub enum RestartMethod {
    /// ComfyUI-Manager's `GET /api/manager/reboot` (the Manager must be installed).
    Manager,
    /// A command run over SSH (as an argv, e.g. `["sudo", "systemctl", "restart", "comfyui"]`).
    Command(Vec<String>),
    /// A restart done by the embedding code (e.g. an SSH backend that runs ComfyUI itself).
    Custom(Arc<dyn Restarter>),
}

impl std::fmt::Debug for RestartMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestartMethod::Manager => f.write_str("Manager"),
            RestartMethod::Command(argv) => f.debug_tuple("Command").field(argv).finish(),
            RestartMethod::Custom(_) => f.write_str("Custom"),
        }
    }
}

/// Restarts ComfyUI on an instance; see [`RestartMethod::Custom`].
#[async_trait::async_trait]
pub trait Restarter: Send + Sync + 'static {
    /// Restarts it; returns once the restart was triggered (the installer then waits for
    /// ComfyUI to come back).
    async fn restart(&self) -> Result<(), String>;
}

/// One instance the installer can install on.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// Its name (the SSH backend's id).
    pub name: String,
    /// ComfyUI's directory on the instance (absolute, or relative to the login's home).
    pub comfyui_dir: String,
    /// The Python that runs ComfyUI, as an argv prefix (default `["python3"]`).
    pub python: Vec<String>,
    /// ComfyUI's port on the instance's loopback (default 8188).
    pub comfyui_port: u16,
    /// How ComfyUI is restarted (default [`RestartMethod::Manager`]).
    pub restart: RestartMethod,
    /// How long ComfyUI may take to come back after a restart (default 5 min).
    pub restart_timeout: Duration,
    /// Limit for one remote step (a clone, a pip install, a download; default 30 min).
    pub step_timeout: Duration,
}

impl InstanceConfig {
    /// Defaults for ComfyUI in `comfyui_dir`.
    pub fn new(name: impl Into<String>, comfyui_dir: impl Into<String>) -> InstanceConfig {
        InstanceConfig {
            name: name.into(),
            comfyui_dir: comfyui_dir.into(),
            python: vec!["python3".into()],
            comfyui_port: 8188,
            restart: RestartMethod::Manager,
            restart_timeout: Duration::from_secs(300),
            step_timeout: Duration::from_secs(1800),
        }
    }
}

/// A registry entry: where a named pack lives and what it provides.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    /// The repository.
    pub git: String,
    /// Default ref.
    #[serde(default)]
    pub rev: Option<String>,
    /// Classes the pack provides.
    #[serde(default)]
    pub classes: Vec<String>,
}

/// Named packs (`name → git URL, ref, classes`), loaded from a JSON file
/// `{"packs": {"ComfyUI-Impact-Pack": {"git": "https://…", "classes": ["…"]}}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// The packs by name.
    #[serde(default)]
    pub packs: BTreeMap<String, RegistryEntry>,
}

impl Registry {
    /// Parses and validates a registry document.
    pub fn from_json(text: &str) -> Result<Registry, InstallError> {
        let reg: Registry = serde_json::from_str(text)
            .map_err(|e| InstallError::Registry(format!("not a registry document: {e}")))?;
        for (name, e) in &reg.packs {
            comfyfleet_core::install::validate_name(name)
                .map_err(|m| InstallError::Registry(format!("pack name {name:?} {m}")))?;
            validate_git_url(&e.git)
                .map_err(|m| InstallError::Registry(format!("{name}.git {m}")))?;
            if let Some(r) = &e.rev {
                validate_rev(r).map_err(|m| InstallError::Registry(format!("{name}.rev {m}")))?;
            }
            for c in &e.classes {
                validate_class(c)
                    .map_err(|m| InstallError::Registry(format!("{name}.classes {m}")))?;
            }
        }
        Ok(reg)
    }

    /// Reads [`from_json`](Registry::from_json) from a file.
    pub fn from_file(path: &Path) -> Result<Registry, InstallError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| InstallError::Registry(format!("reading {}: {e}", path.display())))?;
        Registry::from_json(&text)
    }
}

/// Errors of [`SshInstaller`]'s calls (the install's own failures are in its record).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// The spec was refused; nothing ran.
    #[error("invalid install: {0}")]
    InvalidSpec(#[from] InstallSpecError),
    /// No instance of that name is configured.
    #[error("unknown instance {0:?}")]
    UnknownInstance(String),
    /// A pack name is not in the registry.
    #[error("nodes[{index}]: {name:?} is not in the registry; give a git URL")]
    UnknownPack {
        /// Index in the spec.
        index: usize,
        /// The name.
        name: String,
    },
    /// The instance already has an active install.
    #[error("{0}")]
    Conflict(String),
    /// No such install.
    #[error("install {0} not found")]
    NotFound(InstallId),
    /// The install already finished.
    #[error("install {id} is already {state}")]
    Finished {
        /// The install.
        id: InstallId,
        /// Its state.
        state: InstallState,
    },
    /// The registry file is unusable.
    #[error("registry: {0}")]
    Registry(String),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for InstallError {
    fn from(e: StoreError) -> InstallError {
        match e {
            StoreError::Conflict(m) => InstallError::Conflict(m),
            StoreError::InstallNotFound(id) => InstallError::NotFound(id),
            e => InstallError::Store(e),
        }
    }
}

struct Instance {
    config: InstanceConfig,
    session: SshSession,
}

type InstalledHook = Arc<dyn Fn(&str) + Send + Sync>;

/// An install's run in this process.
struct Running {
    /// Cancels the run (it stops at its next step and settles the record `cancelled`).
    token: CancellationToken,
    /// Cancelled when the run's task is over, however it ended (also when aborted).
    done: CancellationToken,
    abort: Option<tokio::task::AbortHandle>,
    /// Which run this is: a finished task removes only its own entry, and the abort handle is
    /// set only on the entry of the task it belongs to.
    generation: u64,
}

struct Inner {
    store: Arc<dyn InstallStore>,
    instances: HashMap<String, Instance>,
    registry: Registry,
    clock: Arc<dyn Clock>,
    running: Mutex<HashMap<InstallId, Running>>,
    /// Tells the entries of one install's successive runs apart (see [`Running`]).
    generation: std::sync::atomic::AtomicU64,
    events: broadcast::Sender<InstallEvent>,
    on_installed: Vec<InstalledHook>,
    flush_every: Duration,
}

/// Runs installs; see the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct SshInstaller {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SshInstaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshInstaller")
            .field(
                "instances",
                &self.inner.instances.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Builds an [`SshInstaller`].
#[allow(
    missing_debug_implementations,
    reason = "holds trait objects; built and dropped at once"
)]
pub struct SshInstallerBuilder {
    store: Arc<dyn InstallStore>,
    instances: HashMap<String, Instance>,
    registry: Registry,
    clock: Arc<dyn Clock>,
    on_installed: Vec<InstalledHook>,
    flush_every: Duration,
}

impl SshInstallerBuilder {
    /// Adds an instance reached through `session`.
    pub fn instance(mut self, config: InstanceConfig, session: SshSession) -> Self {
        self.instances
            .insert(config.name.clone(), Instance { config, session });
        self
    }

    /// The registry for named packs.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// The clock for timestamps (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Called with the instance name after an install verified packs (e.g. to refresh a
    /// backend's node catalogue).
    pub fn on_installed(mut self, hook: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_installed.push(Arc::new(hook));
        self
    }

    /// How long output lines may wait before they are stored and published (default 200 ms;
    /// at least 1 ms).
    pub fn flush_every(mut self, every: Duration) -> Self {
        // A zero period would panic in `tokio::time::interval` inside the install's task.
        self.flush_every = every.max(Duration::from_millis(1));
        self
    }

    /// The installer.
    pub fn build(self) -> SshInstaller {
        let (events, _) = broadcast::channel(4096);
        SshInstaller {
            inner: Arc::new(Inner {
                store: self.store,
                instances: self.instances,
                registry: self.registry,
                clock: self.clock,
                running: Mutex::new(HashMap::new()),
                generation: std::sync::atomic::AtomicU64::new(0),
                events,
                on_installed: self.on_installed,
                flush_every: self.flush_every,
            }),
        }
    }
}

impl SshInstaller {
    /// A builder storing installs in `store`.
    pub fn builder(store: Arc<dyn InstallStore>) -> SshInstallerBuilder {
        SshInstallerBuilder {
            store,
            instances: HashMap::new(),
            registry: Registry::default(),
            clock: Arc::new(SystemClock),
            on_installed: Vec::new(),
            flush_every: Duration::from_millis(200),
        }
    }

    /// The configured instances' names.
    pub fn instances(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.instances.keys().cloned().collect();
        v.sort();
        v
    }

    /// Validates `spec`, stores a queued install and starts it in the background. Returns the
    /// record at once. A second install on an instance with an active one is refused with
    /// [`InstallError::Conflict`].
    pub async fn start(&self, spec: InstallSpec) -> Result<InstallRecord, InstallError> {
        spec.validate()?;
        if !self.inner.instances.contains_key(&spec.instance) {
            return Err(InstallError::UnknownInstance(spec.instance.clone()));
        }
        let nodes = self.resolve(&spec.nodes)?;
        let now = self.inner.clock.now();
        let record = InstallRecord::new(InstallId::new(), spec, nodes, now);
        let created = self.inner.store.create_install(&record).await?;
        let _ = self.inner.events.send(created);
        self.spawn(record.id);
        Ok(record)
    }

    fn resolve(&self, specs: &[NodeSpec]) -> Result<Vec<NodeProgress>, InstallError> {
        specs
            .iter()
            .enumerate()
            .map(|(index, n)| {
                // `validate` guarantees a folder name.
                let name = n.folder().unwrap_or_default();
                let entry = self.inner.registry.packs.get(&name);
                let (git, rev, mut classes) = match (&n.git, entry) {
                    (Some(git), _) => (git.clone(), n.rev.clone(), Vec::new()),
                    (None, Some(e)) => (
                        e.git.clone(),
                        n.rev.clone().or_else(|| e.rev.clone()),
                        e.classes.clone(),
                    ),
                    (None, None) => return Err(InstallError::UnknownPack { index, name }),
                };
                if n.git
                    .as_ref()
                    .is_some_and(|g| entry.is_some_and(|e| &e.git == g))
                    && let Some(e) = entry
                {
                    classes.extend(e.classes.iter().cloned());
                }
                classes.extend(n.classes.iter().cloned());
                classes.sort();
                classes.dedup();
                Ok(NodeProgress {
                    name,
                    git: redact_url(&git),
                    rev,
                    status: NodeStatus::Pending,
                    requirements: RequirementsStatus::Unknown,
                    commit: None,
                    already_present: false,
                    expected_classes: classes,
                    classes: Vec::new(),
                    error: None,
                })
            })
            .collect()
    }

    /// One install.
    pub async fn get(&self, id: InstallId) -> Result<InstallRecord, InstallError> {
        self.inner
            .store
            .get_install(id)
            .await?
            .ok_or(InstallError::NotFound(id))
    }

    /// Installs, newest first.
    pub async fn list(&self, filter: &InstallFilter) -> Result<Vec<InstallRecord>, InstallError> {
        Ok(self.inner.store.list_installs(filter).await?)
    }

    /// Stored events of an install after `after`.
    pub async fn events(
        &self,
        id: InstallId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InstallEvent>, InstallError> {
        Ok(self.inner.store.install_events(id, after, limit).await?)
    }

    /// Live events of every install (stored before they are sent). A lagging receiver should
    /// catch up with [`events`](SshInstaller::events).
    pub fn subscribe(&self) -> broadcast::Receiver<InstallEvent> {
        self.inner.events.subscribe()
    }

    /// The packs recorded on an instance.
    pub async fn inventory(&self, instance: &str) -> Result<Vec<InstalledPack>, InstallError> {
        Ok(self.inner.store.instance_packs(instance).await?)
    }

    /// Cancels an install: the remote command's process group is killed, unfinished packs end
    /// `cancelled`. Returns the final record.
    pub async fn cancel(&self, id: InstallId) -> Result<InstallRecord, InstallError> {
        let running = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|r| (r.token.clone(), r.done.clone()));
        let was_running = running.is_some();
        if let Some((token, done)) = running {
            token.cancel();
            // The run settles the record itself; wait for its task to be over, however it ended
            // (a run that stopped on a store error leaves the record for the loop below).
            done.cancelled().await;
        }
        // Not running here (queued, left over from a crashed orchestrator, or its run stopped
        // without settling it): settle it in the store directly.
        loop {
            let mut record = self.get(id).await?;
            if record.state.is_terminal() {
                if was_running {
                    return Ok(record);
                }
                return Err(InstallError::Finished {
                    id,
                    state: record.state,
                });
            }
            let events = finish_cancelled(&mut record, self.inner.clock.now());
            match self.inner.store.update_install(&record, &events).await {
                Ok(stored) => {
                    for e in stored {
                        let _ = self.inner.events.send(e);
                    }
                    record.version += 1;
                    return Ok(record);
                }
                // Someone else wrote first: look again.
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits until the install is finished and returns its record.
    pub async fn wait(&self, id: InstallId) -> Result<InstallRecord, InstallError> {
        let mut rx = self.subscribe();
        loop {
            let record = self.get(id).await?;
            if record.state.is_terminal() {
                return Ok(record);
            }
            // Wake on any event of this install, or re-check every second.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match rx.recv().await {
                        Ok(e) if e.install == id => return,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            })
            .await;
        }
    }

    /// Resumes the unfinished installs of this installer's instances (after an orchestrator
    /// restart). Returns their ids.
    pub async fn recover(&self) -> Result<Vec<InstallId>, InstallError> {
        let filter = InstallFilter {
            states: vec![InstallState::Queued, InstallState::Running],
            limit: 1000,
            ..InstallFilter::default()
        };
        let mut ids = Vec::new();
        for record in self.inner.store.list_installs(&filter).await? {
            if !self.inner.instances.contains_key(&record.spec.instance) {
                continue;
            }
            // `spawn` checks and inserts under one lock: an install started (or recovered)
            // concurrently is never run twice here.
            if self.spawn(record.id) {
                tracing::info!(install = %record.id, instance = %record.spec.instance, "resuming install");
                ids.push(record.id);
            }
        }
        Ok(ids)
    }

    /// Stops every install running here without settling it — as if the orchestrator had
    /// stopped: the records stay `running` and the remote commands die with their channels.
    /// A later [`recover`](SshInstaller::recover) (in this or another process) resumes them.
    pub fn shutdown(&self) {
        let running: Vec<_> = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, r) in running {
            if let Some(abort) = r.abort {
                abort.abort();
            }
        }
    }

    /// Installs running in this process.
    pub fn running(&self) -> Vec<InstallId> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Runs `id` in the background unless it already runs here; `true` when it was started.
    fn spawn(&self, id: InstallId) -> bool {
        let token = CancellationToken::new();
        let done = CancellationToken::new();
        let generation = self
            .inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains_key(&id) {
                return false;
            }
            running.insert(
                id,
                Running {
                    token: token.clone(),
                    done: done.clone(),
                    abort: None,
                    generation,
                },
            );
        }
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            // However the task ends (aborted or panicking too): first its entry goes, then
            // `done` tells a waiting `cancel` (guards drop in reverse order).
            let _done = done.drop_guard();
            let _entry = Unregister {
                inner: inner.clone(),
                id,
                generation,
            };
            if let Err(e) = run(&inner, id, token).await {
                tracing::warn!(install = %id, error = %e, "install stopped");
            }
        });
        let mut running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = running.get_mut(&id)
            && entry.generation == generation
        {
            entry.abort = Some(task.abort_handle());
        }
        true
    }
}

/// Removes a run's entry from [`Inner::running`] when its task ends, unless a newer run of the
/// same install replaced it.
struct Unregister {
    inner: Arc<Inner>,
    id: InstallId,
    generation: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        let mut running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        if running
            .get(&self.id)
            .is_some_and(|r| r.generation == self.generation)
        {
            running.remove(&self.id);
        }
    }
}

fn finish_cancelled(
    record: &mut InstallRecord,
    now: comfyfleet_core::Timestamp,
) -> Vec<InstallEventKind> {
    let mut events = Vec::new();
    for (index, n) in record.nodes.iter_mut().enumerate() {
        if !n.status.is_done() || n.status == NodeStatus::Installed {
            n.status = NodeStatus::Cancelled;
            events.push(InstallEventKind::Node {
                index,
                node: n.clone(),
            });
        }
    }
    for (index, m) in record.models.iter_mut().enumerate() {
        if matches!(m.status, ModelStatus::Pending | ModelStatus::Downloading) {
            m.status = ModelStatus::Cancelled;
            events.push(InstallEventKind::Model {
                index,
                model: m.clone(),
            });
        }
    }
    record.state = InstallState::Cancelled;
    record.phase = InstallPhase::Done;
    record.current = None;
    record.error = Some("cancelled".into());
    record.updated_at = now;
    record.finished_at = Some(now);
    events.push(InstallEventKind::Phase {
        phase: InstallPhase::Done,
    });
    events.push(InstallEventKind::Finished {
        state: InstallState::Cancelled,
        error: record.error.clone(),
    });
    events
}

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("cancelled")]
    Cancelled,
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The record being driven, with its unsaved events.
struct Run<'a> {
    inner: &'a Inner,
    record: InstallRecord,
    pending: Vec<InstallEventKind>,
    last_flush: tokio::time::Instant,
    /// `(raw, redacted)` URLs: output never shows a credential or a download token.
    secrets: Vec<(String, String)>,
    /// The install's cancel token.
    token: CancellationToken,
}

impl Run<'_> {
    fn push(&mut self, event: InstallEventKind) {
        self.pending.push(event);
    }

    fn node_changed(&mut self, index: usize) {
        let node = self.record.nodes[index].clone();
        self.push(InstallEventKind::Node { index, node });
    }

    fn phase(&mut self, phase: InstallPhase) {
        self.record.phase = phase;
        self.push(InstallEventKind::Phase { phase });
    }

    fn scrub(&self, mut text: String) -> String {
        for (raw, redacted) in &self.secrets {
            if text.contains(raw.as_str()) {
                text = text.replace(raw.as_str(), redacted);
            }
        }
        text
    }

    fn line(&mut self, node: Option<usize>, line: String) {
        self.record.push_log(line.clone());
        self.push(InstallEventKind::Output { node, line });
    }

    /// Stores the record and the pending events (version-checked).
    async fn flush(&mut self) -> Result<(), Stop> {
        self.record.updated_at = self.inner.clock.now();
        let events = std::mem::take(&mut self.pending);
        let stored = self
            .inner
            .store
            .update_install(&self.record, &events)
            .await?;
        self.record.version += 1;
        self.last_flush = tokio::time::Instant::now();
        for e in stored {
            let _ = self.inner.events.send(e);
        }
        Ok(())
    }

    /// Flushes if lines have waited long enough.
    async fn maybe_flush(&mut self) -> Result<(), Stop> {
        if !self.pending.is_empty() && self.last_flush.elapsed() >= self.inner.flush_every {
            self.flush().await?;
        }
        Ok(())
    }
}

/// What a remote step reported.
struct StepResult {
    status: ExitStatus,
    /// `(key, value)` of the nonce-marked lines.
    marks: Vec<(String, String)>,
    /// pip's `ERROR:` lines and git's `fatal:` lines.
    errors: Vec<String>,
    /// The last unmarked lines, for error messages.
    tail: Vec<String>,
}

impl StepResult {
    fn mark(&self, key: &str) -> Option<&str> {
        self.marks
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn describe(&self, what: &str) -> String {
        let status = match &self.status {
            ExitStatus::Code(c) => format!("exit code {c}"),
            ExitStatus::Signal(s) => format!("killed by {s}"),
            ExitStatus::Cancelled => "cancelled".into(),
            ExitStatus::TimedOut => "timed out".into(),
            ExitStatus::Closed => "connection lost".into(),
        };
        let detail = self
            .errors
            .last()
            .or(self.tail.last())
            .map(|l| format!(": {l}"))
            .unwrap_or_default();
        format!("{what} failed ({status}){detail}")
    }
}

async fn run(inner: &Inner, id: InstallId, token: CancellationToken) -> Result<(), Stop> {
    let Some(record) = inner.store.get_install(id).await? else {
        return Ok(());
    };
    if record.state.is_terminal() {
        return Ok(());
    }
    let Some(instance) = inner.instances.get(&record.spec.instance) else {
        return Ok(());
    };
    let mut run = Run {
        inner,
        record,
        pending: Vec::new(),
        last_flush: tokio::time::Instant::now(),
        secrets: Vec::new(),
        token: token.clone(),
    };
    let raw_urls = (0..run.record.nodes.len())
        .filter_map(|i| raw_git(inner, &run.record, i))
        .chain(run.record.spec.models.iter().map(|m| m.url.clone()));
    for raw in raw_urls {
        let redacted = redact_url(&raw);
        if redacted != raw {
            run.secrets.push((raw, redacted));
        }
    }
    if run.record.state == InstallState::Running {
        run.record.resumed += 1;
        let count = run.record.resumed;
        run.push(InstallEventKind::Resumed { count });
    }
    run.record.state = InstallState::Running;
    run.phase(InstallPhase::Connecting);
    run.flush().await?;

    // `drive` stops at its next await once the token fires (see `or_cancel`), never in the
    // middle of a store write: dropping it there could lose a committed write's version bump
    // (the cancel below would then conflict forever) and the write's live events.
    match drive(&mut run, instance, &token).await {
        Ok(()) => Ok(()),
        Err(Stop::Cancelled) => {
            // `drive` dropped the remote process: its channel is closed and the PTY hangup
            // killed its process group.
            let now = inner.clock.now();
            let mut events = std::mem::take(&mut run.pending);
            events.extend(finish_cancelled(&mut run.record, now));
            let stored = inner.store.update_install(&run.record, &events).await?;
            for e in stored {
                let _ = inner.events.send(e);
            }
            tracing::info!(install = %id, "install cancelled");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// `url` without a `user:password@` or `token@` part (an `ssh://` user stays: ssh needs it and
/// takes no password from the URL).
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) if scheme != "ssh" => {
            let end = rest.find('/').unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Runs `fut` unless the install is cancelled first (then `fut` is dropped: a remote command
/// in it is closed, which kills its process group).
async fn or_cancel<T>(
    token: &CancellationToken,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Stop> {
    tokio::select! {
        biased;
        () = token.cancelled() => Err(Stop::Cancelled),
        v = fut => Ok(v),
    }
}

/// The pack's repository with credentials: from the spec, else from the registry (records and
/// events only hold the redacted URL).
fn raw_git(inner: &Inner, record: &InstallRecord, index: usize) -> Option<String> {
    let spec = record.spec.nodes.get(index)?;
    spec.git.clone().or_else(|| {
        let name = spec.folder()?;
        inner.registry.packs.get(&name).map(|e| e.git.clone())
    })
}

async fn fail_whole(run: &mut Run<'_>, error: String) -> Result<(), Stop> {
    let now = run.inner.clock.now();
    for (index, n) in run.record.nodes.iter_mut().enumerate() {
        if !matches!(n.status, NodeStatus::Succeeded | NodeStatus::Failed) {
            n.status = NodeStatus::Failed;
            n.error.get_or_insert_with(|| error.clone());
            let node = n.clone();
            run.pending.push(InstallEventKind::Node { index, node });
        }
    }
    for (index, m) in run.record.models.iter_mut().enumerate() {
        if m.status != ModelStatus::Succeeded {
            m.status = ModelStatus::Failed;
            m.error.get_or_insert_with(|| error.clone());
            let model = m.clone();
            run.pending.push(InstallEventKind::Model { index, model });
        }
    }
    run.record.state = InstallState::Failed;
    run.record.error = Some(error.clone());
    run.record.finished_at = Some(now);
    run.record.current = None;
    run.phase(InstallPhase::Done);
    run.push(InstallEventKind::Finished {
        state: InstallState::Failed,
        error: Some(error),
    });
    run.flush().await
}

/// The fixed script that clones or updates a pack. Arguments: `$1` nonce, `$2` folder,
/// `$3` URL, `$4` ref (may be empty), `$5` commit already recorded for this pack (may be empty),
/// `$6` the URL without credentials, left as `origin` in the checkout's `.git/config` (where
/// ComfyUI-Manager and anyone on the instance would read a token), whatever way the step ends.
///
/// Only a pinned commit id is trusted without a fetch; branch and tag names (and the default
/// branch) are resolved against the remote's current refs, as they move. `present` is reported
/// when the resolved commit is the one checked out and recorded: nothing changed.
const GIT_STEP: &str = r#"set -u
mark=$1; dir=$2; url=$3; rev=$4; known=$5; public=$6
scrub() { if [ "$url" != "$public" ] && [ -d "$dir/.git" ]; then git -C "$dir" remote set-url origin "$public" 2>/dev/null; fi; }
trap scrub EXIT
trap 'scrub; exit 129' HUP INT TERM
export GIT_TERMINAL_PROMPT=0 GIT_ALLOW_PROTOCOL=file:git:http:https:ssh
# The command runs on a PTY: ssh must fail instead of waiting on a host-key or password prompt,
# and a stalled transfer must fail instead of waiting for the step's time limit.
export GIT_SSH_COMMAND="${GIT_SSH_COMMAND:-ssh -o BatchMode=yes -o ConnectTimeout=30}"
export GIT_HTTP_LOW_SPEED_LIMIT="${GIT_HTTP_LOW_SPEED_LIMIT:-1000}"
export GIT_HTTP_LOW_SPEED_TIME="${GIT_HTTP_LOW_SPEED_TIME:-60}"
head=""
if [ -d "$dir/.git" ]; then
  head=$(git -C "$dir" rev-parse --verify --quiet "HEAD^{commit}" || true)
  case "$rev" in
    ""|*[!0-9a-f]*) ;;
    *)
      if [ ${#rev} -ge 7 ] && [ -n "$known" ] && [ "$head" = "$known" ]; then
        case "$head" in "$rev"*)
          echo "$mark present $head"
          echo "$mark commit $head"
          exit 0;;
        esac
      fi;;
  esac
  echo "updating $dir"
  git -C "$dir" remote set-url origin "$url" 2>/dev/null || git -C "$dir" remote add origin "$url" || exit 10
  git -C "$dir" fetch --tags --force --prune origin || exit 11
  # Only clone sets origin/HEAD: follow the remote's default branch (the URL may have changed).
  git -C "$dir" remote set-head origin --auto >/dev/null 2>&1 || true
else
  if [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then echo "fatal: $dir exists and is not a git checkout"; exit 12; fi
  git clone --no-checkout -- "$url" "$dir" || exit 13
fi
if [ -n "$rev" ]; then
  commit=$(git -C "$dir" rev-parse --verify --quiet "refs/remotes/origin/$rev^{commit}" || git -C "$dir" rev-parse --verify --quiet "refs/tags/$rev^{commit}" || git -C "$dir" rev-parse --verify --quiet "$rev^{commit}") || { echo "fatal: ref $rev not found in $url"; exit 14; }
else
  commit=$(git -C "$dir" rev-parse --verify --quiet "refs/remotes/origin/HEAD^{commit}") || { echo "fatal: the remote has no default branch"; exit 15; }
fi
git -C "$dir" checkout --quiet --force --detach "$commit" || exit 16
git -C "$dir" submodule --quiet update --init --recursive || exit 17
if [ -n "$known" ] && [ "$commit" = "$head" ] && [ "$commit" = "$known" ]; then echo "$mark present $commit"; fi
echo "$mark commit $commit"
"#;

/// Installs a pack's requirements. `$1` nonce, `$2` folder, then the Python argv.
const REQUIREMENTS_STEP: &str = r#"set -u
mark=$1; dir=$2; shift 2
if [ ! -f "$dir/requirements.txt" ]; then echo "$mark requirements none"; exit 0; fi
echo "$mark requirements installing"
"$@" -m pip install --disable-pip-version-check --no-input --progress-bar off -r "$dir/requirements.txt"
"#;

/// Downloads a model. `$1` nonce, `$2` URL, `$3` destination, `$4` SHA-256 (may be empty),
/// then the Python argv (the fallback downloader).
const MODEL_STEP: &str = r#"set -u
mark=$1; url=$2; dest=$3; sha=$4; shift 4
check() { [ -z "$sha" ] || [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha" ]; }
if [ -f "$dest" ] && check "$dest"; then echo "$mark present"; exit 0; fi
mkdir -p "$(dirname "$dest")" || exit 20
tmp="$dest.part"
rm -f "$tmp"
if command -v curl >/dev/null 2>&1; then
  curl -fsSL --retry 3 --connect-timeout 30 -o "$tmp" "$url" || { rm -f "$tmp"; exit 21; }
elif command -v wget >/dev/null 2>&1; then
  wget -q -O "$tmp" "$url" || { rm -f "$tmp"; exit 21; }
else
  "$@" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$url" "$tmp" || { rm -f "$tmp"; exit 21; }
fi
if ! check "$tmp"; then rm -f "$tmp"; echo "fatal: SHA-256 mismatch"; exit 22; fi
mv -f "$tmp" "$dest" || exit 23
echo "$mark downloaded"
"#;

/// Runs a fixed script with positional arguments and streams its output into the run.
async fn step(
    run: &mut Run<'_>,
    instance: &Instance,
    node: Option<usize>,
    script: &str,
    args: Vec<String>,
    mark: &str,
) -> Result<StepResult, Stop> {
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        "comfyfleet-install".to_owned(),
    ];
    argv.extend(args);
    let opts = crate::ExecOptions {
        pty: true,
        timeout: Some(instance.config.step_timeout),
    };
    let token = run.token.clone();
    // Through the session: a connection found dead when the channel is opened is replaced once
    // (nothing ran yet), instead of failing the pack.
    let started = or_cancel(&token, instance.session.exec_with(&argv, opts)).await?;
    let mut process = match started {
        Ok(p) => p,
        Err(e) => {
            return Ok(StepResult {
                status: ExitStatus::Closed,
                marks: vec![],
                errors: vec![format!("cannot start the remote command: {e}")],
                tail: vec![],
            });
        }
    };
    let mut result = StepResult {
        status: ExitStatus::Closed,
        marks: Vec::new(),
        errors: Vec::new(),
        tail: Vec::new(),
    };
    let mut tick = tokio::time::interval(run.inner.flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lines = 0u64;
    loop {
        let event = tokio::select! {
            biased;
            // Returning drops `process`: its channel is closed, the PTY hangup kills the group.
            () = token.cancelled() => return Err(Stop::Cancelled),
            e = process.next_event() => e,
            _ = tick.tick() => {
                run.maybe_flush().await?;
                continue;
            }
        };
        match event {
            Some(ProcessEvent::Line(line)) => {
                let text = run.scrub(line.text);
                if let Some(rest) = text.strip_prefix(mark) {
                    let rest = rest.trim_start();
                    let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
                    result.marks.push((k.to_owned(), v.trim().to_owned()));
                    continue;
                }
                let t = text.trim_start();
                if t.starts_with("ERROR:") || t.starts_with("fatal:") {
                    result.errors.push(t.to_owned());
                }
                result.tail.push(text.clone());
                if result.tail.len() > 20 {
                    result.tail.remove(0);
                }
                run.line(node, text);
                lines += 1;
                if lines == 1 {
                    // The step's first sign of life is shown at once; later lines are batched.
                    run.flush().await?;
                } else {
                    run.maybe_flush().await?;
                }
            }
            Some(ProcessEvent::Exit(status)) => {
                result.status = status;
                break;
            }
            None => break,
        }
    }
    Ok(result)
}

fn nonce() -> String {
    format!("::comfyfleet-{}::", uuid::Uuid::new_v4().simple())
}

fn custom_nodes_dir(config: &InstanceConfig) -> String {
    format!("{}/custom_nodes", config.comfyui_dir.trim_end_matches('/'))
}

async fn drive(
    run: &mut Run<'_>,
    instance: &Instance,
    token: &CancellationToken,
) -> Result<(), Stop> {
    let config = &instance.config;
    if let Err(e) = or_cancel(token, instance.session.client()).await? {
        return fail_whole(run, format!("cannot connect to {}: {e}", config.name)).await;
    }
    let mark = nonce();
    let known: HashMap<String, String> = run
        .inner
        .store
        .instance_packs(&config.name)
        .await?
        .into_iter()
        .map(|p| (p.name, p.commit))
        .collect();

    run.phase(InstallPhase::Nodes);
    run.flush().await?;
    let mut changed = false;
    for index in 0..run.record.nodes.len() {
        if token.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        if run.record.nodes[index].status.is_done() {
            continue;
        }
        run.record.current = Some(index);
        let url = raw_git(run.inner, &run.record, index).unwrap_or_default();
        let public = without_credentials(&url);
        let node = &mut run.record.nodes[index];
        node.status = NodeStatus::Fetching;
        node.error = None;
        let dir = format!("{}/{}", custom_nodes_dir(config), node.name);
        let args = vec![
            mark.clone(),
            dir.clone(),
            url,
            node.rev.clone().unwrap_or_default(),
            known.get(&node.name).cloned().unwrap_or_default(),
            public,
        ];
        run.node_changed(index);
        run.flush().await?;
        let git = step(run, instance, Some(index), GIT_STEP, args, &mark).await?;
        if token.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        let commit = git.mark("commit").map(str::to_owned);
        if !git.status.success() || commit.is_none() {
            let node = &mut run.record.nodes[index];
            node.status = NodeStatus::Failed;
            node.error = Some(git.describe("git"));
            run.node_changed(index);
            run.flush().await?;
            continue;
        }
        let present = git.mark("present").is_some();
        {
            let node = &mut run.record.nodes[index];
            node.commit = commit;
            node.already_present = present;
        }
        if present {
            let node = &mut run.record.nodes[index];
            node.requirements = RequirementsStatus::Installed;
            node.status = NodeStatus::Installed;
            run.node_changed(index);
            run.flush().await?;
            continue;
        }
        changed = true;
        run.record.nodes[index].status = NodeStatus::Requirements;
        run.record.nodes[index].requirements = RequirementsStatus::Installing;
        run.node_changed(index);
        run.flush().await?;
        let mut args = vec![mark.clone(), dir];
        args.extend(config.python.iter().cloned());
        let req = step(run, instance, Some(index), REQUIREMENTS_STEP, args, &mark).await?;
        if token.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        let node = &mut run.record.nodes[index];
        // pip's exit code alone is not trusted: an `ERROR:` line fails the step too.
        if req.status.success() && req.errors.is_empty() {
            node.requirements = if req.mark("requirements") == Some("none") {
                RequirementsStatus::None
            } else {
                RequirementsStatus::Installed
            };
            node.status = NodeStatus::Installed;
        } else {
            node.requirements = RequirementsStatus::Failed;
            node.status = NodeStatus::Failed;
            node.error = Some(req.describe("requirements"));
        }
        run.node_changed(index);
        run.flush().await?;
    }
    run.record.current = None;

    if !run.record.models.is_empty() {
        run.phase(InstallPhase::Models);
        run.flush().await?;
        let models = run.record.spec.models.clone();
        for (index, spec) in models.iter().enumerate() {
            if token.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            if matches!(
                run.record.models[index].status,
                ModelStatus::Succeeded | ModelStatus::Failed
            ) {
                continue;
            }
            run.record.models[index].status = ModelStatus::Downloading;
            let model = run.record.models[index].clone();
            run.push(InstallEventKind::Model { index, model });
            run.flush().await?;
            let dest = format!(
                "{}/models/{}",
                config.comfyui_dir.trim_end_matches('/'),
                run.record.models[index].path
            );
            let mut args = vec![
                mark.clone(),
                spec.url.clone(),
                dest,
                spec.sha256.clone().unwrap_or_default().to_ascii_lowercase(),
            ];
            args.extend(config.python.iter().cloned());
            let res = step(run, instance, None, MODEL_STEP, args, &mark).await?;
            let m = &mut run.record.models[index];
            if res.status.success()
                && (res.mark("present").is_some() || res.mark("downloaded").is_some())
            {
                m.status = ModelStatus::Succeeded;
                m.already_present = res.mark("present").is_some();
            } else {
                m.status = ModelStatus::Failed;
                // The URL may carry a token: never quote the raw command line.
                m.error = Some(
                    res.describe("download")
                        .replace(&spec.url, &redact_url(&spec.url)),
                );
            }
            let model = m.clone();
            run.push(InstallEventKind::Model { index, model });
            run.flush().await?;
        }
    }

    // A pack put in place by this install — in this run or, when resumed, in an earlier one
    // (`changed` only knows this run) — needs the restart before ComfyUI can have loaded it.
    changed |= run
        .record
        .nodes
        .iter()
        .any(|n| n.status == NodeStatus::Installed && !n.already_present);
    let to_verify: Vec<usize> = (0..run.record.nodes.len())
        .filter(|&i| run.record.nodes[i].status == NodeStatus::Installed)
        .collect();
    // `restart: false`: ComfyUI is left alone (it may be running jobs), so nothing can be
    // verified and the packs stay `installed`.
    if !to_verify.is_empty() && run.record.spec.restart {
        let forward = match or_cancel(
            token,
            instance
                .session
                .forward_local("127.0.0.1", config.comfyui_port),
        )
        .await?
        {
            Ok(f) => f,
            Err(e) => {
                return fail_whole(run, format!("cannot forward ComfyUI's port: {e}")).await;
            }
        };
        let base = format!("http://{}", forward.local_addr());
        if changed {
            run.phase(InstallPhase::Restarting);
            run.flush().await?;
            if let Err(e) = restart(run, instance, &base, &mark).await? {
                return fail_whole(run, e).await;
            }
        }
        if token.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        run.phase(InstallPhase::Verifying);
        run.flush().await?;
        let info = match or_cancel(
            token,
            wait_object_info(&base, config.restart_timeout, token),
        )
        .await?
        {
            Ok(info) => info,
            Err(e) => return fail_whole(run, e).await,
        };
        let now = run.inner.clock.now();
        let mut verified = Vec::new();
        for index in to_verify {
            let node = &mut run.record.nodes[index];
            let module = format!("custom_nodes.{}", node.name);
            let mut found: Vec<String> = info
                .iter()
                .filter(|(_, m)| *m == &module || m.starts_with(&format!("{module}.")))
                .map(|(c, _)| c.clone())
                .collect();
            found.sort();
            // From this pack's module: the same class name loaded from another pack does not
            // show that this one works.
            let missing: Vec<&String> = node
                .expected_classes
                .iter()
                .filter(|c| !found.contains(*c))
                .collect();
            if found.is_empty() {
                node.status = NodeStatus::Failed;
                node.error = Some(format!(
                    "installed, but ComfyUI loaded no node classes from {module} (the import failed or the pack defines no nodes; see ComfyUI's log)"
                ));
            } else if !missing.is_empty() {
                node.status = NodeStatus::Failed;
                node.error = Some(format!(
                    "installed, but ComfyUI lacks the expected classes {missing:?}"
                ));
                node.classes = found;
            } else {
                node.status = NodeStatus::Succeeded;
                node.classes = found;
                verified.push(InstalledPack {
                    instance: config.name.clone(),
                    name: node.name.clone(),
                    git: node.git.clone(),
                    commit: node.commit.clone().unwrap_or_default(),
                    classes: node.classes.clone(),
                    install: run.record.id,
                    installed_at: now,
                });
            }
            run.node_changed(index);
        }
        run.inner.store.record_packs(&verified).await?;
        if !verified.is_empty() {
            for hook in &run.inner.on_installed {
                hook(&config.name);
            }
        }
    }

    let counts = run.record.counts();
    let models_failed = run
        .record
        .models
        .iter()
        .filter(|m| m.status != ModelStatus::Succeeded)
        .count();
    let now = run.inner.clock.now();
    run.record.finished_at = Some(now);
    run.record.current = None;
    // Without a restart the packs cannot be verified: `installed` is as far as they get.
    let packs_ok = if run.record.spec.restart {
        counts.succeeded == counts.total
    } else {
        counts.failed == 0
    };
    if packs_ok && models_failed == 0 {
        run.record.state = InstallState::Succeeded;
    } else {
        run.record.state = InstallState::Failed;
        let mut parts = Vec::new();
        if counts.failed > 0 {
            parts.push(format!(
                "{} of {} packs failed",
                counts.failed, counts.total
            ));
        }
        if models_failed > 0 {
            parts.push(format!(
                "{models_failed} of {} models failed",
                run.record.models.len()
            ));
        }
        run.record.error = Some(parts.join("; "));
    }
    run.phase(InstallPhase::Done);
    let state = run.record.state;
    let error = run.record.error.clone();
    run.push(InstallEventKind::Finished { state, error });
    run.flush().await
}

/// Restarts ComfyUI and waits until the old process is gone (its WebSocket closes). The outer
/// error stops the run (cancelled, store failure); the inner one fails the install.
async fn restart(
    run: &mut Run<'_>,
    instance: &Instance,
    base: &str,
    mark: &str,
) -> Result<Result<(), String>, Stop> {
    let config = &instance.config;
    let token = run.token.clone();
    // A socket opened before the restart closes when the old process goes away; without it a
    // quick check could still read the old catalogue.
    let ws_url = format!(
        "{}/ws?clientId=comfyfleet-installer-{}",
        base.replacen("http://", "ws://", 1),
        run.record.id
    );
    let socket = or_cancel(
        &token,
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(ws_url),
        ),
    )
    .await?
    .ok()
    .and_then(Result::ok)
    .map(|(s, _)| s);
    if socket.is_none() {
        tracing::warn!(install = %run.record.id, "no WebSocket to ComfyUI before its restart: cannot tell when the old process is gone");
    }
    match &config.restart {
        RestartMethod::Manager => {
            let client = match http_client() {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            let res = or_cancel(
                &token,
                client.get(format!("{base}/api/manager/reboot")).send(),
            )
            .await?;
            match res {
                Ok(r) if r.status().is_success() => {}
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                    return Ok(Err("ComfyUI-Manager's /api/manager/reboot is not there: install ComfyUI-Manager or configure a restart command".into()));
                }
                Ok(r) if r.status() == reqwest::StatusCode::FORBIDDEN => {
                    return Ok(Err("ComfyUI-Manager refused the reboot (security level); configure a restart command".into()));
                }
                Ok(r) => {
                    return Ok(Err(format!(
                        "ComfyUI-Manager's reboot answered {}",
                        r.status()
                    )));
                }
                // The process may exit before answering.
                Err(e) => tracing::debug!(error = %e, "reboot request ended without an answer"),
            }
        }
        RestartMethod::Command(argv) => {
            let mut args = vec![mark.to_owned()];
            args.extend(argv.iter().cloned());
            // A cancel or a store failure stops the run (`?`): it is not a failed restart.
            let res = step(run, instance, None, "shift; exec \"$@\"", args, mark).await?;
            if !res.status.success() {
                return Ok(Err(res.describe("restart command")));
            }
        }
        RestartMethod::Custom(r) => {
            if let Err(e) = or_cancel(&token, r.restart()).await? {
                return Ok(Err(e));
            }
        }
    }
    if let Some(mut socket) = socket {
        let closed = or_cancel(
            &token,
            tokio::time::timeout(config.restart_timeout, async {
                while let Some(msg) = socket.next().await {
                    if msg.is_err() {
                        break;
                    }
                }
            }),
        )
        .await?;
        if closed.is_err() {
            return Ok(Err(format!(
                "ComfyUI did not go down within {:?} of the restart",
                config.restart_timeout
            )));
        }
    }
    Ok(Ok(()))
}

fn http_client() -> Result<reqwest::Client, String> {
    // reqwest is built without a default TLS provider; only loopback HTTP is used here, but the
    // builder still wants one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("http client: {e}"))
}

/// Polls `/object_info` until it answers; returns `class → python_module`.
async fn wait_object_info(
    base: &str,
    limit: Duration,
    token: &CancellationToken,
) -> Result<BTreeMap<String, String>, String> {
    let client = http_client()?;
    let deadline = tokio::time::Instant::now() + limit;
    let mut last;
    loop {
        if token.is_cancelled() {
            return Err("cancelled".into());
        }
        match client.get(format!("{base}/api/object_info")).send().await {
            Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                Ok(v) => {
                    let map = v
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, info)| {
                                    let module = info
                                        .get("python_module")
                                        .and_then(serde_json::Value::as_str)
                                        .unwrap_or_default();
                                    (k.clone(), module.to_owned())
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    return Ok(map);
                }
                Err(e) => last = format!("unreadable /object_info: {e}"),
            },
            Ok(r) => last = format!("/object_info answered {}", r.status()),
            Err(e) => last = format!("/object_info: {e}"),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "ComfyUI did not come back within {limit:?} after the restart ({last})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_results_describe_the_error_line() {
        let r = StepResult {
            status: ExitStatus::Code(1),
            marks: vec![],
            errors: vec!["ERROR: No matching distribution found for nopkg".into()],
            tail: vec!["x".into()],
        };
        assert_eq!(
            r.describe("requirements"),
            "requirements failed (exit code 1): ERROR: No matching distribution found for nopkg"
        );
    }

    #[test]
    fn credentials_are_stripped_from_the_origin_url() {
        for (url, public) in [
            (
                "https://tok@github.com/a/b.git",
                "https://github.com/a/b.git",
            ),
            ("https://u:p@h:8443/a@b", "https://h:8443/a@b"),
            ("https://h/a.git", "https://h/a.git"),
            ("ssh://git@h/a.git", "ssh://git@h/a.git"),
            ("git@github.com:a/b.git", "git@github.com:a/b.git"),
            ("file:///srv/a", "file:///srv/a"),
        ] {
            assert_eq!(without_credentials(url), public, "{url}");
        }
    }

    #[test]
    fn a_zero_flush_period_is_clamped() {
        let installer = SshInstaller::builder(Arc::new(comfyfleet_core::MemoryStore::new()))
            .flush_every(Duration::ZERO)
            .build();
        assert!(installer.inner.flush_every >= Duration::from_millis(1));
    }

    #[test]
    fn registry_entries_are_validated() {
        assert!(Registry::from_json(r#"{"packs": {"a": {"git": "https://h/a.git"}}}"#).is_ok());
        assert!(Registry::from_json(r#"{"packs": {"a": {"git": "--upload-pack=x"}}}"#).is_err());
        assert!(Registry::from_json(r#"{"packs": {"../x": {"git": "https://h/a.git"}}}"#).is_err());
        assert!(
            Registry::from_json(r#"{"packs": {"a": {"git": "https://h/a.git", "rev": "$(id)"}}}"#)
                .is_err()
        );
    }
}
