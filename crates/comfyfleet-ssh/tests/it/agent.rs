//! Authentication through a real `ssh-agent`, started per test on a temp socket.

use super::*;

/// An `ssh-agent -D` on its own socket; killed on drop.
struct Agent {
    child: tokio::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = tokio::process::Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("ssh-agent (openssh-client; `cargo xtask setup`)");
        assert!(
            eventually(|| socket.exists()).await,
            "ssh-agent did not create {}",
            socket.display()
        );
        Agent {
            child,
            socket,
            _dir: dir,
        }
    }

    async fn add(&self, key: &std::path::Path) {
        let out = tokio::process::Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.socket)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "ssh-add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn key(&self) -> SshKey {
        SshKey::Agent {
            socket: Some(self.socket.clone()),
        }
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

#[tokio::test]
async fn agent_identity_authenticates() {
    let sshd = TestSshd::start().await.unwrap();
    let agent = Agent::start().await;
    // A stranger key first: the client must move on to the next identity.
    let dir = tempfile::tempdir().unwrap();
    let stranger = dir.path().join("stranger");
    keygen_ed25519(&stranger).unwrap();
    agent.add(&stranger).await;
    agent.add(&sshd.client_key_path()).await;

    let mut t = target(&sshd, sshd.write_known_hosts().unwrap());
    t.key = agent.key();
    let client = SshClient::connect(&t).await.unwrap();
    let out = client
        .run(&argv(&["echo", "via-agent"]), no_pty())
        .await
        .unwrap();
    assert_eq!(out.stdout(), ["via-agent"]);
    assert!(out.status.success());
    client.disconnect().await.unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn empty_agent_is_auth_failed() {
    let sshd = TestSshd::start().await.unwrap();
    let agent = Agent::start().await;
    let mut t = target(&sshd, sshd.write_known_hosts().unwrap());
    t.key = agent.key();
    let err = SshClient::connect(&t).await.unwrap_err();
    assert!(matches!(err, SshError::AuthFailed { .. }), "{err:?}");
    assert!(err.is_permanent());
    agent.stop().await;
}

#[tokio::test]
async fn missing_agent_socket_is_a_clear_error() {
    let sshd = TestSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-agent.sock");
    let mut t = target(&sshd, sshd.write_known_hosts().unwrap());
    t.key = SshKey::Agent {
        socket: Some(socket.clone()),
    };
    let err = SshClient::connect(&t).await.unwrap_err();
    assert!(matches!(err, SshError::Agent(_)), "{err:?}");
    assert!(err.is_permanent());
    let msg = err.to_string();
    assert!(msg.contains(&socket.display().to_string()), "{msg}");
    assert!(!msg.contains("PRIVATE"), "{msg}");
    // Fails before any network traffic: the server never saw a connection.
    assert!(!sshd.log().contains("Connection from"), "{}", sshd.log());
}

#[tokio::test]
async fn unreachable_agent_is_a_clear_error() {
    let sshd = TestSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on any more (an agent that died): connection refused.
    let socket = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut t = target(&sshd, sshd.write_known_hosts().unwrap());
    t.key = SshKey::Agent {
        socket: Some(socket),
    };
    let err = SshClient::connect(&t).await.unwrap_err();
    assert!(matches!(err, SshError::Agent(_)), "{err:?}");
}
