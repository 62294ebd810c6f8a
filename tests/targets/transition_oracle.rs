//! The consistency oracle of tests/targets/transition_oracle.c, as a Rust program (issue 5: live tests on C and
//! Rust targets). Eight workers call `f` in a loop; `f` calls `g` twice and counts a mix in `oracle_mix` when
//! a `g` of another version answered. Same stats line and readiness line as the C oracle, so the same C
//! patches (tests/targets/transition_patch.c) apply. Built with `rustc -O -C link-args=-rdynamic`.
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};

#[unsafe(no_mangle)]
pub static oracle_mix: AtomicI64 = AtomicI64::new(0);
#[unsafe(no_mangle)]
pub static mut oracle_sink: i64 = 0;

static CALLS: [AtomicI64; 8] = [const { AtomicI64::new(0) }; 8];
static VERSION: [AtomicI32; 8] = [const { AtomicI32::new(0) }; 8];

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn g(x: i64) -> i64 {
    let mut s = x;
    for i in 0..40 {
        s = s.wrapping_mul(31).wrapping_add(i);
    }
    // SAFETY: a plain store to a global the patches also write; torn values do not matter.
    unsafe { std::ptr::write_volatile(&raw mut oracle_sink, s) };
    (s & !0xff) | 1
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn f(x: i64) -> i32 {
    let a = g(std::hint::black_box(x));
    for i in 0..30 {
        std::hint::black_box(i);
    }
    let b = g(std::hint::black_box(x + 1));
    if a & 0xff != 1 || b & 0xff != 1 {
        oracle_mix.fetch_add(1, Ordering::Relaxed);
    }
    1
}

fn main() {
    for w in 0..8 {
        std::thread::spawn(move || {
            let mut n = 0i64;
            loop {
                let v = f(std::hint::black_box(n));
                if (0..8).contains(&v) {
                    CALLS[v as usize].fetch_add(1, Ordering::Relaxed);
                }
                VERSION[w].store(v, Ordering::Relaxed);
                for i in 0..200 {
                    std::hint::black_box(i);
                }
                if n % 200 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                n += 1;
            }
        });
    }
    for _ in 0..2 {
        std::thread::spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_millis(1));
        });
    }
    while VERSION.iter().any(|v| v.load(Ordering::Relaxed) == 0) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    println!("oracle ready pid={}", std::process::id());
    loop {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let c: Vec<i64> = CALLS.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let ws: Vec<String> = VERSION.iter().map(|v| v.load(Ordering::Relaxed).to_string()).collect();
        println!(
            "stats calls={} v1={} v2={} v3={} v4={} mix={} workers={} churn=0 churn_bad=0 sig=0",
            c[1] + c[2] + c[3] + c[4],
            c[1],
            c[2],
            c[3],
            c[4],
            oracle_mix.load(Ordering::Relaxed),
            ws.join(",")
        );
    }
}
