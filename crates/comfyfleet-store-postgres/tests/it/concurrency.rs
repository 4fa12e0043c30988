//! Several `PostgresStore`s on one schema (two pools: two orchestrator processes): claims,
//! fleet capacity, shared restrictions, wake-ups, event ids in commit order, leadership.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use comfyfleet_core::{
    BackendId, Completion, EventQuery, JobState, NewJob, ReapOptions, Restriction, RestrictionKind,
    StoreError, TaskStore, WorkflowHash,
};
use comfyfleet_store_postgres::PostgresStore;

use crate::common::{Schemas, TTL, at, new_job, start_on, store_in};

/// Two stores on one fresh schema.
async fn pair(schemas: &Schemas) -> (Arc<PostgresStore>, Arc<PostgresStore>) {
    let schema = schemas.fresh();
    let a = store_in(&schema).await;
    let b = store_in(&schema).await;
    (Arc::new(a), Arc::new(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_never_hand_out_a_job_twice() {
    let schemas = Schemas::default();
    let (a, b) = pair(&schemas).await;
    let jobs: Vec<NewJob> = (0..200).map(|_| new_job()).collect();
    let ids: BTreeSet<_> = jobs.iter().map(|j| j.id).collect();
    a.enqueue_many(jobs, at(0)).await.unwrap();

    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = if t % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let owner = format!("claimer-{t}");
            let mut got = Vec::new();
            loop {
                match store.claim(&owner, TTL, at(1)).await.unwrap() {
                    Some(c) => {
                        assert_eq!(c.job.state, JobState::Running);
                        got.push(c.lease.job);
                    }
                    // SKIP LOCKED may pass over rows other claimers hold: only stop when
                    // nothing is left.
                    None => {
                        if store.counts().await.unwrap().get(JobState::Pending) == 0 {
                            break;
                        }
                    }
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: BTreeSet<_> = all.iter().copied().collect();
    assert_eq!(all.len(), 200, "every job claimed exactly once");
    assert_eq!(unique, ids);
    assert_eq!(b.counts().await.unwrap().get(JobState::Running), 200);
    a.close().await;
    b.close().await;
    schemas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_holds_across_stores() {
    let schemas = Schemas::default();
    let (a, b) = pair(&schemas).await;
    let jobs: Vec<NewJob> = (0..20).map(|_| new_job()).collect();
    a.enqueue_many(jobs, at(0)).await.unwrap();
    let mut leases = Vec::new();
    for i in 0..20 {
        let store = if i % 2 == 0 { &a } else { &b };
        leases.push(store.claim("o", TTL, at(1)).await.unwrap().unwrap().lease);
    }

    let mut tasks = Vec::new();
    for (i, lease) in leases.iter().cloned().enumerate() {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut start = start_on("gpu-a");
            start.capacity = Some(1);
            (
                lease.clone(),
                store.start_attempt(&lease, start, at(2)).await,
            )
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (lease, r) = t.await.unwrap();
        match r {
            Ok(_) => winners.push(lease),
            Err(StoreError::BackendFull { backend, capacity }) => {
                assert_eq!((backend.as_str(), capacity), ("gpu-a", 1));
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one attempt starts at capacity 1");
    let load = a.backend_load().await.unwrap();
    assert_eq!(load, BTreeMap::from([(BackendId::new("gpu-a"), 1)]));

    // Refused starts changed nothing: the jobs still have no attempt and can start elsewhere.
    let loser = leases.iter().find(|l| l.job != winners[0].job).unwrap();
    assert!(b.get(loser.job).await.unwrap().unwrap().attempts.is_empty());
    let mut other = start_on("gpu-b");
    other.capacity = Some(1);
    b.start_attempt(loser, other, at(3)).await.unwrap();
    assert_eq!(
        b.backend_load().await.unwrap(),
        BTreeMap::from([(BackendId::new("gpu-a"), 1), (BackendId::new("gpu-b"), 1)])
    );

    // Once the open attempt ends, another may start.
    a.complete(&winners[0], Completion::default(), at(4))
        .await
        .unwrap();
    let next = leases
        .iter()
        .find(|l| l.job != winners[0].job && l.job != loser.job)
        .unwrap();
    let mut start = start_on("gpu-a");
    start.capacity = Some(1);
    b.start_attempt(next, start.clone(), at(5)).await.unwrap();
    let third = leases
        .iter()
        .find(|l| ![winners[0].job, loser.job, next.job].contains(&l.job))
        .unwrap();
    assert!(matches!(
        a.start_attempt(third, start, at(6)).await,
        Err(StoreError::BackendFull { .. })
    ));
    // Without a capacity, nothing is counted.
    a.start_attempt(third, start_on("gpu-a"), at(7))
        .await
        .unwrap();
    assert_eq!(
        a.backend_load().await.unwrap(),
        BTreeMap::from([(BackendId::new("gpu-a"), 2), (BackendId::new("gpu-b"), 1)])
    );
    a.close().await;
    b.close().await;
    schemas.cleanup().await;
}

fn restriction(backend: &str, structure: Option<&str>, until: i64, reason: &str) -> Restriction {
    Restriction {
        backend: BackendId::new(backend),
        kind: if structure.is_some() {
            RestrictionKind::Blocked
        } else {
            RestrictionKind::CircuitOpen
        },
        structure: structure.map(WorkflowHash::from_hex),
        until: at(until),
        reason: reason.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restrictions_merge_and_expire_across_stores() {
    let schemas = Schemas::default();
    let (a, b) = pair(&schemas).await;
    let mine_a = vec![
        restriction("gpu-b", None, 5_000, "a: circuit"),
        restriction("gpu-a", Some("ff00"), 10_000, "a: block ff00"),
        // The same key twice in one call: the later `until` wins.
        restriction("gpu-a", Some("ff00"), 8_000, "a: older"),
    ];
    let seen = a.share_restrictions(&mine_a, at(0)).await.unwrap();
    assert_eq!(
        seen,
        vec![
            restriction("gpu-a", Some("ff00"), 10_000, "a: block ff00"),
            restriction("gpu-b", None, 5_000, "a: circuit"),
        ]
    );
    // B extends the circuit, shortens nothing, adds a block.
    let mine_b = vec![
        restriction("gpu-b", None, 7_000, "b: circuit"),
        restriction("gpu-a", Some("ff00"), 9_000, "b: shorter"),
        restriction("gpu-a", Some("0a"), 3_000, "b: block 0a"),
    ];
    let seen = b.share_restrictions(&mine_b, at(1_000)).await.unwrap();
    assert_eq!(
        seen,
        vec![
            restriction("gpu-a", Some("0a"), 3_000, "b: block 0a"),
            restriction("gpu-a", Some("ff00"), 10_000, "a: block ff00"),
            restriction("gpu-b", None, 7_000, "b: circuit"),
        ]
    );
    // Lifted ones go, exactly at their instant.
    let seen = a.share_restrictions(&[], at(7_000)).await.unwrap();
    assert_eq!(
        seen,
        vec![restriction("gpu-a", Some("ff00"), 10_000, "a: block ff00")]
    );
    assert!(
        b.share_restrictions(&[], at(10_000))
            .await
            .unwrap()
            .is_empty()
    );
    a.close().await;
    b.close().await;
    schemas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_store_hears_of_new_work() {
    let schemas = Schemas::default();
    let (a, b) = pair(&schemas).await;
    let mut rx = b
        .changes()
        .expect("PostgreSQL stores have a wake-up channel");
    let start = *rx.borrow_and_update();
    // Notifications sent before B's listener is up are lost (it is only a hint): keep
    // enqueueing until B hears one.
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        let mut n = 0;
        loop {
            a.enqueue(new_job(), at(n)).await.unwrap();
            n += 1;
            if tokio::time::timeout(Duration::from_millis(200), rx.changed())
                .await
                .is_ok()
            {
                return *rx.borrow_and_update();
            }
        }
    })
    .await
    .expect("store B heard of A's enqueue within 10 s");
    assert_ne!(heard, start);
    // Every store of the schema gets the same receiver semantics; A's own works too.
    assert!(a.changes().is_some());
    a.close().await;
    b.close().await;
    schemas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tailing_reader_never_skips_an_event_id() {
    let schemas = Schemas::default();
    let (a, b) = pair(&schemas).await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = if w % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                for i in 0..40 {
                    let job = store.enqueue(new_job(), at(i)).await.unwrap();
                    if i % 3 == 0 {
                        store.cancel(job.id, "tail test", at(i)).await.unwrap();
                    }
                }
            })
        })
        .collect();
    let reader = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut last = None;
            loop {
                let done = writers_done(&b).await;
                let page = b
                    .events(&EventQuery {
                        job: None,
                        after: last,
                        limit: 50,
                    })
                    .await
                    .unwrap();
                if let Some(e) = page.last() {
                    last = Some(e.id);
                }
                let empty = page.is_empty();
                seen.extend(page);
                if done && empty {
                    return seen;
                }
            }
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    // Tell the reader the writers are done (the marker is a job with a known key).
    a.enqueue(
        NewJob::new(crate::common::spec().idempotency_key("writers-done")),
        at(1_000),
    )
    .await
    .unwrap();
    let tailed = reader.await.unwrap();
    let mut full = Vec::new();
    let mut last = None;
    loop {
        let page = a
            .events(&EventQuery {
                job: None,
                after: last,
                limit: 100,
            })
            .await
            .unwrap();
        let Some(e) = page.last() else { break };
        last = Some(e.id);
        full.extend(page);
    }
    // 160 submitted + 56 cancelled + the marker.
    assert_eq!(full.len(), 160 + 4 * 14 + 1);
    assert_eq!(tailed, full, "the tailing reader saw every event, in order");
    let ids: Vec<u64> = full.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=full.len() as u64).collect::<Vec<_>>());
    a.close().await;
    b.close().await;
    schemas.cleanup().await;
}

async fn writers_done(store: &PostgresStore) -> bool {
    let page = store
        .list(&comfyfleet_core::JobFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    // The marker job is the newest; `list` shows summaries only, so check its key by get.
    match page.jobs.first() {
        Some(j) => store
            .get(j.id)
            .await
            .unwrap()
            .is_some_and(|r| r.spec.idempotency_key.as_deref() == Some("writers-done")),
        None => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_leader_at_a_time() {
    let schemas = Schemas::default();
    let (a, b) = pair(&schemas).await;
    let ttl = Duration::from_secs(10);
    // Many candidates at once: exactly one wins.
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { store.try_lead(&format!("o{i}"), ttl, at(0)).await })
        })
        .collect();
    let mut leaders = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        if t.await.unwrap().unwrap() {
            leaders.push(format!("o{i}"));
        }
    }
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    let leader = &leaders[0];
    let other = if leader == "o0" { "o1" } else { "o0" };
    // The leader renews; the other waits for the lease to run out.
    assert!(a.try_lead(leader, ttl, at(5_000)).await.unwrap());
    assert!(!b.try_lead(other, ttl, at(14_999)).await.unwrap());
    assert!(b.try_lead(other, ttl, at(15_000)).await.unwrap());
    assert!(!a.try_lead(leader, ttl, at(15_001)).await.unwrap());
    a.close().await;
    b.close().await;
    schemas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaimed_job_fences_the_old_holder_in_another_process() {
    let schemas = Schemas::default();
    let (a, b) = pair(&schemas).await;
    let job = a.enqueue(new_job(), at(0)).await.unwrap();
    let old = a.claim("a", TTL, at(0)).await.unwrap().unwrap().lease;
    a.start_attempt(&old, start_on("gpu"), at(1)).await.unwrap();
    // A dies; B's reaper requeues the job after the lease ran out and B claims it.
    let report = b.reap(&ReapOptions::default(), at(31_000)).await.unwrap();
    assert_eq!(report.items.len(), 1);
    let new = b.claim("b", TTL, at(31_000)).await.unwrap().unwrap().lease;
    assert_eq!(new.job, job.id);
    assert!(matches!(
        a.heartbeat(&old, TTL, at(31_001)).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        a.complete(&old, Completion::default(), at(31_001)).await,
        Err(StoreError::LeaseLost { .. })
    ));
    b.heartbeat(&new, TTL, at(31_002)).await.unwrap();
    a.close().await;
    b.close().await;
    schemas.cleanup().await;
}
