//! System states for Rust patches (SPEC §8, ST1–ST4): the kernel's `klp_get_state` and
//! `klp_get_prev_state`, answered by the agent from the table relive sends it.
//!
//! ```text
//! use relive_patch::state::State;
//!
//! const STATE_CONNS: u64 = 1;
//!
//! extern "C" fn pre_patch() -> i32 {
//!     let me = State::get(c"fix-v2", STATE_CONNS).expect("declared with version 2");
//!     match State::get_prev(STATE_CONNS) {
//!         Some(prev) => me.set_data(prev.data()),  // take over (ST4)
//!         None => me.set_data(allocate()),          // fresh
//!     }
//!     0
//! }
//! ```
//!
//! The records live in the agent (`librelive_agent.so`) and are never freed, so a [`State`] is
//! `'static`. `data` is an opaque pointer the patches hand each other; reading and writing it is
//! safe (an atomic load/store), dereferencing it is the patches' business: every patch that uses a
//! state id must agree on what `data` points to (as for shadow ids, SV7).

use core::ffi::{CStr, c_void};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, Ordering};

/// The raw C ABI exported by the agent (declared for C in `include/relive.h`).
#[allow(unsafe_code)]
pub mod raw {
    use core::ffi::{c_char, c_void};

    /// `struct relive_state` of include/relive.h.
    #[repr(C)]
    #[derive(Debug)]
    pub struct relive_state {
        pub id: u64,
        pub version: u32,
        pub data: *mut c_void,
    }

    // SAFETY: these declarations match the agent's exports in crates/agent/src/state.rs (same
    // names, argument and return types, C ABI).
    unsafe extern "C" {
        /// ST1: the state `id` of patch `patch` (NUL-terminated), or null.
        pub fn relive_state_get(patch: *const c_char, id: u64) -> *mut relive_state;
        /// ST2: during a transition, the predecessor's record of `id`; null otherwise.
        pub safe fn relive_state_get_prev(id: u64) -> *mut relive_state;
    }
}

/// A state record (`struct relive_state`) of an installed or transitioning patch.
#[derive(Clone, Copy)]
pub struct State {
    rec: NonNull<raw::relive_state>,
}

impl core::fmt::Debug for State {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "State {{ id: {}, version: {}, data: {:p} }}",
            self.id(),
            self.version(),
            self.data()
        )
    }
}

// SAFETY: the record is immutable except `data`, which is only accessed atomically.
#[allow(unsafe_code)]
unsafe impl Send for State {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for State {}

// The FFI boundary: each unsafe block says why the agent's record may be read.
#[allow(unsafe_code)]
impl State {
    /// ST1: the state `id` of the patch named `patch`, if that patch is installed or in
    /// transition and declares it. Lock-free; may be called from patched code.
    pub fn get(patch: &CStr, id: u64) -> Option<State> {
        // SAFETY: `patch` is NUL-terminated; the agent only reads it.
        let p = unsafe { raw::relive_state_get(patch.as_ptr(), id) };
        NonNull::new(p).map(|rec| State { rec })
    }

    /// ST2: during a transition (in callbacks), the record of the latest earlier patch that
    /// declares `id` (the patch being replaced, with the data it left); `None` otherwise.
    pub fn get_prev(id: u64) -> Option<State> {
        NonNull::new(raw::relive_state_get_prev(id)).map(|rec| State { rec })
    }

    /// The state id.
    pub fn id(&self) -> u64 {
        // SAFETY: the agent never frees a record and never changes `id` after creating it.
        unsafe { (*self.rec.as_ptr()).id }
    }

    /// The version the patch declared.
    pub fn version(&self) -> u32 {
        // SAFETY: as for `id`.
        unsafe { (*self.rec.as_ptr()).version }
    }

    fn data_cell(&self) -> &AtomicPtr<c_void> {
        // SAFETY: `data` is a properly aligned `*mut c_void` inside a record that lives forever;
        // AtomicPtr has the same layout, and every Rust access goes through this atomic view.
        unsafe { AtomicPtr::from_ptr(core::ptr::addr_of_mut!((*self.rec.as_ptr()).data)) }
    }

    /// The hand-over pointer (null until a patch sets it).
    pub fn data(&self) -> *mut c_void {
        self.data_cell().load(Ordering::Acquire)
    }

    /// Sets the hand-over pointer a successor will find through [`State::get_prev`].
    pub fn set_data(&self, data: *mut c_void) {
        self.data_cell().store(data, Ordering::Release);
    }
}
