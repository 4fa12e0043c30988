//! `cargo xtask setup`: make sure the system services the test suite needs
//! are installed and running. `cargo xtask ci` and `cargo xtask test` run
//! this first. Set `COMFYFLEET_SKIP_SETUP=1` to skip it entirely (e.g. when
//! the machine is provisioned some other way).
//!
//! # Adding a requirement
//!
//! Append one entry to [`REQUIREMENTS`] (they run top to bottom), e.g.:
//!
//! ```text
//!     Requirement {
//!         name: "postgresql",
//!         check: || command_ok("pg_isready", &["-q"]),
//!         install: &[apt_install!["postgresql"], &["service", "postgresql", "start"]],
//!     },
//! ```
//!
//! * `check` is cheap and side-effect free; `true` means "nothing to do".
//!   Helpers: [`on_path`] (a binary is installed) and [`command_ok`] (a
//!   command exits 0, e.g. `pg_isready`, `service ssh status`).
//! * `install` is a list of commands run in order when `check` fails, usually
//!   `apt_install![..]` (= `apt-get install -y --no-install-recommends ..`)
//!   followed by whatever starts the service. `apt-get` always runs with
//!   `DEBIAN_FRONTEND=noninteractive`, and `apt-get update` runs once before
//!   the first `apt-get` command. When not root, commands go through `sudo`.
//! * After `install`, `check` runs again and must pass, else setup fails.

use std::env;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// One system requirement of the test suite.
#[derive(Debug, Clone, Copy)]
pub struct Requirement {
    /// Shown in the log, e.g. `postgresql`.
    pub name: &'static str,
    /// `true` when the requirement is already satisfied.
    pub check: fn() -> bool,
    /// Commands (argv) that install / start it, run in order.
    pub install: &'static [&'static [&'static str]],
}

/// `apt_install!["pkg", ...]`: the argv of a non-interactive, minimal
/// `apt-get install` (`DEBIAN_FRONTEND=noninteractive` is added when run).
#[allow(
    unused_macros,
    reason = "used by REQUIREMENTS entries as they are added"
)]
macro_rules! apt_install {
    ($($pkg:literal),+ $(,)?) => {
        &["apt-get", "install", "-y", "--no-install-recommends", $($pkg),+]
    };
}

/// What the test suite needs from the system, checked (and installed) in
/// order. See the module docs for how to add one.
const REQUIREMENTS: &[Requirement] = &[
    // The dashboard's browser test (`comfyfleet-server/tests/browser.rs`) drives headless
    // Chromium through chromedriver: /usr/bin/chromium and /usr/bin/chromedriver.
    Requirement {
        name: "chromium + chromedriver",
        check: || on_path("chromium") && on_path("chromedriver"),
        install: &[apt_install!["chromium", "chromium-driver"]],
    },
    // The OpenAPI document's validation (`comfyfleet-server/tests/api/openapi.rs`) runs
    // Python's openapi-spec-validator (PyPI) on it.
    Requirement {
        name: "openapi-spec-validator (python3)",
        check: || command_ok("python3", &["-c", "import openapi_spec_validator"]),
        install: &[&[
            "python3",
            "-m",
            "pip",
            "install",
            "--quiet",
            "openapi-spec-validator",
        ]],
    },
    // The SSH tests (`comfyfleet-ssh/tests/`, `comfyfleet_testkit::sshd::TestSshd`) start their
    // own Debian OpenSSH server on a free loopback port; only the binary is needed, the system
    // sshd service is not started.
    Requirement {
        name: "openssh-server",
        check: || Path::new("/usr/sbin/sshd").exists(),
        install: &[apt_install!["openssh-server"]],
    },
    // `TestSshd` generates its keys with `ssh-keygen`, and the agent-authentication tests
    // (`comfyfleet-ssh/tests/it/agent.rs`) run their own `ssh-agent` and load it with `ssh-add`.
    Requirement {
        name: "openssh-client",
        check: || on_path("ssh-keygen") && on_path("ssh-agent") && on_path("ssh-add"),
        install: &[apt_install!["openssh-client"]],
    },
    // The PostgreSQL tests: `comfyfleet_testkit::pg::TestPostgres` runs private clusters with
    // the server binaries (`initdb`, `pg_ctl`, `postgres` under /usr/lib/postgresql/<v>/bin) and
    // checks them with `psql`; the store tests (`comfyfleet-store-postgres/tests/`) use the
    // system server (next requirement).
    Requirement {
        name: "postgresql",
        check: || pg_server_binaries() && on_path("psql") && on_path("pg_isready"),
        install: &[apt_install!["postgresql"]],
    },
    // The PostgreSQL store tests use `postgres://postgres@127.0.0.1:5432/test` unless
    // `COMFYFLEET_TEST_PG_URL` names another server (then only that one is checked).
    Requirement {
        name: "postgresql test database (127.0.0.1:5432/test, trust)",
        check: pg_test_database_ok,
        install: &[&["sh", "-c", PG_TEST_DATABASE_SCRIPT]],
    },
];

/// Makes the system PostgreSQL serve database `test` to user `postgres` on 127.0.0.1:5432 with
/// trust authentication (a fresh Debian cluster wants a password over TCP): puts a trust rule for
/// 127.0.0.1 at the top of every cluster's `pg_hba.conf` (once), starts the clusters (`service`,
/// else `pg_ctlcluster`), reloads them so the rule applies to an already running one, waits for
/// the port, and creates the database unless it exists. Idempotent. A fixed script: nothing in it
/// comes from the user or the environment.
const PG_TEST_DATABASE_SCRIPT: &str = r#"set -eu
rule='host all all 127.0.0.1/32 trust # added by cargo xtask setup (comfyfleet tests)'
for hba in /etc/postgresql/*/*/pg_hba.conf; do
    [ -f "$hba" ] || continue
    grep -qxF "$rule" "$hba" || sed -i "1i $rule" "$hba"
done
if ! service postgresql start; then
    for conf in /etc/postgresql/*/*; do
        [ -d "$conf" ] || continue
        pg_ctlcluster "$(basename "$(dirname "$conf")")" "$(basename "$conf")" start || true
    done
fi
if ! service postgresql reload; then
    for conf in /etc/postgresql/*/*; do
        [ -d "$conf" ] || continue
        pg_ctlcluster "$(basename "$(dirname "$conf")")" "$(basename "$conf")" reload || true
    done
fi
i=0
until pg_isready -q -h 127.0.0.1 -p 5432; do
    i=$((i + 1))
    [ "$i" -lt 60 ] || { echo "postgresql is not accepting on 127.0.0.1:5432" >&2; exit 1; }
    sleep 0.5
done
psql -X -h 127.0.0.1 -p 5432 -U postgres -d test -Atc 'select 1' >/dev/null 2>&1     || createdb -h 127.0.0.1 -p 5432 -U postgres test
"#;

/// Whether `initdb`, `pg_ctl` and `postgres` are installed where `TestPostgres` looks: on
/// `$PATH`, or together under `/usr/lib/postgresql/<version>/bin`.
fn pg_server_binaries() -> bool {
    const BINS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
    if BINS.iter().all(|b| on_path(b)) {
        return true;
    }
    std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|entry| {
            let bin = entry.path().join("bin");
            BINS.iter().all(|b| is_executable(&bin.join(b)))
        })
    })
}

/// Whether the store tests' server answers: `COMFYFLEET_TEST_PG_URL` when set, else database
/// `test` as `postgres` on 127.0.0.1:5432.
fn pg_test_database_ok() -> bool {
    if let Ok(url) = env::var("COMFYFLEET_TEST_PG_URL") {
        return command_ok("psql", &["-X", "-d", &url, "-Atc", "select 1"]);
    }
    command_ok("pg_isready", &["-q", "-h", "127.0.0.1", "-p", "5432"])
        && command_ok(
            "psql",
            &[
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                "5432",
                "-U",
                "postgres",
                "-d",
                "test",
                "-Atc",
                "select 1",
            ],
        )
}

/// What `cargo xtask soak` needs beyond the build: a font for its plot's text (plotters draws
/// with a pure-Rust rasterizer and reads DejaVu Sans from the system).
const SOAK_REQUIREMENTS: &[Requirement] = &[Requirement {
    name: "fonts-dejavu-core (the soak plot's text)",
    check: || Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists(),
    install: &[apt_install!["fonts-dejavu-core"]],
}];

/// `cargo xtask setup`.
pub fn run() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    ensure_all(REQUIREMENTS, &mut system_exec)
}

/// The soak run's requirements (see [`SOAK_REQUIREMENTS`]).
pub fn soak() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    ensure_all(SOAK_REQUIREMENTS, &mut system_exec)
}

fn skipped() -> bool {
    let skip = env::var("COMFYFLEET_SKIP_SETUP").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("setup: skipped (COMFYFLEET_SKIP_SETUP=1)");
    }
    skip
}

/// Checks every requirement, installing what is missing through `exec`
/// (which runs one argv). Stops at the first requirement that cannot be met.
fn ensure_all(
    requirements: &[Requirement],
    exec: &mut dyn FnMut(&[&str]) -> Result<()>,
) -> Result<()> {
    if requirements.is_empty() {
        eprintln!("setup: no system requirements");
        return Ok(());
    }
    let mut apt_updated = false;
    for req in requirements {
        if (req.check)() {
            eprintln!("setup: {}: ok", req.name);
            continue;
        }
        eprintln!("setup: {}: missing, installing", req.name);
        if req.install.is_empty() {
            bail!("setup: `{}` is missing and has no install recipe", req.name);
        }
        for argv in req.install {
            if argv.first() == Some(&"apt-get") && !apt_updated {
                exec(&["apt-get", "update"]).with_context(|| hint(req.name))?;
                apt_updated = true;
            }
            exec(argv).with_context(|| hint(req.name))?;
        }
        if !(req.check)() {
            bail!(
                "setup: `{}` is still not available after installing it; {}",
                req.name,
                hint(req.name)
            );
        }
        eprintln!("setup: {}: installed", req.name);
    }
    Ok(())
}

fn hint(name: &str) -> String {
    format!(
        "could not install `{name}` automatically (setup uses apt-get, via sudo when not root); \
         install it by hand, or set COMFYFLEET_SKIP_SETUP=1 to skip setup"
    )
}

/// Runs one install command for real: `DEBIAN_FRONTEND=noninteractive` for
/// apt-get, `sudo` when not root (and sudo exists).
fn system_exec(argv: &[&str]) -> Result<()> {
    let (program, args) = argv.split_first().context("empty install command")?;
    let envs: &[(&str, &str)] = if *program == "apt-get" {
        &[("DEBIAN_FRONTEND", "noninteractive")]
    } else {
        &[]
    };
    if !is_root() && on_path("sudo") {
        // `sudo env K=V prog args`: works whatever sudo's env policy is.
        let kvs: Vec<String> = envs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut sudo_args: Vec<&str> = vec!["env"];
        sudo_args.extend(kvs.iter().map(String::as_str));
        sudo_args.push(program);
        sudo_args.extend(args);
        return crate::run("sudo", &sudo_args, &[]);
    }
    crate::run(program, args, envs)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Whether an executable named `bin` is on `$PATH`.
pub fn on_path(bin: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| is_executable(&dir.join(bin))))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `program args..` starts and exits 0 (all output discarded).
#[allow(dead_code, reason = "for REQUIREMENTS checks as they are added")]
pub fn command_ok(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn record(log: &mut Vec<String>) -> impl FnMut(&[&str]) -> Result<()> + '_ {
        |argv| {
            log.push(argv.join(" "));
            Ok(())
        }
    }

    #[test]
    fn empty_list_does_nothing() {
        let mut log = Vec::new();
        ensure_all(&[], &mut record(&mut log)).unwrap();
        assert!(log.is_empty());
    }

    #[test]
    fn satisfied_requirement_is_not_installed() {
        let reqs = [Requirement {
            name: "present",
            check: || true,
            install: &[apt_install!["present"]],
        }];
        let mut log = Vec::new();
        ensure_all(&reqs, &mut record(&mut log)).unwrap();
        assert!(log.is_empty());
    }

    static A_DONE: AtomicBool = AtomicBool::new(false);
    static B_DONE: AtomicBool = AtomicBool::new(false);

    #[test]
    fn missing_requirements_install_in_order_with_one_apt_update() {
        let reqs = [
            Requirement {
                name: "a",
                check: || A_DONE.swap(true, Ordering::SeqCst),
                install: &[apt_install!["pkg-a"], &["service", "a", "start"]],
            },
            Requirement {
                name: "b",
                check: || B_DONE.swap(true, Ordering::SeqCst),
                install: &[apt_install!["pkg-b", "pkg-b2"]],
            },
        ];
        let mut log = Vec::new();
        ensure_all(&reqs, &mut record(&mut log)).unwrap();
        assert_eq!(
            log,
            [
                "apt-get update",
                "apt-get install -y --no-install-recommends pkg-a",
                "service a start",
                "apt-get install -y --no-install-recommends pkg-b pkg-b2",
            ]
        );
    }

    #[test]
    fn still_missing_after_install_fails() {
        let reqs = [Requirement {
            name: "never",
            check: || false,
            install: &[&["true"]],
        }];
        let mut log = Vec::new();
        let err = ensure_all(&reqs, &mut record(&mut log)).unwrap_err();
        assert!(
            format!("{err:#}").contains("still not available"),
            "{err:#}"
        );
        assert_eq!(log, ["true"]);
    }

    #[test]
    fn failing_install_stops() {
        let reqs = [Requirement {
            name: "broken",
            check: || false,
            install: &[&["x"], &["y"]],
        }];
        let err = ensure_all(&reqs, &mut |_argv: &[&str]| bail!("boom")).unwrap_err();
        assert!(
            format!("{err:#}").contains("COMFYFLEET_SKIP_SETUP"),
            "{err:#}"
        );
    }

    #[test]
    fn postgres_setup_script_parses() {
        assert!(command_ok("sh", &["-n", "-c", PG_TEST_DATABASE_SCRIPT]));
    }

    #[test]
    fn helpers() {
        assert!(on_path("sh"));
        assert!(!on_path("definitely-not-a-real-binary-comfyfleet"));
        assert!(command_ok("true", &[]));
        assert!(!command_ok("false", &[]));
        assert!(!command_ok("definitely-not-a-real-binary-comfyfleet", &[]));
    }
}
