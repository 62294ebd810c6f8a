//! relive-abi: the layouts shared by the agent (`librelive_agent.so`, inside the target) and the
//! controller (the `relive` binary): the registry header (DESIGN §4.8) and the command-channel
//! protocol (DESIGN §4.7). Pure: constants plus encode/decode over byte slices, no I/O.
//!
//! Both sides compile this crate, so a layout change is one edit here plus a version bump
//! ([`registry::LAYOUT_VERSION`], [`proto::PROTO_VERSION`]). Readers refuse versions they do not know.
#![forbid(unsafe_code)]

pub mod procfs;
pub mod proto;
pub mod registry;

/// The agent's own version, reported by `Ping` and in the registry header.
pub const AGENT_VERSION: u32 = 1;

/// The exported symbol of the registry static in `librelive_agent.so`.
pub const REGISTRY_SYMBOL: &str = "relive_registry";

/// The file name of the agent library.
pub const AGENT_FILE_NAME: &str = "librelive_agent.so";
