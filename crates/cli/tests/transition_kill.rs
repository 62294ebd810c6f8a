//! Issue 5 tests 8 and 10: a controller SIGKILLed at random points of apply and disable (DESIGN §4.8: the
//! registry is written ahead, so the next command finishes the job), and signal handlers that call the patched
//! function at random points, including inside the bytes an entry write replaces (PAUSE-FREE.md §2).

mod transition_common;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use transition_common::*;

/// The version every worker runs once the target settled (all workers agree), and the stats.
fn settled(t: &mut Target) -> (u32, Stats) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = t.stats();
        let ws: Vec<&str> = s["workers"].split(',').collect();
        if ws.iter().all(|w| *w == ws[0]) {
            return (ws[0].parse().unwrap(), s);
        }
        assert!(
            Instant::now() < deadline,
            "workers never agreed on one version: {s:?}"
        );
    }
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

fn timed(args: &[&str]) -> Duration {
    let t0 = Instant::now();
    ok(args);
    t0.elapsed()
}

/// Test 8: 50 trials of SIGKILL at a random point of apply or disable. The target keeps running, the oracle's
/// mix count stays zero, `relive status` shows the state, and `relive transition` finishes the job.
#[test]
fn serial_t_issue5_8_killed_controller_50_trials() {
    killed_controller_trials(oracle(&["--duty", "200"]), "kill");
}

/// Test 8 on the stop-free path: f and g start with the hot-patch prologue, so every entry is written by the
/// agent's int3 protocol. A controller killed during that request leaves a finished write (the agent's
/// service thread completes it), never a site holding an int3.
#[test]
fn serial_t_issue5_8_killed_controller_50_trials_stop_free_entries() {
    let flags = [TARGET_FLAGS, &["-DHOTPATCH"]].concat();
    killed_controller_trials(oracle_with(&flags, &["--duty", "200"]), "killhp");
}

fn killed_controller_trials(mut t: Target, name: &str) {
    let pid = t.pid().to_string();
    let a = patch(name, &["VERSION=2"]);
    let a = a.to_str().unwrap();
    // How long a normal apply and disable take here: the kill points are drawn from that span.
    let span = timed(&["apply", &pid, a]).max(timed(&["disable", &pid, name]));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}, kill points within {span:?}");
    let mut rng = Lcg(seed);
    let trials: u32 = env_count("RELIVE_KILL_TRIALS", 50);
    for trial in 0..trials {
        let (v, _) = settled(&mut t);
        let apply = trial % 2 == 0;
        // Precondition: apply needs the patch inactive, disable needs it active.
        if apply && v == 2 {
            ok(&["disable", &pid, name]);
        } else if !apply && v == 1 {
            ok(&["apply", &pid, a]);
        }
        let _ = settled(&mut t);
        let args: Vec<&str> = if apply {
            vec!["apply", &pid, a]
        } else {
            vec!["disable", &pid, name]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_relive"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let at = Duration::from_micros(rng.next(span.as_micros() as u64 + 1));
        std::thread::sleep(at);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            t.alive(),
            "trial {trial}: the target died after the controller was killed at {at:?}"
        );
        // `relive status` shows where the transition stood.
        let st = relive(&["status", &pid]);
        assert_eq!(st.status.code(), Some(0), "trial {trial}: status: {}", text(&st));
        // The next command finishes the job.
        let o = relive(&["transition", &pid]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "trial {trial} (killed {} at {at:?}): {}",
            args[0],
            text(&o)
        );
        let (v, s) = settled(&mut t);
        assert!(v == 1 || v == 2, "trial {trial}: {s:?}");
        assert_eq!(
            num(&s, "mix"),
            0,
            "trial {trial}: killed {} at {at:?}: {s:?}",
            args[0]
        );
    }
    assert!(t.alive());
}

/// Test 10: SIGUSR1 every 200 µs interrupts the workers at random points (inside f's first bytes too) and the
/// handler calls f; apply/disable cycles never crash the target and never mix versions. A PC saved in a signal
/// frame counts like a live PC in the stop-all check.
#[test]
fn serial_t_issue5_10_signal_handlers_calling_the_patched_function() {
    let mut t = oracle(&["--signals", "--duty", "200"]);
    let pid = t.pid().to_string();
    let a = patch("sig", &["VERSION=2"]);
    let a = a.to_str().unwrap();
    let cycles: u32 = env_count("RELIVE_SIGNAL_CYCLES", 30);
    let sig0 = num(&t.stats(), "sig");
    for i in 0..cycles {
        ok(&["apply", &pid, a]);
        let s = t.wait_workers(2);
        assert_eq!(num(&s, "mix"), 0, "cycle {i}: {s:?}");
        ok(&["disable", &pid, "sig"]);
        let s = t.wait_workers(1);
        assert_eq!(num(&s, "mix"), 0, "cycle {i}: {s:?}");
        assert!(t.alive(), "the target crashed in cycle {i}");
    }
    let s = t.stats();
    assert!(num(&s, "sig") > sig0 + 1000, "signal handlers ran: {s:?}");
}

/// A relive killed while it holds the controller lock, and not yet reaped by its parent (a zombie: kill(pid,
/// 0) still succeeds), holds nothing: the next command takes the lock over, and `status` says so. Found by an
/// operator trial (a shell that `exec`s another program never reaps its background jobs; neither does a
/// container's pid 1 that is not an init).
#[test]
fn serial_t_issue5_8_a_killed_unreaped_controller_does_not_keep_the_lock() {
    let t = oracle(&["--stall", "--duty", "200"]);
    let pid = t.pid().to_string();
    let s = patch("zl", &["VERSION=2", "STALL=1"]);
    let o = relive(&["apply", &pid, s.to_str().unwrap(), "--no-wait"]);
    assert!(o.status.success(), "{}", text(&o));
    // `relive transition` waits on the stalled thread, holding the lock.
    let mut waiter = Command::new(env!("CARGO_BIN_EXE_relive"))
        .args(["transition", &pid, "--timeout", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = relive(&["--json", "status", &pid]);
        let j: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
        if j["agent"]["controller_lock"] == waiter.id() {
            break;
        }
        assert!(Instant::now() < deadline, "the waiter never took the lock: {j}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SIGKILL it and do not reap it yet: it stays a zombie.
    unsafe_free_kill(waiter.id() as i32);
    let stat = format!("/proc/{}/stat", waiter.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read(&stat).is_ok_and(|b| String::from_utf8_lossy(&b).contains(") Z")) {
        assert!(
            Instant::now() < deadline,
            "the killed relive did not become a zombie"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = relive(&["status", &pid]);
    assert!(
        text(&st).contains("has exited; the next command takes it over"),
        "{}",
        text(&st)
    );
    // The next command takes the lock over and reverses the transition (L6).
    let o = relive(&["disable", &pid, "zl"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let _ = waiter.wait();
}

/// SIGKILL by pid through the `kill` command (the tests keep `unsafe` out).
fn unsafe_free_kill(pid: i32) {
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}
