//! The code image of a live process: its modules from `/proc/PID/maps`, each read through
//! `/proc/PID/map_files/…` (the file actually mapped, even if deleted or replaced on disk), with
//! load bias, symbols (plus a build-id debug file) and an unwinder over all of them.

use crate::error::{ProcError, Result};
use crate::mapped::MappedFile;
use crate::mem::read_memory;
use relive_elf::{
    Avma, ElfImage, FileBytes, ModuleMapping, Svma, Symbol, SymbolTable, debug_file_candidates,
    group_modules, load_bias, parse_maps,
};
use relive_unwind::{UnwindModule, Unwinder};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// How a module's bytes were obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BytesFrom {
    /// `/proc/PID/map_files/START-END`: exactly the mapped file.
    MapFiles,
    /// The path shown in maps, through `/proc/PID/root` (map_files needs CAP_SYS_ADMIN or
    /// CAP_CHECKPOINT_RESTORE; an unprivileged same-uid user gets this).
    Path,
    /// Target memory (the vDSO).
    Memory,
}

/// One object mapped in the target.
#[derive(Debug, Clone)]
pub struct LoadedModule {
    pub mapping: ModuleMapping,
    /// The path (or `[vdso]`), without ` (deleted)`.
    pub path: String,
    pub deleted: bool,
    pub bias: u64,
    pub image: Arc<ElfImage>,
    /// The file's bytes, mapped read-only (the vDSO: copied from memory).
    pub data: FileBytes,
    pub bytes_from: BytesFrom,
    /// Built on first use: most commands look up symbols in one or two objects, and building the table of
    /// a large library (libc, a debug file) is a good part of an image load.
    pub symbols: Arc<LazySymbols>,
    /// The debug file whose symbols were merged in, if one was found by build-id.
    pub debug_file: Option<PathBuf>,
}

impl LoadedModule {
    /// The file name (`libc.so.6`), or `[vdso]`.
    pub fn short_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    /// Whether `name` designates this module: its full path, file name, or soname.
    pub fn matches(&self, name: &str) -> bool {
        self.path == name || self.short_name() == name || self.image.soname.as_deref() == Some(name)
    }

    pub fn contains(&self, avma: Avma) -> bool {
        avma.0 >= self.mapping.start && avma.0 < self.mapping.end
    }
}

/// A module's symbol table, built from its bytes (and its debug file's) the first time it is used; it
/// dereferences to the [`SymbolTable`].
pub struct LazySymbols {
    data: FileBytes,
    debug: Option<FileBytes>,
    table: std::sync::OnceLock<SymbolTable>,
}

impl LazySymbols {
    pub fn new(data: FileBytes, debug: Option<FileBytes>) -> LazySymbols {
        LazySymbols {
            data,
            debug,
            table: std::sync::OnceLock::new(),
        }
    }
}

impl std::ops::Deref for LazySymbols {
    type Target = SymbolTable;
    fn deref(&self) -> &SymbolTable {
        self.table
            .get_or_init(|| SymbolTable::from_elf(&self.data, self.debug.as_deref()))
    }
}

impl std::fmt::Debug for LazySymbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazySymbols")
            .field("built", &self.table.get().is_some())
            .finish()
    }
}

/// Options for loading a process image.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// Extra directories searched for debug files by build-id (`--debug-dir`), before `/usr/lib/debug`.
    pub debug_dirs: Vec<PathBuf>,
    /// Look for separate debug files only for the modules these names designate ([`LoadedModule::matches`];
    /// `exe` = the main executable); `None`: for every module. Reading and parsing a large debug file is most
    /// of an image load, and a caller that resolves symbols of a few objects only needs theirs.
    pub debug_only_for: Option<Vec<String>>,
}

/// A symbolized address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Symbolized {
    /// The module's path, or `None` for an address outside every module.
    pub object: Option<String>,
    /// The demangled function name, if a symbol covers the address.
    pub function: Option<String>,
    /// Offset into the function, or into the module (AVMA − bias) if no symbol covers it.
    pub offset: u64,
}

impl std::fmt::Display for Symbolized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let obj = self.object.as_deref().map(|p| p.rsplit('/').next().unwrap_or(p));
        match (&self.function, obj) {
            (Some(func), Some(o)) => write!(f, "{func}+{:#x} ({o})", self.offset),
            (Some(func), None) => write!(f, "{func}+{:#x}", self.offset),
            (None, Some(o)) => write!(f, "?? ({o}+{:#x})", self.offset),
            (None, None) => write!(f, "?? ({:#x})", self.offset),
        }
    }
}

/// The modules of a process.
#[derive(Debug, Clone)]
pub struct ProcessImage {
    pub pid: i32,
    pub modules: Vec<LoadedModule>,
}

/// Maps a file read-only (its pages are read when touched, not here).
fn map_file(path: &str) -> std::io::Result<FileBytes> {
    Ok(FileBytes::new(MappedFile::map(&std::fs::File::open(path)?)?))
}

fn read_module_bytes(pid: i32, m: &ModuleMapping) -> Result<(FileBytes, BytesFrom)> {
    if m.vdso {
        let mut buf = vec![0u8; (m.end - m.start) as usize];
        read_memory(pid, m.start, &mut buf)?;
        return Ok((buf.into(), BytesFrom::Memory));
    }
    let first = m.first_mapping();
    let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", first.start, first.end);
    match map_file(&mf) {
        Ok(b) => return Ok((b, BytesFrom::MapFiles)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT)) && !crate::error::process_exists(pid) => {
            return Err(ProcError::TargetDied {
                pid,
                tid: None,
                during: "reading /proc/PID/map_files",
            });
        }
        Err(_) => {}
    }
    if m.deleted {
        return Err(ProcError::Os {
            pid,
            tid: None,
            op: "read a deleted mapped file through /proc/PID/map_files (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE; run relive as root)",
            err: std::io::Error::from_raw_os_error(libc::EPERM),
        });
    }
    let via_root = format!("/proc/{pid}/root{}", m.path);
    match map_file(&via_root).or_else(|_| map_file(&m.path)) {
        Ok(b) => Ok((b, BytesFrom::Path)),
        Err(e) => Err(ProcError::from_os(pid, None, "read a mapped file", e)),
    }
}

fn find_debug_file(image: &ElfImage, dirs: &[PathBuf]) -> Option<(PathBuf, FileBytes)> {
    let id = image.build_id.as_ref()?;
    for p in debug_file_candidates(id, dirs) {
        if let Ok(b) = map_file(&p.to_string_lossy()) {
            // Accept it only if its build-id matches.
            if ElfImage::parse(&p.to_string_lossy(), &b)
                .ok()
                .and_then(|i| i.build_id)
                .as_ref()
                == Some(id)
            {
                return Some((p, b));
            }
        }
    }
    None
}

impl ProcessImage {
    /// Reads `/proc/PID/maps` and every executable object mapped.
    pub fn load(pid: i32, opts: &ImageOptions) -> Result<ProcessImage> {
        Self::load_reusing(pid, opts, None)
    }

    /// Re-reads `/proc/PID/maps` and loads only the objects mapped since `self` was loaded; an object mapped
    /// at the same range from the same path is taken over from `self` (its bytes, symbols and image).
    pub fn refresh(&self, opts: &ImageOptions) -> Result<ProcessImage> {
        Self::load_reusing(self.pid, opts, Some(self))
    }

    fn load_reusing(pid: i32, opts: &ImageOptions, prev: Option<&ProcessImage>) -> Result<ProcessImage> {
        let maps =
            std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ESRCH) if !crate::error::process_exists(pid) => {
                    ProcError::NoSuchProcess { pid }
                }
                _ => ProcError::from_os(pid, None, "read /proc/PID/maps", e),
            })?;
        if maps.is_empty() && !crate::error::process_exists(pid) {
            return Err(ProcError::TargetDied {
                pid,
                tid: None,
                during: "reading /proc/PID/maps",
            });
        }
        let entries = parse_maps(&maps).map_err(|e| ProcError::Unexpected {
            pid,
            tid: None,
            detail: e.to_string(),
        })?;
        let mut modules = Vec::new();
        let main_path = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.to_string_lossy().trim_end_matches(" (deleted)").to_owned());
        for m in group_modules(&entries) {
            if let Some(old) = prev.and_then(|p| {
                p.modules.iter().find(|o| {
                    !m.vdso
                        && o.path == m.path
                        && o.deleted == m.deleted
                        && o.mapping.start == m.start
                        && o.mapping.end == m.end
                })
            }) {
                modules.push(old.clone());
                continue;
            }
            let (data, bytes_from) = match read_module_bytes(pid, &m) {
                Ok(x) => x,
                Err(e) if e.is_target_died() => return Err(e),
                Err(e) => {
                    tracing::warn!(pid, object = %m.path, "skipping an object relive cannot read: {e}");
                    continue;
                }
            };
            let image = match ElfImage::parse(&m.path, &data) {
                Ok(i) => i,
                Err(_) => continue, // not ELF (e.g. a mapped data file with x bit)
            };
            let bias = if m.vdso {
                // The vDSO image is read from memory at its start: bias from its first segment.
                m.start
                    .wrapping_sub(image.segments.first().map_or(0, |s| s.vaddr.0 & !0xfff))
            } else {
                match load_bias(&image, &m) {
                    Some(b) => b,
                    None => continue,
                }
            };
            let wanted = opts.debug_only_for.as_ref().is_none_or(|names| {
                names.iter().any(|n| {
                    (n == "exe" && main_path.as_deref() == Some(m.path.as_str()))
                        || m.path == *n
                        || m.path.rsplit('/').next() == Some(n.as_str())
                        || image.soname.as_deref() == Some(n.as_str())
                })
            });
            let debug = if wanted {
                find_debug_file(&image, &opts.debug_dirs)
            } else {
                None
            };
            let symbols = LazySymbols::new(data.clone(), debug.as_ref().map(|(_, b)| b.clone()));
            modules.push(LoadedModule {
                path: m.path.clone(),
                deleted: m.deleted,
                bias,
                image: Arc::new(image),
                data,
                bytes_from,
                symbols: Arc::new(symbols),
                debug_file: debug.map(|(p, _)| p),
                mapping: m,
            });
        }
        Ok(ProcessImage { pid, modules })
    }

    /// The module containing `avma`.
    pub fn module_for(&self, avma: Avma) -> Option<&LoadedModule> {
        self.modules.iter().find(|m| m.contains(avma))
    }

    /// The first module matching `name` (path, file name or soname).
    pub fn module_named(&self, name: &str) -> Option<&LoadedModule> {
        self.modules.iter().find(|m| m.matches(name))
    }

    /// The main executable (the module mapping the lowest-addressed file whose path is
    /// `/proc/PID/exe`'s target).
    pub fn main_module(&self) -> Option<&LoadedModule> {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid)).ok()?;
        let exe = exe.to_string_lossy();
        let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
        self.modules.iter().find(|m| m.path == exe)
    }

    /// Symbolizes `avma`: function+offset and object.
    pub fn symbolize(&self, avma: Avma) -> Symbolized {
        let Some(m) = self.module_for(avma) else {
            return Symbolized {
                object: None,
                function: None,
                offset: avma.0,
            };
        };
        let svma = avma.to_svma(m.bias);
        match m.symbols.lookup(svma) {
            Some((s, off)) => Symbolized {
                object: Some(m.path.clone()),
                function: Some(relive_elf::demangle(&s.name)),
                offset: off,
            },
            None => Symbolized {
                object: Some(m.path.clone()),
                function: None,
                offset: svma.0,
            },
        }
    }

    /// Every name of the function containing `avma` (its aliases), demangled; empty if none.
    pub fn function_aliases(&self, avma: Avma) -> Vec<String> {
        let Some(m) = self.module_for(avma) else {
            return Vec::new();
        };
        match m.symbols.lookup(avma.to_svma(m.bias)) {
            Some((s, _)) => m
                .symbols
                .names_at(s.addr)
                .into_iter()
                .map(relive_elf::demangle)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Resolves `(object, name, sympos)` (SPEC D5) to the symbol and its AVMA.
    pub fn resolve(
        &self,
        object: &str,
        name: &str,
        sympos: u32,
    ) -> std::result::Result<(Avma, Symbol), ResolveInImageError> {
        let m = self
            .module_named(object)
            .ok_or_else(|| ResolveInImageError::NoObject {
                pid: self.pid,
                object: object.into(),
                loaded: self.modules.iter().map(|m| m.short_name().to_string()).collect(),
            })?;
        let s = m.symbols.resolve(&m.path, name, sympos)?;
        Ok((s.addr.to_avma(m.bias), s.clone()))
    }

    /// Modules for the unwinder.
    pub fn unwind_modules(&self) -> Vec<UnwindModule> {
        self.modules
            .iter()
            .map(|m| UnwindModule {
                name: m.path.clone(),
                avma_range: m.mapping.start..m.mapping.end,
                bias: m.bias,
                image: m.image.clone(),
                data: m.data.clone(),
            })
            .collect()
    }

    /// An unwinder over every module.
    pub fn unwinder(&self) -> Unwinder {
        Unwinder::new(self.unwind_modules())
    }

    /// SVMA of an AVMA in its module.
    pub fn svma_of(&self, avma: Avma) -> Option<(&LoadedModule, Svma)> {
        self.module_for(avma).map(|m| (m, avma.to_svma(m.bias)))
    }
}

/// `(object, name, sympos)` did not resolve in a live process.
#[derive(Debug, thiserror::Error)]
pub enum ResolveInImageError {
    #[error("object {object} is not loaded in pid {pid} (loaded: {})", loaded.join(", "))]
    NoObject {
        pid: i32,
        object: String,
        loaded: Vec<String>,
    },
    #[error(transparent)]
    Symbol(#[from] relive_elf::ResolveError),
}
