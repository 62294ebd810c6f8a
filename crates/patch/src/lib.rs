//! relive-patch: what patch authors use in Rust.
// deny, not forbid: the shadow and state modules' FFI boundary to the agent needs item-level allow(unsafe_code).
#![deny(unsafe_code)]

pub mod manifest;
pub mod shadow;
pub mod state;

pub use manifest::ImportSlot;
