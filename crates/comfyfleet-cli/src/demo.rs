//! `comfyfleet demo`: a batch on three ComfyUI simulators over loopback (one of them faulty),
//! with the service and dashboard up and a live progress bar per job. `--serve` keeps the
//! service up after the batch until Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use comfyfleet::testkit::comfyui_sim::{ComfyUiSim, SimConfig};
use comfyfleet::testkit::workflows;
use comfyfleet::{
    BackendConfig, ComfyUiServer, Fleet, FleetConfig, FleetEvent, JobId, JobSpec, JobState,
};
use comfyfleet_server::{Server, ServerConfig, ServerError};
use secrecy::SecretString;
use tokio::sync::broadcast::error::RecvError;

use crate::follow::{self, Bars};

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
    /// Keep the service and its dashboard up after the batch, until Ctrl-C.
    #[arg(long)]
    serve: bool,
    /// Where the service listens (default: 127.0.0.1:8330 with `--serve` when free, else any
    /// free loopback port).
    #[arg(long)]
    bind: Option<SocketAddr>,
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

/// Starts the service for the demo: on `bind`, or on 8330 (`--serve`) falling back to any free
/// port, or on any free port.
async fn start_server(
    engine: comfyfleet::Engine,
    installer: Option<comfyfleet::SshInstaller>,
    args: &DemoArgs,
    backup_dir: std::path::PathBuf,
) -> Result<Server> {
    let mut config = ServerConfig {
        backup_dir: Some(backup_dir),
        ..ServerConfig::default()
    };
    if let Ok(t) = std::env::var(crate::config::TOKEN_VAR)
        && !t.trim().is_empty()
    {
        config.tokens.push(SecretString::from(t));
    }
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    config.bind = match args.bind {
        Some(b) => b,
        None if args.serve => config.bind,
        None => any_port,
    };
    match Server::start_with_installer(engine.clone(), installer.clone(), config.clone()).await {
        Err(ServerError::Bind { .. }) if args.bind.is_none() && config.bind != any_port => {
            config.bind = any_port;
            Ok(Server::start_with_installer(engine, installer, config).await?)
        }
        r => Ok(r?),
    }
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
    let mut stop = crate::Interrupt::shutdown()?;
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
    let server = match start_server(
        engine.clone(),
        fleet.installer().cloned(),
        &args,
        temp.join("backups"),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            fleet.shutdown().await;
            return Err(e.context("starting the service"));
        }
    };
    let url = server.url();
    let url = url.trim_end_matches('/').to_owned();

    let mut bars = Bars::new()?;
    bars.line(format!("store: {store_url}"));
    bars.line(format!(
        "dashboard: {url}/ (API: {url}/v1){}",
        if args.serve {
            ""
        } else {
            "; up while the batch runs (--serve keeps it up)"
        }
    ));
    bars.line(format!(
        "comfyfleet demo: {} jobs on three ComfyUI simulators over loopback HTTP/WebSocket — gpu-1 ({}), gpu-2 ({}, the only one with the custom node FleetNoSuchNode), gpu-3-flaky ({}, accepts prompts and hangs); start timeout {:.1}s",
        args.jobs,
        sims[0].base_url(),
        sims[1].base_url(),
        sims[2].base_url(),
        5.0 / args.speed
    ));

    let mut rx = engine.subscribe();
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
        bars.add(id, "");
        order.push(id);
    }

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut flaky_fixed = false;
    while bars.open() > 0 {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(FleetEvent::Job(e)) => { bars.on_event(&e); }
                Ok(FleetEvent::BackendBlocked { backend, reason, .. }) => {
                    bars.line(format!("{backend} blocked for this workflow for 60s: {reason}"));
                    if backend.as_str() == "gpu-3-flaky" && !flaky_fixed {
                        // Its operator fixes it; the block still keeps this workflow away for now.
                        sims[2].faults().set_hang_after_accept(false);
                        flaky_fixed = true;
                    }
                }
                Ok(other) => {
                    if let Some(line) = follow::fleet_line(&other) {
                        bars.line(line);
                    }
                }
                Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {}
            },
            _ = tick.tick() => {
                // Belt and braces: a lagged subscriber re-reads the store.
                for id in &order {
                    if bars.ended(*id) {
                        continue;
                    }
                    if let Some(j) = engine.get(*id).await?.filter(|j| j.state.is_terminal()) {
                        let msg = j.error.as_ref().map(|e| format!("{}: {}", j.state, e.message)).unwrap_or_else(|| j.state.to_string());
                        bars.finish(*id, j.state, &msg);
                    }
                }
            }
        }
    }
    bars.clear();

    let mut jobs = Vec::new();
    for id in &order {
        let j = engine
            .get(*id)
            .await?
            .context("job vanished from the store")?;
        jobs.push((j, String::new()));
    }
    if args.json {
        let v: Vec<serde_json::Value> = jobs
            .iter()
            .map(|(j, _)| follow::job_json(j, None))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        follow::print_summary(&jobs);
    }
    let ok = jobs.iter().all(|(j, _)| j.state == JobState::Succeeded);
    if args.serve {
        eprintln!("batch done; the service and dashboard stay up at {url}/ until Ctrl-C");
        stop.recv().await;
        eprintln!("comfyfleet demo: shutting down");
    }
    server.shutdown().await;
    fleet.shutdown().await;
    for sim in sims {
        sim.shutdown().await;
    }
    if store_url.contains("comfyfleet-demo-") {
        std::fs::remove_dir_all(&temp).ok();
    }
    Ok(if ok { 0 } else { 1 })
}
