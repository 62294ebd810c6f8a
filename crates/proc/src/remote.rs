//! Remote calls on a hijacked thread, and injection of the agent by one remote `dlopen`
//! (DESIGN §4.6, REMOTE-CALL.md recipe R3).
//!
//! The call returns through a kernel `rt_sigframe` built on the thread's stack, whose `uc_mcontext`
//! holds the thread's saved registers and whose fpstate holds its full xstate: if the controller dies
//! at any instant, the thread finishes the call, executes `rt_sigreturn` and carries on (path (b)).
//! While the controller lives it catches that `rt_sigreturn` at its syscall-entry stop and restores
//! the thread itself inside `get_signal()`, so the kernel restarts the interrupted system call exactly
//! (`restart_block` intact: a hijacked 2 s `nanosleep` still takes 2 s).
//!
//! Trampoline: instead of mapping a page with a classic remote `mmap` (which has a crash window),
//! the return address is glibc's own `__restore_rt` (`mov $15,%rax; syscall`), found by scanning
//! libc's executable segment. The callee's return value is therefore not kept (rax is overwritten by
//! the `mov`); injection checks its result by looking for the agent afterwards.

use crate::agent::{AgentError, MapLine, dynsym_addr, mapped_file, read_maps};
use crate::xstate;
use std::path::Path;
use std::time::{Duration, Instant};

/// Errors of remote calls and injection; each names the pid/thread and what to do next.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error(
        "pid {pid} maps no glibc (libc.so.6): relive can only inject into dynamically linked glibc programs; start it with LD_PRELOAD=librelive_agent.so instead"
    )]
    NoLibc { pid: i32 },
    #[error(
        "cannot find `dlopen` in {libc} of pid {pid}: glibc older than 2.34 keeps it in libdl; start the target with LD_PRELOAD=librelive_agent.so"
    )]
    NoDlopen { pid: i32, libc: String },
    #[error(
        "cannot find glibc's rt_sigreturn trampoline (mov $15,%rax; syscall) in {libc} of pid {pid}; start the target with LD_PRELOAD=librelive_agent.so"
    )]
    NoTrampoline { pid: i32, libc: String },
    #[error(
        "{path} is not reachable from inside pid {pid}'s mount namespace/root (/proc/{pid}/root{path} is not the same file); set RELIVE_AGENT to a copy visible inside the target, or preload the agent"
    )]
    NotReachable { pid: i32, path: String },
    #[error(
        "no thread of pid {pid} was safe to hijack within {waited:?} ({attempts} attempts); threads: {threads}. Retry when the process is idle, or start it with LD_PRELOAD=librelive_agent.so"
    )]
    NoSafeThread {
        pid: i32,
        waited: Duration,
        attempts: u32,
        threads: String,
    },
    /// The OS error is part of the message (and not a `source`, which would print it twice).
    #[error("ptrace {op} on thread {tid} of pid {pid} failed: {err}{hint}")]
    Ptrace {
        pid: i32,
        tid: i32,
        op: &'static str,
        err: std::io::Error,
        /// Empty, or "; " and what to do about a permission error ([`crate::permission_hint_for`]).
        hint: String,
    },
    #[error("thread {tid} of pid {pid} exited (or the process died) during the remote call")]
    TargetDied { pid: i32, tid: i32 },
    #[error(
        "the remote call on thread {tid} of pid {pid} did not return within {timeout:?}; the thread was released and will return through its signal frame when the call finishes"
    )]
    CallTimeout { pid: i32, tid: i32, timeout: Duration },
    #[error("thread {tid} of pid {pid}: {detail}")]
    Unexpected { pid: i32, tid: i32, detail: String },
    #[error(
        "remote dlopen({path}) in thread {tid} of pid {pid} returned but the library is not mapped: dlopen failed inside the target (check its stderr; is the file readable by the target's user?)"
    )]
    DlopenFailed { pid: i32, tid: i32, path: String },
    #[error(transparent)]
    Agent(Box<AgentError>),
}

impl From<AgentError> for InjectError {
    fn from(e: AgentError) -> Self {
        InjectError::Agent(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, InjectError>;

/// A progress callback (the CLI's spinner).
pub type Progress = Box<dyn Fn(&str)>;

/// Options for [`inject_library`].
pub struct InjectOptions {
    /// How long to keep looking for a safe thread (retry with backoff).
    pub timeout: Duration,
    /// How long the remote call itself may take before the thread is released.
    pub call_timeout: Duration,
    /// Progress messages (the CLI shows them in a spinner).
    pub progress: Option<Progress>,
    /// Consider only these threads (tests use it to hijack a thread blocked in read or futex).
    pub only_tids: Option<Vec<i32>>,
}

impl std::fmt::Debug for InjectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InjectOptions")
            .field("timeout", &self.timeout)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            progress: None,
            only_tids: None,
        }
    }
}

/// What an injection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectReport {
    /// The hijacked thread.
    pub tid: i32,
    /// The system call it was blocked in.
    pub syscall: String,
    /// Threads tried (including refusals and retries).
    pub attempts: u32,
    /// Wall time of the whole injection.
    pub elapsed: Duration,
    /// Wall time of the remote call itself (registers set → thread released).
    pub call: Duration,
    /// How long the hijacked thread was stopped in all (seize → release: checks, unwinding, call).
    pub stopped: Duration,
    /// True if the restart-block guard fired: the thread returned through its signal frame and its
    /// interrupted system call was re-issued from the start (REMOTE-CALL.md guard).
    pub via_frame: bool,
    /// Whether the thread was chosen by unwinding its stack (false: system-call whitelist only,
    /// because the process image could not be read).
    pub unwound: bool,
}

// ---- ptrace plumbing ----------------------------------------------------------------------------

const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;
const PTRACE_EVENT_STOP: i32 = 128;
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

fn perr(pid: i32, tid: i32, op: &'static str) -> InjectError {
    let source = std::io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::ESRCH) && !Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
        return InjectError::TargetDied { pid, tid };
    }
    let hint = match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!("; {}", crate::permission_hint_for(pid, Some(tid))),
        _ => String::new(),
    };
    InjectError::Ptrace {
        pid,
        tid,
        op,
        err: source,
        hint,
    }
}

fn ptrace(req: libc::c_uint, tid: i32, addr: usize, data: usize) -> i64 {
    // SAFETY: every caller passes a request with the matching addr/data meaning; pointers, when
    // given, point to live buffers of the size the request writes or reads.
    unsafe { libc::ptrace(req, tid, addr as *mut libc::c_void, data as *mut libc::c_void) }
}

fn get_regs(pid: i32, tid: i32) -> Result<libc::user_regs_struct> {
    // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
    let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    if ptrace(libc::PTRACE_GETREGS, tid, 0, &mut r as *mut _ as usize) < 0 {
        return Err(perr(pid, tid, "GETREGS"));
    }
    Ok(r)
}

fn set_regs(pid: i32, tid: i32, r: &libc::user_regs_struct) -> Result<()> {
    if ptrace(libc::PTRACE_SETREGS, tid, 0, r as *const _ as usize) < 0 {
        return Err(perr(pid, tid, "SETREGS"));
    }
    Ok(())
}

/// Waits for a state change of `tid` (a traced thread), up to `deadline`.
fn wait_tid(pid: i32, tid: i32, deadline: Instant) -> Result<Option<i32>> {
    let mut nap = Duration::from_micros(5);
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status out-pointer.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        if r == tid {
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                return Err(InjectError::TargetDied { pid, tid });
            }
            return Ok(Some(status));
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(InjectError::TargetDied { pid, tid });
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_micros(500));
    }
}

fn is_event_stop(status: i32) -> bool {
    libc::WIFSTOPPED(status) && (status >> 16) == PTRACE_EVENT_STOP
}

fn is_syscall_stop(status: i32) -> bool {
    libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == (libc::SIGTRAP | 0x80)
}

/// `PTRACE_GET_SYSCALL_INFO`: (op, nr or rval).
fn syscall_info(pid: i32, tid: i32) -> Result<(u8, i64)> {
    let mut buf = [0u8; 88];
    if ptrace(PTRACE_GET_SYSCALL_INFO, tid, buf.len(), buf.as_mut_ptr() as usize) < 0 {
        return Err(perr(pid, tid, "GET_SYSCALL_INFO"));
    }
    let v = i64::from_le_bytes(buf[24..32].try_into().expect("8"));
    Ok((buf[0], v))
}

/// A thread seized and stopped for a remote call. Dropping it detaches.
struct Seized {
    tid: i32,
    attached: bool,
}

impl Seized {
    fn seize(pid: i32, tid: i32) -> Result<Seized> {
        if ptrace(libc::PTRACE_SEIZE, tid, 0, libc::PTRACE_O_TRACESYSGOOD as usize) < 0 {
            return Err(perr(pid, tid, "SEIZE"));
        }
        let s = Seized { tid, attached: true };
        if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) < 0 {
            return Err(perr(pid, tid, "INTERRUPT"));
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let Some(st) = wait_tid(pid, tid, deadline)? else {
                return Err(InjectError::Unexpected {
                    pid,
                    tid,
                    detail: "did not stop within 2 s of PTRACE_INTERRUPT".into(),
                });
            };
            if is_event_stop(st) {
                return Ok(s);
            }
            // A signal-delivery-stop: re-inject it; the pending interrupt stops the thread next.
            let sig = if libc::WIFSTOPPED(st) {
                libc::WSTOPSIG(st)
            } else {
                0
            };
            if ptrace(libc::PTRACE_CONT, tid, 0, sig as usize) < 0 {
                return Err(perr(pid, tid, "CONT"));
            }
        }
    }

    fn detach(&mut self) {
        if self.attached {
            ptrace(libc::PTRACE_DETACH, self.tid, 0, 0);
            self.attached = false;
        }
    }
}

impl Drop for Seized {
    fn drop(&mut self) {
        self.detach();
    }
}

// ---- the rt_sigframe -----------------------------------------------------------------------------

const UC_FP_XSTATE: u64 = 1;
const UC_SIGCONTEXT_SS: u64 = 2;
/// `sizeof(struct rt_sigframe)` on x86-64: pretcode 8 + ucontext 304 + siginfo 128.
const FRAME_SIZE: u64 = 8 + 304 + 128;

/// Builds the bytes of an `rt_sigframe` placed at `frame_addr` (`frame_addr` is where `pretcode`
/// sits), whose mcontext is `regs`, whose fpstate pointer is `fp_addr`.
fn build_frame(regs: &libc::user_regs_struct, mask: u64, tramp: u64, fp_addr: u64) -> Vec<u8> {
    let mut f = vec![0u8; FRAME_SIZE as usize];
    let put = |f: &mut Vec<u8>, o: usize, v: u64| f[o..o + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut f, 0, tramp); // pretcode
    let uc = 8;
    put(&mut f, uc, UC_FP_XSTATE | UC_SIGCONTEXT_SS); // uc_flags
    put(&mut f, uc + 8, 0); // uc_link
    // uc_stack: ss_flags is invalid (0xffff) so do_sigaltstack fails and the thread's altstack is
    // left untouched (restore_altstack ignores the error).
    put(&mut f, uc + 16, 0);
    f[uc + 24..uc + 28].copy_from_slice(&0xffffu32.to_le_bytes());
    put(&mut f, uc + 32, 0);
    let mc = uc + 40; // struct sigcontext
    let gp = [
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.rdi,
        regs.rsi,
        regs.rbp,
        regs.rbx,
        regs.rdx,
        regs.rax,
        regs.rcx,
        regs.rsp,
        regs.rip,
        regs.eflags,
    ];
    for (i, v) in gp.iter().enumerate() {
        put(&mut f, mc + 8 * i, *v);
    }
    // cs, gs, fs, ss (u16 each)
    let segs = [regs.cs as u16, 0, 0, regs.ss as u16];
    for (i, s) in segs.iter().enumerate() {
        f[mc + 144 + 2 * i..mc + 146 + 2 * i].copy_from_slice(&s.to_le_bytes());
    }
    // err, trapno, oldmask, cr2 = 0; fpstate pointer:
    put(&mut f, mc + 184, fp_addr);
    put(&mut f, uc + 40 + 256, mask); // uc_sigmask
    f
}

/// The trampoline: glibc's `__restore_rt`, `mov $15,%rax; syscall` (48 c7 c0 0f 00 00 00 0f 05).
const TRAMP_BYTES: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

/// Finds the trampoline in a mapped file's executable segments.
fn find_trampoline(m: &crate::agent::MappedFile) -> Option<u64> {
    use object::{Object, ObjectSegment, SegmentFlags};
    let file = m.object()?;
    for seg in file.segments() {
        let exec =
            matches!(seg.flags(), SegmentFlags::Elf { p_flags, .. } if p_flags.contains(object::elf::PF_X));
        if !exec {
            continue;
        }
        let data = seg.data().ok()?;
        if let Some(i) = data.windows(TRAMP_BYTES.len()).position(|w| w == TRAMP_BYTES) {
            return Some(m.bias + seg.address() + i as u64);
        }
    }
    None
}

/// Everything a remote call on one process needs.
#[derive(Debug, Clone, Copy)]
pub struct CallSite {
    /// Address of `mov $15,%rax; syscall`.
    pub tramp: u64,
}

impl CallSite {
    fn syscall_insn(&self) -> u64 {
        self.tramp + 7
    }
    fn after_syscall(&self) -> u64 {
        self.tramp + 9
    }
}

/// What happened to one hijack attempt.
#[derive(Debug)]
enum Attempt {
    /// The thread was not at a safe point; it was released untouched.
    Refused(String),
    /// The call ran.
    Done {
        via_frame: bool,
        syscall: String,
        call: Duration,
        stopped: Duration,
    },
}

/// System calls at which a thread may be hijacked: blocking waits that hold no libc lock when
/// called from application code (sleeps, polls, reads, waits). Memory-management calls (which
/// malloc makes while holding an arena lock) and everything else are refused.
fn safe_syscall(nr: i64) -> Option<&'static str> {
    Some(match nr {
        0 => "read",
        7 => "poll",
        17 => "pread64",
        19 => "readv",
        23 => "select",
        34 => "pause",
        35 => "nanosleep",
        43 => "accept",
        45 => "recvfrom",
        47 => "recvmsg",
        61 => "wait4",
        128 => "rt_sigtimedwait",
        130 => "rt_sigsuspend",
        202 => "futex",
        219 => "restart_syscall",
        230 => "clock_nanosleep",
        232 => "epoll_wait",
        247 => "waitid",
        270 => "pselect6",
        271 => "ppoll",
        281 => "epoll_pwait",
        288 => "accept4",
        441 => "epoll_pwait2",
        _ => return None,
    })
}

/// A rank for trying threads: sleeps and polls first, futex waits last.
fn syscall_rank(nr: i64) -> u32 {
    match nr {
        35 | 230 | 219 | 34 => 0,
        7 | 23 | 232 | 270 | 271 | 281 | 441 | 0 | 17 | 19 | 43 | 45 | 47 | 288 => 1,
        61 | 247 | 128 | 130 => 2,
        202 => 3,
        _ => 9,
    }
}

/// What `/proc/PID/task/TID/syscall` says a thread is doing.
fn thread_activity(pid: i32, tid: i32) -> (Option<i64>, String) {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
    let comm = comm.trim();
    match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")) {
        Ok(s) => {
            let first = s.split_whitespace().next().unwrap_or("");
            match first.parse::<i64>() {
                Ok(nr) => {
                    let name = safe_syscall(nr)
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("syscall {nr}"));
                    (Some(nr), format!("{tid} ({comm}): blocked in {name}"))
                }
                Err(_) if first == "running" => (None, format!("{tid} ({comm}): running")),
                Err(_) => (None, format!("{tid} ({comm}): {first}")),
            }
        }
        Err(e) => (None, format!("{tid} ({comm}): unreadable ({e})")),
    }
}

fn list_tids(pid: i32) -> Result<Vec<i32>> {
    let rd = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|_| AgentError::NoProcess { pid })?;
    let mut v: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort();
    Ok(v)
}

fn write_mem(pid: i32, tid: i32, addr: u64, bytes: &[u8]) -> Result<()> {
    let local = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: `local` describes a live slice; the kernel checks the remote range.
    let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    if n != bytes.len() as isize {
        return Err(InjectError::Unexpected {
            pid,
            tid,
            detail: format!(
                "cannot write {} bytes of the call frame at {addr:#x}: {}",
                bytes.len(),
                std::io::Error::last_os_error()
            ),
        });
    }
    Ok(())
}

/// Stack room the callee (dlopen, the agent's constructor) may use below the frame.
const STACK_MARGIN: u64 = 128 * 1024;

/// Hijacks `tid` for `func(args…)` following REMOTE-CALL.md R3, if the thread is at a safe point.
/// `data` is copied onto the thread's stack and its address replaces every `u64::MAX` in `args`.
#[allow(clippy::too_many_arguments)]
fn try_call(
    pid: i32,
    tid: i32,
    maps: &[MapLine],
    site: CallSite,
    func: u64,
    args: [u64; 6],
    data: &[u8],
    call_timeout: Duration,
    debug_kill_point: Option<u32>,
    mut unwind: Option<(&crate::image::ProcessImage, &mut relive_unwind::Unwinder)>,
) -> Result<Attempt> {
    let stopped_at = Instant::now();
    let mut th = Seized::seize(pid, tid)?;
    // Step 1: save the state.
    let saved = get_regs(pid, tid)?;
    let orig = saved.orig_rax as i64;
    let rax = saved.rax as i64;
    let in_restartable = orig >= 0
        && matches!(
            rax,
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
        );
    let Some(sys_name) = in_restartable.then(|| safe_syscall(orig)).flatten() else {
        let what = if orig < 0 {
            format!("running user code at {:#x}", saved.rip)
        } else {
            format!("in syscall {orig} (rax {rax}), not a safe point")
        };
        return Ok(Attempt::Refused(format!("{tid}: {what}")));
    };
    // The syscall must come from a file-backed executable mapping (libc's wrapper or the program's
    // own code, not a JIT or a relive stub), and the stack must have room for the callee.
    let in_file = maps.iter().any(|m| {
        saved.rip >= m.start && saved.rip < m.end && m.path.starts_with('/') && m.perms.contains('x')
    });
    if !in_file {
        return Ok(Attempt::Refused(format!(
            "{tid}: in {sys_name} from anonymous code (pc {:#x})",
            saved.rip
        )));
    }
    let Some(stack) = maps.iter().find(|m| saved.rsp > m.start && saved.rsp <= m.end) else {
        return Ok(Attempt::Refused(format!(
            "{tid}: stack pointer {:#x} is not in a mapping",
            saved.rsp
        )));
    };
    // DESIGN §4.6: the unwound stack must be reliable and hold no allocator, loader, stdio or fork
    // frame (a thread blocked inside one of those may hold the lock dlopen needs).
    if let Some((image, unwinder)) = unwind.as_mut()
        && let Some(why) = unsafe_frames(image, unwinder, pid, &saved)
    {
        return Ok(Attempt::Refused(format!("{tid}: in {sys_name}, {why}")));
    }
    let xs = xstate::get_xstate(tid).map_err(|source| InjectError::Ptrace {
        pid,
        tid,
        op: "GETREGSET(NT_X86_XSTATE)",
        err: source,
        hint: String::new(),
    })?;
    let Some(fp) = xs.as_sigframe_fpstate() else {
        return Err(InjectError::Unexpected {
            pid,
            tid,
            detail: format!(
                "its xstate is only {} bytes; cannot build a signal frame",
                xs.0.len()
            ),
        });
    };
    let mut mask = 0u64;
    if ptrace(libc::PTRACE_GETSIGMASK, tid, 8, &mut mask as *mut u64 as usize) < 0 {
        return Err(perr(pid, tid, "GETSIGMASK"));
    }

    // Step 2: the frame, below the red zone: fpstate (64-aligned, + MAGIC2), data, rt_sigframe.
    let top = saved.rsp - 128;
    let fp_addr = (top - fp.len() as u64) & !63;
    let data_addr = (fp_addr - data.len() as u64) & !15;
    let frame_addr = ((data_addr - FRAME_SIZE) & !15) - 8; // rsp % 16 == 8 at function entry
    // The main thread's [stack] grows on demand (up to RLIMIT_STACK); thread stacks are fixed.
    if stack.path != "[stack]" && frame_addr < stack.start + STACK_MARGIN {
        return Ok(Attempt::Refused(format!(
            "{tid}: less than {} KiB of stack left below {:#x}",
            STACK_MARGIN / 1024,
            saved.rsp
        )));
    }
    let mut pre = saved;
    if in_restartable {
        // Pre-restarted registers, used only if the controller dies (path (b)).
        pre.rip -= 2;
        pre.rax = saved.orig_rax;
    }
    write_mem(pid, tid, fp_addr, &fp)?;
    write_mem(pid, tid, data_addr, data)?;
    write_mem(
        pid,
        tid,
        frame_addr,
        &build_frame(&pre, mask, site.tramp, fp_addr),
    )?;

    if debug_kill_point == Some(1) {
        // SAFETY: test hook: kill ourselves at this point (REMOTE-CALL.md controller-death tests).
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    // Step 3: enter the function.
    let mut call = saved;
    call.rip = func;
    call.rsp = frame_addr;
    let a: Vec<u64> = args
        .iter()
        .map(|&x| if x == u64::MAX { data_addr } else { x })
        .collect();
    (call.rdi, call.rsi, call.rdx, call.rcx, call.r8, call.r9) = (a[0], a[1], a[2], a[3], a[4], a[5]);
    call.rax = 0;
    call.orig_rax = u64::MAX;
    let call_at = Instant::now();
    set_regs(pid, tid, &call)?;

    // Step 4: run until the rt_sigreturn entry from the trampoline.
    if ptrace(libc::PTRACE_SYSCALL, tid, 0, 0) < 0 {
        return Err(perr(pid, tid, "SYSCALL"));
    }
    let deadline = Instant::now() + call_timeout;
    let mut hazard = false;
    let entry_regs = loop {
        let Some(st) = wait_tid(pid, tid, deadline)? else {
            th.detach();
            return Err(InjectError::CallTimeout {
                pid,
                tid,
                timeout: call_timeout,
            });
        };
        let mut sig = 0;
        if is_syscall_stop(st) {
            let r = get_regs(pid, tid)?;
            let (op, v) = syscall_info(pid, tid)?;
            if op == 1 && r.orig_rax == 15 && r.rip == site.after_syscall() {
                break r;
            }
            // Restart-block guard: the callee sleeps or got its own sleep restarted.
            if (op == 1 && matches!(v, 35 | 230 | 219)) || (op == 2 && v == ERESTART_RESTARTBLOCK) {
                hazard = true;
            }
        } else if is_event_stop(st) {
            // PTRACE_INTERRUPT leftovers or a group stop: keep going.
        } else if libc::WIFSTOPPED(st) {
            sig = libc::WSTOPSIG(st); // signal-delivery-stop: deliver it, the handler nests below our frame
        }
        if ptrace(libc::PTRACE_SYSCALL, tid, 0, sig as usize) < 0 {
            return Err(perr(pid, tid, "SYSCALL"));
        }
    };
    if debug_kill_point == Some(2) {
        // SAFETY: test hook, see above.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    if hazard && rax == ERESTART_RESTARTBLOCK {
        // The original restart_block is gone: let the frame restore the thread (path (b)).
        th.detach();
        return Ok(Attempt::Done {
            via_frame: true,
            syscall: sys_name.into(),
            call: call_at.elapsed(),
            stopped: stopped_at.elapsed(),
        });
    }
    // Step 6: skip this rt_sigreturn and leave the thread about to run it again.
    let mut rewound = entry_regs;
    rewound.rip = site.syscall_insn();
    rewound.rax = 15;
    rewound.orig_rax = u64::MAX;
    set_regs(pid, tid, &rewound)?;
    // Step 7: interrupt + continue: the thread stops inside get_signal() with no syscall-exit stop.
    if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) < 0 {
        return Err(perr(pid, tid, "INTERRUPT"));
    }
    if ptrace(libc::PTRACE_CONT, tid, 0, 0) < 0 {
        return Err(perr(pid, tid, "CONT"));
    }
    if debug_kill_point == Some(3) {
        // SAFETY: test hook, see above.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let Some(st) = wait_tid(pid, tid, deadline)? else {
            th.detach();
            return Err(InjectError::Unexpected {
                pid,
                tid,
                detail: "no stop after the rewound rt_sigreturn; released it to its signal frame".into(),
            });
        };
        if is_event_stop(st) {
            break;
        }
        if libc::WIFSTOPPED(st) {
            // A signal arrived first (not seen in practice): let the frame restore the thread, with
            // the signal delivered (its handler runs, then rt_sigreturn: path (b)).
            ptrace(libc::PTRACE_DETACH, tid, 0, libc::WSTOPSIG(st) as usize);
            th.attached = false;
            return Ok(Attempt::Done {
                via_frame: true,
                syscall: sys_name.into(),
                call: call_at.elapsed(),
                stopped: stopped_at.elapsed(),
            });
        }
    }
    // Step 8: restore, in this order: xstate, signal mask, general registers (unmodified).
    xstate::set_xstate(tid, &xs).map_err(|source| InjectError::Ptrace {
        pid,
        tid,
        op: "SETREGSET(NT_X86_XSTATE)",
        err: source,
        hint: String::new(),
    })?;
    if ptrace(libc::PTRACE_SETSIGMASK, tid, 8, &mask as *const u64 as usize) < 0 {
        return Err(perr(pid, tid, "SETSIGMASK"));
    }
    set_regs(pid, tid, &saved)?;
    // Step 9: release; the kernel restarts the interrupted call exactly.
    th.detach();
    Ok(Attempt::Done {
        via_frame: false,
        syscall: sys_name.into(),
        call: call_at.elapsed(),
        stopped: stopped_at.elapsed(),
    })
}

/// Functions a hijacked thread must not be inside: the allocator, the dynamic loader, stdio, fork
/// and exit paths (each may hold a lock that dlopen or the agent's constructor takes).
fn unsafe_function(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "malloc",
        "free",
        "calloc",
        "realloc",
        "cfree",
        "valloc",
        "pvalloc",
        "memalign",
        "posix_memalign",
        "aligned_alloc",
        "malloc_trim",
        "mallinfo",
        "mallinfo2",
        "fork",
        "_Fork",
        "vfork",
        "exit",
        "_exit",
        "abort",
        "pthread_create",
        "pthread_join",
        "printf",
        "fprintf",
        "vfprintf",
        "dprintf",
        "puts",
        "fputs",
        "fwrite",
        "fflush",
        "fopen",
        "fclose",
        "backtrace",
        "getaddrinfo",
        "setlocale",
        "atexit",
        "__cxa_atexit",
        "__cxa_finalize",
    ];
    const PREFIXES: &[&str] = &[
        "_dl_",
        "__dl",
        "dl",
        "_IO_",
        "__libc_malloc",
        "__libc_free",
        "__libc_calloc",
        "__libc_realloc",
        "__libc_memalign",
        "_int_",
        "__malloc",
        "__run_exit_handlers",
        "__libc_fork",
        "__GI__IO",
        "__libc_dl",
        "__rust_alloc",
        "__rust_dealloc",
        "__rust_realloc",
        "__rdl_",
        "__rg_",
    ];
    // A thread blocked reading a FILE (fgets, getline, fread on stdin) holds only that FILE's lock,
    // which neither dlopen nor the agent takes: allowed.
    let stdio_input = ["read", "underflow", "uflow", "getline"]
        .iter()
        .any(|w| name.contains(w))
        && (name.starts_with("_IO_") || name.starts_with("__GI__IO") || name.starts_with("__uflow"));
    !stdio_input && (EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p)))
}

/// Unwinds the stopped thread; returns why it is not a safe place, or `None` if it is.
fn unsafe_frames(
    image: &crate::image::ProcessImage,
    unwinder: &mut relive_unwind::Unwinder,
    pid: i32,
    regs: &libc::user_regs_struct,
) -> Option<String> {
    let mut reader = crate::mem::PageCacheReader::new(pid);
    let start = relive_unwind::StartRegs {
        ip: regs.rip,
        sp: regs.rsp,
        bp: regs.rbp,
    };
    let stack = unwinder.unwind(start, &mut reader, relive_unwind::DEFAULT_MAX_DEPTH);
    if let relive_unwind::Verdict::Unreliable(why) = &stack.verdict {
        return Some(format!("stack not reliable ({why})"));
    }
    for f in &stack.frames {
        let sym = image.symbolize(relive_elf::Avma(f.lookup_pc()));
        if let Some(name) = sym.function.as_deref()
            && unsafe_function(name)
        {
            return Some(format!(
                "inside {name} (allocator, loader, stdio or fork: may hold a lock)"
            ));
        }
    }
    None
}

/// `TracerPid` of a thread (0 if none or unreadable).
fn tracer_of(pid: i32, tid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn is_libc(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with("libc.so") || base.starts_with("libc-2")
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Injects the shared library at `path` into `pid` with one remote `dlopen(path, RTLD_NOW)` on a
/// thread blocked in a safe system call, retrying with backoff until `opts.timeout`.
///
/// Thread choice: a thread is hijacked only if, once stopped, it is inside a whitelisted blocking
/// system call ([`safe_syscall`]) entered from file-backed code, with room on its stack, and its
/// stack unwinds reliably (relive-unwind) with no allocator, loader, stdio or fork frame
/// ([`unsafe_function`]); running threads and threads in any other system call (mmap/brk inside
/// malloc, …) are refused. `RELIVE_DEBUG_INJECT_KILL=N` kills the controller at point N (tests only).
pub fn inject_library(pid: i32, path: &Path, opts: &InjectOptions) -> Result<InjectReport> {
    inject_library_with(pid, path, opts, None)
}

/// What thread choice by unwinding needs: the process image (modules, symbols) and an unwinder
/// over it. Reading them is the slow part of an injection (tens of ms to a second for big
/// binaries); a caller that injects many times reads them once.
pub struct ThreadChooser {
    pub image: crate::image::ProcessImage,
    pub unwinder: relive_unwind::Unwinder,
}

impl std::fmt::Debug for ThreadChooser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadChooser")
            .field("pid", &self.image.pid)
            .finish()
    }
}

impl ThreadChooser {
    /// Reads the image of `pid`. Modules mapped later have no unwind info in it: threads inside
    /// them are refused.
    pub fn load(pid: i32) -> std::result::Result<ThreadChooser, crate::error::ProcError> {
        let image = crate::image::ProcessImage::load(pid, &crate::image::ImageOptions::default())?;
        let unwinder = image.unwinder();
        Ok(ThreadChooser { image, unwinder })
    }
}

/// [`inject_library`] with a [`ThreadChooser`] read before (reused across injections).
pub fn inject_library_with(
    pid: i32,
    path: &Path,
    opts: &InjectOptions,
    chooser: Option<&mut ThreadChooser>,
) -> Result<InjectReport> {
    let start = Instant::now();
    let path_str = path.to_string_lossy().into_owned();
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(AgentError::NoProcess { pid }.into());
    }
    if !same_file(
        path,
        &Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path)),
    ) {
        return Err(InjectError::NotReachable { pid, path: path_str });
    }
    let maps = read_maps(pid)?;
    let libc_path = maps
        .iter()
        .find(|m| is_libc(&m.path))
        .map(|m| m.path.clone())
        .ok_or(InjectError::NoLibc { pid })?;
    let libc = mapped_file(pid, &maps, &libc_path)?;
    let dlopen = dynsym_addr(&libc, "dlopen").ok_or_else(|| InjectError::NoDlopen {
        pid,
        libc: libc_path.clone(),
    })?;
    let tramp = find_trampoline(&libc).ok_or_else(|| InjectError::NoTrampoline {
        pid,
        libc: libc_path.clone(),
    })?;
    let site = CallSite { tramp };
    let mut data = path_str.clone().into_bytes();
    data.push(0);
    let args = [u64::MAX, (libc::RTLD_NOW | libc::RTLD_GLOBAL) as u64, 0, 0, 0, 0];
    let kill_point = std::env::var("RELIVE_DEBUG_INJECT_KILL")
        .ok()
        .and_then(|v| v.parse().ok());
    // Thread choice by unwinding (DESIGN §4.6). If the process image cannot be read (e.g. a deleted
    // object without CAP_SYS_ADMIN), fall back to the system-call whitelist alone.
    let mut loaded;
    let chooser = match chooser {
        Some(c) => Some(c),
        None => {
            loaded = ThreadChooser::load(pid).ok();
            loaded.as_mut()
        }
    };
    let unwound = chooser.is_some();
    let mut chooser = chooser;
    // Never hijack the agent's own service thread (a re-injection into a process that has it).
    let service_tid = crate::agent::find_agent(pid)
        .ok()
        .and_then(|l| crate::agent::read_registry(&l).ok())
        .map(|s| s.header.service_tid as i32);

    let mut attempts = 0u32;
    let mut backoff = Duration::from_millis(2);
    let progress = |m: &str| {
        if let Some(p) = &opts.progress {
            p(m)
        }
    };
    loop {
        let tids = list_tids(pid)?;
        let mut cands: Vec<(u32, i32, String)> = Vec::new();
        let mut seen = Vec::new();
        for &tid in &tids {
            let (nr, desc) = thread_activity(pid, tid);
            let allowed =
                opts.only_tids.as_ref().is_none_or(|o| o.contains(&tid)) && Some(tid) != service_tid;
            if let Some(nr) = nr.filter(|&n| allowed && safe_syscall(n).is_some()) {
                cands.push((syscall_rank(nr), tid, desc.clone()));
            }
            seen.push(desc);
        }
        cands.sort();
        for (_, tid, desc) in &cands {
            attempts += 1;
            progress(&format!("hijacking thread {desc}"));
            let unwind = chooser.as_deref_mut().map(|c| (&c.image, &mut c.unwinder));
            match try_call(
                pid,
                *tid,
                &maps,
                site,
                dlopen,
                args,
                &data,
                opts.call_timeout,
                kill_point,
                unwind,
            ) {
                Ok(Attempt::Done {
                    via_frame,
                    syscall,
                    call,
                    stopped,
                }) => {
                    // /proc/PID/maps is read in chunks and may skip a line while the target maps
                    // and unmaps memory concurrently (malloc): look a few times before concluding.
                    let mut mapped = false;
                    for _ in 0..5 {
                        mapped = read_maps(pid)?.iter().any(|m| {
                            // (deleted): the file was replaced on disk after it was first loaded;
                            // dlopen matched it by name and bumped its reference count.
                            m.path.strip_suffix(" (deleted)").unwrap_or(&m.path) == path_str
                                || same_file(Path::new(&format!("/proc/{pid}/root{}", m.path)), path)
                        });
                        if mapped {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    if !mapped {
                        return Err(InjectError::DlopenFailed {
                            pid,
                            tid: *tid,
                            path: path_str,
                        });
                    }
                    return Ok(InjectReport {
                        tid: *tid,
                        syscall,
                        attempts,
                        elapsed: start.elapsed(),
                        call,
                        stopped,
                        via_frame,
                        unwound,
                    });
                }
                Ok(Attempt::Refused(why)) => {
                    if let Some(s) = seen.iter_mut().find(|s| s.starts_with(&format!("{tid} "))) {
                        *s = format!("{s}, refused when stopped: {why}");
                    }
                }
                Err(InjectError::TargetDied { .. }) if crate::agent::read_maps(pid).is_ok() => {} // that thread exited
                // Another tracer (a debugger, another relive) holds this thread: try the others.
                // EPERM with no tracer is a permission problem: report it at once.
                Err(InjectError::Ptrace { op: "SEIZE", err, .. })
                    if err.raw_os_error() == Some(libc::EPERM) && tracer_of(pid, *tid) != 0 =>
                {
                    let tracer = tracer_of(pid, *tid);
                    if let Some(s) = seen.iter_mut().find(|s| s.starts_with(&format!("{tid} "))) {
                        *s = format!("{s}, already traced by pid {tracer}");
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if start.elapsed() >= opts.timeout {
            return Err(InjectError::NoSafeThread {
                pid,
                waited: opts.timeout,
                attempts,
                threads: seen.join("; "),
            });
        }
        progress(&format!(
            "no thread of pid {pid} is at a safe point yet; retrying in {backoff:?}"
        ));
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_d4_6_unsafe_functions() {
        for f in [
            "malloc",
            "_int_malloc",
            "_dl_open",
            "dlopen",
            "_IO_fwrite",
            "fork",
            "__rust_alloc",
            "fflush",
        ] {
            assert!(unsafe_function(f), "{f}");
        }
        for f in [
            "nanosleep",
            "read",
            "main",
            "_IO_getline_info",
            "_IO_file_underflow",
            "fgets",
            "pthread_cond_wait",
        ] {
            assert!(!unsafe_function(f), "{f}");
        }
    }

    #[test]
    fn t_frame_layout_matches_kernel_sigcontext() {
        // SAFETY: plain old data, zero is valid.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        r.r8 = 8;
        r.rip = 0x1234;
        r.rsp = 0x7000;
        r.eflags = 0x246;
        r.cs = 0x33;
        r.ss = 0x2b;
        let f = build_frame(&r, 0xdead, 0x4000, 0x9000);
        let q = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
        assert_eq!(q(0), 0x4000); // pretcode
        assert_eq!(q(8), UC_FP_XSTATE | UC_SIGCONTEXT_SS);
        assert_eq!(q(48), 8); // uc_mcontext.r8
        assert_eq!(q(48 + 8 * 15), 0x7000); // rsp
        assert_eq!(q(48 + 8 * 16), 0x1234); // rip
        assert_eq!(q(48 + 8 * 17), 0x246); // eflags
        assert_eq!(u16::from_le_bytes([f[48 + 144], f[48 + 145]]), 0x33);
        assert_eq!(u16::from_le_bytes([f[48 + 150], f[48 + 151]]), 0x2b);
        assert_eq!(q(48 + 184), 0x9000); // fpstate
        assert_eq!(q(8 + 40 + 256), 0xdead); // uc_sigmask
    }
}
