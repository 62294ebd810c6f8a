//! `/proc/PID/maps` parsing (pure) and grouping of mappings into modules.

use serde::Serialize;

/// What a mapping maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum MapPath {
    /// A file, by the path the kernel shows.
    File(String),
    /// A file that was deleted or replaced on disk after it was mapped (` (deleted)` suffix). Its
    /// bytes are still readable through `/proc/PID/map_files/START-END`.
    Deleted(String),
    /// `[vdso]`.
    Vdso,
    /// `[vvar]`, `[vvar_vclock]` and friends.
    Vvar,
    /// `[stack]`, `[heap]`, `[vsyscall]`, `[anon:…]` and other bracketed names.
    Special(String),
    /// No path at all.
    Anonymous,
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub private: bool,
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    pub path: MapPath,
}

/// A malformed line of `/proc/PID/maps`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed /proc/PID/maps line {line_no}: {line:?} ({what}); is this a Linux /proc?")]
pub struct MapsError {
    pub line_no: usize,
    pub line: String,
    pub what: &'static str,
}

/// Parses the text of `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<MapEntry>, MapsError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(line).map_err(|what| MapsError {
            line_no: i + 1,
            line: line.into(),
            what,
        })?);
    }
    Ok(out)
}

fn next_field<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let s = rest.trim_start_matches(' ');
    let end = s.find(' ').unwrap_or(s.len());
    let (f, r) = s.split_at(end);
    *rest = r;
    if f.is_empty() { None } else { Some(f) }
}

fn parse_line(line: &str) -> Result<MapEntry, &'static str> {
    let mut rest = line;
    let range = next_field(&mut rest).ok_or("no address range")?;
    let perms = next_field(&mut rest).ok_or("no permissions")?;
    let offset = next_field(&mut rest).ok_or("no offset")?;
    let dev = next_field(&mut rest).ok_or("no device")?;
    let inode = next_field(&mut rest).ok_or("no inode")?;
    // The path is everything after the inode's padding; it may contain spaces.
    let path = rest.trim_start_matches(' ');
    let (s, e) = range.split_once('-').ok_or("address range without '-'")?;
    let start = u64::from_str_radix(s, 16).map_err(|_| "bad start address")?;
    let end = u64::from_str_radix(e, 16).map_err(|_| "bad end address")?;
    let pb = perms.as_bytes();
    if pb.len() != 4 {
        return Err("permissions are not 4 characters");
    }
    let offset = u64::from_str_radix(offset, 16).map_err(|_| "bad offset")?;
    let inode = inode.parse::<u64>().map_err(|_| "bad inode")?;
    let path = if path.is_empty() {
        MapPath::Anonymous
    } else if path == "[vdso]" {
        MapPath::Vdso
    } else if path.starts_with("[vvar") {
        MapPath::Vvar
    } else if path.starts_with('[') && path.ends_with(']') {
        MapPath::Special(path.into())
    } else if let Some(p) = path.strip_suffix(" (deleted)") {
        MapPath::Deleted(p.into())
    } else {
        MapPath::File(path.into())
    };
    Ok(MapEntry {
        start,
        end,
        read: pb[0] == b'r',
        write: pb[1] == b'w',
        exec: pb[2] == b'x',
        private: pb[3] == b'p',
        offset,
        dev: dev.into(),
        inode,
        path,
    })
}

/// The mappings of one object (a file mapped by the loader, or the vDSO).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleMapping {
    /// The path as the kernel shows it (without ` (deleted)`), or `[vdso]`.
    pub path: String,
    pub deleted: bool,
    pub vdso: bool,
    pub dev: String,
    pub inode: u64,
    /// Lowest start and highest end of the object's mappings.
    pub start: u64,
    pub end: u64,
    /// Every mapping of the object, in address order.
    pub mappings: Vec<MapEntry>,
}

impl ModuleMapping {
    /// The mapping whose file offset is 0 (the ELF header), which `/proc/PID/map_files` can open.
    pub fn first_mapping(&self) -> &MapEntry {
        self.mappings
            .iter()
            .find(|m| m.offset == 0)
            .unwrap_or(&self.mappings[0])
    }

    /// Whether any mapping of the object is executable.
    pub fn has_exec(&self) -> bool {
        self.mappings.iter().any(|m| m.exec)
    }
}

/// Groups file mappings by (dev, inode, path) into modules, and adds the vDSO. Objects with no
/// executable mapping (data files, locale archives) are dropped.
pub fn group_modules(entries: &[MapEntry]) -> Vec<ModuleMapping> {
    let mut out: Vec<ModuleMapping> = Vec::new();
    for e in entries {
        let (path, deleted, vdso) = match &e.path {
            MapPath::File(p) => (p.clone(), false, false),
            MapPath::Deleted(p) => (p.clone(), true, false),
            MapPath::Vdso => ("[vdso]".to_string(), false, true),
            _ => continue,
        };
        // A file mapped twice (e.g. dlopen'ed again after dlclose at another address) is two
        // modules: only merge with a module whose mappings are contiguous-ish and have a larger offset.
        let same = out.iter_mut().rev().find(|m| {
            m.path == path
                && m.inode == e.inode
                && m.dev == e.dev
                && m.mappings
                    .last()
                    .is_some_and(|l| (l.offset <= e.offset && l.end <= e.start) || (vdso && l.end == e.start))
        });
        match same {
            Some(m) if !vdso || m.end == e.start => {
                m.end = m.end.max(e.end);
                m.mappings.push(e.clone());
            }
            _ => out.push(ModuleMapping {
                path,
                deleted,
                vdso,
                dev: e.dev.clone(),
                inode: e.inode,
                start: e.start,
                end: e.end,
                mappings: vec![e.clone()],
            }),
        }
    }
    out.retain(|m| m.has_exec());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234                       /usr/bin/my prog
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1234                       /usr/bin/my prog
55d0c0a02000-55d0c0a03000 r--p 00002000 fe:01 1234                       /usr/bin/my prog
55d0c0a03000-55d0c0a04000 rw-p 00002000 fe:01 1234                       /usr/bin/my prog
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000001000 r--p 00000000 fe:01 99                         /tmp/libgone.so (deleted)
7f0000001000-7f0000002000 r-xp 00001000 fe:01 99                         /tmp/libgone.so (deleted)
7f0000010000-7f0000011000 r-xp 00000000 00:00 0 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_paths_with_spaces_deleted_and_specials() {
        let m = parse_maps(SAMPLE).unwrap();
        assert_eq!(m.len(), 12);
        assert_eq!(m[0].path, MapPath::File("/usr/bin/my prog".into()));
        assert!(m[1].exec && m[1].read && !m[1].write && m[1].private);
        assert_eq!(m[1].offset, 0x1000);
        assert_eq!(m[4].path, MapPath::Special("[heap]".into()));
        assert_eq!(m[5].path, MapPath::Deleted("/tmp/libgone.so".into()));
        assert_eq!(m[7].path, MapPath::Anonymous);
        assert_eq!(m[9].path, MapPath::Vvar);
        assert_eq!(m[10].path, MapPath::Vdso);
        assert_eq!(m[11].start, 0xffffffffff600000);
    }

    #[test]
    fn groups_modules() {
        let mods = group_modules(&parse_maps(SAMPLE).unwrap());
        let names: Vec<_> = mods
            .iter()
            .map(|m| (m.path.as_str(), m.deleted, m.vdso))
            .collect();
        assert_eq!(
            names,
            vec![
                ("/usr/bin/my prog", false, false),
                ("/tmp/libgone.so", true, false),
                ("[vdso]", false, true)
            ]
        );
        assert_eq!(mods[0].mappings.len(), 4);
        assert_eq!(mods[0].start, 0x55d0c0a00000);
        assert_eq!(mods[0].end, 0x55d0c0a04000);
        assert_eq!(mods[0].first_mapping().offset, 0);
    }

    #[test]
    fn rejects_garbage() {
        let e = parse_maps("hello world\n").unwrap_err();
        assert_eq!(e.line_no, 1);
        assert!(parse_maps("1000-2000 r-x 0 00:00 0\n").is_err());
    }
}
