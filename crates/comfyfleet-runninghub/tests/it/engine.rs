//! The real [`Engine`] driving [`RunningHubBackend`] against `RunningHubSim` (or, where the
//! simulator cannot produce an answer, the scripted loopback mock), on tokio's paused clock: the
//! simulator, the backend's polling and the engine's clocks all run on `tokio::time`, so every
//! duration below is virtual.

use std::sync::Arc;
use std::time::Duration;

use comfyfleet_core::{
    AttemptOutcome, Backend, ErrorDetail, ErrorKind, EventKind, ExecutionError, JobId, JobRecord,
    JobSpec, JobState, MemoryStore, Timestamp, TokioClock, Workflow,
};
use comfyfleet_engine::{Engine, EngineConfig, SmartFailover, SmartFailoverConfig};
use comfyfleet_runninghub::{RunningHubBackend, RunningHubConfig};
use comfyfleet_testkit::runninghub_sim::{
    ApiKeyConfig, DEFAULT_API_KEY, RunningHubSim, RunningHubSimConfig, RunningHubStats,
    WorkflowSpec,
};
use comfyfleet_testkit::{FakeBackend, Fault, workflows};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::mock::{KEY, Mock, Script, env, st};

const T0: i64 = 1_800_000_000_000;

fn hosted(id: &str) -> Workflow {
    Workflow::from_value(json!({
        "rh": {"class_type": "RunningHubWorkflow", "inputs": {"workflow_id": id}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}}
    }))
    .unwrap()
}

/// Hosted workflows that differ in a widget value: distinct jobs, distinct content hashes.
fn hosted_n(id: &str, n: usize) -> Workflow {
    Workflow::from_value(json!({
        "rh": {"class_type": "RunningHubWorkflow", "inputs": {"workflow_id": id}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": format!("a cat #{n}")}}
    }))
    .unwrap()
}

fn rh_config(base_url: &str, key: &str) -> RunningHubConfig {
    let mut c = RunningHubConfig::new("rh", base_url.parse().unwrap(), SecretString::from(key));
    c.poll_min = Duration::from_secs(1);
    c.poll_max = Duration::from_secs(5);
    c.client.call_timeout = Duration::from_secs(10);
    c.backpressure_wait = Duration::from_secs(1);
    c.backpressure_max_wait = Duration::from_secs(25);
    c
}

fn engine(backends: Vec<Arc<dyn Backend>>) -> Engine {
    let e = Engine::builder(
        Arc::new(MemoryStore::new()),
        Arc::new(SmartFailover::new(SmartFailoverConfig {
            jitter: false,
            seed: Some(7),
            ..SmartFailoverConfig::default()
        })),
    )
    .backends(backends)
    .config(EngineConfig {
        owner: "rh-engine-test".into(),
        ..EngineConfig::default()
    })
    .clock(Arc::new(TokioClock::starting_at(Timestamp::from_millis(
        T0,
    ))))
    .build()
    .unwrap();
    e.start();
    e
}

async fn finish(e: &Engine, id: JobId) -> JobRecord {
    tokio::time::timeout(Duration::from_secs(3600), e.wait_for(id))
        .await
        .expect("job did not finish within a virtual hour")
        .unwrap()
}

/// Waits (virtual time) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(600), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// Ten distinct hosted jobs at once on a key that allows 2 current tasks, through a backend
/// configured for 5. Returns the finished jobs, the simulator's counters and the backend.
async fn storm() -> (
    Vec<JobRecord>,
    RunningHubStats,
    RunningHubSim,
    RunningHubBackend,
) {
    let sim = RunningHubSim::start(
        RunningHubSimConfig::default()
            .key(DEFAULT_API_KEY, ApiKeyConfig::with_limit(2))
            .workflow(
                "1987",
                WorkflowSpec::timed(Duration::from_secs(1), Duration::from_secs(5)),
            ),
    )
    .await
    .unwrap();
    let mut cfg = rh_config(&sim.base_url(), DEFAULT_API_KEY);
    cfg.max_concurrent = 5;
    let backend = RunningHubBackend::new(cfg).unwrap();
    let e = engine(vec![Arc::new(backend.clone()) as Arc<dyn Backend>]);
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(e.submit(JobSpec::new(hosted_n("1987", n))).await.unwrap());
    }
    let mut jobs = Vec::new();
    for id in &ids {
        let job = finish(&e, *id).await;
        for a in &job.attempts {
            eprintln!(
                "job {id} attempt {} dispatched +{} ms ended +{:?} ms outcome {:?} error {:?}",
                a.number,
                a.dispatched_at.as_millis() - T0,
                a.ended_at.map(|t| t.as_millis() - T0),
                a.outcome,
                a.error.as_ref().map(|e| &e.message)
            );
        }
        jobs.push(job);
    }
    let stats = sim.stats();
    eprintln!(
        "storm: tasks_created={} tasks_rejected_limit(814)={} max_current={:?} max_running={:?}",
        stats.tasks_created,
        stats.tasks_rejected_limit,
        stats.max_current_per_key,
        stats.max_running_per_key
    );
    (jobs, stats, sim, backend)
}

/// A 814 storm: the key allows 2 current tasks, the backend is configured for 5, 10 jobs at
/// once. Every job succeeds (814 is back-pressure, never a job failure), and the simulator never
/// saw more than 2 current tasks of the key.
#[tokio::test(start_paused = true)]
async fn storm_814_ten_jobs_limit_two_all_succeed() {
    let (jobs, stats, sim, backend) = storm().await;
    for job in &jobs {
        assert_eq!(
            job.state,
            JobState::Succeeded,
            "{}: {:?}",
            job.id,
            job.error
        );
        assert_eq!(job.artifacts.len(), 1, "{}", job.id);
    }
    assert_eq!(stats.tasks_created, 10, "{stats:?}");
    assert!(
        stats.tasks_rejected_limit > 0,
        "no 814 was answered: the storm did not happen ({stats:?})"
    );
    assert!(
        stats
            .max_current_per_key
            .get(DEFAULT_API_KEY)
            .is_some_and(|n| *n <= 2),
        "{stats:?}"
    );
    assert!(
        stats
            .max_running_per_key
            .get(DEFAULT_API_KEY)
            .is_some_and(|n| *n <= 2),
        "{stats:?}"
    );
    assert!(sim.tasks().iter().all(|t| t.status == "SUCCESS"));
    // Every slot was given back.
    until("the backend's slots to be released", || {
        backend.in_flight() == 0
    })
    .await;
}

/// The stricter form of the storm: waiting for a slot of the key never costs an attempt.
/// Fails today: `submit` waits for a slot by polling (`try_reserve` + sleep), not in FIFO order,
/// while the engine keeps `capabilities().max_concurrent` (5) submits open; a submit dispatched
/// when a slot frees takes it at once, and submits waiting since t=0 give up after
/// `backpressure_max_wait` with a transient "at its concurrency limit" error (a failed attempt
/// and a circuit-breaker failure each).
#[tokio::test(start_paused = true)]
async fn storm_814_waiting_for_a_slot_costs_no_attempt() {
    let (jobs, _, _, _) = storm().await;
    let failed: Vec<_> = jobs
        .iter()
        .flat_map(|j| j.attempts.iter().filter_map(|a| a.error.clone()))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(jobs.iter().all(|j| j.attempts.len() == 1));
}

/// A long task, cancelled by `force_cancel` while RunningHub runs it: the job ends `cancelled`
/// and the simulator saw the cancel of that very task.
#[tokio::test(start_paused = true)]
async fn cancel_of_a_running_cloud_task_ends_cancelled() {
    let sim = RunningHubSim::start(RunningHubSimConfig::default().workflow(
        "long",
        WorkflowSpec::timed(Duration::from_secs(1), Duration::from_secs(3600)),
    ))
    .await
    .unwrap();
    let backend = RunningHubBackend::new(rh_config(&sim.base_url(), DEFAULT_API_KEY)).unwrap();
    let e = engine(vec![Arc::new(backend.clone()) as Arc<dyn Backend>]);
    let id = e.submit(JobSpec::new(hosted("long"))).await.unwrap();
    until("the task to be RUNNING", || {
        sim.tasks().first().is_some_and(|t| t.status == "RUNNING")
    })
    .await;
    // And the engine knows it started (its attempt has the remote task id).
    let task_id = sim.tasks()[0].task_id.clone();
    e.force_cancel(id).await.unwrap();
    let job = finish(&e, id).await;
    assert_eq!(job.state, JobState::Cancelled, "{:?}", job.error);
    assert_eq!(job.attempts.len(), 1);
    assert_eq!(
        job.attempts[0]
            .remote
            .as_ref()
            .map(|r| r.as_str().to_owned()),
        Some(task_id.clone())
    );
    assert_eq!(job.attempts[0].outcome, Some(AttemptOutcome::Cancelled));
    let stats = sim.stats();
    assert_eq!(stats.tasks_cancelled, 1, "{stats:?}");
    assert!(stats.requests_to("/task/openapi/cancel") >= 1, "{stats:?}");
    let tasks = sim.tasks();
    assert_eq!(tasks.len(), 1, "no second task: {tasks:?}");
    assert_eq!(tasks[0].task_id, task_id);
    assert_eq!(tasks[0].status, "CANCELLED");
    until("the backend's slot to be released", || {
        backend.in_flight() == 0
    })
    .await;
}

/// RunningHub forgets a running task (807 on status). The simulator has no public way to forget
/// a task (its task table is crate-private and a status of another key's task is the only other
/// 807), so this runs against the scripted mock: the first task answers RUNNING then 807, the
/// second RUNNING then SUCCESS. The engine sees the execution as lost, retries, and succeeds.
#[tokio::test(start_paused = true)]
async fn task_lost_by_the_cloud_807_is_retried() {
    let mock = Mock::start().await;
    mock.next_task(Script::new(
        vec![
            st("RUNNING"),
            st("RUNNING"),
            env(807, "APIKEY_TASK_NOT_FOUND", Value::Null),
        ],
        env(807, "APIKEY_TASK_NOT_FOUND", Value::Null),
    ));
    let backend = RunningHubBackend::new(rh_config(&mock.base, KEY)).unwrap();
    let e = engine(vec![Arc::new(backend.clone()) as Arc<dyn Backend>]);
    let id = e.submit(JobSpec::new(hosted("1987"))).await.unwrap();
    until("the first create", || {
        mock.calls("/task/openapi/create") >= 1
    })
    .await;
    // From now on, tasks behave.
    mock.next_task(Script::new(
        vec![st("RUNNING"), st("SUCCESS")],
        env(
            0,
            "SUCCESS",
            json!([{"fileUrl": mock.file_url("ComfyUI_0001.png"), "fileType": "png", "nodeId": "9"}]),
        ),
    ));
    let job = finish(&e, id).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
    let first = &job.attempts[0];
    let err = first.error.as_ref().expect("the first attempt failed");
    assert_eq!(err.kind, ErrorKind::Transient, "{err:?}");
    assert_eq!(err.detail, Some(ErrorDetail::Lost), "{err:?}");
    let second = &job.attempts[1];
    assert!(second.error.is_none(), "{second:?}");
    assert_eq!(second.outcome, Some(AttemptOutcome::Succeeded));
    assert_ne!(first.remote, second.remote, "a new task was created");
    assert_eq!(mock.calls("/task/openapi/create"), 2);
    assert_eq!(job.artifacts.len(), 1);
    assert_eq!(job.artifacts[0].filename, "ComfyUI_0001.png");
}

/// A FakeBackend (standard ComfyUI node classes) next to RunningHub (capacity 1, with a default
/// workflow id so plain graphs run there too).
/// (a) A hosted workflow runs on RunningHub only: the FakeBackend lacks `RunningHubWorkflow`.
/// (b) While RunningHub is busy with (a), a plain workflow goes to the FakeBackend, fails there
///     with a backend-specific fault (CUDA OOM), moves to RunningHub, and succeeds: one job id,
///     two attempts on two backends.
#[tokio::test(start_paused = true)]
async fn mixed_fleet_fails_over_between_comfyui_and_runninghub() {
    let sim = RunningHubSim::start(
        RunningHubSimConfig::default()
            .key(DEFAULT_API_KEY, ApiKeyConfig::with_limit(2))
            .workflow(
                "hosted",
                WorkflowSpec::timed(Duration::from_secs(1), Duration::from_secs(20)),
            )
            .workflow(
                "plain",
                WorkflowSpec::timed(Duration::from_secs(1), Duration::from_secs(3)),
            ),
    )
    .await
    .unwrap();
    let gpu = FakeBackend::builder("gpu")
        .standard_nodes()
        .faults([Fault::Fail {
            after_nodes: 0,
            error: ExecutionError::backend_specific("torch.OutOfMemoryError: CUDA out of memory"),
        }])
        .build();
    let mut cfg = rh_config(&sim.base_url(), DEFAULT_API_KEY);
    cfg.max_concurrent = 1;
    cfg.default_workflow_id = Some("plain".into());
    let rh = RunningHubBackend::new(cfg).unwrap();
    let e = engine(vec![
        gpu.clone() as Arc<dyn Backend>,
        Arc::new(rh.clone()) as Arc<dyn Backend>,
    ]);
    // Let the engine read the inventories before placing anything.
    e.refresh_inventories().await;

    // (a)
    // Apart from the marker, only node classes the FakeBackend has.
    let marked = Workflow::from_value(json!({
        "rh": {"class_type": "RunningHubWorkflow", "inputs": {"workflow_id": "hosted"}},
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}
    }))
    .unwrap();
    let a = e.submit(JobSpec::new(marked)).await.unwrap();
    until("the hosted task to run", || {
        sim.tasks().first().is_some_and(|t| t.status == "RUNNING")
    })
    .await;
    // (b), while RunningHub's only slot is taken.
    let b = e.submit(JobSpec::new(workflows::sleep(1.0))).await.unwrap();

    let ja = finish(&e, a).await;
    assert_eq!(ja.state, JobState::Succeeded, "{:?}", ja.error);
    assert_eq!(ja.attempts.len(), 1);
    assert_eq!(ja.attempts[0].backend.as_str(), "rh");
    let skipped: Vec<String> = e
        .events(a)
        .await
        .unwrap()
        .iter()
        .filter_map(|ev| match &ev.kind {
            EventKind::Dispatched { skipped, .. } => Some(
                skipped
                    .iter()
                    .map(|s| format!("{}: {}", s.backend, s.reason))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        skipped
            .iter()
            .any(|s| s == "gpu: no node class RunningHubWorkflow"),
        "{skipped:?}"
    );
    assert!(
        !gpu.stats().jobs.contains(&a),
        "the hosted job never reached the FakeBackend"
    );

    let jb = finish(&e, b).await;
    assert_eq!(jb.state, JobState::Succeeded, "{:?}", jb.error);
    assert_eq!(jb.id, b);
    let backends: Vec<&str> = jb.attempts.iter().map(|t| t.backend.as_str()).collect();
    assert_eq!(backends, ["gpu", "rh"], "{:?}", jb.attempts);
    let err = jb.attempts[0].error.as_ref().unwrap();
    assert_eq!(err.kind, ErrorKind::BackendSpecific, "{err:?}");
    assert_eq!(jb.attempts[1].outcome, Some(AttemptOutcome::Succeeded));
    assert_eq!(gpu.stats().jobs, vec![b]);
    assert_eq!(jb.artifacts.len(), 1);
    assert_eq!(jb.artifacts[0].backend.as_str(), "rh");
    // RunningHub ran both: the hosted workflow and the full graph under the default id.
    let wfs: Vec<String> = sim.tasks().into_iter().map(|t| t.workflow_id).collect();
    assert_eq!(wfs, ["hosted", "plain"]);
}
