//! Dispatchers (DESIGN.md §4.4). Stubs touch only the flags: no general or vector register is clobbered.

use iced_x86::code_asm::{CodeAssembler, byte_ptr, dword_ptr, qword_ptr};

use crate::EncodeError;

/// Width of the agent's per-thread state slot at `fs:[tpoff]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateWidth {
    Byte,
    Dword,
    Qword,
}

/// The agent's per-thread state slot (DESIGN.md §4.2) and the values it holds (SPEC C1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsSlot {
    /// Offset of the slot from the thread pointer (`fs_base`); negative for initial-exec TLS.
    pub tpoff: i32,
    pub width: StateWidth,
    /// The value meaning PATCHED (must fit the width; 0..=127 always does).
    pub patched: u32,
    /// The value meaning UNPATCHED.
    pub unpatched: u32,
}

/// The direction of the transition a dispatcher serves. IDLE (a thread the driver has not reached yet)
/// counts as the starting state (DESIGN.md §4.4, SPEC C2/H3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Target PATCHED: only threads whose state is PATCHED take the new version.
    Patching,
    /// Target UNPATCHED: only threads whose state is UNPATCHED take the old version.
    Unpatching,
}

/// What a dispatcher chooses between (SPEC H3): `new_version` is the top of the function's stack (for
/// PATCHED threads), `old_version` the entry below it or the original's old path (for UNPATCHED threads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    pub slot: TlsSlot,
    pub direction: Direction,
    /// Reached with an absolute `jmp [rip+x]`: it may be anywhere in the address space.
    pub new_version: u64,
    /// Reached with `jmp rel32` when within ±2 GiB of the dispatcher, else with an absolute jump.
    pub old_version: u64,
}

/// Longest dispatcher [`encode_dispatcher`] produces (cmp 10 + jcc 6 + `jmp [rip]` 6 + far old jmp 6 + 2
/// pointers 16), so the driver can lay stubs out before encoding them.
pub const DISPATCHER_MAX_LEN: usize = 48;

/// Encodes the dispatcher placed at `at`:
///
/// ```text
/// cmp  <width> ptr fs:[tpoff], PATCHED      ; Patching   (IDLE, UNPATCHED → old)
/// jne  old                                  ;
/// cmp  <width> ptr fs:[tpoff], UNPATCHED    ; Unpatching (IDLE, PATCHED → new)
/// je   old                                  ;
/// jmp  qword ptr [rip+new_ptr]
/// old: jmp old_version                      ; rel32, or absolute when far
/// new_ptr: .quad new_version
/// ```
///
/// Only the flags change, which the SysV ABI allows at a function's entry. rsp does not move: for a thread
/// stopped inside a dispatcher the caller's return address is at `[rsp]` (the unwinder's rule for it).
///
/// The common case (the old version within ±2 GiB, as an old-path copy in the stub page or an entry below
/// always is) is laid out from the fixed template above without iced-x86's encoder, whose tables cost about
/// 1 ms and 170 page faults to build in every `relive` process (the issue 5 benchmark's 1-thread apply is
/// a few ms). The template gives the same bytes as [`encode_dispatcher_with_assembler`], which the far case
/// uses; tests/stubs.rs checks that they agree.
pub fn encode_dispatcher(at: u64, d: &Dispatch) -> Result<Vec<u8>, EncodeError> {
    let (value, cmp) = dispatcher_cmp(at, d)?;
    let mut out = Vec::with_capacity(DISPATCHER_MAX_LEN);
    // cmp <width> ptr fs:[disp32], imm: fs prefix, REX.W for a qword, opcode 80 (imm8) / 83 (sign-extended
    // imm8) / 81 (imm32), ModRM 3C (/7, SIB follows), SIB 25 (no base, no index: absolute disp32).
    out.push(0x64);
    let imm8 = i8::try_from(value as i32).ok();
    match cmp {
        StateWidth::Byte => out.push(0x80),
        StateWidth::Dword | StateWidth::Qword => {
            if cmp == StateWidth::Qword {
                out.push(0x48);
            }
            out.push(if imm8.is_some() { 0x83 } else { 0x81 });
        }
    }
    out.extend_from_slice(&[0x3c, 0x25]);
    out.extend_from_slice(&d.slot.tpoff.to_le_bytes());
    match (cmp, imm8) {
        (StateWidth::Byte, _) => out.push(value as u8),
        (_, Some(v)) => out.push(v as u8),
        (_, None) => out.extend_from_slice(&(value as i32).to_le_bytes()),
    }
    // jne/je old (over the 6-byte jmp below), then jmp qword ptr [rip+new_ptr].
    out.push(match d.direction {
        Direction::Patching => 0x75,
        Direction::Unpatching => 0x74,
    });
    out.push(6);
    let jmp_new = out.len();
    out.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
    // old: jmp old_version, short when it reaches, else rel32; beyond ±2 GiB the assembler's far form.
    let old_at = at + out.len() as u64;
    if let Ok(j) = crate::entry::encode_jmp_rel8(old_at, d.old_version) {
        out.extend_from_slice(&j);
    } else if let Ok(j) = crate::entry::encode_jmp_rel32(old_at, d.old_version) {
        out.extend_from_slice(&j);
    } else {
        return encode_dispatcher_with_assembler(at, d);
    }
    let disp = (out.len() - (jmp_new + 6)) as u32;
    out[jmp_new + 2..jmp_new + 6].copy_from_slice(&disp.to_le_bytes());
    out.extend_from_slice(&d.new_version.to_le_bytes());
    Ok(out)
}

/// The state value the dispatcher compares with, checked against the slot's width.
fn dispatcher_cmp(at: u64, d: &Dispatch) -> Result<(u32, StateWidth), EncodeError> {
    let value = match d.direction {
        Direction::Patching => d.slot.patched,
        Direction::Unpatching => d.slot.unpatched,
    };
    let fits = match d.slot.width {
        StateWidth::Byte => u8::try_from(value).is_ok(),
        StateWidth::Dword => true,
        StateWidth::Qword => i32::try_from(value).is_ok(),
    };
    if !fits {
        let what = match d.slot.width {
            StateWidth::Byte => "a byte slot",
            _ => "a sign-extended imm32",
        };
        return Err(EncodeError::Invalid {
            what: "dispatcher".into(),
            at,
            reason: format!("state value {value} does not fit {what}"),
        });
    }
    Ok((value, d.slot.width))
}

/// [`encode_dispatcher`] through iced-x86's `CodeAssembler`: the reference the template is tested against,
/// and the encoder of the far case (an old version beyond ±2 GiB).
pub fn encode_dispatcher_with_assembler(at: u64, d: &Dispatch) -> Result<Vec<u8>, EncodeError> {
    let err = |e: iced_x86::IcedError| EncodeError::Encoder {
        what: "dispatcher".into(),
        at,
        reason: e.to_string(),
    };
    let (value, _) = dispatcher_cmp(at, d)?;
    let mut a = CodeAssembler::new(64).map_err(err)?;
    // An absolute disp32 (no base, no index) is sign-extended: fs:[-152] addresses fs_base - 152.
    let slot = d.slot.tpoff as i64 as u64;
    match d.slot.width {
        StateWidth::Byte => a.cmp(byte_ptr(slot).fs(), value as i32).map_err(err)?,
        StateWidth::Dword => a.cmp(dword_ptr(slot).fs(), value as i32).map_err(err)?,
        StateWidth::Qword => a.cmp(qword_ptr(slot).fs(), value as i32).map_err(err)?,
    }
    let mut old = a.create_label();
    let mut new_ptr = a.create_label();
    match d.direction {
        Direction::Patching => a.jne(old).map_err(err)?,
        Direction::Unpatching => a.je(old).map_err(err)?,
    }
    a.jmp(qword_ptr(new_ptr)).map_err(err)?;
    a.set_label(&mut old).map_err(err)?;
    a.jmp(d.old_version).map_err(err)?;
    a.set_label(&mut new_ptr).map_err(err)?;
    a.dq(&[d.new_version]).map_err(err)?;
    a.assemble(at).map_err(err)
}

/// A jump placed at `at` to `target`: `jmp rel32` when it reaches, else the 14-byte absolute form.
pub fn encode_jump(at: u64, target: u64) -> Vec<u8> {
    match crate::entry::encode_jmp_rel32(at, target) {
        Ok(b) => b.to_vec(),
        Err(_) => crate::entry::encode_abs_jump(target).to_vec(),
    }
}

/// Lays out stubs in one page at increasing 16-byte aligned offsets. Each piece is encoded by a closure at
/// its final address, so relative displacements are right. Unused bytes are `int3`.
///
/// ```
/// use relive_x86::*;
/// let mut page = StubPage::new(0x7000_0000, 4096);
/// let a = page.place(|at| Ok(encode_jump(at, 0x7000_5000))).unwrap();
/// let b = page.place(|at| Ok(encode_abs_jump(0x7f00_0000_0000).to_vec())).unwrap();
/// assert_eq!((a, b), (0x7000_0000, 0x7000_0010));
/// assert_eq!(page.bytes().len(), 16 + 14);
/// ```
#[derive(Debug, Clone)]
pub struct StubPage {
    base: u64,
    size: usize,
    code: Vec<u8>,
}

impl StubPage {
    pub fn new(base: u64, size: usize) -> StubPage {
        StubPage {
            base,
            size,
            code: Vec::new(),
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// The address the next piece will get.
    pub fn cursor(&self) -> u64 {
        self.base + self.code.len().next_multiple_of(16) as u64
    }

    /// Encodes a piece at the cursor with `encode(address)` and returns its address.
    pub fn place(
        &mut self,
        encode: impl FnOnce(u64) -> Result<Vec<u8>, EncodeError>,
    ) -> Result<u64, EncodeError> {
        let at = self.cursor();
        let code = encode(at)?;
        let start = (at - self.base) as usize;
        if start + code.len() > self.size {
            return Err(EncodeError::Invalid {
                what: "stub page".into(),
                at,
                reason: format!(
                    "{} more bytes do not fit the {}-byte page at {:#x}; map another page",
                    code.len(),
                    self.size,
                    self.base
                ),
            });
        }
        self.code.resize(start, crate::int3::INT3);
        self.code.extend(code);
        Ok(at)
    }

    /// The page's contents from its base up to the end of the last piece: one write into the r-x page.
    pub fn bytes(&self) -> &[u8] {
        &self.code
    }
}
