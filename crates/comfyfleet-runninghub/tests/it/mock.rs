//! A tiny scripted RunningHub on loopback: answers are driven by call counts, not by time, so
//! tests assert on how many status checks it took.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const KEY: &str = "sk-test-very-secret-key";

/// An injected fault for the next call to a path.
#[derive(Debug, Clone)]
pub enum Fault {
    Http500,
    BadJson,
    Delay(Duration),
}

/// How one task answers.
#[derive(Debug, Clone)]
pub struct Script {
    /// Status answers, one per status call; the last one repeats.
    pub statuses: VecDeque<Value>,
    /// The outputs answer.
    pub outputs: Value,
}

pub fn env(code: i64, msg: &str, data: Value) -> Value {
    json!({"code": code, "msg": msg, "data": data})
}

pub fn st(s: &str) -> Value {
    env(0, "success", json!(s))
}

impl Script {
    pub fn new(statuses: Vec<Value>, outputs: Value) -> Self {
        Script {
            statuses: statuses.into(),
            outputs,
        }
    }
}

#[derive(Default)]
pub struct Inner {
    pub calls: HashMap<String, u64>,
    pub bodies: Vec<(String, Value)>,
    pub raw_uploads: Vec<Bytes>,
    pub auth: Vec<String>,
    pub tasks: HashMap<String, Script>,
    pub next_script: Option<Script>,
    pub create_answers: VecDeque<Value>,
    pub faults: HashMap<String, VecDeque<Fault>>,
    pub account: Option<Value>,
    pub queue: Option<Value>,
    pub net_wss_url: String,
    next_id: u64,
}

#[derive(Clone, Default)]
pub struct Mock {
    pub inner: Arc<Mutex<Inner>>,
    pub base: String,
}

impl Mock {
    pub async fn start() -> Mock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A "socket" that accepts and never says anything (seed 000).
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let mock = Mock {
            inner: Arc::new(Mutex::new(Inner {
                net_wss_url: format!("ws://{silent_addr}/ws"),
                ..Inner::default()
            })),
            base: format!("http://{addr}"),
        };
        let app = Router::new().fallback(handle).with_state(mock.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        mock
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().unwrap())
    }

    pub fn calls(&self, path: &str) -> u64 {
        self.with(|i| i.calls.get(path).copied().unwrap_or(0))
    }

    pub fn next_task(&self, script: Script) {
        self.with(|i| i.next_script = Some(script));
    }

    pub fn fault(&self, path: &str, faults: Vec<Fault>) {
        self.with(|i| i.faults.entry(path.into()).or_default().extend(faults));
    }

    pub fn bodies(&self, path: &str) -> Vec<Value> {
        self.with(|i| {
            i.bodies
                .iter()
                .filter(|(p, _)| p == path)
                .map(|(_, b)| b.clone())
                .collect()
        })
    }

    pub fn file_url(&self, name: &str) -> String {
        format!("{}/files/{name}", self.base)
    }
}

fn json_response(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

async fn handle(
    State(mock): State<Mock>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let fault = mock.with(|i| {
        *i.calls.entry(path.clone()).or_default() += 1;
        if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
            i.auth.push(a.to_owned());
        }
        i.faults.get_mut(&path).and_then(VecDeque::pop_front)
    });
    match fault {
        Some(Fault::Http500) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "<html>oops</html>").into_response();
        }
        Some(Fault::BadJson) => return (StatusCode::OK, "{\"code\": 0, \"msg\":").into_response(),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    if let Some(name) = path.strip_prefix("/files/") {
        return (StatusCode::OK, format!("bytes of {name}")).into_response();
    }
    if path == "/openapi/v2/media/upload/binary" {
        mock.with(|i| i.raw_uploads.push(body.clone()));
        if !bearer_ok(&headers) {
            return json_response(env(401, "API key invalid", Value::Null));
        }
        return json_response(env(
            0,
            "success",
            json!({"fileName": "api/0123abcd.png", "downloadUrl": mock.file_url("0123abcd.png")}),
        ));
    }
    if method == Method::GET && path == "/openapi/v2/queue/status" {
        if !bearer_ok(&headers) {
            return json_response(env(401, "API key invalid", Value::Null));
        }
        let q = mock.with(|i| i.queue.clone()).unwrap_or_else(|| {
            json!({"apiKeyType": "personal", "concurrentLimit": 3, "runningCount": 1, "queuedCount": 1, "totalCurrentTasks": 2})
        });
        return json_response(env(0, "success", q));
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    mock.with(|i| i.bodies.push((path.clone(), body.clone())));
    if body.get("apiKey").and_then(Value::as_str) != Some(KEY) {
        return json_response(env(806, "APIKEY_USER_NOT_FOUND", Value::Null));
    }
    let task_id = body
        .get("taskId")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let answer = mock.with(|i| match path.as_str() {
        "/task/openapi/create" | "/task/openapi/ai-app/run" => {
            if let Some(a) = i.create_answers.pop_front() {
                return a;
            }
            i.next_id += 1;
            let id = format!("19897549609863905{:02}", i.next_id);
            let script = i.next_script.clone().unwrap_or_else(|| {
                Script::new(vec![st("SUCCESS")], env(0, "SUCCESS", json!([])))
            });
            i.tasks.insert(id.clone(), script);
            env(
                0,
                "success",
                json!({"taskId": id, "taskStatus": "QUEUED", "clientId": "c1",
                    "promptTips": "{\"result\": true, \"error\": null, \"outputs_to_execute\": [], \"node_errors\": {}}",
                    "netWssUrl": i.net_wss_url}),
            )
        }
        "/task/openapi/status" => match i.tasks.get_mut(&task_id) {
            Some(s) => {
                if s.statuses.len() > 1 {
                    s.statuses.pop_front().unwrap_or(Value::Null)
                } else {
                    s.statuses.front().cloned().unwrap_or(Value::Null)
                }
            }
            None => env(807, "APIKEY_TASK_NOT_FOUND", Value::Null),
        },
        "/task/openapi/outputs" => match i.tasks.get(&task_id) {
            Some(s) => s.outputs.clone(),
            None => env(807, "APIKEY_TASK_NOT_FOUND", Value::Null),
        },
        "/task/openapi/cancel" => match i.tasks.get_mut(&task_id) {
            Some(s) => {
                s.statuses = VecDeque::from([st("FAILED")]);
                s.outputs = env(
                    805,
                    "APIKEY_TASK_STATUS_ERROR",
                    json!({"failedReason": {"exception_type": "InterruptProcessingException", "exception_message": "cancelled", "node_id": "3"}}),
                );
                env(0, "success", Value::Null)
            }
            None => env(807, "APIKEY_TASK_NOT_FOUND", Value::Null),
        },
        "/uc/openapi/accountStatus" => i.account.clone().unwrap_or_else(|| {
            env(
                0,
                "success",
                json!({"remainCoins": "100", "currentTaskCounts": "0", "remainMoney": "1.00", "currency": "CNY", "apiType": "personal"}),
            )
        }),
        _ => env(404, "no such endpoint", Value::Null),
    });
    json_response(answer)
}

fn bearer_ok(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {KEY}"))
}
