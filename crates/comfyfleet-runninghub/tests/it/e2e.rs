//! The backend against `RunningHubSim` in real (scaled) time: the public backend conformance
//! suite, and the engine end to end.

use std::sync::Arc;
use std::time::Duration;

use comfyfleet_core::{Backend, JobSpec, JobState, MemoryStore, Workflow};
use comfyfleet_engine::{Engine, EngineConfig, SmartFailover, SmartFailoverConfig};
use comfyfleet_runninghub::{RunningHubBackend, RunningHubConfig};
use comfyfleet_testkit::runninghub_sim::{
    ApiKeyConfig, DEFAULT_API_KEY, RunningHubSim, RunningHubSimConfig, WorkflowSpec,
};
use comfyfleet_testkit::{BackendFixtures, backend_conformance};
use secrecy::SecretString;
use serde_json::json;

const SCALE: f64 = 0.05;

fn hosted(id: &str) -> Workflow {
    Workflow::from_value(json!({
        "rh": {"class_type": "RunningHubWorkflow", "inputs": {"workflow_id": id}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}}
    }))
    .unwrap()
}

async fn sim() -> RunningHubSim {
    RunningHubSim::start(
        RunningHubSimConfig::scaled(SCALE)
            .key(DEFAULT_API_KEY, ApiKeyConfig::with_limit(2))
            // Simulated times (× SCALE): quick 0.5 s + 2 s, long 0.5 s + 60 s.
            .workflow(
                "quick",
                WorkflowSpec::timed(Duration::from_millis(500), Duration::from_secs(2)),
            )
            .workflow(
                "long",
                WorkflowSpec::timed(Duration::from_millis(500), Duration::from_secs(60)),
            )
            .workflow(
                "slow",
                // 40 s queued and 80 s running: longer than the engine's start and node clocks.
                WorkflowSpec::timed(Duration::from_secs(40), Duration::from_secs(80)),
            ),
    )
    .await
    .unwrap()
}

fn backend(sim: &RunningHubSim) -> RunningHubBackend {
    backend_with(sim, |_| {})
}

fn backend_with(
    sim: &RunningHubSim,
    tweak: impl FnOnce(&mut RunningHubConfig),
) -> RunningHubBackend {
    let mut c = RunningHubConfig::new(
        "rh",
        sim.base_url().parse().unwrap(),
        SecretString::from(DEFAULT_API_KEY),
    );
    c.max_concurrent = 2;
    c.poll_min = Duration::from_millis(50);
    c.poll_max = Duration::from_millis(250);
    c.client.call_timeout = Duration::from_secs(3);
    tweak(&mut c);
    RunningHubBackend::new(c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runninghub_backend_passes_the_backend_conformance_suite() {
    let s = sim().await;
    let b = backend(&s);
    let fixtures = BackendFixtures {
        quick: hosted("quick"),
        long: hosted("long"),
        invalid: None,
        // RunningHub cannot tell a missing node class before running.
        missing_node: None,
        timeout: Duration::from_secs(20),
    };
    backend_conformance(&b, &fixtures).await;
}

/// Through the engine: the task waits in RunningHub's queue longer than the engine's start
/// clock and runs longer than its node clock without node events; the job still succeeds (the
/// queue wait is reported as `Queued { position: 1 }`, each RUNNING check is a liveness
/// signal), and the artifact is fetched and checksummed by the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_runs_a_hosted_workflow_to_success() {
    let s = sim().await;
    let cfg = EngineConfig {
        start_timeout: Duration::from_secs(1),
        node_timeout: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(500),
        ..EngineConfig::default()
    };
    let e = Engine::builder(
        Arc::new(MemoryStore::new()),
        Arc::new(SmartFailover::new(SmartFailoverConfig {
            jitter: false,
            seed: Some(3),
            ..Default::default()
        })),
    )
    .backends([Arc::new(backend_with(&s, |c| {
        c.stuck_after = Duration::from_secs(1);
    })) as Arc<dyn Backend>])
    .config(cfg)
    .build()
    .unwrap();
    e.start();
    let id = e.submit(JobSpec::new(hosted("slow"))).await.unwrap();
    let job = tokio::time::timeout(Duration::from_secs(60), e.wait_for(id))
        .await
        .expect("job finished")
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.attempts.len(), 1);
    let a = &job.artifacts[0];
    assert_eq!(a.kind, "image");
    assert!(a.size.unwrap() > 8);
    assert_eq!(a.sha256.as_ref().unwrap().len(), 64);
    assert!(
        a.locator["fileUrl"]
            .as_str()
            .unwrap()
            .starts_with(&s.base_url())
    );
    // The task's page and the "unusually long" warnings are in the job's events.
    let warnings: Vec<String> = e
        .events(id)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|ev| match ev.kind {
            comfyfleet_core::EventKind::Warning { message } => Some(message),
            _ => None,
        })
        .collect();
    assert!(
        warnings.iter().any(|w| w.contains("/task/detail/")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("has been") && w.contains("/task/detail/")),
        "{warnings:?}"
    );
}
