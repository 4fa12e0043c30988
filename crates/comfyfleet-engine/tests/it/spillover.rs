//! Spill-over (issue #7, item 3): owned GPUs first, a `tier = cloud` backend only when the
//! expected local wait exceeds the threshold, within the cloud concurrency cap and budget.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use comfyfleet_core::{
    Artifact, Backend, BackendError, BackendId, ByteStream, CancelAck, Capabilities, EventKind,
    Execution, Health, Inventory, JobId, JobRecord, JobSpec, JobState, MemoryStore, RemoteRef,
    SubmitRequest, Timestamp, TokioClock, Upload,
};
use comfyfleet_engine::{Engine, SmartFailover, SmartFailoverConfig, SpillOver};
use comfyfleet_testkit::{FakeBackend, workflows};

use crate::harness::*;

/// A backend that reports extra inventory facts (the account's remaining budget).
struct WithFacts {
    inner: Arc<FakeBackend>,
    facts: Vec<(&'static str, &'static str)>,
}

#[async_trait]
impl Backend for WithFacts {
    fn id(&self) -> &BackendId {
        self.inner.id()
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn inventory(&self) -> Result<Inventory, BackendError> {
        let mut inv = self.inner.inventory().await?;
        for (k, v) in &self.facts {
            inv.facts.insert((*k).to_owned(), (*v).to_owned());
        }
        Ok(inv)
    }
    async fn health(&self) -> Health {
        self.inner.health().await
    }
    async fn submit(&self, request: SubmitRequest) -> Result<Execution, BackendError> {
        self.inner.submit(request).await
    }
    async fn cancel(&self, remote: &RemoteRef) -> Result<CancelAck, BackendError> {
        self.inner.cancel(remote).await
    }
    async fn reattach(&self, remote: &RemoteRef) -> Result<Option<Execution>, BackendError> {
        self.inner.reattach(remote).await
    }
    async fn upload(&self, upload: &Upload, bytes: Bytes) -> Result<(), BackendError> {
        self.inner.upload(upload, bytes).await
    }
    async fn fetch(&self, artifact: &Artifact) -> Result<ByteStream, BackendError> {
        self.inner.fetch(artifact).await
    }
}

fn spill(threshold_s: u64, max_cloud: u32, default_s: u64) -> SpillOver {
    SpillOver {
        threshold: Duration::from_secs(threshold_s),
        max_cloud_in_flight: max_cloud,
        min_budget: None,
        default_duration: Duration::from_secs(default_s),
    }
}

fn cloud(capacity: u32) -> Arc<FakeBackend> {
    FakeBackend::builder("rh")
        .label("tier", "cloud")
        .capacity(capacity)
        .build()
}

fn spill_harness(backends: Vec<Arc<dyn Backend>>, spill: SpillOver) -> Harness {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(TokioClock::starting_at(Timestamp::from_millis(T0)));
    let strategy = Arc::new(SmartFailover::new(SmartFailoverConfig {
        jitter: false,
        seed: Some(7),
        spill_over: Some(spill),
        ..SmartFailoverConfig::default()
    }));
    let engine = Engine::builder(store.clone(), strategy)
        .backends(backends)
        .config(config())
        .clock(clock.clone())
        .build()
        .unwrap();
    let rx = engine.subscribe();
    engine.start();
    Harness {
        engine,
        store,
        rx,
        clock,
    }
}

fn dyns(backends: &[Arc<FakeBackend>]) -> Vec<Arc<dyn Backend>> {
    backends
        .iter()
        .map(|b| b.clone() as Arc<dyn Backend>)
        .collect()
}

fn waiting_reasons(events: &[comfyfleet_core::Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Waiting { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

fn ran_on(job: &JobRecord) -> &str {
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.attempts.len(), 1, "one attempt");
    job.attempts[0].backend.as_str()
}

/// Runs one job to completion on the (idle) owned GPU so its duration is learned, then submits
/// a second one that occupies it; returns the second job's id.
async fn learn_then_occupy(h: &mut Harness, seconds: f64) -> JobId {
    let first = h.submit(JobSpec::new(workflows::sleep(seconds))).await;
    assert_eq!(ran_on(&h.finish(first).await), "gpu-a");
    let busy = h.submit(JobSpec::new(workflows::sleep(seconds))).await;
    h.wait_job_event(busy, "started").await;
    busy
}

#[tokio::test(start_paused = true)]
async fn an_idle_owned_gpu_runs_the_job_and_the_cloud_is_untouched() {
    let a = FakeBackend::builder("gpu-a").build();
    let rh = cloud(4);
    let h = spill_harness(dyns(&[a.clone(), rh.clone()]), spill(30, 4, 60));
    for _ in 0..3 {
        let id = h.submit(JobSpec::new(workflows::invert())).await;
        let job = h.finish(id).await;
        assert_eq!(ran_on(&job), "gpu-a");
        let skips = dispatched_skips(&h.events(id).await);
        assert!(
            skips
                .iter()
                .any(|s| s.starts_with("rh:") && s.contains("spill-over only")),
            "{skips:?}"
        );
    }
    assert_eq!(rh.stats().submitted, 0, "the cloud was never used");
    assert_eq!(a.stats().succeeded, 3);
}

#[tokio::test(start_paused = true)]
async fn a_long_expected_local_wait_spills_over_to_the_cloud_under_the_same_job_id() {
    let a = FakeBackend::builder("gpu-a").build();
    let rh = cloud(4);
    // The default duration (10 s) is below the threshold: only the learned one (100 s) spills.
    let mut h = spill_harness(dyns(&[a.clone(), rh.clone()]), spill(30, 2, 10));
    let busy = learn_then_occupy(&mut h, 100.0).await;

    let id = h.submit(JobSpec::new(workflows::sleep(100.0))).await;
    let job = h.finish(id).await;
    assert_eq!(job.id, id, "one id whichever backend runs it");
    assert_eq!(ran_on(&job), "rh");
    assert_eq!(rh.stats().jobs, vec![id], "the cloud saw exactly this job");
    let events = h.events(id).await;
    assert!(events.iter().all(|e| e.job == id));
    let skips = dispatched_skips(&events);
    assert!(
        skips.iter().any(|s| s.starts_with("gpu-a:")
            && s.contains("at capacity (1/1)")
            && s.contains("expected wait")
            && s.contains("spilled over to the cloud")
            && s.contains("exceeds the spill-over threshold 30s")),
        "{skips:?}"
    );
    // It did not wait for the busy GPU: it ran alongside.
    let busy = h.finish(busy).await;
    assert!(job.attempts[0].started_at.unwrap() < busy.attempts[0].ended_at.unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_short_expected_local_wait_waits_for_the_owned_gpu_and_never_uses_the_cloud() {
    let a = FakeBackend::builder("gpu-a").build();
    let rh = cloud(4);
    // Learned 20 s; default 600 s would spill, so the learned duration decides.
    let mut h = spill_harness(dyns(&[a.clone(), rh.clone()]), spill(30, 2, 600));
    let busy = learn_then_occupy(&mut h, 20.0).await;

    let id = h.submit(JobSpec::new(workflows::sleep(20.0))).await;
    let job = h.finish(id).await;
    assert_eq!(ran_on(&job), "gpu-a");
    assert_eq!(rh.stats().submitted, 0, "the cloud was never used");
    let busy = h.finish(busy).await;
    assert!(job.attempts[0].dispatched_at >= busy.attempts[0].ended_at.unwrap());
    let waits = waiting_reasons(&h.events(id).await);
    assert!(
        waits
            .iter()
            .any(|r| r.contains("within the spill-over threshold")),
        "{waits:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_burst_never_puts_more_than_the_cap_on_the_cloud() {
    let a = FakeBackend::builder("gpu-a").build();
    let rh = cloud(8);
    // Nothing learned: the default 60 s exceeds the 10 s threshold for every queued job.
    let h = spill_harness(dyns(&[a.clone(), rh.clone()]), spill(10, 2, 60));
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(h.submit(JobSpec::new(workflows::sleep(50.0))).await);
    }
    let mut cloud_runs = Vec::new();
    for id in &ids {
        let job = h.finish(*id).await;
        if ran_on(&job) == "rh" {
            let at = &job.attempts[0];
            cloud_runs.push((at.dispatched_at, at.ended_at.unwrap()));
        }
    }
    assert!(
        cloud_runs.len() >= 2,
        "the burst spilled over: {cloud_runs:?}"
    );
    assert!(cloud_runs.len() < ids.len(), "owned GPU used too");
    let most = cloud_runs
        .iter()
        .map(|(start, _)| {
            cloud_runs
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap();
    assert_eq!(most, 2, "at most max_cloud_in_flight on the cloud at once");
}

#[tokio::test(start_paused = true)]
async fn a_budget_below_the_minimum_keeps_jobs_off_the_cloud() {
    for (coins, expect_cloud) in [("5", false), ("500", true)] {
        let a = FakeBackend::builder("gpu-a").build();
        let rh = cloud(4);
        let wrapped: Arc<dyn Backend> = Arc::new(WithFacts {
            inner: rh.clone(),
            facts: vec![("remain_coins", coins)],
        });
        let cfg = SpillOver {
            min_budget: Some(100.0),
            ..spill(10, 2, 60)
        };
        let mut h = spill_harness(vec![a.clone() as Arc<dyn Backend>, wrapped], cfg);
        let busy = h.submit(JobSpec::new(workflows::sleep(100.0))).await;
        h.wait_job_event(busy, "started").await;
        let id = h.submit(JobSpec::new(workflows::sleep(100.0))).await;
        let job = h.finish(id).await;
        if expect_cloud {
            assert_eq!(ran_on(&job), "rh", "budget {coins} is enough");
            continue;
        }
        assert_eq!(ran_on(&job), "gpu-a");
        assert_eq!(rh.stats().submitted, 0, "no cloud below the minimum budget");
        let waits = waiting_reasons(&h.events(id).await);
        assert!(
            waits.iter().any(|r| r.contains("rh: spill-over wanted")
                && r.contains("budget 5 is below the minimum 100")),
            "{waits:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_job_only_the_cloud_can_run_goes_there_whatever_the_threshold() {
    let a = FakeBackend::builder("gpu-a").standard_nodes().build();
    let rh = cloud(2);
    let h = spill_harness(dyns(&[a.clone(), rh.clone()]), spill(3600, 1, 60));
    let id = h.submit(JobSpec::new(workflows::missing_node())).await;
    let job = h.finish(id).await;
    assert_eq!(ran_on(&job), "rh");
    assert_eq!(a.stats().submitted, 0);
    let skips = dispatched_skips(&h.events(id).await);
    assert!(
        skips
            .iter()
            .any(|s| s.starts_with("gpu-a: no node class FleetNoSuchNode")),
        "{skips:?}"
    );
    // The owned GPU still gets what it can run.
    let id = h.submit(JobSpec::new(workflows::invert())).await;
    assert_eq!(ran_on(&h.finish(id).await), "gpu-a");
}
