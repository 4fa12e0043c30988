//! `kind = "ssh"`: remote GPU instances reached over SSH (feature `ssh`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::FleetError;

/// A remote GPU instance reached over SSH: a backend (ComfyUI through a port forward) and a
/// target for custom-node installs (see `docs/backends/ssh.md`).
///
/// Authentication: `key_file`, or the private key in the environment variable `key_env`, or
/// the SSH agent (`agent = true`, or when no key is given). Keys never appear in logs, errors or
/// API answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshInstance {
    /// Its id in the fleet (backend and install instance name).
    pub id: String,
    /// Host name or address.
    pub host: String,
    /// SSH port (default 22).
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Private key file.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the private key itself.
    #[serde(default)]
    pub key_env: Option<String>,
    /// Environment variable holding the key's passphrase.
    #[serde(default)]
    pub key_passphrase_env: Option<String>,
    /// Authenticate with the SSH agent (`$SSH_AUTH_SOCK`).
    #[serde(default)]
    pub agent: bool,
    /// The `known_hosts` file the host key is checked against (default `~/.ssh/known_hosts`).
    #[serde(default)]
    pub known_hosts: Option<PathBuf>,
    /// Learn an unknown host's key on first connect (off by default).
    #[serde(default)]
    pub trust_on_first_use: bool,
    /// ComfyUI's directory on the instance.
    pub comfyui_dir: String,
    /// ComfyUI's port on the instance's loopback (default 8188).
    #[serde(default = "default_comfyui_port")]
    pub comfyui_port: u16,
    /// The Python that runs ComfyUI (argv prefix, default `["python3"]`).
    #[serde(default)]
    pub python: Option<Vec<String>>,
    /// Start ComfyUI with this argv (in `comfyui_dir`) when it does not answer; the backend
    /// then also restarts it after installs.
    #[serde(default)]
    pub start_command: Option<Vec<String>>,
    /// Restart ComfyUI after installs with this argv instead (default: the managed process with
    /// `start_command`, else ComfyUI-Manager's `/api/manager/reboot`).
    #[serde(default)]
    pub restart_command: Option<Vec<String>>,
    /// Extra prompts kept queued on it (0: one at a time).
    #[serde(default)]
    pub prefetch: u32,
    /// Labels for routing constraints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_ssh_port() -> u16 {
    22
}

fn default_comfyui_port() -> u16 {
    8188
}

/// What the fleet builds from one [`SshInstance`].
pub(crate) struct BuiltInstance {
    pub backend: comfyfleet_ssh::backend::SshBackend,
    pub instance: comfyfleet_ssh::installer::InstanceConfig,
    pub session: comfyfleet_ssh::SshSession,
}

impl SshInstance {
    fn target(
        &self,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<comfyfleet_ssh::SshTarget, FleetError> {
        use comfyfleet_ssh::SshKey;
        use secrecy::SecretString;
        let bad = |reason: String| FleetError::Backend {
            id: self.id.clone(),
            reason,
        };
        if self.id.trim().is_empty() {
            return Err(bad("id must not be empty".into()));
        }
        if self.host.trim().is_empty() || self.user.trim().is_empty() {
            return Err(bad("host and user must not be empty".into()));
        }
        if self.comfyui_dir.trim().is_empty() {
            return Err(bad("comfyui_dir must not be empty".into()));
        }
        let passphrase = match &self.key_passphrase_env {
            Some(var) => Some(SecretString::from(lookup(var).ok_or_else(|| {
                bad(format!(
                    "environment variable {var} (key_passphrase_env) is not set"
                ))
            })?)),
            None => None,
        };
        let given = [self.key_file.is_some(), self.key_env.is_some(), self.agent]
            .iter()
            .filter(|b| **b)
            .count();
        if given > 1 {
            return Err(bad("give one of key_file, key_env and agent = true".into()));
        }
        let key = if let Some(path) = &self.key_file {
            SshKey::File {
                path: path.clone(),
                passphrase,
            }
        } else if let Some(var) = &self.key_env {
            let contents = lookup(var)
                .ok_or_else(|| bad(format!("environment variable {var} (key_env) is not set")))?;
            SshKey::Inline {
                contents: SecretString::from(contents),
                passphrase,
            }
        } else {
            SshKey::Agent { socket: None }
        };
        let known_hosts = match &self.known_hosts {
            Some(p) => p.clone(),
            None => lookup("HOME")
                .map(|h| PathBuf::from(h).join(".ssh/known_hosts"))
                .ok_or_else(|| bad("known_hosts is not set and neither is HOME".into()))?,
        };
        let mut target = comfyfleet_ssh::SshTarget::new(
            self.host.clone(),
            self.port,
            self.user.clone(),
            key,
            known_hosts,
        );
        target.trust_on_first_use = self.trust_on_first_use;
        Ok(target)
    }

    /// Builds the session, the backend and the installer's instance entry (no connection yet).
    pub(crate) async fn build(
        &self,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<BuiltInstance, FleetError> {
        use comfyfleet_ssh::backend::{SshBackend, SshBackendConfig};
        use comfyfleet_ssh::installer::{InstanceConfig, RestartMethod};
        let bad = |reason: String| FleetError::Backend {
            id: self.id.clone(),
            reason,
        };
        let target = self.target(lookup)?;
        for (field, argv) in [
            ("python", &self.python),
            ("start_command", &self.start_command),
            ("restart_command", &self.restart_command),
        ] {
            if argv
                .as_ref()
                .is_some_and(|a| a.is_empty() || a[0].trim().is_empty())
            {
                return Err(bad(format!("{field} must be a non-empty argv list")));
            }
        }
        let session = comfyfleet_ssh::SshSession::new(target);
        let mut instance = InstanceConfig::new(self.id.clone(), self.comfyui_dir.clone());
        instance.comfyui_port = self.comfyui_port;
        if let Some(p) = &self.python {
            instance.python = p.clone();
        }
        if let Some(cmd) = &self.restart_command {
            instance.restart = RestartMethod::Command(cmd.clone());
        }
        let mut config = SshBackendConfig::new(instance.clone());
        config.start_command = self.start_command.clone();
        config.comfyui.prefetch = self.prefetch;
        config.comfyui.labels = self.labels.clone();
        config.comfyui.http_timeout = Duration::from_secs(10);
        let backend = SshBackend::new(config, session.clone())
            .await
            .map_err(|e| bad(e.to_string()))?;
        if self.restart_command.is_none()
            && let Some(r) = backend.restarter()
        {
            instance.restart = RestartMethod::Custom(r);
        }
        Ok(BuiltInstance {
            backend,
            instance,
            session,
        })
    }
}
