//! The OpenAPI document (`comfyfleet_server::openapi()`, served at `/v1/openapi.json`):
//! valid by Python's `openapi-spec-validator`, and checked here for what that validator does not
//! check: every `$ref` resolves, every operation answers a success and (unless open) a 401,
//! every path parameter is declared, every error response is the `ErrorBody`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

use crate::routes::Checks;

fn doc() -> Value {
    serde_json::to_value(comfyfleet_server::openapi()).expect("the document serializes")
}

/// Operations are the path item's keys that are HTTP methods.
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// `(method, path, operation)` for every operation.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (m, op) in item.as_object().expect("a path item") {
            if METHODS.contains(&m.as_str()) {
                out.push((m.clone(), path.clone(), op.clone()));
            }
        }
    }
    assert!(!out.is_empty(), "no operations");
    out
}

/// Routes that are open (no token) and need not document a 401.
const OPEN: &[&str] = &["/healthz", "/readyz"];

/// (a) Python's `openapi-spec-validator` accepts the document.
#[test]
fn the_document_passes_openapi_spec_validator() {
    if std::env::var("COMFYFLEET_SKIP_PY").is_ok_and(|v| v == "1") {
        eprintln!("skipped: COMFYFLEET_SKIP_PY=1");
        return;
    }
    let missing = "Python's openapi-spec-validator is not installed; run `cargo xtask setup` (or \
                   `python3 -m pip install openapi-spec-validator`), or set COMFYFLEET_SKIP_PY=1 \
                   to skip this test";
    match Command::new("python3")
        .args(["-c", "import openapi_spec_validator"])
        .output()
    {
        Err(e) => panic!("{missing} (python3 did not start: {e})"),
        Ok(o) if !o.status.success() => {
            panic!("{missing} ({})", String::from_utf8_lossy(&o.stderr).trim())
        }
        Ok(_) => {}
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    let json = comfyfleet_server::openapi()
        .to_pretty_json()
        .expect("the document serializes");
    std::fs::write(&file, json).expect("write the document");
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator", "--validation-errors", "all"])
        .arg(&file)
        .output()
        .expect("run openapi_spec_validator");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return;
    }
    // One line per error, with where it is (the full report is long: one schema dump each).
    let mut summary = Vec::new();
    let mut last_error = String::new();
    for line in stdout.lines().chain(stderr.lines()) {
        if let Some(i) = line.find("Validation Error:") {
            last_error = line[i + "Validation Error:".len()..].trim().to_owned();
        } else if let Some(at) = line.strip_prefix("On instance") {
            summary.push(format!("{last_error} — at {}", at.trim_end_matches(':')));
        }
    }
    let head: Vec<&String> = summary.iter().take(25).collect();
    panic!(
        "openapi-spec-validator rejects the document ({} error(s)):\n  {}\n{}",
        summary.len(),
        head.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
        if summary.is_empty() {
            format!("stdout: {stdout}\nstderr: {stderr}")
        } else if summary.len() > head.len() {
            format!("  … and {} more", summary.len() - head.len())
        } else {
            String::new()
        }
    );
}

fn collect_refs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "$ref"
                    && let Some(r) = x.as_str()
                {
                    out.push((at.to_owned(), r.to_owned()));
                } else {
                    collect_refs(x, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                collect_refs(x, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// (b) Every `$ref` points into `#/components/` and resolves.
#[test]
fn every_ref_resolves_to_a_component() {
    let doc = doc();
    let mut refs = Vec::new();
    collect_refs(&doc, "", &mut refs);
    assert!(refs.len() > 20, "suspiciously few $refs: {refs:?}");
    let mut c = Checks::default();
    for (at, r) in &refs {
        match r.strip_prefix('#') {
            Some(pointer) if pointer.starts_with("/components/") => {
                if doc.pointer(pointer).is_none() {
                    c.fail(format!("{at}: $ref {r} does not resolve"));
                }
            }
            _ => c.fail(format!("{at}: $ref {r} is not a local component")),
        }
    }
    c.finish("$refs");
}

/// (b) Every operation documents a success (2xx, or 101 for the WebSocket upgrades), and a
/// 401 unless it is open; only the open ones opt out of the bearer security.
#[test]
fn every_operation_has_a_success_and_a_401() {
    let doc = doc();
    let mut c = Checks::default();
    assert_eq!(
        doc["security"],
        serde_json::json!([{"bearer": []}]),
        "bearer auth is the default"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        serde_json::json!({"type": "http", "scheme": "bearer"})
    );
    for (m, path, op) in operations(&doc) {
        let responses: BTreeSet<String> = op["responses"]
            .as_object()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        let success = responses.iter().any(|s| s.starts_with('2') || s == "101");
        if !success {
            c.fail(format!("{m} {path}: no 2xx/101 response ({responses:?})"));
        }
        let open = OPEN.contains(&path.as_str());
        if !open && !responses.contains("401") {
            c.fail(format!("{m} {path}: no 401 response ({responses:?})"));
        }
        // Open routes say so (`security: [{}]`); no other route opts out of the bearer scheme.
        let opts_out = op["security"] == serde_json::json!([{}]);
        if open != opts_out {
            c.fail(format!(
                "{m} {path}: security {} but the route is {}",
                op.get("security").unwrap_or(&Value::Null),
                if open { "open" } else { "behind the token" }
            ));
        }
    }
    c.finish("operations' responses");
}

/// (b) Every `{param}` of a path template is declared (in: path, required) by each of its
/// operations, and no operation declares a path parameter the template lacks.
#[test]
fn every_path_parameter_is_declared() {
    let doc = doc();
    let mut c = Checks::default();
    for (m, path, op) in operations(&doc) {
        let in_template: BTreeSet<String> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_owned)
            .collect();
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let mut declared = BTreeSet::new();
        let mut all = BTreeSet::new();
        for p in &params {
            let name = p["name"].as_str().unwrap_or("").to_owned();
            let location = p["in"].as_str().unwrap_or("").to_owned();
            if !all.insert((name.clone(), location.clone())) {
                c.fail(format!(
                    "{m} {path}: parameter {name} ({location}) declared twice"
                ));
            }
            if location == "path" {
                if p["required"] != true {
                    c.fail(format!("{m} {path}: path parameter {name} is not required"));
                }
                if p.get("schema").is_none() {
                    c.fail(format!("{m} {path}: path parameter {name} has no schema"));
                }
                declared.insert(name);
            }
        }
        for missing in in_template.difference(&declared) {
            c.fail(format!(
                "{m} {path}: {{{missing}}} is not declared as a path parameter"
            ));
        }
        for extra in declared.difference(&in_template) {
            c.fail(format!(
                "{m} {path}: declares path parameter {extra}, not in the template"
            ));
        }
    }
    c.finish("path parameters");
}

/// Every error response (4xx/5xx) is the JSON `ErrorBody` (readiness's 503 excepted: it is
/// the `StatusResponse`), and `ErrorBody` requires `code` and `message`.
#[test]
fn every_error_response_is_the_error_body() {
    let doc = doc();
    let mut c = Checks::default();
    let error_body = &doc["components"]["schemas"]["ErrorBody"];
    let required: BTreeSet<&str> = error_body["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        required.contains("code") && required.contains("message"),
        "ErrorBody: {error_body}"
    );
    for (m, path, op) in operations(&doc) {
        for (status, r) in op["responses"].as_object().into_iter().flatten() {
            if !(status.starts_with('4') || status.starts_with('5')) {
                continue;
            }
            if path == "/readyz" && status == "503" {
                continue;
            }
            let schema = &r["content"]["application/json"]["schema"]["$ref"];
            if schema != "#/components/schemas/ErrorBody" {
                c.fail(format!("{m} {path} {status}: not an ErrorBody: {r}"));
            }
        }
    }
    c.finish("error responses");
}

/// Operation ids are unique (client generators name methods after them).
#[test]
fn operation_ids_are_unique() {
    let doc = doc();
    let mut seen = BTreeSet::new();
    for (m, path, op) in operations(&doc) {
        let id = op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{m} {path}: no operationId"));
        assert!(
            seen.insert(id.to_owned()),
            "{m} {path}: operationId {id} twice"
        );
    }
}
