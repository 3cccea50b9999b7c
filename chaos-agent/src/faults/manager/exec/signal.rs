//! Process faults: kill, terminate, pause. Every process is judged again right before its signal.

use std::time::Duration;

use super::{Executed, Undo};
use crate::faults::{
    FaultReport, FaultSpec,
    manager::{FaultError, FaultManager, Refusal, resolve::Candidate},
    process::{self, Guards, Origin, PidFd, ProcInfo, Protected},
};

/// How long a kill waits to see the process exit before answering.
const KILL_WAIT: Duration = Duration::from_secs(1);

impl FaultManager {
    pub(super) async fn kill(
        &self,
        report: &mut FaultReport,
        spec: &FaultSpec,
        chosen: &[Candidate],
        signal: i32,
    ) -> Result<Executed, FaultError> {
        let done = self.signal_blocking(chosen, signal, signal == libc::SIGKILL).await;
        let sent = done.sent.clone();
        if sent.is_empty() {
            return Err(done.none_error("no signal delivered"));
        }
        report.pids = sent.clone();
        if spec.deregister {
            for c in chosen.iter().filter(|c| c.process.as_ref().is_some_and(|p| sent.contains(&p.pid))) {
                if let Some(inst) = &c.instance {
                    self.discovery.deregister_identity(&inst.identity).await;
                }
            }
        }
        let mut message = format!("sent {} to pid(s) {sent:?}", process::signal_name(signal));
        if signal == libc::SIGKILL {
            message.push_str(&format!("; exited: {:?}", done.exited));
        }
        let skipped = done.skipped();
        if !skipped.is_empty() {
            message.push_str(&format!("; skipped: {}", skipped.join("; ")));
        }
        Ok(Executed { message, undo: Undo::Nothing })
    }

    pub(super) async fn terminate(
        &self,
        report: &mut FaultReport,
        chosen: &[Candidate],
    ) -> Result<Executed, FaultError> {
        let grace = self.config.terminate_grace;
        let done = self.signal_blocking(chosen, libc::SIGTERM, false).await;
        let sent = done.sent.clone();
        if sent.is_empty() {
            return Err(done.none_error("no signal delivered"));
        }
        // SIGKILL after the grace period, through the pidfds that took the SIGTERM.
        let fds = done.fds;
        tokio::task::spawn_blocking(move || {
            for fd in fds {
                if !fd.wait_exit(grace) {
                    let _ = fd.signal(libc::SIGKILL);
                }
            }
        });
        report.pids = sent.clone();
        let message =
            format!("sent SIGTERM to pid(s) {sent:?} (SIGKILL after {} s if still running)", grace.as_secs_f64());
        Ok(Executed { message, undo: Undo::Nothing })
    }

    pub(super) async fn pause(
        &self,
        report: &mut FaultReport,
        chosen: &[Candidate],
        lifetime: Duration,
    ) -> Result<Executed, FaultError> {
        let procs: Vec<ProcInfo> = chosen.iter().filter_map(|c| c.process.clone()).collect();
        self.journal(report, "pause", |e| crate::journal::Entry { paused: procs, ..e })?;
        let done = self.signal_blocking(chosen, libc::SIGSTOP, false).await;
        if done.sent.is_empty() {
            self.unjournal(&report.id);
            return Err(done.none_error("no process stopped"));
        }
        report.pids = done.sent.clone();
        let message = format!("stopped pid(s) {:?} for {:.1} s", done.sent, lifetime.as_secs_f64());
        Ok(Executed { message, undo: Undo::Resume(done.fds) })
    }

    /// [`signal_all`] on a blocking thread, with the guards as they are now.
    async fn signal_blocking(&self, chosen: &[Candidate], signal: i32, wait_exit: bool) -> Signalled {
        let procs: Vec<ProcInfo> = chosen.iter().filter_map(|c| c.process.clone()).collect();
        let guards = self.guards_now();
        tokio::task::spawn_blocking(move || signal_all(&procs, signal, wait_exit, &guards)).await.unwrap_or_default()
    }
}

/// Sends a signal to each process, judging each again right before: the pidfd pins the process, then its
/// command line is read again and the guards decide on what it is now (a process that changed its title since
/// resolution, or a pid reused, is refused).
fn signal_all(procs: &[ProcInfo], signal: i32, wait_exit: bool, guards: &Guards) -> Signalled {
    let mut done = Signalled::default();
    for p in procs {
        let fd = match PidFd::open(p) {
            Ok(fd) => fd,
            Err(err) => {
                done.errors.push(err.to_string());
                continue;
            }
        };
        match process::proc_info(p.pid).filter(|now| now.start_time == p.start_time && now.state != 'Z') {
            None => {
                done.errors.push(format!("pid {} is no longer the process that was targeted", p.pid));
                continue;
            }
            Some(now) => {
                if let Err(r) = guards.check(&now, Origin::Direct) {
                    done.refused.push(r);
                    continue;
                }
            }
        }
        match fd.signal(signal) {
            Ok(()) => done.fds.push(fd),
            Err(err) => done.errors.push(err.to_string()),
        }
    }
    done.sent = done.fds.iter().map(|f| f.info.pid).collect();
    if wait_exit {
        done.exited = done.fds.iter().filter(|f| f.wait_exit(KILL_WAIT)).map(|f| f.info.pid).collect();
    }
    done
}

/// What [`signal_all`] did.
#[derive(Default)]
struct Signalled {
    /// Pids signalled.
    sent: Vec<i32>,
    /// Pids seen exiting.
    exited: Vec<i32>,
    /// Processes that could not be signalled.
    errors: Vec<String>,
    /// Processes a guard refused.
    refused: Vec<Protected>,
    /// The pidfds of the processes signalled.
    fds: Vec<PidFd>,
}

impl Signalled {
    /// The error when nothing was signalled: refused when a guard said no, else not found.
    fn none_error(self, what: &str) -> FaultError {
        if self.refused.is_empty() {
            FaultError::NotFound(format!("{what}: {}", self.errors.join("; ")))
        } else {
            Refusal::AtSignal { refused: self.refused, errors: self.errors }.into()
        }
    }

    fn skipped(&self) -> Vec<String> {
        self.refused.iter().map(ToString::to_string).chain(self.errors.iter().cloned()).collect()
    }
}
