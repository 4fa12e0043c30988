//! Local port forwarding (`ssh -L`): [`Forward`] listens on a loopback port and turns each
//! accepted TCP connection into a `direct-tcpip` channel to a host:port as seen from the server.
//!
//! Where the channels come from is an [`Opener`]: one [`SshClient`](crate::SshClient)'s
//! connection (the forward dies with it), or an [`SshSession`] (the forward outlives reconnects).
//! Reconnecting itself lives in `session.rs`, not here.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use russh::client;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::{SshError, SshSession, Verifier};

/// Where a forward's channels are opened.
pub(crate) enum Opener {
    /// One connection, held weakly: the forward never keeps it alive.
    Client {
        handle: Weak<client::Handle<Verifier>>,
        timeout: Duration,
    },
    /// Whatever connection the session has live, reconnecting as needed.
    Session(SshSession),
}

impl Opener {
    async fn open(
        &self,
        host: &str,
        port: u16,
        originator: SocketAddr,
    ) -> Result<russh::Channel<client::Msg>, SshError> {
        match self {
            Opener::Client { handle, timeout } => {
                let handle = handle.upgrade().ok_or(SshError::Disconnected)?;
                if handle.is_closed() {
                    return Err(SshError::Disconnected);
                }
                crate::open_direct_tcpip(&handle, *timeout, host, port, originator).await
            }
            Opener::Session(session) => session.open_direct_tcpip(host, port, originator).await,
        }
    }
}

/// A forwarded loopback port (see [`SshClient::forward_local`](crate::SshClient::forward_local)
/// and [`SshSession::forward_local`]). Connect to [`local_addr`](Forward::local_addr) to reach
/// the remote end. Dropping it stops the listener and closes the connections it carries.
pub struct Forward {
    local_addr: SocketAddr,
    remote_host: String,
    remote_port: u16,
    task: JoinHandle<()>,
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("local_addr", &self.local_addr)
            .field("remote_host", &self.remote_host)
            .field("remote_port", &self.remote_port)
            .finish_non_exhaustive()
    }
}

impl Forward {
    /// Binds `127.0.0.1:0` and starts accepting.
    pub(crate) async fn bind(
        opener: Opener,
        remote_host: &str,
        remote_port: u16,
    ) -> Result<Forward, SshError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let local_addr = listener.local_addr()?;
        tracing::debug!(%local_addr, remote_host, remote_port, "ssh forward listening");
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::new(opener),
            remote_host.to_owned(),
            remote_port,
        ));
        Ok(Forward {
            local_addr,
            remote_host: remote_host.to_owned(),
            remote_port,
            task,
        })
    }

    /// The loopback address to connect to (`127.0.0.1:PORT`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The forwarded-to host and port, as seen from the server.
    pub fn remote(&self) -> (&str, u16) {
        (&self.remote_host, self.remote_port)
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        // Aborting the accept loop drops the listener and its JoinSet, which aborts every
        // connection it carries.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, opener: Arc<Opener>, host: String, port: u16) {
    let host: Arc<str> = host.into();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    conns.spawn(carry(tcp, peer, opener.clone(), host.clone(), port));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "ssh forward: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Carries one local connection over a new channel; on any failure the local connection is
/// simply closed, which is what a client of a dead `ssh -L` sees too.
async fn carry(
    mut tcp: TcpStream,
    peer: SocketAddr,
    opener: Arc<Opener>,
    host: Arc<str>,
    port: u16,
) {
    let _ = tcp.set_nodelay(true);
    let channel = match opener.open(&host, port, peer).await {
        Ok(channel) => channel,
        Err(e) => {
            tracing::warn!(remote_host = %host, remote_port = port, error = %e, "ssh forward: cannot open a channel");
            return;
        }
    };
    let mut stream = channel.into_stream();
    match tokio::io::copy_bidirectional(&mut tcp, &mut stream).await {
        Ok((up, down)) => {
            tracing::trace!(remote_host = %host, remote_port = port, up, down, "ssh forward: connection done");
        }
        Err(e) => {
            tracing::debug!(remote_host = %host, remote_port = port, error = %e, "ssh forward: connection ended");
        }
    }
}
