//! Entries and stubs (DESIGN §4.3, §4.4): the stub page of each patched function, the dispatchers, and the
//! entry writes, all done in one brief stop-all window whose PC check covers every frame of every thread,
//! PCs saved in signal frames included (PAUSE-FREE.md §2).

use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use relive_core::{Code, EntryTarget, FuncId};
use relive_proc::PageCacheReader;
use relive_unwind::FrameKind;
use relive_x86::{
    Direction, Dispatch, EntryWrite, StateWidth, TlsSlot, encode_abs_jump, encode_dispatcher, rel32_reaches,
};

use super::doc::{
    ABSJMP_OFF, DISPATCH_OFF, EntryRec, FRESH_OFF, OLD_PATH_MAX, OLD_PATH_OFF, PlanRec, STUB_PAGE,
};
use super::session::{Session, proc_err};
use super::{Fail, progress::Progress};

/// What one stop-all window must do.
#[derive(Debug, Default)]
pub struct Batch {
    /// Stub code written into slots no entry leads to (dispatchers, absolute jumps), before the entries.
    pub stub_writes: Vec<(u64, Vec<u8>)>,
    /// Entry writes, in order (each at most 8 bytes: one `pwrite`).
    pub writes: Vec<(FuncId, EntryWrite)>,
    /// Code no thread may be executing (or have saved in a frame) while the window writes.
    pub guards: Vec<Range<u64>>,
    /// The new value of each touched entry's `current`.
    pub currents: Vec<(FuncId, u64)>,
    /// What the writes do, for the progress line of a stop-all window ("" when the targets are mixed).
    pub purpose: &'static str,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.stub_writes.is_empty() && self.writes.is_empty()
    }
}

/// Statistics of one entry-write window.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Window {
    /// How the entries were written: `"stop-all"` (every thread stopped, every PC checked) or `"int3"` (the
    /// stop-free protocol of PAUSE-FREE.md, done by the agent: no thread stopped).
    pub mode: &'static str,
    /// Threads stopped (0 for `"int3"`).
    pub threads: usize,
    /// Threads that hit a site's int3 during the window and were sent on by the agent's handler.
    pub int3_hits: u64,
    /// Microseconds the int3s were in place (first int3 written to last sync): calls of the sites trapped
    /// then, a few µs each; nobody stopped.
    pub int3_us: u64,
    /// Attempts needed (a blocked PC check resumes everything and retries).
    pub attempts: u32,
    /// Microseconds from the first stop to the last resume of the successful attempt.
    pub window_us: u64,
    /// Threads switched inside the window (DESIGN §4.5, done while every thread is stopped anyway).
    #[serde(skip)]
    pub switched: usize,
}

/// Makes sure `func` has a stub page near its entry, with the old-path copy written, and returns its record.
/// The page is new, so no thread can be in it: it is filled without any stop.
pub fn ensure_stub(s: &mut Session, func: &FuncId, plan: &relive_x86::EntryPlan) -> Result<(), Fail> {
    if s.doc.entry(func).is_some() {
        return Ok(());
    }
    let pid = s.pid;
    let near = plan.site;
    let page = s
        .conn
        .map_stubs(near, STUB_PAGE)
        .map_err(|e| Fail::Error(anyhow!(e)))?;
    if page < plan.stub_window.start || page + STUB_PAGE > plan.stub_window.end {
        let _ = s.conn.unmap(page, STUB_PAGE);
        return Err(Fail::Error(anyhow!(
            "the stub page for {} (entry {:#x}) in pid {pid} landed at {page:#x}, outside the reachable window \
             {:#x}..{:#x}; the address space near the function is full",
            plan.function,
            plan.site,
            plan.stub_window.start,
            plan.stub_window.end
        )));
    }
    let old_path = match plan.old_path_direct() {
        Some(a) => a,
        None => {
            let at = page + OLD_PATH_OFF;
            let r = plan
                .encode_old_path(at)
                .map_err(|e| Fail::Refused(anyhow!("pid {pid}: {e}")))?;
            if r.code.len() as u64 > OLD_PATH_MAX {
                return Err(Fail::Refused(anyhow!(
                    "the relocated prologue of {} in pid {pid} is {} bytes, more than the {OLD_PATH_MAX} a stub holds",
                    plan.function,
                    r.code.len()
                )));
            }
            relive_proc::write_code(pid, at, &r.code)
                .map_err(|e| proc_err(pid, "cannot fill a stub page", e))?;
            at
        }
    };
    s.doc.entries.push(EntryRec {
        func: func.clone(),
        plan: PlanRec::from(plan),
        stub: page,
        old_path,
        current: 0,
        fresh: true,
    });
    s.doc
        .model
        .register_stub(func, relive_core::Range::new(page, page + STUB_PAGE))
        .map_err(|e| Fail::Error(anyhow!("pid {pid}: {e}")))?;
    s.unwinder
        .add_code_range(page..page + STUB_PAGE, format!("relive stub of {}", func.name));
    Ok(())
}

/// Reads where an entry's jump points now (0: the original bytes), from the target's memory: the truth after
/// a controller was killed between writing the document and writing the entry.
pub fn actual_current(s: &Session, rec: &EntryRec) -> Result<u64, Fail> {
    let plan = rec.plan.plan();
    let at = plan.jump_site();
    let mut b = [0u8; 5];
    relive_proc::read_memory(s.pid, at, &mut b).map_err(|e| proc_err(s.pid, "cannot read an entry", e))?;
    let original: &[u8] = match &rec.plan.kind {
        super::doc::KindRec::PrePad { far_original, .. } => far_original,
        _ => &rec.plan.original,
    };
    if b[..] == original[..5.min(original.len())] {
        return Ok(0);
    }
    if b[0] == 0xe9 {
        let rel = i32::from_le_bytes([b[1], b[2], b[3], b[4]]) as i64;
        return Ok((at as i64 + 5 + rel) as u64);
    }
    Err(Fail::Error(anyhow!(
        "the entry of {} at {at:#x} in pid {} holds {b:02x?}: neither its original bytes nor a jump relive wrote; \
         another tool changed it (a debugger breakpoint, a uprobe, another patcher); remove it and retry",
        rec.plan.function,
        s.pid
    )))
}

fn code_addr(s: &Session, rec: &EntryRec, code: &Code) -> Result<u64, Fail> {
    match code {
        Code::Original => Ok(rec.old_path),
        Code::New { patch, .. } => s
            .doc
            .patch(patch)
            .and_then(|p| p.entry_point(&rec.func))
            .ok_or_else(|| {
                Fail::Error(anyhow!(
                    "pid {}: patch {patch} has no loaded version of {}",
                    s.pid,
                    rec.func.name
                ))
            }),
    }
}

/// The end mark written after code in a fresh slot: `int3`, never executed (the code ends in a jump), and
/// not zero, so that the first zero byte after it is provably unused (see [`FRESH_OFF`]).
const FRESH_END_MARK: u8 = 0xcc;

/// The next fresh slot of `len` bytes (plus its end mark) in the entry's page, or `None` when the page has
/// none left or has no fresh slots. Read from the target's memory, not from the document: code is written
/// before an entry leads to it and never erased, so every slot an entry ever led to lies before the last
/// non-zero byte, even after a controller was killed before it saved the document (DESIGN §4.8).
fn fresh_slot(s: &Session, rec: &EntryRec, len: u64) -> Result<Option<u64>, Fail> {
    if !rec.fresh {
        return Ok(None);
    }
    let mut area = vec![0u8; (STUB_PAGE - FRESH_OFF) as usize];
    relive_proc::read_memory(s.pid, rec.stub + FRESH_OFF, &mut area)
        .map_err(|e| proc_err(s.pid, "cannot read a stub page", e))?;
    let used = area.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1);
    let at = FRESH_OFF + used.next_multiple_of(16);
    Ok((at + len < STUB_PAGE).then_some(rec.stub + at))
}

/// `code` followed by the fresh-slot end mark.
fn with_end_mark(code: &[u8]) -> Vec<u8> {
    let mut v = code.to_vec();
    v.push(FRESH_END_MARK);
    v
}

/// Plans the writes that make every entry in `targets` lead where the model says.
pub fn plan_batch(s: &Session, targets: &[(FuncId, EntryTarget)]) -> Result<Batch, Fail> {
    let mut b = Batch {
        purpose: batch_purpose(targets.iter().map(|(_, t)| t)),
        ..Batch::default()
    };
    for (func, target) in targets {
        let rec = s.doc.entry(func).ok_or_else(|| {
            Fail::Error(anyhow!(
                "pid {}: no stub page was prepared for {} (internal error)",
                s.pid,
                func.name
            ))
        })?;
        let plan = rec.plan.plan();
        let current = actual_current(s, rec)?;
        let free = |offs: &[u64; 2], len: u64| -> u64 {
            let a = rec.stub + offs[0];
            if current >= a && current < a + len {
                rec.stub + offs[1]
            } else {
                a
            }
        };
        let dest = match target {
            EntryTarget::Original => None,
            EntryTarget::Direct { .. } => {
                let to = code_addr(s, rec, &target.code_for(relive_core::PatchState::Idle))?;
                if plan.reaches(to) {
                    Some(to)
                } else if holds(s, rec, current, &ABSJMP_OFF, &encode_abs_jump(to))? {
                    // The entry already leads to this very jump: nothing to write (`relive transition`
                    // with nothing to change must change nothing).
                    Some(current)
                } else if let Some(slot) = fresh_slot(s, rec, 16)? {
                    b.stub_writes.push((slot, with_end_mark(&encode_abs_jump(to))));
                    Some(slot)
                } else {
                    let slot = free(&ABSJMP_OFF, 16);
                    b.stub_writes.push((slot, encode_abs_jump(to).to_vec()));
                    b.guards.push(slot..slot + 16);
                    Some(slot)
                }
            }
            EntryTarget::Dispatch {
                patched,
                unpatched,
                idle,
            } => {
                let new_version = code_addr(s, rec, patched)?;
                let old_version = code_addr(s, rec, unpatched)?;
                let direction = if idle == unpatched {
                    Direction::Patching
                } else {
                    Direction::Unpatching
                };
                let tls = TlsSlot {
                    tpoff: i32::try_from(s.tpoff).map_err(|_| {
                        Fail::Error(anyhow!(
                            "pid {}: the agent's TLS offset {} does not fit 32 bits",
                            s.pid,
                            s.tpoff
                        ))
                    })?,
                    width: StateWidth::Qword,
                    patched: s.slot_value(relive_core::PatchState::Patched) as u32,
                    unpatched: s.slot_value(relive_core::PatchState::Unpatched) as u32,
                };
                let d = Dispatch {
                    slot: tls,
                    direction,
                    new_version,
                    old_version,
                };
                let enc = |at: u64| {
                    encode_dispatcher(at, &d).map_err(|e| Fail::Error(anyhow!("pid {}: {e}", s.pid)))
                };
                let here = if in_slot(rec, current, &DISPATCH_OFF) {
                    Some(enc(current)?)
                } else {
                    None
                };
                if let Some(code) = here
                    && holds(s, rec, current, &DISPATCH_OFF, &code)?
                {
                    // The entry already leads to this very dispatcher (same versions, direction, slot
                    // values): rewriting it into the other slot would change .text for nothing.
                    Some(current)
                } else if let Some(slot) = fresh_slot(s, rec, 64)? {
                    b.stub_writes.push((slot, with_end_mark(&enc(slot)?)));
                    Some(slot)
                } else {
                    let slot = free(&DISPATCH_OFF, 64);
                    let code = enc(slot)?;
                    b.stub_writes.push((slot, code));
                    b.guards.push(slot..slot + 64);
                    Some(slot)
                }
            }
        };
        let writes = match (current, dest) {
            (0, None) => Ok(vec![]),
            (0, Some(d)) => plan.install(d),
            (c, None) => plan.restore(c),
            (c, Some(d)) if c == d => Ok(vec![]),
            (c, Some(d)) => plan.retarget(c, d),
        }
        .map_err(|e| Fail::Error(anyhow!("pid {}: {e}", s.pid)))?;
        debug_assert!(dest.is_none_or(|d| rel32_reaches(plan.jump_site(), d)));
        for w in writes {
            b.writes.push((func.clone(), w));
        }
        b.currents.push((func.clone(), dest.unwrap_or(0)));
    }
    Ok(b)
}

/// Whether the entry currently leads (`current`) to one of the stub slots `offs` of its page, or to one of
/// its fresh slots, and that slot already holds exactly `code`.
fn holds(s: &Session, rec: &EntryRec, current: u64, offs: &[u64; 2], code: &[u8]) -> Result<bool, Fail> {
    if !in_slot(rec, current, offs) || current + code.len() as u64 > rec.stub + STUB_PAGE {
        return Ok(false);
    }
    let mut cur = vec![0u8; code.len()];
    relive_proc::read_memory(s.pid, current, &mut cur)
        .map_err(|e| proc_err(s.pid, "cannot read a stub slot", e))?;
    Ok(cur == code)
}

/// Whether `at` is one of the slots `offs` of the entry's page or in its fresh slots.
fn in_slot(rec: &EntryRec, at: u64, offs: &[u64; 2]) -> bool {
    offs.iter().any(|o| rec.stub + o == at)
        || (rec.fresh && (rec.stub + FRESH_OFF..rec.stub + STUB_PAGE).contains(&at))
}

/// Whether any PC of this thread's stack forbids the batch now, and which.
fn blocking_pc(b: &Batch, pcs: &[(u64, &FrameKind)]) -> Option<u64> {
    for (pc, _kind) in pcs {
        if b.writes.iter().any(|(_, w)| w.blocks_pc(*pc)) || b.guards.iter().any(|g| g.contains(pc)) {
            return Some(*pc);
        }
    }
    None
}

/// Runs the batch: stop every thread, check every PC (live, return addresses, PCs saved in signal frames),
/// write stubs then entries, resume. A blocked check resumes everything and retries a little later.
pub fn execute(s: &mut Session, b: &Batch, progress: &mut dyn Progress) -> Result<Window, Fail> {
    let pid = s.pid;
    if b.is_empty() {
        for (f, c) in &b.currents {
            if let Some(e) = s.doc.entry_mut(f) {
                e.current = *c;
            }
        }
        return Ok(Window::default());
    }
    if let Some(sites) = stop_free_sites(s, b) {
        match write_stop_free(s, b, &sites) {
            Ok(w) => return Ok(w),
            Err(why) => tracing::info!(pid, "stop-free entry write not possible: {why}"),
        }
    }
    progress.step(&format!(
        "{}{}",
        writing_under_one_stop(b.writes.len()),
        b.purpose
    ));
    let needs_full_check = b.writes.iter().any(|(_, w)| !w.stop_free);
    let limit = s.entry_write_limit;
    let deadline = Instant::now() + limit;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let t0 = Instant::now();
        let stopped = relive_proc::stop_all(pid).map_err(|e| proc_err(pid, "cannot stop the threads", e))?;
        let mut blocked: Option<(i32, String)> = None;
        let mut reader = PageCacheReader::new(pid);
        let mut stacks: Vec<(i32, u64, relive_unwind::Stack)> = Vec::with_capacity(stopped.threads.len());
        for t in &stopped.threads {
            let regs = t.regs().map_err(|e| proc_err(pid, "cannot read registers", e))?;
            s.fs_base.insert(t.tid(), regs.fs_base);
            let stack = relive_proc::unwind_regs(&mut s.unwinder, &regs, &mut reader, s.max_depth);
            let mut pcs: Vec<(u64, &FrameKind)> = stack.frames.iter().map(|f| (f.pc, &f.kind)).collect();
            let live = FrameKind::Live;
            pcs.push((regs.rip, &live));
            if let Some(pc) = blocking_pc(b, &pcs) {
                blocked = Some((t.tid(), format!("pc {pc:#x}")));
                break;
            }
            if !stack.verdict.is_reliable() && needs_full_check {
                // A frame we could not see may be a signal frame holding an interior PC (PAUSE-FREE.md §2).
                // Writes that replace one whole instruction by another (a jump retargeted, original bytes back
                // over a jump) cannot be entered half-way, so they need no full stack.
                blocked = Some((t.tid(), format!("unreliable stack ({:?})", stack.verdict)));
                break;
            }
            stacks.push((t.tid(), regs.fs_base, stack));
        }
        if let Some((tid, why)) = blocked {
            stopped
                .resume()
                .map_err(|e| proc_err(pid, "cannot resume the threads", e))?;
            if Instant::now() > deadline {
                let next = match s.doc.model.transition() {
                    Some(t) => format!(
                        "; the transition of patch {p} stays pending with no entry changed: `relive transition \
                         {pid}` retries it, `relive disable {pid} {p}` cancels it",
                        p = t.patch
                    ),
                    None => "; retry".to_owned(),
                };
                return Err(Fail::Error(anyhow!(
                    "pid {pid}: for {limit:?}, thread {tid} kept blocking the entry writes ({why}); no entry was \
                     written{next}"
                )));
            }
            std::thread::sleep(Duration::from_micros(500 + 200 * attempts.min(20) as u64));
            continue;
        }
        let threads = stopped.threads.len();
        for (at, code) in &b.stub_writes {
            relive_proc::write_code(pid, *at, code).map_err(|e| proc_err(pid, "cannot write a stub", e))?;
        }
        for (func, w) in &b.writes {
            let mut cur = vec![0u8; w.bytes.len()];
            relive_proc::read_memory(pid, w.addr, &mut cur)
                .map_err(|e| proc_err(pid, "cannot read an entry", e))?;
            if cur == w.bytes {
                continue;
            }
            if cur != w.expect {
                let _ = stopped.resume();
                return Err(Fail::Error(anyhow!(
                    "the entry of {} at {:#x} in pid {pid} holds {cur:02x?}, expected {:02x?}; another tool changed it",
                    func.name,
                    w.addr,
                    w.expect
                )));
            }
            relive_proc::write_code(pid, w.addr, &w.bytes)
                .map_err(|e| proc_err(pid, "cannot write an entry", e))?;
        }
        // DESIGN §4.5: every thread is stopped and unwound already; a started transition switches each one
        // whose stack allows it now, so the first switching round needs to visit only the rest. (The stacks
        // are the ones the PC check just took; nothing ran since.)
        let mut switched = 0;
        if s.doc
            .model
            .transition()
            .is_some_and(|t| t.phase == relive_core::Phase::Started)
        {
            let mut st = super::switch::SwitchStats::default();
            let mut r = Ok(None);
            for (tid, fs_base, stack) in stacks {
                r = super::switch::settle(s, tid, fs_base, |_| stack, &mut st);
                if r.is_err() {
                    break;
                }
            }
            if let Err(e) = r {
                let _ = stopped.resume();
                return Err(e);
            }
            switched = st.switched;
            s.settled_all = true;
        }
        stopped
            .resume()
            .map_err(|e| proc_err(pid, "cannot resume the threads", e))?;
        let window_us = t0.elapsed().as_micros() as u64;
        for (f, c) in &b.currents {
            if let Some(e) = s.doc.entry_mut(f) {
                e.current = *c;
            }
        }
        return Ok(Window {
            mode: "stop-all",
            threads,
            int3_hits: 0,
            int3_us: 0,
            attempts,
            window_us,
            switched,
        });
    }
}

/// The agent's int3 site list for this batch when every write may be done without stopping the process
/// (PAUSE-FREE.md §2), or `None`. Each write must replace one whole instruction by another
/// ([`EntryWrite::stop_free`]), the batch must not rewrite a stub slot an entry ever led to (no guards: fresh
/// slots only), and executing the new bytes must be something the agent's handler can do in one step: a jump
/// (to its target), a NOP (to the next byte), or the entry's first displaced instructions back (to the
/// old-path copy, which runs them relocated). Functions of the C library are left to the stop-all: glibc
/// runs code with every signal blocked by raw syscalls (a new thread's start, posix_spawn's child), and a
/// blocked SIGTRAP kills the process on the int3 (PAUSE-FREE.md §4). `RELIVE_ENTRY_WRITES=stop-all` turns the
/// stop-free path off.
fn stop_free_sites(s: &Session, b: &Batch) -> Option<Vec<relive_abi::proto::PokeSite>> {
    if std::env::var("RELIVE_ENTRY_WRITES").is_ok_and(|v| v == "stop-all") || !b.guards.is_empty() {
        return None;
    }
    let mut sites = Vec::with_capacity(b.writes.len());
    for (func, w) in &b.writes {
        let libc = func.object.path.as_deref().is_some_and(|p| {
            let name = p.rsplit('/').next().unwrap_or(p);
            name.starts_with("libc.so") || name.starts_with("ld-linux") || name.starts_with("libc-")
        });
        if libc
            || !w.stop_free
            || !(2..=8).contains(&w.bytes.len())
            || w.bytes.len() != w.expect.len()
            || w.bytes[0] == relive_x86::INT3
            || w.expect[0] == relive_x86::INT3
        {
            return None;
        }
        let rec = s.doc.entry(func)?;
        let plan = rec.plan.plan();
        let jump = matches!(w.bytes[0], 0xe9 | 0xeb);
        let dest = if !jump && w.addr == plan.site && w.bytes == plan.original {
            // The entry's original instruction back whole: the old path runs it (the relocated copy of a
            // displaced instruction, or, after a pad's NOPs, the code they lead to). Checked first: a jump
            // (relive's own writes) is read without iced-x86's decoder, and so is this, which saves a
            // `disable` building the decoder's tables (about 1 ms).
            rec.old_path
        } else {
            relive_x86::int3_emulation(w.addr, &w.bytes)?
        };
        sites.push(relive_abi::proto::PokeSite {
            addr: w.addr,
            bytes: w.bytes.clone(),
            expect: w.expect.clone(),
            dest,
        });
    }
    Some(sites)
}

/// How recent a signal mask the switching loop read must be to be vouched for: the agent's own reading
/// of every mask takes about as long with a few thousand threads, so the guarantee is of the same kind
/// (a thread that keeps SIGTRAP blocked is caught; one that blocks it just now, by a raw system call, is not).
const VOUCH_FOR: Duration = Duration::from_millis(100);

/// Writes the batch without stopping any thread: the stub code first (fresh slots no thread can be in), then
/// every entry through the agent's int3 protocol (int3, sync, tail, sync, head, sync; the agent does it in
/// its service thread, so a controller killed meanwhile leaves a finished write). Refused by the agent (a
/// thread blocks SIGTRAP, a debugger is attached, the agent was injected after start and cannot keep
/// SIGTRAP unblocked, an older agent) with every entry untouched: the caller falls back to the stop-all.
fn write_stop_free(
    s: &mut Session,
    b: &Batch,
    sites: &[relive_abi::proto::PokeSite],
) -> Result<Window, String> {
    let pid = s.pid;
    let t0 = Instant::now();
    for (at, code) in &b.stub_writes {
        relive_proc::write_code(pid, *at, code)
            .map_err(|e| format!("cannot write a stub at {at:#x}: {e}"))?;
    }
    // Threads whose masks the switching loop has just read (a completion right after the last round): the
    // agent reads only the others' from /proc, about 10 µs a thread.
    let vouched: Vec<i32> = s
        .masks_seen
        .iter()
        .filter(|(_, at)| at.elapsed() < VOUCH_FOR)
        .map(|(tid, _)| *tid)
        .collect();
    let r = s
        .conn
        .poke_text_vouched(sites, &vouched)
        .map_err(|e| e.to_string())?;
    for (f, c) in &b.currents {
        if let Some(e) = s.doc.entry_mut(f) {
            e.current = *c;
        }
    }
    Ok(Window {
        mode: "int3",
        threads: 0,
        int3_hits: r.hits,
        int3_us: r.int3_ns / 1000,
        attempts: 1,
        window_us: t0.elapsed().as_micros() as u64,
        switched: 0,
    })
}

/// Unmaps the stub pages of entries that hold their original bytes again and that no thread can be in.
/// No entry leads into these pages any more, so a thread seen outside a page (live PC, return addresses and
/// PCs saved in signal frames) can never enter it again: each thread is stopped, checked and resumed on its
/// own ([`relive_proc::ptrace::stop_each`]), with no stop of the whole process. Pages that cannot be retired
/// now stay mapped and registered.
pub fn retire_stubs(s: &mut Session) -> Result<(), Fail> {
    retire_stubs_where(s, |_, _| Ok(true)).map(|_| ())
}

/// After an unpatching transition completed: retires the idle stub pages whose fresh slots are at least half
/// used, so that the next transitions of these functions find fresh slots again (and write their entries
/// without a stop) instead of falling back to the alternating slots under a stop-all. Costs one stop of each
/// thread in turn, once every dozen or so apply/disable cycles of a function.
/// Returns whether it retired any (the document changed).
pub fn retire_used_stubs(s: &mut Session) -> Result<bool, Fail> {
    retire_stubs_where(s, |s, rec| {
        Ok(rec.fresh && fresh_slot(s, rec, (STUB_PAGE - FRESH_OFF) / 2)?.is_none())
    })
}

fn retire_stubs_where(
    s: &mut Session,
    mut wanted: impl FnMut(&Session, &EntryRec) -> Result<bool, Fail>,
) -> Result<bool, Fail> {
    let mut idle: Vec<EntryRec> = vec![];
    for e in &s.doc.entries {
        if e.current == 0 && s.doc.model.entries().get(&e.func).is_none() && wanted(s, e)? {
            idle.push(e.clone());
        }
    }
    if idle.is_empty() {
        return Ok(false);
    }
    let pid = s.pid;
    let tids = relive_proc::list_threads(pid).map_err(|e| proc_err(pid, "cannot list threads", e))?;
    let mut reader = PageCacheReader::new(pid);
    let mut busy: Vec<u64> = vec![];
    let unwinder = &mut s.unwinder;
    let max_depth = s.max_depth;
    relive_proc::ptrace::stop_each(pid, &tids, |t, _| {
        if let Ok(regs) = t.regs() {
            let stack = relive_proc::unwind_regs(unwinder, &regs, &mut reader, max_depth);
            for e in &idle {
                let r = e.stub..e.stub + STUB_PAGE;
                let in_old_path = |pc: u64| (e.old_path..e.old_path + OLD_PATH_MAX).contains(&pc);
                if r.contains(&regs.rip)
                    || in_old_path(regs.rip)
                    || stack.frames.iter().any(|f| r.contains(&f.pc))
                    || !stack.verdict.is_reliable()
                {
                    tracing::debug!(
                        pid,
                        tid = t.tid(),
                        "stub page {:#x} of {} kept: pc {:#x}, stack {:?}",
                        e.stub,
                        e.func.name,
                        regs.rip,
                        stack.verdict
                    );
                    busy.push(e.stub);
                }
            }
        }
        t.resume().map(|()| relive_proc::ptrace::Then::Done)
    })
    .map_err(|e| proc_err(pid, "cannot check the threads before unmapping stub pages", e))?;
    for e in &idle {
        if busy.contains(&e.stub) {
            continue;
        }
        s.conn
            .unmap(e.stub, STUB_PAGE)
            .map_err(|err| Fail::Error(anyhow!(err)))?;
        s.unwinder.remove_code_range(e.stub);
        s.doc.model.unregister_stubs(&e.func);
        s.doc.entries.retain(|x| x.stub != e.stub);
    }
    Ok(true)
}

/// What a batch's writes do, when all its targets are of one kind (the suffix of the progress line).
fn batch_purpose<'a>(mut targets: impl Iterator<Item = &'a EntryTarget>) -> &'static str {
    let kind = |t: &EntryTarget| match t {
        EntryTarget::Dispatch { .. } => 0,
        EntryTarget::Direct { .. } => 1,
        EntryTarget::Original => 2,
    };
    let Some(first) = targets.next().map(kind) else {
        return "";
    };
    if !targets.all(|t| kind(t) == first) {
        return "";
    }
    match first {
        0 => ": to the per-thread dispatchers, for the transition",
        1 => ": straight to the active code, now that every thread has switched",
        _ => ": back to the original code",
    }
}

/// The progress line of a stop-all entry write: "writing 1 entry …", "writing 2 entries …".
fn writing_under_one_stop(n: usize) -> String {
    let noun = if n == 1 { "entry" } else { "entries" };
    format!("writing {n} {noun} under one stop of every thread")
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_entry_is_singular() {
        assert_eq!(
            super::writing_under_one_stop(1),
            "writing 1 entry under one stop of every thread"
        );
        assert_eq!(
            super::writing_under_one_stop(2),
            "writing 2 entries under one stop of every thread"
        );
    }

    #[test]
    fn a_batch_says_what_its_writes_do() {
        use relive_core::EntryTarget;
        let o = EntryTarget::Original;
        assert_eq!(
            super::batch_purpose([&o, &o].into_iter()),
            ": back to the original code"
        );
        assert_eq!(super::batch_purpose(std::iter::empty()), "");
    }
}
