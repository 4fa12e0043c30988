use super::*;

#[tokio::test]
async fn connect_and_exec_echo() {
    let sshd = TestSshd::start().await.unwrap();
    let client = connected(&sshd).await;
    let out = client
        .run(&argv(&["echo", "hi"]), ExecOptions::default())
        .await
        .unwrap();
    assert_eq!(out.stdout(), ["hi"]);
    assert_eq!(out.status, ExitStatus::Code(0));
    assert!(!format!("{client:?}").contains("PRIVATE"));
}

#[tokio::test]
async fn connect_with_in_memory_key() {
    let sshd = TestSshd::start().await.unwrap();
    let mut t = target(&sshd, sshd.write_known_hosts().unwrap());
    t.key = SshKey::Inline {
        contents: SecretString::from(sshd.client_key_private().to_owned()),
        passphrase: None,
    };
    assert!(!format!("{t:?}").contains("PRIVATE KEY"));
    let client = SshClient::connect(&t).await.unwrap();
    let out = client.run(&argv(&["true"]), no_pty()).await.unwrap();
    assert!(out.status.success());
}

#[tokio::test]
async fn host_key_mismatch_is_refused() {
    let sshd = TestSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other = keygen_ed25519(&dir.path().join("other")).unwrap();
    let mut parts = other.split_whitespace();
    let (algo, key) = (parts.next().unwrap(), parts.next().unwrap());
    let kh = dir.path().join("known_hosts");
    std::fs::write(&kh, format!("[127.0.0.1]:{} {algo} {key}\n", sshd.port())).unwrap();
    let mut t = target(&sshd, kh.clone());
    t.trust_on_first_use = true; // TOFU never overrides a recorded key
    let err = SshClient::connect(&t).await.unwrap_err();
    assert!(
        matches!(err, SshError::HostKeyMismatch { line: 1, .. }),
        "{err:?}"
    );
    // nothing was learned
    assert_eq!(std::fs::read_to_string(&kh).unwrap().lines().count(), 1);
}

#[tokio::test]
async fn unknown_host_refused_without_tofu_and_learned_with_it() {
    let sshd = TestSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("sub").join("known_hosts");
    let mut t = target(&sshd, kh.clone());
    let err = SshClient::connect(&t).await.unwrap_err();
    assert!(matches!(err, SshError::UnknownHost { .. }), "{err:?}");
    assert!(err.to_string().contains("SHA256:"), "{err}");
    assert!(!kh.exists());

    t.trust_on_first_use = true;
    SshClient::connect(&t).await.unwrap();
    let learned = std::fs::read_to_string(&kh).unwrap();
    assert_eq!(learned.trim(), sshd.known_hosts_line());

    // the second connect verifies against the learned key, with TOFU off
    t.trust_on_first_use = false;
    let client = SshClient::connect(&t).await.unwrap();
    assert!(
        client
            .run(&argv(&["true"]), no_pty())
            .await
            .unwrap()
            .status
            .success()
    );
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), learned);
}

#[tokio::test]
async fn wrong_key_is_auth_failed() {
    let sshd = TestSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stranger");
    keygen_ed25519(&path).unwrap();
    let mut t = target(&sshd, sshd.write_known_hosts().unwrap());
    t.key = SshKey::File {
        path,
        passphrase: None,
    };
    let err = SshClient::connect(&t).await.unwrap_err();
    assert!(matches!(err, SshError::AuthFailed { .. }), "{err:?}");
}

#[tokio::test]
async fn connect_to_closed_port_is_io_error() {
    let sshd = TestSshd::start().await.unwrap();
    let mut t = target(&sshd, sshd.write_known_hosts().unwrap());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    t.port = port;
    let err = SshClient::connect(&t).await.unwrap_err();
    assert!(matches!(err, SshError::Io(_)), "{err:?}");
}

#[tokio::test]
async fn silent_server_is_timeout() {
    // a TCP listener that never speaks SSH
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let sshd = TestSshd::start().await.unwrap();
    let mut t = target(&sshd, sshd.write_known_hosts().unwrap());
    t.port = port;
    t.connect_timeout = Duration::from_millis(300);
    let err = SshClient::connect(&t).await.unwrap_err();
    assert!(matches!(err, SshError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn key_of_another_algorithm_recorded_is_a_mismatch_even_with_tofu() {
    let sshd = TestSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rsa = dir.path().join("rsa");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
        .arg(&rsa)
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(rsa.with_extension("pub")).unwrap();
    let mut parts = public.split_whitespace();
    let (algo, key) = (parts.next().unwrap(), parts.next().unwrap());
    let kh = dir.path().join("known_hosts");
    std::fs::write(&kh, format!("[127.0.0.1]:{} {algo} {key}\n", sshd.port())).unwrap();
    let mut t = target(&sshd, kh.clone());
    t.trust_on_first_use = true;
    let err = SshClient::connect(&t).await.unwrap_err();
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
    assert_eq!(std::fs::read_to_string(&kh).unwrap().lines().count(), 1);
}

#[tokio::test]
async fn encrypted_key_with_passphrase() {
    let sshd = TestSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enc");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "s3cret-pass", "-f"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    let authorized = sshd.dir().join("authorized_keys");
    let mut keys = std::fs::read_to_string(&authorized).unwrap();
    keys.push_str(&public);
    std::fs::write(&authorized, keys).unwrap();

    let mut t = target(&sshd, sshd.write_known_hosts().unwrap());
    t.key = SshKey::File {
        path: path.clone(),
        passphrase: Some(SecretString::from("wrong-pass")),
    };
    let err = SshClient::connect(&t).await.unwrap_err();
    assert!(matches!(err, SshError::Key(_)), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("wrong-pass"));

    t.key = SshKey::Inline {
        contents: SecretString::from(std::fs::read_to_string(&path).unwrap()),
        passphrase: Some(SecretString::from("s3cret-pass")),
    };
    let client = SshClient::connect(&t).await.unwrap();
    assert!(
        client
            .run(&argv(&["true"]), no_pty())
            .await
            .unwrap()
            .status
            .success()
    );
    client.disconnect().await.unwrap();
}
