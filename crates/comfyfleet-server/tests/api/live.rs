//! WebSocket streams, slow clients, webhooks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use comfyfleet_core::JobState;
use comfyfleet_server::ServerConfig;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{Options, TOKEN, TestServer};

async fn ws_connect(
    t: &TestServer,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = t.url(path).replacen("http://", "ws://", 1);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_websocket_streams_every_event_then_closes_normally() {
    let t = TestServer::start().await;
    let id = t.submit_sleep(0.1).await;
    let mut ws = ws_connect(&t, &format!("/v1/jobs/{id}/events/ws")).await;
    let mut ids = Vec::new();
    let mut close = None;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .unwrap()
    {
        match m.unwrap() {
            Message::Text(s) => {
                let v: Value = serde_json::from_str(&s).unwrap();
                assert_eq!(v["stream"], "job");
                ids.push(v["event"]["id"].as_u64().unwrap());
            }
            Message::Close(f) => {
                close = f;
                break;
            }
            _ => {}
        }
    }
    let want: Vec<u64> = t
        .engine
        .events(id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, want);
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1000));
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_without_token_is_refused_with_401() {
    let t = TestServer::start().await;
    let url = t.url("/v1/events/ws").replacen("http://", "ws://", 1);
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 401),
        e => panic!("expected an HTTP 401, got {e}"),
    }
    t.shutdown().await;
}

/// A client that never reads must not slow the engine or other clients: jobs keep finishing
/// and a well-behaved subscriber sees every event, while the stalled one is cut off or lags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_slow_the_engine_or_other_clients() {
    let t = TestServer::with(Options {
        config: ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            event_buffer: 16,
            ..ServerConfig::default()
        },
        ..Options::default()
    })
    .await;
    // The stalled client: opens the global SSE stream and never reads it.
    let stalled = t.get("/v1/events").send().await.unwrap();
    // The good client.
    let good = t.get("/v1/events").send().await.unwrap();
    let mut good = crate::harness::SseReader::new(good);
    let mut ids = Vec::new();
    for _ in 0..40 {
        t.submit_sleep(0.01).await;
    }
    let page: Value = t.get_json("/v1/jobs?limit=100").await;
    for j in page["jobs"].as_array().unwrap() {
        let job = t
            .wait_terminal(j["id"].as_str().unwrap().parse().unwrap())
            .await;
        assert_eq!(job.state, JobState::Succeeded);
    }
    let total = t
        .engine
        .store()
        .events(&comfyfleet_core::EventQuery {
            job: None,
            after: None,
            limit: 1000,
        })
        .await
        .unwrap()
        .len();
    let mut lagged = 0;
    while ids.len() < total {
        let m = good.next().await.expect("good stream ended");
        match m.event.as_str() {
            "job" => ids.push(m.id.unwrap()),
            "lagged" => lagged += 1,
            _ => {}
        }
    }
    // Every event once, in order, even if the good client itself lagged (a 16-event buffer).
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, ids, "lagged {lagged} times");
    drop(stalled);
    t.shutdown().await;
}

type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

async fn receiver(fail_first: usize) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s2 = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let seen = s2.clone();
                let count = count.clone();
                async move {
                    let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let h = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    seen.lock().unwrap().push((
                        h("x-comfyfleet-signature"),
                        h("x-comfyfleet-delivery"),
                        body.to_vec(),
                    ));
                    if n < fail_first {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::NO_CONTENT
                    }
                }
            },
        ),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}/hook"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_is_signed_and_retried_until_accepted() {
    let secret = "webhook-secret-0123456789";
    let t = TestServer::with(Options {
        config: ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            webhook_secret: Some(secret.into()),
            webhook_allow_private: true,
            ..ServerConfig::default()
        },
        ..Options::default()
    })
    .await;
    let (url, seen) = receiver(2).await;
    let r = t
        .post("/v1/jobs")
        .json(&json!({"workflow": comfyfleet_testkit::workflows::invert(), "webhook": url}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id: String = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Two 500s, then accepted: three deliveries of the same body and delivery id.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhook not retried to success"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "no delivery after the 2xx");
    for (sig, delivery, body) in &seen {
        assert_eq!(sig, &comfyfleet_server::webhook_signature(secret, body));
        assert_eq!(delivery, &seen[0].1);
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["job"]["id"], id.as_str());
        assert_eq!(v["job"]["state"], "succeeded");
        assert_eq!(v["event"]["type"], "succeeded");
    }
    // A wrong secret does not verify.
    assert_ne!(
        seen[0].0,
        comfyfleet_server::webhook_signature("another-secret-xxxxxxx", &seen[0].2)
    );
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_posts_are_refused_and_same_origin_ones_pass() {
    let t = TestServer::with(Options {
        token: false,
        ..Options::default()
    })
    .await;
    let id = t.submit_sleep(60.0).await;
    let r = t
        .post(&format!("/v1/jobs/{id}/cancel?force=true"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "forbidden");
    let r = t
        .post(&format!("/v1/jobs/{id}/cancel?force=true"))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_ne!(
        t.engine.get(id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    let own = t.base.clone();
    let r = t
        .post(&format!("/v1/jobs/{id}/cancel?force=true"))
        .header("origin", own)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(t.wait_terminal(id).await.state, JobState::Cancelled);
    t.shutdown().await;
}

/// A DNS-rebinding page reaches a token-less server under a foreign host name: refused. A
/// cross-site WebSocket upgrade is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenless_server_answers_only_loopback_host_names_and_same_origin_websockets() {
    let t = TestServer::with(Options {
        token: false,
        ..Options::default()
    })
    .await;
    let port = t.server.as_ref().unwrap().local_addr().port();
    let r = t
        .get("/v1/jobs")
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    for ok in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        let r = t
            .get("/v1/jobs")
            .header("host", ok.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{ok}");
    }
    let url = t.url("/v1/events/ws").replacen("http://", "ws://", 1);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://attacker.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        Err(e) => panic!("expected 403, got {e}"),
        Ok(_) => panic!("a cross-site WebSocket was accepted"),
    }
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_private_addresses_are_refused_by_default() {
    let t = TestServer::with(Options {
        config: ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            webhook_secret: Some("webhook-secret-0123456789".into()),
            ..ServerConfig::default()
        },
        ..Options::default()
    })
    .await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/",
        "http://localhost/x",
    ] {
        let r = t
            .post("/v1/jobs")
            .json(&json!({"workflow": comfyfleet_testkit::workflows::invert(), "webhook": url}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{url}");
        let e: Value = r.json().await.unwrap();
        assert!(e["message"].as_str().unwrap().contains("private"), "{e}");
    }
    let page: Value = t.get_json("/v1/jobs").await;
    assert!(
        page["jobs"].as_array().unwrap().is_empty(),
        "nothing stored"
    );
    t.shutdown().await;
}
