//! A lease lost to a store hiccup must not make the old attempt stop the remote execution that
//! the job's new owner reattached to.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use comfyfleet_core::*;
use comfyfleet_engine::Engine;
use comfyfleet_testkit::{FakeBackend, workflows};

use crate::harness::{T0, config, strategy};

/// A store whose heartbeats fail while `broken` is set (a busy disk, a network blip).
struct FlakyHeartbeats {
    inner: Arc<MemoryStore>,
    broken: AtomicBool,
    /// This many `complete` and `fail` calls fail first (a database restarting).
    failing_writes: AtomicU32,
}

impl FlakyHeartbeats {
    fn write_fails(&self) -> bool {
        self.failing_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[async_trait]
impl TaskStore for FlakyHeartbeats {
    async fn enqueue(&self, j: NewJob, now: Timestamp) -> Result<Enqueued, StoreError> {
        self.inner.enqueue(j, now).await
    }
    async fn claim(
        &self,
        o: &str,
        t: Duration,
        now: Timestamp,
    ) -> Result<Option<Claimed>, StoreError> {
        self.inner.claim(o, t, now).await
    }
    async fn heartbeat(
        &self,
        l: &Lease,
        t: Duration,
        now: Timestamp,
    ) -> Result<HeartbeatAck, StoreError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("database is locked".into()));
        }
        self.inner.heartbeat(l, t, now).await
    }
    async fn release(
        &self,
        l: &Lease,
        r: Timestamp,
        why: &str,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.release(l, r, why, now).await
    }
    async fn start_attempt(
        &self,
        l: &Lease,
        s: AttemptStart,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.start_attempt(l, s, now).await
    }
    async fn update_attempt(
        &self,
        l: &Lease,
        u: AttemptUpdate,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.update_attempt(l, u, now).await
    }
    async fn complete(
        &self,
        l: &Lease,
        c: Completion,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        if self.write_fails() {
            return Err(StoreError::Backend("connection refused".into()));
        }
        self.inner.complete(l, c, now).await
    }
    async fn fail(&self, l: &Lease, f: Failure, now: Timestamp) -> Result<Vec<Event>, StoreError> {
        if self.write_fails() {
            return Err(StoreError::Backend("connection refused".into()));
        }
        self.inner.fail(l, f, now).await
    }
    async fn cancel(&self, id: JobId, r: &str, now: Timestamp) -> Result<CancelResult, StoreError> {
        self.inner.cancel(id, r, now).await
    }
    async fn force_cancel(
        &self,
        id: JobId,
        r: &str,
        now: Timestamp,
    ) -> Result<CancelResult, StoreError> {
        self.inner.force_cancel(id, r, now).await
    }
    async fn ack_cancel(
        &self,
        l: &Lease,
        s: Vec<CancelStep>,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.ack_cancel(l, s, now).await
    }
    async fn detach(&self, l: &Lease, now: Timestamp) -> Result<Vec<Event>, StoreError> {
        self.inner.detach(l, now).await
    }
    async fn reap(&self, o: &ReapOptions, now: Timestamp) -> Result<ReapReport, StoreError> {
        self.inner.reap(o, now).await
    }
    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self, f: &JobFilter) -> Result<JobPage, StoreError> {
        self.inner.list(f).await
    }
    async fn counts(&self) -> Result<StateCounts, StoreError> {
        self.inner.counts().await
    }
    async fn events(&self, q: &EventQuery) -> Result<Vec<Event>, StoreError> {
        self.inner.events(q).await
    }
    async fn prune(&self, b: Timestamp) -> Result<u64, StoreError> {
        self.inner.prune(b).await
    }
    async fn backup(&self, d: &Path) -> Result<(), StoreError> {
        self.inner.backup(d).await
    }
    async fn try_lead(&self, o: &str, t: Duration, now: Timestamp) -> Result<bool, StoreError> {
        self.inner.try_lead(o, t, now).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_does_not_stop_the_run_the_new_owner_reattached() {
    let gpu = FakeBackend::builder("gpu").capacity(2).ticks(120).build();
    let mem = Arc::new(MemoryStore::new());
    let flaky = Arc::new(FlakyHeartbeats {
        inner: mem.clone(),
        broken: AtomicBool::new(false),
        failing_writes: AtomicU32::new(0),
    });
    let clock = Arc::new(TokioClock::starting_at(Timestamp::from_millis(T0)));
    let build = |store: Arc<dyn TaskStore>, owner: &str| {
        let e = Engine::builder(store, strategy())
            .backend(gpu.clone() as Arc<dyn Backend>)
            .config(comfyfleet_engine::EngineConfig {
                owner: owner.into(),
                ..config()
            })
            .clock(clock.clone())
            .build()
            .unwrap();
        e.start();
        e
    };
    let first = build(flaky.clone(), "first");
    let id = first
        .submit(JobSpec::new(workflows::sleep(120.0)))
        .await
        .unwrap();
    let mut rx = first.subscribe();
    loop {
        if let Ok(FleetEvent::Job(e)) = rx.recv().await
            && e.job == id
            && e.kind.name() == "progress"
        {
            break;
        }
    }
    // The first engine's heartbeats start failing; a second engine joins the fleet.
    flaky.broken.store(true, Ordering::SeqCst);
    first.drain(&BackendId::new("gpu")).unwrap(); // it takes no new work: the second engine will
    let second = build(mem.clone(), "second");
    let job = tokio::time::timeout(Duration::from_secs(3600), second.wait_for(id))
        .await
        .unwrap()
        .unwrap();
    flaky.broken.store(false, Ordering::SeqCst);
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert!(job.crash_requeues >= 1, "the lease did expire");
    assert!(
        job.attempts.iter().skip(1).all(|a| a.reattached),
        "{:?}",
        job.attempts
    );
    let stats = gpu.stats();
    assert_eq!(stats.submitted, 1, "never submitted again");
    assert_eq!(
        stats.cancels, 0,
        "the old attempt did not stop the reattached run"
    );
    assert_eq!(stats.succeeded, 1);
}

/// A database that is down when the run ends (restarting): the engine retries the final write
/// with backoff instead of leaving the job to the reaper, so it is not run again.
#[tokio::test(start_paused = true)]
async fn a_final_write_during_a_database_outage_is_retried_and_nothing_runs_twice() {
    let gpu = FakeBackend::builder("gpu").build();
    let mem = Arc::new(MemoryStore::new());
    let flaky = Arc::new(FlakyHeartbeats {
        inner: mem.clone(),
        broken: AtomicBool::new(false),
        failing_writes: AtomicU32::new(6),
    });
    let engine = Engine::builder(flaky.clone(), strategy())
        .backend(gpu.clone() as Arc<dyn Backend>)
        .config(config())
        .clock(Arc::new(TokioClock::starting_at(Timestamp::from_millis(
            T0,
        ))))
        .build()
        .unwrap();
    engine.start();
    let id = engine
        .submit(JobSpec::new(workflows::invert()))
        .await
        .unwrap();
    let job = tokio::time::timeout(Duration::from_secs(3600), engine.wait_for(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(
        flaky.failing_writes.load(Ordering::SeqCst),
        0,
        "the outage was hit"
    );
    assert_eq!(job.attempts.len(), 1, "{:?}", job.attempts);
    assert_eq!(job.crash_requeues, 0);
    assert_eq!(gpu.stats().submitted, 1, "never submitted again");
    engine.shutdown(Duration::from_secs(1)).await;
}
