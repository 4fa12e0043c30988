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

use std::collections::{BTreeSet, HashMap};
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
    /// Can change soon (busy, blocked, circuit open, unhealthy): the job waits.
    Temporary(String, Option<Timestamp>),
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
            return Verdict::Temporary(
                format!(
                    "at capacity ({}/{})",
                    c.in_flight, c.capabilities.max_concurrent
                ),
                None,
            );
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
        let mut skipped = Vec::new();
        let mut eligible: Vec<&Candidate> = Vec::new();
        let mut any_temporary = false;
        let mut earliest: Option<Timestamp> = None;
        let mut missing_class: Option<String> = None;
        for c in candidates {
            match self.verdict(&mut s, job, workflow, c) {
                Verdict::Eligible => eligible.push(c),
                Verdict::Temporary(reason, until) => {
                    any_temporary = true;
                    if let Some(u) = until {
                        earliest = Some(earliest.map_or(u, |e: Timestamp| e.min(u)));
                    }
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
        let summary = |skipped: &[Skip]| {
            skipped
                .iter()
                .map(|k| format!("{}: {}", k.backend, k.reason))
                .collect::<Vec<_>>()
                .join("; ")
        };
        if eligible.is_empty() {
            if candidates.is_empty() {
                return Placement::Impossible {
                    error: ExecutionError::deterministic("the fleet has no backends"),
                    skipped,
                };
            }
            if any_temporary {
                return Placement::Wait {
                    reason: format!("no backend can take it now ({})", summary(&skipped)),
                    until: earliest,
                    skipped,
                };
            }
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
            return Placement::Impossible { error, skipped };
        }
        // After a failure, go elsewhere if anywhere else can take it.
        if let Some(last) = job.attempts.last().filter(|a| a.error.is_some())
            && eligible.len() > 1
        {
            eligible.retain(|c| c.id != last.backend);
        }
        let structure = workflow.structure_hash();
        let chosen = if let Some(warm) = s
            .warm
            .get(structure)
            .and_then(|w| eligible.iter().find(|c| &c.id == w))
        {
            *warm
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
        };
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
        _run_time: Duration,
        _now: Timestamp,
    ) {
        let mut s = self.lock();
        self.circuit_success(&mut s, backend);
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
