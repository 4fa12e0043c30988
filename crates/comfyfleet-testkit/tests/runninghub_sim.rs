//! `RunningHubSim` over real loopback HTTP/WebSocket, driven with reqwest: the task lifecycle
//! with both pending envelopes, failures (805), cancel, 807, the 814 concurrency limit, uploads
//! and 809, the account balance, bad keys, and every fault knob (including seed 000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use comfyfleet_testkit::runninghub_sim::{
    ApiKeyConfig, DEFAULT_API_KEY, FailedReason, HttpErrors, PendingVariant, RunningHubSim,
    RunningHubSimConfig, Trigger, UnknownKeyAnswer, WorkflowSpec, codes,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

// ---- helpers ----------------------------------------------------------------------------------

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().unwrap()
}

const KEY: &str = DEFAULT_API_KEY;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Scale 0.01: one simulated second is 10 ms.
fn config() -> RunningHubSimConfig {
    RunningHubSimConfig::scaled(0.01)
        .key(KEY, ApiKeyConfig::with_limit(3))
        .workflow(
            "wf-ok",
            WorkflowSpec::timed(Duration::from_secs(50), Duration::from_secs(60)),
        )
        .workflow(
            "wf-fast",
            WorkflowSpec::timed(Duration::ZERO, Duration::from_secs(5)),
        )
        .workflow(
            "wf-hang",
            WorkflowSpec {
                queue_time: Duration::ZERO,
                hang: true,
                ..WorkflowSpec::default()
            },
        )
        .workflow(
            "wf-fail",
            WorkflowSpec::timed(Duration::ZERO, Duration::from_secs(5)).failing(FailedReason {
                node_name: "VAEDecode".into(),
                node_id: "8".into(),
                exception_message: "boom".into(),
                exception_type: "RuntimeError".into(),
                traceback: "Traceback ...".into(),
                current_inputs: "{}".into(),
                current_outputs: "[]".into(),
            }),
        )
}

async fn start(cfg: RunningHubSimConfig) -> (RunningHubSim, reqwest::Client) {
    (RunningHubSim::start(cfg).await.unwrap(), client())
}

async fn post_raw(
    c: &reqwest::Client,
    sim: &RunningHubSim,
    path: &str,
    body: Value,
) -> reqwest::Response {
    c.post(format!("{}{path}", sim.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn post(c: &reqwest::Client, sim: &RunningHubSim, path: &str, body: Value) -> Value {
    let r = post_raw(c, sim, path, body).await;
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

async fn create(c: &reqwest::Client, sim: &RunningHubSim, key: &str, wf: &str) -> Value {
    post(
        c,
        sim,
        "/task/openapi/create",
        json!({"apiKey": key, "workflowId": wf, "nodeInfoList": [{"nodeId": "6", "fieldName": "text", "fieldValue": "a cat"}], "addMetadata": true, "usePersonalQueue": false, "instanceType": "plus"}),
    )
    .await
}

async fn create_id(c: &reqwest::Client, sim: &RunningHubSim, wf: &str) -> String {
    let r = create(c, sim, KEY, wf).await;
    assert_eq!(r["code"], 0, "{r}");
    r["data"]["taskId"].as_str().unwrap().to_owned()
}

async fn status(c: &reqwest::Client, sim: &RunningHubSim, id: &str) -> String {
    let r = post(
        c,
        sim,
        "/task/openapi/status",
        json!({"apiKey": KEY, "taskId": id}),
    )
    .await;
    assert_eq!(r["code"], 0, "{r}");
    r["data"].as_str().unwrap().to_owned()
}

async fn outputs(c: &reqwest::Client, sim: &RunningHubSim, id: &str) -> Value {
    post(
        c,
        sim,
        "/task/openapi/outputs",
        json!({"apiKey": KEY, "taskId": id}),
    )
    .await
}

async fn wait_status(c: &reqwest::Client, sim: &RunningHubSim, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if status(c, sim, id).await == want {
            return;
        }
        assert!(Instant::now() < deadline, "task {id} never reached {want}");
        tokio::time::sleep(ms(5)).await;
    }
}

// ---- lifecycle --------------------------------------------------------------------------------

#[tokio::test]
async fn create_then_queued_running_success_with_both_pending_variants() {
    let (sim, c) = start(config()).await;
    let r = create(&c, &sim, KEY, "wf-ok").await;
    assert_eq!(
        (r["code"].clone(), r["msg"].clone()),
        (json!(0), json!("SUCCESS"))
    );
    let d = &r["data"];
    assert_eq!(d["taskStatus"], "QUEUED");
    assert!(!d["clientId"].as_str().unwrap().is_empty());
    let tips: Value = serde_json::from_str(d["promptTips"].as_str().unwrap()).unwrap();
    assert_eq!(tips["node_errors"], json!({}));
    let ws = d["netWssUrl"].as_str().unwrap();
    assert!(ws.starts_with(&format!("ws://{}/ws/", sim.addr())), "{ws}");
    let id = d["taskId"].as_str().unwrap().to_owned();

    // Queued: first poll 813, second code 0 (alternating), both data=null.
    assert_eq!(status(&c, &sim, &id).await, "QUEUED");
    let a = outputs(&c, &sim, &id).await;
    let b = outputs(&c, &sim, &id).await;
    assert_eq!(
        a,
        json!({"code": 813, "msg": "APIKEY_TASK_IS_QUEUED", "data": null})
    );
    assert_eq!(
        b,
        json!({"code": 0, "msg": "APIKEY_TASK_IS_QUEUED", "data": null})
    );

    wait_status(&c, &sim, &id, "RUNNING").await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let o = outputs(&c, &sim, &id).await;
        assert_eq!(o["msg"], "APIKEY_TASK_IS_RUNNING");
        assert!(o["data"].is_null());
        seen.insert(o["code"].as_i64().unwrap());
    }
    assert_eq!(seen, [0, 804].into_iter().collect());

    wait_status(&c, &sim, &id, "SUCCESS").await;
    let o = outputs(&c, &sim, &id).await;
    assert_eq!(
        (o["code"].clone(), o["msg"].clone()),
        (json!(0), json!("SUCCESS"))
    );
    let list = o["data"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    let item = &list[0];
    assert_eq!(item["fileType"], "png");
    assert_eq!(item["nodeId"], "9");
    assert_eq!(item["taskCostTime"], "60");
    assert_eq!(item["consumeCoins"], "10");
    assert!(item.get("consumeMoney").is_some());
    let url = item["fileUrl"].as_str().unwrap();
    assert!(url.starts_with(&sim.base_url()), "{url}");
    let bytes = c.get(url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let name = url.rsplit('/').next().unwrap();
    assert_eq!(bytes.to_vec(), RunningHubSim::output_bytes(&id, name));
    assert_eq!(sim.tasks()[0].status, "SUCCESS");
    let s = sim.stats();
    assert_eq!(s.tasks_created, 1);
    assert_eq!(s.requests_to("/task/openapi/create"), 1);
    assert!(s.requests_to("/task/openapi/outputs") >= 5);
    assert_eq!(s.requests_to("/files"), 1);
    assert_eq!(s.max_running_per_key.get(KEY), Some(&1));
    sim.shutdown().await;
}

#[tokio::test]
async fn pending_variant_is_configurable() {
    for (variant, want) in [
        (PendingVariant::NonZeroCode, 804),
        (PendingVariant::ZeroCode, 0),
    ] {
        let mut cfg = config();
        cfg.running_variant = variant;
        let (sim, c) = start(cfg).await;
        let id = create_id(&c, &sim, "wf-hang").await;
        for _ in 0..3 {
            let o = outputs(&c, &sim, &id).await;
            assert_eq!(
                o,
                json!({"code": want, "msg": "APIKEY_TASK_IS_RUNNING", "data": null})
            );
        }
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn failing_workflow_answers_805_with_failed_reason() {
    let (sim, c) = start(config()).await;
    let id = create_id(&c, &sim, "wf-fail").await;
    wait_status(&c, &sim, &id, "FAILED").await;
    let o = outputs(&c, &sim, &id).await;
    assert_eq!(o["code"], 805);
    assert_eq!(o["msg"], "APIKEY_TASK_STATUS_ERROR");
    let fr = &o["data"]["failedReason"];
    assert_eq!(fr["node_name"], "VAEDecode");
    assert_eq!(fr["node_id"], "8");
    assert_eq!(fr["exception_message"], "boom");
    assert_eq!(fr["exception_type"], "RuntimeError");
    for k in ["traceback", "current_inputs", "current_outputs"] {
        assert!(fr[k].is_string(), "{k}");
    }
    // Failed tasks are free.
    let a = post(
        &c,
        &sim,
        "/uc/openapi/accountStatus",
        json!({"apikey": KEY}),
    )
    .await;
    assert_eq!(a["data"]["remainCoins"], "10000");
}

#[tokio::test]
async fn cancel_and_unknown_tasks() {
    let (sim, c) = start(config()).await;
    let id = create_id(&c, &sim, "wf-hang").await;
    assert_eq!(status(&c, &sim, &id).await, "RUNNING");
    let r = post(
        &c,
        &sim,
        "/task/openapi/cancel",
        json!({"apiKey": KEY, "taskId": id}),
    )
    .await;
    assert_eq!(r, json!({"code": 0, "msg": "SUCCESS", "data": null}));
    assert_eq!(status(&c, &sim, &id).await, "FAILED");
    let o = outputs(&c, &sim, &id).await;
    assert_eq!(o["code"], 805);
    assert!(
        o["data"]["failedReason"]["exception_message"]
            .as_str()
            .unwrap()
            .contains("cancel")
    );
    assert_eq!(sim.tasks()[0].status, "CANCELLED");
    // Cancelling again is a no-op.
    let r = post(
        &c,
        &sim,
        "/task/openapi/cancel",
        json!({"apiKey": KEY, "taskId": id}),
    )
    .await;
    assert_eq!(r["code"], 0);
    assert_eq!(sim.stats().tasks_cancelled, 1);

    for path in [
        "/task/openapi/status",
        "/task/openapi/outputs",
        "/task/openapi/cancel",
    ] {
        let r = post(&c, &sim, path, json!({"apiKey": KEY, "taskId": "1234"})).await;
        assert_eq!(r["code"], codes::TASK_NOT_FOUND, "{path}");
        assert_eq!(r["msg"], codes::MSG_TASK_NOT_FOUND);
    }
}

#[tokio::test]
async fn another_keys_task_is_807() {
    let cfg = config().key("other", ApiKeyConfig::default());
    let (sim, c) = start(cfg).await;
    let id = create_id(&c, &sim, "wf-hang").await;
    let r = post(
        &c,
        &sim,
        "/task/openapi/status",
        json!({"apiKey": "other", "taskId": id}),
    )
    .await;
    assert_eq!(r["code"], 807);
}

#[tokio::test]
async fn concurrency_limit_answers_814_and_counts_queued_plus_running() {
    let cfg = config().key(KEY, ApiKeyConfig::with_limit(2));
    let (sim, c) = start(cfg).await;
    let a = create_id(&c, &sim, "wf-hang").await; // running
    let _b = create_id(&c, &sim, "wf-ok").await; // queued
    let r = create(&c, &sim, KEY, "wf-fast").await;
    assert_eq!(
        r,
        json!({"code": 814, "msg": "PERSONAL_QUEUE_COUNT_LIMIT", "data": null})
    );
    let q: Value = c
        .get(format!("{}/openapi/v2/queue/status", sim.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(q["code"], 0);
    assert_eq!(q["data"]["concurrentLimit"], 2);
    assert_eq!(q["data"]["runningCount"], 1);
    assert_eq!(q["data"]["queuedCount"], 1);
    assert_eq!(q["data"]["totalCurrentTasks"], 2);
    let acct = post(
        &c,
        &sim,
        "/uc/openapi/accountStatus",
        json!({"apiKey": KEY}),
    )
    .await;
    assert_eq!(acct["data"]["currentTaskCounts"], "2");
    // A slot frees on cancel.
    post(
        &c,
        &sim,
        "/task/openapi/cancel",
        json!({"apiKey": KEY, "taskId": a}),
    )
    .await;
    let r = create(&c, &sim, KEY, "wf-fast").await;
    assert_eq!(r["code"], 0, "{r}");
    let s = sim.stats();
    assert_eq!(s.tasks_rejected_limit, 1);
    assert_eq!(s.tasks_created, 3);
    assert_eq!(s.max_current_per_key.get(KEY), Some(&2));
    assert!(s.max_running_per_key.get(KEY).copied().unwrap_or(0) <= 2);
}

#[tokio::test]
async fn upload_returns_file_name_and_too_large_is_809() {
    let mut cfg = config();
    cfg.max_upload_size = 1000;
    let (sim, c) = start(cfg).await;
    let url = format!("{}/openapi/v2/media/upload/binary", sim.base_url());
    let part = |n: usize| {
        reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(vec![7u8; n]).file_name("input.png"),
        )
    };
    let r: Value = c
        .post(&url)
        .bearer_auth(KEY)
        .multipart(part(500))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["code"], 0, "{r}");
    let name = r["data"]["fileName"].as_str().unwrap();
    assert!(name.starts_with("api/") && name.ends_with(".png"), "{name}");
    let dl = r["data"]["downloadUrl"].as_str().unwrap();
    let got = c.get(dl).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.to_vec(), vec![7u8; 500]);
    // The fileName goes into nodeInfoList.
    let t = post(&c, &sim, "/task/openapi/create", json!({"apiKey": KEY, "workflowId": "wf-fast", "nodeInfoList": [{"nodeId": "1", "fieldName": "image", "fieldValue": name}]})).await;
    assert_eq!(t["code"], 0);

    let r: Value = c
        .post(&url)
        .bearer_auth(KEY)
        .multipart(part(2000))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["code"], 809, "{r}");
    let r: Value = c
        .post(&url)
        .multipart(part(10))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["code"], 401, "{r}");
    assert_eq!(sim.stats().uploads, 1);
}

#[tokio::test]
async fn account_balance_decreases_with_each_successful_task() {
    let mut acct = ApiKeyConfig::with_limit(2);
    acct.coins = 25;
    acct.money = 1.0;
    let (sim, c) = start(config().key(KEY, acct)).await;
    let a0 = post(
        &c,
        &sim,
        "/uc/openapi/accountStatus",
        json!({"apiKey": KEY}),
    )
    .await;
    assert_eq!(a0["code"], 0);
    assert_eq!(a0["data"]["remainCoins"], "25");
    assert_eq!(a0["data"]["currentTaskCounts"], "0");
    assert_eq!(a0["data"]["currency"], "CNY");
    for expect in ["15", "5"] {
        let id = create_id(&c, &sim, "wf-fast").await;
        wait_status(&c, &sim, &id, "SUCCESS").await;
        let a = post(
            &c,
            &sim,
            "/uc/openapi/accountStatus",
            json!({"apiKey": KEY}),
        )
        .await;
        assert_eq!(a["data"]["remainCoins"], expect);
    }
    let a = post(
        &c,
        &sim,
        "/uc/openapi/accountStatus",
        json!({"apiKey": KEY}),
    )
    .await;
    let money: f64 = a["data"]["remainMoney"].as_str().unwrap().parse().unwrap();
    assert!((money - 0.8).abs() < 1e-9, "{money}");
    // 5 coins left, a task costs 10.
    let r = create(&c, &sim, KEY, "wf-fast").await;
    assert_eq!(r["code"], codes::NOT_ENOUGH_WALLET);
}

#[tokio::test]
async fn unknown_or_missing_key_is_401_or_806() {
    let (sim, c) = start(config()).await;
    let r = create(&c, &sim, "nope", "wf-ok").await;
    assert_eq!(
        r,
        json!({"code": 401, "msg": "API key invalid", "data": null})
    );
    let r = post(&c, &sim, "/task/openapi/status", json!({"taskId": "1"})).await;
    assert_eq!(r["code"], 401);
    // Bearer alone is accepted.
    let r: Value = c
        .post(format!("{}/uc/openapi/accountStatus", sim.base_url()))
        .bearer_auth(KEY)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["code"], 0);
    let r = c
        .get(format!("{}/openapi/v2/queue/status", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["code"], 401);
    assert_eq!(sim.stats().auth_failures, 3);
    sim.shutdown().await;

    let mut cfg = config();
    cfg.unknown_key = UnknownKeyAnswer::UserNotFound806;
    let (sim, c) = start(cfg).await;
    let r = create(&c, &sim, "nope", "wf-ok").await;
    assert_eq!(r["code"], 806);
    assert_eq!(r["msg"], codes::MSG_USER_NOT_FOUND);
}

#[tokio::test]
async fn workflow_string_webapp_and_json_api_format() {
    let (sim, c) = start(config()).await;
    let r = post(
        &c,
        &sim,
        "/api/openapi/getJsonApiFormat",
        json!({"apiKey": KEY, "workflowId": "123"}),
    )
    .await;
    assert_eq!(r["code"], 0);
    let wf: Value = serde_json::from_str(r["data"].as_str().unwrap()).unwrap();
    assert_eq!(wf["9"]["class_type"], "SaveImage");
    let r = post(&c, &sim, "/task/openapi/create", json!({"apiKey": KEY, "workflow": wf.to_string(), "usePersonalQueue": true, "webhookUrl": "http://example.invalid/hook"})).await;
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(
        sim.tasks()[0].webhook_url.as_deref(),
        Some("http://example.invalid/hook")
    );
    let r = post(
        &c,
        &sim,
        "/task/openapi/create",
        json!({"apiKey": KEY, "workflow": "{not json"}),
    )
    .await;
    assert_eq!(r["code"], codes::VALIDATE_PROMPT_FAILED);
    let r = post(&c, &sim, "/task/openapi/create", json!({"apiKey": KEY})).await;
    assert_eq!(r["code"], codes::PARAMS_INVALID);
    let r = post(
        &c,
        &sim,
        "/task/openapi/ai-app/run",
        json!({"apiKey": KEY, "webappId": 1877265245566922753u64, "nodeInfoList": []}),
    )
    .await;
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(sim.tasks()[1].workflow_id, "1877265245566922753");
    let r = post_raw(&c, &sim, "/nope", json!({})).await;
    assert_eq!(r.status(), 404);
}

// ---- faults -----------------------------------------------------------------------------------

#[tokio::test]
async fn fault_slow_responses_all_and_per_endpoint() {
    let (sim, c) = start(config()).await;
    sim.faults()
        .set_endpoint_delay("/task/openapi/status", ms(600));
    let id = create_id(&c, &sim, "wf-hang").await;
    let t = Instant::now();
    status(&c, &sim, &id).await;
    assert!(t.elapsed() >= ms(600));
    let t = Instant::now();
    outputs(&c, &sim, &id).await;
    assert!(t.elapsed() < ms(500));
    sim.faults()
        .set_endpoint_delay("/task/openapi/status", Duration::ZERO);
    sim.faults().set_response_delay(ms(600));
    let t = Instant::now();
    outputs(&c, &sim, &id).await;
    assert!(t.elapsed() >= ms(600));
    sim.faults().clear();
    let t = Instant::now();
    outputs(&c, &sim, &id).await;
    assert!(t.elapsed() < ms(500));
}

#[tokio::test]
async fn fault_http_5xx_for_next_calls() {
    let (sim, c) = start(config()).await;
    sim.faults().fail_next_http(2, 502);
    for _ in 0..2 {
        let r = post_raw(
            &c,
            &sim,
            "/uc/openapi/accountStatus",
            json!({"apiKey": KEY}),
        )
        .await;
        assert_eq!(r.status(), 502);
    }
    let r = post(
        &c,
        &sim,
        "/uc/openapi/accountStatus",
        json!({"apiKey": KEY}),
    )
    .await;
    assert_eq!(r["code"], 0);
    // Only on one path.
    sim.faults().set_http_errors(Some(HttpErrors {
        status: 503,
        trigger: Trigger::Always,
        path_contains: Some("/outputs".into()),
    }));
    let id = create_id(&c, &sim, "wf-hang").await;
    assert_eq!(
        post_raw(
            &c,
            &sim,
            "/task/openapi/outputs",
            json!({"apiKey": KEY, "taskId": id})
        )
        .await
        .status(),
        503
    );
    assert_eq!(status(&c, &sim, &id).await, "RUNNING");
    assert_eq!(sim.stats().faults_fired, 3);
}

#[tokio::test]
async fn fault_malformed_json_for_next_calls() {
    let (sim, c) = start(config()).await;
    let id = create_id(&c, &sim, "wf-hang").await;
    sim.faults().set_malformed_json(Trigger::Next(1));
    let r = post_raw(
        &c,
        &sim,
        "/task/openapi/outputs",
        json!({"apiKey": KEY, "taskId": id}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    assert_eq!(
        outputs(&c, &sim, &id).await["msg"],
        "APIKEY_TASK_IS_RUNNING"
    );
}

#[tokio::test]
async fn fault_tasks_that_never_finish() {
    let (sim, c) = start(config()).await;
    sim.faults().set_hang_tasks(Trigger::Next(1));
    let stuck = create_id(&c, &sim, "wf-fast").await;
    let fine = create_id(&c, &sim, "wf-fast").await;
    sim.faults().set_hang_workflow("wf-fast", true);
    let stuck2 = create_id(&c, &sim, "wf-fast").await;
    wait_status(&c, &sim, &fine, "SUCCESS").await;
    tokio::time::sleep(ms(100)).await; // well past 5 s simulated
    assert_eq!(status(&c, &sim, &stuck).await, "RUNNING");
    assert_eq!(status(&c, &sim, &stuck2).await, "RUNNING");
    sim.faults().set_hang_workflow("wf-fast", false);
    let later = create_id(&c, &sim, "wf-fast").await;
    // Limit is 3 and three are current: stuck, stuck2, later.
    assert_eq!(create(&c, &sim, KEY, "wf-fast").await["code"], 814);
    wait_status(&c, &sim, &later, "SUCCESS").await;
}

#[tokio::test]
async fn net_wss_url_sends_progress_by_default() {
    let (sim, c) = start(config()).await;
    let r = create(&c, &sim, KEY, "wf-fast").await;
    let url = r["data"]["netWssUrl"].as_str().unwrap().to_owned();
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut types = Vec::new();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
    {
        match m {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                types.push(v["type"].as_str().unwrap().to_owned());
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert_eq!(types.first().map(String::as_str), Some("status"));
    assert!(types.contains(&"execution_start".to_owned()));
    assert!(
        types.iter().filter(|t| *t == "progress").count() >= 2,
        "{types:?}"
    );
    assert_eq!(types.last().map(String::as_str), Some("execution_success"));
    assert!(sim.stats().ws_messages_sent >= 4);
}

/// Seed 000: behind a slow proxy the task socket accepts and never sends; the task finishes;
/// only HTTP polling learns it.
#[tokio::test]
async fn seed_000_silent_socket_behind_proxy_delay_polling_still_sees_success() {
    let (sim, c) = start(config()).await;
    sim.faults().set_silent_websocket(true);
    sim.faults().set_proxy_delay(ms(50));
    let t = Instant::now();
    let r = create(&c, &sim, KEY, "wf-fast").await;
    assert!(t.elapsed() >= ms(50));
    let id = r["data"]["taskId"].as_str().unwrap().to_owned();
    let url = r["data"]["netWssUrl"].as_str().unwrap().to_owned();
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // The socket stays open and silent well past the task's end...
    let silent = tokio::time::timeout(ms(400), ws.next()).await;
    assert!(silent.is_err(), "socket sent {silent:?}");
    // ...while polling sees SUCCESS.
    wait_status(&c, &sim, &id, "SUCCESS").await;
    assert_eq!(outputs(&c, &sim, &id).await["code"], 0);
    let s = sim.stats();
    assert_eq!(s.ws_connections, 1);
    assert_eq!(s.ws_messages_sent, 0);
    // Files are behind the proxy too.
    let file = outputs(&c, &sim, &id).await["data"][0]["fileUrl"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = Instant::now();
    assert_eq!(c.get(file).send().await.unwrap().status(), 200);
    assert!(t.elapsed() >= ms(50));
    drop(ws);
    sim.shutdown().await;
}

#[tokio::test]
async fn fault_fail_next_tasks() {
    let (sim, c) = start(config()).await;
    sim.faults().set_fail_tasks(Trigger::Next(1));
    let id = create_id(&c, &sim, "wf-fast").await;
    wait_status(&c, &sim, &id, "FAILED").await;
    assert_eq!(outputs(&c, &sim, &id).await["code"], 805);
}

#[tokio::test(start_paused = true)]
async fn works_under_a_paused_clock() {
    let mut cfg = RunningHubSimConfig::default();
    cfg.workflows.insert(
        "w".into(),
        WorkflowSpec::timed(Duration::from_secs(10), Duration::from_secs(60)),
    );
    let sim = RunningHubSim::start(cfg).await.unwrap();
    let c = client();
    let id = create_id(&c, &sim, "w").await;
    assert_eq!(status(&c, &sim, &id).await, "QUEUED");
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(status(&c, &sim, &id).await, "RUNNING");
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(status(&c, &sim, &id).await, "SUCCESS");
    assert_eq!(sim.tasks()[0].status, "SUCCESS");
}

#[tokio::test]
async fn fault_websocket_handshake_that_never_completes() {
    let (sim, c) = start(config()).await;
    sim.faults().set_hang_websocket_handshake(true);
    let r = create(&c, &sim, KEY, "wf-fast").await;
    let id = r["data"]["taskId"].as_str().unwrap().to_owned();
    let url = r["data"]["netWssUrl"].as_str().unwrap().to_owned();
    let connect =
        tokio::time::timeout(ms(300), tokio_tungstenite::connect_async(url.clone())).await;
    assert!(connect.is_err(), "handshake completed");
    wait_status(&c, &sim, &id, "SUCCESS").await;
    sim.faults().set_hang_websocket_handshake(false);
    assert!(tokio_tungstenite::connect_async(url).await.is_ok());
}

#[tokio::test]
async fn shutdown_closes_the_port_even_with_a_silent_socket_open() {
    let (sim, c) = start(config()).await;
    sim.faults().set_silent_websocket(true);
    let r = create(&c, &sim, KEY, "wf-hang").await;
    let url = r["data"]["netWssUrl"].as_str().unwrap().to_owned();
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let base = sim.base_url();
    let t = Instant::now();
    sim.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(3));
    // The socket ends.
    let end = tokio::time::timeout(Duration::from_secs(3), ws.next())
        .await
        .unwrap();
    assert!(!matches!(end, Some(Ok(Message::Text(_)))));
    assert!(
        client()
            .post(format!("{base}/uc/openapi/accountStatus"))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn concurrent_burst_never_exceeds_the_limit() {
    let (sim, c) = start(config()).await; // limit 3
    let results =
        futures::future::join_all((0..20).map(|_| create(&c, &sim, KEY, "wf-fast"))).await;
    let ok = results.iter().filter(|r| r["code"] == 0).count();
    let limited = results.iter().filter(|r| r["code"] == 814).count();
    assert_eq!((ok, limited), (3, 17));
    tokio::time::sleep(ms(100)).await; // all done (5 s simulated = 50 ms)
    let s = sim.stats();
    assert_eq!(s.max_current_per_key.get(KEY), Some(&3));
    assert_eq!(s.max_running_per_key.get(KEY), Some(&3));
    assert_eq!(s.tasks_rejected_limit, 17);
}
