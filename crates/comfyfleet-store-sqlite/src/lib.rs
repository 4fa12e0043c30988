//! # comfyfleet-store-sqlite
//!
//! [`SqliteStore`]: comfyfleet's embedded, durable [`TaskStore`] and [`InstallStore`], in one
//! SQLite file (WAL mode). It follows the contracts in [`comfyfleet_core::store`] and
//! [`comfyfleet_core::install`] exactly as [`comfyfleet_core::MemoryStore`] does (same
//! decisions, same event sequences) and passes `comfyfleet-testkit`'s conformance suites and
//! model test.
//!
//! ```
//! use std::time::Duration;
//!
//! use comfyfleet_core::{JobSpec, NewJob, TaskStore, Timestamp, Workflow};
//! use comfyfleet_store_sqlite::SqliteStore;
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = std::env::temp_dir().join(format!("comfyfleet-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("jobs.db");
//! # let _ = std::fs::remove_file(&path);
//! let store = SqliteStore::open(&path).await?;
//! let workflow = Workflow::from_json(r#"{"1": {"class_type": "EmptyImage"}}"#)?;
//! let now = Timestamp::from_millis(1_000);
//! let job = store.enqueue(NewJob::new(JobSpec::new(workflow)), now).await?;
//! let claimed = store.claim("engine-1", Duration::from_secs(30), now).await?;
//! assert_eq!(claimed.map(|c| c.lease.job), Some(job.id));
//! store.close().await;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Design
//!
//! * **Threads.** One writer thread owns the write connection and runs every change, taking
//!   commands over a channel. Changes are group-committed: the changes already queued (up to
//!   256) run in one short `BEGIN IMMEDIATE` transaction, each under its own savepoint (a
//!   failing change is rolled back alone), and every caller is answered after the `COMMIT`; a
//!   lone change is one transaction as before. Reads (`get`,
//!   `list`, `counts`, `events`, a dry-run `reap`) run on separate reader connections inside
//!   `spawn_blocking`, each in one read transaction (a consistent snapshot). No SQLite call runs
//!   on an async worker thread, and no transaction outlives the call that opened it.
//! * **Settings.** WAL, `synchronous = NORMAL` (configurable), cached statements, and a busy
//!   handler that polls every millisecond up to the busy timeout (SQLite's own backs off to
//!   100 ms sleeps, which lets a second store on the same file starve).
//! * **Writes** change only the columns that changed, and append the transition's events in
//!   the same transaction.
//! * **Schema.** Versioned migrations embedded in the binary (`rusqlite_migration`, tracked in
//!   `PRAGMA user_version`); `PRAGMA application_id` and a `meta` table mark the file as ours.
//!   Tables: `jobs` (scalar columns for everything queried, JSON for the rest), `attempts`,
//!   append-only `events` (the global event id is its `AUTOINCREMENT` key), `job_labels`,
//!   `leader`, `meta`; for installs (schema version 2) `installs` (queried columns plus the
//!   whole record as JSON), append-only `install_events` and `instance_packs`; for several
//!   orchestrators on one file (schema version 3) `restrictions` (shared blocks and open
//!   circuits) and a partial index on open attempts, which `start_attempt` counts against a
//!   capacity inside its `BEGIN IMMEDIATE` transaction.
//! * **Installs.** A partial unique index on `installs (instance) WHERE state IN ('queued',
//!   'running')` makes "one active install per instance" hold under any race; `update_install`
//!   is one `UPDATE … WHERE id = ? AND version = ? AND state IN ('queued', 'running')` plus its
//!   event inserts, in one transaction. `prune` also deletes finished installs and their events
//!   (never the recorded packs); `backup` copies everything.
//! * **Claim** is one statement: `UPDATE jobs SET state = 'running', claims = claims + 1, … WHERE
//!   ord = (SELECT ord FROM jobs WHERE state IN ('pending', 'retry_wait') AND run_at <= now ORDER
//!   BY priority DESC, ord LIMIT 1) RETURNING …`, served by a partial index. Every fenced write
//!   reads and writes the job under `state = 'running' AND claims = ?`;
//!   no match is [`StoreError::LeaseLost`] and nothing changes.
//! * **Refusals.** A directory, a file that is not SQLite, a SQLite database that is not ours, one
//!   from a newer schema, a damaged one or a read-only one is refused with
//!   [`StoreError::Unusable`] before anything is written to it.
//!
//! Several `SqliteStore`s (in one process or several) may share one file: SQLite's locking
//! serialises their writes and the fencing token keeps their leases apart. (For several
//! orchestrator machines, use a server database: SQLite over a network file system is unsafe.)
//!
//! A call whose future is dropped after its command reached the writer still completes there
//! and its answer is discarded: a claim answered to nobody is a lease nobody renews, which the
//! reaper requeues once it expires.

#![deny(missing_docs)]

mod busy;
mod codec;
mod conn;
mod error;
mod installs;
mod ops;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use comfyfleet_core::memory::installs::check_limit;
use comfyfleet_core::{
    AttemptStart, AttemptUpdate, CancelResult, CancelStep, Claimed, Completion, Enqueued, Event,
    EventQuery, Failure, HeartbeatAck, InstallEvent, InstallEventKind, InstallFilter, InstallId,
    InstallRecord, InstallStore, InstalledPack, JobFilter, JobId, JobPage, JobRecord, Lease,
    NewJob, ReapOptions, ReapReport, StateCounts, StoreError, TaskStore, Timestamp,
};
use rusqlite::Connection;

use crate::conn::{Readers, Writer, in_read_tx};
use crate::error::{Context, sqlite_to_store};

pub use crate::schema::{APPLICATION_ID, SCHEMA_VERSION};

/// How hard SQLite works to make a commit survive power loss (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Never wait for the disk. A power loss (not a crash) may corrupt the file. Tests only.
    Off,
    /// WAL default: a power loss may undo the last commits, never corrupt the file.
    #[default]
    Normal,
    /// Every commit is on disk before it returns.
    Full,
}

/// Settings for [`SqliteStore::open_with`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    busy_timeout: Duration,
    synchronous: Synchronous,
    max_readers: usize,
    max_page_count: Option<u32>,
    verify_on_open: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(5),
            synchronous: Synchronous::Normal,
            max_readers: 4,
            max_page_count: None,
            verify_on_open: true,
        }
    }
}

impl SqliteOptions {
    /// How long a statement waits for another connection's lock before failing with
    /// [`StoreError::Backend`] (default 5 s).
    pub fn busy_timeout(mut self, d: Duration) -> Self {
        self.busy_timeout = d;
        self
    }

    /// `PRAGMA synchronous` (default [`Synchronous::Normal`]).
    pub fn synchronous(mut self, s: Synchronous) -> Self {
        self.synchronous = s;
        self
    }

    /// Reader connections kept open between reads (default 4).
    pub fn max_readers(mut self, n: usize) -> Self {
        self.max_readers = n;
        self
    }

    /// Caps the database at this many pages (`PRAGMA max_page_count`; 4 KiB pages): a write that
    /// would grow it further fails as if the disk were full. `None` (default): no cap.
    pub fn max_page_count(mut self, pages: Option<u32>) -> Self {
        self.max_page_count = pages;
        self
    }

    /// Run `PRAGMA quick_check` on an existing file before using it (default on; it reads the
    /// whole file once, which takes a moment on a very large store).
    pub fn verify_on_open(mut self, on: bool) -> Self {
        self.verify_on_open = on;
        self
    }
}

/// A [`TaskStore`] in a SQLite database. See the [crate documentation](crate).
#[derive(Debug)]
pub struct SqliteStore {
    writer: Writer,
    /// `None` for an in-memory store (reads then go through the writer connection).
    readers: Option<Arc<Readers>>,
    path: Option<PathBuf>,
}

/// How many finished jobs one prune transaction deletes (keeps write transactions short).
const PRUNE_BATCH: usize = 500;

impl SqliteStore {
    /// Opens (or creates) the store at `path` with default settings.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens (or creates) the store at `path`. A new file gets the current schema; an older
    /// comfyfleet store is migrated. Anything else is refused with [`StoreError::Unusable`]
    /// and left untouched: a directory, a file that is not SQLite, another program's database,
    /// a store from a newer comfyfleet, a damaged or read-only file.
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: SqliteOptions,
    ) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let (conn, path, options) = blocking(move || {
            let conn = schema::open_writer(&path, &options)?;
            Ok((conn, path, options))
        })
        .await?;
        Ok(SqliteStore {
            writer: Writer::spawn(conn, options.busy_timeout)?,
            readers: Some(Arc::new(Readers::new(path.clone(), options))),
            path: Some(path),
        })
    }

    /// A private store in memory (nothing survives it; `backup` still writes a file).
    pub async fn open_in_memory() -> Result<SqliteStore, StoreError> {
        let conn = blocking(|| schema::open_memory(&SqliteOptions::default())).await?;
        Ok(SqliteStore {
            writer: Writer::spawn(conn, SqliteOptions::default().busy_timeout)?,
            readers: None,
            path: None,
        })
    }

    /// The database file (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Enqueues several jobs in one transaction: faster than one by one, and all or nothing
    /// (an invalid spec or a duplicate id rejects the whole batch). Each job is handled
    /// exactly like [`TaskStore::enqueue`], idempotency keys included.
    pub async fn enqueue_many(
        &self,
        jobs: Vec<NewJob>,
        now: Timestamp,
    ) -> Result<Vec<Enqueued>, StoreError> {
        for j in &jobs {
            ops::validate(j)?;
        }
        self.write(move |c| {
            jobs.into_iter()
                .map(|j| ops::enqueue_in(c, j, now))
                .collect()
        })
        .await
    }

    /// Moves everything in the write-ahead log into the database file and truncates the log
    /// (`PRAGMA wal_checkpoint(TRUNCATE)`). Fails with [`StoreError::Backend`] if a reader kept
    /// it from finishing.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        self.writer
            .call(|c| {
                let (busy, log, done): (i64, i64, i64) = c
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .ctx("checkpoint")?;
                if busy != 0 {
                    return Err(StoreError::Backend(format!(
                        "checkpoint could not finish: a reader is busy ({done} of {log} pages \
                         copied); retry"
                    )));
                }
                Ok(())
            })
            .await
    }

    /// `PRAGMA integrity_check`: `["ok"]` for a sound database, else the problems found.
    pub async fn integrity_check(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare("PRAGMA integrity_check").ctx("integrity_check")?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .ctx("integrity_check")?;
            Ok(rows.collect::<Result<Vec<_>, _>>().ctx("integrity_check")?)
        })
        .await
    }

    /// SQLite's query plan for a [`TaskStore::list`] filter, one line per step (diagnostics:
    /// shows which index serves the filter).
    pub async fn explain_list(&self, filter: &JobFilter) -> Result<Vec<String>, StoreError> {
        let filter = filter.clone();
        self.read(move |c| ops::explain_list(c, &filter)).await
    }

    /// Finishes the queued writes and closes the database (also done, without waiting, when
    /// the store is dropped).
    pub async fn close(mut self) {
        // Readers first, so that the writer's connection is the last one and leaves the file
        // checkpointed (SQLite does that when the last connection closes).
        if let Some(readers) = self.readers.take() {
            let idle = readers.take_idle();
            let _ = tokio::task::spawn_blocking(move || drop(idle)).await;
        }
        if let Some(thread) = self.writer.shutdown() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Runs a change in a `BEGIN IMMEDIATE` transaction on the writer thread (group commit: see
    /// [`conn::Writer`]); it is committed before this returns `Ok`.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.writer.write(f).await
    }

    /// Runs a read in one read transaction on a reader connection.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        match &self.readers {
            Some(r) => r.read(f).await,
            None => self.writer.call(move |c| in_read_tx(c, f)).await,
        }
    }
}

#[async_trait]
impl InstallStore for SqliteStore {
    async fn create_install(&self, record: &InstallRecord) -> Result<InstallEvent, StoreError> {
        let record = record.clone();
        self.write(move |c| installs::create(c, &record)).await
    }

    async fn get_install(&self, id: InstallId) -> Result<Option<InstallRecord>, StoreError> {
        self.read(move |c| installs::get(c, id)).await
    }

    async fn list_installs(
        &self,
        filter: &InstallFilter,
    ) -> Result<Vec<InstallRecord>, StoreError> {
        let limit = check_limit(filter.limit)?;
        let filter = filter.clone();
        self.read(move |c| installs::list(c, &filter, limit)).await
    }

    async fn update_install(
        &self,
        record: &InstallRecord,
        events: &[InstallEventKind],
    ) -> Result<Vec<InstallEvent>, StoreError> {
        let (record, events) = (record.clone(), events.to_vec());
        self.write(move |c| installs::update(c, &record, &events))
            .await
    }

    async fn install_events(
        &self,
        id: InstallId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InstallEvent>, StoreError> {
        self.read(move |c| installs::events(c, id, after, limit))
            .await
    }

    async fn instance_packs(&self, instance: &str) -> Result<Vec<InstalledPack>, StoreError> {
        let instance = instance.to_owned();
        self.read(move |c| installs::packs(c, &instance)).await
    }

    async fn record_packs(&self, packs: &[InstalledPack]) -> Result<(), StoreError> {
        let packs = packs.to_vec();
        self.write(move |c| installs::record_packs(c, &packs)).await
    }
}

/// Checks a backup destination; returns its directory and the name to copy to first.
fn backup_paths(dest: &Path) -> Result<(PathBuf, PathBuf), StoreError> {
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(StoreError::InvalidInput(format!(
            "backup destination {} already exists; refusing to overwrite it",
            dest.display()
        )));
    }
    let name = dest.file_name().ok_or_else(|| {
        StoreError::InvalidInput(format!(
            "backup destination {} has no file name",
            dest.display()
        ))
    })?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(StoreError::InvalidInput(format!(
            "backup destination directory {} does not exist",
            dir.display()
        )));
    }
    let partial = dir.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        JobId::new()
    ));
    Ok((dir, partial))
}

/// Syncs the finished copy and links it to its final name.
fn backup_finish(partial: &Path, dest: &Path, dir: &Path) -> Result<(), StoreError> {
    let io = |what: &str, e: std::io::Error| {
        StoreError::Backend(format!("backup to {}: {what}: {e}", dest.display()))
    };
    std::fs::File::open(partial)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("cannot sync the copy", e))?;
    std::fs::hard_link(partial, dest).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            StoreError::InvalidInput(format!(
                "backup destination {} already exists; refusing to overwrite it",
                dest.display()
            ))
        } else {
            io("cannot move the copy into place", e)
        }
    })?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Best effort: make the new name durable too.
        let _ = d.sync_all();
    }
    Ok(())
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // The writer thread closes its connection by itself once its channel closes. Idle
        // reader connections are closed on the blocking pool: closing may checkpoint.
        if let Some(readers) = self.readers.take() {
            let idle = readers.take_idle();
            if idle.is_empty() {
                return;
            }
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(move || drop(idle));
                }
                Err(_) => drop(idle),
            }
        }
    }
}

/// Runs blocking work on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("a SQLite task failed: {e}")))?
}

#[async_trait]
impl TaskStore for SqliteStore {
    async fn enqueue(&self, job: NewJob, now: Timestamp) -> Result<Enqueued, StoreError> {
        ops::validate(&job)?;
        self.write(move |c| ops::enqueue_in(c, job, now)).await
    }

    async fn claim(
        &self,
        owner: &str,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<Option<Claimed>, StoreError> {
        let owner = owner.to_owned();
        self.write(move |c| ops::claim(c, &owner, lease_ttl, now))
            .await
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<HeartbeatAck, StoreError> {
        let lease = lease.clone();
        // One fenced UPDATE: atomic on its own.
        self.writer
            .call(move |c| ops::heartbeat(c, &lease, lease_ttl, now))
            .await
    }

    async fn release(
        &self,
        lease: &Lease,
        run_at: Timestamp,
        reason: &str,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let (lease, reason) = (lease.clone(), reason.to_owned());
        self.write(move |c| ops::release(c, &lease, run_at, &reason, now))
            .await
    }

    async fn start_attempt(
        &self,
        lease: &Lease,
        start: AttemptStart,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let lease = lease.clone();
        self.write(move |c| ops::start_attempt(c, &lease, start, now))
            .await
    }

    async fn update_attempt(
        &self,
        lease: &Lease,
        update: AttemptUpdate,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let lease = lease.clone();
        self.write(move |c| ops::update_attempt(c, &lease, update, now))
            .await
    }

    async fn complete(
        &self,
        lease: &Lease,
        completion: Completion,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let lease = lease.clone();
        self.write(move |c| ops::complete(c, &lease, completion, now))
            .await
    }

    async fn fail(
        &self,
        lease: &Lease,
        failure: Failure,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let lease = lease.clone();
        self.write(move |c| ops::fail(c, &lease, failure, now))
            .await
    }

    async fn cancel(
        &self,
        id: JobId,
        reason: &str,
        now: Timestamp,
    ) -> Result<CancelResult, StoreError> {
        let reason = reason.to_owned();
        self.write(move |c| ops::cancel(c, id, &reason, false, now))
            .await
    }

    async fn force_cancel(
        &self,
        id: JobId,
        reason: &str,
        now: Timestamp,
    ) -> Result<CancelResult, StoreError> {
        let reason = reason.to_owned();
        self.write(move |c| ops::cancel(c, id, &reason, true, now))
            .await
    }

    async fn ack_cancel(
        &self,
        lease: &Lease,
        steps: Vec<CancelStep>,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let lease = lease.clone();
        self.write(move |c| ops::ack_cancel(c, &lease, steps, now))
            .await
    }

    async fn detach(&self, lease: &Lease, now: Timestamp) -> Result<Vec<Event>, StoreError> {
        let lease = lease.clone();
        self.write(move |c| ops::detach(c, &lease, now)).await
    }

    async fn reap(&self, options: &ReapOptions, now: Timestamp) -> Result<ReapReport, StoreError> {
        let options = options.clone();
        if options.dry_run {
            // Reports only: a read transaction, nothing is written to the file.
            self.read(move |c| ops::reap(c, &options, now)).await
        } else {
            self.write(move |c| ops::reap(c, &options, now)).await
        }
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.read(move |c| ops::get(c, id)).await
    }

    async fn list(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        filter.effective_limit()?;
        let filter = filter.clone();
        self.read(move |c| ops::list(c, &filter)).await
    }

    async fn counts(&self) -> Result<StateCounts, StoreError> {
        self.read(ops::counts).await
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
        let query = query.clone();
        self.read(move |c| ops::events(c, &query)).await
    }

    async fn prune(&self, finished_before: Timestamp) -> Result<u64, StoreError> {
        // In batches, each its own short transaction, so other writers are never held up long.
        let mut total = 0;
        loop {
            let n = self
                .write(move |c| ops::prune_batch(c, finished_before, PRUNE_BATCH))
                .await?;
            total += n;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        // Finished installs too (not counted: the answer is about jobs).
        let mut installs = 0;
        loop {
            let n = self
                .write(move |c| installs::prune_batch(c, finished_before, PRUNE_BATCH))
                .await?;
            installs += n;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        if total + installs > 0 {
            // Many rows went: let SQLite refresh its statistics if they drifted.
            self.writer
                .call(|c| {
                    c.execute_batch("PRAGMA optimize")
                        .ctx("optimize after prune")?;
                    Ok(())
                })
                .await?;
        }
        Ok(total)
    }

    async fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        // Copy next to the destination, make the copy durable, then link it into place: the
        // link fails rather than overwrite if the destination appeared meanwhile, and a failed
        // backup leaves no half-written file under the destination's name.
        let dest = dest.to_path_buf();
        let (dir, partial) = {
            let dest = dest.clone();
            blocking(move || backup_paths(&dest)).await?
        };
        let target = partial.clone();
        let vacuum = move |c: &Connection| -> Result<(), StoreError> {
            c.execute("VACUUM INTO ?1", [target.to_string_lossy().as_ref()])
                .map_err(|e| {
                    sqlite_to_store(&e, &format!("backup to {}: {e}", target.display()))
                })?;
            Ok(())
        };
        let copied = match &self.path {
            Some(path) => {
                let path = path.clone();
                blocking(move || {
                    // A connection of its own: the writer and the readers carry on meanwhile.
                    let conn = Connection::open_with_flags(
                        &path,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .map_err(|e| {
                        sqlite_to_store(&e, &format!("backup: cannot open {}: {e}", path.display()))
                    })?;
                    busy::install(&conn, Duration::from_secs(30)).ctx("backup")?;
                    vacuum(&conn)
                })
                .await
            }
            None => self.writer.call(move |c| vacuum(c)).await,
        };
        blocking(move || {
            let out = copied.and_then(|()| backup_finish(&partial, &dest, &dir));
            // Whatever happened, the partial copy goes (after a good link, `dest` keeps it).
            let _ = std::fs::remove_file(&partial);
            out
        })
        .await
    }

    async fn backend_load(
        &self,
    ) -> Result<std::collections::BTreeMap<comfyfleet_core::BackendId, u32>, StoreError> {
        self.read(ops::backend_load).await
    }

    async fn share_restrictions(
        &self,
        mine: &[comfyfleet_core::Restriction],
        now: Timestamp,
    ) -> Result<Vec<comfyfleet_core::Restriction>, StoreError> {
        let mine = mine.to_vec();
        self.writer
            .call(move |c| ops::share_restrictions(c, &mine, now))
            .await
    }

    async fn try_lead(
        &self,
        owner: &str,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let owner = owner.to_owned();
        self.writer
            .call(move |c| ops::try_lead(c, &owner, ttl, now))
            .await
    }
}
