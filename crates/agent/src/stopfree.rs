//! Stop-free entry writes, done by the service thread (PAUSE-FREE.md §2, issue 5): `StopFreeStatus`
//! and `PokeText`.
//!
//! The whole write runs on the agent's service thread, so a controller killed mid-request leaves a
//! finished write, never a half one. Order, as the kernel's batched text_poke_bp: every site's
//! (addr, dest) in the handler's table, then every int3, sync, every tail, sync, every head, sync, where
//! sync is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`. Bytes go through one fd on
//! `/proc/self/mem` (FOLL_FORCE: the text stays r-x, no mprotect).

use crate::int3::{self, INT3};
use core::sync::atomic::{AtomicI32, Ordering};
use relive_abi::proto::{PokeSite, Response};
use std::time::Instant;

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 6;

/// 0: not tried yet; 1: registered; -errno: registration failed.
static MEMBARRIER: AtomicI32 = AtomicI32::new(0);
/// The fd on /proc/self/mem (-1: not open yet).
static MEM_FD: AtomicI32 = AtomicI32::new(-1);

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Registers SYNC_CORE membarrier ahead of the first stop-free write (the service thread calls this when it
/// starts, if the SIGTRAP handler is active).
pub fn prepare() -> Result<(), String> {
    ensure_membarrier()
}

/// Registers SYNC_CORE membarrier once (per mm, permanent).
fn ensure_membarrier() -> Result<(), String> {
    let mut st = MEMBARRIER.load(Ordering::Relaxed);
    if st == 0 {
        // SAFETY: membarrier takes integers only.
        let r = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
                0,
                0,
            )
        };
        st = if r == 0 { 1 } else { -errno() };
        MEMBARRIER.store(st, Ordering::Relaxed);
    }
    if st == 1 {
        Ok(())
    } else {
        Err(format!(
            "membarrier(REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) failed: {} (a seccomp filter denies it, or the kernel lacks it)",
            std::io::Error::from_raw_os_error(-st)
        ))
    }
}

/// Serialises every CPU running this process (the "sync" of the protocol).
fn sync_cores() -> Result<(), String> {
    // SAFETY: membarrier takes integers only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
            0,
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "membarrier(PRIVATE_EXPEDITED_SYNC_CORE) failed: {}",
            std::io::Error::last_os_error()
        ))
    }
}

fn mem_fd() -> Result<i32, String> {
    let fd = MEM_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        return Ok(fd);
    }
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe { libc::open(c"/proc/self/mem".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "cannot open /proc/self/mem for writing: {}",
            std::io::Error::last_os_error()
        ));
    }
    MEM_FD.store(fd, Ordering::Relaxed);
    Ok(fd)
}

/// In a fork child: the inherited /proc/self/mem fd still names the parent's memory, and membarrier
/// registration is per mm. Forget both (the child registers and opens its own when asked).
pub fn after_fork_child() {
    let fd = MEM_FD.swap(-1, Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: our own inherited copy of the fd, closed once.
        unsafe { libc::close(fd) };
    }
    MEMBARRIER.store(0, Ordering::Relaxed);
}

fn read_at(fd: i32, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    // SAFETY: pread into a live buffer of `len` bytes.
    let n = unsafe { libc::pread(fd, b.as_mut_ptr() as *mut libc::c_void, len, addr as libc::off_t) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (n as usize) < len {
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(b)
}

fn write_at(fd: i32, addr: u64, bytes: &[u8]) -> Result<(), String> {
    // SAFETY: pwrite from a live slice; /proc/self/mem writes with FOLL_FORCE (text stays r-x).
    let n = unsafe {
        libc::pwrite(
            fd,
            bytes.as_ptr() as *const libc::c_void,
            bytes.len(),
            addr as libc::off_t,
        )
    };
    if n == bytes.len() as isize {
        Ok(())
    } else {
        let e = if n < 0 {
            std::io::Error::last_os_error()
        } else {
            std::io::Error::from_raw_os_error(libc::EIO)
        };
        Err(format!(
            "writing {} bytes at {addr:#x} through /proc/self/mem failed: {e}",
            bytes.len()
        ))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

/// One thread's blocked-signal mask (field 32 of its `stat` file, opened relative to `/proc/self/task`,
/// `task`), or `None` when it exited meanwhile. `stat` costs about a third less than `status` to produce,
/// which counts with thousands of threads.
fn thread_blocked(task: &std::fs::File, tid: i32, buf: &mut Vec<u8>) -> Option<u64> {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd};
    let name = std::ffi::CString::new(format!("{tid}/stat")).expect("no NUL");
    // SAFETY: openat with a valid directory fd and a NUL-terminated relative path; the fd it returns is
    // owned by the File below, which closes it.
    let fd = unsafe { libc::openat(task.as_raw_fd(), name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    // One read: a stat line is a few hundred bytes, and read_to_end's second read (to see the end) is a
    // third of the syscalls of this scan, which runs over every thread before a stop-free write.
    buf.clear();
    buf.resize(1024, 0);
    let n = f.read(&mut buf[..]).ok()?;
    buf.truncate(n);
    if n == 1024 {
        f.read_to_end(buf).ok()?;
    }
    relive_abi::procfs::blocked_of_stat(buf)
}

/// The process's TracerPid (`/proc/self/status`): a debugger attaches to every thread (gdb, strace -p).
fn tracer_pid() -> i32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("TracerPid:").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// The threads of this process and their blocked-signal masks, from /proc/self/task/*/stat. A thread
/// that blocks SIGTRAP is read again for up to 20 ms: glibc blocks every signal for a few instructions
/// by raw syscall (pthread_kill, pthread_create, posix_spawn) without running application code meanwhile,
/// and only a thread that keeps SIGTRAP blocked is reported as blocking it.
fn threads(vouched: &[i32]) -> Result<Vec<(i32, u64)>, String> {
    let vouched: std::collections::HashSet<i32> = vouched.iter().copied().collect();
    let task =
        std::fs::File::open("/proc/self/task").map_err(|e| format!("cannot open /proc/self/task: {e}"))?;
    let rd = std::fs::read_dir("/proc/self/task").map_err(|e| format!("cannot list /proc/self/task: {e}"))?;
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(512);
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    for e in rd.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if vouched.contains(&tid) {
            continue;
        }
        // A thread that exits meanwhile is no concern.
        let Some(mut blk) = thread_blocked(&task, tid, &mut buf) else {
            continue;
        };
        // Up to 20 ms: a thread preempted inside glibc's all-blocked window (pthread_kill) can stay there
        // for a whole time slice of a loaded CPU (HZ 250: 4 ms and more), longer than the 2 ms this waited
        // before. A thread that really keeps SIGTRAP blocked costs these 20 ms once, before the fallback.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(20);
        while tid != me && blk & int3::sigbit(libc::SIGTRAP) != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(100));
            blk = thread_blocked(&task, tid, &mut buf).unwrap_or(0);
        }
        out.push((tid, blk));
    }
    out.sort();
    Ok(out)
}

/// Whether a stop-free write is possible now; the reason names what prevents it.
pub fn status() -> Result<(), String> {
    status_with(&[])
}

/// [`status`], not reading the masks of the `vouched` threads: the controller read them just now through
/// ptrace, without SIGTRAP in them.
fn status_with(vouched: &[i32]) -> Result<(), String> {
    let pid = std::process::id();
    if !int3::ACTIVE.load(Ordering::Acquire) {
        return Err(match int3::NOT_INSTALLED.load(Ordering::Relaxed) {
            int3::NOT_INTERPOSED => format!(
                "sigaction in pid {pid} resolves to {} before the agent, so the agent cannot keep SIGTRAP \
                 unblocked and its handler installed: stop-free writes are off",
                crate::interpose::sigaction_owner()
            ),
            int3::INSTALL_FAILED => {
                format!(
                    "the agent could not install its SIGTRAP handler in pid {pid}: stop-free writes are off"
                )
            }
            _ => format!(
                "the agent in pid {pid} was not preloaded (LD_PRELOAD={}) but loaded later, so it cannot \
                 interpose sigaction/sigprocmask and a thread that blocks SIGTRAP would be killed by an int3: \
                 stop-free writes are off",
                relive_abi::AGENT_FILE_NAME
            ),
        });
    }
    match int3::kernel_action(libc::SIGTRAP) {
        Some(a) if a.handler == int3::handler_addr() => {}
        Some(a) => {
            return Err(format!(
                "the SIGTRAP disposition of pid {pid} is no longer the agent's handler (it is {:#x}): the \
                 application changed it without libc (a raw rt_sigaction)",
                a.handler
            ));
        }
        None => return Err(format!("cannot read the SIGTRAP disposition of pid {pid}")),
    }
    ensure_membarrier()?;
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let tracer = tracer_pid();
    if tracer != 0 {
        return Err(format!(
            "pid {pid} is traced by pid {tracer} (a debugger would receive the int3 traps)"
        ));
    }
    for (tid, blk) in threads(vouched)? {
        if tid != me && blk & int3::sigbit(libc::SIGTRAP) != 0 {
            return Err(format!(
                "thread {tid} of pid {pid} blocks SIGTRAP (SigBlk {blk:016x}): an int3 would kill the process"
            ));
        }
    }
    Ok(())
}

fn refuse(errno: i32, message: String) -> Response {
    Response::Error { errno, message }
}

/// `PokeText`: validates every site, then the batched int3 protocol over those still to write.
pub fn poke(sites: &[PokeSite], vouched: &[i32]) -> Response {
    let start = Instant::now();
    let hits0 = int3::HITS.load(Ordering::Relaxed);
    let pid = std::process::id();
    // 1. Shapes.
    for s in sites {
        let at = s.addr;
        if !(2..=8).contains(&s.bytes.len()) || s.bytes.len() != s.expect.len() {
            return refuse(
                libc::EINVAL,
                format!(
                    "site {at:#x}: {} new bytes over {} expected; a stop-free write replaces 2 to 8 bytes with as many",
                    s.bytes.len(),
                    s.expect.len()
                ),
            );
        }
        if s.bytes[0] == INT3 || s.expect[0] == INT3 {
            return refuse(
                libc::EINVAL,
                format!("site {at:#x}: the old or new bytes start with int3 (0xcc); refusing"),
            );
        }
        if s.dest == 0 || at.checked_add(s.bytes.len() as u64).is_none() {
            return refuse(
                libc::EINVAL,
                format!("site {at:#x}: bad address or handler destination {:#x}", s.dest),
            );
        }
    }
    let mut order: Vec<&PokeSite> = sites.iter().collect();
    order.sort_by_key(|s| s.addr);
    for w in order.windows(2) {
        if w[0].addr + w[0].bytes.len() as u64 > w[1].addr {
            return refuse(
                libc::EINVAL,
                format!("sites {:#x} and {:#x} overlap", w[0].addr, w[1].addr),
            );
        }
    }
    // 2. What each site holds now.
    let fd = match mem_fd() {
        Ok(fd) => fd,
        Err(m) => return refuse(libc::EACCES, format!("pid {pid}: {m}")),
    };
    let mut todo: Vec<&PokeSite> = Vec::new();
    for s in sites {
        let cur = match read_at(fd, s.addr, s.bytes.len()) {
            Ok(b) => b,
            Err(e) => {
                return refuse(
                    libc::EFAULT,
                    format!("site {:#x}: cannot read its {} bytes: {e}", s.addr, s.bytes.len()),
                );
            }
        };
        if cur == s.bytes {
            continue; // already written (a retried request): skipped
        }
        if cur != s.expect {
            let what = if cur[0] == INT3 {
                " (an int3: a debugger, a uprobe or another tool owns it)"
            } else {
                ""
            };
            return refuse(
                libc::ESTALE,
                format!(
                    "site {:#x} holds {}{what}, expected {} (or the new {}); nothing was written",
                    s.addr,
                    hex(&cur),
                    hex(&s.expect),
                    hex(&s.bytes)
                ),
            );
        }
        todo.push(s);
    }
    // 3. Readiness, again: threads may have changed their masks since StopFreeStatus.
    if let Err(reason) = status_with(vouched) {
        return refuse(
            libc::EAGAIN,
            format!("stop-free write refused, nothing was written: {reason}"),
        );
    }
    let new_sites = todo.iter().filter(|s| int3::lookup(s.addr).is_none()).count();
    if new_sites > int3::free_sites() {
        return refuse(
            libc::ENOSPC,
            format!(
                "the agent's site table has room for {} more sites, {new_sites} are new; nothing was written",
                int3::free_sites()
            ),
        );
    }
    // 4. Every dest before the first int3.
    for s in &todo {
        if !int3::insert(s.addr, s.dest) {
            return refuse(
                libc::ENOSPC,
                format!("site {:#x}: the site table is full", s.addr),
            );
        }
    }
    let t_int3 = Instant::now();
    let written = protocol(fd, &todo);
    let int3_ns = t_int3.elapsed().as_nanos() as u64;
    if let Err(e) = written {
        return refuse(libc::EIO, format!("pid {pid}: {e}"));
    }
    // 5. Read back.
    for s in &todo {
        match read_at(fd, s.addr, s.bytes.len()) {
            Ok(b) if b == s.bytes => {}
            Ok(b) => {
                return refuse(
                    libc::EIO,
                    format!(
                        "site {:#x} holds {} after the write, not {}: another writer changed it",
                        s.addr,
                        hex(&b),
                        hex(&s.bytes)
                    ),
                );
            }
            Err(e) => return refuse(libc::EIO, format!("site {:#x}: cannot read it back: {e}", s.addr)),
        }
    }
    Response::Poked {
        sites_written: todo.len() as u32,
        hits: int3::HITS.load(Ordering::Relaxed) - hits0,
        window_ns: start.elapsed().as_nanos() as u64,
        int3_ns,
    }
}

/// The three phases. A failure in the first phase undoes the int3s written; a failed write later goes
/// back to the old bytes the same way (int3, tail, head); a failed sync after the first phase finishes
/// the write (an int3 left behind would cost every call a trap) and reports the error.
fn protocol(fd: i32, todo: &[&PokeSite]) -> Result<(), String> {
    if todo.is_empty() {
        return Ok(());
    }
    for (i, s) in todo.iter().enumerate() {
        if let Err(e) = write_at(fd, s.addr, &[INT3]) {
            for d in &todo[..i] {
                let _ = write_at(fd, d.addr, &d.expect[..1]);
            }
            let _ = sync_cores();
            return Err(format!("{e}; nothing was written"));
        }
    }
    if let Err(e) = sync_cores() {
        for d in todo {
            let _ = write_at(fd, d.addr, &d.expect[..1]);
        }
        return Err(format!("{e}; the int3s were taken back, nothing was written"));
    }
    let mut sync_err = None;
    for (phase, part) in [("tails", 1..usize::MAX), ("heads", 0..1)] {
        for s in todo {
            let r = part.start.min(s.bytes.len())..part.end.min(s.bytes.len());
            if let Err(e) = write_at(fd, s.addr + r.start as u64, &s.bytes[r.clone()]) {
                undo(fd, todo);
                return Err(format!("{e} (writing the {phase}); the old bytes were put back"));
            }
        }
        if let Err(e) = sync_cores() {
            sync_err.get_or_insert(e);
        }
    }
    match sync_err {
        None => Ok(()),
        Some(e) => Err(format!("{e}; the sites were written all the same")),
    }
}

/// Back to every site's old bytes by the same protocol (best effort, after a failed write).
fn undo(fd: i32, todo: &[&PokeSite]) {
    for s in todo {
        let _ = write_at(fd, s.addr, &[INT3]);
    }
    let _ = sync_cores();
    for s in todo {
        let _ = write_at(fd, s.addr + 1, &s.expect[1..]);
    }
    let _ = sync_cores();
    for s in todo {
        let _ = write_at(fd, s.addr, &s.expect[..1]);
    }
    let _ = sync_cores();
}
