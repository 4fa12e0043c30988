use std::time::Duration;

use bytes::Bytes;
use comfyfleet_runninghub::classify::{Endpoint, Verdict};
use comfyfleet_runninghub::client::{NodeInfo, TaskRequest};
use comfyfleet_runninghub::{ClientConfig, RunningHubClient};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::mock::{Fault, KEY, Mock, env, st};

pub fn client_for(mock: &Mock, key: &str) -> RunningHubClient {
    let mut cfg = ClientConfig::new(mock.base.parse().unwrap(), SecretString::from(key));
    cfg.call_timeout = Duration::from_millis(300);
    cfg.instance_type = Some("plus".into());
    cfg.use_personal_queue = true;
    RunningHubClient::new(cfg).unwrap()
}

#[tokio::test]
async fn key_travels_in_body_and_bearer_but_never_in_debug_or_errors() {
    let mock = Mock::start().await;
    let client = client_for(&mock, KEY);
    let a = client
        .create(&TaskRequest::Hosted {
            workflow_id: "1987".into(),
            node_info_list: vec![NodeInfo {
                node_id: "6".into(),
                field_name: "text".into(),
                field_value: json!("a cat"),
            }],
        })
        .await
        .unwrap();
    assert!(matches!(a.verdict, Verdict::Succeeded(_)), "{a:?}");
    let body = &mock.bodies("/task/openapi/create")[0];
    assert_eq!(body["apiKey"], KEY);
    assert_eq!(body["workflowId"], "1987");
    assert_eq!(body["instanceType"], "plus");
    assert_eq!(body["usePersonalQueue"], true);
    assert_eq!(
        body["nodeInfoList"],
        json!([{"nodeId": "6", "fieldName": "text", "fieldValue": "a cat"}])
    );
    assert!(mock.with(|i| i.auth.iter().all(|a| a == &format!("Bearer {KEY}"))));
    assert!(!format!("{client:?}").contains(KEY));
    assert!(!format!("{:?}", client.config()).contains(KEY));
    mock.fault("/task/openapi/status", vec![Fault::Http500]);
    let e = client.status("x").await.unwrap_err();
    assert!(!e.to_string().contains(KEY) && !format!("{e:?}").contains(KEY));
}

#[tokio::test]
async fn full_workflow_is_sent_as_a_json_string() {
    let mock = Mock::start().await;
    let client = client_for(&mock, KEY);
    let graph = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}});
    client
        .create(&TaskRequest::Full {
            workflow_id: "42".into(),
            workflow: graph.clone(),
        })
        .await
        .unwrap();
    let body = &mock.bodies("/task/openapi/create")[0];
    let sent: Value = serde_json::from_str(body["workflow"].as_str().unwrap()).unwrap();
    assert_eq!(sent, graph);
    client
        .create(&TaskRequest::AiApp {
            webapp_id: "77".into(),
            node_info_list: vec![],
        })
        .await
        .unwrap();
    assert_eq!(mock.bodies("/task/openapi/ai-app/run")[0]["webappId"], "77");
}

#[tokio::test]
async fn transport_errors_are_kept_apart_from_verdicts() {
    let mock = Mock::start().await;
    let client = client_for(&mock, KEY);
    let status = "/task/openapi/status";
    mock.fault(
        status,
        vec![
            Fault::Http500,
            Fault::BadJson,
            Fault::Delay(Duration::from_millis(800)),
        ],
    );
    let e = client.status("t").await.unwrap_err();
    assert!(e.message.contains("500"), "{e}");
    let e = client.status("t").await.unwrap_err();
    assert!(!e.timeout && e.message.contains("not an envelope"), "{e}");
    let e = client.status("t").await.unwrap_err();
    assert!(e.timeout, "{e}");
    // Then a real answer: 807 for an unknown task is a verdict, not a transport error.
    let a = client.status("t").await.unwrap();
    assert!(matches!(a.verdict, Verdict::TaskGone { .. }), "{a:?}");
    // A bad key is a configuration verdict.
    let bad = client_for(&mock, "wrong");
    assert!(matches!(
        bad.account_status().await.unwrap().verdict,
        Verdict::Config { code: 806, .. }
    ));
    assert!(matches!(
        bad.queue_status().await.unwrap().verdict,
        Verdict::Config { code: 401, .. }
    ));
    let _ = (env(0, "", Value::Null), st("RUNNING"), Endpoint::Status);
}

#[tokio::test]
async fn upload_is_multipart_file_with_bearer_and_returns_file_name() {
    let mock = Mock::start().await;
    let client = client_for(&mock, KEY);
    let a = client
        .upload("cat.png", Bytes::from_static(b"\x89PNG fake"))
        .await
        .unwrap();
    let Verdict::Succeeded(data) = a.verdict else {
        panic!("{a:?}")
    };
    assert_eq!(data["fileName"], "api/0123abcd.png");
    let raw = mock.with(|i| i.raw_uploads[0].clone());
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("name=\"file\""), "{text}");
    assert!(text.contains("filename=\"cat.png\""), "{text}");
    assert!(!text.contains(KEY), "the key travels only in the header");
}

#[tokio::test]
async fn queue_and_account_status() {
    let mock = Mock::start().await;
    let client = client_for(&mock, KEY);
    let Verdict::Succeeded(q) = client.queue_status().await.unwrap().verdict else {
        panic!()
    };
    assert_eq!(q["concurrentLimit"], 3);
    assert!(matches!(
        client.account_status().await.unwrap().verdict,
        Verdict::Succeeded(_)
    ));
}
