//! `comfyfleet`: the command line.
//!
//! * `serve` runs the fleet and its HTTP service (API, live events, dashboard) from a
//!   configuration file; `worker` runs only the engine.
//! * `submit`, `run`, `backends` talk to a service (`--server URL`, token from
//!   `COMFYFLEET_TOKEN`); `run` follows its jobs with a progress bar each.
//! * `jobs`, `job`, `cancel`, `events`, `reap`, `backup`, `prune` work on the local store (the
//!   SQLite database by default, `--store` or `COMFYFLEET_STORE` to choose) unless `--server`
//!   is given; then they go through the API.
//! * `install-nodes` installs custom-node packs (and models) on an SSH instance and follows the
//!   install with a bar per pack; `installs` lists, shows, follows and cancels installs. Both
//!   run in this process on a fleet from `--config`, or on the service with `--server`.
//! * `demo` runs a batch on three built-in ComfyUI simulators (one faulty) with the service up;
//!   `sim comfyui` runs one simulator standalone.

mod client;
mod config;
mod demo;
mod follow;
mod installs;
mod remote;
mod serve;
mod store_cmds;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use comfyfleet::JobId;
use secrecy::SecretString;

use crate::client::{Client, DEFAULT_SERVER, exit};

const EXIT_CODES: &str = "\
Exit codes: 0 success; 1 a job (install-nodes: an install) failed, or an error; 2 not found, a
usage error, or (run, install-nodes) a job / the install was cancelled;
3 the server refused the token; 4 the server could not be reached; 130 interrupted (Ctrl-C) while
following (the jobs keep running).

Environment: COMFYFLEET_SERVER (like --server), COMFYFLEET_TOKEN (the API token; never put it
on the command line), COMFYFLEET_STORE, COMFYFLEET_LOG, COMFYFLEET_CONFIG (like serve --config),
and COMFYFLEET_<SECTION>__<KEY> overrides of the configuration file (docs/configuration.md).";

#[derive(Debug, Parser)]
#[command(
    name = "comfyfleet",
    version,
    about = "Run ComfyUI workflows reliably on a fleet of backends",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `comfyfleet_engine=debug`.
    #[arg(long, global = true, env = "COMFYFLEET_LOG", default_value = "warn")]
    log: String,
    /// Where jobs are kept: `sqlite:PATH` (default: `sqlite:` = the user's data directory) or
    /// `memory:`.
    #[arg(long, global = true, env = "COMFYFLEET_STORE")]
    store: Option<String>,
    /// The comfyfleet service to talk to, e.g. `http://gpu-box:8330`. `submit`, `run` and
    /// `backends` default to http://127.0.0.1:8330; the other commands work on the local store
    /// without it. The token comes from `COMFYFLEET_TOKEN`.
    #[arg(long, global = true, env = "COMFYFLEET_SERVER", value_name = "URL")]
    server: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the fleet and its HTTP service (API, live events, dashboard, metrics) from a
    /// configuration file until Ctrl-C / SIGTERM.
    Serve(serve::ServeArgs),
    /// Submit a workflow to the service; prints the job id.
    Submit(remote::SubmitArgs),
    /// Submit workflows to the service and follow them with a progress bar each; exits 0 if all
    /// succeeded, 1 if any failed, 2 if any was cancelled.
    Run(remote::RunArgs),
    /// Print job events: stored ones, or live with `--follow` (of one job: until it ends).
    Events(remote::EventsArgs),
    /// The service's backends; `drain ID` / `enable ID` stop and resume sending them work.
    Backends(remote::BackendsArgs),
    /// Run a batch of jobs on three built-in ComfyUI simulators (no setup needed; one of them
    /// hangs, so you see a failover) with the service and dashboard up, and show their
    /// progress. Uses a fresh SQLite database in a temporary directory unless `--store` is
    /// given. `--serve` keeps the service up afterwards until Ctrl-C.
    Demo(demo::DemoArgs),
    /// Install custom-node packs (and model files) on an SSH instance, then restart ComfyUI and
    /// verify the packs' node classes; follows the install with a bar per pack. Exits 0 if it
    /// succeeded, 1 if any pack failed, 2 if cancelled (Ctrl-C cancels it). Runs in this
    /// process on the fleet of `--config`, or on the service with `--server`.
    InstallNodes(installs::InstallNodesArgs),
    /// Custom-node installs: `list` (default), `get ID`, `follow ID`, `cancel ID`,
    /// `packs INSTANCE`.
    Installs(installs::InstallsArgs),
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
        /// Jobs whose orchestrator died this many times are failed, not requeued (local store
        /// only; default 3).
        #[arg(long)]
        max_crash_requeues: Option<u32>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Write a consistent copy of the store to a new file (with `--server`: into the service's
    /// backups directory, on the server).
    Backup {
        /// Destination (must not exist); not with `--server`.
        path: Option<PathBuf>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete finished jobs older than `--older-than` (default 30d), after a backup.
    Prune {
        /// Age of finished jobs to delete (e.g. `30d`, `12h`).
        #[arg(long, default_value = "30d", value_parser = store_cmds::parse_duration)]
        older_than: Duration,
        /// Skip the automatic backup.
        #[arg(long)]
        no_backup: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
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
        /// A ComfyUI `custom_nodes` directory: each pack folder whose `__init__.py` defines
        /// `NODE_CLASS_MAPPINGS` adds its classes (`python_module` `custom_nodes.<folder>`).
        /// Rescanned at every restart (`GET /api/manager/reboot`).
        #[arg(long, value_name = "DIR")]
        custom_nodes: Option<std::path::PathBuf>,
    },
    /// A RunningHub OpenAPI simulator (create / status / outputs / cancel, uploads, account and
    /// queue status, the `netWssUrl` socket; codes 804/805/806/807/813/814). Prints its base URL
    /// and the API key to use.
    Runninghub {
        /// Port on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 8189)]
        port: u16,
        /// Time factor for simulated work (1.0: real time, a task queues 1 s and runs 5 s; 0.1:
        /// ten times faster).
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// The API key it accepts (others answer 401).
        #[arg(long, default_value = "sim-api-key")]
        key: String,
        /// The key's concurrency limit: a create beyond it answers 814.
        #[arg(long, default_value_t = 1)]
        limit: usize,
        /// Faults: silent-websocket, hang-websocket, slow-proxy, hang-tasks, fail-tasks,
        /// flaky-http, malformed-json, user-not-found (unknown keys get 806 instead of 401).
        #[arg(long, value_delimiter = ',')]
        fault: Vec<String>,
    },
}

async fn sim(cmd: SimCommand) -> Result<i32> {
    use comfyfleet::testkit::comfyui_sim::{ComfyUiSim, HangMidNode, SimConfig};
    use comfyfleet::testkit::runninghub_sim::{
        ApiKeyConfig, HttpErrors, RunningHubSim, RunningHubSimConfig, Trigger, UnknownKeyAnswer,
    };
    let check_scale = |time_scale: f64| {
        if time_scale.is_finite() && time_scale > 0.0 {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "--time-scale must be a positive number, got {time_scale}"
            ))
        }
    };
    match cmd {
        SimCommand::Comfyui {
            port,
            nodes,
            fault,
            time_scale,
            custom_nodes,
        } => {
            check_scale(time_scale)?;
            let mut config = SimConfig::scaled(time_scale);
            if let Some(dir) = custom_nodes {
                if !dir.is_dir() {
                    anyhow::bail!("--custom-nodes {}: not a directory", dir.display());
                }
                config = config.custom_nodes_dir(dir);
            }
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
            let mut stop = Interrupt::shutdown()?;
            let sim = ComfyUiSim::start(config)
                .await
                .map_err(|e| anyhow::anyhow!("binding 127.0.0.1:{port}: {e}"))?;
            println!("ComfyUI simulator listening on {}", sim.base_url());
            stop.recv().await;
            sim.shutdown().await;
        }
        SimCommand::Runninghub {
            port,
            time_scale,
            key,
            limit,
            fault,
        } => {
            check_scale(time_scale)?;
            let key = key.trim().to_owned();
            if key.is_empty() {
                anyhow::bail!("--key must not be empty");
            }
            if limit == 0 {
                anyhow::bail!("--limit must be at least 1");
            }
            let mut config = RunningHubSimConfig::scaled(time_scale).port(port);
            config.keys.clear();
            config
                .keys
                .insert(key.clone(), ApiKeyConfig::with_limit(limit));
            for f in &fault {
                match f.as_str() {
                    "silent-websocket" => config.faults.silent_websocket = true,
                    "hang-websocket" => config.faults.hang_websocket_handshake = true,
                    // Seed 000: a slow proxy in front of everything.
                    "slow-proxy" => config.faults.proxy_delay = Duration::from_millis(500),
                    "hang-tasks" => config.faults.hang_tasks = Trigger::Always,
                    "fail-tasks" => config.faults.fail_tasks = Trigger::Always,
                    "flaky-http" => {
                        config.faults.http_errors = Some(HttpErrors {
                            status: 502,
                            trigger: Trigger::Probability(0.2),
                            path_contains: None,
                        })
                    }
                    "malformed-json" => config.faults.malformed_json = Trigger::Probability(0.2),
                    "user-not-found" => config.unknown_key = UnknownKeyAnswer::UserNotFound806,
                    other => anyhow::bail!(
                        "unknown fault {other:?} (silent-websocket, hang-websocket, slow-proxy, hang-tasks, fail-tasks, flaky-http, malformed-json, user-not-found)"
                    ),
                }
            }
            let mut stop = Interrupt::shutdown()?;
            let sim = RunningHubSim::start(config)
                .await
                .map_err(|e| anyhow::anyhow!("binding 127.0.0.1:{port}: {e}"))?;
            println!("RunningHub simulator listening on {}", sim.base_url());
            // The simulator's own key, not a secret: printed so a client can be pointed at it.
            println!("API key: {key}");
            stop.recv().await;
            sim.shutdown().await;
        }
    }
    Ok(0)
}

/// The API client for `--server` (or the default address), with the token from the environment.
fn client_for(server: Option<&str>) -> Result<Client> {
    let token = std::env::var(config::TOKEN_VAR)
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(SecretString::from);
    Ok(Client::new(server.unwrap_or(DEFAULT_SERVER), token)?)
}

async fn dispatch(cli: Cli) -> Result<i32> {
    let server = cli.server.clone();
    match cli.command {
        Command::Serve(args) => return serve::run(args, cli.store).await,
        Command::Demo(args) => return demo::run(args, cli.store).await,
        Command::Worker { config } => return worker(&config, cli.store).await,
        Command::Sim(cmd) => return sim(cmd).await,
        Command::Submit(a) => return remote::submit(&client_for(server.as_deref())?, a).await,
        Command::Run(a) => return remote::run(&client_for(server.as_deref())?, a).await,
        Command::Backends(a) => return remote::backends(&client_for(server.as_deref())?, a).await,
        Command::InstallNodes(a) => {
            let client = match server.as_deref() {
                Some(s) => Some(client_for(Some(s))?),
                None => None,
            };
            return installs::install_nodes(a, client.as_ref(), cli.store).await;
        }
        Command::Installs(a) => {
            return match server.as_deref() {
                Some(s) => installs::installs_remote(&client_for(Some(s))?, a).await,
                None => installs::installs_local(a, cli.store).await,
            };
        }
        Command::Events(a) if server.is_some() => {
            return remote::events(&client_for(server.as_deref())?, a).await;
        }
        _ => {}
    }
    if let Some(server) = server {
        let c = client_for(Some(&server))?;
        return match cli.command {
            Command::Jobs(a) => remote::jobs(&c, a).await,
            Command::Job { id, json } => remote::job(&c, id, json).await,
            Command::Cancel { ids, force, json } => remote::cancel(&c, ids, force, json).await,
            Command::Reap {
                dry_run,
                max_age,
                max_crash_requeues,
                json,
            } => {
                if max_crash_requeues.is_some() {
                    bail!(
                        "--max-crash-requeues works on the local store only (the service uses its own setting)"
                    );
                }
                remote::reap(&c, dry_run, max_age, json).await
            }
            Command::Backup { path, json } => {
                if let Some(p) = path {
                    bail!(
                        "with --server the service writes the backup into its own backups directory; drop {}",
                        p.display()
                    );
                }
                remote::backup(&c, json).await
            }
            Command::Prune {
                older_than,
                no_backup,
                json,
            } => remote::prune(&c, older_than, no_backup, json).await,
            _ => unreachable!("handled above"),
        };
    }
    let url = cli
        .store
        .unwrap_or_else(|| comfyfleet::DEFAULT_STORE.to_owned());
    let db = comfyfleet::sqlite_path(&url);
    let store = comfyfleet::open_store(&url).await?;
    match cli.command {
        Command::Jobs(a) => store_cmds::jobs(store, a).await,
        Command::Job { id, json } => store_cmds::job(store, id, json).await,
        Command::Cancel { ids, force, json } => store_cmds::cancel(store, ids, force, json).await,
        Command::Events(a) => {
            store_cmds::events(store, a.job, a.follow, a.after, a.limit, a.json).await
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
                max_crash_requeues.unwrap_or(3),
                json,
            )
            .await
        }
        Command::Backup { path, json } => {
            let Some(path) = path else {
                bail!(
                    "backup needs a destination PATH (or --server to back up the service's database)"
                );
            };
            store_cmds::backup(store, &path, json).await
        }
        Command::Prune {
            older_than,
            no_backup,
            json,
        } => store_cmds::prune(store, db.as_deref(), older_than, no_backup, json).await,
        _ => unreachable!("handled above"),
    }
}

/// `comfyfleet jobs | head` closes our stdout early; `println!` then panics. Exit quietly the
/// way a program killed by SIGPIPE would (128 + 13) instead of printing a panic. (Restoring
/// the SIGPIPE default would need `unsafe` libc calls, which the workspace forbids.)
fn exit_quietly_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() {
    exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    // A local install runs a whole fleet in this process, whose engine warns about every
    // failed health check while ComfyUI restarts; the install's own progress says what matters.
    // So local installs log errors only unless asked otherwise.
    let local_install = cli.server.is_none()
        && matches!(cli.command, Command::InstallNodes(_) | Command::Installs(_));
    let log = if local_install && cli.log == "warn" {
        "error"
    } else {
        cli.log.as_str()
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: --log {:?}: {e}", cli.log);
            std::process::exit(exit::FAILED);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(exit::FAILED);
        }
    };
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<installs::UsageError>().is_some() {
                installs::USAGE
            } else {
                remote::exit_code_of(&e).unwrap_or(exit::FAILED)
            }
        }
    };
    // Background tasks (event followers, simulators) must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_millis(200));
    std::process::exit(code);
}

/// Ctrl-C (and, for services, SIGTERM), listened for from the moment this is made: a signal
/// that arrives before the program gets round to waiting is not lost (and does not kill the
/// process the default way).
pub struct Interrupt {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Interrupt")
    }
}

impl Interrupt {
    /// Ctrl-C only (following commands).
    pub fn ctrl_c() -> Result<Interrupt> {
        Self::make(false)
    }

    /// Ctrl-C or SIGTERM (services).
    pub fn shutdown() -> Result<Interrupt> {
        Self::make(true)
    }

    #[cfg(unix)]
    fn make(term: bool) -> Result<Interrupt> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Interrupt {
            int: signal(SignalKind::interrupt())?,
            term: if term {
                Some(signal(SignalKind::terminate())?)
            } else {
                None
            },
        })
    }

    #[cfg(not(unix))]
    fn make(_term: bool) -> Result<Interrupt> {
        Ok(Interrupt {})
    }

    /// Waits for the signal.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        match &mut self.term {
            Some(term) => {
                tokio::select! {
                    _ = self.int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            None => {
                self.int.recv().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn worker(path: &std::path::Path, store: Option<String>) -> Result<i32> {
    let config = config::load_for_worker(path, store)?;
    let mut stop = Interrupt::shutdown()?;
    let fleet = comfyfleet::Fleet::start(config).await?;
    eprintln!("comfyfleet worker: running; Ctrl-C to stop");
    stop.recv().await;
    eprintln!("comfyfleet worker: shutting down");
    fleet.shutdown().await;
    Ok(0)
}
