//! Typed errors. Every message names the function and the address involved and says what to do next.

use thiserror::Error;

/// Why a function's entry cannot be patched (DESIGN.md §4.3). Nothing has been written when one of these
/// is returned: the driver refuses the patch and leaves the target as it was.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EntryError {
    /// The function has fewer bytes after its `endbr64` than the jump needs.
    #[error(
        "function {function} at {addr:#x} is too short to patch: {available} byte(s) after the entry, a jump needs \
         {needed}; patch its callers instead, or rebuild it with -fpatchable-function-entry=5"
    )]
    TooShort {
        function: String,
        addr: u64,
        available: u64,
        needed: u64,
    },

    /// Some branch (or jump-table entry, or code address taken) lands strictly inside the bytes that the
    /// entry jump overwrites, where it would execute the middle of the new jump.
    #[error(
        "function {function} at {addr:#x}: {source_desc} at {from:#x} targets {target:#x}, inside the bytes \
         [{site:#x}, {end:#x}) that the entry jump would overwrite; patch its callers instead, or rebuild it with \
         -fpatchable-function-entry=5"
    )]
    BranchTargetInside {
        function: String,
        addr: u64,
        site: u64,
        end: u64,
        from: u64,
        target: u64,
        /// "jmp", "jcc", "call", "jump-table entry", "rip-relative lea", "immediate", …
        source_desc: String,
    },

    /// The bytes of the function do not decode as x86-64 instructions.
    #[error(
        "function {function} at {addr:#x}: bytes at {at:#x} do not decode as x86-64 code; check that the symbol's \
         address and size are right (symbol table, load bias) and that the object matches its build-id"
    )]
    Undecodable { function: String, addr: u64, at: u64 },

    /// A displaced instruction cannot be moved into a stub.
    #[error(
        "function {function} at {addr:#x}: displaced instruction `{instruction}` at {at:#x} cannot be relocated: \
         {reason}; patch its callers instead, or rebuild it with -fpatchable-function-entry=5"
    )]
    Unrelocatable {
        function: String,
        addr: u64,
        at: u64,
        instruction: String,
        reason: String,
    },

    /// The entry already holds a breakpoint (a debugger, a uprobe, or another tool's patch).
    #[error(
        "function {function} at {addr:#x}: the entry byte at {at:#x} is an int3 (0xCC): a debugger, a uprobe or \
         another live-patching tool owns this entry; detach it and retry"
    )]
    Breakpoint { function: String, addr: u64, at: u64 },
}

/// Why a piece of code could not be encoded at the requested address.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// A 32-bit displacement cannot reach the target.
    #[error(
        "{what} at {from:#x} cannot reach {to:#x} with a 32-bit displacement; place the stub within ±2 GiB of both \
         (EntryPlan::stub_window) or go through a near stub with an absolute jump (encode_abs_jump)"
    )]
    OutOfRange { what: String, from: u64, to: u64 },

    /// iced-x86 refused to encode the block (for example a RIP-relative operand out of ±2 GiB of `at`).
    #[error(
        "cannot encode {what} at {at:#x}: {reason}; place it within ±2 GiB of its data (EntryPlan::stub_window)"
    )]
    Encoder { what: String, at: u64, reason: String },

    /// The request itself is inconsistent (the message says which part).
    #[error("invalid request for {what} at {at:#x}: {reason}")]
    Invalid { what: String, at: u64, reason: String },
}

/// Why the register-clobber analysis (DESIGN.md §4.3a) failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClobberError {
    /// A function on the way (the root or a direct callee) does not decode.
    #[error(
        "register analysis of {root}: function {function} at {addr:#x} does not decode at {at:#x}; check its symbol \
         range, or refuse to patch {root} (callers compiled with -fipa-ra may rely on registers it preserves)"
    )]
    Undecodable {
        root: String,
        function: String,
        addr: u64,
        at: u64,
    },
}
