//! Stubs (DESIGN.md §4.4, §4.3a): dispatchers decode to the intended comparison and jumps and write no
//! register; preserving thunks are checked with a small symbolic emulator (the callee clobbers every
//! call-clobbered register; every preserved register, the stack arguments, the alignment at the call and the
//! return must come out right).

use std::collections::HashMap;

use iced_x86::{Code, FlowControl, Instruction, InstructionInfoFactory, OpAccess, OpKind, Register};
use proptest::prelude::*;
use relive_x86::*;

fn decode(at: u64, code: &[u8]) -> Vec<Instruction> {
    // Stop at the first invalid instruction: the dispatcher ends with a data quad.
    let mut dec = iced_x86::Decoder::with_ip(64, code, at, iced_x86::DecoderOptions::NONE);
    let mut v = Vec::new();
    while dec.can_decode() {
        let i = dec.decode();
        v.push(i);
    }
    v
}

fn qword_at(at: u64, code: &[u8], addr: u64) -> u64 {
    let o = (addr - at) as usize;
    u64::from_le_bytes(code[o..o + 8].try_into().unwrap())
}

/// Follows the dispatcher for a thread whose slot holds `state`; returns where it ends up.
fn run_dispatcher(at: u64, code: &[u8], d: &Dispatch, state: u32) -> u64 {
    let ins = decode(at, code);
    let cmp = &ins[0];
    assert_eq!(cmp.mnemonic(), iced_x86::Mnemonic::Cmp);
    assert_eq!(cmp.segment_prefix(), Register::FS, "the slot is read through fs");
    assert_eq!(cmp.memory_base(), Register::None);
    assert_eq!(
        cmp.memory_displacement64(),
        d.slot.tpoff as i64 as u64,
        "fs:[tpoff]"
    );
    let width = match cmp.memory_size() {
        iced_x86::MemorySize::UInt8 => StateWidth::Byte,
        iced_x86::MemorySize::UInt32 => StateWidth::Dword,
        iced_x86::MemorySize::UInt64 => StateWidth::Qword,
        m => panic!("unexpected width {m:?}"),
    };
    assert_eq!(width, d.slot.width);
    let imm = cmp.immediate(1) as u32 & if width == StateWidth::Byte { 0xff } else { u32::MAX };
    let equal = state == imm;
    let jcc = &ins[1];
    let taken = match jcc.code() {
        Code::Je_rel8_64 | Code::Je_rel32_64 => equal,
        Code::Jne_rel8_64 | Code::Jne_rel32_64 => !equal,
        c => panic!("unexpected {c:?}"),
    };
    let mut pc = if taken {
        jcc.near_branch_target()
    } else {
        jcc.next_ip()
    };
    loop {
        let i = ins
            .iter()
            .find(|i| i.ip() == pc)
            .expect("lands on an instruction of the dispatcher");
        match i.flow_control() {
            FlowControl::UnconditionalBranch => {
                let t = i.near_branch_target();
                if t >= at && t < at + code.len() as u64 {
                    pc = t;
                } else {
                    return t;
                }
            }
            FlowControl::IndirectBranch => return qword_at(at, code, i.ip_rel_memory_address()),
            f => panic!("unexpected flow {f:?} in {i}"),
        }
    }
}

const IDLE: u32 = 7; // any value that is neither PATCHED nor UNPATCHED

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, .. ProptestConfig::default() })]

    /// SPEC H3 / DESIGN.md §4.4: PATCHED threads take the top (new) version and UNPATCHED threads the one
    /// below; IDLE follows the transition's starting state: UNPATCHED when patching, PATCHED when unpatching.
    #[test]
    fn t_h3_dispatcher_chooses_by_state_and_direction(
        tpoff in -4096i32..-8,
        width in prop_oneof![Just(StateWidth::Byte), Just(StateWidth::Dword), Just(StateWidth::Qword)],
        patching in any::<bool>(),
        at in 0x1000_0000u64..0x7fff_0000_0000,
        new_far in any::<bool>(),
        old_far in any::<bool>(),
        rel in -(1i64 << 30)..(1i64 << 30),
    ) {
        let slot = TlsSlot { tpoff, width, patched: 1, unpatched: 0 };
        let direction = if patching { Direction::Patching } else { Direction::Unpatching };
        let new_version = if new_far { at ^ (1 << 46) } else { at.wrapping_add(rel as u64) };
        let old_version = if old_far { at ^ (1 << 45) } else { at.wrapping_sub(rel as u64) };
        let d = Dispatch { slot, direction, new_version, old_version };
        let code = encode_dispatcher(at, &d).unwrap();
        prop_assert!(code.len() <= DISPATCHER_MAX_LEN, "{} bytes", code.len());
        prop_assert_eq!(run_dispatcher(at, &code, &d, 1), new_version, "PATCHED → new");
        prop_assert_eq!(run_dispatcher(at, &code, &d, 0), old_version, "UNPATCHED → old");
        let idle = run_dispatcher(at, &code, &d, IDLE);
        prop_assert_eq!(idle, if patching { old_version } else { new_version }, "IDLE = starting state");
        // Stubs touch only the flags (DESIGN.md §4.3a).
        let mut f = InstructionInfoFactory::new();
        let all = decode(at, &code);
        // The pointers at the end are data, not code.
        let data = all.iter().filter(|i| i.is_ip_rel_memory_operand()).map(|i| i.ip_rel_memory_address()).min().unwrap();
        prop_assert!(data + 8 <= at + code.len() as u64);
        for i in all.iter().filter(|i| i.ip() < data) {
            for r in f.info(i).used_registers() {
                let w = matches!(r.access(), OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite);
                prop_assert!(!w || r.register() == Register::RIP, "{} writes {:?}", i, r.register());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, .. ProptestConfig::default() })]

    /// encode_dispatcher lays the dispatcher out from a fixed template (no iced-x86 encoder tables to build):
    /// byte for byte what iced-x86's CodeAssembler produces, for every width, direction and state value, with
    /// the old version a few bytes away (rel8), within ±2 GiB (rel32) or beyond (the assembler's far form).
    #[test]
    fn t_x86_dispatcher_template_is_the_assemblers_encoding(
        tpoff in prop_oneof![-4096i32..4096, any::<i32>()],
        width in prop_oneof![Just(StateWidth::Byte), Just(StateWidth::Dword), Just(StateWidth::Qword)],
        patched in prop_oneof![0u32..300, any::<u32>()],
        unpatched in prop_oneof![0u32..300, any::<u32>()],
        patching in any::<bool>(),
        at in 0x1000_0000u64..0x7fff_0000_0000,
        old in prop_oneof![-200i64..200, -(1i64 << 31)..(1i64 << 31), any::<i64>()],
        new_version in any::<u64>(),
    ) {
        let slot = TlsSlot { tpoff, width, patched, unpatched };
        let direction = if patching { Direction::Patching } else { Direction::Unpatching };
        let d = Dispatch { slot, direction, new_version, old_version: at.wrapping_add(old as u64) };
        let fast = encode_dispatcher(at, &d);
        let reference = encode_dispatcher_with_assembler(at, &d);
        match (&fast, &reference) {
            (Ok(f), Ok(r)) => prop_assert_eq!(f, r, "{:?}", d),
            (Err(EncodeError::Invalid { .. }), Err(EncodeError::Invalid { .. })) => {}
            _ => prop_assert!(false, "{:?}: template {:?}, assembler {:?}", d, fast, reference),
        }
    }
}

#[test]
fn t_x86_dispatcher_refuses_values_that_do_not_fit() {
    let slot = TlsSlot {
        tpoff: -152,
        width: StateWidth::Byte,
        patched: 300,
        unpatched: 0,
    };
    let d = Dispatch {
        slot,
        direction: Direction::Patching,
        new_version: 0x1000,
        old_version: 0x2000,
    };
    assert!(matches!(
        encode_dispatcher(0x1_0000, &d),
        Err(EncodeError::Invalid { .. })
    ));
}

#[test]
fn t_x86_jumps_near_and_far() {
    let at = 0x5555_0000_1000u64;
    assert_eq!(encode_jump(at, at + 0x100).len(), 5);
    let far = encode_jump(at, at + (8 << 30));
    assert_eq!(far.len(), 14);
    let i = decode(at, &far)[0];
    assert_eq!(i.code(), Code::Jmp_rm64);
    assert_eq!(qword_at(at, &far, i.ip_rel_memory_address()), at + (8 << 30));
    assert!(encode_jmp_rel32(at, at + (3 << 30)).is_err());
    assert_eq!(encode_jmp_rel8(at, at - 9).unwrap(), [0xeb, 0xf5]);
}

// ---- preserving thunks -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    Reg(u32), // the caller's value of register n (gpr n, or 100 + vector n)
    Arg(u64), // stack argument j
    Ret,      // the caller's return address
    ThunkRet(u64),
    Garbage,
    Chunk(u32, u32), // part k of vector n
}

struct Emu {
    rsp: u64,
    mem: HashMap<u64, Val>,
    regs: HashMap<u32, Val>,
}

const R0: u64 = 0x7ffc_0000_1008; // ≡ 8 (mod 16): the state right after a call

/// Runs `thunk`; the callee (at `target`) checks its arguments and alignment, then clobbers every
/// call-clobbered register. Returns the final register file and rsp after `ret`.
fn emulate(thunk: &Thunk, target: u64, width: VectorWidth, args: u64) -> (HashMap<u32, Val>, u64) {
    let mut e = Emu {
        rsp: R0,
        mem: HashMap::new(),
        regs: HashMap::new(),
    };
    for n in 0..16u32 {
        e.regs.insert(n, Val::Reg(n));
    }
    for n in 0..32u32 {
        e.regs.insert(100 + n, Val::Reg(100 + n));
    }
    e.mem.insert(R0, Val::Ret);
    for j in 0..args {
        e.mem.insert(R0 + 8 + 8 * j, Val::Arg(j));
    }
    let ins = decode(thunk.ip, &thunk.code);
    let vbytes = match width {
        VectorWidth::Xmm => 16,
        VectorWidth::Ymm => 32,
        VectorWidth::Zmm => 64,
    };
    let mut pc = thunk.ip;
    for _ in 0..500 {
        let i = *ins.iter().find(|i| i.ip() == pc).expect("pc on an instruction");
        pc = i.next_ip();
        let mem_addr = |e: &Emu| (e.rsp as i64 + i.memory_displacement64() as i64) as u64;
        match i.code() {
            Code::Push_r64 => {
                e.rsp -= 8;
                let v = e.regs[&(i.op0_register().number() as u32)];
                e.mem.insert(e.rsp, v);
            }
            Code::Pop_r64 => {
                let v = e.mem[&e.rsp];
                e.regs.insert(i.op0_register().number() as u32, v);
                e.rsp += 8;
            }
            Code::Push_rm64 => {
                assert_eq!(i.memory_base(), Register::RSP);
                let v = e.mem.get(&mem_addr(&e)).copied().unwrap_or(Val::Garbage);
                e.rsp -= 8;
                e.mem.insert(e.rsp, v);
            }
            Code::Sub_rm64_imm32 | Code::Sub_rm64_imm8 => {
                assert_eq!(i.op0_register(), Register::RSP);
                e.rsp -= i.immediate(1);
            }
            Code::Add_rm64_imm32 | Code::Add_rm64_imm8 => {
                assert_eq!(i.op0_register(), Register::RSP);
                e.rsp += i.immediate(1);
            }
            Code::Movups_xmmm128_xmm
            | Code::VEX_Vmovdqu_ymmm256_ymm
            | Code::EVEX_Vmovdqu64_zmmm512_k1z_zmm => {
                assert_eq!(i.memory_base(), Register::RSP);
                let n = i.op1_register().number() as u32;
                let a = mem_addr(&e);
                for k in 0..vbytes / 8 {
                    let v = if e.regs[&(100 + n)] == Val::Reg(100 + n) {
                        Val::Chunk(n, k)
                    } else {
                        Val::Garbage
                    };
                    e.mem.insert(a + 8 * k as u64, v);
                }
            }
            Code::Movups_xmm_xmmm128
            | Code::VEX_Vmovdqu_ymm_ymmm256
            | Code::EVEX_Vmovdqu64_zmm_k1z_zmmm512 => {
                let n = i.op0_register().number() as u32;
                let a = mem_addr(&e);
                let ok = (0..vbytes / 8).all(|k| e.mem.get(&(a + 8 * k as u64)) == Some(&Val::Chunk(n, k)));
                e.regs
                    .insert(100 + n, if ok { Val::Reg(100 + n) } else { Val::Garbage });
            }
            Code::Call_rel32_64 | Code::Call_rm64 => {
                let t = if i.code() == Code::Call_rel32_64 {
                    i.near_branch_target()
                } else {
                    qword_at(thunk.ip, &thunk.code, i.ip_rel_memory_address())
                };
                assert_eq!(t, target, "calls the new version");
                assert_eq!(e.rsp % 16, 0, "rsp 16-byte aligned at the call (SysV)");
                assert_eq!(
                    i.next_ip(),
                    thunk.ip + thunk.return_offset as u64,
                    "return_offset"
                );
                assert_eq!(e.rsp + thunk.caller_ra_offset as u64, R0, "caller_ra_offset");
                for j in 0..args {
                    assert_eq!(
                        e.mem.get(&(e.rsp + 8 * j)),
                        Some(&Val::Arg(j)),
                        "stack argument {j} where the callee looks"
                    );
                }
                // The callee: clobbers all call-clobbered registers and the stack below its frame.
                for n in [0u32, 1, 2, 6, 7, 8, 9, 10, 11] {
                    e.regs.insert(n, Val::Garbage);
                }
                for n in 0..32 {
                    e.regs.insert(100 + n, Val::Garbage);
                }
                for k in 1..64u64 {
                    e.mem.insert(e.rsp - 8 * k, Val::Garbage);
                }
                let _ = Val::ThunkRet(0);
            }
            Code::Retnq => {
                assert_eq!(e.mem[&e.rsp], Val::Ret, "returns to the caller");
                e.rsp += 8;
                return (e.regs, e.rsp);
            }
            c => panic!("unexpected {c:?} `{i}` in the thunk"),
        }
    }
    panic!("thunk does not return")
}

fn regset() -> impl Strategy<Value = (RegSet, VectorWidth)> {
    let gpr_bits = [0u16, 1, 2, 6, 7, 8, 9, 10, 11];
    (
        proptest::collection::vec(any::<bool>(), 9),
        any::<u32>(),
        prop_oneof![
            Just(VectorWidth::Xmm),
            Just(VectorWidth::Ymm),
            Just(VectorWidth::Zmm)
        ],
    )
        .prop_map(move |(g, v, w)| {
            let gpr = g
                .iter()
                .zip(gpr_bits)
                .filter(|(b, _)| **b)
                .fold(0u16, |m, (_, i)| m | (1 << i));
            let vec = if w == VectorWidth::Zmm { v } else { v & 0xffff };
            (RegSet { gpr, vec }, w)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, .. ProptestConfig::default() })]

    /// DESIGN.md §4.3a: the thunk preserves exactly the requested registers around a callee that clobbers
    /// everything the ABI allows, keeps the stack arguments where the callee expects them and rsp aligned.
    #[test]
    fn t_x86_4_3a_thunk_preserves_registers((preserve, width) in regset(), args in 0u64..9,
        at in 0x1000_0000u64..0x7fff_0000_0000, far in any::<bool>()) {
        let target = if far { at ^ (1 << 44) } else { at + 0x10_0000 };
        let t = encode_preserving_thunk(at, target, preserve, width, (args * 8) as u32).unwrap();
        let (regs, rsp) = emulate(&t, target, width, args);
        prop_assert_eq!(rsp, R0 + 8);
        for n in [0u32, 1, 2, 6, 7, 8, 9, 10, 11] {
            if preserve.gpr & (1 << n) != 0 {
                prop_assert_eq!(regs[&n], Val::Reg(n), "gpr {} preserved", n);
            }
        }
        for n in [3u32, 4, 5, 12, 13, 14, 15] {
            if n != 4 {
                prop_assert_eq!(regs[&n], Val::Reg(n), "callee-saved gpr {} untouched", n);
            }
        }
        for n in 0..32u32 {
            if preserve.vec & (1 << n) != 0 {
                prop_assert_eq!(regs[&(100 + n)], Val::Reg(100 + n), "vector {} preserved", n);
            }
        }
    }
}

#[test]
fn t_x86_4_3a_thunk_refuses_callee_saved_and_wide_vectors() {
    let bad = RegSet { gpr: 1 << 3, vec: 0 };
    assert!(encode_preserving_thunk(0x1000, 0x2000, bad, VectorWidth::Xmm, 0).is_err());
    let wide = RegSet { gpr: 0, vec: 1 << 20 };
    assert!(encode_preserving_thunk(0x1000, 0x2000, wide, VectorWidth::Ymm, 0).is_err());
    assert!(encode_preserving_thunk(0x1000, 0x2000, wide, VectorWidth::Zmm, 0).is_ok());
}

#[test]
fn t_x86_4_3a_to_preserve_is_abi_minus_clobbered() {
    let mut clob = RegSet::EMPTY;
    clob.add(Register::EAX);
    clob.add(Register::XMM0);
    let p = Clobbers::Known(clob).to_preserve(16);
    assert!(!p.contains(Register::RAX) && !p.contains(Register::XMM0));
    assert!(p.contains(Register::R8) && p.contains(Register::RDX) && p.contains(Register::YMM15));
    assert!(
        !p.contains(Register::RBX),
        "callee-saved registers are the callee's business"
    );
    assert!(Clobbers::All { reason: "x".into() }.to_preserve(16).is_empty());
    let _ = OpKind::Register;
}
