//! [`RunningHubSimConfig`], the fault knobs ([`RunningHubFaultConfig`] / [`RunningHubFaults`])
//! and [`RunningHubStats`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use crate::comfyui_sim::{HttpErrors, Trigger};

/// The API key present in [`RunningHubSimConfig::default`].
pub const DEFAULT_API_KEY: &str = "sim-api-key";

/// `code`/`msg` pairs the simulator answers. `0`, `804`, `805`, `813` and their messages are
/// confirmed by two sources; the other messages follow RunningHub's error-code list as
/// remembered and are *uncertain* (classify by code, keep `msg` verbatim).
pub mod codes {
    /// Success.
    pub const OK: i64 = 0;
    /// `msg` of a success.
    pub const MSG_SUCCESS: &str = "SUCCESS";
    /// Task still running (also sent with `code = 0`).
    pub const RUNNING: i64 = 804;
    /// `msg` of a running task.
    pub const MSG_RUNNING: &str = "APIKEY_TASK_IS_RUNNING";
    /// Task failed; `data.failedReason` explains.
    pub const TASK_FAILED: i64 = 805;
    /// `msg` of a failed task.
    pub const MSG_TASK_FAILED: &str = "APIKEY_TASK_STATUS_ERROR";
    /// Unknown API key (one of the two answers, see [`super::UnknownKeyAnswer`]).
    pub const USER_NOT_FOUND: i64 = 806;
    /// `msg` of 806.
    pub const MSG_USER_NOT_FOUND: &str = "APIKEY_USER_NOT_FOUND";
    /// Unknown task (or a task of another key).
    pub const TASK_NOT_FOUND: i64 = 807;
    /// `msg` of 807.
    pub const MSG_TASK_NOT_FOUND: &str = "APIKEY_TASK_NOT_FOUND";
    /// Upload too large.
    pub const FILE_TOO_LARGE: i64 = 809;
    /// `msg` of 809.
    pub const MSG_FILE_TOO_LARGE: &str = "APIKEY_FILE_SIZE_EXCEEDED";
    /// Task still queued (also sent with `code = 0`).
    pub const QUEUED: i64 = 813;
    /// `msg` of a queued task.
    pub const MSG_QUEUED: &str = "APIKEY_TASK_IS_QUEUED";
    /// The key is at its concurrency limit.
    pub const QUEUE_LIMIT: i64 = 814;
    /// `msg` of 814.
    pub const MSG_QUEUE_LIMIT: &str = "PERSONAL_QUEUE_COUNT_LIMIT";
    /// Unknown API key (the other answer).
    pub const KEY_INVALID: i64 = 401;
    /// `msg` of 401.
    pub const MSG_KEY_INVALID: &str = "API key invalid";
    /// Missing or malformed parameters.
    pub const PARAMS_INVALID: i64 = 301;
    /// `msg` of 301.
    pub const MSG_PARAMS_INVALID: &str = "PARAMS_INVALID";
    /// The `workflow` JSON string does not parse as an object.
    pub const VALIDATE_PROMPT_FAILED: i64 = 433;
    /// `msg` of 433.
    pub const MSG_VALIDATE_PROMPT_FAILED: &str = "VALIDATE_PROMPT_FAILED";
    /// Not enough coins left for the task's cost.
    pub const NOT_ENOUGH_WALLET: i64 = 416;
    /// `msg` of 416.
    pub const MSG_NOT_ENOUGH_WALLET: &str = "TASK_CREATE_FAILED_BY_NOT_ENOUGH_WALLET";
}

/// What an unknown (or missing) API key gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownKeyAnswer {
    /// `{"code": 401, "msg": "API key invalid"}` (the default).
    #[default]
    Invalid401,
    /// `{"code": 806, "msg": "APIKEY_USER_NOT_FOUND"}`.
    UserNotFound806,
}

/// Which envelope `/task/openapi/outputs` uses for a task that is still running (or queued).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PendingVariant {
    /// `code = 804` (running) / `813` (queued), `data = null`.
    NonZeroCode,
    /// `code = 0`, `msg = APIKEY_TASK_IS_RUNNING` / `APIKEY_TASK_IS_QUEUED`, `data = null`.
    ZeroCode,
    /// Per task, alternating on each outputs poll while pending, starting with the non-zero code
    /// (the default: a client sees both forms).
    #[default]
    Alternate,
}

/// One API key and its account.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiKeyConfig {
    /// Most current tasks (queued + running) at once; a create beyond it answers 814.
    pub concurrency_limit: usize,
    /// Initial RH coins (`remainCoins`).
    pub coins: u64,
    /// Initial money balance (`remainMoney`).
    pub money: f64,
    /// `currency` of `accountStatus`.
    pub currency: String,
    /// `apiType` of `accountStatus` (and `apiKeyType` of the queue status).
    pub api_type: String,
}

impl Default for ApiKeyConfig {
    fn default() -> Self {
        ApiKeyConfig {
            concurrency_limit: 1,
            coins: 10_000,
            money: 100.0,
            currency: "CNY".to_owned(),
            api_type: "NORMAL".to_owned(),
        }
    }
}

impl ApiKeyConfig {
    /// Default account with this concurrency limit.
    pub fn with_limit(concurrency_limit: usize) -> Self {
        ApiKeyConfig {
            concurrency_limit,
            ..ApiKeyConfig::default()
        }
    }
}

/// ComfyUI's `execution_error`, as RunningHub reports it in `data.failedReason` (all strings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedReason {
    /// `node_name` (the class type).
    pub node_name: String,
    /// `node_id`.
    pub node_id: String,
    /// `exception_message`.
    pub exception_message: String,
    /// `exception_type`.
    pub exception_type: String,
    /// `traceback` (one string).
    pub traceback: String,
    /// `current_inputs` (a JSON-ish string).
    pub current_inputs: String,
    /// `current_outputs` (a JSON-ish string).
    pub current_outputs: String,
}

impl Default for FailedReason {
    fn default() -> Self {
        FailedReason {
            node_name: "KSampler".to_owned(),
            node_id: "3".to_owned(),
            exception_message: "Allocation on device 0 would exceed allowed memory. (out of memory)"
                .to_owned(),
            exception_type: "torch.OutOfMemoryError".to_owned(),
            traceback: "Traceback (most recent call last):\n  File \"/app/execution.py\", line 496, in execute\n    output_data, output_ui, has_subgraph = get_output_data(obj, input_data_all)\ntorch.OutOfMemoryError: Allocation on device 0 would exceed allowed memory. (out of memory)\n".to_owned(),
            current_inputs: "{}".to_owned(),
            current_outputs: "[]".to_owned(),
        }
    }
}

/// How a task of one workflow (or webapp) behaves. Durations are simulated time, multiplied by
/// [`RunningHubSimConfig::time_scale`].
#[derive(Clone, Debug, PartialEq)]
pub struct WorkflowSpec {
    /// Time in `QUEUED` after create (zero: create answers `RUNNING`).
    pub queue_time: Duration,
    /// Time in `RUNNING`.
    pub run_time: Duration,
    /// `Some`: the task ends `FAILED` with this reason. `None`: `SUCCESS`.
    pub failure: Option<FailedReason>,
    /// The task never leaves `RUNNING` (until cancelled).
    pub hang: bool,
    /// Number of output files of a successful task (0 is a valid "no outputs").
    pub outputs: usize,
    /// `fileType` of the outputs (`png`: real PNG bytes; otherwise deterministic bytes).
    pub file_type: String,
    /// `nodeId` of the outputs.
    pub output_node_id: String,
    /// Coins charged when the task succeeds (`consumeCoins`).
    pub cost_coins: u64,
    /// Money charged when the task succeeds (`consumeMoney`).
    pub cost_money: f64,
}

impl Default for WorkflowSpec {
    fn default() -> Self {
        WorkflowSpec {
            queue_time: Duration::from_secs(1),
            run_time: Duration::from_secs(5),
            failure: None,
            hang: false,
            outputs: 1,
            file_type: "png".to_owned(),
            output_node_id: "9".to_owned(),
            cost_coins: 10,
            cost_money: 0.1,
        }
    }
}

impl WorkflowSpec {
    /// A spec with these queue and run times.
    pub fn timed(queue_time: Duration, run_time: Duration) -> Self {
        WorkflowSpec {
            queue_time,
            run_time,
            ..WorkflowSpec::default()
        }
    }
    /// This spec, ending `FAILED` with `reason`.
    pub fn failing(mut self, reason: FailedReason) -> Self {
        self.failure = Some(reason);
        self
    }
}

/// Configuration of a [`RunningHubSim`](super::RunningHubSim). Every field is public so that a
/// CLI (`comfyfleet sim runninghub --port`) can build one.
#[derive(Clone, Debug)]
pub struct RunningHubSimConfig {
    /// Address to bind (default `127.0.0.1:0`, an ephemeral port).
    pub addr: SocketAddr,
    /// Multiplier for every simulated duration (`1.0` real time, `0.01` 100× faster).
    pub time_scale: f64,
    /// Known API keys and their accounts (default: [`DEFAULT_API_KEY`] with limit 1).
    pub keys: BTreeMap<String, ApiKeyConfig>,
    /// Answer to an unknown or missing key.
    pub unknown_key: UnknownKeyAnswer,
    /// Behaviour of a workflow (`workflowId`) or webapp (`webappId`) not in `workflows`; also of
    /// tasks created from a full `workflow` JSON string without a known `workflowId`.
    pub default_workflow: WorkflowSpec,
    /// Per `workflowId` / `webappId` behaviour.
    pub workflows: BTreeMap<String, WorkflowSpec>,
    /// API-format workflow JSON text per `workflowId` for `/api/openapi/getJsonApiFormat`
    /// (other ids get a small built-in LoadImage → SaveImage workflow).
    pub hosted_workflows: BTreeMap<String, String>,
    /// Envelope of outputs polls while running.
    pub running_variant: PendingVariant,
    /// Envelope of outputs polls while queued.
    pub queued_variant: PendingVariant,
    /// Upload size limit in bytes (RunningHub: 30 MB); a larger `file` answers 809.
    pub max_upload_size: u64,
    /// Refuse a create with 416 when the key's remaining coins are below the task's cost.
    pub enforce_balance: bool,
    /// Interval of `progress` messages on the task WebSocket (simulated time).
    pub ws_progress_interval: Duration,
    /// Fault knobs at start (change them at run time through [`RunningHubFaults`]).
    pub faults: RunningHubFaultConfig,
}

impl Default for RunningHubSimConfig {
    fn default() -> Self {
        RunningHubSimConfig {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            time_scale: 1.0,
            keys: BTreeMap::from([(DEFAULT_API_KEY.to_owned(), ApiKeyConfig::default())]),
            unknown_key: UnknownKeyAnswer::default(),
            default_workflow: WorkflowSpec::default(),
            workflows: BTreeMap::new(),
            hosted_workflows: BTreeMap::new(),
            running_variant: PendingVariant::default(),
            queued_variant: PendingVariant::default(),
            max_upload_size: 30 * 1024 * 1024,
            enforce_balance: true,
            ws_progress_interval: Duration::from_secs(1),
            faults: RunningHubFaultConfig::default(),
        }
    }
}

impl RunningHubSimConfig {
    /// Default configuration with `time_scale` set.
    pub fn scaled(time_scale: f64) -> Self {
        RunningHubSimConfig {
            time_scale,
            ..RunningHubSimConfig::default()
        }
    }
    /// Bind this port on 127.0.0.1 (0: ephemeral).
    pub fn port(mut self, port: u16) -> Self {
        self.addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        self
    }
    /// Add (or replace) an API key.
    pub fn key(mut self, key: impl Into<String>, account: ApiKeyConfig) -> Self {
        self.keys.insert(key.into(), account);
        self
    }
    /// Set the behaviour of one workflow / webapp id.
    pub fn workflow(mut self, id: impl Into<String>, spec: WorkflowSpec) -> Self {
        self.workflows.insert(id.into(), spec);
        self
    }
}

/// Every fault knob; all default to off.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunningHubFaultConfig {
    /// Every HTTP API response (not `/files`, not the WebSocket) is delayed by this much.
    pub response_delay: Duration,
    /// Extra delay per endpoint path (e.g. `/task/openapi/outputs`).
    pub endpoint_delays: BTreeMap<String, Duration>,
    /// Seed 000: a slow proxy in front of everything. Every HTTP response (API, files, the
    /// WebSocket upgrade) is delayed by this much, on top of the other delays.
    pub proxy_delay: Duration,
    /// Some requests answer an HTTP error status (text body) without being processed.
    pub http_errors: Option<HttpErrors>,
    /// JSON responses are cut in half (unparseable), after being processed.
    pub malformed_json: Trigger,
    /// Tasks of these workflow / webapp ids never leave `RUNNING`.
    pub hang_workflows: BTreeSet<String>,
    /// Newly created tasks never leave `RUNNING` (decided at create).
    pub hang_tasks: Trigger,
    /// Newly created tasks end `FAILED` (with the default [`FailedReason`]).
    pub fail_tasks: Trigger,
    /// The `netWssUrl` socket accepts and then never sends anything (seed 000).
    pub silent_websocket: bool,
    /// The `netWssUrl` upgrade request is read and never answered (a connect that blocks, as
    /// behind the proxy of seed 000), until the knob is cleared or the simulator stops.
    pub hang_websocket_handshake: bool,
}

/// The run-time fault knobs of a running simulator.
#[derive(Debug, Default)]
pub struct RunningHubFaults {
    cfg: Mutex<RunningHubFaultConfig>,
}

impl RunningHubFaults {
    pub(crate) fn new(cfg: RunningHubFaultConfig) -> Self {
        RunningHubFaults {
            cfg: Mutex::new(cfg),
        }
    }
    fn lock(&self) -> MutexGuard<'_, RunningHubFaultConfig> {
        self.cfg.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// A snapshot of every knob.
    pub fn get(&self) -> RunningHubFaultConfig {
        self.lock().clone()
    }
    /// Change any knobs.
    pub fn set(&self, change: impl FnOnce(&mut RunningHubFaultConfig)) {
        change(&mut self.lock());
    }
    /// Turn every fault off.
    pub fn clear(&self) {
        *self.lock() = RunningHubFaultConfig::default();
    }
    /// See [`RunningHubFaultConfig::response_delay`].
    pub fn set_response_delay(&self, d: Duration) {
        self.set(|f| f.response_delay = d);
    }
    /// See [`RunningHubFaultConfig::endpoint_delays`] (`Duration::ZERO` removes it).
    pub fn set_endpoint_delay(&self, path: &str, d: Duration) {
        self.set(|f| {
            if d.is_zero() {
                f.endpoint_delays.remove(path);
            } else {
                f.endpoint_delays.insert(path.to_owned(), d);
            }
        });
    }
    /// See [`RunningHubFaultConfig::proxy_delay`].
    pub fn set_proxy_delay(&self, d: Duration) {
        self.set(|f| f.proxy_delay = d);
    }
    /// See [`RunningHubFaultConfig::http_errors`].
    pub fn set_http_errors(&self, e: Option<HttpErrors>) {
        self.set(|f| f.http_errors = e);
    }
    /// The next `n` HTTP requests answer `status` (e.g. 502).
    pub fn fail_next_http(&self, n: u32, status: u16) {
        self.set_http_errors(Some(HttpErrors {
            status,
            trigger: Trigger::Next(n),
            path_contains: None,
        }));
    }
    /// See [`RunningHubFaultConfig::malformed_json`].
    pub fn set_malformed_json(&self, t: Trigger) {
        self.set(|f| f.malformed_json = t);
    }
    /// Add or remove a workflow id from [`RunningHubFaultConfig::hang_workflows`].
    pub fn set_hang_workflow(&self, workflow_id: &str, hang: bool) {
        self.set(|f| {
            if hang {
                f.hang_workflows.insert(workflow_id.to_owned());
            } else {
                f.hang_workflows.remove(workflow_id);
            }
        });
    }
    /// See [`RunningHubFaultConfig::hang_tasks`].
    pub fn set_hang_tasks(&self, t: Trigger) {
        self.set(|f| f.hang_tasks = t);
    }
    /// See [`RunningHubFaultConfig::fail_tasks`].
    pub fn set_fail_tasks(&self, t: Trigger) {
        self.set(|f| f.fail_tasks = t);
    }
    /// See [`RunningHubFaultConfig::silent_websocket`].
    pub fn set_silent_websocket(&self, on: bool) {
        self.set(|f| f.silent_websocket = on);
    }

    /// See [`RunningHubFaultConfig::hang_websocket_handshake`].
    pub fn set_hang_websocket_handshake(&self, on: bool) {
        self.set(|f| f.hang_websocket_handshake = on);
    }

    pub(crate) fn fire(
        &self,
        pick: impl FnOnce(&mut RunningHubFaultConfig) -> &mut Trigger,
    ) -> bool {
        pick(&mut self.lock()).fire()
    }
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

/// Counters of what the simulator saw and did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunningHubStats {
    /// Every HTTP request (including file downloads and WebSocket upgrades).
    pub http_requests: u64,
    /// Requests per endpoint path (`/files/...` counted as `/files`, sockets as `/ws`).
    pub requests: BTreeMap<String, u64>,
    /// Tasks created (create + ai-app/run answered with a task).
    pub tasks_created: u64,
    /// Tasks cancelled while queued or running.
    pub tasks_cancelled: u64,
    /// Creates refused with 814.
    pub tasks_rejected_limit: u64,
    /// Requests refused for an unknown or missing key (401/806).
    pub auth_failures: u64,
    /// Uploads accepted.
    pub uploads: u64,
    /// Most tasks `RUNNING` at the same time, per key, ever (computed from task timelines).
    pub max_running_per_key: BTreeMap<String, u64>,
    /// Most current tasks (queued + running) at the same time, per key, ever.
    pub max_current_per_key: BTreeMap<String, u64>,
    /// WebSocket connections accepted.
    pub ws_connections: u64,
    /// WebSocket messages sent.
    pub ws_messages_sent: u64,
    /// Faults that fired (errors, malformed bodies, hung/failed tasks, silent sockets).
    pub faults_fired: u64,
}

impl RunningHubStats {
    /// Requests seen on `path`.
    pub fn requests_to(&self, path: &str) -> u64 {
        self.requests.get(path).copied().unwrap_or(0)
    }
}
