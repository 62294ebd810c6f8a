//! The transition driver (issue 5; DESIGN §3, walk steps 1–10): drives relive-core's model against a live
//! process through the agent, the process layer and the x86 encoder.
//!
//! - [`apply`]: manifest → map and resolve (build-ids, D5 sympos) → core checks (busy, conflict, states) →
//!   entry analysis → agent → patch `dlopen` → init (pre_patch callbacks, TLS init image) → stubs and
//!   entries in one stop-all → per-thread switching → completion.
//! - [`disable`]: L4, or L6 (reverse) on the patch in transition.
//! - [`transition`]: drive a pending transition (after `--no-wait`, a timeout, or a killed controller).
//! - [`force`]: C11, forcing the pending transition.
//! - [`check`]: every verification of `apply`, changing nothing.
//!
//! Write-ahead (DESIGN §4.8): the registry document (relive-core's model plus the driver's entries and
//! libraries, [`doc::Doc`]) is written before each step acts, and every step is idempotent against the
//! target's memory (entries are compared with their actual bytes, thread states are re-read from their
//! slots), so a controller killed at any point leaves a target the next command finishes or reverses.
//!
//! Thread states: each transition gets fresh slot values ([`doc::slot_value`]), so the IDLE of DESIGN §4.4 is
//! "any value from an earlier transition". Init's "every thread UNPATCHED" (C2) and completion's "every thread
//! IDLE" (L3.5) therefore hold without stopping any thread: the dispatchers read a stale value as the
//! starting state, and after completion no dispatcher reads the slot at all.

pub mod doc;
pub mod entries;
pub mod patchfile;
pub mod progress;
pub mod session;
pub mod states;
pub mod switch;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use relive_core::{Action, CallbackKind, EntryTarget, FuncId, Output, PatchState, Step};
use serde::Serialize;

use self::doc::PatchRec;
use self::entries::Window;
use self::progress::{Blocker, Progress};
use self::session::{Session, proc_err};
use self::switch::SwitchStats;
use crate::output::{CmdResult, Ctx, Failure};

/// Knobs of a driver run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Pause between two switching rounds (DESIGN §4.5; default 10 ms).
    pub interval: Duration,
    /// Stop waiting after this long; the transition stays pending.
    pub timeout: Option<Duration>,
    /// Wait for the transition to complete (false: `--no-wait`).
    pub wait: bool,
    /// Accept a non-replace patch over functions another patch owns (K5).
    pub allow_stacking: bool,
    /// Unwinding depth limit (C5.4).
    pub max_depth: usize,
    /// The objects whose separate debug files the process image reads (their symbols resolve the patch's
    /// funcs); every other object keeps the symbols of its own file. Default: none.
    pub debug_for: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            interval: Duration::from_millis(10),
            timeout: None,
            wait: true,
            allow_stacking: false,
            max_depth: relive_core::DEFAULT_MAX_DEPTH,
            debug_for: vec![],
        }
    }
}

/// Why a driver operation failed; maps onto the exit codes of `output.rs`.
#[derive(Debug)]
pub enum Fail {
    /// Checked and declined; the target is unchanged (exit 3).
    Refused(anyhow::Error),
    /// Could not be carried out (exit 1).
    Error(anyhow::Error),
    /// Carried out, but the transition is still pending (exit 4).
    Timeout(Box<Report>),
}

impl From<anyhow::Error> for Fail {
    fn from(e: anyhow::Error) -> Self {
        Fail::Error(e)
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Refused(e) | Fail::Error(e) => write!(f, "{e:#}"),
            Fail::Timeout(r) => write!(f, "{}", r.summary()),
        }
    }
}

/// What a driver operation did (printed, or as JSON with `--json`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub pid: i32,
    pub operation: String,
    pub patch: Option<String>,
    /// completed | already_active | pending | cancelled | nothing_pending
    pub outcome: String,
    /// patched | unpatched (the target of the last transition driven)
    pub target: Option<String>,
    pub threads: usize,
    pub switched: usize,
    /// Single steps that moved threads out of a patched function they were executing (`switch::handle`).
    pub steps: u32,
    pub rounds: u32,
    pub blockers: Vec<Blocker>,
    /// The transition was forced (C11): `relive force`.
    pub forced: bool,
    /// The patches C11 marked forced by this command (never unloaded, U9). Empty for a forced patching
    /// transition without replace: SPEC C11 (5.18) marks only the transition patch of an unpatching
    /// transition, or the patches a replace patch removes.
    pub forced_patches: Vec<String>,
    /// `relive force`: the threads switched without a stack check (C11).
    pub forced_tids: Vec<i32>,
    /// Threads still to switch when the command returned (0 once the transition is over). `switched` counts
    /// only this command's switches.
    pub pending: usize,
    /// apply of a replace patch (R1): the active patches it disables.
    pub replaced: Vec<String>,
    /// …and their functions it does not carry, which go back to the original code (`object:function`).
    pub reverted: Vec<String>,
    /// Threads `force` switched without a stack check (C11).
    pub forced_threads: usize,
    /// Objects the patch names that the process has not loaded: accepted, but nothing in them is patched
    /// (DESIGN §5: objects loaded later are not watched yet).
    pub not_loaded: Vec<String>,
    pub agent_injected: bool,
    #[serde(serialize_with = "micros")]
    pub elapsed_ms: f64,
    /// From the start of the transition (init) to its completion (or to the command's return while pending):
    /// the part after the agent, the process image and the patch library were ready.
    #[serde(serialize_with = "micros")]
    pub transition_ms: f64,
    /// Entry-write windows (stop-all or stop-free int3), in order.
    pub windows: Vec<Window>,
    /// Per-thread pause of the switching loop: median, p99 and max, in µs.
    pub pause_us: Option<(u64, u64, u64)>,
    /// Every per-thread pause of the switching loop (stop → resume of one thread), in µs; present whenever a
    /// transition was driven (empty, with `pause_us` all 0, when every thread switched inside the stop-all
    /// window that installed the entries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_samples_us: Option<Vec<u64>>,
    /// Per-thread time from relive's interrupt to the start of its handling: median, p99 and max, in µs.
    /// A sleeping thread stops at once, so for it this is time stopped before `pause_us` starts; a running
    /// thread runs on until it stops.
    pub stop_wait_us: Option<(u64, u64, u64)>,
    /// The kernel-style log lines of the model (SPEC events).
    pub log: Vec<String>,
}

/// Milliseconds to the microsecond in JSON (`2.133764`, not `2.1337639999999998`).
fn micros<S: serde::Serializer>(ms: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((ms * 1e3).round() / 1e3)
}

impl Report {
    pub fn summary(&self) -> String {
        let patch = self.patch.as_deref().unwrap_or("-");
        match self.outcome.as_str() {
            "already_active" => format!("patch {patch} is already active in pid {}", self.pid),
            "nothing_pending" if self.threads == 0 => {
                format!("pid {} has no transition pending; nothing to do", self.pid)
            }
            "nothing_pending" => format!(
                "pid {} has no transition pending; nothing to do ({} threads)",
                self.pid, self.threads
            ),
            "pending" => {
                let pending = if self.pending > 0 {
                    self.pending
                } else {
                    self.blockers.len()
                };
                let mut s = format!(
                    "patch {patch} in pid {}: transition to {} still pending: {}/{} threads switched",
                    self.pid,
                    self.target.as_deref().unwrap_or("?"),
                    self.threads - pending.min(self.threads),
                    self.threads
                );
                for b in &self.blockers {
                    s.push_str(&format!("; {b}"));
                }
                // L6: the reverse of a patching transition is disable; of an unpatching one, apply.
                let reverse = if self.target.as_deref() == Some("unpatched") {
                    format!("re-enable with `relive apply {} <{patch}'s file>`", self.pid)
                } else {
                    format!("reverse with `relive disable {} {patch}`", self.pid)
                };
                s.push_str(&format!(
                    "; wait with `relive transition {pid}`, {reverse}, or `relive force {pid}`",
                    pid = self.pid
                ));
                s
            }
            o => format!(
                "{} of patch {patch} in pid {}: {o} ({} threads; {} switched by this command after a stack check in \
                 {} rounds{}, {:.1} ms{}){}{}",
                self.operation,
                self.pid,
                self.threads,
                self.switched,
                self.rounds,
                if self.forced {
                    format!(", {} forced without one", self.forced_threads)
                } else {
                    String::new()
                },
                self.elapsed_ms,
                if !self.forced {
                    String::new()
                } else if self.forced_patches.is_empty() {
                    "; no library needs keeping: the forced threads may only be running code that stays \
                     loaded (C11)"
                        .to_owned()
                } else {
                    format!(
                        "; marked forced, never unloaded: {} (C11)",
                        self.forced_patches.join(", ")
                    )
                },
                if self.not_loaded.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; nothing patched in {}: not loaded in pid {} (objects loaded later are not patched)",
                        self.not_loaded.join(", "),
                        self.pid
                    )
                },
                if self.replaced.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; replaced {}{}",
                        self.replaced.join(", "),
                        if self.reverted.is_empty() {
                            String::new()
                        } else {
                            format!(" (back to the original: {})", self.reverted.join(", "))
                        }
                    )
                }
            ),
        }
    }

    fn add_stats(&mut self, st: &SwitchStats) {
        self.rounds += st.rounds;
        self.steps += st.steps;
        self.switched += st.switched;
        self.blockers = st.blockers.clone();
        let mut w = st.stop_waits_us.clone();
        self.stop_wait_us.get_or_insert((0, 0, 0));
        if !w.is_empty() {
            w.sort_unstable();
            let q = |f: f64| w[((w.len() - 1) as f64 * f).round() as usize];
            self.stop_wait_us = Some((q(0.5), q(0.99), *w.last().unwrap_or(&0)));
        }
        let mut p = st.pauses_us.clone();
        self.pause_samples_us
            .get_or_insert_with(Vec::new)
            .extend(st.pauses_us.iter().copied());
        self.pause_us.get_or_insert((0, 0, 0));
        if !p.is_empty() {
            p.sort_unstable();
            let q = |f: f64| p[((p.len() - 1) as f64 * f).round() as usize];
            self.pause_us = Some((q(0.5), q(0.99), *p.last().unwrap_or(&0)));
        }
    }
}

/// Prints a report (or its JSON) and maps a failure to the command's result.
pub fn report_outcome(ctx: &Ctx, r: Result<Report, Fail>) -> CmdResult {
    match r {
        Ok(rep) => {
            if ctx.json {
                ctx.print_json(&rep);
            } else {
                crate::outln!("{}", rep.summary());
            }
            Ok(())
        }
        Err(Fail::Timeout(rep)) => {
            if ctx.json {
                ctx.print_json(&rep);
                Err(Failure::TimeoutReported(anyhow!("{}", rep.summary())))
            } else {
                Err(Failure::Timeout(anyhow!("{}", rep.summary())))
            }
        }
        Err(Fail::Refused(e)) => Err(Failure::Refused(e)),
        Err(Fail::Error(e)) => Err(Failure::Error(e)),
    }
}

fn core_err(pid: i32, e: relive_core::Error) -> Fail {
    use relive_core::Error as E;
    match e {
        E::Busy { .. }
        | E::Conflict { .. }
        | E::AliasedEntry { .. }
        | E::IncompatibleState { .. }
        | E::AlreadyExists { .. }
        | E::PrePatchFailed { .. } => Fail::Refused(anyhow!("pid {pid}: {e}")),
        _ => Fail::Error(anyhow!("pid {pid}: {e}")),
    }
}

/// Performs a model output in order. Entry changes are batched into one stop-all window; `image_first`
/// writes the TLS init image before the entries (transition start: DESIGN §3 step 7), otherwise after them
/// (completion: a thread created before the entries go direct must still dispatch to the starting state).
/// Returns the results of the callbacks run, in order.
fn perform(
    s: &mut Session,
    out: &Output,
    image_first: bool,
    rep: &mut Report,
    progress: &mut dyn Progress,
) -> Result<Vec<i32>, Fail> {
    let mut results = vec![];
    let entries: Vec<(FuncId, EntryTarget)> = out
        .actions()
        .filter_map(|a| match a {
            Action::SetEntry { func, target, .. } => Some((func.clone(), target.clone())),
            _ => None,
        })
        .collect();
    let image = out.actions().find_map(|a| match a {
        Action::WriteTlsInitImage { state } => Some(*state),
        _ => None,
    });
    let mut entries_done = entries.is_empty();
    let mut image_done = image.is_none();
    let mut pre_patch_failed = false;
    for step in &out.steps {
        match step {
            Step::Event(e) => {
                tracing::info!(pid = s.pid, "{e}");
                rep.log.push(e.to_string());
            }
            Step::Action(a) => match a {
                Action::SetEntry { .. } if !entries_done => {
                    if image_first && !image_done {
                        s.write_tls_image(image.unwrap_or(PatchState::Idle))?;
                        image_done = true;
                    }
                    let batch = entries::plan_batch(s, &entries)?;
                    let w = entries::execute(s, &batch, progress)?;
                    rep.switched += w.switched;
                    if w.attempts > 0 {
                        rep.windows.push(w);
                    }
                    entries_done = true;
                }
                Action::SetEntry { .. } => {}
                Action::WriteTlsInitImage { state } => {
                    if !image_done {
                        s.write_tls_image(*state)?;
                        image_done = true;
                    }
                }
                // C2 and L3.5: with per-transition slot values these need no write (see the module docs).
                Action::WriteThreadState { .. } => {}
                // CB5/L7: the first pre_patch that fails cancels the enable; no later one runs (the model
                // takes the results up to and including that one, Model::start).
                Action::RunCallback {
                    kind: CallbackKind::PrePatch,
                    ..
                } if pre_patch_failed => {}
                Action::RunCallback {
                    patch,
                    object,
                    kind,
                    prev_states,
                } => {
                    states::sync(s, Some(patch.as_str()), prev_states)?;
                    let r = run_callback(s, patch, object, *kind)?;
                    pre_patch_failed |= *kind == CallbackKind::PrePatch && r != 0;
                    results.push(r);
                }
                Action::SignalThreads { tids } => {
                    tracing::info!(pid = s.pid, "C8: {} threads still pending", tids.len());
                }
                Action::DropPatch { patch, unload } => drop_patch(s, patch, *unload)?,
            },
        }
    }
    // SPEC §8: the agent's state table follows the model (completion, reversal, dropped patches).
    let prev = s.doc.model.prev_states();
    states::sync(s, None, &prev)?;
    Ok(results)
}

fn run_callback(
    s: &mut Session,
    patch: &str,
    object: &relive_core::ObjectId,
    kind: CallbackKind,
) -> Result<i32, Fail> {
    let pid = s.pid;
    let Some(rec) = s.doc.patch(patch) else {
        return Ok(0);
    };
    let Some(o) = rec.object(object) else { return Ok(0) };
    let name = match kind {
        CallbackKind::PrePatch => &o.pre_patch,
        CallbackKind::PostPatch => &o.post_patch,
        CallbackKind::PreUnpatch => &o.pre_unpatch,
        CallbackKind::PostUnpatch => &o.post_unpatch,
    };
    let Some(name) = name.clone() else { return Ok(0) };
    let handle = rec.handle;
    s.conn.callback(handle, &name).map_err(|e| {
        Fail::Error(anyhow!(
            "running the {kind} callback {name} of patch {patch} in pid {pid} failed: {e}"
        ))
    })
}

fn drop_patch(s: &mut Session, patch: &str, unload: bool) -> Result<(), Fail> {
    let Some(i) = s.doc.patches.iter().position(|p| p.name == patch) else {
        return Ok(());
    };
    let rec = s.doc.patches.remove(i);
    if unload {
        // Thunk pages of the patch go with it: no entry leads to them any more.
        let pages: Vec<u64> = s
            .doc
            .thunk_pages
            .iter()
            .filter(|(p, _)| p == patch)
            .map(|(_, a)| *a)
            .collect();
        s.doc.thunk_pages.retain(|(p, _)| p != patch);
        for &p in &pages {
            s.doc
                .model
                .unregister_stubs_in(relive_core::Range::new(p, p + doc::THUNK_PAGE));
        }
        s.save()?;
        s.conn.unload(rec.handle).map_err(|e| Fail::Error(anyhow!(e)))?;
        for p in pages {
            let _ = s.conn.unmap(p, doc::THUNK_PAGE);
            s.unwinder.remove_code_range(p);
        }
    } else {
        s.save()?;
    }
    Ok(())
}

/// Everything after `model.start` (or a reverse): drive the switching loop and complete.
fn finish_transition(
    s: &mut Session,
    opts: &Options,
    rep: &mut Report,
    progress: &mut dyn Progress,
    started: Instant,
    transition_started: Instant,
) -> Result<(), Fail> {
    let deadline = opts.timeout.map(|t| started + t);
    // The target of the transition driven; the model forgets it on completion.
    if let Some(t) = s.doc.model.transition() {
        rep.target = Some(switch::target_word(t.target).into());
    }
    let mut stats = SwitchStats::default();
    let mut log = vec![];
    let mut windows = vec![];
    let done = switch::drive(s, opts, progress, &mut stats, deadline, |s, out, progress| {
        let mut r2 = Report::default();
        s.save()?;
        perform(s, &out, false, &mut r2, progress)?;
        // Stub pages stay mapped for the next patch of the same functions; those whose fresh slots are
        // half used are retired now (each thread checked in turn, no stop-all), and `relive transition` on
        // an idle target retires every unused one.
        s.save()?;
        if entries::retire_used_stubs(s)? {
            s.save()?;
        }
        log.extend(r2.log);
        windows.extend(r2.windows);
        Ok(())
    })?;
    progress.finish();
    rep.log.extend(log);
    rep.windows.extend(windows);
    rep.add_stats(&stats);
    rep.threads = s.doc.model.threads().len();
    rep.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    rep.transition_ms = transition_started.elapsed().as_secs_f64() * 1e3;
    if let Some(t) = s.doc.model.transition() {
        rep.target = Some(switch::target_word(t.target).into());
        rep.pending = s.doc.model.pending().len();
    }
    if done {
        rep.outcome = "completed".into();
        rep.blockers.clear();
        Ok(())
    } else if opts.wait {
        rep.outcome = "pending".into();
        Err(Fail::Timeout(Box::new(rep.clone())))
    } else {
        rep.outcome = "pending".into();
        Ok(())
    }
}

/// `relive apply PID PATCH` (DESIGN §3).
pub fn apply(pid: i32, path: &Path, opts: &Options, progress: &mut dyn Progress) -> Result<Report, Fail> {
    let started = Instant::now();
    // 1. The manifest, from disk. Nothing has touched the target yet.
    let pf = patchfile::PatchFile::read(path)?;
    let mut rep = Report {
        pid,
        operation: "apply".into(),
        patch: Some(pf.name.clone()),
        ..Report::default()
    };
    session::ensure_process(pid)?;
    // DESIGN §1: nothing in the target changes before every check has passed. Without an agent, run the
    // checks read-only first (as `relive check` does), so a refused patch does not even inject the agent.
    let found = relive_proc::agent::find_agent(pid);
    if matches!(found, Err(relive_proc::agent::AgentError::NotLoaded { .. })) {
        let image = relive_proc::ProcessImage::load(pid, &relive_proc::ImageOptions::default())
            .map_err(|e| session::proc_err(pid, "cannot map modules", e))?;
        let p = patchfile::prepare_with(pid, &image, &doc::Doc::default(), &pf, opts.allow_stacking);
        if let Some(first) = p.refusals().next() {
            return Err(Fail::Refused(anyhow!("{first}")));
        }
        // A patch that cannot link would fail in the agent's dlopen: refuse before the agent goes in.
        patchfile::link_check(pid, &image, &pf).map_err(|e| Fail::Refused(anyhow!("{e}")))?;
    }
    // 2–3 (partly): the agent and the registry.
    let opts = &Options {
        debug_for: pf.manifest.objects.iter().map(|o| o.name.clone()).collect(),
        ..opts.clone()
    };
    let mut s = Session::open_with(pid, true, opts, found.ok())?;
    rep.agent_injected = s.injected;
    if s.doc.model.patch(&pf.name).is_some() {
        if s.doc.model.in_transition(&pf.name) {
            let unpatching = s
                .doc
                .model
                .transition()
                .is_some_and(|t| t.target == PatchState::Unpatched);
            if !unpatching {
                return Err(Fail::Refused(anyhow!(
                    "patch {} is already being applied in pid {pid}; wait with `relive transition {pid}` or \
                     reverse with `relive disable {pid} {}`",
                    pf.name,
                    pf.name
                )));
            }
            // L6: apply on the patch of an unpatching transition reverses it (S1 "write 1 to enabled").
            let tids = switch::visit_list(&mut s, true)?;
            let mut st = SwitchStats::default();
            let _ = switch::round(&mut s, &tids, &mut st)?;
            let out = s.doc.model.reverse().map_err(|e| core_err(pid, e))?;
            s.save()?;
            perform(&mut s, &out, true, &mut rep, progress)?;
            s.save()?;
            rep.operation = "reverse".into();
            let transition_started = Instant::now();
            finish_transition(&mut s, opts, &mut rep, progress, started, transition_started)?;
            return Ok(rep);
        }
        if let Some(active) = patchfile::other_build_of_active(&s.image, &s.doc, &pf) {
            return Err(Fail::Refused(anyhow!(
                "{}",
                patchfile::other_build_message(pid, &pf, &active)
            )));
        }
        rep.outcome = "already_active".into();
        rep.threads = s.doc.model.threads().len();
        rep.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        return Ok(rep);
    }
    // 2–4: resolve, check, analyse. Refusals here leave the target unchanged.
    let t_prep = Instant::now();
    let prepared = patchfile::prepare(&s, &pf, opts.allow_stacking, false)?;
    tracing::debug!(pid, "checks and entry analysis in {:?}", t_prep.elapsed());
    if let Some(first) = prepared.refusals().next() {
        return Err(Fail::Refused(anyhow!("{first}")));
    }
    // A patch that cannot link would fail in the agent's dlopen: refuse it here, with the names.
    patchfile::link_check(pid, &s.image, &pf).map_err(|e| Fail::Refused(anyhow!("{e}")))?;
    if let Some(note) = patchfile::no_function_note(&pf) {
        progress.step(&note);
    }
    if let Some((replaced, reverted)) = prepared.replace_effect(&s.doc, &pf) {
        progress.step(&patchfile::replace_text(&replaced, &reverted));
        rep.replaced = replaced;
        rep.reverted = reverted;
    }
    rep.not_loaded = prepared
        .objects
        .iter()
        .filter(|o| !o.loaded)
        .map(|o| o.decl.name.clone())
        .collect();
    for o in &rep.not_loaded {
        progress.step(&format!(
            "object {o} is not loaded in pid {pid}: nothing in it is patched (objects loaded later are not \
             patched yet); if the name is a typo, compare it with /proc/{pid}/maps"
        ));
    }
    // 6: the agent loads the patch; the controller resolves its symbols and writes its import slots.
    progress.step(&format!("loading {} into pid {pid}", path.display()));
    let t_load = Instant::now();
    let rec = patchfile::load(&mut s, &pf, &prepared)?;
    tracing::debug!(pid, "patch library loaded and resolved in {:?}", t_load.elapsed());
    s.reload_image()?;
    let spec = prepared.spec(&rec);
    s.doc.patches.push(rec);
    s.sync_threads_idle()?;
    // 7: init (C2), pre_patch callbacks.
    let transition_started = Instant::now();
    s.doc.seq += 1;
    let init = match s.doc.model.enable(spec) {
        Ok(o) => o,
        Err(e) => {
            let rec = s.doc.patches.pop();
            if let Some(r) = rec {
                let _ = s.conn.unload(r.handle);
            }
            s.save()?;
            return Err(core_err(pid, e));
        }
    };
    // Stub pages and thunks are in the document before the init is: a controller killed after this save
    // leaves a transition the next command can start (DESIGN §4.8; `relive transition` on an Init phase
    // without pre_patch callbacks starts it, and needs every stub). Nothing leads to them yet.
    for (func, plan) in &prepared.plans {
        entries::ensure_stub(&mut s, func, plan)?;
    }
    patchfile::make_thunks(&mut s, &pf.name, &prepared)?;
    s.save()?;
    let results = perform(&mut s, &init, true, &mut rep, progress)?;
    // 8: start: TLS init image, then stubs and entries in one stop-all window.
    let start = s.doc.model.start(&results).map_err(|e| core_err(pid, e))?;
    s.save()?;
    perform(&mut s, &start, true, &mut rep, progress)?;
    if let Some(e) = start.error {
        // L7: the enable was cancelled; nothing stays behind (the patch's thunk pages went with it, its
        // unused stub pages go now).
        entries::retire_stubs(&mut s)?;
        s.save()?;
        return Err(Fail::Refused(anyhow!("pid {pid}: {e}")));
    }
    s.save()?;
    // 9–10: switch threads, complete.
    finish_transition(&mut s, opts, &mut rep, progress, started, transition_started)?;
    Ok(rep)
}

/// Resolves a patch argument (a name, or the path of a patch file) to an active patch's name.
fn patch_name(s: &Session, arg: &str) -> Result<String, Fail> {
    if s.doc.model.patch(arg).is_some() {
        return Ok(arg.to_owned());
    }
    if let Some(r) = s.doc.patches.iter().find(|p| p.path == arg) {
        return Ok(r.name.clone());
    }
    if Path::new(arg).is_file()
        && let Ok(pf) = patchfile::PatchFile::read(Path::new(arg))
        && s.doc.model.patch(&pf.name).is_some()
    {
        return Ok(pf.name);
    }
    let active: Vec<&str> = s.doc.model.patches().iter().map(|p| p.name.as_str()).collect();
    Err(Fail::Refused(anyhow!(
        "pid {} has no active patch named {arg} (active: {}); see `relive status {}`",
        s.pid,
        if active.is_empty() {
            "none".to_owned()
        } else {
            active.join(", ")
        },
        s.pid
    )))
}

/// `relive disable PID PATCH` (L4; L6 on the transition patch).
pub fn disable(pid: i32, patch: &str, opts: &Options, progress: &mut dyn Progress) -> Result<Report, Fail> {
    let started = Instant::now();
    let mut s = Session::open(pid, false, opts)?;
    let name = patch_name(&s, patch)?;
    let mut rep = Report {
        pid,
        operation: "disable".into(),
        patch: Some(name.clone()),
        ..Report::default()
    };
    let reversing = s.doc.model.in_transition(&name);
    let transition_started = Instant::now();
    // Bring the model's thread states up to date with the slots before a reverse (C9): a controller killed
    // after writing slots must not leave switched threads behind.
    if reversing {
        let tids = switch::visit_list(&mut s, true)?;
        let mut st = SwitchStats::default();
        let _ = switch::round(&mut s, &tids, &mut st)?;
    } else {
        s.sync_threads_idle()?;
        s.doc.seq += 1;
    }
    let mut model = s.doc.model.clone();
    let out = model.disable(&name).map_err(|e| core_err(pid, e))?;
    s.doc.model = model;
    s.save()?;
    perform(&mut s, &out, true, &mut rep, progress)?;
    s.save()?;
    if reversing {
        rep.operation = "reverse".into();
    }
    finish_transition(&mut s, opts, &mut rep, progress, started, transition_started)?;
    Ok(rep)
}

/// Re-applies what the document says to the target's memory (entries and TLS image): idempotent, used when a
/// command resumes a transition another controller left.
fn reconcile(s: &mut Session, rep: &mut Report, progress: &mut dyn Progress) -> Result<(), Fail> {
    let targets: Vec<(FuncId, EntryTarget)> = s
        .doc
        .model
        .entries()
        .iter()
        .map(|(f, e)| (f.clone(), e.target.clone()))
        .collect();
    let mut all = targets.clone();
    // Entries the model no longer has must hold their original bytes.
    for e in &s.doc.entries {
        if !s.doc.model.entries().contains_key(&e.func) {
            all.push((e.func.clone(), EntryTarget::Original));
        }
    }
    s.write_tls_image(s.doc.model.tls_image())?;
    let batch = entries::plan_batch(s, &all)?;
    let w = entries::execute(s, &batch, progress)?;
    if w.attempts > 0 {
        rep.windows.push(w);
    }
    s.save()
}

/// `relive transition PID`: drive the pending transition to its end.
pub fn transition(pid: i32, opts: &Options, progress: &mut dyn Progress) -> Result<Report, Fail> {
    let started = Instant::now();
    let mut rep = Report {
        pid,
        operation: "transition".into(),
        ..Report::default()
    };
    // Without an agent there is no transition either: the same answer as with an agent and nothing
    // pending (exit 0), so that a script need not tell the two apart.
    session::ensure_process(pid)?;
    if matches!(
        relive_proc::agent::find_agent(pid),
        Err(relive_proc::agent::AgentError::NotLoaded { .. })
    ) {
        rep.outcome = "nothing_pending".into();
        rep.threads = relive_proc::list_threads(pid).map_or(0, |t| t.len());
        rep.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        return Ok(rep);
    }
    let mut s = Session::open(pid, false, opts)?;
    let Some(t) = s.doc.model.transition().cloned() else {
        reconcile(&mut s, &mut rep, progress)?;
        entries::retire_stubs(&mut s)?;
        s.save()?;
        rep.outcome = "nothing_pending".into();
        rep.threads = s.doc.model.threads().len();
        rep.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        return Ok(rep);
    };
    rep.patch = Some(t.patch.clone());
    if t.phase == relive_core::Phase::Init {
        // A controller died between init and start: pre_patch may or may not have run. Cancel (L7).
        let n = t.pre_patch.len();
        let results: Vec<i32> = if n == 0 { vec![] } else { vec![-125] };
        let out = s.doc.model.start(&results).map_err(|e| core_err(pid, e))?;
        s.save()?;
        perform(&mut s, &out, true, &mut rep, progress)?;
        if out.error.is_some() {
            entries::retire_stubs(&mut s)?;
            s.save()?;
            rep.outcome = "cancelled".into();
            rep.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            return Ok(rep);
        }
    }
    reconcile(&mut s, &mut rep, progress)?;
    finish_transition(&mut s, opts, &mut rep, progress, started, started)?;
    Ok(rep)
}

/// `relive force PID` (C11).
pub fn force(pid: i32, opts: &Options, progress: &mut dyn Progress) -> Result<Report, Fail> {
    let started = Instant::now();
    let mut s = Session::open(pid, false, opts)?;
    let mut rep = Report {
        pid,
        operation: "force".into(),
        forced: true,
        ..Report::default()
    };
    let Some(t) = s.doc.model.transition().cloned() else {
        return Err(Fail::Refused(anyhow!(
            "pid {pid} has no transition pending; there is nothing to force"
        )));
    };
    rep.patch = Some(t.patch.clone());
    reconcile(&mut s, &mut rep, progress)?;
    let was_forced: Vec<String> = s
        .doc
        .model
        .patches()
        .iter()
        .filter(|p| p.forced)
        .map(|p| p.name.clone())
        .collect();
    let out = s.doc.model.force().map_err(|e| core_err(pid, e))?;
    // Report what relive-core marked (C11), not what the user asked for.
    rep.forced_patches = s
        .doc
        .model
        .patches()
        .iter()
        .filter(|p| p.forced && !was_forced.contains(&p.name))
        .map(|p| p.name.clone())
        .collect();
    // C11: every pending thread takes the target without a stack check. Their slots are written (a thread not
    // stopped yet is stopped first to learn its TLS block); completion follows at once, so a thread this misses
    // (one that exits or appears meanwhile) is harmless: the entries are about to become direct jumps.
    let forced: Vec<i32> = out
        .actions()
        .filter_map(|a| match a {
            Action::WriteThreadState { tid, .. } => Some(tid.0),
            _ => None,
        })
        .collect();
    if !forced.is_empty() {
        progress.step(&format!(
            "forcing {} to {} without a stack check (C11): {} (a forced thread may still be inside the code it \
             leaves)",
            if forced.len() == 1 { "thread" } else { "threads" },
            switch::target_word(t.target),
            forced.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    rep.forced_tids = forced;
    for a in out.actions() {
        if let Action::WriteThreadState { tid, state } = a {
            rep.forced_threads += 1;
            let fs = match s.fs_base.get(&tid.0) {
                Some(f) => Some(*f),
                None => relive_proc::stop_thread(pid, tid.0).ok().and_then(|t| {
                    let r = t.regs().ok().map(|r| r.fs_base);
                    let _ = t.resume();
                    r
                }),
            };
            if let Some(fs) = fs {
                s.write_slot(fs, *state)
                    .map_err(|e| proc_err(pid, "cannot write a thread's state", e))?;
            }
        }
    }
    for e in out.events() {
        rep.log.push(e.to_string());
    }
    s.save()?;
    let opts = Options {
        wait: true,
        timeout: Some(Duration::from_secs(60)),
        ..opts.clone()
    };
    finish_transition(&mut s, &opts, &mut rep, progress, started, started)?;
    rep.forced = true;
    Ok(rep)
}

/// One verdict of `relive check`.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// One func's verdict of `relive check`.
#[derive(Debug, Clone, Serialize)]
pub struct FuncVerdict {
    pub func: String,
    pub ok: bool,
    pub details: Vec<String>,
}

/// The result of `relive check`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub pid: i32,
    pub patch: String,
    pub ok: bool,
    /// The same build of the patch is already active: apply would do nothing.
    pub already_active: bool,
    pub general: Vec<Verdict>,
    pub funcs: Vec<FuncVerdict>,
}

/// `relive check PID PATCH`: every verification of apply; nothing in the target changes (no injection, no
/// lock, no write).
pub fn check(pid: i32, path: &Path, allow_stacking: bool) -> Result<CheckReport, Failure> {
    let pf = patchfile::PatchFile::read(path).map_err(|e| match e {
        Fail::Refused(e) => Failure::Refused(e),
        Fail::Error(e) => Failure::Error(e),
        Fail::Timeout(r) => Failure::Error(anyhow!("{}", r.summary())),
    })?;
    let r = patchfile::check(pid, &pf, allow_stacking).map_err(|e| match e {
        Fail::Refused(e) => Failure::Refused(e),
        Fail::Error(e) => Failure::Error(e),
        Fail::Timeout(r) => Failure::Error(anyhow!("{}", r.summary())),
    })?;
    Ok(r)
}

#[allow(dead_code)]
fn _assert_patchrec(_: &PatchRec) {}
