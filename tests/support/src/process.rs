//! Child processes of tests and of xtask: they die with the thread that started them ([`DieWithParent`]), are
//! stopped by their own, not yet reaped [`Child`] handle — never by a bare pid that may have been reused — and
//! their logs are shown by their tail.

use std::{
    io,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, ExitStatus},
    time::Duration,
};

/// How often the helpers here look at a child that is exiting.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// Ties a child to the thread that spawns it.
pub trait DieWithParent {
    /// Makes the child get SIGKILL when the thread that spawns it exits (`PR_SET_PDEATHSIG`, kept across
    /// `execve`), even when that thread's process is SIGKILLed. The "parent" is the spawning *thread*: spawn from
    /// a thread that lives as long as the child should. If the parent is already gone when the child starts, the
    /// child exits at once.
    fn die_with_parent(&mut self) -> &mut Self;
}

impl DieWithParent for Command {
    fn die_with_parent(&mut self) -> &mut Self {
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure runs between fork and exec and only calls async-signal-safe functions (prctl,
        // getppid, _exit), without allocating.
        unsafe {
            self.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent died between fork and prctl: nobody would stop us later.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            })
        }
    }
}

/// Waits up to `timeout` for the child to exit; its status, or `None` while it still runs.
///
/// # Errors
/// When waiting fails.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let waited = crate::eventually("the child to exit", timeout, EXIT_POLL, || child.try_wait());
    match waited {
        Ok(status) => Ok(Some(status)),
        Err(err) => match err.downcast::<io::Error>() {
            Ok(io) => Err(io),
            Err(_timed_out) => Ok(None),
        },
    }
}

/// SIGTERM, then SIGKILL after `grace`; reaps. Only signals our own, not yet reaped child (its pid cannot have
/// been reused). A zero `grace` is a plain SIGKILL.
///
/// # Errors
/// When signalling or waiting fails.
pub fn stop_child(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    if !grace.is_zero() {
        terminate(child)?;
        if let Some(status) = wait_timeout(child, grace)? {
            return Ok(status);
        }
    }
    child.kill()?;
    child.wait()
}

/// Sends SIGTERM to our own, not yet reaped child.
///
/// # Errors
/// When the signal cannot be sent.
pub fn terminate(child: &Child) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    // SAFETY: kill has no memory-safety preconditions; pid is our unreaped child (the caller holds `&Child`).
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A child process that is stopped when the guard is dropped: SIGTERM and up to `grace` to exit, then SIGKILL
/// (a zero grace: SIGKILL at once); always reaped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    grace: Duration,
}

impl ChildGuard {
    /// Guards `child`; dropping the guard SIGKILLs it.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child), grace: Duration::ZERO }
    }

    /// Guards `child`; dropping the guard sends SIGTERM and waits up to `grace` before SIGKILL.
    pub fn with_grace(child: Child, grace: Duration) -> ChildGuard {
        ChildGuard { child: Some(child), grace }
    }

    /// Its pid (0 once stopped).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The child, while it has not been stopped.
    pub fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Whether the child has exited (reaping it); `false` once [`ChildGuard::stop`]ped.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Stops it now as on drop; its exit status (`None` when it was stopped before, or waiting failed).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        stop_child(&mut child, self.grace).ok()
    }

    /// SIGKILL now and reap, whatever the grace.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Gives the child up (it is not stopped any more).
    pub fn into_inner(mut self) -> Option<Child> {
        self.child.take()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `lines` lines of a log file (or why it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail_of(&String::from_utf8_lossy(&bytes), lines),
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// The last `lines` lines of `text`.
pub fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;
    use crate::proc_stat;

    fn sleeper() -> Command {
        let mut cmd = Command::new("sleep");
        cmd.arg("600").stdin(Stdio::null());
        cmd
    }

    #[test]
    fn a_child_dies_with_the_thread_that_spawned_it() {
        let pid = std::thread::spawn(|| sleeper().die_with_parent().spawn().unwrap().id() as i32).join().unwrap();
        // The spawning thread is gone: the kernel SIGKILLs the child, which becomes our zombie until reaped.
        crate::eventually("the orphaned sleep to die", Duration::from_secs(30), EXIT_POLL, || !proc_stat::alive(pid))
            .unwrap();
        let mut status = 0;
        // SAFETY: reaping our own child by pid; no `Child` handle exists any more.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL, "status {status:#x}");
    }

    #[test]
    fn the_guard_stops_and_reaps_its_child() {
        let guard = ChildGuard::with_grace(sleeper().spawn().unwrap(), Duration::from_secs(30));
        let pid = guard.pid();
        assert!(proc_stat::alive(pid));
        drop(guard);
        // Reaped: not even a zombie is left.
        assert_eq!(proc_stat::state(pid), None);
    }

    #[test]
    fn stop_child_terminates_politely_first() {
        let mut child = sleeper().spawn().unwrap();
        let status = stop_child(&mut child, Duration::from_secs(30)).unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn wait_timeout_reports_a_running_child_as_none() {
        let mut guard = ChildGuard::new(sleeper().spawn().unwrap());
        assert_eq!(wait_timeout(guard.child().unwrap(), Duration::ZERO).unwrap(), None);
        guard.kill();
        assert_eq!(guard.pid(), 0);
    }

    #[test]
    fn tails() {
        assert_eq!(tail_of("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_of("a", 5), "a");
        assert!(log_tail(Path::new("/nonexistent/log"), 3).starts_with("(cannot read /nonexistent/log"));
    }
}
