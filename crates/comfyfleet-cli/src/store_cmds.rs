//! `jobs`, `job`, `cancel`, `reap`, `backup`, `prune`: work directly on a store (the local SQLite
//! database by default). Destructive maintenance takes a backup first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use comfyfleet::core::Clock;
use comfyfleet::core::{
    CancelOutcome, EventQuery, JobFilter, JobPage, ReapItem, ReapOptions, StoreError, SystemClock,
};
use comfyfleet::{Event, JobId, JobRecord, JobState, TaskStore};

/// Parses `90`, `90s`, `10m`, `2h`, `30d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 10m, 2h, 30d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

/// Options of `comfyfleet jobs`.
#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    /// Only these states (comma separated: pending,running,retry_wait,succeeded,failed,cancelled).
    #[arg(long, value_delimiter = ',')]
    pub(crate) state: Vec<JobState>,
    /// Only jobs whose latest attempt ran on this backend.
    #[arg(long)]
    pub(crate) backend: Option<String>,
    /// Only jobs with this label (`key=value`).
    #[arg(long)]
    pub(crate) label: Option<String>,
    /// Only jobs whose error contains this text.
    #[arg(long)]
    pub(crate) error: Option<String>,
    /// Page size (1–1000).
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: u32,
    /// Jobs older than this id (the `next` of the previous page).
    #[arg(long)]
    pub(crate) before: Option<JobId>,
    /// JSON output.
    #[arg(long)]
    pub(crate) json: bool,
}

pub async fn jobs(store: Arc<dyn TaskStore>, a: JobsArgs) -> Result<i32> {
    let label = match &a.label {
        Some(l) => {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("--label {l:?}: expected key=value"))?;
            Some((k.to_owned(), v.to_owned()))
        }
        None => None,
    };
    let filter = JobFilter {
        states: a.state,
        backend: a.backend.map(comfyfleet::BackendId::new),
        label,
        error_contains: a.error,
        before: a.before,
        limit: a.limit,
        ..JobFilter::default()
    };
    let page = store.list(&filter).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(0);
    }
    print_page(&page);
    Ok(0)
}

/// The table of `jobs`.
pub fn print_page(page: &JobPage) {
    println!(
        "{:<36}  {:<10}  {:>3}  {:>5}  {:<12}  detail",
        "job", "state", "try", "%", "backend"
    );
    for j in &page.jobs {
        let detail = j
            .error
            .clone()
            .or_else(|| j.wait_reason.clone())
            .unwrap_or_default();
        println!(
            "{:<36}  {:<10}  {:>3}  {:>5}  {:<12}  {}",
            j.id,
            j.state,
            j.attempts,
            j.percent.map(|p| format!("{p:.0}")).unwrap_or_default(),
            j.backend
                .as_ref()
                .map(|b| b.to_string())
                .unwrap_or_default(),
            detail
        );
    }
    if let Some(next) = page.next {
        println!("more: --before {next}");
    }
}

pub async fn job(store: Arc<dyn TaskStore>, id: JobId, json: bool) -> Result<i32> {
    let Some(job) = store.get(id).await? else {
        eprintln!("job {id} not found");
        return Ok(2);
    };
    let events = store
        .events(&EventQuery {
            job: Some(id),
            after: None,
            limit: 1000,
        })
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"job": job, "events": events}))?
        );
        return Ok(0);
    }
    print_job(&job, &events);
    Ok(0)
}

/// The human view of `job`.
pub fn print_job(job: &JobRecord, events: &[Event]) {
    println!(
        "job {}  {}  (submitted {})",
        job.id, job.state, job.created_at
    );
    if let Some(e) = &job.error {
        println!("error: {}", e.message);
    }
    if let Some(r) = &job.wait_reason {
        println!("waiting: {r}");
    }
    for a in &job.attempts {
        println!(
            "attempt {} on {}{}: {}{}",
            a.number,
            a.backend,
            a.remote
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            a.outcome
                .map(|o| format!("{o:?}").to_lowercase())
                .unwrap_or_else(|| "running".into()),
            a.error
                .as_ref()
                .map(|e| format!(" — {}", e.message))
                .unwrap_or_default()
        );
        for n in &a.nodes {
            let took = n
                .ended_at
                .map(|e| format!("{} ms", e.since(n.started_at).as_millis()))
                .unwrap_or_else(|| "unfinished".into());
            println!(
                "    node {:<6} {:<24} {}{}",
                n.node,
                n.class_type.clone().unwrap_or_default(),
                took,
                if n.cached { " (cached)" } else { "" }
            );
        }
        for s in &a.cancel_steps {
            println!("    cancel step {}: {}", s.action, s.result);
        }
    }
    for a in &job.artifacts {
        println!(
            "output {} ({}, {} bytes)",
            a.filename,
            a.kind,
            a.size.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
        );
    }
    println!("events:");
    for e in events {
        println!(
            "  #{:<4} {} {}",
            e.seq,
            e.at,
            crate::follow::describe(&e.kind)
        );
    }
}

pub async fn cancel(
    store: Arc<dyn TaskStore>,
    ids: Vec<JobId>,
    force: bool,
    json: bool,
) -> Result<i32> {
    let now = SystemClock.now();
    let mut out = Vec::new();
    let mut code = 0;
    for id in ids {
        let r = if force {
            store
                .force_cancel(id, "force-cancelled from the command line", now)
                .await
        } else {
            store
                .cancel(id, "cancelled from the command line", now)
                .await
        };
        let text = match r {
            Ok(r) => match r.outcome {
                CancelOutcome::Cancelled => "cancelled".to_string(),
                CancelOutcome::CancelRequested => "cancel requested (the engine running it stops it; if that engine is gone, the reaper finishes it)".into(),
                CancelOutcome::AlreadyRequested => "cancel already requested".into(),
                CancelOutcome::Running => {
                    code = 1;
                    "running: use --force to stop a running job".into()
                }
                CancelOutcome::AlreadyTerminal(s) => format!("already {s}"),
            },
            Err(StoreError::NotFound(_)) => {
                code = 2;
                "not found".into()
            }
            Err(e) => return Err(e.into()),
        };
        out.push((id, text));
    }
    if json {
        let v: Vec<_> = out
            .iter()
            .map(|(id, t)| serde_json::json!({"id": id, "result": t}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (id, t) in &out {
            println!("{id}: {t}");
        }
    }
    Ok(code)
}

/// Takes the automatic backup before destructive maintenance; `None` for stores without files.
async fn auto_backup(store: &Arc<dyn TaskStore>, db: Option<&Path>) -> Result<Option<PathBuf>> {
    let Some(db) = db else { return Ok(None) };
    let dir = db
        .parent()
        .map(|d| d.join("backups"))
        .unwrap_or_else(|| PathBuf::from("backups"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = SystemClock.now().to_string().replace([':', '.'], "-");
    let dest = dir.join(format!("comfyfleet-{stamp}.db"));
    store
        .backup(&dest)
        .await
        .with_context(|| format!("automatic backup to {}", dest.display()))?;
    Ok(Some(dest))
}

pub async fn reap(
    store: Arc<dyn TaskStore>,
    db: Option<&Path>,
    dry_run: bool,
    max_age: Option<Duration>,
    max_crash_requeues: u32,
    json: bool,
) -> Result<i32> {
    let options = ReapOptions {
        dry_run,
        stuck_after: max_age,
        max_crash_requeues,
    };
    let backup = if dry_run {
        None
    } else {
        auto_backup(&store, db).await?
    };
    let report = store.reap(&options, SystemClock.now()).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"report": report.items, "dry_run": dry_run, "backup": backup})
            )?
        );
        return Ok(0);
    }
    print_reap(
        &report.items,
        dry_run,
        backup.map(|b| b.display().to_string()).as_deref(),
    );
    Ok(0)
}

/// The human view of a reap report.
pub fn print_reap(items: &[ReapItem], dry_run: bool, backup: Option<&str>) {
    if let Some(b) = backup {
        println!("backup: {b}");
    }
    if items.is_empty() {
        println!("no stuck jobs");
    }
    for i in items {
        println!(
            "{}{} {}  attempt {}  owner {}  backend {}  age {}s  last progress {}  → {:?}",
            if dry_run { "would: " } else { "" },
            i.job,
            format!("{:?}", i.reason).to_lowercase(),
            i.attempt,
            i.owner.as_deref().unwrap_or("-"),
            i.backend
                .as_ref()
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            i.age_ms / 1000,
            i.last_progress_at
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            i.action
        );
    }
}

pub async fn backup(store: Arc<dyn TaskStore>, dest: &Path, json: bool) -> Result<i32> {
    store
        .backup(dest)
        .await
        .with_context(|| format!("backup to {}", dest.display()))?;
    if json {
        println!("{}", serde_json::json!({ "path": dest }));
    } else {
        println!("backup written to {}", dest.display());
    }
    Ok(0)
}

pub async fn prune(
    store: Arc<dyn TaskStore>,
    db: Option<&Path>,
    older_than: Duration,
    no_backup: bool,
    json: bool,
) -> Result<i32> {
    let backup = if no_backup {
        None
    } else {
        auto_backup(&store, db).await?
    };
    let cutoff = SystemClock.now().sub(older_than);
    let n = store.prune(cutoff).await?;
    if json {
        println!("{}", serde_json::json!({ "pruned": n, "backup": backup }));
        return Ok(0);
    }
    if let Some(b) = &backup {
        println!("backup: {}", b.display());
    }
    println!(
        "pruned {n} finished job(s) older than {}s",
        older_than.as_secs()
    );
    Ok(0)
}

/// Prints one stored event: a line, or its JSON (one object per line).
pub fn print_event(e: &Event, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(e)?);
    } else {
        println!("{}", crate::follow::event_line(e));
    }
    Ok(())
}

/// `events` on the store: the stored events (of one job, or all), oldest first; with `follow`,
/// then new ones as they are written (by a `worker` or `serve` on the same database) until the
/// job ends, or until Ctrl-C.
pub async fn events(
    store: Arc<dyn TaskStore>,
    job: Option<JobId>,
    follow: bool,
    after: Option<u64>,
    limit: u32,
    json: bool,
) -> Result<i32> {
    if let Some(id) = job
        && store.get(id).await?.is_none()
    {
        eprintln!("job {id} not found");
        return Ok(crate::client::exit::NOT_FOUND_OR_CANCELLED);
    }
    let mut after = after;
    let page = if follow { 1000 } else { limit.clamp(1, 10_000) };
    let mut interrupt = crate::Interrupt::ctrl_c()?;
    loop {
        let batch = store
            .events(&EventQuery {
                job,
                after,
                limit: page,
            })
            .await?;
        let mut ended = false;
        for e in &batch {
            print_event(e, json)?;
            after = Some(e.id);
            ended |= job.is_some() && e.kind.terminal_state().is_some();
        }
        if !follow || ended {
            return Ok(0);
        }
        if batch.len() < page as usize {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = interrupt.recv() => return Ok(crate::client::exit::INTERRUPTED),
            }
        }
    }
}
