//! relive-unwind: framehop glue, signal frames, stub frames and the reliable/unreliable verdict
//! (DESIGN §4.5). Pure over a [`MemoryReader`]: no process access here.
//!
//! A stack is [`Verdict::Reliable`] only if unwinding ends at a thread root within the depth
//! limit. A root is a frame whose CFI marks the return address undefined (glibc's `_start`,
//! `clone` and `clone3` use `cfi_undefined rip`); framehop's own "clean end" is not trusted, since
//! it also ends on a zero frame pointer or at a signal trampoline.
#![forbid(unsafe_code)]

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _};
use relive_elf::{ElfImage, FileBytes, Svma};
use serde::Serialize;
use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// The default depth limit (DESIGN §4.5).
pub const DEFAULT_MAX_DEPTH: usize = 100;

/// Reads target memory (stack words, signal frames).
pub trait MemoryReader {
    fn read_u64(&mut self, addr: u64) -> Option<u64>;
}

impl<F: FnMut(u64) -> Option<u64>> MemoryReader for F {
    fn read_u64(&mut self, addr: u64) -> Option<u64> {
        self(addr)
    }
}

/// The registers unwinding starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StartRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// How a frame's PC was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FrameKind {
    /// The thread's current PC (the innermost frame).
    Live,
    /// A return address: the call is at `pc - 1`.
    Return,
    /// The PC interrupted by a signal, recovered from the signal frame's saved ucontext.
    SignalInterrupted,
    /// The `rt_sigreturn` trampoline (glibc's `__restore_rt`) a signal handler returns to.
    SignalTrampoline,
    /// A PC or return address in a caller-registered code range without CFI (relive's stubs,
    /// DESIGN §4.5): the function `label` counts as active on this stack.
    Stub { label: String },
}

/// One frame of a stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frame {
    pub pc: u64,
    #[serde(flatten)]
    pub kind: FrameKind,
}

impl Frame {
    /// The address to symbolize: `pc - 1` for return addresses (inside the call instruction).
    pub fn lookup_pc(&self) -> u64 {
        match self.kind {
            FrameKind::Return => self.pc.wrapping_sub(1),
            _ => self.pc,
        }
    }
}

/// Why a stack is not reliable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Unreliable {
    #[error("more than {max} frames without reaching a thread root (depth limit; recursion?)")]
    DepthLimit { max: usize },
    #[error("unwinding failed at pc {pc:#x}: {detail}")]
    UnwindError { pc: u64, detail: String },
    #[error("the stack ended at pc {pc:#x}, which is not a thread root (_start, clone, clone3)")]
    NoRoot { pc: u64 },
    #[error("pc {pc:#x} is in no known module (JIT or anonymous code without unwind info)")]
    UnknownCode { pc: u64 },
    #[error("pc {pc:#x} is in code without unwind information (no .eh_frame FDE covers it)")]
    NoCfi { pc: u64 },
    #[error("cannot read the signal frame at {addr:#x} (pc {pc:#x})")]
    BadSignalFrame { pc: u64, addr: u64 },
    #[error("return address {pc:#x} points into code without CFI ({label}); cannot unwind through it")]
    StubNotInnermost { pc: u64, label: String },
}

/// The verdict on a stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Reliable,
    Unreliable(Unreliable),
}

impl Verdict {
    pub fn is_reliable(&self) -> bool {
        matches!(self, Verdict::Reliable)
    }
}

/// An unwound stack, innermost frame first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stack {
    pub frames: Vec<Frame>,
    pub verdict: Verdict,
}

impl Stack {
    /// Whether any frame's PC (return addresses looked up at `pc - 1`) lies in one of `ranges`
    /// (AVMA ranges of functions): the C5 "is this function on the stack?" check. Stub frames
    /// count through their labels ([`Stack::stub_labels`]), not through ranges.
    pub fn active_in(&self, ranges: &[Range<u64>]) -> bool {
        self.frames.iter().any(|f| {
            let pc = f.lookup_pc();
            ranges.iter().any(|r| r.contains(&pc))
        })
    }

    /// Labels of the registered code ranges (stubs) found on the stack.
    pub fn stub_labels(&self) -> impl Iterator<Item = &str> {
        self.frames.iter().filter_map(|f| match &f.kind {
            FrameKind::Stub { label } => Some(label.as_str()),
            _ => None,
        })
    }
}

/// Module bytes shared without copying: framehop wants `Deref<Target = [u8]>` per section.
#[derive(Clone, Default)]
struct Bytes {
    data: FileBytes,
    range: Range<usize>,
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[self.range.clone()]
    }
}

/// One module to unwind through.
#[derive(Debug, Clone)]
pub struct UnwindModule {
    pub name: String,
    /// The AVMA range the module's mappings cover.
    pub avma_range: Range<u64>,
    /// AVMA − SVMA.
    pub bias: u64,
    pub image: Arc<ElfImage>,
    /// The file's bytes (for the vDSO, its in-memory image).
    pub data: FileBytes,
}

struct ModInfo {
    m: UnwindModule,
}

/// The `rt_sigreturn` trampoline: `mov $15, %rax; syscall` (glibc's `__restore_rt`).
const SIGRETURN: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];
/// `struct rt_sigframe` after the handler's `ret`: rsp points at `uc`; `uc_mcontext.gregs` is at
/// offset 40 (uc_flags 8, uc_link 8, uc_stack 24).
const UC_GREGS: u64 = 40;
const REG_RBP: u64 = 10;
const REG_RSP: u64 = 15;
const REG_RIP: u64 = 16;

/// An unwinder for one process's modules.
pub struct Unwinder {
    fh: UnwinderX86_64<Bytes>,
    cache: CacheX86_64,
    mods: Vec<ModInfo>,
    extra: Vec<(Range<u64>, String)>,
    /// Return addresses inside stubs that call (relive's register-preserving thunks): the stub's frame
    /// size there (the caller's return address is at `[rsp + size]`), and the stub's label.
    return_sites: HashMap<u64, (u64, String)>,
    root_cache: HashMap<u64, Option<bool>>,
}

impl std::fmt::Debug for Unwinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unwinder")
            .field(
                "modules",
                &self.mods.iter().map(|m| &m.m.name).collect::<Vec<_>>(),
            )
            .field("extra", &self.extra)
            .finish()
    }
}

fn section_bytes(data: &FileBytes, s: &relive_elf::SectionRange) -> Option<Bytes> {
    let start = usize::try_from(s.file_offset).ok()?;
    let end = start.checked_add(usize::try_from(s.svma.end - s.svma.start).ok()?)?;
    (end <= data.len()).then(|| Bytes {
        data: data.clone(),
        range: start..end,
    })
}

impl Unwinder {
    /// Builds an unwinder over `modules` (files and the vDSO).
    pub fn new(modules: impl IntoIterator<Item = UnwindModule>) -> Unwinder {
        let mut u = Unwinder {
            fh: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            mods: Vec::new(),
            extra: Vec::new(),
            return_sites: HashMap::new(),
            root_cache: HashMap::new(),
        };
        for m in modules {
            u.add_module(m);
        }
        u
    }

    /// Adds one module (an object mapped since the unwinder was built, e.g. a patch library); what was
    /// parsed of the other modules is kept.
    pub fn add_module(&mut self, m: UnwindModule) {
        let img = &m.image;
        let info = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: img.text.as_ref().map(|s| s.svma.clone()),
            text: img.text.as_ref().and_then(|s| section_bytes(&m.data, s)),
            got_svma: img.got.as_ref().map(|s| s.svma.clone()),
            eh_frame_svma: img.eh_frame.as_ref().map(|s| s.svma.clone()),
            eh_frame: img.eh_frame.as_ref().and_then(|s| section_bytes(&m.data, s)),
            eh_frame_hdr_svma: img.eh_frame_hdr.as_ref().map(|s| s.svma.clone()),
            eh_frame_hdr: img.eh_frame_hdr.as_ref().and_then(|s| section_bytes(&m.data, s)),
            ..Default::default()
        };
        self.fh
            .add_module(Module::new(m.name.clone(), m.avma_range.clone(), m.bias, info));
        self.mods.push(ModInfo { m });
    }

    /// Whether a module covering `avma_range` from `name` is known already.
    pub fn has_module(&self, name: &str, avma_range: &Range<u64>) -> bool {
        self.mods
            .iter()
            .any(|m| m.m.name == name && m.m.avma_range == *avma_range)
    }

    /// Registers a code range without CFI (a stub of relive, DESIGN §4.5). A PC in it makes the
    /// stack "active in `label`"; stubs don't move rsp, so the return address is at `[rsp]`.
    pub fn add_code_range(&mut self, range: Range<u64>, label: impl Into<String>) {
        self.extra.push((range, label.into()));
    }

    /// Removes a registered code range, and the return sites inside it.
    pub fn remove_code_range(&mut self, start: u64) {
        let gone: Vec<Range<u64>> = self
            .extra
            .iter()
            .filter(|(r, _)| r.start == start)
            .map(|(r, _)| r.clone())
            .collect();
        self.extra.retain(|(r, _)| r.start != start);
        self.return_sites
            .retain(|ra, _| !gone.iter().any(|r| r.contains(ra)));
    }

    /// A stub that calls (a register-preserving thunk, DESIGN §4.3a) has a frame while its callee runs: at
    /// the return address `ra` of its call, the caller's return address is at `[rsp + frame_size]`. A
    /// stack through it then unwinds reliably, with the stub as a frame of its own (labelled `label`).
    pub fn add_return_site(&mut self, ra: u64, frame_size: u64, label: impl Into<String>) {
        self.return_sites.insert(ra, (frame_size, label.into()));
    }

    /// Whether `avma` is the start of an `rt_sigreturn` trampoline (glibc's `__restore_rt`: the exact
    /// instruction bytes, in an executable segment of a known module). Checked where a frame needs it, from
    /// the module's bytes, rather than by scanning every object's code up front.
    pub fn is_sigreturn_trampoline(&self, avma: u64) -> bool {
        let Some(m) = self.module_for(avma) else {
            return false;
        };
        let svma = Svma(avma.wrapping_sub(m.bias));
        let len = SIGRETURN.len() as u64;
        let in_code = m
            .image
            .segments
            .iter()
            .any(|s| s.exec && svma.0 >= s.vaddr.0 && svma.0.saturating_add(len) <= s.vaddr.0 + s.filesz);
        in_code
            && m.image
                .svma_to_offset(svma)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| m.data.get(o..o.saturating_add(SIGRETURN.len())))
                == Some(&SIGRETURN[..])
    }

    fn module_for(&self, avma: u64) -> Option<&UnwindModule> {
        self.mods
            .iter()
            .map(|m| &m.m)
            .find(|m| m.avma_range.contains(&avma))
    }

    fn stub_for(&self, avma: u64) -> Option<&str> {
        self.extra
            .iter()
            .find(|(r, _)| r.contains(&avma))
            .map(|(_, l)| l.as_str())
    }

    /// What the CFI says at `lookup`: `Some(true)` a thread root (return address undefined),
    /// `Some(false)` an ordinary row, `None` no FDE covers it. Cached per address.
    fn cfi_at(&mut self, lookup: u64) -> Option<bool> {
        if let Some(&r) = self.root_cache.get(&lookup) {
            return r;
        }
        let r = self
            .module_for(lookup)
            .and_then(|m| relive_elf::ra_undefined_at(&m.image, &m.data, Svma(lookup.wrapping_sub(m.bias))));
        self.root_cache.insert(lookup, r);
        r
    }

    /// Unwinds from `regs`, reading the stack through `reader`, up to `max_depth` frames.
    pub fn unwind(&mut self, regs: StartRegs, reader: &mut dyn MemoryReader, max_depth: usize) -> Stack {
        let mut frames = Vec::new();
        let verdict = self.unwind_inner(regs, reader, max_depth, &mut frames);
        Stack {
            frames,
            verdict: verdict.map_or_else(Verdict::Unreliable, |()| Verdict::Reliable),
        }
    }

    fn unwind_inner(
        &mut self,
        start: StartRegs,
        reader: &mut dyn MemoryReader,
        max_depth: usize,
        frames: &mut Vec<Frame>,
    ) -> Result<(), Unreliable> {
        let mut regs = UnwindRegsX86_64::new(start.ip, start.sp, start.bp);
        let mut addr = FrameAddress::from_instruction_pointer(start.ip);
        let mut kind = FrameKind::Live;
        // A thread stopped on the trampoline itself (after the handler returned).
        if let Some(off) = self.trampoline_offset(start.ip) {
            frames.push(Frame {
                pc: start.ip,
                kind: FrameKind::SignalTrampoline,
            });
            let _ = off;
            let (ip, sp, bp) = self.signal_frame(start.ip, start.sp, reader)?;
            regs = UnwindRegsX86_64::new(ip, sp, bp);
            addr = FrameAddress::from_instruction_pointer(ip);
            kind = FrameKind::SignalInterrupted;
        }
        let mut read = |a: u64| reader.read_u64(a).ok_or(());
        loop {
            let pc = addr.address();
            let lookup = addr.address_for_lookup();
            if frames.len() >= max_depth {
                return Err(Unreliable::DepthLimit { max: max_depth });
            }
            // relive's own code has no CFI. A thunk's frame, at the return address of its call: the caller's
            // return address is at [rsp + the frame size recorded for it]. A stub (innermost only): at [rsp].
            let stub = if matches!(kind, FrameKind::Return)
                && let Some((size, label)) = self.return_sites.get(&pc)
            {
                Some((*size, label.clone()))
            } else if let Some(label) = self.stub_for(lookup) {
                if !matches!(kind, FrameKind::Live | FrameKind::SignalInterrupted) {
                    frames.push(Frame {
                        pc,
                        kind: FrameKind::Stub {
                            label: label.to_string(),
                        },
                    });
                    return Err(Unreliable::StubNotInnermost {
                        pc,
                        label: label.to_string(),
                    });
                }
                Some((0, label.to_string()))
            } else {
                None
            };
            if let Some((size, label)) = stub {
                frames.push(Frame {
                    pc,
                    kind: FrameKind::Stub { label },
                });
                let slot = regs.sp() + size;
                let ra = read(slot).map_err(|()| Unreliable::UnwindError {
                    pc,
                    detail: format!("cannot read the return address at {slot:#x}"),
                })?;
                regs.set_sp(slot + 8);
                regs.set_ip(ra);
                addr = FrameAddress::from_return_address(ra).ok_or(Unreliable::UnwindError {
                    pc,
                    detail: "null return address".into(),
                })?;
                kind = FrameKind::Return;
                continue;
            }
            frames.push(Frame {
                pc,
                kind: kind.clone(),
            });
            if self.module_for(lookup).is_none() {
                return Err(Unreliable::UnknownCode { pc });
            }
            // Without CFI framehop would guess with frame pointers and could skip frames: a stack
            // that looks complete but hides a function. Never trust that (DESIGN §4.5).
            if self.cfi_at(lookup).is_none() {
                return Err(Unreliable::NoCfi { pc });
            }
            match self.fh.unwind_frame(addr, &mut regs, &mut self.cache, &mut read) {
                Ok(Some(ra)) => {
                    if self.is_sigreturn_trampoline(ra) {
                        // The caller is the signal trampoline: record it, then continue from the
                        // interrupted context saved in the ucontext (PROTOTYPE §2).
                        if frames.len() >= max_depth {
                            return Err(Unreliable::DepthLimit { max: max_depth });
                        }
                        frames.push(Frame {
                            pc: ra,
                            kind: FrameKind::SignalTrampoline,
                        });
                        let sp = regs.sp();
                        let uc = sp;
                        let base = uc + UC_GREGS;
                        let rd = |r: &mut dyn FnMut(u64) -> Result<u64, ()>, i: u64| r(base + 8 * i);
                        let ip = rd(&mut read, REG_RIP)
                            .map_err(|()| Unreliable::BadSignalFrame { pc: ra, addr: uc })?;
                        let nsp = rd(&mut read, REG_RSP)
                            .map_err(|()| Unreliable::BadSignalFrame { pc: ra, addr: uc })?;
                        let bp = rd(&mut read, REG_RBP)
                            .map_err(|()| Unreliable::BadSignalFrame { pc: ra, addr: uc })?;
                        regs = UnwindRegsX86_64::new(ip, nsp, bp);
                        addr = FrameAddress::from_instruction_pointer(ip);
                        kind = FrameKind::SignalInterrupted;
                    } else {
                        addr = FrameAddress::from_return_address(ra).ok_or(Unreliable::UnwindError {
                            pc,
                            detail: "null return address".into(),
                        })?;
                        kind = FrameKind::Return;
                    }
                }
                Ok(None) => {
                    return if self.cfi_at(lookup) == Some(true) {
                        Ok(())
                    } else {
                        Err(Unreliable::NoRoot { pc })
                    };
                }
                Err(e) => {
                    return Err(Unreliable::UnwindError {
                        pc,
                        detail: e.to_string(),
                    });
                }
            }
        }
    }

    fn trampoline_offset(&self, ip: u64) -> Option<u64> {
        // At the `mov` (offset 0) or the `syscall` (offset 7) rsp points at the ucontext.
        [0, 7].into_iter().find(|&off| {
            ip.checked_sub(off)
                .is_some_and(|t| self.is_sigreturn_trampoline(t))
        })
    }

    fn signal_frame(
        &self,
        pc: u64,
        sp: u64,
        reader: &mut dyn MemoryReader,
    ) -> Result<(u64, u64, u64), Unreliable> {
        let base = sp + UC_GREGS;
        let r = |reader: &mut dyn MemoryReader, i: u64| {
            reader
                .read_u64(base + 8 * i)
                .ok_or(Unreliable::BadSignalFrame { pc, addr: sp })
        };
        Ok((r(reader, REG_RIP)?, r(reader, REG_RSP)?, r(reader, REG_RBP)?))
    }
}
