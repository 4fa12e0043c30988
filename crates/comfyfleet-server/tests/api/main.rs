//! API tests over a real socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod events;
mod fuzz;
mod harness;
mod installs;
mod jobs;
mod live;
mod openapi;
mod routes;
