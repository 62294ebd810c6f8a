//! Target memory I/O (CRATES.md §2.2): reads with `process_vm_readv` split at page boundaries,
//! data writes with `process_vm_writev`, code writes through `/proc/PID/mem` (FOLL_FORCE: works on
//! read-only text without `mprotect`), falling back to `PTRACE_POKEDATA`.

use crate::error::{ProcError, Result};
use crate::ptrace::StoppedThread;
use std::io;
use std::os::unix::fs::FileExt;

pub const PAGE_SIZE: u64 = 4096;

/// Splits `[addr, addr+len)` at page boundaries into (remote address, length) pieces.
pub fn split_pages(addr: u64, len: usize) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    let mut a = addr;
    let end = addr.saturating_add(len as u64);
    while a < end {
        let next = ((a / PAGE_SIZE) + 1).saturating_mul(PAGE_SIZE).min(end);
        out.push((a, (next - a) as usize));
        a = next;
    }
    out
}

fn vm_io(pid: i32, addr: u64, buf: *mut u8, len: usize, write: bool) -> io::Result<usize> {
    if len == 0 {
        return Ok(0);
    }
    let pieces = split_pages(addr, len);
    let local = libc::iovec {
        iov_base: buf as *mut libc::c_void,
        iov_len: len,
    };
    let remote: Vec<libc::iovec> = pieces
        .iter()
        .map(|&(a, l)| libc::iovec {
            iov_base: a as *mut libc::c_void,
            iov_len: l,
        })
        .collect();
    let mut total = 0usize;
    // IOV_MAX is 1024: do it in chunks.
    for chunk in remote.chunks(1024) {
        let chunk_len: usize = chunk.iter().map(|v| v.iov_len).sum();
        let local = libc::iovec {
            // SAFETY: `total` < `len`, so the pointer stays inside the caller's buffer.
            iov_base: unsafe { (local.iov_base as *mut u8).add(total) } as *mut libc::c_void,
            iov_len: chunk_len,
        };
        // SAFETY: `local` describes `chunk_len` bytes inside the caller's buffer (valid for reads
        // and, for process_vm_readv, writes); the remote iovecs are addresses in the target, which
        // the kernel checks.
        let r = unsafe {
            if write {
                libc::process_vm_writev(pid, &local, 1, chunk.as_ptr(), chunk.len() as libc::c_ulong, 0)
            } else {
                libc::process_vm_readv(pid, &local, 1, chunk.as_ptr(), chunk.len() as libc::c_ulong, 0)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if total > 0 && e.raw_os_error() == Some(libc::EFAULT) {
                return Ok(total);
            }
            return Err(e);
        }
        total += r as usize;
        if (r as usize) < chunk_len {
            break;
        }
    }
    Ok(total)
}

fn mem_err(pid: i32, addr: u64, len: usize, op: &'static str, e: io::Error) -> ProcError {
    match e.raw_os_error() {
        Some(libc::EFAULT) | Some(libc::EIO) | Some(libc::ENOMEM) => ProcError::Memory {
            pid,
            addr,
            len,
            op,
            err: e,
        },
        _ => ProcError::from_os(
            pid,
            None,
            if op == "read" {
                "process_vm_readv"
            } else {
                "process_vm_writev"
            },
            e,
        ),
    }
}

/// Reads as many bytes as possible from `addr` (stopping at the first unreadable page); returns
/// how many were read.
pub fn read_memory_partial(pid: i32, addr: u64, buf: &mut [u8]) -> Result<usize> {
    match vm_io(pid, addr, buf.as_mut_ptr(), buf.len(), false) {
        Ok(n) => Ok(n),
        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => Ok(0),
        Err(e) => Err(mem_err(pid, addr, buf.len(), "read", e)),
    }
}

/// Reads exactly `buf.len()` bytes from `addr` in `pid`.
pub fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    let n = vm_io(pid, addr, buf.as_mut_ptr(), buf.len(), false)
        .map_err(|e| mem_err(pid, addr, buf.len(), "read", e))?;
    whole(pid, addr, n, buf.len(), "read")
}

/// `process_vm_readv` of `buf` without error mapping: the raw OS error, or how many bytes were read
/// before the first unreadable page.
pub(crate) fn vm_read(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    vm_io(pid, addr, buf.as_mut_ptr(), buf.len(), false)
}

/// A transfer that stopped after `n` of `len` bytes is a memory error at the first byte not moved.
fn whole(pid: i32, addr: u64, n: usize, len: usize, op: &'static str) -> Result<()> {
    if n < len {
        return Err(ProcError::Memory {
            pid,
            addr: addr + n as u64,
            len: len - n,
            op,
            err: io::Error::from_raw_os_error(libc::EFAULT),
        });
    }
    Ok(())
}

/// Reads one little-endian u64.
pub fn read_u64(pid: i32, addr: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    read_memory(pid, addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Writes `bytes` to writable memory (`process_vm_writev`; respects page protections).
pub fn write_data(pid: i32, addr: u64, bytes: &[u8]) -> Result<()> {
    let n = vm_io(pid, addr, bytes.as_ptr() as *mut u8, bytes.len(), true)
        .map_err(|e| mem_err(pid, addr, bytes.len(), "write", e))?;
    whole(pid, addr, n, bytes.len(), "write")
}

/// Writes `bytes` at `addr` through `/proc/PID/mem` with one `pwrite` (writes read-only text too;
/// DESIGN §4.3: entries are single writes of at most 8 bytes).
pub fn write_code(pid: i32, addr: u64, bytes: &[u8]) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| ProcError::from_os(pid, None, "open /proc/PID/mem", e))?;
    let n = f.write_at(bytes, addr).map_err(|e| match e.raw_os_error() {
        Some(libc::EIO) | Some(libc::EFAULT) => ProcError::Memory {
            pid,
            addr,
            len: bytes.len(),
            op: "write",
            err: e,
        },
        _ => ProcError::from_os(pid, None, "pwrite /proc/PID/mem", e),
    })?;
    if n != bytes.len() {
        return Err(ProcError::Memory {
            pid,
            addr: addr + n as u64,
            len: bytes.len() - n,
            op: "write",
            err: io::Error::from_raw_os_error(libc::EIO),
        });
    }
    Ok(())
}

/// [`write_code`], falling back to `PTRACE_POKEDATA` through a stopped thread of the target when
/// the kernel refuses forced writes to `/proc/PID/mem` (possible since 6.12).
pub fn write_code_via(thread: &StoppedThread, addr: u64, bytes: &[u8]) -> Result<()> {
    match write_code(thread.pid(), addr, bytes) {
        Ok(()) => Ok(()),
        Err(ProcError::TargetDied { .. }) | Err(ProcError::NoSuchProcess { .. }) => {
            Err(ProcError::TargetDied {
                pid: thread.pid(),
                tid: Some(thread.tid()),
                during: "writing code",
            })
        }
        Err(_) => thread.poke_bytes(addr, bytes),
    }
}

/// Reads target memory page by page, caching pages: the stack reader the unwinder uses.
#[derive(Debug)]
pub struct PageCacheReader {
    pid: i32,
    pages: Vec<(u64, Option<Box<[u8; PAGE_SIZE as usize]>>)>,
}

impl PageCacheReader {
    pub fn new(pid: i32) -> Self {
        PageCacheReader {
            pid,
            pages: Vec::new(),
        }
    }

    /// Forgets cached pages (call after the thread ran again).
    pub fn clear(&mut self) {
        self.pages.clear();
    }

    fn page(&mut self, page: u64) -> Option<&[u8; PAGE_SIZE as usize]> {
        let idx = match self.pages.iter().position(|(a, _)| *a == page) {
            Some(i) => i,
            None => {
                let mut buf = Box::new([0u8; PAGE_SIZE as usize]);
                let ok = matches!(read_memory_partial(self.pid, page, &mut buf[..]), Ok(n) if n == PAGE_SIZE as usize);
                self.pages.push((page, ok.then_some(buf)));
                self.pages.len() - 1
            }
        };
        self.pages[idx].1.as_deref()
    }

    /// Reads a u64 at `addr` (may straddle two pages).
    pub fn read_u64(&mut self, addr: u64) -> Option<u64> {
        let page = addr & !(PAGE_SIZE - 1);
        let off = (addr - page) as usize;
        if off + 8 <= PAGE_SIZE as usize {
            let p = self.page(page)?;
            return Some(u64::from_le_bytes(p[off..off + 8].try_into().ok()?));
        }
        let mut b = [0u8; 8];
        let first = PAGE_SIZE as usize - off;
        b[..first].copy_from_slice(&self.page(page)?[off..]);
        b[first..].copy_from_slice(&self.page(page + PAGE_SIZE)?[..8 - first]);
        Some(u64::from_le_bytes(b))
    }
}

impl relive_unwind::MemoryReader for PageCacheReader {
    fn read_u64(&mut self, addr: u64) -> Option<u64> {
        PageCacheReader::read_u64(self, addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_at_pages() {
        assert_eq!(split_pages(0x1ff0, 0x20), vec![(0x1ff0, 0x10), (0x2000, 0x10)]);
        assert_eq!(split_pages(0x1000, 0x1000), vec![(0x1000, 0x1000)]);
        assert_eq!(split_pages(0x1000, 0), vec![]);
        assert_eq!(split_pages(0xfff, 0x2002).len(), 4);
    }

    #[test]
    fn reads_own_memory_and_stops_at_unmapped() {
        let me = std::process::id() as i32;
        let data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
        let mut buf = vec![0u8; data.len()];
        read_memory(me, data.as_ptr() as u64, &mut buf).unwrap();
        assert_eq!(buf, data);
        let mut r = PageCacheReader::new(me);
        let v = 0x1122334455667788u64;
        assert_eq!(r.read_u64(&v as *const u64 as u64), Some(v));
        // Page 0 is never mapped.
        let mut b = [0u8; 16];
        assert!(matches!(
            read_memory(me, 8, &mut b),
            Err(ProcError::Memory { .. })
        ));
        assert_eq!(read_memory_partial(me, 8, &mut b).unwrap(), 0);
    }
}
