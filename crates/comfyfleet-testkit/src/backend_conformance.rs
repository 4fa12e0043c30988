//! The public backend conformance suite: every [`Backend`] (through its simulator) must pass it,
//! and third parties can run it against their own.
//!
//! ```no_run
//! # async fn f(backend: std::sync::Arc<dyn comfyfleet_core::Backend>) {
//! use comfyfleet_testkit::{backend_conformance, BackendFixtures, workflows};
//! backend_conformance(backend.as_ref(), &BackendFixtures::standard()).await;
//! # }
//! ```

use std::time::Duration;

use comfyfleet_core::{
    Backend, BackendError, CancelAck, ErrorKind, Execution, ExecutionEvent, JobId, RemoteRef,
    SubmitRequest, Workflow,
};
use futures::StreamExt;

/// Workflows and limits the suite uses against one backend.
#[derive(Debug, Clone)]
pub struct BackendFixtures {
    /// Succeeds quickly and produces at least one artifact.
    pub quick: Workflow,
    /// Runs long enough (several seconds) to be cancelled mid-run.
    pub long: Workflow,
    /// A workflow the backend must refuse as bad input (`Deterministic`), if it can tell.
    pub invalid: Option<Workflow>,
    /// A workflow using a node class the backend lacks, if there is one.
    pub missing_node: Option<Workflow>,
    /// How long any single step may take.
    pub timeout: Duration,
}

impl BackendFixtures {
    /// The standard fixtures of [`crate::workflows`] (for backends with the standard nodes).
    pub fn standard() -> Self {
        BackendFixtures {
            quick: crate::workflows::invert(),
            long: crate::workflows::sleep(30.0),
            invalid: None,
            missing_node: Some(crate::workflows::missing_node()),
            timeout: Duration::from_secs(60),
        }
    }
}

fn request(workflow: &Workflow) -> SubmitRequest {
    SubmitRequest {
        job: JobId::new(),
        attempt: 1,
        workflow: workflow.clone(),
        uploads: Vec::new(),
    }
}

async fn next_event(exec: &mut Execution, timeout: Duration, case: &str) -> Option<ExecutionEvent> {
    match tokio::time::timeout(timeout, exec.events.next()).await {
        Ok(ev) => ev,
        Err(_) => panic!("{case}: no event within {timeout:?}"),
    }
}

/// Runs every case against `backend`; panics with the case name on the first violation.
pub async fn backend_conformance(backend: &dyn Backend, fixtures: &BackendFixtures) {
    identity(backend);
    health_and_inventory(backend, fixtures).await;
    let done = quick_run_succeeds(backend, fixtures).await;
    reattach(backend, fixtures, &done).await;
    cancel_running(backend, fixtures).await;
    unknown_remote(backend).await;
    refusals(backend, fixtures).await;
}

fn identity(backend: &dyn Backend) {
    assert!(!backend.id().as_str().is_empty(), "identity: id is empty");
    assert!(!backend.kind().is_empty(), "identity: kind is empty");
    assert!(
        backend.capabilities().max_concurrent >= 1,
        "identity: max_concurrent must be at least 1"
    );
}

async fn health_and_inventory(backend: &dyn Backend, fixtures: &BackendFixtures) {
    let h = tokio::time::timeout(fixtures.timeout, backend.health())
        .await
        .expect("health: no answer in time");
    assert!(
        h.healthy,
        "health: a fresh backend reports unhealthy: {}",
        h.detail
    );
    let inv = tokio::time::timeout(fixtures.timeout, backend.inventory())
        .await
        .expect("inventory: no answer in time")
        .expect("inventory: error");
    if let Some(classes) = &inv.node_classes {
        for c in fixtures.quick.required_classes() {
            assert!(
                classes.contains(&c),
                "inventory: lacks {c}, which the quick fixture needs"
            );
        }
    }
}

/// Submits the quick workflow; checks event order, the single terminal event, the stream end and
/// that every artifact can be fetched. Returns the remote id.
async fn quick_run_succeeds(backend: &dyn Backend, fixtures: &BackendFixtures) -> RemoteRef {
    let case = "quick_run_succeeds";
    let mut exec = backend
        .submit(request(&fixtures.quick))
        .await
        .unwrap_or_else(|e| panic!("{case}: submit failed: {e}"));
    let nodes = fixtures.quick.node_ids();
    let mut terminal = None;
    while let Some(ev) = next_event(&mut exec, fixtures.timeout, case).await {
        if terminal.is_some() {
            panic!("{case}: event after the terminal event: {ev:?}");
        }
        match &ev {
            ExecutionEvent::NodeStarted { node } | ExecutionEvent::NodeFinished { node } => {
                assert!(
                    nodes.contains(node),
                    "{case}: event for unknown node {node}"
                );
            }
            ExecutionEvent::Progress { value, max, .. } => {
                assert!(
                    value.is_finite() && max.is_finite(),
                    "{case}: progress not finite"
                );
            }
            _ => {}
        }
        if ev.is_terminal() {
            terminal = Some(ev);
        }
    }
    let Some(ExecutionEvent::Succeeded { artifacts }) = terminal else {
        panic!("{case}: expected Succeeded, got {terminal:?}");
    };
    assert!(!artifacts.is_empty(), "{case}: no artifacts");
    for a in &artifacts {
        assert_eq!(
            &a.backend,
            backend.id(),
            "{case}: artifact names another backend"
        );
        let mut stream = backend
            .fetch(a)
            .await
            .unwrap_or_else(|e| panic!("{case}: fetch {}: {e}", a.filename));
        let mut size = 0;
        while let Some(chunk) = stream.next().await {
            size += chunk
                .unwrap_or_else(|e| panic!("{case}: fetch chunk: {e}"))
                .len();
        }
        assert!(size > 0, "{case}: artifact {} is empty", a.filename);
    }
    exec.remote
}

async fn reattach(backend: &dyn Backend, fixtures: &BackendFixtures, done: &RemoteRef) {
    let case = "reattach";
    if !backend.capabilities().reattach {
        return;
    }
    // A finished execution is either forgotten or reports its result again.
    if let Some(mut exec) = backend.reattach(done).await.expect("reattach: error") {
        let mut last = None;
        while let Some(ev) = next_event(&mut exec, fixtures.timeout, case).await {
            last = Some(ev);
        }
        assert!(
            matches!(last, Some(ExecutionEvent::Succeeded { .. })),
            "{case}: reattaching a finished execution must report its success, got {last:?}"
        );
    }
    // A running execution is found again and finishes through the new stream.
    let mut first = backend
        .submit(request(&fixtures.long))
        .await
        .expect("reattach: submit");
    loop {
        match next_event(&mut first, fixtures.timeout, case).await {
            Some(ExecutionEvent::NodeStarted { .. }) | Some(ExecutionEvent::Progress { .. }) => {
                break;
            }
            Some(ev) if ev.is_terminal() => panic!("{case}: long fixture ended early: {ev:?}"),
            Some(_) => {}
            None => panic!("{case}: stream ended before the long fixture started"),
        }
    }
    let remote = first.remote.clone();
    drop(first);
    let mut again = backend
        .reattach(&remote)
        .await
        .expect("reattach: error")
        .unwrap_or_else(|| panic!("{case}: a running execution was not found again"));
    backend.cancel(&remote).await.expect("reattach: cancel");
    let mut last = None;
    while let Some(ev) = next_event(&mut again, fixtures.timeout, case).await {
        last = Some(ev);
    }
    assert!(
        matches!(
            last,
            Some(ExecutionEvent::Interrupted) | Some(ExecutionEvent::Failed { .. })
        ) || last.is_none(),
        "{case}: cancelled reattached execution ended with {last:?}"
    );
}

async fn cancel_running(backend: &dyn Backend, fixtures: &BackendFixtures) {
    let case = "cancel_running";
    let mut exec = backend
        .submit(request(&fixtures.long))
        .await
        .expect("cancel: submit");
    loop {
        match next_event(&mut exec, fixtures.timeout, case).await {
            Some(ExecutionEvent::Started) | Some(ExecutionEvent::NodeStarted { .. }) => break,
            Some(ev) if ev.is_terminal() => panic!("{case}: ended before cancel: {ev:?}"),
            Some(_) => {}
            None => panic!("{case}: stream ended before start"),
        }
    }
    let ack = backend.cancel(&exec.remote).await.expect("cancel: error");
    assert!(
        matches!(ack, CancelAck::InterruptSent | CancelAck::Dequeued),
        "{case}: cancel of a running execution answered {ack:?}"
    );
    let mut terminal = None;
    while let Some(ev) = next_event(&mut exec, fixtures.timeout, case).await {
        if ev.is_terminal() {
            terminal = Some(ev);
        }
    }
    match terminal {
        Some(ExecutionEvent::Interrupted) => {}
        Some(ExecutionEvent::Failed { error }) if error.kind == ErrorKind::Cancelled => {}
        other => panic!("{case}: expected Interrupted, got {other:?}"),
    }
}

async fn unknown_remote(backend: &dyn Backend) {
    let case = "unknown_remote";
    let ghost = RemoteRef::new("00000000-0000-4000-8000-000000000000");
    match backend.cancel(&ghost).await {
        Ok(CancelAck::NotFound) | Err(BackendError::NotFound(_)) => {}
        other => panic!("{case}: cancel of an unknown execution answered {other:?}"),
    }
    let r = backend
        .reattach(&ghost)
        .await
        .expect("unknown_remote: reattach error");
    assert!(
        r.is_none(),
        "{case}: reattach found an execution that never existed"
    );
}

async fn refusals(backend: &dyn Backend, fixtures: &BackendFixtures) {
    if let Some(w) = &fixtures.invalid {
        match backend.submit(request(w)).await {
            Err(BackendError::Execution(e)) => {
                assert_eq!(e.kind, ErrorKind::Deterministic, "refusals: invalid: {e:?}")
            }
            Err(e) => panic!("refusals: invalid workflow: unexpected error {e:?}"),
            Ok(mut exec) => {
                let mut last = None;
                while let Some(ev) = next_event(&mut exec, fixtures.timeout, "refusals").await {
                    last = Some(ev);
                }
                assert!(
                    matches!(&last, Some(ExecutionEvent::Failed { error }) if error.kind == ErrorKind::Deterministic),
                    "refusals: invalid workflow ended with {last:?}"
                );
            }
        }
    }
    if let Some(w) = &fixtures.missing_node {
        match backend.submit(request(w)).await {
            Err(BackendError::Execution(e)) => {
                assert_eq!(
                    e.kind,
                    ErrorKind::BackendSpecific,
                    "refusals: missing node: {e:?}"
                );
                assert!(
                    e.missing_class().is_some(),
                    "refusals: missing node error names no class: {e:?}"
                );
            }
            Err(e) => panic!("refusals: missing node: unexpected error {e:?}"),
            Ok(_) => panic!("refusals: a workflow with a missing node class was accepted"),
        }
    }
}
