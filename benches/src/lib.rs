//! Shared parts of the load harness (`src/bin/load.rs`) and the soak run (`src/bin/soak.rs`):
//! starting the real `comfyfleet serve` binary, following its live events, reading a
//! process's memory and descriptors. The criterion benches live in `benches/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comfyfleet_testkit::comfyui_sim::ComfyUiSim;
use comfyfleet_testkit::workflows;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// The `comfyfleet` binary next to this one (`target/release`).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().join("comfyfleet");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build --release -p comfyfleet-cli` (cargo xtask bench does it)",
        bin.display()
    );
    bin
}

/// One or more running `comfyfleet serve` processes on one store (a SQLite file in a temp dir
/// by default), and live terminal-event times from the first one's `/v1/events`.
#[derive(Debug)]
pub struct Service {
    pub children: Vec<Child>,
    pub urls: Vec<String>,
    /// Round-robin over `urls` for submits.
    next: std::sync::atomic::AtomicUsize,
    _dir: tempfile::TempDir,
    pub http: reqwest::Client,
    /// job id → when its terminal event reached us over `/v1/events`.
    pub ended: Arc<Mutex<HashMap<String, (Instant, Value)>>>,
    ended_wake: Arc<Notify>,
}

impl Service {
    /// One `serve` process on a fresh SQLite store.
    pub async fn start(backends: &str, engine: &str) -> Service {
        Service::start_on(None, 1, backends, engine).await
    }

    /// `processes` `serve` processes sharing `store` (a fresh SQLite file when `None`).
    pub async fn start_on(
        store: Option<&str>,
        processes: usize,
        backends: &str,
        engine: &str,
    ) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("fleet.toml");
        let store = store.map_or_else(
            || format!("sqlite:{}", dir.path().join("fleet.db").display()),
            str::to_owned,
        );
        let toml = format!("store = \"{store}\"\n{backends}\n[engine]\n{engine}\n");
        std::fs::write(&config, toml).unwrap();
        let (mut children, mut urls) = (Vec::new(), Vec::new());
        for _ in 0..processes {
            let (child, url) = spawn_serve(&config);
            children.push(child);
            urls.push(url);
        }
        let http = reqwest::Client::new();
        let ended: Arc<Mutex<HashMap<String, (Instant, Value)>>> = Arc::default();
        let ended_wake = Arc::new(Notify::new());
        let stream = http
            .get(format!("{}/v1/events", urls[0]))
            .send()
            .await
            .unwrap()
            .bytes_stream();
        let (map, wake) = (ended.clone(), ended_wake.clone());
        tokio::spawn(async move {
            sse_frames(stream, |ev| {
                let ty = ev["type"].as_str().unwrap_or("");
                if matches!(ty, "succeeded" | "failed" | "cancelled")
                    && let Some(job) = ev["job"].as_str()
                {
                    map.lock()
                        .unwrap()
                        .insert(job.to_owned(), (Instant::now(), ev.clone()));
                    wake.notify_waiters();
                }
            })
            .await;
        });
        Service {
            children,
            urls,
            next: Default::default(),
            _dir: dir,
            http,
            ended,
            ended_wake,
        }
    }

    /// The first process's base URL.
    pub fn url(&self) -> &str {
        &self.urls[0]
    }

    pub async fn submit(&self, workflow: Value) -> String {
        let at = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.urls.len();
        let r: Value = self
            .http
            .post(format!("{}/v1/jobs", self.urls[at]))
            .json(&json!({ "workflow": workflow }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["id"].as_str().unwrap_or_else(|| panic!("{r}")).to_owned()
    }

    pub async fn wait_ended(&self, id: &str) -> Instant {
        loop {
            let notified = self.ended_wake.notified();
            if let Some((t, _)) = self.ended.lock().unwrap().get(id) {
                return *t;
            }
            tokio::time::timeout(Duration::from_secs(120), notified)
                .await
                .expect("a job did not end within 2 minutes");
        }
    }

    pub async fn job(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/v1/jobs/{id}", self.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str) {
        let r = self
            .http
            .post(format!("{}{path}", self.url()))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    pub fn stop(mut self) {
        for child in &mut self.children {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// Reads an SSE byte stream to its end, calling `each` with every `data:` line's JSON.
pub async fn sse_frames<S, B, E>(mut stream: S, mut each: impl FnMut(&Value))
where
    S: futures::Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
{
    let mut buf = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(chunk.as_ref()));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            for line in frame.lines() {
                if let Some(data) = line.strip_prefix("data:")
                    && let Ok(ev) = serde_json::from_str::<Value>(data.trim())
                {
                    each(&ev);
                }
            }
        }
    }
}

pub fn spawn_serve(config: &Path) -> (Child, String) {
    // `COMFYFLEET_BENCH_LOG=FILTER`: the service's log on this process's stderr.
    let log = std::env::var("COMFYFLEET_BENCH_LOG").ok();
    let stderr = if log.is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    };
    comfyfleet_testkit::serve::spawn_serve(
        &binary(),
        config,
        log.as_deref().unwrap_or("error"),
        stderr,
    )
}

/// `[[backends]]` entries `sim-0`, `sim-1`, … for the simulators, each with `extra` lines.
pub fn comfyui_backends(sims: &[&ComfyUiSim], extra: &str) -> String {
    sims.iter()
        .enumerate()
        .map(|(i, s)| comfyui_backend(&format!("sim-{i}"), s, extra))
        .collect()
}

/// One `[[backends]]` entry for a simulator, with `extra` lines.
pub fn comfyui_backend(id: &str, sim: &ComfyUiSim, extra: &str) -> String {
    format!(
        "[[backends]]\nkind = \"comfyui\"\nid = \"{id}\"\nurl = \"{}\"\n{extra}\n",
        sim.base_url()
    )
}

/// Where the soak run's section of `BENCHMARKS.md` starts; the load harness rewrites what is
/// above it and keeps the rest.
pub const SOAK_MARKER: &str = "<!-- soak: written by `cargo xtask soak` -->";

/// Writes `BENCHMARKS.md`'s load-harness part (`head`), keeping an existing soak section.
pub fn write_benchmarks_head(path: &Path, head: &str) {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let text = match existing.find(SOAK_MARKER) {
        Some(at) => format!("{}\n{}", head.trim_end(), &existing[at..]),
        None => head.to_owned(),
    };
    std::fs::write(path, text).unwrap();
}

/// The test workflow: `seconds` of simulated work (a `TestSleep`), saved with prefix `tag`;
/// distinct tags give distinct content (nothing cached), the same structure.
pub fn wf(seconds: f64, tag: &str) -> Value {
    // Every node's inputs depend on `tag`: ComfyUI (and the simulator) cache a node whose inputs
    // did not change, so a tag only on `SaveImage` would leave the sleep cached — zero work.
    // The tag picks the empty image's colour; the structure stays the same for every tag.
    let color = tag.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    }) % 0x00ff_ffff;
    let mut w = serde_json::to_value(workflows::sleep_with_prefix(seconds, tag)).unwrap();
    w["1"]["inputs"]["color"] = json!(color);
    w
}
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Resident memory of a process, from `/proc/PID/status`: (VmRSS, VmHWM) in MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A private PostgreSQL cluster for the PostgreSQL figures (dropped = stopped).
/// Open file descriptors of a process (entries of `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

pub async fn postgres() -> comfyfleet_testkit::pg::TestPostgres {
    tokio::task::spawn_blocking(comfyfleet_testkit::pg::TestPostgres::start)
        .await
        .unwrap()
        .expect("a private PostgreSQL cluster (cargo xtask setup installs postgresql)")
}

pub fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), commit `{commit}`, release build")
}
