//! # comfyfleet-engine
//!
//! The scheduler of comfyfleet, generic over the three traits of `comfyfleet-core`: it claims
//! jobs from a [`comfyfleet_core::TaskStore`], asks a [`comfyfleet_core::FailoverStrategy`]
//! (by default [`SmartFailover`]) where each goes, respects every backend's capacity, and
//! supervises each attempt with three clocks:
//!
//! 1. **start timeout** — accepted but not started, counted only while our execution is at the
//!    head of the backend's queue (default 5 s);
//! 2. **node timeout** — no event from the running node (default 300 s, per-class overrides);
//! 3. the job's **deadline**.
//!
//! A timeout cancels the remote execution, blocks that backend for the workflow, and retries
//! elsewhere. Force-cancel runs a ladder (remote cancel → restart → quarantine). Leases are
//! renewed by heartbeat, which also carries cancel requests; a lost lease stops the attempt.
//! Progress and node events are written coalesced; every stored event is published to
//! subscribers through a bounded channel, so a slow subscriber never blocks the engine.
//!
//! This crate has no HTTP, SQL or SSH dependencies.

#![deny(missing_docs)]

mod attempt;
mod config;
mod engine;
mod smart;

pub use config::EngineConfig;
pub use engine::{BackendStatus, Engine, EngineBuilder, EngineError};
pub use smart::{CLOUD_TIER, SmartFailover, SmartFailoverConfig, SpillOver};
