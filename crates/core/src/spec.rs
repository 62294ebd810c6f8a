//! What a patch author supplies (D1–D3, D11), after the controller resolved every symbol it could (D5).

use serde::{Deserialize, Serialize};

use crate::ids::{ObjectId, Range};

/// D1: a patch as loaded: its name (the kernel's module name), flags, objects and system states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchSpec {
    pub name: String,
    /// R1: supersede every active patch (atomic replace, cumulative patch).
    pub replace: bool,
    /// K5 \[relive\]: opt in to the upstream K2 stacking semantics for this patch's functions.
    pub stacking: bool,
    pub objects: Vec<ObjectSpec>,
    /// D11 / §8: system states this patch establishes.
    pub states: Vec<StateSpec>,
}

impl PatchSpec {
    pub fn new(name: &str) -> Self {
        PatchSpec {
            name: name.to_owned(),
            replace: false,
            stacking: false,
            objects: vec![],
            states: vec![],
        }
    }

    pub fn replace(mut self, replace: bool) -> Self {
        self.replace = replace;
        self
    }

    pub fn stacking(mut self, stacking: bool) -> Self {
        self.stacking = stacking;
        self
    }

    pub fn object(mut self, object: ObjectSpec) -> Self {
        self.objects.push(object);
        self
    }

    pub fn state(mut self, id: u64, version: u32) -> Self {
        self.states.push(StateSpec { id, version });
        self
    }
}

/// D2: one object (module) a patch touches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectSpec {
    pub id: ObjectId,
    /// D2: is the object present in the target right now? Unloaded objects are legal; their funcs stay
    /// unresolved (no ranges) and none of their callbacks run (CB1).
    pub loaded: bool,
    /// CB1: which of the four callbacks the patch defines for this object.
    pub callbacks: CallbackSet,
    pub funcs: Vec<FuncSpec>,
}

impl ObjectSpec {
    /// A loaded object with no callbacks and no funcs yet.
    pub fn new(id: ObjectId) -> Self {
        ObjectSpec {
            id,
            loaded: true,
            callbacks: CallbackSet::NONE,
            funcs: vec![],
        }
    }

    pub fn loaded(mut self, loaded: bool) -> Self {
        self.loaded = loaded;
        self
    }

    pub fn callbacks(mut self, callbacks: CallbackSet) -> Self {
        self.callbacks = callbacks;
        self
    }

    pub fn func(mut self, func: FuncSpec) -> Self {
        self.funcs.push(func);
        self
    }
}

/// D3: one replaced function. For a loaded object both ranges are required (the controller resolved `old`
/// by D5 and `new` in the patch library); for an unloaded object they may be absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuncSpec {
    pub name: String,
    /// D5: 0 = the unique symbol of that name, N = the N-th in symbol-table order. 0 and 1 are the same
    /// function for identity (D6).
    pub sympos: u32,
    /// The original function's code, `[old_func, old_func + old_size)`.
    pub old: Option<Range>,
    /// The replacement's code in the patch library, `[new_func, new_func + new_size)`.
    pub new: Option<Range>,
}

impl FuncSpec {
    /// A resolved func with sympos 0.
    pub fn new(name: &str, old: Range, new: Range) -> Self {
        FuncSpec {
            name: name.to_owned(),
            sympos: 0,
            old: Some(old),
            new: Some(new),
        }
    }

    /// A func of an object that is not loaded: no ranges yet (D2).
    pub fn unresolved(name: &str) -> Self {
        FuncSpec {
            name: name.to_owned(),
            sympos: 0,
            old: None,
            new: None,
        }
    }

    pub fn sympos(mut self, sympos: u32) -> Self {
        self.sympos = sympos;
        self
    }
}

/// CB1: which callbacks an object has. An absent callback is not run (and an absent pre_patch counts as
/// success, CB2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CallbackSet {
    pub pre_patch: bool,
    pub post_patch: bool,
    pub pre_unpatch: bool,
    pub post_unpatch: bool,
}

impl CallbackSet {
    pub const NONE: CallbackSet = CallbackSet {
        pre_patch: false,
        post_patch: false,
        pre_unpatch: false,
        post_unpatch: false,
    };
    pub const ALL: CallbackSet = CallbackSet {
        pre_patch: true,
        post_patch: true,
        pre_unpatch: true,
        post_unpatch: true,
    };
}

/// D11: a system state `{id, version}` (the opaque `data` pointer lives in the agent, not in the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StateSpec {
    /// Non-zero.
    pub id: u64,
    pub version: u32,
}
