//! Error paths of issue 7 that `errors_transition.rs` and `transition.rs` do not cover: a pid that does not
//! exist (every command), a pid the user may not trace, an ambiguous symbol and a bad sympos (SPEC D5), an entry
//! other code jumps into (DESIGN §4.3), an incompatible state (ST3), busy (L1: a transition already pending),
//! a timeout, and what `disable`/`force` say when there is nothing to do. Each checks the message (it names
//! the pid, patch, function or address involved), the exit code (README "Exit codes") and that the target's
//! memory map and executable text are unchanged.

mod transition_common;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use transition_common::*;

/// Runs `relive ARGS` as user `nobody` (uid/gid 65534, no groups), with a hard timeout.
fn relive_as_nobody(args: &[&str]) -> Output {
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_relive"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run setpriv (util-linux)");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("relive {args:?} as nobody did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("output")
}

/// Runs `run(args)` and checks its exit code, that its message names every needle, and that the target's
/// text and map did not change. Returns the message.
fn expect_unchanged(
    t: &Target,
    run: impl Fn(&[&str]) -> Output,
    args: &[&str],
    code: i32,
    needles: &[&str],
) -> String {
    let before = text_and_maps(t);
    let o = run(args);
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(code), "relive {args:?}: {msg}");
    for n in needles {
        assert!(
            msg.to_lowercase().contains(&n.to_lowercase()),
            "relive {args:?}: the message should name {n:?}: {msg}"
        );
    }
    let after = text_and_maps(t);
    if before.0 != after.0 {
        let d: Vec<(usize, u8, u8)> = (0..before.0.len())
            .filter(|&i| before.0[i] != after.0[i])
            .map(|i| (i, before.0[i], after.0[i]))
            .collect();
        eprintln!("text differences (offset, before, after): {d:x?}");
    }
    assert!(
        before.0 == after.0,
        "relive {args:?} changed the executable's text"
    );
    assert_eq!(before.1, after.1, "relive {args:?} changed the memory map");
    msg
}

fn fixture_src(name: &str, src: &str) -> String {
    let dir = relive_testkit::fixtures_out().join("errors_more_src");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.c"));
    // Written only when different, so concurrent tests never read a half-written file of the same content.
    if std::fs::read_to_string(&p).ok().as_deref() != Some(src) {
        let tmp = dir.join(format!("{name}.c.tmp{}", std::process::id()));
        std::fs::write(&tmp, src).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }
    p.to_string_lossy().into_owned()
}

/// A C patch built from `src` (a relive.h manifest).
fn c_patch(name: &str, src: &str) -> PathBuf {
    let s = fixture_src(&format!("patch_{name}"), src);
    relive_testkit::compile_c(
        &format!("errors_more_{name}"),
        &[&s],
        &["-O2", "-g", "-fPIC", "-shared"],
    )
}

/// The quick start's program (examples/quickstart/hello.c), without the agent.
fn hello() -> Target {
    let src = relive_testkit::workspace_root().join("examples/quickstart/hello.c");
    let exe = relive_testkit::compile_c("errors_more_hello", &[src.to_str().unwrap()], &["-O2", "-g"]);
    let child = relive_testkit::spawn_guarded(Command::new(exe), "hello from", Duration::from_secs(20))
        .expect("start hello");
    Target { child, seen: vec![] }
}

/// A target whose `loopy` has a branch target inside its first 5 bytes, and `greeting` as in hello.c.
const LOOPY_TARGET: &str = r#"
#include <stdio.h>
#include <unistd.h>
/* loopy: `xor eax,eax` (2 bytes) then a loop whose head, at offset 2, lies inside the 5 bytes a jump
 * would overwrite: relive must refuse its entry (DESIGN 4.3). */
__asm__(".text\n.globl loopy\n.type loopy,@function\nloopy:\n xor %eax,%eax\n1: inc %eax\n cmp %edi,%eax\n"
        " jl 1b\n ret\n.size loopy, .-loopy\n");
int loopy(int n);
int main(void) {
    for (int n = 0;; n++) {
        printf("loopy %d\n", loopy(n % 7));
        fflush(stdout);
        usleep(100 * 1000);
    }
}
"#;

/// A pid that does not exist: every command that takes a pid says so and exits 1; with `--json`, stdout is
/// one `{"error": …}` document.
#[test]
fn t_issue7_a_pid_that_does_not_exist_every_command() {
    let p = c_patch(
        "nopid",
        "#include <relive.h>\nint f2(void){return 2;}\nRELIVE_PATCH(\"nopid\",0,0);\nRELIVE_OBJECT(\"exe\",\"\");\nRELIVE_FUNC(\"exe\",f,0,f2);\n",
    );
    let p = p.to_str().unwrap();
    let pid = "999999999";
    let cmds: Vec<Vec<&str>> = vec![
        vec!["apply", pid, p],
        vec!["check", pid, p],
        vec!["disable", pid, "nopid"],
        vec!["transition", pid],
        vec!["force", pid],
        vec!["stacks", pid],
        vec!["status", pid],
    ];
    for c in cmds {
        let o = relive(&c);
        assert_eq!(o.status.code(), Some(1), "relive {c:?}: {}", text(&o));
        let msg = text(&o);
        assert!(
            msg.contains("no process with pid 999999999"),
            "relive {c:?}: {msg}"
        );
        let mut j = vec!["--json"];
        j.extend(&c);
        let o = relive(&j);
        assert_eq!(o.status.code(), Some(1), "relive {j:?}: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "relive {j:?}: stdout is not one JSON document ({e}): {}",
                text(&o)
            )
        });
        assert_eq!(v["error"]["exit_code"], 1, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("999999999"),
            "{v}"
        );
    }
}

/// A pid the user may not trace (DESIGN §6: permission errors name the fix): exit 1, the pid and the
/// remedies (root, CAP_SYS_PTRACE) named, nothing changed, for every command that attaches or reads.
#[test]
fn serial_t_issue7_a_pid_the_user_may_not_trace() {
    let t = hello();
    let pid = t.pid().to_string();
    let p = c_patch(
        "perm",
        "#include <relive.h>\nconst char *g2(int n){(void)n;return \"x\";}\nRELIVE_PATCH(\"perm\",0,0);\nRELIVE_OBJECT(\"exe\",\"\");\nRELIVE_FUNC(\"exe\",greeting,0,g2);\n",
    );
    // nobody must be able to read the patch, or apply stops at the file (a checkout under a 0700 directory,
    // such as one made by mktemp -d): a world-readable copy in the temp directory.
    let readable = std::env::temp_dir().join(format!("relive-perm-{}.so", std::process::id()));
    std::fs::copy(&p, &readable).unwrap();
    std::fs::set_permissions(&readable, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let p = readable.to_str().unwrap();
    for args in [
        vec!["apply", &pid, p],
        vec!["check", &pid, p],
        vec!["stacks", &pid],
        vec!["transition", &pid],
        vec!["disable", &pid, "perm"],
        vec!["force", &pid],
    ] {
        let msg = expect_unchanged(
            &t,
            relive_as_nobody,
            &args,
            1,
            &[&pid, "permission", "CAP_SYS_PTRACE"],
        );
        // One wording for every command: the path with the real pid, the OS error once, the target's owner and
        // relive's uid, then the remedies for a user (sudo, setcap).
        let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next().map(str::to_string))
            .unwrap();
        let core = format!(
            "cannot read /proc/{pid}/maps of pid {pid}: Permission denied (os error 13); pid {pid} runs as uid {uid} \
             and relive as uid 65534: run relive as "
        );
        assert!(
            msg.contains(&core),
            "relive {args:?}: expected {core:?} in: {msg}"
        );
        assert!(!msg.contains("/proc/PID"), "relive {args:?}: {msg}");
        assert_eq!(msg.matches("(os error").count(), 1, "relive {args:?}: {msg}");
        assert!(
            msg.contains("sudo relive") && msg.contains("setcap cap_sys_ptrace+ep"),
            "relive {args:?}: {msg}"
        );
        if !std::path::Path::new("/proc/sys/kernel/yama/ptrace_scope").exists() {
            assert!(
                !msg.contains("ptrace_scope"),
                "no Yama here, yet relive {args:?} names it: {msg}"
            );
        }
    }
    let _ = std::fs::remove_file(&readable);
}

/// Root denied access (pid 1 here when the environment protects it): the message has no advice to use sudo
/// and names the causes left for root. Runs only where this test process itself may not read /proc/1/maps.
#[test]
fn serial_t_root_denied_gets_no_sudo_advice() {
    // The effective uid, from /proc/self/status ("Uid: real effective saved fs").
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap();
    let denied = std::fs::read_to_string("/proc/1/maps")
        .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied);
    if !root || !denied {
        eprintln!(
            "skipped: needs root and a /proc/1/maps that root may not read (root {root}, denied {denied})"
        );
        return;
    }
    for args in [vec!["status", "1"], vec!["stacks", "1"], vec!["transition", "1"]] {
        let o = relive(&args);
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(1), "relive {args:?}: {msg}");
        assert!(
            msg.contains(
                "cannot read /proc/1/maps of pid 1: Permission denied (os error 13); relive runs as root"
            ),
            "relive {args:?}: {msg}"
        );
        assert!(
            !msg.contains("sudo") && !msg.contains("uid 0"),
            "relive {args:?}: {msg}"
        );
        assert!(
            msg.contains("seccomp") && msg.contains("LSM"),
            "relive {args:?}: {msg}"
        );
        assert_eq!(msg.matches("(os error").count(), 1, "relive {args:?}: {msg}");
    }
}

/// SPEC D5: a name two local symbols share needs a sympos; a sympos past the last is refused. The target has
/// no agent: a refused apply must not even inject it (DESIGN §1).
#[test]
fn serial_t_issue7_ambiguous_symbol_and_bad_sympos_d5() {
    let exe = relive_testkit::compile_c(
        "errors_more_tu",
        &["stacks_tu1.c", "stacks_tu2.c"],
        &["-O2", "-g", "-pthread"],
    );
    let child = relive_testkit::spawn_guarded(Command::new(exe), "ready", Duration::from_secs(20))
        .expect("start the two-helper target");
    let t = Target { child, seen: vec![] };
    let pid = t.pid().to_string();
    let amb = c_patch(
        "ambiguous",
        "#include <relive.h>\nvoid h2(void){}\nRELIVE_PATCH(\"ambiguous\",0,0);\nRELIVE_OBJECT(\"exe\",\"\");\nRELIVE_FUNC(\"exe\",helper,0,h2);\n",
    );
    for cmd in ["apply", "check"] {
        expect_unchanged(
            &t,
            relive,
            &[cmd, &pid, amb.to_str().unwrap()],
            3,
            &[&pid, "helper", "sympos"],
        );
    }
    let far = c_patch(
        "sympos9",
        "#include <relive.h>\nvoid h2(void){}\nRELIVE_PATCH(\"sympos9\",0,0);\nRELIVE_OBJECT(\"exe\",\"\");\nRELIVE_FUNC(\"exe\",helper,9,h2);\n",
    );
    expect_unchanged(
        &t,
        relive,
        &["apply", &pid, far.to_str().unwrap()],
        3,
        &[&pid, "helper", "9"],
    );
}

/// DESIGN §4.3: an entry with a branch target inside the bytes a jump would overwrite is refused, naming the
/// function and the address; nothing changes (the agent is not injected either).
#[test]
fn serial_t_issue7_unpatchable_prologue_branch_target() {
    let src = fixture_src("loopy_target", LOOPY_TARGET);
    let exe = relive_testkit::compile_c("errors_more_loopy", &[&src], &["-O2", "-g"]);
    let child = relive_testkit::spawn_guarded(Command::new(exe), "loopy", Duration::from_secs(20))
        .expect("start the loopy target");
    let t = Target { child, seen: vec![] };
    let pid = t.pid().to_string();
    let p = c_patch(
        "loopy",
        "#include <relive.h>\nint loopy2(int n){return n;}\nRELIVE_PATCH(\"loopy\",0,0);\nRELIVE_OBJECT(\"exe\",\"\");\nRELIVE_FUNC(\"exe\",loopy,0,loopy2);\n",
    );
    let msg = expect_unchanged(
        &t,
        relive,
        &["apply", &pid, p.to_str().unwrap()],
        3,
        &[&pid, "loopy", "0x"],
    );
    assert!(
        msg.contains("branch") || msg.contains("jump"),
        "the reason (a branch target in the overwritten bytes) is not named: {msg}"
    );
}

/// SPEC ST3: a cumulative patch that downgrades a state, or drops one, is refused before any side effect.
#[test]
fn serial_t_issue7_incompatible_state_st3() {
    let t = hello();
    let pid = t.pid().to_string();
    let patch_src = |name: &str, replace: u32, state: &str| {
        format!(
            "#include <relive.h>\nconst char *g_{name}(int n){{(void)n;return \"hello from {name}\";}}\n\
             RELIVE_PATCH(\"{name}\",{replace},0);\nRELIVE_OBJECT(\"exe\",\"\");\n\
             RELIVE_FUNC(\"exe\",greeting,0,g_{name});\n{state}\n"
        )
    };
    let v2 = c_patch("st_v2", &patch_src("st_v2", 0, "RELIVE_STATE(7, 2);"));
    ok(&["apply", &pid, v2.to_str().unwrap()]);
    let down = c_patch("st_down", &patch_src("st_down", 1, "RELIVE_STATE(7, 1);"));
    expect_unchanged(
        &t,
        relive,
        &["apply", &pid, down.to_str().unwrap()],
        3,
        &[&pid, "st_down", "7"],
    );
    let dropped = c_patch("st_drop", &patch_src("st_drop", 1, ""));
    expect_unchanged(
        &t,
        relive,
        &["apply", &pid, dropped.to_str().unwrap()],
        3,
        &[&pid, "st_drop", "7"],
    );
    // The refused patches left the active one in place and working.
    let o = relive(&["--json", "check", &pid, down.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    ok(&["disable", &pid, "st_v2"]);
}

/// L1 (busy): while a transition is pending, another apply is refused naming the pending patch; `transition
/// --timeout` exits 4 naming the blocking thread and function; `force` with nothing pending and `disable` of
/// a patch that is not active are refusals (exit 3) that name what is there instead.
#[test]
fn serial_t_issue7_busy_timeout_and_nothing_to_do() {
    let mut t = oracle(&["--stall", "--duty", "200"]);
    let pid = t.pid().to_string();
    let s = patch("em_s", &["VERSION=2", "STALL=1"]);
    let o = relive(&["apply", &pid, s.to_str().unwrap(), "--no-wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Busy.
    let b = patch("em_b", &["VERSION=3", "ONLY_F=1"]);
    expect_unchanged(
        &t,
        relive,
        &["apply", &pid, b.to_str().unwrap()],
        3,
        &[&pid, "em_b", "em_s", "in transition"],
    );
    // Timeout: the blocker is named with its tid and function; the JSON is one document; the text and the
    // map are unchanged (the pending entries already lead to their dispatchers).
    let msg = expect_unchanged(
        &t,
        relive,
        &["transition", &pid, "--timeout", "1"],
        4,
        &[pid.as_str(), "em_s", "held", "thread "],
    );
    assert!(
        msg.contains("relive force") && msg.contains("relive disable"),
        "{msg}"
    );
    let o = relive(&["--json", "transition", &pid, "--timeout", "1"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(j["outcome"], "pending", "{j}");
    assert!(j["blockers"].as_array().is_some_and(|b| !b.is_empty()), "{j}");
    // Reverse, then nothing is pending.
    ok(&["disable", &pid, "em_s"]);
    let st = t.wait_workers(1);
    assert_eq!(num(&st, "mix"), 0);
    expect_unchanged(&t, relive, &["force", &pid], 3, &[&pid, "no transition pending"]);
    expect_unchanged(
        &t,
        relive,
        &["disable", &pid, "em_nope"],
        3,
        &[&pid, "em_nope", "relive status"],
    );
    assert!(t.alive());
}

/// `relive status` without a pid, run by a user who may not inspect a process with the agent: that process
/// is not silently left out (it used to answer "no process has the relive agent loaded", exit 0): stderr
/// counts the processes it could not inspect and says what to do, and JSON lists them under `unreadable`.
#[test]
fn serial_t_issue7_status_of_all_names_what_it_could_not_inspect() {
    let t = hello();
    let pid = t.pid();
    let p = c_patch(
        "permall",
        "#include <relive.h>\nconst char *g2(int n){(void)n;return \"x\";}\nRELIVE_PATCH(\"permall\",0,0);\nRELIVE_OBJECT(\"exe\",\"\");\nRELIVE_FUNC(\"exe\",greeting,0,g2);\n",
    );
    ok(&["apply", &pid.to_string(), p.to_str().unwrap()]);
    let o = relive_as_nobody(&["--json", "status"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    let unreadable: Vec<i64> = j["unreadable"]
        .as_array()
        .expect("an unreadable list")
        .iter()
        .filter_map(|v| v.as_i64())
        .collect();
    assert!(unreadable.contains(&(pid as i64)), "{j}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("could not be inspected") && err.contains("CAP_SYS_PTRACE"),
        "{err}"
    );
    let o = relive_as_nobody(&["status"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("no process this user may inspect"),
        "{}",
        text(&o)
    );
    ok(&["disable", &pid.to_string(), "permall"]);
}
