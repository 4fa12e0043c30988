//! `SshClient::forward_local`: direct-tcpip through the real sshd to an HTTP server on loopback.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_carries_concurrent_http_requests() {
    let sshd = TestSshd::start().await.unwrap();
    let (http, _server) = http_server().await;
    let client = connected(&sshd).await;
    let fwd = client
        .forward_local("127.0.0.1", http.port())
        .await
        .unwrap();
    assert!(fwd.local_addr().ip().is_loopback());
    assert_ne!(fwd.local_addr(), http);
    assert_eq!(fwd.remote(), ("127.0.0.1", http.port()));

    let mut requests = tokio::task::JoinSet::new();
    for i in 0..8 {
        let local = fwd.local_addr();
        requests.spawn(async move { (i, http_get(local, &format!("/req-{i}")).await) });
    }
    let mut done = 0;
    while let Some(res) = requests.join_next().await {
        let (i, body) = res.unwrap();
        assert_eq!(body.unwrap(), format!("hello /req-{i}"));
        done += 1;
    }
    assert_eq!(done, 8);
    // The connection is still usable for commands alongside the forward.
    let out = client.run(&argv(&["true"]), no_pty()).await.unwrap();
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_remote_port_closes_the_local_connection() {
    let sshd = TestSshd::start().await.unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = connected(&sshd).await;
    let fwd = client.forward_local("127.0.0.1", closed).await.unwrap();
    let err = http_get(fwd.local_addr(), "/").await.unwrap_err();
    assert_ne!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    // The connection survives a refused channel.
    assert!(!client.is_closed());
    let (http, _server) = http_server().await;
    let fwd2 = client
        .forward_local("127.0.0.1", http.port())
        .await
        .unwrap();
    assert_eq!(
        http_get(fwd2.local_addr(), "/ok").await.unwrap(),
        "hello /ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_client_fails_new_forward_connections_cleanly() {
    let sshd = TestSshd::start().await.unwrap();
    let (http, _server) = http_server().await;
    let client = connected(&sshd).await;
    let fwd = client
        .forward_local("127.0.0.1", http.port())
        .await
        .unwrap();
    assert_eq!(http_get(fwd.local_addr(), "/a").await.unwrap(), "hello /a");

    client.disconnect().await.unwrap();
    assert!(eventually(|| client.is_closed()).await);
    let err = http_get(fwd.local_addr(), "/b").await.unwrap_err();
    assert_ne!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    // Dropping the client entirely: same clean failure.
    drop(client);
    let err = http_get(fwd.local_addr(), "/c").await.unwrap_err();
    assert_ne!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_forward_stops_listening() {
    let sshd = TestSshd::start().await.unwrap();
    let (http, _server) = http_server().await;
    let client = connected(&sshd).await;
    let fwd = client
        .forward_local("127.0.0.1", http.port())
        .await
        .unwrap();
    let local = fwd.local_addr();
    assert_eq!(http_get(local, "/x").await.unwrap(), "hello /x");
    drop(fwd);
    let mut refused = false;
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(local).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "{local} still accepts after the forward was dropped"
    );
    assert!(!client.is_closed());
}
