//! Benchmark of issue 3 (`relive stacks`), printing one table. Run it with:
//!
//! ```text
//! cargo build --release -p relive --bin relive --example stacks_bench && target/release/examples/stacks_bench
//! ```
//!
//! - per-thread stop → unwind → resume (median, p99) on a thread with a ~20-frame stack;
//! - the whole `relive stacks PID` on 100 and 1000 threads (each with a ~20-frame stack);
//! - in the same run, on the same targets: `gdb -batch -p PID -ex 'thread apply all bt'` and
//!   `eu-stack -p PID`.
//!
//! Targets are C programs compiled with -O2 -fomit-frame-pointer (tests/targets/stacks_many.c).

use relive_proc::{ImageOptions, PageCacheReader, ProcessImage, stop_thread};
use relive_testkit::{compile_c, spawn_target};
use relive_unwind::StartRegs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn time_cmd(mut c: Command) -> Option<Duration> {
    c.stdout(Stdio::null()).stderr(Stdio::null()).stdin(Stdio::null());
    let t = Instant::now();
    let st = c.status().ok()?;
    let d = t.elapsed();
    st.success().then_some(d)
}

fn measure(
    rows: &mut Vec<Row>,
    name: &str,
    threads: usize,
    mk: &dyn Fn() -> Command,
    reps: usize,
    base: Option<Duration>,
) -> Option<Duration> {
    let mut v: Vec<Duration> = (0..reps).filter_map(|_| time_cmd(mk())).collect();
    if v.is_empty() {
        eprintln!("{name} failed on {threads} threads");
        return None;
    }
    v.sort();
    let m = pct(&v, 0.5);
    rows.push(Row {
        what: format!("{name}, {threads} threads"),
        median: m,
        p99: None,
        n: v.len(),
        base,
    });
    Some(m)
}

struct Row {
    what: String,
    median: Duration,
    p99: Option<Duration>,
    n: usize,
    base: Option<Duration>,
}

fn main() {
    let relive = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("relive");
    assert!(
        relive.exists(),
        "build the CLI first: cargo build --release -p relive --bin relive ({})",
        relive.display()
    );
    let exe = compile_c(
        "stacks_many",
        &["stacks_many.c"],
        &["-O2", "-fomit-frame-pointer", "-pthread"],
    );
    let mut rows: Vec<Row> = Vec::new();

    // 1. Per-thread stop → unwind → resume, one thread with a 20-frame stack (deep(15) + libc + root).
    let target = spawn_target(&exe, &["4", "15"], "ready");
    let pid = target.pid();
    let tids = relive_proc::list_threads(pid).unwrap();
    let image = ProcessImage::load(pid, &ImageOptions::default()).unwrap();
    let mut unwinder = image.unwinder();
    let tid = tids[1];
    let (mut total, mut stop, mut unw, mut res) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut frames = 0;
    let n = 3000;
    for i in 0..n + 100 {
        let t0 = Instant::now();
        let t = stop_thread(pid, tid).unwrap();
        let regs = t.regs().unwrap();
        let t1 = Instant::now();
        let mut reader = PageCacheReader::new(pid);
        let st = unwinder.unwind(
            StartRegs {
                ip: regs.rip,
                sp: regs.rsp,
                bp: regs.rbp,
            },
            &mut reader,
            100,
        );
        let t2 = Instant::now();
        t.resume().unwrap();
        let t3 = Instant::now();
        assert!(st.verdict.is_reliable(), "{st:?}");
        frames = st.frames.len();
        if i >= 100 {
            total.push(t3 - t0);
            stop.push(t1 - t0);
            unw.push(t2 - t1);
            res.push(t3 - t2);
        }
    }
    for v in [&mut total, &mut stop, &mut unw, &mut res] {
        v.sort();
    }
    let label = format!("per-thread stop+regs → unwind → resume ({frames} frames)");
    rows.push(Row {
        what: label,
        median: pct(&total, 0.5),
        p99: Some(pct(&total, 0.99)),
        n,
        base: None,
    });
    rows.push(Row {
        what: "  of which stop + GETREGS".into(),
        median: pct(&stop, 0.5),
        p99: Some(pct(&stop, 0.99)),
        n,
        base: None,
    });
    rows.push(Row {
        what: "  of which unwind".into(),
        median: pct(&unw, 0.5),
        p99: Some(pct(&unw, 0.99)),
        n,
        base: None,
    });
    rows.push(Row {
        what: "  of which resume (detach)".into(),
        median: pct(&res, 0.5),
        p99: Some(pct(&res, 0.99)),
        n,
        base: None,
    });
    drop(target);

    // 2./3. Whole-process tools on 100 and 1000 threads.
    for threads in [100usize, 1000] {
        let target = spawn_target(&exe, &[&threads.to_string(), "15"], "ready");
        let pid = target.pid().to_string();
        let reps = if threads >= 1000 { 3 } else { 5 };
        let relive_cmd = || {
            let mut c = Command::new(&relive);
            c.args(["stacks", &pid]);
            c
        };
        let gdb_cmd = || {
            let mut c = Command::new("gdb");
            c.args(["-nx", "-batch", "-p", &pid, "-ex", "thread apply all bt"]);
            c
        };
        let eu_cmd = || {
            let mut c = Command::new("eu-stack");
            c.args(["-p", &pid]);
            c
        };
        let ours = measure(&mut rows, "relive stacks", threads, &relive_cmd, reps, None);
        measure(
            &mut rows,
            "gdb -batch -ex 'thread apply all bt'",
            threads,
            &gdb_cmd,
            reps.min(3),
            ours,
        );
        measure(&mut rows, "eu-stack -p", threads, &eu_cmd, reps.min(3), ours);
        drop(target);
    }

    println!(
        "\nrelive stacks benchmark (issue 3), {} CPUs, release build",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| measurement | median | p99 | runs | relative to relive |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let ratio = r.base.map_or("".to_string(), |b| {
            format!("{:.1}× slower", r.median.as_secs_f64() / b.as_secs_f64())
        });
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what,
            fmt(r.median),
            r.p99.map_or("-".into(), fmt),
            r.n,
            ratio
        );
    }
}
