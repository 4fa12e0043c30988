//! # comfyfleet-testkit
//!
//! What every test and benchmark of comfyfleet shares, published so that third parties can test
//! their own backends and stores the same way:
//!
//! * [`FakeBackend`] — an in-process [`comfyfleet_core::Backend`], scriptable per job, with a
//!   fault plan (hang before start, hang mid-node, crash, fail with each error kind, missing node
//!   type, slow cancel, a node that ignores cancel);
//! * [`store_conformance`] — the public conformance suite every [`comfyfleet_core::TaskStore`]
//!   must pass, including a model-based property test of random operation sequences;
//! * [`install_store_conformance()`] — the public conformance suite every
//!   [`comfyfleet_core::InstallStore`] must pass;
//! * [`backend_conformance`] — the public conformance suite for backends;
//! * [`ComfyUiSim`] — an in-process ComfyUI 0.3.64 server on loopback (HTTP + WebSocket) with
//!   fault knobs, faithful to recorded traces.

#![deny(missing_docs)]

pub mod backend_conformance;
pub mod comfyui_sim;
pub mod fake;
pub mod install_store_conformance;
pub mod instance;
mod multipart;
pub mod pg;
pub mod runninghub_sim;
pub mod serve;
pub mod sshd;
pub mod store_conformance;
pub mod workflows;

pub use backend_conformance::{BackendFixtures, backend_conformance};
pub use comfyui_sim::{ComfyUiSim, SimConfig, SimFaults, SimStats};
pub use fake::{FakeBackend, FakeBackendBuilder, FakeStats, Fault};
pub use install_store_conformance::{
    InstallStoreFactory, install_prune_conformance, install_store_conformance,
};
pub use instance::TestInstance;
pub use pg::TestPostgres;
pub use runninghub_sim::{RunningHubFaults, RunningHubSim, RunningHubSimConfig, RunningHubStats};
pub use store_conformance::{StoreFactory, store_conformance, store_model_test};
