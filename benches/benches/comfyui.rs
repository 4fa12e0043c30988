//! The ComfyUI backend over real loopback HTTP/WebSocket against `ComfyUiSim`.
//!
//! * `completion/healthy_socket` and `completion/silent_socket` — one zero-work prompt
//!   (`EmptyImage → ImageInvert → SaveImage`), submit → terminal event seen by the backend
//!   (outputs downloaded and checksummed included). The simulator's own work is the same in
//!   both; the difference is how completion is detected: pushed over the socket, or found by
//!   the `/api/queue` + `/api/history` checks when the socket says nothing.
//! * `engine_e2e/4_sims` — jobs/s through Engine + MemoryStore + 4 `ComfyUiBackend`s on 4
//!   zero-time simulators (batches of 100).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use comfyfleet_comfyui::{ComfyUiBackend, ComfyUiConfig};
use comfyfleet_core::{Backend, ExecutionEvent, JobId, JobSpec, MemoryStore, SubmitRequest};
use comfyfleet_engine::{Engine, EngineConfig, SmartFailover};
use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, SimConfig};
use comfyfleet_testkit::workflows;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;

fn backend(id: &str, sim: &ComfyUiSim) -> ComfyUiBackend {
    ComfyUiBackend::new(ComfyUiConfig::new(id, sim.base_url().parse().unwrap())).unwrap()
}

async fn one_prompt(b: &ComfyUiBackend, n: u64) {
    // A unique prefix per run: identical prompts would be served from ComfyUI's cache.
    let w = workflows::sleep_with_prefix(0.0, &format!("bench_{n}"));
    let mut exec = b
        .submit(SubmitRequest {
            job: JobId::new(),
            attempt: 1,
            workflow: w,
            uploads: Vec::new(),
        })
        .await
        .unwrap();
    while let Some(ev) = exec.events.next().await {
        if let ExecutionEvent::Succeeded { .. } = ev {
            return;
        }
        assert!(!ev.is_terminal(), "{ev:?}");
    }
    panic!("stream ended without success");
}

fn comfyui(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("completion");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(8));
    for (name, silent) in [("healthy_socket", false), ("silent_socket", true)] {
        let (sim, b) = rt.block_on(async {
            let mut cfg = SimConfig::scaled(0.0001);
            cfg.faults.silent_websocket = silent;
            let sim = ComfyUiSim::start(cfg).await.unwrap();
            let b = backend("gpu", &sim);
            tokio::time::sleep(Duration::from_millis(200)).await; // socket connected
            (sim, b)
        });
        let counter = std::sync::atomic::AtomicU64::new(0);
        g.bench_function(BenchmarkId::new(name, "invert"), |bench| {
            bench.to_async(&rt).iter(|| {
                one_prompt(
                    &b,
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                )
            });
        });
        rt.block_on(async move {
            drop(b);
            sim.shutdown().await;
        });
    }
    g.finish();

    let mut g = c.benchmark_group("engine_e2e");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(15));
    let batch = 100u64;
    g.throughput(Throughput::Elements(batch));
    let sims: Vec<ComfyUiSim> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(ComfyUiSim::start(SimConfig::scaled(0.0001)).await.unwrap());
        }
        v
    });
    let counter = std::sync::atomic::AtomicU64::new(0);
    g.bench_function(BenchmarkId::new("4_sims", batch), |bench| {
        bench.to_async(&rt).iter(|| async {
            let engine = Engine::builder(
                Arc::new(MemoryStore::new()),
                Arc::new(SmartFailover::default()),
            )
            .backends(
                sims.iter()
                    .enumerate()
                    .map(|(i, s)| Arc::new(backend(&format!("gpu-{i}"), s)) as Arc<dyn Backend>),
            )
            .config(EngineConfig {
                idle_poll: Duration::from_secs(10),
                ..EngineConfig::default()
            })
            .build()
            .unwrap();
            engine.start();
            let mut ids = Vec::new();
            for _ in 0..batch {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                ids.push(
                    engine
                        .submit(JobSpec::new(workflows::sleep_with_prefix(
                            0.0,
                            &format!("e2e_{n}"),
                        )))
                        .await
                        .unwrap(),
                );
            }
            for id in ids {
                let job = engine.wait_for(id).await.unwrap();
                assert_eq!(
                    job.state,
                    comfyfleet_core::JobState::Succeeded,
                    "{:?}",
                    job.error
                );
            }
            engine.shutdown(Duration::from_secs(5)).await;
        });
    });
    g.finish();
}

criterion_group!(benches, comfyui);
criterion_main!(benches);
