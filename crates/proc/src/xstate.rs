//! The full extended register state of a thread (`PTRACE_GETREGSET NT_X86_XSTATE`): x87, SSE, AVX,
//! AVX-512… in the XSAVE layout. A remote call saves it before and restores it after, so the
//! hijacked thread's vector registers are unchanged (PROTOTYPE.md §3: without it xmm0 was clobbered).

/// `NT_X86_XSTATE`.
pub const NT_X86_XSTATE: libc::c_int = 0x202;
/// `FP_XSTATE_MAGIC1`, in the software-reserved bytes of an XSAVE image meant for a signal frame.
pub const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
/// `FP_XSTATE_MAGIC2`, right after the XSAVE area in a signal frame.
pub const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Offset of `struct _fpx_sw_bytes` inside the 512-byte legacy area.
pub const SW_BYTES_OFFSET: usize = 464;

/// An XSAVE image of one thread.
#[derive(Clone, PartialEq, Eq)]
pub struct XState(pub Vec<u8>);

impl std::fmt::Debug for XState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "XState({} bytes)", self.0.len())
    }
}

impl XState {
    /// The image as a signal frame's fpstate: the XSAVE area with `struct _fpx_sw_bytes` filled in
    /// (ptrace puts XCR0 in the first software-reserved word instead: gdb's convention) and
    /// `FP_XSTATE_MAGIC2` appended right after the area, as the kernel's sigreturn checks.
    pub fn as_sigframe_fpstate(&self) -> Option<Vec<u8>> {
        let b = &self.0;
        if b.len() < 576 {
            return None;
        }
        let xcr0 = u64::from_le_bytes(b[SW_BYTES_OFFSET..SW_BYTES_OFFSET + 8].try_into().ok()?);
        let size = b.len() as u32;
        let mut out = b.clone();
        let sw = &mut out[SW_BYTES_OFFSET..512];
        sw.fill(0);
        sw[0..4].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
        sw[4..8].copy_from_slice(&(size + 4).to_le_bytes());
        sw[8..16].copy_from_slice(&xcr0.to_le_bytes());
        sw[16..20].copy_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());
        Some(out)
    }

    /// The 16-byte xmm register `n` (0..16) from the legacy area.
    pub fn xmm(&self, n: usize) -> Option<[u8; 16]> {
        let o = 160 + 16 * n;
        self.0.get(o..o + 16).and_then(|s| s.try_into().ok())
    }
}

/// Reads a stopped thread's xstate.
pub fn get_xstate(tid: i32) -> std::io::Result<XState> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: PTRACE_GETREGSET writes at most iov_len bytes into `buf` and updates iov_len.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(iov.iov_len);
    Ok(XState(buf))
}

/// Writes a stopped thread's xstate back.
pub fn set_xstate(tid: i32, xs: &XState) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: xs.0.as_ptr() as *mut libc::c_void,
        iov_len: xs.0.len(),
    };
    // SAFETY: PTRACE_SETREGSET reads iov_len bytes from the buffer, which outlives the call.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
