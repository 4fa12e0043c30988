//! # `ComfyUiSim`: a faithful in-process ComfyUI 0.3.64 server on loopback
//!
//! A real HTTP + WebSocket server (axum on a plain tokio task) that reproduces what a ComfyUI
//! 0.3.64 server sends, as recorded in `comfyui-traces/` and described in the protocol reference
//! (§9 checklist): the `/api` alias, aiohttp-style errors (empty-body 200s, 400 envelopes, 500 text
//! on malformed JSON, 413, 404/405, the Origin/Host 403), one FIFO event bus, one worker, the
//! `heapq` queue, `status` broadcasts, per-prompt routing by `client_id` (with the broadcast
//! leakage of `progress`/`progress_state`/`execution_interrupted` for prompts without one), the
//! exact event order, history entries, the classic output cache, cooperative interrupts, the
//! validation error catalogue, real PNG files behind `/view`, uploads, and fault knobs.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, SimConfig};
//! let sim = ComfyUiSim::start(SimConfig::scaled(0.01)).await?;
//! let url = sim.base_url(); // "http://127.0.0.1:PORT"
//! sim.faults().set_http_delay(std::time::Duration::from_millis(50));
//! sim.restart().await; // crash: queue, history, caches, counter and sockets are gone
//! sim.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Custom nodes: point [`SimConfig::custom_nodes_dir`] at a `custom_nodes/` directory and the
//! packs in it (folders whose `__init__.py` defines `NODE_CLASS_MAPPINGS`) show up in
//! `/object_info` with `python_module: "custom_nodes.<folder>"` and run as pass-through nodes.
//! Packs installed later (say by `git clone` from an installer under test) appear after a
//! restart, which ComfyUI-Manager's `GET /manager/reboot` (also under `/api`) triggers:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, SimConfig};
//! let config = SimConfig::scaled(0.01)
//!     .custom_nodes_dir("/tmp/ComfyUI/custom_nodes")
//!     .restart_delay(std::time::Duration::from_secs(200)); // × 0.01: 2 s of 503s
//! let sim = ComfyUiSim::start(config).await?;
//! // … `git clone` a pack into /tmp/ComfyUI/custom_nodes, GET /api/manager/reboot …
//! println!("{:?}", sim.custom_node_packs()); // [("ComfyUI-Foo", ["FooNode", …])]
//! sim.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Time: every delay uses `tokio::time`, so a paused clock works; `SimConfig::time_scale` shrinks
//! simulated durations for real-time tests.

mod catalogue;
mod config;
mod custom_nodes;
mod exec;
mod files;
mod http;
mod image;
mod json;
mod py;
mod queue;
mod server;
mod validate;
mod ws;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use catalogue::BUILTIN_NODE_CLASSES;
pub use config::{FaultConfig, HangMidNode, HttpErrors, SimConfig, SimFaults, SimStats, Trigger};

/// A running simulated ComfyUI server. Dropping it (or [`ComfyUiSim::shutdown`]) stops it.
#[derive(Debug)]
pub struct ComfyUiSim {
    inner: Arc<server::Inner>,
    addr: SocketAddr,
}

impl ComfyUiSim {
    /// Bind `config.addr`, load the custom nodes (if `config.custom_nodes_dir` is set) and start
    /// serving.
    pub async fn start(config: SimConfig) -> io::Result<ComfyUiSim> {
        let listener = tokio::net::TcpListener::bind(config.addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(server::Inner::new(config));
        if let Ok(mut a) = inner.addr.lock() {
            *a = addr;
        }
        server::set_listener(&inner, listener);
        server::load_custom_nodes(&inner).await;
        server::start_generation(&inner);
        Ok(ComfyUiSim { inner, addr })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://127.0.0.1:PORT/ws?clientId=<client_id>`.
    pub fn ws_url(&self, client_id: &str) -> String {
        let q: String = url::form_urlencoded::byte_serialize(client_id.as_bytes()).collect();
        format!("ws://{}/ws?clientId={q}", self.addr)
    }

    /// The fault knobs; changes apply immediately.
    pub fn faults(&self) -> &SimFaults {
        &self.inner.faults
    }

    /// Crash and restart (what a process restart, e.g. ComfyUI-Manager's `/manager/reboot`,
    /// does): every connection is cut (HTTP and WebSocket), the running prompt dies mid-node,
    /// and the queue, history, caches, prompt counter and interrupt flag are forgotten. Files on
    /// the simulated disk survive (except `temp/`). Then, for [`SimConfig::restart_delay`], every
    /// HTTP request answers 503 while the custom nodes directory is scanned again. Returns once
    /// the server answers normally again.
    pub async fn restart(&self) {
        self.restart_with_downtime(Duration::ZERO).await;
    }

    /// [`ComfyUiSim::restart`] with the port closed for `downtime` first (connections are
    /// refused), then the `restart_delay` of 503s.
    pub async fn restart_with_downtime(&self, downtime: Duration) {
        server::restart(&self.inner, downtime).await;
    }

    /// Whether a restart is under way (HTTP requests answer 503).
    pub fn is_restarting(&self) -> bool {
        self.inner.is_starting()
    }

    /// The custom node packs the last scan of [`SimConfig::custom_nodes_dir`] loaded: module name
    /// (the folder) and its classes, in name order. Empty without a custom nodes directory.
    pub fn custom_node_packs(&self) -> Vec<(String, Vec<String>)> {
        self.inner.packs()
    }

    /// Close every WebSocket connection now (abruptly, no close frame). The server keeps
    /// running; clients may reconnect.
    pub fn drop_all_sockets(&self) {
        let mut s = self.inner.sockets();
        s.map.clear();
        for t in s.conns.values() {
            t.cancel();
        }
    }

    /// Counters so far (cumulative over restarts).
    pub fn stats(&self) -> SimStats {
        self.inner.stats()
    }

    /// When the prompt finished here (its history entry was written, just before its terminal
    /// messages go out): the reference point of completion-detection latency.
    pub fn finished_at(&self, prompt_id: &str) -> Option<std::time::Instant> {
        self.inner.finished_at(prompt_id)
    }

    /// When the worker took the prompt up to execute it (after any `hang_after_accept`): with
    /// [`ComfyUiSim::finished_at`], the GPU's busy and idle times.
    pub fn started_at(&self, prompt_id: &str) -> Option<std::time::Instant> {
        self.inner.started_at(prompt_id)
    }

    /// Add a custom node class at run time (a real server needs a restart to load it; the
    /// simulator takes it at once). See [`SimConfig::extra_node_classes`].
    pub fn install_node_class(&self, class_type: &str, output_node: bool) {
        self.inner
            .catalogue_mut()
            .insert(catalogue::custom(class_type, output_node));
    }

    /// Remove a class from the catalogue at run time (prompts using it then fail validation
    /// with `invalid_prompt`). Returns whether it was there.
    pub fn remove_node_class(&self, class_type: &str) -> bool {
        self.inner.catalogue_mut().remove(class_type)
    }

    /// Restore a built-in class removed with [`ComfyUiSim::remove_node_class`].
    pub fn restore_builtin_class(&self, class_type: &str) -> bool {
        match catalogue::builtin(class_type) {
            Some(def) => {
                self.inner.catalogue_mut().insert(def);
                true
            }
            None => false,
        }
    }

    /// The catalogue's class names, in `/object_info` order.
    pub fn node_classes(&self) -> Vec<String> {
        self.inner.catalogue().names()
    }

    /// Put a file into `input/` (as if uploaded).
    pub fn put_input_file(&self, name: &str, data: impl Into<Bytes>) {
        let mut f = self.inner.files();
        let path = py::join(&f.input_dir(), name);
        f.write(&path, data.into());
    }

    /// Read a file of the simulated disk: `kind` is `output`, `input` or `temp`.
    pub fn file(&self, kind: &str, subfolder: &str, name: &str) -> Option<Bytes> {
        let f = self.inner.files();
        let dir = f.dir_by_type(kind)?;
        f.read(&py::join(&py::join(&dir, subfolder), name))
    }

    /// Stop the server and wait until the port is closed.
    pub async fn shutdown(self) {
        server::shutdown(&self.inner).await;
    }
}

impl Drop for ComfyUiSim {
    fn drop(&mut self) {
        server::abort(&self.inner);
    }
}
