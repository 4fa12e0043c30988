//! The public TaskStore conformance suite and model test, on SQLite files.

use std::sync::Arc;
use std::time::Instant;

use comfyfleet_testkit::{store_conformance, store_model_test};

use crate::common::FileFactory;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conformance() {
    let started = Instant::now();
    store_conformance(&FileFactory::new()).await;
    eprintln!("conformance suite: {:?}", started.elapsed());
}

/// Each case gets a fresh database file. 64 cases keep the debug-build run short; set
/// `COMFYFLEET_MODEL_CASES` for a longer run (at least 200 also checks coverage).
#[test]
fn sqlite_store_model() {
    let cases = std::env::var("COMFYFLEET_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let started = Instant::now();
    store_model_test(Arc::new(FileFactory::new()), cases);
    eprintln!("model test, {cases} cases: {:?}", started.elapsed());
}

/// In-memory stores pass the same suite.
#[derive(Debug)]
struct MemoryDbFactory;

#[async_trait::async_trait]
impl comfyfleet_testkit::StoreFactory for MemoryDbFactory {
    async fn create(&self) -> Arc<dyn comfyfleet_core::TaskStore> {
        Arc::new(
            comfyfleet_store_sqlite::SqliteStore::open_in_memory()
                .await
                .expect("open in memory"),
        )
    }
}

#[tokio::test]
async fn in_memory_sqlite_store_conformance() {
    store_conformance(&MemoryDbFactory).await;
}
