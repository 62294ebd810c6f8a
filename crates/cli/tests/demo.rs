//! `relive demo` (issue 7): starts the bundled service, patches it live, proves the change while it kept
//! serving, reverts it, and exits 0. CI runs it as the README's first command does (here: the test build).

use std::process::Command;

#[test]
fn serial_t_issue7_demo_exits_0_and_proves_patch_and_revert() {
    let o = Command::new(env!("CARGO_BIN_EXE_relive"))
        .args(["--json", "demo"])
        .output()
        .expect("run relive demo");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "relive demo failed:\n{stderr}");
    let j: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("--json keeps stdout one JSON document");
    let n = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("{k} in {j}"));
    assert!(n("patched_answers") >= 8, "{j}");
    assert!(n("original_answers_after") >= 8, "{j}");
    assert!(
        n("served_while_patched") > n("served_before"),
        "kept serving while patched: {j}"
    );
    assert!(
        n("served_after") > n("served_while_patched"),
        "kept serving after the revert: {j}"
    );
    assert!(
        stderr.contains("hello from the live patch"),
        "the narration shows the patched answer:\n{stderr}"
    );
}
