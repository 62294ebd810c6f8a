//! One ELF file's layout: load segments, the sections the unwinder needs, build-id, entry point,
//! and the load bias of a mapped copy (CRATES.md §2.4).

use crate::addr::{Avma, Svma};
use crate::maps::ModuleMapping;
use object::elf;
use object::read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader, SectionHeader};
use object::{Endianness, Object, ObjectSection};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An ELF file that relive cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error(
        "{object}: not a 64-bit little-endian ELF file ({detail}); relive handles x86-64 Linux objects only"
    )]
    Parse { object: String, detail: String },
}

/// A `PT_LOAD` program header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadSegment {
    pub offset: u64,
    pub vaddr: Svma,
    pub filesz: u64,
    pub memsz: u64,
    pub align: u64,
    pub exec: bool,
}

/// A section's address range as stated in the file, and its file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionRange {
    pub svma: Range<u64>,
    pub file_offset: u64,
}

/// The parts of an ELF file relive needs, parsed once.
#[derive(Debug, Clone)]
pub struct ElfImage {
    pub build_id: Option<Vec<u8>>,
    /// `ET_DYN` (PIE executable or shared object) rather than `ET_EXEC`.
    pub is_dyn: bool,
    pub entry: Svma,
    pub segments: Vec<LoadSegment>,
    pub text: Option<SectionRange>,
    pub eh_frame: Option<SectionRange>,
    pub eh_frame_hdr: Option<SectionRange>,
    pub got: Option<SectionRange>,
    /// `__patchable_function_entries` (GCC's `-fpatchable-function-entry`): the address of every function's
    /// NOP pad, relocated like data (read it from the process).
    pub patchable_entries: Option<SectionRange>,
    pub soname: Option<String>,
}

/// The strings of every `.dynamic` entry tagged `tag` (`DT_SONAME`, `DT_NEEDED`), in order.
pub(crate) fn dynamic_strings(
    file: &ElfFile64<'_, Endianness>,
    data: &[u8],
    tag: elf::DynamicTag,
) -> Vec<String> {
    let endian = file.endian();
    let mut out = vec![];
    let sections = file.elf_section_table();
    for s in sections.iter() {
        if s.sh_type(endian) == elf::SHT_DYNAMIC
            && let Ok(Some((dyns, link))) = s.dynamic(endian, data)
            && let Ok(strs) = sections.strings(endian, data, link)
        {
            for d in dyns {
                if d.d_tag(endian) == tag
                    && let Ok(n) = strs.get(d.d_val(endian) as u32)
                {
                    out.push(String::from_utf8_lossy(n).into_owned());
                }
            }
        }
    }
    out
}

fn section(file: &ElfFile64<'_, Endianness>, name: &str) -> Option<SectionRange> {
    let s = file.section_by_name(name)?;
    let (off, _) = s.file_range()?;
    Some(SectionRange {
        svma: s.address()..s.address() + s.size(),
        file_offset: off,
    })
}

impl ElfImage {
    /// Parses `data`; `object` names the file in errors.
    pub fn parse(object: &str, data: &[u8]) -> Result<ElfImage, ElfError> {
        let err = |e: object::Error| ElfError::Parse {
            object: object.into(),
            detail: e.to_string(),
        };
        let file = ElfFile64::<Endianness>::parse(data).map_err(err)?;
        let endian = file.endian();
        let hdr = file.elf_header();
        let mut segments = Vec::new();
        for ph in file.elf_program_headers() {
            if ph.p_type(endian) == elf::PT_LOAD {
                segments.push(LoadSegment {
                    offset: ph.p_offset(endian),
                    vaddr: Svma(ph.p_vaddr(endian)),
                    filesz: ph.p_filesz(endian),
                    memsz: ph.p_memsz(endian),
                    align: ph.p_align(endian),
                    exec: ph.p_flags(endian).contains(elf::PF_X),
                });
            }
        }
        let soname = dynamic_strings(&file, data, elf::DT_SONAME).pop();
        Ok(ElfImage {
            build_id: file.build_id().ok().flatten().map(|b| b.to_vec()),
            is_dyn: hdr.e_type(endian) == elf::ET_DYN,
            entry: Svma(hdr.e_entry(endian)),
            segments,
            text: section(&file, ".text"),
            eh_frame: section(&file, ".eh_frame"),
            eh_frame_hdr: section(&file, ".eh_frame_hdr"),
            got: section(&file, ".got"),
            patchable_entries: section(&file, "__patchable_function_entries"),
            soname,
        })
    }

    /// The build-id as lower-case hex.
    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id
            .as_ref()
            .map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
    }

    /// The file offset of an SVMA, if a load segment's file bytes cover it.
    pub fn svma_to_offset(&self, svma: Svma) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| svma.0 >= s.vaddr.0 && svma.0 < s.vaddr.0 + s.filesz)
            .map(|s| svma.0 - s.vaddr.0 + s.offset)
    }
}

const PAGE: u64 = 4096;

/// The load bias (AVMA − SVMA) of `image` as mapped by `module` (CRATES.md §2.4): the `PT_LOAD`
/// whose page-aligned file offset equals a mapping's offset gives
/// `bias = mapping.start − align_down(p_vaddr)`. `None` if no mapping matches a segment.
pub fn load_bias(image: &ElfImage, module: &ModuleMapping) -> Option<u64> {
    for m in &module.mappings {
        for s in &image.segments {
            if s.offset & !(PAGE - 1) == m.offset {
                return Some(m.start.wrapping_sub(s.vaddr.0 & !(PAGE - 1)));
            }
        }
    }
    None
}

impl ElfImage {
    /// The AVMA range of the executable segments under `bias`.
    pub fn exec_avma_range(&self, bias: u64) -> Option<Range<Avma>> {
        let lo = self.segments.iter().filter(|s| s.exec).map(|s| s.vaddr.0).min()?;
        let hi = self
            .segments
            .iter()
            .filter(|s| s.exec)
            .map(|s| s.vaddr.0 + s.memsz)
            .max()?;
        Some(Svma(lo).to_avma(bias)..Svma(hi).to_avma(bias))
    }
}

/// The paths where a debug file for `build_id` may live, in search order: each of `extra_dirs`
/// (as `DIR/.build-id/xx/rest.debug` and `DIR/xx/rest.debug`), then `/usr/lib/debug/.build-id/…`.
/// Pure: the caller checks which exist.
pub fn debug_file_candidates(build_id: &[u8], extra_dirs: &[PathBuf]) -> Vec<PathBuf> {
    if build_id.len() < 2 {
        return Vec::new();
    }
    let hex: String = build_id.iter().map(|x| format!("{x:02x}")).collect();
    let (head, rest) = hex.split_at(2);
    let rel = Path::new(head).join(format!("{rest}.debug"));
    let mut out = Vec::new();
    for d in extra_dirs {
        out.push(d.join(".build-id").join(&rel));
        out.push(d.join(&rel));
    }
    out.push(Path::new("/usr/lib/debug/.build-id").join(&rel));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{group_modules, parse_maps};

    #[test]
    fn debug_candidates() {
        let c = debug_file_candidates(&[0xab, 0xcd, 0xef], &[PathBuf::from("/x")]);
        assert_eq!(
            c,
            vec![
                PathBuf::from("/x/.build-id/ab/cdef.debug"),
                PathBuf::from("/x/ab/cdef.debug"),
                PathBuf::from("/usr/lib/debug/.build-id/ab/cdef.debug")
            ]
        );
    }

    #[test]
    fn bias_from_segment_matching_offset() {
        let img = ElfImage {
            build_id: None,
            is_dyn: true,
            entry: Svma(0x1040),
            segments: vec![
                LoadSegment {
                    offset: 0,
                    vaddr: Svma(0),
                    filesz: 0x600,
                    memsz: 0x600,
                    align: 0x1000,
                    exec: false,
                },
                LoadSegment {
                    offset: 0x1000,
                    vaddr: Svma(0x1000),
                    filesz: 0x200,
                    memsz: 0x200,
                    align: 0x1000,
                    exec: true,
                },
            ],
            text: None,
            eh_frame: None,
            eh_frame_hdr: None,
            got: None,
            patchable_entries: None,
            soname: None,
        };
        let maps = "\
555555554000-555555555000 r--p 00000000 fe:01 7 /bin/x
555555555000-555555556000 r-xp 00001000 fe:01 7 /bin/x
";
        let m = &group_modules(&parse_maps(maps).unwrap())[0];
        assert_eq!(load_bias(&img, m), Some(0x555555554000));
        assert_eq!(
            img.exec_avma_range(0x555555554000).unwrap().start,
            Avma(0x555555555000)
        );
    }
}
