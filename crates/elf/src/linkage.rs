//! What a shared object gives to and takes from the dynamic linker: the names its `.dynsym` exports, the
//! names it needs from others (undefined, not weak), and its `DT_NEEDED` libraries. `relive check` uses
//! it to tell, before `apply`'s `dlopen` in the target would, that a patch cannot link.

use object::Endianness;
use object::elf;
use object::read::elf::{ElfFile64, Sym};
use std::collections::HashSet;

/// The dynamic linkage of one ELF file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DynamicLinkage {
    /// Defined global or weak symbols of `.dynsym` of default or protected visibility: what `dlsym` and the
    /// dynamic linker can find in this object.
    pub exported: HashSet<String>,
    /// Undefined, non-weak symbols of `.dynsym`: each must be exported by some loaded object, or `dlopen`
    /// fails with "undefined symbol".
    pub undefined: Vec<String>,
    /// `DT_NEEDED` entries: libraries the dynamic linker loads with this object.
    pub needed: Vec<String>,
}

/// Reads the dynamic linkage of `data` (an ELF file); `None` when it does not parse as 64-bit ELF.
pub fn dynamic_linkage(data: &[u8]) -> Option<DynamicLinkage> {
    let file = ElfFile64::<Endianness>::parse(data).ok()?;
    let endian = file.endian();
    let mut out = DynamicLinkage::default();
    let table = file.elf_dynamic_symbol_table();
    for sym in table.iter() {
        let Ok(name) = table.symbol_name(endian, sym) else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let bind = sym.st_bind();
        let undefined = sym.st_shndx(endian) == elf::SHN_UNDEF;
        if undefined {
            if bind == elf::STB_GLOBAL {
                out.undefined.push(name);
            }
        } else if matches!(bind, elf::STB_GLOBAL | elf::STB_WEAK | elf::STB_GNU_UNIQUE)
            && matches!(sym.st_visibility(), elf::STV_DEFAULT | elf::STV_PROTECTED)
        {
            out.exported.insert(name);
        }
    }
    out.needed = crate::image::dynamic_strings(&file, data, elf::DT_NEEDED);
    Some(out)
}

/// Removes from `names` every name `data`'s `.dynsym` exports (as [`DynamicLinkage::exported`] counts
/// them), without building the whole set: a lookup of the few symbols a patch needs in a large library.
pub fn remove_exported(data: &[u8], names: &mut Vec<String>) {
    if names.is_empty() {
        return;
    }
    let Ok(file) = ElfFile64::<Endianness>::parse(data) else {
        return;
    };
    let endian = file.endian();
    let table = file.elf_dynamic_symbol_table();
    for sym in table.iter() {
        if sym.st_shndx(endian) == elf::SHN_UNDEF
            || !matches!(
                sym.st_bind(),
                elf::STB_GLOBAL | elf::STB_WEAK | elf::STB_GNU_UNIQUE
            )
            || !matches!(sym.st_visibility(), elf::STV_DEFAULT | elf::STV_PROTECTED)
        {
            continue;
        }
        let Ok(name) = table.symbol_name(endian, sym) else {
            continue;
        };
        if let Some(i) = names.iter().position(|n| n.as_bytes() == name) {
            names.swap_remove(i);
            if names.is_empty() {
                return;
            }
        }
    }
}
