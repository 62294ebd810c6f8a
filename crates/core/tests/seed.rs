//! The seed's scenarios (K3/K5): conflict refusal by default, stacking by opt-in, replace exempt.

mod common;

use common::*;
use relive_core::{
    Code, Error, FuncId, FuncSpec, ObjectId, ObjectSpec, PatchSpec, Range, SwitchOutcome, ThreadStack, Tid,
};

const OLD: Range = Range::new(0x40_1000, 0x40_1080);
const A_NEW: Range = Range::new(0x7f10_0000_1000, 0x7f10_0000_1100);
const B_NEW: Range = Range::new(0x7f20_0000_1000, 0x7f20_0000_1100);
const R_NEW: Range = Range::new(0x7f30_0000_1000, 0x7f30_0000_1100);

fn exe() -> ObjectId {
    ObjectId::from_build_id("8e1c0ffee").with_path("/usr/bin/service")
}

fn handle() -> FuncId {
    FuncId::new(exe(), "handle_request", 1)
}

fn patch(name: &str, new: Range) -> PatchSpec {
    PatchSpec::new(name).object(ObjectSpec::new(exe()).func(FuncSpec::new("handle_request", OLD, new)))
}

fn sim() -> Sim {
    let mut sim = Sim::new();
    sim.spawn(10, ThreadStack::reliable(vec![0x40_9000, 0x40_8000]));
    sim.spawn(11, ThreadStack::reliable(vec![0x40_9010, 0x40_8000]));
    sim
}

#[test]
fn k5_seed_second_non_replace_patch_on_one_function_is_refused() {
    let mut sim = sim();
    sim.load_and_settle(patch("fix-a", A_NEW));
    let before = sim.model.clone();
    // sympos 1 and 0 are the same function (D6), so this is the same function as fix-a's.
    let b = PatchSpec::new("fix-b")
        .object(ObjectSpec::new(exe()).func(FuncSpec::new("handle_request", OLD, B_NEW).sympos(1)));
    let err = sim.load(b).unwrap_err();
    match &err {
        Error::Conflict {
            patch,
            function,
            owner,
        } => {
            assert_eq!((patch.as_str(), owner.as_str()), ("fix-b", "fix-a"));
            assert_eq!(**function, handle());
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let msg = err.to_string();
    for needle in [
        "fix-b",
        "fix-a",
        "handle_request",
        "/usr/bin/service",
        "replace",
        "stacking",
    ] {
        assert!(
            msg.contains(needle),
            "the message names {needle} and how to proceed: {msg}"
        );
    }
    assert_eq!(err.errno_name(), "EBUSY");
    assert_eq!(sim.model, before, "refused before any side effect");
    assert_eq!(sim.call(10, &handle()), new_code("fix-a", A_NEW));
}

#[test]
fn k5_seed_stacking_opt_in_newest_wins_and_any_order_disable() {
    let mut sim = sim();
    sim.load_and_settle(patch("fix-a", A_NEW));
    sim.load_and_settle(patch("fix-b", B_NEW).stacking(true));
    assert_eq!(sim.call(10, &handle()), new_code("fix-b", B_NEW), "newest wins");
    let stack = sim.model.func_stack(&handle()).unwrap();
    assert_eq!(stack.entries, ["fix-a", "fix-b"]);
    assert_eq!(
        (sim.model.stack_order("fix-a"), sim.model.stack_order("fix-b")),
        (Some(1), Some(2))
    );

    // Disabling the lower patch first works: no ordering (K2). During the transition B stays in effect for
    // everyone (H5: only the head's transition flag is consulted).
    sim.disable("fix-a").unwrap();
    assert_eq!(sim.call(10, &handle()), new_code("fix-b", B_NEW));
    // A thread inside A's code (an old frame) blocks; C5a for UNPATCHED checks A's own new code.
    sim.set_stack(
        11,
        ThreadStack::reliable(vec![0x40_9010, A_NEW.start + 8, 0x40_8000]),
    );
    assert!(!sim.settle());
    assert!(matches!(
        sim.last_switch[&Tid(11)],
        SwitchOutcome::Blocked { frame: 1, .. }
    ));
    sim.set_stack(11, ThreadStack::reliable(vec![0x40_9010, 0x40_8000]));
    assert!(sim.settle());
    assert_eq!(sim.model.func_stack(&handle()).unwrap().entries, ["fix-b"]);
    assert_eq!(sim.model.stack_order("fix-b"), Some(1), "stack order renumbered");
    assert_eq!(sim.call(10, &handle()), new_code("fix-b", B_NEW));
    assert_eq!(sim.dropped, ["fix-a"]);

    sim.disable_and_settle("fix-b");
    assert_eq!(sim.call(10, &handle()), Code::Original);
}

#[test]
fn k5_seed_stacking_patch_checks_only_its_predecessor() {
    // C5a, target PATCHED with a predecessor: the forbidden range is the entry below (A's code), not the
    // original.
    let mut sim = sim();
    sim.load_and_settle(patch("fix-a", A_NEW));
    sim.set_stack(10, ThreadStack::reliable(vec![OLD.start + 4, 0x40_8000]));
    sim.set_stack(11, ThreadStack::reliable(vec![A_NEW.start + 4, 0x40_8000]));
    sim.load(patch("fix-b", B_NEW).stacking(true)).unwrap();
    assert!(!sim.settle());
    assert!(
        matches!(sim.last_switch[&Tid(10)], SwitchOutcome::Switched(_)),
        "the original is not checked"
    );
    match &sim.last_switch[&Tid(11)] {
        SwitchOutcome::Blocked { code, frame: 0, .. } => assert_eq!(*code, new_code("fix-a", A_NEW)),
        other => panic!("thread 11 is inside fix-a's code: {other:?}"),
    }
    // Meanwhile each thread runs its own universe.
    assert_eq!(sim.call(10, &handle()), new_code("fix-b", B_NEW));
    assert_eq!(sim.call(11, &handle()), new_code("fix-a", A_NEW));
}

#[test]
fn k5_seed_replace_over_both_is_accepted_and_drops_them() {
    let mut sim = sim();
    sim.load_and_settle(patch("fix-a", A_NEW));
    sim.load_and_settle(patch("fix-b", B_NEW).stacking(true));
    // A replace patch is exempt from the refusal even without stacking.
    sim.load_and_settle(patch("cumulative", R_NEW).replace(true));
    assert_eq!(sim.dropped, ["fix-a", "fix-b"], "both dropped at completion");
    assert!(!sim.libs.contains("fix-a") && !sim.libs.contains("fix-b"));
    assert_eq!(sim.model.patches().len(), 1);
    assert_eq!(sim.model.func_stack(&handle()).unwrap().entries, ["cumulative"]);
    assert_eq!(sim.call(11, &handle()), new_code("cumulative", R_NEW));
}

#[test]
fn k5_replaced_patches_cannot_be_disabled_during_the_replace() {
    let mut sim = sim();
    sim.load_and_settle(patch("fix-a", A_NEW));
    sim.set_stack(10, ThreadStack::reliable(vec![A_NEW.start, 0x40_8000]));
    sim.load(patch("cumulative", R_NEW).replace(true)).unwrap();
    assert!(!sim.settle());
    let err = sim.disable("fix-a").unwrap_err();
    assert!(
        matches!(&err, Error::Busy { patch, transition_patch, .. } if patch == "fix-a" && transition_patch == "cumulative")
    );
    assert!(err.to_string().contains("reverse"), "{err}");
    // A new enable is busy too (L1.10), and the conflict check never runs against an unsettled list.
    let e = sim.load(patch("fix-c", B_NEW)).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e:?}");
}
