//! Output conventions shared by every command: exit codes, JSON on stdout, errors on stderr.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

/// Set once stdout's reader went away (EPIPE): later output is dropped and the command ends with its own exit
/// code, without a panic (SIGPIPE stays ignored: the controller must get EPIPE on the agent's pipes, not die).
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// Writes `s` to stdout. On a broken pipe (`relive … | head`) the rest of the output is dropped quietly;
/// [`finish`] still returns the command's own code (0 when it succeeded). Use [`out!`] / [`outln!`].
pub fn write_stdout(s: &str) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(s.as_bytes()).and_then(|()| o.flush()) {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("relive: cannot write to stdout: {e}");
        }
    }
}

/// `print!` that survives a closed stdout (see [`write_stdout`]).
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::output::write_stdout(&format!($($t)*)) };
}

/// `println!` that survives a closed stdout (see [`write_stdout`]).
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {{
        let mut s = format!($($t)*);
        s.push('\n');
        $crate::output::write_stdout(&s)
    }};
}

/// Exit codes (documented in README.md, "Exit codes").
pub mod exit {
    /// Success (including "already active").
    pub const OK: i32 = 0;
    /// An error: the operation could not be carried out (bad pid, permissions, target died, I/O).
    pub const ERROR: i32 = 1;
    /// Usage error (clap's own code; [`super::usage_error`] keeps it with `--json`).
    pub const USAGE: i32 = 2;
    /// Refusal: relive checked the request and declined it (conflict, incompatible state, bad patch,
    /// unpatchable prologue, busy). The target is unchanged.
    pub const REFUSED: i32 = 3;
    /// Timeout: the operation was carried out but a transition is still pending.
    pub const TIMEOUT: i32 = 4;
}

pub const EXAMPLES: &str = "Examples:
  relive demo                     patch a bundled sample service live, then revert it
  relive inspect fix.so           what fix.so replaces (its manifest)
  relive check 1234 fix.so        would fix.so apply to pid 1234? nothing changes
  relive apply 1234 fix.so        patch pid 1234 and wait until every thread switched
  relive disable 1234 fix         back to the original code
  relive stacks 1234 --json       every thread's stack, as JSON on stdout
Exit codes: 0 ok, 1 error, 2 usage, 3 refused (target unchanged), 4 timeout (transition pending).";

/// Global context every command receives.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub json: bool,
}

/// A command's failure, classified for the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Declined after checking; the target is unchanged (exit 3).
    Refused(anyhow::Error),
    /// Could not be carried out (exit 1).
    Error(anyhow::Error),
    /// Carried out, but a transition is still pending (exit 4).
    Timeout(anyhow::Error),
    /// Like `Timeout`, but the command already printed its JSON document (the pending transition's report),
    /// so `finish` adds none: stdout stays one document.
    TimeoutReported(anyhow::Error),
    /// Like `Refused`, but the command already printed its JSON document (e.g. `check`'s verdicts).
    RefusedReported(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Error(e)
    }
}

pub type CmdResult = Result<(), Failure>;

impl Ctx {
    /// Prints `value` as pretty JSON on stdout. Only call this when `self.json` is set.
    pub fn print_json<T: Serialize>(&self, value: &T) {
        match serde_json::to_string_pretty(value) {
            Ok(s) => outln!("{s}"),
            Err(e) => eprintln!("relive: cannot encode JSON output: {e}"),
        }
    }
}

/// Reports a failure (on stderr, and as `{"error": …}` on stdout with `--json`) and returns the exit code.
pub fn finish(ctx: &Ctx, result: CmdResult) -> i32 {
    let (code, kind, err) = match result {
        Ok(()) => return exit::OK,
        Err(Failure::TimeoutReported(e)) => {
            eprintln!("relive: {e:#}");
            return exit::TIMEOUT;
        }
        Err(Failure::RefusedReported(e)) => {
            eprintln!("relive: {e:#}");
            return exit::REFUSED;
        }
        Err(Failure::Refused(e)) => (exit::REFUSED, "refused", e),
        Err(Failure::Error(e)) => (exit::ERROR, "error", e),
        Err(Failure::Timeout(e)) => (exit::TIMEOUT, "timeout", e),
    };
    let chain = chain_text(&err);
    eprintln!("relive: {chain}");
    if ctx.json {
        ctx.print_json(
            &serde_json::json!({ "error": { "kind": kind, "message": chain, "exit_code": code } }),
        );
    }
    code
}

/// The error and its causes joined by ": ", leaving out a cause whose text the error before it already shows
/// (an error that prints its OS error and also returns it as its `source`): each OS error appears once.
fn chain_text(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in err.chain() {
        let t = c.to_string();
        if parts.last().is_some_and(|prev| prev.contains(&t)) {
            continue;
        }
        parts.push(t);
    }
    parts.join(": ")
}

/// A command line clap rejected. Help and version requests, and any error without `--json` on the command line,
/// take clap's usual way (text, exit 0 or 2). With `--json`, clap's text still goes to stderr, and stdout
/// carries the one JSON document every `--json` run prints: `{"error": {"kind": "usage", …, "exit_code": 2}}`.
pub fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
        || !json_requested(std::env::args_os())
    {
        e.exit()
    }
    let _ = e.print();
    let message = usage_message(&e.render().to_string());
    Ctx { json: true }.print_json(
        &serde_json::json!({ "error": { "kind": "usage", "message": message, "exit_code": exit::USAGE } }),
    );
    std::process::exit(exit::USAGE)
}

/// Whether `--json` is among the options (before a `--` that ends them).
fn json_requested(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    args.into_iter()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// clap's error text on one line: "error: " dropped, each paragraph's lines joined, paragraphs joined by "; "
/// ("invalid value 'x' for '<PID>': invalid digit found in string; for more information, try '--help'").
fn usage_message(rendered: &str) -> String {
    let rendered = rendered.trim();
    let rendered = rendered.strip_prefix("error: ").unwrap_or(rendered);
    rendered
        .split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .enumerate()
        .map(|(i, p)| {
            let p = p.trim_end_matches('.').to_string();
            let mut c = p.chars();
            match c.next() {
                Some(f) if i > 0 => f.to_lowercase().chain(c).collect(),
                _ => p,
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Logs go to stderr, filtered by RUST_LOG or by -v; coloured only when stderr is a terminal (not in a file,
/// a pipe or a CI log).
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read /proc/7/maps of pid 7: {source} (a hint)")]
    struct ShowsItsSource {
        source: std::io::Error,
    }

    #[test]
    fn usage_messages_are_one_line_and_json_is_found_before_a_double_dash() {
        assert_eq!(
            usage_message(
                "error: the following required arguments were not provided:\n  <PID>\n  <PATCH>\n\nUsage: relive apply <PID> <PATCH>\n\nFor more information, try '--help'.\n"
            ),
            "the following required arguments were not provided: <PID> <PATCH>; usage: relive apply <PID> <PATCH>; \
             for more information, try '--help'"
        );
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert!(json_requested(args(&["relive", "apply", "--json", "x"])));
        assert!(!json_requested(args(&["relive", "apply", "x"])));
        assert!(
            !json_requested(args(&["--json", "apply", "x"])),
            "argv[0] is the program"
        );
        assert!(!json_requested(args(&["relive", "apply", "--", "--json"])));
    }

    #[test]
    fn a_cause_the_message_already_shows_is_not_repeated() {
        let e = anyhow::Error::new(ShowsItsSource {
            source: std::io::Error::from_raw_os_error(13), /* EACCES */
        })
        .context("cannot map modules in pid 7");
        assert_eq!(
            chain_text(&e),
            "cannot map modules in pid 7: cannot read /proc/7/maps of pid 7: Permission denied (os error 13) (a hint)"
        );
        let e = anyhow::Error::new(std::io::Error::from_raw_os_error(2)).context("cannot read x");
        assert_eq!(
            chain_text(&e),
            "cannot read x: No such file or directory (os error 2)"
        );
    }
}
