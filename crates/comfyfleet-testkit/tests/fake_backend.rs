//! FakeBackend passes the public backend conformance suite, and behaves like a small ComfyUI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use comfyfleet_core::{Backend, CancelAck, ExecutionEvent, JobId, SubmitRequest};
use comfyfleet_testkit::{BackendFixtures, FakeBackend, Fault, backend_conformance, workflows};
use futures::StreamExt;

fn req(w: comfyfleet_core::Workflow) -> SubmitRequest {
    SubmitRequest {
        job: JobId::new(),
        attempt: 1,
        workflow: w,
        uploads: Vec::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn fake_backend_passes_the_backend_conformance_suite() {
    for capacity in [1, 3] {
        let b = FakeBackend::builder("fake-1")
            .standard_nodes()
            .ticks(10)
            .capacity(capacity)
            .build();
        backend_conformance(b.as_ref(), &BackendFixtures::standard()).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_conformance_suite_catches_a_backend_that_never_finishes() {
    let b = FakeBackend::builder("broken")
        .standard_nodes()
        .fault_fn(|_| Fault::HangBeforeStart)
        .build();
    let fixtures = BackendFixtures {
        timeout: Duration::from_secs(5),
        ..BackendFixtures::standard()
    };
    let outcome =
        tokio::spawn(async move { backend_conformance(b.as_ref(), &fixtures).await }).await;
    let panic = outcome.expect_err("the suite must fail").into_panic();
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("quick_run_succeeds: no event within"), "{msg}");
}

#[tokio::test(start_paused = true)]
async fn queue_positions_count_down_and_the_run_order_is_fifo() {
    let b = FakeBackend::builder("q").build();
    let mut first = b.submit(req(workflows::sleep(10.0))).await.unwrap();
    let mut second = b.submit(req(workflows::sleep(1.0))).await.unwrap();
    let mut third = b.submit(req(workflows::invert())).await.unwrap();
    let positions = |evs: &[ExecutionEvent]| -> Vec<u32> {
        evs.iter()
            .filter_map(|e| match e {
                ExecutionEvent::Queued { position } => Some(*position),
                _ => None,
            })
            .collect()
    };
    let mut evs3 = Vec::new();
    while let Some(e) = third.events.next().await {
        evs3.push(e);
    }
    assert_eq!(positions(&evs3), vec![2, 1]);
    assert!(matches!(
        evs3.last(),
        Some(ExecutionEvent::Succeeded { .. })
    ));
    let mut evs2 = Vec::new();
    while let Some(e) = second.events.next().await {
        evs2.push(e);
    }
    assert_eq!(positions(&evs2), vec![1]);
    while first.events.next().await.is_some() {}
    assert_eq!(b.stats().max_running, 1);
    assert_eq!(b.stats().succeeded, 3);
}

#[tokio::test(start_paused = true)]
async fn a_restart_loses_every_execution() {
    let b = FakeBackend::builder("r")
        .restartable(true)
        .faults([Fault::Stuck { node: 1 }])
        .build();
    let mut exec = b.submit(req(workflows::sleep(1.0))).await.unwrap();
    while !matches!(exec.events.next().await, Some(ExecutionEvent::NodeStarted { ref node }) if node == "2")
    {
    }
    assert_eq!(
        b.cancel(&exec.remote).await.unwrap(),
        CancelAck::InterruptSent
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(b.stats().succeeded, 0, "a stuck node ignores cancel");
    b.restart().await.unwrap();
    assert_eq!(
        exec.events.next().await,
        None,
        "the stream ends: the process died"
    );
    assert!(
        b.reattach(&exec.remote).await.unwrap().is_none(),
        "and the server forgot it"
    );
    let mut again = b.submit(req(workflows::invert())).await.unwrap();
    let mut last = None;
    while let Some(e) = again.events.next().await {
        last = Some(e);
    }
    assert!(
        matches!(last, Some(ExecutionEvent::Succeeded { .. })),
        "works again after the restart"
    );
}
