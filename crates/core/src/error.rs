//! One error enum for the whole model; one variant per distinct failure, each naming what is involved and
//! saying what to do next. The kernel errno each corresponds to is given by [`Error::errno_name`].

use serde::{Deserialize, Serialize};
use thiserror::Error as ThisError;

use crate::ids::{FuncId, ObjectId, PatchState, Tid};
use crate::output::Event;

/// ST3: why a patch's system states are incompatible with an installed patch's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateProblem {
    /// A replace patch must carry every installed state (installed at version `installed`).
    Missing { installed: u32 },
    /// No downgrade of a state's version.
    Downgrade { installed: u32, new: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, ThisError, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Error {
    /// L1.10 / L4.1 / R7 (EBUSY): another transition is in progress.
    #[error(
        "patch '{patch}': cannot {op} while patch '{transition_patch}' is in transition; wait for that \
         transition to complete, or reverse it (disable '{transition_patch}'), or force it"
    )]
    Busy {
        patch: String,
        op: String,
        transition_patch: String,
    },

    /// K5 (the seed's K3): a non-replace, non-stacking patch would take over a function another active patch
    /// owns.
    #[error(
        "patch '{patch}' conflicts with active patch '{owner}': both replace function '{}' in object '{}'; \
         make '{patch}' a cumulative patch (replace), which supersedes '{owner}', or opt in to stacking \
         (declare `stacking`, or apply with --allow-stacking) if '{patch}' is meant to sit on top of '{owner}'",
        function.name, function.object
    )]
    Conflict {
        patch: String,
        function: Box<FuncId>,
        owner: String,
    },

    /// D9: two different names resolve to the same entry address (aliases); one entry has one func stack.
    #[error(
        "patch '{patch}': function '{}' in object '{}' is an alias of '{}', which patch '{owner}' \
         already replaces at the same address; patch it under the name '{}'",
        function.name, function.object, other.name, other.name
    )]
    AliasedEntry {
        patch: String,
        function: Box<FuncId>,
        other: Box<FuncId>,
        owner: String,
    },

    /// L1.6 / ST3 (EINVAL): the patch's system states do not fit the installed patches'.
    #[error(
        "patch '{patch}' is not compatible with the already installed patch '{owner}': state {state_id} {}; \
         apply a patch that carries the state at version {} or newer",
        match problem { StateProblem::Missing { .. } => "is missing (a replace patch must carry every installed state)".to_owned(),
                        StateProblem::Downgrade { installed, new } => format!("would be downgraded from version {installed} to {new}") },
        match problem { StateProblem::Missing { installed } | StateProblem::Downgrade { installed, .. } => *installed }
    )]
    IncompatibleState {
        patch: String,
        owner: String,
        state_id: u64,
        problem: StateProblem,
    },

    /// EEXIST: a patch of this name is already active.
    #[error(
        "patch '{patch}' is already active; disable it first, or build the new version under another name"
    )]
    AlreadyExists { patch: String },

    /// D4/D5 (EINVAL): the patch itself is malformed.
    #[error("patch '{patch}' is invalid: {reason}; fix the patch's manifest")]
    InvalidPatch { patch: String, reason: String },

    /// D6 (EEXIST in sysfs): the same function twice in one patch.
    #[error(
        "patch '{patch}' replaces function '{}' (sympos {}) in object '{}' twice (sympos 0 and 1 are the \
         same function); keep one",
        function.name, function.sympos(), function.object
    )]
    DuplicateFunc { patch: String, function: Box<FuncId> },

    /// D5: a func of a loaded object was not resolved by the controller.
    #[error(
        "patch '{patch}': function '{}' in loaded object '{}' has no resolved old and new code range; \
         resolve its symbols (D5) before loading",
        function.name, function.object
    )]
    UnresolvedFunc { patch: String, function: Box<FuncId> },

    /// ENOENT: no active patch of that name.
    #[error(
        "no active patch named '{patch}'; a disabled or replaced patch is gone (L5): apply it again to re-enable it"
    )]
    PatchNotFound { patch: String },

    /// S1 (EINVAL): writing the value `enabled` already has.
    #[error("patch '{patch}' is already {}; nothing to do", if *enabled { "enabled" } else { "being disabled" })]
    SameValue { patch: String, enabled: bool },

    /// S1 `force` (EINVAL) and friends: the operation needs a transition and none is running.
    #[error("cannot {op}: no transition is in progress")]
    NoTransition { op: String },

    /// The operation does not fit the transition's phase (e.g. `start` twice).
    #[error("cannot {op}: the transition of patch '{patch}' is {phase}; {hint}")]
    WrongPhase {
        op: String,
        patch: String,
        phase: String,
        hint: String,
    },

    /// The pre_patch results passed to `start` do not match the callbacks that were requested.
    #[error(
        "patch '{patch}': {got} pre_patch result(s) given, but {expected} pre_patch callback(s) were requested; \
         report one result per callback run, in order, stopping after the first failure"
    )]
    BadCallbackResults {
        patch: String,
        expected: usize,
        got: usize,
    },

    /// L2.4 / L7 / CB5: a pre_patch callback returned non-zero; the enable was cancelled.
    #[error(
        "patch '{patch}': pre_patch callback of object '{object}' failed with {code}; the enable was cancelled \
         and nothing of this patch was applied (patches already active stay as they were); fix the condition \
         the callback reports and apply again"
    )]
    PrePatchFailed {
        patch: String,
        object: ObjectId,
        code: i32,
    },

    /// CB6: a pre_patch callback refused a loading object; the load must fail with that code.
    #[error(
        "patch '{patch}': pre_patch callback for loading object '{object}' failed with {code}; the object must \
         not be loaded (fail the dlopen); fix the condition the callback reports, or disable '{patch}' first"
    )]
    ObjectRefused {
        patch: String,
        object: ObjectId,
        code: i32,
    },

    #[error("thread {tid} is not known to the model; add it first (add_thread)")]
    ThreadNotFound { tid: Tid },

    #[error("thread {tid} is already known to the model; remove it first if its id was reused")]
    ThreadExists { tid: Tid },

    /// A stub range given for a function must not be empty.
    #[error(
        "stub range for function '{function}' is empty ({start:#x}..{end:#x}); pass the stub's real extent"
    )]
    EmptyStub {
        function: Box<FuncId>,
        start: u64,
        end: u64,
    },

    /// The serialized model has a format this build does not read.
    #[error(
        "model state format {found} is not supported (this relive reads format {supported}); use the relive \
         version that wrote it to finish or reverse the transition"
    )]
    UnsupportedFormat { found: u32, supported: u32 },
}

impl Error {
    /// The kernel errno this failure corresponds to.
    pub fn errno_name(&self) -> &'static str {
        match self {
            Error::Busy { .. } => "EBUSY",
            Error::Conflict { .. } | Error::AliasedEntry { .. } => "EBUSY",
            Error::IncompatibleState { .. }
            | Error::InvalidPatch { .. }
            | Error::SameValue { .. }
            | Error::NoTransition { .. }
            | Error::WrongPhase { .. }
            | Error::BadCallbackResults { .. }
            | Error::EmptyStub { .. }
            | Error::UnsupportedFormat { .. } => "EINVAL",
            Error::AlreadyExists { .. } | Error::DuplicateFunc { .. } | Error::ThreadExists { .. } => {
                "EEXIST"
            }
            Error::UnresolvedFunc { .. } | Error::PatchNotFound { .. } | Error::ThreadNotFound { .. } => {
                "ENOENT"
            }
            Error::PrePatchFailed { .. } | Error::ObjectRefused { .. } => "ECANCELED",
        }
    }

    /// The kernel log line that accompanies this refusal, if the kernel logs one (ST3).
    pub fn event(&self) -> Option<Event> {
        match self {
            Error::IncompatibleState { patch, .. } => Some(Event::NotCompatible { patch: patch.clone() }),
            _ => None,
        }
    }
}

pub(crate) fn phase_name(started: bool, target: PatchState) -> String {
    format!(
        "{} ({})",
        if started { "started" } else { "initializing" },
        target.transition_word()
    )
}
