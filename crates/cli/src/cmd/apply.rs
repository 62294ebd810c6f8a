//! `relive apply PID PATCH`: load a patch into a running process, enable it and wait for its transition
//! (issue 5; DESIGN §3 walk steps 1–10; SPEC L1, L2, L3, K5).

use std::path::PathBuf;
use std::time::Duration;

use crate::driver::{
    self, Options,
    progress::{Bar, Progress},
};
use crate::output::{CmdResult, Ctx};

pub const EXAMPLES: &str = "Examples:
  relive apply 1234 fix.so                      apply fix.so to pid 1234 and wait until every thread switched
  relive apply 1234 fix.so --timeout 30         give up waiting after 30 s (exit 4, transition left pending)
  relive apply 1234 fix.so --no-wait            start the transition and return; finish with `relive transition`
  relive apply 1234 fix2.so --allow-stacking    let fix2.so take over functions another patch owns (K5)
  relive apply 1234 fix.so --json               the outcome as JSON on stdout";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process to patch.
    pub pid: i32,
    /// The patch: an ELF shared object with a relive manifest.
    pub patch: PathBuf,
    /// Start the transition and return without waiting for it (exit 0; `relive transition PID` finishes it).
    #[arg(long)]
    pub no_wait: bool,
    /// Stop waiting after this many seconds; the transition stays pending (exit 4). Without it, wait until
    /// the transition is over (Ctrl-C stops waiting and leaves it pending).
    #[arg(long, value_name = "S")]
    pub timeout: Option<f64>,
    /// Accept a non-replace patch whose functions another active patch already owns; newest wins (SPEC K5).
    #[arg(long)]
    pub allow_stacking: bool,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Knobs of the per-thread switching loop shared by apply, disable and transition.
#[derive(Debug, Clone, clap::Args)]
pub struct Tuning {
    /// Milliseconds between two switching rounds over the threads still pending (DESIGN §4.5).
    #[arg(long, value_name = "MS", default_value_t = 10.0)]
    pub interval: f64,
    /// Maximum unwinding depth; a deeper stack counts as unreliable (SPEC C5).
    #[arg(long, default_value_t = 100)]
    pub max_depth: usize,
}

impl Tuning {
    pub fn options(&self, timeout: Option<f64>, wait: bool) -> Options {
        Options {
            interval: Duration::from_secs_f64(self.interval.max(0.0) / 1000.0),
            timeout: timeout.map(|s| Duration::from_secs_f64(s.max(0.0))),
            wait,
            max_depth: self.max_depth,
            ..Options::default()
        }
    }
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    let mut opts = args.tuning.options(args.timeout, !args.no_wait);
    opts.allow_stacking = args.allow_stacking;
    let mut bar = Bar::new();
    let report = driver::apply(args.pid, &args.patch, &opts, &mut bar);
    bar.finish();
    driver::report_outcome(ctx, report)
}
