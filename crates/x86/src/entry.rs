//! Entry analysis (DESIGN.md §4.3): pad or prologue, length, branch targets into the overwritten bytes,
//! relocatability; and the entry writes that install, retarget and restore the jump.

use std::ops::Range;

use iced_x86::{Code, FlowControl, Instruction, Mnemonic, OpKind, Register};

use crate::reloc::{decode_all, relocate_code};
use crate::{EncodeError, EntryError, Relocated};

/// Length of `jmp rel32` (`E9 rel32`), the entry jump.
pub const JMP_REL32_LEN: usize = 5;
/// Length of `jmp rel8` (`EB rel8`), the entry jump into a pre-entry pad.
pub const JMP_REL8_LEN: usize = 2;
/// The `endbr64` instruction (CET/IBT landing pad); indirect calls land on it, so it is kept.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Room left at the edges of ±2 GiB windows, so that a stub of that many bytes fits anywhere inside.
const WINDOW_SLACK: u64 = 4096;

/// A function's code: its name, its address (AVMA) and all its bytes (the symbol's or FDE's range).
#[derive(Debug, Clone, Copy)]
pub struct FunctionBytes<'a> {
    pub name: &'a str,
    pub addr: u64,
    pub bytes: &'a [u8],
}

/// Reads `len` bytes of the target at an address (for jump tables in `.rodata`); `None` if unreadable.
pub type ReadData<'a> = &'a dyn Fn(u64, usize) -> Option<Vec<u8>>;

/// Optional knowledge that sharpens the analysis. `EntryContext::default()` is valid.
#[derive(Clone, Copy, Default)]
pub struct EntryContext<'a> {
    /// The bytes immediately before the function's symbol that belong to its pre-entry NOP pad (the `M` of
    /// `-fpatchable-function-entry=N,M`, as recorded in `__patchable_function_entries`), or empty.
    pub pre_pad: &'a [u8],
    /// Other code that may branch into this function (its `.cold` part, for instance). Their direct
    /// branches into the overwritten bytes cause a refusal too.
    pub related: &'a [FunctionBytes<'a>],
    /// Reads data of the target module; when given, jump tables found through RIP-relative `lea` (PIC,
    /// 32-bit relative entries) or `jmp [index*8 + table]` (non-PIC, 64-bit absolute entries) are followed
    /// and their entries count as branch targets.
    pub read_data: Option<ReadData<'a>>,
    /// Branch targets of the whole module ([`TargetIndex`]): catches jumps from other functions (a `.cold`
    /// part, hand-written assembly) into the overwritten bytes.
    pub index: Option<&'a TargetIndex>,
}

/// The direct branch targets (jmp, jcc, call, xbegin) and RIP-relative code addresses of a whole module's
/// code, so that [`analyze_entry`] refuses an entry that some *other* function branches into. Building it
/// over a libc takes a few milliseconds (`cargo bench -p relive-x86 --bench x86`).
#[derive(Debug, Clone, Default)]
pub struct TargetIndex {
    /// target → (first branch seen to it, what kind of reference)
    map: std::collections::BTreeMap<u64, (u64, &'static str)>,
}

impl TargetIndex {
    pub fn new() -> TargetIndex {
        TargetIndex::default()
    }

    /// Adds the references made by one piece of code. Undecodable bytes are stepped over one at a time (data
    /// in text); returns how many such bytes there were.
    pub fn add(&mut self, code: FunctionBytes<'_>) -> usize {
        let mut dec = iced_x86::Decoder::with_ip(64, code.bytes, code.addr, iced_x86::DecoderOptions::NONE);
        let mut bad = 0;
        let mut ins = Instruction::default();
        while dec.can_decode() {
            let pos = dec.position();
            dec.decode_out(&mut ins);
            if ins.is_invalid() {
                bad += 1;
                let _ = dec.set_position(pos + 1);
                dec.set_ip(code.addr + pos as u64 + 1);
                continue;
            }
            let what = match ins.flow_control() {
                FlowControl::Call if is_near_branch(&ins) => Some((ins.near_branch_target(), "call")),
                FlowControl::UnconditionalBranch
                | FlowControl::ConditionalBranch
                | FlowControl::XbeginXabortXend
                    if is_near_branch(&ins) =>
                {
                    Some((ins.near_branch_target(), "branch"))
                }
                _ if ins.is_ip_rel_memory_operand() && ins.mnemonic() == Mnemonic::Lea => {
                    Some((ins.ip_rel_memory_address(), "rip-relative lea"))
                }
                _ => None,
            };
            if let Some((t, w)) = what {
                self.map.entry(t).or_insert((ins.ip(), w));
            }
        }
        bad
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The first indexed target strictly between `lo` and `hi`, with where it comes from.
    pub fn first_between(&self, lo: u64, hi: u64) -> Option<(u64, u64, &'static str)> {
        if hi <= lo + 1 {
            return None;
        }
        self.map
            .range(lo + 1..hi)
            .next()
            .map(|(&t, &(from, w))| (t, from, w))
    }
}

impl std::fmt::Debug for EntryContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryContext")
            .field("pre_pad", &self.pre_pad.len())
            .field("related", &self.related.len())
            .field("read_data", &self.read_data.is_some())
            .field("index", &self.index.map(TargetIndex::len))
            .finish()
    }
}

/// How the entry is patched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A NOP pad of at least 5 bytes at the site (`-fpatchable-function-entry=N` with N ≥ 5, `-mfentry
    /// -mnop-mcount`): the jump goes over its first 5 bytes, the old path is `resume` = site + pad.
    Pad {
        pad_len: u64,
        /// The pad starts with one NOP of at least 5 bytes: a write there replaces one instruction.
        single_nop: bool,
    },
    /// A 2–4 byte NOP pad at the site and a NOP pad of at least 5 bytes before the symbol
    /// (`-fpatchable-function-entry=N,M`): `jmp rel32` goes into the last 5 bytes before the symbol
    /// (`far_site`), and a 2-byte `jmp rel8` at the site jumps there. The old path is site + pad.
    PrePad {
        pad_len: u64,
        far_site: u64,
        far_original: Vec<u8>,
    },
    /// No pad: the first 5 bytes at the site are overwritten; `instructions` (which cover them) are
    /// relocated into the old-path copy, which jumps back to `resume`. `bytes` are their original bytes
    /// (`[site, resume)`), copied as they are when nothing in them depends on where they run
    /// ([`crate::relocate_code`]); empty when the plan was rebuilt from a record.
    Displaced {
        instructions: Vec<Instruction>,
        bytes: Vec<u8>,
    },
}

/// The result of [`analyze_entry`]: where and how to write the entry of one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPlan {
    pub function: String,
    /// The function's symbol address (AVMA).
    pub addr: u64,
    pub size: u64,
    /// The function starts with `endbr64`, which is kept; `site` is after it.
    pub endbr: bool,
    /// The first byte written at the entry.
    pub site: u64,
    /// The original bytes at `[site, site + original.len())`, restored on unpatch.
    pub original: Vec<u8>,
    /// Where the old path continues in the original code.
    pub resume: u64,
    pub kind: EntryKind,
    /// Instruction starts strictly inside the overwritten bytes: no thread may have one of these as its PC
    /// or as a PC saved on its stack (signal frames included) while the entry is written.
    pub interior: Vec<u64>,
    /// Where stubs for this entry may be placed: every displacement of the entry jump and of the old-path
    /// copy reaches from anywhere in this range (with 4 KiB to spare at either end).
    pub stub_window: Range<u64>,
}

/// One write of at most 8 bytes at an entry: the driver does it with one `pwrite` (or with the int3
/// protocol, see [`crate::int3_protocol`], when `stop_free`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryWrite {
    pub addr: u64,
    pub bytes: Vec<u8>,
    /// The bytes that must be there before the write; anything else means someone else changed the entry,
    /// or an earlier run stopped half-way (compare with the bytes of the other direction).
    pub expect: Vec<u8>,
    /// The bytes being replaced form (the start of) one instruction, and no thread can be inside them:
    /// the write needs no stop of the process (PAUSE-FREE.md §2). When false, every thread must be
    /// stopped and no PC (registers and saved frames) may satisfy [`EntryWrite::blocks_pc`].
    pub stop_free: bool,
}

impl EntryWrite {
    /// True if a thread whose PC (or a PC saved on its stack) is `pc` forbids this write now.
    pub fn blocks_pc(&self, pc: u64) -> bool {
        pc > self.addr && pc < self.addr + self.bytes.len() as u64
    }

    /// The 8-byte aligned word that contains the whole write, if there is one: an agent may then do the write
    /// as one aligned 8-byte store (PAUSE-FREE.md §3.6), merging with [`EntryWrite::merge_into_word`].
    pub fn aligned_word(&self) -> Option<u64> {
        let w = self.addr & !7;
        (self.addr + self.bytes.len() as u64 <= w + 8).then_some(w)
    }

    /// The word at `aligned_word()` after the write, given its current 8 bytes.
    pub fn merge_into_word(&self, current: [u8; 8]) -> Option<[u8; 8]> {
        let w = self.aligned_word()?;
        let mut out = current;
        let off = (self.addr - w) as usize;
        out[off..off + self.bytes.len()].copy_from_slice(&self.bytes);
        Some(out)
    }
}

/// What an entry holds now, as read back from the target (for a controller that restarts after being killed
/// mid-way, DESIGN.md §1: the next command sees where the transition stood).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// The original bytes.
    Original,
    /// relive's jump, to this address.
    Jump(u64),
    /// An int3 left by an interrupted int3 protocol (PAUSE-FREE.md §2): finish or undo it with the agent's
    /// site table, which knows the intended bytes.
    Int3,
    /// Something else: another tool or a debugger changed the entry. Refuse to touch it.
    Foreign,
}

/// What [`EntryPlan::direct_jump`] asks the driver to do: fill the near stub (if any) first, then the writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectJump {
    /// `(address, bytes)` of the absolute jump to place in the stub page, when the target is out of reach.
    pub stub: Option<(u64, [u8; 14])>,
    pub writes: Vec<EntryWrite>,
}

/// `jmp rel32` at `at` to `target`.
pub fn encode_jmp_rel32(at: u64, target: u64) -> Result<[u8; 5], EncodeError> {
    let d = rel(at + 5, target).ok_or_else(|| EncodeError::OutOfRange {
        what: "jmp rel32".into(),
        from: at,
        to: target,
    })?;
    let b = d.to_le_bytes();
    Ok([0xe9, b[0], b[1], b[2], b[3]])
}

/// `jmp rel8` at `at` to `target`.
pub fn encode_jmp_rel8(at: u64, target: u64) -> Result<[u8; 2], EncodeError> {
    let d = (target as i128) - (at as i128 + 2);
    let d = i8::try_from(d).map_err(|_| EncodeError::OutOfRange {
        what: "jmp rel8".into(),
        from: at,
        to: target,
    })?;
    Ok([0xeb, d as u8])
}

/// The 14-byte absolute jump `jmp qword ptr [rip+0]; .quad target` (`FF 25 00000000` + target), placed in a
/// near stub when the entry's `jmp rel32` cannot reach the new code (DESIGN.md §1: two jumps then).
pub fn encode_abs_jump(target: u64) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
    out[6..].copy_from_slice(&target.to_le_bytes());
    out
}

/// True if `jmp rel32` at `at` reaches `target`.
pub fn rel32_reaches(at: u64, target: u64) -> bool {
    rel(at + 5, target).is_some()
}

fn rel(next_ip: u64, target: u64) -> Option<i32> {
    i32::try_from(target as i128 - next_ip as i128).ok()
}

fn is_nop(ins: &Instruction) -> bool {
    matches!(ins.mnemonic(), Mnemonic::Nop)
}

/// Analyses the entry of `func` (DESIGN.md §4.3): skips `endbr64`, uses a patchable NOP pad when there is
/// one, else plans to displace and relocate the instructions under the 5-byte jump. Refuses (with the
/// function, the address and what to do) a function that is too short, one with a branch target inside the
/// overwritten bytes (every direct branch of the whole function and of `ctx.related`, RIP-relative `lea`s and
/// 32/64-bit immediates that point there, jump-table entries when `ctx.read_data` is given), one with a
/// breakpoint at the site, undecodable bytes, or displaced instructions that cannot be relocated.
///
/// A branch to the symbol or to the site itself is allowed: it enters the function again through its entry
/// (a self tail call), which is what the dispatcher expects.
pub fn analyze_entry(func: FunctionBytes<'_>, ctx: &EntryContext<'_>) -> Result<EntryPlan, EntryError> {
    let name = func.name.to_string();
    let addr = func.addr;
    let size = func.bytes.len() as u64;
    let instrs = decode_all(addr, func.bytes).map_err(|at| EntryError::Undecodable {
        function: name.clone(),
        addr,
        at,
    })?;
    let endbr = func.bytes.starts_with(&ENDBR64);
    let site_off: usize = if endbr { ENDBR64.len() } else { 0 };
    let site = addr + site_off as u64;
    let available = size.saturating_sub(site_off as u64);
    if func.bytes.get(site_off) == Some(&0xcc) {
        return Err(EntryError::Breakpoint {
            function: name,
            addr,
            at: site,
        });
    }
    let Some(first) = instrs.iter().position(|i| i.ip() == site) else {
        return Err(EntryError::TooShort {
            function: name,
            addr,
            available,
            needed: JMP_REL32_LEN as u64,
        });
    };

    // The pad: consecutive NOPs at the site.
    let pad: Vec<&Instruction> = instrs[first..].iter().take_while(|i| is_nop(i)).collect();
    let pad_len: u64 = pad.iter().map(|i| i.len() as u64).sum();
    let pre_pad_ok = ctx.pre_pad.len() >= JMP_REL32_LEN
        && addr >= ctx.pre_pad.len() as u64
        && decode_all(addr - ctx.pre_pad.len() as u64, ctx.pre_pad).is_ok_and(|v| v.iter().all(is_nop));

    let boundaries_in = |lo: u64, hi: u64| -> Vec<u64> {
        instrs
            .iter()
            .map(Instruction::ip)
            .filter(|&ip| ip > lo && ip < hi)
            .collect()
    };

    let (kind, write_len, resume) = if pad_len >= JMP_REL32_LEN as u64 {
        let single_nop = pad[0].len() >= JMP_REL32_LEN;
        (
            EntryKind::Pad { pad_len, single_nop },
            JMP_REL32_LEN as u64,
            site + pad_len,
        )
    } else if pad_len >= JMP_REL8_LEN as u64 && pre_pad_ok {
        let far_site = addr - JMP_REL32_LEN as u64;
        let far_original = ctx.pre_pad[ctx.pre_pad.len() - JMP_REL32_LEN..].to_vec();
        (
            EntryKind::PrePad {
                pad_len,
                far_site,
                far_original,
            },
            JMP_REL8_LEN as u64,
            site + pad_len,
        )
    } else {
        if available < JMP_REL32_LEN as u64 {
            return Err(EntryError::TooShort {
                function: name,
                addr,
                available,
                needed: JMP_REL32_LEN as u64,
            });
        }
        let mut displaced = Vec::new();
        let mut end = site;
        for ins in &instrs[first..] {
            if end >= site + JMP_REL32_LEN as u64 {
                break;
            }
            displaced.push(*ins);
            end = ins.next_ip();
        }
        let bytes = func.bytes[site_off..site_off + (end - site) as usize].to_vec();
        (
            EntryKind::Displaced {
                instructions: displaced,
                bytes,
            },
            JMP_REL32_LEN as u64,
            end,
        )
    };

    // Branch targets: a target in (site, guard_end) would land inside the new jump, or (for displaced
    // instructions) skip part of the relocated prologue.
    let guard_end = match kind {
        EntryKind::Displaced { .. } => resume,
        _ => site + write_len,
    };
    let check = |from: u64, target: u64, what: &str| -> Result<(), EntryError> {
        if target > site && target < guard_end {
            return Err(EntryError::BranchTargetInside {
                function: name.clone(),
                addr,
                site,
                end: guard_end,
                from,
                target,
                source_desc: what.to_string(),
            });
        }
        Ok(())
    };
    scan_targets(&instrs, addr..addr + size, ctx.read_data, &check)?;
    for rel in ctx.related {
        let ri = decode_all(rel.addr, rel.bytes).map_err(|at| EntryError::Undecodable {
            function: format!("{} (related code {})", name, rel.name),
            addr: rel.addr,
            at,
        })?;
        scan_targets(
            &ri,
            rel.addr..rel.addr + rel.bytes.len() as u64,
            ctx.read_data,
            &check,
        )?;
    }

    if let Some(ix) = ctx.index
        && let Some((target, from, what)) = ix.first_between(site, guard_end)
    {
        return Err(EntryError::BranchTargetInside {
            function: name,
            addr,
            site,
            end: guard_end,
            from,
            target,
            source_desc: format!("{what} (module-wide index)"),
        });
    }

    // The stub window: the entry jump must reach the stub, and every RIP-relative operand of the displaced
    // instructions must reach its data from the stub.
    let mut lo = site.saturating_sub((1u64 << 31) - WINDOW_SLACK);
    let mut hi = site.saturating_add((1u64 << 31) - WINDOW_SLACK);
    if let EntryKind::Displaced { instructions, bytes } = &kind {
        for ins in instructions {
            match ins.flow_control() {
                FlowControl::Interrupt | FlowControl::Exception => {
                    return Err(EntryError::Unrelocatable {
                        function: name,
                        addr,
                        at: ins.ip(),
                        instruction: ins.to_string(),
                        reason:
                            "it traps (a breakpoint, int or ud2 belongs to someone else or marks dead code)"
                                .into(),
                    });
                }
                _ => {}
            }
            if ins.is_ip_rel_memory_operand() {
                let t = ins.ip_rel_memory_address();
                lo = lo.max(t.saturating_sub((1u64 << 31) - WINDOW_SLACK));
                hi = hi.min(t.saturating_add((1u64 << 31) - WINDOW_SLACK));
            }
        }
        // Trial relocation (at the original address every displacement fits): refuses instructions that
        // BlockEncoder cannot move.
        relocate_code(bytes, instructions, site, Some(resume)).map_err(|e| EntryError::Unrelocatable {
            function: name.clone(),
            addr,
            at: site,
            instruction: instructions
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join("; "),
            reason: e.to_string(),
        })?;
    }
    if lo >= hi {
        return Err(EntryError::Unrelocatable {
            function: name,
            addr,
            at: site,
            instruction: "(displaced prologue)".into(),
            reason: "its RIP-relative operands are more than 2 GiB apart from each other and from the entry"
                .into(),
        });
    }

    let original = func.bytes[site_off..site_off + write_len as usize].to_vec();
    let interior = boundaries_in(site, site + write_len);
    Ok(EntryPlan {
        function: name,
        addr,
        size,
        endbr,
        site,
        original,
        resume,
        kind,
        interior,
        stub_window: lo..hi,
    })
}

/// Calls `check(from, target, what)` for every address the code may transfer control to or take as a code
/// address: direct branch targets, RIP-relative addresses inside `own`, immediates, jump-table entries.
fn scan_targets(
    instrs: &[Instruction],
    own: Range<u64>,
    read_data: Option<ReadData<'_>>,
    check: &dyn Fn(u64, u64, &str) -> Result<(), EntryError>,
) -> Result<(), EntryError> {
    let has_jmp_reg = instrs
        .iter()
        .any(|i| i.flow_control() == FlowControl::IndirectBranch && i.op0_kind() == OpKind::Register);
    for ins in instrs {
        match ins.flow_control() {
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
                if is_near_branch(ins) =>
            {
                let what = match ins.flow_control() {
                    FlowControl::Call => "call",
                    FlowControl::ConditionalBranch => "conditional branch",
                    _ => "jmp",
                };
                check(ins.ip(), ins.near_branch_target(), what)?;
            }
            FlowControl::XbeginXabortXend if is_near_branch(ins) => {
                check(ins.ip(), ins.near_branch_target(), "xbegin abort target")?;
            }
            _ => {}
        }
        if ins.is_ip_rel_memory_operand() {
            let t = ins.ip_rel_memory_address();
            check(ins.ip(), t, "rip-relative address")?;
            // PIC jump table: `lea rX,[rip+T]; movslq (rX,rI,4),rY; add rX,rY; jmp *rY`.
            if let (Some(read), true, Mnemonic::Lea) = (read_data, has_jmp_reg, ins.mnemonic())
                && !own.contains(&t)
                && let Some(data) = read(t, 4 * 512)
            {
                for e in data.chunks_exact(4) {
                    let off = i32::from_le_bytes([e[0], e[1], e[2], e[3]]) as i64;
                    let target = t.wrapping_add(off as u64);
                    if !own.contains(&target) {
                        break;
                    }
                    check(ins.ip(), target, "jump-table entry")?;
                }
            }
        }
        // Non-PIC jump table: `jmp qword ptr [rI*8 + T]`.
        if ins.flow_control() == FlowControl::IndirectBranch
            && ins.op0_kind() == OpKind::Memory
            && ins.memory_base() == Register::None
            && ins.memory_index() != Register::None
            && ins.memory_index_scale() == 8
            && let Some(read) = read_data
            && let Some(data) = read(ins.memory_displacement64(), 8 * 512)
        {
            for e in data.chunks_exact(8) {
                let target = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
                if !own.contains(&target) {
                    break;
                }
                check(ins.ip(), target, "jump-table entry")?;
            }
        }
        for op in 0..ins.op_count() {
            match ins.op_kind(op) {
                OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64 => {
                    let v = ins.immediate(op);
                    if own.contains(&v) {
                        check(ins.ip(), v, "code address in an immediate")?;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn is_near_branch(ins: &Instruction) -> bool {
    matches!(
        ins.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    ) || (ins.code() == Code::Xbegin_rel32 || ins.code() == Code::Xbegin_rel16)
}

impl EntryPlan {
    /// Number of bytes written at the site.
    pub fn write_len(&self) -> usize {
        self.original.len()
    }

    /// Where the old path can jump directly, without a copy: `Some(resume)` for pads (the original code after
    /// the pad is intact), `None` when displaced instructions must run first ([`EntryPlan::encode_old_path`]).
    pub fn old_path_direct(&self) -> Option<u64> {
        match self.kind {
            EntryKind::Displaced { .. } => None,
            _ => Some(self.resume),
        }
    }

    /// The old-path copy placed at `at`: the displaced instructions relocated there, then a jump back to
    /// `resume` (just the jump for a pad). A PC inside the copy unwinds like the original PC it maps to
    /// ([`Relocated::original_pc`]) under the function's own FDE; on the jump back, like `resume`. Fails if `at` is outside `stub_window` far enough that a
    /// RIP-relative operand cannot reach.
    pub fn encode_old_path(&self, at: u64) -> Result<Relocated, EncodeError> {
        let (instrs, bytes): (&[Instruction], &[u8]) = match &self.kind {
            EntryKind::Displaced { instructions, bytes } => (instructions, bytes),
            _ => (&[], &[]),
        };
        relocate_code(bytes, instrs, at, Some(self.resume))
    }

    /// The writes that replace the original entry with a jump to `dest` (a dispatcher, a near stub or the
    /// new function), in the order they must be done. Fails if `dest` is beyond ±2 GiB of the jump: then put
    /// [`encode_abs_jump`] in a near stub and jump there.
    pub fn install(&self, dest: u64) -> Result<Vec<EntryWrite>, EncodeError> {
        match &self.kind {
            EntryKind::PrePad {
                far_site,
                far_original,
                pad_len,
            } => Ok(vec![
                // Nobody executes the pre-entry pad, so this write is always safe.
                EntryWrite {
                    addr: *far_site,
                    bytes: encode_jmp_rel32(*far_site, dest)?.to_vec(),
                    expect: far_original.clone(),
                    stop_free: true,
                },
                EntryWrite {
                    addr: self.site,
                    bytes: encode_jmp_rel8(self.site, *far_site)?.to_vec(),
                    expect: self.original.clone(),
                    stop_free: *pad_len >= JMP_REL8_LEN as u64 && self.interior.is_empty(),
                },
            ]),
            _ => Ok(vec![EntryWrite {
                addr: self.site,
                bytes: encode_jmp_rel32(self.site, dest)?.to_vec(),
                expect: self.original.clone(),
                stop_free: self.interior.is_empty(),
            }]),
        }
    }

    /// The writes that turn the installed jump to `from` into a jump to `to` (for example dispatcher → new
    /// function when a transition completes, DESIGN.md §4.4). A jump is one instruction: stop-free.
    pub fn retarget(&self, from: u64, to: u64) -> Result<Vec<EntryWrite>, EncodeError> {
        let at = self.jump_site();
        Ok(vec![EntryWrite {
            addr: at,
            bytes: encode_jmp_rel32(at, to)?.to_vec(),
            expect: encode_jmp_rel32(at, from)?.to_vec(),
            stop_free: true,
        }])
    }

    /// The writes that restore the original bytes over the installed jump to `current` (unpatch), in order.
    /// No thread can be inside a jump, so these are stop-free.
    pub fn restore(&self, current: u64) -> Result<Vec<EntryWrite>, EncodeError> {
        match &self.kind {
            EntryKind::PrePad {
                far_site,
                far_original,
                ..
            } => Ok(vec![
                EntryWrite {
                    addr: self.site,
                    bytes: self.original.clone(),
                    expect: encode_jmp_rel8(self.site, *far_site)?.to_vec(),
                    stop_free: true,
                },
                EntryWrite {
                    addr: *far_site,
                    bytes: far_original.clone(),
                    expect: encode_jmp_rel32(*far_site, current)?.to_vec(),
                    stop_free: true,
                },
            ]),
            _ => Ok(vec![EntryWrite {
                addr: self.site,
                bytes: self.original.clone(),
                expect: encode_jmp_rel32(self.site, current)?.to_vec(),
                stop_free: true,
            }]),
        }
    }

    /// Where the `jmp rel32` lives: the site, or the pre-entry pad for [`EntryKind::PrePad`].
    pub fn jump_site(&self) -> u64 {
        match &self.kind {
            EntryKind::PrePad { far_site, .. } => *far_site,
            _ => self.site,
        }
    }

    /// The completion of a transition (DESIGN.md §1, §4.4): the entry, now jumping to `current` (a
    /// dispatcher), jumps straight to `target`, with one `jmp rel32` when it reaches, else through the
    /// 14-byte absolute jump of [`encode_abs_jump`] placed at `near_stub` (which must lie within
    /// [`EntryPlan::stub_window`]): two jumps.
    pub fn direct_jump(&self, current: u64, target: u64, near_stub: u64) -> Result<DirectJump, EncodeError> {
        if self.reaches(target) {
            return Ok(DirectJump {
                stub: None,
                writes: self.retarget(current, target)?,
            });
        }
        let writes = self.retarget(current, near_stub)?;
        Ok(DirectJump {
            stub: Some((near_stub, encode_abs_jump(target))),
            writes,
        })
    }

    /// Classifies the bytes read back at the site (`write_len()` bytes) and, for [`EntryKind::PrePad`], at the
    /// far site (5 bytes).
    pub fn state(&self, at_site: &[u8], at_far_site: Option<&[u8]>) -> EntryState {
        if at_site.first() == Some(&crate::int3::INT3)
            || at_far_site.and_then(|b| b.first()) == Some(&crate::int3::INT3)
        {
            return EntryState::Int3;
        }
        let jump_at = |at: u64, b: &[u8]| -> Option<u64> {
            (b.len() >= 5 && b[0] == 0xe9)
                .then(|| (at + 5).wrapping_add(i32::from_le_bytes([b[1], b[2], b[3], b[4]]) as i64 as u64))
        };
        match &self.kind {
            EntryKind::PrePad {
                far_site,
                far_original,
                ..
            } => {
                let far = at_far_site.unwrap_or(&[]);
                if at_site == self.original.as_slice() && far == far_original.as_slice() {
                    return EntryState::Original;
                }
                // The far jump alone (the entry write not done yet) still counts as original code running.
                if at_site == self.original.as_slice() && jump_at(*far_site, far).is_some() {
                    return EntryState::Original;
                }
                match (encode_jmp_rel8(self.site, *far_site), jump_at(*far_site, far)) {
                    (Ok(short), Some(t)) if at_site == short.as_slice() => EntryState::Jump(t),
                    _ => EntryState::Foreign,
                }
            }
            _ if at_site == self.original.as_slice() => EntryState::Original,
            _ => jump_at(self.site, at_site).map_or(EntryState::Foreign, EntryState::Jump),
        }
    }

    /// True if the entry's `jmp rel32` reaches `dest` directly.
    pub fn reaches(&self, dest: u64) -> bool {
        rel32_reaches(self.jump_site(), dest)
    }
}
