//! The document the controller keeps in the target's registry body (DESIGN §4.8): relive-core's model plus
//! what the driver needs to finish or reverse a transition after it was killed: the patches' libraries and
//! callbacks, every entry's plan, its stub page and where its jump points now, and the transition sequence
//! number that makes the per-thread state values unique.
//!
//! Body version [`BODY_VERSION`], encoded as JSON (readable by `relive status`).

use relive_core::{FuncId, Model, ObjectId, PatchState};
use relive_x86::{EntryKind, EntryPlan};
use serde::{Deserialize, Serialize};

/// `body_version` of the registry body written by this driver.
pub const BODY_VERSION: u32 = 1;
/// Size of the stub page mapped near each patched entry.
pub const STUB_PAGE: u64 = 4096;
/// Layout of a stub page: the old-path copy, two dispatcher slots and two absolute-jump slots that
/// alternate, so that a slot is never rewritten while the entry leads to it (DESIGN §4.3).
pub const OLD_PATH_OFF: u64 = 0;
pub const OLD_PATH_MAX: u64 = 256;
pub const DISPATCH_OFF: [u64; 2] = [256, 320];
pub const ABSJMP_OFF: [u64; 2] = [384, 400];
/// Bytes of the page that hold generated code (registered as the function's stub range, DESIGN §4.5) in a
/// page without fresh slots (one mapped by a relive older than the stop-free entry writes).
pub const STUB_CODE_END: u64 = 416;
/// Where a page's fresh slots start: dispatchers and absolute jumps are appended there, each followed by an
/// `int3` end mark, and never rewritten. No entry ever led into bytes still zero, so no thread can be in
/// them, and code written there needs no stop of the process (the stop-free entry write of PAUSE-FREE.md).
/// When the page is full, the alternating slots above are used, under a stop-all with their PC check.
pub const FRESH_OFF: u64 = STUB_CODE_END;
/// Thunks (DESIGN §4.3a) of the patches' functions live in their own pages, never rewritten.
pub const THUNK_PAGE: u64 = 4096;

/// The slot value of a thread in `state` during transition number `seq` (DESIGN §4.2, §4.4). Every
/// transition uses fresh values, so a slot written during an earlier transition reads as IDLE, which the
/// dispatchers treat as the starting state: no thread has to be touched at init or at completion.
pub fn slot_value(seq: u32, state: PatchState) -> u64 {
    match state {
        PatchState::Idle => 0,
        PatchState::Patched => 2 * seq as u64 + 1,
        PatchState::Unpatched => 2 * seq as u64 + 2,
    }
}

/// The state a slot value means during transition `seq`.
pub fn slot_state(seq: u32, value: u64) -> PatchState {
    if value == slot_value(seq, PatchState::Patched) {
        PatchState::Patched
    } else if value == slot_value(seq, PatchState::Unpatched) {
        PatchState::Unpatched
    } else {
        PatchState::Idle
    }
}

/// The persisted document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Doc {
    pub format: u32,
    /// Transition sequence number (bumped at every enable or disable).
    pub seq: u32,
    pub model: Model,
    pub patches: Vec<PatchRec>,
    pub entries: Vec<EntryRec>,
    /// Thunk pages, never unmapped while their patch is loaded.
    #[serde(default)]
    pub thunk_pages: Vec<(String, u64)>,
}

impl Default for Doc {
    fn default() -> Self {
        Doc {
            format: BODY_VERSION,
            seq: 0,
            model: Model::new(),
            patches: vec![],
            entries: vec![],
            thunk_pages: vec![],
        }
    }
}

impl Doc {
    /// Registers relive's own code with an unwinder (DESIGN §4.5: code without CFI): every stub page and
    /// thunk page as a stub range, and every register-preserving thunk's return site with its frame size,
    /// so that a thread inside a new version entered through a thunk unwinds reliably.
    pub fn register_code(&self, unwinder: &mut relive_unwind::Unwinder) {
        for e in &self.entries {
            unwinder.add_code_range(
                e.stub..e.stub + e.code_end(),
                format!("relive stub of {}", e.func.name),
            );
        }
        for (patch, page) in &self.thunk_pages {
            unwinder.add_code_range(
                *page..*page + THUNK_PAGE,
                format!("relive thunk of patch {patch}"),
            );
        }
        for p in &self.patches {
            for f in p.objects.iter().flat_map(|o| o.funcs.iter()) {
                if let Some((ra, size)) = f.thunk_frame {
                    unwinder.add_return_site(ra, size, format!("relive thunk of patch {}", p.name));
                }
            }
        }
    }

    pub fn patch(&self, name: &str) -> Option<&PatchRec> {
        self.patches.iter().find(|p| p.name == name)
    }
    pub fn entry(&self, func: &FuncId) -> Option<&EntryRec> {
        self.entries.iter().find(|e| e.func == *func)
    }
    pub fn entry_mut(&mut self, func: &FuncId) -> Option<&mut EntryRec> {
        self.entries.iter_mut().find(|e| e.func == *func)
    }
}

/// A patch library loaded in the target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchRec {
    pub name: String,
    pub path: String,
    pub handle: u64,
    pub base: u64,
    pub objects: Vec<ObjRec>,
}

impl PatchRec {
    pub fn object(&self, id: &ObjectId) -> Option<&ObjRec> {
        self.objects.iter().find(|o| o.id == *id)
    }
    /// Where calls of `func` enter this patch's version: its thunk, or the new function itself.
    pub fn entry_point(&self, func: &FuncId) -> Option<u64> {
        self.objects
            .iter()
            .flat_map(|o| o.funcs.iter())
            .find(|f| f.func == *func)
            .map(|f| f.thunk.unwrap_or(f.new_addr))
    }
}

/// One object of a patch, with its callbacks' symbol names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjRec {
    pub id: ObjectId,
    pub pre_patch: Option<String>,
    pub post_patch: Option<String>,
    pub pre_unpatch: Option<String>,
    pub post_unpatch: Option<String>,
    pub funcs: Vec<FuncRec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FuncRec {
    pub func: FuncId,
    pub new_symbol: String,
    pub new_addr: u64,
    pub new_size: u64,
    /// What calls enter instead of the new version itself, if anything: its register-preserving thunk
    /// (DESIGN §4.3a), or a copy of a frameless leaf new version within the entry's `jmp rel32` reach.
    pub thunk: Option<u64>,
    /// For a register-preserving thunk (it calls the new version, so it has a frame while that runs): the
    /// return address of its call and its frame size there, for the unwinder (`Unwinder::add_return_site`).
    #[serde(default)]
    pub thunk_frame: Option<(u64, u64)>,
}

/// One patched entry: its plan, its stub page and what its jump leads to now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryRec {
    pub func: FuncId,
    pub plan: PlanRec,
    pub stub: u64,
    /// Where the old path starts: `plan.resume` for a pad, else the relocated copy in the stub page.
    pub old_path: u64,
    /// Where the entry's jump points as last written (0: original bytes).
    pub current: u64,
    /// The page has fresh slots ([`FRESH_OFF`]): its whole page is registered as the function's stub range.
    #[serde(default)]
    pub fresh: bool,
}

impl EntryRec {
    /// End of the generated code the page may hold (its stub range: DESIGN §4.5, SPEC C5a).
    pub fn code_end(&self) -> u64 {
        if self.fresh { STUB_PAGE } else { STUB_CODE_END }
    }
}

/// The serializable part of an [`EntryPlan`]: all that installing, retargeting and restoring need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanRec {
    pub function: String,
    pub addr: u64,
    pub size: u64,
    pub endbr: bool,
    pub site: u64,
    pub original: Vec<u8>,
    pub resume: u64,
    pub kind: KindRec,
    pub interior: Vec<u64>,
    pub stub_window: (u64, u64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KindRec {
    Pad {
        pad_len: u64,
        single_nop: bool,
    },
    PrePad {
        pad_len: u64,
        far_site: u64,
        far_original: Vec<u8>,
    },
    Displaced,
}

impl From<&EntryPlan> for PlanRec {
    fn from(p: &EntryPlan) -> Self {
        PlanRec {
            function: p.function.clone(),
            addr: p.addr,
            size: p.size,
            endbr: p.endbr,
            site: p.site,
            original: p.original.clone(),
            resume: p.resume,
            kind: match &p.kind {
                EntryKind::Pad { pad_len, single_nop } => KindRec::Pad {
                    pad_len: *pad_len,
                    single_nop: *single_nop,
                },
                EntryKind::PrePad {
                    pad_len,
                    far_site,
                    far_original,
                } => KindRec::PrePad {
                    pad_len: *pad_len,
                    far_site: *far_site,
                    far_original: far_original.clone(),
                },
                EntryKind::Displaced { .. } => KindRec::Displaced,
            },
            interior: p.interior.clone(),
            stub_window: (p.stub_window.start, p.stub_window.end),
        }
    }
}

impl PlanRec {
    /// The plan again, for [`EntryPlan::install`], `retarget` and `restore` (which never look at the
    /// displaced instructions; the old-path copy is encoded once, when the stub page is made).
    pub fn plan(&self) -> EntryPlan {
        EntryPlan {
            function: self.function.clone(),
            addr: self.addr,
            size: self.size,
            endbr: self.endbr,
            site: self.site,
            original: self.original.clone(),
            resume: self.resume,
            kind: match &self.kind {
                KindRec::Pad { pad_len, single_nop } => EntryKind::Pad {
                    pad_len: *pad_len,
                    single_nop: *single_nop,
                },
                KindRec::PrePad {
                    pad_len,
                    far_site,
                    far_original,
                } => EntryKind::PrePad {
                    pad_len: *pad_len,
                    far_site: *far_site,
                    far_original: far_original.clone(),
                },
                KindRec::Displaced => EntryKind::Displaced {
                    instructions: vec![],
                    bytes: vec![],
                },
            },
            interior: self.interior.clone(),
            stub_window: self.stub_window.0..self.stub_window.1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_slot_values_are_unique_per_transition_d4_4() {
        for seq in 1..300 {
            let p = slot_value(seq, PatchState::Patched);
            let u = slot_value(seq, PatchState::Unpatched);
            assert_eq!(slot_state(seq, p), PatchState::Patched);
            assert_eq!(slot_state(seq, u), PatchState::Unpatched);
            assert_eq!(slot_state(seq, 0), PatchState::Idle);
            // A value left by the previous transition reads as IDLE (the starting state).
            assert_eq!(
                slot_state(seq, slot_value(seq - 1, PatchState::Patched)),
                PatchState::Idle
            );
            assert_eq!(
                slot_state(seq, slot_value(seq - 1, PatchState::Unpatched)),
                PatchState::Idle
            );
        }
    }

    #[test]
    fn t_doc_roundtrips_through_json_d4_8() {
        let d = Doc::default();
        let s = serde_json::to_vec(&d).unwrap();
        let back: Doc = serde_json::from_slice(&s).unwrap();
        assert_eq!(back.seq, 0);
        assert!(back.model.patches().is_empty());
    }
}
