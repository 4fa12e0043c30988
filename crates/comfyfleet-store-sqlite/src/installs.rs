//! The [`InstallStore`](comfyfleet_core::InstallStore) operations as SQLite statements.
//!
//! The rules and their order are those of `comfyfleet_core::memory::installs`. Writes run in the
//! caller's `BEGIN IMMEDIATE` transaction (under a savepoint: [`crate::conn::Writer`]), so a check and the write that
//! depends on it see the same database; the partial unique index `installs_one_active` holds the
//! one-active-install-per-instance rule even against a writer that skipped the check.

use comfyfleet_core::memory::installs::finished_at;
use comfyfleet_core::{
    InstallEvent, InstallEventKind, InstallFilter, InstallId, InstallRecord, InstallState,
    InstalledPack, StoreError, Timestamp,
};
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, params};
use uuid::Uuid;

use crate::codec::{ms, to_json};
use crate::error::{Context, SqliteError};

/// An install id as stored: its 16 UUID bytes.
fn id_blob(id: InstallId) -> [u8; 16] {
    *id.as_uuid().as_bytes()
}

fn id_from_blob(bytes: &[u8]) -> Result<InstallId, SqliteError> {
    Uuid::from_slice(bytes)
        .map(InstallId::from_uuid)
        .map_err(|_| SqliteError::Invalid(format!("an install id of {} bytes", bytes.len())))
}

fn from_json<T: serde::de::DeserializeOwned>(
    column: &'static str,
    id: InstallId,
    text: &str,
) -> Result<T, SqliteError> {
    serde_json::from_str(text).map_err(|source| SqliteError::Json {
        column,
        job: format!("install {id}"),
        source,
    })
}

/// A `u64` for an INTEGER column; larger values are refused rather than wrapped.
fn int(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::InvalidInput(format!("{what} {v} is too large")))
}

/// A count or bound for `LIMIT` / `seq > ?`: beyond `i64::MAX` means "no bound" anyway.
fn saturating(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn sqlite(context: &'static str, source: rusqlite::Error) -> StoreError {
    SqliteError::Sqlite { context, source }.into()
}

/// Which constraint an INSERT or UPDATE broke, if any.
#[derive(Debug, PartialEq, Eq)]
enum Broke {
    /// The primary key (an install with this id exists).
    PrimaryKey,
    /// A unique index (`installs_one_active`: the instance has an active install).
    Unique,
}

fn broke(e: &rusqlite::Error) -> Option<Broke> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation => {
            match f.extended_code {
                rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => Some(Broke::PrimaryKey),
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE => Some(Broke::Unique),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The queued or running install on `instance`, if any.
fn active_on(conn: &Connection, instance: &str) -> Result<Option<InstallId>, StoreError> {
    const W: &str = "find the active install";
    let blob: Option<Vec<u8>> = conn
        .prepare_cached(
            "SELECT id FROM installs INDEXED BY installs_one_active \
             WHERE instance = ?1 AND state IN ('queued', 'running')",
        )
        .ctx(W)?
        .query_row(params![instance], |r| r.get(0))
        .optional()
        .ctx(W)?;
    Ok(blob.as_deref().map(id_from_blob).transpose()?)
}

/// The refusal for an instance that already has an active install (named when it is found).
fn active_conflict(conn: &Connection, instance: &str) -> Result<StoreError, StoreError> {
    Ok(StoreError::Conflict(match active_on(conn, instance)? {
        Some(active) => format!("instance {instance} already has an active install: {active}"),
        None => format!("instance {instance} already has an active install"),
    }))
}

/// The `finished_at` column: set once the record is terminal.
fn finished_col(record: &InstallRecord) -> Option<i64> {
    record.state.is_terminal().then(|| ms(finished_at(record)))
}

fn insert_event(conn: &Connection, ev: &InstallEvent) -> Result<(), StoreError> {
    const W: &str = "append an install event";
    conn.prepare_cached(
        "INSERT INTO install_events (install_id, seq, at, kind) VALUES (?1, ?2, ?3, ?4)",
    )
    .ctx(W)?
    .execute(params![
        id_blob(ev.install),
        int(ev.seq, "event seq")?,
        ms(ev.at),
        to_json("install event", &ev.kind)?
    ])
    .ctx(W)?;
    Ok(())
}

pub(crate) fn create(
    conn: &Connection,
    record: &InstallRecord,
) -> Result<InstallEvent, StoreError> {
    const W: &str = "create an install";
    let instance = record.spec.instance.as_str();
    let exists: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM installs WHERE id = ?1)")
        .ctx(W)?
        .query_row(params![id_blob(record.id)], |r| r.get(0))
        .ctx(W)?;
    if exists {
        return Err(StoreError::Conflict(format!(
            "install {} already exists",
            record.id
        )));
    }
    if active_on(conn, instance)?.is_some() {
        return Err(active_conflict(conn, instance)?);
    }
    let inserted = conn
        .prepare_cached(
            "INSERT INTO installs (id, instance, state, version, last_seq, created_at, \
             updated_at, finished_at, record) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?8)",
        )
        .ctx(W)?
        .execute(params![
            id_blob(record.id),
            instance,
            record.state.as_str(),
            int(record.version, "version")?,
            ms(record.created_at),
            ms(record.updated_at),
            finished_col(record),
            to_json("install record", record)?,
        ]);
    if let Err(e) = inserted {
        return Err(match broke(&e) {
            Some(Broke::PrimaryKey) => {
                StoreError::Conflict(format!("install {} already exists", record.id))
            }
            Some(Broke::Unique) => active_conflict(conn, instance)?,
            None => sqlite(W, e),
        });
    }
    let ev = InstallEvent {
        install: record.id,
        seq: 1,
        at: record.created_at,
        kind: InstallEventKind::Created,
    };
    insert_event(conn, &ev)?;
    Ok(ev)
}

/// The columns an [`InstallRecord`] is read from, in [`record_from_row`]'s order.
const RECORD_COLS: &str = "id, version, record";

fn record_from_row(row: &Row<'_>) -> Result<InstallRecord, SqliteError> {
    const W: &str = "read an install";
    let id = id_from_blob(&row.get::<_, Vec<u8>>(0).ctx(W)?)?;
    let version: i64 = row.get(1).ctx(W)?;
    let text: String = row.get(2).ctx(W)?;
    let mut record: InstallRecord = from_json("record", id, &text)?;
    // The column is what the version check reads: it is the truth.
    record.version = u64::try_from(version)
        .map_err(|_| SqliteError::Invalid(format!("install {id} has version {version}")))?;
    if record.id != id {
        return Err(SqliteError::Invalid(format!(
            "the row of install {id} holds the record of install {}",
            record.id
        )));
    }
    Ok(record)
}

pub(crate) fn get(conn: &Connection, id: InstallId) -> Result<Option<InstallRecord>, StoreError> {
    const W: &str = "read an install";
    let row = conn
        .prepare_cached(&format!("SELECT {RECORD_COLS} FROM installs WHERE id = ?1"))
        .ctx(W)?
        .query_row(params![id_blob(id)], |r| Ok(record_from_row(r)))
        .optional()
        .ctx(W)?;
    Ok(row.transpose()?)
}

pub(crate) fn list(
    conn: &Connection,
    filter: &InstallFilter,
    limit: usize,
) -> Result<Vec<InstallRecord>, StoreError> {
    const W: &str = "list installs";
    let mut sql = format!("SELECT {RECORD_COLS} FROM installs WHERE 1 = 1");
    let mut args: Vec<Value> = Vec::new();
    if let Some(instance) = &filter.instance {
        args.push(Value::Text(instance.clone()));
        sql.push_str(&format!(" AND instance = ?{}", args.len()));
    }
    if !filter.states.is_empty() {
        let mut marks = Vec::new();
        for st in &filter.states {
            args.push(Value::Text(st.as_str().to_owned()));
            marks.push(format!("?{}", args.len()));
        }
        sql.push_str(&format!(" AND state IN ({})", marks.join(", ")));
    }
    if let Some(before) = filter.before {
        args.push(Value::Blob(id_blob(before).to_vec()));
        sql.push_str(&format!(" AND id < ?{}", args.len()));
    }
    args.push(Value::Integer(saturating(limit as u64)));
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
    let mut stmt = conn.prepare_cached(&sql).ctx(W)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(args)).ctx(W)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().ctx(W)? {
        out.push(record_from_row(row)?);
    }
    Ok(out)
}

pub(crate) fn update(
    conn: &Connection,
    record: &InstallRecord,
    events: &[InstallEventKind],
) -> Result<Vec<InstallEvent>, StoreError> {
    const W: &str = "update an install";
    let version = record.version.checked_add(1).ok_or_else(|| {
        StoreError::InvalidInput(format!("install {}: version overflow", record.id))
    })?;
    let mut stored = record.clone();
    stored.version = version;
    let added = u64::try_from(events.len()).unwrap_or(u64::MAX);
    // The version check is the UPDATE's own condition: it changes the row only over the
    // version the caller read, and only while the install is not finished.
    let updated = conn
        .prepare_cached(
            "UPDATE installs SET instance = ?1, state = ?2, version = ?3, \
             last_seq = last_seq + ?4, updated_at = ?5, finished_at = ?6, record = ?7 \
             WHERE id = ?8 AND version = ?9 AND state IN ('queued', 'running') \
             RETURNING last_seq",
        )
        .ctx(W)?
        .query_row(
            params![
                record.spec.instance,
                record.state.as_str(),
                int(version, "version")?,
                int(added, "event count")?,
                ms(record.updated_at),
                finished_col(record),
                to_json("install record", &stored)?,
                id_blob(record.id),
                int(record.version, "version")?,
            ],
            |r| r.get::<_, i64>(0),
        )
        .optional();
    let last_seq = match updated {
        Ok(Some(seq)) => seq,
        Ok(None) => return Err(why_not_updated(conn, record)?),
        Err(e) if broke(&e) == Some(Broke::Unique) => {
            return Err(active_conflict(conn, &record.spec.instance)?);
        }
        Err(e) => return Err(sqlite(W, e)),
    };
    let last_seq = u64::try_from(last_seq)
        .map_err(|_| SqliteError::Invalid(format!("install {} last_seq {last_seq}", record.id)))?;
    let first = (last_seq + 1).checked_sub(added).ok_or_else(|| {
        SqliteError::Invalid(format!("install {} last_seq {last_seq}", record.id))
    })?;
    let mut out = Vec::with_capacity(events.len());
    for (seq, kind) in (first..).zip(events) {
        let ev = InstallEvent {
            install: record.id,
            seq,
            at: record.updated_at,
            kind: kind.clone(),
        };
        insert_event(conn, &ev)?;
        out.push(ev);
    }
    Ok(out)
}

/// Why the guarded UPDATE matched no row: unknown, finished, or another version.
fn why_not_updated(conn: &Connection, record: &InstallRecord) -> Result<StoreError, StoreError> {
    const W: &str = "update an install";
    let row: Option<(String, i64)> = conn
        .prepare_cached("SELECT state, version FROM installs WHERE id = ?1")
        .ctx(W)?
        .query_row(params![id_blob(record.id)], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .ctx(W)?;
    let Some((state, version)) = row else {
        return Ok(StoreError::InstallNotFound(record.id));
    };
    let state = InstallState::parse(&state)
        .ok_or_else(|| SqliteError::Invalid(format!("install state {state:?}")))?;
    if state.is_terminal() {
        return Ok(StoreError::InvalidInput(format!(
            "install {} is finished ({state})",
            record.id
        )));
    }
    Ok(StoreError::Conflict(format!(
        "install {} was changed by another writer (stored version {version}, written over {})",
        record.id, record.version
    )))
}

pub(crate) fn events(
    conn: &Connection,
    id: InstallId,
    after: u64,
    limit: usize,
) -> Result<Vec<InstallEvent>, StoreError> {
    const W: &str = "read install events";
    let exists: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM installs WHERE id = ?1)")
        .ctx(W)?
        .query_row(params![id_blob(id)], |r| r.get(0))
        .ctx(W)?;
    if !exists {
        return Err(StoreError::InstallNotFound(id));
    }
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, at, kind FROM install_events \
             WHERE install_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .ctx(W)?;
    let mut rows = stmt
        .query(params![
            id_blob(id),
            saturating(after),
            saturating(limit as u64)
        ])
        .ctx(W)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().ctx(W)? {
        let seq: i64 = row.get(0).ctx(W)?;
        let kind: String = row.get(2).ctx(W)?;
        out.push(InstallEvent {
            install: id,
            seq: u64::try_from(seq)
                .map_err(|_| SqliteError::Invalid(format!("install event seq {seq}")))?,
            at: Timestamp::from_millis(row.get(1).ctx(W)?),
            kind: from_json("install event", id, &kind)?,
        });
    }
    Ok(out)
}

pub(crate) fn packs(conn: &Connection, instance: &str) -> Result<Vec<InstalledPack>, StoreError> {
    const W: &str = "read installed packs";
    let mut stmt = conn
        .prepare_cached(
            "SELECT name, git, commit_id, classes, install_id, installed_at FROM instance_packs \
             WHERE instance = ?1 ORDER BY name",
        )
        .ctx(W)?;
    let mut rows = stmt.query(params![instance]).ctx(W)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().ctx(W)? {
        let install = id_from_blob(&row.get::<_, Vec<u8>>(4).ctx(W)?)?;
        let classes: String = row.get(3).ctx(W)?;
        out.push(InstalledPack {
            instance: instance.to_owned(),
            name: row.get(0).ctx(W)?,
            git: row.get(1).ctx(W)?,
            commit: row.get(2).ctx(W)?,
            classes: from_json("pack classes", install, &classes)?,
            install,
            installed_at: Timestamp::from_millis(row.get(5).ctx(W)?),
        });
    }
    Ok(out)
}

pub(crate) fn record_packs(conn: &Connection, packs: &[InstalledPack]) -> Result<(), StoreError> {
    const W: &str = "record installed packs";
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO instance_packs (instance, name, git, commit_id, classes, install_id, \
             installed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (instance, name) DO UPDATE SET git = excluded.git, \
             commit_id = excluded.commit_id, classes = excluded.classes, \
             install_id = excluded.install_id, installed_at = excluded.installed_at",
        )
        .ctx(W)?;
    for p in packs {
        stmt.execute(params![
            p.instance,
            p.name,
            p.git,
            p.commit,
            to_json("pack classes", &p.classes)?,
            id_blob(p.install),
            ms(p.installed_at),
        ])
        .ctx(W)?;
    }
    Ok(())
}

/// Deletes up to `batch` finished installs (with their events) that finished before
/// `finished_before`; returns how many. Recorded packs stay: they describe the instance.
pub(crate) fn prune_batch(
    conn: &Connection,
    finished_before: Timestamp,
    batch: usize,
) -> Result<u64, StoreError> {
    const W: &str = "prune installs";
    let ids: Vec<Vec<u8>> = {
        let mut stmt = conn
            .prepare_cached(
                "SELECT id FROM installs INDEXED BY installs_finished \
                 WHERE finished_at IS NOT NULL AND finished_at < ?1 \
                 AND state IN ('succeeded', 'failed', 'cancelled') LIMIT ?2",
            )
            .ctx(W)?;
        let rows = stmt
            .query_map(
                params![ms(finished_before), saturating(batch as u64)],
                |r| r.get(0),
            )
            .ctx(W)?;
        rows.collect::<Result<_, _>>().ctx(W)?
    };
    for id in &ids {
        for sql in [
            "DELETE FROM install_events WHERE install_id = ?1",
            "DELETE FROM installs WHERE id = ?1",
        ] {
            conn.prepare_cached(sql)
                .ctx(W)?
                .execute(params![id])
                .ctx(W)?;
        }
    }
    Ok(ids.len() as u64)
}
