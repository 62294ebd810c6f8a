//! The one error type of relive-proc (DESIGN §4.1, §6): ESRCH from any call becomes
//! [`ProcError::TargetDied`]; EPERM/EACCES become [`ProcError::Permission`] with the fix.

use std::io;

/// What went wrong talking to a target process.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The process (or the thread) exited while relive was working on it.
    #[error("target died: {} exited during {}; nothing was left half-done in it (re-run the command if it was restarted)", who(*pid, *tid), op_text(during, *pid, *tid))]
    TargetDied {
        pid: i32,
        tid: Option<i32>,
        during: &'static str,
    },
    /// There is no such process at all.
    #[error("no process with pid {pid} (/proc/{pid} does not exist); check the pid with `ps` or `pgrep`")]
    NoSuchProcess { pid: i32 },
    /// Not allowed to trace or read the target: the OS error (EACCES "Permission denied" or EPERM
    /// "Operation not permitted") and what to do about it ([`permission_hint_for`]).
    #[error("cannot {} of {}: {err}; {hint}", op_text(op, *pid, *tid), who(*pid, *tid))]
    Permission {
        pid: i32,
        tid: Option<i32>,
        op: &'static str,
        err: io::Error,
        hint: String,
    },
    /// Reading or writing target memory failed at an address (unmapped or protected).
    #[error("cannot {op} {len} bytes at {addr:#x} in pid {pid}: {err} (is the address mapped{}?)",
        if *op == "write" { " and writable" } else { "" })]
    Memory {
        pid: i32,
        addr: u64,
        len: usize,
        op: &'static str,
        /// In the message only, not a `source()`: anyhow's `{:#}` would print it twice.
        err: io::Error,
    },
    /// Any other OS error.
    #[error("{} failed for {}: {err}", op_text(op, *pid, *tid), who(*pid, *tid))]
    Os {
        pid: i32,
        tid: Option<i32>,
        op: &'static str,
        /// In the message only, as for `Memory`.
        err: io::Error,
    },
    /// The target's state was not what relive expected (e.g. an unexpected wait status).
    #[error("{}: {detail}", who(*pid, *tid))]
    Unexpected {
        pid: i32,
        tid: Option<i32>,
        detail: String,
    },
}

/// `op` with the placeholders of paths such as "read /proc/PID/task/TID/stat" replaced by the numbers.
fn op_text(op: &str, pid: i32, tid: Option<i32>) -> String {
    let s = op.replace("/proc/PID/", &format!("/proc/{pid}/"));
    match tid {
        Some(t) => s.replace("/TID/", &format!("/{t}/")),
        None => s,
    }
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
                err: source,
                hint: permission_hint_for(pid, tid),
            },
            Some(libc::ENOENT) if !process_exists(pid) => ProcError::NoSuchProcess { pid },
            _ => ProcError::Os {
                pid,
                tid,
                op,
                err: source,
            },
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

/// What to do about EPERM/EACCES on `pid`: another tracer if one is attached; for a user without
/// CAP_SYS_PTRACE, the target's owner, root or CAP_SYS_PTRACE; for root (or a holder of CAP_SYS_PTRACE),
/// the causes left (a missing capability in a container, seccomp, an LSM, a protected process); Yama's
/// ptrace_scope only where Yama exists and restricts tracing.
pub fn permission_hint(pid: i32) -> String {
    permission_hint_for(pid, None)
}

/// [`permission_hint`] for thread `tid` of `pid`: names the thread's tracer, if another process
/// traces it.
pub fn permission_hint_for(pid: i32, tid: Option<i32>) -> String {
    let status = match tid {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let facts = HintFacts {
        who: who(pid, tid),
        tracer: tracer_of(&status).filter(|&t| t != 0 && t != std::process::id() as i32),
        target_uid: status_uid(&format!("/proc/{pid}/status")),
        euid,
        cap_sys_ptrace: has_cap_sys_ptrace(),
        yama_scope: std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
            .ok()
            .map(|s| s.trim().to_string()),
        container: in_container(),
    };
    hint_text(&facts)
}

/// What [`permission_hint_for`] looks at, gathered first so that the wording can be tested.
#[derive(Debug, Clone)]
struct HintFacts {
    /// "pid P" or "thread T of pid P".
    who: String,
    /// Another process tracing the target, if any.
    tracer: Option<i32>,
    /// The target's real uid (`/proc/PID/status`, readable without ptrace rights).
    target_uid: Option<u32>,
    /// relive's effective uid.
    euid: u32,
    /// Whether relive's effective capabilities include CAP_SYS_PTRACE.
    cap_sys_ptrace: bool,
    /// `/proc/sys/kernel/yama/ptrace_scope`, `None` without Yama.
    yama_scope: Option<String>,
    /// Whether relive seems to run in a container.
    container: bool,
}

fn hint_text(f: &HintFacts) -> String {
    let mut parts = Vec::new();
    if let Some(t) = f.tracer {
        parts.push(format!(
            "{} is already traced by pid {t} (a debugger or strace?); detach it first",
            f.who
        ));
    }
    let root = f.euid == 0;
    if f.cap_sys_ptrace {
        let me = if root {
            "root".to_string()
        } else {
            format!("uid {}", f.euid)
        };
        parts.push(format!(
            "relive runs as {me} with CAP_SYS_PTRACE, so something else refuses: a seccomp profile that blocks \
             ptrace or process_vm_readv{}, an LSM policy (SELinux, AppArmor), or a process the kernel protects \
             (such as pid 1)",
            if f.container { " (this looks like a container: check its profile)" } else { "" }
        ));
    } else if root {
        parts.push(format!(
            "relive runs as root but without CAP_SYS_PTRACE{}: give it that capability (`--cap-add=SYS_PTRACE` \
             for a container); a seccomp profile, an LSM policy (SELinux, AppArmor) or a process the kernel \
             protects (such as pid 1) can also refuse",
            if f.container { " (this looks like a container started without it)" } else { "" }
        ));
    } else {
        let owner = match f.target_uid {
            Some(t) if t != f.euid => format!(
                "{} runs as uid {t} and relive as uid {}: run relive as {}root (e.g. `sudo relive …`)",
                f.who,
                f.euid,
                if t == 0 {
                    String::new()
                } else {
                    format!("uid {t} or as ")
                }
            ),
            _ => format!(
                "relive runs as uid {}: run it as root (e.g. `sudo relive …`)",
                f.euid
            ),
        };
        parts.push(format!(
            "{owner}, or give it CAP_SYS_PTRACE (`sudo setcap cap_sys_ptrace+ep $(which relive)`)"
        ));
        // A different owner explains the refusal by itself; the container advice is for a same-uid refusal.
        if f.container && f.target_uid.is_none_or(|t| t == f.euid) {
            parts.push(
                "this looks like a container: start it with `--cap-add=SYS_PTRACE` (and a seccomp profile that \
                 allows ptrace and process_vm_readv)"
                    .into(),
            );
        }
    }
    // Yama matters only where it exists; with CAP_SYS_PTRACE only its scope 3 (no tracing at all) refuses.
    match f.yama_scope.as_deref() {
        Some("3") => parts.push(
            "Yama ptrace_scope is 3: no process may trace another until reboot".into(),
        ),
        Some(scope) if scope != "0" && !f.cap_sys_ptrace => parts.push(format!(
            "Yama ptrace_scope is {scope} (1: only a parent or a holder of CAP_SYS_PTRACE may trace; 2: only \
             CAP_SYS_PTRACE); writing 0 to /proc/sys/kernel/yama/ptrace_scope allows tracing a process of the \
             same uid"
        )),
        _ => {}
    }
    parts.join("; ")
}

/// The real uid in a `/proc/…/status` file.
fn status_uid(status_path: &str) -> Option<u32> {
    let s = std::fs::read_to_string(status_path).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The capability's number (linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;

/// Whether this process's effective capability set holds CAP_SYS_PTRACE (`CapEff:` of /proc/self/status).
fn has_cap_sys_ptrace() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(euid: u32, cap: bool, yama: Option<&str>, container: bool) -> HintFacts {
        HintFacts {
            who: "pid 42".into(),
            tracer: None,
            target_uid: Some(1000),
            euid,
            cap_sys_ptrace: cap,
            yama_scope: yama.map(str::to_string),
            container,
        }
    }

    #[test]
    fn a_user_is_told_the_owner_root_and_cap_sys_ptrace() {
        let h = hint_text(&facts(65534, false, None, false));
        assert!(
            h.contains("pid 42 runs as uid 1000 and relive as uid 65534: run relive as uid 1000 or as root"),
            "{h}"
        );
        assert!(h.contains("sudo relive") && h.contains("CAP_SYS_PTRACE"), "{h}");
        assert!(!h.contains("ptrace_scope"), "no Yama, no Yama advice: {h}");
        assert!(!h.contains("container"), "{h}");
        let h = hint_text(&facts(65534, false, Some("1"), true));
        assert!(h.contains("Yama ptrace_scope is 1"), "{h}");
        // Another owner explains the refusal: no container advice then.
        assert!(!h.contains("--cap-add=SYS_PTRACE"), "{h}");
        // Same uid, in a container: the capability is what is missing.
        let h = hint_text(&HintFacts {
            target_uid: Some(65534),
            ..facts(65534, false, Some("1"), true)
        });
        assert!(h.contains("--cap-add=SYS_PTRACE"), "{h}");
        let h = hint_text(&facts(65534, false, Some("0"), false));
        assert!(!h.contains("Yama"), "scope 0 restricts nothing: {h}");
    }

    #[test]
    fn root_gets_no_sudo_advice_but_the_causes_left() {
        for (cap, container) in [(true, false), (true, true), (false, false), (false, true)] {
            let h = hint_text(&facts(0, cap, None, container));
            assert!(!h.contains("sudo") && !h.contains("uid 0"), "{h}");
            assert!(
                h.contains("seccomp") && h.contains("LSM") && h.contains("pid 1"),
                "{h}"
            );
            assert!(!h.contains("ptrace_scope"), "{h}");
            if !cap {
                assert!(
                    h.contains("without CAP_SYS_PTRACE") && h.contains("--cap-add=SYS_PTRACE"),
                    "{h}"
                );
            }
        }
        let h = hint_text(&facts(0, true, Some("1"), false));
        assert!(!h.contains("Yama"), "scope 1 does not stop CAP_SYS_PTRACE: {h}");
        let h = hint_text(&facts(0, true, Some("3"), false));
        assert!(h.contains("Yama ptrace_scope is 3"), "{h}");
    }

    #[test]
    fn another_tracer_is_named_first() {
        let mut f = facts(1000, false, None, false);
        f.tracer = Some(77);
        let h = hint_text(&f);
        assert!(h.starts_with("pid 42 is already traced by pid 77"), "{h}");
    }

    #[test]
    fn a_permission_error_names_the_path_and_the_os_error_once() {
        let e = ProcError::Permission {
            pid: 42,
            tid: Some(43),
            op: "read /proc/PID/task/TID/stat",
            err: io::Error::from_raw_os_error(libc::EPERM),
            hint: "do this".into(),
        };
        let m = e.to_string();
        assert_eq!(
            m,
            "cannot read /proc/42/task/43/stat of thread 43 of pid 42: Operation not permitted (os error 1); do this"
        );
        assert!(
            std::error::Error::source(&e).is_none(),
            "the OS error is in the message, not again in the chain"
        );
    }

    /// Memory and other OS errors name the OS error once, in the message: it is not also their `source()`,
    /// which anyhow's `{:#}` (the CLI's error output) would print again.
    #[test]
    fn os_and_memory_errors_name_the_os_error_once() {
        let errs = [
            ProcError::Os {
                pid: 42,
                tid: None,
                op: "PTRACE_SEIZE",
                err: io::Error::from_raw_os_error(libc::EBUSY),
            },
            ProcError::Memory {
                pid: 42,
                addr: 0x1000,
                len: 8,
                op: "read",
                err: io::Error::from_raw_os_error(libc::EFAULT),
            },
        ];
        for e in errs {
            let m = e.to_string();
            assert_eq!(m.matches("os error").count(), 1, "{m}");
            assert!(std::error::Error::source(&e).is_none(), "{m}");
        }
    }
}
