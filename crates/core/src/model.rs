//! The state machine: patches (D1–D3), func stacks (D9), the transition (C1–C11), dispatch (H3/H4), atomic
//! replace (R1–R7), callbacks order (CB1–CB5, CB8), system states (ST1–ST3) and the conflict policy (K5).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, StateProblem, phase_name};
use crate::ids::{FuncId, ObjectId, PatchState, Range, Tid};
use crate::output::{
    Action, CallbackKind, Code, EntryTarget, Event, Output, PrevState, SwitchOutcome, ThreadStack, Unreliable,
};
use crate::spec::{CallbackSet, PatchSpec, StateSpec};

/// The version of the serialized [`Model`]. Bump it on any incompatible change of the field names or meaning.
pub const FORMAT_VERSION: u32 = 1;
/// C5.4: the kernel's stack-trace buffer holds 100 entries; a deeper stack counts as unreliable.
pub const DEFAULT_MAX_DEPTH: usize = 100;
/// C8: every 15th failed completion attempt signals the remaining pending threads.
pub const SIGNAL_EVERY: u32 = 15;
/// D5: KSYM_NAME_LEN since 6.1.
pub const MAX_FUNC_NAME: usize = 512;

/// D1: an active patch (enabled, or in transition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pub name: String,
    pub replace: bool,
    pub stacking: bool,
    /// D1: "the target is patched"; true from the *start* of the patching transition.
    pub enabled: bool,
    /// C11: a forced patch is never unloaded (U9).
    pub forced: bool,
    pub objects: Vec<Object>,
    pub states: Vec<StateSpec>,
}

impl Patch {
    /// Every func with its object, in array order.
    pub fn funcs(&self) -> impl Iterator<Item = (&Object, &Func)> {
        self.objects
            .iter()
            .flat_map(|o| o.funcs.iter().map(move |f| (o, f)))
    }

    /// The func of this patch with identity `id` (D6/D7), nops included.
    pub fn func(&self, id: &FuncId) -> Option<&Func> {
        self.objects
            .iter()
            .flat_map(|o| o.funcs.iter())
            .find(|f| f.id == *id)
    }

    fn object_mut(&mut self, id: &ObjectId) -> Option<&mut Object> {
        self.objects.iter_mut().find(|o| o.id == *id)
    }

    /// ST1 `klp_get_state`: linear search of the patch's states.
    pub fn state(&self, id: u64) -> Option<StateSpec> {
        self.states.iter().copied().find(|s| s.id == id)
    }
}

/// D2: an object of a patch. Serialized with its funcs as `{name, sympos, ...}` (the object's identity is
/// not repeated in each func).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub id: ObjectId,
    pub loaded: bool,
    /// D2/R2: created by replace to hold nops; discarded with them.
    pub dynamic: bool,
    /// S1: the object's funcs are on their stacks.
    pub patched: bool,
    pub callbacks: CallbackSet,
    /// CB2: pre_patch ran and succeeded (or is absent), so post_unpatch may run once.
    pub post_unpatch_enabled: bool,
    pub funcs: Vec<Func>,
}

#[derive(Serialize)]
struct FuncOut<'a> {
    name: &'a str,
    sympos: u32,
    old: Option<Range>,
    new: Option<Range>,
    nop: bool,
    patched: bool,
    transition: bool,
}

#[derive(Serialize)]
struct ObjectOut<'a> {
    id: &'a ObjectId,
    loaded: bool,
    dynamic: bool,
    patched: bool,
    callbacks: CallbackSet,
    post_unpatch_enabled: bool,
    funcs: Vec<FuncOut<'a>>,
}

#[derive(Deserialize)]
struct FuncIn {
    name: String,
    sympos: u32,
    old: Option<Range>,
    new: Option<Range>,
    nop: bool,
    patched: bool,
    transition: bool,
}

#[derive(Deserialize)]
struct ObjectIn {
    id: ObjectId,
    loaded: bool,
    dynamic: bool,
    patched: bool,
    callbacks: CallbackSet,
    post_unpatch_enabled: bool,
    funcs: Vec<FuncIn>,
}

impl Serialize for Object {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ObjectOut {
            id: &self.id,
            loaded: self.loaded,
            dynamic: self.dynamic,
            patched: self.patched,
            callbacks: self.callbacks,
            post_unpatch_enabled: self.post_unpatch_enabled,
            funcs: self
                .funcs
                .iter()
                .map(|f| FuncOut {
                    name: &f.id.name,
                    sympos: f.id.sympos(),
                    old: f.old,
                    new: f.new,
                    nop: f.nop,
                    patched: f.patched,
                    transition: f.transition,
                })
                .collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let o = ObjectIn::deserialize(d)?;
        let funcs = o
            .funcs
            .into_iter()
            .map(|f| Func {
                id: FuncId::new(o.id.clone(), &f.name, f.sympos),
                old: f.old,
                new: f.new,
                nop: f.nop,
                patched: f.patched,
                transition: f.transition,
            })
            .collect();
        Ok(Object {
            id: o.id,
            loaded: o.loaded,
            dynamic: o.dynamic,
            patched: o.patched,
            callbacks: o.callbacks,
            post_unpatch_enabled: o.post_unpatch_enabled,
            funcs,
        })
    }
}

/// D3: a func of a patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Func {
    pub id: FuncId,
    pub old: Option<Range>,
    /// None for a nop (D8: a nop runs the original).
    pub new: Option<Range>,
    pub nop: bool,
    /// D10.
    pub patched: bool,
    /// D10.
    pub transition: bool,
}

/// D9: the stack of replacements of one original function; `entries` holds patch names, bottom first, so
/// the last one is the head (newest, active).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuncStack {
    pub func: FuncId,
    pub old: Range,
    pub entries: Vec<String>,
}

/// Where the transition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// C2 done, waiting for the pre_patch results ([`Model::start`]).
    Init,
    /// C3 done: threads switch (C5) until none is pending.
    Started,
}

/// D12: the transition patch and target state, plus the bookkeeping of C8.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub patch: String,
    pub target: PatchState,
    /// The state every thread was given at init (C2); a thread whose slot reads IDLE runs this world
    /// (DESIGN §4.4). A reverse (L6) does not change it.
    pub initial: PatchState,
    pub phase: Phase,
    /// C8: failed completion attempts since the start or the last reverse.
    pub attempts: u32,
    /// The objects whose pre_patch callback was requested, in order (L2.3).
    pub pre_patch: Vec<ObjectId>,
}

/// C1: one thread's state and its PENDING flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadInfo {
    pub state: PatchState,
    pub pending: bool,
}

/// An installed entry: what the controller was last told to write at `old`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub old: Range,
    pub target: EntryTarget,
}

/// The whole livepatch state of one target. It performs nothing: every operation returns the [`Action`]s
/// the controller must carry out, in order, and the [`Event`]s to log. It round-trips through serde so that
/// a stateless controller can keep it in the target's registry (DESIGN §4.8).
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    format_version: u32,
    /// C5.4: frame limit; deeper stacks are unreliable.
    max_depth: usize,
    /// D12 `klp_patches`: the active patches in order; the position is the stack order (S1, K2).
    patches: Vec<Patch>,
    /// D9: one stack per patched original function.
    stacks: Vec<FuncStack>,
    /// D12: at most one transition.
    transition: Option<Transition>,
    /// C1: every thread of the target, stored compactly as tid lists per state (see `threads_compact`).
    threads: BTreeMap<Tid, ThreadInfo>,
    /// What every entry currently leads to (as last told to the controller). Derived: not serialized.
    entries: BTreeMap<FuncId, Entry>,
    /// DESIGN §4.5: generated code (dispatchers, relocated prologues) that counts as the function.
    stubs: BTreeMap<FuncId, Vec<Range>>,
    /// DESIGN §4.2: the state new threads start in.
    tls_image: PatchState,
    /// CB6: an object being loaded, waiting for its pre_patch results ([`Model::object_coming_done`]).
    coming: Option<Coming>,
}

/// CB6 in progress: the object, and the patches whose pre_patch callback was requested, in list order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coming {
    pub object: ObjectId,
    pub patches: Vec<String>,
}

/// The serialized form of [`Model`] (field names are stable; `format_version` comes first).
#[derive(Serialize)]
struct ModelOut<'a> {
    format_version: u32,
    max_depth: usize,
    patches: &'a [Patch],
    stacks: &'a [FuncStack],
    transition: &'a Option<Transition>,
    #[serde(serialize_with = "threads_compact::serialize")]
    threads: &'a BTreeMap<Tid, ThreadInfo>,
    #[serde(serialize_with = "map_as_seq::serialize")]
    stubs: &'a BTreeMap<FuncId, Vec<Range>>,
    tls_image: PatchState,
    coming: &'a Option<Coming>,
}

#[derive(Deserialize)]
struct ModelIn {
    #[serde(deserialize_with = "check_format")]
    format_version: u32,
    max_depth: usize,
    patches: Vec<Patch>,
    stacks: Vec<FuncStack>,
    transition: Option<Transition>,
    #[serde(deserialize_with = "threads_compact::deserialize")]
    threads: BTreeMap<Tid, ThreadInfo>,
    #[serde(deserialize_with = "map_as_seq::deserialize")]
    stubs: BTreeMap<FuncId, Vec<Range>>,
    tls_image: PatchState,
    #[serde(default)]
    coming: Option<Coming>,
}

impl Serialize for Model {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ModelOut {
            format_version: self.format_version,
            max_depth: self.max_depth,
            patches: &self.patches,
            stacks: &self.stacks,
            transition: &self.transition,
            threads: &self.threads,
            stubs: &self.stubs,
            tls_image: self.tls_image,
            coming: &self.coming,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Model {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let m = ModelIn::deserialize(d)?;
        let mut model = Model {
            format_version: m.format_version,
            max_depth: m.max_depth,
            patches: m.patches,
            stacks: m.stacks,
            transition: m.transition,
            threads: m.threads,
            entries: BTreeMap::new(),
            stubs: m.stubs,
            tls_image: m.tls_image,
            coming: m.coming,
        };
        model.entries = model.desired_entries();
        Ok(model)
    }
}

fn check_format<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v != FORMAT_VERSION {
        return Err(serde::de::Error::custom(Error::UnsupportedFormat {
            found: v,
            supported: FORMAT_VERSION,
        }));
    }
    Ok(v)
}

/// Maps serialize as sequences of pairs, so that formats with string-only keys (JSON) can hold them.
mod map_as_seq {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, K: Serialize, V: Serialize>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// Threads serialize as `{"idle":[tids],"unpatched":[tids],"patched":[tids],"pending":[tids]}`: about 7
/// bytes per thread in JSON, so that a thousand threads fit easily in the registry body.
mod threads_compact {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::ThreadInfo;
    use crate::ids::{PatchState, Tid};

    #[derive(Serialize, Deserialize)]
    struct Repr {
        idle: Vec<i32>,
        unpatched: Vec<i32>,
        patched: Vec<i32>,
        pending: Vec<i32>,
    }

    pub fn serialize<S: Serializer>(m: &BTreeMap<Tid, ThreadInfo>, s: S) -> Result<S::Ok, S::Error> {
        let of = |state: PatchState| {
            m.iter()
                .filter(|(_, t)| t.state == state)
                .map(|(tid, _)| tid.0)
                .collect()
        };
        Repr {
            idle: of(PatchState::Idle),
            unpatched: of(PatchState::Unpatched),
            patched: of(PatchState::Patched),
            pending: m
                .iter()
                .filter(|(_, t)| t.pending)
                .map(|(tid, _)| tid.0)
                .collect(),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<Tid, ThreadInfo>, D::Error> {
        let r = Repr::deserialize(d)?;
        let mut m = BTreeMap::new();
        for (list, state) in [
            (r.idle, PatchState::Idle),
            (r.unpatched, PatchState::Unpatched),
            (r.patched, PatchState::Patched),
        ] {
            for tid in list {
                if m.insert(
                    Tid(tid),
                    ThreadInfo {
                        state,
                        pending: false,
                    },
                )
                .is_some()
                {
                    return Err(serde::de::Error::custom(format!(
                        "thread {tid} is listed in two states"
                    )));
                }
            }
        }
        for tid in r.pending {
            match m.get_mut(&Tid(tid)) {
                Some(t) => t.pending = true,
                None => {
                    return Err(serde::de::Error::custom(format!(
                        "pending thread {tid} has no state"
                    )));
                }
            }
        }
        Ok(m)
    }
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    /// An empty target: no patches, no threads.
    pub fn new() -> Self {
        Model {
            format_version: FORMAT_VERSION,
            max_depth: DEFAULT_MAX_DEPTH,
            patches: vec![],
            stacks: vec![],
            transition: None,
            threads: BTreeMap::new(),
            entries: BTreeMap::new(),
            stubs: BTreeMap::new(),
            tls_image: PatchState::Idle,
            coming: None,
        }
    }

    /// C5.4 / U2: change the frame limit (default 100).
    pub fn set_max_depth(&mut self, max_depth: usize) {
        self.max_depth = max_depth;
    }

    // ------------------------------------------------------------------------------------------------------
    // Queries
    // ------------------------------------------------------------------------------------------------------

    pub fn format_version(&self) -> u32 {
        self.format_version
    }

    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// D12 `klp_patches`, in stack order.
    pub fn patches(&self) -> &[Patch] {
        &self.patches
    }

    pub fn patch(&self, name: &str) -> Option<&Patch> {
        self.patches.iter().find(|p| p.name == name)
    }

    /// S1/K2 `stack_order` \[6.14\]: 1-based position of the patch in the active list.
    pub fn stack_order(&self, name: &str) -> Option<usize> {
        self.patches.iter().position(|p| p.name == name).map(|i| i + 1)
    }

    pub fn transition(&self) -> Option<&Transition> {
        self.transition.as_ref()
    }

    /// S1 `transition`: is this the transition patch?
    pub fn in_transition(&self, name: &str) -> bool {
        self.transition.as_ref().is_some_and(|t| t.patch == name)
    }

    pub fn threads(&self) -> &BTreeMap<Tid, ThreadInfo> {
        &self.threads
    }

    pub fn thread(&self, tid: Tid) -> Option<ThreadInfo> {
        self.threads.get(&tid).copied()
    }

    /// C1: the threads that still have to switch.
    pub fn pending(&self) -> Vec<Tid> {
        self.threads
            .iter()
            .filter(|(_, t)| t.pending)
            .map(|(tid, _)| *tid)
            .collect()
    }

    /// D9: every func stack.
    pub fn func_stacks(&self) -> &[FuncStack] {
        &self.stacks
    }

    pub fn func_stack(&self, func: &FuncId) -> Option<&FuncStack> {
        self.stacks.iter().find(|s| s.func == *func)
    }

    /// What each entry leads to, as last told to the controller through [`Action::SetEntry`].
    pub fn entries(&self) -> &BTreeMap<FuncId, Entry> {
        &self.entries
    }

    /// The state the TLS init image holds (DESIGN §4.2).
    pub fn tls_image(&self) -> PatchState {
        self.tls_image
    }

    /// The stub ranges registered for a function.
    pub fn stubs(&self, func: &FuncId) -> &[Range] {
        self.stubs.get(func).map(Vec::as_slice).unwrap_or(&[])
    }

    /// ST1 `klp_get_state(patch, id)`.
    pub fn get_state(&self, patch: &str, id: u64) -> Option<StateSpec> {
        self.patch(patch)?.state(id)
    }

    /// ST2 `klp_get_prev_state(id)`: only during a transition; the state from the latest patch listed before
    /// the transition patch that has it.
    pub fn get_prev_state(&self, id: u64) -> Option<StateSpec> {
        let t = self.transition.as_ref()?;
        self.patches
            .iter()
            .take_while(|p| p.name != t.patch)
            .filter_map(|p| p.state(id))
            .last()
    }

    /// H3/H4 as a pure function: the code a call of `func` runs in a thread whose TLS slot holds `state`.
    ///
    /// The head of the func stack decides. If its `transition` flag is set, UNPATCHED takes the entry below
    /// the head (or the original), PATCHED the head, and IDLE the transition's starting world (DESIGN §4.4).
    /// A nop runs the original.
    pub fn dispatch(&self, func: &FuncId, state: PatchState) -> Code {
        let Some(stack) = self.func_stack(func) else {
            return Code::Original;
        };
        let Some(top) = stack.entries.last() else {
            return Code::Original;
        };
        let top_code = self.code_of(top, func);
        let transition = self
            .patch(top)
            .and_then(|p| p.func(func))
            .is_some_and(|f| f.transition);
        if !transition {
            return top_code;
        }
        let state = match state {
            PatchState::Idle => self
                .transition
                .as_ref()
                .map_or(PatchState::Patched, |t| t.initial),
            s => s,
        };
        match state {
            PatchState::Unpatched => self.below_code(stack, stack.entries.len() - 1),
            _ => top_code,
        }
    }

    /// ST2 for every state id: what `klp_get_prev_state` answers right now (empty outside a transition).
    pub fn prev_states(&self) -> Vec<PrevState> {
        let Some(t) = &self.transition else { return vec![] };
        let mut v: Vec<PrevState> = vec![];
        for p in self.patches.iter().take_while(|p| p.name != t.patch) {
            for s in &p.states {
                let ps = PrevState {
                    id: s.id,
                    version: s.version,
                    patch: p.name.clone(),
                };
                match v.iter_mut().find(|x| x.id == s.id) {
                    Some(x) => *x = ps,
                    None => v.push(ps),
                }
            }
        }
        v
    }

    fn code_of(&self, patch: &str, func: &FuncId) -> Code {
        match self.patch(patch).and_then(|p| p.func(func)) {
            Some(Func {
                nop: false,
                new: Some(range),
                ..
            }) => Code::New {
                patch: patch.to_owned(),
                range: *range,
            },
            _ => Code::Original,
        }
    }

    fn below_code(&self, stack: &FuncStack, pos: usize) -> Code {
        if pos == 0 {
            Code::Original
        } else {
            self.code_of(&stack.entries[pos - 1], &stack.func)
        }
    }

    // ------------------------------------------------------------------------------------------------------
    // L1: validation
    // ------------------------------------------------------------------------------------------------------

    /// L1 checks without any change: structure (D4/D5/D6), name, state compatibility (ST3), busy (L1.10),
    /// aliases (D9) and the conflict policy (K5). The code ranges of funcs are not needed for the
    /// conflict checks, so the controller can call this before it loads the patch library.
    pub fn check_enable(&self, spec: &PatchSpec) -> Result<(), Error> {
        validate(spec)?;
        if self.patch(&spec.name).is_some() {
            return Err(Error::AlreadyExists {
                patch: spec.name.clone(),
            });
        }
        self.check_states(spec)?;
        if let Some(t) = &self.transition {
            return Err(Error::Busy {
                patch: spec.name.clone(),
                op: "be enabled".to_owned(),
                transition_patch: t.patch.clone(),
            });
        }
        for o in spec.objects.iter().filter(|o| o.loaded) {
            for f in &o.funcs {
                let id = FuncId::new(o.id.clone(), &f.name, f.sympos);
                let Some(old) = f.old else { continue };
                if let Some(st) = self
                    .stacks
                    .iter()
                    .find(|s| s.func.object == o.id && s.old.start == old.start && s.func != id)
                {
                    return Err(Error::AliasedEntry {
                        patch: spec.name.clone(),
                        function: Box::new(id),
                        other: Box::new(st.func.clone()),
                        owner: st.entries.last().cloned().unwrap_or_default(),
                    });
                }
            }
        }
        // K5: the seed's refusal (K3b) unless the patch is a replace patch or opts in to stacking.
        if !spec.replace && !spec.stacking {
            for o in &spec.objects {
                for f in &o.funcs {
                    let id = FuncId::new(o.id.clone(), &f.name, f.sympos);
                    if let Some(owner) = self.patches.iter().find(|p| p.func(&id).is_some_and(|f| !f.nop)) {
                        return Err(Error::Conflict {
                            patch: spec.name.clone(),
                            function: Box::new(id),
                            owner: owner.name.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// ST3 `klp_is_patch_compatible`.
    fn check_states(&self, spec: &PatchSpec) -> Result<(), Error> {
        for p in &self.patches {
            for s in &p.states {
                let problem = match spec.states.iter().find(|n| n.id == s.id) {
                    None if spec.replace => Some(StateProblem::Missing { installed: s.version }),
                    None => None,
                    Some(n) if n.version < s.version => Some(StateProblem::Downgrade {
                        installed: s.version,
                        new: n.version,
                    }),
                    Some(_) => None,
                };
                if let Some(problem) = problem {
                    return Err(Error::IncompatibleState {
                        patch: spec.name.clone(),
                        owner: p.name.clone(),
                        state_id: s.id,
                        problem,
                    });
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------------------------
    // L2: enable
    // ------------------------------------------------------------------------------------------------------

    /// L1 + L2 steps 1–3a (`klp_enable_patch` up to the pre_patch callbacks): check, list the patch, add nops
    /// for a replace patch (R2), init the patching transition (C2: every thread UNPATCHED, funcs in
    /// transition) and request the pre_patch callback of every loaded object, in order.
    ///
    /// Nothing is changed on error. Then run the requested callbacks in order, stop at the first failure,
    /// and pass their results to [`Model::start`].
    pub fn enable(&mut self, spec: PatchSpec) -> Result<Output, Error> {
        self.check_enable(&spec)?;
        let mut out = Output::default();
        out.event(Event::EnablingPatch {
            patch: spec.name.clone(),
        });
        let mut patch = Patch {
            name: spec.name.clone(),
            replace: spec.replace,
            stacking: spec.stacking,
            enabled: false,
            forced: false,
            states: spec.states.clone(),
            objects: spec
                .objects
                .iter()
                .map(|o| Object {
                    id: o.id.clone(),
                    loaded: o.loaded,
                    dynamic: false,
                    patched: false,
                    callbacks: o.callbacks,
                    post_unpatch_enabled: false,
                    funcs: o
                        .funcs
                        .iter()
                        .map(|f| Func {
                            id: FuncId::new(o.id.clone(), &f.name, f.sympos),
                            old: f.old,
                            new: f.new,
                            nop: false,
                            patched: false,
                            transition: false,
                        })
                        .collect(),
                })
                .collect(),
        };
        if patch.replace {
            self.add_nops(&mut patch);
        }
        let name = patch.name.clone();
        self.patches.push(patch);
        self.transition = Some(Transition {
            patch: name.clone(),
            target: PatchState::Patched,
            initial: PatchState::Unpatched,
            phase: Phase::Init,
            attempts: 0,
            pre_patch: vec![],
        });
        self.init_transition(&mut out);
        // L2.3 / CB3: pre_patch for each loaded object, in array order, before its funcs are pushed.
        let mut requested = vec![];
        let pi = self.patches.len() - 1;
        let prev_states = self.prev_states();
        for o in self.patches[pi]
            .objects
            .iter_mut()
            .filter(|o| o.loaded && !o.dynamic)
        {
            if o.callbacks.pre_patch {
                out.action(Action::RunCallback {
                    patch: name.clone(),
                    object: o.id.clone(),
                    kind: CallbackKind::PrePatch,
                    prev_states: prev_states.clone(),
                });
                requested.push(o.id.clone());
            } else {
                // CB2: an absent pre_patch counts as success.
                o.post_unpatch_enabled = true;
            }
        }
        self.trans_mut().pre_patch = requested;
        Ok(out)
    }

    /// L2 steps 3b–6: take the results of the pre_patch callbacks requested by [`Model::enable`] (one per
    /// callback run, in order, ending at the first non-zero one), push the funcs onto their stacks, install
    /// the dispatchers and start the transition (C3).
    ///
    /// A non-zero result cancels the enable (L2.4, L7, CB5): the output then unpatches what was done, runs
    /// post_unpatch only where pre_patch succeeded, drops the patch, and carries
    /// [`Error::PrePatchFailed`] in `error`, for the loader.
    pub fn start(&mut self, pre_patch_results: &[i32]) -> Result<Output, Error> {
        let t = self.transition.as_ref().ok_or(Error::NoTransition {
            op: "start".to_owned(),
        })?;
        if t.phase != Phase::Init {
            return Err(Error::WrongPhase {
                op: "start".to_owned(),
                patch: t.patch.clone(),
                phase: phase_name(true, t.target),
                hint: "it has already started; switch threads and complete it".to_owned(),
            });
        }
        let expected = t.pre_patch.clone();
        let failed = pre_patch_results.iter().position(|r| *r != 0);
        let ok_len = match failed {
            Some(i) => pre_patch_results.len() == i + 1,
            None => pre_patch_results.len() == expected.len(),
        };
        if !ok_len || pre_patch_results.len() > expected.len() {
            return Err(Error::BadCallbackResults {
                patch: t.patch.clone(),
                expected: expected.len(),
                got: pre_patch_results.len(),
            });
        }
        let name = t.patch.clone();
        let pi = self.trans_idx();
        let mut out = Output::default();
        for (obj, ret) in expected.iter().zip(pre_patch_results) {
            if *ret == 0
                && let Some(o) = self.patches[pi].object_mut(obj)
            {
                o.post_unpatch_enabled = true;
            }
        }
        if let Some(i) = failed {
            let object = expected[i].clone();
            out.event(Event::PrePatchFailed {
                patch: name.clone(),
                object: object.clone(),
            });
            out.event(Event::FailedToEnable { patch: name.clone() });
            // L7: cancel. Every thread is still UNPATCHED, so complete right away.
            self.trans_mut().target = PatchState::Unpatched;
            out.event(Event::CancelingTransition { patch: name.clone() });
            self.complete_transition(&mut out);
            out.error = Some(Error::PrePatchFailed {
                patch: name,
                object,
                code: pre_patch_results[i],
            });
            return Ok(out);
        }
        self.push_patch(pi);
        self.sync_entries(&mut out);
        self.start_transition(&mut out);
        self.patches[pi].enabled = true;
        Ok(out)
    }

    /// R2: a nop for every func of every active patch that the replace patch does not replace itself, in the
    /// same object (or a dynamic one).
    fn add_nops(&self, new: &mut Patch) {
        for old in &self.patches {
            for oo in &old.objects {
                for of in &oo.funcs {
                    if new.func(&of.id).is_some() {
                        continue;
                    }
                    let nop = Func {
                        id: of.id.clone(),
                        old: of.old,
                        new: None,
                        nop: true,
                        patched: false,
                        transition: false,
                    };
                    match new.object_mut(&oo.id) {
                        Some(o) => o.funcs.push(nop),
                        None => new.objects.push(Object {
                            id: oo.id.clone(),
                            loaded: oo.loaded,
                            dynamic: true,
                            patched: false,
                            callbacks: CallbackSet::NONE,
                            post_unpatch_enabled: false,
                            funcs: vec![nop],
                        }),
                    }
                }
            }
        }
    }

    /// C2: every thread gets the opposite of the target, then the funcs get `transition = 1`.
    fn init_transition(&mut self, out: &mut Output) {
        let t = self.trans_mut();
        let (name, initial) = (t.patch.clone(), t.initial);
        let target = t.target;
        out.event(Event::InitializingTransition { patch: name, target });
        for (tid, th) in self.threads.iter_mut() {
            th.state = initial;
            th.pending = false;
            out.action(Action::WriteThreadState {
                tid: *tid,
                state: initial,
            });
        }
        let pi = self.trans_idx();
        for o in &mut self.patches[pi].objects {
            for f in &mut o.funcs {
                f.transition = true;
            }
        }
    }

    /// C3 (also the last step of L6/C9): threads created from now on start in the target state; every thread
    /// not at the target becomes PENDING; the C8 counter restarts.
    fn start_transition(&mut self, out: &mut Output) {
        let t = self.trans_mut();
        t.phase = Phase::Started;
        t.attempts = 0;
        let (name, target) = (t.patch.clone(), t.target);
        out.event(Event::StartingTransition { patch: name, target });
        self.set_tls_image(target, out);
        for th in self.threads.values_mut() {
            th.pending = th.state != target;
        }
    }

    fn set_tls_image(&mut self, state: PatchState, out: &mut Output) {
        if self.tls_image != state {
            self.tls_image = state;
            out.action(Action::WriteTlsInitImage { state });
        }
    }

    /// L2.3 `klp_patch_object`: push the funcs of every loaded object (D9); the object becomes `patched`.
    fn push_patch(&mut self, pi: usize) {
        let name = self.patches[pi].name.clone();
        for o in self.patches[pi].objects.iter_mut().filter(|o| o.loaded) {
            o.patched = true;
            for f in &mut o.funcs {
                let Some(old) = f.old else { continue };
                f.patched = true;
                match self.stacks.iter_mut().find(|s| s.func == f.id) {
                    Some(s) => s.entries.push(name.clone()),
                    None => self.stacks.push(FuncStack {
                        func: f.id.clone(),
                        old,
                        entries: vec![name.clone()],
                    }),
                }
            }
        }
    }

    /// Unlink every func of patch `pi` from its stack, wherever it sits (K2); empty stacks go away.
    fn unlink_patch(&mut self, pi: usize, only_nops: bool) {
        let name = self.patches[pi].name.clone();
        let patch = &mut self.patches[pi];
        for o in &mut patch.objects {
            for f in o.funcs.iter_mut().filter(|f| !only_nops || f.nop) {
                if let Some(s) = self.stacks.iter_mut().find(|s| s.func == f.id) {
                    s.entries.retain(|e| *e != name);
                }
                f.patched = false;
            }
            if !only_nops {
                o.patched = false;
            }
        }
        self.stacks.retain(|s| !s.entries.is_empty());
    }

    // ------------------------------------------------------------------------------------------------------
    // L4: disable; L6: reverse; C11: force
    // ------------------------------------------------------------------------------------------------------

    /// S1 "write 0 to `enabled`": for the transition patch of a patching transition, reverse it (L6);
    /// otherwise disable the patch (L4): init the unpatching transition (every thread PATCHED, funcs in
    /// transition, dispatchers installed), run pre_unpatch for the patched objects, and start.
    pub fn disable(&mut self, name: &str) -> Result<Output, Error> {
        let pi = self.idx(name)?;
        if let Some(t) = &self.transition {
            if t.patch == name {
                return match (t.phase, t.target) {
                    (Phase::Started, PatchState::Patched) => self.reverse(),
                    (Phase::Started, _) => Err(Error::SameValue {
                        patch: name.to_owned(),
                        enabled: false,
                    }),
                    (Phase::Init, target) => Err(Error::WrongPhase {
                        op: format!("disable '{name}'"),
                        patch: name.to_owned(),
                        phase: phase_name(false, target),
                        hint: "report the pre_patch results (start) first".to_owned(),
                    }),
                };
            }
            return Err(Error::Busy {
                patch: name.to_owned(),
                op: "be disabled".to_owned(),
                transition_patch: t.patch.clone(),
            });
        }
        let mut out = Output::default();
        self.transition = Some(Transition {
            patch: name.to_owned(),
            target: PatchState::Unpatched,
            initial: PatchState::Patched,
            phase: Phase::Init,
            attempts: 0,
            pre_patch: vec![],
        });
        self.init_transition(&mut out);
        self.sync_entries(&mut out);
        // L4.3 / CB4: pre_unpatch for each patched object.
        let prev_states = self.prev_states();
        for o in self.patches[pi]
            .objects
            .iter()
            .filter(|o| o.patched && o.callbacks.pre_unpatch)
        {
            out.action(Action::RunCallback {
                patch: name.to_owned(),
                object: o.id.clone(),
                kind: CallbackKind::PreUnpatch,
                prev_states: prev_states.clone(),
            });
        }
        self.start_transition(&mut out);
        self.patches[pi].enabled = false;
        Ok(out)
    }

    /// The running transition, if it has started (pre_patch results reported); else the error that names
    /// `op` and says what to do (`hint`).
    fn started_transition(&self, op: &str, hint: &str) -> Result<&Transition, Error> {
        let t = self
            .transition
            .as_ref()
            .ok_or(Error::NoTransition { op: op.to_owned() })?;
        if t.phase != Phase::Started {
            return Err(Error::WrongPhase {
                op: op.to_owned(),
                patch: t.patch.clone(),
                phase: phase_name(false, t.target),
                hint: hint.to_owned(),
            });
        }
        Ok(t)
    }

    /// L6 / C9: reverse the running transition. PENDING is cleared, `enabled` and the target flip, and the
    /// transition restarts: threads already in the new target are done, the others need a stack check.
    /// Func stacks and `transition` flags stay as they are.
    pub fn reverse(&mut self) -> Result<Output, Error> {
        let t = self.started_transition(
            "reverse",
            "report the pre_patch results (start) first; a failure there cancels by itself",
        )?;
        let mut out = Output::default();
        out.event(Event::ReversingTransition {
            patch: t.patch.clone(),
            from: t.target,
        });
        for th in self.threads.values_mut() {
            th.pending = false;
        }
        let pi = self.trans_idx();
        self.patches[pi].enabled = !self.patches[pi].enabled;
        let t = self.trans_mut();
        t.target = t.target.opposite();
        self.start_transition(&mut out);
        Ok(out)
    }

    /// C11: every pending thread takes the target without a stack check; the patches being removed are
    /// marked forced (never unloaded, U9). The transition completes on the next [`Model::try_complete`].
    pub fn force(&mut self) -> Result<Output, Error> {
        let t = self.started_transition("force", "report the pre_patch results (start) first")?;
        let target = t.target;
        let mut out = Output::default();
        out.event(Event::ForcingRemainingTasks);
        for (tid, th) in self.threads.iter_mut().filter(|(_, th)| th.pending) {
            th.state = target;
            th.pending = false;
            out.action(Action::WriteThreadState {
                tid: *tid,
                state: target,
            });
        }
        let pi = self.trans_idx();
        if target == PatchState::Unpatched {
            self.patches[pi].forced = true;
        } else if self.patches[pi].replace {
            for (i, p) in self.patches.iter_mut().enumerate() {
                if i != pi {
                    p.forced = true;
                }
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------------------------------------------------
    // C4/C5: switching threads and completing
    // ------------------------------------------------------------------------------------------------------

    /// C5 `klp_try_switch_task` for a stopped thread whose stack the controller unwound.
    ///
    /// The thread switches only if the stack is reliable, no deeper than the limit, and no frame lies in a
    /// forbidden range (C5a) of a func of the transition patch whose object is patched. Forbidden, with
    /// target UNPATCHED: the func's own new code (the original for a nop). With target PATCHED: the code that
    /// ran before the func was pushed: the entry directly below it, or the original. The stub ranges
    /// registered for the function count too (DESIGN §4.5). Frame 0 is the live PC; the others are return
    /// addresses and are matched by the byte before them ([`Range::contains_return_address`]).
    pub fn try_switch(&mut self, tid: Tid, stack: &ThreadStack) -> Result<SwitchOutcome, Error> {
        let t = self.started_transition(
            &format!("switch thread {tid}"),
            "report the pre_patch results (start) first",
        )?;
        let target = t.target;
        let th = self.threads.get(&tid).ok_or(Error::ThreadNotFound { tid })?;
        if !th.pending {
            return Ok(SwitchOutcome::AlreadyAtTarget);
        }
        if !stack.reliable {
            return Ok(SwitchOutcome::Unreliable(Unreliable::NotReliable));
        }
        if stack.pcs.is_empty() {
            return Ok(SwitchOutcome::Unreliable(Unreliable::Empty));
        }
        if stack.pcs.len() > self.max_depth {
            return Ok(SwitchOutcome::Unreliable(Unreliable::TooDeep {
                depth: stack.pcs.len(),
                max: self.max_depth,
            }));
        }
        let forbidden = self.forbidden();
        for (frame, &pc) in stack.pcs.iter().enumerate() {
            for &(func, range, owner) in &forbidden {
                // C5a: the live PC and PCs saved by signals are the next instruction to run (a thread
                // interrupted at the first byte of a function, or of a thunk that enters it, is committed to
                // running it); the other frames are return addresses, inside the call before them.
                let hit = if stack.is_exact(frame) {
                    range.contains_pc(pc)
                } else {
                    range.contains_return_address(pc)
                };
                if hit {
                    let code = match owner {
                        Some(patch) => Code::New {
                            patch: patch.to_owned(),
                            range,
                        },
                        None => Code::Original,
                    };
                    return Ok(SwitchOutcome::Blocked {
                        function: func.clone(),
                        frame,
                        address: pc,
                        code,
                    });
                }
            }
        }
        let th = self.threads.get_mut(&tid).expect("checked above");
        th.state = target;
        th.pending = false;
        Ok(SwitchOutcome::Switched(Action::WriteThreadState {
            tid,
            state: target,
        }))
    }

    /// C5a: every forbidden range of the running transition, with the function it counts as and whose code
    /// it is. Empty when no transition runs.
    pub fn forbidden_ranges(&self) -> Vec<(FuncId, Range, Code)> {
        self.forbidden()
            .into_iter()
            .map(|(f, r, owner)| {
                let code = match owner {
                    Some(patch) => Code::New {
                        patch: patch.to_owned(),
                        range: r,
                    },
                    None => Code::Original,
                };
                (f.clone(), r, code)
            })
            .collect()
    }

    /// [`Model::forbidden_ranges`] without copies: (function, range, owning patch or None for the original).
    /// Indexes the stacks and funcs once, so a check costs O(F log F) for F functions, not O(F²).
    fn forbidden(&self) -> Vec<(&FuncId, Range, Option<&str>)> {
        let mut v = vec![];
        let Some(t) = &self.transition else { return v };
        let Some(p) = self.patch(&t.patch) else { return v };
        // Entry addresses are unique in the process (aliases are refused, D9), so they key the lookups: an
        // integer compare instead of a FuncId compare.
        let stacks: BTreeMap<u64, &FuncStack> = self.stacks.iter().map(|s| (s.old.start, s)).collect();
        let funcs: BTreeMap<(&str, u64), &Func> = if t.target == PatchState::Patched {
            self.patches
                .iter()
                .filter(|q| q.name != p.name)
                .flat_map(|q| {
                    q.funcs()
                        .filter_map(move |(_, f)| Some(((q.name.as_str(), f.old?.start), f)))
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        for (o, f) in p.funcs() {
            if !o.patched || !f.patched {
                continue;
            }
            let primary = match t.target {
                PatchState::Unpatched => match (f.nop, f.new) {
                    (false, Some(new)) => Some((new, Some(p.name.as_str()))),
                    _ => f.old.map(|old| (old, None)),
                },
                _ => f.old.and_then(|old| stacks.get(&old.start)).and_then(|s| {
                    let pos = s.entries.iter().position(|e| *e == p.name)?;
                    if pos == 0 {
                        return Some((s.old, None));
                    }
                    let below = s.entries[pos - 1].as_str();
                    match funcs.get(&(below, s.old.start)) {
                        Some(Func {
                            nop: false,
                            new: Some(r),
                            ..
                        }) => Some((*r, Some(below))),
                        _ => Some((s.old, None)),
                    }
                }),
            };
            let Some((range, owner)) = primary else { continue };
            v.push((&f.id, range, owner));
            for stub in self.stubs(&f.id) {
                v.push((&f.id, *stub, owner));
            }
        }
        v
    }

    /// C4 `klp_try_complete_transition`, after the controller tried to switch the pending threads: if none is
    /// pending, complete (L3 or L4). Otherwise count the attempt and, every 15th time (C8), ask the
    /// controller to signal the remaining threads. Check [`Model::transition`] afterwards: `None` means done.
    pub fn try_complete(&mut self) -> Result<Output, Error> {
        self.started_transition("complete", "report the pre_patch results (start) first")?;
        let mut out = Output::default();
        let pending = self.pending();
        if !pending.is_empty() {
            let t = self.trans_mut();
            if t.attempts != 0 && t.attempts.is_multiple_of(SIGNAL_EVERY) {
                if t.attempts == SIGNAL_EVERY {
                    out.event(Event::SignalingRemainingTasks);
                }
                out.action(Action::SignalThreads { tids: pending });
            }
            t.attempts += 1;
            return Ok(out);
        }
        self.complete_transition(&mut out);
        Ok(out)
    }

    /// L3 (target PATCHED) / L4 completion (target UNPATCHED), R4 for a replace patch.
    fn complete_transition(&mut self, out: &mut Output) {
        let t = self
            .transition
            .clone()
            .expect("complete_transition needs a transition");
        let pi = self.trans_idx();
        out.event(Event::CompletingTransition {
            patch: t.patch.clone(),
            target: t.target,
        });
        let mut replaced = vec![];
        if t.target == PatchState::Patched && self.patches[pi].replace {
            // R4.1: every patch listed before the new one is unpatched, with no callbacks. Normally that is
            // every other patch; after a reversed disable of a replace patch, patches enabled after it are
            // listed after it and stay (the kernel's klp_unpatch_replaced_patches stops at the new patch).
            for i in 0..pi {
                self.patches[i].enabled = false;
                self.unlink_patch(i, false);
                replaced.push(self.patches[i].name.clone());
            }
            // R4.2: discard the nops and the dynamic objects.
            self.unlink_patch(pi, true);
            for o in &mut self.patches[pi].objects {
                o.funcs.retain(|f| !f.nop);
            }
            self.patches[pi].objects.retain(|o| !o.dynamic);
        }
        if t.target == PatchState::Unpatched {
            self.unlink_patch(pi, false);
        }
        for o in &mut self.patches[pi].objects {
            for f in &mut o.funcs {
                f.transition = false;
            }
        }
        // Entries become direct jumps or the original bytes before the threads go IDLE (H3: without
        // `transition` the state is not read).
        self.sync_entries(out);
        for (tid, th) in self.threads.iter_mut() {
            th.state = PatchState::Idle;
            th.pending = false;
            out.action(Action::WriteThreadState {
                tid: *tid,
                state: PatchState::Idle,
            });
        }
        self.set_tls_image(PatchState::Idle, out);
        // L3.6 / L4 / CB2: post callbacks for loaded objects. The replaced patches are still listed, so ST2
        // still sees their states (L3.9 [5.5]).
        let name = t.patch.clone();
        let prev_states = self.prev_states();
        for o in self.patches[pi]
            .objects
            .iter_mut()
            .filter(|o| o.loaded && !o.dynamic)
        {
            let run = match t.target {
                PatchState::Patched => o.callbacks.post_patch.then_some(CallbackKind::PostPatch),
                _ => {
                    let enabled = std::mem::replace(&mut o.post_unpatch_enabled, false);
                    (enabled && o.callbacks.post_unpatch).then_some(CallbackKind::PostUnpatch)
                }
            };
            if let Some(kind) = run {
                out.action(Action::RunCallback {
                    patch: name.clone(),
                    object: o.id.clone(),
                    kind,
                    prev_states: prev_states.clone(),
                });
            }
        }
        out.event(Event::TransitionComplete {
            patch: name.clone(),
            target: t.target,
        });
        self.transition = None;
        // L4.5 / L3.9 / R4.4: free; a forced patch is forgotten but never unloaded (C11, U9).
        let gone: Vec<String> = if t.target == PatchState::Unpatched {
            vec![name]
        } else {
            replaced
        };
        for g in gone {
            if let Some(i) = self.patches.iter().position(|p| p.name == g) {
                let p = self.patches.remove(i);
                out.action(Action::DropPatch {
                    patch: p.name,
                    unload: !p.forced,
                });
            }
        }
    }

    /// Compare what every entry should lead to with what was installed, and emit the differences.
    fn sync_entries(&mut self, out: &mut Output) {
        let desired = self.desired_entries();
        for (f, e) in &desired {
            if self.entries.get(f) != Some(e) {
                out.action(Action::SetEntry {
                    func: f.clone(),
                    old: e.old,
                    target: e.target.clone(),
                });
            }
        }
        for (f, e) in &self.entries {
            if !desired.contains_key(f) {
                out.action(Action::SetEntry {
                    func: f.clone(),
                    old: e.old,
                    target: EntryTarget::Original,
                });
            }
        }
        self.entries = desired;
    }

    /// What every entry must lead to, from the func stacks and the transition (D9, H3, DESIGN §4.4). After
    /// every operation this equals what the controller was told, so it is not serialized.
    fn desired_entries(&self) -> BTreeMap<FuncId, Entry> {
        let mut desired = BTreeMap::new();
        for s in &self.stacks {
            let Some(top) = s.entries.last() else { continue };
            let top_code = self.code_of(top, &s.func);
            let transition = self
                .patch(top)
                .and_then(|p| p.func(&s.func))
                .is_some_and(|f| f.transition);
            let target = if transition {
                let below = self.below_code(s, s.entries.len() - 1);
                let initial = self
                    .transition
                    .as_ref()
                    .map_or(PatchState::Patched, |t| t.initial);
                let idle = if initial == PatchState::Patched {
                    top_code.clone()
                } else {
                    below.clone()
                };
                EntryTarget::Dispatch {
                    patched: top_code,
                    unpatched: below,
                    idle,
                }
            } else {
                match top_code {
                    Code::New { patch, range } => EntryTarget::Direct { patch, range },
                    Code::Original => continue,
                }
            };
            desired.insert(s.func.clone(), Entry { old: s.old, target });
        }
        desired
    }

    // ------------------------------------------------------------------------------------------------------
    // CB6/CB7: objects loaded and unloaded while patches are active (the kernel's module coming/going hooks)
    // ------------------------------------------------------------------------------------------------------

    /// CB6 step 1: `object` is being loaded (`dlopen`), before any of its code ran. `old_ranges` are its
    /// functions' code ranges, resolved by D5. For every active patch with a matching object, in list order:
    /// "applying patch 'P' to loading module 'M'" and its pre_patch callback. Run the callbacks in order,
    /// stop at the first failure, and pass the results to [`Model::object_coming_done`].
    ///
    /// Nothing changes on error (a func without a resolved range, or a patch library whose new function is
    /// unknown). No transition is needed: no thread can be inside the object yet.
    pub fn object_coming(
        &mut self,
        object: &ObjectId,
        old_ranges: &[(FuncId, Range)],
    ) -> Result<Output, Error> {
        if let Some(c) = &self.coming {
            return Err(Error::WrongPhase {
                op: format!("load object '{object}'"),
                patch: c.patches.first().cloned().unwrap_or_default(),
                phase: format!("applying to loading object '{}'", c.object),
                hint: "report that object's pre_patch results (object_coming_done) first".to_owned(),
            });
        }
        if let Some(t) = self.transition.as_ref().filter(|t| t.phase == Phase::Init) {
            return Err(Error::WrongPhase {
                op: format!("load object '{object}'"),
                patch: t.patch.clone(),
                phase: phase_name(false, t.target),
                hint: "report the pre_patch results (start) first".to_owned(),
            });
        }
        // Resolve everything first (klp_init_object_loaded), so that a failure changes nothing.
        // (patch index, object index, (old, new) per func)
        type Resolved = (usize, usize, Vec<(Range, Range)>);
        let mut resolved: Vec<Resolved> = vec![];
        for (pi, p) in self.patches.iter().enumerate() {
            let Some(oi) = p.objects.iter().position(|o| o.id == *object && !o.loaded) else {
                continue;
            };
            let mut ranges = vec![];
            for f in &p.objects[oi].funcs {
                let old = old_ranges.iter().find(|(id, _)| *id == f.id).map(|(_, r)| *r);
                let new = if f.nop { old } else { f.new };
                match (old, new) {
                    (Some(old), Some(new)) if !old.is_empty() && !new.is_empty() => ranges.push((old, new)),
                    _ => {
                        return Err(Error::UnresolvedFunc {
                            patch: p.name.clone(),
                            function: Box::new(f.id.clone()),
                        });
                    }
                }
            }
            resolved.push((pi, oi, ranges));
        }
        let mut out = Output::default();
        let mut requested = vec![];
        for (pi, oi, ranges) in resolved {
            let prev_states = self.prev_states();
            let p = &mut self.patches[pi];
            let o = &mut p.objects[oi];
            o.loaded = true;
            for (f, (old, new)) in o.funcs.iter_mut().zip(ranges) {
                f.old = Some(old);
                if !f.nop {
                    f.new = Some(new);
                }
            }
            out.event(Event::ApplyingToLoadingObject {
                patch: p.name.clone(),
                object: object.clone(),
            });
            if o.callbacks.pre_patch {
                out.action(Action::RunCallback {
                    patch: p.name.clone(),
                    object: object.clone(),
                    kind: CallbackKind::PrePatch,
                    prev_states,
                });
            }
            requested.push(p.name.clone());
        }
        self.coming = Some(Coming {
            object: object.clone(),
            patches: requested,
        });
        Ok(out)
    }

    /// CB6 step 2: the pre_patch results of the callbacks [`Model::object_coming`] requested (one per
    /// callback run, in order, ending at the first non-zero one). Each patch whose pre_patch succeeded (or
    /// has none) pushes its funcs and runs post_patch, except the transition patch, whose post_patch runs at
    /// completion. On a failure the object is refused: the earlier patches are reverted (post_unpatch where
    /// pre_patch succeeded) and `error` carries [`Error::ObjectRefused`]: fail the `dlopen`.
    pub fn object_coming_done(&mut self, pre_patch_results: &[i32]) -> Result<Output, Error> {
        let c = self.coming.clone().ok_or(Error::NoTransition {
            op: "finish loading an object".to_owned(),
        })?;
        let with_cb: Vec<&String> = c
            .patches
            .iter()
            .filter(|n| {
                self.patch(n)
                    .and_then(|p| p.objects.iter().find(|o| o.id == c.object))
                    .is_some_and(|o| o.callbacks.pre_patch)
            })
            .collect();
        let failed = pre_patch_results.iter().position(|r| *r != 0);
        let ok_len = match failed {
            Some(i) => pre_patch_results.len() == i + 1,
            None => pre_patch_results.len() == with_cb.len(),
        };
        if !ok_len || pre_patch_results.len() > with_cb.len() {
            return Err(Error::BadCallbackResults {
                patch: c.patches.first().cloned().unwrap_or_default(),
                expected: with_cb.len(),
                got: pre_patch_results.len(),
            });
        }
        let failing_patch = failed.map(|i| with_cb[i].clone());
        self.coming = None;
        let mut out = Output::default();
        let transition_patch = self.transition.as_ref().map(|t| t.patch.clone());
        let mut applied = vec![];
        for name in &c.patches {
            if Some(name) == failing_patch.as_ref() {
                break;
            }
            applied.push(name.clone());
        }
        if let Some(bad) = &failing_patch {
            let i = failed.unwrap_or_default();
            out.event(Event::PrePatchFailed {
                patch: bad.clone(),
                object: c.object.clone(),
            });
            out.event(Event::RefusingObject {
                patch: bad.clone(),
                object: c.object.clone(),
            });
            // The earlier patches never pushed anything or ran post_patch (their pushes happen below, after
            // every pre_patch succeeded): only post_unpatch pairs with their pre_patch (CB2).
            let prev_states = self.prev_states();
            for name in &applied {
                let Some(p) = self.patches.iter().find(|p| p.name == *name) else {
                    continue;
                };
                if let Some(o) = p.objects.iter().find(|o| o.id == c.object)
                    && o.callbacks.post_unpatch
                {
                    out.event(Event::RevertingOnUnloadingObject {
                        patch: name.clone(),
                        object: c.object.clone(),
                    });
                    out.action(Action::RunCallback {
                        patch: name.clone(),
                        object: c.object.clone(),
                        kind: CallbackKind::PostUnpatch,
                        prev_states: prev_states.clone(),
                    });
                }
            }
            for name in &c.patches {
                self.unload_object(name, &c.object);
            }
            out.error = Some(Error::ObjectRefused {
                patch: bad.clone(),
                object: c.object.clone(),
                code: pre_patch_results[i],
            });
            return Ok(out);
        }
        let prev_states = self.prev_states();
        for name in &applied {
            let Some(pi) = self.patches.iter().position(|p| p.name == *name) else {
                continue;
            };
            let p = &mut self.patches[pi];
            let Some(o) = p.objects.iter_mut().find(|o| o.id == c.object) else {
                continue;
            };
            o.post_unpatch_enabled = true;
            o.patched = true;
            let funcs: Vec<(FuncId, Range)> = o
                .funcs
                .iter_mut()
                .filter_map(|f| {
                    f.patched = true;
                    Some((f.id.clone(), f.old?))
                })
                .collect();
            let post = o.callbacks.post_patch && Some(name) != transition_patch.as_ref();
            for (id, old) in funcs {
                match self.stacks.iter_mut().find(|s| s.func == id) {
                    Some(s) => s.entries.push(name.clone()),
                    None => self.stacks.push(FuncStack {
                        func: id,
                        old,
                        entries: vec![name.clone()],
                    }),
                }
            }
            self.sync_entries(&mut out);
            if post {
                out.action(Action::RunCallback {
                    patch: name.clone(),
                    object: c.object.clone(),
                    kind: CallbackKind::PostPatch,
                    prev_states: prev_states.clone(),
                });
            }
        }
        Ok(out)
    }

    /// CB7: `object` is being unloaded (after its destructors, before the unmap). For every active patch with
    /// the object loaded, in list order: pre_unpatch (unless it is the transition patch), "reverting patch
    /// 'P' on unloading module 'M'", unlink its funcs at once (no transition), post_unpatch (CB2).
    pub fn object_going(&mut self, object: &ObjectId) -> Result<Output, Error> {
        if self.coming.as_ref().is_some_and(|c| c.object == *object) {
            return Err(Error::WrongPhase {
                op: format!("unload object '{object}'"),
                patch: String::new(),
                phase: "still being loaded".to_owned(),
                hint: "report its pre_patch results (object_coming_done) first".to_owned(),
            });
        }
        let transition_patch = self.transition.as_ref().map(|t| t.patch.clone());
        let prev_states = self.prev_states();
        let mut out = Output::default();
        let names: Vec<String> = self
            .patches
            .iter()
            .filter(|p| p.objects.iter().any(|o| o.id == *object && o.loaded))
            .map(|p| p.name.clone())
            .collect();
        for name in names {
            let p = self
                .patches
                .iter_mut()
                .find(|p| p.name == name)
                .expect("listed above");
            let o = p
                .objects
                .iter_mut()
                .find(|o| o.id == *object)
                .expect("listed above");
            if o.patched && o.callbacks.pre_unpatch && Some(&name) != transition_patch.as_ref() {
                out.action(Action::RunCallback {
                    patch: name.clone(),
                    object: object.clone(),
                    kind: CallbackKind::PreUnpatch,
                    prev_states: prev_states.clone(),
                });
            }
            out.event(Event::RevertingOnUnloadingObject {
                patch: name.clone(),
                object: object.clone(),
            });
            let post = std::mem::replace(&mut o.post_unpatch_enabled, false) && o.callbacks.post_unpatch;
            self.unload_object(&name, object);
            self.sync_entries(&mut out);
            if post {
                out.action(Action::RunCallback {
                    patch: name.clone(),
                    object: object.clone(),
                    kind: CallbackKind::PostUnpatch,
                    prev_states: prev_states.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Unlink one object's funcs of one patch, and forget their old ranges (the object is gone, CB7.4).
    fn unload_object(&mut self, patch: &str, object: &ObjectId) {
        let Some(p) = self.patches.iter_mut().find(|p| p.name == patch) else {
            return;
        };
        let Some(o) = p.objects.iter_mut().find(|o| o.id == *object) else {
            return;
        };
        for f in &mut o.funcs {
            if let Some(s) = self.stacks.iter_mut().find(|s| s.func == f.id) {
                s.entries.retain(|e| e != patch);
            }
            f.patched = false;
            f.old = None;
            if f.nop {
                f.new = None;
            }
        }
        o.patched = false;
        o.loaded = false;
        o.post_unpatch_enabled = false;
        self.stacks.retain(|s| !s.entries.is_empty());
    }

    // ------------------------------------------------------------------------------------------------------
    // Threads and stubs
    // ------------------------------------------------------------------------------------------------------

    /// A thread created from the current TLS init image (C10 analogue, DESIGN §4.2): after the start it is in
    /// the target state (its stack is fresh), otherwise in the state an IDLE slot dispatches to.
    pub fn add_thread(&mut self, tid: Tid) -> Result<(), Error> {
        self.adopt_thread(tid, self.tls_image)
    }

    /// A thread the controller found with `observed` in its TLS slot. IDLE during a transition counts as the
    /// transition's initial state, which is what the dispatchers give it (DESIGN §4.4). The thread is
    /// PENDING if that is not the target.
    pub fn adopt_thread(&mut self, tid: Tid, observed: PatchState) -> Result<(), Error> {
        if self.threads.contains_key(&tid) {
            return Err(Error::ThreadExists { tid });
        }
        let info = match &self.transition {
            None => ThreadInfo {
                state: PatchState::Idle,
                pending: false,
            },
            Some(t) => {
                let state = if observed == PatchState::Idle {
                    t.initial
                } else {
                    observed
                };
                ThreadInfo {
                    state,
                    pending: t.phase == Phase::Started && state != t.target,
                }
            }
        };
        self.threads.insert(tid, info);
        Ok(())
    }

    /// A thread exited.
    pub fn remove_thread(&mut self, tid: Tid) -> Result<(), Error> {
        self.threads
            .remove(&tid)
            .map(|_| ())
            .ok_or(Error::ThreadNotFound { tid })
    }

    /// DESIGN §4.5: `range` holds generated code for `func` (a dispatcher or a relocated prologue); a frame
    /// there counts as the function being active.
    pub fn register_stub(&mut self, func: &FuncId, range: Range) -> Result<(), Error> {
        if range.is_empty() {
            return Err(Error::EmptyStub {
                function: Box::new(func.clone()),
                start: range.start,
                end: range.end,
            });
        }
        let v = self.stubs.entry(func.clone()).or_default();
        if !v.contains(&range) {
            v.push(range);
        }
        Ok(())
    }

    /// Forget the stub ranges of `func` (after the controller retired them).
    pub fn unregister_stubs(&mut self, func: &FuncId) {
        self.stubs.remove(func);
    }

    /// Forget every stub range, of any function, that lies inside `area` (a page of code the controller
    /// unmapped, such as a patch's thunk page).
    pub fn unregister_stubs_in(&mut self, area: Range) {
        for v in self.stubs.values_mut() {
            v.retain(|r| !(r.start >= area.start && r.end <= area.end));
        }
        self.stubs.retain(|_, v| !v.is_empty());
    }

    // ------------------------------------------------------------------------------------------------------

    fn idx(&self, name: &str) -> Result<usize, Error> {
        self.patches
            .iter()
            .position(|p| p.name == name)
            .ok_or(Error::PatchNotFound {
                patch: name.to_owned(),
            })
    }

    fn trans_idx(&self) -> usize {
        let t = self.transition.as_ref().expect("a transition is running");
        self.patches
            .iter()
            .position(|p| p.name == t.patch)
            .expect("the transition patch is listed")
    }

    fn trans_mut(&mut self) -> &mut Transition {
        self.transition.as_mut().expect("a transition is running")
    }
}

/// D4/D5/D6 structural checks of a patch (EINVAL / EEXIST).
fn validate(spec: &PatchSpec) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidPatch {
        patch: spec.name.clone(),
        reason,
    };
    if spec.name.is_empty() || spec.name.chars().any(|c| c.is_control() || c == '/') {
        return Err(invalid(format!(
            "the name {:?} is empty or contains '/' or control characters",
            spec.name
        )));
    }
    if spec.objects.is_empty() {
        return Err(invalid("it names no object (L1.1)".to_owned()));
    }
    for (i, o) in spec.objects.iter().enumerate() {
        if o.id.key() == crate::ids::ObjectKey::Anonymous {
            return Err(invalid(format!("object #{i} has no build-id, soname or path")));
        }
        if spec.objects[..i].iter().any(|p| p.id == o.id) {
            return Err(invalid(format!("object '{}' is listed twice", o.id)));
        }
        for (j, f) in o.funcs.iter().enumerate() {
            let id = FuncId::new(o.id.clone(), &f.name, f.sympos);
            if f.name.is_empty() || f.name.len() >= MAX_FUNC_NAME {
                return Err(invalid(format!(
                    "function #{j} of object '{}' has an empty name or one of {MAX_FUNC_NAME} bytes or more (D5)",
                    o.id
                )));
            }
            if o.funcs[..j]
                .iter()
                .any(|g| FuncId::new(o.id.clone(), &g.name, g.sympos) == id)
            {
                return Err(Error::DuplicateFunc {
                    patch: spec.name.clone(),
                    function: Box::new(id),
                });
            }
            if o.loaded {
                let (Some(old), Some(new)) = (f.old, f.new) else {
                    return Err(Error::UnresolvedFunc {
                        patch: spec.name.clone(),
                        function: Box::new(id),
                    });
                };
                if old.is_empty() || new.is_empty() {
                    return Err(invalid(format!(
                        "function '{}' in object '{}' has an empty code range (old {old}, new {new}); a missing \
                         symbol size is ENOENT (D5)",
                        f.name, o.id
                    )));
                }
                if let Some(g) = o.funcs[..j]
                    .iter()
                    .find(|g| g.old.is_some_and(|r| r.start == old.start))
                {
                    return Err(invalid(format!(
                        "functions '{}' and '{}' in object '{}' are the same code at {:#x}; patch one name",
                        g.name, f.name, o.id, old.start
                    )));
                }
            }
        }
    }
    for (i, s) in spec.states.iter().enumerate() {
        if s.id == 0 {
            return Err(invalid(
                "a state has id 0, which ends the state array (D11)".to_owned(),
            ));
        }
        if spec.states[..i].iter().any(|t| t.id == s.id) {
            return Err(invalid(format!("state {} is listed twice", s.id)));
        }
    }
    Ok(())
}
