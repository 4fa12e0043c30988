//! [`EngineConfig`]: the engine's clocks and intervals, with documented defaults.

use std::collections::HashMap;
use std::time::Duration;

/// Settings of an [`crate::Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This engine's name in leases (unique per process).
    pub owner: String,
    /// How long a claim stays valid without a heartbeat (default 30 s).
    pub lease_ttl: Duration,
    /// How often a running attempt renews its lease and asks for cancel requests (default 10 s).
    pub heartbeat_interval: Duration,
    /// Start timeout, counted from the moment our execution is at the head of the backend's
    /// queue (default 5 s; zero turns it off).
    pub start_timeout: Duration,
    /// Longest wait in a backend's own queue behind other executions (position > 0) before the
    /// job goes elsewhere (default 600 s; zero: off). Waiting one's turn is not a hang, but
    /// waiting forever behind a stuck prompt is.
    pub queue_timeout: Duration,
    /// Node timeout: no event from the running node for this long (default 300 s; zero: off).
    pub node_timeout: Duration,
    /// Node timeout per node class; wins over `node_timeout`.
    pub node_class_timeouts: HashMap<String, Duration>,
    /// Longest wait for a backend's submit call (default 30 s).
    pub dispatch_timeout: Duration,
    /// Longest wait for other backend calls: cancel, reattach, restart, health, inventory
    /// (default 10 s).
    pub call_timeout: Duration,
    /// After a cancel, how long the execution may take to stop before the backend is restarted
    /// or quarantined (default 10 s).
    pub cancel_grace: Duration,
    /// Progress and node events are written at most this often per attempt (default 250 ms).
    pub progress_flush: Duration,
    /// A job whose eligible backends are all busy is looked at again after this (default 500 ms).
    pub capacity_wait: Duration,
    /// The dispatcher polls the store at least this often when idle (default 1 s).
    pub idle_poll: Duration,
    /// Health checks per backend (default 15 s).
    pub health_interval: Duration,
    /// Inventory refresh per backend (default 5 min).
    pub inventory_interval: Duration,
    /// Reaper and other maintenance, on the elected leader (default 15 s).
    pub maintenance_interval: Duration,
    /// The reaper treats a running job with no progress for this long as stuck (default: off;
    /// the engine's own node timeout handles live executions).
    pub stuck_after: Option<Duration>,
    /// A job whose orchestrator died this many times is failed instead of requeued (default 3).
    pub max_crash_requeues: u32,
    /// Capacity of the live event channel; slower subscribers get a `Lagged` signal (default
    /// 4096).
    pub event_buffer: usize,
    /// Several orchestrators share the store (PostgreSQL, or one SQLite file for several
    /// workers): each backend's capacity is counted in the store across all of them (an
    /// attempt the store refuses as full goes to another backend or waits), and workflow
    /// blocks and open circuits are shared (default off: this engine counts its own).
    pub shared_store: bool,
    /// With `shared_store`: how often restrictions are exchanged with the other orchestrators
    /// (default 1 s).
    pub share_interval: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            owner: format!("engine-{}", comfyfleet_core::JobId::new()),
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            start_timeout: Duration::from_secs(5),
            queue_timeout: Duration::from_secs(600),
            node_timeout: Duration::from_secs(300),
            node_class_timeouts: HashMap::new(),
            dispatch_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(10),
            cancel_grace: Duration::from_secs(10),
            progress_flush: Duration::from_millis(250),
            capacity_wait: Duration::from_millis(500),
            idle_poll: Duration::from_secs(1),
            health_interval: Duration::from_secs(15),
            inventory_interval: Duration::from_secs(300),
            maintenance_interval: Duration::from_secs(15),
            stuck_after: None,
            max_crash_requeues: 3,
            event_buffer: 4096,
            shared_store: false,
            share_interval: Duration::from_secs(1),
        }
    }
}
