//! The [`InstallStore`](comfyfleet_core::InstallStore) operations as PostgreSQL statements.
//!
//! The rules and their order are those of `comfyfleet_core::memory::installs`. Writes run in
//! the caller's transaction. Inserts use `ON CONFLICT DO NOTHING`, so a lost race is an answer
//! (not an aborted transaction); the partial unique index `installs_one_active` holds the
//! one-active-install-per-instance rule under any race.

use comfyfleet_core::memory::installs::finished_at;
use comfyfleet_core::{
    InstallEvent, InstallEventKind, InstallFilter, InstallId, InstallRecord, InstallState,
    InstalledPack, StoreError, Timestamp,
};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

use crate::codec::{col, from_json, ms, to_json};
use crate::error::{Context, invalid, pg};
use crate::ops::violates;

/// A `u64` for a BIGINT column; larger values are refused rather than wrapped.
fn int(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::InvalidInput(format!("{what} {v} is too large")))
}

/// A count or bound for `LIMIT` / `seq > $n`: beyond `i64::MAX` means "no bound" anyway.
fn saturating(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uuid(id: InstallId) -> Uuid {
    *id.as_uuid()
}

/// The queued or running install on `instance`, if any.
async fn active_on(c: &mut PgConnection, instance: &str) -> Result<Option<InstallId>, StoreError> {
    let id: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM installs WHERE instance = $1 AND state IN ('queued', 'running')",
    )
    .bind(instance)
    .fetch_optional(&mut *c)
    .await
    .ctx("find the active install")?;
    Ok(id.map(InstallId::from_uuid))
}

fn conflict(instance: &str, active: Option<InstallId>) -> StoreError {
    StoreError::Conflict(match active {
        Some(active) => format!("instance {instance} already has an active install: {active}"),
        None => format!("instance {instance} already has an active install"),
    })
}

/// The `finished_at` column: set once the record is terminal.
fn finished_col(record: &InstallRecord) -> Option<i64> {
    record.state.is_terminal().then(|| ms(finished_at(record)))
}

async fn insert_events(c: &mut PgConnection, events: &[InstallEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut seqs = Vec::new();
    let mut ats = Vec::new();
    let mut kinds = Vec::new();
    for ev in events {
        ids.push(uuid(ev.install));
        seqs.push(int(ev.seq, "event seq")?);
        ats.push(ms(ev.at));
        kinds.push(to_json("install event", &ev.kind)?);
    }
    sqlx::query(
        "INSERT INTO install_events (install_id, seq, at, kind) \
         SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::text[])",
    )
    .bind(ids)
    .bind(seqs)
    .bind(ats)
    .bind(kinds)
    .execute(&mut *c)
    .await
    .ctx("append install events")?;
    Ok(())
}

async fn exists(c: &mut PgConnection, id: InstallId) -> Result<bool, StoreError> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM installs WHERE id = $1)")
        .bind(uuid(id))
        .fetch_one(&mut *c)
        .await
        .ctx("find an install")
}

pub(crate) async fn create(
    c: &mut PgConnection,
    record: &InstallRecord,
) -> Result<InstallEvent, StoreError> {
    const W: &str = "create an install";
    let instance = record.spec.instance.as_str();
    if exists(c, record.id).await? {
        return Err(StoreError::Conflict(format!(
            "install {} already exists",
            record.id
        )));
    }
    if let Some(active) = active_on(c, instance).await? {
        return Err(conflict(instance, Some(active)));
    }
    let inserted = sqlx::query(
        "INSERT INTO installs (id, instance, state, version, last_seq, created_at, \
         updated_at, finished_at, record) VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8) \
         ON CONFLICT DO NOTHING",
    )
    .bind(uuid(record.id))
    .bind(instance)
    .bind(record.state.as_str())
    .bind(int(record.version, "version")?)
    .bind(ms(record.created_at))
    .bind(ms(record.updated_at))
    .bind(finished_col(record))
    .bind(to_json("install record", record)?)
    .execute(&mut *c)
    .await
    .ctx(W)?
    .rows_affected();
    if inserted == 0 {
        // Lost a race (the winner is committed by now: ON CONFLICT waited for it).
        if exists(c, record.id).await? {
            return Err(StoreError::Conflict(format!(
                "install {} already exists",
                record.id
            )));
        }
        let active = active_on(c, instance).await?;
        return Err(conflict(instance, active));
    }
    let ev = InstallEvent {
        install: record.id,
        seq: 1,
        at: record.created_at,
        kind: InstallEventKind::Created,
    };
    insert_events(c, std::slice::from_ref(&ev)).await?;
    Ok(ev)
}

/// The columns an [`InstallRecord`] is read from, in [`record_from_row`]'s order.
const RECORD_COLS: &str = "id, version, record";

fn record_from_row(row: &PgRow) -> Result<InstallRecord, StoreError> {
    let id = InstallId::from_uuid(col(row, 0)?);
    let version: i64 = col(row, 1)?;
    let text: String = col(row, 2)?;
    let mut record: InstallRecord = from_json("record", &format!("install {id}"), &text)?;
    // The column is what the version check reads: it is the truth.
    record.version = u64::try_from(version)
        .map_err(|_| invalid(format!("install {id} has version {version}")))?;
    if record.id != id {
        return Err(invalid(format!(
            "the row of install {id} holds the record of install {}",
            record.id
        )));
    }
    Ok(record)
}

pub(crate) async fn get(
    c: &mut PgConnection,
    id: InstallId,
) -> Result<Option<InstallRecord>, StoreError> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {RECORD_COLS} FROM installs WHERE id = $1"
    )))
    .bind(uuid(id))
    .fetch_optional(&mut *c)
    .await
    .ctx("read an install")?;
    row.as_ref().map(record_from_row).transpose()
}

pub(crate) async fn list(
    c: &mut PgConnection,
    filter: &InstallFilter,
    limit: usize,
) -> Result<Vec<InstallRecord>, StoreError> {
    let states: Vec<String> = filter.states.iter().map(|s| s.as_str().into()).collect();
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {RECORD_COLS} FROM installs \
         WHERE ($1::text IS NULL OR instance = $1) \
           AND (cardinality($2::text[]) = 0 OR state = ANY($2)) \
           AND ($3::uuid IS NULL OR id < $3) \
         ORDER BY id DESC LIMIT $4"
    )))
    .bind(filter.instance.as_deref())
    .bind(states)
    .bind(filter.before.map(uuid))
    .bind(saturating(limit as u64))
    .fetch_all(&mut *c)
    .await
    .ctx("list installs")?;
    rows.iter().map(record_from_row).collect()
}

pub(crate) async fn update(
    c: &mut PgConnection,
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
    let updated: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(
        "UPDATE installs SET instance = $1, state = $2, version = $3, \
         last_seq = last_seq + $4, updated_at = $5, finished_at = $6, record = $7 \
         WHERE id = $8 AND version = $9 AND state IN ('queued', 'running') \
         RETURNING last_seq",
    )
    .bind(&record.spec.instance)
    .bind(record.state.as_str())
    .bind(int(version, "version")?)
    .bind(int(added, "event count")?)
    .bind(ms(record.updated_at))
    .bind(finished_col(record))
    .bind(to_json("install record", &stored)?)
    .bind(uuid(record.id))
    .bind(int(record.version, "version")?)
    .fetch_optional(&mut *c)
    .await;
    let last_seq = match updated {
        Ok(Some(seq)) => seq,
        Ok(None) => return Err(why_not_updated(c, record).await?),
        // The transaction is aborted: the active install cannot be looked up any more.
        Err(e) if violates(&e, "installs_one_active") => {
            return Err(conflict(&record.spec.instance, None));
        }
        Err(e) => return Err(pg(W, e)),
    };
    let last_seq = u64::try_from(last_seq)
        .map_err(|_| invalid(format!("install {} last_seq {last_seq}", record.id)))?;
    let first = (last_seq + 1)
        .checked_sub(added)
        .ok_or_else(|| invalid(format!("install {} last_seq {last_seq}", record.id)))?;
    let out: Vec<InstallEvent> = (first..)
        .zip(events)
        .map(|(seq, kind)| InstallEvent {
            install: record.id,
            seq,
            at: record.updated_at,
            kind: kind.clone(),
        })
        .collect();
    insert_events(c, &out).await?;
    Ok(out)
}

/// Checks made before the guarded UPDATE: an active record must not take an instance that
/// another install is active on (named in the refusal).
pub(crate) async fn check_active(
    c: &mut PgConnection,
    record: &InstallRecord,
) -> Result<(), StoreError> {
    if record.state.is_terminal() {
        return Ok(());
    }
    match active_on(c, &record.spec.instance).await? {
        Some(active) if active != record.id => {
            // Only a refusal if the update itself would go through (else its own error wins).
            let stored: Option<(String, i64)> =
                sqlx::query_as("SELECT state, version FROM installs WHERE id = $1")
                    .bind(uuid(record.id))
                    .fetch_optional(&mut *c)
                    .await
                    .ctx("update an install")?;
            match stored {
                Some((state, version))
                    if !InstallState::parse(&state).is_some_and(|s| s.is_terminal())
                        && version == int(record.version, "version")? =>
                {
                    Err(conflict(&record.spec.instance, Some(active)))
                }
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// Why the guarded UPDATE matched no row: unknown, finished, or another version.
async fn why_not_updated(
    c: &mut PgConnection,
    record: &InstallRecord,
) -> Result<StoreError, StoreError> {
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT state, version FROM installs WHERE id = $1")
            .bind(uuid(record.id))
            .fetch_optional(&mut *c)
            .await
            .ctx("update an install")?;
    let Some((state, version)) = row else {
        return Ok(StoreError::InstallNotFound(record.id));
    };
    let state =
        InstallState::parse(&state).ok_or_else(|| invalid(format!("install state {state:?}")))?;
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

pub(crate) async fn events(
    c: &mut PgConnection,
    id: InstallId,
    after: u64,
    limit: usize,
) -> Result<Vec<InstallEvent>, StoreError> {
    const W: &str = "read install events";
    if !exists(c, id).await? {
        return Err(StoreError::InstallNotFound(id));
    }
    let rows = sqlx::query(
        "SELECT seq, at, kind FROM install_events \
         WHERE install_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(uuid(id))
    .bind(saturating(after))
    .bind(saturating(limit as u64))
    .fetch_all(&mut *c)
    .await
    .ctx(W)?;
    rows.iter()
        .map(|row| {
            let seq: i64 = col(row, 0)?;
            let kind: String = col(row, 2)?;
            Ok(InstallEvent {
                install: id,
                seq: u64::try_from(seq).map_err(|_| invalid(format!("install event seq {seq}")))?,
                at: Timestamp::from_millis(col(row, 1)?),
                kind: from_json("install event", &format!("install {id}"), &kind)?,
            })
        })
        .collect()
}

pub(crate) async fn packs(
    c: &mut PgConnection,
    instance: &str,
) -> Result<Vec<InstalledPack>, StoreError> {
    let rows = sqlx::query(
        "SELECT name, git, commit_id, classes, install_id, installed_at FROM instance_packs \
         WHERE instance = $1 ORDER BY name",
    )
    .bind(instance)
    .fetch_all(&mut *c)
    .await
    .ctx("read installed packs")?;
    rows.iter()
        .map(|row| {
            let install = InstallId::from_uuid(col(row, 4)?);
            let classes: String = col(row, 3)?;
            Ok(InstalledPack {
                instance: instance.to_owned(),
                name: col(row, 0)?,
                git: col(row, 1)?,
                commit: col(row, 2)?,
                classes: from_json("pack classes", &format!("install {install}"), &classes)?,
                install,
                installed_at: Timestamp::from_millis(col(row, 5)?),
            })
        })
        .collect()
}

pub(crate) async fn record_packs(
    c: &mut PgConnection,
    packs: &[InstalledPack],
) -> Result<(), StoreError> {
    // One statement per pack, in order: a later pack with the same key replaces an earlier one.
    for p in packs {
        sqlx::query(
            "INSERT INTO instance_packs (instance, name, git, commit_id, classes, install_id, \
             installed_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (instance, name) DO UPDATE SET git = EXCLUDED.git, \
             commit_id = EXCLUDED.commit_id, classes = EXCLUDED.classes, \
             install_id = EXCLUDED.install_id, installed_at = EXCLUDED.installed_at",
        )
        .bind(&p.instance)
        .bind(&p.name)
        .bind(&p.git)
        .bind(&p.commit)
        .bind(to_json("pack classes", &p.classes)?)
        .bind(uuid(p.install))
        .bind(ms(p.installed_at))
        .execute(&mut *c)
        .await
        .ctx("record installed packs")?;
    }
    Ok(())
}

/// Deletes up to `batch` finished installs (with their events) that finished before
/// `finished_before`; returns how many. Recorded packs stay: they describe the instance.
pub(crate) async fn prune_batch(
    c: &mut PgConnection,
    finished_before: Timestamp,
    batch: i64,
) -> Result<u64, StoreError> {
    const W: &str = "prune installs";
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "DELETE FROM installs WHERE id IN ( \
           SELECT id FROM installs WHERE finished_at IS NOT NULL AND finished_at < $1 \
           AND state IN ('succeeded', 'failed', 'cancelled') LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING id",
    )
    .bind(ms(finished_before))
    .bind(batch)
    .fetch_all(&mut *c)
    .await
    .ctx(W)?;
    if !ids.is_empty() {
        sqlx::query("DELETE FROM install_events WHERE install_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *c)
            .await
            .ctx(W)?;
    }
    Ok(ids.len() as u64)
}
