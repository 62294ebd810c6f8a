//! Address newtypes (DESIGN §2): an AVMA is an address in the target process, an SVMA an address as
//! stated in the ELF file. They differ by the module's load bias; never mix them.

use serde::Serialize;
use std::fmt;

/// An address in the target process ("actual virtual memory address").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Avma(pub u64);

/// An address as stated in an ELF file ("stated virtual memory address").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Svma(pub u64);

impl Svma {
    /// The process address of this file address, for a module loaded with `bias`.
    pub fn to_avma(self, bias: u64) -> Avma {
        Avma(self.0.wrapping_add(bias))
    }
}

impl Avma {
    /// The file address of this process address, for a module loaded with `bias`.
    pub fn to_svma(self, bias: u64) -> Svma {
        Svma(self.0.wrapping_sub(bias))
    }
}

impl fmt::Display for Avma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for Svma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
