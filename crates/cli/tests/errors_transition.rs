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
    // A wrong build-id.
    let p = patch("wrongbid", &["BUILD_ID=0123456789abcdef"]);
    refused_unchanged(
        &t,
        &["apply", &pid, p.to_str().unwrap()],
        3,
        &["build-id", "0123456789abcdef", &pid],
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
