//! relive-patch's typed shadow API (`Shadow<T>`) against the agent's exported C ABI, linked the way a
//! patch is: relive-patch declares `relive_shadow_*` as undefined symbols and this test binary gets
//! them from the agent (here statically, from the rlib; in a target, from the preloaded
//! librelive_agent.so). SV7: two `Shadow` statics with one id stand for an old patch and the
//! cumulative patch that replaces it.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};

use core::ffi::c_void;

use relive_agent::shadow::{Ctor, Dtor, ffi};
use relive_patch::shadow::{self, CtorError, Shadow};

/// Pulls the agent's exports into this binary (nothing else here names relive_agent, so the
/// linker would otherwise leave its rlib out and relive-patch's undefined symbols unresolved).
type GetFn = extern "C" fn(*const c_void, u64) -> *mut c_void;
type AllocFn = unsafe extern "C" fn(*const c_void, u64, usize, u32, Option<Ctor>, *mut c_void) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*const c_void, u64, Option<Dtor>);
type FreeAllFn = unsafe extern "C" fn(u64, Option<Dtor>);
#[allow(dead_code)] // never read: it only makes the linker keep the exports
struct Exports(
    GetFn,
    AllocFn,
    AllocFn,
    FreeFn,
    FreeAllFn,
    extern "C" fn() -> usize,
);
#[used]
static AGENT_EXPORTS: Exports = Exports(
    ffi::relive_shadow_get,
    ffi::relive_shadow_alloc,
    ffi::relive_shadow_get_or_alloc,
    ffi::relive_shadow_free,
    ffi::relive_shadow_free_all,
    ffi::relive_shadow_count,
);

/// What a patch adds to a C target's connection struct: a counter and a flag.
#[derive(Debug, Default)]
struct ConnExtra {
    requests: AtomicU64,
    flagged: AtomicU64,
}

static DROPS: AtomicU64 = AtomicU64::new(0);

/// A type with a destructor, to see that free/free_all run `Drop` as the dtor.
#[derive(Debug)]
struct Tracked(u64);
impl Drop for Tracked {
    fn drop(&mut self) {
        DROPS.fetch_add(self.0, SeqCst);
    }
}

/// A C connection object (the patch never owns it; only its address is a key).
#[repr(C)]
struct Conn {
    fd: i32,
    state: i32,
}

const ID_CONN_EXTRA: u64 = 0x636f_6e6e_0001;

mod patch_v1 {
    use super::*;
    // SAFETY: id ID_CONN_EXTRA holds a ConnExtra in every patch of this test.
    pub static EXTRA: Shadow<ConnExtra> = unsafe { Shadow::new(ID_CONN_EXTRA) };

    pub fn handle_request(c: &Conn) -> u64 {
        let e = EXTRA.get_or_default(c).expect("shadow allocation");
        e.requests.fetch_add(1, SeqCst) + 1
    }
}

mod patch_v2_cumulative {
    use super::*;
    // SAFETY: as in patch_v1: same id, same type.
    pub static EXTRA: Shadow<ConnExtra> = unsafe { Shadow::new(ID_CONN_EXTRA) };

    pub fn handle_request(c: &Conn) -> u64 {
        let e = EXTRA.get_or_default(c).expect("shadow allocation");
        if e.requests.load(SeqCst) >= 3 {
            e.flagged.store(1, SeqCst);
        }
        e.requests.fetch_add(1, SeqCst) + 1
    }

    /// post_unpatch of the last patch: nothing runs the patched code any more.
    pub fn post_unpatch() {
        // SAFETY: the transition has completed; no reference to the data is in use.
        unsafe { EXTRA.free_all() };
    }
}

/// SV7 through the typed API: the cumulative patch keeps counting on the counters the first patch
/// attached; "disabling" v1 frees nothing; v2's post_unpatch frees them all and nothing leaks.
/// (The leak check counts the process-wide store: nextest runs each test in its own process.)
#[test]
fn sv7_cumulative_patch_inherits_shadow_vars_by_id() {
    let conns: Vec<Conn> = (0..64).map(|i| Conn { fd: i, state: 0 }).collect();
    let before = shadow::count();
    for c in &conns {
        for _ in 0..2 {
            patch_v1::handle_request(c);
        }
    }
    assert_eq!(shadow::count(), before + conns.len());
    // v1 is replaced by v2: no call at all (SV7: nothing is freed implicitly).
    for c in &conns {
        assert_eq!(
            patch_v2_cumulative::handle_request(c),
            3,
            "conn fd {} lost its counter",
            c.fd
        );
        assert_eq!(patch_v2_cumulative::handle_request(c), 4);
        let e = patch_v2_cumulative::EXTRA.get(c).unwrap();
        assert_eq!(e.flagged.load(SeqCst), 1);
        assert_eq!(c.state, 0, "the object itself is never touched");
        // Both patches see the same variable.
        assert!(core::ptr::eq(e, patch_v1::EXTRA.get(c).unwrap()));
    }
    patch_v2_cumulative::post_unpatch();
    assert_eq!(shadow::count(), before);
    assert!(conns.iter().all(|c| patch_v1::EXTRA.get(c).is_none()));
}

/// SV3/SV4/SV5 through the typed API: alloc_with refuses a duplicate without running init,
/// get_or_alloc_with runs init once, a failing init leaves nothing, free runs Drop.
#[test]
fn sv3_sv4_sv5_typed_alloc_get_or_alloc_free() {
    // SAFETY: id 0x7e57_0002 is used only here, for Tracked.
    static T: Shadow<Tracked> = unsafe { Shadow::new(0x7e57_0002) };
    let obj = Conn { fd: 7, state: 1 };
    assert!(T.get(&obj).is_none());
    let a = T.alloc_with(&obj, || Tracked(100)).expect("first alloc");
    assert_eq!(a.0, 100);
    let mut ran = false;
    assert!(
        T.alloc_with(&obj, || {
            ran = true;
            Tracked(1)
        })
        .is_none()
    );
    assert!(!ran, "SV3: init must not run for a duplicate");
    let b = T.get_or_alloc_with(&obj, || {
        ran = true;
        Tracked(2)
    });
    assert!(!ran, "SV4: init must not run for an existing key");
    assert!(core::ptr::eq(a, b.unwrap()));
    // Every key form names the same object (SV1: the address is the key).
    let p = &obj as *const Conn;
    assert!(core::ptr::eq(a, T.get(p).unwrap()));
    assert!(core::ptr::eq(a, T.get(p.cast_mut()).unwrap()));
    assert!(core::ptr::eq(a, T.get(p as usize).unwrap()));
    assert!(core::ptr::eq(a, T.get(core::ptr::NonNull::from(&obj)).unwrap()));

    let other = Conn { fd: 8, state: 1 };
    let failed = T.try_get_or_alloc_with(&other, || Err(CtorError::new(-12).unwrap()));
    assert!(
        failed.is_none() && T.get(&other).is_none(),
        "a failing init leaves nothing behind"
    );

    let drops = DROPS.load(SeqCst);
    // SAFETY: `a` and `b` are not used after this.
    unsafe { T.free(&obj) };
    assert_eq!(DROPS.load(SeqCst) - drops, 100, "free drops the T exactly once");
    assert!(T.get(&obj).is_none());
    // SAFETY: absent key: no-op.
    unsafe { T.free(&obj) };
    assert_eq!(DROPS.load(SeqCst) - drops, 100);
}

/// SV4 under a race: 16 threads call get_or_alloc_with on the same objects; each init runs once.
#[test]
fn sv4_typed_get_or_alloc_init_once_across_threads() {
    // SAFETY: id 0x7e57_0003 is used only here, for AtomicU64.
    static C: Shadow<AtomicU64> = unsafe { Shadow::new(0x7e57_0003) };
    static INITS: AtomicU64 = AtomicU64::new(0);
    let objs: Arc<Vec<Box<u64>>> = Arc::new((0..32).map(Box::new).collect());
    let barrier = Arc::new(Barrier::new(16));
    let hs: Vec<_> = (0..16)
        .map(|_| {
            let (objs, barrier) = (objs.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..100 {
                    for o in objs.iter() {
                        let c = C
                            .get_or_alloc_with(&**o, || {
                                INITS.fetch_add(1, SeqCst);
                                AtomicU64::new(0)
                            })
                            .unwrap();
                        c.fetch_add(1, SeqCst);
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(INITS.load(SeqCst), 32, "one init per object");
    for o in objs.iter() {
        assert_eq!(C.get(&**o).unwrap().load(SeqCst), 1600);
    }
    // SAFETY: all threads joined.
    unsafe { C.free_all() };
    assert!(objs.iter().all(|o| C.get(&**o).is_none()));
}

/// Over-aligned types get their alignment (the agent aligns data to 16 bytes).
#[test]
fn typed_data_is_aligned_for_align16_types() {
    #[repr(align(16))]
    #[derive(Debug, Default)]
    struct Wide(#[allow(dead_code)] [u64; 2]);
    // SAFETY: id 0x7e57_0004 is used only here, for Wide.
    static W: Shadow<Wide> = unsafe { Shadow::new(0x7e57_0004) };
    let objs: Vec<Box<u8>> = (0..50).map(Box::new).collect();
    for o in &objs {
        let w = W.get_or_default(&**o).unwrap();
        assert_eq!(w as *const Wide as usize % 16, 0);
    }
    // SAFETY: no reference is kept.
    unsafe { W.free_all() };
}
