//! Fencing across two `SqliteStore`s opened on one database file.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comfyfleet_core::{
    AttemptOutcome, AttemptUpdate, Completion, EventKind, EventQuery, ExecutionError, Failure,
    JobState, NewJob, ReapOptions, StoreError, TaskStore,
};
use comfyfleet_store_sqlite::SqliteStore;

use crate::common::{TTL, at, fast, new_job, start_on, temp_db};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_writes_of_a_reclaimed_attempt_are_rejected_across_stores() {
    let (_dir, path) = temp_db();
    let a = SqliteStore::open_with(&path, fast()).await.unwrap();
    let b = SqliteStore::open_with(&path, fast()).await.unwrap();

    let id = a.enqueue(new_job(), at(0)).await.unwrap().id;
    let old = a
        .claim("engine-a", TTL, at(0))
        .await
        .unwrap()
        .unwrap()
        .lease;
    a.start_attempt(&old, start_on("gpu-1"), at(0))
        .await
        .unwrap();

    // engine-a goes silent; store b's reaper requeues the job and engine-b reclaims it.
    let later = at(0).add(TTL).add(std::time::Duration::from_secs(1));
    let report = b.reap(&ReapOptions::default(), later).await.unwrap();
    assert_eq!(report.items.len(), 1, "{report:?}");
    let new = b
        .claim("engine-b", TTL, later)
        .await
        .unwrap()
        .unwrap()
        .lease;
    assert_eq!((new.job, new.attempt), (id, old.attempt + 1));
    b.start_attempt(&new, start_on("gpu-2"), later)
        .await
        .unwrap();

    let before = (
        a.get(id).await.unwrap(),
        a.events(&EventQuery::default()).await.unwrap(),
    );
    let lost = |r: Result<_, StoreError>, what: &str| match r {
        Err(StoreError::LeaseLost { job, attempt }) => {
            assert_eq!((job, attempt), (id, old.attempt), "{what}")
        }
        other => panic!("{what}: expected LeaseLost, got {other:?}"),
    };
    // The slow-but-alive engine-a wakes up and reports through its own store.
    lost(
        a.complete(&old, Completion::default(), later)
            .await
            .map(|_| ()),
        "late complete",
    );
    lost(
        a.heartbeat(&old, TTL, later).await.map(|_| ()),
        "late heartbeat",
    );
    lost(
        a.update_attempt(
            &old,
            AttemptUpdate {
                events: vec![EventKind::Started {
                    attempt: old.attempt,
                }],
                ..AttemptUpdate::default()
            },
            later,
        )
        .await
        .map(|_| ()),
        "late update",
    );
    lost(
        a.fail(
            &old,
            Failure {
                error: ExecutionError::transient("late"),
                outcome: AttemptOutcome::Failed,
                nodes: Vec::new(),
                retry_at: None,
                cancel_steps: Vec::new(),
            },
            later,
        )
        .await
        .map(|_| ()),
        "late fail",
    );
    lost(a.detach(&old, later).await.map(|_| ()), "late detach");
    let after = (
        b.get(id).await.unwrap(),
        b.events(&EventQuery::default()).await.unwrap(),
    );
    assert_eq!(after, before, "rejected writes changed nothing");

    // The current holder finishes normally.
    b.heartbeat(&new, TTL, later).await.unwrap();
    b.complete(&new, Completion::default(), later)
        .await
        .unwrap();
    let job = a.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    let outcomes: Vec<_> = job.attempts.iter().map(|t| (t.number, t.outcome)).collect();
    assert_eq!(
        outcomes,
        vec![
            (1, Some(AttemptOutcome::LeaseExpired)),
            (2, Some(AttemptOutcome::Succeeded))
        ]
    );
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_from_two_stores_never_share_a_job() {
    const JOBS: usize = 200;
    const TASKS_PER_STORE: usize = 4;
    let (_dir, path) = temp_db();
    let a = Arc::new(SqliteStore::open_with(&path, fast()).await.unwrap());
    let b = Arc::new(SqliteStore::open_with(&path, fast()).await.unwrap());
    let jobs: Vec<NewJob> = (0..JOBS).map(|_| new_job()).collect();
    let ids: BTreeSet<_> = jobs.iter().map(|j| j.id).collect();
    a.enqueue_many(jobs, at(0)).await.unwrap();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for (s, store) in [a.clone(), b.clone()].into_iter().enumerate() {
        for t in 0..TASKS_PER_STORE {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let owner = format!("store-{s}-task-{t}");
                let mut mine = Vec::new();
                while let Some(c) = store.claim(&owner, TTL, at(1)).await.expect("claim") {
                    store
                        .start_attempt(&c.lease, start_on(&owner), at(1))
                        .await
                        .expect("start under a fresh claim");
                    store
                        .complete(&c.lease, Completion::default(), at(2))
                        .await
                        .expect("complete under a fresh claim");
                    mine.push(c.lease);
                    // A moment of "work" between jobs. Without it one store's writer can hold
                    // the file's write lock back to back while the other store's busy handler
                    // sleeps, and the race this test is about never happens.
                    tokio::time::sleep(Duration::from_micros(300 + 200 * t as u64)).await;
                }
                mine
            }));
        }
    }
    let mut by_job: BTreeMap<_, Vec<_>> = BTreeMap::new();
    let mut per_task = Vec::new();
    for t in tasks {
        let leases = t.await.unwrap();
        per_task.push(leases.len());
        for l in leases {
            by_job.entry(l.job).or_default().push(l);
        }
    }
    eprintln!(
        "{JOBS} jobs claimed and completed by {} tasks on two stores in {:?}; per task {per_task:?}",
        2 * TASKS_PER_STORE,
        started.elapsed()
    );
    assert_eq!(
        by_job.keys().copied().collect::<BTreeSet<_>>(),
        ids,
        "every job claimed"
    );
    for (id, leases) in &by_job {
        assert_eq!(
            leases.len(),
            1,
            "job {id} claimed more than once: {leases:?}"
        );
        let job = b.get(*id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(job.claims, 1, "job {id}: claims");
        assert_eq!(job.attempts.len(), 1, "job {id}: one attempt");
        assert_eq!(
            job.attempts[0].backend.as_str(),
            leases[0].owner,
            "job {id}: the attempt was made by the claimer"
        );
    }
    let (via_a, via_b) = per_task.split_at(TASKS_PER_STORE);
    assert!(
        via_a.iter().sum::<usize>() > 0 && via_b.iter().sum::<usize>() > 0,
        "both stores claimed jobs: {per_task:?}"
    );
    assert_eq!(
        a.counts().await.unwrap().get(JobState::Succeeded),
        JOBS as u64
    );
    // Global event ids stay unique and increasing across both writers.
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = a
            .events(&EventQuery {
                job: None,
                after,
                limit: 1000,
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        all.extend(page);
    }
    assert_eq!(
        all.len(),
        JOBS * 3,
        "submitted, dispatched, succeeded per job"
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    Arc::try_unwrap(a).unwrap().close().await;
    Arc::try_unwrap(b).unwrap().close().await;
}
