//! Identities: threads, code ranges, objects (D7, DESIGN §5), functions (D5/D6) and per-thread states (C1).

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

/// A thread of the target, by its kernel thread id (the kernel's "task").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tid(pub i32);

impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A half-open range `[start, end)` of code addresses in the target (AVMAs), as the controller resolved them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub const fn new(start: u64, end: u64) -> Self {
        Range { start, end }
    }

    /// Number of bytes covered.
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// C5a: is the *live* program counter of a thread inside this range (`start <= pc < end`)?
    pub const fn contains_pc(&self, pc: u64) -> bool {
        self.start <= pc && pc < self.end
    }

    /// C5a for a *return address*: the frame that will return to `ra` executes the call instruction that ends
    /// at `ra`, i.e. the byte `ra - 1`. So a return address equal to `end` still belongs to this range (a call
    /// as the last instruction, e.g. to a noreturn function), and one equal to `start` belongs to the code
    /// before it.
    pub const fn contains_return_address(&self, ra: u64) -> bool {
        self.start < ra && ra <= self.end
    }

    /// Does this range share at least one byte with `other`?
    pub const fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// A module of the target: the main executable or a shared library (the kernel's vmlinux or module, D2).
///
/// Identity (D7, DESIGN §5) is decided by the first of these the object carries: build-id, then soname, then
/// path. The controller builds `ObjectId`s from the *resolved* module (filling every field it knows), so that
/// two patches naming the same module always agree on the deciding field.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ObjectId {
    /// GNU build-id, lower-case hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// `DT_SONAME` of a library (none for most executables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soname: Option<String>,
    /// Path of the mapped file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// The deciding field of an [`ObjectId`] (see its docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey<'a> {
    BuildId(&'a str),
    Soname(&'a str),
    Path(&'a str),
    Anonymous,
}

impl ObjectId {
    /// An object known by its build-id (hex; normalised to lower case).
    pub fn from_build_id(hex: &str) -> Self {
        ObjectId {
            build_id: Some(hex.to_ascii_lowercase()),
            ..Default::default()
        }
    }

    /// An object known by its soname only.
    pub fn from_soname(soname: &str) -> Self {
        ObjectId {
            soname: Some(soname.to_owned()),
            ..Default::default()
        }
    }

    /// An object known by its path only.
    pub fn from_path(path: &str) -> Self {
        ObjectId {
            path: Some(path.to_owned()),
            ..Default::default()
        }
    }

    pub fn with_soname(mut self, soname: &str) -> Self {
        self.soname = Some(soname.to_owned());
        self
    }

    pub fn with_path(mut self, path: &str) -> Self {
        self.path = Some(path.to_owned());
        self
    }

    /// The field that decides identity: build-id first, then soname, then path (DESIGN §5).
    pub fn key(&self) -> ObjectKey<'_> {
        if let Some(b) = &self.build_id {
            ObjectKey::BuildId(b)
        } else if let Some(s) = &self.soname {
            ObjectKey::Soname(s)
        } else if let Some(p) = &self.path {
            ObjectKey::Path(p)
        } else {
            ObjectKey::Anonymous
        }
    }

    /// A human name for logs, the analogue of the kernel's "vmlinux" or module name: the soname, else the
    /// path, else `build-id:<hex>`.
    pub fn name(&self) -> String {
        if let Some(s) = &self.soname {
            s.clone()
        } else if let Some(p) = &self.path {
            p.clone()
        } else if let Some(b) = &self.build_id {
            format!("build-id:{b}")
        } else {
            "<anonymous object>".to_owned()
        }
    }
}

impl PartialEq for ObjectId {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for ObjectId {}
impl Hash for ObjectId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state)
    }
}
impl PartialOrd for ObjectId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ObjectId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// D6 + D7: the identity of a patched function across patches: (object identity, old name, sympos), with
/// sympos 0 and 1 treated as the same function (\[6.19\], \[relive\] D6).
///
/// sympos 0 is only legal when the name is unique in the object (D5; the controller's symbol resolution
/// refuses an ambiguous 0), and then it names the same symbol as 1, so the normalisation is unconditional.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FuncId {
    pub object: ObjectId,
    pub name: String,
    sympos: u32,
}

impl FuncId {
    pub fn new(object: ObjectId, name: &str, sympos: u32) -> Self {
        FuncId {
            object,
            name: name.to_owned(),
            sympos: normalise_sympos(sympos),
        }
    }

    /// The normalised sympos (always ≥ 1).
    pub fn sympos(&self) -> u32 {
        normalise_sympos(self.sympos)
    }
}

/// D6 \[relive\]: sympos 0 ("the unique one") and 1 ("the first one") name the same symbol.
pub const fn normalise_sympos(sympos: u32) -> u32 {
    if sympos == 0 { 1 } else { sympos }
}

impl PartialEq for FuncId {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for FuncId {}
impl Hash for FuncId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.object.hash(state);
        self.name.hash(state);
        self.sympos().hash(state);
    }
}
impl PartialOrd for FuncId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for FuncId {
    /// Name first: it tells functions apart fastest (objects usually share a long build-id).
    fn cmp(&self, other: &Self) -> Ordering {
        self.name
            .cmp(&other.name)
            .then_with(|| self.sympos().cmp(&other.sympos()))
            .then_with(|| self.object.cmp(&other.object))
    }
}

impl fmt::Display for FuncId {
    /// The kernel's sysfs spelling `<object>/<name>,<sympos>` (S1, D6).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{},{}", self.object, self.name, self.sympos())
    }
}

/// C1: a thread's patch state. The numeric values are the kernel's (S2) and what the agent's TLS slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchState {
    /// -1: no transition is running (KLP_TRANSITION_IDLE).
    Idle,
    /// 0: the thread runs the world without the transition patch (KLP_TRANSITION_UNPATCHED).
    Unpatched,
    /// 1: the thread runs the world with the transition patch (KLP_TRANSITION_PATCHED).
    Patched,
}

impl PatchState {
    /// The value in the TLS slot and in `/proc/<pid>/patch_state` (S2).
    pub const fn as_raw(self) -> i32 {
        match self {
            PatchState::Idle => -1,
            PatchState::Unpatched => 0,
            PatchState::Patched => 1,
        }
    }

    pub const fn from_raw(raw: i32) -> Option<Self> {
        match raw {
            -1 => Some(PatchState::Idle),
            0 => Some(PatchState::Unpatched),
            1 => Some(PatchState::Patched),
            _ => None,
        }
    }

    /// The opposite transition target (C2, L6). Idle stays Idle.
    pub const fn opposite(self) -> Self {
        match self {
            PatchState::Idle => PatchState::Idle,
            PatchState::Unpatched => PatchState::Patched,
            PatchState::Patched => PatchState::Unpatched,
        }
    }

    /// "patching" / "unpatching", as the kernel's log lines spell a transition with this target.
    pub const fn transition_word(self) -> &'static str {
        match self {
            PatchState::Patched => "patching",
            PatchState::Unpatched => "unpatching",
            PatchState::Idle => "idle",
        }
    }
}

impl fmt::Display for PatchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PatchState::Idle => "idle",
            PatchState::Unpatched => "unpatched",
            PatchState::Patched => "patched",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn d6_sympos_zero_and_one_are_the_same_function() {
        let o = ObjectId::from_build_id("ABCD");
        assert_eq!(FuncId::new(o.clone(), "f", 0), FuncId::new(o.clone(), "f", 1));
        assert_ne!(FuncId::new(o.clone(), "f", 1), FuncId::new(o, "f", 2));
    }

    #[test]
    fn design5_object_identity_prefers_build_id() {
        let a = ObjectId::from_build_id("abcd")
            .with_soname("libx.so.1")
            .with_path("/a/libx.so.1");
        let b = ObjectId::from_build_id("ABCD").with_path("/b/libx.so.1");
        assert_eq!(a, b, "same build-id, different path: same object");
        let c = ObjectId::from_soname("libx.so.1").with_path("/a");
        let d = ObjectId::from_soname("libx.so.1").with_path("/b");
        assert_eq!(c, d, "no build-id: soname decides");
        assert_ne!(ObjectId::from_path("/a"), ObjectId::from_path("/b"));
    }

    #[test]
    fn c5a_return_addresses_use_the_byte_before() {
        let r = Range::new(0x1000, 0x1010);
        assert!(r.contains_pc(0x1000) && !r.contains_pc(0x1010));
        assert!(!r.contains_return_address(0x1000) && r.contains_return_address(0x1010));
    }
}
