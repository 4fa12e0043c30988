use std::time::Duration;

use bytes::Bytes;
use comfyfleet_core::{
    Backend, CancelAck, ErrorKind, ExecutionEvent, JobId, RemoteRef, SubmitRequest, Upload,
    Workflow,
};
use comfyfleet_runninghub::{RunningHubBackend, RunningHubConfig};
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::mock::{Fault, KEY, Mock, Script, env, st};

const STATUS: &str = "/task/openapi/status";
const OUTPUTS: &str = "/task/openapi/outputs";
const CREATE: &str = "/task/openapi/create";

fn config(mock: &Mock, key: &str) -> RunningHubConfig {
    let mut c = RunningHubConfig::new("rh", mock.base.parse().unwrap(), SecretString::from(key));
    c.client.call_timeout = Duration::from_millis(300);
    c.poll_min = Duration::from_millis(10);
    c.poll_max = Duration::from_millis(40);
    c.backpressure_wait = Duration::from_millis(20);
    c.backpressure_max_wait = Duration::from_secs(5);
    c.max_concurrent = 3;
    c
}

fn hosted() -> Workflow {
    Workflow::from_value(json!({
        "rh": {"class_type": "RunningHubWorkflow", "inputs": {"workflow_id": "1987"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}}
    }))
    .unwrap()
}

fn request(workflow: Workflow, uploads: Vec<Upload>) -> SubmitRequest {
    SubmitRequest {
        job: JobId::new(),
        attempt: 1,
        workflow,
        uploads,
    }
}

async fn run_to_end(
    mut events: comfyfleet_core::ExecutionStream,
) -> (Vec<ExecutionEvent>, Option<ExecutionEvent>) {
    let mut seen = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = events.next().await {
            if ev.is_terminal() {
                return Some(ev);
            }
            seen.push(ev);
        }
        None
    })
    .await
    .expect("the execution must end");
    (seen, end)
}

fn outputs(mock: &Mock) -> Value {
    env(
        0,
        "SUCCESS",
        json!([{"fileUrl": mock.file_url("ComfyUI_0001.png"), "fileType": "png", "nodeId": "9",
            "taskCostTime": "82", "consumeCoins": "3"}]),
    )
}

/// Seed 000: the create answer carries a `netWssUrl` whose socket accepts and never speaks,
/// responses are slow, some status checks fail (5xx, bad JSON, a call past its timeout). The
/// task is reported RUNNING in all three shapes (804, `code 0` + RUNNING msg + null data, the
/// bare string) and then SUCCESS: completion is detected at the first status check after that,
/// and the outputs are read exactly once.
#[tokio::test]
async fn seed_000_silent_socket_slow_responses_completion_at_first_check_after_finish() {
    let mock = Mock::start().await;
    let script = vec![
        st("QUEUED"),
        env(804, "APIKEY_TASK_IS_RUNNING", Value::Null),
        env(0, "APIKEY_TASK_IS_RUNNING", Value::Null),
        st("RUNNING"),
        st("SUCCESS"),
    ];
    let answers = script.len() as u64;
    mock.next_task(Script::new(script, outputs(&mock)));
    mock.fault(
        STATUS,
        vec![
            Fault::Delay(Duration::from_millis(50)),
            Fault::Http500,
            Fault::BadJson,
            Fault::Delay(Duration::from_millis(700)), // past the 300 ms call timeout
        ],
    );
    mock.fault(OUTPUTS, vec![Fault::Delay(Duration::from_millis(50))]);
    let backend = RunningHubBackend::new(config(&mock, KEY)).unwrap();
    let exec = backend.submit(request(hosted(), vec![])).await.unwrap();
    assert!(exec.remote.as_str().starts_with("1989754960986390"));
    let (seen, end) = run_to_end(exec.events).await;
    let Some(ExecutionEvent::Succeeded { artifacts }) = end else {
        panic!("{end:?}")
    };
    assert_eq!(artifacts.len(), 1);
    assert_eq!(artifacts[0].node, "9");
    assert_eq!(
        artifacts[0].locator["fileUrl"],
        mock.file_url("ComfyUI_0001.png")
    );
    assert_eq!(artifacts[0].locator["meta"]["taskCostTime"], "82");
    // The 50 ms delayed answer counts as one of the script's answers; the three failures
    // (5xx, bad JSON, the timed-out call) were retried.
    assert_eq!(
        mock.calls(STATUS),
        answers + 3,
        "no check after SUCCESS was seen"
    );
    assert_eq!(mock.calls(OUTPUTS), 1);
    assert!(seen.contains(&ExecutionEvent::Queued { position: 1 }));
    assert!(seen.contains(&ExecutionEvent::Started));
    assert_eq!(seen[0], ExecutionEvent::Accepted);
    assert_eq!(backend.in_flight(), 0);
}

/// The first status check runs right after create, not one interval later.
#[tokio::test]
async fn first_status_check_is_immediate() {
    let mock = Mock::start().await;
    mock.next_task(Script::new(
        vec![st("SUCCESS")],
        env(0, "SUCCESS", json!([])),
    ));
    let mut cfg = config(&mock, KEY);
    cfg.poll_min = Duration::from_secs(3600);
    cfg.poll_max = Duration::from_secs(3600);
    let backend = RunningHubBackend::new(cfg).unwrap();
    let exec = backend.submit(request(hosted(), vec![])).await.unwrap();
    let (_, end) = run_to_end(exec.events).await;
    // An empty output list is a valid success.
    assert_eq!(end, Some(ExecutionEvent::Succeeded { artifacts: vec![] }));
    assert_eq!(mock.calls(STATUS), 1);
}

#[tokio::test]
async fn failed_task_carries_failed_reason_classified_like_comfyui() {
    let mock = Mock::start().await;
    mock.next_task(Script::new(
        vec![st("RUNNING"), st("FAILED")],
        env(
            805,
            "APIKEY_TASK_STATUS_ERROR",
            json!({"failedReason": {"node_name": "KSampler", "node_id": "3",
                "exception_type": "torch.OutOfMemoryError",
                "exception_message": "Allocation on device 0 would exceed allowed memory. (out of memory)",
                "traceback": "...", "current_inputs": "{}", "current_outputs": "[]"}}),
        ),
    ));
    let backend = RunningHubBackend::new(config(&mock, KEY)).unwrap();
    let exec = backend.submit(request(hosted(), vec![])).await.unwrap();
    let task = exec.remote.clone();
    let (_, end) = run_to_end(exec.events).await;
    let Some(ExecutionEvent::Failed { error }) = end else {
        panic!("{end:?}")
    };
    assert_eq!(error.kind, ErrorKind::BackendSpecific);
    assert_eq!(error.node.as_deref(), Some("3"));
    assert!(
        error.message.contains("torch.OutOfMemoryError"),
        "{}",
        error.message
    );
    assert!(
        error
            .message
            .contains(&format!("https://www.runninghub.cn/task/detail/{task}")),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn back_pressure_814_waits_retries_and_shrinks_capacity() {
    let mock = Mock::start().await;
    mock.with(|i| {
        i.create_answers.extend([
            env(814, "TASK_QUEUE_MAXED", Value::Null),
            env(814, "TASK_QUEUE_MAXED", Value::Null),
        ]);
    });
    mock.next_task(Script::new(
        vec![st("RUNNING"), st("RUNNING"), st("SUCCESS")],
        env(0, "SUCCESS", json!([])),
    ));
    let backend = RunningHubBackend::new(config(&mock, KEY)).unwrap();
    assert_eq!(backend.capabilities().max_concurrent, 3);
    let exec = backend.submit(request(hosted(), vec![])).await.unwrap();
    assert_eq!(mock.calls(CREATE), 3, "814 twice, then created");
    assert_eq!(backend.effective_capacity(), 1);
    assert_eq!(backend.in_flight(), 1);
    let (_, end) = run_to_end(exec.events).await;
    assert!(matches!(end, Some(ExecutionEvent::Succeeded { .. })));
    // A finished task gives one slot back.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(backend.in_flight(), 0);
    assert_eq!(backend.effective_capacity(), 2);
}

#[tokio::test]
async fn bad_key_is_a_configuration_error_and_the_backend_unhealthy() {
    let mock = Mock::start().await;
    let backend = RunningHubBackend::new(config(&mock, "wrong")).unwrap();
    let health = backend.health().await;
    assert!(!health.healthy);
    assert!(health.detail.contains("806"), "{}", health.detail);
    assert!(!health.detail.contains("wrong"));
    let e = backend
        .submit(request(hosted(), vec![]))
        .await
        .unwrap_err()
        .into_execution_error();
    assert_eq!(e.kind, ErrorKind::BackendSpecific);
    assert_eq!(mock.calls(CREATE), 0, "a known-bad key creates nothing");
    let ok = RunningHubBackend::new(config(&mock, KEY)).unwrap();
    let h = ok.health().await;
    assert!(h.healthy, "{h:?}");
    assert_eq!(h.queue_depth, Some(2));
}

#[tokio::test]
async fn cancel_interrupts_and_the_stream_says_interrupted() {
    let mock = Mock::start().await;
    mock.next_task(Script::new(
        vec![st("RUNNING")],
        env(0, "APIKEY_TASK_IS_RUNNING", Value::Null),
    ));
    let backend = RunningHubBackend::new(config(&mock, KEY)).unwrap();
    let mut exec = backend.submit(request(hosted(), vec![])).await.unwrap();
    // Wait until it runs.
    loop {
        match exec.events.next().await {
            Some(ExecutionEvent::Started) => break,
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
    assert_eq!(
        backend.cancel(&exec.remote).await.unwrap(),
        CancelAck::InterruptSent
    );
    let (_, end) = run_to_end(exec.events).await;
    assert_eq!(end, Some(ExecutionEvent::Interrupted));
    assert_eq!(
        backend.cancel(&RemoteRef::new("nope")).await.unwrap(),
        CancelAck::NotFound
    );
}

#[tokio::test]
async fn reattach_by_task_id() {
    let mock = Mock::start().await;
    let backend = RunningHubBackend::new(config(&mock, KEY)).unwrap();
    assert!(
        backend
            .reattach(&RemoteRef::new("unknown"))
            .await
            .unwrap()
            .is_none()
    );
    mock.next_task(Script::new(
        vec![st("RUNNING"), st("RUNNING"), st("SUCCESS")],
        outputs(&mock),
    ));
    let exec = backend.submit(request(hosted(), vec![])).await.unwrap();
    let remote = exec.remote.clone();
    drop(exec); // the orchestrator "restarts"
    let again = backend.reattach(&remote).await.unwrap().unwrap();
    assert_eq!(again.remote, remote);
    let (_, end) = run_to_end(again.events).await;
    assert!(matches!(end, Some(ExecutionEvent::Succeeded { artifacts }) if artifacts.len() == 1));
}

#[tokio::test]
async fn upload_then_submit_uses_runninghub_file_name_and_fetch_streams_outputs() {
    let mock = Mock::start().await;
    mock.next_task(Script::new(vec![st("SUCCESS")], outputs(&mock)));
    let backend = RunningHubBackend::new(config(&mock, KEY)).unwrap();
    let upload = Upload {
        name: "cat.png".into(),
        sha256: "0".repeat(64),
        size: 9,
    };
    backend
        .upload(&upload, Bytes::from_static(b"\x89PNG fake"))
        .await
        .unwrap();
    backend
        .upload(&upload, Bytes::from_static(b"\x89PNG fake"))
        .await
        .unwrap();
    assert_eq!(
        mock.calls("/openapi/v2/media/upload/binary"),
        1,
        "deduplicated"
    );
    assert_eq!(
        backend.uploaded_file_name(&upload).as_deref(),
        Some("api/0123abcd.png")
    );
    let exec = backend
        .submit(request(hosted(), vec![upload]))
        .await
        .unwrap();
    let body = &mock.bodies(CREATE)[0];
    let list = body["nodeInfoList"].as_array().unwrap();
    assert!(list.contains(
        &json!({"nodeId": "10", "fieldName": "image", "fieldValue": "api/0123abcd.png"})
    ));
    assert!(list.contains(&json!({"nodeId": "6", "fieldName": "text", "fieldValue": "a cat"})));
    assert_eq!(body["workflowId"], "1987");
    let (_, end) = run_to_end(exec.events).await;
    let Some(ExecutionEvent::Succeeded { artifacts }) = end else {
        panic!("{end:?}")
    };
    let mut stream = backend.fetch(&artifacts[0]).await.unwrap();
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, b"bytes of ComfyUI_0001.png");
}

#[tokio::test]
async fn inventory_and_capabilities() {
    let mock = Mock::start().await;
    let mut cfg = config(&mock, KEY);
    cfg.labels.insert("cloud".into(), "runninghub".into());
    let backend = RunningHubBackend::new(cfg).unwrap();
    let inv = backend.inventory().await.unwrap();
    assert_eq!(inv.node_classes, None);
    assert_eq!(
        inv.labels.get("cloud").map(String::as_str),
        Some("runninghub")
    );
    let caps = backend.capabilities();
    assert!(caps.hosted_workflows && caps.uploads && caps.reattach);
    assert_eq!(backend.kind(), "runninghub");
    assert!(!format!("{backend:?}").contains(KEY));
}
