//! Integration tests of `SqliteStore` (one test binary, one module per topic).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup;
mod bad_input;
mod common;
mod conformance;
mod engines;
mod fencing;
mod installs;
mod reaper;
mod scale;
