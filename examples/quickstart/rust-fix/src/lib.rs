//! A live patch in Rust for `examples/quickstart/hello.c` (README, "Quick start").
//!
//! A cumulative patch (`replace: true`): applying it takes over every function of the patches before it
//! (here the C patch `c-fix`), which leave the process.

use std::ffi::{c_char, c_int};

/// The new `greeting(int)`: same C signature as the original.
#[unsafe(no_mangle)]
pub extern "C" fn greeting_rust(_n: c_int) -> *const c_char {
    c"hello from the Rust patch".as_ptr()
}

relive_patch::patch! {
    name: "rust-fix",
    replace: true,
    stacking: false,
    objects: [{
        object: "exe",
        build_id: "",
        funcs: [{ old: "greeting", sympos: 0, new: greeting_rust }],
        callbacks: {},
    }],
    states: [],
    imports: [],
}
