//! The [`TaskStore`](comfyfleet_core::TaskStore) operations as SQLite transactions.
//!
//! Every write is one short `BEGIN IMMEDIATE` transaction on the writer connection: read the
//! row(s) it needs, apply the contract's rules (the same rules, in the same order, as
//! `comfyfleet_core::MemoryStore`, so that the event sequences match), write back, append the
//! events, commit. Fenced writes read the job with `state = 'running' AND claims = ?` and write
//! it back under the same condition; no match is [`StoreError::LeaseLost`] and nothing changes.

use comfyfleet_core::transition::{
    AfterFailure as Next, after_failure, close_attempt, open_attempt,
};
use std::collections::BTreeMap;
use std::time::Duration;

use comfyfleet_core::memory::reap_decision;
use comfyfleet_core::{
    AttemptOutcome, AttemptStart, AttemptUpdate, BackendId, CancelOutcome, CancelResult,
    CancelStep, Claimed, Completion, Enqueued, ErrorKind, Event, EventKind, EventQuery,
    ExecutionError, Failure, HeartbeatAck, JobFilter, JobId, JobPage, JobRecord, JobState, Lease,
    NewJob, ReapAction, ReapItem, ReapOptions, ReapReason, ReapReport, StateCounts, StoreError,
    TimeoutPhase, Timestamp,
};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};

use crate::codec::{
    JOB_COLS, Loaded, SUMMARY_COLS, event_from_row, id_blob, id_from_blob, insert_event,
    job_from_row, load_attempts, load_job, ms, save_job, summary_from_row, to_json,
};
use crate::error::{Context, SqliteError};

fn lost(lease: &Lease) -> StoreError {
    StoreError::LeaseLost {
        job: lease.job,
        attempt: lease.attempt,
    }
}

/// A job loaded under a lease, to be changed and written back.
struct Fenced {
    job: JobRecord,
    loaded: Loaded,
    claims: u32,
}

impl Fenced {
    fn load(conn: &Connection, lease: &Lease) -> Result<Fenced, StoreError> {
        let job = load_job(conn, lease.job, Some(lease.attempt))?.ok_or_else(|| lost(lease))?;
        Ok(Fenced {
            loaded: Loaded::of(&job)?,
            claims: lease.attempt,
            job,
        })
    }

    fn save(&self, conn: &Connection) -> Result<(), StoreError> {
        if save_job(conn, &self.job, &self.loaded, Some(self.claims))? {
            Ok(())
        } else {
            // Cannot happen inside the transaction that loaded the row; never write anyway.
            Err(StoreError::LeaseLost {
                job: self.job.id,
                attempt: self.claims,
            })
        }
    }
}

fn save_unfenced(conn: &Connection, job: &JobRecord, loaded: &Loaded) -> Result<(), StoreError> {
    if save_job(conn, job, loaded, None)? {
        Ok(())
    } else {
        Err(StoreError::NotFound(job.id))
    }
}

// ---------------------------------------------------------------------------------------------
// The rules, as in comfyfleet_core::memory (same order of changes and events).
// ---------------------------------------------------------------------------------------------

fn push_event(
    conn: &Connection,
    job: &mut JobRecord,
    kind: EventKind,
    now: Timestamp,
) -> Result<Event, StoreError> {
    job.last_seq += 1;
    job.updated_at = now;
    Ok(insert_event(conn, job.id, job.last_seq, now, kind)?)
}

fn apply_failure(
    conn: &Connection,
    job: &mut JobRecord,
    attempt: u32,
    backend: Option<BackendId>,
    error: ExecutionError,
    retry_at: Option<Timestamp>,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
    let next = after_failure(job, retry_at);
    let mut events = Vec::new();
    let retry_at = match next {
        Next::Retry(at) => Some(at),
        _ => None,
    };
    if let Some(backend) = backend {
        events.push(push_event(
            conn,
            job,
            EventKind::AttemptFailed {
                attempt,
                backend,
                error: error.clone(),
                retry_at,
            },
            now,
        )?);
    } else if let Some(until) = retry_at {
        // Never placed and going back to wait: the state change still gets its event.
        events.push(push_event(
            conn,
            job,
            EventKind::Waiting {
                reason: error.message.clone(),
                until: Some(until),
            },
            now,
        )?);
    }
    events.extend(finish_or_retry(conn, job, next, error, now)?);
    Ok(events)
}

fn finish_or_retry(
    conn: &Connection,
    job: &mut JobRecord,
    next: Next,
    error: ExecutionError,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
    job.lease = None;
    job.phase = None;
    Ok(match next {
        Next::Retry(at) => {
            job.state = JobState::RetryWait;
            job.run_at = at;
            Vec::new()
        }
        Next::Fail => {
            job.state = JobState::Failed;
            job.finished_at = Some(now);
            job.error = Some(error.clone());
            vec![push_event(conn, job, EventKind::Failed { error }, now)?]
        }
        Next::Cancel => {
            let reason = "force-cancelled".to_string();
            job.state = JobState::Cancelled;
            job.finished_at = Some(now);
            job.error = Some(ExecutionError::cancelled(reason.clone()));
            vec![push_event(conn, job, EventKind::Cancelled { reason }, now)?]
        }
    })
}

fn cancel_now(
    conn: &Connection,
    job: &mut JobRecord,
    reason: &str,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
    job.state = JobState::Cancelled;
    job.finished_at = Some(now);
    job.lease = None;
    job.error = Some(ExecutionError::cancelled(reason));
    Ok(vec![push_event(
        conn,
        job,
        EventKind::Cancelled {
            reason: reason.to_owned(),
        },
        now,
    )?])
}

// ---------------------------------------------------------------------------------------------
// Writes (run on the writer connection)
// ---------------------------------------------------------------------------------------------

/// Validates a new job (outside any transaction).
pub(crate) fn validate(new: &NewJob) -> Result<(), StoreError> {
    new.spec
        .validate()
        .map_err(|e| StoreError::InvalidInput(e.to_string()))
}

/// Enqueues inside an open transaction.
pub(crate) fn enqueue_in(
    conn: &Connection,
    new: NewJob,
    now: Timestamp,
) -> Result<Enqueued, StoreError> {
    const W: &str = "enqueue";
    if let Some(key) = &new.spec.idempotency_key {
        let existing: Option<Vec<u8>> = conn
            .prepare_cached("SELECT id FROM jobs WHERE idempotency_key = ?1")
            .ctx(W)?
            .query_row(params![key], |r| r.get(0))
            .optional()
            .ctx(W)?;
        if let Some(existing) = existing {
            return Ok(Enqueued {
                id: id_from_blob(&existing)?,
                created: false,
                events: Vec::new(),
            });
        }
    }
    let exists = conn
        .prepare_cached("SELECT 1 FROM jobs WHERE id = ?1")
        .ctx(W)?
        .exists(params![id_blob(new.id)])
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
    conn.prepare_cached(
        "INSERT INTO jobs (id, state, priority, created_at, updated_at, run_at, deadline, \
         last_seq, idempotency_key, spec, labels) \
         VALUES (?1, 'pending', ?2, ?3, ?3, ?3, ?4, 1, ?5, ?6, ?7)",
    )
    .ctx(W)?
    .execute(params![
        id_blob(new.id),
        priority,
        ms(now),
        deadline.map(ms),
        new.spec.idempotency_key,
        to_json("spec", &new.spec)?,
        to_json("labels", &new.spec.labels)?,
    ])
    .ctx(W)?;
    if !new.spec.labels.is_empty() {
        let mut stmt = conn
            .prepare_cached("INSERT INTO job_labels (job_id, key, value) VALUES (?1, ?2, ?3)")
            .ctx(W)?;
        for (k, v) in &new.spec.labels {
            stmt.execute(params![id_blob(new.id), k, v]).ctx(W)?;
        }
    }
    let ev = insert_event(conn, new.id, 1, now, EventKind::Submitted { priority })?;
    Ok(Enqueued {
        id: new.id,
        created: true,
        events: vec![ev],
    })
}

pub(crate) fn claim(
    conn: &Connection,
    owner: &str,
    lease_ttl: Duration,
    now: Timestamp,
) -> Result<Option<Claimed>, StoreError> {
    const W: &str = "claim";
    let sql = format!(
        "UPDATE jobs SET state = 'running', claims = claims + 1, lease_owner = ?1, \
         lease_expires_at = ?2, updated_at = ?3 \
         WHERE ord = (SELECT ord FROM jobs INDEXED BY jobs_ready \
                      WHERE state IN ('pending', 'retry_wait') AND run_at <= ?3 \
                      ORDER BY priority DESC, ord LIMIT 1) \
         RETURNING {JOB_COLS}"
    );
    let job = conn
        .prepare_cached(&sql)
        .ctx(W)?
        .query_row(params![owner, ms(now.add(lease_ttl)), ms(now)], |r| {
            Ok(job_from_row(r))
        })
        .optional()
        .ctx(W)?;
    let Some(job) = job else { return Ok(None) };
    let mut job = job?;
    job.attempts = load_attempts(conn, job.id)?;
    Ok(Some(Claimed {
        lease: Lease {
            job: job.id,
            attempt: job.claims,
            owner: owner.to_owned(),
        },
        job,
    }))
}

pub(crate) fn heartbeat(
    conn: &Connection,
    lease: &Lease,
    lease_ttl: Duration,
    now: Timestamp,
) -> Result<HeartbeatAck, StoreError> {
    let expires_at = now.add(lease_ttl);
    let cancel_requested: Option<bool> = conn
        .prepare_cached(
            "UPDATE jobs SET lease_owner = ?3, lease_expires_at = ?4 \
             WHERE id = ?1 AND state = 'running' AND claims = ?2 \
             RETURNING cancel_requested_at IS NOT NULL",
        )
        .ctx("heartbeat")?
        .query_row(
            params![
                id_blob(lease.job),
                lease.attempt,
                lease.owner,
                ms(expires_at)
            ],
            |r| r.get(0),
        )
        .optional()
        .ctx("heartbeat")?;
    match cancel_requested {
        Some(cancel_requested) => Ok(HeartbeatAck {
            cancel_requested,
            expires_at,
        }),
        None => Err(lost(lease)),
    }
}

pub(crate) fn release(
    conn: &Connection,
    lease: &Lease,
    run_at: Timestamp,
    reason: &str,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(conn, lease)?;
    let job = &mut f.job;
    if open_attempt(job, lease.attempt).is_some() {
        return Err(StoreError::InvalidTransition {
            job: lease.job,
            state: job.state,
            operation: "release a job with a running attempt",
        });
    }
    let events = if job.cancel_requested_at.is_some() {
        cancel_now(conn, job, "force-cancelled", now)?
    } else {
        job.state = JobState::Pending;
        job.run_at = run_at;
        job.lease = None;
        job.wait_reason = Some(reason.to_owned());
        vec![push_event(
            conn,
            job,
            EventKind::Waiting {
                reason: reason.to_owned(),
                until: Some(run_at),
            },
            now,
        )?]
    };
    f.save(conn)?;
    Ok(events)
}

pub(crate) fn start_attempt(
    conn: &Connection,
    lease: &Lease,
    start: AttemptStart,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(conn, lease)?;
    let job = &mut f.job;
    comfyfleet_core::transition::check_attempt_start(job, lease.attempt, &start)?;
    if let Some(capacity) = start.capacity {
        // Inside the writer's `BEGIN IMMEDIATE`: no other connection writes between the count
        // and the insert.
        let open: i64 = conn
            .prepare_cached("SELECT count(*) FROM attempts WHERE backend = ?1 AND ended_at IS NULL")
            .ctx("start_attempt")?
            .query_row(params![start.backend.as_str()], |r| r.get(0))
            .ctx("start_attempt")?;
        if open >= i64::from(capacity) {
            return Err(StoreError::BackendFull {
                backend: start.backend,
                capacity,
            });
        }
    }
    let kind = comfyfleet_core::transition::begin_attempt(job, lease.attempt, start, now);
    let events = vec![push_event(conn, job, kind, now)?];
    f.save(conn)?;
    Ok(events)
}

pub(crate) fn update_attempt(
    conn: &Connection,
    lease: &Lease,
    update: AttemptUpdate,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(conn, lease)?;
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
        events.push(push_event(conn, job, kind, now)?);
    }
    f.save(conn)?;
    Ok(events)
}

pub(crate) fn complete(
    conn: &Connection,
    lease: &Lease,
    completion: Completion,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(conn, lease)?;
    let kind = comfyfleet_core::transition::complete(&mut f.job, lease.attempt, completion, now)?;
    let events = vec![push_event(conn, &mut f.job, kind, now)?];
    f.save(conn)?;
    Ok(events)
}

pub(crate) fn fail(
    conn: &Connection,
    lease: &Lease,
    failure: Failure,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(conn, lease)?;
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
    let events = apply_failure(
        conn,
        job,
        lease.attempt,
        backend,
        failure.error,
        failure.retry_at,
        now,
    )?;
    f.save(conn)?;
    Ok(events)
}

pub(crate) fn cancel(
    conn: &Connection,
    id: JobId,
    reason: &str,
    force: bool,
    now: Timestamp,
) -> Result<CancelResult, StoreError> {
    let mut job = load_job(conn, id, None)?.ok_or(StoreError::NotFound(id))?;
    let loaded = Loaded::of(&job)?;
    let (outcome, events) = match job.state {
        JobState::Pending | JobState::RetryWait => (
            CancelOutcome::Cancelled,
            cancel_now(conn, &mut job, reason, now)?,
        ),
        JobState::Running if !force => (CancelOutcome::Running, Vec::new()),
        JobState::Running if job.cancel_requested_at.is_some() => {
            (CancelOutcome::AlreadyRequested, Vec::new())
        }
        JobState::Running => {
            job.cancel_requested_at = Some(now);
            let ev = push_event(
                conn,
                &mut job,
                EventKind::CancelRequested { force: true },
                now,
            )?;
            (CancelOutcome::CancelRequested, vec![ev])
        }
        st => (CancelOutcome::AlreadyTerminal(st), Vec::new()),
    };
    if !events.is_empty() {
        save_unfenced(conn, &job, &loaded)?;
    }
    Ok(CancelResult { outcome, events })
}

pub(crate) fn ack_cancel(
    conn: &Connection,
    lease: &Lease,
    steps: Vec<CancelStep>,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(conn, lease)?;
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
    let events = cancel_now(conn, job, reason, now)?;
    f.save(conn)?;
    Ok(events)
}

pub(crate) fn detach(
    conn: &Connection,
    lease: &Lease,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
    let mut f = Fenced::load(conn, lease)?;
    let kind = comfyfleet_core::transition::detach(&mut f.job, lease.attempt, now);
    let events = vec![push_event(conn, &mut f.job, kind, now)?];
    f.save(conn)?;
    Ok(events)
}

// ---------------------------------------------------------------------------------------------
// The reaper
// ---------------------------------------------------------------------------------------------

/// The jobs the reaper may act on, ordered by id: a superset of what
/// [`reap_decision`] picks (it decides), found through indexes.
fn reap_candidates(
    conn: &Connection,
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
    let sql = format!(
        "SELECT {JOB_COLS} FROM jobs INDEXED BY jobs_state \
           WHERE state = 'running' AND (lease_expires_at <= ?1 \
           OR deadline <= ?1 OR phase_deadline <= ?1 \
           OR (?2 IS NOT NULL AND (progress_at IS NULL OR progress_at <= ?2))) \
         UNION ALL \
         SELECT {JOB_COLS} FROM jobs INDEXED BY jobs_waiting_deadline \
           WHERE state IN ('pending', 'retry_wait') AND deadline IS NOT NULL AND deadline <= ?1 \
         ORDER BY id"
    );
    let mut stmt = conn.prepare_cached(&sql).ctx(W)?;
    let mut rows = stmt.query(params![ms(now), silent_before]).ctx(W)?;
    let mut jobs = Vec::new();
    while let Some(row) = rows.next().ctx(W)? {
        jobs.push(job_from_row(row)?);
    }
    drop(rows);
    for job in &mut jobs {
        job.attempts = load_attempts(conn, job.id)?;
    }
    Ok(jobs)
}

/// Finds (and unless `dry_run`, handles) stuck jobs. A dry run only reads, so it may run on a
/// read-only connection.
pub(crate) fn reap(
    conn: &Connection,
    options: &ReapOptions,
    now: Timestamp,
) -> Result<ReapReport, StoreError> {
    let mut items = Vec::new();
    let mut events = Vec::new();
    for mut job in reap_candidates(conn, options, now)? {
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
        events.extend(apply_reap(conn, &mut job, reason, action, now)?);
        save_unfenced(conn, &job, &loaded)?;
    }
    Ok(ReapReport {
        dry_run: options.dry_run,
        items,
        events,
    })
}

fn apply_reap(
    conn: &Connection,
    job: &mut JobRecord,
    reason: ReapReason,
    action: ReapAction,
    now: Timestamp,
) -> Result<Vec<Event>, StoreError> {
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
            finish_or_retry(conn, job, Next::Fail, err, now)
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
                    let mut evs = finish_or_retry(
                        conn,
                        job,
                        Next::Retry(now),
                        ExecutionError::transient(""),
                        now,
                    )?;
                    evs.push(push_event(
                        conn,
                        job,
                        EventKind::Requeued {
                            reason: format!("lease of {owner} expired; the orchestrator is gone"),
                            crash_requeues: n,
                        },
                        now,
                    )?);
                    Ok(evs)
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
                    finish_or_retry(conn, job, Next::Fail, err, now)
                }
                ReapAction::Cancel => {
                    finish_or_retry(conn, job, Next::Cancel, ExecutionError::cancelled(""), now)
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
            apply_failure(conn, job, claim, backend, err, retry, now)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reads (any connection)
// ---------------------------------------------------------------------------------------------

pub(crate) fn get(conn: &Connection, id: JobId) -> Result<Option<JobRecord>, StoreError> {
    Ok(load_job(conn, id, None)?)
}

/// The `list` query: its SQL and parameters (shared with [`explain_list`]).
///
/// Newest first is `ORDER BY id DESC` (UUID v7 ids sort by creation). A state filter walks
/// `jobs_state (state, id)` in order, one branch per state merged by a `UNION ALL`, so that no
/// branch reads more than a page; the other filters are served by their own indexes or
/// checked on the rows walked.
fn list_sql(filter: &JobFilter, limit: usize) -> (String, Vec<Value>) {
    let mut terms: Vec<String> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    let arg = |args: &mut Vec<Value>, v: Value| {
        args.push(v);
        format!("?{}", args.len())
    };
    if let Some(b) = &filter.backend {
        let p = arg(&mut args, Value::Text(b.as_str().into()));
        terms.push(format!("last_backend = {p}"));
    }
    if let Some((k, v)) = &filter.label {
        let pk = arg(&mut args, Value::Text(k.clone()));
        let pv = arg(&mut args, Value::Text(v.clone()));
        terms.push(format!(
            "id IN (SELECT job_id FROM job_labels WHERE key = {pk} AND value = {pv})"
        ));
    }
    if let Some(t) = filter.created_after {
        let p = arg(&mut args, Value::Integer(ms(t)));
        terms.push(format!("created_at >= {p}"));
    }
    if let Some(t) = filter.created_before {
        let p = arg(&mut args, Value::Integer(ms(t)));
        terms.push(format!("created_at < {p}"));
    }
    if let Some(text) = &filter.error_contains {
        let p = arg(&mut args, Value::Text(text.to_lowercase()));
        // `error_text IS NOT NULL` lets the partial index `jobs_errors` serve the filter.
        terms.push(format!(
            "error_text IS NOT NULL AND instr(error_text, {p}) > 0"
        ));
    }
    if let Some(before) = filter.before {
        let p = arg(&mut args, Value::Blob(id_blob(before).to_vec()));
        terms.push(format!("id < {p}"));
    }
    let page = arg(
        &mut args,
        Value::Integer(i64::try_from(limit + 1).unwrap_or(i64::MAX)),
    );
    let mut states: Vec<&'static str> = filter.states.iter().map(|s| s.as_str()).collect();
    states.sort_unstable();
    states.dedup();
    let select = |state: Option<String>| {
        let mut all: Vec<String> = state.into_iter().collect();
        all.extend(terms.iter().cloned());
        let mut sql = format!("SELECT {SUMMARY_COLS} FROM jobs");
        if !all.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&all.join(" AND "));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {page}"));
        sql
    };
    let sql = match states.as_slice() {
        [] => select(None),
        [one] => {
            let p = arg(&mut args, Value::Text((*one).into()));
            select(Some(format!("state = {p}")))
        }
        many => {
            let branches: Vec<String> = many
                .iter()
                .map(|st| {
                    let p = arg(&mut args, Value::Text((*st).into()));
                    format!(
                        "SELECT {SUMMARY_COLS} FROM ({})",
                        select(Some(format!("state = {p}")))
                    )
                })
                .collect();
            format!(
                "{} ORDER BY id DESC LIMIT {page}",
                branches.join(" UNION ALL ")
            )
        }
    };
    (sql, args)
}

pub(crate) fn list(conn: &Connection, filter: &JobFilter) -> Result<JobPage, StoreError> {
    const W: &str = "list jobs";
    let limit = filter.effective_limit()?;
    let (sql, args) = list_sql(filter, limit);
    let mut stmt = conn.prepare_cached(&sql).ctx(W)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(args)).ctx(W)?;
    let mut jobs = Vec::with_capacity(limit + 1);
    while let Some(row) = rows.next().ctx(W)? {
        jobs.push(summary_from_row(row)?);
    }
    let next = if jobs.len() > limit {
        jobs.truncate(limit);
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    Ok(JobPage { jobs, next })
}

/// SQLite's plan for a `list` query, one line per step (for tests and diagnostics).
pub(crate) fn explain_list(
    conn: &Connection,
    filter: &JobFilter,
) -> Result<Vec<String>, StoreError> {
    const W: &str = "explain a list query";
    let limit = filter.effective_limit()?;
    let (sql, args) = list_sql(filter, limit);
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).ctx(W)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
        .ctx(W)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r.ctx(W)?);
    }
    Ok(out)
}

pub(crate) fn counts(conn: &Connection) -> Result<StateCounts, StoreError> {
    const W: &str = "count jobs";
    let mut c: BTreeMap<JobState, u64> = JobState::ALL.into_iter().map(|s| (s, 0)).collect();
    let mut stmt = conn
        .prepare_cached("SELECT state, count(*) FROM jobs GROUP BY state")
        .ctx(W)?;
    let mut rows = stmt.query([]).ctx(W)?;
    while let Some(row) = rows.next().ctx(W)? {
        let state: String = row.get(0).ctx(W)?;
        let n: i64 = row.get(1).ctx(W)?;
        let state = state
            .parse::<JobState>()
            .map_err(|e| StoreError::from(SqliteError::Invalid(e)))?;
        c.insert(state, u64::try_from(n).unwrap_or(0));
    }
    Ok(StateCounts(c))
}

pub(crate) fn events(conn: &Connection, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
    const W: &str = "read events";
    let limit = if query.limit == 0 { 1000 } else { query.limit };
    let after = match query.after {
        None => 0,
        Some(a) => match i64::try_from(a) {
            Ok(a) => a,
            Err(_) => return Ok(Vec::new()),
        },
    };
    let mut out = Vec::new();
    let mut push_rows = |mut rows: rusqlite::Rows<'_>| -> Result<(), StoreError> {
        while let Some(row) = rows.next().ctx(W)? {
            out.push(event_from_row(row)?);
        }
        Ok(())
    };
    match query.job {
        // Per job, seq order is id order.
        Some(job) => {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, job_id, seq, at, kind FROM events \
                     WHERE job_id = ?1 AND id > ?2 ORDER BY seq LIMIT ?3",
                )
                .ctx(W)?;
            push_rows(stmt.query(params![id_blob(job), after, limit]).ctx(W)?)?;
        }
        None => {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, job_id, seq, at, kind FROM events \
                     WHERE id > ?1 ORDER BY id LIMIT ?2",
                )
                .ctx(W)?;
            push_rows(stmt.query(params![after, limit]).ctx(W)?)?;
        }
    }
    Ok(out)
}

/// Deletes up to `batch` finished jobs (with their attempts, labels and events) that finished
/// before `finished_before`; returns how many.
pub(crate) fn prune_batch(
    conn: &Connection,
    finished_before: Timestamp,
    batch: usize,
) -> Result<u64, StoreError> {
    const W: &str = "prune";
    let ids: Vec<Vec<u8>> = {
        let mut stmt = conn
            .prepare_cached(
                "SELECT id FROM jobs INDEXED BY jobs_finished \
                 WHERE finished_at IS NOT NULL AND finished_at < ?1 \
                 AND state IN ('succeeded', 'failed', 'cancelled') LIMIT ?2",
            )
            .ctx(W)?;
        let rows = stmt
            .query_map(
                params![
                    ms(finished_before),
                    i64::try_from(batch).unwrap_or(i64::MAX)
                ],
                |r| r.get(0),
            )
            .ctx(W)?;
        rows.collect::<Result<_, _>>().ctx(W)?
    };
    for id in &ids {
        for sql in [
            "DELETE FROM events WHERE job_id = ?1",
            "DELETE FROM attempts WHERE job_id = ?1",
            "DELETE FROM job_labels WHERE job_id = ?1",
            "DELETE FROM jobs WHERE id = ?1",
        ] {
            conn.prepare_cached(sql)
                .ctx(W)?
                .execute(params![id])
                .ctx(W)?;
        }
    }
    Ok(ids.len() as u64)
}

pub(crate) fn try_lead(
    conn: &Connection,
    owner: &str,
    ttl: Duration,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let n = conn
        .prepare_cached(
            "INSERT INTO leader (name, owner, expires_at) VALUES ('maintenance', ?1, ?2) \
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, \
               expires_at = excluded.expires_at \
             WHERE leader.owner = excluded.owner OR leader.expires_at <= ?3",
        )
        .ctx("try_lead")?
        .execute(params![owner, ms(now.add(ttl)), ms(now)])
        .ctx("try_lead")?;
    Ok(n == 1)
}

pub(crate) fn backend_load(
    conn: &Connection,
) -> Result<std::collections::BTreeMap<comfyfleet_core::BackendId, u32>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT backend, count(*) FROM attempts WHERE ended_at IS NULL GROUP BY backend",
        )
        .ctx("backend_load")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .ctx("backend_load")?;
    let mut load = std::collections::BTreeMap::new();
    for row in rows {
        let (backend, n) = row.ctx("backend_load")?;
        load.insert(
            comfyfleet_core::BackendId::new(backend),
            u32::try_from(n).unwrap_or(u32::MAX),
        );
    }
    Ok(load)
}

fn restriction_kind(kind: comfyfleet_core::RestrictionKind) -> &'static str {
    match kind {
        comfyfleet_core::RestrictionKind::Blocked => "blocked",
        comfyfleet_core::RestrictionKind::CircuitOpen => "circuit_open",
    }
}

pub(crate) fn share_restrictions(
    conn: &Connection,
    mine: &[comfyfleet_core::Restriction],
    now: Timestamp,
) -> Result<Vec<comfyfleet_core::Restriction>, StoreError> {
    {
        let mut put = conn
            .prepare_cached(
                "INSERT INTO restrictions (backend, kind, structure, until, reason) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (backend, kind, structure) DO UPDATE \
                   SET until = excluded.until, reason = excluded.reason \
                 WHERE excluded.until > restrictions.until",
            )
            .ctx("share_restrictions")?;
        for r in mine {
            put.execute(params![
                r.backend.as_str(),
                restriction_kind(r.kind),
                r.structure.as_ref().map(|h| h.as_str()).unwrap_or(""),
                ms(r.until),
                r.reason,
            ])
            .ctx("share_restrictions")?;
        }
    }
    conn.prepare_cached("DELETE FROM restrictions WHERE until <= ?1")
        .ctx("share_restrictions")?
        .execute(params![ms(now)])
        .ctx("share_restrictions")?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT backend, kind, structure, until, reason FROM restrictions \
             ORDER BY backend, kind, structure",
        )
        .ctx("share_restrictions")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
            ))
        })
        .ctx("share_restrictions")?;
    let mut out = Vec::new();
    for row in rows {
        let (backend, kind, structure, until, reason) = row.ctx("share_restrictions")?;
        let kind = match kind.as_str() {
            "blocked" => comfyfleet_core::RestrictionKind::Blocked,
            _ => comfyfleet_core::RestrictionKind::CircuitOpen,
        };
        out.push(comfyfleet_core::Restriction {
            backend: comfyfleet_core::BackendId::new(backend),
            kind,
            structure: (!structure.is_empty())
                .then(|| comfyfleet_core::WorkflowHash::from_hex(structure)),
            until: Timestamp::from_millis(until),
            reason,
        });
    }
    Ok(out)
}
