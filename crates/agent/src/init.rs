//! The agent's constructor and fork handling.
//!
//! `agent_init` runs from `.init_array` when the library is loaded (preload or remote dlopen). It
//! installs the aborting panic hook, fills the registry header (pid, tpoff, TLS init image address,
//! pipe fds), starts the service thread and registers `pthread_atfork` handlers so that a fork child
//! gets its own channel and service thread (the parent's pipes are shared with the child otherwise).

use crate::service::{self, Channel};
use core::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use relive_abi::registry::{self as layout, Header};
use std::sync::atomic::AtomicU32;

static STARTED: AtomicBool = AtomicBool::new(false);
static CH: [AtomicI32; 4] = [
    AtomicI32::new(-1),
    AtomicI32::new(-1),
    AtomicI32::new(-1),
    AtomicI32::new(-1),
];
static SERVICE_TID: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" {
    fn pthread_atfork(
        prepare: Option<extern "C" fn()>,
        parent: Option<extern "C" fn()>,
        child: Option<extern "C" fn()>,
    ) -> libc::c_int;
}

fn channel() -> Channel {
    Channel {
        req_read: CH[0].load(Ordering::Relaxed),
        req_write: CH[1].load(Ordering::Relaxed),
        resp_read: CH[2].load(Ordering::Relaxed),
        resp_write: CH[3].load(Ordering::Relaxed),
    }
}

fn set_channel(c: Channel) {
    for (i, fd) in [c.req_read, c.req_write, c.resp_read, c.resp_write]
        .into_iter()
        .enumerate()
    {
        CH[i].store(fd, Ordering::Relaxed);
    }
}

fn preloaded() -> bool {
    let Some(pre) = std::env::var_os("LD_PRELOAD") else {
        return false;
    };
    let pre = pre.to_string_lossy();
    if pre.contains(relive_abi::AGENT_FILE_NAME) {
        return true;
    }
    // Preloaded under another file name (a package may install it so): compare with the file this library
    // was loaded from.
    let Some(own) = own_path() else {
        return false;
    };
    let name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_owned();
    pre.split([' ', ':'])
        .any(|e| !e.is_empty() && (e == own || name(e) == name(&own)))
}

/// The path this library was loaded from (`dladdr` of one of its functions).
fn own_path() -> Option<String> {
    // SAFETY: Dl_info is plain data dladdr fills; the address is of a function of this library.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above; dladdr only reads the address and writes `info`.
    if unsafe { libc::dladdr(own_path as *const libc::c_void, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the dynamic loader, valid while the library is.
    Some(
        unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Creates the channel and the service thread, and publishes both in the registry.
fn start(flags_extra: u32) {
    let c = match service::create_channel() {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "relive agent (pid {}): cannot create its command pipes: {e}",
                std::process::id()
            );
            return;
        }
    };
    set_channel(c);
    SERVICE_TID.store(0, Ordering::Relaxed);
    let h = Header {
        layout_version: layout::LAYOUT_VERSION,
        generation: 0,
        agent_pid: std::process::id(),
        agent_version: relive_abi::AGENT_VERSION,
        tpoff: crate::tls::tpoff(),
        tls_image_addr: crate::tls::init_image_addr(),
        req_fd: c.req_read,
        resp_fd: c.resp_write,
        lock_owner: 0,
        service_tid: 0,
        body_len: crate::registry::header().map_or(0, |h| h.body_len),
        body_capacity: layout::BODY_CAPACITY as u32,
        body_version: crate::registry::header().map_or(0, |h| h.body_version),
        flags: flags_extra,
        lock_since_ns: 0,
    };
    crate::registry::set_header(&h);
    // The constructor does not wait for the thread (it may run under the loader's locks): the thread
    // publishes its tid and FLAG_READY itself, and is from then on the registry's only writer.
    let spawned = std::thread::Builder::new()
        .name("relive-agent".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() } as u32;
            SERVICE_TID.store(tid, Ordering::Relaxed);
            service::remember_policy();
            if let Some(mut h) = crate::registry::header() {
                h.service_tid = tid;
                h.flags |= layout::FLAG_READY;
                crate::registry::set_header(&h);
            }
            // The membarrier registration of stop-free writes waits for every CPU; do it now, off the
            // constructor, rather than inside the first entry write.
            if crate::int3::ACTIVE.load(Ordering::Acquire) {
                let _ = crate::stopfree::prepare();
            }
            service::serve(c)
        });
    if let Err(e) = spawned {
        eprintln!(
            "relive agent (pid {}): cannot start its service thread: {e}",
            std::process::id()
        );
    }
}

extern "C" fn atfork_prepare() {
    // A callback running on the service thread may fork: it already holds BUSY.
    // SAFETY: gettid has no preconditions.
    if crate::ops::BUSY_TID.load(Ordering::Relaxed) == unsafe { libc::gettid() } {
        return;
    }
    crate::ops::lock_busy();
}

extern "C" fn atfork_parent() {
    // SAFETY: gettid has no preconditions.
    if crate::ops::BUSY_TID.load(Ordering::Relaxed) == unsafe { libc::gettid() } {
        return;
    }
    crate::ops::unlock_busy();
}

extern "C" fn atfork_child() {
    // The inherited pipes are the parent's: close our copies, make new ones and a new service thread.
    service::close_channel(channel());
    crate::ops::after_fork_child();
    crate::stopfree::after_fork_child();
    let flags = crate::registry::header().map_or(0, |h| {
        h.flags & (layout::FLAG_PRELOADED | layout::FLAG_TRAP_HANDLER)
    });
    start(flags);
    crate::ops::BUSY_TID.store(0, Ordering::Relaxed);
    crate::ops::unlock_busy();
}

/// The constructor. Idempotent.
pub extern "C" fn agent_init() {
    if STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        eprintln!(
            "relive agent (pid {}): internal error, aborting: {info}",
            std::process::id()
        );
        std::process::abort();
    }));
    // The real signal functions first (a signal handler must never be the first to call dlsym), then the
    // SIGTRAP handler of stop-free writes, before the service thread exists.
    crate::interpose::resolve_all();
    let preloaded = preloaded();
    crate::int3::install(preloaded);
    let mut flags = if preloaded { layout::FLAG_PRELOADED } else { 0 };
    if crate::int3::ACTIVE.load(Ordering::Acquire) {
        flags |= layout::FLAG_TRAP_HANDLER;
    }
    start(flags);
    // SAFETY: registers three extern "C" fns with no arguments, as pthread_atfork expects.
    unsafe { pthread_atfork(Some(atfork_prepare), Some(atfork_parent), Some(atfork_child)) };
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = agent_init;

/// Exported: whether the agent finished initialising (for tests and remote checks).
#[unsafe(no_mangle)]
pub extern "C" fn relive_agent_ready() -> libc::c_int {
    (SERVICE_TID.load(Ordering::Relaxed) != 0) as libc::c_int
}
