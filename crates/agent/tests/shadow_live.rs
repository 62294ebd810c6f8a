//! Live: a C target (tests/targets/shadow_conn.c) preloaded with librelive_agent.so attaches a
//! per-connection counter to its own structs through the exported shadow C ABI
//! (include/relive_shadow.h, weak symbols bound to the agent), from 6 threads and from signal
//! handlers, then frees everything (SPEC §7 SV1–SV6; issue 6).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use relive_testkit::{GuardedChild, compile_c, spawn_guarded};

const FLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-pthread",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fcf-protection",
];
const LINE_TIMEOUT: Duration = Duration::from_secs(60);

/// The agent cdylib cargo built with this test binary: `target/<profile>/deps/librelive_agent.so`
/// (built together with the rlib this test links, so it is never stale; cargo copies it up to
/// `target/<profile>/` only for `cargo build`), else `target/<profile>/librelive_agent.so`.
fn agent_so() -> PathBuf {
    if let Some(p) = std::env::var_os("RELIVE_AGENT") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("target/<profile>/deps");
    let candidates = [
        deps.join("librelive_agent.so"),
        deps.join("../librelive_agent.so"),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!("librelive_agent.so not found in {candidates:?}: build it with `cargo build -p relive-agent` (or set RELIVE_AGENT)")
    })
}

fn target() -> PathBuf {
    compile_c("shadow_conn", &["shadow_conn.c"], FLAGS)
}

fn next(child: &GuardedChild, what: &str) -> String {
    let line = child
        .next_line(LINE_TIMEOUT)
        .unwrap_or_else(|| panic!("target pid {} printed no {what} line", child.pid()));
    assert!(!line.starts_with("FAIL"), "target pid {}: {line}", child.pid());
    line
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn live_c_target_uses_shadow_abi_per_connection_counters() {
    let exe = target();
    let so = agent_so();
    let stderr_path = std::env::temp_dir().join(format!("relive-shadow-live-{}.stderr", std::process::id()));
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut cmd = Command::new(&exe);
    cmd.arg("2000").env("LD_PRELOAD", &so).stderr(stderr);
    let mut child =
        spawn_guarded(cmd, "ready", relive_testkit::READY_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let pid = child.pid();

    let sv2 = next(&child, "sv2");
    assert!(sv2.starts_with("sv2 empty ok"), "{sv2}");
    let base: usize = field(&sv2, "base").parse().unwrap();
    assert_eq!(base, 0, "a fresh process has no shadow variables");

    let sv4 = next(&child, "sv4");
    assert!(sv4.starts_with("sv4 counters ok"), "{sv4}");
    assert_eq!(
        field(&sv4, "ctor_calls"),
        "256",
        "one ctor per connection across 6 threads: {sv4}"
    );
    assert_eq!(field(&sv4, "requests_per_conn"), "12000");
    assert_eq!(
        field(&sv4, "handler_bad"),
        "0",
        "get in a signal handler returned foreign data"
    );
    assert!(
        field(&sv4, "handler_hits").parse::<u64>().unwrap() > 0,
        "no handler ran: {sv4}"
    );

    let dup = next(&child, "sv3 duplicate");
    assert!(dup.starts_with("sv3 duplicate") && dup.ends_with("null"), "{dup}");
    let (obj, id) = (field(&dup, "obj").to_string(), field(&dup, "id").to_string());
    let sv3 = next(&child, "sv3");
    assert_eq!(sv3, "sv3 ok count=257");

    let sv6 = next(&child, "sv6");
    assert_eq!(
        sv6, "sv6 ok ctor_calls=256 dtor_calls=256 count_after=0",
        "nothing may leak"
    );
    assert_eq!(next(&child, "done"), "done");
    let status = child.child_mut().wait().expect("wait");
    assert!(status.success(), "target pid {pid} exited with {status}");

    // The agent's diagnostics, rate-limited, name the object and the id (SV3).
    let err = std::fs::read_to_string(&stderr_path).unwrap();
    let _ = std::fs::remove_file(&stderr_path);
    let want = format!("relive-agent[{pid}]: shadow: Duplicate shadow variable <{obj}, {id}>");
    assert!(err.contains(&want), "stderr lacks {want:?}:\n{err}");
    assert!(
        err.lines().any(|l| l.starts_with(&format!(
            "relive-agent[{pid}]: shadow: Failed to construct shadow variable <0x"
        )) && l.ends_with(", 0x746167> (-12)")),
        "stderr lacks the failed-ctor line:\n{err}"
    );
}

/// The same program without the agent finds no shadow functions: the ABI really comes from the
/// preloaded librelive_agent.so (and the test above can fail).
#[test]
fn live_c_target_without_agent_reports_missing_abi() {
    let exe = target();
    let mut cmd = Command::new(&exe);
    cmd.arg("1").env_remove("LD_PRELOAD");
    // The readiness line is the refusal itself.
    let mut child = spawn_guarded(
        cmd,
        "agent missing: relive_shadow_* not found",
        relive_testkit::READY_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let status = child.child_mut().wait().expect("wait");
    assert_eq!(status.code(), Some(2), "{status}");
}

/// Fork safety: a child forked while other threads allocate and free shadow variables gets a
/// usable store (the agent hands the store lock over across fork with pthread_atfork) and sees
/// the parent's variables.
#[test]
fn live_fork_during_shadow_writes_leaves_child_store_usable() {
    let exe = compile_c("shadow_fork", &["shadow_fork.c"], FLAGS);
    let mut cmd = Command::new(&exe);
    cmd.arg("150").env("LD_PRELOAD", agent_so());
    let mut child =
        spawn_guarded(cmd, "ready", relive_testkit::READY_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next(&child, "forks ok"), "forks ok n=150");
    let status = child.child_mut().wait().expect("wait");
    assert!(
        status.success(),
        "target pid {} exited with {status}",
        child.pid()
    );
}

const PATCH_FLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-shared",
    "-fPIC",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fcf-protection",
];

/// SV7 end to end with real patch objects, loaded by the target itself (standing in for `relive
/// apply`, which drives the same dlopen from the agent's service thread): C patch v1 adds a
/// per-connection counter to the target's `struct conn`; the cumulative v2 inherits the counters
/// (even after v1 is dlclose'd) and keeps counting; v2's post_unpatch frees them all; nothing leaks.
/// The patches leave `relive_shadow_*` undefined and are opened with RTLD_NOW, so every symbol
/// must bind to the preloaded agent.
#[test]
fn live_c_patch_v1_then_cumulative_v2_inherit_shadow_counters() {
    let v1 = compile_c("shadow_patch_v1.so", &["shadow_patch_v1.c"], PATCH_FLAGS);
    let v2 = compile_c("shadow_patch_v2.so", &["shadow_patch_v2.c"], PATCH_FLAGS);
    let host = compile_c("shadow_host", &["shadow_host.c"], FLAGS);
    let mut cmd = Command::new(&host);
    cmd.arg(&v1).arg(&v2).env("LD_PRELOAD", agent_so());
    let mut child =
        spawn_guarded(cmd, "ready", relive_testkit::READY_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        next(&child, "v1 served"),
        "v1 served per_conn=2000 conn0=2000 count=64"
    );
    assert_eq!(
        next(&child, "v1 unloaded"),
        "v1 unloaded count=64",
        "SV7: unloading v1 frees nothing"
    );
    assert_eq!(
        next(&child, "v2 inherited"),
        "v2 inherited per_conn=3200 origin=v1 count=64"
    );
    assert_eq!(
        next(&child, "post_unpatch"),
        "v2 post_unpatch freed=64 count=0",
        "nothing may leak"
    );
    assert_eq!(next(&child, "done"), "done");
    let status = child.child_mut().wait().expect("wait");
    assert!(
        status.success(),
        "target pid {} exited with {status}",
        child.pid()
    );
}

/// A Rust patch cdylib built on relive-patch's typed `Shadow<T>`: the cumulative successor of the
/// C patch v1, with the same id and a `#[repr(C)]` type of the same layout.
const RUST_PATCH_V2: &str = r#"
use core::ffi::{c_long, c_void};
use core::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};
use relive_patch::shadow::Shadow;

/// Layout of shadow_patch_v1.c's `struct conn_requests`.
#[repr(C)]
struct ConnRequests {
    count: AtomicI64,
    version_seen: i64,
}

static FREED: AtomicU64 = AtomicU64::new(0);
impl Drop for ConnRequests {
    fn drop(&mut self) {
        FREED.fetch_add(1, SeqCst);
    }
}

// SAFETY: id "reqs" holds a ConnRequests in every version of this patch, C or Rust.
static REQUESTS: Shadow<ConnRequests> = unsafe { Shadow::new(0x7265_7173) };

#[unsafe(no_mangle)]
pub extern "C" fn patch_handle_request(c: *mut c_void) -> c_long {
    match REQUESTS.get_or_alloc_with(c, || ConnRequests { count: AtomicI64::new(0), version_seen: 2 }) {
        Some(r) => r.count.fetch_add(1, SeqCst) + 1,
        None => -1,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn patch_counter_origin(c: *mut c_void) -> c_long {
    REQUESTS.get(c).map_or(0, |r| r.version_seen)
}

#[unsafe(no_mangle)]
pub extern "C" fn patch_post_unpatch() -> c_long {
    // SAFETY: called after the last patch is disabled: no thread runs the patched code.
    unsafe { REQUESTS.free_all() };
    FREED.load(SeqCst) as c_long
}
"#;

/// Builds RUST_PATCH_V2 as a cdylib against this workspace's relive-patch (a standalone crate in
/// target/fixtures/, its own target dir; relive-patch has no dependencies, so this is offline).
fn build_rust_patch() -> PathBuf {
    let dir = relive_testkit::fixtures_out().join("shadow-rust-patch-v2");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let manifest = format!(
        "[package]\nname = \"shadow_rust_patch_v2\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\npath = \"src/lib.rs\"\n\n\
         [dependencies]\nrelive-patch = {{ path = {:?} }}\n\n[workspace]\n",
        relive_testkit::workspace_root().join("crates/patch")
    );
    for (path, text) in [
        (dir.join("Cargo.toml"), manifest.as_str()),
        (dir.join("src/lib.rs"), RUST_PATCH_V2),
    ] {
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
            std::fs::write(&path, text).unwrap();
        }
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--offline", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building the Rust patch failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("target/debug/libshadow_rust_patch_v2.so")
}

/// SV7 across languages: the Rust cumulative patch (relive-patch's `Shadow<T>`, a cdylib whose
/// `relive_shadow_*` bind to the preloaded agent at dlopen) takes over the counters that the C
/// patch v1 attached, and its post_unpatch frees them through `Shadow::free_all` (Drop as dtor).
#[test]
fn live_c_patch_v1_then_rust_cumulative_v2_typed_shadow() {
    let v1 = compile_c("shadow_patch_v1.so", &["shadow_patch_v1.c"], PATCH_FLAGS);
    let v2 = build_rust_patch();
    let host = compile_c("shadow_host", &["shadow_host.c"], FLAGS);
    let mut cmd = Command::new(&host);
    cmd.arg(&v1).arg(&v2).env("LD_PRELOAD", agent_so());
    let mut child =
        spawn_guarded(cmd, "ready", relive_testkit::READY_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        next(&child, "v1 served"),
        "v1 served per_conn=2000 conn0=2000 count=64"
    );
    assert_eq!(next(&child, "v1 unloaded"), "v1 unloaded count=64");
    assert_eq!(
        next(&child, "v2 inherited"),
        "v2 inherited per_conn=3200 origin=v1 count=64"
    );
    assert_eq!(
        next(&child, "post_unpatch"),
        "v2 post_unpatch freed=64 count=0",
        "Drop ran once per counter"
    );
    assert_eq!(next(&child, "done"), "done");
    let status = child.child_mut().wait().expect("wait");
    assert!(
        status.success(),
        "target pid {} exited with {status}",
        child.pid()
    );
}
