//! Stop one thread, unwind it, resume it (DESIGN §4.5): the building block of `relive stacks` and
//! of the per-thread transition switch.

use crate::error::Result;
use crate::mem::PageCacheReader;
use crate::ptrace::{Regs, StoppedThread, stop_thread};
use relive_unwind::{Stack, StartRegs, Unwinder};

/// One thread's registers and unwound stack, taken while it was stopped.
#[derive(Debug, Clone)]
pub struct ThreadStack {
    pub tid: i32,
    pub regs: Regs,
    pub stack: Stack,
}

/// Unwinds a stopped thread from its registers `regs`, reading its stack through `reader` (emptied first:
/// the thread may have run since the reader last read its pages).
pub fn unwind_regs(
    unwinder: &mut Unwinder,
    regs: &Regs,
    reader: &mut PageCacheReader,
    max_depth: usize,
) -> Stack {
    reader.clear();
    unwinder.unwind(
        StartRegs {
            ip: regs.rip,
            sp: regs.rsp,
            bp: regs.rbp,
        },
        reader,
        max_depth,
    )
}

/// Unwinds a thread that is already stopped (the caller decides and resumes: DESIGN §4.5's
/// stop → unwind → decide → write state → resume).
pub fn unwind_stopped(t: &StoppedThread, unwinder: &mut Unwinder, max_depth: usize) -> Result<(Regs, Stack)> {
    let regs = t.regs()?;
    let stack = unwind_regs(unwinder, &regs, &mut PageCacheReader::new(t.pid()), max_depth);
    Ok((regs, stack))
}

/// Stops thread `tid` of `pid`, reads its registers, unwinds it with `unwinder`, and resumes it.
/// Only this thread stops; the rest of the process runs on.
pub fn thread_stack(pid: i32, tid: i32, unwinder: &mut Unwinder, max_depth: usize) -> Result<ThreadStack> {
    let t = stop_thread(pid, tid)?;
    let regs = t.regs()?;
    let stack = unwind_regs(unwinder, &regs, &mut PageCacheReader::new(pid), max_depth);
    t.resume()?;
    Ok(ThreadStack { tid, regs, stack })
}
