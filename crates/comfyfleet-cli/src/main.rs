//! `comfyfleet`: the command line.
//!
//! * `demo` runs a batch of jobs through the engine on three simulated backends (one of them
//!   hangs on its first prompts, so you can watch a failover) with a progress bar per job, and
//!   exits 0 once every job succeeded.
//! * `jobs`, `job`, `cancel`, `reap`, `backup`, `prune` work on the store (the local SQLite
//!   database by default, `--store` or `COMFYFLEET_STORE` to choose).

mod demo;
mod store_cmds;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use comfyfleet::JobId;

#[derive(Debug, Parser)]
#[command(
    name = "comfyfleet",
    version,
    about = "Run ComfyUI workflows reliably on a fleet of backends"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `comfyfleet_engine=debug`.
    #[arg(long, global = true, env = "COMFYFLEET_LOG", default_value = "warn")]
    log: String,
    /// Where jobs are kept: `sqlite:PATH` (default: `sqlite:` = the user's data directory) or
    /// `memory:`.
    #[arg(long, global = true, env = "COMFYFLEET_STORE")]
    store: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a batch of jobs on built-in simulated backends (no setup needed) and show their
    /// progress; one backend hangs on its first prompts, so you see a failover. Uses a fresh
    /// SQLite database in a temporary directory unless `--store` is given.
    Demo(demo::DemoArgs),
    /// Run the engine over a fleet configuration (TOML) until interrupted: claims jobs from the
    /// store and runs them on the configured backends. Ctrl-C / SIGTERM shut down gracefully
    /// (running executions are handed back and reattached by the next start).
    Worker {
        /// The fleet configuration file (TOML: `store`, `[[backends]]`, `[engine]`).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a simulator standalone, for any client to talk to.
    #[command(subcommand)]
    Sim(SimCommand),
    /// List jobs, newest first, with filters.
    Jobs(store_cmds::JobsArgs),
    /// One job: attempts, per-node timings, outputs, events.
    Job {
        /// The job id.
        id: JobId,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Cancel jobs: pending ones at once; with `--force` also running ones.
    Cancel {
        /// Job ids.
        #[arg(required = true)]
        ids: Vec<JobId>,
        /// Also stop running jobs.
        #[arg(long)]
        force: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Find stuck jobs (dead orchestrator, past a deadline, or no progress for `--max-age`) and
    /// requeue, fail or cancel them; `--dry-run` only reports. Takes a backup first.
    Reap {
        /// Report only; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// A running job with no progress for this long is stuck (e.g. `30m`).
        #[arg(long, value_parser = store_cmds::parse_duration)]
        max_age: Option<Duration>,
        /// Jobs whose orchestrator died this many times are failed, not requeued.
        #[arg(long, default_value_t = 3)]
        max_crash_requeues: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Write a consistent copy of the store to a new file.
    Backup {
        /// Destination (must not exist).
        path: PathBuf,
    },
    /// Delete finished jobs older than `--older-than` (default 30d), after a backup.
    Prune {
        /// Age of finished jobs to delete (e.g. `30d`, `12h`).
        #[arg(long, default_value = "30d", value_parser = store_cmds::parse_duration)]
        older_than: Duration,
        /// Skip the automatic backup.
        #[arg(long)]
        no_backup: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SimCommand {
    /// A ComfyUI 0.3.64 simulator (HTTP + WebSocket, the `/api` routes, real PNG outputs).
    Comfyui {
        /// Port on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 8188)]
        port: u16,
        /// Extra node classes it has (comma separated), e.g. custom nodes.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Faults: hang-after-accept, hang-mid-node, stuck-node, silent-websocket, old-interrupt.
        #[arg(long, value_delimiter = ',')]
        fault: Vec<String>,
        /// Time factor for simulated work (1.0: real time; 0.1: ten times faster).
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
    },
}

async fn sim(cmd: SimCommand) -> Result<i32> {
    use comfyfleet::testkit::comfyui_sim::{ComfyUiSim, HangMidNode, SimConfig};
    let SimCommand::Comfyui {
        port,
        nodes,
        fault,
        time_scale,
    } = cmd;
    if !(time_scale.is_finite() && time_scale > 0.0) {
        anyhow::bail!("--time-scale must be a positive number, got {time_scale}");
    }
    let mut config = SimConfig::scaled(time_scale);
    config.addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for n in nodes {
        config.extra_node_classes.insert(n, false);
    }
    for f in &fault {
        match f.as_str() {
            "hang-after-accept" => config.faults.hang_after_accept = true,
            "hang-mid-node" => config.faults.hang_mid_node = Some(HangMidNode::default()),
            "stuck-node" => {
                config.faults.hang_mid_node = Some(HangMidNode {
                    class_type: None,
                    ignore_interrupt: true,
                })
            }
            "silent-websocket" => config.faults.silent_websocket = true,
            "old-interrupt" => config.faults.interrupt_ignores_prompt_id = true,
            other => anyhow::bail!(
                "unknown fault {other:?} (hang-after-accept, hang-mid-node, stuck-node, silent-websocket, old-interrupt)"
            ),
        }
    }
    let sim = ComfyUiSim::start(config)
        .await
        .map_err(|e| anyhow::anyhow!("binding 127.0.0.1:{port}: {e}"))?;
    println!("ComfyUI simulator listening on {}", sim.base_url());
    tokio::signal::ctrl_c().await?;
    sim.shutdown().await;
    Ok(0)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log)?)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let code = runtime.block_on(async {
        if let Command::Demo(args) = cli.command {
            return demo::run(args, cli.store).await;
        }
        if let Command::Worker { config } = &cli.command {
            return worker(config, cli.store.clone()).await;
        }
        if let Command::Sim(cmd) = cli.command {
            return sim(cmd).await;
        }
        let url = cli
            .store
            .unwrap_or_else(|| comfyfleet::DEFAULT_STORE.to_owned());
        let db = comfyfleet::sqlite_path(&url);
        let store = comfyfleet::open_store(&url).await?;
        match cli.command {
            Command::Demo(_) | Command::Worker { .. } | Command::Sim(_) => {
                unreachable!("handled above")
            }
            Command::Jobs(a) => store_cmds::jobs(store, a).await,
            Command::Job { id, json } => store_cmds::job(store, id, json).await,
            Command::Cancel { ids, force, json } => {
                store_cmds::cancel(store, ids, force, json).await
            }
            Command::Reap {
                dry_run,
                max_age,
                max_crash_requeues,
                json,
            } => {
                store_cmds::reap(
                    store,
                    db.as_deref(),
                    dry_run,
                    max_age,
                    max_crash_requeues,
                    json,
                )
                .await
            }
            Command::Backup { path } => store_cmds::backup(store, &path).await,
            Command::Prune {
                older_than,
                no_backup,
            } => store_cmds::prune(store, db.as_deref(), older_than, no_backup).await,
        }
    })?;
    std::process::exit(code);
}

async fn worker(path: &std::path::Path, store: Option<String>) -> Result<i32> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: comfyfleet::FleetConfig = toml::from_str(&text)
        .with_context(|| format!("{}: invalid fleet configuration", path.display()))?;
    if let Some(url) = store {
        config.store = url;
    }
    let fleet = comfyfleet::Fleet::start(config).await?;
    eprintln!("comfyfleet worker: running; Ctrl-C to stop");
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    eprintln!("comfyfleet worker: shutting down");
    fleet.shutdown().await;
    Ok(0)
}
