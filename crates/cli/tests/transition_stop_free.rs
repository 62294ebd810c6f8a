//! Issue 5, "the entries are written … For entries whose overwritten bytes are a single instruction, the
//! stop-free int3 protocol of PAUSE-FREE.md may replace the stop-all": live tests of that path on the
//! consistency oracle built with -DHOTPATCH (f and g start with the 8-byte hot-patch prologue, one
//! instruction under the entry jump).

mod transition_common;
use transition_common::*;

fn hotpatch_oracle(args: &[&str]) -> Target {
    let flags = [TARGET_FLAGS, &["-DHOTPATCH"]].concat();
    oracle_with(&flags, args)
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(o)))
}

/// Asserts that `o`, a `--json` report, lists entry-write windows and that all were written in `mode`
/// (`"int3"` or `"stop-all"`); `what` says which command, for the failure message.
fn expect_windows(o: &std::process::Output, mode: &str, what: &str) -> serde_json::Value {
    let j = json(o);
    let m = modes(&j);
    assert!(
        !m.is_empty() && m.iter().all(|m| m == mode),
        "{what}: windows {m:?}, expected all {mode}\n{}",
        text(o)
    );
    j
}

/// The modes of the entry-write windows a `--json` report lists.
fn modes(j: &serde_json::Value) -> Vec<String> {
    j["windows"]
        .as_array()
        .unwrap_or_else(|| panic!("no windows in {j}"))
        .iter()
        .map(|w| {
            if w["mode"] == "int3" {
                assert_eq!(w["threads"], 0, "an int3 window stopped threads: {j}");
            }
            w["mode"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Issue 5 tests 1 and 10 on the stop-free path (SPEC C5, C5a; PAUSE-FREE.md §2): 100 apply/disable cycles
/// under load, with a SIGUSR1 handler calling f on the workers at random points, and every entry written
/// without stopping any thread (install and completion, both directions). Every thread reaches the new code,
/// the mix count stays zero, nothing crashes, and the handler's int3 redirection was exercised.
#[test]
fn serial_t_issue5_stop_free_entry_writes_oracle_100_cycles_with_signals() {
    let mut t = hotpatch_oracle(&["--duty", "200", "--signals"]);
    let pid = t.pid().to_string();
    let a = patch("hp", &["VERSION=2"]);
    let a = a.to_str().unwrap();
    let cycles: u32 = env_count("RELIVE_ORACLE_CYCLES", 100);
    let mut hits = 0;
    for i in 0..cycles {
        for (args, version) in [
            (vec!["--json", "-v", "apply", &pid, a], 2),
            (vec!["--json", "-v", "disable", &pid, "hp"], 1),
        ] {
            let j = expect_windows(&ok(&args), "int3", &format!("cycle {i}: {args:?}"));
            hits += j["windows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["int3_hits"].as_u64().unwrap())
                .sum::<u64>();
            let s = t.wait_workers(version);
            assert_eq!(num(&s, "mix"), 0, "cycle {i}: mix after {args:?}: {s:?}");
            assert!(t.alive(), "the target died in cycle {i}");
        }
    }
    let s = t.stats();
    assert_eq!(num(&s, "mix"), 0);
    assert!(num(&s, "sig") > 0, "the signal handler never ran: {s:?}");
    eprintln!("int3 hits over {cycles} cycles: {hits}");
}

/// PAUSE-FREE.md §4: a thread that blocks SIGTRAP past the agent's interposed sigprocmask (a raw syscall)
/// would be killed by an int3. The agent refuses the stop-free write, and relive writes the same entries
/// under a stop-all instead: the patch applies and reverts, correctly.
#[test]
fn serial_t_issue5_stop_free_refused_when_a_thread_blocks_sigtrap_falls_back_to_stop_all() {
    let mut t = hotpatch_oracle(&["--duty", "200", "--block-trap"]);
    let pid = t.pid().to_string();
    let a = patch("hpb", &["VERSION=2"]);
    let o = ok(&["--json", "-v", "apply", &pid, a.to_str().unwrap()]);
    expect_windows(&o, "stop-all", "apply");
    assert!(
        text(&o).contains("SIGTRAP"),
        "the reason is not reported: {}",
        text(&o)
    );
    let s = t.wait_workers(2);
    assert_eq!(num(&s, "mix"), 0, "{s:?}");
    let o = ok(&["--json", "disable", &pid, "hpb"]);
    assert!(modes(&json(&o)).iter().all(|m| m == "stop-all"));
    let s = t.wait_workers(1);
    assert_eq!(num(&s, "mix"), 0, "{s:?}");
    assert!(t.alive());
}

/// `RELIVE_ENTRY_WRITES=stop-all` turns the stop-free path off (documented in docs/FAQ.md).
#[test]
fn serial_t_issue5_stop_free_can_be_turned_off() {
    let mut t = hotpatch_oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let a = patch("hpo", &["VERSION=2"]);
    let env = [("RELIVE_ENTRY_WRITES", "stop-all")];
    let o = relive_env(&["--json", "apply", &pid, a.to_str().unwrap()], &env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    expect_windows(&o, "stop-all", "apply with RELIVE_ENTRY_WRITES=stop-all");
    t.wait_workers(2);
    let o = ok(&["--json", "disable", &pid, "hpo"]);
    assert!(modes(&json(&o)).iter().all(|m| m == "int3"), "{}", text(&o));
    let s = t.wait_workers(1);
    assert_eq!(num(&s, "mix"), 0, "{s:?}");
}

/// A thread waiting in `sigsuspend` with every signal but one blocked (a daemon's usual main loop) would block
/// SIGTRAP for as long as it waits, and the agent would refuse every stop-free write. The agent's interposed
/// `sigsuspend` (also `pselect`, `ppoll`, `epoll_pwait`, `epoll_pwait2`) keeps SIGTRAP out of that
/// temporary mask, so the entries are still written without a stop.
#[test]
fn serial_t_issue5_stop_free_with_a_thread_in_sigsuspend_blocking_everything_else() {
    let mut t = hotpatch_oracle(&["--duty", "200", "--suspend"]);
    let pid = t.pid().to_string();
    let a = patch("hps", &["VERSION=2"]);
    let o = ok(&["--json", "-v", "apply", &pid, a.to_str().unwrap()]);
    expect_windows(&o, "int3", "apply");
    let s = t.wait_workers(2);
    assert_eq!(num(&s, "mix"), 0, "{s:?}");
    let o = ok(&["--json", "disable", &pid, "hps"]);
    assert!(modes(&json(&o)).iter().all(|m| m == "int3"), "{}", text(&o));
    let s = t.wait_workers(1);
    assert_eq!(num(&s, "mix"), 0, "{s:?}");
    assert!(t.alive());
}

/// The agent's service thread, from `relive status --json`.
fn service_tid(pid: &str) -> u64 {
    let st = ok(&["--json", "status", pid]);
    json(&st)["agent"]["service_tid"].as_u64().unwrap()
}

/// Field 41 of a thread's stat: its scheduling policy (0 = SCHED_OTHER, 1 = SCHED_FIFO).
fn policy_of(pid: &str, tid: u64) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(41 - 3).unwrap().to_string()
}

/// docs/FAQ.md "Why does relive run at a real-time priority?": during a transition command the agent's
/// service thread runs at SCHED_FIFO 1 (when relive may), and it is back at SCHED_OTHER once the command
/// ends, whether it succeeded or was refused.
#[test]
fn serial_t_issue5_agent_service_thread_is_back_at_sched_other_after_a_command() {
    let mut t = hotpatch_oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let tid = service_tid(&pid);
    let policy = || policy_of(&pid, tid);
    assert_eq!(policy(), "0");
    let a = patch("hpsched", &["VERSION=2"]);
    ok(&["apply", &pid, a.to_str().unwrap()]);
    assert_eq!(policy(), "0", "after apply");
    t.wait_workers(2);
    // Refused (a second patch of the same functions, without stacking: SPEC K5): the session still ends
    // cleanly.
    let c = patch("hpsched_c", &["VERSION=3"]);
    let o = relive(&["apply", &pid, c.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(policy(), "0", "after a refused apply");
    ok(&["disable", &pid, "hpsched"]);
    assert_eq!(policy(), "0", "after disable");
    t.wait_workers(1);
}

/// docs/FAQ.md "Why does relive run at a real-time priority?": a relive killed in the middle of a command
/// cannot give the agent's service thread its own policy back, so the agent does it itself once it has
/// been idle for half a second with no live process holding its controller lock.
#[test]
fn serial_t_issue5_agent_drops_the_boost_of_a_killed_controller() {
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut t = oracle(&["--stall", "--duty", "200"]);
    let pid = t.pid().to_string();
    let tid = service_tid(&pid);
    assert_eq!(policy_of(&pid, tid), "0");
    // A thread sleeps inside the patched `held`: the apply waits for it, boosted, until it is killed.
    let s = patch("orphan", &["VERSION=2", "STALL=1"]);
    let mut c = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_relive"))
            .args(["apply", &pid, s.to_str().unwrap(), "--timeout", "60"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run relive"),
    );
    let until = |what: &str, want: &str, within: std::time::Duration| {
        let deadline = std::time::Instant::now() + within;
        while policy_of(&pid, tid) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: policy still {}",
                policy_of(&pid, tid)
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    until(
        "the apply never boosted the service thread",
        "1",
        std::time::Duration::from_secs(20),
    );
    // Kill it once only the thread in `held` is left to switch: the command is waiting for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let st = json(&ok(&["--json", "status", &pid]));
        let tr = &st["agent"]["transition"];
        if tr["patch"] == "orphan" && tr["pending"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the transition never got down to the holder: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        policy_of(&pid, tid),
        "1",
        "the service thread is boosted while the apply waits"
    );
    c.0.kill().unwrap();
    c.0.wait().unwrap();
    let killed = std::time::Instant::now();
    until(
        "the agent kept the boost of a dead controller",
        "0",
        std::time::Duration::from_secs(5),
    );
    eprintln!("policy back {:?} after the kill", killed.elapsed());
    // The next command finds the transition the killed one left and reverses it.
    ok(&["disable", &pid, "orphan"]);
    assert_eq!(policy_of(&pid, tid), "0", "after the disable");
    let st = t.wait_workers(1);
    assert_eq!(num(&st, "mix"), 0, "{st:?}");
}

/// An agent preloaded under another file name (a package may install it so) is the agent: apply finds it
/// by its exported registry instead of injecting a second copy (which then failed with "mapped but its
/// constructor has not run yet"), and the agent knows it was preloaded, so entries are written stop-free.
#[test]
fn serial_t_issue5_an_agent_preloaded_under_another_name_is_found() {
    let dir = std::env::temp_dir().join(format!("relive-renamed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let renamed = dir.join("agent.so");
    std::fs::copy(agent(), &renamed).unwrap();
    let exe = relive_testkit::compile_c(
        "transition_oracle",
        &["transition_oracle.c"],
        &[TARGET_FLAGS, &["-DHOTPATCH"]].concat(),
    );
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--duty", "200"])
        .env("LD_PRELOAD", &renamed)
        .stdin(std::process::Stdio::piped());
    let child = relive_testkit::spawn_guarded(cmd, "oracle ready", std::time::Duration::from_secs(20))
        .expect("start the oracle");
    let mut t = Target { child, seen: vec![] };
    let pid = t.pid().to_string();
    let st = json(&ok(&["--json", "status", &pid]));
    assert_eq!(st["agent"]["preloaded"], true, "{st}");
    // `relive status` without a pid lists it too.
    let all = json(&ok(&["--json", "status"]));
    assert!(
        all["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"].as_i64() == Some(t.pid() as i64)),
        "{all}"
    );
    let a = patch("renamed", &["VERSION=2"]);
    let o = ok(&["--json", "apply", &pid, a.to_str().unwrap()]);
    let j = expect_windows(&o, "int3", "apply");
    assert_eq!(j["agent_injected"], false, "{j}");
    let agents: std::collections::BTreeSet<String> = t
        .maps()
        .lines()
        .filter(|l| l.contains("agent"))
        .filter_map(|l| l.split_whitespace().nth(5).map(String::from))
        .collect();
    assert_eq!(agents.len(), 1, "one agent library mapped: {agents:?}");
    assert_eq!(num(&t.wait_workers(2), "mix"), 0);
    ok(&["disable", &pid, "renamed"]);
    t.wait_workers(1);
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}
