//! `relive load PID PATCH` (hidden, for debugging and tests of the agent layer): ensure the agent
//! (inject it if needed, DESIGN §4.6), then have it `dlopen` the patch library without redirecting
//! anything. The library is copied into a memfd made by the agent, so the path need not exist
//! inside the target's mount namespace.

use crate::output::{CmdResult, Ctx, Failure};
use anyhow::Context;
use relive_proc::agent::{self, AgentConn, AgentError, Ensured};
use relive_proc::remote::InjectOptions;
use std::path::PathBuf;
use std::time::Duration;

pub const EXAMPLES: &str = "Examples:
  relive load 1234 fix.so                       dlopen fix.so in pid 1234 through the agent
  relive load 1234 fix.so --call pre_patch      …then run `int pre_patch(void)` on the agent's thread
  relive load 1234 fix.so --dlsym new_f --json  …and print the address of new_f";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The target process.
    pub pid: i32,
    /// The patch library to load.
    pub patch: PathBuf,
    /// Run this `int fn(void)` of the patch on the agent's service thread after loading (repeatable).
    #[arg(long = "call")]
    pub calls: Vec<String>,
    /// Print the address of this symbol of the patch (repeatable).
    #[arg(long = "dlsym")]
    pub dlsyms: Vec<String>,
    /// How long to look for a thread that is safe to hijack, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// Finds or injects the agent, showing a spinner on stderr while injecting.
pub fn ensure_agent_with_spinner(pid: i32, timeout: Duration) -> Result<Ensured, AgentError> {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    pb.enable_steady_tick(Duration::from_millis(80));
    pb.set_message(format!("looking for the relive agent in pid {pid}"));
    let pb2 = pb.clone();
    let opts = InjectOptions {
        timeout,
        progress: Some(Box::new(move |m: &str| pb2.set_message(m.to_string()))),
        ..InjectOptions::default()
    };
    let r = agent::ensure_agent(pid, &opts);
    pb.finish_and_clear();
    r
}

fn label_of(patch: &std::path::Path) -> String {
    patch
        .file_name()
        .map_or_else(|| "patch.so".into(), |n| n.to_string_lossy().into_owned())
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    let bytes = std::fs::read(&args.patch)
        .with_context(|| format!("cannot read the patch file {}", args.patch.display()))?;
    let ensured = ensure_agent_with_spinner(args.pid, Duration::from_millis(args.timeout_ms))
        .with_context(|| format!("cannot get the relive agent into pid {}", args.pid))?;
    let mut c = AgentConn::open(ensured.location(), Duration::from_secs(5)).map_err(anyhow::Error::new)?;
    if let Err(e) = c.lock() {
        return Err(Failure::Refused(anyhow::Error::new(e)));
    }
    let result = (|| -> anyhow::Result<serde_json::Value> {
        let label = label_of(&args.patch);
        let lib = c.load_bytes(&label, &bytes)?;
        let mut calls = Vec::new();
        for f in &args.calls {
            calls.push(serde_json::json!({ "fn": f, "result": c.callback(lib.handle, f)? }));
        }
        let mut syms = Vec::new();
        for s in &args.dlsyms {
            syms.push(serde_json::json!({ "symbol": s, "addr": format!("{:#x}", c.dlsym(lib.handle, s)?) }));
        }
        Ok(serde_json::json!({
            "pid": args.pid,
            "patch": label,
            "handle": lib.handle,
            "base": format!("{:#x}", lib.base),
            "calls": calls,
            "dlsym": syms,
            "injected": match &ensured {
                Ensured::Injected(_, r) => serde_json::json!({
                    "tid": r.tid, "syscall": r.syscall, "attempts": r.attempts,
                    "call_ms": r.call.as_secs_f64() * 1e3, "via_frame": r.via_frame,
                }),
                Ensured::Present(_) => serde_json::Value::Null,
            },
        }))
    })();
    let _ = c.unlock();
    let v = result.with_context(|| format!("cannot load {} into pid {}", args.patch.display(), args.pid))?;
    if ctx.json {
        ctx.print_json(&v);
    } else {
        if let Ensured::Injected(_, r) = &ensured {
            eprintln!(
                "injected the agent through thread {} (blocked in {}) in {:.2} ms",
                r.tid,
                r.syscall,
                r.call.as_secs_f64() * 1e3
            );
        }
        crate::outln!(
            "loaded {} into pid {}: handle {} at base {}",
            v["patch"],
            args.pid,
            v["handle"],
            v["base"].as_str().unwrap_or("?")
        );
        for c in v["calls"].as_array().into_iter().flatten() {
            crate::outln!("  {}() returned {}", c["fn"].as_str().unwrap_or("?"), c["result"]);
        }
        for s in v["dlsym"].as_array().into_iter().flatten() {
            crate::outln!(
                "  {} at {}",
                s["symbol"].as_str().unwrap_or("?"),
                s["addr"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}
