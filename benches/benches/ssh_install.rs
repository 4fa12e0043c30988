//! Custom-node installs over a real OpenSSH server on loopback: how soon a started install shows
//! progress, and what each streamed output line costs.
//!
//! Not a criterion bench (each sample is a whole install against sshd + git); it prints a
//! table. Measured with the `TestInstance` harness: Debian's sshd, git packs as `file://` repos,
//! a fake `pip` and the ComfyUI simulator loading the packs.
//!
//! * **start → first progress**: `SshInstaller::start` returns the queued record; the clock runs
//!   from just before that call to the first `node` event (the pack is being fetched) and to the
//!   first `output` line (git's first line), over a connection that is already up (warm) and
//!   over a fresh session that must connect and authenticate first (cold).
//! * **per-line overhead**: a requirements step that prints N lines. The same command run
//!   bare through `SshSession::run` is the baseline; the install's time from the
//!   `requirements` to the `installed` event includes parsing, log tail, events and store
//!   writes. Overhead per line = (install step − bare) / N, for the in-memory and SQLite stores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use comfyfleet_core::MemoryStore;
use comfyfleet_core::install::{InstallEventKind, InstallSpec, InstallStore, NodeSpec, NodeStatus};
use comfyfleet_ssh::installer::{InstanceConfig, SshInstaller};
use comfyfleet_ssh::{ExecOptions, SshKey, SshSession, SshTarget};
use comfyfleet_testkit::TestInstance;

fn session(inst: &TestInstance) -> SshSession {
    let kh = inst.sshd.write_known_hosts().unwrap();
    SshSession::new(SshTarget::new(
        "127.0.0.1",
        inst.sshd.port(),
        inst.sshd.user(),
        SshKey::File {
            path: inst.sshd.client_key_path(),
            passphrase: None,
        },
        kh,
    ))
}

fn installer(
    inst: &TestInstance,
    store: Arc<dyn InstallStore>,
    session: SshSession,
) -> SshInstaller {
    let mut c = InstanceConfig::new("gpu-1", inst.comfy().to_string_lossy().into_owned());
    c.python = vec![inst.python().to_string_lossy().into_owned()];
    c.comfyui_port = inst.comfyui_port();
    SshInstaller::builder(store).instance(c, session).build()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Time to the first `node` event and the first `output` line of one install.
async fn first_progress(installer: &SshInstaller, url: &str, name: &str) -> (Duration, Duration) {
    let mut rx = installer.subscribe();
    let t0 = Instant::now();
    let rec = installer
        .start(InstallSpec::new(
            "gpu-1",
            vec![NodeSpec {
                name: Some(name.to_owned()),
                git: Some(url.to_owned()),
                ..NodeSpec::default()
            }],
        ))
        .await
        .unwrap();
    let (mut node, mut line) = (None, None);
    while node.is_none() || line.is_none() {
        let ev = rx.recv().await.unwrap();
        if ev.install != rec.id {
            continue;
        }
        match ev.kind {
            InstallEventKind::Node { .. } if node.is_none() => node = Some(t0.elapsed()),
            InstallEventKind::Output { .. } if line.is_none() => line = Some(t0.elapsed()),
            InstallEventKind::Finished { .. } => break,
            _ => {}
        }
    }
    installer.wait(rec.id).await.unwrap();
    (node.unwrap(), line.unwrap_or_default())
}

async fn start_latency(inst: &TestInstance, url: &str) {
    const RUNS: usize = 15;
    let warm_session = session(inst);
    warm_session.client().await.unwrap();
    let warm = installer(inst, Arc::new(MemoryStore::new()), warm_session);
    let (mut wn, mut wl, mut cn, mut cl) = (vec![], vec![], vec![], vec![]);
    for i in 0..RUNS {
        let (n, l) = first_progress(&warm, url, &format!("warm-{i}")).await;
        wn.push(n);
        wl.push(l);
        let cold = installer(inst, Arc::new(MemoryStore::new()), session(inst));
        let (n, l) = first_progress(&cold, url, &format!("cold-{i}")).await;
        cn.push(n);
        cl.push(l);
    }
    println!("\nstart → first progress ({RUNS} installs each; median / p90)");
    println!("| connection | first `node` event | first `output` line |");
    println!("|---|---|---|");
    for (label, n, l) in [
        ("warm", &mut wn, &mut wl),
        ("cold (connect + auth)", &mut cn, &mut cl),
    ] {
        n.sort();
        l.sort();
        println!(
            "| {label} | {} / {} | {} / {} |",
            ms(pct(n, 0.5)),
            ms(pct(n, 0.9)),
            ms(pct(l, 0.5)),
            ms(pct(l, 0.9))
        );
    }
}

/// One round: the bare command's time and the install's requirements-step time.
async fn line_round(
    inst: &TestInstance,
    store: Arc<dyn InstallStore>,
    name: &str,
    lines: u32,
) -> (Duration, Duration) {
    let (url, _) = inst
        .pack(name, &["LinesNode"], Some(&format!("lines={lines}\n")))
        .unwrap();
    let s = session(inst);
    s.client().await.unwrap();
    // baseline: the same output through a bare exec on a PTY
    let script = format!("seq 1 {lines} | sed 's/^/Collecting line /'");
    let t0 = Instant::now();
    let out = s
        .run(
            &["sh".into(), "-c".into(), script],
            ExecOptions {
                pty: true,
                timeout: Some(Duration::from_secs(120)),
            },
        )
        .await
        .unwrap();
    let bare = t0.elapsed();
    assert_eq!(out.lines.len() as u32, lines);
    let installer = installer(inst, store, s);
    let mut rx = installer.subscribe();
    let rec = installer
        .start(InstallSpec::new(
            "gpu-1",
            vec![NodeSpec {
                git: Some(url),
                ..NodeSpec::default()
            }],
        ))
        .await
        .unwrap();
    let (mut from, mut to, mut seen) = (None, None, 0u64);
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                seen += n;
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        match ev.kind {
            InstallEventKind::Node { node, .. } if node.status == NodeStatus::Requirements => {
                from = Some(Instant::now())
            }
            InstallEventKind::Node { node, .. } if node.status == NodeStatus::Installed => {
                to = Some(Instant::now())
            }
            InstallEventKind::Output { .. } => seen += 1,
            InstallEventKind::Finished { .. } => break,
            _ => {}
        }
    }
    let done = installer.wait(rec.id).await.unwrap();
    assert!(seen >= u64::from(lines), "{seen} lines seen");
    assert_eq!(done.state, comfyfleet_core::InstallState::Succeeded);
    let stored = installer.events(rec.id, 0, 1_000_000).await.unwrap();
    assert!(stored.len() as u64 >= u64::from(lines), "every line stored");
    (bare, to.unwrap() - from.unwrap())
}

async fn line_overhead(
    inst: &TestInstance,
    mut store: impl FnMut() -> Arc<dyn InstallStore>,
    label: &str,
    lines: u32,
) {
    const ROUNDS: usize = 5;
    let (mut bare, mut step) = (vec![], vec![]);
    for r in 0..ROUNDS {
        let (b, s) = line_round(inst, store(), &format!("lines-{label}-{r}"), lines).await;
        bare.push(b);
        step.push(s);
    }
    bare.sort();
    step.sort();
    let (b, s) = (pct(&bare, 0.5), pct(&step, 0.5));
    let per_line = (s.as_secs_f64() - b.as_secs_f64()) * 1e6 / f64::from(lines);
    println!(
        "| {label} | {lines} | {} | {} | {per_line:.2} µs |",
        ms(b),
        ms(s),
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let inst = TestInstance::start().await.unwrap();
        let (url, _) = inst.pack("bench-pack", &["BenchNode"], None).unwrap();
        start_latency(&inst, &url).await;
        println!("\nper streamed line (a requirements step printing N lines; the install's step includes parsing, log tail, events and store writes)");
        println!("| store | N | bare exec (median of 5) | install step (median of 5) | overhead per line |");
        println!("|---|---|---|---|---|");
        const LINES: u32 = 50_000;
        line_overhead(&inst, || Arc::new(MemoryStore::new()), "memory", LINES).await;
        let dir = tempfile::tempdir().unwrap();
        let sqlite: Arc<dyn InstallStore> = Arc::new(
            comfyfleet_store_sqlite::SqliteStore::open(&dir.path().join("b.db"))
                .await
                .unwrap(),
        );
        line_overhead(&inst, || sqlite.clone(), "sqlite", LINES).await;
    });
}
