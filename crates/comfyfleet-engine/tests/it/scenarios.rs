use std::collections::BTreeMap;
use std::time::Duration;

use comfyfleet_core::{
    AttemptOutcome, Availability, BackendId, CancelOutcome, Clock, ErrorKind, EventKind,
    ExecutionError, FleetEvent, JobSpec, JobState, NewJob, SubmitRequest, TaskStore, TimeoutPhase,
};
use comfyfleet_engine::EngineError;
use comfyfleet_testkit::{FakeBackend, Fault, workflows};

use crate::harness::*;

fn hang_first_attempt(fault: Fault) -> impl Fn(&SubmitRequest) -> Fault + Send + Sync + 'static {
    move |req| {
        if req.attempt == 1 {
            fault.clone()
        } else {
            Fault::None
        }
    }
}

/// The very first submission anywhere in the fleet gets `fault`; the rest run normally.
fn once_in_the_fleet(
    fault: Fault,
) -> impl Fn(&SubmitRequest) -> Fault + Send + Sync + Clone + 'static {
    let fired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    move |_| {
        if fired.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Fault::None
        } else {
            fault.clone()
        }
    }
}

#[tokio::test(start_paused = true)]
async fn accepted_but_never_started_fails_over_after_exactly_the_start_timeout() {
    let once = once_in_the_fleet(Fault::HangBeforeStart);
    let a = FakeBackend::builder("gpu-a").fault_fn(once.clone()).build();
    let b = FakeBackend::builder("gpu-b").fault_fn(once).build();
    let mut h = harness(&[a.clone(), b.clone()], config());
    let id = h.submit(JobSpec::new(workflows::invert())).await;
    let job = h.finish(id).await;

    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.attempts.len(), 2);
    let (first, second) = (&job.attempts[0], &job.attempts[1]);
    assert_ne!(first.backend, second.backend, "retried on another backend");
    assert_eq!(first.outcome, Some(AttemptOutcome::TimedOut));
    assert_eq!(
        first.error.as_ref().unwrap().timeout_phase(),
        Some(TimeoutPhase::Start)
    );
    assert_eq!(
        ms(second.dispatched_at) - ms(first.dispatched_at),
        5_000,
        "exactly the start timeout"
    );
    assert_eq!(second.outcome, Some(AttemptOutcome::Succeeded));
    let hung = if first.backend.as_str() == "gpu-a" {
        &a
    } else {
        &b
    };
    assert_eq!(
        hung.stats().cancels,
        1,
        "the hung execution was cancelled on its backend"
    );

    // Blocked for this structure for the cooldown, then unblocked (events observed).
    let blocked_backend = first.backend.clone();
    let (ev, _) = h
        .wait_fleet(|e| matches!(e, FleetEvent::BackendBlocked { backend, .. } if *backend == blocked_backend))
        .await;
    let FleetEvent::BackendBlocked {
        until, structure, ..
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(&structure, workflows::invert().structure_hash());
    assert_eq!(ms(until), ms(first.ended_at.unwrap()) + 60_000);

    // While blocked, the same structure goes elsewhere with the reason recorded.
    let id2 = h.submit(JobSpec::new(workflows::invert())).await;
    let job2 = h.finish(id2).await;
    assert_eq!(job2.attempts.len(), 1);
    assert_ne!(job2.attempts[0].backend, blocked_backend);
    let skips = dispatched_skips(&h.events(id2).await);
    assert!(
        skips
            .iter()
            .any(|s| s.starts_with(blocked_backend.as_str())
                && s.contains("blocked for this workflow")),
        "{skips:?}"
    );

    let (_, seen) = h
        .wait_fleet(|e| matches!(e, FleetEvent::BackendUnblocked { backend, .. } if *backend == blocked_backend))
        .await;
    assert!(
        seen >= until && ms(seen) <= ms(until) + 1_000,
        "unblocked at {} for block until {}",
        ms(seen),
        ms(until)
    );
}

#[tokio::test(start_paused = true)]
async fn a_prompt_queued_behind_others_is_not_timed_out_while_it_waits() {
    let a = FakeBackend::builder("gpu-a").build();
    a.occupy(Duration::from_secs(20));
    let h = harness(&[a.clone()], config());
    let id = h.submit(JobSpec::new(workflows::invert())).await;
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.attempts.len(), 1, "never timed out");
    let at = &job.attempts[0];
    assert_eq!(ms(at.started_at.unwrap()) - ms(at.dispatched_at), 20_000);
    let events = h.events(id).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e.kind, EventKind::Queued { position: 1, .. })),
        "{:?}",
        names(&events)
    );
}

#[tokio::test(start_paused = true)]
async fn waiting_forever_behind_a_stuck_prompt_is_bounded_by_the_queue_timeout() {
    let a = FakeBackend::builder("gpu-a").build();
    let b = FakeBackend::builder("gpu-b").build();
    a.occupy(Duration::from_secs(100_000));
    b.occupy(Duration::from_secs(100_000));
    let cfg = comfyfleet_engine::EngineConfig {
        queue_timeout: Duration::from_secs(120),
        ..config()
    };
    let h = harness(&[a, b], cfg);
    let id = h
        .submit(JobSpec::new(workflows::invert()).max_attempts(2))
        .await;
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts.len(), 2);
    for at in &job.attempts {
        assert_eq!(
            at.error.as_ref().unwrap().timeout_phase(),
            Some(TimeoutPhase::Queued)
        );
        assert_eq!(ms(at.ended_at.unwrap()) - ms(at.dispatched_at), 120_000);
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_that_keeps_sending_progress_is_never_timed_out() {
    let a = FakeBackend::builder("gpu-a").ticks(60).build();
    let cfg = comfyfleet_engine::EngineConfig {
        node_timeout: Duration::from_secs(10),
        ..config()
    };
    let h = harness(&[a], cfg);
    // 120 s in one node, a progress tick every 2 s.
    let id = h.submit(JobSpec::new(workflows::sleep(120.0))).await;
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.attempts.len(), 1);
    let at = &job.attempts[0];
    assert_eq!(
        ms(at.ended_at.unwrap()) - ms(at.started_at.unwrap()),
        120_000
    );
}

async fn silent_node_timeout(
    cfg: comfyfleet_engine::EngineConfig,
    spec: JobSpec,
) -> (i64, ExecutionError) {
    let a = FakeBackend::builder("gpu-a")
        .fault_fn(hang_first_attempt(Fault::HangMidNode { node: 1 }))
        .build();
    let b = FakeBackend::builder("gpu-b")
        .fault_fn(hang_first_attempt(Fault::HangMidNode { node: 1 }))
        .build();
    let h = harness(&[a, b], cfg);
    let id = h.submit(spec).await;
    let job = h.finish(id).await;
    assert_eq!(
        job.state,
        JobState::Succeeded,
        "failed over after the node timeout"
    );
    assert_eq!(job.attempts.len(), 2);
    let first = &job.attempts[0];
    assert_eq!(first.outcome, Some(AttemptOutcome::TimedOut));
    let hung_node = first
        .nodes
        .iter()
        .find(|n| n.node == "2")
        .expect("node 2 timing recorded");
    assert_eq!(hung_node.ended_at, None, "the hung node never finished");
    (
        ms(first.ended_at.unwrap()) - ms(hung_node.started_at),
        first.error.clone().unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_times_out_after_the_node_timeout() {
    let cfg = comfyfleet_engine::EngineConfig {
        node_timeout: Duration::from_secs(10),
        ..config()
    };
    let (after, err) = silent_node_timeout(cfg, JobSpec::new(workflows::sleep(1.0))).await;
    assert_eq!(after, 10_000);
    assert_eq!(err.timeout_phase(), Some(TimeoutPhase::NodeSilence));
    assert_eq!(err.node.as_deref(), Some("2"));
    assert!(
        err.message.contains("node 2 sent no progress"),
        "{}",
        err.message
    );
}

#[tokio::test(start_paused = true)]
async fn a_per_class_node_timeout_wins() {
    let mut cfg = comfyfleet_engine::EngineConfig {
        node_timeout: Duration::from_secs(10),
        ..config()
    };
    cfg.node_class_timeouts
        .insert("TestSleep".into(), Duration::from_secs(3));
    let (after, _) = silent_node_timeout(cfg.clone(), JobSpec::new(workflows::sleep(1.0))).await;
    assert_eq!(after, 3_000, "engine-wide per-class override");

    let mut spec = JobSpec::new(workflows::sleep(1.0));
    spec.timeouts.node_class_ms = BTreeMap::from([("TestSleep".to_string(), 1_500)]);
    let (after, _) = silent_node_timeout(cfg, spec).await;
    assert_eq!(
        after, 1_500,
        "the job's own per-class override wins over the engine's"
    );
}

#[tokio::test(start_paused = true)]
async fn a_deterministic_failure_gets_one_attempt_and_the_backends_message() {
    let reject = |_: &SubmitRequest| Fault::Reject {
        error: ExecutionError::deterministic(
            "Prompt outputs failed validation: Value 0 smaller than min of 1",
        ),
    };
    let a = FakeBackend::builder("gpu-a").fault_fn(reject).build();
    let b = FakeBackend::builder("gpu-b").fault_fn(reject).build();
    let h = harness(&[a.clone(), b.clone()], config());
    let id = h
        .submit(JobSpec::new(workflows::invert()).max_attempts(5))
        .await;
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts.len(), 1);
    let err = job.error.unwrap();
    assert_eq!(err.kind, ErrorKind::Deterministic);
    assert!(
        err.message.contains("Value 0 smaller than min of 1"),
        "{}",
        err.message
    );
    assert_eq!(a.stats().submitted + b.stats().submitted, 1);
}

#[tokio::test(start_paused = true)]
async fn routing_by_inventory_never_sends_a_job_where_its_node_is_missing() {
    let a = FakeBackend::builder("gpu-a").standard_nodes().build();
    let b = FakeBackend::builder("gpu-b")
        .node_classes(
            workflows::STANDARD_CLASSES
                .iter()
                .copied()
                .chain(["FleetNoSuchNode"]),
        )
        .build();
    let h = harness(&[a.clone(), b.clone()], config());
    for _ in 0..5 {
        let id = h.submit(JobSpec::new(workflows::missing_node())).await;
        let job = h.finish(id).await;
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(job.attempts.len(), 1);
        assert_eq!(job.attempts[0].backend.as_str(), "gpu-b");
        let skips = dispatched_skips(&h.events(id).await);
        assert_eq!(
            skips,
            vec!["gpu-a: no node class FleetNoSuchNode".to_string()]
        );
    }
    assert_eq!(a.stats().submitted, 0);
}

#[tokio::test(start_paused = true)]
async fn a_missing_node_failure_moves_the_job_to_the_backend_that_has_the_node() {
    // gpu-a's inventory is unknown: it learns the hard way, once.
    let a = FakeBackend::builder("gpu-a")
        .fault_fn(|req: &SubmitRequest| {
            if req.workflow.required_classes().contains("FleetNoSuchNode") {
                Fault::Reject {
                    error: ExecutionError::missing_node("FleetNoSuchNode", Some("2".into())),
                }
            } else {
                Fault::None
            }
        })
        .build();
    let b = FakeBackend::builder("gpu-b").build();
    let mut h = harness(&[a.clone(), b.clone()], config());
    h.engine.drain(&BackendId::new("gpu-b")).unwrap();
    let id = h.submit(JobSpec::new(workflows::missing_node())).await;
    h.wait_job_event(id, "attempt_failed").await;
    let waiting = h.wait_job_event(id, "waiting").await;
    let EventKind::Waiting { reason, .. } = &waiting.kind else {
        unreachable!()
    };
    assert!(
        reason.contains("gpu-a: no node class FleetNoSuchNode"),
        "{reason}"
    );
    assert!(reason.contains("gpu-b: draining"), "{reason}");
    let pending = store_get(&h.store, id).await;
    assert_eq!(pending.state, JobState::Pending);
    assert!(
        pending
            .wait_reason
            .unwrap()
            .contains("no backend can take it now")
    );

    h.engine.enable(&BackendId::new("gpu-b")).unwrap();
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Succeeded);
    let backends: Vec<&str> = job.attempts.iter().map(|a| a.backend.as_str()).collect();
    assert_eq!(backends, ["gpu-a", "gpu-b"]);
    assert_eq!(
        job.attempts[0].error.as_ref().unwrap().missing_class(),
        Some("FleetNoSuchNode")
    );
    assert_eq!(a.stats().submitted, 1, "gpu-a is never tried again for it");
}

#[tokio::test(start_paused = true)]
async fn a_node_nobody_has_fails_with_an_error_naming_it() {
    let a = FakeBackend::builder("gpu-a").standard_nodes().build();
    let b = FakeBackend::builder("gpu-b").standard_nodes().build();
    let h = harness(&[a, b], config());
    let id = h.submit(JobSpec::new(workflows::missing_node())).await;
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(job.attempts.is_empty());
    let err = job.error.unwrap();
    assert!(
        err.message
            .contains("no backend in the fleet has node class FleetNoSuchNode"),
        "{}",
        err.message
    );
    assert_eq!(err.missing_class(), Some("FleetNoSuchNode"));
}

#[tokio::test(start_paused = true)]
async fn force_cancel_of_a_running_job_calls_the_backends_cancel() {
    let a = FakeBackend::builder("gpu-a").ticks(30).build();
    let mut h = harness(&[a.clone()], config());
    let id = h.submit(JobSpec::new(workflows::sleep(60.0))).await;
    h.wait_job_event(id, "progress").await;
    assert_eq!(
        h.engine.force_cancel(id).await.unwrap(),
        CancelOutcome::CancelRequested
    );
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(a.stats().cancels, 1);
    assert_eq!(a.stats().succeeded, 0);
    let at = &job.attempts[0];
    assert_eq!(at.outcome, Some(AttemptOutcome::Cancelled));
    let steps: Vec<&str> = at.cancel_steps.iter().map(|s| s.action.as_str()).collect();
    assert_eq!(steps, ["remote_cancel"]);
    assert!(
        at.cancel_steps[0].result.contains("InterruptSent"),
        "{:?}",
        at.cancel_steps
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_of_a_pending_job_never_reaches_a_backend() {
    let a = FakeBackend::builder("gpu-a").build();
    let mut h = harness(&[a.clone()], config());
    let first = h.submit(JobSpec::new(workflows::sleep(30.0))).await;
    h.wait_job_event(first, "started").await;
    let second = h.submit(JobSpec::new(workflows::invert())).await;
    assert_eq!(
        h.engine.cancel(second).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(h.finish(second).await.state, JobState::Cancelled);
    assert_eq!(h.finish(first).await.state, JobState::Succeeded);
    assert_eq!(a.stats().jobs, vec![first]);
    // A plain cancel leaves a running job alone and says so.
    let third = h.submit(JobSpec::new(workflows::sleep(30.0))).await;
    h.wait_job_event(third, "started").await;
    assert_eq!(
        h.engine.cancel(third).await.unwrap(),
        CancelOutcome::Running
    );
    assert_eq!(h.finish(third).await.state, JobState::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn a_run_that_completes_before_the_cancel_takes_effect_stays_succeeded() {
    let a = FakeBackend::builder("gpu-a")
        .ticks(4)
        .faults([Fault::IgnoreCancel])
        .build();
    let mut h = harness(&[a.clone()], config());
    let id = h.submit(JobSpec::new(workflows::sleep(4.0))).await;
    h.wait_job_event(id, "progress").await;
    assert_eq!(
        h.engine.force_cancel(id).await.unwrap(),
        CancelOutcome::CancelRequested
    );
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Succeeded, "completion won the race");
    assert_eq!(a.stats().cancels, 1);
    assert_eq!(job.attempts[0].outcome, Some(AttemptOutcome::Succeeded));
    assert!(!job.artifacts.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stuck_node_is_cancelled_by_restarting_a_restartable_backend() {
    let a = FakeBackend::builder("gpu-a")
        .restartable(true)
        .faults([Fault::Stuck { node: 1 }])
        .build();
    let mut h = harness(&[a.clone()], config());
    let id = h.submit(JobSpec::new(workflows::sleep(5.0))).await;
    h.wait_job_event(id, "started").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = h.clock.now();
    h.engine.force_cancel(id).await.unwrap();
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Cancelled);
    let at = &job.attempts[0];
    let steps: Vec<&str> = at.cancel_steps.iter().map(|s| s.action.as_str()).collect();
    assert_eq!(steps, ["remote_cancel", "restart_backend"]);
    assert_eq!(
        ms(at.cancel_steps[1].at) - ms(asked),
        10_000,
        "after the cancel grace"
    );
    assert_eq!(a.stats().restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stuck_node_on_a_backend_that_cannot_restart_quarantines_it() {
    let a = FakeBackend::builder("gpu-a")
        .faults([Fault::Stuck { node: 1 }])
        .build();
    let mut h = harness(&[a.clone()], config());
    let id = h.submit(JobSpec::new(workflows::sleep(5.0))).await;
    h.wait_job_event(id, "started").await;
    h.engine.force_cancel(id).await.unwrap();
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Cancelled, "cancelled either way");
    let steps: Vec<&str> = job.attempts[0]
        .cancel_steps
        .iter()
        .map(|s| s.action.as_str())
        .collect();
    assert_eq!(steps, ["remote_cancel", "quarantine_backend"]);
    h.wait_fleet(|e| matches!(e, FleetEvent::BackendQuarantined { .. }))
        .await;
    assert!(matches!(
        h.engine.backends()[0].availability,
        Availability::Quarantined { .. }
    ));
    // No new work until a health check passes; then it is released.
    h.wait_fleet(|e| matches!(e, FleetEvent::BackendReleased { .. }))
        .await;
    assert_eq!(h.engine.backends()[0].availability, Availability::Active);
}

#[tokio::test(start_paused = true)]
async fn batch_cancel_reports_per_id() {
    let a = FakeBackend::builder("gpu-a").build();
    let mut h = harness(&[a.clone()], config());
    let done = h.submit(JobSpec::new(workflows::invert())).await;
    h.finish(done).await;
    let running = h.submit(JobSpec::new(workflows::sleep(30.0))).await;
    h.wait_job_event(running, "started").await;
    let pending = h.submit(JobSpec::new(workflows::invert())).await;
    let ghost = comfyfleet_core::JobId::new();
    let out = h
        .engine
        .cancel_many(&[pending, done, ghost, running], false)
        .await;
    assert!(matches!(out[0].1, Ok(CancelOutcome::Cancelled)));
    assert!(matches!(
        out[1].1,
        Ok(CancelOutcome::AlreadyTerminal(JobState::Succeeded))
    ));
    assert!(matches!(out[2].1, Err(EngineError::NotFound(id)) if id == ghost));
    assert!(matches!(out[3].1, Ok(CancelOutcome::Running)));
    let forced = h.engine.cancel_many(&[running], true).await;
    assert!(matches!(forced[0].1, Ok(CancelOutcome::CancelRequested)));
    assert_eq!(h.finish(running).await.state, JobState::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn an_engine_restart_reattaches_instead_of_running_twice() {
    let a = FakeBackend::builder("gpu-a").ticks(30).build();
    let store = std::sync::Arc::new(comfyfleet_core::MemoryStore::new());
    let mut first = harness_with(&[a.clone()], config(), store.clone());
    let id = first.submit(JobSpec::new(workflows::sleep(30.0))).await;
    first.wait_job_event(id, "progress").await;
    first.engine.shutdown(Duration::ZERO).await;
    let detached = store_get(&store, id).await;
    assert_eq!(detached.state, JobState::RetryWait);
    assert_eq!(detached.attempts[0].outcome, Some(AttemptOutcome::Detached));

    let second = harness_with(&[a.clone()], config(), store.clone());
    let job = second.finish(id).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(a.stats().submitted, 1, "submitted once, reattached once");
    assert!(job.attempts[1].reattached);
    assert!(names(&second.events(id).await).contains(&"reattached"));
}

#[tokio::test(start_paused = true)]
async fn a_job_held_by_a_dead_orchestrator_is_reaped_and_run() {
    let a = FakeBackend::builder("gpu-a").build();
    let store = std::sync::Arc::new(comfyfleet_core::MemoryStore::new());
    let now = comfyfleet_core::Timestamp::from_millis(T0);
    let enq = store
        .enqueue(NewJob::new(JobSpec::new(workflows::invert())), now)
        .await
        .unwrap();
    let claimed = store
        .claim("ghost", Duration::from_secs(30), now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.lease.job, enq.id);
    let h = harness_with(&[a], config(), store.clone());
    let job = h.finish(enq.id).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.crash_requeues, 1);
    let names = names(&h.events(enq.id).await);
    assert!(names.contains(&"requeued"), "{names:?}");
}

#[tokio::test(start_paused = true)]
async fn when_every_backend_is_blocked_the_job_waits_visibly_and_runs_after_the_cooldown() {
    let a = FakeBackend::builder("gpu-a")
        .faults([Fault::HangBeforeStart])
        .build();
    let mut h = harness(&[a.clone()], config());
    let id = h.submit(JobSpec::new(workflows::invert())).await;
    let waiting = h.wait_job_event(id, "waiting").await;
    let job = store_get(&h.store, id).await;
    assert_eq!(job.state, JobState::Pending);
    assert!(
        job.wait_reason
            .as_deref()
            .unwrap()
            .contains("blocked for this workflow"),
        "{:?}",
        job.wait_reason
    );
    let EventKind::Waiting { until, .. } = waiting.kind else {
        unreachable!()
    };
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.attempts.len(), 2);
    assert!(job.attempts[1].dispatched_at >= until.unwrap());
    assert_eq!(
        ms(job.attempts[1].dispatched_at) - ms(job.attempts[0].ended_at.unwrap()),
        60_000
    );
}

#[tokio::test(start_paused = true)]
async fn progress_is_real_monotonic_coalesced_and_has_an_eta_next_time() {
    let a = FakeBackend::builder("gpu-a").ticks(1000).build();
    let h = harness(&[a], config());
    let id = h.submit(JobSpec::new(workflows::sleep(10.0))).await;
    let job = h.finish(id).await;
    let progress: Vec<comfyfleet_core::Progress> = h
        .events(id)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Progress { progress, .. } => Some(progress),
            _ => None,
        })
        .collect();
    assert!(
        progress.len() > 5 && progress.len() < 100,
        "1000 ticks coalesced into {} writes",
        progress.len()
    );
    for w in progress.windows(2) {
        assert!(
            w[1].percent >= w[0].percent,
            "went backwards: {} then {}",
            w[0].percent,
            w[1].percent
        );
    }
    let (last, before) = progress.split_last().unwrap();
    assert_eq!(last.percent, 100.0);
    assert!(before.iter().all(|p| p.percent < 100.0));
    assert!(
        before.iter().any(|p| p.percent > 25.0 && p.percent < 75.0),
        "intermediate values, not 50/100"
    );
    assert_eq!(job.progress.unwrap().percent, 100.0);

    // The same structure again: an ETA from the first run.
    let id2 = h
        .submit(JobSpec::new(workflows::sleep_with_prefix(10.0, "again")))
        .await;
    h.finish(id2).await;
    let etas: Vec<u64> = h
        .events(id2)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Progress { progress, .. } => progress.eta_ms,
            _ => None,
        })
        .collect();
    assert!(
        etas.iter().any(|eta| (4_000..=9_000).contains(eta)),
        "{etas:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn bad_specs_are_refused_before_anything_is_stored() {
    let a = FakeBackend::builder("gpu-a").build();
    let h = harness(&[a], config());
    let err = h
        .engine
        .submit(JobSpec::new(workflows::invert()).max_attempts(0))
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidSpec(_)), "{err}");
    let mut spec = JobSpec::new(workflows::invert());
    spec.inputs
        .entry("99".into())
        .or_default()
        .insert("x".into(), serde_json::json!(1));
    let err = h.engine.submit(spec).await.unwrap_err();
    assert!(err.to_string().contains("no such node"), "{err}");
    assert_eq!(h.store.counts().await.unwrap().total(), 0);
}

#[tokio::test(start_paused = true)]
async fn idempotent_submit_returns_the_same_job() {
    let a = FakeBackend::builder("gpu-a").build();
    let h = harness(&[a.clone()], config());
    let spec = JobSpec::new(workflows::invert()).idempotency_key("order-42");
    let one = h
        .engine
        .submit_job(NewJob::new(spec.clone()))
        .await
        .unwrap();
    let two = h.engine.submit_job(NewJob::new(spec)).await.unwrap();
    assert!(one.created && !two.created);
    assert_eq!(one.id, two.id);
    h.finish(one.id).await;
    assert_eq!(a.stats().submitted, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_fleet_does_not_turn_into_a_write_storm() {
    let a = FakeBackend::builder("gpu-a").build();
    a.set_healthy(false);
    let h = harness(&[a.clone()], config());
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(h.submit(JobSpec::new(workflows::invert())).await);
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    let mut claims = 0;
    for id in &ids {
        let job = store_get(&h.store, *id).await;
        assert_eq!(job.state, JobState::Pending);
        claims += job.claims;
    }
    // Cycling every job every 500 ms would be 6,000 claims; backing off keeps it near 2/s.
    assert!(
        claims <= 200,
        "{claims} claims in 60 s for a fleet that cannot run anything"
    );
    let reason = store_get(&h.store, ids[0])
        .await
        .wait_reason
        .unwrap_or_default();
    assert!(reason.contains("unhealthy"), "{reason}");
    a.set_healthy(true);
    for id in ids {
        assert_eq!(h.finish(id).await.state, JobState::Succeeded);
    }
}

#[tokio::test(start_paused = true)]
async fn a_subscriber_that_never_reads_does_not_slow_the_engine() {
    let a = FakeBackend::builder("gpu-a").capacity(4).build();
    let cfg = comfyfleet_engine::EngineConfig {
        event_buffer: 16,
        ..config()
    };
    let mut h = harness(&[a], cfg);
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(h.submit(JobSpec::new(workflows::invert())).await);
    }
    for id in ids {
        assert_eq!(h.finish(id).await.state, JobState::Succeeded);
    }
    // `h.rx` was subscribed before the first job and never read: it lagged, the engine did not wait.
    match h.rx.try_recv() {
        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
            assert!(n > 100, "missed {n}")
        }
        other => panic!("expected a lag signal, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_job_with_inputs_never_goes_to_a_backend_that_cannot_take_uploads() {
    let a = FakeBackend::builder("gpu-a").build();
    let h = harness(&[a.clone()], config());
    let upload = h
        .engine
        .put_input("cat.png", bytes::Bytes::from_static(b"png"))
        .await
        .unwrap();
    let mut spec = JobSpec::new(workflows::invert());
    spec.uploads.push(upload);
    let id = h.submit(spec).await;
    let job = h.finish(id).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.error
            .unwrap()
            .message
            .contains("gpu-a: does not accept input uploads"),
        "the reason names the backend"
    );
    assert_eq!(a.stats().submitted, 0);
}
