//! `relive stacks PID`: owned by the process-layer work (issue 3).

use crate::output::{CmdResult, Ctx};

pub const EXAMPLES: &str = "Examples:\n  relive stacks 1234\n  relive stacks 1234 --tid 1240 --json";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process to inspect.
    pub pid: i32,
}

pub fn run(_ctx: &Ctx, args: Args) -> CmdResult {
    Err(anyhow::anyhow!("relive stacks {} is not implemented yet", args.pid).into())
}
