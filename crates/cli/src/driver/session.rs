//! One controller session with one target: the agent's channel (locked), the registry document, the process
//! image and an unwinder that knows relive's stubs.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, anyhow};
use relive_core::{PatchState, Tid};
use relive_proc::agent::{self, AgentConn};
use relive_proc::{ImageOptions, ProcessImage};
use relive_unwind::Unwinder;

use super::doc::{self, BODY_VERSION, Doc};
use super::{Fail, Options};

pub struct Session {
    pub pid: i32,
    pub conn: AgentConn,
    pub tpoff: i64,
    pub tls_image_addr: u64,
    pub doc: Doc,
    pub image: ProcessImage,
    pub unwinder: Unwinder,
    pub fs_base: HashMap<i32, u64>,
    pub max_depth: usize,
    /// How long a stop-all entry write is retried while some thread blocks it: 30 s, or the command's
    /// `--timeout` when shorter.
    pub entry_write_limit: Duration,
    image_opts: ImageOptions,
    /// Set by the stop-all window that installed a transition's entries when it also settled every thread
    /// (read its slot, switched it if its stack allowed): the first switching round then visits only the
    /// pending and new threads.
    pub settled_all: bool,
    /// Whether the agent had to be injected by this session.
    pub injected: bool,
    /// The agent's SIGTRAP handler is installed (`FLAG_TRAP_HANDLER`): it drops a stray single-step trap, so
    /// the switching loop may single-step threads (a killed controller could leave EFLAGS.TF set).
    pub trap_handler: bool,
    /// Threads whose signal mask the switching loop read (while they were stopped) without SIGTRAP, and
    /// when: vouched for to the agent at a stop-free entry write soon after (`entries::write_stop_free`).
    pub masks_seen: HashMap<i32, std::time::Instant>,
    /// The agent's service thread, moved to SCHED_FIFO 1 for this session (back to SCHED_OTHER when the
    /// session ends): on CPUs full of target threads it would otherwise serve each request late.
    _boosted: Boost,
    locked: bool,
}

/// Refuses a pid that names no process, or names a thread that is not its process's main thread (its
/// /proc entry exists and reads like a process's, but relive works on whole processes: the agent, the
/// registry and the transition are the thread group's).
pub fn ensure_process(pid: i32) -> Result<(), Fail> {
    if !relive_proc::process_exists(pid) {
        return Err(Fail::Error(anyhow!(
            "no process with pid {pid}: check the pid with `ps` or `pgrep`"
        )));
    }
    match relive_proc::tgid_of(pid) {
        Some(tgid) if tgid != pid => Err(Fail::Refused(anyhow!(
            "{pid} is a thread of process {tgid}, not a process: give relive the process id {tgid}"
        ))),
        _ => Ok(()),
    }
}

/// Maps a process-level error to a refusal or an error with the pid in the message.
pub fn proc_err(pid: i32, what: &str, e: impl std::fmt::Display) -> Fail {
    Fail::Error(anyhow!("{what} in pid {pid}: {e}"))
}

impl Session {
    /// Finds (or, with `inject`, injects) the agent of `pid`, opens its channel, takes the controller lock
    /// and reads the registry document.
    pub fn open(pid: i32, inject: bool, opts: &Options) -> Result<Session, Fail> {
        ensure_process(pid)?;
        Self::open_with(pid, inject, opts, None)
    }

    /// [`Session::open`] for a process already checked with [`ensure_process`], whose agent the caller may
    /// have found just now (`found`): it is not looked up again.
    pub fn open_with(
        pid: i32,
        inject: bool,
        opts: &Options,
        found: Option<agent::AgentLocation>,
    ) -> Result<Session, Fail> {
        let (loc, injected) = if let Some(l) = found {
            (l, false)
        } else if inject {
            let spinner = indicatif::ProgressBar::new_spinner();
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                spinner.set_message(format!("loading the relive agent into pid {pid}"));
                spinner.enable_steady_tick(Duration::from_millis(80));
            } else {
                spinner.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let r = agent::ensure_agent(pid, &relive_proc::remote::InjectOptions::default());
            spinner.finish_and_clear();
            match r.map_err(|e| Fail::Error(anyhow!(e)))? {
                agent::Ensured::Present(l) => (l, false),
                agent::Ensured::Injected(l, _) => (l, true),
            }
        } else {
            match agent::find_agent(pid) {
                Ok(l) => (l, false),
                Err(agent::AgentError::NotLoaded { .. }) => {
                    return Err(Fail::Refused(anyhow!(
                        "pid {pid} has no relive agent, so it has no patch and no transition; nothing to do"
                    )));
                }
                Err(e) => return Err(Fail::Error(anyhow!(e))),
            }
        };
        let t0 = std::time::Instant::now();
        let mut conn = AgentConn::open(&loc, Duration::from_secs(10)).map_err(|e| Fail::Error(anyhow!(e)))?;
        tracing::debug!(pid, "agent channel open in {:?}", t0.elapsed());
        // The agent's service thread at SCHED_FIFO 1 for this session, from its first request on (only when
        // relive itself runs at a real-time priority: permitted, not opted out); back at its own policy when
        // the session ends. If relive is killed meanwhile, the agent drops the boost itself once it has
        // been idle for half a second with no live controller holding its lock (`service::idle_wait`).
        let service_tid = agent::read_registry(&loc).map_or(0, |r| r.header.service_tid as i32);
        let boosted = Boost(if relive_proc::sched::is_realtime() && service_tid != 0 {
            relive_proc::sched::boost_thread(service_tid).map(|before| (service_tid, before))
        } else {
            None
        });
        conn.lock().map_err(|e| Fail::Error(anyhow!(e)))?;
        tracing::debug!(pid, "controller lock taken after {:?}", t0.elapsed());
        let snap = agent::read_registry(&loc).map_err(|e| Fail::Error(anyhow!(e)))?;
        let doc = if snap.body.is_empty() {
            Doc::default()
        } else if snap.header.body_version != BODY_VERSION {
            return Err(Fail::Error(anyhow!(
                "the registry of pid {pid} holds a body of version {} (this relive writes {BODY_VERSION}); use the \
                 relive release that patched this process",
                snap.header.body_version
            )));
        } else {
            serde_json::from_slice::<Doc>(&snap.body)
                .with_context(|| format!("cannot decode the registry document of pid {pid}"))?
        };
        let image_opts = ImageOptions {
            debug_only_for: Some(opts.debug_for.clone()),
            ..ImageOptions::default()
        };
        let image =
            ProcessImage::load(pid, &image_opts).map_err(|e| proc_err(pid, "cannot map modules", e))?;
        tracing::debug!(pid, "process image loaded after {:?}", t0.elapsed());
        let unwinder = image.unwinder();
        let mut s = Session {
            pid,
            conn,
            tpoff: snap.header.tpoff,
            tls_image_addr: snap.header.tls_image_addr,
            doc,
            image,
            unwinder,
            fs_base: HashMap::new(),
            max_depth: opts.max_depth,
            entry_write_limit: opts
                .timeout
                .map_or(Duration::from_secs(30), |t| t.min(Duration::from_secs(30))),
            image_opts,
            settled_all: false,
            injected,
            masks_seen: HashMap::new(),
            _boosted: boosted,
            trap_handler: snap.header.flags & relive_abi::registry::FLAG_TRAP_HANDLER != 0,
            locked: true,
        };
        s.doc.model.set_max_depth(opts.max_depth);
        s.register_stub_ranges();
        s.warm_unwinder();
        tracing::debug!(pid, "unwinder ready after {:?}", t0.elapsed());
        Ok(s)
    }

    /// Makes the unwinder parse every module's unwind tables now, while everything runs, rather than inside
    /// the first stop-all window.
    pub fn warm_unwinder(&mut self) {
        let mut none = |_: u64| -> Option<u64> { None };
        for m in &self.image.modules {
            if let Some(r) = m.image.exec_avma_range(m.bias) {
                let ip = r.start.0 + 16;
                let _ = self
                    .unwinder
                    .unwind(relive_unwind::StartRegs { ip, sp: 8, bp: 0 }, &mut none, 2);
            }
        }
    }

    /// Registers every stub page and thunk page with the unwinder (DESIGN §4.5: code without CFI).
    pub fn register_stub_ranges(&mut self) {
        self.doc.register_code(&mut self.unwinder);
    }

    /// Reloads the process image (after a patch library was loaded or unloaded) and the unwinder.
    pub fn reload_image(&mut self) -> Result<(), Fail> {
        let t0 = std::time::Instant::now();
        let _t = scopeguard_log(self.pid, "image reloaded", t0);
        // Only the objects mapped since (the patch library) are read and parsed.
        let image = self
            .image
            .refresh(&self.image_opts)
            .map_err(|e| proc_err(self.pid, "cannot map modules", e))?;
        let kept = |m: &relive_unwind::UnwindModule| {
            image
                .modules
                .iter()
                .any(|n| n.path == m.name && (n.mapping.start..n.mapping.end) == m.avma_range)
        };
        if self.image.unwind_modules().iter().all(kept) {
            // Objects were only added (a patch library): the unwinder keeps what it parsed of the others.
            for m in image.unwind_modules() {
                if !self.unwinder.has_module(&m.name, &m.avma_range) {
                    self.unwinder.add_module(m);
                }
            }
            self.image = image;
        } else {
            self.image = image;
            self.unwinder = self.image.unwinder();
            self.register_stub_ranges();
            self.warm_unwinder();
        }
        Ok(())
    }

    /// Writes the document to the registry (write-ahead: before acting on it, DESIGN §4.8).
    pub fn save(&mut self) -> Result<(), Fail> {
        let t0 = std::time::Instant::now();
        let body = serde_json::to_vec(&self.doc).context("cannot encode the registry document")?;
        if body.len() > relive_abi::registry::BODY_CAPACITY {
            return Err(Fail::Error(anyhow!(
                "the registry document of pid {} is {} bytes, more than the agent's {} (too many threads or patches)",
                self.pid,
                body.len(),
                relive_abi::registry::BODY_CAPACITY
            )));
        }
        self.conn
            .write_body(BODY_VERSION, &body)
            .map_err(|e| Fail::Error(anyhow!(e)))?;
        tracing::debug!(
            pid = self.pid,
            "registry document saved ({} bytes) in {:?}",
            body.len(),
            t0.elapsed()
        );
        Ok(())
    }

    /// The slot value for `state` in the current transition.
    pub fn slot_value(&self, state: PatchState) -> u64 {
        doc::slot_value(self.doc.seq, state)
    }

    /// Writes a thread's state slot (process_vm_writev at fs_base + tpoff).
    pub fn write_slot(&self, fs_base: u64, state: PatchState) -> Result<(), relive_proc::ProcError> {
        let addr = fs_base.wrapping_add(self.tpoff as u64);
        relive_proc::write_data(self.pid, addr, &self.slot_value(state).to_le_bytes())
    }

    /// Reads a thread's slot and says which state it means now.
    pub fn read_slot(&self, fs_base: u64) -> Result<PatchState, relive_proc::ProcError> {
        let v = relive_proc::read_u64(self.pid, fs_base.wrapping_add(self.tpoff as u64))?;
        Ok(doc::slot_state(self.doc.seq, v))
    }

    /// Writes the TLS init image (DESIGN §4.2): threads created from now on start in `state`.
    pub fn write_tls_image(&self, state: PatchState) -> Result<(), Fail> {
        if self.tls_image_addr == 0 {
            return Err(Fail::Error(anyhow!(
                "the agent of pid {} did not publish its TLS init image",
                self.pid
            )));
        }
        relive_proc::write_code(
            self.pid,
            self.tls_image_addr,
            &self.slot_value(state).to_le_bytes(),
        )
        .map_err(|e| proc_err(self.pid, "cannot write the TLS init image", e))
    }

    /// Brings the model's thread list up to date: threads that exited are removed; threads that are new are
    /// added (outside a transition they are IDLE; during one, they are adopted when the switching loop first
    /// stops them and reads their slot).
    pub fn sync_threads_idle(&mut self) -> Result<Vec<i32>, Fail> {
        let tids =
            relive_proc::list_threads(self.pid).map_err(|e| proc_err(self.pid, "cannot list threads", e))?;
        let known: Vec<Tid> = self.doc.model.threads().keys().copied().collect();
        for t in known {
            if !tids.contains(&t.0) {
                let _ = self.doc.model.remove_thread(t);
                self.fs_base.remove(&t.0);
            }
        }
        if self.doc.model.transition().is_none() {
            for &t in &tids {
                if self.doc.model.thread(Tid(t)).is_none() {
                    let _ = self.doc.model.add_thread(Tid(t));
                }
            }
        }
        Ok(tids)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.locked {
            let _ = self.conn.unlock();
        }
    }
}

/// A thread moved to SCHED_FIFO 1 for a session; given its own policy back when dropped (the session ends,
/// or fails to open).
struct Boost(Option<(i32, relive_proc::sched::Policy)>);

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some((tid, before)) = self.0 {
            relive_proc::sched::restore_thread(tid, before);
        }
    }
}

/// Logs `what` with the time since `t0` when dropped (timings of `-vv`).
fn scopeguard_log(pid: i32, what: &'static str, t0: std::time::Instant) -> impl Drop {
    struct G(i32, &'static str, std::time::Instant);
    impl Drop for G {
        fn drop(&mut self) {
            tracing::debug!(pid = self.0, "{} in {:?}", self.1, self.2.elapsed());
        }
    }
    G(pid, what, t0)
}
