//! Starting the real `comfyfleet serve` binary from tests and benches.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `BIN serve --config CONFIG --bind 127.0.0.1:0` with `COMFYFLEET_LOG=log` and returns the
/// child and its base URL, read from the "dashboard at URL" line it prints once listening. Its
/// stdout stays piped and drained by a thread (a closed pipe would end the server at its next
/// line); stderr goes to `stderr`. Panics (after killing the child) when no URL comes within
/// 60 s.
pub fn spawn_serve(bin: &Path, config: &Path, log: &str, stderr: Stdio) -> (Child, String) {
    let mut child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--bind", "127.0.0.1:0"])
        .env("COMFYFLEET_LOG", log)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("dashboard at") => {
                break line
                    .rsplit(' ')
                    .next()
                    .map(|u| u.trim_end_matches('/').to_owned());
            }
            Ok(_) => {}
            Err(_) => break None,
        }
    };
    match url {
        Some(url) => (child, url),
        None => {
            child.kill().ok();
            child.wait().ok();
            panic!("comfyfleet serve did not print its URL within 60 s");
        }
    }
}
