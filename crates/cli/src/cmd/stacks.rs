//! `relive stacks PID [--tid TID] [--json]` (issue 3, DESIGN §4.5): every thread's tid, name,
//! scheduler state, symbolized frames and reliable-stack verdict.
//!
//! Threads are stopped one at a time (stop → registers → unwind → resume); the process as a whole
//! is never stopped. A thread that exits during the command is reported as gone; if the whole
//! process exits, the command fails with "target died".

use crate::output::{CmdResult, Ctx, Failure};
use relive_elf::Avma;
use relive_proc::{ImageOptions, ProcError, ProcessImage, thread_info, thread_stack};
use relive_unwind::{DEFAULT_MAX_DEPTH, FrameKind, Verdict};
use serde::Serialize;
use std::path::PathBuf;

pub const EXAMPLES: &str = "Examples:
  relive stacks 1234                       every thread of pid 1234
  relive stacks 1234 --tid 1240 --json     one thread, as JSON on stdout
  relive stacks 1234 --debug-dir ./dbg     also look for debug files in ./dbg/.build-id/xx/rest.debug
  relive stacks 1234 --max-depth 200       allow deeper stacks before calling them unreliable";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process to inspect.
    pub pid: i32,
    /// Only this thread.
    #[arg(long)]
    pub tid: Option<i32>,
    /// Extra directory with debug files by build-id (DIR/.build-id/xx/rest.debug); repeatable.
    #[arg(long = "debug-dir")]
    pub debug_dirs: Vec<PathBuf>,
    /// Frames after which a stack that has not reached a thread root is unreliable.
    #[arg(long, default_value_t = DEFAULT_MAX_DEPTH)]
    pub max_depth: usize,
}

#[derive(Debug, Serialize)]
pub struct FrameOut {
    pub index: usize,
    pub pc: String,
    /// live, return, signal_interrupted, signal_trampoline or stub.
    pub kind: &'static str,
    pub function: Option<String>,
    pub offset: String,
    pub object: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ThreadOut {
    pub tid: i32,
    pub name: String,
    pub state: String,
    pub state_name: String,
    /// False when the thread exited during the command.
    pub alive: bool,
    pub reliable: bool,
    pub unreliable_reason: Option<String>,
    pub frames: Vec<FrameOut>,
}

#[derive(Debug, Serialize)]
pub struct StacksOut {
    pub pid: i32,
    pub threads: Vec<ThreadOut>,
}

fn kind_name(k: &FrameKind) -> &'static str {
    match k {
        FrameKind::Live => "live",
        FrameKind::Return => "return",
        FrameKind::SignalInterrupted => "signal_interrupted",
        FrameKind::SignalTrampoline => "signal_trampoline",
        FrameKind::Stub { .. } => "stub",
    }
}

fn classify(e: ProcError) -> Failure {
    Failure::Error(anyhow::Error::new(e))
}

/// Collects the stacks (library entry for tests and benchmarks).
pub fn collect(args: &Args) -> Result<StacksOut, ProcError> {
    let pid = args.pid;
    let tids = match args.tid {
        Some(t) => {
            if !std::path::Path::new(&format!("/proc/{pid}/task/{t}")).exists() {
                if !relive_proc::process_exists(pid) {
                    return Err(ProcError::NoSuchProcess { pid });
                }
                return Err(ProcError::Unexpected {
                    pid,
                    tid: Some(t),
                    detail: format!("no thread {t} in pid {pid}; list them with `relive stacks {pid}`"),
                });
            }
            vec![t]
        }
        None => relive_proc::list_threads(pid)?,
    };
    let image = ProcessImage::load(
        pid,
        &ImageOptions {
            debug_only_for: None,
            debug_dirs: args.debug_dirs.clone(),
        },
    )?;
    let mut unwinder = image.unwinder();
    // relive's own stubs and thunks have no CFI: the registry says where they are and how to step through a
    // thunk's frame (a process without the agent has none).
    if let Ok(loc) = relive_proc::agent::find_agent(pid)
        && let Ok(snap) = relive_proc::agent::read_registry(&loc)
        && snap.header.body_version == crate::driver::doc::BODY_VERSION
        && let Ok(doc) = serde_json::from_slice::<crate::driver::doc::Doc>(&snap.body)
    {
        doc.register_code(&mut unwinder);
    }
    let mut threads = Vec::with_capacity(tids.len());
    for tid in tids {
        tracing::debug!(pid, tid, "stopping and unwinding thread");
        let info = thread_info(pid, tid);
        let st = thread_stack(pid, tid, &mut unwinder, args.max_depth);
        match (info, st) {
            (Ok(info), Ok(ts)) => {
                let frames = ts
                    .stack
                    .frames
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let s = image.symbolize(Avma(f.lookup_pc()));
                        let off = if f.lookup_pc() != f.pc {
                            s.offset + 1
                        } else {
                            s.offset
                        };
                        let function = match (&f.kind, s.function) {
                            (FrameKind::Stub { label }, _) => Some(format!("[relive stub: {label}]")),
                            (_, func) => func,
                        };
                        FrameOut {
                            index: i,
                            pc: format!("{:#x}", f.pc),
                            kind: kind_name(&f.kind),
                            function,
                            offset: format!("{off:#x}"),
                            object: s.object,
                        }
                    })
                    .collect();
                let (reliable, reason) = match ts.stack.verdict {
                    Verdict::Reliable => (true, None),
                    Verdict::Unreliable(r) => (false, Some(r.to_string())),
                };
                threads.push(ThreadOut {
                    tid,
                    name: info.name,
                    state: info.state.to_string(),
                    state_name: info.state_name.to_string(),
                    alive: true,
                    reliable,
                    unreliable_reason: reason,
                    frames,
                });
            }
            (Err(e), _) | (_, Err(e)) if e.is_target_died() => {
                if !relive_proc::process_exists(pid) || is_zombie(pid) {
                    return Err(ProcError::TargetDied {
                        pid,
                        tid: Some(tid),
                        during: "relive stacks",
                    });
                }
                threads.push(ThreadOut {
                    tid,
                    name: String::new(),
                    state: "X".into(),
                    state_name: "exited".into(),
                    alive: false,
                    reliable: false,
                    unreliable_reason: Some("the thread exited during the command".into()),
                    frames: Vec::new(),
                });
            }
            (Err(e), _) | (_, Err(e)) => return Err(e),
        }
    }
    // Threads reported gone may have been the start of the whole process dying.
    if threads.iter().any(|t| !t.alive) && (!relive_proc::process_exists(pid) || is_zombie(pid)) {
        return Err(ProcError::TargetDied {
            pid,
            tid: None,
            during: "relive stacks",
        });
    }
    Ok(StacksOut { pid, threads })
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|b| relive_proc::parse_stat(&b))
        .is_some_and(|s| matches!(s.state, 'Z' | 'X'))
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    let out = collect(&args).map_err(classify)?;
    if ctx.json {
        ctx.print_json(&out);
        return Ok(());
    }
    let mut s = String::new();
    use std::fmt::Write as _;
    let n = out.threads.len();
    let noun = if n == 1 { "thread" } else { "threads" };
    let _ = writeln!(s, "pid {}: {n} {noun}", out.pid);
    for t in &out.threads {
        let verdict = match (&t.alive, &t.unreliable_reason) {
            (false, _) => "exited during the command".to_string(),
            (true, None) => "reliable".to_string(),
            (true, Some(r)) => format!("UNRELIABLE: {r}"),
        };
        let _ = writeln!(
            s,
            "\nthread {} {:?} {} ({}): {}",
            t.tid, t.name, t.state, t.state_name, verdict
        );
        for f in &t.frames {
            let func = f.function.as_deref().unwrap_or("??");
            let obj = f
                .object
                .as_deref()
                .map(|o| o.rsplit('/').next().unwrap_or(o))
                .unwrap_or("?");
            let note = match f.kind {
                "signal_interrupted" => "  [interrupted by a signal]",
                "signal_trampoline" => "  [signal handler called]",
                _ => "",
            };
            let _ = writeln!(
                s,
                "  #{:<3} {:>18} {func}+{} ({obj}){note}",
                f.index, f.pc, f.offset
            );
        }
    }
    crate::out!("{s}");
    Ok(())
}
