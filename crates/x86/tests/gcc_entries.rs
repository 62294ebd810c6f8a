//! Entry analysis and register assumptions on real gcc output (DESIGN.md §4.3, §4.3a; CRATES.md §2.6's
//! prologue facts): tests/c/entries.c is compiled at test time with exact flags, its bytes and symbols are
//! read with `object`, and the plans are checked against what gcc emitted.

use std::path::{Path, PathBuf};

use iced_x86::{FlowControl, InstructionInfoFactory, OpAccess, Register};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use relive_testkit::compile_c;
use relive_x86::*;

fn fixture(name: &str, flags: &[&str]) -> PathBuf {
    // compile_c's temporary name is per process, not per thread: serialise the tests of this file.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/entries.c");
    compile_c(name, &[src.to_str().unwrap()], flags)
}

struct Elf {
    data: Vec<u8>,
}

impl Elf {
    fn load(path: &Path) -> Elf {
        Elf {
            data: std::fs::read(path).unwrap(),
        }
    }
    fn file(&self) -> object::File<'_> {
        object::File::parse(&*self.data).unwrap()
    }
    /// (address, bytes) of a function symbol.
    fn func(&self, name: &str) -> (u64, Vec<u8>) {
        let f = self.file();
        let s = f
            .symbols()
            .find(|s| s.name() == Ok(name) && s.kind() == SymbolKind::Text)
            .unwrap_or_else(|| panic!("no function {name}"));
        (s.address(), self.read(s.address(), s.size() as usize).unwrap())
    }
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let f = self.file();
        f.sections().find_map(|sec| {
            sec.data_range(addr, len as u64)
                .ok()
                .flatten()
                .map(<[u8]>::to_vec)
        })
    }
    /// The function symbol containing `addr` (the callee closure of the clobber analysis).
    fn containing(&self, addr: u64) -> Option<FunctionCode> {
        let f = self.file();
        let s = f.symbols().find(|s| {
            s.kind() == SymbolKind::Text
                && s.size() > 0
                && addr >= s.address()
                && addr < s.address() + s.size()
        })?;
        Some(FunctionCode {
            name: s.name().unwrap().to_string(),
            addr: s.address(),
            bytes: self.read(s.address(), s.size() as usize)?,
        })
    }
    /// The addresses in `__patchable_function_entries` (non-PIE: absolute values in the section).
    fn patchable_entries(&self) -> Vec<u64> {
        let f = self.file();
        let sec = f
            .section_by_name("__patchable_function_entries")
            .expect("__patchable_function_entries");
        sec.data()
            .unwrap()
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn analyze(&self, name: &str) -> Result<EntryPlan, EntryError> {
        let (addr, bytes) = self.func(name);
        let read = |a: u64, n: usize| self.read(a, n);
        let ctx = EntryContext {
            read_data: Some(&read),
            ..EntryContext::default()
        };
        analyze_entry(
            FunctionBytes {
                name,
                addr,
                bytes: &bytes,
            },
            &ctx,
        )
    }
    fn clobbers(&self, name: &str) -> Clobbers {
        let (addr, bytes) = self.func(name);
        let mut callee = |t: u64| self.containing(t);
        clobbered_registers(
            FunctionBytes {
                name,
                addr,
                bytes: &bytes,
            },
            &mut callee,
        )
        .unwrap()
    }
}

const FUNCS: [&str; 8] = [
    "tiny", "scale", "spin", "pick", "leaf", "mid", "caller", "indirect",
];

#[test]
fn t_x86_4_3_gcc_o2_cet_prologues() {
    let elf = Elf::load(&fixture("x86-entries-cet", &["-O2", "-fcf-protection=full"]));

    // tiny: endbr64; lea 1(%rdi),%eax; ret — 4 bytes after endbr64.
    match elf.analyze("tiny") {
        Err(EntryError::TooShort {
            available: 4,
            needed: 5,
            function,
            ..
        }) => assert_eq!(function, "tiny"),
        r => panic!("tiny: {r:?}"),
    }

    // scale: endbr64; mov %edi,%ecx; lea table(%rip),%rdx; … — both displaced, the lea relocated.
    let p = elf.analyze("scale").unwrap();
    assert!(p.endbr);
    let EntryKind::Displaced { instructions, .. } = &p.kind else {
        panic!("{:?}", p.kind)
    };
    assert_eq!(instructions.len(), 2, "{instructions:?}");
    assert!(instructions[1].is_ip_rel_memory_operand());
    let table = instructions[1].ip_rel_memory_address();
    assert_eq!(
        Some(table),
        elf.file()
            .symbols()
            .find(|s| s.name() == Ok("table"))
            .map(|s| s.address())
    );
    assert_eq!(p.resume, p.site + 9);
    let stub = p.addr + (1 << 30);
    assert!(p.stub_window.contains(&stub));
    let copy = p.encode_old_path(stub).unwrap();
    let moved = decode_all(stub, &copy.code).unwrap();
    assert_eq!(
        moved[1].ip_rel_memory_address(),
        table,
        "same effective address after relocation"
    );
    assert_eq!(moved[2].near_branch_target(), p.resume);
    assert!(
        !p.install(stub).unwrap()[0].stop_free,
        "two instructions under the jump"
    );

    // caller: endbr64; call leaf — one 5-byte instruction under the jump: stop-free, relocatable call.
    let p = elf.analyze("caller").unwrap();
    let EntryKind::Displaced { instructions, .. } = &p.kind else {
        panic!("{:?}", p.kind)
    };
    assert_eq!(
        (instructions.len(), instructions[0].flow_control()),
        (1, FlowControl::Call)
    );
    assert!(p.install(p.addr + 0x1000).unwrap()[0].stop_free);

    // pick: a switch with a jump table in .rodata, followed with read_data; its cases are far from the entry.
    let p = elf.analyze("pick").unwrap();
    assert!(matches!(p.kind, EntryKind::Displaced { .. }));
    // A jump table: intra-function, so the register analysis still knows everything (plus pick.cold).
    assert!(
        matches!(elf.clobbers("pick"), Clobbers::Known(_)),
        "{:?}",
        elf.clobbers("pick")
    );
}

/// DESIGN.md §4.3a, checked on gcc's own output: `leaf` writes only rax, and `caller` (compiled with
/// -fipa-ra, the -O2 default) reads rcx, rdx, rsi, r8 and r9 after `call leaf` without reloading them.
#[test]
fn t_x86_4_3a_gcc_ipa_ra_callers_rely_on_preserved_registers() {
    let elf = Elf::load(&fixture("x86-entries-cet", &["-O2", "-fcf-protection=full"]));
    let Clobbers::Known(leaf) = elf.clobbers("leaf") else {
        panic!()
    };
    let mut rax = RegSet::EMPTY;
    rax.add(Register::RAX);
    assert_eq!(leaf, rax, "leaf: lea 1(%rdi,%rdi,1),%eax; ret");
    let keep = elf.clobbers("leaf").to_preserve(16);

    // What caller reads after the call before writing it: live across the call.
    let (addr, bytes) = elf.func("caller");
    let ins = decode_all(addr, &bytes).unwrap();
    let call = ins
        .iter()
        .position(|i| i.flow_control() == FlowControl::Call)
        .unwrap();
    let mut f = InstructionInfoFactory::new();
    let mut written = RegSet::EMPTY;
    let mut live = RegSet::EMPTY;
    for i in &ins[call + 1..] {
        for u in f.info(i).used_registers() {
            let r = u.register();
            let mut one = RegSet::EMPTY;
            one.add(r);
            if matches!(
                u.access(),
                OpAccess::Read | OpAccess::ReadWrite | OpAccess::CondRead | OpAccess::ReadCondWrite
            ) && written.union(one) != written
            {
                live = live.union(one);
            }
        }
        for u in f.info(i).used_registers() {
            if matches!(
                u.access(),
                OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
            ) {
                written.add(u.register());
            }
        }
    }
    for r in [
        Register::RCX,
        Register::RDX,
        Register::RSI,
        Register::R8,
        Register::R9,
    ] {
        assert!(
            live.contains(r),
            "caller relies on {r:?} across call leaf (live {live})"
        );
        assert!(
            keep.contains(r),
            "so a new leaf must be entered through a thunk preserving {r:?}"
        );
    }
    // The thunk for a new leaf preserves exactly that set.
    let t = encode_preserving_thunk(0x7000_0000, 0x7100_0000, keep, VectorWidth::Ymm, 0).unwrap();
    assert!(t.code.len() > 20);

    // Transitive: mid calls leaf twice and adds: its set is leaf's plus what mid writes itself.
    let Clobbers::Known(mid) = elf.clobbers("mid") else {
        panic!()
    };
    assert!(mid.contains(Register::RAX) && mid.contains(Register::RDX) && mid.contains(Register::RDI));
    assert!(!mid.contains(Register::R8), "{mid}");
    // An indirect call means "all": no thunk.
    assert!(matches!(elf.clobbers("indirect"), Clobbers::All { .. }));
    assert!(elf.clobbers("indirect").to_preserve(16).is_empty());
}

#[test]
fn t_x86_4_3_gcc_loop_back_to_second_instruction_is_refused() {
    // -Os does not align loops: spin is endbr64; mov %edi,%eax; 1: lea (%rax,%rax,4),%eax; …; jb 1b.
    let elf = Elf::load(&fixture("x86-entries-os", &["-Os", "-fcf-protection=full"]));
    let (addr, bytes) = elf.func("spin");
    let ins = decode_all(addr, &bytes).unwrap();
    let back = ins
        .iter()
        .find(|i| i.flow_control() == FlowControl::ConditionalBranch)
        .unwrap();
    assert_eq!(
        back.near_branch_target(),
        ins[2].ip(),
        "gcc's loop goes back to the second instruction"
    );
    match elf.analyze("spin") {
        Err(EntryError::BranchTargetInside { target, from, .. }) => {
            assert_eq!((target, from), (ins[2].ip(), back.ip()));
        }
        r => panic!("spin: {r:?}"),
    }
}

#[test]
fn t_x86_4_3_gcc_patchable_function_entry_16_14() {
    let elf = Elf::load(&fixture(
        "x86-entries-pfe16",
        &[
            "-O2",
            "-fcf-protection=full",
            "-fpatchable-function-entry=16,14",
            "-no-pie",
        ],
    ));
    let entries = elf.patchable_entries();
    for name in FUNCS {
        let (addr, bytes) = elf.func(name);
        // The section records where each pad starts: 14 bytes before the symbol.
        assert!(entries.contains(&(addr - 14)), "{name}: {entries:x?}");
        let pre = elf.read(addr - 14, 14).unwrap();
        let ctx = EntryContext {
            pre_pad: &pre,
            ..EntryContext::default()
        };
        let p = analyze_entry(
            FunctionBytes {
                name,
                addr,
                bytes: &bytes,
            },
            &ctx,
        )
        .unwrap();
        // A static function whose address is never taken (leaf) gets no endbr64.
        assert_eq!(p.endbr, name != "leaf", "{name}");
        let e = if p.endbr { 4 } else { 0 };
        assert_eq!(p.site, addr + e, "{name}: after endbr64");
        assert_eq!(
            p.kind,
            EntryKind::PrePad {
                pad_len: 2,
                far_site: addr - 5,
                far_original: vec![0x90; 5]
            },
            "{name}"
        );
        assert_eq!(p.old_path_direct(), Some(addr + e + 2));
        let w = p.install(addr + 0x10_0000).unwrap();
        assert_eq!((w[0].addr, w[1].addr, w[1].bytes.len()), (addr - 5, addr + e, 2));
    }
    // A pad makes even tiny patchable.
    let (addr, _) = elf.func("tiny");
    assert_eq!(
        elf.func("tiny").1.len(),
        10,
        "endbr64, 2 nops, lea, ret, at {addr:#x}"
    );
}

#[test]
fn t_x86_4_3_gcc_mfentry_nop_is_one_instruction() {
    let elf = Elf::load(&fixture(
        "x86-entries-fentry",
        &[
            "-O2",
            "-pg",
            "-mfentry",
            "-mnop-mcount",
            "-fcf-protection=full",
            "-no-pie",
            "-fno-pic",
        ],
    ));
    for name in FUNCS {
        let p = elf.analyze(name).unwrap();
        assert_eq!(
            p.kind,
            EntryKind::Pad {
                pad_len: 5,
                single_nop: true
            },
            "{name}"
        );
        assert_eq!(p.endbr, name != "leaf", "{name}");
        let e = if p.endbr { 4 } else { 0 };
        assert_eq!((p.site, p.resume), (p.addr + e, p.addr + e + 5));
        let w = p.install(p.addr + 0x1000).unwrap();
        assert!(w[0].stop_free, "{name}: PAUSE-FREE.md §2 applies");
        let plan = int3_protocol(&w[0], p.addr + 0x1000).unwrap();
        assert_eq!(int3_state_after(&plan, plan.steps.len()), w[0].bytes);
        let back = p.restore(p.addr + 0x1000).unwrap();
        assert_eq!(back[0].bytes, vec![0x0f, 0x1f, 0x44, 0x00, 0x00]);
        assert!(int3_protocol(&back[0], p.resume).is_ok());
    }
}

#[test]
fn t_x86_4_3_gcc_patchable_function_entry_5() {
    let elf = Elf::load(&fixture(
        "x86-entries-pfe5",
        &["-O2", "-fpatchable-function-entry=5"],
    ));
    for name in FUNCS {
        let p = elf.analyze(name).unwrap();
        assert!(!p.endbr);
        assert_eq!(
            p.kind,
            EntryKind::Pad {
                pad_len: 5,
                single_nop: false
            },
            "{name}"
        );
        assert_eq!(p.interior, (1..5).map(|i| p.addr + i).collect::<Vec<_>>());
        assert!(
            !p.install(p.addr + 0x1000).unwrap()[0].stop_free,
            "five 1-byte NOPs: stop and check PCs"
        );
    }
}
