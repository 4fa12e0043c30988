//! The reaper: a dry run leaves the file byte-identical; the real run does what it reported,
//! and both match `MemoryStore` exactly.

use std::path::Path;
use std::time::Duration;

use comfyfleet_core::{
    AttemptStart, BackendId, JobId, JobState, MemoryStore, NewJob, PhaseDeadline, ReapAction,
    ReapOptions, ReapReason, TaskStore, TimeoutPhase,
};
use comfyfleet_store_sqlite::SqliteStore;

use crate::common::{TTL, at, bytes, fast, spec, start_on, temp_db};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Builds the same stuck-job scenario on any store, with fixed job ids.
async fn scenario(s: &dyn TaskStore, ids: &[JobId; 6]) {
    let claim = |owner: &'static str, t| async move {
        s.claim(owner, TTL, t)
            .await
            .unwrap()
            .expect("a due job")
            .lease
    };
    // 0: its engine dies (lease runs out at 30 s).
    s.enqueue(
        NewJob {
            id: ids[0],
            spec: spec(),
        },
        at(0),
    )
    .await
    .unwrap();
    let l0 = claim("engine-a", at(0)).await;
    s.start_attempt(&l0, start_on("gpu-1"), at(0))
        .await
        .unwrap();
    // 1: alive engine, silent backend (no progress since 0 s).
    s.enqueue(
        NewJob {
            id: ids[1],
            spec: spec(),
        },
        at(0),
    )
    .await
    .unwrap();
    let l1 = claim("engine-b", at(0)).await;
    s.start_attempt(&l1, start_on("gpu-2"), at(0))
        .await
        .unwrap();
    s.heartbeat(&l1, TTL, at(50_000)).await.unwrap();
    // 3: healthy.
    s.enqueue(
        NewJob {
            id: ids[3],
            spec: spec(),
        },
        at(0),
    )
    .await
    .unwrap();
    let l3 = claim("engine-b", at(55_000)).await;
    s.start_attempt(&l3, start_on("gpu-1"), at(55_000))
        .await
        .unwrap();
    // 4: force-cancelled, then its engine died.
    s.enqueue(
        NewJob {
            id: ids[4],
            spec: spec(),
        },
        at(0),
    )
    .await
    .unwrap();
    let l4 = claim("engine-a", at(0)).await;
    s.start_attempt(&l4, start_on("gpu-3"), at(0))
        .await
        .unwrap();
    s.force_cancel(ids[4], "user", at(1_000)).await.unwrap();
    // 5: its start phase ran out at 40 s.
    s.enqueue(
        NewJob {
            id: ids[5],
            spec: spec(),
        },
        at(0),
    )
    .await
    .unwrap();
    let l5 = claim("engine-b", at(0)).await;
    let start = AttemptStart {
        phase: Some(PhaseDeadline {
            phase: TimeoutPhase::Start,
            deadline: Some(at(40_000)),
        }),
        ..start_on("gpu-2")
    };
    s.start_attempt(&l5, start, at(0)).await.unwrap();
    s.heartbeat(&l5, TTL, at(50_000)).await.unwrap();
    // 2: waited past its 10 s deadline.
    s.enqueue(
        NewJob {
            id: ids[2],
            spec: spec().deadline(secs(10)),
        },
        at(0),
    )
    .await
    .unwrap();
}

fn file_state(path: &Path) -> (Vec<u8>, Option<Vec<u8>>) {
    let wal = path.with_extension("db-wal");
    (bytes(path), wal.exists().then(|| bytes(&wal)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_changes_no_byte_and_the_real_run_does_what_it_reported() {
    let mut ids: [JobId; 6] = std::array::from_fn(|_| JobId::new());
    ids.sort();
    let (_dir, path) = temp_db();
    let sqlite = SqliteStore::open_with(&path, fast()).await.unwrap();
    let memory = MemoryStore::new();
    scenario(&sqlite, &ids).await;
    scenario(&memory, &ids).await;

    let now = at(60_000);
    let dry = ReapOptions {
        dry_run: true,
        stuck_after: Some(secs(20)),
        max_crash_requeues: 3,
    };
    sqlite.checkpoint().await.unwrap();
    let before = file_state(&path);
    let report = sqlite.reap(&dry, now).await.unwrap();
    let again = sqlite.reap(&dry, now).await.unwrap();
    assert_eq!(
        file_state(&path),
        before,
        "a dry run must not change a byte of the database or its WAL"
    );
    assert_eq!(report, again, "dry runs are repeatable");
    assert_eq!(
        report,
        memory.reap(&dry, now).await.unwrap(),
        "dry run = MemoryStore's"
    );
    assert!(report.dry_run && report.events.is_empty());
    let found: Vec<_> = report
        .items
        .iter()
        .map(|i| (i.job, i.reason, i.action))
        .collect();
    assert_eq!(
        found,
        vec![
            (ids[0], ReapReason::LeaseExpired, ReapAction::Requeue),
            (ids[1], ReapReason::NoProgress, ReapAction::Requeue),
            (ids[2], ReapReason::JobDeadline, ReapAction::Fail),
            (ids[4], ReapReason::LeaseExpired, ReapAction::Cancel),
            (ids[5], ReapReason::PhaseDeadline, ReapAction::Requeue),
        ],
        "{report:#?}"
    );
    let i0 = &report.items[0];
    assert_eq!(i0.owner.as_deref(), Some("engine-a"));
    assert_eq!(i0.backend, Some(BackendId::new("gpu-1")));
    assert_eq!(i0.age_ms, 60_000);

    let real = ReapOptions {
        dry_run: false,
        ..dry.clone()
    };
    let done = sqlite.reap(&real, now).await.unwrap();
    let done_memory = memory.reap(&real, now).await.unwrap();
    assert_eq!(
        done.items, report.items,
        "the real run found what the dry run reported"
    );
    assert_eq!(done, done_memory, "items and events = MemoryStore's");
    assert_ne!(file_state(&path), before, "the real run changed the file");
    for item in &done.items {
        let job = sqlite.get(item.job).await.unwrap().unwrap();
        let want = match item.action {
            ReapAction::Requeue => JobState::RetryWait,
            ReapAction::Fail => JobState::Failed,
            ReapAction::Cancel => JobState::Cancelled,
        };
        assert_eq!(job.state, want, "job {} after {:?}", item.job, item.action);
        assert_eq!(
            Some(job),
            memory.get(item.job).await.unwrap(),
            "the record = MemoryStore's"
        );
    }
    let healthy = sqlite.get(ids[3]).await.unwrap().unwrap();
    assert_eq!(healthy.state, JobState::Running);
    assert!(
        sqlite.reap(&dry, now).await.unwrap().items.is_empty(),
        "nothing left to reap"
    );
    sqlite.close().await;
}
