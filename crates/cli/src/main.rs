//! `relive`: live-patch running Linux processes.
//!
//! Each subcommand lives in its own module under `cmd/`. Output conventions (see `output.rs`):
//! with `--json`, stdout carries one JSON document and nothing else; progress and logs go to stderr.

mod cmd;
mod driver;
mod output;

use clap::{CommandFactory, Parser, Subcommand};

/// Live-patch running Linux processes, thread by thread, at moments proven safe.
#[derive(Debug, Parser)]
#[command(name = "relive", version, about, after_help = output::EXAMPLES)]
struct Cli {
    /// Print machine-readable JSON on stdout (progress and logs stay on stderr).
    #[arg(long, global = true)]
    json: bool,
    /// More log output on stderr (-v, -vv). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load a patch into a running process, enable it, and wait until every thread switched.
    #[command(after_help = cmd::apply::EXAMPLES)]
    Apply(cmd::apply::Args),
    /// Disable an active patch; on the patch in transition, reverse that transition.
    #[command(after_help = cmd::disable::EXAMPLES)]
    Disable(cmd::disable::Args),
    /// Wait for, or drive, the pending transition of a process.
    #[command(after_help = cmd::transition::EXAMPLES)]
    Transition(cmd::transition::Args),
    /// Force the pending transition: switch every remaining thread without a stack check.
    #[command(after_help = cmd::force::EXAMPLES)]
    Force(cmd::force::Args),
    /// Run every check of `apply` without changing anything; one verdict per function.
    #[command(after_help = cmd::check::EXAMPLES)]
    Check(cmd::check::Args),
    /// Patch a bundled sample service live, show the change, revert it.
    #[command(after_help = cmd::demo::EXAMPLES)]
    Demo(cmd::demo::Args),
    /// Show every thread of a process with its symbolized, reliability-checked stack.
    #[command(after_help = cmd::stacks::EXAMPLES)]
    Stacks(cmd::stacks::Args),
    /// Print a patch's manifest: name, flags, objects, functions, callbacks, states, imports.
    #[command(after_help = cmd::inspect::EXAMPLES)]
    Inspect(cmd::inspect::Args),
    /// Show the relive agent and registry of a process, or of every process that has the agent.
    #[command(after_help = cmd::status::EXAMPLES)]
    Status(cmd::status::Args),
    /// Debug: load a patch library through the agent without redirecting anything.
    #[command(hide = true, after_help = cmd::load::EXAMPLES)]
    Load(cmd::load::Args),
    /// Debug: unload a patch library loaded with `relive load`.
    #[command(hide = true, after_help = cmd::unload::EXAMPLES)]
    Unload(cmd::unload::Args),
}

/// clap's "requires a subcommand" error lists every subcommand, the hidden debug ones too: name only those
/// `relive --help` shows.
fn without_hidden_commands(e: clap::Error) -> clap::Error {
    if e.kind() != clap::error::ErrorKind::MissingSubcommand {
        return e;
    }
    let mut cmd = Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .collect();
    clap::Error::raw(
        e.kind(),
        format!(
            "relive needs a command, one of: {}; `relive --help` says what each does",
            names.join(", ")
        ),
    )
    .format(&mut cmd)
}

fn main() {
    let cli = Cli::try_parse().unwrap_or_else(|e| output::usage_error(without_hidden_commands(e)));
    output::init_logging(cli.verbose);
    let ctx = output::Ctx { json: cli.json };
    // Commands that drive a transition stop and resume target threads one by one: on CPUs full of target
    // threads they would wait for a CPU at every step. They run at the lowest real-time priority when
    // permitted (relive_proc::sched); RELIVE_SCHED=normal keeps the normal policy.
    if matches!(
        cli.command,
        Command::Apply(_) | Command::Disable(_) | Command::Transition(_) | Command::Force(_)
    ) && std::env::var("RELIVE_SCHED").map_or(true, |v| v != "normal")
    {
        let raised = relive_proc::sched::raise_to_realtime();
        tracing::debug!("real-time priority for this command: {raised}");
    }
    let result = match cli.command {
        Command::Stacks(args) => cmd::stacks::run(&ctx, args),
        Command::Inspect(args) => cmd::inspect::run(&ctx, args),
        Command::Status(args) => cmd::status::run(&ctx, args),
        Command::Load(args) => cmd::load::run(&ctx, args),
        Command::Unload(args) => cmd::unload::run(&ctx, args),
        Command::Apply(args) => cmd::apply::run(&ctx, args),
        Command::Disable(args) => cmd::disable::run(&ctx, args),
        Command::Transition(args) => cmd::transition::run(&ctx, args),
        Command::Force(args) => cmd::force::run(&ctx, args),
        Command::Check(args) => cmd::check::run(&ctx, args),
        Command::Demo(args) => cmd::demo::run(&ctx, args),
    };
    std::process::exit(output::finish(&ctx, result));
}
