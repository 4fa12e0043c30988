//! `SmartFailover::pick` latency over a fleet of 100 backends.
//!
//! The job is a real `JobRecord` (enqueued into a `MemoryStore` and read back) for the `invert`
//! workflow. Half of the backends report a node-class inventory (the standard classes plus 300
//! others, about the size of a ComfyUI install with a few custom-node packs), half report none
//! (unknown: assume anything). Capacities vary from 1 to 8 and in-flight counts below them.
//!
//! Variants (each 100 candidates):
//! * `all_eligible` — every backend healthy, active, with a free slot: p2c over 100;
//! * `mixed` — 10 % unhealthy, 10 % blocked for the workflow (after a backend-specific failure),
//!   10 % at capacity, 4 % draining, the rest eligible: each skip formats its reason;
//! * `inventory_90pct_excluded` — 90 backends lack `ImageInvert` in their inventory, 10 have it;
//! * `warm_hint` — as `all_eligible`, after an `on_success` made one backend warm for the
//!   workflow's structure hash.
//!
//! `candidates_snapshot/mixed` times only cloning the 100 candidates, which the engine does per
//! placement (inventories are shared behind `Arc`, so this is cheap since the first report).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Duration;

use comfyfleet_core::{
    Availability, BackendId, Candidate, Capabilities, ExecutionError, FailoverStrategy, Health,
    Inventory, JobRecord, JobSpec, MemoryStore, NewJob, Placement, TaskStore, Timestamp, Workflow,
};
use comfyfleet_engine::{SmartFailover, SmartFailoverConfig};
use comfyfleet_testkit::workflows;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const FLEET: usize = 100;
const NOW: Timestamp = Timestamp::from_millis(1_800_000_000_000);

/// What one backend of the fleet looks like.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Eligible,
    Unhealthy,
    Blocked,
    Full,
    Draining,
    LacksClass,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn strategy() -> SmartFailover {
    SmartFailover::new(SmartFailoverConfig {
        seed: Some(7),
        jitter: false,
        ..SmartFailoverConfig::default()
    })
}

/// A node-class inventory: the standard classes (minus `without`) plus 300 custom ones.
fn classes(without: Option<&str>) -> BTreeSet<String> {
    workflows::STANDARD_CLASSES
        .iter()
        .map(|c| (*c).to_owned())
        .chain((0..300).map(|k| format!("CustomPackNode{k:03}")))
        .filter(|c| Some(c.as_str()) != without)
        .collect()
}

fn candidate(i: usize, kind: Kind) -> Candidate {
    let capacity = u32::try_from(i % 8 + 1).unwrap();
    let mut in_flight = u32::try_from(i % 3).unwrap().min(capacity - 1);
    let mut health = Health {
        healthy: true,
        queue_depth: i
            .is_multiple_of(4)
            .then_some(in_flight + u32::try_from(i % 5).unwrap()),
        detail: String::new(),
    };
    let mut availability = Availability::Active;
    let node_classes = match kind {
        Kind::LacksClass => Some(classes(Some("ImageInvert"))),
        _ if i.is_multiple_of(2) => Some(classes(None)),
        _ => None,
    };
    match kind {
        Kind::Unhealthy => health = Health::down("connection refused"),
        Kind::Full => in_flight = capacity,
        Kind::Draining => availability = Availability::Draining,
        Kind::Eligible | Kind::Blocked | Kind::LacksClass => {}
    }
    Candidate {
        id: BackendId::new(format!("gpu-{i:03}")),
        capabilities: Capabilities {
            max_concurrent: capacity,
            ..Capabilities::default()
        },
        inventory: std::sync::Arc::new(Inventory {
            node_classes,
            ..Inventory::default()
        }),
        in_flight,
        health,
        availability,
    }
}

fn fleet(kind_of: impl Fn(usize) -> Kind) -> Vec<Candidate> {
    (0..FLEET).map(|i| candidate(i, kind_of(i))).collect()
}

fn mixed_kind(i: usize) -> Kind {
    match i % 10 {
        0 => Kind::Unhealthy,
        1 => Kind::Blocked,
        2 => Kind::Full,
        _ if i % 25 == 3 => Kind::Draining,
        _ => Kind::Eligible,
    }
}

/// A real job record for `workflow`: enqueued into a memory store and read back.
fn job(rt: &tokio::runtime::Runtime, workflow: &Workflow) -> JobRecord {
    rt.block_on(async {
        let store = MemoryStore::new();
        let enq = store
            .enqueue(NewJob::new(JobSpec::new(workflow.clone())), NOW)
            .await
            .unwrap();
        store.get(enq.id).await.unwrap().expect("just enqueued")
    })
}

struct Case {
    name: &'static str,
    strategy: SmartFailover,
    candidates: Vec<Candidate>,
}

fn cases(rt: &tokio::runtime::Runtime, job: &JobRecord, workflow: &Workflow) -> Vec<Case> {
    let all = Case {
        name: "all_eligible",
        strategy: strategy(),
        candidates: fleet(|_| Kind::Eligible),
    };

    let mixed_fleet = fleet(mixed_kind);
    let mixed_strategy = strategy();
    rt.block_on(async {
        let failed_at = NOW.sub(Duration::from_secs(1));
        let error = ExecutionError::backend_specific("CUDA out of memory");
        for c in mixed_fleet
            .iter()
            .enumerate()
            .filter(|(i, _)| mixed_kind(*i) == Kind::Blocked)
            .map(|(_, c)| c)
        {
            mixed_strategy
                .on_failure(job, workflow, &c.id, &error, failed_at)
                .await;
        }
    });
    // Blocks last 60 s from `failed_at`; drop the BackendBlocked notices they queued.
    drop(mixed_strategy.take_notices(NOW));
    let mixed = Case {
        name: "mixed",
        strategy: mixed_strategy,
        candidates: mixed_fleet,
    };

    let inventory = Case {
        name: "inventory_90pct_excluded",
        strategy: strategy(),
        candidates: fleet(|i| {
            if i.is_multiple_of(10) {
                Kind::Eligible
            } else {
                Kind::LacksClass
            }
        }),
    };

    let warm_fleet = fleet(|_| Kind::Eligible);
    let warm_strategy = strategy();
    let warm_id = warm_fleet[42].id.clone();
    rt.block_on(warm_strategy.on_success(
        job,
        workflow,
        &warm_id,
        Duration::from_millis(800),
        NOW.sub(Duration::from_secs(1)),
    ));
    let warm = Case {
        name: "warm_hint",
        strategy: warm_strategy,
        candidates: warm_fleet,
    };

    vec![all, mixed, inventory, warm]
}

/// Places the job once outside the timed loop, to check each case does what its name says.
fn check(rt: &tokio::runtime::Runtime, case: &Case, job: &JobRecord, workflow: &Workflow) {
    let placement = rt.block_on(case.strategy.pick(job, workflow, &case.candidates, NOW));
    let Placement::Run { backend, skipped } = placement else {
        panic!("{}: expected a placement, got {placement:?}", case.name);
    };
    let expected_skips = match case.name {
        "mixed" => 10 + 10 + 10 + 4,
        "inventory_90pct_excluded" => 90,
        _ => 0,
    };
    assert_eq!(skipped.len(), expected_skips, "{}: skips", case.name);
    if case.name == "warm_hint" {
        assert_eq!(backend.as_str(), "gpu-042", "the warm backend wins");
    }
}

fn strategy_pick(c: &mut Criterion) {
    let rt = runtime();
    let workflow = workflows::invert();
    let job = job(&rt, &workflow);
    let cases = cases(&rt, &job, &workflow);

    let mut group = c.benchmark_group("strategy_pick");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_secs(1));
    for case in &cases {
        check(&rt, case, &job, &workflow);
        group.bench_with_input(
            BenchmarkId::new(case.name, FLEET),
            case,
            |b, case: &Case| {
                b.to_async(&rt).iter(|| {
                    case.strategy
                        .pick(&job, &workflow, black_box(&case.candidates), NOW)
                });
            },
        );
    }
    group.finish();

    let mut group = c.benchmark_group("candidates_snapshot");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_secs(1));
    let mixed = &cases[1].candidates;
    group.bench_with_input(BenchmarkId::new("mixed", FLEET), mixed, |b, cands| {
        b.iter(|| black_box(cands).to_vec());
    });
    group.finish();
}

criterion_group!(benches, strategy_pick);
criterion_main!(benches);
