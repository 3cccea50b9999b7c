//! The fault table: active faults, their deadlines in time order, and the recently ended ones.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::Instant,
};

use super::exec::Undo;
use crate::faults::{FaultReport, FaultSpec};

/// Finished faults kept for `Chaos.faults(all=true)`.
const HISTORY: usize = 200;

/// An active fault.
pub(super) struct Fault {
    pub(crate) report: FaultReport,
    pub(crate) spec: FaultSpec,
    /// What ends it.
    pub(crate) undo: Undo,
    /// When it expires.
    pub(crate) deadline: Instant,
}

/// Active faults by id, their deadlines earliest first, and the history.
#[derive(Default)]
pub(super) struct Table {
    pub(crate) active: BTreeMap<String, Fault>,
    /// `(deadline, id)` of every active fault: what the expiry task waits for.
    deadlines: BTreeSet<(Instant, String)>,
    history: VecDeque<FaultReport>,
}

impl Table {
    /// Adds an active fault; returns whether it now expires first (the expiry task must wake up).
    pub(crate) fn insert(&mut self, fault: Fault) -> bool {
        let id = fault.report.id.clone();
        if let Some(old) = self.active.remove(&id) {
            self.deadlines.remove(&(old.deadline, id.clone()));
        }
        self.deadlines.insert((fault.deadline, id.clone()));
        let first = self.next_deadline() == Some(fault.deadline);
        self.active.insert(id, fault);
        first
    }

    /// Moves a fault's deadline; returns whether the earliest deadline changed.
    pub(crate) fn set_deadline(&mut self, id: &str, deadline: Instant) -> bool {
        let Some(fault) = self.active.get_mut(id) else { return false };
        let before = self.deadlines.first().map(|(t, _)| *t);
        self.deadlines.remove(&(fault.deadline, id.to_owned()));
        fault.deadline = deadline;
        self.deadlines.insert((deadline, id.to_owned()));
        self.next_deadline() != before
    }

    /// Takes a fault out of the table.
    pub(crate) fn remove(&mut self, id: &str) -> Option<Fault> {
        let fault = self.active.remove(id)?;
        self.deadlines.remove(&(fault.deadline, id.to_owned()));
        Some(fault)
    }

    /// The earliest deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Takes out every fault whose deadline is at or before `now`, earliest first.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<Fault> {
        let mut due = Vec::new();
        while let Some((when, id)) = self.deadlines.first().cloned()
            && when <= now
        {
            due.extend(self.remove(&id));
        }
        due
    }

    /// Remembers an ended fault (the oldest are forgotten).
    pub(crate) fn push_history(&mut self, report: FaultReport) {
        self.history.push_back(report);
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }

    /// The last report of an ended fault.
    pub(crate) fn ended(&self, id: &str) -> Option<&FaultReport> {
        self.history.iter().rev().find(|r| r.id == id)
    }

    /// Ended faults, oldest first.
    pub(crate) fn history(&self) -> impl Iterator<Item = &FaultReport> {
        self.history.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::faults::{FaultAction, Target};

    fn fault(id: &str, deadline: Instant) -> Fault {
        Fault {
            report: FaultReport { id: id.into(), ..Default::default() },
            spec: FaultSpec::new(Target::AllServices, FaultAction::Terminate),
            undo: Undo::Nothing,
            deadline,
        }
    }

    fn ids(faults: Vec<Fault>) -> Vec<String> {
        faults.into_iter().map(|f| f.report.id).collect()
    }

    #[test]
    fn deadlines_come_due_in_time_order_and_a_refresh_moves_one() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut table = Table::default();
        assert!(table.insert(fault("b", at(20))), "the only fault expires first");
        assert!(table.insert(fault("a", at(10))), "an earlier deadline wakes the expiry task");
        assert!(!table.insert(fault("c", at(30))), "a later one does not");
        assert_eq!(table.next_deadline(), Some(at(10)));
        // Refreshing `a` past `c` makes `b` the earliest; nothing is due before its deadline.
        assert!(table.set_deadline("a", at(40)));
        assert_eq!(table.next_deadline(), Some(at(20)));
        assert!(table.take_due(at(19)).is_empty());
        assert_eq!(ids(table.take_due(at(30))), ["b", "c"]);
        assert_eq!(table.active.keys().collect::<Vec<_>>(), ["a"]);
        // A reverted fault leaves no deadline behind.
        assert!(table.remove("a").is_some());
        assert_eq!(table.next_deadline(), None);
        assert!(table.take_due(at(100)).is_empty());
    }

    #[test]
    fn the_same_id_again_replaces_its_deadline() {
        let t0 = Instant::now();
        let mut table = Table::default();
        table.insert(fault("a", t0 + Duration::from_secs(5)));
        table.insert(fault("a", t0 + Duration::from_secs(50)));
        assert!(table.take_due(t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(table.active.len(), 1);
    }

    #[test]
    fn history_is_bounded_and_finds_the_latest_end() {
        let mut table = Table::default();
        for i in 0..HISTORY + 10 {
            table.push_history(FaultReport { id: format!("f{}", i % 3), seed: i as u64, ..Default::default() });
        }
        assert_eq!(table.history().count(), HISTORY);
        assert_eq!(table.ended("f0").map(|r| r.seed), Some((HISTORY + 7) as u64));
        assert!(table.ended("nope").is_none());
    }
}
