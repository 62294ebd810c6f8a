//! Progress of a transition on stderr (issue 5, issue 7 "Progress"): an indicatif bar of threads switched out of
//! all threads, and below it the current blockers: tid, function, and the frame where that function sits.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// A thread that could not be switched on the last round, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Blocker {
    pub tid: i32,
    /// Why: the function found on its stack (C5 "sleeping on function X"), or "unreliable stack: …".
    pub reason: String,
    /// The patched function found on the stack, if that is the reason.
    pub function: Option<String>,
    /// Index of the frame (0 = innermost) holding that function.
    pub frame: Option<usize>,
    /// The PC (or return address) of that frame.
    pub pc: Option<u64>,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.function, self.frame, self.pc) {
            (Some(func), Some(frame), Some(pc)) => {
                write!(
                    f,
                    "thread {} is inside {func} (frame #{frame}, pc {pc:#x})",
                    self.tid
                )
            }
            _ => write!(f, "thread {}: {}", self.tid, self.reason),
        }
    }
}

/// What the driver reports as it goes.
pub trait Progress {
    /// A round of per-thread switching ended: `switched` of `total` threads are at the target state.
    fn round(&mut self, patch: &str, target: &str, switched: usize, total: usize, blockers: &[Blocker]);
    /// A step of the walk (DESIGN §3) starts: "stop-all", "write entries", "complete" …
    fn step(&mut self, msg: &str);
    /// The transition is over (completed, left pending or failed).
    fn finish(&mut self);
}

/// How often an unchanged wait is reported again when stderr is not a terminal.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// The indicatif bar on stderr. Hidden automatically when stderr is not a terminal, in which case every change of
/// blockers is printed as a plain line, so logs and CI still show who blocks.
pub struct Bar {
    bar: Option<ProgressBar>,
    tty: bool,
    last: Vec<Blocker>,
    last_switched: usize,
    started: std::time::Instant,
    /// When the last plain line about the rounds was printed (stderr not a terminal).
    last_print: std::time::Instant,
}

impl Bar {
    pub fn new() -> Bar {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        Bar {
            bar: None,
            tty,
            last: Vec::new(),
            last_switched: usize::MAX,
            started: std::time::Instant::now(),
            last_print: std::time::Instant::now(),
        }
    }

    fn bar(&mut self, total: usize) -> &ProgressBar {
        let tty = self.tty;
        self.bar.get_or_insert_with(|| {
            let draw = if tty {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            };
            let bar = ProgressBar::with_draw_target(Some(total as u64), draw);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} threads switched ({elapsed}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        })
    }
}

impl Default for Bar {
    fn default() -> Self {
        Bar::new()
    }
}

impl Progress for Bar {
    fn round(&mut self, patch: &str, target: &str, switched: usize, total: usize, blockers: &[Blocker]) {
        let tty = self.tty;
        let bar = self.bar(total);
        bar.set_length(total as u64);
        bar.set_position(switched as u64);
        bar.set_prefix(format!("{patch} → {target}"));
        let msg = match blockers.first() {
            None => String::new(),
            Some(b) if blockers.len() == 1 => format!("; blocked: {b}"),
            Some(b) => format!("; blocked: {b} (+{} more)", blockers.len() - 1),
        };
        bar.set_message(msg);
        if !tty && (blockers != self.last.as_slice() || switched != self.last_switched) {
            eprintln!("relive: {patch} → {target}: {switched}/{total} threads switched");
            for b in blockers {
                eprintln!("relive:   blocked: {b}");
            }
            self.last_print = std::time::Instant::now();
        } else if !tty && self.last_print.elapsed() >= HEARTBEAT {
            // Nothing changed: say so now and then, so a long wait does not look like a hang.
            eprintln!(
                "relive: {patch} → {target}: still {switched}/{total} threads switched after {} s{}",
                self.started.elapsed().as_secs(),
                blockers
                    .first()
                    .map(|b| format!("; blocked: {b}"))
                    .unwrap_or_default()
            );
            self.last_print = std::time::Instant::now();
        }
        self.last = blockers.to_vec();
        self.last_switched = switched;
    }

    fn step(&mut self, msg: &str) {
        let msg = format!("{msg} (+{} ms)", self.started.elapsed().as_millis());
        match &self.bar {
            Some(bar) if self.tty => bar.println(format!("relive: {msg}")),
            _ => eprintln!("relive: {msg}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
