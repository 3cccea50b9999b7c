//! Resource faults: CPU burn, memory pressure, disk fill, by worker processes.

use std::time::Duration;

use super::{Executed, Undo};
use crate::{
    faults::{
        FaultAction, FaultReport,
        manager::{FaultError, FaultManager, resolve::Candidate},
        resource,
    },
    journal::Entry,
};

impl FaultManager {
    /// The caller holds the budget lock: the free-space check and the memory cap see every earlier fault.
    pub(super) async fn resource_fault(
        &self,
        report: &mut FaultReport,
        action: &FaultAction,
        chosen: &[Candidate],
        lifetime: Duration,
    ) -> Result<Executed, FaultError> {
        let kind = action.kind();
        let cgroup_pid = chosen.iter().find_map(|c| c.process.as_ref().map(|p| p.pid));
        let prepared = resource::prepare(action, &report.id, cgroup_pid, Some(&self.disk))?;
        if let resource::Prepared::Memory { mib, .. } = &prepared {
            self.check_memory_budget(*mib).await?;
        }
        self.journal(report, &kind, |e| Entry { files: prepared.files(), ..e })?;
        let running = match prepared.start(lifetime).await {
            Ok(r) => r,
            Err(err) => {
                self.unjournal(&report.id);
                return Err(err.into());
            }
        };
        self.journal(report, &kind, |e| Entry { files: running.files(), workers: running.workers(), ..e })?;
        report.usage = Some(running.usage());
        Ok(Executed { message: running.describe(), undo: Undo::Resource(running) })
    }
}
