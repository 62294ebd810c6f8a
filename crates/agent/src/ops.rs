//! What the service thread does for each request (protocol in `relive_abi::proto`).
//!
//! Every action that changes the target runs here, on the agent's own thread, never on a hijacked
//! one (DESIGN §4.6): dlopen/dlclose of patches, callbacks, stub pages, memfds, import slots.
//! The agent only acts on objects it created itself: handles it returned, memfds it made, stub
//! ranges it mapped. Anything else is refused with a message naming what was asked.

use core::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use relive_abi::proto::{Request, Response};
use std::cell::UnsafeCell;
use std::ffi::{CStr, CString};

/// One patch library loaded through the agent.
#[derive(Debug)]
struct Loaded {
    id: u64,
    dl: usize,
    base: u64,
    path: String,
    /// The memfd name when loaded from one, else the path.
    label: String,
    /// The memfd it was loaded from, kept open while the library is loaded: glibc matches dlopen
    /// requests by name first, so `/proc/self/fd/N` must not name another file while this one is
    /// loaded (a reused fd number would make dlopen return this library again).
    memfd: Option<i32>,
}

/// The agent's bookkeeping, used by one service thread at a time (guarded by [`BUSY`]).
#[derive(Debug, Default)]
struct State {
    next_id: u64,
    loaded: Vec<Loaded>,
    memfds: Vec<(i32, String)>,
    stubs: Vec<(u64, u64)>,
}

struct Cell(UnsafeCell<Option<State>>);
// SAFETY: accessed only while holding BUSY (see `with_state`).
unsafe impl Sync for Cell {}
static STATE: Cell = Cell(UnsafeCell::new(None));

/// Held while a request is being handled, and by `fork` (pthread_atfork prepare → parent/child), so
/// a fork child never inherits half-updated bookkeeping.
pub static BUSY: AtomicBool = AtomicBool::new(false);
/// The tid of the thread holding BUSY for a request (a callback that forks must not wait on itself).
pub static BUSY_TID: AtomicI32 = AtomicI32::new(0);

/// Takes BUSY, spinning politely.
pub fn lock_busy() {
    while BUSY
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::thread::yield_now();
    }
}
/// Releases BUSY.
pub fn unlock_busy() {
    BUSY.store(false, Ordering::Release);
}

fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    // SAFETY: the caller holds BUSY (handle() takes it), so no other thread touches STATE.
    let st = unsafe { &mut *STATE.0.get() };
    f(st.get_or_insert_with(|| State {
        next_id: 1,
        ..State::default()
    }))
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn err(errno: i32, message: String) -> Response {
    Response::Error { errno, message }
}

fn dlerror_msg() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated thread-local string.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown dl error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn cstring(s: &str, what: &str) -> Result<CString, Response> {
    CString::new(s).map_err(|_| err(libc::EINVAL, format!("{what} {s:?} contains a NUL byte")))
}

fn find_dl(st: &State, handle: u64) -> Result<usize, Response> {
    st.loaded
        .iter()
        .find(|l| l.id == handle)
        .map(|l| l.dl)
        .ok_or_else(|| {
            err(
                libc::ENOENT,
                format!(
                    "no patch library with handle {handle} is loaded by the agent in pid {} (loaded: {:?}); \
                 run `relive status` to list them",
                    std::process::id(),
                    st.loaded
                        .iter()
                        .map(|l| (l.id, l.path.as_str()))
                        .collect::<Vec<_>>()
                ),
            )
        })
}

fn dlsym_in(dl: usize, name: &str) -> Result<u64, Response> {
    let c = cstring(name, "symbol")?;
    // SAFETY: `dl` is a live handle from dlopen (kept in STATE until dlclose); dlerror/dlsym are
    // called on this thread only.
    unsafe {
        libc::dlerror();
        let p = libc::dlsym(dl as *mut libc::c_void, c.as_ptr());
        if p.is_null() {
            return Err(err(
                libc::ENOENT,
                format!(
                    "symbol {name:?} not found in the patch library: {}",
                    dlerror_msg()
                ),
            ));
        }
        Ok(p as u64)
    }
}

/// Handles one request. Takes BUSY for its duration.
pub fn handle(req: Request) -> Response {
    lock_busy();
    // SAFETY: gettid has no preconditions.
    BUSY_TID.store(unsafe { libc::gettid() }, Ordering::Relaxed);
    let r = with_state(|st| dispatch(st, req));
    BUSY_TID.store(0, Ordering::Relaxed);
    unlock_busy();
    r
}

fn dispatch(st: &mut State, req: Request) -> Response {
    match req {
        Request::Ping => Response::Pong {
            agent_version: relive_abi::AGENT_VERSION,
            pid: std::process::id(),
        },
        Request::LoadPath { path } => load(st, path).unwrap_or_else(|e| e),
        Request::CreateMemfd { name, size } => memfd(st, &name, size).unwrap_or_else(|e| e),
        Request::CloseFd { fd } => {
            let Some(i) = st.memfds.iter().position(|(f, _)| *f == fd) else {
                return err(
                    libc::EPERM,
                    format!("fd {fd} was not created by the agent (CreateMemfd); refusing to close it"),
                );
            };
            st.memfds.remove(i);
            // SAFETY: the fd was created by us and is closed once.
            unsafe { libc::close(fd) };
            Response::Done
        }
        Request::Dlsym { handle, name } => match find_dl(st, handle).and_then(|dl| dlsym_in(dl, &name)) {
            Ok(addr) => Response::Addr { addr },
            Err(e) => e,
        },
        Request::Unload { handle } => {
            let Some(i) = st.loaded.iter().position(|l| l.id == handle) else {
                return find_dl(st, handle).err().unwrap_or(Response::Done);
            };
            let l = st.loaded.remove(i);
            if let Some(fd) = l.memfd {
                // SAFETY: the memfd was created by us and handed to this entry; closed once.
                unsafe { libc::close(fd) };
            }
            // SAFETY: the handle came from dlopen and is closed once (removed from STATE above).
            let rc = unsafe { libc::dlclose(l.dl as *mut libc::c_void) };
            if rc != 0 {
                return err(
                    libc::EIO,
                    format!("dlclose of {} failed: {}", l.path, dlerror_msg()),
                );
            }
            Response::Done
        }
        Request::Callback { handle, name } => {
            let addr = match find_dl(st, handle).and_then(|dl| dlsym_in(dl, &name)) {
                Ok(a) => a,
                Err(e) => return e,
            };
            // SAFETY: the manifest declares `name` as a callback of type `int (*)(void)` (SPEC CB1,
            // relive.h RELIVE_CALLBACKS); the patch author is responsible for that signature.
            let f: extern "C" fn() -> libc::c_int = unsafe { core::mem::transmute(addr as usize) };
            Response::Int { value: f() }
        }
        Request::MapStubs { near, len } => map_stubs(st, near, len),
        Request::Unmap { addr, len } => {
            let Some(i) = st.stubs.iter().position(|&(a, l)| a == addr && l == len) else {
                return err(
                    libc::EPERM,
                    format!(
                        "range {addr:#x}+{len:#x} was not mapped by the agent (MapStubs); refusing to unmap it"
                    ),
                );
            };
            st.stubs.remove(i);
            // SAFETY: the range was mapped by us (MapStubs) and is unmapped once.
            unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
            Response::Done
        }
        Request::SetImport { handle, slot, value } => {
            match find_dl(st, handle).and_then(|dl| dlsym_in(dl, &slot)) {
                Ok(addr) => {
                    // SAFETY: `slot` is an import slot the patch declared (RELIVE_IMPORT / relive_patch::patch!):
                    // an 8-byte aligned, writable `void *` in the patch's data.
                    unsafe { (addr as *mut u64).write_volatile(value) };
                    Response::Done
                }
                Err(e) => e,
            }
        }
        Request::WriteBody { body_version, body } => match crate::registry::set_body(body_version, &body) {
            Ok(()) => Response::Done,
            Err(m) => err(libc::EINVAL, m),
        },
        Request::Lock { owner } => lock(owner),
        Request::List => Response::Libraries {
            libs: st
                .loaded
                .iter()
                .map(|l| relive_abi::proto::LibInfo {
                    handle: l.id,
                    base: l.base,
                    label: l.label.clone(),
                })
                .collect(),
        },
        Request::SetStates { table } => match crate::state::set_states(&table.states, &table.prev) {
            Ok(()) => Response::Done,
            Err(m) => err(libc::EINVAL, format!("pid {}: {m}", std::process::id())),
        },
        Request::StopFreeStatus => match crate::stopfree::status() {
            Ok(()) => Response::StopFree {
                ready: true,
                reason: String::new(),
            },
            Err(reason) => Response::StopFree { ready: false, reason },
        },
        Request::PokeText { sites, vouched } => crate::stopfree::poke(&sites, &vouched),
        Request::Unlock { owner } => {
            let Some(mut h) = crate::registry::header() else {
                return err(libc::EIO, "registry not initialised".into());
            };
            if h.lock_owner != owner {
                return err(
                    libc::EPERM,
                    format!(
                        "controller lock is held by pid {}, not by pid {owner}; not unlocking",
                        h.lock_owner
                    ),
                );
            }
            h.lock_owner = 0;
            h.lock_since_ns = 0;
            crate::registry::set_header(&h);
            Response::Done
        }
    }
}

fn load(st: &mut State, path: String) -> Result<Response, Response> {
    let c = cstring(&path, "path")?;
    // SAFETY: dlopen with a valid C string; errors are reported through dlerror.
    let dl = unsafe {
        libc::dlerror();
        libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL)
    };
    if dl.is_null() {
        return Err(err(
            libc::ENOENT,
            format!(
                "dlopen({path:?}) in pid {} failed: {}",
                std::process::id(),
                dlerror_msg()
            ),
        ));
    }
    let mut lm: *mut libc::c_void = core::ptr::null_mut();
    // SAFETY: RTLD_DI_LINKMAP stores a `struct link_map *` into `lm`; `l_addr` (the load bias) is the
    // first field of glibc's link_map.
    let base = unsafe {
        if libc::dlinfo(dl, libc::RTLD_DI_LINKMAP, &mut lm as *mut _ as *mut libc::c_void) != 0
            || lm.is_null()
        {
            0
        } else {
            *(lm as *const u64)
        }
    };
    let id = st.next_id;
    st.next_id += 1;
    let memfd_pos = path
        .strip_prefix("/proc/self/fd/")
        .and_then(|n| n.parse::<i32>().ok())
        .and_then(|fd| st.memfds.iter().position(|(f, _)| *f == fd));
    let (label, memfd) = match memfd_pos {
        // The memfd now belongs to the loaded library; it is closed when the library is unloaded.
        Some(i) => {
            let (fd, name) = st.memfds.remove(i);
            (name, Some(fd))
        }
        None => (path.clone(), None),
    };
    st.loaded.push(Loaded {
        id,
        dl: dl as usize,
        base,
        path,
        label,
        memfd,
    });
    Ok(Response::Loaded { handle: id, base })
}

fn memfd(st: &mut State, name: &str, size: u64) -> Result<Response, Response> {
    let c = cstring(name, "memfd name")?;
    // SAFETY: memfd_create with a valid name; the fd is recorded and closed by CloseFd.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        let e = errno();
        return Err(err(
            e,
            format!(
                "memfd_create({name:?}) failed: {}",
                std::io::Error::from_raw_os_error(e)
            ),
        ));
    }
    // SAFETY: fd is the memfd just created.
    if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
        let e = errno();
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        return Err(err(
            e,
            format!("ftruncate of memfd {name:?} to {size} bytes failed"),
        ));
    }
    st.memfds.push((fd, name.to_string()));
    Ok(Response::Fd { fd })
}

/// Maps r-x anonymous pages within ±2 GiB of `near` (DESIGN §4.3): tries 1 MiB-aligned hints at
/// growing distance, below first, with `MAP_FIXED_NOREPLACE` so nothing existing is ever replaced.
fn map_stubs(st: &mut State, near: u64, len: u64) -> Response {
    const STEP: u64 = 1 << 20;
    const REACH: u64 = (1 << 31) - (1 << 24);
    let len = (len.max(1) + 4095) & !4095;
    if len > 64 << 20 {
        return err(
            libc::EINVAL,
            format!("stub area of {len} bytes is larger than the 64 MiB limit"),
        );
    }
    let origin = near & !(STEP - 1);
    for k in 1..(REACH / STEP) {
        for cand in [origin.checked_sub(k * STEP), origin.checked_add(k * STEP)] {
            let Some(hint) = cand else { continue };
            if hint < 0x10000 || hint + len > 0x7fff_ffff_f000 {
                continue;
            }
            let far = hint.abs_diff(near).max((hint + len).abs_diff(near));
            if far >= REACH {
                continue;
            }
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; a new anonymous r-x
            // mapping harms nothing.
            let p = unsafe {
                libc::mmap(
                    hint as *mut libc::c_void,
                    len as usize,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                continue;
            }
            if p as u64 != hint {
                // Old kernels ignore MAP_FIXED_NOREPLACE and treat it as a hint.
                // SAFETY: unmapping the mapping we just created.
                unsafe { libc::munmap(p, len as usize) };
                continue;
            }
            st.stubs.push((hint, len));
            return Response::Addr { addr: hint };
        }
    }
    err(
        libc::ENOMEM,
        format!(
            "no free {len}-byte range within ±2 GiB of {near:#x} in pid {}: the address space is full there",
            std::process::id()
        ),
    )
}

/// Whether process `pid` exists (signal 0 checks existence; EPERM means it exists under another user).
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only checks for existence.
    let exists = (unsafe { libc::kill(pid as i32, 0) } == 0) || errno() == libc::EPERM;
    // A killed relive its parent has not reaped yet is a zombie: kill(0) succeeds, but it holds nothing.
    exists && !std::fs::read(format!("/proc/{pid}/stat")).is_ok_and(|s| relive_abi::procfs::exited(&s))
}

fn lock(owner: u32) -> Response {
    let Some(mut h) = crate::registry::header() else {
        return err(libc::EIO, "registry not initialised".into());
    };
    if h.lock_owner != 0 && h.lock_owner != owner && process_alive(h.lock_owner) {
        return err(
            libc::EBUSY,
            format!(
                "another relive (pid {}) holds the controller lock of pid {}; wait for it to finish",
                h.lock_owner,
                std::process::id()
            ),
        );
    }
    h.lock_owner = owner;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    h.lock_since_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    crate::registry::set_header(&h);
    Response::Done
}

/// In a fork child: forget memfds (the parent owns them) — loaded libraries and stub pages are
/// inherited and stay valid in the child.
pub fn after_fork_child() {
    with_state(|st| {
        for (fd, _) in st.memfds.drain(..) {
            // SAFETY: our own inherited copy of the fd.
            unsafe { libc::close(fd) };
        }
    });
}
