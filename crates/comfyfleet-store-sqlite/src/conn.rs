//! Threading: one writer thread owning the write connection, and reader connections used from
//! `spawn_blocking`. No SQLite call ever runs on an async worker thread.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use comfyfleet_core::StoreError;
use rusqlite::Connection;

use crate::SqliteOptions;
use crate::busy;
use crate::error::Context;
use crate::schema;

/// The most store changes the writer folds into one transaction (group commit).
const MAX_GROUP: usize = 256;

/// Work for the writer thread.
enum Command {
    /// Runs alone on the connection, outside any transaction of the writer's (maintenance,
    /// reads on a database without reader connections).
    Solo(Box<dyn FnOnce(&mut Connection) + Send>),
    /// One store change, run under its own savepoint inside a group transaction.
    Change(Box<dyn Change>),
}

/// A store change waiting for the writer: run it, or give up on it without running it.
trait Change: Send {
    /// Runs the change on the connection (inside the group transaction).
    fn run(self: Box<Self>, conn: &Connection) -> Outcome;
    /// Answers the caller with `why`, the change not having run.
    fn abandon(self: Box<Self>, why: StoreError);
}

/// What a change did, and how to answer its caller once the group's fate is known.
struct Outcome {
    /// The change succeeded and must be committed; `false`: it failed and must be undone.
    keep: bool,
    /// Sends the answer: `Ok` once the group committed, or the group's error. A failed change
    /// answers with its own error whatever it is given.
    reply: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
}

/// A caller's closure and the channel its answer goes back on.
struct Call<T, F> {
    f: F,
    reply: tokio::sync::oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Change for Call<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection) -> Outcome {
        let Call { f, reply } = *self;
        // The caller may have given up waiting; the work is done either way.
        match f(conn) {
            Ok(value) => Outcome {
                keep: true,
                reply: Box::new(move |committed| {
                    let _ = reply.send(committed.map(|()| value));
                }),
            },
            Err(e) => Outcome {
                keep: false,
                reply: Box::new(move |_| {
                    let _ = reply.send(Err(e));
                }),
            },
        }
    }

    fn abandon(self: Box<Self>, why: StoreError) {
        let _ = self.reply.send(Err(why));
    }
}

/// The writer thread: takes work over a channel and runs it, in order, on its connection.
///
/// Store changes are committed in groups: the thread takes every change already queued (up to
/// [`MAX_GROUP`]), runs each under its own savepoint inside one `BEGIN IMMEDIATE` transaction,
/// and answers the callers only after the one `COMMIT`. A change that fails is rolled back to
/// its savepoint (the others are not affected); if the `COMMIT` itself fails, every change of
/// the group is rolled back and its caller gets that error. Under load this turns one commit
/// per change into one per batch; a lone change costs what it did before.
#[derive(Debug)]
pub(crate) struct Writer {
    tx: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub(crate) fn spawn(conn: Connection, busy_timeout: Duration) -> Result<Writer, StoreError> {
        let (tx, rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("comfyfleet-sqlite-writer".into())
            .spawn(move || {
                busy::set_timeout(busy_timeout);
                let mut conn = conn;
                let mut next = None;
                loop {
                    let cmd = match next.take() {
                        Some(cmd) => cmd,
                        None => match rx.recv() {
                            Ok(cmd) => cmd,
                            Err(_) => break,
                        },
                    };
                    match cmd {
                        Command::Solo(f) => {
                            // A panicking command drops its reply sender (its caller gets an
                            // error) and its transaction, if any (rolled back on drop).
                            if std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut conn))).is_err()
                            {
                                tracing::error!(
                                    "a SQLite store command panicked; its change was rolled back"
                                );
                            }
                        }
                        Command::Change(first) => {
                            let mut group = vec![first];
                            while group.len() < MAX_GROUP {
                                match rx.try_recv() {
                                    Ok(Command::Change(c)) => group.push(c),
                                    Ok(solo) => {
                                        next = Some(solo);
                                        break;
                                    }
                                    Err(_) => break,
                                }
                            }
                            commit_group(&conn, group);
                        }
                    }
                }
                // Every handle is gone: tidy up and close.
                if let Err(e) = conn.execute_batch("PRAGMA optimize") {
                    tracing::debug!("PRAGMA optimize on close: {e}");
                }
                if let Err((_, e)) = conn.close() {
                    tracing::warn!("closing the SQLite store: {e}");
                }
            })
            .map_err(|e| {
                StoreError::Backend(format!("cannot start the SQLite writer thread: {e}"))
            })?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Runs the change `f` in a write transaction on the writer connection (see the type's
    /// doc: possibly grouped with other changes) and waits (asynchronously) for its answer,
    /// which comes only once the change is committed, or known not to be.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Command::Change(Box::new(Call { f, reply })))?;
        answer.await.map_err(|_| dropped())?
    }

    /// Runs `f` alone on the writer connection and waits (asynchronously) for its answer.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Command::Solo(Box::new(move |conn| {
            // The caller may have given up waiting; the work is done either way.
            let _ = reply.send(f(conn));
        })))?;
        answer.await.map_err(|_| dropped())?
    }

    fn send(&self, cmd: Command) -> Result<(), StoreError> {
        let stopped = || StoreError::Backend("the SQLite store is closed".into());
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        tx.send(cmd).map_err(|_| stopped())
    }

    /// Stops the thread after the queued commands and waits for it to close the database.
    pub(crate) fn shutdown(&mut self) -> Option<JoinHandle<()>> {
        self.tx = None;
        self.thread.take()
    }
}

fn dropped() -> StoreError {
    StoreError::Backend(
        "the SQLite writer dropped the request (it panicked; see the log); nothing was changed"
            .into(),
    )
}

/// Runs `group` in one `BEGIN IMMEDIATE` transaction, each change under its own savepoint, and
/// answers every caller after the `COMMIT` (see [`Writer`]).
fn commit_group(conn: &Connection, group: Vec<Box<dyn Change>>) {
    if let Err(e) = conn
        .execute_batch("BEGIN IMMEDIATE")
        .ctx("begin a write transaction")
    {
        let e = StoreError::from(e);
        for change in group {
            change.abandon(e.clone());
        }
        return;
    }
    let mut committed = Vec::with_capacity(group.len());
    let mut changes = group.into_iter();
    let mut broken = None;
    for change in changes.by_ref() {
        if let Err(e) = conn.execute_batch("SAVEPOINT change").ctx("begin a change") {
            let e = StoreError::from(e);
            change.abandon(e.clone());
            broken = Some(e);
            break;
        }
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| change.run(conn)));
        let keep = matches!(&outcome, Ok(o) if o.keep);
        let end = if keep {
            conn.execute_batch("RELEASE change")
        } else {
            conn.execute_batch("ROLLBACK TO change; RELEASE change")
        };
        if let Err(e) = end.ctx("end a change") {
            // The transaction's state is unknown: undo the whole group.
            broken = Some(StoreError::from(e));
        }
        match outcome {
            Ok(o) if keep => committed.push(o.reply),
            // A failed change changed nothing: answer now with its own error.
            Ok(o) => (o.reply)(Ok(())),
            // Its reply sender is gone with the change: the caller gets `dropped()`.
            Err(_) => tracing::error!("a SQLite store change panicked; it was rolled back"),
        }
        if broken.is_some() {
            break;
        }
    }
    let end = match broken {
        None => conn
            .execute_batch("COMMIT")
            .ctx("commit")
            .map_err(StoreError::from),
        Some(e) => Err(e),
    };
    match end {
        Ok(()) => {
            for reply in committed {
                reply(Ok(()));
            }
        }
        Err(e) => {
            if !conn.is_autocommit()
                && let Err(r) = conn.execute_batch("ROLLBACK")
            {
                tracing::warn!("rolling back a failed SQLite write group: {r}");
            }
            for reply in committed {
                reply(Err(e.clone()));
            }
            for change in changes {
                change.abandon(e.clone());
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the queued commands; do not block here.
        self.tx = None;
    }
}

/// Reader connections on the store file, used from the blocking pool.
#[derive(Debug)]
pub(crate) struct Readers {
    path: PathBuf,
    options: SqliteOptions,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    pub(crate) fn new(path: PathBuf, options: SqliteOptions) -> Self {
        Readers {
            path,
            options,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Result<Connection, StoreError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(c) => Ok(c),
            None => schema::open_reader(&self.path, &self.options),
        }
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.options.max_readers {
            idle.push(conn);
        }
    }

    /// Takes the idle connections out (to be closed off the async threads).
    pub(crate) fn take_idle(&self) -> Vec<Connection> {
        std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs `f` in one read transaction (a consistent snapshot) on a reader connection.
    pub(crate) async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            busy::set_timeout(me.options.busy_timeout);
            let conn = me.take()?;
            let out = in_read_tx(&conn, f);
            // Keep the connection unless the database itself failed under it.
            if !matches!(out, Err(StoreError::Backend(_) | StoreError::Unusable(_))) {
                me.put(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Backend(format!("a SQLite read task failed: {e}")))?
    }
}

/// Runs `f` inside a deferred (read) transaction, so that it sees one snapshot.
pub(crate) fn in_read_tx<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let tx = conn
        .unchecked_transaction()
        .ctx("begin a read transaction")?;
    let out = f(&tx)?;
    // Nothing was written: ending the read transaction either way is the same.
    tx.rollback().ctx("end a read transaction")?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn insert(conn: &Connection, id: i64, parent: Option<i64>) -> Result<(), StoreError> {
        conn.execute("INSERT INTO t (id, parent) VALUES (?1, ?2)", (id, parent))
            .map(drop)
            .map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// A writer on a fresh in-memory database with table `t`, whose `parent` is a deferred
    /// foreign key (checked only at `COMMIT`).
    fn writer() -> Writer {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "PRAGMA foreign_keys = ON;
             CREATE TABLE t (id INTEGER PRIMARY KEY,
                             parent INTEGER REFERENCES t (id) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
        Writer::spawn(conn, Duration::from_secs(1)).unwrap()
    }

    /// Holds the writer thread until the returned sender is dropped or sent to, so that the
    /// changes queued meanwhile form one group.
    async fn hold(writer: &Writer) -> std::sync::mpsc::Sender<()> {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel();
        let tx = writer.tx.clone().unwrap();
        tx.send(Command::Solo(Box::new(move |_| {
            let _ = started.send(());
            let _ = wait.recv();
        })))
        .unwrap();
        running.await.unwrap();
        release
    }

    /// Polls `calls` once (which queues their commands), then lets the writer go, then waits.
    async fn queued_then<T>(
        calls: impl std::future::Future<Output = T>,
        release: std::sync::mpsc::Sender<()>,
    ) -> T {
        // `join` polls its first future before its second.
        futures::future::join(calls, async move { drop(release) })
            .await
            .0
    }

    async fn ids(writer: &Writer) -> Vec<i64> {
        writer
            .call(|c| {
                let mut stmt = c.prepare("SELECT id FROM t ORDER BY id").unwrap();
                let rows = stmt.query_map([], |r| r.get(0)).unwrap();
                Ok(rows.collect::<Result<Vec<i64>, _>>().unwrap())
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_failing_or_panicking_change_is_undone_alone_in_its_group() {
        let writer = writer();
        let release = hold(&writer).await;
        let calls = (1..=6).map(|id| {
            writer.write(move |c| {
                insert(c, id, None)?;
                match id {
                    3 => Err(StoreError::Backend("change 3 refuses".into())),
                    5 => panic!("change 5 panics"),
                    _ => Ok(id * 10),
                }
            })
        });
        let answers = queued_then(futures::future::join_all(calls), release).await;
        assert_eq!(answers[0].as_ref().unwrap(), &10);
        assert_eq!(answers[1].as_ref().unwrap(), &20);
        assert!(
            matches!(&answers[2], Err(StoreError::Backend(m)) if m == "change 3 refuses"),
            "{:?}",
            answers[2]
        );
        assert_eq!(answers[3].as_ref().unwrap(), &40);
        assert!(
            matches!(&answers[4], Err(StoreError::Backend(m)) if m.contains("panicked")),
            "{:?}",
            answers[4]
        );
        assert_eq!(answers[5].as_ref().unwrap(), &60);
        assert_eq!(ids(&writer).await, vec![1, 2, 4, 6]);
    }

    #[tokio::test]
    async fn a_failed_commit_fails_the_whole_group_and_the_writer_goes_on() {
        let writer = writer();
        let release = hold(&writer).await;
        // Change 1 breaks a deferred foreign key: each change succeeds, the COMMIT fails.
        let calls = (1..=4)
            .map(|id| writer.write(move |c| insert(c, id, (id == 1).then_some(99)).map(|()| id)));
        for answer in queued_then(futures::future::join_all(calls), release).await {
            assert!(
                matches!(&answer, Err(StoreError::Backend(m)) if m.contains("FOREIGN KEY")),
                "every change of the group must report the failed commit: {answer:?}"
            );
        }
        assert_eq!(ids(&writer).await, Vec::<i64>::new(), "nothing committed");
        // The writer is out of the failed transaction and serves the next change.
        assert_eq!(
            writer
                .write(|c| insert(c, 7, None).map(|()| 7))
                .await
                .unwrap(),
            7
        );
        assert_eq!(ids(&writer).await, vec![7]);
    }

    #[tokio::test]
    async fn a_lone_change_commits_and_a_solo_command_keeps_its_place_in_line() {
        let writer = writer();
        let release = hold(&writer).await;
        let first = writer.write(|c| insert(c, 1, None));
        let seen = writer.call(|c| {
            Ok(
                c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
                    .unwrap(),
            )
        });
        let second = writer.write(|c| insert(c, 2, None));
        let (first, seen, second) =
            queued_then(futures::future::join3(first, seen, second), release).await;
        first.unwrap();
        second.unwrap();
        assert_eq!(
            seen.unwrap(),
            1,
            "the solo command ran after the first change only"
        );
        assert_eq!(ids(&writer).await, vec![1, 2]);
    }
}
