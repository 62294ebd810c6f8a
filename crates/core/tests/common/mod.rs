//! A simulated target process for the model tests: threads with TLS slots and stacks, entries, loaded patch
//! libraries and callbacks that print like the kernel selftests' modules. It carries out the model's actions
//! exactly as a controller would, and interprets entries itself (independently of `Model::dispatch`).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use relive_core::{
    Action, CallbackKind, Code, EntryTarget, Error, FuncId, Model, ObjectId, Output, PatchSpec, PatchState,
    PrevState, Range, Step, SwitchOutcome, ThreadStack, Tid,
};

/// What a simulated callback prints and returns.
/// Arguments: the patch, the object, the callback, and what ST2 `klp_get_prev_state` answers during it.
pub type Hook = Box<dyn FnMut(&str, &ObjectId, CallbackKind, &[PrevState]) -> (Vec<String>, i32)>;

pub struct Sim {
    pub model: Model,
    pub log: Vec<String>,
    /// TLS slot of every thread, as written by `WriteThreadState` (or the init image at creation).
    pub tls: BTreeMap<Tid, PatchState>,
    pub tls_image: PatchState,
    pub stacks: BTreeMap<Tid, ThreadStack>,
    pub entries: BTreeMap<FuncId, (Range, EntryTarget)>,
    /// Patch libraries currently loaded in the target.
    pub libs: BTreeSet<String>,
    /// Libraries forgotten but kept mapped (forced, U9).
    pub leaked: BTreeSet<String>,
    pub signalled: Vec<Vec<Tid>>,
    pub dropped: Vec<String>,
    pub hook: Hook,
    pub last_switch: BTreeMap<Tid, SwitchOutcome>,
}

/// The kernel's name of an object as the selftest modules print it.
pub fn obj_name(o: &ObjectId) -> String {
    o.name()
}

/// The default callbacks: `<patch>: <kind>_callback: <object>`, with the module state suffix for modules,
/// as in `test_klp_callbacks_demo.c`. pre_patch returns 0.
pub fn demo_hook() -> Hook {
    Box::new(|patch, obj, kind, _prev| (vec![demo_line(patch, obj, kind)], 0))
}

thread_local! {
    /// The module state the selftest modules print, per object being loaded or unloaded (default: live).
    static MODULE_STATE: std::cell::RefCell<BTreeMap<String, &'static str>> =
        const { std::cell::RefCell::new(BTreeMap::new()) };
}

pub const COMING: &str = "[MODULE_STATE_COMING] Full formed, running module_init";
pub const LIVE: &str = "[MODULE_STATE_LIVE] Normal state";
pub const GOING: &str = "[MODULE_STATE_GOING] Going away";

fn set_module_state(name: &str, state: Option<&'static str>) {
    MODULE_STATE.with(|m| match state {
        Some(st) => m.borrow_mut().insert(name.to_owned(), st),
        None => m.borrow_mut().remove(name),
    });
}

pub fn demo_line(patch: &str, obj: &ObjectId, kind: CallbackKind) -> String {
    let name = obj_name(obj);
    let state = MODULE_STATE.with(|m| m.borrow().get(&name).copied().unwrap_or(LIVE));
    let suffix = if name == "vmlinux" {
        String::new()
    } else {
        format!(" -> {state}")
    };
    format!("{patch}: {kind}_callback: {name}{suffix}")
}

pub fn vmlinux() -> ObjectId {
    ObjectId::from_soname("vmlinux")
}

pub fn module(name: &str) -> ObjectId {
    ObjectId::from_soname(name)
}

impl Default for Sim {
    fn default() -> Self {
        Sim::new()
    }
}

impl Sim {
    pub fn new() -> Self {
        Sim {
            model: Model::new(),
            log: vec![],
            tls: BTreeMap::new(),
            tls_image: PatchState::Idle,
            stacks: BTreeMap::new(),
            entries: BTreeMap::new(),
            libs: BTreeSet::new(),
            leaked: BTreeSet::new(),
            signalled: vec![],
            dropped: vec![],
            hook: demo_hook(),
            last_switch: BTreeMap::new(),
        }
    }

    /// A new thread, created from the current init image, with the given stack.
    pub fn spawn(&mut self, tid: i32, stack: ThreadStack) {
        self.model.add_thread(Tid(tid)).unwrap();
        self.tls.insert(Tid(tid), self.tls_image);
        self.stacks.insert(Tid(tid), stack);
    }

    pub fn exit(&mut self, tid: i32) {
        self.model.remove_thread(Tid(tid)).unwrap();
        self.tls.remove(&Tid(tid));
        self.stacks.remove(&Tid(tid));
    }

    pub fn set_stack(&mut self, tid: i32, stack: ThreadStack) {
        self.stacks.insert(Tid(tid), stack);
    }

    /// Carry out an output in order, as the controller would. Returns the pre_patch results (stopping at the
    /// first failure: later pre_patch callbacks are not run).
    pub fn run(&mut self, out: &Output) -> Vec<i32> {
        let mut results = vec![];
        let mut failed = false;
        for step in &out.steps {
            match step {
                Step::Event(e) => self.log.push(e.to_string()),
                Step::Action(a) => match a {
                    Action::WriteThreadState { tid, state } => {
                        assert!(
                            self.tls.contains_key(tid),
                            "state written for unknown thread {tid}"
                        );
                        self.tls.insert(*tid, *state);
                    }
                    Action::WriteTlsInitImage { state } => self.tls_image = *state,
                    Action::SetEntry { func, old, target } => {
                        if *target == EntryTarget::Original {
                            assert!(
                                self.entries.remove(func).is_some(),
                                "removing an entry never installed"
                            );
                        } else {
                            self.entries.insert(func.clone(), (*old, target.clone()));
                        }
                    }
                    Action::RunCallback {
                        patch,
                        object,
                        kind,
                        prev_states,
                    } => {
                        assert!(
                            self.libs.contains(patch),
                            "callback of a patch whose library is not loaded"
                        );
                        if *kind == CallbackKind::PrePatch && failed {
                            continue;
                        }
                        let (lines, ret) = (self.hook)(patch, object, *kind, prev_states);
                        self.log.extend(lines);
                        if *kind == CallbackKind::PrePatch {
                            results.push(ret);
                            failed |= ret != 0;
                        }
                    }
                    Action::SignalThreads { tids } => self.signalled.push(tids.clone()),
                    Action::DropPatch { patch, unload } => {
                        self.dropped.push(patch.clone());
                        if *unload {
                            assert!(self.libs.remove(patch), "dropping a library that is not loaded");
                        } else {
                            self.leaked.insert(patch.clone());
                        }
                    }
                },
            }
        }
        results
    }

    /// `klp_enable_patch` as a module load: enable, run the pre_patch callbacks, start. Does not wait for the
    /// transition (call `settle`).
    pub fn load(&mut self, spec: PatchSpec) -> Result<(), Error> {
        let name = spec.name.clone();
        if let Err(e) = self.model.check_enable(&spec) {
            if let Some(ev) = e.event() {
                self.log.push(ev.to_string());
            }
            return Err(e);
        }
        self.libs.insert(name.clone());
        let out = self.model.enable(spec)?;
        let results = self.run(&out);
        let out = self.model.start(&results)?;
        self.run(&out);
        match out.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// CB6: the target loads `object` (a `dlopen`); the module's own init line follows a successful load.
    pub fn load_object(&mut self, object: &ObjectId, old_ranges: &[(FuncId, Range)]) -> Result<(), Error> {
        let name = object.name();
        set_module_state(&name, Some(COMING));
        let out = self.model.object_coming(object, old_ranges)?;
        let results = self.run(&out);
        let out = self.model.object_coming_done(&results)?;
        self.run(&out);
        set_module_state(&name, None);
        match out.error {
            Some(e) => Err(e),
            None => {
                self.log.push(format!("{name}: {name}_init"));
                Ok(())
            }
        }
    }

    /// CB7: the target unloads `object`: its exit runs first, then the going hook.
    pub fn unload_object(&mut self, object: &ObjectId) {
        let name = object.name();
        self.log.push(format!("{name}: {name}_exit"));
        set_module_state(&name, Some(GOING));
        let out = self.model.object_going(object).unwrap();
        self.run(&out);
        set_module_state(&name, None);
    }

    /// C4: try to switch every pending thread with its current stack, then try to complete.
    pub fn settle(&mut self) -> bool {
        if self.model.transition().is_none() {
            return true;
        }
        for tid in self.model.pending() {
            let stack = self.stacks.get(&tid).cloned().unwrap_or_default();
            let r = self.model.try_switch(tid, &stack).unwrap();
            if let SwitchOutcome::Switched(a) = &r {
                let o = Output {
                    steps: vec![Step::Action(a.clone())],
                    error: None,
                };
                self.run(&o);
            }
            self.last_switch.insert(tid, r);
        }
        let out = self.model.try_complete().unwrap();
        self.run(&out);
        self.model.transition().is_none()
    }

    pub fn load_and_settle(&mut self, spec: PatchSpec) {
        self.load(spec).unwrap();
        assert!(self.settle(), "transition did not complete");
    }

    /// Write 0 to `enabled`.
    pub fn disable(&mut self, name: &str) -> Result<(), Error> {
        let out = self.model.disable(name)?;
        self.run(&out);
        Ok(())
    }

    pub fn disable_and_settle(&mut self, name: &str) {
        self.disable(name).unwrap();
        assert!(self.settle(), "transition did not complete");
    }

    /// The code thread `tid` runs when it calls `func`, from the installed entries and its TLS slot only.
    pub fn call(&self, tid: i32, func: &FuncId) -> Code {
        let state = self.tls.get(&Tid(tid)).copied().unwrap_or(PatchState::Idle);
        match self.entries.get(func) {
            None => Code::Original,
            Some((_, t)) => t.code_for(state),
        }
    }

    pub fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }
}

/// Code owned by a patch, for assertions.
pub fn new_code(patch: &str, range: Range) -> Code {
    Code::New {
        patch: patch.to_owned(),
        range,
    }
}

/// Expected log lines from string literals.
pub fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}
