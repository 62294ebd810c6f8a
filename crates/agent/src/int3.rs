//! The agent's SIGTRAP handler and site table for stop-free entry writes (PAUSE-FREE.md §2, issue 5).
//!
//! While the service thread writes a function entry with the int3 protocol (`stopfree::poke`), a thread
//! that executes the site traps on the transient `int3`. The handler finds the site in a table of
//! (site, dest) pairs and either emulates the new instruction (`rip = dest`, while the int3 is still
//! there) or re-executes the site (`rip = site`, the int3 is already gone: the bytes there are complete).
//! Every other SIGTRAP goes to the application's own action, recorded by the interposed `sigaction`
//! family (`crate::interpose`), exactly as the kernel would have delivered it.
//!
//! Everything the handler touches is an atomic or a raw load: it is async-signal-safe, takes no lock and
//! allocates nothing. Table entries are never removed: a thread that trapped just before the last write
//! may run its handler much later, and must still find its site (PAUSE-FREE.md §2, step 5).

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Most sites the table holds (entries are never removed; an existing site's dest is overwritten).
pub const MAX_SITES: usize = 4096;
/// Slots of the open-addressing table: twice the sites, so a probe is short.
const SLOTS: usize = 2 * MAX_SITES;
/// `si_code` of a trap raised by the CPU (int3 is delivered with SI_KERNEL on x86-64).
pub const SI_KERNEL: i32 = 0x80;
/// `si_code` of a single-step trap (EFLAGS.TF) after an instruction.
pub const TRAP_TRACE: i32 = 2;
/// `si_code` the kernel gives a single step that ends at a system call's exit with no tracer to report it
/// to (`user_single_step_report`).
pub const TRAP_BRKPT: i32 = 1;
/// Single-step traps dropped because nobody asked for them (see `chain`).
pub static STRAY_STEPS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// The breakpoint byte.
pub const INT3: u8 = 0xcc;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static SITE: [AtomicU64; SLOTS] = [ZERO; SLOTS];
static DEST: [AtomicU64; SLOTS] = [ZERO; SLOTS];
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// Every site hit the handler redirected, since the agent started.
pub static HITS: AtomicU64 = AtomicU64::new(0);
/// The handler is installed and the `sigaction` family is interposed (set once, by the constructor).
pub static ACTIVE: AtomicBool = AtomicBool::new(false);

fn slot_of(site: u64) -> usize {
    // Fibonacci hashing of the address (entries are at least 2 bytes apart, often 16).
    (site.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 51) as usize % SLOTS
}

/// The dest of `site`, if it is in the table. Async-signal-safe.
pub fn lookup(site: u64) -> Option<u64> {
    if site == 0 {
        return None;
    }
    let mut i = slot_of(site);
    for _ in 0..SLOTS {
        match SITE[i].load(Ordering::Acquire) {
            0 => return None,
            s if s == site => return Some(DEST[i].load(Ordering::Acquire)),
            _ => i = (i + 1) % SLOTS,
        }
    }
    None
}

/// How many more new sites the table can take.
pub fn free_sites() -> usize {
    MAX_SITES - COUNT.load(Ordering::Relaxed)
}

/// Puts `(site, dest)` in the table, or overwrites the dest of an existing site. One writer only (the
/// service thread); readers are signal handlers on any thread. Returns false when the table is full.
pub fn insert(site: u64, dest: u64) -> bool {
    if site == 0 {
        return false;
    }
    let mut i = slot_of(site);
    for _ in 0..SLOTS {
        match SITE[i].load(Ordering::Acquire) {
            0 => {
                if COUNT.load(Ordering::Relaxed) >= MAX_SITES {
                    return false;
                }
                // Dest first: a reader that sees the site sees its dest (Release/Acquire).
                DEST[i].store(dest, Ordering::Release);
                SITE[i].store(site, Ordering::Release);
                COUNT.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            s if s == site => {
                DEST[i].store(dest, Ordering::Release);
                return true;
            }
            _ => i = (i + 1) % SLOTS,
        }
    }
    false
}

/// The application's SIGTRAP action, as it asked for it through the interposed functions (or as it was
/// when the agent installed its handler). Kept in atomics behind a seqlock so the handler can read it.
pub mod app {
    use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    static GEN: AtomicU64 = AtomicU64::new(0);
    static WRITER: AtomicBool = AtomicBool::new(false);
    static HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
    static FLAGS: AtomicU64 = AtomicU64::new(0);
    static MASK: AtomicU64 = AtomicU64::new(0);

    /// One recorded action: handler (or SIG_DFL / SIG_IGN), sa_flags, the first 64 signals of sa_mask.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Action {
        pub handler: usize,
        pub flags: i32,
        pub mask: u64,
    }

    /// Records `a`. Signals are blocked during the update, so a SIGTRAP sent to this very thread cannot
    /// find the seqlock odd forever.
    pub fn set(a: Action) {
        let all = !0u64;
        let mut old = 0u64;
        // SAFETY: raw rt_sigprocmask with 8-byte kernel masks on live locals.
        unsafe {
            libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_BLOCK, &all, &mut old, 8);
        }
        while WRITER
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        GEN.fetch_add(1, Ordering::AcqRel);
        HANDLER.store(a.handler, Ordering::Release);
        FLAGS.store(a.flags as u32 as u64, Ordering::Release);
        MASK.store(a.mask, Ordering::Release);
        GEN.fetch_add(1, Ordering::AcqRel);
        WRITER.store(false, Ordering::Release);
        // SAFETY: as above; restores the caller's mask.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &old,
                core::ptr::null_mut::<u64>(),
                8,
            );
        }
    }

    /// The recorded action. Async-signal-safe: a bounded number of retries, then the last read.
    pub fn get() -> Action {
        let mut a = read();
        for _ in 0..1000 {
            let g1 = GEN.load(Ordering::Acquire);
            a = read();
            if g1.is_multiple_of(2) && GEN.load(Ordering::Acquire) == g1 {
                break;
            }
            core::hint::spin_loop();
        }
        a
    }

    fn read() -> Action {
        Action {
            handler: HANDLER.load(Ordering::Acquire),
            flags: FLAGS.load(Ordering::Acquire) as u32 as i32,
            mask: MASK.load(Ordering::Acquire),
        }
    }

    /// SA_RESETHAND from the handler: back to SIG_DFL without the writer lock if it is taken (the
    /// interrupted code may be this thread, inside `set`; its signals are blocked there, so this only
    /// races another thread, and the kernel makes the same reset without more care).
    pub fn reset_to_default() {
        HANDLER.store(libc::SIG_DFL, Ordering::Release);
        FLAGS.store(0, Ordering::Release);
    }
}

/// Bit of signal `sig` in a kernel (64-bit) signal mask.
pub const fn sigbit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// The first 64 signals of a glibc `sigset_t` as a kernel mask.
pub fn mask_word(set: &libc::sigset_t) -> u64 {
    // SAFETY: glibc's sigset_t is `unsigned long __val[16]`; word 0 holds signals 1..=64, bit sig-1.
    unsafe { *(set as *const libc::sigset_t as *const u64) }
}

/// A glibc `sigset_t` holding exactly the kernel mask `m`.
pub fn sigset_of(m: u64) -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is the empty set; word 0 is set as described in `mask_word`.
    unsafe {
        let mut s: libc::sigset_t = core::mem::zeroed();
        *(&mut s as *mut libc::sigset_t as *mut u64) = m;
        s
    }
}

/// The kernel's view of a signal action (`struct kernel_sigaction` of x86-64 rt_sigaction).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelSigaction {
    pub handler: usize,
    pub flags: u64,
    pub restorer: usize,
    pub mask: u64,
}

/// The real disposition of `sig` as the kernel has it (raw syscall: an application may have changed it
/// without libc).
pub fn kernel_action(sig: i32) -> Option<KernelSigaction> {
    let mut old = KernelSigaction::default();
    // SAFETY: raw rt_sigaction with a null new action and an out-pointer of the kernel's layout.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            core::ptr::null::<KernelSigaction>(),
            &mut old,
            8,
        )
    };
    (r == 0).then_some(old)
}

/// Dies by `sig` exactly as without the agent: the real disposition back to SIG_DFL, the signal
/// unblocked, then re-raised at this thread.
fn die_by(sig: i32) {
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        ..KernelSigaction::default()
    };
    let bit = sigbit(sig);
    // SAFETY: raw syscalls on live locals; tgkill targets this very thread.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            &dfl,
            core::ptr::null_mut::<KernelSigaction>(),
            8,
        );
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_UNBLOCK,
            &bit,
            core::ptr::null_mut::<u64>(),
            8,
        );
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            sig,
        );
    }
}

/// Gives a SIGTRAP that is not ours to the application's recorded action.
///
/// # Safety
/// Called from the SIGTRAP handler with the kernel's `info` and `ctx`.
unsafe fn chain(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let a = app::get();
    // SAFETY: the kernel passes a valid siginfo.
    let code = unsafe { (*info).si_code };
    if (code == TRAP_TRACE || code == TRAP_BRKPT) && a.handler == libc::SIG_DFL && !ctx.is_null() {
        // A single-step trap nobody in the process asked for: a tracer (relive's transition driver steps a
        // thread out of a patched function) was killed in the middle of a step and left EFLAGS.TF set. The
        // kernel reports it as TRAP_TRACE after an instruction, or as TRAP_BRKPT at the exit of a system
        // call; delivering this signal clears the kernel's stepping state. Clear TF too and go on, instead of
        // dying by SIGTRAP (DESIGN §4.8: a killed controller leaves a target that keeps running). An int3 is
        // SI_KERNEL, a signal sent by a process SI_USER or SI_TKILL: those still end the process.
        let uc = ctx as *mut libc::ucontext_t;
        // SAFETY: the kernel's ucontext of this thread; sigreturn restores EFLAGS from it.
        unsafe { (*uc).uc_mcontext.gregs[libc::REG_EFL as usize] &= !0x100 };
        STRAY_STEPS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match a.handler {
        libc::SIG_DFL => die_by(sig),
        libc::SIG_IGN => {
            // SAFETY: the kernel passes a valid siginfo.
            let code = unsafe { (*info).si_code };
            // Ignored when a process sent it; a CPU trap cannot be ignored (the kernel kills instead).
            if code > 0 {
                die_by(sig);
            }
        }
        h => {
            if a.flags & libc::SA_RESETHAND != 0 {
                app::reset_to_default();
            }
            // The mask the application's handler runs with: the interrupted one plus its sa_mask, as the
            // kernel would set it, never with SIGTRAP blocked (a site hit there would kill the process).
            let uc = ctx as *const libc::ucontext_t;
            let interrupted = if uc.is_null() {
                0
            } else {
                // SAFETY: ctx is the kernel's ucontext (SA_SIGINFO).
                mask_word(unsafe { &(*uc).uc_sigmask })
            };
            let mut m = interrupted | a.mask;
            if a.flags & libc::SA_NODEFER == 0 {
                m |= sigbit(sig);
            }
            m &= !sigbit(libc::SIGTRAP);
            // SAFETY: raw rt_sigprocmask on a live local; sigreturn restores the interrupted mask.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigprocmask,
                    libc::SIG_SETMASK,
                    &m,
                    core::ptr::null_mut::<u64>(),
                    8,
                );
            }
            if a.flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the application registered `h` as a three-argument SA_SIGINFO handler.
                let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { core::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: the application registered `h` as a one-argument handler.
                let f: extern "C" fn(i32) = unsafe { core::mem::transmute(h) };
                f(sig);
            }
        }
    }
}

/// The SIGTRAP handler (SA_SIGINFO | SA_NODEFER).
extern "C" fn on_sigtrap(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo and ucontext to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code == SI_KERNEL && !ctx.is_null() {
        let uc = ctx as *mut libc::ucontext_t;
        // SAFETY: as above; the ucontext is this thread's, on its stack, and restored by sigreturn.
        let rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as u64;
        let site = rip.wrapping_sub(1);
        if let Some(dest) = lookup(site) {
            // SAFETY: the thread just executed the byte at `site`: it is mapped and readable.
            let byte = unsafe { core::ptr::read_volatile(site as *const u8) };
            let to = if byte == INT3 { dest } else { site };
            // SAFETY: as above.
            unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] = to as i64 };
            HITS.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // SAFETY: called from the handler with the kernel's arguments.
    unsafe { chain(sig, info, ctx) };
}

/// The handler's address (to compare with the real disposition).
pub fn handler_addr() -> usize {
    on_sigtrap as *const () as usize
}

/// Why the handler is not installed, when it is not.
pub static NOT_INSTALLED: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);
/// [`NOT_INSTALLED`]: the agent was not preloaded.
pub const NOT_PRELOADED: u8 = 1;
/// [`NOT_INSTALLED`]: `sigaction` resolves to another object (another interposer comes first).
pub const NOT_INTERPOSED: u8 = 2;
/// [`NOT_INSTALLED`]: installing failed.
pub const INSTALL_FAILED: u8 = 3;

/// From the constructor: installs the handler when the agent was preloaded and its `sigaction` is the
/// one the process uses (PAUSE-FREE.md §4: without interposition a blocked SIGTRAP kills the target, and
/// an application's own SIGTRAP handler would return into the middle of a site).
pub fn install(preloaded: bool) {
    if !preloaded {
        NOT_INSTALLED.store(NOT_PRELOADED, Ordering::Relaxed);
        return;
    }
    if !crate::interpose::is_interposed() {
        NOT_INSTALLED.store(NOT_INTERPOSED, Ordering::Relaxed);
        return;
    }
    // The application's action as it is now (normally SIG_DFL) becomes the recorded one.
    let Some(cur) = kernel_action(libc::SIGTRAP) else {
        NOT_INSTALLED.store(INSTALL_FAILED, Ordering::Relaxed);
        return;
    };
    app::set(app::Action {
        handler: cur.handler,
        flags: cur.flags as i32,
        mask: cur.mask,
    });
    ACTIVE.store(true, Ordering::SeqCst);
    let mut mask = !0u64;
    for s in [
        libc::SIGTRAP,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
    ] {
        mask &= !sigbit(s);
    }
    // SAFETY: a zeroed sigaction is valid; the fields set are the handler, flags and mask.
    let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
    act.sa_sigaction = handler_addr();
    act.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
    act.sa_mask = sigset_of(mask);
    // SAFETY: the real sigaction (glibc's, so it sets its restorer) with a valid action.
    let r = unsafe { crate::interpose::real_sigaction(libc::SIGTRAP, &act, core::ptr::null_mut()) };
    if r != 0 {
        ACTIVE.store(false, Ordering::SeqCst);
        NOT_INSTALLED.store(INSTALL_FAILED, Ordering::Relaxed);
        return;
    }
    // A mask inherited across exec may block SIGTRAP in this (the main) thread: the interposed
    // functions never let it be blocked again, so unblock it once here.
    let bit = sigbit(libc::SIGTRAP);
    // SAFETY: raw rt_sigprocmask on a live local.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_UNBLOCK,
            &bit,
            core::ptr::null_mut::<u64>(),
            8,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_site_table_insert_lookup_overwrite() {
        assert_eq!(lookup(0x1234_5000), None);
        assert!(insert(0x1234_5000, 0x9000));
        assert!(insert(0x1234_5010, 0x9010));
        assert_eq!(lookup(0x1234_5000), Some(0x9000));
        assert!(insert(0x1234_5000, 0x9001));
        assert_eq!(lookup(0x1234_5000), Some(0x9001));
        assert_eq!(lookup(0x1234_5010), Some(0x9010));
        assert_eq!(lookup(0x1234_5001), None);
    }

    #[test]
    fn t_sigset_word_roundtrip() {
        let m = sigbit(libc::SIGTRAP) | sigbit(libc::SIGUSR1);
        let s = sigset_of(m);
        // SAFETY: sigismember on a valid set.
        assert_eq!(unsafe { libc::sigismember(&s, libc::SIGTRAP) }, 1);
        assert_eq!(mask_word(&s), m);
    }
}
