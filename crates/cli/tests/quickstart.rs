//! The README's "Quick start" (issue 7), run exactly as written: every fenced ```sh block under the
//! "## Quick start" heading, in order, as one bash script with `set -eu`, in a temp dir laid out like a
//! checkout after `cargo build --release --workspace` (`target/release/relive` and its agent are this build's).
//! The test fails when the README drifts from the code: a command that fails, a patch that does not take
//! effect, or a program that died or restarted.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The ```sh blocks of the section `heading` of README.md, in order.
pub fn sh_blocks(readme: &str, heading: &str) -> Vec<String> {
    let start = readme
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no \"## {heading}\" section"));
    let body = &readme[start + heading.len() + 5..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    let mut blocks = vec![];
    let mut cur: Option<String> = None;
    for line in body.lines() {
        match (&mut cur, line.trim_end()) {
            (None, "```sh") => cur = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                cur = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(cur.is_none(), "an unterminated ```sh block under {heading}");
    blocks
}

/// Kills a whole process group (the script and the program it started in the background) on drop.
struct Group(i32);
impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn serial_t_issue7_readme_quick_start_runs_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("read README.md");
    let blocks = sh_blocks(&readme, "Quick start");
    let script = blocks.concat();
    // The quick start must show what it promises: a C patch and a Rust patch built and applied, then disabled.
    for needle in [
        "relive apply $PID c-fix.so",
        "cargo build --release --manifest-path examples/quickstart/rust-fix/Cargo.toml",
        "relive apply $PID target/quickstart/release/librust_fix.so",
        "relive disable $PID rust-fix",
        "kill $PID",
    ] {
        assert!(
            script.contains(needle),
            "the quick start no longer runs {needle:?}:\n{script}"
        );
    }

    // A checkout in a temp dir: sources by symlink, target/release/ holding this build's relive and agent.
    let dir = tempfile::tempdir().expect("temp dir");
    let t = dir.path();
    for d in ["examples", "include", "crates", "Cargo.toml"] {
        std::os::unix::fs::symlink(repo().join(d).canonicalize().unwrap(), t.join(d)).unwrap();
    }
    std::fs::create_dir_all(t.join("target/release")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_relive"), t.join("target/release/relive")).unwrap();
    let agent = relive_proc::agent::agent_library_path().expect("librelive_agent.so is built");
    std::os::unix::fs::symlink(&agent, t.join("target/release/librelive_agent.so")).unwrap();

    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "exec 2>&1\necho quickstart-start\nset -eux\n{script}echo quickstart-done\n"
        ))
        .current_dir(t)
        .env("RELIVE_AGENT", &agent)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .stdin(Stdio::null())
        .process_group(0);
    let mut child =
        relive_testkit::spawn_guarded(cmd, "quickstart-start", Duration::from_secs(20)).expect("start bash");
    let _group = Group(child.pid());
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut out = String::new();
    let status = loop {
        while let Some(l) = child.next_line(Duration::from_millis(20)) {
            out.push_str(&l);
            out.push('\n');
        }
        if let Ok(Some(st)) = child.child_mut().try_wait() {
            while let Some(l) = child.next_line(Duration::from_millis(200)) {
                out.push_str(&l);
                out.push('\n');
            }
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the quick start did not finish in 180 s:\n{out}"
        );
    };
    assert!(
        status.success() && out.contains("quickstart-done"),
        "the README's quick start failed ({status}):\n{out}"
    );

    // The program's own log: one process ran throughout (its counter never restarted or skipped), and it
    // printed the original, then the C patch's, then the Rust patch's text, then the original again.
    let log = std::fs::read_to_string(t.join("hello.log")).expect("hello.log");
    let mut phases: Vec<&str> = vec![];
    for (i, line) in log.lines().enumerate() {
        let (n, text) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("odd line {line:?}"));
        assert_eq!(n, i.to_string(), "the program restarted or lost lines:\n{log}");
        let phase = if text.contains("C patch") {
            "c"
        } else if text.contains("Rust patch") {
            "rust"
        } else if text.starts_with("hello from the original") {
            "original"
        } else {
            panic!("unexpected line {line:?}")
        };
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
    }
    assert_eq!(
        phases,
        ["original", "c", "rust", "original"],
        "the patches did not take effect in order:\n{log}\n{out}"
    );
    // The commands said so too.
    assert!(out.contains("apply of patch c-fix in pid"), "{out}");
    assert!(out.contains("apply of patch rust-fix in pid"), "{out}");
    assert!(out.contains("disable of patch rust-fix in pid"), "{out}");
    // `relive status` after the cumulative Rust patch: it alone is active (SPEC R1: c-fix was replaced).
    assert!(out.contains("patch          rust-fix [replace]"), "{out}");
    assert!(!out.contains("patch          c-fix"), "{out}");
}

/// Issue 7: `relive --help` and every subcommand's `--help` (hidden debug ones too) end with examples that
/// run that very command.
#[test]
fn t_issue7_every_help_ends_with_examples() {
    let help = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_relive"))
            .args(args)
            .output()
            .expect("run relive");
        assert_eq!(o.status.code(), Some(0), "relive {args:?}");
        String::from_utf8(o.stdout).expect("utf-8 help")
    };
    let top = help(&["--help"]);
    let cmds: Vec<String> = top
        .split("Commands:\n")
        .nth(1)
        .expect("a Commands: section")
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .chain(["load".to_owned(), "unload".to_owned()])
        .collect();
    assert!(cmds.len() >= 10, "{cmds:?}");
    let check = |name: &str, text: &str, prefix: &str| {
        let ex = text
            .rsplit("Examples:\n")
            .next()
            .filter(|_| text.contains("Examples:\n"))
            .unwrap_or_else(|| panic!("`{name} --help` has no Examples: section:\n{text}"));
        let lines: Vec<&str> = ex.lines().filter(|l| l.starts_with("  relive")).collect();
        assert!(
            !lines.is_empty(),
            "`{name} --help` has no example command:\n{text}"
        );
        assert!(
            lines.iter().all(|l| l.trim_start().starts_with(prefix)),
            "`{name} --help`: an example runs another command:\n{text}"
        );
        // Nothing but examples and their notes after the heading: no option list below it.
        assert!(
            !ex.contains("Options:"),
            "`{name} --help` does not end with its examples:\n{text}"
        );
    };
    check("relive", &top, "relive ");
    for c in &cmds {
        check(c, &help(&[c, "--help"]), &format!("relive {c}"));
    }
}
