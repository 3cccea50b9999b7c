//! `/proc/<pid>/stat`, parsed once: the fields tests and xtask look at.

/// The fields of `/proc/<pid>/stat` we use (proc(5) numbers them from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 2, without the parentheses (may contain spaces and parentheses itself).
    pub comm: String,
    /// Field 3: `R`, `S`, `D`, `T` stopped, `t` traced, `Z` zombie …
    pub state: char,
    /// Field 4.
    pub ppid: i32,
    /// Field 14, in clock ticks.
    pub utime: u64,
    /// Field 15, in clock ticks.
    pub stime: u64,
    /// Field 22: start time in clock ticks after boot; with the pid, it identifies one process.
    pub starttime: u64,
}

impl ProcStat {
    /// Parses the text of `/proc/<pid>/stat`.
    pub fn parse(stat: &str) -> Option<ProcStat> {
        // comm (field 2) may contain spaces and parentheses: the fields after the last ')' are fixed.
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat.get(open + 1..close)?.to_owned();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // rest[0] is field 3.
        let field = |n: usize| rest.get(n - 3).copied();
        Some(ProcStat {
            comm,
            state: field(3)?.chars().next()?,
            ppid: field(4)?.parse().ok()?,
            utime: field(14)?.parse().ok()?,
            stime: field(15)?.parse().ok()?,
            starttime: field(22)?.parse().ok()?,
        })
    }

    /// Reads and parses `/proc/<pid>/stat`; `None` when there is no such process (or it cannot be read).
    pub fn read(pid: i32) -> Option<ProcStat> {
        ProcStat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// Whether the process is a zombie (exited, not reaped yet).
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z'
    }
}

/// The process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    ProcStat::read(pid).is_some_and(|s| !s.is_zombie())
}

/// The process's state letter, `None` when it does not exist.
pub fn state(pid: i32) -> Option<char> {
    ProcStat::read(pid).map(|s| s.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_comm_with_spaces_and_parentheses() {
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 123456 1000 10 \
                    18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let s = ProcStat::parse(stat).unwrap();
        assert_eq!(s.comm, "a) b (c)");
        assert_eq!((s.state, s.ppid, s.utime, s.stime, s.starttime), ('S', 1, 7, 3, 123_456));
        assert!(!s.is_zombie());
    }

    #[test]
    fn truncated_text_is_none() {
        assert_eq!(ProcStat::parse("1 (init) S 0"), None);
        assert_eq!(ProcStat::parse(""), None);
    }

    #[test]
    fn this_process_is_alive_and_its_parent_is_known() {
        let me = ProcStat::read(std::process::id() as i32).unwrap();
        // SAFETY: getppid has no preconditions.
        assert_eq!(me.ppid, unsafe { libc::getppid() });
        assert!(alive(std::process::id() as i32));
        assert_eq!(state(i32::MAX), None);
    }
}
