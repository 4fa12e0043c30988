//! Supervision of one attempt: submit, watch the three clocks (start, node silence, total),
//! renew the lease, coalesce progress writes, and stop the execution on cancel or timeout.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use comfyfleet_core::{
    Artifact, AttemptOutcome, AttemptUpdate, Availability, CancelStep, Claimed, Completion,
    Decision, ErrorDetail, EventKind, Execution, ExecutionError, ExecutionEvent, ExecutionStream,
    Failure, FleetEvent, NodeTiming, PhaseDeadline, ProgressTracker, RemoteRef, StoreError,
    SubmitRequest, TimeoutPhase, Timestamp, Workflow,
};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::engine::{BackendSlot, Inner, retry_store};

/// Holds one unit of a backend's capacity; gives it back (and wakes the dispatcher) when
/// dropped, whatever path the attempt took.
pub(crate) struct SlotGuard {
    slot: Arc<BackendSlot>,
    wake: Arc<Notify>,
}

impl SlotGuard {
    pub(crate) fn acquire(slot: Arc<BackendSlot>, wake: Arc<Notify>) -> Self {
        slot.in_flight.fetch_add(1, Ordering::SeqCst);
        SlotGuard { slot, wake }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// How a stop request ended.
enum StopResult {
    /// The execution completed before it could be stopped.
    Completed(Vec<Artifact>),
    /// It stopped (interrupted, failed, or its stream ended).
    Stopped,
    /// It would not stop; the backend was restarted or quarantined.
    Escalated,
}

/// Why the supervision loop ended.
enum Exit {
    Succeeded(Vec<Artifact>),
    Failed(ExecutionError, AttemptOutcome, bool),
    Cancel,
    LeaseLost,
    Detach,
}

pub(crate) struct AttemptCtx {
    inner: Arc<Inner>,
    claimed: Claimed,
    workflow: Workflow,
    guard: Option<SlotGuard>,
    cancel: CancellationToken,
    tracker: ProgressTracker,
    timings: Vec<NodeTiming>,
    pending: Vec<EventKind>,
    progress_dirty: bool,
    phase: Option<PhaseDeadline>,
    phase_dirty: bool,
    started_at: Option<Timestamp>,
    started_dirty: bool,
    current_node: Option<String>,
    last_progress: Option<(f32, Option<String>)>,
    dispatched: Instant,
}

impl AttemptCtx {
    pub(crate) fn new(
        inner: Arc<Inner>,
        claimed: Claimed,
        workflow: Workflow,
        guard: SlotGuard,
        cancel: CancellationToken,
    ) -> Self {
        let tracker = ProgressTracker::new(&workflow);
        AttemptCtx {
            inner,
            claimed,
            workflow,
            guard: Some(guard),
            cancel,
            tracker,
            timings: Vec::new(),
            pending: Vec::new(),
            progress_dirty: false,
            phase: None,
            phase_dirty: false,
            started_at: None,
            started_dirty: false,
            current_node: None,
            last_progress: None,
            dispatched: Instant::now(),
        }
    }

    fn slot(&self) -> &Arc<BackendSlot> {
        &self
            .guard
            .as_ref()
            .expect("the slot guard lives until the attempt ends")
            .slot
    }

    fn attempt(&self) -> u32 {
        self.claimed.lease.attempt
    }

    fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    pub(crate) async fn run(mut self, existing: Option<Execution>) {
        let span = info_span!(
            "attempt",
            job = %self.claimed.lease.job,
            attempt = self.attempt(),
            backend = %self.slot().id
        );
        async move {
            let job = self.claimed.lease.job;
            self.run_inner(existing).await;
            let mut running = self.inner.running();
            // Only our own entry: a newer attempt of the same job may have replaced it.
            if running
                .get(&job)
                .is_some_and(|e| e.attempt == self.claimed.lease.attempt)
            {
                running.remove(&job);
            }
        }
        .instrument(span)
        .await
    }

    fn start_timeout(&self) -> Duration {
        self.claimed
            .job
            .spec
            .timeouts
            .start_ms
            .map(Duration::from_millis)
            .unwrap_or(self.inner.config.start_timeout)
    }

    fn node_timeout(&self, class: Option<&str>) -> Duration {
        let t = &self.claimed.job.spec.timeouts;
        if let Some(c) = class {
            if let Some(ms) = t.node_class_ms.get(c) {
                return Duration::from_millis(*ms);
            }
            if let Some(d) = self.inner.config.node_class_timeouts.get(c) {
                return *d;
            }
        }
        t.node_ms
            .map(Duration::from_millis)
            .unwrap_or(self.inner.config.node_timeout)
    }

    fn set_phase(&mut self, phase: TimeoutPhase, after: Option<Duration>) {
        let deadline = after.map(|d| self.now().add(d));
        self.phase = Some(PhaseDeadline { phase, deadline });
        self.phase_dirty = true;
    }

    async fn run_inner(&mut self, existing: Option<Execution>) {
        let reattached = existing.is_some();
        let exec = match existing {
            Some(e) => e,
            None => match self.submit().await {
                Ok(e) => e,
                Err(exit) => return self.finish(exit, None, None).await,
            },
        };
        let remote = exec.remote.clone();
        let mut stream = exec.events;
        if !reattached {
            self.pending.push(EventKind::Accepted {
                attempt: self.attempt(),
                remote: remote.clone(),
            });
        }
        // The remote id is written at once: it is what a restarted engine reattaches to.
        let update = AttemptUpdate {
            remote: Some(remote.clone()),
            ..AttemptUpdate::default()
        };
        if let Err(exit) = self.flush_with(update).await {
            return self.finish(exit, Some(stream), Some(remote)).await;
        }
        let exit = self.supervise(&mut stream, reattached).await;
        self.finish(exit, Some(stream), Some(remote)).await;
    }

    async fn submit(&mut self) -> Result<Execution, Exit> {
        let request = SubmitRequest {
            job: self.claimed.lease.job,
            attempt: self.attempt(),
            workflow: self.workflow.clone(),
            uploads: self.claimed.job.spec.uploads.clone(),
        };
        let backend = self.slot().backend.clone();
        let timeout = self.inner.config.dispatch_timeout;
        let inputs = self.inner.inputs.clone();
        let work = async {
            // Inputs first (the backend skips what it already has), then the prompt.
            for u in &request.uploads {
                let bytes = match inputs.get(&u.sha256).await {
                    Ok(Some(b)) => b,
                    Ok(None) => {
                        return Err(comfyfleet_core::BackendError::Execution(
                            ExecutionError::deterministic(format!(
                                "input {} ({}) is not in the input store",
                                u.name, u.sha256
                            )),
                        ));
                    }
                    Err(e) => {
                        return Err(comfyfleet_core::BackendError::Execution(
                            ExecutionError::transient(format!("reading input {}: {e}", u.name)),
                        ));
                    }
                };
                backend.upload(u, bytes).await?;
            }
            backend.submit(request).await
        };
        tokio::select! {
            r = tokio::time::timeout(timeout, work) => match r {
                Ok(Ok(exec)) => Ok(exec),
                Ok(Err(e)) => Err(Exit::Failed(e.into_execution_error(), AttemptOutcome::Failed, false)),
                Err(_) => Err(Exit::Failed(
                    ExecutionError::timeout(TimeoutPhase::Dispatch, timeout, None),
                    AttemptOutcome::TimedOut,
                    false,
                )),
            },
            _ = self.cancel.cancelled() => Err(Exit::Cancel),
            _ = self.inner.detach.cancelled() => Err(Exit::Detach),
        }
    }

    /// The supervision loop. Returns why it ended; the stream is left for `finish`.
    async fn supervise(&mut self, stream: &mut ExecutionStream, reattached: bool) -> Exit {
        let start_timeout = self.start_timeout();
        let total_deadline = self
            .claimed
            .job
            .deadline
            .map(|d| Instant::now() + d.since(self.now()));
        // Position unknown means "at the head": the start clock runs until told otherwise.
        let mut started = reattached;
        let mut start_deadline =
            (!reattached && !start_timeout.is_zero()).then(|| Instant::now() + start_timeout);
        let queue_timeout = self.inner.config.queue_timeout;
        let mut queue_deadline: Option<Instant> = None;
        let mut node_deadline = if reattached {
            let t = self.node_timeout(None);
            (!t.is_zero()).then(|| Instant::now() + t)
        } else {
            None
        };
        if reattached {
            let t = self.node_timeout(None);
            self.set_phase(TimeoutPhase::NodeSilence, (!t.is_zero()).then_some(t));
        } else {
            self.set_phase(
                TimeoutPhase::Start,
                (!start_timeout.is_zero()).then_some(start_timeout),
            );
        }
        let hb_every = self.inner.config.heartbeat_interval;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + hb_every, hb_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let flush_every = self.inner.config.progress_flush;
        let mut flush = tokio::time::interval_at(Instant::now() + flush_every, flush_every);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let (deadline, phase) = [
                (queue_deadline, TimeoutPhase::Queued),
                (start_deadline, TimeoutPhase::Start),
                (node_deadline, TimeoutPhase::NodeSilence),
                (total_deadline, TimeoutPhase::Total),
            ]
            .into_iter()
            .filter_map(|(d, p)| d.map(|d| (d, p)))
            .min_by_key(|(d, _)| *d)
            .map_or((None, TimeoutPhase::Total), |(d, p)| (Some(d), p));
            let timer = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let dirty = !self.pending.is_empty() || self.progress_dirty || self.phase_dirty;
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Exit::Cancel,
                _ = self.inner.detach.cancelled() => return Exit::Detach,
                ev = stream.next() => {
                    let Some(ev) = ev else {
                        return Exit::Failed(
                            ExecutionError::transient("the backend lost the execution (its event stream ended without a result)")
                                .with_detail(ErrorDetail::Lost),
                            AttemptOutcome::Failed,
                            false,
                        );
                    };
                    let now = Instant::now();
                    match ev {
                        ExecutionEvent::Accepted => {}
                        ExecutionEvent::Queued { position } => {
                            self.pending.push(EventKind::Queued { attempt: self.attempt(), position });
                            if started && self.current_node.is_none() {
                                // Reattached to a prompt that still waits its turn: the node
                                // clock only runs once it is at the head.
                                if position > 0 {
                                    node_deadline = None;
                                    if queue_deadline.is_none() && !queue_timeout.is_zero() {
                                        queue_deadline = Some(now + queue_timeout);
                                        self.set_phase(TimeoutPhase::Queued, Some(queue_timeout));
                                    }
                                } else {
                                    queue_deadline = None;
                                    let t = self.node_timeout(None);
                                    if node_deadline.is_none() && !t.is_zero() {
                                        node_deadline = Some(now + t);
                                        self.set_phase(TimeoutPhase::NodeSilence, Some(t));
                                    }
                                }
                            }
                            if !started {
                                if position > 0 {
                                    // Waiting its turn behind others: not stuck, but not forever.
                                    start_deadline = None;
                                    if queue_deadline.is_none() && !queue_timeout.is_zero() {
                                        queue_deadline = Some(now + queue_timeout);
                                        self.set_phase(TimeoutPhase::Queued, Some(queue_timeout));
                                    }
                                } else {
                                    queue_deadline = None;
                                    if start_deadline.is_none() && !start_timeout.is_zero() {
                                        start_deadline = Some(now + start_timeout);
                                        self.set_phase(TimeoutPhase::Start, Some(start_timeout));
                                    }
                                }
                            }
                        }
                        ExecutionEvent::Preview { .. } => {}
                        ExecutionEvent::Notice { message } => {
                            self.pending.push(EventKind::Warning { message });
                        }
                        other if other.is_terminal() => {
                            return match other {
                                ExecutionEvent::Succeeded { artifacts } => Exit::Succeeded(artifacts),
                                ExecutionEvent::Failed { error } => Exit::Failed(error, AttemptOutcome::Failed, true),
                                _ => Exit::Failed(
                                    ExecutionError::transient("the execution was interrupted by someone else (another client or the server)"),
                                    AttemptOutcome::Failed,
                                    true,
                                ),
                            };
                        }
                        other => {
                            if !started {
                                started = true;
                                start_deadline = None;
                                queue_deadline = None;
                                self.started_at = Some(self.now());
                                self.started_dirty = true;
                                self.pending.push(EventKind::Started { attempt: self.attempt() });
                            }
                            self.on_progress_event(other);
                            let class = self.current_node.as_deref().and_then(|n| self.workflow.class_of(n)).map(str::to_owned);
                            let t = self.node_timeout(class.as_deref());
                            node_deadline = (!t.is_zero()).then(|| now + t);
                            // The stored node deadline is refreshed with the coalesced writes.
                            self.phase = Some(PhaseDeadline {
                                phase: TimeoutPhase::NodeSilence,
                                deadline: (!t.is_zero()).then(|| self.now().add(t)),
                            });
                            self.phase_dirty = true;
                        }
                    }
                }
                _ = timer => {
                    let after = match phase {
                        TimeoutPhase::Queued => queue_timeout,
                        TimeoutPhase::Start => start_timeout,
                        TimeoutPhase::NodeSilence => {
                            let class = self.current_node.as_deref().and_then(|n| self.workflow.class_of(n)).map(str::to_owned);
                            self.node_timeout(class.as_deref())
                        }
                        _ => self.claimed.job.spec.deadline_ms.map(Duration::from_millis).unwrap_or_default(),
                    };
                    let node = if phase == TimeoutPhase::NodeSilence { self.current_node.clone() } else { None };
                    info!(phase = phase.as_str(), ?node, "timeout");
                    return Exit::Failed(ExecutionError::timeout(phase, after, node), AttemptOutcome::TimedOut, false);
                }
                _ = heartbeat.tick() => {
                    let lease = &self.claimed.lease;
                    match self.inner.store.heartbeat(lease, self.inner.config.lease_ttl, self.now()).await {
                        Ok(ack) if ack.cancel_requested => return Exit::Cancel,
                        Ok(_) => {}
                        Err(StoreError::LeaseLost { .. }) => return Exit::LeaseLost,
                        Err(e) => warn!(error = %e, "heartbeat failed; will retry"),
                    }
                }
                _ = flush.tick(), if dirty => {
                    if let Err(exit) = self.flush().await {
                        return exit;
                    }
                }
            }
        }
    }

    fn on_progress_event(&mut self, ev: ExecutionEvent) {
        let now = self.now();
        let attempt = self.attempt();
        match ev {
            ExecutionEvent::NodeStarted { node } => {
                self.tracker.node_started(&node);
                let class_type = self.workflow.class_of(&node).map(str::to_owned);
                self.timings.push(NodeTiming {
                    node: node.clone(),
                    class_type: class_type.clone(),
                    started_at: now,
                    ended_at: None,
                    cached: false,
                });
                self.current_node = Some(node.clone());
                self.pending.push(EventKind::NodeStarted {
                    attempt,
                    node,
                    class_type,
                });
            }
            ExecutionEvent::Progress { node, value, max } => {
                self.tracker.node_progress(&node, value, max);
                self.current_node = Some(node);
            }
            ExecutionEvent::Cached { nodes } => {
                self.tracker.cached(&nodes);
                for node in nodes {
                    self.timings.push(NodeTiming {
                        class_type: self.workflow.class_of(&node).map(str::to_owned),
                        node: node.clone(),
                        started_at: now,
                        ended_at: Some(now),
                        cached: true,
                    });
                    self.pending.push(EventKind::NodeFinished {
                        attempt,
                        node,
                        cached: true,
                    });
                }
            }
            ExecutionEvent::NodeFinished { node } => {
                self.tracker.node_finished(&node);
                if let Some(t) = self
                    .timings
                    .iter_mut()
                    .rev()
                    .find(|t| t.node == node && t.ended_at.is_none())
                {
                    t.ended_at = Some(now);
                }
                self.pending.push(EventKind::NodeFinished {
                    attempt,
                    node,
                    cached: false,
                });
            }
            ExecutionEvent::NodeOutput { node, artifacts } => {
                self.pending.push(EventKind::Output {
                    attempt,
                    node,
                    artifacts,
                });
            }
            _ => {}
        }
        self.progress_dirty = true;
    }

    fn progress_update(&mut self) -> Option<comfyfleet_core::Progress> {
        if !self.progress_dirty {
            return None;
        }
        self.progress_dirty = false;
        let expected = self.inner.expected_duration(self.workflow.structure_hash());
        let p = self.tracker.snapshot(self.dispatched.elapsed(), expected);
        let key = (p.percent, p.current_node.clone());
        if self.last_progress.as_ref() != Some(&key) {
            self.last_progress = Some(key);
            self.pending.push(EventKind::Progress {
                attempt: self.attempt(),
                progress: p.clone(),
            });
        }
        Some(p)
    }

    async fn flush(&mut self) -> Result<(), Exit> {
        self.flush_with(AttemptUpdate::default()).await
    }

    /// Writes the buffered events, progress and phase in one fenced store call.
    async fn flush_with(&mut self, mut update: AttemptUpdate) -> Result<(), Exit> {
        update.progress = self.progress_update();
        if self.phase_dirty {
            update.phase = self.phase;
            self.phase_dirty = false;
        }
        if self.started_dirty {
            update.started_at = self.started_at;
            self.started_dirty = false;
        }
        update.events = std::mem::take(&mut self.pending);
        if update.events.is_empty()
            && update.progress.is_none()
            && update.phase.is_none()
            && update.started_at.is_none()
            && update.remote.is_none()
        {
            return Ok(());
        }
        match self
            .inner
            .store
            .update_attempt(&self.claimed.lease, update, self.now())
            .await
        {
            Ok(ev) => {
                self.inner.publish(ev);
                Ok(())
            }
            Err(StoreError::LeaseLost { .. }) => Err(Exit::LeaseLost),
            Err(e) => {
                // Progress is advisory; losing one write is better than stopping the job.
                warn!(error = %e, "could not record progress");
                Ok(())
            }
        }
    }

    async fn finish(
        &mut self,
        exit: Exit,
        stream: Option<ExecutionStream>,
        remote: Option<RemoteRef>,
    ) {
        match exit {
            Exit::Succeeded(artifacts) => self.succeed(artifacts).await,
            Exit::Failed(error, outcome, ended) => {
                let lease_lost = self.fail(error, outcome).await;
                if !ended && let (Some(stream), Some(remote)) = (stream, remote) {
                    if lease_lost && self.taken_over(&remote).await {
                        return;
                    }
                    // The execution may still run (hung): stop it in the background while
                    // holding the backend's slot, so capacity stays honest.
                    self.spawn_stop(stream, remote);
                }
            }
            Exit::Cancel => self.cancel_ladder(stream, remote).await,
            Exit::LeaseLost => {
                if let (Some(stream), Some(remote)) = (stream, remote) {
                    if self.taken_over(&remote).await {
                        info!("lease lost; the new owner continues our execution");
                        return;
                    }
                    warn!("lease lost: stopping our execution");
                    self.spawn_stop(stream, remote);
                }
            }
            Exit::Detach => {
                let _ = self.flush().await;
                let now = self.now();
                let lease = &self.claimed.lease;
                let store = &self.inner.store;
                match retry_store(&self.inner, "detaching", || store.detach(lease, now)).await {
                    Ok(ev) => self.inner.publish(ev),
                    Err(e) => warn!(error = %e, "could not detach"),
                }
            }
        }
    }

    async fn succeed(&mut self, artifacts: Vec<Artifact>) {
        self.tracker.succeeded();
        self.progress_dirty = true;
        let progress = self.progress_update();
        let _ = self.flush().await;
        let completion = Completion {
            artifacts,
            nodes: std::mem::take(&mut self.timings),
            progress,
        };
        let now = self.now();
        let lease = &self.claimed.lease;
        let store = &self.inner.store;
        let done = retry_store(&self.inner, "recording success", || {
            store.complete(lease, completion.clone(), now)
        })
        .await;
        match done {
            Ok(ev) => {
                self.inner.publish(ev);
                let run_time = self.dispatched.elapsed();
                self.inner
                    .record_duration(self.workflow.structure_hash(), run_time);
                self.inner
                    .strategy
                    .on_success(
                        &self.claimed.job,
                        &self.workflow,
                        &self.slot().id,
                        run_time,
                        self.now(),
                    )
                    .await;
            }
            Err(e) => warn!(error = %e, "could not record success"),
        }
    }

    /// Records the failure; true if the lease was lost (someone else owns the job now).
    async fn fail(&mut self, error: ExecutionError, outcome: AttemptOutcome) -> bool {
        let _ = self.flush().await;
        let now = self.now();
        let decision = self
            .inner
            .strategy
            .on_failure(
                &self.claimed.job,
                &self.workflow,
                &self.slot().id,
                &error,
                now,
            )
            .await;
        self.inner.publish_notices();
        let retry_at = match decision {
            Decision::Retry { delay } => Some(now.add(delay)),
            Decision::GiveUp => None,
        };
        debug!(error = %error.message, ?retry_at, "attempt failed");
        let failure = Failure {
            error,
            outcome,
            nodes: std::mem::take(&mut self.timings),
            retry_at,
            cancel_steps: Vec::new(),
        };
        let lease = &self.claimed.lease;
        let store = &self.inner.store;
        let done = retry_store(&self.inner, "recording the failure", || {
            store.fail(lease, failure.clone(), now)
        })
        .await;
        match done {
            Ok(ev) => {
                self.inner.publish(ev);
                self.inner.wake.notify_one();
                if let Some(at) = retry_at {
                    self.inner.wake_at(at);
                }
                false
            }
            Err(StoreError::LeaseLost { .. }) => true,
            Err(e) => {
                warn!(error = %e, "could not record failure");
                false
            }
        }
    }

    /// After losing the lease: whether another attempt has taken over our remote execution
    /// (reattached, or about to be: requeued with our remote). Then it must not be stopped.
    async fn taken_over(&self, remote: &RemoteRef) -> bool {
        match self.inner.store.get(self.claimed.lease.job).await {
            Ok(Some(job)) if !job.state.is_terminal() => {
                job.attempts.last().is_some_and(|a| {
                    a.number != self.attempt() && a.remote.as_ref() == Some(remote)
                }) || job.attempts.last().is_some_and(|a| {
                    a.remote.as_ref() == Some(remote)
                        && matches!(
                            a.outcome,
                            Some(AttemptOutcome::LeaseExpired) | Some(AttemptOutcome::Detached)
                        )
                })
            }
            _ => false,
        }
    }

    async fn cancel_ladder(&mut self, stream: Option<ExecutionStream>, remote: Option<RemoteRef>) {
        info!("force-cancel: stopping the execution");
        let mut steps = Vec::new();
        let stopped = match (stream, remote) {
            (Some(stream), Some(remote)) => {
                stop_execution(&self.inner, self.slot(), stream, &remote, &mut steps).await
            }
            _ => {
                steps.push(CancelStep {
                    at: self.now(),
                    action: "none_needed".into(),
                    result: "the backend had not accepted the execution yet".into(),
                });
                StopResult::Stopped
            }
        };
        let _ = self.flush().await;
        if let StopResult::Completed(artifacts) = stopped {
            // The run finished before the cancel took effect: it stays succeeded.
            return self.succeed(artifacts).await;
        }
        let now = self.now();
        let lease = &self.claimed.lease;
        let store = &self.inner.store;
        let done = retry_store(&self.inner, "recording the cancel", || {
            store.ack_cancel(lease, steps.clone(), now)
        })
        .await;
        match done {
            Ok(ev) => self.inner.publish(ev),
            Err(e) => warn!(error = %e, "could not record the cancel"),
        }
    }

    fn spawn_stop(&mut self, stream: ExecutionStream, remote: RemoteRef) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let inner = self.inner.clone();
        let span = tracing::Span::current();
        self.inner.tracker.spawn(
            async move {
                let mut steps = Vec::new();
                stop_execution(&inner, &guard.slot, stream, &remote, &mut steps).await;
                for s in steps {
                    debug!(action = %s.action, result = %s.result, "stop step");
                }
                drop(guard);
            }
            .instrument(span),
        );
    }
}

/// Stops a remote execution: cancel it; wait up to the grace period for it to end; if it does
/// not, restart the backend (if it can) or quarantine it. Every step is recorded.
async fn stop_execution(
    inner: &Arc<Inner>,
    slot: &Arc<BackendSlot>,
    mut stream: ExecutionStream,
    remote: &RemoteRef,
    steps: &mut Vec<CancelStep>,
) -> StopResult {
    let call = inner.config.call_timeout;
    let result = match tokio::time::timeout(call, slot.backend.cancel(remote)).await {
        Ok(Ok(ack)) => format!("{ack:?}"),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => format!("no answer within {} ms", call.as_millis()),
    };
    steps.push(CancelStep {
        at: inner.clock.now(),
        action: "remote_cancel".into(),
        result,
    });
    let grace = tokio::time::sleep(inner.config.cancel_grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(ExecutionEvent::Succeeded { artifacts }) => return StopResult::Completed(artifacts),
                Some(e) if e.is_terminal() => return StopResult::Stopped,
                Some(_) => {}
                None => return StopResult::Stopped,
            },
            _ = &mut grace => break,
        }
    }
    let grace_ms = inner.config.cancel_grace.as_millis();
    if slot.caps.restart {
        let result = match tokio::time::timeout(call, slot.backend.restart()).await {
            Ok(Ok(())) => "restarted".to_string(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => format!("no answer within {} ms", call.as_millis()),
        };
        let ok = result == "restarted";
        steps.push(CancelStep {
            at: inner.clock.now(),
            action: "restart_backend".into(),
            result: format!("still running {grace_ms} ms after cancel; {result}"),
        });
        if ok {
            return StopResult::Escalated;
        }
    }
    let reason = format!("execution {remote} did not stop within {grace_ms} ms of a cancel");
    slot.state().availability = Availability::Quarantined {
        reason: reason.clone(),
    };
    inner.publish_fleet(FleetEvent::BackendQuarantined {
        backend: slot.id.clone(),
        reason: reason.clone(),
    });
    steps.push(CancelStep {
        at: inner.clock.now(),
        action: "quarantine_backend".into(),
        result: format!("{reason}; no new work until a health check passes"),
    });
    StopResult::Escalated
}
