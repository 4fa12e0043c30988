//! [`TestSshd`]: a real OpenSSH server (Debian's `/usr/sbin/sshd`) on a free loopback port, for
//! tests of SSH code against the real thing.
//!
//! Each instance has its own temp dir holding an ed25519 host key, an authorized ed25519 client
//! key pair, a temp home dir, `authorized_keys`, the config and the log. It runs as the current
//! user (root on CI machines) with `StrictModes no`, `UsePAM no`, `PasswordAuthentication no` and
//! `PermitRootLogin prohibit-password`, and allows TCP forwarding (`AllowTcpForwarding yes`, for
//! `direct-tcpip` tests). [`TestSshd::cut_connections`] kills the live connections' processes
//! while the server keeps listening, to test reconnects. The server is killed on drop.
//!
//! Install the binaries with `cargo xtask setup` (the `openssh-server` and `openssh-client`
//! requirements: `sshd`, and `ssh-keygen`, `ssh-agent`, `ssh-add`).

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `openssh-server` installs the daemon.
pub const SSHD_PATH: &str = "/usr/sbin/sshd";

/// A running OpenSSH server on loopback; killed on drop.
pub struct TestSshd {
    dir: tempfile::TempDir,
    child: Child,
    addr: SocketAddr,
    user: String,
    host_key_public: String,
    client_key_private: String,
}

impl fmt::Debug for TestSshd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private key is deliberately left out.
        f.debug_struct("TestSshd")
            .field("addr", &self.addr)
            .field("dir", &self.dir.path())
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Generates an ed25519 key pair with `ssh-keygen` at `path` (private) and `path.pub`, and
/// returns the public key line (`ssh-ed25519 AAAA… comment`).
pub fn keygen_ed25519(path: &Path) -> io::Result<String> {
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "comfyfleet-test",
            "-f",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("running ssh-keygen (install it with `cargo xtask setup`): {e}"),
            )
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let public = std::fs::read_to_string(path.with_extension("pub"))?;
    Ok(public.trim().to_owned())
}

fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => std::env::var("USER").unwrap_or_else(|_| "root".to_owned()),
    }
}

impl TestSshd {
    /// Starts a server and waits until its port accepts connections, on a blocking thread (key
    /// generation and the wait for the port must not stall the async runtime).
    ///
    /// Fails with an error naming `cargo xtask setup` when `/usr/sbin/sshd` is missing.
    pub async fn start() -> io::Result<TestSshd> {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .map_err(|e| io::Error::other(format!("sshd start task: {e}")))?
    }

    /// [`TestSshd::start`] for synchronous code.
    pub fn start_blocking() -> io::Result<TestSshd> {
        if !Path::new(SSHD_PATH).exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{SSHD_PATH} is missing: run `cargo xtask setup` (installs openssh-server)"
                ),
            ));
        }
        // sshd needs its privilege separation directory when started as root.
        let _ = std::fs::create_dir_all("/run/sshd");

        let dir = tempfile::Builder::new()
            .prefix("comfyfleet-sshd-")
            .tempdir()?;
        let root = dir.path();
        let home = root.join("home");
        std::fs::create_dir_all(&home)?;
        let host_key = root.join("host_ed25519");
        let host_key_public = keygen_ed25519(&host_key)?;
        let client_key = root.join("client_ed25519");
        let client_public = keygen_ed25519(&client_key)?;
        let client_key_private = std::fs::read_to_string(&client_key)?;
        std::fs::write(root.join("authorized_keys"), format!("{client_public}\n"))?;
        let user = current_user();

        let mut last_err = None;
        // The free port can be taken between probing and binding: retry a few times.
        for _ in 0..5 {
            let port = free_port()?;
            let config = root.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\n\
                     ListenAddress 127.0.0.1\n\
                     HostKey {hk}\n\
                     PidFile {root}/sshd.pid\n\
                     AuthorizedKeysFile {root}/authorized_keys\n\
                     StrictModes no\n\
                     UsePAM no\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     PubkeyAuthentication yes\n\
                     PermitRootLogin prohibit-password\n\
                     AllowTcpForwarding yes\n\
                     MaxStartups 100\n\
                     MaxSessions 100\n\
                     LogLevel VERBOSE\n\
                     SetEnv HOME={home}\n\
                     Subsystem sftp internal-sftp\n",
                    hk = host_key.display(),
                    root = root.display(),
                    home = home.display(),
                ),
            )?;
            let log = std::fs::File::create(root.join("sshd.log"))?;
            let mut child = Command::new(SSHD_PATH)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = child.try_wait()? {
                    let log = std::fs::read_to_string(root.join("sshd.log")).unwrap_or_default();
                    last_err = Some(io::Error::other(format!(
                        "sshd exited with {status} on port {port}: {log}"
                    )));
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(TestSshd {
                        dir,
                        child,
                        addr,
                        user,
                        host_key_public,
                        client_key_private,
                    });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("sshd did not accept on {addr} within 10 s"),
                    ));
                    break;
                }
                // Synchronous by design: `start` runs this on a blocking thread, never on the
                // async runtime.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("sshd did not start")))
    }

    /// The loopback address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The user the server runs as, and the one to log in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The server's host public key line (`ssh-ed25519 AAAA… comment`).
    pub fn host_key_public(&self) -> &str {
        &self.host_key_public
    }

    /// A `known_hosts` line for this server: `[127.0.0.1]:PORT ssh-ed25519 AAAA…`.
    pub fn known_hosts_line(&self) -> String {
        let mut parts = self.host_key_public.split_whitespace();
        let algo = parts.next().unwrap_or_default();
        let key = parts.next().unwrap_or_default();
        format!("[127.0.0.1]:{} {algo} {key}", self.addr.port())
    }

    /// Writes a `known_hosts` file holding only this server's key into the temp dir, and returns
    /// its path.
    pub fn write_known_hosts(&self) -> io::Result<PathBuf> {
        let path = self.dir.path().join("known_hosts");
        std::fs::write(&path, format!("{}\n", self.known_hosts_line()))?;
        Ok(path)
    }

    /// Path of the authorized client private key (OpenSSH format, no passphrase).
    pub fn client_key_path(&self) -> PathBuf {
        self.dir.path().join("client_ed25519")
    }

    /// Contents of the authorized client private key (OpenSSH format, no passphrase).
    pub fn client_key_private(&self) -> &str {
        &self.client_key_private
    }

    /// The session's `HOME` (a temp dir; set with `SetEnv HOME=…`).
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// The server's temp dir (keys, config, log, pid file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Cuts every live SSH connection, the way a network drop or a server-side crash would: the
    /// per-connection sshd processes (the listener's children, and their descendants: privilege
    /// separation child, shells, commands) are killed with SIGKILL, so no disconnect message is
    /// sent. The listening sshd keeps running and accepts new connections.
    ///
    /// Returns once the killed processes are dead (their sockets closed), with how many there
    /// were. Runs on a blocking thread.
    pub async fn cut_connections(&self) -> io::Result<usize> {
        let pid = self.child.id();
        tokio::task::spawn_blocking(move || cut_descendants(pid))
            .await
            .map_err(|e| io::Error::other(format!("cut task: {e}")))?
    }

    /// [`TestSshd::cut_connections`] for synchronous code.
    pub fn cut_connections_blocking(&self) -> io::Result<usize> {
        cut_descendants(self.child.id())
    }

    /// The server's log so far (`sshd -e` output).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

/// `(pid, ppid, state)` of every process, from `/proc/*/stat`.
fn process_table() -> io::Result<Vec<(u32, u32, char)>> {
    let mut table = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while we read: a vanished one is simply skipped.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((state, ppid)) = parse_stat(&stat) {
            table.push((pid, ppid, state));
        }
    }
    Ok(table)
}

/// State and parent pid from a `/proc/PID/stat` line: `pid (comm) S ppid …`, where `comm` may
/// itself contain spaces and parentheses (hence the last `)`).
fn parse_stat(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Every live (non-zombie) descendant of `root`.
fn descendants(root: u32) -> io::Result<Vec<u32>> {
    let table = process_table()?;
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid, state) in &table {
            if ppid == parent && state != 'Z' && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    Ok(found)
}

fn cut_descendants(root: u32) -> io::Result<usize> {
    let victims = descendants(root)?;
    if victims.is_empty() {
        return Ok(0);
    }
    // `kill` exits non-zero when a process already exited on its own: that is fine.
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(victims.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    // Dead means gone or a zombie: either way its file descriptors (the connection) are closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<u32> = process_table()?
            .into_iter()
            .filter(|&(pid, _, state)| state != 'Z' && victims.contains(&pid))
            .map(|(pid, _, _)| pid)
            .collect();
        if alive.is_empty() {
            return Ok(victims.len());
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("sshd connection processes {alive:?} survived SIGKILL for 10 s"),
            ));
        }
        // Synchronous by design: runs on a blocking thread.
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for TestSshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        assert_eq!(
            parse_stat("42 (sshd: root@notty (x)) S 7 42 42 0 -1"),
            Some(('S', 7))
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn starts_and_accepts_the_system_ssh_client() -> io::Result<()> {
        let sshd = TestSshd::start_blocking()?;
        let known_hosts = sshd.write_known_hosts()?;
        let out = Command::new("ssh")
            .arg("-i")
            .arg(sshd.client_key_path())
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .args(["-o", "IdentitiesOnly=yes", "-F", "/dev/null"])
            .arg("-p")
            .arg(sshd.port().to_string())
            .arg(format!("{}@127.0.0.1", sshd.user()))
            .arg("echo hi; echo $HOME")
            .stdin(Stdio::null())
            .output()?;
        assert!(
            out.status.success(),
            "ssh failed: {}\nsshd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            sshd.log()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout,
            format!("hi\n{}\n", sshd.home().display()),
            "sshd log:\n{}",
            sshd.log()
        );
        assert!(!format!("{sshd:?}").contains("PRIVATE"));
        Ok(())
    }
}
