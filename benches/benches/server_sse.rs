//! Live-event fan-out cost: job throughput through the service while SSE clients are connected.
//!
//! One engine (MemoryStore, four zero-time fake backends of capacity 4) behind a
//! `comfyfleet-server` on loopback, on a 2-worker runtime shared with the clients. One iteration
//! submits a batch of [`BATCH`] jobs with `engine.submit` and waits for all of them. Variants:
//!
//! * `no_subscribers`;
//! * `idle_1000` — 1,000 SSE clients each following one job that waits (it may only run on a
//!   drained backend), so they receive nothing while the batch runs: the cost of being there;
//! * `global_1000` — 1,000 SSE clients on the global stream, each reading (and discarding)
//!   every event of the batch: the worst case of a thousand dashboards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use comfyfleet_core::{Backend, BackendId, JobSpec, MemoryStore};
use comfyfleet_engine::{Engine, EngineConfig, SmartFailover};
use comfyfleet_server::{Server, ServerConfig};
use comfyfleet_testkit::{FakeBackend, workflows};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const BATCH: u64 = 200;
const SUBSCRIBERS: usize = 1000;

#[derive(Clone, Copy, Debug)]
enum Subs {
    None,
    Idle,
    Global,
}

struct Setup {
    engine: Engine,
    server: Option<Server>,
    _clients: Vec<tokio::task::JoinHandle<()>>,
}

async fn setup(subs: Subs) -> Setup {
    let fakes: Vec<Arc<dyn Backend>> = (0..4)
        .map(|i| {
            FakeBackend::builder(&format!("fake-{i}"))
                .capacity(4)
                .build() as Arc<dyn Backend>
        })
        .chain(std::iter::once(
            FakeBackend::builder("held").build() as Arc<dyn Backend>
        ))
        .collect();
    let engine = Engine::builder(
        Arc::new(MemoryStore::new()),
        Arc::new(SmartFailover::default()),
    )
    .backends(fakes)
    .config(EngineConfig {
        idle_poll: Duration::from_secs(10),
        health_interval: Duration::from_secs(3600),
        maintenance_interval: Duration::from_secs(3600),
        ..EngineConfig::default()
    })
    .build()
    .unwrap();
    engine.start();
    engine.drain(&BackendId::new("held")).unwrap();
    let server = Server::start(
        engine.clone(),
        ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let held = engine
        .submit(JobSpec::new(workflows::invert()).only_on([BackendId::new("held")]))
        .await
        .unwrap();
    let path = match subs {
        Subs::None => None,
        Subs::Idle => Some(format!("/v1/jobs/{held}/events/stream")),
        Subs::Global => Some("/v1/events".to_owned()),
    };
    let mut clients = Vec::new();
    if let Some(path) = path {
        for _ in 0..SUBSCRIBERS {
            let mut r = http
                .get(format!("{}{path}", server.url()))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            clients.push(tokio::spawn(async move {
                while let Ok(Some(_)) = r.chunk().await {}
            }));
        }
    }
    Setup {
        engine,
        server: Some(server),
        _clients: clients,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("server_sse");
    g.throughput(Throughput::Elements(BATCH));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    for subs in [Subs::None, Subs::Idle, Subs::Global] {
        let mut s = rt.block_on(setup(subs));
        let wf = workflows::invert();
        g.bench_function(BenchmarkId::new("batch", format!("{subs:?}")), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let engine = s.engine.clone();
                let wf = wf.clone();
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let mut ids = Vec::with_capacity(BATCH as usize);
                        for _ in 0..BATCH {
                            ids.push(engine.submit(JobSpec::new(wf.clone())).await.unwrap());
                        }
                        for id in ids {
                            engine.wait_for(id).await.unwrap();
                        }
                    }
                    start.elapsed()
                }
            })
        });
        rt.block_on(async {
            if let Some(server) = s.server.take() {
                server.shutdown().await;
            }
            s.engine.shutdown(Duration::from_secs(1)).await;
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
