//! comfyfleet-ssh against a real OpenSSH server on loopback ([`TestSshd`]).

#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::PathBuf;
use std::time::Duration;

use comfyfleet_ssh::{
    ExecOptions, ExitStatus, Line, ProcessEvent, SshClient, SshError, SshKey, SshTarget, Stream,
};
use comfyfleet_testkit::sshd::{TestSshd, keygen_ed25519};
use secrecy::SecretString;

mod connect;
mod exec;
mod quoting;

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
