//! `comfyfleet`: the command line.
//!
//! For now it has `demo`, which runs a batch of jobs through the engine on three simulated
//! backends (one of them hangs on its first prompts, so you can watch a failover) with a
//! progress bar per job, and exits 0 once every job succeeded.

mod demo;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a batch of jobs on built-in simulated backends (no setup needed) and show their
    /// progress; one backend hangs on its first prompts, so you see a failover.
    Demo(demo::DemoArgs),
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
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
        }
    })?;
    std::process::exit(code);
}
