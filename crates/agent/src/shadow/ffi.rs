//! The C ABI of the process-wide shadow store (declared for C in `include/relive_shadow.h`, wrapped
//! for Rust patches by `relive_patch::shadow`). Signatures follow the kernel's `klp_shadow_*`
//! (SPEC §7); `gfp_flags` is accepted for source compatibility and ignored (user space has one
//! allocator; none of these writers may be called from a signal handler anyway).
//!
//! Async-signal-safe: `relive_shadow_get` only. All others take the store lock and allocate.

use core::ffi::c_void;

use super::{Ctor, Dtor, global};

/// SV2: the data of `<obj, id>`, or null. Lock-free and async-signal-safe.
#[unsafe(no_mangle)]
pub extern "C" fn relive_shadow_get(obj: *const c_void, id: u64) -> *mut c_void {
    global().get(obj, id)
}

/// SV3: a new zero-filled, 16-byte aligned variable of `size` bytes, constructed by `ctor` under
/// the store lock; null if `<obj, id>` exists (diagnostic on stderr), the ctor fails or memory runs out.
///
/// # Safety
/// `ctor` (may be null) must be a valid function that is safe to call with `(obj, data, ctor_data)`
/// under the store lock, and must not call any shadow writer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn relive_shadow_alloc(
    obj: *const c_void,
    id: u64,
    size: usize,
    gfp_flags: u32,
    ctor: Option<Ctor>,
    ctor_data: *mut c_void,
) -> *mut c_void {
    let _ = gfp_flags;
    // SAFETY: forwarded caller contract.
    unsafe { global().alloc(obj, id, size, ctor, ctor_data) }
}

/// SV4: the existing data of `<obj, id>` (no ctor), or a new variable as `relive_shadow_alloc`
/// makes it. The ctor runs at most once per key.
///
/// # Safety
/// As for `relive_shadow_alloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn relive_shadow_get_or_alloc(
    obj: *const c_void,
    id: u64,
    size: usize,
    gfp_flags: u32,
    ctor: Option<Ctor>,
    ctor_data: *mut c_void,
) -> *mut c_void {
    let _ = gfp_flags;
    // SAFETY: forwarded caller contract.
    unsafe { global().get_or_alloc(obj, id, size, ctor, ctor_data) }
}

/// SV5: unlinks `<obj, id>`, runs `dtor(obj, data)` under the store lock, frees the data.
/// Absent key: no-op.
///
/// # Safety
/// `dtor` (may be null) must be safe to call under the store lock; no thread may use the data after.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn relive_shadow_free(obj: *const c_void, id: u64, dtor: Option<Dtor>) {
    // SAFETY: forwarded caller contract.
    unsafe { global().free(obj, id, dtor) }
}

/// SV6: `relive_shadow_free` for every `<*, id>`.
///
/// # Safety
/// As for `relive_shadow_free`, for every matching variable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn relive_shadow_free_all(id: u64, dtor: Option<Dtor>) {
    // SAFETY: forwarded caller contract.
    unsafe { global().free_all(id, dtor) }
}

/// Number of live shadow variables of every id (walks the table under the store lock): lets tests
/// and `post_unpatch` callbacks check that nothing leaked.
#[unsafe(no_mangle)]
pub extern "C" fn relive_shadow_count() -> usize {
    global().count()
}
