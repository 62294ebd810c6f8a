//! Live tests of stop-free entry writes (issue 5, PAUSE-FREE.md §2/§4): the agent's PokeText and
//! StopFreeStatus through `AgentConn`, on tests/targets/int3_hammer.c preloaded with the agent.
//!
//! `f` starts with one 5-byte NOP and is called by hammer threads and by a SIGUSR1 timer handler while
//! the agent rewrites it to `jmp f_new` and back with the int3 protocol; the target counts every result
//! that is neither the old nor the new one (BAD).

use relive_abi::proto::PokeSite;
use relive_proc::agent::{self, AgentConn, PokeReport};
use relive_testkit::{GuardedChild, compile_c, spawn_guarded};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FLAGS: &[&str] = &["-O2", "-g", "-pthread", "-Wall", "-Wextra", "-Werror"];
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const LINE: Duration = Duration::from_secs(20);

fn agent_so() -> std::path::PathBuf {
    agent::agent_library_path().expect("librelive_agent.so is built as a dev-dependency")
}

struct Hammer {
    child: GuardedChild,
    f: u64,
    f_new: u64,
}

/// Starts int3_hammer with `args`, the agent preloaded (or not).
fn hammer(args: &[&str], preload: bool) -> Hammer {
    let exe = compile_c("int3_hammer", &["int3_hammer.c"], FLAGS);
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::piped());
    if preload {
        cmd.env("LD_PRELOAD", agent_so());
    } else {
        cmd.env_remove("LD_PRELOAD");
    }
    let child = spawn_guarded(cmd, "ready", relive_testkit::READY_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let l = line_with(&child, "addrs");
    Hammer {
        f: hex_field(&l, "f"),
        f_new: hex_field(&l, "f_new"),
        child,
    }
}

fn line_with(t: &GuardedChild, prefix: &str) -> String {
    let deadline = Instant::now() + LINE;
    loop {
        match t.next_line(deadline.saturating_duration_since(Instant::now())) {
            Some(l) if l.starts_with(prefix) => return l,
            Some(_) => {}
            None => panic!(
                "pid {}: no line starting with {prefix:?} within {LINE:?}",
                t.pid()
            ),
        }
    }
}

fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_string()
}

fn hex_field(line: &str, key: &str) -> u64 {
    let v = field(line, key);
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or_else(|e| panic!("{key} in {line:?}: {e}"))
}

fn send(t: &mut GuardedChild, cmd: &str) {
    let stdin = t.child_mut().stdin.as_mut().expect("stdin piped");
    writeln!(stdin, "{cmd}").expect("write to the target's stdin");
    stdin.flush().unwrap();
}

#[derive(Debug)]
struct Stats {
    calls: u64,
    bad: u64,
    usr1calls: u64,
    chained: u64,
}

fn stats(h: &mut Hammer) -> Stats {
    send(&mut h.child, "stats");
    let l = line_with(&h.child, "stats");
    let n = |k: &str| field(&l, k).parse::<u64>().unwrap();
    Stats {
        calls: n("calls"),
        bad: n("bad"),
        usr1calls: n("usr1calls"),
        chained: n("chained"),
    }
}

fn conn(pid: i32) -> AgentConn {
    let loc = agent::find_agent(pid).unwrap();
    AgentConn::open(&loc, Duration::from_secs(10)).unwrap()
}

fn jmp(from: u64, to: u64) -> Vec<u8> {
    let rel = (to as i64 - (from as i64 + 5)) as i32;
    let mut b = vec![0xe9];
    b.extend_from_slice(&rel.to_le_bytes());
    b
}

fn read5(pid: i32, addr: u64) -> [u8; 5] {
    let mut b = [0u8; 5];
    agent::read_mem(pid, addr, &mut b).unwrap();
    b
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The write of f's NOP into `jmp f_new` (the handler sends a trapping thread to f_new).
fn to_new(h: &Hammer) -> PokeSite {
    PokeSite {
        addr: h.f,
        bytes: jmp(h.f, h.f_new),
        expect: NOP5.to_vec(),
        dest: h.f_new,
    }
}

/// `n` cycles of f → `jmp f_new` (dest f_new) → the NOP back (dest f+5, what the NOP does).
fn cycles(h: &mut Hammer, c: &mut AgentConn, n: usize) -> Vec<PokeReport> {
    let (f, f_new) = (h.f, h.f_new);
    let to_new = to_new(h);
    let back = PokeSite {
        addr: f,
        bytes: NOP5.to_vec(),
        expect: jmp(f, f_new),
        dest: f + 5,
    };
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        for s in [&to_new, &back] {
            let r = c.poke_text(std::slice::from_ref(s)).unwrap_or_else(|e| {
                let st = h.child.child_mut().try_wait();
                panic!("cycle {i}: {e} (target: {st:?})")
            });
            assert_eq!(r.sites_written, 1, "cycle {i}: {r:?}");
            out.push(r);
        }
        assert!(h.child.is_running(), "the target died at cycle {i}");
    }
    assert_eq!(read5(h.child.pid(), f), NOP5);
    out
}

fn report(what: &str, r: &[PokeReport]) -> u64 {
    let hits: u64 = r.iter().map(|r| r.hits).sum();
    let mut w: Vec<u64> = r.iter().map(|r| r.window_ns).collect();
    let mut hs: Vec<u64> = r.iter().map(|r| r.hits).collect();
    let max_w = *w.iter().max().unwrap();
    eprintln!(
        "{what}: {} writes, {hits} int3 hits (median {} per write), window median {} µs, max {} µs",
        r.len(),
        median(&mut hs),
        median(&mut w) / 1000,
        max_w / 1000
    );
    hits
}

/// PAUSE-FREE.md §2: 2,000 cycles (4,000 stop-free writes) under 4 hammer threads and a 200 µs SIGUSR1
/// timer whose handler calls f: the process lives, every result is the old or the new one, threads did
/// run into the int3 and were sent on by the handler.
#[test]
fn serial_t_int3_2000_cycles_under_hammer() {
    let mut h = hammer(&["4"], true);
    let mut c = conn(h.child.pid());
    assert_eq!(c.stop_free_status().unwrap(), Ok(()));
    let before = stats(&mut h);
    let r = cycles(&mut h, &mut c, 2000);
    let hits = report("2000 cycles, 4 hammers", &r);
    // What the readiness re-check inside each write costs (a round trip plus the /proc/self/task scan).
    let mut rt: Vec<u64> = (0..200)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(c.stop_free_status().unwrap(), Ok(()));
            t.elapsed().as_nanos() as u64
        })
        .collect();
    eprintln!(
        "stop_free_status round trip: median {} µs",
        median(&mut rt) / 1000
    );
    let s = stats(&mut h);
    assert!(h.child.is_running());
    assert_eq!(s.bad, 0, "{s:?}");
    assert!(
        s.calls > before.calls && s.usr1calls > before.usr1calls,
        "{before:?} {s:?}"
    );
    assert!(hits > 0, "no thread ever hit the int3 in 4,000 writes");
}

/// PAUSE-FREE.md §4, R4/R5: hammer threads that block SIGTRAP with pthread_sigmask, and a SIGUSR1
/// handler (calling f) installed with sa_mask = sigfillset, would be killed by the first int3 they hit;
/// the interposed functions strip SIGTRAP, so the status is ready and the hammer survives.
#[test]
fn serial_t_int3_blocked_sigtrap_and_fillset_handler_survive() {
    let mut h = hammer(&["4", "mask", "fillmask"], true);
    let pid = h.child.pid();
    let mut c = conn(pid);
    assert_eq!(c.stop_free_status().unwrap(), Ok(()));
    let r = cycles(&mut h, &mut c, 500);
    report("500 cycles, mask + fillmask", &r);
    let s = stats(&mut h);
    assert!(h.child.is_running());
    assert_eq!(s.bad, 0, "{s:?}");
    assert!(s.usr1calls > 0, "{s:?}");
}

/// PAUSE-FREE.md §4, R6: an application's SIGTRAP handler installed with signal() after the agent is
/// recorded, not installed: site traps stay the agent's (no SIGILL), and a raise(SIGTRAP) reaches it.
#[test]
fn serial_t_int3_app_sigtrap_handler_is_chained() {
    let mut h = hammer(&["4", "apptrap"], true);
    let mut c = conn(h.child.pid());
    assert_eq!(c.stop_free_status().unwrap(), Ok(()));
    let r = cycles(&mut h, &mut c, 300);
    report("300 cycles, app SIGTRAP handler", &r);
    assert_eq!(stats(&mut h).chained, 0, "a site trap went to the application");
    send(&mut h.child, "raise");
    let l = line_with(&h.child, "raised");
    assert_eq!(field(&l, "chained"), "1", "{l}");
    let s = stats(&mut h);
    assert!(h.child.is_running());
    assert_eq!(s.bad, 0, "{s:?}");
}

/// Without an application handler, a SIGTRAP sent by a process still kills the target by SIGTRAP, as
/// without the agent (the handler restores SIG_DFL and re-raises).
#[test]
fn t_int3_kill_trap_still_kills_by_sigtrap() {
    use std::os::unix::process::ExitStatusExt;
    let mut h = hammer(&["1"], true);
    let pid = h.child.pid();
    // SAFETY: kill takes integers only; the pid is our own guarded child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTRAP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = h.child.child_mut().try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "pid {pid} survived SIGTRAP");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(st.signal(), Some(libc::SIGTRAP), "{st:?}");
}

/// A refused PokeText (expect mismatch) writes nothing and names the site and what it holds.
#[test]
fn t_int3_expect_mismatch_leaves_bytes_and_names_site() {
    let h = hammer(&["1"], true);
    let pid = h.child.pid();
    let mut c = conn(pid);
    let e = c
        .poke_text(&[PokeSite {
            addr: h.f,
            bytes: jmp(h.f, h.f_new),
            expect: vec![0x90; 5],
            dest: h.f_new,
        }])
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("{:#x}", h.f)), "{e}");
    assert!(e.contains("0f 1f 44 00 00"), "{e}");
    assert_eq!(read5(pid, h.f), NOP5);
    // Also refused before any write: a batch where only the second site is wrong.
    let e = c
        .poke_text(&[
            to_new(&h),
            PokeSite {
                addr: h.f_new,
                bytes: vec![0x66, 0x90],
                expect: vec![0x90, 0x90],
                dest: h.f_new + 2,
            },
        ])
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("{:#x}", h.f_new)), "{e}");
    assert_eq!(read5(pid, h.f), NOP5);
}

/// A thread that blocks SIGTRAP with the raw syscall (no libc, so no interposition): StopFreeStatus
/// names it, and PokeText refuses without writing.
#[test]
fn t_int3_raw_blocked_sigtrap_is_not_ready() {
    let mut h = hammer(&["1"], true);
    let pid = h.child.pid();
    let mut c = conn(pid);
    assert_eq!(c.stop_free_status().unwrap(), Ok(()));
    send(&mut h.child, "rawblock");
    let tid = field(&line_with(&h.child, "rawblocked"), "tid");
    let reason = c.stop_free_status().unwrap().unwrap_err();
    assert!(
        reason.contains(&format!("thread {tid} ")) && reason.contains("blocks SIGTRAP"),
        "{reason}"
    );
    let e = c.poke_text(&[to_new(&h)]).unwrap_err().to_string();
    assert!(e.contains("blocks SIGTRAP"), "{e}");
    assert_eq!(read5(pid, h.f), NOP5);
}

/// An agent injected instead of preloaded cannot interpose the signal functions: not ready, with the
/// reason, and PokeText refuses.
#[test]
fn serial_t_int3_injected_agent_is_not_ready() {
    let h = hammer(&["0"], false);
    let pid = h.child.pid();
    let e = agent::ensure_agent(pid, &relive_proc::remote::InjectOptions::default()).unwrap();
    assert!(matches!(e, agent::Ensured::Injected(..)), "{e:?}");
    let mut c = AgentConn::open(e.location(), Duration::from_secs(10)).unwrap();
    let reason = c.stop_free_status().unwrap().unwrap_err();
    assert!(reason.contains("not preloaded"), "{reason}");
    let err = c.poke_text(&[to_new(&h)]).unwrap_err().to_string();
    assert!(err.contains("not preloaded"), "{err}");
    assert_eq!(read5(pid, h.f), NOP5);
}

/// A fork child gets its own /proc/self/mem fd and membarrier registration: a write asked of the child's
/// agent changes the child's f, never the parent's (the parent's fd, inherited, names the parent's memory).
#[test]
fn serial_t_int3_fork_child_writes_its_own_memory() {
    let mut h = hammer(&["1"], true);
    let pid = h.child.pid();
    let mut c = conn(pid);
    cycles(&mut h, &mut c, 1); // the parent's agent opens /proc/self/mem and registers membarrier
    send(&mut h.child, "fork");
    let child: i32 = field(&line_with(&h.child, "forked"), "child").parse().unwrap();
    let loc = agent::find_agent(child).unwrap();
    let mut cc = AgentConn::open(&loc, Duration::from_secs(10)).unwrap();
    assert_eq!(cc.stop_free_status().unwrap(), Ok(()));
    let r = cc.poke_text(&[to_new(&h)]).unwrap();
    assert_eq!(r.sites_written, 1);
    assert_eq!(read5(child, h.f).to_vec(), jmp(h.f, h.f_new));
    assert_eq!(read5(pid, h.f), NOP5, "the child's write landed in the parent");
    // SAFETY: kill takes integers; the child is the target's own child (it also dies with it).
    unsafe { libc::kill(child, libc::SIGKILL) };
    let s = stats(&mut h);
    assert_eq!(s.bad, 0, "{s:?}");
}

/// DESIGN §4.8 (a killed controller leaves a target that keeps running): relive's transition driver
/// single-steps threads out of patched functions, and the kernel does not clear EFLAGS.TF when a tracer
/// dies mid-step, so the thread then takes a single-step SIGTRAP nobody asked for. Without an application
/// SIGTRAP handler that would kill the process; the agent's handler drops it. A tracer that exits right
/// after starting a step (tests/targets/stray_step_tracer.c) leaves each hammer thread in that state, 20
/// times over; the target keeps running and computing right.
#[test]
fn serial_t_int3_stray_single_step_trap_of_a_dead_tracer_is_dropped() {
    let mut h = hammer(&["2"], true);
    let pid = h.child.pid();
    let tracer = compile_c("stray_step_tracer", &["stray_step_tracer.c"], FLAGS);
    let before = stats(&mut h);
    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&t| t != pid)
        // relive steps only threads that do not block SIGTRAP (`StoppedThread::sigmask`): a trap with SIGTRAP
        // blocked kills the process whatever its handler (the agent's service thread blocks everything).
        .filter(|&t| {
            let st = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).unwrap_or_default();
            st.lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .is_some_and(|m| m & (1 << (libc::SIGTRAP - 1)) == 0)
        })
        .collect();
    let mut started = 0;
    for _ in 0..20 {
        for &tid in &tids {
            let o = Command::new(&tracer).arg(tid.to_string()).output().unwrap();
            started += o.status.success() as u32;
            assert!(
                h.child.child_mut().try_wait().unwrap().is_none(),
                "pid {pid} died after a tracer left thread {tid} single-stepping: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    assert!(started >= 20, "the tracer started only {started} steps");
    let after = stats(&mut h);
    assert!(
        h.child.child_mut().try_wait().unwrap().is_none(),
        "pid {pid} died"
    );
    assert!(
        after.calls > before.calls,
        "the hammer stopped: {before:?} {after:?}"
    );
    assert_eq!(after.bad, 0, "{after:?}");
}
