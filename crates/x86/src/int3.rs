//! The stop-free entry write of PAUSE-FREE.md §2 (the kernel's text_poke_bp in user space): int3, sync,
//! tail, sync, head, sync. The agent's SIGTRAP handler sends a thread that hits the int3 to `handler_dest`
//! (it emulates the new instruction) and re-executes the site if the int3 is already gone.

use crate::{EncodeError, EntryWrite};

/// The breakpoint byte.
pub const INT3: u8 = 0xcc;

/// One step of the protocol, done in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Int3Step {
    /// `pwrite(/proc/PID/mem, bytes, addr)` (or the agent's write to `/proc/self/mem`).
    Write { addr: u64, bytes: Vec<u8> },
    /// Ask the agent for `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` and wait for its answer.
    SyncCores,
}

/// The whole protocol for one entry write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Int3Plan {
    pub site: u64,
    /// Where the SIGTRAP handler sends a thread that traps on the site's int3. Put it in the agent's site
    /// table *before* the first step.
    pub handler_dest: u64,
    /// The bytes the site holds when the protocol starts; read back and compare before step 1.
    pub expect: Vec<u8>,
    pub steps: Vec<Int3Step>,
}

/// Turns a stop-free [`EntryWrite`] into the int3 protocol. `handler_dest` is what executing the new bytes
/// would do: the new jump's target when installing or retargeting a jump, the old-path copy (or `resume` for
/// a pad) when restoring the original bytes. Refuses writes that are not stop-free (several instructions
/// under the written bytes: PAUSE-FREE.md §4 shows a thread resumed at an interior boundary crashes), a site
/// that already holds an int3 (a debugger or uprobe), and writes shorter than 2 bytes.
pub fn int3_protocol(write: &EntryWrite, handler_dest: u64) -> Result<Int3Plan, EncodeError> {
    let inv = |reason: &str| EncodeError::Invalid {
        what: "int3 protocol".into(),
        at: write.addr,
        reason: reason.into(),
    };
    if !write.stop_free {
        return Err(inv(
            "the bytes replaced hold several instructions; stop every thread and check their PCs instead (DESIGN.md §4.3)",
        ));
    }
    if write.bytes.len() < 2 || write.bytes.len() != write.expect.len() {
        return Err(inv("the write must replace at least 2 bytes with as many"));
    }
    if write.expect[0] == INT3 || write.bytes[0] == INT3 {
        return Err(inv(
            "the site holds an int3 already: a debugger, a uprobe or another tool owns it",
        ));
    }
    Ok(Int3Plan {
        site: write.addr,
        handler_dest,
        expect: write.expect.clone(),
        steps: vec![
            Int3Step::Write {
                addr: write.addr,
                bytes: vec![INT3],
            },
            Int3Step::SyncCores,
            Int3Step::Write {
                addr: write.addr + 1,
                bytes: write.bytes[1..].to_vec(),
            },
            Int3Step::SyncCores,
            Int3Step::Write {
                addr: write.addr,
                bytes: vec![write.bytes[0]],
            },
            Int3Step::SyncCores,
        ],
    })
}

/// The site's contents after applying `steps[..upto]` to `expect` (for read-back checks between steps, and
/// to recognise where a killed controller left the protocol).
pub fn int3_state_after(plan: &Int3Plan, upto: usize) -> Vec<u8> {
    let mut cur = plan.expect.clone();
    for s in &plan.steps[..upto.min(plan.steps.len())] {
        if let Int3Step::Write { addr, bytes } = s {
            let off = (addr - plan.site) as usize;
            cur[off..off + bytes.len()].copy_from_slice(bytes);
        }
    }
    cur
}

/// Merges several sites' protocols into one round with 3 syncs for all of them, as the kernel batches
/// text_poke_bp (PAUSE-FREE.md §2): every int3, sync, every tail, sync, every head, sync. Every site's
/// `handler_dest` must be in the agent's table before the first step.
pub fn int3_batch(plans: &[Int3Plan]) -> Vec<Int3Step> {
    let mut out = Vec::new();
    for phase in [0usize, 2, 4] {
        for p in plans {
            out.push(p.steps[phase].clone());
        }
        out.push(Int3Step::SyncCores);
    }
    out
}

/// What executing `bytes` at `addr` does, when they are exactly one jump or one NOP: where the thread goes
/// next. The agent's SIGTRAP handler sends a thread that traps on the site's int3 there (PAUSE-FREE.md §2:
/// "emulate the new instruction"). `None` for anything else (the caller then uses a relocated copy of the
/// instruction, such as the old path of an entry, or stops every thread instead).
pub fn int3_emulation(addr: u64, bytes: &[u8]) -> Option<u64> {
    use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Mnemonic};
    // The jumps relive writes, read without iced-x86's decoder tables (about 1 ms to build per process):
    // `jmp rel32`, `jmp rel8`.
    match bytes {
        [0xe9, d @ ..] if d.len() == 4 => {
            let rel = i32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            return Some((addr + 5).wrapping_add(rel as i64 as u64));
        }
        [0xeb, d] => return Some((addr + 2).wrapping_add(*d as i8 as i64 as u64)),
        _ => {}
    }
    let mut dec = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE);
    let ins = dec.decode();
    if ins.is_invalid() || ins.len() != bytes.len() {
        return None;
    }
    match ins.code() {
        Code::Jmp_rel8_64 | Code::Jmp_rel32_64 => Some(ins.near_branch_target()),
        _ if ins.mnemonic() == Mnemonic::Nop && ins.flow_control() == FlowControl::Next => {
            Some(addr + bytes.len() as u64)
        }
        _ => None,
    }
}

#[cfg(test)]
mod emulation_tests {
    use super::int3_emulation;

    #[test]
    fn a_jump_goes_to_its_target_a_nop_falls_through_and_anything_else_is_unknown() {
        let at = 0x40_1000u64;
        let jmp = crate::encode_jmp_rel32(at, 0x40_3000).unwrap();
        assert_eq!(int3_emulation(at, &jmp), Some(0x40_3000));
        assert_eq!(int3_emulation(at, &[0xeb, 0x10]), Some(at + 0x12));
        // Backwards, both widths (read without the decoder).
        assert_eq!(int3_emulation(at, &[0xeb, 0xf0]), Some(at + 2 - 0x10));
        let back = crate::encode_jmp_rel32(at, at - 0x2000).unwrap();
        assert_eq!(int3_emulation(at, &back), Some(at - 0x2000));
        assert_eq!(int3_emulation(at, &[0x0f, 0x1f, 0x44, 0x00, 0x00]), Some(at + 5));
        assert_eq!(int3_emulation(at, &[0x66, 0x90]), Some(at + 2));
        // lea rax,[rdi+rdi+1]: must run from a relocated copy.
        assert_eq!(int3_emulation(at, &[0x48, 0x8d, 0x44, 0x3f, 0x01]), None);
        // Two instructions (mov; add) are not one site.
        assert_eq!(int3_emulation(at, &[0x48, 0x89, 0xf8, 0x48, 0x01, 0xf8]), None);
        // A truncated jump.
        assert_eq!(int3_emulation(at, &jmp[..4]), None);
    }
}

/// Whether single-stepping the instruction that starts `bytes` returns at once: false for anything that
/// enters the kernel and may block there (`syscall`, `sysenter`, `int n`), halts, or does not decode. The
/// transition driver steps a thread a few instructions out of a patched function's innermost frame only
/// over instructions for which this holds.
pub fn single_step_safe(bytes: &[u8]) -> bool {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    let ins = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE).decode();
    !ins.is_invalid()
        && !matches!(
            ins.mnemonic(),
            Mnemonic::Syscall
                | Mnemonic::Sysenter
                | Mnemonic::Int
                | Mnemonic::Int1
                | Mnemonic::Int3
                | Mnemonic::Into
                | Mnemonic::Hlt
                | Mnemonic::Ud0
                | Mnemonic::Ud1
                | Mnemonic::Ud2
        )
}

#[cfg(test)]
mod step_tests {
    use super::single_step_safe;

    #[test]
    fn system_calls_traps_and_garbage_are_not_stepped() {
        assert!(single_step_safe(&[0x48, 0x8d, 0x44, 0x3f, 0x01])); // lea
        assert!(single_step_safe(&[0xc3])); // ret
        assert!(single_step_safe(&[0xe8, 0, 0, 0, 0])); // call
        assert!(!single_step_safe(&[0x0f, 0x05])); // syscall
        assert!(!single_step_safe(&[0xcd, 0x80])); // int 0x80
        assert!(!single_step_safe(&[0xcc])); // int3
        assert!(!single_step_safe(&[0x0f, 0x0b])); // ud2
        assert!(!single_step_safe(&[0xf4])); // hlt
        assert!(!single_step_safe(&[0x0f])); // truncated
    }
}
