//! What happens to active faults: refresh, revert, expiry (one task over the time-ordered table), listing, and
//! undoing what an earlier run left.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{FaultError, FaultManager, exec::Undo, now_unix, table::Fault};
use crate::{
    events::{Action, Event},
    faults::{FaultReport, FaultSpec, State, fillfs, process},
};

impl FaultManager {
    /// The same spec applied again while active (same id, action and target) extends its lifetime to `lifetime`
    /// from now: `Scenario.repeat` re-applies every interval. `None` when there is no such fault.
    pub(super) async fn try_refresh(
        &self,
        spec: &FaultSpec,
        lifetime: Duration,
    ) -> Option<Result<FaultReport, FaultError>> {
        let id = spec.id.as_deref()?;
        let mut table = self.table.lock().await;
        let fault = table.active.get_mut(id)?;
        if fault.spec.action != spec.action || fault.spec.target != spec.target || spec.dry_run {
            return None;
        }
        if let (Undo::Network(handle), Some(engine)) = (&mut fault.undo, self.network())
            && let Err(err) = engine.extend(handle, lifetime).await
        {
            return Some(Err(err.into()));
        }
        fault.report.lifetime = lifetime.as_secs_f64();
        fault.report.expires = now_unix() + lifetime.as_secs_f64();
        let mut report = fault.report.clone();
        if table.set_deadline(id, Instant::now() + lifetime) {
            self.expiry_changed.notify_one();
        }
        drop(table);
        let mut entries = self.journal.entries();
        if let Some(entry) = entries.iter_mut().find(|e| e.fault == id) {
            entry.expires_at = report.expires;
            if let Err(err) = self.journal.put(entry.clone()) {
                return Some(Err(FaultError::Journal(err)));
            }
        }
        report.message = format!("fault {id} refreshed: ends in {:.1} s", lifetime.as_secs_f64());
        Some(Ok(report))
    }

    /// Reverts an active fault.
    ///
    /// # Errors
    /// [`FaultError::UnknownFault`] when it is not active.
    pub(crate) async fn revert(&self, id: &str) -> Result<FaultReport, FaultError> {
        if let Some(report) = self.finish(id, State::Reverted).await {
            return Ok(report);
        }
        // Idempotent: a fault that already ended is reported as it ended, not as an error.
        let table = self.table.lock().await;
        match table.ended(id).cloned() {
            Some(mut report) => {
                report.message = format!(
                    "fault {id} had already ended ({:?}); nothing to revert",
                    report.state.unwrap_or(State::Expired)
                );
                Ok(report)
            }
            None => Err(FaultError::UnknownFault(id.to_owned())),
        }
    }

    /// Reverts every active fault; returns their reports.
    pub(crate) async fn clear(&self) -> Vec<FaultReport> {
        let ids: Vec<String> = self.table.lock().await.active.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.finish(&id, State::Reverted).await);
        }
        out
    }

    /// Active faults with live counters (and recently finished ones when `all`).
    pub(crate) async fn list(&self, all: bool) -> Vec<FaultReport> {
        let table = self.table.lock().await;
        let mut out = Vec::new();
        for fault in table.active.values() {
            let mut report = fault.report.clone();
            match (&fault.undo, self.network()) {
                (Undo::Network(handle), Some(engine)) => {
                    report.counters = Some(engine.counters(handle).await);
                }
                (Undo::Resource(res), _) => report.usage = Some(res.usage()),
                _ => {}
            }
            out.push(report);
        }
        if all {
            out.extend(table.history().cloned());
        }
        out
    }

    /// Number of active faults.
    pub(crate) async fn active_count(&self) -> usize {
        self.table.lock().await.active.len()
    }

    /// Active faults per service (for the unleashed mode's cap).
    pub(crate) async fn active_per_service(&self, origin: &str) -> BTreeMap<String, usize> {
        let table = self.table.lock().await;
        let mut out = BTreeMap::new();
        for fault in table.active.values().filter(|f| f.spec.origin == origin) {
            if let Some(service) = &fault.report.service {
                *out.entry(service.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Ends an active fault (reverted or expired); `None` when it is not active.
    pub(super) async fn finish(&self, id: &str, state: State) -> Option<FaultReport> {
        let fault = self.table.lock().await.remove(id)?;
        Some(self.end(fault, state).await)
    }

    /// Undoes a fault taken out of the table, records it, and keeps its report in the history.
    async fn end(&self, fault: Fault, state: State) -> FaultReport {
        let Fault { mut report, spec, undo, .. } = fault;
        let id = report.id.clone();
        if let Some(observed) = self.flush_applied(&id) {
            report.observed = Some(observed);
        }
        let undone = undo.run(self.network().map(AsRef::as_ref), &mut report).await;
        if let Err(err) = self.journal.remove(&id) {
            warn!(%err, "cannot update the journal");
        }
        report.state = Some(state);
        let verb = if state == State::Expired { "expired" } else { "reverted" };
        report.message = if undone.errors.is_empty() {
            format!("{} fault {id} {verb}", report.kind)
        } else {
            format!("{} fault {id} {verb} with errors: {}", report.kind, undone.errors.join("; "))
        };
        let action = if state == State::Expired { Action::Expired } else { Action::Reverted };
        let mut event = Event {
            fault: Some(id.clone()),
            kind: Some(report.kind.clone()),
            target: serde_json::to_value(&spec.target).ok(),
            pids: if undone.resumed.is_empty() { report.pids.clone() } else { undone.resumed },
            ports: report.ports.clone(),
            interfaces: report.interfaces.clone(),
            seed: Some(report.seed),
            detail: report.counters.map(|c| serde_json::json!({"counters": c})),
            ..Event::new(action).message(report.message.clone())
        };
        if !undone.errors.is_empty() {
            event.outcome = "error".into();
        }
        self.events.record(event);
        info!(fault = %id, "{verb}");
        self.table.lock().await.push_history(report.clone());
        report
    }

    /// The expiry task: ends every fault whose deadline passed, then sleeps until the earliest deadline or until
    /// a new fault or a refresh moves it. One task for all faults; it ends when `stop` is cancelled.
    pub(super) async fn expire(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let (due, next) = {
                let mut table = self.table.lock().await;
                let due = table.take_due(Instant::now());
                (due, table.next_deadline())
            };
            for fault in due {
                self.end(fault, State::Expired).await;
            }
            let until_next = async {
                match next {
                    Some(when) => tokio::time::sleep_until(when.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.expiry_changed.notified() => {}
                () = until_next => {}
            }
        }
    }

    /// Undoes what an earlier run left in the journal (paused processes, resource workers, fill files).
    pub(crate) async fn reconcile(&self) -> Vec<String> {
        let mut done = Vec::new();
        for entry in self.journal.leftovers() {
            for p in &entry.paused {
                if process::still_running(p)
                    && let Ok(fd) = process::PidFd::open(p)
                {
                    let _ = fd.signal(libc::SIGCONT);
                    done.push(format!("resumed pid {} (fault {})", p.pid, entry.fault));
                }
            }
            for w in &entry.workers {
                if process::still_running(w)
                    && let Ok(fd) = process::PidFd::open(w)
                {
                    let _ = fd.signal(libc::SIGKILL);
                    done.push(format!("killed worker {} (fault {})", w.pid, entry.fault));
                }
            }
            for f in &entry.files {
                if fillfs::remove_path(f).unwrap_or(false) {
                    done.push(format!("deleted {} (fault {})", f.display(), entry.fault));
                }
            }
            if entry.network {
                done.push(format!(
                    "network rules of fault {} (removed with every network object of ours)",
                    entry.fault
                ));
            }
        }
        if let Err(err) = self.journal.clear() {
            warn!(%err, "cannot clear the journal");
        }
        done
    }
}
