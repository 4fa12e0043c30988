//! Opening a database file: recognising it (ours, empty, foreign, newer, damaged) without
//! changing anything that is not ours, then connection settings and migrations.

use std::io::Read;
use std::path::Path;

use comfyfleet_core::StoreError;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use rusqlite_migration::{M, Migrations};

use crate::busy;
use crate::error::sqlite_to_store;
use crate::{SqliteOptions, Synchronous};

/// `PRAGMA application_id` of a comfyfleet store: "CFLT".
pub const APPLICATION_ID: i32 = 0x4346_4C54;

/// The `meta` row naming the application.
const APPLICATION_NAME: &str = "comfyfleet-store-sqlite";

/// The migrations, embedded in the binary; the schema version is their count.
/// Never edit one that has shipped: add the next.
static MIGRATIONS: &[M<'static>] = &[
    M::up(include_str!("../migrations/0001_initial.sql")),
    M::up(include_str!("../migrations/0002_installs.sql")),
    M::up(include_str!("../migrations/0003_fleet.sql")),
];

/// The newest schema version this binary knows (`PRAGMA user_version` after migrating).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// What an opened database holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Nothing yet: a new store.
    Empty,
    /// A comfyfleet store at this schema version (at most [`SCHEMA_VERSION`]).
    Ours(i64),
}

fn err(e: &rusqlite::Error, what: &str, path: &Path) -> StoreError {
    sqlite_to_store(e, &format!("{what} {}: {e}", path.display()))
}

/// Recognises the database behind `conn` without writing to it.
fn inspect(conn: &Connection, path: &Path) -> Result<Found, StoreError> {
    let read = |e: rusqlite::Error| err(&e, "cannot read", path);
    let app_id: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(read)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(read)?;
    let objects: Vec<String> = {
        let mut stmt = conn
            .prepare(
                "SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%' ORDER BY name LIMIT 6",
            )
            .map_err(read)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(read)?;
        rows.collect::<Result<_, _>>().map_err(read)?
    };
    if app_id == APPLICATION_ID {
        if version > SCHEMA_VERSION {
            return Err(StoreError::Unusable(format!(
                "{} has comfyfleet schema version {version}, but this build knows versions up to \
                 {SCHEMA_VERSION}: it was written by a newer comfyfleet. Upgrade comfyfleet (the \
                 file was not changed).",
                path.display()
            )));
        }
        let name: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'application'",
                [],
                |r| r.get(0),
            )
            .ok();
        if version < 1 || name.as_deref() != Some(APPLICATION_NAME) {
            return Err(StoreError::Unusable(format!(
                "{} carries comfyfleet's application id but its schema is incomplete \
                 (user_version {version}, meta application {name:?}); it is damaged or was \
                 changed by another program (the file was not changed)",
                path.display()
            )));
        }
        return Ok(Found::Ours(version));
    }
    if app_id == 0 && version == 0 && objects.is_empty() {
        return Ok(Found::Empty);
    }
    Err(StoreError::Unusable(format!(
        "{} is a SQLite database but not a comfyfleet store (application_id {app_id:#x}, \
         user_version {version}, tables {}); refusing to use or change it",
        path.display(),
        if objects.is_empty() {
            "none".to_owned()
        } else {
            objects.join(", ")
        }
    )))
}

/// `PRAGMA quick_check`: structural damage shows up here rather than in the middle of a write.
fn verify(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare("PRAGMA quick_check(5)")
        .map_err(|e| err(&e, "cannot check", path))?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| err(&e, "cannot check", path))?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        Err(StoreError::Unusable(format!(
            "{} is corrupt (quick_check: {}); restore it from a backup (the file was not changed)",
            path.display(),
            rows.join("; ")
        )))
    }
}

/// What the first 100 bytes of an existing database file say.
struct Header {
    /// The file is in WAL mode (format bytes 18 and 19 are 2).
    wal: bool,
}

/// Checks what is at `path` before SQLite opens it: a directory, a missing directory or a file
/// that is not SQLite is refused here. `None`: no file yet (or an empty one).
fn preflight(path: &Path) -> Result<Option<Header>, StoreError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(dir) = parent
                && !dir.is_dir()
            {
                return Err(StoreError::Unusable(format!(
                    "cannot create {}: the directory {} does not exist",
                    path.display(),
                    dir.display()
                )));
            }
            return Ok(None);
        }
        Err(e) => {
            return Err(StoreError::Unusable(format!(
                "cannot access {}: {e}",
                path.display()
            )));
        }
    };
    if meta.is_dir() {
        return Err(StoreError::Unusable(format!(
            "{} is a directory, not a database file",
            path.display()
        )));
    }
    if meta.len() == 0 {
        return Ok(None);
    }
    let mut header = [0u8; 100];
    let n = std::fs::File::open(path)
        .and_then(|mut f| {
            let mut n = 0;
            while n < header.len() {
                match f.read(&mut header[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        })
        .map_err(|e| StoreError::Unusable(format!("cannot read {}: {e}", path.display())))?;
    if n < header.len() || &header[..16] != SQLITE_HEADER {
        return Err(StoreError::Unusable(format!(
            "{} is not a SQLite database (its first bytes are not the SQLite header); refusing \
             to use or change it",
            path.display()
        )));
    }
    let application_id = i32::from_be_bytes([header[68], header[69], header[70], header[71]]);
    if application_id != 0 && application_id != APPLICATION_ID {
        return Err(StoreError::Unusable(format!(
            "{} is a SQLite database of another application (application_id {application_id:#x}); \
             refusing to use or change it",
            path.display()
        )));
    }
    Ok(Some(Header {
        wal: header[18] == 2 && header[19] == 2,
    }))
}

fn configure(conn: &Connection, options: &SqliteOptions, path: &Path) -> Result<(), StoreError> {
    let set = |e: rusqlite::Error| err(&e, "cannot configure", path);
    busy::install(conn, options.busy_timeout).map_err(set)?;
    let sync = match options.synchronous {
        Synchronous::Off => "OFF",
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync).map_err(set)?;
    if let Some(pages) = options.max_page_count {
        conn.pragma_update(None, "max_page_count", pages)
            .map_err(set)?;
    }
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    conn.set_transaction_behavior(TransactionBehavior::Immediate);
    let result = Migrations::from_slice(MIGRATIONS).to_latest(conn);
    conn.set_transaction_behavior(TransactionBehavior::Deferred);
    if let Err(e) = result {
        // Another process may have migrated the same file at the same moment: fine if it did.
        let now: Option<i64> = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .ok();
        if now != Some(SCHEMA_VERSION) {
            let text = format!(
                "cannot migrate {} to schema version {SCHEMA_VERSION}: {e}",
                path.display()
            );
            return Err(match &e {
                rusqlite_migration::Error::RusqliteError { err, .. } => sqlite_to_store(err, &text),
                _ => StoreError::Unusable(text),
            });
        }
    }
    inspect(conn, path).map(|_| ())
}

/// Opens (creating if needed) the store file for the writer: WAL, settings, migrations.
///
/// Nothing is written before the file is recognised as empty or ours (and, unless turned off,
/// passed `quick_check`). A file in rollback-journal mode (never one of ours in use) is first
/// looked at through a read-only connection, which leaves no files behind; a WAL-mode file is
/// looked at through the write connection itself, whose `-wal`/`-shm` files SQLite removes
/// again when it closes.
pub(crate) fn open_writer(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let header = preflight(path)?;
    if let Some(h) = &header
        && !h.wal
    {
        let ro = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| err(&e, "cannot open", path))?;
        busy::install(&ro, options.busy_timeout).map_err(|e| err(&e, "cannot configure", path))?;
        if inspect(&ro, path)? != Found::Empty && options.verify_on_open {
            verify(&ro, path)?;
        }
    }
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| err(&e, "cannot open", path))?;
    if conn.is_readonly("main").unwrap_or(false) {
        return Err(StoreError::Unusable(format!(
            "{} can only be opened read-only (check the permissions of the file and its \
             directory); the store needs to write",
            path.display()
        )));
    }
    busy::install(&conn, options.busy_timeout).map_err(|e| err(&e, "cannot configure", path))?;
    // Recognise it (again: the file may have appeared or changed since) before writing.
    let found = inspect(&conn, path)?;
    if header.as_ref().is_some_and(|h| h.wal) && found != Found::Empty && options.verify_on_open {
        verify(&conn, path)?;
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| err(&e, "cannot switch to WAL", path))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unusable(format!(
            "{} cannot use write-ahead logging (journal_mode stayed {mode}); put it on a local \
             file system",
            path.display()
        )));
    }
    configure(&conn, options, path)?;
    if found != Found::Ours(SCHEMA_VERSION) {
        migrate(&mut conn, path)?;
    }
    // Refresh the planner's statistics where they are stale (cheap with the limit).
    conn.execute_batch("PRAGMA analysis_limit = 1000; PRAGMA optimize = 0x10002;")
        .map_err(|e| err(&e, "cannot optimize", path))?;
    Ok(conn)
}

/// Opens a reader connection on an existing store file.
pub(crate) fn open_reader(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| err(&e, "cannot open a reader on", path))?;
    busy::install(&conn, options.busy_timeout).map_err(|e| err(&e, "cannot configure", path))?;
    conn.pragma_update(None, "query_only", true)
        .map_err(|e| err(&e, "cannot configure", path))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Opens a private in-memory store.
pub(crate) fn open_memory(options: &SqliteOptions) -> Result<Connection, StoreError> {
    let path = Path::new(":memory:");
    let mut conn = Connection::open_in_memory().map_err(|e| err(&e, "cannot open", path))?;
    configure(&conn, options, path)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}
