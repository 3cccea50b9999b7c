//! One executor per fault kind. Each acts, fills in what it hit, and returns the [`Undo`] that ends the fault
//! (nothing for faults that are over at once, such as kills).

mod network;
mod resource;
mod signal;

use std::time::Duration;

use super::{FaultError, FaultManager, resolve::Candidate};
use crate::{
    faults::{
        FaultAction, FaultReport, FaultSpec,
        network::{NetHandle, NetworkEngine},
        process::{PidFd, SignalError},
        resource::ResourceFault,
    },
    journal::Entry,
};

pub(super) use self::network::{describe_peer, peer_matches, port_matches};

/// What ends an active fault.
pub(super) enum Undo {
    /// Over as soon as applied (kill, terminate): nothing to undo.
    Nothing,
    /// Resume the stopped processes. Their pidfds are held from the stop to the resume: resuming needs neither
    /// `/proc` nor a free descriptor, and cannot hit a process that reused the pid.
    Resume(Vec<PidFd>),
    /// Remove the network rules.
    Network(NetHandle),
    /// Stop the workers and delete the fill.
    Resource(ResourceFault),
}

/// What undoing did.
#[derive(Default)]
pub(super) struct Undone {
    /// Pids resumed.
    pub(crate) resumed: Vec<i32>,
    /// What went wrong (the rest was still undone).
    pub(crate) errors: Vec<String>,
}

impl Undo {
    /// Whether the fault stays active until undone.
    pub(crate) fn lasts(&self) -> bool {
        !matches!(self, Undo::Nothing)
    }

    /// Undoes the fault; the report gets its final counters or usage.
    pub(crate) async fn run(self, network: Option<&NetworkEngine>, report: &mut FaultReport) -> Undone {
        let mut done = Undone::default();
        match self {
            Undo::Nothing => {}
            Undo::Resume(held) => {
                for fd in &held {
                    match fd.signal(libc::SIGCONT) {
                        Ok(()) => done.resumed.push(fd.info.pid),
                        Err(SignalError::Gone(_)) => {}
                        Err(err) => done.errors.push(err.to_string()),
                    }
                }
            }
            Undo::Network(handle) => {
                if let Some(engine) = network {
                    report.counters = Some(engine.counters(&handle).await);
                    if let Err(err) = engine.revert(&handle).await {
                        done.errors.push(err.to_string());
                    }
                }
            }
            Undo::Resource(res) => {
                report.usage = Some(res.usage());
                if let Err(err) = res.stop().await {
                    done.errors.push(err.to_string());
                }
            }
        }
        done
    }
}

/// An applied fault: the summary for the caller and how to end it.
pub(super) struct Executed {
    pub(crate) message: String,
    pub(crate) undo: Undo,
}

impl FaultManager {
    /// Applies the action of `spec` to the chosen candidates; fills in the report's pids, ports, interfaces and
    /// usage.
    pub(super) async fn execute(
        &self,
        report: &mut FaultReport,
        spec: &FaultSpec,
        chosen: &[Candidate],
        lifetime: Duration,
    ) -> Result<Executed, FaultError> {
        match &spec.action {
            FaultAction::Kill { signal } => self.kill(report, spec, chosen, *signal).await,
            FaultAction::Terminate => self.terminate(report, chosen).await,
            FaultAction::Pause => self.pause(report, chosen, lifetime).await,
            FaultAction::Network { .. } => self.network_fault(report, &spec.action, chosen, lifetime).await,
            FaultAction::Cpu(_) | FaultAction::Memory(_) | FaultAction::Disk(_) => {
                self.resource_fault(report, &spec.action, chosen, lifetime).await
            }
        }
    }

    /// Writes the journal entry of a fault before it touches anything.
    fn journal(&self, report: &FaultReport, kind: &str, entry: impl FnOnce(Entry) -> Entry) -> Result<(), FaultError> {
        let base = Entry {
            fault: report.id.clone(),
            kind: kind.to_owned(),
            expires_at: report.expires,
            paused: Vec::new(),
            workers: Vec::new(),
            files: Vec::new(),
            network: false,
        };
        self.journal.put(entry(base)).map_err(FaultError::Journal)
    }

    /// Forgets the journal entry of a fault that did not start.
    fn unjournal(&self, id: &str) {
        let _ = self.journal.remove(id);
    }
}
