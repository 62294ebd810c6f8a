//! Relocation of displaced instructions with iced-x86's `BlockEncoder` (DESIGN.md §4.3).

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, ConditionCode, Decoder, DecoderOptions, FlowControl,
    Instruction, InstructionBlock,
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
