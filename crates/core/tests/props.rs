//! Property tests over random sequences of operations (load/enable, disable, replace, reverse, force, stack
//! changes, thread creation and exit, stubs), against the simulated process. Without force:
//!   (a) a thread's state changes only when its reliable stack holds no forbidden range of the transition
//!       (and, conversely, a clean reliable stack always switches);
//!   (b) dispatch (the installed entries read with the thread's TLS slot, and `Model::dispatch`) always
//!       returns the code of the thread's own universe;
//!   (c) under the default policy, after every completed transition no function is owned by two active
//!       patches (with stacking, only stacking patches sit above another owner);
//!   (d) every completed transition leaves all threads IDLE (and the entries direct);
//!   (e) a reversed (or cancelled) patching transition restores exactly the previous set of active patches,
//!       func stacks and entries.
//! The model also round-trips through JSON after every operation, and a refused operation changes nothing.
//!
//! Cases: `PROPTEST_CASES` if set, else 2000.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use proptest::prelude::*;
use relive_core::{
    CallbackSet, Code, EntryTarget, FuncId, FuncSpec, FuncStack, Model, ObjectId, ObjectSpec, Patch,
    PatchSpec, PatchState, Range, SwitchOutcome, ThreadStack, Tid,
};

const NFUNCS: usize = 6;
const NPATCHES: usize = 5;
const ROOT: u64 = 0x8000;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Objects: 0 = the executable (always loaded), 1 = libfoo (loaded at first), 2 = libbar (not at first);
/// the libraries come and go (CB6/CB7).
fn object_index(f: usize) -> usize {
    match f {
        0..=2 => 0,
        3 | 4 => 1,
        _ => 2,
    }
}
fn object_id(o: usize) -> ObjectId {
    match o {
        0 => ObjectId::from_build_id("e0e0").with_path("/bin/app"),
        1 => ObjectId::from_build_id("f00f").with_soname("libfoo.so.1"),
        _ => ObjectId::from_soname("libbar.so.2"),
    }
}
fn object_of(f: usize) -> (ObjectId, usize) {
    (object_id(object_index(f)), object_index(f))
}
fn func_id(f: usize) -> FuncId {
    FuncId::new(object_of(f).0, &format!("f{f}"), u32::from(f % 2 == 1))
}
fn old_range(f: usize) -> Range {
    let s = 0x1000 * (f as u64 + 1);
    Range::new(s, s + 0x100)
}
fn new_range(p: usize, f: usize) -> Range {
    let s = 0x10_0000 * (p as u64 + 1) + 0x1000 * f as u64;
    Range::new(s, s + 0x100)
}
fn stub_range(f: usize) -> Range {
    let s = 0x7000_0000 + 0x100 * f as u64;
    Range::new(s, s + 0x40)
}

#[derive(Debug, Clone)]
enum Loc {
    Other(u8),
    Old(usize, u8),
    OldEnd(usize),
    New(usize, usize, u8),
    Stub(usize),
}

#[derive(Debug, Clone)]
struct StackGen {
    locs: Vec<Loc>,
    reliable: bool,
}

impl StackGen {
    fn stack(&self) -> ThreadStack {
        let mut pcs: Vec<u64> = self
            .locs
            .iter()
            .map(|l| match *l {
                Loc::Other(k) => 0x9_0000 + 16 * k as u64,
                Loc::Old(f, off) => old_range(f).start + off as u64 % old_range(f).len(),
                Loc::OldEnd(f) => old_range(f).end,
                Loc::New(p, f, off) => new_range(p, f).start + off as u64 % 0x100,
                Loc::Stub(f) => stub_range(f).start + 4,
            })
            .collect();
        pcs.push(ROOT);
        ThreadStack {
            pcs,
            reliable: self.reliable,
            interrupted: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Enable {
        p: usize,
        mask: u8,
        replace: bool,
        stacking: bool,
        callbacks: bool,
        fail: Option<usize>,
    },
    Disable(usize),
    Switch(usize),
    SwitchAll,
    Complete,
    Reverse,
    Force,
    Spawn(StackGen),
    /// A thread found late, its TLS slot still IDLE (created before the init image was written).
    Adopt(StackGen),
    Exit(usize),
    SetStack(usize, StackGen),
    Stub(usize),
    /// Load (CB6) or unload (CB7) library 1 or 2; `fail` makes its pre_patch callbacks fail.
    Object {
        obj: usize,
        fail: bool,
    },
}

fn loc() -> impl Strategy<Value = Loc> {
    prop_oneof![
        3 => any::<u8>().prop_map(Loc::Other),
        2 => (0..NFUNCS, any::<u8>()).prop_map(|(f, o)| Loc::Old(f, o)),
        1 => (0..NFUNCS).prop_map(Loc::OldEnd),
        2 => (0..NPATCHES, 0..NFUNCS, any::<u8>()).prop_map(|(p, f, o)| Loc::New(p, f, o)),
        1 => (0..NFUNCS).prop_map(Loc::Stub),
    ]
}

fn stack_gen() -> impl Strategy<Value = StackGen> {
    (prop::collection::vec(loc(), 1..4), prop::bool::weighted(0.9))
        .prop_map(|(locs, reliable)| StackGen { locs, reliable })
}

fn op(force: bool) -> impl Strategy<Value = Op> {
    let enable = (
        0..NPATCHES,
        any::<u8>(),
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.3),
        any::<bool>(),
        prop::option::weighted(0.15, 0..3usize),
    )
        .prop_map(|(p, mask, replace, stacking, callbacks, fail)| Op::Enable {
            p,
            mask,
            replace,
            stacking,
            callbacks,
            fail,
        });
    prop_oneof![
        6 => enable,
        3 => (0..NPATCHES).prop_map(Op::Disable),
        4 => (0..8usize).prop_map(Op::Switch),
        4 => Just(Op::SwitchAll),
        5 => Just(Op::Complete),
        2 => Just(Op::Reverse),
        1 => Just(if force { Op::Force } else { Op::Complete }),
        2 => stack_gen().prop_map(Op::Spawn),
        1 => stack_gen().prop_map(Op::Adopt),
        1 => (0..8usize).prop_map(Op::Exit),
        5 => ((0..8usize), stack_gen()).prop_map(|(t, s)| Op::SetStack(t, s)),
        1 => (0..NFUNCS).prop_map(Op::Stub),
        2 => (1..3usize, prop::bool::weighted(0.2)).prop_map(|(obj, fail)| Op::Object { obj, fail }),
    ]
}

fn spec(p: usize, mask: u8, replace: bool, stacking: bool, callbacks: bool, objs: [bool; 3]) -> PatchSpec {
    let mut objects: Vec<ObjectSpec> = vec![];
    for f in (0..NFUNCS).filter(|f| mask & (1 << f) != 0) {
        let (oid, oi) = object_of(f);
        let loaded = objs[oi];
        let fs = if loaded {
            FuncSpec::new(&format!("f{f}"), old_range(f), new_range(p, f)).sympos(if f % 3 == 0 {
                1
            } else {
                0
            })
        } else {
            // The patch library is loaded, so its new function is known; the old one is not (D2).
            FuncSpec {
                old: None,
                ..FuncSpec::new(&format!("f{f}"), old_range(f), new_range(p, f))
            }
        };
        match objects.iter_mut().find(|o| o.id == oid) {
            Some(o) => o.funcs.push(fs),
            None => objects.push(ObjectSpec::new(oid).loaded(loaded).func(fs)),
        }
    }
    if objects.is_empty() {
        objects.push(ObjectSpec::new(object_of(0).0));
    }
    let cbs = if callbacks {
        CallbackSet::ALL
    } else {
        CallbackSet::NONE
    };
    let mut s = PatchSpec::new(&format!("p{p}"))
        .replace(replace)
        .stacking(stacking);
    for o in objects {
        s = s.object(o.callbacks(cbs));
    }
    s
}

/// What a thread in `state` should run for `f`: the top of the stack of its own world. The transition
/// patch's entries belong to the PATCHED world only, wherever they sit in the stack; IDLE is the world the
/// transition started from.
fn universe(m: &Model, f: &FuncId, state: PatchState) -> Code {
    let Some(stack) = m.func_stack(f) else {
        return Code::Original;
    };
    let world: Vec<&String> = match m.transition() {
        None => stack.entries.iter().collect(),
        Some(t) => {
            let s = if state == PatchState::Idle {
                t.initial
            } else {
                state
            };
            stack
                .entries
                .iter()
                .filter(|e| s == PatchState::Patched || **e != t.patch)
                .collect()
        }
    };
    match world.last() {
        None => Code::Original,
        Some(top) => {
            let func = m.patch(top).unwrap().func(f).unwrap();
            if func.nop {
                Code::Original
            } else {
                Code::New {
                    patch: (*top).clone(),
                    range: func.new.unwrap(),
                }
            }
        }
    }
}

/// C5a, computed from the model's data (patches, stacks, stubs), not from its rule code.
fn reference_forbidden(m: &Model) -> Vec<Range> {
    let t = m.transition().unwrap();
    let p = m.patch(&t.patch).unwrap();
    let mut v = vec![];
    for (o, f) in p.funcs() {
        if !o.loaded || m.func_stack(&f.id).is_none_or(|s| !s.entries.contains(&p.name)) {
            continue;
        }
        let stack = m.func_stack(&f.id).unwrap();
        v.push(match t.target {
            PatchState::Unpatched if f.nop => stack.old,
            PatchState::Unpatched => f.new.unwrap(),
            _ => {
                let pos = stack.entries.iter().position(|e| *e == p.name).unwrap();
                if pos == 0 {
                    stack.old
                } else {
                    m.patch(&stack.entries[pos - 1])
                        .unwrap()
                        .func(&f.id)
                        .unwrap()
                        .new
                        .unwrap()
                }
            }
        });
        v.extend_from_slice(m.stubs(&f.id));
    }
    v
}

fn stack_hits(stack: &ThreadStack, ranges: &[Range]) -> bool {
    stack.pcs.iter().enumerate().any(|(i, &pc)| {
        ranges.iter().any(|r| {
            if i == 0 {
                r.contains_pc(pc)
            } else {
                r.contains_return_address(pc)
            }
        })
    })
}

type Snapshot = (Vec<Patch>, Vec<FuncStack>, BTreeMap<FuncId, (Range, EntryTarget)>);

struct Run {
    sim: Sim,
    next_tid: i32,
    forced: bool,
    /// (e): the state before the transition in progress (patching or unpatching), to compare with when it
    /// completes reversed.
    before_enable: Option<Snapshot>,
    reversed: bool,
    objs: [bool; 3],
}

impl Run {
    fn tids(&self) -> Vec<Tid> {
        self.sim.tls.keys().copied().collect()
    }

    fn pick(&self, i: usize) -> Option<Tid> {
        let t = self.tids();
        (!t.is_empty()).then(|| t[i % t.len()])
    }

    fn snapshot(&self) -> Snapshot {
        (
            self.sim.model.patches().to_vec(),
            self.sim.model.func_stacks().to_vec(),
            self.sim.entries.clone(),
        )
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let was_in_transition = self.sim.model.transition().is_some();
        let model_before = self.sim.model.clone();
        match op {
            Op::Enable {
                p,
                mask,
                replace,
                stacking,
                callbacks,
                fail,
            } => {
                let s = spec(*p, *mask, *replace, *stacking, *callbacks, self.objs);
                let snap = self.snapshot();
                match self.sim.model.enable(s.clone()) {
                    Err(_) => prop_assert_eq!(&self.sim.model, &model_before, "refused without side effects"),
                    Ok(out) => {
                        self.sim.libs.insert(s.name.clone());
                        let n = self.sim.run(&out).len();
                        let results: Vec<i32> = match fail {
                            Some(k) if *k < n => (0..=*k).map(|i| if i == *k { -22 } else { 0 }).collect(),
                            _ => vec![0; n],
                        };
                        let out = self.sim.model.start(&results).unwrap();
                        self.sim.run(&out);
                        if out.error.is_some() {
                            // L7: a cancelled enable leaves everything as before.
                            prop_assert!(self.sim.model.transition().is_none());
                            self.check_restored(&snap)?;
                        } else {
                            self.before_enable = Some(snap);
                            self.reversed = false;
                        }
                    }
                }
            }
            Op::Disable(p) => {
                let snap = self.snapshot();
                match self.sim.model.disable(&format!("p{p}")) {
                    Err(_) => prop_assert_eq!(&self.sim.model, &model_before),
                    Ok(out) => {
                        if was_in_transition {
                            self.reversed = !self.reversed; // disable of the transition patch = reverse
                        } else {
                            // (e) for a reversed unpatching transition too.
                            self.before_enable = Some(snap);
                            self.reversed = false;
                        }
                        self.sim.run(&out);
                    }
                }
            }
            Op::Switch(i) => {
                if let Some(tid) = self.pick(*i) {
                    self.switch(tid)?;
                }
            }
            Op::SwitchAll => {
                for tid in self.sim.model.pending() {
                    self.switch(tid)?;
                }
            }
            Op::Complete => {
                if let Ok(out) = self.sim.model.try_complete() {
                    self.sim.run(&out);
                }
            }
            Op::Reverse => {
                if let Ok(out) = self.sim.model.reverse() {
                    self.reversed = !self.reversed;
                    self.sim.run(&out);
                }
            }
            Op::Force => {
                if let Ok(out) = self.sim.model.force() {
                    self.forced = true;
                    self.sim.run(&out);
                }
            }
            Op::Spawn(g) => {
                self.next_tid += 1;
                self.sim.spawn(self.next_tid, g.stack());
            }
            Op::Adopt(g) => {
                self.next_tid += 1;
                let tid = Tid(self.next_tid);
                self.sim.model.adopt_thread(tid, PatchState::Idle).unwrap();
                self.sim.tls.insert(tid, PatchState::Idle);
                self.sim.stacks.insert(tid, g.stack());
            }
            Op::Exit(i) => {
                if let Some(tid) = self.pick(*i) {
                    self.sim.exit(tid.0);
                }
            }
            Op::SetStack(i, g) => {
                if let Some(tid) = self.pick(*i) {
                    self.sim.set_stack(tid.0, g.stack());
                }
            }
            Op::Stub(f) => self
                .sim
                .model
                .register_stub(&func_id(*f), stub_range(*f))
                .unwrap(),
            Op::Object { obj, fail } => {
                let oid = object_id(*obj);
                if self.objs[*obj] {
                    self.sim.unload_object(&oid);
                    self.objs[*obj] = false;
                } else {
                    let ranges: Vec<(FuncId, Range)> = (0..NFUNCS)
                        .filter(|f| object_index(*f) == *obj)
                        .map(|f| (func_id(f), old_range(f)))
                        .collect();
                    let name = oid.name();
                    let fail = *fail;
                    self.sim.hook = Box::new(move |patch, o, kind, _| {
                        let bad = fail && kind == relive_core::CallbackKind::PrePatch && o.name() == name;
                        (vec![demo_line(patch, o, kind)], if bad { -5 } else { 0 })
                    });
                    match self.sim.load_object(&oid, &ranges) {
                        Ok(()) => self.objs[*obj] = true,
                        Err(relive_core::Error::ObjectRefused { .. }) => prop_assert!(fail),
                        Err(e) => prop_assert!(false, "loading {} failed: {}", oid, e),
                    }
                    self.sim.hook = demo_hook();
                }
                if was_in_transition {
                    // (e) compares with the state before the enable; an object load or unload changes it.
                    self.before_enable = None;
                }
            }
        }
        // Round trip through JSON, as the stateless controller does between commands.
        let json = serde_json::to_string(&self.sim.model).unwrap();
        let back: Model = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &self.sim.model);
        self.sim.model = back;

        let completed = was_in_transition && self.sim.model.transition().is_none();
        if completed {
            self.check_completed()?;
            if let Some(snap) = self.before_enable.take()
                && self.reversed
                && !self.forced
            {
                self.check_restored(&snap)?;
            }
        }
        if !self.forced {
            self.check_universes()?;
        }
        self.check_c1_d1()?;
        Ok(())
    }

    fn switch(&mut self, tid: Tid) -> Result<(), TestCaseError> {
        let Some(t) = self.sim.model.transition() else {
            return Ok(());
        };
        let target = t.target;
        let stack = self.sim.stacks[&tid].clone();
        let pending = self.sim.model.thread(tid).unwrap().pending;
        let forbidden = reference_forbidden(&self.sim.model);
        let r = self.sim.model.try_switch(tid, &stack).unwrap();
        let clean = stack.reliable
            && stack.pcs.len() <= self.sim.model.max_depth()
            && !stack_hits(&stack, &forbidden);
        match &r {
            SwitchOutcome::Switched(a) => {
                // (a)
                prop_assert!(
                    pending && clean,
                    "switched with a forbidden frame: {:?} {:?}",
                    stack,
                    forbidden
                );
                let o = relive_core::Output {
                    steps: vec![relive_core::Step::Action(a.clone())],
                    error: None,
                };
                self.sim.run(&o);
                prop_assert_eq!(self.sim.tls[&tid], target);
            }
            SwitchOutcome::AlreadyAtTarget => prop_assert!(!pending),
            SwitchOutcome::Blocked { .. } | SwitchOutcome::Unreliable(_) => {
                prop_assert!(
                    pending && !clean,
                    "a clean reliable stack must switch: {:?}",
                    stack
                )
            }
        }
        Ok(())
    }

    /// C1 and D1, at every step: during a transition every thread is UNPATCHED or PATCHED and PENDING iff
    /// not at the target; outside, every thread is IDLE; `enabled` means "the target is patched".
    fn check_c1_d1(&self) -> Result<(), TestCaseError> {
        let m = &self.sim.model;
        match m.transition() {
            None => prop_assert!(
                m.threads()
                    .values()
                    .all(|t| t.state == PatchState::Idle && !t.pending)
            ),
            Some(t) => {
                for info in m.threads().values() {
                    prop_assert!(info.state != PatchState::Idle);
                    prop_assert_eq!(info.pending, info.state != t.target);
                }
                prop_assert_eq!(
                    m.patch(&t.patch).unwrap().enabled,
                    t.target == PatchState::Patched
                );
                prop_assert!(
                    m.patches()
                        .iter()
                        .filter(|p| p.name != t.patch)
                        .all(|p| p.enabled)
                );
            }
        }
        Ok(())
    }

    /// (b)
    fn check_universes(&self) -> Result<(), TestCaseError> {
        let m = &self.sim.model;
        for (tid, &slot) in &self.sim.tls {
            let info = m.thread(*tid).unwrap();
            if m.transition().is_some() && slot != PatchState::Idle {
                prop_assert_eq!(info.state, slot, "the model's state is the thread's slot");
            }
            for f in 0..NFUNCS {
                let id = func_id(f);
                let runs = self.sim.call(tid.0, &id);
                prop_assert_eq!(
                    &runs,
                    &universe(m, &id, info.state),
                    "thread {} calling {}",
                    tid,
                    id
                );
                prop_assert_eq!(&m.dispatch(&id, slot), &runs);
            }
        }
        Ok(())
    }

    /// (c) and (d)
    fn check_completed(&self) -> Result<(), TestCaseError> {
        let m = &self.sim.model;
        // (d)
        prop_assert!(
            m.threads()
                .values()
                .all(|t| t.state == PatchState::Idle && !t.pending)
        );
        prop_assert!(self.sim.tls.values().all(|s| *s == PatchState::Idle));
        prop_assert_eq!(self.sim.tls_image, PatchState::Idle);
        let all_direct = self
            .sim
            .entries
            .values()
            .all(|(_, e)| matches!(e, EntryTarget::Direct { .. }));
        prop_assert!(all_direct, "no dispatcher survives a transition");
        // No nops survive a transition; only active patches are listed and loaded (or leaked when forced).
        prop_assert!(
            m.patches()
                .iter()
                .all(|p| p.enabled && p.funcs().all(|(_, f)| !f.nop && !f.transition))
        );
        let active: BTreeSet<String> = m.patches().iter().map(|p| p.name.clone()).collect();
        let allowed: BTreeSet<String> = active.union(&self.sim.leaked).cloned().collect();
        prop_assert!(
            active.is_subset(&self.sim.libs) && self.sim.libs.is_subset(&allowed),
            "{:?}",
            self.sim.libs
        );
        // (c)
        let mut owners: BTreeMap<FuncId, Vec<&Patch>> = BTreeMap::new();
        for p in m.patches() {
            for (_, f) in p.funcs() {
                owners.entry(f.id.clone()).or_default().push(p);
            }
        }
        for (f, ps) in owners {
            if ps.iter().all(|p| !p.stacking) {
                prop_assert!(
                    ps.len() <= 1,
                    "{} owned by {} patches under the default policy",
                    f,
                    ps.len()
                );
            }
            prop_assert!(
                ps.iter().skip(1).all(|p| p.stacking),
                "only stacking patches sit on another owner"
            );
        }
        Ok(())
    }

    /// (e)
    fn check_restored(&self, snap: &Snapshot) -> Result<(), TestCaseError> {
        let m = &self.sim.model;
        prop_assert_eq!(m.patches(), &snap.0[..], "active patches restored");
        prop_assert_eq!(m.func_stacks(), &snap.1[..], "func stacks restored");
        prop_assert_eq!(&self.sim.entries, &snap.2, "entries restored");
        Ok(())
    }
}

fn run_ops(initial_threads: Vec<StackGen>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut run = Run {
        sim: Sim::new(),
        next_tid: 0,
        forced: false,
        before_enable: None,
        reversed: false,
        objs: [true, true, false],
    };
    for g in initial_threads {
        run.next_tid += 1;
        run.sim.spawn(run.next_tid, g.stack());
    }
    for op in &ops {
        run.step(op)?;
    }
    // Drain: move every thread to a clean stack; the transition must then complete.
    if run.sim.model.transition().is_some() {
        for tid in run.tids() {
            run.sim
                .set_stack(tid.0, ThreadStack::reliable(vec![0x9_0000, ROOT]));
        }
        run.step(&Op::SwitchAll)?;
        run.step(&Op::Complete)?;
        prop_assert!(
            run.sim.model.transition().is_none(),
            "clean stacks complete the transition"
        );
    }
    Ok(())
}

/// The RNG seed of the property tests: RELIVE_PROPTEST_SEED, or a fixed default.
fn seed() -> u64 {
    std::env::var("RELIVE_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_2026)
}

proptest! {
    // A fixed seed (RELIVE_PROPTEST_SEED overrides it) keeps CI deterministic. A random seed once found a
    // counterexample to (e): Enable p3 (replace) + Complete, Enable p0 + Complete, Disable p3, Reverse dropped
    // p0. The model was wrong (R4.1 drops only the patches listed before the replace patch); it is fixed and
    // pinned by rules.rs `r4_reversed_disable_of_a_replace_patch_keeps_the_patches_enabled_after_it`.
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 2000,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed()),
        ..ProptestConfig::default()
    })]

    #[test]
    fn prop_transitions_keep_every_thread_in_its_own_universe(
        threads in prop::collection::vec(stack_gen(), 0..4),
        ops in prop::collection::vec(op(false), 1..40),
    ) {
        run_ops(threads, ops)?;
    }

    #[test]
    fn prop_force_keeps_the_model_structurally_sound(
        threads in prop::collection::vec(stack_gen(), 0..3),
        ops in prop::collection::vec(op(true), 1..30),
    ) {
        run_ops(threads, ops)?;
    }
}
