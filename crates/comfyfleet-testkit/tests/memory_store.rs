//! Runs the public TaskStore conformance suite and model test against [`MemoryStore`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use async_trait::async_trait;
use comfyfleet_core::{MemoryStore, TaskStore};
use comfyfleet_testkit::{StoreFactory, store_conformance, store_model_test};

/// Fresh, empty in-memory stores.
#[derive(Debug)]
struct MemoryFactory;

#[async_trait]
impl StoreFactory for MemoryFactory {
    async fn create(&self) -> Arc<dyn TaskStore> {
        Arc::new(MemoryStore::new())
    }
}

#[tokio::test]
async fn memory_store_conformance() {
    store_conformance(&MemoryFactory).await;
}

#[test]
fn memory_store_model() {
    store_model_test(Arc::new(MemoryFactory), 256);
}
