//! Test support shared by the live tests: fixture programs compiled with exact flags, and
//! guarded targets (kill-on-drop, `PR_SET_PDEATHSIG`, readiness handshake, hard timeout).
#![forbid(unsafe_code)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use relive_proc::child::{GuardedChild, SpawnError, spawn_guarded};

/// How long a target may take to print its readiness line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The workspace root (the directory holding the root Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The directory holding the C fixture sources: `tests/targets/`.
pub fn targets_dir() -> PathBuf {
    workspace_root().join("tests/targets")
}

/// Where compiled fixtures go: `target/fixtures/`.
pub fn fixtures_out() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("fixtures");
    std::fs::create_dir_all(&dir).expect("create target/fixtures");
    dir
}

/// Compiles C sources (paths relative to `tests/targets/`, or absolute) with exactly `flags`
/// into an executable or shared object named `name`, and returns its path.
///
/// The output name carries a hash of the sources' contents and the flags, so a change of either
/// rebuilds, and concurrent tests never see a half-written file (write to a temp name, then rename).
pub fn compile_c(name: &str, sources: &[&str], flags: &[&str]) -> PathBuf {
    let srcs: Vec<PathBuf> = sources
        .iter()
        .map(|s| {
            let p = Path::new(s);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                targets_dir().join(p)
            }
        })
        .collect();
    let mut h = DefaultHasher::new();
    for s in &srcs {
        std::fs::read(s)
            .unwrap_or_else(|e| panic!("read fixture {}: {e}", s.display()))
            .hash(&mut h);
    }
    flags.hash(&mut h);
    let out = fixtures_out().join(format!("{name}-{:016x}", h.finish()));
    if out.exists() {
        return out;
    }
    // Unique per process and per call, so threads of one test binary never share a temp file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = out.with_extension(format!("tmp{}-{seq}", std::process::id()));
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(flags)
        .arg("-I")
        .arg(workspace_root().join("include"))
        .args(&srcs)
        .arg("-o")
        .arg(&tmp)
        .status()
        .expect("run the C compiler (cc)");
    assert!(status.success(), "compiling fixture {name} with {flags:?} failed");
    std::fs::rename(&tmp, &out).expect("rename compiled fixture");
    out
}

/// Starts `program args…` as a guarded target and waits for it to print a line containing `ready`.
pub fn spawn_target(program: &Path, args: &[&str], ready: &str) -> GuardedChild {
    let mut cmd = Command::new(program);
    cmd.args(args);
    spawn_guarded(cmd, ready, READY_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}
