//! Injection benchmark (issue 4 closing note): `cargo bench -p relive-proc --bench inject`.
//!
//! Prints tables, asserts nothing:
//! - first-time injection of librelive_agent.so into fresh targets (tests/targets/agent_target.c):
//!   whole `inject_library` (image reading, thread choice by unwinding, remote dlopen, restore) and
//!   the remote call alone (seize → release of the hijacked thread);
//! - repeated remote dlopen calls on one target (library already loaded: the hijack's own cost);
//! - baseline in the same run: one thread's stop → regs → resume round trip (relive_proc::stop_thread);
//! - the agent's cost in the target: its static TLS (PT_TLS memsz) and the target's RSS and thread
//!   count before and after injection.

use relive_proc::agent;
use relive_proc::remote::{InjectOptions, inject_library};
use relive_testkit::{GuardedChild, compile_c, spawn_guarded};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (p(0.5), p(0.99), v[v.len() - 1])
}

fn status_kb(pid: i32, key: &str) -> i64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.split_whitespace().next().unwrap().parse().unwrap())
        .unwrap_or(-1)
}

/// Starts a target with a piped stdin (agent_target exits at end of input).
fn spawn_target(exe: &std::path::Path, _args: &[&str], ready: &str) -> GuardedChild {
    let mut cmd = Command::new(exe);
    cmd.stdin(Stdio::piped());
    spawn_guarded(cmd, ready, Duration::from_secs(20)).expect("start agent_target")
}

fn main() {
    let exe = compile_c(
        "agent_target",
        &["agent_target.c"],
        &["-O2", "-g", "-pthread", "-fcf-protection"],
    );
    let agent_so =
        agent::agent_library_path().expect("build relive-agent first (cargo build -p relive-agent)");
    let opts = InjectOptions::default();

    // Fresh targets.
    let n = 30;
    let (mut whole, mut call, mut stopped, mut rss, mut thr) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let t = spawn_target(&exe, &[], "ready");
        let pid = t.pid();
        std::thread::sleep(Duration::from_millis(20));
        let (rss0, thr0) = (status_kb(pid, "VmRSS:"), status_kb(pid, "Threads:"));
        let r = inject_library(pid, &agent_so, &opts).expect("inject");
        let loc = agent::find_agent(pid).unwrap();
        agent::wait_ready(&loc, Duration::from_secs(5)).unwrap();
        whole.push(r.elapsed.as_secs_f64() * 1e3);
        call.push(r.call.as_secs_f64() * 1e3);
        stopped.push(r.stopped.as_secs_f64() * 1e3);
        rss.push((status_kb(pid, "VmRSS:") - rss0) as f64);
        thr.push((status_kb(pid, "Threads:") - thr0) as f64);
    }
    // Repeated calls on one target, and the stop/resume baseline on the same thread.
    let t = spawn_target(&exe, &[], "ready");
    let pid = t.pid();
    inject_library(pid, &agent_so, &opts).unwrap();
    let (mut again, mut again_stopped, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let mut tid = 0;
    for _ in 0..100 {
        let r = inject_library(pid, &agent_so, &opts).unwrap();
        again.push(r.call.as_secs_f64() * 1e3);
        again_stopped.push(r.stopped.as_secs_f64() * 1e3);
        tid = r.tid;
    }
    for _ in 0..100 {
        let s = Instant::now();
        let th = relive_proc::stop_thread(pid, tid).unwrap();
        let _ = th.regs().unwrap();
        th.resume().unwrap();
        base.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let (bm, bp, _) = stats(&mut base);
    println!(
        "injection of {} ({} runs on fresh agent_target processes, 100 on one)",
        agent_so.display(),
        n
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>12}",
        "measure", "median ms", "p99 ms", "max ms", "median/base"
    );
    for (name, v) in [
        ("inject_library, first time (whole)", &mut whole),
        ("remote dlopen call, first time", &mut call),
        ("hijacked thread stopped, first time", &mut stopped),
        ("remote dlopen call, already loaded", &mut again),
        ("hijacked thread stopped, already loaded", &mut again_stopped),
    ] {
        let (m, p, x) = stats(v);
        println!("{name:<44} {m:>10.3} {p:>10.3} {x:>10.3} {:>12.1}", m / bm);
    }
    println!(
        "{:<44} {bm:>10.3} {bp:>10.3} {:>10} {:>12}",
        "baseline: stop + regs + resume one thread", "", "1.0"
    );
    let data = std::fs::read(&agent_so).unwrap();
    // PT_TLS memsz from the program headers (ELF64 little-endian).
    let u16_at = |o: usize| u16::from_le_bytes(data[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    let tls = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&o| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) == 7)
        .map_or(0, |o| u64_at(o + 0x28));
    let (rm, rp, _) = stats(&mut rss);
    let (tm, _, _) = stats(&mut thr);
    println!();
    println!("agent cost in the target");
    println!("  static TLS (PT_TLS memsz, from glibc's ~1.5 KiB dlopen reserve): {tls} bytes per thread");
    println!("  RSS growth on injection: median {rm:.0} KiB, p99 {rp:.0} KiB");
    println!("  threads added: {tm:.0} (the service thread)");
}
