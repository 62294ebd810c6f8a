//! Register assumptions of callers (DESIGN.md §4.3a): what an original function may clobber, transitively over
//! its direct callees, and the thunk that preserves the rest around a call to the new version.

use std::collections::{BTreeSet, VecDeque};

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, FlowControl, Instruction, InstructionBlock,
    InstructionInfoFactory, MemoryOperand, Mnemonic, OpAccess, OpKind, Register,
};

use crate::reloc::decode_all;
use crate::{ClobberError, EncodeError, FunctionBytes};

/// A set of general registers (bit = iced `Register::number()`: rax 0, rcx 1, rdx 2, rbx 3, rsp 4, rbp 5,
/// rsi 6, rdi 7, r8..r15 8..15) and vector registers (bit n = xmm/ymm/zmm n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct RegSet {
    pub gpr: u16,
    pub vec: u32,
}

const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];
const GPRS: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

impl RegSet {
    pub const EMPTY: RegSet = RegSet { gpr: 0, vec: 0 };

    /// The SysV x86-64 call-clobbered registers: rax, rcx, rdx, rsi, rdi, r8–r11, and the first `vectors`
    /// vector registers (16 without AVX-512, 32 with it).
    pub fn sysv_call_clobbered(vectors: u32) -> RegSet {
        let gpr = [0usize, 1, 2, 6, 7, 8, 9, 10, 11]
            .iter()
            .fold(0u16, |m, &i| m | (1 << i));
        let vec = if vectors >= 32 {
            u32::MAX
        } else {
            (1u32 << vectors) - 1
        };
        RegSet { gpr, vec }
    }

    /// Adds the full register `reg` is part of (`eax` → rax, `xmm3`/`ymm3` → vector 3). Other register
    /// classes (segment, mask, x87/MMX, flags) are ignored.
    pub fn add(&mut self, reg: Register) {
        let full = reg.full_register();
        if full.is_gpr64() {
            self.gpr |= 1 << full.number();
        } else if full.is_zmm() {
            self.vec |= 1 << full.number();
        }
    }

    pub fn contains(&self, reg: Register) -> bool {
        let mut one = RegSet::EMPTY;
        one.add(reg);
        one != RegSet::EMPTY && self.union(one) == *self
    }

    pub fn union(self, o: RegSet) -> RegSet {
        RegSet {
            gpr: self.gpr | o.gpr,
            vec: self.vec | o.vec,
        }
    }

    pub fn minus(self, o: RegSet) -> RegSet {
        RegSet {
            gpr: self.gpr & !o.gpr,
            vec: self.vec & !o.vec,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.gpr == 0 && self.vec == 0
    }

    /// The general registers of the set, in number order.
    pub fn gprs(&self) -> impl Iterator<Item = Register> + '_ {
        (0..16).filter(|i| self.gpr & (1 << i) != 0).map(|i| GPRS[i])
    }

    /// The vector register numbers of the set.
    pub fn vectors(&self) -> impl Iterator<Item = u32> + '_ {
        (0..32).filter(|i| self.vec & (1 << i) != 0)
    }
}

impl std::fmt::Display for RegSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<String> = (0..16)
            .filter(|i| self.gpr & (1 << i) != 0)
            .map(|i| GPR_NAMES[i].into())
            .collect();
        names.extend(self.vectors().map(|i| format!("v{i}")));
        write!(f, "{{{}}}", names.join(","))
    }
}

/// A function's code, owned (what the callee closure of [`clobbered_registers`] returns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCode {
    pub name: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// What a function may clobber, including everything it calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clobbers {
    /// Exactly these registers (general and vector) may be written by the function or its callees.
    Known(RegSet),
    /// It calls code that is not known (indirect call, PLT, another module): callers can rely on nothing
    /// beyond the ABI, so no thunk is needed. `reason` says which instruction.
    All { reason: String },
}

impl Clobbers {
    /// The registers that callers may rely on although the ABI lets a callee clobber them:
    /// `sysv_call_clobbered(vectors) − clobbered`. A new version must be entered through a thunk that
    /// preserves them ([`encode_preserving_thunk`]) when this is not empty.
    pub fn to_preserve(&self, vectors: u32) -> RegSet {
        match self {
            Clobbers::All { .. } => RegSet::EMPTY,
            Clobbers::Known(s) => RegSet::sysv_call_clobbered(vectors).minus(*s),
        }
    }
}

/// Most functions one analysis visits before it gives up with [`Clobbers::All`].
pub const MAX_FUNCTIONS: usize = 4096;

/// Computes the registers `root` may clobber (written registers as iced-x86's `InstructionInfoFactory`
/// reports them, mapped to full registers), transitively over its direct callees and tail calls: `callee`
/// returns the function that contains an address (in the same module), or `None` if unknown. An indirect
/// call, an indirect jump that is not a jump table, or an unknown callee gives [`Clobbers::All`].
pub fn clobbered_registers(
    root: FunctionBytes<'_>,
    callee: &mut dyn FnMut(u64) -> Option<FunctionCode>,
) -> Result<Clobbers, ClobberError> {
    let mut factory = InstructionInfoFactory::new();
    let mut set = RegSet::EMPTY;
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    let mut queue: VecDeque<FunctionCode> = VecDeque::new();
    queue.push_back(FunctionCode {
        name: root.name.into(),
        addr: root.addr,
        bytes: root.bytes.to_vec(),
    });
    seen.insert(root.addr);
    while let Some(f) = queue.pop_front() {
        if seen.len() > MAX_FUNCTIONS {
            return Ok(Clobbers::All {
                reason: format!("more than {MAX_FUNCTIONS} functions reachable from {}", root.name),
            });
        }
        let instrs = decode_all(f.addr, &f.bytes).map_err(|at| ClobberError::Undecodable {
            root: root.name.into(),
            function: f.name.clone(),
            addr: f.addr,
            at,
        })?;
        let own = f.addr..f.addr + f.bytes.len() as u64;
        for (idx, ins) in instrs.iter().enumerate() {
            let info = factory.info(ins);
            for r in info.used_registers() {
                if matches!(
                    r.access(),
                    OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
                ) && r.register().full_register() != Register::RSP
                {
                    // rsp comes back as it was (calls, pushes): it is never part of the clobbers.
                    set.add(r.register());
                }
            }
            if ins.mnemonic() == Mnemonic::Syscall {
                // The kernel returns in rax and clobbers rcx and r11.
                set.add(Register::RAX);
                set.add(Register::RCX);
                set.add(Register::R11);
            }
            let all = |what: &str| {
                Ok(Clobbers::All {
                    reason: format!("{what} `{ins}` at {:#x} in {}", ins.ip(), f.name),
                })
            };
            match ins.flow_control() {
                FlowControl::IndirectCall => return all("indirect call"),
                FlowControl::IndirectBranch if !is_jump_table(&instrs, idx, &f.bytes, f.addr) => {
                    return all("indirect jump");
                }
                FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
                    if matches!(ins.op0_kind(), OpKind::NearBranch64 | OpKind::NearBranch32) =>
                {
                    let t = ins.near_branch_target();
                    if own.contains(&t) || seen.contains(&t) {
                        continue;
                    }
                    match callee(t) {
                        Some(c) => {
                            seen.insert(t);
                            if !seen.contains(&c.addr) || c.addr == t {
                                seen.insert(c.addr);
                                queue.push_back(c);
                            }
                        }
                        None => return all(&format!("call or jump to unknown code {t:#x}:")),
                    }
                }
                _ => {}
            }
        }
    }
    Ok(Clobbers::Known(set))
}

/// True if the indirect jump `instrs[idx]` is an intra-function jump table: CET's `notrack` prefix (gcc
/// emits it only for tables), the non-PIC `jmp [index*8 + table]`, or the PIC pattern `movslq (rB,rI,4),rX;
/// add rB,rX; jmp *rX` just before it.
fn is_jump_table(instrs: &[Instruction], idx: usize, bytes: &[u8], base: u64) -> bool {
    let ins = &instrs[idx];
    let off = (ins.ip() - base) as usize;
    let raw = &bytes[off..off + ins.len()];
    // Legacy prefixes come first; 0x3E before the opcode is notrack on an indirect branch.
    for &b in raw {
        match b {
            0x3e => return true,
            0x26 | 0x2e | 0x36 | 0x64 | 0x65 | 0x66 | 0x67 | 0xf2 | 0xf3 | 0xf0 => continue,
            0x40..=0x4f => continue,
            _ => break,
        }
    }
    if ins.op0_kind() == OpKind::Memory
        && ins.memory_base() == Register::None
        && ins.memory_index() != Register::None
        && ins.memory_index_scale() == 8
    {
        return true;
    }
    if ins.op0_kind() == OpKind::Register && idx >= 2 {
        let r = ins.op0_register().full_register();
        let add = &instrs[idx - 1];
        let load = instrs[..idx - 1].iter().rev().take(3).any(|l| {
            l.mnemonic() == Mnemonic::Movsxd
                && l.op0_kind() == OpKind::Register
                && l.op1_kind() == OpKind::Memory
        });
        return add.mnemonic() == Mnemonic::Add
            && add.op0_kind() == OpKind::Register
            && add.op0_register().full_register() == r
            && load;
    }
    false
}

/// How much of each vector register a thunk saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorWidth {
    /// 16 bytes (`movups`): enough on CPUs without AVX.
    Xmm,
    /// 32 bytes (`vmovdqu`): AVX. The upper halves of ymm registers survive SSE code in the callee only if saved.
    Ymm,
    /// 64 bytes (`vmovdqu64`): AVX-512 (vectors 16–31 need it). Mask registers k0–k7 are not saved.
    Zmm,
}

impl VectorWidth {
    fn bytes(self) -> u32 {
        match self {
            VectorWidth::Xmm => 16,
            VectorWidth::Ymm => 32,
            VectorWidth::Zmm => 64,
        }
    }
}

/// A thunk that enters a new version while preserving registers callers rely on (DESIGN.md §4.3a).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thunk {
    pub ip: u64,
    pub code: Vec<u8>,
    /// Offset in `code` of the return address of the thunk's call (for the unwinder: a return address
    /// `ip + return_offset` on a stack is this thunk's frame).
    pub return_offset: u32,
    /// At `ip + return_offset`, the caller's return address is at `[rsp + caller_ra_offset]` (the thunk's
    /// frame size); the caller's CFA is `rsp + caller_ra_offset + 8`.
    pub caller_ra_offset: u32,
}

/// Encodes, at `at`, a thunk that saves `preserve` (general registers with push/pop, vectors in a stack
/// area of `width` per register), copies `stack_arg_bytes` of stack arguments (rounded up to 8) so that the
/// callee finds them where it expects, calls `target` with `rsp` 16-byte aligned, restores, and returns to
/// the caller. It changes no register outside `preserve` other than the flags and what `target` returns.
/// Only rsp-relative pushes and moves are used: no scratch register is needed.
///
/// `stack_arg_bytes`: how much the function takes on the stack (arguments beyond the six integer and eight
/// vector registers, structs passed by value); 0 for most functions. Copying more than needed is harmless
/// (it reads the caller's frame), so when it is unknown pass a generous bound such as 64. The thunk's
/// frame has no CFI: the unwinder uses `return_offset` and `caller_ra_offset` to step through it.
pub fn encode_preserving_thunk(
    at: u64,
    target: u64,
    preserve: RegSet,
    width: VectorWidth,
    stack_arg_bytes: u32,
) -> Result<Thunk, EncodeError> {
    let err = |e: iced_x86::IcedError| EncodeError::Encoder {
        what: "preserving thunk".into(),
        at,
        reason: e.to_string(),
    };
    let inv = |reason: String| EncodeError::Invalid {
        what: "preserving thunk".into(),
        at,
        reason,
    };
    if preserve.gpr & ((1 << 4) | (1 << 5) | (1 << 3) | 0xf000) != 0 {
        return Err(inv(format!(
            "{preserve} holds callee-saved registers or rsp, which need no thunk"
        )));
    }
    if width != VectorWidth::Zmm && preserve.vec >> 16 != 0 {
        return Err(inv(
            "vectors 16–31 exist only with AVX-512: use VectorWidth::Zmm".into()
        ));
    }
    let gprs: Vec<Register> = preserve.gprs().collect();
    let vecs: Vec<u32> = preserve.vectors().collect();
    let k = gprs.len() as u32;
    let n = stack_arg_bytes.div_ceil(8);
    let v = vecs.len() as u32 * width.bytes();
    // At entry rsp ≡ 8 (mod 16); at the call it must be ≡ 0: 8k + v + pad + 8n ≡ 8 (mod 16).
    let pad = if (8 * k + 8 * n).is_multiple_of(16) { 8 } else { 0 };
    let area = v + pad;
    let frame = 8 * k + area + 8 * n;

    let mut code: Vec<Instruction> = Vec::new();
    let w = |r: Result<Instruction, iced_x86::IcedError>| r.map_err(err);
    for &r in &gprs {
        code.push(w(Instruction::with1(Code::Push_r64, r))?);
    }
    if area > 0 {
        code.push(w(Instruction::with2(
            Code::Sub_rm64_imm32,
            Register::RSP,
            area as i32,
        ))?);
    }
    for (i, &vn) in vecs.iter().enumerate() {
        let m = MemoryOperand::with_base_displ(Register::RSP, (i as u32 * width.bytes()) as i64);
        code.push(w(match width {
            VectorWidth::Xmm => Instruction::with2(Code::Movups_xmmm128_xmm, m, vreg(Register::XMM0, vn)),
            VectorWidth::Ymm => {
                Instruction::with2(Code::VEX_Vmovdqu_ymmm256_ymm, m, vreg(Register::YMM0, vn))
            }
            VectorWidth::Zmm => {
                Instruction::with2(Code::EVEX_Vmovdqu64_zmmm512_k1z_zmm, m, vreg(Register::ZMM0, vn))
            }
        })?);
    }
    // Stack argument j sits at entry_rsp + 8 + 8j. Pushing from the last to the first keeps the distance
    // from the current rsp to the next one to copy constant: 8k + area + 8n.
    for _ in 0..n {
        let m = MemoryOperand::with_base_displ(Register::RSP, frame as i64);
        code.push(w(Instruction::with1(Code::Push_rm64, m))?);
    }
    code.push(w(Instruction::with_branch(Code::Call_rel32_64, target))?);
    let after_call = code.len();
    if n > 0 {
        code.push(w(Instruction::with2(
            Code::Add_rm64_imm32,
            Register::RSP,
            (8 * n) as i32,
        ))?);
    }
    for (i, &vn) in vecs.iter().enumerate() {
        let m = MemoryOperand::with_base_displ(Register::RSP, (i as u32 * width.bytes()) as i64);
        code.push(w(match width {
            VectorWidth::Xmm => Instruction::with2(Code::Movups_xmm_xmmm128, vreg(Register::XMM0, vn), m),
            VectorWidth::Ymm => {
                Instruction::with2(Code::VEX_Vmovdqu_ymm_ymmm256, vreg(Register::YMM0, vn), m)
            }
            VectorWidth::Zmm => {
                Instruction::with2(Code::EVEX_Vmovdqu64_zmm_k1z_zmmm512, vreg(Register::ZMM0, vn), m)
            }
        })?);
    }
    if area > 0 {
        code.push(w(Instruction::with2(
            Code::Add_rm64_imm32,
            Register::RSP,
            area as i32,
        ))?);
    }
    for &r in gprs.iter().rev() {
        code.push(w(Instruction::with1(Code::Pop_r64, r))?);
    }
    code.push(Instruction::with(Code::Retnq));
    // Distinct fake IPs so that BlockEncoder does not take the call target for an instruction of the block.
    for (i, ins) in code.iter_mut().enumerate() {
        ins.set_ip(i as u64 + 1);
    }
    let res = BlockEncoder::encode(
        64,
        InstructionBlock::new(&code, at),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .map_err(err)?;
    Ok(Thunk {
        ip: at,
        return_offset: res.new_instruction_offsets[after_call],
        code: res.code_buffer,
        caller_ra_offset: frame,
    })
}

fn vreg(base: Register, n: u32) -> Register {
    // XMM0..XMM31, YMM0..YMM31, ZMM0..ZMM31 are consecutive in iced's Register enum.
    Register::try_from(base as usize + n as usize).unwrap_or(base)
}
