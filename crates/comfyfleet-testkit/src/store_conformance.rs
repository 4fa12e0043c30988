//! The public [`TaskStore`] conformance suite: every store (the in-memory one, SQLite,
//! PostgreSQL, yours) must pass it. It uses nothing but the [`TaskStore`] trait.
//!
//! Two entry points:
//!
//! * [`store_conformance`] — named cases, one per rule of the contract written in
//!   [`comfyfleet_core::store`] (claim order, fencing, the cancel protocol, retries and deadlines,
//!   the reaper and its dry run, listing, events, pruning, leadership). Each case runs on a fresh
//!   store; a failure names the case.
//! * [`store_model_test`] — a model-based property test: random sequences of operations (enqueue,
//!   claim, heartbeat with current or stale leases, attempts, progress, complete, fail, release,
//!   cancel, force-cancel, ack, detach, reap, advancing the clock) are applied to the store and to
//!   a small reference model written from the contract, and compared after every step.
//!
//! Stores take `now` as an argument, so the suite drives time with plain [`Timestamp`] values:
//! nothing sleeps and nothing reads the wall clock.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use async_trait::async_trait;
//! use comfyfleet_core::{MemoryStore, TaskStore};
//! use comfyfleet_testkit::{StoreFactory, store_conformance, store_model_test};
//!
//! struct Factory;
//!
//! #[async_trait]
//! impl StoreFactory for Factory {
//!     async fn create(&self) -> Arc<dyn TaskStore> {
//!         Arc::new(MemoryStore::new())
//!     }
//! }
//!
//! // In a `#[tokio::test]`:
//! # async fn conformance() {
//! store_conformance(&Factory).await;
//! # }
//! // In a plain `#[test]` (it builds its own runtime):
//! # fn model() {
//! store_model_test(Arc::new(Factory), 256);
//! # }
//! ```

use std::any::Any;
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use comfyfleet_core::{
    Artifact, AttemptOutcome, AttemptStart, AttemptUpdate, BackendId, CancelOutcome, CancelStep,
    Completion, Event, EventKind, EventQuery, ExecutionError, Failure, JobFilter, JobId, JobRecord,
    JobSpec, JobState, Lease, LeaseInfo, NewJob, PhaseDeadline, Progress, ReapAction, ReapOptions,
    ReapReason, RemoteRef, Restriction, RestrictionKind, Skip, StoreError, TaskStore, TimeoutPhase,
    Timestamp, WorkflowHash,
};
use futures::FutureExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use serde_json::json;

/// Makes a fresh, empty store for each conformance case (and each model-test case).
#[async_trait]
pub trait StoreFactory: Send + Sync {
    /// A new empty store: no jobs, no events, no leader.
    async fn create(&self) -> Arc<dyn TaskStore>;
}

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// The lease length the named cases use.
const TTL: Duration = Duration::from_secs(30);

/// All times are offsets from this instant (2023-11-14), in milliseconds.
const BASE_MS: i64 = 1_700_000_000_000;

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(BASE_MS + ms)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn spec() -> JobSpec {
    JobSpec::new(crate::workflows::invert())
}

fn gpu(n: u8) -> BackendId {
    BackendId::new(format!("gpu-{n}"))
}

fn start_on(backend: BackendId) -> AttemptStart {
    AttemptStart {
        backend,
        remote: None,
        reattached: false,
        skipped: Vec::new(),
        phase: None,
        capacity: None,
    }
}

fn failure(message: &str, retry_at: Option<Timestamp>) -> Failure {
    Failure {
        error: ExecutionError::transient(message),
        outcome: AttemptOutcome::Failed,
        nodes: Vec::new(),
        retry_at,
        cancel_steps: Vec::new(),
    }
}

fn artifact(backend: &BackendId, name: &str) -> Artifact {
    Artifact {
        node: "3".into(),
        filename: name.into(),
        kind: "image".into(),
        content_type: Some("image/png".into()),
        size: None,
        sha256: None,
        backend: backend.clone(),
        locator: json!({"filename": name, "subfolder": "", "type": "output"}),
    }
}

fn names(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.name()).collect()
}

/// Enqueues a new job and returns its id.
async fn add(s: &dyn TaskStore, spec: JobSpec, now: Timestamp) -> JobId {
    let new = NewJob::new(spec);
    let id = new.id;
    let e = s
        .enqueue(new, now)
        .await
        .unwrap_or_else(|e| panic!("enqueue of a valid new job failed: {e}"));
    assert!(e.created, "enqueue of a new job answered created=false");
    assert_eq!(e.id, id, "enqueue must keep the caller's job id");
    id
}

/// Claims and checks that the claimed job is `id`.
async fn claim_exact(s: &dyn TaskStore, owner: &str, now: Timestamp, id: JobId) -> Lease {
    let c = s
        .claim(owner, TTL, now)
        .await
        .unwrap_or_else(|e| panic!("claim at {now} failed: {e}"))
        .unwrap_or_else(|| panic!("claim at {now} found nothing; expected job {id}"));
    assert_eq!(c.lease.job, id, "claim at {now} took the wrong job");
    assert_eq!(c.lease.owner, owner, "claim: lease owner");
    c.lease
}

async fn must_get(s: &dyn TaskStore, id: JobId) -> JobRecord {
    s.get(id)
        .await
        .unwrap_or_else(|e| panic!("get {id} failed: {e}"))
        .unwrap_or_else(|| panic!("get {id}: the job is missing"))
}

async fn start(s: &dyn TaskStore, lease: &Lease, now: Timestamp) -> Vec<Event> {
    s.start_attempt(lease, start_on(gpu(1)), now)
        .await
        .unwrap_or_else(|e| panic!("start_attempt under {lease:?} failed: {e}"))
}

/// Enqueues `spec` at `now`, claims it as `engine-a` and starts an attempt on `gpu-1`.
async fn running(s: &dyn TaskStore, spec: JobSpec, now: Timestamp) -> (JobId, Lease) {
    let id = add(s, spec, now).await;
    let lease = claim_exact(s, "engine-a", now, id).await;
    start(s, &lease, now).await;
    (id, lease)
}

/// Every event with a larger id than `after` (for one job or all), paging through the store.
async fn events_after(s: &dyn TaskStore, job: Option<JobId>, after: Option<u64>) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    let mut after = after;
    loop {
        let page = s
            .events(&EventQuery {
                job,
                after,
                limit: 500,
            })
            .await
            .unwrap_or_else(|e| panic!("events query failed: {e}"));
        let Some(last) = page.last() else { break };
        if after.is_some_and(|a| last.id <= a) {
            panic!(
                "events(after: {after:?}) returned an event with id {} (not after)",
                last.id
            );
        }
        after = Some(last.id);
        out.extend(page);
    }
    out
}

async fn all_events(s: &dyn TaskStore) -> Vec<Event> {
    events_after(s, None, None).await
}

async fn job_events(s: &dyn TaskStore, id: JobId) -> Vec<Event> {
    events_after(s, Some(id), None).await
}

/// Everything observable about some jobs: their records and all events.
async fn snapshot(s: &dyn TaskStore, ids: &[JobId]) -> (Vec<Option<JobRecord>>, Vec<Event>) {
    let mut jobs = Vec::new();
    for id in ids {
        jobs.push(
            s.get(*id)
                .await
                .unwrap_or_else(|e| panic!("get {id} failed: {e}")),
        );
    }
    (jobs, all_events(s).await)
}

fn assert_lease_lost<T: fmt::Debug>(r: Result<T, StoreError>, lease: &Lease, what: &str) {
    match r {
        Err(StoreError::LeaseLost { job, attempt }) => {
            assert_eq!(
                (job, attempt),
                (lease.job, lease.attempt),
                "{what}: LeaseLost names the wrong job or attempt"
            );
        }
        other => panic!("{what}: expected StoreError::LeaseLost, got {other:?}"),
    }
}

fn assert_invalid_transition<T: fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    assert!(
        matches!(r, Err(StoreError::InvalidTransition { .. })),
        "{what}: expected StoreError::InvalidTransition, got {r:?}"
    );
}

fn assert_invalid_input<T: fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    assert!(
        matches!(r, Err(StoreError::InvalidInput(_))),
        "{what}: expected StoreError::InvalidInput, got {r:?}"
    );
}

/// Checks that `returned` are exactly the events the store appended after `before_id`.
async fn assert_returned_events_stored(
    s: &dyn TaskStore,
    before_id: Option<u64>,
    returned: &[Event],
    what: &str,
) {
    let stored = events_after(s, None, before_id).await;
    assert_eq!(
        stored, returned,
        "{what}: the events returned must be exactly the events appended"
    );
}

async fn last_event_id(s: &dyn TaskStore) -> Option<u64> {
    all_events(s).await.last().map(|e| e.id)
}

fn reap_opts(dry_run: bool, stuck_after: Option<Duration>, max_crash_requeues: u32) -> ReapOptions {
    ReapOptions {
        dry_run,
        stuck_after,
        max_crash_requeues,
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_owned()
    }
}

pub(crate) async fn run_case(case: impl Future<Output = ()>) -> Result<(), String> {
    AssertUnwindSafe(case)
        .catch_unwind()
        .await
        .map_err(|p| panic_message(p.as_ref()))
}

// ---------------------------------------------------------------------------------------------
// The named cases
// ---------------------------------------------------------------------------------------------

/// Runs every conformance case, each on a fresh store from `factory`.
///
/// All cases run even if some fail; then this panics with a message naming every failed case and
/// what it found. Call it from an async test (`#[tokio::test]`).
pub async fn store_conformance(factory: &dyn StoreFactory) {
    let mut failed: Vec<(&'static str, String)> = Vec::new();
    let mut total = 0usize;
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            total += 1;
            {
                // Each case's store goes before the next is made (a server-backed store keeps
                // a connection pool while it lives).
                let store = factory.create().await;
                if let Err(msg) = run_case($case(store.as_ref())).await {
                    failed.push((stringify!($case), msg));
                }
            }
        )*};
    }
    cases!(
        enqueue_creates_pending_job_with_submitted_event,
        enqueue_with_known_idempotency_key_returns_existing_job,
        enqueue_rejects_duplicate_job_id,
        enqueue_rejects_invalid_spec,
        claim_finds_nothing_in_empty_store,
        claim_respects_run_at,
        claim_orders_by_priority_then_age,
        claim_sets_lease_and_increments_claims,
        fencing_rejects_stale_lease_after_reclaim,
        fencing_rejects_lease_of_finished_job,
        late_heartbeat_renews_expired_lease,
        heartbeat_reports_force_cancel,
        start_attempt_records_attempt_and_dispatched_event,
        start_attempt_reattached_keeps_remote_and_is_not_counted,
        start_attempt_twice_under_one_claim_is_invalid,
        update_attempt_records_remote_progress_phase_and_events,
        complete_succeeds_with_artifacts,
        complete_without_attempt_is_invalid,
        fail_with_retry_waits_until_run_at,
        fail_after_last_attempt_fails_job,
        fail_without_retry_fails_job,
        fail_retry_not_before_deadline_fails_job,
        fail_without_attempt_closes_none,
        release_returns_job_to_pending,
        release_with_open_attempt_is_invalid,
        cancel_pending_and_retry_wait_jobs,
        cancel_running_job_changes_nothing,
        cancel_terminal_or_unknown_job,
        force_cancel_pending_job_cancels_at_once,
        force_cancel_running_job_then_ack,
        force_cancel_then_complete_stays_succeeded,
        force_cancel_is_never_lost_on_fail_or_release,
        detach_hands_job_back_for_reattach,
        reap_requeues_expired_lease,
        reap_fails_at_crash_requeue_cap,
        reap_cancels_expired_lease_with_cancel_requested,
        reap_times_out_attempt_without_progress,
        reap_times_out_attempt_past_phase_deadline,
        reap_fails_running_job_past_its_deadline,
        reap_fails_waiting_job_past_its_deadline,
        reap_dry_run_reports_the_same_and_changes_nothing,
        list_newest_first_with_filters,
        list_pagination_covers_every_job_once,
        list_limit_bounds,
        counts_by_state,
        events_ids_seqs_and_filters,
        prune_deletes_old_terminal_jobs_with_events,
        try_lead_elects_one_leader,
        start_attempt_with_capacity_counts_every_open_attempt,
        share_restrictions_merges_and_forgets_lifted_ones,
    );
    if !failed.is_empty() {
        let mut msg = format!(
            "TaskStore conformance: {} of {total} cases failed:",
            failed.len()
        );
        for (case, why) in &failed {
            msg.push_str(&format!("\n  - {case}: {why}"));
        }
        panic!("{msg}");
    }
}

async fn enqueue_creates_pending_job_with_submitted_event(s: &dyn TaskStore) {
    let spec = spec().priority(2).label("project", "cats");
    let new = NewJob::new(spec.clone());
    let id = new.id;
    let e = s.enqueue(new, at(0)).await.expect("enqueue failed");
    assert_eq!(e.id, id, "enqueue must keep the caller's id");
    assert!(e.created, "a new job must be reported created");
    assert_eq!(
        e.events.len(),
        1,
        "enqueue appends exactly one event: {:?}",
        e.events
    );
    let ev = &e.events[0];
    assert_eq!(
        (ev.job, ev.seq, ev.at),
        (id, 1, at(0)),
        "submitted event: job, seq, at"
    );
    assert_eq!(
        ev.kind,
        EventKind::Submitted { priority: 2 },
        "submitted event kind"
    );
    let job = must_get(s, id).await;
    assert_eq!(job.id, id);
    assert_eq!(job.spec, spec, "get must return the submitted spec");
    assert_eq!(job.state, JobState::Pending, "a new job is pending");
    assert_eq!(
        (job.created_at, job.run_at),
        (at(0), at(0)),
        "created_at and run_at = now"
    );
    assert_eq!(job.claims, 0, "no claims yet");
    assert!(job.attempts.is_empty(), "no attempts yet");
    assert_eq!(job.crash_requeues, 0);
    assert_eq!(job.lease, None, "a pending job has no lease");
    assert_eq!(job.deadline, None, "no deadline was asked for");
    assert_eq!(job.last_seq, 1, "last_seq is the submitted event's seq");
    assert_returned_events_stored(s, None, &e.events, "enqueue").await;

    let with_deadline = add(s, self::spec().deadline(secs(60)), at(1_000)).await;
    assert_eq!(
        must_get(s, with_deadline).await.deadline,
        Some(at(61_000)),
        "deadline = submission time + deadline_ms"
    );
    let ghost = JobId::new();
    assert_eq!(
        s.get(ghost)
            .await
            .expect("get of an unknown id must not fail"),
        None
    );
}

async fn enqueue_with_known_idempotency_key_returns_existing_job(s: &dyn TaskStore) {
    let first = s
        .enqueue(NewJob::new(spec().idempotency_key("nightly-1")), at(0))
        .await
        .expect("first enqueue");
    assert!(first.created);
    let before = snapshot(s, &[first.id]).await;
    let second = s
        .enqueue(
            NewJob::new(spec().idempotency_key("nightly-1").priority(5)),
            at(10),
        )
        .await
        .expect("second enqueue with the same key must not fail");
    assert_eq!(
        second.id, first.id,
        "the same key must yield the existing job's id"
    );
    assert!(!second.created, "the same key must answer created=false");
    assert!(
        second.events.is_empty(),
        "nothing is appended for a known key: {:?}",
        second.events
    );
    assert_eq!(
        snapshot(s, &[first.id]).await,
        before,
        "a known key must change nothing"
    );
    assert_eq!(
        s.counts().await.expect("counts").total(),
        1,
        "no second job was added"
    );
    // The key is honoured whatever the existing job's state.
    let lease = claim_exact(s, "engine-a", at(20), first.id).await;
    start(s, &lease, at(20)).await;
    s.complete(&lease, Completion::default(), at(30))
        .await
        .expect("complete");
    let third = s
        .enqueue(NewJob::new(spec().idempotency_key("nightly-1")), at(40))
        .await
        .expect("enqueue with the key of a finished job");
    assert_eq!(
        (third.id, third.created),
        (first.id, false),
        "key of a finished job"
    );
    let other = s
        .enqueue(NewJob::new(spec().idempotency_key("nightly-2")), at(50))
        .await
        .expect("enqueue with another key");
    assert!(
        other.created && other.id != first.id,
        "another key makes another job"
    );
}

async fn enqueue_rejects_duplicate_job_id(s: &dyn TaskStore) {
    let new = NewJob::new(spec());
    let id = new.id;
    s.enqueue(new.clone(), at(0)).await.expect("first enqueue");
    let before = snapshot(s, &[id]).await;
    let again = s
        .enqueue(
            NewJob {
                id,
                spec: spec().priority(3),
            },
            at(5),
        )
        .await;
    assert_invalid_input(again, "enqueue of an existing job id without a key");
    assert_eq!(
        snapshot(s, &[id]).await,
        before,
        "a rejected enqueue changes nothing"
    );
}

async fn enqueue_rejects_invalid_spec(s: &dyn TaskStore) {
    let r = s.enqueue(NewJob::new(spec().max_attempts(0)), at(0)).await;
    assert_invalid_input(r, "enqueue with max_attempts 0");
    assert_eq!(
        s.counts().await.expect("counts").total(),
        0,
        "nothing is stored"
    );
    assert!(all_events(s).await.is_empty(), "no event is appended");
    let r = s
        .enqueue(NewJob::new(spec().idempotency_key("")), at(0))
        .await;
    assert_invalid_input(r, "enqueue with an empty idempotency key");
}

async fn claim_finds_nothing_in_empty_store(s: &dyn TaskStore) {
    let c = s
        .claim("engine-a", TTL, at(0))
        .await
        .expect("claim on an empty store");
    assert!(c.is_none(), "claim on an empty store found {c:?}");
}

async fn claim_respects_run_at(s: &dyn TaskStore) {
    let id = add(s, spec(), at(1_000)).await;
    let early = s.claim("engine-a", TTL, at(999)).await.expect("claim");
    assert!(
        early.is_none(),
        "claimed a job before its run_at: {early:?}"
    );
    let lease = claim_exact(s, "engine-a", at(1_000), id).await;
    s.release(&lease, at(5_000), "all backends busy", at(1_010))
        .await
        .expect("release");
    let early = s.claim("engine-a", TTL, at(4_999)).await.expect("claim");
    assert!(
        early.is_none(),
        "claimed a released job before its run_at: {early:?}"
    );
    claim_exact(s, "engine-a", at(5_000), id).await;
}

async fn claim_orders_by_priority_then_age(s: &dyn TaskStore) {
    let a = add(s, spec(), at(0)).await;
    let b = add(s, spec().priority(5), at(1)).await;
    let c = add(s, spec(), at(2)).await;
    let d = add(s, spec().priority(5), at(3)).await;
    let e = add(s, spec().priority(-1), at(4)).await;
    let f = add(s, spec().priority(1), at(5)).await;
    let mut got = Vec::new();
    while let Some(cl) = s.claim("engine-a", TTL, at(10)).await.expect("claim") {
        got.push(cl.lease.job);
        assert!(
            got.len() <= 6,
            "claim handed out more jobs than exist: {got:?}"
        );
    }
    assert_eq!(
        got,
        vec![b, d, f, a, c, e],
        "claim order must be priority (highest first), then submission order"
    );
}

async fn claim_sets_lease_and_increments_claims(s: &dyn TaskStore) {
    let id = add(s, spec(), at(0)).await;
    let c = s
        .claim("engine-a", TTL, at(100))
        .await
        .expect("claim")
        .expect("the job is due");
    assert_eq!(
        c.lease,
        Lease {
            job: id,
            attempt: 1,
            owner: "engine-a".into()
        },
        "the first claim's lease"
    );
    assert_eq!(c.job.state, JobState::Running, "claimed job as returned");
    assert_eq!(c.job.claims, 1, "claimed job as returned: claims");
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.claims, 1, "claim increments claims");
    assert_eq!(
        job.lease,
        Some(LeaseInfo {
            owner: "engine-a".into(),
            expires_at: at(100).add(TTL)
        }),
        "lease owner and expiry"
    );
    let again = s.claim("engine-b", TTL, at(200)).await.expect("claim");
    assert!(
        again.is_none(),
        "a running job was claimed again: {again:?}"
    );
    s.release(&c.lease, at(300), "busy", at(300))
        .await
        .expect("release");
    let second = claim_exact(s, "engine-b", at(300), id).await;
    assert_eq!(
        second.attempt, 2,
        "the second claim carries fencing token 2"
    );
    assert_eq!(must_get(s, id).await.claims, 2);
}

async fn fencing_rejects_stale_lease_after_reclaim(s: &dyn TaskStore) {
    let (id, old) = running(s, spec(), at(0)).await;
    let report = s
        .reap(&reap_opts(false, None, 3), at(0).add(TTL).add(secs(1)))
        .await
        .expect("reap");
    assert_eq!(
        report.items.len(),
        1,
        "the expired lease is reaped: {report:?}"
    );
    let new = claim_exact(s, "engine-b", at(40_000), id).await;
    assert_eq!(
        new.attempt,
        old.attempt + 1,
        "reclaim bumps the fencing token"
    );
    start(s, &new, at(40_000)).await;
    let before = snapshot(s, &[id]).await;
    let now = at(41_000);
    assert_lease_lost(s.heartbeat(&old, TTL, now).await, &old, "stale heartbeat");
    assert_lease_lost(
        s.start_attempt(&old, start_on(gpu(2)), now).await,
        &old,
        "stale start_attempt",
    );
    let update = AttemptUpdate {
        remote: Some(RemoteRef::new("stale-remote")),
        progress: Some(Progress::default()),
        events: vec![EventKind::Started {
            attempt: old.attempt,
        }],
        ..AttemptUpdate::default()
    };
    assert_lease_lost(
        s.update_attempt(&old, update, now).await,
        &old,
        "stale update_attempt",
    );
    assert_lease_lost(
        s.complete(&old, Completion::default(), now).await,
        &old,
        "stale complete",
    );
    assert_lease_lost(
        s.fail(&old, failure("stale", Some(now)), now).await,
        &old,
        "stale fail",
    );
    assert_lease_lost(
        s.ack_cancel(&old, Vec::new(), now).await,
        &old,
        "stale ack_cancel",
    );
    assert_lease_lost(s.detach(&old, now).await, &old, "stale detach");
    assert_lease_lost(
        s.release(&old, now, "stale", now).await,
        &old,
        "stale release",
    );
    assert_eq!(
        snapshot(s, &[id]).await,
        before,
        "writes under a stale lease must change nothing"
    );
    s.heartbeat(&new, TTL, now)
        .await
        .expect("the current lease still works");
}

async fn fencing_rejects_lease_of_finished_job(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    s.complete(&lease, Completion::default(), at(10))
        .await
        .expect("complete");
    let before = snapshot(s, &[id]).await;
    assert_lease_lost(
        s.heartbeat(&lease, TTL, at(20)).await,
        &lease,
        "heartbeat after complete",
    );
    assert_lease_lost(
        s.fail(&lease, failure("late", None), at(20)).await,
        &lease,
        "fail after complete",
    );
    assert_lease_lost(
        s.detach(&lease, at(20)).await,
        &lease,
        "detach after complete",
    );
    assert_eq!(
        snapshot(s, &[id]).await,
        before,
        "a finished job does not change"
    );
    // A released job (back to pending) no longer honours the lease either.
    let other = add(s, spec(), at(30)).await;
    let l2 = claim_exact(s, "engine-a", at(30), other).await;
    s.release(&l2, at(30), "busy", at(30))
        .await
        .expect("release");
    assert_lease_lost(
        s.heartbeat(&l2, TTL, at(31)).await,
        &l2,
        "heartbeat after release",
    );
    let forged = Lease {
        attempt: 7,
        ..l2.clone()
    };
    assert_lease_lost(
        s.heartbeat(&forged, TTL, at(31)).await,
        &forged,
        "a lease never handed out",
    );
}

async fn late_heartbeat_renews_expired_lease(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    let late = at(0).add(TTL).add(secs(5));
    let c = s.claim("engine-b", TTL, late).await.expect("claim");
    assert!(
        c.is_none(),
        "claim must not take a job whose lease merely expired: {c:?}"
    );
    let ack = s
        .heartbeat(&lease, TTL, late)
        .await
        .expect("a late heartbeat on an expired but not reclaimed lease must renew it");
    assert_eq!(ack.expires_at, late.add(TTL), "renewed expiry");
    assert!(!ack.cancel_requested);
    let job = must_get(s, id).await;
    assert_eq!(
        job.lease.map(|l| l.expires_at),
        Some(late.add(TTL)),
        "the renewed expiry is stored"
    );
    let report = s
        .reap(&reap_opts(false, None, 3), late.add(secs(1)))
        .await
        .expect("reap");
    assert!(
        report.items.is_empty(),
        "a renewed lease is live: {report:?}"
    );
    assert_eq!(must_get(s, id).await.state, JobState::Running);
}

async fn heartbeat_reports_force_cancel(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    let ack = s
        .heartbeat(&lease, TTL, at(1_000))
        .await
        .expect("heartbeat");
    assert!(!ack.cancel_requested, "no cancel was requested yet");
    assert_eq!(ack.expires_at, at(1_000).add(TTL));
    let r = s
        .force_cancel(id, "user", at(2_000))
        .await
        .expect("force_cancel");
    assert_eq!(r.outcome, CancelOutcome::CancelRequested);
    let ack = s
        .heartbeat(&lease, TTL, at(3_000))
        .await
        .expect("heartbeat");
    assert!(
        ack.cancel_requested,
        "the heartbeat must report the pending force-cancel"
    );
    assert_eq!(
        must_get(s, id).await.state,
        JobState::Running,
        "still running until acked"
    );
}

async fn start_attempt_records_attempt_and_dispatched_event(s: &dyn TaskStore) {
    let id = add(s, spec(), at(0)).await;
    let lease = claim_exact(s, "engine-a", at(0), id).await;
    let skipped = vec![Skip {
        backend: gpu(2),
        reason: "no node class FleetNoSuchNode".into(),
    }];
    let phase = PhaseDeadline {
        phase: TimeoutPhase::Dispatch,
        deadline: Some(at(30_000)),
    };
    let before = last_event_id(s).await;
    let evs = s
        .start_attempt(
            &lease,
            AttemptStart {
                backend: gpu(1),
                remote: None,
                reattached: false,
                skipped: skipped.clone(),
                phase: Some(phase),
                capacity: None,
            },
            at(5),
        )
        .await
        .expect("start_attempt");
    assert_eq!(evs.len(), 1, "start_attempt appends one event: {evs:?}");
    assert_eq!(
        evs[0].kind,
        EventKind::Dispatched {
            attempt: 1,
            backend: gpu(1),
            skipped
        },
        "the dispatched event"
    );
    assert_eq!(
        (evs[0].seq, evs[0].at),
        (2, at(5)),
        "dispatched event seq and time"
    );
    assert_returned_events_stored(s, before, &evs, "start_attempt").await;
    let job = must_get(s, id).await;
    assert_eq!(job.attempts.len(), 1, "one attempt recorded");
    let a = &job.attempts[0];
    assert_eq!(a.number, 1, "attempt number = the claim");
    assert_eq!(a.backend, gpu(1));
    assert_eq!(a.remote, None);
    assert_eq!(a.dispatched_at, at(5));
    assert_eq!(a.outcome, None, "the attempt is open");
    assert!(!a.reattached);
    assert_eq!(job.phase, Some(phase), "the first phase is stored");
    assert_eq!(job.counted_attempts(), 1);
}

async fn start_attempt_reattached_keeps_remote_and_is_not_counted(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec().max_attempts(1), at(0)).await;
    let remote = RemoteRef::new("prompt-123");
    s.update_attempt(
        &lease,
        AttemptUpdate {
            remote: Some(remote.clone()),
            ..AttemptUpdate::default()
        },
        at(1),
    )
    .await
    .expect("update_attempt");
    s.detach(&lease, at(2)).await.expect("detach");
    let l2 = claim_exact(s, "engine-b", at(3), id).await;
    let evs = s
        .start_attempt(
            &l2,
            AttemptStart {
                backend: gpu(1),
                remote: Some(remote.clone()),
                reattached: true,
                skipped: Vec::new(),
                phase: None,
                capacity: None,
            },
            at(4),
        )
        .await
        .expect("start_attempt (reattach)");
    assert_eq!(
        names(&evs),
        vec!["reattached"],
        "a reattached attempt appends a reattached event"
    );
    assert_eq!(
        evs[0].kind,
        EventKind::Reattached {
            attempt: 2,
            backend: gpu(1),
            remote: remote.clone()
        }
    );
    let job = must_get(s, id).await;
    assert_eq!(job.attempts.len(), 2);
    let a = &job.attempts[1];
    assert!(
        a.reattached && a.remote.as_ref() == Some(&remote),
        "reattached attempt: {a:?}"
    );
    assert_eq!(
        job.counted_attempts(),
        1,
        "a reattachment does not count as an execution"
    );
    // With max_attempts 1 and one counted execution, a failure cannot be retried.
    s.fail(&l2, failure("boom", Some(at(10))), at(5))
        .await
        .expect("fail");
    assert_eq!(must_get(s, id).await.state, JobState::Failed);
}

async fn start_attempt_twice_under_one_claim_is_invalid(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    let before = snapshot(s, &[id]).await;
    let r = s.start_attempt(&lease, start_on(gpu(2)), at(10)).await;
    assert_invalid_transition(r, "a second start_attempt under the same claim");
    assert_eq!(
        snapshot(s, &[id]).await,
        before,
        "the rejected start changed something"
    );
}

async fn update_attempt_records_remote_progress_phase_and_events(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    let remote = RemoteRef::new("prompt-7");
    let progress = Progress {
        percent: 40.0,
        nodes_total: 3,
        nodes_done: 1,
        current_node: Some("2".into()),
        ..Progress::default()
    };
    let phase = PhaseDeadline {
        phase: TimeoutPhase::NodeSilence,
        deadline: Some(at(90_000)),
    };
    let kinds = vec![
        EventKind::Accepted {
            attempt: 1,
            remote: remote.clone(),
        },
        EventKind::Started { attempt: 1 },
        EventKind::Progress {
            attempt: 1,
            progress: progress.clone(),
        },
    ];
    let before = last_event_id(s).await;
    let evs = s
        .update_attempt(
            &lease,
            AttemptUpdate {
                remote: Some(remote.clone()),
                started_at: Some(at(7)),
                phase: Some(phase),
                progress: Some(progress.clone()),
                events: kinds.clone(),
            },
            at(8),
        )
        .await
        .expect("update_attempt");
    assert_eq!(
        evs.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
        kinds,
        "the given events are appended in order"
    );
    assert_eq!(
        evs.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![3, 4, 5],
        "consecutive seqs after submitted and dispatched"
    );
    assert_returned_events_stored(s, before, &evs, "update_attempt").await;
    let job = must_get(s, id).await;
    let a = &job.attempts[0];
    assert_eq!(a.remote.as_ref(), Some(&remote), "remote stored");
    assert_eq!(a.started_at, Some(at(7)), "started_at stored");
    assert_eq!(job.phase, Some(phase), "phase stored");
    assert_eq!(job.progress.as_ref(), Some(&progress), "progress stored");
    assert_eq!(
        job.progress_at,
        Some(at(8)),
        "progress marks a sign of life at now"
    );
    // An update with nothing in it changes no event and keeps what is there.
    let evs = s
        .update_attempt(&lease, AttemptUpdate::default(), at(9))
        .await
        .expect("empty update");
    assert!(evs.is_empty(), "an empty update appends nothing: {evs:?}");
    assert_eq!(
        must_get(s, id).await.attempts[0].remote.as_ref(),
        Some(&remote)
    );
    // Without an attempt there is nothing to update.
    let other = add(s, spec(), at(10)).await;
    let l2 = claim_exact(s, "engine-a", at(10), other).await;
    let r = s
        .update_attempt(&l2, AttemptUpdate::default(), at(11))
        .await;
    assert_invalid_transition(r, "update_attempt before start_attempt");
}

async fn complete_succeeds_with_artifacts(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    let artifacts = vec![artifact(&gpu(1), "fleet_00001_.png")];
    let before = last_event_id(s).await;
    let evs = s
        .complete(
            &lease,
            Completion {
                artifacts: artifacts.clone(),
                nodes: Vec::new(),
                progress: Some(Progress {
                    percent: 100.0,
                    ..Progress::default()
                }),
            },
            at(20),
        )
        .await
        .expect("complete");
    assert_eq!(
        evs.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
        vec![EventKind::Succeeded {
            attempt: 1,
            backend: gpu(1),
            artifacts: artifacts.clone()
        }],
        "complete appends one succeeded event"
    );
    assert_returned_events_stored(s, before, &evs, "complete").await;
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.artifacts, artifacts, "artifacts stored");
    assert_eq!(job.finished_at, Some(at(20)));
    assert_eq!(job.lease, None, "a finished job holds no lease");
    assert_eq!(job.attempts[0].outcome, Some(AttemptOutcome::Succeeded));
    assert_eq!(job.attempts[0].ended_at, Some(at(20)));
    assert_eq!(job.progress.map(|p| p.percent), Some(100.0));
}

async fn complete_without_attempt_is_invalid(s: &dyn TaskStore) {
    let id = add(s, spec(), at(0)).await;
    let lease = claim_exact(s, "engine-a", at(0), id).await;
    let before = snapshot(s, &[id]).await;
    let r = s.complete(&lease, Completion::default(), at(5)).await;
    assert_invalid_transition(r, "complete without an attempt");
    assert_eq!(
        snapshot(s, &[id]).await,
        before,
        "the rejected complete changed something"
    );
}

async fn fail_with_retry_waits_until_run_at(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec().max_attempts(3), at(0)).await;
    let before = last_event_id(s).await;
    let f = failure("connection reset", Some(at(10_000)));
    let error = f.error.clone();
    let evs = s.fail(&lease, f, at(100)).await.expect("fail");
    assert_eq!(
        evs.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
        vec![EventKind::AttemptFailed {
            attempt: 1,
            backend: gpu(1),
            error: error.clone(),
            retry_at: Some(at(10_000))
        }],
        "a retried failure appends attempt_failed carrying retry_at"
    );
    assert_returned_events_stored(s, before, &evs, "fail").await;
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::RetryWait);
    assert_eq!(job.run_at, at(10_000), "run_at = retry_at");
    assert_eq!(job.lease, None);
    let a = &job.attempts[0];
    assert_eq!(a.outcome, Some(AttemptOutcome::Failed));
    assert_eq!(
        a.error.as_ref(),
        Some(&error),
        "the attempt keeps its error"
    );
    assert_eq!(a.ended_at, Some(at(100)));
    let early = s.claim("engine-a", TTL, at(9_999)).await.expect("claim");
    assert!(early.is_none(), "claimed before retry_at: {early:?}");
    let l2 = claim_exact(s, "engine-a", at(10_000), id).await;
    assert_eq!(l2.attempt, 2);
}

async fn fail_after_last_attempt_fails_job(s: &dyn TaskStore) {
    let id = add(s, spec().max_attempts(2), at(0)).await;
    let l1 = claim_exact(s, "engine-a", at(0), id).await;
    start(s, &l1, at(0)).await;
    s.fail(&l1, failure("first", Some(at(1_000))), at(10))
        .await
        .expect("fail 1");
    assert_eq!(
        must_get(s, id).await.state,
        JobState::RetryWait,
        "one attempt of two used"
    );
    let l2 = claim_exact(s, "engine-a", at(1_000), id).await;
    start(s, &l2, at(1_000)).await;
    let f = failure("second", Some(at(2_000)));
    let error = f.error.clone();
    let evs = s.fail(&l2, f, at(1_010)).await.expect("fail 2");
    assert_eq!(
        names(&evs),
        vec!["attempt_failed", "failed"],
        "the last failure appends attempt_failed then failed"
    );
    assert_eq!(
        evs[0].kind,
        EventKind::AttemptFailed {
            attempt: 2,
            backend: gpu(1),
            error: error.clone(),
            retry_at: None
        },
        "no retry_at when the job will not be retried"
    );
    assert_eq!(
        evs[1].kind,
        EventKind::Failed {
            error: error.clone()
        }
    );
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error.as_ref(), Some(&error), "the error is stored");
    assert_eq!(job.finished_at, Some(at(1_010)));
    assert_eq!(job.lease, None);
}

async fn fail_without_retry_fails_job(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec().max_attempts(5), at(0)).await;
    let f = Failure {
        error: ExecutionError::deterministic("bad value for width"),
        ..failure("", None)
    };
    let evs = s.fail(&lease, f, at(10)).await.expect("fail");
    assert_eq!(names(&evs), vec!["attempt_failed", "failed"]);
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::Failed, "retry_at None gives up");
    assert_eq!(
        job.error.map(|e| e.message),
        Some("bad value for width".to_string())
    );
}

async fn fail_retry_not_before_deadline_fails_job(s: &dyn TaskStore) {
    // deadline = at(60_000)
    let (a, la) = running(s, spec().deadline(secs(60)), at(0)).await;
    s.fail(&la, failure("x", Some(at(59_999))), at(10))
        .await
        .expect("fail a");
    assert_eq!(
        must_get(s, a).await.state,
        JobState::RetryWait,
        "a retry before the deadline waits"
    );
    let (b, lb) = running(s, spec().deadline(secs(60)), at(0)).await;
    s.fail(&lb, failure("x", Some(at(61_000))), at(10))
        .await
        .expect("fail b");
    assert_eq!(
        must_get(s, b).await.state,
        JobState::Failed,
        "a retry after the deadline fails the job"
    );
    let (c, lc) = running(s, spec().deadline(secs(60)), at(0)).await;
    s.fail(&lc, failure("x", Some(at(60_000))), at(10))
        .await
        .expect("fail c");
    assert_eq!(
        must_get(s, c).await.state,
        JobState::Failed,
        "the deadline must be after the retry time: a retry exactly at it fails"
    );
}

async fn fail_without_attempt_closes_none(s: &dyn TaskStore) {
    // Never placed, given up: failed, with no attempt recorded.
    let a = add(s, spec(), at(0)).await;
    let la = claim_exact(s, "engine-a", at(0), a).await;
    let f = Failure {
        error: ExecutionError::deterministic("input override names no node"),
        ..failure("", None)
    };
    let evs = s.fail(&la, f, at(10)).await.expect("fail without attempt");
    assert_eq!(
        names(&evs),
        vec!["failed"],
        "no attempt_failed without an attempt"
    );
    let job = must_get(s, a).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.attempts.is_empty(),
        "no attempt is recorded: {:?}",
        job.attempts
    );
    assert_eq!(
        job.error.map(|e| e.message).as_deref(),
        Some("input override names no node")
    );
    // Never placed, retried: back to waiting, and that state change appends an event too.
    let b = add(s, spec(), at(20)).await;
    let lb = claim_exact(s, "engine-a", at(20), b).await;
    let before = last_event_id(s).await;
    let evs = s
        .fail(&lb, failure("upload failed", Some(at(5_000))), at(30))
        .await
        .expect("fail without attempt, with retry");
    assert!(
        !evs.is_empty(),
        "running -> retry_wait is a state change and must append an event"
    );
    assert_returned_events_stored(s, before, &evs, "fail without attempt").await;
    let job = must_get(s, b).await;
    assert_eq!(job.state, JobState::RetryWait);
    assert_eq!(job.run_at, at(5_000));
    assert!(job.attempts.is_empty(), "no attempt is recorded");
    assert_eq!(job.counted_attempts(), 0, "nothing was executed");
}

async fn release_returns_job_to_pending(s: &dyn TaskStore) {
    let id = add(s, spec(), at(0)).await;
    let lease = claim_exact(s, "engine-a", at(0), id).await;
    let before = last_event_id(s).await;
    let evs = s
        .release(&lease, at(5_000), "every backend is busy", at(10))
        .await
        .expect("release");
    assert_eq!(
        evs.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
        vec![EventKind::Waiting {
            reason: "every backend is busy".into(),
            until: Some(at(5_000))
        }],
        "release appends one waiting event"
    );
    assert_returned_events_stored(s, before, &evs, "release").await;
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::Pending);
    assert_eq!(job.run_at, at(5_000));
    assert_eq!(job.wait_reason.as_deref(), Some("every backend is busy"));
    assert!(job.attempts.is_empty(), "release records no attempt");
    assert_eq!(job.lease, None);
    assert_eq!(job.claims, 1, "the claim still counted");
    assert_eq!(claim_exact(s, "engine-b", at(5_000), id).await.attempt, 2);
}

async fn release_with_open_attempt_is_invalid(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    let before = snapshot(s, &[id]).await;
    let r = s.release(&lease, at(10), "busy", at(10)).await;
    assert_invalid_transition(r, "release with a running attempt");
    assert_eq!(
        snapshot(s, &[id]).await,
        before,
        "the rejected release changed something"
    );
}

async fn cancel_pending_and_retry_wait_jobs(s: &dyn TaskStore) {
    let p = add(s, spec(), at(0)).await;
    let before = last_event_id(s).await;
    let r = s
        .cancel(p, "user asked", at(10))
        .await
        .expect("cancel pending");
    assert_eq!(r.outcome, CancelOutcome::Cancelled);
    assert_eq!(
        r.events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
        vec![EventKind::Cancelled {
            reason: "user asked".into()
        }],
        "cancel appends one cancelled event"
    );
    assert_returned_events_stored(s, before, &r.events, "cancel").await;
    let job = must_get(s, p).await;
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.finished_at, Some(at(10)));
    let c = s.claim("engine-a", TTL, at(20)).await.expect("claim");
    assert!(c.is_none(), "a cancelled job was claimed: {c:?}");

    let (w, lw) = running(s, spec(), at(30)).await;
    s.fail(&lw, failure("x", Some(at(100_000))), at(40))
        .await
        .expect("fail");
    assert_eq!(must_get(s, w).await.state, JobState::RetryWait);
    let r = s
        .cancel(w, "user asked", at(50))
        .await
        .expect("cancel retry_wait");
    assert_eq!(r.outcome, CancelOutcome::Cancelled);
    assert_eq!(must_get(s, w).await.state, JobState::Cancelled);
    let c = s.claim("engine-a", TTL, at(200_000)).await.expect("claim");
    assert!(c.is_none(), "a cancelled retry_wait job was claimed: {c:?}");
}

async fn cancel_running_job_changes_nothing(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    let before = snapshot(s, &[id]).await;
    let r = s.cancel(id, "user", at(10)).await.expect("cancel");
    assert_eq!(
        r.outcome,
        CancelOutcome::Running,
        "plain cancel of a running job"
    );
    assert!(r.events.is_empty(), "nothing is appended: {:?}", r.events);
    assert_eq!(
        snapshot(s, &[id]).await,
        before,
        "plain cancel of a running job changed it"
    );
    let ack = s.heartbeat(&lease, TTL, at(20)).await.expect("heartbeat");
    assert!(
        !ack.cancel_requested,
        "a plain cancel does not request a stop"
    );
}

async fn cancel_terminal_or_unknown_job(s: &dyn TaskStore) {
    let (done, lease) = running(s, spec(), at(0)).await;
    s.complete(&lease, Completion::default(), at(10))
        .await
        .expect("complete");
    let before = snapshot(s, &[done]).await;
    let r = s.cancel(done, "late", at(20)).await.expect("cancel");
    assert_eq!(
        r.outcome,
        CancelOutcome::AlreadyTerminal(JobState::Succeeded)
    );
    assert!(r.events.is_empty());
    let r = s
        .force_cancel(done, "late", at(20))
        .await
        .expect("force_cancel");
    assert_eq!(
        r.outcome,
        CancelOutcome::AlreadyTerminal(JobState::Succeeded)
    );
    assert!(r.events.is_empty());
    assert_eq!(snapshot(s, &[done]).await, before, "a finished job changed");
    let gone = add(s, spec(), at(30)).await;
    s.cancel(gone, "first", at(31)).await.expect("cancel");
    let r = s
        .cancel(gone, "second", at(32))
        .await
        .expect("cancel again");
    assert_eq!(
        r.outcome,
        CancelOutcome::AlreadyTerminal(JobState::Cancelled)
    );
    let ghost = JobId::new();
    match s.cancel(ghost, "x", at(40)).await {
        Err(StoreError::NotFound(id)) => assert_eq!(id, ghost, "NotFound names the job"),
        other => panic!("cancel of an unknown job: expected NotFound, got {other:?}"),
    }
    match s.force_cancel(ghost, "x", at(40)).await {
        Err(StoreError::NotFound(id)) => assert_eq!(id, ghost, "NotFound names the job"),
        other => panic!("force_cancel of an unknown job: expected NotFound, got {other:?}"),
    }
}

async fn force_cancel_pending_job_cancels_at_once(s: &dyn TaskStore) {
    let id = add(s, spec(), at(0)).await;
    let r = s
        .force_cancel(id, "user", at(10))
        .await
        .expect("force_cancel");
    assert_eq!(r.outcome, CancelOutcome::Cancelled);
    assert_eq!(names(&r.events), vec!["cancelled"]);
    assert_eq!(must_get(s, id).await.state, JobState::Cancelled);
}

async fn force_cancel_running_job_then_ack(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    let before = last_event_id(s).await;
    let r = s
        .force_cancel(id, "user", at(10))
        .await
        .expect("force_cancel");
    assert_eq!(r.outcome, CancelOutcome::CancelRequested);
    assert_eq!(
        r.events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
        vec![EventKind::CancelRequested { force: true }],
        "force_cancel of a running job appends cancel_requested"
    );
    assert_returned_events_stored(s, before, &r.events, "force_cancel").await;
    let job = must_get(s, id).await;
    assert_eq!(
        job.state,
        JobState::Running,
        "still running until the holder acks"
    );
    assert_eq!(job.cancel_requested_at, Some(at(10)));
    let again = s
        .force_cancel(id, "user", at(11))
        .await
        .expect("force_cancel again");
    assert_eq!(again.outcome, CancelOutcome::AlreadyRequested);
    assert!(
        again.events.is_empty(),
        "nothing is appended the second time"
    );
    assert_eq!(
        must_get(s, id).await.cancel_requested_at,
        Some(at(10)),
        "first request kept"
    );
    assert!(
        s.heartbeat(&lease, TTL, at(12))
            .await
            .expect("heartbeat")
            .cancel_requested
    );
    let steps = vec![CancelStep {
        at: at(13),
        action: "remote_cancel".into(),
        result: "interrupted".into(),
    }];
    let before = last_event_id(s).await;
    let evs = s
        .ack_cancel(&lease, steps.clone(), at(14))
        .await
        .expect("ack_cancel");
    assert_eq!(
        names(&evs).last(),
        Some(&"cancelled"),
        "ack_cancel ends with cancelled: {evs:?}"
    );
    assert_returned_events_stored(s, before, &evs, "ack_cancel").await;
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.finished_at, Some(at(14)));
    assert_eq!(job.lease, None);
    let a = &job.attempts[0];
    assert_eq!(
        a.outcome,
        Some(AttemptOutcome::Cancelled),
        "the attempt is closed as cancelled"
    );
    assert_eq!(
        a.cancel_steps, steps,
        "the cancel steps are recorded on the attempt"
    );
}

async fn force_cancel_then_complete_stays_succeeded(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    s.force_cancel(id, "user", at(10))
        .await
        .expect("force_cancel");
    let evs = s
        .complete(&lease, Completion::default(), at(11))
        .await
        .expect("complete after a force-cancel request must succeed (complete wins)");
    assert_eq!(names(&evs), vec!["succeeded"]);
    let job = must_get(s, id).await;
    assert_eq!(
        job.state,
        JobState::Succeeded,
        "complete wins over a pending force-cancel"
    );
    let r = s
        .force_cancel(id, "user", at(12))
        .await
        .expect("force_cancel");
    assert_eq!(
        r.outcome,
        CancelOutcome::AlreadyTerminal(JobState::Succeeded)
    );
}

async fn force_cancel_is_never_lost_on_fail_or_release(s: &dyn TaskStore) {
    let (a, la) = running(s, spec().max_attempts(5), at(0)).await;
    s.force_cancel(a, "user", at(10))
        .await
        .expect("force_cancel");
    let evs = s
        .fail(&la, failure("interrupted", Some(at(20))), at(11))
        .await
        .expect("fail");
    assert_eq!(
        must_get(s, a).await.state,
        JobState::Cancelled,
        "a failure with retry after a force-cancel request must cancel, not retry"
    );
    assert_eq!(
        names(&evs).last(),
        Some(&"cancelled"),
        "fail ends with cancelled: {evs:?}"
    );
    let b = add(s, spec(), at(30)).await;
    let lb = claim_exact(s, "engine-a", at(30), b).await;
    s.force_cancel(b, "user", at(31))
        .await
        .expect("force_cancel");
    s.release(&lb, at(40), "busy", at(32))
        .await
        .expect("release");
    assert_eq!(
        must_get(s, b).await.state,
        JobState::Cancelled,
        "releasing a job with a pending force-cancel must cancel it"
    );
}

async fn detach_hands_job_back_for_reattach(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    let remote = RemoteRef::new("prompt-42");
    s.update_attempt(
        &lease,
        AttemptUpdate {
            remote: Some(remote.clone()),
            ..AttemptUpdate::default()
        },
        at(5),
    )
    .await
    .expect("update_attempt");
    let before = last_event_id(s).await;
    let evs = s.detach(&lease, at(50)).await.expect("detach");
    assert_eq!(
        names(&evs),
        vec!["requeued"],
        "detach appends a requeued event"
    );
    assert_returned_events_stored(s, before, &evs, "detach").await;
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::RetryWait);
    assert_eq!(job.run_at, at(50), "run_at = now");
    assert_eq!(job.crash_requeues, 0, "a detach is not a crash requeue");
    assert_eq!(job.lease, None);
    let a = &job.attempts[0];
    assert_eq!(a.outcome, Some(AttemptOutcome::Detached));
    assert_eq!(
        a.remote.as_ref(),
        Some(&remote),
        "the remote is kept for reattachment"
    );
    assert_eq!(claim_exact(s, "engine-b", at(50), id).await.attempt, 2);
}

async fn reap_requeues_expired_lease(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec(), at(0)).await;
    let remote = RemoteRef::new("prompt-1");
    s.update_attempt(
        &lease,
        AttemptUpdate {
            remote: Some(remote.clone()),
            progress: Some(Progress::default()),
            ..AttemptUpdate::default()
        },
        at(1_000),
    )
    .await
    .expect("update_attempt");
    let progress_at = must_get(s, id).await.progress_at;
    let now = at(1_000).add(TTL).add(secs(10));
    let live = s
        .reap(&reap_opts(false, None, 3), at(0).add(TTL).sub(secs(1)))
        .await
        .expect("reap");
    assert!(live.items.is_empty(), "a live lease was reaped: {live:?}");
    let before = last_event_id(s).await;
    let report = s.reap(&reap_opts(false, None, 3), now).await.expect("reap");
    assert!(!report.dry_run);
    assert_eq!(report.items.len(), 1, "one job to reap: {report:?}");
    let item = &report.items[0];
    assert_eq!(item.job, id);
    assert_eq!(item.state, JobState::Running);
    assert_eq!(item.attempt, 1);
    assert_eq!(item.owner.as_deref(), Some("engine-a"));
    assert_eq!(item.backend.as_ref(), Some(&gpu(1)));
    assert_eq!(item.age_ms, 41_000, "age = now - submission");
    assert_eq!(item.last_progress_at, progress_at);
    assert_eq!(
        (item.reason, item.action),
        (ReapReason::LeaseExpired, ReapAction::Requeue)
    );
    assert_eq!(
        names(&report.events),
        vec!["requeued"],
        "a crash requeue appends requeued"
    );
    assert_returned_events_stored(s, before, &report.events, "reap").await;
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::RetryWait);
    assert_eq!(job.run_at, now, "run_at = now");
    assert_eq!(job.crash_requeues, 1);
    assert_eq!(job.lease, None);
    let a = &job.attempts[0];
    assert_eq!(a.outcome, Some(AttemptOutcome::LeaseExpired));
    assert_eq!(
        a.remote.as_ref(),
        Some(&remote),
        "the remote is kept for reattachment"
    );
    assert_eq!(claim_exact(s, "engine-b", now, id).await.attempt, 2);
}

async fn reap_fails_at_crash_requeue_cap(s: &dyn TaskStore) {
    let (id, _) = running(s, spec(), at(0)).await;
    let mut now = at(0);
    for round in 1..=2u32 {
        now = now.add(TTL).add(secs(1));
        let r = s.reap(&reap_opts(false, None, 2), now).await.expect("reap");
        assert_eq!(
            r.items.iter().map(|i| i.action).collect::<Vec<_>>(),
            vec![ReapAction::Requeue],
            "round {round}: below the cap the job is requeued"
        );
        assert_eq!(must_get(s, id).await.crash_requeues, round);
        let l = claim_exact(s, "engine-a", now, id).await;
        start(s, &l, now).await;
    }
    now = now.add(TTL).add(secs(1));
    let r = s.reap(&reap_opts(false, None, 2), now).await.expect("reap");
    assert_eq!(
        r.items
            .iter()
            .map(|i| (i.reason, i.action))
            .collect::<Vec<_>>(),
        vec![(ReapReason::LeaseExpired, ReapAction::Fail)],
        "at the cap the job is failed"
    );
    assert_eq!(names(&r.events).last(), Some(&"failed"));
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(job.error.is_some(), "the failed job says why");
    assert_eq!(
        job.crash_requeues, 2,
        "failing at the cap does not count another requeue"
    );
    // A cap of 0 fails on the first expiry.
    let (other, _) = running(s, spec(), now).await;
    let r = s
        .reap(&reap_opts(false, None, 0), now.add(TTL).add(secs(1)))
        .await
        .expect("reap");
    assert_eq!(r.items.len(), 1);
    assert_eq!(r.items[0].action, ReapAction::Fail, "cap 0");
    assert_eq!(must_get(s, other).await.state, JobState::Failed);
}

async fn reap_cancels_expired_lease_with_cancel_requested(s: &dyn TaskStore) {
    let (id, _) = running(s, spec(), at(0)).await;
    s.force_cancel(id, "user", at(10))
        .await
        .expect("force_cancel");
    let r = s
        .reap(&reap_opts(false, None, 3), at(0).add(TTL).add(secs(1)))
        .await
        .expect("reap");
    assert_eq!(
        r.items
            .iter()
            .map(|i| (i.reason, i.action))
            .collect::<Vec<_>>(),
        vec![(ReapReason::LeaseExpired, ReapAction::Cancel)],
        "a force-cancelled job whose holder died is cancelled"
    );
    assert_eq!(names(&r.events), vec!["cancelled"]);
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.crash_requeues, 0);
    assert_eq!(job.attempts[0].outcome, Some(AttemptOutcome::Cancelled));
}

async fn reap_times_out_attempt_without_progress(s: &dyn TaskStore) {
    let stuck = Some(secs(60));
    let (id, lease) = running(s, spec().max_attempts(2), at(0)).await;
    s.update_attempt(
        &lease,
        AttemptUpdate {
            progress: Some(Progress::default()),
            ..AttemptUpdate::default()
        },
        at(10_000),
    )
    .await
    .expect("progress");
    for hb in [25_000, 50_000, 69_000] {
        s.heartbeat(&lease, TTL, at(hb)).await.expect("heartbeat");
    }
    let r = s
        .reap(&reap_opts(false, stuck, 3), at(69_000))
        .await
        .expect("reap");
    assert!(r.items.is_empty(), "59 s without progress is not 60: {r:?}");
    let r = s
        .reap(&reap_opts(false, None, 3), at(75_000))
        .await
        .expect("reap");
    assert!(
        r.items.is_empty(),
        "without stuck_after only deadlines count: {r:?}"
    );
    let before = last_event_id(s).await;
    let r = s
        .reap(&reap_opts(false, stuck, 3), at(75_000))
        .await
        .expect("reap");
    assert_eq!(
        r.items
            .iter()
            .map(|i| (i.reason, i.action))
            .collect::<Vec<_>>(),
        vec![(ReapReason::NoProgress, ReapAction::Requeue)],
        "a live lease without progress for stuck_after is stuck"
    );
    assert_eq!(r.items[0].last_progress_at, Some(at(10_000)));
    assert_eq!(names(&r.events), vec!["attempt_failed"]);
    assert_returned_events_stored(s, before, &r.events, "reap").await;
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::RetryWait);
    assert_eq!(job.run_at, at(75_000));
    assert_eq!(job.crash_requeues, 0, "a timeout is not a crash requeue");
    assert_eq!(job.attempts[0].outcome, Some(AttemptOutcome::TimedOut));
    assert!(
        job.attempts[0].error.is_some(),
        "the timed-out attempt says why"
    );
    // The second (last) attempt also gets stuck: failed.
    let l2 = claim_exact(s, "engine-a", at(75_000), id).await;
    start(s, &l2, at(75_000)).await;
    s.heartbeat(&l2, TTL, at(130_000)).await.expect("heartbeat");
    let r = s
        .reap(&reap_opts(false, stuck, 3), at(135_000))
        .await
        .expect("reap");
    assert_eq!(
        r.items
            .iter()
            .map(|i| (i.reason, i.action))
            .collect::<Vec<_>>(),
        vec![(ReapReason::NoProgress, ReapAction::Fail)],
        "no attempts left: failed (progress counts from dispatch)"
    );
    assert_eq!(names(&r.events), vec!["attempt_failed", "failed"]);
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts[1].outcome, Some(AttemptOutcome::TimedOut));
}

async fn reap_times_out_attempt_past_phase_deadline(s: &dyn TaskStore) {
    let id = add(s, spec(), at(0)).await;
    let lease = claim_exact(s, "engine-a", at(0), id).await;
    s.start_attempt(
        &lease,
        AttemptStart {
            phase: Some(PhaseDeadline {
                phase: TimeoutPhase::Start,
                deadline: Some(at(20_000)),
            }),
            ..start_on(gpu(1))
        },
        at(0),
    )
    .await
    .expect("start_attempt");
    let r = s
        .reap(&reap_opts(false, None, 3), at(19_000))
        .await
        .expect("reap");
    assert!(
        r.items.is_empty(),
        "the phase deadline has not passed: {r:?}"
    );
    let r = s
        .reap(&reap_opts(false, None, 3), at(21_000))
        .await
        .expect("reap");
    assert_eq!(
        r.items
            .iter()
            .map(|i| (i.reason, i.action))
            .collect::<Vec<_>>(),
        vec![(ReapReason::PhaseDeadline, ReapAction::Requeue)],
        "a passed phase deadline times the attempt out"
    );
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::RetryWait);
    assert_eq!(job.attempts[0].outcome, Some(AttemptOutcome::TimedOut));
    // A later phase set by update_attempt moves the deadline.
    let l2 = claim_exact(s, "engine-a", at(21_000), id).await;
    start(s, &l2, at(21_000)).await;
    s.update_attempt(
        &l2,
        AttemptUpdate {
            phase: Some(PhaseDeadline {
                phase: TimeoutPhase::NodeSilence,
                deadline: Some(at(25_000)),
            }),
            ..AttemptUpdate::default()
        },
        at(22_000),
    )
    .await
    .expect("update phase");
    let r = s
        .reap(&reap_opts(false, None, 3), at(26_000))
        .await
        .expect("reap");
    assert_eq!(
        r.items.iter().map(|i| i.reason).collect::<Vec<_>>(),
        vec![ReapReason::PhaseDeadline],
        "the updated phase deadline counts"
    );
}

async fn reap_fails_running_job_past_its_deadline(s: &dyn TaskStore) {
    let (id, lease) = running(s, spec().deadline(secs(40)), at(0)).await;
    s.heartbeat(&lease, TTL, at(30_000))
        .await
        .expect("heartbeat");
    let r = s
        .reap(&reap_opts(false, None, 3), at(39_000))
        .await
        .expect("reap");
    assert!(r.items.is_empty(), "before the deadline: {r:?}");
    let r = s
        .reap(&reap_opts(false, None, 3), at(41_000))
        .await
        .expect("reap");
    assert_eq!(
        r.items
            .iter()
            .map(|i| (i.reason, i.action))
            .collect::<Vec<_>>(),
        vec![(ReapReason::JobDeadline, ReapAction::Fail)],
        "a running job past its deadline is failed"
    );
    let job = must_get(s, id).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts[0].outcome, Some(AttemptOutcome::TimedOut));
}

async fn reap_fails_waiting_job_past_its_deadline(s: &dyn TaskStore) {
    let (w, lw) = running(s, spec().deadline(secs(10)), at(0)).await;
    let p = add(s, spec().deadline(secs(10)), at(0)).await;
    s.fail(&lw, failure("x", Some(at(9_000))), at(1))
        .await
        .expect("fail");
    let r = s
        .reap(&reap_opts(false, None, 3), at(9_000))
        .await
        .expect("reap");
    assert!(r.items.is_empty(), "before the deadline: {r:?}");
    let r = s
        .reap(&reap_opts(false, None, 3), at(11_000))
        .await
        .expect("reap");
    let mut expect = vec![
        (
            p,
            JobState::Pending,
            ReapReason::JobDeadline,
            ReapAction::Fail,
        ),
        (
            w,
            JobState::RetryWait,
            ReapReason::JobDeadline,
            ReapAction::Fail,
        ),
    ];
    expect.sort_by_key(|e| e.0);
    assert_eq!(
        r.items
            .iter()
            .map(|i| (i.job, i.state, i.reason, i.action))
            .collect::<Vec<_>>(),
        expect,
        "waiting jobs past their deadline are failed (items ordered by job id)"
    );
    assert_eq!(
        r.items
            .iter()
            .find(|i| i.job == p)
            .and_then(|i| i.owner.clone()),
        None
    );
    assert_eq!(must_get(s, p).await.state, JobState::Failed);
    assert_eq!(must_get(s, w).await.state, JobState::Failed);
    assert_eq!(names(&r.events), vec!["failed", "failed"]);
}

async fn reap_dry_run_reports_the_same_and_changes_nothing(s: &dyn TaskStore) {
    let t = at(0);
    // Lease expires: requeue.
    let (expired, _) = running(s, spec(), t).await;
    // Lease expires with a cancel pending: cancel.
    let (cancelled, _) = running(s, spec(), t).await;
    s.force_cancel(cancelled, "user", at(1))
        .await
        .expect("force_cancel");
    // Live lease, no progress: stuck.
    let (stuck, l_stuck) = running(s, spec(), t).await;
    // Live lease, phase deadline passed.
    let phased = add(s, spec(), t).await;
    let l_phase = claim_exact(s, "engine-a", t, phased).await;
    s.start_attempt(
        &l_phase,
        AttemptStart {
            phase: Some(PhaseDeadline {
                phase: TimeoutPhase::Start,
                deadline: Some(at(35_000)),
            }),
            ..start_on(gpu(2))
        },
        t,
    )
    .await
    .expect("start_attempt");
    // Healthy: running and making progress; and pending.
    let (healthy, l_healthy) = running(s, spec(), t).await;
    // Pending past its deadline.
    let overdue = add(s, spec().deadline(secs(20)), t).await;
    let idle = add(s, spec(), t).await;
    let now = at(40_000);
    for l in [&l_stuck, &l_phase, &l_healthy] {
        s.heartbeat(l, TTL, at(35_000)).await.expect("heartbeat");
    }
    s.update_attempt(
        &l_healthy,
        AttemptUpdate {
            progress: Some(Progress::default()),
            ..AttemptUpdate::default()
        },
        at(39_000),
    )
    .await
    .expect("progress");
    let ids = [expired, cancelled, stuck, phased, overdue, healthy, idle];
    let opts = reap_opts(true, Some(secs(30)), 3);
    let before = snapshot(s, &ids).await;
    let dry = s.reap(&opts, now).await.expect("dry-run reap");
    assert!(dry.dry_run, "the report says it was a dry run");
    assert!(
        dry.events.is_empty(),
        "a dry run appends no events: {:?}",
        dry.events
    );
    assert_eq!(
        snapshot(s, &ids).await,
        before,
        "a dry run must change nothing"
    );
    let mut expect = vec![
        (expired, ReapReason::LeaseExpired, ReapAction::Requeue),
        (cancelled, ReapReason::LeaseExpired, ReapAction::Cancel),
        (stuck, ReapReason::NoProgress, ReapAction::Requeue),
        (phased, ReapReason::PhaseDeadline, ReapAction::Requeue),
        (overdue, ReapReason::JobDeadline, ReapAction::Fail),
    ];
    expect.sort_by_key(|e| e.0);
    assert_eq!(
        dry.items
            .iter()
            .map(|i| (i.job, i.reason, i.action))
            .collect::<Vec<_>>(),
        expect,
        "the dry run finds every stuck job, ordered by id, and nothing else"
    );
    let again = s.reap(&opts, now).await.expect("second dry run");
    assert_eq!(again.items, dry.items, "a second dry run reports the same");
    let real = s
        .reap(
            &ReapOptions {
                dry_run: false,
                ..opts
            },
            now,
        )
        .await
        .expect("real reap");
    assert!(!real.dry_run);
    assert_eq!(
        real.items, dry.items,
        "the real run handles exactly what the dry run reported"
    );
    assert!(!real.events.is_empty(), "the real run appends events");
    assert_eq!(must_get(s, expired).await.state, JobState::RetryWait);
    assert_eq!(must_get(s, cancelled).await.state, JobState::Cancelled);
    assert_eq!(must_get(s, stuck).await.state, JobState::RetryWait);
    assert_eq!(must_get(s, phased).await.state, JobState::RetryWait);
    assert_eq!(must_get(s, overdue).await.state, JobState::Failed);
    assert_eq!(must_get(s, healthy).await.state, JobState::Running);
    assert_eq!(must_get(s, idle).await.state, JobState::Pending);
    let after = s
        .reap(&reap_opts(false, Some(secs(30)), 3), now)
        .await
        .expect("reap");
    assert!(after.items.is_empty(), "nothing is left to reap: {after:?}");
}

async fn list_newest_first_with_filters(s: &dyn TaskStore) {
    let a = add(s, spec().label("project", "cats"), at(0)).await;
    let b = add(s, spec().label("project", "dogs"), at(1_000)).await;
    let c = add(s, spec().label("project", "cats"), at(2_000)).await;
    let d = add(s, spec(), at(3_000)).await;
    let e = add(s, spec(), at(4_000)).await;
    // b fails on gpu-2, c succeeds on gpu-1, d stays running without an attempt, a and e go
    // back to pending.
    let mut leases = HashMap::new();
    for _ in 0..5 {
        if let Some(cl) = s.claim("engine-a", TTL, at(5_001)).await.expect("claim") {
            leases.insert(cl.lease.job, cl.lease);
        }
    }
    let get_lease = |id: JobId| {
        leases
            .get(&id)
            .cloned()
            .unwrap_or_else(|| panic!("job {id} was not claimed"))
    };
    let lb = get_lease(b);
    s.start_attempt(&lb, start_on(gpu(2)), at(5_002))
        .await
        .expect("start b");
    s.fail(
        &lb,
        Failure {
            error: ExecutionError::backend_specific("CUDA Out Of Memory on node 2"),
            ..failure("", None)
        },
        at(5_003),
    )
    .await
    .expect("fail b");
    let lc = get_lease(c);
    start(s, &lc, at(5_002)).await;
    s.complete(&lc, Completion::default(), at(5_003))
        .await
        .expect("complete c");
    for id in [a, e] {
        s.release(&get_lease(id), at(5_000), "later", at(5_004))
            .await
            .expect("release");
    }
    let _ = get_lease(d); // stays running
    let list = |filter: JobFilter| async move {
        s.list(&filter)
            .await
            .unwrap_or_else(|err| panic!("list {filter:?} failed: {err}"))
    };
    let ids = |page: &comfyfleet_core::JobPage| page.jobs.iter().map(|j| j.id).collect::<Vec<_>>();
    let all = list(JobFilter::default()).await;
    assert_eq!(ids(&all), vec![e, d, c, b, a], "list is newest first");
    assert_eq!(all.next, None, "everything fit on one page");
    let states: Vec<JobState> = all.jobs.iter().map(|j| j.state).collect();
    assert_eq!(
        states,
        vec![
            JobState::Pending,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Pending
        ],
        "summaries carry the state"
    );
    let pending = list(JobFilter {
        states: vec![JobState::Pending],
        ..JobFilter::default()
    })
    .await;
    assert_eq!(ids(&pending), vec![e, a], "state filter");
    let ended = list(JobFilter {
        states: vec![JobState::Failed, JobState::Succeeded],
        ..JobFilter::default()
    })
    .await;
    assert_eq!(ids(&ended), vec![c, b], "several states");
    let on1 = list(JobFilter {
        backend: Some(gpu(1)),
        ..JobFilter::default()
    })
    .await;
    assert_eq!(ids(&on1), vec![c], "backend filter (latest attempt)");
    let on2 = list(JobFilter {
        backend: Some(gpu(2)),
        ..JobFilter::default()
    })
    .await;
    assert_eq!(ids(&on2), vec![b], "backend filter (latest attempt)");
    let cats = list(JobFilter {
        label: Some(("project".into(), "cats".into())),
        ..JobFilter::default()
    })
    .await;
    assert_eq!(ids(&cats), vec![c, a], "label filter");
    let window = list(JobFilter {
        created_after: Some(at(1_000)),
        created_before: Some(at(3_000)),
        ..JobFilter::default()
    })
    .await;
    assert_eq!(
        ids(&window),
        vec![c, b],
        "created_after is inclusive, created_before exclusive"
    );
    let oom = list(JobFilter {
        error_contains: Some("out of MEMORY".into()),
        ..JobFilter::default()
    })
    .await;
    assert_eq!(ids(&oom), vec![b], "error text filter is case-insensitive");
    assert_eq!(
        oom.jobs[0].error.as_deref(),
        Some("CUDA Out Of Memory on node 2"),
        "the summary carries the error message"
    );
    let none = list(JobFilter {
        error_contains: Some("segfault".into()),
        ..JobFilter::default()
    })
    .await;
    assert!(
        none.jobs.is_empty() && none.next.is_none(),
        "no match: {none:?}"
    );
    let combined = list(JobFilter {
        states: vec![JobState::Pending],
        label: Some(("project".into(), "cats".into())),
        ..JobFilter::default()
    })
    .await;
    assert_eq!(ids(&combined), vec![a], "filters combine with AND");
}

async fn list_pagination_covers_every_job_once(s: &dyn TaskStore) {
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(add(s, spec(), at(i * 10)).await);
    }
    let newest_first: Vec<JobId> = created.iter().rev().copied().collect();
    for limit in [1u32, 2, 3, 6, 7, 8] {
        let mut seen = Vec::new();
        let mut before = None;
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages <= 9, "limit {limit}: pagination does not end");
            let page = s
                .list(&JobFilter {
                    before,
                    limit,
                    ..JobFilter::default()
                })
                .await
                .expect("list");
            assert!(
                page.jobs.len() <= limit as usize,
                "limit {limit}: page of {}",
                page.jobs.len()
            );
            seen.extend(page.jobs.iter().map(|j| j.id));
            match page.next {
                Some(next) => {
                    assert_eq!(
                        page.jobs.last().map(|j| j.id),
                        Some(next),
                        "limit {limit}: next is the last id of the page"
                    );
                    before = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(
            seen, newest_first,
            "limit {limit}: every job exactly once, newest first"
        );
        let expected_pages = 7usize.div_ceil(limit as usize);
        assert_eq!(
            pages, expected_pages,
            "limit {limit}: next must be None exactly on the last page"
        );
    }
}

async fn list_limit_bounds(s: &dyn TaskStore) {
    for i in 0..101 {
        add(s, spec(), at(i)).await;
    }
    let page = s.list(&JobFilter::default()).await.expect("list");
    assert_eq!(page.jobs.len(), 100, "limit 0 means 100");
    assert!(page.next.is_some(), "a 101st job follows");
    let page = s
        .list(&JobFilter {
            limit: 1000,
            ..JobFilter::default()
        })
        .await
        .expect("list limit 1000");
    assert_eq!(page.jobs.len(), 101);
    assert_eq!(page.next, None);
    let r = s
        .list(&JobFilter {
            limit: 1001,
            ..JobFilter::default()
        })
        .await;
    assert_invalid_input(r, "list with limit 1001");
}

async fn counts_by_state(s: &dyn TaskStore) {
    let empty = s.counts().await.expect("counts");
    assert_eq!(empty.total(), 0, "an empty store counts nothing");
    let (_, l_ok) = running(s, spec(), at(0)).await;
    s.complete(&l_ok, Completion::default(), at(1))
        .await
        .expect("complete");
    let (_, l_retry) = running(s, spec(), at(0)).await;
    s.fail(&l_retry, failure("x", Some(at(100))), at(1))
        .await
        .expect("fail");
    let (_, l_fail) = running(s, spec(), at(0)).await;
    s.fail(&l_fail, failure("x", None), at(1))
        .await
        .expect("fail");
    let c = add(s, spec(), at(0)).await;
    s.cancel(c, "user", at(1)).await.expect("cancel");
    running(s, spec(), at(10)).await;
    add(s, spec(), at(20)).await; // pending
    add(s, spec(), at(20)).await; // pending
    let counts = s.counts().await.expect("counts");
    let expect = [
        (JobState::Pending, 2),
        (JobState::Running, 1),
        (JobState::RetryWait, 1),
        (JobState::Succeeded, 1),
        (JobState::Failed, 1),
        (JobState::Cancelled, 1),
    ];
    for (state, n) in expect {
        assert_eq!(counts.get(state), n, "count of {state}");
    }
    assert_eq!(counts.total(), 7);
}

async fn events_ids_seqs_and_filters(s: &dyn TaskStore) {
    let a = add(s, spec(), at(0)).await;
    let b = add(s, spec(), at(1)).await;
    let la = claim_exact(s, "engine-a", at(2), a).await;
    let lb = claim_exact(s, "engine-a", at(2), b).await;
    start(s, &la, at(3)).await;
    start(s, &lb, at(4)).await;
    s.fail(&lb, failure("x", None), at(5))
        .await
        .expect("fail b");
    s.complete(&la, Completion::default(), at(6))
        .await
        .expect("complete a");
    let all = all_events(s).await;
    assert_eq!(
        all.len(),
        7,
        "submitted×2, dispatched×2, attempt_failed, failed, succeeded"
    );
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "global ids strictly increase: {:?}",
        all.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    for (id, n) in [(a, 3u32), (b, 4)] {
        let evs = job_events(s, id).await;
        assert!(
            evs.iter().all(|e| e.job == id),
            "job filter returns only that job"
        );
        assert_eq!(
            evs.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "per-job seqs are 1, 2, 3, …"
        );
        assert_eq!(
            must_get(s, id).await.last_seq,
            n,
            "last_seq is the last event's seq"
        );
        let expected: Vec<&Event> = all.iter().filter(|e| e.job == id).collect();
        assert_eq!(
            evs.iter().collect::<Vec<_>>(),
            expected,
            "job filter keeps id order"
        );
    }
    assert_eq!(
        names(&job_events(s, a).await),
        vec!["submitted", "dispatched", "succeeded"]
    );
    let third = all[2].id;
    let after = s
        .events(&EventQuery {
            after: Some(third),
            ..EventQuery::default()
        })
        .await
        .expect("events after");
    assert_eq!(after, all[3..].to_vec(), "after returns only larger ids");
    let limited = s
        .events(&EventQuery {
            limit: 2,
            ..EventQuery::default()
        })
        .await
        .expect("events limit");
    assert_eq!(limited, all[..2].to_vec(), "limit returns the first events");
    let combined = s
        .events(&EventQuery {
            job: Some(b),
            after: Some(third),
            limit: 1,
        })
        .await
        .expect("events combined");
    let expect: Vec<Event> = all
        .iter()
        .filter(|e| e.job == b && e.id > third)
        .take(1)
        .cloned()
        .collect();
    assert_eq!(combined, expect, "job, after and limit combine");
    let last = all.last().map(|e| e.id);
    let nothing = s
        .events(&EventQuery {
            after: last,
            ..EventQuery::default()
        })
        .await
        .expect("events after the last");
    assert!(nothing.is_empty(), "nothing after the last event");
}

async fn prune_deletes_old_terminal_jobs_with_events(s: &dyn TaskStore) {
    let (old_ok, l1) = running(s, spec().idempotency_key("nightly"), at(0)).await;
    s.complete(&l1, Completion::default(), at(1_000))
        .await
        .expect("complete");
    let (old_failed, l2) = running(s, spec(), at(0)).await;
    s.fail(&l2, failure("x", None), at(2_000))
        .await
        .expect("fail");
    let recent = add(s, spec(), at(0)).await;
    s.cancel(recent, "user", at(5_000)).await.expect("cancel");
    let (run, _) = running(s, spec(), at(0)).await;
    let (waiting, l3) = running(s, spec(), at(0)).await;
    s.fail(&l3, failure("x", Some(at(100))), at(10))
        .await
        .expect("fail");
    let pending = add(s, spec(), at(0)).await;
    let kept = [recent, pending, run, waiting];
    let kept_before = snapshot(s, &kept).await.0;
    let n = s.prune(at(3_000)).await.expect("prune");
    assert_eq!(n, 2, "two terminal jobs finished before the cutoff");
    for id in [old_ok, old_failed] {
        assert_eq!(
            s.get(id).await.expect("get"),
            None,
            "pruned job {id} is gone"
        );
        assert!(
            job_events(s, id).await.is_empty(),
            "pruned job {id}'s events are gone"
        );
    }
    assert_eq!(
        snapshot(s, &kept).await.0,
        kept_before,
        "other jobs are untouched"
    );
    for id in kept {
        assert!(
            !job_events(s, id).await.is_empty(),
            "job {id} keeps its events"
        );
    }
    assert_eq!(
        s.prune(at(3_000)).await.expect("prune again"),
        0,
        "nothing left to prune"
    );
    let reuse = s
        .enqueue(NewJob::new(spec().idempotency_key("nightly")), at(6_000))
        .await
        .expect("enqueue with a pruned key");
    assert!(
        reuse.created,
        "a pruned job's idempotency key can be used again"
    );
    assert_ne!(reuse.id, old_ok);
}

async fn try_lead_elects_one_leader(s: &dyn TaskStore) {
    let ttl = secs(10);
    assert!(
        s.try_lead("a", ttl, at(0)).await.expect("try_lead"),
        "first owner leads"
    );
    assert!(
        !s.try_lead("b", ttl, at(5_000)).await.expect("try_lead"),
        "b refused while a leads"
    );
    assert!(
        s.try_lead("a", ttl, at(8_000)).await.expect("try_lead"),
        "the leader renews"
    );
    assert!(
        !s.try_lead("b", ttl, at(15_000)).await.expect("try_lead"),
        "the renewal extended a's term to 18 s"
    );
    assert!(
        s.try_lead("b", ttl, at(18_001)).await.expect("try_lead"),
        "b takes over after expiry"
    );
    assert!(
        !s.try_lead("a", ttl, at(19_000)).await.expect("try_lead"),
        "a lost the lead"
    );
}

// ---------------------------------------------------------------------------------------------
// The model-based test
// ---------------------------------------------------------------------------------------------

/// Lease length in the model test.
const MODEL_TTL: Duration = Duration::from_secs(10);

/// Which of a job's leases a fenced operation uses.
#[derive(Debug, Clone, Copy)]
enum LeaseSel {
    /// The newest lease handed out for the job.
    Latest,
    /// The n-th lease handed out (modulo how many there are): often a stale one.
    Nth(u8),
}

/// Which job an operation targets.
#[derive(Debug, Clone, Copy)]
enum JobSel {
    /// The n-th (modulo) of the jobs the model has `running` now; any job if none runs.
    Running(u8),
    /// The n-th (modulo) of all jobs created so far, in submission order.
    Any(u8),
}

/// One step of a model-test sequence.
#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        priority: i32,
        max_attempts: u32,
        key: Option<u8>,
        deadline_ms: Option<u64>,
    },
    Claim {
        owner: u8,
    },
    Heartbeat {
        job: JobSel,
        lease: LeaseSel,
    },
    StartAttempt {
        job: JobSel,
        lease: LeaseSel,
        reattach: bool,
        phase_ms: Option<u64>,
    },
    Progress {
        job: JobSel,
        lease: LeaseSel,
        phase_ms: Option<u64>,
    },
    Complete {
        job: JobSel,
        lease: LeaseSel,
    },
    Fail {
        job: JobSel,
        lease: LeaseSel,
        retry: bool,
        delay_ms: u64,
    },
    Release {
        job: JobSel,
        lease: LeaseSel,
        delay_ms: u64,
    },
    Cancel {
        job: JobSel,
    },
    ForceCancel {
        job: JobSel,
    },
    AckCancel {
        job: JobSel,
        lease: LeaseSel,
    },
    Detach {
        job: JobSel,
        lease: LeaseSel,
    },
    Reap {
        dry_run: bool,
        stuck_after_ms: Option<u64>,
        max_crash_requeues: u32,
    },
    /// The clock moves on; with `keep_alive`, every running job's holder then heartbeats with
    /// its latest lease (engines alive while time passes).
    Advance {
        ms: u64,
        keep_alive: bool,
    },
}

fn enqueue_strategy() -> impl Strategy<Value = Op> {
    (
        -2i32..3,
        1u32..4,
        proptest::option::weighted(0.3, 0u8..3),
        proptest::option::weighted(0.3, 5_000u64..60_000),
    )
        .prop_map(|(priority, max_attempts, key, deadline_ms)| Op::Enqueue {
            priority,
            max_attempts,
            key,
            deadline_ms,
        })
}

/// A few enqueues to start from, then 1 to 60 random operations.
fn sequence_strategy() -> impl Strategy<Value = Vec<Op>> {
    (
        proptest::collection::vec(enqueue_strategy(), 0..4),
        proptest::collection::vec(op_strategy(), 1..60),
    )
        .prop_map(|(mut setup, ops)| {
            setup.extend(ops);
            setup
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let job = || {
        prop_oneof![
            3 => (0u8..3).prop_map(JobSel::Running),
            1 => (0u8..8).prop_map(JobSel::Any),
        ]
    };
    let lease = || {
        prop_oneof![
            4 => Just(LeaseSel::Latest),
            1 => (0u8..4).prop_map(LeaseSel::Nth),
        ]
    };
    prop_oneof![
        5 => enqueue_strategy(),
        8 => (0u8..2).prop_map(|owner| Op::Claim { owner }),
        3 => (job(), lease()).prop_map(|(job, lease)| Op::Heartbeat { job, lease }),
        7 => (
            job(),
            lease(),
            proptest::bool::weighted(0.2),
            proptest::option::weighted(0.4, 500u64..12_000),
        )
            .prop_map(|(job, lease, reattach, phase_ms)| Op::StartAttempt {
                job,
                lease,
                reattach,
                phase_ms
            }),
        2 => (job(), lease(), proptest::option::weighted(0.2, 500u64..12_000))
            .prop_map(|(job, lease, phase_ms)| Op::Progress { job, lease, phase_ms }),
        1 => (job(), lease()).prop_map(|(job, lease)| Op::Complete { job, lease }),
        2 => (job(), lease(), proptest::bool::weighted(0.7), 0u64..10_000).prop_map(
            |(job, lease, retry, delay_ms)| Op::Fail {
                job,
                lease,
                retry,
                delay_ms
            }
        ),
        1 => (job(), lease(), 0u64..5_000)
            .prop_map(|(job, lease, delay_ms)| Op::Release { job, lease, delay_ms }),
        1 => job().prop_map(|job| Op::Cancel { job }),
        3 => job().prop_map(|job| Op::ForceCancel { job }),
        1 => (job(), lease()).prop_map(|(job, lease)| Op::AckCancel { job, lease }),
        1 => (job(), lease()).prop_map(|(job, lease)| Op::Detach { job, lease }),
        7 => (
            proptest::bool::weighted(0.3),
            proptest::option::weighted(0.8, prop_oneof![Just(1_000u64), Just(5_000), Just(20_000)]),
            0u32..3,
        )
            .prop_map(|(dry_run, stuck_after_ms, max_crash_requeues)| Op::Reap {
                dry_run,
                stuck_after_ms,
                max_crash_requeues
            }),
        2 => (0u64..3_000, any::<bool>()).prop_map(|(ms, keep_alive)| Op::Advance { ms, keep_alive }),
        2 => (5_000u64..25_000, any::<bool>()).prop_map(|(ms, keep_alive)| Op::Advance { ms, keep_alive }),
    ]
}

/// A store error, by variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrKind {
    NotFound,
    LeaseLost,
    InvalidTransition,
    InvalidInput,
    Other,
}

impl From<&StoreError> for ErrKind {
    fn from(e: &StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => ErrKind::NotFound,
            StoreError::LeaseLost { .. } => ErrKind::LeaseLost,
            StoreError::InvalidTransition { .. } => ErrKind::InvalidTransition,
            StoreError::InvalidInput(_) => ErrKind::InvalidInput,
            _ => ErrKind::Other,
        }
    }
}

/// One reap item as the model predicts it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeenItem {
    job: JobId,
    state: JobState,
    attempt: u32,
    owner: Option<String>,
    reason: ReapReason,
    action: ReapAction,
}

/// What an operation answered (events are compared separately).
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Enqueued {
        id: JobId,
        created: bool,
    },
    Claimed(Option<(JobId, u32, String)>),
    Heartbeat {
        cancel_requested: bool,
        expires_at: Timestamp,
    },
    Written,
    Cancel(CancelOutcome),
    Reaped {
        dry_run: bool,
        items: Vec<SeenItem>,
    },
    Advanced,
}

/// The model's prediction: the answer and the names of the events appended.
type Expect = (Result<Answer, ErrKind>, Vec<&'static str>);

#[derive(Debug, Clone)]
struct MAttempt {
    number: u32,
    reattached: bool,
    remote: Option<RemoteRef>,
    outcome: Option<AttemptOutcome>,
    dispatched_at: Timestamp,
}

#[derive(Debug, Clone)]
struct MJob {
    id: JobId,
    priority: i32,
    max_attempts: u32,
    created_at: Timestamp,
    deadline: Option<Timestamp>,
    state: JobState,
    run_at: Timestamp,
    claims: u32,
    attempts: Vec<MAttempt>,
    crash_requeues: u32,
    cancel_requested: bool,
    lease: Option<(String, Timestamp)>,
    progress_at: Option<Timestamp>,
    phase_deadline: Option<Timestamp>,
}

impl MJob {
    fn open(&self) -> Option<&MAttempt> {
        self.attempts.last().filter(|a| a.outcome.is_none())
    }

    fn counted(&self) -> u32 {
        u32::try_from(self.attempts.iter().filter(|a| !a.reattached).count()).unwrap_or(u32::MAX)
    }

    /// Closes the open attempt, if any; true if there was one.
    fn close(&mut self, outcome: AttemptOutcome) -> bool {
        match self.attempts.last_mut() {
            Some(a) if a.outcome.is_none() => {
                a.outcome = Some(outcome);
                true
            }
            _ => false,
        }
    }

    /// Leaves `running` (the lease and phase go with it).
    fn leave(&mut self, state: JobState) {
        self.state = state;
        self.lease = None;
        self.phase_deadline = None;
    }
}

/// The reference model: a plain state machine written from the contract in
/// `comfyfleet_core::store`.
#[derive(Debug)]
struct Model {
    jobs: Vec<MJob>,
    keys: HashMap<String, usize>,
    now: Timestamp,
}

/// Where a failed attempt sends the job.
enum After {
    Retry(Timestamp),
    Fail,
    Cancel,
}

impl Model {
    fn new(now: Timestamp) -> Self {
        Model {
            jobs: Vec::new(),
            keys: HashMap::new(),
            now,
        }
    }

    fn enqueue(
        &mut self,
        id: JobId,
        priority: i32,
        max_attempts: u32,
        key: Option<String>,
        deadline_ms: Option<u64>,
    ) -> Expect {
        if let Some(k) = &key
            && let Some(&idx) = self.keys.get(k)
        {
            let existing = self.jobs[idx].id;
            return (
                Ok(Answer::Enqueued {
                    id: existing,
                    created: false,
                }),
                vec![],
            );
        }
        if let Some(k) = key {
            self.keys.insert(k, self.jobs.len());
        }
        self.jobs.push(MJob {
            id,
            priority,
            max_attempts,
            created_at: self.now,
            deadline: deadline_ms.map(|ms| self.now.add(Duration::from_millis(ms))),
            state: JobState::Pending,
            run_at: self.now,
            claims: 0,
            attempts: Vec::new(),
            crash_requeues: 0,
            cancel_requested: false,
            lease: None,
            progress_at: None,
            phase_deadline: None,
        });
        (
            Ok(Answer::Enqueued { id, created: true }),
            vec!["submitted"],
        )
    }

    /// Also returns the index of the claimed job.
    fn claim(&mut self, owner: &str) -> (Expect, Option<usize>) {
        let now = self.now;
        let best = self
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| {
                matches!(j.state, JobState::Pending | JobState::RetryWait) && j.run_at <= now
            })
            .max_by_key(|(i, j)| (j.priority, Reverse(*i)))
            .map(|(i, _)| i);
        let Some(idx) = best else {
            return ((Ok(Answer::Claimed(None)), vec![]), None);
        };
        let j = &mut self.jobs[idx];
        j.state = JobState::Running;
        j.claims += 1;
        j.lease = Some((owner.to_owned(), now.add(MODEL_TTL)));
        (
            (
                Ok(Answer::Claimed(Some((j.id, j.claims, owner.to_owned())))),
                vec![],
            ),
            Some(idx),
        )
    }

    /// The fencing rule: the job is running under exactly this claim.
    fn fenced(&self, job: Option<usize>, lease: &Lease) -> Result<usize, ErrKind> {
        let idx = job.ok_or(ErrKind::LeaseLost)?;
        let j = &self.jobs[idx];
        if j.id == lease.job && j.state == JobState::Running && j.claims == lease.attempt {
            Ok(idx)
        } else {
            Err(ErrKind::LeaseLost)
        }
    }

    fn heartbeat(&mut self, job: Option<usize>, lease: &Lease) -> Expect {
        let idx = match self.fenced(job, lease) {
            Ok(i) => i,
            Err(e) => return (Err(e), vec![]),
        };
        let expires_at = self.now.add(MODEL_TTL);
        let j = &mut self.jobs[idx];
        j.lease = Some((lease.owner.clone(), expires_at));
        (
            Ok(Answer::Heartbeat {
                cancel_requested: j.cancel_requested,
                expires_at,
            }),
            vec![],
        )
    }

    fn start_attempt(
        &mut self,
        job: Option<usize>,
        lease: &Lease,
        remote: Option<RemoteRef>,
        phase_ms: Option<u64>,
    ) -> Expect {
        let idx = match self.fenced(job, lease) {
            Ok(i) => i,
            Err(e) => return (Err(e), vec![]),
        };
        let now = self.now;
        let j = &mut self.jobs[idx];
        if j.attempts.last().is_some_and(|a| a.number == j.claims) {
            return (Err(ErrKind::InvalidTransition), vec![]);
        }
        let reattached = remote.is_some();
        j.attempts.push(MAttempt {
            number: j.claims,
            reattached,
            remote,
            outcome: None,
            dispatched_at: now,
        });
        j.progress_at = Some(now);
        j.phase_deadline = phase_ms.map(|ms| now.add(Duration::from_millis(ms)));
        let name = if reattached {
            "reattached"
        } else {
            "dispatched"
        };
        (Ok(Answer::Written), vec![name])
    }

    fn progress(
        &mut self,
        job: Option<usize>,
        lease: &Lease,
        remote: RemoteRef,
        phase_ms: Option<u64>,
    ) -> Expect {
        let idx = match self.fenced(job, lease) {
            Ok(i) => i,
            Err(e) => return (Err(e), vec![]),
        };
        let now = self.now;
        let j = &mut self.jobs[idx];
        let claims = j.claims;
        let Some(a) = j
            .attempts
            .last_mut()
            .filter(|a| a.outcome.is_none() && a.number == claims)
        else {
            return (Err(ErrKind::InvalidTransition), vec![]);
        };
        a.remote = Some(remote);
        j.progress_at = Some(now);
        if let Some(ms) = phase_ms {
            j.phase_deadline = Some(now.add(Duration::from_millis(ms)));
        }
        (Ok(Answer::Written), vec!["progress"])
    }

    fn complete(&mut self, job: Option<usize>, lease: &Lease) -> Expect {
        let idx = match self.fenced(job, lease) {
            Ok(i) => i,
            Err(e) => return (Err(e), vec![]),
        };
        let j = &mut self.jobs[idx];
        if j.open().is_none() {
            return (Err(ErrKind::InvalidTransition), vec![]);
        }
        j.close(AttemptOutcome::Succeeded);
        j.leave(JobState::Succeeded);
        (Ok(Answer::Written), vec!["succeeded"])
    }

    /// The contract's retry rule (also used by the reaper's timeouts).
    fn after_failure(j: &MJob, retry_at: Option<Timestamp>) -> After {
        if j.cancel_requested {
            return After::Cancel;
        }
        match retry_at {
            Some(at) if j.counted() < j.max_attempts && j.deadline.is_none_or(|d| at < d) => {
                After::Retry(at)
            }
            _ => After::Fail,
        }
    }

    /// Applies a failure decision; returns the event names after `attempt_failed`.
    fn apply_after(j: &mut MJob, after: After) -> Option<&'static str> {
        match after {
            After::Retry(at) => {
                j.leave(JobState::RetryWait);
                j.run_at = at;
                None
            }
            After::Fail => {
                j.leave(JobState::Failed);
                Some("failed")
            }
            After::Cancel => {
                j.leave(JobState::Cancelled);
                Some("cancelled")
            }
        }
    }

    fn fail(&mut self, job: Option<usize>, lease: &Lease, retry_at: Option<Timestamp>) -> Expect {
        let idx = match self.fenced(job, lease) {
            Ok(i) => i,
            Err(e) => return (Err(e), vec![]),
        };
        let j = &mut self.jobs[idx];
        let closed = j.close(AttemptOutcome::Failed);
        let after = Self::after_failure(j, retry_at);
        let mut names = Vec::new();
        if closed {
            names.push("attempt_failed");
        } else if matches!(after, After::Retry(_)) {
            // Never placed: back to waiting, which is still a state change with its event.
            names.push("waiting");
        }
        names.extend(Self::apply_after(j, after));
        (Ok(Answer::Written), names)
    }

    fn release(&mut self, job: Option<usize>, lease: &Lease, run_at: Timestamp) -> Expect {
        let idx = match self.fenced(job, lease) {
            Ok(i) => i,
            Err(e) => return (Err(e), vec![]),
        };
        let j = &mut self.jobs[idx];
        if j.open().is_some() {
            return (Err(ErrKind::InvalidTransition), vec![]);
        }
        if j.cancel_requested {
            j.leave(JobState::Cancelled);
            return (Ok(Answer::Written), vec!["cancelled"]);
        }
        j.leave(JobState::Pending);
        j.run_at = run_at;
        (Ok(Answer::Written), vec!["waiting"])
    }

    fn cancel(&mut self, job: Option<usize>, force: bool) -> Expect {
        let Some(idx) = job else {
            return (Err(ErrKind::NotFound), vec![]);
        };
        let j = &mut self.jobs[idx];
        match j.state {
            JobState::Pending | JobState::RetryWait => {
                j.leave(JobState::Cancelled);
                (
                    Ok(Answer::Cancel(CancelOutcome::Cancelled)),
                    vec!["cancelled"],
                )
            }
            JobState::Running if !force => (Ok(Answer::Cancel(CancelOutcome::Running)), vec![]),
            JobState::Running if j.cancel_requested => {
                (Ok(Answer::Cancel(CancelOutcome::AlreadyRequested)), vec![])
            }
            JobState::Running => {
                j.cancel_requested = true;
                (
                    Ok(Answer::Cancel(CancelOutcome::CancelRequested)),
                    vec!["cancel_requested"],
                )
            }
            st => (
                Ok(Answer::Cancel(CancelOutcome::AlreadyTerminal(st))),
                vec![],
            ),
        }
    }

    fn ack_cancel(&mut self, job: Option<usize>, lease: &Lease) -> Expect {
        let idx = match self.fenced(job, lease) {
            Ok(i) => i,
            Err(e) => return (Err(e), vec![]),
        };
        let j = &mut self.jobs[idx];
        j.close(AttemptOutcome::Cancelled);
        j.leave(JobState::Cancelled);
        (Ok(Answer::Written), vec!["cancelled"])
    }

    fn detach(&mut self, job: Option<usize>, lease: &Lease) -> Expect {
        let idx = match self.fenced(job, lease) {
            Ok(i) => i,
            Err(e) => return (Err(e), vec![]),
        };
        let now = self.now;
        let j = &mut self.jobs[idx];
        j.close(AttemptOutcome::Detached);
        j.leave(JobState::RetryWait);
        j.run_at = now;
        (Ok(Answer::Written), vec!["requeued"])
    }

    fn reap_decision(
        &self,
        j: &MJob,
        stuck_after: Option<Duration>,
        max_crash_requeues: u32,
    ) -> Option<(ReapReason, ReapAction)> {
        let now = self.now;
        let retry_or_fail = || {
            if j.cancel_requested {
                ReapAction::Cancel
            } else if j.counted() < j.max_attempts && j.deadline.is_none_or(|d| now < d) {
                ReapAction::Requeue
            } else {
                ReapAction::Fail
            }
        };
        match j.state {
            JobState::Running => {
                let (_, expires_at) = j.lease.as_ref()?;
                if *expires_at <= now {
                    let action = if j.cancel_requested {
                        ReapAction::Cancel
                    } else if j.crash_requeues >= max_crash_requeues {
                        ReapAction::Fail
                    } else {
                        ReapAction::Requeue
                    };
                    return Some((ReapReason::LeaseExpired, action));
                }
                let open = j.open()?;
                if j.deadline.is_some_and(|d| d <= now) {
                    let action = if j.cancel_requested {
                        ReapAction::Cancel
                    } else {
                        ReapAction::Fail
                    };
                    return Some((ReapReason::JobDeadline, action));
                }
                if j.phase_deadline.is_some_and(|d| d <= now) {
                    return Some((ReapReason::PhaseDeadline, retry_or_fail()));
                }
                if let Some(after) = stuck_after {
                    let last = j.progress_at.unwrap_or(open.dispatched_at);
                    if now.since(last) >= after {
                        return Some((ReapReason::NoProgress, retry_or_fail()));
                    }
                }
                None
            }
            JobState::Pending | JobState::RetryWait => j
                .deadline
                .filter(|d| *d <= now)
                .map(|_| (ReapReason::JobDeadline, ReapAction::Fail)),
            _ => None,
        }
    }

    fn reap(&mut self, dry_run: bool, stuck_after: Option<Duration>, max_crash: u32) -> Expect {
        let now = self.now;
        let mut order: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| !self.jobs[i].state.is_terminal())
            .collect();
        order.sort_by_key(|&i| self.jobs[i].id);
        let mut items = Vec::new();
        let mut names = Vec::new();
        for idx in order {
            let Some((reason, action)) =
                self.reap_decision(&self.jobs[idx], stuck_after, max_crash)
            else {
                continue;
            };
            let j = &mut self.jobs[idx];
            items.push(SeenItem {
                job: j.id,
                state: j.state,
                attempt: j.claims,
                owner: j.lease.as_ref().map(|(o, _)| o.clone()),
                reason,
                action,
            });
            if dry_run {
                continue;
            }
            match (j.state, reason) {
                (JobState::Pending | JobState::RetryWait, _) => {
                    j.leave(JobState::Failed);
                    names.push("failed");
                }
                (_, ReapReason::LeaseExpired) => match action {
                    ReapAction::Requeue => {
                        j.close(AttemptOutcome::LeaseExpired);
                        j.crash_requeues += 1;
                        j.leave(JobState::RetryWait);
                        j.run_at = now;
                        names.push("requeued");
                    }
                    ReapAction::Fail => {
                        j.close(AttemptOutcome::LeaseExpired);
                        j.leave(JobState::Failed);
                        names.push("failed");
                    }
                    ReapAction::Cancel => {
                        j.close(AttemptOutcome::Cancelled);
                        j.leave(JobState::Cancelled);
                        names.push("cancelled");
                    }
                },
                _ => {
                    j.close(AttemptOutcome::TimedOut);
                    names.push("attempt_failed");
                    let after = match action {
                        ReapAction::Requeue => After::Retry(now),
                        ReapAction::Fail => After::Fail,
                        ReapAction::Cancel => After::Cancel,
                    };
                    names.extend(Self::apply_after(j, after));
                }
            }
        }
        (Ok(Answer::Reaped { dry_run, items }), names)
    }
}

/// What one model-test case observed, for the coverage check.
#[derive(Debug, Default)]
struct Coverage {
    counts: BTreeMap<&'static str, u64>,
}

impl Coverage {
    fn hit(&mut self, what: &'static str) {
        *self.counts.entry(what).or_insert(0) += 1;
    }
}

/// Runs one operation sequence against a store and the model.
struct ModelRun<'a> {
    store: &'a dyn TaskStore,
    model: Model,
    /// Every lease handed out, per job index (stale ones included).
    leases: Vec<Vec<Lease>>,
    last_event_id: Option<u64>,
    terminal: HashMap<JobId, JobState>,
    /// Each job's state after the previous step.
    states: HashMap<JobId, JobState>,
    ghost: JobId,
    coverage: &'a RefCell<Coverage>,
}

impl ModelRun<'_> {
    fn job(&self, sel: JobSel) -> Option<usize> {
        let all = self.model.jobs.len();
        if all == 0 {
            return None;
        }
        let running: Vec<usize> = (0..all)
            .filter(|&i| self.model.jobs[i].state == JobState::Running)
            .collect();
        Some(match sel {
            JobSel::Running(n) if !running.is_empty() => running[usize::from(n) % running.len()],
            JobSel::Running(n) | JobSel::Any(n) => usize::from(n) % all,
        })
    }

    fn lease(&self, job: Option<usize>, sel: LeaseSel) -> Lease {
        let Some(idx) = job else {
            return Lease {
                job: self.ghost,
                attempt: 1,
                owner: "ghost".into(),
            };
        };
        let all = &self.leases[idx];
        let picked = match sel {
            LeaseSel::Latest => all.last(),
            LeaseSel::Nth(n) => (!all.is_empty()).then(|| &all[usize::from(n) % all.len()]),
        };
        picked.cloned().unwrap_or_else(|| Lease {
            job: self.model.jobs[idx].id,
            attempt: 0,
            owner: "never-claimed".into(),
        })
    }

    /// Notes (for the coverage check) a fenced call with a stale lease on a job that runs
    /// under a newer claim: the fencing case that matters most.
    fn note_stale(&self, job: Option<usize>, lease: &Lease) {
        if let Some(j) = job.map(|i| &self.model.jobs[i])
            && j.state == JobState::Running
            && lease.attempt > 0
            && lease.attempt < j.claims
        {
            self.coverage
                .borrow_mut()
                .hit("stale_lease_of_reclaimed_job");
        }
    }

    fn job_id(&self, job: Option<usize>) -> JobId {
        job.map_or(self.ghost, |i| self.model.jobs[i].id)
    }

    /// Applies `op` to the store and the model, then checks everything.
    async fn step(&mut self, step: usize, op: &Op) -> Result<(), String> {
        let s = self.store;
        let now = self.model.now;
        let written = |r: Result<Vec<Event>, StoreError>| match r {
            Ok(evs) => (Ok(Answer::Written), evs),
            Err(e) => (Err(e), Vec::new()),
        };
        let (actual, expected): ((Result<Answer, StoreError>, Vec<Event>), Expect) = match op {
            Op::Enqueue {
                priority,
                max_attempts,
                key,
                deadline_ms,
            } => {
                let key = key.map(|k| format!("key-{k}"));
                let mut spec = spec().priority(*priority).max_attempts(*max_attempts);
                spec.idempotency_key = key.clone();
                spec.deadline_ms = *deadline_ms;
                let new = NewJob::new(spec);
                let id = new.id;
                let actual = match s.enqueue(new, now).await {
                    Ok(e) => (
                        Ok(Answer::Enqueued {
                            id: e.id,
                            created: e.created,
                        }),
                        e.events,
                    ),
                    Err(e) => (Err(e), Vec::new()),
                };
                let expected = self
                    .model
                    .enqueue(id, *priority, *max_attempts, key, *deadline_ms);
                if matches!(expected.0, Ok(Answer::Enqueued { created: true, .. })) {
                    self.leases.push(Vec::new());
                }
                (actual, expected)
            }
            Op::Claim { owner } => {
                let owner = format!("engine-{owner}");
                let actual = match s.claim(&owner, MODEL_TTL, now).await {
                    Ok(c) => {
                        let seen = c
                            .as_ref()
                            .map(|c| (c.lease.job, c.lease.attempt, c.lease.owner.clone()));
                        if let Some(c) = c
                            && let Some(i) =
                                self.model.jobs.iter().position(|j| j.id == c.lease.job)
                        {
                            self.leases[i].push(c.lease);
                        }
                        (Ok(Answer::Claimed(seen)), Vec::new())
                    }
                    Err(e) => (Err(e), Vec::new()),
                };
                let (expected, _) = self.model.claim(&owner);
                (actual, expected)
            }
            Op::Heartbeat { job, lease } => {
                let job = self.job(*job);
                let lease = self.lease(job, *lease);
                self.note_stale(job, &lease);
                let actual = match s.heartbeat(&lease, MODEL_TTL, now).await {
                    Ok(a) => (
                        Ok(Answer::Heartbeat {
                            cancel_requested: a.cancel_requested,
                            expires_at: a.expires_at,
                        }),
                        Vec::new(),
                    ),
                    Err(e) => (Err(e), Vec::new()),
                };
                (actual, self.model.heartbeat(job, &lease))
            }
            Op::StartAttempt {
                job,
                lease,
                reattach,
                phase_ms,
            } => {
                let job = self.job(*job);
                let lease = self.lease(job, *lease);
                self.note_stale(job, &lease);
                let remote = reattach.then(|| RemoteRef::new(format!("remote-{step}")));
                let start = AttemptStart {
                    backend: gpu(1),
                    remote: remote.clone(),
                    reattached: *reattach,
                    skipped: Vec::new(),
                    phase: phase_ms.map(|ms| PhaseDeadline {
                        phase: TimeoutPhase::Start,
                        deadline: Some(now.add(Duration::from_millis(ms))),
                    }),
                    capacity: None,
                };
                let actual = written(s.start_attempt(&lease, start, now).await);
                (
                    actual,
                    self.model.start_attempt(job, &lease, remote, *phase_ms),
                )
            }
            Op::Progress {
                job,
                lease,
                phase_ms,
            } => {
                let job = self.job(*job);
                let lease = self.lease(job, *lease);
                self.note_stale(job, &lease);
                let remote = RemoteRef::new(format!("remote-{step}"));
                let progress = Progress {
                    percent: 50.0,
                    ..Progress::default()
                };
                let update = AttemptUpdate {
                    remote: Some(remote.clone()),
                    started_at: Some(now),
                    phase: phase_ms.map(|ms| PhaseDeadline {
                        phase: TimeoutPhase::NodeSilence,
                        deadline: Some(now.add(Duration::from_millis(ms))),
                    }),
                    progress: Some(progress.clone()),
                    events: vec![EventKind::Progress {
                        attempt: lease.attempt,
                        progress,
                    }],
                };
                let actual = written(s.update_attempt(&lease, update, now).await);
                (actual, self.model.progress(job, &lease, remote, *phase_ms))
            }
            Op::Complete { job, lease } => {
                let job = self.job(*job);
                let lease = self.lease(job, *lease);
                self.note_stale(job, &lease);
                let completion = Completion {
                    artifacts: vec![artifact(&gpu(1), "out.png")],
                    ..Completion::default()
                };
                let actual = written(s.complete(&lease, completion, now).await);
                (actual, self.model.complete(job, &lease))
            }
            Op::Fail {
                job,
                lease,
                retry,
                delay_ms,
            } => {
                let job = self.job(*job);
                let lease = self.lease(job, *lease);
                self.note_stale(job, &lease);
                let retry_at = retry.then(|| now.add(Duration::from_millis(*delay_ms)));
                let actual = written(s.fail(&lease, failure("boom", retry_at), now).await);
                (actual, self.model.fail(job, &lease, retry_at))
            }
            Op::Release {
                job,
                lease,
                delay_ms,
            } => {
                let job = self.job(*job);
                let lease = self.lease(job, *lease);
                self.note_stale(job, &lease);
                let run_at = now.add(Duration::from_millis(*delay_ms));
                let actual = written(s.release(&lease, run_at, "busy", now).await);
                (actual, self.model.release(job, &lease, run_at))
            }
            Op::Cancel { job } | Op::ForceCancel { job } => {
                let force = matches!(op, Op::ForceCancel { .. });
                let job = self.job(*job);
                let id = self.job_id(job);
                let r = if force {
                    s.force_cancel(id, "user", now).await
                } else {
                    s.cancel(id, "user", now).await
                };
                let actual = match r {
                    Ok(c) => (Ok(Answer::Cancel(c.outcome)), c.events),
                    Err(e) => (Err(e), Vec::new()),
                };
                (actual, self.model.cancel(job, force))
            }
            Op::AckCancel { job, lease } => {
                let job = self.job(*job);
                let lease = self.lease(job, *lease);
                self.note_stale(job, &lease);
                let steps = vec![CancelStep {
                    at: now,
                    action: "remote_cancel".into(),
                    result: "interrupted".into(),
                }];
                let actual = written(s.ack_cancel(&lease, steps, now).await);
                (actual, self.model.ack_cancel(job, &lease))
            }
            Op::Detach { job, lease } => {
                let job = self.job(*job);
                let lease = self.lease(job, *lease);
                self.note_stale(job, &lease);
                let actual = written(s.detach(&lease, now).await);
                (actual, self.model.detach(job, &lease))
            }
            Op::Reap {
                dry_run,
                stuck_after_ms,
                max_crash_requeues,
            } => {
                let stuck_after = stuck_after_ms.map(Duration::from_millis);
                let opts = reap_opts(*dry_run, stuck_after, *max_crash_requeues);
                let actual = match s.reap(&opts, now).await {
                    Ok(r) => {
                        let items = r
                            .items
                            .iter()
                            .map(|i| SeenItem {
                                job: i.job,
                                state: i.state,
                                attempt: i.attempt,
                                owner: i.owner.clone(),
                                reason: i.reason,
                                action: i.action,
                            })
                            .collect();
                        (
                            Ok(Answer::Reaped {
                                dry_run: r.dry_run,
                                items,
                            }),
                            r.events,
                        )
                    }
                    Err(e) => (Err(e), Vec::new()),
                };
                (
                    actual,
                    self.model.reap(*dry_run, stuck_after, *max_crash_requeues),
                )
            }
            Op::Advance { ms, keep_alive } => {
                self.model.now = now.add(Duration::from_millis(*ms));
                if *keep_alive {
                    self.keep_alive().await?;
                }
                (
                    (Ok(Answer::Advanced), Vec::new()),
                    (Ok(Answer::Advanced), vec![]),
                )
            }
        };
        let (actual_result, actual_events) = actual;
        let (expected_result, expected_names) = expected;
        self.tally(op, &expected_result, &expected_names);
        let actual_kind = actual_result.as_ref().map_err(ErrKind::from).cloned();
        if actual_kind != expected_result {
            return Err(format!(
                "answer differs: store {actual_result:?}, model {expected_result:?}"
            ));
        }
        let got_names = names(&actual_events);
        if got_names != expected_names {
            return Err(format!(
                "events returned differ: store {got_names:?}, model {expected_names:?}"
            ));
        }
        self.check(&actual_events, matches!(op, Op::Claim { .. }))
            .await
    }

    /// Heartbeats every running job with its latest lease, comparing each answer.
    async fn keep_alive(&mut self) -> Result<(), String> {
        let now = self.model.now;
        let running: Vec<usize> = (0..self.model.jobs.len())
            .filter(|&i| self.model.jobs[i].state == JobState::Running)
            .collect();
        for idx in running {
            let lease = self.lease(Some(idx), LeaseSel::Latest);
            let actual = match self.store.heartbeat(&lease, MODEL_TTL, now).await {
                Ok(a) => Ok(Answer::Heartbeat {
                    cancel_requested: a.cancel_requested,
                    expires_at: a.expires_at,
                }),
                Err(e) => Err(ErrKind::from(&e)),
            };
            let (expected, _) = self.model.heartbeat(Some(idx), &lease);
            if actual != expected {
                return Err(format!(
                    "keep-alive heartbeat of {lease:?}: store {actual:?}, model {expected:?}"
                ));
            }
        }
        Ok(())
    }

    fn tally(&self, op: &Op, result: &Result<Answer, ErrKind>, names: &[&'static str]) {
        let mut c = self.coverage.borrow_mut();
        let tag = match (op, result) {
            (Op::Claim { .. }, Ok(Answer::Claimed(Some(_)))) => "claim",
            (Op::Heartbeat { .. }, Ok(_)) => "heartbeat",
            (Op::StartAttempt { reattach: true, .. }, Ok(_)) => "reattach",
            (Op::StartAttempt { .. }, Ok(_)) => "start_attempt",
            (Op::StartAttempt { .. }, Err(ErrKind::InvalidTransition)) => "second_start",
            (Op::Progress { .. }, Ok(_)) => "progress",
            (Op::Complete { .. }, Ok(_)) => "complete",
            (Op::Fail { .. }, Ok(_)) => "fail",
            (Op::Release { .. }, Ok(_)) => "release",
            (Op::Cancel { .. }, Ok(Answer::Cancel(CancelOutcome::Cancelled))) => "cancel",
            (Op::ForceCancel { .. }, Ok(Answer::Cancel(CancelOutcome::CancelRequested))) => {
                "force_cancel_running"
            }
            (Op::AckCancel { .. }, Ok(_)) => "ack_cancel",
            (Op::Detach { .. }, Ok(_)) => "detach",
            (_, Err(ErrKind::LeaseLost)) => "lease_lost",
            _ => "",
        };
        if !tag.is_empty() {
            c.hit(tag);
        }
        if let Ok(Answer::Reaped { items, .. }) = result {
            for i in items {
                c.hit(match (i.reason, i.action) {
                    (ReapReason::LeaseExpired, ReapAction::Requeue) => "reap_lease_requeue",
                    (ReapReason::LeaseExpired, ReapAction::Fail) => "reap_lease_fail",
                    (ReapReason::LeaseExpired, ReapAction::Cancel) => "reap_lease_cancel",
                    (ReapReason::NoProgress, _) => "reap_no_progress",
                    (ReapReason::PhaseDeadline, _) => "reap_phase_deadline",
                    (ReapReason::JobDeadline, _) => "reap_job_deadline",
                });
            }
        }
        if matches!(op, Op::Fail { .. }) && result.is_ok() {
            if names.is_empty() || names == ["attempt_failed"] {
                c.hit("fail_to_retry_wait");
            } else if names.last() == Some(&"failed") {
                c.hit("fail_to_failed");
            } else if names.last() == Some(&"cancelled") {
                c.hit("fail_to_cancelled");
            }
        }
    }

    /// Compares every job with the model and checks the invariants.
    /// `claimed`: the step was a claim, the one state change that appends no event.
    async fn check(&mut self, returned: &[Event], claimed: bool) -> Result<(), String> {
        let s = self.store;
        // The events returned are exactly the events appended.
        let appended = events_after(s, None, self.last_event_id).await;
        if appended != returned {
            return Err(format!(
                "the events appended differ from those returned:\n  appended {appended:?}\n  returned {returned:?}"
            ));
        }
        if let Some(last) = appended.last() {
            self.last_event_id = Some(last.id);
        }
        let all = all_events(s).await;
        if let Some(w) = all.windows(2).find(|w| w[0].id >= w[1].id) {
            return Err(format!(
                "global event ids not increasing: {} then {}",
                w[0].id, w[1].id
            ));
        }
        let mut seqs: HashMap<JobId, Vec<u32>> = HashMap::new();
        for e in &all {
            seqs.entry(e.job).or_default().push(e.seq);
        }
        let mut counts: BTreeMap<JobState, u64> = BTreeMap::new();
        for m in &self.model.jobs {
            *counts.entry(m.state).or_insert(0) += 1;
            let r = s
                .get(m.id)
                .await
                .map_err(|e| format!("get {}: {e}", m.id))?
                .ok_or_else(|| format!("job {} is missing", m.id))?;
            compare_job(m, &r, self.model.now)?;
            let got = seqs.remove(&m.id).unwrap_or_default();
            let want: Vec<u32> = (1..=r.last_seq).collect();
            if got != want {
                return Err(format!(
                    "job {}: event seqs {got:?}, expected 1..={} contiguous",
                    m.id, r.last_seq
                ));
            }
            if let Some(prev) = self.terminal.get(&m.id)
                && *prev != r.state
            {
                return Err(format!(
                    "job {}: terminal state {prev} changed to {}",
                    m.id, r.state
                ));
            }
            if r.state.is_terminal() {
                self.terminal.insert(m.id, r.state);
            }
            let before = self.states.insert(m.id, r.state);
            if !claimed
                && before.is_some_and(|b| b != r.state)
                && !appended.iter().any(|e| e.job == m.id)
            {
                return Err(format!(
                    "job {} went from {before:?} to {} without an event",
                    m.id, r.state
                ));
            }
        }
        if let Some((job, _)) = seqs.into_iter().next() {
            return Err(format!("events of an unknown job {job}"));
        }
        let store_counts = s.counts().await.map_err(|e| format!("counts: {e}"))?;
        for st in JobState::ALL {
            let want = counts.get(&st).copied().unwrap_or(0);
            if store_counts.get(st) != want {
                return Err(format!(
                    "counts: {st} is {}, model {want}",
                    store_counts.get(st)
                ));
            }
        }
        Ok(())
    }
}

/// Compares one stored job with the model's.
fn compare_job(m: &MJob, r: &JobRecord, now: Timestamp) -> Result<(), String> {
    let id = m.id;
    let fail = |what: &str, store: &dyn fmt::Debug, model: &dyn fmt::Debug| {
        Err(format!(
            "job {id} at {now}: {what}: store {store:?}, model {model:?}"
        ))
    };
    if r.state != m.state {
        return fail("state", &r.state, &m.state);
    }
    if r.claims != m.claims {
        return fail("claims", &r.claims, &m.claims);
    }
    if r.crash_requeues != m.crash_requeues {
        return fail("crash_requeues", &r.crash_requeues, &m.crash_requeues);
    }
    if r.cancel_requested_at.is_some() != m.cancel_requested {
        return fail(
            "cancel requested",
            &r.cancel_requested_at,
            &m.cancel_requested,
        );
    }
    if r.deadline != m.deadline {
        return fail("deadline", &r.deadline, &m.deadline);
    }
    if r.spec.priority != m.priority || r.spec.max_attempts != m.max_attempts {
        return fail(
            "priority / max_attempts",
            &(r.spec.priority, r.spec.max_attempts),
            &(m.priority, m.max_attempts),
        );
    }
    if r.created_at != m.created_at {
        return fail("created_at", &r.created_at, &m.created_at);
    }
    if matches!(m.state, JobState::Pending | JobState::RetryWait) && r.run_at != m.run_at {
        return fail("run_at", &r.run_at, &m.run_at);
    }
    let lease = r.lease.as_ref().map(|l| (l.owner.clone(), l.expires_at));
    let want_lease = if m.state == JobState::Running {
        m.lease.clone()
    } else {
        None
    };
    if lease != want_lease {
        return fail("lease", &lease, &want_lease);
    }
    let got: Vec<_> = r
        .attempts
        .iter()
        .map(|a| (a.number, a.outcome, a.reattached, a.remote.clone()))
        .collect();
    let want: Vec<_> = m
        .attempts
        .iter()
        .map(|a| (a.number, a.outcome, a.reattached, a.remote.clone()))
        .collect();
    if got != want {
        return fail(
            "attempts (number, outcome, reattached, remote)",
            &got,
            &want,
        );
    }
    let open = r.attempts.iter().filter(|a| a.outcome.is_none()).count();
    if open > 1 || (open == 1 && r.state != JobState::Running) {
        return fail("open attempts", &open, &"at most one, only while running");
    }
    if r.state == JobState::Running && m.open().is_some() {
        let phase = r.phase.and_then(|p| p.deadline);
        if phase != m.phase_deadline {
            return fail("phase deadline", &phase, &m.phase_deadline);
        }
        if r.progress_at != m.progress_at {
            return fail("progress_at", &r.progress_at, &m.progress_at);
        }
    }
    if m.state.is_terminal() && r.finished_at.is_none() {
        return fail("finished_at", &r.finished_at, &"set for a terminal job");
    }
    Ok(())
}

async fn run_sequence(
    factory: &dyn StoreFactory,
    ops: &[Op],
    coverage: &RefCell<Coverage>,
) -> Result<(), String> {
    let store = factory.create().await;
    let mut run = ModelRun {
        store: store.as_ref(),
        model: Model::new(at(0)),
        leases: Vec::new(),
        last_event_id: None,
        terminal: HashMap::new(),
        states: HashMap::new(),
        ghost: JobId::new(),
        coverage,
    };
    run.check(&[], false)
        .await
        .map_err(|e| format!("the new store is not empty: {e}"))?;
    if !all_events(store.as_ref()).await.is_empty() {
        return Err("the new store already has events".into());
    }
    for (i, op) in ops.iter().enumerate() {
        run.step(i, op)
            .await
            .map_err(|e| format!("step {i} ({op:?}): {e}"))?;
    }
    Ok(())
}

/// Outcomes a large enough run must reach, or the generator is not exercising the store.
const MUST_COVER: &[&str] = &[
    "claim",
    "heartbeat",
    "start_attempt",
    "reattach",
    "second_start",
    "progress",
    "complete",
    "fail_to_retry_wait",
    "fail_to_failed",
    "fail_to_cancelled",
    "release",
    "cancel",
    "force_cancel_running",
    "ack_cancel",
    "detach",
    "lease_lost",
    "stale_lease_of_reclaimed_job",
    "reap_lease_requeue",
    "reap_lease_fail",
    "reap_lease_cancel",
    "reap_no_progress",
    "reap_phase_deadline",
    "reap_job_deadline",
];

/// Deletes single steps from a failing sequence while it still fails, until none can go.
fn minimize(
    mut ops: Vec<Op>,
    mut reason: String,
    fails: impl Fn(&[Op]) -> Option<String>,
) -> (Vec<Op>, String) {
    loop {
        let mut changed = false;
        let mut i = 0;
        while i < ops.len() && ops.len() > 1 {
            let mut shorter = ops.clone();
            shorter.remove(i);
            if let Some(why) = fails(&shorter) {
                ops = shorter;
                reason = why;
                changed = true;
            } else {
                i += 1;
            }
        }
        if !changed {
            return (ops, reason);
        }
    }
}

/// The model-based property test: `cases` random operation sequences (up to 3 enqueues, then 1
/// to 60 random operations), each on a fresh store from `factory`, compared step by step with a
/// reference model written from the contract.
///
/// After every operation it compares the answer (which `Ok`, which [`StoreError`] variant, which
/// [`CancelOutcome`], the reap report's items) and the names of the events returned, checks that
/// those are exactly the events appended, and compares every job (state, claims, attempts and
/// their outcomes, crash requeues, cancel request, `run_at` of waiting jobs, lease) and the counts
/// per state; it also checks the invariants (per-job event seqs contiguous from 1, global event
/// ids increasing, terminal states final, at most one open attempt, no state change without an
/// event except a claim's). A failure is shrunk to a short sequence and reported with it.
///
/// Synchronous: it builds its own tokio current-thread runtime, so call it from a plain `#[test]`.
/// With `cases >= 200` it also checks that the random sequences reached every interesting
/// outcome (reap reasons, fail to retry / failed / cancelled, stale leases, …).
pub fn store_model_test(factory: Arc<dyn StoreFactory>, cases: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("store_model_test: cannot build a tokio runtime: {e}"));
    let mut config = Config::with_cases(cases);
    config.failure_persistence = None;
    let mut runner = TestRunner::new(config);
    let coverage = RefCell::new(Coverage::default());
    let strategy = sequence_strategy();
    let result = runner.run(&strategy, |ops| {
        rt.block_on(run_sequence(factory.as_ref(), &ops, &coverage))
            .map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => {
            // proptest deletes steps in one pass only; steps depend on earlier ones, so delete
            // again until no single step can go.
            let scratch = RefCell::new(Coverage::default());
            let fails = |ops: &[Op]| {
                let run =
                    AssertUnwindSafe(|| rt.block_on(run_sequence(factory.as_ref(), ops, &scratch)));
                match std::panic::catch_unwind(run) {
                    Ok(r) => r.err(),
                    Err(p) => Some(format!("panicked: {}", panic_message(p.as_ref()))),
                }
            };
            let (ops, reason) = minimize(ops, reason.to_string(), fails);
            let mut listing = String::new();
            for (i, op) in ops.iter().enumerate() {
                listing.push_str(&format!("\n  {i:>2}: {op:?}"));
            }
            panic!(
                "TaskStore model test failed: {reason}\nminimal failing sequence ({} ops, times start at {}; lease ttl {:?}):{listing}",
                ops.len(),
                at(0),
                MODEL_TTL
            );
        }
        Err(TestError::Abort(reason)) => panic!("TaskStore model test aborted: {reason}"),
    }
    if cases >= 200 {
        let c = coverage.borrow();
        let missing: BTreeSet<&str> = MUST_COVER
            .iter()
            .copied()
            .filter(|k| !c.counts.contains_key(k))
            .collect();
        assert!(
            missing.is_empty(),
            "TaskStore model test: {cases} random sequences never reached {missing:?} (reached: {:?})",
            c.counts
        );
    }
}

fn with_capacity(backend: BackendId, capacity: u32) -> AttemptStart {
    AttemptStart {
        capacity: Some(capacity),
        ..start_on(backend)
    }
}

fn load_of(load: &BTreeMap<BackendId, u32>) -> Vec<(String, u32)> {
    load.iter().map(|(b, n)| (b.to_string(), *n)).collect()
}

async fn start_attempt_with_capacity_counts_every_open_attempt(s: &dyn TaskStore) {
    let a = add(s, spec(), at(0)).await;
    let b = add(s, spec(), at(1)).await;
    let c = add(s, spec(), at(2)).await;
    let la = claim_exact(s, "engine-a", at(10), a).await;
    let lb = claim_exact(s, "engine-b", at(10), b).await;
    let lc = claim_exact(s, "engine-c", at(10), c).await;
    assert!(
        s.backend_load().await.expect("backend_load").is_empty(),
        "no attempt yet, no load"
    );
    s.start_attempt(&la, with_capacity(gpu(1), 1), at(20))
        .await
        .expect("the first attempt fits a capacity of 1");

    // Another owner's job on the same backend: full, and nothing changes.
    let before = must_get(s, b).await;
    match s.start_attempt(&lb, with_capacity(gpu(1), 1), at(21)).await {
        Err(StoreError::BackendFull { backend, capacity }) => {
            assert_eq!(
                (backend, capacity),
                (gpu(1), 1),
                "BackendFull names the backend"
            )
        }
        other => panic!("expected BackendFull for a full backend, got {other:?}"),
    }
    let after = must_get(s, b).await;
    assert_eq!(
        (after.state, after.attempts.len(), after.last_seq),
        (before.state, 0, before.last_seq),
        "a refused attempt records nothing and appends no event"
    );
    assert_eq!(
        after.lease, before.lease,
        "a refused attempt keeps the claim (the caller releases it)"
    );

    s.start_attempt(&lb, with_capacity(gpu(1), 2), at(22))
        .await
        .expect("a capacity of 2 takes a second attempt");
    s.start_attempt(&lc, with_capacity(gpu(2), 1), at(23))
        .await
        .expect("another backend has its own count");
    assert_eq!(
        load_of(&s.backend_load().await.expect("backend_load")),
        vec![("gpu-1".to_owned(), 2), ("gpu-2".to_owned(), 1)],
        "open attempts per backend"
    );

    // Every way an attempt ends frees its place.
    s.complete(&la, Completion::default(), at(30))
        .await
        .expect("complete");
    assert_eq!(
        load_of(&s.backend_load().await.expect("backend_load")),
        vec![("gpu-1".to_owned(), 1), ("gpu-2".to_owned(), 1)],
        "a completed attempt is no longer open"
    );
    s.fail(&lb, failure("boom", Some(at(1_000))), at(31))
        .await
        .expect("fail");
    let reaped = s
        .reap(&reap_opts(false, None, 3), at(10).add(TTL).add(secs(1)))
        .await
        .expect("reap");
    assert_eq!(reaped.items.len(), 1, "c's lease expired: {reaped:?}");
    assert!(
        s.backend_load().await.expect("backend_load").is_empty(),
        "failed and reaped attempts are no longer open"
    );

    // Fencing comes first: a stale lease is LeaseLost even when the backend is free.
    match s.start_attempt(&lb, with_capacity(gpu(1), 1), at(40)).await {
        Err(StoreError::LeaseLost { .. }) => {}
        other => panic!("expected LeaseLost for a stale lease, got {other:?}"),
    }
    let lb2 = claim_exact(s, "engine-b", at(2_000), b).await;
    s.start_attempt(&lb2, with_capacity(gpu(1), 1), at(2_001))
        .await
        .expect("the freed backend takes the retry");
}

fn restriction(backend: u8, kind: RestrictionKind, until: i64, reason: &str) -> Restriction {
    Restriction {
        backend: gpu(backend),
        kind,
        structure: (kind == RestrictionKind::Blocked).then(|| WorkflowHash::from_hex("ab12")),
        until: at(until),
        reason: reason.into(),
    }
}

async fn share_restrictions_merges_and_forgets_lifted_ones(s: &dyn TaskStore) {
    use RestrictionKind::{Blocked, CircuitOpen};
    let none = s.share_restrictions(&[], at(0)).await.expect("share");
    assert!(none.is_empty(), "a new store shares nothing: {none:?}");
    // Orchestrator A blocks gpu-2 for a structure and opens gpu-1's circuit.
    let a = [
        restriction(2, Blocked, 60_000, "timed out"),
        restriction(1, CircuitOpen, 30_000, "5xx"),
    ];
    let seen = s.share_restrictions(&a, at(0)).await.expect("share");
    assert_eq!(
        seen,
        vec![a[1].clone(), a[0].clone()],
        "every restriction in (backend, kind, structure) order"
    );
    // Orchestrator B shares nothing new and sees A's.
    assert_eq!(s.share_restrictions(&[], at(1)).await.expect("share"), seen);
    // An earlier `until` for the same key does not shorten it; a later one extends it.
    let shorter = restriction(2, Blocked, 10_000, "again");
    let longer = restriction(1, CircuitOpen, 45_000, "still 5xx");
    let seen = s
        .share_restrictions(&[shorter, longer.clone()], at(2))
        .await
        .expect("share");
    assert_eq!(seen, vec![longer.clone(), a[0].clone()], "later until wins");
    // The same backend blocked for another structure is its own restriction.
    let other = Restriction {
        structure: Some(WorkflowHash::from_hex("cd34")),
        ..restriction(2, Blocked, 50_000, "other")
    };
    let seen = s
        .share_restrictions(std::slice::from_ref(&other), at(3))
        .await
        .expect("share");
    assert_eq!(seen, vec![longer.clone(), a[0].clone(), other.clone()]);
    // Lifted ones are forgotten: exactly at `until` a restriction no longer holds.
    let seen = s.share_restrictions(&[], at(45_000)).await.expect("share");
    assert_eq!(
        seen,
        vec![a[0].clone(), other],
        "the circuit lifted at 45 s"
    );
    let seen = s.share_restrictions(&[], at(60_000)).await.expect("share");
    assert!(seen.is_empty(), "everything lifted: {seen:?}");
}
