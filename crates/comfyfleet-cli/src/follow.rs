//! Showing jobs as they run: one indicatif bar per job (node, percent, ETA) on a terminal, plain
//! lines otherwise (CI logs, pipes); one-line descriptions of job and fleet events; the summary
//! table and JSON at the end. Used by `run` (events from the API) and `demo` (events from the
//! engine). Where the events come from is not this module's business.

use std::collections::HashMap;
use std::io::IsTerminal;

use anyhow::{Context, Result};
use comfyfleet::core::{AttemptOutcome, Progress};
use comfyfleet::{Event, EventKind, FleetEvent, JobId, JobRecord, JobState};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::client::exit;

/// The last 8 characters of a job id: enough to tell a batch apart (UUIDv7 ids of one batch
/// share their leading time bits, not their random tail).
pub fn short(id: JobId) -> String {
    let s = id.to_string();
    s[s.len().saturating_sub(8)..].to_owned()
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// "node 2 TestSleep · ETA 1.2s" for a progress snapshot.
pub fn progress_text(p: &Progress) -> String {
    let mut m = Vec::new();
    if let Some(node) = &p.current_node {
        let mut s = format!("node {node}");
        if let Some(c) = &p.current_class {
            s.push(' ');
            s.push_str(c);
        }
        m.push(s);
    }
    if let Some(eta) = p.eta_ms {
        m.push(format!("ETA {}", secs(eta)));
    }
    m.join(" · ")
}

/// One line for a job event (without time or job id).
pub fn describe(kind: &EventKind) -> String {
    match kind {
        EventKind::Submitted { priority } => format!("submitted (priority {priority})"),
        EventKind::Waiting { reason, .. } => format!("waiting: {reason}"),
        EventKind::Dispatched {
            attempt,
            backend,
            skipped,
        } => {
            let mut s = format!("attempt {attempt} dispatched to {backend}");
            if !skipped.is_empty() {
                let why: Vec<String> = skipped
                    .iter()
                    .map(|s| format!("{}: {}", s.backend, s.reason))
                    .collect();
                s.push_str(&format!(" (passed over {})", why.join("; ")));
            }
            s
        }
        EventKind::Reattached {
            attempt,
            backend,
            remote,
        } => format!("attempt {attempt} reattached on {backend} ({remote})"),
        EventKind::Accepted { attempt, remote } => {
            format!("attempt {attempt} accepted ({remote})")
        }
        EventKind::Queued { attempt, position } => {
            format!("attempt {attempt} queued at position {position}")
        }
        EventKind::Started { attempt } => format!("attempt {attempt} started"),
        EventKind::NodeStarted {
            node, class_type, ..
        } => match class_type {
            Some(c) => format!("node {node} {c} started"),
            None => format!("node {node} started"),
        },
        EventKind::NodeFinished { node, cached, .. } => {
            format!(
                "node {node} {}",
                if *cached { "cached" } else { "finished" }
            )
        }
        EventKind::Progress { progress, .. } => {
            let t = progress_text(progress);
            if t.is_empty() {
                format!("progress {:.0}%", progress.percent)
            } else {
                format!("progress {:.0}% · {t}", progress.percent)
            }
        }
        EventKind::Output {
            node, artifacts, ..
        } => {
            let names: Vec<&str> = artifacts.iter().map(|a| a.filename.as_str()).collect();
            format!("node {node} output {}", names.join(", "))
        }
        EventKind::Warning { message } => format!("warning: {message}"),
        EventKind::AttemptFailed {
            attempt,
            backend,
            error,
            retry_at,
        } => format!(
            "attempt {attempt} on {backend} failed: {} — {}",
            error.message,
            if retry_at.is_some() {
                "will retry"
            } else {
                "giving up"
            }
        ),
        EventKind::CancelRequested { force } => {
            format!("cancel requested{}", if *force { " (force)" } else { "" })
        }
        EventKind::CancelStepTaken { step, .. } => {
            format!("cancel step {}: {}", step.action, step.result)
        }
        EventKind::Requeued { reason, .. } => format!("requeued: {reason}"),
        EventKind::Succeeded {
            backend, artifacts, ..
        } => format!("succeeded on {backend} ({})", outputs(artifacts.len())),
        EventKind::Failed { error } => format!("failed: {}", error.message),
        EventKind::Cancelled { reason } => format!("cancelled: {reason}"),
        other => other.name().to_owned(),
    }
}

fn outputs(n: usize) -> String {
    format!("{n} output{}", if n == 1 { "" } else { "s" })
}

/// One line for a job event, with time and job: `2026-…Z 1b2c3d4e #3 attempt 1 started`.
pub fn event_line(e: &Event) -> String {
    format!("{} {} #{} {}", e.at, e.job, e.seq, describe(&e.kind))
}

/// One line for a fleet event (`None` for job events: use [`event_line`]).
pub fn fleet_line(e: &FleetEvent) -> Option<String> {
    Some(match e {
        FleetEvent::Job(_) => return None,
        FleetEvent::BackendBlocked {
            backend,
            until,
            reason,
            ..
        } => format!("{backend} blocked for one workflow until {until}: {reason}"),
        FleetEvent::BackendUnblocked { backend, .. } => format!("{backend} unblocked"),
        FleetEvent::CircuitOpened {
            backend,
            until,
            reason,
        } => format!("{backend} circuit open until {until}: {reason}"),
        FleetEvent::CircuitClosed { backend } => format!("{backend} circuit closed"),
        FleetEvent::BackendQuarantined { backend, reason } => {
            format!("{backend} quarantined: {reason}")
        }
        FleetEvent::BackendReleased { backend } => format!("{backend} released from quarantine"),
        FleetEvent::Lagged { missed } => format!("fell behind: {missed} live events missed"),
        _ => "fleet event".to_owned(),
    })
}

struct Tracked {
    pb: ProgressBar,
    backend: String,
    end: Option<JobState>,
}

/// The bars of a batch.
pub struct Bars {
    mp: MultiProgress,
    tty: bool,
    style: ProgressStyle,
    jobs: HashMap<JobId, Tracked>,
    order: Vec<JobId>,
}

impl std::fmt::Debug for Bars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bars")
            .field("tty", &self.tty)
            .field("jobs", &self.order.len())
            .finish()
    }
}

impl Bars {
    /// Bars on stderr when it is a terminal; plain lines on stderr otherwise.
    pub fn new() -> Result<Bars> {
        let tty = std::io::stderr().is_terminal();
        let mp = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let style =
            ProgressStyle::with_template("{prefix:.bold} [{bar:28.cyan/blue}] {pos:>3}% {msg}")
                .context("progress bar template")?
                .progress_chars("=> ");
        Ok(Bars {
            mp,
            tty,
            style,
            jobs: HashMap::new(),
            order: Vec::new(),
        })
    }

    /// Whether bars are drawn (stderr is a terminal).
    pub fn is_tty(&self) -> bool {
        self.tty
    }

    /// Prints a line above the bars (or plainly).
    pub fn line(&self, s: impl Into<String>) {
        let s = s.into();
        if self.tty {
            let _ = self.mp.println(s);
        } else {
            eprintln!("{s}");
        }
    }

    /// Adds a job; `label` (a file name, may be empty) follows the short id.
    pub fn add(&mut self, id: JobId, label: &str) {
        if self.jobs.contains_key(&id) {
            return;
        }
        let pb = self.mp.add(ProgressBar::new(100));
        pb.set_style(self.style.clone());
        let label: String = label.chars().take(24).collect();
        pb.set_prefix(if label.is_empty() {
            short(id)
        } else {
            format!("{} {label}", short(id))
        });
        pb.set_message("pending");
        self.jobs.insert(
            id,
            Tracked {
                pb,
                backend: String::new(),
                end: None,
            },
        );
        self.order.push(id);
    }

    /// The jobs, in the order added.
    pub fn ids(&self) -> &[JobId] {
        &self.order
    }

    /// Jobs not yet ended.
    pub fn open(&self) -> usize {
        self.jobs.values().filter(|t| t.end.is_none()).count()
    }

    /// Whether a job has ended.
    pub fn ended(&self, id: JobId) -> bool {
        self.jobs.get(&id).is_some_and(|t| t.end.is_some())
    }

    /// Applies a job event; returns the state when this event ended the job.
    pub fn on_event(&mut self, e: &Event) -> Option<JobState> {
        let tty = self.tty;
        let t = self.jobs.get_mut(&e.job)?;
        if t.end.is_some() {
            return None;
        }
        let id = short(e.job);
        let mut lines = Vec::new();
        match &e.kind {
            EventKind::Dispatched {
                backend,
                skipped,
                attempt,
            } => {
                t.backend = backend.to_string();
                t.pb.set_message(format!("dispatched to {backend}"));
                // "At capacity" is routine; other reasons (inventory, blocks) are news.
                for s in skipped
                    .iter()
                    .filter(|s| !s.reason.starts_with("at capacity"))
                {
                    lines.push(format!(
                        "{id}: attempt {attempt} passed over {}: {}",
                        s.backend, s.reason
                    ));
                }
                if !tty {
                    lines.push(format!("{id}: attempt {attempt} dispatched to {backend}"));
                }
            }
            EventKind::Reattached { backend, .. } => {
                t.backend = backend.to_string();
                t.pb.set_message(format!("reattached on {backend}"));
            }
            EventKind::Queued { position, .. } => {
                t.pb.set_message(format!("{} · queued (position {position})", t.backend))
            }
            EventKind::Started { .. } => t.pb.set_message(format!("{} · running", t.backend)),
            EventKind::NodeStarted {
                node, class_type, ..
            } => t.pb.set_message(format!(
                "{} · node {node}{}",
                t.backend,
                class_type
                    .as_ref()
                    .map(|c| format!(" {c}"))
                    .unwrap_or_default()
            )),
            EventKind::Progress { progress, .. } => {
                t.pb.set_position(progress.percent.clamp(0.0, 100.0).floor() as u64);
                let p = progress_text(progress);
                t.pb.set_message(if p.is_empty() {
                    t.backend.clone()
                } else {
                    format!("{} · {p}", t.backend)
                });
            }
            EventKind::AttemptFailed {
                attempt,
                backend,
                error,
                retry_at,
            } => {
                let next = if retry_at.is_some() {
                    "retrying"
                } else {
                    "giving up"
                };
                lines.push(format!(
                    "{id}: attempt {attempt} on {backend} failed: {} — {next}",
                    error.message
                ));
            }
            EventKind::Waiting { reason, .. } => t.pb.set_message(format!("waiting: {reason}")),
            EventKind::Requeued { reason, .. } => t.pb.set_message(format!("requeued: {reason}")),
            EventKind::CancelRequested { .. } => t.pb.set_message("cancel requested"),
            _ => {}
        }
        let end = e.kind.terminal_state();
        if let Some(state) = end {
            let msg = match &e.kind {
                EventKind::Succeeded {
                    backend, artifacts, ..
                } => format!("succeeded on {backend} ({})", outputs(artifacts.len())),
                other => describe(other),
            };
            self.finish(e.job, state, &msg);
            if !tty {
                lines.push(format!("{id}: {msg}"));
            }
        }
        for l in lines {
            self.line(l);
        }
        end
    }

    /// Marks a job ended (from an event or from reading its record); false if it already was.
    pub fn finish(&mut self, id: JobId, state: JobState, msg: &str) -> bool {
        let Some(t) = self.jobs.get_mut(&id) else {
            return false;
        };
        if t.end.is_some() {
            return false;
        }
        t.end = Some(state);
        if state == JobState::Succeeded {
            t.pb.set_position(100);
            t.pb.finish_with_message(format!("✓ {msg}"));
        } else {
            t.pb.abandon_with_message(format!("✗ {msg}"));
        }
        true
    }

    /// Removes the bars from the terminal (before the summary).
    pub fn clear(&self) {
        self.mp.clear().ok();
    }
}

/// The exit code of a batch: 0 if every job succeeded, 1 if any failed, 2 otherwise (cancelled).
pub fn batch_exit_code(states: impl IntoIterator<Item = JobState>) -> i32 {
    let states: Vec<JobState> = states.into_iter().collect();
    if states.iter().all(|s| *s == JobState::Succeeded) {
        0
    } else if states.contains(&JobState::Failed) {
        exit::FAILED
    } else {
        exit::NOT_FOUND_OR_CANCELLED
    }
}

/// The compact JSON of a finished job (`run --json`, `demo --json`).
pub fn job_json(j: &JobRecord, label: Option<&str>) -> serde_json::Value {
    let mut v = json!({
        "id": j.id,
        "state": j.state,
        "error": j.error.as_ref().map(|e| e.message.clone()),
        "attempts": j.attempts.iter().map(|a| json!({
            "backend": a.backend,
            "outcome": a.outcome,
            "error": a.error.as_ref().map(|e| e.message.clone()),
        })).collect::<Vec<_>>(),
        "artifacts": j.artifacts.iter().map(|a| a.filename.clone()).collect::<Vec<_>>(),
    });
    if let Some(l) = label {
        v["workflow"] = json!(l);
    }
    v
}

/// The summary table of a finished batch, on stdout.
pub fn print_summary(jobs: &[(JobRecord, String)]) {
    let with_labels = jobs.iter().any(|(_, l)| !l.is_empty());
    if with_labels {
        println!(
            "{:<36}  {:<10} {:>6}  {:<20}  path",
            "job", "state", "secs", "workflow"
        );
    } else {
        println!("{:<36}  {:<10} {:>6}  path", "job", "state", "secs");
    }
    for (j, label) in jobs {
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
        let mut path = path.join(" → ");
        if path.is_empty()
            && let Some(e) = &j.error
        {
            path = e.message.clone();
        }
        let secs = j
            .finished_at
            .map(|f| f.since(j.created_at).as_secs_f64())
            .unwrap_or(0.0);
        if with_labels {
            println!(
                "{:<36}  {:<10} {:>6.1}  {:<20}  {path}",
                j.id,
                j.state,
                secs,
                label.chars().take(20).collect::<String>()
            );
        } else {
            println!("{:<36}  {:<10} {:>6.1}  {path}", j.id, j.state, secs);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use comfyfleet::core::{ExecutionError, Timestamp};

    fn event(kind: EventKind) -> Event {
        Event {
            id: 1,
            job: JobId::new(),
            seq: 1,
            at: Timestamp::from_millis(0),
            kind,
        }
    }

    #[test]
    fn events_read_as_one_line() {
        let e = event(EventKind::Progress {
            attempt: 1,
            progress: Progress {
                percent: 42.4,
                nodes_total: 4,
                nodes_done: 1,
                current_node: Some("2".into()),
                current_class: Some("TestSleep".into()),
                node_value: None,
                node_max: None,
                eta_ms: Some(1250),
            },
        });
        let line = event_line(&e);
        assert!(
            line.ends_with("#1 progress 42% · node 2 TestSleep · ETA 1.2s"),
            "{line}"
        );
        assert!(line.starts_with("1970-01-01T00:00:00.000Z "), "{line}");
        let failed = EventKind::Failed {
            error: ExecutionError::deterministic("no backend has FleetNoSuchNode"),
        };
        assert_eq!(describe(&failed), "failed: no backend has FleetNoSuchNode");
    }

    #[test]
    fn bars_track_jobs_to_their_end() {
        let mut bars = Bars::new().unwrap();
        let e = event(EventKind::Cancelled {
            reason: "by me".into(),
        });
        bars.add(e.job, "wf.json");
        assert_eq!(bars.open(), 1);
        assert_eq!(bars.on_event(&e), Some(JobState::Cancelled));
        assert_eq!(bars.open(), 0);
        assert_eq!(bars.on_event(&e), None, "ends once");
        assert!(!bars.finish(e.job, JobState::Failed, "x"));
        // Unknown jobs are ignored.
        assert_eq!(
            bars.on_event(&event(EventKind::Started { attempt: 1 })),
            None
        );
    }

    #[test]
    fn batch_exit_codes() {
        use JobState::*;
        assert_eq!(batch_exit_code([Succeeded, Succeeded]), 0);
        assert_eq!(batch_exit_code([Succeeded, Failed, Cancelled]), 1);
        assert_eq!(batch_exit_code([Succeeded, Cancelled]), 2);
        assert_eq!(batch_exit_code([]), 0);
    }
}
