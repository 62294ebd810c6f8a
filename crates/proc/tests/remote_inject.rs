//! Live tests of agent injection (DESIGN §4.6, REMOTE-CALL.md R3) and of the agent's registry and
//! channel (DESIGN §4.7, §4.8), on tests/targets/agent_target.c.

use relive_proc::agent::{self, AgentConn, Ensured};
use relive_proc::remote::{InjectOptions, inject_library};
use relive_testkit::{GuardedChild, compile_c, spawn_guarded};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FLAGS: &[&str] = &["-O2", "-g", "-pthread", "-fcf-protection"];

fn target() -> GuardedChild {
    let exe = compile_c("agent_target", &["agent_target.c"], FLAGS);
    let mut cmd = Command::new(exe);
    cmd.stdin(Stdio::piped());
    spawn_guarded(cmd, "ready", Duration::from_secs(20)).expect("start agent_target")
}

fn send(t: &mut GuardedChild, line: &str) {
    let stdin = t.child_mut().stdin.as_mut().expect("stdin piped");
    writeln!(stdin, "{line}").expect("write to target stdin");
    stdin.flush().unwrap();
}

/// Waits for a line starting with `prefix`.
fn line_with(t: &GuardedChild, prefix: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match t.next_line(left) {
            Some(l) if l.starts_with(prefix) => return l,
            Some(_) => {}
            None => panic!("no line starting with {prefix:?} within {timeout:?}"),
        }
    }
}

fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_string()
}

fn agent_path() -> std::path::PathBuf {
    agent::agent_library_path().expect("librelive_agent.so is built as a dev-dependency")
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// DESIGN §4.6: 100 remote dlopens in a row into a C target with threads blocked in syscalls, one
/// busy and one in malloc in a loop: no deadlock; afterwards every interrupted sleep still takes
/// 2 s and the hijacked thread's vector registers are unchanged; read and cond-wait threads still
/// get their wake-ups.
#[test]
fn serial_t_d4_6_inject_100_times_sleeps_exact_and_simd_intact() {
    let mut t = target();
    let pid = t.pid();
    let path = agent_path();
    // Start right after a fresh 2 s sleep began, so all 100 hijacks land inside one sleep.
    line_with(&t, "simd-sleep", Duration::from_secs(5));
    // Start 600 ms into the sleep: an exact restart keeps 2 s; a re-issued sleep would be ≥ 2.6 s.
    std::thread::sleep(Duration::from_millis(600));
    let mut times = Vec::new();
    let mut frames = 0;
    // The first injection reads the process image; the next 99 reuse one read after it.
    let mut chooser: Option<relive_proc::remote::ThreadChooser> = None;
    for i in 0..100 {
        let r =
            relive_proc::remote::inject_library_with(pid, &path, &InjectOptions::default(), chooser.as_mut())
                .unwrap_or_else(|e| panic!("injection {i} failed: {e}"));
        frames += r.via_frame as u32;
        if chooser.is_none() {
            chooser = Some(relive_proc::remote::ThreadChooser::load(pid).unwrap());
        }
        times.push(r.call.as_secs_f64() * 1e3);
        assert!(t.is_running(), "target died after injection {i}");
    }
    let (med, p99) = (pct(&mut times.clone(), 0.5), pct(&mut times, 0.99));
    eprintln!("injection call time over 100: median {med:.3} ms, p99 {p99:.3} ms; {frames} via frame");
    // No call fell back to its signal frame (that path re-issues the interrupted sleep in full).
    assert_eq!(frames, 0, "the restart-block guard fired: dlopen slept?");
    // The sleeps that were interrupted (and the next ones) take 2 s, not more, not less.
    for _ in 0..2 {
        let l = line_with(&t, "simd-sleep", Duration::from_secs(6));
        let el: f64 = field(&l, "elapsed").parse().unwrap();
        // Upper bound: wake-up latency on a loaded 2-CPU machine (a re-issued sleep is ≥ 2600).
        assert!((1995.0..2590.0).contains(&el), "hijacked sleep took {el} ms: {l}");
        assert_eq!(field(&l, "xmm"), "ok", "{l}");
        assert_eq!(field(&l, "ret"), "0", "{l}");
    }
    let l = line_with(&t, "sleep elapsed", Duration::from_secs(6));
    assert_eq!(field(&l, "ret"), "0", "{l}");
    // Blocked read and cond-wait threads still work.
    send(&mut t, "poke");
    let (mut read, mut woke) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(read && woke) {
        let l = t.next_line(deadline.saturating_duration_since(Instant::now()));
        let l = l.unwrap_or_else(|| panic!("after poke: read {read}, cond woke {woke}"));
        read |= l == "read n=1 got=x";
        woke |= l == "cond woke";
    }
    // The agent answers.
    let loc = agent::find_agent(pid).unwrap();
    let mut c = AgentConn::open(&loc, Duration::from_secs(5)).unwrap();
    assert_eq!(c.ping().unwrap(), relive_abi::AGENT_VERSION);
    assert!(t.is_running());
}

/// ensure_agent: injects once, then finds it; the registry header is filled in (tpoff, fds, tid).
#[test]
fn serial_t_d4_8_ensure_agent_then_registry() {
    let t = target();
    let pid = t.pid();
    let e = agent::ensure_agent(pid, &InjectOptions::default()).unwrap();
    assert!(matches!(e, Ensured::Injected(..)), "{e:?}");
    let e2 = agent::ensure_agent(pid, &InjectOptions::default()).unwrap();
    assert!(matches!(e2, Ensured::Present(..)), "{e2:?}");
    let snap = agent::read_registry(e.location()).unwrap();
    let h = snap.header;
    assert_eq!(h.agent_pid, pid as u32);
    assert!(h.tpoff < 0, "IE TLS offsets are negative on x86-64: {}", h.tpoff);
    assert!(h.tls_image_addr != 0);
    assert!(h.service_tid != 0 && h.service_tid != pid as u32);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{}/comm", h.service_tid)).unwrap();
    assert_eq!(comm.trim(), "relive-agent");
    // The TLS init image holds the slot's initial value (0, IDLE).
    let mut b = [0xffu8; 8];
    agent::read_mem(pid, h.tls_image_addr, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0);
}

/// No thread at a safe point: the error names every thread and what it was doing.
#[test]
fn t_d4_6_no_safe_thread_names_threads() {
    // A target whose only thread spins in user code.
    let exe = compile_c("agent_spin", &["agent_spin.c"], FLAGS);
    let t = relive_testkit::spawn_target(&exe, &[], "ready");
    let opts = InjectOptions {
        timeout: Duration::from_millis(300),
        ..InjectOptions::default()
    };
    let err = inject_library(t.pid(), &agent_path(), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no thread of pid"), "{err}");
    assert!(
        err.contains(&format!("{} (agent_spin", t.pid())) && err.contains("running"),
        "{err}"
    );
}

fn tid_named(pid: i32, name: &str) -> i32 {
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let tid: i32 = e.file_name().to_str().unwrap().parse().unwrap();
        if std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .unwrap()
            .trim()
            == name
        {
            return tid;
        }
    }
    panic!("no thread named {name} in pid {pid}");
}

/// REMOTE-CALL.md R3 on threads blocked in read(2) and in a futex wait (pthread_cond_wait): 10
/// hijacks each, then the read still gets its byte and the condition wait still wakes, exactly
/// once each (no EINTR, no spurious return).
#[test]
fn serial_t_d4_6_hijacked_read_and_futex_restart() {
    let mut t = target();
    let pid = t.pid();
    let path = agent_path();
    for name in ["reader", "waiter"] {
        let tid = tid_named(pid, name);
        for i in 0..10 {
            let opts = InjectOptions {
                only_tids: Some(vec![tid]),
                ..InjectOptions::default()
            };
            let r = inject_library(pid, &path, &opts).unwrap_or_else(|e| panic!("{name} hijack {i}: {e}"));
            assert_eq!(r.tid, tid);
            assert!(!r.via_frame);
        }
    }
    // Nothing was printed by the reader or waiter: their calls did not return early.
    while let Some(l) = t.next_line(Duration::from_millis(200)) {
        assert!(
            !l.starts_with("read") && !l.starts_with("cond"),
            "spurious wake-up: {l}"
        );
    }
    send(&mut t, "poke");
    let (mut read, mut woke) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && (read, woke) != (1, 1) {
        match t.next_line(deadline.saturating_duration_since(Instant::now())) {
            Some(l) if l.starts_with("read") => {
                assert_eq!(l, "read n=1 got=x");
                read += 1;
            }
            Some(l) if l == "cond woke" => woke += 1,
            _ => {}
        }
    }
    assert_eq!((read, woke), (1, 1));
}

/// REMOTE-CALL.md restart-block guard: when the called function sleeps (here a constructor that
/// calls usleep), the hijacked thread's interrupted nanosleep cannot be restarted exactly; the call
/// returns through its signal frame and the sleep is re-issued: it still returns 0 (no EINTR), its
/// xmm registers are intact, and it lasts longer than 2 s instead of being cut short.
#[test]
fn serial_t_d4_6_restart_block_guard_falls_back_to_frame() {
    let t = target();
    let pid = t.pid();
    let lib = compile_c(
        "agent_sleepy_lib.so",
        &["agent_sleepy_lib.c"],
        &["-O2", "-shared", "-fPIC"],
    );
    line_with(&t, "simd-sleep", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    let tid = tid_named(pid, "simd-sleep");
    let opts = InjectOptions {
        only_tids: Some(vec![tid]),
        ..InjectOptions::default()
    };
    let r = inject_library(pid, &lib, &opts).unwrap();
    assert!(r.via_frame, "the guard must fire when the callee sleeps: {r:?}");
    let l = line_with(&t, "simd-sleep", Duration::from_secs(6));
    let el: f64 = field(&l, "elapsed").parse().unwrap();
    assert!(
        el > 2500.0,
        "the re-issued sleep lasts its full 2 s after the hijack: {l}"
    );
    assert_eq!(field(&l, "ret"), "0", "{l}");
    assert_eq!(field(&l, "xmm"), "ok", "{l}");
}
