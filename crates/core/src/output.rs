//! What the model hands back: ordered actions for the controller to perform, and structured events that mirror
//! the kernel's log lines (§10: the selftests compare exact log-line sequences).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ids::{FuncId, ObjectId, PatchState, Range, Tid};

/// The code a call of an original function runs (H3/H4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The original body (no redirection; also the result for a nop, H4).
    Original,
    /// One patch's new function.
    New { patch: String, range: Range },
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Code::Original => f.write_str("original"),
            Code::New { patch, range } => write!(f, "'{patch}' {range}"),
        }
    }
}

/// What an original function's entry must lead to (DESIGN §4.3/§4.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryTarget {
    /// The entry holds its original bytes: no patch touches the function.
    Original,
    /// Outside transitions: a direct jump to the active (top-of-stack) version.
    Direct { patch: String, range: Range },
    /// During a transition (H3): a dispatcher reading the thread's TLS state.
    Dispatch {
        /// Code for a thread in state PATCHED.
        patched: Code,
        /// Code for a thread in state UNPATCHED.
        unpatched: Code,
        /// Code for a thread whose slot still reads IDLE: the transition's starting state (DESIGN §4.4).
        idle: Code,
    },
}

impl EntryTarget {
    /// The code this entry runs for a thread in `state` (the dispatcher's decision).
    pub fn code_for(&self, state: PatchState) -> Code {
        match self {
            EntryTarget::Original => Code::Original,
            EntryTarget::Direct { patch, range } => Code::New {
                patch: patch.clone(),
                range: *range,
            },
            EntryTarget::Dispatch {
                patched,
                unpatched,
                idle,
            } => match state {
                PatchState::Patched => patched.clone(),
                PatchState::Unpatched => unpatched.clone(),
                PatchState::Idle => idle.clone(),
            },
        }
    }
}

/// CB1: the four per-object callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackKind {
    PrePatch,
    PostPatch,
    PreUnpatch,
    PostUnpatch,
}

impl fmt::Display for CallbackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallbackKind::PrePatch => "pre_patch",
            CallbackKind::PostPatch => "post_patch",
            CallbackKind::PreUnpatch => "pre_unpatch",
            CallbackKind::PostUnpatch => "post_unpatch",
        })
    }
}

/// Something the controller must do in the target, in the order given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// C1/C2/C5: write `state` into the thread's TLS slot (the thread must be stopped for a switch, C5).
    WriteThreadState { tid: Tid, state: PatchState },
    /// DESIGN §4.2: write `state` into the agent's TLS init image, so that threads created from now on start
    /// in it.
    WriteTlsInitImage { state: PatchState },
    /// D9/H3: install, retarget or remove (target `Original`) the entry of the function at `old`.
    SetEntry {
        func: FuncId,
        old: Range,
        target: EntryTarget,
    },
    /// CB1–CB5, CB8: run one callback of one object of one patch, in the agent. A `PrePatch` result must be
    /// reported back through [`crate::Model::start`]. `prev_states` is what ST2 `klp_get_prev_state` answers
    /// during this callback (one entry per state id, from the latest earlier patch that has it; empty
    /// outside a transition).
    RunCallback {
        patch: String,
        object: ObjectId,
        kind: CallbackKind,
        prev_states: Vec<PrevState>,
    },
    /// C8: send the remaining pending threads a wake-up ("fake signal") so they leave blocking calls.
    SignalThreads { tids: Vec<Tid> },
    /// L4/L9/R4: the patch left the model. `unload` is false for a forced patch (C11, U9): forget it but never
    /// `dlclose` its library.
    DropPatch { patch: String, unload: bool },
}

/// ST2: a state of an earlier patch, as `klp_get_prev_state(id)` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrevState {
    pub id: u64,
    pub version: u32,
    /// The patch that carries it.
    pub patch: String,
}

/// A structured kernel log line (L2, L3, L4, L6, L7, C8, C11, ST3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// L2.1 "enabling patch 'P'".
    EnablingPatch { patch: String },
    /// C2 "'P': initializing patching transition".
    InitializingTransition { patch: String, target: PatchState },
    /// L2.4 "pre-patch callback failed for object 'X'".
    PrePatchFailed { patch: String, object: ObjectId },
    /// L2.4 "failed to enable patch 'P'".
    FailedToEnable { patch: String },
    /// L7 "'P': canceling patching transition, going to unpatch".
    CancelingTransition { patch: String },
    /// C3 "'P': starting patching transition".
    StartingTransition { patch: String, target: PatchState },
    /// L6 "'P': reversing transition from patching to unpatching". `from` is the target before the reverse.
    ReversingTransition { patch: String, from: PatchState },
    /// C8 "signaling remaining tasks".
    SignalingRemainingTasks,
    /// C11 "forcing remaining tasks to the patched state" (the kernel's words, whatever the target).
    ForcingRemainingTasks,
    /// L3.1 / L4 "'P': completing patching transition".
    CompletingTransition { patch: String, target: PatchState },
    /// L3.7 / L4 "'P': patching complete".
    TransitionComplete { patch: String, target: PatchState },
    /// L1.6 / ST3 "Livepatch patch (P) is not compatible with the already installed livepatches."
    NotCompatible { patch: String },
    /// CB6 "applying patch 'P' to loading module 'M'".
    ApplyingToLoadingObject { patch: String, object: ObjectId },
    /// CB6 failure "patch 'P' failed for module 'M', refusing to load module 'M'".
    RefusingObject { patch: String, object: ObjectId },
    /// CB7 "reverting patch 'P' on unloading module 'M'".
    RevertingOnUnloadingObject { patch: String, object: ObjectId },
}

impl fmt::Display for Event {
    /// The kernel's line, with its `livepatch: ` prefix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::EnablingPatch { patch } => write!(f, "livepatch: enabling patch '{patch}'"),
            Event::InitializingTransition { patch, target } => {
                write!(
                    f,
                    "livepatch: '{patch}': initializing {} transition",
                    target.transition_word()
                )
            }
            Event::PrePatchFailed { object, .. } => {
                write!(f, "livepatch: pre-patch callback failed for object '{object}'")
            }
            Event::FailedToEnable { patch } => write!(f, "livepatch: failed to enable patch '{patch}'"),
            Event::CancelingTransition { patch } => {
                write!(
                    f,
                    "livepatch: '{patch}': canceling patching transition, going to unpatch"
                )
            }
            Event::StartingTransition { patch, target } => {
                write!(
                    f,
                    "livepatch: '{patch}': starting {} transition",
                    target.transition_word()
                )
            }
            Event::ReversingTransition { patch, from } => write!(
                f,
                "livepatch: '{patch}': reversing transition from {} to {}",
                from.transition_word(),
                from.opposite().transition_word()
            ),
            Event::SignalingRemainingTasks => f.write_str("livepatch: signaling remaining tasks"),
            Event::ForcingRemainingTasks => {
                f.write_str("livepatch: forcing remaining tasks to the patched state")
            }
            Event::CompletingTransition { patch, target } => {
                write!(
                    f,
                    "livepatch: '{patch}': completing {} transition",
                    target.transition_word()
                )
            }
            Event::TransitionComplete { patch, target } => {
                write!(f, "livepatch: '{patch}': {} complete", target.transition_word())
            }
            Event::ApplyingToLoadingObject { patch, object } => {
                write!(
                    f,
                    "livepatch: applying patch '{patch}' to loading module '{object}'"
                )
            }
            Event::RefusingObject { patch, object } => write!(
                f,
                "livepatch: patch '{patch}' failed for module '{object}', refusing to load module '{object}'"
            ),
            Event::RevertingOnUnloadingObject { patch, object } => {
                write!(
                    f,
                    "livepatch: reverting patch '{patch}' on unloading module '{object}'"
                )
            }
            Event::NotCompatible { patch } => write!(
                f,
                "livepatch: Livepatch patch ({patch}) is not compatible with the already installed livepatches."
            ),
        }
    }
}

/// One element of an [`Output`]: events and actions interleave in the order the kernel would log and act.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Event(Event),
    Action(Action),
}

/// The result of one operation: what to do and what to log, in order; plus, for an operation that was carried
/// out but failed for its caller (L7: a failing pre_patch cancels the enable), the error to report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub steps: Vec<Step>,
    pub error: Option<Error>,
}

impl Output {
    pub(crate) fn event(&mut self, e: Event) {
        self.steps.push(Step::Event(e));
    }

    pub(crate) fn action(&mut self, a: Action) {
        self.steps.push(Step::Action(a));
    }

    /// Append another output's steps (and its error if this one has none).
    pub fn extend(&mut self, other: Output) {
        self.steps.extend(other.steps);
        if self.error.is_none() {
            self.error = other.error;
        }
    }

    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.steps.iter().filter_map(|s| match s {
            Step::Event(e) => Some(e),
            Step::Action(_) => None,
        })
    }

    pub fn actions(&self) -> impl Iterator<Item = &Action> {
        self.steps.iter().filter_map(|s| match s {
            Step::Action(a) => Some(a),
            Step::Event(_) => None,
        })
    }

    /// The kernel log lines of this output, in order.
    pub fn log_lines(&self) -> Vec<String> {
        self.events().map(ToString::to_string).collect()
    }
}

/// A thread's stack as the unwinder saw it (DESIGN §4.5): innermost first; `pcs[0]` is the live PC, the rest
/// are return addresses except the frames listed in `interrupted`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadStack {
    pub pcs: Vec<u64>,
    /// True only if unwinding reached a thread root without error (U2).
    pub reliable: bool,
    /// Indices of the frames after the first whose PC is the exact address of the next instruction to run,
    /// not a return address: the PC a signal interrupted (saved in the signal frame, U3), or a PC inside
    /// generated code reached that way. C5a checks them like `pcs[0]` (the byte at the PC, not the one
    /// before it): a PC at the first byte of a forbidden range is inside it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interrupted: Vec<usize>,
}

impl ThreadStack {
    pub fn reliable(pcs: Vec<u64>) -> Self {
        ThreadStack {
            pcs,
            reliable: true,
            interrupted: Vec::new(),
        }
    }

    pub fn unreliable(pcs: Vec<u64>) -> Self {
        ThreadStack {
            pcs,
            reliable: false,
            interrupted: Vec::new(),
        }
    }

    /// Whether frame `i`'s PC is an exact instruction address (the live PC, or one listed in `interrupted`).
    pub fn is_exact(&self, i: usize) -> bool {
        i == 0 || self.interrupted.contains(&i)
    }
}

/// Why a stack could not be trusted (C5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unreliable {
    /// The unwinder did not reach a thread root.
    NotReliable,
    /// No frame at all.
    Empty,
    /// Deeper than the frame limit (100 by default, C5.4): counts as unreliable.
    TooDeep { depth: usize, max: usize },
}

/// The outcome of [`crate::Model::try_switch`] (C5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchOutcome {
    /// C5.1: the thread is already in the target state; nothing to do.
    AlreadyAtTarget,
    /// C5.6: the thread switched; perform this [`Action::WriteThreadState`] while it is still stopped.
    Switched(Action),
    /// C5.5 (EADDRINUSE, "sleeping on function X"): frame `frame` of the stack (0 = live PC) at `address` is
    /// inside a forbidden range of `function`; `code` says whose code that range is.
    Blocked {
        function: FuncId,
        frame: usize,
        address: u64,
        code: Code,
    },
    /// C5.4 (EINVAL, "unreliable stack"): retry later.
    Unreliable(Unreliable),
}
