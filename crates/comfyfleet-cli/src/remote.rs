//! Commands that talk to a running service over its HTTP API (`--server URL`): `submit`, `run`,
//! `events`, `backends`, and the API side of `jobs`, `job`, `cancel`, `reap`, `backup`,
//! `prune`. The HTTP details are in [`crate::client`]; the bars in [`crate::follow`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use comfyfleet::core::{JobPage, ReapReport};
use comfyfleet::{Event, FleetEvent, JobId, JobRecord, JobSpec, JobState};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

use crate::client::{Client, ClientError, EventSource, exit};
use crate::follow::{self, Bars};
use crate::store_cmds::{self, JobsArgs};

/// Most jobs one `run` submits.
const MAX_RUN_JOBS: usize = 1000;
/// Most event streams one `run` keeps open at once; later jobs are followed as earlier ones end.
const MAX_STREAMS: usize = 64;

/// `NODE.FIELD=VALUE`: a widget value to replace.
#[derive(Debug, Clone, PartialEq)]
pub struct InputArg {
    node: String,
    field: String,
    value: Value,
}

/// Parses `NODE.FIELD=VALUE`; VALUE is JSON when it parses as JSON (`42`, `true`, `"42"`,
/// `[1,2]`), else text (`a red fox`).
pub fn parse_input(s: &str) -> Result<InputArg, String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NODE.FIELD=VALUE"))?;
    let (node, field) = key
        .split_once('.')
        .filter(|(n, f)| !n.is_empty() && !f.is_empty())
        .ok_or_else(|| format!("{s:?}: expected NODE.FIELD=VALUE, e.g. 6.text=a red fox"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok(InputArg {
        node: node.to_owned(),
        field: field.to_owned(),
        value,
    })
}

/// Parses `key=value`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?}: expected key=value")),
    }
}

/// What `submit` and `run` send besides the workflow.
#[derive(Debug, Clone, clap::Args)]
pub struct JobOptions {
    /// Replace a widget value: `NODE.FIELD=VALUE` (VALUE is JSON if it parses, else text:
    /// `6.text=a red fox`, `3.seed=42`, `6.text='"42"'`). Repeatable.
    #[arg(long = "input", value_name = "NODE.FIELD=VALUE", value_parser = parse_input)]
    inputs: Vec<InputArg>,
    /// An input file the workflow refers to by its file name (e.g. for `LoadImage`); uploaded
    /// first. Repeatable.
    #[arg(long = "upload", value_name = "FILE")]
    uploads: Vec<PathBuf>,
    /// Higher runs first (default 0).
    #[arg(long, allow_negative_numbers = true)]
    priority: Option<i32>,
    /// A label `key=value` for filtering (`jobs --label`). Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Submitting again with the same key returns the existing job instead of a new one. With
    /// several jobs (`run`), `-1`, `-2`, … is appended per job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// An http(s) URL the service POSTs to (signed) when the job ends.
    #[arg(long)]
    webhook: Option<String>,
    /// Give up on the job this long after submission (e.g. `90s`, `10m`, `2h`).
    #[arg(long, value_parser = store_cmds::parse_duration)]
    deadline: Option<Duration>,
    /// Most executions (tries) of the job (default 3).
    #[arg(long)]
    max_attempts: Option<u32>,
}

/// Options of `submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The workflow: ComfyUI API format ("Save (API Format)"), or a whole submit request
    /// (`{"workflow": {...}, "priority": 1, ...}`).
    workflow: PathBuf,
    #[command(flatten)]
    opts: JobOptions,
    /// Print the server's answer as JSON.
    #[arg(long)]
    json: bool,
}

/// Options of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Workflow files (as for `submit`); each is submitted `--count` times.
    #[arg(required = true)]
    workflows: Vec<PathBuf>,
    /// Submit each workflow this many times.
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[command(flatten)]
    opts: JobOptions,
    /// Print the finished jobs as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

/// Options of `events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Only this job's events (with `--follow`: until it ends).
    pub(crate) job: Option<JobId>,
    /// Keep printing new events as they happen (Ctrl-C to stop).
    #[arg(long, short)]
    pub(crate) follow: bool,
    /// Start after this event id.
    #[arg(long)]
    pub(crate) after: Option<u64>,
    /// Most events to list (without `--follow`).
    #[arg(long, default_value_t = 1000)]
    pub(crate) limit: u32,
    /// One JSON object per line.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Options of `backends`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = false)]
pub struct BackendsArgs {
    #[command(subcommand)]
    action: Option<BackendAction>,
    /// JSON output.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum BackendAction {
    /// Stop sending new work to a backend (running jobs finish).
    Drain {
        /// The backend id.
        id: String,
    },
    /// Send work to a drained or quarantined backend again.
    Enable {
        /// The backend id.
        id: String,
    },
}

/// A workflow file turned into a submit request (without uploads).
#[derive(Debug, Clone)]
struct Prepared {
    label: String,
    request: Value,
}

/// Reads a workflow file and applies the options; the request is checked the way the server
/// will check it, so a batch with one bad file submits nothing.
fn prepare(path: &Path, opts: &JobOptions) -> Result<Prepared> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let Value::Object(obj) = &v else {
        bail!("{}: expected a JSON object (a workflow)", path.display());
    };
    if obj.contains_key("nodes") && obj.contains_key("links") {
        bail!(
            "{}: this is a ComfyUI UI workflow; export it with \"Save (API Format)\" (enable the dev mode options) and submit that file",
            path.display()
        );
    }
    let is_request = |k: &str| {
        obj.get(k)
            .and_then(Value::as_object)
            .is_some_and(|w| !w.contains_key("class_type"))
    };
    let mut request = if is_request("workflow") {
        v.clone()
    } else if is_request("prompt") {
        // The body of ComfyUI's own `POST /prompt`.
        json!({ "workflow": obj["prompt"] })
    } else {
        json!({ "workflow": v })
    };
    let r = request
        .as_object_mut()
        .context("a request is a JSON object")?;
    for i in &opts.inputs {
        let inputs = r
            .entry("inputs")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .with_context(|| format!("{}: `inputs` must be an object", path.display()))?;
        let node = inputs
            .entry(i.node.clone())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .with_context(|| format!("{}: inputs.{} must be an object", path.display(), i.node))?;
        node.insert(i.field.clone(), i.value.clone());
    }
    if !opts.labels.is_empty() {
        let labels = r
            .entry("labels")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .with_context(|| format!("{}: `labels` must be an object", path.display()))?;
        for (k, v) in &opts.labels {
            labels.insert(k.clone(), json!(v));
        }
    }
    if let Some(p) = opts.priority {
        r.insert("priority".into(), json!(p));
    }
    if let Some(d) = opts.deadline {
        r.insert("deadline_ms".into(), json!(d.as_millis() as u64));
    }
    if let Some(n) = opts.max_attempts {
        r.insert("max_attempts".into(), json!(n));
    }
    if let Some(k) = &opts.idempotency_key {
        r.insert("idempotency_key".into(), json!(k));
    }
    if let Some(w) = &opts.webhook {
        r.insert("webhook".into(), json!(w));
    }
    let spec: JobSpec = serde_json::from_value(request.clone())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Prepared {
        label: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        request,
    })
}

/// The request to send for job `index` of a batch of `total`.
fn finish(p: &Prepared, uploads: &[Value], index: usize, total: usize) -> Value {
    let mut r = p.request.clone();
    if !uploads.is_empty() {
        let list = r
            .as_object_mut()
            .map(|o| o.entry("uploads").or_insert_with(|| json!([])));
        if let Some(Value::Array(list)) = list {
            list.extend(uploads.iter().cloned());
        }
    }
    if total > 1
        && let Some(Value::String(k)) = r.get("idempotency_key").cloned()
    {
        r["idempotency_key"] = json!(format!("{k}-{}", index + 1));
    }
    r
}

async fn upload(client: &Client, opts: &JobOptions) -> Result<Vec<Value>> {
    if opts.uploads.is_empty() {
        return Ok(Vec::new());
    }
    Ok(client.upload_inputs(&opts.uploads).await?)
}

fn id_of(resp: &Value) -> Result<JobId> {
    resp.get("id")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("unexpected answer from the server: no job id in {resp}"))
}

/// `submit`: prints the new job's id (or the answer as JSON).
pub async fn submit(client: &Client, a: SubmitArgs) -> Result<i32> {
    let p = prepare(&a.workflow, &a.opts)?;
    let uploads = upload(client, &a.opts).await?;
    let resp: Value = client
        .post("v1/jobs", &[], &finish(&p, &uploads, 0, 1))
        .await?;
    let id = id_of(&resp)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    } else {
        println!("{id}");
        if resp.get("created") == Some(&Value::Bool(false)) {
            eprintln!("(an existing job: the idempotency key matched)");
        }
    }
    Ok(0)
}

/// Whether a job event's JSON is a terminal one, read without knowing every event type (a newer
/// server may send types this build cannot parse; the stream still ends at the terminal one).
fn is_terminal_data(data: &str) -> bool {
    serde_json::from_str::<Value>(data).is_ok_and(|v| {
        v.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| matches!(t, "succeeded" | "failed" | "cancelled"))
    })
}

/// What a follower task tells the display.
enum Update {
    Event(Box<Event>),
    /// The job ended, as read from its record (the stream was lost).
    Ended(JobId, JobState, String),
    /// Lost contact for good.
    Lost(JobId, String),
}

/// Follows one job: its event stream (from the start, so nothing is missed), falling back to
/// reading the job when the stream cannot be kept up.
async fn follow_job(client: Client, id: JobId, tx: mpsc::Sender<Update>, slots: Arc<Semaphore>) {
    let Ok(_slot) = slots.acquire_owned().await else {
        return;
    };
    let mut es: EventSource = client.events(&format!("v1/jobs/{id}/events/stream"), Some(0));
    loop {
        match es.next().await {
            Ok(ev) if ev.event == "job" => {
                let Ok(e) = serde_json::from_str::<Event>(&ev.data) else {
                    if is_terminal_data(&ev.data) {
                        break; // ended in a way this build cannot parse: the record will say
                    }
                    continue;
                };
                let terminal = e.kind.terminal_state().is_some();
                if tx.send(Update::Event(Box::new(e))).await.is_err() || terminal {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(job = %id, error = %e, "event stream lost; reading the job instead");
                break;
            }
        }
    }
    let mut failures = 0;
    loop {
        match client.get::<JobRecord>(&format!("v1/jobs/{id}"), &[]).await {
            Ok(j) if j.state.is_terminal() => {
                let msg = match &j.error {
                    Some(e) => format!("{}: {}", j.state, e.message),
                    None => j.state.to_string(),
                };
                let _ = tx.send(Update::Ended(id, j.state, msg)).await;
                return;
            }
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures >= 30 || e.exit_code() == exit::NOT_FOUND_OR_CANCELLED {
                    let _ = tx.send(Update::Lost(id, e.to_string())).await;
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `run`: submits every workflow (`--count` times each), follows the jobs with a bar each, and
/// exits 0 if all succeeded, 1 if any failed, 2 if any was cancelled (130 on Ctrl-C: the jobs
/// keep running).
pub async fn run(client: &Client, a: RunArgs) -> Result<i32> {
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    let total = a.workflows.len().saturating_mul(a.count as usize);
    if total > MAX_RUN_JOBS {
        bail!("{total} jobs is too many for one run (at most {MAX_RUN_JOBS})");
    }
    let prepared = a
        .workflows
        .iter()
        .map(|w| prepare(w, &a.opts))
        .collect::<Result<Vec<_>>>()?;
    let uploads = upload(client, &a.opts).await?;

    let mut interrupt = crate::Interrupt::ctrl_c()?;
    let mut bars = Bars::new()?;
    let mut labels: BTreeMap<JobId, String> = BTreeMap::new();
    let (tx, mut rx) = mpsc::channel::<Update>(1024);
    let slots = Arc::new(Semaphore::new(MAX_STREAMS));
    let mut index = 0;
    for p in &prepared {
        for _ in 0..a.count {
            let resp: Value = match client
                .post("v1/jobs", &[], &finish(p, &uploads, index, total))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    bars.clear();
                    if !labels.is_empty() {
                        eprintln!(
                            "submitted before the error (they keep running): {}",
                            labels
                                .keys()
                                .map(|id| id.to_string())
                                .collect::<Vec<_>>()
                                .join(" ")
                        );
                    }
                    return Err(anyhow::Error::new(e).context(format!("submitting {}", p.label)));
                }
            };
            index += 1;
            let id = id_of(&resp)?;
            bars.add(id, &p.label);
            if !bars.is_tty() {
                bars.line(format!(
                    "{}: submitted {id} ({})",
                    follow::short(id),
                    p.label
                ));
            }
            labels.insert(id, p.label.clone());
            tokio::spawn(follow_job(client.clone(), id, tx.clone(), slots.clone()));
        }
    }
    drop(tx);

    let mut lost = Vec::new();
    while bars.open() > 0 {
        tokio::select! {
            u = rx.recv() => match u {
                Some(Update::Event(e)) => { bars.on_event(&e); }
                Some(Update::Ended(id, state, msg)) => {
                    if bars.finish(id, state, &msg) && !bars.is_tty() {
                        bars.line(format!("{}: {msg}", follow::short(id)));
                    }
                }
                Some(Update::Lost(id, why)) => {
                    if !bars.ended(id) {
                        bars.finish(id, JobState::Pending, &format!("lost: {why}"));
                        lost.push((id, why));
                    }
                }
                None => break,
            },
            _ = interrupt.recv() => {
                bars.clear();
                let open: Vec<String> = bars.ids().iter().filter(|id| !bars.ended(**id)).map(|id| id.to_string()).collect();
                eprintln!(
                    "stopped following; {} job(s) keep running on the server: {}\n(see them with `comfyfleet jobs --server {}` or `comfyfleet events ID --follow`)",
                    open.len(),
                    open.join(" "),
                    client.base().trim_end_matches('/'),
                );
                return Ok(exit::INTERRUPTED);
            }
        }
    }
    bars.clear();
    if !lost.is_empty() {
        for (id, why) in &lost {
            eprintln!("{id}: lost contact with the server: {why}");
        }
        return Ok(exit::UNREACHABLE);
    }
    let mut jobs = Vec::new();
    for (id, label) in bars.ids().iter().map(|id| (*id, labels[id].clone())) {
        let j: JobRecord = client.get(&format!("v1/jobs/{id}"), &[]).await?;
        jobs.push((j, label));
    }
    if a.json {
        let v: Vec<Value> = jobs
            .iter()
            .map(|(j, l)| follow::job_json(j, Some(l)))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        follow::print_summary(&jobs);
    }
    Ok(follow::batch_exit_code(jobs.iter().map(|(j, _)| j.state)))
}

/// Prints one event from a stream: a line, or its JSON as sent.
fn print_sse(ev: &crate::client::SseEvent, json: bool) {
    match ev.event.as_str() {
        "job" | "fleet" if json => println!("{}", ev.data),
        "job" => match serde_json::from_str::<Event>(&ev.data) {
            Ok(e) => println!("{}", follow::event_line(&e)),
            Err(_) => println!("job {}", ev.data),
        },
        "fleet" => match serde_json::from_str::<FleetEvent>(&ev.data)
            .ok()
            .and_then(|e| follow::fleet_line(&e))
        {
            Some(line) => println!(
                "{} fleet {line}",
                comfyfleet::core::Clock::now(&comfyfleet::core::SystemClock)
            ),
            None => println!("fleet {}", ev.data),
        },
        _ => {} // `lagged` notices (the server replays what was missed), keep-alives
    }
}

/// Every stored event of a job after `after`, page by page.
async fn print_stored_events(
    client: &Client,
    id: JobId,
    mut after: Option<u64>,
    json: bool,
) -> Result<i32> {
    loop {
        let mut q = vec![("limit", "1000".to_owned())];
        if let Some(a) = after {
            q.push(("after", a.to_string()));
        }
        let events: Vec<Event> = client.get(&format!("v1/jobs/{id}/events"), &q).await?;
        for e in &events {
            store_cmds::print_event(e, json)?;
            after = Some(e.id);
        }
        if events.len() < 1000 {
            return Ok(0);
        }
    }
}

/// `events` through the API.
pub async fn events(client: &Client, a: EventsArgs) -> Result<i32> {
    match (a.job, a.follow) {
        (Some(id), false) => {
            let mut q = vec![("limit", a.limit.to_string())];
            if let Some(after) = a.after {
                q.push(("after", after.to_string()));
            }
            let v: Value = client.get(&format!("v1/jobs/{id}/events"), &q).await?;
            let list = match v {
                Value::Object(mut o) => o.remove("events").unwrap_or(Value::Null),
                v => v,
            };
            let events: Vec<Event> = serde_json::from_value(list)
                .context("unexpected answer from the server: events")?;
            for e in &events {
                store_cmds::print_event(e, a.json)?;
            }
            Ok(0)
        }
        (None, false) => {
            bail!("with --server, `events` needs a JOB or --follow (the live stream of every job)")
        }
        (job, true) => {
            if let Some(id) = job {
                let j: JobRecord = client.get(&format!("v1/jobs/{id}"), &[]).await?;
                if j.state.is_terminal() {
                    // Nothing live is left: print what is stored. (A stream resumed after a
                    // finished job's last event would wait for events that never come.)
                    return print_stored_events(client, id, a.after, a.json).await;
                }
            }
            let (path, after) = match job {
                Some(id) => (format!("v1/jobs/{id}/events/stream"), a.after.or(Some(0))),
                None => ("v1/events".to_owned(), a.after),
            };
            let mut es = client.events(&path, after);
            let mut interrupt = crate::Interrupt::ctrl_c()?;
            loop {
                let ev = tokio::select! {
                    ev = es.next() => ev,
                    _ = interrupt.recv() => return Ok(exit::INTERRUPTED),
                };
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        // The stream of a job that already ended may close without a word:
                        // the record says whether it is over.
                        if let Some(id) = job
                            && let Ok(j) =
                                client.get::<JobRecord>(&format!("v1/jobs/{id}"), &[]).await
                            && j.state.is_terminal()
                        {
                            return Ok(0);
                        }
                        return Err(e.into());
                    }
                };
                print_sse(&ev, a.json);
                if job.is_some() && ev.event == "job" && is_terminal_data(&ev.data) {
                    return Ok(0);
                }
            }
        }
    }
}

fn field<'a>(v: &'a Value, paths: &[&str]) -> Option<&'a Value> {
    paths
        .iter()
        .find_map(|p| v.pointer(p))
        .filter(|v| !v.is_null())
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a.len().to_string(),
        Some(v) => v.to_string(),
        None => "-".into(),
    }
}

/// One row of the `backends` table.
fn backend_row(b: &Value) -> String {
    let healthy = match field(b, &["/health/healthy", "/healthy"]) {
        Some(Value::Bool(true)) => "yes".to_owned(),
        Some(Value::Bool(false)) => format!(
            "no ({})",
            text(field(b, &["/health/message", "/health/detail"]))
        ),
        other => text(other),
    };
    format!(
        "{:<16} {:<10} {:>4}/{:<4} {:<10} {:<9} {:>6} {:>7}",
        text(field(b, &["/id"])),
        text(field(b, &["/kind"])),
        text(field(b, &["/in_flight"])),
        text(field(b, &["/capacity", "/capabilities/max_concurrent"])),
        text(field(b, &["/availability/state", "/availability"])),
        healthy,
        text(field(b, &["/restrictions", "/blocks"])),
        text(field(
            b,
            &[
                "/node_classes",
                "/node_class_count",
                "/inventory/node_classes"
            ]
        )),
    )
}

/// `backends`, `backends drain ID`, `backends enable ID`.
pub async fn backends(client: &Client, a: BackendsArgs) -> Result<i32> {
    let (list, single) = match &a.action {
        None => (client.get::<Vec<Value>>("v1/backends", &[]).await?, false),
        Some(BackendAction::Drain { id }) => (
            vec![
                client
                    .post(&format!("v1/backends/{id}/drain"), &[], &json!({}))
                    .await?,
            ],
            true,
        ),
        Some(BackendAction::Enable { id }) => (
            vec![
                client
                    .post(&format!("v1/backends/{id}/enable"), &[], &json!({}))
                    .await?,
            ],
            true,
        ),
    };
    if a.json {
        let out = if single {
            list[0].clone()
        } else {
            Value::Array(list)
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!(
        "{:<16} {:<10} {:^9} {:<10} {:<9} {:>6} {:>7}",
        "backend", "kind", "busy/cap", "state", "healthy", "blocks", "nodes"
    );
    for b in &list {
        println!("{}", backend_row(b));
    }
    Ok(0)
}

/// `jobs` through the API.
pub async fn jobs(client: &Client, a: JobsArgs) -> Result<i32> {
    let mut q = vec![("limit", a.limit.to_string())];
    if !a.state.is_empty() {
        let s: Vec<&str> = a.state.iter().map(|s| s.as_str()).collect();
        q.push(("state", s.join(",")));
    }
    if let Some(b) = &a.backend {
        q.push(("backend", b.clone()));
    }
    if let Some(l) = &a.label {
        if !l.contains('=') {
            bail!("--label {l:?}: expected key=value");
        }
        q.push(("label", l.clone()));
    }
    if let Some(e) = &a.error {
        q.push(("error", e.clone()));
    }
    if let Some(b) = a.before {
        q.push(("before", b.to_string()));
    }
    let v: Value = client.get("v1/jobs", &q).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let page: JobPage =
        serde_json::from_value(v).context("unexpected answer from the server: job list")?;
    store_cmds::print_page(&page);
    Ok(0)
}

/// `job ID` through the API.
pub async fn job(client: &Client, id: JobId, json: bool) -> Result<i32> {
    let job: Value = client.get(&format!("v1/jobs/{id}"), &[]).await?;
    let events: Value = client
        .get(&format!("v1/jobs/{id}/events"), &[("limit", "1000".into())])
        .await?;
    let events = match events {
        Value::Object(mut o) => o.remove("events").unwrap_or(Value::Null),
        v => v,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"job": job, "events": events}))?
        );
        return Ok(0);
    }
    let job: JobRecord =
        serde_json::from_value(job).context("unexpected answer from the server: job")?;
    let events: Vec<Event> =
        serde_json::from_value(events).context("unexpected answer from the server: events")?;
    store_cmds::print_job(&job, &events);
    Ok(0)
}

/// `cancel` through the API (one batch request).
pub async fn cancel(client: &Client, ids: Vec<JobId>, force: bool, json: bool) -> Result<i32> {
    let v: Value = client
        .post("v1/jobs/cancel", &[], &json!({"ids": ids, "force": force}))
        .await?;
    let results = v
        .get("results")
        .and_then(Value::as_array)
        .cloned()
        .with_context(|| format!("unexpected answer from the server: {v}"))?;
    let mut code = 0;
    for r in &results {
        match r.get("result").and_then(Value::as_str) {
            Some("running") | Some("error") => code = code.max(exit::FAILED),
            Some("not_found") => code = code.max(exit::NOT_FOUND_OR_CANCELLED),
            _ => {}
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(code);
    }
    for r in &results {
        let id = text(r.get("id"));
        let result = r.get("result").and_then(Value::as_str).unwrap_or("?");
        let said = match result {
            "cancelled" => "cancelled".to_owned(),
            "cancel_requested" => "cancel requested (the engine running it stops it)".to_owned(),
            "already_requested" => "cancel already requested".to_owned(),
            "running" => "running: use --force to stop a running job".to_owned(),
            "not_found" => "not found".to_owned(),
            "already_terminal" => format!(
                "already {}",
                r.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("finished")
            ),
            other => r
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or(other)
                .to_owned(),
        };
        println!("{id}: {said}");
    }
    Ok(code)
}

/// `reap` through the API.
pub async fn reap(
    client: &Client,
    dry_run: bool,
    max_age: Option<Duration>,
    json: bool,
) -> Result<i32> {
    let v: Value = client
        .post(
            "v1/maintenance/reap",
            &[],
            &json!({"dry_run": dry_run, "stuck_after_secs": max_age.map(|d| d.as_secs())}),
        )
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let backup = v.get("backup").and_then(Value::as_str).map(str::to_owned);
    let report: ReapReport =
        serde_json::from_value(v).context("unexpected answer from the server: reap report")?;
    store_cmds::print_reap(&report.items, report.dry_run, backup.as_deref());
    Ok(0)
}

/// `backup` through the API: the server writes the copy into its backups directory.
pub async fn backup(client: &Client, json: bool) -> Result<i32> {
    let v: Value = client
        .post("v1/maintenance/backup", &[], &json!({}))
        .await?;
    if json {
        println!("{v}");
    } else {
        println!("backup written to {} (on the server)", text(v.get("path")));
    }
    Ok(0)
}

/// `prune` through the API (the server backs up first unless told not to).
pub async fn prune(
    client: &Client,
    older_than: Duration,
    no_backup: bool,
    json: bool,
) -> Result<i32> {
    let v: Value = client
        .post(
            "v1/maintenance/prune",
            &[],
            &json!({"older_than_secs": older_than.as_secs(), "no_backup": no_backup}),
        )
        .await?;
    if json {
        println!("{v}");
        return Ok(0);
    }
    if let Some(b) = v.get("backup").and_then(Value::as_str) {
        println!("backup: {b} (on the server)");
    }
    println!(
        "pruned {} finished job(s) older than {}s",
        text(v.get("pruned")),
        older_than.as_secs()
    );
    Ok(0)
}

/// Turns an API error into the process's exit code after printing its message; other errors
/// are returned for `main` to print.
pub fn exit_code_of(e: &anyhow::Error) -> Option<i32> {
    e.chain()
        .find_map(|c| c.downcast_ref::<ClientError>())
        .map(ClientError::exit_code)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        opts: JobOptions,
    }

    fn opts(args: &[&str]) -> JobOptions {
        let mut all = vec!["t"];
        all.extend_from_slice(args);
        T::try_parse_from(all).unwrap().opts
    }

    fn write(name: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("comfyfleet-remote-{}", JobId::new()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    const WF: &str = r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 64}},
                         "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x"}},
                         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}"#;

    #[test]
    fn inputs_and_labels_parse() {
        assert_eq!(
            parse_input("6.text=a red fox").unwrap().value,
            json!("a red fox")
        );
        assert_eq!(parse_input("3.seed=42").unwrap().value, json!(42));
        assert_eq!(parse_input("3.seed=\"42\"").unwrap().value, json!("42"));
        assert_eq!(parse_input("6.text=").unwrap().value, json!(""));
        let i = parse_input("10.a.b=1").unwrap();
        assert_eq!((i.node.as_str(), i.field.as_str()), ("10", "a.b"));
        assert!(parse_input("6text=x").is_err());
        assert!(parse_input("6.text").is_err());
        assert!(parse_input(".text=x").is_err());
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_label("=x").is_err());
    }

    #[test]
    fn a_request_is_built_from_the_file_and_the_options() {
        let path = write("fox.json", WF);
        let o = opts(&[
            "--input",
            "6.text=a red fox",
            "--input",
            "1.width=128",
            "--priority",
            "-2",
            "--label",
            "project=cats",
            "--deadline",
            "10m",
            "--idempotency-key",
            "batch-7",
            "--webhook",
            "https://example.com/h",
            "--max-attempts",
            "5",
        ]);
        let p = prepare(&path, &o).unwrap();
        assert_eq!(p.label, "fox.json");
        let r = finish(&p, &[], 0, 1);
        assert_eq!(r["inputs"]["6"]["text"], "a red fox");
        assert_eq!(r["inputs"]["1"]["width"], 128);
        assert_eq!(r["priority"], -2);
        assert_eq!(r["labels"]["project"], "cats");
        assert_eq!(r["deadline_ms"], 600_000);
        assert_eq!(r["max_attempts"], 5);
        assert_eq!(r["idempotency_key"], "batch-7");
        assert_eq!(r["webhook"], "https://example.com/h");
        assert_eq!(r["workflow"]["6"]["class_type"], "CLIPTextEncode");
        // In a batch, each job gets its own key; uploads are appended.
        let up = json!({"name": "cat.png", "sha256": "0".repeat(64), "size": 3});
        let r = finish(&p, std::slice::from_ref(&up), 2, 3);
        assert_eq!(r["idempotency_key"], "batch-7-3");
        assert_eq!(r["uploads"][0], up);
    }

    #[test]
    fn request_files_and_bad_files() {
        // A whole submit request; options win over it.
        let path = write(
            "req.json",
            &format!(r#"{{"workflow": {WF}, "priority": 3, "labels": {{"a": "1"}}}}"#),
        );
        let r = finish(
            &prepare(&path, &opts(&["--label", "b=2"])).unwrap(),
            &[],
            0,
            1,
        );
        assert_eq!(r["priority"], 3);
        assert_eq!(r["labels"], json!({"a": "1", "b": "2"}));
        // ComfyUI's own /prompt body.
        let path = write(
            "prompt.json",
            &format!(r#"{{"prompt": {WF}, "client_id": "x"}}"#),
        );
        let r = finish(&prepare(&path, &opts(&[])).unwrap(), &[], 0, 1);
        assert_eq!(r["workflow"]["1"]["class_type"], "EmptyImage");
        assert!(r.get("client_id").is_none());

        let err = |content: &str, args: &[&str]| {
            prepare(&write("bad.json", content), &opts(args))
                .unwrap_err()
                .to_string()
        };
        assert!(err("{not json", &[]).contains("not valid JSON"));
        assert!(err(r#"{"nodes": [], "links": []}"#, &[]).contains("API Format"));
        let e = err(WF, &["--input", "99.text=x"]);
        assert!(e.contains("bad.json") && e.contains("99"), "{e}");
        let e = err(WF, &["--webhook", "ftp://x"]);
        assert!(e.contains("webhook"), "{e}");
        let e = err(
            r#"{"1": {"class_type": "A", "inputs": {"x": ["7", 0]}}}"#,
            &[],
        );
        assert!(e.contains("bad.json"), "{e}");
    }

    #[test]
    fn terminal_events_are_seen_without_knowing_their_fields() {
        assert!(is_terminal_data(r#"{"type": "failed", "new_field": 1}"#));
        assert!(!is_terminal_data(r#"{"type": "progress"}"#));
        assert!(!is_terminal_data("not json"));
    }

    #[test]
    fn backend_rows_read_what_is_there() {
        let b = json!({"id": "gpu-1", "kind": "comfyui", "in_flight": 1,
                       "capabilities": {"max_concurrent": 2},
                       "health": {"healthy": false, "message": "refused"},
                       "availability": {"state": "draining"}, "restrictions": [1, 2]});
        let row = backend_row(&b);
        for part in ["gpu-1", "comfyui", "1/2", "draining", "no (refused)", " 2 "] {
            assert!(row.contains(part), "{part} in {row}");
        }
    }
}
