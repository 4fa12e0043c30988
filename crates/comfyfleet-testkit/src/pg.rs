//! [`TestPostgres`]: a private PostgreSQL cluster on a free loopback port, for tests that must
//! stop, restart or kill the database without disturbing any other test (or the shared server on
//! port 5432 that the ordinary PostgreSQL store tests use).
//!
//! Each instance has its own temp dir holding the data directory (`data/`, made by `initdb` with
//! trust authentication for user `postgres`), the Unix socket directory (`sock/`) and the server
//! log (`log`). The server listens on `127.0.0.1` only, with `fsync=off` (a killed server still
//! keeps every committed row: the kernel's page cache survives a process crash) and
//! `max_connections=200`. These settings live in `data/comfyfleet-test.conf`, included from
//! `postgresql.conf`, so no option string goes through `pg_ctl -o`'s shell.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, `initdb` and `pg_ctl` run
//! through `runuser -u postgres --` and the temp dir is handed to the `postgres` OS user.
//!
//! Every method is synchronous (it runs `pg_ctl` and waits for it): call them directly from
//! synchronous tests, and through `tokio::task::spawn_blocking` from async code that must not
//! stall its runtime. The cluster is stopped (`pg_ctl stop -m immediate`) and its dir removed on
//! drop.
//!
//! Install the binaries with `cargo xtask setup` (the `postgresql` requirement): they are found
//! on `PATH` or under `/usr/lib/postgresql/<version>/bin/` (the highest version).

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `postgresql` packages install the server binaries, one dir per major version.
pub const DEBIAN_PG_LIB: &str = "/usr/lib/postgresql";

/// The OS user the server runs as when the tests run as root.
const PG_OS_USER: &str = "postgres";

/// Name of the settings file written into the data dir and included from `postgresql.conf`.
const CONF_FILE: &str = "comfyfleet-test.conf";

/// A private PostgreSQL cluster on loopback; stopped and deleted on drop.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Run the server tools through `runuser -u postgres --` (we are root).
    as_pg_user: bool,
}

impl fmt::Debug for TestPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestPostgres")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .field("bin", &self.bin)
            .field("as_pg_user", &self.as_pg_user)
            .finish()
    }
}

impl TestPostgres {
    /// Creates a cluster in a new temp dir and starts it on a free loopback port; returns once it
    /// accepts connections.
    ///
    /// Fails with an [`io::ErrorKind::NotFound`] error naming `cargo xtask setup` when `initdb`,
    /// `pg_ctl` or `postgres` cannot be found.
    pub fn start() -> io::Result<TestPostgres> {
        let bin = find_bin_dir().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "initdb, pg_ctl and postgres are missing (looked on PATH and in \
                     {DEBIAN_PG_LIB}/*/bin): run `cargo xtask setup` (installs postgresql)"
                ),
            )
        })?;
        let as_pg_user = effective_uid_is_root();

        let dir = tempfile::Builder::new()
            .prefix("comfyfleet-pg-")
            .tempdir()?;
        std::fs::create_dir(dir.path().join("sock"))?;
        if as_pg_user {
            run_checked(
                Command::new("chown")
                    .args(["-R", PG_OS_USER])
                    .arg(dir.path()),
                "chown",
            )?;
        }
        let mut pg = TestPostgres {
            dir,
            bin,
            port: 0,
            as_pg_user,
        };

        let mut initdb = pg.server_tool("initdb");
        initdb.arg("-D").arg(pg.data_dir()).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        run_checked(&mut initdb, "initdb")?;
        // `include` resolves relative to postgresql.conf; later settings win.
        let conf = pg.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(&format!("\ninclude '{CONF_FILE}'\n"));
        std::fs::write(&conf, text)?;

        let mut last_err = None;
        // The free port can be taken between probing and binding: retry a few times.
        for _ in 0..5 {
            pg.port = free_port()?;
            pg.write_settings()?;
            match pg.start_again() {
                Ok(()) => return Ok(pg),
                Err(e) => {
                    // A server that came up but failed the readiness check must not linger.
                    let _ = pg.pg_ctl_stop("immediate");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("postgres did not start")))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the cluster's default database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `name` on this cluster (which need not exist yet).
    pub fn url_for(&self, name: &str) -> String {
        let mut url = url::Url::parse(&format!("postgres://postgres@127.0.0.1:{}/", self.port))
            .unwrap_or_else(|_| unreachable!("a fixed well-formed URL"));
        // A `postgres://` URL with a host always has a path to push onto.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.clear().push(name);
        }
        url.into()
    }

    /// The loopback port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The loopback address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The cluster's temp dir (`data/`, `sock/`, `log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory the PostgreSQL binaries were found in.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Creates database `name` (`createdb`) and returns its URL.
    pub fn create_database(&self, name: &str) -> io::Result<String> {
        let mut createdb = Command::new(self.client_tool("createdb"));
        createdb
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("--")
            .arg(name);
        run_checked(&mut createdb, "createdb")?;
        Ok(self.url_for(name))
    }

    /// Runs `sql` in `database` with `psql -X -A -t -v ON_ERROR_STOP=1` and returns its output
    /// (unaligned, tuples only: one row per line, columns separated by `|`).
    pub fn psql(&self, database: &str, sql: &str) -> io::Result<String> {
        let mut psql = Command::new(self.client_tool("psql"));
        psql.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("-d")
            .arg(database)
            .arg("-c")
            .arg(sql);
        let out = run_checked(&mut psql, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`: open sessions are disconnected, the data
    /// is checkpointed). The data stays; [`TestPostgres::start_again`] brings it back.
    pub fn stop(&self) -> io::Result<()> {
        self.pg_ctl_stop("fast")
    }

    /// Starts the stopped (or killed) server again on the same port over the same data, and
    /// waits until it accepts connections. After [`TestPostgres::kill`] this runs crash
    /// recovery. Fails if another process took the port while the server was down.
    pub fn start_again(&self) -> io::Result<()> {
        self.remove_stale_lock_files()?;
        let mut pg_ctl = self.server_tool("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "60", "start"]);
        run_checked(&mut pg_ctl, "pg_ctl start").map_err(|e| self.with_log(e))?;
        self.wait_ready(Duration::from_secs(30))
    }

    /// [`TestPostgres::stop`] then [`TestPostgres::start_again`]: the data is kept, every open
    /// connection is closed.
    pub fn restart(&self) -> io::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Crashes the server: SIGKILL to the postmaster and all its server processes at once, as a
    /// machine crash or an OOM kill would; no shutdown checkpoint, clients see their connections
    /// drop. Returns once they are all dead. [`TestPostgres::start_again`] then recovers every
    /// committed transaction.
    pub fn kill(&self) -> io::Result<()> {
        let pid = self.postmaster_pid().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "postgres is not running (no data/postmaster.pid)",
            )
        })?;
        let mut victims = vec![pid];
        victims.extend(children(pid)?);
        kill_and_wait(&victims)
    }

    /// The postmaster's pid, from the first line of `data/postmaster.pid`; `None` when the
    /// server is stopped (a killed server leaves a stale pid behind).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The server log so far (every start, stop and crash recovery of this cluster).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Removes `data/postmaster.pid` and `sock/.s.PGSQL.*.lock` when the pid they name is dead.
    ///
    /// PostgreSQL removes stale lock files itself, but it tests the pid with `kill(pid, 0)`, which
    /// succeeds on a zombie: a killed postmaster waiting to be reaped by init would make the next
    /// start fail with "lock file already exists".
    fn remove_stale_lock_files(&self) -> io::Result<()> {
        let mut locks = vec![self.data_dir().join("postmaster.pid")];
        for entry in std::fs::read_dir(self.dir.path().join("sock"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|ext| ext == "lock") {
                locks.push(path);
            }
        }
        for lock in locks {
            let pid = std::fs::read_to_string(&lock)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok());
            if let Some(pid) = pid
                && !is_alive(pid)
            {
                std::fs::remove_file(&lock)?;
            }
        }
        Ok(())
    }

    /// Writes the settings file: loopback only, our port and socket dir, fast and roomy.
    fn write_settings(&self) -> io::Result<()> {
        let sock = self.dir.path().join("sock");
        let sock = sock
            .to_str()
            .ok_or_else(|| io::Error::other(format!("temp dir {} is not UTF-8", sock.display())))?;
        std::fs::write(
            self.data_dir().join(CONF_FILE),
            format!(
                "# Written by comfyfleet_testkit::pg::TestPostgres.\n\
                 port = {port}\n\
                 listen_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{sock}'\n\
                 fsync = off\n\
                 full_page_writes = off\n\
                 max_connections = 200\n\
                 shared_buffers = 32MB\n",
                port = self.port,
                sock = sock.replace('\'', "''"),
            ),
        )
    }

    fn pg_ctl_stop(&self, mode: &str) -> io::Result<()> {
        let mut pg_ctl = self.server_tool("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "-m", mode, "stop"]);
        run_checked(&mut pg_ctl, "pg_ctl stop")
            .map(drop)
            .map_err(|e| self.with_log(e))
    }

    /// Waits until the server accepts connections: `pg_isready` when it is installed, else a TCP
    /// connect.
    fn wait_ready(&self, timeout: Duration) -> io::Result<()> {
        let pg_isready = self.client_tool("pg_isready");
        let deadline = Instant::now() + timeout;
        loop {
            let ready = match Command::new(&pg_isready)
                .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-p"])
                .arg(self.port.to_string())
                .stdin(Stdio::null())
                .status()
            {
                Ok(status) => status.success(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok()
                }
                Err(e) => return Err(e),
            };
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.with_log(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "postgres did not accept on {} within {timeout:?}",
                        self.addr()
                    ),
                )));
            }
            // Synchronous by design: see the module docs.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A command for `initdb` / `pg_ctl`: as the `postgres` OS user when we are root, from a
    /// working dir that user can enter.
    fn server_tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut cmd = if self.as_pg_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", PG_OS_USER, "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    /// `psql`, `createdb`, `pg_isready`: next to the server binaries if there, else from `PATH`.
    fn client_tool(&self, name: &str) -> PathBuf {
        let path = self.bin.join(name);
        if is_executable(&path) {
            path
        } else {
            PathBuf::from(name)
        }
    }

    fn with_log(&self, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            format!(
                "{e}\npostgres log ({}):\n{}",
                self.dir.path().display(),
                self.log()
            ),
        )
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if self.pg_ctl_stop("immediate").is_err()
            && let Some(pid) = self.postmaster_pid()
            && is_alive(pid)
        {
            // pg_ctl could not stop it (e.g. a wedged server): do not leave it behind.
            let mut victims = vec![pid];
            victims.extend(children(pid).unwrap_or_default());
            let _ = kill_and_wait(&victims);
        }
        // The TempDir field then removes the dir (root may remove the postgres user's files).
    }
}

/// The dir holding `initdb`, `pg_ctl` and `postgres`: the one `initdb` on `PATH` resolves to
/// (Debian only puts wrappers on `PATH`, but a machine may link the real binaries there), else
/// the highest version under [`DEBIAN_PG_LIB`].
fn find_bin_dir() -> Option<PathBuf> {
    let has_all = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| is_executable(&dir.join(b)))
    };
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let initdb = dir.join("initdb");
            if !is_executable(&initdb) {
                continue;
            }
            if let Some(real_dir) = std::fs::canonicalize(&initdb)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                && has_all(&real_dir)
            {
                return Some(real_dir);
            }
            if has_all(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(DEBIAN_PG_LIB)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = parse_version(name.to_str()?)?;
            let bin = entry.path().join("bin");
            has_all(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// `15` → `[15]`, `9.6` → `[9, 6]`; `None` for anything else.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether the effective uid is 0, from the `Uid:` line of `/proc/self/status` (real, effective,
/// saved, fs).
fn effective_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// Runs `cmd` to completion; a non-zero exit is an error carrying its output.
fn run_checked(cmd: &mut Command, what: &str) -> io::Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("running {what} ({cmd:?}): {e}; run `cargo xtask setup` (installs postgresql)"),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out)
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

/// Whether `pid` exists and is not a zombie (a zombie's sockets and shared memory are released).
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| parse_stat(&stat))
        .is_some_and(|(state, _)| state != 'Z')
}

/// The live direct children of `parent` (a postmaster's children are all its server processes).
fn children(parent: u32) -> io::Result<Vec<u32>> {
    let mut found = Vec::new();
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
        if let Some((state, ppid)) = parse_stat(&stat)
            && ppid == parent
            && state != 'Z'
        {
            found.push(pid);
        }
    }
    Ok(found)
}

/// SIGKILLs `pids` in one `kill` and waits until none is alive.
fn kill_and_wait(pids: &[u32]) -> io::Result<()> {
    // `kill` exits non-zero when a process already exited on its own: that is fine.
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&pid| is_alive(pid)).collect();
        if alive.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("postgres processes {alive:?} survived SIGKILL for 10 s"),
            ));
        }
        // Synchronous by design: see the module docs.
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("15-beta"), None);
        let mut v = [
            parse_version("9.6"),
            parse_version("15"),
            parse_version("13"),
        ];
        v.sort();
        assert_eq!(v.last(), Some(&Some(vec![15])));
    }

    #[test]
    fn parses_proc_stat() {
        assert_eq!(
            parse_stat("42 (postgres: checkpointer) S 7 42 42 0 -1"),
            Some(('S', 7))
        );
        assert_eq!(parse_stat("garbage"), None);
    }
}
