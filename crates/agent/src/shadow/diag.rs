//! Rate-limited diagnostics of the shadow store, written straight to fd 2.
//!
//! DESIGN §4.2: the agent's code that runs on target threads stays off `println!`/`eprintln!` (std's
//! stdio takes a lock and may touch std's general-dynamic thread-locals). A line is formatted into a
//! stack buffer with `core::fmt` (no allocation) and written with one `write(2)`, so lines from
//! different threads never interleave. At most [`BURST`] lines are printed per [`WINDOW_NS`]; the
//! rest are counted and reported as one "suppressed" line when the next window opens.

use core::fmt::{self, Write as _};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Lines printed per window before suppression starts.
pub const BURST: u64 = 10;
/// Length of a rate-limit window: 5 s, like the kernel's default `printk_ratelimit` interval.
pub const WINDOW_NS: u64 = 5_000_000_000;

/// Counters of one store's diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiagCounts {
    /// Diagnostics raised (printed or not).
    pub raised: u64,
    /// Diagnostics dropped by the rate limit.
    pub suppressed: u64,
}

/// The rate limiter (lock-free: a window start and a count in the window).
pub(crate) struct Diag {
    window_start: AtomicU64,
    in_window: AtomicU64,
    pending_suppressed: AtomicU64,
    raised: AtomicU64,
    suppressed: AtomicU64,
}

impl Diag {
    pub(crate) const fn new() -> Self {
        Diag {
            window_start: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            pending_suppressed: AtomicU64::new(0),
            raised: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    pub(crate) fn counts(&self) -> DiagCounts {
        DiagCounts {
            raised: self.raised.load(Relaxed),
            suppressed: self.suppressed.load(Relaxed),
        }
    }

    /// Raises one diagnostic: prints `relive-agent[PID]: shadow: <args>` unless rate-limited.
    pub(crate) fn emit(&self, args: fmt::Arguments<'_>) {
        self.raised.fetch_add(1, Relaxed);
        let now = monotonic_ns();
        let start = self.window_start.load(Relaxed);
        if now.saturating_sub(start) >= WINDOW_NS
            && self
                .window_start
                .compare_exchange(start, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.in_window.store(0, Relaxed);
            let dropped = self.pending_suppressed.swap(0, Relaxed);
            if dropped > 0 {
                write_line(format_args!(
                    "{dropped} shadow-variable diagnostics suppressed (rate limit)"
                ));
            }
        }
        if self.in_window.fetch_add(1, Relaxed) < BURST {
            write_line(args);
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            self.pending_suppressed.fetch_add(1, Relaxed);
        }
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// A fixed stack buffer that `core::fmt` writes into; overlong text is cut (and marked with `…`).
struct LineBuf {
    buf: [u8; 320],
    len: usize,
    cut: bool,
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - 4 - self.len; // keep room for "...\n"
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            self.cut = true;
        }
        Ok(())
    }
}

fn write_line(args: fmt::Arguments<'_>) {
    let mut line = LineBuf {
        buf: [0; 320],
        len: 0,
        cut: false,
    };
    // SAFETY: getpid has no preconditions and cannot fail.
    let pid = unsafe { libc::getpid() };
    let _ = write!(line, "relive-agent[{pid}]: shadow: ");
    let _ = line.write_fmt(args);
    if line.cut {
        line.buf[line.len..line.len + 3].copy_from_slice(b"...");
        line.len += 3;
    }
    line.buf[line.len] = b'\n';
    line.len += 1;
    // SAFETY: the pointer and length describe the initialised prefix of `line.buf`; a short or
    // failed write of a diagnostic is ignored (there is nowhere else to report it).
    let _ = unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
}
