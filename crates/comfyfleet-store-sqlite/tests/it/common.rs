//! Shared helpers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use comfyfleet_core::{AttemptStart, BackendId, JobSpec, NewJob, TaskStore, Timestamp, Workflow};
use comfyfleet_store_sqlite::{SqliteOptions, SqliteStore, Synchronous};
use comfyfleet_testkit::StoreFactory;

/// Lease length used by these tests.
pub const TTL: Duration = Duration::from_secs(30);

/// All times are offsets from this instant, in milliseconds.
pub const BASE_MS: i64 = 1_700_000_000_000;

pub fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(BASE_MS + ms)
}

pub fn workflow() -> Workflow {
    Workflow::from_json(
        r#"{
            "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "out"}}
        }"#,
    )
    .expect("test workflow is valid")
}

pub fn spec() -> JobSpec {
    JobSpec::new(workflow())
}

pub fn new_job() -> NewJob {
    NewJob::new(spec())
}

pub fn start_on(backend: &str) -> AttemptStart {
    AttemptStart {
        backend: BackendId::new(backend),
        remote: None,
        reattached: false,
        skipped: Vec::new(),
        phase: None,
        capacity: None,
    }
}

/// Options for tests: nothing waits for the disk.
pub fn fast() -> SqliteOptions {
    SqliteOptions::default().synchronous(Synchronous::Off)
}

/// Fresh stores, each in its own file in one temporary directory.
#[derive(Debug)]
pub struct FileFactory {
    dir: tempfile::TempDir,
    n: AtomicUsize,
}

impl FileFactory {
    pub fn new() -> Self {
        FileFactory {
            dir: tempfile::tempdir().expect("tempdir"),
            n: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl StoreFactory for FileFactory {
    async fn create(&self) -> Arc<dyn TaskStore> {
        let n = self.n.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.path().join(format!("case-{n}.db"));
        Arc::new(
            SqliteStore::open_with(&path, fast())
                .await
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display())),
        )
    }
}

/// A fresh temporary directory and a database path inside it.
pub fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.db");
    (dir, path)
}

/// The bytes of a file.
pub fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
