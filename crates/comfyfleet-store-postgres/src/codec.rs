//! Rows ⇄ comfyfleet-core types: reading a [`JobRecord`], writing back what changed, and
//! appending events with ids that become visible in id order.

use comfyfleet_core::{
    Attempt, AttemptOutcome, BackendId, Event, JobId, JobRecord, JobState, JobSummary, LeaseInfo,
    RemoteRef, StoreError, Timestamp,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Decode, PgConnection, Postgres, Row, Type};
use uuid::Uuid;

use crate::error::{Context, bad_json, invalid};

/// The `jobs` columns a [`JobRecord`] is read from, in [`job_from_row`]'s order.
pub(crate) const JOB_COLS: &str = "id, spec, state, created_at, updated_at, run_at, deadline, \
     claims, crash_requeues, lease_owner, lease_expires_at, cancel_requested_at, progress, \
     progress_at, phase, wait_reason, error, artifacts, finished_at, last_seq";

/// The `jobs` columns a [`JobSummary`] is read from, in [`summary_from_row`]'s order.
pub(crate) const SUMMARY_COLS: &str = "id, state, priority, created_at, updated_at, \
     attempt_count, last_backend, progress, error, wait_reason, labels";

const ATTEMPT_COLS: &str = "number, backend, remote, dispatched_at, started_at, ended_at, \
     outcome, error, nodes, reattached, cancel_steps";

/// Milliseconds as stored.
pub(crate) fn ms(t: Timestamp) -> i64 {
    t.as_millis()
}

fn ts(v: Option<i64>) -> Option<Timestamp> {
    v.map(Timestamp::from_millis)
}

/// One column of a row.
pub(crate) fn col<'r, T>(row: &'r PgRow, idx: usize) -> Result<T, StoreError>
where
    T: Decode<'r, Postgres> + Type<Postgres>,
{
    row.try_get(idx).ctx("read a row")
}

/// A BIGINT column that holds a `u32`.
fn u32_col(row: &PgRow, idx: usize, what: &str) -> Result<u32, StoreError> {
    let v: i64 = col(row, idx)?;
    u32::try_from(v).map_err(|_| invalid(format!("{what} = {v}")))
}

/// A job id column.
pub(crate) fn job_id(row: &PgRow, idx: usize) -> Result<JobId, StoreError> {
    Ok(JobId::from_uuid(col::<Uuid>(row, idx)?))
}

fn state_from(s: &str) -> Result<JobState, StoreError> {
    s.parse::<JobState>().map_err(invalid)
}

/// An attempt outcome as stored.
pub(crate) fn outcome_str(o: AttemptOutcome) -> &'static str {
    match o {
        AttemptOutcome::Succeeded => "succeeded",
        AttemptOutcome::Failed => "failed",
        AttemptOutcome::TimedOut => "timed_out",
        AttemptOutcome::Cancelled => "cancelled",
        AttemptOutcome::LeaseExpired => "lease_expired",
        AttemptOutcome::Detached => "detached",
    }
}

fn outcome_from(s: &str) -> Result<AttemptOutcome, StoreError> {
    Ok(match s {
        "succeeded" => AttemptOutcome::Succeeded,
        "failed" => AttemptOutcome::Failed,
        "timed_out" => AttemptOutcome::TimedOut,
        "cancelled" => AttemptOutcome::Cancelled,
        "lease_expired" => AttemptOutcome::LeaseExpired,
        "detached" => AttemptOutcome::Detached,
        other => return Err(invalid(format!("attempt outcome {other:?}"))),
    })
}

/// JSON text of a value.
pub(crate) fn to_json<T: Serialize + ?Sized>(column: &str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v)
        .map_err(|e| StoreError::InvalidInput(format!("cannot encode {column} as JSON: {e}")))
}

fn opt_json<T: Serialize>(column: &str, v: Option<&T>) -> Result<Option<String>, StoreError> {
    v.map(|v| to_json(column, v)).transpose()
}

/// A value from its JSON column.
pub(crate) fn from_json<T: DeserializeOwned>(
    column: &str,
    owner: &dyn std::fmt::Display,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| bad_json(column, &owner.to_string(), e))
}

fn opt_from_json<T: DeserializeOwned>(
    column: &str,
    job: JobId,
    text: Option<String>,
) -> Result<Option<T>, StoreError> {
    text.map(|t| from_json(column, &job, &t)).transpose()
}

/// A [`JobRecord`] without its attempts, from a row of [`JOB_COLS`].
pub(crate) fn job_from_row(row: &PgRow) -> Result<JobRecord, StoreError> {
    let id = job_id(row, 0)?;
    let spec: String = col(row, 1)?;
    let state: String = col(row, 2)?;
    let lease_owner: Option<String> = col(row, 9)?;
    let lease_expires_at: Option<i64> = col(row, 10)?;
    let lease = match (lease_owner, lease_expires_at) {
        (Some(owner), Some(exp)) => Some(LeaseInfo {
            owner,
            expires_at: Timestamp::from_millis(exp),
        }),
        _ => None,
    };
    let artifacts: String = col(row, 17)?;
    Ok(JobRecord {
        id,
        spec: from_json("spec", &id, &spec)?,
        state: state_from(&state)?,
        created_at: Timestamp::from_millis(col(row, 3)?),
        updated_at: Timestamp::from_millis(col(row, 4)?),
        run_at: Timestamp::from_millis(col(row, 5)?),
        deadline: ts(col(row, 6)?),
        claims: u32_col(row, 7, "claims")?,
        attempts: Vec::new(),
        crash_requeues: u32_col(row, 8, "crash_requeues")?,
        lease,
        cancel_requested_at: ts(col(row, 11)?),
        progress: opt_from_json("progress", id, col(row, 12)?)?,
        progress_at: ts(col(row, 13)?),
        phase: opt_from_json("phase", id, col(row, 14)?)?,
        wait_reason: col(row, 15)?,
        error: opt_from_json("error", id, col(row, 16)?)?,
        artifacts: from_json("artifacts", &id, &artifacts)?,
        finished_at: ts(col(row, 18)?),
        last_seq: u32_col(row, 19, "last_seq")?,
    })
}

/// A [`JobSummary`] from a row of [`SUMMARY_COLS`].
pub(crate) fn summary_from_row(row: &PgRow) -> Result<JobSummary, StoreError> {
    let id = job_id(row, 0)?;
    let state: String = col(row, 1)?;
    let progress: Option<comfyfleet_core::Progress> = opt_from_json("progress", id, col(row, 7)?)?;
    let error: Option<comfyfleet_core::ExecutionError> = opt_from_json("error", id, col(row, 8)?)?;
    let labels: String = col(row, 10)?;
    Ok(JobSummary {
        id,
        state: state_from(&state)?,
        priority: col(row, 2)?,
        created_at: Timestamp::from_millis(col(row, 3)?),
        updated_at: Timestamp::from_millis(col(row, 4)?),
        attempts: u32_col(row, 5, "attempt_count")?,
        backend: col::<Option<String>>(row, 6)?.map(BackendId::new),
        percent: progress.map(|p| p.percent),
        error: error.map(|e| e.message),
        wait_reason: col(row, 9)?,
        labels: from_json("labels", &id, &labels)?,
    })
}

/// A job's attempts, in order.
pub(crate) async fn load_attempts(
    c: &mut PgConnection,
    id: JobId,
) -> Result<Vec<Attempt>, StoreError> {
    const W: &str = "read attempts";
    let sql = format!("SELECT {ATTEMPT_COLS} FROM attempts WHERE job_id = $1 ORDER BY number");
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(*id.as_uuid())
        .fetch_all(&mut *c)
        .await
        .ctx(W)?;
    rows.iter()
        .map(|row| {
            let outcome: Option<String> = col(row, 6)?;
            let nodes: String = col(row, 8)?;
            let steps: String = col(row, 10)?;
            let error: Option<String> = col(row, 7)?;
            Ok(Attempt {
                number: u32_col(row, 0, "attempt number")?,
                backend: BackendId::new(col::<String>(row, 1)?),
                remote: col::<Option<String>>(row, 2)?.map(RemoteRef::new),
                dispatched_at: Timestamp::from_millis(col(row, 3)?),
                started_at: ts(col(row, 4)?),
                ended_at: ts(col(row, 5)?),
                outcome: outcome.as_deref().map(outcome_from).transpose()?,
                error: opt_from_json("attempt error", id, error)?,
                nodes: from_json("attempt nodes", &id, &nodes)?,
                reattached: col(row, 9)?,
                cancel_steps: from_json("attempt cancel_steps", &id, &steps)?,
            })
        })
        .collect()
}

/// How [`load_job`] reads the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lock {
    /// A plain read.
    None,
    /// `FOR UPDATE`: the caller changes the row in this transaction.
    ForUpdate,
}

/// One whole job, or `None`. With `fence = Some(claims)`, only while it runs under that claim.
pub(crate) async fn load_job(
    c: &mut PgConnection,
    id: JobId,
    fence: Option<u32>,
    lock: Lock,
) -> Result<Option<JobRecord>, StoreError> {
    const W: &str = "read a job";
    let suffix = if lock == Lock::ForUpdate {
        " FOR UPDATE"
    } else {
        ""
    };
    let row = match fence {
        None => {
            sqlx::query(AssertSqlSafe(format!(
                "SELECT {JOB_COLS} FROM jobs WHERE id = $1{suffix}"
            )))
            .bind(*id.as_uuid())
            .fetch_optional(&mut *c)
            .await
        }
        Some(claims) => {
            sqlx::query(AssertSqlSafe(format!(
                "SELECT {JOB_COLS} FROM jobs WHERE id = $1 AND state = 'running' \
                 AND claims = $2{suffix}"
            )))
            .bind(*id.as_uuid())
            .bind(i64::from(claims))
            .fetch_optional(&mut *c)
            .await
        }
    }
    .ctx(W)?;
    let Some(row) = row else { return Ok(None) };
    let mut job = job_from_row(&row)?;
    job.attempts = load_attempts(c, id).await?;
    Ok(Some(job))
}

/// One column value, typed for binding.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Int(Option<i64>),
    Text(Option<String>),
}

/// The `jobs` columns that change after enqueue, in [`job_columns`]' order.
const MUTABLE_COLS: [&str; 20] = [
    "state",
    "updated_at",
    "run_at",
    "claims",
    "crash_requeues",
    "lease_owner",
    "lease_expires_at",
    "cancel_requested_at",
    "progress",
    "progress_at",
    "phase",
    "phase_deadline",
    "wait_reason",
    "error",
    "error_text",
    "artifacts",
    "finished_at",
    "last_seq",
    "last_backend",
    "attempt_count",
];

fn job_columns(job: &JobRecord) -> Result<[Val; 20], StoreError> {
    let int = |v: i64| Val::Int(Some(v));
    Ok([
        Val::Text(Some(job.state.as_str().to_owned())),
        int(ms(job.updated_at)),
        int(ms(job.run_at)),
        int(job.claims.into()),
        int(job.crash_requeues.into()),
        Val::Text(job.lease.as_ref().map(|l| l.owner.clone())),
        Val::Int(job.lease.as_ref().map(|l| ms(l.expires_at))),
        Val::Int(job.cancel_requested_at.map(ms)),
        Val::Text(opt_json("progress", job.progress.as_ref())?),
        Val::Int(job.progress_at.map(ms)),
        Val::Text(opt_json("phase", job.phase.as_ref())?),
        Val::Int(job.phase.and_then(|p| p.deadline).map(ms)),
        Val::Text(job.wait_reason.clone()),
        Val::Text(opt_json("error", job.error.as_ref())?),
        Val::Text(job.error.as_ref().map(|e| e.message.to_lowercase())),
        Val::Text(Some(to_json("artifacts", &job.artifacts)?)),
        Val::Int(job.finished_at.map(ms)),
        int(job.last_seq.into()),
        Val::Text(job.attempts.last().map(|a| a.backend.as_str().to_owned())),
        int(i64::try_from(job.attempts.len()).unwrap_or(i64::MAX)),
    ])
}

/// What a loaded job looked like, to write back only what changed (fewer index updates, more
/// HOT updates).
pub(crate) struct Loaded {
    columns: [Val; 20],
    attempts: usize,
    last_attempt: Option<Attempt>,
}

impl Loaded {
    /// Remembers a freshly loaded job.
    pub(crate) fn of(job: &JobRecord) -> Result<Self, StoreError> {
        Ok(Loaded {
            columns: job_columns(job)?,
            attempts: job.attempts.len(),
            last_attempt: job.attempts.last().cloned(),
        })
    }
}

/// Writes a changed job back. With `fence = Some(claims)` the row is only written while it is
/// still `running` under that claim (the caller locked it in the same transaction; this is the
/// belt to those braces): `Ok(false)` means nothing matched and the caller must roll back.
pub(crate) async fn save_job(
    c: &mut PgConnection,
    job: &JobRecord,
    loaded: &Loaded,
    fence: Option<u32>,
) -> Result<bool, StoreError> {
    const W: &str = "write a job";
    let values = job_columns(job)?;
    let mut sql = String::from("UPDATE jobs SET ");
    let mut args: Vec<Val> = Vec::with_capacity(22);
    for ((name, new), old) in MUTABLE_COLS.iter().zip(values).zip(&loaded.columns) {
        if &new != old {
            args.push(new);
            if args.len() > 1 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("{name} = ${}", args.len()));
        }
    }
    if args.is_empty() {
        // Nothing changed, but the fence must still hold: touch nothing, check the row.
        sql.push_str("last_seq = last_seq");
    }
    sql.push_str(&format!(" WHERE id = ${}", args.len() + 1));
    if fence.is_some() {
        sql.push_str(&format!(
            " AND state = 'running' AND claims = ${}",
            args.len() + 2
        ));
    }
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for v in args {
        q = match v {
            Val::Int(v) => q.bind(v),
            Val::Text(v) => q.bind(v),
        };
    }
    q = q.bind(*job.id.as_uuid());
    if let Some(claims) = fence {
        q = q.bind(i64::from(claims));
    }
    let changed = q.execute(&mut *c).await.ctx(W)?.rows_affected();
    if changed != 1 {
        return Ok(false);
    }
    // Attempts only ever grow by one at the end, or change their last element.
    let len = job.attempts.len();
    if len > loaded.attempts || (len > 0 && job.attempts.last() != loaded.last_attempt.as_ref()) {
        if len > loaded.attempts + 1 {
            return Err(StoreError::InvalidInput(
                "more than one attempt added in one change".into(),
            ));
        }
        if let Some(a) = job.attempts.last() {
            save_attempt(c, job.id, a).await?;
        }
    }
    Ok(true)
}

async fn save_attempt(c: &mut PgConnection, job: JobId, a: &Attempt) -> Result<(), StoreError> {
    const W: &str = "write an attempt";
    sqlx::query(
        "INSERT INTO attempts (job_id, number, backend, remote, dispatched_at, started_at, \
         ended_at, outcome, error, nodes, reattached, cancel_steps) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (job_id, number) DO UPDATE SET backend = EXCLUDED.backend, \
         remote = EXCLUDED.remote, dispatched_at = EXCLUDED.dispatched_at, \
         started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at, \
         outcome = EXCLUDED.outcome, error = EXCLUDED.error, nodes = EXCLUDED.nodes, \
         reattached = EXCLUDED.reattached, cancel_steps = EXCLUDED.cancel_steps",
    )
    .bind(*job.as_uuid())
    .bind(i64::from(a.number))
    .bind(a.backend.as_str())
    .bind(a.remote.as_ref().map(|r| r.as_str()))
    .bind(ms(a.dispatched_at))
    .bind(a.started_at.map(ms))
    .bind(a.ended_at.map(ms))
    .bind(a.outcome.map(outcome_str))
    .bind(opt_json("attempt error", a.error.as_ref())?)
    .bind(to_json("attempt nodes", &a.nodes)?)
    .bind(a.reattached)
    .bind(to_json("attempt cancel_steps", &a.cancel_steps)?)
    .execute(&mut *c)
    .await
    .ctx(W)?;
    Ok(())
}

/// Appends `events` (built with id 0) and gives them their global ids; also sends the
/// wake-up notification on `channel`. Call it as the last step of the transaction, right
/// before commit: the counter row's lock, taken here, is held until commit, so transactions
/// that append events commit in the order of their ids and a reader tailing "after id X"
/// never misses a smaller id that commits later.
pub(crate) async fn append_events(
    c: &mut PgConnection,
    events: &mut [Event],
    channel: &str,
) -> Result<(), StoreError> {
    const W: &str = "append events";
    if events.is_empty() {
        return Ok(());
    }
    // Delivered at commit, dropped on rollback; identical notifications in one transaction
    // are folded into one.
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channel)
        .execute(&mut *c)
        .await
        .ctx(W)?;
    let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
    let last: i64 = sqlx::query_scalar("UPDATE event_counter SET last = last + $1 RETURNING last")
        .bind(n)
        .fetch_one(&mut *c)
        .await
        .ctx(W)?;
    let first = last - n + 1;
    let mut ids = Vec::with_capacity(events.len());
    let mut jobs = Vec::with_capacity(events.len());
    let mut seqs = Vec::with_capacity(events.len());
    let mut ats = Vec::with_capacity(events.len());
    let mut kinds = Vec::with_capacity(events.len());
    for (id, ev) in (first..).zip(events.iter_mut()) {
        ev.id = u64::try_from(id).map_err(|_| invalid(format!("event id {id}")))?;
        ids.push(id);
        jobs.push(*ev.job.as_uuid());
        seqs.push(i64::from(ev.seq));
        ats.push(ms(ev.at));
        kinds.push(to_json("event", &ev.kind)?);
    }
    sqlx::query(
        "INSERT INTO events (id, job_id, seq, at, kind) \
         SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::bigint[], $4::bigint[], $5::text[])",
    )
    .bind(ids)
    .bind(jobs)
    .bind(seqs)
    .bind(ats)
    .bind(kinds)
    .execute(&mut *c)
    .await
    .ctx(W)?;
    Ok(())
}

/// An event from a row of `id, job_id, seq, at, kind`.
pub(crate) fn event_from_row(row: &PgRow) -> Result<Event, StoreError> {
    let id: i64 = col(row, 0)?;
    let job = job_id(row, 1)?;
    let kind: String = col(row, 4)?;
    Ok(Event {
        id: u64::try_from(id).map_err(|_| invalid(format!("event id {id}")))?,
        job,
        seq: u32_col(row, 2, "event seq")?,
        at: Timestamp::from_millis(col(row, 3)?),
        kind: from_json("event", &job, &kind)?,
    })
}
