//! relive-elf: modules, load bias, symbols, build-ids and the patch manifest. Pure over bytes.
//!
//! Nothing here opens a file or touches a process: callers (relive-proc, the CLI) read
//! `/proc/PID/maps` and `/proc/PID/map_files/…` and pass the bytes in.
#![forbid(unsafe_code)]

pub mod addr;
pub mod bytes;
pub mod cfi;
pub mod demangle;
pub mod image;
pub mod linkage;
pub mod manifest;
pub mod maps;
pub mod symbols;

pub use addr::{Avma, Svma};
pub use bytes::FileBytes;
pub use cfi::{function_ranges, ra_undefined_at};
pub use demangle::demangle;
pub use image::{ElfError, ElfImage, LoadSegment, SectionRange, debug_file_candidates, load_bias};
pub use linkage::{DynamicLinkage, dynamic_linkage, remove_exported};
pub use maps::{MapEntry, MapPath, MapsError, ModuleMapping, group_modules, parse_maps};
pub use symbols::{ResolveError, SymKind, SymSource, Symbol, SymbolTable};
