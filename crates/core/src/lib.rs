//! relive-core: the kernel livepatch model (SPEC.md §1–§9) as a pure state machine.
//!
//! The controller drives a [`Model`]: it describes patches ([`PatchSpec`]), threads ([`Tid`]) and their
//! unwound stacks ([`ThreadStack`]); the model answers with ordered [`Action`]s to perform in the target
//! (write a thread's state, install or retarget an entry, run a callback, drop a patch library, write the TLS
//! init image) and [`Event`]s that print as the kernel's log lines. It never performs anything itself.
//!
//! ```
//! use relive_core::{
//!     Action, Code, FuncSpec, Model, ObjectId, ObjectSpec, PatchSpec, PatchState, Range, SwitchOutcome,
//!     ThreadStack, Tid,
//! };
//!
//! let exe = ObjectId::from_build_id("1f2e3d").with_path("/usr/bin/service");
//! let old = Range::new(0x40_1000, 0x40_1080); // `handle_request` in the target
//! let new = Range::new(0x7f00_0000_1000, 0x7f00_0000_1100); // its replacement in fix.so
//! let mut model = Model::new();
//! model.add_thread(Tid(100)).unwrap();
//!
//! // L1/L2: enable. No object has a pre_patch callback, so `start` takes no results.
//! let spec = PatchSpec::new("fix")
//!     .object(ObjectSpec::new(exe.clone()).func(FuncSpec::new("handle_request", old, new)));
//! let init = model.enable(spec).unwrap();
//! let start = model.start(&[]).unwrap();
//! // The entry now leads to a dispatcher, and the thread is pending.
//! assert!(start.actions().any(|a| matches!(a, Action::SetEntry { .. })));
//! assert_eq!(model.pending(), vec![Tid(100)]);
//!
//! // C5: the thread is inside the original function: it cannot switch yet.
//! let busy = ThreadStack::reliable(vec![0x40_1010, 0x40_2000]);
//! assert!(matches!(model.try_switch(Tid(100), &busy).unwrap(), SwitchOutcome::Blocked { frame: 0, .. }));
//! assert!(model.try_complete().unwrap().log_lines().is_empty());
//!
//! // Later it is elsewhere: it switches, and the transition completes (L3).
//! let idle = ThreadStack::reliable(vec![0x40_3000, 0x40_2000]);
//! let SwitchOutcome::Switched(write) = model.try_switch(Tid(100), &idle).unwrap() else { panic!() };
//! assert_eq!(write, Action::WriteThreadState { tid: Tid(100), state: PatchState::Patched });
//! let done = model.try_complete().unwrap();
//! assert!(model.transition().is_none());
//!
//! let log: Vec<String> = [init, start, done].iter().flat_map(|o| o.log_lines()).collect();
//! assert_eq!(log, [
//!     "livepatch: enabling patch 'fix'",
//!     "livepatch: 'fix': initializing patching transition",
//!     "livepatch: 'fix': starting patching transition",
//!     "livepatch: 'fix': completing patching transition",
//!     "livepatch: 'fix': patching complete",
//! ]);
//! // H3/H4: every call now runs the new function.
//! let f = relive_core::FuncId::new(exe, "handle_request", 0);
//! assert_eq!(model.dispatch(&f, PatchState::Idle), Code::New { patch: "fix".into(), range: new });
//! ```
//!
//! # Driving the model
//!
//! Perform every [`Output`]'s steps in order; log its events.
//!
//! 1. [`Model::check_enable`] first (no change; ranges may still be unresolved), then [`Model::enable`]
//!    (L1, L2.1–3a). It requests the pre_patch callbacks. Run them in order, stop at the first failure,
//!    and pass the results to [`Model::start`]. A failure cancels (L7): [`Output::error`] is set.
//! 2. While [`Model::transition`] is `Some`, call [`Model::try_switch`] for each [`Model::pending`] thread,
//!    with its stack unwound while stopped. Write the returned state before resuming it. Then call
//!    [`Model::try_complete`], which completes (L3/L4/R4) once no thread is pending.
//! 3. [`Model::disable`] (L4, or L6 for the transition patch), [`Model::reverse`] (L6) and
//!    [`Model::force`] (C11) start or steer transitions the same way.
//! 4. Threads: [`Model::add_thread`] for a thread created from the current TLS init image;
//!    [`Model::adopt_thread`] with the slot value read from the thread when that is unsure;
//!    [`Model::remove_thread`] when a thread exits. Stubs: [`Model::register_stub`] (DESIGN §4.5).
//! 5. Libraries loaded or unloaded under active patches (CB6/CB7): [`Model::object_coming`], then
//!    [`Model::object_coming_done`] with the pre_patch results; [`Model::object_going`].
//!
//! Conflict policy (K5): by default a non-replace patch that replaces a function owned by another active
//! patch is refused ([`Error::Conflict`]); a patch with `stacking` gets the upstream K2 semantics; replace
//! patches are exempt and supersede everything at completion (R4).
//!
//! The whole model round-trips through serde (stable field names, [`FORMAT_VERSION`]), so that a stateless
//! controller can store it in the target's registry and rebuild it on the next command.
#![forbid(unsafe_code)]

mod error;
mod ids;
mod model;
mod output;
mod spec;

pub use error::{Error, StateProblem};
pub use ids::{FuncId, ObjectId, ObjectKey, PatchState, Range, Tid, normalise_sympos};
pub use model::{
    Coming, DEFAULT_MAX_DEPTH, Entry, FORMAT_VERSION, Func, FuncStack, MAX_FUNC_NAME, Model, Object, Patch,
    Phase, SIGNAL_EVERY, ThreadInfo, Transition,
};
pub use output::{
    Action, CallbackKind, Code, EntryTarget, Event, Output, PrevState, Step, SwitchOutcome, ThreadStack,
    Unreliable,
};
pub use spec::{CallbackSet, FuncSpec, ObjectSpec, PatchSpec, StateSpec};
