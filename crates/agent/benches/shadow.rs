//! Shadow-variable store benchmark (issue 6). Run with:
//!
//!     cargo bench -p relive-agent --bench shadow
//!
//! One table, all measured in this run: `get` hit and miss at 1, 2, 8 and 16 threads on the
//! agent's store and on a `Mutex<HashMap>` baseline, the exported C entry point
//! (`relive_shadow_get` on the process-wide store) single-threaded, and alloc+free throughput on
//! both. Each thread times batches of `BATCH` operations; the table shows the median and p99 of
//! the per-operation time over all batches of all threads, the aggregate throughput (operations of
//! all threads / wall time), and the ratio of the store's aggregate throughput to the baseline's.
//! Env: `SHADOW_BENCH_BATCHES` (default 30 per thread), `SHADOW_BENCH_KEYS` (default 4096).

use core::ffi::c_void;
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use relive_agent::shadow::{ShadowStore, ffi, global};

const BATCH: usize = 20_000;
const ID: u64 = 0x5ad0;
const MISS_ID: u64 = 0x5ad1;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Object addresses that look like heap objects (64-byte stride).
fn obj(i: usize) -> *const c_void {
    (0x5555_0000_0000usize + i * 64) as *const c_void
}

struct Rng(u64);
impl Rng {
    #[inline(always)]
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

trait Bench: Send + Sync + 'static {
    fn get(&self, o: *const c_void, id: u64) -> usize;
    fn alloc_free(&self, o: *const c_void, id: u64);
}

struct Store(ShadowStore);
impl Bench for Store {
    #[inline(always)]
    fn get(&self, o: *const c_void, id: u64) -> usize {
        self.0.get(o, id) as usize
    }
    fn alloc_free(&self, o: *const c_void, id: u64) {
        // SAFETY: no ctor, no dtor; the data is never used.
        unsafe {
            black_box(self.0.alloc(o, id, 16, None, core::ptr::null_mut()));
            self.0.free(o, id, None);
        }
    }
}

/// The process-wide store through the exported C ABI (what a C patch calls).
struct Exported;
impl Bench for Exported {
    #[inline(always)]
    fn get(&self, o: *const c_void, id: u64) -> usize {
        ffi::relive_shadow_get(o, id) as usize
    }
    fn alloc_free(&self, o: *const c_void, id: u64) {
        // SAFETY: as above.
        unsafe {
            black_box(ffi::relive_shadow_alloc(
                o,
                id,
                16,
                0,
                None,
                core::ptr::null_mut(),
            ));
            ffi::relive_shadow_free(o, id, None);
        }
    }
}

/// The baseline: a global lock around a std HashMap holding boxed 16-byte blocks.
type Table = HashMap<(usize, u64), Box<[u8; 16]>>;
struct Locked(Mutex<Table>);
impl Bench for Locked {
    #[inline(always)]
    fn get(&self, o: *const c_void, id: u64) -> usize {
        let m = self.0.lock().unwrap();
        m.get(&(o as usize, id)).map_or(0, |b| b.as_ptr() as usize)
    }
    fn alloc_free(&self, o: *const c_void, id: u64) {
        let key = (o as usize, id);
        self.0
            .lock()
            .unwrap()
            .entry(key)
            .or_insert_with(|| Box::new([0; 16]));
        black_box(self.0.lock().unwrap().remove(&key));
    }
}

#[derive(Clone, Copy)]
enum Op {
    Hit,
    Miss,
    AllocFree,
}

struct Result {
    median_ns: f64,
    p99_ns: f64,
    mops: f64,
}

fn run<B: Bench>(b: &Arc<B>, op: Op, threads: usize, keys: usize, batches: usize) -> Result {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (b, barrier) = (b.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((t as u64 + 1) << 32));
                let mut samples = Vec::with_capacity(batches);
                barrier.wait();
                let start = Instant::now();
                for _ in 0..batches {
                    let t0 = Instant::now();
                    match op {
                        Op::Hit | Op::Miss => {
                            let id = if matches!(op, Op::Hit) { ID } else { MISS_ID };
                            let mut acc = 0usize;
                            for _ in 0..BATCH {
                                let i = (rng.next() as usize) % keys;
                                acc ^= b.get(obj(i), id);
                            }
                            black_box(acc);
                        }
                        Op::AllocFree => {
                            for i in 0..BATCH / 10 {
                                // A private key per thread: no duplicate, no contention on data.
                                b.alloc_free(obj(1_000_000 + t * 1024 + i % 1024), ID);
                            }
                        }
                    }
                    samples.push(t0.elapsed());
                }
                (start, Instant::now(), samples)
            })
        })
        .collect();
    barrier.wait();
    let mut all: Vec<Duration> = Vec::new();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for h in hs {
        let (start, end, samples) = h.join().unwrap();
        first = Some(first.map_or(start, |f| f.min(start)));
        last = Some(last.map_or(end, |l| l.max(end)));
        all.extend(samples);
    }
    // Wall time from the first thread's start to the last thread's end.
    let wall = last.unwrap() - first.unwrap();
    let per_batch = match op {
        Op::AllocFree => BATCH / 10,
        _ => BATCH,
    } as f64;
    all.sort();
    let ns = |d: Duration| d.as_nanos() as f64 / per_batch;
    Result {
        median_ns: ns(all[all.len() / 2]),
        p99_ns: ns(all[(all.len() * 99 / 100).min(all.len() - 1)]),
        mops: (threads * batches) as f64 * per_batch / wall.as_secs_f64() / 1e6,
    }
}

/// The per-field median of repeated runs.
fn median_of(mut rs: Vec<Result>) -> Result {
    let mid = rs.len() / 2;
    let mut pick = |f: fn(&Result) -> f64| {
        rs.sort_by(|a, b| f(a).total_cmp(&f(b)));
        f(&rs[mid])
    };
    Result {
        median_ns: pick(|r| r.median_ns),
        p99_ns: pick(|r| r.p99_ns),
        mops: pick(|r| r.mops),
    }
}

/// `/proc/loadavg`'s first three fields: other work on the machine skews the multi-thread rows.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let keys = env_usize("SHADOW_BENCH_KEYS", 4096);
    let batches = env_usize("SHADOW_BENCH_BATCHES", 30);
    let reps = env_usize("SHADOW_BENCH_REPS", 3).max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    let store = Arc::new(Store(ShadowStore::new(relive_agent::shadow::GLOBAL_BUCKET_BITS)));
    let locked = Arc::new(Locked(Mutex::new(HashMap::new())));
    for i in 0..keys {
        // SAFETY: no ctor; the data is never used.
        unsafe {
            store.0.alloc(obj(i), ID, 16, None, core::ptr::null_mut());
            ffi::relive_shadow_alloc(obj(i), ID, 16, 0, None, core::ptr::null_mut());
        }
        locked
            .0
            .lock()
            .unwrap()
            .insert((obj(i) as usize, ID), Box::new([0; 16]));
    }
    assert_eq!(store.0.count(), keys);
    assert_eq!(global().count(), keys);
    let exported = Arc::new(Exported);

    println!(
        "shadow store vs Mutex<HashMap>: {keys} keys, batches of {BATCH} ops ({} for alloc+free), \
         {batches} batches per thread, {cpus} CPUs; each cell is the median of {reps} alternating \
         store/mutex repetitions; load average before: {}",
        BATCH / 10,
        loadavg()
    );
    println!();
    println!(
        "| op | threads | store median ns/op | store p99 | store Mops/s | mutex median ns/op | mutex p99 | mutex Mops/s | throughput ratio store/mutex |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, op) in [
        ("get hit", Op::Hit),
        ("get miss", Op::Miss),
        ("alloc+free", Op::AllocFree),
    ] {
        for threads in [1usize, 2, 8, 16] {
            let (mut ss, mut ms) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                ss.push(run(&store, op, threads, keys, batches));
                ms.push(run(&locked, op, threads, keys, batches));
            }
            let (s, m) = (median_of(ss), median_of(ms));
            println!(
                "| {name} | {threads} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x |",
                s.median_ns,
                s.p99_ns,
                s.mops,
                m.median_ns,
                m.p99_ns,
                m.mops,
                s.mops / m.mops
            );
        }
    }
    for (name, op) in [
        ("C ABI relive_shadow_get hit", Op::Hit),
        ("C ABI relive_shadow_get miss", Op::Miss),
    ] {
        let e = median_of((0..reps).map(|_| run(&exported, op, 1, keys, batches)).collect());
        println!(
            "| {name} | 1 | {:.1} | {:.1} | {:.1} | | | | |",
            e.median_ns, e.p99_ns, e.mops
        );
    }
    println!();
    println!(
        "ns/op = wall time of a batch / its ops, per thread (with more threads than CPUs it includes \
         time preempted); Mops/s = ops of all threads / wall time. Load average after: {}",
        loadavg()
    );
}
