//! `relive inspect` (DESIGN §4.9): the manifests of the example patches in Rust and C round-trip
//! (the printed manifest matches the declaration in examples/), and broken files give precise errors.

use assert_cmd::Command;
use relive_testkit::{compile_c, workspace_root};
use std::path::{Path, PathBuf};

fn relive() -> Command {
    Command::cargo_bin("relive").expect("relive binary")
}

/// The Rust example, built by cargo because it is a dev-dependency of this crate.
fn rust_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let p = deps.join("librust_hello_patch.so");
    assert!(
        p.is_file(),
        "{} missing: build with `cargo build -p rust-hello-patch`",
        p.display()
    );
    p
}

fn c_example() -> PathBuf {
    let src = workspace_root().join("examples/c-hello-patch/hello_fix.c");
    compile_c(
        "hello_fix.so",
        &[src.to_str().unwrap()],
        &["-O2", "-shared", "-fPIC"],
    )
}

fn inspect(p: &Path) -> (String, String, i32) {
    let out = relive().arg("inspect").arg(p).output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// The declaration in examples/rust-hello-patch/src/lib.rs, as `relive inspect` must print it.
const RUST_EXPECTED: &str = "patch rust-hello (manifest format v1)
  replace: no  stacking: no
  object exe (unpinned)
    func greet sympos 0 -> greet_v2
    callback pre_patch -> hello_pre_patch
    callback post_unpatch -> hello_post_unpatch
  state id 1 version 1
  import exe:greet_calls sympos 0 -> slot GREET_CALLS
";

/// The declaration in examples/c-hello-patch/hello_fix.c (its records are emitted in reverse order
/// by gcc; the reader does not depend on the order).
const C_EXPECTED: &str = "patch c-hello (manifest format v1)
  replace: no  stacking: yes
  object exe (unpinned)
    func greet sympos 0 -> greet_v2
    callback pre_patch -> hello_fix_pre_patch
    callback post_patch -> hello_fix_post_patch
  state id 1 version 2
  import exe:greet_calls sympos 0 -> slot p_greet_calls
";

#[test]
fn t_d4_9_inspect_rust_example_matches_declaration() {
    let (out, err, code) = inspect(&rust_example());
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, RUST_EXPECTED);
}

#[test]
fn t_d4_9_inspect_c_example_matches_declaration() {
    let (out, err, code) = inspect(&c_example());
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, C_EXPECTED);
}

#[test]
fn t_d4_9_inspect_json_is_pure_and_complete() {
    let out = relive()
        .args(["inspect", "--json"])
        .arg(c_example())
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let m = &v["manifest"];
    assert_eq!(m["name"], "c-hello");
    assert_eq!(m["format_version"], 1);
    assert_eq!(m["stacking"], true);
    assert_eq!(m["objects"][0]["funcs"][0]["new"], "greet_v2");
    assert_eq!(m["objects"][0]["callbacks"]["post_patch"], "hello_fix_post_patch");
    assert_eq!(m["states"][0]["version"], 2);
    assert_eq!(m["imports"][0]["slot"], "p_greet_calls");
}

/// Writes a modified copy of the C example.
fn mutated(name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(c_example()).unwrap();
    f(&mut b);
    let dir = tempfile::tempdir().unwrap().keep();
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn find(b: &[u8], pat: &[u8]) -> usize {
    b.windows(pat.len())
        .position(|w| w == pat)
        .expect("pattern in file")
}

/// A file that is not a usable patch is a refusal (exit 3), as in `apply` and `check`.
fn assert_error(p: &Path, needle: &str) {
    let (out, err, code) = inspect(p);
    assert_eq!(code, 3, "stdout {out:?} stderr {err:?}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert!(
        err.contains(&p.display().to_string()),
        "the error names the file: {err}"
    );
}

#[test]
fn t_d4_9_inspect_unknown_version_is_precise() {
    let p = mutated("v9.so", |b| {
        let i = find(b, b"relive-manifest/1");
        b[i + 16] = b'9';
    });
    assert_error(&p, "manifest format version 9");
}

#[test]
fn t_d4_9_inspect_corrupt_record_is_precise() {
    let p = mutated("corrupt.so", |b| {
        let i = find(b, b"relive-manifest/1");
        b[i..i + 6].copy_from_slice(b"garbag");
    });
    assert_error(&p, "does not start with `relive-manifest/N`");
    let p = mutated("badline.so", |b| {
        let i = find(b, b"sympos=0");
        b[i + 7] = b'x';
    });
    assert_error(&p, "`sympos=x` is not a number");
}

#[test]
fn t_d4_9_inspect_truncated_is_precise() {
    // Cut inside the manifest section: its header says more bytes than the file has.
    let p = mutated("cut.so", |b| {
        let i = find(b, b"relive-manifest/1");
        b.truncate(i + 10);
    });
    let (_, err, code) = inspect(&p);
    assert_eq!(code, 3);
    assert!(err.contains("truncated"), "{err}");
    // A record cut before its NUL terminator.
    let p = mutated("unterminated.so", |b| {
        let last = b.windows(17).rposition(|w| w == b"relive-manifest/1").unwrap();
        let nul = last + b[last..].iter().position(|&c| c == 0).unwrap();
        b[nul] = b'\n';
        // The section ends right after this record in the C example (records are contiguous).
        let mut j = nul + 1;
        while b[j] == 0 {
            b[j] = b' ';
            j += 1;
        }
    });
    let (_, err, code) = inspect(&p);
    assert_eq!(code, 3);
    assert!(
        err.contains("not NUL-terminated") || err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn t_d4_9_inspect_not_elf_or_not_patch() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.txt");
    std::fs::write(&p, "hello").unwrap();
    assert_error(
        &p,
        "not an ELF file (starts with 68 65 6c 6c, expected 7f 45 4c 46)",
    );
    let p = dir.path().join("empty.so");
    std::fs::write(&p, "").unwrap();
    assert_error(&p, "not an ELF file (the file is empty)");
    // An ELF file without a manifest: the agent itself.
    let agent = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("librelive_agent.so");
    let (_, err, code) = inspect(&agent);
    assert_eq!(code, 3);
    assert!(err.contains("no .relive_manifest section"), "{err}");
}

/// A file that cannot be read is an error (exit 1), worded as in `apply` and `check`.
#[test]
fn t_inspect_missing_file_is_an_error_worded_like_apply() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("missing.so");
    let (out, err, code) = inspect(&p);
    assert_eq!(code, 1, "stdout {out:?} stderr {err:?}");
    assert!(
        err.contains(&format!(
            "cannot read the patch file {}: No such file or directory",
            p.display()
        )),
        "{err}"
    );
}
