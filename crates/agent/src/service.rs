//! The command channel and the service thread (DESIGN §4.7; protocol in `relive_abi::proto`).
//!
//! Two pipes: requests (controller → agent) and responses (agent → controller). The agent keeps all
//! four ends open: the request pipe's write end so its reads never see EOF when no controller is
//! connected, the response pipe's read end so it can throw away stale responses a dead controller
//! never read (otherwise the pipe could fill and block the agent). Its own ends are non-blocking;
//! the controller opens its own file descriptions through `/proc/PID/fd/N`.

use relive_abi::proto::{self, FRAME_HEADER, Request, Response};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// The service thread's own scheduling policy and priority, read when it starts (inherited from the
/// thread that loaded the agent); -1 before.
static OWN_POLICY: AtomicI32 = AtomicI32::new(-1);
static OWN_PRIORITY: AtomicI32 = AtomicI32::new(0);

/// How long the service thread waits for a request, idle at a policy a controller lent it, before it
/// checks whether that controller is still there.
const ORPHAN_CHECK_MS: i32 = 500;

/// Records the calling (service) thread's policy, the one to return to when a controller's boost is
/// orphaned.
pub fn remember_policy() {
    let mut p = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getscheduler/sched_getparam on the calling thread; `p` is a valid out-pointer.
    let policy = unsafe { libc::sched_getscheduler(0) };
    // SAFETY: as above.
    if policy >= 0 && unsafe { libc::sched_getparam(0, &mut p) } == 0 {
        OWN_PRIORITY.store(p.sched_priority, Ordering::Relaxed);
        OWN_POLICY.store(policy & !libc::SCHED_RESET_ON_FORK, Ordering::Relaxed);
    }
}

/// Whether a controller has moved this thread off its own policy (relive boosts the service thread to
/// SCHED_FIFO 1 for a session and gives it back when the session ends).
fn boosted() -> bool {
    let own = OWN_POLICY.load(Ordering::Relaxed);
    // SAFETY: sched_getscheduler on the calling thread has no preconditions.
    own >= 0 && (unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK) != own
}

/// Gives this thread its own policy back when the controller that boosted it is gone: no live process
/// holds the controller lock (a relive killed mid-session never restores the policy itself).
fn drop_orphaned_boost() {
    let owner = crate::registry::header().map_or(0, |h| h.lock_owner);
    if owner != 0 && crate::ops::process_alive(owner) {
        return;
    }
    let p = libc::sched_param {
        sched_priority: OWN_PRIORITY.load(Ordering::Relaxed),
    };
    // SAFETY: sched_setscheduler on the calling thread with a valid sched_param.
    unsafe { libc::sched_setscheduler(0, OWN_POLICY.load(Ordering::Relaxed), &p) };
}

/// The four pipe ends, as seen by the agent.
#[derive(Debug, Clone, Copy)]
pub struct Channel {
    pub req_read: i32,
    pub req_write: i32,
    pub resp_read: i32,
    pub resp_write: i32,
}

/// Creates the two pipes (close-on-exec, non-blocking on the agent's side).
pub fn create_channel() -> std::io::Result<Channel> {
    let mut a = [0i32; 2];
    let mut b = [0i32; 2];
    // SAFETY: pipe2 writes two fds into each array.
    unsafe {
        if libc::pipe2(a.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::pipe2(b.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(a[0]);
            libc::close(a[1]);
            return Err(e);
        }
    }
    Ok(Channel {
        req_read: a[0],
        req_write: a[1],
        resp_read: b[0],
        resp_write: b[1],
    })
}

/// Closes the four ends (used by the fork child for the copies it inherited).
pub fn close_channel(c: Channel) {
    for fd in [c.req_read, c.req_write, c.resp_read, c.resp_write] {
        // SAFETY: these fds were created by `create_channel` and are closed once per process.
        unsafe { libc::close(fd) };
    }
}

fn poll_in(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return r > 0;
    }
}

/// Reads until `buf` holds at least `n` bytes. Waits forever while `buf` is empty and
/// `first_wait` is set (checking every `ORPHAN_CHECK_MS` for an orphaned boost while boosted);
/// otherwise returns false when bytes stop arriving for `FRAME_TIMEOUT_MS` (a controller that died
/// mid-frame).
fn fill(fd: i32, buf: &mut Vec<u8>, n: usize, first_wait: bool) -> bool {
    let mut last = Instant::now();
    let mut chunk = [0u8; 16 * 1024];
    while buf.len() < n {
        let idle = buf.is_empty() && first_wait;
        let wait = match (idle, idle && boosted()) {
            (true, true) => ORPHAN_CHECK_MS,
            (true, false) => -1,
            _ => proto::FRAME_TIMEOUT_MS as i32,
        };
        if !poll_in(fd, wait) {
            if idle {
                drop_orphaned_boost();
                continue;
            }
            if last.elapsed() >= Duration::from_millis(proto::FRAME_TIMEOUT_MS) {
                return false;
            }
        }
        let want = (n - buf.len()).min(chunk.len());
        // SAFETY: reading into a local buffer of at least `want` bytes.
        let r = unsafe { libc::read(fd, chunk.as_mut_ptr() as *mut libc::c_void, want) };
        if r > 0 {
            buf.extend_from_slice(&chunk[..r as usize]);
            last = Instant::now();
        }
    }
    true
}

fn drain(fd: i32) {
    let mut junk = [0u8; 4096];
    // SAFETY: non-blocking reads into a local buffer until the pipe is empty.
    while unsafe { libc::read(fd, junk.as_mut_ptr() as *mut libc::c_void, junk.len()) } > 0 {}
}

fn send(c: &Channel, frame: &[u8]) {
    // Anything still in the response pipe was meant for a controller that is gone.
    drain(c.resp_read);
    let mut off = 0;
    let deadline = Instant::now() + Duration::from_millis(proto::FRAME_TIMEOUT_MS * 5);
    while off < frame.len() && Instant::now() < deadline {
        // SAFETY: writing from a live slice.
        let n = unsafe {
            libc::write(
                c.resp_write,
                frame[off..].as_ptr() as *const libc::c_void,
                frame.len() - off,
            )
        };
        if n > 0 {
            off += n as usize;
        } else {
            let mut p = libc::pollfd {
                fd: c.resp_write,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 50) };
        }
    }
}

/// The service thread's loop: one request at a time, forever.
///
/// Resynchronisation: bytes that do not start with the frame magic are skipped up to the next
/// possible magic (garbage, or the tail of a frame whose header was rejected); a header with the
/// magic but a bad version or length is answered with an error and its magic skipped; a frame whose
/// bytes stop arriving is dropped after `FRAME_TIMEOUT_MS`. Nothing malformed is ever acted on, and
/// the next well-formed frame is always found.
pub fn serve(c: Channel) -> ! {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if !fill(c.req_read, &mut buf, FRAME_HEADER, true) {
            buf.clear();
            continue;
        }
        if buf[..4] != proto::FRAME_MAGIC {
            let skip = buf[1..]
                .iter()
                .position(|&b| b == proto::FRAME_MAGIC[0])
                .map_or(buf.len(), |p| p + 1);
            buf.drain(..skip);
            continue;
        }
        let h = match proto::decode_frame_header(&buf[..FRAME_HEADER]) {
            Ok(h) => h,
            Err(e) => {
                let seq = u32::from_le_bytes(buf[8..12].try_into().expect("4"));
                buf.drain(..4);
                let msg = format!("malformed request: {e}");
                send(
                    &c,
                    &Response::Error {
                        errno: libc::EPROTO,
                        message: msg,
                    }
                    .encode(seq),
                );
                continue;
            }
        };
        let total = FRAME_HEADER + h.payload_len as usize;
        if !fill(c.req_read, &mut buf, total, false) {
            buf.clear();
            continue;
        }
        let frame: Vec<u8> = buf.drain(..total).collect();
        let resp = match Request::decode(h.kind, &frame[FRAME_HEADER..]) {
            Ok(req) => crate::ops::handle(req),
            Err(e) => Response::Error {
                errno: libc::EPROTO,
                message: format!("malformed request: {e}"),
            },
        };
        send(&c, &resp.encode(h.seq));
    }
}
