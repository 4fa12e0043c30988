//! The `openapi` feature's schemas describe exactly what serde emits.
//!
//! Builds an OpenAPI document from the core types (as the server does), serializes sample values
//! with `serde_json`, and checks each against its schema with a small validator that resolves
//! `$ref`, `allOf`, `oneOf` and `anyOf`. Objects are treated as closed: every key of the JSON
//! must be a property some applicable schema declares (or be allowed by `additionalProperties`),
//! so a schema that says `createdAt` where serde writes `created_at` fails, and so does a
//! required property serde leaves out.
//!
//! Run with `cargo test -p comfyfleet-core --features openapi --test openapi`.

#![cfg(feature = "openapi")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use comfyfleet_core::{
    Artifact, Attempt, AttemptOutcome, AttemptStart, Availability, BackendId, CancelOutcome,
    CancelStep, Capabilities, Completion, ErrorDetail, ErrorKind, Event, EventKind, EventQuery,
    ExecutionError, FleetEvent, Health, Inventory, JobFilter, JobId, JobPage, JobRecord, JobSpec,
    JobState, LeaseInfo, MemoryStore, NewJob, NodeTiming, PhaseDeadline, Progress, ReapAction,
    ReapItem, ReapOptions, ReapReason, ReapReport, RemoteRef, Restriction, RestrictionKind, Skip,
    StateCounts, TaskStore, TimeoutPhase, Timestamp, Upload, Workflow, WorkflowHash,
};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(components(schemas(
    JobRecord,
    JobSpec,
    Event,
    FleetEvent,
    JobPage,
    ReapReport,
    StateCounts,
    CancelOutcome,
    Availability,
    Health,
    Capabilities,
    Inventory,
    Restriction,
)))]
struct CoreApi;

// ---------------------------------------------------------------------------------------------
// A small JSON Schema checker, enough for what utoipa emits.
// ---------------------------------------------------------------------------------------------

/// Which object keys a schema accounts for.
#[derive(Debug, Clone, PartialEq)]
enum Keys {
    /// The schema says nothing about object keys (not an object schema, or `{}`).
    Unspecified,
    /// Any key is allowed (`additionalProperties` is `true` or a schema).
    Open,
    /// Only these keys.
    Closed(BTreeSet<String>),
}

impl Keys {
    fn merge(self, other: Keys) -> Keys {
        match (self, other) {
            (Keys::Unspecified, k) | (k, Keys::Unspecified) => k,
            (Keys::Open, _) | (_, Keys::Open) => Keys::Open,
            (Keys::Closed(mut a), Keys::Closed(b)) => {
                a.extend(b);
                Keys::Closed(a)
            }
        }
    }
}

/// The document's `components.schemas`, and the checker over them.
struct Doc {
    schemas: serde_json::Map<String, Value>,
}

impl Doc {
    fn new() -> Doc {
        let doc = serde_json::to_value(CoreApi::openapi()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap().clone();
        Doc { schemas }
    }

    fn component(&self, name: &str) -> &Value {
        self.schemas
            .get(name)
            .unwrap_or_else(|| panic!("no component schema {name}"))
    }

    /// `v` matches `schema`, and every key of every object in it is declared.
    fn check(&self, schema: &Value, v: &Value, path: &str) -> Result<(), String> {
        let keys = self.open(schema, v, path)?;
        if let (Keys::Closed(declared), Some(obj)) = (&keys, v.as_object()) {
            for k in obj.keys() {
                if !declared.contains(k) {
                    return Err(format!(
                        "{path}: property `{k}` is not declared (declared: {declared:?})"
                    ));
                }
            }
        }
        Ok(())
    }

    /// `v` matches `schema` as far as this schema goes; returns the keys it accounts for, so that
    /// `allOf` / `oneOf` parts can be combined before deciding whether a key is undeclared.
    fn open(&self, schema: &Value, v: &Value, path: &str) -> Result<Keys, String> {
        let s = match schema {
            Value::Bool(true) => return Ok(Keys::Open),
            Value::Bool(false) => return Err(format!("{path}: schema `false` matches nothing")),
            Value::Object(s) => s,
            other => return Err(format!("{path}: not a schema: {other}")),
        };
        if let Some(r) = s.get("$ref") {
            let r = r.as_str().unwrap();
            let name = r
                .strip_prefix("#/components/schemas/")
                .ok_or_else(|| format!("{path}: unsupported $ref {r}"))?;
            let target = self
                .schemas
                .get(name)
                .ok_or_else(|| format!("{path}: dangling $ref {r}"))?;
            return self.open(target, v, path);
        }

        // Only `properties` (or `additionalProperties: false`) close an object; a bare
        // `type: object` is free-form.
        let mut keys = Keys::Unspecified;

        if let Some(t) = s.get("type") {
            let types: Vec<&str> = match t {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
                other => return Err(format!("{path}: bad type {other}")),
            };
            if !types.iter().any(|t| type_matches(t, v)) {
                return Err(format!("{path}: {v} is not of type {types:?}"));
            }
        }
        if let Some(e) = s.get("enum")
            && !e.as_array().unwrap().contains(v)
        {
            return Err(format!("{path}: {v} is not one of {e}"));
        }
        if let Some(c) = s.get("const")
            && c != v
        {
            return Err(format!("{path}: {v} is not {c}"));
        }

        if let Some(n) = v.as_f64() {
            if let Some(min) = s.get("minimum").and_then(Value::as_f64)
                && n < min
            {
                return Err(format!("{path}: {n} < minimum {min}"));
            }
            if let Some(max) = s.get("maximum").and_then(Value::as_f64)
                && n > max
            {
                return Err(format!("{path}: {n} > maximum {max}"));
            }
        }
        if let Some(text) = v.as_str() {
            if let Some(min) = s.get("minLength").and_then(Value::as_u64)
                && (text.chars().count() as u64) < min
            {
                return Err(format!("{path}: {text:?} is shorter than {min}"));
            }
            if s.get("format").and_then(Value::as_str) == Some("uuid")
                && uuid::Uuid::parse_str(text).is_err()
            {
                return Err(format!("{path}: {text:?} is not a UUID"));
            }
        }

        if let Some(obj) = v.as_object() {
            if let Some(req) = s.get("required") {
                for r in req.as_array().unwrap() {
                    let r = r.as_str().unwrap();
                    if !obj.contains_key(r) {
                        return Err(format!("{path}: required property `{r}` is missing"));
                    }
                }
            }
            let props = s.get("properties").and_then(Value::as_object);
            if let Some(props) = props {
                let mut declared = BTreeSet::new();
                for (k, ps) in props {
                    declared.insert(k.clone());
                    if let Some(pv) = obj.get(k) {
                        self.check(ps, pv, &format!("{path}.{k}"))?;
                    }
                }
                keys = keys.merge(Keys::Closed(declared));
            }
            match s.get("additionalProperties") {
                None => {}
                Some(Value::Bool(false)) => keys = keys.merge(Keys::Closed(BTreeSet::new())),
                Some(Value::Bool(true)) => keys = Keys::Open,
                Some(extra) => {
                    for (k, pv) in obj {
                        if !props.is_some_and(|p| p.contains_key(k)) {
                            self.check(extra, pv, &format!("{path}.{k}"))?;
                        }
                    }
                    keys = Keys::Open;
                }
            }
            if let Some(names) = s.get("propertyNames") {
                for k in obj.keys() {
                    self.check(
                        names,
                        &Value::String(k.clone()),
                        &format!("{path}[key {k:?}]"),
                    )?;
                }
            }
            if let Some(min) = s.get("minProperties").and_then(Value::as_u64)
                && (obj.len() as u64) < min
            {
                return Err(format!("{path}: fewer than {min} properties"));
            }
        }

        if let Some(items) = v.as_array() {
            let prefix = s
                .get("prefixItems")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            for (i, (ps, iv)) in prefix.iter().zip(items).enumerate() {
                self.check(ps, iv, &format!("{path}[{i}]"))?;
            }
            match s.get("items") {
                None => {}
                Some(Value::Bool(false)) if items.len() > prefix.len() => {
                    return Err(format!("{path}: more than {} items", prefix.len()));
                }
                // With `items: false` nothing follows the prefix, so this checks nothing.
                Some(is) => {
                    for (i, iv) in items.iter().enumerate().skip(prefix.len()) {
                        self.check(is, iv, &format!("{path}[{i}]"))?;
                    }
                }
            }
            if let Some(min) = s.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                return Err(format!("{path}: fewer than {min} items"));
            }
            if let Some(max) = s.get("maxItems").and_then(Value::as_u64)
                && (items.len() as u64) > max
            {
                return Err(format!("{path}: more than {max} items"));
            }
            if s.get("uniqueItems") == Some(&Value::Bool(true)) {
                for (i, a) in items.iter().enumerate() {
                    if items[..i].contains(a) {
                        return Err(format!("{path}: duplicate item {a}"));
                    }
                }
            }
        }

        if let Some(all) = s.get("allOf") {
            for (i, sub) in all.as_array().unwrap().iter().enumerate() {
                let k = self.open(sub, v, &format!("{path}<allOf {i}>"))?;
                keys = keys.merge(k);
            }
        }
        if let Some(one) = s.get("oneOf") {
            let mut matched = Vec::new();
            let mut errors = Vec::new();
            for (i, sub) in one.as_array().unwrap().iter().enumerate() {
                match self.open(sub, v, &format!("{path}<oneOf {i}>")) {
                    Ok(k) => matched.push((i, k)),
                    Err(e) => errors.push(e),
                }
            }
            match matched.len() {
                1 => keys = keys.merge(matched.remove(0).1),
                0 => {
                    return Err(format!(
                        "{path}: matches no oneOf branch:\n  {}",
                        errors.join("\n  ")
                    ));
                }
                _ => {
                    let which: Vec<usize> = matched.iter().map(|(i, _)| *i).collect();
                    return Err(format!("{path}: matches several oneOf branches {which:?}"));
                }
            }
        }
        if let Some(any) = s.get("anyOf") {
            let mut any_matched = false;
            for (i, sub) in any.as_array().unwrap().iter().enumerate() {
                if let Ok(k) = self.open(sub, v, &format!("{path}<anyOf {i}>")) {
                    any_matched = true;
                    keys = keys.merge(k);
                }
            }
            if !any_matched {
                return Err(format!("{path}: matches no anyOf branch"));
            }
        }
        Ok(keys)
    }

    /// Serializes `value` with serde and checks it against the component `name`.
    fn check_value<T: Serialize>(&self, name: &str, value: &T) -> Result<(), String> {
        let json = serde_json::to_value(value).unwrap();
        self.check(self.component(name), &json, name)
    }

    /// Like [`Doc::check_value`], but panics with the JSON on a mismatch.
    #[track_caller]
    fn assert_matches<T: Serialize>(&self, name: &str, value: &T) {
        if let Err(e) = self.check_value(name, value) {
            panic!(
                "serde output does not match schema {name}: {e}\nJSON: {}",
                serde_json::to_string_pretty(value).unwrap()
            );
        }
    }

    /// The top-level properties the schema `name` declares and requires for `json`, resolving
    /// `$ref`, `allOf` and the `oneOf` branch `json` matches.
    fn top_level(&self, name: &str, json: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut declared = BTreeSet::new();
        let mut required = BTreeSet::new();
        self.collect(self.component(name), json, &mut declared, &mut required);
        (declared, required)
    }

    fn collect(
        &self,
        schema: &Value,
        json: &Value,
        declared: &mut BTreeSet<String>,
        required: &mut BTreeSet<String>,
    ) {
        let Some(s) = schema.as_object() else { return };
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r.trim_start_matches("#/components/schemas/");
            return self.collect(self.component(name), json, declared, required);
        }
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            declared.extend(props.keys().cloned());
        }
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            required.extend(req.iter().map(|r| r.as_str().unwrap().to_owned()));
        }
        for sub in s
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.collect(sub, json, declared, required);
        }
        for sub in s
            .get("oneOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if self.open(sub, json, "").is_ok() {
                self.collect(sub, json, declared, required);
            }
        }
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Samples: every optional field set, so that `skip_serializing_if` fields are present.
// ---------------------------------------------------------------------------------------------

fn t(ms: i64) -> Timestamp {
    Timestamp::from_millis(1_795_425_154_000 + ms)
}

fn workflow() -> Workflow {
    Workflow::from_value(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "color": 0}},
        "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": 0.5}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "fleet", "opts": {"__value__": [1, 2]}},
            "_meta": {"title": "Save"}
        },
        "4": {"class_type": "PreviewAny", "inputs": null}
    }))
    .unwrap()
}

fn full_spec() -> JobSpec {
    let mut spec = JobSpec::new(workflow())
        .priority(-5)
        .max_attempts(4)
        .deadline(Duration::from_secs(600))
        .idempotency_key("batch-7-item-3")
        .label("project", "cats")
        .only_on([BackendId::new("gpu-1")]);
    spec.inputs
        .entry("2".into())
        .or_default()
        .insert("seconds".into(), json!(1.5));
    spec.uploads.push(Upload {
        name: "cat.png".into(),
        sha256: "ab".repeat(32),
        size: 1234,
    });
    spec.timeouts.start_ms = Some(30_000);
    spec.timeouts.node_ms = Some(0);
    spec.timeouts
        .node_class_ms
        .insert("KSampler".into(), 120_000);
    spec.constraints.labels.insert("gpu".into(), "a100".into());
    spec.webhook = Some("https://example.com/hooks/comfyfleet".into());
    spec
}

fn progress() -> Progress {
    Progress {
        percent: 37.5,
        nodes_total: 4,
        nodes_done: 1,
        current_node: Some("2".into()),
        current_class: Some("TestSleep".into()),
        node_value: Some(5.0),
        node_max: Some(10.0),
        eta_ms: Some(8_000),
    }
}

fn artifact() -> Artifact {
    Artifact {
        node: "3".into(),
        filename: "fleet_00001_.png".into(),
        kind: "image".into(),
        content_type: Some("image/png".into()),
        size: Some(4096),
        sha256: Some("cd".repeat(32)),
        backend: BackendId::new("gpu-1"),
        locator: json!({"filename": "fleet_00001_.png", "subfolder": "", "type": "output"}),
    }
}

fn minimal_artifact() -> Artifact {
    Artifact {
        node: "3".into(),
        filename: "out.txt".into(),
        kind: "text".into(),
        content_type: None,
        size: None,
        sha256: None,
        backend: BackendId::new("gpu-1"),
        locator: Value::Null,
    }
}

fn errors() -> Vec<ExecutionError> {
    vec![
        ExecutionError::missing_node("FleetNoSuchNode", Some("2".into())),
        ExecutionError::timeout(TimeoutPhase::NodeSilence, Duration::from_secs(5), None),
        ExecutionError::deterministic("prompt outputs failed validation").with_detail(
            ErrorDetail::Validation {
                nodes: vec![("3".into(), vec!["images: required input missing".into()])],
            },
        ),
        ExecutionError::backend_specific("CUDA out of memory")
            .with_node("2")
            .with_detail(ErrorDetail::Exception {
                exception_type: "torch.OutOfMemoryError".into(),
            }),
        ExecutionError::transient("server restarted").with_detail(ErrorDetail::Lost),
        ExecutionError::new(ErrorKind::Internal, "bug"),
        ExecutionError::cancelled("cancelled by user"),
    ]
}

fn cancel_step() -> CancelStep {
    CancelStep {
        at: t(900),
        action: "remote_cancel".into(),
        result: "interrupt sent".into(),
    }
}

fn full_record() -> JobRecord {
    let failed = Attempt {
        number: 1,
        backend: BackendId::new("gpu-2"),
        remote: Some(RemoteRef::new("8f0c2a6e")),
        dispatched_at: t(10),
        started_at: Some(t(20)),
        ended_at: Some(t(30)),
        outcome: Some(AttemptOutcome::TimedOut),
        error: Some(errors()[1].clone()),
        nodes: vec![
            NodeTiming {
                node: "1".into(),
                class_type: Some("EmptyImage".into()),
                started_at: t(21),
                ended_at: Some(t(22)),
                cached: true,
            },
            NodeTiming {
                node: "2".into(),
                class_type: None,
                started_at: t(23),
                ended_at: None,
                cached: false,
            },
        ],
        reattached: false,
        cancel_steps: vec![cancel_step()],
    };
    let running = Attempt {
        number: 2,
        backend: BackendId::new("gpu-1"),
        remote: None,
        dispatched_at: t(40),
        started_at: None,
        ended_at: None,
        outcome: None,
        error: None,
        nodes: Vec::new(),
        reattached: true,
        cancel_steps: Vec::new(),
    };
    JobRecord {
        id: JobId::new(),
        spec: full_spec(),
        state: JobState::Running,
        created_at: t(0),
        updated_at: t(50),
        run_at: t(40),
        deadline: Some(t(600_000)),
        claims: 2,
        attempts: vec![failed, running],
        crash_requeues: 1,
        lease: Some(LeaseInfo {
            owner: "engine-1".into(),
            expires_at: t(30_000),
        }),
        cancel_requested_at: Some(t(45)),
        progress: Some(progress()),
        progress_at: Some(t(44)),
        phase: Some(PhaseDeadline {
            phase: TimeoutPhase::Start,
            deadline: Some(t(5_000)),
        }),
        wait_reason: Some("every backend is busy".into()),
        error: Some(errors()[0].clone()),
        artifacts: vec![artifact(), minimal_artifact()],
        finished_at: Some(t(60)),
        last_seq: 12,
    }
}

/// One of every event kind.
fn all_event_kinds() -> Vec<EventKind> {
    let gpu = || BackendId::new("gpu-1");
    vec![
        EventKind::Submitted { priority: 3 },
        EventKind::Waiting {
            reason: "every backend is busy".into(),
            until: Some(t(1)),
        },
        EventKind::Dispatched {
            attempt: 1,
            backend: gpu(),
            skipped: vec![Skip {
                backend: BackendId::new("gpu-2"),
                reason: "no node class FleetNoSuchNode".into(),
            }],
        },
        EventKind::Reattached {
            attempt: 2,
            backend: gpu(),
            remote: RemoteRef::new("abc"),
        },
        EventKind::Accepted {
            attempt: 1,
            remote: RemoteRef::new("abc"),
        },
        EventKind::Queued {
            attempt: 1,
            position: 2,
        },
        EventKind::Started { attempt: 1 },
        EventKind::NodeStarted {
            attempt: 1,
            node: "2".into(),
            class_type: Some("TestSleep".into()),
        },
        EventKind::NodeFinished {
            attempt: 1,
            node: "2".into(),
            cached: true,
        },
        EventKind::Progress {
            attempt: 1,
            progress: progress(),
        },
        EventKind::Output {
            attempt: 1,
            node: "3".into(),
            artifacts: vec![artifact()],
        },
        EventKind::Warning {
            message: "task stuck in one state".into(),
        },
        EventKind::AttemptFailed {
            attempt: 1,
            backend: gpu(),
            error: errors()[3].clone(),
            retry_at: Some(t(2)),
        },
        EventKind::CancelRequested { force: true },
        EventKind::CancelStepTaken {
            attempt: 1,
            step: cancel_step(),
        },
        EventKind::Requeued {
            reason: "lease expired".into(),
            crash_requeues: 1,
        },
        EventKind::Succeeded {
            attempt: 1,
            backend: gpu(),
            artifacts: vec![artifact()],
        },
        EventKind::Failed {
            error: errors()[2].clone(),
        },
        EventKind::Cancelled {
            reason: "cancelled by user".into(),
        },
    ]
}

fn event(seq: u32, kind: EventKind) -> Event {
    Event {
        id: 100 + u64::from(seq),
        job: JobId::new(),
        seq,
        at: t(i64::from(seq)),
        kind,
    }
}

fn one_of_len(doc: &Doc, name: &str) -> usize {
    doc.component(name)["oneOf"].as_array().unwrap().len()
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn job_record_top_level_keys_are_declared_and_required_ones_present() {
    let doc = Doc::new();
    let minimal = JobRecord {
        spec: JobSpec::new(workflow()),
        state: JobState::Pending,
        deadline: None,
        attempts: Vec::new(),
        crash_requeues: 0,
        lease: None,
        cancel_requested_at: None,
        progress: None,
        progress_at: None,
        phase: None,
        wait_reason: None,
        error: None,
        artifacts: Vec::new(),
        finished_at: None,
        ..full_record()
    };
    for record in [full_record(), minimal] {
        let json = serde_json::to_value(&record).unwrap();
        let (declared, required) = doc.top_level("JobRecord", &json);
        let keys: BTreeSet<String> = json.as_object().unwrap().keys().cloned().collect();
        let undeclared: Vec<_> = keys.difference(&declared).collect();
        assert!(undeclared.is_empty(), "undeclared keys {undeclared:?}");
        let missing: Vec<_> = required.difference(&keys).collect();
        assert!(missing.is_empty(), "required keys missing {missing:?}");
        doc.assert_matches("JobRecord", &record);
    }
    // The full sample really exercises the optional fields.
    let json = serde_json::to_value(full_record()).unwrap();
    let (declared, _) = doc.top_level("JobRecord", &json);
    let keys: BTreeSet<String> = json.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, declared, "the full sample sets every field");
}

#[test]
fn every_event_kind_matches_the_event_schema() {
    let doc = Doc::new();
    let kinds = all_event_kinds();
    assert_eq!(
        kinds.len(),
        one_of_len(&doc, "EventKind"),
        "add a sample for the new event kind"
    );
    for (seq, kind) in kinds.into_iter().enumerate() {
        let e = event(u32::try_from(seq).unwrap() + 1, kind);
        let json = serde_json::to_value(&e).unwrap();
        let (declared, required) = doc.top_level("Event", &json);
        for k in json.as_object().unwrap().keys() {
            assert!(
                declared.contains(k),
                "{}: `{k}` not declared",
                e.kind.name()
            );
        }
        for r in &required {
            assert!(json.get(r).is_some(), "{}: `{r}` missing", e.kind.name());
        }
        assert!(required.contains("type") && required.contains("id"));
        doc.assert_matches("Event", &e);
    }
    // The optional fields left out.
    let sparse = [
        EventKind::Waiting {
            reason: "busy".into(),
            until: None,
        },
        EventKind::Dispatched {
            attempt: 1,
            backend: BackendId::new("gpu-1"),
            skipped: Vec::new(),
        },
        EventKind::NodeStarted {
            attempt: 1,
            node: "1".into(),
            class_type: None,
        },
        EventKind::Progress {
            attempt: 1,
            progress: Progress::default(),
        },
        EventKind::Output {
            attempt: 1,
            node: "3".into(),
            artifacts: vec![minimal_artifact()],
        },
        EventKind::AttemptFailed {
            attempt: 1,
            backend: BackendId::new("gpu-1"),
            error: ExecutionError::transient("connection reset"),
            retry_at: None,
        },
    ];
    for kind in sparse {
        doc.assert_matches("Event", &event(2, kind));
    }
    for e in errors() {
        doc.assert_matches("Event", &event(1, EventKind::Failed { error: e }));
    }
}

#[test]
fn fleet_events_match_their_schema() {
    let doc = Doc::new();
    let gpu = || BackendId::new("gpu-1");
    let structure = || WorkflowHash::from_hex("ef".repeat(32));
    // `FleetEvent::Job` is left out: serde writes an internally tagged newtype variant holding
    // an `Event` (itself tagged with `type`) as an object with two `type` keys, which no schema
    // can describe. The server sends job events as plain `Event`s instead.
    let samples = vec![
        FleetEvent::BackendBlocked {
            backend: gpu(),
            structure: structure(),
            until: t(1),
            reason: "hung".into(),
        },
        FleetEvent::BackendUnblocked {
            backend: gpu(),
            structure: structure(),
        },
        FleetEvent::CircuitOpened {
            backend: gpu(),
            until: t(2),
            reason: "5 transient failures".into(),
        },
        FleetEvent::CircuitClosed { backend: gpu() },
        FleetEvent::BackendQuarantined {
            backend: gpu(),
            reason: "cancel did not stop it".into(),
        },
        FleetEvent::BackendReleased { backend: gpu() },
        FleetEvent::Lagged { missed: 17 },
    ];
    assert_eq!(samples.len() + 1, one_of_len(&doc, "FleetEvent"));
    for f in &samples {
        doc.assert_matches("FleetEvent", f);
    }
}

#[test]
fn pages_reports_and_backend_views_match() {
    let doc = Doc::new();
    let record = full_record();
    for next in [Some(JobId::new()), None] {
        doc.assert_matches(
            "JobPage",
            &JobPage {
                jobs: vec![
                    record.summary(),
                    JobRecord {
                        attempts: Vec::new(),
                        progress: None,
                        error: None,
                        wait_reason: None,
                        spec: JobSpec::new(workflow()),
                        ..record.clone()
                    }
                    .summary(),
                ],
                next,
            },
        );
    }
    doc.assert_matches(
        "ReapReport",
        &ReapReport {
            dry_run: false,
            items: vec![ReapItem {
                job: record.id,
                state: JobState::Running,
                attempt: 2,
                owner: Some("engine-1".into()),
                backend: Some(BackendId::new("gpu-1")),
                age_ms: 60_000,
                last_progress_at: Some(t(44)),
                reason: ReapReason::PhaseDeadline,
                action: ReapAction::Requeue,
            }],
            events: vec![event(
                3,
                EventKind::Requeued {
                    reason: "lease expired".into(),
                    crash_requeues: 1,
                },
            )],
        },
    );
    let mut counts = StateCounts::default();
    for (i, s) in JobState::ALL.into_iter().enumerate() {
        counts.0.insert(s, i as u64);
    }
    doc.assert_matches("StateCounts", &counts);
    for outcome in [
        CancelOutcome::Cancelled,
        CancelOutcome::CancelRequested,
        CancelOutcome::AlreadyRequested,
        CancelOutcome::Running,
        CancelOutcome::AlreadyTerminal(JobState::Failed),
    ] {
        doc.assert_matches("CancelOutcome", &outcome);
    }
    for a in [
        Availability::Active,
        Availability::Draining,
        Availability::Quarantined {
            reason: "stuck".into(),
        },
    ] {
        doc.assert_matches("Availability", &a);
    }
    doc.assert_matches("Health", &Health::ok());
    doc.assert_matches(
        "Health",
        &Health {
            healthy: false,
            queue_depth: Some(3),
            detail: "connection refused".into(),
        },
    );
    doc.assert_matches("Capabilities", &Capabilities::default());
    doc.assert_matches("Inventory", &Inventory::default());
    doc.assert_matches(
        "Inventory",
        &Inventory {
            node_classes: Some(BTreeSet::from(["KSampler".to_string()])),
            models: Some(BTreeSet::from(["sdxl.safetensors".to_string()])),
            labels: BTreeMap::from([("gpu".to_string(), "a100".to_string())]),
            facts: BTreeMap::from([("vram".to_string(), "80 GiB".to_string())]),
        },
    );
    for (kind, structure) in [
        (
            RestrictionKind::Blocked,
            Some(WorkflowHash::from_hex("ef".repeat(32))),
        ),
        (RestrictionKind::CircuitOpen, None),
    ] {
        doc.assert_matches(
            "Restriction",
            &Restriction {
                backend: BackendId::new("gpu-1"),
                kind,
                structure,
                until: t(5),
                reason: "hung".into(),
            },
        );
    }
}

#[tokio::test]
async fn what_a_store_returns_matches() {
    let doc = Doc::new();
    let store = MemoryStore::new();
    let now = t(0);
    let job = store
        .enqueue(NewJob::new(full_spec()), now)
        .await
        .unwrap()
        .id;
    store
        .enqueue(NewJob::new(JobSpec::new(workflow())), now)
        .await
        .unwrap();
    let claimed = store
        .claim("engine-1", Duration::from_secs(30), now)
        .await
        .unwrap()
        .unwrap();
    store
        .start_attempt(
            &claimed.lease,
            AttemptStart {
                backend: BackendId::new("gpu-1"),
                remote: None,
                reattached: false,
                skipped: Vec::new(),
                phase: Some(PhaseDeadline {
                    phase: TimeoutPhase::Dispatch,
                    deadline: None,
                }),
                capacity: None,
            },
            now,
        )
        .await
        .unwrap();
    let running = store.get(claimed.job.id).await.unwrap().unwrap();
    doc.assert_matches("JobRecord", &running);
    let report = store
        .reap(
            &ReapOptions {
                dry_run: true,
                stuck_after: Some(Duration::from_secs(1)),
                ..ReapOptions::default()
            },
            t(60_000),
        )
        .await
        .unwrap();
    assert!(!report.items.is_empty());
    doc.assert_matches("ReapReport", &report);
    store
        .complete(
            &claimed.lease,
            Completion {
                artifacts: vec![artifact()],
                nodes: Vec::new(),
                progress: Some(progress()),
            },
            t(100),
        )
        .await
        .unwrap();
    let done = store.get(job).await.unwrap().unwrap();
    doc.assert_matches("JobRecord", &done);
    doc.assert_matches("JobPage", &store.list(&JobFilter::default()).await.unwrap());
    doc.assert_matches("StateCounts", &store.counts().await.unwrap());
    let events = store.events(&EventQuery::default()).await.unwrap();
    assert!(events.len() >= 4);
    for e in &events {
        doc.assert_matches("Event", e);
    }
}

#[test]
fn the_checker_rejects_what_serde_would_not_write() {
    let doc = Doc::new();
    let good = serde_json::to_value(full_record()).unwrap();
    assert!(doc.check(doc.component("JobRecord"), &good, "r").is_ok());
    let bad = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        doc.check(doc.component("JobRecord"), &v, "r")
    };
    let renamed = bad(&|v| {
        let x = v.as_object_mut().unwrap().remove("created_at").unwrap();
        v["createdAt"] = x;
    });
    assert!(renamed.is_err(), "camelCase key accepted");
    assert!(bad(&|v| v["state"] = json!("RetryWait")).is_err());
    assert!(bad(&|v| v["created_at"] = json!("2026-11-23T09:12:34Z")).is_err());
    assert!(bad(&|v| v["id"] = json!("not-a-uuid")).is_err());
    assert!(bad(&|v| v["attempts"][0]["startedAt"] = json!(1)).is_err());
    assert!(bad(&|v| v["attempts"][0]["error"]["detail"]["type"] = json!("oops")).is_err());
    assert!(bad(&|v| v["spec"]["workflow"]["2"]["inputs"]["value"] = json!(["1"])).is_err());
    assert!(
        bad(&|v| {
            v.as_object_mut().unwrap().remove("last_seq");
        })
        .is_err(),
        "missing required key accepted"
    );

    let e = serde_json::to_value(event(1, EventKind::Started { attempt: 1 })).unwrap();
    let ev = doc.component("Event");
    assert!(doc.check(ev, &e, "e").is_ok());
    let mut extra = e.clone();
    extra["position"] = json!(1);
    assert!(doc.check(ev, &extra, "e").is_err(), "key of another kind");
    let mut untyped = e.clone();
    untyped.as_object_mut().unwrap().remove("type");
    assert!(doc.check(ev, &untyped, "e").is_err(), "missing tag");
}

#[test]
fn hand_written_schemas_describe_the_serde_forms() {
    let doc = Doc::new();
    let ts = &doc.component("Timestamp");
    assert_eq!(ts["type"], "integer");
    assert!(
        doc.check(ts, &serde_json::to_value(t(5)).unwrap(), "t")
            .is_ok()
    );
    let id = &doc.component("JobId");
    assert_eq!(
        (id["type"].as_str(), id["format"].as_str()),
        (Some("string"), Some("uuid"))
    );
    assert!(
        doc.check(id, &serde_json::to_value(JobId::new()).unwrap(), "id")
            .is_ok()
    );
    for name in ["BackendId", "RemoteRef", "WorkflowHash"] {
        assert_eq!(doc.component(name)["type"], "string", "{name}");
    }
    let wf = doc.component("Workflow");
    assert!(
        doc.check(wf, &serde_json::to_value(workflow()).unwrap(), "w")
            .is_ok()
    );
    assert!(doc.check(wf, &json!({}), "w").is_err(), "empty workflow");
    assert!(doc.check(wf, &json!({"1": {"inputs": {}}}), "w").is_err());
}

#[test]
fn every_reference_resolves() {
    fn walk(v: &Value, doc: &Doc, seen: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    let name = r.trim_start_matches("#/components/schemas/");
                    assert!(doc.schemas.contains_key(name), "dangling {r}");
                    seen.insert(name.to_owned());
                }
                m.values().for_each(|x| walk(x, doc, seen));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, doc, seen)),
            _ => {}
        }
    }
    let doc = Doc::new();
    let mut seen = BTreeSet::new();
    walk(&Value::Object(doc.schemas.clone()), &doc, &mut seen);
    for name in [
        "Timestamp",
        "JobId",
        "BackendId",
        "RemoteRef",
        "Workflow",
        "WorkflowHash",
        "Attempt",
        "ErrorDetail",
        "EventKind",
        "Progress",
    ] {
        assert!(seen.contains(name), "{name} is referenced");
    }
}
