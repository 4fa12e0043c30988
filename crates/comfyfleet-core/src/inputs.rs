//! [`InputStore`]: where the bytes of a job's input files live until every attempt has uploaded
//! them to its backend. Content-addressed: an [`Upload`] names its bytes by SHA-256.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::error::StoreError;
use crate::job::Upload;

/// Keeps input files by content hash.
#[async_trait]
pub trait InputStore: Send + Sync + 'static {
    /// Stores bytes under their SHA-256 and returns the [`Upload`] a job spec refers to.
    async fn put(&self, name: &str, bytes: Bytes) -> Result<Upload, StoreError>;

    /// The bytes with this SHA-256, if stored.
    async fn get(&self, sha256: &str) -> Result<Option<Bytes>, StoreError>;
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Validates an input file name: a plain file name, no path tricks.
pub fn check_input_name(name: &str) -> Result<(), StoreError> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0'])
        || name.chars().any(char::is_control);
    if bad {
        return Err(StoreError::InvalidInput(format!(
            "input file name {name:?} must be a plain file name (no path, no leading dot, 1–255 bytes)"
        )));
    }
    Ok(())
}

/// An in-memory [`InputStore`].
#[derive(Debug, Default)]
pub struct MemoryInputs {
    files: Mutex<HashMap<String, Bytes>>,
}

impl MemoryInputs {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl InputStore for MemoryInputs {
    async fn put(&self, name: &str, bytes: Bytes) -> Result<Upload, StoreError> {
        check_input_name(name)?;
        let sha256 = sha256_hex(&bytes);
        let size = bytes.len() as u64;
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sha256.clone(), bytes);
        Ok(Upload {
            name: name.to_owned(),
            sha256,
            size,
        })
    }

    async fn get(&self, sha256: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sha256)
            .cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stores_by_content_and_refuses_path_names() {
        let s = MemoryInputs::new();
        let u = s.put("cat.png", Bytes::from_static(b"meow")).await.unwrap();
        assert_eq!(u.sha256, sha256_hex(b"meow"));
        assert_eq!(u.size, 4);
        assert_eq!(
            s.get(&u.sha256).await.unwrap().unwrap(),
            Bytes::from_static(b"meow")
        );
        assert!(s.get("00").await.unwrap().is_none());
        for bad in ["", "../etc/passwd", "a/b.png", ".hidden", "x\ny"] {
            assert!(s.put(bad, Bytes::new()).await.is_err(), "{bad:?}");
        }
    }
}
