//! `list` at scale: 100,000 jobs (set `COMFYFLEET_SCALE_JOBS` to change), filters and pages
//! checked against a plain model, each query timed and its plan checked for an index.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use comfyfleet_core::{
    AttemptOutcome, Completion, ExecutionError, Failure, JobFilter, JobId, JobState, NewJob,
    TaskStore, Timestamp,
};
use comfyfleet_store_sqlite::SqliteStore;

use crate::common::{TTL, at, fast, spec, start_on, temp_db};

#[derive(Debug, Clone)]
struct M {
    id: JobId,
    created: Timestamp,
    state: JobState,
    backend: Option<String>,
    project: String,
    gold: bool,
    error: Option<String>,
}

/// Pages through `filter` and compares with the model's answer.
async fn check(
    store: &SqliteStore,
    what: &str,
    filter: JobFilter,
    model: &[M],
    keep: impl Fn(&M) -> bool,
) -> Duration {
    let mut want: Vec<JobId> = model.iter().filter(|m| keep(m)).map(|m| m.id).collect();
    want.sort_by(|a, b| b.cmp(a));
    let limit = filter.effective_limit().unwrap();
    let mut got = Vec::new();
    let mut before = None;
    let mut slowest = Duration::ZERO;
    let mut pages = 0;
    loop {
        let started = Instant::now();
        let page = store
            .list(&JobFilter {
                before,
                ..filter.clone()
            })
            .await
            .unwrap();
        slowest = slowest.max(started.elapsed());
        pages += 1;
        assert!(page.jobs.len() <= limit);
        got.extend(page.jobs.iter().map(|j| j.id));
        match page.next {
            Some(n) => {
                assert_eq!(
                    page.jobs.len(),
                    limit,
                    "{what}: a page before the last is full"
                );
                assert_eq!(Some(n), page.jobs.last().map(|j| j.id));
                before = Some(n);
            }
            None => break,
        }
    }
    assert_eq!(got.len(), want.len(), "{what}: how many");
    assert!(got == want, "{what}: the pages differ from the model");
    let plan = store.explain_list(&filter).await.unwrap();
    eprintln!(
        "  {what}: {} jobs in {pages} pages, slowest page {slowest:?}; plan {plan:?}",
        got.len()
    );
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_and_pages_at_100k_jobs() {
    let n: usize = std::env::var("COMFYFLEET_SCALE_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let (_dir, path) = temp_db();
    let store = SqliteStore::open_with(&path, fast()).await.unwrap();
    let started = Instant::now();
    let mut model = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        let mut batch = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let mut s = spec()
                .priority((i % 3) as i32 - 1)
                .label("project", format!("p{}", i % 10));
            if i % 1_000 == 7 {
                s = s.label("tier", "gold");
            }
            let job = NewJob::new(s);
            model.push(M {
                id: job.id,
                created: at(i as i64),
                state: JobState::Pending,
                backend: None,
                project: format!("p{}", i % 10),
                gold: i % 1_000 == 7,
                error: None,
            });
            batch.push(job);
        }
        // One batch shares one submission time; spread them so created filters have work.
        let t = model[chunk[0]].created;
        for m in &mut model[chunk[0]..chunk[0] + chunk.len()] {
            m.created = t;
        }
        store.enqueue_many(batch, t).await.unwrap();
    }
    let enqueued = started.elapsed();

    // Some work: 300 claims, a third succeed, a third fail, a third keep running.
    let index: BTreeMap<JobId, usize> = model.iter().enumerate().map(|(i, m)| (m.id, i)).collect();
    let now = at(n as i64 + 1_000);
    let mut claim_times = Vec::new();
    for k in 0..300 {
        let t0 = Instant::now();
        let c = store.claim("engine", TTL, now).await.unwrap().unwrap();
        claim_times.push(t0.elapsed());
        let backend = format!("gpu-{}", k % 4);
        store
            .start_attempt(&c.lease, start_on(&backend), now)
            .await
            .unwrap();
        let m = &mut model[index[&c.lease.job]];
        m.backend = Some(backend);
        match k % 3 {
            0 => {
                store
                    .complete(&c.lease, Completion::default(), now)
                    .await
                    .unwrap();
                m.state = JobState::Succeeded;
            }
            1 => {
                let msg = format!("CUDA out of memory on node {k}");
                store
                    .fail(
                        &c.lease,
                        Failure {
                            error: ExecutionError::backend_specific(msg.clone()),
                            outcome: AttemptOutcome::Failed,
                            nodes: Vec::new(),
                            retry_at: None,
                            cancel_steps: Vec::new(),
                        },
                        now,
                    )
                    .await
                    .unwrap();
                m.state = JobState::Failed;
                m.error = Some(msg);
            }
            _ => m.state = JobState::Running,
        }
    }
    claim_times.sort();
    eprintln!(
        "{n} jobs: enqueued in {enqueued:?}; 300 claim/start/finish cycles; claim median {:?}, max {:?}",
        claim_times[150], claim_times[299]
    );
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.total(), n as u64);
    assert_eq!(counts.get(JobState::Running), 100);
    assert_eq!(counts.get(JobState::Failed), 100);

    let mut slowest = Vec::new();
    let f = JobFilter::default;
    slowest.push(
        check(
            &store,
            "first page, no filter",
            JobFilter { limit: 100, ..f() },
            &model,
            |_| true,
        )
        .await,
    );
    slowest.push(
        check(
            &store,
            "state failed",
            JobFilter {
                states: vec![JobState::Failed],
                limit: 30,
                ..f()
            },
            &model,
            |m| m.state == JobState::Failed,
        )
        .await,
    );
    slowest.push(
        check(
            &store,
            "states succeeded + failed + running",
            JobFilter {
                states: vec![JobState::Succeeded, JobState::Failed, JobState::Running],
                limit: 70,
                ..f()
            },
            &model,
            |m| {
                matches!(
                    m.state,
                    JobState::Succeeded | JobState::Failed | JobState::Running
                )
            },
        )
        .await,
    );
    slowest.push(
        check(
            &store,
            "label tier=gold",
            JobFilter {
                label: Some(("tier".into(), "gold".into())),
                limit: 40,
                ..f()
            },
            &model,
            |m| m.gold,
        )
        .await,
    );
    slowest.push(
        check(
            &store,
            "label project=p3",
            JobFilter {
                label: Some(("project".into(), "p3".into())),
                limit: 1000,
                ..f()
            },
            &model,
            |m| m.project == "p3",
        )
        .await,
    );
    slowest.push(
        check(
            &store,
            "backend gpu-1",
            JobFilter {
                backend: Some("gpu-1".into()),
                limit: 20,
                ..f()
            },
            &model,
            |m| m.backend.as_deref() == Some("gpu-1"),
        )
        .await,
    );
    let (from, to) = (at((n / 2) as i64), at((n / 2 + 10_000) as i64));
    slowest.push(
        check(
            &store,
            "created window of 10,000",
            JobFilter {
                created_after: Some(from),
                created_before: Some(to),
                limit: 1000,
                ..f()
            },
            &model,
            |m| m.created >= from && m.created < to,
        )
        .await,
    );
    slowest.push(
        check(
            &store,
            "error contains 'OUT OF memory'",
            JobFilter {
                error_contains: Some("OUT OF memory".into()),
                limit: 25,
                ..f()
            },
            &model,
            |m| m.error.is_some(),
        )
        .await,
    );
    slowest.push(
        check(
            &store,
            "pending + project=p3 + created window",
            JobFilter {
                states: vec![JobState::Pending],
                label: Some(("project".into(), "p3".into())),
                created_after: Some(from),
                created_before: Some(to),
                limit: 300,
                ..f()
            },
            &model,
            |m| {
                m.state == JobState::Pending
                    && m.project == "p3"
                    && m.created >= from
                    && m.created < to
            },
        )
        .await,
    );
    // The indexed filters never walk the whole table.
    for (what, filter) in [
        (
            "state",
            JobFilter {
                states: vec![JobState::Failed],
                ..f()
            },
        ),
        (
            "states",
            JobFilter {
                states: vec![JobState::Failed, JobState::Running],
                ..f()
            },
        ),
        (
            "backend",
            JobFilter {
                backend: Some("gpu-1".into()),
                ..f()
            },
        ),
        (
            "label",
            JobFilter {
                label: Some(("tier".into(), "gold".into())),
                ..f()
            },
        ),
    ] {
        let plan = store.explain_list(&filter).await.unwrap();
        assert!(
            plan.iter().all(|step| !step.starts_with("SCAN jobs")),
            "{what}: the plan scans the table: {plan:?}"
        );
    }
    eprintln!(
        "slowest page per query: {slowest:?}; total {:?}",
        started.elapsed()
    );
    assert_eq!(
        store.integrity_check().await.unwrap(),
        vec!["ok".to_string()]
    );
    store.close().await;
    // Reopening runs quick_check over the whole file; see what that costs at this size.
    let size = std::fs::metadata(&path).unwrap().len();
    let t0 = Instant::now();
    let store = SqliteStore::open_with(&path, fast()).await.unwrap();
    eprintln!(
        "reopened a {:.1} MB store (with quick_check) in {:?}",
        size as f64 / 1e6,
        t0.elapsed()
    );
    assert_eq!(store.counts().await.unwrap().total(), n as u64);
    store.close().await;
}
