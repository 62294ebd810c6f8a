//! relive-proc: the only crate that touches the operating system (ptrace, /proc, memory I/O).

pub mod child;
