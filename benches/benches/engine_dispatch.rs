//! Engine dispatch overhead: jobs per second through `Engine` + `MemoryStore` + zero-time
//! `FakeBackend`s, on a 2-worker multi-thread tokio runtime.
//!
//! Every node of the fake backends takes no time, so what is measured is the engine's own cost
//! per job: submit (validate + enqueue + publish), claim, `SmartFailover::pick`, start the
//! attempt, supervise the execution's event stream, the coalesced progress write, complete, and
//! the caller's `wait_for`. One iteration is a batch of [`BATCH`] jobs submitted back to back
//! and then awaited until every one is terminal; criterion reports elements (jobs) per second.
//!
//! Each iteration gets a fresh engine and store (built, started and warmed up with one job
//! outside the timed region), so the store does not grow across iterations.
//!
//! Variants:
//! * `fleet_4x4` — four fake backends of capacity 4 (16 slots);
//! * `serial_1x1` — one fake backend of capacity 1: pure per-job overhead, nothing overlaps
//!   on the backend side.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use comfyfleet_core::{Backend, JobSpec, JobState, MemoryStore, Workflow};
use comfyfleet_engine::{Engine, EngineConfig, SmartFailover, SmartFailoverConfig};
use comfyfleet_testkit::{FakeBackend, workflows};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Jobs per iteration.
const BATCH: u64 = 500;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Default clocks and timeouts, except that the dispatcher does not poll the store on its own
/// while idle: it is woken by submits and slot releases. (10 s rather than "never": a lost wake-up
/// would show up as a 10 s outlier instead of a hung bench.) Health checks and maintenance tick
/// once at start (their first interval tick is immediate) and not again within a batch.
fn config() -> EngineConfig {
    EngineConfig {
        owner: "bench-engine".into(),
        idle_poll: Duration::from_secs(10),
        health_interval: Duration::from_secs(3600),
        maintenance_interval: Duration::from_secs(3600),
        ..EngineConfig::default()
    }
}

/// A started engine over a fresh store and `backends` fakes of `capacity`, warmed up by one job.
async fn engine(backends: usize, capacity: u32, workflow: &Workflow) -> Engine {
    let strategy = Arc::new(SmartFailover::new(SmartFailoverConfig {
        seed: Some(7),
        ..SmartFailoverConfig::default()
    }));
    let fakes = (0..backends).map(|i| {
        FakeBackend::builder(&format!("fake-{i}"))
            .capacity(capacity)
            .build() as Arc<dyn Backend>
    });
    let engine = Engine::builder(Arc::new(MemoryStore::new()), strategy)
        .backends(fakes)
        .config(config())
        .build()
        .expect("engine");
    engine.start();
    let id = engine.submit(JobSpec::new(workflow.clone())).await.unwrap();
    let job = engine.wait_for(id).await.unwrap();
    assert_eq!(
        job.state,
        JobState::Succeeded,
        "warm-up job: {:?}",
        job.error
    );
    engine
}

/// Submits `n` jobs, then waits for each to be terminal. Returns the time it took.
async fn batch(engine: &Engine, workflow: &Workflow, n: u64) -> Duration {
    let start = Instant::now();
    let mut ids = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        ids.push(engine.submit(JobSpec::new(workflow.clone())).await.unwrap());
    }
    let mut failed = 0u32;
    for id in ids {
        let job = engine.wait_for(id).await.unwrap();
        if job.state != JobState::Succeeded {
            failed += 1;
        }
    }
    let elapsed = start.elapsed();
    // A correctness check, not a timing assertion: zero-time fakes never fail.
    assert_eq!(failed, 0, "jobs failed in the batch");
    elapsed
}

fn engine_dispatch(c: &mut Criterion) {
    let rt = runtime();
    let workflow = workflows::invert();
    let mut group = c.benchmark_group("engine_dispatch");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.warm_up_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(BATCH));

    for (name, backends, capacity) in [("fleet_4x4", 4, 4), ("serial_1x1", 1, 1)] {
        group.bench_with_input(BenchmarkId::new(name, BATCH), &BATCH, |b, &n| {
            b.to_async(&rt).iter_custom(|iters| {
                let workflow = workflow.clone();
                async move {
                    // Run the whole iteration on the runtime's two workers (the bench thread
                    // only waits), so the submitting client shares the 2 cores with the engine.
                    tokio::spawn(async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let engine = engine(backends, capacity, &workflow).await;
                            total += batch(&engine, &workflow, n).await;
                            engine.shutdown(Duration::from_secs(5)).await;
                        }
                        total
                    })
                    .await
                    .expect("bench task")
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, engine_dispatch);
criterion_main!(benches);
