//! Read-only, private mappings of files: how a process image holds the objects of a target without reading
//! them whole (the image load touches only the pages its symbols, unwind tables and entry analysis need).
//!
//! A mapped file that is truncated while relive runs would raise SIGBUS on access; the target itself maps
//! the same file and would fault the same way, and a controller that dies is recovered from the registry
//! (DESIGN §4.8).

use std::fs::File;
use std::os::fd::AsRawFd;

/// A `PROT_READ`, `MAP_PRIVATE` mapping of a whole file.
pub struct MappedFile {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and never changed through this type; sharing `&[u8]` views of it across
// threads is as safe as sharing any immutable byte slice.
unsafe impl Send for MappedFile {}
// SAFETY: as for Send: only shared, read-only access exists.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `file` whole. An empty file gives an empty mapping (no `mmap` call).
    pub fn map(file: &File) -> std::io::Result<MappedFile> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        if len == 0 {
            return Ok(MappedFile {
                ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(),
                len: 0,
            });
        }
        // SAFETY: a fresh private read-only mapping chosen by the kernel (addr NULL); it aliases no Rust
        // object, and the fd stays valid for the duration of the call.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MappedFile {
            ptr: p as *const u8,
            len,
        })
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is a live PROT_READ mapping owned by `self` (or `len` is 0 with a dangling,
        // aligned pointer), and nothing writes to it.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping `map` created; no slice borrowed from `self` outlives it.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_file_and_an_empty_one() {
        let dir = std::env::temp_dir().join(format!("relive-mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"hello").unwrap();
        let m = MappedFile::map(&File::open(&p).unwrap()).unwrap();
        assert_eq!(m.as_ref(), b"hello");
        std::fs::write(&p, b"").unwrap();
        let e = MappedFile::map(&File::open(&p).unwrap()).unwrap();
        assert!(e.as_ref().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
