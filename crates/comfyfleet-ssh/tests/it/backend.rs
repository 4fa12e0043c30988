//! `SshBackend`: ComfyUI reached only through the SSH port forward.

use std::sync::Arc;

use comfyfleet_core::{Backend, JobSpec, JobState, MemoryStore, Workflow};
use comfyfleet_engine::{Engine, EngineConfig, SmartFailover, SmartFailoverConfig};
use comfyfleet_ssh::SshSession;
use comfyfleet_ssh::backend::{SshBackend, SshBackendConfig};
use comfyfleet_ssh::installer::InstanceConfig;
use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, SimConfig};
use comfyfleet_testkit::{BackendFixtures, backend_conformance, workflows};
use serde_json::json;

use super::*;

const SCALE: f64 = 0.05;

async fn setup() -> (TestSshd, ComfyUiSim, SshSession, SshBackend) {
    let sshd = TestSshd::start().await.unwrap();
    let sim = ComfyUiSim::start(SimConfig::scaled(SCALE)).await.unwrap();
    let kh = sshd.write_known_hosts().unwrap();
    let session = SshSession::new(target(&sshd, kh));
    let mut instance = InstanceConfig::new("gpu-ssh", "/nonexistent/ComfyUI");
    // the simulator plays the instance's ComfyUI on the instance's loopback; the backend is
    // only ever told this port, never the simulator's address
    instance.comfyui_port = sim.addr().port();
    let mut config = SshBackendConfig::new(instance);
    config.comfyui.http_timeout = Duration::from_secs(3);
    let backend = SshBackend::connect(config, session.clone()).await.unwrap();
    assert_ne!(backend.local_addr(), sim.addr());
    (sshd, sim, session, backend)
}

fn bad_width() -> Workflow {
    Workflow::from_value(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bad"}}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssh_backend_passes_the_backend_conformance_suite() {
    let (_sshd, _sim, _session, backend) = setup().await;
    assert_eq!(backend.kind(), "ssh");
    let fixtures = BackendFixtures {
        invalid: Some(bad_width()),
        timeout: Duration::from_secs(20),
        ..BackendFixtures::standard()
    };
    backend_conformance(&backend, &fixtures).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_the_tunnel_being_cut_mid_run() {
    let (sshd, sim, session, backend) = setup().await;
    let backend = Arc::new(backend);
    let engine = Engine::builder(
        Arc::new(MemoryStore::new()),
        Arc::new(SmartFailover::new(SmartFailoverConfig {
            jitter: false,
            seed: Some(3),
            ..Default::default()
        })),
    )
    .backends([backend.clone() as Arc<dyn Backend>])
    .config(EngineConfig {
        start_timeout: Duration::from_secs(5),
        node_timeout: Duration::from_secs(20),
        heartbeat_interval: Duration::from_millis(500),
        ..EngineConfig::default()
    })
    .build()
    .unwrap();
    engine.start();
    // 60 s of work at scale 0.05: 3 s
    let id = engine
        .submit(JobSpec::new(workflows::sleep(60.0)))
        .await
        .unwrap();
    for _ in 0..200 {
        let job = engine.get(id).await.unwrap().unwrap();
        if job.state == JobState::Running
            && job
                .progress
                .as_ref()
                .is_some_and(|p| p.current_class.as_deref() == Some("TestSleep"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(sim.stats().prompts_accepted, 1);
    let before = session.reconnects();
    assert!(
        sshd.cut_connections().await.unwrap() > 0,
        "connections were cut"
    );
    let job = tokio::time::timeout(Duration::from_secs(60), engine.wait_for(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(
        job.attempts.len(),
        1,
        "the same execution finished: {:?}",
        job.attempts
    );
    assert!(
        session.reconnects() > before,
        "a new SSH connection carried the rest"
    );
    assert_eq!(sim.stats().prompts_accepted, 1, "nothing was resubmitted");
    assert!(!job.artifacts.is_empty());
    // the artifact streams through the new tunnel
    let bytes = engine.fetch_artifact(&job.artifacts[0]).await;
    assert!(bytes.is_ok(), "artifact fetch failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_an_unreachable_instance() {
    let (sshd, _sim, _session, backend) = setup().await;
    assert!(backend.health().await.healthy);
    sshd.cut_connections().await.unwrap();
    drop(sshd);
    let h = backend.health().await;
    assert!(!h.healthy, "{h:?}");
}

/// Answers every GET with `200 {}`: enough for the backend's "is ComfyUI up" check.
const TINY_SERVER: &str = r#"import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycled_pid_is_neither_taken_for_comfyui_nor_killed() {
    use std::os::unix::process::CommandExt;
    let sshd = TestSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.py"), TINY_SERVER).unwrap();
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let python = String::from_utf8(python.stdout).unwrap().trim().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut instance = InstanceConfig::new("gpu-managed", dir.path().to_string_lossy());
    instance.comfyui_port = port;
    let mut config = SshBackendConfig::new(instance);
    config.start_command = Some(vec![python, "server.py".into(), port.to_string()]);
    config.start_timeout = Duration::from_secs(10);
    let kh = sshd.write_known_hosts().unwrap();
    let backend = SshBackend::connect(config, SshSession::new(target(&sshd, kh)))
        .await
        .unwrap();
    let pid_file = dir.path().join(".comfyfleet-comfyui.pid");
    let recorded = std::fs::read_to_string(&pid_file).unwrap();
    let old_start = recorded.split_whitespace().nth(1).unwrap_or("1").to_owned();

    // ComfyUI is gone (the instance rebooted, say) and its pid now names another process — a
    // process-group leader, like most daemons.
    backend.stop_comfyui().await.unwrap();
    let mut decoy = std::process::Command::new("sleep")
        .arg("600")
        .process_group(0)
        .spawn()
        .unwrap();
    // A pid file without a start time (or from before the reboot) is not taken on trust.
    std::fs::write(&pid_file, format!("{}\n", decoy.id())).unwrap();
    backend
        .ensure_started()
        .await
        .expect("ComfyUI was started again");
    let started = std::fs::read_to_string(&pid_file).unwrap();
    std::fs::write(&pid_file, format!("{} {old_start}\n", decoy.id())).unwrap();
    // (the restart's own start finds the port taken by the ComfyUI started above: that one
    // answers)
    backend.restart().await.unwrap();
    assert!(
        decoy.try_wait().unwrap().is_none(),
        "an unrelated process was killed"
    );
    backend.stop_comfyui().await.unwrap();
    std::fs::write(&pid_file, started).unwrap();
    backend.stop_comfyui().await.unwrap();
    let _ = decoy.kill();
    let _ = decoy.wait();
}
