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

type Command = Box<dyn FnOnce(&mut Connection) + Send>;

/// The writer thread: takes closures over a channel and runs them, one at a time, on its
/// connection.
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
                while let Ok(cmd) = rx.recv() {
                    // A panicking command drops its reply sender (its caller gets an error) and
                    // its transaction (rolled back by `Transaction`'s drop); keep serving.
                    if std::panic::catch_unwind(AssertUnwindSafe(|| cmd(&mut conn))).is_err() {
                        tracing::error!(
                            "a SQLite store command panicked; its change was rolled back"
                        );
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

    /// Runs `f` on the writer connection and waits (asynchronously) for its answer.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let stopped = || StoreError::Backend("the SQLite store is closed".into());
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        tx.send(Box::new(move |conn| {
            // The caller may have given up waiting; the work is done either way.
            let _ = reply.send(f(conn));
        }))
        .map_err(|_| stopped())?;
        answer.await.map_err(|_| {
            StoreError::Backend(
                "the SQLite writer dropped the request (it panicked; see the log); nothing was \
                 changed"
                    .into(),
            )
        })?
    }

    /// Stops the thread after the queued commands and waits for it to close the database.
    pub(crate) fn shutdown(&mut self) -> Option<JoinHandle<()>> {
        self.tx = None;
        self.thread.take()
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
