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
