//! `relive transition PID`: wait for, or drive, the pending transition of a process (SPEC C4), e.g. after
//! `apply --no-wait`, a timeout, or a controller that was killed mid-way (DESIGN §4.8).

use crate::cmd::apply::Tuning;
use crate::driver::{
    self,
    progress::{Bar, Progress},
};
use crate::output::{CmdResult, Ctx};

pub const EXAMPLES: &str = "Examples:
  relive transition 1234                  drive pid 1234's pending transition to its end
  relive transition 1234 --timeout 10     give up after 10 s (exit 4, still pending)
  relive transition 1234 --json           the outcome as JSON on stdout";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The patched process.
    pub pid: i32,
    /// Stop waiting after this many seconds; the transition stays pending (exit 4). Without it, wait until
    /// the transition is over (Ctrl-C stops waiting and leaves it pending).
    #[arg(long, value_name = "S")]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub tuning: Tuning,
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    let opts = args.tuning.options(args.timeout, true);
    let mut bar = Bar::new();
    let report = driver::transition(args.pid, &opts, &mut bar);
    bar.finish();
    driver::report_outcome(ctx, report)
}
