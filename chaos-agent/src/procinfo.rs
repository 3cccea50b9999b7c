//! What a process is, read from `/proc`: its identity (pid + start time), name, command line and state.
//!
//! The lowest layer of the agent: the guards, the journal, discovery and the guardian all judge processes through
//! it, and it depends on nothing of the agent's.

use std::{fs, path::PathBuf};

use serde::{Deserialize, Serialize};

/// What the agent knows about a process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcInfo {
    /// Pid.
    pub(crate) pid: i32,
    /// Parent pid.
    pub(crate) ppid: i32,
    /// `comm` (kernel name, 15 chars).
    pub(crate) comm: String,
    /// Command line (NULs as spaces).
    pub(crate) cmdline: String,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22): with the pid, identifies the process.
    pub(crate) start_time: u64,
    /// Kernel thread (`PF_KTHREAD`).
    pub(crate) kthread: bool,
    /// State letter (`R`, `S`, `T` stopped, `Z` zombie …).
    pub state: char,
}

const PF_KTHREAD: u64 = 0x0020_0000;

/// Reads `/proc/<pid>/stat` and `cmdline`.
pub fn proc_info(pid: i32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &stat, cmdline(pid).unwrap_or_default())
}

/// The text of `/proc/<pid>/stat` split into `comm` (field 2, without its parentheses) and the fields after it
/// (the first is field 3).
pub(crate) fn split_stat(stat: &str) -> Option<(&str, Vec<&str>)> {
    // comm is in parentheses and may itself contain spaces or parentheses: split at the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some((stat.get(open + 1..close)?, stat[close + 1..].split_whitespace().collect()))
}

fn parse_stat(pid: i32, stat: &str, cmdline: String) -> Option<ProcInfo> {
    let (comm, rest) = split_stat(stat)?;
    let comm = comm.to_owned();
    // rest[0] = state (field 3), rest[1] = ppid (4), rest[6] = flags (9), rest[19] = starttime (22).
    let state = rest.first()?.chars().next()?;
    let ppid = rest.get(1)?.parse().ok()?;
    let flags: u64 = rest.get(6)?.parse().ok()?;
    let start_time = rest.get(19)?.parse().ok()?;
    Some(ProcInfo { pid, ppid, comm, cmdline, start_time, kthread: flags & PF_KTHREAD != 0, state })
}

/// Whether a process is still the one described (same pid and start time, not a zombie).
pub fn still_running(info: &ProcInfo) -> bool {
    proc_info(info.pid).is_some_and(|now| now.start_time == info.start_time && now.state != 'Z' && now.state != 'X')
}

/// The command line of a process, NULs turned into spaces (setproctitle may leave padding).
pub(crate) fn cmdline(pid: i32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text: String = String::from_utf8_lossy(&raw).replace('\0', " ");
    let text = text.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// Whether this executable is the agent's (guardians and workers re-execute it).
pub(crate) fn own_executable() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let name = exe.file_name()?.to_str()?;
    (name == "lymph-chaos").then_some(exe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let stat = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        let p = parse_stat(4242, stat, "x".into()).unwrap();
        assert_eq!(p.comm, "my (odd) proc");
        assert_eq!((p.ppid, p.start_time, p.state, p.kthread), (1, 123456, 'S', false));
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        assert!(parse_stat(2, kthread, String::new()).unwrap().kthread);
    }
}
