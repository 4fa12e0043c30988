//! The ComfyUI wire protocol as this client reads it: WebSocket messages (text and binary),
//! `POST /prompt` answers, history entries, and the classification of ComfyUI's errors into
//! comfyfleet's taxonomy. Pure functions, no I/O; unknown message types and unknown keys are
//! ignored, as the protocol reference advises.

use std::collections::BTreeMap;

use bytes::Bytes;
use comfyfleet_core::{Artifact, BackendId, ErrorDetail, ErrorKind, ExecutionError, NodeId};
use serde_json::{Map, Value};

/// A node's entry in a `progress_state` snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeProgress {
    /// `pending`, `running`, `finished` (or `error`, never sent by the server read here).
    pub state: String,
    /// Progress value.
    pub value: f64,
    /// Progress maximum.
    pub max: f64,
}

/// A decoded WebSocket text message.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ServerMessage {
    /// Queue length changed (broadcast); `sid` only on the connect message.
    Status {
        /// Pending + running.
        queue_remaining: u64,
        /// The client id, on the first message of a connection.
        sid: Option<String>,
    },
    /// A prompt started.
    ExecutionStart {
        /// Its id.
        prompt_id: String,
    },
    /// Nodes served from cache.
    ExecutionCached {
        /// The prompt.
        prompt_id: String,
        /// The cached nodes.
        nodes: Vec<NodeId>,
    },
    /// A node starts (`node: None` = the prompt is done; after a reconnect, no prompt id).
    Executing {
        /// The prompt, when given.
        prompt_id: Option<String>,
        /// The node, or `None` at the end.
        node: Option<NodeId>,
    },
    /// Legacy per-step progress.
    Progress {
        /// The prompt.
        prompt_id: Option<String>,
        /// The node.
        node: Option<NodeId>,
        /// Steps done (may be a float).
        value: f64,
        /// Steps in all.
        max: f64,
    },
    /// Snapshot of every non-pending node.
    ProgressState {
        /// The prompt.
        prompt_id: String,
        /// Node id → progress.
        nodes: BTreeMap<NodeId, NodeProgress>,
    },
    /// A node produced UI output.
    Executed {
        /// The prompt.
        prompt_id: String,
        /// The node.
        node: NodeId,
        /// Its UI dict (`{"images": [...]}`), `Null` for a cached node without output.
        output: Value,
    },
    /// Terminal: success.
    ExecutionSuccess {
        /// The prompt.
        prompt_id: String,
    },
    /// An error; terminal unless `exception_type` is `ExecutionBlocked`.
    ExecutionError {
        /// The prompt.
        prompt_id: String,
        /// The whole payload.
        data: Map<String, Value>,
    },
    /// Terminal: interrupted.
    ExecutionInterrupted {
        /// The prompt.
        prompt_id: String,
        /// The node that was about to run.
        node_id: Option<NodeId>,
    },
    /// Any other type (`feature_flags`, `logs`, future ones).
    Other {
        /// The type name.
        kind: String,
    },
}

impl ServerMessage {
    /// The prompt this message belongs to, if it names one.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            ServerMessage::ExecutionStart { prompt_id }
            | ServerMessage::ExecutionCached { prompt_id, .. }
            | ServerMessage::ProgressState { prompt_id, .. }
            | ServerMessage::Executed { prompt_id, .. }
            | ServerMessage::ExecutionSuccess { prompt_id }
            | ServerMessage::ExecutionError { prompt_id, .. }
            | ServerMessage::ExecutionInterrupted { prompt_id, .. } => Some(prompt_id),
            ServerMessage::Executing { prompt_id, .. }
            | ServerMessage::Progress { prompt_id, .. } => prompt_id.as_deref(),
            _ => None,
        }
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable ComfyUI message: {0}")]
pub struct DecodeError(pub String);

fn str_field(d: &Map<String, Value>, k: &str) -> Option<String> {
    d.get(k).and_then(Value::as_str).map(str::to_owned)
}

fn num(v: Option<&Value>) -> f64 {
    v.and_then(Value::as_f64).unwrap_or(0.0)
}

fn need(d: &Map<String, Value>, k: &str, kind: &str) -> Result<String, DecodeError> {
    str_field(d, k).ok_or_else(|| DecodeError(format!("{kind} without {k}")))
}

/// Decodes one WebSocket text frame.
pub fn decode_text(text: &str) -> Result<ServerMessage, DecodeError> {
    let v: Value = serde_json::from_str(text).map_err(|e| DecodeError(e.to_string()))?;
    decode_value(&v)
}

/// Decodes one message already parsed as JSON.
pub fn decode_value(v: &Value) -> Result<ServerMessage, DecodeError> {
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| DecodeError("message without a type".into()))?;
    let empty = Map::new();
    let d = v.get("data").and_then(Value::as_object).unwrap_or(&empty);
    Ok(match kind {
        "status" => ServerMessage::Status {
            queue_remaining: d
                .get("status")
                .and_then(|s| s.get("exec_info"))
                .and_then(|e| e.get("queue_remaining"))
                .and_then(Value::as_u64)
                .unwrap_or(0),
            sid: str_field(d, "sid"),
        },
        "execution_start" => ServerMessage::ExecutionStart {
            prompt_id: need(d, "prompt_id", kind)?,
        },
        "execution_cached" => ServerMessage::ExecutionCached {
            prompt_id: need(d, "prompt_id", kind)?,
            nodes: d
                .get("nodes")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(node_id).collect())
                .unwrap_or_default(),
        },
        "executing" => ServerMessage::Executing {
            prompt_id: str_field(d, "prompt_id"),
            node: d.get("node").and_then(node_id),
        },
        "progress" => ServerMessage::Progress {
            prompt_id: str_field(d, "prompt_id"),
            node: d.get("node").and_then(node_id),
            value: num(d.get("value")),
            max: num(d.get("max")),
        },
        "progress_state" => {
            let mut nodes = BTreeMap::new();
            if let Some(m) = d.get("nodes").and_then(Value::as_object) {
                for (id, n) in m {
                    nodes.insert(
                        id.clone(),
                        NodeProgress {
                            state: n
                                .get("state")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned(),
                            value: num(n.get("value")),
                            max: num(n.get("max")),
                        },
                    );
                }
            }
            ServerMessage::ProgressState {
                prompt_id: need(d, "prompt_id", kind)?,
                nodes,
            }
        }
        "executed" => ServerMessage::Executed {
            prompt_id: need(d, "prompt_id", kind)?,
            node: d
                .get("node")
                .and_then(node_id)
                .ok_or_else(|| DecodeError("executed without node".into()))?,
            output: d.get("output").cloned().unwrap_or(Value::Null),
        },
        "execution_success" => ServerMessage::ExecutionSuccess {
            prompt_id: need(d, "prompt_id", kind)?,
        },
        "execution_error" => ServerMessage::ExecutionError {
            prompt_id: need(d, "prompt_id", kind)?,
            data: d.clone(),
        },
        "execution_interrupted" => ServerMessage::ExecutionInterrupted {
            prompt_id: need(d, "prompt_id", kind)?,
            node_id: d.get("node_id").and_then(node_id),
        },
        other => ServerMessage::Other {
            kind: other.to_owned(),
        },
    })
}

/// Node ids are strings; tolerate numbers from unusual servers.
fn node_id(v: &Value) -> Option<NodeId> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A decoded binary WebSocket frame (§5.5): 4-byte big-endian type, then the payload.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BinaryMessage {
    /// Type 1: a preview image (`format` 1 = JPEG, 2 = PNG).
    Preview {
        /// Image format code.
        format: u32,
        /// Encoded image.
        image: Bytes,
    },
    /// Type 3: text streamed by a node.
    Text {
        /// The node.
        node: NodeId,
        /// The text.
        text: String,
    },
    /// Type 4: a preview with JSON metadata (node id, prompt id, MIME type).
    PreviewWithMetadata {
        /// The metadata.
        metadata: Value,
        /// Encoded image.
        image: Bytes,
    },
    /// Any other type.
    Unknown {
        /// The event type.
        kind: u32,
    },
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, DecodeError> {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| DecodeError(format!("binary frame too short for a u32 at {at}")))
}

/// Decodes one binary frame; never panics on short or malformed frames.
pub fn decode_binary(frame: &Bytes) -> Result<BinaryMessage, DecodeError> {
    let kind = be_u32(frame, 0)?;
    Ok(match kind {
        1 => BinaryMessage::Preview {
            format: be_u32(frame, 4)?,
            image: frame.slice(8..),
        },
        3 => {
            let len = be_u32(frame, 4)? as usize;
            let end = 8usize
                .checked_add(len)
                .filter(|e| *e <= frame.len())
                .ok_or_else(|| DecodeError("text frame: node id longer than the frame".into()))?;
            BinaryMessage::Text {
                node: String::from_utf8_lossy(&frame[8..end]).into_owned(),
                text: String::from_utf8_lossy(&frame[end..]).into_owned(),
            }
        }
        4 => {
            let len = be_u32(frame, 4)? as usize;
            let end = 8usize
                .checked_add(len)
                .filter(|e| *e <= frame.len())
                .ok_or_else(|| {
                    DecodeError("preview frame: metadata longer than the frame".into())
                })?;
            let metadata = serde_json::from_slice(&frame[8..end])
                .map_err(|e| DecodeError(format!("preview metadata: {e}")))?;
            BinaryMessage::PreviewWithMetadata {
                metadata,
                image: frame.slice(end..),
            }
        }
        other => BinaryMessage::Unknown { kind: other },
    })
}

/// Classifies an `execution_error` payload.
pub fn classify_execution_error(data: &Map<String, Value>) -> ExecutionError {
    let exception_type = str_field(data, "exception_type").unwrap_or_else(|| "Exception".into());
    let message = str_field(data, "exception_message").unwrap_or_default();
    let node = data.get("node_id").and_then(node_id);
    let node_type = str_field(data, "node_type");
    let kind = ErrorKind::of_node_exception(&exception_type, &message);
    let mut text = format!("{exception_type}: {}", message.trim_end());
    if let (Some(n), Some(t)) = (&node, &node_type) {
        text = format!("node {n} ({t}): {text}");
    }
    ExecutionError {
        kind,
        message: text,
        node,
        detail: Some(ErrorDetail::Exception { exception_type }),
    }
}

/// Whether an `execution_error` payload is the non-terminal `ExecutionBlocked` variant.
pub fn is_execution_blocked(data: &Map<String, Value>) -> bool {
    data.get("exception_type").and_then(Value::as_str) == Some("ExecutionBlocked")
}

/// Classifies a non-200 answer to `POST /prompt`.
pub fn classify_submit_error(status: u16, body: &str) -> ExecutionError {
    if status >= 500 {
        return ExecutionError::transient(format!(
            "ComfyUI answered {status} to POST /prompt: {}",
            body.chars().take(300).collect::<String>()
        ));
    }
    if status == 413 {
        return ExecutionError::deterministic(
            "the workflow is larger than the server's upload limit (413)",
        );
    }
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return ExecutionError::new(
            if status == 429 {
                ErrorKind::Transient
            } else {
                ErrorKind::Deterministic
            },
            format!(
                "ComfyUI answered {status} with a body that is not JSON: {}",
                body.chars().take(300).collect::<String>()
            ),
        );
    };
    let err = v.get("error");
    let etype = err
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let emsg = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let details = err
        .and_then(|e| e.get("details"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let node_from_details = details
        .strip_prefix("Node ID '#")
        .and_then(|s| s.strip_suffix('\''))
        .map(str::to_owned);
    // A node class the server lacks is about this server, not the workflow.
    let missing_class = match etype {
        "missing_node_type" => err
            .and_then(|e| e.get("extra_info"))
            .and_then(|x| x.get("class_type"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        "invalid_prompt" => emsg
            .strip_prefix("Cannot execute because node ")
            .and_then(|s| s.strip_suffix(" does not exist."))
            .map(str::to_owned),
        _ => None,
    };
    if let Some(class) = missing_class {
        let mut e = ExecutionError::missing_node(class, node_from_details);
        e.message = format!("{} ({emsg})", e.message);
        return e;
    }
    let mut per_node: Vec<(NodeId, Vec<String>)> = Vec::new();
    if let Some(ne) = v.get("node_errors").and_then(Value::as_object) {
        for (node, entry) in ne {
            let class = entry
                .get("class_type")
                .and_then(Value::as_str)
                .unwrap_or("?");
            let msgs: Vec<String> = entry
                .get("errors")
                .and_then(Value::as_array)
                .map(|errs| {
                    errs.iter()
                        .map(|e| {
                            let m = e.get("message").and_then(Value::as_str).unwrap_or("");
                            let d = e.get("details").and_then(Value::as_str).unwrap_or("");
                            if d.is_empty() {
                                format!("{class}: {m}")
                            } else {
                                format!("{class}: {m}: {d}")
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            per_node.push((node.clone(), msgs));
        }
    }
    per_node.sort();
    let mut message = if emsg.is_empty() {
        format!("ComfyUI rejected the prompt ({status})")
    } else {
        emsg.to_owned()
    };
    for (node, msgs) in &per_node {
        for m in msgs {
            message.push_str(&format!("; node {node}: {m}"));
        }
    }
    let mut e = ExecutionError::deterministic(message);
    if !per_node.is_empty() {
        e.node = per_node.first().map(|(n, _)| n.clone());
        e.detail = Some(ErrorDetail::Validation { nodes: per_node });
    } else if let Some(n) = node_from_details {
        e.node = Some(n);
    }
    e
}

/// How a history entry says the prompt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryOutcome {
    /// Success, with outputs.
    Succeeded(Map<String, Value>),
    /// Failed with this `execution_error` payload.
    Failed(Map<String, Value>),
    /// Interrupted.
    Interrupted,
}

/// Reads a `GET /history/{id}` answer: `None` while the server has no entry (queued, running,
/// unknown, evicted or lost — `/queue` tells which).
pub fn parse_history(body: &Value, prompt_id: &str) -> Option<HistoryOutcome> {
    let entry = body.get(prompt_id)?;
    let outputs = entry
        .get("outputs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let status = entry.get("status");
    let messages = status
        .and_then(|s| s.get("messages"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // The messages list decides (a dependency-cycle error can leave status_str "success").
    for m in messages.iter().rev() {
        let name = m.get(0).and_then(Value::as_str).unwrap_or("");
        let data = m
            .get(1)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        match name {
            "execution_error" => return Some(HistoryOutcome::Failed(data)),
            "execution_interrupted" => return Some(HistoryOutcome::Interrupted),
            "execution_success" => return Some(HistoryOutcome::Succeeded(outputs)),
            _ => {}
        }
    }
    match status
        .and_then(|s| s.get("status_str"))
        .and_then(Value::as_str)
    {
        Some("error") => Some(HistoryOutcome::Failed(Map::new())),
        // Entries written before the status block existed are successes.
        _ => Some(HistoryOutcome::Succeeded(outputs)),
    }
}

/// Artifacts of one node's UI output (`{"images": [{filename, subfolder, type}], …}`).
pub fn node_artifacts(backend: &BackendId, node: &str, output: &Value) -> Vec<Artifact> {
    let mut out = Vec::new();
    let Some(map) = output.as_object() else {
        return out;
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for key in keys {
        let Some(items) = map[key.as_str()].as_array() else {
            continue;
        };
        for item in items {
            let Some(filename) = item.get("filename").and_then(Value::as_str) else {
                continue;
            };
            let kind = match key.as_str() {
                "images" => "image",
                "gifs" | "video" | "videos" => "video",
                "audio" => "audio",
                "3d" | "mesh" => "3d",
                _ => "file",
            };
            out.push(Artifact {
                node: node.to_owned(),
                filename: filename.to_owned(),
                kind: kind.into(),
                content_type: content_type(filename).map(str::to_owned),
                size: None,
                sha256: None,
                backend: backend.clone(),
                locator: serde_json::json!({
                    "filename": filename,
                    "subfolder": item.get("subfolder").and_then(Value::as_str).unwrap_or(""),
                    "type": item.get("type").and_then(Value::as_str).unwrap_or("output"),
                }),
            });
        }
    }
    out
}

/// Every artifact of a history entry's `outputs`, in node order.
pub fn history_artifacts(backend: &BackendId, outputs: &Map<String, Value>) -> Vec<Artifact> {
    let mut nodes: Vec<&String> = outputs.keys().collect();
    nodes.sort();
    nodes
        .into_iter()
        .flat_map(|n| node_artifacts(backend, n, &outputs[n.as_str()]))
        .collect()
}

/// MIME type by extension (see [`comfyfleet_core::content_type_for`]).
pub fn content_type(filename: &str) -> Option<&'static str> {
    comfyfleet_core::content_type_for(filename)
}

/// Where a prompt stands according to `GET /queue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Running now.
    Running,
    /// Waiting with this many executions ahead of it (running ones included).
    Pending(u32),
    /// Not in the queue.
    Absent,
}

/// Finds a prompt in a `GET /queue` answer. Pending items come in heap order: sort by
/// `(number, prompt_id)` to count who is ahead.
pub fn queue_state(body: &Value, prompt_id: &str) -> QueueState {
    let id_of = |item: &Value| item.get(1).and_then(Value::as_str).map(str::to_owned);
    let running: Vec<Value> = body
        .get("queue_running")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if running
        .iter()
        .any(|i| id_of(i).as_deref() == Some(prompt_id))
    {
        return QueueState::Running;
    }
    let mut pending: Vec<(f64, String)> = body
        .get("queue_pending")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|i| Some((i.get(0).and_then(Value::as_f64)?, id_of(i)?)))
                .collect()
        })
        .unwrap_or_default();
    pending.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    match pending.iter().position(|(_, id)| id == prompt_id) {
        Some(i) => QueueState::Pending(u32::try_from(i + running.len()).unwrap_or(u32::MAX)),
        None => QueueState::Absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_the_catalogue_and_tolerates_unknowns() {
        let m = decode_text(r#"{"type":"status","data":{"status":{"exec_info":{"queue_remaining":2}},"sid":"abc"}}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::Status {
                queue_remaining: 2,
                sid: Some("abc".into())
            }
        );
        let m =
            decode_text(r#"{"type":"executing","data":{"node":null,"prompt_id":"P"}}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::Executing {
                prompt_id: Some("P".into()),
                node: None
            }
        );
        let m = decode_text(r#"{"type":"executing","data":{"node":"5"}}"#).unwrap();
        assert_eq!(
            m.prompt_id(),
            None,
            "the reconnect form carries no prompt id"
        );
        let m = decode_text(
            r#"{"type":"progress","data":{"value":2.5,"max":10,"prompt_id":"P","node":"5"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ServerMessage::Progress {
                prompt_id: Some("P".into()),
                node: Some("5".into()),
                value: 2.5,
                max: 10.0
            }
        );
        assert_eq!(
            decode_text(r#"{"type":"brand_new","data":{}}"#).unwrap(),
            ServerMessage::Other {
                kind: "brand_new".into()
            }
        );
        assert!(decode_text("not json").is_err());
        assert!(decode_text(r#"{"data":{}}"#).is_err());
        assert!(decode_text(r#"{"type":"execution_start","data":{}}"#).is_err());
    }

    #[test]
    fn decodes_binary_frames_without_panicking() {
        let mut f = vec![0, 0, 0, 1, 0, 0, 0, 2];
        f.extend_from_slice(b"\x89PNG");
        assert_eq!(
            decode_binary(&Bytes::from(f)).unwrap(),
            BinaryMessage::Preview {
                format: 2,
                image: Bytes::from_static(b"\x89PNG")
            }
        );
        let mut t = vec![0, 0, 0, 3, 0, 0, 0, 1, b'7'];
        t.extend_from_slice(b"hello");
        assert_eq!(
            decode_binary(&Bytes::from(t)).unwrap(),
            BinaryMessage::Text {
                node: "7".into(),
                text: "hello".into()
            }
        );
        assert!(decode_binary(&Bytes::from_static(&[0, 0, 0, 3, 0, 0, 0, 200, 1])).is_err());
        assert!(decode_binary(&Bytes::from_static(&[0, 0])).is_err());
        let meta = br#"{"node_id":"3","image_type":"image/png"}"#;
        let mut m = vec![0, 0, 0, 4, 0, 0, 0, meta.len() as u8];
        m.extend_from_slice(meta);
        m.extend_from_slice(b"IMG");
        match decode_binary(&Bytes::from(m)).unwrap() {
            BinaryMessage::PreviewWithMetadata { metadata, image } => {
                assert_eq!(metadata["node_id"], "3");
                assert_eq!(&image[..], b"IMG");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode_binary(&Bytes::from_static(&[0, 0, 0, 9])).unwrap(),
            BinaryMessage::Unknown { kind: 9 }
        );
    }

    #[test]
    fn classifies_execution_errors() {
        let oom = json!({"exception_type": "torch.OutOfMemoryError", "exception_message": "CUDA out of memory.\n", "node_id": "5", "node_type": "KSampler"});
        let e = classify_execution_error(oom.as_object().unwrap());
        assert_eq!(e.kind, ErrorKind::BackendSpecific);
        assert_eq!(
            e.message,
            "node 5 (KSampler): torch.OutOfMemoryError: CUDA out of memory."
        );
        let bad = json!({"exception_type": "Exception", "exception_message": "**** ERROR: Saving image outside the output folder is not allowed.\n"});
        assert_eq!(
            classify_execution_error(bad.as_object().unwrap()).kind,
            ErrorKind::Deterministic
        );
        assert!(is_execution_blocked(
            json!({"exception_type": "ExecutionBlocked"})
                .as_object()
                .unwrap()
        ));
    }

    #[test]
    fn classifies_submit_errors() {
        let e = classify_submit_error(500, "500 Internal Server Error");
        assert_eq!(e.kind, ErrorKind::Transient);
        let master = r#"{"error": {"type": "missing_node_type", "message": "Node 'X' not found.", "details": "Node ID '#2'", "extra_info": {"node_id": "2", "class_type": "FleetNoSuchNode", "node_title": "X"}}, "node_errors": {}}"#;
        let e = classify_submit_error(400, master);
        assert_eq!(e.missing_class(), Some("FleetNoSuchNode"));
        assert_eq!(e.node.as_deref(), Some("2"));
        let e = classify_submit_error(
            400,
            r#"{"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}, "node_errors": {}}"#,
        );
        assert_eq!(e.kind, ErrorKind::Deterministic);
        assert_eq!(e.message, "Prompt has no outputs");
        assert_eq!(
            classify_submit_error(413, "").kind,
            ErrorKind::Deterministic
        );
        assert_eq!(
            classify_submit_error(400, "<html>").kind,
            ErrorKind::Deterministic
        );
    }

    #[test]
    fn history_messages_decide_over_status_str() {
        let cycle = json!({"P": {"outputs": {}, "status": {"status_str": "success", "completed": true,
            "messages": [["execution_start", {}], ["execution_error", {"exception_type": "graph.DependencyCycleError"}]]}}});
        assert!(matches!(
            parse_history(&cycle, "P"),
            Some(HistoryOutcome::Failed(_))
        ));
        assert_eq!(parse_history(&json!({}), "P"), None);
        let interrupted = json!({"P": {"outputs": {}, "status": {"status_str": "error", "completed": false,
            "messages": [["execution_start", {}], ["execution_interrupted", {"node_id": "3"}]]}}});
        assert_eq!(
            parse_history(&interrupted, "P"),
            Some(HistoryOutcome::Interrupted)
        );
    }

    #[test]
    fn queue_positions_count_who_is_ahead() {
        let q = json!({"queue_running": [[0, "R", {}, {}, []]],
                       "queue_pending": [[3, "C", {}, {}, []], [1, "A", {}, {}, []], [2.0, "B", {}, {}, []]]});
        assert_eq!(queue_state(&q, "R"), QueueState::Running);
        assert_eq!(queue_state(&q, "A"), QueueState::Pending(1));
        assert_eq!(queue_state(&q, "C"), QueueState::Pending(3));
        assert_eq!(queue_state(&q, "Z"), QueueState::Absent);
    }

    proptest::proptest! {
        #[test]
        fn no_input_makes_the_decoders_panic(s in ".{0,300}", b in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode_text(&s);
            let _ = decode_binary(&Bytes::from(b));
            let _ = classify_submit_error(400, &s);
        }
    }
}
