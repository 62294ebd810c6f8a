//! The controller's side of the agent (DESIGN §4.6–§4.8): find `librelive_agent.so` in a process,
//! read its registry without stopping anything, talk to it over its command pipes, and inject it.
//!
//! Layouts and the protocol are defined once, in `relive_abi`.

use relive_abi::proto::{self, FRAME_HEADER, Request, Response};
use relive_abi::registry::{self as layout, Header, Snapshot};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of the agent layer. Every message names the pid and says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no process with pid {pid}: check the pid with `ps` or `pgrep`")]
    NoProcess { pid: i32 },
    #[error(
        "pid {pid} has no relive agent loaded (no {} mapping exports `{}`); `relive load` or `relive apply` injects it",
        relive_abi::AGENT_FILE_NAME,
        relive_abi::REGISTRY_SYMBOL
    )]
    NotLoaded { pid: i32 },
    /// The OS error is part of the message (and not a `source`, which would print it twice).
    #[error("cannot read {what} of pid {pid}: {err}{hint}")]
    Io {
        pid: i32,
        what: String,
        err: std::io::Error,
        hint: String,
    },
    /// EPERM/EACCES: worded as [`crate::ProcError::Permission`], with the same hint.
    #[error("cannot read {what} of pid {pid}: {err}; {hint}")]
    Permission {
        pid: i32,
        what: String,
        err: std::io::Error,
        hint: String,
    },
    #[error("the agent file {path} mapped in pid {pid} cannot be parsed: {detail}")]
    BadAgentFile { pid: i32, path: String, detail: String },
    #[error("registry of pid {pid} at {addr:#x}: {source}")]
    Registry {
        pid: i32,
        addr: u64,
        source: layout::RegistryError,
    },
    #[error(
        "the agent in pid {pid} is mapped but its constructor has not run yet (it is being loaded); retry in a moment"
    )]
    Initializing { pid: i32 },
    #[error(
        "registry of pid {pid} at {addr:#x} kept changing during {tries} reads; retry (is a controller writing it in a loop?)"
    )]
    RegistryBusy { pid: i32, addr: u64, tries: u32 },
    #[error(
        "the agent in pid {pid} is not ready after {waited:?} (its service thread has not started); retry, or check the target's stderr"
    )]
    NotReady { pid: i32, waited: Duration },
    #[error(
        "another relive is talking to the agent of pid {pid} (its channel is locked); retry when it is done"
    )]
    ChannelBusy { pid: i32 },
    #[error(
        "the agent of pid {pid} did not answer {request} within {timeout:?}; it may be busy in a callback, retry later"
    )]
    Timeout {
        pid: i32,
        request: &'static str,
        timeout: Duration,
    },
    #[error("malformed answer from the agent of pid {pid}: {source}")]
    Protocol { pid: i32, source: proto::ProtoError },
    #[error("the agent of pid {pid} refused {request}: {message} (errno {errno})")]
    Refused {
        pid: i32,
        request: &'static str,
        errno: i32,
        message: String,
    },
    #[error("the agent of pid {pid} answered {request} with an unexpected {got:?}")]
    Unexpected {
        pid: i32,
        request: &'static str,
        got: Response,
    },
    #[error(
        "cannot find {}: tried {tried}; build it with `cargo build -p relive-agent` or set RELIVE_AGENT=/path/to/{}",
        relive_abi::AGENT_FILE_NAME,
        relive_abi::AGENT_FILE_NAME
    )]
    NoAgentFile { tried: String },
    #[error(transparent)]
    Inject(#[from] crate::remote::InjectError),
}

pub type Result<T> = std::result::Result<T, AgentError>;

fn io_err(pid: i32, what: impl Into<String>, err: std::io::Error) -> AgentError {
    let hint = match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            return AgentError::Permission {
                pid,
                what: what.into(),
                err,
                hint: crate::error::permission_hint(pid),
            };
        }
        Some(libc::ESRCH) | Some(libc::ENOENT) if !Path::new(&format!("/proc/{pid}")).exists() => {
            " (the process exited)".into()
        }
        _ => String::new(),
    };
    AgentError::Io {
        pid,
        what: what.into(),
        err,
        hint,
    }
}

/// Reads target memory with `process_vm_readv`; the whole range must be readable.
pub fn read_mem(pid: i32, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
    // The same process_vm_readv as `read_memory`, keeping the raw OS error for the callers here.
    if crate::mem::vm_read(pid, addr, buf)? < buf.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(())
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapLine {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub path: String,
}

/// Parses `/proc/PID/maps` text.
pub fn parse_maps_text(text: &str) -> Vec<MapLine> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(6, ' ');
            let range = it.next()?;
            let perms = it.next()?.to_string();
            let offset = u64::from_str_radix(it.next()?, 16).ok()?;
            let _dev = it.next()?;
            let _inode = it.next()?;
            let path = it.next().unwrap_or("").trim_start().to_string();
            let (s, e) = range.split_once('-')?;
            Some(MapLine {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms,
                offset,
                path,
            })
        })
        .collect()
}

/// Reads and parses `/proc/PID/maps`.
pub fn read_maps(pid: i32) -> Result<Vec<MapLine>> {
    match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(t) => Ok(parse_maps_text(&t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(AgentError::NoProcess { pid }),
        Err(e) => Err(io_err(pid, format!("/proc/{pid}/maps"), e)),
    }
}

/// A module of the target found in its maps: its file (mapped read-only, so only the pages of the
/// headers and tables asked for are read) and load bias.
pub struct MappedFile {
    pub path: String,
    pub bias: u64,
    /// A private read-only mapping: the dynsym lookup of `find_agent` through `object::ReadCache`
    /// cost two syscalls per small read, about 0.3 ms a command.
    pub bytes: crate::mapped::MappedFile,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .field("bias", &self.bias)
            .finish()
    }
}

impl MappedFile {
    /// Parses the file (headers only; sections and symbols are read on demand).
    pub fn object(&self) -> Option<object::File<'_, &[u8]>> {
        object::File::parse(self.bytes.as_ref()).ok()
    }
}

/// Opens the file behind the mappings named `path` (through `/proc/PID/map_files`, which is the file
/// actually mapped even if replaced on disk or in another mount namespace) and computes its bias.
pub fn mapped_file(pid: i32, maps: &[MapLine], path: &str) -> Result<MappedFile> {
    let first = maps
        .iter()
        .filter(|m| m.path == path && m.offset == 0)
        .min_by_key(|m| m.start)
        .ok_or_else(|| AgentError::BadAgentFile {
            pid,
            path: path.into(),
            detail: "no mapping at file offset 0".into(),
        })?;
    let via = format!("/proc/{pid}/map_files/{:x}-{:x}", first.start, first.end);
    let file = std::fs::File::open(&via)
        .or_else(|_| std::fs::File::open(format!("/proc/{pid}/root{path}")))
        .or_else(|_| std::fs::File::open(path))
        .map_err(|e| io_err(pid, format!("the mapped file {path}"), e))?;
    let bytes = crate::mapped::MappedFile::map(&file)
        .map_err(|e| io_err(pid, format!("the mapped file {path}"), e))?;
    let min_vaddr = {
        use object::{Object, ObjectSegment};
        let obj = object::File::parse(bytes.as_ref()).map_err(|e| AgentError::BadAgentFile {
            pid,
            path: path.into(),
            detail: e.to_string(),
        })?;
        obj.segments().map(|s| s.address()).min().unwrap_or(0) & !0xfff
    };
    Ok(MappedFile {
        path: path.into(),
        bias: first.start - min_vaddr,
        bytes,
    })
}

/// Looks up a `.dynsym` symbol's address (bias applied).
pub fn dynsym_addr(m: &MappedFile, name: &str) -> Option<u64> {
    use object::{Object, ObjectSymbol};
    let file = m.object()?;
    file.dynamic_symbols()
        .find(|s| s.name() == Ok(name) && s.is_definition())
        .map(|s| m.bias + s.address())
}

/// Where an agent lives in a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLocation {
    pub pid: i32,
    /// The agent's path as mapped.
    pub path: String,
    /// The address of `relive_registry`.
    pub registry_addr: u64,
}

fn looks_like_agent(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.contains("relive_agent") || base.contains("relive-agent")
}

/// Finds the agent in `pid` without stopping anything (module map + `.dynsym` lookup).
pub fn find_agent(pid: i32) -> Result<AgentLocation> {
    // /proc/PID/maps is read in chunks and may skip a line while the target changes its mappings
    // (malloc's mmap/munmap): a miss is confirmed by two more reads.
    let mut last = Err(AgentError::NotLoaded { pid });
    for attempt in 0..3 {
        last = find_agent_once(pid, attempt == 2);
        if !matches!(last, Err(AgentError::NotLoaded { .. })) {
            break;
        }
    }
    last
}

/// Looks for the agent among the objects whose name looks like it; with `any_name`, then among every
/// other mapped file too (an agent preloaded under another name, e.g. by a distribution's package, would
/// otherwise be missed and a second copy injected).
fn find_agent_once(pid: i32, any_name: bool) -> Result<AgentLocation> {
    let maps = read_maps(pid)?;
    let mut seen = Vec::new();
    for pass in [false, true] {
        if pass && !any_name {
            break;
        }
        for m in &maps {
            let named = looks_like_agent(&m.path);
            if m.offset != 0 || !m.path.starts_with('/') || named == pass || seen.contains(&m.path) {
                continue;
            }
            seen.push(m.path.clone());
            let f = match mapped_file(pid, &maps, &m.path) {
                Ok(f) => f,
                // A file relive cannot open (deleted, another namespace) is not the agent it looks for.
                Err(_) if pass => continue,
                Err(e) => return Err(e),
            };
            if let Some(addr) = dynsym_addr(&f, relive_abi::REGISTRY_SYMBOL) {
                return Ok(AgentLocation {
                    pid,
                    path: m.path.clone(),
                    registry_addr: addr,
                });
            }
        }
    }
    Err(AgentError::NotLoaded { pid })
}

/// Reads a consistent copy of the registry (seqlock: generation even and unchanged across the copy).
pub fn read_registry(loc: &AgentLocation) -> Result<Snapshot> {
    let pid = loc.pid;
    let addr = loc.registry_addr;
    const TRIES: u32 = 10_000;
    let mut buf = vec![0u8; layout::HEADER_SIZE];
    let mut g = [0u8; 8];
    for i in 0..TRIES {
        if i > 100 {
            std::thread::sleep(Duration::from_micros(50));
        }
        read_mem(pid, addr + layout::off::GENERATION as u64, &mut g)
            .map_err(|e| io_err(pid, "the registry", e))?;
        let g1 = u64::from_le_bytes(g);
        if g1 % 2 == 1 {
            continue;
        }
        buf.resize(layout::HEADER_SIZE, 0);
        read_mem(pid, addr, &mut buf).map_err(|e| io_err(pid, "the registry", e))?;
        if g1 == 0 && buf.iter().all(|&b| b == 0) {
            // Zero-filled .bss: mapped by dlopen, constructor not run yet.
            return Err(AgentError::Initializing { pid });
        }
        let h = match layout::decode_header(&buf) {
            Ok(h) => h,
            Err(_) if layout::generation_of(&buf).ok() != Some(g1) => continue,
            Err(source) => {
                // A bad header is only reported once the live generation confirms the copy was
                // not taken under a writer.
                read_mem(pid, addr + layout::off::GENERATION as u64, &mut g)
                    .map_err(|e| io_err(pid, "the registry", e))?;
                if u64::from_le_bytes(g) != g1 {
                    continue;
                }
                // The registry lives in the agent's writable data. A dlopen still under way (its
                // controller killed mid-injection, the target finishing the call on its own) first maps
                // the whole file read-only: the bytes there are the file's, not a registry.
                if read_maps(pid).is_ok_and(|maps| {
                    maps.iter()
                        .find(|m| (m.start..m.end).contains(&addr))
                        .is_none_or(|m| !m.perms.starts_with("rw"))
                }) {
                    return Err(AgentError::Initializing { pid });
                }
                return Err(AgentError::Registry { pid, addr, source });
            }
        };
        if h.body_len > 0 {
            buf.resize(layout::HEADER_SIZE + h.body_len as usize, 0);
            read_mem(
                pid,
                addr + layout::HEADER_SIZE as u64,
                &mut buf[layout::HEADER_SIZE..],
            )
            .map_err(|e| io_err(pid, "the registry body", e))?;
        }
        read_mem(pid, addr + layout::off::GENERATION as u64, &mut g)
            .map_err(|e| io_err(pid, "the registry", e))?;
        let g2 = u64::from_le_bytes(g);
        if h.generation != g1 {
            continue;
        }
        match layout::decode_consistent(&buf, g2) {
            Ok(s) => return Ok(s),
            Err(layout::RegistryError::Torn { .. } | layout::RegistryError::WriterInside { .. }) => continue,
            Err(source) => return Err(AgentError::Registry { pid, addr, source }),
        }
    }
    Err(AgentError::RegistryBusy {
        pid,
        addr,
        tries: TRIES,
    })
}

/// Waits until the agent's header says READY (its service thread runs).
pub fn wait_ready(loc: &AgentLocation, timeout: Duration) -> Result<Header> {
    let start = Instant::now();
    loop {
        let s = match read_registry(loc) {
            Err(AgentError::Initializing { .. }) if start.elapsed() <= timeout => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            r => r?,
        };
        if s.header.flags & layout::FLAG_READY != 0 && s.header.agent_pid == loc.pid as u32 {
            return Ok(s.header);
        }
        if start.elapsed() > timeout {
            return Err(AgentError::NotReady {
                pid: loc.pid,
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every process on the system that has the agent loaded (scans `/proc/*/maps`; processes that
/// cannot be read are skipped).
pub fn processes_with_agent() -> AgentScan {
    let mut scan = AgentScan::default();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return scan;
    };
    let me = std::process::id() as i32;
    let mut exports: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let text = match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            Ok(t) => t,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
                scan.unreadable.push(pid);
                continue;
            }
            Err(_) => continue,
        };
        // The agent by its file name, or (preloaded under another name) by the registry symbol a mapped file
        // exports; each distinct file is looked at once per scan (every process maps libc).
        let maps = parse_maps_text(&text);
        let has_agent = maps.iter().any(|m| {
            if m.offset != 0 || !m.path.starts_with('/') {
                return false;
            }
            if looks_like_agent(&m.path) {
                return true;
            }
            *exports.entry(m.path.clone()).or_insert_with(|| {
                mapped_file(pid, &maps, &m.path)
                    .ok()
                    .and_then(|f| dynsym_addr(&f, relive_abi::REGISTRY_SYMBOL))
                    .is_some()
            })
        });
        if !has_agent {
            continue;
        }
        if let Ok(loc) = find_agent(pid) {
            scan.found.push(loc);
        }
    }
    scan.found.sort_by_key(|l| l.pid);
    scan.unreadable.sort_unstable();
    scan
}

/// What [`processes_with_agent`] found: the agents, and the processes whose memory map this user may not
/// read (they may have an agent too).
#[derive(Debug, Default)]
pub struct AgentScan {
    pub found: Vec<AgentLocation>,
    pub unreadable: Vec<i32>,
}

/// An open command channel to one agent. Holds `flock(LOCK_EX)` on the request pipe while alive, so
/// one controller at a time talks to the agent.
#[derive(Debug)]
pub struct AgentConn {
    pub pid: i32,
    req: File,
    resp: File,
    seq: u32,
    /// How long to wait for each answer.
    pub timeout: Duration,
}

fn req_name(r: &Request) -> &'static str {
    match r {
        Request::Ping => "ping",
        Request::LoadPath { .. } => "load",
        Request::CreateMemfd { .. } => "create-memfd",
        Request::CloseFd { .. } => "close-fd",
        Request::Dlsym { .. } => "dlsym",
        Request::Unload { .. } => "unload",
        Request::Callback { .. } => "callback",
        Request::MapStubs { .. } => "map-stubs",
        Request::Unmap { .. } => "unmap",
        Request::SetImport { .. } => "set-import",
        Request::WriteBody { .. } => "write-body",
        Request::Lock { .. } => "lock",
        Request::Unlock { .. } => "unlock",
        Request::List => "list",
        Request::SetStates { .. } => "set-states",
        Request::StopFreeStatus => "stop-free-status",
        Request::PokeText { .. } => "poke-text",
    }
}

/// What the agent reports for one [`AgentConn::poke_text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PokeReport {
    /// Sites written (sites that already held their new bytes are skipped).
    pub sites_written: u32,
    /// int3 hits the agent's SIGTRAP handler counted during the request.
    pub hits: u64,
    /// The request's wall time inside the agent.
    pub window_ns: u64,
    /// From the first int3 written to the last sync: how long a call of a site could trap.
    pub int3_ns: u64,
}

/// A patch library loaded by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedLib {
    pub handle: u64,
    pub base: u64,
}

impl AgentConn {
    /// Opens the agent's pipes through `/proc/PID/fd/N` and takes the channel lock (waits up to
    /// `timeout` for another controller to finish).
    pub fn open(loc: &AgentLocation, timeout: Duration) -> Result<AgentConn> {
        let pid = loc.pid;
        let h = wait_ready(loc, timeout)?;
        let req = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/proc/{pid}/fd/{}", h.req_fd))
            .map_err(|e| {
                io_err(
                    pid,
                    format!("the agent's request pipe /proc/{pid}/fd/{}", h.req_fd),
                    e,
                )
            })?;
        let resp = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(format!("/proc/{pid}/fd/{}", h.resp_fd))
            .map_err(|e| {
                io_err(
                    pid,
                    format!("the agent's response pipe /proc/{pid}/fd/{}", h.resp_fd),
                    e,
                )
            })?;
        let start = Instant::now();
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(req.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            if start.elapsed() > timeout {
                return Err(AgentError::ChannelBusy { pid });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // A fresh random-ish start so answers meant for an earlier controller never match.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seq = (std::process::id() << 16) ^ nanos;
        Ok(AgentConn {
            pid,
            req,
            resp,
            seq,
            timeout: Duration::from_secs(10),
        })
    }

    /// Sends one request and waits for its answer. An `Error` answer becomes [`AgentError::Refused`].
    pub fn call(&mut self, req: &Request) -> Result<Response> {
        let name = req_name(req);
        let pid = self.pid;
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        // Throw away anything a previous controller left unread.
        let mut junk = [0u8; 4096];
        while matches!(self.resp.read(&mut junk), Ok(n) if n > 0) {}
        self.req
            .write_all(&req.encode(seq))
            .map_err(|e| io_err(pid, "the agent's request pipe", e))?;
        let sent = Instant::now();
        let deadline = sent + self.timeout;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            while buf.len() >= FRAME_HEADER {
                let h = proto::decode_frame_header(&buf)
                    .map_err(|source| AgentError::Protocol { pid, source })?;
                let total = FRAME_HEADER + h.payload_len as usize;
                if buf.len() < total {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..total).collect();
                if h.seq != seq {
                    continue;
                }
                let resp = Response::decode(h.kind, &frame[FRAME_HEADER..])
                    .map_err(|source| AgentError::Protocol { pid, source })?;
                tracing::trace!(pid, "agent answered {name} in {:?}", sent.elapsed());
                return match resp {
                    Response::Error { errno, message } => Err(AgentError::Refused {
                        pid,
                        request: name,
                        errno,
                        message,
                    }),
                    r => Ok(r),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout {
                    pid,
                    request: name,
                    timeout: self.timeout,
                });
            }
            let mut p = libc::pollfd {
                fd: self.resp.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            let mut chunk = [0u8; 8192];
            match self.resp.read(&mut chunk) {
                // EOF: no writer is left, and the agent always holds one: its process is gone.
                Ok(0) => {
                    return Err(io_err(
                        pid,
                        "the agent's response pipe",
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("closed while waiting for {name}: the process exited or was killed"),
                        ),
                    ));
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(pid, "the agent's response pipe", e)),
            }
        }
    }

    fn unexpected<T>(&self, request: &'static str, got: Response) -> Result<T> {
        Err(AgentError::Unexpected {
            pid: self.pid,
            request,
            got,
        })
    }

    /// Returns the agent's version.
    pub fn ping(&mut self) -> Result<u32> {
        match self.call(&Request::Ping)? {
            Response::Pong { agent_version, .. } => Ok(agent_version),
            r => self.unexpected("ping", r),
        }
    }

    /// `dlopen(path)` in the target (the path as seen from inside the target's mount namespace).
    pub fn load_path(&mut self, path: &str) -> Result<LoadedLib> {
        match self.call(&Request::LoadPath { path: path.into() })? {
            Response::Loaded { handle, base } => Ok(LoadedLib { handle, base }),
            r => self.unexpected("load", r),
        }
    }

    /// Loads a library from the controller's file system into the target, whatever its mount
    /// namespace (DESIGN §4.6): the agent makes a memfd, the controller fills it through
    /// `/proc/PID/fd/N`, the agent `dlopen`s `/proc/self/fd/N` and closes the fd.
    pub fn load_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<LoadedLib> {
        let fd = match self.call(&Request::CreateMemfd {
            name: name.into(),
            size: bytes.len() as u64,
        })? {
            Response::Fd { fd } => fd,
            r => return self.unexpected("create-memfd", r),
        };
        let pid = self.pid;
        let fill = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/{pid}/fd/{fd}"))?;
            f.write_all(bytes)
        })();
        let loaded = match fill {
            Ok(()) => self.load_path(&format!("/proc/self/fd/{fd}")),
            Err(e) => Err(io_err(pid, format!("the agent's memfd /proc/{pid}/fd/{fd}"), e)),
        };
        // On success the agent keeps the memfd open with the library (closed at unload).
        if loaded.is_err() {
            let _ = self.call(&Request::CloseFd { fd });
        }
        loaded
    }

    /// `dlsym` in a loaded patch.
    pub fn dlsym(&mut self, handle: u64, name: &str) -> Result<u64> {
        match self.call(&Request::Dlsym {
            handle,
            name: name.into(),
        })? {
            Response::Addr { addr } => Ok(addr),
            r => self.unexpected("dlsym", r),
        }
    }

    /// `dlclose` of a loaded patch.
    pub fn unload(&mut self, handle: u64) -> Result<()> {
        match self.call(&Request::Unload { handle })? {
            Response::Done => Ok(()),
            r => self.unexpected("unload", r),
        }
    }

    /// Runs `int name(void)` of a loaded patch on the agent's service thread.
    pub fn callback(&mut self, handle: u64, name: &str) -> Result<i32> {
        match self.call(&Request::Callback {
            handle,
            name: name.into(),
        })? {
            Response::Int { value } => Ok(value),
            r => self.unexpected("callback", r),
        }
    }

    /// Maps `len` bytes of r-x pages within ±2 GiB of `near`; returns their address.
    pub fn map_stubs(&mut self, near: u64, len: u64) -> Result<u64> {
        match self.call(&Request::MapStubs { near, len })? {
            Response::Addr { addr } => Ok(addr),
            r => self.unexpected("map-stubs", r),
        }
    }

    /// Unmaps pages made by [`AgentConn::map_stubs`].
    pub fn unmap(&mut self, addr: u64, len: u64) -> Result<()> {
        match self.call(&Request::Unmap { addr, len })? {
            Response::Done => Ok(()),
            r => self.unexpected("unmap", r),
        }
    }

    /// Writes an import slot of a loaded patch: `*(u64*)dlsym(handle, slot) = value`.
    pub fn set_import(&mut self, handle: u64, slot: &str, value: u64) -> Result<()> {
        match self.call(&Request::SetImport {
            handle,
            slot: slot.into(),
            value,
        })? {
            Response::Done => Ok(()),
            r => self.unexpected("set-import", r),
        }
    }

    /// Replaces the registry body (write-ahead: call before acting).
    pub fn write_body(&mut self, body_version: u32, body: &[u8]) -> Result<()> {
        match self.call(&Request::WriteBody {
            body_version,
            body: body.to_vec(),
        })? {
            Response::Done => Ok(()),
            r => self.unexpected("write-body", r),
        }
    }

    /// Takes the controller lock in the registry for this process (`owner` = our pid).
    pub fn lock(&mut self) -> Result<()> {
        match self.call(&Request::Lock {
            owner: std::process::id(),
        })? {
            Response::Done => Ok(()),
            r => self.unexpected("lock", r),
        }
    }

    /// The libraries the agent has loaded (handle, base, label).
    pub fn list(&mut self) -> Result<Vec<proto::LibInfo>> {
        match self.call(&Request::List)? {
            Response::Libraries { libs } => Ok(libs),
            r => self.unexpected("list", r),
        }
    }

    /// Ok(Ok(())) when the agent can do stop-free entry writes now; Ok(Err(reason)) when not (also for an
    /// older agent that does not know the request).
    pub fn stop_free_status(&mut self) -> Result<std::result::Result<(), String>> {
        match self.call(&Request::StopFreeStatus) {
            Ok(Response::StopFree { ready: true, .. }) => Ok(Ok(())),
            Ok(Response::StopFree { ready: false, reason }) => Ok(Err(reason)),
            Ok(r) => self.unexpected("stop-free-status", r),
            Err(AgentError::Refused { errno, message, .. })
                if proto::is_unknown_kind_error(errno, &message) =>
            {
                Ok(Err(format!(
                    "the agent of pid {} predates stop-free entry writes (it answered: {message})",
                    self.pid
                )))
            }
            Err(e) => Err(e),
        }
    }

    /// Writes every site with the int3 protocol (PAUSE-FREE.md §2), done entirely by the agent's service
    /// thread: all or nothing before the first write; a refusal names the site and what it holds.
    pub fn poke_text(&mut self, sites: &[proto::PokeSite]) -> Result<PokeReport> {
        self.poke_text_vouched(sites, &[])
    }

    /// [`AgentConn::poke_text`], telling the agent which threads' signal masks the caller has just read
    /// without SIGTRAP (through ptrace, while they were stopped): the agent reads only the others' before
    /// the write. At most [`proto::MAX_VOUCHED`] are sent; the agent reads the rest itself.
    pub fn poke_text_vouched(&mut self, sites: &[proto::PokeSite], vouched: &[i32]) -> Result<PokeReport> {
        if sites.len() > proto::MAX_POKE_SITES {
            return Err(AgentError::Refused {
                pid: self.pid,
                request: "poke-text",
                errno: libc::E2BIG,
                message: format!(
                    "{} sites in one request, the limit is {} (not sent; split the batch)",
                    sites.len(),
                    proto::MAX_POKE_SITES
                ),
            });
        }
        match self.call(&Request::PokeText {
            sites: sites.to_vec(),
            vouched: vouched[..vouched.len().min(proto::MAX_VOUCHED)].to_vec(),
        })? {
            Response::Poked {
                sites_written,
                hits,
                window_ns,
                int3_ns,
            } => Ok(PokeReport {
                sites_written,
                hits,
                window_ns,
                int3_ns,
            }),
            r => self.unexpected("poke-text", r),
        }
    }

    /// Releases the controller lock.
    pub fn unlock(&mut self) -> Result<()> {
        match self.call(&Request::Unlock {
            owner: std::process::id(),
        })? {
            Response::Done => Ok(()),
            r => self.unexpected("unlock", r),
        }
    }
}

/// Finds `librelive_agent.so` for injection: `$RELIVE_AGENT`, else next to the running executable
/// (`target/{debug,release}/`), else in its parent directory (test binaries live in `deps/`), else
/// in its `deps/`.
pub fn agent_library_path() -> Result<PathBuf> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("RELIVE_AGENT") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        tried.push(format!("{} (from RELIVE_AGENT)", p.display()));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        {
            let mut dirs = vec![dir.to_path_buf(), dir.join("deps")];
            if let Some(up) = dir.parent() {
                dirs.push(up.to_path_buf());
            }
            for d in dirs {
                let p = d.join(relive_abi::AGENT_FILE_NAME);
                if p.is_file() {
                    return Ok(p.canonicalize().unwrap_or(p));
                }
                tried.push(p.display().to_string());
            }
        }
    }
    Err(AgentError::NoAgentFile {
        tried: tried.join(", "),
    })
}

/// How [`ensure_agent`] got the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// It was already there (preloaded or injected earlier).
    Present(AgentLocation),
    /// It was injected now.
    Injected(AgentLocation, crate::remote::InjectReport),
}

impl Ensured {
    pub fn location(&self) -> &AgentLocation {
        match self {
            Ensured::Present(l) | Ensured::Injected(l, _) => l,
        }
    }
}

/// Makes sure the agent runs in `pid`: finds it, or injects it with one remote `dlopen`
/// (crate::remote, REMOTE-CALL.md R3), then waits until its service thread is ready.
pub fn ensure_agent(pid: i32, opts: &crate::remote::InjectOptions) -> Result<Ensured> {
    match find_agent(pid) {
        Ok(loc) => {
            wait_ready(&loc, opts.timeout)?;
            return Ok(Ensured::Present(loc));
        }
        Err(AgentError::NotLoaded { .. }) => {}
        Err(e) => return Err(e),
    }
    let path = agent_library_path()?;
    let report = crate::remote::inject_library(pid, &path, opts)?;
    let loc = find_agent(pid)?;
    wait_ready(&loc, opts.timeout)?;
    Ok(Ensured::Injected(loc, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_parse_maps_lines() {
        let m = parse_maps_text(
            "7f0000000000-7f0000001000 r--p 00000000 fd:01 123 /usr/lib/librelive_agent.so\n\
             7f0000001000-7f0000002000 r-xp 00001000 fd:01 123 /usr/lib/librelive_agent.so\n\
             7ffd0000-7ffe0000 rw-p 00000000 00:00 0                          [stack]\n",
        );
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].offset, 0x1000);
        assert_eq!(m[2].path, "[stack]");
        assert!(looks_like_agent(&m[0].path));
        assert!(!looks_like_agent("/usr/lib/libc.so.6"));
    }
}
