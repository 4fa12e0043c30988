//! `install-nodes` and `installs`: custom-node installs on the fleet's SSH instances.
//!
//! `install-nodes` builds an install spec from the command line (or `--spec FILE`), checks it
//! before anything starts, then runs it — in this process on a fleet built from `--config`
//! (local mode), or on the service (`--server`: `POST /v1/installs`, then its event stream) —
//! and follows it with one bar per pack plus an overall bar. `installs` lists, shows, follows
//! and cancels installs and shows an instance's recorded packs.
//!
//! The installer itself (SSH, scripts, verification) lives in `comfyfleet-ssh`; what an install
//! is, in `comfyfleet-core::install`. Only redacted records are printed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use comfyfleet::core::InstallId;
use comfyfleet::core::install::{
    InstallEvent, InstallEventKind, InstallFilter, InstallPhase, InstallRecord, InstallSpec,
    InstallState, InstalledPack, ModelSpec, ModelStatus, NodeProgress, NodeSpec, NodeStatus,
    RequirementsStatus,
};
use comfyfleet::{BackendConfig, FleetConfig, InstallError, SshInstaller};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use crate::client::{Client, ClientError, exit};

/// A mistake in the command line or the spec: nothing was started. Exits 2, like clap's own
/// usage errors.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The exit code of usage errors.
pub const USAGE: i32 = 2;

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// Options of `install-nodes`.
#[derive(Debug, clap::Args)]
pub struct InstallNodesArgs {
    /// The instance to install on (the id of a `kind = "ssh"` backend).
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
    /// Node packs, installed in order: a git URL with an optional `@REF` (branch, tag or
    /// commit; `https://github.com/o/Pack.git@v1.2`, `file:///srv/Pack@main`,
    /// `git@github.com:o/Pack.git@abc123`) or a name from the install registry (`Name[@REF]`).
    #[arg(value_name = "PACK")]
    packs: Vec<String>,
    /// A model file to download: `URL=FOLDER[/FILE]` (FOLDER under `models/`, e.g.
    /// `checkpoints` or `loras/sdxl`; a last component with a `.` is the file name, else the
    /// URL's). Repeatable.
    #[arg(long = "model", value_name = "URL=FOLDER[/FILE]")]
    models: Vec<String>,
    /// A whole install spec (JSON: `{"instance", "nodes": [{"git", "rev", "name", "classes"}],
    /// "models": [{"url", "folder", "filename", "sha256"}], "restart"}`) instead of the
    /// arguments above (`--instance` may still override its instance).
    #[arg(long, value_name = "FILE.json", conflicts_with_all = ["packs", "models"])]
    spec: Option<PathBuf>,
    /// Do not restart ComfyUI afterwards (packs then end `installed`: unverified).
    #[arg(long)]
    no_restart: bool,
    /// Print the install's id and exit; it keeps running on the service (needs `--server`).
    #[arg(long)]
    detach: bool,
    /// Print the final record as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// The fleet configuration (local mode, without `--server`).
    #[arg(long, env = "COMFYFLEET_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Options of `installs`.
#[derive(Debug, clap::Args)]
pub struct InstallsArgs {
    #[command(subcommand)]
    action: Option<InstallsAction>,
    /// The fleet configuration (local mode: its store, and its instances for `cancel`,
    /// `follow`).
    #[arg(long, global = true, env = "COMFYFLEET_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// JSON output.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum InstallsAction {
    /// Installs, newest first (the default).
    List {
        /// Only this instance.
        #[arg(long)]
        instance: Option<String>,
        /// Only these states (comma separated: queued,running,succeeded,failed,cancelled).
        #[arg(long, value_delimiter = ',', value_parser = parse_state)]
        state: Vec<InstallState>,
        /// At most this many (1–1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One install: per-pack results and the log tail.
    Get {
        /// The install id.
        id: InstallId,
    },
    /// Follow an install until it ends (Ctrl-C cancels it).
    Follow {
        /// The install id.
        id: InstallId,
    },
    /// Cancel an install: the remote command is killed, unfinished packs end `cancelled`.
    Cancel {
        /// The install id.
        id: InstallId,
    },
    /// The packs recorded (verified) on an instance.
    Packs {
        /// The instance.
        instance: String,
    },
}

fn parse_state(s: &str) -> Result<InstallState, String> {
    InstallState::parse(s.trim()).ok_or_else(|| {
        format!("{s:?} is not a state (queued, running, succeeded, failed, cancelled)")
    })
}

/// Splits `PACK[@REF]`. The `@` of a ref comes after the URL's host part, so `user@host:path`
/// and `https://user@host/…` keep theirs.
pub fn parse_pack(arg: &str) -> NodeSpec {
    let arg = arg.trim();
    let path_start = match arg.find("://") {
        Some(i) => arg[i + 3..].find('/').map(|j| i + 3 + j),
        None => match (arg.find('@'), arg.find(':')) {
            // scp-like `user@host:path`: the path starts after the first `:`.
            (Some(at), Some(colon)) if at < colon => Some(colon),
            // A registry name.
            _ => Some(0),
        },
    };
    let (source, rev) = match (arg.rfind('@'), path_start) {
        (Some(at), Some(start)) if at > start => (&arg[..at], Some(arg[at + 1..].to_owned())),
        _ => (arg, None),
    };
    let is_url = source.contains("://") || source.contains(':');
    NodeSpec {
        name: (!is_url).then(|| source.to_owned()),
        git: is_url.then(|| source.to_owned()),
        rev,
        classes: Vec::new(),
    }
}

/// Parses `URL=FOLDER[/FILE]`.
pub fn parse_model(arg: &str) -> Result<ModelSpec, String> {
    let (url, dest) = arg
        .rsplit_once('=')
        .filter(|(u, d)| !u.is_empty() && !d.is_empty())
        .ok_or_else(|| format!("--model {arg:?}: expected URL=FOLDER[/FILE]"))?;
    let (folder, filename) = match dest.rsplit_once('/') {
        Some((folder, last)) if last.contains('.') => (folder.to_owned(), Some(last.to_owned())),
        _ => (dest.to_owned(), None),
    };
    Ok(ModelSpec {
        url: url.to_owned(),
        folder,
        filename,
        sha256: None,
    })
}

/// The spec the arguments ask for, checked; nothing has run when this fails.
fn build_spec(a: &InstallNodesArgs) -> Result<InstallSpec> {
    let mut spec = match &a.spec {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage(format!("--spec {}: {e}", path.display())))?;
            let mut spec: InstallSpec = serde_json::from_str(&text).map_err(|e| {
                usage(format!(
                    "--spec {}: not an install spec: {e}",
                    path.display()
                ))
            })?;
            if let Some(i) = &a.instance {
                spec.instance = i.clone();
            }
            spec
        }
        None => {
            let Some(instance) = &a.instance else {
                return Err(usage("--instance NAME is required (or give --spec FILE)"));
            };
            if a.packs.is_empty() && a.models.is_empty() {
                return Err(usage("nothing to install: give PACK arguments or --model"));
            }
            let models = a
                .models
                .iter()
                .map(|m| parse_model(m).map_err(usage))
                .collect::<Result<Vec<_>>>()?;
            InstallSpec {
                instance: instance.clone(),
                nodes: a.packs.iter().map(|p| parse_pack(p)).collect(),
                models,
                restart: true,
            }
        }
    };
    if a.no_restart {
        spec.restart = false;
    }
    spec.validate().map_err(|e| {
        let msg = e.to_string();
        // Point at the argument the field came from.
        let arg = msg
            .strip_prefix("nodes[")
            .and_then(|r| r.split(']').next())
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|_| a.spec.is_none())
            .and_then(|i| a.packs.get(i));
        match arg {
            Some(arg) => usage(format!("invalid install: {msg} (pack argument {arg:?})")),
            None => usage(format!("invalid install: {msg}")),
        }
    })?;
    Ok(spec)
}

/// `install-nodes`.
pub async fn install_nodes(
    a: InstallNodesArgs,
    server: Option<&Client>,
    store: Option<String>,
) -> Result<i32> {
    let spec = build_spec(&a)?;
    // Listening from here on: a Ctrl-C right after the install started must cancel it, not
    // kill this process the default way.
    let interrupt = crate::Interrupt::ctrl_c()?;
    match server {
        Some(client) => {
            let record: InstallRecord = match client
                .post("v1/installs", &[], &serde_json::to_value(&spec)?)
                .await
            {
                Ok(r) => r,
                // The service refused the spec (unknown instance or pack, invalid field).
                Err(ClientError::Api {
                    status: 400 | 404 | 422,
                    message,
                    ..
                }) => return Err(usage(message)),
                Err(e) => return Err(e.into()),
            };
            if a.detach {
                print_started(&record, a.json)?;
                return Ok(0);
            }
            follow_remote(client, record.id, a.json, interrupt).await
        }
        None => {
            if a.detach {
                return Err(usage(
                    "--detach needs --server: a local install runs in this process (start `comfyfleet serve` and pass --server URL)",
                ));
            }
            let Some(path) = a.config.as_deref() else {
                return Err(usage(
                    "install-nodes needs --config FILE (the fleet with the instance) or --server URL",
                ));
            };
            let config = crate::config::load_for_worker(path, store)?;
            precheck(&config, &spec)?;
            // Only the installer: this process must not take jobs from a shared store.
            match start_installer(&config).await? {
                Some(installer) => {
                    let code = match installer.start(spec).await {
                        Ok(record) => follow_local(&installer, record.id, a.json, interrupt).await,
                        Err(e) => Err(install_error(e)),
                    };
                    installer.shutdown();
                    code
                }
                None => Err(usage("the configuration has no `kind = \"ssh\"` instances")),
            }
        }
    }
}

/// What can be checked against the configuration before anything starts: the instance exists,
/// registry names are in the registry.
fn precheck(config: &FleetConfig, spec: &InstallSpec) -> Result<()> {
    let instances: Vec<&str> = config
        .backends
        .iter()
        .filter_map(|b| match b {
            BackendConfig::Ssh(s) => Some(s.id.as_str()),
            _ => None,
        })
        .collect();
    if !instances.contains(&spec.instance.as_str()) {
        return Err(usage(if instances.is_empty() {
            format!(
                "unknown instance {:?}: the configuration has no `kind = \"ssh\"` instances",
                spec.instance
            )
        } else {
            format!(
                "unknown instance {:?} (configured: {})",
                spec.instance,
                instances.join(", ")
            )
        }));
    }
    let registry = match &config.install_registry {
        Some(p) => comfyfleet::Registry::from_file(p).map_err(|e| usage(e.to_string()))?,
        None => comfyfleet::Registry::default(),
    };
    for (i, n) in spec.nodes.iter().enumerate() {
        if n.git.is_none()
            && let Some(name) = &n.name
            && !registry.packs.contains_key(name)
        {
            return Err(usage(format!(
                "nodes[{i}]: {name:?} is not in the install registry{}; give a git URL",
                if config.install_registry.is_none() {
                    " (none is configured: install_registry)"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(())
}

async fn start_installer(config: &FleetConfig) -> Result<Option<SshInstaller>> {
    comfyfleet::start_installer(config)
        .await
        .context("setting up the SSH instances")
}

fn install_error(e: InstallError) -> anyhow::Error {
    match e {
        InstallError::InvalidSpec(_)
        | InstallError::UnknownInstance(_)
        | InstallError::UnknownPack { .. }
        | InstallError::NotFound(_) => usage(e.to_string()),
        e => anyhow::Error::new(e),
    }
}

fn print_started(record: &InstallRecord, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&record.redacted())?);
    } else {
        println!("{}", record.id);
    }
    Ok(())
}

/// The exit code of a finished install: 0 succeeded, 1 failed, 2 cancelled (as `run`).
pub fn exit_code(state: InstallState) -> i32 {
    match state {
        InstallState::Succeeded => 0,
        InstallState::Failed => exit::FAILED,
        _ => exit::NOT_FOUND_OR_CANCELLED,
    }
}

/// Follows an install run by `installer` (in this process) from its first event.
async fn follow_local(
    installer: &SshInstaller,
    id: InstallId,
    json: bool,
    mut interrupt: crate::Interrupt,
) -> Result<i32> {
    let record = installer.get(id).await.map_err(install_error)?;
    let mut view = InstallView::new(&record)?;
    let mut live = installer.subscribe();
    let mut after = 0;
    let mut cancelled = false;
    loop {
        let events = installer
            .events(id, after, 1000)
            .await
            .map_err(install_error)?;
        let mut finished = false;
        for e in &events {
            after = e.seq;
            finished |= view.apply(e);
        }
        if finished {
            break;
        }
        if events.len() == 1000 {
            continue;
        }
        tokio::select! {
            // Any event of this install (or a second, or a lag) means: read the store again.
            _ = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match live.recv().await {
                        Ok(e) if e.install == id => return,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }) => {}
            _ = interrupt.recv(), if !cancelled => {
                cancelled = true;
                view.line("interrupted: cancelling the install (the remote command is killed)");
                if let Err(e) = installer.cancel(id).await {
                    view.line(format!("cancel: {e}"));
                }
            }
        }
    }
    let record = installer.get(id).await.map_err(install_error)?;
    view.clear();
    finish_output(&record, json)
}

/// Follows an install on the service through its event stream, falling back to reading the
/// record when the stream cannot be kept up.
async fn follow_remote(
    client: &Client,
    id: InstallId,
    json: bool,
    mut interrupt: crate::Interrupt,
) -> Result<i32> {
    let record: InstallRecord = client.get(&format!("v1/installs/{id}"), &[]).await?;
    let mut view = InstallView::new(&record)?;
    let mut cancelled = false;
    if !record.state.is_terminal() {
        let mut es = client.events(&format!("v1/installs/{id}/events"), Some(0));
        loop {
            tokio::select! {
                ev = es.next() => match ev {
                    Ok(ev) => {
                        let Ok(e) = serde_json::from_str::<InstallEvent>(&ev.data) else {
                            continue; // keep-alives, `lagged` notices, types this build lacks
                        };
                        if view.apply(&e) {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(install = %id, error = %e, "event stream lost; polling the record");
                        poll_until_done(client, id).await?;
                        break;
                    }
                },
                _ = interrupt.recv(), if !cancelled => {
                    cancelled = true;
                    view.line("interrupted: cancelling the install (the remote command is killed)");
                    if let Err(e) = client
                        .post::<Value>(&format!("v1/installs/{id}/cancel"), &[], &json!({}))
                        .await
                    {
                        view.line(format!("cancel: {e}"));
                    }
                }
            }
        }
    }
    let record: InstallRecord = client.get(&format!("v1/installs/{id}"), &[]).await?;
    view.clear();
    finish_output(&record, json)
}

async fn poll_until_done(client: &Client, id: InstallId) -> Result<()> {
    let mut failures = 0;
    loop {
        match client
            .get::<InstallRecord>(&format!("v1/installs/{id}"), &[])
            .await
        {
            Ok(r) if r.state.is_terminal() => return Ok(()),
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures >= 30 || e.exit_code() == exit::NOT_FOUND_OR_CANCELLED {
                    return Err(e.into());
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn finish_output(record: &InstallRecord, json: bool) -> Result<i32> {
    let record = record.redacted();
    if json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        print_summary(&record);
    }
    Ok(exit_code(record.state))
}

/// The bars of one install: one per pack, and an overall one (packs processed / total, the
/// phase and the last output line). Plain lines on stderr when it is not a terminal.
struct InstallView {
    mp: MultiProgress,
    tty: bool,
    overall: ProgressBar,
    packs: Vec<ProgressBar>,
    names: Vec<String>,
    nodes: Vec<NodeProgress>,
    phase: InstallPhase,
    last_line: String,
    short: String,
}

fn status_step(s: NodeStatus) -> u64 {
    match s {
        NodeStatus::Pending => 0,
        NodeStatus::Fetching => 1,
        NodeStatus::Requirements => 2,
        NodeStatus::Installed => 3,
        NodeStatus::Succeeded | NodeStatus::Failed | NodeStatus::Cancelled => 4,
    }
}

fn status_text(n: &NodeProgress) -> String {
    match n.status {
        NodeStatus::Pending => "pending".into(),
        NodeStatus::Fetching => "fetching".into(),
        NodeStatus::Requirements => "requirements".into(),
        NodeStatus::Installed if n.already_present => "installed (already present)".into(),
        NodeStatus::Installed => "installed".into(),
        NodeStatus::Succeeded => format!("✓ succeeded: {}", n.classes.join(", ")),
        NodeStatus::Failed => format!("✗ failed: {}", n.error.as_deref().unwrap_or("")),
        NodeStatus::Cancelled => "cancelled".into(),
    }
}

fn phase_text(p: InstallPhase) -> &'static str {
    match p {
        InstallPhase::Queued => "queued",
        InstallPhase::Connecting => "connecting",
        InstallPhase::Nodes => "installing packs",
        InstallPhase::Models => "downloading models",
        InstallPhase::Restarting => "restarting ComfyUI",
        InstallPhase::Verifying => "verifying",
        InstallPhase::Done => "done",
    }
}

impl InstallView {
    fn new(record: &InstallRecord) -> Result<InstallView> {
        let tty = std::io::stderr().is_terminal();
        let mp = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let pack_style =
            ProgressStyle::with_template("{prefix:<28.bold} [{bar:8.cyan/blue}] {msg}")
                .context("progress bar template")?
                .progress_chars("=> ");
        let overall_style = ProgressStyle::with_template(
            "{prefix:<28.bold} [{bar:8.green/blue}] {pos}/{len} {msg}",
        )
        .context("progress bar template")?
        .progress_chars("=> ");
        let short = {
            let s = record.id.to_string();
            s[s.len().saturating_sub(8)..].to_owned()
        };
        let mut packs = Vec::new();
        let mut names = Vec::new();
        for n in &record.nodes {
            let pb = mp.add(ProgressBar::new(4));
            pb.set_style(pack_style.clone());
            pb.set_prefix(n.name.chars().take(28).collect::<String>());
            pb.set_position(status_step(n.status));
            pb.set_message(status_text(n));
            packs.push(pb);
            names.push(n.name.clone());
        }
        let overall = mp.add(ProgressBar::new(record.nodes.len() as u64));
        overall.set_style(overall_style);
        overall.set_prefix(format!("install {short} on {}", record.spec.instance));
        overall.set_position(record.counts().processed as u64);
        overall.set_message(phase_text(record.phase));
        let view = InstallView {
            mp,
            tty,
            overall,
            packs,
            names,
            nodes: record.nodes.clone(),
            phase: record.phase,
            last_line: String::new(),
            short,
        };
        if !tty {
            view.line(format!(
                "install {} on {}: {} pack(s), {} model(s)",
                record.id,
                record.spec.instance,
                record.nodes.len(),
                record.models.len()
            ));
        }
        Ok(view)
    }

    fn line(&self, s: impl Into<String>) {
        let s = s.into();
        if self.tty {
            let _ = self.mp.println(s);
        } else {
            eprintln!("{s}");
        }
    }

    fn refresh_overall(&self) {
        let processed = self.nodes.iter().filter(|n| n.status.is_done()).count();
        self.overall.set_position(processed as u64);
        let mut msg = phase_text(self.phase).to_owned();
        if !self.last_line.is_empty() {
            msg.push_str(" · ");
            msg.push_str(&self.last_line);
        }
        self.overall.set_message(msg);
    }

    /// Applies one event; true when it is the install's last.
    fn apply(&mut self, e: &InstallEvent) -> bool {
        match &e.kind {
            InstallEventKind::Created => {}
            InstallEventKind::Resumed { count } => {
                self.line(format!(
                    "{}: resumed after an orchestrator restart ({count})",
                    self.short
                ));
            }
            InstallEventKind::Phase { phase } => {
                self.phase = *phase;
                if !self.tty {
                    self.line(format!("{}: {}", self.short, phase_text(*phase)));
                }
            }
            InstallEventKind::Node { index, node } => {
                if let (Some(pb), Some(slot)) = (self.packs.get(*index), self.nodes.get_mut(*index))
                {
                    *slot = node.clone();
                    pb.set_position(status_step(node.status));
                    let text = status_text(node);
                    match node.status {
                        NodeStatus::Succeeded => pb.finish_with_message(text.clone()),
                        NodeStatus::Failed | NodeStatus::Cancelled => {
                            pb.abandon_with_message(text.clone())
                        }
                        _ => pb.set_message(text.clone()),
                    }
                    if !self.tty {
                        self.line(format!("{}: {text}", self.names[*index]));
                    }
                }
            }
            InstallEventKind::Model { model, .. } => {
                let text = match model.status {
                    ModelStatus::Failed => format!(
                        "model {}: failed: {}",
                        model.path,
                        model.error.as_deref().unwrap_or("")
                    ),
                    s => format!("model {}: {}", model.path, model_status(s)),
                };
                self.line(text);
            }
            InstallEventKind::Output { node, line } => {
                // Progress output (git, pip) redraws one line with `\r`: show what a terminal
                // would, the last part.
                let line = line
                    .rsplit('\r')
                    .find(|part| !part.trim().is_empty())
                    .unwrap_or("");
                let line: String = line.trim_end().chars().take(120).collect();
                if !self.tty {
                    let who = node
                        .and_then(|i| self.names.get(i))
                        .map(String::as_str)
                        .unwrap_or("install");
                    self.line(format!("  [{who}] {line}"));
                }
                self.last_line = line;
            }
            InstallEventKind::Finished { state, error } => {
                self.phase = InstallPhase::Done;
                self.last_line.clear();
                self.refresh_overall();
                let msg = match error {
                    Some(err) => format!("{state}: {err}"),
                    None => state.to_string(),
                };
                if *state == InstallState::Succeeded {
                    self.overall.finish_with_message(msg);
                } else {
                    self.overall.abandon_with_message(msg);
                }
                return true;
            }
        }
        self.refresh_overall();
        false
    }

    fn clear(&self) {
        self.mp.clear().ok();
    }
}

fn model_status(s: ModelStatus) -> &'static str {
    match s {
        ModelStatus::Pending => "pending",
        ModelStatus::Downloading => "downloading",
        ModelStatus::Succeeded => "in place",
        ModelStatus::Failed => "failed",
        ModelStatus::Cancelled => "cancelled",
    }
}

fn requirements_text(r: RequirementsStatus) -> &'static str {
    match r {
        RequirementsStatus::Unknown => "-",
        RequirementsStatus::None => "none",
        RequirementsStatus::Installing => "installing",
        RequirementsStatus::Installed => "installed",
        RequirementsStatus::Failed => "failed",
    }
}

/// The table at the end (stdout): one row per pack and model, then the outcome.
pub fn print_summary(r: &InstallRecord) {
    println!(
        "{:<28} {:<10} {:<10} {:<12} classes / error",
        "pack", "status", "commit", "requirements"
    );
    for n in &r.nodes {
        let status = match n.status {
            NodeStatus::Installed if n.already_present => "present".to_owned(),
            s => serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        };
        let detail = match (&n.error, n.classes.is_empty()) {
            (Some(e), _) => e.clone(),
            (None, false) => n.classes.join(", "),
            (None, true) => String::new(),
        };
        println!(
            "{:<28} {:<10} {:<10} {:<12} {detail}",
            n.name,
            status,
            n.commit
                .as_deref()
                .map(|c| c.chars().take(10).collect::<String>())
                .unwrap_or_else(|| "-".into()),
            requirements_text(n.requirements),
        );
    }
    for m in &r.models {
        println!(
            "model {:<22} {:<10} {}",
            m.path,
            model_status(m.status),
            m.error.as_deref().unwrap_or(&m.url)
        );
    }
    let c = r.counts();
    let mut outcome = format!(
        "install {} on {}: {} ({} of {} packs verified",
        r.id, r.spec.instance, r.state, c.succeeded, c.total
    );
    if c.failed > 0 {
        outcome.push_str(&format!(", {} failed", c.failed));
    }
    outcome.push(')');
    // "N of M packs failed" only repeats the counts; other errors (connection refused,
    // cancelled, a model) say something new.
    if let Some(e) = r.error.as_ref().filter(|e| !e.ends_with("packs failed")) {
        outcome.push_str(&format!(": {e}"));
    }
    println!("{outcome}");
}

fn print_list(list: &[InstallRecord]) {
    println!(
        "{:<36}  {:<12} {:<10} {:>5}  {:<24}  error",
        "install", "instance", "state", "packs", "created"
    );
    for r in list {
        let c = r.counts();
        println!(
            "{:<36}  {:<12} {:<10} {:>2}/{:<2}  {:<24}  {}",
            r.id,
            r.spec.instance,
            r.state,
            c.succeeded,
            c.total,
            r.created_at.to_string(),
            r.error.as_deref().unwrap_or("")
        );
    }
}

fn print_packs(packs: &[InstalledPack]) {
    println!("{:<28} {:<10} {:<40} classes", "pack", "commit", "git");
    for p in packs {
        println!(
            "{:<28} {:<10} {:<40} {}",
            p.name,
            p.commit.chars().take(10).collect::<String>(),
            p.git,
            p.classes.join(", ")
        );
    }
}

fn show(record: &InstallRecord, json: bool) -> Result<i32> {
    let record = record.redacted();
    if json {
        println!("{}", serde_json::to_string_pretty(&record)?);
        return Ok(0);
    }
    print_summary(&record);
    if !record.log_tail.is_empty() {
        println!("log tail:");
        for l in &record.log_tail {
            println!("  {l}");
        }
    }
    Ok(0)
}

/// `installs …` through the service.
pub async fn installs_remote(client: &Client, a: InstallsArgs) -> Result<i32> {
    let json = a.json;
    match a.action.unwrap_or(InstallsAction::List {
        instance: None,
        state: Vec::new(),
        limit: 50,
    }) {
        InstallsAction::List {
            instance,
            state,
            limit,
        } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(i) = instance {
                q.push(("instance", i));
            }
            if !state.is_empty() {
                let s: Vec<&str> = state.iter().map(|s| s.as_str()).collect();
                q.push(("state", s.join(",")));
            }
            let v: Value = client.get("v1/installs", &q).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let list = v.get("installs").cloned().unwrap_or(v);
            let list: Vec<InstallRecord> = serde_json::from_value(list)
                .context("unexpected answer from the server: install list")?;
            print_list(&list);
            Ok(0)
        }
        InstallsAction::Get { id } => {
            let r: InstallRecord = client.get(&format!("v1/installs/{id}"), &[]).await?;
            show(&r, json)
        }
        InstallsAction::Follow { id } => {
            follow_remote(client, id, json, crate::Interrupt::ctrl_c()?).await
        }
        InstallsAction::Cancel { id } => {
            let r: InstallRecord = client
                .post(&format!("v1/installs/{id}/cancel"), &[], &json!({}))
                .await?;
            cancelled(&r, json)
        }
        InstallsAction::Packs { instance } => {
            let v: Value = client
                .get(&format!("v1/instances/{instance}/packs"), &[])
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let list = v.get("packs").cloned().unwrap_or(v);
            let packs: Vec<InstalledPack> =
                serde_json::from_value(list).context("unexpected answer from the server: packs")?;
            print_packs(&packs);
            Ok(0)
        }
    }
}

fn cancelled(r: &InstallRecord, json: bool) -> Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(&r.redacted())?);
    } else {
        println!("{}: {}", r.id, r.state);
    }
    Ok(0)
}

/// `installs …` on the local store (and, for `cancel` and `follow`, a fleet built from
/// `--config`).
pub async fn installs_local(a: InstallsArgs, store: Option<String>) -> Result<i32> {
    let json = a.json;
    let config = match &a.config {
        Some(path) => Some(crate::config::load_for_worker(path, store.clone())?),
        None => None,
    };
    let url = store
        .or_else(|| config.as_ref().map(|c| c.store.clone()))
        .unwrap_or_else(|| comfyfleet::DEFAULT_STORE.to_owned());
    let action = a.action.unwrap_or(InstallsAction::List {
        instance: None,
        state: Vec::new(),
        limit: 50,
    });
    let needs_fleet = matches!(
        action,
        InstallsAction::Cancel { .. } | InstallsAction::Follow { .. }
    );
    if needs_fleet {
        let Some(config) = config else {
            return Err(usage(
                "`installs cancel` and `installs follow` need --config FILE (the fleet with the instance) or --server URL",
            ));
        };
        // Only the installer: no engine, and installs another process drives are not resumed
        // here (a cancel of one settles it in the store; its runner stops at its next write).
        let installer = start_installer(&config).await?;
        let result = match (installer.as_ref(), action) {
            (None, _) => Err(usage("the configuration has no `kind = \"ssh\"` instances")),
            (Some(i), InstallsAction::Cancel { id }) => match i.cancel(id).await {
                Ok(r) => cancelled(&r, json),
                Err(InstallError::Finished { id, state }) => {
                    Err(anyhow::anyhow!("install {id} is already {state}"))
                }
                Err(e) => Err(install_error(e)),
            },
            (Some(i), InstallsAction::Follow { id }) => match crate::Interrupt::ctrl_c() {
                Ok(int) => follow_local(i, id, json, int).await,
                Err(e) => Err(e),
            },
            (Some(_), _) => unreachable!("only cancel and follow need the fleet"),
        };
        if let Some(i) = &installer {
            i.shutdown();
        }
        return result;
    }
    let (_, store) = comfyfleet::open_stores(&url).await?;
    match action {
        InstallsAction::List {
            instance,
            state,
            limit,
        } => {
            if !(1..=1000).contains(&limit) {
                return Err(usage(format!("--limit must be 1 to 1000, got {limit}")));
            }
            let list = store
                .list_installs(&InstallFilter {
                    instance,
                    states: state,
                    before: None,
                    limit,
                })
                .await?;
            let list: Vec<InstallRecord> = list.iter().map(InstallRecord::redacted).collect();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"installs": list}))?
                );
            } else {
                print_list(&list);
            }
            Ok(0)
        }
        InstallsAction::Get { id } => match store.get_install(id).await? {
            Some(r) => show(&r, json),
            None => {
                eprintln!("error: install {id} not found");
                Ok(exit::NOT_FOUND_OR_CANCELLED)
            }
        },
        InstallsAction::Packs { instance } => {
            let packs = store.instance_packs(&instance).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"packs": packs}))?
                );
            } else {
                print_packs(&packs);
            }
            Ok(0)
        }
        InstallsAction::Cancel { .. } | InstallsAction::Follow { .. } => {
            unreachable!("handled above")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pack(arg: &str) -> (Option<String>, Option<String>, Option<String>) {
        let n = parse_pack(arg);
        (n.name, n.git, n.rev)
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    #[test]
    fn packs_split_at_the_ref_after_the_host() {
        let table = [
            (
                "https://github.com/o/Pack.git@v1.2",
                (None, s("https://github.com/o/Pack.git"), s("v1.2")),
            ),
            (
                "https://github.com/o/Pack.git",
                (None, s("https://github.com/o/Pack.git"), None),
            ),
            (
                "https://user@host/o/Pack.git",
                (None, s("https://user@host/o/Pack.git"), None),
            ),
            (
                "https://user@host/o/Pack.git@feature/x",
                (None, s("https://user@host/o/Pack.git"), s("feature/x")),
            ),
            (
                "git@github.com:o/Pack.git",
                (None, s("git@github.com:o/Pack.git"), None),
            ),
            (
                "git@github.com:o/Pack.git@abc123",
                (None, s("git@github.com:o/Pack.git"), s("abc123")),
            ),
            (
                "file:///srv/repos/Pack@main",
                (None, s("file:///srv/repos/Pack"), s("main")),
            ),
            (
                "ComfyUI-Impact-Pack",
                (s("ComfyUI-Impact-Pack"), None, None),
            ),
            (
                "ComfyUI-Impact-Pack@v2",
                (s("ComfyUI-Impact-Pack"), None, s("v2")),
            ),
        ];
        for (arg, want) in table {
            assert_eq!(pack(arg), want, "{arg}");
        }
    }

    #[test]
    fn models_split_into_folder_and_file() {
        let m = parse_model("https://h/x/sd.safetensors?download=1=checkpoints").unwrap();
        assert_eq!(m.url, "https://h/x/sd.safetensors?download=1");
        assert_eq!((m.folder.as_str(), m.filename), ("checkpoints", None));
        let m = parse_model("https://h/x/a=loras/sdxl/mine.safetensors").unwrap();
        assert_eq!(
            (m.folder.as_str(), m.filename.as_deref()),
            ("loras/sdxl", Some("mine.safetensors"))
        );
        let m = parse_model("https://h/x/a=loras/sdxl").unwrap();
        assert_eq!((m.folder.as_str(), m.filename), ("loras/sdxl", None));
        assert!(parse_model("https://h/x").is_err());
        assert!(parse_model("=checkpoints").is_err());
    }

    #[derive(Debug, clap::Parser)]
    struct T {
        #[command(flatten)]
        a: InstallNodesArgs,
    }

    fn spec(args: &[&str]) -> Result<InstallSpec> {
        use clap::Parser;
        let mut all = vec!["t"];
        all.extend_from_slice(args);
        build_spec(&T::try_parse_from(all).unwrap().a)
    }

    #[test]
    fn specs_come_from_arguments_or_a_file() {
        let s = spec(&[
            "--instance",
            "gpu-1",
            "https://h/o/A.git@v1",
            "B-Pack",
            "--model",
            "https://h/m.safetensors=checkpoints",
            "--no-restart",
        ])
        .unwrap();
        assert_eq!(s.instance, "gpu-1");
        assert_eq!(s.nodes[0].git.as_deref(), Some("https://h/o/A.git"));
        assert_eq!(s.nodes[0].rev.as_deref(), Some("v1"));
        assert_eq!(s.nodes[1].name.as_deref(), Some("B-Pack"));
        assert_eq!(s.models[0].folder, "checkpoints");
        assert!(!s.restart);

        let file = std::env::temp_dir().join(format!("comfyfleet-spec-{}.json", InstallId::new()));
        std::fs::write(
            &file,
            r#"{"instance": "gpu-1", "nodes": [{"git": "https://h/o/A.git", "classes": ["X"]}]}"#,
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let s = spec(&["--spec", path, "--instance", "gpu-2"]).unwrap();
        assert_eq!(s.instance, "gpu-2", "--instance overrides the file's");
        assert_eq!(s.nodes[0].classes, vec!["X"]);
        assert!(s.restart);
        std::fs::write(&file, r#"{"instance": "gpu-1", "nodez": []}"#).unwrap();
        let e = spec(&["--spec", path]).unwrap_err().to_string();
        assert!(e.contains("nodez"), "{e}");
        std::fs::remove_file(&file).ok();

        let e = spec(&["--instance", "gpu-1"]).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
        assert!(e.to_string().contains("nothing to install"), "{e}");
        let e = spec(&["--instance", "gpu-1", "--model", "https://h/m"]).unwrap_err();
        assert!(e.to_string().contains("URL=FOLDER"), "{e}");
    }

    #[test]
    fn exit_codes_follow_run() {
        assert_eq!(exit_code(InstallState::Succeeded), 0);
        assert_eq!(exit_code(InstallState::Failed), 1);
        assert_eq!(exit_code(InstallState::Cancelled), 2);
    }
}
