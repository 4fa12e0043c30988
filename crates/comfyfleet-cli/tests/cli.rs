//! The `comfyfleet` binary as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use assert_cmd::Command;
use predicates::prelude::*;

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
