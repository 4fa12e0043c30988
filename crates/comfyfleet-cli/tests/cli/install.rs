//! `install-nodes` and `installs` end to end: a real sshd on loopback (`TestInstance`), packs as
//! local git repos, the fake Python, and the real `comfyfleet sim comfyui` binary as the
//! instance's ComfyUI — started over SSH by the SSH backend's `start_command` (detached, pid
//! file), restarted by it after the install, and then running a workflow that needs the new
//! pack's class.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use comfyfleet_testkit::TestInstance;
use comfyfleet_testkit::instance::pid_alive;
use serde_json::Value;

fn bin() -> Command {
    let mut c = Command::cargo_bin("comfyfleet").unwrap();
    for (k, _) in std::env::vars() {
        if k.starts_with("COMFYFLEET_") {
            c.env_remove(k);
        }
    }
    c.timeout(Duration::from_secs(180));
    c
}

fn exe() -> String {
    env!("CARGO_BIN_EXE_comfyfleet").to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The instance plus the runtime its harness lives on, and a config file for it. Kills the
/// ComfyUI the backend started (its process group, from the pid file) when dropped.
struct Setup {
    inst: TestInstance,
    _rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    config: PathBuf,
    comfy_port: u16,
}

impl Setup {
    fn new() -> Setup {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let inst = rt.block_on(TestInstance::start()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let comfy_port = free_port();
        let comfy = inst.comfy();
        let q = |p: &Path| format!("{:?}", p.to_str().unwrap());
        let known_hosts = inst.sshd.write_known_hosts().unwrap();
        let toml = format!(
            r#"store = "sqlite:{db}"
[[backends]]
kind = "ssh"
id = "gpu-1"
host = "127.0.0.1"
port = {ssh_port}
user = "{user}"
key_file = {key}
known_hosts = {kh}
comfyui_dir = {comfy}
comfyui_port = {comfy_port}
python = [{python}]
start_command = [{exe:?}, "sim", "comfyui", "--port", "{comfy_port}", "--time-scale", "0.05", "--custom-nodes", {nodes}]

[engine]
start_timeout_secs = 30.0
"#,
            db = dir.path().join("fleet.db").display(),
            ssh_port = inst.sshd.port(),
            user = inst.sshd.user(),
            key = q(&inst.sshd.client_key_path()),
            kh = q(&known_hosts),
            comfy = q(&comfy),
            python = q(&inst.python()),
            exe = exe(),
            nodes = q(&comfy.join("custom_nodes")),
        );
        let config = dir.path().join("fleet.toml");
        std::fs::write(&config, toml).unwrap();
        Setup {
            inst,
            _rt: rt,
            dir,
            config,
            comfy_port,
        }
    }

    fn config(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn pid_file(&self) -> PathBuf {
        self.inst.comfy().join(".comfyfleet-comfyui.pid")
    }

    /// The pid in the pid file (`PID START`: the process's start time follows it).
    fn managed_pid(&self) -> Option<String> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_owned))
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(pid) = self.managed_pid() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

fn get_json(url: &str) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::get(url).await.unwrap().json().await.unwrap()
    })
}

/// A child with its stdout read line by line on a thread.
fn spawn(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut c = std::process::Command::new(exe());
    for (k, _) in std::env::vars() {
        if k.starts_with("COMFYFLEET_") {
            c.env_remove(k);
        }
    }
    let mut child = c
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

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

/// `comfyfleet serve --config … --bind 127.0.0.1:0`; returns the child, its URL and its stdout
/// (kept open: a closed pipe would end the server at its next line).
fn serve(config: &str) -> (Child, String, mpsc::Receiver<String>) {
    let (child, rx) = spawn(&["serve", "--config", config, "--bind", "127.0.0.1:0"]);
    let first = wait_line(&rx, "the dashboard URL", |l| l.contains("dashboard at"));
    let url = first
        .rsplit(' ')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    (child, url, rx)
}

fn stop(mut child: Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait().ok();
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const GOOD_WF: &str = r#"{
  "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
  "2": {"class_type": "FleetGoodNode", "inputs": {"image": ["1", 0]}},
  "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "good"}}
}"#;

#[test]
fn install_nodes_installs_over_ssh_restarts_the_managed_comfyui_and_the_pack_runs() {
    let s = Setup::new();
    let (good, good_head) = s
        .inst
        .pack("good-pack", &["FleetGoodNode"], Some("numpy\n"))
        .unwrap();
    let (bad, _) = s
        .inst
        .pack("bad-pack", &["FleetBadNode"], Some("fail-me\n"))
        .unwrap();

    let out = bin()
        .args([
            "install-nodes",
            "--config",
            s.config(),
            "--instance",
            "gpu-1",
        ])
        .arg(format!("{good}@main"))
        .arg(&bad)
        .assert()
        .code(1)
        .get_output()
        .clone();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}\n{stderr}"))
            .to_owned()
    };
    let good_row = row("good-pack");
    assert!(
        good_row.contains("succeeded") && good_row.contains("FleetGoodNode"),
        "{good_row}"
    );
    assert!(good_row.contains(&good_head[..10]), "{good_row}");
    let bad_row = row("bad-pack");
    assert!(
        bad_row.contains("failed") && bad_row.contains("fail-me"),
        "{bad_row}"
    );
    assert!(
        stdout.contains("failed (1 of 2 packs verified, 1 failed)"),
        "{stdout}"
    );
    // Progress on stderr (not a terminal: one line per step).
    for step in [
        "good-pack: fetching",
        "good-pack: requirements",
        "good-pack: installed",
        "good-pack: ✓ succeeded",
        "bad-pack: ✗ failed",
        "restarting ComfyUI",
    ] {
        assert!(stderr.contains(step), "{step} in:\n{stderr}");
    }
    assert!(stderr.contains("Successfully installed numpy"), "{stderr}");

    // The record is in the store, with the failure per pack.
    let list = json(bin().args(["installs", "--config", s.config(), "--json"]));
    let installs = list["installs"].as_array().unwrap();
    assert_eq!(installs.len(), 1, "{list}");
    assert_eq!(installs[0]["state"], "failed");
    let id = installs[0]["id"].as_str().unwrap().to_owned();
    let one = json(bin().args(["installs", "--config", s.config(), "get", &id, "--json"]));
    assert_eq!(one["nodes"][0]["status"], "succeeded", "{one}");
    assert_eq!(one["nodes"][1]["requirements"], "failed", "{one}");
    let packs = json(bin().args([
        "installs",
        "--config",
        s.config(),
        "packs",
        "gpu-1",
        "--json",
    ]));
    assert_eq!(packs["packs"][0]["name"], "good-pack", "{packs}");

    // ComfyUI runs as the backend's managed process (setsid, pid file), restarted after the
    // install, and has the good pack's class.
    let pid = s
        .managed_pid()
        .expect("the pid file of the managed ComfyUI");
    assert!(pid_alive(&pid), "managed ComfyUI {pid} is running");
    let log = std::fs::read_to_string(s.inst.comfy().join(".comfyfleet-comfyui.log")).unwrap();
    assert!(log.contains("ComfyUI simulator listening"), "{log}");
    let info = get_json(&format!(
        "http://127.0.0.1:{}/api/object_info/FleetGoodNode",
        s.comfy_port
    ));
    assert_eq!(
        info["FleetGoodNode"]["python_module"], "custom_nodes.good-pack",
        "{info}"
    );
    // The in-process simulator of the harness was never used.
    assert_eq!(s.inst.sim.stats().restarts, 0);

    // The service on the same configuration runs a workflow that needs the new class.
    let (child, url, _stdout) = serve(s.config());
    let wf = s.dir.path().join("good.json");
    std::fs::write(&wf, GOOD_WF).unwrap();
    let out = bin()
        .args(["--server", &url, "run", "--json", wf.to_str().unwrap()])
        .assert()
        .get_output()
        .clone();
    stop(child);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs[0]["state"], "succeeded");
    assert_eq!(jobs[0]["attempts"][0]["backend"], "gpu-1");

    // Again: the pinned pack is already there — nothing fetched, no restart.
    let pid_before = s.managed_pid();
    let again = json(
        bin()
            .args([
                "install-nodes",
                "--config",
                s.config(),
                "--instance",
                "gpu-1",
                "--json",
            ])
            .arg(format!("{good}@{good_head}")),
    );
    assert_eq!(again["state"], "succeeded", "{again}");
    assert_eq!(again["nodes"][0]["already_present"], true, "{again}");
    assert_eq!(
        s.managed_pid(),
        pid_before,
        "no restart when nothing changed"
    );
}

fn json(cmd: &mut Command) -> Value {
    let out = cmd.assert().success().get_output().stdout.clone();
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
}

#[test]
fn bad_install_arguments_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fleet.db");
    let config = dir.path().join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            r#"store = "sqlite:{}"
[[backends]]
kind = "ssh"
id = "gpu-1"
host = "127.0.0.1"
port = 1
user = "nobody"
key_file = "/nonexistent/key"
known_hosts = "/nonexistent/known_hosts"
comfyui_dir = "ComfyUI"
"#,
            db.display()
        ),
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let refused = |args: &[&str], says: &[&str]| {
        let out = bin()
            .arg("install-nodes")
            .args(args)
            .assert()
            .code(2)
            .get_output()
            .clone();
        let stderr = String::from_utf8_lossy(&out.stderr);
        for s in says {
            assert!(stderr.contains(s), "{s:?} in {stderr}");
        }
    };
    refused(
        &["--config", c, "--instance", "gpu-1", "ftp://h/Pack.git"],
        &["nodes[0].git", "scheme \"ftp\"", "ftp://h/Pack.git"],
    );
    refused(
        &[
            "--config",
            c,
            "--instance",
            "gpu-1",
            "https://h/A.git",
            "https://h/B.git@a..b",
        ],
        &["nodes[1].rev", "'..'"],
    );
    refused(
        &[
            "--config",
            c,
            "--instance",
            "gpu-1",
            "https://h/A.git;rm -rf ~",
        ],
        &["nodes[0].git"],
    );
    refused(
        &["--config", c, "--instance", "gpu-9", "https://h/A.git"],
        &["unknown instance \"gpu-9\"", "gpu-1"],
    );
    refused(
        &["--config", c, "--instance", "gpu-1", "Some-Pack"],
        &["\"Some-Pack\" is not in the install registry"],
    );
    refused(
        &[
            "--config",
            c,
            "--instance",
            "gpu-1",
            "--model",
            "https://h/m.safetensors=../etc",
        ],
        &["models[0].folder"],
    );
    refused(&["--config", c, "https://h/A.git"], &["--instance"]);
    refused(
        &[
            "--config",
            c,
            "--instance",
            "gpu-1",
            "--detach",
            "https://h/A.git",
        ],
        &["--detach needs --server"],
    );
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"instance": "gpu-1", "nodes": [{"git": "https://h/A.git", "rev": "--upload-pack=x"}]}"#,
    )
    .unwrap();
    refused(
        &["--config", c, "--spec", spec.to_str().unwrap()],
        &["nodes[0].rev"],
    );
    // Nothing was stored (and nothing connected: the instance does not exist).
    let list = json(bin().args(["installs", "--config", c, "--json"]));
    assert_eq!(list["installs"], serde_json::json!([]), "{list}");
}

#[test]
fn a_killed_service_resumes_the_install_after_its_restart() {
    let s = Setup::new();
    let (slow, _) = s
        .inst
        .pack("slow-pack", &["FleetSlowNode"], Some("hang\n"))
        .unwrap();
    let (serve1, url, _out1) = serve(s.config());
    let out = bin()
        .args([
            "--server",
            &url,
            "install-nodes",
            "--instance",
            "gpu-1",
            "--detach",
        ])
        .arg(&slow)
        .assert()
        .success()
        .get_output()
        .clone();
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 36, "an install id: {id}");
    // A second install on the same instance is refused while this one runs.
    bin()
        .args([
            "--server",
            &url,
            "install-nodes",
            "--instance",
            "gpu-1",
            "--detach",
        ])
        .arg(&slow)
        .assert()
        .code(1)
        .stderr(predicates::str::contains("conflict"));

    // The service refuses an unknown instance as a usage error too.
    bin()
        .args(["--server", &url, "install-nodes", "--instance", "gpu-9"])
        .arg(&slow)
        .assert()
        .code(2)
        .stderr(predicates::str::contains("gpu-9"));

    let pid_file = s.inst.hang_pid();
    wait_for("the remote pip to start", Duration::from_secs(60), || {
        pid_file.exists()
    });
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(pid_alive(&pid));
    let running = json(bin().args(["--server", &url, "installs", "get", &id, "--json"]));
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(running["nodes"][0]["status"], "requirements", "{running}");

    // SIGKILL: no shutdown code runs. The remote command dies with its SSH connection.
    let mut serve1 = serve1;
    serve1.kill().unwrap();
    serve1.wait().unwrap();
    wait_for(
        "the orphaned remote command to die",
        Duration::from_secs(30),
        || !pid_alive(&pid),
    );

    // The pack is fixed upstream meanwhile.
    let repo = s.inst.root.path().join("repos/slow-pack");
    std::fs::write(repo.join("requirements.txt"), "numpy\n").unwrap();
    comfyfleet_testkit::instance::git(&repo, &["commit", "-qam", "no hang"]).unwrap();

    // The next start on the same database resumes it, and it ends in its true state.
    let (serve2, url, _out2) = serve(s.config());
    let done = bin()
        .args(["--server", &url, "installs", "follow", &id, "--json"])
        .assert()
        .get_output()
        .clone();
    let list = json(bin().args(["--server", &url, "installs", "--json"]));
    stop(serve2);
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    let done: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["resumed"], 1, "{done}");
    assert_eq!(done["nodes"][0]["classes"][0], "FleetSlowNode", "{done}");
    assert_eq!(list["installs"][0]["id"], id.as_str(), "{list}");
    assert_eq!(list["installs"][0]["state"], "succeeded", "{list}");
}

#[test]
fn ctrl_c_cancels_the_install_kills_the_remote_command_and_exits_two() {
    let s = Setup::new();
    let (slow, _) = s
        .inst
        .pack("slow-pack", &["FleetSlowNode"], Some("hang\n"))
        .unwrap();
    let (later, _) = s
        .inst
        .pack("later-pack", &["FleetLaterNode"], None)
        .unwrap();
    let (mut child, rx) = spawn(&[
        "install-nodes",
        "--config",
        s.config(),
        "--instance",
        "gpu-1",
        &slow,
        &later,
    ]);
    let pid_file = s.inst.hang_pid();
    wait_for("the remote pip to start", Duration::from_secs(60), || {
        pid_file.exists()
    });
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(pid_alive(&pid));
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "install-nodes did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(2), "cancelled → 2");
    wait_for(
        "the remote pip to be killed",
        Duration::from_secs(10),
        || !pid_alive(&pid),
    );
    let summary: Vec<String> = rx.iter().collect();
    let summary = summary.join("\n");
    assert!(summary.contains(": cancelled"), "{summary}");
    assert!(
        summary
            .lines()
            .any(|l| l.starts_with("later-pack") && l.contains("cancelled")),
        "{summary}"
    );
}
