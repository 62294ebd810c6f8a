//! `.eh_frame` facts via gimli: function ranges from FDEs (exact bounds even for stripped
//! functions) and whether the CFI marks an address as a thread root (return address undefined,
//! as glibc's `_start`, `clone` and `clone3` do with `cfi_undefined rip`).

use crate::addr::Svma;
use crate::image::{ElfImage, SectionRange};
use gimli::{BaseAddresses, CieOrFde, EhFrame, EhFrameHdr, LittleEndian, UnwindContext, UnwindSection};
use std::ops::Range;

fn slice<'a>(data: &'a [u8], s: &SectionRange) -> Option<&'a [u8]> {
    let start = usize::try_from(s.file_offset).ok()?;
    let len = usize::try_from(s.svma.end - s.svma.start).ok()?;
    data.get(start..start.checked_add(len)?)
}

fn bases(image: &ElfImage) -> BaseAddresses {
    let mut b = BaseAddresses::default();
    if let Some(s) = &image.eh_frame {
        b = b.set_eh_frame(s.svma.start);
    }
    if let Some(s) = &image.eh_frame_hdr {
        b = b.set_eh_frame_hdr(s.svma.start);
    }
    if let Some(s) = &image.text {
        b = b.set_text(s.svma.start);
    }
    if let Some(s) = &image.got {
        b = b.set_got(s.svma.start);
    }
    b
}

/// The ranges of every FDE in `.eh_frame`, sorted by start. `data` is the whole file (or, for the
/// vDSO, its in-memory image, where file offsets equal SVMAs).
pub fn function_ranges(image: &ElfImage, data: &[u8]) -> Vec<Range<Svma>> {
    let Some(eh) = image.eh_frame.as_ref().and_then(|s| slice(data, s)) else {
        return Vec::new();
    };
    let eh_frame = EhFrame::new(eh, LittleEndian);
    let bases = bases(image);
    let mut out = Vec::new();
    let mut entries = eh_frame.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if let CieOrFde::Fde(partial) = entry
            && let Ok(fde) = partial.parse(EhFrame::cie_from_offset)
            && fde.len() > 0
        {
            out.push(Svma(fde.initial_address())..Svma(fde.initial_address() + fde.len()));
        }
    }
    out.sort_by_key(|r| r.start);
    out
}

/// `Some(true)` if the CFI row covering `svma` says the return address (rip, DWARF register 16) is
/// undefined: the canonical "outermost frame" marker of a thread root. `Some(false)` if a row
/// exists and gives a rule, `None` if no FDE covers `svma`.
pub fn ra_undefined_at(image: &ElfImage, data: &[u8], svma: Svma) -> Option<bool> {
    let eh = image.eh_frame.as_ref().and_then(|s| slice(data, s))?;
    let eh_frame = EhFrame::new(eh, LittleEndian);
    let bases = bases(image);
    let mut ctx = Box::new(UnwindContext::new());
    let fde = match image.eh_frame_hdr.as_ref().and_then(|s| slice(data, s)) {
        Some(hdr) => {
            let parsed = EhFrameHdr::new(hdr, LittleEndian).parse(&bases, 8).ok()?;
            match parsed.table() {
                Some(t) => t
                    .fde_for_address(&eh_frame, &bases, svma.0, EhFrame::cie_from_offset)
                    .ok()?,
                None => eh_frame
                    .fde_for_address(&bases, svma.0, EhFrame::cie_from_offset)
                    .ok()?,
            }
        }
        None => eh_frame
            .fde_for_address(&bases, svma.0, EhFrame::cie_from_offset)
            .ok()?,
    };
    let row = fde
        .unwind_info_for_address(&eh_frame, &bases, &mut ctx, svma.0)
        .ok()?;
    Some(matches!(
        row.register(gimli::X86_64::RA),
        Some(gimli::RegisterRule::Undefined)
    ))
}
