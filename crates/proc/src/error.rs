//! The one error type of relive-proc (DESIGN §4.1, §6): ESRCH from any call becomes
//! [`ProcError::TargetDied`]; EPERM/EACCES become [`ProcError::Permission`] with the fix.

use std::io;

/// What went wrong talking to a target process.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The process (or the thread) exited while relive was working on it.
    #[error("target died: {} exited during {during}; nothing was left half-done in it (re-run the command if it was restarted)", who(*pid, *tid))]
    TargetDied {
        pid: i32,
        tid: Option<i32>,
        during: &'static str,
    },
    /// There is no such process at all.
    #[error("no process with pid {pid} (/proc/{pid} does not exist); check the pid with `ps` or `pgrep`")]
    NoSuchProcess { pid: i32 },
    /// Not allowed to trace or read the target.
    #[error("permission denied: cannot {op} of {}: {hint}", who(*pid, *tid))]
    Permission {
        pid: i32,
        tid: Option<i32>,
        op: &'static str,
        hint: String,
    },
    /// Reading or writing target memory failed at an address (unmapped or protected).
    #[error("cannot {op} {len} bytes at {addr:#x} in pid {pid}: {source} (is the address mapped{}?)",
        if *op == "write" { " and writable" } else { "" })]
    Memory {
        pid: i32,
        addr: u64,
        len: usize,
        op: &'static str,
        source: io::Error,
    },
    /// Any other OS error.
    #[error("{op} failed for {}: {source}", who(*pid, *tid))]
    Os {
        pid: i32,
        tid: Option<i32>,
        op: &'static str,
        source: io::Error,
    },
    /// The target's state was not what relive expected (e.g. an unexpected wait status).
    #[error("{}: {detail}", who(*pid, *tid))]
    Unexpected {
        pid: i32,
        tid: Option<i32>,
        detail: String,
    },
}

fn who(pid: i32, tid: Option<i32>) -> String {
    match tid {
        Some(t) if t != pid => format!("thread {t} of pid {pid}"),
        Some(_) | None => format!("pid {pid}"),
    }
}

pub type Result<T, E = ProcError> = std::result::Result<T, E>;

impl ProcError {
    /// Classifies an OS error from operation `op` on `pid`/`tid`.
    pub fn from_os(pid: i32, tid: Option<i32>, op: &'static str, source: io::Error) -> ProcError {
        match source.raw_os_error() {
            Some(libc::ESRCH) => ProcError::TargetDied { pid, tid, during: op },
            // ptrace refuses (EPERM) to attach to an exiting task: that is a death, not a right.
            Some(libc::EPERM) | Some(libc::EACCES) if is_dead_or_dying(pid, tid) => {
                ProcError::TargetDied { pid, tid, during: op }
            }
            Some(libc::EPERM) | Some(libc::EACCES) => ProcError::Permission {
                pid,
                tid,
                op,
                hint: permission_hint_for(pid, tid),
            },
            Some(libc::ENOENT) if !process_exists(pid) => ProcError::NoSuchProcess { pid },
            _ => ProcError::Os { pid, tid, op, source },
        }
    }

    /// The last OS error (`errno`), classified.
    pub fn last_os(pid: i32, tid: Option<i32>, op: &'static str) -> ProcError {
        Self::from_os(pid, tid, op, io::Error::last_os_error())
    }

    /// Whether this error means the target (or the thread) is gone.
    pub fn is_target_died(&self) -> bool {
        matches!(
            self,
            ProcError::TargetDied { .. } | ProcError::NoSuchProcess { .. }
        )
    }

    /// Whether this is a permission problem.
    pub fn is_permission(&self) -> bool {
        matches!(self, ProcError::Permission { .. })
    }
}

/// Whether the process, or thread `tid` of it, is gone, a zombie, dead, or has SIGKILL pending
/// (being killed). ptrace answers EPERM, not ESRCH, for a task in that state. A task that is
/// still being torn down is given up to 50 ms to show it.
pub fn is_dead_or_dying(pid: i32, tid: Option<i32>) -> bool {
    for _ in 0..5 {
        if dying_now(pid, tid) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

fn dying_now(pid: i32, tid: Option<i32>) -> bool {
    let dir = |t: Option<i32>| match t {
        Some(t) => format!("/proc/{pid}/task/{t}"),
        None => format!("/proc/{pid}"),
    };
    let gone = |d: &str| {
        let state = std::fs::read(format!("{d}/stat"))
            .ok()
            .and_then(|b| crate::threads::parse_stat(&b))
            .map(|s| s.state);
        if matches!(state, None | Some('Z') | Some('X') | Some('x')) {
            return true;
        }
        // SIGKILL (bit 9) pending for the thread or the process: it is being killed.
        std::fs::read_to_string(format!("{d}/status")).is_ok_and(|st| {
            st.lines().any(|l| {
                (l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
                    && u64::from_str_radix(l[7..].trim(), 16)
                        .is_ok_and(|m| m & (1 << (libc::SIGKILL - 1)) != 0)
            })
        })
    };
    gone(&dir(None)) || tid.is_some_and(|t| gone(&dir(Some(t))))
}

/// Whether `/proc/PID` exists (a zombie still does).
pub fn process_exists(pid: i32) -> bool {
    pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The tracer of `pid` from `/proc/PID/status` (`TracerPid:`), 0 if none.
pub fn tracer_pid(pid: i32) -> Option<i32> {
    tracer_of(&format!("/proc/{pid}/status"))
}

fn tracer_of(status_path: &str) -> Option<i32> {
    let s = std::fs::read_to_string(status_path).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// What to do about EPERM/EACCES on `pid`: names root, CAP_SYS_PTRACE, Yama's ptrace_scope, a
/// container's `--cap-add=SYS_PTRACE`, and another tracer if one is attached.
pub fn permission_hint(pid: i32) -> String {
    permission_hint_for(pid, None)
}

/// [`permission_hint`] for thread `tid` of `pid`: names the thread's tracer, if another process
/// traces it.
pub fn permission_hint_for(pid: i32, tid: Option<i32>) -> String {
    let mut parts = Vec::new();
    let status = match tid {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    if let Some(t) = tracer_of(&status)
        && t != 0
        && t != std::process::id() as i32
    {
        let who = match tid {
            Some(x) if x != pid => format!("thread {x} of pid {pid}"),
            _ => format!("pid {pid}"),
        };
        parts.push(format!(
            "{who} is already traced by pid {t} (a debugger or strace?); detach it first"
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    parts.push(format!(
        "run relive as root or as the target's owner with CAP_SYS_PTRACE (you are uid {euid}; e.g. `sudo relive …` or `sudo setcap cap_sys_ptrace+ep $(which relive)`)"
    ));
    match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").map(|s| s.trim().to_string()) {
        Ok(scope) if scope != "0" => parts.push(format!(
            "Yama ptrace_scope is {scope}: with 1 only a parent may trace unless it has CAP_SYS_PTRACE; `echo 0 | sudo tee /proc/sys/kernel/yama/ptrace_scope` allows same-uid tracing (3 forbids all tracing until reboot)"
        )),
        _ => {}
    }
    if in_container() {
        parts.push(
            "this looks like a container: start it with `--cap-add=SYS_PTRACE` (and a seccomp profile that allows ptrace and process_vm_readv)"
                .into(),
        );
    } else {
        parts.push("in a container, relive needs `--cap-add=SYS_PTRACE`".into());
    }
    parts.join("; ")
}

fn in_container() -> bool {
    std::path::Path::new("/.dockerenv").exists()
        || std::fs::read_to_string("/proc/self/cgroup")
            .map(|s| {
                s.contains("docker")
                    || s.contains("kubepods")
                    || s.contains("containerd")
                    || s.contains("lxc")
            })
            .unwrap_or(false)
}
