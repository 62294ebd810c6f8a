//! Live tests of the transition driver (issue 5) on the consistency oracle (tests/targets/transition_oracle.c):
//! eight workers call f → g in a loop, two sleepers sit in other functions; each patch's f checks that it
//! reached its own g and counts any mix. Tests that stop every thread are named `serial_`.

mod transition_common;
use transition_common::*;

/// Issue 5 test 1 (SPEC C5, C5a, H3): 100 apply/disable cycles under load; every thread reaches the new
/// code, the mix count stays zero, nothing crashes.
#[test]
fn serial_t_issue5_1_consistency_oracle_100_cycles() {
    let mut t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let a = patch("a", &["VERSION=2"]);
    let a = a.to_str().unwrap();
    let cycles: u32 = env_count("RELIVE_ORACLE_CYCLES", 100);
    for i in 0..cycles {
        ok(&["apply", &pid, a]);
        let s = t.wait_workers(2);
        assert_eq!(num(&s, "mix"), 0, "cycle {i}: mix after apply: {s:?}");
        ok(&["disable", &pid, "a"]);
        let s = t.wait_workers(1);
        assert_eq!(num(&s, "mix"), 0, "cycle {i}: mix after disable: {s:?}");
        assert!(t.alive(), "the target died in cycle {i}");
    }
    let s = t.stats();
    assert_eq!(num(&s, "mix"), 0);
    assert!(num(&s, "v2") > 0 && num(&s, "v1") > 0, "{s:?}");
}

/// SPEC C5a, DESIGN §4.3a/§4.5 (the rare "mix after disable" of the oracle test): a thread stopped at the
/// first instruction of the register-preserving thunk that enters the new f is about to run the new f. Its
/// stack unwinds cleanly through that instruction (the thunk has pushed nothing yet), so unless the thunk
/// counts as f, the unpatching transition switched it: the new f then ran with the old g (a mix), or the
/// thread returned into the thunk page after the patch was unloaded. The target parks a thread there (in a
/// SIGTRAP handler of single-stepping, so the PC is saved in a signal frame, and C5a must read that PC as the
/// next instruction, not as a return address) and holds it: disable must wait for it, naming f, and complete
/// once it has left.
#[test]
fn serial_t_issue5_thread_at_thunk_entry_blocks_unpatching_c5a() {
    let mut t = oracle(&["--park", "--duty", "200"]);
    let pid = t.pid().to_string();
    let a = patch("a", &["VERSION=2"]);
    let a = a.to_str().unwrap();
    ok(&["apply", &pid, a]);
    t.wait_workers(2);
    t.send("park");
    // Where f's entry leads: f's thunk (it calls g through the PLT, so its thunk saves everything). Were
    // there no thunk, this would be the first byte of the new f, which a signal frame holds just the same.
    t.wait_line("parked at ");
    let o = relive(&["--json", "disable", &pid, "a", "--timeout", "2"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "a thread at the thunk entry of f was switched: {}",
        text(&o)
    );
    let j = json(&o);
    assert!(
        j["blockers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["function"] == "f"),
        "{j}"
    );
    t.send("unpark");
    let done = t.wait_line("unparked ");
    assert_eq!(done, "unparked v=2 mix=0", "the parked thread ran a mix");
    ok(&["transition", &pid]);
    let s = t.wait_workers(1);
    assert_eq!(num(&s, "mix"), 0, "{s:?}");
    assert!(t.alive());
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(o)))
}

/// Issue 5 test 2 (T-cb9, SPEC C5 "sleeping on function", L6, C11): a thread sleeps inside a patched function.
/// The transition stalls and names that thread, the function and the frame; `disable` reverses it; `force`
/// completes it instead and the outcome is marked forced.
#[test]
fn serial_t_issue5_2_stall_reverse_and_force_t_cb9() {
    let mut t = oracle(&["--stall", "--duty", "200"]);
    let pid = t.pid().to_string();
    let s = patch("s", &["VERSION=2", "STALL=1"]);
    let s = s.to_str().unwrap();
    let holder = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|tid| {
            let stack = relive(&["stacks", &pid, "--tid", &tid.to_string()]);
            text(&stack).contains("held")
        })
        .expect("a thread sleeping in held");
    // Stall: exit 4 (timeout, still pending), the blocker named with tid, function and frame.
    let o = relive(&["--json", "apply", &pid, s, "--timeout", "2"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let j = json(&o);
    assert_eq!(j["outcome"], "pending", "{j}");
    assert!(
        j["pending"].as_u64().unwrap() >= 1,
        "the held thread is still to switch: {j}"
    );
    let b = j["blockers"].as_array().unwrap();
    let held = b
        .iter()
        .find(|b| b["tid"] == holder)
        .unwrap_or_else(|| panic!("holder {holder} not reported: {j}"));
    assert_eq!(held["function"], "held", "{j}");
    assert!(held["frame"].as_u64().is_some(), "{j}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("thread {holder} is inside held")),
        "{}",
        text(&o)
    );
    // Busy: another apply is refused while the transition is pending (L1 step 10).
    let b2 = patch("b2", &["VERSION=3", "ONLY_F=1"]);
    let o = relive(&["apply", &pid, b2.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    // Reverse (L6): back to the original everywhere.
    ok(&["disable", &pid, "s"]);
    let st = t.wait_workers(1);
    assert_eq!(num(&st, "mix"), 0);
    assert!(!t.maps().contains(s), "the reversed patch's library stays mapped");
    // Force (C11) instead.
    let o = relive(&["apply", &pid, s, "--no-wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = relive(&["--json", "force", &pid]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    assert_eq!(j["outcome"], "completed", "{j}");
    assert_eq!(j["forced"], true, "{j}");
    // C11 (5.18): a forced patching transition without replace marks no patch forced; the report says so.
    assert_eq!(j["forced_patches"], serde_json::json!([]), "{j}");
    // The forced threads are named, on stderr and in the JSON: the holder is among them.
    assert!(
        j["forced_tids"].as_array().unwrap().iter().any(|t| *t == holder),
        "{j}"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("without a stack check (C11)"),
        "{}",
        text(&o)
    );
    let st = relive(&["--json", "status", &pid]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(
        st.to_string().contains("\"forced\":false") && !st.to_string().contains("\"forced\":true"),
        "{st}"
    );
    let st = t.wait_workers(2);
    assert_eq!(num(&st, "mix"), 0);
    assert!(t.alive());
}

/// Issue 5 test 3 (SPEC R1–R4, R6): apply A, then B with replace: only B stays active, A's library leaves the
/// process, and A's callbacks do not run.
#[test]
fn serial_t_issue5_3_replace_drops_a_without_its_callbacks() {
    let mut t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let a = patch("ra", &["VERSION=2", "CALLBACKS=1"]);
    let b = patch("rb", &["VERSION=3", "REPLACE=1", "CALLBACKS=1"]);
    ok(&["apply", &pid, a.to_str().unwrap()]);
    t.wait_workers(2);
    // check and apply say what a replace patch does to the active ones (R1).
    let o = relive(&["check", &pid, b.to_str().unwrap()]);
    assert!(
        text(&o).contains("disables patch ra") && text(&o).contains("carries every function they patch"),
        "{}",
        text(&o)
    );
    let only_f = patch("rc", &["VERSION=3", "REPLACE=1", "ONLY_F=1"]);
    let o = relive(&["check", &pid, only_f.to_str().unwrap()]);
    assert!(
        text(&o).contains("the function it does not carry goes back to the original code")
            && text(&o).contains(":g"),
        "{}",
        text(&o)
    );
    let o = relive(&["--json", "apply", &pid, b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["replaced"], serde_json::json!(["ra"]), "{j}");
    assert_eq!(j["reverted"], serde_json::json!([]), "{j}");
    let st = t.wait_workers(3);
    assert_eq!(num(&st, "mix"), 0);
    assert!(
        !t.maps().contains(a.to_str().unwrap()),
        "A's library is still mapped after the replace"
    );
    assert!(t.maps().contains(b.to_str().unwrap()));
    let cbs = t.callbacks();
    assert_eq!(
        cbs,
        [
            "callback ra pre_patch",
            "callback ra post_patch",
            "callback rb pre_patch",
            "callback rb post_patch"
        ],
        "A's callbacks must not run on replace (R4.1)"
    );
    // Only B is active: A cannot be disabled any more (refused), B can.
    let o = relive(&["disable", &pid, "ra"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    ok(&["disable", &pid, "rb"]);
    t.wait_workers(1);
}

/// Issue 5 test 4 (SPEC K5): A active, then C (non-replace, same function) is refused, and the target's text and
/// memory map are byte-for-byte unchanged.
#[test]
fn serial_t_issue5_4_conflict_refused_target_unchanged_k5() {
    let mut t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let a = patch("ka", &["VERSION=2"]);
    let c = patch("kc", &["VERSION=4"]);
    ok(&["apply", &pid, a.to_str().unwrap()]);
    t.wait_workers(2);
    // Issue 7: applying a patch that is already active is reported as such, with exit code 0.
    let again = ok(&["apply", &pid, a.to_str().unwrap()]);
    assert!(text(&again).contains("already active"), "{}", text(&again));
    let before = text_and_maps(&t);
    let o = relive(&["apply", &pid, c.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains("ka") && msg.contains('f'),
        "the refusal names the owner and the function: {msg}"
    );
    let after = text_and_maps(&t);
    assert!(before.0 == after.0, "the executable's text changed");
    assert_eq!(before.1, after.1, "the memory map changed");
    assert_eq!(num(&t.stats(), "mix"), 0);
}

/// Issue 5 test 5 (SPEC K5 opt-in, K2): with --allow-stacking C is accepted and wins; disabling A first, then C,
/// leaves dispatch correct at each step.
#[test]
fn serial_t_issue5_5_stacking_newest_wins_disable_in_any_order_k2() {
    let mut t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let a = patch("sa", &["VERSION=2"]);
    let c = patch("sc", &["VERSION=4"]);
    ok(&["apply", &pid, a.to_str().unwrap()]);
    t.wait_workers(2);
    ok(&["apply", &pid, c.to_str().unwrap(), "--allow-stacking"]);
    let st = t.wait_workers(4);
    assert_eq!(num(&st, "mix"), 0);
    ok(&["disable", &pid, "sa"]);
    let st = t.wait_workers(4);
    assert_eq!(num(&st, "mix"), 0);
    ok(&["disable", &pid, "sc"]);
    let st = t.wait_workers(1);
    assert_eq!(num(&st, "mix"), 0);
}

/// Issue 5 test 7 (SPEC L7, CB5): pre_patch returns an error: `relive apply` fails with it and leaves nothing
/// behind.
#[test]
fn serial_t_issue5_7_failing_pre_patch_leaves_nothing_cb5() {
    let mut t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let p = patch("fp", &["VERSION=2", "CALLBACKS=1", "FAIL_PRE=1"]);
    let (text0, maps0) = text_and_maps(&t);
    let o = relive(&["apply", &pid, p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains("pre_patch") && msg.contains("-19"),
        "the error names the callback and its result: {msg}"
    );
    let (text1, maps1) = text_and_maps(&t);
    assert!(text0 == text1, "the executable's text changed");
    assert!(
        !maps1.contains(p.to_str().unwrap()),
        "the patch library stayed mapped"
    );
    let _ = maps0;
    assert_eq!(
        t.callbacks(),
        ["callback fp pre_patch"],
        "CB5: no other callback runs"
    );
    let st = t.wait_workers(1);
    assert_eq!(num(&st, "mix"), 0);
    // Two objects whose pre_patch both fail: the first failure cancels the enable, so the other's pre_patch
    // never runs (CB5), and nothing stays behind: the patch is not active, `disable` has nothing to do and
    // a good patch applies next. Before, every pre_patch ran, the model refused the results, and the patch
    // stayed stuck in transition.
    let two = patch(
        "fp2",
        &["VERSION=2", "CALLBACKS=1", "FAIL_PRE=1", "SECOND=libc.so.6"],
    );
    let o = relive(&["apply", &pid, two.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let cbs: Vec<String> = t.callbacks().into_iter().filter(|c| c.contains("fp2")).collect();
    assert_eq!(
        cbs.len(),
        1,
        "CB5: one pre_patch ran and failed, no other callback: {cbs:?}"
    );
    assert!(cbs[0].contains("pre_patch"), "{cbs:?}");
    assert!(
        !t.maps().contains(two.to_str().unwrap()),
        "the patch library stayed mapped"
    );
    let o = relive(&["disable", &pid, "fp2"]);
    assert_eq!(o.status.code(), Some(3), "fp2 is not active: {}", text(&o));
    // Only the executable's pre_patch fails. If the other object's ran first (and succeeded), the cancel
    // pairs it with its post_unpatch (CB2); if the executable's ran first, nothing else runs (CB5).
    let mixed = patch(
        "fp3",
        &[
            "VERSION=2",
            "CALLBACKS=1",
            "FAIL_PRE=1",
            "SECOND=libc.so.6",
            "SECOND_OK=1",
        ],
    );
    let o = relive(&["apply", &pid, mixed.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let cbs: Vec<String> = t.callbacks().into_iter().filter(|c| c.contains("fp3")).collect();
    let exe_first = ["callback fp3 pre_patch"];
    let second_first = [
        "callback fp3 pre_patch second",
        "callback fp3 pre_patch",
        "callback fp3 post_unpatch second",
    ];
    assert!(cbs == exe_first || cbs == second_first, "CB2/CB5: {cbs:?}");
    let good = patch("fpok", &["VERSION=2"]);
    ok(&["apply", &pid, good.to_str().unwrap()]);
    t.wait_workers(2);
    ok(&["disable", &pid, "fpok"]);
    t.wait_workers(1);
}

/// DESIGN §3 step 5: a target without the agent gets it injected by `apply` (one remote dlopen, §4.6).
#[test]
fn serial_t_issue5_apply_injects_the_agent_when_absent() {
    let exe = relive_testkit::compile_c("transition_oracle", &["transition_oracle.c"], TARGET_FLAGS);
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--duty", "200"]).stdin(std::process::Stdio::piped());
    let child =
        relive_testkit::spawn_guarded(cmd, "oracle ready", std::time::Duration::from_secs(20)).unwrap();
    let mut t = Target { child, seen: vec![] };
    let pid = t.pid().to_string();
    assert!(!t.maps().contains("relive_agent"));
    let a = patch("inj", &["VERSION=2"]);
    let o = ok(&["--json", "apply", &pid, a.to_str().unwrap()]);
    assert_eq!(json(&o)["agent_injected"], true);
    let s = t.wait_workers(2);
    assert_eq!(num(&s, "mix"), 0);
    ok(&["disable", &pid, "inj"]);
    let s = t.wait_workers(1);
    assert_eq!(num(&s, "mix"), 0);
}

/// Issue 5 test 1 with `RELIVE_STOP_WINDOW=2` (docs/FAQ.md): threads are asked to stop two at a time ahead
/// of the one being handled instead of all at once (waits through SIGCHLD, oldest first). Every cycle
/// completes, every thread reaches each version, the mix count stays zero, with signals interrupting the
/// workers meanwhile.
#[test]
fn serial_t_issue5_1_consistency_oracle_with_a_stop_window_of_2() {
    let mut t = oracle(&["--duty", "200", "--signals"]);
    let pid = t.pid().to_string();
    let a = patch("win", &["VERSION=2"]);
    let a = a.to_str().unwrap();
    let env = [("RELIVE_STOP_WINDOW", "2")];
    let run = |args: &[&str]| {
        let o = relive_env(args, &env);
        assert_eq!(o.status.code(), Some(0), "relive {args:?}: {}", text(&o));
        o
    };
    for i in 0..env_count("RELIVE_ORACLE_CYCLES", 30) {
        let o = run(&["--json", "apply", &pid, a]);
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["outcome"], "completed", "cycle {i}: {j}");
        assert!(j["stop_wait_us"].is_array(), "cycle {i}: {j}");
        let s = t.wait_workers(2);
        assert_eq!(num(&s, "mix"), 0, "cycle {i}: mix after apply: {s:?}");
        run(&["disable", &pid, "win"]);
        let s = t.wait_workers(1);
        assert_eq!(num(&s, "mix"), 0, "cycle {i}: mix after disable: {s:?}");
        assert!(t.alive(), "the target died in cycle {i}");
    }
}
