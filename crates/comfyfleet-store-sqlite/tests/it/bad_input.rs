//! Files the store must refuse, each with a clear message and without changing the file.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use comfyfleet_core::{Artifact, BackendId, Completion, JobState, NewJob, StoreError, TaskStore};
use comfyfleet_store_sqlite::{SqliteOptions, SqliteStore};
use serde_json::json;

use crate::common::{TTL, at, bytes, fast, new_job, spec, start_on, temp_db};

fn unusable(r: Result<SqliteStore, StoreError>) -> String {
    match r {
        Err(StoreError::Unusable(msg)) => msg,
        Err(other) => panic!("expected StoreError::Unusable, got {other:?}"),
        Ok(_) => panic!("expected StoreError::Unusable, the store opened"),
    }
}

fn assert_mentions(msg: &str, words: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "message {msg:?} should mention {w:?}");
    }
}

/// The other files SQLite would create next to a database.
fn no_side_files(path: &Path) {
    for ext in ["-wal", "-shm", "-journal"] {
        let side = PathBuf::from(format!("{}{ext}", path.display()));
        assert!(!side.exists(), "{} was created", side.display());
    }
}

/// A real store with a few jobs, closed (checkpointed) so that the file stands alone.
async fn closed_store(path: &Path, jobs: usize) {
    let s = SqliteStore::open_with(path, fast()).await.unwrap();
    for i in 0..jobs {
        s.enqueue(NewJob::new(spec().label("n", i.to_string())), at(0))
            .await
            .unwrap();
    }
    s.checkpoint().await.unwrap();
    s.close().await;
    no_side_files(path);
}

#[tokio::test]
async fn a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let msg = unusable(SqliteStore::open(dir.path()).await);
    assert_mentions(&msg, &["is a directory"]);
}

#[tokio::test]
async fn a_missing_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope").join("store.db");
    let msg = unusable(SqliteStore::open(&path).await);
    assert_mentions(&msg, &["does not exist", "nope"]);
    assert!(!path.parent().unwrap().exists(), "nothing was created");
}

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_refused_untouched() {
    let (_dir, path) = temp_db();
    let content = "name,age\nada,36\n".repeat(500);
    std::fs::write(&path, &content).unwrap();
    let msg = unusable(SqliteStore::open(&path).await);
    assert_mentions(&msg, &["not a SQLite database", "store.db"]);
    assert_eq!(bytes(&path), content.as_bytes(), "the file is unchanged");
    no_side_files(&path);
}

#[tokio::test]
async fn a_foreign_sqlite_database_is_refused_untouched() {
    let (_dir, path) = temp_db();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);
             INSERT INTO customers (name) VALUES ('ada'), ('grace');",
        )
        .unwrap();
    }
    let before = bytes(&path);
    let msg = unusable(SqliteStore::open(&path).await);
    assert_mentions(&msg, &["not a comfyfleet store", "customers", "refusing"]);
    assert_eq!(bytes(&path), before, "the file is unchanged");
    no_side_files(&path);
}

#[tokio::test]
async fn a_foreign_database_in_wal_mode_is_refused_untouched() {
    let (_dir, path) = temp_db();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL);
             INSERT INTO invoices (total) VALUES (9.5);",
        )
        .unwrap();
    }
    no_side_files(&path);
    let before = bytes(&path);
    let msg = unusable(SqliteStore::open(&path).await);
    assert_mentions(&msg, &["not a comfyfleet store", "invoices"]);
    assert_eq!(bytes(&path), before, "the file is unchanged");
    no_side_files(&path);
}

#[tokio::test]
async fn a_database_of_another_application_is_refused_untouched() {
    let (_dir, path) = temp_db();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA application_id = 1234; CREATE TABLE t (x);")
            .unwrap();
    }
    let before = bytes(&path);
    let msg = unusable(SqliteStore::open(&path).await);
    assert_mentions(&msg, &["another application", "0x4d2"]);
    assert_eq!(bytes(&path), before);
    no_side_files(&path);
}

#[tokio::test]
async fn a_sqlite_database_with_only_a_user_version_is_refused() {
    let (_dir, path) = temp_db();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 7).unwrap();
    }
    let before = bytes(&path);
    let msg = unusable(SqliteStore::open(&path).await);
    assert_mentions(&msg, &["not a comfyfleet store", "user_version 7"]);
    assert_eq!(bytes(&path), before);
}

#[tokio::test]
async fn a_store_from_a_newer_comfyfleet_is_refused_untouched() {
    let (_dir, path) = temp_db();
    closed_store(&path, 3).await;
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
    }
    let before = bytes(&path);
    let msg = unusable(SqliteStore::open(&path).await);
    assert_mentions(&msg, &["schema version 99", "newer comfyfleet", "Upgrade"]);
    assert_eq!(bytes(&path), before, "the file is unchanged");
    no_side_files(&path);
}

#[tokio::test]
async fn a_corrupt_store_is_refused_untouched() {
    let (_dir, path) = temp_db();
    closed_store(&path, 300).await;
    let mut data = bytes(&path);
    let page = 4096;
    assert!(data.len() >= 6 * page, "the store spans several pages");
    // Scribble over pages 3 and 4 (b-tree pages of the schema's tables and indexes).
    for b in &mut data[2 * page..4 * page] {
        *b = 0xA5;
    }
    std::fs::write(&path, &data).unwrap();
    let msg = unusable(SqliteStore::open(&path).await);
    assert_mentions(&msg, &["corrupt", "backup"]);
    assert_eq!(bytes(&path), data, "the file is unchanged");
    no_side_files(&path);
}

#[tokio::test]
async fn a_truncated_store_is_refused_untouched() {
    let (_dir, path) = temp_db();
    closed_store(&path, 300).await;
    let data = bytes(&path);
    let half = &data[..data.len() / 2];
    std::fs::write(&path, half).unwrap();
    let msg = unusable(SqliteStore::open(&path).await);
    assert!(
        msg.contains("corrupt") || msg.contains("malformed"),
        "message {msg:?} should say the file is damaged"
    );
    assert_eq!(bytes(&path), half, "the file is unchanged");
}

/// Makes `path` unwritable for this process. Plain permissions do not stop root, so for root
/// this falls back to the immutable attribute (`chattr +i`) where the file system has it.
/// `None`: it cannot be done here (the caller skips that check).
struct ReadOnly {
    path: PathBuf,
    immutable: bool,
    mode: u32,
}

impl ReadOnly {
    fn make(path: &Path) -> Option<ReadOnly> {
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        let ro = if path.is_dir() { 0o555 } else { 0o444 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(ro)).unwrap();
        let mut guard = ReadOnly {
            path: path.to_path_buf(),
            immutable: false,
            mode,
        };
        if !writable(path) {
            return Some(guard);
        }
        let chattr = Command::new("chattr").arg("+i").arg(path).status();
        if chattr.is_ok_and(|s| s.success()) {
            guard.immutable = true;
            if !writable(path) {
                return Some(guard);
            }
        }
        eprintln!(
            "cannot make {} read-only for this process (root without chattr): check skipped",
            path.display()
        );
        None
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.immutable {
            let _ = Command::new("chattr").arg("-i").arg(&self.path).status();
        }
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(self.mode));
    }
}

fn writable(path: &Path) -> bool {
    if path.is_dir() {
        let probe = path.join(".probe");
        let ok = std::fs::write(&probe, b"x").is_ok();
        let _ = std::fs::remove_file(&probe);
        ok
    } else {
        std::fs::OpenOptions::new().append(true).open(path).is_ok()
    }
}

#[tokio::test]
async fn a_read_only_store_file_is_refused_untouched() {
    let (_dir, path) = temp_db();
    closed_store(&path, 3).await;
    let before = bytes(&path);
    let Some(_guard) = ReadOnly::make(&path) else {
        return;
    };
    let msg = unusable(SqliteStore::open(&path).await);
    assert_mentions(&msg, &["read-only", "permissions"]);
    assert_eq!(bytes(&path), before);
}

#[tokio::test]
async fn a_read_only_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("ro");
    std::fs::create_dir(&sub).unwrap();
    let path = sub.join("store.db");
    let Some(_guard) = ReadOnly::make(&sub) else {
        return;
    };
    let msg = unusable(SqliteStore::open(&path).await);
    assert_mentions(&msg, &["cannot open", "store.db", "writable"]);
    assert!(!path.exists(), "nothing was created");
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_path_where_no_file_can_be_created_is_refused() {
    // procfs refuses new files even to root.
    let msg = unusable(SqliteStore::open("/proc/comfyfleet-store.db").await);
    assert_mentions(&msg, &["cannot open", "/proc/comfyfleet-store.db"]);
}

fn big_artifacts(n: usize) -> Vec<Artifact> {
    (0..n)
        .map(|i| Artifact {
            node: "3".into(),
            filename: format!("out-{i}.png"),
            kind: "image".into(),
            content_type: Some("image/png".into()),
            size: Some(1),
            sha256: Some("ab".repeat(32)),
            backend: BackendId::new("gpu-1"),
            locator: json!({"filename": format!("out-{i}.png"), "pad": "x".repeat(200)}),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_write_cleanly_and_loses_nothing_accepted() {
    let (_dir, path) = temp_db();
    // 48 pages of 4 KiB: the schema takes about 15, the rest fills quickly.
    let capped = fast().max_page_count(Some(48));
    let store = SqliteStore::open_with(&path, capped.clone()).await.unwrap();
    let running = {
        let id = store.enqueue(new_job(), at(0)).await.unwrap().id;
        let c = store.claim("engine-a", TTL, at(0)).await.unwrap().unwrap();
        assert_eq!(c.lease.job, id);
        store
            .start_attempt(&c.lease, start_on("gpu-1"), at(0))
            .await
            .unwrap();
        c.lease
    };
    let mut accepted = vec![running.job];
    let full = loop {
        let mut spec = spec();
        spec.labels.insert("pad".into(), "p".repeat(2_000));
        match store.enqueue(NewJob::new(spec), at(1)).await {
            Ok(e) => accepted.push(e.id),
            Err(e) => break e,
        }
        assert!(accepted.len() < 10_000, "the cap never bit");
    };
    let StoreError::Backend(msg) = &full else {
        panic!("a full database is StoreError::Backend (temporary), got {full:?}");
    };
    assert_mentions(
        msg,
        &["full", "rolled back", "nothing accepted earlier is lost"],
    );
    assert!(full.is_temporary());
    // A fenced write that does not fit fails the same way and changes nothing.
    let before = store.get(running.job).await.unwrap().unwrap();
    let r = store
        .complete(
            &running,
            Completion {
                artifacts: big_artifacts(2_000),
                ..Completion::default()
            },
            at(2),
        )
        .await;
    assert!(
        matches!(&r, Err(StoreError::Backend(m)) if m.contains("full")),
        "{r:?}"
    );
    assert_eq!(store.get(running.job).await.unwrap().unwrap(), before);
    // Small writes still fit, and the lease is intact.
    store.heartbeat(&running, TTL, at(3)).await.unwrap();
    store.checkpoint().await.unwrap();
    store.close().await;

    // Reopened without the cap: everything accepted is there, the file is sound, work goes on.
    let store = SqliteStore::open_with(&path, fast()).await.unwrap();
    assert_eq!(
        store.integrity_check().await.unwrap(),
        vec!["ok".to_string()]
    );
    assert_eq!(store.counts().await.unwrap().total(), accepted.len() as u64);
    for id in &accepted {
        let job = store
            .get(*id)
            .await
            .unwrap()
            .expect("an accepted job survived");
        assert!(job.last_seq >= 1);
    }
    let job = store.get(running.job).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Running);
    store
        .complete(
            &running,
            Completion {
                artifacts: big_artifacts(2_000),
                ..Completion::default()
            },
            at(4),
        )
        .await
        .expect("with room, the same completion succeeds");
    store.close().await;
}

#[tokio::test]
async fn reopening_keeps_everything_and_event_ids_keep_growing() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open_with(&path, SqliteOptions::default())
        .await
        .unwrap();
    let a = s.enqueue(new_job(), at(0)).await.unwrap();
    let lease = s.claim("e", TTL, at(0)).await.unwrap().unwrap().lease;
    s.start_attempt(&lease, start_on("gpu-1"), at(0))
        .await
        .unwrap();
    s.complete(&lease, Completion::default(), at(1))
        .await
        .unwrap();
    let last = s
        .events(&Default::default())
        .await
        .unwrap()
        .last()
        .unwrap()
        .id;
    assert_eq!(s.prune(at(10)).await.unwrap(), 1);
    drop(s); // without close: the next open must still work
    let s = SqliteStore::open(&path).await.unwrap();
    assert!(s.get(a.id).await.unwrap().is_none(), "pruned");
    let b = s.enqueue(new_job(), at(20)).await.unwrap();
    assert!(
        b.events[0].id > last,
        "event ids are never reused, even after pruning ({} after {last})",
        b.events[0].id
    );
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_past_the_busy_timeout_is_a_temporary_error() {
    let (_dir, path) = temp_db();
    let options = fast().busy_timeout(std::time::Duration::from_millis(200));
    let store = SqliteStore::open_with(&path, options).await.unwrap();
    let id = store.enqueue(new_job(), at(0)).await.unwrap().id;
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = std::time::Instant::now();
    let r = store.enqueue(new_job(), at(1)).await;
    let waited = started.elapsed();
    match &r {
        Err(e @ StoreError::Backend(msg)) => {
            assert!(e.is_temporary());
            assert_mentions(msg, &["busy timeout", "retry"]);
        }
        other => panic!("expected a temporary Backend error, got {other:?}"),
    }
    assert!(
        waited >= std::time::Duration::from_millis(150)
            && waited < std::time::Duration::from_secs(3),
        "waited {waited:?} for a 200 ms busy timeout"
    );
    // Reads go on meanwhile (WAL), and once the lock is gone so do writes.
    assert_eq!(
        store.get(id).await.unwrap().unwrap().state,
        JobState::Pending
    );
    other.execute_batch("ROLLBACK").unwrap();
    store.enqueue(new_job(), at(2)).await.unwrap();
    assert_eq!(store.counts().await.unwrap().total(), 2);
    store.close().await;
}
