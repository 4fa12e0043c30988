//! [`ComfyUiConfig`]: one ComfyUI server as a backend.

use std::collections::BTreeMap;
use std::time::Duration;

use comfyfleet_core::BackendId;
use url::Url;

/// Settings of one [`crate::ComfyUiBackend`].
#[derive(Debug, Clone)]
pub struct ComfyUiConfig {
    /// Its id in the fleet.
    pub id: BackendId,
    /// The server, e.g. `http://gpu-1:8188` (the client always uses the `/api/...` routes).
    pub base_url: Url,
    /// Extra prompts of ours kept queued on the server so its GPU never idles between jobs
    /// (the start clock still runs only from the queue head). 0: one at a time.
    pub prefetch: u32,
    /// Timeout of every HTTP call (default 10 s).
    pub http_timeout: Duration,
    /// First history/queue check interval after submit; doubles up to `poll_max` (default 50 ms).
    pub poll_min: Duration,
    /// Longest interval between checks while the socket is healthy (default 500 ms): it bounds
    /// completion detection when a socket is silently broken (e.g. behind a proxy).
    pub poll_max: Duration,
    /// Longest interval between checks while the socket is down or silent (default 250 ms).
    pub poll_degraded: Duration,
    /// WebSocket keepalive ping (default 15 s); a socket that misses two pongs is replaced.
    pub ping_interval: Duration,
    /// How long submit waits for the socket to connect before relying on polling (default 2 s).
    pub connect_timeout: Duration,
    /// Finished prompts' history entries are deleted from the server after this (default 10 min).
    pub history_retention: Duration,
    /// Largest request body sent (default 100 MiB, ComfyUI's default; lowered to the server's
    /// own `max_upload_size` from `/api/features` once known). A bigger workflow is refused
    /// before anything is sent.
    pub max_body: u64,
    /// Labels for routing constraints.
    pub labels: BTreeMap<String, String>,
}

impl ComfyUiConfig {
    /// Defaults for a server at `base_url`.
    pub fn new(id: &str, base_url: Url) -> Self {
        ComfyUiConfig {
            id: BackendId::new(id),
            base_url,
            prefetch: 0,
            http_timeout: Duration::from_secs(10),
            poll_min: Duration::from_millis(50),
            poll_max: Duration::from_millis(500),
            poll_degraded: Duration::from_millis(250),
            ping_interval: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(2),
            history_retention: Duration::from_secs(600),
            max_body: 100 * 1024 * 1024,
            labels: BTreeMap::new(),
        }
    }
}
