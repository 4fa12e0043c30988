//! Prometheus metrics, derived from the stored event stream (the tail sees every event exactly
//! once, in order, whichever process wrote it) plus gauges read at scrape time (jobs by state,
//! backends). Each server has its own recorder (no global), so embedding several is fine.

use std::collections::HashMap;
use std::sync::Mutex;

use comfyfleet::Engine;
use comfyfleet_core::{
    BackendId, ErrorDetail, ErrorKind, Event, EventKind, JobId, JobState, Timestamp,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

/// Jobs tracked for durations at once; beyond this the oldest half is forgotten (their
/// durations go unmeasured, counters stay exact).
const MAX_TRACKED: usize = 100_000;

/// How often the recorder's histogram samples are drained without a scrape (the period the
/// exporter's own upkeep task uses).
pub(crate) const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `upkeep` every `every` until `stop`. `metrics-exporter-prometheus` keeps each histogram
/// sample (16 bytes) until something drains it, and a recorder built by hand has no upkeep task
/// of its own: a service nobody scrapes would grow by every job's samples.
pub(crate) async fn upkeep_loop(
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
    upkeep: impl Fn(),
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => upkeep(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Track {
    submitted: Option<Timestamp>,
    started: Option<Timestamp>,
    backend: Option<BackendId>,
}

/// The server's metrics.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    jobs: Mutex<HashMap<JobId, Track>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn secs(from: Timestamp, to: Timestamp) -> f64 {
    to.as_millis().saturating_sub(from.as_millis()).max(0) as f64 / 1000.0
}

fn kind_name(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::Deterministic => "deterministic",
        ErrorKind::BackendSpecific => "backend_specific",
        ErrorKind::Transient => "transient",
        ErrorKind::Cancelled => "cancelled",
        ErrorKind::Internal => "internal",
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let buckets = [
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            3600.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets(&buckets)
            .map(|b| b.build_recorder())
            // set_buckets fails only on an empty slice; the slice above is not empty.
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let m = Metrics {
            recorder,
            jobs: Mutex::new(HashMap::new()),
        };
        m.with(|| {
            metrics::describe_counter!("comfyfleet_jobs_submitted_total", "Jobs submitted.");
            metrics::describe_counter!(
                "comfyfleet_jobs_finished_total",
                "Jobs that reached a terminal state, by state."
            );
            metrics::describe_counter!(
                "comfyfleet_attempts_total",
                "Executions dispatched, by backend."
            );
            metrics::describe_counter!(
                "comfyfleet_attempt_failures_total",
                "Failed executions, by backend and error kind."
            );
            metrics::describe_counter!(
                "comfyfleet_failovers_total",
                "Attempts dispatched to another backend than the job's previous attempt."
            );
            metrics::describe_counter!(
                "comfyfleet_timeouts_total",
                "Executions that timed out, by phase (queued, start, node, ...)."
            );
            metrics::describe_counter!(
                "comfyfleet_requeues_total",
                "Jobs handed back after an orchestrator crash or lost lease."
            );
            metrics::describe_histogram!(
                "comfyfleet_queue_wait_seconds",
                "Submission to first start of execution."
            );
            metrics::describe_histogram!(
                "comfyfleet_run_seconds",
                "First start of execution to the terminal state."
            );
            metrics::describe_gauge!("comfyfleet_jobs", "Jobs in the store, by state.");
            metrics::describe_gauge!(
                "comfyfleet_backend_healthy",
                "1 when the backend's latest health check passed."
            );
            metrics::describe_gauge!("comfyfleet_backend_in_flight", "Our executions there.");
            metrics::describe_gauge!(
                "comfyfleet_backend_capacity",
                "Executions it takes at once."
            );
            metrics::describe_gauge!(
                "comfyfleet_backend_available",
                "1 when active, 0 when draining or quarantined."
            );
            metrics::describe_gauge!(
                "comfyfleet_backend_restrictions",
                "Blocks and open circuits keeping work away from the backend."
            );
            metrics::describe_gauge!(
                "comfyfleet_event_subscribers",
                "Live event clients connected."
            );
        });
        m
    }

    /// Drains the histogram samples recorded since the last drain into their buckets (also
    /// done by every render).
    pub(crate) fn upkeep(&self) {
        self.recorder.handle().run_upkeep();
    }

    fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        metrics::with_local_recorder(&self.recorder, f)
    }

    fn tracks(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Track>> {
        // Plain counters; a panic elsewhere cannot leave them meaningfully inconsistent.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one stored event.
    pub(crate) fn observe(&self, e: &Event) {
        let mut jobs = self.tracks();
        if jobs.len() >= MAX_TRACKED {
            let drop: Vec<JobId> = jobs.keys().take(MAX_TRACKED / 2).copied().collect();
            for k in drop {
                jobs.remove(&k);
            }
        }
        self.with(|| match &e.kind {
            EventKind::Submitted { .. } => {
                metrics::counter!("comfyfleet_jobs_submitted_total").increment(1);
                jobs.entry(e.job).or_default().submitted = Some(e.at);
            }
            EventKind::Dispatched { backend, .. } => {
                metrics::counter!("comfyfleet_attempts_total", "backend" => backend.to_string())
                    .increment(1);
                let t = jobs.entry(e.job).or_default();
                if t.backend.as_ref().is_some_and(|b| b != backend) {
                    metrics::counter!("comfyfleet_failovers_total").increment(1);
                }
                t.backend = Some(backend.clone());
            }
            EventKind::Started { .. } => {
                let t = jobs.entry(e.job).or_default();
                if t.started.is_none() {
                    t.started = Some(e.at);
                    if let Some(s) = t.submitted {
                        metrics::histogram!("comfyfleet_queue_wait_seconds").record(secs(s, e.at));
                    }
                }
            }
            EventKind::AttemptFailed { backend, error, .. } => {
                metrics::counter!(
                    "comfyfleet_attempt_failures_total",
                    "backend" => backend.to_string(),
                    "kind" => kind_name(error.kind)
                )
                .increment(1);
                if let Some(ErrorDetail::Timeout { phase, .. }) = &error.detail {
                    metrics::counter!("comfyfleet_timeouts_total", "phase" => phase.as_str())
                        .increment(1);
                }
            }
            EventKind::Requeued { .. } => {
                metrics::counter!("comfyfleet_requeues_total").increment(1);
            }
            kind => {
                if let Some(state) = kind.terminal_state() {
                    metrics::counter!("comfyfleet_jobs_finished_total", "state" => state.as_str())
                        .increment(1);
                    if let Some(t) = jobs.remove(&e.job)
                        && let Some(s) = t.started
                    {
                        metrics::histogram!("comfyfleet_run_seconds", "state" => state.as_str())
                            .record(secs(s, e.at));
                    }
                }
            }
        });
    }

    /// Renders the text exposition, refreshing the gauges first.
    pub(crate) async fn render(&self, engine: &Engine, subscribers: usize) -> String {
        let counts = engine.store().counts().await.ok();
        let backends = engine.backends();
        self.with(|| {
            if let Some(c) = counts {
                for s in JobState::ALL {
                    metrics::gauge!("comfyfleet_jobs", "state" => s.as_str()).set(c.get(s) as f64);
                }
            }
            for b in &backends {
                let id = b.id.to_string();
                metrics::gauge!("comfyfleet_backend_healthy", "backend" => id.clone())
                    .set(if b.health.healthy { 1.0 } else { 0.0 });
                metrics::gauge!("comfyfleet_backend_in_flight", "backend" => id.clone())
                    .set(f64::from(b.in_flight));
                metrics::gauge!("comfyfleet_backend_capacity", "backend" => id.clone())
                    .set(f64::from(b.capabilities.max_concurrent));
                metrics::gauge!("comfyfleet_backend_available", "backend" => id.clone()).set(
                    if matches!(b.availability, comfyfleet_core::Availability::Active) {
                        1.0
                    } else {
                        0.0
                    },
                );
                metrics::gauge!("comfyfleet_backend_restrictions", "backend" => id)
                    .set(b.restrictions.len() as f64);
            }
            metrics::gauge!("comfyfleet_event_subscribers").set(subscribers as f64);
        });
        let handle = self.recorder.handle();
        handle.run_upkeep();
        handle.render()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn upkeep_runs_every_period_without_a_scrape_and_stops_with_the_server() {
        let runs = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let counted = runs.clone();
        let task = tokio::spawn(upkeep_loop(UPKEEP_EVERY, stop.clone(), move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 0, "not at start");
        tokio::time::sleep(UPKEEP_EVERY * 3).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        stop.cancel();
        task.await.unwrap();
        tokio::time::sleep(UPKEEP_EVERY * 3).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "stopped");
    }
}
