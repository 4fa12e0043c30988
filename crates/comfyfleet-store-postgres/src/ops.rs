//! The [`TaskStore`](comfyfleet_core::TaskStore) operations as PostgreSQL statements.
//!
//! Every write runs inside one short transaction that the caller opened (see `tx!` in the
//! crate root): lock the row(s) it needs (`FOR UPDATE`, fenced writes under `state = 'running'
//! AND claims = $n`), apply the contract's rules (the same rules, in the same order, as
//! `comfyfleet_core::MemoryStore`, so that the event sequences match), write back what changed,
//! and append the events last ([`append_events`]), right before the caller commits. Events are
//! built in memory with id 0 and get their global ids there.

use std::collections::BTreeMap;
use std::time::Duration;

use comfyfleet_core::memory::reap_decision;
use comfyfleet_core::transition::{
    AfterFailure as Next, after_failure, close_attempt, open_attempt,
};
use comfyfleet_core::{
    AttemptOutcome, AttemptStart, AttemptUpdate, BackendId, CancelOutcome, CancelResult,
    CancelStep, Claimed, Completion, Enqueued, ErrorKind, Event, EventKind, EventQuery,
    ExecutionError, Failure, HeartbeatAck, JobFilter, JobId, JobPage, JobRecord, JobState, Lease,
    NewJob, ReapAction, ReapItem, ReapOptions, ReapReason, ReapReport, Restriction,
    RestrictionKind, StateCounts, StoreError, TimeoutPhase, Timestamp, WorkflowHash,
};
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

use crate::codec::{
    JOB_COLS, Loaded, Lock, SUMMARY_COLS, append_events, col, event_from_row, job_from_row,
    load_attempts, load_job, ms, save_job, summary_from_row, to_json,
};
use crate::error::{Context, constraint, invalid, sqlstate};

fn lost(lease: &Lease) -> StoreError {
    StoreError::LeaseLost {
        job: lease.job,
        attempt: lease.attempt,
    }
}

/// A job loaded (and locked) under a lease, to be changed and written back.
struct Fenced {
    job: JobRecord,
    loaded: Loaded,
    claims: u32,
}

impl Fenced {
    async fn load(c: &mut PgConnection, lease: &Lease) -> Result<Fenced, StoreError> {
        let job = load_job(c, lease.job, Some(lease.attempt), Lock::ForUpdate)
            .await?
            .ok_or_else(|| lost(lease))?;
        Ok(Fenced {
            loaded: Loaded::of(&job)?,
            claims: lease.attempt,
            job,
        })
    }

    async fn save(&self, c: &mut PgConnection) -> Result<(), StoreError> {
        if save_job(c, &self.job, &self.loaded, Some(self.claims)).await? {
            Ok(())
        } else {
            // Cannot happen while this transaction holds the row lock; never write anyway.
            Err(StoreError::LeaseLost {
                job: self.job.id,
                attempt: self.claims,
            })
        }
    }
}

async fn save_unfenced(
    c: &mut PgConnection,
    job: &JobRecord,
    loaded: &Loaded,
) -> Result<(), StoreError> {
    if save_job(c, job, loaded, None).await? {
        Ok(())
    } else {
        Err(StoreError::NotFound(job.id))
    }
}

// ---------------------------------------------------------------------------------------------
// The rules, as in comfyfleet_core::memory (same order of changes and events).
// ---------------------------------------------------------------------------------------------

/// Records an event on the job (id assigned at [`append_events`]).
fn push_event(job: &mut JobRecord, kind: EventKind, now: Timestamp) -> Event {
    job.last_seq += 1;
    job.updated_at = now;
    Event {
        id: 0,
        job: job.id,
        seq: job.last_seq,
        at: now,
        kind,
    }
}

fn apply_failure(
    job: &mut JobRecord,
    attempt: u32,
    backend: Option<BackendId>,
    error: ExecutionError,
    retry_at: Option<Timestamp>,
    now: Timestamp,
) -> Vec<Event> {
    let next = after_failure(job, retry_at);
    let mut events = Vec::new();
    let retry_at = match next {
        Next::Retry(at) => Some(at),
        _ => None,
    };
    if let Some(backend) = backend {
        events.push(push_event(
            job,
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
        events.push(push_event(
            job,
            EventKind::Waiting {
                reason: error.message.clone(),
                until: Some(until),
            },
            now,
        ));
    }
    events.extend(finish_or_retry(job, next, error, now));
    events
}

fn finish_or_retry(
    job: &mut JobRecord,
    next: Next,
    error: ExecutionError,
    now: Timestamp,
) -> Vec<Event> {
    job.lease = None;
    job.phase = None;
    match next {
        Next::Retry(at) => {
            job.state = JobState::RetryWait;
            job.run_at = at;
            Vec::new()
        }
        Next::Fail => {
            job.state = JobState::Failed;
            job.finished_at = Some(now);
            job.error = Some(error.clone());
            vec![push_event(job, EventKind::Failed { error }, now)]
        }
        Next::Cancel => {
            let reason = "force-cancelled".to_string();
            job.state = JobState::Cancelled;
            job.finished_at = Some(now);
            job.error = Some(ExecutionError::cancelled(reason.clone()));
            vec![push_event(job, EventKind::Cancelled { reason }, now)]
        }
    }
}

fn cancel_now(job: &mut JobRecord, reason: &str, now: Timestamp) -> Vec<Event> {
    job.state = JobState::Cancelled;
    job.finished_at = Some(now);
    job.lease = None;
    job.error = Some(ExecutionError::cancelled(reason));
    vec![push_event(
        job,
        EventKind::Cancelled {
            reason: reason.to_owned(),
        },
        now,
    )]
}

// ---------------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------------

/// Validates a new job (outside any transaction).
pub(crate) fn validate(new: &NewJob) -> Result<(), StoreError> {
    new.spec
        .validate()
        .map_err(|e| StoreError::InvalidInput(e.to_string()))
}

async fn job_with_key(c: &mut PgConnection, key: &str) -> Result<Option<JobId>, StoreError> {
    let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(&mut *c)
        .await
        .ctx("enqueue")?;
    Ok(id.map(JobId::from_uuid))
}

/// Enqueues inside an open transaction.
pub(crate) async fn enqueue(
    c: &mut PgConnection,
    new: NewJob,
    now: Timestamp,
    channel: &str,
) -> Result<Enqueued, StoreError> {
    const W: &str = "enqueue";
    if let Some(key) = &new.spec.idempotency_key
        && let Some(existing) = job_with_key(c, key).await?
    {
        return Ok(Enqueued {
            id: existing,
            created: false,
            events: Vec::new(),
        });
    }
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1)")
        .bind(*new.id.as_uuid())
        .fetch_one(&mut *c)
        .await
        .ctx(W)?;
    if exists {
        return Err(StoreError::InvalidInput(format!(
            "job id {} already exists",
            new.id
        )));
    }
    let deadline = new
        .spec
        .deadline_ms
        .map(|d| now.add(Duration::from_millis(d)));
    let priority = new.spec.priority;
    // ON CONFLICT DO NOTHING: a concurrent enqueue of the same id or idempotency key waits
    // for the other transaction and then inserts nothing (instead of aborting this one).
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, state, priority, created_at, updated_at, run_at, deadline, \
         last_seq, idempotency_key, spec, labels) \
         VALUES ($1, 'pending', $2, $3, $3, $3, $4, 1, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(*new.id.as_uuid())
    .bind(priority)
    .bind(ms(now))
    .bind(deadline.map(ms))
    .bind(new.spec.idempotency_key.as_deref())
    .bind(to_json("spec", &new.spec)?)
    .bind(to_json("labels", &new.spec.labels)?)
    .execute(&mut *c)
    .await
    .ctx(W)?
    .rows_affected();
    if inserted == 0 {
        // Lost a race: the other job is committed by now (ON CONFLICT waited for it).
        if let Some(key) = &new.spec.idempotency_key
            && let Some(existing) = job_with_key(c, key).await?
        {
            return Ok(Enqueued {
                id: existing,
                created: false,
                events: Vec::new(),
            });
        }
        return Err(StoreError::InvalidInput(format!(
            "job id {} already exists",
            new.id
        )));
    }
    if !new.spec.labels.is_empty() {
        let (keys, values): (Vec<&str>, Vec<&str>) = new
            .spec
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .unzip();
        sqlx::query(
            "INSERT INTO job_labels (job_id, key, value) \
             SELECT $1, k, v FROM UNNEST($2::text[], $3::text[]) AS t (k, v)",
        )
        .bind(*new.id.as_uuid())
        .bind(keys)
        .bind(values)
        .execute(&mut *c)
        .await
        .ctx(W)?;
    }
    let mut events = vec![Event {
        id: 0,
        job: new.id,
        seq: 1,
        at: now,
        kind: EventKind::Submitted { priority },
    }];
    append_events(c, &mut events, channel).await?;
    Ok(Enqueued {
        id: new.id,
        created: true,
        events,
    })
}

/// One statement: pick the next due job (skipping rows other claimers hold) and take it.
pub(crate) async fn claim(
    c: &mut PgConnection,
    owner: &str,
    lease_ttl: Duration,
    now: Timestamp,
) -> Result<Option<Claimed>, StoreError> {
    const W: &str = "claim";
    let sql = format!(
        "WITH next AS ( \
           SELECT ord FROM jobs \
           WHERE state IN ('pending', 'retry_wait') AND run_at <= $3 \
           ORDER BY priority DESC, ord LIMIT 1 \
           FOR UPDATE SKIP LOCKED) \
         UPDATE jobs SET state = 'running', claims = claims + 1, lease_owner = $1, \
           lease_expires_at = $2, updated_at = $3 \
         FROM next WHERE jobs.ord = next.ord \
         RETURNING {}",
        JOB_COLS
            .split(", ")
            .map(|c| format!("jobs.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(owner)
        .bind(ms(now.add(lease_ttl)))
        .bind(ms(now))
        .fetch_optional(&mut *c)
        .await
        .ctx(W)?;
    let Some(row) = row else { return Ok(None) };
    let mut job = job_from_row(&row)?;
    job.attempts = load_attempts(c, job.id).await?;
    Ok(Some(Claimed {
        lease: Lease {
            job: job.id,
            attempt: job.claims,
            owner: owner.to_owned(),
        },
        job,
    }))
}

/// One fenced UPDATE: atomic on its own.
pub(crate) async fn heartbeat(
    c: &mut PgConnection,
    lease: &Lease,
    lease_ttl: Duration,
    now: Timestamp,
) -> Result<HeartbeatAck, StoreError> {
    let expires_at = now.add(lease_ttl);
    let cancel_requested: Option<bool> = sqlx::query_scalar(
        "UPDATE jobs SET lease_owner = $3, lease_expires_at = $4 \
         WHERE id = $1 AND state = 'running' AND claims = $2 \
         RETURNING cancel_requested_at IS NOT NULL",
    )
    .bind(*lease.job.as_uuid())
    .bind(i64::from(lease.attempt))
    .bind(&lease.owner)
    .bind(ms(expires_at))
    .fetch_optional(&mut *c)
    .await
    .ctx("heartbeat")?;
    match cancel_requested {
        Some(cancel_requested) => Ok(HeartbeatAck {
            cancel_requested,
            expires_at,
        }),
        None => Err(lost(lease)),
    }
}

pub(crate) async fn release(
    c: &mut PgConnection,
    lease: &Lease,
    run_at: Timestamp,
    reason: &str,
    now: Timestamp,
    channel: &str,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(c, lease).await?;
    let job = &mut f.job;
    if open_attempt(job, lease.attempt).is_some() {
        return Err(StoreError::InvalidTransition {
            job: lease.job,
            state: job.state,
            operation: "release a job with a running attempt",
        });
    }
    let mut events = if job.cancel_requested_at.is_some() {
        cancel_now(job, "force-cancelled", now)
    } else {
        job.state = JobState::Pending;
        job.run_at = run_at;
        job.lease = None;
        job.wait_reason = Some(reason.to_owned());
        vec![push_event(
            job,
            EventKind::Waiting {
                reason: reason.to_owned(),
                until: Some(run_at),
            },
            now,
        )]
    };
    f.save(c).await?;
    append_events(c, &mut events, channel).await?;
    Ok(events)
}

/// Open attempts on one backend (any job, any owner).
async fn open_attempts(c: &mut PgConnection, backend: &BackendId) -> Result<i64, StoreError> {
    sqlx::query_scalar("SELECT count(*) FROM attempts WHERE backend = $1 AND ended_at IS NULL")
        .bind(backend.as_str())
        .fetch_one(&mut *c)
        .await
        .ctx("count open attempts")
}

pub(crate) async fn start_attempt(
    c: &mut PgConnection,
    lease: &Lease,
    start: AttemptStart,
    now: Timestamp,
    channel: &str,
) -> Result<Vec<Event>, StoreError> {
    const W: &str = "start an attempt";
    let mut f = Fenced::load(c, lease).await?;
    let job = &mut f.job;
    comfyfleet_core::transition::check_attempt_start(job, lease.attempt, &start)?;
    if let Some(capacity) = start.capacity {
        // Serialise the capacity-checked starts on this backend across every process: lock
        // its slot row, then count (a fresh snapshot per statement under READ COMMITTED sees
        // every start committed before the lock was granted), then insert. The job row is
        // always locked before the slot row, so this cannot deadlock with another start.
        sqlx::query("INSERT INTO backend_slots (backend) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(start.backend.as_str())
            .execute(&mut *c)
            .await
            .ctx(W)?;
        sqlx::query("SELECT backend FROM backend_slots WHERE backend = $1 FOR UPDATE")
            .bind(start.backend.as_str())
            .execute(&mut *c)
            .await
            .ctx(W)?;
        if open_attempts(c, &start.backend).await? >= i64::from(capacity) {
            return Err(StoreError::BackendFull {
                backend: start.backend,
                capacity,
            });
        }
    }
    let kind = comfyfleet_core::transition::begin_attempt(job, lease.attempt, start, now);
    let mut events = vec![push_event(job, kind, now)];
    f.save(c).await?;
    append_events(c, &mut events, channel).await?;
    Ok(events)
}

pub(crate) async fn update_attempt(
    c: &mut PgConnection,
    lease: &Lease,
    update: AttemptUpdate,
    now: Timestamp,
    channel: &str,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(c, lease).await?;
    let job = &mut f.job;
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
        events.push(push_event(job, kind, now));
    }
    f.save(c).await?;
    append_events(c, &mut events, channel).await?;
    Ok(events)
}

pub(crate) async fn complete(
    c: &mut PgConnection,
    lease: &Lease,
    completion: Completion,
    now: Timestamp,
    channel: &str,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(c, lease).await?;
    let kind = comfyfleet_core::transition::complete(&mut f.job, lease.attempt, completion, now)?;
    let mut events = vec![push_event(&mut f.job, kind, now)];
    f.save(c).await?;
    append_events(c, &mut events, channel).await?;
    Ok(events)
}

pub(crate) async fn fail(
    c: &mut PgConnection,
    lease: &Lease,
    failure: Failure,
    now: Timestamp,
    channel: &str,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(c, lease).await?;
    let job = &mut f.job;
    let backend = close_attempt(
        job,
        lease.attempt,
        failure.outcome,
        Some(failure.error.clone()),
        failure.nodes,
        failure.cancel_steps,
        now,
    );
    let mut events = apply_failure(
        job,
        lease.attempt,
        backend,
        failure.error,
        failure.retry_at,
        now,
    );
    f.save(c).await?;
    append_events(c, &mut events, channel).await?;
    Ok(events)
}

pub(crate) async fn cancel(
    c: &mut PgConnection,
    id: JobId,
    reason: &str,
    force: bool,
    now: Timestamp,
    channel: &str,
) -> Result<CancelResult, StoreError> {
    let mut job = load_job(c, id, None, Lock::ForUpdate)
        .await?
        .ok_or(StoreError::NotFound(id))?;
    let loaded = Loaded::of(&job)?;
    let (outcome, mut events) = match job.state {
        JobState::Pending | JobState::RetryWait => {
            (CancelOutcome::Cancelled, cancel_now(&mut job, reason, now))
        }
        JobState::Running if !force => (CancelOutcome::Running, Vec::new()),
        JobState::Running if job.cancel_requested_at.is_some() => {
            (CancelOutcome::AlreadyRequested, Vec::new())
        }
        JobState::Running => {
            job.cancel_requested_at = Some(now);
            let ev = push_event(&mut job, EventKind::CancelRequested { force: true }, now);
            (CancelOutcome::CancelRequested, vec![ev])
        }
        st => (CancelOutcome::AlreadyTerminal(st), Vec::new()),
    };
    if !events.is_empty() {
        save_unfenced(c, &job, &loaded).await?;
        append_events(c, &mut events, channel).await?;
    }
    Ok(CancelResult { outcome, events })
}

pub(crate) async fn ack_cancel(
    c: &mut PgConnection,
    lease: &Lease,
    steps: Vec<CancelStep>,
    now: Timestamp,
    channel: &str,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(c, lease).await?;
    let job = &mut f.job;
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
    let mut events = cancel_now(job, reason, now);
    f.save(c).await?;
    append_events(c, &mut events, channel).await?;
    Ok(events)
}

pub(crate) async fn detach(
    c: &mut PgConnection,
    lease: &Lease,
    now: Timestamp,
    channel: &str,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(c, lease).await?;
    let kind = comfyfleet_core::transition::detach(&mut f.job, lease.attempt, now);
    let mut events = vec![push_event(&mut f.job, kind, now)];
    f.save(c).await?;
    append_events(c, &mut events, channel).await?;
    Ok(events)
}

// ---------------------------------------------------------------------------------------------
// The reaper
// ---------------------------------------------------------------------------------------------

/// The jobs the reaper may act on, ordered by id: a superset of what [`reap_decision`] picks
/// (it decides). A real run locks them, skipping rows another transaction holds (a heartbeat
/// or completion in flight): those are looked at again by the next run.
async fn reap_candidates(
    c: &mut PgConnection,
    options: &ReapOptions,
    now: Timestamp,
) -> Result<Vec<JobRecord>, StoreError> {
    const W: &str = "find jobs to reap";
    // Running jobs whose lease, job deadline or phase deadline ran out, or that may be silent
    // (progress_at is set by every start_attempt, so NULL means no attempt ever ran).
    let silent_before = match options.stuck_after {
        None => None,
        Some(d) if d.is_zero() => Some(i64::MAX),
        Some(d) => Some(ms(now.sub(d))),
    };
    let lock = if options.dry_run {
        ""
    } else {
        " FOR UPDATE SKIP LOCKED"
    };
    let running = format!(
        "SELECT {JOB_COLS} FROM jobs WHERE state = 'running' AND (lease_expires_at <= $1 \
           OR deadline <= $1 OR phase_deadline <= $1 \
           OR ($2::bigint IS NOT NULL AND (progress_at IS NULL OR progress_at <= $2))){lock}"
    );
    let waiting = format!(
        "SELECT {JOB_COLS} FROM jobs WHERE state IN ('pending', 'retry_wait') \
           AND deadline IS NOT NULL AND deadline <= $1{lock}"
    );
    let mut jobs = Vec::new();
    let rows = sqlx::query(AssertSqlSafe(running))
        .bind(ms(now))
        .bind(silent_before)
        .fetch_all(&mut *c)
        .await
        .ctx(W)?;
    for row in &rows {
        jobs.push(job_from_row(row)?);
    }
    let rows = sqlx::query(AssertSqlSafe(waiting))
        .bind(ms(now))
        .fetch_all(&mut *c)
        .await
        .ctx(W)?;
    for row in &rows {
        jobs.push(job_from_row(row)?);
    }
    jobs.sort_by_key(|j| j.id);
    for job in &mut jobs {
        job.attempts = load_attempts(c, job.id).await?;
    }
    Ok(jobs)
}

/// Finds (and unless `dry_run`, handles) stuck jobs.
pub(crate) async fn reap(
    c: &mut PgConnection,
    options: &ReapOptions,
    now: Timestamp,
    channel: &str,
) -> Result<ReapReport, StoreError> {
    let mut items = Vec::new();
    let mut events = Vec::new();
    for mut job in reap_candidates(c, options, now).await? {
        let Some((reason, action)) = reap_decision(&job, options, now) else {
            continue;
        };
        items.push(ReapItem {
            job: job.id,
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
        let loaded = Loaded::of(&job)?;
        events.extend(apply_reap(&mut job, reason, action, now));
        save_unfenced(c, &job, &loaded).await?;
    }
    append_events(c, &mut events, channel).await?;
    Ok(ReapReport {
        dry_run: options.dry_run,
        items,
        events,
    })
}

fn apply_reap(
    job: &mut JobRecord,
    reason: ReapReason,
    action: ReapAction,
    now: Timestamp,
) -> Vec<Event> {
    let claim = job.claims;
    let owner = job
        .lease
        .as_ref()
        .map(|l| l.owner.clone())
        .unwrap_or_default();
    match (job.state, reason) {
        (JobState::Pending | JobState::RetryWait, _) => {
            let waited = now.since(job.created_at);
            let err = ExecutionError::timeout(TimeoutPhase::Queued, waited, None);
            finish_or_retry(job, Next::Fail, err, now)
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
                        finish_or_retry(job, Next::Retry(now), ExecutionError::transient(""), now);
                    evs.push(push_event(
                        job,
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
                    finish_or_retry(job, Next::Fail, err, now)
                }
                ReapAction::Cancel => {
                    finish_or_retry(job, Next::Cancel, ExecutionError::cancelled(""), now)
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
            apply_failure(job, claim, backend, err, retry, now)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------------

/// Reads a job and its attempts; call it first in its transaction (it asks for one snapshot).
pub(crate) async fn get(c: &mut PgConnection, id: JobId) -> Result<Option<JobRecord>, StoreError> {
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *c)
        .await
        .ctx("read a job")?;
    load_job(c, id, None, Lock::None).await
}

/// One bound value of a dynamic query.
enum Arg {
    Text(String),
    Int(i64),
    Uuid(Uuid),
    Texts(Vec<String>),
}

/// Newest first is `ORDER BY id DESC` (UUID v7 ids sort by creation, and PostgreSQL compares
/// UUIDs byte-wise, as Rust does).
pub(crate) async fn list(c: &mut PgConnection, filter: &JobFilter) -> Result<JobPage, StoreError> {
    const W: &str = "list jobs";
    let limit = filter.effective_limit()?;
    let mut terms: Vec<String> = Vec::new();
    let mut args: Vec<Arg> = Vec::new();
    let mut arg = |v: Arg| {
        args.push(v);
        format!("${}", args.len())
    };
    if !filter.states.is_empty() {
        let states: Vec<String> = filter.states.iter().map(|s| s.as_str().into()).collect();
        let p = arg(Arg::Texts(states));
        terms.push(format!("state = ANY({p}::text[])"));
    }
    if let Some(b) = &filter.backend {
        let p = arg(Arg::Text(b.as_str().into()));
        terms.push(format!("last_backend = {p}"));
    }
    if let Some((k, v)) = &filter.label {
        let pk = arg(Arg::Text(k.clone()));
        let pv = arg(Arg::Text(v.clone()));
        terms.push(format!(
            "id IN (SELECT job_id FROM job_labels WHERE key = {pk} AND value = {pv})"
        ));
    }
    if let Some(t) = filter.created_after {
        let p = arg(Arg::Int(ms(t)));
        terms.push(format!("created_at >= {p}"));
    }
    if let Some(t) = filter.created_before {
        let p = arg(Arg::Int(ms(t)));
        terms.push(format!("created_at < {p}"));
    }
    if let Some(text) = &filter.error_contains {
        let p = arg(Arg::Text(text.to_lowercase()));
        terms.push(format!(
            "error_text IS NOT NULL AND strpos(error_text, {p}) > 0"
        ));
    }
    if let Some(before) = filter.before {
        let p = arg(Arg::Uuid(*before.as_uuid()));
        terms.push(format!("id < {p}"));
    }
    let page = arg(Arg::Int(i64::try_from(limit + 1).unwrap_or(i64::MAX)));
    let mut sql = format!("SELECT {SUMMARY_COLS} FROM jobs");
    if !terms.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&terms.join(" AND "));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {page}"));
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for a in args {
        q = match a {
            Arg::Text(v) => q.bind(v),
            Arg::Int(v) => q.bind(v),
            Arg::Uuid(v) => q.bind(v),
            Arg::Texts(v) => q.bind(v),
        };
    }
    let rows = q.fetch_all(&mut *c).await.ctx(W)?;
    let mut jobs = rows
        .iter()
        .map(summary_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next = if jobs.len() > limit {
        jobs.truncate(limit);
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    Ok(JobPage { jobs, next })
}

pub(crate) async fn counts(c: &mut PgConnection) -> Result<StateCounts, StoreError> {
    const W: &str = "count jobs";
    let mut out: BTreeMap<JobState, u64> = JobState::ALL.into_iter().map(|s| (s, 0)).collect();
    let rows = sqlx::query("SELECT state, count(*) FROM jobs GROUP BY state")
        .fetch_all(&mut *c)
        .await
        .ctx(W)?;
    for row in &rows {
        let state: String = col(row, 0)?;
        let n: i64 = col(row, 1)?;
        let state = state.parse::<JobState>().map_err(invalid)?;
        out.insert(state, u64::try_from(n).unwrap_or(0));
    }
    Ok(StateCounts(out))
}

pub(crate) async fn events(
    c: &mut PgConnection,
    query: &EventQuery,
) -> Result<Vec<Event>, StoreError> {
    const W: &str = "read events";
    let limit = i64::from(if query.limit == 0 { 1000 } else { query.limit });
    let after = match query.after {
        None => 0,
        Some(a) => match i64::try_from(a) {
            Ok(a) => a,
            Err(_) => return Ok(Vec::new()),
        },
    };
    let rows = match query.job {
        // Per job, seq order is id order.
        Some(job) => {
            sqlx::query(
                "SELECT id, job_id, seq, at, kind FROM events \
                 WHERE job_id = $1 AND id > $2 ORDER BY seq LIMIT $3",
            )
            .bind(*job.as_uuid())
            .bind(after)
            .bind(limit)
            .fetch_all(&mut *c)
            .await
        }
        None => {
            sqlx::query(
                "SELECT id, job_id, seq, at, kind FROM events \
                 WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(&mut *c)
            .await
        }
    }
    .ctx(W)?;
    rows.iter().map(event_from_row).collect()
}

/// Deletes up to `batch` finished jobs (with their attempts, labels and events) that finished
/// before `finished_before`; returns how many.
pub(crate) async fn prune_batch(
    c: &mut PgConnection,
    finished_before: Timestamp,
    batch: i64,
) -> Result<u64, StoreError> {
    const W: &str = "prune";
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "DELETE FROM jobs WHERE ord IN ( \
           SELECT ord FROM jobs WHERE finished_at IS NOT NULL AND finished_at < $1 \
           AND state IN ('succeeded', 'failed', 'cancelled') LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING id",
    )
    .bind(ms(finished_before))
    .bind(batch)
    .fetch_all(&mut *c)
    .await
    .ctx(W)?;
    if !ids.is_empty() {
        for sql in [
            "DELETE FROM events WHERE job_id = ANY($1)",
            "DELETE FROM attempts WHERE job_id = ANY($1)",
            "DELETE FROM job_labels WHERE job_id = ANY($1)",
        ] {
            sqlx::query(sql).bind(&ids).execute(&mut *c).await.ctx(W)?;
        }
    }
    Ok(ids.len() as u64)
}

pub(crate) async fn try_lead(
    c: &mut PgConnection,
    owner: &str,
    ttl: Duration,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let row: Option<String> = sqlx::query_scalar(
        "INSERT INTO leader (name, owner, expires_at) VALUES ('maintenance', $1, $2) \
         ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, \
           expires_at = EXCLUDED.expires_at \
         WHERE leader.owner = EXCLUDED.owner OR leader.expires_at <= $3 \
         RETURNING owner",
    )
    .bind(owner)
    .bind(ms(now.add(ttl)))
    .bind(ms(now))
    .fetch_optional(&mut *c)
    .await
    .ctx("try_lead")?;
    Ok(row.is_some())
}

pub(crate) async fn backend_load(
    c: &mut PgConnection,
) -> Result<BTreeMap<BackendId, u32>, StoreError> {
    let rows = sqlx::query(
        "SELECT backend, count(*) FROM attempts WHERE ended_at IS NULL GROUP BY backend",
    )
    .fetch_all(&mut *c)
    .await
    .ctx("backend_load")?;
    let mut load = BTreeMap::new();
    for row in &rows {
        let backend: String = col(row, 0)?;
        let n: i64 = col(row, 1)?;
        load.insert(
            BackendId::new(backend),
            u32::try_from(n).unwrap_or(u32::MAX),
        );
    }
    Ok(load)
}

fn kind_str(kind: RestrictionKind) -> &'static str {
    match kind {
        RestrictionKind::Blocked => "blocked",
        RestrictionKind::CircuitOpen => "circuit_open",
    }
}

pub(crate) async fn share_restrictions(
    c: &mut PgConnection,
    mine: &[Restriction],
    now: Timestamp,
) -> Result<Vec<Restriction>, StoreError> {
    const W: &str = "share_restrictions";
    // One row per key (the later `until` wins, as the upsert would decide), in key order: one
    // statement cannot touch a row twice, and a fixed lock order keeps two orchestrators
    // sharing at once from deadlocking.
    let mut merged: BTreeMap<(&str, &str, &str), &Restriction> = BTreeMap::new();
    for r in mine {
        let key = (
            r.backend.as_str(),
            kind_str(r.kind),
            r.structure.as_ref().map_or("", |h| h.as_str()),
        );
        match merged.get(&key) {
            Some(old) if old.until >= r.until => {}
            _ => {
                merged.insert(key, r);
            }
        }
    }
    if !merged.is_empty() {
        let mut backends = Vec::new();
        let mut kinds = Vec::new();
        let mut structures = Vec::new();
        let mut untils = Vec::new();
        let mut reasons = Vec::new();
        for ((b, k, s), r) in &merged {
            backends.push(*b);
            kinds.push(*k);
            structures.push(*s);
            untils.push(ms(r.until));
            reasons.push(r.reason.as_str());
        }
        sqlx::query(
            "INSERT INTO restrictions (backend, kind, structure, until, reason) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[]) \
             ON CONFLICT (backend, kind, structure) DO UPDATE \
               SET until = EXCLUDED.until, reason = EXCLUDED.reason \
             WHERE EXCLUDED.until > restrictions.until",
        )
        .bind(backends)
        .bind(kinds)
        .bind(structures)
        .bind(untils)
        .bind(reasons)
        .execute(&mut *c)
        .await
        .ctx(W)?;
    }
    sqlx::query("DELETE FROM restrictions WHERE until <= $1")
        .bind(ms(now))
        .execute(&mut *c)
        .await
        .ctx(W)?;
    let rows = sqlx::query(
        "SELECT backend, kind, structure, until, reason FROM restrictions \
         ORDER BY backend, kind, structure",
    )
    .fetch_all(&mut *c)
    .await
    .ctx(W)?;
    rows.iter()
        .map(|row| {
            let kind: String = col(row, 1)?;
            let structure: String = col(row, 2)?;
            Ok(Restriction {
                backend: BackendId::new(col::<String>(row, 0)?),
                kind: match kind.as_str() {
                    "blocked" => RestrictionKind::Blocked,
                    "circuit_open" => RestrictionKind::CircuitOpen,
                    other => return Err(invalid(format!("restriction kind {other:?}"))),
                },
                structure: (!structure.is_empty()).then(|| WorkflowHash::from_hex(structure)),
                until: Timestamp::from_millis(col(row, 3)?),
                reason: col(row, 4)?,
            })
        })
        .collect()
}

/// Whether an error is a unique violation of `index`.
pub(crate) fn violates(e: &sqlx::Error, index: &str) -> bool {
    sqlstate(e).as_deref() == Some("23505") && constraint(e).as_deref() == Some(index)
}
