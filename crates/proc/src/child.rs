//! Spawning helper processes that must die with us (targets in tests, the demo's sample service).
//!
//! Every child spawned through [`spawn_guarded`] gets `PR_SET_PDEATHSIG(SIGKILL)`, is killed and
//! reaped when the returned [`GuardedChild`] drops, and is only handed out after it printed its
//! readiness line (a handshake, never a sleep) within a hard timeout.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process that is SIGKILLed and reaped on drop.
pub struct GuardedChild {
    child: Child,
    /// Lines the child printed on stdout after its readiness line.
    pub lines: mpsc::Receiver<String>,
}

/// Why a guarded child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {program}: {source}")]
    Start { program: String, source: std::io::Error },
    #[error(
        "{program} (pid {pid}) did not print {ready:?} within {timeout:?}; its output so far: {output:?}"
    )]
    NotReady {
        program: String,
        pid: u32,
        ready: String,
        timeout: Duration,
        output: String,
    },
}

/// Makes `cmd` die with its parent: sets `PR_SET_PDEATHSIG(SIGKILL)` in the child before exec.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs between fork and exec and calls only prctl and getppid, both
    // async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

/// Spawns `cmd` with a piped stdout and waits until it prints a line containing `ready`.
pub fn spawn_guarded(mut cmd: Command, ready: &str, timeout: Duration) -> Result<GuardedChild, SpawnError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdout(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| SpawnError::Start {
        program: program.clone(),
        source,
    })?;
    let stdout: ChildStdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(line.trim_end().to_string()).is_err() {
                        // Nobody listens any more: drain so the child never blocks on a full pipe.
                        let _ = std::io::copy(&mut reader.by_ref(), &mut std::io::sink());
                        break;
                    }
                }
            }
        }
    });
    let deadline = std::time::Instant::now() + timeout;
    let mut output = String::new();
    let pid = child.id();
    let guard = GuardedChild { child, lines: rx };
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match guard.lines.recv_timeout(left) {
            Ok(l) if l.contains(ready) => return Ok(guard),
            Ok(l) => {
                output.push_str(&l);
                output.push('\n');
            }
            Err(_) => {
                return Err(SpawnError::NotReady {
                    program,
                    pid,
                    ready: ready.into(),
                    timeout,
                    output,
                });
            }
        }
    }
}

impl GuardedChild {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the next stdout line, up to `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Whether the child is still running (not exited, not reaped).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The underlying child, e.g. to wait for its exit status.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for GuardedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
