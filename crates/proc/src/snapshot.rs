//! Captured thread stacks that can be unwound again offline (DESIGN §6, the "replay" test tier):
//! registers, exactly the target memory pages the live unwind read, and the module list (the vDSO's
//! image included, files by path and build-id). Replaying a snapshot gives the live result
//! without the process, which makes unwinder bugs reproducible from a file.

use crate::error::{ProcError, Result};
use crate::image::ProcessImage;
use crate::mem::{PAGE_SIZE, read_memory_partial};
use crate::ptrace::{Regs, stop_thread};
use relive_elf::ElfImage;
use relive_unwind::{MemoryReader, Stack, StartRegs, UnwindModule, Unwinder};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One module of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapModule {
    pub path: String,
    pub start: u64,
    pub end: u64,
    pub bias: u64,
    pub build_id: Option<String>,
    /// The vDSO's bytes (it has no file); `None` for files.
    pub image: Option<Vec<u8>>,
}

/// One thread: registers and the pages its unwind read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapThread {
    pub tid: i32,
    pub regs: Regs,
    /// Page address → page bytes (4096 each).
    pub pages: BTreeMap<u64, Vec<u8>>,
}

/// A replayable capture of some threads of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub pid: i32,
    pub max_depth: usize,
    pub modules: Vec<SnapModule>,
    pub threads: Vec<SnapThread>,
}

/// A memory reader that remembers every page it read.
struct Recording {
    pid: i32,
    pages: BTreeMap<u64, Option<Vec<u8>>>,
}

impl MemoryReader for Recording {
    fn read_u64(&mut self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        for (i, byte) in b.iter_mut().enumerate() {
            let a = addr.checked_add(i as u64)?;
            let page = a & !(PAGE_SIZE - 1);
            let pid = self.pid;
            let p = self.pages.entry(page).or_insert_with(|| {
                let mut buf = vec![0u8; PAGE_SIZE as usize];
                matches!(read_memory_partial(pid, page, &mut buf), Ok(n) if n == buf.len()).then_some(buf)
            });
            *byte = p.as_ref()?[(a - page) as usize];
        }
        Some(u64::from_le_bytes(b))
    }
}

struct Replay<'a>(&'a BTreeMap<u64, Vec<u8>>);

impl MemoryReader for Replay<'_> {
    fn read_u64(&mut self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        for (i, byte) in b.iter_mut().enumerate() {
            let a = addr.checked_add(i as u64)?;
            let page = a & !(PAGE_SIZE - 1);
            *byte = *self.0.get(&page)?.get((a - page) as usize)?;
        }
        Some(u64::from_le_bytes(b))
    }
}

/// Stops each of `tids` in turn, unwinds it, records what the unwind read, and resumes it. Returns
/// the snapshot and the live stacks.
pub fn capture(
    image: &ProcessImage,
    unwinder: &mut Unwinder,
    tids: &[i32],
    max_depth: usize,
) -> Result<(Snapshot, Vec<Stack>)> {
    let pid = image.pid;
    let mut threads = Vec::new();
    let mut stacks = Vec::new();
    for &tid in tids {
        let t = stop_thread(pid, tid)?;
        let regs = t.regs()?;
        let mut rec = Recording {
            pid,
            pages: BTreeMap::new(),
        };
        let stack = unwinder.unwind(
            StartRegs {
                ip: regs.rip,
                sp: regs.rsp,
                bp: regs.rbp,
            },
            &mut rec,
            max_depth,
        );
        t.resume()?;
        let pages = rec.pages.into_iter().filter_map(|(a, p)| Some((a, p?))).collect();
        threads.push(SnapThread { tid, regs, pages });
        stacks.push(stack);
    }
    let modules = image
        .modules
        .iter()
        .map(|m| SnapModule {
            path: m.path.clone(),
            start: m.mapping.start,
            end: m.mapping.end,
            bias: m.bias,
            build_id: m.image.build_id_hex(),
            image: m.mapping.vdso.then(|| m.data.to_vec()),
        })
        .collect();
    Ok((
        Snapshot {
            pid,
            max_depth,
            modules,
            threads,
        },
        stacks,
    ))
}

impl Snapshot {
    /// An unwinder over the snapshot's modules. `load` supplies a file module's bytes (by path; it
    /// must have the recorded build-id, or the module is left out).
    pub fn unwinder(&self, load: impl Fn(&SnapModule) -> Option<Vec<u8>>) -> Result<Unwinder> {
        let mut mods = Vec::new();
        for m in &self.modules {
            let Some(data) = m.image.clone().or_else(|| load(m)) else {
                continue;
            };
            let image = ElfImage::parse(&m.path, &data).map_err(|e| ProcError::Unexpected {
                pid: self.pid,
                tid: None,
                detail: format!("snapshot module {}: {e}", m.path),
            })?;
            if image.build_id_hex() != m.build_id {
                continue;
            }
            mods.push(UnwindModule {
                name: m.path.clone(),
                avma_range: m.start..m.end,
                bias: m.bias,
                image: Arc::new(image),
                data: data.into(),
            });
        }
        Ok(Unwinder::new(mods))
    }

    /// Unwinds every captured thread again, offline.
    pub fn replay(&self, unwinder: &mut Unwinder) -> Vec<Stack> {
        self.threads
            .iter()
            .map(|t| {
                let start = StartRegs {
                    ip: t.regs.rip,
                    sp: t.regs.rsp,
                    bp: t.regs.rbp,
                };
                unwinder.unwind(start, &mut Replay(&t.pages), self.max_depth)
            })
            .collect()
    }
}
