//! Random fault plans across 3–5 fake backends and 50–200 jobs: every job ends in exactly one
//! terminal state, attempts ≤ max, no backend ever above its capacity, events per job strictly
//! ordered.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use comfyfleet_core::{ErrorKind, EventKind, ExecutionError, JobId, JobSpec, SubmitRequest};
use comfyfleet_engine::EngineConfig;
use comfyfleet_testkit::{FakeBackend, Fault, workflows};
use proptest::prelude::*;

use crate::harness::*;

#[derive(Debug, Clone)]
struct BackendPlan {
    capacity: u32,
    restartable: bool,
    seed: u64,
}

#[derive(Debug, Clone)]
struct JobPlan {
    seconds: u8,
    max_attempts: u32,
    priority: i32,
    cancel_at: Option<(u16, bool)>,
}

fn pick_fault(rng: &mut fastrand::Rng, restartable: bool) -> Fault {
    match rng.u32(0..100) {
        0..=59 => Fault::None,
        60..=67 => Fault::HangBeforeStart,
        68..=75 => Fault::HangMidNode { node: 1 },
        76..=80 => Fault::Crash { after_nodes: 1 },
        81..=86 => Fault::Fail {
            after_nodes: 1,
            error: ExecutionError::transient("CUDA error: an illegal memory access (transient)"),
        },
        87..=91 => Fault::Fail {
            after_nodes: 2,
            error: ExecutionError::new(
                ErrorKind::BackendSpecific,
                "torch.OutOfMemoryError: out of memory",
            ),
        },
        92..=94 => Fault::Reject {
            error: ExecutionError::deterministic("Value 0 smaller than min of 1"),
        },
        95..=96 if restartable => Fault::Stuck { node: 1 },
        95..=96 => Fault::SlowCancel {
            node: 1,
            delay: Duration::from_secs(3),
        },
        _ => Fault::SubmitHang,
    }
}

fn backend_plan() -> impl Strategy<Value = BackendPlan> {
    (1u32..=3, any::<bool>(), any::<u64>()).prop_map(|(capacity, restartable, seed)| BackendPlan {
        capacity,
        restartable,
        seed,
    })
}

fn job_plan() -> impl Strategy<Value = JobPlan> {
    (
        0u8..6,
        1u32..=4,
        -1i32..=2,
        proptest::option::weighted(0.1, (0u16..300, any::<bool>())),
    )
        .prop_map(|(seconds, max_attempts, priority, cancel_at)| JobPlan {
            seconds,
            max_attempts,
            priority,
            cancel_at,
        })
}

fn run(backends: Vec<BackendPlan>, jobs: Vec<JobPlan>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let fakes: Vec<Arc<FakeBackend>> = backends
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let rng = Mutex::new(fastrand::Rng::with_seed(p.seed));
                let restartable = p.restartable;
                FakeBackend::builder(&format!("gpu-{i}"))
                    .capacity(p.capacity)
                    .restartable(restartable)
                    .fault_fn(move |_: &SubmitRequest| {
                        pick_fault(&mut rng.lock().unwrap(), restartable)
                    })
                    .build()
            })
            .collect();
        let cfg = EngineConfig {
            dispatch_timeout: Duration::from_secs(10),
            node_timeout: Duration::from_secs(30),
            queue_timeout: Duration::from_secs(120),
            ..config()
        };
        let h = harness(&fakes, cfg);
        let mut ids: Vec<(JobId, u32)> = Vec::new();
        for j in &jobs {
            let spec = JobSpec::new(workflows::sleep(f64::from(j.seconds)))
                .max_attempts(j.max_attempts)
                .priority(j.priority);
            let id = h.submit(spec).await;
            ids.push((id, j.max_attempts));
            if let Some((at, force)) = j.cancel_at {
                let engine = h.engine.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(u64::from(at))).await;
                    let _ = if force {
                        engine.force_cancel(id).await
                    } else {
                        engine.cancel(id).await
                    };
                });
            }
        }
        for (id, max) in &ids {
            let job = h.finish(*id).await;
            prop_assert!(job.state.is_terminal());
            prop_assert!(
                job.counted_attempts() <= *max,
                "job {id}: {} attempts > max {max}",
                job.counted_attempts()
            );
            let events = h.events(*id).await;
            let terminals: Vec<_> = events
                .iter()
                .filter(|e| e.kind.terminal_state().is_some())
                .collect();
            prop_assert_eq!(
                terminals.len(),
                1,
                "job {}: terminal events {:?}",
                id,
                names(&events)
            );
            prop_assert_eq!(terminals[0].kind.terminal_state(), Some(job.state));
            prop_assert!(
                events.last().unwrap().kind.terminal_state().is_some(),
                "job {id}: events after the end: {:?}",
                names(&events)
            );
            for (i, e) in events.iter().enumerate() {
                prop_assert_eq!(e.seq as usize, i + 1, "job {}: seq gap", id);
            }
            for w in events.windows(2) {
                prop_assert!(
                    w[0].id < w[1].id && w[0].at <= w[1].at,
                    "job {id}: events out of order"
                );
            }
            if job.state == comfyfleet_core::JobState::Succeeded {
                let succeeded = events
                    .iter()
                    .any(|e| matches!(e.kind, EventKind::Succeeded { .. }));
                prop_assert!(succeeded, "job {} succeeded without a succeeded event", id);
                prop_assert_eq!(job.progress.as_ref().map(|p| p.percent), Some(100.0));
            }
        }
        for (f, p) in fakes.iter().zip(&backends) {
            let s = f.stats();
            prop_assert!(
                s.max_running <= u64::from(p.capacity),
                "{:?} ran {} at once, capacity {}",
                f,
                s.max_running,
                p.capacity
            );
        }
        for b in h.engine.backends() {
            prop_assert!(b.in_flight <= b.capabilities.max_concurrent);
        }
        h.engine.shutdown(Duration::from_secs(60)).await;
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 64, ..ProptestConfig::default() })]
    #[test]
    fn random_fault_plans_keep_every_invariant(
        backends in proptest::collection::vec(backend_plan(), 3..=5),
        jobs in proptest::collection::vec(job_plan(), 50..=200),
    ) {
        run(backends, jobs)?;
    }
}
