//! Rows ⇄ comfyfleet-core types: reading a [`JobRecord`] and writing back what changed.

use comfyfleet_core::{
    Attempt, AttemptOutcome, BackendId, Event, EventKind, JobId, JobRecord, JobState, JobSummary,
    LeaseInfo, RemoteRef, Timestamp,
};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::{Context, SqliteError};

/// The `jobs` columns a [`JobRecord`] is read from, in [`job_from_row`]'s order.
pub(crate) const JOB_COLS: &str = "id, spec, state, created_at, updated_at, run_at, deadline, \
     claims, crash_requeues, lease_owner, lease_expires_at, cancel_requested_at, progress, \
     progress_at, phase, wait_reason, error, artifacts, finished_at, last_seq";

/// The `jobs` columns a [`JobSummary`] is read from, in [`summary_from_row`]'s order.
pub(crate) const SUMMARY_COLS: &str = "id, state, priority, created_at, updated_at, \
     attempt_count, last_backend, progress, error, wait_reason, labels";

const ATTEMPT_COLS: &str = "number, backend, remote, dispatched_at, started_at, ended_at, \
     outcome, error, nodes, reattached, cancel_steps";

/// A job id as stored: its 16 UUID bytes.
pub(crate) fn id_blob(id: JobId) -> [u8; 16] {
    *id.as_uuid().as_bytes()
}

/// Reads a job id column.
pub(crate) fn id_from_blob(bytes: &[u8]) -> Result<JobId, SqliteError> {
    Uuid::from_slice(bytes)
        .map(JobId::from_uuid)
        .map_err(|_| SqliteError::Invalid(format!("a job id of {} bytes", bytes.len())))
}

/// Milliseconds as stored.
pub(crate) fn ms(t: Timestamp) -> i64 {
    t.as_millis()
}

fn ts(v: Option<i64>) -> Option<Timestamp> {
    v.map(Timestamp::from_millis)
}

/// A state as stored.
pub(crate) fn state_str(s: JobState) -> &'static str {
    s.as_str()
}

fn state_from(s: &str) -> Result<JobState, SqliteError> {
    s.parse::<JobState>().map_err(SqliteError::Invalid)
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

fn outcome_from(s: &str) -> Result<AttemptOutcome, SqliteError> {
    Ok(match s {
        "succeeded" => AttemptOutcome::Succeeded,
        "failed" => AttemptOutcome::Failed,
        "timed_out" => AttemptOutcome::TimedOut,
        "cancelled" => AttemptOutcome::Cancelled,
        "lease_expired" => AttemptOutcome::LeaseExpired,
        "detached" => AttemptOutcome::Detached,
        other => return Err(SqliteError::Invalid(format!("attempt outcome {other:?}"))),
    })
}

/// JSON text of a value.
pub(crate) fn to_json<T: Serialize + ?Sized>(
    column: &'static str,
    v: &T,
) -> Result<String, SqliteError> {
    serde_json::to_string(v).map_err(|source| SqliteError::Json {
        column,
        job: "-".into(),
        source,
    })
}

fn opt_json<T: Serialize>(
    column: &'static str,
    v: Option<&T>,
) -> Result<Option<String>, SqliteError> {
    v.map(|v| to_json(column, v)).transpose()
}

fn from_json<T: DeserializeOwned>(
    column: &'static str,
    job: JobId,
    text: &str,
) -> Result<T, SqliteError> {
    serde_json::from_str(text).map_err(|source| SqliteError::Json {
        column,
        job: job.to_string(),
        source,
    })
}

fn opt_from_json<T: DeserializeOwned>(
    column: &'static str,
    job: JobId,
    text: Option<String>,
) -> Result<Option<T>, SqliteError> {
    text.map(|t| from_json(column, job, &t)).transpose()
}

fn u32_col(row: &Row<'_>, idx: usize, what: &'static str) -> Result<u32, SqliteError> {
    let v: i64 = row.get(idx).ctx(what)?;
    u32::try_from(v).map_err(|_| SqliteError::Invalid(format!("{what} = {v}")))
}

/// A [`JobRecord`] without its attempts, from a row of [`JOB_COLS`].
pub(crate) fn job_from_row(row: &Row<'_>) -> Result<JobRecord, SqliteError> {
    const W: &str = "read a job";
    let id = id_from_blob(&row.get::<_, Vec<u8>>(0).ctx(W)?)?;
    let spec: String = row.get(1).ctx(W)?;
    let state: String = row.get(2).ctx(W)?;
    let lease_owner: Option<String> = row.get(9).ctx(W)?;
    let lease_expires_at: Option<i64> = row.get(10).ctx(W)?;
    let lease = match (lease_owner, lease_expires_at) {
        (Some(owner), Some(exp)) => Some(LeaseInfo {
            owner,
            expires_at: Timestamp::from_millis(exp),
        }),
        _ => None,
    };
    let artifacts: String = row.get(17).ctx(W)?;
    Ok(JobRecord {
        id,
        spec: from_json("spec", id, &spec)?,
        state: state_from(&state)?,
        created_at: Timestamp::from_millis(row.get(3).ctx(W)?),
        updated_at: Timestamp::from_millis(row.get(4).ctx(W)?),
        run_at: Timestamp::from_millis(row.get(5).ctx(W)?),
        deadline: ts(row.get(6).ctx(W)?),
        claims: u32_col(row, 7, "claims")?,
        attempts: Vec::new(),
        crash_requeues: u32_col(row, 8, "crash_requeues")?,
        lease,
        cancel_requested_at: ts(row.get(11).ctx(W)?),
        progress: opt_from_json("progress", id, row.get(12).ctx(W)?)?,
        progress_at: ts(row.get(13).ctx(W)?),
        phase: opt_from_json("phase", id, row.get(14).ctx(W)?)?,
        wait_reason: row.get(15).ctx(W)?,
        error: opt_from_json("error", id, row.get(16).ctx(W)?)?,
        artifacts: from_json("artifacts", id, &artifacts)?,
        finished_at: ts(row.get(18).ctx(W)?),
        last_seq: u32_col(row, 19, "last_seq")?,
    })
}

/// A [`JobSummary`] from a row of [`SUMMARY_COLS`].
pub(crate) fn summary_from_row(row: &Row<'_>) -> Result<JobSummary, SqliteError> {
    const W: &str = "read a job summary";
    let id = id_from_blob(&row.get::<_, Vec<u8>>(0).ctx(W)?)?;
    let state: String = row.get(1).ctx(W)?;
    let progress: Option<comfyfleet_core::Progress> =
        opt_from_json("progress", id, row.get(7).ctx(W)?)?;
    let error: Option<comfyfleet_core::ExecutionError> =
        opt_from_json("error", id, row.get(8).ctx(W)?)?;
    let labels: String = row.get(10).ctx(W)?;
    Ok(JobSummary {
        id,
        state: state_from(&state)?,
        priority: row.get(2).ctx(W)?,
        created_at: Timestamp::from_millis(row.get(3).ctx(W)?),
        updated_at: Timestamp::from_millis(row.get(4).ctx(W)?),
        attempts: u32_col(row, 5, "attempt_count")?,
        backend: row.get::<_, Option<String>>(6).ctx(W)?.map(BackendId::new),
        percent: progress.map(|p| p.percent),
        error: error.map(|e| e.message),
        wait_reason: row.get(9).ctx(W)?,
        labels: from_json("labels", id, &labels)?,
    })
}

/// A job's attempts, in order.
pub(crate) fn load_attempts(conn: &Connection, id: JobId) -> Result<Vec<Attempt>, SqliteError> {
    const W: &str = "read attempts";
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {ATTEMPT_COLS} FROM attempts WHERE job_id = ?1 ORDER BY number"
        ))
        .ctx(W)?;
    let mut rows = stmt.query(params![id_blob(id)]).ctx(W)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().ctx(W)? {
        let outcome: Option<String> = row.get(6).ctx(W)?;
        let nodes: String = row.get(8).ctx(W)?;
        let steps: String = row.get(10).ctx(W)?;
        out.push(Attempt {
            number: u32_col(row, 0, "attempt number")?,
            backend: BackendId::new(row.get::<_, String>(1).ctx(W)?),
            remote: row.get::<_, Option<String>>(2).ctx(W)?.map(RemoteRef::new),
            dispatched_at: Timestamp::from_millis(row.get(3).ctx(W)?),
            started_at: ts(row.get(4).ctx(W)?),
            ended_at: ts(row.get(5).ctx(W)?),
            outcome: outcome.as_deref().map(outcome_from).transpose()?,
            error: opt_from_json("attempt error", id, row.get(7).ctx(W)?)?,
            nodes: from_json("attempt nodes", id, &nodes)?,
            reattached: row.get(9).ctx(W)?,
            cancel_steps: from_json("attempt cancel_steps", id, &steps)?,
        });
    }
    Ok(out)
}

/// One whole job, or `None`. With `fence = Some(claims)`, only while it runs under that claim.
pub(crate) fn load_job(
    conn: &Connection,
    id: JobId,
    fence: Option<u32>,
) -> Result<Option<JobRecord>, SqliteError> {
    const W: &str = "read a job";
    let job = match fence {
        None => conn
            .prepare_cached(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"))
            .ctx(W)?
            .query_row(params![id_blob(id)], |r| Ok(job_from_row(r)))
            .optional()
            .ctx(W)?,
        Some(claims) => conn
            .prepare_cached(&format!(
                "SELECT {JOB_COLS} FROM jobs WHERE id = ?1 AND state = 'running' AND claims = ?2"
            ))
            .ctx(W)?
            .query_row(params![id_blob(id), claims], |r| Ok(job_from_row(r)))
            .optional()
            .ctx(W)?,
    };
    let Some(job) = job else { return Ok(None) };
    let mut job = job?;
    job.attempts = load_attempts(conn, id)?;
    Ok(Some(job))
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

/// A job's values for [`MUTABLE_COLS`].
fn job_columns(job: &JobRecord) -> Result<[Value; 20], SqliteError> {
    Ok([
        Value::Text(state_str(job.state).into()),
        Value::Integer(ms(job.updated_at)),
        Value::Integer(ms(job.run_at)),
        Value::Integer(job.claims.into()),
        Value::Integer(job.crash_requeues.into()),
        job.lease
            .as_ref()
            .map_or(Value::Null, |l| Value::Text(l.owner.clone())),
        job.lease
            .as_ref()
            .map_or(Value::Null, |l| Value::Integer(ms(l.expires_at))),
        opt_int(job.cancel_requested_at.map(ms)),
        opt_text(opt_json("progress", job.progress.as_ref())?),
        opt_int(job.progress_at.map(ms)),
        opt_text(opt_json("phase", job.phase.as_ref())?),
        opt_int(job.phase.and_then(|p| p.deadline).map(ms)),
        opt_text(job.wait_reason.clone()),
        opt_text(opt_json("error", job.error.as_ref())?),
        opt_text(job.error.as_ref().map(|e| e.message.to_lowercase())),
        Value::Text(to_json("artifacts", &job.artifacts)?),
        opt_int(job.finished_at.map(ms)),
        Value::Integer(job.last_seq.into()),
        opt_text(job.attempts.last().map(|a| a.backend.as_str().to_owned())),
        Value::Integer(i64::try_from(job.attempts.len()).unwrap_or(i64::MAX)),
    ])
}

/// What a loaded job looked like, to write back only what changed (fewer index updates, fewer
/// pages in the WAL).
pub(crate) struct Loaded {
    columns: [Value; 20],
    attempts: usize,
    last_attempt: Option<Attempt>,
}

impl Loaded {
    /// Remembers a freshly loaded job.
    pub(crate) fn of(job: &JobRecord) -> Result<Self, SqliteError> {
        Ok(Loaded {
            columns: job_columns(job)?,
            attempts: job.attempts.len(),
            last_attempt: job.attempts.last().cloned(),
        })
    }
}

/// Writes a changed job back. With `fence = Some(claims)` the row is only written while it is
/// still `running` under that claim (the caller checked it in the same transaction; this is the
/// belt to those braces): `Ok(false)` means nothing matched and the caller must roll back.
pub(crate) fn save_job(
    conn: &Connection,
    job: &JobRecord,
    loaded: &Loaded,
    fence: Option<u32>,
) -> Result<bool, SqliteError> {
    const W: &str = "write a job";
    let values = job_columns(job)?;
    let mut sql = String::from("UPDATE jobs SET ");
    let mut args: Vec<Value> = Vec::with_capacity(23);
    for ((col, new), old) in MUTABLE_COLS.iter().zip(values).zip(&loaded.columns) {
        if &new != old {
            args.push(new);
            if args.len() > 1 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("{col} = ?{}", args.len()));
        }
    }
    if args.is_empty() {
        // Nothing changed, but the fence must still hold: touch nothing, check the row.
        sql.push_str("last_seq = last_seq");
    }
    args.push(Value::Blob(id_blob(job.id).to_vec()));
    sql.push_str(&format!(" WHERE id = ?{}", args.len()));
    if let Some(claims) = fence {
        args.push(Value::Integer(claims.into()));
        sql.push_str(&format!(
            " AND state = 'running' AND claims = ?{}",
            args.len()
        ));
    }
    let changed = conn
        .prepare_cached(&sql)
        .ctx(W)?
        .execute(rusqlite::params_from_iter(args))
        .ctx(W)?;
    if changed != 1 {
        return Ok(false);
    }
    // Attempts only ever grow by one at the end, or change their last element.
    let len = job.attempts.len();
    if len > loaded.attempts || (len > 0 && job.attempts.last() != loaded.last_attempt.as_ref()) {
        if len > loaded.attempts + 1 {
            return Err(SqliteError::Invalid(
                "more than one attempt added in one change".into(),
            ));
        }
        if let Some(a) = job.attempts.last() {
            save_attempt(conn, job.id, a)?;
        }
    }
    Ok(true)
}

fn opt_int(v: Option<i64>) -> Value {
    v.map_or(Value::Null, Value::Integer)
}

fn opt_text(v: Option<String>) -> Value {
    v.map_or(Value::Null, Value::Text)
}

fn save_attempt(conn: &Connection, job: JobId, a: &Attempt) -> Result<(), SqliteError> {
    const W: &str = "write an attempt";
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO attempts (job_id, number, backend, remote, dispatched_at, started_at, \
             ended_at, outcome, error, nodes, reattached, cancel_steps) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
             ON CONFLICT (job_id, number) DO UPDATE SET backend = excluded.backend, \
             remote = excluded.remote, dispatched_at = excluded.dispatched_at, \
             started_at = excluded.started_at, ended_at = excluded.ended_at, \
             outcome = excluded.outcome, error = excluded.error, nodes = excluded.nodes, \
             reattached = excluded.reattached, cancel_steps = excluded.cancel_steps",
        )
        .ctx(W)?;
    stmt.execute(params![
        id_blob(job),
        a.number,
        a.backend.as_str(),
        a.remote.as_ref().map(|r| r.as_str()),
        ms(a.dispatched_at),
        a.started_at.map(ms),
        a.ended_at.map(ms),
        a.outcome.map(outcome_str),
        opt_json("attempt error", a.error.as_ref())?,
        to_json("attempt nodes", &a.nodes)?,
        a.reattached,
        to_json("attempt cancel_steps", &a.cancel_steps)?,
    ])
    .ctx(W)?;
    Ok(())
}

/// Appends one event for `job` (whose `last_seq` and `updated_at` the caller already advanced)
/// and returns it with its global id.
pub(crate) fn insert_event(
    conn: &Connection,
    job: JobId,
    seq: u32,
    at: Timestamp,
    kind: EventKind,
) -> Result<Event, SqliteError> {
    const W: &str = "append an event";
    let text = to_json("event", &kind)?;
    let mut stmt = conn
        .prepare_cached("INSERT INTO events (job_id, seq, at, kind) VALUES (?1, ?2, ?3, ?4)")
        .ctx(W)?;
    stmt.execute(params![id_blob(job), seq, ms(at), text])
        .ctx(W)?;
    let id = u64::try_from(conn.last_insert_rowid())
        .map_err(|_| SqliteError::Invalid("a negative event id".into()))?;
    Ok(Event {
        id,
        job,
        seq,
        at,
        kind,
    })
}

/// An event from a row of `id, job_id, seq, at, kind`.
pub(crate) fn event_from_row(row: &Row<'_>) -> Result<Event, SqliteError> {
    const W: &str = "read an event";
    let id: i64 = row.get(0).ctx(W)?;
    let job = id_from_blob(&row.get::<_, Vec<u8>>(1).ctx(W)?)?;
    let kind: String = row.get(4).ctx(W)?;
    Ok(Event {
        id: u64::try_from(id).map_err(|_| SqliteError::Invalid(format!("event id {id}")))?,
        job,
        seq: u32_col(row, 2, "event seq")?,
        at: Timestamp::from_millis(row.get(3).ctx(W)?),
        kind: from_json("event", job, &kind)?,
    })
}
