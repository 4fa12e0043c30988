//! Scale-out on PostgreSQL: three real `comfyfleet worker` processes share one database (a
//! private cluster started by the test) and twelve simulated backends of capacity 1. Mid-run one
//! worker is killed with SIGKILL and PostgreSQL is restarted. Afterwards, from the store: every
//! job ended exactly once, no attempt completed twice, no backend ever had two executions at
//! once (replayed from the event log, whose ids follow commit order), and the maintenance
//! leadership (from the workers' logs) never overlapped.
//!
//! `COMFYFLEET_SCALE_JOBS` (default 2000) sets the batch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comfyfleet::core::{
    AttemptOutcome, Clock, EventKind, EventQuery, JobFilter, NewJob, SystemClock,
};
use comfyfleet::{JobId, JobSpec, JobState, TaskStore};
use comfyfleet_testkit::{TestPostgres, workflows};

const BACKENDS: usize = 12;

fn jobs_wanted() -> usize {
    std::env::var("COMFYFLEET_SCALE_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

struct Worker {
    child: Child,
    log: PathBuf,
}

fn spawn_worker(config: &Path, log: PathBuf) -> Worker {
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(assert_cmd::cargo::cargo_bin("comfyfleet"))
        .args(["worker", "--config", config.to_str().unwrap()])
        .env("COMFYFLEET_LOG", "warn,comfyfleet_engine::engine=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    Worker { child, log }
}

async fn open_jobs(store: &dyn TaskStore) -> u64 {
    let c = store.counts().await.unwrap();
    c.total() - c.get(JobState::Succeeded) - c.get(JobState::Failed) - c.get(JobState::Cancelled)
}

async fn wait_until_open_at_most(store: &dyn TaskStore, open: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        // The store may be restarting: a failed read is retried.
        if let Ok(c) = store.counts().await {
            let left = c.total()
                - c.get(JobState::Succeeded)
                - c.get(JobState::Failed)
                - c.get(JobState::Cancelled);
            if left <= open {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {left} jobs still open: {c:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `(time, owner, leading)` from a worker's log lines "maintenance leader: this engine" /
/// "… another engine" (tracing's RFC 3339 UTC timestamps sort as text).
fn leadership(log: &Path) -> Vec<(String, bool)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let leading = if l.contains("maintenance leader: this engine") {
                true
            } else if l.contains("maintenance leader: another engine") {
                false
            } else {
                return None;
            };
            let at = l.split_whitespace().next()?.to_owned();
            Some((at, leading))
        })
        .collect()
}

fn now_rfc3339_ish() -> String {
    // The same format tracing prints (UTC, microseconds), for the kill time.
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_one_postgres_share_the_fleet_through_a_kill_and_a_database_restart() {
    let n_jobs = jobs_wanted();
    let pg = Arc::new(
        tokio::task::spawn_blocking(TestPostgres::start)
            .await
            .unwrap()
            .expect("a private PostgreSQL cluster (cargo xtask setup installs postgresql)"),
    );
    let url = pg.url();
    let dir = tempfile::tempdir().unwrap();
    let mut toml = format!("store = \"{url}\"\n");
    for i in 1..=BACKENDS {
        toml.push_str(&format!(
            "[[backends]]\nkind = \"simulated\"\nid = \"gpu-{i}\"\ncapacity = 1\n"
        ));
    }
    toml.push_str(
        "[engine]\nlease_ttl_secs = 10.0\nheartbeat_secs = 2.0\nmaintenance_secs = 1.0\n",
    );
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, toml).unwrap();

    let store = comfyfleet::open_store(&url).await.unwrap();
    let now = SystemClock.now();
    let mut ids = Vec::with_capacity(n_jobs);
    for _ in 0..n_jobs {
        let e = store
            .enqueue(NewJob::new(JobSpec::new(workflows::invert())), now)
            .await
            .unwrap();
        ids.push(e.id);
    }

    let started = Instant::now();
    let mut workers: Vec<Worker> = (0..3)
        .map(|i| spawn_worker(&config, dir.path().join(format!("worker-{i}.log"))))
        .collect();

    // A third of the way: SIGKILL the first worker.
    let total = n_jobs as u64;
    wait_until_open_at_most(store.as_ref(), total * 2 / 3, "before the kill").await;
    workers[0].child.kill().unwrap();
    workers[0].child.wait().unwrap();
    let killed_at = now_rfc3339_ish();
    // Two thirds of the way: restart PostgreSQL under the two others.
    wait_until_open_at_most(store.as_ref(), total / 3, "before the restart").await;
    let restart_pg = pg.clone();
    tokio::task::spawn_blocking(move || restart_pg.restart())
        .await
        .unwrap()
        .unwrap();
    wait_until_open_at_most(store.as_ref(), 0, "after the restart").await;
    let elapsed = started.elapsed();
    for w in workers.iter_mut().skip(1) {
        w.child.kill().unwrap();
        w.child.wait().unwrap();
    }
    let ended_at = now_rfc3339_ish();
    assert_eq!(open_jobs(store.as_ref()).await, 0);

    // Every job ended exactly once, successfully, and no attempt completed twice.
    let mut attempts = 0usize;
    let mut requeued_jobs = 0usize;
    for id in &ids {
        let job = store.get(*id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Succeeded, "job {id}: {:?}", job.error);
        let completed = job
            .attempts
            .iter()
            .filter(|a| a.outcome == Some(AttemptOutcome::Succeeded))
            .count();
        assert_eq!(completed, 1, "job {id} completed {completed} times");
        attempts += job.attempts.len();
        if job.crash_requeues > 0 {
            requeued_jobs += 1;
        }
    }
    assert_eq!(
        store
            .list(&JobFilter {
                limit: 1,
                ..JobFilter::default()
            })
            .await
            .unwrap()
            .jobs
            .len(),
        1
    );

    // Replay the whole event log in id (= commit) order.
    let mut terminals: HashMap<JobId, usize> = HashMap::new();
    let mut open_on: HashMap<JobId, String> = HashMap::new();
    let mut running: BTreeMap<String, i64> = BTreeMap::new();
    let mut worst = 0i64;
    let mut after = None;
    let mut last_id = 0u64;
    loop {
        let page = store
            .events(&EventQuery {
                job: None,
                after,
                limit: 1000,
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for e in &page {
            assert!(e.id > last_id, "event ids in order");
            last_id = e.id;
            match &e.kind {
                EventKind::Dispatched { backend, .. } | EventKind::Reattached { backend, .. } => {
                    assert!(
                        open_on.insert(e.job, backend.to_string()).is_none(),
                        "job {} had two open attempts",
                        e.job
                    );
                    let n = running.entry(backend.to_string()).or_insert(0);
                    *n += 1;
                    worst = worst.max(*n);
                }
                EventKind::AttemptFailed { .. }
                | EventKind::Requeued { .. }
                | EventKind::Succeeded { .. }
                | EventKind::Failed { .. }
                | EventKind::Cancelled { .. } => {
                    if let Some(b) = open_on.remove(&e.job) {
                        *running.get_mut(&b).unwrap() -= 1;
                    }
                }
                _ => {}
            }
            if e.kind.terminal_state().is_some() {
                *terminals.entry(e.job).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(terminals.len(), n_jobs, "every job has its terminal event");
    assert!(
        terminals.values().all(|&n| n == 1),
        "a job ended more than once"
    );
    assert!(open_on.is_empty(), "attempts left open: {open_on:?}");
    assert_eq!(
        worst, 1,
        "a backend of capacity 1 had {worst} executions at once"
    );

    // Maintenance leadership: intervals per worker never overlap.
    let mut spans: Vec<(String, String, usize)> = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        let end_of_life = if i == 0 { &killed_at } else { &ended_at };
        let mut since: Option<String> = None;
        for (at, leading) in leadership(&w.log) {
            match (leading, &since) {
                (true, None) => since = Some(at),
                (false, Some(s)) => {
                    spans.push((s.clone(), at, i));
                    since = None;
                }
                _ => {}
            }
        }
        if let Some(s) = since {
            spans.push((s, end_of_life.clone(), i));
        }
    }
    assert!(!spans.is_empty(), "some worker led the maintenance");
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "maintenance leaders overlapped: worker {} {}..{} and worker {} {}..{}",
            pair[0].2,
            pair[0].0,
            pair[0].1,
            pair[1].2,
            pair[1].0,
            pair[1].1
        );
    }
    let per_worker: Vec<usize> = (0..3)
        .map(|i| spans.iter().filter(|s| s.2 == i).count())
        .collect();
    println!(
        "scale test: {n_jobs} jobs, 3 workers, {BACKENDS} backends in {:.1}s ({:.0} jobs/s including a SIGKILL and a PostgreSQL restart); \
         {attempts} attempts, {requeued_jobs} jobs requeued after the kill, max executions per backend {worst}, \
         leadership spans per worker {per_worker:?}",
        elapsed.as_secs_f64(),
        n_jobs as f64 / elapsed.as_secs_f64(),
    );
}

/// `comfyfleet serve` on `config`, and its URL.
fn serve(config: &Path) -> (Child, String) {
    comfyfleet_testkit::serve::spawn_serve(
        &assert_cmd::cargo::cargo_bin("comfyfleet"),
        config,
        "error",
        Stdio::null(),
    )
}

/// Two `serve` processes on one database are one fleet: a job submitted (with an input file)
/// to A runs on B's engine (A's only backend is drained), and both APIs show the same job and
/// the same events — A's live stream included, though B wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_on_one_postgres_show_the_same_jobs_and_events() {
    use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, SimConfig};
    use futures::StreamExt;

    let pg = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .unwrap()
        .expect("a private PostgreSQL cluster");
    let sim = ComfyUiSim::start(SimConfig::scaled(0.05)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"{}\"\n[[backends]]\nkind = \"comfyui\"\nid = \"sim-1\"\nurl = \"{}\"\n",
            pg.url(),
            sim.base_url()
        ),
    )
    .unwrap();
    let (mut a, url_a) = serve(&config);
    let (mut b, url_b) = serve(&config);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();

    // A's live stream, opened before anything happens.
    let mut live = http
        .get(format!("{url_a}/v1/events"))
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let drained = http
        .post(format!("{url_a}/v1/backends/sim-1/drain"))
        .send()
        .await
        .unwrap();
    assert!(drained.status().is_success(), "{}", drained.status());

    let cat = dir.path().join("cat.png");
    // A real 1×1 PNG: the simulator decodes it as ComfyUI's LoadImage would.
    const PNG_1X1: &[u8] = &[
        0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44,
        0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F,
        0x15, 0xC4, 0x89, 0x00, 0x00, 0x00, 0x0A, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0x00,
        0x01, 0x00, 0x00, 0x05, 0x00, 0x01, 0x0D, 0x0A, 0x2D, 0xB4, 0x00, 0x00, 0x00, 0x00, 0x49,
        0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82,
    ];
    std::fs::write(&cat, PNG_1X1).unwrap();
    let wf = dir.path().join("load.json");
    std::fs::write(
        &wf,
        r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "pg"}}}"#,
    )
    .unwrap();
    let out = Command::new(assert_cmd::cargo::cargo_bin("comfyfleet"))
        .args([
            "submit",
            wf.to_str().unwrap(),
            "--upload",
            cat.to_str().unwrap(),
            "--json",
        ])
        .args(["--server", &url_a])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let submitted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = submitted["id"].as_str().unwrap().to_owned();

    // B's engine runs it (A has no active backend), reading the upload A stored.
    let deadline = Instant::now() + Duration::from_secs(60);
    let job_b = loop {
        let job: serde_json::Value = http
            .get(format!("{url_b}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["state"] == "succeeded" {
            break job;
        }
        assert!(
            job["state"] != "failed" && job["state"] != "cancelled",
            "the job ended {}: {job}",
            job["state"]
        );
        assert!(Instant::now() < deadline, "job not done: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job_b["attempts"][0]["backend"], "sim-1", "{job_b}");
    assert_eq!(sim.stats().prompts_succeeded, 1, "it ran once");

    // Both APIs answer the same job and the same events.
    let job_a: serde_json::Value = http
        .get(format!("{url_a}/v1/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job_a, job_b);
    let events = |url: String| {
        let http = http.clone();
        async move {
            let v: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
            v
        }
    };
    let ev_a = events(format!("{url_a}/v1/jobs/{id}/events")).await;
    let ev_b = events(format!("{url_b}/v1/jobs/{id}/events")).await;
    assert_eq!(ev_a, ev_b);
    assert!(ev_a.to_string().contains("succeeded"), "{ev_a}");

    // A's live stream delivered the terminal event B's engine wrote.
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(chunk) = live.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if seen.contains(&id) && seen.contains("\"succeeded\"") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "A's stream: {seen}");

    for c in [&mut a, &mut b] {
        c.kill().ok();
        c.wait().ok();
    }
}
