//! Shared state of one simulated process, the FIFO event bus (`send_sync` + `publish_loop`),
//! and the lifecycle: start, crash-and-restart (with its 503 start-up window and the custom
//! nodes rescan), shutdown.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::catalogue::{self, Catalogue};
use super::config::{SimConfig, SimFaults, SimStats};
use super::custom_nodes::{self, Pack};
use super::files::Files;
use super::json::{J, jobj};
use super::queue::{Cache, History, QueueItem};
use super::{exec, http, py};

/// What one process holds in RAM (lost on restart).
#[derive(Debug)]
pub(crate) struct State {
    /// `PromptServer.number`.
    pub(crate) number: i64,
    /// The heap array.
    pub(crate) queue: Vec<QueueItem>,
    pub(crate) seq: u64,
    /// `currently_running` (one worker: at most one item).
    pub(crate) running: Option<QueueItem>,
    pub(crate) history: History,
    pub(crate) free_memory: bool,
    pub(crate) unload_models: bool,
    /// `PromptServer.client_id`: the client of the last prompt started.
    pub(crate) client_id: Option<String>,
    /// `PromptServer.last_node_id`.
    pub(crate) last_node_id: Option<String>,
    pub(crate) cache: Cache,
    /// `PromptExecutor.success` (only updated when a node runs; reset by `/free`).
    pub(crate) success: bool,
}

impl State {
    fn new() -> State {
        State {
            number: 0,
            queue: Vec::new(),
            seq: 0,
            running: None,
            history: History::default(),
            free_memory: false,
            unload_models: false,
            client_id: None,
            last_node_id: None,
            cache: Cache::default(),
            success: true,
        }
    }
    pub(crate) fn queue_remaining(&self) -> usize {
        self.queue.len() + usize::from(self.running.is_some())
    }
}

/// A registered WebSocket (`PromptServer.sockets[sid]`).
#[derive(Debug)]
pub(crate) struct SockEntry {
    pub(crate) conn: u64,
    pub(crate) tx: UnboundedSender<String>,
}

/// Socket registry plus every live connection (also silent and replaced ones) for
/// `drop_all_sockets`.
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    pub(crate) map: HashMap<String, SockEntry>,
    pub(crate) conns: HashMap<u64, CancellationToken>,
}

/// One message on the FIFO bus.
#[derive(Debug)]
pub(crate) struct Outgoing {
    event: String,
    data: J,
    sid: Option<String>,
}

#[derive(Debug)]
struct Runtime {
    generation: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Everything the handlers, the worker and the publisher share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: SimConfig,
    pub(crate) faults: SimFaults,
    stats: Mutex<SimStats>,
    /// When each prompt finished (history written, before its terminal messages are sent).
    finished: Mutex<HashMap<String, std::time::Instant>>,
    /// When the worker began executing each prompt.
    started: Mutex<HashMap<String, std::time::Instant>>,
    pub(crate) catalogue: RwLock<Catalogue>,
    files: Mutex<Files>,
    state: Mutex<State>,
    sockets: Mutex<Sockets>,
    /// `nodes.interrupt_processing` flag.
    pub(crate) interrupt: AtomicBool,
    /// Wakes the worker (queue put, `/free`).
    pub(crate) wake: Notify,
    bus: Mutex<Option<UnboundedSender<Outgoing>>>,
    runtime: Mutex<Option<Runtime>>,
    conn_seq: AtomicU64,
    pub(crate) addr: Mutex<SocketAddr>,
    /// The bound port; it stays open across restarts (except a restart with downtime) so that
    /// nothing else can take it.
    listener: Mutex<Option<Arc<TcpListener>>>,
    /// A restart is under way: every HTTP request answers 503.
    pub(crate) starting: AtomicBool,
    /// `shutdown()` or drop: no restart may bring the server back.
    closed: AtomicBool,
    /// One restart at a time.
    restart_lock: tokio::sync::Mutex<()>,
    /// What the last custom nodes scan loaded.
    packs: Mutex<Vec<Pack>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Milliseconds since the epoch (`int(time.time() * 1000)`).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Inner {
    pub(crate) fn new(config: SimConfig) -> Inner {
        let mut cat = Catalogue::default();
        for name in &config.node_classes {
            if let Some(def) = catalogue::builtin(name) {
                cat.insert(def);
            }
        }
        for (name, output) in &config.extra_node_classes {
            cat.insert(catalogue::custom(name, *output));
        }
        let mut files = Files::new(&config.base_dir);
        for (name, data) in &config.input_files {
            let path = py::join(&files.input_dir(), name);
            files.write(&path, Bytes::from(data.clone()));
        }
        for (folder, names) in &config.models {
            for n in names {
                let path = format!("{}/models/{folder}/{n}", files.base());
                files.write(&path, Bytes::new());
            }
        }
        Inner {
            faults: SimFaults::new(config.faults.clone()),
            config,
            stats: Mutex::new(SimStats::default()),
            finished: Mutex::new(HashMap::new()),
            started: Mutex::new(HashMap::new()),
            catalogue: RwLock::new(cat),
            files: Mutex::new(files),
            state: Mutex::new(State::new()),
            sockets: Mutex::new(Sockets::default()),
            interrupt: AtomicBool::new(false),
            wake: Notify::new(),
            bus: Mutex::new(None),
            runtime: Mutex::new(None),
            conn_seq: AtomicU64::new(1),
            addr: Mutex::new(SocketAddr::from(([127, 0, 0, 1], 0))),
            listener: Mutex::new(None),
            starting: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            restart_lock: tokio::sync::Mutex::new(()),
            packs: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
    pub(crate) fn files(&self) -> MutexGuard<'_, Files> {
        lock(&self.files)
    }
    pub(crate) fn sockets(&self) -> MutexGuard<'_, Sockets> {
        lock(&self.sockets)
    }
    pub(crate) fn catalogue(&self) -> std::sync::RwLockReadGuard<'_, Catalogue> {
        self.catalogue
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }
    pub(crate) fn catalogue_mut(&self) -> std::sync::RwLockWriteGuard<'_, Catalogue> {
        self.catalogue
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
    pub(crate) fn stat(&self, f: impl FnOnce(&mut SimStats)) {
        f(&mut lock(&self.stats));
    }
    pub(crate) fn stats(&self) -> SimStats {
        lock(&self.stats).clone()
    }
    pub(crate) fn mark_finished(&self, prompt_id: &str) {
        lock(&self.finished).insert(prompt_id.to_owned(), std::time::Instant::now());
    }
    pub(crate) fn finished_at(&self, prompt_id: &str) -> Option<std::time::Instant> {
        lock(&self.finished).get(prompt_id).copied()
    }
    pub(crate) fn mark_started(&self, prompt_id: &str) {
        lock(&self.started).insert(prompt_id.to_owned(), std::time::Instant::now());
    }
    pub(crate) fn started_at(&self, prompt_id: &str) -> Option<std::time::Instant> {
        lock(&self.started).get(prompt_id).copied()
    }
    pub(crate) fn packs(&self) -> Vec<Pack> {
        lock(&self.packs).clone()
    }
    pub(crate) fn is_starting(&self) -> bool {
        self.starting.load(Ordering::SeqCst)
    }
    pub(crate) fn next_conn(&self) -> u64 {
        self.conn_seq.fetch_add(1, Ordering::Relaxed)
    }
    pub(crate) fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }
    /// A simulated duration in real time.
    pub(crate) fn scaled(&self, d: Duration) -> Duration {
        let s = self.config.time_scale;
        if s.is_finite() && s > 0.0 {
            d.mul_f64(s)
        } else {
            Duration::ZERO
        }
    }
    /// Fire a fault trigger; counts it.
    pub(crate) fn fire(
        &self,
        pick: impl FnOnce(&mut super::config::FaultConfig) -> &mut super::config::Trigger,
    ) -> bool {
        let fired = self.faults.fire(pick);
        if fired {
            self.stat(|s| s.faults_fired += 1);
        }
        fired
    }

    /// `send_sync(event, data, sid)`: onto the FIFO bus. `sid = None` broadcasts.
    pub(crate) fn emit(&self, event: &str, data: J, sid: Option<&str>) {
        if let Some(tx) = lock(&self.bus).as_ref() {
            let _ = tx.send(Outgoing {
                event: event.to_owned(),
                data,
                sid: sid.map(str::to_owned),
            });
        }
    }

    /// `{"status": {"exec_info": {"queue_remaining": n}}}`.
    pub(crate) fn queue_info(st: &State) -> J {
        jobj! {"exec_info" => jobj!{"queue_remaining" => st.queue_remaining()}}
    }

    /// `queue_updated()`: broadcast `status`, computed now (under the state lock).
    pub(crate) fn queue_updated(&self, st: &State) {
        let n = st.queue_remaining() as u64;
        self.stat(|s| s.max_queue_remaining = s.max_queue_remaining.max(n));
        self.emit("status", jobj! {"status" => Inner::queue_info(st)}, None);
    }

    /// The server's feature flags (`GET /features`, WS `feature_flags` reply).
    pub(crate) fn features(&self) -> J {
        jobj! {"supports_preview_metadata" => true, "max_upload_size" => self.config.max_upload_size as f64}
    }

    fn deliver(&self, msg: &Outgoing, socks: &Sockets) -> u64 {
        let text = jobj! {"type" => msg.event.as_str(), "data" => msg.data.clone()}.to_json();
        let mut sent = 0;
        match &msg.sid {
            None => {
                for e in socks.map.values() {
                    if e.tx.send(text.clone()).is_ok() {
                        sent += 1;
                    }
                }
            }
            Some(sid) => {
                if let Some(e) = socks.map.get(sid)
                    && e.tx.send(text).is_ok()
                {
                    sent += 1;
                }
            }
        }
        sent
    }

    fn deliver_counted(&self, msg: &Outgoing, times: usize) {
        let n = {
            let socks = self.sockets();
            (0..times).map(|_| self.deliver(msg, &socks)).sum::<u64>()
        };
        self.stat(|s| s.ws_messages_sent += n);
    }
}

/// `publish_loop`: drains the bus in order, applies the WebSocket fault knobs.
async fn publisher(inner: Arc<Inner>, mut rx: UnboundedReceiver<Outgoing>) {
    let mut held: Option<Outgoing> = None;
    loop {
        let next = if held.is_some() {
            match tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
                Ok(m) => m,
                Err(_) => {
                    if let Some(h) = held.take() {
                        inner.deliver_counted(&h, 1);
                    }
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(msg) = next else { break };
        if inner.fire(|f| &mut f.ws_drop) {
            continue;
        }
        if held.is_none() && inner.fire(|f| &mut f.ws_reorder) {
            held = Some(msg);
            continue;
        }
        let times = if inner.fire(|f| &mut f.ws_duplicate) {
            2
        } else {
            1
        };
        inner.deliver_counted(&msg, times);
        if let Some(h) = held.take() {
            inner.deliver_counted(&h, 1);
        }
    }
}

/// A listener whose connections all die when the generation is cancelled (crash semantics).
struct KillableListener {
    inner: Arc<TcpListener>,
    generation: CancellationToken,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (KillableIo, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((s, a)) => {
                    let _ = s.set_nodelay(true);
                    return (KillableIo::new(s, self.generation.clone()), a);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A TCP stream that fails every read/write once its generation is cancelled, so hyper (and an
/// upgraded WebSocket) drop it at once.
pub(crate) struct KillableIo {
    io: TcpStream,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    dead: bool,
}

impl KillableIo {
    fn new(io: TcpStream, generation: CancellationToken) -> Self {
        KillableIo {
            io,
            kill: Box::pin(generation.cancelled_owned()),
            dead: false,
        }
    }
    fn check(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if !self.dead && self.kill.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        self.dead
            .then(|| io::Error::from(io::ErrorKind::ConnectionAborted))
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Keep `listener` as the server's port.
pub(crate) fn set_listener(inner: &Inner, listener: TcpListener) {
    *lock(&inner.listener) = Some(Arc::new(listener));
}

/// Start a process generation on the server's port: publisher, worker, HTTP server.
pub(crate) fn start_generation(inner: &Arc<Inner>) {
    let Some(listener) = lock(&inner.listener).clone() else {
        tracing::error!("comfyui_sim: no port to serve on");
        return;
    };
    let generation = CancellationToken::new();
    let (tx, rx) = unbounded_channel();
    *lock(&inner.bus) = Some(tx);
    let publisher = tokio::spawn(publisher(inner.clone(), rx));
    let worker = tokio::spawn(exec::worker(inner.clone()));
    let router = http::router(inner.clone(), generation.clone());
    let killable = KillableListener {
        inner: listener,
        generation: generation.clone(),
    };
    let serve = tokio::spawn(async move {
        let _ = axum::serve(killable, router).await;
    });
    *lock(&inner.runtime) = Some(Runtime {
        generation,
        tasks: vec![serve, worker, publisher],
    });
}

/// Kill the current generation: every connection, the worker (mid-node), the publisher.
fn kill_generation(inner: &Inner) -> Vec<JoinHandle<()>> {
    let Some(rt) = lock(&inner.runtime).take() else {
        return Vec::new();
    };
    {
        let mut s = inner.sockets();
        s.map.clear();
        for (_, t) in s.conns.drain() {
            t.cancel();
        }
    }
    rt.generation.cancel();
    *lock(&inner.bus) = None;
    for t in &rt.tasks {
        t.abort();
    }
    rt.tasks
}

/// Stop and wait until the listener is closed.
pub(crate) async fn stop_generation(inner: &Inner) {
    for t in kill_generation(inner) {
        let _ = t.await;
    }
}

/// Stop for good and wait until the port is closed.
pub(crate) async fn shutdown(inner: &Inner) {
    inner.closed.store(true, Ordering::SeqCst);
    stop_generation(inner).await;
    *lock(&inner.listener) = None;
}

/// Stop for good without waiting (for `Drop`).
pub(crate) fn abort(inner: &Inner) {
    inner.closed.store(true, Ordering::SeqCst);
    let _ = kill_generation(inner);
    *lock(&inner.listener) = None;
}

/// Scan [`SimConfig::custom_nodes_dir`] and replace the classes the previous scan added by what
/// is there now (`init_external_custom_nodes`: built-in names are never replaced).
pub(crate) async fn load_custom_nodes(inner: &Inner) {
    let Some(dir) = inner.config.custom_nodes_dir.clone() else {
        return;
    };
    let packs = tokio::task::spawn_blocking(move || custom_nodes::scan(&dir))
        .await
        .unwrap_or_else(|e| {
            tracing::error!("comfyui_sim: custom nodes scan failed: {e}");
            Vec::new()
        });
    let builtin = |name: &str| {
        inner.config.node_classes.iter().any(|n| n == name) && catalogue::builtin(name).is_some()
    };
    let mut old = lock(&inner.packs);
    let mut cat = inner.catalogue_mut();
    for (_, classes) in old.iter() {
        for class in classes {
            if builtin(class) {
                continue;
            }
            cat.remove(class);
            if let Some(output) = inner.config.extra_node_classes.get(class) {
                cat.insert(catalogue::custom(class, *output));
            }
        }
    }
    for (module, classes) in &packs {
        for class in classes {
            if !builtin(class) {
                cat.insert(catalogue::pack_node(class, module));
            }
        }
        tracing::info!(
            "comfyui_sim: custom nodes {module}: {} classes",
            classes.len()
        );
    }
    *old = packs;
}

/// Crash and start again: every connection dies, the process state is forgotten, the port is
/// closed for `downtime` (connections refused), then for `restart_delay` every request answers
/// 503 while custom nodes load; returns once the server is ready again.
pub(crate) async fn restart(inner: &Arc<Inner>, downtime: Duration) {
    let _one = inner.restart_lock.lock().await;
    if inner.closed.load(Ordering::SeqCst) {
        return;
    }
    inner.starting.store(true, Ordering::SeqCst);
    stop_generation(inner).await;
    reset_process(inner);
    if !downtime.is_zero() {
        *lock(&inner.listener) = None;
        tokio::time::sleep(downtime).await;
        let addr = *lock(&inner.addr);
        match bind(addr).await {
            Ok(listener) => set_listener(inner, listener),
            Err(e) => {
                tracing::error!("comfyui_sim: cannot re-bind {addr}: {e}");
                inner.starting.store(false, Ordering::SeqCst);
                return;
            }
        }
    }
    if inner.closed.load(Ordering::SeqCst) {
        *lock(&inner.listener) = None;
        return;
    }
    start_generation(inner);
    inner.stat(|s| s.restarts += 1);
    tokio::time::sleep(inner.scaled(inner.config.restart_delay)).await;
    load_custom_nodes(inner).await;
    inner.starting.store(false, Ordering::SeqCst);
}

/// Forget everything a process holds in RAM; files stay (except `temp/`).
pub(crate) fn reset_process(inner: &Inner) {
    *inner.state() = State::new();
    *inner.sockets() = Sockets::default();
    inner.interrupt.store(false, Ordering::SeqCst);
    let mut files = inner.files();
    let temp = files.temp_dir();
    files.clear_dir(&temp);
}

/// Bind `addr`, retrying briefly (the old listener may still be closing).
pub(crate) async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("bind failed")))
}
