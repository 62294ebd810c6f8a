//! `relive unload PID PATCH` (hidden, for debugging and tests of the agent layer): have the agent
//! `dlclose` a library that `relive load` loaded, found by its file name.

use crate::output::{CmdResult, Ctx, Failure};
use relive_proc::agent::{self, AgentConn, AgentError};
use std::path::PathBuf;
use std::time::Duration;

pub const EXAMPLES: &str = "Examples:
  relive unload 1234 fix.so        dlclose the fix.so that `relive load 1234 fix.so` loaded
  relive unload 1234 fix.so --all  every copy of it";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The target process.
    pub pid: i32,
    /// The patch library (matched by file name against what the agent loaded).
    pub patch: PathBuf,
    /// Unload every loaded copy, not only the most recent.
    #[arg(long)]
    pub all: bool,
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    let label = args
        .patch
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let loc = agent::find_agent(args.pid).map_err(anyhow::Error::new)?;
    let mut c = AgentConn::open(&loc, Duration::from_secs(5)).map_err(anyhow::Error::new)?;
    if let Err(e) = c.lock() {
        return Err(Failure::Refused(anyhow::Error::new(e)));
    }
    let result = (|| -> Result<Vec<u64>, AgentError> {
        let libs = c.list()?;
        let mut mine: Vec<_> = libs
            .iter()
            .filter(|l| l.label == label)
            .map(|l| l.handle)
            .collect();
        if !args.all {
            mine = mine.into_iter().max().into_iter().collect();
        }
        for h in &mine {
            c.unload(*h)?;
        }
        Ok(mine)
    })();
    let _ = c.unlock();
    let handles = result.map_err(anyhow::Error::new)?;
    if handles.is_empty() {
        return Err(Failure::Refused(anyhow::anyhow!(
            "the agent in pid {} has no library named {label:?} loaded; `relive status {}` shows the agent",
            args.pid,
            args.pid
        )));
    }
    if ctx.json {
        ctx.print_json(&serde_json::json!({ "pid": args.pid, "patch": label, "unloaded_handles": handles }));
    } else {
        crate::outln!("unloaded {label} (handles {handles:?}) from pid {}", args.pid);
    }
    Ok(())
}
