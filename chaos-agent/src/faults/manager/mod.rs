//! The fault lifecycle.
//!
//! ```text
//! request ─▶ resolve target (discovery, /proc, sockets) ─▶ select (seeded) ─▶ guards ─▶ dry run? ─▶ report
//!                                                                                    │
//!            journal intent ─▶ execute (signal / BPF map / worker) ─▶ event ─▶ expiry task ─▶ undo ─▶ event
//! ```
//!
//! Every fault has a lifetime (default and maximum from the configuration). Apply and revert are idempotent:
//! applying a spec with an id that is already active refreshes its lifetime; reverting twice is harmless. A
//! follower moves faults aimed at services to the new ports of restarted instances.
//!
//! # Layout
//! - [`resolve`](self::resolve) — a target becomes candidates (process, ports, instance)
//! - [`select`](self::select) — which candidates a fault hits, seeded
//! - [`guards`](self::guards) — guards, `faults.max_active`, the instance share, the memory budget
//! - [`exec`](self::exec) — one executor per fault kind, each returning the `Undo` that ends its fault
//! - [`table`](self::table) — active faults, their deadlines in time order, the history
//! - [`lifecycle`](self::lifecycle) — refresh, revert, the expiry task, listing, the journal's leftovers
//! - [`dry_run`](self::dry_run), [`follow`](self::follow) — dry-run sentences, following restarted services
//! - [`effect`](self::effect) — measuring what an applied network fault does; the `applied` event carries it
//!
//! Three tasks run beside the requests: the expiry task, the follower and the verifier. They hold the manager
//! until [`FaultManager::shutdown`] ends them.

mod dry_run;
mod effect;
mod error;
mod exec;
mod follow;
mod guards;
mod lifecycle;
mod resolve;
mod select;
mod table;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex as StdMutex, atomic::AtomicUsize},
    time::{Duration, Instant},
};

use tokio::{
    sync::{Mutex, Notify, RwLock},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub(crate) use self::error::{FaultError, Refusal, validate_id};
use self::{
    resolve::{Candidate, Resolved, Resolver},
    table::{Fault, Table},
};
use super::{
    FaultAction, FaultReport, FaultSpec, State,
    network::NetworkEngine,
    process::{Guards, PatternError},
    resource,
};
pub(crate) use crate::util::now_unix;
use crate::{
    config::FaultsConfig,
    discovery::Discovery,
    events::{Action, Event, EventLog},
    journal::Journal,
};

/// Whether network faults are possible.
pub(crate) enum NetworkAccess {
    /// The engine.
    Enabled(Arc<NetworkEngine>),
    /// Why not.
    Disabled(String),
}

/// Dependencies of the manager.
pub(crate) struct ManagerParts {
    /// Limits and guards.
    pub(crate) config: FaultsConfig,
    /// Agent-wide dry run.
    pub(crate) dry_run: bool,
    /// Discovery.
    pub(crate) discovery: Arc<Discovery>,
    /// Network engine, or why there is none.
    pub(crate) network: NetworkAccess,
    /// Event log.
    pub(crate) events: Arc<EventLog>,
    /// Journal.
    pub(crate) journal: Journal,
    /// Ports that network faults must never touch (the agent's, ZooKeeper's, sshd's).
    pub(crate) protected_ports: Vec<u16>,
    /// Pids never targeted (e.g. the local ZooKeeper).
    pub(crate) protected_pids: Vec<i32>,
}

/// The fault manager (see the module docs).
pub(crate) struct FaultManager {
    config: FaultsConfig,
    dry_run: bool,
    discovery: Arc<Discovery>,
    network: NetworkAccess,
    events: Arc<EventLog>,
    journal: Journal,
    guards: StdMutex<Guards>,
    protected_ports: Vec<u16>,
    disk: resource::DiskLimits,
    resolver: Resolver,
    /// Held from a disk or memory fault's budget check until the fault is active (its fill allocated, its memory
    /// counted), so concurrent requests cannot each pass the free-space floor or the memory cap alone.
    budget_lock: Mutex<()>,
    /// Requests past the `faults.max_active` check that are not yet in the active set (or refused).
    in_flight: AtomicUsize,
    table: Mutex<Table>,
    /// Wakes the expiry task when the earliest deadline moves.
    expiry_changed: Notify,
    /// Every apply holds it for reading; [`FaultManager::shutdown`] takes it for writing (waiting for the applies
    /// in progress) and sets it: no fault is applied after that.
    closed: RwLock<bool>,
    /// `applied` events waiting for their fault's measured effect; the verifier's queue.
    effects: effect::Effects,
    /// Ends the expiry task, the follower and the verifier.
    stop: CancellationToken,
    tasks: StdMutex<Vec<JoinHandle<()>>>,
}

fn new_id() -> String {
    format!("f-{:08x}", rand::random::<u32>())
}

/// A request that passed the checks that need no target: its lifetime and what to tell the caller about it.
struct Admitted {
    lifetime: Duration,
    notes: Vec<String>,
}

/// Where a fault goes: the candidates it hits and its report before anything is done.
struct Plan {
    resolved: Resolved,
    chosen: Vec<Candidate>,
    report: FaultReport,
}

impl FaultManager {
    /// Creates the manager and starts its expiry task and follower.
    ///
    /// # Errors
    /// An invalid guard pattern in the configuration.
    pub(crate) fn new(parts: ManagerParts) -> Result<Arc<FaultManager>, PatternError> {
        let mut guards = Guards::new(&parts.config.protected_processes, &parts.config.allowed_processes)?;
        guards.protected_pids = parts.protected_pids;
        let disk = resource::DiskLimits {
            roots: parts.config.disk_paths.clone(),
            allow_memory_filesystems: parts.config.allow_memory_filesystems,
        };
        let (effects, jobs) = effect::Effects::new();
        let manager = Arc::new(FaultManager {
            resolver: Resolver::new(parts.config.allow_unbound_ports),
            config: parts.config,
            dry_run: parts.dry_run,
            discovery: parts.discovery,
            network: parts.network,
            events: parts.events,
            journal: parts.journal,
            guards: StdMutex::new(guards),
            protected_ports: parts.protected_ports,
            disk,
            budget_lock: Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            table: Mutex::new(Table::default()),
            expiry_changed: Notify::new(),
            closed: RwLock::new(false),
            effects,
            stop: CancellationToken::new(),
            tasks: StdMutex::new(Vec::new()),
        });
        let expiry = tokio::spawn(manager.clone().expire(manager.stop.clone()));
        let follower = tokio::spawn(manager.clone().follow(manager.discovery.subscribe(), manager.stop.clone()));
        let verifier = tokio::spawn(manager.clone().verify(jobs, manager.stop.clone()));
        manager.tasks.lock().expect("poisoned").extend([expiry, follower, verifier]);
        Ok(manager)
    }

    /// Whether the agent runs in dry-run mode.
    pub(crate) fn agent_dry_run(&self) -> bool {
        self.dry_run
    }

    /// The network engine, when enabled.
    pub(crate) fn network(&self) -> Option<&Arc<NetworkEngine>> {
        match &self.network {
            NetworkAccess::Enabled(engine) => Some(engine),
            NetworkAccess::Disabled(_) => None,
        }
    }

    /// Stops applying faults (waiting for the applies in progress), ends the expiry task, the follower and the
    /// verifier, and reverts every active fault; returns their reports. Later applies answer [`FaultError::ShuttingDown`].
    pub(crate) async fn shutdown(&self) -> Vec<FaultReport> {
        *self.closed.write().await = true;
        self.stop.cancel();
        let tasks: Vec<JoinHandle<()>> = self.tasks.lock().expect("poisoned").drain(..).collect();
        for task in tasks {
            let _ = task.await;
        }
        self.clear().await
    }

    /// Applies a fault (or reports what it would do).
    ///
    /// # Errors
    /// [`FaultError`] with a sentence a person understands; a refused request changes nothing.
    pub(crate) async fn apply(&self, mut spec: FaultSpec) -> Result<FaultReport, FaultError> {
        let closed = self.closed.read().await;
        let result = if *closed { Err(FaultError::ShuttingDown) } else { self.apply_inner(&mut spec).await };
        drop(closed);
        if let Err(err) = &result {
            self.events.record(Event {
                fault: spec.id.clone(),
                kind: Some(spec.action.kind()),
                target: serde_json::to_value(&spec.target).ok(),
                detail: Some(serde_json::json!({"error_type": err.type_name(), "origin": spec.origin})),
                ..Event::new(Action::Refused).failed(err.to_string())
            });
        }
        result
    }

    async fn apply_inner(&self, spec: &mut FaultSpec) -> Result<FaultReport, FaultError> {
        let Admitted { lifetime, notes } = self.admit(spec)?;
        if let Some(refreshed) = self.try_refresh(spec, lifetime).await {
            return refreshed;
        }
        if let Some(id) = &spec.id
            && !spec.dry_run
        {
            let _ = self.revert(id).await;
        }
        let dry_run = spec.dry_run || self.dry_run;
        let _slot = if dry_run { None } else { Some(self.take_slot().await?) };
        let Plan { resolved, chosen, mut report } = self.plan(spec, lifetime).await?;
        let with_notes = |message: String| {
            if notes.is_empty() { message } else { format!("{message} ({})", notes.join("; ")) }
        };
        let event = |action: Action, report: &FaultReport| Event {
            fault: Some(report.id.clone()),
            kind: Some(report.kind.clone()),
            target: serde_json::to_value(&spec.target).ok(),
            pids: report.pids.clone(),
            ports: report.ports.clone(),
            interfaces: report.interfaces.clone(),
            seed: Some(report.seed),
            detail: Some(serde_json::json!({"origin": spec.origin, "service": resolved.service})),
            ..Event::new(action).message(report.message.clone())
        };
        if dry_run {
            report.state = None;
            report.message = with_notes(self.describe_plan(&spec.action, &report, lifetime).await);
            self.events.record(event(Action::DryRun, &report));
            return Ok(report);
        }
        // One budgeted fault at a time, until it is in the active set: the next one's check sees it.
        let _budget = match spec.action {
            FaultAction::Disk(_) | FaultAction::Memory(_) => Some(self.budget_lock.lock().await),
            _ => None,
        };
        let executed = self.execute(&mut report, spec, &chosen, lifetime).await?;
        report.message = with_notes(executed.message);
        report.state = Some(if executed.undo.lasts() { State::Active } else { State::Expired });
        let verification = match &executed.undo {
            exec::Undo::Network(handle) => effect::plan(&spec.action, &report.ports, handle, lifetime, &report.id),
            _ => None,
        };
        report.observed = Self::initial_observation(&verification);
        let applied = event(Action::Applied, &report);
        info!(fault = %report.id, kind = %report.kind, target = %spec.target.describe(), pids = ?report.pids, ports = ?report.ports, "fault applied");
        let mut table = self.table.lock().await;
        if executed.undo.lasts() {
            let fault = Fault {
                report: report.clone(),
                spec: FaultSpec { id: Some(report.id.clone()), ..spec.clone() },
                undo: executed.undo,
                deadline: Instant::now() + lifetime,
            };
            if table.insert(fault) {
                self.expiry_changed.notify_one();
            }
        } else {
            table.push_history(report.clone());
        }
        // Recorded with the table held: the fault's end cannot be recorded before it.
        self.applied(applied, verification);
        drop(table);
        Ok(report)
    }

    /// The checks that need no target: id, signal, lifetime (capped at `faults.max_lifetime`), parameters.
    fn admit(&self, spec: &FaultSpec) -> Result<Admitted, FaultError> {
        if let Some(id) = &spec.id {
            validate_id(id)?;
        }
        if let FaultAction::Kill { signal } = spec.action
            && let Some(refusal) = Refusal::stopping_signal(signal)
        {
            return Err(refusal.into());
        }
        let mut notes = Vec::new();
        let lifetime = match spec.lifetime {
            None => self.config.default_lifetime,
            Some(l) if l.is_zero() => return Err(FaultError::Invalid("lifetime must be above 0 seconds".into())),
            Some(l) if l > self.config.max_lifetime => {
                let max = self.config.max_lifetime;
                notes.push(format!("lifetime capped at {} s (faults.max_lifetime)", max.as_secs_f64()));
                max
            }
            Some(l) => l,
        };
        if let FaultAction::Network { impairment, .. } = &spec.action {
            impairment.validate()?;
        }
        if let NetworkAccess::Disabled(why) = &self.network
            && matches!(spec.action, FaultAction::Network { .. })
        {
            return Err(FaultError::NetworkDisabled(why.clone()));
        }
        Ok(Admitted { lifetime, notes })
    }

    /// Resolves, selects and checks the targets; the report says what the fault will hit.
    async fn plan(&self, spec: &mut FaultSpec, lifetime: Duration) -> Result<Plan, FaultError> {
        let seed = *spec.seed.get_or_insert_with(rand::random);
        let snapshot = self.discovery.snapshot();
        let resolved = self.resolver.resolve(&spec.target, &spec.action, &snapshot)?;
        let selection = spec.select.unwrap_or_else(|| spec.action.default_selection());
        let chosen = select::select(resolved.candidates.clone(), selection, seed)?;
        self.check_guards(&chosen, &spec.action)?;
        self.check_share(&resolved, &chosen, spec).await?;
        let created = now_unix();
        let report = FaultReport {
            id: spec.id.clone().unwrap_or_else(new_id),
            kind: spec.action.kind(),
            state: Some(State::Pending),
            target: Some(spec.target.clone()),
            service: resolved.service.clone(),
            instances: chosen.iter().filter_map(|c| c.instance.as_ref().map(|i| i.id.clone())).collect(),
            pids: chosen.iter().filter_map(|c| c.process.as_ref().map(|p| p.pid)).collect(),
            ports: chosen.iter().flat_map(|c| c.ports.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
            dry_run: spec.dry_run || self.dry_run,
            lifetime: lifetime.as_secs_f64(),
            created,
            expires: created + lifetime.as_secs_f64(),
            seed,
            action: Some(spec.action.clone()),
            ..Default::default()
        };
        Ok(Plan { resolved, chosen, report })
    }
}
