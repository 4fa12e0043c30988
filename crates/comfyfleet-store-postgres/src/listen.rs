//! The wake-up hint behind [`TaskStore::changes`](comfyfleet_core::TaskStore::changes): one
//! `LISTEN` connection per store, feeding a `watch` counter.
//!
//! Notifications are not durable, so the counter also moves after every reconnect (whatever
//! was sent while the connection was down is lost); callers keep polling either way.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// A running listener task.
#[derive(Debug)]
pub(crate) struct Listener {
    rx: watch::Receiver<u64>,
    task: AbortHandle,
}

impl Listener {
    /// Starts listening on `channel` on the runtime `rt`.
    pub(crate) fn start(
        rt: &tokio::runtime::Handle,
        pool: PgPool,
        channel: String,
        redacted: String,
    ) -> Listener {
        let (tx, rx) = watch::channel(0u64);
        let task = rt.spawn(run(pool, channel, redacted, tx)).abort_handle();
        Listener { rx, task }
    }

    /// A new receiver of the counter.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.rx.clone()
    }

    /// Stops the task (its connection goes back to the pool and is closed with it).
    pub(crate) fn stop(self) {
        self.task.abort();
    }
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|v| *v = v.wrapping_add(1));
}

async fn run(pool: PgPool, channel: String, redacted: String, tx: watch::Sender<u64>) {
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        let mut listener = match listener {
            Ok(l) => l,
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(url = %redacted, %channel, error = %e,
                    "cannot listen for wake-ups; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if !first {
            // Anything sent while we were not listening is lost: wake the callers once.
            bump(&tx);
        }
        first = false;
        backoff = Duration::from_millis(100);
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => bump(&tx),
                // The connection dropped and was re-established (sqlx re-LISTENs): some
                // notifications may be lost.
                Ok(None) => bump(&tx),
                Err(sqlx::Error::PoolClosed) => return,
                Err(e) => {
                    tracing::warn!(url = %redacted, %channel, error = %e,
                        "wake-up listener failed; reconnecting");
                    break;
                }
            }
        }
        drop(listener);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
