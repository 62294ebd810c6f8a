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

/// A thread's scheduling policy and static priority, as `sched_getscheduler`/`sched_getparam` give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub policy: i32,
    pub priority: i32,
}

/// Thread `tid`'s current policy, or None when it cannot be read (gone, not permitted).
pub fn thread_policy(tid: i32) -> Option<Policy> {
    let mut p = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getscheduler/sched_getparam on a thread id; `p` is a valid out-pointer.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    // SAFETY: as above.
    if policy < 0 || unsafe { libc::sched_getparam(tid, &mut p) } != 0 {
        return None;
    }
    Some(Policy {
        policy: policy & !libc::SCHED_RESET_ON_FORK,
        priority: p.sched_priority,
    })
}

/// Moves thread `tid` (of any process: the agent's service thread of a target) to `SCHED_FIFO` priority 1,
/// so that the controller's requests are served at once instead of after the target's busy threads.
/// Returns the policy it had, for [`restore_thread`]; None, changing nothing, when not permitted or when
/// the thread already runs at a real-time policy (the target's own choice, kept).
pub fn boost_thread(tid: i32) -> Option<Policy> {
    let before = thread_policy(tid)?;
    if before.policy == libc::SCHED_FIFO || before.policy == libc::SCHED_RR {
        return None;
    }
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on a thread id with a valid sched_param.
    (unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &p) } == 0).then_some(before)
}

/// Gives thread `tid` back the policy [`boost_thread`] found (its nice value was never changed).
pub fn restore_thread(tid: i32, before: Policy) -> bool {
    let p = libc::sched_param {
        sched_priority: before.priority,
    };
    // SAFETY: sched_setscheduler on a thread id with a valid sched_param.
    unsafe { libc::sched_setscheduler(tid, before.policy, &p) == 0 }
}

/// Whether the calling process runs at a real-time policy (it raised itself, [`raise_to_realtime`]).
pub fn is_realtime() -> bool {
    // SAFETY: sched_getscheduler on this process has no preconditions.
    let p = unsafe { libc::sched_getscheduler(0) };
    p == libc::SCHED_FIFO || p == libc::SCHED_RR
}
