//! Integration tests of `PostgresStore` on a real PostgreSQL (one test binary, one module per
//! topic). The server comes from `COMFYFLEET_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); every store a test makes lives in a fresh schema
//! of its own, so the tests run in parallel and leave nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod concurrency;
mod conformance;
mod inputs;
mod installs;
mod setup;
