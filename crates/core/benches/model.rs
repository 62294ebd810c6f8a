//! Costs of the model operations the controller runs, and the size of the serialized model it keeps in the
//! registry body (64 KiB). Prints a table: median and p99 per operation, and the ratio to a baseline
//! measured in the same run (the 1-function case for time, the empty model for size).
//!
//! Run: `cargo bench -p relive-core --bench model`

use std::hint::black_box;
use std::time::{Duration, Instant};

use relive_core::{FuncSpec, Model, ObjectId, ObjectSpec, PatchSpec, Range, SwitchOutcome, ThreadStack, Tid};

fn exe() -> ObjectId {
    ObjectId::from_build_id("3f1c9e5a7b2d4c6e8f0a1b2c3d4e5f60718293a4")
        .with_soname("libservice.so.1")
        .with_path("/usr/lib/x86_64-linux-gnu/libservice.so.1")
}

fn spec(name: &str, funcs: usize, base: u64) -> PatchSpec {
    let mut o = ObjectSpec::new(exe());
    for i in 0..funcs as u64 {
        let old = Range::new(0x40_0000 + i * 0x200, 0x40_0000 + i * 0x200 + 0x180);
        let new = Range::new(base + i * 0x200, base + i * 0x200 + 0x180);
        o = o.func(FuncSpec::new(&format!("handle_request_variant_{i}"), old, new));
    }
    PatchSpec::new(name).object(o)
}

/// A model with `threads` threads and one enabled patch of `funcs` functions, then a second patch (replace)
/// started over it, so that the next step is switching threads.
fn started(threads: i32, funcs: usize) -> Model {
    let mut m = Model::new();
    for t in 0..threads {
        m.add_thread(Tid(1000 + t)).unwrap();
    }
    m.enable(spec("fix-1", funcs, 0x7f00_0000_0000)).unwrap();
    m.start(&[]).unwrap();
    let clean = ThreadStack::reliable(stack(20));
    for t in 0..threads {
        m.try_switch(Tid(1000 + t), &clean).unwrap();
    }
    m.try_complete().unwrap();
    m.enable(spec("fix-2", funcs, 0x7f10_0000_0000).replace(true))
        .unwrap();
    m.start(&[]).unwrap();
    m
}

/// Return addresses outside every patched function.
fn stack(depth: usize) -> Vec<u64> {
    (0..depth as u64).map(|i| 0x50_0000 + i * 0x40).collect()
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
}

fn time<F: FnMut() -> R, R>(iters: usize, mut f: F) -> (Duration, Duration) {
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        black_box(f());
        v.push(t.elapsed());
    }
    stats(v)
}

fn row(op: &str, threads: i32, funcs: usize, (med, p99): (Duration, Duration), base: Duration) {
    println!(
        "{op:<34} {threads:>7} {funcs:>5} {:>11.2?} {:>11.2?} {:>7.2}",
        med,
        p99,
        med.as_secs_f64() / base.as_secs_f64()
    );
}

fn main() {
    println!(
        "relive-core model operations (debug={}), 2-core machine shared",
        cfg!(debug_assertions)
    );
    println!(
        "{:<34} {:>7} {:>5} {:>11} {:>11} {:>7}",
        "operation", "threads", "funcs", "median", "p99", "ratio"
    );

    // try_switch: one stopped thread's decision over a 20-frame stack whose deepest frame is inside the last
    // patched function, so every frame is checked against every forbidden range and the thread stays
    // blocked (the model is not changed, so it needs no clone). Baseline = 1 function.
    let clean = ThreadStack::reliable(stack(20));
    let mut base = Duration::ZERO;
    for funcs in [1usize, 10, 50] {
        let mut m = started(100, funcs);
        let mut pcs = stack(19);
        // A return address in fix-1's version of the last function: C5a's predecessor of fix-2's func.
        pcs.push(0x7f00_0000_0000 + (funcs as u64 - 1) * 0x200 + 0x10);
        let blocked = ThreadStack::reliable(pcs);
        let r = time(5000, || m.try_switch(Tid(1000), &blocked).unwrap());
        assert!(matches!(
            m.try_switch(Tid(1000), &blocked).unwrap(),
            SwitchOutcome::Blocked { frame: 19, .. }
        ));
        if funcs == 1 {
            base = r.0;
        }
        row("try_switch (20 frames, blocked)", 100, funcs, r, base);
    }

    // enable + start, and completion, as the thread count grows (each timing includes cloning the model it
    // starts from); baseline = 10 threads.
    let mut base_en = Duration::ZERO;
    let mut base_done = Duration::ZERO;
    for threads in [10, 100, 1000] {
        let mut pre = Model::new();
        for t in 0..threads {
            pre.add_thread(Tid(1000 + t)).unwrap();
        }
        let en = time(200, || {
            let mut m = pre.clone();
            m.enable(spec("fix-1", 50, 0x7f00_0000_0000)).unwrap();
            m.start(&[]).unwrap()
        });
        if threads == 10 {
            base_en = en.0;
        }
        row("enable + start", threads, 50, en, base_en);
        let mut ready = started(threads, 50);
        for t in 0..threads {
            ready.try_switch(Tid(1000 + t), &clean).unwrap();
        }
        let done = time(200, || ready.clone().try_complete().unwrap());
        if threads == 10 {
            base_done = done.0;
        }
        row("try_complete (replace completes)", threads, 50, done, base_done);
    }

    // The serialized model, mid-transition (the largest it gets): size and (de)serialization time.
    println!();
    println!(
        "{:<34} {:>7} {:>5} {:>11} {:>11} {:>11} {:>7}",
        "serialized model (JSON)", "threads", "funcs", "bytes", "ser med", "de med", "ratio"
    );
    let empty = serde_json::to_vec(&Model::new()).unwrap().len();
    for (threads, funcs) in [(0, 0), (10, 1), (100, 10), (1000, 10), (1000, 50), (4000, 50)] {
        let m = if funcs == 0 {
            Model::new()
        } else {
            started(threads, funcs)
        };
        let bytes = serde_json::to_vec(&m).unwrap();
        let ser = time(100, || serde_json::to_vec(&m).unwrap());
        let de = time(100, || serde_json::from_slice::<Model>(&bytes).unwrap());
        println!(
            "{:<34} {threads:>7} {funcs:>5} {:>11} {:>11.2?} {:>11.2?} {:>7.1}",
            "mid-transition replace",
            bytes.len(),
            ser.0,
            de.0,
            bytes.len() as f64 / empty as f64
        );
    }
}
