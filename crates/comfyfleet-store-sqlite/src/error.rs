//! How SQLite failures become [`StoreError`]s.

use comfyfleet_core::StoreError;
use rusqlite::ErrorCode;

/// A failure inside this crate, before it is reported as a [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum SqliteError {
    /// SQLite (or rusqlite) refused.
    #[error("{context}: {source}")]
    Sqlite {
        /// What we were doing.
        context: &'static str,
        /// Why it failed.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored JSON column does not parse as the type it should hold.
    #[error("stored {column} of job {job} does not parse: {source}")]
    Json {
        /// The column.
        column: &'static str,
        /// The job (or `-` when unknown).
        job: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A stored value is outside what this crate writes (a foreign or damaged row).
    #[error("stored data is invalid: {0}")]
    Invalid(String),
    /// The migrations could not be applied.
    #[error("schema migration failed: {0}")]
    Migration(#[from] rusqlite_migration::Error),
}

/// Adds context to rusqlite results.
pub(crate) trait Context<T> {
    /// Names what was being done when it failed.
    fn ctx(self, context: &'static str) -> Result<T, SqliteError>;
}

impl<T> Context<T> for Result<T, rusqlite::Error> {
    fn ctx(self, context: &'static str) -> Result<T, SqliteError> {
        self.map_err(|source| SqliteError::Sqlite { context, source })
    }
}

impl From<SqliteError> for StoreError {
    fn from(e: SqliteError) -> Self {
        match &e {
            SqliteError::Sqlite { source, .. } => sqlite_to_store(source, &e.to_string()),
            SqliteError::Json { .. } | SqliteError::Invalid(_) => StoreError::Unusable(format!(
                "{e} (the database was changed by something other than comfyfleet, or is damaged)"
            )),
            SqliteError::Migration(m) => match m {
                rusqlite_migration::Error::RusqliteError { err, .. } => {
                    sqlite_to_store(err, &e.to_string())
                }
                _ => StoreError::Unusable(e.to_string()),
            },
        }
    }
}

/// The SQLite primary error code of an error, if it has one.
pub(crate) fn code_of(e: &rusqlite::Error) -> Option<ErrorCode> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
        _ => None,
    }
}

/// Maps one rusqlite error (already described by `text`) to the store's taxonomy: damage and
/// misconfiguration are `Unusable`, everything that may pass (busy, full disk, I/O) is `Backend`.
pub(crate) fn sqlite_to_store(e: &rusqlite::Error, text: &str) -> StoreError {
    if matches!(
        e,
        rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
    ) {
        return StoreError::Unusable(format!(
            "{text} (a stored value has the wrong type: the database was changed by something other than comfyfleet, or is damaged)"
        ));
    }
    match code_of(e) {
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Unusable(format!(
            "{text} (the database file is corrupt; restore it from a backup)"
        )),
        Some(ErrorCode::NotADatabase) => {
            StoreError::Unusable(format!("{text} (the file is not a SQLite database)"))
        }
        Some(ErrorCode::ReadOnly) => StoreError::Unusable(format!(
            "{text} (the database is read-only: check the permissions of the file and its directory)"
        )),
        Some(ErrorCode::CannotOpen) => StoreError::Unusable(format!(
            "{text} (cannot open the database file, or create its -wal/-shm files next to it: check that the directory exists and is writable)"
        )),
        Some(ErrorCode::DiskFull) => StoreError::Backend(format!(
            "{text} (the database or the disk is full: the change was rolled back, nothing accepted earlier is lost; free space and retry)"
        )),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Backend(format!(
            "{text} (another connection held the database lock past the busy timeout; retry)"
        )),
        _ => StoreError::Backend(text.to_owned()),
    }
}
