//! The chaos run: the real `comfyfleet` binary on SQLite (one `serve`) and on PostgreSQL (a
//! `serve` and a `worker` on one private cluster) runs a batch of jobs over faulty simulators —
//! a ComfyUI that hangs prompts before they start, one that crashes and restarts, one whose
//! WebSocket stays silent, one answering 5xx, healthy ones, and a RunningHub whose key is at its
//! concurrency limit (814 storms) — while the test SIGKILLs a random process at random moments
//! and restarts it, cancels a few jobs, and submits the batch in waves between the kills.
//!
//! At the end, from the store and its event log: 0 lost jobs (every enqueued id terminal), 0
//! attempts completed twice (≤ 1 succeeded attempt and exactly one terminal event per job), 0
//! jobs stuck past lease + reaper period (sampled throughout: a `running` job whose lease
//! expired must be reaped within the reaper's period once an orchestrator is up), and every
//! terminal state explained by its attempts (succeeded ⇒ the last attempt succeeded; failed ⇒
//! an error and attempts exhausted, a deterministic error, the deadline, or the crash-requeue
//! cap; cancelled ⇒ the test cancelled it). One line of counts is printed.
//!
//! `COMFYFLEET_CHAOS_JOBS` (default 150), `COMFYFLEET_CHAOS_KILLS` (default 8),
//! `COMFYFLEET_CHAOS_STORE` (`sqlite`, `postgres` or `both`, the default) and
//! `COMFYFLEET_CHAOS_SEED` (default: random, printed) tune it; `cargo xtask chaos --long` runs
//! 1,000 jobs and 100 kills in release.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comfyfleet::core::{
    AttemptOutcome, Clock, ErrorKind, EventKind, EventQuery, JobFilter, NewJob, SystemClock,
    TimeoutPhase,
};
use comfyfleet::{JobId, JobSpec, JobState, TaskStore};
use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, HttpErrors, SimConfig, Trigger};
use comfyfleet_testkit::runninghub_sim::{
    ApiKeyConfig, DEFAULT_API_KEY, RunningHubSim, RunningHubSimConfig,
};
use comfyfleet_testkit::{TestPostgres, workflows};

const MAX_ATTEMPTS: u32 = 6;
const LEASE_TTL: Duration = Duration::from_secs(2);
const MAINTENANCE: Duration = Duration::from_millis(500);
/// The engine's crash-requeue cap (`EngineConfig::max_crash_requeues`).
const CRASH_REQUEUE_CAP: u32 = 3;
/// `SmartFailoverConfig::backoff_max`: the longest retry delay, doubled for jitter.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const CANCEL_REASON: &str = "chaos: cancelled by the test";
/// Wall-clock limit for the batch to finish after the last restart.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn store_wanted(kind: &str) -> bool {
    let want = std::env::var("COMFYFLEET_CHAOS_STORE").unwrap_or_else(|_| "both".into());
    want == "both" || want == kind
}

/// How long a `running` job may sit with an expired lease while an orchestrator is up: the
/// reaper's period (`lease_ttl + maintenance`), plus taking over the dead leader's maintenance
/// lease (3 × maintenance), plus slack for a process starting on a loaded machine.
fn stuck_bound() -> Duration {
    LEASE_TTL + MAINTENANCE * 4 + Duration::from_secs(10)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Serve,
    Worker,
}

struct Proc {
    role: Role,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(&mut self, config: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("comfyfleet"));
        match self.role {
            // `serve`'s stdout goes to /dev/null: writes there never fail, unlike a closed pipe.
            Role::Serve => cmd.args([
                "serve",
                "--config",
                config.to_str().unwrap(),
                "--bind",
                "127.0.0.1:0",
            ]),
            Role::Worker => cmd.args(["worker", "--config", config.to_str().unwrap()]),
        };
        let child = cmd
            .env("COMFYFLEET_LOG", "warn")
            .env("NO_COLOR", "1")
            .env("CHAOS_RH_KEY", DEFAULT_API_KEY)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }
}

/// The simulators and their fault roles.
struct Sims {
    comfy: Vec<(&'static str, ComfyUiSim)>,
    rh: RunningHubSim,
}

impl Sims {
    async fn start() -> Sims {
        let scaled = || SimConfig::scaled(0.05);
        let mut comfy = Vec::new();
        comfy.push(("healthy-1", ComfyUiSim::start(scaled()).await.unwrap()));
        comfy.push(("healthy-2", ComfyUiSim::start(scaled()).await.unwrap()));
        // Hangs prompts before they start: the fault driver turns `hang_after_accept` on and off.
        comfy.push(("hangs", ComfyUiSim::start(scaled()).await.unwrap()));
        // Crashes: the fault driver restarts it (losing its queue and history); 0.5 s down.
        comfy.push((
            "crashes",
            ComfyUiSim::start(scaled().restart_delay(Duration::from_secs(10)))
                .await
                .unwrap(),
        ));
        let silent = ComfyUiSim::start(scaled()).await.unwrap();
        silent.faults().set_silent_websocket(true);
        comfy.push(("silent-ws", silent));
        let flaky = ComfyUiSim::start(scaled()).await.unwrap();
        flaky.faults().set_http_errors(Some(HttpErrors {
            status: 503,
            trigger: Trigger::Probability(0.15),
            path_contains: None,
        }));
        comfy.push(("5xx", flaky));
        // One key, one task at a time, behind a backend configured for three: 814 storms.
        let rh = RunningHubSim::start(
            RunningHubSimConfig::scaled(0.05).key(DEFAULT_API_KEY, ApiKeyConfig::with_limit(1)),
        )
        .await
        .unwrap();
        Sims { comfy, rh }
    }

    fn get(&self, role: &str) -> &ComfyUiSim {
        &self.comfy.iter().find(|(r, _)| *r == role).unwrap().1
    }

    fn config(&self, store_url: &str) -> String {
        let mut toml = format!("store = \"{store_url}\"\n");
        for (role, sim) in &self.comfy {
            let prefetch = if *role == "healthy-2" { 1 } else { 0 };
            toml.push_str(&format!(
                "[[backends]]\nkind = \"comfyui\"\nid = \"sim-{role}\"\nurl = \"{}\"\nprefetch = {prefetch}\n",
                sim.base_url()
            ));
        }
        toml.push_str(&format!(
            "[[backends]]\nkind = \"runninghub\"\nid = \"rh-814\"\napi_key_env = \"CHAOS_RH_KEY\"\n\
             base_url = \"{}\"\nmax_concurrent = 3\ndefault_workflow_id = \"1\"\npoll_min_secs = 0.2\npoll_max_secs = 1.0\n",
            self.rh.base_url()
        ));
        toml.push_str(&format!(
            "[engine]\nlease_ttl_secs = {}\nheartbeat_secs = 0.5\nmaintenance_secs = {}\n\
             start_timeout_secs = 2.0\nnode_timeout_secs = 5.0\ncancel_grace_secs = 2.0\n",
            LEASE_TTL.as_secs_f64(),
            MAINTENANCE.as_secs_f64()
        ));
        toml
    }
}

/// Turns the hanging simulator's knob on and off and crashes the crashing one, until stopped.
fn fault_driver(sims: Arc<Sims>, seed: u64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut crashes = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
            if stop.load(Ordering::SeqCst) {
                break;
            }
            sims.get("hangs")
                .faults()
                .set_hang_after_accept(rng.f64() < 0.3);
            if rng.f64() < 0.2 {
                sims.get("crashes").restart().await;
                crashes += 1;
            }
        }
        sims.get("hangs").faults().set_hang_after_accept(false);
        crashes
    })
}

/// Samples the `running` jobs: one whose lease expired longer ago than [`stuck_bound`] while
/// some orchestrator has been up that long is stuck. Returns the stuck jobs and the longest
/// overrun seen.
fn stuck_monitor(
    store: Arc<dyn TaskStore>,
    alive_since: Arc<Mutex<Vec<Option<Instant>>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(BTreeMap<JobId, Duration>, Duration)> {
    tokio::spawn(async move {
        let mut stuck = BTreeMap::new();
        let mut worst = Duration::ZERO;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let filter = JobFilter {
                states: vec![JobState::Running],
                limit: 1000,
                ..JobFilter::default()
            };
            // A store that is busy or restarting is simply looked at again.
            let Ok(page) = store.list(&filter).await else {
                continue;
            };
            for summary in page.jobs {
                let Ok(Some(job)) = store.get(summary.id).await else {
                    continue;
                };
                let now = SystemClock.now();
                let (JobState::Running, Some(lease)) = (job.state, &job.lease) else {
                    continue;
                };
                if lease.expires_at > now {
                    continue;
                }
                let Some(up) = alive_since.lock().unwrap().iter().flatten().min().copied() else {
                    continue; // nobody is up to reap it
                };
                let overrun = now.since(lease.expires_at).min(up.elapsed());
                worst = worst.max(overrun);
                if overrun > stuck_bound() {
                    stuck.insert(job.id, overrun);
                }
            }
        }
        (stuck, worst)
    })
}

async fn open_jobs(store: &dyn TaskStore) -> Option<u64> {
    let c = store.counts().await.ok()?;
    Some(
        c.total()
            - c.get(JobState::Succeeded)
            - c.get(JobState::Failed)
            - c.get(JobState::Cancelled),
    )
}

/// What the event log says about one job.
#[derive(Default)]
struct Logged {
    terminals: usize,
    cancel_requested: bool,
    cancelled_by_us: bool,
}

async fn event_log(store: &dyn TaskStore) -> HashMap<JobId, Logged> {
    let mut out: HashMap<JobId, Logged> = HashMap::new();
    let mut after = None;
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
            let l = out.entry(e.job).or_default();
            if e.kind.terminal_state().is_some() {
                l.terminals += 1;
            }
            match &e.kind {
                EventKind::CancelRequested { .. } => l.cancel_requested = true,
                EventKind::Cancelled { reason } if reason == CANCEL_REASON => {
                    l.cancelled_by_us = true;
                }
                _ => {}
            }
        }
    }
    out
}

async fn chaos(kind: &str) {
    let n_jobs = env_num("COMFYFLEET_CHAOS_JOBS", 150) as usize;
    let n_kills = env_num("COMFYFLEET_CHAOS_KILLS", 8) as usize;
    let seed = env_num("COMFYFLEET_CHAOS_SEED", fastrand::u64(..));
    println!("chaos {kind}: seed {seed} (COMFYFLEET_CHAOS_SEED={seed} repeats the schedule)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::Builder::new()
        .prefix(&format!("comfyfleet-chaos-{kind}-"))
        .tempdir()
        .unwrap();

    let pg = if kind == "postgres" {
        Some(
            tokio::task::spawn_blocking(TestPostgres::start)
                .await
                .unwrap()
                .expect("a private PostgreSQL cluster (cargo xtask setup installs postgresql)"),
        )
    } else {
        None
    };
    let url = match &pg {
        Some(pg) => pg.url(),
        None => format!("sqlite:{}", dir.path().join("fleet.db").display()),
    };
    let store: Arc<dyn TaskStore> = comfyfleet::open_store(&url).await.unwrap();
    let sims = Arc::new(Sims::start().await);
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, sims.config(&url)).unwrap();

    let roles: &[Role] = if kind == "postgres" {
        &[Role::Serve, Role::Worker]
    } else {
        &[Role::Serve]
    };
    let mut procs: Vec<Proc> = roles
        .iter()
        .enumerate()
        .map(|(i, role)| Proc {
            role: *role,
            child: None,
            log: dir.path().join(format!("proc-{i}.log")),
        })
        .collect();
    let alive_since = Arc::new(Mutex::new(vec![None; procs.len()]));

    let started = Instant::now();
    for (i, p) in procs.iter_mut().enumerate() {
        p.spawn(&config);
        alive_since.lock().unwrap()[i] = Some(Instant::now());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let faults = fault_driver(sims.clone(), rng.u64(..), stop.clone());
    let monitor = stuck_monitor(store.clone(), alive_since.clone(), stop.clone());

    // The batch goes in in waves, one before each kill (and one after the last), so that the
    // kills land while work is in flight however long the run is.
    let waves = n_kills + 1;
    let mut ids: Vec<JobId> = Vec::with_capacity(n_jobs);
    let mut cancel_asked: HashSet<JobId> = HashSet::new();
    let mut kills = 0usize;
    let mut restarts = 0usize;
    for wave in 0..waves {
        let upto = n_jobs * (wave + 1) / waves;
        while ids.len() < upto {
            let i = ids.len();
            // 1–8 simulated seconds of TestSleep = 50–400 ms; unique prefixes defeat the cache.
            let secs = f64::from(rng.u32(1..=8));
            let mut spec = JobSpec::new(workflows::sleep_with_prefix(secs, &format!("chaos_{i}")))
                .max_attempts(MAX_ATTEMPTS);
            if rng.f64() < 0.15 {
                spec = spec.deadline(Duration::from_secs(rng.u64(3..40)));
            }
            let e = store
                .enqueue(NewJob::new(spec), SystemClock.now())
                .await
                .unwrap();
            ids.push(e.id);
        }
        // A few cancels, of jobs in any state (a finished one stays as it is).
        for _ in 0..(upto / 40).max(1) {
            if rng.f64() < 0.5 {
                let id = ids[rng.usize(..ids.len())];
                if store
                    .force_cancel(id, CANCEL_REASON, SystemClock.now())
                    .await
                    .is_ok()
                {
                    cancel_asked.insert(id);
                }
            }
        }
        if wave == n_kills {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(200..2500))).await;
        let victim = rng.usize(..procs.len());
        procs[victim].kill();
        alive_since.lock().unwrap()[victim] = None;
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..800))).await;
        procs[victim].spawn(&config);
        alive_since.lock().unwrap()[victim] = Some(Instant::now());
        restarts += 1;
    }

    let drain_from = Instant::now();
    loop {
        // The store may be busy: a failed read is retried.
        if open_jobs(store.as_ref()).await == Some(0) {
            break;
        }
        if drain_from.elapsed() > DRAIN_LIMIT {
            let c = store.counts().await;
            let keep = dir.keep();
            panic!(
                "chaos {kind} (seed {seed}): jobs still open {}s after the last restart: {c:?}; logs in {}",
                DRAIN_LIMIT.as_secs(),
                keep.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let crashes = faults.await.unwrap();
    let (stuck, worst_overrun) = monitor.await.unwrap();
    for p in &mut procs {
        p.kill();
    }

    // ---- the checks, from the store
    let logged = event_log(store.as_ref()).await;
    let mut problems: Vec<String> = Vec::new();
    let (mut lost, mut twice) = (0usize, 0usize);
    let (mut succeeded, mut cancelled) = (0usize, 0usize);
    let mut failed: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut attempts, mut reattached, mut requeues) = (0usize, 0usize, 0u64);
    for id in &ids {
        let Some(job) = store.get(*id).await.unwrap() else {
            lost += 1;
            problems.push(format!("job {id} is gone"));
            continue;
        };
        if !job.state.is_terminal() {
            lost += 1;
            problems.push(format!("job {id} is {}", job.state));
            continue;
        }
        attempts += job.attempts.len();
        reattached += job.attempts.iter().filter(|a| a.reattached).count();
        requeues += u64::from(job.crash_requeues);
        let completed = job
            .attempts
            .iter()
            .filter(|a| a.outcome == Some(AttemptOutcome::Succeeded))
            .count();
        let log = logged.get(id);
        let terminals = log.map_or(0, |l| l.terminals);
        if completed > 1 || terminals != 1 {
            twice += 1;
            problems.push(format!(
                "job {id}: {completed} attempts succeeded, {terminals} terminal events"
            ));
        }
        if job.counted_attempts() > MAX_ATTEMPTS {
            problems.push(format!("job {id}: {} attempts", job.counted_attempts()));
        }
        let last = job.attempts.last();
        match job.state {
            JobState::Succeeded => {
                succeeded += 1;
                if last.and_then(|a| a.outcome) != Some(AttemptOutcome::Succeeded) {
                    problems.push(format!(
                        "job {id} succeeded but its last attempt ended {:?}",
                        last.and_then(|a| a.outcome)
                    ));
                }
            }
            JobState::Cancelled => {
                cancelled += 1;
                let ours = cancel_asked.contains(id)
                    && log.is_some_and(|l| l.cancel_requested || l.cancelled_by_us);
                if !ours {
                    problems.push(format!("job {id} was cancelled without a cancel"));
                }
            }
            JobState::Failed => {
                let Some(err) = &job.error else {
                    problems.push(format!("job {id} failed without an error"));
                    continue;
                };
                let finished = job.finished_at.unwrap_or(job.updated_at);
                // A retry after `n` attempts would wait up to twice the backoff (jitter);
                // timeouts and backend-specific failures retry at once.
                let n = job.counted_attempts().clamp(1, 32);
                let backoff = Duration::from_secs(1 << (n - 1).min(6)).min(BACKOFF_MAX) * 2;
                let reason = if err.message.contains("crash-requeue cap")
                    && job.crash_requeues >= CRASH_REQUEUE_CAP
                {
                    "crash-requeue cap"
                } else if err.kind == ErrorKind::Deterministic {
                    "deterministic"
                } else if job.deadline.is_some_and(|d| {
                    err.timeout_phase() == Some(TimeoutPhase::Total)
                        || finished + backoff + Duration::from_secs(1) >= d
                }) {
                    "deadline"
                } else if job.counted_attempts() >= MAX_ATTEMPTS {
                    "attempts exhausted"
                } else {
                    problems.push(format!(
                        "job {id} failed unexplained: {err:?} after {} attempts ({} crash requeues, deadline {:?}, finished {finished})",
                        job.counted_attempts(),
                        job.crash_requeues,
                        job.deadline
                    ));
                    "unexplained"
                };
                *failed.entry(reason).or_insert(0) += 1;
            }
            other => unreachable!("{other} is terminal"),
        }
    }
    if !stuck.is_empty() {
        problems.push(format!(
            "{} jobs stuck with an expired lease past {:?}: {stuck:?}",
            stuck.len(),
            stuck_bound()
        ));
    }

    let comfy_prompts: u64 = sims
        .comfy
        .iter()
        .map(|(_, s)| s.stats().prompts_received)
        .sum();
    let rh = sims.rh.stats();
    let failed_total: usize = failed.values().sum();
    let reasons = failed
        .iter()
        .map(|(r, n)| format!("{n} {r}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "chaos {kind}: seed {seed}, {n} jobs, {kills} kills, {restarts} restarts, {procs} process(es); \
         {succeeded} succeeded / {failed_total} failed ({reasons}) / {cancelled} cancelled; \
         lost {lost}, completed twice {twice}, stuck {stuck} (longest expired lease seen {worst:.1}s); \
         {attempts} attempts, {reattached} reattached, {requeues} crash requeues; \
         prompts received: {comfy_prompts} ComfyUI ({crashes} simulator crashes) + {rh_created} RunningHub tasks ({rh_814} creates answered 814); {secs:.1}s",
        n = ids.len(),
        procs = procs.len(),
        stuck = stuck.len(),
        worst = worst_overrun.as_secs_f64(),
        rh_created = rh.tasks_created,
        rh_814 = rh.tasks_rejected_limit,
        secs = elapsed.as_secs_f64(),
    );
    if !problems.is_empty() {
        let keep = dir.keep();
        panic!(
            "chaos {kind} (seed {seed}): {} problem(s); logs in {}:\n{}",
            problems.len(),
            keep.display(),
            problems.join("\n")
        );
    }
    assert_eq!(lost + twice, 0);
    if n_kills >= 4 {
        assert!(requeues > 0, "some job was held by a killed process");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_sqlite_loses_nothing_and_runs_nothing_twice() {
    if !store_wanted("sqlite") {
        eprintln!("COMFYFLEET_CHAOS_STORE excludes sqlite: skipped");
        return;
    }
    chaos("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_postgres_loses_nothing_and_runs_nothing_twice() {
    if !store_wanted("postgres") {
        eprintln!("COMFYFLEET_CHAOS_STORE excludes postgres: skipped");
        return;
    }
    chaos("postgres").await;
}
