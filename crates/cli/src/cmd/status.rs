//! `relive status [PID]`: read the agent's registry of one process, or of every process that has
//! the agent, without stopping anything (DESIGN §4.8: process_vm_readv under the seqlock).

use crate::output::{CmdResult, Ctx};
use relive_abi::registry::{FLAG_PRELOADED, FLAG_READY, FLAG_TRAP_HANDLER};
use relive_proc::agent::{self, AgentError, AgentLocation};
use serde::Serialize;

pub const EXAMPLES: &str = "Examples:
  relive status                   every process that has the relive agent loaded
  relive status 1234              the agent, active patches and pending transition of pid 1234
  relive status 1234 --json       the same as JSON";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process; without it, every process on the system that has the agent.
    pub pid: Option<i32>,
}

/// One process's agent, as printed.
#[derive(Debug, Serialize)]
pub struct AgentStatus {
    pub pid: i32,
    pub agent_path: String,
    pub registry_addr: String,
    pub agent_version: u32,
    pub agent_pid: u32,
    pub ready: bool,
    pub preloaded: bool,
    /// The agent's SIGTRAP handler is installed: entries whose first instruction is replaced whole are
    /// written without stopping the process (the int3 protocol; docs/FAQ.md).
    pub stop_free_writes: bool,
    pub service_tid: u32,
    pub tpoff: i64,
    pub tls_image_addr: String,
    pub req_fd: i32,
    pub resp_fd: i32,
    pub controller_lock: Option<u32>,
    pub generation: u64,
    pub body_version: u32,
    pub body_len: u32,
    pub body_capacity: u32,
    /// The active patches, in stack order (from the driver's document in the registry body).
    pub patches: Vec<PatchStatus>,
    /// The pending transition, if any.
    pub transition: Option<TransitionStatus>,
}

/// One active patch, as `relive status` shows it.
#[derive(Debug, Serialize)]
pub struct PatchStatus {
    pub name: String,
    pub path: String,
    pub enabled: bool,
    pub in_transition: bool,
    pub replace: bool,
    pub stacking: bool,
    pub forced: bool,
    /// `<object>/<name>,<sympos>` of every function it replaces.
    pub funcs: Vec<String>,
}

/// The pending transition.
#[derive(Debug, Serialize)]
pub struct TransitionStatus {
    pub patch: String,
    /// patched | unpatched
    pub target: String,
    pub threads: usize,
    pub pending: usize,
}

/// The patches and transition of the driver's document (empty when no patch was ever applied).
fn patches_of(body_version: u32, body: &[u8]) -> (Vec<PatchStatus>, Option<TransitionStatus>) {
    if body.is_empty() || body_version != crate::driver::doc::BODY_VERSION {
        return (vec![], None);
    }
    let Ok(doc) = serde_json::from_slice::<crate::driver::doc::Doc>(body) else {
        return (vec![], None);
    };
    let m = &doc.model;
    let patches = m
        .patches()
        .iter()
        .map(|p| PatchStatus {
            name: p.name.clone(),
            path: doc.patch(&p.name).map(|r| r.path.clone()).unwrap_or_default(),
            enabled: p.enabled,
            in_transition: m.in_transition(&p.name),
            replace: p.replace,
            stacking: p.stacking,
            forced: p.forced,
            funcs: p.funcs().map(|(_, f)| f.id.to_string()).collect(),
        })
        .collect();
    let transition = m.transition().map(|t| TransitionStatus {
        patch: t.patch.clone(),
        target: crate::driver::switch::target_word(t.target).into(),
        threads: m.threads().len(),
        pending: m.pending().len(),
    });
    (patches, transition)
}

/// Reads one process's registry.
pub fn status_of(loc: &AgentLocation) -> Result<AgentStatus, AgentError> {
    let s = agent::read_registry(loc)?;
    let h = s.header;
    let (patches, transition) = patches_of(h.body_version, &s.body);
    Ok(AgentStatus {
        pid: loc.pid,
        agent_path: loc.path.clone(),
        registry_addr: format!("{:#x}", loc.registry_addr),
        agent_version: h.agent_version,
        agent_pid: h.agent_pid,
        ready: h.flags & FLAG_READY != 0,
        preloaded: h.flags & FLAG_PRELOADED != 0,
        stop_free_writes: h.flags & FLAG_TRAP_HANDLER != 0,
        service_tid: h.service_tid,
        tpoff: h.tpoff,
        tls_image_addr: format!("{:#x}", h.tls_image_addr),
        req_fd: h.req_fd,
        resp_fd: h.resp_fd,
        controller_lock: (h.lock_owner != 0).then_some(h.lock_owner),
        generation: h.generation,
        body_version: h.body_version,
        body_len: h.body_len,
        body_capacity: h.body_capacity,
        patches,
        transition,
    })
}

/// Whether the relive that holds a lock has exited: gone, or a zombie its parent has not reaped (the agent
/// takes such a lock over, `ops::process_alive`).
fn lock_owner_exited(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/stat")) {
        Ok(stat) => relive_abi::procfs::exited(&stat),
        Err(_) => !relive_proc::process_exists(pid as i32),
    }
}

/// A func as `FuncId` spells it (`<object>/<name>,<sympos>`, the object being a path) for a reader:
/// `<object file name>:<name>`, with `,<sympos>` only when it picks one of several (above 1).
fn short_func(f: &str) -> String {
    let Some((object, rest)) = f.rsplit_once('/') else {
        return f.to_string();
    };
    let object = object.rsplit('/').next().unwrap_or(object);
    let rest = match rest.rsplit_once(',') {
        Some((name, "0" | "1")) => name,
        _ => rest,
    };
    format!("{object}:{rest}")
}

fn render(s: &AgentStatus) -> String {
    let mut out = format!(
        "pid {}: agent v{} ({}){}\n",
        s.pid,
        s.agent_version,
        if s.ready { "ready" } else { "starting" },
        if s.preloaded { ", preloaded" } else { ", injected" }
    );
    out += &format!("  library        {}\n", s.agent_path);
    out += &format!(
        "  entry writes   {}\n",
        if s.stop_free_writes {
            "stop-free where the first instruction is replaced whole (int3 protocol), else one stop-all"
        } else {
            "under one stop of every thread (the agent was not preloaded: no SIGTRAP handler)"
        }
    );
    out += &format!("  service thread {}\n", s.service_tid);
    out += &format!(
        "  TLS slot       fs:[{}] (init image at {})\n",
        s.tpoff, s.tls_image_addr
    );
    out += &format!(
        "  channel        /proc/{}/fd/{} -> /proc/{}/fd/{}\n",
        s.pid, s.req_fd, s.pid, s.resp_fd
    );
    match s.controller_lock {
        Some(p) if lock_owner_exited(p) => {
            out += &format!(
                "  controller     none (relive pid {p}, which held the lock, has exited; the next command takes it over)\n"
            )
        }
        Some(p) => out += &format!("  controller     locked by relive pid {p}\n"),
        None => out += "  controller     none\n",
    }
    out += &format!(
        "  registry       generation {}, body v{} {} of {} bytes\n",
        s.generation, s.body_version, s.body_len, s.body_capacity
    );
    if s.patches.is_empty() {
        out += "  patches        none\n";
    }
    for p in &s.patches {
        let flags: Vec<&str> = [
            (p.in_transition, "in transition"),
            (p.replace, "replace"),
            (p.stacking, "stacking"),
            (p.forced, "forced"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, w)| *w)
        .collect();
        out += &format!(
            "  patch          {}{} ({}): {}\n",
            p.name,
            if flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", flags.join(", "))
            },
            p.path,
            if p.funcs.is_empty() {
                "no functions".to_string()
            } else {
                p.funcs
                    .iter()
                    .map(|f| short_func(f))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        );
    }
    if let Some(t) = &s.transition {
        out += &format!(
            "  transition     {} -> {}: {} of {} threads pending (`relive transition {}` drives it)\n",
            t.patch, t.target, t.pending, t.threads, s.pid
        );
    }
    out
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    match args.pid {
        Some(pid) => {
            let loc = match agent::find_agent(pid) {
                Ok(l) => l,
                Err(AgentError::NotLoaded { .. }) => {
                    if ctx.json {
                        ctx.print_json(&serde_json::json!({ "pid": pid, "agent": null }));
                    } else {
                        crate::outln!("pid {pid}: no relive agent loaded (nothing is patched)");
                    }
                    return Ok(());
                }
                Err(e) => return Err(anyhow::Error::new(e).into()),
            };
            let s = match status_of(&loc) {
                Ok(s) => s,
                Err(AgentError::Initializing { .. }) => {
                    // An injection is under way (or its controller died mid-call and the target
                    // finishes the dlopen on its own): not an error.
                    if ctx.json {
                        ctx.print_json(&serde_json::json!({ "pid": pid, "agent": "initializing" }));
                    } else {
                        crate::outln!(
                            "pid {pid}: relive agent mapped, still initialising (being loaded); retry"
                        );
                    }
                    return Ok(());
                }
                Err(e) => return Err(anyhow::Error::new(e).into()),
            };
            if ctx.json {
                ctx.print_json(&serde_json::json!({ "pid": pid, "agent": s }));
            } else {
                crate::out!("{}", render(&s));
            }
        }
        None => {
            let mut all = Vec::new();
            let mut errors = Vec::new();
            let scan = agent::processes_with_agent();
            for loc in &scan.found {
                match status_of(loc) {
                    Ok(s) => all.push(s),
                    Err(e) => errors.push(serde_json::json!({ "pid": loc.pid, "error": e.to_string() })),
                }
            }
            // Processes this user may not inspect are not silently left out: say how many.
            if !scan.unreadable.is_empty() {
                let root = relive_proc::effective_uid() == 0;
                eprintln!(
                    "relive: {} process(es) could not be inspected (permission denied to their memory map, e.g. \
                     pid {}){}",
                    scan.unreadable.len(),
                    scan.unreadable[0],
                    if root {
                        ": they are protected from tracing even for root (a security module, another user \
                         namespace, or the VM's init)"
                    } else {
                        ": run relive as root, or with CAP_SYS_PTRACE, to see every process"
                    }
                );
            }
            if ctx.json {
                ctx.print_json(&serde_json::json!({
                    "processes": all,
                    "errors": errors,
                    "unreadable": scan.unreadable,
                }));
            } else if all.is_empty() && errors.is_empty() {
                if scan.unreadable.is_empty() {
                    crate::outln!("no process has the relive agent loaded");
                } else {
                    crate::outln!("no process this user may inspect has the relive agent loaded");
                }
            } else {
                for s in &all {
                    crate::out!("{}", render(s));
                }
                for e in &errors {
                    eprintln!("relive: pid {}: {}", e["pid"], e["error"]);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn funcs_read_as_object_file_and_name() {
        assert_eq!(
            super::short_func("/srv/bin/kv/handle_request,1"),
            "kv:handle_request"
        );
        assert_eq!(
            super::short_func("/lib/libchk.so/chk_sum,2"),
            "libchk.so:chk_sum,2"
        );
        assert_eq!(super::short_func("weird"), "weird");
    }
}
