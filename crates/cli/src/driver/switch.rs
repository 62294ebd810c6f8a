//! Per-thread switching (SPEC C4/C5, DESIGN §4.5): stop one thread, unwind it, ask the model, write its state,
//! resume it; retry the blocked ones every interval until none is pending, the timeout passes, or the
//! transition is over.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use relive_core::{PatchState, SwitchOutcome, ThreadStack, Tid};
use relive_proc::PageCacheReader;
use relive_unwind::FrameKind;

use super::progress::{Blocker, Progress};
use super::session::{Session, proc_err};
use super::{Fail, Options};

/// Statistics of the switching loop.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SwitchStats {
    pub rounds: u32,
    /// Per-thread stop → unwind → decide → write → resume pauses, in microseconds.
    #[serde(skip)]
    pub pauses_us: Vec<u64>,
    /// Per-thread time from the interrupt to the handling, in microseconds (see `Report::stop_wait_us`).
    #[serde(skip)]
    pub stop_waits_us: Vec<u64>,
    pub switched: usize,
    /// Single steps taken to move threads out of a patched function they were executing.
    pub steps: u32,
    pub blockers: Vec<Blocker>,
}

/// The result of one round.
pub struct Round {
    pub pending: usize,
    pub total: usize,
}

fn describe(s: &Session, outcome: &SwitchOutcome, tid: i32, unwind_why: Option<String>) -> Option<Blocker> {
    match outcome {
        SwitchOutcome::Blocked {
            function,
            frame,
            address,
            ..
        } => {
            let sym = s.image.symbolize(relive_elf::Avma(*address));
            Some(Blocker {
                tid,
                reason: format!("sleeping on function {} ({sym})", function.name),
                function: Some(function.name.clone()),
                frame: Some(*frame),
                pc: Some(*address),
            })
        }
        SwitchOutcome::Unreliable(u) => Some(Blocker {
            tid,
            reason: format!(
                "unreliable stack: {}",
                unwind_why.unwrap_or_else(|| format!("{u:?}"))
            ),
            function: None,
            frame: None,
            pc: None,
        }),
        _ => None,
    }
}

/// One round over `tids` (every thread on the first round of a command, then the pending ones and the new).
/// Every thread of the round is interrupted at once and handled as soon as it stops (stop, unwind, decide,
/// write its state, resume: DESIGN §4.5), so a thread's pause is its own handling only.
pub fn round(s: &mut Session, tids: &[i32], stats: &mut SwitchStats) -> Result<Round, Fail> {
    let pid = s.pid;
    let mut blockers = vec![];
    let mut reader = PageCacheReader::new(pid);
    // Per thread: when its handling began, how many single steps it took (a thread stepped out of a
    // patched function is handed back after each step; its pause runs from the first handling to the end)
    // and how many it may take.
    let mut began: HashMap<i32, (Instant, u32, u32)> = HashMap::new();
    let gone = relive_proc::ptrace::stop_each(pid, tids, |t, waited| {
        let tid = t.tid();
        // Stepping pays off when stopping the thread again later would cost more: when it took long to
        // stop (its CPU is oversubscribed: a later stop costs a scheduling rotation). A thread on a free CPU
        // is tried again in the next round, 100 µs later (`drive`), and its pause stays its own handling.
        let budget = if waited >= STEP_WHEN_STOP_TOOK {
            MAX_STEPS
        } else {
            0
        };
        if !began.contains_key(&tid) {
            stats.stop_waits_us.push(waited.as_micros() as u64);
        }
        let (t0, steps, budget) = *began.entry(tid).or_insert((Instant::now(), 0, budget));
        let r = handle(s, &t, &mut reader, stats, &mut blockers, steps < budget);
        let step = matches!(r, Ok(true));
        if step {
            began.insert(tid, (t0, steps + 1, budget));
            stats.steps += 1;
            return Ok(relive_proc::ptrace::Then::Step(t));
        }
        t.resume()?;
        stats.pauses_us.push(t0.elapsed().as_micros() as u64);
        r.map(|_| relive_proc::ptrace::Then::Done)
            .map_err(|e| relive_proc::ProcError::Os {
                pid,
                tid: Some(tid),
                op: "switch a thread",
                err: std::io::Error::other(e.to_string()),
            })
    })
    .map_err(|e| {
        if !relive_proc::process_exists(pid) {
            Fail::Error(anyhow!("pid {pid} exited during the transition"))
        } else {
            proc_err(pid, "cannot switch threads", e)
        }
    })?;
    for tid in gone {
        let _ = s.doc.model.remove_thread(Tid(tid));
        s.fs_base.remove(&tid);
    }
    if !relive_proc::process_exists(pid) {
        return Err(Fail::Error(anyhow!("pid {pid} exited during the transition")));
    }
    stats.rounds += 1;
    stats.blockers = blockers;
    let total = s.doc.model.threads().len();
    Ok(Round {
        pending: s.doc.model.pending().len(),
        total,
    })
}

/// Most instructions a thread is single-stepped to leave the patched function it is executing (each step is
/// a ptrace round trip of some 10–30 µs here, and the thread is stopped meanwhile).
const MAX_STEPS: u32 = 16;

/// A thread found executing a patched function is stepped out of it only if it took at least this long to
/// stop (see `round`).
const STEP_WHEN_STOP_TOOK: std::time::Duration = std::time::Duration::from_millis(1);

/// Handles one stopped thread: adopt what its slot says, and if it is pending, unwind it and try to switch it.
/// Returns true when the thread should be single-stepped and handed back: it is blocked only because its
/// live PC is inside a patched function (frame 0: it is executing it, often a short leaf), the next
/// instruction is safe to step, and the agent's SIGTRAP handler is there to drop the step's trap should
/// this controller be killed mid-step (the kernel does not clear EFLAGS.TF when a tracer dies). Stepping it out (at most [`MAX_STEPS`]) beats resuming it and interrupting it
/// again a round later, which costs a whole scheduling rotation when every CPU is busy.
fn handle(
    s: &mut Session,
    t: &relive_proc::StoppedThread,
    reader: &mut PageCacheReader,
    stats: &mut SwitchStats,
    blockers: &mut Vec<Blocker>,
    may_step: bool,
) -> Result<bool, Fail> {
    let pid = s.pid;
    let tid = t.tid();
    let regs = t
        .regs()
        .map_err(|e| proc_err(pid, &format!("cannot read the registers of thread {tid}"), e))?;
    // Its signal mask, while it is stopped: a thread seen without SIGTRAP blocked is vouched for to the
    // agent at the next stop-free entry write (which then need not read its mask from /proc).
    use relive_abi::procfs::SIGTRAP_BIT;
    let mask = t.sigmask().ok();
    match mask {
        Some(m) if m & SIGTRAP_BIT == 0 => {
            s.masks_seen.insert(tid, Instant::now());
        }
        _ => {
            s.masks_seen.remove(&tid);
        }
    }
    let blocked = settle(
        s,
        tid,
        regs.fs_base,
        |s| relive_proc::unwind_regs(&mut s.unwinder, &regs, reader, s.max_depth),
        stats,
    )?;
    let Some(b) = blocked else {
        return Ok(false);
    };
    let mut ins = [0u8; 15];
    // A thread that single-steps itself (EFLAGS.TF: an in-process debugger, a tracer of its own) would lose
    // its own trap for the instruction stepped here.
    const TF: u64 = 0x100;
    // A thread that blocks SIGTRAP would be killed by that trap whatever the handler.
    let trap_blocked = || mask.is_none_or(|m| m & SIGTRAP_BIT != 0);
    let step = s.trap_handler
        && b.frame == Some(0)
        && b.pc == Some(regs.rip)
        && regs.eflags & TF == 0
        && may_step
        && relive_proc::read_memory(pid, regs.rip, &mut ins).is_ok()
        && relive_x86::single_step_safe(&ins)
        && !trap_blocked();
    if !step {
        blockers.push(b);
    }
    Ok(step)
}

/// The decision for one stopped thread whose TLS block is at `fs_base` (DESIGN §4.5): adopt what its slot
/// says, and if it is pending, take its stack (`stack_of`, called only then) and try to switch it. Also used
/// inside the stop-all window that installs the entries, with the stacks that window already unwound.
/// Returns what blocks the thread, if it stays pending.
pub fn settle(
    s: &mut Session,
    tid: i32,
    fs_base: u64,
    stack_of: impl FnOnce(&mut Session) -> relive_unwind::Stack,
    stats: &mut SwitchStats,
) -> Result<Option<Blocker>, Fail> {
    let pid = s.pid;
    s.fs_base.insert(tid, fs_base);
    // The slot is the truth (DESIGN §4.8): a controller killed after writing a slot but before saving the
    // document leaves the model behind; adopt what the slot says.
    let observed = s
        .read_slot(fs_base)
        .map_err(|e| proc_err(pid, &format!("cannot read thread {tid}'s state"), e))?;
    let model_state = s.doc.model.thread(Tid(tid)).map(|i| i.state);
    let initial = s
        .doc
        .model
        .transition()
        .map(|t| t.initial)
        .unwrap_or(PatchState::Idle);
    let effective = if observed == PatchState::Idle {
        initial
    } else {
        observed
    };
    if model_state != Some(effective) {
        let _ = s.doc.model.remove_thread(Tid(tid));
        s.doc
            .model
            .adopt_thread(Tid(tid), observed)
            .map_err(|e| Fail::Error(anyhow!("pid {pid}: {e}")))?;
    }
    if s.doc.model.thread(Tid(tid)).is_some_and(|i| i.pending) {
        let stack = stack_of(s);
        let pcs: Vec<u64> = stack.frames.iter().map(|f| f.pc).collect();
        // C5a: a PC saved by a signal (and a stub frame, which the unwinder accepts only there or innermost)
        // is the next instruction to run, not a return address: checked at its own byte.
        let interrupted = stack
            .frames
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, f)| matches!(f.kind, FrameKind::SignalInterrupted | FrameKind::Stub { .. }))
            .map(|(i, _)| i)
            .collect();
        let unwind_why = match &stack.verdict {
            relive_unwind::Verdict::Unreliable(u) => Some(u.to_string()),
            relive_unwind::Verdict::Reliable => None,
        };
        let ts = ThreadStack {
            pcs,
            reliable: stack.verdict.is_reliable(),
            interrupted,
        };
        let outcome = s
            .doc
            .model
            .try_switch(Tid(tid), &ts)
            .map_err(|e| Fail::Error(anyhow!("pid {pid}: {e}")))?;
        match &outcome {
            SwitchOutcome::Switched(relive_core::Action::WriteThreadState { state, .. }) => {
                s.write_slot(fs_base, *state)
                    .map_err(|e| proc_err(pid, &format!("cannot write thread {tid}'s state"), e))?;
                stats.switched += 1;
            }
            other => return Ok(describe(s, other, tid, unwind_why)),
        }
    }
    Ok(None)
}

/// The threads to visit this round: the pending ones and those the model does not know yet (`all` = every
/// thread, to re-read every slot once per command).
pub fn visit_list(s: &mut Session, all: bool) -> Result<Vec<i32>, Fail> {
    let tids = relive_proc::list_threads(s.pid).map_err(|e| proc_err(s.pid, "cannot list threads", e))?;
    let live: HashSet<i32> = tids.iter().copied().collect();
    for t in s.doc.model.threads().keys().copied().collect::<Vec<_>>() {
        if !live.contains(&t.0) {
            let _ = s.doc.model.remove_thread(t);
            s.fs_base.remove(&t.0);
        }
    }
    if all {
        return Ok(tids);
    }
    let pending: HashSet<i32> = s.doc.model.pending().iter().map(|t| t.0).collect();
    Ok(tids
        .into_iter()
        .filter(|t| pending.contains(t) || s.doc.model.thread(Tid(*t)).is_none())
        .collect())
}

/// Drives rounds until the model has no pending thread or the deadline passes. Returns true when the
/// transition completed (the caller performs the completion output).
pub fn drive(
    s: &mut Session,
    opts: &Options,
    progress: &mut dyn Progress,
    stats: &mut SwitchStats,
    deadline: Option<Instant>,
    mut on_complete: impl FnMut(&mut Session, relive_core::Output, &mut dyn Progress) -> Result<(), Fail>,
) -> Result<bool, Fail> {
    let mut first = true;
    let mut last_saved_pending = usize::MAX;
    let mut idle_rounds = 0u32;
    let mut last_switched = stats.switched;
    loop {
        let Some(t) = s.doc.model.transition() else {
            return Ok(true);
        };
        let (patch, target) = (t.patch.clone(), t.target);
        // The stop-all window that installed the entries may have settled every thread already.
        let settled = std::mem::take(&mut s.settled_all);
        let tids = visit_list(s, first && !settled)?;
        first = false;
        let r = round(s, &tids, stats)?;
        progress.round(
            &patch,
            target_word(target),
            r.total - r.pending,
            r.total,
            &stats.blockers,
        );
        let out = s
            .doc
            .model
            .try_complete()
            .map_err(|e| Fail::Error(anyhow!("pid {}: {e}", s.pid)))?;
        if s.doc.model.transition().is_none() {
            on_complete(s, out, progress)?;
            return Ok(true);
        }
        if r.pending != last_saved_pending {
            // Write-ahead of the thread states already written (DESIGN §4.8).
            s.save()?;
            last_saved_pending = r.pending;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) || !opts.wait {
            s.save()?;
            return Ok(false);
        }
        // Back off while nothing moves: the interval, doubled every 10 rounds that switched nobody, up to 8×.
        if stats.switched == last_switched {
            idle_rounds += 1;
        } else {
            idle_rounds = 0;
        }
        last_switched = stats.switched;
        // The first retries come quickly (100 µs, doubling up to the interval): a thread that was merely
        // passing through a patched function is usually out of it a moment later (DESIGN §4.5).
        // A thread blocked only because it was executing a patched function (frame 0) is out of it a moment
        // later: while every blocker is of that kind, keep retrying every 100 µs (for up to 50 rounds)
        // instead of doubling the wait, and do not hold the thread to step it when its CPU is free.
        let passing = !stats.blockers.is_empty()
            && stats.blockers.iter().all(|b| b.frame == Some(0))
            && stats.rounds <= 50;
        let factor = 1u32 << (idle_rounds / 10).min(3);
        let ramp = Duration::from_micros(100).saturating_mul(1u32 << stats.rounds.min(16));
        std::thread::sleep(if passing {
            Duration::from_micros(100)
        } else {
            opts.interval
                .saturating_mul(factor)
                .min(ramp)
                .max(Duration::from_micros(100))
        });
    }
}

pub fn target_word(t: PatchState) -> &'static str {
    match t {
        PatchState::Patched => "patched",
        PatchState::Unpatched => "unpatched",
        PatchState::Idle => "idle",
    }
}
