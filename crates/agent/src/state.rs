//! The system-state API for patch authors (SPEC §8, ST1–ST2; the kernel's `klp_get_state` and
//! `klp_get_prev_state`), exported with a C ABI (declared in `include/relive.h`, wrapped for Rust by
//! `relive_patch::state`).
//!
//! The agent does not decide anything here: the controller owns the model (relive-core) and tells
//! the agent, through the `SetStates` request (`relive_abi::proto`), the states of every installed
//! or transitioning patch and, during a transition, which earlier patch `relive_state_get_prev(id)`
//! answers with (relive-core's `Model::prev_states`). The driver sends it right before it runs the
//! callbacks of a transition and again after completion or reversal.
//!
//! # Records and their lifetime
//!
//! Each `(patch, id)` has one heap record `struct relive_state { id, version, data }`. `data` belongs
//! to the patches: a patch stores there what its successor should take over (ST4), so the record's
//! address stays the same across every `SetStates` that still lists the same `(patch, id)` at the
//! same version, and `relive_state_get_prev` hands the successor the very record (with its `data`)
//! its predecessor filled. A record that leaves the table is never freed: a patch may still hold
//! its address (24 bytes per state of a patch ever applied; the agent never reuses them).
//!
//! # Readers
//!
//! `relive_state_get` and `relive_state_get_prev` take no lock and allocate nothing: the table is
//! an immutable snapshot published with one release store, so they may be called from any thread,
//! from patched code (ST1) and from signal handlers. Replaced snapshots are kept (never freed) for
//! the same reason as records; a `SetStates` that changes nothing publishes nothing.

use core::ffi::{c_char, c_void};
use core::sync::atomic::{AtomicPtr, Ordering};
use std::ffi::{CStr, CString};
use std::sync::Mutex;

use relive_abi::proto::{PrevEntry, StateEntry};

/// `struct relive_state` of include/relive.h.
#[repr(C)]
#[derive(Debug)]
pub struct ReliveState {
    pub id: u64,
    pub version: u32,
    /// Owned by the patches (hand-over to a successor); the agent never reads or writes it after
    /// creating the record with null.
    pub data: *mut c_void,
}

#[derive(Debug)]
struct Rec {
    patch: CString,
    id: u64,
    version: u32,
    rec: *mut ReliveState,
}

#[derive(Debug, Default)]
struct Snapshot {
    recs: Vec<Rec>,
    /// ST2: id → the record `relive_state_get_prev(id)` answers with.
    prev: Vec<(u64, *mut ReliveState)>,
}

static CURRENT: AtomicPtr<Snapshot> = AtomicPtr::new(core::ptr::null_mut());

/// Writer side: the snapshots published so far (kept alive for lock-free readers) and every record
/// ever made. Used by the service thread only (under `ops::BUSY`); the mutex is never contended.
struct Writer {
    snapshots: Vec<*mut Snapshot>,
    records: Vec<(CString, u64, u32, *mut ReliveState)>,
}
// SAFETY: the raw pointers are heap objects owned by this module, never freed; moving the
// bookkeeping between threads is fine.
unsafe impl Send for Writer {}

static WRITER: Mutex<Writer> = Mutex::new(Writer {
    snapshots: vec![],
    records: vec![],
});

fn snapshot() -> Option<&'static Snapshot> {
    let p = CURRENT.load(Ordering::Acquire);
    // SAFETY: published snapshots are never freed or mutated after the release store.
    unsafe { p.as_ref() }
}

/// Installs the table the controller computed. Keeps the record of a `(patch, id, version)` that
/// was already there (its `data` survives); an unknown `prev` patch is an error naming it.
pub fn set_states(states: &[StateEntry], prev: &[PrevEntry]) -> Result<(), String> {
    let mut w = WRITER.lock().unwrap_or_else(|e| e.into_inner());
    let mut recs: Vec<Rec> = Vec::with_capacity(states.len());
    for e in states {
        let patch = CString::new(e.patch.as_str())
            .map_err(|_| format!("patch name {:?} contains a NUL byte", e.patch))?;
        if recs.iter().any(|r| r.patch == patch && r.id == e.id) {
            return Err(format!(
                "state id {} of patch {} is listed twice in SetStates; the controller's table is inconsistent",
                e.id, e.patch
            ));
        }
        // The current table first (the live record), then any record this (patch, id, version) had.
        let live = snapshot().and_then(|s| {
            s.recs
                .iter()
                .find(|r| r.patch == patch && r.id == e.id && r.version == e.version)
                .map(|r| r.rec)
        });
        let rec = match live {
            Some(r) => r,
            None => {
                let r = Box::into_raw(Box::new(ReliveState {
                    id: e.id,
                    version: e.version,
                    data: core::ptr::null_mut(),
                }));
                w.records.push((patch.clone(), e.id, e.version, r));
                r
            }
        };
        recs.push(Rec {
            patch,
            id: e.id,
            version: e.version,
            rec,
        });
    }
    let mut pv = Vec::with_capacity(prev.len());
    for p in prev {
        let Some(r) = recs
            .iter()
            .find(|r| r.id == p.id && r.patch.as_bytes() == p.patch.as_bytes())
        else {
            return Err(format!(
                "SetStates: the previous state id {} names patch {}, which carries no state {} in the table sent; \
                 the controller must list the predecessor's states too",
                p.id, p.patch, p.id
            ));
        };
        pv.push((p.id, r.rec));
    }
    if let Some(cur) = snapshot() {
        let same = cur.prev == pv
            && cur.recs.len() == recs.len()
            && cur
                .recs
                .iter()
                .zip(&recs)
                .all(|(a, b)| a.rec == b.rec && a.patch == b.patch);
        if same {
            return Ok(());
        }
    }
    let snap = Box::into_raw(Box::new(Snapshot { recs, prev: pv }));
    w.snapshots.push(snap);
    CURRENT.store(snap, Ordering::Release);
    Ok(())
}

/// ST1 `klp_get_state(patch, id)`: the state `id` of the installed or transitioning patch named
/// `patch`, or null. Lock-free and async-signal-safe.
///
/// # Safety
/// `patch` is null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn relive_state_get(patch: *const c_char, id: u64) -> *mut ReliveState {
    if patch.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: non-null and NUL-terminated (caller contract).
    let name = unsafe { CStr::from_ptr(patch) };
    snapshot()
        .and_then(|s| s.recs.iter().find(|r| r.id == id && r.patch.as_c_str() == name))
        .map_or(core::ptr::null_mut(), |r| r.rec)
}

/// ST2 `klp_get_prev_state(id)`: during a transition, the record of the latest patch listed before
/// the transition patch that declares `id` (with the `data` it left there); null otherwise (outside
/// a transition the table carries no previous states). Lock-free and async-signal-safe.
#[unsafe(no_mangle)]
pub extern "C" fn relive_state_get_prev(id: u64) -> *mut ReliveState {
    snapshot()
        .and_then(|s| s.prev.iter().find(|(i, _)| *i == id))
        .map_or(core::ptr::null_mut(), |(_, r)| *r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(patch: &str, id: u64, version: u32) -> StateEntry {
        StateEntry {
            patch: patch.into(),
            id,
            version,
        }
    }

    // One test: the table is process-wide.
    #[test]
    fn t_st1_st2_table_records_stable_and_prev() {
        let name = |s: &str| CString::new(s).unwrap();
        let get = |p: &str, id| {
            let n = name(p);
            // SAFETY: a NUL-terminated string.
            unsafe { relive_state_get(n.as_ptr(), id) }
        };
        assert!(get("a", 1).is_null());
        assert!(relive_state_get_prev(1).is_null());
        // SAFETY: null is allowed.
        assert!(unsafe { relive_state_get(core::ptr::null(), 1) }.is_null());

        set_states(&[st("a", 1, 1)], &[]).unwrap();
        let a1 = get("a", 1);
        assert!(!a1.is_null());
        // SAFETY: a live record.
        unsafe {
            assert_eq!(((*a1).id, (*a1).version), (1, 1));
            (*a1).data = 0x1234 as *mut c_void;
        }
        assert!(get("a", 2).is_null() && get("b", 1).is_null());

        // Transition to b (cumulative): b's record is new, get_prev answers with a's record.
        set_states(
            &[st("a", 1, 1), st("b", 1, 2)],
            &[PrevEntry {
                patch: "a".into(),
                id: 1,
            }],
        )
        .unwrap();
        assert_eq!(get("a", 1), a1, "record address stable across SetStates");
        let prev = relive_state_get_prev(1);
        assert_eq!(prev, a1);
        // SAFETY: a live record.
        assert_eq!(unsafe { (*prev).data } as usize, 0x1234);
        let b1 = get("b", 1);
        // SAFETY: a live record.
        assert_eq!(unsafe { ((*b1).version, (*b1).data) }, (2, core::ptr::null_mut()));

        // Completion: a leaves, no previous states; b keeps its record.
        set_states(&[st("b", 1, 2)], &[]).unwrap();
        assert!(get("a", 1).is_null());
        assert!(relive_state_get_prev(1).is_null());
        assert_eq!(get("b", 1), b1);

        // A prev naming a patch absent from the table is refused and changes nothing.
        let e = set_states(
            &[st("b", 1, 2)],
            &[PrevEntry {
                patch: "zz".into(),
                id: 1,
            }],
        )
        .unwrap_err();
        assert!(e.contains("patch zz"), "{e}");
        assert_eq!(get("b", 1), b1);
        assert!(set_states(&[st("b", 1, 2), st("b", 1, 2)], &[]).is_err());
    }
}
