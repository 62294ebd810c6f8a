//! Live tests of relive-proc (DESIGN §4.1, §4.3; issue 3) against C targets compiled at test time.

use relive_proc::{
    ImageOptions, ProcError, ProcessImage, list_threads, read_memory, stop_all, stop_thread, thread_info,
    write_code, write_data,
};
use relive_testkit::{compile_c, spawn_target};
use std::time::{Duration, Instant};

const FLAGS: &[&str] = &["-O2", "-fomit-frame-pointer", "-pthread"];

fn state(pid: i32, tid: i32) -> char {
    thread_info(pid, tid).map(|i| i.state).unwrap_or('?')
}

fn wait_state(pid: i32, tids: &[i32], ok: impl Fn(char) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tids.iter().all(|&t| ok(state(pid, t))) {
        assert!(
            Instant::now() < deadline,
            "threads of {pid} never reached the expected state"
        );
        std::thread::yield_now();
    }
}

/// DESIGN §4.1: stop-all seizes every thread (re-listing until none is new) and resumes all.
#[test]
fn serial_t_d41_stop_all_then_resume_all() {
    let exe = compile_c("stacks_many", &["stacks_many.c"], FLAGS);
    let target = spawn_target(&exe, &["300", "3"], "ready");
    let pid = target.pid();
    let tids = list_threads(pid).unwrap();
    assert_eq!(tids.len(), 301);
    wait_state(pid, &tids[1..], |s| s == 'S');
    let stopped = stop_all(pid).unwrap();
    assert_eq!(stopped.threads.len(), 301);
    for &t in &tids {
        assert_eq!(state(pid, t), 't', "thread {t} not in tracing stop");
        assert!(stopped.thread(t).is_some());
    }
    let fs: std::collections::HashSet<u64> = stopped
        .threads
        .iter()
        .map(|t| t.regs().unwrap().fs_base)
        .collect();
    assert_eq!(fs.len(), 301, "every thread has its own fs_base (TLS)");
    assert!(!fs.contains(&0));
    // Every stopped thread unwinds to a root (stop → unwind → decide → resume, DESIGN §4.5).
    let image = relive_proc::ProcessImage::load(pid, &ImageOptions::default()).unwrap();
    let mut unwinder = image.unwinder();
    for t in &stopped.threads {
        let (regs, stack) = relive_proc::unwind_stopped(t, &mut unwinder, 100).unwrap();
        assert!(stack.verdict.is_reliable(), "thread {}: {stack:?}", t.tid());
        assert_eq!(stack.frames[0].pc, regs.rip);
    }
    stopped.resume().unwrap();
    wait_state(pid, &tids, |s| s == 'S');
}

/// DESIGN §4.1: a thread stopped and resumed over and over while real-time signals arrive loses
/// none of them (they are re-injected, or delivered after the detach).
#[test]
fn serial_t_d41_signals_are_not_lost_while_stopping() {
    let exe = compile_c("stacks_signals", &["stacks_signals.c"], FLAGS);
    let target = spawn_target(&exe, &[], "ready");
    let pid = target.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    let victim = loop {
        if let Some(t) = list_threads(pid)
            .unwrap()
            .into_iter()
            .find(|&t| thread_info(pid, t).unwrap().name == "victim")
        {
            break t;
        }
        assert!(Instant::now() < deadline);
        std::thread::yield_now();
    };
    const N: usize = 300;
    let sender = std::thread::spawn(move || {
        for _ in 0..N {
            let r = tgkill(pid, victim, libc::SIGRTMIN());
            assert_eq!(r, 0);
            std::thread::yield_now();
        }
    });
    let mut stops = 0;
    while !sender.is_finished() || stops < 200 {
        let t = stop_thread(pid, victim).unwrap();
        assert!(t.regs().unwrap().fs_base != 0);
        t.resume().unwrap();
        stops += 1;
    }
    sender.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tgkill(pid, pid, libc::SIGUSR2);
        if let Some(line) = target.next_line(Duration::from_millis(200))
            && line == format!("count {N}")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the victim did not receive all {N} signals"
        );
    }
}

fn tgkill(pid: i32, tid: i32, sig: i32) -> i32 {
    // SAFETY: tgkill takes three integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) as i32 }
}

/// DESIGN §4.3: code is written through /proc/PID/mem (read-only text, no mprotect); a data write
/// (process_vm_writev) to the same text fails with a memory error naming the address.
#[test]
fn t_d43_write_code_into_readonly_text() {
    let exe = compile_c(
        "stacks_tu_nopie",
        &["stacks_tu1.c", "stacks_tu2.c"],
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fno-pie",
            "-no-pie",
            "-fcf-protection=full",
            "-pthread",
        ],
    );
    let target = spawn_target(&exe, &[], "ready");
    let pid = target.pid();
    let image = ProcessImage::load(pid, &ImageOptions::default()).unwrap();
    let name = exe.file_name().unwrap().to_str().unwrap();
    // tu2_start ran once at startup and never runs again.
    let (addr, sym) = image.resolve(name, "tu2_start", 0).unwrap();
    assert!(sym.size >= 8);
    let mut orig = [0u8; 8];
    read_memory(pid, addr.0, &mut orig).unwrap();
    let patch = [0xcc, 0x90, 0x90, 0xcc, 0x0f, 0x0b, 0x90, 0xcc];
    let e = write_data(pid, addr.0, &patch).unwrap_err();
    assert!(matches!(e, ProcError::Memory { .. }), "{e}");
    assert!(e.to_string().contains(&format!("{:#x}", addr.0)), "{e}");
    write_code(pid, addr.0, &patch).unwrap();
    let mut back = [0u8; 8];
    read_memory(pid, addr.0, &mut back).unwrap();
    assert_eq!(back, patch);
    let t = stop_thread(pid, pid).unwrap();
    relive_proc::write_code_via(&t, addr.0, &orig).unwrap();
    t.poke_bytes(addr.0 + 1, &orig[1..4]).unwrap();
    drop(t);
    read_memory(pid, addr.0, &mut back).unwrap();
    assert_eq!(back, orig);
}

/// DESIGN §4.1: ESRCH means the target died: one error kind naming pid and thread.
#[test]
fn t_d41_target_died_is_one_error_kind() {
    let exe = compile_c("stacks_many", &["stacks_many.c"], FLAGS);
    let mut target = spawn_target(&exe, &["2", "1"], "ready");
    let pid = target.pid();
    let tid = list_threads(pid).unwrap()[1];
    let t = stop_thread(pid, tid).unwrap();
    target.child_mut().kill().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        match t.regs() {
            Err(e) => break e,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "regs of a killed thread kept succeeding"
            ),
        }
        std::thread::yield_now();
    };
    assert!(e.is_target_died(), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("target died") && msg.contains(&tid.to_string()) && msg.contains(&pid.to_string()),
        "{msg}"
    );
    drop(t);
    target.child_mut().wait().unwrap();
    let e = stop_thread(pid, tid).unwrap_err();
    assert!(e.is_target_died(), "{e:?}");
    let e = list_threads(pid).unwrap_err();
    assert!(matches!(e, ProcError::NoSuchProcess { .. }), "{e:?}");
}

/// DESIGN §4.1: stop-all under thread churn (threads created and exiting without pause): every
/// thread that exists while the process is stopped is stopped; nothing is left seized after.
#[test]
fn serial_t_d41_stop_all_under_thread_churn() {
    let exe = compile_c("stacks_churn", &["stacks_churn.c"], FLAGS);
    let target = spawn_target(&exe, &[], "ready");
    let pid = target.pid();
    for _ in 0..20 {
        let stopped = stop_all(pid).unwrap();
        let mut got: Vec<i32> = stopped.threads.iter().map(|t| t.tid()).collect();
        got.sort_unstable();
        // While everything is stopped no thread can appear; threads that were exiting may vanish.
        let now = list_threads(pid).unwrap();
        assert!(
            now.iter().all(|t| got.binary_search(t).is_ok()),
            "unstopped threads: {now:?} vs {got:?}"
        );
        for t in &stopped.threads {
            if let Ok(i) = thread_info(pid, t.tid()) {
                assert!(
                    matches!(i.state, 't' | 'Z' | 'X'),
                    "thread {} in state {}",
                    t.tid(),
                    i.state
                );
            }
        }
        if let Err(e) = stopped.resume() {
            assert!(e.is_target_died(), "{e}");
        }
    }
    // Nobody is left traced: the sleepers and spawners all run on.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tracers: Vec<i32> = list_threads(pid)
            .unwrap()
            .into_iter()
            .filter(|&t| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status"))
                    .map(|s| !s.contains("TracerPid:\t0\n"))
                    .unwrap_or(false)
            })
            .collect();
        if tracers.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "threads still traced: {tracers:?}");
        std::thread::yield_now();
    }
}

/// DESIGN §6 replay tier: a snapshot (registers, the pages the unwind read, modules by build-id)
/// unwinds offline, after the process is gone, to exactly the live stacks; it survives JSON.
#[test]
fn t_replay_of_a_captured_snapshot() {
    let exe = compile_c(
        "stacks_threads_nopie_g",
        &["stacks_threads.c"],
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fno-pie",
            "-no-pie",
            "-g",
            "-pthread",
        ],
    );
    let target = spawn_target(&exe, &["blocked-only"], "ready");
    let pid = target.pid();
    let tids = list_threads(pid).unwrap();
    wait_state(pid, &tids, |s| s == 'S');
    let image = ProcessImage::load(pid, &ImageOptions::default()).unwrap();
    let mut unwinder = image.unwinder();
    let (snap, live) = relive_proc::snapshot::capture(&image, &mut unwinder, &tids, 100).unwrap();
    assert_eq!(live.len(), tids.len());
    assert!(
        live.iter().filter(|s| s.verdict.is_reliable()).count() >= tids.len() - 1,
        "{live:?}"
    );
    drop(target);
    let json = serde_json::to_string(&snap).unwrap();
    let back: relive_proc::snapshot::Snapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);
    let mut offline = back.unwinder(|m| std::fs::read(&m.path).ok()).unwrap();
    let replayed = back.replay(&mut offline);
    assert_eq!(replayed, live);
}

/// The switching loop's single steps (`stop_each` with `Then::Step`): each step runs one instruction and
/// hands the same thread back, stopped; the step's own SIGTRAP is never delivered (this target has no agent
/// and no SIGTRAP handler, so a delivered one would kill it), and the thread runs on afterwards.
#[test]
fn serial_t_stop_each_single_steps_and_hands_the_thread_back() {
    use relive_proc::ptrace::{Then, stop_each};
    let exe = compile_c("agent_spin", &["agent_spin.c"], FLAGS);
    let mut t = spawn_target(&exe, &[], "ready");
    let pid = t.pid();
    let mut pcs = vec![];
    let gone = stop_each(pid, &[pid], |th, waited| {
        assert!(waited < Duration::from_secs(10));
        pcs.push(th.regs()?.rip);
        if pcs.len() <= 5 {
            Ok(Then::Step(th))
        } else {
            th.resume()?;
            Ok(Then::Done)
        }
    })
    .unwrap();
    assert!(gone.is_empty());
    assert_eq!(pcs.len(), 6, "handed back after every step: {pcs:x?}");
    assert!(
        pcs.windows(2).all(|w| w[0] != w[1]),
        "every step ran one instruction of the spin loop: {pcs:x?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        t.child_mut().try_wait().unwrap().is_none(),
        "pid {pid} died after the steps"
    );
    wait_state(pid, &[pid], |s| s == 'R');
}
