//! # comfyfleet-comfyui
//!
//! The ComfyUI backend for comfyfleet. It follows the protocol as ComfyUI's own source defines
//! it (see `shared/reference/comfyui-protocol.md` in the project): client-chosen prompt ids, one
//! long-lived WebSocket per server connected before any submit, events demultiplexed by prompt
//! id, and an HTTP check of `/api/history/{id}` and `/api/queue` running next to the socket from
//! the moment of submission, so a silent or broken socket never delays completion detection.
//!
//! * [`protocol`] — message decoding, history parsing, error classification (pure);
//! * [`tracker`] — [`PromptTracker`], one prompt's messages → [`comfyfleet_core::ExecutionEvent`]s.

#![deny(missing_docs)]

mod backend;
mod config;
pub mod protocol;
pub mod tracker;

pub use backend::ComfyUiBackend;
pub use config::ComfyUiConfig;
pub use tracker::PromptTracker;
