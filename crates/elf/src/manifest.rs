//! The patch manifest (DESIGN §4.9): a versioned text format in the ELF section `.relive_manifest`,
//! read from the file's bytes without executing or relocating anything.
//!
//! # Format, version 1
//!
//! The section holds one or more *records*. A record is UTF-8 text ending in a NUL byte; NUL bytes
//! between records are padding (compilers align arrays) and are skipped. Every record starts with the
//! line `relive-manifest/1`; each further line is `<kind> key=value key=value…` (values contain no
//! spaces). Records can come in any order: C patches emit one record per macro
//! (`include/relive.h`), Rust patches one record for the whole `relive_patch::patch!`.
//!
//! | kind | keys | meaning |
//! |---|---|---|
//! | `patch` | `name`, `replace` (0/1), `stacking` (0/1) | exactly one per manifest |
//! | `object` | `name` (`exe` or a soname), `build_id` (hex, optional: unpinned) | an object the patch changes |
//! | `func` | `object`, `old`, `sympos`, `new` | replace `old` (sympos per SPEC D5) with exported `new` |
//! | `callback` | `object`, `kind` (pre_patch, post_patch, pre_unpatch, post_unpatch), `fn` | `int fn(void)` (CB1) |
//! | `state` | `id`, `version` | a klp_state the patch declares (ST1) |
//! | `import` | `object`, `name`, `sympos`, `slot` | write the address of `name` into the exported `slot` |
//!
//! `object` of a func/callback/import must name a declared object.

use serde::Serialize;
use std::collections::BTreeMap;

/// The section that holds the manifest.
pub const SECTION: &str = ".relive_manifest";
/// The format version this reader understands.
pub const FORMAT_VERSION: u32 = 1;
/// The first line of every record.
pub const RECORD_MAGIC: &str = "relive-manifest/";

/// A decoded manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub replace: bool,
    pub stacking: bool,
    pub objects: Vec<ObjectDecl>,
    pub states: Vec<StateDecl>,
    pub imports: Vec<ImportDecl>,
}

/// An object of the target the patch changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectDecl {
    /// `exe` for the main executable, else a soname.
    pub name: String,
    /// The build-id the patch was built against (lowercase hex), if pinned.
    pub build_id: Option<String>,
    pub funcs: Vec<FuncDecl>,
    pub callbacks: Callbacks,
}

impl ObjectDecl {
    /// Whether this is the main executable.
    pub fn is_exe(&self) -> bool {
        self.name == "exe"
    }
}

/// One replaced function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FuncDecl {
    pub old: String,
    pub sympos: u32,
    pub new: String,
}

/// The four optional callbacks of one object (SPEC CB1): exported `int fn(void)` symbols.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Callbacks {
    pub pre_patch: Option<String>,
    pub post_patch: Option<String>,
    pub pre_unpatch: Option<String>,
    pub post_unpatch: Option<String>,
}

/// A state the patch declares (SPEC ST1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateDecl {
    pub id: u64,
    pub version: u32,
}

/// A non-exported target symbol the patch uses, written into an exported slot before enabling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportDecl {
    pub object: String,
    pub name: String,
    pub sympos: u32,
    pub slot: String,
}

/// Why a manifest could not be read. Each message names the problem precisely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not an ELF file ({}): pass the patch's .so", not_elf_detail(magic))]
    NotElf { magic: Vec<u8> },
    #[error("the ELF file is truncated or corrupt: {detail}; rebuild the patch")]
    BadElf { detail: String },
    #[error(
        "no {SECTION} section: this ELF file is not a relive patch (declare one with relive_patch::patch! or relive.h)"
    )]
    NoSection,
    #[error(
        "the {SECTION} section (offset {offset:#x}, {size} bytes) runs past the end of the {file_len}-byte file: the file is truncated"
    )]
    SectionTruncated { offset: u64, size: u64, file_len: usize },
    #[error("manifest record {record} at byte {offset} is not NUL-terminated: the section is truncated")]
    RecordTruncated { record: usize, offset: usize },
    #[error(
        "manifest record {record} at byte {offset} does not start with `{RECORD_MAGIC}N`: the section is corrupt"
    )]
    BadRecordHeader { record: usize, offset: usize },
    #[error(
        "manifest format version {found} (record {record}) is not supported; this relive reads version {FORMAT_VERSION}: use a matching relive or rebuild the patch"
    )]
    UnknownVersion { record: usize, found: String },
    #[error("manifest record {record}, line {line}: {reason} in {text:?}")]
    BadLine {
        record: usize,
        line: usize,
        text: String,
        reason: String,
    },
    #[error("the manifest declares no patch (no `patch name=…` line)")]
    NoPatch,
    #[error("the manifest declares the patch twice ({first:?} and {second:?})")]
    DuplicatePatch { first: String, second: String },
    #[error("{what} refers to object {object:?}, which the manifest does not declare")]
    UnknownObject { what: String, object: String },
    #[error("object {object:?} is declared twice")]
    DuplicateObject { object: String },
    #[error("object {object:?} has two {kind} callbacks ({first:?} and {second:?})")]
    DuplicateCallback {
        object: String,
        kind: String,
        first: String,
        second: String,
    },
}

/// "starts with 68 65 6c 6c, expected 7f 45 4c 46", or "the file is empty".
fn not_elf_detail(magic: &[u8]) -> String {
    if magic.is_empty() {
        return "the file is empty".into();
    }
    let hex: Vec<String> = magic.iter().map(|b| format!("{b:02x}")).collect();
    format!("starts with {}, expected 7f 45 4c 46", hex.join(" "))
}

/// Reads the manifest of a patch file from its bytes.
pub fn read_manifest(file: &[u8]) -> Result<Manifest, ManifestError> {
    use object::{Object, ObjectSection};
    if file.len() < 4 || &file[..4] != b"\x7fELF" {
        return Err(ManifestError::NotElf {
            magic: file[..file.len().min(4)].to_vec(),
        });
    }
    let obj = object::File::parse(file).map_err(|e| ManifestError::BadElf {
        detail: e.to_string(),
    })?;
    let sec = obj.section_by_name(SECTION).ok_or(ManifestError::NoSection)?;
    if let Some((offset, size)) = sec.file_range()
        && offset.checked_add(size).is_none_or(|end| end > file.len() as u64)
    {
        return Err(ManifestError::SectionTruncated {
            offset,
            size,
            file_len: file.len(),
        });
    }
    let data = sec.data().map_err(|e| ManifestError::BadElf {
        detail: e.to_string(),
    })?;
    parse_section(data)
}

fn bad(record: usize, line: usize, text: &str, reason: impl Into<String>) -> ManifestError {
    ManifestError::BadLine {
        record,
        line,
        text: text.into(),
        reason: reason.into(),
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "0" | "false" => Some(false),
        "1" | "true" => Some(true),
        _ => None,
    }
}

fn valid_token(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() && b != b'=')
}

/// Parses the bytes of a `.relive_manifest` section.
pub fn parse_section(data: &[u8]) -> Result<Manifest, ManifestError> {
    let mut patch: Option<(String, bool, bool)> = None;
    let mut objects: Vec<ObjectDecl> = Vec::new();
    let mut funcs: Vec<(String, FuncDecl, String)> = Vec::new();
    let mut callbacks: Vec<(String, String, String, String)> = Vec::new();
    let mut states = Vec::new();
    let mut imports = Vec::new();
    let mut pos = 0;
    let mut record = 0;
    while pos < data.len() {
        if data[pos] == 0 {
            pos += 1;
            continue;
        }
        record += 1;
        let Some(len) = data[pos..].iter().position(|&b| b == 0) else {
            return Err(ManifestError::RecordTruncated { record, offset: pos });
        };
        let text = std::str::from_utf8(&data[pos..pos + len])
            .map_err(|_| ManifestError::BadRecordHeader { record, offset: pos })?;
        let start = pos;
        pos += len + 1;
        let mut lines = text.lines();
        let header = lines.next().unwrap_or("");
        let Some(ver) = header.strip_prefix(RECORD_MAGIC) else {
            return Err(ManifestError::BadRecordHeader {
                record,
                offset: start,
            });
        };
        if ver.trim() != FORMAT_VERSION.to_string() {
            return Err(ManifestError::UnknownVersion {
                record,
                found: ver.trim().to_string(),
            });
        }
        for (i, line) in lines.enumerate() {
            let ln = i + 2;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let kind = words.next().unwrap_or("");
            let mut kv: BTreeMap<&str, &str> = BTreeMap::new();
            for w in words {
                let Some((k, v)) = w.split_once('=') else {
                    return Err(bad(record, ln, line, format!("`{w}` is not key=value")));
                };
                if kv.insert(k, v).is_some() {
                    return Err(bad(record, ln, line, format!("key `{k}` given twice")));
                }
            }
            let allowed: &[&str] = match kind {
                "patch" => &["name", "replace", "stacking"],
                "object" => &["name", "build_id"],
                "func" => &["object", "old", "sympos", "new"],
                "callback" => &["object", "kind", "fn"],
                "state" => &["id", "version"],
                "import" => &["object", "name", "sympos", "slot"],
                _ => return Err(bad(record, ln, line, format!("unknown kind `{kind}`"))),
            };
            if let Some(k) = kv.keys().find(|k| !allowed.contains(k)) {
                return Err(bad(record, ln, line, format!("unknown key `{k}` for `{kind}`")));
            }
            let need = |k: &str| -> Result<&str, ManifestError> {
                match kv.get(k) {
                    Some(v) if valid_token(v) => Ok(v),
                    Some(_) => Err(bad(
                        record,
                        ln,
                        line,
                        format!("`{k}` is empty or has invalid characters"),
                    )),
                    None => Err(bad(record, ln, line, format!("missing `{k}`"))),
                }
            };
            let num = |k: &str| -> Result<u64, ManifestError> {
                let v = need(k)?;
                let r = if let Some(h) = v.strip_prefix("0x") {
                    u64::from_str_radix(h, 16)
                } else {
                    v.parse()
                };
                r.map_err(|_| bad(record, ln, line, format!("`{k}={v}` is not a number")))
            };
            let flag = |k: &str| -> Result<bool, ManifestError> {
                match kv.get(k) {
                    None => Ok(false),
                    Some(v) => {
                        parse_bool(v).ok_or_else(|| bad(record, ln, line, format!("`{k}={v}` is not 0/1")))
                    }
                }
            };
            match kind {
                "patch" => {
                    let name = need("name")?.to_string();
                    if let Some((first, ..)) = &patch {
                        return Err(ManifestError::DuplicatePatch {
                            first: first.clone(),
                            second: name,
                        });
                    }
                    patch = Some((name, flag("replace")?, flag("stacking")?));
                }
                "object" => {
                    let name = need("name")?.to_string();
                    let build_id = match kv.get("build_id") {
                        None | Some(&"") | Some(&"none") => None,
                        Some(v) if v.len() % 2 == 0 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                            Some(v.to_ascii_lowercase())
                        }
                        Some(v) => return Err(bad(record, ln, line, format!("build_id `{v}` is not hex"))),
                    };
                    if objects.iter().any(|o| o.name == name) {
                        return Err(ManifestError::DuplicateObject { object: name });
                    }
                    objects.push(ObjectDecl {
                        name,
                        build_id,
                        funcs: vec![],
                        callbacks: Callbacks::default(),
                    });
                }
                "func" => {
                    let sympos = u32::try_from(num("sympos")?)
                        .map_err(|_| bad(record, ln, line, "sympos out of range"))?;
                    let f = FuncDecl {
                        old: need("old")?.into(),
                        sympos,
                        new: need("new")?.into(),
                    };
                    funcs.push((need("object")?.into(), f, line.to_string()));
                }
                "callback" => {
                    let k = need("kind")?;
                    if !["pre_patch", "post_patch", "pre_unpatch", "post_unpatch"].contains(&k) {
                        return Err(bad(
                            record,
                            ln,
                            line,
                            format!(
                                "callback kind `{k}` is not one of pre_patch, post_patch, pre_unpatch, post_unpatch"
                            ),
                        ));
                    }
                    callbacks.push((
                        need("object")?.into(),
                        k.into(),
                        need("fn")?.into(),
                        line.to_string(),
                    ));
                }
                "state" => {
                    let version = u32::try_from(num("version")?)
                        .map_err(|_| bad(record, ln, line, "version out of range"))?;
                    states.push(StateDecl {
                        id: num("id")?,
                        version,
                    });
                }
                "import" => {
                    let sympos = u32::try_from(num("sympos")?)
                        .map_err(|_| bad(record, ln, line, "sympos out of range"))?;
                    imports.push(ImportDecl {
                        object: need("object")?.into(),
                        name: need("name")?.into(),
                        sympos,
                        slot: need("slot")?.into(),
                    });
                }
                _ => unreachable!("kinds are checked above"),
            }
        }
    }
    let (name, replace, stacking) = patch.ok_or(ManifestError::NoPatch)?;
    for (obj, f, line) in funcs {
        let o = objects
            .iter_mut()
            .find(|o| o.name == obj)
            .ok_or(ManifestError::UnknownObject {
                what: format!("`{line}`"),
                object: obj,
            })?;
        o.funcs.push(f);
    }
    for (obj, kind, f, line) in callbacks {
        let o = objects
            .iter_mut()
            .find(|o| o.name == obj)
            .ok_or_else(|| ManifestError::UnknownObject {
                what: format!("`{line}`"),
                object: obj.clone(),
            })?;
        let slot = match kind.as_str() {
            "pre_patch" => &mut o.callbacks.pre_patch,
            "post_patch" => &mut o.callbacks.post_patch,
            "pre_unpatch" => &mut o.callbacks.pre_unpatch,
            _ => &mut o.callbacks.post_unpatch,
        };
        if let Some(first) = slot {
            return Err(ManifestError::DuplicateCallback {
                object: obj,
                kind,
                first: first.clone(),
                second: f,
            });
        }
        *slot = Some(f);
    }
    for i in &imports {
        if !objects.iter().any(|o| o.name == i.object) {
            return Err(ManifestError::UnknownObject {
                what: format!("import of {:?}", i.name),
                object: i.object.clone(),
            });
        }
    }
    // Records may arrive in any order (C toplevel reordering): sort for a stable output.
    for o in &mut objects {
        o.funcs
            .sort_by(|a, b| (&a.old, a.sympos).cmp(&(&b.old, b.sympos)));
    }
    objects.sort_by(|a, b| (!a.is_exe(), &a.name).cmp(&(!b.is_exe(), &b.name)));
    states.sort_by_key(|s: &StateDecl| s.id);
    imports.sort_by(|a: &ImportDecl, b: &ImportDecl| (&a.object, &a.name).cmp(&(&b.object, &b.name)));
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        name,
        replace,
        stacking,
        objects,
        states,
        imports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"relive-manifest/1\nfunc object=exe old=compute sympos=0 new=compute_v2\n\0\0\0\
relive-manifest/1\npatch name=fix-1 replace=0 stacking=1\nobject name=exe build_id=ABCD\n\0\
relive-manifest/1\ncallback object=exe kind=pre_patch fn=pre\nstate id=7 version=2\n\
import object=exe name=secret sympos=1 slot=p_secret\n\0";

    #[test]
    fn t_manifest_records_any_order_d4_9() {
        let m = parse_section(GOOD).unwrap();
        assert_eq!(m.name, "fix-1");
        assert!(!m.replace && m.stacking);
        assert_eq!(m.objects.len(), 1);
        assert_eq!(m.objects[0].build_id.as_deref(), Some("abcd"));
        assert_eq!(
            m.objects[0].funcs,
            vec![FuncDecl {
                old: "compute".into(),
                sympos: 0,
                new: "compute_v2".into()
            }]
        );
        assert_eq!(m.objects[0].callbacks.pre_patch.as_deref(), Some("pre"));
        assert_eq!(m.states, vec![StateDecl { id: 7, version: 2 }]);
        assert_eq!(m.imports[0].slot, "p_secret");
    }

    #[test]
    fn t_manifest_precise_errors_d4_9() {
        let cut = &GOOD[..GOOD.len() - 1];
        assert!(matches!(
            parse_section(cut),
            Err(ManifestError::RecordTruncated { record: 3, .. })
        ));
        let v2 = b"relive-manifest/2\npatch name=x\n\0";
        assert_eq!(
            parse_section(v2),
            Err(ManifestError::UnknownVersion {
                record: 1,
                found: "2".into()
            })
        );
        let junk = b"hello\0";
        assert!(matches!(
            parse_section(junk),
            Err(ManifestError::BadRecordHeader { record: 1, offset: 0 })
        ));
        let e =
            parse_section(b"relive-manifest/1\npatch name=x\nfunc object=lib.so old=a sympos=0 new=b\n\0");
        assert!(matches!(e, Err(ManifestError::UnknownObject { .. })), "{e:?}");
        let e = parse_section(b"relive-manifest/1\npatch name=x\nfrob a=b\n\0");
        assert!(matches!(e, Err(ManifestError::BadLine { line: 3, .. })), "{e:?}");
        let e = parse_section(b"relive-manifest/1\npatch name=x\nstate id=seven version=1\n\0");
        assert!(e.unwrap_err().to_string().contains("`id=seven` is not a number"));
        assert_eq!(
            parse_section(b"relive-manifest/1\nobject name=exe\n\0"),
            Err(ManifestError::NoPatch)
        );
        assert!(matches!(
            read_manifest(b"#!/bin/sh\n"),
            Err(ManifestError::NotElf { .. })
        ));
        assert_eq!(
            read_manifest(b"hello").unwrap_err().to_string(),
            "not an ELF file (starts with 68 65 6c 6c, expected 7f 45 4c 46): pass the patch's .so"
        );
        assert_eq!(
            read_manifest(b"\x01").unwrap_err().to_string(),
            "not an ELF file (starts with 01, expected 7f 45 4c 46): pass the patch's .so"
        );
        assert_eq!(
            read_manifest(b"").unwrap_err().to_string(),
            "not an ELF file (the file is empty): pass the patch's .so"
        );
        assert!(matches!(
            read_manifest(b"\x7fELF\x02\x01"),
            Err(ManifestError::BadElf { .. })
        ));
    }
}
