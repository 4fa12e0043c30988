//! [`TestPostgres`] against the real PostgreSQL binaries: a private cluster on loopback that
//! tests can restart and crash. Checked with the system `psql` (no Rust driver in the testkit).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use comfyfleet_testkit::TestPostgres;

/// `psql -h 127.0.0.1 -p PORT -U postgres -d DB -Atc SQL`, as a client outside the testkit would.
fn psql(pg: &TestPostgres, db: &str, sql: &str) -> Result<String, String> {
    let psql = ["/usr/lib/postgresql/15/bin/psql", "/usr/bin/psql"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("psql");
    let out = Command::new(psql)
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &pg.port().to_string(), "-d", db, "-Atc", sql])
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ok(pg: &TestPostgres, db: &str, sql: &str) -> String {
    psql(pg, db, sql).unwrap_or_else(|e| panic!("psql {sql:?}: {e}\nlog:\n{}", pg.log()))
}

fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

#[test]
fn starts_and_answers_psql() {
    let pg = TestPostgres::start().unwrap();
    assert_eq!(ok(&pg, "postgres", "select 1"), "1");
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
    );
    assert_eq!(ok(&pg, "postgres", "show fsync"), "off");
    assert_eq!(ok(&pg, "postgres", "show max_connections"), "200");
    assert_eq!(ok(&pg, "postgres", "show listen_addresses"), "127.0.0.1");
    assert_eq!(pg.psql("postgres", "select 2").unwrap().trim(), "2");
}

#[test]
fn creates_databases() {
    let pg = TestPostgres::start().unwrap();
    let url = pg.create_database("store_a").unwrap();
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/store_a", pg.port())
    );
    assert_eq!(ok(&pg, "store_a", "select current_database()"), "store_a");
    assert!(pg.create_database("store_a").is_err(), "already exists");
}

#[test]
fn restart_keeps_rows_and_port() {
    let pg = TestPostgres::start().unwrap();
    let port = pg.port();
    ok(
        &pg,
        "postgres",
        "create table t (x int); insert into t values (1), (2)",
    );
    pg.restart().unwrap();
    assert_eq!(pg.port(), port);
    assert_eq!(ok(&pg, "postgres", "select sum(x) from t"), "3");

    pg.stop().unwrap();
    assert!(psql(&pg, "postgres", "select 1").is_err(), "stopped");
    assert_eq!(pg.postmaster_pid(), None);
    pg.start_again().unwrap();
    assert_eq!(ok(&pg, "postgres", "select count(*) from t"), "2");
}

#[test]
fn kill_then_start_again_recovers_committed_rows() {
    let pg = TestPostgres::start().unwrap();
    ok(
        &pg,
        "postgres",
        "create table t (x int); insert into t values (42)",
    );
    let pid = pg.postmaster_pid().unwrap();
    pg.kill().unwrap();
    assert!(!is_alive(pid));
    assert!(psql(&pg, "postgres", "select 1").is_err(), "killed");

    pg.start_again().unwrap();
    assert_ne!(pg.postmaster_pid(), Some(pid));
    assert_eq!(ok(&pg, "postgres", "select x from t"), "42");
    assert!(
        pg.log().contains("not properly shut down"),
        "expected crash recovery in the log:\n{}",
        pg.log()
    );
}

#[test]
fn two_clusters_run_side_by_side() {
    let a = TestPostgres::start().unwrap();
    let b = TestPostgres::start().unwrap();
    assert_ne!(a.port(), b.port());
    ok(&a, "postgres", "create table only_in_a (x int)");
    assert!(psql(&b, "postgres", "select * from only_in_a").is_err());
    a.kill().unwrap();
    assert_eq!(ok(&b, "postgres", "select 1"), "1", "b is unaffected");
}

#[test]
fn drop_stops_the_server_and_removes_the_dir() {
    let pg = TestPostgres::start().unwrap();
    let pid = pg.postmaster_pid().unwrap();
    let dir = pg.dir().to_path_buf();
    assert!(is_alive(pid));
    drop(pg);
    assert!(!is_alive(pid), "postmaster {pid} survived drop");
    assert!(!dir.exists(), "{} survived drop", dir.display());
}

#[test]
fn drop_after_kill_is_quiet() {
    let pg = TestPostgres::start().unwrap();
    let dir = pg.dir().to_path_buf();
    pg.kill().unwrap();
    drop(pg);
    assert!(!dir.exists());
}
