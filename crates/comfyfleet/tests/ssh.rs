//! A fleet with an SSH instance (`kind = "ssh"`): installs refresh the backend's catalogue at
//! once, and a workflow using the new nodes runs through the tunnel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use comfyfleet::core::install::{InstallSpec, InstallState, NodeSpec};
use comfyfleet::testkit::TestInstance;
use comfyfleet::{BackendConfig, Fleet, FleetConfig, JobSpec, JobState, SshInstance, Workflow};
use serde_json::json;

fn instance_config(inst: &TestInstance) -> SshInstance {
    let toml = format!(
        r#"
        id = "gpu-ssh"
        host = "127.0.0.1"
        port = {port}
        user = "{user}"
        key_file = "{key}"
        known_hosts = "{kh}"
        comfyui_dir = "{dir}"
        comfyui_port = {cport}
        python = ["{python}"]
        "#,
        port = inst.sshd.port(),
        user = inst.sshd.user(),
        key = inst.sshd.client_key_path().display(),
        kh = inst.sshd.write_known_hosts().unwrap().display(),
        dir = inst.comfy().display(),
        cport = inst.comfyui_port(),
        python = inst.python().display(),
    );
    use figment::providers::Format;
    figment::Figment::from(figment::providers::Toml::string(&toml))
        .extract()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_refreshes_the_catalogue_and_the_new_node_runs_over_ssh() {
    let inst = TestInstance::start().await.unwrap();
    let (url, _) = inst.pack("alpha-pack", &["AlphaNode"], None).unwrap();
    let fleet = Fleet::start(FleetConfig {
        store: "memory:".into(),
        backends: vec![BackendConfig::Ssh(instance_config(&inst))],
        ..FleetConfig::default()
    })
    .await
    .unwrap();
    let engine = fleet.engine().clone();
    let has_alpha = || {
        engine.backends().iter().any(|b| {
            b.id.as_str() == "gpu-ssh"
                && b.inventory
                    .node_classes
                    .as_ref()
                    .is_some_and(|c| c.contains("AlphaNode"))
        })
    };
    // the first catalogue is read at start; the next periodic refresh is minutes away
    for _ in 0..100 {
        if engine
            .backends()
            .iter()
            .any(|b| b.inventory.node_classes.is_some())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!has_alpha());

    let installer = fleet
        .installer()
        .expect("an installer for the ssh instance");
    assert_eq!(installer.instances(), vec!["gpu-ssh".to_owned()]);
    let started = installer
        .start(InstallSpec::new(
            "gpu-ssh",
            vec![NodeSpec {
                git: Some(url),
                ..NodeSpec::default()
            }],
        ))
        .await
        .unwrap();
    let done = installer.wait(started.id).await.unwrap();
    assert_eq!(done.state, InstallState::Succeeded, "{done:?}");
    for _ in 0..100 {
        if has_alpha() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(has_alpha(), "the install refreshed the routing catalogue");

    let workflow = Workflow::from_value(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "AlphaNode", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "alpha"}}
    }))
    .unwrap();
    let id = engine.submit(JobSpec::new(workflow)).await.unwrap();
    let job = tokio::time::timeout(Duration::from_secs(60), engine.wait_for(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.attempts[0].backend.as_str(), "gpu-ssh");
    fleet.shutdown().await;
}
