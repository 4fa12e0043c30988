//! Installs: the public InstallStore conformance suite and pruning.

use comfyfleet_core::TaskStore;
use comfyfleet_testkit::{install_prune_conformance, install_store_conformance};

use crate::common::{PgFactory, Schemas, at};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_install_store_conformance() {
    let factory = PgFactory::default();
    install_store_conformance(&factory).await;
    factory.schemas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_finished_installs() {
    let schemas = Schemas::default();
    let store = schemas.store().await;
    install_prune_conformance(&store).await;
    // Jobs are still counted on their own.
    assert_eq!(store.prune(at(1_000_000)).await.unwrap(), 0);
    store.close().await;
    schemas.cleanup().await;
}
