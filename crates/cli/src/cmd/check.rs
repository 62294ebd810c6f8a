//! `relive check PID PATCH`: run every verification of `apply` and change nothing (issue 7): build-ids, symbols,
//! prologues, conflicts, states and TLS room, with one verdict per func.

use std::path::PathBuf;

use crate::driver;
use crate::output::{CmdResult, Ctx, Failure};

pub const EXAMPLES: &str = "Examples:
  relive check 1234 fix.so                would fix.so apply to pid 1234? one verdict per function
  relive check 1234 fix.so --allow-stacking
  relive check 1234 fix.so --json         the verdicts as JSON on stdout
Exit code 0 when every check passes, 3 when apply would refuse the patch.";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process to check against.
    pub pid: i32,
    /// The patch to check.
    pub patch: PathBuf,
    /// Check as `apply --allow-stacking` would.
    #[arg(long)]
    pub allow_stacking: bool,
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    let report = driver::check(args.pid, &args.patch, args.allow_stacking)?;
    if ctx.json {
        ctx.print_json(&report);
    } else {
        crate::outln!("patch {} against pid {}:", report.patch, report.pid);
        for c in &report.general {
            crate::outln!(
                "  {:<4} {}: {}",
                if c.ok { "ok" } else { "FAIL" },
                c.what,
                c.detail
            );
        }
        for f in &report.funcs {
            crate::outln!("  {:<4} {}", if f.ok { "ok" } else { "FAIL" }, f.func);
            for line in &f.details {
                crate::outln!("         {line}");
            }
        }
        crate::outln!(
            "verdict: {}",
            if report.already_active {
                "apply would do nothing: this build of the patch is already active"
            } else if report.ok {
                "apply would proceed"
            } else {
                "apply would refuse this patch"
            }
        );
    }
    if report.ok {
        Ok(())
    } else {
        let first = report
            .general
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.what, c.detail))
            .chain(
                report
                    .funcs
                    .iter()
                    .filter(|f| !f.ok)
                    .map(|f| format!("{}: {}", f.func, f.details.join("; "))),
            )
            .next()
            .unwrap_or_default();
        let e = anyhow::anyhow!(
            "patch {} would be refused for pid {}: {first}",
            report.patch,
            report.pid
        );
        Err(if ctx.json {
            Failure::RefusedReported(e)
        } else {
            Failure::Refused(e)
        })
    }
}
