//! relive-elf over the system's glibc (bytes read by the test; the crate itself does no I/O):
//! `.dynsym` versions, sizes, build-id, `.eh_frame` ranges.

use relive_elf::{ElfImage, SymSource, SymbolTable, function_ranges};

fn libc() -> Vec<u8> {
    for p in [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
    ] {
        if let Ok(b) = std::fs::read(p) {
            return b;
        }
    }
    panic!("no glibc found (relive targets glibc on x86-64)");
}

#[test]
fn dynsym_versions_sizes_and_build_id() {
    let data = libc();
    let img = ElfImage::parse("libc.so.6", &data).unwrap();
    assert!(img.is_dyn);
    assert_eq!(img.soname.as_deref(), Some("libc.so.6"));
    assert!(img.build_id_hex().is_some_and(|h| h.len() >= 16));
    let syms = SymbolTable::from_elf(&data, None);
    let versions: Vec<_> = syms
        .functions_named("memcpy")
        .filter(|s| s.source == SymSource::Dynsym)
        .map(|s| (s.version.clone().unwrap_or_default(), s.default_version))
        .collect();
    // memcpy has the old GLIBC_2.2.5 (hidden) and the default GLIBC_2.14 versions.
    assert!(
        versions.iter().any(|(v, d)| v == "GLIBC_2.14" && *d),
        "{versions:?}"
    );
    assert!(
        versions.iter().any(|(v, d)| v == "GLIBC_2.2.5" && !*d),
        "{versions:?}"
    );
    let sym = syms.functions_named("getpid").next().expect("getpid");
    assert!(sym.size > 0);
    let (found, off) = syms.lookup(relive_elf::Svma(sym.addr.0 + 1)).unwrap();
    assert_eq!((found.addr, off), (sym.addr, 1));
    let ranges = function_ranges(&img, &data);
    assert!(ranges.len() > 1000);
    assert!(ranges.iter().any(|r| r.start == sym.addr));
}

/// `dynamic_linkage`: glibc exports its API (functions and variables), keeps internal symbols out, needs
/// the dynamic linker, and takes a few symbols from it.
#[test]
fn dynamic_linkage_of_libc() {
    let l = relive_elf::dynamic_linkage(&libc()).unwrap();
    for name in ["printf", "malloc", "environ", "stdout"] {
        assert!(l.exported.contains(name), "{name} not exported");
    }
    assert!(!l.exported.contains("_IO_vtable_check_internal_nonexistent"));
    assert!(
        l.needed.iter().any(|n| n.starts_with("ld-linux")),
        "{:?}",
        l.needed
    );
    assert!(!l.undefined.is_empty() && !l.undefined.iter().any(|u| l.exported.contains(u)));
    assert!(relive_elf::dynamic_linkage(b"not an elf file").is_none());
    let mut names = vec![
        "printf".to_string(),
        "no_such_symbol_here".to_string(),
        "environ".to_string(),
    ];
    relive_elf::remove_exported(&libc(), &mut names);
    assert_eq!(names, ["no_such_symbol_here"]);
}
