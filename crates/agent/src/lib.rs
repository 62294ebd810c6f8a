//! librelive_agent.so: the runtime that lives inside a target process.

pub mod shadow;
