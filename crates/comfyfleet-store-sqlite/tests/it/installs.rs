//! Installs: the public InstallStore conformance suite, pruning, restarts, several stores on one
//! file, and a schema-1 file migrated to installs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use comfyfleet_core::{
    InstallEventKind, InstallId, InstallPhase, InstallRecord, InstallSpec, InstallState,
    InstallStore, InstalledPack, JobFilter, JobState, NodeProgress, NodeSpec, NodeStatus,
    RequirementsStatus, StoreError, TaskStore,
};
use comfyfleet_store_sqlite::{SCHEMA_VERSION, SqliteStore};
use comfyfleet_testkit::{
    InstallStoreFactory, install_prune_conformance, install_store_conformance,
};

use crate::common::{at, fast, new_job, temp_db};

/// Fresh stores, each in its own file in one temporary directory.
#[derive(Debug)]
struct InstallFiles {
    dir: tempfile::TempDir,
    n: AtomicUsize,
}

#[async_trait]
impl InstallStoreFactory for InstallFiles {
    async fn create(&self) -> Arc<dyn InstallStore> {
        let n = self.n.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.path().join(format!("installs-{n}.db"));
        Arc::new(SqliteStore::open_with(&path, fast()).await.unwrap())
    }
}

/// Fresh in-memory stores.
#[derive(Debug)]
struct InstallMemory;

#[async_trait]
impl InstallStoreFactory for InstallMemory {
    async fn create(&self) -> Arc<dyn InstallStore> {
        Arc::new(SqliteStore::open_in_memory().await.unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_install_store_conformance() {
    install_store_conformance(&InstallFiles {
        dir: tempfile::tempdir().unwrap(),
        n: AtomicUsize::new(0),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_sqlite_install_store_conformance() {
    install_store_conformance(&InstallMemory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_finished_installs() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open_with(&path, fast()).await.unwrap();
    install_prune_conformance(&store).await;
    // Jobs are still counted on their own.
    assert_eq!(store.prune(at(1_000_000)).await.unwrap(), 0);
}

fn record(instance: &str, ms: i64) -> InstallRecord {
    let node = NodeSpec {
        name: Some("ComfyUI-Example".into()),
        git: Some("https://github.com/example/ComfyUI-Example.git".into()),
        rev: None,
        classes: vec!["ExampleNode".into()],
    };
    let progress = NodeProgress {
        name: "ComfyUI-Example".into(),
        git: "https://github.com/example/ComfyUI-Example.git".into(),
        rev: None,
        status: NodeStatus::Pending,
        requirements: RequirementsStatus::Unknown,
        commit: None,
        already_present: false,
        expected_classes: vec!["ExampleNode".into()],
        classes: Vec::new(),
        error: None,
    };
    InstallRecord::new(
        InstallId::new(),
        InstallSpec::new(instance, vec![node]),
        vec![progress],
        at(ms),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_survive_a_restart() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open_with(&path, fast()).await.unwrap();
    let done = record("gpu-1", 0);
    store.create_install(&done).await.unwrap();
    let mut d = done.clone();
    d.state = InstallState::Succeeded;
    d.phase = InstallPhase::Done;
    d.nodes[0].status = NodeStatus::Succeeded;
    d.nodes[0].commit = Some("0123456789abcdef0123456789abcdef01234567".into());
    d.push_log("verified ExampleNode");
    d.updated_at = at(100);
    d.finished_at = Some(at(100));
    store
        .update_install(
            &d,
            &[
                InstallEventKind::Node {
                    index: 0,
                    node: d.nodes[0].clone(),
                },
                InstallEventKind::Finished {
                    state: InstallState::Succeeded,
                    error: None,
                },
            ],
        )
        .await
        .unwrap();
    let live = record("gpu-1", 200);
    store.create_install(&live).await.unwrap();
    let mut l = live.clone();
    l.state = InstallState::Running;
    l.updated_at = at(300);
    store
        .update_install(
            &l,
            &[InstallEventKind::Output {
                node: Some(0),
                line: "Cloning…".into(),
            }],
        )
        .await
        .unwrap();
    let pack = InstalledPack {
        instance: "gpu-1".into(),
        name: "ComfyUI-Example".into(),
        git: "https://github.com/example/ComfyUI-Example.git".into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        classes: vec!["ExampleNode".into()],
        install: done.id,
        installed_at: at(100),
    };
    store
        .record_packs(std::slice::from_ref(&pack))
        .await
        .unwrap();
    let before = (
        store.get_install(done.id).await.unwrap(),
        store.get_install(live.id).await.unwrap(),
        store.install_events(done.id, 0, 100).await.unwrap(),
        store.install_events(live.id, 0, 100).await.unwrap(),
    );
    store.close().await;

    let store = SqliteStore::open_with(&path, fast()).await.unwrap();
    let after = (
        store.get_install(done.id).await.unwrap(),
        store.get_install(live.id).await.unwrap(),
        store.install_events(done.id, 0, 100).await.unwrap(),
        store.install_events(live.id, 0, 100).await.unwrap(),
    );
    assert_eq!(after, before, "records and events after reopening");
    let mut d2 = d.clone();
    d2.version = 1;
    assert_eq!(after.0, Some(d2), "the finished record, version 1");
    assert_eq!(after.2.len(), 3, "created, node, finished");
    assert_eq!(after.3.len(), 2, "created, output");
    assert_eq!(
        store.instance_packs("gpu-1").await.unwrap(),
        vec![pack],
        "recorded packs after reopening"
    );
    // The reopened store still refuses a second active install and continues the seqs.
    let refused = store.create_install(&record("gpu-1", 400)).await;
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains(&live.id.to_string())),
        "{refused:?}"
    );
    let mut l2 = l.clone();
    l2.version = 1;
    l2.updated_at = at(500);
    let evs = store
        .update_install(&l2, &[InstallEventKind::Resumed { count: 1 }])
        .await
        .unwrap();
    assert_eq!(evs[0].seq, 3, "seqs continue after a restart");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_on_one_file_admit_one_active_install() {
    let (_dir, path) = temp_db();
    let a = Arc::new(SqliteStore::open_with(&path, fast()).await.unwrap());
    let b = Arc::new(SqliteStore::open_with(&path, fast()).await.unwrap());
    for round in 0..5 {
        let instance = format!("gpu-{round}");
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = if i % 2 == 0 {
                Arc::clone(&a)
            } else {
                Arc::clone(&b)
            };
            let r = record(&instance, round);
            tasks.push(tokio::spawn(async move { s.create_install(&r).await }));
        }
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(StoreError::Conflict(_)) => {}
                Err(e) => panic!("expected Conflict, got {e:?}"),
            }
        }
        assert_eq!(won, 1, "round {round}: creates admitted on one instance");
    }
    // And a version race between the two: one update wins.
    let r = record("gpu-race", 0);
    a.create_install(&r).await.unwrap();
    let mut ra = r.clone();
    ra.state = InstallState::Running;
    let mut rb = r.clone();
    rb.state = InstallState::Running;
    rb.resumed = 1;
    let (x, y) = tokio::join!(a.update_install(&ra, &[]), b.update_install(&rb, &[]));
    assert!(
        x.is_ok() != y.is_ok(),
        "exactly one of two updates over version 0 wins: {x:?} {y:?}"
    );
    assert!(matches!(x.err().or(y.err()), Some(StoreError::Conflict(_))));
}

/// The tables of schema version 1 (what an older comfyfleet created).
const SCHEMA_1: &str = include_str!("../../migrations/0001_initial.sql");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_store_is_migrated_and_keeps_its_jobs() {
    let (_dir, path) = temp_db();
    let job = new_job();
    {
        // A schema-1 file holding one pending job, as an older comfyfleet left it.
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(SCHEMA_1).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO jobs (id, state, priority, created_at, updated_at, run_at, spec) \
             VALUES (?1, 'pending', 0, ?2, ?2, ?2, ?3)",
            rusqlite::params![
                job.id.as_uuid().as_bytes().to_vec(),
                at(0).as_millis(),
                serde_json::to_string(&job.spec).unwrap()
            ],
        )
        .unwrap();
    }
    let store = SqliteStore::open_with(&path, fast()).await.unwrap();
    let got = store.get(job.id).await.unwrap().expect("the schema-1 job");
    assert_eq!((got.spec, got.state), (job.spec.clone(), JobState::Pending));
    let r = record("gpu-1", 0);
    store.create_install(&r).await.unwrap();
    assert_eq!(store.get_install(r.id).await.unwrap(), Some(r));
    assert_eq!(
        store.list(&JobFilter::default()).await.unwrap().jobs.len(),
        1
    );
    store.close().await;
    let c = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION, "migrated to the current schema");
    assert_eq!(SCHEMA_VERSION, 3);
}
