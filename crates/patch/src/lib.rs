//! relive-patch: what patch authors use in Rust.
#![forbid(unsafe_code)]
