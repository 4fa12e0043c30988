//! The `comfyfleet` binary as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use assert_cmd::Command;
use predicates::prelude::*;

// One test binary per crate (each one links the whole dependency tree): the service tests live
// in a module of this one.
#[path = "cli/install.rs"]
mod install;
#[path = "cli/service.rs"]
mod service;

fn comfyfleet() -> Command {
    Command::cargo_bin("comfyfleet").unwrap()
}

#[test]
fn demo_runs_a_batch_with_a_failover_and_exits_zero() {
    let out = comfyfleet()
        .args(["demo", "--jobs", "6", "--speed", "20", "--json"])
        .timeout(std::time::Duration::from_secs(120))
        .assert()
        .success()
        .get_output()
        .clone();
    let jobs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs.len(), 6);
    for j in &jobs {
        assert_eq!(j["state"], "succeeded", "{j}");
        assert!(!j["artifacts"].as_array().unwrap().is_empty(), "{j}");
    }
    // Five jobs compete for four slots at once, so the flaky backend gets one, hangs on it, and
    // that job shows the failover.
    let failed_over = jobs.iter().any(|j| {
        let attempts = j["attempts"].as_array().unwrap();
        attempts.len() == 2
            && attempts[0]["backend"] == "gpu-3-flaky"
            && attempts[0]["error"]
                .as_str()
                .unwrap()
                .contains("start timeout")
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(failed_over, "no failover in {jobs:?}\n{stderr}");
    assert!(
        stderr.contains("gpu-3-flaky blocked for this workflow"),
        "{stderr}"
    );
    assert!(stderr.contains("dashboard: http://127.0.0.1:"), "{stderr}");
    // The job needing the custom node ran where it is installed.
    let custom = &jobs[2];
    assert_eq!(custom["attempts"][0]["backend"], "gpu-2", "{custom}");
}

#[test]
fn demo_refuses_bad_options_with_a_clear_message() {
    comfyfleet()
        .args(["demo", "--jobs", "0"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("--jobs must be between 1 and 500"));
    comfyfleet()
        .args(["demo", "--speed", "0"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("--speed must be a number above 0"));
    comfyfleet()
        .args(["demo", "--jobs", "lots"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("invalid value 'lots'"));
}

#[test]
fn help_lists_the_demo() {
    comfyfleet()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("demo"));
}

fn temp_db() -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("comfyfleet-cli-{}", uuid_like()));
    let url = format!("sqlite:{}", dir.join("jobs.db").display());
    (dir, url)
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{n:x}-{}", std::process::id())
}

fn json_of(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.assert().success().get_output().stdout.clone();
    serde_json::from_slice(&out).unwrap()
}

#[test]
fn store_commands_work_on_a_sqlite_database() {
    let (dir, url) = temp_db();
    // Populate through the demo, on our database.
    comfyfleet()
        .args(["demo", "--jobs", "3", "--speed", "20", "--store", &url])
        .timeout(std::time::Duration::from_secs(120))
        .assert()
        .success();

    let page = json_of(comfyfleet().args(["jobs", "--json", "--store", &url]));
    let jobs = page["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3);
    assert!(jobs.iter().all(|j| j["state"] == "succeeded"));
    let id = jobs[0]["id"].as_str().unwrap().to_string();

    let filtered = json_of(comfyfleet().args([
        "jobs",
        "--json",
        "--state",
        "failed,cancelled",
        "--store",
        &url,
    ]));
    assert_eq!(filtered["jobs"].as_array().unwrap().len(), 0);

    let one = json_of(comfyfleet().args(["job", &id, "--json", "--store", &url]));
    assert_eq!(one["job"]["state"], "succeeded");
    // The last attempt is the one that succeeded (the first may have hit the hung simulator).
    let last = one["job"]["attempts"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["outcome"], "succeeded", "{last}");
    assert!(
        !last["nodes"].as_array().unwrap().is_empty(),
        "per-node timings: {last}"
    );
    assert_eq!(one["events"][0]["type"], "submitted");
    comfyfleet()
        .args(["job", &id, "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("attempt").and(predicate::str::contains("node 2")));

    let events = comfyfleet()
        .args(["events", &id, "--json", "--store", &url])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let events: Vec<serde_json::Value> = String::from_utf8(events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "submitted");
    assert_eq!(events.last().unwrap()["type"], "succeeded");
    // Following a finished job's events ends at once, after its terminal event.
    comfyfleet()
        .args(["events", &id, "--follow", "--store", &url])
        .env_remove("COMFYFLEET_SERVER")
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .success()
        .stdout(predicate::str::contains("succeeded on"));
    let res = json_of(comfyfleet().args(["cancel", "--json", &id, "--store", &url]));
    assert_eq!(res[0]["result"], "already succeeded");
    comfyfleet()
        .args([
            "cancel",
            "01900000-0000-7000-8000-000000000000",
            "--store",
            &url,
        ])
        .assert()
        .code(2)
        .stdout(predicate::str::contains("not found"));
    comfyfleet()
        .args(["cancel", "not-an-id", "--store", &url])
        .assert()
        .failure()
        .stderr(predicate::str::contains("invalid value 'not-an-id'"));

    comfyfleet()
        .args(["reap", "--dry-run", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("no stuck jobs"));

    let copy = dir.join("copy.db");
    comfyfleet()
        .args(["backup", copy.to_str().unwrap(), "--store", &url])
        .assert()
        .success();
    assert!(copy.exists());
    comfyfleet()
        .args(["backup", copy.to_str().unwrap(), "--store", &url])
        .assert()
        .failure()
        .stderr(predicate::str::contains("copy.db"));
    let copied = json_of(comfyfleet().args([
        "jobs",
        "--json",
        "--store",
        &format!("sqlite:{}", copy.display()),
    ]));
    assert_eq!(
        copied["jobs"].as_array().unwrap().len(),
        3,
        "the backup holds every job"
    );

    comfyfleet()
        .args(["prune", "--older-than", "0s", "--store", &url])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("backup:")
                .and(predicate::str::contains("pruned 3 finished job(s)")),
        );
    assert!(
        dir.join("backups").read_dir().unwrap().count() >= 1,
        "automatic backup before pruning"
    );
    let after = json_of(comfyfleet().args(["jobs", "--json", "--store", &url]));
    assert_eq!(after["jobs"].as_array().unwrap().len(), 0);

    comfyfleet()
        .args(["prune", "--older-than", "3weeks", "--store", &url])
        .assert()
        .failure()
        .stderr(predicate::str::contains("unknown unit"));
    comfyfleet()
        .args(["jobs", "--store", "redis://x"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("unknown store"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_corrupt_database_is_refused_and_left_alone() {
    let (dir, _) = temp_db();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.db");
    std::fs::write(&path, b"this is not a database at all, but it is my data").unwrap();
    comfyfleet()
        .args(["jobs", "--store", &format!("sqlite:{}", path.display())])
        .assert()
        .failure()
        .stderr(predicate::str::contains("bad.db"));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"this is not a database at all, but it is my data"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn the_comfyui_simulator_runs_standalone_and_answers() {
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("comfyfleet"))
        .args(["sim", "comfyui", "--port", "0", "--nodes", "MyCustomNode"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let info: serde_json::Value = rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::get(format!("{url}/api/object_info"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert!(info.get("MyCustomNode").is_some() && info.get("SaveImage").is_some());
    child.kill().unwrap();
    child.wait().unwrap();
    comfyfleet()
        .args(["sim", "comfyui", "--fault", "gremlins"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("unknown fault"));
}

#[test]
fn the_comfyui_simulator_loads_a_custom_nodes_directory() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("ComfyUI-Fleet-Pack");
    std::fs::create_dir_all(&pack).unwrap();
    std::fs::write(
        pack.join("__init__.py"),
        "NODE_CLASS_MAPPINGS = {\n    \"FleetPackNode\": Node,\n}\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("comfyfleet"))
        .args(["sim", "comfyui", "--port", "0", "--custom-nodes"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let info: serde_json::Value = rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::get(format!("{url}/api/object_info/FleetPackNode"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(
        info["FleetPackNode"]["python_module"],
        "custom_nodes.ComfyUI-Fleet-Pack"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    comfyfleet()
        .args(["sim", "comfyui", "--custom-nodes"])
        .arg(dir.path().join("missing"))
        .assert()
        .failure()
        .stderr(predicate::str::contains("not a directory"));
}

#[test]
fn the_runninghub_simulator_runs_standalone_and_answers() {
    // A free port, picked by binding and releasing it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("comfyfleet"))
        .args(["sim", "runninghub", "--port", &port.to_string()])
        .args(["--time-scale", "0.01", "--key", "k-test", "--limit", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (mut line, mut key_line) = (String::new(), String::new());
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    std::io::BufRead::read_line(&mut out, &mut key_line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert_eq!(url, format!("http://127.0.0.1:{port}"), "{line}");
    assert_eq!(key_line.trim(), "API key: k-test");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (created, status, unknown_key) = rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        let call = |path: &str, body: serde_json::Value| {
            let req = http.post(format!("{url}{path}")).json(&body);
            async move {
                req.send()
                    .await
                    .unwrap()
                    .json::<serde_json::Value>()
                    .await
                    .unwrap()
            }
        };
        let created = call(
            "/task/openapi/create",
            serde_json::json!({
                "apiKey": "k-test",
                "workflowId": "1987654321",
                "nodeInfoList": [{"nodeId": "6", "fieldName": "text", "fieldValue": "a cat"}],
            }),
        )
        .await;
        let task_id = created["data"]["taskId"].as_str().unwrap().to_owned();
        let status = call(
            "/task/openapi/status",
            serde_json::json!({"apiKey": "k-test", "taskId": task_id}),
        )
        .await;
        let unknown_key = call(
            "/task/openapi/status",
            serde_json::json!({"apiKey": "sim-api-key", "taskId": task_id}),
        )
        .await;
        (created, status, unknown_key)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(created["code"], 0, "{created}");
    assert!(
        ["QUEUED", "RUNNING"].contains(&created["data"]["taskStatus"].as_str().unwrap()),
        "{created}"
    );
    assert_eq!(status["code"], 0, "{status}");
    assert!(
        ["QUEUED", "RUNNING", "SUCCESS"].contains(&status["data"].as_str().unwrap()),
        "{status}"
    );
    // Only the key given with --key is known.
    assert_eq!(unknown_key["code"], 401, "{unknown_key}");
    comfyfleet()
        .args(["sim", "runninghub", "--fault", "gremlins"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("unknown fault"));
    comfyfleet()
        .args(["sim", "runninghub", "--limit", "0"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("--limit must be at least 1"));
}
