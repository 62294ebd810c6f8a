//! Error paths of `apply` and `check` (issue 7): each checks the message, the exit code, and that the target's
//! text and memory map are unchanged.

mod transition_common;
use transition_common::*;

fn refused_unchanged(t: &Target, args: &[&str], code: i32, needles: &[&str]) -> String {
    let before = text_and_maps(t);
    let o = relive(args);
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(code), "relive {args:?}: {msg}");
    for n in needles {
        assert!(
            msg.contains(n),
            "relive {args:?}: the message should name {n:?}: {msg}"
        );
    }
    let after = text_and_maps(t);
    assert!(
        before.0 == after.0,
        "relive {args:?} changed the executable's text"
    );
    assert_eq!(before.1, after.1, "relive {args:?} changed the memory map");
    msg
}

fn build_id_hex(path: &std::path::Path) -> String {
    let data = std::fs::read(path).unwrap();
    let img = relive_elf::ElfImage::parse("exe", &data).unwrap();
    img.build_id_hex().expect("the fixture has a build-id")
}

#[test]
fn serial_t_issue7_apply_refusals_leave_target_unchanged() {
    let t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    // A file that is not a patch.
    refused_unchanged(
        &t,
        &["apply", &pid, exe.to_str().unwrap()],
        3,
        &["not a usable relive patch"],
    );
    // A patch compiled but not linked (`cc -c`): it has a manifest, but dlopen takes shared objects only.
    // check refuses it too (it once said "apply would proceed").
    let obj = relive_testkit::compile_c(
        "transition_patch_object",
        &["transition_patch.c"],
        &["-O2", "-g", "-fPIC", "-c", "-DPATCH_NAME=obj"],
    );
    for cmd in ["apply", "check"] {
        refused_unchanged(
            &t,
            &[cmd, &pid, obj.to_str().unwrap()],
            3,
            &["not a usable relive patch", "relocatable object file", "-shared"],
        );
    }
    // A thread id instead of the process id: /proc/TID exists and reads like a process, but the agent,
    // the registry and the transition are the process's. Named, and refused before anything happens.
    let tid = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|t| t.to_string() != pid)
        .expect("the oracle has worker threads")
        .to_string();
    let good_patch = patch("bytid", &["VERSION=2"]);
    for args in [
        vec!["apply", &tid, good_patch.to_str().unwrap()],
        vec!["check", &tid, good_patch.to_str().unwrap()],
        vec!["disable", &tid, "bytid"],
        vec!["transition", &tid],
    ] {
        refused_unchanged(
            &t,
            &args,
            3,
            &[
                &format!("{tid} is a thread of process {pid}"),
                &format!("process id {pid}"),
            ],
        );
    }
    // A wrong build-id.
    let p = patch("wrongbid", &["BUILD_ID=0123456789abcdef"]);
    refused_unchanged(
        &t,
        &["apply", &pid, p.to_str().unwrap()],
        3,
        &["build-id", "0123456789abcdef", &pid],
    );
    // check refuses it too, and does not call the functions of the refused object "ok".
    let o = relive(&["--json", "check", &pid, p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let funcs = j["funcs"].as_array().unwrap();
    assert!(!funcs.is_empty(), "{j}");
    assert!(
        funcs
            .iter()
            .all(|f| f["ok"] == false && f["details"][0].as_str().unwrap().contains("not checked")),
        "{j}"
    );
    // The right build-id is accepted by check.
    let good = patch("rightbid", &[&format!("BUILD_ID={}", build_id_hex(&exe))]);
    let o = relive(&["check", &pid, good.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // A missing symbol.
    let p = patch("missing", &["MISSING=1"]);
    refused_unchanged(
        &t,
        &["apply", &pid, p.to_str().unwrap()],
        3,
        &["no_such_function", "not found"],
    );
    // An unpatchable entry (shorter than the jump).
    let p = patch("tiny", &["TINY=1"]);
    refused_unchanged(&t, &["apply", &pid, p.to_str().unwrap()], 3, &["tiny"]);
    // A `static` new version: dlsym in the agent could not find it. check and apply say so up front.
    let p = patch("staticnew", &["STATIC_NEW=1"]);
    let o = relive(&["check", &pid, p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("held_static") && text(&o).contains("not exported"),
        "{}",
        text(&o)
    );
    refused_unchanged(
        &t,
        &["apply", &pid, p.to_str().unwrap()],
        3,
        &["held_static", "static"],
    );
    // A symbol no object of the target exports: the patch's dlopen would fail. check and apply name it.
    let p = patch("undef", &["UNDEF=1"]);
    let o = relive(&["check", &pid, p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("relive_test_exported_by_nobody"),
        "{}",
        text(&o)
    );
    refused_unchanged(
        &t,
        &["apply", &pid, p.to_str().unwrap()],
        3,
        &["relive_test_exported_by_nobody", "RELIVE_IMPORT", "-rdynamic"],
    );
    // No RELIVE_FUNC at all: legal (SPEC D4), but check says what applying it would (not) do.
    let p = patch("nofuncs", &["NO_FUNCS=1"]);
    let o = relive(&["check", &pid, p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("declares no function"), "{}", text(&o));
    // A patch that links (it uses the target's exported oracle_mix and libc): check says so.
    let p = patch("links", &[]);
    let o = relive(&["check", &pid, p.to_str().unwrap()]);
    assert!(text(&o).contains("every symbol it needs"), "{}", text(&o));
}

#[test]
fn t_issue7_apply_to_a_pid_that_does_not_exist() {
    let p = patch("nopid", &[]);
    let o = relive(&["apply", "999999999", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no process with pid 999999999"), "{}", text(&o));
}

/// `relive check` (issue 7): one verdict per func, exit 0 when apply would proceed, 3 when it would refuse;
/// it changes nothing, and injects no agent.
#[test]
fn serial_t_issue7_check_one_verdict_per_func_changes_nothing() {
    // A target without the agent: check must not inject it.
    let exe = relive_testkit::compile_c("transition_oracle", &["transition_oracle.c"], TARGET_FLAGS);
    let mut cmd = std::process::Command::new(exe);
    cmd.stdin(std::process::Stdio::piped());
    let child =
        relive_testkit::spawn_guarded(cmd, "oracle ready", std::time::Duration::from_secs(20)).unwrap();
    let t = Target { child, seen: vec![] };
    let pid = t.pid().to_string();
    let a = patch("ca", &["VERSION=2"]);
    let before = text_and_maps(&t);
    let o = relive(&["--json", "check", &pid, a.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let funcs: Vec<&str> = j["funcs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["func"].as_str().unwrap())
        .collect();
    assert_eq!(funcs, ["exe:f", "exe:g"], "{j}");
    assert!(
        j["funcs"].as_array().unwrap().iter().all(|f| f["ok"] == true),
        "{j}"
    );
    let after = text_and_maps(&t);
    assert!(before.0 == after.0);
    // Code mappings and mapped files (the target's own heap may grow meanwhile): no agent, no stub page.
    let code = |m: &str| -> Vec<String> {
        m.lines()
            .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.contains('x')) || l.contains('/'))
            .map(String::from)
            .collect()
    };
    assert_eq!(
        code(&before.1),
        code(&after.1),
        "check changed the code mappings (injected the agent?)"
    );
    assert!(!after.1.contains("relive_agent"));
    // `transition` on a process without the agent: nothing pending, exit 0 as with an agent (a script
    // need not tell the two apart), and no agent injected.
    let o = relive(&["--json", "transition", &pid]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["outcome"], "nothing_pending", "{j}");
    assert!(!text_and_maps(&t).1.contains("relive_agent"));
    // Human output: one line per func.
    let o = relive(&["check", &pid, a.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("ok   exe:f") && out.contains("ok   exe:g"), "{out}");
    // A refusal: a function that does not exist, reported on its func.
    let m = patch("cm", &["MISSING=1"]);
    let o = relive(&["--json", "check", &pid, m.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bad: Vec<&serde_json::Value> = j["funcs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["ok"] == false)
        .collect();
    assert_eq!(bad.len(), 1, "{j}");
    assert_eq!(bad[0]["func"], "exe:no_such_function", "{j}");
}

/// Runs `relive ARGS` with stdout a pipe whose reader is already closed (`relive … | head` after head quit).
fn relive_stdout_closed(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_relive"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run relive");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait relive").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "relive {args:?} hung on a closed stdout"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.wait_with_output().expect("relive output")
}

/// Output convention: a closed stdout (EPIPE, SIGPIPE ignored) ends the command quietly with its own exit code:
/// no "failed printing to stdout" panic (101).
#[test]
fn t_issue5_closed_stdout_exits_quietly_with_the_commands_code() {
    let p = patch("pipe", &["VERSION=2"]);
    for args in [
        vec!["--json", "inspect", p.to_str().unwrap()],
        vec!["inspect", p.to_str().unwrap()],
    ] {
        let o = relive_stdout_closed(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(0),
            "relive {args:?} on a closed stdout: {err}"
        );
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    }
    // A refusal keeps its code (3) on a closed stdout.
    let exe = std::env::current_exe().unwrap();
    let o = relive_stdout_closed(&["--json", "inspect", exe.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A file that is not a patch is a refusal (exit 3) in inspect, check and apply alike; a missing file is an
/// error (exit 1).
#[test]
fn t_issue5_not_a_patch_is_refused_by_inspect_check_and_apply() {
    let exe = std::env::current_exe().unwrap();
    let exe = exe.to_str().unwrap();
    let me = std::process::id().to_string();
    for args in [
        vec!["inspect", exe],
        vec!["check", &me, exe],
        vec!["apply", &me, exe],
    ] {
        let o = relive(&args);
        assert_eq!(o.status.code(), Some(3), "relive {args:?}: {}", text(&o));
        assert!(text(&o).contains("not a usable relive patch"), "{}", text(&o));
    }
    let o = relive(&["inspect", "/nonexistent/fix.so"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

/// An import from an object the process has not loaded would leave its slot at 0: check and apply refuse it,
/// naming the import, the object and the pid; the target is unchanged.
#[test]
fn serial_t_issue5_import_from_an_object_not_loaded_is_refused() {
    let t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let p = patch("impnope", &["VERSION=2", "IMPORT_FROM=libnope.so.7"]);
    let p = p.to_str().unwrap();
    for cmd in ["check", "apply"] {
        let msg = refused_unchanged(&t, &[cmd, &pid, p], 3, &["libnope.so.7", "p_imported", &pid]);
        assert!(msg.contains("import") && msg.contains(" g "), "{msg}");
    }
}

/// Messages name the patch once: a busy refusal reads "pid N: patch 'b': cannot be enabled …", not
/// "patch b: pid N: patch 'b': …".
#[test]
fn serial_t_issue5_refusal_names_the_patch_once() {
    let t = oracle(&["--stall", "--duty", "200"]);
    let pid = t.pid().to_string();
    let s = patch("once_s", &["VERSION=2", "STALL=1"]);
    ok(&["apply", &pid, s.to_str().unwrap(), "--no-wait"]);
    let b = patch("once_b", &["VERSION=3", "ONLY_F=1"]);
    let msg = refused_unchanged(
        &t,
        &["apply", &pid, b.to_str().unwrap()],
        3,
        &["once_b", "once_s"],
    );
    let line = msg.lines().find(|l| l.contains("once_b")).unwrap();
    assert_eq!(line.matches("once_b").count(), 1, "{msg}");
    ok(&["disable", &pid, "once_s"]);
}

/// `relive transition` with nothing pending changes nothing (no entry moved to the other stub slot), and its
/// report carries its elapsed time; a completed apply reports its target (patched).
#[test]
fn serial_t_issue5_transition_with_nothing_pending_changes_no_text() {
    let mut t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let a = patch("idle_a", &["VERSION=2"]);
    let o = ok(&["--json", "apply", &pid, a.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["outcome"], "completed", "{j}");
    assert_eq!(j["target"], "patched", "{j}");
    t.wait_workers(2);
    let o = refused_unchanged(&t, &["--json", "transition", &pid], 0, &["nothing_pending"]);
    let start = o.find('{').unwrap();
    let end = o.rfind('}').unwrap();
    let j: serde_json::Value = serde_json::from_str(&o[start..=end]).unwrap();
    assert!(j["elapsed_ms"].as_f64().unwrap() > 0.0, "{j}");
    assert_eq!(j["windows"], serde_json::json!([]), "{j}");
    let o = ok(&["--json", "disable", &pid, "idle_a"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["target"], "unpatched", "{j}");
    t.wait_workers(1);
}

/// Applying a patch whose name is already active: the same build is "already active" (exit 0, for `check`
/// too: "apply would do nothing"); another build under the same name is refused with both build-ids
/// (exit 3, target unchanged), since answering "already active" would leave the old fix running.
#[test]
fn serial_t_issue7_same_name_other_build_is_refused() {
    let mut t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let build = |version: &str| {
        relive_testkit::compile_c(
            &format!("transition_patch_rebuilt_v{version}"),
            &["transition_patch.c"],
            &[
                "-O2",
                "-g",
                "-fPIC",
                "-shared",
                "-DPATCH_NAME=rebuilt",
                &format!("-DVERSION={version}"),
            ],
        )
    };
    let (v2, v3) = (build("2"), build("3"));
    ok(&["apply", &pid, v2.to_str().unwrap()]);
    t.wait_workers(2);
    // The same build again.
    let o = ok(&["--json", "apply", &pid, v2.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["outcome"], "already_active", "{j}");
    let o = relive(&["--json", "check", &pid, v2.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["already_active"], true, "{j}");
    // Another build under the same name.
    for cmd in ["apply", "check"] {
        refused_unchanged(
            &t,
            &[cmd, &pid, v3.to_str().unwrap()],
            3,
            &["already active", "another build", "relive disable"],
        );
    }
    assert_eq!(
        num(&t.wait_workers(2), "mix"),
        0,
        "still the first build everywhere"
    );
    ok(&["disable", &pid, "rebuilt"]);
    t.wait_workers(1);
}

/// A patch of an object the process has not loaded (a mistyped name, or a library not loaded yet) is
/// accepted (DESIGN §5), but `check` and `apply` say that nothing in it is patched, now or later: it used
/// to read like a success ("completed … 2 switched").
#[test]
fn serial_t_issue7_an_object_not_loaded_is_reported_not_patched() {
    let mut t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let p = patch("notloaded", &["OBJECT=libfoo.so.9"]);
    let o = relive(&["check", &pid, p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("nothing in it is patched"), "{}", text(&o));
    let o = ok(&["--json", "apply", &pid, p.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["not_loaded"], serde_json::json!(["libfoo.so.9"]), "{j}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("object libfoo.so.9 is not loaded"),
        "{}",
        text(&o)
    );
    ok(&["disable", &pid, "notloaded"]);
    let o = ok(&["apply", &pid, p.to_str().unwrap()]);
    assert!(
        text(&o).contains("nothing patched in libfoo.so.9"),
        "{}",
        text(&o)
    );
    assert_eq!(
        num(&t.wait_workers(1), "mix"),
        0,
        "the executable's f and g are untouched"
    );
    ok(&["disable", &pid, "notloaded"]);
}
