//! One test per rule that the selftest scenarios do not pin down on their own.

mod common;

use common::*;
use relive_core::{
    Action, CallbackKind, CallbackSet, Code, Error, Event, FuncId, FuncSpec, Model, ObjectId, ObjectSpec,
    PatchSpec, PatchState, Range, SwitchOutcome, ThreadStack, Tid, Unreliable,
};

const F_OLD: Range = Range::new(0x1000, 0x1100);
const G_OLD: Range = Range::new(0x2000, 0x2100);
const A_NEW: Range = Range::new(0x10_1000, 0x10_1100);
const R_NEW: Range = Range::new(0x30_1000, 0x30_1100);
const ROOT: u64 = 0x8000;
const ELSEWHERE: u64 = 0x9000;

fn exe() -> ObjectId {
    ObjectId::from_build_id("feed").with_path("/bin/app")
}
fn f() -> FuncId {
    FuncId::new(exe(), "f", 0)
}
fn g() -> FuncId {
    FuncId::new(exe(), "g", 0)
}
fn patch_f(name: &str, new: Range) -> PatchSpec {
    PatchSpec::new(name).object(ObjectSpec::new(exe()).func(FuncSpec::new("f", F_OLD, new)))
}
fn patch_g(name: &str, new: Range) -> PatchSpec {
    PatchSpec::new(name).object(ObjectSpec::new(exe()).func(FuncSpec::new("g", G_OLD, new)))
}
fn idle_stack() -> ThreadStack {
    ThreadStack::reliable(vec![ELSEWHERE, ROOT])
}
fn one_thread() -> Sim {
    let mut sim = Sim::new();
    sim.spawn(1, idle_stack());
    sim
}

#[test]
fn c5_unreliable_empty_and_too_deep_stacks_never_switch() {
    let mut m = Model::new();
    m.add_thread(Tid(1)).unwrap();
    m.enable(patch_f("p", A_NEW)).unwrap();
    m.start(&[]).unwrap();
    let r = m
        .try_switch(Tid(1), &ThreadStack::unreliable(vec![ELSEWHERE]))
        .unwrap();
    assert_eq!(r, SwitchOutcome::Unreliable(Unreliable::NotReliable));
    let r = m.try_switch(Tid(1), &ThreadStack::reliable(vec![])).unwrap();
    assert_eq!(r, SwitchOutcome::Unreliable(Unreliable::Empty));
    m.set_max_depth(3);
    let r = m
        .try_switch(Tid(1), &ThreadStack::reliable(vec![ELSEWHERE; 4]))
        .unwrap();
    assert_eq!(
        r,
        SwitchOutcome::Unreliable(Unreliable::TooDeep { depth: 4, max: 3 })
    );
    assert_eq!(m.thread(Tid(1)).unwrap().state, PatchState::Unpatched);
    assert_eq!(m.pending(), [Tid(1)]);
    assert!(matches!(
        m.try_switch(Tid(1), &idle_stack()).unwrap(),
        SwitchOutcome::Switched(_)
    ));
    assert_eq!(
        m.try_switch(Tid(1), &idle_stack()).unwrap(),
        SwitchOutcome::AlreadyAtTarget
    );
    assert!(matches!(
        m.try_switch(Tid(9), &idle_stack()),
        Err(Error::ThreadNotFound { tid: Tid(9) })
    ));
}

#[test]
fn c5a_return_addresses_are_matched_by_the_call_byte() {
    let mut m = Model::new();
    m.add_thread(Tid(1)).unwrap();
    m.enable(patch_f("p", A_NEW)).unwrap();
    m.start(&[]).unwrap();
    // A return address equal to the end of f: the call was f's last instruction, so f is active.
    let r = m
        .try_switch(Tid(1), &ThreadStack::reliable(vec![ELSEWHERE, F_OLD.end, ROOT]))
        .unwrap();
    assert!(matches!(r, SwitchOutcome::Blocked { frame: 1, address, .. } if address == F_OLD.end));
    // A live PC at the end of f is not in f.
    let r = m
        .try_switch(Tid(1), &ThreadStack::reliable(vec![F_OLD.end, ROOT]))
        .unwrap();
    assert!(matches!(r, SwitchOutcome::Switched(_)), "{r:?}");
}

#[test]
fn c5a_thunk_ranges_block_until_their_page_is_unregistered() {
    // A patch's thunk (DESIGN §4.3a) is registered as a stub of the function it serves: a thread on it is in f.
    let page = Range::new(0x9000, 0xa000);
    let thunk = Range::new(0x9040, 0x90a0);
    let mut m = Model::new();
    m.add_thread(Tid(1)).unwrap();
    m.register_stub(&f(), Range::new(0x7000, 0x7040)).unwrap();
    m.register_stub(&f(), thunk).unwrap();
    m.enable(patch_f("p", A_NEW)).unwrap();
    m.start(&[]).unwrap();
    let r = m
        .try_switch(Tid(1), &ThreadStack::reliable(vec![thunk.start, ROOT]))
        .unwrap();
    assert!(matches!(r, SwitchOutcome::Blocked { frame: 0, .. }), "{r:?}");
    // Unmapping the thunk page forgets the thunk only, not the stub page.
    m.unregister_stubs_in(page);
    assert_eq!(m.stubs(&f()), [Range::new(0x7000, 0x7040)]);
    let r = m
        .try_switch(Tid(1), &ThreadStack::reliable(vec![thunk.start, ROOT]))
        .unwrap();
    assert!(matches!(r, SwitchOutcome::Switched(_)), "{r:?}");
}

#[test]
fn c5a_stub_ranges_count_as_their_function() {
    let stub = Range::new(0x7000, 0x7040);
    let mut m = Model::new();
    m.add_thread(Tid(1)).unwrap();
    m.register_stub(&f(), stub).unwrap();
    assert!(matches!(
        m.register_stub(&f(), Range::new(5, 5)),
        Err(Error::EmptyStub { .. })
    ));
    m.enable(patch_f("p", A_NEW)).unwrap();
    m.start(&[]).unwrap();
    let r = m
        .try_switch(Tid(1), &ThreadStack::reliable(vec![stub.start + 3, ROOT]))
        .unwrap();
    match r {
        SwitchOutcome::Blocked {
            function,
            frame: 0,
            code,
            ..
        } => {
            assert_eq!((function, code), (f(), Code::Original));
        }
        other => panic!("a PC in f's relocated prologue is f: {other:?}"),
    }
    assert_eq!(m.stubs(&f()), [stub]);
    m.unregister_stubs(&f());
    let r = m
        .try_switch(Tid(1), &ThreadStack::reliable(vec![stub.start + 3, ROOT]))
        .unwrap();
    assert!(matches!(r, SwitchOutcome::Switched(_)));
}

#[test]
fn c5a_pcs_saved_by_signals_are_matched_exactly() {
    // A signal interrupted the thread at the first byte of a forbidden range (here a thunk that enters a
    // version of f, registered as f's stub, or f itself): the interrupted code runs that byte next, so f is
    // active. As a return address the same value would belong to the code before the range.
    let thunk = Range::new(0x7000, 0x7040);
    let mut m = Model::new();
    m.add_thread(Tid(1)).unwrap();
    m.register_stub(&f(), thunk).unwrap();
    m.enable(patch_f("p", A_NEW)).unwrap();
    m.start(&[]).unwrap();
    for start in [thunk.start, F_OLD.start] {
        let mut st = ThreadStack::reliable(vec![ELSEWHERE, start, ROOT]);
        st.interrupted = vec![1];
        let r = m.try_switch(Tid(1), &st).unwrap();
        assert!(
            matches!(r, SwitchOutcome::Blocked { frame: 1, address, .. } if address == start),
            "{start:#x}: {r:?}"
        );
    }
    // The end of a range is the next instruction after it: not inside.
    let mut st = ThreadStack::reliable(vec![ELSEWHERE, F_OLD.end, ROOT]);
    st.interrupted = vec![1];
    assert!(st.is_exact(0) && st.is_exact(1) && !st.is_exact(2));
    assert!(matches!(
        m.try_switch(Tid(1), &st).unwrap(),
        SwitchOutcome::Switched(_)
    ));
}

#[test]
fn r5_reversed_replace_nop_checks_the_original_and_keeps_old_patches() {
    let mut sim = one_thread();
    sim.load_and_settle(patch_f("a", A_NEW));
    sim.load_and_settle(patch_g("b", Range::new(0x20_2000, 0x20_2100)));
    let before = sim.model.clone();
    // The replace patch replaces g only: f gets a nop (R2).
    sim.load(patch_g("r", R_NEW).replace(true)).unwrap();
    let nop = sim.model.patch("r").unwrap().func(&f()).unwrap().clone();
    assert!(nop.nop && nop.new.is_none());
    assert!(sim.settle(), "thread 1 is elsewhere: switched");
    let names: Vec<&str> = sim.model.patches().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["r"], "r replaced a and b; its nop is gone");
    assert!(sim.model.patch("r").unwrap().func(&f()).is_none());
    assert_eq!(sim.call(1, &f()), Code::Original);

    // Now the same with a thread that blocks the replace, then a reverse.
    let mut sim = one_thread();
    sim.spawn(2, ThreadStack::reliable(vec![0x20_2000 + 4, ROOT])); // inside b's g: blocks the replace
    sim.load_and_settle_blocked_replace();
    // Thread 1 is PATCHED: f runs the original through the nop; thread 2 still runs a's f.
    assert_eq!(sim.call(1, &f()), Code::Original);
    assert_eq!(sim.call(2, &f()), new_code("a", A_NEW));
    // Thread 1 is now inside the original f; reversing: the nop's forbidden range is the original (R5).
    sim.set_stack(1, ThreadStack::reliable(vec![F_OLD.start + 0x10, ROOT]));
    let out = sim.model.reverse().unwrap();
    sim.run(&out);
    assert!(!sim.settle());
    match &sim.last_switch[&Tid(1)] {
        SwitchOutcome::Blocked { function, code, .. } => {
            assert_eq!((function, code), (&f(), &Code::Original))
        }
        other => panic!("{other:?}"),
    }
    sim.set_stack(1, idle_stack());
    assert!(sim.settle());
    assert_eq!(
        sim.model.patches(),
        before.patches(),
        "the old patches stay exactly as they were"
    );
    assert_eq!(sim.model.func_stacks(), before.func_stacks());
    assert_eq!(sim.call(1, &f()), new_code("a", A_NEW));
}

trait BlockedReplace {
    fn load_and_settle_blocked_replace(&mut self);
}
impl BlockedReplace for Sim {
    fn load_and_settle_blocked_replace(&mut self) {
        let t2 = self.stacks[&Tid(2)].clone();
        self.set_stack(2, idle_stack());
        self.load_and_settle(patch_f("a", A_NEW));
        self.load_and_settle(patch_g("b", Range::new(0x20_2000, 0x20_2100)));
        self.set_stack(2, t2);
        self.load(patch_g("r", R_NEW).replace(true)).unwrap();
        assert!(!self.settle(), "thread 2 sits in b's g");
        assert_eq!(self.model.pending(), [Tid(2)]);
    }
}

#[test]
fn c8_signals_the_remaining_threads_every_15_attempts() {
    let mut sim = one_thread();
    sim.set_stack(1, ThreadStack::reliable(vec![F_OLD.start, ROOT]));
    sim.load(patch_f("p", A_NEW)).unwrap();
    sim.take_log();
    for _ in 0..15 {
        assert!(!sim.settle());
    }
    assert!(sim.signalled.is_empty() && sim.log.is_empty());
    assert!(!sim.settle());
    assert_eq!(sim.signalled, [vec![Tid(1)]]);
    assert_eq!(sim.take_log(), lines(&["livepatch: signaling remaining tasks"]));
    for _ in 0..15 {
        sim.settle();
    }
    assert_eq!(
        sim.signalled.len(),
        2,
        "again 15 attempts later, without the log line"
    );
    assert!(sim.log.is_empty());
}

#[test]
fn c11_force_switches_blindly_and_the_patch_is_never_unloaded() {
    let mut sim = one_thread();
    sim.load_and_settle(patch_f("p", A_NEW));
    sim.set_stack(1, ThreadStack::reliable(vec![A_NEW.start + 2, ROOT]));
    sim.disable("p").unwrap();
    assert!(!sim.settle());
    let out = sim.model.force().unwrap();
    sim.run(&out);
    assert_eq!(sim.tls[&Tid(1)], PatchState::Unpatched);
    assert!(sim.model.patch("p").unwrap().forced);
    assert!(sim.settle());
    assert!(
        sim.log
            .contains(&"livepatch: forcing remaining tasks to the patched state".to_owned())
    );
    assert!(
        sim.leaked.contains("p") && sim.libs.contains("p"),
        "forgotten but never dlclosed (U9)"
    );
    assert!(matches!(sim.model.force(), Err(Error::NoTransition { .. })));
}

#[test]
fn c11_force_of_a_replace_marks_the_replaced_patches() {
    let mut sim = one_thread();
    sim.load_and_settle(patch_f("a", A_NEW));
    sim.set_stack(1, ThreadStack::reliable(vec![A_NEW.start + 2, ROOT]));
    sim.load(patch_f("r", R_NEW).replace(true)).unwrap();
    assert!(!sim.settle());
    let out = sim.model.force().unwrap();
    sim.run(&out);
    assert!(sim.model.patch("a").unwrap().forced && !sim.model.patch("r").unwrap().forced);
    assert!(sim.settle());
    assert!(sim.leaked.contains("a"));
}

#[test]
fn l5_no_re_enable_and_s1_same_value() {
    let mut sim = one_thread();
    sim.load_and_settle(patch_f("p", A_NEW));
    assert!(matches!(
        sim.model.enable(patch_f("p", A_NEW)),
        Err(Error::AlreadyExists { .. })
    ));
    sim.set_stack(1, ThreadStack::reliable(vec![A_NEW.start, ROOT]));
    sim.disable("p").unwrap();
    let e = sim.disable("p").unwrap_err();
    assert!(matches!(e, Error::SameValue { enabled: false, .. }), "{e:?}");
    sim.set_stack(1, idle_stack());
    assert!(sim.settle());
    let e = sim.disable("p").unwrap_err();
    assert!(matches!(&e, Error::PatchNotFound { patch } if patch == "p"));
    assert!(e.to_string().contains("apply it again"));
    // Re-applying is a new load, and works.
    sim.load_and_settle(patch_f("p", A_NEW));
}

#[test]
fn l6_reversed_unpatching_runs_post_patch_again() {
    let mut sim = one_thread();
    let spec = PatchSpec::new("p").object(
        ObjectSpec::new(exe())
            .callbacks(CallbackSet::ALL)
            .func(FuncSpec::new("f", F_OLD, A_NEW)),
    );
    sim.load_and_settle(spec);
    sim.take_log();
    sim.set_stack(1, ThreadStack::reliable(vec![A_NEW.start + 1, ROOT]));
    sim.disable("p").unwrap();
    assert!(!sim.settle());
    let out = sim.model.reverse().unwrap();
    sim.run(&out);
    assert!(sim.settle(), "thread 1 never left PATCHED");
    assert_eq!(
        sim.take_log(),
        lines(&[
            "livepatch: 'p': initializing unpatching transition",
            "p: pre_unpatch_callback: /bin/app -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'p': starting unpatching transition",
            "livepatch: 'p': reversing transition from unpatching to patching",
            "livepatch: 'p': starting patching transition",
            "livepatch: 'p': completing patching transition",
            "p: post_patch_callback: /bin/app -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'p': patching complete",
        ])
    );
    assert!(sim.model.patch("p").unwrap().enabled);
    assert_eq!(sim.call(1, &f()), new_code("p", A_NEW));
}

#[test]
fn cb5_post_unpatch_only_where_pre_patch_succeeded() {
    let mut sim = one_thread();
    sim.hook = Box::new(|patch, obj, kind, _| {
        let ret = if kind == CallbackKind::PrePatch && obj.name() == "libtwo.so" {
            -12
        } else {
            0
        };
        (vec![demo_line(patch, obj, kind)], ret)
    });
    let spec = PatchSpec::new("p")
        .object(ObjectSpec::new(ObjectId::from_soname("libone.so")).callbacks(CallbackSet::ALL))
        .object(ObjectSpec::new(ObjectId::from_soname("libtwo.so")).callbacks(CallbackSet::ALL))
        .object(ObjectSpec::new(ObjectId::from_soname("libthree.so")).callbacks(CallbackSet::ALL));
    let e = sim.load(spec).unwrap_err();
    assert!(matches!(e, Error::PrePatchFailed { code: -12, .. }));
    let log = sim.take_log();
    assert_eq!(
        log[2..],
        lines(&[
            "p: pre_patch_callback: libone.so -> [MODULE_STATE_LIVE] Normal state",
            "p: pre_patch_callback: libtwo.so -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: pre-patch callback failed for object 'libtwo.so'",
            "livepatch: failed to enable patch 'p'",
            "livepatch: 'p': canceling patching transition, going to unpatch",
            "livepatch: 'p': completing unpatching transition",
            "p: post_unpatch_callback: libone.so -> [MODULE_STATE_LIVE] Normal state",
            "livepatch: 'p': unpatching complete",
        ])
    );
}

#[test]
fn l2_start_checks_the_callback_results_and_the_phase() {
    let mut m = Model::new();
    m.add_thread(Tid(1)).unwrap();
    let spec = PatchSpec::new("p").object(
        ObjectSpec::new(exe())
            .callbacks(CallbackSet::ALL)
            .func(FuncSpec::new("f", F_OLD, A_NEW)),
    );
    let out = m.enable(spec).unwrap();
    assert!(out.actions().any(|a| matches!(
        a,
        Action::RunCallback {
            kind: CallbackKind::PrePatch,
            ..
        }
    )));
    assert!(matches!(
        m.try_switch(Tid(1), &idle_stack()),
        Err(Error::WrongPhase { .. })
    ));
    assert!(matches!(m.disable("p"), Err(Error::WrongPhase { .. })));
    assert!(matches!(
        m.start(&[]),
        Err(Error::BadCallbackResults {
            expected: 1,
            got: 0,
            ..
        })
    ));
    assert!(matches!(m.start(&[0, 0]), Err(Error::BadCallbackResults { .. })));
    m.start(&[0]).unwrap();
    assert!(matches!(m.start(&[0]), Err(Error::WrongPhase { .. })));
}

#[test]
fn l1_invalid_patches_are_refused_with_their_reason() {
    let m = Model::new();
    let cases: Vec<(PatchSpec, &str)> = vec![
        (PatchSpec::new("p"), "InvalidPatch"),
        (PatchSpec::new("").object(ObjectSpec::new(exe())), "InvalidPatch"),
        (
            PatchSpec::new("p").object(
                ObjectSpec::new(exe())
                    .func(FuncSpec::new("f", F_OLD, A_NEW))
                    .func(FuncSpec::new("f", F_OLD, R_NEW).sympos(1)),
            ),
            "DuplicateFunc",
        ),
        (
            PatchSpec::new("p").object(ObjectSpec::new(exe()).func(FuncSpec::unresolved("f"))),
            "UnresolvedFunc",
        ),
        (
            PatchSpec::new("p")
                .object(
                    ObjectSpec::new(exe())
                        .loaded(false)
                        .func(FuncSpec::unresolved("f")),
                )
                .state(0, 1),
            "InvalidPatch",
        ),
        (
            PatchSpec::new("p").object(
                ObjectSpec::new(exe())
                    .func(FuncSpec::new("f", F_OLD, A_NEW))
                    .func(FuncSpec::new("f_alias", F_OLD, R_NEW)),
            ),
            "InvalidPatch",
        ),
    ];
    for (spec, kind) in cases {
        let e = m.check_enable(&spec).unwrap_err();
        assert!(
            format!("{e:?}").starts_with(kind),
            "{spec:?}: expected {kind}, got {e:?}"
        );
        assert!(
            e.to_string().contains(&format!("'{}'", spec.name)),
            "the message names the patch: {e}"
        );
    }
}

#[test]
fn d9_aliases_of_a_patched_entry_are_refused() {
    let mut sim = one_thread();
    sim.load_and_settle(patch_f("a", A_NEW));
    let alias = PatchSpec::new("b")
        .stacking(true)
        .object(ObjectSpec::new(exe()).func(FuncSpec::new("f_alias", F_OLD, R_NEW)));
    let e = sim.load(alias).unwrap_err();
    assert!(
        matches!(&e, Error::AliasedEntry { owner, .. } if owner == "a"),
        "{e:?}"
    );
}

#[test]
fn c10_threads_come_and_go_during_a_transition() {
    let mut sim = one_thread();
    sim.set_stack(1, ThreadStack::reliable(vec![F_OLD.start, ROOT]));
    sim.load(patch_f("p", A_NEW)).unwrap();
    assert_eq!(sim.tls_image, PatchState::Patched);
    // A thread created after the start has a fresh stack and the target state (DESIGN §4.2).
    sim.spawn(2, ThreadStack::reliable(vec![F_OLD.start, ROOT]));
    assert_eq!(
        sim.model.thread(Tid(2)).unwrap(),
        relive_core::ThreadInfo {
            state: PatchState::Patched,
            pending: false
        }
    );
    assert_eq!(sim.call(2, &f()), new_code("p", A_NEW));
    // A thread found late with IDLE in its slot runs the starting world and must be checked.
    sim.model.adopt_thread(Tid(3), PatchState::Idle).unwrap();
    assert_eq!(
        sim.model.thread(Tid(3)).unwrap(),
        relive_core::ThreadInfo {
            state: PatchState::Unpatched,
            pending: true
        }
    );
    assert_eq!(sim.model.dispatch(&f(), PatchState::Idle), Code::Original);
    assert!(matches!(
        sim.model.add_thread(Tid(3)),
        Err(Error::ThreadExists { .. })
    ));
    sim.model.remove_thread(Tid(3)).unwrap();
    assert!(!sim.settle(), "thread 1 is in f");
    // The blocking thread exits: the transition completes.
    sim.exit(1);
    assert!(sim.settle());
    assert!(sim.tls.values().all(|s| *s == PatchState::Idle));
    assert_eq!(sim.tls_image, PatchState::Idle);
    assert!(matches!(
        sim.model.remove_thread(Tid(1)),
        Err(Error::ThreadNotFound { .. })
    ));
}

#[test]
fn h3_idle_slot_runs_the_starting_world_of_a_disable() {
    let mut sim = one_thread();
    sim.load_and_settle(patch_f("p", A_NEW));
    sim.set_stack(1, ThreadStack::reliable(vec![A_NEW.start, ROOT]));
    sim.disable("p").unwrap();
    assert_eq!(sim.model.dispatch(&f(), PatchState::Idle), new_code("p", A_NEW));
    assert_eq!(sim.model.dispatch(&f(), PatchState::Unpatched), Code::Original);
    assert_eq!(
        sim.model.dispatch(&f(), PatchState::Patched),
        new_code("p", A_NEW)
    );
    assert_eq!(sim.model.dispatch(&g(), PatchState::Patched), Code::Original);
}

#[test]
fn events_print_the_kernel_lines() {
    let e = Event::ReversingTransition {
        patch: "p".into(),
        from: PatchState::Unpatched,
    };
    assert_eq!(
        e.to_string(),
        "livepatch: 'p': reversing transition from unpatching to patching"
    );
    assert_eq!(
        Event::SignalingRemainingTasks.to_string(),
        "livepatch: signaling remaining tasks"
    );
}

#[test]
fn r4_reversed_disable_of_a_replace_patch_keeps_the_patches_enabled_after_it() {
    // The counterexample the property tests found (property (e)): replace r, then non-replace p on top (g);
    // disable r and reverse that. The reversed transition completes as a PATCHED replace, and R4.1 drops only
    // the patches listed before r (klp_unpatch_replaced_patches stops at the new patch): p stays.
    let mut sim = one_thread();
    sim.load_and_settle(patch_f("r", R_NEW).replace(true));
    sim.load_and_settle(patch_g("p", A_NEW));
    sim.disable("r").unwrap();
    // Keep the transition pending (the thread sits in the new f of r), then reverse it.
    sim.set_stack(1, ThreadStack::reliable(vec![R_NEW.start + 4, ROOT]));
    assert!(!sim.settle());
    let out = sim.model.reverse().unwrap();
    sim.run(&out);
    sim.set_stack(1, idle_stack());
    assert!(sim.settle());
    let active: Vec<&str> = sim
        .model
        .patches()
        .iter()
        .filter(|p| p.enabled)
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(active, ["r", "p"]);
    assert_eq!(sim.call(1, &g()), new_code("p", A_NEW));
    assert_eq!(sim.call(1, &f()), new_code("r", R_NEW));
}
