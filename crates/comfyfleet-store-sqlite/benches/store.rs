//! `SqliteStore` benchmarks (release: `cargo bench -p comfyfleet-store-sqlite`).
//!
//! * `cycle/*`: one job's whole path through the store — enqueue, claim, start_attempt,
//!   complete (4 write transactions) — on a file database, per `synchronous` setting.
//! * `list_100k/*`: one `list` page (100 jobs) with a filter, on a store of 100,000 jobs.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use comfyfleet_core::{
    AttemptOutcome, AttemptStart, BackendId, Completion, ExecutionError, Failure, JobFilter,
    JobSpec, JobState, NewJob, TaskStore, Timestamp, Workflow,
};
use comfyfleet_store_sqlite::{SqliteOptions, SqliteStore, Synchronous};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const TTL: Duration = Duration::from_secs(30);

fn spec() -> JobSpec {
    JobSpec::new(
        Workflow::from_json(
            r#"{
                "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
                "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}
            }"#,
        )
        .unwrap(),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn start() -> AttemptStart {
    AttemptStart {
        backend: BackendId::new("gpu-1"),
        remote: None,
        reattached: false,
        skipped: Vec::new(),
        phase: None,
        capacity: None,
    }
}

fn cycle(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("cycle");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(8));
    for (name, sync) in [
        (
            "enqueue_claim_start_complete/sync_normal",
            Synchronous::Normal,
        ),
        ("enqueue_claim_start_complete/sync_full", Synchronous::Full),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = rt
            .block_on(SqliteStore::open_with(
                dir.path().join("bench.db"),
                SqliteOptions::default().synchronous(sync),
            ))
            .unwrap();
        let now = Timestamp::from_millis(1_700_000_000_000);
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                store.enqueue(NewJob::new(spec()), now).await.unwrap();
                let claimed = store.claim("bench", TTL, now).await.unwrap().unwrap();
                store
                    .start_attempt(&claimed.lease, start(), now)
                    .await
                    .unwrap();
                black_box(
                    store
                        .complete(&claimed.lease, Completion::default(), now)
                        .await
                        .unwrap(),
                );
            })
        });
        rt.block_on(store.close());
    }
    group.finish();
}

fn list_100k(c: &mut Criterion) {
    const N: usize = 100_000;
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = rt
        .block_on(SqliteStore::open_with(
            dir.path().join("bench.db"),
            SqliteOptions::default().synchronous(Synchronous::Off),
        ))
        .unwrap();
    let base = 1_700_000_000_000;
    rt.block_on(async {
        for chunk in 0..N / 5_000 {
            let batch = (0..5_000)
                .map(|i| {
                    let n = chunk * 5_000 + i;
                    let mut s = spec().label("project", format!("p{}", n % 10));
                    if n % 1_000 == 7 {
                        s = s.label("tier", "gold");
                    }
                    NewJob::new(s)
                })
                .collect();
            store
                .enqueue_many(batch, Timestamp::from_millis(base + (chunk * 5_000) as i64))
                .await
                .unwrap();
        }
        let now = Timestamp::from_millis(base + N as i64);
        for k in 0..600 {
            let cl = store.claim("e", TTL, now).await.unwrap().unwrap();
            store.start_attempt(&cl.lease, start(), now).await.unwrap();
            if k % 2 == 0 {
                store
                    .complete(&cl.lease, Completion::default(), now)
                    .await
                    .unwrap();
            } else {
                let failure = Failure {
                    error: ExecutionError::backend_specific(format!("CUDA out of memory {k}")),
                    outcome: AttemptOutcome::Failed,
                    nodes: Vec::new(),
                    retry_at: None,
                    cancel_steps: Vec::new(),
                };
                store.fail(&cl.lease, failure, now).await.unwrap();
            }
        }
        store.checkpoint().await.unwrap();
    });
    let mid = Timestamp::from_millis(base + (N / 2) as i64);
    let filters = [
        ("no_filter", JobFilter::default()),
        (
            "state_failed",
            JobFilter {
                states: vec![JobState::Failed],
                ..JobFilter::default()
            },
        ),
        (
            "states_pending_failed",
            JobFilter {
                states: vec![JobState::Pending, JobState::Failed],
                ..JobFilter::default()
            },
        ),
        (
            "label_project_p3",
            JobFilter {
                label: Some(("project".into(), "p3".into())),
                ..JobFilter::default()
            },
        ),
        (
            "label_tier_gold",
            JobFilter {
                label: Some(("tier".into(), "gold".into())),
                ..JobFilter::default()
            },
        ),
        (
            "backend_gpu_1",
            JobFilter {
                backend: Some(BackendId::new("gpu-1")),
                ..JobFilter::default()
            },
        ),
        (
            "created_window_10k",
            JobFilter {
                created_after: Some(mid),
                created_before: Some(Timestamp::from_millis(mid.as_millis() + 10_000)),
                ..JobFilter::default()
            },
        ),
        (
            "error_contains",
            JobFilter {
                error_contains: Some("out of MEMORY".into()),
                ..JobFilter::default()
            },
        ),
    ];
    let mut group = c.benchmark_group("list_100k");
    group.measurement_time(Duration::from_secs(3));
    for (name, filter) in filters {
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(store.list(&filter).await.unwrap()) })
        });
    }
    group.finish();
    rt.block_on(store.close());
}

criterion_group!(benches, cycle, list_100k);
criterion_main!(benches);
