//! The agent's initial-exec TLS state slot (DESIGN §4.2, CRATES.md §3 (b)).
//!
//! One 8-byte slot in `.tdata` (so it has an init image that new threads copy), declared with
//! `global_asm!` because stable Rust has neither `#[thread_local]` nor `-C tls-model`. It is accessed
//! through `sym@GOTTPOFF` (initial-exec), which makes the linker emit one `R_X86_64_TPOFF64` dynamic
//! relocation and mark the library `DF_STATIC_TLS`. A thread's slot is at `fs_base + tpoff`.
//! The dispatcher stubs read it with `cmp qword ptr fs:[tpoff], state`.

use core::arch::{asm, global_asm};

/// The value every thread's slot starts with (the init image's content): IDLE (SPEC C1).
pub const SLOT_INIT: u64 = 0;

global_asm!(
    ".pushsection .tdata,\"awT\",@progbits",
    ".p2align 3",
    ".globl __relive_agent_tls_state",
    ".hidden __relive_agent_tls_state",
    ".type __relive_agent_tls_state,@object",
    ".size __relive_agent_tls_state,8",
    "__relive_agent_tls_state:",
    ".quad 0",
    ".popsection",
    // The slot's offset inside this module's TLS block (a link-time constant: DTPOFF64 against a
    // local definition is resolved by ld), so the init image byte is at base + PT_TLS.p_vaddr + this.
    ".pushsection .data.rel.ro.relive_tls_dtpoff,\"aw\",@progbits",
    ".p2align 3",
    ".globl __relive_agent_tls_dtpoff",
    ".hidden __relive_agent_tls_dtpoff",
    "__relive_agent_tls_dtpoff:",
    ".quad __relive_agent_tls_state@DTPOFF",
    ".popsection",
);

/// The thread-pointer offset of the slot (`&slot - fs:[0]`), the same for every thread.
#[inline(always)]
pub fn tpoff() -> i64 {
    let t: i64;
    // SAFETY: reads the GOT entry the linker created for the IE TLS symbol; no memory is written.
    unsafe {
        asm!(
            "mov {t}, qword ptr [rip + __relive_agent_tls_state@GOTTPOFF]",
            t = out(reg) t,
            options(nostack, preserves_flags, readonly, pure),
        )
    };
    t
}

/// The slot's offset inside the module's TLS init image.
pub fn dtpoff() -> u64 {
    let v: u64;
    // SAFETY: reads an 8-byte constant defined in `global_asm!` above.
    unsafe {
        asm!(
            "mov {v}, qword ptr [rip + __relive_agent_tls_dtpoff]",
            v = out(reg) v,
            options(nostack, preserves_flags, readonly, pure),
        )
    };
    v
}

/// A pointer to the calling thread's slot.
#[inline(always)]
pub fn slot_ptr() -> *mut u64 {
    let p: *mut u64;
    // SAFETY: fs:[0] holds the thread pointer (glibc TCB self-pointer); adding the IE offset gives
    // this thread's slot, which lives as long as the thread.
    unsafe {
        asm!(
            "mov {p}, qword ptr [rip + __relive_agent_tls_state@GOTTPOFF]",
            "add {p}, qword ptr fs:[0]",
            p = out(reg) p,
            options(nostack, preserves_flags, readonly, pure),
        )
    };
    p
}

/// The calling thread's state value.
pub fn current_state() -> u64 {
    // SAFETY: `slot_ptr` points to this thread's live, aligned slot.
    unsafe { slot_ptr().read_volatile() }
}

/// The address of the slot's bytes in the TLS init image (`.tdata`, inside RELRO) in this process.
/// The controller writes it through `/proc/PID/mem` so new threads start in a transition's target
/// state (DESIGN §4.2). Returns 0 if the module's `PT_TLS` cannot be found.
pub fn init_image_addr() -> u64 {
    struct Find {
        me: usize,
        out: u64,
    }
    extern "C" fn cb(info: *mut libc::dl_phdr_info, _size: usize, data: *mut libc::c_void) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info pointer for the duration of the callback, and
        // `data` is the `Find` we passed below.
        unsafe {
            let f = &mut *(data as *mut Find);
            let info = &*info;
            let phdrs = std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
            let base = info.dlpi_addr as usize;
            let contains = phdrs.iter().any(|p| {
                p.p_type == libc::PT_LOAD
                    && f.me >= base + p.p_vaddr as usize
                    && f.me < base + (p.p_vaddr + p.p_memsz) as usize
            });
            if !contains {
                return 0;
            }
            if let Some(t) = phdrs.iter().find(|p| p.p_type == libc::PT_TLS) {
                // Wrapping: in an executable (a test binary linking the rlib) DTPOFF is no image offset.
                f.out = (base as u64).wrapping_add(t.p_vaddr).wrapping_add(dtpoff());
            }
            1
        }
    }
    let mut f = Find {
        me: init_image_addr as fn() -> u64 as usize,
        out: 0,
    };
    // SAFETY: the callback only reads the loader's phdr data and writes into `f`.
    unsafe { libc::dl_iterate_phdr(Some(cb), &mut f as *mut Find as *mut libc::c_void) };
    f.out
}

/// Exported for remote calls and for patches: the slot's thread-pointer offset.
#[unsafe(no_mangle)]
pub extern "C" fn relive_agent_tpoff() -> i64 {
    tpoff()
}

/// Exported: the calling thread's state (for tests and for patch code that wants to know).
#[unsafe(no_mangle)]
pub extern "C" fn relive_agent_thread_state() -> u64 {
    current_state()
}
