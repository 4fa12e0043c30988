//! Engine scenarios under tokio's paused clock: every timing below is exact virtual time, never
//! wall-clock.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)]

mod fleet;
mod harness;
mod mocked;
mod property;
mod scenarios;
mod spillover;
mod takeover;
