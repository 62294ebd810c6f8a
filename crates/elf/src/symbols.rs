//! Symbols from `.symtab`, `.dynsym` and a debug file, with sizes and versions, lookup by address,
//! and SPEC D5 `sympos` resolution.

use crate::addr::Svma;
use object::elf;
use object::read::elf::{ElfFile64, Sym};
use object::{Endianness, SymbolIndex};
use serde::Serialize;
use std::collections::HashSet;

/// Where a symbol was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SymSource {
    Symtab,
    Dynsym,
    /// The `.symtab` of a separate debug file (found by build-id).
    DebugFile,
}

/// Function or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SymKind {
    Func,
    /// `STT_GNU_IFUNC`: the symbol's address is the resolver.
    Ifunc,
    Object,
    /// `STT_TLS`: the value is an offset in the thread-local block, not an address.
    Tls,
}

impl SymKind {
    /// Code: what SPEC D5 resolves for a function to patch.
    pub fn is_function(self) -> bool {
        matches!(self, SymKind::Func | SymKind::Ifunc)
    }
}

/// One defined symbol of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Symbol {
    /// The raw (mangled) name.
    pub name: String,
    pub addr: Svma,
    pub size: u64,
    /// Symbol version from `.gnu.version` (e.g. `GLIBC_2.34`), `.dynsym` only.
    pub version: Option<String>,
    /// `true` when the version is the default one (`@@`).
    pub default_version: bool,
    pub global: bool,
    pub kind: SymKind,
    pub source: SymSource,
}

/// Why a `(object, name, sympos)` triple did not resolve (SPEC D5).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error(
        "{what} {name} not found in {object} (no .symtab, .dynsym or debug-file symbol has that name){}; check the spelling; a static {what} of a stripped object needs its debug file, installed by build-id under /usr/lib/debug/.build-id/ (the distribution's debug package); a static function the compiler inlined into all its callers has no symbol left (build the target with noinline on it)",
        did_you_mean(similar)
    )]
    NotFound {
        object: String,
        name: String,
        /// "function" (a function to patch) or "symbol" (an import: a function or a variable).
        what: &'static str,
        /// Names of that kind in the object that are close to `name` (a typo), best first.
        similar: Vec<String>,
    },
    #[error("{what} {name} is ambiguous in {object}: {} candidates ({}); give sympos 1..={} to pick one (SPEC D5)",
        candidates.len(),
        candidates.iter().enumerate().map(|(i, c)| format!("sympos {}: {} size {}", i + 1, c.0, c.1)).collect::<Vec<_>>().join(", "),
        candidates.len())]
    Ambiguous {
        object: String,
        name: String,
        candidates: Vec<(Svma, u64)>,
        what: &'static str,
    },
    #[error(
        "{what} {name} has only {count} occurrence{} in {object}, sympos {sympos} does not exist (SPEC D5)",
        if *count == 1 { "" } else { "s" }
    )]
    NoSuchPos {
        object: String,
        name: String,
        sympos: u32,
        count: usize,
        what: &'static str,
    },
    #[error(
        "function {name} in {object} at {addr} has no size in the symbol table (SPEC D5: ENOENT); relive needs the size to patch it"
    )]
    NoSize {
        object: String,
        name: String,
        addr: Svma,
    },
}

fn did_you_mean(similar: &[String]) -> String {
    match similar {
        [] => String::new(),
        [one] => format!("; did you mean {one}?"),
        many => format!("; did you mean one of {}?", many.join(", ")),
    }
}

/// All function and object symbols of one object, in symbol-table order (`.symtab`, then `.dynsym`
/// entries not already seen, then the debug file's), plus an address index.
#[derive(Debug, Clone, Default)]
pub struct SymbolTable {
    pub symbols: Vec<Symbol>,
    /// Indices into `symbols` of functions with a non-zero address, sorted by address.
    by_addr: Vec<usize>,
}

fn read_table(
    data: &[u8],
    dynamic: bool,
    source: SymSource,
    out: &mut Vec<Symbol>,
    seen: &mut HashSet<(String, u64)>,
) {
    let Ok(file) = ElfFile64::<Endianness>::parse(data) else {
        return;
    };
    let endian = file.endian();
    let table = if dynamic {
        file.elf_dynamic_symbol_table()
    } else {
        file.elf_symbol_table()
    };
    let versions = if dynamic {
        file.elf_section_table().versions(endian, data).ok().flatten()
    } else {
        None
    };
    for (i, sym) in table.enumerate() {
        let st_type = sym.st_type();
        let kind = match st_type {
            elf::STT_FUNC => SymKind::Func,
            elf::STT_GNU_IFUNC => SymKind::Ifunc,
            elf::STT_OBJECT => SymKind::Object,
            elf::STT_TLS => SymKind::Tls,
            _ => continue,
        };
        if sym.st_shndx(endian) == elf::SHN_UNDEF {
            continue;
        }
        let Ok(name) = table.symbol_name(endian, sym) else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let addr = sym.st_value(endian);
        if !seen.insert((name.clone(), addr)) {
            continue;
        }
        let (version, default_version) = match &versions {
            Some(vt) => {
                let vi = vt.version_index(endian, SymbolIndex(i.0));
                match vt.version(vi.index()) {
                    Ok(Some(v)) => (
                        Some(String::from_utf8_lossy(v.name()).into_owned()),
                        !vi.is_hidden(),
                    ),
                    _ => (None, false),
                }
            }
            None => (None, false),
        };
        out.push(Symbol {
            name,
            addr: Svma(addr),
            size: sym.st_size(endian),
            version,
            default_version,
            global: sym.st_bind() != elf::STB_LOCAL,
            kind,
            source,
        });
    }
}

impl SymbolTable {
    /// Reads `.symtab` and `.dynsym` of `data`, and the `.symtab` of `debug` (a separate debug file
    /// with the same build-id), if given.
    pub fn from_elf(data: &[u8], debug: Option<&[u8]>) -> SymbolTable {
        let mut symbols = Vec::new();
        let mut seen = HashSet::new();
        read_table(data, false, SymSource::Symtab, &mut symbols, &mut seen);
        read_table(data, true, SymSource::Dynsym, &mut symbols, &mut seen);
        if let Some(d) = debug {
            read_table(d, false, SymSource::DebugFile, &mut symbols, &mut seen);
        }
        Self::from_symbols(symbols)
    }

    /// Builds the table from symbols in table order.
    pub fn from_symbols(symbols: Vec<Symbol>) -> SymbolTable {
        let mut by_addr: Vec<usize> = (0..symbols.len())
            .filter(|&i| symbols[i].kind.is_function() && symbols[i].addr.0 != 0)
            .collect();
        // Sort by address; among aliases at one address prefer the global, sized, shortest name.
        by_addr.sort_by_key(|&i| {
            let s = &symbols[i];
            (
                s.addr,
                !s.global,
                s.size == 0,
                s.name.starts_with('_'),
                s.name.len(),
            )
        });
        SymbolTable { symbols, by_addr }
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The function containing `addr`, and the offset into it. A symbol without a size covers the
    /// addresses up to the next symbol.
    pub fn lookup(&self, addr: Svma) -> Option<(&Symbol, u64)> {
        let pos = self.by_addr.partition_point(|&i| self.symbols[i].addr <= addr);
        if pos == 0 {
            return None;
        }
        // Walk back over symbols at lower addresses: the nearest one whose extent covers addr.
        let mut best: Option<&Symbol> = None;
        let mut k = pos;
        let first_addr = self.symbols[self.by_addr[pos - 1]].addr;
        while k > 0 {
            let s = &self.symbols[self.by_addr[k - 1]];
            if s.addr != first_addr {
                break;
            }
            best = Some(s);
            k -= 1;
        }
        let s = best?;
        let off = addr.0 - s.addr.0;
        if s.size != 0 && off >= s.size {
            return None;
        }
        if s.size == 0 {
            // An unsized symbol covers up to the next symbol only.
            if let Some(&n) = self.by_addr.get(pos)
                && self.symbols[n].addr <= addr
            {
                return None;
            }
        }
        Some((s, off))
    }

    /// Names of every function symbol at exactly `addr` (aliases such as `__GI___libc_read`,
    /// `__read`, `read`).
    pub fn names_at(&self, addr: Svma) -> Vec<&str> {
        let lo = self.by_addr.partition_point(|&i| self.symbols[i].addr < addr);
        self.by_addr[lo..]
            .iter()
            .map(|&i| &self.symbols[i])
            .take_while(|s| s.addr == addr)
            .map(|s| s.name.as_str())
            .collect()
    }

    /// Every function symbol named `name`, in table order (SPEC D5's occurrence order).
    pub fn functions_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Symbol> + 'a {
        self.symbols
            .iter()
            .filter(move |s| s.kind.is_function() && s.name == name)
    }

    /// SPEC D5: `sympos == 0` requires a unique name; `sympos == N` takes the N-th occurrence in
    /// table order. Aliases (same address) count once. A function without a size is refused.
    pub fn resolve(&self, object: &str, name: &str, sympos: u32) -> Result<&Symbol, ResolveError> {
        let sym = self.resolve_among(object, name, sympos, "function", SymKind::is_function)?;
        if sym.size == 0 {
            return Err(ResolveError::NoSize {
                object: object.into(),
                name: name.into(),
                addr: sym.addr,
            });
        }
        Ok(sym)
    }

    /// What a patch imports (`RELIVE_IMPORT`): a function or a variable, by the same SPEC D5 rules as
    /// [`SymbolTable::resolve`] over both kinds (occurrences counted in table order). Only the address is
    /// used, so a symbol without a size is fine; a thread-local variable (its value is an offset, not an
    /// address) is not found.
    pub fn resolve_import(&self, object: &str, name: &str, sympos: u32) -> Result<&Symbol, ResolveError> {
        self.resolve_among(object, name, sympos, "symbol", |k| {
            k.is_function() || k == SymKind::Object
        })
    }

    /// Up to three names of `kind` within a small edit distance of `name` (typos: a letter missing, extra,
    /// swapped or wrong; case), closest first. Computed only for an error.
    fn similar_names(&self, name: &str, kind: &impl Fn(SymKind) -> bool) -> Vec<String> {
        // Names of one or two letters are close to too many others to suggest anything.
        if name.chars().count() < 3 {
            return vec![];
        }
        let max = (name.chars().count() / 4).clamp(1, 3);
        let mut close: Vec<(usize, &str)> = self
            .symbols
            .iter()
            .filter(|s| kind(s.kind) && s.name != name)
            .filter_map(|s| {
                let d = strsim::damerau_levenshtein(&name.to_lowercase(), &s.name.to_lowercase());
                (d <= max).then_some((d, s.name.as_str()))
            })
            .collect();
        close.sort();
        close.dedup_by(|a, b| a.1 == b.1);
        close.into_iter().take(3).map(|(_, n)| n.to_string()).collect()
    }

    fn resolve_among(
        &self,
        object: &str,
        name: &str,
        sympos: u32,
        what: &'static str,
        kind: impl Fn(SymKind) -> bool,
    ) -> Result<&Symbol, ResolveError> {
        let mut cands: Vec<&Symbol> = Vec::new();
        for s in self.symbols.iter().filter(|s| kind(s.kind) && s.name == name) {
            if !cands.iter().any(|c| c.addr == s.addr) {
                cands.push(s);
            }
        }
        match (sympos, cands.len()) {
            (_, 0) => Err(ResolveError::NotFound {
                object: object.into(),
                name: name.into(),
                what,
                similar: self.similar_names(name, &kind),
            }),
            (0, 1) => Ok(cands[0]),
            (0, _) => Err(ResolveError::Ambiguous {
                object: object.into(),
                name: name.into(),
                candidates: cands.iter().map(|c| (c.addr, c.size)).collect(),
                what,
            }),
            (n, count) if n as usize > count => Err(ResolveError::NoSuchPos {
                object: object.into(),
                name: name.into(),
                sympos: n,
                count,
                what,
            }),
            (n, _) => Ok(cands[n as usize - 1]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(name: &str, addr: u64, size: u64, global: bool) -> Symbol {
        Symbol {
            name: name.into(),
            addr: Svma(addr),
            size,
            version: None,
            default_version: false,
            global,
            kind: SymKind::Func,
            source: SymSource::Symtab,
        }
    }

    fn table() -> SymbolTable {
        SymbolTable::from_symbols(vec![
            sym("helper", 0x1000, 0x20, false),
            sym("main", 0x1100, 0x40, true),
            sym("helper", 0x1200, 0x10, false),
            sym("unsized", 0x1300, 0, true),
            sym("after", 0x1380, 0x8, true),
            sym("alias_b", 0x1100, 0x40, false),
        ])
    }

    #[test]
    fn t_d5_sympos_rules() {
        let t = table();
        assert_eq!(t.resolve("x", "main", 0).unwrap().addr, Svma(0x1100));
        assert_eq!(t.resolve("x", "main", 1).unwrap().addr, Svma(0x1100));
        assert_eq!(t.resolve("x", "helper", 1).unwrap().addr, Svma(0x1000));
        assert_eq!(t.resolve("x", "helper", 2).unwrap().addr, Svma(0x1200));
        let e = t.resolve("x", "helper", 0).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("0x1000") && msg.contains("0x1200"), "{msg}");
        assert!(matches!(
            t.resolve("x", "helper", 3),
            Err(ResolveError::NoSuchPos { count: 2, .. })
        ));
        assert!(matches!(
            t.resolve("x", "nope", 0),
            Err(ResolveError::NotFound { .. })
        ));
        assert!(matches!(
            t.resolve("x", "unsized", 0),
            Err(ResolveError::NoSize { .. })
        ));
    }

    /// Imports (RELIVE_IMPORT) resolve variables as well as functions, with the same D5 occurrence rules,
    /// never a thread-local (its value is an offset) and without needing a size; functions to patch never
    /// resolve to a variable.
    #[test]
    fn t_d5_imports_resolve_variables_too() {
        let var = |name: &str, addr: u64, kind: SymKind| Symbol {
            kind,
            size: 0,
            ..sym(name, addr, 4, false)
        };
        let t = SymbolTable::from_symbols(vec![
            sym("f", 0x1000, 0x20, true),
            var("counter", 0x4000, SymKind::Object),
            var("tls_var", 0x10, SymKind::Tls),
            var("dup", 0x4010, SymKind::Object),
            sym("dup", 0x1100, 0x20, false),
        ]);
        assert_eq!(t.resolve_import("x", "counter", 0).unwrap().addr, Svma(0x4000));
        assert_eq!(t.resolve_import("x", "f", 0).unwrap().addr, Svma(0x1000));
        assert!(matches!(
            t.resolve_import("x", "tls_var", 0),
            Err(ResolveError::NotFound { what: "symbol", .. })
        ));
        // A variable and a function of one name: two occurrences, in table order.
        assert!(matches!(
            t.resolve_import("x", "dup", 0),
            Err(ResolveError::Ambiguous { .. })
        ));
        assert_eq!(t.resolve_import("x", "dup", 1).unwrap().addr, Svma(0x4010));
        // Functions to patch: variables are not candidates.
        assert!(matches!(
            t.resolve("x", "counter", 0),
            Err(ResolveError::NotFound { what: "function", .. })
        ));
        assert_eq!(t.resolve("x", "dup", 0).unwrap().addr, Svma(0x1100));
        let e = t.resolve_import("x", "nope", 0).unwrap_err().to_string();
        assert!(e.starts_with("symbol nope not found in x"), "{e}");
        assert!(!e.contains("did you mean"), "{e}");
        // A typo is answered with the close names of the right kind.
        let e = t.resolve("x", "dpu", 0).unwrap_err().to_string();
        assert!(e.contains("; did you mean dup?"), "{e}");
        let e = t.resolve_import("x", "Countr", 0).unwrap_err().to_string();
        assert!(e.contains("did you mean counter?"), "{e}");
        assert!(
            !t.resolve("x", "countr", 0)
                .unwrap_err()
                .to_string()
                .contains("did you mean")
        );
    }

    #[test]
    fn lookup_by_address() {
        let t = table();
        let (s, off) = t.lookup(Svma(0x1105)).unwrap();
        assert_eq!((s.name.as_str(), off), ("main", 5));
        assert_eq!(t.lookup(Svma(0x1010)).unwrap().0.name, "helper");
        assert!(t.lookup(Svma(0x1020)).is_none(), "past helper's size");
        assert!(t.lookup(Svma(0x500)).is_none());
        assert_eq!(t.lookup(Svma(0x1340)).unwrap().0.name, "unsized");
        assert_eq!(t.lookup(Svma(0x1381)).unwrap().0.name, "after");
    }
}
