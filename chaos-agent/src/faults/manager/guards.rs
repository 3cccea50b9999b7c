//! Guards, caps and budgets: what may be hit, how many faults at once, how much of a service, how much memory.

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicUsize, Ordering},
};

use super::{
    FaultError, FaultManager, Refusal,
    resolve::{Candidate, Resolved},
};
use crate::faults::{FaultAction, FaultSpec, process::Guards, resource};

/// One request counted in [`FaultManager`]'s in-flight counter until dropped: a slot under `faults.max_active`.
pub(super) struct Slot<'a> {
    counter: &'a AtomicUsize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FaultManager {
    /// A slot under `faults.max_active`, held until the fault is in the active set (or refused): requests past
    /// this check count with the active faults, so concurrent requests cannot each pass the cap alone.
    pub(super) async fn take_slot(&self) -> Result<Slot<'_>, FaultError> {
        let table = self.table.lock().await;
        let others = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let slot = Slot { counter: &self.in_flight };
        if table.active.len() + others >= self.config.max_active {
            return Err(Refusal::TooManyFaults { active: table.active.len(), in_flight: others }.into());
        }
        Ok(slot)
    }

    /// The guards with the lymph instances registered now.
    pub(super) fn guards_now(&self) -> Guards {
        let mut guards = self.guards.lock().expect("poisoned").clone();
        guards.lymph_pids = self.discovery.snapshot().instances().filter_map(|i| i.pid).collect();
        guards
    }

    /// Every chosen process passes the guards; network faults stay off protected ports.
    pub(super) fn check_guards(&self, chosen: &[Candidate], action: &FaultAction) -> Result<(), FaultError> {
        let guards = self.guards_now();
        for c in chosen {
            if let Some(p) = &c.process {
                // Network faults on a port do not touch the process, but the port belongs to it: the same guards
                // apply (no faults on ZooKeeper's or sshd's ports).
                guards.check(p, c.origin).map_err(Refusal::from)?;
            } else if action.needs_pids() {
                return Err(FaultError::NotFound("target has no process".into()));
            }
            if matches!(action, FaultAction::Network { .. })
                && let Some(&port) = c.ports.iter().find(|p| self.protected_ports.contains(p))
            {
                return Err(Refusal::ProtectedPort { port }.into());
            }
        }
        Ok(())
    }

    /// Process faults stay under `faults.max_instance_share` of a service's instances (counting the active ones).
    pub(super) async fn check_share(
        &self,
        resolved: &Resolved,
        chosen: &[Candidate],
        spec: &FaultSpec,
    ) -> Result<(), FaultError> {
        let Some(cap) = self.config.max_instance_share else { return Ok(()) };
        let Some(service) = &resolved.service else { return Ok(()) };
        if !matches!(spec.action, FaultAction::Kill { .. } | FaultAction::Terminate | FaultAction::Pause) {
            return Ok(());
        }
        let table = self.table.lock().await;
        let mut hit: BTreeSet<String> = table
            .active
            .values()
            .filter(|f| f.report.service.as_deref() == Some(service.as_str()))
            .flat_map(|f| f.report.instances.clone())
            .collect();
        hit.extend(chosen.iter().filter_map(|c| c.instance.as_ref().map(|i| i.id.clone())));
        let total = resolved.total_instances;
        let share = hit.len() as f64 * 100.0 / total.max(1) as f64;
        if share > cap + 1e-9 {
            return Err(Refusal::InstanceShare { hit: hit.len(), total, service: service.clone(), share, cap }.into());
        }
        Ok(())
    }

    /// All memory faults together stay under `faults.max_memory_percent` of the machine's memory.
    pub(super) async fn check_memory_budget(&self, asked: u64) -> Result<(), FaultError> {
        let total = resource::mem_total_mib().unwrap_or(0);
        let percent = self.config.max_memory_percent;
        let cap = (total as f64 * percent / 100.0) as u64;
        let held: u64 = {
            let table = self.table.lock().await;
            table
                .active
                .values()
                .filter_map(|f| match &f.spec.action {
                    FaultAction::Memory(_) => f.report.usage.as_ref()?["params"]["mib"].as_u64(),
                    _ => None,
                })
                .sum()
        };
        let mib = held.saturating_add(asked);
        if mib > cap {
            return Err(Refusal::MemoryBudget { mib, percent, total }.into());
        }
        Ok(())
    }
}
