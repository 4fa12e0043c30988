//! Online backups.

use std::sync::Arc;

use comfyfleet_core::{Completion, EventQuery, JobFilter, JobId, NewJob, StoreError, TaskStore};
use comfyfleet_store_sqlite::{APPLICATION_ID, SCHEMA_VERSION, SqliteStore};

use crate::common::{TTL, at, bytes, fast, spec, start_on, temp_db};

async fn all_jobs(s: &dyn TaskStore) -> Vec<comfyfleet_core::JobRecord> {
    let mut out = Vec::new();
    let mut before: Option<JobId> = None;
    loop {
        let page = s
            .list(&JobFilter {
                before,
                limit: 1000,
                ..JobFilter::default()
            })
            .await
            .unwrap();
        for j in &page.jobs {
            out.push(s.get(j.id).await.unwrap().unwrap());
        }
        match page.next {
            Some(n) => before = Some(n),
            None => return out,
        }
    }
}

fn sqlite_integrity(path: &std::path::Path) -> (String, i32, i64) {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    let app: i32 = c
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .unwrap();
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    (ok, app, version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_opens_as_a_store_with_the_same_jobs() {
    let (dir, path) = temp_db();
    let store = Arc::new(SqliteStore::open_with(&path, fast()).await.unwrap());
    for i in 0..50 {
        store
            .enqueue(NewJob::new(spec().label("i", i.to_string())), at(i))
            .await
            .unwrap();
    }
    for _ in 0..10 {
        let c = store.claim("e", TTL, at(100)).await.unwrap().unwrap();
        store
            .start_attempt(&c.lease, start_on("gpu-1"), at(100))
            .await
            .unwrap();
        store
            .complete(&c.lease, Completion::default(), at(101))
            .await
            .unwrap();
    }
    // Writers keep going while the copy is made.
    let busy = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                store
                    .enqueue(NewJob::new(spec()), at(1_000 + i))
                    .await
                    .unwrap();
            }
        })
    };
    let during = dir.path().join("during.db");
    store.backup(&during).await.unwrap();
    busy.await.unwrap();

    let dest = dir.path().join("backup.db");
    store.backup(&dest).await.unwrap();
    assert_eq!(
        sqlite_integrity(&dest),
        ("ok".to_string(), APPLICATION_ID, SCHEMA_VERSION)
    );
    assert_eq!(sqlite_integrity(&during).0, "ok");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no partial copies left: {leftovers:?}"
    );

    let copy = SqliteStore::open(&dest).await.unwrap();
    assert_eq!(
        all_jobs(copy.as_ref_dyn()).await,
        all_jobs(store.as_ref_dyn()).await
    );
    assert_eq!(copy.counts().await.unwrap(), store.counts().await.unwrap());
    let q = EventQuery {
        limit: 10_000,
        ..EventQuery::default()
    };
    assert_eq!(
        copy.events(&q).await.unwrap(),
        store.events(&q).await.unwrap()
    );
    // The copy is a working store of its own.
    let c = copy.claim("e2", TTL, at(5_000)).await.unwrap().unwrap();
    copy.start_attempt(&c.lease, start_on("gpu-2"), at(5_000))
        .await
        .unwrap();
    let during_store = SqliteStore::open(&during).await.unwrap();
    assert!(during_store.counts().await.unwrap().total() >= 50);
    copy.close().await;
    during_store.close().await;
    Arc::try_unwrap(store).unwrap().close().await;
}

#[tokio::test]
async fn a_backup_never_overwrites() {
    let (dir, path) = temp_db();
    let store = SqliteStore::open_with(&path, fast()).await.unwrap();
    store.enqueue(NewJob::new(spec()), at(0)).await.unwrap();
    let dest = dir.path().join("precious.db");
    std::fs::write(&dest, b"do not touch").unwrap();
    match store.backup(&dest).await {
        Err(StoreError::InvalidInput(msg)) => {
            assert!(
                msg.contains("already exists") && msg.contains("precious.db"),
                "{msg}"
            )
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert_eq!(bytes(&dest), b"do not touch");
    let missing = dir.path().join("no-such-dir").join("b.db");
    let r = store.backup(&missing).await;
    assert!(
        matches!(&r, Err(StoreError::InvalidInput(m)) if m.contains("does not exist")),
        "{r:?}"
    );
    store.close().await;
}

#[tokio::test]
async fn an_in_memory_store_backs_up_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_memory().await.unwrap();
    let id = store.enqueue(NewJob::new(spec()), at(0)).await.unwrap().id;
    let dest = dir.path().join("mem.db");
    store.backup(&dest).await.unwrap();
    let copy = SqliteStore::open(&dest).await.unwrap();
    assert_eq!(copy.get(id).await.unwrap(), store.get(id).await.unwrap());
    copy.close().await;
}

/// `&SqliteStore` as `&dyn TaskStore`.
trait AsDyn {
    fn as_ref_dyn(&self) -> &dyn TaskStore;
}

impl AsDyn for SqliteStore {
    fn as_ref_dyn(&self) -> &dyn TaskStore {
        self
    }
}
