//! [`FakeBackend`]: an in-process [`Backend`], scriptable per job, with a fault plan.
//!
//! It behaves like a small ComfyUI server: `capacity` workers, a FIFO queue in front of them
//! that reports each waiting execution's position, nodes executed in dependency order with
//! progress ticks (a node's duration comes from its `seconds` input, a per-class table, or a
//! default), output nodes (`Save*`, `Preview*`) producing image artifacts, a history of finished
//! executions for reattachment, and a restart that loses all state. Every sleep is a tokio sleep,
//! so tests run it under a paused clock.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use comfyfleet_core::{
    Artifact, Backend, BackendError, BackendId, ByteStream, CancelAck, Capabilities, Execution,
    ExecutionError, ExecutionEvent, Health, Inventory, JobId, NodeId, RemoteRef, SubmitRequest,
    Workflow,
};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

/// What goes wrong with one submission.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Nothing: the execution runs normally.
    None,
    /// Accepted, reaches the head of the queue, never starts (a GPU hang). Cancel dequeues it.
    HangBeforeStart,
    /// Starts, then goes silent inside node number `node` (0-based, in execution order) until
    /// cancelled.
    HangMidNode {
        /// Which node hangs.
        node: usize,
    },
    /// Like `HangMidNode`, but cancel does nothing (a node stuck in a Python loop): only a
    /// restart ends it.
    Stuck {
        /// Which node hangs.
        node: usize,
    },
    /// Like `HangMidNode`, and a cancel takes `delay` to take effect.
    SlowCancel {
        /// Which node hangs.
        node: usize,
        /// How long the cancel takes.
        delay: Duration,
    },
    /// After `after_nodes` nodes the server crashes: the event stream ends and the execution is
    /// forgotten (reattach finds nothing).
    Crash {
        /// Nodes completed before the crash.
        after_nodes: usize,
    },
    /// After `after_nodes` nodes the execution fails with `error`.
    Fail {
        /// Nodes completed before the failure.
        after_nodes: usize,
        /// The failure.
        error: ExecutionError,
    },
    /// The submit call itself is refused with `error` (validation error, missing node type, 5xx).
    Reject {
        /// The refusal.
        error: ExecutionError,
    },
    /// The submit call never answers.
    SubmitHang,
    /// Runs normally but ignores cancels (the interrupt arrives after the last node): the run
    /// completes anyway.
    IgnoreCancel,
}

/// Counters for assertions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Submit calls.
    pub submitted: u64,
    /// Jobs whose submissions reached this backend, in order.
    pub jobs: Vec<JobId>,
    /// Executions that started.
    pub started: u64,
    /// Executions that succeeded.
    pub succeeded: u64,
    /// Cancel calls.
    pub cancels: u64,
    /// Restarts.
    pub restarts: u64,
    /// Executions running (started, not ended) now.
    pub running: u64,
    /// The most executions ever running at once.
    pub max_running: u64,
}

type FaultFn = Arc<dyn Fn(&SubmitRequest) -> Fault + Send + Sync>;

/// Builds a [`FakeBackend`].
pub struct FakeBackendBuilder {
    id: BackendId,
    capacity: u32,
    node_classes: Option<BTreeSet<String>>,
    labels: Vec<(String, String)>,
    default_node: Duration,
    class_durations: HashMap<String, Duration>,
    ticks: u32,
    faults: VecDeque<Fault>,
    fault_fn: Option<FaultFn>,
    restart: bool,
}

impl std::fmt::Debug for FakeBackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeBackendBuilder")
            .field("id", &self.id)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl FakeBackendBuilder {
    /// Number of workers (executions at once; more wait in the queue).
    pub fn capacity(mut self, n: u32) -> Self {
        self.capacity = n.max(1);
        self
    }

    /// The node classes it has (default: unknown, it runs anything).
    pub fn node_classes<I, S>(mut self, classes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.node_classes = Some(classes.into_iter().map(Into::into).collect());
        self
    }

    /// The standard node classes of [`crate::workflows`].
    pub fn standard_nodes(self) -> Self {
        self.node_classes(crate::workflows::STANDARD_CLASSES.iter().copied())
    }

    /// Adds a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }

    /// Duration of a node without a `seconds` input (default zero: instant).
    pub fn node_duration(mut self, d: Duration) -> Self {
        self.default_node = d;
        self
    }

    /// Duration of nodes of one class.
    pub fn class_duration(mut self, class: &str, d: Duration) -> Self {
        self.class_durations.insert(class.into(), d);
        self
    }

    /// Progress ticks per timed node (default 4).
    pub fn ticks(mut self, n: u32) -> Self {
        self.ticks = n.max(1);
        self
    }

    /// Faults for the next submissions, in order (then [`Fault::None`], or the fault function).
    pub fn faults(mut self, faults: impl IntoIterator<Item = Fault>) -> Self {
        self.faults.extend(faults);
        self
    }

    /// Decides a fault per submission (used once the queued faults are spent).
    pub fn fault_fn(mut self, f: impl Fn(&SubmitRequest) -> Fault + Send + Sync + 'static) -> Self {
        self.fault_fn = Some(Arc::new(f));
        self
    }

    /// It can restart (the last rung of the force-cancel ladder).
    pub fn restartable(mut self, yes: bool) -> Self {
        self.restart = yes;
        self
    }

    /// The backend.
    pub fn build(self) -> Arc<FakeBackend> {
        Arc::new_cyclic(|me| FakeBackend {
            me: me.clone(),
            restarted: Notify::new(),
            id: self.id,
            capacity: self.capacity,
            inventory: Inventory {
                node_classes: self.node_classes,
                models: None,
                labels: self.labels.into_iter().collect(),
                facts: Default::default(),
            },
            default_node: self.default_node,
            class_durations: self.class_durations,
            ticks: self.ticks,
            restart: self.restart,
            fault_fn: self.fault_fn,
            counter: AtomicU64::new(0),
            state: Mutex::new(State {
                faults: self.faults,
                healthy: true,
                ..State::default()
            }),
        })
    }
}

struct Exec {
    tx: mpsc::UnboundedSender<ExecutionEvent>,
    cancel: Arc<Notify>,
    cancelled: bool,
    start: Option<oneshot::Sender<()>>,
    external: bool,
    last_position: Option<u32>,
}

#[derive(Default)]
struct State {
    faults: VecDeque<Fault>,
    execs: HashMap<RemoteRef, Exec>,
    waiting: VecDeque<RemoteRef>,
    running: u32,
    history: HashMap<RemoteRef, ExecutionEvent>,
    generation: u64,
    healthy: bool,
    stats: FakeStats,
}

/// An in-process backend for tests and the demo. See the module documentation.
pub struct FakeBackend {
    me: std::sync::Weak<FakeBackend>,
    restarted: Notify,
    id: BackendId,
    capacity: u32,
    inventory: Inventory,
    default_node: Duration,
    class_durations: HashMap<String, Duration>,
    ticks: u32,
    restart: bool,
    fault_fn: Option<FaultFn>,
    counter: AtomicU64,
    state: Mutex<State>,
}

impl std::fmt::Debug for FakeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeBackend")
            .field("id", &self.id)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl FakeBackend {
    /// Starts building a fake backend named `id` (capacity 1, instant nodes, no faults).
    pub fn builder(id: &str) -> FakeBackendBuilder {
        FakeBackendBuilder {
            id: BackendId::new(id),
            capacity: 1,
            node_classes: None,
            labels: Vec::new(),
            default_node: Duration::ZERO,
            class_durations: HashMap::new(),
            ticks: 4,
            faults: VecDeque::new(),
            fault_fn: None,
            restart: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Test double: a panic in a test thread must not hide later assertions.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters so far.
    pub fn stats(&self) -> FakeStats {
        self.lock().stats.clone()
    }

    /// Makes health checks fail or pass.
    pub fn set_healthy(&self, healthy: bool) {
        self.lock().healthy = healthy;
    }

    /// Adds faults for the next submissions.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.lock().faults.extend(faults);
    }

    /// Another client's prompt occupies one worker for `d` (it is not ours and never reported).
    pub fn occupy(self: &Arc<Self>, d: Duration) {
        let remote = RemoteRef::new(format!(
            "external-{}",
            self.counter.fetch_add(1, Ordering::SeqCst)
        ));
        let (tx, _rx) = mpsc::unbounded_channel();
        let (start_tx, start_rx) = oneshot::channel();
        {
            let mut s = self.lock();
            s.execs.insert(
                remote.clone(),
                Exec {
                    tx,
                    cancel: Arc::new(Notify::new()),
                    cancelled: false,
                    start: Some(start_tx),
                    external: true,
                    last_position: None,
                },
            );
            s.waiting.push_back(remote.clone());
            self.schedule(&mut s);
        }
        let me = self.clone();
        tokio::spawn(async move {
            if start_rx.await.is_ok() {
                tokio::time::sleep(d).await;
            }
            me.end(&remote, None, false);
        });
    }

    /// Starts waiting executions while workers are free; tells the rest their position.
    fn schedule(&self, s: &mut State) {
        while s.running < self.capacity {
            let Some(next) = s.waiting.pop_front() else {
                break;
            };
            if let Some(e) = s.execs.get_mut(&next)
                && let Some(start) = e.start.take()
            {
                s.running += 1;
                let _ = start.send(());
            }
        }
        let busy = u32::from(s.running >= self.capacity);
        let waiting: Vec<RemoteRef> = s.waiting.iter().cloned().collect();
        for (i, r) in waiting.iter().enumerate() {
            let pos = u32::try_from(i).unwrap_or(u32::MAX) + busy;
            if let Some(e) = s.execs.get_mut(r)
                && e.last_position != Some(pos)
            {
                e.last_position = Some(pos);
                let _ = e.tx.send(ExecutionEvent::Queued { position: pos });
            }
        }
    }

    fn send(&self, remote: &RemoteRef, ev: ExecutionEvent) {
        if let Some(e) = self.lock().execs.get(remote) {
            let _ = e.tx.send(ev);
        }
    }

    /// Ends an execution: frees its worker, records the terminal event in history (unless it
    /// crashed), and closes its stream.
    fn end(&self, remote: &RemoteRef, terminal: Option<ExecutionEvent>, had_worker_started: bool) {
        let mut s = self.lock();
        let Some(e) = s.execs.remove(remote) else {
            return;
        };
        let started = e.start.is_none();
        if started {
            s.running = s.running.saturating_sub(1);
        } else {
            s.waiting.retain(|r| r != remote);
        }
        if had_worker_started {
            s.stats.running = s.stats.running.saturating_sub(1);
        }
        if let Some(t) = terminal {
            if matches!(t, ExecutionEvent::Succeeded { .. }) {
                s.stats.succeeded += 1;
            }
            if !e.external {
                s.history.insert(remote.clone(), t.clone());
            }
            let _ = e.tx.send(t);
        }
        self.schedule(&mut s);
    }

    fn next_fault(&self, req: &SubmitRequest) -> Fault {
        let queued = self.lock().faults.pop_front();
        match queued {
            Some(f) => f,
            None => self.fault_fn.as_ref().map_or(Fault::None, |f| f(req)),
        }
    }

    fn node_duration(&self, workflow: &Workflow, node: &str) -> Duration {
        let n = &workflow.graph()[node];
        if let Some(secs) = n
            .get("inputs")
            .and_then(|i| i.get("seconds"))
            .and_then(Value::as_f64)
            && secs.is_finite()
            && secs >= 0.0
        {
            return Duration::from_secs_f64(secs);
        }
        workflow
            .class_of(node)
            .and_then(|c| self.class_durations.get(c))
            .copied()
            .unwrap_or(self.default_node)
    }

    fn self_arc(&self) -> Arc<FakeBackend> {
        self.me
            .upgrade()
            .expect("a FakeBackend only exists inside the Arc its builder made")
    }

    /// Waits for a cancel of this execution.
    async fn cancelled(cancel: &Notify) {
        cancel.notified().await;
    }

    /// Waits for a restart of the backend (which drops every execution).
    async fn until_restart(&self, generation: u64) {
        let notified = self.restarted.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.lock().generation != generation {
            return;
        }
        notified.await;
    }

    async fn execute(
        self: Arc<Self>,
        remote: RemoteRef,
        req: SubmitRequest,
        fault: Fault,
        start: oneshot::Receiver<()>,
        cancel: Arc<Notify>,
    ) {
        let generation = self.lock().generation;
        // Wait for a worker (or a cancel that dequeues us).
        tokio::select! {
            r = start => if r.is_err() { return },
            _ = Self::cancelled(&cancel) => {
                self.end(&remote, Some(ExecutionEvent::Interrupted), false);
                return;
            }
        }
        if fault == Fault::HangBeforeStart {
            // Holds its worker and never starts; a cancel removes it (ComfyUI would dequeue).
            tokio::select! {
                _ = Self::cancelled(&cancel) => self.end(&remote, Some(ExecutionEvent::Interrupted), false),
                _ = self.until_restart(generation) => {}
            }
            return;
        }
        {
            let mut s = self.lock();
            if s.generation != generation {
                return;
            }
            s.stats.started += 1;
            s.stats.running += 1;
            s.stats.max_running = s.stats.max_running.max(s.stats.running);
        }
        self.send(&remote, ExecutionEvent::Started);
        let order = topo_order(&req.workflow);
        let mut artifacts = Vec::new();
        for (i, node) in order.iter().enumerate() {
            match &fault {
                Fault::Crash { after_nodes } if *after_nodes == i => {
                    // Lost: no terminal event, no history; the stream just ends.
                    self.end(&remote, None, true);
                    return;
                }
                Fault::Fail { after_nodes, error } if *after_nodes == i => {
                    let error = error.clone();
                    self.end(&remote, Some(ExecutionEvent::Failed { error }), true);
                    return;
                }
                _ => {}
            }
            self.send(&remote, ExecutionEvent::NodeStarted { node: node.clone() });
            match &fault {
                Fault::HangMidNode { node: n } if *n == i => {
                    Self::cancelled(&cancel).await;
                    self.end(&remote, Some(ExecutionEvent::Interrupted), true);
                    return;
                }
                Fault::SlowCancel { node: n, delay } if *n == i => {
                    Self::cancelled(&cancel).await;
                    tokio::time::sleep(*delay).await;
                    self.end(&remote, Some(ExecutionEvent::Interrupted), true);
                    return;
                }
                Fault::Stuck { node: n } if *n == i => {
                    // Ignores cancel; only a restart (which drops the stream) ends it.
                    self.until_restart(generation).await;
                    return;
                }
                _ => {}
            }
            let d = self.node_duration(&req.workflow, node);
            if !d.is_zero() {
                let step = d / self.ticks;
                let listen = fault != Fault::IgnoreCancel;
                for t in 1..=self.ticks {
                    tokio::select! {
                        _ = tokio::time::sleep(step) => {}
                        _ = Self::cancelled(&cancel), if listen => {
                            self.end(&remote, Some(ExecutionEvent::Interrupted), true);
                            return;
                        }
                    }
                    self.send(
                        &remote,
                        ExecutionEvent::Progress {
                            node: node.clone(),
                            value: f64::from(t),
                            max: f64::from(self.ticks),
                        },
                    );
                }
            }
            let class = req.workflow.class_of(node).unwrap_or("");
            if class.starts_with("Save") || class.starts_with("Preview") {
                let n = self.counter.fetch_add(1, Ordering::SeqCst);
                let filename = format!("fleet_{n:05}_.png");
                let a = Artifact {
                    node: node.clone(),
                    filename: filename.clone(),
                    kind: "image".into(),
                    content_type: Some("image/png".into()),
                    size: None,
                    sha256: None,
                    backend: self.id.clone(),
                    locator: json!({"filename": filename, "subfolder": "", "type": "output"}),
                };
                self.send(
                    &remote,
                    ExecutionEvent::NodeOutput {
                        node: node.clone(),
                        artifacts: vec![a.clone()],
                    },
                );
                artifacts.push(a);
            }
            self.send(&remote, ExecutionEvent::NodeFinished { node: node.clone() });
        }
        self.end(&remote, Some(ExecutionEvent::Succeeded { artifacts }), true);
    }
}

/// Nodes in dependency order (ties by id), so inputs run before the nodes that use them.
fn topo_order(workflow: &Workflow) -> Vec<NodeId> {
    let graph = workflow.graph();
    let mut deps: HashMap<&str, Vec<&str>> = HashMap::new();
    for (id, node) in graph {
        let mut d = Vec::new();
        if let Some(inputs) = node.get("inputs").and_then(Value::as_object) {
            for v in inputs.values() {
                if let Some([Value::String(src), _]) = v.as_array().map(Vec::as_slice) {
                    d.push(src.as_str());
                }
            }
        }
        deps.insert(id.as_str(), d);
    }
    let mut ids: Vec<&str> = graph.keys().map(String::as_str).collect();
    ids.sort();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::new();
    while order.len() < ids.len() {
        let before = order.len();
        for id in &ids {
            if !done.contains(id) && deps[id].iter().all(|d| done.contains(d)) {
                done.insert(id);
                order.push((*id).to_owned());
            }
        }
        if order.len() == before {
            break; // validated workflows have no cycles; stop rather than spin
        }
    }
    order
}

#[async_trait]
impl Backend for FakeBackend {
    fn id(&self) -> &BackendId {
        &self.id
    }

    fn kind(&self) -> &'static str {
        "fake"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_concurrent: self.capacity,
            interrupt: true,
            restart: self.restart,
            uploads: false,
            hosted_workflows: false,
            queue_position: true,
            reattach: true,
        }
    }

    async fn inventory(&self) -> Result<Inventory, BackendError> {
        Ok(self.inventory.clone())
    }

    async fn health(&self) -> Health {
        let s = self.lock();
        if s.healthy {
            Health {
                healthy: true,
                queue_depth: Some(u32::try_from(s.execs.len()).unwrap_or(u32::MAX)),
                detail: String::new(),
            }
        } else {
            Health::down("fake backend set unhealthy")
        }
    }

    async fn submit(&self, req: SubmitRequest) -> Result<Execution, BackendError> {
        {
            let mut s = self.lock();
            s.stats.submitted += 1;
            s.stats.jobs.push(req.job);
        }
        if let Some(classes) = &self.inventory.node_classes
            && let Some(missing) = req
                .workflow
                .required_classes()
                .into_iter()
                .find(|c| !classes.contains(c))
        {
            let node = req
                .workflow
                .node_ids()
                .into_iter()
                .find(|n| req.workflow.class_of(n) == Some(missing.as_str()));
            return Err(ExecutionError::missing_node(missing, node).into());
        }
        let fault = self.next_fault(&req);
        match fault {
            Fault::Reject { error } => return Err(error.into()),
            Fault::SubmitHang => std::future::pending::<()>().await,
            _ => {}
        }
        let remote = RemoteRef::new(format!(
            "{}-{}",
            self.id,
            self.counter.fetch_add(1, Ordering::SeqCst)
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let (start_tx, start_rx) = oneshot::channel();
        let cancel = Arc::new(Notify::new());
        let _ = tx.send(ExecutionEvent::Accepted);
        {
            let mut s = self.lock();
            s.execs.insert(
                remote.clone(),
                Exec {
                    tx,
                    cancel: cancel.clone(),
                    cancelled: false,
                    start: Some(start_tx),
                    external: false,
                    last_position: None,
                },
            );
            s.waiting.push_back(remote.clone());
        }
        // `self` is behind an Arc in every use (the builder returns one); find it to spawn.
        let me = self.self_arc();
        tokio::spawn(
            me.clone()
                .execute(remote.clone(), req, fault, start_rx, cancel),
        );
        {
            let mut s = me.lock();
            me.schedule(&mut s);
        }
        Ok(Execution {
            remote,
            events: Box::pin(UnboundedReceiverStream::new(rx)),
        })
    }

    async fn cancel(&self, remote: &RemoteRef) -> Result<CancelAck, BackendError> {
        let mut s = self.lock();
        s.stats.cancels += 1;
        let Some(e) = s.execs.get_mut(remote) else {
            return Ok(CancelAck::NotFound);
        };
        e.cancelled = true;
        // notify_one stores a permit, so a cancel that lands before the task waits is not lost.
        e.cancel.notify_one();
        Ok(if e.start.is_some() {
            CancelAck::Dequeued
        } else {
            CancelAck::InterruptSent
        })
    }

    async fn reattach(&self, remote: &RemoteRef) -> Result<Option<Execution>, BackendError> {
        let mut s = self.lock();
        if let Some(t) = s.history.get(remote) {
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(t.clone());
            return Ok(Some(Execution {
                remote: remote.clone(),
                events: Box::pin(UnboundedReceiverStream::new(rx)),
            }));
        }
        let Some(e) = s.execs.get_mut(remote) else {
            return Ok(None);
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // The old stream (held by a dead orchestrator) is closed; events go to the new one.
        e.tx = tx;
        Ok(Some(Execution {
            remote: remote.clone(),
            events: Box::pin(UnboundedReceiverStream::new(rx)),
        }))
    }

    async fn restart(&self) -> Result<(), BackendError> {
        if !self.restart {
            return Err(BackendError::NotSupported {
                backend: self.id.clone(),
                operation: "restart",
            });
        }
        let mut s = self.lock();
        s.generation += 1;
        s.stats.restarts += 1;
        s.stats.running = 0;
        // Dropping every execution closes its stream: the process died with them.
        s.execs.clear();
        s.waiting.clear();
        s.history.clear();
        s.running = 0;
        self.restarted.notify_waiters();
        Ok(())
    }

    async fn fetch(&self, artifact: &Artifact) -> Result<ByteStream, BackendError> {
        if artifact.backend != self.id {
            return Err(BackendError::NotFound(artifact.filename.clone()));
        }
        let bytes = Bytes::from(format!("\u{89}PNG fake image {}", artifact.filename).into_bytes());
        Ok(Box::pin(futures::stream::once(async move { Ok(bytes) })))
    }
}
