//! [`SshBackend`]: runs workflows on a remote GPU instance reached over SSH.
//!
//! ComfyUI on the instance listens on its own loopback only. The backend forwards a local port
//! to it over the SSH connection ([`SshSession::forward_local`]) and delegates everything to a
//! [`ComfyUiBackend`] pointed at that port. The forward's listener stays bound across
//! reconnects: when the connection drops, the in-flight HTTP calls and the WebSocket fail like
//! any transient network error, the ComfyUI backend reconnects its socket and falls back to
//! polling, and every new connection to the port goes through a fresh SSH connection — so a
//! cut tunnel costs a few seconds, not the job.
//!
//! With [`SshBackendConfig::start_command`] the backend starts ComfyUI itself when it does not
//! answer: detached from the SSH session (`setsid`, output to a log file on the instance, its
//! pid in a pid file), so it outlives connection drops; [`SshBackend::restarter`] gives the
//! installer a way to restart it after new nodes were installed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use comfyfleet_comfyui::{ComfyUiBackend, ComfyUiConfig};
use comfyfleet_core::{
    Artifact, Backend, BackendError, BackendId, ByteStream, CancelAck, Capabilities, Execution,
    Health, Inventory, RemoteRef, SubmitRequest, Upload,
};

use crate::forward::Opener;
use crate::installer::{InstanceConfig, Restarter};
use crate::{ExecOptions, Forward, SshError, SshSession};

/// Settings of one [`SshBackend`].
#[derive(Debug, Clone)]
pub struct SshBackendConfig {
    /// The instance: its name is the backend's id; `comfyui_port`, `comfyui_dir` and `python`
    /// are used here and by the installer.
    pub instance: InstanceConfig,
    /// Starts ComfyUI when it does not answer (an argv run in `comfyui_dir`, e.g.
    /// `["python3", "main.py", "--port", "8188"]`); `None`: ComfyUI is managed elsewhere.
    pub start_command: Option<Vec<String>>,
    /// How long a started ComfyUI may take to answer (default 5 min).
    pub start_timeout: Duration,
    /// The ComfyUI client's settings; its `base_url` is replaced by the forwarded port.
    pub comfyui: ComfyUiConfig,
}

impl SshBackendConfig {
    /// Defaults for `instance`.
    pub fn new(instance: InstanceConfig) -> SshBackendConfig {
        // Replaced by the forwarded port in `SshBackend::connect`.
        #[allow(clippy::expect_used, reason = "invariant: a constant, valid URL")]
        let placeholder = url::Url::parse("http://127.0.0.1:8188/").expect("valid URL");
        let comfyui = ComfyUiConfig::new(&instance.name, placeholder);
        SshBackendConfig {
            instance,
            start_command: None,
            start_timeout: Duration::from_secs(300),
            comfyui,
        }
    }
}

/// Why an [`SshBackend`] could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshBackendError {
    /// The SSH connection or the port forward failed.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// ComfyUI could not be started, or did not answer in time.
    #[error("{0}")]
    ComfyUi(String),
    /// The ComfyUI client could not be built.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Shell functions of the start and stop scripts. The pid file holds `PID START`, `START` being
/// the process's start time (`/proc/PID/stat` field 22): after a crash or a reboot of the
/// instance the pid may belong to an unrelated process, which must be neither taken for ComfyUI
/// nor killed. Without `/proc` only `kill -0` is checked.
const PID_FUNCTIONS: &str = r#"set -u
starttime() { [ -r "/proc/$1/stat" ] && sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
ours() {
  pid=""; start=""
  [ -f "$1" ] || return 1
  read -r pid start < "$1" || [ -n "$pid" ] || return 1
  case "$pid" in ""|*[!0-9]*) return 1;; esac
  kill -0 "$pid" 2>/dev/null || return 1
  now=$(starttime "$pid" || true)
  [ -z "$now" ] || [ "$now" = "$start" ]
}
"#;

/// Runs ComfyUI detached. `$1` log file, `$2` pid file, `$3` working directory, then the argv.
const START_SCRIPT: &str = r#"
log=$1; pidfile=$2; dir=$3; shift 3
if ours "$pidfile"; then echo "already running: $pid"; exit 0; fi
cd "$dir" || exit 30
setsid "$@" >>"$log" 2>&1 </dev/null &
pid=$!
echo "$pid $(starttime "$pid" || true)" > "$pidfile"
echo "started: $pid"
"#;

/// Stops the detached ComfyUI. `$1` pid file.
const STOP_SCRIPT: &str = r#"
pidfile=$1
if ! ours "$pidfile"; then rm -f "$pidfile"; echo "not running"; exit 0; fi
kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
i=0
while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
kill -KILL -- "-$pid" 2>/dev/null || true
rm -f "$pidfile"
echo stopped
"#;

struct Managed {
    session: SshSession,
    /// The forward `base` points at: a restarter handed to an installer outlives the backend.
    _forward: Arc<Forward>,
    dir: String,
    argv: Vec<String>,
    base: String,
    timeout: Duration,
    starting: tokio::sync::Mutex<()>,
}

impl Managed {
    fn pid_file(&self) -> String {
        format!("{}/.comfyfleet-comfyui.pid", self.dir)
    }

    fn log_file(&self) -> String {
        format!("{}/.comfyfleet-comfyui.log", self.dir)
    }

    async fn script(&self, script: &str, args: Vec<String>) -> Result<(), String> {
        let mut argv = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("{PID_FUNCTIONS}{script}"),
            "comfyfleet-comfyui".to_owned(),
        ];
        argv.extend(args);
        let out = self
            .session
            .run(
                &argv,
                ExecOptions {
                    pty: false,
                    timeout: Some(Duration::from_secs(60)),
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            let last = out.lines.last().map(|l| l.text.clone()).unwrap_or_default();
            Err(format!("{:?}: {last}", out.status))
        }
    }

    async fn start(&self) -> Result<(), String> {
        let mut args = vec![self.log_file(), self.pid_file(), self.dir.clone()];
        args.extend(self.argv.iter().cloned());
        self.script(START_SCRIPT, args).await?;
        wait_answering(&self.base, self.timeout).await
    }

    async fn stop(&self) -> Result<(), String> {
        self.script(STOP_SCRIPT, vec![self.pid_file()]).await
    }
}

#[async_trait]
impl Restarter for Managed {
    async fn restart(&self) -> Result<(), String> {
        let _one = self.starting.lock().await;
        self.stop().await?;
        self.start().await
    }
}

async fn answering(base: &str) -> bool {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    else {
        return false;
    };
    client
        .get(format!("{base}/api/system_stats"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn wait_answering(base: &str, limit: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if answering(base).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "ComfyUI did not answer within {limit:?} of its start"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A ComfyUI on a remote instance, reached through an SSH port forward. See the
/// [module docs](self).
pub struct SshBackend {
    id: BackendId,
    session: SshSession,
    forward: Arc<Forward>,
    inner: ComfyUiBackend,
    managed: Option<Arc<Managed>>,
}

impl std::fmt::Debug for SshBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshBackend")
            .field("id", &self.id)
            .field("forward", &self.forward.local_addr())
            .finish_non_exhaustive()
    }
}

impl SshBackend {
    /// Sets the backend up without connecting: the forward's local port is bound at once and
    /// connects (and reconnects) on first use; a configured ComfyUI is started by the first
    /// [`health`](Backend::health) check that finds it not answering. An unreachable instance
    /// is an unhealthy backend, not an error here.
    pub async fn new(
        config: SshBackendConfig,
        session: SshSession,
    ) -> Result<SshBackend, SshBackendError> {
        let forward = Arc::new(
            Forward::bind(
                Opener::Session(session.clone()),
                "127.0.0.1",
                config.instance.comfyui_port,
            )
            .await?,
        );
        let base = format!("http://{}", forward.local_addr());
        let mut comfyui = config.comfyui.clone();
        comfyui.id = BackendId::new(config.instance.name.clone());
        comfyui.base_url = base
            .parse()
            .map_err(|e| SshBackendError::ComfyUi(format!("forward address {base}: {e}")))?;
        let inner = ComfyUiBackend::new(comfyui)?;
        let managed = config.start_command.as_ref().map(|argv| {
            Arc::new(Managed {
                session: session.clone(),
                _forward: forward.clone(),
                dir: config.instance.comfyui_dir.clone(),
                argv: argv.clone(),
                base: base.clone(),
                timeout: config.start_timeout,
                starting: tokio::sync::Mutex::new(()),
            })
        });
        Ok(SshBackend {
            id: BackendId::new(config.instance.name.clone()),
            session,
            forward,
            inner,
            managed,
        })
    }

    /// [`new`](SshBackend::new), then connects and (with a start command) starts ComfyUI, so
    /// configuration errors show up at once.
    pub async fn connect(
        config: SshBackendConfig,
        session: SshSession,
    ) -> Result<SshBackend, SshBackendError> {
        let backend = SshBackend::new(config, session).await?;
        backend.session.client().await?;
        backend
            .ensure_started()
            .await
            .map_err(SshBackendError::ComfyUi)?;
        Ok(backend)
    }

    /// With a start command: starts ComfyUI unless it answers (one start at a time).
    pub async fn ensure_started(&self) -> Result<(), String> {
        let Some(m) = &self.managed else {
            return Ok(());
        };
        let _one = m.starting.lock().await;
        if answering(&m.base).await {
            return Ok(());
        }
        tracing::info!(backend = %self.id, "starting ComfyUI on the instance");
        m.start().await
    }

    /// The local end of the forward to ComfyUI.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.forward.local_addr()
    }

    /// The SSH session (shared with an installer for the same instance).
    pub fn session(&self) -> &SshSession {
        &self.session
    }

    /// Restarts the ComfyUI this backend started, for [`crate::installer::RestartMethod::Custom`];
    /// `None` without a start command.
    pub fn restarter(&self) -> Option<Arc<dyn Restarter>> {
        self.managed.clone().map(|m| m as Arc<dyn Restarter>)
    }

    /// Stops the ComfyUI this backend started (no-op without a start command).
    pub async fn stop_comfyui(&self) -> Result<(), String> {
        match &self.managed {
            Some(m) => m.stop().await,
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Backend for SshBackend {
    fn id(&self) -> &BackendId {
        &self.id
    }

    fn kind(&self) -> &'static str {
        "ssh"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            restart: self.managed.is_some(),
            ..self.inner.capabilities()
        }
    }

    async fn inventory(&self) -> Result<Inventory, BackendError> {
        let mut inv = self.inner.inventory().await?;
        inv.labels
            .entry("transport".into())
            .or_insert_with(|| "ssh".into());
        Ok(inv)
    }

    async fn health(&self) -> Health {
        if let Err(e) = self.session.client().await {
            return Health::down(format!("ssh: {e}"));
        }
        if let Err(e) = self.ensure_started().await {
            return Health::down(format!("starting ComfyUI: {e}"));
        }
        self.inner.health().await
    }

    async fn submit(&self, request: SubmitRequest) -> Result<Execution, BackendError> {
        self.inner.submit(request).await
    }

    async fn cancel(&self, remote: &RemoteRef) -> Result<CancelAck, BackendError> {
        self.inner.cancel(remote).await
    }

    async fn reattach(&self, remote: &RemoteRef) -> Result<Option<Execution>, BackendError> {
        self.inner.reattach(remote).await
    }

    async fn restart(&self) -> Result<(), BackendError> {
        match &self.managed {
            Some(m) => m.restart().await.map_err(|message| {
                BackendError::Execution(comfyfleet_core::ExecutionError::transient(format!(
                    "restarting ComfyUI on {}: {message}",
                    self.id
                )))
            }),
            None => Err(BackendError::NotSupported {
                backend: self.id.clone(),
                operation: "restart",
            }),
        }
    }

    async fn upload(&self, upload: &Upload, bytes: Bytes) -> Result<(), BackendError> {
        self.inner.upload(upload, bytes).await
    }

    async fn fetch(&self, artifact: &Artifact) -> Result<ByteStream, BackendError> {
        self.inner.fetch(artifact).await
    }
}
