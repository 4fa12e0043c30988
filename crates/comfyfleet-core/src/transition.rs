//! Pure job-state transition helpers shared by every [`crate::TaskStore`] implementation, so
//! that the in-memory, SQLite and PostgreSQL stores decide retries and close attempts by one
//! definition (each store only loads, applies and saves).

use crate::error::ExecutionError;
use crate::ids::BackendId;
use crate::job::{Attempt, AttemptOutcome, CancelStep, JobRecord, NodeTiming};
use crate::time::Timestamp;

/// Where a job goes after its attempt failed (or a stuck attempt was timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// To `retry_wait`, due at this time.
    Retry(Timestamp),
    /// To `failed`.
    Fail,
    /// To `cancelled`: a force-cancel was requested, and a requested cancel is never lost.
    Cancel,
}

/// The store contract's retry rule: a pending cancel wins; otherwise retry only while attempts
/// remain and strictly before the job's deadline.
pub fn after_failure(job: &JobRecord, retry_at: Option<Timestamp>) -> AfterFailure {
    if job.cancel_requested_at.is_some() {
        return AfterFailure::Cancel;
    }
    match retry_at {
        Some(at)
            if job.counted_attempts() < job.spec.max_attempts
                && job.deadline.is_none_or(|d| at < d) =>
        {
            AfterFailure::Retry(at)
        }
        _ => AfterFailure::Fail,
    }
}

/// The attempt the claim `claim` opened, if it is still open.
pub fn open_attempt(job: &mut JobRecord, claim: u32) -> Option<&mut Attempt> {
    job.attempts
        .last_mut()
        .filter(|a| a.outcome.is_none() && a.number == claim)
}

/// Closes the claim's open attempt; returns its backend (`None` if no attempt was open).
pub fn close_attempt(
    job: &mut JobRecord,
    claim: u32,
    outcome: AttemptOutcome,
    error: Option<ExecutionError>,
    nodes: Vec<NodeTiming>,
    steps: Vec<CancelStep>,
    now: Timestamp,
) -> Option<BackendId> {
    let a = open_attempt(job, claim)?;
    a.outcome = Some(outcome);
    a.ended_at = Some(now);
    a.error = error;
    if !nodes.is_empty() {
        a.nodes = nodes;
    }
    a.cancel_steps.extend(steps);
    Some(a.backend.clone())
}

/// The store contract's checks before a new attempt under `claim` (after fencing, before the
/// capacity check): one attempt per claim, and a reattached attempt names its remote.
pub fn check_attempt_start(
    job: &JobRecord,
    claim: u32,
    start: &crate::store::AttemptStart,
) -> Result<(), crate::error::StoreError> {
    if job.attempts.last().is_some_and(|a| a.number == claim) {
        return Err(crate::error::StoreError::InvalidTransition {
            job: job.id,
            state: job.state,
            operation: "start a second attempt under one claim",
        });
    }
    if start.reattached && start.remote.is_none() {
        return Err(crate::error::StoreError::InvalidInput(
            "a reattached attempt needs its remote id".into(),
        ));
    }
    Ok(())
}

/// Opens the attempt of `claim` on the job (checked by [`check_attempt_start`]) and returns
/// the event it appends: `reattached` when it continues a remote execution, else `dispatched`.
pub fn begin_attempt(
    job: &mut JobRecord,
    claim: u32,
    start: crate::store::AttemptStart,
    now: Timestamp,
) -> crate::event::EventKind {
    job.attempts.push(Attempt {
        number: claim,
        backend: start.backend.clone(),
        remote: start.remote.clone(),
        dispatched_at: now,
        started_at: None,
        ended_at: None,
        outcome: None,
        error: None,
        nodes: Vec::new(),
        reattached: start.reattached,
        cancel_steps: Vec::new(),
    });
    job.wait_reason = None;
    job.phase = start.phase;
    job.progress_at = Some(now);
    match (start.reattached, start.remote) {
        (true, Some(remote)) => crate::event::EventKind::Reattached {
            attempt: claim,
            backend: start.backend,
            remote,
        },
        _ => crate::event::EventKind::Dispatched {
            attempt: claim,
            backend: start.backend,
            skipped: start.skipped,
        },
    }
}

/// `complete`: the claim's open attempt succeeded; the job becomes `succeeded` with its
/// outputs. Returns the `succeeded` event to append.
pub fn complete(
    job: &mut JobRecord,
    claim: u32,
    completion: crate::store::Completion,
    now: Timestamp,
) -> Result<crate::event::EventKind, crate::error::StoreError> {
    let state = job.state;
    let Some(backend) = close_attempt(
        job,
        claim,
        AttemptOutcome::Succeeded,
        None,
        completion.nodes,
        Vec::new(),
        now,
    ) else {
        return Err(crate::error::StoreError::InvalidTransition {
            job: job.id,
            state,
            operation: "complete without a running attempt",
        });
    };
    job.state = crate::job::JobState::Succeeded;
    job.finished_at = Some(now);
    job.lease = None;
    job.phase = None;
    job.artifacts = completion.artifacts.clone();
    if let Some(p) = completion.progress {
        job.progress = Some(p);
        job.progress_at = Some(now);
    }
    Ok(crate::event::EventKind::Succeeded {
        attempt: claim,
        backend,
        artifacts: completion.artifacts,
    })
}

/// `detach`: the holder shuts down; the attempt closes as `detached` (its remote kept for
/// reattachment) and the job is due again at once. Returns the `requeued` event to append.
pub fn detach(job: &mut JobRecord, claim: u32, now: Timestamp) -> crate::event::EventKind {
    close_attempt(
        job,
        claim,
        AttemptOutcome::Detached,
        None,
        Vec::new(),
        Vec::new(),
        now,
    );
    job.state = crate::job::JobState::RetryWait;
    job.run_at = now;
    job.lease = None;
    job.phase = None;
    crate::event::EventKind::Requeued {
        reason: "orchestrator shut down; the execution will be reattached".into(),
        crash_requeues: job.crash_requeues,
    }
}
