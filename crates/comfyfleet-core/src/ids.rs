//! Identifiers: jobs, installs, backends and remote executions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of a job: a UUID v7, so ids sort by creation time and map to a native PostgreSQL `uuid`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(Uuid);

impl JobId {
    /// A new, time-ordered id.
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }

    /// Wraps an existing UUID (read back from a store).
    pub fn from_uuid(uuid: Uuid) -> Self {
        JobId(uuid)
    }

    /// The UUID inside.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// The id of a custom-node install on an instance: a UUID v7, like [`JobId`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstallId(Uuid);

impl InstallId {
    /// A new, time-ordered id.
    pub fn new() -> Self {
        InstallId(Uuid::now_v7())
    }

    /// Wraps an existing UUID (read back from a store).
    pub fn from_uuid(uuid: Uuid) -> Self {
        InstallId(uuid)
    }

    /// The UUID inside.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for InstallId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for InstallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for InstallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstallId({})", self.0)
    }
}

impl FromStr for InstallId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(InstallId)
    }
}

/// The name of a backend in a fleet (`gpu-1`, `runninghub`, …). Unique within one fleet.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackendId(String);

impl BackendId {
    /// Wraps a backend name.
    pub fn new(name: impl Into<String>) -> Self {
        BackendId(name.into())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendId({})", self.0)
    }
}

impl From<&str> for BackendId {
    fn from(s: &str) -> Self {
        BackendId(s.to_owned())
    }
}

/// A backend's own id for one execution (ComfyUI `prompt_id`, RunningHub `taskId`). Stored with
/// the attempt so that an orchestrator that restarts can reattach instead of running it twice.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RemoteRef(String);

impl RemoteRef {
    /// Wraps a backend's execution id.
    pub fn new(id: impl Into<String>) -> Self {
        RemoteRef(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RemoteRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RemoteRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteRef({})", self.0)
    }
}

/// A string schema with a description (and an optional format), for the id newtypes below.
#[cfg(feature = "openapi")]
fn string_schema(
    description: &str,
    format: Option<utoipa::openapi::schema::KnownFormat>,
    example: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaFormat, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(format.map(SchemaFormat::KnownFormat))
        .description(Some(description))
        .examples([serde_json::Value::from(example)])
        .into()
}

/// A job id is a UUID string (v7, time-ordered).
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for JobId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "A job id: a UUID (v7, so ids sort by creation time).",
            Some(utoipa::openapi::schema::KnownFormat::Uuid),
            "019a6b6e-6d2c-7c3e-9a51-2f0c4b7d8e91",
        )
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for JobId {}

/// An install id is a UUID string (v7, time-ordered).
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for InstallId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "An install id: a UUID (v7, so ids sort by creation time).",
            Some(utoipa::openapi::schema::KnownFormat::Uuid),
            "019a6b6e-7a11-7c3e-9a51-2f0c4b7d8e91",
        )
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for InstallId {}

/// A backend id is its configured name.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for BackendId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "The name of a backend in the fleet, unique within it.",
            None,
            "gpu-1",
        )
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for BackendId {}

/// A remote reference is the backend's own opaque id for an execution.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for RemoteRef {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "A backend's own id for one execution (ComfyUI `prompt_id`, RunningHub `taskId`).",
            None,
            "8f0c2a6e-1b7d-4f35-9d2e-5a4c3b2a1f00",
        )
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for RemoteRef {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_time_ordered_and_round_trip() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a < b, "UUID v7 ids made later sort later");
        let parsed: JobId = a.to_string().parse().unwrap();
        assert_eq!(parsed, a);
        assert!("not-a-uuid".parse::<JobId>().is_err());
    }
}
