//! The public TaskStore conformance suite and model test, each store in a fresh schema.

use std::sync::Arc;
use std::time::Instant;

use comfyfleet_testkit::{store_conformance, store_model_test};

use crate::common::PgFactory;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conformance() {
    let started = Instant::now();
    let factory = PgFactory::default();
    store_conformance(&factory).await;
    eprintln!("conformance suite: {:?}", started.elapsed());
    factory.schemas.cleanup().await;
}

/// Each case gets a fresh schema. 64 cases keep the run short; set `COMFYFLEET_MODEL_CASES`
/// for a longer run (at least 200 also checks coverage).
#[test]
fn postgres_store_model() {
    let cases = std::env::var("COMFYFLEET_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let started = Instant::now();
    let factory = Arc::new(PgFactory::default());
    store_model_test(factory.clone(), cases);
    eprintln!("model test, {cases} cases: {:?}", started.elapsed());
    // `factory` drops its schemas when the last handle goes.
}
