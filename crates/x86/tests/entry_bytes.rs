//! Entry analysis (DESIGN.md §4.3), the int3 protocol (PAUSE-FREE.md §2) and the clobber analysis
//! (DESIGN.md §4.3a) on hand-assembled bytes, one case per rule. The gcc-built cases are in gcc_entries.rs.

use iced_x86::Register;
use relive_x86::*;

const A: u64 = 0x40_1000;

fn f(bytes: &[u8]) -> FunctionBytes<'_> {
    FunctionBytes {
        name: "f",
        addr: A,
        bytes,
    }
}

fn analyze(bytes: &[u8]) -> Result<EntryPlan, EntryError> {
    analyze_entry(f(bytes), &EntryContext::default())
}

// push rbp; mov rbp,rsp; sub rsp,0x10; mov eax,edi; leave; ret
const FRAME: [u8; 13] = [
    0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0x89, 0xf8, 0xc9, 0xc3, 0x90,
];

#[test]
fn t_x86_4_3_displaced_prologue() {
    let p = analyze(&FRAME).unwrap();
    assert!(!p.endbr);
    assert_eq!(p.site, A);
    let EntryKind::Displaced { instructions, .. } = &p.kind else {
        panic!("{:?}", p.kind)
    };
    assert_eq!(instructions.len(), 3, "push, mov, sub cover the 5 bytes");
    assert_eq!(p.resume, A + 8);
    assert_eq!(p.interior, vec![A + 1, A + 4]);
    assert_eq!(p.original, FRAME[..5].to_vec());
    let w = p.install(A + 0x100_0000).unwrap();
    assert_eq!(w.len(), 1);
    assert!(
        !w[0].stop_free,
        "several instructions under the jump: stop every thread"
    );
    assert!(w[0].blocks_pc(A + 1) && w[0].blocks_pc(A + 4) && !w[0].blocks_pc(A) && !w[0].blocks_pc(A + 5));
    assert!(
        int3_protocol(&w[0], A).is_err(),
        "PAUSE-FREE.md §4: not with two instructions"
    );
    // The old path: relocated copy, then back to A+8.
    let stub = A - 0x10_0000;
    let old = p.encode_old_path(stub).unwrap();
    let moved = decode_all(stub, &old.code).unwrap();
    assert_eq!(moved.len(), 4);
    assert_eq!(moved[3].near_branch_target(), A + 8);
    assert_eq!(p.old_path_direct(), None);
    // Restore gives the original bytes back and needs no stop (nobody is inside a jump).
    let r = p.restore(A + 0x100_0000).unwrap();
    assert_eq!(r[0].bytes, FRAME[..5].to_vec());
    assert_eq!(r[0].expect, w[0].bytes);
    assert!(r[0].stop_free);
}

#[test]
fn t_x86_4_3_refuses_branch_into_overwritten_bytes() {
    // mov eax,edi (2); L: add eax,1 (3); cmp eax,100 (3); jl L (2); ret
    let b = [0x89, 0xf8, 0x83, 0xc0, 0x01, 0x83, 0xf8, 0x64, 0x7c, 0xf8, 0xc3];
    match analyze(&b) {
        Err(EntryError::BranchTargetInside {
            target,
            from,
            function,
            ..
        }) => {
            assert_eq!((target, from, function.as_str()), (A + 2, A + 8, "f"));
        }
        r => panic!("{r:?}"),
    }
    let msg = analyze(&b).unwrap_err().to_string();
    assert!(
        msg.contains("0x401002") && msg.contains("f at 0x401000") && msg.contains("instead"),
        "{msg}"
    );
}

#[test]
fn t_x86_4_3_branch_to_the_entry_itself_is_allowed() {
    // L: sub edi,1 (3); mov eax,edi (2); jne L (2); ret — a loop back to the first instruction.
    let b = [0x83, 0xef, 0x01, 0x89, 0xf8, 0x75, 0xf9, 0xc3];
    let p = analyze(&b).unwrap();
    assert_eq!(p.resume, A + 5);
}

#[test]
fn t_x86_4_3_refuses_too_short_breakpoint_undecodable() {
    assert!(matches!(
        analyze(&[0x8d, 0x47, 0x01, 0xc3]),
        Err(EntryError::TooShort { available: 4, .. })
    ));
    let mut e = ENDBR64.to_vec();
    e.extend([0x31, 0xc0, 0xc3]);
    assert!(matches!(
        analyze(&e),
        Err(EntryError::TooShort { available: 3, .. })
    ));
    assert!(matches!(
        analyze(&[0xcc, 0x90, 0x90, 0x90, 0x90, 0xc3]),
        Err(EntryError::Breakpoint { at: A, .. })
    ));
    // A truncated `mov eax, imm32`.
    assert!(matches!(
        analyze(&[0x89, 0xf8, 0x90, 0x90, 0xb8, 0x01]),
        Err(EntryError::Undecodable { at, .. }) if at == A + 4
    ));
    // ud2 under the jump: nothing to relocate sensibly.
    assert!(matches!(
        analyze(&[0x0f, 0x0b, 0x90, 0x90, 0x90, 0xc3]),
        Err(EntryError::Unrelocatable { .. })
    ));
}

#[test]
fn t_x86_4_3_fentry_pad_after_endbr() {
    let mut b = ENDBR64.to_vec();
    b.extend([0x0f, 0x1f, 0x44, 0x00, 0x00, 0x8d, 0x47, 0x01, 0xc3]);
    let p = analyze(&b).unwrap();
    assert!(p.endbr);
    assert_eq!(p.site, A + 4);
    assert_eq!(
        p.kind,
        EntryKind::Pad {
            pad_len: 5,
            single_nop: true
        }
    );
    assert_eq!(p.old_path_direct(), Some(A + 9));
    assert!(p.interior.is_empty());
    let w = &p.install(A + 0x1000).unwrap()[0];
    assert!(w.stop_free);
    assert_eq!(w.aligned_word(), None, "[A+4, A+9) crosses an 8-byte boundary");
    let plan = int3_protocol(w, A + 0x1000).unwrap();
    assert_eq!(
        plan.steps[0],
        Int3Step::Write {
            addr: A + 4,
            bytes: vec![INT3]
        }
    );
    assert_eq!(plan.steps[1], Int3Step::SyncCores);
    assert_eq!(int3_state_after(&plan, 1), vec![0xcc, 0x1f, 0x44, 0x00, 0x00]);
    assert_eq!(int3_state_after(&plan, 3)[1..], w.bytes[1..]);
    assert_eq!(int3_state_after(&plan, 6), w.bytes);
}

#[test]
fn t_x86_4_3_patchable_entry_pad_multi_nop() {
    // -fpatchable-function-entry=7 with endbr64: seven 1-byte NOPs.
    let mut b = ENDBR64.to_vec();
    b.extend([0x90; 7]);
    b.extend([0x8d, 0x47, 0x01, 0xc3]);
    let p = analyze(&b).unwrap();
    assert_eq!(
        p.kind,
        EntryKind::Pad {
            pad_len: 7,
            single_nop: false
        }
    );
    assert_eq!(p.resume, A + 11);
    assert_eq!(p.interior, vec![A + 5, A + 6, A + 7, A + 8]);
    assert!(!p.install(A + 0x1000).unwrap()[0].stop_free);
}

#[test]
fn t_x86_4_3_pre_entry_pad() {
    // -fpatchable-function-entry=16,14 -fcf-protection: 14 NOPs before the symbol, endbr64, 2 NOPs.
    let pre = [0x90u8; 14];
    let mut b = ENDBR64.to_vec();
    b.extend([0x90, 0x90, 0x8d, 0x47, 0x01, 0xc3]);
    let ctx = EntryContext {
        pre_pad: &pre,
        ..EntryContext::default()
    };
    let p = analyze_entry(f(&b), &ctx).unwrap();
    assert_eq!(
        p.kind,
        EntryKind::PrePad {
            pad_len: 2,
            far_site: A - 5,
            far_original: vec![0x90; 5]
        }
    );
    assert_eq!(p.resume, A + 6);
    assert_eq!(p.jump_site(), A - 5);
    let dest = A + 0x20_0000;
    let w = p.install(dest).unwrap();
    assert_eq!(w.len(), 2);
    assert_eq!(
        (w[0].addr, w[0].bytes.clone()),
        (A - 5, encode_jmp_rel32(A - 5, dest).unwrap().to_vec())
    );
    assert!(w[0].stop_free, "nobody executes the pre-entry pad");
    assert_eq!((w[1].addr, w[1].bytes.clone()), (A + 4, vec![0xeb, 0xf5]));
    assert!(!w[1].stop_free, "two 1-byte NOPs under the short jump");
    let rt = p.retarget(dest, dest + 0x10).unwrap();
    assert_eq!((rt.len(), rt[0].addr), (1, A - 5));
    let r = p.restore(dest).unwrap();
    assert_eq!((r[0].addr, r[0].bytes.clone()), (A + 4, vec![0x90, 0x90]));
    assert_eq!((r[1].addr, r[1].bytes.clone()), (A - 5, vec![0x90; 5]));
    // Without the pre-pad the same function is patched by displacing nop; nop; lea.
    let p2 = analyze(&b).unwrap();
    assert!(matches!(p2.kind, EntryKind::Displaced { ref instructions, .. } if instructions.len() == 3));
}

#[test]
fn t_x86_4_3_rip_relative_prologue_window() {
    // lea r9,[rip+0x1000]; mov eax,edi; ret (PROTOTYPE.md §5's compute), in a PIE far from 0.
    let a = 0x5555_0000_0000u64;
    let b = [0x4c, 0x8d, 0x0d, 0x00, 0x10, 0x00, 0x00, 0x89, 0xf8, 0xc3];
    let p = analyze_entry(
        FunctionBytes {
            name: "compute",
            addr: a,
            bytes: &b,
        },
        &EntryContext::default(),
    )
    .unwrap();
    let data = a + 7 + 0x1000;
    assert!(p.stub_window.contains(&(data - (1u64 << 30))) && p.stub_window.contains(&(data + (1u64 << 30))));
    assert!(!p.stub_window.contains(&(data + (1u64 << 31))));
    let stub = a - (1u64 << 30);
    let code = p.encode_old_path(stub).unwrap();
    let moved = decode_all(stub, &code.code).unwrap();
    assert_eq!(moved[0].ip_rel_memory_address(), data);
    assert_eq!(moved.last().unwrap().near_branch_target(), a + 7);
    assert!(
        p.encode_old_path(a + (3u64 << 30)).is_err(),
        "RIP-relative data out of ±2 GiB"
    );
}

#[test]
fn t_x86_4_3_jump_table_related_code_and_immediates() {
    // mov eax,edi (2); cmp eax,3 (3); lea rdx,[rip+T] (7); movslq (rdx,rax,4),rax (4); add rax,rdx (3);
    // jmp rax (2); ret
    let t_rel: i32 = 0x2000;
    let mut b = vec![0x89, 0xf8, 0x83, 0xf8, 0x03, 0x48, 0x8d, 0x15];
    b.extend(t_rel.to_le_bytes());
    b.extend([0x48, 0x63, 0x04, 0x82, 0x48, 0x01, 0xd0, 0xff, 0xe0, 0xc3]);
    let table = A + 12 + t_rel as u64;
    assert!(analyze(&b).is_ok(), "nothing visible without the table");
    let entries: Vec<u8> = [A + 21, A + 2, A + 0x10_0000]
        .iter()
        .flat_map(|&t| ((t as i64 - table as i64) as i32).to_le_bytes())
        .collect();
    let read = |addr: u64, len: usize| -> Option<Vec<u8>> {
        (addr == table).then(|| {
            entries
                .iter()
                .copied()
                .chain(std::iter::repeat(0))
                .take(len)
                .collect()
        })
    };
    let ctx = EntryContext {
        read_data: Some(&read),
        ..EntryContext::default()
    };
    match analyze_entry(f(&b), &ctx) {
        Err(EntryError::BranchTargetInside {
            target, source_desc, ..
        }) => {
            assert_eq!((target, source_desc.as_str()), (A + 2, "jump-table entry"));
        }
        r => panic!("{r:?}"),
    }

    // f.cold jumps back to A+2.
    let cold_at = A + 0x5000;
    let d = (A + 2) as i64 - (cold_at + 5) as i64;
    let mut cold = vec![0xe9];
    cold.extend((d as i32).to_le_bytes());
    let related = [FunctionBytes {
        name: "f.cold",
        addr: cold_at,
        bytes: &cold,
    }];
    let ctx = EntryContext {
        related: &related,
        ..EntryContext::default()
    };
    assert!(
        matches!(analyze_entry(f(&b), &ctx), Err(EntryError::BranchTargetInside { from, .. }) if from == cold_at)
    );

    // mov eax, offset A+2 (a code address as an immediate, non-PIC).
    let mut imm = vec![0x89, 0xf8, 0x90, 0x90, 0x90, 0xb8];
    imm.extend(((A + 2) as u32).to_le_bytes());
    imm.push(0xc3);
    assert!(matches!(
        analyze(&imm),
        Err(EntryError::BranchTargetInside { .. })
    ));
}

#[test]
fn t_x86_entry_write_aligned_word() {
    let w = EntryWrite {
        addr: 0x1002,
        bytes: vec![0xe9, 1, 2, 3, 4],
        expect: vec![0x90; 5],
        stop_free: true,
    };
    assert_eq!(w.aligned_word(), Some(0x1000));
    assert_eq!(
        w.merge_into_word([0xaa; 8]),
        Some([0xaa, 0xaa, 0xe9, 1, 2, 3, 4, 0xaa])
    );
    let crossing = EntryWrite { addr: 0x1004, ..w };
    assert_eq!(crossing.aligned_word(), None);
}

// ---- clobbers ---------------------------------------------------------------------------------------

fn code(name: &str, addr: u64, bytes: &[u8]) -> FunctionCode {
    FunctionCode {
        name: name.into(),
        addr,
        bytes: bytes.to_vec(),
    }
}

#[test]
fn t_x86_4_3a_clobbers_transitive_over_direct_callees() {
    let leaf = 0x40_2000u64;
    let leaf2 = 0x40_3000u64;
    // leaf: lea eax,[rdi+1]; jmp leaf2 (tail call)
    let mut leaf_b = vec![0x8d, 0x47, 0x01, 0xe9];
    leaf_b.extend(((leaf2 as i64 - (leaf + 8) as i64) as i32).to_le_bytes());
    // leaf2: mov r8d,1; movaps xmm3,xmm0; ret
    let leaf2_b = [0x41, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x28, 0xd8, 0xc3];
    // root: call leaf; add eax,1; call root (recursion); ret
    let mut root = vec![0xe8];
    root.extend(((leaf as i64 - (A + 5) as i64) as i32).to_le_bytes());
    root.extend([0x83, 0xc0, 0x01, 0xe8]);
    root.extend((-13i32).to_le_bytes());
    root.push(0xc3);
    let mut lookup = |t: u64| match t {
        t if t == leaf => Some(code("leaf", leaf, &leaf_b)),
        t if t == leaf2 => Some(code("leaf2", leaf2, &leaf2_b)),
        _ => None,
    };
    let c = clobbered_registers(f(&root), &mut lookup).unwrap();
    let Clobbers::Known(set) = c else { panic!("{c:?}") };
    let mut want = RegSet::EMPTY;
    for r in [Register::RAX, Register::R8, Register::XMM3] {
        want.add(r);
    }
    assert_eq!(set, want, "{set}");
    let keep = Clobbers::Known(set).to_preserve(16);
    assert!(keep.contains(Register::RDX) && keep.contains(Register::R9) && !keep.contains(Register::R8));
}

#[test]
fn t_x86_4_3a_unknown_code_means_all() {
    let mut none = |_: u64| None;
    // call rax
    let c = clobbered_registers(f(&[0xff, 0xd0, 0xc3]), &mut none).unwrap();
    assert!(
        matches!(c, Clobbers::All { ref reason } if reason.contains("indirect call")),
        "{c:?}"
    );
    // call to code the closure does not know (another module, PLT)
    let c = clobbered_registers(f(&[0xe8, 0, 1, 0, 0, 0xc3]), &mut none).unwrap();
    assert!(matches!(c, Clobbers::All { .. }));
    // jmp [rip+x]: a tail call through the GOT
    let c = clobbered_registers(f(&[0xff, 0x25, 0, 1, 0, 0]), &mut none).unwrap();
    assert!(
        matches!(c, Clobbers::All { ref reason } if reason.contains("indirect jump")),
        "{c:?}"
    );
    // notrack jmp rax: a jump table inside the function (-fcf-protection)
    let c = clobbered_registers(f(&[0x89, 0xf8, 0x3e, 0xff, 0xe0, 0xc3]), &mut none).unwrap();
    assert!(matches!(c, Clobbers::Known(_)), "{c:?}");
    // syscall: rax, rcx, r11
    let Clobbers::Known(s) = clobbered_registers(f(&[0x0f, 0x05, 0xc3]), &mut none).unwrap() else {
        panic!()
    };
    assert!(s.contains(Register::RCX) && s.contains(Register::R11) && s.contains(Register::RAX));
    // undecodable callee bytes are an error naming the function
    let mut bad = |t: u64| Some(code("broken", t, &[0x0f]));
    let e = clobbered_registers(f(&[0xe8, 0, 1, 0, 0, 0xc3]), &mut bad).unwrap_err();
    assert!(e.to_string().contains("broken"), "{e}");
}

#[test]
fn t_x86_4_4_direct_jump_after_completion() {
    let a = 0x5555_0000_0000u64;
    let mut b = ENDBR64.to_vec();
    b.extend([0x0f, 0x1f, 0x44, 0x00, 0x00, 0x8d, 0x47, 0x01, 0xc3]);
    let p = analyze_entry(
        FunctionBytes {
            name: "inc",
            addr: a,
            bytes: &b,
        },
        &EntryContext::default(),
    )
    .unwrap();
    let disp = a - 0x1000;
    // Near: one jmp rel32, no stub.
    let near = p.direct_jump(disp, a + 0x4000_0000, disp + 0x80).unwrap();
    assert_eq!(near.stub, None);
    assert_eq!(
        near.writes[0].bytes,
        encode_jmp_rel32(a + 4, a + 0x4000_0000).unwrap().to_vec()
    );
    assert_eq!(
        near.writes[0].expect,
        encode_jmp_rel32(a + 4, disp).unwrap().to_vec()
    );
    // Far (a patch library 40 GiB away): entry → near stub → absolute jump.
    let far = a + (40u64 << 30);
    let dj = p.direct_jump(disp, far, disp + 0x80).unwrap();
    assert_eq!(dj.stub, Some((disp + 0x80, encode_abs_jump(far))));
    assert_eq!(
        dj.writes[0].bytes,
        encode_jmp_rel32(a + 4, disp + 0x80).unwrap().to_vec()
    );
    let i = decode_all(disp + 0x80, &encode_abs_jump(far)[..6]).unwrap()[0];
    assert_eq!(
        i.ip_rel_memory_address(),
        disp + 0x80 + 6,
        "the pointer follows the jmp"
    );
}

#[test]
fn t_x86_4_5_old_path_pcs_map_back() {
    let p = analyze(&FRAME).unwrap();
    let stub = A + 0x10_0000;
    let r = p.encode_old_path(stub).unwrap();
    assert_eq!(r.original_pc(stub), Some(A));
    assert_eq!(r.original_pc(stub + 1), Some(A + 1));
    assert_eq!(r.original_pc(stub + 4), Some(A + 4));
    assert_eq!(r.original_pc(stub + 8), None, "the jump back has no original");
    assert!(r.contains(stub + 8) && !r.contains(stub + r.code.len() as u64));
}

#[test]
fn t_x86_entry_state_read_back() {
    let p = analyze(&FRAME).unwrap();
    let dest = A + 0x1000;
    let jump = p.install(dest).unwrap()[0].bytes.clone();
    assert_eq!(p.state(&FRAME[..5], None), EntryState::Original);
    assert_eq!(p.state(&jump, None), EntryState::Jump(dest));
    assert_eq!(p.state(&[0xcc, 0x48, 0x89, 0xe5, 0x48], None), EntryState::Int3);
    assert_eq!(
        p.state(&[0xeb, 0xfe, 0x89, 0xe5, 0x48], None),
        EntryState::Foreign
    );

    let pre = [0x90u8; 14];
    let mut b = ENDBR64.to_vec();
    b.extend([0x90, 0x90, 0x8d, 0x47, 0x01, 0xc3]);
    let ctx = EntryContext {
        pre_pad: &pre,
        ..EntryContext::default()
    };
    let pp = analyze_entry(f(&b), &ctx).unwrap();
    let w = pp.install(dest).unwrap();
    assert_eq!(pp.state(&[0x90, 0x90], Some(&[0x90; 5])), EntryState::Original);
    assert_eq!(
        pp.state(&[0x90, 0x90], Some(&w[0].bytes)),
        EntryState::Original,
        "far jump written, entry not yet"
    );
    assert_eq!(pp.state(&w[1].bytes, Some(&w[0].bytes)), EntryState::Jump(dest));
    assert_eq!(pp.state(&w[1].bytes, Some(&[0x90; 5])), EntryState::Foreign);
}

#[test]
fn t_x86_4_3_module_index_catches_branches_from_other_functions() {
    // f: mov eax,edi (2); cmp eax,3 (3); ret
    let b = [0x89, 0xf8, 0x83, 0xf8, 0x03, 0xc3];
    // g (elsewhere in the module): jmp f+2, then a data byte that does not decode.
    let g_at = A + 0x3000;
    let mut g = vec![0xe9];
    g.extend((((A + 2) as i64 - (g_at + 5) as i64) as i32).to_le_bytes());
    g.push(0x0f);
    let mut ix = TargetIndex::new();
    assert_eq!(
        ix.add(FunctionBytes {
            name: "f",
            addr: A,
            bytes: &b
        }),
        0
    );
    assert_eq!(
        ix.add(FunctionBytes {
            name: "g",
            addr: g_at,
            bytes: &g
        }),
        1,
        "one undecodable byte stepped over"
    );
    assert_eq!(ix.first_between(A, A + 5), Some((A + 2, g_at, "branch")));
    assert!(analyze(&b).is_ok(), "f alone does not show it");
    let ctx = EntryContext {
        index: Some(&ix),
        ..EntryContext::default()
    };
    match analyze_entry(f(&b), &ctx) {
        Err(EntryError::BranchTargetInside {
            from,
            target,
            source_desc,
            ..
        }) => {
            assert_eq!((from, target), (g_at, A + 2));
            assert!(source_desc.contains("module-wide"), "{source_desc}");
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn t_x86_int3_batch_three_syncs() {
    let mk = |a: u64| {
        let w = EntryWrite {
            addr: a,
            bytes: vec![0xe9, 1, 2, 3, 4],
            expect: vec![0x0f, 0x1f, 0x44, 0, 0],
            stop_free: true,
        };
        int3_protocol(&w, a + 0x100).unwrap()
    };
    let plans = [mk(0x1000), mk(0x2000), mk(0x3000)];
    let steps = int3_batch(&plans);
    assert_eq!(steps.iter().filter(|s| **s == Int3Step::SyncCores).count(), 3);
    assert_eq!(steps.len(), 3 * 3 + 3);
    assert_eq!(
        steps[0],
        Int3Step::Write {
            addr: 0x1000,
            bytes: vec![INT3]
        }
    );
    assert_eq!(steps[3], Int3Step::SyncCores);
    assert_eq!(
        steps[4],
        Int3Step::Write {
            addr: 0x1001,
            bytes: vec![1, 2, 3, 4]
        }
    );
    assert_eq!(
        steps[10],
        Int3Step::Write {
            addr: 0x3000,
            bytes: vec![0xe9]
        }
    );
}
