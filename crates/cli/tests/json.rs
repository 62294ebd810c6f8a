//! The `--json` output of every command (issue 7), as insta snapshots (crates/cli/tests/snapshots/). What
//! changes from run to run is redacted: pids, tids, addresses, build-ids, durations and counters of the
//! moment (registry generation, fds, TLS offset), temp and checkout paths, fixture hashes. A change of any
//! field's name, type or meaning shows up as a snapshot diff (review with `cargo insta review`).
//!
//! Every command prints exactly one JSON document on stdout, also when it fails (`{"error": …}`, or the
//! command's own report for `check` refusals and timeouts).

mod transition_common;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use transition_common::{Target, oracle, patch, relive};

/// Keys whose values change from run to run, replaced by "[key]".
const VOLATILE: &[&str] = &[
    "tid",
    "service_tid",
    "agent_pid",
    "controller_lock",
    "generation",
    "body_len",
    "tpoff",
    "req_fd",
    "resp_fd",
    "elapsed_ms",
    "transition_ms",
    "pause_us",
    "stop_wait_us",
    "pause_samples_us",
    "window_us",
    "int3_hits",
    "int3_us",
    "attempts",
    "rounds",
    "steps",
    "frame",
    "registry_addr",
    "tls_image_addr",
    "pc",
    "switched",
    "state",
    "state_name",
    "pending",
    "service_pid",
    "workdir",
    "served_before",
    "served_while_patched",
    "served_after",
    "apply_ms",
    "disable_ms",
];

fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if VOLATILE.contains(&k.as_str()) && !x.is_null() {
                    *x = Value::String(format!("[{k}]"));
                } else {
                    redact(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

fn esc(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '/' || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

/// Runs `relive --json ARGS`, checks the exit code and that stdout is one JSON document, and snapshots it.
fn snap(name: &str, pid: Option<i32>, args: &[&str], code: i32) -> Value {
    let mut a = vec!["--json"];
    a.extend(args);
    let o = relive(&a);
    let all = transition_common::text(&o);
    assert_eq!(o.status.code(), Some(code), "relive {a:?}: {all}");
    let mut v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("relive {a:?}: stdout is not one JSON document ({e}): {all}"));
    let raw = v.clone();
    // Which workers happen to be inside a patched function when a pending transition is reported is racy;
    // the thread that sleeps in `held` (T-cb9) always is.
    if v["outcome"] == "pending"
        && let Some(b) = v["blockers"].as_array_mut()
    {
        b.retain(|b| b["function"] == "held");
    }
    redact(&mut v);
    let repo = relive_testkit::workspace_root().canonicalize().unwrap();
    let mut filters: Vec<(String, String)> = vec![
        // Where cargo put the agent depends on what was built first: target/debug/ after a
        // `cargo build`, only target/debug/deps/ on a fresh clone that ran the tests.
        (
            r"target/(debug|release)/(deps/)?librelive_agent\.so".into(),
            "[agent-dir]/librelive_agent.so".into(),
        ),
        (esc(&repo.to_string_lossy()), "[repo]".into()),
        (esc(&std::env::temp_dir().to_string_lossy()), "[tmp]".into()),
        (r"-[0-9a-f]{16}\b".into(), "-[hash]".into()),
        (r"\b[0-9a-f]{40}\b".into(), "[build-id]".into()),
        (r"0x[0-9a-f]+".into(), "[addr]".into()),
        (r"\b\d+(\.\d+)? ?(ms|µs|us)\b".into(), "[duration]".into()),
        // v16–v31 exist only on CPUs with AVX-512: the same output on every machine.
        (
            r",v16,v17,v18,v19,v20,v21,v22,v23,v24,v25,v26,v27,v28,v29,v30,v31".into(),
            "".into(),
        ),
    ];
    if let Some(pid) = pid {
        filters.push((format!(r"\b{pid}\b"), "[pid]".into()));
    }
    let filters: Vec<(&str, &str)> = filters.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    insta::with_settings!({ filters => filters, prepend_module_to_snapshot => false }, {
        insta::assert_json_snapshot!(name, v);
    });
    raw
}

/// The quick start's program, without the agent.
fn hello() -> Target {
    let src = relive_testkit::workspace_root().join("examples/quickstart/hello.c");
    let exe = relive_testkit::compile_c("json_hello", &[src.to_str().unwrap()], &["-O2", "-g"]);
    let child = relive_testkit::spawn_guarded(Command::new(exe), "hello from", Duration::from_secs(20))
        .expect("start hello");
    Target { child, seen: vec![] }
}

fn quickstart_c_patch(name: &str, extra: &str) -> PathBuf {
    let src = relive_testkit::workspace_root().join("examples/quickstart/c-fix.c");
    let mut flags = vec!["-O2", "-g", "-fPIC", "-shared"];
    flags.extend(extra.split_whitespace());
    relive_testkit::compile_c(name, &[src.to_str().unwrap()], &flags)
}

fn rust_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().join("librust_hello_patch.so");
    assert!(
        p.is_file(),
        "{} missing: build with `cargo build -p rust-hello-patch`",
        p.display()
    );
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// inspect (C and Rust), status (without and with the agent), stacks, check (ok and refused), apply,
/// transition (nothing pending), disable, force (refused) and an error document, on one live target.
#[test]
fn serial_t_issue7_json_of_every_command() {
    let c = quickstart_c_patch("json_cfix", "");
    snap("inspect_c", None, &["inspect", s(&c)], 0);
    snap("inspect_rust", None, &["inspect", s(&rust_example())], 0);

    let t = hello();
    let pid = t.pid();
    let p = pid.to_string();
    snap("status_no_agent", Some(pid), &["status", &p], 0);

    // stacks: libc's internal frames depend on the system's glibc; keep the executable's frames and the shape.
    let a = ["--json", "stacks", &p];
    let o = relive(&a);
    assert_eq!(o.status.code(), Some(0), "{}", transition_common::text(&o));
    let mut v: Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    for th in v["threads"].as_array_mut().unwrap() {
        for f in th["frames"].as_array_mut().unwrap() {
            if f["object"].as_str().is_some_and(|o| o.contains("libc.so")) {
                f["function"] = "[libc]".into();
                f["offset"] = "[libc]".into();
                f["object"] = "[libc]".into();
            }
        }
        // The number of libc frames varies with glibc: keep the executable's frames and the first libc one.
        let frames = th["frames"].as_array().unwrap().clone();
        let kept: Vec<Value> = frames
            .iter()
            .enumerate()
            .filter(|(i, f)| *i == 0 || f["object"] != "[libc]")
            .map(|(_, f)| {
                let mut f = f.clone();
                f["index"] = "[index]".into();
                f
            })
            .collect();
        th["frames"] = Value::Array(kept);
        th["name"] = "[comm]".into();
    }
    redact(&mut v);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    insta::with_settings!({
        filters => vec![
            (format!(r"\b{pid}\b").as_str(), "[pid]"),
            (esc(&exe.to_string_lossy()).as_str(), "[exe]"),
            (r"0x[0-9a-f]+", "[addr]"),
        ],
        prepend_module_to_snapshot => false,
    }, {
        insta::assert_json_snapshot!("stacks", v);
    });

    snap("check_ok", Some(pid), &["check", &p, s(&c)], 0);
    let missing = transition_common::patch("json_missing", &["MISSING=1"]);
    snap("check_refused", Some(pid), &["check", &p, s(&missing)], 3);
    let r = snap("apply", Some(pid), &["apply", &p, s(&c)], 0);
    assert_eq!(r["outcome"], "completed");
    snap("apply_already_active", Some(pid), &["apply", &p, s(&c)], 0);
    snap("status_agent", Some(pid), &["status", &p], 0);
    snap("transition_nothing_pending", Some(pid), &["transition", &p], 0);
    snap("disable", Some(pid), &["disable", &p, "c-fix"], 0);
    snap("force_nothing_pending", Some(pid), &["force", &p], 3);
    snap("disable_unknown_patch", Some(pid), &["disable", &p, "c-fix"], 3);
    snap("apply_no_such_pid", None, &["apply", "999999999", s(&c)], 1);
}

/// A pending transition (T-cb9's stalling thread): apply --timeout prints its report with the blockers
/// (tid, function, frame) and exits 4; `transition --timeout` the same; disable reverses it.
#[test]
fn serial_t_issue7_json_of_a_pending_transition() {
    let t = oracle(&["--stall", "--duty", "200"]);
    let pid = t.pid();
    let p = pid.to_string();
    let st = patch("json_s", &["VERSION=2", "STALL=1"]);
    let r = snap(
        "apply_timeout",
        Some(pid),
        &["apply", &p, s(&st), "--timeout", "1"],
        4,
    );
    assert_eq!(r["outcome"], "pending");
    let st = snap("status_pending", Some(pid), &["status", &p], 0);
    assert_eq!(st["agent"]["transition"]["patch"], "json_s", "{st}");
    snap(
        "transition_timeout",
        Some(pid),
        &["transition", &p, "--timeout", "1"],
        4,
    );
    snap("disable_reverse", Some(pid), &["disable", &p, "json_s"], 0);
}

/// `relive demo --json`: its findings (narration stays on stderr).
#[test]
fn serial_t_issue7_json_of_demo() {
    let v = snap("demo", None, &["demo"], 0);
    assert!(v["served_while_patched"].as_u64().is_some_and(|n| n > 0), "{v}");
}

/// A command line clap rejects still prints one JSON document with `--json` (kind "usage", exit 2), wherever
/// `--json` stands; clap's own text stays on stderr. `--help` and `--version` print their text, exit 0.
#[test]
fn t_json_of_usage_errors() {
    snap("usage_bad_pid", None, &["apply", "notapid", "fix.so"], 2);
    snap("usage_unknown_command", None, &["bogus"], 2);
    snap("usage_missing_argument", None, &["apply"], 2);
    snap("usage_no_command", None, &[], 2);
    for a in [
        &["--json", "apply", "notapid", "fix.so"][..],
        &["apply", "notapid", "fix.so", "--json"],
    ] {
        let o = relive(a);
        assert_eq!(o.status.code(), Some(2), "relive {a:?}");
        let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON document on stdout");
        assert_eq!(v["error"]["kind"], "usage", "{v}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("error: invalid value 'notapid' for '<PID>'"),
            "clap's text on stderr: {err}"
        );
    }
    // Without --json: clap's text only.
    let o = relive(&["apply", "notapid", "fix.so"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty(), "{}", String::from_utf8_lossy(&o.stdout));
    for (a, want) in [
        (&["--json", "--help"][..], "Usage: relive"),
        (&["--json", "--version"], "relive "),
    ] {
        let o = relive(a);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(0), "relive {a:?}: {out}");
        assert!(
            out.starts_with(want) || out.contains(&format!("\n{want}")),
            "relive {a:?}: {out}"
        );
        assert!(
            serde_json::from_slice::<Value>(&o.stdout).is_err(),
            "relive {a:?} printed JSON: {out}"
        );
    }
}
