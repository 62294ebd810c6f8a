//! Relocation of displaced instructions with iced-x86's `BlockEncoder` (DESIGN.md §4.3).

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, ConditionCode, Decoder, DecoderOptions, FlowControl,
    Instruction, InstructionBlock, OpKind,
};

use crate::EncodeError;

/// Code moved to a new address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relocated {
    /// Where `code` must be placed (AVMA).
    pub ip: u64,
    /// The encoded bytes.
    pub code: Vec<u8>,
    /// For each input instruction, its offset in `code` (the jump back, if any, follows the last one).
    pub new_offsets: Vec<u32>,
    /// For each input instruction, its original address.
    pub original_ips: Vec<u64>,
}

impl Relocated {
    /// The original address of the instruction whose relocated copy starts at `pc`, if any: for reports
    /// and for the unwinder (a PC in an old-path copy means the original function is active, DESIGN.md §4.5).
    pub fn original_pc(&self, pc: u64) -> Option<u64> {
        let off = u32::try_from(pc.checked_sub(self.ip)?).ok()?;
        self.new_offsets
            .iter()
            .position(|&o| o == off)
            .map(|i| self.original_ips[i])
    }

    /// True if `pc` lies inside the relocated code.
    pub fn contains(&self, pc: u64) -> bool {
        pc >= self.ip && pc < self.ip + self.code.len() as u64
    }
}

/// Decodes `bytes` at `ip` into instructions. Returns the address of the first undecodable byte on error.
pub fn decode_all(ip: u64, bytes: &[u8]) -> Result<Vec<Instruction>, u64> {
    let mut dec = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut out = Vec::with_capacity(bytes.len() / 3 + 1);
    let mut ins = Instruction::default();
    while dec.can_decode() {
        dec.decode_out(&mut ins);
        if ins.is_invalid() {
            return Err(ins.ip());
        }
        out.push(ins);
    }
    Ok(out)
}

/// Re-encodes `instructions` (decoded at their original addresses) so that they run at `new_ip` and compute
/// the same absolute branch targets and RIP-relative addresses; branches between the instructions of the
/// block keep pointing at the same instructions. Short branches are widened as needed; a branch or the
/// jump back whose target is beyond ±2 GiB becomes an absolute `jmp/call [rip+x]` (BlockEncoder's far form).
/// `jump_back`, when given, appends a jump to that address after the last instruction.
///
/// Fails when a RIP-relative data operand cannot reach its target from `new_ip` (±2 GiB).
pub fn relocate(
    instructions: &[Instruction],
    new_ip: u64,
    jump_back: Option<u64>,
) -> Result<Relocated, EncodeError> {
    let mut block: Vec<Instruction> = instructions.to_vec();
    if let Some(back) = jump_back {
        let mut j = Instruction::with_branch(Code::Jmp_rel32_64, back).map_err(|e| EncodeError::Invalid {
            what: "jump back".into(),
            at: new_ip,
            reason: e.to_string(),
        })?;
        // BlockEncoder resolves branches to instructions of the block by IP: the jump back must not carry
        // the IP it jumps to (it would jump to itself), so it gets one no code uses.
        j.set_ip(0);
        block.push(j);
    }
    let res = BlockEncoder::encode(
        64,
        InstructionBlock::new(&block, new_ip),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .map_err(|e| EncodeError::Encoder {
        what: "relocated instructions".into(),
        at: new_ip,
        reason: e.to_string(),
    })?;
    let new_offsets = complete_offsets(&block, &res.new_instruction_offsets, &res.code_buffer, new_ip)
        .ok_or_else(|| EncodeError::Encoder {
            what: "relocated instructions".into(),
            at: new_ip,
            reason: "cannot map the relocated instructions back to the originals".into(),
        })?;
    Ok(Relocated {
        ip: new_ip,
        code: res.code_buffer,
        new_offsets: new_offsets[..instructions.len()].to_vec(),
        original_ips: instructions.iter().map(Instruction::ip).collect(),
    })
}

/// [`relocate`] for instructions whose original bytes are `code` (contiguous, from the first instruction's
/// address). When none of them depends on where it runs (no RIP-relative operand, no call, no branch but to
/// the start of one of them) and the jump back reaches with `jmp rel8`/`rel32`, the copy is the original
/// bytes followed by that jump: what BlockEncoder computes for them, without building iced-x86's encoder
/// tables (about 1 ms and 170 page faults in every `relive` process). Anything else goes through
/// [`relocate`]. No instructions at all (a plan rebuilt from a record) is just the jump back.
pub fn relocate_code(
    code: &[u8],
    instructions: &[Instruction],
    new_ip: u64,
    jump_back: Option<u64>,
) -> Result<Relocated, EncodeError> {
    if let Some(r) = copy_as_is(code, instructions, new_ip, jump_back) {
        return Ok(r);
    }
    relocate(instructions, new_ip, jump_back)
}

/// The as-is copy of [`relocate_code`], or `None` when it does not apply.
fn copy_as_is(
    code: &[u8],
    instructions: &[Instruction],
    new_ip: u64,
    jump_back: Option<u64>,
) -> Option<Relocated> {
    let len: usize = instructions.iter().map(Instruction::len).sum();
    if code.len() != len {
        return None;
    }
    // A relative branch to the start of an instruction of the block keeps its target in a copy of the
    // whole block. One into the middle of an instruction does not (past the block, the copy's bytes differ:
    // BlockEncoder sends it to the original address instead).
    let starts: Vec<u64> = instructions.iter().map(Instruction::ip).collect();
    let mut next = starts.first().copied().unwrap_or(0);
    for ins in instructions {
        let independent = match ins.flow_control() {
            FlowControl::Next | FlowControl::Return => true,
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                matches!(
                    ins.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                ) && starts.contains(&ins.near_branch_target())
            }
            _ => false,
        };
        if ins.ip() != next || ins.is_ip_rel_memory_operand() || !independent {
            return None;
        }
        next = ins.next_ip();
    }
    let mut out = code.to_vec();
    if let Some(back) = jump_back {
        let at = new_ip + len as u64;
        match crate::entry::encode_jmp_rel8(at, back) {
            Ok(j) => out.extend_from_slice(&j),
            Err(_) => out.extend_from_slice(&crate::entry::encode_jmp_rel32(at, back).ok()?),
        }
    }
    let new_offsets = instructions
        .iter()
        .scan(0u32, |off, i| {
            let o = *off;
            *off += i.len() as u32;
            Some(o)
        })
        .collect();
    Some(Relocated {
        ip: new_ip,
        code: out,
        new_offsets,
        original_ips: instructions.iter().map(Instruction::ip).collect(),
    })
}

/// BlockEncoder reports `u32::MAX` as the offset of an instruction it rewrote into several (a far `jcc`
/// becomes `jncc skip; jmp [rip+p]`, a `loop`/`jrcxz` becomes `loop l1; jmp l2; l1: jmp target; l2:`).
/// The expansions are laid out in order, so the offsets follow from the number of instructions each takes.
fn complete_offsets(block: &[Instruction], reported: &[u32], code: &[u8], ip: u64) -> Option<Vec<u32>> {
    let mut out = Vec::with_capacity(block.len());
    let mut cur: u32 = 0;
    for (ins, &rep) in block.iter().zip(reported) {
        if rep != u32::MAX && rep != cur {
            return None;
        }
        out.push(cur);
        let count = if rep != u32::MAX {
            1
        } else {
            match ins.flow_control() {
                FlowControl::ConditionalBranch if ins.condition_code() != ConditionCode::None => 2,
                FlowControl::ConditionalBranch => 3, // loop, loope, loopne, jrcxz, jecxz
                _ => 1,
            }
        };
        let mut dec = Decoder::with_ip(
            64,
            code.get(cur as usize..)?,
            ip + cur as u64,
            DecoderOptions::NONE,
        );
        for _ in 0..count {
            let x = dec.decode();
            if x.is_invalid() {
                return None;
            }
            cur += x.len() as u32;
        }
    }
    Some(out)
}

/// The longest new version [`relocatable_leaf`] copies.
pub const LEAF_COPY_MAX: usize = 256;

/// Whether the function at `ip` (`bytes`, its whole extent) can run unchanged at any other address, as a
/// copy placed within `jmp rel32` reach of a patched entry (DESIGN.md §4.4: "direct jumps once the
/// transition completes", when the patch library itself is loaded beyond ±2 GiB).
///
/// Only a frameless leaf qualifies, so that the copy needs no CFI (its return address is at `[rsp]` at every
/// instruction, like a stub's) and computes exactly what the original computes:
/// - no call, no indirect branch, no `syscall`/`int`/`iret`, nothing the decoder calls an exception;
/// - no RIP-relative operand (the data it would address stays behind), no instruction that reads or writes
///   `rsp` other than the final `ret`s (no push, pop, `sub rsp`, `[rsp+x]`);
/// - every branch stays inside the function, and the last instruction is a `ret` or a `jmp` (no fall-through
///   into whatever follows).
///
/// Returns the decoded instructions, ready for [`relocate`] (without a jump back).
pub fn relocatable_leaf(ip: u64, bytes: &[u8]) -> Option<Vec<Instruction>> {
    use iced_x86::{InstructionInfoFactory, OpAccess, Register};
    if bytes.is_empty() || bytes.len() > LEAF_COPY_MAX {
        return None;
    }
    let ins = decode_all(ip, bytes).ok()?;
    let end = ip + bytes.len() as u64;
    let mut info = InstructionInfoFactory::new();
    for i in &ins {
        match i.flow_control() {
            FlowControl::Next => {}
            FlowControl::Return => {
                if i.code() != Code::Retnq {
                    return None;
                }
                continue; // its implicit use of rsp is the one allowed
            }
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                let t = i.near_branch_target();
                if !(ip..end).contains(&t) {
                    return None;
                }
            }
            _ => return None,
        }
        if i.is_ip_rel_memory_operand() {
            return None;
        }
        let used = info.info(i);
        let touches_sp = used.used_registers().iter().any(|r| {
            matches!(
                r.register(),
                Register::RSP | Register::ESP | Register::SP | Register::SPL
            ) && r.access() != OpAccess::None
        }) || used
            .used_memory()
            .iter()
            .any(|m| matches!(m.base(), Register::RSP) || matches!(m.index(), Register::RSP));
        if touches_sp {
            return None;
        }
    }
    let last = ins.last()?;
    matches!(
        last.flow_control(),
        FlowControl::Return | FlowControl::UnconditionalBranch
    )
    .then_some(ins)
}

#[cfg(test)]
mod leaf_tests {
    use super::*;

    #[test]
    fn a_frameless_leaf_is_copied_and_computes_the_same() {
        // lea rax,[rdi+rdi+1]; test rdi,rdi; jns +3; neg rax; nop; ret
        let code = [
            0x48, 0x8d, 0x44, 0x3f, 0x01, 0x48, 0x85, 0xff, 0x79, 0x03, 0x48, 0xf7, 0xd8, 0xc3,
        ];
        let ins = relocatable_leaf(0x7f00_0000_1000, &code).expect("leaf");
        let r = relocate(&ins, 0x5500_0000_2000, None).unwrap();
        // Same bytes: nothing position-dependent left (the short branch is relative to its own block).
        assert_eq!(r.code, code);
    }

    #[test]
    fn frames_calls_rip_relative_data_and_fallthrough_are_refused() {
        let ip = 0x1000;
        // push rbp; mov rax,rdi; pop rbp; ret
        assert!(relocatable_leaf(ip, &[0x55, 0x48, 0x89, 0xf8, 0x5d, 0xc3]).is_none());
        // call rel32; ret
        assert!(relocatable_leaf(ip, &[0xe8, 0, 0, 0, 0, 0xc3]).is_none());
        // mov rax,[rip+0]; ret
        assert!(relocatable_leaf(ip, &[0x48, 0x8b, 0x05, 0, 0, 0, 0, 0xc3]).is_none());
        // mov rax,[rsp+8]; ret
        assert!(relocatable_leaf(ip, &[0x48, 0x8b, 0x44, 0x24, 0x08, 0xc3]).is_none());
        // mov rax,rdi (falls through)
        assert!(relocatable_leaf(ip, &[0x48, 0x89, 0xf8]).is_none());
        // jmp rel32 out of the function (a tail call)
        assert!(relocatable_leaf(ip, &[0xe9, 0x00, 0x10, 0x00, 0x00]).is_none());
        // jmp [rax] (indirect)
        assert!(relocatable_leaf(ip, &[0xff, 0x20]).is_none());
    }
}
