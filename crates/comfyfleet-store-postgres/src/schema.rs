//! Connecting, the schema (creation, migrations, refusals), URL redaction and `pg_dump`
//! backups.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use comfyfleet_core::StoreError;
use sqlx::migrate::{MigrateError, Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, SqlStr};

use crate::PostgresOptions;
use crate::error::{Context, pg, sqlstate};

/// The newest schema version this build knows (the last migration's number).
pub const SCHEMA_VERSION: i64 = 1;

/// The migrations, in order, embedded in the binary.
fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        Cow::Borrowed("initial"),
        MigrationType::Simple,
        SqlStr::from_static(include_str!("../migrations/0001_initial.sql")),
        false,
    )])
}

/// Checks a schema name: `[a-z_][a-z0-9_]*`, at most 48 characters (so that the
/// notification channel `comfyfleet_<schema>` fits PostgreSQL's 63-byte identifiers), and not
/// one of PostgreSQL's own.
pub(crate) fn check_name(schema: &str) -> Result<(), StoreError> {
    let ok_start = schema
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let ok_rest = schema
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok_start || !ok_rest || schema.len() > 48 || schema.starts_with("pg_") {
        return Err(StoreError::InvalidInput(format!(
            "schema name {schema:?}: use 1 to 48 lowercase ASCII letters, digits and '_', \
             starting with a letter or '_' (and not 'pg_')"
        )));
    }
    if schema == "information_schema" {
        return Err(StoreError::InvalidInput(
            "schema name \"information_schema\" is PostgreSQL's own".into(),
        ));
    }
    Ok(())
}

/// The wake-up channel of a store in `schema`.
pub(crate) fn channel(schema: Option<&str>) -> String {
    match schema {
        Some(s) => format!("comfyfleet_{s}"),
        None => "comfyfleet".to_owned(),
    }
}

/// The URL with any password replaced by `***` (userinfo and `password=` parameter); a string
/// that does not parse as a URL is not shown at all.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query_pairs().any(|(k, _)| k == "password") {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "password" {
                            "***".to_owned()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "<a connection string that is not a URL>".to_owned(),
    }
}

/// The pool (lazy: nothing connects until [`prepare`] runs).
pub(crate) fn pool(
    url: &str,
    redacted: &str,
    options: &PostgresOptions,
) -> Result<PgPool, StoreError> {
    let connect: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
        StoreError::InvalidInput(format!(
            "bad PostgreSQL URL {redacted}: {}",
            match e {
                sqlx::Error::Configuration(c) => c.to_string(),
                other => other.to_string(),
            }
        ))
    })?;
    let mut settings = vec![(
        "statement_timeout".to_owned(),
        options.statement_timeout.as_millis().to_string(),
    )];
    if let Some(schema) = &options.schema {
        settings.push(("search_path".to_owned(), schema.clone()));
    }
    let connect = connect
        .application_name("comfyfleet")
        .options(settings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Ok(PgPoolOptions::new()
        .max_connections(options.max_connections)
        .min_connections(0)
        .acquire_timeout(options.acquire_timeout)
        .idle_timeout(Duration::from_secs(300))
        .connect_lazy_with(connect))
}

/// Creates the schema if asked for and missing, refuses one that is not ours or is newer,
/// and runs the migrations.
pub(crate) async fn prepare(
    pool: &PgPool,
    redacted: &str,
    schema: Option<&str>,
) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await.map_err(|e| match e {
        sqlx::Error::PoolTimedOut => StoreError::Backend(format!(
            "cannot connect to PostgreSQL at {redacted}: no connection within the acquire \
             timeout (is the server running and reachable?)"
        )),
        e => pg(&format!("cannot connect to PostgreSQL at {redacted}"), e),
    })?;
    if let Some(schema) = schema {
        // The name was checked: quoting is for form's sake.
        let created = sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .execute(&mut *conn)
        .await;
        match created {
            Ok(_) => {}
            // Two stores creating one schema at once: the other won.
            Err(e) if sqlstate(&e).as_deref() == Some("23505") => {}
            Err(e) => return Err(pg(&format!("create schema {schema}"), e)),
        }
    }
    let present: (bool, bool, bool) = sqlx::query_as(
        "SELECT to_regclass('_sqlx_migrations') IS NOT NULL, \
                to_regclass('meta') IS NOT NULL, to_regclass('jobs') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await
    .ctx("inspect the schema")?;
    let place = schema.map_or_else(|| "the database".to_owned(), |s| format!("schema {s}"));
    match present {
        (true, has_meta, _) => {
            let newest: Option<i64> =
                sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&mut *conn)
                    .await
                    .ctx("read the schema version")?;
            let ours: Option<String> = if has_meta {
                sqlx::query_scalar("SELECT value FROM meta WHERE key = 'application'")
                    .fetch_optional(&mut *conn)
                    .await
                    .ctx("read the schema's owner")?
            } else {
                None
            };
            if newest.is_some() && ours.as_deref() != Some("comfyfleet-store-postgres") {
                return Err(StoreError::Unusable(format!(
                    "{place} at {redacted} holds another program's migrations, not a \
                     comfyfleet store; use another schema"
                )));
            }
            if let Some(v) = newest
                && v > SCHEMA_VERSION
            {
                return Err(StoreError::Unusable(format!(
                    "{place} at {redacted} has schema version {v}, newer than this build \
                     knows ({SCHEMA_VERSION}): it was written by a newer comfyfleet; upgrade \
                     comfyfleet (nothing was changed)"
                )));
            }
        }
        (false, _, true) => {
            return Err(StoreError::Unusable(format!(
                "{place} at {redacted} already has a `jobs` table that is not a comfyfleet \
                 store's; use another schema"
            )));
        }
        _ => {}
    }
    // `run_direct` rather than `run`: `run`'s `Acquire` bound makes the future not `Send`
    // (sqlx's "implementation of `Acquire` is not general enough").
    migrator()
        .run_direct(None, &mut *conn, false)
        .await
        .map_err(|e| migrate_error(e, &place, redacted))?;
    Ok(())
}

fn migrate_error(e: MigrateError, place: &str, redacted: &str) -> StoreError {
    match e {
        MigrateError::Execute(e) => pg(&format!("migrating {place} at {redacted}"), e),
        MigrateError::VersionMissing(v) => StoreError::Unusable(format!(
            "{place} at {redacted} has migration {v} applied, which this build does not know: \
             it was written by a newer comfyfleet; upgrade comfyfleet"
        )),
        MigrateError::VersionMismatch(v) => StoreError::Unusable(format!(
            "{place} at {redacted}: migration {v} differs from the one this build applies \
             (the schema was changed by hand, or by another build)"
        )),
        MigrateError::Dirty(v) => StoreError::Unusable(format!(
            "{place} at {redacted}: migration {v} was interrupted part-way; restore a backup"
        )),
        other => StoreError::Backend(format!("migrating {place} at {redacted}: {other}")),
    }
}

/// The URL for `pg_dump` without its password, and the password (for `PGPASSWORD`).
fn dump_target(url: &str) -> Result<(String, Option<String>), StoreError> {
    let mut u = url::Url::parse(url).map_err(|_| {
        StoreError::InvalidInput("backup needs the store's connection string to be a URL".into())
    })?;
    let mut password = u.password().map(|p| {
        url::form_urlencoded::parse(format!("p={}", p.replace('+', "%2B")).as_bytes())
            .next()
            .map_or_else(|| p.to_owned(), |(_, v)| v.into_owned())
    });
    let _ = u.set_password(None);
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.iter().any(|(k, _)| k == "password") {
        u.query_pairs_mut().clear();
        for (k, v) in pairs {
            if k == "password" {
                password = Some(v);
            } else {
                u.query_pairs_mut().append_pair(&k, &v);
            }
        }
        if u.query() == Some("") {
            u.set_query(None);
        }
    }
    Ok((u.to_string(), password))
}

/// `pg_dump --format=custom` of the store's schema into a new file `dest`.
pub(crate) async fn backup(
    url: &str,
    redacted: &str,
    schema: Option<&str>,
    dest: &Path,
    timeout: Duration,
) -> Result<(), StoreError> {
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(StoreError::InvalidInput(format!(
            "backup destination {} already exists; refusing to overwrite it",
            dest.display()
        )));
    }
    let name = dest.file_name().ok_or_else(|| {
        StoreError::InvalidInput(format!(
            "backup destination {} has no file name",
            dest.display()
        ))
    })?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(StoreError::InvalidInput(format!(
            "backup destination directory {} does not exist",
            dir.display()
        )));
    }
    let partial = dir.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        uuid::Uuid::now_v7().simple()
    ));
    let (target, password) = dump_target(url)?;
    let mut cmd = tokio::process::Command::new("pg_dump");
    cmd.arg("--format=custom")
        .arg("--no-password")
        .arg("--file")
        .arg(&partial)
        .arg("--dbname")
        .arg(&target);
    if let Some(s) = schema {
        cmd.arg("--schema").arg(s);
    }
    match password {
        Some(p) => cmd.env("PGPASSWORD", p),
        None => cmd.env_remove("PGPASSWORD"),
    };
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::NotSupported(
                "backup: pg_dump was not found on PATH (install the PostgreSQL client tools, \
                 e.g. Debian's postgresql-client)",
            ));
        }
        Err(e) => {
            return Err(StoreError::Backend(format!(
                "backup: cannot run pg_dump: {e}"
            )));
        }
    };
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            let _ = std::fs::remove_file(&partial);
            return Err(StoreError::Backend(format!("backup: pg_dump failed: {e}")));
        }
        Err(_) => {
            let _ = std::fs::remove_file(&partial);
            return Err(StoreError::Backend(format!(
                "backup: pg_dump of {redacted} did not finish within {timeout:?}"
            )));
        }
    };
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(StoreError::Backend(format!(
            "backup: pg_dump of {redacted} failed ({}): {}",
            out.status,
            stderr.trim()
        )));
    }
    let finish = (|| {
        std::fs::File::open(&partial)?.sync_all()?;
        std::fs::hard_link(&partial, dest)
    })();
    let _ = std::fs::remove_file(&partial);
    finish.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            StoreError::InvalidInput(format!(
                "backup destination {} already exists; refusing to overwrite it",
                dest.display()
            ))
        } else {
            StoreError::Backend(format!("backup to {}: {e}", dest.display()))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let r = redact("postgres://me:s3cret@db:5432/x?sslmode=require&password=other");
        assert!(!r.contains("s3cret") && !r.contains("other"), "{r}");
        assert!(
            r.contains("db:5432") && r.contains("sslmode=require"),
            "{r}"
        );
        assert_eq!(
            redact("host=db password=x"),
            "<a connection string that is not a URL>"
        );
    }

    #[test]
    fn pg_dump_gets_the_password_apart() {
        let (u, p) =
            dump_target("postgres://me:s%40cret@db/x?password=q&sslmode=disable").expect("a URL");
        assert_eq!(p.as_deref(), Some("q"));
        assert_eq!(u, "postgres://me@db/x?sslmode=disable");
        let (u, p) = dump_target("postgres://me:s%40cret@db/x").expect("a URL");
        assert_eq!(p.as_deref(), Some("s@cret"));
        assert_eq!(u, "postgres://me@db/x");
    }

    #[test]
    fn schema_names() {
        for ok in [
            "a",
            "_x",
            "fleet_1",
            "cf_test_0123456789abcdef0123456789abcdef",
        ] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "1a", "a-b", "pg_x", "a\"b", &"a".repeat(49)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
