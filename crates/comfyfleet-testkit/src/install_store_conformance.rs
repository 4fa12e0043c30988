//! The public [`InstallStore`] conformance suite: every store that keeps installs (the in-memory
//! one, SQLite, yours) must pass it. It uses nothing but the [`InstallStore`] trait, and checks
//! each sentence of the contract written on that trait: creation and its `created` event, one
//! active install per instance (also under concurrent creates), versioned updates, immutable
//! finished records, event sequence numbers and paging, listing, recorded packs, unknown ids.
//!
//! Two entry points:
//!
//! * [`install_store_conformance`] — the named cases, each on a fresh store from an
//!   [`InstallStoreFactory`]; a failure names the case.
//! * [`install_prune_conformance`] — for a store that is also a [`TaskStore`]: `prune` deletes
//!   finished installs older than the cutoff with their events, and nothing else.
//!
//! Records carry their own times, so nothing sleeps and nothing reads the wall clock.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use async_trait::async_trait;
//! use comfyfleet_core::{InstallStore, MemoryStore};
//! use comfyfleet_testkit::{InstallStoreFactory, install_store_conformance};
//!
//! struct Factory;
//!
//! #[async_trait]
//! impl InstallStoreFactory for Factory {
//!     async fn create(&self) -> Arc<dyn InstallStore> {
//!         Arc::new(MemoryStore::new())
//!     }
//! }
//!
//! // In a `#[tokio::test]` (the concurrency case spawns tasks):
//! # async fn conformance() {
//! install_store_conformance(&Factory).await;
//! # }
//! ```

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use comfyfleet_core::{
    InstallEvent, InstallEventKind, InstallFilter, InstallId, InstallPhase, InstallRecord,
    InstallSpec, InstallState, InstallStore, InstalledPack, NodeProgress, NodeSpec, NodeStatus,
    RequirementsStatus, StoreError, TaskStore, Timestamp,
};

use crate::store_conformance::run_case;

/// Makes a fresh, empty install store for each conformance case.
#[async_trait]
pub trait InstallStoreFactory: Send + Sync {
    /// A new empty store: no installs, no events, no recorded packs.
    async fn create(&self) -> Arc<dyn InstallStore>;
}

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// All times are offsets from this instant (2023-11-14), in milliseconds.
const BASE_MS: i64 = 1_700_000_000_000;

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(BASE_MS + ms)
}

/// `n` fresh ids in creation order (ascending), whatever the clock did.
fn ids(n: usize) -> Vec<InstallId> {
    let mut v: Vec<InstallId> = (0..n).map(|_| InstallId::new()).collect();
    v.sort();
    v
}

fn pack(name: &str) -> NodeProgress {
    NodeProgress {
        name: name.into(),
        git: format!("https://github.com/example/{name}.git"),
        rev: None,
        status: NodeStatus::Pending,
        requirements: RequirementsStatus::Unknown,
        commit: None,
        already_present: false,
        expected_classes: Vec::new(),
        classes: Vec::new(),
        error: None,
    }
}

/// A queued install of one pack on `instance`, created at `created`.
fn record_with(id: InstallId, instance: &str, created: Timestamp) -> InstallRecord {
    let node = NodeSpec {
        name: Some("ComfyUI-Example".into()),
        git: Some("https://github.com/example/ComfyUI-Example.git".into()),
        rev: Some("v1.2.0".into()),
        classes: vec!["ExampleNode".into()],
    };
    InstallRecord::new(
        id,
        InstallSpec::new(instance, vec![node]),
        vec![pack("ComfyUI-Example")],
        created,
    )
}

fn record(instance: &str, created: Timestamp) -> InstallRecord {
    record_with(InstallId::new(), instance, created)
}

async fn create(s: &dyn InstallStore, r: &InstallRecord) -> InstallEvent {
    s.create_install(r).await.unwrap_or_else(|e| {
        panic!(
            "create_install of {} on {} failed: {e}",
            r.id, r.spec.instance
        )
    })
}

async fn must_get(s: &dyn InstallStore, id: InstallId) -> InstallRecord {
    s.get_install(id)
        .await
        .unwrap_or_else(|e| panic!("get_install {id} failed: {e}"))
        .unwrap_or_else(|| panic!("get_install {id}: the install is missing"))
}

/// Writes `r` over its current version with `events`; returns the record as now stored (its
/// version advanced) and the appended events.
async fn update(
    s: &dyn InstallStore,
    r: &InstallRecord,
    events: &[InstallEventKind],
) -> (InstallRecord, Vec<InstallEvent>) {
    let out = s.update_install(r, events).await.unwrap_or_else(|e| {
        panic!(
            "update_install of {} over version {} failed: {e}",
            r.id, r.version
        )
    });
    let mut next = r.clone();
    next.version += 1;
    (next, out)
}

/// `r` moved to `state` at `now` (finished ones get `finished_at`).
fn moved(r: &InstallRecord, state: InstallState, now: Timestamp) -> InstallRecord {
    let mut r = r.clone();
    r.state = state;
    r.updated_at = now;
    if state.is_terminal() {
        r.phase = InstallPhase::Done;
        r.finished_at = Some(now);
    }
    r
}

async fn all_events(s: &dyn InstallStore, id: InstallId) -> Vec<InstallEvent> {
    s.install_events(id, 0, 100_000)
        .await
        .unwrap_or_else(|e| panic!("install_events of {id} failed: {e}"))
}

async fn list(s: &dyn InstallStore, filter: InstallFilter) -> Vec<InstallId> {
    s.list_installs(&filter)
        .await
        .unwrap_or_else(|e| panic!("list_installs({filter:?}) failed: {e}"))
        .into_iter()
        .map(|r| r.id)
        .collect()
}

fn filter(limit: usize) -> InstallFilter {
    InstallFilter {
        limit,
        ..InstallFilter::default()
    }
}

fn conflict_message<T: fmt::Debug>(r: Result<T, StoreError>, what: &str) -> String {
    match r {
        Err(StoreError::Conflict(msg)) => msg,
        other => panic!("{what}: expected StoreError::Conflict, got {other:?}"),
    }
}

fn assert_invalid_input<T: fmt::Debug>(r: Result<T, StoreError>, what: &str) -> String {
    match r {
        Err(StoreError::InvalidInput(msg)) => msg,
        other => panic!("{what}: expected StoreError::InvalidInput, got {other:?}"),
    }
}

fn assert_not_found<T: fmt::Debug>(r: Result<T, StoreError>, id: InstallId, what: &str) {
    match r {
        Err(StoreError::InstallNotFound(got)) => {
            assert_eq!(got, id, "{what}: InstallNotFound names the wrong install");
        }
        other => panic!("{what}: expected StoreError::InstallNotFound, got {other:?}"),
    }
}

fn output(line: &str) -> InstallEventKind {
    InstallEventKind::Output {
        node: Some(0),
        line: line.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The named cases
// ---------------------------------------------------------------------------------------------

/// Runs every install conformance case, each on a fresh store from `factory`.
///
/// All cases run even if some fail; then this panics with a message naming every failed case and
/// what it found. Call it from an async test (`#[tokio::test]`; a multi-threaded runtime makes
/// the concurrency case a real race).
pub async fn install_store_conformance(factory: &dyn InstallStoreFactory) {
    let mut failed: Vec<(&'static str, String)> = Vec::new();
    let mut total = 0usize;
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            total += 1;
            let store = factory.create().await;
            if let Err(msg) = run_case($case(store)).await {
                failed.push((stringify!($case), msg));
            }
        )*};
    }
    cases!(
        create_then_get_round_trips_with_created_event,
        create_keeps_any_state_and_version,
        create_refuses_duplicate_id,
        create_refuses_second_active_install_on_one_instance,
        concurrent_creates_on_one_instance_admit_exactly_one,
        update_bumps_version_and_appends_events,
        update_over_stale_version_conflicts_and_changes_nothing,
        finished_install_is_immutable,
        unknown_install_is_not_found,
        event_seqs_are_continuous_and_page,
        list_is_newest_first_with_filters,
        list_pages_with_before,
        list_limit_bounds,
        instance_packs_upsert_sorted_by_name,
    );
    if !failed.is_empty() {
        let mut msg = format!(
            "InstallStore conformance: {} of {total} cases failed:",
            failed.len()
        );
        for (case, why) in &failed {
            msg.push_str(&format!("\n  - {case}: {why}"));
        }
        panic!("{msg}");
    }
}

async fn create_then_get_round_trips_with_created_event(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    let mut r = record("gpu-1", at(0));
    r.updated_at = at(7);
    r.push_log("accepted");
    let ev = create(s, &r).await;
    assert_eq!(
        ev,
        InstallEvent {
            install: r.id,
            seq: 1,
            at: at(0),
            kind: InstallEventKind::Created,
        },
        "create_install returns the `created` event: seq 1, at record.created_at"
    );
    assert_eq!(
        must_get(s, r.id).await,
        r,
        "get_install returns the created record unchanged"
    );
    assert_eq!(
        all_events(s, r.id).await,
        vec![ev],
        "the `created` event is stored"
    );
    assert_eq!(
        s.get_install(InstallId::new()).await.expect("get_install"),
        None,
        "get_install of an unknown id is None"
    );
}

async fn create_keeps_any_state_and_version(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    // An install that could not run at all may be recorded already finished.
    let failed = moved(&record("gpu-1", at(0)), InstallState::Failed, at(0));
    create(s, &failed).await;
    assert_eq!(
        must_get(s, failed.id).await,
        failed,
        "a failed record round-trips"
    );
    // A finished install is not active: the instance takes a new one.
    let running = moved(&record("gpu-1", at(1)), InstallState::Running, at(1));
    create(s, &running).await;
    assert_eq!(
        must_get(s, running.id).await.state,
        InstallState::Running,
        "a record created running stays running"
    );
}

async fn create_refuses_duplicate_id(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    let r = record("gpu-1", at(0));
    create(s, &r).await;
    let r2 = moved(
        &record_with(r.id, "gpu-2", at(5)),
        InstallState::Failed,
        at(5),
    );
    conflict_message(s.create_install(&r2).await, "create with an existing id");
    assert_eq!(
        must_get(s, r.id).await,
        r,
        "the refused create changed the stored record"
    );
    assert_eq!(
        all_events(s, r.id).await.len(),
        1,
        "the refused create appended an event"
    );
}

async fn create_refuses_second_active_install_on_one_instance(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    let first = record("gpu-1", at(0));
    create(s, &first).await;
    for (what, second) in [
        ("a queued install", record("gpu-1", at(1))),
        (
            "a running install",
            moved(&record("gpu-1", at(1)), InstallState::Running, at(1)),
        ),
        (
            "a finished install",
            moved(&record("gpu-1", at(1)), InstallState::Failed, at(1)),
        ),
    ] {
        let msg = conflict_message(
            s.create_install(&second).await,
            &format!("create of {what} while the instance has a queued install"),
        );
        assert!(
            msg.contains(&first.id.to_string()),
            "the conflict must name the active install {}: {msg:?}",
            first.id
        );
        assert_eq!(
            s.get_install(second.id).await.expect("get_install"),
            None,
            "a refused create stored {what}"
        );
    }
    // Running counts as active too.
    let (first, _) = update(s, &moved(&first, InstallState::Running, at(2)), &[]).await;
    let msg = conflict_message(
        s.create_install(&record("gpu-1", at(3))).await,
        "create while the instance has a running install",
    );
    assert!(
        msg.contains(&first.id.to_string()),
        "names the active install: {msg:?}"
    );
    // Another instance is independent.
    let other = record("gpu-2", at(3));
    create(s, &other).await;
    // Once the first is finished, the instance takes a new install.
    update(s, &moved(&first, InstallState::Succeeded, at(4)), &[]).await;
    let next = record("gpu-1", at(5));
    create(s, &next).await;
    let msg = conflict_message(
        s.create_install(&record("gpu-1", at(6))).await,
        "create after a new install became active",
    );
    assert!(
        msg.contains(&next.id.to_string()),
        "names the new active install: {msg:?}"
    );
}

async fn concurrent_creates_on_one_instance_admit_exactly_one(s: Arc<dyn InstallStore>) {
    const TASKS: usize = 8;
    for round in 0..4i64 {
        let instance = format!("gpu-race-{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let (s, barrier) = (Arc::clone(&s), Arc::clone(&barrier));
            let r = record(&instance, at(round));
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                (r.id, s.create_install(&r).await)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            let (id, result) = t.await.expect("a create task panicked");
            match result {
                Ok(ev) => {
                    assert_eq!((ev.install, ev.seq), (id, 1), "the winner's created event");
                    winners.push(id);
                }
                Err(StoreError::Conflict(_)) => {}
                Err(e) => panic!("round {round}: a losing create must be Conflict, got {e:?}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {TASKS} concurrent creates on one instance admitted {winners:?}"
        );
        let stored = list(
            s.as_ref(),
            InstallFilter {
                instance: Some(instance.clone()),
                ..filter(1000)
            },
        )
        .await;
        assert_eq!(stored, winners, "round {round}: only the winner is stored");
    }
}

async fn update_bumps_version_and_appends_events(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    let r = record("gpu-1", at(0));
    let created = create(s, &r).await;
    let mut r1 = moved(&r, InstallState::Running, at(10));
    r1.phase = InstallPhase::Nodes;
    r1.current = Some(0);
    r1.nodes[0].status = NodeStatus::Fetching;
    r1.push_log("Cloning into 'ComfyUI-Example'...");
    let kinds = vec![
        InstallEventKind::Phase {
            phase: InstallPhase::Nodes,
        },
        InstallEventKind::Node {
            index: 0,
            node: r1.nodes[0].clone(),
        },
        output("Cloning into 'ComfyUI-Example'..."),
    ];
    let (r1, evs) = update(s, &r1, &kinds).await;
    let expect: Vec<InstallEvent> = kinds
        .iter()
        .zip(2..)
        .map(|(k, seq)| InstallEvent {
            install: r.id,
            seq,
            at: at(10),
            kind: k.clone(),
        })
        .collect();
    assert_eq!(
        evs, expect,
        "update_install returns its events with the next seqs, at = record.updated_at"
    );
    assert_eq!(r1.version, 1);
    assert_eq!(
        must_get(s, r.id).await,
        r1,
        "the stored record is the written one, with version + 1"
    );
    let mut stored = vec![created];
    stored.extend(expect);
    assert_eq!(all_events(s, r.id).await, stored, "the events are stored");
    // An update without events still moves the version; seqs continue after it.
    let mut r2 = r1.clone();
    r2.updated_at = at(20);
    r2.resumed = 1;
    let (r2, none) = update(s, &r2, &[]).await;
    assert!(none.is_empty(), "no events given, none appended: {none:?}");
    assert_eq!(must_get(s, r.id).await, r2, "version 2 stored");
    assert_eq!(r2.version, 2);
    let mut r3 = r2.clone();
    r3.updated_at = at(30);
    let (_, evs) = update(s, &r3, &[InstallEventKind::Resumed { count: 1 }]).await;
    assert_eq!(
        evs.iter().map(|e| (e.seq, e.at)).collect::<Vec<_>>(),
        vec![(5, at(30))],
        "seqs continue over an update without events"
    );
}

async fn update_over_stale_version_conflicts_and_changes_nothing(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    let r = record("gpu-1", at(0));
    create(s, &r).await;
    // Two writers read version 0; the first one wins.
    let a = moved(&r, InstallState::Running, at(10));
    let mut b = moved(&r, InstallState::Cancelled, at(11));
    b.error = Some("the other orchestrator".into());
    let (a, _) = update(s, &a, &[output("a")]).await;
    let before = (must_get(s, r.id).await, all_events(s, r.id).await);
    conflict_message(
        s.update_install(&b, &[output("b")]).await,
        "update over a version another writer replaced",
    );
    let mut ahead = a.clone();
    ahead.version = 7;
    conflict_message(
        s.update_install(&ahead, &[output("ahead")]).await,
        "update over a version the store never had",
    );
    assert_eq!(
        (must_get(s, r.id).await, all_events(s, r.id).await),
        before,
        "a refused update changed the record or appended events"
    );
    // The winner carries on with the version it got.
    update(s, &moved(&a, InstallState::Succeeded, at(20)), &[]).await;
}

async fn finished_install_is_immutable(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    for end in [
        InstallState::Succeeded,
        InstallState::Failed,
        InstallState::Cancelled,
    ] {
        let r = record(&format!("gpu-{end}"), at(0));
        create(s, &r).await;
        let done = moved(&r, end, at(10));
        let (done, _) = update(
            s,
            &done,
            &[InstallEventKind::Finished {
                state: end,
                error: None,
            }],
        )
        .await;
        let before = (must_get(s, r.id).await, all_events(s, r.id).await);
        assert_eq!(before.0, done, "the finished record is stored");
        let mut again = moved(&done, InstallState::Running, at(20));
        let msg = assert_invalid_input(
            s.update_install(&again, &[output("late")]).await,
            &format!("update of a {end} install (current version)"),
        );
        assert!(
            msg.contains("finished"),
            "the refusal says the install is finished: {msg:?}"
        );
        again.version = 0;
        assert_invalid_input(
            s.update_install(&again, &[]).await,
            &format!("update of a {end} install (stale version)"),
        );
        assert_eq!(
            (must_get(s, r.id).await, all_events(s, r.id).await),
            before,
            "a {end} install changed"
        );
    }
}

async fn unknown_install_is_not_found(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    create(s, &record("gpu-1", at(0))).await;
    let ghost = record("gpu-9", at(0));
    assert_not_found(
        s.update_install(&ghost, &[output("x")]).await,
        ghost.id,
        "update_install of an unknown id",
    );
    assert_not_found(
        s.install_events(ghost.id, 0, 10).await,
        ghost.id,
        "install_events of an unknown id",
    );
    assert_eq!(
        s.get_install(ghost.id).await.expect("get_install"),
        None,
        "the refused update created the install"
    );
}

async fn event_seqs_are_continuous_and_page(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    let r = record("gpu-1", at(0));
    create(s, &r).await;
    let mut cur = moved(&r, InstallState::Running, at(1));
    let mut expected_at = vec![at(0)];
    for (i, n) in [3usize, 0, 1, 4, 2].into_iter().enumerate() {
        let now = at(100 * (i as i64 + 1));
        cur.updated_at = now;
        let kinds: Vec<InstallEventKind> = (0..n)
            .map(|k| output(&format!("update {i} line {k}")))
            .collect();
        let (next, evs) = update(s, &cur, &kinds).await;
        assert_eq!(evs.len(), n, "update {i} appends every event given");
        expected_at.extend(std::iter::repeat_n(now, n));
        cur = next;
    }
    let all = all_events(s, r.id).await;
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    let n = expected_at.len() as u64;
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "seqs are 1, 2, 3, … without gaps"
    );
    assert_eq!(
        all.iter().map(|e| e.at).collect::<Vec<_>>(),
        expected_at,
        "each event is at its update's record.updated_at"
    );
    assert!(
        all.iter().all(|e| e.install == r.id),
        "events name their install"
    );
    // Paging: after the last seq seen, a few at a time.
    for page in [1usize, 2, 3, 7] {
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let got = s
                .install_events(r.id, after, page)
                .await
                .unwrap_or_else(|e| panic!("install_events(after {after}, limit {page}): {e}"));
            assert!(
                got.len() <= page,
                "install_events returned more than limit {page}"
            );
            let Some(last) = got.last() else { break };
            assert!(
                got.iter().all(|e| e.seq > after),
                "install_events(after {after}) returned seq <= after"
            );
            after = last.seq;
            seen.extend(got);
        }
        assert_eq!(
            seen, all,
            "paging with limit {page} returns every event once, in order"
        );
    }
    assert_eq!(
        s.install_events(r.id, 4, 3).await.expect("install_events"),
        all[4..7].to_vec(),
        "after 4, limit 3: seqs 5, 6, 7"
    );
    assert!(
        s.install_events(r.id, n, 10)
            .await
            .expect("install_events")
            .is_empty(),
        "nothing after the last seq"
    );
    assert!(
        s.install_events(r.id, 0, 0)
            .await
            .expect("install_events")
            .is_empty(),
        "limit 0: nothing"
    );
    // Another install's events are its own.
    let other = record("gpu-2", at(0));
    create(s, &other).await;
    assert_eq!(
        all_events(s, other.id).await.len(),
        1,
        "a new install has one event"
    );
    assert_eq!(
        all_events(s, r.id).await,
        all,
        "events of the first install unchanged"
    );
}

async fn list_is_newest_first_with_filters(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    // Six installs, oldest first: gpu-1 ×3, gpu-2 ×2, gpu-3 ×1; the newest on each instance stays
    // active, the others finish in turn.
    let id = ids(6);
    let plan = [
        ("gpu-1", InstallState::Succeeded),
        ("gpu-2", InstallState::Failed),
        ("gpu-1", InstallState::Cancelled),
        ("gpu-3", InstallState::Running),
        ("gpu-2", InstallState::Queued),
        ("gpu-1", InstallState::Running),
    ];
    for (i, (instance, state)) in plan.iter().enumerate() {
        let r = record_with(id[i], instance, at(i as i64));
        create(s, &r).await;
        if *state != InstallState::Queued {
            update(s, &moved(&r, *state, at(i as i64 + 100)), &[]).await;
        }
    }
    let newest_first: Vec<InstallId> = id.iter().rev().copied().collect();
    assert_eq!(
        list(s, filter(1000)).await,
        newest_first,
        "all installs, newest first"
    );
    assert_eq!(
        list(s, filter(2)).await,
        newest_first[..2].to_vec(),
        "limit 2: the two newest"
    );
    let on = |instance: &str| InstallFilter {
        instance: Some(instance.into()),
        ..filter(1000)
    };
    assert_eq!(
        list(s, on("gpu-1")).await,
        vec![id[5], id[2], id[0]],
        "instance gpu-1"
    );
    assert_eq!(
        list(s, on("gpu-2")).await,
        vec![id[4], id[1]],
        "instance gpu-2"
    );
    assert!(
        list(s, on("gpu-404")).await.is_empty(),
        "an instance without installs"
    );
    let in_states = |states: &[InstallState]| InstallFilter {
        states: states.to_vec(),
        ..filter(1000)
    };
    assert_eq!(
        list(s, in_states(&[InstallState::Running])).await,
        vec![id[5], id[3]],
        "state running"
    );
    assert_eq!(
        list(s, in_states(&[InstallState::Queued, InstallState::Running])).await,
        vec![id[5], id[4], id[3]],
        "states queued or running"
    );
    assert_eq!(
        list(
            s,
            in_states(&[
                InstallState::Succeeded,
                InstallState::Failed,
                InstallState::Cancelled
            ])
        )
        .await,
        vec![id[2], id[1], id[0]],
        "finished states"
    );
    assert_eq!(
        list(
            s,
            InstallFilter {
                instance: Some("gpu-1".into()),
                states: vec![InstallState::Cancelled, InstallState::Succeeded],
                before: Some(id[5]),
                limit: 1,
            }
        )
        .await,
        vec![id[2]],
        "instance, states, before and limit together"
    );
    assert_eq!(
        list(
            s,
            InstallFilter {
                before: Some(id[3]),
                ..filter(1000)
            }
        )
        .await,
        vec![id[2], id[1], id[0]],
        "before: only older installs"
    );
    assert!(
        list(
            s,
            InstallFilter {
                before: Some(id[0]),
                ..filter(1000)
            }
        )
        .await
        .is_empty(),
        "before the oldest: nothing"
    );
    let records = s.list_installs(&on("gpu-1")).await.expect("list_installs");
    for r in &records {
        assert_eq!(
            &must_get(s, r.id).await,
            r,
            "list_installs returns whole records"
        );
    }
}

async fn list_pages_with_before(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    let id = ids(11);
    for (i, id) in id.iter().enumerate() {
        let r = moved(
            &record_with(*id, &format!("gpu-{}", i % 3), at(i as i64)),
            InstallState::Succeeded,
            at(i as i64),
        );
        create(s, &r).await;
    }
    for page in [1usize, 3, 4, 11, 12] {
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let got = list(
                s,
                InstallFilter {
                    before,
                    ..filter(page)
                },
            )
            .await;
            assert!(got.len() <= page, "a page larger than its limit {page}");
            let Some(last) = got.last() else { break };
            before = Some(*last);
            seen.extend(got);
        }
        let newest_first: Vec<InstallId> = id.iter().rev().copied().collect();
        assert_eq!(
            seen, newest_first,
            "pages of {page} cover every install once, in order"
        );
    }
}

async fn list_limit_bounds(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    create(s, &record("gpu-1", at(0))).await;
    assert_invalid_input(s.list_installs(&filter(0)).await, "list_installs limit 0");
    assert_invalid_input(
        s.list_installs(&filter(1001)).await,
        "list_installs limit 1001",
    );
    assert_eq!(list(s, filter(1)).await.len(), 1, "limit 1");
    assert_eq!(list(s, filter(1000)).await.len(), 1, "limit 1000");
}

async fn instance_packs_upsert_sorted_by_name(s: Arc<dyn InstallStore>) {
    let s = s.as_ref();
    let (i1, i2) = (InstallId::new(), InstallId::new());
    let p = |instance: &str, name: &str, commit: &str, install: InstallId, t: i64| InstalledPack {
        instance: instance.into(),
        name: name.into(),
        git: format!("https://github.com/example/{name}.git"),
        commit: commit.into(),
        classes: vec![format!("{name}Loader"), format!("{name}Sampler")],
        install,
        installed_at: at(t),
    };
    assert!(
        s.instance_packs("gpu-1")
            .await
            .expect("instance_packs")
            .is_empty(),
        "no packs recorded yet"
    );
    s.record_packs(&[]).await.expect("record_packs of nothing");
    s.record_packs(&[
        p("gpu-1", "zeta-nodes", "aaaa", i1, 0),
        p("gpu-1", "Alpha-Nodes", "bbbb", i1, 0),
        p("gpu-1", "mid_nodes", "cccc", i1, 0),
        p("gpu-2", "zeta-nodes", "dddd", i1, 0),
    ])
    .await
    .expect("record_packs");
    let names = |v: &[InstalledPack]| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    let got = s.instance_packs("gpu-1").await.expect("instance_packs");
    assert_eq!(
        names(&got),
        vec!["Alpha-Nodes", "mid_nodes", "zeta-nodes"],
        "packs sorted by name (byte order)"
    );
    assert_eq!(
        got[0],
        p("gpu-1", "Alpha-Nodes", "bbbb", i1, 0),
        "a pack round-trips"
    );
    // The same (instance, name) again replaces the row; other instances are untouched.
    let newer = p("gpu-1", "zeta-nodes", "eeee", i2, 50);
    s.record_packs(std::slice::from_ref(&newer))
        .await
        .expect("record_packs");
    let got = s.instance_packs("gpu-1").await.expect("instance_packs");
    assert_eq!(got.len(), 3, "an upsert does not add a row: {got:?}");
    assert_eq!(got[2], newer, "the upsert replaced every field");
    assert_eq!(
        s.instance_packs("gpu-2").await.expect("instance_packs"),
        vec![p("gpu-2", "zeta-nodes", "dddd", i1, 0)],
        "another instance's pack of the same name is its own"
    );
    assert!(
        s.instance_packs("gpu")
            .await
            .expect("instance_packs")
            .is_empty(),
        "an instance name is matched exactly, not as a prefix"
    );
}

// ---------------------------------------------------------------------------------------------
// Pruning (stores that are also TaskStores)
// ---------------------------------------------------------------------------------------------

/// Checks `TaskStore::prune` on installs: finished installs older than the cutoff go with their
/// events; newer finished ones, active ones (however old) and recorded packs stay. Call it
/// with a fresh store from an async test.
pub async fn install_prune_conformance<S: TaskStore + InstallStore>(store: &S) {
    let s: &dyn InstallStore = store;
    let old_done = record("gpu-1", at(0));
    create(s, &old_done).await;
    update(
        s,
        &moved(&old_done, InstallState::Succeeded, at(1_000)),
        &[InstallEventKind::Finished {
            state: InstallState::Succeeded,
            error: None,
        }],
    )
    .await;
    // Finished without a finished_at: its last change counts.
    let mut old_failed = moved(&record("gpu-2", at(0)), InstallState::Failed, at(2_000));
    old_failed.finished_at = None;
    create(s, &old_failed).await;
    let recent = record("gpu-1", at(3_000));
    create(s, &recent).await;
    update(s, &moved(&recent, InstallState::Cancelled, at(9_000)), &[]).await;
    let old_active = record("gpu-3", at(0));
    create(s, &old_active).await;
    let (old_active, _) = update(
        s,
        &moved(&old_active, InstallState::Running, at(500)),
        &[output("still going")],
    )
    .await;
    let pack = InstalledPack {
        instance: "gpu-1".into(),
        name: "ComfyUI-Example".into(),
        git: "https://github.com/example/ComfyUI-Example.git".into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        classes: vec!["ExampleNode".into()],
        install: old_done.id,
        installed_at: at(1_000),
    };
    s.record_packs(std::slice::from_ref(&pack))
        .await
        .expect("record_packs");

    store.prune(at(5_000)).await.expect("prune");

    for gone in [old_done.id, old_failed.id] {
        assert_eq!(
            s.get_install(gone).await.expect("get_install"),
            None,
            "prune keeps an install finished before the cutoff"
        );
        assert_not_found(
            s.install_events(gone, 0, 100).await,
            gone,
            "events of a pruned install",
        );
    }
    assert_eq!(
        must_get(s, recent.id).await.state,
        InstallState::Cancelled,
        "an install finished after the cutoff stays"
    );
    assert_eq!(all_events(s, recent.id).await.len(), 1, "with its events");
    assert_eq!(
        must_get(s, old_active.id).await,
        old_active,
        "an active install stays"
    );
    assert_eq!(
        all_events(s, old_active.id).await.len(),
        2,
        "with its events"
    );
    assert_eq!(
        s.instance_packs("gpu-1").await.expect("instance_packs"),
        vec![pack],
        "recorded packs are not pruned"
    );
    assert_eq!(
        list(s, filter(1000)).await,
        {
            let mut v = vec![recent.id, old_active.id];
            v.sort();
            v.reverse();
            v
        },
        "list after prune"
    );
}
