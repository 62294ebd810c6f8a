//! `relive demo` (issue 7): start the bundled sample service, patch it live, prove its answers changed while it
//! kept serving, disable the patch, prove the original answers came back.
//!
//! Everything the demo needs is built by `cargo build --release --workspace` or at run time:
//! - the agent, `librelive_agent.so`, is a cdylib of the workspace, found next to the `relive` binary
//!   (or through `RELIVE_AGENT`);
//! - the sample service (examples/demo/service.c) and its patch (examples/demo/patch.c, written with
//!   include/relive.h) are embedded in the binary with `include_str!` and compiled at run time with the system's C
//!   compiler (`$CC`, default `cc`) into a fresh temporary directory, so the demo needs no file of the source tree.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;

use crate::driver::{
    self, Options,
    progress::{Bar, Progress},
};
use crate::output::{CmdResult, Ctx};

pub const EXAMPLES: &str = "Examples:
  relive demo                  run the whole demo (needs a C compiler: $CC or cc)
  relive demo --json           the demo's findings as JSON on stdout (narration stays on stderr)";

const SERVICE_C: &str = include_str!("../../../../examples/demo/service.c");
const PATCH_C: &str = include_str!("../../../../examples/demo/patch.c");
const RELIVE_H: &str = include_str!("../../../../include/relive.h");
const RELIVE_SHADOW_H: &str = include_str!("../../../../include/relive_shadow.h");

const ORIGINAL: &str = "hello from the original service";
const PATCHED: &str = "hello from the live patch";
const PATCH_NAME: &str = "demo-greeting";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep the temporary directory with the compiled service and patch (its path is printed).
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Serialize)]
struct Findings {
    service_pid: i32,
    agent: String,
    workdir: String,
    served_before: u64,
    served_while_patched: u64,
    served_after: u64,
    patched_answers: u64,
    original_answers_after: u64,
    apply_ms: f64,
    disable_ms: f64,
}

fn say(ctx: &Ctx, msg: &str) {
    // Narration always goes to stderr when --json keeps stdout for the document; otherwise to stdout.
    if ctx.json {
        eprintln!("{msg}");
    } else {
        crate::outln!("{msg}");
    }
}

fn compile(workdir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::write(workdir.join("service.c"), SERVICE_C)?;
    std::fs::write(workdir.join("patch.c"), PATCH_C)?;
    std::fs::write(workdir.join("relive.h"), RELIVE_H)?;
    std::fs::write(workdir.join("relive_shadow.h"), RELIVE_SHADOW_H)?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let service = workdir.join("relive-demo-service");
    let patch = workdir.join("demo-patch.so");
    let run = |args: &[&str], what: &str| -> anyhow::Result<()> {
        let out = Command::new(&cc)
            .current_dir(workdir)
            .args(args)
            .output()
            .with_context(|| {
                format!("cannot run the C compiler {cc:?} to build the demo's {what}; install gcc or set CC")
            })?;
        if !out.status.success() {
            bail!(
                "{cc} failed to build the demo's {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    run(
        &[
            "-O2",
            "-g",
            "-pthread",
            "-rdynamic",
            "-o",
            "relive-demo-service",
            "service.c",
        ],
        "sample service",
    )?;
    run(
        &[
            "-O2",
            "-g",
            "-fPIC",
            "-shared",
            "-I",
            ".",
            "-o",
            "demo-patch.so",
            "patch.c",
        ],
        "patch",
    )?;
    Ok((service, patch))
}

/// Reads service lines until `pred` held for `need` answers, or `limit` passes. Returns (answers seen, matching,
/// highest request number).
fn watch(
    child: &relive_proc::child::GuardedChild,
    limit: Duration,
    need: u64,
    pred: impl Fn(&str) -> bool,
) -> (u64, u64, u64) {
    let deadline = Instant::now() + limit;
    let (mut seen, mut hits, mut last) = (0, 0, 0);
    while Instant::now() < deadline && hits < need {
        let Some(line) = child.next_line(deadline.saturating_duration_since(Instant::now())) else {
            break;
        };
        if let Some(rest) = line.strip_prefix("request ") {
            seen += 1;
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()) {
                last = last.max(n);
            }
            if pred(&line) {
                hits += 1;
                if hits <= 2 {
                    // Show the service's own output, so the change is visible as it happens.
                    eprintln!("    service | {line}");
                }
            }
        }
    }
    (seen, hits, last)
}

fn drain(child: &relive_proc::child::GuardedChild) -> u64 {
    let mut last = 0;
    while let Some(line) = child.next_line(Duration::from_millis(0)) {
        if let Some(n) = line
            .strip_prefix("request ")
            .and_then(|r| r.split_whitespace().next())
        {
            last = n.parse().unwrap_or(last);
        }
    }
    last
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    let agent = relive_proc::agent::agent_library_path().map_err(|e| anyhow!(e))?;
    let workdir = std::env::temp_dir().join(format!("relive-demo-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("cannot create {}", workdir.display()))?;
    let result = run_in(ctx, &agent, &workdir);
    if args.keep {
        eprintln!("relive demo: kept {}", workdir.display());
    } else {
        let _ = std::fs::remove_dir_all(&workdir);
    }
    let findings = result?;
    if ctx.json {
        ctx.print_json(&findings);
    }
    Ok(())
}

fn run_in(ctx: &Ctx, agent: &Path, workdir: &Path) -> anyhow::Result<Findings> {
    say(
        ctx,
        "relive demo: building the sample service and its patch with the system C compiler",
    );
    let (service, patch) = compile(workdir)?;
    let mut cmd = Command::new(&service);
    cmd.env("LD_PRELOAD", agent);
    let child = relive_proc::child::spawn_guarded(cmd, "demo service ready", Duration::from_secs(20))
        .context("the demo's sample service did not start")?;
    let pid = child.pid();
    say(
        ctx,
        &format!(
            "relive demo: sample service running as pid {pid} (agent preloaded from {})",
            agent.display()
        ),
    );

    // 1. The original behaviour.
    let (_, orig, before) = watch(&child, Duration::from_secs(10), 4, |l| {
        l.ends_with(ORIGINAL) || l.ends_with("service!")
    });
    if orig < 4 {
        bail!("the sample service (pid {pid}) did not answer with its original greeting: saw {orig} answers");
    }
    say(
        ctx,
        &format!("relive demo: before: request {before} answered {ORIGINAL:?}"),
    );

    // 2. Apply the patch live, showing the transition.
    say(
        ctx,
        &format!("relive demo: relive apply {pid} {}", patch.display()),
    );
    let opts = Options {
        timeout: Some(Duration::from_secs(30)),
        ..Options::default()
    };
    let t = Instant::now();
    let mut bar = Bar::new();
    let applied = driver::apply(pid, &patch, &opts, &mut bar);
    bar.finish();
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    let applied = applied.map_err(|e| anyhow!("relive apply on the demo service failed: {e}"))?;
    say(ctx, &format!("relive demo: {}", applied.summary()));
    drain(&child);
    let (_, patched, during) = watch(&child, Duration::from_secs(10), 8, |l| l.ends_with(PATCHED));
    if patched < 8 {
        bail!(
            "after apply, the service (pid {pid}) did not answer with the patched greeting ({patched} answers)"
        );
    }
    if during <= before {
        bail!("the service (pid {pid}) stopped serving during the patch: request {during} after {before}");
    }
    say(
        ctx,
        &format!(
            "relive demo: patched: request {during} answered {PATCHED:?}; the service kept answering throughout"
        ),
    );

    // 3. Disable it; the original answers come back.
    say(ctx, &format!("relive demo: relive disable {pid} {PATCH_NAME}"));
    let t = Instant::now();
    let mut bar = Bar::new();
    let disabled = driver::disable(pid, PATCH_NAME, &opts, &mut bar);
    bar.finish();
    let disable_ms = t.elapsed().as_secs_f64() * 1e3;
    let disabled = disabled.map_err(|e| anyhow!("relive disable on the demo service failed: {e}"))?;
    say(ctx, &format!("relive demo: {}", disabled.summary()));
    drain(&child);
    let (_, back, after) = watch(&child, Duration::from_secs(10), 8, |l| {
        l.ends_with(ORIGINAL) || l.ends_with("service!")
    });
    if back < 8 {
        bail!("after disable, the service (pid {pid}) did not answer with its original greeting again");
    }
    say(
        ctx,
        &format!("relive demo: reverted: request {after} answered {ORIGINAL:?} again"),
    );
    say(
        ctx,
        "relive demo: done; the service was patched and reverted live without a restart",
    );
    Ok(Findings {
        service_pid: pid,
        agent: agent.display().to_string(),
        workdir: workdir.display().to_string(),
        served_before: before,
        served_while_patched: during,
        served_after: after,
        patched_answers: patched,
        original_answers_after: back,
        apply_ms,
        disable_ms,
    })
}
