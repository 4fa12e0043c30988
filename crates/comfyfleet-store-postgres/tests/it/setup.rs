//! Connecting: schemas, refusals, timeouts, secrets, backups.

use std::time::{Duration, Instant};

use comfyfleet_core::{JobState, StoreError, TaskStore};
use comfyfleet_store_postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION};

use crate::common::{Schemas, at, new_job, options, store_in, url};

async fn raw() -> sqlx::PgConnection {
    <sqlx::PgConnection as sqlx::Connection>::connect(&url())
        .await
        .unwrap()
}

async fn exec(sql: String) {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut raw().await)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_keeps_the_data_and_migrates_nothing_twice() {
    let schemas = Schemas::default();
    let schema = schemas.fresh();
    let store = store_in(&schema).await;
    let job = store.enqueue(new_job(), at(0)).await.unwrap();
    store.close().await;
    let again = store_in(&schema).await;
    assert_eq!(
        again.get(job.id).await.unwrap().unwrap().state,
        JobState::Pending
    );
    assert_eq!(again.schema(), Some(schema.as_str()));
    again.close().await;
    schemas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused_untouched() {
    let schemas = Schemas::default();
    let schema = schemas.fresh();
    store_in(&schema).await.close().await;
    let newer = SCHEMA_VERSION + 1;
    exec(format!(
        "INSERT INTO \"{schema}\"._sqlx_migrations \
         (version, description, success, checksum, execution_time) \
         VALUES ({newer}, 'from the future', TRUE, '\\x00', 0)"
    ))
    .await;
    let err = PostgresStore::connect_with(&url(), options(&schema))
        .await
        .unwrap_err();
    match &err {
        StoreError::Unusable(msg) => assert!(msg.contains("newer"), "{msg}"),
        other => panic!("expected Unusable, got {other:?}"),
    }
    schemas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_programs_schema_is_refused() {
    let schemas = Schemas::default();
    let schema = schemas.fresh();
    exec(format!("CREATE SCHEMA \"{schema}\"")).await;
    exec(format!("CREATE TABLE \"{schema}\".jobs (x int)")).await;
    let err = PostgresStore::connect_with(&url(), options(&schema))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unusable(_)), "{err:?}");
    schemas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schema_names_are_refused() {
    for bad in ["Fleet", "a-b", "x\"; DROP TABLE jobs; --", "pg_catalog", ""] {
        let err = PostgresStore::connect_with(&url(), PostgresOptions::default().schema(bad))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidInput(_)), "{bad}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_fast_and_clearly_without_the_password() {
    // Port 1: nothing listens there.
    let started = Instant::now();
    let err = PostgresStore::connect_with(
        "postgres://postgres:hunter2@127.0.0.1:1/test",
        PostgresOptions::default().acquire_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(err.is_temporary(), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("127.0.0.1:1"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");

    let err = PostgresStore::connect("not a url").await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_hides_the_password() {
    let schemas = Schemas::default();
    let schema = schemas.fresh();
    // The test server trusts local connections: any password is accepted.
    let with_password = url().replacen("postgres://postgres@", "postgres://postgres:hunter2@", 1);
    let store = PostgresStore::connect_with(&with_password, options(&schema))
        .await
        .unwrap();
    let shown = format!("{store:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains(&schema), "{shown}");
    store.close().await;
    schemas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_with_pg_dump() {
    if std::process::Command::new("pg_restore")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: pg_dump/pg_restore are not installed");
        return;
    }
    let schemas = Schemas::default();
    let schema = schemas.fresh();
    let store = store_in(&schema).await;
    let job = store.enqueue(new_job(), at(0)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("fleet.dump");
    store.backup(&dest).await.unwrap();
    assert!(std::fs::metadata(&dest).unwrap().len() > 0);
    // Never overwrites.
    assert!(matches!(
        store.backup(&dest).await,
        Err(StoreError::InvalidInput(_))
    ));
    store.close().await;

    // Lose everything, restore, find the job again.
    exec(format!("DROP SCHEMA \"{schema}\" CASCADE")).await;
    let out = std::process::Command::new("pg_restore")
        .arg("--dbname")
        .arg(url())
        .arg("--no-owner")
        .arg(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = store_in(&schema).await;
    assert_eq!(
        restored.get(job.id).await.unwrap().unwrap().state,
        JobState::Pending
    );
    // Event ids carry on after the restored ones.
    let next = restored.enqueue(new_job(), at(1)).await.unwrap();
    assert_eq!(next.events[0].id, 2);
    restored.close().await;
    schemas.cleanup().await;
}
