//! Issue 5 tests 6, 9 and 11: where the function lives (a shared library, a static function found only in
//! .symtab, -fcf-protection=full, -fpatchable-function-entry), threads that come and go during the
//! transition, and callers that rely on registers (GCC -fipa-ra).

mod transition_common;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use transition_common::*;

fn cycle(t: &mut Target, pid: &str, patch: &str, name: &str) {
    ok(&["apply", pid, patch]);
    let s = t.wait_workers(2);
    assert_eq!(num(&s, "mix"), 0, "{s:?}");
    ok(&["disable", pid, name]);
    let s = t.wait_workers(1);
    assert_eq!(num(&s, "mix"), 0, "{s:?}");
}

/// Test 6: a target built with -fcf-protection=full (entries start with endbr64, which is kept).
#[test]
fn serial_t_issue5_6_cf_protection_full() {
    let flags = [TARGET_FLAGS, &["-fcf-protection=full"]].concat();
    let mut t = oracle_with(&flags, &["--duty", "200"]);
    let pid = t.pid().to_string();
    let p = patch("cet", &["VERSION=2"]);
    let o = relive(&["check", &pid, p.to_str().unwrap()]);
    assert!(text(&o).contains("endbr") || o.status.success(), "{}", text(&o));
    cycle(&mut t, &pid, p.to_str().unwrap(), "cet");
}

/// Test 6: a target built with -fpatchable-function-entry=5 (a NOP pad: the old path is entry + pad).
#[test]
fn serial_t_issue5_6_patchable_function_entry_pad() {
    let flags = [TARGET_FLAGS, &["-fpatchable-function-entry=5"]].concat();
    let mut t = oracle_with(&flags, &["--duty", "200"]);
    let pid = t.pid().to_string();
    let p = patch("pfe", &["VERSION=2"]);
    let o = ok(&["check", &pid, p.to_str().unwrap()]);
    assert!(text(&o).contains("NOP pad"), "the entry is a pad: {}", text(&o));
    cycle(&mut t, &pid, p.to_str().unwrap(), "pfe");
}

/// Issue 5 "refuse … a function that has a branch target inside the overwritten bytes", when the branch comes
/// from the function's split-off cold part (`coldy.cold`, a separate symbol): check and apply refuse coldy.
#[test]
fn serial_t_issue5_entry_refused_when_its_cold_part_jumps_into_the_overwritten_bytes() {
    let flags = [TARGET_FLAGS, &["-DCOLD_PART"]].concat();
    let t = oracle_with(&flags, &["--duty", "200"]);
    let pid = t.pid().to_string();
    let p = patch("coldy", &["VERSION=2", "COLDY=1"]);
    let maps = t.maps();
    for cmd in ["check", "apply"] {
        let o = relive(&[cmd, &pid, p.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(3), "{cmd}: {}", text(&o));
        let m = text(&o);
        assert!(
            m.contains("coldy") && m.contains("inside the bytes"),
            "{cmd}: {m}"
        );
    }
    assert!(
        !t.maps().contains(p.to_str().unwrap()) && t.maps() == maps,
        "apply changed the memory map"
    );
}

/// Test 6: a target built with -fpatchable-function-entry=7,5: 5 NOPs before each symbol and 2 after. The
/// entry is a 2-byte jump at the symbol to a 5-byte jump in the NOPs before it (found through
/// `__patchable_function_entries`); the old path is the symbol + 2.
#[test]
fn serial_t_issue5_6_patchable_function_entry_pad_before_the_symbol() {
    let flags = [TARGET_FLAGS, &["-fpatchable-function-entry=7,5"]].concat();
    let mut t = oracle_with(&flags, &["--duty", "200"]);
    let pid = t.pid().to_string();
    let p = patch("pfe75", &["VERSION=2"]);
    let o = ok(&["check", &pid, p.to_str().unwrap()]);
    assert!(
        text(&o).contains("2-byte pad plus a pre-entry pad"),
        "the entry uses the pre-entry pad: {}",
        text(&o)
    );
    cycle(&mut t, &pid, p.to_str().unwrap(), "pfe75");
    cycle(&mut t, &pid, p.to_str().unwrap(), "pfe75");
}

/// A thread sleeping inside a new version that is entered through a register-preserving thunk (DESIGN §4.3a)
/// has the thunk's frame on its stack: its stack unwinds reliably through it (the thunk's return site and
/// frame size are registered with the unwinder, also by later commands), so another patch applies and
/// reverts while it sleeps. Found by an operator trial: the thread's stack was unreliable, which stalled
/// every later patch for 30 s.
#[test]
fn serial_t_issue5_a_thread_asleep_behind_a_thunk_does_not_block_other_patches() {
    let mut t = oracle_with(TARGET_FLAGS, &["--duty", "200", "--leafy"]);
    let pid = t.pid().to_string();
    let sleepy = patch("leafy", &["VERSION=2", "ONLY_F=1", "LEAFY_SLEEP=1"]);
    let o = ok(&["check", &pid, sleepy.to_str().unwrap()]);
    assert!(
        text(&o).contains("thunk"),
        "leafy is entered through a thunk: {}",
        text(&o)
    );
    ok(&["apply", &pid, sleepy.to_str().unwrap(), "--timeout", "20"]);
    t.wait_workers(2);
    // The leafy thread is now asleep in leafy_v, under the thunk's frame.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let st = ok(&["--json", "stacks", &pid]);
    assert!(text(&st).contains("relive thunk of patch leafy"), "{}", text(&st));
    let other = patch("other", &["VERSION=3", "STACKING=1"]);
    let o = relive(&[
        "apply",
        &pid,
        other.to_str().unwrap(),
        "--timeout",
        "20",
        "--allow-stacking",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    t.wait_workers(3);
    ok(&["disable", &pid, "other", "--timeout", "20"]);
    t.wait_workers(2);
}

/// Test 6: f and g live in a shared library of the target.
#[test]
fn serial_t_issue5_6_function_in_a_shared_library() {
    let lib = relive_testkit::compile_c(
        "libtransition_fg",
        &["transition_fg.c"],
        &["-O2", "-g", "-fPIC", "-shared"],
    );
    let flags = [
        TARGET_FLAGS,
        &["-DFG_IN_LIB", "-Wl,--no-as-needed", lib.to_str().unwrap()],
    ]
    .concat();
    let mut t = oracle_with(&flags, &["--duty", "200"]);
    let pid = t.pid().to_string();
    let soname = lib.file_name().unwrap().to_str().unwrap().to_string();
    let p = patch("inlib", &["VERSION=2", &format!("OBJECT={soname}")]);
    cycle(&mut t, &pid, p.to_str().unwrap(), "inlib");
}

struct Ipara {
    child: relive_testkit::GuardedChild,
}

impl Ipara {
    fn stats(&self) -> (u64, u64, u64) {
        while self.child.next_line(Duration::ZERO).is_some() {}
        let l = self
            .child
            .next_line(Duration::from_secs(10))
            .expect("ipara stats");
        let f = |k: &str| -> u64 {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap()
                .parse()
                .unwrap()
        };
        (f("calls"), f("bad"), f("new"))
    }
}

/// Tests 6 and 11 (DESIGN §4.3a): a static leaf (only in .symtab) whose GCC -O2 caller keeps values in
/// call-clobbered registers across the call, replaced by a version that clobbers every call-clobbered register,
/// general and vector: the caller's results stay exactly right.
#[test]
fn serial_t_issue5_11_static_leaf_callers_relying_on_registers_ipa_ra() {
    let exe = relive_testkit::compile_c(
        "transition_ipara",
        &["transition_ipara.c"],
        &["-O2", "-g", "-pthread", "-rdynamic"],
    );
    let mut cmd = Command::new(exe);
    cmd.env("LD_PRELOAD", agent()).stdin(Stdio::null());
    let t = Ipara {
        child: relive_testkit::spawn_guarded(cmd, "ipara ready", Duration::from_secs(20)).unwrap(),
    };
    let pid = t.child.pid().to_string();
    let p = relive_testkit::compile_c(
        "transition_ipara_patch",
        &["transition_ipara_patch.c"],
        &["-O2", "-g", "-fPIC", "-shared"],
    );
    let o = ok(&["check", &pid, p.to_str().unwrap()]);
    assert!(
        text(&o).contains("thunk"),
        "the analysis finds registers callers rely on: {}",
        text(&o)
    );
    ok(&["apply", &pid, p.to_str().unwrap()]);
    let (_, _, new0) = t.stats();
    let deadline = Instant::now() + Duration::from_secs(2);
    let (calls, bad, new) = loop {
        let s = t.stats();
        if s.2 > new0 + 1_000_000 || Instant::now() > deadline {
            break s;
        }
    };
    assert!(new > new0, "the new leaf runs: {new0} -> {new}");
    assert_eq!(
        bad, 0,
        "callers lost register values across the new leaf ({calls} calls)"
    );
    ok(&["disable", &pid, "ipara"]);
    assert_eq!(t.stats().1, 0);
}

/// Test 9: threads are created and exit during the transitions, 1,000 in all; the transitions complete and
/// every thread created after a transition completed runs its target version.
#[test]
fn serial_t_issue5_9_threads_come_and_go() {
    let mut t = oracle(&["--duty", "200"]);
    let pid = t.pid().to_string();
    let p = patch("churn", &["VERSION=2"]);
    t.send("churn 1000");
    for _ in 0..3 {
        // New threads are checked only once the command completed: during a transition either version is
        // right, so the check is off ("want 0") from before the command until it returned.
        t.send("want 0");
        ok(&["apply", &pid, p.to_str().unwrap()]);
        t.send("want 2");
        let s = t.wait_workers(2);
        assert_eq!(num(&s, "churn_bad"), 0, "{s:?}");
        t.send("want 0");
        ok(&["disable", &pid, "churn"]);
        t.send("want 1");
        let s = t.wait_workers(1);
        assert_eq!(num(&s, "churn_bad"), 0, "{s:?}");
        assert_eq!(num(&s, "mix"), 0, "{s:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = t.stats();
        assert_eq!(num(&s, "mix"), 0);
        assert_eq!(num(&s, "churn_bad"), 0, "{s:?}");
        if num(&s, "churn") >= 1000 {
            break;
        }
        assert!(Instant::now() < deadline, "the churner did not finish: {s:?}");
    }
}

/// Issue 5 tests run on a Rust target too: the Rust oracle (tests/targets/transition_oracle.rs, built with
/// rustc at test time), patched by the same C patches, 10 apply/disable cycles with zero mix.
#[test]
fn serial_t_issue5_1_rust_target_oracle() {
    use std::hash::{Hash, Hasher};
    let src = relive_testkit::targets_dir().join("transition_oracle.rs");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(&src).unwrap().hash(&mut h);
    let exe = relive_testkit::fixtures_out().join(format!("transition_oracle_rs-{:016x}", h.finish()));
    if !exe.exists() {
        let tmp = exe.with_extension(format!("tmp{}", std::process::id()));
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let st = Command::new(rustc)
            .args(["--edition", "2024", "-O", "-g", "-C", "link-args=-rdynamic", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("run rustc");
        assert!(st.success(), "rustc failed on {}", src.display());
        std::fs::rename(&tmp, &exe).unwrap();
    }
    let mut cmd = Command::new(&exe);
    cmd.env("LD_PRELOAD", agent()).stdin(Stdio::piped());
    let child = relive_testkit::spawn_guarded(cmd, "oracle ready", Duration::from_secs(20)).unwrap();
    let mut t = Target { child, seen: vec![] };
    let pid = t.pid().to_string();
    let p = patch("rs", &["VERSION=2"]);
    for _ in 0..10 {
        cycle(&mut t, &pid, p.to_str().unwrap(), "rs");
    }
    assert!(t.alive());
}
