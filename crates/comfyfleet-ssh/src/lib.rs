//! # comfyfleet-ssh
//!
//! An SSH client for remote GPU instances, on [`russh`] (pure Rust, ring crypto):
//!
//! * [`SshClient::connect`] verifies the host key against a `known_hosts` file
//!   ([`SshError::HostKeyMismatch`], [`SshError::UnknownHost`]; unknown hosts are learned and
//!   appended only when [`SshTarget::trust_on_first_use`] is on), authenticates with a key from a
//!   file or from memory (optionally with a passphrase), and sets keepalives and timeouts;
//! * [`SshClient::exec`] runs an argv: every argument goes through [`shell_quote`], nothing is
//!   interpolated raw; stdout/stderr arrive line by line as [`ProcessEvent`]s, then the exit;
//! * [`RemoteProcess::cancel`] kills the remote process group: the command runs on a PTY and the
//!   channel is closed, so the hangup reaches the whole group (OpenSSH ignores the `signal`
//!   request for root logins). On a PTY stderr is merged into stdout; [`ExecOptions::pty`]
//!   `= false` keeps them apart, at the cost of a weaker cancel.
//!
//! Keys and passphrases are [`SecretString`]s: they never appear in `Debug` output, errors or logs.

#![deny(missing_docs)]

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, Pty};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, watch};

/// The private key to authenticate with.
#[derive(Debug, Clone)]
pub enum SshKey {
    /// An OpenSSH/PEM private key file.
    File {
        /// Path of the private key.
        path: PathBuf,
        /// Its passphrase, if encrypted.
        passphrase: Option<SecretString>,
    },
    /// A private key held in memory.
    Inline {
        /// The key file's contents.
        contents: SecretString,
        /// Its passphrase, if encrypted.
        passphrase: Option<SecretString>,
    },
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct SshTarget {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Authentication key.
    pub key: SshKey,
    /// The `known_hosts` file the host key is checked against (and appended to on TOFU).
    pub known_hosts: PathBuf,
    /// Learn (and append) the key of a host not in `known_hosts` instead of refusing it.
    pub trust_on_first_use: bool,
    /// Limit for TCP connect + handshake + authentication.
    pub connect_timeout: Duration,
    /// Send a keepalive after this much silence from the server.
    pub keepalive_interval: Option<Duration>,
    /// Close the connection after this many unanswered keepalives.
    pub keepalive_max: usize,
    /// Default limit for one [`SshClient::exec`]; `None` = no limit.
    pub command_timeout: Option<Duration>,
}

impl SshTarget {
    /// A target with defaults: TOFU off, 10 s connect timeout, keepalive every 15 s (max 3),
    /// no command timeout.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        user: impl Into<String>,
        key: SshKey,
        known_hosts: impl Into<PathBuf>,
    ) -> SshTarget {
        SshTarget {
            host: host.into(),
            port,
            user: user.into(),
            key,
            known_hosts: known_hosts.into(),
            trust_on_first_use: false,
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 3,
            command_timeout: None,
        }
    }
}

/// Errors of this crate. None of them carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The server's host key differs from the one recorded in `known_hosts`.
    #[error(
        "host key of {host}:{port} does not match {known_hosts} line {line}: possible man-in-the-middle, connection refused"
    )]
    HostKeyMismatch {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The known_hosts file.
        known_hosts: PathBuf,
        /// Line of the recorded key.
        line: usize,
    },
    /// The host is not in `known_hosts` and trust-on-first-use is off.
    #[error(
        "host {host}:{port} is not in {known_hosts} (key {fingerprint}) and trust-on-first-use is off"
    )]
    UnknownHost {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The known_hosts file.
        known_hosts: PathBuf,
        /// SHA-256 fingerprint of the offered host key.
        fingerprint: String,
    },
    /// The server refused the key.
    #[error("authentication of {user}@{host} failed")]
    AuthFailed {
        /// User.
        user: String,
        /// Host.
        host: String,
    },
    /// Something took longer than its limit.
    #[error("{what} timed out")]
    Timeout {
        /// What timed out.
        what: &'static str,
        /// The limit, when one was set.
        after: Option<Duration>,
    },
    /// I/O error (connect refused, reset, known_hosts unreadable…).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The private key could not be loaded or decrypted.
    #[error("cannot load the private key: {0}")]
    Key(String),
    /// A command argument cannot be passed (it contains a NUL byte), or the argv is empty.
    #[error("invalid command argument: {0}")]
    InvalidArgument(String),
    /// An SSH protocol error.
    #[error("ssh: {0}")]
    Protocol(String),
}

impl From<russh::Error> for SshError {
    fn from(e: russh::Error) -> SshError {
        match e {
            russh::Error::IO(e) => SshError::Io(e),
            russh::Error::ConnectionTimeout => SshError::Timeout {
                what: "ssh connection (inactivity)",
                after: None,
            },
            russh::Error::KeepaliveTimeout => SshError::Timeout {
                what: "ssh connection (keepalives unanswered)",
                after: None,
            },
            other => SshError::Protocol(other.to_string()),
        }
    }
}

/// Quotes one argument for a POSIX shell (the remote login shell): the shell turns the result
/// back into exactly `arg`, with no expansion of any kind. Safe words (`[A-Za-z0-9_@%+=:,./-]`)
/// are left as they are; everything else is single-quoted, `'` becoming `'\''`.
///
/// NUL bytes cannot be passed through a command line and are rejected.
pub fn shell_quote(arg: &str) -> Result<String, SshError> {
    if arg.contains('\0') {
        return Err(SshError::InvalidArgument(
            "argument contains a NUL byte".to_owned(),
        ));
    }
    if arg.is_empty() {
        return Ok("''".to_owned());
    }
    if arg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b))
    {
        return Ok(arg.to_owned());
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Ok(out)
}

/// Quotes and joins an argv into one command line (see [`shell_quote`]).
pub fn shell_command(argv: &[String]) -> Result<String, SshError> {
    if argv.is_empty() {
        return Err(SshError::InvalidArgument("empty argv".to_owned()));
    }
    let quoted = argv
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(quoted.join(" "))
}

struct Verifier {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    tofu: bool,
}

impl client::Handler for Verifier {
    type Error = SshError;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, SshError> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_public_key else {
            return Err(SshError::Protocol(
                "host certificates are not supported".to_owned(),
            ));
        };
        match russh::keys::check_known_hosts_path(&self.host, self.port, key, &self.known_hosts) {
            Ok(true) => Ok(true),
            Ok(false) => {
                // A key of another algorithm is recorded: never learn over it.
                let recorded = russh::keys::known_hosts::known_host_keys_path(
                    &self.host,
                    self.port,
                    &self.known_hosts,
                )
                .unwrap_or_default();
                if let Some((line, _)) = recorded.first() {
                    return Err(SshError::HostKeyMismatch {
                        host: self.host.clone(),
                        port: self.port,
                        known_hosts: self.known_hosts.clone(),
                        line: *line,
                    });
                }
                if !self.tofu {
                    return Err(SshError::UnknownHost {
                        host: self.host.clone(),
                        port: self.port,
                        known_hosts: self.known_hosts.clone(),
                        fingerprint: key.fingerprint(Default::default()).to_string(),
                    });
                }
                russh::keys::known_hosts::learn_known_hosts_path(
                    &self.host,
                    self.port,
                    key,
                    &self.known_hosts,
                )
                .map_err(|e| SshError::Protocol(format!("learning the host key: {e}")))?;
                tracing::info!(host = %self.host, port = self.port, fingerprint = %key.fingerprint(Default::default()), "learned host key (trust on first use)");
                Ok(true)
            }
            Err(russh::keys::Error::KeyChanged { line }) => Err(SshError::HostKeyMismatch {
                host: self.host.clone(),
                port: self.port,
                known_hosts: self.known_hosts.clone(),
                line,
            }),
            Err(e) => Err(SshError::Protocol(format!(
                "reading {}: {e}",
                self.known_hosts.display()
            ))),
        }
    }
}

fn load_key(key: &SshKey) -> Result<russh::keys::PrivateKey, SshError> {
    let res = match key {
        SshKey::File { path, passphrase } => {
            russh::keys::load_secret_key(path, passphrase.as_ref().map(|p| p.expose_secret()))
        }
        SshKey::Inline {
            contents,
            passphrase,
        } => russh::keys::decode_secret_key(
            contents.expose_secret(),
            passphrase.as_ref().map(|p| p.expose_secret()),
        ),
    };
    res.map_err(|e| SshError::Key(e.to_string()))
}

/// A connected, authenticated SSH session. Cheap to share behind an `Arc`; every
/// [`exec`](SshClient::exec) opens a new channel on the same connection.
pub struct SshClient {
    handle: client::Handle<Verifier>,
    host: String,
    port: u16,
    user: String,
    command_timeout: Option<Duration>,
}

impl fmt::Debug for SshClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshClient")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// How to run one command.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Run on a PTY (default): cancel kills the whole remote process group; stderr is merged
    /// into stdout. Without a PTY stdout/stderr stay apart, but a root login's processes may
    /// survive cancel.
    pub pty: bool,
    /// Limit for the whole command; overrides [`SshTarget::command_timeout`].
    pub timeout: Option<Duration>,
}

impl Default for ExecOptions {
    fn default() -> ExecOptions {
        ExecOptions {
            pty: true,
            timeout: None,
        }
    }
}

impl SshClient {
    /// Connects, verifies the host key and authenticates, all within
    /// [`SshTarget::connect_timeout`].
    pub async fn connect(target: &SshTarget) -> Result<SshClient, SshError> {
        let key = load_key(&target.key)?;
        let config = Arc::new(client::Config {
            keepalive_interval: target.keepalive_interval,
            keepalive_max: target.keepalive_max,
            nodelay: true,
            ..Default::default()
        });
        let verifier = Verifier {
            host: target.host.clone(),
            port: target.port,
            known_hosts: target.known_hosts.clone(),
            tofu: target.trust_on_first_use,
        };
        let work = async {
            let mut handle =
                client::connect(config, (target.host.as_str(), target.port), verifier).await?;
            let hash = handle.best_supported_rsa_hash().await?.flatten();
            let auth = handle
                .authenticate_publickey(
                    target.user.clone(),
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await?;
            if !auth.success() {
                return Err(SshError::AuthFailed {
                    user: target.user.clone(),
                    host: target.host.clone(),
                });
            }
            Ok(handle)
        };
        let handle = tokio::time::timeout(target.connect_timeout, work)
            .await
            .map_err(|_| SshError::Timeout {
                what: "ssh connect",
                after: Some(target.connect_timeout),
            })??;
        tracing::debug!(host = %target.host, port = target.port, user = %target.user, "ssh connected");
        Ok(SshClient {
            handle,
            host: target.host.clone(),
            port: target.port,
            user: target.user.clone(),
            command_timeout: target.command_timeout,
        })
    }

    /// Runs `argv` (each argument shell-quoted) on a PTY; see [`exec_with`](SshClient::exec_with).
    pub async fn exec(&self, argv: &[String]) -> Result<RemoteProcess, SshError> {
        self.exec_with(argv, ExecOptions::default()).await
    }

    /// Runs `argv` with options. Output arrives as [`ProcessEvent`]s on the returned process.
    pub async fn exec_with(
        &self,
        argv: &[String],
        opts: ExecOptions,
    ) -> Result<RemoteProcess, SshError> {
        let command = shell_command(argv)?;
        let channel = self.handle.channel_open_session().await?;
        if opts.pty {
            channel
                .request_pty(
                    false,
                    "dumb",
                    200,
                    50,
                    0,
                    0,
                    &[(Pty::ECHO, 0), (Pty::OPOST, 0)],
                )
                .await?;
        }
        channel.exec(true, command).await?;
        let timeout = opts.timeout.or(self.command_timeout);
        let (tx, rx) = mpsc::unbounded_channel();
        let (cancel_tx, cancel_rx) = watch::channel(false);
        tokio::spawn(pump(channel, tx, cancel_rx, timeout));
        Ok(RemoteProcess {
            events: rx,
            cancel: cancel_tx,
        })
    }

    /// Runs `argv` and collects its output (see [`RemoteProcess::output`]).
    pub async fn run(&self, argv: &[String], opts: ExecOptions) -> Result<Output, SshError> {
        self.exec_with(argv, opts).await?.output().await
    }

    /// Closes the connection.
    pub async fn disconnect(&self) -> Result<(), SshError> {
        self.handle
            .disconnect(russh::Disconnect::ByApplication, "bye", "en")
            .await?;
        Ok(())
    }

    /// `true` once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output (and, on a PTY, standard error).
    Stdout,
    /// Standard error (only without a PTY).
    Stderr,
}

/// One line of remote output, without its `\n` (and a trailing `\r`). Invalid UTF-8 is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The stream.
    pub stream: Stream,
    /// The text.
    pub text: String,
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(u32),
    /// It was killed by this signal.
    Signal(String),
    /// [`RemoteProcess::cancel`] closed it.
    Cancelled,
    /// Its time limit passed and it was closed.
    TimedOut,
    /// The channel closed without an exit status (e.g. the connection dropped).
    Closed,
}

impl ExitStatus {
    /// `true` for `Code(0)`.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }
}

/// What a remote command reports, in order: lines, then exactly one `Exit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// A line of output.
    Line(Line),
    /// The end.
    Exit(ExitStatus),
}

/// All of a command's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Lines in arrival order.
    pub lines: Vec<Line>,
    /// How it ended.
    pub status: ExitStatus,
}

impl Output {
    /// The stdout lines' texts.
    pub fn stdout(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.stream == Stream::Stdout)
            .map(|l| l.text.as_str())
            .collect()
    }

    /// The stderr lines' texts.
    pub fn stderr(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.stream == Stream::Stderr)
            .map(|l| l.text.as_str())
            .collect()
    }
}

/// A running remote command. Dropping it cancels the command.
#[derive(Debug)]
pub struct RemoteProcess {
    events: mpsc::UnboundedReceiver<ProcessEvent>,
    cancel: watch::Sender<bool>,
}

impl RemoteProcess {
    /// The next event; `None` after the `Exit` event.
    pub async fn next_event(&mut self) -> Option<ProcessEvent> {
        self.events.recv().await
    }

    /// Kills the remote command (closes its channel: on a PTY the hangup reaches its whole
    /// process group). The `Exit(Cancelled)` event follows.
    pub fn cancel(&self) {
        let _ = self.cancel.send(true);
    }

    /// A handle that cancels this process from elsewhere.
    pub fn canceller(&self) -> Canceller {
        Canceller(self.cancel.clone())
    }

    /// Waits for the end, collecting every line.
    pub async fn output(mut self) -> Result<Output, SshError> {
        let mut lines = Vec::new();
        while let Some(ev) = self.events.recv().await {
            match ev {
                ProcessEvent::Line(l) => lines.push(l),
                ProcessEvent::Exit(status) => return Ok(Output { lines, status }),
            }
        }
        Ok(Output {
            lines,
            status: ExitStatus::Closed,
        })
    }
}

impl Drop for RemoteProcess {
    fn drop(&mut self) {
        let _ = self.cancel.send(true);
    }
}

/// Cancels a [`RemoteProcess`] from another task.
#[derive(Debug, Clone)]
pub struct Canceller(watch::Sender<bool>);

impl Canceller {
    /// See [`RemoteProcess::cancel`].
    pub fn cancel(&self) {
        let _ = self.0.send(true);
    }
}

#[derive(Default)]
struct LineBuf(Vec<u8>);

impl LineBuf {
    fn push(&mut self, data: &[u8], stream: Stream, tx: &mpsc::UnboundedSender<ProcessEvent>) {
        self.0.extend_from_slice(data);
        while let Some(pos) = self.0.iter().position(|&b| b == b'\n') {
            let rest = self.0.split_off(pos + 1);
            let line = std::mem::replace(&mut self.0, rest);
            emit(&line[..pos], stream, tx);
        }
    }

    fn flush(&mut self, stream: Stream, tx: &mpsc::UnboundedSender<ProcessEvent>) {
        if !self.0.is_empty() {
            let line = std::mem::take(&mut self.0);
            emit(&line, stream, tx);
        }
    }
}

fn emit(line: &[u8], stream: Stream, tx: &mpsc::UnboundedSender<ProcessEvent>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let _ = tx.send(ProcessEvent::Line(Line {
        stream,
        text: String::from_utf8_lossy(line).into_owned(),
    }));
}

async fn pump(
    mut channel: russh::Channel<client::Msg>,
    tx: mpsc::UnboundedSender<ProcessEvent>,
    mut cancel: watch::Receiver<bool>,
    timeout: Option<Duration>,
) {
    let mut out = LineBuf::default();
    let mut err = LineBuf::default();
    let mut status = None;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);
    let end = loop {
        tokio::select! {
            msg = channel.wait() => match msg {
                Some(ChannelMsg::Data { data }) => out.push(&data, Stream::Stdout, &tx),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => err.push(&data, Stream::Stderr, &tx),
                Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(ExitStatus::Code(exit_status)),
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => status = Some(ExitStatus::Signal(format!("{signal_name:?}"))),
                Some(ChannelMsg::Failure) => {
                    tracing::warn!("remote exec request refused");
                    break status.take().unwrap_or(ExitStatus::Closed);
                }
                Some(ChannelMsg::Close) | None => break status.take().unwrap_or(ExitStatus::Closed),
                Some(_) => {}
            },
            changed = cancel.changed() => {
                if changed.is_err() || *cancel.borrow() {
                    let _ = channel.close().await;
                    break ExitStatus::Cancelled;
                }
            }
            () = &mut sleep => {
                let _ = channel.close().await;
                break ExitStatus::TimedOut;
            }
        }
    };
    out.flush(Stream::Stdout, &tx);
    err.flush(Stream::Stderr, &tx);
    let _ = tx.send(ProcessEvent::Exit(end));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes() -> Result<(), SshError> {
        assert_eq!(shell_quote("abc-1.2/x")?, "abc-1.2/x");
        assert_eq!(shell_quote("")?, "''");
        assert_eq!(shell_quote("a b")?, "'a b'");
        assert_eq!(shell_quote("it's")?, "'it'\\''s'");
        assert!(shell_quote("a\0b").is_err());
        Ok(())
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let key = SshKey::Inline {
            contents: SecretString::from("-----BEGIN OPENSSH PRIVATE KEY----- topsecret"),
            passphrase: Some(SecretString::from("hunter2")),
        };
        let t = SshTarget::new("h", 22, "u", key, "/k");
        let dbg = format!("{t:?}");
        assert!(
            !dbg.contains("topsecret") && !dbg.contains("hunter2"),
            "{dbg}"
        );
    }
}
