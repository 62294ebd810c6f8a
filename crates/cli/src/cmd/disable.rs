//! `relive disable PID PATCH`: disable an active patch (SPEC L4); used on the patch in transition, reverse that
//! transition (L6, C9).

use crate::cmd::apply::Tuning;
use crate::driver::{
    self,
    progress::{Bar, Progress},
};
use crate::output::{CmdResult, Ctx};

pub const EXAMPLES: &str = "Examples:
  relive disable 1234 fix                 disable patch `fix` in pid 1234 and wait until every thread is back
  relive disable 1234 fix --no-wait       start the unpatching transition and return
  relive disable 1234 fix --json          the outcome as JSON on stdout
A patch still in transition is reversed: threads already switched move back (SPEC L6).";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The patched process.
    pub pid: i32,
    /// The patch's name (as `relive status PID` shows it), or the path of its file.
    pub patch: String,
    /// Start the transition and return without waiting for it.
    #[arg(long)]
    pub no_wait: bool,
    /// Stop waiting after this many seconds; the transition stays pending (exit 4). Without it, wait until
    /// the transition is over (Ctrl-C stops waiting and leaves it pending).
    #[arg(long, value_name = "S")]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub tuning: Tuning,
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    let opts = args.tuning.options(args.timeout, !args.no_wait);
    let mut bar = Bar::new();
    let report = driver::disable(args.pid, &args.patch, &opts, &mut bar);
    bar.finish();
    driver::report_outcome(ctx, report)
}
