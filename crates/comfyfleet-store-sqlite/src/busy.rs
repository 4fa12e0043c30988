//! Waiting for another connection's lock.
//!
//! SQLite's own busy-timeout handler backs off to sleeps of 100 ms, so a connection waiting for
//! the write lock that another connection keeps taking back to back (a second store on the
//! same file, in this process or another) may wait its whole timeout. This handler polls every
//! millisecond instead, until about the configured timeout has passed.
//!
//! The handler is a plain function, so the timeout lives in a thread-local that the code using
//! a connection sets on its own thread ([`set_timeout`]) before it runs statements.

use std::cell::Cell;
use std::time::Duration;

use rusqlite::Connection;

thread_local! {
    static TIMEOUT: Cell<Duration> = const { Cell::new(Duration::from_secs(5)) };
}

/// Sets how long connections used on this thread wait for a lock.
pub(crate) fn set_timeout(timeout: Duration) {
    TIMEOUT.set(timeout);
}

/// Installs the polling handler on `conn`, with `timeout` for this thread.
pub(crate) fn install(conn: &Connection, timeout: Duration) -> rusqlite::Result<()> {
    set_timeout(timeout);
    conn.busy_handler(Some(poll))
}

const POLL: Duration = Duration::from_millis(1);

fn poll(count: i32) -> bool {
    // `count` polls of about 1 ms each have been made for this lock.
    let waited = POLL * u32::try_from(count).unwrap_or(0);
    if waited >= TIMEOUT.get() {
        return false;
    }
    // Blocking is right here: SQLite calls this from inside a statement, and this crate runs
    // statements only on its writer thread or in `spawn_blocking`, never on the async runtime's
    // worker threads.
    std::thread::sleep(POLL);
    true
}
