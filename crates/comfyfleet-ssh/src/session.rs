//! [`SshSession`]: one logical SSH connection to a target that survives drops. It hands out the
//! live [`SshClient`], reconnecting (single-flight, with backoff) when the connection is gone.
//!
//! Retry policy lives here and only here: [`SshClient`] itself never retries. Permanent errors
//! ([`SshError::is_permanent`]: host key, authentication, key or agent problems) are returned at
//! once. Port forwarding's plumbing lives in `forward.rs`.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use russh::client;

use crate::forward::{Forward, Opener};
use crate::{ExecOptions, Output, RemoteProcess, SshClient, SshError, SshTarget, shell_command};

/// How [`SshSession`] retries a connection: exponential backoff with jitter from `min_delay`
/// up to `max_delay`, at most `max_retries` retries after the first attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay before the first retry.
    pub min_delay: Duration,
    /// Upper bound of any delay.
    pub max_delay: Duration,
    /// Retries after the first attempt; then the last error is returned.
    pub max_retries: usize,
}

impl Default for ReconnectPolicy {
    /// 200 ms doubling up to 5 s, 6 retries (about 15 s in all, plus connect timeouts).
    fn default() -> ReconnectPolicy {
        ReconnectPolicy {
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_retries: 6,
        }
    }
}

/// A reconnecting SSH connection to one [`SshTarget`]. Cheap to clone: clones share the
/// connection, the reconnect lock and the counters.
///
/// Connecting is lazy: the first [`client`](SshSession::client) (or `exec`, or
/// [`forward_local`](SshSession::forward_local)) connects.
#[derive(Clone)]
pub struct SshSession {
    inner: Arc<Inner>,
}

struct Inner {
    target: SshTarget,
    policy: ReconnectPolicy,
    slot: tokio::sync::Mutex<Slot>,
    /// Connection rounds (a first attempt plus its retries) that ended in an error. Read before
    /// taking the lock, it tells a waiter whether a round finished while it waited.
    failed_rounds: AtomicU64,
    reconnects: AtomicU64,
}

#[derive(Default)]
struct Slot {
    client: Option<Arc<SshClient>>,
    connected_before: bool,
    /// The error of the last failed round, shared with the callers that waited for it.
    last_error: Option<SshError>,
}

impl fmt::Debug for SshSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SshTarget's Debug keeps key material out (SecretString).
        f.debug_struct("SshSession")
            .field("target", &self.inner.target)
            .field("policy", &self.inner.policy)
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}

impl SshSession {
    /// A session with the default [`ReconnectPolicy`]. Does not connect yet.
    pub fn new(target: SshTarget) -> SshSession {
        SshSession::with_policy(target, ReconnectPolicy::default())
    }

    /// A session with this reconnect policy. Does not connect yet.
    pub fn with_policy(target: SshTarget, policy: ReconnectPolicy) -> SshSession {
        SshSession {
            inner: Arc::new(Inner {
                target,
                policy,
                slot: tokio::sync::Mutex::new(Slot::default()),
                failed_rounds: AtomicU64::new(0),
                reconnects: AtomicU64::new(0),
            }),
        }
    }

    /// The target this session connects to.
    pub fn target(&self) -> &SshTarget {
        &self.inner.target
    }

    /// How many times a connection was established again after the first one (for tests and
    /// metrics).
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// The live connection, connecting or reconnecting first when there is none (or it closed).
    ///
    /// Single-flight: concurrent callers wait for one connection round and share its outcome,
    /// error included. A round retries transient errors per the [`ReconnectPolicy`]; permanent
    /// ones ([`SshError::is_permanent`]) end it at once.
    pub async fn client(&self) -> Result<Arc<SshClient>, SshError> {
        let inner = &self.inner;
        let failed_before = inner.failed_rounds.load(Ordering::Acquire);
        let mut slot = inner.slot.lock().await;
        if let Some(client) = slot.client.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        if inner.failed_rounds.load(Ordering::Acquire) != failed_before
            && let Some(e) = &slot.last_error
        {
            // A round failed while we waited for it: its outcome is ours too.
            return Err(share(e));
        }
        let (host, port) = (&inner.target.host, inner.target.port);
        let reconnect = slot.connected_before;
        if reconnect {
            tracing::info!(%host, port, "ssh connection lost, reconnecting");
        }
        slot.client = None;
        match self.connect_with_backoff().await {
            Ok(client) => {
                let client = Arc::new(client);
                if reconnect {
                    let n = inner.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::info!(%host, port, reconnects = n, "ssh reconnected");
                }
                slot.connected_before = true;
                slot.last_error = None;
                slot.client = Some(client.clone());
                Ok(client)
            }
            Err(e) => {
                tracing::warn!(%host, port, error = %e, "ssh connect failed");
                slot.last_error = Some(share(&e));
                inner.failed_rounds.fetch_add(1, Ordering::Release);
                Err(e)
            }
        }
    }

    async fn connect_with_backoff(&self) -> Result<SshClient, SshError> {
        let target = &self.inner.target;
        let policy = self.inner.policy;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(policy.max_retries)
            .with_jitter();
        (|| SshClient::connect(target))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &SshError| !e.is_permanent())
            .notify(|e: &SshError, after: Duration| {
                tracing::info!(host = %target.host, port = target.port, error = %e, retry_in = ?after, "ssh connect failed, retrying");
            })
            .await
    }

    /// Forgets `client` if it is still the current one, so the next [`client`](Self::client)
    /// reconnects. For connections that failed a request before noticing they are closed.
    async fn forget(&self, client: &Arc<SshClient>) {
        let mut slot = self.inner.slot.lock().await;
        if slot.client.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            slot.client = None;
        }
    }

    /// Runs `op` on the live connection; when the connection turns out to be lost, forgets it and
    /// runs `op` once more on a fresh one. Only for steps that have no remote effect when they
    /// fail (opening a channel).
    async fn on_live_client<T, F, Fut>(&self, op: F) -> Result<T, SshError>
    where
        F: Fn(Arc<SshClient>) -> Fut,
        Fut: Future<Output = Result<T, SshError>>,
    {
        let client = self.client().await?;
        match op(client.clone()).await {
            Err(e) if e.is_connection_lost() => {
                tracing::debug!(host = %self.inner.target.host, port = self.inner.target.port, error = %e, "ssh connection lost under a request");
                self.forget(&client).await;
                op(self.client().await?).await
            }
            res => res,
        }
    }

    pub(crate) async fn open_direct_tcpip(
        &self,
        host: &str,
        port: u16,
        originator: SocketAddr,
    ) -> Result<russh::Channel<client::Msg>, SshError> {
        self.on_live_client(|c| async move { c.open_direct_tcpip(host, port, originator).await })
            .await
    }

    /// Forwards a new loopback port to `remote_host:remote_port` as seen from the server (see
    /// [`SshClient::forward_local`]), through whatever connection is live: the local port stays
    /// the same across reconnects. Connections in flight when a connection drops fail; the next
    /// ones go through a fresh connection.
    ///
    /// Connects first, so configuration errors show up here. The forward keeps this session
    /// alive until it is dropped.
    pub async fn forward_local(
        &self,
        remote_host: &str,
        remote_port: u16,
    ) -> Result<Forward, SshError> {
        self.client().await?;
        Forward::bind(Opener::Session(self.clone()), remote_host, remote_port).await
    }

    /// Runs `argv` on a PTY through the live connection (see [`SshClient::exec`]).
    pub async fn exec(&self, argv: &[String]) -> Result<RemoteProcess, SshError> {
        self.exec_with(argv, ExecOptions::default()).await
    }

    /// Runs `argv` with options through the live connection (see [`SshClient::exec_with`]). A
    /// connection found dead while opening the channel is replaced once; a command that already
    /// started is never re-run.
    pub async fn exec_with(
        &self,
        argv: &[String],
        opts: ExecOptions,
    ) -> Result<RemoteProcess, SshError> {
        let command = shell_command(argv)?;
        let (client, channel) = self
            .on_live_client(|c| async move {
                let channel = c.open_session().await?;
                Ok((c, channel))
            })
            .await?;
        client.start(channel, command, opts).await
    }

    /// Runs `argv` and collects its output (see [`SshClient::run`]).
    pub async fn run(&self, argv: &[String], opts: ExecOptions) -> Result<Output, SshError> {
        self.exec_with(argv, opts).await?.output().await
    }
}

/// A copy of `e` for the callers that shared a connection round (`SshError` is not `Clone`
/// because of `io::Error`; an I/O error keeps its kind and message).
fn share(e: &SshError) -> SshError {
    match e {
        SshError::HostKeyMismatch {
            host,
            port,
            known_hosts,
            line,
        } => SshError::HostKeyMismatch {
            host: host.clone(),
            port: *port,
            known_hosts: known_hosts.clone(),
            line: *line,
        },
        SshError::UnknownHost {
            host,
            port,
            known_hosts,
            fingerprint,
        } => SshError::UnknownHost {
            host: host.clone(),
            port: *port,
            known_hosts: known_hosts.clone(),
            fingerprint: fingerprint.clone(),
        },
        SshError::AuthFailed { user, host } => SshError::AuthFailed {
            user: user.clone(),
            host: host.clone(),
        },
        SshError::Timeout { what, after } => SshError::Timeout {
            what,
            after: *after,
        },
        SshError::Io(e) => SshError::Io(std::io::Error::new(e.kind(), e.to_string())),
        SshError::Key(s) => SshError::Key(s.clone()),
        SshError::Agent(s) => SshError::Agent(s.clone()),
        SshError::Disconnected => SshError::Disconnected,
        SshError::Protocol(s) => SshError::Protocol(s.clone()),
        other => SshError::Protocol(other.to_string()),
    }
}
