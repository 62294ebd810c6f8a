//! librelive_agent.so: the runtime that lives inside a target process (DESIGN §4.2, §4.6–§4.8).
//!
//! Loaded by `LD_PRELOAD` or by one remote `dlopen` (relive-proc's injection). Its constructor
//! ([`init::agent_init`], run from `.init_array`) fills the registry header, creates the command
//! pipes and starts the service thread that performs every later action in the target (dlopen of
//! patches, callbacks, stub pages), so the controller never hijacks a thread again.
//!
//! Panics: the workspace cannot set `panic = "abort"` for one package (cargo rejects `panic` in
//! `[profile.*.package.*]`), and a cdylib built with the workspace's unwind profile would otherwise
//! unwind a panic out of the service thread. Instead: (1) the constructor installs a panic hook that
//! prints the message and calls `abort()` before any unwinding starts (this cdylib has its own copy of
//! std, so the hook never replaces a Rust target's own hook); (2) every entry point called from C or
//! from the target (`.init_array`, `pthread_atfork` handlers, exported functions) is `extern "C"`, and
//! Rust aborts when a panic reaches an `extern "C"` boundary. No panic ever unwinds into target code.

pub mod init;
pub mod int3;
pub mod interpose;
pub mod ops;
pub mod registry;
pub mod service;
pub mod shadow;
pub mod state;
pub mod stopfree;
pub mod tls;
