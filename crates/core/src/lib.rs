//! relive-core: the kernel livepatch model (SPEC.md §1–§9) as a pure state machine.
#![forbid(unsafe_code)]
