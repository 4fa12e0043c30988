//! The one classifier of RunningHub answers: [`classify`] turns a response envelope
//! (`{code, msg, data}`) and the endpoint it came from into a [`Verdict`].
//!
//! Rules (from the field report of a production failure, see the crate docs):
//!
//! 1. `msg` is read **before** `code`. A `msg` containing `APIKEY_TASK_IS_RUNNING` or
//!    `APIKEY_TASK_IS_QUEUED` is progress whatever the `code` (`0` with `data: null` included),
//!    never an error and never "finished with no outputs".
//! 2. `804`/`813` are progress too.
//! 3. `code = 0` + `SUCCESS`: `data` is the result; an empty output list is a valid success.
//! 4. The status endpoint answers a bare string: `QUEUED`, `RUNNING`, `SUCCESS`, `FAILED`.
//! 5. Anything else non-zero is kept verbatim in [`Verdict::Other`].
//!
//! The function is pure and total: it never panics, whatever the input.

use comfyfleet_core::{ErrorDetail, ErrorKind, ExecutionError, NodeId};
use serde_json::{Map, Value};

/// Success.
pub const CODE_SUCCESS: i64 = 0;
/// The task is running.
pub const CODE_RUNNING: i64 = 804;
/// The task failed (`data.failedReason` says why).
pub const CODE_TASK_FAILED: i64 = 805;
/// The API key's user does not exist.
pub const CODE_USER_NOT_FOUND: i64 = 806;
/// No such task.
pub const CODE_TASK_NOT_FOUND: i64 = 807;
/// The uploaded file is too large.
pub const CODE_FILE_TOO_LARGE: i64 = 809;
/// The task is queued.
pub const CODE_QUEUED: i64 = 813;
/// The key's personal queue is full (back-pressure).
pub const CODE_QUEUE_LIMIT: i64 = 814;
/// The API key is invalid.
pub const CODE_KEY_INVALID: i64 = 401;

/// `msg` marker of a running task.
pub const MSG_RUNNING: &str = "APIKEY_TASK_IS_RUNNING";
/// `msg` marker of a queued task.
pub const MSG_QUEUED: &str = "APIKEY_TASK_IS_QUEUED";
/// `msg` of a failed task.
pub const MSG_TASK_FAILED: &str = "APIKEY_TASK_STATUS_ERROR";

/// Which endpoint an envelope came from (the meaning of `data` depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/task/openapi/create`.
    Create,
    /// `/task/openapi/ai-app/run`.
    AiAppRun,
    /// `/task/openapi/status`: `data` is a bare status string.
    Status,
    /// `/task/openapi/outputs`: `data` is the output list when done.
    Outputs,
    /// `/task/openapi/cancel`.
    Cancel,
    /// `/openapi/v2/media/upload/binary`.
    Upload,
    /// `/uc/openapi/accountStatus`.
    AccountStatus,
    /// `GET /openapi/v2/queue/status`.
    QueueStatus,
}

impl Endpoint {
    /// The path of the endpoint.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Create => "/task/openapi/create",
            Endpoint::AiAppRun => "/task/openapi/ai-app/run",
            Endpoint::Status => "/task/openapi/status",
            Endpoint::Outputs => "/task/openapi/outputs",
            Endpoint::Cancel => "/task/openapi/cancel",
            Endpoint::Upload => "/openapi/v2/media/upload/binary",
            Endpoint::AccountStatus => "/uc/openapi/accountStatus",
            Endpoint::QueueStatus => "/openapi/v2/queue/status",
        }
    }
}

/// A RunningHub response envelope.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Envelope {
    /// `code` (absent or not an integer: `None`).
    pub code: Option<i64>,
    /// `msg` (absent: empty).
    pub msg: String,
    /// `data` (absent: `null`).
    pub data: Value,
}

impl Envelope {
    /// An envelope from its parts.
    pub fn new(code: i64, msg: impl Into<String>, data: Value) -> Self {
        Envelope {
            code: Some(code),
            msg: msg.into(),
            data,
        }
    }

    /// Reads an envelope from a response body. `None` when the body is not a JSON object (a
    /// transient failure for the caller: proxies and overloaded gateways answer HTML).
    pub fn parse(body: &[u8]) -> Option<Envelope> {
        let v: Value = serde_json::from_slice(body).ok()?;
        Self::from_value(v)
    }

    /// Reads an envelope from a JSON value; `None` unless it is an object.
    pub fn from_value(v: Value) -> Option<Envelope> {
        let Value::Object(mut m) = v else {
            return None;
        };
        let code = match m.get("code") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        let msg = match m.remove("msg").or_else(|| m.remove("message")) {
            Some(Value::String(s)) => s,
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        let data = m.remove("data").unwrap_or(Value::Null);
        Some(Envelope { code, msg, data })
    }
}

/// What an envelope means for the orchestrator.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The task waits in RunningHub's queue.
    Queued,
    /// The task runs.
    Running,
    /// The call succeeded; `data` is its result (create: `{taskId, …}`; status: `"SUCCESS"`;
    /// outputs: the list, possibly empty; cancel: `null`; upload: `{fileName, …}`).
    Succeeded(Value),
    /// The task failed (or was refused at create), classified like a ComfyUI execution error.
    Failed(ExecutionError),
    /// RunningHub does not know the task (807).
    TaskGone {
        /// `msg`, verbatim.
        msg: String,
    },
    /// A configuration error (806, 401): not retryable, the backend is unhealthy.
    Config {
        /// `code`.
        code: i64,
        /// `msg`, verbatim.
        msg: String,
    },
    /// Bad input (809: file too large).
    InputError {
        /// `code`.
        code: i64,
        /// `msg`, verbatim.
        msg: String,
    },
    /// The key is at its concurrency limit (814): wait and retry, never fail the job.
    BackPressure {
        /// `msg`, verbatim.
        msg: String,
    },
    /// A success envelope whose `data` does not have the shape the endpoint promises (a
    /// transient condition for the caller: ask again).
    Malformed {
        /// What was wrong.
        reason: String,
    },
    /// Any other answer, kept verbatim.
    Other {
        /// `code` (`None`: absent).
        code: Option<i64>,
        /// `msg`, verbatim.
        msg: String,
    },
}

impl Verdict {
    /// Whether this verdict is an error of any kind (progress and success are not).
    pub fn is_error(&self) -> bool {
        !matches!(
            self,
            Verdict::Queued | Verdict::Running | Verdict::Succeeded(_)
        )
    }

    /// The verdict as an [`ExecutionError`], for the error verdicts.
    pub fn to_error(&self) -> Option<ExecutionError> {
        Some(match self {
            Verdict::Queued | Verdict::Running | Verdict::Succeeded(_) => return None,
            Verdict::Failed(e) => e.clone(),
            Verdict::TaskGone { msg } => {
                ExecutionError::transient(format!("RunningHub lost the task (807 {msg})"))
                    .with_detail(ErrorDetail::Lost)
            }
            Verdict::Config { code, msg } => ExecutionError::backend_specific(format!(
                "RunningHub configuration error ({code} {msg}): check the API key"
            )),
            Verdict::InputError { code, msg } => ExecutionError::deterministic(format!(
                "RunningHub refused the input ({code} {msg})"
            )),
            Verdict::BackPressure { msg } => {
                ExecutionError::transient(format!("RunningHub personal queue is full (814 {msg})"))
            }
            Verdict::Malformed { reason } => {
                ExecutionError::transient(format!("RunningHub answer malformed: {reason}"))
            }
            Verdict::Other { code, msg } => ExecutionError::backend_specific(match code {
                Some(c) => format!("RunningHub error {c}: {msg}"),
                None => format!("RunningHub error: {msg}"),
            }),
        })
    }
}

fn msg_has(msg: &str, marker: &str) -> bool {
    msg.to_ascii_uppercase().contains(marker)
}

/// Classifies one envelope from `endpoint`. Pure and total.
pub fn classify(endpoint: Endpoint, env: &Envelope) -> Verdict {
    let msg = env.msg.as_str();
    // 1. msg before code: progress markers win over everything.
    if msg_has(msg, MSG_RUNNING) {
        return Verdict::Running;
    }
    if msg_has(msg, MSG_QUEUED) {
        return Verdict::Queued;
    }
    // 2. Failure by msg or code.
    if msg_has(msg, MSG_TASK_FAILED) || env.code == Some(CODE_TASK_FAILED) {
        return Verdict::Failed(failed_reason(&env.data, msg));
    }
    // Named errors by msg, for answers whose code is missing or odd.
    if msg_has(msg, "APIKEY_TASK_NOT_FOUND") {
        return Verdict::TaskGone {
            msg: env.msg.clone(),
        };
    }
    if msg_has(msg, "APIKEY_USER_NOT_FOUND") || msg_has(msg, "APIKEY_INVALID") {
        return Verdict::Config {
            code: env.code.unwrap_or(CODE_USER_NOT_FOUND),
            msg: env.msg.clone(),
        };
    }
    match env.code {
        Some(CODE_RUNNING) => Verdict::Running,
        Some(CODE_QUEUED) => Verdict::Queued,
        Some(CODE_TASK_NOT_FOUND) => Verdict::TaskGone {
            msg: env.msg.clone(),
        },
        Some(code @ (CODE_USER_NOT_FOUND | CODE_KEY_INVALID)) => Verdict::Config {
            code,
            msg: env.msg.clone(),
        },
        Some(code @ CODE_FILE_TOO_LARGE) => Verdict::InputError {
            code,
            msg: env.msg.clone(),
        },
        Some(CODE_QUEUE_LIMIT) => Verdict::BackPressure {
            msg: env.msg.clone(),
        },
        Some(CODE_SUCCESS) => success(endpoint, env),
        code => Verdict::Other {
            code,
            msg: env.msg.clone(),
        },
    }
}

fn malformed(endpoint: Endpoint, what: &str) -> Verdict {
    Verdict::Malformed {
        reason: format!("{}: {what}", endpoint.path()),
    }
}

fn success(endpoint: Endpoint, env: &Envelope) -> Verdict {
    let data = &env.data;
    match endpoint {
        Endpoint::Status => match data.as_str().map(|s| s.trim().to_ascii_uppercase()) {
            Some(s) if s == "QUEUED" => Verdict::Queued,
            Some(s) if s == "RUNNING" => Verdict::Running,
            Some(s) if s == "SUCCESS" => Verdict::Succeeded(data.clone()),
            Some(s) if s == "FAILED" => Verdict::Failed(
                ExecutionError::deterministic("RunningHub task failed").with_detail(
                    ErrorDetail::Exception {
                        exception_type: "unknown".into(),
                    },
                ),
            ),
            _ => malformed(endpoint, &format!("unexpected status {data}")),
        },
        Endpoint::Outputs => match data {
            Value::Array(_) => Verdict::Succeeded(data.clone()),
            Value::Object(m) if m.contains_key("failedReason") => {
                Verdict::Failed(failed_reason(data, &env.msg))
            }
            _ => malformed(endpoint, "code 0 without an output list"),
        },
        Endpoint::Create | Endpoint::AiAppRun => {
            let Some(obj) = data.as_object() else {
                return malformed(endpoint, "code 0 without a task");
            };
            if let Some(e) = prompt_tips_errors(obj) {
                return Verdict::Failed(e);
            }
            match obj.get("taskId") {
                Some(Value::String(s)) if !s.is_empty() => Verdict::Succeeded(data.clone()),
                Some(Value::Number(_)) => Verdict::Succeeded(data.clone()),
                _ => malformed(endpoint, "code 0 without a taskId"),
            }
        }
        Endpoint::Upload => match data.get("fileName").and_then(Value::as_str) {
            Some(s) if !s.is_empty() => Verdict::Succeeded(data.clone()),
            _ => malformed(endpoint, "code 0 without a fileName"),
        },
        Endpoint::Cancel | Endpoint::AccountStatus | Endpoint::QueueStatus => {
            Verdict::Succeeded(data.clone())
        }
    }
}

fn str_of(m: &Map<String, Value>, key: &str) -> Option<String> {
    match m.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `promptTips` (a JSON string) with a non-empty `node_errors`: a validation failure.
fn prompt_tips_errors(obj: &Map<String, Value>) -> Option<ExecutionError> {
    let tips = match obj.get("promptTips")? {
        Value::String(s) => serde_json::from_str::<Value>(s).ok()?,
        v @ Value::Object(_) => v.clone(),
        _ => return None,
    };
    let errors = tips.get("node_errors")?.as_object()?;
    if errors.is_empty() {
        return None;
    }
    let mut nodes: Vec<(NodeId, Vec<String>)> = Vec::new();
    for (node, e) in errors {
        let mut msgs = Vec::new();
        if let Some(list) = e.get("errors").and_then(Value::as_array) {
            for item in list {
                let m = item
                    .get("details")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .or_else(|| item.get("message").and_then(Value::as_str))
                    .unwrap_or("invalid");
                msgs.push(m.to_owned());
            }
        }
        if msgs.is_empty() {
            msgs.push(e.to_string());
        }
        nodes.push((node.clone(), msgs));
    }
    let first = nodes
        .first()
        .map(|(n, m)| format!("node {n}: {}", m.join("; ")));
    Some(ExecutionError {
        kind: ErrorKind::Deterministic,
        message: format!(
            "RunningHub refused the workflow: {}",
            first.unwrap_or_default()
        ),
        node: nodes.first().map(|(n, _)| n.clone()),
        detail: Some(ErrorDetail::Validation { nodes }),
    })
}

/// `data.failedReason` (an object, or a JSON string of one) → an [`ExecutionError`].
fn failed_reason(data: &Value, msg: &str) -> ExecutionError {
    let reason = match data.get("failedReason") {
        Some(Value::Object(m)) => Some(m.clone()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => Some(m),
            _ => {
                return ExecutionError::deterministic(format!("RunningHub task failed: {s}"));
            }
        },
        _ => None,
    };
    let Some(r) = reason else {
        let msg = if msg.is_empty() {
            "no reason given"
        } else {
            msg
        };
        return ExecutionError::deterministic(format!("RunningHub task failed: {msg}"));
    };
    let exception_type = str_of(&r, "exception_type").unwrap_or_else(|| "Exception".into());
    let message = str_of(&r, "exception_message").unwrap_or_default();
    let node = str_of(&r, "node_id");
    let node_type = str_of(&r, "node_name").or_else(|| str_of(&r, "node_type"));
    let kind = ErrorKind::of_node_exception(&exception_type, &message);
    let mut text = format!("{exception_type}: {}", message.trim_end());
    match (&node, &node_type) {
        (Some(n), Some(t)) => text = format!("node {n} ({t}): {text}"),
        (Some(n), None) => text = format!("node {n}: {text}"),
        _ => {}
    }
    ExecutionError {
        kind,
        message: text,
        node,
        detail: Some(ErrorDetail::Exception { exception_type }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const ALL: [Endpoint; 8] = [
        Endpoint::Create,
        Endpoint::AiAppRun,
        Endpoint::Status,
        Endpoint::Outputs,
        Endpoint::Cancel,
        Endpoint::Upload,
        Endpoint::AccountStatus,
        Endpoint::QueueStatus,
    ];

    fn oom_reason() -> Value {
        json!({"failedReason": {
            "node_name": "KSampler", "node_id": "3",
            "exception_message": "Allocation on device 0 would exceed allowed memory. (out of memory)",
            "exception_type": "torch.OutOfMemoryError", "traceback": "Traceback ...",
            "current_inputs": "{}", "current_outputs": "[]"}})
    }

    /// Every row of the reference's code/msg table.
    #[test]
    fn reference_table_rows() {
        let outputs = json!([{"fileUrl": "https://x/a.png", "fileType": "png", "nodeId": "9",
            "taskCostTime": "12", "consumeCoins": "3"}]);
        // 0 SUCCESS, with outputs and with an empty list.
        assert_eq!(
            classify(
                Endpoint::Outputs,
                &Envelope::new(0, "SUCCESS", outputs.clone())
            ),
            Verdict::Succeeded(outputs)
        );
        assert_eq!(
            classify(Endpoint::Outputs, &Envelope::new(0, "SUCCESS", json!([]))),
            Verdict::Succeeded(json!([]))
        );
        // 0 or 804 RUNNING; 0 or 813 QUEUED, on every endpoint, data null or not.
        for ep in ALL {
            for (code, msg, want) in [
                (0, MSG_RUNNING, Verdict::Running),
                (804, MSG_RUNNING, Verdict::Running),
                (0, MSG_QUEUED, Verdict::Queued),
                (813, MSG_QUEUED, Verdict::Queued),
            ] {
                assert_eq!(classify(ep, &Envelope::new(code, msg, Value::Null)), want);
                assert_eq!(classify(ep, &Envelope::new(code, msg, json!([]))), want);
            }
        }
        // 805 with failedReason: OOM is backend-specific, node and type kept.
        let v = classify(
            Endpoint::Outputs,
            &Envelope::new(805, MSG_TASK_FAILED, oom_reason()),
        );
        let Verdict::Failed(e) = v else {
            panic!("{v:?}")
        };
        assert_eq!(e.kind, ErrorKind::BackendSpecific);
        assert_eq!(e.node.as_deref(), Some("3"));
        assert!(
            e.message
                .starts_with("node 3 (KSampler): torch.OutOfMemoryError")
        );
        assert_eq!(
            e.detail,
            Some(ErrorDetail::Exception {
                exception_type: "torch.OutOfMemoryError".into()
            })
        );
        // 805 with a deterministic exception.
        let bad = json!({"failedReason": {"node_id": "7", "node_name": "LoadImage",
            "exception_type": "ValueError", "exception_message": "Invalid image file"}});
        let Verdict::Failed(e) =
            classify(Endpoint::Outputs, &Envelope::new(805, MSG_TASK_FAILED, bad))
        else {
            panic!()
        };
        assert_eq!(e.kind, ErrorKind::Deterministic);
        assert_eq!(e.node.as_deref(), Some("7"));
        // 806, 401: configuration.
        assert_eq!(
            classify(
                Endpoint::Create,
                &Envelope::new(806, "APIKEY_USER_NOT_FOUND", Value::Null)
            ),
            Verdict::Config {
                code: 806,
                msg: "APIKEY_USER_NOT_FOUND".into()
            }
        );
        assert_eq!(
            classify(
                Endpoint::AccountStatus,
                &Envelope::new(401, "API key invalid", Value::Null)
            ),
            Verdict::Config {
                code: 401,
                msg: "API key invalid".into()
            }
        );
        // 807: gone.
        assert_eq!(
            classify(
                Endpoint::Status,
                &Envelope::new(807, "APIKEY_TASK_NOT_FOUND", Value::Null)
            ),
            Verdict::TaskGone {
                msg: "APIKEY_TASK_NOT_FOUND".into()
            }
        );
        // 809: input error.
        assert_eq!(
            classify(
                Endpoint::Upload,
                &Envelope::new(809, "APIKEY_FILE_SIZE_EXCEEDED", Value::Null)
            ),
            Verdict::InputError {
                code: 809,
                msg: "APIKEY_FILE_SIZE_EXCEEDED".into()
            }
        );
        // 814: back-pressure.
        let v = classify(
            Endpoint::Create,
            &Envelope::new(814, "TASK_QUEUE_MAXED", Value::Null),
        );
        assert_eq!(
            v,
            Verdict::BackPressure {
                msg: "TASK_QUEUE_MAXED".into()
            }
        );
        assert_eq!(v.to_error().map(|e| e.kind), Some(ErrorKind::Transient));
        // Other non-zero: verbatim.
        assert_eq!(
            classify(Endpoint::Create, &Envelope::new(1, "错误信息", Value::Null)),
            Verdict::Other {
                code: Some(1),
                msg: "错误信息".into()
            }
        );
    }

    #[test]
    fn running_with_code_zero_and_null_data_is_not_a_no_output_success() {
        let v = classify(
            Endpoint::Outputs,
            &Envelope::new(0, MSG_RUNNING, Value::Null),
        );
        assert_eq!(v, Verdict::Running);
        assert!(!v.is_error());
        // And SUCCESS with null data is not a success either: ask again.
        assert!(matches!(
            classify(Endpoint::Outputs, &Envelope::new(0, "SUCCESS", Value::Null)),
            Verdict::Malformed { .. }
        ));
    }

    #[test]
    fn status_endpoint_bare_strings() {
        let s = |d: &str| classify(Endpoint::Status, &Envelope::new(0, "success", json!(d)));
        assert_eq!(s("QUEUED"), Verdict::Queued);
        assert_eq!(s("RUNNING"), Verdict::Running);
        assert_eq!(s("SUCCESS"), Verdict::Succeeded(json!("SUCCESS")));
        assert!(matches!(s("FAILED"), Verdict::Failed(_)));
        assert!(matches!(s("WHAT"), Verdict::Malformed { .. }));
    }

    #[test]
    fn create_success_and_prompt_tips_errors() {
        let ok = json!({"taskId": "1989754960986390529", "taskStatus": "QUEUED", "clientId": "c",
            "promptTips": "{\"result\": true, \"error\": null, \"outputs_to_execute\": [\"9\"], \"node_errors\": {}}",
            "netWssUrl": "wss://x"});
        assert_eq!(
            classify(Endpoint::Create, &Envelope::new(0, "success", ok.clone())),
            Verdict::Succeeded(ok)
        );
        let bad = json!({"taskId": "1", "promptTips": "{\"node_errors\": {\"6\": {\"errors\": [{\"message\": \"Required input is missing\", \"details\": \"text\"}], \"class_type\": \"CLIPTextEncode\"}}}"});
        let Verdict::Failed(e) = classify(Endpoint::Create, &Envelope::new(0, "success", bad))
        else {
            panic!()
        };
        assert_eq!(e.kind, ErrorKind::Deterministic);
        assert_eq!(e.node.as_deref(), Some("6"));
        assert!(matches!(e.detail, Some(ErrorDetail::Validation { .. })));
        assert!(matches!(
            classify(Endpoint::Create, &Envelope::new(0, "success", Value::Null)),
            Verdict::Malformed { .. }
        ));
    }

    #[test]
    fn envelope_parsing() {
        assert_eq!(Envelope::parse(b"<html>502</html>"), None);
        assert_eq!(Envelope::parse(b"[1]"), None);
        let e = Envelope::parse(br#"{"code":"804","msg":null}"#).unwrap();
        assert_eq!(e.code, Some(804));
        assert_eq!(classify(Endpoint::Status, &e), Verdict::Running);
        let e = Envelope::parse(br#"{}"#).unwrap();
        assert_eq!(
            classify(Endpoint::Status, &e),
            Verdict::Other {
                code: None,
                msg: String::new()
            }
        );
    }

    #[test]
    fn failed_reason_as_string_and_missing() {
        let data = json!({"failedReason": "{\"node_id\": \"5\", \"exception_type\": \"torch.cuda.OutOfMemoryError\", \"exception_message\": \"CUDA out of memory\"}"});
        let Verdict::Failed(e) = classify(
            Endpoint::Outputs,
            &Envelope::new(805, MSG_TASK_FAILED, data),
        ) else {
            panic!()
        };
        assert_eq!(e.kind, ErrorKind::BackendSpecific);
        assert_eq!(e.node.as_deref(), Some("5"));
        let Verdict::Failed(e) = classify(
            Endpoint::Outputs,
            &Envelope::new(805, MSG_TASK_FAILED, Value::Null),
        ) else {
            panic!()
        };
        assert_eq!(e.kind, ErrorKind::Deterministic);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".*".prop_map(Value::String),
            prop_oneof![
                Just("APIKEY_TASK_IS_RUNNING"),
                Just("SUCCESS"),
                Just("FAILED"),
                Just("{\"node_errors\": {\"1\": {}}}"),
                Just("failedReason"),
                Just("taskId"),
            ]
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("code".to_string()),
                        Just("msg".to_string()),
                        Just("data".to_string()),
                        Just("taskId".to_string()),
                        Just("failedReason".to_string()),
                        Just("promptTips".to_string()),
                        Just("fileName".to_string()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_code() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(0i64),
            Just(401),
            Just(804),
            Just(805),
            Just(806),
            Just(807),
            Just(809),
            Just(813),
            Just(814),
            any::<i64>()
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in arb_json(), ep in 0usize..8) {
            if let Some(env) = Envelope::from_value(body.clone()) {
                let _ = classify(ALL[ep], &env);
            }
            let _ = Envelope::parse(body.to_string().as_bytes()).map(|e| classify(ALL[ep], &e));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), ep in 0usize..8) {
            if let Some(env) = Envelope::parse(&bytes) {
                let _ = classify(ALL[ep], &env);
            }
        }

        #[test]
        fn arbitrary_code_msg_never_panic(code in arb_code(), msg in ".*", data in arb_json(), ep in 0usize..8) {
            let v = classify(ALL[ep], &Envelope::new(code, msg, data));
            let _ = v.to_error();
        }

        #[test]
        fn progress_markers_are_never_errors(
            code in arb_code(),
            pre in ".{0,8}",
            post in ".{0,8}",
            marker in prop_oneof![Just(MSG_RUNNING), Just(MSG_QUEUED), Just("apikey_task_is_running")],
            data in arb_json(),
            ep in 0usize..8,
        ) {
            let v = classify(ALL[ep], &Envelope::new(code, format!("{pre}{marker}{post}"), data));
            prop_assert!(!v.is_error(), "{v:?}");
            prop_assert!(matches!(v, Verdict::Running | Verdict::Queued), "{v:?}");
        }
    }
}
