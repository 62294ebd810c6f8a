//! relive-x86: prologue analysis, relocation of displaced instructions, stub and jump encoding. Pure: it takes
//! bytes and addresses (AVMAs, process addresses) and returns bytes and plans; the transition driver does the
//! I/O (`/proc/PID/mem`, stops, the agent's SIGTRAP table).
//!
//! What the driver calls, in the order of DESIGN.md §3 (the walk of `relive apply`):
//!
//! 1. Step 4, checks: [`analyze_entry`] on each old function's bytes gives an [`EntryPlan`] or a typed
//!    [`EntryError`] naming the function and the address (too short, branch target inside the overwritten
//!    bytes, unrelocatable or undecodable bytes, a breakpoint there). [`clobbered_registers`] (DESIGN.md
//!    §4.3a) tells whether the new version needs a [`encode_preserving_thunk`] ([`Clobbers::to_preserve`]).
//! 2. Step 8, stubs: map a page inside [`EntryPlan::stub_window`]; lay out with [`StubPage`], each piece
//!    encoded at its final address: the old path ([`EntryPlan::encode_old_path`], unless
//!    [`EntryPlan::old_path_direct`]), the thunk if any, and a [`encode_dispatcher`] per function and
//!    transition direction ([`Direction`]: IDLE counts as the starting state).
//! 3. Entries: [`EntryPlan::install`] (to the dispatcher), [`EntryPlan::retarget`] (to the other direction's
//!    dispatcher on reverse), [`EntryPlan::direct_jump`] on completion (a `jmp rel32`, or a near
//!    [`encode_abs_jump`] when the new code is out of reach), and [`EntryPlan::restore`] on unpatch. Each
//!    [`EntryWrite`] is at most 8 bytes: one `pwrite`, checked against [`EntryWrite::expect`]. A write that
//!    is [`EntryWrite::stop_free`] may use [`int3_protocol`] (PAUSE-FREE.md §2); any other needs every
//!    thread stopped and no PC (signal frames included) for which [`EntryWrite::blocks_pc`] holds.
//! 4. Recovery and unwinding: [`EntryPlan::state`] classifies the bytes read back from an entry (a
//!    controller killed half-way); [`Relocated::original_pc`] maps a PC inside an old-path copy back to the
//!    original, and [`Thunk::return_offset`]/[`Thunk::caller_ra_offset`] describe the thunk's frame.
//!
//! Addresses are plain `u64` AVMAs throughout. Nothing here reads or writes a process.
//!
//! ```
//! use relive_x86::*;
//!
//! // endbr64; nopl 0(%rax,%rax,1) (-mfentry -mnop-mcount); lea 1(%rdi),%eax; ret
//! let bytes = [0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x8d, 0x47, 0x01, 0xc3];
//! let f = FunctionBytes { name: "inc", addr: 0x40_1000, bytes: &bytes };
//! let plan = analyze_entry(f, &EntryContext::default()).unwrap();
//! assert_eq!(plan.site, 0x40_1004); // after endbr64
//! assert_eq!(plan.kind, EntryKind::Pad { pad_len: 5, single_nop: true });
//! assert_eq!(plan.old_path_direct(), Some(0x40_1009));
//!
//! // A dispatcher in a stub page near the entry, for a patching transition.
//! let stub = 0x40_0000 - 0x1000;
//! let slot = TlsSlot { tpoff: -152, width: StateWidth::Byte, patched: 1, unpatched: 0 };
//! let d = Dispatch {
//!     slot,
//!     direction: Direction::Patching,
//!     new_version: 0x7f12_3456_0000,      // in the patch library, far away
//!     old_version: plan.resume,           // a pad: the original after the pad
//! };
//! let code = encode_dispatcher(stub, &d).unwrap();
//! assert!(code.len() <= DISPATCHER_MAX_LEN);
//!
//! // Entry → dispatcher: one 5-byte write replacing one instruction, so the int3 protocol applies.
//! let writes = plan.install(stub).unwrap();
//! assert_eq!(writes.len(), 1);
//! assert_eq!(writes[0].bytes[0], 0xe9);
//! let int3 = int3_protocol(&writes[0], stub).unwrap();
//! assert_eq!(int3.steps.len(), 6);
//!
//! // On completion the entry jumps straight to the new version when it is within reach, else through
//! // an absolute jump in the stub page.
//! assert!(!plan.reaches(d.new_version));
//! let near = stub + 64;
//! let _abs: [u8; 14] = encode_abs_jump(d.new_version);
//! let done = plan.retarget(stub, near).unwrap();
//! assert!(done[0].stop_free);
//!
//! // Unpatch: the original 5-byte NOP comes back.
//! assert_eq!(plan.restore(near).unwrap()[0].bytes, vec![0x0f, 0x1f, 0x44, 0x00, 0x00]);
//! ```
#![forbid(unsafe_code)]

mod entry;
mod error;
mod int3;
mod regs;
mod reloc;
mod stub;

pub use entry::{
    DirectJump, ENDBR64, EntryContext, EntryKind, EntryPlan, EntryState, EntryWrite, FunctionBytes,
    JMP_REL8_LEN, JMP_REL32_LEN, ReadData, TargetIndex, analyze_entry, encode_abs_jump, encode_jmp_rel8,
    encode_jmp_rel32, rel32_reaches,
};
pub use error::{ClobberError, EncodeError, EntryError};
pub use int3::{
    INT3, Int3Plan, Int3Step, int3_batch, int3_emulation, int3_protocol, int3_state_after, single_step_safe,
};
pub use regs::{
    Clobbers, FunctionCode, MAX_FUNCTIONS, RegSet, Thunk, VectorWidth, clobbered_registers,
    encode_preserving_thunk,
};
pub use reloc::{LEAF_COPY_MAX, Relocated, decode_all, relocatable_leaf, relocate, relocate_code};
pub use stub::{
    DISPATCHER_MAX_LEN, Direction, Dispatch, StateWidth, StubPage, TlsSlot, encode_dispatcher,
    encode_dispatcher_with_assembler, encode_jump,
};

/// Re-exported so that callers can name decoded instructions (e.g. [`EntryKind::Displaced`]).
pub use iced_x86::Instruction;
