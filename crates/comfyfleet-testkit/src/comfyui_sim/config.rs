//! [`SimConfig`], the fault knobs ([`FaultConfig`] / [`SimFaults`]) and [`SimStats`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::catalogue::BUILTIN_NODE_CLASSES;

/// Configuration of a [`ComfyUiSim`](super::ComfyUiSim).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Address to bind (default `127.0.0.1:0`, an ephemeral port).
    pub addr: SocketAddr,
    /// Built-in node classes to load, in `NODE_CLASS_MAPPINGS` order (default: all of
    /// [`BUILTIN_NODE_CLASSES`]). Unknown names are ignored.
    pub node_classes: Vec<String>,
    /// Custom node classes (class name → `OUTPUT_NODE`). They declare no inputs (any input is
    /// accepted, links are followed), return one `*` output (none for output nodes) that passes
    /// the first linked input through, and report no UI output.
    pub extra_node_classes: BTreeMap<String, bool>,
    /// Multiplier for every simulated duration (`TestSleep.seconds`, its 10 ms tick, the
    /// interrupt latency, `node_durations`). `1.0` = real time, `0.01` = 100× faster. Reported
    /// progress values stay in simulated seconds.
    pub time_scale: f64,
    /// `MAXIMUM_HISTORY_SIZE` (10000): the oldest entry is dropped when the history already
    /// holds more than this before an insert.
    pub history_cap: usize,
    /// Model folders → file names, for `/models`, `/models/{folder}` and `/embeddings`.
    pub models: BTreeMap<String, Vec<String>>,
    /// Files present in `input/` at start (name, may contain `/` → bytes); they survive restarts.
    pub input_files: BTreeMap<String, Vec<u8>>,
    /// `--max-upload-size` in bytes (default 100 MiB): every request body at or over it → 413.
    pub max_upload_size: u64,
    /// Where the simulated ComfyUI lives; shows up in error messages and tracebacks.
    pub base_dir: String,
    /// Time between a node noticing the interrupt flag and `execution_interrupted` (the recorded
    /// trace shows about 0.3 s). Scaled by `time_scale`.
    pub interrupt_latency: Duration,
    /// Extra run time of synchronous node classes (no progress ticks, so not interruptible
    /// mid-node, like a real node without a `ProgressBar`). Scaled by `time_scale`.
    pub node_durations: BTreeMap<String, Duration>,
    /// `--enable-cors-header ORIGIN`: replaces the Origin/Host 403 check by permissive CORS.
    pub cors_origin: Option<String>,
    /// A ComfyUI `custom_nodes/` directory (e.g. where an installer `git clone`s packs). At start
    /// and at every restart it is scanned like ComfyUI's loader does: each sub-directory (and
    /// each `*.py` file) whose `__init__.py` defines `NODE_CLASS_MAPPINGS` adds the string-literal
    /// keys of that dict as classes with `python_module` `custom_nodes.<folder>` (generic
    /// pass-through nodes; a pack cannot replace a built-in class). Hidden entries,
    /// `__pycache__` and `*.disabled` are skipped; a folder without `__init__.py` or without
    /// `NODE_CLASS_MAPPINGS` is logged (`tracing` warn, ComfyUI's wording) and contributes
    /// nothing. Packs added later show up only after a restart (`/manager/reboot`).
    pub custom_nodes_dir: Option<PathBuf>,
    /// How long a restart ([`ComfyUiSim::restart`](super::ComfyUiSim::restart),
    /// `/manager/reboot`) takes: meanwhile every HTTP request (and WebSocket upgrade) answers
    /// 503. Default 1 s, scaled by `time_scale`.
    pub restart_delay: Duration,
    /// Fault knobs at start (change them at run time through [`SimFaults`]).
    pub faults: FaultConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            node_classes: BUILTIN_NODE_CLASSES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            extra_node_classes: BTreeMap::new(),
            time_scale: 1.0,
            history_cap: 10_000,
            models: BTreeMap::new(),
            input_files: BTreeMap::new(),
            max_upload_size: 100 * 1024 * 1024,
            base_dir: "/opt/ComfyUI".to_owned(),
            interrupt_latency: Duration::from_millis(300),
            node_durations: BTreeMap::new(),
            cors_origin: None,
            custom_nodes_dir: None,
            restart_delay: Duration::from_secs(1),
            faults: FaultConfig::default(),
        }
    }
}

impl SimConfig {
    /// Default configuration with `time_scale` set.
    pub fn scaled(time_scale: f64) -> Self {
        SimConfig {
            time_scale,
            ..SimConfig::default()
        }
    }

    /// Load custom node packs from `dir` (see [`SimConfig::custom_nodes_dir`]).
    pub fn custom_nodes_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.custom_nodes_dir = Some(dir.into());
        self
    }

    /// Set how long a restart takes (see [`SimConfig::restart_delay`]).
    pub fn restart_delay(mut self, delay: Duration) -> Self {
        self.restart_delay = delay;
        self
    }
}

/// When a probabilistic or counted fault fires.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Trigger {
    /// Never (the default).
    #[default]
    Never,
    /// Every time.
    Always,
    /// The next `n` times, then never.
    Next(u32),
    /// Each time with this probability (0.0..=1.0).
    Probability(f64),
}

impl Trigger {
    /// Decide once, consuming a `Next` count.
    pub(crate) fn fire(&mut self) -> bool {
        match self {
            Trigger::Never => false,
            Trigger::Always => true,
            Trigger::Next(0) => {
                *self = Trigger::Never;
                false
            }
            Trigger::Next(n) => {
                *n -= 1;
                if *n == 0 {
                    *self = Trigger::Never;
                }
                true
            }
            Trigger::Probability(p) => fastrand::f64() < *p,
        }
    }
}

/// A node that stops mid-run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HangMidNode {
    /// Only nodes of this class hang (`None`: the first node that runs). `TestSleep` hangs
    /// between progress ticks; other nodes right after `executing`.
    pub class_type: Option<String>,
    /// `false`: an interrupt ends the hang (`execution_interrupted`). `true`: the node ignores
    /// interrupts and stays stuck until the knob is cleared (or the server restarts).
    pub ignore_interrupt: bool,
}

/// HTTP responses replaced by an error status (the request is not processed).
#[derive(Clone, Debug, PartialEq)]
pub struct HttpErrors {
    /// Status to answer (e.g. 500, 502, 503).
    pub status: u16,
    /// Which requests fail.
    pub trigger: Trigger,
    /// Only requests whose path contains this string (`None`: every HTTP route; the WebSocket
    /// upgrade is never failed).
    pub path_contains: Option<String>,
}

/// Every fault knob. All default to off, except the 0.3.64 reconnect bug (on, as in the real
/// server).
#[derive(Clone, Debug, PartialEq)]
pub struct FaultConfig {
    /// The worker takes the next prompt (it shows in `queue_running`, `status` is broadcast) and
    /// then never starts it: no `execution_start`, interrupts do nothing. Clearing the knob lets
    /// it proceed.
    pub hang_after_accept: bool,
    /// A node stops sending and never finishes (see [`HangMidNode`]).
    pub hang_mid_node: Option<HangMidNode>,
    /// New WebSocket connections are upgraded but never receive anything (not even the connect
    /// `status`) and are not registered for events.
    pub silent_websocket: bool,
    /// Every HTTP response is delayed by this much after the request was processed (so a
    /// prompt's WebSocket events overtake the `POST /prompt` response).
    pub http_delay: Duration,
    /// Some HTTP requests answer an error status without being processed.
    pub http_errors: Option<HttpErrors>,
    /// JSON responses (status 200..=400) are cut in half: unparseable JSON.
    pub malformed_json: Trigger,
    /// WebSocket JSON messages are sent twice.
    pub ws_duplicate: Trigger,
    /// A WebSocket JSON message is held back and sent after the next one (or 20 ms later).
    pub ws_reorder: Trigger,
    /// WebSocket JSON messages are silently dropped.
    pub ws_drop: Trigger,
    /// A history entry is deleted right after it is written (before `status`/`executing null`).
    pub evict_history: Trigger,
    /// Old-server `/interrupt`: the `prompt_id` in the body is ignored, every interrupt is global.
    pub interrupt_ignores_prompt_id: bool,
    /// ComfyUI 0.3.64 bug (issue #16010): when a WebSocket handler ends it removes the map entry
    /// of its `clientId` unconditionally, so a newer socket with the same id stops receiving
    /// events. On by default (faithful); server-initiated closes unregister before the TCP close.
    pub reconnect_unregisters_new_socket: bool,
    /// ComfyUI-Manager's real `/manager/reboot` `os.execv`s the process, so the request never
    /// gets an answer: the connection just drops. Off by default: the simulator answers 200
    /// first and restarts once the answer is sent.
    pub reboot_without_response: bool,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            hang_after_accept: false,
            hang_mid_node: None,
            silent_websocket: false,
            http_delay: Duration::ZERO,
            http_errors: None,
            malformed_json: Trigger::Never,
            ws_duplicate: Trigger::Never,
            ws_reorder: Trigger::Never,
            ws_drop: Trigger::Never,
            evict_history: Trigger::Never,
            interrupt_ignores_prompt_id: false,
            reconnect_unregisters_new_socket: true,
            reboot_without_response: false,
        }
    }
}

/// The run-time fault knobs of a running simulator (cheap to change from any task).
#[derive(Debug, Default)]
pub struct SimFaults {
    cfg: Mutex<FaultConfig>,
}

impl SimFaults {
    pub(crate) fn new(cfg: FaultConfig) -> Self {
        SimFaults {
            cfg: Mutex::new(cfg),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FaultConfig> {
        self.cfg
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A snapshot of every knob.
    pub fn get(&self) -> FaultConfig {
        self.lock().clone()
    }

    /// Change any knobs: `sim.faults().set(|f| f.http_delay = Duration::from_millis(50))`.
    pub fn set(&self, change: impl FnOnce(&mut FaultConfig)) {
        change(&mut self.lock());
    }

    /// Replace every knob.
    pub fn replace(&self, cfg: FaultConfig) {
        *self.lock() = cfg;
    }

    /// Turn every fault off (keeps the reconnect bug as configured).
    pub fn clear(&self) {
        let mut g = self.lock();
        let bug = g.reconnect_unregisters_new_socket;
        *g = FaultConfig {
            reconnect_unregisters_new_socket: bug,
            ..FaultConfig::default()
        };
    }

    /// See [`FaultConfig::hang_after_accept`].
    pub fn set_hang_after_accept(&self, on: bool) {
        self.set(|f| f.hang_after_accept = on);
    }
    /// See [`FaultConfig::hang_mid_node`].
    pub fn set_hang_mid_node(&self, hang: Option<HangMidNode>) {
        self.set(|f| f.hang_mid_node = hang);
    }
    /// See [`FaultConfig::silent_websocket`].
    pub fn set_silent_websocket(&self, on: bool) {
        self.set(|f| f.silent_websocket = on);
    }
    /// See [`FaultConfig::http_delay`].
    pub fn set_http_delay(&self, delay: std::time::Duration) {
        self.set(|f| f.http_delay = delay);
    }
    /// See [`FaultConfig::http_errors`].
    pub fn set_http_errors(&self, errors: Option<HttpErrors>) {
        self.set(|f| f.http_errors = errors);
    }
    /// See [`FaultConfig::malformed_json`].
    pub fn set_malformed_json(&self, t: Trigger) {
        self.set(|f| f.malformed_json = t);
    }
    /// See [`FaultConfig::ws_duplicate`].
    pub fn set_ws_duplicate(&self, t: Trigger) {
        self.set(|f| f.ws_duplicate = t);
    }
    /// See [`FaultConfig::ws_reorder`].
    pub fn set_ws_reorder(&self, t: Trigger) {
        self.set(|f| f.ws_reorder = t);
    }
    /// See [`FaultConfig::ws_drop`].
    pub fn set_ws_drop(&self, t: Trigger) {
        self.set(|f| f.ws_drop = t);
    }
    /// See [`FaultConfig::evict_history`].
    pub fn set_evict_history(&self, t: Trigger) {
        self.set(|f| f.evict_history = t);
    }
    /// See [`FaultConfig::interrupt_ignores_prompt_id`].
    pub fn set_interrupt_ignores_prompt_id(&self, on: bool) {
        self.set(|f| f.interrupt_ignores_prompt_id = on);
    }
    /// See [`FaultConfig::reconnect_unregisters_new_socket`].
    pub fn set_reconnect_unregisters_new_socket(&self, on: bool) {
        self.set(|f| f.reconnect_unregisters_new_socket = on);
    }

    /// See [`FaultConfig::reboot_without_response`].
    pub fn set_reboot_without_response(&self, on: bool) {
        self.set(|f| f.reboot_without_response = on);
    }

    /// Fire a trigger chosen by `pick`, consuming counts.
    pub(crate) fn fire(&self, pick: impl FnOnce(&mut FaultConfig) -> &mut Trigger) -> bool {
        let mut g = self.lock();
        pick(&mut g).fire()
    }

    /// Should this HTTP request fail? Returns the status.
    pub(crate) fn http_error_for(&self, path: &str) -> Option<u16> {
        let mut g = self.lock();
        let e = g.http_errors.as_mut()?;
        if e.path_contains
            .as_deref()
            .is_some_and(|p| !path.contains(p))
        {
            return None;
        }
        e.trigger.fire().then_some(e.status)
    }
}

/// Counters of what the simulator saw and did (cumulative over restarts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// HTTP requests (including the WebSocket upgrades).
    pub http_requests: u64,
    /// `POST /prompt` requests with a JSON body.
    pub prompts_received: u64,
    /// Prompts queued (200).
    pub prompts_accepted: u64,
    /// Prompts rejected with 400.
    pub prompts_rejected: u64,
    /// Prompts taken by the worker.
    pub prompts_started: u64,
    /// Prompts finished (history written): success, error or interrupt.
    pub prompts_executed: u64,
    /// Finished with `execution_success`.
    pub prompts_succeeded: u64,
    /// Finished with `execution_error`.
    pub prompts_failed: u64,
    /// Finished with `execution_interrupted`.
    pub prompts_interrupted: u64,
    /// Prompts removed from the pending queue by `POST /queue`.
    pub prompts_deleted: u64,
    /// Node functions that actually ran (cached visits excluded).
    pub nodes_executed: u64,
    /// `POST /interrupt` without a (truthy) `prompt_id`, or with one while
    /// `interrupt_ignores_prompt_id` is on.
    pub interrupts_global: u64,
    /// `POST /interrupt {prompt_id}` that matched the running prompt.
    pub interrupts_by_id: u64,
    /// `POST /interrupt {prompt_id}` for a prompt that was not running (no-op).
    pub interrupts_ignored: u64,
    /// Most prompts executing at the same time (ComfyUI: never more than 1).
    pub max_concurrent: u64,
    /// Largest `queue_remaining` seen.
    pub max_queue_remaining: u64,
    /// WebSocket connections accepted.
    pub ws_connections: u64,
    /// WebSocket JSON messages written to sockets.
    pub ws_messages_sent: u64,
    /// Restarts (`restart()`, `restart_with_downtime()`, `/manager/reboot`), counted once the
    /// old process is gone and the new one is starting.
    pub restarts: u64,
    /// Faults that fired (any knob).
    pub faults_fired: u64,
}
