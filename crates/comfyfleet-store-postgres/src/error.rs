//! How sqlx and PostgreSQL failures become [`StoreError`]s.
//!
//! The rule: whatever may pass on a retry (a lost connection, a pool timeout, a serialization
//! failure or deadlock, a statement timeout, the server shutting down) is
//! [`StoreError::Backend`]; a database that is not ours or is from a newer comfyfleet is
//! [`StoreError::Unusable`]. Constraint violations are turned into their contract answers by
//! the operations themselves, where the constraint is known. Messages never carry the
//! connection URL (it may hold a password).

use comfyfleet_core::StoreError;

/// Maps an sqlx error met while doing `what`.
pub(crate) fn pg(what: &str, e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let text = format!("{what}: {} (SQLSTATE {code})", db.message());
            match code.as_str() {
                // serialization_failure, deadlock_detected: retry the whole call.
                "40001" | "40P01" => StoreError::Backend(format!("{text}; retry")),
                // query_canceled (statement_timeout), lock_not_available
                "57014" | "55P03" => StoreError::Backend(format!(
                    "{text} (the statement timed out or waited too long for a lock; retry)"
                )),
                // undefined_table / undefined_column / undefined_function: not our schema.
                "42P01" | "42703" | "42883" => StoreError::Unusable(format!(
                    "{text} (the schema was changed by something other than comfyfleet)"
                )),
                // insufficient_privilege, invalid_authorization_specification,
                // invalid_password, invalid_catalog_name (no such database)
                "42501" | "28000" | "28P01" | "3D000" => StoreError::Unusable(text),
                _ => StoreError::Backend(text),
            }
        }
        sqlx::Error::PoolTimedOut => StoreError::Backend(format!(
            "{what}: no database connection within the acquire timeout (the server is \
             unreachable or every connection is busy); retry"
        )),
        sqlx::Error::PoolClosed => StoreError::Backend(format!("{what}: the store was closed")),
        sqlx::Error::Io(io) => {
            StoreError::Backend(format!("{what}: connection to PostgreSQL failed: {io}"))
        }
        sqlx::Error::Tls(t) => StoreError::Backend(format!("{what}: TLS failed: {t}")),
        sqlx::Error::Configuration(c) => {
            StoreError::InvalidInput(format!("{what}: bad connection settings: {c}"))
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::Decode(_) => StoreError::Unusable(format!(
            "{what}: {e} (a stored value has the wrong type: the schema was changed by \
             something other than comfyfleet)"
        )),
        _ => StoreError::Backend(format!("{what}: {e}")),
    }
}

/// The SQLSTATE of a database error, if it is one.
pub(crate) fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// The constraint a database error names, if any.
pub(crate) fn constraint(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.constraint().map(str::to_owned),
        _ => None,
    }
}

/// Adds context to sqlx results.
pub(crate) trait Context<T> {
    /// Names what was being done when it failed.
    fn ctx(self, what: &str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn ctx(self, what: &str) -> Result<T, StoreError> {
        self.map_err(|e| pg(what, e))
    }
}

/// A stored value this crate would never write (a foreign or damaged row).
pub(crate) fn invalid(text: impl std::fmt::Display) -> StoreError {
    StoreError::Unusable(format!(
        "stored data is invalid: {text} (the database was changed by something other than \
         comfyfleet, or is damaged)"
    ))
}

/// A JSON column that does not parse as the type it should hold.
pub(crate) fn bad_json(column: &str, owner: &str, e: serde_json::Error) -> StoreError {
    invalid(format!("stored {column} of {owner} does not parse: {e}"))
}
