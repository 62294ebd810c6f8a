//! An example live patch in Rust for `tests/targets/agent_hello.c`.
//!
//! Build: `cargo build -p rust-hello-patch` → `target/debug/librust_hello_patch.so`.
//! Inspect: `relive inspect target/debug/librust_hello_patch.so`.
//!
//! It replaces `greet(int)` of the main executable with `greet_v2`, counts its calls in the
//! target's own (non-exported) `greet_calls` through an import slot, and declares a pre_patch
//! callback and a state. Patches use no initial-exec TLS (DESIGN §4.2).

use core::sync::atomic::{AtomicI32, Ordering};
use relive_patch::{ImportSlot, patch};

/// Filled by relive with the address of the target's `static int greet_calls`.
#[unsafe(no_mangle)]
pub static GREET_CALLS: ImportSlot = ImportSlot::new();

/// How many times the callbacks ran (read by tests through `relive load … --call`).
static CALLBACKS: AtomicI32 = AtomicI32::new(0);

/// The new `greet`: returns n + 1000 instead of n + 1.
#[unsafe(no_mangle)]
pub extern "C" fn greet_v2(n: i32) -> i32 {
    n + 1000
}

/// SPEC CB1 pre_patch: 0 lets the patch proceed.
#[unsafe(no_mangle)]
pub extern "C" fn hello_pre_patch() -> i32 {
    CALLBACKS.fetch_add(1, Ordering::Relaxed);
    0
}

/// SPEC CB1 post_unpatch.
#[unsafe(no_mangle)]
pub extern "C" fn hello_post_unpatch() -> i32 {
    CALLBACKS.fetch_add(1, Ordering::Relaxed) + 1
}

patch! {
    name: "rust-hello",
    replace: false,
    stacking: false,
    objects: [{
        object: "exe",
        build_id: "",
        funcs: [{ old: "greet", sympos: 0, new: greet_v2 }],
        callbacks: { pre_patch: hello_pre_patch, post_unpatch: hello_post_unpatch },
    }],
    states: [{ id: 1, version: 1 }],
    imports: [{ object: "exe", name: "greet_calls", sympos: 0, slot: GREET_CALLS }],
}
