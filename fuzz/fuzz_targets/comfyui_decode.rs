//! The ComfyUI wire decoders on arbitrary bytes: binary WebSocket frames, text frames (one per
//! line, fed in order to a `PromptTracker`), `/history` and `/queue` answers and `POST /prompt`
//! error bodies. None may panic; the tracker emits at most one terminal event and nothing after
//! it; decoded messages carry the prompt id the JSON names.

#![no_main]

use bytes::Bytes;
use comfyfleet_comfyui::PromptTracker;
use comfyfleet_comfyui::protocol::{
    BinaryMessage, QueueState, ServerMessage, classify_execution_error, classify_submit_error,
    decode_binary, decode_text, decode_value, history_artifacts, node_artifacts, parse_history,
    queue_state,
};
use comfyfleet_core::{BackendId, ExecutionEvent};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let backend = BackendId::new("fuzz");
    binary(data);

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    // Text frames: the whole input, then each line as one frame of a message stream.
    let _ = decode_text(text);
    let mut tracker: Option<PromptTracker> = None;
    let mut terminal_events = 0usize;
    for line in text.lines() {
        let Ok(msg) = decode_text(line) else {
            continue;
        };
        let value: Value = serde_json::from_str(line).expect("decode_text accepted it as JSON");
        assert_eq!(decode_value(&value).as_ref(), Ok(&msg));
        check_prompt_id(&msg, &value);
        if let ServerMessage::ExecutionError { data, .. } = &msg {
            assert!(!classify_execution_error(data).message.is_empty());
        }
        if let ServerMessage::Executed { node, output, .. } = &msg {
            let _ = node_artifacts(&backend, node, output);
        }
        // The first prompt id seen is "ours"; messages about others are ignored by the tracker.
        let t = tracker.get_or_insert_with(|| {
            PromptTracker::new(msg.prompt_id().unwrap_or("p"), backend.clone())
        });
        let was_terminal = t.is_terminal();
        let events = t.handle(&msg);
        if was_terminal {
            assert!(
                events.is_empty(),
                "events after the terminal one: {events:?}"
            );
        }
        terminal_events += events.iter().filter(|e| e.is_terminal()).count();
        assert_eq!(t.is_terminal(), terminal_events == 1);
        assert!(terminal_events <= 1);
    }

    let Ok(body) = serde_json::from_str::<Value>(text) else {
        for status in [400, 413, 429, 503] {
            assert!(!classify_submit_error(status, text).message.is_empty());
        }
        return;
    };
    for status in [400, 429, 500] {
        assert!(!classify_submit_error(status, text).message.is_empty());
    }

    // `/history/{id}`: every top-level key is a prompt id the answer may describe.
    if let Some(map) = body.as_object() {
        for id in map.keys().take(4) {
            let outcome = parse_history(&body, id).expect("a listed id has an entry");
            let mut t = tracker
                .take()
                .unwrap_or_else(|| PromptTracker::new(id.clone(), backend.clone()));
            let already = t.is_terminal();
            let events = t.handle_history(&outcome);
            assert_eq!(
                events.iter().filter(|e| e.is_terminal()).count(),
                usize::from(!already)
            );
            assert!(t.is_terminal());
            if let Some(ExecutionEvent::Succeeded { artifacts }) = events.last() {
                let _ = artifacts.len();
            }
            if let Some(outputs) = map[id].get("outputs").and_then(Value::as_object) {
                let _ = history_artifacts(&backend, outputs);
            }
        }
    }
    let absent = "\u{0}not-a-prompt";
    // Re-serialised, escapes are normalised: this finds the id however the input spelled it.
    let names_absent = body.to_string().contains("not-a-prompt");
    if !names_absent {
        assert_eq!(parse_history(&body, absent), None);
    }

    // `/queue`: a prompt listed as running is running, whatever the pending list says.
    let running_ids: Vec<String> = body
        .get("queue_running")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|i| i.get(1).and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for id in running_ids.iter().take(4) {
        assert_eq!(queue_state(&body, id), QueueState::Running);
    }
    if let Some(pending) = body.get("queue_pending").and_then(Value::as_array) {
        for item in pending.iter().take(4) {
            if let Some(id) = item.get(1).and_then(Value::as_str) {
                let _ = queue_state(&body, id);
            }
        }
    }
    if !names_absent {
        assert_eq!(queue_state(&body, absent), QueueState::Absent);
    }
});

/// Binary frames: never panic, and payload slices stay inside the frame.
fn binary(data: &[u8]) {
    let frame = Bytes::copy_from_slice(data);
    match decode_binary(&frame) {
        Ok(BinaryMessage::Preview { image, .. }) => assert_eq!(image.len(), data.len() - 8),
        Ok(BinaryMessage::Text { .. }) => assert!(data.len() >= 8),
        Ok(BinaryMessage::PreviewWithMetadata { image, .. }) => {
            assert!(image.len() <= data.len() - 8);
        }
        Ok(_) => assert!(data.len() >= 4),
        Err(_) => {}
    }
}

/// A decoded message names the prompt its JSON names (for the kinds that carry one).
fn check_prompt_id(msg: &ServerMessage, value: &Value) {
    let named = value
        .get("data")
        .and_then(|d| d.get("prompt_id"))
        .and_then(Value::as_str);
    match msg {
        ServerMessage::Status { .. } | ServerMessage::Other { .. } => {
            assert_eq!(msg.prompt_id(), None);
        }
        _ => assert_eq!(msg.prompt_id(), named),
    }
}
