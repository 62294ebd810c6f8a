//! `relive`: live-patch running Linux processes.
//!
//! Each subcommand lives in its own module under `cmd/`. Output conventions (see `output.rs`):
//! with `--json`, stdout carries one JSON document and nothing else; progress and logs go to stderr.

mod cmd;
mod output;

use clap::{Parser, Subcommand};

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
    /// Show every thread of a process with its symbolized, reliability-checked stack.
    #[command(after_help = cmd::stacks::EXAMPLES)]
    Stacks(cmd::stacks::Args),
}

fn main() {
    let cli = Cli::parse();
    output::init_logging(cli.verbose);
    let ctx = output::Ctx { json: cli.json };
    let result = match cli.command {
        Command::Stacks(args) => cmd::stacks::run(&ctx, args),
    };
    std::process::exit(output::finish(&ctx, result));
}
