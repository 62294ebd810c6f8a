//! Property tests of relocation (DESIGN.md §4.3, issue 5 "x86"): random instruction sequences with
//! RIP-relative operands and short branches, relocated by `relocate`, must compute the same absolute branch
//! targets and effective addresses. Both sides are decoded and compared; branches are followed through the
//! forms BlockEncoder widens them to (rel32, inverted jcc over a jump, `jmp/call [rip+x]` with a pointer).

use iced_x86::{
    Code, ConditionCode, Decoder, DecoderOptions, Encoder, FlowControl, Instruction, MemoryOperand, OpKind,
    Register,
};
use proptest::prelude::*;
use relive_x86::{decode_all, relocate, relocate_code};

#[derive(Debug, Clone)]
enum Op {
    /// A short conditional branch: cc index, and where to: Some(k) = the k-th earlier instruction if in reach,
    /// else a relative displacement.
    Jcc8(usize, Option<usize>, i8),
    Jmp8(Option<usize>, i8),
    Jcc32(usize, i32),
    Jmp32(i32),
    Call32(i32),
    Loop8(i8),
    Jrcxz8(i8),
    LeaRip(usize, i32),
    MovLoadRip(usize, i32),
    MovStoreRip(usize, i32),
    CmpRipImm(i32, i8),
    MovupsRip(usize, i32),
    JmpIndRip(i32),
    AddImm(usize, i8),
    MovRegReg(usize, usize),
    Push(usize),
    Nop,
}

const JCC8: [Code; 16] = [
    Code::Jo_rel8_64,
    Code::Jno_rel8_64,
    Code::Jb_rel8_64,
    Code::Jae_rel8_64,
    Code::Je_rel8_64,
    Code::Jne_rel8_64,
    Code::Jbe_rel8_64,
    Code::Ja_rel8_64,
    Code::Js_rel8_64,
    Code::Jns_rel8_64,
    Code::Jp_rel8_64,
    Code::Jnp_rel8_64,
    Code::Jl_rel8_64,
    Code::Jge_rel8_64,
    Code::Jle_rel8_64,
    Code::Jg_rel8_64,
];
const JCC32: [Code; 4] = [
    Code::Je_rel32_64,
    Code::Jne_rel32_64,
    Code::Jl_rel32_64,
    Code::Ja_rel32_64,
];
const GPR: [Register; 8] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R11,
];

/// RIP-relative data displacements stay within ±256 MiB so that a stub within ±1 GiB always reaches them.
const DATA_REACH: i32 = 256 << 20;

fn op() -> impl Strategy<Value = Op> {
    let d32 = -DATA_REACH..DATA_REACH;
    prop_oneof![
        (0..16usize, proptest::option::of(0..12usize), any::<i8>()).prop_map(|(c, k, d)| Op::Jcc8(c, k, d)),
        (proptest::option::of(0..12usize), any::<i8>()).prop_map(|(k, d)| Op::Jmp8(k, d)),
        (0..4usize, d32.clone()).prop_map(|(c, d)| Op::Jcc32(c, d)),
        d32.clone().prop_map(Op::Jmp32),
        d32.clone().prop_map(Op::Call32),
        any::<i8>().prop_map(Op::Loop8),
        any::<i8>().prop_map(Op::Jrcxz8),
        (0..8usize, d32.clone()).prop_map(|(r, d)| Op::LeaRip(r, d)),
        (0..8usize, d32.clone()).prop_map(|(r, d)| Op::MovLoadRip(r, d)),
        (0..8usize, d32.clone()).prop_map(|(r, d)| Op::MovStoreRip(r, d)),
        (d32.clone(), any::<i8>()).prop_map(|(d, i)| Op::CmpRipImm(d, i)),
        (0..16usize, d32.clone()).prop_map(|(r, d)| Op::MovupsRip(r, d)),
        d32.prop_map(Op::JmpIndRip),
        (0..8usize, any::<i8>()).prop_map(|(r, i)| Op::AddImm(r, i)),
        (0..8usize, 0..8usize).prop_map(|(a, b)| Op::MovRegReg(a, b)),
        (0..8usize).prop_map(Op::Push),
        Just(Op::Nop),
    ]
}

/// Instructions that depend on no address (what relocate_code copies as they are).
fn plain_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..8usize, any::<i8>()).prop_map(|(r, i)| Op::AddImm(r, i)),
        (0..8usize, 0..8usize).prop_map(|(a, b)| Op::MovRegReg(a, b)),
        (0..8usize).prop_map(Op::Push),
        Just(Op::Nop),
    ]
}

fn xmm(n: usize) -> Register {
    Register::values()
        .find(|r| *r as usize == Register::XMM0 as usize + n)
        .unwrap()
}

/// Encodes `ops` one after the other at `base`; returns the bytes. Short branches to earlier instructions use
/// them as targets when in reach (block-internal targets), else a plain displacement.
fn materialize(ops: &[Op], base: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut starts: Vec<u64> = Vec::new();
    let mut ip = base;
    for op in ops {
        let rip =
            |d: i32| MemoryOperand::with_base_displ(Register::RIP, ip.wrapping_add(d as i64 as u64) as i64);
        let short = |k: &Option<usize>, d: i8, len: u64| -> u64 {
            if let Some(k) = k
                && let Some(&t) = starts.iter().rev().nth(*k)
                && (t as i128 - (ip + len) as i128) >= -128
            {
                return t;
            }
            (ip + len).wrapping_add(d as i64 as u64)
        };
        let far = |d: i32| ip.wrapping_add(d as i64 as u64);
        let ins = match op {
            Op::Jcc8(c, k, d) => Instruction::with_branch(JCC8[*c], short(k, *d, 2)),
            Op::Jmp8(k, d) => Instruction::with_branch(Code::Jmp_rel8_64, short(k, *d, 2)),
            Op::Jcc32(c, d) => Instruction::with_branch(JCC32[*c], far(*d)),
            Op::Jmp32(d) => Instruction::with_branch(Code::Jmp_rel32_64, far(*d)),
            Op::Call32(d) => Instruction::with_branch(Code::Call_rel32_64, far(*d)),
            Op::Loop8(d) => {
                Instruction::with_branch(Code::Loop_rel8_64_RCX, (ip + 2).wrapping_add(*d as i64 as u64))
            }
            Op::Jrcxz8(d) => {
                Instruction::with_branch(Code::Jrcxz_rel8_64, (ip + 2).wrapping_add(*d as i64 as u64))
            }
            Op::LeaRip(r, d) => Instruction::with2(Code::Lea_r64_m, GPR[*r], rip(*d)),
            Op::MovLoadRip(r, d) => Instruction::with2(Code::Mov_r64_rm64, GPR[*r], rip(*d)),
            Op::MovStoreRip(r, d) => {
                Instruction::with2(Code::Mov_rm32_r32, rip(*d), GPR[*r].full_register32())
            }
            Op::CmpRipImm(d, i) => Instruction::with2(Code::Cmp_rm32_imm8, rip(*d), *i as i32),
            Op::MovupsRip(r, d) => Instruction::with2(Code::Movups_xmm_xmmm128, xmm(*r), rip(*d)),
            Op::JmpIndRip(d) => Instruction::with1(Code::Jmp_rm64, rip(*d)),
            Op::AddImm(r, i) => Instruction::with2(Code::Add_rm64_imm8, GPR[*r], *i as i32),
            Op::MovRegReg(a, b) => Instruction::with2(Code::Mov_r64_rm64, GPR[*a], GPR[*b]),
            Op::Push(r) => Instruction::with1(Code::Push_r64, GPR[*r]),
            Op::Nop => Ok(Instruction::with(Code::Nopd)),
        }
        .expect("build instruction");
        let mut enc = Encoder::new(64);
        let len = enc.encode(&ins, ip).expect("encode at original address") as u64;
        starts.push(ip);
        out.extend(enc.take_buffer());
        ip += len;
    }
    out
}

/// Where control goes, canonically: an instruction of the block (by index), or an absolute address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Insn(usize),
    Abs(u64),
}

/// The effect of one original instruction on control flow and addressing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Effect {
    text_if_plain: Option<String>,
    mem: Option<u64>,
    taken: Option<Dest>,
    fallthrough: Option<Dest>,
    call: bool,
}

struct Relocd<'a> {
    code: &'a [u8],
    ip: u64,
    offsets: &'a [u32],
    back_off: u32,
    back: u64,
}

impl Relocd<'_> {
    fn canon(&self, addr: u64) -> Dest {
        if addr == self.ip + self.back_off as u64 {
            return Dest::Abs(self.back);
        }
        match self.offsets.iter().position(|&o| self.ip + o as u64 == addr) {
            Some(k) => Dest::Insn(k),
            None => Dest::Abs(addr),
        }
    }
    fn inside(&self, addr: u64) -> bool {
        addr >= self.ip && addr < self.ip + self.code.len() as u64
    }
    fn decode_at(&self, addr: u64) -> Instruction {
        let off = (addr - self.ip) as usize;
        Decoder::with_ip(64, &self.code[off..], addr, DecoderOptions::NONE).decode()
    }
    fn qword(&self, addr: u64) -> u64 {
        let off = (addr - self.ip) as usize;
        u64::from_le_bytes(self.code[off..off + 8].try_into().unwrap())
    }

    /// Follows the relocated expansion of instruction `i`, with its first condition `taken` or not.
    fn follow(&self, i: usize, taken: bool, cc: Option<ConditionCode>) -> (Dest, bool) {
        let mut pc = self.ip + self.offsets[i] as u64;
        let mut first = true;
        for _ in 0..8 {
            if !first {
                if !self.inside(pc) {
                    return (Dest::Abs(pc), false);
                }
                let c = self.canon(pc);
                if c != Dest::Abs(pc) {
                    return (c, false);
                }
            }
            first = false;
            let ins = self.decode_at(pc);
            match ins.flow_control() {
                FlowControl::ConditionalBranch => {
                    let same = ins.condition_code() == cc.unwrap_or(ins.condition_code())
                        || ins.condition_code() == ConditionCode::None;
                    let go = if same { taken } else { !taken };
                    pc = if go {
                        ins.near_branch_target()
                    } else {
                        ins.next_ip()
                    };
                }
                FlowControl::UnconditionalBranch => pc = ins.near_branch_target(),
                FlowControl::IndirectBranch
                    if ins.is_ip_rel_memory_operand() && self.inside(ins.ip_rel_memory_address()) =>
                {
                    return (self.canon(self.qword(ins.ip_rel_memory_address())), false);
                }
                FlowControl::Call => return (self.canon(ins.near_branch_target()), true),
                FlowControl::IndirectCall
                    if ins.is_ip_rel_memory_operand() && self.inside(ins.ip_rel_memory_address()) =>
                {
                    return (self.canon(self.qword(ins.ip_rel_memory_address())), true);
                }
                _ => panic!("unexpected {ins} in the expansion of instruction {i}"),
            }
        }
        panic!("expansion of instruction {i} too long")
    }

    fn effect(&self, i: usize, orig: &Instruction) -> Effect {
        let at = self.ip + self.offsets[i] as u64;
        let ins = self.decode_at(at);
        match orig.flow_control() {
            FlowControl::ConditionalBranch => {
                let cc = Some(orig.condition_code());
                let (t, _) = self.follow(i, true, cc);
                let (f, _) = self.follow(i, false, cc);
                Effect {
                    text_if_plain: None,
                    mem: None,
                    taken: Some(t),
                    fallthrough: Some(f),
                    call: false,
                }
            }
            FlowControl::UnconditionalBranch => {
                let (t, _) = self.follow(i, true, None);
                Effect {
                    text_if_plain: None,
                    mem: None,
                    taken: Some(t),
                    fallthrough: None,
                    call: false,
                }
            }
            FlowControl::Call => {
                let (t, call) = self.follow(i, true, None);
                assert!(call);
                // The return address: just after the (possibly widened) call.
                let mut pc = at;
                loop {
                    let x = self.decode_at(pc);
                    pc = x.next_ip();
                    if matches!(x.flow_control(), FlowControl::Call | FlowControl::IndirectCall) {
                        break;
                    }
                }
                Effect {
                    text_if_plain: None,
                    mem: None,
                    taken: Some(t),
                    fallthrough: Some(self.canon(pc)),
                    call: true,
                }
            }
            _ => Effect {
                text_if_plain: Some(ins.to_string()),
                mem: ins
                    .is_ip_rel_memory_operand()
                    .then(|| ins.ip_rel_memory_address()),
                taken: None,
                fallthrough: None,
                call: false,
            },
        }
    }
}

fn orig_effect(instrs: &[Instruction], i: usize, end: u64) -> Effect {
    let canon = |a: u64| match instrs.iter().position(|x| x.ip() == a) {
        Some(k) => Dest::Insn(k),
        None if a == end => Dest::Abs(end),
        None => Dest::Abs(a),
    };
    let o = &instrs[i];
    match o.flow_control() {
        FlowControl::ConditionalBranch => Effect {
            text_if_plain: None,
            mem: None,
            taken: Some(canon(o.near_branch_target())),
            fallthrough: Some(canon(o.next_ip())),
            call: false,
        },
        FlowControl::UnconditionalBranch => Effect {
            text_if_plain: None,
            mem: None,
            taken: Some(canon(o.near_branch_target())),
            fallthrough: None,
            call: false,
        },
        FlowControl::Call => Effect {
            text_if_plain: None,
            mem: None,
            taken: Some(canon(o.near_branch_target())),
            fallthrough: Some(canon(o.next_ip())),
            call: true,
        },
        _ => Effect {
            text_if_plain: Some(o.to_string()),
            mem: o.is_ip_rel_memory_operand().then(|| o.ip_rel_memory_address()),
            taken: None,
            fallthrough: None,
            call: false,
        },
    }
}

/// Relocates `ops` from `base` to `new_ip` and checks every instruction's effect.
fn check(ops: &[Op], base: u64, new_ip: u64) -> Result<(), TestCaseError> {
    check_with(ops, base, new_ip, false)
}

/// [`check`], relocating with [`relocate_code`] (the as-is copy where it applies) when `with_code`.
fn check_with(ops: &[Op], base: u64, new_ip: u64, with_code: bool) -> Result<(), TestCaseError> {
    let bytes = materialize(ops, base);
    let instrs = decode_all(base, &bytes).expect("decode original");
    prop_assert_eq!(instrs.len(), ops.len());
    let end = base + bytes.len() as u64;
    let r = if with_code {
        relocate_code(&bytes, &instrs, new_ip, Some(end))
    } else {
        relocate(&instrs, new_ip, Some(end))
    }
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let plain = ops
        .iter()
        .all(|o| matches!(o, Op::AddImm(..) | Op::MovRegReg(..) | Op::Push(..) | Op::Nop));
    if with_code && plain {
        // Nothing depends on where it runs: the original bytes, then the jump back.
        prop_assert_eq!(&r.code[..bytes.len()], &bytes[..]);
    }
    prop_assert_eq!(r.new_offsets.len(), instrs.len());
    // The jump back: the instruction after the last relocated one (offsets are increasing).
    let back_off = {
        let last = *r.new_offsets.last().unwrap();
        let mut pc = new_ip + last as u64;
        // Skip the last instruction's expansion: decode forward until we reach an instruction whose target
        // is `end` from a plain jmp (the jump back is the final branch to `end` in the block).
        let mut found = None;
        while pc < new_ip + r.code.len() as u64 {
            let x =
                Decoder::with_ip(64, &r.code[(pc - new_ip) as usize..], pc, DecoderOptions::NONE).decode();
            if x.is_invalid() {
                break;
            }
            if pc > new_ip + last as u64
                && x.flow_control() == FlowControl::UnconditionalBranch
                && x.near_branch_target() == end
            {
                found = Some((pc - new_ip) as u32);
            }
            if pc > new_ip + last as u64
                && x.flow_control() == FlowControl::IndirectBranch
                && x.is_ip_rel_memory_operand()
            {
                let a = x.ip_rel_memory_address();
                if a >= new_ip && a + 8 <= new_ip + r.code.len() as u64 {
                    let q = u64::from_le_bytes(r.code[(a - new_ip) as usize..][..8].try_into().unwrap());
                    if q == end {
                        found = Some((pc - new_ip) as u32);
                    }
                }
            }
            pc = x.next_ip();
        }
        found
    };
    let rel = Relocd {
        code: &r.code,
        ip: new_ip,
        offsets: &r.new_offsets,
        back_off: back_off.unwrap_or(u32::MAX),
        back: end,
    };
    for i in 0..instrs.len() {
        prop_assert_eq!(
            r.original_pc(new_ip + r.new_offsets[i] as u64),
            Some(instrs[i].ip())
        );
        let want = orig_effect(&instrs, i, end);
        let got = rel.effect(i, &instrs[i]);
        prop_assert_eq!(
            &got,
            &want,
            "instruction {} `{}` at {:#x} relocated to {:#x}",
            i,
            instrs[i],
            instrs[i].ip(),
            new_ip
        );
    }
    // Falling off the last instruction reaches `end` through the jump back.
    if !matches!(
        instrs.last().unwrap().flow_control(),
        FlowControl::UnconditionalBranch | FlowControl::IndirectBranch
    ) {
        prop_assert!(back_off.is_some(), "no jump back to {end:#x}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, .. ProptestConfig::default() })]

    /// Stub within ±1 GiB of the original (DESIGN.md §4.3: stub pages within ±2 GiB): same targets and
    /// effective addresses for every instruction.
    #[test]
    fn t_x86_reloc_near_same_targets(
        ops in proptest::collection::vec(op(), 1..14),
        base in 0x1_0000_0000u64..0x7f00_0000_0000u64,
        delta in -(1i64 << 30)..(1i64 << 30),
    ) {
        let new_ip = base.wrapping_add(delta as u64);
        check(&ops, base, new_ip)?;
    }

    /// Stub far away (8–64 GiB): branches only (no RIP-relative data); BlockEncoder must switch to absolute
    /// forms and still reach the same targets.
    #[test]
    fn t_x86_reloc_far_branches_same_targets(
        ops in proptest::collection::vec(op().prop_filter("branches and plain only", |o| !matches!(o,
            Op::LeaRip(..) | Op::MovLoadRip(..) | Op::MovStoreRip(..) | Op::CmpRipImm(..) | Op::MovupsRip(..) | Op::JmpIndRip(..))), 1..10),
        base in 0x1_0000_0000u64..0x7000_0000_0000u64,
        gib in 8u64..64,
    ) {
        check(&ops, base, base + (gib << 30))?;
    }

    /// relocate_code (used for entries, DESIGN.md §4.3): the same effects as BlockEncoder's relocation for
    /// every sequence, whether it copies the bytes as they are (no branch, no RIP-relative operand) or hands
    /// them to BlockEncoder; half the cases are plain instructions only, so the as-is copy is exercised.
    #[test]
    fn t_x86_reloc_copy_as_is_same_targets(
        (ops, delta) in prop_oneof![
            // Any sequence, 1 MiB–1 GiB away.
            (
                proptest::collection::vec(op(), 1..14),
                prop_oneof![-(1i64 << 30)..-(1i64 << 20), (1i64 << 20)..(1i64 << 30)],
            ),
            // Plain instructions only, just below the original: the jump back fits a rel8, and the copy
            // never overlaps the original (short branches would reach into the copy: not this harness's case).
            (
                proptest::collection::vec(plain_op(), 1..8),
                -126i64..-100,
            ),
            (
                proptest::collection::vec(plain_op(), 1..14),
                -(1i64 << 30)..(1i64 << 30),
            ),
        ],
        base in 0x1_0000_0000u64..0x7f00_0000_0000u64,
    ) {
        let new_ip = base.wrapping_add(delta as u64);
        check_with(&ops, base, new_ip, true)?;
    }

    /// RIP-relative data that cannot be reached from the new address is an error, never silently wrong code.
    #[test]
    fn t_x86_reloc_unreachable_data_is_refused(
        r in 0..8usize,
        d in -DATA_REACH..DATA_REACH,
        base in 0x1_0000_0000u64..0x7000_0000_0000u64,
        gib in 3u64..64,
    ) {
        let bytes = materialize(&[Op::LeaRip(r, d)], base);
        let instrs = decode_all(base, &bytes).unwrap();
        prop_assert!(relocate(&instrs, base + (gib << 30), Some(base + bytes.len() as u64)).is_err());
    }
}

/// A branch into the middle of an instruction of the block (`jrcxz` to its own second byte) is not copied as
/// it is: past the block the copy's bytes differ, so relocate_code leaves it to BlockEncoder, which sends it
/// to the original address. Found by t_x86_reloc_copy_as_is_same_targets in CI.
#[test]
fn t_x86_reloc_copy_as_is_not_for_a_branch_into_an_instruction() {
    check_with(&[Op::Jrcxz8(-1)], 0x1_0000_0000, 0x1_0000_0000 - 1_048_578, true).unwrap();
    check_with(&[Op::Nop, Op::Jmp8(None, -3)], 0x2_0000_0000, 0x2_0010_0000, true).unwrap();
}

/// One fixed case by hand: `jne` back to the first instruction and a RIP-relative lea (PROTOTYPE.md §5).
#[test]
fn t_x86_reloc_fixed_loop_and_lea() {
    let base = 0x55_5555_0000;
    let ops = [Op::LeaRip(0, 0x1234), Op::AddImm(1, -1), Op::Jcc8(5, Some(1), 0)];
    let bytes = materialize(&ops, base);
    let instrs = decode_all(base, &bytes).unwrap();
    assert_eq!(
        instrs[2].near_branch_target(),
        base,
        "the jne goes back to the lea"
    );
    let r = relocate(&instrs, base - 0x10_0000, Some(base + bytes.len() as u64)).unwrap();
    let moved = decode_all(base - 0x10_0000, &r.code).unwrap();
    assert_eq!(
        moved[0].ip_rel_memory_address(),
        instrs[0].ip_rel_memory_address()
    );
    assert_eq!(
        moved[2].near_branch_target(),
        base - 0x10_0000,
        "the loop stays inside the copy"
    );
    assert_eq!(
        moved[3].near_branch_target(),
        base + bytes.len() as u64,
        "jump back"
    );
    assert_eq!(moved[3].op0_kind(), OpKind::NearBranch64);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, .. ProptestConfig::default() })]

    /// DESIGN.md §4.3 invariants of entry analysis on random functions (optional endbr64, optional 1-byte
    /// NOP pad, random instructions): a plan overwrites exactly the original bytes at the site, no direct
    /// branch of the function lands inside what it overwrites, and its old path relocates anywhere in the
    /// stub window and jumps back to `resume`; a refusal names a real branch and target, or a real shortage.
    #[test]
    fn t_x86_4_3_analysis_invariants(
        ops in proptest::collection::vec(op(), 1..20),
        base in 0x1_0000_0000u64..0x7000_0000_0000u64,
        endbr in any::<bool>(),
        pad in 0usize..7,
    ) {
        let mut bytes = if endbr { relive_x86::ENDBR64.to_vec() } else { Vec::new() };
        bytes.extend(std::iter::repeat_n(0x90u8, pad));
        let prefix = bytes.len() as u64;
        bytes.extend(materialize(&ops, base + prefix));
        let site = base + if endbr { 4 } else { 0 };
        let instrs = decode_all(base, &bytes).unwrap();
        let targets: Vec<(u64, u64)> = instrs
            .iter()
            .filter(|i| matches!(i.flow_control(), FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch | FlowControl::Call)
                && matches!(i.op0_kind(), OpKind::NearBranch64))
            .map(|i| (i.ip(), i.near_branch_target()))
            .collect();
        let f = relive_x86::FunctionBytes { name: "rand", addr: base, bytes: &bytes };
        match relive_x86::analyze_entry(f, &relive_x86::EntryContext::default()) {
            Ok(p) => {
                let off = (p.site - base) as usize;
                prop_assert_eq!(p.site, site);
                prop_assert_eq!(&p.original[..], &bytes[off..off + p.write_len()]);
                prop_assert!(p.write_len() <= 8);
                let guard_end = match p.kind { relive_x86::EntryKind::Displaced { .. } => p.resume, _ => p.site + p.write_len() as u64 };
                for &(from, t) in &targets {
                    prop_assert!(!(t > p.site && t < guard_end), "branch at {from:#x} to {t:#x} inside [{:#x}, {guard_end:#x})", p.site);
                }
                prop_assert!(instrs.iter().any(|i| i.ip() == p.resume) || p.resume == base + bytes.len() as u64);
                let stub = p.stub_window.start + (p.stub_window.end - p.stub_window.start) / 3;
                let r = p.encode_old_path(stub).map_err(|e| TestCaseError::fail(e.to_string()))?;
                // (The effects of relocated code are checked by the properties above.)
                let n = match &p.kind { relive_x86::EntryKind::Displaced { instructions, .. } => instructions.len(), _ => 0 };
                prop_assert_eq!(r.new_offsets.len(), n);
                for w in p.install(stub).unwrap() {
                    prop_assert_eq!(&w.expect, &p.original);
                    prop_assert_eq!(w.bytes[0], 0xe9);
                }
            }
            Err(relive_x86::EntryError::BranchTargetInside { from, target, site: s, end, .. }) => {
                prop_assert_eq!(s, site);
                prop_assert!(target > s && target < end);
                let real = targets.contains(&(from, target))
                    || instrs.iter().any(|i| i.ip() == from && (i.is_ip_rel_memory_operand() || i.op_count() > 1));
                prop_assert!(real, "refusal names branch {from:#x} → {target:#x} that does not exist");
            }
            Err(relive_x86::EntryError::TooShort { available, .. }) => prop_assert!(available < 5),
            Err(relive_x86::EntryError::Unrelocatable { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected refusal {e}"),
        }
    }
}
