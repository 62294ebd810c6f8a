//! Concurrency of the shadow store (issue 6): 16 threads alloc, get_or_alloc, get, free and
//! free_all overlapping keys for `RELIVE_SHADOW_STRESS_SECS` seconds (default 10). Afterwards no
//! entry leaks (counted by walking the table), no ctor ever ran twice for one key without a dtor
//! in between (SV4), and no dtor was missed (SV5/SV6: ctor runs == dtor runs for every key).
//!
//! Every ctor/dtor runs under the store lock, so the per-key bookkeeping below is serialised by
//! the store itself; the test only checks it with atomics. Readers never dereference data of
//! shared keys (a concurrent free may release it: SV2 leaves that to the caller); they check each
//! `get` against the key's version instead. Data is dereferenced only on each thread's private keys.

use core::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use relive_agent::shadow::{DATA_ALIGN, ShadowStore};

const THREADS: usize = 16;
const OBJS: usize = 48;
const IDS: [u64; 3] = [0x51, 0x52, 0x53];
const KEYS: usize = OBJS * IDS.len();
const DATA_SIZE: usize = 40;

/// Per-key bookkeeping, written only by ctors and dtors (under the store lock).
struct Book {
    ctor_runs: [AtomicU64; KEYS],
    dtor_runs: [AtomicU64; KEYS],
    live: [AtomicBool; KEYS],
    /// Data pointer of the live incarnation (set before `ver` becomes odd, cleared after it
    /// becomes even).
    cur: [AtomicUsize; KEYS],
    /// Odd while the key has a constructed variable, even otherwise.
    ver: [AtomicU64; KEYS],
    violations: AtomicU64,
    failed_ctors: AtomicU64,
}

static BOOK: Book = Book {
    ctor_runs: [const { AtomicU64::new(0) }; KEYS],
    dtor_runs: [const { AtomicU64::new(0) }; KEYS],
    live: [const { AtomicBool::new(false) }; KEYS],
    cur: [const { AtomicUsize::new(0) }; KEYS],
    ver: [const { AtomicU64::new(0) }; KEYS],
    violations: AtomicU64::new(0),
    failed_ctors: AtomicU64::new(0),
};

fn obj_addr(o: usize) -> usize {
    0x7f00_0000_0000 + o * 0x40
}

fn key_index(obj: usize, id: u64) -> usize {
    let o = (obj - 0x7f00_0000_0000) / 0x40;
    let i = IDS.iter().position(|&x| x == id).expect("shared id");
    o * IDS.len() + i
}

fn violation(what: &str) {
    eprintln!("violation: {what}");
    BOOK.violations.fetch_add(1, SeqCst);
}

#[repr(C)]
struct CtorArg {
    key: usize,
    fail: bool,
}

unsafe extern "C" fn ctor(_obj: *mut c_void, data: *mut c_void, ctor_data: *mut c_void) -> c_int {
    // SAFETY: callers pass a live CtorArg; data has DATA_SIZE bytes.
    let (arg, bytes) = unsafe {
        (
            &*ctor_data.cast::<CtorArg>(),
            std::slice::from_raw_parts_mut(data.cast::<u8>(), DATA_SIZE),
        )
    };
    if !(data as usize).is_multiple_of(DATA_ALIGN) || bytes.iter().any(|&b| b != 0) {
        violation("data not zeroed or not aligned before ctor");
    }
    if arg.fail {
        bytes.fill(0xee);
        BOOK.failed_ctors.fetch_add(1, SeqCst);
        return -12;
    }
    let k = arg.key;
    if BOOK.live[k].swap(true, SeqCst) {
        violation("ctor ran twice for one key without a dtor in between");
    }
    bytes[..8].copy_from_slice(&(k as u64).to_le_bytes());
    BOOK.ctor_runs[k].fetch_add(1, SeqCst);
    BOOK.cur[k].store(data as usize, SeqCst);
    BOOK.ver[k].fetch_add(1, SeqCst);
    0
}

unsafe extern "C" fn dtor(obj: *mut c_void, data: *mut c_void) {
    // SAFETY: the store passes the live data of the variable being freed.
    let tag = unsafe { data.cast::<u64>().read() } as usize;
    if tag >= KEYS || obj_addr(tag / IDS.len()) != obj as usize {
        violation("dtor got data of another key");
        return;
    }
    BOOK.ver[tag].fetch_add(1, SeqCst);
    if BOOK.cur[tag].swap(0, SeqCst) != data as usize {
        violation("dtor got a pointer that is not the key's live data");
    }
    if !BOOK.live[tag].swap(false, SeqCst) {
        violation("dtor for a key that had no live variable");
    }
    BOOK.dtor_runs[tag].fetch_add(1, SeqCst);
}

/// A private counter per (thread, object) that only its thread touches, dereferenced freely.
unsafe extern "C" fn ctor_private(_obj: *mut c_void, data: *mut c_void, ctor_data: *mut c_void) -> c_int {
    // SAFETY: ctor_data is the initial value; data holds a u64.
    unsafe { data.cast::<u64>().write(*ctor_data.cast::<u64>()) };
    0
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Default, Debug)]
struct Ops {
    gets: u64,
    allocs: u64,
    get_or_allocs: u64,
    frees: u64,
    free_alls: u64,
    private: u64,
}

fn worker(s: &ShadowStore, t: usize, deadline: Instant) -> Ops {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1));
    let mut ops = Ops::default();
    let private_id = 0x1000 + t as u64;
    let mut private_model = [None::<u64>; 8];
    let mut n = 0u64;
    loop {
        n += 1;
        if n.is_multiple_of(256) && Instant::now() >= deadline {
            break;
        }
        let r = rng.next();
        let o = (r >> 8) as usize % OBJS;
        let id = IDS[(r >> 20) as usize % IDS.len()];
        let obj = obj_addr(o) as *const c_void;
        let k = key_index(obj as usize, id);
        let mut arg = CtorArg {
            key: k,
            fail: (r >> 40).is_multiple_of(10),
        };
        let argp = (&mut arg as *mut CtorArg).cast::<c_void>();
        match r % 100 {
            0..=39 => {
                let v1 = BOOK.ver[k].load(SeqCst);
                let p = s.get(obj, id) as usize;
                let c = BOOK.cur[k].load(SeqCst);
                let v2 = BOOK.ver[k].load(SeqCst);
                if v1 == v2 {
                    if v1.is_multiple_of(2) && p != 0 {
                        violation("get found a variable while none was constructed");
                    }
                    if v1 % 2 == 1 && p != 0 && p != c {
                        violation("get returned a pointer that is not the key's live data");
                    }
                }
                ops.gets += 1;
            }
            40..=54 => {
                // SAFETY: ctor gets a live CtorArg and DATA_SIZE bytes.
                let p = unsafe { s.alloc(obj, id, DATA_SIZE, Some(ctor), argp) };
                if !p.is_null() && arg.fail {
                    violation("alloc with a failing ctor returned data");
                }
                ops.allocs += 1;
            }
            55..=69 => {
                // SAFETY: as above.
                let p = unsafe { s.get_or_alloc(obj, id, DATA_SIZE, Some(ctor), argp) };
                if p.is_null() && !arg.fail {
                    violation("get_or_alloc with a succeeding ctor returned NULL");
                }
                ops.get_or_allocs += 1;
            }
            70..=89 => {
                // SAFETY: dtor reads the tag the ctor wrote; readers never dereference shared keys.
                unsafe { s.free(obj, id, Some(dtor)) };
                ops.frees += 1;
            }
            90 => {
                if (r >> 32).is_multiple_of(16) {
                    // SAFETY: as above.
                    unsafe { s.free_all(id, Some(dtor)) };
                    ops.free_alls += 1;
                }
            }
            _ => {
                // Private keys: this thread alone allocates, frees and dereferences them.
                let slot = (r >> 24) as usize % private_model.len();
                let pobj = (0x5000_0000 + slot * 0x40) as *const c_void;
                if (r >> 50).is_multiple_of(8) {
                    // SAFETY: no dtor; private key.
                    unsafe { s.free(pobj, private_id, None) };
                    private_model[slot] = None;
                } else {
                    let mut init = 1000 * (t as u64 + 1);
                    // SAFETY: ctor_private writes the u64 behind ctor_data into 8 bytes of data.
                    let p = unsafe {
                        s.get_or_alloc(
                            pobj,
                            private_id,
                            8,
                            Some(ctor_private),
                            (&mut init as *mut u64).cast(),
                        )
                    };
                    // SAFETY: only this thread frees this key, so the data is live; a u64.
                    let cur = unsafe { &mut *p.cast::<u64>() };
                    let want = private_model[slot].unwrap_or(init);
                    if *cur != want {
                        violation("private shadow data changed under its owner");
                    }
                    *cur += 1;
                    private_model[slot] = Some(*cur);
                }
                ops.private += 1;
            }
        }
    }
    // Leave no private variable behind.
    // SAFETY: no dtor; private keys.
    unsafe { s.free_all(private_id, None) };
    ops
}

fn stress_duration() -> Duration {
    let secs = std::env::var("RELIVE_SHADOW_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(10.0);
    Duration::from_secs_f64(secs)
}

#[test]
fn serial_sv_concurrency_16_threads_overlapping_keys() {
    let s = Arc::new(ShadowStore::new(6)); // 64 buckets: chains are shared, nodes recycled constantly
    let barrier = Arc::new(Barrier::new(THREADS));
    let dur = stress_duration();
    let start = Instant::now();
    let hs: Vec<_> = (0..THREADS)
        .map(|t| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                worker(&s, t, Instant::now() + dur)
            })
        })
        .collect();
    let ops: Vec<Ops> = hs
        .into_iter()
        .map(|h| h.join().expect("worker panicked"))
        .collect();
    let elapsed = start.elapsed();

    // No entry leaks: the table holds exactly the keys the bookkeeping says are live.
    let live_keys = BOOK.live.iter().filter(|l| l.load(SeqCst)).count();
    assert_eq!(
        s.count(),
        live_keys,
        "table entries vs keys with a constructed variable"
    );
    assert_eq!(s.live(), live_keys);
    for (k, l) in BOOK.live.iter().enumerate() {
        let (c, d) = (BOOK.ctor_runs[k].load(SeqCst), BOOK.dtor_runs[k].load(SeqCst));
        assert_eq!(c - d, u64::from(l.load(SeqCst)), "key {k}: {c} ctors, {d} dtors");
    }
    for id in IDS {
        // SAFETY: every thread has finished; dtor reads the tag.
        unsafe { s.free_all(id, Some(dtor)) };
    }
    assert_eq!(s.count(), 0, "entries left after free_all");
    let (mut ctors, mut dtors) = (0, 0);
    for k in 0..KEYS {
        let (c, d) = (BOOK.ctor_runs[k].load(SeqCst), BOOK.dtor_runs[k].load(SeqCst));
        assert_eq!(c, d, "key {k}: a dtor was missed ({c} ctors, {d} dtors)");
        ctors += c;
        dtors += d;
    }
    assert_eq!(BOOK.violations.load(SeqCst), 0, "violations (see stderr)");
    let total: u64 = ops
        .iter()
        .map(|o| o.gets + o.allocs + o.get_or_allocs + o.frees + o.free_alls + o.private)
        .sum();
    eprintln!(
        "{THREADS} threads, {elapsed:.1?}: {total} ops, {ctors} ctors = {dtors} dtors, {} failed ctors, \
         diagnostics {:?}; per thread {:?}",
        BOOK.failed_ctors.load(SeqCst),
        s.diagnostics(),
        ops[0]
    );
    assert!(ctors > 0 && BOOK.failed_ctors.load(SeqCst) > 0 && ops.iter().all(|o| o.gets > 0 && o.frees > 0));
}
