//! The crash test: the real `comfyfleet worker` binary runs the engine on SQLite against
//! ComfyUI simulators hosted by this test, and is killed with SIGKILL at random moments
//! (before a claim commits, mid-run, after the backend finished but before the store write),
//! again and again, then restarted until the batch is done. Afterwards: every job terminal
//! exactly once, no attempt completed twice, attempts ≤ max, running prompts were reattached
//! instead of re-run, and `PRAGMA integrity_check` is ok.
//!
//! `COMFYFLEET_KILL_ITERATIONS` (default 8) and `COMFYFLEET_KILL_JOBS` (default 60) tune it;
//! the long run on demand uses e.g. 100 and 300.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use comfyfleet::core::Clock;
use comfyfleet::core::{AttemptOutcome, EventQuery, JobFilter, NewJob, SystemClock};
use comfyfleet::{JobSpec, TaskStore};
use comfyfleet_store_sqlite::SqliteStore;
use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, SimConfig};
use comfyfleet_testkit::workflows;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spawn_worker(config: &std::path::Path) -> Child {
    Command::new(assert_cmd::cargo::cargo_bin("comfyfleet"))
        .args(["worker", "--config", config.to_str().unwrap()])
        .env("COMFYFLEET_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_orchestrator_loses_nothing_and_runs_nothing_twice() {
    let iterations = env_num("COMFYFLEET_KILL_ITERATIONS", 8);
    let n_jobs = env_num("COMFYFLEET_KILL_JOBS", 60);
    let mut sims = Vec::new();
    for _ in 0..3 {
        sims.push(ComfyUiSim::start(SimConfig::scaled(0.05)).await.unwrap());
    }
    let dir = std::env::temp_dir().join(format!("comfyfleet-kill-{}", comfyfleet::JobId::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("fleet.db");
    let store = SqliteStore::open(&db).await.unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let max_attempts = 6;
    for i in 0..n_jobs {
        // 1–8 simulated seconds of TestSleep = 50–400 ms; unique prefixes defeat the cache.
        let secs = f64::from(rng.u32(1..=8));
        let spec = JobSpec::new(workflows::sleep_with_prefix(secs, &format!("kill_{i}")))
            .max_attempts(max_attempts);
        store
            .enqueue(NewJob::new(spec), SystemClock.now())
            .await
            .unwrap();
    }
    let mut toml = format!("store = \"sqlite:{}\"\n", db.display());
    for (i, s) in sims.iter().enumerate() {
        toml.push_str(&format!(
            "[[backends]]\nkind = \"comfyui\"\nid = \"sim-{i}\"\nurl = \"{}\"\n",
            s.base_url()
        ));
    }
    toml.push_str("[engine]\nlease_ttl_secs = 2.0\nheartbeat_secs = 0.5\nmaintenance_secs = 0.5\nstart_timeout_secs = 5.0\nnode_timeout_secs = 10.0\n");
    let config = dir.join("fleet.toml");
    std::fs::write(&config, toml).unwrap();

    let started = Instant::now();
    for _ in 0..iterations {
        let mut child = spawn_worker(&config);
        tokio::time::sleep(Duration::from_millis(rng.u64(150..2000))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let mut child = spawn_worker(&config);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let counts = store.counts().await.unwrap();
        let open = counts.total()
            - counts.get(comfyfleet::JobState::Succeeded)
            - counts.get(comfyfleet::JobState::Failed)
            - counts.get(comfyfleet::JobState::Cancelled);
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} jobs still open: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let page = store
        .list(&JobFilter {
            limit: 1000,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), n_jobs);
    let (mut succeeded, mut capped, mut reattached, mut requeues, mut attempts_total) =
        (0, 0, 0, 0, 0);
    for summary in &page.jobs {
        let job = store.get(summary.id).await.unwrap().unwrap();
        assert!(job.state.is_terminal());
        let events = store
            .events(&EventQuery {
                job: Some(job.id),
                after: None,
                limit: 0,
            })
            .await
            .unwrap();
        let terminals = events
            .iter()
            .filter(|e| e.kind.terminal_state().is_some())
            .count();
        assert_eq!(terminals, 1, "job {} ended {terminals} times", job.id);
        let completed = job
            .attempts
            .iter()
            .filter(|a| a.outcome == Some(AttemptOutcome::Succeeded))
            .count();
        assert!(completed <= 1, "job {} completed {completed} times", job.id);
        assert!(
            job.counted_attempts() <= max_attempts,
            "job {}: {} attempts",
            job.id,
            job.counted_attempts()
        );
        match job.state {
            comfyfleet::JobState::Succeeded => succeeded += 1,
            state => {
                // The only acceptable other ending: the job's workers were killed more often
                // than the crash-requeue cap allows (no poison loop).
                let err = job
                    .error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default();
                assert!(
                    state == comfyfleet::JobState::Failed
                        && err.contains("crash-requeue cap")
                        && job.crash_requeues >= 3,
                    "job {} ended {state}: {err} ({} crash requeues)",
                    job.id,
                    job.crash_requeues
                );
                capped += 1;
            }
        }
        reattached += job.attempts.iter().filter(|a| a.reattached).count();
        requeues += job.crash_requeues;
        attempts_total += job.attempts.len();
    }
    let received: u64 = sims.iter().map(|s| s.stats().prompts_received).sum();
    let problems = store.integrity_check().await.unwrap();
    println!(
        "kill test: {iterations} kills, {n_jobs} jobs in {:.1}s: {succeeded} succeeded, {capped} failed at the crash-requeue cap, {attempts_total} attempts, \
         {reattached} reattached, {requeues} crash requeues, {received} prompts received by the simulators; integrity: {problems:?}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(succeeded + capped, n_jobs);
    assert!(
        succeeded * 10 >= n_jobs * 9,
        "most jobs succeed: {succeeded}/{n_jobs}"
    );
    assert_eq!(problems, vec!["ok".to_string()]);
    if iterations >= 4 {
        assert!(
            reattached > 0,
            "some remote execution survived a kill and was reattached"
        );
        assert!(requeues > 0, "some job was held by a killed worker");
    }
    std::fs::remove_dir_all(dir).ok();
}
