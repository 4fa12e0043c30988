//! [`RunningHubConfig`]: one RunningHub account (API key) as a backend.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use comfyfleet_core::BackendId;
use secrecy::SecretString;
use url::Url;

use crate::client::ClientConfig;

/// The public RunningHub host.
pub const DEFAULT_BASE_URL: &str = "https://www.runninghub.cn";

/// Settings of one [`crate::RunningHubBackend`].
#[derive(Clone)]
pub struct RunningHubConfig {
    /// Its id in the fleet.
    pub id: BackendId,
    /// The API client's settings (base URL, key, instance type, personal queue, call timeouts).
    pub client: ClientConfig,
    /// Most tasks of ours at once (the key's concurrency limit). Default 1.
    pub max_concurrent: u32,
    /// The hosted workflow id used for full API-format workflows (RunningHub's create wants a
    /// `workflowId` next to `workflow`). `None`: only jobs that name a hosted workflow or AI app
    /// run here (see the crate docs).
    pub default_workflow_id: Option<String>,
    /// First interval between status checks (the first check runs right after create).
    /// Default 1 s.
    pub poll_min: Duration,
    /// Longest interval between status checks. Default 5 s.
    pub poll_max: Duration,
    /// Growth factor of the interval while the state does not change. Default 1.5.
    pub poll_growth: f64,
    /// Warn when a task stays in one state this long (again at each doubling). Default 120 s.
    pub stuck_after: Duration,
    /// First wait after a `814` (personal queue full) before creating again. Default 2 s.
    pub backpressure_wait: Duration,
    /// Longest total wait for a free slot in `submit` before a transient error is returned
    /// (keep it below the engine's dispatch timeout). Default 25 s.
    pub backpressure_max_wait: Duration,
    /// Tries of the outputs call after the status says the task ended. Default 10.
    pub outputs_tries: u32,
    /// Download each output once when the task succeeds, to record its size and SHA-256 (a
    /// failed download is logged and leaves them unset: the task is not failed over it).
    /// Default true.
    pub checksum_outputs: bool,
    /// Connect to the task's `netWssUrl` as an accelerator: its progress becomes events and its
    /// end triggers an immediate status check. Polling runs regardless and is the only source
    /// of a task's outcome. Default true.
    pub use_websocket: bool,
    /// How long connecting the task socket may take before it is given up (default 5 s).
    pub websocket_connect_timeout: Duration,
    /// Base of the task page link shown in logs and messages.
    pub task_page_base: String,
    /// Labels for routing constraints.
    pub labels: BTreeMap<String, String>,
}

impl fmt::Debug for RunningHubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningHubConfig")
            .field("id", &self.id)
            .field("client", &self.client)
            .field("max_concurrent", &self.max_concurrent)
            .field("default_workflow_id", &self.default_workflow_id)
            .field("poll_min", &self.poll_min)
            .field("poll_max", &self.poll_max)
            .field("use_websocket", &self.use_websocket)
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl RunningHubConfig {
    /// Defaults for an account reached at `base_url` with `api_key`.
    pub fn new(id: &str, base_url: Url, api_key: SecretString) -> Self {
        RunningHubConfig {
            id: BackendId::new(id),
            client: ClientConfig::new(base_url, api_key),
            max_concurrent: 1,
            default_workflow_id: None,
            poll_min: Duration::from_secs(1),
            poll_max: Duration::from_secs(5),
            poll_growth: 1.5,
            stuck_after: Duration::from_secs(120),
            backpressure_wait: Duration::from_secs(2),
            backpressure_max_wait: Duration::from_secs(25),
            outputs_tries: 10,
            checksum_outputs: true,
            use_websocket: true,
            websocket_connect_timeout: Duration::from_secs(5),
            task_page_base: "https://www.runninghub.cn/task/detail/".into(),
            labels: BTreeMap::new(),
        }
    }

    /// The task page link.
    pub fn task_page(&self, task_id: &str) -> String {
        format!("{}{task_id}", self.task_page_base)
    }
}
