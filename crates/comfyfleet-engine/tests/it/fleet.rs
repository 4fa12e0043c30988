//! Several engines on one store (`shared_store`): a backend's capacity holds across all of them,
//! and one engine's blocks reach the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use comfyfleet_core::*;
use comfyfleet_engine::EngineConfig;
use comfyfleet_testkit::{FakeBackend, Fault, workflows};

use crate::harness::{Harness, config, harness_with};

fn engine_config(owner: &str, shared: bool) -> EngineConfig {
    EngineConfig {
        owner: owner.into(),
        shared_store: shared,
        ..config()
    }
}

/// Three engines, each with its own client objects for the same three backends (capacity 1).
fn fleet(store: &Arc<MemoryStore>, shared: bool) -> Vec<(Harness, Vec<Arc<FakeBackend>>)> {
    ["a", "b", "c"]
        .iter()
        .map(|owner| {
            let backends: Vec<Arc<FakeBackend>> = (1..=3)
                .map(|n| {
                    FakeBackend::builder(&format!("gpu-{n}"))
                        .node_duration(Duration::from_millis(700))
                        .build()
                })
                .collect();
            let h = harness_with(&backends, engine_config(owner, shared), store.clone());
            (h, backends)
        })
        .collect()
}

/// The most attempts any backend had open at one instant, from the stored attempts.
async fn max_overlap(store: &MemoryStore, ids: &[JobId]) -> u32 {
    let mut spans: HashMap<BackendId, Vec<(i64, i64)>> = HashMap::new();
    for id in ids {
        let job = store.get(*id).await.unwrap().unwrap();
        for a in &job.attempts {
            let end = a.ended_at.expect("every attempt ended").as_millis();
            spans
                .entry(a.backend.clone())
                .or_default()
                .push((a.dispatched_at.as_millis(), end));
        }
    }
    let mut worst = 0;
    for list in spans.values() {
        // Sweep: +1 at a start, -1 at an end; an end at the same instant as a start comes first.
        let mut points: Vec<(i64, i32)> =
            list.iter().flat_map(|&(s, e)| [(s, 1), (e, -1)]).collect();
        points.sort();
        let mut open = 0i32;
        for (_, d) in points {
            open += d;
            worst = worst.max(open);
        }
    }
    u32::try_from(worst).unwrap()
}

async fn run_fleet(shared: bool) -> (u32, Vec<u64>) {
    let store = Arc::new(MemoryStore::new());
    let engines = fleet(&store, shared);
    let mut ids = Vec::new();
    for i in 0..30 {
        let (h, _) = &engines[i % 3];
        ids.push(h.submit(JobSpec::new(workflows::invert())).await);
    }
    for id in &ids {
        let job = engines[0].0.finish(*id).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    }
    let per_engine: Vec<u64> = engines
        .iter()
        .map(|(_, b)| b.iter().map(|b| b.stats().submitted).sum())
        .collect();
    let overlap = max_overlap(&store, &ids).await;
    for (h, _) in &engines {
        h.engine.shutdown(Duration::from_secs(1)).await;
    }
    (overlap, per_engine)
}

#[tokio::test(start_paused = true)]
async fn three_engines_never_exceed_a_backends_capacity_between_them() {
    let (overlap, per_engine) = run_fleet(true).await;
    assert_eq!(
        overlap, 1,
        "a backend of capacity 1 ran more than one attempt at once"
    );
    assert_eq!(per_engine.iter().sum::<u64>(), 30, "each job ran once");
}

/// The check above can fail: engines that count only their own executions overload backends.
#[tokio::test(start_paused = true)]
async fn without_a_shared_count_engines_overload_a_backend() {
    let (overlap, _) = run_fleet(false).await;
    assert!(
        overlap > 1,
        "expected overlapping attempts without shared_store"
    );
}

#[tokio::test(start_paused = true)]
async fn a_block_seen_by_one_engine_keeps_the_others_away() {
    let store = Arc::new(MemoryStore::new());
    // Engine a's gpu-1 hangs on its first submission.
    let hang = FakeBackend::builder("gpu-1")
        .faults([Fault::HangBeforeStart])
        .build();
    let a2 = FakeBackend::builder("gpu-2").build();
    let mut a = harness_with(&[hang, a2], engine_config("a", true), store.clone());
    let b1 = FakeBackend::builder("gpu-1").build();
    let b2 = FakeBackend::builder("gpu-2").build();
    let mut b = harness_with(
        &[b1.clone(), b2.clone()],
        engine_config("b", true),
        store.clone(),
    );

    // Engine a's job hangs on gpu-1: the start timeout blocks gpu-1 for this workflow there.
    let gpu1 = BackendId::new("gpu-1");
    let first = a
        .submit(JobSpec::new(workflows::invert()).only_on([gpu1]))
        .await;
    a.wait_fleet(
        |e| matches!(e, FleetEvent::BackendBlocked { backend, .. } if backend.as_str() == "gpu-1"),
    )
    .await;
    // Engine b learns it from the store, without any failure of its own.
    let (e, _) = b
        .wait_fleet(|e| matches!(e, FleetEvent::BackendBlocked { backend, .. } if backend.as_str() == "gpu-1"))
        .await;
    let FleetEvent::BackendBlocked { reason, .. } = e else {
        unreachable!()
    };
    assert!(reason.contains("another orchestrator"), "{reason}");

    // b's jobs of the same workflow avoid gpu-1 while the block lasts, though b's gpu-1 is idle.
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(b.submit(JobSpec::new(workflows::invert())).await);
    }
    for id in ids {
        let job = b.finish(id).await;
        assert_eq!(job.state, JobState::Succeeded);
        assert!(
            job.attempts.iter().all(|at| at.backend.as_str() == "gpu-2"),
            "{:?}",
            job.attempts
        );
    }
    assert_eq!(
        b1.stats().submitted,
        0,
        "b never sent work to the blocked backend"
    );
    assert!(b2.stats().submitted > 0, "b ran some of its jobs itself");
    // a's job waits out the block and then runs (gpu-1's second submission is fine).
    assert_eq!(a.finish(first).await.state, JobState::Succeeded);
    a.engine.shutdown(Duration::from_secs(1)).await;
    b.engine.shutdown(Duration::from_secs(1)).await;
}
