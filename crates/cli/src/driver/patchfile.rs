//! The patch file and every check `apply` makes before touching the target (DESIGN §3 steps 1–4): the
//! manifest, objects and build-ids, D5 symbol resolution, relive-core's L1/K5/ST3 checks, and x86 entry
//! analysis. `check` runs exactly these and reports them one verdict per func.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use relive_core::{CallbackSet, FuncId, FuncSpec, ObjectId, ObjectSpec, PatchSpec, Range};
use relive_elf::manifest::{Manifest, ObjectDecl, read_manifest};
use relive_elf::{Svma, SymbolTable};
use relive_proc::{LoadedModule, ProcessImage};
use relive_x86::{EntryContext, EntryPlan, FunctionBytes, FunctionCode, RegSet, VectorWidth};

use super::doc::{Doc, FuncRec, ObjRec, PatchRec, THUNK_PAGE};
use super::session::Session;
use super::{CheckReport, Fail, FuncVerdict, Verdict};

/// A patch file read from disk.
pub struct PatchFile {
    pub path: PathBuf,
    pub name: String,
    pub manifest: Manifest,
    pub symbols: SymbolTable,
    /// The file's GNU build-id, if it has one: tells a rebuilt patch from the one already active.
    pub build_id: Option<String>,
    /// What the patch exports and needs from the dynamic linker (`link_problem`, the new-function checks).
    pub linkage: Option<relive_elf::DynamicLinkage>,
}

impl PatchFile {
    pub fn read(path: &Path) -> Result<PatchFile, Fail> {
        let bytes = std::fs::read(path)
            .map_err(|e| Fail::Error(anyhow!("cannot read the patch file {}: {e}", path.display())))?;
        let manifest = read_manifest(&bytes)
            .map_err(|e| Fail::Refused(anyhow!("{} is not a usable relive patch: {e}", path.display())))?;
        // The agent loads patches with dlopen, which takes shared objects only: refuse anything else here,
        // so that `check` says so too and `apply` never gets as far as the target.
        let e_type = bytes.get(16..18).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if e_type != Some(3) {
            let what = match e_type {
                Some(1) => "a relocatable object file (ET_REL, from `cc -c`)",
                Some(2) => "an executable (ET_EXEC)",
                Some(4) => "a core dump (ET_CORE)",
                _ => "not a shared object",
            };
            return Err(Fail::Refused(anyhow!(
                "{} is not a usable relive patch: it is {what}, and patches are shared objects: link it \
                 with `cc -shared -fPIC` (C) or build a `cdylib` (Rust)",
                path.display()
            )));
        }
        let symbols = SymbolTable::from_elf(&bytes, None);
        let build_id = relive_elf::ElfImage::parse("patch", &bytes)
            .ok()
            .and_then(|i| i.build_id_hex());
        let linkage = relive_elf::dynamic_linkage(&bytes);
        let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        Ok(PatchFile {
            path,
            name: manifest.name.clone(),
            manifest,
            symbols,
            build_id,
            linkage,
        })
    }
}

/// When a patch named like `pf` is active in the target: whether `pf` is another build of it (both
/// build-ids known and different). Returns the active library's build-id in that case. Applying a rebuilt
/// patch under the same name would otherwise answer "already active" and leave the old code running.
pub fn other_build_of_active(image: &ProcessImage, doc: &Doc, pf: &PatchFile) -> Option<String> {
    let rec = doc.patches.iter().find(|r| r.name == pf.name)?;
    let active = image
        .module_for(relive_elf::Avma(rec.base))?
        .image
        .build_id_hex()?;
    (pf.build_id.as_ref()? != &active).then_some(active)
}

/// The refusal for [`other_build_of_active`].
pub fn other_build_message(pid: i32, pf: &PatchFile, active: &str) -> String {
    format!(
        "patch {name} is already active in pid {pid}, but {file} is another build of it (build-id {new}, \
         the active one has {active}): disable it first (`relive disable {pid} {name}`), or give the new \
         version another name",
        name = pf.name,
        file = pf.path.display(),
        new = pf.build_id.as_deref().unwrap_or("?"),
    )
}

/// One resolved func.
pub struct Resolved {
    pub func: FuncId,
    pub decl: relive_elf::manifest::FuncDecl,
    pub old: Range,
    /// Registers the original preserves although the ABI lets it clobber them (DESIGN §4.3a).
    pub preserve: RegSet,
}

pub struct PreparedObject {
    pub decl: ObjectDecl,
    pub id: ObjectId,
    pub loaded: bool,
    pub funcs: Vec<Resolved>,
}

/// Everything `apply` needs after the checks, and every problem found.
#[derive(Default)]
pub struct Prepared {
    pub objects: Vec<PreparedObject>,
    pub plans: Vec<(FuncId, EntryPlan)>,
    /// (what, problem): general problems use the object or patch as `what`, func problems the func name.
    pub problems: Vec<(String, String)>,
    pub general: Vec<Verdict>,
    pub func_notes: Vec<(String, String)>,
    /// The same build of this patch is already active (apply would do nothing).
    pub already_active: bool,
    name_for_spec: String,
    replace: bool,
    stacking: bool,
    states: Vec<(u64, u32)>,
}

impl Prepared {
    pub fn refusals(&self) -> impl Iterator<Item = String> + '_ {
        self.problems.iter().map(|(w, p)| {
            if w.is_empty() {
                p.clone()
            } else {
                format!("{w}: {p}")
            }
        })
    }

    /// For a replace patch (R1): the active patches it disables, and the functions of theirs it does not
    /// carry, which go back to the original code (`object:function`). `None` for any other patch, or when
    /// nothing else is active.
    pub fn replace_effect(&self, doc: &Doc, pf: &PatchFile) -> Option<(Vec<String>, Vec<String>)> {
        if !pf.manifest.replace {
            return None;
        }
        let carried: Vec<&FuncId> = self
            .objects
            .iter()
            .flat_map(|o| o.funcs.iter().map(|r| &r.func))
            .collect();
        let mut replaced = vec![];
        let mut reverting = vec![];
        for q in doc.model.patches().iter().filter(|q| q.name != pf.name) {
            replaced.push(q.name.clone());
            for (_, f) in q.funcs().filter(|(_, f)| !f.nop) {
                if !carried.contains(&&f.id) {
                    let obj = f.id.object.to_string();
                    let short = obj.rsplit('/').next().unwrap_or(&obj).to_string();
                    let name = format!("{short}:{}", f.id.name);
                    if !reverting.contains(&name) {
                        reverting.push(name);
                    }
                }
            }
        }
        (!replaced.is_empty()).then_some((replaced, reverting))
    }

    /// The spec with the new ranges of the loaded library.
    pub fn spec(&self, rec: &PatchRec) -> PatchSpec {
        self.spec_with(|f| {
            rec.objects
                .iter()
                .flat_map(|o| o.funcs.iter())
                .find(|r| r.func == *f)
                .map(|r| Range::new(r.new_addr, r.new_addr + r.new_size.max(1)))
        })
    }

    fn spec_with(&self, new: impl Fn(&FuncId) -> Option<Range>) -> PatchSpec {
        let m = |o: &PreparedObject| {
            let c = &o.decl.callbacks;
            let cb = CallbackSet {
                pre_patch: c.pre_patch.is_some(),
                post_patch: c.post_patch.is_some(),
                pre_unpatch: c.pre_unpatch.is_some(),
                post_unpatch: c.post_unpatch.is_some(),
            };
            let mut spec = ObjectSpec::new(o.id.clone()).loaded(o.loaded).callbacks(cb);
            if o.loaded {
                for r in &o.funcs {
                    let n = new(&r.func).unwrap_or(r.old);
                    spec = spec.func(FuncSpec::new(&r.decl.old, r.old, n).sympos(r.decl.sympos));
                }
            } else {
                for f in &o.decl.funcs {
                    spec = spec.func(FuncSpec::unresolved(&f.old).sympos(f.sympos));
                }
            }
            spec
        };
        let mut p = PatchSpec::new(&self.name_for_spec)
            .replace(self.replace)
            .stacking(self.stacking);
        for o in &self.objects {
            p = p.object(m(o));
        }
        for s in &self.states {
            p = p.state(s.0, s.1);
        }
        p
    }
}

// The spec's patch-level fields, kept on Prepared so that `spec` needs no manifest.
impl Prepared {
    fn set_patch(&mut self, m: &Manifest, allow_stacking: bool) {
        self.name_for_spec = m.name.clone();
        self.replace = m.replace;
        self.stacking = m.stacking || allow_stacking;
        self.states = m.states.iter().map(|s| (s.id, s.version)).collect();
    }
}

fn module_for<'a>(image: &'a ProcessImage, decl: &ObjectDecl) -> Option<&'a LoadedModule> {
    if decl.is_exe() {
        image.main_module()
    } else {
        image.module_named(&decl.name)
    }
}

/// The module an import names (`exe` is the main executable), whether or not a patched object declares it.
fn import_module<'a>(image: &'a ProcessImage, object: &str) -> Option<&'a LoadedModule> {
    if object == "exe" {
        image.main_module()
    } else {
        image.module_named(object)
    }
}

/// An import whose object the process has not loaded cannot fill its slot (the patch would read 0).
fn import_not_loaded(pid: i32, patch: &str, imp: &relive_elf::manifest::ImportDecl) -> String {
    format!(
        "patch {patch} imports {} (sympos {}) from object {}, which pid {pid} has not loaded, so its slot {} \
         would stay 0; load {} first or drop the import from the patch",
        imp.name, imp.sympos, imp.object, imp.slot, imp.object
    )
}

/// The registers the original at `old_avma` leaves alone although the ABI lets it clobber them,
/// transitively over its direct callees in `m` (DESIGN §4.3a). Only callers that see the function's body
/// can rely on them (GCC -fipa-ra on a function that binds locally): local (static) functions and every
/// function of the executable; exported functions of shared libraries are interposable, so their callers
/// cannot, and the caller of this function decides which case applies.
fn preserve_set(m: &LoadedModule, sym: &relive_elf::Symbol, old_avma: u64, name: &str, nvec: u32) -> RegSet {
    let Some(bytes) = function_bytes(m, sym.addr, sym.size) else {
        return RegSet::EMPTY;
    };
    let fb = FunctionBytes {
        name,
        addr: old_avma,
        bytes,
    };
    let mut callee = |a: u64| -> Option<FunctionCode> {
        let (s, _) = m.symbols.lookup(relive_elf::Avma(a).to_svma(m.bias))?;
        let b = function_bytes(m, s.addr, s.size)?;
        Some(FunctionCode {
            name: s.name.clone(),
            addr: s.addr.to_avma(m.bias).0,
            bytes: b.to_vec(),
        })
    };
    match relive_x86::clobbered_registers(fb, &mut callee) {
        Ok(c) => c.to_preserve(nvec),
        Err(_) => RegSet::EMPTY,
    }
}

fn function_bytes(m: &LoadedModule, addr: Svma, size: u64) -> Option<&[u8]> {
    let off = m.image.svma_to_offset(addr)? as usize;
    m.data.get(off..off + size as usize)
}

/// The NOPs GCC put before the function at `addr` (`-fpatchable-function-entry=N,M`: M of them), found
/// through the module's `__patchable_function_entries`, which records where each function's pad starts
/// (relocated in memory, so read from the process). `None` when the module has no such record for it.
fn pre_entry_pad(pid: i32, m: &LoadedModule, addr: u64) -> Option<Vec<u8>> {
    let sec = m.image.patchable_entries.as_ref()?;
    let len = (sec.svma.end - sec.svma.start) as usize;
    if len == 0 || len > 1 << 24 {
        return None;
    }
    let mut raw = vec![0u8; len];
    relive_proc::read_memory(pid, sec.svma.start.wrapping_add(m.bias), &mut raw).ok()?;
    // The pad of this function starts at most 64 bytes before its symbol; one recorded at the symbol itself
    // means it has no NOPs before it.
    let entries = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
    let mut start = None;
    for e in entries {
        if e == addr {
            return None;
        }
        if e < addr && addr - e <= 64 {
            start = start.max(Some(e));
        }
    }
    let start = start?;
    let mut pad = vec![0u8; (addr - start) as usize];
    relive_proc::read_memory(pid, start, &mut pad).ok()?;
    Some(pad)
}

fn vector_width() -> (u32, VectorWidth) {
    if std::arch::is_x86_feature_detected!("avx512f") {
        (32, VectorWidth::Zmm)
    } else if std::arch::is_x86_feature_detected!("avx") {
        (16, VectorWidth::Ymm)
    } else {
        (16, VectorWidth::Xmm)
    }
}

/// Runs every check of `apply` (DESIGN §3 steps 1–4) against the image and registry document, changing
/// nothing. Problems are collected, not returned early, so `check` can list them all.
pub fn prepare_with(
    pid: i32,
    image: &ProcessImage,
    doc: &Doc,
    pf: &PatchFile,
    allow_stacking: bool,
) -> Prepared {
    let mut p = Prepared::default();
    p.set_patch(&pf.manifest, allow_stacking);
    let (nvec, _) = vector_width();
    for decl in &pf.manifest.objects {
        let Some(m) = module_for(image, decl) else {
            let id = match &decl.build_id {
                Some(b) => ObjectId::from_build_id(b).with_soname(&decl.name),
                None => ObjectId::from_soname(&decl.name),
            };
            p.general.push(Verdict {
                what: format!("object {}", decl.name),
                ok: true,
                detail: format!(
                    "not loaded in pid {pid}: accepted, but nothing in it is patched, now or if it is loaded \
                     later (relive does not watch for objects loading yet, DESIGN §5); if the name is a typo, \
                     compare it with /proc/{pid}/maps"
                ),
            });
            p.objects.push(PreparedObject {
                decl: decl.clone(),
                id,
                loaded: false,
                funcs: vec![],
            });
            continue;
        };
        let have = m.image.build_id_hex();
        let mut id = match &have {
            Some(b) => ObjectId::from_build_id(b),
            None => ObjectId::default(),
        };
        if let Some(so) = &m.image.soname {
            id = id.with_soname(so);
        }
        id = id.with_path(&m.path);
        let bid_ok = match (&decl.build_id, &have) {
            (Some(want), Some(have)) => want.eq_ignore_ascii_case(have),
            (Some(_), None) => false,
            (None, _) => true,
        };
        if bid_ok {
            p.general.push(Verdict {
                what: format!("object {} build-id", decl.name),
                ok: true,
                detail: format!(
                    "{} maps {} ({})",
                    pid,
                    m.path,
                    have.as_deref().unwrap_or("no build-id, unpinned")
                ),
            });
        } else {
            let msg = format!(
                "patch {} was built for build-id {} of {}, but pid {pid} maps {} with build-id {}; rebuild the patch \
                 against the binary the process runs",
                pf.name,
                decl.build_id.as_deref().unwrap_or("?"),
                decl.name,
                m.path,
                have.as_deref().unwrap_or("none")
            );
            p.general.push(Verdict {
                what: format!("object {} build-id", decl.name),
                ok: false,
                detail: msg.clone(),
            });
            p.problems.push((format!("object {}", decl.name), msg));
            continue;
        }
        // Functions of the executable bind locally even when exported (nothing can interpose them),
        // so GCC's -fipa-ra lets their callers rely on the registers they leave alone (DESIGN §4.3a).
        let in_executable = image.main_module().is_some_and(|e| e.path == m.path);
        let mut funcs = vec![];
        for f in &decl.funcs {
            let label = format!("{}:{}", decl.name, f.old);
            // D5 resolution.
            let sym = match m.symbols.resolve(&m.path, &f.old, f.sympos) {
                Ok(s) => s.clone(),
                Err(e) => {
                    p.problems.push((label.clone(), format!("pid {pid}: {e}")));
                    continue;
                }
            };
            if pf.symbols.functions_named(&f.new).next().is_none() {
                p.problems.push((
                    label.clone(),
                    format!(
                        "the patch {} does not define the new function {}",
                        pf.path.display(),
                        f.new
                    ),
                ));
                continue;
            }
            // The agent finds the new version with dlsym: a `static` or hidden one is not there.
            if pf.linkage.as_ref().is_some_and(|l| !l.exported.contains(&f.new)) {
                p.problems.push((
                    label.clone(),
                    format!(
                        "the new function {} is defined in the patch {} but not exported (is it `static`, or of \
                         hidden visibility?); relive looks it up with dlsym: define it without `static`, with \
                         default visibility",
                        f.new,
                        pf.path.display()
                    ),
                ));
                continue;
            }
            let old_avma = sym.addr.to_avma(m.bias).0;
            let old = Range::new(old_avma, old_avma + sym.size.max(1));
            let func = FuncId::new(id.clone(), &f.old, f.sympos);
            p.func_notes.push((
                label.clone(),
                format!("resolved to {old_avma:#x} ({} bytes) in {}", sym.size, m.path),
            ));
            // Entry analysis (x86), unless an earlier patch already prepared this entry.
            let mut preserve = RegSet::EMPTY;
            if let Some(rec) = doc.entry(&func) {
                p.func_notes.push((
                    label.clone(),
                    format!("entry already managed by relive (stub {:#x})", rec.stub),
                ));
                p.plans.push((func.clone(), rec.plan.plan()));
            } else {
                let Some(bytes) = function_bytes(m, sym.addr, sym.size) else {
                    p.problems.push((
                        label.clone(),
                        format!("cannot read the bytes of {} in {}", f.old, m.path),
                    ));
                    continue;
                };
                let fb = FunctionBytes {
                    name: &f.old,
                    addr: old_avma,
                    bytes,
                };
                // GCC's split-off cold part (`f.cold`, `f.cold.N`) jumps back into f: a jump into the
                // overwritten bytes refuses the entry. Jump tables are read from the target's memory.
                let cold_prefix = format!("{}.cold", f.old);
                let cold: Vec<(String, u64, &[u8])> = m
                    .symbols
                    .symbols
                    .iter()
                    .filter(|c| c.kind.is_function() && c.name.starts_with(&cold_prefix))
                    .filter_map(|c| {
                        let b = function_bytes(m, c.addr, c.size)?;
                        Some((c.name.clone(), c.addr.to_avma(m.bias).0, b))
                    })
                    .collect();
                let related: Vec<FunctionBytes> = cold
                    .iter()
                    .map(|(name, addr, bytes)| FunctionBytes {
                        name,
                        addr: *addr,
                        bytes,
                    })
                    .collect();
                let read_data = |addr: u64, len: usize| {
                    let mut b = vec![0u8; len];
                    relive_proc::read_memory(pid, addr, &mut b).ok().map(|_| b)
                };
                let pre_pad = pre_entry_pad(pid, m, old_avma).unwrap_or_default();
                let ctx = EntryContext {
                    pre_pad: &pre_pad,
                    related: &related,
                    read_data: Some(&read_data),
                    ..EntryContext::default()
                };
                match relive_x86::analyze_entry(fb, &ctx) {
                    Ok(plan) => {
                        // The target's memory must still hold what the file says (no foreign patcher).
                        let mut cur = vec![0u8; plan.original.len()];
                        if relive_proc::read_memory(pid, plan.site, &mut cur).is_ok() && cur != plan.original
                        {
                            p.problems.push((
                                label.clone(),
                                format!(
                                    "the entry of {} at {:#x} in pid {pid} holds {cur:02x?}, not the file's {:02x?}: \
                                     another tool changed it",
                                    f.old, plan.site, plan.original
                                ),
                            ));
                            continue;
                        }
                        p.func_notes.push((
                            label.clone(),
                            format!("entry at {:#x}: {}", plan.site, kind_name(&plan.kind)),
                        ));
                        p.plans.push((func.clone(), plan));
                    }
                    Err(e) => {
                        p.problems.push((label.clone(), format!("pid {pid}: {e}")));
                        continue;
                    }
                }
            }
            // DESIGN §4.3a: registers callers may rely on. Computed from the file's bytes of the
            // original, also when an earlier patch already manages the entry (a replace patch's new
            // version needs its own thunk).
            if !sym.global || in_executable {
                preserve = preserve_set(m, &sym, old_avma, &f.old, nvec);
                if !preserve.is_empty() {
                    p.func_notes
                        .push((label.clone(), format!("callers may rely on {preserve}: thunk")));
                }
            }
            funcs.push(Resolved {
                func,
                decl: f.clone(),
                old,
                preserve,
            });
        }
        p.objects.push(PreparedObject {
            decl: decl.clone(),
            id,
            loaded: true,
            funcs,
        });
    }
    // Imports must resolve too.
    for imp in &pf.manifest.imports {
        match import_module(image, &imp.object) {
            None => p.problems.push((
                format!("import {}:{}", imp.object, imp.name),
                import_not_loaded(pid, &pf.name, imp),
            )),
            Some(m) => match m.symbols.resolve_import(&m.path, &imp.name, imp.sympos) {
                Ok(sym) => p.general.push(Verdict {
                    what: format!("import {}:{}", imp.object, imp.name),
                    ok: true,
                    detail: format!(
                        "resolved to {:#x} in {} (slot {})",
                        sym.addr.to_avma(m.bias).0,
                        m.path,
                        imp.slot
                    ),
                }),
                Err(e) => p.problems.push((
                    format!("import {}:{}", imp.object, imp.name),
                    format!("pid {pid}: {e}"),
                )),
            },
        }
    }
    // L1/K5/ST3: the model's checks (ranges of the new code are not needed for them).
    if p.problems.is_empty() {
        let spec = p.spec_with(|_| None);
        match doc.model.check_enable(&spec) {
            Ok(()) => p.general.push(Verdict {
                what: "conflicts, states, busy (L1, K5, ST3)".into(),
                ok: true,
                detail: format!(
                    "{} active patch(es), no transition pending",
                    doc.model.patches().len()
                ),
            }),
            // The same build already active: apply answers "already active" and changes nothing; another
            // build under the same name is refused.
            Err(relive_core::Error::AlreadyExists { .. }) => match other_build_of_active(image, doc, pf) {
                None => {
                    p.already_active = true;
                    p.general.push(Verdict {
                        what: "conflicts, states, busy (L1, K5, ST3)".into(),
                        ok: true,
                        detail: format!(
                            "patch {} is already active in pid {pid}: apply would do nothing",
                            pf.name
                        ),
                    });
                }
                Some(active) => {
                    let msg = other_build_message(pid, pf, &active);
                    p.general.push(Verdict {
                        what: "conflicts, states, busy (L1, K5, ST3)".into(),
                        ok: false,
                        detail: msg.clone(),
                    });
                    p.problems.push((String::new(), msg));
                }
            },
            Err(e) => {
                let msg = format!("pid {pid}: {e}");
                p.general.push(Verdict {
                    what: "conflicts, states, busy (L1, K5, ST3)".into(),
                    ok: false,
                    detail: msg.clone(),
                });
                // The model's message names the patch already: no "patch X:" label in front of it.
                p.problems.push((String::new(), msg));
            }
        }
    }
    p
}

/// `apply`'s checks in a session.
pub fn prepare(s: &Session, pf: &PatchFile, allow_stacking: bool, _all: bool) -> Result<Prepared, Fail> {
    Ok(prepare_with(s.pid, &s.image, &s.doc, pf, allow_stacking))
}

/// Loads the patch library through the agent, resolves its new functions, writes its imports.
pub fn load(s: &mut Session, pf: &PatchFile, p: &Prepared) -> Result<PatchRec, Fail> {
    let pid = s.pid;
    let path = pf.path.to_string_lossy().into_owned();
    let lib = match s.conn.load_path(&path) {
        Ok(l) => l,
        // The target may live in another mount namespace: hand it the bytes (DESIGN §4.6).
        Err(first) => {
            let bytes =
                std::fs::read(&pf.path).map_err(|e| Fail::Error(anyhow!("cannot read {path}: {e}")))?;
            s.conn.load_bytes(&pf.name, &bytes).map_err(|e| {
                // The first attempt names the file; the second only a /proc/self/fd path. Keep the first
                // unless the target merely could not open the file (another mount namespace).
                let first = first.to_string();
                let msg = if first.contains("cannot open shared object file") {
                    e.to_string()
                } else {
                    first
                };
                let hint = if msg.contains("undefined symbol") {
                    format!(
                        "; the patch uses a symbol no object of pid {pid} exports: reach a static or \
                         non-exported function or variable of the target through RELIVE_IMPORT, or build the \
                         target with -rdynamic (`relive check` finds this before apply does)"
                    )
                } else {
                    String::new()
                };
                Fail::Error(anyhow!("loading patch {} into pid {pid}: {msg}{hint}", pf.name))
            })?
        }
    };
    let mut rec = PatchRec {
        name: pf.name.clone(),
        path,
        handle: lib.handle,
        base: lib.base,
        objects: vec![],
    };
    let fail = |s: &mut Session, e: String| {
        let _ = s.conn.unload(lib.handle);
        Fail::Error(anyhow!(e))
    };
    for o in &p.objects {
        let c = &o.decl.callbacks;
        let mut orec = ObjRec {
            id: o.id.clone(),
            pre_patch: c.pre_patch.clone(),
            post_patch: c.post_patch.clone(),
            pre_unpatch: c.pre_unpatch.clone(),
            post_unpatch: c.post_unpatch.clone(),
            funcs: vec![],
        };
        for r in &o.funcs {
            let addr = match s.conn.dlsym(lib.handle, &r.decl.new) {
                Ok(a) => a,
                Err(e) => {
                    return Err(fail(
                        s,
                        format!("patch {}: new function {} in pid {pid}: {e}", pf.name, r.decl.new),
                    ));
                }
            };
            let size = pf
                .symbols
                .functions_named(&r.decl.new)
                .next()
                .map_or(1, |s| s.size.max(1));
            orec.funcs.push(FuncRec {
                func: r.func.clone(),
                new_symbol: r.decl.new.clone(),
                new_addr: addr,
                new_size: size,
                thunk: None,
                thunk_frame: None,
            });
        }
        for cb in [&c.pre_patch, &c.post_patch, &c.pre_unpatch, &c.post_unpatch]
            .into_iter()
            .flatten()
        {
            if let Err(e) = s.conn.dlsym(lib.handle, cb) {
                return Err(fail(
                    s,
                    format!("patch {}: callback {cb} in pid {pid}: {e}", pf.name),
                ));
            }
        }
        rec.objects.push(orec);
    }
    for imp in &pf.manifest.imports {
        let Some(m) = import_module(&s.image, &imp.object) else {
            let msg = import_not_loaded(pid, &pf.name, imp);
            return Err(fail(s, msg));
        };
        let sym = match m.symbols.resolve_import(&m.path, &imp.name, imp.sympos) {
            Ok(sym) => sym.addr.to_avma(m.bias).0,
            Err(e) => return Err(fail(s, format!("import {} of patch {}: {e}", imp.name, pf.name))),
        };
        if let Err(e) = s.conn.set_import(lib.handle, &imp.slot, sym) {
            return Err(fail(
                s,
                format!("import slot {} of patch {} in pid {pid}: {e}", imp.slot, pf.name),
            ));
        }
    }
    Ok(rec)
}

/// The loaded code of a new version (`size` bytes at `addr` in `pid`), if it can be read.
fn read_new_version(pid: i32, addr: u64, size: u64) -> Option<Vec<u8>> {
    if size == 0 || size > 1 << 20 {
        return None;
    }
    let mut bytes = vec![0u8; size as usize];
    relive_proc::read_memory(pid, addr, &mut bytes).ok()?;
    Some(bytes)
}

/// The registers the new version at `addr` may clobber, when they are known: it calls nothing, or only code
/// the analysis can see. `None` means "any register".
fn new_version_clobbers(addr: u64, bytes: &[u8]) -> Option<RegSet> {
    let fb = FunctionBytes {
        name: "new version",
        addr,
        bytes,
    };
    match relive_x86::clobbered_registers(fb, &mut |_| None) {
        Ok(relive_x86::Clobbers::Known(set)) => Some(set),
        _ => None,
    }
}

/// Code pages of one patch, filled in 64-byte slots: thunks near the new versions, leaf copies near the
/// entries. Each page is recorded in the document (unmapped with the patch) and known to the unwinder.
struct CodePages {
    pages: Vec<(u64, u64)>, // (base, used)
}

impl CodePages {
    /// A slot of `len` bytes in a page all of whose bytes `ok` accepts, mapping a new page near `near` if none
    /// has room.
    fn slot(
        &mut self,
        s: &mut Session,
        patch: &str,
        near: u64,
        len: u64,
        ok: impl Fn(u64) -> bool,
    ) -> Result<u64, Fail> {
        let len = len.div_ceil(64) * 64;
        let found = self
            .pages
            .iter_mut()
            .find(|(b, used)| *used + len <= THUNK_PAGE && ok(*b) && ok(*b + THUNK_PAGE));
        let (base, used) = match found {
            Some(pg) => pg,
            None => {
                let b = s
                    .conn
                    .map_stubs(near, THUNK_PAGE)
                    .map_err(|e| Fail::Error(anyhow!(e)))?;
                s.doc.thunk_pages.push((patch.to_owned(), b));
                s.unwinder
                    .add_code_range(b..b + THUNK_PAGE, format!("relive thunk of patch {patch}"));
                self.pages.push((b, 0));
                self.pages.last_mut().expect("just pushed")
            }
        };
        let at = *base + *used;
        *used += len;
        Ok(at)
    }
}

/// Builds what calls of the patch's functions enter instead of the new version itself, in pages of the patch:
/// - a register-preserving thunk (DESIGN §4.3a) where callers rely on registers the new version clobbers;
/// - otherwise, when the entry's `jmp rel32` cannot reach the new version (the library is loaded beyond
///   ±2 GiB) and the new version is a frameless leaf, a copy of it within reach, so that a completed patch
///   costs one direct jump (DESIGN §4.4) instead of a jump to an absolute jump.
pub fn make_thunks(s: &mut Session, patch: &str, p: &Prepared) -> Result<(), Fail> {
    let (_, width) = vector_width();
    let pid = s.pid;
    let mut pages = CodePages { pages: vec![] };
    for o in &p.objects {
        for r in &o.funcs {
            let Some((target, new_size)) = s.doc.patch(patch).and_then(|pr| {
                pr.objects
                    .iter()
                    .flat_map(|o| o.funcs.iter())
                    .find(|f| f.func == r.func)
                    .map(|f| (f.new_addr, f.new_size))
            }) else {
                continue;
            };
            let code = read_new_version(pid, target, new_size);
            // Only what the new version may clobber needs saving: analyse its loaded code (a call out of
            // it, through the PLT or otherwise, is unknown and means "everything"; DESIGN §4.3a).
            let preserve = if r.preserve.is_empty() {
                r.preserve
            } else {
                code.as_deref()
                    .and_then(|c| new_version_clobbers(target, c))
                    .map(|c| r.preserve.minus(r.preserve.minus(c)))
                    .unwrap_or(r.preserve)
            };
            let mut frame = None;
            let (at, bytes) = if !preserve.is_empty() {
                let at = pages.slot(s, patch, target, 512, |a| relive_x86::rel32_reaches(a, target))?;
                let t = relive_x86::encode_preserving_thunk(at, target, preserve, width, 0)
                    .map_err(|e| Fail::Error(anyhow!("pid {pid}: {e}")))?;
                frame = Some((at + t.return_offset as u64, t.caller_ra_offset as u64));
                (at, t.code)
            } else {
                let plan = p
                    .plans
                    .iter()
                    .find(|(f, _)| *f == r.func)
                    .map(|(_, pl)| pl.clone())
                    .or_else(|| s.doc.entry(&r.func).map(|e| e.plan.plan()));
                let Some(plan) = plan else { continue };
                if plan.reaches(target) {
                    continue;
                }
                let Some((c, ins)) = code
                    .as_deref()
                    .and_then(|c| Some((c, relive_x86::relocatable_leaf(target, c)?)))
                else {
                    continue;
                };
                // The copy's size does not depend on where it goes (its branches stay inside it): encode it
                // once to size its slot, then for real at the slot.
                let copy_at = |at: u64| {
                    relive_x86::relocate_code(c, &ins, at, None)
                        .map_err(|e| Fail::Error(anyhow!("pid {pid}: copy of {}: {e}", r.func.name)))
                };
                let len = copy_at(plan.jump_site())?.code.len() as u64;
                let at = pages.slot(s, patch, plan.jump_site(), len, |a| plan.reaches(a))?;
                let copy = copy_at(at)?;
                if copy.code.len() as u64 > len.div_ceil(64) * 64 {
                    return Err(Fail::Error(anyhow!(
                        "pid {pid}: the copy of {} grew from {len} to {} bytes at {at:#x} (internal error)",
                        r.func.name,
                        copy.code.len()
                    )));
                }
                (at, copy.code)
            };
            relive_proc::write_code(pid, at, &bytes)
                .map_err(|e| super::session::proc_err(pid, "cannot write a thunk", e))?;
            // C5a: a thread inside a thunk or a copy is inside the function it serves. Its innermost frame
            // looks like a stub's (return address at [rsp]), so without this a thread stopped there could
            // be switched to the other side and then run the version it just left (a mix), or, once the
            // patch is gone, jump into an unmapped page.
            s.doc
                .model
                .register_stub(&r.func, relive_core::Range::new(at, at + bytes.len() as u64))
                .map_err(|e| Fail::Error(anyhow!("pid {pid}: {e}")))?;
            if let Some(pr) = s.doc.patches.iter_mut().find(|x| x.name == patch) {
                for f in pr.objects.iter_mut().flat_map(|o| o.funcs.iter_mut()) {
                    if f.func == r.func {
                        f.thunk = Some(at);
                        f.thunk_frame = frame;
                    }
                }
            }
            // A thread inside the new version has the thunk's frame on its stack: the unwinder steps
            // through it with the frame size the encoder reports.
            if let Some((ra, size)) = frame {
                s.unwinder
                    .add_return_site(ra, size, format!("relive thunk of patch {patch}"));
            }
        }
    }
    Ok(())
}

/// `relive check`: read-only (no injection, no lock, no write).
pub fn check(pid: i32, pf: &PatchFile, allow_stacking: bool) -> Result<CheckReport, Fail> {
    super::session::ensure_process(pid)?;
    let image = ProcessImage::load(pid, &relive_proc::ImageOptions::default())
        .map_err(|e| super::session::proc_err(pid, "cannot map modules", e))?;
    let mut general = vec![];
    let doc = match relive_proc::agent::find_agent(pid) {
        Ok(loc) => {
            let snap = relive_proc::agent::read_registry(&loc).map_err(|e| Fail::Error(anyhow!(e)))?;
            general.push(Verdict {
                what: "agent and TLS room".into(),
                ok: true,
                detail: format!(
                    "agent loaded from {} (TLS slot at tpoff {})",
                    loc.path, snap.header.tpoff
                ),
            });
            if snap.body.is_empty() {
                Doc::default()
            } else {
                serde_json::from_slice::<Doc>(&snap.body).map_err(|e| {
                    Fail::Error(anyhow!("cannot decode the registry document of pid {pid}: {e}"))
                })?
            }
        }
        Err(relive_proc::agent::AgentError::NotLoaded { .. }) => {
            general.push(Verdict {
                what: "agent and TLS room".into(),
                ok: true,
                detail:
                    "no agent yet: apply injects it (its IE TLS is 8 bytes of glibc's static-TLS reserve)"
                        .into(),
            });
            Doc::default()
        }
        Err(e) => return Err(Fail::Error(anyhow!(e))),
    };
    let mut p = prepare_with(pid, &image, &doc, pf, allow_stacking);
    general.extend(p.general.iter().cloned());
    if let Some(note) = no_function_note(pf) {
        general.push(Verdict {
            what: "functions".into(),
            ok: true,
            detail: note,
        });
    }
    if let Some((replaced, reverting)) = p.replace_effect(&doc, pf) {
        general.push(Verdict {
            what: "replace (R1)".into(),
            ok: true,
            detail: replace_text(&replaced, &reverting),
        });
    }
    match link_check(pid, &image, pf) {
        Ok(detail) => general.push(Verdict {
            what: "dynamic linking".into(),
            ok: true,
            detail,
        }),
        Err(problem) => p.problems.push(("dynamic linking".into(), problem)),
    }
    let mut funcs: Vec<FuncVerdict> = vec![];
    for decl in &pf.manifest.objects {
        // An object refused as a whole (a wrong build-id) has its funcs left unchecked: not "ok".
        let object_refused = p
            .problems
            .iter()
            .any(|(w, _)| *w == format!("object {}", decl.name));
        for f in &decl.funcs {
            let label = format!("{}:{}", decl.name, f.old);
            if object_refused {
                funcs.push(FuncVerdict {
                    func: label,
                    ok: false,
                    details: vec![format!(
                        "not checked: object {} is refused (see above)",
                        decl.name
                    )],
                });
                continue;
            }
            let mut details: Vec<String> = p
                .func_notes
                .iter()
                .filter(|(l, _)| *l == label)
                .map(|(_, d)| d.clone())
                .collect();
            let problems: Vec<String> = p
                .problems
                .iter()
                .filter(|(l, _)| *l == label)
                .map(|(_, d)| d.clone())
                .collect();
            let ok = problems.is_empty();
            details.extend(problems);
            funcs.push(FuncVerdict {
                func: label,
                ok,
                details,
            });
        }
    }
    for (what, problem) in &p.problems {
        if !funcs.iter().any(|f| f.func == *what) && !general.iter().any(|g| g.detail == *problem) {
            general.push(Verdict {
                what: what.clone(),
                ok: false,
                detail: problem.clone(),
            });
        }
    }
    let ok = p.problems.is_empty();
    Ok(CheckReport {
        pid,
        patch: pf.name.clone(),
        ok,
        already_active: p.already_active,
        general,
        funcs,
    })
}

/// What a replace patch does to the patches it replaces, in words (check's verdict, apply's progress).
pub fn replace_text(replaced: &[String], reverting: &[String]) -> String {
    let mut t = format!(
        "as a replace patch it disables {} {} (their unpatch callbacks do not run)",
        if replaced.len() == 1 { "patch" } else { "patches" },
        replaced.join(", ")
    );
    if reverting.is_empty() {
        t.push_str("; it carries every function they patch");
    } else {
        t.push_str(&format!(
            "; {} it does not carry go{} back to the original code: {}",
            if reverting.len() == 1 {
                "the function"
            } else {
                "the functions"
            },
            if reverting.len() == 1 { "es" } else { "" },
            reverting.join(", ")
        ));
    }
    t
}

/// For a patch that declares no function (legal, SPEC D4: an object's funcs may be empty): what applying
/// it does, since a forgotten RELIVE_FUNC looks just like it.
pub fn no_function_note(pf: &PatchFile) -> Option<String> {
    if pf.manifest.objects.iter().any(|o| !o.funcs.is_empty()) {
        return None;
    }
    Some(format!(
        "patch {} declares no function (no RELIVE_FUNC): applying it only runs its callbacks and sets its \
         states{}",
        pf.name,
        if pf.manifest.replace {
            ", and, as a replace patch, disables every other patch (their functions go back to the original)"
        } else {
            "; nothing is redirected"
        }
    ))
}

/// Whether the patch links in `pid` (what the target's `dlopen` would say): every symbol it needs and does
/// not define must be exported by an object the process has loaded, by the agent, or by a library the patch
/// itself names (`DT_NEEDED`). `Err` is the refusal; `Ok` the verdict's detail. Read-only: run by `check`
/// and `apply` before anything changes in the target (a lookup of a few names per loaded object).
pub fn link_check(pid: i32, image: &ProcessImage, pf: &PatchFile) -> Result<String, String> {
    let Some(l) = &pf.linkage else {
        return Ok("not checked: the patch's dynamic symbols do not parse".into());
    };
    // A needed library the process has not loaded: dlopen loads it, and what it exports is unknown here.
    let unloaded: Vec<&String> = l
        .needed
        .iter()
        .filter(|n| !image.modules.iter().any(|m| m.matches(n)))
        .collect();
    if let Some(n) = unloaded.first() {
        return Ok(format!(
            "not checked: the patch needs {n}, which pid {pid} has not loaded (its dlopen loads it)"
        ));
    }
    let mut missing: Vec<String> = l
        .undefined
        .iter()
        .filter(|u| !l.exported.contains(*u))
        .cloned()
        .collect();
    for m in &image.modules {
        relive_elf::remove_exported(&m.data, &mut missing);
    }
    // The agent: loaded already (above), or injected by apply.
    if !missing.is_empty()
        && let Ok(agent) = relive_proc::agent::agent_library_path()
        && let Ok(bytes) = std::fs::read(agent)
    {
        relive_elf::remove_exported(&bytes, &mut missing);
    }
    missing.sort();
    match missing.as_slice() {
        [] if l.undefined.is_empty() => Ok("the patch needs no symbol from other objects".into()),
        [] => Ok(format!(
            "every symbol it needs ({}) is exported in pid {pid}",
            l.undefined.len()
        )),
        names => Err(format!(
            "pid {pid}: the patch {} needs {}, which no object of pid {pid} exports, so its dlopen would fail \
             (undefined symbol); reach a static or non-exported function or variable of the target through \
             RELIVE_IMPORT, or build the target with -rdynamic",
            pf.path.display(),
            names.join(", ")
        )),
    }
}

fn kind_name(k: &relive_x86::EntryKind) -> String {
    match k {
        relive_x86::EntryKind::Pad { pad_len, .. } => format!("patchable NOP pad of {pad_len} bytes"),
        relive_x86::EntryKind::PrePad { pad_len, .. } => format!("{pad_len}-byte pad plus a pre-entry pad"),
        relive_x86::EntryKind::Displaced { instructions, .. } => {
            let n = instructions.len();
            let noun = if n == 1 { "instruction" } else { "instructions" };
            format!("{n} displaced {noun}, relocated into the stub")
        }
    }
}
