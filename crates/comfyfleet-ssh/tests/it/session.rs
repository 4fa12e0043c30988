//! `SshSession`: reconnects after `TestSshd::cut_connections`, single-flight, and no retries of
//! permanent errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use comfyfleet_ssh::{ReconnectPolicy, SshSession};

use super::*;

fn session(sshd: &TestSshd) -> SshSession {
    SshSession::new(target(sshd, sshd.write_known_hosts().unwrap()))
}

/// A TCP proxy in front of `sshd` that counts the connections it carries, and a target that
/// goes through it (with `sshd`'s host key recorded for the proxy's port).
async fn through_counting_proxy(
    sshd: &TestSshd,
    dir: &std::path::Path,
) -> (SshTarget, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let upstream = sshd.addr();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    });
    let mut parts = sshd.host_key_public().split_whitespace();
    let (algo, key) = (parts.next().unwrap(), parts.next().unwrap());
    let kh = dir.join("proxy_known_hosts");
    std::fs::write(&kh, format!("[127.0.0.1]:{port} {algo} {key}\n")).unwrap();
    let mut t = target(sshd, kh);
    t.port = port;
    (t, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_keeps_its_port_across_a_cut() {
    let sshd = TestSshd::start().await.unwrap();
    let (http, _server) = http_server().await;
    let session = session(&sshd);
    let fwd = session
        .forward_local("127.0.0.1", http.port())
        .await
        .unwrap();
    let local = fwd.local_addr();
    assert_eq!(http_get(local, "/before").await.unwrap(), "hello /before");
    assert_eq!(session.reconnects(), 0);

    let cut = sshd.cut_connections().await.unwrap();
    assert!(cut >= 1, "no connection processes to cut");

    // Same local port, new SSH connection underneath.
    assert_eq!(http_get(local, "/after").await.unwrap(), "hello /after");
    assert_eq!(session.reconnects(), 1);
    assert_eq!(fwd.local_addr(), local);
    // And it keeps working on the new connection, without further reconnects.
    assert_eq!(http_get(local, "/again").await.unwrap(), "hello /again");
    assert_eq!(session.reconnects(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_stream_fails_on_a_cut_without_hanging() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sshd = TestSshd::start().await.unwrap();
    // A server that reads the request and never answers: the request is in flight at the cut.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_port = slow.local_addr().unwrap().port();
    let _slow = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = slow.accept().await {
            held.push(s);
        }
    });
    let session = session(&sshd);
    let fwd = session.forward_local("127.0.0.1", slow_port).await.unwrap();
    let mut conn = tokio::net::TcpStream::connect(fwd.local_addr())
        .await
        .unwrap();
    conn.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Make sure the channel is open before the cut.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sshd.cut_connections().await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut buf))
        .await
        .expect("the in-flight connection hung after the cut");
    // EOF or reset, and no response.
    assert!(read.is_err() || buf.is_empty(), "{read:?} {buf:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_works_after_a_cut() {
    let sshd = TestSshd::start().await.unwrap();
    let session = session(&sshd);
    let out = session
        .run(&argv(&["echo", "one"]), no_pty())
        .await
        .unwrap();
    assert_eq!(out.stdout(), ["one"]);

    sshd.cut_connections().await.unwrap();
    let out = session
        .run(&argv(&["echo", "two"]), no_pty())
        .await
        .unwrap();
    assert_eq!(out.stdout(), ["two"]);
    assert!(out.status.success());
    assert_eq!(session.reconnects(), 1);

    let mut p = session.exec(&argv(&["echo", "three"])).await.unwrap();
    assert_eq!(
        p.next_event().await,
        Some(ProcessEvent::Line(Line {
            stream: Stream::Stdout,
            text: "three".into()
        }))
    );
    assert_eq!(session.reconnects(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_reconnect() {
    let sshd = TestSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (t, connections) = through_counting_proxy(&sshd, dir.path()).await;
    let session = SshSession::new(t);
    let first = session.client().await.unwrap();
    assert!(Arc::ptr_eq(&first, &session.client().await.unwrap()));

    sshd.cut_connections().await.unwrap();
    assert!(eventually(|| first.is_closed()).await);

    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let s = session.clone();
        callers.spawn(async move { s.client().await });
    }
    let mut clients = Vec::new();
    while let Some(res) = callers.join_next().await {
        clients.push(res.unwrap().unwrap());
    }
    assert_eq!(session.reconnects(), 1);
    assert!(!Arc::ptr_eq(&first, &clients[0]));
    assert!(clients.iter().all(|c| Arc::ptr_eq(c, &clients[0])));
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_are_not_retried() {
    let sshd = TestSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut t, connections) = through_counting_proxy(&sshd, dir.path()).await;
    // Another key recorded for the server: a mismatch.
    let other = keygen_ed25519(&dir.path().join("other")).unwrap();
    let mut parts = other.split_whitespace();
    let (algo, key) = (parts.next().unwrap(), parts.next().unwrap());
    let kh = dir.path().join("known_hosts");
    std::fs::write(&kh, format!("[127.0.0.1]:{} {algo} {key}\n", t.port)).unwrap();
    t.known_hosts = kh;
    let session = SshSession::new(t.clone());

    // Concurrent callers share the one failed round.
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let s = session.clone();
        callers.spawn(async move { s.client().await });
    }
    while let Some(res) = callers.join_next().await {
        let err = res.unwrap().unwrap_err();
        assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    // Unknown host: also permanent, also a single attempt.
    t.known_hosts = dir.path().join("empty_known_hosts");
    let session = SshSession::new(t);
    let err = session.forward_local("127.0.0.1", 1).await.unwrap_err();
    assert!(matches!(err, SshError::UnknownHost { .. }), "{err:?}");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert_eq!(session.reconnects(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_per_policy() {
    // A server that accepts and hangs up at once: a transient failure on every attempt.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let _server = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    let sshd = TestSshd::start().await.unwrap();
    let mut t = target(&sshd, sshd.write_known_hosts().unwrap());
    t.port = port;
    let policy = ReconnectPolicy {
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(40),
        max_retries: 3,
    };
    let session = SshSession::with_policy(t, policy);
    let err = session.client().await.unwrap_err();
    assert!(!err.is_permanent(), "{err:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 4, "1 attempt + 3 retries");
    assert!(!format!("{session:?}").contains("PRIVATE"));
}
