//! Shared helpers: the test server, fresh schemas, jobs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use comfyfleet_core::{
    AttemptStart, BackendId, InstallStore, JobSpec, NewJob, TaskStore, Timestamp, Workflow,
};
use comfyfleet_store_postgres::{PostgresOptions, PostgresStore};
use comfyfleet_testkit::{InstallStoreFactory, StoreFactory};

/// Lease length used by these tests.
pub const TTL: Duration = Duration::from_secs(30);

/// All times are offsets from this instant, in milliseconds.
pub const BASE_MS: i64 = 1_700_000_000_000;

pub fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(BASE_MS + ms)
}

/// The test server.
pub fn url() -> String {
    std::env::var("COMFYFLEET_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema name nobody else uses.
pub fn fresh_schema() -> String {
    format!("cf_test_{}", uuid::Uuid::now_v7().simple())
}

/// Options for a test store in `schema` (few connections: many stores run at once).
pub fn options(schema: &str) -> PostgresOptions {
    PostgresOptions::default()
        .schema(schema)
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(20))
}

/// A store in `schema` (created if missing).
pub async fn store_in(schema: &str) -> PostgresStore {
    PostgresStore::connect_with(&url(), options(schema))
        .await
        .unwrap_or_else(|e| panic!("connect to the test server {}: {e}", url()))
}

/// Drops schemas (best effort: a leftover schema harms nobody).
pub async fn drop_schemas(schemas: &[String]) {
    if schemas.is_empty() {
        return;
    }
    let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&url()).await else {
        return;
    };
    for chunk in schemas.chunks(50) {
        let list: Vec<String> = chunk.iter().map(|s| format!("\"{s}\"")).collect();
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", list.join(", "));
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
        {
            eprintln!("dropping test schemas: {e}");
        }
    }
}

/// Drops its schemas when told to (`cleanup`), or at the latest when dropped.
#[derive(Debug, Default)]
pub struct Schemas(Mutex<Vec<String>>);

impl Schemas {
    /// A fresh schema, remembered for cleanup.
    pub fn fresh(&self) -> String {
        let s = fresh_schema();
        self.0.lock().unwrap().push(s.clone());
        s
    }

    /// A store in a fresh schema.
    pub async fn store(&self) -> PostgresStore {
        store_in(&self.fresh()).await
    }

    /// Drops every schema made so far.
    pub async fn cleanup(&self) {
        let all = std::mem::take(&mut *self.0.lock().unwrap());
        drop_schemas(&all).await;
    }
}

impl Drop for Schemas {
    fn drop(&mut self) {
        let all = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        if all.is_empty() {
            return;
        }
        // On a thread of its own: Drop may run inside (or outside) a runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_schemas(&all));
            }
        })
        .join();
    }
}

/// Fresh stores, each in a schema of its own. The conformance suites keep every store they
/// made until they return (and run their cases one after another), so making a store closes
/// the previous one's connections: a hundred idle pools would exhaust the server.
#[derive(Debug, Default)]
pub struct PgFactory {
    pub schemas: Schemas,
    last: Mutex<Option<Arc<PostgresStore>>>,
}

impl PgFactory {
    async fn next(&self) -> Arc<PostgresStore> {
        let previous = self.last.lock().unwrap().take();
        if let Some(p) = previous {
            p.close().await;
        }
        let store = Arc::new(self.schemas.store().await);
        *self.last.lock().unwrap() = Some(store.clone());
        store
    }
}

#[async_trait]
impl StoreFactory for PgFactory {
    async fn create(&self) -> Arc<dyn TaskStore> {
        self.next().await
    }
}

#[async_trait]
impl InstallStoreFactory for PgFactory {
    async fn create(&self) -> Arc<dyn InstallStore> {
        self.next().await
    }
}

pub fn workflow() -> Workflow {
    Workflow::from_json(
        r#"{
            "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "out"}}
        }"#,
    )
    .expect("test workflow is valid")
}

pub fn spec() -> JobSpec {
    JobSpec::new(workflow())
}

pub fn new_job() -> NewJob {
    NewJob::new(spec())
}

pub fn start_on(backend: &str) -> AttemptStart {
    AttemptStart {
        backend: BackendId::new(backend),
        remote: None,
        reattached: false,
        skipped: Vec::new(),
        phase: None,
        capacity: None,
    }
}
