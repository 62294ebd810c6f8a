//! Stopping threads with `PTRACE_SEIZE` + `PTRACE_INTERRUPT` (DESIGN §4.1), never SIGSTOP.
//!
//! A [`StoppedThread`] is seized and in a ptrace-stop; dropping it (or [`StoppedThread::resume`])
//! detaches and lets it run on. Signals that arrive while relive waits for the stop are re-injected
//! at once, so the target never loses one.

use crate::error::{ProcError, Result};
use crate::threads::list_threads_once;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The general registers of a thread (`struct user_regs_struct`), including `fs_base`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    /// The system call number if the thread is stopped inside a system call, else `-1 as u64`.
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

macro_rules! copy_regs {
    ($from:expr, $to:ident, $($f:ident),*) => { $to { $($f: $from.$f),* } };
}

impl From<libc::user_regs_struct> for Regs {
    fn from(r: libc::user_regs_struct) -> Self {
        copy_regs!(
            r, Regs, r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip,
            cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
        )
    }
}

impl From<Regs> for libc::user_regs_struct {
    fn from(r: Regs) -> Self {
        use libc::user_regs_struct as U;
        copy_regs!(
            r, U, r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
            eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
        )
    }
}

impl Regs {
    /// Whether the thread was stopped inside a system call (`orig_rax >= 0`).
    pub fn in_syscall(&self) -> bool {
        (self.orig_rax as i64) >= 0
    }
}

/// Why a seized thread stopped (see ptrace(2), "Stopped states").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// `PTRACE_EVENT_STOP`: the stop relive asked for (interrupt) or a group-stop with this signal.
    EventStop(i32),
    /// Signal-delivery-stop: the thread is about to receive this signal.
    Signal(i32),
    /// Syscall-enter or -exit stop (`PTRACE_O_TRACESYSGOOD`).
    Syscall,
    /// Another `PTRACE_EVENT_*` (the event number).
    Event(i32),
    /// The thread exited with this status.
    Exited(i32),
    /// The thread was killed by this signal.
    Killed(i32),
}

fn ptrace(req: libc::c_uint, tid: i32, addr: u64, data: u64) -> i64 {
    // SAFETY: ptrace with an integer request, a tid and two integer arguments. The requests used
    // here (SEIZE, INTERRUPT, CONT, DETACH, GETREGS/SETREGS with a valid buffer pointer passed by
    // the callers, PEEK/POKE) read or write only the kernel side or the buffer given.
    unsafe { libc::ptrace(req, tid, addr as *mut libc::c_void, data as *mut libc::c_void) }
}

/// `waitpid(tid, __WALL)`, retried on EINTR, decoded.
pub fn wait_tid(pid: i32, tid: i32) -> Result<StopKind> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes one int to `status`, a valid local.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if r == tid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if e.raw_os_error() == Some(libc::ECHILD) {
            return Err(ProcError::TargetDied {
                pid,
                tid: Some(tid),
                during: "waitpid",
            });
        }
        return Err(ProcError::from_os(pid, Some(tid), "waitpid", e));
    }
    Ok(decode_status(status))
}

/// Decodes a wait status of a ptraced thread.
pub fn decode_status(status: i32) -> StopKind {
    if libc::WIFEXITED(status) {
        return StopKind::Exited(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        return StopKind::Killed(libc::WTERMSIG(status));
    }
    let sig = libc::WSTOPSIG(status);
    let event = (status >> 16) & 0xff;
    if event == libc::PTRACE_EVENT_STOP {
        StopKind::EventStop(sig)
    } else if event != 0 {
        StopKind::Event(event)
    } else if sig == libc::SIGTRAP | 0x80 {
        StopKind::Syscall
    } else {
        StopKind::Signal(sig)
    }
}

/// Reaps a dead tracee (bounded: gives up after a second if it does not report its exit).
fn reap_dead(tid: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int to `status`, a valid local.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        if r == tid && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status)) {
            return;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
        if std::time::Instant::now() > deadline {
            return;
        }
        std::thread::yield_now();
    }
}

/// A thread that relive has seized and stopped. Detaches (the thread runs on) when dropped.
#[derive(Debug)]
pub struct StoppedThread {
    pid: i32,
    tid: i32,
    /// Still seized.
    attached: bool,
    /// In a ptrace-stop (false after [`StoppedThread::cont`]).
    stopped: bool,
}

fn seize(pid: i32, tid: i32) -> Result<()> {
    let opts = libc::PTRACE_O_TRACESYSGOOD as u64;
    if ptrace(libc::PTRACE_SEIZE, tid, 0, opts) != 0 {
        return Err(ProcError::last_os(pid, Some(tid), "PTRACE_SEIZE"));
    }
    Ok(())
}

fn interrupt(pid: i32, tid: i32) -> Result<()> {
    if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) != 0 {
        return Err(ProcError::last_os(pid, Some(tid), "PTRACE_INTERRUPT"));
    }
    Ok(())
}

/// Waits for the interrupt stop of a seized thread, re-injecting any signal that arrives first.
fn wait_for_interrupt(pid: i32, tid: i32) -> Result<()> {
    loop {
        match wait_tid(pid, tid)? {
            StopKind::EventStop(_) => return Ok(()),
            StopKind::Signal(sig) => {
                // Re-inject: the thread gets its signal; the interrupt is still pending and the
                // thread stops again right after (ptrace(2), PTRACE_INTERRUPT).
                if ptrace(libc::PTRACE_CONT, tid, 0, sig as u64) != 0 {
                    return Err(ProcError::last_os(
                        pid,
                        Some(tid),
                        "PTRACE_CONT (re-inject signal)",
                    ));
                }
            }
            StopKind::Syscall | StopKind::Event(_) => {
                if ptrace(libc::PTRACE_CONT, tid, 0, 0) != 0 {
                    return Err(ProcError::last_os(pid, Some(tid), "PTRACE_CONT"));
                }
            }
            StopKind::Exited(_) | StopKind::Killed(_) => {
                return Err(ProcError::TargetDied {
                    pid,
                    tid: Some(tid),
                    during: "stopping the thread",
                });
            }
        }
    }
}

/// Seizes thread `tid` of `pid` and stops it (`PTRACE_SEIZE`, `PTRACE_INTERRUPT`, `waitpid(__WALL)`).
/// Other threads keep running.
pub fn stop_thread(pid: i32, tid: i32) -> Result<StoppedThread> {
    seize(pid, tid)?;
    let mut t = StoppedThread {
        pid,
        tid,
        attached: true,
        stopped: false,
    };
    interrupt(pid, tid)?;
    wait_for_interrupt(pid, tid)?;
    t.stopped = true;
    Ok(t)
}

impl StoppedThread {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Whether the thread is in a ptrace-stop right now.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// `PTRACE_GETREGS`: all general registers, with `fs_base`.
    pub fn regs(&self) -> Result<Regs> {
        // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        if ptrace(libc::PTRACE_GETREGS, self.tid, 0, &mut r as *mut _ as u64) != 0 {
            return Err(ProcError::last_os(self.pid, Some(self.tid), "PTRACE_GETREGS"));
        }
        Ok(r.into())
    }

    /// `PTRACE_SETREGS`.
    pub fn set_regs(&self, regs: &Regs) -> Result<()> {
        let r: libc::user_regs_struct = (*regs).into();
        if ptrace(libc::PTRACE_SETREGS, self.tid, 0, &r as *const _ as u64) != 0 {
            return Err(ProcError::last_os(self.pid, Some(self.tid), "PTRACE_SETREGS"));
        }
        Ok(())
    }

    /// `PTRACE_PEEKDATA` of one word.
    pub fn peek(&self, addr: u64) -> Result<u64> {
        // SAFETY: clearing errno (thread-local) before PEEKDATA, whose -1 result is ambiguous.
        unsafe { *libc::__errno_location() = 0 };
        let v = ptrace(libc::PTRACE_PEEKDATA, self.tid, addr, 0);
        if v == -1 && std::io::Error::last_os_error().raw_os_error() != Some(0) {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EIO) | Some(libc::EFAULT) => ProcError::Memory {
                    pid: self.pid,
                    addr,
                    len: 8,
                    op: "read",
                    err: e,
                },
                _ => ProcError::from_os(self.pid, Some(self.tid), "PTRACE_PEEKDATA", e),
            });
        }
        Ok(v as u64)
    }

    /// `PTRACE_POKEDATA` of one word (writes even read-only code: FOLL_FORCE).
    pub fn poke(&self, addr: u64, value: u64) -> Result<()> {
        if ptrace(libc::PTRACE_POKEDATA, self.tid, addr, value) != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EIO) | Some(libc::EFAULT) => ProcError::Memory {
                    pid: self.pid,
                    addr,
                    len: 8,
                    op: "write",
                    err: e,
                },
                _ => ProcError::from_os(self.pid, Some(self.tid), "PTRACE_POKEDATA", e),
            });
        }
        Ok(())
    }

    /// Writes `bytes` at `addr` word by word with PEEK/POKE (the fallback of
    /// [`crate::mem::write_code`] when `/proc/PID/mem` refuses).
    pub fn poke_bytes(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < bytes.len() {
            let a = addr + done as u64;
            let word_addr = a & !7;
            let skip = (a - word_addr) as usize;
            let n = (8 - skip).min(bytes.len() - done);
            let mut w = if skip == 0 && n == 8 {
                [0u8; 8]
            } else {
                self.peek(word_addr)?.to_le_bytes()
            };
            w[skip..skip + n].copy_from_slice(&bytes[done..done + n]);
            self.poke(word_addr, u64::from_le_bytes(w))?;
            done += n;
        }
        Ok(())
    }

    /// Resumes the thread while keeping it seized (`PTRACE_CONT` with `sig`, 0 for none). Use
    /// [`StoppedThread::wait`] or [`StoppedThread::interrupt`] to stop it again.
    pub fn cont(&mut self, sig: i32) -> Result<()> {
        if ptrace(libc::PTRACE_CONT, self.tid, 0, sig as u64) != 0 {
            return Err(ProcError::last_os(self.pid, Some(self.tid), "PTRACE_CONT"));
        }
        self.stopped = false;
        Ok(())
    }

    /// Resumes with `PTRACE_SYSCALL` (stop at the next syscall entry or exit).
    pub fn cont_syscall(&mut self, sig: i32) -> Result<()> {
        if ptrace(libc::PTRACE_SYSCALL, self.tid, 0, sig as u64) != 0 {
            return Err(ProcError::last_os(self.pid, Some(self.tid), "PTRACE_SYSCALL"));
        }
        self.stopped = false;
        Ok(())
    }

    /// Waits for the next stop of a thread resumed with [`StoppedThread::cont`].
    pub fn wait(&mut self) -> Result<StopKind> {
        let k = wait_tid(self.pid, self.tid)?;
        match k {
            StopKind::Exited(_) | StopKind::Killed(_) => {
                self.attached = false;
                self.stopped = false;
            }
            _ => self.stopped = true,
        }
        Ok(k)
    }

    /// Stops a thread resumed with [`StoppedThread::cont`] again (interrupt, then wait for the
    /// event stop, re-injecting signals).
    pub fn interrupt(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        interrupt(self.pid, self.tid)?;
        wait_for_interrupt(self.pid, self.tid)?;
        self.stopped = true;
        Ok(())
    }

    /// `PTRACE_GETSIGMASK`: the thread's blocked-signal mask (bit `n - 1` for signal `n`).
    pub fn sigmask(&self) -> Result<u64> {
        let mut m: u64 = 0;
        if ptrace(libc::PTRACE_GETSIGMASK, self.tid, 8, &mut m as *mut u64 as u64) != 0 {
            return Err(ProcError::last_os(self.pid, Some(self.tid), "PTRACE_GETSIGMASK"));
        }
        Ok(m)
    }

    /// Detaches: the thread runs on. Same as dropping, but reports errors.
    pub fn resume(mut self) -> Result<()> {
        self.detach_inner(0)
    }

    /// Detaches and delivers `sig` (0 for none).
    pub fn resume_with_signal(mut self, sig: i32) -> Result<()> {
        self.detach_inner(sig)
    }

    fn detach_inner(&mut self, sig: i32) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        if !self.stopped {
            // PTRACE_DETACH needs a stopped tracee.
            self.interrupt()?;
        }
        self.attached = false;
        if ptrace(libc::PTRACE_DETACH, self.tid, 0, sig as u64) != 0 {
            let e = ProcError::last_os(self.pid, Some(self.tid), "PTRACE_DETACH");
            if e.is_target_died() {
                // The tracee was killed while stopped: it stays a zombie until its tracer reaps it,
                // and its process cannot be reaped before that. Reap it.
                reap_dead(self.tid);
            }
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        let _ = self.detach_inner(0);
    }
}

/// Every thread of a process, stopped. Resumes all of them when dropped.
#[derive(Debug)]
pub struct StoppedProcess {
    pid: i32,
    pub threads: Vec<StoppedThread>,
}

impl StoppedProcess {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn thread(&self, tid: i32) -> Option<&StoppedThread> {
        self.threads.iter().find(|t| t.tid == tid)
    }

    /// Resumes every thread; reports the first error after trying them all.
    pub fn resume(mut self) -> Result<()> {
        let mut first = None;
        for t in self.threads.drain(..) {
            if let Err(e) = t.resume()
                && first.is_none()
            {
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Stops every thread of `pid` (DESIGN §4.1: reserved for the short entry-writing window). Seizes
/// and interrupts every listed thread, then waits for each; re-lists `/proc/PID/task` until no new
/// thread appears. Threads that exit meanwhile are skipped; if the whole process dies, the error is
/// `TargetDied` and every thread already stopped is resumed.
pub fn stop_all(pid: i32) -> Result<StoppedProcess> {
    let mut out = StoppedProcess {
        pid,
        threads: Vec::new(),
    };
    let mut seen: HashSet<i32> = HashSet::new();
    loop {
        let tids = list_threads_once(pid)?;
        let new: Vec<i32> = tids.into_iter().filter(|t| !seen.contains(t)).collect();
        if new.is_empty() {
            break;
        }
        let mut seized = Vec::new();
        for &tid in &new {
            seen.insert(tid);
            match seize(pid, tid).and_then(|()| {
                seized.push(tid);
                interrupt(pid, tid)
            }) {
                Ok(()) => {}
                Err(e) if e.is_target_died() && crate::error::process_exists(pid) => {}
                Err(e) => {
                    // Detach what we seized but did not wait for: wait, then drop detaches.
                    for &t in &seized {
                        if wait_for_interrupt(pid, t).is_ok() {
                            out.threads.push(StoppedThread {
                                pid,
                                tid: t,
                                attached: true,
                                stopped: true,
                            });
                        }
                    }
                    return Err(e);
                }
            }
        }
        let mut err = None;
        for tid in seized {
            match wait_for_interrupt(pid, tid) {
                Ok(()) => out.threads.push(StoppedThread {
                    pid,
                    tid,
                    attached: true,
                    stopped: true,
                }),
                Err(e) if e.is_target_died() => {
                    if !crate::error::process_exists(pid) && err.is_none() {
                        err = Some(e);
                    }
                }
                Err(e) => {
                    if err.is_none() {
                        err = Some(e);
                    }
                }
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
    }
    if out.threads.is_empty() {
        return Err(ProcError::TargetDied {
            pid,
            tid: None,
            during: "stopping all threads",
        });
    }
    Ok(out)
}

/// What [`stop_each`]'s callback wants next for the thread it was handed.
pub enum Then {
    /// Done with it (the callback resumed it, or dropping it detaches).
    Done,
    /// Run one instruction (`PTRACE_SINGLESTEP`) and hand it back once it has: other threads are handled
    /// meanwhile, so a step that waits for a CPU holds up nobody else.
    Step(StoppedThread),
}

/// Whether the SIGTRAP stop `tid` is in now is the end of a single step (`TRAP_TRACE`), not a signal.
fn is_step_trap(pid: i32, tid: i32) -> Result<bool> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value.
    let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
    if ptrace(libc::PTRACE_GETSIGINFO, tid, 0, &mut si as *mut _ as u64) != 0 {
        return Err(ProcError::last_os(pid, Some(tid), "PTRACE_GETSIGINFO"));
    }
    const TRAP_TRACE: i32 = 2;
    Ok(si.si_code == TRAP_TRACE)
}

/// Waits for the step of `t` to end and detaches it, delivering a signal that stopped it instead (never
/// the step's own trap).
fn abandon_step(mut t: StoppedThread) {
    loop {
        match wait_tid(t.pid, t.tid) {
            Ok(StopKind::Signal(libc::SIGTRAP)) if is_step_trap(t.pid, t.tid).unwrap_or(true) => {
                t.stopped = true;
                let _ = t.detach_inner(0);
                return;
            }
            Ok(StopKind::Signal(sig)) => {
                t.stopped = true;
                let _ = t.detach_inner(sig);
                return;
            }
            Ok(StopKind::EventStop(_)) => {
                t.stopped = true;
                let _ = t.detach_inner(0);
                return;
            }
            Ok(StopKind::Syscall | StopKind::Event(_)) => {
                if ptrace(libc::PTRACE_SINGLESTEP, t.tid, 0, 0) != 0 {
                    t.attached = false;
                    return;
                }
            }
            Ok(StopKind::Exited(_) | StopKind::Killed(_)) | Err(_) => {
                t.attached = false;
                t.stopped = false;
                return;
            }
        }
    }
}

/// How many recently asked threads [`stop_each`] keeps ahead of the one it handles: `RELIVE_STOP_WINDOW`,
/// or all of them (the default). Asking every thread at once makes the round shortest, but a sleeping thread
/// stops at once and then waits, stopped, for the handling of those ahead of it (98 napping threads: 1.9 ms
/// median; 1,000 blocked: 18.7 ms); a window of 2 brought that to 125 µs and 60 µs, for rounds 13–55% longer
/// (measurements in the session-4 note of issue 5).
fn stop_window() -> usize {
    std::env::var("RELIVE_STOP_WINDOW")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(usize::MAX)
}

/// With a window, a thread asked this long ago that has not stopped yet is waiting for a CPU: it no longer
/// counts against the window, so that slow stoppers still overlap.
const STOP_SLOW: std::time::Duration = std::time::Duration::from_micros(250);

/// Seizes and interrupts the next threads of `tids` while fewer than `window` recently asked ones are
/// outstanding. Threads already gone go to `gone`.
fn ask(
    pid: i32,
    tids: &[i32],
    window: usize,
    next: &mut usize,
    waiting: &mut Vec<i32>,
    asked: &mut std::collections::HashMap<i32, std::time::Instant>,
    gone: &mut Vec<i32>,
) -> Result<()> {
    let now = std::time::Instant::now();
    let mut recent = if window == usize::MAX {
        0
    } else {
        waiting
            .iter()
            .filter(|t| asked.get(t).is_some_and(|a| now.duration_since(*a) < STOP_SLOW))
            .count()
    };
    while *next < tids.len() && recent < window {
        let tid = tids[*next];
        *next += 1;
        match seize(pid, tid) {
            Ok(()) => {}
            Err(e) if e.is_target_died() => {
                gone.push(tid);
                continue;
            }
            Err(e) => return Err(e),
        }
        waiting.push(tid);
        asked.insert(tid, std::time::Instant::now());
        recent += 1;
        if let Err(e) = interrupt(pid, tid)
            && !e.is_target_died()
        {
            return Err(e);
        }
    }
    Ok(())
}

/// Polls the two oldest asked threads (and steps) by tid, oldest first; returns the first with an event.
/// `waitpid(-1)` reports the most recently attached tracee first, so with threads asked all along, one
/// asked early could wait, stopped, for the whole round.
fn probe_oldest(waiting: &[i32], stepping: &[StoppedThread], status: &mut i32) -> Option<i32> {
    const PROBE: usize = 2;
    let tids = waiting
        .iter()
        .take(PROBE)
        .copied()
        .chain(stepping.iter().take(PROBE).map(|t| t.tid));
    for tid in tids {
        // SAFETY: waitpid writes one int to `status`, a valid reference.
        let r = unsafe { libc::waitpid(tid, status, libc::__WALL | libc::WNOHANG) };
        if r > 0 {
            return Some(r);
        }
    }
    None
}

/// Keeps SIGCHLD blocked in the calling thread while it lives, so that a tracee's stop leaves it pending
/// for [`wait_sigchld`] (its default disposition would discard it).
struct SigchldBlocked(libc::sigset_t);

/// The signal set {SIGCHLD}.
fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data that sigemptyset/sigaddset initialise.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

impl SigchldBlocked {
    fn new() -> SigchldBlocked {
        let set = sigchld_set();
        // SAFETY: sigset_t is plain data; pthread_sigmask reads `set` and writes the previous mask into
        // `old`, both valid locals.
        unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            SigchldBlocked(old)
        }
    }
}

impl Drop for SigchldBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new`, a valid sigset_t.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Waits up to `timeout` for a SIGCHLD (a tracee stopped), consuming it. A missed wake-up (another thread
/// of this process took the signal) costs at most `timeout`: the caller polls `waitpid` after.
fn wait_sigchld(timeout: std::time::Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    let set = sigchld_set();
    // SAFETY: sigtimedwait reads `set` and `ts`, valid locals, and writes no siginfo (null).
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
}

/// Stops the threads `tids` of `pid` together and hands each one to `each` as soon as it stops, so that a
/// thread's pause is its own handling only, not the wait for the others (issue 5: interrupt every pending
/// thread at once, switch each one as it stops). `each` resumes the thread (or drops it, which detaches), or
/// asks for one single step ([`Then::Step`]) after which the thread is handed back to it. `each` also gets
/// how long the thread took to stop once asked (to stop, or to finish its step): on oversubscribed CPUs that
/// is a scheduling delay, the price of stopping it again later. A signal that
/// arrives during a step ends the stepping: the thread is resumed with that signal and not handed back.
/// Returns the threads that exited meanwhile. Only these threads stop; the rest of the process runs on.
/// Threads are asked all at once, or at most `RELIVE_STOP_WINDOW` ahead of the one being handled.
/// (Added by the transition driver; waits with `waitpid`, ignoring other children's events.)
pub fn stop_each(
    pid: i32,
    tids: &[i32],
    mut each: impl FnMut(StoppedThread, std::time::Duration) -> Result<Then>,
) -> Result<Vec<i32>> {
    let mut gone = Vec::new();
    let mut waiting: Vec<i32> = Vec::new();
    let mut stepping: Vec<StoppedThread> = Vec::new();
    // When each thread was asked to stop: how long it took tells the callback how busy the CPUs are.
    let mut asked: std::collections::HashMap<i32, std::time::Instant> = std::collections::HashMap::new();
    let release = |waiting: &[i32], stepping: &mut Vec<StoppedThread>| {
        for &t in waiting {
            if wait_for_interrupt(pid, t).is_ok() {
                drop(StoppedThread {
                    pid,
                    tid: t,
                    attached: true,
                    stopped: true,
                });
            }
        }
        for t in stepping.drain(..) {
            abandon_step(t);
        }
    };
    // Threads are asked all at once (the default), or at most `window` recently asked ones ahead of the
    // one being handled (RELIVE_STOP_WINDOW), so that a sleeping thread stops just before its turn.
    let window = stop_window();
    let _sigchld = (window < usize::MAX).then(SigchldBlocked::new);
    let mut next = 0usize;
    // Hands a stopped thread to `each` and starts its step if it asks for one.
    let mut hand = |t: StoppedThread,
                    stepping: &mut Vec<StoppedThread>,
                    asked: &mut std::collections::HashMap<i32, std::time::Instant>|
     -> Result<()> {
        let waited = asked
            .get(&t.tid)
            .map_or(std::time::Duration::ZERO, |a| a.elapsed());
        match each(t, waited)? {
            Then::Done => Ok(()),
            Then::Step(mut t) => {
                if ptrace(libc::PTRACE_SINGLESTEP, t.tid, 0, 0) != 0 {
                    return Err(ProcError::last_os(pid, Some(t.tid), "PTRACE_SINGLESTEP"));
                }
                t.stopped = false;
                asked.insert(t.tid, std::time::Instant::now());
                stepping.push(t);
                Ok(())
            }
        }
    };
    loop {
        if let Err(e) = ask(pid, tids, window, &mut next, &mut waiting, &mut asked, &mut gone) {
            release(&waiting, &mut stepping);
            return Err(e);
        }
        if waiting.is_empty() && stepping.is_empty() {
            break;
        }
        let mut status = 0;
        let r = if window == usize::MAX {
            // SAFETY: waitpid writes one int to `status`, a valid local.
            unsafe { libc::waitpid(-1, &mut status, libc::__WALL) }
        } else {
            let more = next < tids.len();
            let r = match probe_oldest(&waiting, &stepping, &mut status) {
                Some(r) => r,
                // SAFETY: as above.
                None => unsafe {
                    libc::waitpid(
                        -1,
                        &mut status,
                        libc::__WALL | if more { libc::WNOHANG } else { 0 },
                    )
                },
            };
            if r == 0 {
                // Threads are left to ask: wait for a stop only until the window has room again.
                let now = std::time::Instant::now();
                let room_at = waiting
                    .iter()
                    .filter_map(|t| asked.get(t))
                    .map(|a| *a + STOP_SLOW)
                    .filter(|at| *at > now)
                    .min()
                    .unwrap_or(now);
                wait_sigchld(
                    room_at
                        .saturating_duration_since(now)
                        .max(std::time::Duration::from_micros(20)),
                );
                continue;
            }
            r
        };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            release(&waiting, &mut stepping);
            return Err(ProcError::from_os(pid, None, "waitpid", err));
        }
        if let Some(j) = stepping.iter().position(|t| t.tid == r) {
            let kind = decode_status(status);
            let mut t = stepping.swap_remove(j);
            let done = match kind {
                StopKind::Signal(libc::SIGTRAP) => match is_step_trap(pid, r) {
                    Ok(true) => None,
                    Ok(false) => Some(libc::SIGTRAP),
                    Err(e) => {
                        t.stopped = true;
                        stepping.push(t);
                        release(&waiting, &mut stepping);
                        return Err(e);
                    }
                },
                StopKind::Signal(sig) => Some(sig),
                StopKind::EventStop(_) => None,
                StopKind::Syscall | StopKind::Event(_) => {
                    if ptrace(libc::PTRACE_SINGLESTEP, r, 0, 0) != 0 {
                        t.attached = false;
                        gone.push(r);
                    } else {
                        stepping.push(t);
                    }
                    continue;
                }
                StopKind::Exited(_) | StopKind::Killed(_) => {
                    t.attached = false;
                    gone.push(r);
                    continue;
                }
            };
            t.stopped = true;
            match done {
                None => {
                    if let Err(e) = hand(t, &mut stepping, &mut asked) {
                        release(&waiting, &mut stepping);
                        return Err(e);
                    }
                }
                // A signal came first: deliver it and stop stepping this thread (it stays pending).
                Some(sig) => {
                    let _ = t.resume_with_signal(sig);
                }
            }
            continue;
        }
        let Some(i) = waiting.iter().position(|&t| t == r) else {
            continue;
        };
        match decode_status(status) {
            StopKind::EventStop(_) => {
                waiting.remove(i);
                let t = StoppedThread {
                    pid,
                    tid: r,
                    attached: true,
                    stopped: true,
                };
                if let Err(e) = hand(t, &mut stepping, &mut asked) {
                    release(&waiting, &mut stepping);
                    return Err(e);
                }
            }
            StopKind::Signal(sig) => {
                // Re-inject; the interrupt stays pending and the thread stops again right after.
                if ptrace(libc::PTRACE_CONT, r, 0, sig as u64) != 0 {
                    waiting.remove(i);
                    gone.push(r);
                }
            }
            StopKind::Syscall | StopKind::Event(_) => {
                if ptrace(libc::PTRACE_CONT, r, 0, 0) != 0 {
                    waiting.remove(i);
                    gone.push(r);
                }
            }
            StopKind::Exited(_) | StopKind::Killed(_) => {
                waiting.remove(i);
                gone.push(r);
            }
        }
    }
    Ok(gone)
}
