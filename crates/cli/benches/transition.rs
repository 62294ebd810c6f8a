//! Transition benchmark (issue 5 "Benchmark"): prints one table. Every row runs in this process's run, with its
//! baseline (a direct call of the same code) measured in the same target.
//!
//! Run: `cargo bench -p relive --bench transition` (release build of relive, the agent and this harness).
//! The agent is preloaded (as libpulp's is), so apply wall time excludes injection.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use relive_testkit::{GuardedChild, compile_c, spawn_guarded};

fn agent() -> PathBuf {
    relive_proc::agent::agent_library_path()
        .expect("librelive_agent.so (cargo build --release -p relive-agent)")
}

struct Target {
    child: GuardedChild,
}

impl Target {
    fn start(args: &[&str]) -> Target {
        let exe = compile_c(
            "transition_bench",
            &["transition_bench.c"],
            &["-O2", "-g", "-pthread", "-rdynamic"],
        );
        let mut cmd = Command::new(exe);
        cmd.args(args).env("LD_PRELOAD", agent()).stdin(Stdio::piped());
        Target {
            child: spawn_guarded(cmd, "bench ready", Duration::from_secs(60))
                .expect("start the bench target"),
        }
    }
    fn pid(&self) -> String {
        self.child.pid().to_string()
    }
    fn send(&mut self, cmd: &str) {
        while self.child.next_line(Duration::ZERO).is_some() {}
        let stdin = self.child.child_mut().stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
    }
    fn ask(&mut self, cmd: &str, prefix: &str) -> String {
        self.send(cmd);
        loop {
            let l = self
                .child
                .next_line(Duration::from_secs(60))
                .expect("target answer");
            if l.starts_with(prefix) {
                return l;
            }
        }
    }
    fn field(line: &str, k: &str) -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap()
            .parse()
            .unwrap()
    }
    fn max_pause_ms(&mut self) -> f64 {
        Self::field(&self.ask("report", "pause "), "max_ns") / 1e6
    }
}

fn relive(args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_relive"))
        .arg("--json")
        .args(args)
        .output()
        .expect("run relive");
    assert!(
        o.status.success() || o.status.code() == Some(0),
        "relive {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("relive --json output")
}

fn patch(hold: bool) -> PathBuf {
    let mut flags = vec!["-O2", "-g", "-fPIC", "-shared"];
    if hold {
        flags.push("-DHOLD=1");
    }
    compile_c(
        if hold {
            "transition_bench_patch_hold"
        } else {
            "transition_bench_patch"
        },
        &["transition_bench_patch.c"],
        &flags,
    )
}

struct Run {
    wall_ms: f64,
    transition_ms: f64,
    thread_pause_ms: f64,
    /// The same measurement over a window of the same length in which relive does nothing.
    control_ms: f64,
    pauses: Vec<u64>,
    /// Stop-all entry-write windows, µs.
    windows: Vec<u64>,
    /// Stop-free (int3) entry-write windows, µs: no thread stopped.
    int3_windows: Vec<u64>,
    /// relive's `stop_wait_us` (median, p99, max): from the interrupt to the start of a thread's handling.
    stop_wait: (u64, u64, u64),
}

fn run(t: &mut Target, args: &[&str]) -> Run {
    t.send("reset");
    let t0 = Instant::now();
    let j = relive(args);
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let thread_pause_ms = t.max_pause_ms();
    t.send("reset");
    std::thread::sleep(
        t0.elapsed()
            .min(Duration::from_secs(5))
            .max(Duration::from_millis(wall_ms as u64)),
    );
    let control_ms = t.max_pause_ms();
    let pauses = j["pause_samples_us"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap()).collect())
        .unwrap_or_default();
    // Entry-write windows: only stop-all ones stop threads; int3 ones (the stop-free protocol) stop none.
    let (mut windows, mut int3_windows) = (vec![], vec![]);
    for w in j["windows"].as_array().unwrap() {
        let us = w["window_us"].as_u64().unwrap();
        if w["mode"] == "int3" {
            int3_windows.push(us);
        } else {
            windows.push(us);
        }
    }
    let sw = |i: usize| j["stop_wait_us"][i].as_u64().unwrap_or(0);
    Run {
        stop_wait: (sw(0), sw(1), sw(2)),
        wall_ms,
        transition_ms: j["transition_ms"].as_f64().unwrap(),
        thread_pause_ms,
        control_ms,
        pauses,
        windows,
        int3_windows,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let p = patch(false);
    let p = p.to_str().unwrap();
    println!(
        "relive transition benchmark (agent preloaded; wall = the whole `relive` command incl. process start,"
    );
    println!(
        "image load and patch dlopen; transition = init → completion; pause = longest gap a busy target thread saw, or the longest stop relive reported)\n"
    );
    let reps: usize = std::env::var("RELIVE_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    println!("{reps} apply/revert cycles per scenario; medians over them (max in brackets)\n");
    println!(
        "| scenario | op | wall ms | transition ms | longest pause ms (control) | stop-all windows µs (median / max) | int3 windows µs (median / max), no thread stopped | per-thread pause µs (median / p99 / max) | wait stopped before handling µs (median / max) | libpulp apply wall / longest pause | libpulp ÷ relive (wall, pause) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    // libpulp's published numbers (issue 5): apply wall and longest pause, ms.
    let scenarios: [(&str, Vec<&str>, (f64, f64)); 4] = [
        ("1 thread", vec!["--busy", "1"], (5.98, 1.84)),
        (
            "100 threads: 2 busy, 98 in 1 ms nanosleep",
            vec!["--busy", "2", "--nap", "98"],
            (24.6, 6.8),
        ),
        ("100 threads, all busy", vec!["--busy", "100"], (5360.0, 5110.0)),
        ("1,000 threads blocked", vec!["--blocked", "1000"], (68.0, 63.0)),
    ];
    let med = |v: &mut Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut all_pauses = vec![];
    let mut control_2_98: Vec<f64> = vec![];
    for (name, args, (pulp_wall, pulp_pause)) in &scenarios {
        let (name, pulp_wall, pulp_pause) = (*name, *pulp_wall, *pulp_pause);
        let mut t = Target::start(args);
        let pid = t.pid();
        let mut runs: [Vec<Run>; 2] = [vec![], vec![]];
        for _ in 0..reps {
            for (k, a) in [
                vec!["apply", pid.as_str(), p],
                vec!["disable", pid.as_str(), "bench"],
            ]
            .into_iter()
            .enumerate()
            {
                runs[k].push(run(&mut t, &a));
            }
        }
        for (k, op) in ["apply", "revert"].into_iter().enumerate() {
            let rs = &runs[k];
            let mut ps: Vec<u64> = rs.iter().flat_map(|r| r.pauses.iter().copied()).collect();
            ps.sort_unstable();
            let q = |f: f64| {
                if ps.is_empty() {
                    0
                } else {
                    ps[((ps.len() - 1) as f64 * f).round() as usize]
                }
            };
            all_pauses.extend(ps.iter().copied());
            let mut wall: Vec<f64> = rs.iter().map(|r| r.wall_ms).collect();
            let mut tr: Vec<f64> = rs.iter().map(|r| r.transition_ms).collect();
            // The longest pause of a run: the longest gap a measuring (busy) thread saw, or, for threads that
            // cannot measure (blocked ones), the longest stop-all window or per-thread stop relive reported.
            let mut pause: Vec<f64> = rs
                .iter()
                .map(|r| {
                    let stopped = r
                        .windows
                        .iter()
                        .chain(r.pauses.iter())
                        .copied()
                        .max()
                        .unwrap_or(0) as f64
                        / 1e3;
                    r.thread_pause_ms.max(stopped)
                })
                .collect();
            let mut control: Vec<f64> = rs.iter().map(|r| r.control_ms).collect();
            if args.contains(&"--nap") && op == "apply" {
                control_2_98 = control.clone();
            }
            let mut win: Vec<f64> = rs
                .iter()
                .flat_map(|r| r.windows.iter().map(|w| *w as f64))
                .collect();
            let (wall_max, pause_max) = (
                wall.iter().copied().fold(0.0, f64::max),
                pause.iter().copied().fold(0.0, f64::max),
            );
            let win_max = win.iter().copied().fold(0.0, f64::max);
            let mut win3: Vec<f64> = rs
                .iter()
                .flat_map(|r| r.int3_windows.iter().map(|w| *w as f64))
                .collect();
            let win3_max = win3.iter().copied().fold(0.0, f64::max);
            let (w, pz) = (med(&mut wall), med(&mut pause));
            let mut sw_med: Vec<f64> = rs.iter().map(|r| r.stop_wait.0 as f64).collect();
            let sw_max = rs.iter().map(|r| r.stop_wait.2).max().unwrap_or(0);
            println!(
                "| {name} | {op} | {w:.1} [{wall_max:.1}] | {:.1} | {pz:.2} [{pause_max:.2}] ({:.2}) | {:.0} / {win_max:.0} | {:.0} / {win3_max:.0} | {} / {} / {} | {:.0} / {sw_max} | {} | {} |",
                med(&mut tr),
                med(&mut control),
                if win.is_empty() { 0.0 } else { med(&mut win) },
                if win3.is_empty() { 0.0 } else { med(&mut win3) },
                q(0.5),
                q(0.99),
                ps.last().copied().unwrap_or(0),
                med(&mut sw_med),
                if op == "apply" {
                    format!("{pulp_wall} ms / {pulp_pause} ms")
                } else {
                    String::new()
                },
                if op == "apply" {
                    format!("{:.1}×, {:.1}×", pulp_wall / w, pulp_pause / pz.max(1e-3))
                } else {
                    String::new()
                }
            );
        }
    }
    all_pauses.sort_unstable();
    let q = |f: f64| all_pauses[((all_pauses.len() - 1) as f64 * f).round() as usize];
    println!(
        "\nper-thread pause over every switch above: median {} µs, p99 {} µs, max {} µs ({} switches)",
        q(0.5),
        q(0.99),
        all_pauses.last().unwrap(),
        all_pauses.len()
    );
    floors(reps, &control_2_98);
    // Stop-all window and completion time with N threads not inside patched code.
    println!(
        "\n| threads not in patched code | stop-all windows µs | int3 windows µs (no thread stopped) | transition ms (init → complete) |"
    );
    println!("|---|---|---|---|");
    for n in [10, 100, 1000] {
        let mut t = Target::start(&["--blocked", &n.to_string()]);
        let pid = t.pid();
        let r = run(&mut t, &["apply", pid.as_str(), p]);
        println!(
            "| {n} | {:?} | {:?} | {:.1} |",
            r.windows, r.int3_windows, r.transition_ms
        );
    }
    // Call cost: unpatched, during a transition (dispatcher), after completion; ratios to a direct call.
    let hp = patch(true);
    let mut t = Target::start(&["--blocked", "1", "--hold"]);
    let pid = t.pid();
    let cost = |t: &mut Target| {
        let l = t.ask("cost", "cost ");
        (Target::field(&l, "direct_ns"), Target::field(&l, "patched_ns"))
    };
    let (d0, p0) = cost(&mut t);
    let o = Command::new(env!("CARGO_BIN_EXE_relive"))
        .args(["apply", pid.as_str(), hp.to_str().unwrap(), "--no-wait"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (d1, p1) = cost(&mut t);
    let _ = relive(&["force", pid.as_str()]);
    let (d2, p2) = cost(&mut t);
    println!(
        "\n| call of bench_fn | ns | direct call of the same code ns (same moment) | ratio | added ns | added ns vs unpatched bench_fn |"
    );
    println!("|---|---|---|---|---|---|");
    for (what, d, p) in [
        ("unpatched", d0, p0),
        ("during a transition (dispatcher)", d1, p1),
        ("after completion", d2, p2),
    ] {
        println!(
            "| {what} | {p:.2} | {d:.2} | {:.2} | {:+.2} | {:+.2} |",
            p / d,
            p - d,
            (p - d) - (p0 - d0)
        );
    }
    println!("\nlibpulp adds 0.87 ns per patched call.");
}

/// The floors under issue 5's targets (libpulp's figure ÷ 5), measured in this run: what no `relive` command
/// can go below on this machine, whatever relive does inside.
/// - Process start and exit: `/bin/true`, and `relive --version`, spawned as the table spawns `relive`.
/// - The ptrace floor of a per-thread transition (tests/targets/ptrace_floor.c): seize 1,000 blocked threads,
///   interrupt them all, read each one's registers as it stops, resume it. No unwinding, no state write.
/// - The longest gap of a busy thread in the 2 busy + 98 napping target while relive does nothing (the
///   table's control column for that scenario).
fn floors(reps: usize, control_2_98: &[f64]) {
    let med = |mut v: Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let spawn_ms = |cmd: &mut Command| {
        let t0 = Instant::now();
        let o = cmd.output().expect("spawn");
        assert!(
            o.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        t0.elapsed().as_secs_f64() * 1e3
    };
    let n = (reps * 4).max(10);
    let (mut tr, mut rv) = (vec![], vec![]);
    for _ in 0..n {
        tr.push(spawn_ms(&mut Command::new("true")));
        rv.push(spawn_ms(
            Command::new(env!("CARGO_BIN_EXE_relive")).arg("--version"),
        ));
    }
    let floor = compile_c("ptrace_floor", &["ptrace_floor.c"], &["-O2", "-g"]);
    let t = Target::start(&["--blocked", "1000"]);
    let (mut inner, mut whole) = (vec![], vec![]);
    for _ in 0..reps {
        let t0 = Instant::now();
        let o = Command::new(&floor)
            .arg(t.pid())
            .output()
            .expect("run ptrace_floor");
        whole.push(t0.elapsed().as_secs_f64() * 1e3);
        let line = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "ptrace_floor: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        inner.push(
            ["list_ms", "seize_ms", "stop_ms"]
                .iter()
                .map(|k| Target::field(&line, k))
                .sum(),
        );
    }
    drop(t);
    println!(
        "\n| floor measured in this run (median) | ms | issue 5 target (libpulp ÷ 5) ms | floor ÷ target |"
    );
    println!("|---|---|---|---|");
    let row = |what: &str, floor: f64, target: f64| {
        println!("| {what} | {floor:.2} | {target:.2} | {:.1}× |", floor / target);
    };
    let start = med(tr);
    row(
        "start and exit of `/bin/true` (1 thread: apply wall)",
        start,
        5.98 / 5.0,
    );
    row(
        "start and exit of `relive --version` (1 thread: apply wall)",
        med(rv),
        5.98 / 5.0,
    );
    row(
        "ptrace: seize, interrupt, read registers, resume 1,000 blocked threads, inside one process (1,000 blocked: apply wall)",
        med(inner.clone()),
        68.0 / 5.0,
    );
    row(
        "the same, plus that process's start and exit (1,000 blocked: apply wall)",
        med(whole),
        68.0 / 5.0,
    );
    if !control_2_98.is_empty() {
        row(
            "longest gap of a busy thread, 2 busy + 98 napping, relive idle (control) (longest pause)",
            med(control_2_98.to_vec()),
            6.8 / 5.0,
        );
    }
}
