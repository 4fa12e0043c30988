//! Live events.
//!
//! One task per server (the *tail*) reads job events from the store in id order and fans them out
//! on a bounded broadcast channel; fleet events (live only) come from the engine's channel. Each
//! SSE / WebSocket client:
//!
//! 1. subscribes to the hub first,
//! 2. replays from the store everything after its resume point (`Last-Event-ID` / `?after=`),
//! 3. then forwards live events, skipping ids it already sent.
//!
//! Because the store is the source of truth, a client that falls behind the bounded buffer
//! (`Lagged`) is told so (`event: lagged`) and replays the gap from the store: nothing is lost,
//! and neither the engine nor other clients ever wait for a slow reader. Reading the store once
//! per wake-up in the tail (not once per client) keeps a thousand idle subscribers cheap, and the
//! tail's periodic poll picks up events written by other processes sharing the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use comfyfleet::Engine;
use comfyfleet_core::{Event, EventQuery, FleetEvent, JobId, TaskStore};
use futures::Stream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Page size for store reads.
const PAGE: u32 = 500;

/// How often an idle client stream re-reads the store as a backstop.
const RECHECK: Duration = Duration::from_secs(15);

/// A stored job event with its JSON, serialized once for every client.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) event: Event,
    pub(crate) json: String,
}

impl Published {
    fn new(event: Event) -> Published {
        let json = serde_json::to_string(&event).unwrap_or_else(|e| {
            tracing::error!(error = %e, "an event did not serialize");
            "{}".to_owned()
        });
        Published { event, json }
    }
}

/// What flows to clients.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    /// A stored job event.
    Job(Arc<Published>),
    /// A live fleet event.
    Fleet(Arc<FleetEvent>),
    /// The client fell behind; what it missed follows (replayed from the store).
    Lagged(u64),
}

/// The fan-out point: one channel for the global stream, and one per followed job so that a
/// client following one job is never woken by the others' events (a thousand idle followers
/// cost nothing while other jobs run).
pub(crate) struct Hub {
    tx: broadcast::Sender<Item>,
    jobs: Mutex<HashMap<JobId, broadcast::Sender<Item>>>,
    capacity: usize,
    /// Highest event id published by the tail.
    published: AtomicU64,
}

impl Hub {
    pub(crate) fn new(capacity: usize) -> Arc<Hub> {
        let capacity = capacity.max(16);
        let (tx, _) = broadcast::channel(capacity);
        Arc::new(Hub {
            tx,
            jobs: Mutex::new(HashMap::new()),
            capacity,
            published: AtomicU64::new(0),
        })
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, broadcast::Sender<Item>>> {
        // A map of channels; a panic elsewhere cannot leave it inconsistent.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to everything, or to one job's events.
    pub(crate) fn subscribe(&self, job: Option<JobId>) -> broadcast::Receiver<Item> {
        match job {
            None => self.tx.subscribe(),
            Some(id) => self
                .jobs()
                .entry(id)
                .or_insert_with(|| broadcast::channel(self.capacity.min(1024)).0)
                .subscribe(),
        }
    }

    fn publish(&self, p: Arc<Published>) {
        let job = p.event.job;
        let terminal = p.event.kind.terminal_state().is_some();
        {
            let mut jobs = self.jobs();
            if let Some(tx) = jobs.get(&job) {
                if tx.receiver_count() > 0 {
                    let _ = tx.send(Item::Job(p.clone()));
                }
                if terminal || tx.receiver_count() == 0 {
                    // Followers end at the terminal event; dropping the sender lets them drain
                    // what is buffered and then see the channel closed.
                    jobs.remove(&job);
                }
            }
        }
        let _ = self.tx.send(Item::Job(p));
    }

    /// Forgets per-job channels nobody listens to any more.
    fn sweep(&self) {
        self.jobs().retain(|_, tx| tx.receiver_count() > 0);
    }

    pub(crate) fn published(&self) -> u64 {
        self.published.load(Ordering::SeqCst)
    }

    pub(crate) fn subscribers(&self) -> usize {
        self.tx.receiver_count()
            + self
                .jobs()
                .values()
                .map(broadcast::Sender::receiver_count)
                .sum::<usize>()
    }
}

/// The largest event id in the store (0 when empty), found with O(log n) probes of
/// "is there an event after k?" — the trait has no "last id" query, and ids may have gaps.
pub(crate) async fn last_event_id(
    store: &dyn TaskStore,
) -> Result<u64, comfyfleet_core::StoreError> {
    let exists_after = |k: u64| async move {
        store
            .events(&EventQuery {
                job: None,
                after: Some(k),
                limit: 1,
            })
            .await
            .map(|v| v.first().map(|e| e.id))
    };
    let Some(first) = exists_after(0).await? else {
        return Ok(0);
    };
    // Gallop: `lo` is always an event id; stop at an `hi` with no event after it.
    let mut lo = first;
    let mut step = 1u64;
    let mut hi = loop {
        match exists_after(lo.saturating_add(step)).await? {
            Some(id) => {
                lo = id;
                step = step.saturating_mul(2);
            }
            None => break lo.saturating_add(step),
        }
    };
    // Binary search: the last id is in [lo, hi].
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        match exists_after(mid - 1).await? {
            Some(id) => lo = id,
            None => hi = mid - 1,
        }
    }
    Ok(lo)
}

/// Sets where the tail starts (the store's last event id, read before the server accepts
/// connections, so no client sees a half-initialised hub).
pub(crate) fn start_at(hub: &Hub, last: u64) {
    hub.published.store(last, Ordering::SeqCst);
}

/// The tail: store → hub in id order, woken by the engine's notifications and a poll. Starts
/// after [`start_at`].
pub(crate) async fn run_tail(
    engine: Engine,
    hub: Arc<Hub>,
    poll: Duration,
    on_event: impl Fn(&Event) + Send + 'static,
    stop: CancellationToken,
) {
    let store = engine.store().clone();
    let mut rx = engine.subscribe();
    let mut cursor = hub.published();
    loop {
        // Drain the store.
        loop {
            let page = match store
                .events(&EventQuery {
                    job: None,
                    after: Some(cursor),
                    limit: PAGE,
                })
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "event tail: store read failed; retrying");
                    break;
                }
            };
            let n = page.len();
            for e in page {
                cursor = cursor.max(e.id);
                on_event(&e);
                hub.published.store(cursor, Ordering::SeqCst);
                hub.publish(Arc::new(Published::new(e)));
            }
            if n < PAGE as usize {
                break;
            }
        }
        hub.sweep();
        // Wait for news.
        let deadline = tokio::time::sleep(poll);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut deadline => break,
                r = rx.recv() => match r {
                    Ok(FleetEvent::Job(_)) => break,
                    Ok(other) => { let _ = hub.tx.send(Item::Fleet(Arc::new(other))); }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        // The engine is gone; keep polling for other writers until stopped.
                        rx = engine.subscribe();
                        break;
                    }
                }
            }
        }
    }
}

/// Which events a client wants.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Selector {
    /// One job, or all.
    pub(crate) job: Option<JobId>,
    /// Resume after this id; `None`: a job stream starts at the job's first event, the global
    /// stream at "now".
    pub(crate) after: Option<u64>,
}

/// A client's stream: replay, then live. A per-job stream ends after the job's terminal event.
pub(crate) fn client_stream(
    store: Arc<dyn TaskStore>,
    hub: Arc<Hub>,
    sel: Selector,
    stop: CancellationToken,
) -> impl Stream<Item = Item> + Send + 'static {
    async_stream::stream! {
        let mut rx = hub.subscribe(sel.job);
        let mut cursor = match (sel.after, sel.job) {
            (Some(a), _) => a,
            (None, Some(_)) => 0,
            (None, None) => hub.published(),
        };
        let mut replay = true;
        let mut final_pass = false;
        loop {
            if replay {
                replay = false;
                loop {
                    let query = EventQuery { job: sel.job, after: Some(cursor), limit: PAGE };
                    let page = tokio::select! {
                        _ = stop.cancelled() => return,
                        p = store.events(&query) => p,
                    };
                    let page = match page {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(error = %e, "event stream: store read failed; ending the stream");
                            return;
                        }
                    };
                    let n = page.len();
                    for e in page {
                        cursor = cursor.max(e.id);
                        let terminal = sel.job.is_some() && e.kind.terminal_state().is_some();
                        yield Item::Job(Arc::new(Published::new(e)));
                        if terminal {
                            return;
                        }
                    }
                    if n < PAGE as usize {
                        break;
                    }
                }
                // The job ended (or we resumed after its end)? Its terminal event is written
                // with the state, so one more pass over the store picks up anything written
                // since the reads above, and then the stream is complete.
                if let Some(job) = sel.job {
                    match store.get(job).await {
                        Ok(Some(j)) if j.state.is_terminal() => {
                            if final_pass {
                                return;
                            }
                            final_pass = true;
                            replay = true;
                            continue;
                        }
                        Ok(None) => return,
                        _ => {}
                    }
                }
            }
            // Besides live events, re-read the store now and then: a backstop for anything the
            // hub did not carry (another process's writes between polls, a missed wake-up).
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.recv() => r,
                _ = tokio::time::sleep(RECHECK) => {
                    replay = true;
                    continue;
                }
            };
            match next {
                Ok(Item::Job(p)) => {
                    let e = &p.event;
                    if e.id <= cursor || sel.job.is_some_and(|j| j != e.job) {
                        continue;
                    }
                    cursor = e.id;
                    let terminal = sel.job.is_some() && e.kind.terminal_state().is_some();
                    yield Item::Job(p);
                    if terminal {
                        return;
                    }
                }
                Ok(Item::Fleet(f)) => {
                    if sel.job.is_none() {
                        yield Item::Fleet(f);
                    }
                }
                Ok(Item::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    yield Item::Lagged(n);
                    replay = true;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    // A job's channel closes after its terminal event, and the hub's when the
                    // server stops. For a job: whatever was stored meanwhile is replayed, and a
                    // fresh channel is taken for anything later.
                    if sel.job.is_none() {
                        return;
                    }
                    rx = hub.subscribe(sel.job);
                    replay = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comfyfleet_core::{JobSpec, MemoryStore, NewJob, Timestamp, Workflow};
    use serde_json::json;

    async fn store_with(n: usize) -> MemoryStore {
        let s = MemoryStore::new();
        let wf = Workflow::from_value(json!({"1": {"class_type": "A"}})).unwrap();
        for _ in 0..n {
            s.enqueue(
                NewJob::new(JobSpec::new(wf.clone())),
                Timestamp::from_millis(1),
            )
            .await
            .unwrap();
        }
        s
    }

    #[tokio::test]
    async fn last_event_id_finds_the_maximum() {
        for n in [0usize, 1, 2, 3, 7, 64, 100, 257] {
            let s = store_with(n).await;
            let all = s
                .events(&EventQuery {
                    job: None,
                    after: None,
                    limit: 1000,
                })
                .await
                .unwrap();
            let want = all.iter().map(|e| e.id).max().unwrap_or(0);
            assert_eq!(last_event_id(&s).await.unwrap(), want, "n = {n}");
        }
    }
}
