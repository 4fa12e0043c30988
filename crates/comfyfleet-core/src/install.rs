//! Custom-node installs on remote instances, as durable records.
//!
//! An install is started with an [`InstallSpec`] (which packs and models, on which instance),
//! gets an [`InstallId`] at once, and then runs in the background. Its [`InstallRecord`] — state,
//! per-pack [`NodeProgress`], log tail — is written to an [`InstallStore`] at every step, and each
//! step appends an [`InstallEvent`], so an install survives an orchestrator restart and can be
//! followed live or replayed like a job's events.
//!
//! Everything a user gives here (names, URLs, refs, paths) is validated by
//! [`InstallSpec::validate`] before anything runs; the executor then passes the values as
//! separate arguments, never as shell text.

use std::collections::BTreeSet;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::ids::InstallId;
use crate::time::Timestamp;

/// Most node packs one install may list.
pub const MAX_NODES: usize = 200;
/// Most model files one install may list.
pub const MAX_MODELS: usize = 100;
/// Lines of output an [`InstallRecord`] keeps.
pub const LOG_TAIL_LINES: usize = 50;

/// What to install on one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InstallSpec {
    /// The instance (an SSH backend's name) to install on.
    pub instance: String,
    /// Custom-node packs, installed in this order.
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
    /// Model files to download.
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    /// Restart ComfyUI afterwards and verify the packs' node classes through `/object_info`
    /// (default). Without it no pack can be verified, so packs end `installed`, not `succeeded`.
    #[serde(default = "default_true")]
    pub restart: bool,
}

fn default_true() -> bool {
    true
}

/// One custom-node pack: a git URL (with an optional ref) or a name from the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// The pack's name: its folder under `custom_nodes/`, and the registry key when no `git` URL
    /// is given. Derived from the URL when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The repository to clone (`https://`, `http://`, `ssh://`, `git://`, `file://` or
    /// `user@host:path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<String>,
    /// Branch, tag or commit to check out; the remote's default branch when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Node classes the pack must provide (added to the registry's list). Verification also
    /// requires at least one class from the pack's own module.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
}

/// One model file to download into the instance's `models/` tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Where to download it from (`https://` or `http://`).
    pub url: String,
    /// Folder under `models/`, e.g. `checkpoints` or `loras/sdxl`.
    pub folder: String,
    /// File name; the URL's last path segment when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// Expected SHA-256 (hex) of the file; checked after download and for an existing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Why an [`InstallSpec`] was refused. Nothing has run when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InstallSpecError {
    /// A field's value is not allowed.
    #[error("{field}: {reason}")]
    Invalid {
        /// Which field, e.g. `nodes[2].git`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InstallSpecError {
    InstallSpecError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Characters no real repository or download URL needs and every shell treats specially.
/// Values are passed as arguments and never reach a shell anyway; refusing them too means a
/// payload never even reaches the instance.
const SHELL_META: &[char] = &[
    '$', '`', ';', '|', '&', '<', '>', '\\', '\'', '"', '(', ')', '{', '}', '*', '!',
];

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Checks a pack folder or file name: 1–100 characters of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` or `-` (so never `..`, a hidden file or an option).
pub fn validate_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 100 {
        return Err("must be 1 to 100 characters".into());
    }
    if s.starts_with('.') || s.starts_with('-') {
        return Err("must not start with '.' or '-'".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "character {c:?} is not allowed (use A-Z, a-z, 0-9, '.', '_', '-')"
        ));
    }
    Ok(())
}

/// Checks a git URL: one of the schemes `https`, `http`, `ssh`, `git`, `file`, or scp-like
/// `user@host:path`; no whitespace or control characters, no leading `-`, no `ext::`-style
/// transports.
pub fn validate_git_url(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 2048 {
        return Err("must be 1 to 2048 characters".into());
    }
    if has_control(s) || s.chars().any(char::is_whitespace) {
        return Err("must not contain whitespace or control characters".into());
    }
    if s.starts_with('-') {
        return Err("must not start with '-'".into());
    }
    if let Some(c) = s.chars().find(|c| SHELL_META.contains(c)) {
        return Err(format!("character {c:?} is not allowed in a git URL"));
    }
    if s.contains("::") {
        return Err("git transport helpers ('<transport>::<address>') are not allowed".into());
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        if !matches!(scheme, "https" | "http" | "ssh" | "git" | "file") {
            return Err(format!(
                "scheme {scheme:?} is not allowed (use https, http, ssh, git or file)"
            ));
        }
        if rest.is_empty() || rest.starts_with('-') {
            return Err("has no host or path after the scheme".into());
        }
        return Ok(());
    }
    // scp-like: user@host:path
    if let Some((user_host, path)) = s.split_once(':')
        && let Some((user, host)) = user_host.split_once('@')
    {
        let ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('-')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if ok(user) && ok(host) && !path.is_empty() && !path.starts_with('-') {
            return Ok(());
        }
    }
    Err("is not a URL (https://, http://, ssh://, git://, file://) or user@host:path".into())
}

/// Checks a git ref or commit: 1–200 characters of `A-Z a-z 0-9 . _ - / +`, not starting with
/// `-` or `/`, without `..`, `//`, `@{`, and not ending with `/`, `.` or `.lock`.
pub fn validate_rev(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 200 {
        return Err("must be 1 to 200 characters".into());
    }
    if s.starts_with('-') || s.starts_with('/') {
        return Err("must not start with '-' or '/'".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | '+')))
    {
        return Err(format!("character {c:?} is not allowed in a git ref"));
    }
    if s.contains("..") || s.contains("//") || s.contains("@{") {
        return Err("must not contain '..', '//' or '@{'".into());
    }
    if s.ends_with('/') || s.ends_with('.') || s.ends_with(".lock") {
        return Err("must not end with '/', '.' or '.lock'".into());
    }
    Ok(())
}

/// Checks a model URL: `https://` or `http://`, no whitespace or control characters.
pub fn validate_http_url(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 4096 {
        return Err("must be 1 to 4096 characters".into());
    }
    if has_control(s) || s.chars().any(char::is_whitespace) {
        return Err("must not contain whitespace or control characters".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| matches!(c, '`' | '$' | ';' | '|' | '<' | '>' | '\\' | '"' | '\''))
    {
        return Err(format!("character {c:?} is not allowed in a download URL"));
    }
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| "must start with https:// or http://".to_owned())?;
    if rest.is_empty() || rest.starts_with('/') || rest.starts_with('-') {
        return Err("has no host".into());
    }
    Ok(())
}

/// Checks a relative folder like `loras/sdxl`: 1–5 components, each a valid [`validate_name`].
pub fn validate_folder(s: &str) -> Result<(), String> {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() > 5 {
        return Err("must have at most 5 components".into());
    }
    for p in parts {
        validate_name(p).map_err(|e| format!("component {p:?} {e}"))?;
    }
    Ok(())
}

/// Checks a node class name: 1–200 characters, no control characters.
pub fn validate_class(s: &str) -> Result<(), String> {
    if s.trim().is_empty() || s.len() > 200 || has_control(s) {
        return Err("must be 1 to 200 characters without control characters".into());
    }
    Ok(())
}

/// The URL with any `user:password@` and the query string hidden (a download URL often carries
/// a token), for logs, events and API answers.
pub fn redact_url(url: &str) -> String {
    let (base, had_query) = match url.split_once('?') {
        Some((b, _)) => (b, true),
        None => (url, false),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let userinfo = if authority.contains('@') { "***@" } else { "" };
            format!("{scheme}://{userinfo}{host}{path}")
        }
        None => base.to_owned(),
    };
    if had_query {
        format!("{base}?***")
    } else {
        base
    }
}

impl NodeSpec {
    /// The pack's folder name: `name`, or the git URL's last path segment without `.git`.
    pub fn folder(&self) -> Option<String> {
        if let Some(n) = &self.name {
            return Some(n.clone());
        }
        let url = self.git.as_deref()?;
        let last = url
            .trim_end_matches('/')
            .rsplit(['/', ':'])
            .next()
            .unwrap_or(url);
        let last = last.strip_suffix(".git").unwrap_or(last);
        Some(last.to_owned())
    }
}

impl ModelSpec {
    /// The file name: `filename`, or the URL's last path segment.
    pub fn file_name(&self) -> Option<String> {
        if let Some(f) = &self.filename {
            return Some(f.clone());
        }
        let path = self.url.split(['?', '#']).next().unwrap_or(&self.url);
        let path = path.split_once("://").map_or(path, |(_, r)| r);
        let (_, path) = path.split_once('/')?;
        path.rsplit('/')
            .next()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }
}

impl InstallSpec {
    /// An install of `nodes` on `instance`, restarting and verifying afterwards.
    pub fn new(instance: impl Into<String>, nodes: Vec<NodeSpec>) -> InstallSpec {
        InstallSpec {
            instance: instance.into(),
            nodes,
            models: Vec::new(),
            restart: true,
        }
    }

    /// Checks every field; see the `validate_*` functions of this module for the rules.
    pub fn validate(&self) -> Result<(), InstallSpecError> {
        if self.instance.trim().is_empty()
            || self.instance.len() > 200
            || has_control(&self.instance)
        {
            return Err(invalid(
                "instance",
                "must be 1 to 200 characters without control characters",
            ));
        }
        if self.nodes.is_empty() && self.models.is_empty() {
            return Err(invalid("nodes", "nothing to install: give nodes or models"));
        }
        if self.nodes.len() > MAX_NODES {
            return Err(invalid("nodes", format!("at most {MAX_NODES} packs")));
        }
        if self.models.len() > MAX_MODELS {
            return Err(invalid("models", format!("at most {MAX_MODELS} files")));
        }
        let mut folders = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let f = |k: &str| format!("nodes[{i}].{k}");
            if n.name.is_none() && n.git.is_none() {
                return Err(invalid(format!("nodes[{i}]"), "needs a name or a git URL"));
            }
            if let Some(url) = &n.git {
                validate_git_url(url).map_err(|e| invalid(f("git"), e))?;
            }
            if let Some(name) = &n.name {
                validate_name(name).map_err(|e| invalid(f("name"), e))?;
            }
            let folder = n.folder().unwrap_or_default();
            validate_name(&folder).map_err(|e| {
                invalid(
                    f("name"),
                    format!("folder {folder:?} derived from the URL {e}; give a name"),
                )
            })?;
            if !folders.insert(folder.clone()) {
                return Err(invalid(
                    f("name"),
                    format!("pack {folder:?} is listed twice"),
                ));
            }
            if let Some(rev) = &n.rev {
                validate_rev(rev).map_err(|e| invalid(f("rev"), e))?;
            }
            for (j, c) in n.classes.iter().enumerate() {
                validate_class(c).map_err(|e| invalid(format!("nodes[{i}].classes[{j}]"), e))?;
            }
        }
        let mut files = BTreeSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let f = |k: &str| format!("models[{i}].{k}");
            validate_http_url(&m.url).map_err(|e| invalid(f("url"), e))?;
            validate_folder(&m.folder).map_err(|e| invalid(f("folder"), e))?;
            let name = m.file_name().ok_or_else(|| {
                invalid(f("filename"), "the URL has no file name; give a filename")
            })?;
            validate_name(&name).map_err(|e| invalid(f("filename"), e))?;
            if let Some(h) = &m.sha256
                && (h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()))
            {
                return Err(invalid(f("sha256"), "must be 64 hex digits"));
            }
            if !files.insert(format!("{}/{name}", m.folder)) {
                return Err(invalid(f("filename"), "the same file is listed twice"));
            }
        }
        Ok(())
    }
}

/// The state of an install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum InstallState {
    /// Accepted, not started yet.
    Queued,
    /// Running (or resuming after an orchestrator restart).
    Running,
    /// Every pack verified and every model present.
    Succeeded,
    /// At least one pack or model failed (the others are reported individually), or the
    /// install could not run at all.
    Failed,
    /// Cancelled; the remote process group was killed.
    Cancelled,
}

impl InstallState {
    /// All states.
    pub const ALL: [InstallState; 5] = [
        InstallState::Queued,
        InstallState::Running,
        InstallState::Succeeded,
        InstallState::Failed,
        InstallState::Cancelled,
    ];

    /// Whether nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            InstallState::Succeeded | InstallState::Failed | InstallState::Cancelled
        )
    }

    /// The name used in JSON and in stores.
    pub fn as_str(self) -> &'static str {
        match self {
            InstallState::Queued => "queued",
            InstallState::Running => "running",
            InstallState::Succeeded => "succeeded",
            InstallState::Failed => "failed",
            InstallState::Cancelled => "cancelled",
        }
    }

    /// Parses [`as_str`](InstallState::as_str)'s names.
    pub fn parse(s: &str) -> Option<InstallState> {
        InstallState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for InstallState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an install is in its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum InstallPhase {
    /// Waiting to start.
    Queued,
    /// Opening the SSH connection.
    Connecting,
    /// Installing node packs.
    Nodes,
    /// Downloading models.
    Models,
    /// Restarting ComfyUI.
    Restarting,
    /// Checking `/object_info` for the packs' classes.
    Verifying,
    /// Finished.
    Done,
}

/// The status of one pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Not started.
    Pending,
    /// Cloning, or fetching and checking out the ref.
    Fetching,
    /// Installing its `requirements.txt`.
    Requirements,
    /// Files and requirements in place; waiting for verification.
    Installed,
    /// Verified: its classes appear in `/object_info`.
    Succeeded,
    /// Failed (see `error`); the other packs continue.
    Failed,
    /// The install was cancelled before this pack finished.
    Cancelled,
}

impl NodeStatus {
    /// Whether the pack's work is over (it will only change through verification).
    pub fn is_done(self) -> bool {
        matches!(
            self,
            NodeStatus::Installed
                | NodeStatus::Succeeded
                | NodeStatus::Failed
                | NodeStatus::Cancelled
        )
    }
}

/// The status of a pack's `requirements.txt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RequirementsStatus {
    /// Not looked at yet.
    #[default]
    Unknown,
    /// The pack has no `requirements.txt`.
    None,
    /// Installing.
    Installing,
    /// Installed.
    Installed,
    /// pip failed.
    Failed,
}

/// Progress and result of one pack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeProgress {
    /// Folder under `custom_nodes/`.
    pub name: String,
    /// The repository (credentials hidden).
    pub git: String,
    /// The requested ref, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Status.
    pub status: NodeStatus,
    /// Requirements status.
    #[serde(default)]
    pub requirements: RequirementsStatus,
    /// The commit checked out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Whether the pack was already at that commit (nothing fetched or installed).
    #[serde(default)]
    pub already_present: bool,
    /// Classes the pack must provide (from the spec and the registry).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_classes: Vec<String>,
    /// Classes found in `/object_info` with this pack's module.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The status of one model download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    /// Not started.
    Pending,
    /// Downloading.
    Downloading,
    /// In place (downloaded now, or already present with the right hash).
    Succeeded,
    /// Failed (see `error`).
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

/// Progress and result of one model file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelProgress {
    /// The source URL (credentials and query hidden).
    pub url: String,
    /// Path under `models/`.
    pub path: String,
    /// Status.
    pub status: ModelStatus,
    /// Whether it was already present.
    #[serde(default)]
    pub already_present: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The durable record of one install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstallRecord {
    /// Its id.
    pub id: InstallId,
    /// What was asked.
    pub spec: InstallSpec,
    /// State.
    pub state: InstallState,
    /// Where it is.
    pub phase: InstallPhase,
    /// One entry per pack of the spec, in order.
    pub nodes: Vec<NodeProgress>,
    /// One entry per model of the spec, in order.
    pub models: Vec<ModelProgress>,
    /// Index into `nodes` of the pack being worked on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<usize>,
    /// The last [`LOG_TAIL_LINES`] lines of output.
    #[serde(default)]
    pub log_tail: Vec<String>,
    /// Why the install failed as a whole (connection refused, cancelled, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How often an orchestrator restart resumed it.
    #[serde(default)]
    pub resumed: u32,
    /// Optimistic-concurrency version: [`InstallStore::update_install`] writes only over the
    /// version it read, and increments it.
    pub version: u64,
    /// When it was accepted.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// When it reached a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
}

/// Counts over an install's packs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeCounts {
    /// Packs in the spec.
    pub total: usize,
    /// Packs whose work is over (installed, succeeded, failed or cancelled).
    pub processed: usize,
    /// Verified packs.
    pub succeeded: usize,
    /// Failed packs.
    pub failed: usize,
}

impl InstallRecord {
    /// A queued record for `spec` (already validated), with the packs' resolved sources.
    pub fn new(id: InstallId, spec: InstallSpec, nodes: Vec<NodeProgress>, now: Timestamp) -> Self {
        let models = spec
            .models
            .iter()
            .map(|m| ModelProgress {
                url: redact_url(&m.url),
                path: format!("{}/{}", m.folder, m.file_name().unwrap_or_default()),
                status: ModelStatus::Pending,
                already_present: false,
                error: None,
            })
            .collect();
        InstallRecord {
            id,
            spec,
            state: InstallState::Queued,
            phase: InstallPhase::Queued,
            nodes,
            models,
            current: None,
            log_tail: Vec::new(),
            error: None,
            resumed: 0,
            version: 0,
            created_at: now,
            updated_at: now,
            finished_at: None,
        }
    }

    /// The record as shown outside (API answers, CLI output): URLs in the spec with their
    /// credentials and query strings hidden. Stores keep the full spec, as a resume needs it.
    pub fn redacted(&self) -> InstallRecord {
        let mut r = self.clone();
        for n in &mut r.spec.nodes {
            if let Some(g) = &n.git {
                n.git = Some(redact_url(g));
            }
        }
        for m in &mut r.spec.models {
            m.url = redact_url(&m.url);
        }
        r
    }

    /// Counts over the packs.
    pub fn counts(&self) -> NodeCounts {
        NodeCounts {
            total: self.nodes.len(),
            processed: self.nodes.iter().filter(|n| n.status.is_done()).count(),
            succeeded: self
                .nodes
                .iter()
                .filter(|n| n.status == NodeStatus::Succeeded)
                .count(),
            failed: self
                .nodes
                .iter()
                .filter(|n| n.status == NodeStatus::Failed)
                .count(),
        }
    }

    /// Appends a line to the log tail, keeping the last [`LOG_TAIL_LINES`].
    pub fn push_log(&mut self, line: impl Into<String>) {
        self.log_tail.push(line.into());
        if self.log_tail.len() > LOG_TAIL_LINES {
            let extra = self.log_tail.len() - LOG_TAIL_LINES;
            self.log_tail.drain(..extra);
        }
    }
}

/// What happened during an install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InstallEventKind {
    /// Accepted.
    Created,
    /// An orchestrator picked it up after a restart.
    Resumed {
        /// How often it has been resumed now.
        count: u32,
    },
    /// It moved to a new phase.
    Phase {
        /// The phase.
        phase: InstallPhase,
    },
    /// A pack's progress changed.
    Node {
        /// Index into the record's `nodes`.
        index: usize,
        /// The pack's progress now.
        node: NodeProgress,
    },
    /// A model's progress changed.
    Model {
        /// Index into the record's `models`.
        index: usize,
        /// The model's progress now.
        model: ModelProgress,
    },
    /// A line of the remote command's output.
    Output {
        /// The pack it belongs to, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<usize>,
        /// The line.
        line: String,
    },
    /// The install reached a terminal state.
    Finished {
        /// The final state.
        state: InstallState,
        /// Why, if it failed as a whole.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// A stored install event. `seq` counts from 1 within one install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstallEvent {
    /// The install.
    pub install: InstallId,
    /// Position within the install's events, from 1.
    pub seq: u64,
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    #[serde(flatten)]
    pub kind: InstallEventKind,
}

/// Which installs to list, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallFilter {
    /// Only this instance.
    pub instance: Option<String>,
    /// Only these states (any when empty).
    pub states: Vec<InstallState>,
    /// Only installs created before this id (for paging; ids sort by creation time).
    pub before: Option<InstallId>,
    /// At most this many (1–1000).
    pub limit: usize,
}

/// What an instance has, as recorded after a verified install: the next install of the same
/// pack at the same commit is skipped, and the fleet's inventory is known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstalledPack {
    /// The instance.
    pub instance: String,
    /// Folder under `custom_nodes/`.
    pub name: String,
    /// Its repository (credentials hidden).
    pub git: String,
    /// The commit checked out.
    pub commit: String,
    /// The classes it provides.
    pub classes: Vec<String>,
    /// The install that recorded it.
    pub install: InstallId,
    /// When.
    pub installed_at: Timestamp,
}

/// Durable storage for installs. Implemented by [`crate::MemoryStore`] and the SQL stores.
///
/// Writes are guarded by the record's `version` so two orchestrators can never both drive
/// one install: the loser gets [`StoreError::Conflict`] and must stop.
#[async_trait]
pub trait InstallStore: Send + Sync + 'static {
    /// Adds a new install (version 0, any state) with a `created` event (seq 1, at
    /// `record.created_at`), and returns that event. Refused with [`StoreError::Conflict`]
    /// (naming the active install) when the instance already has a queued or running install,
    /// or when an install with the same id exists.
    async fn create_install(&self, record: &InstallRecord) -> Result<InstallEvent, StoreError>;

    /// One install.
    async fn get_install(&self, id: InstallId) -> Result<Option<InstallRecord>, StoreError>;

    /// Installs matching `filter`, newest first. A `filter.limit` outside 1–1000 gives
    /// [`StoreError::InvalidInput`].
    async fn list_installs(&self, filter: &InstallFilter)
    -> Result<Vec<InstallRecord>, StoreError>;

    /// Replaces the record and appends `events` (each gets the next `seq`, `at = record.updated_at`)
    /// in one transaction, if the stored version equals `record.version`; the stored version
    /// becomes `record.version + 1`. A terminal stored record is never changed
    /// ([`StoreError::InvalidInput`]); a different version gives [`StoreError::Conflict`];
    /// an unknown id [`StoreError::InstallNotFound`].
    async fn update_install(
        &self,
        record: &InstallRecord,
        events: &[InstallEventKind],
    ) -> Result<Vec<InstallEvent>, StoreError>;

    /// The install's events with `seq > after`, oldest first, at most `limit`. An unknown id
    /// gives [`StoreError::InstallNotFound`].
    async fn install_events(
        &self,
        id: InstallId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InstallEvent>, StoreError>;

    /// The packs recorded on `instance`, by name.
    async fn instance_packs(&self, instance: &str) -> Result<Vec<InstalledPack>, StoreError>;

    /// Records (inserts or replaces, keyed by instance and name) verified packs.
    async fn record_packs(&self, packs: &[InstalledPack]) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(git: &str) -> NodeSpec {
        NodeSpec {
            git: Some(git.into()),
            ..NodeSpec::default()
        }
    }

    #[test]
    fn folder_names_come_from_the_url() {
        assert_eq!(
            node("https://github.com/ltdrdata/ComfyUI-Impact-Pack.git").folder(),
            Some("ComfyUI-Impact-Pack".into())
        );
        assert_eq!(
            node("git@github.com:a/b-pack").folder(),
            Some("b-pack".into())
        );
        assert_eq!(node("file:///srv/packs/x/").folder(), Some("x".into()));
    }

    #[test]
    fn injection_payloads_are_refused() {
        let bad_urls = [
            "--upload-pack=touch /tmp/pwned",
            "-uhttps://x",
            "ext::sh -c touch% /tmp/pwned",
            "https://x/y; rm -rf /",
            "https://x/$(id)",
            "https://x/`id`",
            "https://x/a|b",
            "https://x/a\nb",
            "fd::17",
            "ftp://x/y",
            "",
        ];
        for u in bad_urls {
            let spec = InstallSpec::new(
                "gpu",
                vec![NodeSpec {
                    name: Some("p".into()),
                    ..node(u)
                }],
            );
            assert!(spec.validate().is_err(), "{u:?} accepted");
        }
        for rev in [
            "--output=/tmp/x",
            "a..b",
            "x;rm",
            "$(id)",
            "`id`",
            "a b",
            "a\nb",
            "HEAD@{1}",
            "-",
        ] {
            assert!(validate_rev(rev).is_err(), "{rev:?} accepted");
        }
        for name in [
            "..", ".hidden", "-rf", "a/b", "a b", "a;b", "$(id)", "", "a\nb",
        ] {
            assert!(validate_name(name).is_err(), "{name:?} accepted");
        }
        assert!(validate_folder("../etc").is_err());
        assert!(validate_folder("loras/sdxl").is_ok());
        assert!(validate_git_url("git@github.com:ltdrdata/ComfyUI-Manager.git").is_ok());
        assert!(validate_git_url("-oProxyCommand=x@h:p").is_err());
        assert!(validate_rev("v1.2.3").is_ok());
        assert!(validate_rev("feature/x").is_ok());
    }

    #[test]
    fn spec_validation_names_the_field() {
        let spec = InstallSpec::new(
            "gpu",
            vec![
                node("https://h/a.git"),
                node("https://h/b.git"),
                NodeSpec {
                    rev: Some("--bad".into()),
                    ..node("https://h/c.git")
                },
            ],
        );
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.starts_with("nodes[2].rev:"), "{err}");
        let dup = InstallSpec::new("gpu", vec![node("https://h/a.git"), node("https://x/a")]);
        assert!(dup.validate().unwrap_err().to_string().contains("twice"));
        assert!(InstallSpec::new("gpu", vec![]).validate().is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("https://user:pw@host/x/m.safetensors?token=abc"),
            "https://***@host/x/m.safetensors?***"
        );
        assert_eq!(redact_url("https://h/a.git"), "https://h/a.git");
    }

    #[test]
    fn model_file_names() {
        let m = ModelSpec {
            url: "https://h/models/sd.safetensors?download=1".into(),
            folder: "checkpoints".into(),
            filename: None,
            sha256: None,
        };
        assert_eq!(m.file_name(), Some("sd.safetensors".into()));
        let m = ModelSpec {
            url: "https://h".into(),
            ..m
        };
        assert_eq!(m.file_name(), None);
    }

    #[test]
    fn log_tail_is_bounded() {
        let spec = InstallSpec::new("gpu", vec![node("https://h/a.git")]);
        let mut r = InstallRecord::new(InstallId::new(), spec, vec![], Timestamp::from_millis(0));
        for i in 0..200 {
            r.push_log(format!("line {i}"));
        }
        assert_eq!(r.log_tail.len(), LOG_TAIL_LINES);
        assert_eq!(r.log_tail.last().map(String::as_str), Some("line 199"));
    }
}
