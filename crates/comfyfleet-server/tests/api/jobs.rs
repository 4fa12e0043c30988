//! Submit → run → inspect → download, cancel paths.

use comfyfleet_core::JobState;
use serde_json::{Value, json};

use crate::harness::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_runs_and_the_job_shows_attempts_timings_and_outputs() {
    let t = TestServer::start().await;
    let id = t.submit_sleep(0.05).await;
    let job = t.wait_terminal(id).await;
    assert_eq!(job.state, JobState::Succeeded);

    let v: Value = t.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(v["state"], "succeeded");
    let attempts = v["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert!(
        !attempts[0]["nodes"].as_array().unwrap().is_empty(),
        "per-node timings: {v}"
    );
    let artifacts = v["artifacts"].as_array().unwrap();
    assert!(!artifacts.is_empty());

    let r = t
        .get(&format!("/v1/jobs/{id}/outputs/0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let bytes = r.bytes().await.unwrap();
    assert!(
        bytes.starts_with(b"\xc2\x89PNG") || bytes.starts_with(b"\x89PNG"),
        "{bytes:?}"
    );

    let r = t
        .get(&format!("/v1/jobs/{id}/outputs/99"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["code"], "not_found");

    // Listed, counted.
    let page: Value = t.get_json("/v1/jobs?state=succeeded").await;
    assert_eq!(page["jobs"][0]["id"], id.to_string());
    let counts: Value = t.get_json("/v1/jobs/counts").await;
    assert_eq!(counts["counts"]["succeeded"], 1);
    assert_eq!(counts["total"], 1);
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_job_with_200() {
    let t = TestServer::start().await;
    let body =
        json!({"workflow": comfyfleet_testkit::workflows::invert(), "idempotency_key": "k-1"});
    let a = t.post("/v1/jobs").json(&body).send().await.unwrap();
    assert_eq!(a.status(), 202);
    let a: Value = a.json().await.unwrap();
    let b = t.post("/v1/jobs").json(&body).send().await.unwrap();
    assert_eq!(b.status(), 200);
    let b: Value = b.json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    assert_eq!(b["created"], false);
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_force_cancel_and_batch_give_clear_per_id_results() {
    let t = TestServer::start().await;
    // Occupy both backends so new jobs stay pending.
    let long1 = t.submit_sleep(60.0).await;
    let long2 = t.submit_sleep(60.0).await;
    let pending = t.submit_sleep(0.01).await;
    // Wait until the long ones run.
    for id in [long1, long2] {
        for _ in 0..600 {
            if t.engine.get(id).await.unwrap().unwrap().state == JobState::Running {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    // Plain cancel of a running job: 409, left alone.
    let r = t
        .post(&format!("/v1/jobs/{long1}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["code"], "conflict");
    assert_eq!(e["details"]["state"], "running");

    // Batch: pending cancelled, running force-cancelled, unknown not found.
    let unknown = comfyfleet_core::JobId::new();
    let r = t
        .post("/v1/jobs/cancel")
        .json(&json!({"ids": [pending, long2, unknown], "force": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let results: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["cancelled", "cancel_requested", "not_found"]);

    // Force-cancel one.
    let r = t
        .post(&format!("/v1/jobs/{long1}/cancel?force=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["outcome"], "cancel_requested");
    assert_eq!(t.wait_terminal(long1).await.state, JobState::Cancelled);
    assert_eq!(t.wait_terminal(long2).await.state, JobState::Cancelled);

    // Now terminal: 409 with the state.
    let r = t
        .post(&format!("/v1/jobs/{long1}/cancel?force=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["details"]["state"], "cancelled");
    // Unknown: 404.
    let r = t
        .post(&format!("/v1/jobs/{unknown}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    t.shutdown().await;
}
