//! [`TestInstance`]: a remote GPU instance on loopback for install and SSH-backend tests.
//!
//! * a real OpenSSH server ([`TestSshd`]);
//! * a ComfyUI folder (`root/ComfyUI/custom_nodes`) watched by a [`ComfyUiSim`] that loads the
//!   packs' `NODE_CLASS_MAPPINGS` at start and on `/api/manager/reboot`;
//! * custom-node packs as local git repos ([`TestInstance::pack`]), reached by `file://` URLs
//!   (no network);
//! * a fake Python (`root/fake-python`) whose `-m pip install -r FILE` succeeds, fails for a
//!   requirement `fail-me` (exit 1), prints pip's error but exits 0 for `lie`, and for `hang`
//!   writes its pid to [`TestInstance::hang_pid`] and sleeps; `lines=N` prints N lines first.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::comfyui_sim::{ComfyUiSim, SimConfig};
use crate::sshd::TestSshd;

/// The fake Python; see the [module docs](self).
pub const FAKE_PYTHON: &str = r#"#!/bin/sh
req=""
while [ $# -gt 0 ]; do case "$1" in -r) req=$2; shift 2;; *) shift;; esac; done
echo "Collecting requirements from $req"
if grep -q fail-me "$req"; then
  echo "ERROR: Could not find a version that satisfies the requirement fail-me (from versions: none)"
  echo "ERROR: No matching distribution found for fail-me"
  exit 1
fi
if grep -q lie "$req"; then
  echo "ERROR: No matching distribution found for lie"
  exit 0
fi
if grep -q hang "$req"; then
  echo $$ > "$(dirname "$0")/hang.pid"
  echo "Building wheel for hang (this takes a while)"
  exec sleep 600
fi
n=$(sed -n 's/^lines=//p' "$req")
if [ -n "$n" ]; then seq 1 "$n" | sed 's/^/Collecting line /'; fi
echo "Successfully installed $(tr '\n' ' ' < "$req")"
"#;

/// See the [module docs](self).
pub struct TestInstance {
    /// The SSH server.
    pub sshd: TestSshd,
    /// The instance's files (`ComfyUI/`, `repos/`, `fake-python`).
    pub root: tempfile::TempDir,
    /// The instance's ComfyUI.
    pub sim: ComfyUiSim,
}

impl std::fmt::Debug for TestInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestInstance")
            .field("root", &self.root.path())
            .field("sim", &self.sim.addr())
            .finish_non_exhaustive()
    }
}

impl TestInstance {
    /// Starts sshd and the simulator (unscaled time, 300 ms restarts).
    pub async fn start() -> io::Result<TestInstance> {
        TestInstance::start_with(SimConfig::default()).await
    }

    /// Starts sshd and a simulator from `config` (its custom-nodes folder is set here).
    pub async fn start_with(config: SimConfig) -> io::Result<TestInstance> {
        let sshd = TestSshd::start().await?;
        let root = tempfile::tempdir()?;
        let comfy = root.path().join("ComfyUI");
        std::fs::create_dir_all(comfy.join("custom_nodes"))?;
        std::fs::create_dir_all(root.path().join("repos"))?;
        let python = root.path().join("fake-python");
        std::fs::write(&python, FAKE_PYTHON)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755))?;
        let sim = ComfyUiSim::start(
            config
                .custom_nodes_dir(comfy.join("custom_nodes"))
                .restart_delay(Duration::from_millis(300)),
        )
        .await?;
        Ok(TestInstance { sshd, root, sim })
    }

    /// The ComfyUI folder.
    pub fn comfy(&self) -> PathBuf {
        self.root.path().join("ComfyUI")
    }

    /// The fake Python's path.
    pub fn python(&self) -> PathBuf {
        self.root.path().join("fake-python")
    }

    /// ComfyUI's port "on the instance" (the simulator's).
    pub fn comfyui_port(&self) -> u16 {
        self.sim.addr().port()
    }

    /// Where a `hang` requirement writes its pid.
    pub fn hang_pid(&self) -> PathBuf {
        self.root.path().join("hang.pid")
    }

    /// A git repo `repos/<name>` whose `__init__.py` declares `classes` (none: no
    /// `NODE_CLASS_MAPPINGS` at all), with an optional `requirements.txt`. Returns its
    /// `file://` URL and head commit.
    pub fn pack(
        &self,
        name: &str,
        classes: &[&str],
        requirements: Option<&str>,
    ) -> io::Result<(String, String)> {
        let dir = self.root.path().join("repos").join(name);
        std::fs::create_dir_all(&dir)?;
        let init = if classes.is_empty() {
            "# this pack forgot its mappings\nimport os\n".to_owned()
        } else {
            let entries: Vec<String> = classes
                .iter()
                .map(|c| format!("    \"{c}\": object,"))
                .collect();
            format!("NODE_CLASS_MAPPINGS = {{\n{}\n}}\n", entries.join("\n"))
        };
        std::fs::write(dir.join("__init__.py"), init)?;
        if let Some(r) = requirements {
            std::fs::write(dir.join("requirements.txt"), r)?;
        }
        git(&dir, &["init", "-q", "-b", "main"])?;
        git(&dir, &["add", "."])?;
        git(&dir, &["commit", "-q", "-m", "pack"])?;
        let head = git(&dir, &["rev-parse", "HEAD"])?;
        Ok((format!("file://{}", dir.display()), head))
    }
}

/// Runs git in `dir` (with a fixed identity) and returns its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> io::Result<String> {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether a process is alive (exists and is not a zombie).
pub fn pid_alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}
