//! `relive inspect PATCH`: print a patch's manifest (DESIGN §4.9), read from the file's
//! `.relive_manifest` section without loading or running anything.

use crate::output::{CmdResult, Ctx, Failure};
use anyhow::Context;
use relive_elf::manifest::{Manifest, read_manifest};
use std::path::PathBuf;

pub const EXAMPLES: &str = "Examples:
  relive inspect fix.so            the patch's name, flags, objects, functions, callbacks, states, imports
  relive inspect fix.so --json     the same manifest as JSON";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The patch library (an ELF shared object with a .relive_manifest section).
    pub patch: PathBuf,
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The human-readable form of a manifest.
pub fn render(m: &Manifest) -> String {
    let mut s = format!("patch {} (manifest format v{})\n", m.name, m.format_version);
    s += &format!(
        "  replace: {}  stacking: {}\n",
        yes_no(m.replace),
        yes_no(m.stacking)
    );
    for o in &m.objects {
        let pin = o
            .build_id
            .as_deref()
            .map_or("unpinned".to_string(), |b| format!("build-id {b}"));
        s += &format!("  object {} ({pin})\n", o.name);
        for f in &o.funcs {
            s += &format!("    func {} sympos {} -> {}\n", f.old, f.sympos, f.new);
        }
        let cb = &o.callbacks;
        for (k, v) in [
            ("pre_patch", &cb.pre_patch),
            ("post_patch", &cb.post_patch),
            ("pre_unpatch", &cb.pre_unpatch),
            ("post_unpatch", &cb.post_unpatch),
        ] {
            if let Some(f) = v {
                s += &format!("    callback {k} -> {f}\n");
            }
        }
    }
    for st in &m.states {
        s += &format!("  state id {} version {}\n", st.id, st.version);
    }
    for i in &m.imports {
        s += &format!(
            "  import {}:{} sympos {} -> slot {}\n",
            i.object, i.name, i.sympos, i.slot
        );
    }
    s
}

pub fn run(ctx: &Ctx, args: Args) -> CmdResult {
    let bytes = std::fs::read(&args.patch)
        .with_context(|| format!("cannot read the patch file {}", args.patch.display()))?;
    let m = read_manifest(&bytes)
        // A file that is not a patch is a refusal (exit 3), as in `apply` and `check`.
        .map_err(|e| {
            Failure::Refused(anyhow::anyhow!(
                "{} is not a usable relive patch: {e}",
                args.patch.display()
            ))
        })?;
    if ctx.json {
        ctx.print_json(&serde_json::json!({ "path": args.patch, "manifest": m }));
    } else {
        crate::out!("{}", render(&m));
    }
    Ok(())
}
