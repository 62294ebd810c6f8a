//! Threads of a process: listing (re-listed until stable) and per-thread name and scheduler state
//! from `/proc/PID/task/TID/stat`, parsed by pure functions that survive any `comm`.

use crate::error::{ProcError, Result};
use serde::Serialize;

/// The fields of `/proc/…/stat` relive uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatInfo {
    pub tid: i32,
    /// The `comm` between the first `(` and the last `)`: it may itself contain `)`, spaces, `(`.
    pub comm: String,
    /// Scheduler state letter: R, S, D, T, t, Z, X, I, …
    pub state: char,
}

/// Parses a `stat` line. `comm` can contain anything but NUL (up to 15 bytes), so the name ends
/// at the *last* `)`.
pub fn parse_stat(bytes: &[u8]) -> Option<StatInfo> {
    let open = bytes.iter().position(|&b| b == b'(')?;
    let close = bytes.iter().rposition(|&b| b == b')')?;
    if close < open {
        return None;
    }
    let tid = std::str::from_utf8(&bytes[..open]).ok()?.trim().parse().ok()?;
    let comm = String::from_utf8_lossy(&bytes[open + 1..close]).into_owned();
    let rest = bytes.get(close + 1..)?;
    let state = rest
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .map(|&b| b as char)?;
    Some(StatInfo { tid, comm, state })
}

/// A human word for a scheduler state letter.
pub fn state_name(state: char) -> &'static str {
    match state {
        'R' => "running",
        'S' => "sleeping",
        'D' => "disk-sleep",
        'T' => "stopped",
        't' => "tracing-stop",
        'Z' => "zombie",
        'X' => "dead",
        'I' => "idle",
        'P' => "parked",
        'W' => "waking",
        _ => "unknown",
    }
}

/// Name and scheduler state of one thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThreadInfo {
    pub tid: i32,
    pub name: String,
    pub state: char,
    pub state_name: &'static str,
}

/// Reads `/proc/PID/task/TID/stat`.
pub fn thread_info(pid: i32, tid: i32) -> Result<ThreadInfo> {
    let path = format!("/proc/{pid}/task/{tid}/stat");
    let bytes = std::fs::read(&path).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => ProcError::TargetDied {
            pid,
            tid: Some(tid),
            during: "reading stat",
        },
        _ => ProcError::from_os(pid, Some(tid), "read /proc/PID/task/TID/stat", e),
    })?;
    let s = parse_stat(&bytes).ok_or_else(|| ProcError::Unexpected {
        pid,
        tid: Some(tid),
        detail: format!("cannot parse {path}: {:?}", String::from_utf8_lossy(&bytes)),
    })?;
    Ok(ThreadInfo {
        tid,
        name: s.comm,
        state: s.state,
        state_name: state_name(s.state),
    })
}

/// One listing of `/proc/PID/task`.
pub fn list_threads_once(pid: i32) -> Result<Vec<i32>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => ProcError::NoSuchProcess { pid },
        _ => ProcError::from_os(pid, None, "list /proc/PID/task", e),
    })?;
    let mut tids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    if tids.is_empty() {
        return Err(ProcError::TargetDied {
            pid,
            tid: None,
            during: "listing threads",
        });
    }
    Ok(tids)
}

/// The effective uid of this (controller) process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The process (thread group) that thread `tid` belongs to, from `Tgid:` in `/proc/TID/status`; equal to
/// `tid` for a process's main thread. None when there is no such thread or its status cannot be read.
pub fn tgid_of(tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Every thread of `pid`, re-listing `/proc/PID/task` until a listing shows no new tid (threads
/// may be created while we read). Threads that exited in between are dropped.
pub fn list_threads(pid: i32) -> Result<Vec<i32>> {
    let mut all = list_threads_once(pid)?;
    for _ in 0..100 {
        let again = list_threads_once(pid)?;
        let new = again.iter().any(|t| all.binary_search(t).is_err());
        all = again;
        if !new {
            break;
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_adversarial_comm() {
        let s = parse_stat(b"83 (Thread.(<lambda>)) S 1 19 19 0 -1").unwrap();
        assert_eq!((s.tid, s.comm.as_str(), s.state), (83, "Thread.(<lambda>)", 'S'));
        let s = parse_stat(b"7 () R 1 2").unwrap();
        assert_eq!((s.comm.as_str(), s.state), ("", 'R'));
        let s = parse_stat(b"9 (a) b) (c) D 1").unwrap();
        assert_eq!((s.comm.as_str(), s.state), ("a) b) (c", 'D'));
        let s = parse_stat(b"10 ( spaces  ) t 1").unwrap();
        assert_eq!((s.comm.as_str(), s.state), (" spaces  ", 't'));
        let s = parse_stat(b"11 (x\ny) Z 0").unwrap();
        assert_eq!((s.comm.as_str(), s.state), ("x\ny", 'Z'));
        let s = parse_stat("12 (\u{e9}t\u{e9}) S 1".as_bytes()).unwrap();
        assert_eq!(s.comm, "\u{e9}t\u{e9}");
    }

    #[test]
    fn stat_rejects_garbage() {
        assert!(parse_stat(b"").is_none());
        assert!(parse_stat(b"12 noparen S").is_none());
        assert!(parse_stat(b"12 (unterminated S").is_none());
        assert!(parse_stat(b"x (a) S").is_none());
        assert!(parse_stat(b"12 (a)").is_none());
        assert!(parse_stat(b"12 )a( S").is_none());
    }

    #[test]
    fn own_threads_are_listed() {
        let me = std::process::id() as i32;
        let tids = list_threads(me).unwrap();
        assert!(tids.contains(&me));
        let info = thread_info(me, me).unwrap();
        assert_eq!(info.tid, me);
        assert!(!info.name.is_empty());
    }
}
