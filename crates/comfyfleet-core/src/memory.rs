//! [`MemoryStore`]: an in-memory [`TaskStore`] (and [`InstallStore`](crate::InstallStore), in
//! [`installs`]) for tests, examples and embedders that need no durability. It follows the same contract as the durable stores and passes the same
//! conformance suite.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{ErrorKind, ExecutionError, StoreError, TimeoutPhase};
use crate::event::{Event, EventKind};
use crate::ids::{BackendId, JobId};
use crate::job::{AttemptOutcome, JobRecord, JobState, LeaseInfo};
use crate::store::*;
use crate::strategy::{Restriction, RestrictionKind};
use crate::time::Timestamp;
use crate::workflow::WorkflowHash;

pub mod installs;

type ReadyKey = (Reverse<i32>, u64, JobId);

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<JobId, JobRecord>,
    order: HashMap<JobId, u64>,
    ready: BTreeSet<ReadyKey>,
    idempotency: HashMap<String, JobId>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    next_order: u64,
    leader: Option<(String, Timestamp)>,
    restrictions: BTreeMap<RestrictionKey, Restriction>,
    installs: installs::Installs,
}

/// An in-memory [`TaskStore`]. Engines sharing one (in one process) get its change hints
/// ([`TaskStore::changes`]).
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            inner: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied change visible to callers
        // that matter (tests abort); keep serving instead of poisoning every later call.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock for a change that frees or adds work: the change hint goes out once the lock
    /// is released (the change is visible by then).
    fn write(&self) -> WriteGuard<'_> {
        WriteGuard {
            guard: Some(self.lock()),
            changes: &self.changes,
        }
    }
}

struct WriteGuard<'a> {
    guard: Option<MutexGuard<'a, Inner>>,
    changes: &'a tokio::sync::watch::Sender<u64>,
}

impl std::ops::Deref for WriteGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        // Invariant: `guard` is `Some` until `drop`.
        self.guard.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for WriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        // Invariant: `guard` is `Some` until `drop`.
        self.guard.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

use crate::transition::{AfterFailure as Next, after_failure, close_attempt, open_attempt};

impl Inner {
    fn ready_key(&self, job: &JobRecord) -> ReadyKey {
        (
            Reverse(job.spec.priority),
            self.order.get(&job.id).copied().unwrap_or(0),
            job.id,
        )
    }

    fn push_event(&mut self, id: JobId, kind: EventKind, now: Timestamp) -> Event {
        self.next_event += 1;
        let job = self
            .jobs
            .get_mut(&id)
            .expect("push_event is only called for existing jobs");
        job.last_seq += 1;
        job.updated_at = now;
        let ev = Event {
            id: self.next_event,
            job: id,
            seq: job.last_seq,
            at: now,
            kind,
        };
        self.events.insert(ev.id, ev.clone());
        ev
    }

    /// Attempts on `backend` that started and have not ended (any job). A scan: the memory
    /// store is for tests and single processes, where the engine counts its own.
    fn open_attempts(&self, backend: &BackendId) -> u32 {
        let n = self
            .jobs
            .values()
            .flat_map(|j| j.attempts.iter())
            .filter(|a| a.ended_at.is_none() && &a.backend == backend)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn fenced(&mut self, lease: &Lease) -> Result<&mut JobRecord, StoreError> {
        let lost = StoreError::LeaseLost {
            job: lease.job,
            attempt: lease.attempt,
        };
        let job = self.jobs.get_mut(&lease.job).ok_or(lost.clone())?;
        if job.state != JobState::Running || job.claims != lease.attempt {
            return Err(lost);
        }
        Ok(job)
    }

    /// Applies a failure decision; returns the events.
    fn apply_failure(
        &mut self,
        id: JobId,
        attempt: u32,
        backend: Option<crate::ids::BackendId>,
        error: ExecutionError,
        retry_at: Option<Timestamp>,
        now: Timestamp,
    ) -> Vec<Event> {
        let job = &self.jobs[&id];
        let next = after_failure(job, retry_at);
        let mut events = Vec::new();
        let retry_at = match next {
            Next::Retry(at) => Some(at),
            _ => None,
        };
        if let Some(backend) = backend {
            events.push(self.push_event(
                id,
                EventKind::AttemptFailed {
                    attempt,
                    backend,
                    error: error.clone(),
                    retry_at,
                },
                now,
            ));
        } else if let Some(until) = retry_at {
            // Never placed and going back to wait: the state change still gets its event.
            events.push(self.push_event(
                id,
                EventKind::Waiting {
                    reason: error.message.clone(),
                    until: Some(until),
                },
                now,
            ));
        }
        events.extend(self.finish_or_retry(id, next, error, now));
        events
    }

    fn finish_or_retry(
        &mut self,
        id: JobId,
        next: Next,
        error: ExecutionError,
        now: Timestamp,
    ) -> Vec<Event> {
        let job = self
            .jobs
            .get_mut(&id)
            .expect("caller checked the job exists");
        job.lease = None;
        job.phase = None;
        match next {
            Next::Retry(at) => {
                job.state = JobState::RetryWait;
                job.run_at = at;
                let key = self.ready_key(&self.jobs[&id]);
                self.ready.insert(key);
                Vec::new()
            }
            Next::Fail => {
                job.state = JobState::Failed;
                job.finished_at = Some(now);
                job.error = Some(error.clone());
                vec![self.push_event(id, EventKind::Failed { error }, now)]
            }
            Next::Cancel => {
                let reason = "force-cancelled".to_string();
                job.state = JobState::Cancelled;
                job.finished_at = Some(now);
                job.error = Some(ExecutionError::cancelled(reason.clone()));
                vec![self.push_event(id, EventKind::Cancelled { reason }, now)]
            }
        }
    }

    fn cancel_now(&mut self, id: JobId, reason: &str, now: Timestamp) -> Vec<Event> {
        let key = self.ready_key(&self.jobs[&id]);
        self.ready.remove(&key);
        let job = self
            .jobs
            .get_mut(&id)
            .expect("caller checked the job exists");
        job.state = JobState::Cancelled;
        job.finished_at = Some(now);
        job.lease = None;
        job.error = Some(ExecutionError::cancelled(reason));
        vec![self.push_event(
            id,
            EventKind::Cancelled {
                reason: reason.to_owned(),
            },
            now,
        )]
    }
}

#[async_trait]
impl TaskStore for MemoryStore {
    async fn enqueue(&self, new: NewJob, now: Timestamp) -> Result<Enqueued, StoreError> {
        new.spec
            .validate()
            .map_err(|e| StoreError::InvalidInput(e.to_string()))?;
        let mut s = self.write();
        if let Some(key) = &new.spec.idempotency_key
            && let Some(existing) = s.idempotency.get(key)
        {
            return Ok(Enqueued {
                id: *existing,
                created: false,
                events: Vec::new(),
            });
        }
        if s.jobs.contains_key(&new.id) {
            return Err(StoreError::InvalidInput(format!(
                "job id {} already exists",
                new.id
            )));
        }
        let deadline = new
            .spec
            .deadline_ms
            .map(|ms| now.add(Duration::from_millis(ms)));
        let priority = new.spec.priority;
        if let Some(key) = &new.spec.idempotency_key {
            s.idempotency.insert(key.clone(), new.id);
        }
        let record = JobRecord {
            id: new.id,
            spec: new.spec,
            state: JobState::Pending,
            created_at: now,
            updated_at: now,
            run_at: now,
            deadline,
            claims: 0,
            attempts: Vec::new(),
            crash_requeues: 0,
            lease: None,
            cancel_requested_at: None,
            progress: None,
            progress_at: None,
            phase: None,
            wait_reason: None,
            error: None,
            artifacts: Vec::new(),
            finished_at: None,
            last_seq: 0,
        };
        s.next_order += 1;
        let order = s.next_order;
        s.order.insert(new.id, order);
        let key = s.ready_key(&record);
        s.jobs.insert(new.id, record);
        s.ready.insert(key);
        let ev = s.push_event(new.id, EventKind::Submitted { priority }, now);
        Ok(Enqueued {
            id: new.id,
            created: true,
            events: vec![ev],
        })
    }

    async fn claim(
        &self,
        owner: &str,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<Option<Claimed>, StoreError> {
        let mut s = self.lock();
        let found = s
            .ready
            .iter()
            .find(|(_, _, id)| s.jobs[id].run_at <= now)
            .copied();
        let Some(key) = found else {
            return Ok(None);
        };
        s.ready.remove(&key);
        let id = key.2;
        let job = s
            .jobs
            .get_mut(&id)
            .expect("ready set only holds existing jobs");
        job.state = JobState::Running;
        job.claims += 1;
        job.lease = Some(LeaseInfo {
            owner: owner.to_owned(),
            expires_at: now.add(lease_ttl),
        });
        job.updated_at = now;
        let lease = Lease {
            job: id,
            attempt: job.claims,
            owner: owner.to_owned(),
        };
        Ok(Some(Claimed {
            lease,
            job: job.clone(),
        }))
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<HeartbeatAck, StoreError> {
        let mut s = self.lock();
        let job = s.fenced(lease)?;
        let expires_at = now.add(lease_ttl);
        job.lease = Some(LeaseInfo {
            owner: lease.owner.clone(),
            expires_at,
        });
        Ok(HeartbeatAck {
            cancel_requested: job.cancel_requested_at.is_some(),
            expires_at,
        })
    }

    async fn release(
        &self,
        lease: &Lease,
        run_at: Timestamp,
        reason: &str,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let mut s = self.write();
        let job = s.fenced(lease)?;
        if open_attempt(job, lease.attempt).is_some() {
            return Err(StoreError::InvalidTransition {
                job: lease.job,
                state: job.state,
                operation: "release a job with a running attempt",
            });
        }
        if job.cancel_requested_at.is_some() {
            return Ok(s.cancel_now(lease.job, "force-cancelled", now));
        }
        job.state = JobState::Pending;
        job.run_at = run_at;
        job.lease = None;
        job.wait_reason = Some(reason.to_owned());
        let key = s.ready_key(&s.jobs[&lease.job]);
        s.ready.insert(key);
        Ok(vec![s.push_event(
            lease.job,
            EventKind::Waiting {
                reason: reason.to_owned(),
                until: Some(run_at),
            },
            now,
        )])
    }

    async fn start_attempt(
        &self,
        lease: &Lease,
        start: AttemptStart,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let mut s = self.lock();
        let job = s.fenced(lease)?;
        crate::transition::check_attempt_start(job, lease.attempt, &start)?;
        if let Some(capacity) = start.capacity
            && s.open_attempts(&start.backend) >= capacity
        {
            return Err(StoreError::BackendFull {
                backend: start.backend,
                capacity,
            });
        }
        let job = s.fenced(lease)?;
        let kind = crate::transition::begin_attempt(job, lease.attempt, start, now);
        Ok(vec![s.push_event(lease.job, kind, now)])
    }

    async fn update_attempt(
        &self,
        lease: &Lease,
        update: AttemptUpdate,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let mut s = self.lock();
        let job = s.fenced(lease)?;
        let state = job.state;
        let Some(a) = open_attempt(job, lease.attempt) else {
            return Err(StoreError::InvalidTransition {
                job: lease.job,
                state,
                operation: "update an attempt that was not started",
            });
        };
        if let Some(r) = update.remote {
            a.remote = Some(r);
        }
        if let Some(t) = update.started_at {
            a.started_at = Some(t);
        }
        if let Some(p) = update.phase {
            job.phase = Some(p);
        }
        if let Some(p) = update.progress {
            job.progress = Some(p);
            job.progress_at = Some(now);
        }
        let mut events = Vec::with_capacity(update.events.len());
        for kind in update.events {
            events.push(s.push_event(lease.job, kind, now));
        }
        Ok(events)
    }

    async fn complete(
        &self,
        lease: &Lease,
        completion: Completion,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let mut s = self.write();
        let job = s.fenced(lease)?;
        let kind = crate::transition::complete(job, lease.attempt, completion, now)?;
        Ok(vec![s.push_event(lease.job, kind, now)])
    }

    async fn fail(
        &self,
        lease: &Lease,
        failure: Failure,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let mut s = self.write();
        let job = s.fenced(lease)?;
        let backend = close_attempt(
            job,
            lease.attempt,
            failure.outcome,
            Some(failure.error.clone()),
            failure.nodes,
            failure.cancel_steps,
            now,
        );
        Ok(s.apply_failure(
            lease.job,
            lease.attempt,
            backend,
            failure.error,
            failure.retry_at,
            now,
        ))
    }

    async fn cancel(
        &self,
        id: JobId,
        reason: &str,
        now: Timestamp,
    ) -> Result<CancelResult, StoreError> {
        let mut s = self.write();
        let job = s.jobs.get(&id).ok_or(StoreError::NotFound(id))?;
        let (outcome, events) = match job.state {
            JobState::Pending | JobState::RetryWait => {
                (CancelOutcome::Cancelled, s.cancel_now(id, reason, now))
            }
            JobState::Running => (CancelOutcome::Running, Vec::new()),
            st => (CancelOutcome::AlreadyTerminal(st), Vec::new()),
        };
        Ok(CancelResult { outcome, events })
    }

    async fn force_cancel(
        &self,
        id: JobId,
        reason: &str,
        now: Timestamp,
    ) -> Result<CancelResult, StoreError> {
        let mut s = self.write();
        let job = s.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        let (outcome, events) = match job.state {
            JobState::Pending | JobState::RetryWait => {
                (CancelOutcome::Cancelled, s.cancel_now(id, reason, now))
            }
            JobState::Running if job.cancel_requested_at.is_some() => {
                (CancelOutcome::AlreadyRequested, Vec::new())
            }
            JobState::Running => {
                job.cancel_requested_at = Some(now);
                let ev = s.push_event(id, EventKind::CancelRequested { force: true }, now);
                (CancelOutcome::CancelRequested, vec![ev])
            }
            st => (CancelOutcome::AlreadyTerminal(st), Vec::new()),
        };
        Ok(CancelResult { outcome, events })
    }

    async fn ack_cancel(
        &self,
        lease: &Lease,
        steps: Vec<crate::job::CancelStep>,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let mut s = self.write();
        let job = s.fenced(lease)?;
        let reason = "force-cancelled";
        close_attempt(
            job,
            lease.attempt,
            AttemptOutcome::Cancelled,
            Some(ExecutionError::cancelled(reason)),
            Vec::new(),
            steps,
            now,
        );
        job.phase = None;
        Ok(s.cancel_now(lease.job, reason, now))
    }

    async fn detach(&self, lease: &Lease, now: Timestamp) -> Result<Vec<Event>, StoreError> {
        let mut s = self.write();
        let job = s.fenced(lease)?;
        let kind = crate::transition::detach(job, lease.attempt, now);
        let key = s.ready_key(&s.jobs[&lease.job]);
        s.ready.insert(key);
        Ok(vec![s.push_event(lease.job, kind, now)])
    }

    async fn reap(&self, options: &ReapOptions, now: Timestamp) -> Result<ReapReport, StoreError> {
        let mut s = self.write();
        let mut ids: Vec<JobId> = s
            .jobs
            .values()
            .filter(|j| !j.state.is_terminal())
            .map(|j| j.id)
            .collect();
        ids.sort();
        let mut items = Vec::new();
        let mut events = Vec::new();
        for id in ids {
            let job = &s.jobs[&id];
            let Some((reason, action)) = reap_decision(job, options, now) else {
                continue;
            };
            items.push(ReapItem {
                job: id,
                state: job.state,
                attempt: job.claims,
                owner: job.lease.as_ref().map(|l| l.owner.clone()),
                backend: job.current_attempt().map(|a| a.backend.clone()),
                age_ms: u64::try_from(now.since(job.created_at).as_millis()).unwrap_or(u64::MAX),
                last_progress_at: job.progress_at,
                reason,
                action,
            });
            if options.dry_run {
                continue;
            }
            events.extend(apply_reap(&mut s, id, reason, action, now));
        }
        Ok(ReapReport {
            dry_run: options.dry_run,
            items,
            events,
        })
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.lock().jobs.get(&id).cloned())
    }

    async fn list(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        let limit = filter.effective_limit()?;
        let s = self.lock();
        let mut matching: Vec<&JobRecord> = s.jobs.values().filter(|j| filter.matches(j)).collect();
        matching.sort_by_key(|j| std::cmp::Reverse(j.id));
        let next = (matching.len() > limit).then(|| matching[limit - 1].id);
        Ok(JobPage {
            jobs: matching
                .into_iter()
                .take(limit)
                .map(JobRecord::summary)
                .collect(),
            next,
        })
    }

    async fn counts(&self) -> Result<StateCounts, StoreError> {
        let s = self.lock();
        let mut c = BTreeMap::new();
        for st in JobState::ALL {
            c.insert(st, 0);
        }
        for j in s.jobs.values() {
            *c.entry(j.state).or_insert(0) += 1;
        }
        Ok(StateCounts(c))
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
        let limit = if query.limit == 0 {
            1000
        } else {
            query.limit as usize
        };
        let s = self.lock();
        let start = query.after.map_or(0, |a| a.saturating_add(1));
        Ok(s.events
            .range(start..)
            .map(|(_, e)| e)
            .filter(|e| query.job.is_none_or(|j| e.job == j))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn prune(&self, finished_before: Timestamp) -> Result<u64, StoreError> {
        let mut s = self.lock();
        let doomed: Vec<JobId> = s
            .jobs
            .values()
            .filter(|j| j.state.is_terminal() && j.finished_at.is_some_and(|t| t < finished_before))
            .map(|j| j.id)
            .collect();
        for id in &doomed {
            if let Some(job) = s.jobs.remove(id)
                && let Some(k) = &job.spec.idempotency_key
            {
                s.idempotency.remove(k);
            }
            s.order.remove(id);
        }
        let doomed_set: BTreeSet<JobId> = doomed.iter().copied().collect();
        s.events.retain(|_, e| !doomed_set.contains(&e.job));
        s.installs.prune(finished_before);
        Ok(doomed.len() as u64)
    }

    async fn backend_load(&self) -> Result<BTreeMap<BackendId, u32>, StoreError> {
        let s = self.lock();
        let mut load = BTreeMap::new();
        for a in s.jobs.values().flat_map(|j| j.attempts.iter()) {
            if a.ended_at.is_none() {
                *load.entry(a.backend.clone()).or_insert(0u32) += 1;
            }
        }
        Ok(load)
    }

    async fn share_restrictions(
        &self,
        mine: &[Restriction],
        now: Timestamp,
    ) -> Result<Vec<Restriction>, StoreError> {
        let mut s = self.lock();
        merge_restrictions(&mut s.restrictions, mine, now);
        Ok(s.restrictions.values().cloned().collect())
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }

    async fn try_lead(
        &self,
        owner: &str,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut s = self.lock();
        let free = match &s.leader {
            None => true,
            Some((o, exp)) => o == owner || *exp <= now,
        };
        if free {
            s.leader = Some((owner.to_owned(), now.add(ttl)));
        }
        Ok(free)
    }
}

/// The key a shared [`Restriction`] is stored under: one per backend, kind and structure.
pub type RestrictionKey = (BackendId, RestrictionKind, Option<WorkflowHash>);

/// [`TaskStore::share_restrictions`] on a map (shared with the durable stores' reference
/// behaviour): `mine` is merged in, a stored restriction keeping the later `until` (and its
/// reason), and those that lifted by `now` are dropped.
pub fn merge_restrictions(
    stored: &mut BTreeMap<RestrictionKey, Restriction>,
    mine: &[Restriction],
    now: Timestamp,
) {
    for r in mine {
        let key = (r.backend.clone(), r.kind, r.structure.clone());
        match stored.get(&key) {
            Some(old) if old.until >= r.until => {}
            _ => {
                stored.insert(key, r.clone());
            }
        }
    }
    stored.retain(|_, r| r.until > now);
}

/// The reaper's rule for one non-terminal job (shared with the durable stores' reference
/// behaviour; see the `store` module docs).
pub fn reap_decision(
    job: &JobRecord,
    options: &ReapOptions,
    now: Timestamp,
) -> Option<(ReapReason, ReapAction)> {
    let retry_or_fail = |job: &JobRecord| {
        if job.cancel_requested_at.is_some() {
            ReapAction::Cancel
        } else if job.counted_attempts() < job.spec.max_attempts
            && job.deadline.is_none_or(|d| now < d)
        {
            ReapAction::Requeue
        } else {
            ReapAction::Fail
        }
    };
    match job.state {
        JobState::Running => {
            let lease = job.lease.as_ref()?;
            if lease.expires_at <= now {
                let action = if job.cancel_requested_at.is_some() {
                    ReapAction::Cancel
                } else if job.crash_requeues >= options.max_crash_requeues {
                    ReapAction::Fail
                } else {
                    ReapAction::Requeue
                };
                return Some((ReapReason::LeaseExpired, action));
            }
            let attempt = job.current_attempt()?;
            if job.deadline.is_some_and(|d| d <= now) {
                let action = if job.cancel_requested_at.is_some() {
                    ReapAction::Cancel
                } else {
                    ReapAction::Fail
                };
                return Some((ReapReason::JobDeadline, action));
            }
            if job.phase.and_then(|p| p.deadline).is_some_and(|d| d <= now) {
                return Some((ReapReason::PhaseDeadline, retry_or_fail(job)));
            }
            if let Some(after) = options.stuck_after {
                let last = job.progress_at.unwrap_or(attempt.dispatched_at);
                if now.since(last) >= after {
                    return Some((ReapReason::NoProgress, retry_or_fail(job)));
                }
            }
            None
        }
        JobState::Pending | JobState::RetryWait => job
            .deadline
            .filter(|d| *d <= now)
            .map(|_| (ReapReason::JobDeadline, ReapAction::Fail)),
        _ => None,
    }
}

fn apply_reap(
    s: &mut Inner,
    id: JobId,
    reason: ReapReason,
    action: ReapAction,
    now: Timestamp,
) -> Vec<Event> {
    let job = s.jobs.get_mut(&id).expect("reap only visits existing jobs");
    let claim = job.claims;
    let owner = job
        .lease
        .as_ref()
        .map(|l| l.owner.clone())
        .unwrap_or_default();
    match (job.state, reason) {
        (JobState::Pending | JobState::RetryWait, _) => {
            let key = s.ready_key(&s.jobs[&id]);
            s.ready.remove(&key);
            let waited = now.since(s.jobs[&id].created_at);
            let err = ExecutionError::timeout(TimeoutPhase::Queued, waited, None);
            s.finish_or_retry(id, Next::Fail, err, now)
        }
        (_, ReapReason::LeaseExpired) => {
            let outcome = if action == ReapAction::Cancel {
                AttemptOutcome::Cancelled
            } else {
                AttemptOutcome::LeaseExpired
            };
            close_attempt(job, claim, outcome, None, Vec::new(), Vec::new(), now);
            match action {
                ReapAction::Requeue => {
                    job.crash_requeues += 1;
                    let n = job.crash_requeues;
                    let mut evs =
                        s.finish_or_retry(id, Next::Retry(now), ExecutionError::transient(""), now);
                    evs.push(s.push_event(
                        id,
                        EventKind::Requeued {
                            reason: format!("lease of {owner} expired; the orchestrator is gone"),
                            crash_requeues: n,
                        },
                        now,
                    ));
                    evs
                }
                ReapAction::Fail => {
                    let n = job.crash_requeues;
                    let err = ExecutionError::new(
                        ErrorKind::Internal,
                        format!(
                            "the orchestrator running this job died {} times; giving up (crash-requeue cap)",
                            n + 1
                        ),
                    );
                    s.finish_or_retry(id, Next::Fail, err, now)
                }
                ReapAction::Cancel => {
                    s.finish_or_retry(id, Next::Cancel, ExecutionError::cancelled(""), now)
                }
            }
        }
        (_, reason) => {
            let phase = job.phase.map(|p| p.phase);
            let since = job.progress_at.unwrap_or(job.updated_at);
            let err = match reason {
                ReapReason::JobDeadline => {
                    ExecutionError::timeout(TimeoutPhase::Total, now.since(job.created_at), None)
                }
                ReapReason::PhaseDeadline => ExecutionError::timeout(
                    phase.unwrap_or(TimeoutPhase::NodeSilence),
                    now.since(since),
                    None,
                ),
                _ => ExecutionError::timeout(TimeoutPhase::NodeSilence, now.since(since), None),
            };
            let backend = close_attempt(
                job,
                claim,
                AttemptOutcome::TimedOut,
                Some(err.clone()),
                Vec::new(),
                Vec::new(),
                now,
            );
            let retry = (action == ReapAction::Requeue).then_some(now);
            s.apply_failure(id, claim, backend, err, retry, now)
        }
    }
}
