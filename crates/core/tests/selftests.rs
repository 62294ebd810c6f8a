//! SPEC.md §10: the kernel selftest scenarios, against a simulated process whose threads have stacks. The
//! expected log lines are the kernel's (tools/testing/selftests/livepatch), minus the shell commands; each
//! test is named after its catalogue id.

mod common;

use common::*;
use relive_core::{
    CallbackKind, CallbackSet, Code, Error, FuncId, FuncSpec, ObjectSpec, PatchSpec, PatchState, Range,
    SwitchOutcome, ThreadStack, Tid,
};

const CMDLINE_OLD: Range = Range::new(0x1000, 0x1100);
const LP_NEW: Range = Range::new(0x10_0000, 0x10_0100);
const REPLACE_NEW: Range = Range::new(0x20_0000, 0x20_0100);
const OTHER: u64 = 0x9000; // code no patch touches
const ROOT: u64 = 0x8000; // the thread root's return address

fn cmdline() -> FuncId {
    FuncId::new(vmlinux(), "cmdline_proc_show", 0)
}

/// `test_klp_livepatch`: replaces cmdline_proc_show.
fn livepatch(name: &str, new: Range) -> PatchSpec {
    PatchSpec::new(name).object(ObjectSpec::new(vmlinux()).func(FuncSpec::new(
        "cmdline_proc_show",
        CMDLINE_OLD,
        new,
    )))
}

fn enable_lines(p: &str) -> Vec<String> {
    lines(&[
        &format!("livepatch: enabling patch '{p}'"),
        &format!("livepatch: '{p}': initializing patching transition"),
        &format!("livepatch: '{p}': starting patching transition"),
        &format!("livepatch: '{p}': completing patching transition"),
        &format!("livepatch: '{p}': patching complete"),
    ])
}

fn disable_lines(p: &str) -> Vec<String> {
    lines(&[
        &format!("livepatch: '{p}': initializing unpatching transition"),
        &format!("livepatch: '{p}': starting unpatching transition"),
        &format!("livepatch: '{p}': completing unpatching transition"),
        &format!("livepatch: '{p}': unpatching complete"),
    ])
}

/// Two threads idle in unrelated code.
fn sim_with_threads() -> Sim {
    let mut sim = Sim::new();
    sim.spawn(1, ThreadStack::reliable(vec![OTHER, ROOT]));
    sim.spawn(2, ThreadStack::reliable(vec![OTHER + 4, OTHER + 0x10, ROOT]));
    sim
}

#[test]
fn t_lp1_basic_enable_disable() {
    let mut sim = sim_with_threads();
    sim.load_and_settle(livepatch("test_klp_livepatch", LP_NEW));
    assert_eq!(sim.take_log(), enable_lines("test_klp_livepatch"));
    assert_eq!(
        sim.call(1, &cmdline()),
        new_code("test_klp_livepatch", LP_NEW),
        "output patched"
    );
    assert_eq!(
        sim.tls.values().copied().collect::<Vec<_>>(),
        vec![PatchState::Idle; 2]
    );

    sim.disable_and_settle("test_klp_livepatch");
    assert_eq!(sim.take_log(), disable_lines("test_klp_livepatch"));
    assert_eq!(sim.call(1, &cmdline()), Code::Original, "original output");
    // rmmod: the library is unloaded at the end of the disable (L4.5).
    assert_eq!(sim.dropped, ["test_klp_livepatch"]);
    assert!(sim.libs.is_empty() && sim.entries.is_empty() && sim.model.patches().is_empty());
}

#[test]
fn t_lp2_multiple_livepatches() {
    // Upstream, a non-replace B on A's function is accepted (K2). relive refuses it by default (K5), so B
    // opts in to stacking; the kernel's behaviour follows.
    let mut sim = sim_with_threads();
    sim.load_and_settle(livepatch("test_klp_livepatch", LP_NEW));
    sim.load_and_settle(livepatch("test_klp_atomic_replace", REPLACE_NEW).stacking(true));
    let mut expected = enable_lines("test_klp_livepatch");
    expected.extend(enable_lines("test_klp_atomic_replace"));
    assert_eq!(sim.take_log(), expected);
    assert_eq!(
        sim.call(2, &cmdline()),
        new_code("test_klp_atomic_replace", REPLACE_NEW)
    );
    assert_eq!(sim.model.stack_order("test_klp_livepatch"), Some(1));
    assert_eq!(sim.model.stack_order("test_klp_atomic_replace"), Some(2));

    // Disabling B leaves A active.
    sim.disable_and_settle("test_klp_atomic_replace");
    assert_eq!(sim.take_log(), disable_lines("test_klp_atomic_replace"));
    assert_eq!(sim.call(2, &cmdline()), new_code("test_klp_livepatch", LP_NEW));
    assert_eq!(sim.model.stack_order("test_klp_livepatch"), Some(1));

    sim.disable_and_settle("test_klp_livepatch");
    assert_eq!(sim.take_log(), disable_lines("test_klp_livepatch"));
    assert_eq!(sim.call(2, &cmdline()), Code::Original);
}

#[test]
fn t_lp3_atomic_replace() {
    let mut sim = sim_with_threads();
    sim.load_and_settle(livepatch("test_klp_livepatch", LP_NEW));
    sim.load_and_settle(livepatch("test_klp_atomic_replace", REPLACE_NEW).replace(true));
    let mut expected = enable_lines("test_klp_livepatch");
    expected.extend(enable_lines("test_klp_atomic_replace"));
    assert_eq!(sim.take_log(), expected);
    // Only B's effect; A is gone and its library may be unloaded (R7, L8).
    assert_eq!(
        sim.call(1, &cmdline()),
        new_code("test_klp_atomic_replace", REPLACE_NEW)
    );
    assert_eq!(sim.dropped, ["test_klp_livepatch"]);
    assert!(!sim.libs.contains("test_klp_livepatch"));
    assert_eq!(sim.model.patches().len(), 1);

    sim.disable_and_settle("test_klp_atomic_replace");
    assert_eq!(sim.take_log(), disable_lines("test_klp_atomic_replace"));
    assert_eq!(sim.call(1, &cmdline()), Code::Original);
}

#[test]
fn t_lp4_replace_leaves_exactly_one_patch() {
    let mut sim = sim_with_threads();
    for (i, name) in ["lp_a", "lp_b", "lp_c"].iter().enumerate() {
        let f = FuncSpec::new(
            &format!("func_{i}"),
            Range::new(0x3_0000 * (i as u64 + 1), 0x3_0000 * (i as u64 + 1) + 0x40),
            Range::new(0x10_0000 * (i as u64 + 1), 0x10_0000 * (i as u64 + 1) + 0x40),
        );
        sim.load_and_settle(PatchSpec::new(name).object(ObjectSpec::new(vmlinux()).func(f)));
    }
    assert_eq!(sim.model.patches().len(), 3);
    sim.load_and_settle(livepatch("lp_replace", REPLACE_NEW).replace(true));
    let names: Vec<&str> = sim.model.patches().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["lp_replace"], "exactly one patch left");
    assert_eq!(sim.dropped, ["lp_a", "lp_b", "lp_c"]);
    // The nops did their job: func_0..2 run the original again, and no entry is left for them.
    for i in 0..3 {
        assert_eq!(
            sim.call(1, &FuncId::new(vmlinux(), &format!("func_{i}"), 1)),
            Code::Original
        );
    }
    assert_eq!(sim.entries.len(), 1);
    assert_eq!(sim.model.stack_order("lp_replace"), Some(1));
}

/// `test_klp_callbacks_demo`: objects vmlinux and a target module, all four callbacks.
fn callbacks_demo(name: &str, module_name: &str, module_loaded: bool) -> PatchSpec {
    PatchSpec::new(name)
        .object(ObjectSpec::new(vmlinux()).callbacks(CallbackSet::ALL))
        .object(
            ObjectSpec::new(module(module_name))
                .loaded(module_loaded)
                .callbacks(CallbackSet::ALL)
                .func(if module_loaded {
                    FuncSpec::new(
                        "busymod_work_func",
                        Range::new(0x5000, 0x5100),
                        Range::new(0x50_0000, 0x50_0100),
                    )
                } else {
                    FuncSpec::unresolved("busymod_work_func")
                }),
        )
}

#[test]
fn t_cb1_target_module_before_livepatch() {
    let mut sim = sim_with_threads();
    sim.load_and_settle(callbacks_demo(
        "test_klp_callbacks_demo",
        "test_klp_callbacks_mod",
        true,
    ));
    sim.disable_and_settle("test_klp_callbacks_demo");
    assert_eq!(
        sim.take_log(),
        lines(&[
            "livepatch: enabling patch 'test_klp_callbacks_demo'",
            "livepatch: 'test_klp_callbacks_demo': initializing patching transition",
            "test_klp_callbacks_demo: pre_patch_callback: vmlinux",
            "test_klp_callbacks_demo: pre_patch_callback: test_klp_callbacks_mod -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'test_klp_callbacks_demo': starting patching transition",
            "livepatch: 'test_klp_callbacks_demo': completing patching transition",
            "test_klp_callbacks_demo: post_patch_callback: vmlinux",
            "test_klp_callbacks_demo: post_patch_callback: test_klp_callbacks_mod -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'test_klp_callbacks_demo': patching complete",
            "livepatch: 'test_klp_callbacks_demo': initializing unpatching transition",
            "test_klp_callbacks_demo: pre_unpatch_callback: vmlinux",
            "test_klp_callbacks_demo: pre_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'test_klp_callbacks_demo': starting unpatching transition",
            "livepatch: 'test_klp_callbacks_demo': completing unpatching transition",
            "test_klp_callbacks_demo: post_unpatch_callback: vmlinux",
            "test_klp_callbacks_demo: post_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'test_klp_callbacks_demo': unpatching complete",
        ])
    );
}

#[test]
fn t_cb5_target_module_never_loaded() {
    let mut sim = sim_with_threads();
    sim.load_and_settle(callbacks_demo(
        "test_klp_callbacks_demo",
        "test_klp_callbacks_mod",
        false,
    ));
    sim.disable_and_settle("test_klp_callbacks_demo");
    assert_eq!(
        sim.take_log(),
        lines(&[
            "livepatch: enabling patch 'test_klp_callbacks_demo'",
            "livepatch: 'test_klp_callbacks_demo': initializing patching transition",
            "test_klp_callbacks_demo: pre_patch_callback: vmlinux",
            "livepatch: 'test_klp_callbacks_demo': starting patching transition",
            "livepatch: 'test_klp_callbacks_demo': completing patching transition",
            "test_klp_callbacks_demo: post_patch_callback: vmlinux",
            "livepatch: 'test_klp_callbacks_demo': patching complete",
            "livepatch: 'test_klp_callbacks_demo': initializing unpatching transition",
            "test_klp_callbacks_demo: pre_unpatch_callback: vmlinux",
            "livepatch: 'test_klp_callbacks_demo': starting unpatching transition",
            "livepatch: 'test_klp_callbacks_demo': completing unpatching transition",
            "test_klp_callbacks_demo: post_unpatch_callback: vmlinux",
            "livepatch: 'test_klp_callbacks_demo': unpatching complete",
        ])
    );
}

#[test]
fn t_cb6_pre_patch_failure_cancels_the_enable() {
    let mut sim = sim_with_threads();
    // pre_patch_ret=-19 for vmlinux.
    sim.hook = Box::new(|patch, obj, kind, _prev| {
        let ret = if kind == CallbackKind::PrePatch { -19 } else { 0 };
        (vec![demo_line(patch, obj, kind)], ret)
    });
    let err = sim
        .load(callbacks_demo(
            "test_klp_callbacks_demo",
            "test_klp_callbacks_mod",
            true,
        ))
        .unwrap_err();
    assert_eq!(
        sim.take_log(),
        lines(&[
            "livepatch: enabling patch 'test_klp_callbacks_demo'",
            "livepatch: 'test_klp_callbacks_demo': initializing patching transition",
            "test_klp_callbacks_demo: pre_patch_callback: vmlinux",
            "livepatch: pre-patch callback failed for object 'vmlinux'",
            "livepatch: failed to enable patch 'test_klp_callbacks_demo'",
            "livepatch: 'test_klp_callbacks_demo': canceling patching transition, going to unpatch",
            "livepatch: 'test_klp_callbacks_demo': completing unpatching transition",
            "livepatch: 'test_klp_callbacks_demo': unpatching complete",
        ])
    );
    // The load fails with that errno (ENODEV = 19); nothing is left behind.
    assert!(matches!(&err, Error::PrePatchFailed { code: -19, object, .. } if object.name() == "vmlinux"));
    assert!(err.to_string().contains("test_klp_callbacks_demo") && err.to_string().contains("vmlinux"));
    assert!(sim.model.patches().is_empty() && sim.model.transition().is_none());
    assert!(sim.entries.is_empty() && sim.libs.is_empty());
    assert!(sim.tls.values().all(|s| *s == PatchState::Idle));
}

const BUSY_OLD: Range = Range::new(0x5000, 0x5100);
const MOD_OLD: Range = Range::new(0x6000, 0x6100);

fn busymod_work_func() -> FuncId {
    FuncId::new(module("test_klp_callbacks_busy"), "busymod_work_func", 0)
}

fn mod_work_func() -> FuncId {
    FuncId::new(module("test_klp_callbacks_mod"), "callbacks_mod_work", 0)
}

/// The full `test_klp_callbacks_demo`: objects vmlinux, test_klp_callbacks_mod and test_klp_callbacks_busy,
/// all with the four callbacks; the busy module's work function is replaced (and, here, one function of
/// the mod module, so that late loading also pushes a func).
fn demo3(mod_loaded: bool, busy_loaded: bool) -> PatchSpec {
    let func = |loaded: bool, name: &str, old: Range, new: Range| {
        if loaded {
            FuncSpec::new(name, old, new)
        } else {
            FuncSpec {
                old: None,
                ..FuncSpec::new(name, old, new)
            }
        }
    };
    PatchSpec::new("test_klp_callbacks_demo")
        .object(ObjectSpec::new(vmlinux()).callbacks(CallbackSet::ALL))
        .object(
            ObjectSpec::new(module("test_klp_callbacks_mod"))
                .loaded(mod_loaded)
                .callbacks(CallbackSet::ALL)
                .func(func(
                    mod_loaded,
                    "callbacks_mod_work",
                    MOD_OLD,
                    Range::new(0x60_0000, 0x60_0100),
                )),
        )
        .object(
            ObjectSpec::new(module("test_klp_callbacks_busy"))
                .loaded(busy_loaded)
                .callbacks(CallbackSet::ALL)
                .func(func(
                    busy_loaded,
                    "busymod_work_func",
                    BUSY_OLD,
                    Range::new(0x50_0000, 0x50_0100),
                )),
        )
}

#[test]
fn t_cb2_module_coming_after_the_patch() {
    let mut sim = sim_with_threads();
    sim.load_and_settle(demo3(false, false));
    sim.load_object(&module("test_klp_callbacks_mod"), &[(mod_work_func(), MOD_OLD)])
        .unwrap();
    // Late patching takes effect at once, with no transition (CB6).
    assert_eq!(
        sim.call(1, &mod_work_func()),
        new_code("test_klp_callbacks_demo", Range::new(0x60_0000, 0x60_0100))
    );
    sim.disable_and_settle("test_klp_callbacks_demo");
    sim.unload_object(&module("test_klp_callbacks_mod"));
    assert_eq!(
        sim.take_log(),
        lines(&[
            "livepatch: enabling patch 'test_klp_callbacks_demo'",
            "livepatch: 'test_klp_callbacks_demo': initializing patching transition",
            "test_klp_callbacks_demo: pre_patch_callback: vmlinux",
            "livepatch: 'test_klp_callbacks_demo': starting patching transition",
            "livepatch: 'test_klp_callbacks_demo': completing patching transition",
            "test_klp_callbacks_demo: post_patch_callback: vmlinux",
            "livepatch: 'test_klp_callbacks_demo': patching complete",
            "livepatch: applying patch 'test_klp_callbacks_demo' to loading module 'test_klp_callbacks_mod'",
            "test_klp_callbacks_demo: pre_patch_callback: test_klp_callbacks_mod -> [MODULE_STATE_COMING] Full formed, running module_init",
            "test_klp_callbacks_demo: post_patch_callback: test_klp_callbacks_mod -> [MODULE_STATE_COMING] Full formed, running module_init",
            "test_klp_callbacks_mod: test_klp_callbacks_mod_init",
            "livepatch: 'test_klp_callbacks_demo': initializing unpatching transition",
            "test_klp_callbacks_demo: pre_unpatch_callback: vmlinux",
            "test_klp_callbacks_demo: pre_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'test_klp_callbacks_demo': starting unpatching transition",
            "livepatch: 'test_klp_callbacks_demo': completing unpatching transition",
            "test_klp_callbacks_demo: post_unpatch_callback: vmlinux",
            "test_klp_callbacks_demo: post_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'test_klp_callbacks_demo': unpatching complete",
            "test_klp_callbacks_mod: test_klp_callbacks_mod_exit",
        ])
    );
    assert!(sim.entries.is_empty());
}

#[test]
fn t_cb3_module_going_then_disable_covers_vmlinux_only() {
    let mut sim = sim_with_threads();
    sim.load_and_settle(demo3(true, false));
    sim.take_log();
    sim.unload_object(&module("test_klp_callbacks_mod"));
    assert_eq!(sim.call(1, &mod_work_func()), Code::Original, "unlinked at once");
    sim.disable_and_settle("test_klp_callbacks_demo");
    assert_eq!(
        sim.take_log(),
        lines(&[
            "test_klp_callbacks_mod: test_klp_callbacks_mod_exit",
            "test_klp_callbacks_demo: pre_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_GOING] Going away",
            "livepatch: reverting patch 'test_klp_callbacks_demo' on unloading module 'test_klp_callbacks_mod'",
            "test_klp_callbacks_demo: post_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_GOING] Going away",
            "livepatch: 'test_klp_callbacks_demo': initializing unpatching transition",
            "test_klp_callbacks_demo: pre_unpatch_callback: vmlinux",
            "livepatch: 'test_klp_callbacks_demo': starting unpatching transition",
            "livepatch: 'test_klp_callbacks_demo': completing unpatching transition",
            "test_klp_callbacks_demo: post_unpatch_callback: vmlinux",
            "livepatch: 'test_klp_callbacks_demo': unpatching complete",
        ])
    );
}

#[test]
fn t_cb4_module_coming_and_going() {
    let mut sim = sim_with_threads();
    sim.load_and_settle(demo3(false, false));
    sim.take_log();
    sim.load_object(&module("test_klp_callbacks_mod"), &[(mod_work_func(), MOD_OLD)])
        .unwrap();
    sim.unload_object(&module("test_klp_callbacks_mod"));
    assert_eq!(
        sim.take_log(),
        lines(&[
            "livepatch: applying patch 'test_klp_callbacks_demo' to loading module 'test_klp_callbacks_mod'",
            "test_klp_callbacks_demo: pre_patch_callback: test_klp_callbacks_mod -> [MODULE_STATE_COMING] Full formed, running module_init",
            "test_klp_callbacks_demo: post_patch_callback: test_klp_callbacks_mod -> [MODULE_STATE_COMING] Full formed, running module_init",
            "test_klp_callbacks_mod: test_klp_callbacks_mod_init",
            "test_klp_callbacks_mod: test_klp_callbacks_mod_exit",
            "test_klp_callbacks_demo: pre_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_GOING] Going away",
            "livepatch: reverting patch 'test_klp_callbacks_demo' on unloading module 'test_klp_callbacks_mod'",
            "test_klp_callbacks_demo: post_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_GOING] Going away",
        ])
    );
    // Reloading works (the old ranges were forgotten, CB7.4 [6.3]).
    sim.load_object(&module("test_klp_callbacks_mod"), &[(mod_work_func(), MOD_OLD)])
        .unwrap();
    assert!(matches!(sim.call(1, &mod_work_func()), Code::New { .. }));
}

#[test]
fn t_cb7_pre_patch_failure_refuses_the_loading_module() {
    let mut sim = sim_with_threads();
    sim.hook = Box::new(|patch, obj, kind, _| {
        let ret = if kind == CallbackKind::PrePatch && obj.name() == "test_klp_callbacks_mod" {
            -19
        } else {
            0
        };
        (vec![demo_line(patch, obj, kind)], ret)
    });
    sim.load_and_settle(demo3(false, false));
    sim.take_log();
    let e = sim
        .load_object(&module("test_klp_callbacks_mod"), &[(mod_work_func(), MOD_OLD)])
        .unwrap_err();
    assert!(matches!(&e, Error::ObjectRefused { code: -19, .. }), "{e:?}");
    assert!(e.to_string().contains("test_klp_callbacks_mod") && e.to_string().contains("dlopen"));
    assert!(
        sim.entries.is_empty(),
        "nothing of the refused module was patched"
    );
    sim.disable_and_settle("test_klp_callbacks_demo");
    assert_eq!(
        sim.take_log(),
        lines(&[
            "livepatch: applying patch 'test_klp_callbacks_demo' to loading module 'test_klp_callbacks_mod'",
            "test_klp_callbacks_demo: pre_patch_callback: test_klp_callbacks_mod -> [MODULE_STATE_COMING] Full formed, running module_init",
            "livepatch: pre-patch callback failed for object 'test_klp_callbacks_mod'",
            "livepatch: patch 'test_klp_callbacks_demo' failed for module 'test_klp_callbacks_mod', refusing to load module 'test_klp_callbacks_mod'",
            "livepatch: 'test_klp_callbacks_demo': initializing unpatching transition",
            "test_klp_callbacks_demo: pre_unpatch_callback: vmlinux",
            "livepatch: 'test_klp_callbacks_demo': starting unpatching transition",
            "livepatch: 'test_klp_callbacks_demo': completing unpatching transition",
            "test_klp_callbacks_demo: post_unpatch_callback: vmlinux",
            "livepatch: 'test_klp_callbacks_demo': unpatching complete",
        ])
    );
}

#[test]
fn t_cb9_busy_target_stalls_then_reverses() {
    let mut sim = Sim::new();
    // busymod_work_func sleeps: its worker thread has it on the stack.
    sim.spawn(1, ThreadStack::reliable(vec![OTHER, ROOT]));
    sim.spawn(
        7,
        ThreadStack::reliable(vec![0xa000, BUSY_OLD.start + 0x20, ROOT]),
    );
    sim.load(demo3(false, true)).unwrap();
    for _ in 0..3 {
        assert!(!sim.settle(), "the transition stalls on the sleeping function");
    }
    match &sim.last_switch[&Tid(7)] {
        SwitchOutcome::Blocked {
            function,
            frame,
            address,
            code,
        } => {
            assert_eq!(*function, busymod_work_func());
            assert_eq!(
                (*frame, *address, code),
                (1, BUSY_OLD.start + 0x20, &Code::Original)
            );
        }
        other => panic!("thread 7 should be blocked, got {other:?}"),
    }
    assert_eq!(sim.model.pending(), [Tid(7)]);
    // During the stall: loading a target runs pre_patch only; unloading it runs post_unpatch only.
    sim.load_object(&module("test_klp_callbacks_mod"), &[(mod_work_func(), MOD_OLD)])
        .unwrap();
    assert_eq!(
        sim.call(1, &mod_work_func()),
        new_code("test_klp_callbacks_demo", Range::new(0x60_0000, 0x60_0100))
    );
    assert_eq!(
        sim.call(7, &mod_work_func()),
        Code::Original,
        "each thread in its own universe"
    );
    sim.unload_object(&module("test_klp_callbacks_mod"));
    // Disable = reverse (L6); the worker never left UNPATCHED, so the unpatching transition completes.
    sim.disable("test_klp_callbacks_demo").unwrap();
    assert!(sim.settle());
    assert_eq!(
        sim.take_log(),
        lines(&[
            "livepatch: enabling patch 'test_klp_callbacks_demo'",
            "livepatch: 'test_klp_callbacks_demo': initializing patching transition",
            "test_klp_callbacks_demo: pre_patch_callback: vmlinux",
            "test_klp_callbacks_demo: pre_patch_callback: test_klp_callbacks_busy -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'test_klp_callbacks_demo': starting patching transition",
            "livepatch: applying patch 'test_klp_callbacks_demo' to loading module 'test_klp_callbacks_mod'",
            "test_klp_callbacks_demo: pre_patch_callback: test_klp_callbacks_mod -> [MODULE_STATE_COMING] Full formed, running module_init",
            "test_klp_callbacks_mod: test_klp_callbacks_mod_init",
            "test_klp_callbacks_mod: test_klp_callbacks_mod_exit",
            "livepatch: reverting patch 'test_klp_callbacks_demo' on unloading module 'test_klp_callbacks_mod'",
            "test_klp_callbacks_demo: post_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_GOING] Going away",
            "livepatch: 'test_klp_callbacks_demo': reversing transition from patching to unpatching",
            "livepatch: 'test_klp_callbacks_demo': starting unpatching transition",
            "livepatch: 'test_klp_callbacks_demo': completing unpatching transition",
            "test_klp_callbacks_demo: post_unpatch_callback: vmlinux",
            "test_klp_callbacks_demo: post_unpatch_callback: test_klp_callbacks_busy -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'test_klp_callbacks_demo': unpatching complete",
        ])
    );
    assert!(sim.model.patches().is_empty() && sim.entries.is_empty());
}

fn demo_lines_enable(p: &str) -> Vec<String> {
    lines(&[
        &format!("livepatch: enabling patch '{p}'"),
        &format!("livepatch: '{p}': initializing patching transition"),
        &format!("{p}: pre_patch_callback: vmlinux"),
        &format!("livepatch: '{p}': starting patching transition"),
        &format!("livepatch: '{p}': completing patching transition"),
        &format!("{p}: post_patch_callback: vmlinux"),
        &format!("livepatch: '{p}': patching complete"),
    ])
}

fn demo_lines_disable(p: &str) -> Vec<String> {
    lines(&[
        &format!("livepatch: '{p}': initializing unpatching transition"),
        &format!("{p}: pre_unpatch_callback: vmlinux"),
        &format!("livepatch: '{p}': starting unpatching transition"),
        &format!("livepatch: '{p}': completing unpatching transition"),
        &format!("{p}: post_unpatch_callback: vmlinux"),
        &format!("livepatch: '{p}': unpatching complete"),
    ])
}

fn vmlinux_demo(name: &str, func: &str, base: u64) -> PatchSpec {
    PatchSpec::new(name).object(
        ObjectSpec::new(vmlinux())
            .callbacks(CallbackSet::ALL)
            .func(FuncSpec::new(
                func,
                Range::new(base, base + 0x80),
                Range::new(base << 8, (base << 8) + 0x80),
            )),
    )
}

#[test]
fn t_cb10_two_patches_run_their_own_callbacks() {
    // Two non-replace patches (on different functions: relive's default policy refuses overlap, K5).
    let mut sim = sim_with_threads();
    sim.load_and_settle(vmlinux_demo("test_klp_callbacks_demo", "func_a", 0x3000));
    sim.load_and_settle(vmlinux_demo("test_klp_callbacks_demo2", "func_b", 0x4000));
    sim.disable_and_settle("test_klp_callbacks_demo2");
    sim.disable_and_settle("test_klp_callbacks_demo");
    let mut expected = demo_lines_enable("test_klp_callbacks_demo");
    expected.extend(demo_lines_enable("test_klp_callbacks_demo2"));
    expected.extend(demo_lines_disable("test_klp_callbacks_demo2"));
    expected.extend(demo_lines_disable("test_klp_callbacks_demo"));
    assert_eq!(sim.take_log(), expected);
}

#[test]
fn t_cb11_atomic_replace_skips_replaced_callbacks() {
    let mut sim = sim_with_threads();
    sim.load_and_settle(vmlinux_demo("test_klp_callbacks_demo", "func_a", 0x3000));
    sim.load_and_settle(vmlinux_demo("test_klp_callbacks_demo2", "func_a", 0x4000).replace(true));
    sim.disable_and_settle("test_klp_callbacks_demo2");
    let mut expected = demo_lines_enable("test_klp_callbacks_demo");
    expected.extend(demo_lines_enable("test_klp_callbacks_demo2"));
    expected.extend(demo_lines_disable("test_klp_callbacks_demo2"));
    assert_eq!(
        sim.take_log(),
        expected,
        "the replaced patch's unpatch callbacks never run"
    );
    assert_eq!(
        sim.dropped,
        ["test_klp_callbacks_demo", "test_klp_callbacks_demo2"]
    );
}

// ---------------------------------------------------------------------------------------------------------
// §8 system states: test_klp_state{,2,3}. All three are cumulative (replace) and keep CONSOLE_LOGLEVEL_STATE.
// ---------------------------------------------------------------------------------------------------------

const CONSOLE_LOGLEVEL_STATE: u64 = 1;

fn state_patch(name: &str, version: u32) -> PatchSpec {
    PatchSpec::new(name)
        .replace(true)
        .object(ObjectSpec::new(vmlinux()).callbacks(CallbackSet::ALL))
        .state(CONSOLE_LOGLEVEL_STATE, version)
}

/// The callbacks of test_klp_state*.c, which use ST1/ST2 to tell "fresh" from "take over".
fn state_hook() -> Hook {
    Box::new(|patch, obj, kind, prev_states| {
        let prev = prev_states.iter().any(|s| s.id == CONSOLE_LOGLEVEL_STATE);
        let mut v = vec![demo_line(patch, obj, kind)];
        v.push(match (kind, prev) {
            (CallbackKind::PrePatch, false) => {
                format!("{patch}: allocate_loglevel_state: allocating space to store console_loglevel")
            }
            (CallbackKind::PrePatch, true) => {
                format!("{patch}: allocate_loglevel_state: space to store console_loglevel already allocated")
            }
            (CallbackKind::PostPatch, false) => {
                format!("{patch}: fix_console_loglevel: fixing console_loglevel")
            }
            (CallbackKind::PostPatch, true) => {
                format!("{patch}: fix_console_loglevel: taking over the console_loglevel change")
            }
            (CallbackKind::PreUnpatch, _) => {
                format!("{patch}: restore_console_loglevel: restoring console_loglevel")
            }
            (CallbackKind::PostUnpatch, _) => {
                format!("{patch}: free_loglevel_state: freeing space for the stored console_loglevel")
            }
        });
        (v, 0)
    })
}

fn st_enable_fresh(p: &str) -> Vec<String> {
    lines(&[
        &format!("livepatch: enabling patch '{p}'"),
        &format!("livepatch: '{p}': initializing patching transition"),
        &format!("{p}: pre_patch_callback: vmlinux"),
        &format!("{p}: allocate_loglevel_state: allocating space to store console_loglevel"),
        &format!("livepatch: '{p}': starting patching transition"),
        &format!("livepatch: '{p}': completing patching transition"),
        &format!("{p}: post_patch_callback: vmlinux"),
        &format!("{p}: fix_console_loglevel: fixing console_loglevel"),
        &format!("livepatch: '{p}': patching complete"),
    ])
}

fn st_enable_takeover(p: &str) -> Vec<String> {
    lines(&[
        &format!("livepatch: enabling patch '{p}'"),
        &format!("livepatch: '{p}': initializing patching transition"),
        &format!("{p}: pre_patch_callback: vmlinux"),
        &format!("{p}: allocate_loglevel_state: space to store console_loglevel already allocated"),
        &format!("livepatch: '{p}': starting patching transition"),
        &format!("livepatch: '{p}': completing patching transition"),
        &format!("{p}: post_patch_callback: vmlinux"),
        &format!("{p}: fix_console_loglevel: taking over the console_loglevel change"),
        &format!("livepatch: '{p}': patching complete"),
    ])
}

fn st_disable(p: &str) -> Vec<String> {
    lines(&[
        &format!("livepatch: '{p}': initializing unpatching transition"),
        &format!("{p}: pre_unpatch_callback: vmlinux"),
        &format!("{p}: restore_console_loglevel: restoring console_loglevel"),
        &format!("livepatch: '{p}': starting unpatching transition"),
        &format!("livepatch: '{p}': completing unpatching transition"),
        &format!("{p}: post_unpatch_callback: vmlinux"),
        &format!("{p}: free_loglevel_state: freeing space for the stored console_loglevel"),
        &format!("livepatch: '{p}': unpatching complete"),
    ])
}

#[test]
fn t_st1_system_state_modification() {
    let mut sim = sim_with_threads();
    sim.hook = state_hook();
    sim.load_and_settle(state_patch("test_klp_state", 1));
    sim.disable_and_settle("test_klp_state");
    let mut expected = st_enable_fresh("test_klp_state");
    expected.extend(st_disable("test_klp_state"));
    assert_eq!(sim.take_log(), expected);
}

#[test]
fn t_st2_take_over_system_state() {
    let mut sim = sim_with_threads();
    sim.hook = state_hook();
    sim.load_and_settle(state_patch("test_klp_state", 1));
    sim.load_and_settle(state_patch("test_klp_state2", 2));
    // rmmod test_klp_state: it was replaced, so its library is already unloadable.
    assert!(!sim.libs.contains("test_klp_state"));
    sim.disable_and_settle("test_klp_state2");
    let mut expected = st_enable_fresh("test_klp_state");
    expected.extend(st_enable_takeover("test_klp_state2"));
    expected.extend(st_disable("test_klp_state2"));
    assert_eq!(sim.take_log(), expected);
    // ST2 is only valid during a transition.
    assert_eq!(sim.model.get_prev_state(CONSOLE_LOGLEVEL_STATE), None);
}

#[test]
fn t_st3_compatible_cumulative_livepatches() {
    let mut sim = sim_with_threads();
    sim.hook = state_hook();
    sim.load_and_settle(state_patch("test_klp_state2", 2));
    sim.load_and_settle(state_patch("test_klp_state3", 2));
    assert!(!sim.libs.contains("test_klp_state2"), "rmmod test_klp_state2");
    // Reload test_klp_state2 (same version): it replaces test_klp_state3.
    sim.load_and_settle(state_patch("test_klp_state2", 2));
    sim.disable_and_settle("test_klp_state2");
    let mut expected = st_enable_fresh("test_klp_state2");
    expected.extend(st_enable_takeover("test_klp_state3"));
    expected.extend(st_enable_takeover("test_klp_state2"));
    expected.extend(st_disable("test_klp_state2"));
    assert_eq!(sim.take_log(), expected);
    assert!(sim.libs.is_empty());
}

#[test]
fn t_st4_incompatible_cumulative_livepatches() {
    let mut sim = sim_with_threads();
    sim.hook = state_hook();
    sim.load_and_settle(state_patch("test_klp_state2", 2));
    sim.take_log();
    let before = sim.model.clone();
    let err = sim.load(state_patch("test_klp_state", 1)).unwrap_err();
    assert_eq!(
        sim.take_log(),
        lines(&[
            "livepatch: Livepatch patch (test_klp_state) is not compatible with the already installed livepatches."
        ])
    );
    assert_eq!(err.errno_name(), "EINVAL");
    assert!(
        matches!(&err, Error::IncompatibleState { patch, owner, state_id: 1, .. }
        if patch == "test_klp_state" && owner == "test_klp_state2")
    );
    assert_eq!(sim.model, before, "no side effects");
    assert!(!sim.libs.contains("test_klp_state"));
    // The message names the installed version as the one to carry.
    assert!(err.to_string().contains("version 2 or newer"), "{err}");
    // ST3: a replace patch that lacks an installed state is refused too, and told that version.
    let mut lacking = PatchSpec::new("lacking").replace(true);
    lacking = lacking.object(ObjectSpec::new(vmlinux()).callbacks(CallbackSet::ALL));
    let err = sim.load(lacking).unwrap_err();
    sim.take_log();
    assert!(
        matches!(
            &err,
            Error::IncompatibleState {
                problem: relive_core::StateProblem::Missing { installed: 2 },
                ..
            }
        ),
        "{err:?}"
    );
    let m = err.to_string();
    assert!(
        m.contains("is missing") && m.contains("version 2 or newer"),
        "{m}"
    );
    sim.disable_and_settle("test_klp_state2");
    assert_eq!(sim.take_log(), st_disable("test_klp_state2"));
}
