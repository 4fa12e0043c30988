//! The ComfyUI backend against `ComfyUiSim` over real loopback HTTP/WebSocket: the public
//! backend conformance suite, and the engine end to end through every fault the issue names.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use comfyfleet_comfyui::{ComfyUiBackend, ComfyUiConfig};
use comfyfleet_core::{Backend, ErrorKind, JobSpec, JobState, MemoryStore, Workflow};
use comfyfleet_engine::{Engine, EngineConfig, SmartFailover, SmartFailoverConfig};
use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, HangMidNode, SimConfig};
use comfyfleet_testkit::{BackendFixtures, backend_conformance, workflows};
use serde_json::json;

const SCALE: f64 = 0.05;

async fn sim() -> ComfyUiSim {
    ComfyUiSim::start(SimConfig::scaled(SCALE)).await.unwrap()
}

async fn sim_with(f: impl FnOnce(&mut SimConfig)) -> ComfyUiSim {
    let mut c = SimConfig::scaled(SCALE);
    f(&mut c);
    ComfyUiSim::start(c).await.unwrap()
}

fn backend(id: &str, sim: &ComfyUiSim) -> ComfyUiBackend {
    let mut c = ComfyUiConfig::new(id, sim.base_url().parse().unwrap());
    c.http_timeout = Duration::from_secs(3);
    ComfyUiBackend::new(c).unwrap()
}

fn engine(backends: Vec<ComfyUiBackend>, tweak: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut cfg = EngineConfig {
        start_timeout: Duration::from_secs(1),
        node_timeout: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(500),
        cancel_grace: Duration::from_secs(1),
        ..EngineConfig::default()
    };
    tweak(&mut cfg);
    let e = Engine::builder(
        Arc::new(MemoryStore::new()),
        Arc::new(SmartFailover::new(SmartFailoverConfig {
            jitter: false,
            seed: Some(3),
            ..Default::default()
        })),
    )
    .backends(
        backends
            .into_iter()
            .map(|b| Arc::new(b) as Arc<dyn Backend>),
    )
    .config(cfg)
    .build()
    .unwrap();
    e.start();
    e
}

async fn run(engine: &Engine, spec: JobSpec) -> comfyfleet_core::JobRecord {
    let id = engine.submit(spec).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), engine.wait_for(id))
        .await
        .expect("job finished")
        .unwrap()
}

/// Runs `spec` with "good" drained until the first attempt was accepted on "hung", then lets the
/// job fail over; returns the finished job. Subscribes before submitting, so the event is never
/// missed, and waits for it instead of sleeping.
async fn run_first_on_hung(e: &Engine, spec: JobSpec) -> comfyfleet_core::JobRecord {
    e.drain(&"good".into()).unwrap();
    let mut rx = e.subscribe();
    let id = e.submit(spec).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(comfyfleet_core::FleetEvent::Job(ev)) = rx.recv().await
                && ev.job == id
                && ev.kind.name() == "accepted"
            {
                return;
            }
        }
    })
    .await
    .expect("the first attempt was accepted on the hung server");
    e.enable(&"good".into()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), e.wait_for(id))
        .await
        .expect("job finished")
        .unwrap()
}

fn bad_width() -> Workflow {
    Workflow::from_value(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bad"}}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_comfyui_backend_passes_the_backend_conformance_suite() {
    let s = sim().await;
    let b = backend("gpu-1", &s);
    let fixtures = BackendFixtures {
        invalid: Some(bad_width()),
        timeout: Duration::from_secs(20),
        ..BackendFixtures::standard()
    };
    backend_conformance(&b, &fixtures).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_with_real_artifacts_fetched_and_checksummed() {
    let s = sim().await;
    let e = engine(vec![backend("gpu-1", &s)], |_| {});
    let job = run(&e, JobSpec::new(workflows::sleep(2.0))).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let a = &job.artifacts[0];
    assert!(
        a.filename.starts_with("fleet_sleep_") && a.filename.ends_with(".png"),
        "{a:?}"
    );
    assert!(a.size.unwrap() > 8);
    assert_eq!(a.sha256.as_ref().unwrap().len(), 64);
    let nodes: Vec<&str> = job.attempts[0]
        .nodes
        .iter()
        .map(|n| n.node.as_str())
        .collect();
    assert_eq!(
        nodes,
        ["1", "2", "3", "4"],
        "per-node timings from real events"
    );
    assert_eq!(job.progress.unwrap().percent, 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validation_error_is_not_retried() {
    let a = sim().await;
    let b = sim().await;
    let e = engine(vec![backend("gpu-a", &a), backend("gpu-b", &b)], |_| {});
    let job = run(&e, JobSpec::new(bad_width()).max_attempts(3)).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts.len(), 1);
    let err = job.error.unwrap();
    assert_eq!(err.kind, ErrorKind::Deterministic);
    assert!(
        err.message.contains("Value 0 smaller than min of 1"),
        "{}",
        err.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_node_is_routed_to_the_simulator_that_has_it() {
    let plain = sim().await;
    let custom = sim_with(|c| {
        c.extra_node_classes = BTreeMap::from([("FleetNoSuchNode".to_string(), false)]);
    })
    .await;
    let e = engine(
        vec![backend("plain", &plain), backend("custom", &custom)],
        |_| {},
    );
    let job = run(&e, JobSpec::new(workflows::missing_node())).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(
        job.attempts.len(),
        1,
        "routed by the inventory from /object_info, not by trial"
    );
    assert_eq!(job.attempts[0].backend.as_str(), "custom");
    assert_eq!(plain.stats().prompts_received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_accepts_and_hangs_fails_over_after_the_start_timeout() {
    let hung = sim().await;
    hung.faults().set_hang_after_accept(true);
    let good = sim().await;
    let e = engine(vec![backend("hung", &hung), backend("good", &good)], |_| {});
    let job = run_first_on_hung(&e, JobSpec::new(workflows::invert())).await;
    assert_eq!(job.state, JobState::Succeeded);
    let path: Vec<&str> = job.attempts.iter().map(|a| a.backend.as_str()).collect();
    assert_eq!(path, ["hung", "good"]);
    assert_eq!(
        job.attempts[0].error.as_ref().unwrap().timeout_phase(),
        Some(comfyfleet_core::TimeoutPhase::Start)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_hangs_mid_run_fails_over_after_the_node_timeout() {
    let hung = sim().await;
    hung.faults().set_hang_mid_node(Some(HangMidNode {
        class_type: Some("TestSleep".into()),
        ignore_interrupt: false,
    }));
    let good = sim().await;
    let e = engine(vec![backend("hung", &hung), backend("good", &good)], |_| {});
    let job = run_first_on_hung(&e, JobSpec::new(workflows::sleep(1.0))).await;
    assert_eq!(job.state, JobState::Succeeded);
    let path: Vec<&str> = job.attempts.iter().map(|a| a.backend.as_str()).collect();
    assert_eq!(path, ["hung", "good"]);
    assert_eq!(
        job.attempts[0].error.as_ref().unwrap().timeout_phase(),
        Some(comfyfleet_core::TimeoutPhase::NodeSilence)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_websocket_still_completes_through_http() {
    let s = sim_with(|c| c.faults.silent_websocket = true).await;
    let e = engine(vec![backend("gpu-1", &s)], |c| {
        c.start_timeout = Duration::from_secs(3)
    });
    let job = run(&e, JobSpec::new(workflows::invert())).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.attempts.len(), 1);
    assert!(!job.artifacts.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_dropped_mid_run_reconnects_and_the_job_completes() {
    let s = sim().await;
    let b = backend("gpu-1", &s);
    let e = engine(vec![b.clone()], |c| {
        c.node_timeout = Duration::from_secs(10)
    });
    let id = e
        .submit(JobSpec::new(workflows::sleep(40.0)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.drop_all_sockets();
    let job = tokio::time::timeout(Duration::from_secs(30), e.wait_for(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.attempts.len(), 1);
    assert!(s.stats().ws_connections >= 2, "reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_that_loses_the_prompt_is_detected_and_retried() {
    let s = sim().await;
    let e = engine(vec![backend("gpu-1", &s)], |c| {
        c.node_timeout = Duration::from_secs(30)
    });
    let id = e
        .submit(JobSpec::new(workflows::sleep(100.0)).max_attempts(2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.restart().await;
    let job = tokio::time::timeout(Duration::from_secs(40), e.wait_for(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
    let first = job.attempts[0].error.as_ref().unwrap();
    assert!(
        matches!(first.detail, Some(comfyfleet_core::ErrorDetail::Lost)),
        "{first:?}"
    );
    assert!(
        first.message.contains("no longer knows prompt"),
        "{}",
        first.message
    );
    assert_eq!(job.state, JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_hits_only_our_prompt() {
    let s = sim().await;
    let b = backend("gpu-1", &s);
    let e = engine(vec![b], |c| c.node_timeout = Duration::from_secs(30));
    let id = e
        .submit(JobSpec::new(workflows::sleep(100.0)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Another client's prompt waits behind ours.
    let other = reqwest::Client::new()
        .post(format!("{}/api/prompt", s.base_url()))
        .json(&json!({"prompt": workflows::invert().to_value(), "client_id": "someone-else"}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    e.force_cancel(id).await.unwrap();
    let job = tokio::time::timeout(Duration::from_secs(20), e.wait_for(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    let stats = s.stats();
    assert_eq!(stats.interrupts_global, 0, "never a global interrupt");
    assert_eq!(stats.interrupts_by_id, 1);
    // The other client's prompt still ran.
    tokio::time::timeout(Duration::from_secs(10), async {
        while s.stats().prompts_succeeded < 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the other prompt ran to completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_engine_restart_a_running_prompt_is_reattached_not_resubmitted() {
    let s = sim().await;
    let store = Arc::new(MemoryStore::new());
    let build = |store: Arc<MemoryStore>| {
        let e = Engine::builder(store, Arc::new(SmartFailover::default()))
            .backend(Arc::new(backend("gpu-1", &s)))
            .config(EngineConfig {
                node_timeout: Duration::from_secs(10),
                ..EngineConfig::default()
            })
            .build()
            .unwrap();
        e.start();
        e
    };
    let first = build(store.clone());
    let id = first
        .submit(JobSpec::new(workflows::sleep(40.0)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    first.shutdown(Duration::ZERO).await;
    drop(first);
    let second = build(store.clone());
    let job = tokio::time::timeout(Duration::from_secs(30), second.wait_for(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert!(job.attempts[1].reattached);
    assert_eq!(s.stats().prompts_received, 1, "submitted exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_anything_reaches_a_server() {
    let s = sim_with(|c| c.max_upload_size = 1 << 20).await;
    let e = engine(vec![backend("gpu-1", &s)], |_| {});
    for text in [
        "{not json",
        r#"{"1": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}}}"#,
        "[]",
        "{}",
    ] {
        assert!(Workflow::from_json(text).is_err(), "{text}");
    }
    // Over the server's upload limit (learned from /api/features): refused here, not sent.
    let huge = "x".repeat(2 << 20);
    let w = Workflow::from_value(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": huge}}
    }))
    .unwrap();
    let job = run(&e, JobSpec::new(w).max_attempts(3)).await;
    assert_eq!(job.state, JobState::Failed);
    let err = job.error.unwrap();
    assert_eq!(err.kind, ErrorKind::Deterministic);
    assert!(
        err.message.contains("accepts requests under 1048576 bytes"),
        "{}",
        err.message
    );
    assert_eq!(job.attempts.len(), 1);
    assert_eq!(s.stats().prompts_received, 0, "nothing was sent");
}

/// A real PNG made by a simulator (`EmptyImage → SaveImage`).
async fn a_png() -> bytes::Bytes {
    let s = sim().await;
    let e = engine(vec![backend("png", &s)], |_| {});
    let job = run(&e, JobSpec::new(workflows::invert())).await;
    s.file("output", "", &job.artifacts[0].filename).unwrap()
}

fn load_image(name: &str) -> Workflow {
    Workflow::from_value(json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "uploaded"}}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_uploaded_before_the_prompt_and_follow_a_failover() {
    let png = a_png().await;
    let hung = sim().await;
    hung.faults().set_hang_after_accept(true);
    let good = sim().await;
    let e = engine(vec![backend("hung", &hung), backend("good", &good)], |_| {});
    let upload = e.put_input("cat.png", png.clone()).await.unwrap();
    let mut spec = JobSpec::new(load_image("cat.png"));
    spec.uploads.push(upload);
    let job = run_first_on_hung(&e, spec).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let path: Vec<&str> = job.attempts.iter().map(|a| a.backend.as_str()).collect();
    assert_eq!(path, ["hung", "good"]);
    assert_eq!(
        hung.file("input", "", "cat.png").unwrap(),
        png,
        "uploaded before the first attempt"
    );
    assert_eq!(
        good.file("input", "", "cat.png").unwrap(),
        png,
        "and to the backend it failed over to"
    );

    // An unknown input is refused at submit; a path-like name too.
    let mut bad = JobSpec::new(load_image("dog.png"));
    bad.uploads.push(comfyfleet_core::Upload {
        name: "dog.png".into(),
        sha256: "0".repeat(64),
        size: 1,
    });
    assert!(
        e.submit(bad)
            .await
            .unwrap_err()
            .to_string()
            .contains("no such input")
    );
    assert!(e.put_input("../../etc/passwd", png).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_is_uploaded_once_per_backend() {
    let png = a_png().await;
    let s = sim().await;
    let b = backend("gpu-1", &s);
    let upload = comfyfleet_core::Upload {
        name: "cat.png".into(),
        sha256: comfyfleet_core::inputs::sha256_hex(&png),
        size: png.len() as u64,
    };
    b.upload(&upload, png.clone()).await.unwrap();
    assert_eq!(s.file("input", "", "cat.png").unwrap(), png);
    let after_first = s.stats().http_requests;
    b.upload(&upload, png.clone()).await.unwrap();
    assert_eq!(
        s.stats().http_requests,
        after_first,
        "the second upload is skipped"
    );
    let wrong = comfyfleet_core::Upload {
        sha256: "f".repeat(64),
        ..upload
    };
    let err = b.upload(&wrong, png).await.unwrap_err();
    assert!(
        err.to_string().contains("does not match its sha256"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_history_entries_are_deleted_from_the_server() {
    let s = sim().await;
    let mut c = ComfyUiConfig::new("gpu-1", s.base_url().parse().unwrap());
    c.history_retention = Duration::from_millis(200);
    let e = engine(vec![ComfyUiBackend::new(c).unwrap()], |_| {});
    let job = run(&e, JobSpec::new(workflows::invert())).await;
    let prompt = job.attempts[0].remote.clone().unwrap();
    let url = format!("{}/api/history/{prompt}", s.base_url());
    let before: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert!(
        before.get(prompt.as_str()).is_some(),
        "kept for a while (reattach can still read it)"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(after, json!({}), "deleted after the retention time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_prefetch_the_next_prompt_waits_queued_on_the_server_without_timing_out() {
    let s = sim().await;
    let mut c = ComfyUiConfig::new("gpu-1", s.base_url().parse().unwrap());
    c.prefetch = 1;
    // Start timeout 1 s; each job runs ~2.5 s, so the prefetched one waits longer than that.
    let e = engine(vec![ComfyUiBackend::new(c).unwrap()], |_| {});
    let a = e
        .submit(JobSpec::new(workflows::sleep_with_prefix(50.0, "pf_a")))
        .await
        .unwrap();
    let b = e
        .submit(JobSpec::new(workflows::sleep_with_prefix(50.0, "pf_b")))
        .await
        .unwrap();
    for id in [a, b] {
        let job = tokio::time::timeout(Duration::from_secs(30), e.wait_for(id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        assert_eq!(job.attempts.len(), 1, "the queued prompt was not timed out");
    }
    // Both were submitted at once; whichever reached the server second waited at position 1.
    let mut queued_behind = 0;
    for id in [a, b] {
        let events = e.events(id).await.unwrap();
        if events.iter().any(|ev| {
            matches!(
                ev.kind,
                comfyfleet_core::EventKind::Queued { position: 1, .. }
            )
        }) {
            queued_behind += 1;
        }
    }
    assert_eq!(
        queued_behind, 1,
        "one prompt was prefetched onto the server behind the other"
    );
    assert_eq!(s.stats().max_queue_remaining, 2);
}
