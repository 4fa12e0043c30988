//! Runs the public InstallStore conformance suite against [`MemoryStore`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use async_trait::async_trait;
use comfyfleet_core::{InstallStore, MemoryStore};
use comfyfleet_testkit::{
    InstallStoreFactory, install_prune_conformance, install_store_conformance,
};

/// Fresh, empty in-memory stores.
#[derive(Debug)]
struct MemoryFactory;

#[async_trait]
impl InstallStoreFactory for MemoryFactory {
    async fn create(&self) -> Arc<dyn InstallStore> {
        Arc::new(MemoryStore::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_install_store_conformance() {
    install_store_conformance(&MemoryFactory).await;
}

#[tokio::test]
async fn memory_store_prunes_finished_installs() {
    install_prune_conformance(&MemoryStore::new()).await;
}
