//! Interposed signal functions (PAUSE-FREE.md §4, issue 5).
//!
//! A thread that hits a transient int3 while SIGTRAP is blocked is killed (the kernel's `force_sig`
//! unblocks and resets to SIG_DFL), and an application's own SIGTRAP handler would return into the
//! middle of a site. So, when the agent is preloaded and its SIGTRAP handler is active
//! ([`crate::int3::ACTIVE`]), these exported functions come before glibc's and:
//! - record SIGTRAP actions (returned as the old action) instead of installing them; the agent's
//!   handler chains to them for every trap that is not a site;
//! - remove SIGTRAP from every `sa_mask` and from every mask given to SIG_BLOCK / SIG_SETMASK.
//!
//! The functions that wait with a temporary mask (`sigsuspend`, `pselect`, `ppoll`, `epoll_pwait`,
//! `epoll_pwait2`) get that mask without SIGTRAP too: a handler that runs while the thread waits runs
//! under it (the common `sigfillset`-minus-one `sigsuspend` of a daemon's main thread would otherwise
//! block SIGTRAP there, and make the agent refuse every stop-free write while it waits).
//!
//! When the handler is not active (an injected agent, or this rlib linked into a test binary) they
//! forward unchanged. glibc's `signal()` does not call `sigaction` through the PLT, hence `signal`,
//! `bsd_signal` and `sysv_signal` too. The real functions come from `dlsym(RTLD_NEXT, …)`, cached.
//!
//! Once this crate defines `sigaction`, its own calls to `libc::sigaction` & co. may resolve to these:
//! the agent uses [`real_sigaction`] or raw syscalls.

use crate::int3::{ACTIVE, app, mask_word, sigbit, sigset_of};
use core::ffi::{CStr, c_int};
use core::sync::atomic::{AtomicUsize, Ordering};

const NAMES: [&CStr; 11] = [
    c"sigaction",
    c"signal",
    c"bsd_signal",
    c"sysv_signal",
    c"sigprocmask",
    c"pthread_sigmask",
    c"sigsuspend",
    c"pselect",
    c"ppoll",
    c"epoll_pwait",
    c"epoll_pwait2",
];
const SIGACTION: usize = 0;
const SIGNAL: usize = 1;
const BSD_SIGNAL: usize = 2;
const SYSV_SIGNAL: usize = 3;
const SIGPROCMASK: usize = 4;
const PTHREAD_SIGMASK: usize = 5;
const SIGSUSPEND: usize = 6;
const PSELECT: usize = 7;
const PPOLL: usize = 8;
const EPOLL_PWAIT: usize = 9;
const EPOLL_PWAIT2: usize = 10;

#[allow(clippy::declare_interior_mutable_const)]
const NONE: AtomicUsize = AtomicUsize::new(0);
static REAL: [AtomicUsize; 11] = [NONE; 11];

/// The next definition of `NAMES[i]` after this object (glibc's), resolved once.
fn real(i: usize) -> usize {
    let p = REAL[i].load(Ordering::Acquire);
    if p != 0 {
        return p;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, NAMES[i].as_ptr()) } as usize;
    REAL[i].store(p, Ordering::Release);
    p
}

/// Resolves every real function (from the constructor, so a signal handler never calls dlsym).
pub fn resolve_all() {
    for i in 0..NAMES.len() {
        real(i);
    }
}

type SigactionFn = unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
type SignalFn = unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t;
type MaskFn = unsafe extern "C" fn(c_int, *const libc::sigset_t, *mut libc::sigset_t) -> c_int;

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// glibc's `sigaction`.
///
/// # Safety
/// As `sigaction(2)`: `act` and `old` are null or valid.
pub unsafe fn real_sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    let p = real(SIGACTION);
    if p == 0 {
        set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: `p` is glibc's sigaction (dlsym RTLD_NEXT), of this type.
    let f: SigactionFn = unsafe { core::mem::transmute(p) };
    // SAFETY: the caller's pointers, as sigaction(2) takes them.
    unsafe { f(sig, act, old) }
}

/// Whether the process's `sigaction` is this object's: `dlsym(RTLD_DEFAULT, "sigaction")` lies in the
/// agent (checked by object, not by address, so another preloaded interposer is not mistaken for us).
pub fn is_interposed() -> bool {
    // SAFETY: dlsym/dladdr with valid arguments; Dl_info is an out-parameter.
    unsafe {
        let found = libc::dlsym(libc::RTLD_DEFAULT, c"sigaction".as_ptr());
        if found.is_null() {
            return false;
        }
        let mut a: libc::Dl_info = core::mem::zeroed();
        let mut b: libc::Dl_info = core::mem::zeroed();
        let me = is_interposed as *const libc::c_void;
        libc::dladdr(found, &mut a) != 0 && libc::dladdr(me, &mut b) != 0 && a.dli_fbase == b.dli_fbase
    }
}

/// The object `sigaction` resolves to in this process (for messages).
pub fn sigaction_owner() -> String {
    // SAFETY: as in `is_interposed`; dli_fname is null or a NUL-terminated path owned by the loader.
    unsafe {
        let found = libc::dlsym(libc::RTLD_DEFAULT, c"sigaction".as_ptr());
        let mut a: libc::Dl_info = core::mem::zeroed();
        if found.is_null() || libc::dladdr(found, &mut a) == 0 || a.dli_fname.is_null() {
            return "an unknown object".into();
        }
        CStr::from_ptr(a.dli_fname).to_string_lossy().into_owned()
    }
}

fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

fn recorded_as_sigaction() -> libc::sigaction {
    let a = app::get();
    // SAFETY: a zeroed sigaction is valid.
    let mut out: libc::sigaction = unsafe { core::mem::zeroed() };
    out.sa_sigaction = a.handler;
    out.sa_flags = a.flags;
    out.sa_mask = sigset_of(a.mask);
    out
}

fn without_trap(set: &libc::sigset_t) -> libc::sigset_t {
    let mut s = *set;
    // SAFETY: sigdelset on a valid local set.
    unsafe { libc::sigdelset(&mut s, libc::SIGTRAP) };
    s
}

/// Interposed `sigaction`.
///
/// # Safety
/// As `sigaction(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if !active() {
        // SAFETY: forwarding the caller's arguments.
        return unsafe { real_sigaction(sig, act, old) };
    }
    if sig == libc::SIGTRAP {
        if !old.is_null() {
            // SAFETY: the caller passes a valid out-pointer.
            unsafe { *old = recorded_as_sigaction() };
        }
        if !act.is_null() {
            // SAFETY: the caller passes a valid action.
            let a = unsafe { &*act };
            app::set(app::Action {
                handler: a.sa_sigaction,
                flags: a.sa_flags,
                mask: mask_word(&a.sa_mask),
            });
        }
        return 0;
    }
    if act.is_null() {
        // SAFETY: forwarding the caller's arguments.
        return unsafe { real_sigaction(sig, act, old) };
    }
    // SAFETY: the caller passes a valid action.
    let mut a = unsafe { *act };
    a.sa_mask = without_trap(&a.sa_mask);
    // SAFETY: a valid local action and the caller's out-pointer.
    unsafe { real_sigaction(sig, &a, old) }
}

/// The `signal` family for SIGTRAP: records the action with the flags and mask glibc would use.
fn record_simple(sig: c_int, handler: libc::sighandler_t, flags: c_int, mask: u64) -> libc::sighandler_t {
    if handler == libc::SIG_ERR || sig != libc::SIGTRAP {
        set_errno(libc::EINVAL);
        return libc::SIG_ERR;
    }
    let old = app::get().handler;
    app::set(app::Action { handler, flags, mask });
    old
}

fn forward_signal(i: usize, sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    let p = real(i);
    if p == 0 {
        set_errno(libc::ENOSYS);
        return libc::SIG_ERR;
    }
    // SAFETY: `p` is glibc's function of this name and type.
    let f: SignalFn = unsafe { core::mem::transmute(p) };
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(sig, handler) }
}

/// Interposed `signal` (glibc: BSD semantics, SA_RESTART, the signal masked in its handler).
#[unsafe(no_mangle)]
pub extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if active() && sig == libc::SIGTRAP {
        return record_simple(sig, handler, libc::SA_RESTART, sigbit(sig));
    }
    forward_signal(SIGNAL, sig, handler)
}

/// Interposed `bsd_signal` (the same as `signal`).
#[unsafe(no_mangle)]
pub extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if active() && sig == libc::SIGTRAP {
        return record_simple(sig, handler, libc::SA_RESTART, sigbit(sig));
    }
    forward_signal(BSD_SIGNAL, sig, handler)
}

/// Interposed `sysv_signal` (one-shot, not masked in its handler, no restart).
#[unsafe(no_mangle)]
pub extern "C" fn sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if active() && sig == libc::SIGTRAP {
        return record_simple(sig, handler, libc::SA_RESETHAND | libc::SA_NODEFER, 0);
    }
    forward_signal(SYSV_SIGNAL, sig, handler)
}

fn forward_mask(i: usize, how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int {
    let p = real(i);
    if p == 0 {
        if i == PTHREAD_SIGMASK {
            return libc::ENOSYS;
        }
        set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: `p` is glibc's function of this name and type.
    let f: MaskFn = unsafe { core::mem::transmute(p) };
    if active() && !set.is_null() && (how == libc::SIG_BLOCK || how == libc::SIG_SETMASK) {
        // SAFETY: the caller passes a valid set.
        let s = without_trap(unsafe { &*set });
        // SAFETY: a valid local set and the caller's out-pointer.
        return unsafe { f(how, &s, old) };
    }
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(how, set, old) }
}

/// Interposed `sigprocmask`.
///
/// # Safety
/// As `sigprocmask(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    forward_mask(SIGPROCMASK, how, set, old)
}

/// Interposed `pthread_sigmask`.
///
/// # Safety
/// As `pthread_sigmask(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    forward_mask(PTHREAD_SIGMASK, how, set, old)
}

/// The caller's temporary mask without SIGTRAP when the handler is active (a copy in `buf`), else as given.
fn temp_mask(mask: *const libc::sigset_t, buf: &mut libc::sigset_t) -> *const libc::sigset_t {
    if active() && !mask.is_null() {
        // SAFETY: the caller passes a valid set.
        *buf = without_trap(unsafe { &*mask });
        buf
    } else {
        mask
    }
}

/// The real function `NAMES[i]` as a `T`, or `None` (errno ENOSYS) when glibc has none.
///
/// # Safety
/// `T` must be the C type of `NAMES[i]`.
unsafe fn real_fn<T: Copy>(i: usize) -> Option<T> {
    let p = real(i);
    if p == 0 {
        set_errno(libc::ENOSYS);
        return None;
    }
    debug_assert_eq!(core::mem::size_of::<T>(), core::mem::size_of::<usize>());
    // SAFETY: `p` is glibc's function of this name, whose type the caller gives as `T`.
    Some(unsafe { core::mem::transmute_copy(&p) })
}

/// Interposed `sigsuspend`.
///
/// # Safety
/// As `sigsuspend(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigsuspend(mask: *const libc::sigset_t) -> c_int {
    type F = unsafe extern "C" fn(*const libc::sigset_t) -> c_int;
    // SAFETY: F is sigsuspend's type.
    let Some(f) = (unsafe { real_fn::<F>(SIGSUSPEND) }) else {
        return -1;
    };
    let mut buf = sigset_of(0);
    // SAFETY: forwarding the caller's argument (or a valid local copy).
    unsafe { f(temp_mask(mask, &mut buf)) }
}

/// Interposed `pselect`.
///
/// # Safety
/// As `pselect(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pselect(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::fd_set,
        *mut libc::fd_set,
        *mut libc::fd_set,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    // SAFETY: F is pselect's type.
    let Some(f) = (unsafe { real_fn::<F>(PSELECT) }) else {
        return -1;
    };
    let mut buf = sigset_of(0);
    // SAFETY: forwarding the caller's arguments (the mask maybe as a valid local copy).
    unsafe { f(n, r, w, e, timeout, temp_mask(mask, &mut buf)) }
}

/// Interposed `ppoll`.
///
/// # Safety
/// As `ppoll(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        *mut libc::pollfd,
        libc::nfds_t,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    // SAFETY: F is ppoll's type.
    let Some(f) = (unsafe { real_fn::<F>(PPOLL) }) else {
        return -1;
    };
    let mut buf = sigset_of(0);
    // SAFETY: forwarding the caller's arguments (the mask maybe as a valid local copy).
    unsafe { f(fds, nfds, timeout, temp_mask(mask, &mut buf)) }
}

/// Interposed `epoll_pwait`.
///
/// # Safety
/// As `epoll_pwait(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const libc::sigset_t,
) -> c_int {
    type F =
        unsafe extern "C" fn(c_int, *mut libc::epoll_event, c_int, c_int, *const libc::sigset_t) -> c_int;
    // SAFETY: F is epoll_pwait's type.
    let Some(f) = (unsafe { real_fn::<F>(EPOLL_PWAIT) }) else {
        return -1;
    };
    let mut buf = sigset_of(0);
    // SAFETY: forwarding the caller's arguments (the mask maybe as a valid local copy).
    unsafe { f(epfd, events, max, timeout, temp_mask(mask, &mut buf)) }
}

/// Interposed `epoll_pwait2`.
///
/// # Safety
/// As `epoll_pwait2(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::epoll_event,
        c_int,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    // SAFETY: F is epoll_pwait2's type.
    let Some(f) = (unsafe { real_fn::<F>(EPOLL_PWAIT2) }) else {
        return -1;
    };
    let mut buf = sigset_of(0);
    // SAFETY: forwarding the caller's arguments (the mask maybe as a valid local copy).
    unsafe { f(epfd, events, max, timeout, temp_mask(mask, &mut buf)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inactive (this test binary did not preload the agent): the functions forward unchanged, SIGTRAP
    /// included, in both directions.
    #[test]
    fn t_inactive_forwards_unchanged() {
        assert!(!active());
        let s = sigset_of(sigbit(libc::SIGTRAP) | sigbit(libc::SIGUSR2));
        let mut old = sigset_of(0);
        // SAFETY: valid sets.
        let r = unsafe { pthread_sigmask(libc::SIG_BLOCK, &s, &mut old) };
        assert_eq!(r, 0);
        let mut now = sigset_of(0);
        // SAFETY: a null set (query only) and a valid out-set.
        let r = unsafe { pthread_sigmask(libc::SIG_SETMASK, core::ptr::null(), &mut now) };
        assert_eq!(r, 0);
        assert_ne!(mask_word(&now) & sigbit(libc::SIGTRAP), 0);
        // SAFETY: restores the mask.
        let r = unsafe { pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut()) };
        assert_eq!(r, 0);
    }
}
