//! relive-proc: the only crate that touches the operating system (ptrace, /proc, memory I/O).
//!
//! - [`threads`]: list threads (re-listing until stable), names and scheduler states.
//! - [`ptrace`]: stop one thread ([`stop_thread`]) or all ([`stop_all`]) with SEIZE + INTERRUPT;
//!   registers with `fs_base`.
//! - [`mem`]: `process_vm_readv` split at pages, `/proc/PID/mem` code writes, `process_vm_writev`.
//! - [`image`]: modules from `/proc/PID/maps` read through `map_files`, symbols, an unwinder.
//! - [`stacks`]: stop → unwind → resume of one thread.
//! - [`error`]: one error enum; ESRCH is always [`ProcError::TargetDied`].

pub mod child;
pub mod error;
pub mod image;
pub mod mapped;
pub mod mem;
pub mod ptrace;
pub mod sched;
pub mod snapshot;
pub mod stacks;
pub mod threads;

pub use error::{ProcError, Result, permission_hint, permission_hint_for, process_exists};
pub use image::{ImageOptions, LoadedModule, ProcessImage, Symbolized};
pub use mem::{
    PageCacheReader, read_memory, read_memory_partial, read_u64, write_code, write_code_via, write_data,
};
pub use ptrace::{Regs, StopKind, StoppedProcess, StoppedThread, stop_all, stop_thread};
pub use stacks::{ThreadStack, thread_stack, unwind_regs, unwind_stopped};
pub use threads::{ThreadInfo, effective_uid, list_threads, parse_stat, tgid_of, thread_info};
pub mod agent;
pub mod remote;
pub mod xstate;
