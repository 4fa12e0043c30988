//! PostgreSQL scale-out, measured on a private cluster (`TestPostgres`, fsync off):
//!
//! * **jobs/s with 1 vs 3 worker processes**: the real `comfyfleet worker` binary (built next to
//!   this bench: `cargo build --release -p comfyfleet-cli` first; `cargo xtask bench` does it),
//!   twelve zero-time simulated backends of capacity 1, a batch of jobs enqueued beforehand; time
//!   from the workers' start to the last job ending.
//! * **claim latency under contention**: C tasks, each with its own connection, loop claim →
//!   start attempt → complete on one `PostgresStore` until the queue is empty; latency of the
//!   claim call alone, p50 / p99.
//!
//! `COMFYFLEET_BENCH_PG_JOBS` (default 2000) sets the batch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comfyfleet_core::{
    AttemptStart, BackendId, Clock, Completion, JobSpec, JobState, NewJob, SystemClock, TaskStore,
};
use comfyfleet_store_postgres::{PostgresOptions, PostgresStore};
use comfyfleet_testkit::{TestPostgres, workflows};

fn jobs() -> usize {
    std::env::var("COMFYFLEET_BENCH_PG_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn binary() -> Option<std::path::PathBuf> {
    // target/release/deps/postgres_scale-… → target/release/comfyfleet
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("comfyfleet");
    bin.exists().then_some(bin)
}

async fn enqueue(store: &PostgresStore, n: usize) {
    let now = SystemClock.now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let batch = chunk
            .iter()
            .map(|_| NewJob::new(JobSpec::new(workflows::invert())))
            .collect();
        store.enqueue_many(batch, now).await.unwrap();
    }
}

async fn open(store: &PostgresStore) -> u64 {
    let c = store.counts().await.unwrap();
    c.total() - c.get(JobState::Succeeded) - c.get(JobState::Failed) - c.get(JobState::Cancelled)
}

async fn workers_run(pg: &TestPostgres, bin: &std::path::Path, workers: usize, n: usize) -> f64 {
    let db = format!("bench_workers_{workers}");
    let url = pg.create_database(&db).unwrap();
    let store = PostgresStore::connect(&url).await.unwrap();
    enqueue(&store, n).await;
    let dir = tempfile::tempdir().unwrap();
    let mut toml = format!("store = \"{url}\"\n");
    for i in 1..=12 {
        toml.push_str(&format!(
            "[[backends]]\nkind = \"simulated\"\nid = \"gpu-{i}\"\ncapacity = 1\n"
        ));
    }
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, toml).unwrap();
    let started = Instant::now();
    let mut children: Vec<Child> = (0..workers)
        .map(|_| {
            Command::new(bin)
                .args(["worker", "--config", config.to_str().unwrap()])
                .env("COMFYFLEET_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    while open(&store).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "workers stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    for c in &mut children {
        c.kill().ok();
        c.wait().ok();
    }
    store.close().await;
    n as f64 / secs
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn claims(pg: &TestPostgres, tasks: usize, n: usize) -> (Duration, Duration, f64) {
    let url = pg.url();
    let store = Arc::new(
        PostgresStore::connect_with(
            &url,
            PostgresOptions::default()
                .schema(format!("bench_claims_{tasks}"))
                .max_connections(u32::try_from(tasks).unwrap() + 1),
        )
        .await
        .unwrap(),
    );
    enqueue(&store, n).await;
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let owner = format!("bench-{t}");
            loop {
                let t0 = Instant::now();
                let claimed = store
                    .claim(&owner, Duration::from_secs(30), SystemClock.now())
                    .await
                    .unwrap();
                lat.push(t0.elapsed());
                let Some(c) = claimed else { break };
                let start = AttemptStart {
                    backend: BackendId::new(format!("gpu-{}", t % 12)),
                    remote: None,
                    reattached: false,
                    skipped: Vec::new(),
                    phase: None,
                    capacity: None,
                };
                store
                    .start_attempt(&c.lease, start, SystemClock.now())
                    .await
                    .unwrap();
                store
                    .complete(&c.lease, Completion::default(), SystemClock.now())
                    .await
                    .unwrap();
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    store.close().await;
    (
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        n as f64 / secs,
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg = TestPostgres::start().expect("PostgreSQL (cargo xtask setup installs it)");
    let n = jobs();
    rt.block_on(async {
        println!("\nclaim latency under contention ({n} jobs; claim → start attempt → complete per job)");
        println!("| concurrent claimers | claim p50 | claim p99 | jobs/s |");
        println!("|---:|---:|---:|---:|");
        for tasks in [1, 4, 16] {
            let (p50, p99, rate) = claims(&pg, tasks, n).await;
            println!("| {tasks} | {p50:.2?} | {p99:.2?} | {rate:.0} |");
        }
        match binary() {
            Some(bin) => {
                println!("\nworker processes on one database (12 zero-time simulated backends of capacity 1, {n} jobs)");
                println!("| processes | jobs/s |");
                println!("|---:|---:|");
                for workers in [1, 3] {
                    let rate = workers_run(&pg, &bin, workers, n).await;
                    println!("| {workers} | {rate:.0} |");
                }
            }
            None => println!(
                "\n(skipped the worker-process runs: build the binary first, `cargo build --release -p comfyfleet-cli`)"
            ),
        }
    });
}
