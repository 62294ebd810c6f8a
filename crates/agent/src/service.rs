//! The command channel and the service thread (DESIGN §4.7; protocol in `relive_abi::proto`).
//!
//! Two pipes: requests (controller → agent) and responses (agent → controller). The agent keeps all
//! four ends open: the request pipe's write end so its reads never see EOF when no controller is
//! connected, the response pipe's read end so it can throw away stale responses a dead controller
//! never read (otherwise the pipe could fill and block the agent). Its own ends are non-blocking;
//! the controller opens its own file descriptions through `/proc/PID/fd/N`.

use relive_abi::proto::{self, FRAME_HEADER, Request, Response};
use std::time::{Duration, Instant};

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

/// Reads exactly `buf.len()` bytes; `first_wait` decides whether to wait forever for the first byte.
/// Returns false when the bytes stopped arriving for `FRAME_TIMEOUT_MS`.
fn read_exact(fd: i32, buf: &mut [u8], first_wait: bool) -> bool {
    let mut got = 0;
    let mut last = Instant::now();
    while got < buf.len() {
        let wait = if got == 0 && first_wait {
            -1
        } else {
            proto::FRAME_TIMEOUT_MS as i32
        };
        if !poll_in(fd, wait) && last.elapsed() >= Duration::from_millis(proto::FRAME_TIMEOUT_MS) {
            return false;
        }
        // SAFETY: reading into the unfilled tail of `buf`.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr() as *mut libc::c_void, buf.len() - got) };
        if n > 0 {
            got += n as usize;
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
pub fn serve(c: Channel) -> ! {
    let mut hdr = [0u8; FRAME_HEADER];
    let mut payload = Vec::new();
    loop {
        if !read_exact(c.req_read, &mut hdr, true) {
            continue;
        }
        let h = match proto::decode_frame_header(&hdr) {
            Ok(h) => h,
            Err(e) => {
                // The stream is out of step (garbage or a dead controller's partial frame): drop
                // everything buffered and tell whoever is listening.
                drain(c.req_read);
                let seq = u32::from_le_bytes(hdr[8..12].try_into().expect("4"));
                send(
                    &c,
                    &Response::Error {
                        errno: libc::EPROTO,
                        message: format!("malformed request: {e}"),
                    }
                    .encode(seq),
                );
                continue;
            }
        };
        payload.resize(h.payload_len as usize, 0);
        if !read_exact(c.req_read, &mut payload, false) {
            continue;
        }
        let resp = match Request::decode(h.kind, &payload) {
            Ok(req) => crate::ops::handle(req),
            Err(e) => Response::Error {
                errno: libc::EPROTO,
                message: format!("malformed request: {e}"),
            },
        };
        send(&c, &resp.encode(h.seq));
    }
}
