//! [`Engine`]: the runtime that claims jobs, places them, supervises executions and publishes
//! events. The per-attempt supervision lives in [`crate::attempt`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use comfyfleet_core::{
    Availability, Backend, BackendId, CancelOutcome, Candidate, Capabilities, Claimed, Clock,
    Enqueued, ErrorDetail, Event, EventQuery, ExecutionError, FailoverStrategy, Failure,
    FleetEvent, Health, Inventory, JobId, JobRecord, JobSpec, NewJob, Placement, ReapOptions,
    ReapReport, Restriction, SpecError, StoreError, TaskStore, TimeoutPhase, TokioClock,
    WorkflowHash,
};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::attempt::{AttemptCtx, SlotGuard};
use crate::config::EngineConfig;

/// Runs a store write again while it fails for a reason that may pass (a lost connection, a
/// restarting database), backing off exponentially, for at most `lease_ttl` of waiting in all:
/// a write fenced by our lease cannot wrongly succeed later (a reclaimed job answers
/// `LeaseLost`), and giving up early would leave the job for the reaper — and its execution to
/// run again.
pub(crate) async fn retry_store<T, F, Fut>(
    inner: &Inner,
    what: &'static str,
    f: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    use backon::{ExponentialBuilder, Retryable};
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_total_delay(Some(inner.config.lease_ttl))
        .without_max_times()
        .with_jitter();
    f.retry(policy)
        .sleep(tokio::time::sleep)
        .when(StoreError::is_temporary)
        .notify(|e, d| warn!(error = %e, retry_in = ?d, "{what} failed; retrying"))
        .await
}

/// Errors from the engine's API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The job spec is invalid; nothing was stored.
    #[error("invalid job: {0}")]
    InvalidSpec(#[from] SpecError),
    /// No such job.
    #[error("job {0} not found")]
    NotFound(JobId),
    /// No such backend.
    #[error("backend {0} not found")]
    UnknownBackend(BackendId),
    /// Two backends share an id.
    #[error("two backends are named {0}")]
    DuplicateBackend(BackendId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A backend call failed.
    #[error(transparent)]
    Backend(comfyfleet_core::BackendError),
}

/// A backend's state as the engine sees it.
#[derive(Debug, Clone)]
pub struct BackendStatus {
    /// Its id.
    pub id: BackendId,
    /// Its kind.
    pub kind: &'static str,
    /// What it can do.
    pub capabilities: Capabilities,
    /// Our executions running there.
    pub in_flight: u32,
    /// Latest health check.
    pub health: Health,
    /// Operator / engine state.
    pub availability: Availability,
    /// Latest inventory.
    pub inventory: Arc<Inventory>,
    /// What the strategy currently keeps away from it (blocks, an open circuit).
    pub restrictions: Vec<Restriction>,
}

pub(crate) struct SlotState {
    pub(crate) inventory: Arc<Inventory>,
    pub(crate) health: Health,
    pub(crate) availability: Availability,
}

/// One backend in the engine, with its live counters.
pub(crate) struct BackendSlot {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) id: BackendId,
    pub(crate) caps: Capabilities,
    pub(crate) in_flight: AtomicU32,
    pub(crate) state: Mutex<SlotState>,
}

impl BackendSlot {
    pub(crate) fn state(&self) -> MutexGuard<'_, SlotState> {
        // Plain data behind the lock; a panic elsewhere cannot leave it half-written in a way
        // that matters more than stopping the engine would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct RunningEntry {
    pub(crate) cancel: CancellationToken,
    pub(crate) attempt: u32,
}

pub(crate) struct Inner {
    pub(crate) config: EngineConfig,
    pub(crate) store: Arc<dyn TaskStore>,
    pub(crate) strategy: Arc<dyn FailoverStrategy>,
    pub(crate) inputs: Arc<dyn comfyfleet_core::InputStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) slots: Vec<Arc<BackendSlot>>,
    pub(crate) events: broadcast::Sender<FleetEvent>,
    pub(crate) wake: Arc<Notify>,
    pub(crate) running: Mutex<HashMap<JobId, RunningEntry>>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) detach: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) durations: Mutex<HashMap<WorkflowHash, Duration>>,
    /// With `shared_store`: open attempts per backend across every orchestrator, as last read.
    fleet_load: Mutex<HashMap<BackendId, u32>>,
    /// The store's change hints (another orchestrator's work); they end only idle waits, so
    /// our own writes never drive a claim loop.
    hint: Notify,
    started: AtomicBool,
}

impl Inner {
    pub(crate) fn publish(&self, events: Vec<Event>) {
        for e in events {
            // No receivers is fine: nobody is watching.
            let _ = self.events.send(FleetEvent::Job(e));
        }
    }

    pub(crate) fn publish_fleet(&self, e: FleetEvent) {
        let _ = self.events.send(e);
    }

    pub(crate) fn publish_notices(&self) {
        for n in self.strategy.take_notices(self.clock.now()) {
            self.publish_fleet(n);
        }
    }

    /// Wakes the dispatcher when a job released or failed now becomes due at `at`, so it is
    /// not left waiting for the next idle poll.
    pub(crate) fn wake_at(&self, at: comfyfleet_core::Timestamp) {
        let delay = at.since(self.clock.now());
        let wake = self.wake.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => wake.notify_one(),
                _ = shutdown.cancelled() => {}
            }
        });
    }

    pub(crate) fn running(&self) -> MutexGuard<'_, HashMap<JobId, RunningEntry>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn expected_duration(&self, structure: &WorkflowHash) -> Option<Duration> {
        self.durations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(structure)
            .copied()
    }

    pub(crate) fn record_duration(&self, structure: &WorkflowHash, d: Duration) {
        let mut m = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        let v = match m.get(structure) {
            // Exponentially weighted: recent runs matter most, one outlier does not dominate.
            Some(prev) => prev.mul_f64(0.7) + d.mul_f64(0.3),
            None => d,
        };
        m.insert(structure.clone(), v);
    }

    fn slot(&self, id: &BackendId) -> Option<&Arc<BackendSlot>> {
        self.slots.iter().find(|s| &s.id == id)
    }

    fn fleet_load(&self) -> MutexGuard<'_, HashMap<BackendId, u32>> {
        self.fleet_load.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Executions on `slot`: ours, or with `shared_store` every orchestrator's as last read
    /// from the store (whichever is larger: ours may not be in the store yet).
    fn load_of(&self, slot: &BackendSlot, fleet: &HashMap<BackendId, u32>) -> u32 {
        let ours = slot.in_flight.load(Ordering::SeqCst);
        ours.max(fleet.get(&slot.id).copied().unwrap_or(0))
    }

    fn has_free_slot(&self) -> bool {
        let fleet = self.fleet_load();
        self.slots.iter().any(|s| {
            self.load_of(s, &fleet) < s.caps.max_concurrent
                && matches!(s.state().availability, Availability::Active)
        })
    }

    /// Whether one of our own slots is free (with `shared_store`, others may be using it).
    fn has_free_local_slot(&self) -> bool {
        self.slots.iter().any(|s| {
            s.in_flight.load(Ordering::SeqCst) < s.caps.max_concurrent
                && matches!(s.state().availability, Availability::Active)
        })
    }

    /// With `shared_store`: reads every orchestrator's executions per backend.
    async fn refresh_fleet_load(&self) {
        if !self.config.shared_store {
            return;
        }
        match self.store.backend_load().await {
            Ok(load) => *self.fleet_load() = load.into_iter().collect(),
            Err(e) => warn!(error = %e, "could not read the fleet's backend load"),
        }
    }

    fn candidates(&self) -> Vec<Candidate> {
        let fleet = self.fleet_load();
        self.slots
            .iter()
            .map(|s| {
                let st = s.state();
                Candidate {
                    id: s.id.clone(),
                    capabilities: s.caps.clone(),
                    inventory: st.inventory.clone(),
                    in_flight: self.load_of(s, &fleet),
                    health: st.health.clone(),
                    availability: st.availability.clone(),
                }
            })
            .collect()
    }

    /// An idle wait: also ends on a change hint from the store.
    async fn idle(&self, d: Duration) {
        tokio::select! {
            _ = self.hint.notified() => {}
            _ = self.sleep_or_wake(d) => {}
        }
    }

    async fn sleep_or_wake(&self, d: Duration) {
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(d) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }

    async fn dispatch_loop(self: Arc<Self>) {
        // Know what each backend has and whether it answers before placing anything.
        self.refresh_inventories().await;
        self.check_health().await;
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            self.publish_notices();
            self.refresh_fleet_load().await;
            if !self.has_free_slot() {
                if self.config.shared_store && self.has_free_local_slot() {
                    // Busy with other orchestrators' work, which ends without waking us
                    // (unless the store's change hint does): look again soon.
                    self.idle(self.config.capacity_wait / 10).await;
                } else {
                    self.sleep_or_wake(self.config.idle_poll).await;
                }
                continue;
            }
            let now = self.clock.now();
            match self
                .store
                .claim(&self.config.owner, self.config.lease_ttl, now)
                .await
            {
                Ok(Some(claimed)) => {
                    if !self.place(claimed).await {
                        // Nothing could take that job. Others might, but cycling through every
                        // waiting job would turn a stalled fleet into a write storm: pause until
                        // a slot frees, a job arrives, or a moment passes.
                        self.sleep_or_wake(self.config.capacity_wait).await;
                    }
                }
                Ok(None) => self.idle(self.config.idle_poll).await,
                Err(e) => {
                    warn!(error = %e, "claim failed; retrying");
                    self.sleep_or_wake(self.config.idle_poll).await;
                }
            }
        }
        debug!("dispatcher stopped");
    }

    async fn fail_unplaced(&self, claimed: &Claimed, error: ExecutionError) {
        let failure = Failure {
            error,
            outcome: comfyfleet_core::AttemptOutcome::Failed,
            nodes: Vec::new(),
            retry_at: None,
            cancel_steps: Vec::new(),
        };
        match self
            .store
            .fail(&claimed.lease, failure, self.clock.now())
            .await
        {
            Ok(ev) => self.publish(ev),
            Err(e) => warn!(job = %claimed.lease.job, error = %e, "could not record failure"),
        }
    }

    /// Places a claimed job; false if it had to wait (nothing could take it now).
    async fn place(self: &Arc<Self>, claimed: Claimed) -> bool {
        let now = self.clock.now();
        let job = &claimed.job;
        let lease = &claimed.lease;
        let workflow = match job.spec.effective_workflow() {
            Ok(w) => w,
            Err(e) => {
                self.fail_unplaced(&claimed, e.into()).await;
                return true;
            }
        };
        if let Some(deadline) = job.deadline
            && deadline <= now
        {
            let err = ExecutionError::timeout(TimeoutPhase::Total, now.since(job.created_at), None);
            self.fail_unplaced(&claimed, err).await;
            return true;
        }

        // After a restart: find the remote execution again instead of running it twice.
        if let Some(prev) = job.attempts.last()
            && matches!(
                prev.outcome,
                Some(comfyfleet_core::AttemptOutcome::LeaseExpired)
                    | Some(comfyfleet_core::AttemptOutcome::Detached)
            )
            && let Some(remote) = prev.remote.clone()
            && let Some(slot) = self.slot(&prev.backend).cloned()
            && slot.caps.reattach
        {
            match tokio::time::timeout(self.config.call_timeout, slot.backend.reattach(&remote))
                .await
            {
                Ok(Ok(Some(exec))) => {
                    let guard = SlotGuard::acquire(slot.clone(), self.wake.clone());
                    let start = comfyfleet_core::AttemptStart {
                        backend: slot.id.clone(),
                        remote: Some(remote.clone()),
                        reattached: true,
                        skipped: Vec::new(),
                        phase: None,
                        capacity: None,
                    };
                    match self.store.start_attempt(lease, start, now).await {
                        Ok(ev) => {
                            self.publish(ev);
                            info!(job = %lease.job, backend = %slot.id, %remote, "reattached");
                            self.spawn_attempt(claimed.clone(), workflow, guard, Some(exec));
                        }
                        Err(e) => warn!(job = %lease.job, error = %e, "could not record reattach"),
                    }
                    return true;
                }
                Ok(Ok(None)) => {
                    info!(job = %lease.job, backend = %slot.id, %remote, "previous execution is gone; placing the job again");
                }
                Ok(Err(e)) => {
                    warn!(job = %lease.job, backend = %slot.id, error = %e, "reattach failed; placing the job again");
                }
                Err(_) => {
                    warn!(job = %lease.job, backend = %slot.id, "reattach timed out; placing the job again");
                }
            }
        }

        if job.cancel_requested_at.is_some() {
            match self.store.ack_cancel(lease, Vec::new(), now).await {
                Ok(ev) => self.publish(ev),
                Err(e) => warn!(job = %lease.job, error = %e, "could not finish a cancel"),
            }
            return true;
        }

        // Backends the store refused as full (other orchestrators use them): looked at again
        // as busy, so the strategy picks another or the job waits.
        let mut refused: Vec<BackendId> = Vec::new();
        loop {
            let mut candidates = self.candidates();
            for c in candidates.iter_mut().filter(|c| refused.contains(&c.id)) {
                c.in_flight = c.in_flight.max(c.capabilities.max_concurrent);
            }
            let placement = self.strategy.pick(job, &workflow, &candidates, now).await;
            self.publish_notices();
            match placement {
                Placement::Run { backend, skipped } => {
                    let Some(slot) = self.slot(&backend).cloned() else {
                        let err = ExecutionError::new(
                            comfyfleet_core::ErrorKind::Internal,
                            format!("strategy picked unknown backend {backend}"),
                        );
                        self.fail_unplaced(&claimed, err).await;
                        return true;
                    };
                    let guard = SlotGuard::acquire(slot.clone(), self.wake.clone());
                    let capacity = slot.caps.max_concurrent;
                    let start = comfyfleet_core::AttemptStart {
                        backend: backend.clone(),
                        remote: None,
                        reattached: false,
                        skipped,
                        phase: Some(comfyfleet_core::PhaseDeadline {
                            phase: TimeoutPhase::Dispatch,
                            deadline: Some(now.add(self.config.dispatch_timeout)),
                        }),
                        capacity: self.config.shared_store.then_some(capacity),
                    };
                    if !self.config.shared_store {
                        // Only the fleet-wide capacity check can refuse an attempt: record it
                        // and start it in the background while the dispatcher claims the next
                        // job (the slot is already taken, so the next pick sees it busy).
                        let me = self.clone();
                        self.tracker.spawn(async move {
                            let started = retry_store(&me, "recording the attempt", || {
                                me.store.start_attempt(&claimed.lease, start.clone(), now)
                            })
                            .await;
                            match started {
                                Ok(ev) => {
                                    me.publish(ev);
                                    me.spawn_attempt(claimed, workflow, guard, None);
                                }
                                Err(e) => {
                                    warn!(job = %claimed.lease.job, error = %e, "could not record the attempt")
                                }
                            }
                        });
                        return true;
                    }
                    let started = retry_store(self, "recording the attempt", || {
                        self.store.start_attempt(lease, start.clone(), now)
                    })
                    .await;
                    match started {
                        Ok(ev) => {
                            self.publish(ev);
                            self.spawn_attempt(claimed.clone(), workflow, guard, None);
                        }
                        Err(StoreError::BackendFull { .. }) if refused.len() < self.slots.len() => {
                            drop(guard);
                            debug!(job = %lease.job, %backend, "backend full across the fleet; trying another");
                            let mut fleet = self.fleet_load();
                            let seen = fleet.entry(backend.clone()).or_insert(0);
                            *seen = (*seen).max(capacity);
                            drop(fleet);
                            refused.push(backend);
                            continue;
                        }
                        Err(e) => {
                            warn!(job = %lease.job, error = %e, "could not record the attempt")
                        }
                    }
                    return true;
                }
                Placement::Wait { reason, until, .. } => {
                    let run_at = until.unwrap_or_else(|| now.add(self.config.capacity_wait));
                    if let Some(deadline) = job.deadline
                        && run_at >= deadline
                    {
                        let err = ExecutionError::timeout(
                            TimeoutPhase::Queued,
                            deadline.since(job.created_at),
                            None,
                        )
                        .with_detail(ErrorDetail::Timeout {
                            phase: TimeoutPhase::Queued,
                            after_ms: u64::try_from(deadline.since(job.created_at).as_millis())
                                .unwrap_or(u64::MAX),
                        });
                        let err = ExecutionError {
                            message: format!("{}; last reason: {reason}", err.message),
                            ..err
                        };
                        self.fail_unplaced(&claimed, err).await;
                        return true;
                    }
                    let released = retry_store(self, "releasing the job", || {
                        self.store.release(lease, run_at, &reason, now)
                    })
                    .await;
                    match released {
                        Ok(ev) => {
                            self.publish(ev);
                            // A block that runs out is a known moment; capacity and health are
                            // not, and a freed slot or a passing health check wakes us anyway.
                            if until.is_some() {
                                self.wake_at(run_at);
                            }
                        }
                        Err(e) => warn!(job = %lease.job, error = %e, "could not release"),
                    }
                    return false;
                }
                Placement::Impossible { error, .. } => {
                    self.fail_unplaced(&claimed, error).await;
                    return true;
                }
            }
        }
    }

    fn spawn_attempt(
        self: &Arc<Self>,
        claimed: Claimed,
        workflow: comfyfleet_core::Workflow,
        guard: SlotGuard,
        existing: Option<comfyfleet_core::Execution>,
    ) {
        let cancel = CancellationToken::new();
        self.running().insert(
            claimed.lease.job,
            RunningEntry {
                cancel: cancel.clone(),
                attempt: claimed.lease.attempt,
            },
        );
        let ctx = AttemptCtx::new(self.clone(), claimed, workflow, guard, cancel);
        self.tracker.spawn(ctx.run(existing));
    }

    async fn refresh_inventories(&self) {
        for slot in &self.slots {
            match tokio::time::timeout(self.config.call_timeout, slot.backend.inventory()).await {
                Ok(Ok(inv)) => slot.state().inventory = Arc::new(inv),
                Ok(Err(e)) => warn!(backend = %slot.id, error = %e, "inventory refresh failed"),
                Err(_) => warn!(backend = %slot.id, "inventory refresh timed out"),
            }
        }
    }

    async fn check_health(&self) {
        for slot in &self.slots {
            let health =
                match tokio::time::timeout(self.config.call_timeout, slot.backend.health()).await {
                    Ok(h) => h,
                    Err(_) => Health::down("health check timed out"),
                };
            let now = self.clock.now();
            self.strategy.on_health(&slot.id, &health, now).await;
            let (released, recovered) = {
                let mut st = slot.state();
                let recovered = health.healthy && !st.health.healthy;
                st.health = health.clone();
                if health.healthy && matches!(st.availability, Availability::Quarantined { .. }) {
                    st.availability = Availability::Active;
                    (true, recovered)
                } else {
                    (false, recovered)
                }
            };
            if recovered {
                info!(backend = %slot.id, "backend healthy again");
                self.wake.notify_one();
            }
            if released {
                info!(backend = %slot.id, "backend healthy again; quarantine lifted");
                self.publish_fleet(FleetEvent::BackendReleased {
                    backend: slot.id.clone(),
                });
                self.wake.notify_one();
            }
        }
        self.publish_notices();
    }

    async fn health_loop(self: Arc<Self>) {
        // The dispatcher ran the first check; this loop keeps them coming.
        let mut health = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.health_interval,
            self.config.health_interval,
        );
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inventory = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.inventory_interval,
            self.config.inventory_interval,
        );
        inventory.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = health.tick() => self.check_health().await,
                _ = inventory.tick() => self.refresh_inventories().await,
            }
        }
    }

    pub(crate) async fn reap(&self, options: &ReapOptions) -> Result<ReapReport, StoreError> {
        let mut report = self.store.reap(options, self.clock.now()).await?;
        self.publish(std::mem::take(&mut report.events));
        if !options.dry_run && !report.items.is_empty() {
            info!(count = report.items.len(), "reaper handled stuck jobs");
            self.wake.notify_one();
        }
        Ok(report)
    }

    /// With `shared_store`: exchanges restrictions (workflow blocks, open circuits) with the
    /// other orchestrators through the store.
    async fn share_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.share_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = self.clock.now();
            let mine = self.strategy.restrictions(now);
            match self.store.share_restrictions(&mine, now).await {
                Ok(all) => {
                    self.strategy.adopt(&all, now);
                    self.publish_notices();
                }
                Err(StoreError::NotSupported(_)) => {
                    warn!("the store cannot share restrictions between orchestrators");
                    break;
                }
                Err(e) => warn!(error = %e, "could not share restrictions"),
            }
        }
    }

    /// Wakes the dispatcher on the store's change hints (another orchestrator enqueued or
    /// released work); polling goes on regardless.
    async fn hint_loop(self: Arc<Self>, mut changes: tokio::sync::watch::Receiver<u64>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = changes.changed() => {
                    if r.is_err() {
                        break;
                    }
                    self.hint.notify_one();
                }
            }
        }
    }

    async fn maintenance_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.maintenance_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leading = false;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.publish_notices();
            let now = self.clock.now();
            let ttl = self.config.maintenance_interval * 3;
            let lead = self.store.try_lead(&self.config.owner, ttl, now).await;
            match &lead {
                Ok(true) if !leading => {
                    info!(owner = %self.config.owner, "maintenance leader: this engine");
                }
                Ok(false) if leading => {
                    info!(owner = %self.config.owner, "maintenance leader: another engine");
                }
                _ => {}
            }
            if let Ok(l) = &lead {
                leading = *l;
            }
            match lead {
                Ok(true) => {
                    let options = ReapOptions {
                        dry_run: false,
                        stuck_after: self.config.stuck_after,
                        max_crash_requeues: self.config.max_crash_requeues,
                    };
                    if let Err(e) = self.reap(&options).await {
                        warn!(error = %e, "reaper failed");
                    }
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election failed"),
            }
        }
    }
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    store: Arc<dyn TaskStore>,
    strategy: Arc<dyn FailoverStrategy>,
    backends: Vec<Arc<dyn Backend>>,
    config: EngineConfig,
    clock: Option<Arc<dyn Clock>>,
    inputs: Option<Arc<dyn comfyfleet_core::InputStore>>,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field(
                "backends",
                &self.backends.iter().map(|b| b.id()).collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// Adds a backend.
    pub fn backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backends.push(backend);
        self
    }

    /// Adds backends.
    pub fn backends(mut self, backends: impl IntoIterator<Item = Arc<dyn Backend>>) -> Self {
        self.backends.extend(backends);
        self
    }

    /// Sets the configuration.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the clock (default: [`TokioClock`], which follows tokio's paused clock in tests).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Sets where input files are kept (default: in memory).
    pub fn inputs(mut self, inputs: Arc<dyn comfyfleet_core::InputStore>) -> Self {
        self.inputs = Some(inputs);
        self
    }

    /// Builds the engine (not yet running: call [`Engine::start`]).
    pub fn build(self) -> Result<Engine, EngineError> {
        let mut slots: Vec<Arc<BackendSlot>> = Vec::new();
        for b in self.backends {
            let id = b.id().clone();
            if slots.iter().any(|s| s.id == id) {
                return Err(EngineError::DuplicateBackend(id));
            }
            let caps = b.capabilities();
            slots.push(Arc::new(BackendSlot {
                backend: b,
                id,
                caps,
                in_flight: AtomicU32::new(0),
                state: Mutex::new(SlotState {
                    inventory: Arc::new(Inventory::default()),
                    health: Health::ok(),
                    availability: Availability::Active,
                }),
            }));
        }
        let (events, _) = broadcast::channel(self.config.event_buffer.max(16));
        Ok(Engine {
            inner: Arc::new(Inner {
                config: self.config,
                store: self.store,
                strategy: self.strategy,
                inputs: self
                    .inputs
                    .unwrap_or_else(|| Arc::new(comfyfleet_core::MemoryInputs::new())),
                clock: self.clock.unwrap_or_else(|| Arc::new(TokioClock::new())),
                slots,
                events,
                wake: Arc::new(Notify::new()),
                running: Mutex::new(HashMap::new()),
                shutdown: CancellationToken::new(),
                detach: CancellationToken::new(),
                tracker: TaskTracker::new(),
                durations: Mutex::new(HashMap::new()),
                fleet_load: Mutex::new(HashMap::new()),
                hint: Notify::new(),
                started: AtomicBool::new(false),
            }),
        })
    }
}

/// The comfyfleet engine. Cheap to clone; all clones drive the same runtime.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("owner", &self.inner.config.owner)
            .field("backends", &self.inner.slots.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts building an engine over a store and a strategy.
    pub fn builder(
        store: Arc<dyn TaskStore>,
        strategy: Arc<dyn FailoverStrategy>,
    ) -> EngineBuilder {
        EngineBuilder {
            store,
            strategy,
            backends: Vec::new(),
            config: EngineConfig::default(),
            clock: None,
            inputs: None,
        }
    }

    /// Starts the dispatcher, health checks and maintenance (idempotent). Must be called inside
    /// a tokio runtime.
    pub fn start(&self) {
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let i = &self.inner;
        i.tracker.spawn(i.clone().dispatch_loop());
        i.tracker.spawn(i.clone().health_loop());
        i.tracker.spawn(i.clone().maintenance_loop());
        if i.config.shared_store {
            i.tracker.spawn(i.clone().share_loop());
        }
        if let Some(changes) = i.store.changes() {
            i.tracker.spawn(i.clone().hint_loop(changes));
        }
    }

    /// Stops taking work and waits up to `grace` for running attempts to finish; attempts still
    /// running then are handed back to the store (`detach`) to be reattached by the next engine,
    /// and their remote executions keep running.
    pub async fn shutdown(&self, grace: Duration) {
        let i = &self.inner;
        i.shutdown.cancel();
        i.tracker.close();
        if tokio::time::timeout(grace, i.tracker.wait()).await.is_err() {
            i.detach.cancel();
            let _ = tokio::time::timeout(i.config.call_timeout * 2, i.tracker.wait()).await;
        }
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn TaskStore> {
        &self.inner.store
    }

    /// Keeps an input file's bytes for jobs to refer to (`JobSpec::uploads`); each attempt
    /// uploads it to its backend first (once per backend: backends dedupe by content hash).
    pub async fn put_input(
        &self,
        name: &str,
        bytes: bytes::Bytes,
    ) -> Result<comfyfleet_core::Upload, EngineError> {
        Ok(self.inner.inputs.put(name, bytes).await?)
    }

    /// Submits a job; returns its id as soon as it is stored.
    pub async fn submit(&self, spec: JobSpec) -> Result<JobId, EngineError> {
        Ok(self.submit_job(NewJob::new(spec)).await?.id)
    }

    /// Submits a job with a caller-chosen id; tells whether the idempotency key matched an
    /// existing job.
    pub async fn submit_job(&self, job: NewJob) -> Result<Enqueued, EngineError> {
        job.spec.validate()?;
        for u in &job.spec.uploads {
            if self.inner.inputs.get(&u.sha256).await?.is_none() {
                return Err(EngineError::InvalidSpec(SpecError::Invalid(format!(
                    "upload {} ({}): no such input; store it with put_input first",
                    u.name, u.sha256
                ))));
            }
        }
        let mut enq = self
            .inner
            .store
            .enqueue(job, self.inner.clock.now())
            .await?;
        self.inner.publish(std::mem::take(&mut enq.events));
        self.inner.wake.notify_one();
        Ok(enq)
    }

    /// Cancels a pending or retry-waiting job; a running job is left alone
    /// ([`CancelOutcome::Running`]: use [`Engine::force_cancel`]).
    pub async fn cancel(&self, id: JobId) -> Result<CancelOutcome, EngineError> {
        let r = self
            .inner
            .store
            .cancel(id, "cancelled by user", self.inner.clock.now())
            .await
            .map_err(|e| match e {
                StoreError::NotFound(id) => EngineError::NotFound(id),
                e => EngineError::Store(e),
            })?;
        self.inner.publish(r.events);
        Ok(r.outcome)
    }

    /// Cancels a job whatever its state. A running execution is stopped by the cancel ladder:
    /// cancel the remote execution; if it does not stop within the grace period, restart the
    /// backend (where it can) or quarantine it. The job ends `cancelled` either way — unless the
    /// run completed first, in which case it stays `succeeded`.
    pub async fn force_cancel(&self, id: JobId) -> Result<CancelOutcome, EngineError> {
        let r = self
            .inner
            .store
            .force_cancel(id, "force-cancelled by user", self.inner.clock.now())
            .await
            .map_err(|e| match e {
                StoreError::NotFound(id) => EngineError::NotFound(id),
                e => EngineError::Store(e),
            })?;
        self.inner.publish(r.events);
        if matches!(
            r.outcome,
            CancelOutcome::CancelRequested | CancelOutcome::AlreadyRequested
        ) && let Some(entry) = self.inner.running().get(&id)
        {
            // Held here: act now instead of at the next heartbeat.
            entry.cancel.cancel();
        }
        Ok(r.outcome)
    }

    /// Cancels many jobs; one result per id, in order.
    pub async fn cancel_many(
        &self,
        ids: &[JobId],
        force: bool,
    ) -> Vec<(JobId, Result<CancelOutcome, EngineError>)> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let r = if force {
                self.force_cancel(*id).await
            } else {
                self.cancel(*id).await
            };
            out.push((*id, r));
        }
        out
    }

    /// Live events: job events (already stored) and fleet events. A subscriber that falls more
    /// than `event_buffer` events behind gets `RecvError::Lagged` and should re-read state; it
    /// never slows the engine.
    pub fn subscribe(&self) -> broadcast::Receiver<FleetEvent> {
        self.inner.events.subscribe()
    }

    /// One job.
    pub async fn get(&self, id: JobId) -> Result<Option<JobRecord>, EngineError> {
        Ok(self.inner.store.get(id).await?)
    }

    /// A job's stored events.
    pub async fn events(&self, id: JobId) -> Result<Vec<Event>, EngineError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .inner
                .store
                .events(&EventQuery {
                    job: Some(id),
                    after,
                    limit: 1000,
                })
                .await?;
            let done = page.len() < 1000;
            after = page.last().map(|e| e.id);
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// Waits until a job is terminal and returns it.
    pub async fn wait_for(&self, id: JobId) -> Result<JobRecord, EngineError> {
        let mut rx = self.subscribe();
        loop {
            let job = self.get(id).await?.ok_or(EngineError::NotFound(id))?;
            if job.state.is_terminal() {
                return Ok(job);
            }
            // Wake on this job's terminal event, or re-read now and then (another process may
            // have finished it, or we may have lagged).
            let wait = async {
                loop {
                    match rx.recv().await {
                        Ok(FleetEvent::Job(e))
                            if e.job == id && e.kind.terminal_state().is_some() =>
                        {
                            return;
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
        }
    }

    /// The backends and their live state.
    pub fn backends(&self) -> Vec<BackendStatus> {
        let mut restrictions = self.inner.strategy.restrictions(self.inner.clock.now());
        self.inner
            .slots
            .iter()
            .map(|s| {
                let (mine, rest) = restrictions.drain(..).partition(|r| r.backend == s.id);
                restrictions = rest;
                let st = s.state();
                BackendStatus {
                    restrictions: mine,
                    id: s.id.clone(),
                    kind: s.backend.kind(),
                    capabilities: s.caps.clone(),
                    in_flight: s.in_flight.load(Ordering::SeqCst),
                    health: st.health.clone(),
                    availability: st.availability.clone(),
                    inventory: st.inventory.clone(),
                }
            })
            .collect()
    }

    /// Stops sending new work to a backend (running executions finish).
    pub fn drain(&self, id: &BackendId) -> Result<(), EngineError> {
        let slot = self
            .inner
            .slot(id)
            .ok_or_else(|| EngineError::UnknownBackend(id.clone()))?;
        slot.state().availability = Availability::Draining;
        Ok(())
    }

    /// Sends work to a drained or quarantined backend again.
    pub fn enable(&self, id: &BackendId) -> Result<(), EngineError> {
        let slot = self
            .inner
            .slot(id)
            .ok_or_else(|| EngineError::UnknownBackend(id.clone()))?;
        slot.state().availability = Availability::Active;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Runs the reaper now (dry-run or real) and publishes what it changed.
    pub async fn reap(&self, options: &ReapOptions) -> Result<ReapReport, EngineError> {
        Ok(self.inner.reap(options).await?)
    }

    /// Streams an artifact's bytes from the backend that holds it.
    pub async fn fetch_artifact(
        &self,
        artifact: &comfyfleet_core::Artifact,
    ) -> Result<comfyfleet_core::ByteStream, EngineError> {
        let slot = self
            .inner
            .slot(&artifact.backend)
            .ok_or_else(|| EngineError::UnknownBackend(artifact.backend.clone()))?;
        tokio::time::timeout(self.inner.config.call_timeout, slot.backend.fetch(artifact))
            .await
            .map_err(|_| {
                EngineError::Backend(comfyfleet_core::BackendError::Execution(
                    ExecutionError::transient(format!(
                        "{} did not answer within {:?}",
                        artifact.backend, self.inner.config.call_timeout
                    )),
                ))
            })?
            .map_err(EngineError::Backend)
    }

    /// Refreshes every backend's inventory now.
    pub async fn refresh_inventories(&self) {
        self.inner.refresh_inventories().await;
    }
}
