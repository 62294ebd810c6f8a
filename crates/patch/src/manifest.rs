//! Declaring a patch in Rust: one macro, [`crate::patch!`], writes the whole manifest (DESIGN §4.9,
//! format in `relive_elf::manifest`) into the `.relive_manifest` section at compile time, as a
//! `#[used]` static built with `concat!` of literals. Nothing runs at load time.
//!
//! ```no_run
//! use relive_patch::{ImportSlot, patch};
//!
//! #[unsafe(no_mangle)]
//! pub extern "C" fn greet_v2(n: i32) -> i32 { n + 1000 }
//! #[unsafe(no_mangle)]
//! pub extern "C" fn hello_pre_patch() -> i32 { 0 }
//! // The controller writes the address of the target's `counter` here before enabling.
//! #[unsafe(no_mangle)]
//! pub static COUNTER: ImportSlot = ImportSlot::new();
//!
//! patch! {
//!     name: "rust-hello",
//!     replace: false,
//!     stacking: false,
//!     objects: [{
//!         object: "exe",
//!         build_id: "",
//!         funcs: [{ old: "greet", sympos: 0, new: greet_v2 }],
//!         callbacks: { pre_patch: hello_pre_patch },
//!     }],
//!     states: [{ id: 1, version: 1 }],
//!     imports: [{ object: "exe", name: "counter", sympos: 0, slot: COUNTER }],
//! }
//! ```
//!
//! Rules: new functions, callbacks and slots must be exported (`#[unsafe(no_mangle)]`, `extern "C"`);
//! callbacks are `extern "C" fn() -> i32` (SPEC CB1: pre_patch's non-zero return refuses the patch);
//! a patch must not use initial-exec TLS (DESIGN §4.2: the agent owns the static TLS reserve).

use core::sync::atomic::{AtomicUsize, Ordering};

/// The manifest format version the macro writes.
pub const FORMAT_VERSION: u32 = 1;

/// Copies `s` into a NUL-terminated byte array (a manifest record). `N` must be `s.len() + 1`.
pub const fn nul_terminated<const N: usize>(s: &str) -> [u8; N] {
    let b = s.as_bytes();
    assert!(b.len() + 1 == N, "manifest record length mismatch");
    let mut out = [0u8; N];
    let mut i = 0;
    while i < b.len() {
        assert!(b[i] != 0, "a manifest value contains a NUL byte");
        out[i] = b[i];
        i += 1;
    }
    out
}

/// An import slot: an exported, writable word that receives the address of a non-exported target
/// symbol before the patch is enabled (DESIGN §4.9, the analogue of klp relocations).
#[repr(transparent)]
#[derive(Debug)]
pub struct ImportSlot(AtomicUsize);

impl ImportSlot {
    /// An empty slot (address 0 until relive fills it).
    pub const fn new() -> Self {
        ImportSlot(AtomicUsize::new(0))
    }

    /// The imported address, or 0 if not filled in yet.
    pub fn addr(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// Whether relive has filled the slot.
    pub fn is_set(&self) -> bool {
        self.addr() != 0
    }
}

impl Default for ImportSlot {
    fn default() -> Self {
        Self::new()
    }
}

/// Declares a patch: its name, flags, objects with their functions and callbacks, states and
/// imports. See the [module documentation](crate::manifest) for an example. Every list must be
/// present (it may be empty); fields come in the order shown.
#[macro_export]
macro_rules! patch {
    (
        name: $name:literal,
        replace: $replace:literal,
        stacking: $stacking:literal,
        objects: [ $( {
            object: $obj:literal,
            build_id: $bid:literal,
            funcs: [ $( { old: $old:literal, sympos: $sympos:literal, new: $new:ident } ),* $(,)? ],
            callbacks: { $( $cbk:ident : $cbf:ident ),* $(,)? } $(,)?
        } ),* $(,)? ],
        states: [ $( { id: $sid:literal, version: $sver:literal } ),* $(,)? ],
        imports: [ $( { object: $iobj:literal, name: $iname:literal, sympos: $ipos:literal, slot: $islot:ident } ),* $(,)? ] $(,)?
    ) => {
        const _: () = {
            const TEXT: &str = concat!(
                "relive-manifest/1\n",
                "patch name=", $name, " replace=", $replace, " stacking=", $stacking, "\n",
                $(
                    "object name=", $obj, " build_id=", $bid, "\n",
                    $( "func object=", $obj, " old=", $old, " sympos=", $sympos, " new=", stringify!($new), "\n", )*
                    $( "callback object=", $obj, " kind=", stringify!($cbk), " fn=", stringify!($cbf), "\n", )*
                )*
                $( "state id=", $sid, " version=", $sver, "\n", )*
                $( "import object=", $iobj, " name=", $iname, " sympos=", $ipos, " slot=", stringify!($islot), "\n", )*
            );
            #[used]
            #[unsafe(link_section = ".relive_manifest")]
            static MANIFEST: [u8; TEXT.len() + 1] = $crate::manifest::nul_terminated(TEXT);
            // Name checks: every new function, callback and slot must exist.
            #[allow(dead_code)]
            fn check_names() {
                $( $( let _ = $new; )* $( let _ = $cbf; )* )*
                $( let _ = &$islot; )*
            }
        };
    };
}
