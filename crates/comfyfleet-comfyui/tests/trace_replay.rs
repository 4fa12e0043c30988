//! Every recorded ComfyUI trace (testdata/comfyui-traces, from a real ComfyUI 0.3.64) replayed
//! through the client's interpretation: the right terminal state, per-node progress, errors and
//! outputs. One row per trace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use comfyfleet_comfyui::PromptTracker;
use comfyfleet_comfyui::protocol::{
    HistoryOutcome, QueueState, classify_submit_error, decode_value, parse_history, queue_state,
};
use comfyfleet_core::{BackendId, ErrorDetail, ErrorKind, ExecutionEvent};
use serde_json::Value;

fn trace(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/comfyui-traces")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What one prompt of a trace came to.
#[derive(Debug, Default)]
struct Seen {
    terminal: Option<String>,
    error_kind: Option<ErrorKind>,
    error: String,
    started: Vec<String>,
    finished: Vec<String>,
    cached: Vec<String>,
    progress_ticks: usize,
    outputs: Vec<String>,
    events_after_terminal: usize,
    history: Option<String>,
}

fn replay(lines: &[Value]) -> (BTreeMap<String, Seen>, Vec<(u16, Value)>) {
    let backend = BackendId::new("gpu");
    let mut trackers: BTreeMap<String, PromptTracker> = BTreeMap::new();
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut rejected = Vec::new();
    for l in lines {
        match l["dir"].as_str() {
            Some("http") if l["path"] == "/prompt" && l["method"] == "POST" => {
                let status = l["status"].as_u64().unwrap() as u16;
                if status == 200 {
                    let id = l["response"]["prompt_id"].as_str().unwrap().to_string();
                    trackers.insert(id.clone(), PromptTracker::new(id.clone(), backend.clone()));
                    seen.insert(id, Seen::default());
                } else {
                    rejected.push((status, l["response"].clone()));
                }
            }
            Some("http") if l["path"] == "/history/{prompt_id}" => {
                for (id, s) in seen.iter_mut() {
                    if let Some(outcome) = parse_history(&l["response"], id) {
                        s.history = Some(match outcome {
                            HistoryOutcome::Succeeded(_) => "succeeded".into(),
                            HistoryOutcome::Failed(_) => "failed".into(),
                            HistoryOutcome::Interrupted => "interrupted".into(),
                        });
                    }
                }
            }
            Some("ws") if l["kind"] == "text" => {
                let msg = decode_value(&l["message"]).unwrap();
                for (id, t) in trackers.iter_mut() {
                    let was_terminal = t.is_terminal();
                    let s = seen.get_mut(id).unwrap();
                    for ev in t.handle(&msg) {
                        if was_terminal {
                            s.events_after_terminal += 1;
                        }
                        match ev {
                            ExecutionEvent::NodeStarted { node } => s.started.push(node),
                            ExecutionEvent::NodeFinished { node } => s.finished.push(node),
                            ExecutionEvent::Cached { nodes } => s.cached.extend(nodes),
                            ExecutionEvent::Progress { .. } => s.progress_ticks += 1,
                            ExecutionEvent::NodeOutput { artifacts, .. } => {
                                s.outputs.extend(artifacts.into_iter().map(|a| a.filename))
                            }
                            ExecutionEvent::Succeeded { artifacts } => {
                                assert_eq!(
                                    artifacts.len(),
                                    s.outputs.len(),
                                    "success carries every output"
                                );
                                s.terminal = Some("succeeded".into());
                            }
                            ExecutionEvent::Failed { error } => {
                                s.terminal = Some("failed".into());
                                s.error_kind = Some(error.kind);
                                s.error = error.message;
                            }
                            ExecutionEvent::Interrupted => s.terminal = Some("interrupted".into()),
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (seen, rejected)
}

/// terminal, started, finished, cached, outputs.
type Expected = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
);

struct Row {
    trace: &'static str,
    /// Per accepted prompt, in submission order: terminal, started, finished, cached, outputs.
    prompts: Vec<Expected>,
    min_progress_ticks: usize,
}

#[test]
fn every_recorded_trace_is_interpreted_right() {
    let rows = vec![
        Row {
            trace: "invert.jsonl",
            prompts: vec![(
                "succeeded",
                &["1", "2", "3"],
                &["1", "2", "3"],
                &[],
                &["fleet_test_00002_.png"],
            )],
            min_progress_ticks: 0,
        },
        Row {
            trace: "progress.jsonl",
            prompts: vec![(
                "succeeded",
                &["1", "2", "3", "4"],
                &["1", "2", "3", "4"],
                &[],
                &["fleet_sleep_00002_.png"],
            )],
            min_progress_ticks: 10,
        },
        Row {
            trace: "runtime_error.jsonl",
            prompts: vec![("failed", &["1", "2"], &["1"], &[], &[])],
            min_progress_ticks: 0,
        },
        Row {
            trace: "interrupt.jsonl",
            prompts: vec![("interrupted", &["1", "2"], &["1"], &[], &[])],
            min_progress_ticks: 10,
        },
        Row {
            trace: "queued.jsonl",
            prompts: vec![
                (
                    "succeeded",
                    &["2", "3"],
                    &["2", "3"],
                    &["1"],
                    &["fleet_long_00001_.png"],
                ),
                (
                    "succeeded",
                    &["1", "2", "3"],
                    &["1", "2", "3"],
                    &[],
                    &["fleet_queued_00001_.png"],
                ),
            ],
            min_progress_ticks: 10,
        },
        Row {
            trace: "cached.jsonl",
            prompts: vec![
                (
                    "succeeded",
                    &["1", "2", "3"],
                    &["1", "2", "3"],
                    &[],
                    &["fleet_test_00001_.png"],
                ),
                // Fully cached: nothing runs, the output node reports its old file.
                (
                    "succeeded",
                    &[],
                    &[],
                    &["1", "2", "3"],
                    &["fleet_test_00001_.png"],
                ),
            ],
            min_progress_ticks: 0,
        },
    ];
    for row in rows {
        let lines = trace(row.trace);
        let (seen, rejected) = replay(&lines);
        assert!(rejected.is_empty(), "{}: unexpected rejection", row.trace);
        // Prompt ids in submission order.
        let order: Vec<String> = lines
            .iter()
            .filter(|l| l["path"] == "/prompt" && l["status"] == 200)
            .map(|l| l["response"]["prompt_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(order.len(), row.prompts.len(), "{}", row.trace);
        let mut ticks = 0;
        for (id, (terminal, started, finished, cached, outputs)) in order.iter().zip(&row.prompts) {
            let s = &seen[id];
            let ctx = format!("{} prompt {id}: {s:?}", row.trace);
            assert_eq!(s.terminal.as_deref(), Some(*terminal), "{ctx}");
            assert_eq!(s.started, *started, "{ctx}");
            assert_eq!(s.finished, *finished, "{ctx}");
            assert_eq!(s.cached, *cached, "{ctx}");
            assert_eq!(s.outputs, *outputs, "{ctx}");
            assert_eq!(s.events_after_terminal, 0, "{ctx}");
            assert_eq!(
                s.history.as_deref(),
                Some(*terminal),
                "history agrees: {ctx}"
            );
            ticks += s.progress_ticks;
        }
        assert!(
            ticks >= row.min_progress_ticks,
            "{}: {ticks} progress ticks",
            row.trace
        );
    }
}

#[test]
fn the_runtime_error_is_classified_with_comfyuis_message() {
    let (seen, _) = replay(&trace("runtime_error.jsonl"));
    let s = seen.values().next().unwrap();
    assert_eq!(
        s.error_kind,
        Some(ErrorKind::Deterministic),
        "bad input, not the server's fault"
    );
    assert!(
        s.error.starts_with(
            "node 2 (SaveImage): Exception: **** ERROR: Saving image outside the output folder"
        ),
        "{}",
        s.error
    );
}

#[test]
fn the_validation_error_is_deterministic_with_each_nodes_reason() {
    let (_, rejected) = replay(&trace("validation_error.jsonl"));
    let (status, body) = &rejected[0];
    let e = classify_submit_error(*status, &body.to_string());
    assert_eq!(e.kind, ErrorKind::Deterministic);
    assert!(e.message.starts_with("Prompt outputs failed validation; node 2: ImageInvert: Exception when validating inner node: '9'"), "{}", e.message);
    assert!(matches!(&e.detail, Some(ErrorDetail::Validation { nodes }) if nodes[0].0 == "2"));
}

#[test]
fn the_missing_node_is_backend_specific_and_names_the_class() {
    let (_, rejected) = replay(&trace("missing_node.jsonl"));
    let (status, body) = &rejected[0];
    let e = classify_submit_error(*status, &body.to_string());
    assert_eq!(
        e.kind,
        ErrorKind::BackendSpecific,
        "another server may have the node"
    );
    assert_eq!(e.missing_class(), Some("FleetNoSuchNode"));
    assert_eq!(e.node.as_deref(), Some("2"));
}

#[test]
fn a_prompt_lost_by_a_restart_is_detected_as_gone() {
    let lines = trace("restart_lost.jsonl");
    let id = lines[0]["response"]["prompt_id"].as_str().unwrap();
    assert_eq!(
        lines[0]["request"]["prompt_id"], id,
        "the client chose the id and the server kept it"
    );
    let after: Vec<&Value> = lines
        .iter()
        .filter(|l| l["note"] == "after restart")
        .collect();
    let history = after
        .iter()
        .find(|l| l["path"] == "/history/{prompt_id}")
        .unwrap();
    let queue = after.iter().find(|l| l["path"] == "/queue").unwrap();
    assert_eq!(parse_history(&history["response"], id), None);
    assert_eq!(queue_state(&queue["response"], id), QueueState::Absent);
    // While it ran, history was also empty: only the queue tells "running" from "gone".
    let during = lines.iter().find(|l| l["note"] == "while running").unwrap();
    assert_eq!(parse_history(&during["response"], id), None);
}

#[test]
fn the_queue_answer_shows_the_waiting_prompt_behind_the_running_one() {
    let lines = trace("queued.jsonl");
    let ids: Vec<&str> = lines
        .iter()
        .filter(|l| l["path"] == "/prompt")
        .map(|l| l["response"]["prompt_id"].as_str().unwrap())
        .collect();
    let q = lines.iter().find(|l| l["path"] == "/queue").unwrap();
    assert_eq!(queue_state(&q["response"], ids[0]), QueueState::Running);
    assert_eq!(queue_state(&q["response"], ids[1]), QueueState::Pending(1));
}
