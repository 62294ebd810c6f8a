//! The registry object in agent memory (DESIGN §4.8; layout in `relive_abi::registry`).
//!
//! Exported as `relive_registry`. Only the agent writes it (its constructor, its service thread, its
//! fork-child handler; never two at once), always inside the seqlock: generation made odd, bytes
//! written, generation made even. Controllers read it with `process_vm_readv` and retry on change.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering, fence};
use relive_abi::registry::{self as layout, Header, TOTAL_SIZE};

/// The registry's memory: header plus body, 64-byte aligned.
#[repr(C, align(64))]
pub struct RegistryMem {
    bytes: UnsafeCell<[u8; TOTAL_SIZE]>,
}

// SAFETY: the bytes are written by one agent thread at a time (see the module documentation) and
// read by other processes through the seqlock; in-process readers go through `snapshot`.
unsafe impl Sync for RegistryMem {}

/// The registry, found by controllers through this exported symbol.
#[allow(non_upper_case_globals)]
#[unsafe(no_mangle)]
pub static relive_registry: RegistryMem = RegistryMem {
    bytes: UnsafeCell::new([0; TOTAL_SIZE]),
};

fn base() -> *mut u8 {
    relive_registry.bytes.get() as *mut u8
}

fn generation() -> &'static AtomicU64 {
    // SAFETY: offset 16 is 8-byte aligned inside a 64-byte aligned static that lives forever; the
    // word is only ever accessed atomically in this process.
    unsafe { &*(base().add(layout::off::GENERATION) as *const AtomicU64) }
}

/// Runs `f` on the registry bytes inside the seqlock's write side. Callers are the single writer.
pub fn write<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    let g = generation().load(Ordering::Relaxed);
    let odd = if g.is_multiple_of(2) { g + 1 } else { g + 2 };
    generation().store(odd, Ordering::Relaxed);
    fence(Ordering::Release);
    // SAFETY: only one agent thread writes at a time; the generation word is excluded from the
    // slice handed out by re-storing it below, after `f` returns.
    let r = unsafe {
        let bytes = core::slice::from_raw_parts_mut(base(), TOTAL_SIZE);
        f(bytes)
    };
    fence(Ordering::Release);
    generation().store(odd + 1, Ordering::Release);
    r
}

/// The current header (the agent is the only writer, so no retry is needed in-process).
pub fn header() -> Option<Header> {
    // SAFETY: reads the static's bytes; writers are on this process's agent threads only, which
    // never run concurrently with this call in a way that matters to its callers (the service thread).
    let bytes = unsafe { core::slice::from_raw_parts(base() as *const u8, layout::HEADER_SIZE) };
    layout::decode_header(bytes).ok()
}

/// Writes the whole header, keeping the current generation (it is bumped by `write`).
pub fn set_header(h: &Header) {
    write(|b| {
        let gen_bytes: [u8; 8] = b[layout::off::GENERATION..layout::off::GENERATION + 8]
            .try_into()
            .expect("8");
        layout::encode_header(h, b);
        b[layout::off::GENERATION..layout::off::GENERATION + 8].copy_from_slice(&gen_bytes);
    })
}

/// Replaces the body (write-ahead record of the controller's model state).
pub fn set_body(version: u32, body: &[u8]) -> Result<(), String> {
    if body.len() > layout::BODY_CAPACITY {
        return Err(format!(
            "body of {} bytes exceeds the registry capacity {}",
            body.len(),
            layout::BODY_CAPACITY
        ));
    }
    let mut h = header().ok_or("registry header is not initialised")?;
    h.body_len = body.len() as u32;
    h.body_version = version;
    write(|b| {
        let gen_bytes: [u8; 8] = b[layout::off::GENERATION..layout::off::GENERATION + 8]
            .try_into()
            .expect("8");
        layout::encode_header(&h, b);
        b[layout::off::GENERATION..layout::off::GENERATION + 8].copy_from_slice(&gen_bytes);
        b[layout::HEADER_SIZE..layout::HEADER_SIZE + body.len()].copy_from_slice(body);
    });
    Ok(())
}
