//! The end-to-end load harness: drives the real `comfyfleet serve` binary over its HTTP API
//! against ComfyUI simulators hosted here, measures what a user sees, and writes the table to
//! `BENCHMARKS.md` (with the machine and the commit). Each figure has a **baseline** measured
//! in the same run: the naive client the seeds' systems were (fixed-interval polling of
//! `/history`, no start timeout), a few lines below (`naive_*`).
//!
//! Run: `cargo xtask bench` (builds the release binary first). Targets are reported as met or
//! not met; nothing here asserts them.
//!
//! Measured so far: completion-detection latency (healthy and silent WebSocket), failover time
//! from a backend that accepts and hangs, the backend's idle gap between queued jobs with
//! prefetch 0 and 1, the warm-routing hit rate with mixed workflow structures, end-to-end
//! jobs/s with four zero-time simulators on SQLite. (Still to come — see BENCHMARKS.md:
//! PostgreSQL 1 vs 3 processes through the API, RSS with 100k jobs and 1,000 subscribers.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, SimConfig};
use comfyfleet_testkit::workflows;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// The `comfyfleet` binary next to this one (`target/release`).
fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().join("comfyfleet");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build --release -p comfyfleet-cli` (cargo xtask bench does it)",
        bin.display()
    );
    bin
}

/// A running `comfyfleet serve` with its own SQLite store, and live terminal-event times.
struct Service {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
    /// job id → when its terminal event reached us over `/v1/events`.
    ended: Arc<Mutex<HashMap<String, (Instant, Value)>>>,
    ended_wake: Arc<Notify>,
}

impl Service {
    async fn start(backends: &str, engine: &str) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("fleet.toml");
        let toml = format!(
            "store = \"sqlite:{}\"\n{backends}\n[engine]\n{engine}\n",
            dir.path().join("fleet.db").display()
        );
        std::fs::write(&config, toml).unwrap();
        let (child, url) = spawn_serve(&config);
        let http = reqwest::Client::new();
        let ended: Arc<Mutex<HashMap<String, (Instant, Value)>>> = Arc::default();
        let ended_wake = Arc::new(Notify::new());
        let mut stream = http
            .get(format!("{url}/v1/events"))
            .send()
            .await
            .unwrap()
            .bytes_stream();
        let (map, wake) = (ended.clone(), ended_wake.clone());
        tokio::spawn(async move {
            let mut buf = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                let now = Instant::now();
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let frame: String = buf.drain(..end + 2).collect();
                    for line in frame.lines() {
                        let Some(data) = line.strip_prefix("data:") else {
                            continue;
                        };
                        let Ok(ev) = serde_json::from_str::<Value>(data.trim()) else {
                            continue;
                        };
                        let ty = ev["type"].as_str().unwrap_or("");
                        if matches!(ty, "succeeded" | "failed" | "cancelled")
                            && let Some(job) = ev["job"].as_str()
                        {
                            map.lock()
                                .unwrap()
                                .insert(job.to_owned(), (now, ev.clone()));
                            wake.notify_waiters();
                        }
                    }
                }
            }
        });
        Service {
            child,
            url,
            _dir: dir,
            http,
            ended,
            ended_wake,
        }
    }

    async fn submit(&self, workflow: Value) -> String {
        let r: Value = self
            .http
            .post(format!("{}/v1/jobs", self.url))
            .json(&json!({ "workflow": workflow }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["id"].as_str().unwrap_or_else(|| panic!("{r}")).to_owned()
    }

    async fn wait_ended(&self, id: &str) -> Instant {
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

    async fn job(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/v1/jobs/{id}", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn post(&self, path: &str) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    fn stop(mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn spawn_serve(config: &Path) -> (Child, String) {
    let mut child = Command::new(binary())
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
        ])
        .env("COMFYFLEET_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let url = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("dashboard at") => {
                break Some(
                    line.rsplit(' ')
                        .next()
                        .unwrap()
                        .trim_end_matches('/')
                        .to_owned(),
                );
            }
            Ok(_) => {}
            Err(_) => break None,
        }
    };
    match url {
        Some(url) => (child, url),
        None => {
            child.kill().ok();
            child.wait().ok();
            panic!("comfyfleet serve did not print its URL");
        }
    }
}

fn comfyui_backends(sims: &[&ComfyUiSim], extra: &str) -> String {
    sims.iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "[[backends]]\nkind = \"comfyui\"\nid = \"sim-{i}\"\nurl = \"{}\"\n{extra}\n",
                s.base_url()
            )
        })
        .collect()
}

fn wf(seconds: f64, tag: &str) -> Value {
    serde_json::to_value(workflows::sleep_with_prefix(seconds, tag)).unwrap()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Completion-detection latency through the service: the simulator writes the prompt's
/// history (its end) → the job's terminal event reaches a `/v1/events` client.
async fn detection(silent: bool, n: usize) -> Vec<f64> {
    let sim = ComfyUiSim::start(SimConfig::scaled(0.01)).await.unwrap();
    sim.faults().set_silent_websocket(silent);
    let svc = Service::start(&comfyui_backends(&[&sim], ""), "").await;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // 2 simulated seconds = 20 ms of work; a unique prefix defeats ComfyUI's cache.
        let id = svc.submit(wf(2.0, &format!("det_{silent}_{i}"))).await;
        let seen = svc.wait_ended(&id).await;
        let job = svc.job(&id).await;
        let remote = job["attempts"][0]["remote"].as_str().unwrap().to_owned();
        let done = sim.finished_at(&remote).expect("the simulator ran it");
        out.push(ms(seen.saturating_duration_since(done)));
    }
    svc.stop();
    out.sort_by(f64::total_cmp);
    out
}

/// The naive client of the seeds, one prompt: POST /prompt, then GET /history/{id} every
/// `every` until it is there. Returns the prompt id and when the client saw it done.
async fn naive_run(
    http: &reqwest::Client,
    base: &str,
    prompt: Value,
    every: Duration,
) -> (String, Instant) {
    let r: Value = http
        .post(format!("{base}/prompt"))
        .json(&json!({ "prompt": prompt, "client_id": "naive" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pid = r["prompt_id"].as_str().unwrap().to_owned();
    loop {
        tokio::time::sleep(every).await;
        let h: Value = http
            .get(format!("{base}/history/{pid}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h.get(&pid).is_some() {
            return (pid, Instant::now());
        }
    }
}

/// The naive client of the seeds: POST /prompt, then GET /history/{id} every `every`.
async fn naive_detection(every: Duration, n: usize) -> Vec<f64> {
    let sim = ComfyUiSim::start(SimConfig::scaled(0.01)).await.unwrap();
    let http = reqwest::Client::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (pid, seen) = naive_run(
            &http,
            &sim.base_url(),
            wf(2.0, &format!("naive_{i}")),
            every,
        )
        .await;
        let done = sim.finished_at(&pid).unwrap();
        out.push(ms(seen.saturating_duration_since(done)));
    }
    out.sort_by(f64::total_cmp);
    out
}

/// Failover: the only active backend accepts the prompt and never starts it (a stuck GPU:
/// interrupts do nothing); once it is accepted a healthy backend is enabled. Time from
/// `accepted` (attempt 1) to `started` (attempt 2), from the stored events, with a start timeout
/// of `start_timeout` seconds. A fresh fleet per run: the stuck backend stays stuck.
async fn failover(start_timeout: f64, n: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..n {
        let hang = ComfyUiSim::start(SimConfig::scaled(0.01)).await.unwrap();
        hang.faults().set_hang_after_accept(true);
        let good = ComfyUiSim::start(SimConfig::scaled(0.01)).await.unwrap();
        let svc = Service::start(
            &comfyui_backends(&[&hang, &good], ""),
            &format!("start_timeout_secs = {start_timeout}"),
        )
        .await;
        svc.post("/v1/backends/sim-1/drain").await;
        let id = svc.submit(wf(1.0, &format!("fail_{i}"))).await;
        // Wait for the stuck backend to accept it, then let the healthy one take work.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = svc.job(&id).await;
            if job["attempts"][0]["remote"].is_string() {
                break;
            }
            assert!(Instant::now() < deadline, "never accepted: {job}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        svc.post("/v1/backends/sim-1/enable").await;
        svc.wait_ended(&id).await;
        let events: Value = svc
            .http
            .get(format!("{}/v1/jobs/{id}/events", svc.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let list = events["events"]
            .as_array()
            .or(events.as_array())
            .unwrap()
            .clone();
        let at = |ty: &str, attempt: u64| {
            list.iter()
                .find(|e| e["type"] == ty && e["attempt"].as_u64() == Some(attempt))
                .and_then(|e| e["at"].as_i64())
        };
        let (Some(accepted), Some(started)) = (at("accepted", 1), at("started", 2)) else {
            panic!("events of a failover: {events}");
        };
        out.push((started - accepted) as f64);
        svc.stop();
        hang.faults().set_hang_after_accept(false);
    }
    out.sort_by(f64::total_cmp);
    out
}

/// The backend's idle gap between queued jobs: `n` jobs of 20 ms of work submitted at once to
/// a service with one simulator and `prefetch` extra prompts kept queued there; the gaps
/// between one prompt's end and the next one's start on the simulator.
async fn idle_gap(prefetch: u32, n: usize) -> Vec<f64> {
    let sim = ComfyUiSim::start(SimConfig::scaled(0.01)).await.unwrap();
    let svc = Service::start(
        &comfyui_backends(&[&sim], &format!("prefetch = {prefetch}")),
        "",
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(svc.submit(wf(2.0, &format!("gap_{prefetch}_{i}"))).await);
    }
    let mut spans = Vec::new();
    for id in &ids {
        svc.wait_ended(id).await;
        let job = svc.job(id).await;
        let remote = job["attempts"][0]["remote"].as_str().unwrap().to_owned();
        spans.push((
            sim.started_at(&remote).unwrap(),
            sim.finished_at(&remote).unwrap(),
        ));
    }
    svc.stop();
    spans.sort();
    let mut gaps: Vec<f64> = spans
        .windows(2)
        .map(|w| ms(w[1].0.saturating_duration_since(w[0].1)))
        .collect();
    gaps.sort_by(f64::total_cmp);
    gaps
}

/// The naive client's idle gap: it submits the next prompt once polling found the last done.
async fn naive_idle_gap(every: Duration, n: usize) -> Vec<f64> {
    let sim = ComfyUiSim::start(SimConfig::scaled(0.01)).await.unwrap();
    let http = reqwest::Client::new();
    let mut spans = Vec::new();
    for i in 0..n {
        let (pid, _) =
            naive_run(&http, &sim.base_url(), wf(2.0, &format!("ngap_{i}")), every).await;
        spans.push((
            sim.started_at(&pid).unwrap(),
            sim.finished_at(&pid).unwrap(),
        ));
    }
    let mut gaps: Vec<f64> = spans
        .windows(2)
        .map(|w| ms(w[1].0.saturating_duration_since(w[0].1)))
        .collect();
    gaps.sort_by(f64::total_cmp);
    gaps
}

/// Three workflow structures (a unique prefix per job defeats ComfyUI's cache, not the
/// structure hash).
fn mixed(kind: usize, tag: &str) -> Value {
    match kind {
        0 => wf(0.5, tag),
        1 => json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": tag}}
        }),
        _ => json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": tag}}
        }),
    }
}

/// Share of jobs that ran on a backend whose previous job had the same structure.
fn hit_rate(runs: &mut [(String, u64, usize)]) -> f64 {
    runs.sort();
    let (mut hits, mut counted) = (0usize, 0usize);
    for w in runs.windows(2) {
        if w[0].0 == w[1].0 {
            counted += 1;
            if w[0].2 == w[1].2 {
                hits += 1;
            }
        }
    }
    hits as f64 / counted.max(1) as f64
}

/// Warm routing: `n` jobs of three structures in a seeded random order, from 4 concurrent
/// clients, over 4 simulators. Returns comfyfleet's hit rate and the naive client's (it sends
/// the same sequence round-robin).
async fn warm_routing(n: usize) -> (f64, f64) {
    let mut sims = Vec::new();
    for _ in 0..4 {
        sims.push(ComfyUiSim::start(SimConfig::scaled(0.01)).await.unwrap());
    }
    let refs: Vec<&ComfyUiSim> = sims.iter().collect();
    let svc = Arc::new(Service::start(&comfyui_backends(&refs, ""), "").await);
    let mut rng = fastrand::Rng::with_seed(42);
    let kinds: Vec<usize> = (0..n).map(|_| rng.usize(0..3)).collect();
    let mut tasks = Vec::new();
    for c in 0..4 {
        let svc = svc.clone();
        let kinds = kinds.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in (c..kinds.len()).step_by(4) {
                let id = svc.submit(mixed(kinds[i], &format!("warm_{i}"))).await;
                svc.wait_ended(&id).await;
                out.push((id, kinds[i]));
            }
            out
        }));
    }
    let mut runs = Vec::new();
    for t in tasks {
        for (id, kind) in t.await.unwrap() {
            let job = svc.job(&id).await;
            let a = &job["attempts"][0];
            runs.push((
                a["backend"].as_str().unwrap().to_owned(),
                a["dispatched_at"].as_u64().unwrap(),
                kind,
            ));
        }
    }
    if let Ok(svc) = Arc::try_unwrap(svc) {
        svc.stop();
    }
    let ours = hit_rate(&mut runs);
    let mut naive: Vec<(String, u64, usize)> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("sim-{}", i % 4), i as u64, *k))
        .collect();
    (ours, hit_rate(&mut naive))
}

/// End-to-end jobs/s: `n` zero-work jobs submitted by 8 concurrent clients to a service with
/// four zero-time simulators, until the last one ended.
async fn throughput(n: usize) -> f64 {
    let mut sims = Vec::new();
    for _ in 0..4 {
        sims.push(ComfyUiSim::start(SimConfig::scaled(0.0)).await.unwrap());
    }
    let refs: Vec<&ComfyUiSim> = sims.iter().collect();
    let svc = Arc::new(Service::start(&comfyui_backends(&refs, "prefetch = 1"), "").await);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..8 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (c..n).step_by(8) {
                ids.push(svc.submit(wf(0.0, &format!("tp_{i}"))).await);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let mut last = started;
    for id in &ids {
        last = last.max(svc.wait_ended(id).await);
    }
    let rate = n as f64 / last.duration_since(started).as_secs_f64();
    if let Ok(svc) = Arc::try_unwrap(svc) {
        svc.stop();
    }
    rate
}

/// The naive client's throughput on the same simulators: one job at a time per simulator,
/// `/history` polled every `every`.
async fn naive_throughput(every: Duration, n: usize) -> f64 {
    let mut sims = Vec::new();
    for _ in 0..4 {
        sims.push(ComfyUiSim::start(SimConfig::scaled(0.0)).await.unwrap());
    }
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (k, sim) in sims.iter().enumerate() {
        let base = sim.base_url();
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            for i in (k..n).step_by(4) {
                naive_run(&http, &base, wf(0.0, &format!("ntp_{i}")), every).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

fn machine() -> String {
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

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only NAME`: one part (detection, failover, throughput), printed, nothing written.
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    if let Some(part) = only {
        rt.block_on(async {
            match part.as_str() {
                "detection" => println!("{:?}", detection(false, 20).await),
                "silent" => println!("{:?}", detection(true, 20).await),
                "failover" => println!("{:?}", failover(1.0, 3).await),
                "throughput" => println!("{:.0} jobs/s", throughput(500).await),
                "warm" => println!("{:?}", warm_routing(120).await),
                "gap" => {
                    println!("prefetch 0: {:?}", idle_gap(0, 30).await);
                    println!("prefetch 1: {:?}", idle_gap(1, 30).await);
                }
                other => panic!("unknown part {other}"),
            }
        });
        return;
    }
    let (n_det, n_fail, n_tp) = if quick { (20, 3, 300) } else { (200, 10, 2000) };
    let out_path = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .unwrap_or_else(|| "BENCHMARKS.md".into());
    rt.block_on(async {
        eprintln!("load: completion detection, healthy socket ({n_det} jobs)");
        let healthy = detection(false, n_det).await;
        eprintln!("load: completion detection, silent socket");
        let silent = detection(true, n_det).await;
        eprintln!("load: naive client, 500 ms polling");
        let naive_500 = naive_detection(Duration::from_millis(500), n_det.min(40)).await;
        eprintln!("load: failover ({n_fail} jobs)");
        let fail = failover(1.0, n_fail).await;
        let n_gap = if quick { 30 } else { 200 };
        eprintln!("load: idle gap, prefetch 0 and 1 ({n_gap} jobs)");
        let gap0 = idle_gap(0, n_gap).await;
        let gap1 = idle_gap(1, n_gap).await;
        let naive_gap = naive_idle_gap(Duration::from_millis(500), 20).await;
        let n_warm = if quick { 120 } else { 400 };
        eprintln!("load: warm routing ({n_warm} jobs, 3 structures)");
        let (warm, naive_warm) = warm_routing(n_warm).await;
        eprintln!("load: throughput ({n_tp} jobs)");
        let tp = throughput(n_tp).await;
        let naive_tp = naive_throughput(Duration::from_millis(500), 80).await;

        let mut md = String::new();
        md.push_str("# comfyfleet benchmarks\n\n");
        md.push_str(&format!(
            "Measured by the load harness (`cargo xtask bench`, `benches/src/bin/load.rs`) on {}. \
             Every figure drives the real `comfyfleet serve` binary over its HTTP API against \
             ComfyUI simulators in the harness process; the **baseline** is the naive client the \
             seeds started from (fixed-interval `/history` polling, no start timeout), measured in \
             the same run on the same simulators. Targets are reported, never asserted.\n\n",
            machine()
        ));
        md.push_str("| figure | comfyfleet | baseline (naive client) | ratio | target | |\n|---|---:|---:|---:|---|---|\n");
        let (h50, h99) = (pct(&healthy, 0.5), pct(&healthy, 0.99));
        let (s50, s99) = (pct(&silent, 0.5), pct(&silent, 0.99));
        let (n50, n99) = (pct(&naive_500, 0.5), pct(&naive_500, 0.99));
        md.push_str(&format!(
            "| completion detection, healthy WebSocket, p50 / p99 | {h50:.1} / {h99:.1} ms | {n50:.0} / {n99:.0} ms (500 ms polling) | {:.0}× at p99 | p99 ≤ 25 ms | {} |\n",
            n99 / h99.max(0.001),
            met(h99 <= 25.0)
        ));
        md.push_str(&format!(
            "| completion detection, silent WebSocket, p50 / p99 | {s50:.1} / {s99:.1} ms | {n50:.0} / {n99:.0} ms (500 ms polling; the seeds' cloud client: 5 s) | {:.1}× at p99 | p99 ≤ 600 ms | {} |\n",
            n99 / s99.max(0.001),
            met(s99 <= 600.0)
        ));
        let (f50, fmax) = (pct(&fail, 0.5), pct(&fail, 1.0));
        md.push_str(&format!(
            "| failover from a backend that accepts and hangs (start timeout 1 s), median / max | {f50:.0} / {fmax:.0} ms | never (no start timeout: the seeds' 66-hour stuck task) | — | ≤ start timeout + 100 ms = 1,100 ms | {} |\n",
            met(fmax <= 1100.0)
        ));
        let (g0_50, g0_99) = (pct(&gap0, 0.5), pct(&gap0, 0.99));
        let (g1_50, g1_99) = (pct(&gap1, 0.5), pct(&gap1, 0.99));
        let (ng50, ng99) = (pct(&naive_gap, 0.5), pct(&naive_gap, 0.99));
        md.push_str(&format!(
            "| backend idle gap between queued jobs, prefetch 0, p50 / p99 | {g0_50:.1} / {g0_99:.1} ms | {ng50:.0} / {ng99:.0} ms (next prompt after 500 ms polling) | {:.0}× at p99 | — | |\n",
            ng99 / g0_99.max(0.001)
        ));
        md.push_str(&format!(
            "| backend idle gap between queued jobs, prefetch 1, p50 / p99 | {g1_50:.2} / {g1_99:.2} ms | {ng50:.0} / {ng99:.0} ms | {:.0}× at p99 | p99 ≤ 5 ms | {} |\n",
            ng99 / g1_99.max(0.001),
            met(g1_99 <= 5.0)
        ));
        md.push_str(&format!(
            "| warm-routing hit rate: the backend's previous job had the same structure (3 structures, 4 backends, {n_warm} jobs) | {:.0} % | {:.0} % (round-robin) | {:.1}× | — | |\n",
            warm * 100.0,
            naive_warm * 100.0,
            warm / naive_warm.max(0.001)
        ));
        md.push_str(&format!(
            "| end-to-end jobs/s, 4 zero-time simulators, SQLite, {n_tp} jobs | {tp:.0} jobs/s | {naive_tp:.1} jobs/s (one job per simulator at a time, 500 ms polling) | {:.0}× | ≥ 1,000 jobs/s on 2 cores | {} |\n",
            tp / naive_tp.max(0.001),
            met(tp >= 1000.0)
        ));
        md.push_str(
            "\nReading the figures: everything — the service, the simulators and the clients — \
             runs on the same 2 cores, so these are upper bounds on overhead. The idle gap is \
             measured on the simulator (one prompt's history written → the next prompt taken up) \
             and includes the simulator's own bookkeeping between prompts; with prefetch the next \
             prompt is already queued there, so what remains is mostly that. Jobs/s goes through \
             the HTTP API (each submit a request and a SQLite transaction) with the live-event \
             stream open; the engine alone on the same simulators does more (`comfyui` criterion \
             bench). The targets not met are open work of issue #10.\n",
        );
        md.push_str(
            "\nNot yet measured by this harness (next steps of issue #10): jobs/s with 12 simulators on PostgreSQL with 1 vs 3 \
             `serve` processes (the `postgres_scale` bench measures it with `worker` processes, see \
             `benches/README.md`); service RSS \
             with 100k stored jobs and 1,000 live SSE subscribers.\n\n\
             Reproduce: `cargo xtask bench` (writes this file); `cargo xtask bench --quick` for a \
             short run. Per-part criterion benches: `cargo xtask bench criterion`.\n",
        );
        std::fs::write(&out_path, &md).unwrap();
        println!("{md}");
    });
}
