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
    write(|b| put_header(h, b))
}

/// Encodes `h` into the registry's header bytes without ever storing to the generation word.
///
/// `encode_header` starts by zeroing its output; done in place, that zeroed the (odd) generation
/// for a moment, and a controller reading then saw an even generation over a half-written header
/// ("registry header size 0 differs from 128"; the README quick-start test caught it in CI).
fn put_header(h: &Header, b: &mut [u8]) {
    let mut enc = [0u8; layout::HEADER_SIZE];
    layout::encode_header(h, &mut enc);
    let g = layout::off::GENERATION;
    b[..g].copy_from_slice(&enc[..g]);
    b[g + 8..layout::HEADER_SIZE].copy_from_slice(&enc[g + 8..]);
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
        put_header(&h, b);
        b[layout::HEADER_SIZE..layout::HEADER_SIZE + body.len()].copy_from_slice(body);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn sample(pid: u32) -> Header {
        Header {
            layout_version: layout::LAYOUT_VERSION,
            generation: 0,
            agent_pid: pid,
            agent_version: 1,
            tpoff: -8,
            tls_image_addr: 0x1000,
            req_fd: 3,
            resp_fd: 4,
            lock_owner: 0,
            service_tid: pid + 1,
            body_len: 0,
            body_capacity: layout::BODY_CAPACITY as u32,
            body_version: 0,
            flags: 0,
            lock_since_ns: 0,
        }
    }

    /// A reader that follows the controller's protocol (generation even and unchanged across the
    /// copy) never decodes a half-written header while the agent rewrites it. The header write
    /// once zeroed the generation word in place, which let such a reader see an even generation
    /// over a header without its size (a CI failure of the README quick start).
    #[test]
    fn seqlock_reader_never_sees_a_half_written_header() {
        set_header(&sample(1));
        let stop = AtomicBool::new(false);
        let (seen, torn) = std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..200_000u32 {
                    set_header(&sample(i + 1));
                }
                stop.store(true, Ordering::Release);
            });
            let mut seen = 0u64;
            let mut torn = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let g1 = generation().load(Ordering::Acquire);
                if g1 % 2 == 1 {
                    continue;
                }
                let mut copy = [0u8; layout::HEADER_SIZE];
                for (k, c) in copy.iter_mut().enumerate() {
                    // SAFETY: reads inside the live static, as a controller's process_vm_readv
                    // does; a racing write only makes the copy torn, which the check below rejects.
                    *c = unsafe { core::ptr::read_volatile(base().add(k)) };
                }
                fence(Ordering::Acquire);
                if generation().load(Ordering::Acquire) != g1 {
                    continue;
                }
                seen += 1;
                if let Err(e) = layout::decode_header(&copy) {
                    torn.push(e.to_string());
                }
            }
            (seen, torn)
        });
        assert!(seen > 0, "the reader never got a consistent copy");
        assert!(
            torn.is_empty(),
            "{} of {seen} consistent copies were half-written: {:?}",
            torn.len(),
            &torn[..torn.len().min(3)]
        );
    }

    #[test]
    fn put_header_round_trips_and_leaves_generation_and_body_alone() {
        let mut b = vec![0xAAu8; layout::HEADER_SIZE + 16];
        let g = layout::off::GENERATION;
        b[g..g + 8].copy_from_slice(&7u64.to_le_bytes());
        put_header(&sample(42), &mut b);
        let back = layout::decode_header(&b).expect("decodes");
        assert_eq!((back.generation, back.agent_pid, back.service_tid), (7, 42, 43));
        assert!(
            b[layout::HEADER_SIZE..].iter().all(|&x| x == 0xAA),
            "body untouched"
        );
    }
}
