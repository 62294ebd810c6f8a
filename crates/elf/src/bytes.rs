//! The bytes of one object file, shared without copying: a `Vec` (tests, the vDSO read from memory) or a
//! read-only mapping of the file that a caller made (relive-proc maps `/proc/PID/map_files/…`, so loading a
//! process image reads only the pages that symbols, unwind tables and entry analysis touch).

use std::ops::Deref;
use std::sync::Arc;

/// Cheaply clonable, immutable file bytes.
#[derive(Clone)]
pub struct FileBytes(Arc<dyn AsRef<[u8]> + Send + Sync>);

impl FileBytes {
    /// Wraps any owner of bytes (a `Vec<u8>`, a mapping).
    pub fn new(owner: impl AsRef<[u8]> + Send + Sync + 'static) -> FileBytes {
        FileBytes(Arc::new(owner))
    }
}

impl From<Vec<u8>> for FileBytes {
    fn from(v: Vec<u8>) -> FileBytes {
        FileBytes::new(v)
    }
}

impl Default for FileBytes {
    fn default() -> FileBytes {
        FileBytes::new(Vec::new())
    }
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

impl AsRef<[u8]> for FileBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileBytes({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_without_copying() {
        let b = FileBytes::from(vec![1u8, 2, 3]);
        let c = b.clone();
        assert_eq!(&b[..], &[1, 2, 3]);
        assert_eq!(b.as_ptr(), c.as_ptr());
        assert_eq!(format!("{c:?}"), "FileBytes(3 bytes)");
    }
}
