//! insta snapshots of the JSON output of `check` and `apply`/`disable` (issue 7 "Output"), with filters for
//! pids, addresses, paths and timings.

mod transition_common;
use transition_common::*;

#[test]
fn serial_t_issue7_json_snapshots_check_apply_disable() {
    let mut t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let a = patch("snap", &["VERSION=2", "CALLBACKS=1"]);
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(&format!(r"\b{pid}\b"), "[pid]");
    settings.add_filter(r"0x[0-9a-f]+", "[addr]");
    settings.add_filter(r"[0-9a-f]{40}", "[build-id]");
    // v16–v31 exist only on CPUs with AVX-512: the same output on every machine.
    settings.add_filter(
        r",v16,v17,v18,v19,v20,v21,v22,v23,v24,v25,v26,v27,v28,v29,v30,v31",
        "",
    );
    settings.add_filter(r#""/[^"]*/([^/"]+)-[0-9a-f]{16}""#, "\"[dir]/$1-[hash]\"");
    settings.add_filter(
        r#"/[^ "]*/(transition_oracle|transition_patch_snap)-[0-9a-f]{16}"#,
        "[dir]/$1-[hash]",
    );
    settings.add_filter(r#"/[^ "]*/librelive_agent.so"#, "[dir]/librelive_agent.so");
    settings.add_filter(r"tpoff -?\d+", "tpoff [n]");
    settings.add_filter(r"\(\d+ bytes\)", "([n] bytes)");
    settings.bind(|| {
        let o = ok(&["--json", "check", &pid, a.to_str().unwrap()]);
        insta::assert_snapshot!("check_json", String::from_utf8_lossy(&o.stdout));
        let o = ok(&["--json", "apply", &pid, a.to_str().unwrap()]);
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let keep = serde_json::json!({
            "operation": j["operation"], "patch": j["patch"], "outcome": j["outcome"],
            "forced": j["forced"], "agent_injected": j["agent_injected"], "log": j["log"],
            "blockers": j["blockers"],
        });
        insta::assert_json_snapshot!("apply_json", keep);
        t.wait_workers(2);
        let o = ok(&["--json", "disable", &pid, "snap"]);
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let keep = serde_json::json!({
            "operation": j["operation"], "patch": j["patch"], "outcome": j["outcome"], "log": j["log"],
        });
        insta::assert_json_snapshot!("disable_json", keep);
        let o = relive(&["--json", "apply", "999999999", a.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1));
        insta::assert_snapshot!("apply_no_such_pid_json", String::from_utf8_lossy(&o.stdout));
    });
    t.wait_workers(1);
}
