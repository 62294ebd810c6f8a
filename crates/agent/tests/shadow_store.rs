//! Shadow-variable store (SPEC §7): T-sv1 of SPEC §10 and one test per rule SV1–SV6, against private
//! `ShadowStore`s (SV7 is about patches: see shadow_patch_api.rs and shadow_live.rs).

use core::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};

use relive_agent::shadow::{DATA_ALIGN, ShadowStore};

fn key(addr: usize) -> *const c_void {
    addr as *const c_void
}

/// ctor of T-sv1 (the kernel's `shadow_ctor`): copies the pointer in ctor_data into the data and
/// counts itself in the counter that the second word of ctor_data points to.
#[repr(C)]
struct CtorArg {
    value: usize,
    calls: *const AtomicU64,
}

unsafe extern "C" fn ctor_store(_obj: *mut c_void, data: *mut c_void, ctor_data: *mut c_void) -> c_int {
    // SAFETY: every caller passes a live CtorArg, and data of at least 8 bytes.
    unsafe {
        let arg = &*ctor_data.cast::<CtorArg>();
        (*arg.calls).fetch_add(1, SeqCst);
        data.cast::<usize>().write(arg.value);
    }
    0
}

static DTOR_CALLS: AtomicU64 = AtomicU64::new(0);
static DTOR_LAST: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn dtor_count(_obj: *mut c_void, data: *mut c_void) {
    DTOR_CALLS.fetch_add(1, SeqCst);
    // SAFETY: the store passes the live data of the variable being freed.
    DTOR_LAST.store(unsafe { data.cast::<usize>().read() }, SeqCst);
}

/// T-sv1 (`test-shadow-vars`), step by step as in the kernel's selftest.
#[test]
fn t_sv1_shadow_vars() {
    let s = ShadowStore::new(12);
    let objs = [key(0x1000), key(0x2000), key(0x3000)];
    let (id1, id2) = (0x1234u64, 0x1235u64);
    let calls = AtomicU64::new(0);

    // get on an empty table → NULL.
    for o in objs {
        assert!(s.get(o, id1).is_null() && s.get(o, id2).is_null());
    }

    // alloc (id1) and get_or_alloc (id2) with ctor for 3 objects × 2 ids → ctor runs once each.
    let mut ptrs = Vec::new();
    for (i, o) in objs.iter().enumerate() {
        for (j, id) in [id1, id2].into_iter().enumerate() {
            let mut arg = CtorArg {
                value: 100 + i * 10 + j,
                calls: &calls,
            };
            let argp = (&mut arg as *mut CtorArg).cast();
            // SAFETY: ctor_store gets a live CtorArg.
            let p = unsafe {
                if j == 0 {
                    s.alloc(*o, id, size_of::<usize>(), Some(ctor_store), argp)
                } else {
                    s.get_or_alloc(*o, id, size_of::<usize>(), Some(ctor_store), argp)
                }
            };
            assert!(!p.is_null(), "alloc <{o:p}, {id:#x}> failed");
            ptrs.push((*o, id, p, 100 + i * 10 + j));
        }
    }
    assert_eq!(calls.load(SeqCst), 6, "one ctor per key");

    // get returns the same pointers and contents.
    for &(o, id, p, v) in &ptrs {
        assert_eq!(s.get(o, id), p);
        // SAFETY: p is live (nothing freed yet) and holds the usize the ctor wrote.
        assert_eq!(unsafe { p.cast::<usize>().read() }, v);
    }

    // get_or_alloc on existing keys → same pointer, no ctor.
    for &(o, id, p, _) in &ptrs {
        let mut arg = CtorArg {
            value: 999,
            calls: &calls,
        };
        // SAFETY: as above.
        let q = unsafe {
            s.get_or_alloc(
                o,
                id,
                size_of::<usize>(),
                Some(ctor_store),
                (&mut arg as *mut CtorArg).cast(),
            )
        };
        assert_eq!(q, p);
    }
    assert_eq!(
        calls.load(SeqCst),
        6,
        "get_or_alloc on existing keys must not call ctor"
    );

    // free(id1) with dtor → dtor runs (with the data), then get → NULL.
    let before = DTOR_CALLS.load(SeqCst);
    for &(o, id, _, v) in ptrs.iter().filter(|e| e.1 == id1) {
        // SAFETY: dtor_count reads the usize the ctor wrote.
        unsafe { s.free(o, id, Some(dtor_count)) };
        assert_eq!(DTOR_LAST.load(SeqCst), v, "dtor saw the variable's data");
        assert!(s.get(o, id).is_null());
    }
    assert_eq!(DTOR_CALLS.load(SeqCst) - before, 3);

    // id2 still present; free_all(id2) without dtor → all gone.
    for &(o, id, p, _) in ptrs.iter().filter(|e| e.1 == id2) {
        assert_eq!(s.get(o, id), p);
    }
    assert_eq!(s.count(), 3);
    // SAFETY: no dtor.
    unsafe { s.free_all(id2, None) };
    for &(o, id, _, _) in &ptrs {
        assert!(s.get(o, id).is_null());
    }
    assert_eq!(s.count(), 0);
    assert_eq!(s.live(), 0);
}

/// SV1: obj is only a key (never dereferenced: these addresses are not mapped), several ids per
/// obj, and long collision chains (a 2-bucket store) keep every key distinct.
#[test]
fn sv1_key_is_obj_and_id_obj_never_dereferenced() {
    let s = ShadowStore::new(1);
    let objs = [0usize, 1, 8, 0xdead_0000, usize::MAX - 15, usize::MAX];
    let mut all = Vec::new();
    for &o in &objs {
        for id in 0..200u64 {
            // SAFETY: no ctor.
            let p = unsafe { s.alloc(key(o), id, 8, None, core::ptr::null_mut()) };
            assert!(!p.is_null());
            // SAFETY: 8 fresh bytes, 16-aligned.
            unsafe { p.cast::<u64>().write(o as u64 ^ id) };
            all.push((o, id, p));
        }
    }
    assert_eq!(s.count(), objs.len() * 200);
    for &(o, id, p) in &all {
        assert_eq!(s.get(key(o), id), p, "<{o:#x}, {id}>");
        // SAFETY: live variable.
        assert_eq!(unsafe { p.cast::<u64>().read() }, o as u64 ^ id);
    }
    assert!(s.get(key(0x1234), 0).is_null());
    assert!(s.get(key(0), 200).is_null());
    // Remove every other id of one obj: its other ids and the other objs stay.
    for id in (0..200u64).step_by(2) {
        // SAFETY: no dtor.
        unsafe { s.free(key(8), id, None) };
    }
    for &(o, id, p) in &all {
        let want = if o == 8 && id % 2 == 0 {
            core::ptr::null_mut()
        } else {
            p
        };
        assert_eq!(s.get(key(o), id), want, "<{o:#x}, {id}>");
    }
}

/// SV2: get is lock-free and consistent while writers churn the same buckets: a reader always
/// finds a stable key with its own pointer and never finds a key that is never allocated.
#[test]
fn sv2_get_during_concurrent_alloc_free_on_same_buckets() {
    let s = Arc::new(ShadowStore::new(2)); // 4 buckets: every chain is shared and recycled
    let stable: Vec<(usize, *mut c_void)> = (0..32usize)
        .map(|i| {
            let o = 0x10_0000 + i * 64;
            // SAFETY: no ctor.
            (o, unsafe { s.alloc(key(o), 7, 16, None, core::ptr::null_mut()) })
        })
        .collect();
    let stable: Arc<Vec<(usize, usize)>> =
        Arc::new(stable.into_iter().map(|(o, p)| (o, p as usize)).collect());
    let stop = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for t in 0..2usize {
        let (s, stop) = (s.clone(), stop.clone());
        writers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while stop.load(SeqCst) == 0 {
                for i in 0..64usize {
                    let o = 0x20_0000 + (t * 64 + i) * 64;
                    // SAFETY: no ctor / dtor.
                    unsafe {
                        s.alloc(key(o), 7, 16, None, core::ptr::null_mut());
                        s.free(key(o), 7, None);
                    }
                    n += 1;
                }
            }
            n
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (s, stop, stable) = (s.clone(), stop.clone(), stable.clone());
        readers.push(std::thread::spawn(move || {
            let mut gets = 0u64;
            for round in 0..20_000u64 {
                for &(o, p) in stable.iter() {
                    assert_eq!(s.get(key(o), 7) as usize, p, "stable key lost in round {round}");
                    assert!(s.get(key(o), 8).is_null(), "a never-allocated key was found");
                    gets += 2;
                }
            }
            stop.fetch_add(1, SeqCst);
            gets
        }));
    }
    let gets: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    let churn: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(gets > 0 && churn > 0);
    assert_eq!(s.count(), 32);
}

/// SV3.1: a duplicate alloc returns NULL with a diagnostic; the ctor is not called and the
/// existing variable is untouched.
#[test]
fn sv3_duplicate_alloc_returns_null_and_leaves_existing_untouched() {
    let s = ShadowStore::new(8);
    let calls = AtomicU64::new(0);
    let mut arg = CtorArg {
        value: 41,
        calls: &calls,
    };
    // SAFETY: ctor_store gets a live CtorArg.
    let p = unsafe {
        s.alloc(
            key(0x5000),
            3,
            8,
            Some(ctor_store),
            (&mut arg as *mut CtorArg).cast(),
        )
    };
    assert!(!p.is_null());
    let diags = s.diagnostics().raised;
    let mut arg2 = CtorArg {
        value: 42,
        calls: &calls,
    };
    // SAFETY: as above.
    let q = unsafe {
        s.alloc(
            key(0x5000),
            3,
            8,
            Some(ctor_store),
            (&mut arg2 as *mut CtorArg).cast(),
        )
    };
    assert!(q.is_null(), "duplicate alloc must return NULL");
    assert_eq!(calls.load(SeqCst), 1, "ctor must not run for a duplicate");
    assert_eq!(
        s.diagnostics().raised,
        diags + 1,
        "a duplicate raises one diagnostic"
    );
    assert_eq!(s.get(key(0x5000), 3), p);
    // SAFETY: live variable.
    assert_eq!(unsafe { p.cast::<usize>().read() }, 41);
    assert_eq!(s.count(), 1);
}

unsafe extern "C" fn ctor_check_zero_aligned(
    _obj: *mut c_void,
    data: *mut c_void,
    ctor_data: *mut c_void,
) -> c_int {
    // SAFETY: ctor_data points to the requested size (a usize), data to that many bytes.
    let size = unsafe { *ctor_data.cast::<usize>() };
    assert_eq!(data as usize % DATA_ALIGN, 0, "data not {DATA_ALIGN}-aligned");
    // SAFETY: `size` bytes of data.
    let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size) };
    if bytes.iter().any(|&b| b != 0) {
        return -5;
    }
    0
}

/// SV3.2: data is zero-filled before the ctor runs and aligned to 16 bytes, for any size
/// (including memory recycled from freed variables that were dirtied).
#[test]
fn sv3_data_is_zeroed_before_ctor_and_16_aligned() {
    let s = ShadowStore::new(8);
    for round in 0..3 {
        for (i, size) in [0usize, 1, 7, 16, 24, 100, 4096, 65536].into_iter().enumerate() {
            let mut sz = size;
            // SAFETY: ctor_check_zero_aligned reads the usize behind ctor_data.
            let p = unsafe {
                s.alloc(
                    key(0x9000 + i * 16),
                    1,
                    size,
                    Some(ctor_check_zero_aligned),
                    (&mut sz as *mut usize).cast(),
                )
            };
            assert!(
                !p.is_null(),
                "round {round}: size {size} not zeroed/aligned or not allocated"
            );
            // Dirty it before freeing, so a recycled block would show garbage next round.
            // SAFETY: `size` bytes of live data.
            unsafe { core::ptr::write_bytes(p.cast::<u8>(), 0xa5, size) };
        }
        // SAFETY: no dtor.
        unsafe { s.free_all(1, None) };
    }
    assert_eq!(s.count(), 0);
}

unsafe extern "C" fn ctor_fail(_obj: *mut c_void, data: *mut c_void, _ctor_data: *mut c_void) -> c_int {
    // SAFETY: 8 bytes of data.
    unsafe { data.cast::<u64>().write(0xbad) };
    -12
}

/// SV3.4: a failing ctor returns NULL, logs a diagnostic and leaves nothing behind; a later alloc
/// of the same key works.
#[test]
fn sv3_failing_ctor_returns_null_and_leaves_nothing() {
    let s = ShadowStore::new(8);
    let d0 = s.diagnostics().raised;
    for f in [ShadowStore::alloc, ShadowStore::get_or_alloc] {
        // SAFETY: ctor_fail needs 8 bytes.
        let p = unsafe { f(&s, key(0x7000), 9, 8, Some(ctor_fail), core::ptr::null_mut()) };
        assert!(p.is_null());
        assert!(s.get(key(0x7000), 9).is_null());
        assert_eq!(s.count(), 0);
    }
    assert_eq!(
        s.diagnostics().raised,
        d0 + 2,
        "'Failed to construct shadow variable' raised twice"
    );
    // SAFETY: no ctor.
    assert!(!unsafe { s.alloc(key(0x7000), 9, 8, None, core::ptr::null_mut()) }.is_null());
}

struct ReentryProbe {
    store: *const ShadowStore,
    other: *mut c_void,
    alloc_inside: *mut c_void,
    get_inside: *mut c_void,
}

unsafe extern "C" fn ctor_reenter(_obj: *mut c_void, _data: *mut c_void, ctor_data: *mut c_void) -> c_int {
    // SAFETY: ctor_data is a live ReentryProbe whose store outlives the call.
    unsafe {
        let probe = &mut *ctor_data.cast::<ReentryProbe>();
        let s = &*probe.store;
        probe.get_inside = s.get(key(0xa000), 1);
        probe.alloc_inside = s.alloc(key(0xb000), 1, 8, None, core::ptr::null_mut());
        s.free(key(0xa000), 1, None); // refused: would deadlock on the store lock
        probe.other = s.get(key(0xa000), 1);
    }
    0
}

/// SV3/SV5: the ctor runs under the store's lock. Inside it, get works (lock-free) while a writer
/// on the same thread is refused with a diagnostic instead of deadlocking.
#[test]
fn sv3_ctor_runs_under_store_lock_writers_refused_get_allowed() {
    let s = ShadowStore::new(8);
    // SAFETY: no ctor.
    let existing = unsafe { s.alloc(key(0xa000), 1, 8, None, core::ptr::null_mut()) };
    let mut probe = ReentryProbe {
        store: &s,
        other: core::ptr::null_mut(),
        alloc_inside: core::ptr::dangling_mut(),
        get_inside: core::ptr::null_mut(),
    };
    let d0 = s.diagnostics().raised;
    // SAFETY: ctor_reenter gets a live probe.
    let p = unsafe {
        s.alloc(
            key(0xc000),
            1,
            8,
            Some(ctor_reenter),
            (&mut probe as *mut ReentryProbe).cast(),
        )
    };
    assert!(!p.is_null());
    assert_eq!(probe.get_inside, existing, "get inside a ctor must work");
    assert!(
        probe.alloc_inside.is_null(),
        "alloc inside a ctor must be refused"
    );
    assert_eq!(probe.other, existing, "free inside a ctor must be refused");
    assert_eq!(s.diagnostics().raised, d0 + 2);
    assert!(s.get(key(0xb000), 1).is_null());
    assert_eq!(s.count(), 2);
}

/// SV4: get_or_alloc on an existing key returns it without ctor; racing get_or_alloc calls on a
/// fresh key run the ctor exactly once and all get the same pointer.
#[test]
fn sv4_get_or_alloc_ctor_at_most_once_under_race() {
    let s = Arc::new(ShadowStore::new(8));
    for round in 0..50usize {
        let calls = Arc::new(AtomicU64::new(0));
        let barrier = Arc::new(Barrier::new(16));
        let o = 0x40_0000 + round * 16;
        let hs: Vec<_> = (0..16)
            .map(|t| {
                let (s, calls, barrier) = (s.clone(), calls.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut arg = CtorArg {
                        value: t,
                        calls: &*calls,
                    };
                    barrier.wait();
                    // SAFETY: ctor_store gets a live CtorArg.
                    unsafe {
                        s.get_or_alloc(key(o), 5, 8, Some(ctor_store), (&mut arg as *mut CtorArg).cast())
                            as usize
                    }
                })
            })
            .collect();
        let ptrs: Vec<usize> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            calls.load(SeqCst),
            1,
            "round {round}: ctor ran {} times",
            calls.load(SeqCst)
        );
        assert!(
            ptrs.iter().all(|&p| p == ptrs[0] && p != 0),
            "round {round}: {ptrs:x?}"
        );
    }
    assert_eq!(s.count(), 50);
    assert_eq!(s.diagnostics().raised, 0, "get_or_alloc never warns");
}

/// SV5: free runs the dtor once with the data, under the lock; an absent key is a silent no-op.
#[test]
fn sv5_free_runs_dtor_absent_key_is_silent_noop() {
    let s = ShadowStore::new(8);
    let calls = AtomicU64::new(0);
    let mut arg = CtorArg {
        value: 77,
        calls: &calls,
    };
    // SAFETY: ctor_store gets a live CtorArg.
    unsafe {
        s.alloc(
            key(0xe000),
            2,
            8,
            Some(ctor_store),
            (&mut arg as *mut CtorArg).cast(),
        )
    };
    let d0 = s.diagnostics().raised;
    let before = DTOR_CALLS.load(SeqCst);
    // SAFETY: dtor_count reads the usize.
    unsafe {
        s.free(key(0xe000), 3, Some(dtor_count)); // other id: absent
        s.free(key(0xe001), 2, Some(dtor_count)); // other obj: absent
    }
    assert_eq!(DTOR_CALLS.load(SeqCst), before, "no dtor for absent keys");
    assert_eq!(s.diagnostics().raised, d0, "absent keys are silent");
    assert_eq!(s.count(), 1);
    // SAFETY: as above.
    unsafe { s.free(key(0xe000), 2, Some(dtor_count)) };
    assert!(DTOR_CALLS.load(SeqCst) > before);
    assert!(s.get(key(0xe000), 2).is_null());
    // SAFETY: absent now.
    unsafe { s.free(key(0xe000), 2, Some(dtor_count)) };
    assert_eq!(s.count(), 0);
}

static SV6_DTOR: AtomicU64 = AtomicU64::new(0);
unsafe extern "C" fn dtor_sv6(obj: *mut c_void, data: *mut c_void) {
    // SAFETY: live data holding the obj address written at alloc.
    let stored = unsafe { data.cast::<usize>().read() };
    assert_eq!(stored, obj as usize, "dtor got another variable's data");
    SV6_DTOR.fetch_add(1, SeqCst);
}

/// SV6: free_all(id, dtor) frees every <*, id> (dtor once each, with its own obj and data) and
/// nothing of other ids.
#[test]
fn sv6_free_all_frees_every_obj_of_that_id_only() {
    let s = ShadowStore::new(6);
    for i in 0..500usize {
        for id in [1u64, 2] {
            // SAFETY: no ctor; 8 bytes written right after.
            let p = unsafe { s.alloc(key(0x100 + i * 32), id, 8, None, core::ptr::null_mut()) };
            // SAFETY: 8 live bytes.
            unsafe { p.cast::<usize>().write(0x100 + i * 32) };
        }
    }
    // SAFETY: dtor_sv6 reads the usize.
    unsafe { s.free_all(1, Some(dtor_sv6)) };
    assert_eq!(SV6_DTOR.load(SeqCst), 500);
    assert_eq!(s.count(), 500);
    for i in 0..500usize {
        assert!(s.get(key(0x100 + i * 32), 1).is_null());
        assert!(!s.get(key(0x100 + i * 32), 2).is_null());
    }
    // SAFETY: no dtor.
    unsafe { s.free_all(3, None) }; // no such id: nothing happens
    assert_eq!(s.count(), 500);
}

// ---- get inside a signal handler (SV2 "safe ... where the kernel's rules allow it") ----

static SIG_STORE: AtomicPtr<ShadowStore> = AtomicPtr::new(core::ptr::null_mut());
static SIG_EXPECT: AtomicUsize = AtomicUsize::new(0);
static SIG_HITS: AtomicU64 = AtomicU64::new(0);
static SIG_BAD: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigusr1(_sig: c_int) {
    let s = SIG_STORE.load(SeqCst);
    if s.is_null() {
        return;
    }
    // SAFETY: the store is leaked for the whole test; get is async-signal-safe.
    let p = unsafe { &*s }.get(key(0xf000), 1);
    if p as usize == SIG_EXPECT.load(SeqCst) {
        SIG_HITS.fetch_add(1, SeqCst);
    } else {
        SIG_BAD.fetch_add(1, SeqCst);
    }
}

/// SV2: get is async-signal-safe: a handler that interrupts this thread's own writers (alloc/free
/// churning the same bucket, possibly inside the store lock) still gets the right answer and never
/// deadlocks.
#[test]
fn sv2_get_in_signal_handler_interrupting_own_writer() {
    let s: &'static ShadowStore = Box::leak(Box::new(ShadowStore::new(1)));
    // SAFETY: no ctor.
    let p = unsafe { s.alloc(key(0xf000), 1, 8, None, core::ptr::null_mut()) };
    SIG_EXPECT.store(p as usize, SeqCst);
    SIG_STORE.store(s as *const ShadowStore as *mut ShadowStore, SeqCst);
    // SAFETY: installs a handler that only uses atomics and the lock-free get; sa_mask zeroed.
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, core::ptr::null_mut()), 0);
    }
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    let stop = Arc::new(AtomicU64::new(0));
    let killer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while stop.load(SeqCst) == 0 {
                // SAFETY: `me` is the test thread, alive until `stop` is set and we are joined.
                unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
                sent += 1;
                std::thread::yield_now();
            }
            sent
        })
    };
    // This thread churns the same (2-bucket) table, so signals land inside writers.
    let mut i = 0usize;
    while SIG_HITS.load(SeqCst) < 500 && i < 50_000_000 {
        let o = 0x1_0000 + (i % 128) * 16;
        // SAFETY: no ctor / dtor.
        unsafe {
            s.alloc(key(o), 1, 8, None, core::ptr::null_mut());
            s.free(key(o), 1, None);
        }
        i += 1;
    }
    stop.store(1, SeqCst);
    let sent = killer.join().unwrap();
    // SAFETY: restore the default disposition before leaving the test.
    unsafe { libc::signal(libc::SIGUSR1, libc::SIG_DFL) };
    assert_eq!(
        SIG_BAD.load(SeqCst),
        0,
        "get in a signal handler returned a wrong pointer"
    );
    assert!(
        SIG_HITS.load(SeqCst) >= 500,
        "only {} handled of {sent} sent",
        SIG_HITS.load(SeqCst)
    );
    assert_eq!(s.count(), 1);
}
