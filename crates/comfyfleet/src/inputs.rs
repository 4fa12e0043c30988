//! [`DirInputs`]: input files kept on disk next to the database, so jobs accepted with uploads
//! survive a restart of the service.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use comfyfleet_core::inputs::{InputStore, check_input_name, sha256_hex};
use comfyfleet_core::{StoreError, Upload};

/// A content-addressed directory of input files: `<dir>/<sha256>`. Writes go to a temporary
/// file first and are renamed into place, so a crash never leaves a half-written input.
#[derive(Debug, Clone)]
pub struct DirInputs {
    dir: PathBuf,
}

impl DirInputs {
    /// Uses (and creates) `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<DirInputs, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| {
            StoreError::Unusable(format!("creating input directory {}: {e}", dir.display()))
        })?;
        Ok(DirInputs { dir })
    }

    fn path(&self, sha256: &str) -> Option<PathBuf> {
        (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.dir.join(sha256.to_ascii_lowercase()))
    }
}

fn io(what: &str, p: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", p.display()))
}

#[async_trait]
impl InputStore for DirInputs {
    async fn put(&self, name: &str, bytes: Bytes) -> Result<Upload, StoreError> {
        check_input_name(name)?;
        let sha256 = sha256_hex(&bytes);
        let size = bytes.len() as u64;
        let dest = self.dir.join(&sha256);
        if tokio::fs::metadata(&dest)
            .await
            .is_ok_and(|m| m.len() == size)
        {
            return Ok(Upload {
                name: name.to_owned(),
                sha256,
                size,
            });
        }
        let tmp = self.dir.join(format!(
            ".{sha256}.{}.tmp",
            comfyfleet_core::JobId::new().as_uuid().simple()
        ));
        tokio::fs::write(&tmp, &bytes)
            .await
            .map_err(|e| io("writing", &tmp, e))?;
        if let Err(e) = tokio::fs::rename(&tmp, &dest).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(io("renaming into", &dest, e));
        }
        Ok(Upload {
            name: name.to_owned(),
            sha256,
            size,
        })
    }

    async fn get(&self, sha256: &str) -> Result<Option<Bytes>, StoreError> {
        let Some(p) = self.path(sha256) else {
            return Ok(None);
        };
        match tokio::fs::read(&p).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &p, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stores_by_content_survives_reopen_and_refuses_bad_names() {
        let d = tempfile::tempdir().unwrap();
        let s = DirInputs::open(d.path()).unwrap();
        let u = s.put("cat.png", Bytes::from_static(b"meow")).await.unwrap();
        assert_eq!(u.sha256, sha256_hex(b"meow"));
        let again = s
            .put("other.png", Bytes::from_static(b"meow"))
            .await
            .unwrap();
        assert_eq!(again.sha256, u.sha256);
        let s2 = DirInputs::open(d.path()).unwrap();
        assert_eq!(
            s2.get(&u.sha256).await.unwrap().unwrap(),
            Bytes::from_static(b"meow")
        );
        assert!(s2.get(&"0".repeat(64)).await.unwrap().is_none());
        assert!(s2.get("../../etc/passwd").await.unwrap().is_none());
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(s.put(bad, Bytes::new()).await.is_err(), "{bad:?}");
        }
        // No temporary files left behind.
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![u.sha256.clone()]);
    }
}
