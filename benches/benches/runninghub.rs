//! RunningHub monitoring cost and detection latency, against `RunningHubSim`.
//!
//! Not a criterion bench: what matters is how many status checks a completed job costs and how
//! long after a task ends its completion is noticed — properties of the polling schedule, not of
//! CPU speed. It runs on tokio's paused clock (the simulator derives task phases from
//! `tokio::time::Instant`), so the figures are exact and repeatable, and it prints a table.
//!
//! For each task length (queued 3 s + running N s) and socket mode (a socket that reports the
//! end vs one that accepts and never speaks, as behind the seed-000 proxy), one job runs through
//! `RunningHubBackend` with the default polling (first check at once, 1 s growing ×1.5 to 5 s).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use comfyfleet_core::{Backend, ExecutionEvent, JobId, SubmitRequest, Workflow};
use comfyfleet_runninghub::{RunningHubBackend, RunningHubConfig};
use comfyfleet_testkit::runninghub_sim::{
    DEFAULT_API_KEY, RunningHubSim, RunningHubSimConfig, WorkflowSpec,
};
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::json;
use tokio::time::Instant;

const QUEUED: Duration = Duration::from_secs(3);

fn hosted() -> Workflow {
    Workflow::from_value(json!({
        "rh": {"class_type": "RunningHubWorkflow", "inputs": {"workflow_id": "bench"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}}
    }))
    .unwrap()
}

struct Row {
    run_secs: u64,
    socket: &'static str,
    status_checks: u64,
    detect_ms: u128,
}

async fn one(run: Duration, silent: bool, proxy: Duration) -> Row {
    let sim = RunningHubSim::start(
        RunningHubSimConfig::default().workflow("bench", WorkflowSpec::timed(QUEUED, run)),
    )
    .await
    .unwrap();
    sim.faults().set_silent_websocket(silent);
    sim.faults().set_proxy_delay(proxy);
    let mut cfg = RunningHubConfig::new(
        "rh",
        sim.base_url().parse().unwrap(),
        SecretString::from(DEFAULT_API_KEY),
    );
    cfg.checksum_outputs = false;
    let backend = RunningHubBackend::new(cfg).unwrap();
    let t0 = Instant::now();
    let exec = backend
        .submit(SubmitRequest {
            job: JobId::new(),
            attempt: 1,
            workflow: hosted(),
            uploads: vec![],
        })
        .await
        .unwrap();
    // The task's timeline starts when the simulator answers the create (after the proxy).
    let created = t0 + proxy;
    let ends = created + QUEUED + run;
    let mut events = exec.events;
    let mut done = None;
    while let Some(ev) = events.next().await {
        if let ExecutionEvent::Succeeded { .. } = ev {
            done = Some(Instant::now());
            break;
        }
        assert!(!ev.is_terminal(), "{ev:?}");
    }
    let done = done.expect("succeeded");
    let row = Row {
        run_secs: run.as_secs(),
        socket: if silent { "silent" } else { "speaks" },
        status_checks: sim.stats().requests_to("/task/openapi/status"),
        detect_ms: done.saturating_duration_since(ends).as_millis(),
    };
    sim.shutdown().await;
    row
}

fn main() {
    // `cargo test --benches` runs this once as a smoke test with `--bench` absent; keep it short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Virtual time: sleeps complete at once, in order.
    rt.block_on(async { tokio::time::pause() });
    let lengths: &[u64] = if quick {
        &[10]
    } else {
        &[5, 30, 82, 300, 1800]
    };
    for proxy in [Duration::ZERO, Duration::from_secs(2)] {
        println!(
            "\nRunningHub monitoring (virtual time; queued {}s; proxy delay {}s per response)",
            QUEUED.as_secs(),
            proxy.as_secs()
        );
        println!(
            "{:>8}  {:>7}  {:>13}  {:>17}",
            "run (s)", "socket", "status checks", "detected after (ms)"
        );
        for &secs in lengths {
            for silent in [false, true] {
                let r = rt.block_on(one(Duration::from_secs(secs), silent, proxy));
                println!(
                    "{:>8}  {:>7}  {:>13}  {:>17}",
                    r.run_secs, r.socket, r.status_checks, r.detect_ms
                );
            }
        }
    }
}
