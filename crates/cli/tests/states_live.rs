//! Live tests of the system-state API (SPEC §8, T-st1–T-st4) and of shadow variables across an atomic
//! replace (SPEC §7 SV7, §5 R4/R6, T-sv1's lifecycle) through `relive apply` / `relive disable`, on a real
//! process (tests/targets/states_host.c, agent preloaded). The patches' callbacks print what
//! `relive_state_get` / `relive_state_get_prev` returned (tests/targets/states_patch.c); the host prints its
//! `console_loglevel`, what `handle_request` returned and `relive_shadow_count()` on each "tick".

mod transition_common;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use relive_testkit::{compile_c, spawn_guarded};
use transition_common::{TARGET_FLAGS, Target, agent, ok, relive, text, text_and_maps};

const PATCH_FLAGS: &[&str] = &["-O2", "-g", "-fPIC", "-shared", "-Wall", "-Werror"];

fn host() -> Target {
    let exe = compile_c("states_host", &["states_host.c"], TARGET_FLAGS);
    let mut cmd = Command::new(exe);
    cmd.env("LD_PRELOAD", agent()).stdin(Stdio::piped());
    let child = spawn_guarded(cmd, "states host ready", Duration::from_secs(20)).expect("start states_host");
    Target { child, seen: vec![] }
}

/// tests/targets/states_patch.c as patch `name` declaring state 1 at `version` (replace unless told).
fn st_patch(name: &str, version: u32, extra: &[&str]) -> PathBuf {
    let mut flags: Vec<String> = PATCH_FLAGS.iter().map(|s| s.to_string()).collect();
    flags.push(format!("-DPATCH_NAME={name}"));
    flags.push(format!("-DSTATE_VERSION={version}"));
    flags.extend(extra.iter().map(|d| format!("-D{d}")));
    let f: Vec<&str> = flags.iter().map(String::as_str).collect();
    compile_c(&format!("states_patch_{name}"), &["states_patch.c"], &f)
}

fn shv_patch(version: u32) -> PathBuf {
    let mut flags: Vec<String> = PATCH_FLAGS.iter().map(|s| s.to_string()).collect();
    flags.push(format!("-DVERSION={version}"));
    let f: Vec<&str> = flags.iter().map(String::as_str).collect();
    compile_c(&format!("states_shv{version}"), &["states_shadow_patch.c"], &f)
}

/// One "tick" of the host: the callback lines printed since the last tick (they precede the tick line in
/// the pipe: callbacks print and flush before `relive` returns) and the tick line's fields.
fn tick(t: &mut Target) -> (Vec<String>, String) {
    t.send("tick");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut cbs = vec![];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = t
            .child
            .next_line(left)
            .expect("states_host stopped answering ticks (crashed?)");
        if let Some(rest) = l.strip_prefix("tick ") {
            return (cbs, rest.to_string());
        }
        cbs.push(l);
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// T-st1 (test-state "system state modification"): pre_patch allocates the state's data, post_patch fixes
/// the loglevel, pre_unpatch restores it, post_unpatch frees. In every callback `relive_state_get(self, 1)`
/// is the patch's own state (version 1) and `relive_state_get_prev(1)` is NULL (no earlier patch); outside a
/// transition get_prev is NULL too (ST2).
#[test]
fn t_st1_state_modification_callbacks_see_own_state() {
    let mut t = host();
    let pid = t.pid().to_string();
    assert_eq!(
        tick(&mut t),
        (vec![], "loglevel=4 r=-1,-1,-1 shadows=0 prev1=null".into())
    );
    let p = st_patch("st1", 1, &[]);
    ok(&["apply", &pid, p.to_str().unwrap()]);
    assert_eq!(
        tick(&mut t),
        (
            s(&[
                "cb st1 pre_patch self=1 prev=null allocate owner=st1",
                "cb st1 post_patch self=1 prev=null fix 4->8 owner=st1",
            ]),
            "loglevel=8 r=1000,1000,1000 shadows=0 prev1=null".into()
        )
    );
    ok(&["disable", &pid, "st1"]);
    assert_eq!(
        tick(&mut t),
        (
            s(&[
                "cb st1 pre_unpatch self=1 prev=null restore 4 owner=st1",
                "cb st1 post_unpatch self=1 prev=null free owner=st1",
            ]),
            "loglevel=4 r=-1,-1,-1 shadows=0 prev1=null".into()
        )
    );
}

/// T-st2 (test-state "taking over system state modification"): st2a, then the cumulative st2b finds st2a's
/// record through `relive_state_get_prev(1)` (same data, owner st2a) in pre_patch and post_patch and takes
/// over; st2a's callbacks do not run (R4) and its library leaves the process; disabling st2b restores the
/// loglevel and frees the data st2a allocated.
#[test]
fn t_st2_take_over_through_get_prev() {
    let mut t = host();
    let pid = t.pid().to_string();
    let a = st_patch("st2a", 1, &[]);
    let b = st_patch("st2b", 1, &[]);
    ok(&["apply", &pid, a.to_str().unwrap()]);
    let (cbs, line) = tick(&mut t);
    assert_eq!(cbs.len(), 2, "{cbs:?}");
    assert_eq!(line, "loglevel=8 r=1000,1000,1000 shadows=0 prev1=null");
    assert!(t.maps().contains("states_patch_st2a"), "st2a is loaded");
    ok(&["apply", &pid, b.to_str().unwrap()]);
    assert_eq!(
        tick(&mut t),
        (
            s(&[
                "cb st2b pre_patch self=1 prev=1 take-over owner=st2a",
                "cb st2b post_patch self=1 prev=1 take-over owner=st2a",
            ]),
            "loglevel=8 r=1000,1000,1000 shadows=0 prev1=null".into()
        )
    );
    assert!(
        !t.maps().contains("states_patch_st2a"),
        "R4: the replaced patch's library left the process"
    );
    let o = relive(&["disable", &pid, "st2a"]);
    assert_eq!(o.status.code(), Some(3), "st2a was replaced: {}", text(&o));
    ok(&["disable", &pid, "st2b"]);
    assert_eq!(
        tick(&mut t),
        (
            s(&[
                "cb st2b pre_unpatch self=1 prev=null restore 4 owner=st2a",
                "cb st2b post_unpatch self=1 prev=null free owner=st2a",
            ]),
            "loglevel=4 r=-1,-1,-1 shadows=0 prev1=null".into()
        )
    );
}

/// T-st3 (test-state "compatible cumulative livepatches"): st3a (state 1 v2), st3b (v2, replace) takes over,
/// then st3a again (same version) replaces st3b and takes over from it: each apply is accepted and each
/// successor sees its predecessor's record (version 2) and data.
#[test]
fn t_st3_compatible_cumulative_same_version() {
    let mut t = host();
    let pid = t.pid().to_string();
    let a = st_patch("st3a", 2, &[]);
    let b = st_patch("st3b", 2, &[]);
    ok(&["apply", &pid, a.to_str().unwrap()]);
    assert_eq!(
        tick(&mut t).0,
        s(&[
            "cb st3a pre_patch self=2 prev=null allocate owner=st3a",
            "cb st3a post_patch self=2 prev=null fix 4->8 owner=st3a",
        ])
    );
    ok(&["apply", &pid, b.to_str().unwrap()]);
    assert_eq!(
        tick(&mut t).0,
        s(&[
            "cb st3b pre_patch self=2 prev=2 take-over owner=st3a",
            "cb st3b post_patch self=2 prev=2 take-over owner=st3a",
        ])
    );
    ok(&["apply", &pid, a.to_str().unwrap()]);
    assert_eq!(
        tick(&mut t),
        (
            s(&[
                "cb st3a pre_patch self=2 prev=2 take-over owner=st3a",
                "cb st3a post_patch self=2 prev=2 take-over owner=st3a",
            ]),
            "loglevel=8 r=2000,2000,2000 shadows=0 prev1=null".into()
        )
    );
    ok(&["disable", &pid, "st3a"]);
    assert_eq!(
        tick(&mut t),
        (
            s(&[
                "cb st3a pre_unpatch self=2 prev=null restore 4 owner=st3a",
                "cb st3a post_unpatch self=2 prev=null free owner=st3a",
            ]),
            "loglevel=4 r=-1,-1,-1 shadows=0 prev1=null".into()
        )
    );
}

/// T-st4 (test-state "incompatible cumulative livepatches"): with st4b (state 1 v2) installed, a cumulative
/// st4a carrying state 1 at v1 is refused (ST3: no downgrade), and so is a cumulative patch without the state
/// (ST3: a replace patch must carry every state): exit 3, the exact message, no callback of the refused
/// patch runs, the target's text, map and loglevel are unchanged, st4b stays in charge.
#[test]
fn t_st4_incompatible_cumulative_refused_without_side_effects() {
    let mut t = host();
    let pid = t.pid().to_string();
    let b = st_patch("st4b", 2, &[]);
    ok(&["apply", &pid, b.to_str().unwrap()]);
    assert_eq!(tick(&mut t).0.len(), 2);
    for (p, what) in [
        (
            st_patch("st4a", 1, &[]),
            "patch 'st4a' is not compatible with the already installed patch 'st4b': state 1 would be \
             downgraded from version 2 to 1; apply a patch that carries the state at version 2 or newer",
        ),
        (
            st_patch("st4none", 1, &["NO_STATE"]),
            "patch 'st4none' is not compatible with the already installed patch 'st4b': state 1 is missing \
             (a replace patch must carry every installed state)",
        ),
    ] {
        let before = text_and_maps(&t);
        let o = relive(&["apply", &pid, p.to_str().unwrap()]);
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(3), "{msg}");
        assert!(msg.contains(&format!("pid {pid}")), "names the pid: {msg}");
        assert!(msg.contains(what), "expected {what:?} in: {msg}");
        let after = text_and_maps(&t);
        assert!(
            before.0 == after.0,
            "a refused apply changed the executable's text"
        );
        assert_eq!(before.1, after.1, "a refused apply changed the memory map");
        assert_eq!(
            tick(&mut t),
            (vec![], "loglevel=8 r=2000,2000,2000 shadows=0 prev1=null".into()),
            "no callback of the refused patch ran; st4b still active"
        );
    }
    ok(&["disable", &pid, "st4b"]);
    assert_eq!(tick(&mut t).1, "loglevel=4 r=-1,-1,-1 shadows=0 prev1=null");
}

/// SV7 / R4 / R6 through `relive apply`: shv1 (non-replace) counts requests per `struct conn` in a shadow
/// variable; the cumulative shv2 keeps counting on the same variables (same id), shv1's library leaves and
/// its unpatch callbacks never run; `relive disable shv2` runs shv2's post_unpatch, which frees them all with
/// `relive_shadow_free_all`: the process-wide count goes 3 → 0 (no leak).
#[test]
fn t_sv7_shadow_counters_survive_replace_and_are_freed_by_post_unpatch() {
    let mut t = host();
    let pid = t.pid().to_string();
    let v1 = shv_patch(1);
    let v2 = shv_patch(2);
    ok(&["apply", &pid, v1.to_str().unwrap()]);
    assert_eq!(
        tick(&mut t),
        (
            s(&["cb shv1 post_patch shadows=0 freed=0"]),
            "loglevel=4 r=1001,1001,1001 shadows=3 prev1=null".into()
        )
    );
    assert_eq!(tick(&mut t).1, "loglevel=4 r=1002,1002,1002 shadows=3 prev1=null");
    assert!(t.maps().contains("states_shv1"), "shv1 is loaded");
    ok(&["apply", &pid, v2.to_str().unwrap()]);
    // v2 inherits the counters: 2 requests each so far, the next one is the 3rd.
    assert_eq!(
        tick(&mut t),
        (
            s(&["cb shv2 post_patch shadows=3 freed=0"]),
            "loglevel=4 r=2003,2003,2003 shadows=3 prev1=null".into()
        )
    );
    assert!(
        !t.maps().contains("states_shv1"),
        "R4: the replaced patch's library left the process"
    );
    ok(&["disable", &pid, "shv2"]);
    assert_eq!(
        tick(&mut t),
        (
            s(&[
                "cb shv2 pre_unpatch shadows=3 freed=0",
                "cb shv2 post_unpatch shadows=0 freed=3",
            ]),
            "loglevel=4 r=-1,-1,-1 shadows=0 prev1=null".into()
        )
    );
}

/// ST2/ST4 on a reversal (L6, CB8): st5a installed; the cumulative st5b (state 1 v2) takes over in pre_patch,
/// but its transition stalls (a thread never leaves the old wait_request); `relive disable st5b` reverses
/// it: st5b's post_unpatch still sees st5a's record through `relive_state_get_prev(1)` (version 1, data owned
/// by st5a) and leaves the data to it; st5a stays in charge with its data intact, and its own disable
/// restores and frees.
#[test]
fn t_st2_reverse_leaves_data_to_predecessor() {
    let exe = compile_c("states_host", &["states_host.c"], TARGET_FLAGS);
    let mut cmd = Command::new(exe);
    cmd.arg("--stall")
        .env("LD_PRELOAD", agent())
        .stdin(Stdio::piped());
    let child = spawn_guarded(cmd, "states host ready", Duration::from_secs(20)).expect("start states_host");
    let mut t = Target { child, seen: vec![] };
    let pid = t.pid().to_string();
    let a = st_patch("st5a", 1, &[]);
    let b = st_patch("st5b", 2, &["STALL"]);
    ok(&["apply", &pid, a.to_str().unwrap()]);
    assert_eq!(tick(&mut t).0.len(), 2);
    ok(&["apply", &pid, b.to_str().unwrap(), "--no-wait"]);
    // st5b is in transition: its pre_patch took over st5a's data, and get_prev(1) answers (ST2) in any
    // thread of the process while the transition runs.
    let (cbs, line) = tick(&mut t);
    assert_eq!(cbs, s(&["cb st5b pre_patch self=2 prev=1 take-over owner=st5a"]));
    assert!(
        line.starts_with("loglevel=8 ") && line.ends_with(" prev1=set"),
        "{line}"
    );
    ok(&["disable", &pid, "st5b"]);
    assert_eq!(
        tick(&mut t),
        (
            s(&["cb st5b post_unpatch self=2 prev=1 keep owner=st5a"]),
            "loglevel=8 r=1000,1000,1000 shadows=0 prev1=null".into()
        )
    );
    ok(&["disable", &pid, "st5a"]);
    assert_eq!(
        tick(&mut t),
        (
            s(&[
                "cb st5a pre_unpatch self=1 prev=null restore 4 owner=st5a",
                "cb st5a post_unpatch self=1 prev=null free owner=st5a",
            ]),
            "loglevel=4 r=-1,-1,-1 shadows=0 prev1=null".into()
        )
    );
}
