//! # comfyfleet-store-postgres
//!
//! [`PostgresStore`]: comfyfleet's [`TaskStore`] and [`InstallStore`] on a PostgreSQL server,
//! for several orchestrators (processes or machines) sharing one queue. It follows the
//! contracts in [`comfyfleet_core::store`] and [`comfyfleet_core::install`] exactly as
//! [`comfyfleet_core::MemoryStore`] does (same decisions, same event sequences) and passes
//! `comfyfleet-testkit`'s conformance suites and model test.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use comfyfleet_core::{JobSpec, NewJob, TaskStore, Timestamp, Workflow};
//! use comfyfleet_store_postgres::{PostgresOptions, PostgresStore};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::connect_with(
//!     "postgres://comfyfleet@db.internal/comfyfleet",
//!     PostgresOptions::default().schema("fleet_a"),
//! )
//! .await?;
//! let workflow = Workflow::from_json(r#"{"1": {"class_type": "EmptyImage"}}"#)?;
//! let now = Timestamp::from_millis(1_000);
//! let job = store.enqueue(NewJob::new(JobSpec::new(workflow)), now).await?;
//! let claimed = store.claim("engine-1", Duration::from_secs(30), now).await?;
//! assert_eq!(claimed.map(|c| c.lease.job), Some(job.id));
//! store.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! ## Design
//!
//! * **Short transactions.** Every call is one short transaction (READ COMMITTED) on a pooled
//!   connection, holding nothing but SQL: no transaction ever waits on a backend, so the
//!   server's xmin horizon moves on and `SKIP LOCKED` stays cheap.
//! * **Claim** is one statement: `WITH next AS (SELECT ord FROM jobs WHERE state IN
//!   ('pending', 'retry_wait') AND run_at <= now ORDER BY priority DESC, ord LIMIT 1 FOR UPDATE
//!   SKIP LOCKED) UPDATE jobs SET state = 'running', claims = claims + 1, … FROM next …
//!   RETURNING …`, served by a partial index on claimable rows. Concurrent claimers skip each
//!   other's rows instead of queueing; none gets a job twice. (A claim that finds only rows
//!   others hold answers `None`: the caller polls again.)
//! * **Fencing.** Every write made under a lease locks the job row with `WHERE id = $1 AND
//!   state = 'running' AND claims = $2 FOR UPDATE` and writes it back under the same
//!   condition; no row is [`StoreError::LeaseLost`] and nothing changes. A heartbeat is one
//!   fenced `UPDATE … RETURNING cancel_requested_at IS NOT NULL`: the force-cancel request rides
//!   back on it.
//! * **Events** are appended in the transaction of the change they record. Their global ids
//!   come from a one-row counter (`UPDATE event_counter SET last = last + n RETURNING last`)
//!   taken as the last statement before commit: its row lock serialises the commits of
//!   event-writing transactions, so ids become visible in id order and a client tailing
//!   "events after id X" never skips one that commits late. (A sequence would not do that: a
//!   smaller id may commit after a larger one.)
//! * **Fleet capacity.** `start_attempt` with a capacity locks the backend's row in
//!   `backend_slots` (`FOR UPDATE`), counts the backend's open attempts and inserts the new one
//!   in the same transaction, so orchestrators sharing the store never exceed a backend's
//!   capacity between them. `backend_load` reports the counts; `share_restrictions` keeps the
//!   fleet's workflow blocks and open circuits in `restrictions`.
//! * **Wake-ups.** Every transaction that appends events also runs `pg_notify('comfyfleet_<schema>',
//!   '')` (so: enqueue, release, requeue, cancel, every state change — claims and heartbeats
//!   append none). [`TaskStore::changes`] starts one `LISTEN` connection per store (on first
//!   use) whose counter moves on each notification, and after every reconnect (notifications
//!   sent meanwhile were lost). It is only a hint: callers keep polling.
//! * **Leadership.** `try_lead` is one `INSERT … ON CONFLICT (name) DO UPDATE … WHERE
//!   leader.owner = EXCLUDED.owner OR leader.expires_at <= now RETURNING owner` on a lease row:
//!   the reaper, pruning and backups run on one orchestrator at a time.
//! * **Installs.** A partial unique index on `installs (instance) WHERE state IN ('queued',
//!   'running')` makes "one active install per instance" hold under any race; `update_install`
//!   is one version-guarded `UPDATE` plus its event inserts.
//! * **Schema.** Versioned migrations embedded in the binary, applied at connect by sqlx's
//!   migrator (its `_sqlx_migrations` table lives in the store's schema; concurrent connects
//!   take turns on its advisory lock). A schema from a newer comfyfleet, or one holding another
//!   program's tables, is refused with [`StoreError::Unusable`] before anything is written.
//!   With [`PostgresOptions::schema`], everything lives in that schema (created if missing;
//!   every pooled connection gets it as its `search_path`), so several independent fleets (or
//!   test runs) can share one database.
//! * **Times** are BIGINT milliseconds since the Unix epoch (the caller's clock, as in every
//!   store), ids are UUIDs, and the JSON parts of a record are stored as text exactly as
//!   serialised.
//! * **Timeouts.** Getting a connection (including connecting) is bounded by
//!   [`PostgresOptions::acquire_timeout`], every statement by the server's `statement_timeout`
//!   ([`PostgresOptions::statement_timeout`]), and every call as a whole by their sum plus a
//!   margin (a silent network cannot hang a call).
//! * **Errors.** Lost connections, pool timeouts, statement timeouts, serialization failures
//!   and deadlocks are [`StoreError::Backend`] ([`StoreError::is_temporary`]: retry the call);
//!   a duplicate job id is [`StoreError::InvalidInput`], a repeated idempotency key answers the
//!   existing job, a second active install is [`StoreError::Conflict`]. No error, log line or
//!   `Debug` output carries the connection URL's password.
//!
//! ## Backups and restore
//!
//! [`TaskStore::backup`] runs `pg_dump --format=custom` (the PostgreSQL client tools must be on
//! `PATH`, at least the server's major version) for the store's schema (or the whole database
//! without one) into a new file; the password is passed in the environment, never on the
//! command line. `pg_dump` takes a consistent snapshot and does not block the queue. Restore
//! into an empty database (or after dropping the schema) with
//!
//! ```text
//! pg_restore --dbname postgres://user@host/db --no-owner backup.dump
//! ```
//!
//! (a plain-SQL copy, `pg_dump --format=plain`, is restored with `psql --file`). Stop the
//! orchestrators first, or they will keep working on the old data.
//!
//! ## Retention
//!
//! [`TaskStore::prune`] deletes finished jobs (with their attempts, labels and events) and
//! finished installs (with their events) older than a cutoff, in batches of short transactions
//! (`FOR UPDATE SKIP LOCKED`); autovacuum reclaims the space.

#![deny(missing_docs)]

mod codec;
mod error;
mod inputs;
mod installs;
mod listen;
mod ops;
mod schema;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use comfyfleet_core::memory::installs::check_limit;
use comfyfleet_core::{
    AttemptStart, AttemptUpdate, BackendId, CancelResult, CancelStep, Claimed, Completion,
    Enqueued, Event, EventQuery, Failure, HeartbeatAck, InstallEvent, InstallEventKind,
    InstallFilter, InstallId, InstallRecord, InstallStore, InstalledPack, JobFilter, JobId,
    JobPage, JobRecord, Lease, NewJob, ReapOptions, ReapReport, Restriction, StateCounts,
    StoreError, TaskStore, Timestamp,
};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::error::Context;

pub use crate::schema::SCHEMA_VERSION;

/// Settings for [`PostgresStore::connect_with`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    schema: Option<String>,
    max_connections: u32,
    acquire_timeout: Duration,
    statement_timeout: Duration,
    backup_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            schema: None,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            backup_timeout: Duration::from_secs(3600),
        }
    }
}

impl PostgresOptions {
    /// Keeps everything in this schema (created if missing): lowercase ASCII letters, digits
    /// and `_`, starting with a letter or `_`, at most 48 characters. Default: none (the
    /// connection's own `search_path`, usually `public`).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Pooled connections at most (default 8; one more is taken by [`TaskStore::changes`]'s
    /// listener once it is used).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a call waits for a connection, connecting included (default 10 s).
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }

    /// The server-side `statement_timeout` of every connection (default 30 s).
    pub fn statement_timeout(mut self, d: Duration) -> Self {
        self.statement_timeout = d;
        self
    }

    /// How long [`TaskStore::backup`]'s `pg_dump` may run (default 1 h).
    pub fn backup_timeout(mut self, d: Duration) -> Self {
        self.backup_timeout = d;
        self
    }
}

/// A [`TaskStore`] and [`InstallStore`] in a PostgreSQL database. See the
/// [crate documentation](crate).
pub struct PostgresStore {
    pool: PgPool,
    /// The URL without its password, for messages.
    redacted: String,
    /// The URL as given (holds the password; never printed).
    url: String,
    schema: Option<String>,
    channel: String,
    call_timeout: Duration,
    backup_timeout: Duration,
    listener: Mutex<Option<listen::Listener>>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.redacted)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// How many finished jobs (or installs) one prune transaction deletes.
const PRUNE_BATCH: i64 = 500;

/// Runs `$body` (which uses the connection `$c` and may `?`) in one transaction, committing
/// only if it succeeds, within the store's call timeout.
macro_rules! tx {
    ($store:expr, $what:literal, |$c:ident| $body:expr) => {
        $store
            .timed($what, async {
                let mut tx = $store.pool.begin().await.ctx(concat!("begin: ", $what))?;
                let out = {
                    let $c: &mut sqlx::PgConnection = &mut tx;
                    $body
                };
                tx.commit().await.ctx(concat!("commit: ", $what))?;
                Ok(out)
            })
            .await
    };
}

/// Runs `$body` on one pooled connection (no explicit transaction: a single statement, or
/// reads that need no common snapshot), within the store's call timeout.
macro_rules! conn {
    ($store:expr, $what:literal, |$c:ident| $body:expr) => {
        $store
            .timed($what, async {
                let mut conn = $store.pool.acquire().await.ctx($what)?;
                let $c: &mut sqlx::PgConnection = &mut conn;
                Ok($body)
            })
            .await
    };
}

impl PostgresStore {
    /// Connects with default settings (no schema). See [`PostgresStore::connect_with`].
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects to the database at `url` (`postgres://user:password@host:port/db?sslmode=…`),
    /// creates the schema if asked for and missing, and brings it to the current version. A
    /// schema from a newer comfyfleet, or another program's, is refused with
    /// [`StoreError::Unusable`] and left untouched; an unreachable server gives
    /// [`StoreError::Backend`] within the acquire timeout.
    pub async fn connect_with(
        url: &str,
        options: PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        // sqlx's rustls finds this provider (the one the whole workspace uses); idempotent.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let redacted = schema::redact(url);
        if let Some(s) = &options.schema {
            schema::check_name(s)?;
        }
        let pool = schema::pool(url, &redacted, &options)?;
        let call_timeout = options.acquire_timeout + options.statement_timeout * 2;
        let setup = async {
            schema::prepare(&pool, &redacted, options.schema.as_deref()).await?;
            Ok::<_, StoreError>(())
        };
        // Migrations may run several statements: give them a few statement timeouts.
        match tokio::time::timeout(call_timeout + options.statement_timeout * 4, setup).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(StoreError::Backend(format!(
                    "connecting to {redacted} timed out"
                )));
            }
        }
        let channel = schema::channel(options.schema.as_deref());
        tracing::debug!(url = %redacted, schema = ?options.schema, "PostgreSQL store ready");
        Ok(PostgresStore {
            pool,
            redacted,
            url: url.to_owned(),
            schema: options.schema,
            channel,
            call_timeout,
            backup_timeout: options.backup_timeout,
            listener: Mutex::new(None),
        })
    }

    /// The schema the store lives in (`None`: the connection's default).
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The `LISTEN/NOTIFY` channel of this store's wake-ups.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Enqueues several jobs in one transaction: all or nothing (an invalid spec or a
    /// duplicate id rejects the whole batch). Each job is handled exactly like
    /// [`TaskStore::enqueue`], idempotency keys included.
    pub async fn enqueue_many(
        &self,
        jobs: Vec<NewJob>,
        now: Timestamp,
    ) -> Result<Vec<Enqueued>, StoreError> {
        for j in &jobs {
            ops::validate(j)?;
        }
        tx!(self, "enqueue_many", |c| {
            let mut out = Vec::with_capacity(jobs.len());
            for j in jobs {
                out.push(ops::enqueue(c, j, now, &self.channel).await?);
            }
            out
        })
    }

    /// Stops the change listener and closes every connection, waiting for calls in flight.
    /// Later calls fail with [`StoreError::Backend`] ("the store was closed"). Dropping the
    /// store also lets its connections go, without waiting.
    pub async fn close(&self) {
        self.stop_listener();
        self.pool.close().await;
    }

    fn stop_listener(&self) {
        let taken = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(l) = taken {
            l.stop();
        }
    }

    /// Runs one call under the call timeout.
    async fn timed<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.call_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Backend(format!(
                "{what}: no answer from PostgreSQL at {} within {:?}; retry",
                self.redacted, self.call_timeout
            ))),
        }
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The listener task holds a pool handle: stop it so the pool can go.
        self.stop_listener();
    }
}

#[async_trait]
impl TaskStore for PostgresStore {
    async fn enqueue(&self, job: NewJob, now: Timestamp) -> Result<Enqueued, StoreError> {
        ops::validate(&job)?;
        tx!(self, "enqueue", |c| ops::enqueue(
            c,
            job,
            now,
            &self.channel
        )
        .await?)
    }

    async fn claim(
        &self,
        owner: &str,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<Option<Claimed>, StoreError> {
        tx!(self, "claim", |c| ops::claim(c, owner, lease_ttl, now)
            .await?)
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<HeartbeatAck, StoreError> {
        // One fenced UPDATE: atomic on its own.
        conn!(self, "heartbeat", |c| ops::heartbeat(
            c, lease, lease_ttl, now
        )
        .await?)
    }

    async fn release(
        &self,
        lease: &Lease,
        run_at: Timestamp,
        reason: &str,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        tx!(self, "release", |c| ops::release(
            c,
            lease,
            run_at,
            reason,
            now,
            &self.channel
        )
        .await?)
    }

    async fn start_attempt(
        &self,
        lease: &Lease,
        start: AttemptStart,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        tx!(self, "start_attempt", |c| ops::start_attempt(
            c,
            lease,
            start,
            now,
            &self.channel
        )
        .await?)
    }

    async fn update_attempt(
        &self,
        lease: &Lease,
        update: AttemptUpdate,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        tx!(self, "update_attempt", |c| ops::update_attempt(
            c,
            lease,
            update,
            now,
            &self.channel
        )
        .await?)
    }

    async fn complete(
        &self,
        lease: &Lease,
        completion: Completion,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        tx!(self, "complete", |c| ops::complete(
            c,
            lease,
            completion,
            now,
            &self.channel
        )
        .await?)
    }

    async fn fail(
        &self,
        lease: &Lease,
        failure: Failure,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        tx!(self, "fail", |c| ops::fail(
            c,
            lease,
            failure,
            now,
            &self.channel
        )
        .await?)
    }

    async fn cancel(
        &self,
        id: JobId,
        reason: &str,
        now: Timestamp,
    ) -> Result<CancelResult, StoreError> {
        tx!(self, "cancel", |c| ops::cancel(
            c,
            id,
            reason,
            false,
            now,
            &self.channel
        )
        .await?)
    }

    async fn force_cancel(
        &self,
        id: JobId,
        reason: &str,
        now: Timestamp,
    ) -> Result<CancelResult, StoreError> {
        tx!(self, "force_cancel", |c| ops::cancel(
            c,
            id,
            reason,
            true,
            now,
            &self.channel
        )
        .await?)
    }

    async fn ack_cancel(
        &self,
        lease: &Lease,
        steps: Vec<CancelStep>,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        tx!(self, "ack_cancel", |c| ops::ack_cancel(
            c,
            lease,
            steps,
            now,
            &self.channel
        )
        .await?)
    }

    async fn detach(&self, lease: &Lease, now: Timestamp) -> Result<Vec<Event>, StoreError> {
        tx!(self, "detach", |c| ops::detach(
            c,
            lease,
            now,
            &self.channel
        )
        .await?)
    }

    async fn reap(&self, options: &ReapOptions, now: Timestamp) -> Result<ReapReport, StoreError> {
        tx!(self, "reap", |c| ops::reap(c, options, now, &self.channel)
            .await?)
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        // The job row and its attempts from one snapshot.
        tx!(self, "get", |c| ops::get(c, id).await?)
    }

    async fn list(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        filter.effective_limit()?;
        conn!(self, "list", |c| ops::list(c, filter).await?)
    }

    async fn counts(&self) -> Result<StateCounts, StoreError> {
        conn!(self, "counts", |c| ops::counts(c).await?)
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
        conn!(self, "events", |c| ops::events(c, query).await?)
    }

    async fn prune(&self, finished_before: Timestamp) -> Result<u64, StoreError> {
        // In batches, each its own short transaction.
        let mut total = 0;
        loop {
            let n = tx!(self, "prune", |c| ops::prune_batch(
                c,
                finished_before,
                PRUNE_BATCH
            )
            .await?)?;
            total += n;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        // Finished installs too (not counted: the answer is about jobs).
        loop {
            let n = tx!(self, "prune installs", |c| installs::prune_batch(
                c,
                finished_before,
                PRUNE_BATCH
            )
            .await?)?;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        Ok(total)
    }

    async fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        schema::backup(
            &self.url,
            &self.redacted,
            self.schema.as_deref(),
            dest,
            self.backup_timeout,
        )
        .await
    }

    async fn backend_load(&self) -> Result<BTreeMap<BackendId, u32>, StoreError> {
        conn!(self, "backend_load", |c| ops::backend_load(c).await?)
    }

    async fn share_restrictions(
        &self,
        mine: &[Restriction],
        now: Timestamp,
    ) -> Result<Vec<Restriction>, StoreError> {
        tx!(self, "share_restrictions", |c| ops::share_restrictions(
            c, mine, now
        )
        .await?)
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        let mut slot = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            // The listener task needs a runtime; outside one there is no hint to give.
            let rt = tokio::runtime::Handle::try_current().ok()?;
            *slot = Some(listen::Listener::start(
                &rt,
                self.pool.clone(),
                self.channel.clone(),
                self.redacted.clone(),
            ));
        }
        slot.as_ref().map(listen::Listener::subscribe)
    }

    async fn try_lead(
        &self,
        owner: &str,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        conn!(self, "try_lead", |c| ops::try_lead(c, owner, ttl, now)
            .await?)
    }
}

#[async_trait]
impl InstallStore for PostgresStore {
    async fn create_install(&self, record: &InstallRecord) -> Result<InstallEvent, StoreError> {
        tx!(self, "create_install", |c| installs::create(c, record)
            .await?)
    }

    async fn get_install(&self, id: InstallId) -> Result<Option<InstallRecord>, StoreError> {
        conn!(self, "get_install", |c| installs::get(c, id).await?)
    }

    async fn list_installs(
        &self,
        filter: &InstallFilter,
    ) -> Result<Vec<InstallRecord>, StoreError> {
        let limit = check_limit(filter.limit)?;
        conn!(self, "list_installs", |c| installs::list(c, filter, limit)
            .await?)
    }

    async fn update_install(
        &self,
        record: &InstallRecord,
        events: &[InstallEventKind],
    ) -> Result<Vec<InstallEvent>, StoreError> {
        tx!(self, "update_install", |c| {
            installs::check_active(c, record).await?;
            installs::update(c, record, events).await?
        })
    }

    async fn install_events(
        &self,
        id: InstallId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InstallEvent>, StoreError> {
        tx!(self, "install_events", |c| installs::events(
            c, id, after, limit
        )
        .await?)
    }

    async fn instance_packs(&self, instance: &str) -> Result<Vec<InstalledPack>, StoreError> {
        conn!(self, "instance_packs", |c| installs::packs(c, instance)
            .await?)
    }

    async fn record_packs(&self, packs: &[InstalledPack]) -> Result<(), StoreError> {
        tx!(self, "record_packs", |c| installs::record_packs(c, packs)
            .await?)
    }
}
