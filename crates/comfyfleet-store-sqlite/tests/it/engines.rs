//! Two engines, each with its own `SqliteStore` on one database file and its own backends,
//! share one queue: every job runs exactly once.

use std::sync::Arc;
use std::time::Duration;

use comfyfleet_core::{Backend, JobSpec, JobState, TaskStore};
use comfyfleet_engine::{Engine, EngineConfig, SmartFailover};
use comfyfleet_store_sqlite::SqliteStore;
use comfyfleet_testkit::{FakeBackend, workflows};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_one_database_never_run_a_job_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let mut engines = Vec::new();
    let mut fakes = Vec::new();
    for e in 0..2 {
        let store = Arc::new(SqliteStore::open(&db).await.unwrap());
        let backends: Vec<Arc<FakeBackend>> = (0..2)
            .map(|b| {
                FakeBackend::builder(&format!("e{e}-gpu{b}"))
                    .capacity(2)
                    .node_duration(Duration::from_millis(2))
                    .build()
            })
            .collect();
        let engine = Engine::builder(store, Arc::new(SmartFailover::default()))
            .backends(backends.iter().map(|b| b.clone() as Arc<dyn Backend>))
            .config(EngineConfig {
                owner: format!("engine-{e}"),
                idle_poll: Duration::from_millis(20),
                ..EngineConfig::default()
            })
            .build()
            .unwrap();
        engine.start();
        fakes.extend(backends);
        engines.push(engine);
    }
    let n = 120;
    let mut ids = Vec::new();
    for i in 0..n {
        // Submitted through both engines alternately; either may run any job.
        ids.push(
            engines[i % 2]
                .submit(JobSpec::new(workflows::invert()))
                .await
                .unwrap(),
        );
    }
    for id in &ids {
        let job = tokio::time::timeout(Duration::from_secs(60), engines[0].wait_for(*id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(
            job.attempts.len(),
            1,
            "job {id} ran {} times",
            job.attempts.len()
        );
    }
    let submitted: u64 = fakes.iter().map(|f| f.stats().submitted).sum();
    assert_eq!(
        submitted, n as u64,
        "every job reached a backend exactly once"
    );
    let ran_on = |prefix: &str| {
        fakes
            .iter()
            .filter(|f| format!("{f:?}").contains(prefix))
            .map(|f| f.stats().submitted)
            .sum::<u64>()
    };
    assert!(
        ran_on("e0-") > 0 && ran_on("e1-") > 0,
        "both engines took part"
    );
    for e in &engines {
        e.shutdown(Duration::from_secs(5)).await;
    }
    let store = SqliteStore::open(&db).await.unwrap();
    assert_eq!(
        store.counts().await.unwrap().get(JobState::Succeeded),
        n as u64
    );
}
