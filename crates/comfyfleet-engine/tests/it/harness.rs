use std::sync::Arc;
use std::time::Duration;

use comfyfleet_core::{
    Backend, Clock, Event, EventKind, FleetEvent, JobId, JobRecord, JobSpec, MemoryStore,
    TaskStore, Timestamp, TokioClock,
};
use comfyfleet_engine::{Engine, EngineConfig, SmartFailover, SmartFailoverConfig};
use comfyfleet_testkit::FakeBackend;
use tokio::sync::broadcast;

pub const T0: i64 = 1_800_000_000_000;

pub struct Harness {
    pub engine: Engine,
    pub store: Arc<MemoryStore>,
    pub rx: broadcast::Receiver<FleetEvent>,
    pub clock: Arc<TokioClock>,
}

pub fn config() -> EngineConfig {
    EngineConfig {
        owner: "test-engine".into(),
        ..EngineConfig::default()
    }
}

pub fn strategy() -> Arc<SmartFailover> {
    Arc::new(SmartFailover::new(SmartFailoverConfig {
        jitter: false,
        seed: Some(7),
        ..SmartFailoverConfig::default()
    }))
}

pub fn harness(backends: &[Arc<FakeBackend>], config: EngineConfig) -> Harness {
    harness_with(backends, config, Arc::new(MemoryStore::new()))
}

pub fn harness_with(
    backends: &[Arc<FakeBackend>],
    config: EngineConfig,
    store: Arc<MemoryStore>,
) -> Harness {
    let clock = Arc::new(TokioClock::starting_at(Timestamp::from_millis(T0)));
    let engine = Engine::builder(store.clone(), strategy())
        .backends(backends.iter().map(|b| b.clone() as Arc<dyn Backend>))
        .config(config)
        .clock(clock.clone())
        .build()
        .unwrap();
    let rx = engine.subscribe();
    engine.start();
    Harness {
        engine,
        store,
        rx,
        clock,
    }
}

impl Harness {
    pub async fn submit(&self, spec: JobSpec) -> JobId {
        self.engine.submit(spec).await.unwrap()
    }

    pub async fn finish(&self, id: JobId) -> JobRecord {
        tokio::time::timeout(Duration::from_secs(24 * 3600), self.engine.wait_for(id))
            .await
            .expect("job did not finish within a virtual day")
            .unwrap()
    }

    pub async fn events(&self, id: JobId) -> Vec<Event> {
        self.engine.events(id).await.unwrap()
    }

    /// Waits (in virtual time) for a fleet event matching `f`; returns it and when it came.
    pub async fn wait_fleet(&mut self, f: impl Fn(&FleetEvent) -> bool) -> (FleetEvent, Timestamp) {
        let deadline = Duration::from_secs(24 * 3600);
        tokio::time::timeout(deadline, async {
            loop {
                match self.rx.recv().await {
                    Ok(e) if f(&e) => return (e, self.clock.now()),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => panic!("event channel closed: {e}"),
                }
            }
        })
        .await
        .expect("event did not come within a virtual day")
    }

    /// Waits for a job event of a kind.
    pub async fn wait_job_event(&mut self, id: JobId, name: &str) -> Event {
        let (e, _) = self
            .wait_fleet(
                |e| matches!(e, FleetEvent::Job(ev) if ev.job == id && ev.kind.name() == name),
            )
            .await;
        match e {
            FleetEvent::Job(ev) => ev,
            _ => unreachable!(),
        }
    }
}

pub fn names(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.name()).collect()
}

pub fn ms(t: Timestamp) -> i64 {
    t.as_millis() - T0
}

pub fn dispatched_skips(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Dispatched { skipped, .. } => Some(
                skipped
                    .iter()
                    .map(|s| format!("{}: {}", s.backend, s.reason)),
            ),
            _ => None,
        })
        .flatten()
        .collect()
}

pub async fn store_get(store: &MemoryStore, id: JobId) -> JobRecord {
    store.get(id).await.unwrap().unwrap()
}
