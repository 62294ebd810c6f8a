//! procfs for the stop-free entry write's signal-mask check: the agent reads every thread's mask before it
//! writes, and the controller's switching loop reads masks through ptrace with the same bit. Pure parsers
//! over the bytes of a file.

/// Field 32 (`blocked`, decimal: the thread's blocked signals, bit `n - 1` for signal `n`) of a
/// `/proc/…/stat` line. The fields after the command name, which may hold spaces and parentheses, start at
/// field 3.
pub fn blocked_of_stat(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    rest.split_ascii_whitespace().nth(32 - 3)?.parse().ok()
}

/// Field 3 (`state`: R, S, D, Z, X, …) of a `/proc/…/stat` line.
pub fn state_of_stat(stat: &[u8]) -> Option<char> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    rest.split_ascii_whitespace().next()?.chars().next()
}

/// Whether a `/proc/PID/stat` line is that of a process that has exited: a zombie (`Z`, not reaped yet) or
/// dead (`X`). `kill(pid, 0)` still succeeds on a zombie.
pub fn exited(stat: &[u8]) -> bool {
    matches!(state_of_stat(stat), Some('Z' | 'X'))
}

/// Bit of SIGTRAP in a signal mask.
pub const SIGTRAP_BIT: u64 = 1 << (5 - 1);

#[cfg(test)]
mod tests {
    #[test]
    fn blocked_is_field_32_even_with_a_command_name_holding_parentheses() {
        let line = b"4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 777 1000 10 \
                     18446744073709551615 1 2 3 0 0 0 16 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        assert_eq!(super::blocked_of_stat(line), Some(16));
        assert_eq!(super::blocked_of_stat(b"12 (x) S 1"), None);
    }

    #[test]
    fn a_zombie_has_exited_a_sleeper_has_not() {
        assert!(super::exited(b"77 (relive) Z 1 77 77 0 -1 4194564 0 0"));
        assert!(super::exited(b"77 (a ) S) X 1"));
        assert!(!super::exited(b"77 (relive) S 1 77"));
        assert!(!super::exited(b"garbage"));
    }
}
