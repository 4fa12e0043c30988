//! comfyfleet-ssh against a real OpenSSH server on loopback ([`TestSshd`]).

#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::PathBuf;
use std::time::Duration;

use comfyfleet_ssh::{
    ExecOptions, ExitStatus, Line, ProcessEvent, SshClient, SshError, SshKey, SshTarget, Stream,
};
use comfyfleet_testkit::sshd::{TestSshd, keygen_ed25519};
use secrecy::SecretString;

mod agent;
mod backend;
mod connect;
mod exec;
mod forward;
mod install;
mod quoting;
mod session;

fn target(sshd: &TestSshd, known_hosts: PathBuf) -> SshTarget {
    let mut t = SshTarget::new(
        "127.0.0.1",
        sshd.port(),
        sshd.user(),
        SshKey::File {
            path: sshd.client_key_path(),
            passphrase: None,
        },
        known_hosts,
    );
    t.connect_timeout = Duration::from_secs(10);
    t
}

async fn connected(sshd: &TestSshd) -> SshClient {
    let kh = sshd.write_known_hosts().unwrap();
    SshClient::connect(&target(sshd, kh)).await.unwrap()
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn no_pty() -> ExecOptions {
    ExecOptions {
        pty: false,
        timeout: Some(Duration::from_secs(30)),
    }
}

fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A tiny HTTP/1.1 server on loopback: answers every request with `200` and the body
/// `hello <path>`, then closes. Runs until the handle is dropped/aborted.
async fn http_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split_whitespace().nth(1).unwrap_or("?").to_owned();
                let body = format!("hello {path}");
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// `GET path` on `addr` (HTTP/1.1, `Connection: close`); the body of a `200`. Errors (rather than
/// hangs) within 20 s: `TimedOut` means it hung.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: comfyui\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut response = Vec::new();
        conn.read_to_end(&mut response).await?;
        let response = String::from_utf8_lossy(&response).into_owned();
        match response.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200 ") => Ok(body.to_owned()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("no HTTP response: {response:?}"),
            )),
        }
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request hung for 20 s",
            ))
        })
}

/// Polls `cond` every 20 ms for up to 10 s; `true` once it holds.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
