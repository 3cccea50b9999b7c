//! Process faults and the guards that keep them safe.
//!
//! Signals go through a pidfd (`pidfd_open` + `pidfd_send_signal`, Linux ≥ 5.3) after checking that the pid
//! still names the process we resolved (same start time), so a pid reused between resolution and signal is
//! never hit. Every target passes [`Guards::check`] first: never pid 1, the agent, its parent, kernel threads,
//! ZooKeeper, sshd, protected patterns, or a process that is neither a lymph instance nor allowed by the
//! configuration.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

pub use crate::procinfo::{ProcInfo, proc_info, still_running};

/// A pattern matching a process: a substring of its command line or comm, or `/regex/`.
#[derive(Clone, Debug)]
pub(crate) enum Pattern {
    /// Substring.
    Text(String),
    /// Regular expression.
    Regex(regex::Regex),
}

impl Pattern {
    /// Parses `text` or `/regex/`.
    ///
    /// # Errors
    /// An empty pattern or an invalid regular expression.
    pub(crate) fn parse(s: &str) -> Result<Pattern, PatternError> {
        if s.len() >= 2 && s.starts_with('/') && s.ends_with('/') {
            regex::Regex::new(&s[1..s.len() - 1])
                .map(Pattern::Regex)
                .map_err(|source| PatternError::Regex { pattern: s.to_owned(), source })
        } else if s.is_empty() {
            Err(PatternError::Empty)
        } else {
            Ok(Pattern::Text(s.to_owned()))
        }
    }

    /// Whether it matches a process.
    pub(crate) fn matches(&self, p: &ProcInfo) -> bool {
        match self {
            Pattern::Text(t) => p.cmdline.contains(t.as_str()) || p.comm == *t,
            Pattern::Regex(r) => r.is_match(&p.cmdline) || r.is_match(&p.comm),
        }
    }
}

/// A process pattern that does not parse.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PatternError {
    /// Nothing to match.
    #[error("empty process pattern")]
    Empty,
    /// `/…/` around an invalid regular expression.
    #[error("invalid pattern {pattern}: {source}")]
    Regex {
        /// The pattern as given.
        pattern: String,
        /// What the regex parser said.
        #[source]
        source: regex::Error,
    },
}

/// Every process matching a pattern, except kernel threads and lymph-chaos's own processes (the CLI asking for a
/// pattern has that pattern in its own command line).
pub(crate) fn find(pattern: &Pattern) -> Vec<ProcInfo> {
    crate::discovery::sockets::all_pids()
        .into_iter()
        .filter_map(proc_info)
        .filter(|p| !p.kthread && !is_lymph_chaos(p) && pattern.matches(p))
        .collect()
}

/// A process the guards refuse, and which rule protects it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("pid {pid} ({comm}) is protected: {reason}")]
pub(crate) struct Protected {
    /// The pid.
    pub(crate) pid: i32,
    /// Its comm.
    pub(crate) comm: String,
    /// The rule.
    pub(crate) reason: Protection,
}

/// The rule that protects a process from faults.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Protection {
    /// Pid 1 (or below).
    #[error("pid 1 (init) is never a target")]
    Init,
    /// The agent itself.
    #[error("it is the chaos agent itself")]
    Agent,
    /// The agent's parent (a supervisor, the shell or test that started it).
    #[error("it is the chaos agent's parent")]
    AgentParent,
    /// A kernel thread.
    #[error("kernel threads are never targets")]
    KernelThread,
    /// ZooKeeper (by command line, comm, or as the local ZooKeeper the agent talks to).
    #[error("ZooKeeper is never a target (the registry every service depends on)")]
    ZooKeeper,
    /// sshd.
    #[error("sshd is never a target (you would lose the machine)")]
    Sshd,
    /// A lymph-chaos process.
    #[error("lymph-chaos processes (agents, their guardians and workers, the CLI) are never targets")]
    LymphChaos,
    /// It matches `faults.protected_processes`.
    #[error("it matches faults.protected_processes ({pattern})")]
    ProtectedPattern {
        /// The pattern it matches.
        pattern: String,
    },
    /// Neither a lymph instance nor allowed by `faults.allowed_processes`.
    #[error(
        "it is not a lymph service instance (its command line `{cmdline}` is not one lymph starts) and matches \
         none of faults.allowed_processes (add a pattern there to allow targeting other processes)"
    )]
    NotAllowed {
        /// The start of its command line.
        cmdline: String,
    },
}

/// How a process was selected (guards are stricter for arbitrary processes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A lymph service instance resolved through discovery.
    LymphInstance,
    /// Named directly (pid, port, process pattern).
    Direct,
}

/// The safety rules for process targets.
#[derive(Clone, Debug)]
pub(crate) struct Guards {
    /// The agent's pid.
    pub(crate) agent_pid: i32,
    /// The agent's parent.
    pub(crate) agent_ppid: i32,
    /// Pids that are never targets (e.g. the ZooKeeper the agent talks to, found by its port).
    pub(crate) protected_pids: Vec<i32>,
    /// Never targeted.
    pub(crate) protected: Vec<Pattern>,
    /// Direct targets must match one of these, unless they are lymph instances.
    pub(crate) allowed: Vec<Pattern>,
    /// Pids of lymph instances in the registry (informational: a registry entry never makes a process a target).
    pub(crate) lymph_pids: Vec<i32>,
}

impl Guards {
    /// Guards for this process with configured patterns.
    ///
    /// # Errors
    /// An invalid pattern.
    pub(crate) fn new(protected: &[String], allowed: &[String]) -> Result<Guards, PatternError> {
        Ok(Guards {
            agent_pid: std::process::id() as i32,
            agent_ppid: nix::unistd::getppid().as_raw(),
            protected_pids: Vec::new(),
            protected: protected.iter().map(|p| Pattern::parse(p)).collect::<Result<_, _>>()?,
            allowed: allowed.iter().map(|p| Pattern::parse(p)).collect::<Result<_, _>>()?,
            lymph_pids: Vec::new(),
        })
    }

    /// Checks one process.
    ///
    /// # Errors
    /// [`Protected`] saying which rule protects it.
    pub(crate) fn check(&self, p: &ProcInfo, origin: Origin) -> Result<(), Protected> {
        let refuse = |reason: Protection| Err(Protected { pid: p.pid, comm: p.comm.clone(), reason });
        if p.pid <= 1 {
            return refuse(Protection::Init);
        }
        if p.pid == self.agent_pid {
            return refuse(Protection::Agent);
        }
        if p.pid == self.agent_ppid {
            return refuse(Protection::AgentParent);
        }
        if p.kthread || p.pid == 2 || p.ppid == 2 {
            return refuse(Protection::KernelThread);
        }
        if p.cmdline.contains("org.apache.zookeeper") || p.comm == "zookeeper" || self.protected_pids.contains(&p.pid) {
            return refuse(Protection::ZooKeeper);
        }
        if p.comm == "sshd" || p.cmdline.starts_with("sshd") || p.cmdline.starts_with("/usr/sbin/sshd") {
            return refuse(Protection::Sshd);
        }
        if is_lymph_chaos(p) {
            return refuse(Protection::LymphChaos);
        }
        if let Some(pat) = self.protected.iter().find(|pat| pat.matches(p)) {
            return refuse(Protection::ProtectedPattern { pattern: show(pat) });
        }
        // What the process is now decides, not how it was found: a registry entry (anyone who can write to
        // ZooKeeper) or a port only say where to look.
        let _ = origin;
        if !is_lymph_instance(p) && !self.allowed.iter().any(|pat| pat.matches(p)) {
            return refuse(Protection::NotAllowed { cmdline: p.cmdline.chars().take(120).collect() });
        }
        Ok(())
    }
}

/// Whether the process itself says it is a lymph instance: the title `lymph instance` sets
/// (`lymph-instance (identity: …, endpoint: …, config: …)`), or, before the title is set, the command line lymph
/// starts it with (`…/lymph instance …`, also under a Python interpreter).
pub(crate) fn is_lymph_instance(p: &ProcInfo) -> bool {
    if crate::discovery::local::parse_title(&p.cmdline).is_some() {
        return true;
    }
    let args: Vec<&str> = p.cmdline.split_whitespace().take(4).collect();
    args.windows(2).any(|w| (w[0] == "lymph" || w[0].ends_with("/lymph")) && w[1] == "instance")
}

/// Whether a process is one of ours (agent, guardian, worker, or the CLI that may be asking right now).
pub(crate) fn is_lymph_chaos(p: &ProcInfo) -> bool {
    p.comm.starts_with("lymph-chaos")
        || p.cmdline.starts_with("lymph-chaos")
        || p.cmdline.split(' ').next().is_some_and(|a| a.ends_with("/lymph-chaos"))
}

fn show(p: &Pattern) -> String {
    match p {
        Pattern::Text(t) => t.clone(),
        Pattern::Regex(r) => format!("/{}/", r.as_str()),
    }
}

/// The conventional name of a signal number.
pub(crate) fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        libc::SIGSTOP => "SIGSTOP".into(),
        libc::SIGCONT => "SIGCONT".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        n => format!("signal {n}"),
    }
}

/// Why a signal was not delivered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SignalError {
    /// The process is gone or is another process now.
    #[error("pid {0} is no longer the process that was targeted")]
    Gone(i32),
    /// The kernel refused.
    #[error("signal to pid {pid}: {source}")]
    Os {
        /// Pid.
        pid: i32,
        /// Error.
        source: std::io::Error,
    },
}

/// A handle on one process that cannot be confused with a later process reusing its pid.
pub(crate) struct PidFd {
    fd: OwnedFd,
    /// The process.
    pub(crate) info: ProcInfo,
}

impl PidFd {
    /// Opens a pidfd and checks it still names `info`.
    ///
    /// # Errors
    /// [`SignalError::Gone`] when the process exited or the pid was reused.
    pub(crate) fn open(info: &ProcInfo) -> Result<PidFd, SignalError> {
        // SAFETY: pidfd_open(pid, 0) has no memory arguments.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, info.pid, 0) };
        if raw < 0 {
            return Err(SignalError::Gone(info.pid));
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        // The pidfd pins the pid: if the start time still matches now, it is the same process.
        if !still_running(info) {
            return Err(SignalError::Gone(info.pid));
        }
        Ok(PidFd { fd, info: info.clone() })
    }

    /// Sends a signal.
    ///
    /// # Errors
    /// [`SignalError::Gone`] if it already exited, or the kernel's error.
    pub(crate) fn signal(&self, sig: i32) -> Result<(), SignalError> {
        // SAFETY: pidfd_send_signal(fd, sig, NULL, 0).
        let rc = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.fd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                return Err(SignalError::Gone(self.info.pid));
            }
            return Err(SignalError::Os { pid: self.info.pid, source: err });
        }
        Ok(())
    }

    /// Waits until the process has exited (the pidfd becomes readable), up to `timeout`.
    pub(crate) fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: polling one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc > 0 {
                return true;
            }
            if rc == 0 || Instant::now() >= deadline {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chaos_api::units::parse_signal;

    use super::*;

    fn info(pid: i32, comm: &str, cmdline: &str) -> ProcInfo {
        ProcInfo {
            pid,
            ppid: 100,
            comm: comm.into(),
            cmdline: cmdline.into(),
            start_time: 1,
            kthread: false,
            state: 'S',
        }
    }

    #[test]
    fn guards_refuse_the_dangerous_and_allow_lymph_instances() {
        let mut g = Guards::new(&["postgres: checkpointer".into()], &["/^redis-server/".into()]).unwrap();
        g.agent_pid = 500;
        g.agent_ppid = 499;
        let lymph = info(700, "python3", "lymph-instance (identity: abc, endpoint: tcp://127.0.0.1:1, config: x)");
        assert!(g.check(&info(1, "init", "/sbin/init"), Origin::Direct).is_err());
        assert!(g.check(&info(500, "lymph-chaos", "lymph-chaos agent"), Origin::Direct).is_err());
        assert!(g.check(&info(499, "bash", "bash"), Origin::Direct).is_err());
        let zk = info(800, "java", "java -cp x org.apache.zookeeper.server.quorum.QuorumPeerMain zoo.cfg");
        assert_eq!(g.check(&zk, Origin::LymphInstance).unwrap_err().reason, Protection::ZooKeeper);
        assert!(g.check(&info(801, "sshd", "sshd: root@pts/0"), Origin::Direct).is_err());
        assert!(g.check(&lymph, Origin::Direct).is_ok());
        assert!(g.check(&info(900, "redis-server", "redis-server *:6379"), Origin::Direct).is_ok());
        let other = g.check(&info(901, "nginx", "nginx: worker"), Origin::Direct).unwrap_err();
        assert!(matches!(other.reason, Protection::NotAllowed { .. }), "{other}");
        assert!(other.to_string().contains("allowed_processes"), "{other}");
        assert!(g.check(&info(902, "postgres", "postgres: checkpointer"), Origin::Direct).is_err());
    }

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("SIGKILL"), Some(9));
        assert_eq!(parse_signal("term"), Some(15));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("SIGBOGUS"), None);
        assert_eq!(parse_signal("99"), None);
        assert_eq!(signal_name(15), "SIGTERM");
    }

    #[test]
    fn pidfd_signals_only_the_process_it_was_opened_for() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let info = proc_info(pid).unwrap();
        let fd = PidFd::open(&info).unwrap();
        fd.signal(libc::SIGKILL).unwrap();
        let _ = child.wait();
        assert!(fd.wait_exit(Duration::from_secs(1)));
        // A stale description (other start time) is refused.
        let stale = ProcInfo { start_time: info.start_time + 1, ..info };
        assert!(matches!(PidFd::open(&stale), Err(SignalError::Gone(_))));
    }
}
