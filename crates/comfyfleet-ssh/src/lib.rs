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
//!   `= false` keeps them apart, at the cost of a weaker cancel;
//! * [`SshKey::Agent`] authenticates through a running `ssh-agent` (its socket, or
//!   `$SSH_AUTH_SOCK`), trying each identity it holds; the private keys never leave the agent;
//! * [`SshClient::forward_local`] forwards a loopback port to a host:port reachable from the
//!   server (`direct-tcpip`, like `ssh -L`), e.g. a ComfyUI that listens on the instance's
//!   `127.0.0.1:8188` only; see [`Forward`];
//! * [`SshSession`] keeps one connection alive across drops: [`SshSession::client`] reconnects
//!   (single-flight, exponential backoff, see [`ReconnectPolicy`]; host-key and authentication
//!   errors are permanent and never retried), and [`SshSession::forward_local`] keeps the same
//!   local port across reconnects, so an HTTP client pointed at it keeps working.
//!
//! Keys and passphrases are [`SecretString`]s: they never appear in `Debug` output, errors or logs.
//!
//! ```no_run
//! # async fn demo() -> Result<(), comfyfleet_ssh::SshError> {
//! use comfyfleet_ssh::{SshKey, SshSession, SshTarget};
//!
//! let target = SshTarget::new(
//!     "gpu-1.example.net",
//!     22,
//!     "root",
//!     SshKey::Agent { socket: None },
//!     "/home/me/.ssh/known_hosts",
//! );
//! let session = SshSession::new(target);
//! // ComfyUI listens on the instance's loopback only: reach it through the SSH connection.
//! let comfyui = session.forward_local("127.0.0.1", 8188).await?;
//! println!("ComfyUI at http://{}", comfyui.local_addr());
//! let out = session.run(&["nvidia-smi".to_owned()], Default::default()).await?;
//! assert!(out.status.success());
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod backend;
pub mod installer;

mod forward;
mod session;

pub use forward::Forward;
pub use session::{ReconnectPolicy, SshSession};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, Pty};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, watch};

/// The private key to authenticate with.
#[derive(Debug, Clone)]
pub enum SshKey {
    /// The identities of a running `ssh-agent`, tried in the agent's order. The private keys stay
    /// in the agent: only signatures cross its socket.
    Agent {
        /// The agent's socket; `None` = the `SSH_AUTH_SOCK` environment variable.
        socket: Option<PathBuf>,
    },
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
    /// The ssh agent is not configured, unreachable, or failed (never carries key material).
    #[error("ssh agent: {0}")]
    Agent(String),
    /// The SSH connection is gone (closed by either side, or cut).
    #[error("the ssh connection is closed")]
    Disconnected,
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
            russh::Error::SendError
            | russh::Error::RecvError
            | russh::Error::Disconnect
            | russh::Error::HUP => SshError::Disconnected,
            other => SshError::Protocol(other.to_string()),
        }
    }
}

impl SshError {
    /// `true` when trying again cannot help without a configuration change: the host key is
    /// wrong or unknown, the key or agent is unusable, authentication was refused, or an argument
    /// is invalid. [`SshSession`] never retries these.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            SshError::HostKeyMismatch { .. }
                | SshError::UnknownHost { .. }
                | SshError::AuthFailed { .. }
                | SshError::Key(_)
                | SshError::Agent(_)
                | SshError::InvalidArgument(_)
        )
    }

    /// `true` when the error says the connection itself is unusable (closed, reset, timed out),
    /// as opposed to a refusal of one request on a working connection.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            SshError::Disconnected | SshError::Io(_) | SshError::Timeout { .. }
        )
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

pub(crate) struct Verifier {
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

/// What [`SshClient::connect`] authenticates with.
enum Credentials {
    Key(Arc<russh::keys::PrivateKey>),
    Agent(AgentClient<tokio::net::UnixStream>),
}

/// The agent socket to use: the configured one, else `$SSH_AUTH_SOCK` (`env`).
fn agent_socket(
    socket: Option<&Path>,
    env: Option<std::ffi::OsString>,
) -> Result<PathBuf, SshError> {
    match (socket, env) {
        (Some(path), _) => Ok(path.to_owned()),
        (None, Some(var)) if !var.is_empty() => Ok(PathBuf::from(var)),
        (None, _) => Err(SshError::Agent(
            "no agent socket configured and SSH_AUTH_SOCK is not set".to_owned(),
        )),
    }
}

async fn connect_agent(
    socket: Option<&Path>,
) -> Result<AgentClient<tokio::net::UnixStream>, SshError> {
    let path = agent_socket(socket, std::env::var_os("SSH_AUTH_SOCK"))?;
    AgentClient::connect_uds(&path)
        .await
        .map_err(|e| SshError::Agent(format!("cannot reach the agent at {}: {e}", path.display())))
}

/// Loads the key, or connects to the agent.
async fn load_credentials(key: &SshKey) -> Result<Credentials, SshError> {
    let res = match key {
        SshKey::Agent { socket } => {
            return Ok(Credentials::Agent(connect_agent(socket.as_deref()).await?));
        }
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
    res.map(|key| Credentials::Key(Arc::new(key)))
        .map_err(|e| SshError::Key(e.to_string()))
}

/// A connected, authenticated SSH session. Cheap to share behind an `Arc`; every
/// [`exec`](SshClient::exec) opens a new channel on the same connection.
pub struct SshClient {
    // Shared (weakly) with the forwards of this client; they never keep the connection alive.
    handle: Arc<client::Handle<Verifier>>,
    host: String,
    port: u16,
    user: String,
    command_timeout: Option<Duration>,
    connect_timeout: Duration,
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
            // Credentials come first: a missing key or agent fails before any network traffic.
            let credentials = load_credentials(&target.key).await?;
            let mut handle =
                client::connect(config, (target.host.as_str(), target.port), verifier).await?;
            let hash = handle.best_supported_rsa_hash().await?.flatten();
            let ok = match credentials {
                Credentials::Key(key) => handle
                    .authenticate_publickey(
                        target.user.clone(),
                        PrivateKeyWithHashAlg::new(key, hash),
                    )
                    .await?
                    .success(),
                Credentials::Agent(agent) => {
                    authenticate_with_agent(&mut handle, &target.user, agent, hash).await?
                }
            };
            if !ok {
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
            handle: Arc::new(handle),
            host: target.host.clone(),
            port: target.port,
            user: target.user.clone(),
            command_timeout: target.command_timeout,
            connect_timeout: target.connect_timeout,
        })
    }

    /// Forwards a new loopback port (`127.0.0.1:0`, see [`Forward::local_addr`]) to
    /// `remote_host:remote_port` as seen from the server, like `ssh -L`: each accepted TCP
    /// connection becomes a `direct-tcpip` channel on this connection.
    ///
    /// The forward does not keep the connection alive: once this client is closed or dropped,
    /// accepted connections are closed at once. For a forward that survives reconnects, see
    /// [`SshSession::forward_local`]. Dropping the [`Forward`] stops it.
    pub async fn forward_local(
        &self,
        remote_host: &str,
        remote_port: u16,
    ) -> Result<Forward, SshError> {
        forward::Forward::bind(
            forward::Opener::Client {
                handle: Arc::downgrade(&self.handle),
                timeout: self.connect_timeout,
            },
            remote_host,
            remote_port,
        )
        .await
    }

    /// Opens a `direct-tcpip` channel to `host:port` (as seen from the server), within the
    /// connect timeout.
    pub(crate) async fn open_direct_tcpip(
        &self,
        host: &str,
        port: u16,
        originator: std::net::SocketAddr,
    ) -> Result<russh::Channel<client::Msg>, SshError> {
        open_direct_tcpip(&self.handle, self.connect_timeout, host, port, originator).await
    }

    /// Opens a session channel (the step of [`exec_with`](SshClient::exec_with) that cannot have
    /// started anything remotely yet, so it is safe to retry on another connection).
    pub(crate) async fn open_session(&self) -> Result<russh::Channel<client::Msg>, SshError> {
        let open = self.handle.channel_open_session();
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(res) => Ok(res?),
            Err(_) => Err(SshError::Timeout {
                what: "opening an ssh channel",
                after: Some(self.connect_timeout),
            }),
        }
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
        let channel = self.open_session().await?;
        self.start(channel, command, opts).await
    }

    /// Starts `command` (already quoted) on a freshly opened session channel.
    pub(crate) async fn start(
        &self,
        channel: russh::Channel<client::Msg>,
        command: String,
        opts: ExecOptions,
    ) -> Result<RemoteProcess, SshError> {
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

/// Opens a `direct-tcpip` channel on `handle` within `timeout`.
pub(crate) async fn open_direct_tcpip(
    handle: &client::Handle<Verifier>,
    timeout: Duration,
    host: &str,
    port: u16,
    originator: std::net::SocketAddr,
) -> Result<russh::Channel<client::Msg>, SshError> {
    let open = handle.channel_open_direct_tcpip(
        host,
        u32::from(port),
        originator.ip().to_string(),
        u32::from(originator.port()),
    );
    match tokio::time::timeout(timeout, open).await {
        Ok(res) => Ok(res?),
        Err(_) => Err(SshError::Timeout {
            what: "opening a direct-tcpip channel",
            after: Some(timeout),
        }),
    }
}

/// Tries each identity of the agent in turn; `Ok(false)` when the server accepted none.
async fn authenticate_with_agent(
    handle: &mut client::Handle<Verifier>,
    user: &str,
    mut agent: AgentClient<tokio::net::UnixStream>,
    rsa_hash: Option<russh::keys::HashAlg>,
) -> Result<bool, SshError> {
    let identities = agent
        .request_identities()
        .await
        .map_err(|e| SshError::Agent(format!("listing the agent's identities: {e}")))?;
    let mut sign_error = None;
    for identity in identities {
        // Certificates come with their plain key in the agent; the plain key is enough here.
        let AgentIdentity::PublicKey { key, .. } = identity else {
            continue;
        };
        let hash = if key.algorithm().is_rsa() {
            rsa_hash
        } else {
            None
        };
        match handle
            .authenticate_publickey_with(user, key, hash, &mut agent)
            .await
        {
            Ok(res) if res.success() => return Ok(true),
            Ok(_) => {}
            Err(russh::AgentAuthError::Send(_)) => return Err(SshError::Disconnected),
            // The server would take this key but the agent did not sign: try the next one.
            Err(russh::AgentAuthError::Key(e)) => {
                tracing::debug!(error = %e, "the ssh agent did not sign");
                sign_error = Some(e.to_string());
            }
        }
    }
    match sign_error {
        Some(e) => Err(SshError::Agent(format!("the agent could not sign: {e}"))),
        None => Ok(false),
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
    fn agent_socket_falls_back_to_ssh_auth_sock() -> Result<(), SshError> {
        let env = Some(std::ffi::OsString::from("/run/agent.sock"));
        assert_eq!(
            agent_socket(Some(Path::new("/x.sock")), env.clone())?,
            Path::new("/x.sock")
        );
        assert_eq!(agent_socket(None, env)?, Path::new("/run/agent.sock"));
        for unset in [None, Some(std::ffi::OsString::new())] {
            let err = agent_socket(None, unset).map(drop);
            assert!(
                matches!(&err, Err(SshError::Agent(m)) if m.contains("SSH_AUTH_SOCK")),
                "{err:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn permanent_and_connection_errors() {
        assert!(
            SshError::AuthFailed {
                user: "u".into(),
                host: "h".into()
            }
            .is_permanent()
        );
        assert!(SshError::Agent("x".into()).is_permanent());
        assert!(!SshError::Disconnected.is_permanent());
        assert!(SshError::Disconnected.is_connection_lost());
        assert!(SshError::from(russh::Error::SendError).is_connection_lost());
        assert!(!SshError::Protocol("refused".into()).is_connection_lost());
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
