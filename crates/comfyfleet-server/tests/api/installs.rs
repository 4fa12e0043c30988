//! The install routes against a real `SshInstaller`: a loopback sshd, local git repos as packs,
//! a `ComfyUiSim` that loads the installed packs, and a fake Python (`TestInstance`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use comfyfleet::MemoryStore;
use comfyfleet::ssh_client::installer::{InstanceConfig, SshInstaller};
use comfyfleet::ssh_client::{SshKey, SshSession, SshTarget};
use comfyfleet_core::InstallId;
use comfyfleet_testkit::TestInstance;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Options, SseMsg, SseReader, TestServer};
use crate::routes::{Answer, Checks};

const SECRET: &str = "secret123";

/// A server whose installer drives one instance, `gpu-1`.
struct Rig {
    inst: TestInstance,
    t: TestServer,
}

impl Rig {
    async fn start() -> Rig {
        let inst = TestInstance::start().await.expect("test instance");
        let mut config = InstanceConfig::new("gpu-1", inst.comfy().to_string_lossy().into_owned());
        config.python = vec![inst.python().to_string_lossy().into_owned()];
        config.comfyui_port = inst.comfyui_port();
        config.restart_timeout = Duration::from_secs(30);
        config.step_timeout = Duration::from_secs(60);
        let known_hosts = inst.sshd.write_known_hosts().expect("known_hosts");
        let mut target = SshTarget::new(
            "127.0.0.1",
            inst.sshd.port(),
            inst.sshd.user(),
            SshKey::File {
                path: inst.sshd.client_key_path(),
                passphrase: None,
            },
            known_hosts,
        );
        target.connect_timeout = Duration::from_secs(10);
        let installer = SshInstaller::builder(Arc::new(MemoryStore::new()))
            .instance(config, SshSession::new(target))
            .flush_every(Duration::from_millis(20))
            .build();
        let t = TestServer::with(Options {
            installer: Some(installer),
            backends: 1,
            ..Options::default()
        })
        .await;
        Rig { inst, t }
    }

    fn pack(&self, name: &str, classes: &[&str], requirements: Option<&str>) -> (String, String) {
        self.inst.pack(name, classes, requirements).expect("pack")
    }

    /// `POST /v1/installs`; asserts 202 and returns the body.
    async fn start_install(&self, body: &Value) -> Value {
        let r = self.t.post("/v1/installs").json(body).send().await.unwrap();
        let status = r.status();
        let location = r
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        let id = v["id"].as_str().unwrap();
        assert_eq!(location.as_deref(), Some(&*format!("/v1/installs/{id}")));
        v
    }

    /// Polls `GET /v1/installs/{id}` until the install is finished.
    async fn wait_finished(&self, id: &str) -> Value {
        for _ in 0..1200 {
            let v = self.t.get_json(&format!("/v1/installs/{id}")).await;
            if ["succeeded", "failed", "cancelled"].contains(&v["state"].as_str().unwrap_or("")) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("install {id} did not finish within 60 s");
    }

    async fn stream(&self, id: &str, last_event_id: Option<u64>) -> reqwest::Response {
        let mut rb = self.t.get(&format!("/v1/installs/{id}/events"));
        if let Some(l) = last_event_id {
            rb = rb.header("last-event-id", l.to_string());
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        r
    }
}

/// Every message of a stream, to its end.
async fn read_all(r: reqwest::Response) -> Vec<SseMsg> {
    let mut reader = SseReader::new(r);
    let mut out = Vec::new();
    while let Some(m) = reader.next().await {
        out.push(m);
    }
    out
}

fn seqs(msgs: &[SseMsg]) -> Vec<u64> {
    msgs.iter()
        .filter(|m| m.event == "install")
        .map(|m| m.id.expect("an install event has an id"))
        .collect()
}

fn node(git: &str) -> Value {
    json!({ "git": git })
}

/// A model server on loopback: `/files/tiny.safetensors` and its SHA-256.
async fn model_server() -> (String, String) {
    use sha2::Digest;
    let body = b"model-bytes".repeat(100);
    let sha = format!("{:x}", sha2::Sha256::digest(&body));
    let app = axum::Router::new().route(
        "/files/tiny.safetensors",
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (
        format!("http://{addr}/files/tiny.safetensors?token={SECRET}"),
        sha,
    )
}

/// POST → 202, the install runs to `succeeded` with per-pack progress in `GET`; the SSE stream
/// from the start carries every event in order and ends after `finished`; a resumed stream
/// carries exactly the missed ones; the JSON page, the list, the inventory; the model URL's
/// token never shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_runs_to_succeeded_and_streams_its_events() {
    let rig = Rig::start().await;
    let t = &rig.t;
    let (alpha, alpha_head) = rig.pack(
        "alpha-pack",
        &["AlphaLoader", "AlphaSampler"],
        Some("numpy\n"),
    );
    let (beta, beta_head) = rig.pack("beta-pack", &["BetaNode"], None);
    let (model_url, sha) = model_server().await;
    let started = rig
        .start_install(&json!({
            "instance": "gpu-1",
            "nodes": [node(&alpha), node(&beta)],
            "models": [{"url": model_url, "folder": "checkpoints", "sha256": sha}],
        }))
        .await;
    let id = started["id"].as_str().unwrap().to_owned();
    assert_eq!(started["state"], "queued", "{started}");
    assert_eq!(
        started["counts"],
        json!({"total": 2, "processed": 0, "succeeded": 0, "failed": 0})
    );
    assert_eq!(started["nodes"][0]["name"], "alpha-pack");
    let mut bodies = vec![started.to_string()];

    // A stream from the start, and one dropped after three events and resumed.
    let full = tokio::spawn(read_all(rig.stream(&id, None).await));
    let mut early = SseReader::new(rig.stream(&id, None).await);
    let mut first = Vec::new();
    while first.len() < 3 {
        let m = early.next().await.expect("three events");
        if m.event == "install" {
            first.push(m);
        }
    }
    drop(early);
    assert_eq!(seqs(&first), vec![1, 2, 3]);
    let rest = read_all(rig.stream(&id, Some(3)).await).await;

    let done = rig.wait_finished(&id).await;
    bodies.push(done.to_string());
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        done["counts"],
        json!({"total": 2, "processed": 2, "succeeded": 2, "failed": 0})
    );
    let n0 = &done["nodes"][0];
    assert_eq!(n0["status"], "succeeded", "{n0}");
    assert_eq!(n0["commit"], alpha_head.as_str());
    assert_eq!(n0["requirements"], "installed");
    assert_eq!(n0["classes"], json!(["AlphaLoader", "AlphaSampler"]));
    assert_eq!(done["nodes"][1]["commit"], beta_head.as_str());
    assert_eq!(done["models"][0]["status"], "succeeded", "{done}");
    assert!(done["log_tail"].as_array().is_some_and(|l| !l.is_empty()));

    // The full stream: seq 1..=n without gaps, `created` first, `finished` last, then the end.
    let full = full.await.unwrap();
    let all = seqs(&full);
    let n = *all.last().unwrap();
    assert_eq!(all, (1..=n).collect::<Vec<_>>());
    let events: Vec<Value> = full
        .iter()
        .filter(|m| m.event == "install")
        .map(SseMsg::json)
        .collect();
    assert_eq!(events[0]["type"], "created");
    assert_eq!(events.last().unwrap()["type"], "finished");
    assert_eq!(events.last().unwrap()["state"], "succeeded");
    assert!(events.iter().all(|e| e["install"] == id.as_str()));
    // Packs are worked on in order: until the restart, node events never go back to a
    // previous pack; each pack's last event says `succeeded`.
    let restart = events
        .iter()
        .position(|e| e["type"] == "phase" && e["phase"] == "restarting")
        .expect("a restarting phase");
    let order: Vec<u64> = events[..restart]
        .iter()
        .filter(|e| e["type"] == "node")
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
    assert!(order.contains(&0) && order.contains(&1), "{order:?}");
    for i in 0..2u64 {
        let last = events
            .iter()
            .rev()
            .find(|e| e["type"] == "node" && e["index"] == i)
            .unwrap();
        assert_eq!(last["node"]["status"], "succeeded", "{last}");
    }
    // The resumed stream: exactly the events after 3.
    assert_eq!(seqs(&rest), (4..=n).collect::<Vec<_>>());

    // The JSON page: the same events, by ?format=json and by Accept.
    let page = t
        .get_json(&format!("/v1/installs/{id}/events?format=json"))
        .await;
    let page_events = page["events"].as_array().unwrap();
    assert_eq!(page_events, &events);
    let r = t
        .get(&format!("/v1/installs/{id}/events?after=3&limit=2"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let got: Vec<u64> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![4, 5]);
    bodies.push(page.to_string());
    // Resuming after `finished`: 204, nothing more will come.
    let r = t
        .get(&format!("/v1/installs/{id}/events"))
        .header("last-event-id", n.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = t
        .get(&format!("/v1/installs/{id}/events?after={}", n - 1))
        .send()
        .await
        .unwrap();
    let tail = read_all(r).await;
    assert_eq!(seqs(&tail), vec![n]);

    // The list and its filters.
    let list = t.get_json("/v1/installs").await;
    assert_eq!(list["installs"][0]["id"], id.as_str());
    assert_eq!(list["installs"][0]["counts"]["processed"], 2);
    bodies.push(list.to_string());
    for (q, want) in [
        ("?state=succeeded", 1),
        ("?state=queued,running", 0),
        ("?instance=gpu-1&limit=1", 1),
        ("?instance=gpu-9", 0),
        (&*format!("?before={id}"), 0),
    ] {
        let v = t.get_json(&format!("/v1/installs{q}")).await;
        assert_eq!(
            v["installs"].as_array().map(Vec::len),
            Some(want),
            "{q}: {v}"
        );
    }

    // The instance's inventory.
    let packs = t.get_json("/v1/instances/gpu-1/packs").await;
    let names: Vec<&str> = packs["packs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["alpha-pack", "beta-pack"], "{packs}");
    assert_eq!(packs["packs"][0]["commit"], alpha_head.as_str());
    assert_eq!(packs["packs"][0]["install"], id.as_str());

    // The token in the model URL never leaves the server.
    for m in full.iter().chain(&rest) {
        bodies.push(m.data.clone());
    }
    for b in &bodies {
        assert!(!b.contains(SECRET), "the model URL's token leaked: {b}");
    }
    assert!(
        done["spec"]["models"][0]["url"]
            .as_str()
            .unwrap()
            .ends_with("?***")
    );
    rig.t.shutdown().await;
}

/// A second install on a busy instance is 409 naming the first; cancel answers the final
/// `cancelled` record and kills the remote process; a second cancel is 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_instance_refuses_a_second_install_and_cancel_stops_the_first() {
    let rig = Rig::start().await;
    let t = &rig.t;
    let (slow, _) = rig.pack("slow-pack", &["SlowNode"], Some("hang\n"));
    let (quick, _) = rig.pack("quick-pack", &["QuickNode"], None);
    let first = rig
        .start_install(&json!({"instance": "gpu-1", "nodes": [node(&slow), node(&quick)]}))
        .await;
    let id = first["id"].as_str().unwrap().to_owned();
    let stream = tokio::spawn(read_all(rig.stream(&id, None).await));
    // Wait until the remote pip "build" runs.
    let pid_file = rig.inst.hang_pid();
    for _ in 0..600 {
        if pid_file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = std::fs::read_to_string(&pid_file)
        .expect("the hang started")
        .trim()
        .to_owned();

    let mut c = Checks::default();
    let r = t
        .post("/v1/installs")
        .json(&json!({"instance": "gpu-1", "nodes": [node(&quick)]}))
        .send()
        .await;
    if let Some(v) = c
        .error("a second install on gpu-1", r, 409, "conflict")
        .await
    {
        c.that(v["message"].as_str().unwrap().contains(&id), || {
            format!("{v}")
        });
        c.that(v["details"]["install"] == id.as_str(), || format!("{v}"));
    }
    let live = t.get_json(&format!("/v1/installs/{id}")).await;
    c.that(live["state"] == "running", || format!("{live}"));
    c.that(live["current"] == 0, || format!("{live}"));

    let r = t
        .post(&format!("/v1/installs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["state"], "cancelled", "{v}");
    assert_eq!(v["nodes"][0]["status"], "cancelled", "{v}");
    assert_eq!(v["nodes"][1]["status"], "cancelled", "{v}");
    assert_eq!(v["counts"]["total"], 2);
    for _ in 0..100 {
        if !comfyfleet_testkit::instance::pid_alive(&pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !comfyfleet_testkit::instance::pid_alive(&pid),
        "the remote pip was killed"
    );

    let r = t.post(&format!("/v1/installs/{id}/cancel")).send().await;
    if let Some(v) = c.error("a second cancel", r, 409, "conflict").await {
        c.that(v["details"]["state"] == "cancelled", || format!("{v}"));
    }
    let r = t
        .post(&format!("/v1/installs/{}/cancel", InstallId::new()))
        .send()
        .await;
    c.error("cancel of an unknown install", r, 404, "not_found")
        .await;

    // The stream ended with `finished: cancelled`.
    let msgs = stream.await.unwrap();
    let last = msgs.last().expect("events").json();
    c.that(
        last["type"] == "finished" && last["state"] == "cancelled",
        || format!("{last}"),
    );

    // The instance is free again.
    let again = rig
        .start_install(&json!({"instance": "gpu-1", "nodes": [node(&quick)]}))
        .await;
    let done = rig.wait_finished(again["id"].as_str().unwrap()).await;
    c.that(done["state"] == "succeeded", || format!("{done}"));
    c.finish("conflict and cancel");
    rig.t.shutdown().await;
}

/// Injection payloads and other invalid specs are 422 naming the field, and nothing is stored
/// or run; unknown ids are 404, malformed ones 400; the token is required.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_422_and_nothing_is_stored() {
    let rig = Rig::start().await;
    let t = &rig.t;
    let (good, _) = rig.pack("good-pack", &["GoodNode"], None);
    let pwned = rig.inst.root.path().join("pwned");
    let pwned = pwned.display();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "an option as git URL",
            json!({"instance": "gpu-1", "nodes": [{"name": "p", "git": format!("--upload-pack=touch {pwned}")}]}),
            "nodes[0].git",
        ),
        (
            "a transport helper",
            json!({"instance": "gpu-1", "nodes": [{"name": "p", "git": format!("ext::sh -c touch% {pwned}")}]}),
            "nodes[0].git",
        ),
        (
            "shell text in a URL",
            json!({"instance": "gpu-1", "nodes": [{"name": "p", "git": format!("{good}; touch {pwned}")}]}),
            "nodes[0].git",
        ),
        (
            "shell text as name",
            json!({"instance": "gpu-1", "nodes": [{"name": "a; rm -rf /", "git": good}]}),
            "nodes[0].name",
        ),
        (
            "a path as name",
            json!({"instance": "gpu-1", "nodes": [{"name": "../../etc", "git": good}]}),
            "nodes[0].name",
        ),
        (
            "a command substitution as rev",
            json!({"instance": "gpu-1", "nodes": [{"git": good, "rev": "$(id)"}]}),
            "nodes[0].rev",
        ),
        (
            "an option as rev",
            json!({"instance": "gpu-1", "nodes": [{"git": good, "rev": format!("--output={pwned}")}]}),
            "nodes[0].rev",
        ),
        (
            "backticks in a model URL",
            json!({"instance": "gpu-1", "models": [{"url": "https://h/`id`.bin", "folder": "checkpoints"}]}),
            "models[0].url",
        ),
        (
            "a model folder outside models/",
            json!({"instance": "gpu-1", "models": [{"url": "https://h/m.bin", "folder": "../../etc"}]}),
            "models[0].folder",
        ),
        ("nothing to install", json!({"instance": "gpu-1"}), "nodes"),
        (
            "a name the registry does not know",
            json!({"instance": "gpu-1", "nodes": [{"name": "nope"}]}),
            "nodes[0].name",
        ),
        (
            "an unknown instance",
            json!({"instance": "gpu-9", "nodes": [{"git": good}]}),
            "instance",
        ),
    ];
    let mut c = Checks::default();
    for (what, body, field) in &cases {
        let r = t.post("/v1/installs").json(body).send().await;
        if let Some(v) = c.error(what, r, 422, "invalid").await {
            c.that(v["details"]["field"] == *field, || format!("{what}: {v}"));
            c.that(
                v["message"]
                    .as_str()
                    .unwrap()
                    .contains(field.split('.').next().unwrap()),
                || format!("{what}: {v}"),
            );
        }
    }
    // Unknown fields are refused by the JSON shape (422), malformed JSON is 400.
    let r = t
        .post("/v1/installs")
        .json(&json!({"instance": "gpu-1", "nodes": [{"git": good, "post_install": "id"}]}))
        .send()
        .await;
    c.error("an unknown field", r, 422, "invalid").await;
    let r = t
        .post("/v1/installs")
        .header("content-type", "application/json")
        .body("{\"instance\":")
        .send()
        .await;
    c.error("truncated JSON", r, 400, "bad_request").await;
    let list = t.get_json("/v1/installs").await;
    c.that(list["installs"] == json!([]), || {
        format!("something was stored: {list}")
    });
    c.that(!rig.inst.root.path().join("pwned").exists(), || {
        "a payload ran".into()
    });

    // Unknown and malformed ids, bad queries.
    let unknown = InstallId::new();
    for path in [
        format!("/v1/installs/{unknown}"),
        format!("/v1/installs/{unknown}/events"),
        format!("/v1/installs/{unknown}/events?format=json"),
        "/v1/instances/gpu-9/packs".to_owned(),
    ] {
        c.error(
            &format!("GET {path}"),
            t.get(&path).send().await,
            404,
            "not_found",
        )
        .await;
    }
    for path in [
        "/v1/installs/not-a-uuid".to_owned(),
        "/v1/installs/123/events".to_owned(),
        "/v1/installs?limit=0".to_owned(),
        "/v1/installs?limit=1001".to_owned(),
        "/v1/installs?state=bogus".to_owned(),
        "/v1/installs?before=nope".to_owned(),
        "/v1/installs?zzz=1".to_owned(),
        format!("/v1/installs/{unknown}/events?format=xml"),
        format!("/v1/installs/{unknown}/events?limit=0"),
    ] {
        c.error(
            &format!("GET {path}"),
            t.get(&path).send().await,
            400,
            "bad_request",
        )
        .await;
    }
    let r = t
        .get(&format!("/v1/installs/{unknown}/events"))
        .header("last-event-id", "abc")
        .send()
        .await;
    c.error("Last-Event-ID: abc", r, 400, "bad_request").await;
    let r = t.post("/v1/installs/not-a-uuid/cancel").send().await;
    c.error("cancel of a malformed id", r, 400, "bad_request")
        .await;

    // 401 without the token.
    for (m, path) in [
        ("POST", "/v1/installs".to_owned()),
        ("GET", "/v1/installs".to_owned()),
        ("GET", format!("/v1/installs/{unknown}")),
        ("GET", format!("/v1/installs/{unknown}/events")),
        ("POST", format!("/v1/installs/{unknown}/cancel")),
        ("GET", "/v1/instances/gpu-1/packs".to_owned()),
    ] {
        let mut rb = t.http.request(m.parse().unwrap(), t.url(&path));
        if m == "POST" {
            rb = rb.json(&json!({"instance": "gpu-1", "nodes": [{"git": good}]}));
        }
        c.error(
            &format!("{m} {path} without a token"),
            rb.send().await,
            401,
            "unauthorized",
        )
        .await;
    }
    let list = t.get_json("/v1/installs").await;
    c.that(list["installs"] == json!([]), || {
        format!("something was stored: {list}")
    });
    let packs = t.get_json("/v1/instances/gpu-1/packs").await;
    c.that(packs == json!({"packs": []}), || format!("{packs}"));
    c.finish("invalid installs");
    rig.t.shutdown().await;
}

/// A server without an installer answers as for a fleet without SSH instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_installer_every_instance_is_unknown() {
    let t = TestServer::start().await;
    let mut c = Checks::default();
    let r = t
        .post("/v1/installs")
        .json(&json!({"instance": "gpu-0", "nodes": [{"git": "https://example.com/a.git"}]}))
        .send()
        .await;
    if let Some(v) = c.error("a valid install", r, 422, "invalid").await {
        c.that(v["details"]["field"] == "instance", || format!("{v}"));
        c.that(
            v["message"].as_str().unwrap().contains("unknown instance"),
            || format!("{v}"),
        );
    }
    let r = t
        .post("/v1/installs")
        .json(&json!({"instance": "gpu-0", "nodes": [{"name": "a; rm -rf /"}]}))
        .send()
        .await;
    if let Some(v) = c.error("an invalid install", r, 422, "invalid").await {
        c.that(v["details"]["field"] == "nodes[0].name", || format!("{v}"));
    }
    let list = Answer::read(t.get("/v1/installs").send().await.unwrap()).await;
    c.that(
        list.status == 200 && list.text == r#"{"installs":[]}"#,
        || format!("{list:?}"),
    );
    let id = InstallId::new();
    for path in [
        format!("/v1/installs/{id}"),
        format!("/v1/installs/{id}/events"),
        "/v1/instances/gpu-0/packs".to_owned(),
    ] {
        c.error(&path, t.get(&path).send().await, 404, "not_found")
            .await;
    }
    let r = t.post(&format!("/v1/installs/{id}/cancel")).send().await;
    c.error("cancel", r, 404, "not_found").await;
    c.finish("no installer");
    t.shutdown().await;
}
