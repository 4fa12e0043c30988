//! Live events: resume without loss, per-job streams end at the terminal event.

use std::collections::BTreeSet;

use comfyfleet_core::JobState;
use serde_json::Value;

use crate::harness::{SseReader, TestServer};

/// Disconnect mid-job, reconnect with the last id: exactly the missed events, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_last_event_id_delivers_exactly_the_missed_events() {
    let t = TestServer::start().await;
    let id = t.submit_sleep(0.6).await;

    // First connection: read a few events, then drop it mid-job.
    let r = t
        .get(&format!("/v1/jobs/{id}/events/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut sse = SseReader::new(r);
    let mut first = Vec::new();
    while first.len() < 3 {
        let m = sse.next().await.expect("stream ended early");
        assert_eq!(m.event, "job");
        first.push(m);
    }
    drop(sse);
    let last = first.last().unwrap().id.unwrap();
    // Let the job finish while disconnected, so the rest must come from the store.
    assert_eq!(t.wait_terminal(id).await.state, JobState::Succeeded);

    // Reconnect with Last-Event-ID.
    let r = t
        .get(&format!("/v1/jobs/{id}/events/stream"))
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(r);
    let mut rest = Vec::new();
    while let Some(m) = sse.next().await {
        rest.push(m);
    }
    // The stream ended by itself after the terminal event.
    let kinds: Vec<String> = rest
        .iter()
        .map(|m| m.json()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("succeeded"),
        "{kinds:?}"
    );

    // Exactly the stored events after `last`, in order: compare with the store.
    let all = t.engine.events(id).await.unwrap();
    let want: Vec<u64> = all.iter().filter(|e| e.id > last).map(|e| e.id).collect();
    let got: Vec<u64> = rest.iter().map(|m| m.id.unwrap()).collect();
    assert_eq!(got, want);
    // And together with the first connection: every event once.
    let seen: Vec<u64> = first
        .iter()
        .chain(rest.iter())
        .map(|m| m.id.unwrap())
        .collect();
    let all_ids: Vec<u64> = all.iter().map(|e| e.id).collect();
    assert_eq!(seen, all_ids);
    // The per-job seq is contiguous from 1.
    let seqs: Vec<u64> = first
        .iter()
        .chain(rest.iter())
        .map(|m| m.json()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    t.shutdown().await;
}

/// The global stream resumed with `?after=` across several jobs: no gaps, no duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_stream_resume_is_gapless_across_jobs() {
    let t = TestServer::start().await;
    let r = t.get("/v1/events").send().await.unwrap();
    let mut sse = SseReader::new(r);
    let mut ids = Vec::new();
    for _ in 0..4 {
        t.submit_sleep(0.05).await;
    }
    while ids.len() < 5 {
        let m = sse.next().await.unwrap();
        if m.event == "job" {
            ids.push(m.id.unwrap());
        }
    }
    drop(sse);
    // Wait for all four to finish.
    let page: Value = t.get_json("/v1/jobs").await;
    for j in page["jobs"].as_array().unwrap() {
        t.wait_terminal(j["id"].as_str().unwrap().parse().unwrap())
            .await;
    }
    let last = *ids.last().unwrap();
    let r = t
        .get(&format!("/v1/events?after={last}"))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(r);
    let store_ids: Vec<u64> = {
        let all = t
            .engine
            .store()
            .events(&comfyfleet_core::EventQuery {
                job: None,
                after: None,
                limit: 1000,
            })
            .await
            .unwrap();
        all.iter().map(|e| e.id).collect()
    };
    let want: Vec<u64> = store_ids.iter().copied().filter(|i| *i > last).collect();
    let mut got = Vec::new();
    while got.len() < want.len() {
        let m = sse.next().await.unwrap();
        if m.event == "job" {
            got.push(m.id.unwrap());
        }
    }
    assert_eq!(got, want);
    let before: BTreeSet<u64> = ids.iter().copied().collect();
    assert!(got.iter().all(|i| !before.contains(i)));
    t.shutdown().await;
}

/// Resuming a finished job's stream after its last event ends at once (nothing is missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_after_the_terminal_event_ends_the_stream() {
    let t = TestServer::start().await;
    let id = t.submit_sleep(0.01).await;
    t.wait_terminal(id).await;
    let last = t.engine.events(id).await.unwrap().last().unwrap().id;
    let r = t
        .get(&format!("/v1/jobs/{id}/events/stream?after={last}"))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(r);
    assert!(
        sse.next().await.is_none(),
        "the stream should end with nothing to send"
    );
    t.shutdown().await;
}

/// An `EventSource` created on `?after=0` reconnects to the same URL with `Last-Event-ID`: the
/// later of the two wins, so nothing is replayed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_wins_over_an_older_after_parameter() {
    let t = TestServer::start().await;
    let id = t.submit_sleep(0.01).await;
    t.wait_terminal(id).await;
    let all: Vec<u64> = t
        .engine
        .events(id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let mid = all[all.len() / 2];
    let r = t
        .get(&format!("/v1/jobs/{id}/events/stream?after=0"))
        .header("Last-Event-ID", mid.to_string())
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(r);
    let mut got = Vec::new();
    while let Some(m) = sse.next().await {
        got.push(m.id.unwrap());
    }
    let want: Vec<u64> = all.iter().copied().filter(|i| *i > mid).collect();
    assert_eq!(got, want);
    t.shutdown().await;
}
