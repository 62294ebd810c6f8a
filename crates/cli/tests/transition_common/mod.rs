//! Shared helpers of the transition tests (issue 5): the oracle target, its patches, the `relive` binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use relive_testkit::{GuardedChild, compile_c, spawn_guarded};

pub const TARGET_FLAGS: &[&str] = &["-O2", "-g", "-pthread", "-rdynamic"];

pub fn agent() -> PathBuf {
    relive_proc::agent::agent_library_path()
        .expect("librelive_agent.so is built as a dev-dependency of relive")
}

/// The oracle target (tests/targets/transition_oracle.c) built with `flags`, the agent preloaded.
pub fn oracle_with(flags: &[&str], args: &[&str]) -> Target {
    let exe = compile_c("transition_oracle", &["transition_oracle.c"], flags);
    let mut cmd = Command::new(exe);
    cmd.args(args).env("LD_PRELOAD", agent()).stdin(Stdio::piped());
    let child = spawn_guarded(cmd, "oracle ready", Duration::from_secs(20)).expect("start the oracle target");
    Target {
        child,
        seen: Vec::new(),
    }
}

pub fn oracle(args: &[&str]) -> Target {
    oracle_with(TARGET_FLAGS, args)
}

/// A patch of the oracle built from tests/targets/transition_patch.c with `-D` defines.
pub fn patch(name: &str, defines: &[&str]) -> PathBuf {
    let mut flags: Vec<String> = ["-O2", "-g", "-fPIC", "-shared"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    flags.push(format!("-DPATCH_NAME={name}"));
    flags.extend(defines.iter().map(|d| format!("-D{d}")));
    let f: Vec<&str> = flags.iter().map(String::as_str).collect();
    compile_c(&format!("transition_patch_{name}"), &["transition_patch.c"], &f)
}

pub struct Target {
    pub child: GuardedChild,
    /// Every non-stats line the target printed (callbacks …).
    pub seen: Vec<String>,
}

pub type Stats = HashMap<String, String>;

impl Target {
    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.child.child_mut().stdin.as_mut().expect("stdin piped");
        writeln!(stdin, "{line}").expect("write to the target");
        stdin.flush().expect("flush");
    }

    /// A stats line printed after this call (older ones are drained).
    pub fn stats(&mut self) -> Stats {
        while let Some(l) = self.child.next_line(Duration::ZERO) {
            if !l.starts_with("stats ") {
                self.seen.push(l);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self
                .child
                .next_line(left)
                .expect("the target stopped printing stats (crashed?)");
            if let Some(rest) = l.strip_prefix("stats ") {
                return rest
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            }
            self.seen.push(l);
        }
    }

    /// Waits until every worker's last call ran version `v`.
    pub fn wait_workers(&mut self, v: u32) -> Stats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats();
            if s["workers"].split(',').all(|w| w == v.to_string()) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "workers did not all reach version {v}: {s:?}"
            );
        }
    }

    /// Waits for a line the target prints that starts with `prefix` (stats lines aside) and returns it.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.child.next_line(left).unwrap_or_else(|| {
                panic!(
                    "the target printed no line starting with {prefix:?}: {:?}",
                    self.seen
                )
            });
            if !l.starts_with("stats ") {
                self.seen.push(l);
            }
        }
    }

    pub fn callbacks(&mut self) -> Vec<String> {
        let _ = self.stats();
        self.seen
            .iter()
            .filter(|l| l.starts_with("callback "))
            .cloned()
            .collect()
    }

    pub fn alive(&mut self) -> bool {
        self.child.is_running()
    }

    pub fn maps(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).expect("read maps")
    }
}

pub fn num(s: &Stats, k: &str) -> u64 {
    s[k].parse()
        .unwrap_or_else(|_| panic!("stats field {k} in {s:?}"))
}

/// Runs `relive ARGS`, with a hard timeout.
pub fn relive(args: &[&str]) -> Output {
    relive_env(args, &[])
}

/// Runs `relive ARGS` with extra environment variables, with a hard timeout.
pub fn relive_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_relive"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run relive");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().expect("wait relive").is_some() {
            return child.wait_with_output().expect("relive output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().expect("relive output");
            panic!(
                "relive {args:?} did not finish in 90 s: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn ok(args: &[&str]) -> Output {
    let o = relive(args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "relive {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The target's mappings that relive could add or change: every file-backed, special (`[vdso]`, …) or
/// executable mapping. Anonymous non-executable mappings are left out: they are malloc arenas and thread
/// stacks, which the target's threads (and the agent's service thread answering a request) grow, trim and
/// re-create on their own; a glibc arena was once caught being re-created between two reads. relive's own
/// pages (stubs, thunks, copies) are anonymous r-x and stay in.
pub fn relive_relevant_maps(maps: &str) -> String {
    maps.lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let anonymous = f.len() < 6;
            let exec = f.get(1).is_some_and(|p| p.contains('x'));
            !anonymous || exec
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The bytes of the target's executable text (first r-xp mapping of the executable) and its map (the part
/// relive could change: [`relive_relevant_maps`]).
pub fn text_and_maps(t: &Target) -> (Vec<u8>, String) {
    let maps = relive_relevant_maps(&t.maps());
    let exe = std::fs::read_link(format!("/proc/{}/exe", t.pid())).expect("exe link");
    let line = maps
        .lines()
        .find(|l| l.contains(" r-xp ") && l.ends_with(&*exe.to_string_lossy()))
        .expect("the executable's text mapping");
    let range = line.split_whitespace().next().unwrap();
    let (a, b) = range.split_once('-').unwrap();
    let (a, b) = (
        u64::from_str_radix(a, 16).unwrap(),
        u64::from_str_radix(b, 16).unwrap(),
    );
    let mut buf = vec![0u8; (b - a) as usize];
    relive_proc::read_memory(t.pid(), a, &mut buf).expect("read text");
    (buf, maps)
}

/// A repetition count from the environment (`RELIVE_ORACLE_CYCLES`, …), or `default`.
pub fn env_count(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
