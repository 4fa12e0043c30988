//! Against `comfyfleet_testkit::runninghub_sim::RunningHubSim`, on tokio's paused clock: the
//! simulator computes task phases from `tokio::time::Instant`, so durations below are virtual.

use std::time::Duration;

use comfyfleet_core::{Backend, ErrorKind, ExecutionEvent, JobId, SubmitRequest, Workflow};
use comfyfleet_runninghub::{RunningHubBackend, RunningHubConfig};
use comfyfleet_testkit::runninghub_sim::{
    ApiKeyConfig, DEFAULT_API_KEY, FailedReason, RunningHubSim, RunningHubSimConfig, WorkflowSpec,
};
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::json;
use tokio::time::Instant;

const STATUS: &str = "/task/openapi/status";

fn hosted(id: &str) -> Workflow {
    Workflow::from_value(json!({
        "rh": {"class_type": "RunningHubWorkflow", "inputs": {"workflow_id": id}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}}
    }))
    .unwrap()
}

fn request(workflow: Workflow) -> SubmitRequest {
    SubmitRequest {
        job: JobId::new(),
        attempt: 1,
        workflow,
        uploads: vec![],
    }
}

fn config(sim: &RunningHubSim) -> RunningHubConfig {
    let mut c = RunningHubConfig::new(
        "rh",
        sim.base_url().parse().unwrap(),
        SecretString::from(DEFAULT_API_KEY),
    );
    c.poll_min = Duration::from_secs(1);
    c.poll_max = Duration::from_secs(5);
    c.client.call_timeout = Duration::from_secs(10);
    c
}

async fn until_end(mut events: comfyfleet_core::ExecutionStream) -> Option<ExecutionEvent> {
    while let Some(ev) = events.next().await {
        if ev.is_terminal() {
            return Some(ev);
        }
    }
    None
}

/// Seed 000 on the simulator: the task socket accepts and never speaks, every response goes
/// through a slow proxy (2 s), the task runs 82 s. Completion is seen within one poll interval
/// (plus the proxy delay of that check) of the task's end, in virtual time, and the number of
/// status checks matches the adaptive schedule (1 s growing to 5 s), not a 600 s timeout.
#[tokio::test(start_paused = true)]
async fn sim_seed_000_silent_socket_slow_proxy_completion_detected_promptly() {
    let sim = RunningHubSim::start(RunningHubSimConfig::default().workflow(
        "1987",
        WorkflowSpec::timed(Duration::from_secs(3), Duration::from_secs(82)),
    ))
    .await
    .unwrap();
    sim.faults().set_silent_websocket(true);
    sim.faults().set_proxy_delay(Duration::from_secs(2));
    let backend = RunningHubBackend::new(config(&sim)).unwrap();
    let t0 = Instant::now();
    let exec = backend.submit(request(hosted("1987"))).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(600), until_end(exec.events))
        .await
        .expect("must not run into a 600 s timeout");
    let Some(ExecutionEvent::Succeeded { artifacts }) = end else {
        panic!("{end:?}")
    };
    assert_eq!(artifacts.len(), 1);
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(85), "{took:?}");
    // Bound: the task ends at 87 s (2 s proxy on create + 85 s); the first check after that
    // starts at most one check cycle (2 s proxy + 5 s interval) later, answers 2 s later, and
    // the outputs call and the checksum download take 2 s each: 100 s, against the 600 s of
    // the production failure.
    assert!(took <= Duration::from_secs(87 + 7 + 2 + 2 + 2), "{took:?}");
    let checks = sim.stats().requests_to(STATUS);
    // Each check cycle is 2 s of proxy plus an interval of 1 s growing to 5 s.
    assert!((12..=30).contains(&checks), "{checks} status checks");
    assert_eq!(sim.stats().requests_to("/task/openapi/outputs"), 1);
    // The socket was connected and said nothing: polling did not wait for it.
    assert_eq!(sim.stats().ws_connections, 1);
    assert_eq!(sim.stats().ws_messages_sent, 0);
}

/// A key with a concurrency limit of 1 and a backend configured for 2: the second create gets
/// 814, waits, shrinks the effective capacity, and is created once the first task ends. Neither
/// job fails.
#[tokio::test(start_paused = true)]
async fn sim_814_back_pressure_never_fails_the_job() {
    let sim = RunningHubSim::start(
        RunningHubSimConfig::default()
            .key(DEFAULT_API_KEY, ApiKeyConfig::with_limit(1))
            .workflow(
                "1987",
                WorkflowSpec::timed(Duration::from_secs(1), Duration::from_secs(5)),
            ),
    )
    .await
    .unwrap();
    let mut cfg = config(&sim);
    cfg.max_concurrent = 2;
    cfg.backpressure_wait = Duration::from_secs(1);
    cfg.backpressure_max_wait = Duration::from_secs(25);
    let backend = RunningHubBackend::new(cfg).unwrap();
    let a = backend.submit(request(hosted("1987"))).await.unwrap();
    let b_backend = backend.clone();
    let b = tokio::spawn(async move { b_backend.submit(request(hosted("1987"))).await });
    let ea = until_end(a.events).await;
    let b = b.await.unwrap().unwrap();
    let eb = until_end(b.events).await;
    assert!(
        matches!(ea, Some(ExecutionEvent::Succeeded { .. })),
        "{ea:?}"
    );
    assert!(
        matches!(eb, Some(ExecutionEvent::Succeeded { .. })),
        "{eb:?}"
    );
    let stats = sim.stats();
    assert!(stats.tasks_rejected_limit >= 1, "{stats:?}");
    assert_eq!(stats.tasks_created, 2);
    assert_eq!(stats.max_current_per_key.get(DEFAULT_API_KEY), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn sim_failed_task_is_classified_from_failed_reason() {
    let sim = RunningHubSim::start(
        RunningHubSimConfig::default().workflow(
            "oom",
            WorkflowSpec::timed(Duration::from_secs(1), Duration::from_secs(3))
                .failing(FailedReason::default()),
        ),
    )
    .await
    .unwrap();
    let backend = RunningHubBackend::new(config(&sim)).unwrap();
    let exec = backend.submit(request(hosted("oom"))).await.unwrap();
    let Some(ExecutionEvent::Failed { error }) = until_end(exec.events).await else {
        panic!()
    };
    assert_eq!(error.kind, ErrorKind::BackendSpecific);
    assert_eq!(error.node.as_deref(), Some("3"));
    assert!(
        error.message.contains("torch.OutOfMemoryError"),
        "{}",
        error.message
    );
    let health = backend.health().await;
    assert!(health.healthy, "{health:?}");
}

/// With a working socket, the end of the task is seen at once even with a 60 s poll interval,
/// and the socket's progress messages become events. The outcome still comes from HTTP.
#[tokio::test(start_paused = true)]
async fn sim_socket_accelerates_completion_and_reports_progress() {
    let sim = RunningHubSim::start(RunningHubSimConfig::default().workflow(
        "1987",
        WorkflowSpec::timed(Duration::from_secs(3), Duration::from_secs(10)),
    ))
    .await
    .unwrap();
    let mut cfg = config(&sim);
    cfg.poll_min = Duration::from_secs(60);
    cfg.poll_max = Duration::from_secs(60);
    let backend = RunningHubBackend::new(cfg).unwrap();
    let t0 = Instant::now();
    let mut exec = backend.submit(request(hosted("1987"))).await.unwrap();
    let mut progress = 0;
    let end = loop {
        match exec.events.next().await {
            Some(ExecutionEvent::Progress { .. }) => progress += 1,
            Some(e) if e.is_terminal() => break Some(e),
            Some(_) => {}
            None => break None,
        }
    };
    assert!(
        matches!(end, Some(ExecutionEvent::Succeeded { .. })),
        "{end:?}"
    );
    assert!(progress >= 5, "{progress} progress events");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(14), "{took:?}");
    // The immediate check after create, then the one the socket triggered.
    assert_eq!(sim.stats().requests_to(STATUS), 2);
}

/// The socket's upgrade is never answered (a proxy that blocks the connect): polling alone
/// finishes the job.
#[tokio::test(start_paused = true)]
async fn sim_hung_socket_handshake_does_not_block_polling() {
    let sim = RunningHubSim::start(RunningHubSimConfig::default().workflow(
        "1987",
        WorkflowSpec::timed(Duration::from_secs(1), Duration::from_secs(20)),
    ))
    .await
    .unwrap();
    sim.faults().set_hang_websocket_handshake(true);
    let backend = RunningHubBackend::new(config(&sim)).unwrap();
    let t0 = Instant::now();
    let exec = backend.submit(request(hosted("1987"))).await.unwrap();
    let end = until_end(exec.events).await;
    assert!(
        matches!(end, Some(ExecutionEvent::Succeeded { .. })),
        "{end:?}"
    );
    assert!(
        t0.elapsed() <= Duration::from_secs(21 + 5 + 1),
        "{:?}",
        t0.elapsed()
    );
}

/// The inventory carries the account's balance for the spill-over budget check.
#[tokio::test(start_paused = true)]
async fn sim_inventory_reports_the_account_balance() {
    let sim = RunningHubSim::start(RunningHubSimConfig::default())
        .await
        .unwrap();
    let backend = RunningHubBackend::new(config(&sim)).unwrap();
    let inv = backend.inventory().await.unwrap();
    let coins: f64 = inv.facts["remain_coins"].parse().unwrap();
    assert!(coins > 0.0, "{:?}", inv.facts);
    assert!(inv.facts.contains_key("remain_money"), "{:?}", inv.facts);
}
