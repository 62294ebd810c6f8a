//! Shadow variables for Rust patches (SPEC §7, SV1–SV7): typed data that a patch attaches to
//! existing objects of the target without changing their layout.
//!
//! ```text
//! use core::sync::atomic::{AtomicU64, Ordering};
//! use relive_patch::shadow::Shadow;
//!
//! // SAFETY: id 0x636f6e6e is used only for an AtomicU64 per connection, by every patch.
//! static REQUESTS: Shadow<AtomicU64> = unsafe { Shadow::new(0x636f_6e6e) };
//!
//! extern "C" fn handle_request_v2(conn: *mut Conn) {
//!     if let Some(n) = REQUESTS.get_or_alloc_with(conn, || AtomicU64::new(0)) {
//!         n.fetch_add(1, Ordering::Relaxed);
//!     }
//!     // ...
//! }
//!
//! // In post_unpatch of the last cumulative patch (no thread runs the patched code any more):
//! // SAFETY: nothing uses the counters after the transition completed.
//! unsafe { REQUESTS.free_all() };
//! ```
//!
//! The functions live in the agent (`librelive_agent.so`), which is loaded into the target before
//! any patch. A patch cdylib links them as undefined symbols (`relive_shadow_*`); the dynamic
//! loader binds them to the agent's exports when the patch is `dlopen`ed (the agent must be in the
//! global scope: `LD_PRELOAD`, or an injection with `RTLD_GLOBAL`). This crate does not depend on
//! relive-agent.
//!
//! Rules inherited from the kernel, and how this API keeps them honest:
//! - SV7: variables belong to no patch. A cumulative patch that declares a `Shadow<T>` with the same
//!   id sees the same variables; nothing frees them when a patch is disabled or replaced. Hence
//!   [`Shadow::new`] is `unsafe`: every user of an id, across patches and languages, must agree on
//!   its type.
//! - SV2: data can be freed by any thread at any time by an explicit free. Hence
//!   [`Shadow::free`] and [`Shadow::free_all`] are `unsafe`: the caller promises that no reference
//!   obtained from `get` is still in use (in practice: free in `post_unpatch`, after the transition).
//!   Under that contract `get` can hand out `&T`.
//! - The data is shared by all threads, so `T: Send + Sync`; mutate it through atomics or locks.
//! - [`Shadow::get`] is async-signal-safe; the allocating and freeing calls are not.
//! - Initialisers run under the store lock (SV3): keep them short and never call a shadow
//!   allocation or free from inside one (the agent refuses it and returns `None`).

use core::ffi::{c_int, c_void};
use core::marker::PhantomData;
use core::num::NonZeroI32;
use core::ptr::NonNull;

/// The raw C ABI exported by the agent (the kernel's `klp_shadow_*` signatures, SPEC §7).
/// `include/relive_shadow.h` declares the same functions for C.
#[allow(unsafe_code)]
pub mod raw {
    use core::ffi::{c_int, c_void};

    /// `int ctor(void *obj, void *shadow_data, void *ctor_data)`, run under the store lock.
    pub type Ctor =
        unsafe extern "C" fn(obj: *mut c_void, shadow_data: *mut c_void, ctor_data: *mut c_void) -> c_int;
    /// `void dtor(void *obj, void *shadow_data)`, run under the store lock.
    pub type Dtor = unsafe extern "C" fn(obj: *mut c_void, shadow_data: *mut c_void);

    // SAFETY: these declarations match the agent's exports in
    // crates/agent/src/shadow/ffi.rs (same names, argument and return types, C ABI).
    unsafe extern "C" {
        /// SV2: the data of `<obj, id>` or null. Lock-free and async-signal-safe.
        pub safe fn relive_shadow_get(obj: *const c_void, id: u64) -> *mut c_void;
        /// SV3: allocate `size` zeroed bytes (16-byte aligned) and construct them; null on duplicate.
        pub fn relive_shadow_alloc(
            obj: *const c_void,
            id: u64,
            size: usize,
            gfp_flags: u32,
            ctor: Option<Ctor>,
            ctor_data: *mut c_void,
        ) -> *mut c_void;
        /// SV4: existing data without ctor, or allocate as `relive_shadow_alloc`.
        pub fn relive_shadow_get_or_alloc(
            obj: *const c_void,
            id: u64,
            size: usize,
            gfp_flags: u32,
            ctor: Option<Ctor>,
            ctor_data: *mut c_void,
        ) -> *mut c_void;
        /// SV5: unlink, `dtor(obj, data)` under the lock, free.
        pub fn relive_shadow_free(obj: *const c_void, id: u64, dtor: Option<Dtor>);
        /// SV6: `relive_shadow_free` for every `<*, id>`.
        pub fn relive_shadow_free_all(id: u64, dtor: Option<Dtor>);
        /// Number of live variables of all ids (takes the store lock).
        pub safe fn relive_shadow_count() -> usize;
    }
}

/// Anything that names an object by its address (SV1: the address is only a key, never
/// dereferenced).
pub trait ShadowKey {
    /// The address used as the key.
    fn shadow_key(&self) -> *const c_void;
}

impl<O: ?Sized> ShadowKey for *const O {
    fn shadow_key(&self) -> *const c_void {
        self.cast()
    }
}
impl<O: ?Sized> ShadowKey for *mut O {
    fn shadow_key(&self) -> *const c_void {
        self.cast_const().cast()
    }
}
impl<O: ?Sized> ShadowKey for &O {
    fn shadow_key(&self) -> *const c_void {
        (*self as *const O).cast()
    }
}
impl<O: ?Sized> ShadowKey for NonNull<O> {
    fn shadow_key(&self) -> *const c_void {
        self.as_ptr().cast_const().cast()
    }
}
impl ShadowKey for usize {
    fn shadow_key(&self) -> *const c_void {
        *self as *const c_void
    }
}

/// Number of shadow variables of every id alive in the process (takes the store lock: not for
/// signal handlers). Useful to prove, e.g. in `post_unpatch`, that nothing leaked.
pub fn count() -> usize {
    raw::relive_shadow_count()
}

/// Returned by a fallible initialiser to fail an allocation; the agent logs
/// "Failed to construct shadow variable <obj, id> (code)".
pub type CtorError = NonZeroI32;

/// A typed shadow variable: for each object, at most one `T`, keyed by `(object, id)`.
pub struct Shadow<T> {
    id: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T> core::fmt::Debug for Shadow<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Shadow<{}>({:#x})", core::any::type_name::<T>(), self.id)
    }
}

/// The agent aligns shadow data to 16 bytes.
const DATA_ALIGN: usize = 16;

// The FFI boundary: each unsafe block below says why the agent's pointer may become a `&T`.
#[allow(unsafe_code)]
impl<T: Send + Sync + 'static> Shadow<T> {
    /// The shadow variable with id `id`.
    ///
    /// # Safety
    /// Every user of `id` in the process (this patch, earlier and later cumulative patches, C code)
    /// treats its data as a `T`: SV7 hands variables from one patch to the next by id alone, with
    /// no type check.
    pub const unsafe fn new(id: u64) -> Self {
        assert!(
            core::mem::align_of::<T>() <= DATA_ALIGN,
            "shadow data is aligned to 16 bytes only"
        );
        Shadow { id, _t: PhantomData }
    }

    /// The id.
    pub const fn id(&self) -> u64 {
        self.id
    }

    /// SV2: the variable attached to `obj`, if any. Lock-free and async-signal-safe.
    pub fn get(&self, obj: impl ShadowKey) -> Option<&T> {
        let p = raw::relive_shadow_get(obj.shadow_key(), self.id);
        // SAFETY: a non-null pointer from the store is 16-byte aligned data of size_of::<T>()
        // bytes holding an initialised T (written by our ctor, per `new`'s contract on the id),
        // valid until an explicit free, which the `unsafe` free methods forbid while it is in use.
        unsafe { p.cast::<T>().as_ref() }
    }

    /// SV3: attaches a new `T` made by `init` to `obj`. `None` if `obj` already has one (the agent
    /// prints "Duplicate shadow variable"; the existing one is untouched and `init` is not called),
    /// or if memory runs out.
    pub fn alloc_with(&self, obj: impl ShadowKey, init: impl FnOnce() -> T) -> Option<&T> {
        self.try_alloc_with(obj, || Ok(init()))
    }

    /// SV3 with a fallible initialiser: an `Err(code)` leaves nothing behind and returns `None`.
    pub fn try_alloc_with(
        &self,
        obj: impl ShadowKey,
        init: impl FnOnce() -> Result<T, CtorError>,
    ) -> Option<&T> {
        self.create(obj.shadow_key(), init, false)
    }

    /// SV4: the variable attached to `obj`, or a new one made by `init` (which runs at most once
    /// per key across all threads). `None` only if memory runs out.
    pub fn get_or_alloc_with(&self, obj: impl ShadowKey, init: impl FnOnce() -> T) -> Option<&T> {
        self.try_get_or_alloc_with(obj, || Ok(init()))
    }

    /// SV4 with a fallible initialiser.
    pub fn try_get_or_alloc_with(
        &self,
        obj: impl ShadowKey,
        init: impl FnOnce() -> Result<T, CtorError>,
    ) -> Option<&T> {
        self.create(obj.shadow_key(), init, true)
    }

    /// SV4 with `T::default()`.
    pub fn get_or_default(&self, obj: impl ShadowKey) -> Option<&T>
    where
        T: Default,
    {
        self.get_or_alloc_with(obj, T::default)
    }

    fn create<F: FnOnce() -> Result<T, CtorError>>(
        &self,
        obj: *const c_void,
        init: F,
        or_get: bool,
    ) -> Option<&T> {
        let mut init = Some(init);
        let ctor_data = (&mut init as *mut Option<F>).cast::<c_void>();
        let size = core::mem::size_of::<T>();
        let ctor: raw::Ctor = ctor_trampoline::<T, F>;
        let p = if or_get {
            // SAFETY: `ctor_trampoline::<T, F>` expects exactly `ctor_data` (a live `Option<F>` on
            // this stack frame) and `size_of::<T>()` bytes of 16-aligned data; the agent calls it at
            // most once, synchronously, before returning.
            unsafe { raw::relive_shadow_get_or_alloc(obj, self.id, size, 0, Some(ctor), ctor_data) }
        } else {
            // SAFETY: as above.
            unsafe { raw::relive_shadow_alloc(obj, self.id, size, 0, Some(ctor), ctor_data) }
        };
        // SAFETY: as in `get`: non-null means an initialised T (ours or an earlier one of this id).
        unsafe { p.cast::<T>().as_ref() }
    }

    /// SV5: detaches the variable of `obj` and drops its `T` (under the store lock). No-op if absent.
    ///
    /// # Safety
    /// No reference to this variable obtained from `get`/`*alloc*` may be used afterwards, on any
    /// thread (typically: call it once the patched code can no longer run, e.g. in `post_unpatch`).
    pub unsafe fn free(&self, obj: impl ShadowKey) {
        let dtor: raw::Dtor = drop_trampoline::<T>;
        // SAFETY: the dtor drops a T, which the data of this id holds (`new`'s contract); caller
        // contract for the references.
        unsafe { raw::relive_shadow_free(obj.shadow_key(), self.id, Some(dtor)) }
    }

    /// SV6: detaches and drops the variables of this id on every object.
    ///
    /// # Safety
    /// As for [`free`](Self::free), for every object.
    pub unsafe fn free_all(&self) {
        let dtor: raw::Dtor = drop_trampoline::<T>;
        // SAFETY: as in `free`.
        unsafe { raw::relive_shadow_free_all(self.id, Some(dtor)) }
    }
}

/// The ctor handed to the agent: takes the initialiser out of `ctor_data` and writes its `T` into
/// the zeroed shadow data. A panic in the initialiser aborts the process (it cannot unwind through
/// the agent's `extern "C"` frames).
#[allow(unsafe_code)]
unsafe extern "C" fn ctor_trampoline<T, F: FnOnce() -> Result<T, CtorError>>(
    _obj: *mut c_void,
    data: *mut c_void,
    ctor_data: *mut c_void,
) -> c_int {
    // SAFETY: `create` passes a pointer to its live `Option<F>` as ctor_data.
    let slot = unsafe { &mut *ctor_data.cast::<Option<F>>() };
    let Some(init) = slot.take() else {
        return -libc_einval();
    };
    match init() {
        Ok(value) => {
            // SAFETY: `data` is size_of::<T>() bytes, 16-aligned (≥ align_of::<T>(), checked in
            // `new`), exclusively ours until the agent publishes it after we return.
            unsafe { data.cast::<T>().write(value) };
            0
        }
        Err(code) => code.get(),
    }
}

/// The dtor handed to the agent: drops the `T` in place before the agent frees the memory.
#[allow(unsafe_code)]
unsafe extern "C" fn drop_trampoline<T>(_obj: *mut c_void, data: *mut c_void) {
    // SAFETY: the data of this id holds an initialised T (`Shadow::new` contract); it is unlinked
    // and the agent frees it right after, so it is dropped exactly once.
    unsafe { data.cast::<T>().drop_in_place() }
}

const fn libc_einval() -> c_int {
    22
}
