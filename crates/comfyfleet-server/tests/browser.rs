//! The dashboard in a real browser: headless Chromium driven through chromedriver (WebDriver),
//! against the server running in-process over a simulated ComfyUI.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (`cargo xtask setup` installs them). Set
//! `COMFYFLEET_SKIP_BROWSER=1` to skip this test on a machine without them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use comfyfleet::{BackendConfig, ComfyUiServer, Fleet, FleetConfig};
use comfyfleet_server::{Server, ServerConfig};
use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, SimConfig};
use comfyfleet_testkit::workflows;
use serde_json::{Value, json};
use thirtyfour::LoggingPrefsLogLevel;
use thirtyfour::prelude::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const TOKEN: &str = "secret-token";
const BACKEND: &str = "gpu-1";
/// Generous: the machine may be busy. Nothing below asserts how fast anything is.
const DEADLINE: Duration = Duration::from_secs(30);

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = Error> = std::result::Result<T, E>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(msg.into().into())
}

/// `chromedriver --port=N`, killed when dropped.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    async fn start() -> Result<ChromeDriver> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {CHROMEDRIVER}: {e}"))?;
        let driver = ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/status", driver.url)).send().await
                && r.status().is_success()
            {
                return Ok(driver);
            }
            if started.elapsed() > DEADLINE {
                return err(format!("chromedriver did not answer on {}", driver.url));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `probe` every 100 ms until it yields `Some`, for at most `limit`. Errors from a probe
/// (a stale element, a row not rendered yet) count as "not yet"; the last one is reported.
async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    let mut last = String::from("never true");
    loop {
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if started.elapsed() > limit {
            return err(format!(
                "timed out after {limit:?} waiting for {what} ({last})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the dashboard shows for one job row (read from the DOM in one round trip).
#[derive(Debug, Clone, Default)]
struct Row {
    state: String,
    percent: Option<f64>,
    node: String,
    eta: String,
    cancel_visible: bool,
}

async fn read_row(driver: &WebDriver, id: &str) -> Result<Option<Row>> {
    let ret = driver
        .execute(
            r#"
            const tr = document.querySelector(`tr[data-job-id="${arguments[0]}"]`);
            if (!tr) return null;
            const bar = tr.querySelector('.job-progress');
            const text = (sel) => { const e = tr.querySelector(sel); return e ? e.textContent : ''; };
            const force = tr.querySelector('.btn-force-cancel');
            return {
                state: tr.dataset.state || '',
                percent: bar ? bar.getAttribute('data-percent') : null,
                node: text('.job-node'),
                eta: text('.job-eta'),
                cancel_visible: !!(force && force.offsetParent !== null),
            };
            "#,
            vec![json!(id)],
        )
        .await?;
    let v = ret.json();
    if v.is_null() {
        return Ok(None);
    }
    Ok(Some(Row {
        state: v["state"].as_str().unwrap_or_default().to_owned(),
        percent: v["percent"].as_str().and_then(|p| p.parse().ok()),
        node: v["node"].as_str().unwrap_or_default().to_owned(),
        eta: v["eta"].as_str().unwrap_or_default().to_owned(),
        cancel_visible: v["cancel_visible"].as_bool().unwrap_or(false),
    }))
}

/// What the detail panel shows.
#[derive(Debug, Clone, Default)]
struct Detail {
    summary: String,
    attempt_backends: Vec<String>,
    timeline_bars: u64,
    artifact_links: Vec<String>,
    event_types: Vec<String>,
}

async fn read_detail(driver: &WebDriver) -> Result<Detail> {
    let ret = driver
        .execute(
            r#"
            const panel = document.getElementById('detail');
            if (!panel || panel.hidden) return null;
            const all = (sel) => Array.from(panel.querySelectorAll(sel));
            return {
                summary: document.getElementById('detail-summary').textContent,
                backends: all('#detail-attempts .attempt-backend').map((e) => e.textContent.trim()),
                bars: all('#detail-timeline .tl-bar').length,
                links: all('#detail-artifacts a').map((a) => a.getAttribute('href')),
                events: all('#detail-events .etype').map((e) => e.textContent.trim()),
            };
            "#,
            Vec::<Value>::new(),
        )
        .await?;
    let v = ret.json();
    if v.is_null() {
        return err("the detail panel is closed");
    }
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Detail {
        summary: v["summary"].as_str().unwrap_or_default().to_owned(),
        attempt_backends: strings("backends"),
        timeline_bars: v["bars"].as_u64().unwrap_or(0),
        artifact_links: strings("links"),
        event_types: strings("events"),
    })
}

/// The API, as the test sees it (bearer token included).
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let res = req.bearer_auth(TOKEN).send().await?;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return err(format!("API answered {status}: {body}"));
        }
        Ok(body)
    }

    async fn submit(&self, workflow: comfyfleet::Workflow, labels: Value) -> Result<String> {
        let body = json!({ "workflow": workflow, "labels": labels, "max_attempts": 1 });
        let r = self
            .send(self.http.post(format!("{}/v1/jobs", self.base)).json(&body))
            .await?;
        r["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no id in {r}").into())
    }

    async fn job(&self, id: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}/v1/jobs/{id}", self.base)))
            .await
    }
}

fn browser_missing() -> Option<String> {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    (!missing.is_empty()).then(|| missing.join(" and "))
}

/// Headless Chromium through a fresh chromedriver, with a profile of its own (dropped last).
async fn start_browser() -> (ChromeDriver, tempfile::TempDir, WebDriver) {
    let chromedriver = ChromeDriver::start().await.unwrap();
    let profile = tempfile::tempdir().unwrap();
    let mut caps = DesiredCapabilities::chrome();
    caps.set_binary(CHROMIUM).unwrap();
    for arg in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1440,1000",
    ] {
        caps.add_arg(arg).unwrap();
    }
    caps.add_arg(&format!("--user-data-dir={}", profile.path().display()))
        .unwrap();
    caps.set_browser_log_level(LoggingPrefsLogLevel::Warning)
        .unwrap();
    let driver = WebDriver::new(&chromedriver.url, caps).await.unwrap();
    (chromedriver, profile, driver)
}

/// Skips (with `COMFYFLEET_SKIP_BROWSER=1`) or fails when the browser is missing; `true`: run.
fn browser_present() -> bool {
    if let Some(missing) = browser_missing() {
        if std::env::var("COMFYFLEET_SKIP_BROWSER").is_ok_and(|v| v == "1") {
            eprintln!(
                "skipping the browser test: {missing} not installed (COMFYFLEET_SKIP_BROWSER=1)"
            );
            return false;
        }
        panic!(
            "{missing} not installed: run `cargo xtask setup` (installs Debian's chromium and \
             chromium-driver), or set COMFYFLEET_SKIP_BROWSER=1 to skip this test"
        );
    }
    true
}

/// Opens the dashboard and gives it the token.
async fn login(driver: &WebDriver, base: &str) -> Result<()> {
    driver.goto(format!("{base}/")).await?;
    let input = wait_until("the token prompt", DEADLINE, || async {
        let e = driver.find(By::Id("token-input")).await?;
        Ok(e.is_displayed().await?.then_some(e))
    })
    .await?;
    input.send_keys(TOKEN).await?;
    driver.find(By::Id("token-save")).await?.click().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_shows_live_progress_and_force_cancels_a_job() {
    if !browser_present() {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();

    // A simulated ComfyUI, 10x faster than real time: `sleep(600)` runs about a minute, far
    // longer than the test needs, with progress ticks all along.
    let sim = ComfyUiSim::start(SimConfig::scaled(0.1)).await.unwrap();
    let fleet = Fleet::start(FleetConfig {
        store: "memory:".into(),
        backends: vec![BackendConfig::ComfyUi(ComfyUiServer {
            id: BACKEND.into(),
            url: sim.base_url(),
            prefetch: 0,
            labels: Default::default(),
        })],
        ..FleetConfig::default()
    })
    .await
    .unwrap();
    let server = Server::start(
        fleet.engine().clone(),
        ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            tokens: vec![TOKEN.into()],
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let base = server.url().trim_end_matches('/').to_owned();
    let api = Api {
        http: reqwest::Client::new(),
        base: base.clone(),
    };

    let (chromedriver, _profile, driver) = start_browser().await;

    let started = Instant::now();
    let outcome = scenario(&driver, &api, &base).await;
    if outcome.is_err() {
        // Leave something to look at.
        let shot = shot_path("dashboard-failure.png");
        if driver.screenshot(&shot).await.is_ok() {
            eprintln!("screenshot of the failure: {}", shot.display());
        }
        let state = "return JSON.stringify({ lastEventId, conn: document.getElementById('conn').textContent, jobs: [...jobs.values()] })";
        if let Ok(r) = driver.execute(state, Vec::<Value>::new()).await {
            eprintln!("dashboard state: {}", r.json());
        }
        if let Ok(log) = driver.browser_log().await {
            for entry in log {
                eprintln!("browser {}: {}", entry.level, entry.message);
            }
        }
    }
    let _ = driver.quit().await;
    drop(chromedriver);
    server.shutdown().await;
    fleet.shutdown().await;
    drop(sim);
    if let Err(e) = outcome {
        panic!("{e}");
    }
    eprintln!("browser scenario took {:?}", started.elapsed());
}

fn shot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

async fn scenario(driver: &WebDriver, api: &Api, base: &str) -> Result<()> {
    // The server wants a token: the dashboard asks for it.
    login(driver, base).await?;

    // Connected: the backend card and the live stream.
    wait_until("the backend card", DEADLINE, || async {
        let cards = driver
            .find_all(By::Css(format!("[data-backend-id='{BACKEND}']")))
            .await?;
        Ok((!cards.is_empty()).then_some(()))
    })
    .await?;
    wait_until("the live event stream", DEADLINE, || async {
        let conn = driver.find(By::Id("conn")).await?;
        Ok((conn.attr("data-state").await?.as_deref() == Some("live")).then_some(()))
    })
    .await?;

    // A quick job appears live and succeeds; a finished job offers no cancel buttons.
    let quick = api
        .submit(workflows::invert(), json!({"test": "quick"}))
        .await?;
    let row = wait_until(
        "the quick job to succeed in the table",
        DEADLINE,
        || async {
            Ok(read_row(driver, &quick)
                .await?
                .filter(|r| r.state == "succeeded"))
        },
    )
    .await?;
    if row.cancel_visible {
        return err(format!(
            "a succeeded job still shows cancel buttons: {row:?}"
        ));
    }

    // A long job: its progress bar moves at least twice, with the running node named.
    let long = api
        .submit(workflows::sleep(600.0), json!({"test": "long"}))
        .await?;
    let seen = std::cell::RefCell::new(Vec::<f64>::new());
    let running = wait_until(
        "the long job's progress bar to move (three increasing values)",
        DEADLINE,
        || async {
            let Some(row) = read_row(driver, &long).await? else {
                return Ok(None);
            };
            let mut seen = seen.borrow_mut();
            if let Some(p) = row.percent
                && row.state == "running"
                && p > 0.0
                && seen.last().is_none_or(|last| p > *last)
            {
                seen.push(p);
            }
            Ok((seen.len() >= 3).then_some(row))
        },
    )
    .await?;
    let seen = seen.into_inner();
    eprintln!(
        "progress seen in the browser: {seen:?}; node {:?}, ETA {:?}",
        running.node, running.eta
    );
    if running.node.trim().is_empty() {
        return err(format!(
            "no node name shown for the running job: {running:?}"
        ));
    }
    if !(running.node.contains("TestSleep") || running.node.contains('2')) {
        return err(format!("unexpected node label: {running:?}"));
    }
    if !running.cancel_visible {
        return err(format!(
            "a running job shows no cancel buttons: {running:?}"
        ));
    }
    driver
        .screenshot(&shot_path("dashboard-running.png"))
        .await?;

    // Force cancel from the row's button.
    let row_css = format!("tr[data-job-id='{long}']");
    driver
        .find(By::Css(format!("{row_css} .btn-force-cancel")))
        .await?
        .click()
        .await?;
    wait_until("the long job's row to show cancelled", DEADLINE, || async {
        Ok(read_row(driver, &long)
            .await?
            .filter(|r| r.state == "cancelled"))
    })
    .await?;
    let job = api.job(&long).await?;
    if job["state"] != "cancelled" {
        return err(format!("the API says the job is {}", job["state"]));
    }

    // The detail panel of the cancelled job: its attempt on the backend, ended by the cancel.
    driver
        .find(By::Css(format!("{row_css} td.id")))
        .await?
        .click()
        .await?;
    wait_until(
        "the detail panel to list the attempt's backend",
        DEADLINE,
        || async {
            let d = read_detail(driver).await?;
            Ok((d.summary.contains(&long)
                && d.attempt_backends.iter().any(|b| b == BACKEND)
                && d.event_types.iter().any(|t| t == "cancelled"))
            .then_some(()))
        },
    )
    .await?;
    driver
        .screenshot(&shot_path("dashboard-cancelled.png"))
        .await?;

    // The quick job's panel: node timeline and a download link for its output.
    driver
        .find(By::Css(format!("tr[data-job-id='{quick}'] td.id")))
        .await?
        .click()
        .await?;
    let detail = wait_until(
        "the quick job's node timeline and artifact",
        DEADLINE,
        || async {
            let d = read_detail(driver).await?;
            Ok(
                (d.summary.contains(&quick) && d.timeline_bars > 0 && !d.artifact_links.is_empty())
                    .then_some(d),
            )
        },
    )
    .await?;
    let want = format!("/v1/jobs/{quick}/outputs/0");
    if !detail.artifact_links.iter().any(|l| l.ends_with(&want)) {
        return err(format!("no download link {want}: {detail:?}"));
    }
    if !detail.attempt_backends.iter().any(|b| b == BACKEND) {
        return err(format!(
            "the quick job's attempts do not list {BACKEND}: {detail:?}"
        ));
    }

    let shot = shot_path("dashboard.png");
    driver.screenshot(&shot).await?;
    println!("dashboard screenshot: {}", shot.display());
    Ok(())
}

/// What the dashboard shows for one install row.
async fn read_install_row(driver: &WebDriver, id: &str) -> Result<Option<Value>> {
    let ret = driver
        .execute(
            r#"
            const tr = document.querySelector(`tr.install-row[data-install-id="${arguments[0]}"]`);
            if (!tr) return null;
            const text = (sel) => { const e = tr.querySelector(sel); return e ? e.textContent : ''; };
            const cancel = tr.querySelector('.btn-install-cancel');
            const detail = document.querySelector(`tr.install-detail[data-install-id="${arguments[0]}"]`);
            return {
                state: tr.dataset.state || '',
                counts: text('.install-counts'),
                current: text('.install-current'),
                instance: text('.install-instance'),
                cancel_visible: !!(cancel && cancel.offsetParent !== null),
                nodes: detail ? [...detail.querySelectorAll('tr.install-node')].map((n) => n.dataset.status) : null,
                log: detail ? (detail.querySelector('.install-log') || {}).textContent || '' : null,
            };
            "#,
            vec![json!(id)],
        )
        .await?;
    let v = ret.json();
    Ok((!v.is_null()).then(|| v.clone()))
}

/// The Installs panel: an install started through the API appears, runs with its current pack
/// named, and is cancelled from its row; a second one reaches `succeeded` with `2/2` packs, and
/// its expanded row lists the packs and the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_follows_installs_and_cancels_one() {
    use comfyfleet::ssh_client::installer::{InstanceConfig, SshInstaller};
    use comfyfleet::ssh_client::{SshKey, SshSession, SshTarget};

    if !browser_present() {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let inst = comfyfleet_testkit::TestInstance::start().await.unwrap();
    let fleet = Fleet::start(FleetConfig {
        store: "memory:".into(),
        backends: vec![BackendConfig::ComfyUi(ComfyUiServer {
            id: BACKEND.into(),
            url: inst.sim.base_url(),
            prefetch: 0,
            labels: Default::default(),
        })],
        ..FleetConfig::default()
    })
    .await
    .unwrap();
    let mut config = InstanceConfig::new(BACKEND, inst.comfy().to_string_lossy().into_owned());
    config.python = vec![inst.python().to_string_lossy().into_owned()];
    config.comfyui_port = inst.comfyui_port();
    let mut target = SshTarget::new(
        "127.0.0.1",
        inst.sshd.port(),
        inst.sshd.user(),
        SshKey::File {
            path: inst.sshd.client_key_path(),
            passphrase: None,
        },
        inst.sshd.write_known_hosts().unwrap(),
    );
    target.connect_timeout = Duration::from_secs(10);
    let installer = SshInstaller::builder(std::sync::Arc::new(comfyfleet::MemoryStore::new()))
        .instance(config, SshSession::new(target))
        .build();
    let server = Server::start_with_installer(
        fleet.engine().clone(),
        Some(installer),
        ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            tokens: vec![TOKEN.into()],
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let base = server.url().trim_end_matches('/').to_owned();
    let api = Api {
        http: reqwest::Client::new(),
        base: base.clone(),
    };
    let (chromedriver, _profile, driver) = start_browser().await;

    let outcome = async {
        login(&driver, &base).await?;
        let (slow, _) = inst.pack("slow-pack", &["SlowNode"], Some("hang\n"))?;
        let (alpha, _) = inst.pack("alpha-pack", &["AlphaNode"], None)?;
        let (beta, _) = inst.pack("beta-pack", &["BetaNode"], Some("numpy\n"))?;
        let start = |nodes: Vec<&String>| {
            let body = json!({
                "instance": BACKEND,
                "nodes": nodes.iter().map(|g| json!({"git": g})).collect::<Vec<_>>(),
            });
            api.send(api.http.post(format!("{base}/v1/installs")).json(&body))
        };

        // A slow install: its row shows it running on the slow pack; Cancel stops it.
        let slow_id = start(vec![&slow]).await?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let row = wait_until("the slow install to show running", DEADLINE, || async {
            Ok(read_install_row(&driver, &slow_id).await?.filter(|r| {
                r["state"] == "running" && r["current"].as_str().unwrap_or("").contains("slow-pack")
            }))
        })
        .await?;
        if row["cancel_visible"] != true || row["instance"] != BACKEND {
            return err(format!("a running install row: {row}"));
        }
        driver
            .find(By::Css(format!(
                "tr.install-row[data-install-id='{slow_id}'] .btn-install-cancel"
            )))
            .await?
            .click()
            .await?;
        wait_until("the slow install to show cancelled", DEADLINE, || async {
            Ok(read_install_row(&driver, &slow_id)
                .await?
                .filter(|r| r["state"] == "cancelled" && r["cancel_visible"] == false))
        })
        .await?;

        // A quick one runs to the end; its expanded row lists the packs and the log.
        let quick_id = start(vec![&alpha, &beta]).await?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        wait_until(
            "the quick install to succeed with 2/2 packs",
            DEADLINE,
            || async {
                Ok(read_install_row(&driver, &quick_id)
                    .await?
                    .filter(|r| r["state"] == "succeeded" && r["counts"] == "2/2"))
            },
        )
        .await?;
        driver
            .find(By::Css(format!(
                "tr.install-row[data-install-id='{quick_id}'] td.id"
            )))
            .await?
            .click()
            .await?;
        wait_until("the expanded row's packs and log", DEADLINE, || async {
            Ok(read_install_row(&driver, &quick_id).await?.filter(|r| {
                r["nodes"] == json!(["succeeded", "succeeded"])
                    && r["log"]
                        .as_str()
                        .is_some_and(|l| l.contains("Successfully installed"))
            }))
        })
        .await?;
        driver
            .screenshot(&shot_path("dashboard-installs.png"))
            .await?;
        Ok::<(), Error>(())
    }
    .await;
    if outcome.is_err() {
        let shot = shot_path("dashboard-installs-failure.png");
        if driver.screenshot(&shot).await.is_ok() {
            eprintln!("screenshot of the failure: {}", shot.display());
        }
        if let Ok(log) = driver.browser_log().await {
            for entry in log {
                eprintln!("browser {}: {}", entry.level, entry.message);
            }
        }
    }
    let _ = driver.quit().await;
    drop(chromedriver);
    server.shutdown().await;
    fleet.shutdown().await;
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
