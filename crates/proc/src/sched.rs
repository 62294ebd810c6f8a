//! The controller's own scheduling (issue 5 benchmark, "100 threads, all busy"): when every CPU runs target
//! threads, a controller at the normal policy waits for a CPU between each stop it handles and each
//! answer of the agent, and stopped threads wait for it meanwhile. relive therefore runs its transition
//! commands at the lowest real-time priority when it may (root or CAP_SYS_NICE). It blocks in `waitpid` and
//! on the agent's pipe between short bursts, and the kernel's real-time throttling bounds it in any case.

/// Moves the calling process to `SCHED_FIFO` priority 1. Returns false, changing nothing, when not
/// permitted (no CAP_SYS_NICE, an RLIMIT_RTPRIO of 0, a container without the capability).
pub fn raise_to_realtime() -> bool {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on this process (pid 0) with a valid sched_param.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) == 0 }
}

/// Moves thread `tid` (of any process: the agent's service thread of a target) to `SCHED_FIFO` priority 1,
/// so that the controller's requests are served at once instead of after the target's busy threads.
/// Returns false, changing nothing, when not permitted.
pub fn boost_thread(tid: i32) -> bool {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on a thread id with a valid sched_param.
    unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &p) == 0 }
}

/// Moves thread `tid` back to `SCHED_OTHER` (its nice value was never changed).
pub fn unboost_thread(tid: i32) -> bool {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on a thread id with a valid sched_param.
    unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &p) == 0 }
}

/// Whether the calling process runs at a real-time policy (it raised itself, [`raise_to_realtime`]).
pub fn is_realtime() -> bool {
    // SAFETY: sched_getscheduler on this process has no preconditions.
    let p = unsafe { libc::sched_getscheduler(0) };
    p == libc::SCHED_FIFO || p == libc::SCHED_RR
}
