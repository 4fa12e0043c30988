//! [`InputStore`] in the database: input files accepted by any process are there for every
//! process's attempts.

use async_trait::async_trait;
use bytes::Bytes;
use comfyfleet_core::inputs::{check_input_name, sha256_hex};
use comfyfleet_core::job::Upload;
use comfyfleet_core::{InputStore, StoreError};

use crate::PostgresStore;
use crate::error::Context;

#[async_trait]
impl InputStore for PostgresStore {
    async fn put(&self, name: &str, bytes: Bytes) -> Result<Upload, StoreError> {
        check_input_name(name)?;
        let sha256 = sha256_hex(&bytes);
        let size = bytes.len();
        let stored = i64::try_from(size)
            .map_err(|_| StoreError::InvalidInput(format!("input {name:?} is too large")))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let key = sha256.clone();
        self.timed("put input", async {
            sqlx::query(
                "INSERT INTO inputs (sha256, size, bytes, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (sha256) DO NOTHING",
            )
            .bind(&key)
            .bind(stored)
            .bind(bytes.as_ref())
            .bind(now)
            .execute(&self.pool)
            .await
            .ctx("put input")?;
            Ok(())
        })
        .await?;
        Ok(Upload {
            name: name.to_owned(),
            sha256,
            size: size as u64,
        })
    }

    async fn get(&self, sha256: &str) -> Result<Option<Bytes>, StoreError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let key = sha256.to_ascii_lowercase();
        self.timed("get input", async {
            let row: Option<(Vec<u8>,)> =
                sqlx::query_as("SELECT bytes FROM inputs WHERE sha256 = $1")
                    .bind(&key)
                    .fetch_optional(&self.pool)
                    .await
                    .ctx("get input")?;
            Ok(row.map(|(b,)| Bytes::from(b)))
        })
        .await
    }
}
