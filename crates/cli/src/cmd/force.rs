//! `relive force PID`: force the pending transition (SPEC C11). Every pending thread takes the target state
//! without a stack check; the patches C11 names are marked forced and their libraries are never unloaded.

use crate::driver::{
    self, Options,
    progress::{Bar, Progress},
};
use crate::output::{CmdResult, Ctx};

pub const EXAMPLES: &str = "Examples:
  relive force 1234                       complete pid 1234's stalled transition without stack checks
  relive force 1234 --json                the outcome as JSON on stdout
Prefer `relive disable PID PATCH` (reverse) to force: a forced transition may break consistency (C11).";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The patched process.
    pub pid: i32,
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    let mut bar = Bar::new();
    let report = driver::force(args.pid, &Options::default(), &mut bar);
    bar.finish();
    driver::report_outcome(ctx, report)
}
