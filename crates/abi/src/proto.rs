//! The command channel between the controller and the agent (DESIGN §4.7).
//!
//! # Transport
//!
//! The agent creates two pipes and records in the registry `req_fd` (the read end of the request
//! pipe) and `resp_fd` (the write end of the response pipe). A controller opens
//! `/proc/PID/fd/<req_fd>` for writing and `/proc/PID/fd/<resp_fd>` for reading (pipes, not sockets:
//! `open` of a socket through `/proc/PID/fd` fails with ENXIO). Opening them takes the same rights as
//! ptrace. One controller at a time: a controller takes `flock(LOCK_EX)` on its request-pipe file
//! before talking (the lock is on the pipe inode, shared by every opener), and sends one request, then
//! waits for the response with the same `seq`. The agent discards stale bytes of the response pipe
//! before each response, and drops a request whose bytes stop arriving for [`FRAME_TIMEOUT_MS`] (a
//! controller killed mid-write), so a dead controller never wedges the channel.
//!
//! # Frame (every integer little-endian)
//!
//! ```text
//! offset size field
//!      0    4 magic        FRAME_MAGIC (b"RLVC")
//!      4    2 version      PROTO_VERSION
//!      6    2 kind         request kind (1..) or response kind (0x8000 | …)
//!      8    4 seq          chosen by the controller, echoed in the response
//!     12    4 payload_len  at most MAX_PAYLOAD
//!     16    8 reserved     zero
//!     24    … payload
//! ```
//!
//! Payload fields are, in order: `u32`/`i32`/`u64` fixed-size, `str` = `u32 length` + UTF-8 bytes
//! (at most [`MAX_STR`]), `bytes` = `u32 length` + bytes. A payload with bytes left over after its
//! last field, a string that is not UTF-8, an unknown kind or version: all rejected with
//! [`Response::Error`] (the agent never acts on malformed input).
//!
//! # Requests and their responses
//!
//! | kind | request | payload | success response |
//! |---|---|---|---|
//! | 1 | Ping | – | Pong { agent_version u32, pid u32 } |
//! | 2 | LoadPath | path str | Loaded { handle u64, base u64 } (`dlopen(path, RTLD_NOW\|RTLD_LOCAL)`) |
//! | 3 | CreateMemfd | name str, size u64 | Fd { fd i32 } (the controller fills it via /proc/PID/fd/N, then LoadPath("/proc/self/fd/N")) |
//! | 4 | CloseFd | fd i32 | Done (only fds made by CreateMemfd) |
//! | 5 | Dlsym | handle u64, name str | Addr { addr u64 } |
//! | 6 | Unload | handle u64 | Done (`dlclose`) |
//! | 7 | Callback | handle u64, name str | Int { value i32 } (runs `int name(void)` on the service thread) |
//! | 8 | MapStubs | near u64, len u64 | Addr { addr u64 } (r-x anonymous pages within ±2 GiB of `near`) |
//! | 9 | Unmap | addr u64, len u64 | Done (only ranges made by MapStubs) |
//! | 10 | SetImport | handle u64, slot str, value u64 | Done (`*(u64*)dlsym(handle, slot) = value`) |
//! | 11 | WriteBody | body_version u32, body bytes | Done (seqlock write of the registry body) |
//! | 12 | Lock | owner u32 | Done, or Error EBUSY naming the holder (a dead holder is replaced) |
//! | 13 | Unlock | owner u32 | Done |
//! | 14 | List | – | Libraries { count u32, then per library: handle u64, base u64, label str } (label: the path, or the memfd's name) |
//! | 15 | SetStates | count u32, then per state: patch str, id u64, version u32; prev_count u32, then per id: patch str, id u64 | Done (SPEC §8: the table `relive_state_get`/`relive_state_get_prev` answer from) |
//! | 16 | StopFreeStatus | – | StopFree { ready u32 (0/1), reason str } (reason empty when ready; PAUSE-FREE.md §2) |
//! | 17 | PokeText | count u32 (at most [`MAX_POKE_SITES`]), then per site: addr u64, bytes bytes, expect bytes, dest u64; then vouched count u32 (at most [`MAX_VOUCHED`]) and a tid u32 each | Poked { sites_written u32, hits u64, window_ns u64, int3_ns u64 } (the int3 protocol over every site, done by the agent) |
//!
//! Any request may answer `Error { errno i32, message str }`.
//!
//! An agent older than a request kind answers it with `Error { errno: EPROTO, message: "malformed
//! request: unknown message kind …" }` (the frame version is unchanged): [`is_unknown_kind_error`]
//! recognises that answer, so a controller falls back to what the older agent supports.

use thiserror::Error;

/// The frame magic, `b"RLVC"`.
pub const FRAME_MAGIC: [u8; 4] = *b"RLVC";
/// The protocol version this crate speaks.
pub const PROTO_VERSION: u16 = 1;
/// Bytes of the frame header.
pub const FRAME_HEADER: usize = 24;
/// Largest payload: a whole registry body plus room for the other fields.
pub const MAX_PAYLOAD: usize = crate::registry::BODY_CAPACITY + 1024;
/// Longest string field (paths, symbol names, messages).
pub const MAX_STR: usize = 4096;
/// The agent drops a partial request after this long without progress.
pub const FRAME_TIMEOUT_MS: u64 = 1000;
/// Bit set in every response kind.
pub const RESPONSE_BIT: u16 = 0x8000;

/// A request from the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    LoadPath {
        path: String,
    },
    CreateMemfd {
        name: String,
        size: u64,
    },
    CloseFd {
        fd: i32,
    },
    Dlsym {
        handle: u64,
        name: String,
    },
    Unload {
        handle: u64,
    },
    Callback {
        handle: u64,
        name: String,
    },
    MapStubs {
        near: u64,
        len: u64,
    },
    Unmap {
        addr: u64,
        len: u64,
    },
    SetImport {
        handle: u64,
        slot: String,
        value: u64,
    },
    WriteBody {
        body_version: u32,
        body: Vec<u8>,
    },
    Lock {
        owner: u32,
    },
    Unlock {
        owner: u32,
    },
    List,
    SetStates {
        table: StateTable,
    },
    /// Whether the agent can do stop-free entry writes now (PAUSE-FREE.md §2).
    StopFreeStatus,
    /// Write every site with the int3 protocol, batched (`relive_x86::int3_batch` order).
    PokeText {
        sites: Vec<PokeSite>,
        /// Threads whose signal mask the controller has just read (ptrace, while they were stopped for
        /// switching) without SIGTRAP in it: the agent does not read theirs again before the write.
        vouched: Vec<i32>,
    },
}

/// Most sites one `PokeText` carries.
pub const MAX_POKE_SITES: usize = 256;
/// Most vouched threads one `PokeText` carries (the agent reads the others' masks itself).
pub const MAX_VOUCHED: usize = 8192;

/// One entry write of `PokeText`: `expect` is what `addr` holds now, `bytes` what it will hold (same
/// length, one instruction each), `dest` where the agent's SIGTRAP handler sends a thread that traps on
/// the transient int3 (what executing `bytes` would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PokeSite {
    pub addr: u64,
    pub bytes: Vec<u8>,
    pub expect: Vec<u8>,
    pub dest: u64,
}

/// `SetStates` (SPEC §8, ST1–ST2) carries the states of every installed or transitioning patch and
/// which patch's record `relive_state_get_prev(id)` answers with (empty outside a transition). This
/// is the most entries it carries per list.
pub const MAX_STATES: usize = 1024;

/// The payload of `SetStates`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateTable {
    /// ST1: every state of every installed or transitioning patch.
    pub states: Vec<StateEntry>,
    /// ST2: one entry per id `relive_state_get_prev` answers (empty outside a transition).
    pub prev: Vec<PrevEntry>,
}

/// ST1: state `id` at `version`, declared by `patch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEntry {
    pub patch: String,
    pub id: u64,
    pub version: u32,
}

/// ST2: during a transition, `relive_state_get_prev(id)` answers with the record of (`patch`, `id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrevEntry {
    pub patch: String,
    pub id: u64,
}

/// One library loaded by the agent, as listed by [`Request::List`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibInfo {
    pub handle: u64,
    pub base: u64,
    pub label: String,
}

/// Most libraries one `List` answer carries.
pub const MAX_LIBS: usize = 256;

/// A response from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Pong {
        agent_version: u32,
        pid: u32,
    },
    Loaded {
        handle: u64,
        base: u64,
    },
    Fd {
        fd: i32,
    },
    Addr {
        addr: u64,
    },
    Int {
        value: i32,
    },
    Done,
    Error {
        errno: i32,
        message: String,
    },
    Libraries {
        libs: Vec<LibInfo>,
    },
    /// `ready`: stop-free entry writes are possible now; else `reason` says what prevents them.
    StopFree {
        ready: bool,
        reason: String,
    },
    /// `PokeText` done: sites written (already-done sites are skipped), int3 hits the handler counted
    /// during the request, and the request's wall time in the agent.
    Poked {
        sites_written: u32,
        hits: u64,
        window_ns: u64,
        /// From the first int3 written to the last sync: how long a call of a site could trap.
        int3_ns: u64,
    },
}

/// Whether an `Error` answer is an agent's "unknown message kind" (an agent older than the request).
pub fn is_unknown_kind_error(errno: i32, message: &str) -> bool {
    const EPROTO: i32 = 71;
    errno == EPROTO && message.contains("unknown message kind")
}

/// Why a frame could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("frame magic {got:02x?} is not {FRAME_MAGIC:02x?}: the peer is not a relive agent/controller")]
    BadMagic { got: [u8; 4] },
    #[error(
        "protocol version {got} is not supported (this side speaks {PROTO_VERSION}): use matching relive and agent builds"
    )]
    UnknownVersion { got: u16 },
    #[error("unknown message kind {kind:#x}")]
    UnknownKind { kind: u16 },
    #[error("payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLong { len: usize },
    #[error("message kind {kind:#x} is truncated: field `{field}` needs {need} more bytes, {have} left")]
    Truncated {
        kind: u16,
        field: &'static str,
        need: usize,
        have: usize,
    },
    #[error("message kind {kind:#x} has {extra} unexpected trailing bytes")]
    Trailing { kind: u16, extra: usize },
    #[error("string field `{field}` of message kind {kind:#x} is {len} bytes (limit {MAX_STR}) or not UTF-8")]
    BadString {
        kind: u16,
        field: &'static str,
        len: usize,
    },
    #[error("field `{field}` of message kind {kind:#x} has the invalid value {value}")]
    BadValue {
        kind: u16,
        field: &'static str,
        value: u64,
    },
    #[error("frame header is {got} bytes, needs {FRAME_HEADER}")]
    ShortHeader { got: usize },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u16,
    pub seq: u32,
    pub payload_len: u32,
}

/// Decodes and validates a frame header (magic, version, size limit).
pub fn decode_frame_header(b: &[u8]) -> Result<FrameHeader, ProtoError> {
    if b.len() < FRAME_HEADER {
        return Err(ProtoError::ShortHeader { got: b.len() });
    }
    let magic: [u8; 4] = b[0..4].try_into().expect("4");
    if magic != FRAME_MAGIC {
        return Err(ProtoError::BadMagic { got: magic });
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != PROTO_VERSION {
        return Err(ProtoError::UnknownVersion { got: version });
    }
    let kind = u16::from_le_bytes([b[6], b[7]]);
    let seq = u32::from_le_bytes(b[8..12].try_into().expect("4"));
    let payload_len = u32::from_le_bytes(b[12..16].try_into().expect("4"));
    if payload_len as usize > MAX_PAYLOAD {
        return Err(ProtoError::TooLong {
            len: payload_len as usize,
        });
    }
    Ok(FrameHeader {
        kind,
        seq,
        payload_len,
    })
}

struct W(Vec<u8>);
impl W {
    fn new(kind: u16, seq: u32) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&FRAME_MAGIC);
        v.extend_from_slice(&PROTO_VERSION.to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
        W(v)
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        // Truncate on a char boundary so a peer never emits an over-long string.
        let mut end = s.len().min(MAX_STR);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes(&s.as_bytes()[..end])
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - FRAME_HEADER) as u32;
        self.0[12..16].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

struct R<'a> {
    b: &'a [u8],
    kind: u16,
}
impl<'a> R<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.b.len() < n {
            return Err(ProtoError::Truncated {
                kind: self.kind,
                field,
                need: n,
                have: self.b.len(),
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4, f)?.try_into().expect("4")))
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8, f)?.try_into().expect("8")))
    }
    fn bytes(&mut self, f: &'static str) -> Result<&'a [u8], ProtoError> {
        let n = self.u32(f)? as usize;
        self.take(n, f)
    }
    fn str(&mut self, f: &'static str) -> Result<String, ProtoError> {
        let b = self.bytes(f)?;
        if b.len() > MAX_STR {
            return Err(ProtoError::BadString {
                kind: self.kind,
                field: f,
                len: b.len(),
            });
        }
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::BadString {
            kind: self.kind,
            field: f,
            len: b.len(),
        })
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing {
                kind: self.kind,
                extra: self.b.len(),
            })
        }
    }
}

impl Request {
    /// The request's kind number.
    pub fn kind(&self) -> u16 {
        match self {
            Request::Ping => 1,
            Request::LoadPath { .. } => 2,
            Request::CreateMemfd { .. } => 3,
            Request::CloseFd { .. } => 4,
            Request::Dlsym { .. } => 5,
            Request::Unload { .. } => 6,
            Request::Callback { .. } => 7,
            Request::MapStubs { .. } => 8,
            Request::Unmap { .. } => 9,
            Request::SetImport { .. } => 10,
            Request::WriteBody { .. } => 11,
            Request::Lock { .. } => 12,
            Request::Unlock { .. } => 13,
            Request::List => 14,
            Request::SetStates { .. } => 15,
            Request::StopFreeStatus => 16,
            Request::PokeText { .. } => 17,
        }
    }

    /// Encodes the request as one frame.
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        let mut w = W::new(self.kind(), seq);
        match self {
            Request::Ping | Request::List | Request::StopFreeStatus => {}
            Request::PokeText { sites, vouched } => {
                // Not truncated: more than MAX_POKE_SITES is rejected by the decoder, never half-sent.
                w.u32(sites.len() as u32);
                for s in sites {
                    w.u64(s.addr).bytes(&s.bytes).bytes(&s.expect).u64(s.dest);
                }
                w.u32(vouched.len() as u32);
                for t in vouched {
                    w.u32(*t as u32);
                }
            }
            Request::LoadPath { path } => {
                w.bytes(path.as_bytes());
            }
            Request::CreateMemfd { name, size } => {
                w.bytes(name.as_bytes()).u64(*size);
            }
            Request::CloseFd { fd } => {
                w.u32(*fd as u32);
            }
            Request::Dlsym { handle, name } | Request::Callback { handle, name } => {
                w.u64(*handle).bytes(name.as_bytes());
            }
            Request::Unload { handle } => {
                w.u64(*handle);
            }
            Request::MapStubs { near: a, len } | Request::Unmap { addr: a, len } => {
                w.u64(*a).u64(*len);
            }
            Request::SetImport { handle, slot, value } => {
                w.u64(*handle).bytes(slot.as_bytes()).u64(*value);
            }
            Request::WriteBody { body_version, body } => {
                w.u32(*body_version).bytes(body);
            }
            Request::Lock { owner } | Request::Unlock { owner } => {
                w.u32(*owner);
            }
            Request::SetStates { table } => {
                let states = &table.states[..table.states.len().min(MAX_STATES)];
                w.u32(states.len() as u32);
                for e in states {
                    let b = e.patch.as_bytes();
                    w.bytes(&b[..b.len().min(MAX_STR)]).u64(e.id).u32(e.version);
                }
                let prev = &table.prev[..table.prev.len().min(MAX_STATES)];
                w.u32(prev.len() as u32);
                for e in prev {
                    let b = e.patch.as_bytes();
                    w.bytes(&b[..b.len().min(MAX_STR)]).u64(e.id);
                }
            }
        }
        w.finish()
    }

    /// Decodes a request payload of the given kind.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Request, ProtoError> {
        let mut r = R { b: payload, kind };
        let req = match kind {
            1 => Request::Ping,
            2 => Request::LoadPath { path: r.str("path")? },
            3 => Request::CreateMemfd {
                name: r.str("name")?,
                size: r.u64("size")?,
            },
            4 => Request::CloseFd {
                fd: r.u32("fd")? as i32,
            },
            5 => Request::Dlsym {
                handle: r.u64("handle")?,
                name: r.str("name")?,
            },
            6 => Request::Unload {
                handle: r.u64("handle")?,
            },
            7 => Request::Callback {
                handle: r.u64("handle")?,
                name: r.str("name")?,
            },
            8 => Request::MapStubs {
                near: r.u64("near")?,
                len: r.u64("len")?,
            },
            9 => Request::Unmap {
                addr: r.u64("addr")?,
                len: r.u64("len")?,
            },
            10 => Request::SetImport {
                handle: r.u64("handle")?,
                slot: r.str("slot")?,
                value: r.u64("value")?,
            },
            11 => {
                let body_version = r.u32("body_version")?;
                let body = r.bytes("body")?;
                if body.len() > crate::registry::BODY_CAPACITY {
                    return Err(ProtoError::TooLong { len: body.len() });
                }
                Request::WriteBody {
                    body_version,
                    body: body.to_vec(),
                }
            }
            12 => Request::Lock {
                owner: r.u32("owner")?,
            },
            13 => Request::Unlock {
                owner: r.u32("owner")?,
            },
            14 => Request::List,
            15 => {
                let n = r.u32("count")? as usize;
                if n > MAX_STATES {
                    return Err(ProtoError::TooLong { len: n });
                }
                let mut states = Vec::with_capacity(n);
                for _ in 0..n {
                    states.push(StateEntry {
                        patch: r.str("patch")?,
                        id: r.u64("id")?,
                        version: r.u32("version")?,
                    });
                }
                let n = r.u32("prev_count")? as usize;
                if n > MAX_STATES {
                    return Err(ProtoError::TooLong { len: n });
                }
                let mut prev = Vec::with_capacity(n);
                for _ in 0..n {
                    prev.push(PrevEntry {
                        patch: r.str("patch")?,
                        id: r.u64("id")?,
                    });
                }
                Request::SetStates {
                    table: StateTable { states, prev },
                }
            }
            16 => Request::StopFreeStatus,
            17 => {
                let n = r.u32("count")? as usize;
                if n > MAX_POKE_SITES {
                    return Err(ProtoError::TooLong { len: n });
                }
                let mut sites = Vec::with_capacity(n);
                for _ in 0..n {
                    sites.push(PokeSite {
                        addr: r.u64("addr")?,
                        bytes: r.bytes("bytes")?.to_vec(),
                        expect: r.bytes("expect")?.to_vec(),
                        dest: r.u64("dest")?,
                    });
                }
                let n = r.u32("vouched")? as usize;
                if n > MAX_VOUCHED {
                    return Err(ProtoError::TooLong { len: n });
                }
                let mut vouched = Vec::with_capacity(n);
                for _ in 0..n {
                    vouched.push(r.u32("tid")? as i32);
                }
                Request::PokeText { sites, vouched }
            }
            _ => return Err(ProtoError::UnknownKind { kind }),
        };
        r.end()?;
        Ok(req)
    }
}

impl Response {
    /// The response's kind number (always has [`RESPONSE_BIT`]).
    pub fn kind(&self) -> u16 {
        RESPONSE_BIT
            | match self {
                Response::Pong { .. } => 1,
                Response::Loaded { .. } => 2,
                Response::Fd { .. } => 3,
                Response::Addr { .. } => 4,
                Response::Int { .. } => 5,
                Response::Done => 6,
                Response::Error { .. } => 7,
                Response::Libraries { .. } => 8,
                Response::StopFree { .. } => 9,
                Response::Poked { .. } => 10,
            }
    }

    /// Encodes the response as one frame answering request `seq`.
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        let mut w = W::new(self.kind(), seq);
        match self {
            Response::Pong { agent_version, pid } => {
                w.u32(*agent_version).u32(*pid);
            }
            Response::Loaded { handle, base } => {
                w.u64(*handle).u64(*base);
            }
            Response::Fd { fd } => {
                w.u32(*fd as u32);
            }
            Response::Addr { addr } => {
                w.u64(*addr);
            }
            Response::Int { value } => {
                w.u32(*value as u32);
            }
            Response::Done => {}
            Response::Error { errno, message } => {
                w.u32(*errno as u32).str(message);
            }
            Response::StopFree { ready, reason } => {
                w.u32(*ready as u32).str(reason);
            }
            Response::Poked {
                sites_written,
                hits,
                window_ns,
                int3_ns,
            } => {
                w.u32(*sites_written).u64(*hits).u64(*window_ns).u64(*int3_ns);
            }
            Response::Libraries { libs } => {
                let libs = &libs[..libs.len().min(MAX_LIBS)];
                w.u32(libs.len() as u32);
                for l in libs {
                    let b = l.label.as_bytes();
                    w.u64(l.handle).u64(l.base).bytes(&b[..b.len().min(MAX_STR)]);
                }
            }
        }
        w.finish()
    }

    /// Decodes a response payload of the given kind.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Response, ProtoError> {
        let mut r = R { b: payload, kind };
        let resp = match kind {
            0x8001 => Response::Pong {
                agent_version: r.u32("agent_version")?,
                pid: r.u32("pid")?,
            },
            0x8002 => Response::Loaded {
                handle: r.u64("handle")?,
                base: r.u64("base")?,
            },
            0x8003 => Response::Fd {
                fd: r.u32("fd")? as i32,
            },
            0x8004 => Response::Addr { addr: r.u64("addr")? },
            0x8005 => Response::Int {
                value: r.u32("value")? as i32,
            },
            0x8006 => Response::Done,
            0x8007 => Response::Error {
                errno: r.u32("errno")? as i32,
                message: r.str("message")?,
            },
            0x8008 => {
                let n = r.u32("count")? as usize;
                if n > MAX_LIBS {
                    return Err(ProtoError::TooLong { len: n });
                }
                let mut libs = Vec::with_capacity(n);
                for _ in 0..n {
                    libs.push(LibInfo {
                        handle: r.u64("handle")?,
                        base: r.u64("base")?,
                        label: r.str("label")?,
                    });
                }
                Response::Libraries { libs }
            }
            0x8009 => Response::StopFree {
                ready: match r.u32("ready")? {
                    0 => false,
                    1 => true,
                    v => {
                        return Err(ProtoError::BadValue {
                            kind,
                            field: "ready",
                            value: v as u64,
                        });
                    }
                },
                reason: r.str("reason")?,
            },
            0x800a => Response::Poked {
                sites_written: r.u32("sites_written")?,
                hits: r.u64("hits")?,
                window_ns: r.u64("window_ns")?,
                int3_ns: r.u64("int3_ns")?,
            },
            _ => return Err(ProtoError::UnknownKind { kind }),
        };
        r.end()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip_req(r: &Request) {
        let f = r.encode(77);
        let h = decode_frame_header(&f).unwrap();
        assert_eq!(h.seq, 77);
        assert_eq!(h.payload_len as usize, f.len() - FRAME_HEADER);
        assert_eq!(&Request::decode(h.kind, &f[FRAME_HEADER..]).unwrap(), r);
    }

    #[test]
    fn t_proto_roundtrip_every_kind_d4_7() {
        for r in [
            Request::Ping,
            Request::LoadPath {
                path: "/proc/self/fd/7".into(),
            },
            Request::CreateMemfd {
                name: "fix.so".into(),
                size: 4096,
            },
            Request::CloseFd { fd: 7 },
            Request::Dlsym {
                handle: 1,
                name: "new_f".into(),
            },
            Request::Unload { handle: 1 },
            Request::Callback {
                handle: 1,
                name: "pre".into(),
            },
            Request::MapStubs {
                near: 0x5555_0000_0000,
                len: 4096,
            },
            Request::Unmap {
                addr: 0x5555_0000_0000,
                len: 4096,
            },
            Request::SetImport {
                handle: 2,
                slot: "imp".into(),
                value: 9,
            },
            Request::WriteBody {
                body_version: 3,
                body: vec![1, 2, 3],
            },
            Request::Lock { owner: 10 },
            Request::Unlock { owner: 10 },
            Request::List,
            Request::StopFreeStatus,
            Request::PokeText {
                sites: vec![],
                vouched: vec![],
            },
            Request::PokeText {
                sites: vec![
                    PokeSite {
                        addr: 0x5555_0000_1000,
                        bytes: vec![0xe9, 1, 2, 3, 4],
                        expect: vec![0x0f, 0x1f, 0x44, 0, 0],
                        dest: 0x5555_0000_2000,
                    },
                    PokeSite {
                        addr: 0x5555_0000_1040,
                        bytes: vec![0x66, 0x90],
                        expect: vec![0xeb, 0x10],
                        dest: 0x5555_0000_1042,
                    },
                ],
                vouched: vec![101, 102, 4_000_000],
            },
            Request::SetStates {
                table: StateTable {
                    states: vec![StateEntry {
                        patch: "st-v2".into(),
                        id: 1,
                        version: 2,
                    }],
                    prev: vec![PrevEntry {
                        patch: "st-v1".into(),
                        id: 1,
                    }],
                },
            },
        ] {
            roundtrip_req(&r);
        }
        for r in [
            Response::Pong {
                agent_version: 1,
                pid: 2,
            },
            Response::Loaded { handle: 1, base: 2 },
            Response::Fd { fd: 3 },
            Response::Addr { addr: 4 },
            Response::Int { value: -5 },
            Response::Done,
            Response::Error {
                errno: 2,
                message: "no such file".into(),
            },
            Response::Libraries {
                libs: vec![LibInfo {
                    handle: 1,
                    base: 2,
                    label: "fix.so".into(),
                }],
            },
            Response::StopFree {
                ready: true,
                reason: String::new(),
            },
            Response::StopFree {
                ready: false,
                reason: "thread 1234 blocks SIGTRAP".into(),
            },
            Response::Poked {
                sites_written: 3,
                hits: 17,
                window_ns: 120_000,
                int3_ns: 90_000,
            },
        ] {
            let f = r.encode(9);
            let h = decode_frame_header(&f).unwrap();
            assert_eq!(Response::decode(h.kind, &f[FRAME_HEADER..]).unwrap(), r);
        }
    }

    #[test]
    fn t_proto_rejects_malformed_d4_7() {
        let f = Request::Dlsym {
            handle: 1,
            name: "abc".into(),
        }
        .encode(1);
        let p = &f[FRAME_HEADER..];
        assert!(matches!(
            Request::decode(5, &p[..p.len() - 1]),
            Err(ProtoError::Truncated { .. })
        ));
        let mut longer = p.to_vec();
        longer.push(0);
        assert!(matches!(
            Request::decode(5, &longer),
            Err(ProtoError::Trailing { .. })
        ));
        assert!(matches!(
            Request::decode(99, p),
            Err(ProtoError::UnknownKind { kind: 99 })
        ));
        let mut bad = f.clone();
        bad[4] = 2;
        assert!(matches!(
            decode_frame_header(&bad),
            Err(ProtoError::UnknownVersion { got: 2 })
        ));
        bad = f.clone();
        bad[0] = 0;
        assert!(matches!(
            decode_frame_header(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
        bad = f.clone();
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame_header(&bad),
            Err(ProtoError::TooLong { .. })
        ));
        let mut nonutf = Request::LoadPath { path: "ab".into() }.encode(1)[FRAME_HEADER..].to_vec();
        nonutf[4] = 0xff;
        assert!(matches!(
            Request::decode(2, &nonutf),
            Err(ProtoError::BadString { .. })
        ));
    }

    #[test]
    fn t_proto_poke_text_limits_issue5() {
        let site = PokeSite {
            addr: 0x1000,
            bytes: vec![0xe9, 0, 0, 0, 0],
            expect: vec![0x0f, 0x1f, 0x44, 0, 0],
            dest: 0x2000,
        };
        let ok = Request::PokeText {
            sites: vec![site.clone(); MAX_POKE_SITES],
            vouched: (0..MAX_VOUCHED as i32).collect(),
        };
        roundtrip_req(&ok);
        let over = Request::PokeText {
            sites: vec![site.clone(); MAX_POKE_SITES + 1],
            vouched: vec![],
        }
        .encode(1);
        assert!(matches!(
            Request::decode(17, &over[FRAME_HEADER..]),
            Err(ProtoError::TooLong { len }) if len == MAX_POKE_SITES + 1
        ));
        let over = Request::PokeText {
            sites: vec![site],
            vouched: vec![7; MAX_VOUCHED + 1],
        }
        .encode(1);
        assert!(matches!(
            Request::decode(17, &over[FRAME_HEADER..]),
            Err(ProtoError::TooLong { len }) if len == MAX_VOUCHED + 1
        ));
        let mut bad = Response::StopFree {
            ready: true,
            reason: String::new(),
        }
        .encode(1)[FRAME_HEADER..]
            .to_vec();
        bad[0] = 2;
        assert!(matches!(
            Response::decode(0x8009, &bad),
            Err(ProtoError::BadValue { field: "ready", .. })
        ));
    }

    /// An agent that predates a kind answers it with the service's "malformed request: …" error; the
    /// controller recognises exactly that, and nothing else, as "older agent".
    #[test]
    fn t_proto_older_agent_answer_is_recognised_issue5() {
        let old = format!("malformed request: {}", ProtoError::UnknownKind { kind: 17 });
        assert!(is_unknown_kind_error(71, &old));
        assert!(!is_unknown_kind_error(
            71,
            "malformed request: message kind 0x11 is truncated"
        ));
        assert!(!is_unknown_kind_error(22, &old));
    }

    proptest! {
        // Whatever bytes arrive, decoding returns a value or an error, never panics.
        #[test]
        fn t_proto_decode_total_d4_7(kind in 0u16..20, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Request::decode(kind, &payload);
            let _ = Response::decode(kind | RESPONSE_BIT, &payload);
        }
    }
}
