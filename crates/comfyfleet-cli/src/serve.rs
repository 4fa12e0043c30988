//! `comfyfleet serve`: the fleet (engine over the configured store and backends) plus the HTTP
//! service in front of it, until Ctrl-C / SIGTERM. The configuration is read by
//! [`crate::config`]; the service itself is `comfyfleet-server`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use comfyfleet::Fleet;
use comfyfleet_server::Server;

use crate::config;

/// Options of `comfyfleet serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The configuration file (TOML: `store`, `[[backends]]`, `[engine]`, `[server]`); without
    /// it, defaults and `COMFYFLEET_…` variables only.
    #[arg(long, env = "COMFYFLEET_CONFIG")]
    config: Option<PathBuf>,
    /// Listen here instead of `server.bind` (e.g. `0.0.0.0:8330`; `127.0.0.1:0`: any free port).
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Check the configuration, print it (secrets redacted) and exit.
    #[arg(long)]
    check: bool,
}

/// What `serve` and `demo` print once the service is up.
pub fn announce(server: &Server, auth_on: bool, tokens: usize) {
    let url = server.url();
    let url = url.trim_end_matches('/');
    println!("comfyfleet serve: dashboard at {url}/");
    println!("API: {url}/v1 (OpenAPI document: {url}/v1/openapi.json)");
    if auth_on {
        println!(
            "auth: on ({tokens} token{}; clients send `Authorization: Bearer <token>`, the CLI reads COMFYFLEET_TOKEN)",
            if tokens == 1 { "" } else { "s" }
        );
    } else {
        println!("auth: off (no token configured, so only loopback addresses are allowed)");
    }
}

/// Runs `serve`; returns the exit code.
pub async fn run(args: ServeArgs, store: Option<String>) -> Result<i32> {
    let config = config::load(config::Sources {
        file: args.config.as_deref(),
        store,
        bind: args.bind,
    })?;
    if args.check {
        println!("configuration OK\n{config:#?}");
        return Ok(0);
    }
    let mut stop = crate::Interrupt::shutdown()?;
    let fleet = Fleet::start(config.fleet())
        .await
        .context("starting the fleet")?;
    let server = match Server::start_with_installer(
        fleet.engine().clone(),
        fleet.installer().cloned(),
        config.server.clone(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            fleet.shutdown().await;
            return Err(anyhow::Error::new(e).context("starting the HTTP service"));
        }
    };
    announce(&server, config.auth_on(), config.server.tokens.len());
    println!("store: {}", config.store);
    let backends: Vec<String> = fleet
        .engine()
        .backends()
        .iter()
        .map(|b| format!("{} ({})", b.id, b.kind))
        .collect();
    if backends.is_empty() {
        println!("backends: none configured (jobs will wait)");
    } else {
        println!("backends: {}", backends.join(", "));
    }
    if let Some(installer) = fleet.installer() {
        println!(
            "installs: /v1/installs on {} (`comfyfleet install-nodes --server …`)",
            installer.instances().join(", ")
        );
    }
    eprintln!("comfyfleet serve: running; Ctrl-C to stop");
    stop.recv().await;
    eprintln!("comfyfleet serve: shutting down");
    server.shutdown().await;
    fleet.shutdown().await;
    Ok(0)
}
