//! [`SmartFailover`], the default [`FailoverStrategy`].
//!
//! * **Inventory, not trial and error**: a backend that lacks a node class or model file the
//!   workflow needs is never picked, and the reason is recorded (`skipped gpu-2: no node class X`).
//!   A missing-node failure teaches it the same for backends whose inventory was unknown.
//! * **Least loaded** among healthy candidates with a free slot, by power-of-two-choices (as
//!   tower's `balance::p2c`): sample two, take the less loaded — O(1), and it avoids herding onto
//!   one backend when load figures are stale.
//! * **Warm first**: the backend that last ran the same structure hash wins if it has a free slot.
//! * **Blocks**: after a timeout or a backend-specific failure, the backend is blocked for that
//!   structure hash for a cooldown (default 60 s), with fleet events when it blocks and unblocks.
//! * **Circuit breaker** per backend on consecutive transient failures or failed health checks.
//! * Deterministic failures are never retried.
//!
//! ## Spill-over to a paid cloud backend
//!
//! With [`SmartFailoverConfig::spill_over`] set, a fleet of owned servers plus a paid cloud
//! account (RunningHub) prefers the owned GPUs and uses the cloud only when waiting locally
//! would take too long. Without it, every backend is treated alike (the behaviour above).
//!
//! * A backend is **cloud** when its inventory label `tier` is `cloud` (see [`CLOUD_TIER`]);
//!   every other backend is **owned**.
//! * The **expected local wait** is estimated for the best owned backend that could run the
//!   job (inventory, constraints, blocks, circuits and health respected): zero if it has a
//!   free slot by our count (the reported `queue_depth` is only as fresh as the last health
//!   check and still counts our executions that finished since, so it is not trusted for a
//!   backend we see with a free slot); for one at capacity,
//!   `ceil(ahead / max_concurrent) × learned duration`, where
//!   `ahead = max(in_flight, queue_depth) − max_concurrent + 1` (executions that must finish
//!   before this one starts, the backend's own queue of others' work included, as last seen by
//!   a health check) and the learned duration is an
//!   exponentially weighted mean of this workflow structure's run times on owned backends
//!   (from `on_success`; before any is known, [`SpillOver::default_duration`]). A blocked
//!   backend or an open circuit waits until it lifts; a draining, quarantined or unhealthy one
//!   has no bounded wait. The estimate is deliberately simple: it assumes the running
//!   executions just started, and does not count jobs still waiting in the store.
//! * An owned backend with a free slot always wins; the cloud is recorded as skipped
//!   (`spill-over only: an owned backend has a free slot`).
//! * Expected wait ≤ [`SpillOver::threshold`]: the job waits for the owned GPUs, never the
//!   cloud. Above it (or unbounded), the job runs on the cloud if the cloud's executions in
//!   flight (summed over all cloud backends) are below [`SpillOver::max_cloud_in_flight`] and
//!   the account's budget is at least [`SpillOver::min_budget`]; otherwise it waits for the
//!   owned GPUs (or for cloud capacity).
//! * **Budget** is read from the cloud backend's inventory facts `remain_coins` /
//!   `remain_money` (also `remainCoins` / `remainMoney`), parsed as numbers; the largest known
//!   one counts. With `min_budget` set and no such fact, the cloud is not used (the budget is
//!   unknown).
//! * A job no owned backend can ever run (a node class or model only the cloud has,
//!   constraints) goes to the cloud whatever its expected wait, still within the concurrency
//!   cap and the budget.
//! * Every decision is recorded as skip reasons, so the job's `dispatched` event (or its
//!   release reason while it waits) says why the cloud was or was not used. The job keeps
//!   its id wherever it runs: placement only picks the backend of the next attempt.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use comfyfleet_core::{
    Availability, BackendId, Candidate, Decision, ErrorDetail, ErrorKind, ExecutionError,
    FailoverStrategy, FleetEvent, Health, JobRecord, Placement, Restriction, RestrictionKind, Skip,
    Timestamp, Workflow, WorkflowHash,
};

/// Settings of [`SmartFailover`].
#[derive(Debug, Clone)]
pub struct SmartFailoverConfig {
    /// How long a backend stays blocked for a workflow structure after a timeout or a
    /// backend-specific failure.
    pub block_cooldown: Duration,
    /// Consecutive transient failures (or failed health checks) that open a backend's circuit.
    pub circuit_threshold: u32,
    /// How long an open circuit keeps a backend out.
    pub circuit_cooldown: Duration,
    /// First retry delay after a transient failure.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Growth factor of the delay per attempt.
    pub backoff_factor: f32,
    /// Add random jitter to retry delays (spreads retries of many jobs).
    pub jitter: bool,
    /// Seed for the load balancer's sampling (tests use a fixed one).
    pub seed: Option<u64>,
    /// Prefer owned backends and spill over to `tier = "cloud"` backends only when the local
    /// wait is too long (see the module documentation). `None`: all backends alike.
    pub spill_over: Option<SpillOver>,
}

/// The inventory label value (`tier = "cloud"`) that marks a paid, spill-over-only backend.
pub const CLOUD_TIER: &str = "cloud";

/// Settings of spill-over to cloud backends (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct SpillOver {
    /// Expected local wait above which a job goes to the cloud.
    pub threshold: Duration,
    /// Most executions on cloud backends at once (summed over all of them).
    pub max_cloud_in_flight: u32,
    /// Least remaining budget (coins or money from the account's status, as inventory facts)
    /// for the cloud to be used; `None`: no budget check.
    pub min_budget: Option<f64>,
    /// Run time assumed for a workflow structure before one has been learned.
    pub default_duration: Duration,
}

impl Default for SpillOver {
    fn default() -> Self {
        SpillOver {
            threshold: Duration::from_secs(120),
            max_cloud_in_flight: 1,
            min_budget: None,
            default_duration: Duration::from_secs(60),
        }
    }
}

impl Default for SmartFailoverConfig {
    fn default() -> Self {
        SmartFailoverConfig {
            block_cooldown: Duration::from_secs(60),
            circuit_threshold: 5,
            circuit_cooldown: Duration::from_secs(30),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            backoff_factor: 2.0,
            jitter: true,
            seed: None,
            spill_over: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    until: Timestamp,
    reason: String,
}

#[derive(Debug, Default)]
struct Circuit {
    failures: u32,
    open_until: Option<Timestamp>,
}

#[derive(Debug)]
struct State {
    blocks: HashMap<(BackendId, WorkflowHash), Block>,
    warm: HashMap<WorkflowHash, BackendId>,
    circuits: HashMap<BackendId, Circuit>,
    missing: HashMap<BackendId, BTreeSet<String>>,
    notices: Vec<FleetEvent>,
    rng: fastrand::Rng,
    /// Learned run time per workflow structure on owned backends (spill-over estimates).
    durations: HashMap<WorkflowHash, Duration>,
    /// Backends seen labelled `tier = cloud` (their run times are not learned).
    cloud: HashSet<BackendId>,
}

/// The default failover strategy. See the module documentation.
#[derive(Debug)]
pub struct SmartFailover {
    config: SmartFailoverConfig,
    state: Mutex<State>,
}

impl Default for SmartFailover {
    fn default() -> Self {
        Self::new(SmartFailoverConfig::default())
    }
}

/// Why a candidate was passed over, and whether that can change soon.
enum Verdict {
    Eligible,
    /// Can change soon (blocked, circuit open, unhealthy): the job waits.
    Temporary(String, Option<Timestamp>),
    /// Healthy and able to run it, but every slot is taken: the job waits.
    Full(String),
    /// Cannot change without an operator (constraints, inventory).
    Permanent(String, Option<String>),
}

impl SmartFailover {
    /// A strategy with these settings.
    pub fn new(config: SmartFailoverConfig) -> Self {
        let rng = match config.seed {
            Some(s) => fastrand::Rng::with_seed(s),
            None => fastrand::Rng::new(),
        };
        SmartFailover {
            config,
            state: Mutex::new(State {
                blocks: HashMap::new(),
                warm: HashMap::new(),
                circuits: HashMap::new(),
                missing: HashMap::new(),
                notices: Vec::new(),
                rng,
                durations: HashMap::new(),
                cloud: HashSet::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Strategy state is advisory (blocks, warm hints); after a panic elsewhere keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The delay before retry number `attempt` (1-based) after a transient failure.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let mut b = ExponentialBuilder::default()
            .with_min_delay(self.config.backoff_min)
            .with_max_delay(self.config.backoff_max)
            .with_factor(self.config.backoff_factor)
            .without_max_times();
        if self.config.jitter {
            b = b.with_jitter();
        }
        b.build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(self.config.backoff_max)
    }

    /// Whether `backend` is blocked for `structure` at `now`.
    pub fn is_blocked(
        &self,
        backend: &BackendId,
        structure: &WorkflowHash,
        now: Timestamp,
    ) -> bool {
        self.lock()
            .blocks
            .get(&(backend.clone(), structure.clone()))
            .is_some_and(|b| b.until > now)
    }

    fn expire(&self, s: &mut State, now: Timestamp) {
        let expired: Vec<(BackendId, WorkflowHash)> = s
            .blocks
            .iter()
            .filter(|(_, b)| b.until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for (backend, structure) in expired {
            s.blocks.remove(&(backend.clone(), structure.clone()));
            s.notices
                .push(FleetEvent::BackendUnblocked { backend, structure });
        }
        let mut closed = Vec::new();
        for (id, c) in s.circuits.iter_mut() {
            if c.open_until.is_some_and(|t| t <= now) {
                // Half-open: let work through again; the next failure re-opens it at once.
                c.open_until = None;
                c.failures = self.config.circuit_threshold.saturating_sub(1);
                closed.push(id.clone());
            }
        }
        for backend in closed {
            s.notices.push(FleetEvent::CircuitClosed { backend });
        }
    }

    fn block(
        &self,
        s: &mut State,
        backend: &BackendId,
        structure: &WorkflowHash,
        reason: &str,
        now: Timestamp,
    ) {
        let until = now.add(self.config.block_cooldown);
        s.blocks.insert(
            (backend.clone(), structure.clone()),
            Block {
                until,
                reason: reason.to_owned(),
            },
        );
        s.notices.push(FleetEvent::BackendBlocked {
            backend: backend.clone(),
            structure: structure.clone(),
            until,
            reason: reason.to_owned(),
        });
    }

    fn circuit_failure(&self, s: &mut State, backend: &BackendId, reason: &str, now: Timestamp) {
        let c = s.circuits.entry(backend.clone()).or_default();
        c.failures += 1;
        if c.open_until.is_none() && c.failures >= self.config.circuit_threshold {
            let until = now.add(self.config.circuit_cooldown);
            c.open_until = Some(until);
            s.notices.push(FleetEvent::CircuitOpened {
                backend: backend.clone(),
                until,
                reason: format!("{} consecutive failures; last: {reason}", c.failures),
            });
        }
    }

    fn circuit_success(&self, s: &mut State, backend: &BackendId) {
        if let Some(c) = s.circuits.get_mut(backend) {
            c.failures = 0;
            if c.open_until.take().is_some() {
                s.notices.push(FleetEvent::CircuitClosed {
                    backend: backend.clone(),
                });
            }
        }
    }

    fn verdict(
        &self,
        s: &mut State,
        job: &JobRecord,
        workflow: &Workflow,
        c: &Candidate,
    ) -> Verdict {
        let constraints = &job.spec.constraints;
        if !constraints.backends.is_empty() && !constraints.backends.contains(&c.id) {
            return Verdict::Permanent("not among the job's allowed backends".into(), None);
        }
        for (k, v) in &constraints.labels {
            if c.inventory.labels.get(k) != Some(v) {
                return Verdict::Permanent(format!("label {k}={v} not set"), None);
            }
        }
        if !job.spec.uploads.is_empty() && !c.capabilities.uploads {
            return Verdict::Permanent("does not accept input uploads".into(), None);
        }
        if let Some(reason) = c.inventory.missing_for(workflow) {
            let class = reason.strip_prefix("no node class ").map(str::to_owned);
            return Verdict::Permanent(reason, class);
        }
        if let Some(missing) = s.missing.get_mut(&c.id) {
            // A class the inventory now lists was installed since: forget what we learned.
            if let Some(have) = &c.inventory.node_classes {
                missing.retain(|m| !have.contains(m));
            }
            if let Some(class) = workflow
                .required_classes()
                .into_iter()
                .find(|r| missing.contains(r))
            {
                return Verdict::Permanent(
                    format!("no node class {class} (the backend reported it missing)"),
                    Some(class),
                );
            }
        }
        match &c.availability {
            Availability::Active => {}
            Availability::Draining => return Verdict::Temporary("draining".into(), None),
            Availability::Quarantined { reason } => {
                return Verdict::Temporary(format!("quarantined: {reason}"), None);
            }
        }
        if let Some(until) = s.circuits.get(&c.id).and_then(|c| c.open_until) {
            return Verdict::Temporary(format!("circuit open until {until}"), Some(until));
        }
        if !c.health.healthy {
            return Verdict::Temporary(format!("unhealthy: {}", c.health.detail), None);
        }
        if let Some(b) = s
            .blocks
            .get(&(c.id.clone(), workflow.structure_hash().clone()))
        {
            return Verdict::Temporary(
                format!("blocked for this workflow until {}: {}", b.until, b.reason),
                Some(b.until),
            );
        }
        if c.free_slots() == 0 {
            return Verdict::Full(format!(
                "at capacity ({}/{})",
                c.in_flight, c.capabilities.max_concurrent
            ));
        }
        Verdict::Eligible
    }
}

#[async_trait]
impl FailoverStrategy for SmartFailover {
    async fn pick(
        &self,
        job: &JobRecord,
        workflow: &Workflow,
        candidates: &[Candidate],
        now: Timestamp,
    ) -> Placement {
        let mut s = self.lock();
        self.expire(&mut s, now);
        let mut verdicts = Vec::with_capacity(candidates.len());
        for c in candidates {
            let v = self.verdict(&mut s, job, workflow, c);
            verdicts.push((c, v));
        }
        if let Some(spill) = &self.config.spill_over {
            return self.pick_spilling(&mut s, spill, job, workflow, verdicts, now);
        }
        let mut skipped = Vec::new();
        let mut eligible: Vec<&Candidate> = Vec::new();
        let mut any_temporary = false;
        let mut earliest: Option<Timestamp> = None;
        // Something may free up at an unknown moment (a busy slot, an unhealthy backend): the
        // job must not be parked until a later known moment (a block's end).
        let mut open_ended = false;
        let mut missing_class: Option<String> = None;
        for (c, v) in verdicts {
            match v {
                Verdict::Eligible => eligible.push(c),
                Verdict::Temporary(reason, until) => {
                    any_temporary = true;
                    open_ended |= until.is_none();
                    earliest = min_time(earliest, until);
                    skipped.push(Skip {
                        backend: c.id.clone(),
                        reason,
                    });
                }
                Verdict::Full(reason) => {
                    any_temporary = true;
                    open_ended = true;
                    skipped.push(Skip {
                        backend: c.id.clone(),
                        reason,
                    });
                }
                Verdict::Permanent(reason, class) => {
                    if missing_class.is_none() {
                        missing_class = class;
                    }
                    skipped.push(Skip {
                        backend: c.id.clone(),
                        reason,
                    });
                }
            }
        }
        if eligible.is_empty() {
            if candidates.is_empty() {
                return no_backends(skipped);
            }
            if any_temporary {
                return Placement::Wait {
                    reason: format!("no backend can take it now ({})", summary(&skipped)),
                    until: if open_ended { None } else { earliest },
                    skipped,
                };
            }
            return impossible(skipped, missing_class);
        }
        let chosen = choose(&mut s, job, workflow.structure_hash(), eligible);
        Placement::Run {
            backend: chosen.id.clone(),
            skipped,
        }
    }

    async fn on_failure(
        &self,
        job: &JobRecord,
        workflow: &Workflow,
        backend: &BackendId,
        error: &ExecutionError,
        now: Timestamp,
    ) -> Decision {
        let mut s = self.lock();
        let structure = workflow.structure_hash();
        match error.kind {
            ErrorKind::Deterministic | ErrorKind::Cancelled => Decision::GiveUp,
            ErrorKind::BackendSpecific => {
                if let Some(class) = error.missing_class() {
                    s.missing
                        .entry(backend.clone())
                        .or_default()
                        .insert(class.to_owned());
                }
                self.block(&mut s, backend, structure, &error.message, now);
                Decision::Retry {
                    delay: Duration::ZERO,
                }
            }
            ErrorKind::Transient if error.timeout_phase().is_some() => {
                self.block(&mut s, backend, structure, &error.message, now);
                self.circuit_failure(&mut s, backend, &error.message, now);
                Decision::Retry {
                    delay: Duration::ZERO,
                }
            }
            ErrorKind::Transient | ErrorKind::Internal => {
                self.circuit_failure(&mut s, backend, &error.message, now);
                drop(s);
                Decision::Retry {
                    delay: self.backoff(job.counted_attempts()),
                }
            }
        }
    }

    async fn on_success(
        &self,
        _job: &JobRecord,
        workflow: &Workflow,
        backend: &BackendId,
        run_time: Duration,
        _now: Timestamp,
    ) {
        let mut s = self.lock();
        self.circuit_success(&mut s, backend);
        if !s.cloud.contains(backend) {
            // Exponentially weighted: recent runs matter most, one outlier does not dominate.
            let structure = workflow.structure_hash();
            let learned = match s.durations.get(structure) {
                Some(prev) => prev.mul_f64(0.7) + run_time.mul_f64(0.3),
                None => run_time,
            };
            s.durations.insert(structure.clone(), learned);
        }
        s.warm
            .insert(workflow.structure_hash().clone(), backend.clone());
    }

    async fn on_health(&self, backend: &BackendId, health: &Health, now: Timestamp) {
        let mut s = self.lock();
        if health.healthy {
            // A passing health check resets the failure count but does not close an open
            // circuit: the server can answer health checks while every job on it fails.
            if let Some(c) = s.circuits.get_mut(backend)
                && c.open_until.is_none()
            {
                c.failures = 0;
            }
        } else {
            self.circuit_failure(
                &mut s,
                backend,
                &format!("health check: {}", health.detail),
                now,
            );
        }
    }

    fn take_notices(&self, now: Timestamp) -> Vec<FleetEvent> {
        let mut s = self.lock();
        self.expire(&mut s, now);
        std::mem::take(&mut s.notices)
    }

    fn adopt(&self, restrictions: &[Restriction], now: Timestamp) {
        let mut s = self.lock();
        for r in restrictions.iter().filter(|r| r.until > now) {
            match (r.kind, &r.structure) {
                (RestrictionKind::Blocked, Some(structure)) => {
                    let key = (r.backend.clone(), structure.clone());
                    if s.blocks.get(&key).is_some_and(|b| b.until >= r.until) {
                        continue;
                    }
                    s.blocks.insert(
                        key,
                        Block {
                            until: r.until,
                            reason: r.reason.clone(),
                        },
                    );
                    s.notices.push(FleetEvent::BackendBlocked {
                        backend: r.backend.clone(),
                        structure: structure.clone(),
                        until: r.until,
                        reason: format!("{} (seen by another orchestrator)", r.reason),
                    });
                }
                (RestrictionKind::Blocked, None) => {}
                (RestrictionKind::CircuitOpen, _) => {
                    let threshold = self.config.circuit_threshold;
                    let c = s.circuits.entry(r.backend.clone()).or_default();
                    if c.open_until.is_some_and(|t| t >= r.until) {
                        continue;
                    }
                    let was_open = c.open_until.is_some();
                    c.open_until = Some(r.until);
                    c.failures = c.failures.max(threshold);
                    if !was_open {
                        s.notices.push(FleetEvent::CircuitOpened {
                            backend: r.backend.clone(),
                            until: r.until,
                            reason: format!("{} (seen by another orchestrator)", r.reason),
                        });
                    }
                }
            }
        }
    }

    fn restrictions(&self, now: Timestamp) -> Vec<Restriction> {
        let s = self.lock();
        let mut out: Vec<Restriction> = s
            .blocks
            .iter()
            .filter(|(_, b)| b.until > now)
            .map(|((backend, structure), b)| Restriction {
                backend: backend.clone(),
                kind: RestrictionKind::Blocked,
                structure: Some(structure.clone()),
                until: b.until,
                reason: b.reason.clone(),
            })
            .collect();
        out.extend(s.circuits.iter().filter_map(|(backend, c)| {
            c.open_until.filter(|t| *t > now).map(|until| Restriction {
                backend: backend.clone(),
                kind: RestrictionKind::CircuitOpen,
                structure: None,
                until,
                reason: format!("{} consecutive failures", c.failures),
            })
        }));
        out.sort_by(|a, b| (&a.backend, a.until).cmp(&(&b.backend, b.until)));
        out
    }
}

/// Whether a candidate is a paid, spill-over-only backend (`tier = "cloud"`).
fn is_cloud(c: &Candidate) -> bool {
    c.inventory
        .labels
        .get("tier")
        .is_some_and(|t| t == CLOUD_TIER)
}

/// The remaining budget a cloud candidate reports in its inventory facts (largest known one).
fn budget(c: &Candidate) -> Option<f64> {
    ["remain_coins", "remain_money", "remainCoins", "remainMoney"]
        .iter()
        .filter_map(|k| c.inventory.facts.get(*k)?.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .reduce(f64::max)
}

/// How long a job would wait for a slot on `c` (at capacity), each execution taking `per_job`.
/// How long a job would wait for a worker on `c`, each execution taking `per_job`: zero while
/// executions (ours, or the backend's own queue) leave a worker free.
fn expected_wait(c: &Candidate, per_job: Duration) -> Duration {
    let cap = c.capabilities.max_concurrent.max(1);
    let total = c.in_flight.max(c.health.queue_depth.unwrap_or(0));
    if total < cap {
        return Duration::ZERO;
    }
    let ahead = total - cap + 1;
    per_job.saturating_mul(ahead.div_ceil(cap))
}

fn min_time(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn summary(skipped: &[Skip]) -> String {
    skipped
        .iter()
        .map(|k| format!("{}: {}", k.backend, k.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

fn no_backends(skipped: Vec<Skip>) -> Placement {
    Placement::Impossible {
        error: ExecutionError::deterministic("the fleet has no backends"),
        skipped,
    }
}

/// No backend in the fleet can ever run it as things stand.
fn impossible(skipped: Vec<Skip>, missing_class: Option<String>) -> Placement {
    let message = match &missing_class {
        Some(class) => format!(
            "no backend in the fleet has node class {class} ({})",
            summary(&skipped)
        ),
        None => format!(
            "no backend in the fleet can run this job ({})",
            summary(&skipped)
        ),
    };
    let mut error = ExecutionError::new(ErrorKind::BackendSpecific, message);
    if let Some(class) = missing_class {
        error = error.with_detail(ErrorDetail::MissingNode { class_type: class });
    }
    Placement::Impossible { error, skipped }
}

/// Picks among eligible candidates (non-empty): away from the last failure, warm first, then
/// the less loaded of two sampled.
fn choose<'a>(
    s: &mut State,
    job: &JobRecord,
    structure: &WorkflowHash,
    mut eligible: Vec<&'a Candidate>,
) -> &'a Candidate {
    // After a failure, go elsewhere if anywhere else can take it.
    if let Some(last) = job.attempts.last().filter(|a| a.error.is_some())
        && eligible.len() > 1
    {
        eligible.retain(|c| c.id != last.backend);
    }
    if let Some(warm) = s
        .warm
        .get(structure)
        .and_then(|w| eligible.iter().find(|c| &c.id == w))
    {
        warm
    } else if eligible.len() == 1 {
        eligible[0]
    } else {
        let n = eligible.len();
        let i = s.rng.usize(..n);
        let mut j = s.rng.usize(..n - 1);
        if j >= i {
            j += 1;
        }
        let (a, b) = (eligible[i], eligible[j]);
        if (b.load(), b.in_flight) < (a.load(), a.in_flight) {
            b
        } else {
            a
        }
    }
}

impl SmartFailover {
    /// [`FailoverStrategy::pick`] with spill-over configured (see the module documentation).
    fn pick_spilling(
        &self,
        s: &mut State,
        spill: &SpillOver,
        job: &JobRecord,
        workflow: &Workflow,
        verdicts: Vec<(&Candidate, Verdict)>,
        now: Timestamp,
    ) -> Placement {
        let structure = workflow.structure_hash();
        let per_job = s
            .durations
            .get(structure)
            .copied()
            .unwrap_or(spill.default_duration);
        let no_candidates = verdicts.is_empty();
        let mut skipped = Vec::new();
        let mut owned_skips = Vec::new();
        let mut owned_ok: Vec<&Candidate> = Vec::new();
        let mut cloud_ok: Vec<&Candidate> = Vec::new();
        // The shortest bounded wait on an owned backend that could run it later.
        let mut local_wait: Option<Duration> = None;
        let mut owned_later = false;
        let mut cloud_later = false;
        let mut earliest: Option<Timestamp> = None;
        let mut open_ended = false;
        let mut missing_class: Option<String> = None;
        let mut cloud_in_flight: u32 = 0;
        for (c, v) in verdicts {
            let cloud = is_cloud(c);
            if cloud {
                s.cloud.insert(c.id.clone());
                cloud_in_flight = cloud_in_flight.saturating_add(c.in_flight);
            }
            let reason = match v {
                Verdict::Eligible if cloud => {
                    cloud_ok.push(c);
                    continue;
                }
                Verdict::Eligible => {
                    // A free slot by our count: no wait. (The backend's own queue_depth is
                    // not trusted here: it is only as fresh as the last health check and
                    // still counts our executions that finished since.)
                    owned_ok.push(c);
                    continue;
                }
                Verdict::Full(reason) if cloud => {
                    cloud_later = true;
                    open_ended = true;
                    reason
                }
                Verdict::Full(reason) => {
                    owned_later = true;
                    open_ended = true;
                    let w = expected_wait(c, per_job);
                    local_wait = Some(local_wait.map_or(w, |l| l.min(w)));
                    owned_skips.push(skipped.len());
                    format!("{reason}, expected wait {w:?}")
                }
                Verdict::Temporary(reason, until) => {
                    open_ended |= until.is_none();
                    earliest = min_time(earliest, until);
                    if cloud {
                        cloud_later = true;
                    } else {
                        owned_later = true;
                        if let Some(u) = until {
                            let w = u.since(now);
                            local_wait = Some(local_wait.map_or(w, |l| l.min(w)));
                        }
                        owned_skips.push(skipped.len());
                    }
                    reason
                }
                Verdict::Permanent(reason, class) => {
                    if missing_class.is_none() {
                        missing_class = class;
                    }
                    reason
                }
            };
            skipped.push(Skip {
                backend: c.id.clone(),
                reason,
            });
        }

        if !owned_ok.is_empty() {
            for c in &cloud_ok {
                skipped.push(Skip {
                    backend: c.id.clone(),
                    reason: "spill-over only: an owned backend has a free slot".into(),
                });
            }
            let chosen = choose(s, job, structure, owned_ok);
            return Placement::Run {
                backend: chosen.id.clone(),
                skipped,
            };
        }

        let threshold = spill.threshold;
        if owned_later && let Some(w) = local_wait.filter(|w| *w <= threshold) {
            let why = format!(
                "spill-over not needed: expected local wait {w:?} is within the threshold {threshold:?}"
            );
            for c in &cloud_ok {
                skipped.push(Skip {
                    backend: c.id.clone(),
                    reason: why.clone(),
                });
            }
            return Placement::Wait {
                reason: format!(
                    "waiting for an owned backend: expected local wait {w:?} is within the \
                     spill-over threshold {threshold:?} ({})",
                    summary(&skipped)
                ),
                until: if open_ended { None } else { earliest },
                skipped,
            };
        }

        let why = match (owned_later, local_wait) {
            (true, Some(w)) => {
                format!("expected local wait {w:?} exceeds the spill-over threshold {threshold:?}")
            }
            (true, None) => "no owned backend can take it soon".to_owned(),
            (false, _) => "no owned backend can run it".to_owned(),
        };
        let gated = !cloud_ok.is_empty();
        let mut usable: Vec<&Candidate> = Vec::new();
        for c in cloud_ok {
            let refusal = if cloud_in_flight >= spill.max_cloud_in_flight {
                Some(format!(
                    "spill-over wanted ({why}) but the cloud concurrency limit is reached \
                     ({cloud_in_flight}/{})",
                    spill.max_cloud_in_flight
                ))
            } else if let Some(min) = spill.min_budget {
                match budget(c) {
                    None => Some(format!(
                        "spill-over wanted ({why}) but the budget is unknown (no remain_coins or \
                         remain_money fact; minimum budget {min})"
                    )),
                    Some(b) if b < min => Some(format!(
                        "spill-over wanted ({why}) but the budget {b} is below the minimum {min}"
                    )),
                    Some(_) => None,
                }
            } else {
                None
            };
            match refusal {
                Some(reason) => skipped.push(Skip {
                    backend: c.id.clone(),
                    reason,
                }),
                None => usable.push(c),
            }
        }
        if !usable.is_empty() {
            for i in owned_skips {
                if let Some(k) = skipped.get_mut(i) {
                    k.reason = format!("{}; spilled over to the cloud: {why}", k.reason);
                }
            }
            let chosen = choose(s, job, structure, usable);
            return Placement::Run {
                backend: chosen.id.clone(),
                skipped,
            };
        }
        if no_candidates {
            return no_backends(skipped);
        }
        if owned_later || cloud_later || gated {
            return Placement::Wait {
                reason: format!("no backend can take it now ({})", summary(&skipped)),
                until: if open_ended || gated { None } else { earliest },
                skipped,
            };
        }
        impossible(skipped, missing_class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comfyfleet_core::{Capabilities, JobSpec, MemoryStore, NewJob, TaskStore, TimeoutPhase};
    use serde_json::json;

    fn workflow() -> Workflow {
        Workflow::from_value(json!({"1": {"class_type": "A"}, "2": {"class_type": "SaveImage", "inputs": {"x": ["1", 0]}}}))
            .unwrap()
    }

    async fn job() -> JobRecord {
        let store = MemoryStore::new();
        let e = store
            .enqueue(NewJob::new(JobSpec::new(workflow())), Timestamp::EPOCH)
            .await
            .unwrap();
        store.get(e.id).await.unwrap().unwrap()
    }

    fn cand(id: &str, in_flight: u32, cap: u32) -> Candidate {
        Candidate {
            id: BackendId::new(id),
            capabilities: Capabilities {
                max_concurrent: cap,
                ..Capabilities::default()
            },
            inventory: Default::default(),
            in_flight,
            health: Health::ok(),
            availability: Availability::Active,
        }
    }

    fn strategy() -> SmartFailover {
        SmartFailover::new(SmartFailoverConfig {
            jitter: false,
            seed: Some(1),
            ..Default::default()
        })
    }

    fn picked(p: &Placement) -> &str {
        match p {
            Placement::Run { backend, .. } => backend.as_str(),
            other => panic!("expected a pick, got {other:?}"),
        }
    }

    fn cloud_cand(id: &str, in_flight: u32, cap: u32, facts: &[(&str, &str)]) -> Candidate {
        let mut c = cand(id, in_flight, cap);
        let inv = std::sync::Arc::make_mut(&mut c.inventory);
        inv.labels.insert("tier".into(), CLOUD_TIER.into());
        for (k, v) in facts {
            inv.facts.insert((*k).into(), (*v).into());
        }
        c
    }

    fn spilling(spill: SpillOver) -> SmartFailover {
        SmartFailover::new(SmartFailoverConfig {
            jitter: false,
            seed: Some(1),
            spill_over: Some(spill),
            ..Default::default()
        })
    }

    fn spill_60s() -> SpillOver {
        SpillOver {
            threshold: Duration::from_secs(60),
            max_cloud_in_flight: 2,
            min_budget: None,
            default_duration: Duration::from_secs(100),
        }
    }

    #[tokio::test]
    async fn without_spill_over_a_cloud_backend_is_an_ordinary_one() {
        let s = strategy();
        let (j, w) = (job().await, workflow());
        let p = s
            .pick(
                &j,
                &w,
                &[cand("gpu", 1, 1), cloud_cand("rh", 0, 1, &[])],
                Timestamp::EPOCH,
            )
            .await;
        assert_eq!(picked(&p), "rh");
    }

    #[tokio::test]
    async fn the_cloud_concurrency_cap_counts_every_cloud_backend() {
        let s = spilling(spill_60s());
        let (j, w) = (job().await, workflow());
        let cands = [
            cand("gpu", 1, 1),
            cloud_cand("rh-1", 1, 4, &[]),
            cloud_cand("rh-2", 0, 4, &[]),
        ];
        assert_eq!(
            picked(&s.pick(&j, &w, &cands, Timestamp::EPOCH).await),
            "rh-2",
            "one of two cloud slots used"
        );
        let cands = [
            cand("gpu", 1, 1),
            cloud_cand("rh-1", 1, 4, &[]),
            cloud_cand("rh-2", 1, 4, &[]),
        ];
        let p = s.pick(&j, &w, &cands, Timestamp::EPOCH).await;
        let Placement::Wait { reason, .. } = p else {
            panic!("{p:?}")
        };
        assert!(
            reason.contains("cloud concurrency limit is reached (2/2)"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn an_unknown_budget_is_refused_when_a_minimum_is_set_and_coins_or_money_count() {
        let s = spilling(SpillOver {
            min_budget: Some(10.0),
            ..spill_60s()
        });
        let (j, w) = (job().await, workflow());
        let p = s
            .pick(
                &j,
                &w,
                &[cand("gpu", 1, 1), cloud_cand("rh", 0, 1, &[])],
                Timestamp::EPOCH,
            )
            .await;
        let Placement::Wait { reason, .. } = p else {
            panic!("{p:?}")
        };
        assert!(reason.contains("budget is unknown"), "{reason}");
        let rich = cloud_cand(
            "rh",
            0,
            1,
            &[("remain_coins", "3"), ("remain_money", "12.5")],
        );
        let p = s
            .pick(&j, &w, &[cand("gpu", 1, 1), rich], Timestamp::EPOCH)
            .await;
        assert_eq!(picked(&p), "rh");
    }

    #[tokio::test]
    async fn run_times_are_learned_on_owned_backends_only() {
        let s = spilling(spill_60s());
        let (j, w) = (job().await, workflow());
        let t = Timestamp::EPOCH;
        let cands = [cand("gpu", 1, 1), cloud_cand("rh", 0, 1, &[])];
        // Default 100 s > 60 s: spill. The pick also learns that `rh` is cloud.
        assert_eq!(picked(&s.pick(&j, &w, &cands, t).await), "rh");
        // A fast cloud run teaches nothing; a 30 s owned run does.
        s.on_success(&j, &w, &BackendId::new("rh"), Duration::from_secs(1), t)
            .await;
        assert_eq!(picked(&s.pick(&j, &w, &cands, t).await), "rh");
        s.on_success(&j, &w, &BackendId::new("gpu"), Duration::from_secs(30), t)
            .await;
        let p = s.pick(&j, &w, &cands, t).await;
        let Placement::Wait {
            reason, skipped, ..
        } = p
        else {
            panic!("{p:?}")
        };
        assert!(reason.contains("expected local wait 30s"), "{reason}");
        assert!(
            skipped
                .iter()
                .any(|k| k.backend.as_str() == "rh" && k.reason.contains("spill-over not needed")),
            "{skipped:?}"
        );
    }

    #[tokio::test]
    async fn picks_the_less_loaded_of_two_every_time() {
        let s = strategy();
        let (j, w) = (job().await, workflow());
        for _ in 0..50 {
            let p = s
                .pick(
                    &j,
                    &w,
                    &[cand("busy", 3, 4), cand("idle", 0, 4)],
                    Timestamp::EPOCH,
                )
                .await;
            assert_eq!(picked(&p), "idle");
        }
    }

    #[tokio::test]
    async fn prefers_the_warm_backend_while_it_has_a_slot() {
        let s = strategy();
        let (j, w) = (job().await, workflow());
        s.on_success(
            &j,
            &w,
            &BackendId::new("warm"),
            Duration::from_secs(1),
            Timestamp::EPOCH,
        )
        .await;
        let cands = [
            cand("warm", 1, 2),
            cand("cold-1", 0, 2),
            cand("cold-2", 0, 2),
        ];
        for _ in 0..20 {
            assert_eq!(
                picked(&s.pick(&j, &w, &cands, Timestamp::EPOCH).await),
                "warm"
            );
        }
        let full = [cand("warm", 2, 2), cand("cold-1", 0, 2)];
        assert_eq!(
            picked(&s.pick(&j, &w, &full, Timestamp::EPOCH).await),
            "cold-1"
        );
    }

    #[tokio::test]
    async fn deterministic_failures_give_up_and_transient_ones_back_off() {
        let s = strategy();
        let (j, w) = (job().await, workflow());
        let b = BackendId::new("b");
        let d = s
            .on_failure(
                &j,
                &w,
                &b,
                &ExecutionError::deterministic("bad"),
                Timestamp::EPOCH,
            )
            .await;
        assert_eq!(d, Decision::GiveUp);
        let d = s
            .on_failure(
                &j,
                &w,
                &b,
                &ExecutionError::cancelled("x"),
                Timestamp::EPOCH,
            )
            .await;
        assert_eq!(d, Decision::GiveUp);
        assert!(!s.is_blocked(&b, w.structure_hash(), Timestamp::EPOCH));
        let d = s
            .on_failure(
                &j,
                &w,
                &b,
                &ExecutionError::transient("503"),
                Timestamp::EPOCH,
            )
            .await;
        assert_eq!(
            d,
            Decision::Retry {
                delay: Duration::from_secs(1)
            }
        );
        assert_eq!(s.backoff(3), Duration::from_secs(4));
        assert_eq!(s.backoff(30), Duration::from_secs(60), "capped");
        let t = ExecutionError::timeout(TimeoutPhase::Start, Duration::from_secs(5), None);
        let d = s.on_failure(&j, &w, &b, &t, Timestamp::EPOCH).await;
        assert_eq!(
            d,
            Decision::Retry {
                delay: Duration::ZERO
            },
            "a timeout goes elsewhere at once"
        );
        assert!(s.is_blocked(&b, w.structure_hash(), Timestamp::EPOCH));
        assert!(!s.is_blocked(
            &b,
            w.structure_hash(),
            Timestamp::EPOCH.add(Duration::from_secs(60))
        ));
    }

    #[tokio::test]
    async fn restrictions_of_another_orchestrator_are_adopted() {
        let (a, b) = (strategy(), strategy());
        let (j, w) = (job().await, workflow());
        let t0 = Timestamp::EPOCH;
        let gpu = BackendId::new("gpu");
        // A: a start timeout blocks gpu for this structure; five 5xx open flaky's circuit.
        let t = ExecutionError::timeout(TimeoutPhase::Start, Duration::from_secs(5), None);
        a.on_failure(&j, &w, &gpu, &t, t0).await;
        let flaky = BackendId::new("flaky");
        for _ in 0..5 {
            a.on_failure(&j, &w, &flaky, &ExecutionError::transient("503"), t0)
                .await;
        }
        let shared = a.restrictions(t0);
        assert_eq!(shared.len(), 2, "{shared:?}");

        // B never saw those failures; after adopting A's restrictions it avoids both.
        assert_eq!(
            picked(&b.pick(&j, &w, &[cand("gpu", 0, 1)], t0).await),
            "gpu"
        );
        b.adopt(&shared, t0);
        assert!(b.is_blocked(&gpu, w.structure_hash(), t0));
        let p = b.pick(&j, &w, &[cand("flaky", 0, 1)], t0).await;
        assert!(matches!(p, Placement::Wait { .. }), "{p:?}");
        let notices = b.take_notices(t0);
        assert!(
            notices.iter().any(
                |n| matches!(n, FleetEvent::BackendBlocked { backend, .. } if *backend == gpu)
            ),
            "{notices:?}"
        );
        assert!(
            notices.iter().any(
                |n| matches!(n, FleetEvent::CircuitOpened { backend, .. } if *backend == flaky)
            ),
            "{notices:?}"
        );
        // Adopting the same again changes nothing and says nothing; an earlier `until` does not
        // shorten a block.
        b.adopt(&shared, t0);
        let earlier: Vec<Restriction> = shared
            .iter()
            .map(|r| Restriction {
                until: t0.add(Duration::from_secs(1)),
                ..r.clone()
            })
            .collect();
        b.adopt(&earlier, t0);
        assert!(b.take_notices(t0).is_empty());
        assert!(b.is_blocked(&gpu, w.structure_hash(), t0.add(Duration::from_secs(2))));
        // Lifted ones (until <= now) are ignored.
        let c = strategy();
        c.adopt(&shared, t0.add(Duration::from_secs(3600)));
        assert!(c.restrictions(t0).is_empty());
    }

    #[tokio::test]
    async fn a_circuit_opens_after_repeated_transient_failures_and_half_opens_after_the_cooldown() {
        let s = strategy();
        let (j, w) = (job().await, workflow());
        let b = BackendId::new("flaky");
        let t0 = Timestamp::EPOCH;
        for _ in 0..5 {
            s.on_failure(
                &j,
                &w,
                &b,
                &ExecutionError::transient("connection reset"),
                t0,
            )
            .await;
        }
        let notices = s.take_notices(t0);
        assert!(
            notices
                .iter()
                .any(|n| matches!(n, FleetEvent::CircuitOpened { backend, .. } if *backend == b)),
            "{notices:?}"
        );
        let p = s.pick(&j, &w, &[cand("flaky", 0, 1)], t0).await;
        let Placement::Wait { reason, until, .. } = p else {
            panic!("{p:?}")
        };
        assert!(reason.contains("circuit open"), "{reason}");
        assert_eq!(until, Some(t0.add(Duration::from_secs(30))));
        let later = t0.add(Duration::from_secs(30));
        assert_eq!(
            picked(&s.pick(&j, &w, &[cand("flaky", 0, 1)], later).await),
            "flaky"
        );
        assert!(
            s.take_notices(later)
                .iter()
                .any(|n| matches!(n, FleetEvent::CircuitClosed { .. }))
        );
        // Half-open: one more failure re-opens it at once.
        s.on_failure(
            &j,
            &w,
            &b,
            &ExecutionError::transient("connection reset"),
            later,
        )
        .await;
        assert!(
            s.take_notices(later)
                .iter()
                .any(|n| matches!(n, FleetEvent::CircuitOpened { .. }))
        );
    }

    #[tokio::test]
    async fn failed_health_checks_open_the_circuit() {
        let s = strategy();
        let b = BackendId::new("down");
        for _ in 0..5 {
            s.on_health(&b, &Health::down("connection refused"), Timestamp::EPOCH)
                .await;
        }
        assert!(
            s.take_notices(Timestamp::EPOCH)
                .iter()
                .any(|n| matches!(n, FleetEvent::CircuitOpened { .. }))
        );
        s.on_health(&b, &Health::ok(), Timestamp::EPOCH).await;
        let (j, w) = (job().await, workflow());
        assert!(
            matches!(
                s.pick(&j, &w, &[cand("down", 0, 1)], Timestamp::EPOCH)
                    .await,
                Placement::Wait { .. }
            ),
            "one passing check does not close an open circuit"
        );
    }

    #[tokio::test]
    async fn constraints_and_labels_are_permanent_skips() {
        let s = strategy();
        let mut j = job().await;
        let w = workflow();
        j.spec.constraints.backends = vec![BackendId::new("only")];
        let p = s
            .pick(&j, &w, &[cand("other", 0, 1)], Timestamp::EPOCH)
            .await;
        let Placement::Impossible { error, skipped } = p else {
            panic!("{p:?}")
        };
        assert!(
            error
                .message
                .contains("other: not among the job's allowed backends"),
            "{}",
            error.message
        );
        assert_eq!(skipped.len(), 1);
        j.spec.constraints.backends.clear();
        j.spec
            .constraints
            .labels
            .insert("gpu".into(), "a100".into());
        let mut labelled = cand("a100-box", 0, 1);
        std::sync::Arc::make_mut(&mut labelled.inventory)
            .labels
            .insert("gpu".into(), "a100".into());
        let p = s
            .pick(&j, &w, &[cand("t4-box", 0, 1), labelled], Timestamp::EPOCH)
            .await;
        assert_eq!(picked(&p), "a100-box");
        let empty = s.pick(&j, &w, &[], Timestamp::EPOCH).await;
        assert!(matches!(empty, Placement::Impossible { .. }));
    }
}
