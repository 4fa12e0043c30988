//! Client and backend tests against a scripted loopback RunningHub.

// Helpers outside #[test] functions unwrap too (clippy.toml only allows it inside them).
#![allow(clippy::unwrap_used)]

mod backend;
mod client;
mod e2e;
mod engine;
mod mock;
mod sim;
