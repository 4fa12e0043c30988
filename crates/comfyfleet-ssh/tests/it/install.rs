//! `SshInstaller` against a real sshd, local git repos as packs and a `ComfyUiSim` that loads
//! the installed packs' classes from its `custom_nodes` folder.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use comfyfleet_core::install::{
    InstallEventKind, InstallPhase, InstallRecord, InstallSpec, InstallState, InstallStore,
    ModelSpec, NodeProgress, NodeSpec, NodeStatus, RequirementsStatus,
};
use comfyfleet_core::{InstallId, MemoryStore, StoreError};
use comfyfleet_ssh::SshSession;
use comfyfleet_ssh::installer::{InstallError, InstanceConfig, Registry, SshInstaller};
use comfyfleet_testkit::TestInstance;

use super::*;

/// The instance harness plus how this crate talks to it.
pub(crate) struct Instance(pub TestInstance);

impl std::ops::Deref for Instance {
    type Target = TestInstance;
    fn deref(&self) -> &TestInstance {
        &self.0
    }
}

impl Instance {
    pub async fn start() -> Instance {
        Instance(TestInstance::start().await.unwrap())
    }

    pub fn config(&self, name: &str) -> InstanceConfig {
        let mut c = InstanceConfig::new(name, self.comfy().to_string_lossy().into_owned());
        c.python = vec![self.python().to_string_lossy().into_owned()];
        c.comfyui_port = self.comfyui_port();
        c.restart_timeout = Duration::from_secs(30);
        c.step_timeout = Duration::from_secs(60);
        c
    }

    pub fn session(&self) -> SshSession {
        let kh = self.sshd.write_known_hosts().unwrap();
        SshSession::new(target(&self.sshd, kh))
    }

    pub fn installer(&self, store: Arc<dyn InstallStore>) -> SshInstaller {
        SshInstaller::builder(store)
            .instance(self.config("gpu-1"), self.session())
            .build()
    }

    pub fn pack(
        &self,
        name: &str,
        classes: &[&str],
        requirements: Option<&str>,
    ) -> (String, String) {
        self.0.pack(name, classes, requirements).unwrap()
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    comfyfleet_testkit::instance::git(dir, args).unwrap()
}

fn node(url: &str, rev: Option<&str>) -> NodeSpec {
    NodeSpec {
        git: Some(url.to_owned()),
        rev: rev.map(str::to_owned),
        ..NodeSpec::default()
    }
}

use comfyfleet_testkit::instance::pid_alive;

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packs_install_with_per_node_progress_and_verification() {
    let inst = Instance::start().await;
    // like the real ComfyUI-Manager: the process is replaced before it answers
    inst.sim.faults().set_reboot_without_response(true);
    let (alpha, alpha_head) = inst.pack(
        "alpha-pack",
        &["AlphaLoader", "AlphaSampler"],
        Some("numpy\n"),
    );
    let (beta, _) = inst.pack("beta-pack", &["BetaNode"], None);
    let (empty, _) = inst.pack("empty-pack", &[], None);
    let (broken, _) = inst.pack("broken-pack", &["BrokenNode"], Some("fail-me\n"));
    let (liar, _) = inst.pack("liar-pack", &["LiarNode"], Some("lie\n"));
    let store = Arc::new(MemoryStore::new());
    let installer = inst.installer(store.clone());
    let mut live = installer.subscribe();

    let spec = InstallSpec::new(
        "gpu-1",
        vec![
            node(&alpha, Some(&alpha_head)),
            node(&broken, None),
            node(&beta, Some("main")),
            node(&empty, None),
            node(&liar, None),
        ],
    );
    let started = installer.start(spec.clone()).await.unwrap();
    assert_eq!(started.state, InstallState::Queued);
    let done = installer.wait(started.id).await.unwrap();

    let by_name: BTreeMap<&str, _> = done.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let alpha_n = by_name["alpha-pack"];
    assert_eq!(alpha_n.status, NodeStatus::Succeeded, "{alpha_n:?}");
    assert_eq!(alpha_n.classes, vec!["AlphaLoader", "AlphaSampler"]);
    assert_eq!(alpha_n.commit.as_deref(), Some(alpha_head.as_str()));
    assert_eq!(alpha_n.requirements, RequirementsStatus::Installed);
    assert_eq!(by_name["beta-pack"].status, NodeStatus::Succeeded);
    assert_eq!(by_name["beta-pack"].requirements, RequirementsStatus::None);
    // installed, but ComfyUI loaded nothing from it
    let e = by_name["empty-pack"];
    assert_eq!(e.status, NodeStatus::Failed);
    assert!(
        e.error
            .as_deref()
            .unwrap()
            .contains("loaded no node classes"),
        "{e:?}"
    );
    // a failing pack is reported, and the packs after it still installed
    let b = by_name["broken-pack"];
    assert_eq!(b.status, NodeStatus::Failed);
    assert_eq!(b.requirements, RequirementsStatus::Failed);
    assert!(
        b.error
            .as_deref()
            .unwrap()
            .contains("No matching distribution found for fail-me"),
        "{b:?}"
    );
    // pip said ERROR but exited 0: not trusted
    let l = by_name["liar-pack"];
    assert_eq!(l.status, NodeStatus::Failed, "{l:?}");
    assert_eq!(done.state, InstallState::Failed);
    assert_eq!(done.error.as_deref(), Some("3 of 5 packs failed"));
    assert_eq!(inst.sim.stats().restarts, 1);

    // the simulator really loaded them
    let classes = inst.sim.node_classes();
    assert!(
        classes.contains(&"AlphaSampler".to_owned()) && classes.contains(&"BetaNode".to_owned())
    );

    // per-node progress, live, in order: fetching → requirements → installed → succeeded
    let mut statuses: BTreeMap<usize, Vec<NodeStatus>> = BTreeMap::new();
    let mut lines = 0;
    let mut finished = None;
    while finished.is_none() {
        let ev = tokio::time::timeout(Duration::from_secs(10), live.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev.install, started.id);
        match ev.kind {
            InstallEventKind::Node { index, node } => {
                statuses.entry(index).or_default().push(node.status)
            }
            InstallEventKind::Output { .. } => lines += 1,
            InstallEventKind::Finished { state, .. } => finished = Some(state),
            _ => {}
        }
    }
    use NodeStatus::*;
    assert_eq!(
        statuses[&0],
        vec![Fetching, Requirements, Installed, Succeeded]
    );
    assert_eq!(statuses[&1], vec![Fetching, Requirements, Failed]);
    assert_eq!(
        statuses[&3],
        vec![Fetching, Requirements, Installed, Failed]
    );
    assert!(lines >= 5, "output lines were streamed ({lines})");
    assert_eq!(finished, Some(InstallState::Failed));
    // the stored events are the same, gapless from 1
    let stored = installer.events(started.id, 0, 10_000).await.unwrap();
    assert!(
        stored
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == i as u64 + 1)
    );
    assert!(stored.iter().any(|e| matches!(&e.kind, InstallEventKind::Output { line, .. } if line.contains("Successfully installed numpy"))));

    // the instance's inventory records the verified packs
    let inv = installer.inventory("gpu-1").await.unwrap();
    assert_eq!(
        inv.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        vec!["alpha-pack", "beta-pack"]
    );

    // a second install of a pinned pack is idempotent: nothing fetched, no restart
    let again = installer
        .start(InstallSpec::new(
            "gpu-1",
            vec![node(&alpha, Some(&alpha_head))],
        ))
        .await
        .unwrap();
    let again = installer.wait(again.id).await.unwrap();
    assert_eq!(again.state, InstallState::Succeeded, "{again:?}");
    assert!(again.nodes[0].already_present);
    assert_eq!(inst.sim.stats().restarts, 1, "nothing changed, no restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_remote_process_and_a_second_install_is_refused() {
    let inst = Instance::start().await;
    let (slow, _) = inst.pack("slow-pack", &["SlowNode"], Some("hang\n"));
    let (other, _) = inst.pack("other-pack", &["OtherNode"], None);
    let installer = inst.installer(Arc::new(MemoryStore::new()));
    let first = installer
        .start(InstallSpec::new(
            "gpu-1",
            vec![node(&slow, None), node(&other, None)],
        ))
        .await
        .unwrap();
    let pid_file = inst.hang_pid();
    wait_for("the remote pip to start", || pid_file.exists()).await;
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(pid_alive(&pid));

    // one install per instance at a time
    let dup = installer
        .start(InstallSpec::new("gpu-1", vec![node(&other, None)]))
        .await
        .unwrap_err();
    assert!(matches!(dup, InstallError::Conflict(_)), "{dup}");
    assert!(dup.to_string().contains(&first.id.to_string()), "{dup}");

    let cancelled = installer.cancel(first.id).await.unwrap();
    assert_eq!(cancelled.state, InstallState::Cancelled);
    assert_eq!(cancelled.nodes[0].status, NodeStatus::Cancelled);
    assert_eq!(cancelled.nodes[1].status, NodeStatus::Cancelled);
    wait_for("the remote process to die", || !pid_alive(&pid)).await;
    assert!(
        !inst.comfy().join("custom_nodes/other-pack").exists(),
        "nothing ran after cancel"
    );

    // finished: cancel again is refused, and the instance is free again
    assert!(matches!(
        installer.cancel(first.id).await,
        Err(InstallError::Finished { .. })
    ));
    let next = installer
        .start(InstallSpec::new("gpu-1", vec![node(&other, None)]))
        .await
        .unwrap();
    assert_eq!(
        installer.wait(next.id).await.unwrap().state,
        InstallState::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_restart_mid_install_ends_in_the_true_final_state() {
    let inst = Instance::start().await;
    let (slow, _) = inst.pack("slow-pack", &["SlowNode"], Some("hang\n"));
    let (fast, _) = inst.pack("fast-pack", &["FastNode"], None);
    // The store outlives the orchestrator (a SQLite file in production; its durability across
    // processes is the SQLite store's own test).
    let store = Arc::new(MemoryStore::new());
    let installer = inst.installer(store.clone());
    let id: InstallId = installer
        .start(InstallSpec::new(
            "gpu-1",
            vec![node(&fast, None), node(&slow, None)],
        ))
        .await
        .unwrap()
        .id;
    let pid_file = inst.hang_pid();
    wait_for("the slow pack's pip to start", || pid_file.exists()).await;
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();

    // the orchestrator goes away mid-install: its work stops, the record stays `running`
    installer.shutdown();
    drop(installer);
    wait_for(
        "the orphaned remote command to die with its connection",
        || !pid_alive(&pid),
    )
    .await;
    // the pack would now install fine
    std::fs::write(
        inst.root.path().join("repos/slow-pack/requirements.txt"),
        "numpy\n",
    )
    .unwrap();
    git(
        &inst.root.path().join("repos/slow-pack"),
        &["commit", "-qam", "no hang"],
    );

    let before = store.get_install(id).await.unwrap().unwrap();
    assert_eq!(before.state, InstallState::Running);
    assert_eq!(
        before.nodes[0].status,
        NodeStatus::Installed,
        "finished pack kept: {before:?}"
    );
    let installer = inst.installer(store.clone());
    assert_eq!(installer.recover().await.unwrap(), vec![id]);
    let done = installer.wait(id).await.unwrap();
    assert_eq!(done.state, InstallState::Succeeded, "{done:?}");
    assert_eq!(done.resumed, 1);
    assert!(done.nodes.iter().all(|n| n.status == NodeStatus::Succeeded));
    let events = installer.events(id, 0, 10_000).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e.kind, InstallEventKind::Resumed { count: 1 }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_download_and_registry_names_resolve() {
    let inst = Instance::start().await;
    let (gamma, _) = inst.pack("gamma-pack", &["GammaNode"], None);
    // a model server on loopback
    let body = b"model-bytes".repeat(1000);
    let sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&body))
    };
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
    let registry = Registry::from_json(&format!(
        r#"{{"packs": {{"gamma-pack": {{"git": "{gamma}", "classes": ["GammaNode"]}}}}}}"#
    ))
    .unwrap();
    let installer = SshInstaller::builder(Arc::new(MemoryStore::new()))
        .instance(inst.config("gpu-1"), inst.session())
        .registry(registry)
        .build();
    let mut spec = InstallSpec::new(
        "gpu-1",
        vec![NodeSpec {
            name: Some("gamma-pack".into()),
            ..NodeSpec::default()
        }],
    );
    spec.models = vec![ModelSpec {
        url: format!("http://{addr}/files/tiny.safetensors?token=secret123"),
        folder: "checkpoints".into(),
        filename: None,
        sha256: Some(sha),
    }];
    let done = installer.start(spec.clone()).await.unwrap();
    let done = installer.wait(done.id).await.unwrap();
    assert_eq!(done.state, InstallState::Succeeded, "{done:?}");
    assert_eq!(done.nodes[0].expected_classes, vec!["GammaNode"]);
    assert!(
        inst.comfy()
            .join("models/checkpoints/tiny.safetensors")
            .exists()
    );
    assert!(
        !serde_json::to_string(&done.redacted())
            .unwrap()
            .contains("secret123"),
        "the token never shows"
    );
    let events =
        serde_json::to_string(&installer.events(done.id, 0, 10_000).await.unwrap()).unwrap();
    assert!(!events.contains("secret123"), "nor in events");
    // unknown registry names are refused before anything runs
    let err = installer
        .start(InstallSpec::new(
            "gpu-1",
            vec![NodeSpec {
                name: Some("nope".into()),
                ..NodeSpec::default()
            }],
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, InstallError::UnknownPack { .. }), "{err}");
    let err = installer
        .start(InstallSpec::new(
            "gpu-9",
            vec![node("https://h/a.git", None)],
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, InstallError::UnknownInstance(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_payloads_never_run() {
    let inst = Instance::start().await;
    let installer = inst.installer(Arc::new(MemoryStore::new()));
    let canary = inst.root.path().join("pwned");
    let c = canary.display().to_string();
    let (good, _) = inst.pack("good-pack", &["GoodNode"], None);
    let mut accepted = 0;
    let payloads = [
        format!("; touch {c}"),
        format!("$(touch {c})"),
        format!("`touch {c}`"),
        format!("x\ntouch {c}"),
        format!("--upload-pack=touch {c}"),
        format!("-u touch {c}"),
        "--output=/tmp/x".to_owned(),
        format!("ext::sh -c touch% {c}"),
        format!("a || touch {c}"),
        format!("a && touch {c} #"),
        format!("x' ; touch {c}; '"),
        "../../etc".to_owned(),
    ];
    for p in &payloads {
        let specs = [
            NodeSpec {
                name: Some(p.clone()),
                git: Some(good.clone()),
                ..NodeSpec::default()
            },
            NodeSpec {
                git: Some(p.clone()),
                name: Some("x".into()),
                ..NodeSpec::default()
            },
            NodeSpec {
                git: Some(format!("{good}{p}")),
                name: Some("x".into()),
                ..NodeSpec::default()
            },
            NodeSpec {
                git: Some(good.clone()),
                rev: Some(p.clone()),
                ..NodeSpec::default()
            },
            NodeSpec {
                git: Some(good.clone()),
                classes: vec![format!("{p}\u{7}")],
                ..NodeSpec::default()
            },
        ];
        for (i, n) in specs.into_iter().enumerate() {
            match installer.start(InstallSpec::new("gpu-1", vec![n])).await {
                Err(err) => {
                    assert!(
                        matches!(err, InstallError::InvalidSpec(_)),
                        "payload {p:?} in field {i}: {err}"
                    )
                }
                // Only a payload glued to a path without spaces or shell characters passes
                // (`…/good-pack--output=/tmp/x` is a valid, if odd, path): it is one argument
                // after `--`, so git only looks for that repository.
                Ok(r) => {
                    assert_eq!(i, 2, "payload {p:?} accepted in field {i}");
                    accepted += 1;
                    let done = installer.wait(r.id).await.unwrap();
                    assert_eq!(done.nodes[0].status, NodeStatus::Failed, "{done:?}");
                }
            }
        }
        let mut model = InstallSpec::new("gpu-1", vec![]);
        model.models = vec![ModelSpec {
            url: format!("http://127.0.0.1:1/m.bin{p}"),
            folder: p.clone(),
            filename: Some(p.clone()),
            sha256: None,
        }];
        assert!(installer.start(model).await.is_err(), "model payload {p:?}");
    }
    let listed = installer
        .list(&comfyfleet_core::InstallFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), accepted, "refused specs are never stored");
    // what passes validation is passed as arguments: a `$(…)`-looking but valid ref is only a
    // ref name git does not know
    let tricky = installer
        .start(InstallSpec::new(
            "gpu-1",
            vec![NodeSpec {
                git: Some(good.clone()),
                rev: Some("touch+pwned".into()),
                ..NodeSpec::default()
            }],
        ))
        .await
        .unwrap();
    let done = installer.wait(tricky.id).await.unwrap();
    assert_eq!(done.nodes[0].status, NodeStatus::Failed);
    assert!(
        done.nodes[0]
            .error
            .as_deref()
            .unwrap()
            .contains("not found"),
        "{:?}",
        done.nodes[0]
    );
    assert!(!canary.exists(), "a payload ran");
}

async fn install(installer: &SshInstaller, spec: InstallSpec) -> InstallRecord {
    let id = installer.start(spec).await.unwrap().id;
    installer.wait(id).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_ref_follows_the_remote_and_an_unchanged_pack_is_left_alone() {
    let inst = Instance::start().await;
    let (pinned, first) = inst.pack("moving-pack", &["MovingNode"], None);
    let (plain, _) = inst.pack("plain-pack", &["PlainNode"], Some("numpy\n"));
    let installer = inst.installer(Arc::new(MemoryStore::new()));
    let spec = InstallSpec::new(
        "gpu-1",
        vec![node(&pinned, Some("main")), node(&plain, None)],
    );
    let done = install(&installer, spec.clone()).await;
    assert_eq!(done.state, InstallState::Succeeded, "{done:?}");
    assert_eq!(done.nodes[0].commit.as_deref(), Some(first.as_str()));
    assert_eq!(inst.sim.stats().restarts, 1);

    // Nothing moved: a branch and the default branch are fetched, found unchanged, and neither
    // pip nor a restart runs.
    let again = install(&installer, spec.clone()).await;
    assert_eq!(again.state, InstallState::Succeeded, "{again:?}");
    assert!(again.nodes.iter().all(|n| n.already_present), "{again:?}");
    assert_eq!(inst.sim.stats().restarts, 1, "nothing changed, no restart");

    // The branch moves upstream: the next install checks out its new head (it used to resolve
    // the clone's stale local branch and report the old commit as present).
    let repo = inst.root.path().join("repos/moving-pack");
    std::fs::write(
        repo.join("__init__.py"),
        "NODE_CLASS_MAPPINGS = {\n    \"MovingNode\": object,\n    \"MovedNode\": object,\n}\n",
    )
    .unwrap();
    git(&repo, &["commit", "-qam", "moved"]);
    let second = git(&repo, &["rev-parse", "HEAD"]);
    let moved = install(&installer, spec).await;
    assert_eq!(moved.state, InstallState::Succeeded, "{moved:?}");
    assert_eq!(moved.nodes[0].commit.as_deref(), Some(second.as_str()));
    assert!(!moved.nodes[0].already_present);
    assert!(moved.nodes[0].classes.contains(&"MovedNode".to_owned()));
    assert_eq!(inst.sim.stats().restarts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_url_with_another_default_branch_is_followed() {
    let inst = Instance::start().await;
    let (first, _) = inst.pack("src-a", &["SourceNode"], None);
    let (second, _) = inst.pack("src-b", &["SourceNode", "ForkNode"], None);
    git(
        &inst.root.path().join("repos/src-b"),
        &["branch", "-m", "main", "trunk"],
    );
    let installer = inst.installer(Arc::new(MemoryStore::new()));
    let named = |url: &str| NodeSpec {
        name: Some("source-pack".into()),
        git: Some(url.to_owned()),
        ..NodeSpec::default()
    };
    let done = install(&installer, InstallSpec::new("gpu-1", vec![named(&first)])).await;
    assert_eq!(done.state, InstallState::Succeeded, "{done:?}");
    // The fork's default branch is `trunk`; `origin/HEAD` from the first clone named `main`.
    let done = install(&installer, InstallSpec::new("gpu-1", vec![named(&second)])).await;
    assert_eq!(done.state, InstallState::Succeeded, "{done:?}");
    assert!(done.nodes[0].classes.contains(&"ForkNode".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_install_restarts_for_packs_installed_before_the_crash() {
    let inst = Instance::start().await;
    let (url, head) = inst.pack("early-pack", &["EarlyNode"], None);
    // What an orchestrator that died between the packs and the restart left behind: the pack
    // checked out and recorded `installed`, ComfyUI not restarted yet.
    git(
        &inst.comfy().join("custom_nodes"),
        &["clone", "-q", &url, "early-pack"],
    );
    let store = Arc::new(MemoryStore::new());
    let spec = InstallSpec::new("gpu-1", vec![node(&url, None)]);
    let progress = NodeProgress {
        name: "early-pack".into(),
        git: url.clone(),
        rev: None,
        status: NodeStatus::Installed,
        requirements: RequirementsStatus::None,
        commit: Some(head),
        already_present: false,
        expected_classes: vec![],
        classes: vec![],
        error: None,
    };
    let mut record = InstallRecord::new(
        InstallId::new(),
        spec,
        vec![progress],
        comfyfleet_core::Timestamp::from_millis(0),
    );
    record.state = InstallState::Running;
    record.phase = InstallPhase::Nodes;
    store.create_install(&record).await.unwrap();

    let installer = inst.installer(store.clone());
    assert_eq!(installer.recover().await.unwrap(), vec![record.id]);
    let done = installer.wait(record.id).await.unwrap();
    assert_eq!(done.state, InstallState::Succeeded, "{done:?}");
    assert_eq!(inst.sim.stats().restarts, 1, "the restart was not skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_restart_comfyui_is_left_alone_and_packs_stay_installed() {
    let inst = Instance::start().await;
    let (url, _) = inst.pack("quiet-pack", &["QuietNode"], None);
    let installer = inst.installer(Arc::new(MemoryStore::new()));
    let mut spec = InstallSpec::new("gpu-1", vec![node(&url, None)]);
    spec.restart = false;
    let done = install(&installer, spec).await;
    assert_eq!(inst.sim.stats().restarts, 0, "ComfyUI was restarted");
    assert_eq!(done.nodes[0].status, NodeStatus::Installed, "{done:?}");
    assert_eq!(done.state, InstallState::Succeeded, "{done:?}");
    assert_eq!(done.error, None);
    assert!(
        installer.inventory("gpu-1").await.unwrap().is_empty(),
        "unverified packs are not recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_classes_must_come_from_the_pack_itself() {
    let inst = Instance::start().await;
    let (other, _) = inst.pack("other-pack", &["SharedNode"], None);
    let (own, _) = inst.pack("own-pack", &["OwnNode"], None);
    let installer = inst.installer(Arc::new(MemoryStore::new()));
    let done = install(
        &installer,
        InstallSpec::new(
            "gpu-1",
            vec![
                node(&other, None),
                NodeSpec {
                    classes: vec!["SharedNode".into()],
                    ..node(&own, None)
                },
            ],
        ),
    )
    .await;
    assert_eq!(done.nodes[0].status, NodeStatus::Succeeded);
    assert_eq!(done.nodes[1].status, NodeStatus::Failed, "{done:?}");
}

/// A store whose install updates fail while `fail` is set.
struct FlakyStore {
    inner: MemoryStore,
    fail: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl InstallStore for FlakyStore {
    async fn create_install(
        &self,
        record: &InstallRecord,
    ) -> Result<comfyfleet_core::install::InstallEvent, StoreError> {
        self.inner.create_install(record).await
    }
    async fn get_install(&self, id: InstallId) -> Result<Option<InstallRecord>, StoreError> {
        self.inner.get_install(id).await
    }
    async fn list_installs(
        &self,
        filter: &comfyfleet_core::InstallFilter,
    ) -> Result<Vec<InstallRecord>, StoreError> {
        self.inner.list_installs(filter).await
    }
    async fn update_install(
        &self,
        record: &InstallRecord,
        events: &[InstallEventKind],
    ) -> Result<Vec<comfyfleet_core::install::InstallEvent>, StoreError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Backend("injected".into()));
        }
        self.inner.update_install(record, events).await
    }
    async fn install_events(
        &self,
        id: InstallId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<comfyfleet_core::install::InstallEvent>, StoreError> {
        self.inner.install_events(id, after, limit).await
    }
    async fn instance_packs(
        &self,
        instance: &str,
    ) -> Result<Vec<comfyfleet_core::install::InstalledPack>, StoreError> {
        self.inner.instance_packs(instance).await
    }
    async fn record_packs(
        &self,
        packs: &[comfyfleet_core::install::InstalledPack],
    ) -> Result<(), StoreError> {
        self.inner.record_packs(packs).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_returns_when_the_run_cannot_write_its_end() {
    let inst = Instance::start().await;
    let (slow, _) = inst.pack("slow-pack", &["SlowNode"], Some("hang\n"));
    let store = Arc::new(FlakyStore {
        inner: MemoryStore::new(),
        fail: false.into(),
    });
    let installer = inst.installer(store.clone());
    let id = installer
        .start(InstallSpec::new("gpu-1", vec![node(&slow, None)]))
        .await
        .unwrap()
        .id;
    let pid_file = inst.hang_pid();
    wait_for("the remote pip to start", || pid_file.exists()).await;
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();

    // The run cannot store its cancelled end: cancel reports that instead of waiting forever
    // for a terminal state nobody will write.
    store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let res = tokio::time::timeout(Duration::from_secs(20), installer.cancel(id))
        .await
        .expect("cancel hung");
    assert!(matches!(res, Err(InstallError::Store(_))), "{res:?}");
    wait_for("the remote process to die", || !pid_alive(&pid)).await;
    assert!(installer.running().is_empty());

    // Once the store works again, cancel settles it.
    store.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let cancelled = installer.cancel(id).await.unwrap();
    assert_eq!(cancelled.state, InstallState::Cancelled);
    assert_eq!(cancelled.nodes[0].status, NodeStatus::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_stay_in_the_checkout_or_the_events() {
    let inst = Instance::start().await;
    let (url, _) = inst.pack("private-pack", &["PrivateNode"], None);
    git(
        &inst.comfy().join("custom_nodes"),
        &["clone", "-q", &url, "private-pack"],
    );
    let installer = inst.installer(Arc::new(MemoryStore::new()));
    // The fetch fails (nothing listens there) after the URL was set on the checkout.
    let done = install(
        &installer,
        InstallSpec::new(
            "gpu-1",
            vec![NodeSpec {
                name: Some("private-pack".into()),
                git: Some("https://secret-token@127.0.0.1:1/private-pack.git".into()),
                ..NodeSpec::default()
            }],
        ),
    )
    .await;
    assert_eq!(done.nodes[0].status, NodeStatus::Failed, "{done:?}");
    let config =
        std::fs::read_to_string(inst.comfy().join("custom_nodes/private-pack/.git/config"))
            .unwrap();
    assert!(!config.contains("secret-token"), "{config}");
    assert!(
        config.contains("https://127.0.0.1:1/private-pack.git"),
        "{config}"
    );
    let events =
        serde_json::to_string(&installer.events(done.id, 0, 10_000).await.unwrap()).unwrap();
    assert!(!events.contains("secret-token"), "{events}");
    assert!(!format!("{:?}", done.redacted()).contains("secret-token"));
}
