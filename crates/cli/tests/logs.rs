//! `-v` log output on stderr: plain text when stderr is not a terminal (a pipe here), no ANSI colour codes.

use std::process::{Command, Stdio};

#[test]
fn t_verbose_logs_to_a_pipe_have_no_colour_codes() {
    // -vv logs at debug level before the command fails on the missing patch file: there is a log line to check.
    let o = Command::new(env!("CARGO_BIN_EXE_relive"))
        .args(["-vv", "apply", "999999999", "/nonexistent/relive-logs-test.so"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run relive");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("DEBUG"),
        "expected a debug log line on stderr: {err}"
    );
    assert!(
        !o.stderr.contains(&0x1b),
        "ESC in stderr piped to a file: {err:?}"
    );
}
