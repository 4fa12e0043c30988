//! `comfyfleet demo`: a batch on three simulated backends, with live progress bars.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use comfyfleet::core::{AttemptOutcome, Progress};
use comfyfleet::testkit::comfyui_sim::{ComfyUiSim, SimConfig};
use comfyfleet::testkit::workflows;
use comfyfleet::{
    BackendConfig, ComfyUiServer, EventKind, Fleet, FleetConfig, FleetEvent, JobId, JobRecord,
    JobSpec, JobState,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

/// Options of `comfyfleet demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of jobs in the batch (1–500).
    #[arg(long, default_value_t = 8)]
    jobs: u32,
    /// Time factor: 2 runs everything twice as fast (node durations and the start timeout).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Print the results as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

fn short(id: JobId) -> String {
    id.to_string()
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// Prints through the bars on a terminal, plainly otherwise (CI logs, pipes).
struct Out {
    mp: MultiProgress,
    tty: bool,
}

impl Out {
    fn line(&self, s: String) {
        if self.tty {
            let _ = self.mp.println(s);
        } else {
            eprintln!("{s}");
        }
    }
}

fn progress_message(backend: &str, p: &Progress) -> String {
    let mut m = backend.to_string();
    if let Some(node) = &p.current_node {
        m.push_str(&format!(" · node {node}"));
        if let Some(c) = &p.current_class {
            m.push_str(&format!(" {c}"));
        }
    }
    if let Some(eta) = p.eta_ms {
        m.push_str(&format!(" · ETA {:.1}s", eta as f64 / 1000.0));
    }
    m
}

/// Three ComfyUI simulators on loopback: gpu-1 (two slots: one running, one prefetched), gpu-2
/// (the only one with the custom node `FleetNoSuchNode`), gpu-3-flaky (accepts prompts and
/// hangs until it has been blocked once).
async fn demo_fleet(speed: f64) -> Result<(Vec<ComfyUiSim>, FleetConfig)> {
    let scaled = || SimConfig::scaled(1.0 / speed);
    let gpu1 = ComfyUiSim::start(scaled()).await?;
    let mut c2 = scaled();
    c2.extra_node_classes
        .insert("FleetNoSuchNode".into(), false);
    let gpu2 = ComfyUiSim::start(c2).await?;
    let gpu3 = ComfyUiSim::start(scaled()).await?;
    gpu3.faults().set_hang_after_accept(true);
    let server = |id: &str, sim: &ComfyUiSim, prefetch: u32| {
        BackendConfig::ComfyUi(ComfyUiServer {
            id: id.into(),
            url: sim.base_url(),
            prefetch,
            labels: Default::default(),
        })
    };
    let config = FleetConfig {
        backends: vec![
            server("gpu-1", &gpu1, 1),
            server("gpu-2", &gpu2, 0),
            server("gpu-3-flaky", &gpu3, 0),
        ],
        engine: comfyfleet::EngineSettingsBuilder::start_timeout(5.0 / speed),
        ..FleetConfig::default()
    };
    Ok((vec![gpu1, gpu2, gpu3], config))
}

/// Runs the demo; returns the process exit code.
pub async fn run(args: DemoArgs, store: Option<String>) -> Result<i32> {
    if !(1..=500).contains(&args.jobs) {
        bail!("--jobs must be between 1 and 500, got {}", args.jobs);
    }
    if !(args.speed.is_finite() && args.speed > 0.0 && args.speed <= 1000.0) {
        bail!(
            "--speed must be a number above 0 and at most 1000, got {}",
            args.speed
        );
    }
    // A fresh database per run unless the user names one: the demo must not mix with real jobs.
    let temp = std::env::temp_dir().join(format!("comfyfleet-demo-{}", JobId::new()));
    let store_url = store.unwrap_or_else(|| format!("sqlite:{}", temp.join("demo.db").display()));
    let (sims, mut config) = demo_fleet(args.speed)
        .await
        .context("starting the ComfyUI simulators")?;
    config.store = store_url.clone();
    let fleet = Fleet::start(config)
        .await
        .context("starting the demo fleet")?;
    let engine = fleet.engine().clone();
    let tty = std::io::stderr().is_terminal();
    let mp = MultiProgress::with_draw_target(if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let out = Out {
        mp: mp.clone(),
        tty,
    };
    out.line(format!("store: {store_url}"));
    out.line(format!(
        "comfyfleet demo: {} jobs on three ComfyUI simulators over loopback HTTP/WebSocket — gpu-1 ({}), gpu-2 ({}, the only one with the custom node FleetNoSuchNode), gpu-3-flaky ({}, accepts prompts and hangs); start timeout {:.1}s",
        args.jobs,
        sims[0].base_url(),
        sims[1].base_url(),
        sims[2].base_url(),
        5.0 / args.speed
    ));
    let style = ProgressStyle::with_template("{prefix:.bold} [{bar:28.cyan/blue}] {pos:>3}% {msg}")
        .context("progress bar template")?
        .progress_chars("=> ");

    let mut rx = engine.subscribe();
    let mut bars: HashMap<JobId, (ProgressBar, String)> = HashMap::new();
    let mut order = Vec::new();
    for i in 0..args.jobs {
        let workflow = if i == 2 {
            workflows::missing_node()
        } else {
            workflows::sleep_with_prefix(
                (1.0 + f64::from(i % 4)) / args.speed,
                &format!("demo_{i}"),
            )
        };
        let id = engine
            .submit(JobSpec::new(workflow).label("batch", "demo"))
            .await?;
        let pb = mp.add(ProgressBar::new(100));
        pb.set_style(style.clone());
        pb.set_prefix(short(id));
        pb.set_message("pending");
        bars.insert(id, (pb, String::new()));
        order.push(id);
    }

    let mut open = order.len();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while open > 0 {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(FleetEvent::Job(e)) => {
                    let Some((pb, backend)) = bars.get_mut(&e.job) else { continue };
                    let id = short(e.job);
                    match e.kind {
                        EventKind::Dispatched { backend: b, skipped, attempt } => {
                            *backend = b.to_string();
                            pb.set_message(format!("dispatched to {b}"));
                            // "At capacity" is routine; other reasons (inventory, blocks) are news.
                            for s in skipped.iter().filter(|s| !s.reason.starts_with("at capacity")) {
                                out.line(format!("{id}: attempt {attempt} skipped {}: {}", s.backend, s.reason));
                            }
                            if !tty { out.line(format!("{id}: attempt {attempt} dispatched to {b}")); }
                        }
                        EventKind::Queued { position, .. } => pb.set_message(format!("{backend} · queued (position {position})")),
                        EventKind::Started { .. } => pb.set_message(format!("{backend} · running")),
                        EventKind::Progress { progress, .. } => {
                            pb.set_position(progress.percent.floor() as u64);
                            pb.set_message(progress_message(backend, &progress));
                        }
                        EventKind::AttemptFailed { attempt, backend: b, error, retry_at } => {
                            let next = if retry_at.is_some() { "retrying" } else { "giving up" };
                            out.line(format!("{id}: attempt {attempt} on {b} failed: {} — {next}", error.message));
                        }
                        EventKind::Waiting { reason, .. } => pb.set_message(format!("waiting: {reason}")),
                        EventKind::Succeeded { backend: b, artifacts, .. } => {
                            pb.set_position(100);
                            pb.finish_with_message(format!("✓ succeeded on {b} ({} output{})", artifacts.len(), if artifacts.len() == 1 { "" } else { "s" }));
                            if !tty { out.line(format!("{id}: succeeded on {b}")); }
                            open -= 1;
                        }
                        EventKind::Failed { error } => {
                            pb.abandon_with_message(format!("✗ failed: {}", error.message));
                            if !tty { out.line(format!("{id}: failed: {}", error.message)); }
                            open -= 1;
                        }
                        EventKind::Cancelled { reason } => {
                            pb.abandon_with_message(format!("✗ cancelled: {reason}"));
                            open -= 1;
                        }
                        _ => {}
                    }
                }
                Ok(FleetEvent::BackendBlocked { backend, reason, .. }) => {
                    out.line(format!("{backend} blocked for this workflow for 60s: {reason}"));
                    if backend.as_str() == "gpu-3-flaky" {
                        // Its operator fixes it; the block still keeps this workflow away for now.
                        sims[2].faults().set_hang_after_accept(false);
                    }
                }
                Ok(FleetEvent::BackendUnblocked { backend, .. }) => out.line(format!("{backend} unblocked")),
                Ok(_) => {}
                Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {}
            },
            _ = tick.tick() => {
                // Belt and braces: a lagged subscriber re-reads the store.
                let mut finished = 0;
                for id in &order {
                    if engine.get(*id).await?.is_some_and(|j| j.state.is_terminal()) {
                        finished += 1;
                    }
                }
                open = order.len() - finished;
            }
        }
    }
    mp.clear().ok();

    let mut jobs: Vec<JobRecord> = Vec::new();
    for id in &order {
        jobs.push(
            engine
                .get(*id)
                .await?
                .context("job vanished from the store")?,
        );
    }
    fleet.shutdown().await;
    for sim in sims {
        sim.shutdown().await;
    }
    if args.json {
        let v: Vec<serde_json::Value> = jobs
            .iter()
            .map(|j| {
                json!({
                    "id": j.id,
                    "state": j.state,
                    "attempts": j.attempts.iter().map(|a| json!({
                        "backend": a.backend,
                        "outcome": a.outcome,
                        "error": a.error.as_ref().map(|e| e.message.clone()),
                    })).collect::<Vec<_>>(),
                    "artifacts": j.artifacts.iter().map(|a| a.filename.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{:<10} {:<10} {:>6}  path", "job", "state", "secs");
        for j in &jobs {
            let path: Vec<String> = j
                .attempts
                .iter()
                .map(|a| match (a.outcome, &a.error) {
                    (Some(AttemptOutcome::Succeeded), _) => format!("{} ✓", a.backend),
                    (_, Some(e)) => format!(
                        "{} ✗ ({})",
                        a.backend,
                        e.message.split(':').next().unwrap_or("")
                    ),
                    _ => a.backend.to_string(),
                })
                .collect();
            let secs = j
                .finished_at
                .map(|f| f.since(j.created_at).as_secs_f64())
                .unwrap_or(0.0);
            println!(
                "{:<10} {:<10} {:>6.1}  {}",
                short(j.id),
                j.state,
                secs,
                path.join(" → ")
            );
        }
    }
    if store_url.contains("comfyfleet-demo-") {
        std::fs::remove_dir_all(&temp).ok();
    }
    let ok = jobs.iter().all(|j| j.state == JobState::Succeeded);
    Ok(if ok { 0 } else { 1 })
}
