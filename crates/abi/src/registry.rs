//! The registry (DESIGN §4.8): a fixed, versioned header followed by a body buffer, in the agent's
//! memory, found through the exported symbol [`crate::REGISTRY_SYMBOL`].
//!
//! ```text
//! offset size field
//!      0    8 magic            b"RLVREG\0\x01"
//!      8    4 layout_version   LAYOUT_VERSION
//!     12    4 header_size      HEADER_SIZE
//!     16    8 generation       seqlock: odd while a writer is inside, even when stable
//!     24    4 agent_pid        the process that owns this copy (changes in a fork child)
//!     28    4 agent_version    crate::AGENT_VERSION
//!     32    8 tpoff            i64: offset of the agent's IE TLS state slot from the thread pointer
//!     40    8 tls_image_addr   address of the slot's byte(s) in the TLS init image (.tdata, RELRO)
//!     48    4 req_fd           fd number of the request pipe's read end (controller opens /proc/PID/fd/N)
//!     52    4 resp_fd          fd number of the response pipe's write end
//!     56    4 lock_owner       pid of the controller holding the controller lock, 0 if free
//!     60    4 service_tid      tid of the agent's service thread
//!     64    4 body_len         bytes of the body in use
//!     68    4 body_capacity    BODY_CAPACITY
//!     72    4 body_version     version of the opaque body document (chosen by the controller)
//!     76    4 flags            FLAG_* bits
//!     80    8 lock_since       CLOCK_MONOTONIC ns when lock_owner took the lock
//!     88   40 reserved         zero
//!    128  cap body             opaque document written by the controller (relive-core's model state)
//! ```
//!
//! All integers are little-endian. Readers use the seqlock: read `generation` (retry while odd),
//! copy header and body, read `generation` again, retry if it changed ([`decode_consistent`]).
//! Only the agent's service thread writes, so writers never race each other; the controller asks the
//! agent to write the body through the command channel ([`crate::proto::Request::WriteBody`]).

use thiserror::Error;

/// The magic at offset 0.
pub const MAGIC: [u8; 8] = *b"RLVREG\0\x01";
/// The header layout version this crate reads and writes.
pub const LAYOUT_VERSION: u32 = 1;
/// Bytes of the fixed header; the body starts here.
pub const HEADER_SIZE: usize = 128;
/// Bytes reserved for the body.
pub const BODY_CAPACITY: usize = 64 * 1024;
/// Total bytes of the registry object.
pub const TOTAL_SIZE: usize = HEADER_SIZE + BODY_CAPACITY;

/// Offsets of the header fields (see the module documentation).
pub mod off {
    pub const MAGIC: usize = 0;
    pub const LAYOUT_VERSION: usize = 8;
    pub const HEADER_SIZE: usize = 12;
    pub const GENERATION: usize = 16;
    pub const AGENT_PID: usize = 24;
    pub const AGENT_VERSION: usize = 28;
    pub const TPOFF: usize = 32;
    pub const TLS_IMAGE_ADDR: usize = 40;
    pub const REQ_FD: usize = 48;
    pub const RESP_FD: usize = 52;
    pub const LOCK_OWNER: usize = 56;
    pub const SERVICE_TID: usize = 60;
    pub const BODY_LEN: usize = 64;
    pub const BODY_CAPACITY: usize = 68;
    pub const BODY_VERSION: usize = 72;
    pub const FLAGS: usize = 76;
    pub const LOCK_SINCE: usize = 80;
}

/// `flags`: the agent finished its initialisation (service thread running, fds valid).
pub const FLAG_READY: u32 = 1;
/// `flags`: the agent was loaded with `LD_PRELOAD` (it was already mapped before `main`).
pub const FLAG_PRELOADED: u32 = 2;
/// `flags`: the agent's SIGTRAP handler is installed (a preloaded agent that interposes the signal
/// functions): stop-free entry writes are possible, and a stray single-step trap (a tracer killed while it
/// single-stepped a thread) is dropped instead of killing the process.
pub const FLAG_TRAP_HANDLER: u32 = 4;

/// The decoded fixed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub layout_version: u32,
    pub generation: u64,
    pub agent_pid: u32,
    pub agent_version: u32,
    pub tpoff: i64,
    pub tls_image_addr: u64,
    pub req_fd: i32,
    pub resp_fd: i32,
    pub lock_owner: u32,
    pub service_tid: u32,
    pub body_len: u32,
    pub body_capacity: u32,
    pub body_version: u32,
    pub flags: u32,
    pub lock_since_ns: u64,
}

/// A consistent copy of the registry: header plus the used part of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub header: Header,
    pub body: Vec<u8>,
}

/// Why registry bytes could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("registry is {got} bytes, shorter than its {need}-byte header: the read was cut short")]
    Short { got: usize, need: usize },
    #[error(
        "registry magic is {got:02x?}, expected {MAGIC:02x?}: the symbol does not point to a relive registry"
    )]
    BadMagic { got: [u8; 8] },
    #[error(
        "registry layout version {got} is not supported (this relive reads version {LAYOUT_VERSION}): \
         use the relive release that matches the agent loaded in the target"
    )]
    UnknownVersion { got: u32 },
    #[error("registry header size {got} differs from {HEADER_SIZE} for layout version {LAYOUT_VERSION}")]
    BadHeaderSize { got: u32 },
    #[error("registry body length {len} exceeds its capacity {cap}")]
    BodyTooLong { len: u32, cap: u32 },
    #[error("registry is being written (odd generation {generation}); retry")]
    WriterInside { generation: u64 },
    #[error("registry changed while it was read (generation {before} then {after}); retry")]
    Torn { before: u64, after: u64 },
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Reads the generation word from the first bytes of a registry copy.
pub fn generation_of(bytes: &[u8]) -> Result<u64, RegistryError> {
    if bytes.len() < off::GENERATION + 8 {
        return Err(RegistryError::Short {
            got: bytes.len(),
            need: HEADER_SIZE,
        });
    }
    Ok(u64_at(bytes, off::GENERATION))
}

/// Decodes a header from `bytes` (at least [`HEADER_SIZE`] long). Does not check the seqlock.
pub fn decode_header(bytes: &[u8]) -> Result<Header, RegistryError> {
    if bytes.len() < HEADER_SIZE {
        return Err(RegistryError::Short {
            got: bytes.len(),
            need: HEADER_SIZE,
        });
    }
    let magic: [u8; 8] = bytes[0..8].try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(RegistryError::BadMagic { got: magic });
    }
    let layout_version = u32_at(bytes, off::LAYOUT_VERSION);
    if layout_version != LAYOUT_VERSION {
        return Err(RegistryError::UnknownVersion { got: layout_version });
    }
    let hs = u32_at(bytes, off::HEADER_SIZE);
    if hs as usize != HEADER_SIZE {
        return Err(RegistryError::BadHeaderSize { got: hs });
    }
    let h = Header {
        layout_version,
        generation: u64_at(bytes, off::GENERATION),
        agent_pid: u32_at(bytes, off::AGENT_PID),
        agent_version: u32_at(bytes, off::AGENT_VERSION),
        tpoff: u64_at(bytes, off::TPOFF) as i64,
        tls_image_addr: u64_at(bytes, off::TLS_IMAGE_ADDR),
        req_fd: u32_at(bytes, off::REQ_FD) as i32,
        resp_fd: u32_at(bytes, off::RESP_FD) as i32,
        lock_owner: u32_at(bytes, off::LOCK_OWNER),
        service_tid: u32_at(bytes, off::SERVICE_TID),
        body_len: u32_at(bytes, off::BODY_LEN),
        body_capacity: u32_at(bytes, off::BODY_CAPACITY),
        body_version: u32_at(bytes, off::BODY_VERSION),
        flags: u32_at(bytes, off::FLAGS),
        lock_since_ns: u64_at(bytes, off::LOCK_SINCE),
    };
    if h.body_len > h.body_capacity || h.body_capacity as usize > BODY_CAPACITY {
        return Err(RegistryError::BodyTooLong {
            len: h.body_len,
            cap: h.body_capacity,
        });
    }
    Ok(h)
}

/// Encodes `h` into the first [`HEADER_SIZE`] bytes of `out` (magic, version and size included).
pub fn encode_header(h: &Header, out: &mut [u8]) {
    assert!(
        out.len() >= HEADER_SIZE,
        "encode_header needs {HEADER_SIZE} bytes"
    );
    out[..HEADER_SIZE].fill(0);
    out[0..8].copy_from_slice(&MAGIC);
    let mut put32 = |o: usize, v: u32| out[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put32(off::LAYOUT_VERSION, LAYOUT_VERSION);
    put32(off::HEADER_SIZE, HEADER_SIZE as u32);
    put32(off::AGENT_PID, h.agent_pid);
    put32(off::AGENT_VERSION, h.agent_version);
    put32(off::REQ_FD, h.req_fd as u32);
    put32(off::RESP_FD, h.resp_fd as u32);
    put32(off::LOCK_OWNER, h.lock_owner);
    put32(off::SERVICE_TID, h.service_tid);
    put32(off::BODY_LEN, h.body_len);
    put32(off::BODY_CAPACITY, h.body_capacity);
    put32(off::BODY_VERSION, h.body_version);
    put32(off::FLAGS, h.flags);
    let mut put64 = |o: usize, v: u64| out[o..o + 8].copy_from_slice(&v.to_le_bytes());
    put64(off::GENERATION, h.generation);
    put64(off::TPOFF, h.tpoff as u64);
    put64(off::TLS_IMAGE_ADDR, h.tls_image_addr);
    put64(off::LOCK_SINCE, h.lock_since_ns);
}

/// Decodes one attempt of a seqlock read: `first` is the copy of the whole registry (header and at
/// least `body_len` body bytes), `gen_after` the generation read again after the copy.
pub fn decode_consistent(first: &[u8], gen_after: u64) -> Result<Snapshot, RegistryError> {
    let before = generation_of(first)?;
    if before % 2 == 1 {
        return Err(RegistryError::WriterInside { generation: before });
    }
    if before != gen_after {
        return Err(RegistryError::Torn {
            before,
            after: gen_after,
        });
    }
    let header = decode_header(first)?;
    let end = HEADER_SIZE + header.body_len as usize;
    if first.len() < end {
        return Err(RegistryError::Short {
            got: first.len(),
            need: end,
        });
    }
    Ok(Snapshot {
        body: first[HEADER_SIZE..end].to_vec(),
        header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            layout_version: LAYOUT_VERSION,
            generation: 42,
            agent_pid: 1234,
            agent_version: crate::AGENT_VERSION,
            tpoff: -152,
            tls_image_addr: 0x7f00_0000_1000,
            req_fd: 5,
            resp_fd: 8,
            lock_owner: 0,
            service_tid: 1240,
            body_len: 3,
            body_capacity: BODY_CAPACITY as u32,
            body_version: 1,
            flags: FLAG_READY,
            lock_since_ns: 0,
        }
    }

    #[test]
    fn t_registry_header_roundtrip_d4_8() {
        let mut buf = vec![0u8; HEADER_SIZE + 3];
        encode_header(&sample(), &mut buf);
        buf[HEADER_SIZE..].copy_from_slice(b"abc");
        let s = decode_consistent(&buf, 42).unwrap();
        assert_eq!(s.header, sample());
        assert_eq!(s.body, b"abc");
    }

    #[test]
    fn t_registry_rejects_bad_input_d4_8() {
        let mut buf = vec![0u8; HEADER_SIZE];
        encode_header(&sample(), &mut buf);
        assert!(matches!(
            decode_consistent(&buf, 44),
            Err(RegistryError::Torn {
                before: 42,
                after: 44
            })
        ));
        assert!(matches!(
            decode_header(&buf[..10]),
            Err(RegistryError::Short { .. })
        ));
        let mut odd = buf.clone();
        odd[off::GENERATION] = 43;
        assert!(matches!(
            decode_consistent(&odd, 43),
            Err(RegistryError::WriterInside { .. })
        ));
        let mut v = buf.clone();
        v[off::LAYOUT_VERSION] = 9;
        assert_eq!(decode_header(&v), Err(RegistryError::UnknownVersion { got: 9 }));
        let mut m = buf.clone();
        m[0] = b'X';
        assert!(matches!(decode_header(&m), Err(RegistryError::BadMagic { .. })));
        // body_len 3 but the copy has no body bytes
        assert!(matches!(
            decode_consistent(&buf, 42),
            Err(RegistryError::Short { .. })
        ));
    }
}
