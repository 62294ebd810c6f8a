//! System-state lookup benchmark (issue 6, SPEC §8). Run with:
//!
//!     cargo bench -p relive-agent --bench state
//!
//! One table, all measured in this run, single thread: `relive_state_get` (hit on the last record,
//! miss) and `relive_state_get_prev` (hit) for tables of 1, 8 and 64 states, against a baseline in the
//! same run: `relive_shadow_get` hit on the process-wide shadow store. Each row is the median and p99
//! of the per-call time over `BATCHES` batches of `BATCH` calls, and the ratio of the median to the
//! baseline's. The last column is the cost of one `set_states` that changes the table (new snapshot
//! published), median over `BATCHES` calls.

use core::ffi::c_void;
use std::ffi::CString;
use std::hint::black_box;
use std::time::Instant;

use relive_abi::proto::{PrevEntry, StateEntry};
use relive_agent::shadow::ffi as shadow;
use relive_agent::state::{relive_state_get, relive_state_get_prev, set_states};

const BATCH: usize = 20_000;
const BATCHES: usize = 40;

fn per_call_ns(mut f: impl FnMut()) -> (f64, f64) {
    let mut v: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..BATCH {
                f();
            }
            t.elapsed().as_nanos() as f64 / BATCH as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
}

fn main() {
    let obj = 0x5555_0000_1000usize as *const c_void;
    // SAFETY: no ctor; the 8 bytes are never used.
    unsafe { shadow::relive_shadow_alloc(obj, 7, 8, 0, None, core::ptr::null_mut()) };
    let (base, base99) = per_call_ns(|| {
        black_box(shadow::relive_shadow_get(black_box(obj), black_box(7)));
    });
    println!(
        "{:<34} {:>10} {:>10} {:>8} {:>14}",
        "operation", "median ns", "p99 ns", "ratio", "set_states us"
    );
    println!(
        "{:<34} {:>10.1} {:>10.1} {:>8.2} {:>14}",
        "baseline relive_shadow_get hit", base, base99, 1.0, "-"
    );
    for n in [1usize, 8, 64] {
        // n/4 patches (at least one) with ids 1.. spread over them; the looked-up record is the last one.
        let patches = (n / 4).max(1);
        let states: Vec<StateEntry> = (0..n)
            .map(|i| StateEntry {
                patch: format!("bench-patch-{}", i % patches),
                id: i as u64 + 1,
                version: 1,
            })
            .collect();
        let last = states.last().unwrap().clone();
        let prev = vec![PrevEntry {
            patch: last.patch.clone(),
            id: last.id,
        }];
        let mut toggle = false;
        let mut set: Vec<f64> = (0..BATCHES)
            .map(|_| {
                toggle = !toggle;
                let pv: &[PrevEntry] = if toggle { &prev } else { &[] };
                let t = Instant::now();
                set_states(&states, pv).expect("set_states");
                t.elapsed().as_nanos() as f64 / 1000.0
            })
            .collect();
        set.sort_by(f64::total_cmp);
        set_states(&states, &prev).expect("set_states");
        let name = CString::new(last.patch.clone()).unwrap();
        let hit = per_call_ns(|| {
            // SAFETY: a NUL-terminated name.
            black_box(unsafe { relive_state_get(black_box(name.as_ptr()), black_box(last.id)) });
        });
        let miss = per_call_ns(|| {
            // SAFETY: as above.
            black_box(unsafe { relive_state_get(black_box(name.as_ptr()), black_box(10_000)) });
        });
        let prev_hit = per_call_ns(|| {
            black_box(relive_state_get_prev(black_box(last.id)));
        });
        for (what, (m, p)) in [("get hit", hit), ("get miss", miss), ("get_prev hit", prev_hit)] {
            println!(
                "{:<34} {:>10.1} {:>10.1} {:>8.2} {:>14.2}",
                format!("{what}, {n} states"),
                m,
                p,
                m / base,
                set[set.len() / 2]
            );
        }
    }
}
