//! Engine behaviour against a mocked backend (mockall): exact expectations on backend calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use comfyfleet_core::{
    Artifact, Backend, BackendError, BackendId, ByteStream, CancelAck, Capabilities, Execution,
    ExecutionEvent, Health, Inventory, JobSpec, JobState, MemoryStore, ReapOptions, ReapReason,
    RemoteRef, SubmitRequest, TimeoutPhase, Timestamp, TokioClock, Upload,
};
use comfyfleet_engine::Engine;
use comfyfleet_testkit::workflows;
use futures::StreamExt;

use crate::harness::{T0, config, strategy};

mockall::mock! {
    pub Gpu {}
    #[async_trait::async_trait]
    impl Backend for Gpu {
        fn id(&self) -> &BackendId;
        fn kind(&self) -> &'static str;
        fn capabilities(&self) -> Capabilities;
        async fn inventory(&self) -> Result<Inventory, BackendError>;
        async fn health(&self) -> Health;
        async fn submit(&self, request: SubmitRequest) -> Result<Execution, BackendError>;
        async fn cancel(&self, remote: &RemoteRef) -> Result<CancelAck, BackendError>;
        async fn reattach(&self, remote: &RemoteRef) -> Result<Option<Execution>, BackendError>;
        async fn restart(&self) -> Result<(), BackendError>;
        async fn upload(&self, upload: &Upload, bytes: Bytes) -> Result<(), BackendError>;
        async fn fetch(&self, artifact: &Artifact) -> Result<ByteStream, BackendError>;
    }
}

fn hanging_execution(remote: &str) -> Execution {
    let events = futures::stream::iter([
        ExecutionEvent::Accepted,
        ExecutionEvent::Started,
        ExecutionEvent::NodeStarted { node: "1".into() },
    ])
    .chain(futures::stream::pending());
    Execution {
        remote: RemoteRef::new(remote),
        events: Box::pin(events),
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_stops_the_remote_execution_once_and_writes_nothing_more() {
    let cancels = Arc::new(AtomicU32::new(0));
    let mut gpu = MockGpu::new();
    gpu.expect_id().return_const(BackendId::new("gpu-mock"));
    gpu.expect_kind().return_const("mock");
    gpu.expect_capabilities().returning(Capabilities::default);
    gpu.expect_inventory()
        .returning(|| Ok(Inventory::default()));
    gpu.expect_health().returning(Health::ok);
    gpu.expect_submit()
        .times(1)
        .returning(|_| Ok(hanging_execution("r-1")));
    let seen = cancels.clone();
    gpu.expect_cancel()
        .withf(|r| r.as_str() == "r-1")
        .times(1)
        .returning(move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
            Ok(CancelAck::InterruptSent)
        });
    gpu.expect_reattach().never();

    let store = Arc::new(MemoryStore::new());
    let engine = Engine::builder(store.clone(), strategy())
        .backend(Arc::new(gpu))
        .config(config())
        .clock(Arc::new(TokioClock::starting_at(Timestamp::from_millis(
            T0,
        ))))
        .build()
        .unwrap();
    engine.start();
    let id = engine
        .submit(JobSpec::new(workflows::invert()).max_attempts(1))
        .await
        .unwrap();

    // A hung backend behind a live orchestrator: the reaper (on another process, say) decides
    // the attempt is stuck and fails the job; our lease is gone.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = engine
        .reap(&ReapOptions {
            dry_run: false,
            stuck_after: Some(Duration::from_secs(3)),
            max_crash_requeues: 3,
        })
        .await
        .unwrap();
    assert_eq!(report.items.len(), 1);
    assert_eq!(report.items[0].reason, ReapReason::NoProgress);
    let job = engine.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    let events_after_reap = engine.events(id).await.unwrap().len();

    // The next heartbeat learns the lease is lost and cancels the remote execution.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(cancels.load(Ordering::SeqCst), 1);
    let job = engine.get(id).await.unwrap().unwrap();
    assert_eq!(
        job.state,
        JobState::Failed,
        "the engine wrote nothing after losing its lease"
    );
    assert_eq!(
        job.error.unwrap().timeout_phase(),
        Some(TimeoutPhase::NodeSilence)
    );
    assert_eq!(engine.events(id).await.unwrap().len(), events_after_reap);
    engine.shutdown(Duration::from_secs(1)).await;
}
