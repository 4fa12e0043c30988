//! The service commands end to end: `serve` from a configuration file on a loopback port with
//! simulated backends, and the client commands (`submit`, `run`, `job`, `jobs`, `cancel`,
//! `events`, `backends`) talking to it. No test asserts on wall-clock durations; the timeouts
//! only bound a hung process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

const TOKEN: &str = "test-token-0123456789";

/// Fast: node 2 sleeps `seconds` (0.1 in the workflows below), other nodes 10 ms.
const FAST: &str = r#"
store = "memory:"
[[backends]]
kind = "simulated"
id = "sim-1"
capacity = 2
node_seconds = 0.01
node_classes = ["EmptyImage", "ImageInvert", "SaveImage", "TestSleep"]
"#;

/// One slot, so a second job waits while the first runs.
const ONE_SLOT: &str = r#"
store = "memory:"
[[backends]]
kind = "simulated"
id = "sim-1"
capacity = 1
node_seconds = 0.01
"#;

fn sleep_wf(seconds: f64, prefix: &str) -> String {
    serde_json::json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
        "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}}
    })
    .to_string()
}

const MISSING_NODE: &str = r#"{
  "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
  "2": {"class_type": "FleetNoSuchNode", "inputs": {"image": ["1", 0]}},
  "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "m"}}
}"#;

/// The binary with none of the caller's `COMFYFLEET_` variables (a developer's own server or
/// token must not leak into the tests).
fn bin() -> Command {
    let mut c = Command::cargo_bin("comfyfleet").unwrap();
    for (k, _) in std::env::vars() {
        if k.starts_with("COMFYFLEET_") {
            c.env_remove(k);
        }
    }
    c.timeout(Duration::from_secs(120));
    c
}

fn spawn(args: &[&str], envs: &[(&str, &str)], stdout: bool) -> (Child, mpsc::Receiver<String>) {
    let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("comfyfleet"));
    for (k, _) in std::env::vars() {
        if k.starts_with("COMFYFLEET_") {
            c.env_remove(k);
        }
    }
    c.args(args).envs(envs.iter().copied());
    let mut child = if stdout {
        c.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    } else {
        c.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (tx, rx) = mpsc::channel();
    let pipe: Box<dyn std::io::Read + Send> = if stdout {
        Box::new(child.stdout.take().unwrap())
    } else {
        Box::new(child.stderr.take().unwrap())
    };
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Reads lines until one matches; panics (with what was read) if none does in time.
fn wait_line(rx: &mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if pred(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("no line with {what}; got:\n{}", seen.join("\n"));
}

fn signal(child: &Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("process did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `comfyfleet serve` on a free loopback port.
struct Service {
    child: Child,
    url: String,
    head: Vec<String>,
    dir: tempfile::TempDir,
    /// Kept open: a closed pipe would end the server at its next line of output.
    _stdout: mpsc::Receiver<String>,
}

impl Service {
    fn start(config: &str, envs: &[(&str, &str)]) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.toml");
        std::fs::write(&path, config).unwrap();
        let (child, rx) = spawn(
            &[
                "serve",
                "--config",
                path.to_str().unwrap(),
                "--bind",
                "127.0.0.1:0",
            ],
            envs,
            true,
        );
        let first = wait_line(&rx, "the dashboard URL", |l| l.contains("dashboard at"));
        let url = first
            .rsplit(' ')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "{first}");
        let auth = wait_line(&rx, "auth", |l| l.starts_with("auth:"));
        Service {
            child,
            url,
            head: vec![first, auth],
            dir,
            _stdout: rx,
        }
    }

    /// A client command against this service, with the token.
    fn cli(&self) -> Command {
        let mut c = bin();
        c.args(["--server", &self.url])
            .env("COMFYFLEET_TOKEN", TOKEN);
        c
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        signal(&self.child, "-TERM");
        wait_exit(&mut self.child)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

fn json(cmd: &mut Command) -> Value {
    let out = cmd.assert().success().get_output().stdout.clone();
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn get(url: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let r = reqwest::get(url).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// Polls `job --json` until the job is in `state`.
fn wait_state(svc: &Service, id: &str, state: &str) {
    for _ in 0..600 {
        let v = json(svc.cli().args(["job", id, "--json"]));
        if v["job"]["state"] == state {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("job {id} never became {state}");
}

#[test]
fn serve_starts_answers_healthz_needs_the_token_and_stops_on_sigterm() {
    let svc = Service::start(FAST, &[("COMFYFLEET_TOKEN", TOKEN)]);
    assert!(
        svc.head[1].starts_with("auth: on (1 token"),
        "{:?}",
        svc.head
    );
    let (status, body) = get(&format!("{}/healthz", svc.url));
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );

    // Without the token: refused, exit code 3, and a hint where the token goes.
    bin()
        .args(["--server", &svc.url, "jobs"])
        .assert()
        .code(3)
        .stderr(
            predicate::str::contains("COMFYFLEET_TOKEN").and(predicate::str::contains("HTTP 401")),
        );
    bin()
        .args(["--server", &svc.url, "jobs"])
        .env("COMFYFLEET_TOKEN", "wrong")
        .assert()
        .code(3);

    let page = json(svc.cli().args(["jobs", "--json"]));
    assert_eq!(page["jobs"].as_array().unwrap().len(), 0);
    let backends = json(svc.cli().args(["backends", "--json"]));
    assert_eq!(backends[0]["id"], "sim-1");
    svc.cli()
        .arg("backends")
        .assert()
        .success()
        .stdout(predicate::str::contains("sim-1").and(predicate::str::contains("active")));
    let drained = json(svc.cli().args(["backends", "drain", "sim-1", "--json"]));
    assert_eq!(drained["availability"]["state"], "draining");
    let enabled = json(svc.cli().args(["backends", "enable", "sim-1", "--json"]));
    assert_eq!(enabled["availability"]["state"], "active");
    svc.cli()
        .args(["backends", "drain", "gpu-9"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("gpu-9"));

    let status = svc.stop();
    assert!(status.success(), "graceful shutdown: {status:?}");
}

#[test]
fn submit_job_cancel_and_events_through_the_api() {
    let svc = Service::start(ONE_SLOT, &[]);
    assert!(svc.head[1].starts_with("auth: off"), "{:?}", svc.head);
    let long = svc.file("long.json", &sleep_wf(600.0, "long"));
    // A: runs (for ten minutes unless stopped); B: waits for the only slot.
    let a = String::from_utf8(
        svc.cli()
            .args([
                "submit",
                p(&long),
                "--label",
                "test=cancel",
                "--priority",
                "5",
            ])
            .assert()
            .success()
            .get_output()
            .stdout
            .clone(),
    )
    .unwrap()
    .trim()
    .to_owned();
    wait_state(&svc, &a, "running");
    let b = json(svc.cli().args([
        "submit",
        p(&long),
        "--json",
        "--input",
        "4.filename_prefix=waiting",
        "--idempotency-key",
        "b-1",
    ]));
    assert_eq!(b["created"], true);
    let b = b["id"].as_str().unwrap().to_owned();
    // The same idempotency key gives the same job.
    let again = json(
        svc.cli()
            .args(["submit", p(&long), "--json", "--idempotency-key", "b-1"]),
    );
    assert_eq!(again["id"], b.as_str());
    assert_eq!(again["created"], false);

    let one = json(svc.cli().args(["job", &a, "--json"]));
    assert_eq!(one["job"]["spec"]["labels"]["test"], "cancel");
    assert_eq!(one["job"]["spec"]["priority"], 5);
    assert_eq!(one["events"][0]["type"], "submitted");
    let one = json(svc.cli().args(["job", &b, "--json"]));
    assert_eq!(one["job"]["state"], "pending");
    assert_eq!(
        one["job"]["spec"]["inputs"]["4"]["filename_prefix"],
        "waiting"
    );
    svc.cli()
        .args(["job", &a])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!("job {a}  running")));

    // A pending job is cancelled at once; a running one only with --force.
    svc.cli()
        .args(["cancel", &b])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!("{b}: cancelled")));
    svc.cli()
        .args(["cancel", &a])
        .assert()
        .code(1)
        .stdout(predicate::str::contains("--force"));
    let res = json(svc.cli().args(["cancel", "--force", "--json", &a]));
    assert_eq!(res[0]["result"], "cancel_requested", "{res}");
    // Following the job's events ends after its terminal event.
    svc.cli()
        .args(["events", &a, "--follow"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("submitted (priority 5)")
                .and(predicate::str::contains("cancelled")),
        );
    let lines = svc
        .cli()
        .args(["events", &a, "--follow", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let events: Vec<Value> = String::from_utf8(lines)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.first().unwrap()["type"], "submitted");
    assert_eq!(events.last().unwrap()["type"], "cancelled");
    // Stored events of one job, without following.
    let stored = svc
        .cli()
        .args(["events", &b])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert!(String::from_utf8_lossy(&stored).contains("cancelled"));

    let page = json(svc.cli().args(["jobs", "--json", "--state", "cancelled"]));
    assert_eq!(page["jobs"].as_array().unwrap().len(), 2, "{page}");
    let page = json(svc.cli().args(["jobs", "--json", "--label", "test=cancel"]));
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1, "{page}");
    svc.cli()
        .args(["cancel", &b])
        .assert()
        .success()
        .stdout(predicate::str::contains("already cancelled"));
    svc.cli()
        .args(["cancel", "01900000-0000-7000-8000-000000000000"])
        .assert()
        .code(2)
        .stdout(predicate::str::contains("not found"));
    svc.cli()
        .args(["job", "01900000-0000-7000-8000-000000000000"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not found"));
    // Maintenance over the API: a memory store has no files to back up.
    let reap = json(svc.cli().args(["reap", "--dry-run", "--json"]));
    assert_eq!(reap["dry_run"], true);
    svc.cli()
        .arg("backup")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("HTTP 409"));
    svc.cli()
        .args(["backup", "/tmp/x.db"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("drop /tmp/x.db"));
}

#[test]
fn run_follows_each_job_and_exits_by_outcome() {
    let svc = Service::start(FAST, &[]);
    let a = svc.file("a.json", &sleep_wf(0.1, "a"));
    let b = svc.file("b.json", &sleep_wf(0.1, "b"));
    let bad = svc.file("missing.json", MISSING_NODE);

    // All succeed: exit 0, every job in the progress lines and in the summary.
    let out = svc
        .cli()
        .args(["run", p(&a), p(&b), "--count", "2"])
        .assert()
        .success()
        .get_output()
        .clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split_once(": submitted "))
        .map(|(_, rest)| rest.split(' ').next().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "{stderr}");
    for id in &ids {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(id) && l.contains("succeeded")),
            "{id} in\n{stdout}"
        );
    }
    assert!(
        stdout.contains("a.json") && stdout.contains("b.json"),
        "{stdout}"
    );

    // --json: the finished jobs.
    let jobs = json(
        svc.cli()
            .args(["run", p(&a), "--json", "--input", "2.seconds=0.05"]),
    );
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["state"], "succeeded");
    assert_eq!(jobs[0]["workflow"], "a.json");
    assert!(!jobs[0]["artifacts"].as_array().unwrap().is_empty());

    // A job that fails (no backend has its node class): exit 1, even next to a success.
    svc.cli()
        .args(["run", p(&a), p(&bad)])
        .assert()
        .code(1)
        .stdout(
            predicate::str::contains("failed").and(predicate::str::contains("FleetNoSuchNode")),
        );
}

#[test]
fn submit_uploads_input_files_first() {
    let svc = Service::start(FAST, &[]);
    let cat = svc.file("cat.png", "not really a png, but bytes all the same");
    let wf = svc.file(
        "load.json",
        r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "up"}}}"#,
    );
    let resp = json(
        svc.cli()
            .args(["submit", p(&wf), "--upload", p(&cat), "--json"]),
    );
    let id = resp["id"].as_str().unwrap();
    let job = json(svc.cli().args(["job", id, "--json"]));
    let up = &job["job"]["spec"]["uploads"][0];
    assert_eq!(up["name"], "cat.png", "{job}");
    assert_eq!(up["size"], 40);
    assert_eq!(up["sha256"].as_str().unwrap().len(), 64);
    svc.cli()
        .args(["submit", p(&wf), "--upload", "/nonexistent/dog.png"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("dog.png"));
}

#[test]
fn run_exits_two_when_a_job_is_cancelled_and_130_on_ctrl_c() {
    let svc = Service::start(ONE_SLOT, &[]);
    let long = svc.file("long.json", &sleep_wf(600.0, "long"));
    let submitted = |l: &str| l.contains(": submitted ");
    let id_of = |l: &str| {
        l.split(": submitted ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    };

    let (mut run, rx) = spawn(&["--server", &svc.url, "run", p(&long)], &[], false);
    let id = id_of(&wait_line(&rx, "submitted", submitted));
    svc.cli()
        .args(["cancel", "--force", &id])
        .assert()
        .success();
    let status = wait_exit(&mut run);
    assert_eq!(status.code(), Some(2), "cancelled → 2");

    let (mut run, rx) = spawn(&["--server", &svc.url, "run", p(&long)], &[], false);
    let id = id_of(&wait_line(&rx, "submitted", submitted));
    wait_state(&svc, &id, "running");
    signal(&run, "-INT");
    let line = wait_line(&rx, "the jobs keep running", |l| l.contains("keep running"));
    assert!(line.contains(&id), "{line}");
    assert_eq!(wait_exit(&mut run).code(), Some(130));
    // It does keep running.
    let v = json(svc.cli().args(["job", &id, "--json"]));
    assert_eq!(v["job"]["state"], "running");
    svc.cli()
        .args(["cancel", "--force", &id])
        .assert()
        .success();
}

#[test]
fn bad_configuration_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, content: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    let typo = file(
        "typo.toml",
        "store = \"memory:\"\n[engine]\nstart_timeout = 5\n",
    );
    bin()
        .args(["serve", "--config", p(&typo)])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("start_timeout")
                .and(predicate::str::contains("typo.toml"))
                .and(predicate::str::contains("engine")),
        );
    let ok = file("ok.toml", FAST);
    bin()
        .args(["serve", "--config", p(&ok)])
        .env("COMFYFLEET_ENGINE__NODE_TIMEOUT_SECS", "soon")
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "COMFYFLEET_ENGINE__NODE_TIMEOUT_SECS",
        ));
    bin()
        .args(["serve", "--config", p(&ok), "--bind", "0.0.0.0:0"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("needs a token"));
    bin()
        .args(["serve", "--config", p(&dir.path().join("nope.toml"))])
        .assert()
        .failure()
        .stderr(predicate::str::contains("nope.toml").and(predicate::str::contains("not found")));
    let kind = file("kind.toml", "[[backends]]\nkind = \"gpu\"\nid = \"x\"\n");
    bin()
        .args(["serve", "--check", "--config", p(&kind)])
        .assert()
        .failure()
        .stderr(predicate::str::contains("gpu").and(predicate::str::contains("backends")));

    // The environment overrides the file; variables that are not configuration keys are left
    // alone; secrets are not printed.
    bin()
        .args(["serve", "--check", "--config", p(&ok)])
        .env("COMFYFLEET_SERVER__BIND", "0.0.0.0:9999")
        .env("COMFYFLEET_TOKEN", "sekrit-token-value")
        .env("COMFYFLEET_SERVER__WEBHOOK_SECRET", "12345678901234567890")
        .env(
            "COMFYFLEET_BACKENDS",
            r#"[{kind="simulated", id="env-sim"}]"#,
        )
        .env("COMFYFLEET_SERVER__TOKENS", r#"["t1-aaaa", "t2-bbbb"]"#)
        .env(
            "COMFYFLEET_SERVER__CORS_ORIGINS",
            r#"["https://ops.example.com"]"#,
        )
        .env("COMFYFLEET_ENGINE__NODE_TIMEOUT_SECS", "900")
        .env("COMFYFLEET_SERVER", "http://elsewhere:1")
        .env("COMFYFLEET_LOG", "warn")
        .env("COMFYFLEET_DATA_DIR", dir.path())
        .assert()
        .success()
        .stdout(
            predicate::str::contains("0.0.0.0:9999")
                .and(predicate::str::contains("env-sim"))
                .and(predicate::str::contains("tokens: [3 redacted]"))
                .and(predicate::str::contains("https://ops.example.com"))
                .and(predicate::str::contains("node_timeout_secs: 900.0"))
                .and(predicate::str::contains("aaaa").not())
                .and(predicate::str::contains("sim-1").not())
                .and(predicate::str::contains("sekrit").not())
                .and(predicate::str::contains("1234567890").not()),
        );
}

#[test]
fn client_errors_are_clear() {
    // Nobody listens there: exit 4.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    bin()
        .args(["--server", &format!("http://127.0.0.1:{port}"), "jobs"])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("cannot reach the server"));
    // Bad files are refused before anything is sent.
    let dir = tempfile::tempdir().unwrap();
    let ui = dir.path().join("ui.json");
    std::fs::write(&ui, r#"{"nodes": [], "links": [], "version": 0.4}"#).unwrap();
    bin()
        .args([
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "submit",
            p(&ui),
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("API Format"));
    bin()
        .args(["submit", "x.json", "--input", "novalue"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("NODE.FIELD=VALUE"));
    bin()
        .args(["--server", "ftp://x", "jobs"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("http:// or https://"));
}

#[test]
fn demo_serve_keeps_the_dashboard_up_until_ctrl_c() {
    let (mut demo, rx) = spawn(
        &[
            "demo",
            "--jobs",
            "2",
            "--speed",
            "20",
            "--serve",
            "--bind",
            "127.0.0.1:0",
        ],
        &[],
        false,
    );
    let line = wait_line(&rx, "the dashboard URL", |l| l.starts_with("dashboard: "));
    let url = line
        .split(' ')
        .nth(1)
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    wait_line(&rx, "batch done", |l| l.contains("stay up"));
    let (status, html) = get(&format!("{url}/"));
    assert_eq!(status, 200);
    assert!(html.to_lowercase().contains("<html"), "{html}");
    let page = json(bin().args(["--server", &url, "jobs", "--json"]));
    let jobs = page["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j["state"] == "succeeded"), "{page}");
    signal(&demo, "-INT");
    assert!(wait_exit(&mut demo).success());
}
