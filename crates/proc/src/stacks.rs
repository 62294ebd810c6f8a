//! Stop one thread, unwind it, resume it (DESIGN §4.5): the building block of `relive stacks` and
//! of the per-thread transition switch.

use crate::error::Result;
use crate::mem::PageCacheReader;
use crate::ptrace::{Regs, stop_thread};
use relive_unwind::{Stack, StartRegs, Unwinder};

/// One thread's registers and unwound stack, taken while it was stopped.
#[derive(Debug, Clone)]
pub struct ThreadStack {
    pub tid: i32,
    pub regs: Regs,
    pub stack: Stack,
}

/// Stops thread `tid` of `pid`, reads its registers, unwinds it with `unwinder`, and resumes it.
/// Only this thread stops; the rest of the process runs on.
pub fn thread_stack(pid: i32, tid: i32, unwinder: &mut Unwinder, max_depth: usize) -> Result<ThreadStack> {
    let t = stop_thread(pid, tid)?;
    let regs = t.regs()?;
    let mut reader = PageCacheReader::new(pid);
    let stack = unwinder.unwind(
        StartRegs {
            ip: regs.rip,
            sp: regs.rsp,
            bp: regs.rbp,
        },
        &mut reader,
        max_depth,
    );
    t.resume()?;
    Ok(ThreadStack { tid, regs, stack })
}
