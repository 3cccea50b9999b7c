//! The fault lifecycle.
//!
//! ```text
//! request ─▶ resolve target (discovery, /proc, sockets) ─▶ select (seeded) ─▶ guards ─▶ dry run? ─▶ report
//!                                                                                    │
//!            journal intent ─▶ act (signal / BPF map / worker) ─▶ event ─▶ expiry timer ─▶ revert ─▶ event
//! ```
//!
//! Every fault has a lifetime (default and maximum from the configuration). Apply and revert are idempotent:
//! applying a spec with an id that is already active refreshes its lifetime; reverting twice is harmless. A
//! watcher follows faults aimed at services to the new ports of restarted instances.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    sync::{
        Arc, Mutex as StdMutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use tokio::{sync::Mutex, task::AbortHandle};
use tracing::{info, warn};

use super::{
    FaultAction, FaultReport, FaultSpec, Selection, State, Target,
    network::{Direction, NetError, NetHandle, NetworkEngine, PortMatch, Protocol},
    process::{self, Guards, Origin, PidFd, ProcInfo},
    resource::{self, ResourceFault},
};
use crate::{
    config::FaultsConfig,
    discovery::{Discovery, Instance, Snapshot, sockets},
    events::{Action, Event, EventLog},
    journal::{Entry, Journal},
    util::now_unix,
};

/// How long a kill waits to see the process exit before answering.
const KILL_WAIT: Duration = Duration::from_secs(1);
/// Finished faults kept for `Chaos.faults(all=true)`.
const HISTORY: usize = 200;

/// Why a fault was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The service is not known to discovery.
    #[error("unknown service `{name}`; known services: {known}")]
    UnknownService {
        /// Name asked for.
        name: String,
        /// Known names.
        known: String,
    },
    /// The target exists but has nothing on this host.
    #[error("{target} has no instance on this host{detail}")]
    NotOnThisHost {
        /// Target description.
        target: String,
        /// Where its instances are.
        detail: String,
    },
    /// No such instance/process/listener.
    #[error("{0}")]
    NotFound(String),
    /// A guard refused a target.
    #[error("refused: {0}")]
    Refused(String),
    /// Bad parameters.
    #[error("{0}")]
    Invalid(String),
    /// The network engine refused.
    #[error(transparent)]
    Network(#[from] NetError),
    /// Network faults are off.
    #[error("network faults are disabled on this agent: {0}")]
    NetworkDisabled(String),
    /// A resource fault could not start.
    #[error(transparent)]
    Resource(#[from] resource::ResourceError),
    /// The journal could not be written, so nothing was touched.
    #[error("cannot write the journal ({0}); nothing was done")]
    Journal(std::io::Error),
    /// No fault with that id.
    #[error("no fault `{0}` (neither active nor recently ended)")]
    UnknownFault(String),
}

impl FaultError {
    /// The error type name lymph clients see.
    pub fn type_name(&self) -> &'static str {
        match self {
            FaultError::UnknownService { .. } => "UnknownService",
            FaultError::NotOnThisHost { .. } => "NotOnThisHost",
            FaultError::NotFound(_) => "NotFound",
            FaultError::Refused(_) => "Refused",
            FaultError::Invalid(_) => "ValueError",
            FaultError::Network(NetError::NetemMissing) => "KernelFeatureMissing",
            FaultError::Network(NetError::ShapingUnavailable { .. }) => "KernelFeatureMissing",
            FaultError::Network(NetError::Classifier(_)) => "KernelFeatureMissing",
            FaultError::Network(NetError::Invalid(_)) => "ValueError",
            FaultError::Network(NetError::Conflict { .. }) => "Conflict",
            FaultError::Network(_) => "NetworkError",
            FaultError::NetworkDisabled(_) => "NetworkDisabled",
            FaultError::Resource(resource::ResourceError::Refused(_)) => "Refused",
            FaultError::Resource(_) => "ResourceError",
            FaultError::Journal(_) => "InternalError",
            FaultError::UnknownFault(_) => "UnknownFault",
        }
    }
}

/// Whether network faults are possible.
pub enum NetworkAccess {
    /// The engine.
    Enabled(Arc<NetworkEngine>),
    /// Why not.
    Disabled(String),
}

/// One resolved target.
#[derive(Clone, Debug)]
struct Candidate {
    process: Option<ProcInfo>,
    ports: Vec<u16>,
    instance: Option<Instance>,
    origin: Origin,
}

struct Resolved {
    candidates: Vec<Candidate>,
    service: Option<String>,
    /// All instances of the service (every host), for the share cap.
    total_instances: usize,
}

struct Fault {
    report: FaultReport,
    spec: FaultSpec,
    net: Option<NetHandle>,
    paused: Vec<ProcInfo>,
    /// pidfds of the paused processes, held from the stop to the resume: resuming needs neither `/proc` nor a
    /// free descriptor, and cannot hit a process that reused the pid.
    held: Vec<PidFd>,
    resource: Option<ResourceFault>,
    timer: Option<AbortHandle>,
}

struct Inner {
    active: BTreeMap<String, Fault>,
    history: VecDeque<FaultReport>,
}

/// The fault manager (see the module docs).
pub struct FaultManager {
    config: FaultsConfig,
    dry_run: bool,
    discovery: Arc<Discovery>,
    network: NetworkAccess,
    events: Arc<EventLog>,
    journal: Journal,
    guards: StdMutex<Guards>,
    protected_ports: Vec<u16>,
    disk: resource::DiskLimits,
    /// Held from a disk or memory fault's budget check until the fault is active (its fill allocated, its memory
    /// counted), so concurrent requests cannot each pass the free-space floor or the memory cap alone.
    budget_lock: Mutex<()>,
    /// Requests past the `faults.max_active` check that are not yet in the active set (or refused): counted with the
    /// active faults, so concurrent requests cannot each pass the cap alone.
    in_flight: AtomicUsize,
    /// Port → the pid that listened there last time (a hint for the next lookup).
    port_owners: StdMutex<BTreeMap<u16, i32>>,
    inner: Mutex<Inner>,
    me: StdMutex<Weak<FaultManager>>,
}

/// One request counted in [`FaultManager::in_flight`] until dropped.
struct InFlight<'a> {
    counter: &'a AtomicUsize,
    /// Requests in flight besides this one when it was taken.
    others: usize,
}

impl<'a> InFlight<'a> {
    fn take(counter: &'a AtomicUsize) -> Self {
        let others = counter.fetch_add(1, Ordering::SeqCst);
        Self { counter, others }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

fn new_id() -> String {
    format!("f-{:08x}", rand::random::<u32>())
}

/// Dependencies of the manager.
pub struct ManagerParts {
    /// Limits and guards.
    pub config: FaultsConfig,
    /// Agent-wide dry run.
    pub dry_run: bool,
    /// Discovery.
    pub discovery: Arc<Discovery>,
    /// Network engine, or why there is none.
    pub network: NetworkAccess,
    /// Event log.
    pub events: Arc<EventLog>,
    /// Journal.
    pub journal: Journal,
    /// Ports that network faults must never touch (the agent's, ZooKeeper's, sshd's).
    pub protected_ports: Vec<u16>,
    /// Pids never targeted (e.g. the local ZooKeeper).
    pub protected_pids: Vec<i32>,
}

impl FaultManager {
    /// Creates the manager and starts the follower task.
    ///
    /// # Errors
    /// An invalid guard pattern in the configuration.
    pub fn new(parts: ManagerParts) -> Result<Arc<FaultManager>, String> {
        let mut guards = Guards::new(&parts.config.protected_processes, &parts.config.allowed_processes)?;
        guards.protected_pids = parts.protected_pids;
        let disk_roots = parts.config.disk_paths.clone();
        let allow_mem = parts.config.allow_memory_filesystems;
        let manager = Arc::new(FaultManager {
            config: parts.config,
            dry_run: parts.dry_run,
            discovery: parts.discovery,
            network: parts.network,
            events: parts.events,
            journal: parts.journal,
            guards: StdMutex::new(guards),
            protected_ports: parts.protected_ports,
            disk: resource::DiskLimits { roots: disk_roots, allow_memory_filesystems: allow_mem },
            budget_lock: Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            port_owners: StdMutex::new(BTreeMap::new()),
            inner: Mutex::new(Inner { active: BTreeMap::new(), history: VecDeque::new() }),
            me: StdMutex::new(Weak::new()),
        });
        *manager.me.lock().expect("poisoned") = Arc::downgrade(&manager);
        tokio::spawn(Self::follow(Arc::downgrade(&manager), manager.discovery.subscribe()));
        Ok(manager)
    }

    fn me(&self) -> Arc<FaultManager> {
        self.me.lock().expect("poisoned").upgrade().expect("manager alive while in use")
    }

    /// Whether the agent runs in dry-run mode.
    pub fn agent_dry_run(&self) -> bool {
        self.dry_run
    }

    /// The network engine, when enabled.
    pub fn network(&self) -> Option<&Arc<NetworkEngine>> {
        match &self.network {
            NetworkAccess::Enabled(engine) => Some(engine),
            NetworkAccess::Disabled(_) => None,
        }
    }

    /// Undoes what an earlier run left in the journal (paused processes, resource workers, fill files).
    pub async fn reconcile(&self) -> Vec<String> {
        let mut done = Vec::new();
        for entry in self.journal.leftovers() {
            for p in &entry.paused {
                if process::still_running(p)
                    && let Ok(fd) = PidFd::open(p)
                {
                    let _ = fd.signal(libc::SIGCONT);
                    done.push(format!("resumed pid {} (fault {})", p.pid, entry.fault));
                }
            }
            for w in &entry.workers {
                if process::still_running(w)
                    && let Ok(fd) = PidFd::open(w)
                {
                    let _ = fd.signal(libc::SIGKILL);
                    done.push(format!("killed worker {} (fault {})", w.pid, entry.fault));
                }
            }
            for f in &entry.files {
                if super::fillfs::remove_path(f).unwrap_or(false) {
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

    /// Applies a fault (or reports what it would do).
    ///
    /// # Errors
    /// [`FaultError`] with a sentence a person understands; a refused request changes nothing.
    pub async fn apply(&self, mut spec: FaultSpec) -> Result<FaultReport, FaultError> {
        let result = self.apply_inner(&mut spec).await;
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
        if let Some(id) = &spec.id {
            validate_id(id)?;
        }
        if let FaultAction::Kill { signal } = spec.action
            && [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU].contains(&signal)
        {
            return Err(FaultError::Refused(format!(
                "{} stops a process with no end: use a pause fault, which resumes it at the end of its lifetime",
                process::signal_name(signal)
            )));
        }
        let mut notes = Vec::new();
        let lifetime = match spec.lifetime {
            None => self.config.default_lifetime,
            Some(l) if l.is_zero() => return Err(FaultError::Invalid("lifetime must be above 0 seconds".into())),
            Some(l) if l > self.config.max_lifetime => {
                notes.push(format!(
                    "lifetime capped at {} s (faults.max_lifetime)",
                    self.config.max_lifetime.as_secs_f64()
                ));
                self.config.max_lifetime
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
        // Refresh: the same id again while active extends its lifetime (Scenario.repeat re-applies every interval).
        if let Some(id) = &spec.id {
            let mut inner = self.inner.lock().await;
            if let Some(fault) = inner.active.get_mut(id)
                && fault.spec.action == spec.action
                && fault.spec.target == spec.target
                && !spec.dry_run
            {
                return self.refresh(fault, lifetime).await;
            }
            drop(inner);
            if !spec.dry_run {
                let _ = self.revert(id).await;
            }
        }
        // A slot under faults.max_active, held until the fault is in the active set (or refused).
        let _slot = if spec.dry_run || self.dry_run {
            None
        } else {
            let inner = self.inner.lock().await;
            let slot = InFlight::take(&self.in_flight);
            let counted = inner.active.len() + slot.others;
            if counted >= self.config.max_active {
                return Err(FaultError::Refused(format!(
                    "{} faults are active and {} being applied, the most faults.max_active allows; revert one first",
                    inner.active.len(),
                    slot.others
                )));
            }
            Some(slot)
        };
        let seed = *spec.seed.get_or_insert_with(rand::random);
        let id = spec.id.clone().unwrap_or_else(new_id);
        let snapshot = self.discovery.snapshot();
        let resolved = self.resolve(&spec.target, &spec.action, &snapshot)?;
        let selection = spec.select.unwrap_or_else(|| spec.action.default_selection());
        let chosen = select(resolved.candidates.clone(), selection, seed)?;
        self.check_guards(&chosen, &spec.action)?;
        self.check_share(&resolved, &chosen, spec).await?;
        let pids: Vec<i32> = chosen.iter().filter_map(|c| c.process.as_ref().map(|p| p.pid)).collect();
        let ports: Vec<u16> =
            chosen.iter().flat_map(|c| c.ports.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let instances: Vec<String> = chosen.iter().filter_map(|c| c.instance.as_ref().map(|i| i.id.clone())).collect();
        let created = now_unix();
        let mut report = FaultReport {
            id: id.clone(),
            kind: spec.action.kind(),
            state: Some(State::Pending),
            target: Some(spec.target.clone()),
            service: resolved.service.clone(),
            instances,
            pids: pids.clone(),
            ports: ports.clone(),
            dry_run: spec.dry_run || self.dry_run,
            lifetime: lifetime.as_secs_f64(),
            created,
            expires: created + lifetime.as_secs_f64(),
            seed,
            action: Some(spec.action.clone()),
            ..Default::default()
        };
        let event_base = |action: Action| Event {
            fault: Some(id.clone()),
            kind: Some(spec.action.kind()),
            target: serde_json::to_value(&spec.target).ok(),
            pids: pids.clone(),
            ports: ports.clone(),
            seed: Some(seed),
            detail: Some(serde_json::json!({"origin": spec.origin, "service": resolved.service})),
            ..Event::new(action)
        };
        if report.dry_run {
            report.state = None;
            report.message = self.describe_plan(spec, &report, lifetime).await;
            if !notes.is_empty() {
                report.message = format!("{} ({})", report.message, notes.join("; "));
            }
            self.events.record(Event {
                interfaces: report.interfaces.clone(),
                ..event_base(Action::DryRun).message(report.message.clone())
            });
            return Ok(report);
        }
        let mut fault = Fault {
            report: report.clone(),
            spec: spec.clone(),
            net: None,
            paused: Vec::new(),
            held: Vec::new(),
            resource: None,
            timer: None,
        };
        fault.spec.id = Some(id.clone());
        // One budgeted fault at a time, until it is in the active set: the next one's check sees it.
        let _budget = match spec.action {
            FaultAction::Disk(_) | FaultAction::Memory(_) => Some(self.budget_lock.lock().await),
            _ => None,
        };
        let message = self.act(&mut fault, &chosen, lifetime).await?;
        report = fault.report.clone();
        report.message = if notes.is_empty() { message } else { format!("{message} ({})", notes.join("; ")) };
        fault.report.message = report.message.clone();
        self.events.record(Event {
            interfaces: report.interfaces.clone(),
            pids: report.pids.clone(),
            ..event_base(Action::Applied).message(report.message.clone())
        });
        info!(fault = %id, kind = %report.kind, target = %spec.target.describe(), pids = ?report.pids, ports = ?report.ports, "fault applied");
        let mut inner = self.inner.lock().await;
        if report.state == Some(State::Active) {
            fault.timer = Some(self.schedule_expiry(&id, lifetime));
            inner.active.insert(id, fault);
        } else {
            push_history(&mut inner.history, report.clone());
        }
        Ok(report)
    }

    async fn refresh(&self, fault: &mut Fault, lifetime: Duration) -> Result<FaultReport, FaultError> {
        let id = fault.report.id.clone();
        if let (Some(handle), Some(engine)) = (fault.net.as_mut(), self.network()) {
            engine.extend(handle, lifetime).await?;
        }
        if let Some(timer) = fault.timer.take() {
            timer.abort();
        }
        fault.timer = Some(self.schedule_expiry(&id, lifetime));
        let now = now_unix();
        fault.report.lifetime = lifetime.as_secs_f64();
        fault.report.expires = now + lifetime.as_secs_f64();
        let mut entries = self.journal.entries();
        if let Some(entry) = entries.iter_mut().find(|e| e.fault == id) {
            entry.expires_at = fault.report.expires;
            self.journal.put(entry.clone()).map_err(FaultError::Journal)?;
        }
        let mut report = fault.report.clone();
        report.message = format!("fault {id} refreshed: ends in {:.1} s", lifetime.as_secs_f64());
        Ok(report)
    }

    fn schedule_expiry(&self, id: &str, lifetime: Duration) -> AbortHandle {
        let me = Arc::downgrade(&self.me());
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(lifetime).await;
            if let Some(me) = me.upgrade() {
                me.finish(&id, State::Expired).await;
            }
        })
        .abort_handle()
    }

    /// Reverts an active fault.
    ///
    /// # Errors
    /// [`FaultError::UnknownFault`] when it is not active.
    pub async fn revert(&self, id: &str) -> Result<FaultReport, FaultError> {
        if let Some(report) = self.finish(id, State::Reverted).await {
            return Ok(report);
        }
        // Idempotent: a fault that already ended is reported as it ended, not as an error.
        let inner = self.inner.lock().await;
        let ended = inner.history.iter().rev().find(|r| r.id == id).cloned();
        match ended {
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
    pub async fn clear(&self) -> Vec<FaultReport> {
        let ids: Vec<String> = self.inner.lock().await.active.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            if let Some(r) = self.finish(&id, State::Reverted).await {
                out.push(r);
            }
        }
        out
    }

    /// Active faults with live counters (and recently finished ones when `all`).
    pub async fn list(&self, all: bool) -> Vec<FaultReport> {
        let inner = self.inner.lock().await;
        let mut out = Vec::new();
        for fault in inner.active.values() {
            let mut report = fault.report.clone();
            if let (Some(handle), Some(engine)) = (&fault.net, self.network()) {
                report.counters = Some(engine.counters(handle).await);
            }
            if let Some(res) = &fault.resource {
                report.usage = Some(res.usage());
            }
            out.push(report);
        }
        if all {
            out.extend(inner.history.iter().cloned());
        }
        out
    }

    /// Number of active faults.
    pub async fn active_count(&self) -> usize {
        self.inner.lock().await.active.len()
    }

    /// Active faults per service (for the unleashed mode's cap).
    pub async fn active_per_service(&self, origin: &str) -> BTreeMap<String, usize> {
        let inner = self.inner.lock().await;
        let mut out = BTreeMap::new();
        for fault in inner.active.values().filter(|f| f.spec.origin == origin) {
            if let Some(service) = &fault.report.service {
                *out.entry(service.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    async fn finish(&self, id: &str, state: State) -> Option<FaultReport> {
        let mut fault = self.inner.lock().await.active.remove(id)?;
        // Expiry runs on the timer's own task: aborting it would cancel this very function at its next await.
        if let Some(timer) = fault.timer.take()
            && state != State::Expired
        {
            timer.abort();
        }
        let mut errors = Vec::new();
        if let (Some(handle), Some(engine)) = (&fault.net, self.network()) {
            fault.report.counters = Some(engine.counters(handle).await);
            if let Err(err) = engine.revert(handle).await {
                errors.push(err.to_string());
            }
        }
        let mut resumed = Vec::new();
        for fd in &fault.held {
            match fd.signal(libc::SIGCONT) {
                Ok(()) => resumed.push(fd.info.pid),
                Err(process::SignalError::Gone(_)) => {}
                Err(err) => errors.push(err.to_string()),
            }
        }
        if let Some(res) = fault.resource.take() {
            fault.report.usage = Some(res.usage());
            if let Err(err) = res.stop().await {
                errors.push(err.to_string());
            }
        }
        if let Err(err) = self.journal.remove(id) {
            warn!(%err, "cannot update the journal");
        }
        fault.report.state = Some(state);
        let verb = if state == State::Expired { "expired" } else { "reverted" };
        fault.report.message = if errors.is_empty() {
            format!("{} fault {id} {verb}", fault.report.kind)
        } else {
            format!("{} fault {id} {verb} with errors: {}", fault.report.kind, errors.join("; "))
        };
        let action = if state == State::Expired { Action::Expired } else { Action::Reverted };
        let mut event = Event {
            fault: Some(id.to_owned()),
            kind: Some(fault.report.kind.clone()),
            target: serde_json::to_value(&fault.spec.target).ok(),
            pids: if resumed.is_empty() { fault.report.pids.clone() } else { resumed },
            ports: fault.report.ports.clone(),
            interfaces: fault.report.interfaces.clone(),
            seed: Some(fault.report.seed),
            detail: fault.report.counters.map(|c| serde_json::json!({"counters": c})),
            ..Event::new(action).message(fault.report.message.clone())
        };
        if !errors.is_empty() {
            event.outcome = "error".into();
        }
        self.events.record(event);
        info!(fault = %id, "{verb}");
        let report = fault.report.clone();
        push_history(&mut self.inner.lock().await.history, report.clone());
        Some(report)
    }

    fn resolve(&self, target: &Target, action: &FaultAction, snap: &Snapshot) -> Result<Resolved, FaultError> {
        // Resource faults act on the host; a target only matters for cgroup placement.
        if matches!(action, FaultAction::Cpu(_) | FaultAction::Memory(_) | FaultAction::Disk(_))
            && *target == Target::AllServices
        {
            return Ok(Resolved { candidates: Vec::new(), service: None, total_instances: 0 });
        }
        let instance_candidate = |inst: &Instance| -> Candidate {
            Candidate {
                // A zombie (killed, not yet reaped) is no process to act on.
                process: inst.pid.and_then(process::proc_info).filter(|p| p.state != 'Z' && p.state != 'X'),
                ports: inst.port.into_iter().collect(),
                instance: Some(inst.clone()),
                origin: Origin::LymphInstance,
            }
        };
        let resolved = match target {
            Target::Service { name } => {
                let Some((service, instances)) = snap.service(name) else {
                    let known: Vec<&str> = snap.services.keys().map(String::as_str).collect();
                    return Err(FaultError::UnknownService {
                        name: name.clone(),
                        known: if known.is_empty() { "none".into() } else { known.join(", ") },
                    });
                };
                let local: Vec<Candidate> = instances.iter().filter(|i| i.local).map(instance_candidate).collect();
                if local.is_empty() {
                    let hosts: BTreeSet<String> = instances
                        .iter()
                        .map(|i| i.hostname.clone().or_else(|| i.ip.clone()).unwrap_or_else(|| i.endpoint.clone()))
                        .collect();
                    return Err(FaultError::NotOnThisHost {
                        target: format!("service {service}"),
                        detail: format!(
                            " ({} registered instance(s), on: {}; ask the agent on that host)",
                            instances.len(),
                            hosts.into_iter().collect::<Vec<_>>().join(", ")
                        ),
                    });
                }
                Resolved { candidates: local, service: Some(service.to_owned()), total_instances: instances.len() }
            }
            Target::Instance { id } => {
                let inst = snap
                    .instances()
                    .find(|i| i.id == *id || i.identity == *id)
                    .ok_or_else(|| FaultError::NotFound(format!("no instance with id or identity `{id}`")))?;
                if !inst.local {
                    return Err(FaultError::NotOnThisHost {
                        target: format!("instance {id}"),
                        detail: format!(" (endpoint {})", inst.endpoint),
                    });
                }
                let total = snap.service(&inst.service).map_or(1, |(_, v)| v.len());
                Resolved {
                    candidates: vec![instance_candidate(inst)],
                    service: Some(inst.service.clone()),
                    total_instances: total,
                }
            }
            Target::Port { port } => {
                if *port == 0 {
                    return Err(FaultError::Invalid("port must be between 1 and 65535".into()));
                }
                let instance = snap.instances().find(|i| i.local && i.port == Some(*port)).cloned();
                let mut hints: Vec<i32> = instance.iter().filter_map(|i| i.pid).collect();
                hints.extend(self.port_owners.lock().expect("poisoned").get(port).copied());
                // The owner for the protocol the fault acts on: a UDP-only service has a bound socket, no listener.
                let protocol = match action {
                    FaultAction::Network { protocol, .. } => *protocol,
                    _ => None,
                };
                let owner = owner_of_port(*port, protocol, &hints);
                if let Some(pid) = owner {
                    self.port_owners.lock().expect("poisoned").insert(*port, pid);
                }
                let process = owner.and_then(process::proc_info);
                let on = match protocol {
                    Some(Protocol::Tcp) => "TCP port",
                    Some(Protocol::Udp) => "UDP port",
                    Some(Protocol::Both) | None => "TCP or UDP port",
                };
                if action.needs_pids() && process.is_none() {
                    return Err(FaultError::NotFound(format!("no process listens on {on} {port} here")));
                }
                // A port nobody here listens on is someone else's (a remote ZooKeeper, DNS, an overlay network):
                // the guards could not look at its owner.
                if process.is_none() && !self.config.allow_unbound_ports {
                    return Err(FaultError::Refused(format!(
                        "no process of this host listens on {on} {port}, so no guard can check whose it is \
                         (set faults.allow_unbound_ports to allow faults on such ports)"
                    )));
                }
                Resolved {
                    service: instance.as_ref().map(|i| i.service.clone()),
                    candidates: vec![Candidate { process, ports: vec![*port], instance, origin: Origin::Direct }],
                    total_instances: 1,
                }
            }
            Target::Pid { pid } => {
                let info = process::proc_info(*pid)
                    .ok_or_else(|| FaultError::NotFound(format!("no process with pid {pid}")))?;
                let ports = ports_of(&[*pid]);
                let instance = snap.instances().find(|i| i.pid == Some(*pid)).cloned();
                Resolved {
                    service: instance.as_ref().map(|i| i.service.clone()),
                    candidates: vec![Candidate { process: Some(info), ports, instance, origin: Origin::Direct }],
                    total_instances: 1,
                }
            }
            Target::Process { pattern } => {
                let pat = process::Pattern::parse(pattern).map_err(FaultError::Invalid)?;
                let me = std::process::id() as i32;
                let found: Vec<ProcInfo> = process::find(&pat).into_iter().filter(|p| p.pid != me).collect();
                if found.is_empty() {
                    return Err(FaultError::NotFound(format!("no process matches `{pattern}`")));
                }
                let candidates = found
                    .into_iter()
                    .map(|p| Candidate {
                        ports: if action.needs_pids() { Vec::new() } else { ports_of(&[p.pid]) },
                        instance: snap.instances().find(|i| i.pid == Some(p.pid)).cloned(),
                        process: Some(p),
                        origin: Origin::Direct,
                    })
                    .collect::<Vec<_>>();
                let total = candidates.len();
                Resolved { candidates, service: None, total_instances: total }
            }
            Target::AllServices => {
                let candidates: Vec<Candidate> = snap.instances().filter(|i| i.local).map(instance_candidate).collect();
                if candidates.is_empty() {
                    return Err(FaultError::NotFound("no lymph service instance runs on this host".into()));
                }
                let total = candidates.len();
                Resolved { candidates, service: None, total_instances: total }
            }
        };
        if action.needs_pids() {
            let with_pid: Vec<Candidate> =
                resolved.candidates.iter().filter(|c| c.process.is_some()).cloned().collect();
            if with_pid.is_empty() {
                return Err(FaultError::NotFound(format!("{} has no running process here", target.describe())));
            }
            return Ok(Resolved { candidates: with_pid, ..resolved });
        }
        if matches!(action, FaultAction::Network { .. }) && resolved.candidates.iter().all(|c| c.ports.is_empty()) {
            return Err(FaultError::NotFound(format!("{} listens on no TCP port here", target.describe())));
        }
        Ok(resolved)
    }

    fn guards_now(&self) -> Guards {
        let mut guards = self.guards.lock().expect("poisoned").clone();
        guards.lymph_pids = self.discovery.snapshot().instances().filter_map(|i| i.pid).collect();
        guards
    }

    fn check_guards(&self, chosen: &[Candidate], action: &FaultAction) -> Result<(), FaultError> {
        let guards = self.guards_now();
        for c in chosen {
            if let Some(p) = &c.process {
                // Network faults on a port do not touch the process, but the port belongs to it: the same guards
                // apply (no faults on ZooKeeper's or sshd's ports).
                guards.check(p, c.origin).map_err(|r| FaultError::Refused(r.to_string()))?;
            } else if action.needs_pids() {
                return Err(FaultError::NotFound("target has no process".into()));
            }
            if matches!(action, FaultAction::Network { .. })
                && let Some(port) = c.ports.iter().find(|p| self.protected_ports.contains(p))
            {
                return Err(FaultError::Refused(format!(
                    "port {port} is protected (the agent's own ports, ZooKeeper's, sshd's or DNS)"
                )));
            }
        }
        Ok(())
    }

    async fn check_share(&self, resolved: &Resolved, chosen: &[Candidate], spec: &FaultSpec) -> Result<(), FaultError> {
        let Some(cap) = self.config.max_instance_share else { return Ok(()) };
        let Some(service) = &resolved.service else { return Ok(()) };
        if !matches!(spec.action, FaultAction::Kill { .. } | FaultAction::Terminate | FaultAction::Pause) {
            return Ok(());
        }
        let inner = self.inner.lock().await;
        let mut hit: BTreeSet<String> = inner
            .active
            .values()
            .filter(|f| f.report.service.as_deref() == Some(service.as_str()))
            .flat_map(|f| f.report.instances.clone())
            .collect();
        hit.extend(chosen.iter().filter_map(|c| c.instance.as_ref().map(|i| i.id.clone())));
        let share = hit.len() as f64 * 100.0 / resolved.total_instances.max(1) as f64;
        if share > cap + 1e-9 {
            return Err(FaultError::Refused(format!(
                "this would hit {} of {} instances of {service} ({share:.0} %), above faults.max_instance_share = {cap} %",
                hit.len(),
                resolved.total_instances
            )));
        }
        Ok(())
    }

    /// All memory faults together stay under `faults.max_memory_percent` of the machine's memory.
    async fn check_memory_budget(&self, asked: u64) -> Result<(), FaultError> {
        let total = resource::mem_total_mib().unwrap_or(0);
        let cap = (total as f64 * self.config.max_memory_percent / 100.0) as u64;
        let held: u64 = {
            let inner = self.inner.lock().await;
            inner
                .active
                .values()
                .filter_map(|f| match &f.spec.action {
                    FaultAction::Memory(_) => f.report.usage.as_ref()?["params"]["mib"].as_u64(),
                    _ => None,
                })
                .sum()
        };
        if held.saturating_add(asked) > cap {
            return Err(FaultError::Refused(format!(
                "memory faults would hold {} MiB together, above faults.max_memory_percent = {} % of {total} MiB",
                held.saturating_add(asked),
                self.config.max_memory_percent
            )));
        }
        Ok(())
    }

    async fn describe_plan(&self, spec: &FaultSpec, report: &FaultReport, lifetime: Duration) -> String {
        let what = match &spec.action {
            FaultAction::Kill { signal } => {
                format!("send {} to pid(s) {:?}", process::signal_name(*signal), report.pids)
            }
            FaultAction::Terminate => {
                format!("send SIGTERM (SIGKILL after {:?}) to pid(s) {:?}", self.config.terminate_grace, report.pids)
            }
            FaultAction::Pause => format!("stop pid(s) {:?} for {:.1} s", report.pids, lifetime.as_secs_f64()),
            FaultAction::Network { label, direction, .. } => {
                let ifaces = match self.network() {
                    Some(engine) => {
                        let a = engine.attached().await;
                        if a.is_empty() { "every interface that is up".to_owned() } else { a.join(", ") }
                    }
                    None => "no interface (network faults disabled)".into(),
                };
                format!(
                    "{label} on port(s) {:?} (direction {direction:?}) on {ifaces} for {:.1} s",
                    report.ports,
                    lifetime.as_secs_f64()
                )
            }
            FaultAction::Cpu(c) => format!("burn CPU ({c:?}) for {:.1} s", lifetime.as_secs_f64()),
            FaultAction::Memory(m) => format!("hold memory ({m:?}) for {:.1} s", lifetime.as_secs_f64()),
            FaultAction::Disk(d) => format!("fill disk ({d:?}) for {:.1} s", lifetime.as_secs_f64()),
        };
        format!("dry run: would {what}; nothing was done")
    }

    /// Does it. Returns a summary; sets the report's state.
    async fn act(&self, fault: &mut Fault, chosen: &[Candidate], lifetime: Duration) -> Result<String, FaultError> {
        let id = fault.report.id.clone();
        let expires_at = fault.report.expires;
        let journal = |entry: Entry| self.journal.put(entry).map_err(FaultError::Journal);
        let entry = |kind: &str| Entry {
            fault: id.clone(),
            kind: kind.to_owned(),
            expires_at,
            paused: Vec::new(),
            workers: Vec::new(),
            files: Vec::new(),
            network: false,
        };
        match &fault.spec.action {
            FaultAction::Kill { signal } => {
                let signal = *signal;
                let procs: Vec<ProcInfo> = chosen.iter().filter_map(|c| c.process.clone()).collect();
                let guards = self.guards_now();
                let done =
                    tokio::task::spawn_blocking(move || signal_all(&procs, signal, signal == libc::SIGKILL, &guards))
                        .await
                        .unwrap_or_default();
                let (sent, exited, errors) = (done.sent.clone(), done.exited.clone(), done.skipped());
                if sent.is_empty() {
                    return Err(done.none_error("no signal delivered"));
                }
                fault.report.pids = sent.clone();
                fault.report.state = Some(State::Expired);
                if fault.spec.deregister {
                    for c in chosen.iter().filter(|c| c.process.as_ref().is_some_and(|p| sent.contains(&p.pid))) {
                        if let Some(inst) = &c.instance {
                            self.discovery.deregister_identity(&inst.identity).await;
                        }
                    }
                }
                let mut msg = format!("sent {} to pid(s) {sent:?}", process::signal_name(signal));
                if signal == libc::SIGKILL {
                    msg.push_str(&format!("; exited: {exited:?}"));
                }
                if !errors.is_empty() {
                    msg.push_str(&format!("; skipped: {}", errors.join("; ")));
                }
                Ok(msg)
            }
            FaultAction::Terminate => {
                let procs: Vec<ProcInfo> = chosen.iter().filter_map(|c| c.process.clone()).collect();
                let grace = self.config.terminate_grace;
                let done = {
                    let procs = procs.clone();
                    let guards = self.guards_now();
                    tokio::task::spawn_blocking(move || signal_all(&procs, libc::SIGTERM, false, &guards))
                        .await
                        .unwrap_or_default()
                };
                let sent = done.sent.clone();
                if sent.is_empty() {
                    return Err(done.none_error("no signal delivered"));
                }
                let stubborn: Vec<ProcInfo> = procs.into_iter().filter(|p| sent.contains(&p.pid)).collect();
                tokio::task::spawn_blocking(move || {
                    for p in stubborn {
                        if let Ok(fd) = PidFd::open(&p)
                            && !fd.wait_exit(grace)
                        {
                            let _ = fd.signal(libc::SIGKILL);
                        }
                    }
                });
                fault.report.pids = sent.clone();
                fault.report.state = Some(State::Expired);
                Ok(format!(
                    "sent SIGTERM to pid(s) {sent:?} (SIGKILL after {} s if still running)",
                    grace.as_secs_f64()
                ))
            }
            FaultAction::Pause => {
                let procs: Vec<ProcInfo> = chosen.iter().filter_map(|c| c.process.clone()).collect();
                journal(Entry { paused: procs.clone(), ..entry("pause") })?;
                let done = {
                    let procs = procs.clone();
                    let guards = self.guards_now();
                    tokio::task::spawn_blocking(move || signal_all(&procs, libc::SIGSTOP, false, &guards))
                        .await
                        .unwrap_or_default()
                };
                let sent = done.sent.clone();
                if sent.is_empty() {
                    let _ = self.journal.remove(&id);
                    return Err(done.none_error("no process stopped"));
                }
                fault.held = done.fds;
                fault.paused = procs.into_iter().filter(|p| sent.contains(&p.pid)).collect();
                fault.report.pids = sent.clone();
                fault.report.state = Some(State::Active);
                Ok(format!("stopped pid(s) {sent:?} for {:.1} s", lifetime.as_secs_f64()))
            }
            FaultAction::Network { impairment, direction, protocol, label } => {
                let engine =
                    self.network().ok_or_else(|| FaultError::NetworkDisabled("network control is off".into()))?;
                let ports: BTreeSet<u16> = chosen.iter().flat_map(|c| c.ports.clone()).collect();
                let (matches, notes) = port_matches(&ports, *protocol, *direction);
                for note in &notes {
                    warn!(fault = %id, "{note}");
                }
                journal(Entry { network: true, ..entry(label) })?;
                let handle = match engine.apply(&id, &matches, impairment, lifetime).await {
                    Ok(h) => h,
                    Err(err) => {
                        let _ = self.journal.remove(&id);
                        return Err(err.into());
                    }
                };
                fault.report.interfaces = handle.interfaces.clone();
                fault.report.ports = ports.iter().copied().collect();
                fault.net = Some(handle);
                fault.report.state = Some(State::Active);
                let protocols: BTreeSet<&str> = matches.iter().map(|m| protocol_name(m.protocol)).collect();
                let mut msg = format!(
                    "{label} on port(s) {:?} ({direction:?}, {}) via {} for {:.1} s",
                    fault.report.ports,
                    protocols.into_iter().collect::<Vec<_>>().join("+"),
                    fault.report.interfaces.join(", "),
                    lifetime.as_secs_f64()
                );
                for note in notes {
                    msg.push_str("; warning: ");
                    msg.push_str(&note);
                }
                Ok(msg)
            }
            FaultAction::Cpu(_) | FaultAction::Memory(_) | FaultAction::Disk(_) => {
                let cgroup_pid = chosen.iter().find_map(|c| c.process.as_ref().map(|p| p.pid));
                // The caller holds the budget lock: the free-space check and the memory cap see every earlier fault.
                let prepared = resource::prepare(&fault.spec.action, &id, cgroup_pid, Some(&self.disk))?;
                if let resource::Prepared::Memory { mib, .. } = &prepared {
                    self.check_memory_budget(*mib).await?;
                }
                journal(Entry { files: prepared.files(), ..entry(&fault.spec.action.kind()) })?;
                let running = match prepared.start(lifetime).await {
                    Ok(r) => r,
                    Err(err) => {
                        let _ = self.journal.remove(&id);
                        return Err(err.into());
                    }
                };
                journal(Entry {
                    files: running.files(),
                    workers: running.workers(),
                    ..entry(&fault.spec.action.kind())
                })?;
                let msg = running.describe();
                fault.report.usage = Some(running.usage());
                fault.resource = Some(running);
                fault.report.state = Some(State::Active);
                Ok(msg)
            }
        }
    }

    /// Follows network faults aimed at services/instances to the ports of restarted instances.
    async fn follow(me: Weak<FaultManager>, mut rx: tokio::sync::watch::Receiver<Arc<Snapshot>>) {
        while rx.changed().await.is_ok() {
            let Some(me) = me.upgrade() else { return };
            let snap = rx.borrow_and_update().clone();
            me.follow_once(&snap).await;
        }
    }

    async fn follow_once(&self, snap: &Snapshot) {
        let Some(engine) = self.network() else { return };
        let mut inner = self.inner.lock().await;
        for fault in inner.active.values_mut() {
            let (FaultAction::Network { impairment, direction, protocol, .. }, Some(handle)) =
                (&fault.spec.action, &fault.net)
            else {
                continue;
            };
            if !matches!(fault.spec.target, Target::Service { .. } | Target::AllServices) {
                continue;
            }
            let Ok(resolved) = self.resolve(&fault.spec.target, &fault.spec.action, snap) else { continue };
            let ports: BTreeSet<u16> = resolved.candidates.iter().flat_map(|c| c.ports.clone()).collect();
            let ports: Vec<u16> = ports.into_iter().collect();
            if ports.is_empty() || ports == fault.report.ports {
                continue;
            }
            let remaining = Duration::from_secs_f64((fault.report.expires - now_unix()).max(0.05));
            let (matches, _) = port_matches(&ports.iter().copied().collect(), *protocol, *direction);
            if let Err(err) = engine.revert(handle).await {
                warn!(%err, "following: could not remove old rules");
            }
            match engine.apply(&fault.report.id, &matches, impairment, remaining).await {
                Ok(new) => {
                    let old = std::mem::replace(&mut fault.report.ports, ports.clone());
                    fault.report.pids =
                        resolved.candidates.iter().filter_map(|c| c.process.as_ref().map(|p| p.pid)).collect();
                    fault.net = Some(new);
                    self.events.record(Event {
                        fault: Some(fault.report.id.clone()),
                        kind: Some(fault.report.kind.clone()),
                        ports: ports.clone(),
                        pids: fault.report.pids.clone(),
                        ..Event::new(Action::Followed)
                            .message(format!("target moved from port(s) {old:?} to {ports:?}"))
                    });
                }
                Err(err) => {
                    fault.net = None;
                    warn!(%err, fault = %fault.report.id, "following: could not re-apply");
                }
            }
        }
    }
}

fn push_history(history: &mut VecDeque<FaultReport>, report: FaultReport) {
    history.push_back(report);
    while history.len() > HISTORY {
        history.pop_front();
    }
}

/// Fault ids name files and journal entries: `[A-Za-z0-9._-]{1,64}`, checked once where requests come in.
///
/// # Errors
/// [`FaultError::Invalid`] for anything else.
pub fn validate_id(id: &str) -> Result<(), FaultError> {
    let ok = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(FaultError::Invalid("a fault id is 1 to 64 characters among A-Z a-z 0-9 . _ - (no `/`, no spaces)".into()))
    }
}

/// Chooses targets: sorted deterministically, then shuffled with the seed, so a seed replays the same choice.
fn select(mut candidates: Vec<Candidate>, selection: Selection, seed: u64) -> Result<Vec<Candidate>, FaultError> {
    if candidates.is_empty() {
        return Ok(candidates);
    }
    candidates.sort_by_key(|c| {
        (c.instance.as_ref().map(|i| i.id.clone()), c.process.as_ref().map(|p| p.pid), c.ports.clone())
    });
    let n = candidates.len();
    let k = match selection {
        Selection::One => 1,
        Selection::Count(0) => return Err(FaultError::Invalid("count must be at least 1".into())),
        Selection::Count(c) => (c as usize).min(n),
        Selection::Percent(p) if !(p > 0.0 && p <= 100.0) => {
            return Err(FaultError::Invalid(format!("percent must be in (0, 100], got {p}")));
        }
        Selection::Percent(p) => ((n as f64 * p / 100.0).ceil() as usize).clamp(1, n),
        Selection::All => n,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    candidates.shuffle(&mut rng);
    candidates.truncate(k);
    // Keep a stable order in reports.
    candidates.sort_by_key(|c| c.process.as_ref().map(|p| p.pid));
    Ok(candidates)
}

/// Sends a signal to each process, judging each again right before: the pidfd pins the process, then its
/// command line is read again and the guards decide on what it is now (a process that changed its title since
/// resolution, or a pid reused, is refused). Returns (pids signalled, pids seen exiting, errors, refusals).
fn signal_all(procs: &[ProcInfo], signal: i32, wait_exit: bool, guards: &Guards) -> Signalled {
    let mut fds = Vec::new();
    let mut errors = Vec::new();
    let mut refused = Vec::new();
    for p in procs {
        let fd = match PidFd::open(p) {
            Ok(fd) => fd,
            Err(err) => {
                errors.push(err.to_string());
                continue;
            }
        };
        match process::proc_info(p.pid).filter(|now| now.start_time == p.start_time && now.state != 'Z') {
            None => {
                errors.push(format!("pid {} is no longer the process that was targeted", p.pid));
                continue;
            }
            Some(now) => {
                if let Err(r) = guards.check(&now, Origin::Direct) {
                    refused.push(r.to_string());
                    continue;
                }
            }
        }
        match fd.signal(signal) {
            Ok(()) => fds.push(fd),
            Err(err) => errors.push(err.to_string()),
        }
    }
    let sent: Vec<i32> = fds.iter().map(|f: &PidFd| f.info.pid).collect();
    let exited = if wait_exit {
        fds.iter().filter(|f| f.wait_exit(KILL_WAIT)).map(|f| f.info.pid).collect()
    } else {
        Vec::new()
    };
    Signalled { sent, exited, errors, refused, fds }
}

/// What [`signal_all`] did.
#[derive(Default)]
struct Signalled {
    sent: Vec<i32>,
    exited: Vec<i32>,
    errors: Vec<String>,
    refused: Vec<String>,
    /// The pidfds of the processes signalled.
    fds: Vec<PidFd>,
}

impl Signalled {
    /// The error when nothing was signalled: refused when a guard said no, else not found.
    fn none_error(&self, what: &str) -> FaultError {
        if self.refused.is_empty() {
            FaultError::NotFound(format!("{what}: {}", self.errors.join("; ")))
        } else {
            FaultError::Refused(self.refused.iter().chain(&self.errors).cloned().collect::<Vec<_>>().join("; "))
        }
    }

    fn skipped(&self) -> Vec<String> {
        self.refused.iter().chain(&self.errors).cloned().collect()
    }
}

/// The pid owning a listening TCP socket on `port` in this namespace. `hints` (the instance registered there, the
/// owner found last time) are looked at first, so the usual answer costs one `/proc/<pid>/fd` read instead of a
/// scan of every process; a stale hint only costs that read.
/// The process holding a socket on `port` for `protocol`: a TCP listener, a bound (unconnected) UDP socket, or
/// either when the protocol is both or not given (a TCP listener first).
fn owner_of_port(port: u16, protocol: Option<Protocol>, hints: &[i32]) -> Option<i32> {
    let tcp = || -> std::collections::HashSet<u64> {
        sockets::tcp_listeners().unwrap_or_default().iter().filter(|l| l.port == port).map(|l| l.inode).collect()
    };
    let udp = || -> std::collections::HashSet<u64> {
        sockets::udp_bound_sockets().iter().filter(|l| l.port == port).map(|l| l.inode).collect()
    };
    let owner = |inodes: std::collections::HashSet<u64>| -> Option<i32> {
        if inodes.is_empty() {
            return None;
        }
        // Any socket on the port will do (v4 and v6 sockets of one process, or SO_REUSEPORT siblings).
        sockets::owners_of(&inodes, hints).values().min().copied()
    };
    match protocol {
        Some(Protocol::Tcp) => owner(tcp()),
        Some(Protocol::Udp) => owner(udp()),
        Some(Protocol::Both) | None => owner(tcp()).or_else(|| owner(udp())),
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Both => "tcp+udp",
    }
}

/// The port matches of a network fault: the protocol asked for, or else what listens on each port (TCP, UDP or
/// both; TCP when nothing listens yet). Also the sentences to tell the caller when the protocol meets no
/// listener on a port (the fault is applied anyway: the service may be about to start).
fn port_matches(
    ports: &BTreeSet<u16>,
    protocol: Option<Protocol>,
    direction: Direction,
) -> (Vec<PortMatch>, Vec<String>) {
    let tcp: Vec<(IpAddr, u16)> =
        sockets::tcp_listeners().unwrap_or_default().iter().map(|l| (l.addr, l.port)).collect();
    let udp = sockets::udp_bound();
    let mut notes = Vec::new();
    let mut matches = Vec::new();
    for &port in ports {
        let on = |socks: &[(IpAddr, u16)]| socks.iter().any(|&(_, p)| p == port);
        let listens = match (on(&tcp), on(&udp)) {
            (true, true) => Some(Protocol::Both),
            (true, false) => Some(Protocol::Tcp),
            (false, true) => Some(Protocol::Udp),
            (false, false) => None,
        };
        let chosen = match (protocol, listens) {
            (Some(p), Some(l)) => {
                let meets = p == l || p == Protocol::Both || l == Protocol::Both;
                if !meets {
                    notes.push(format!(
                        "nothing listens on {} port {port} on this host (it listens on {}): this fault will not \
                         touch the service's traffic; use protocol={}",
                        protocol_name(p),
                        protocol_name(l),
                        protocol_name(l)
                    ));
                }
                p
            }
            (Some(p), None) => {
                notes.push(format!("nothing listens on port {port} on this host yet ({} assumed)", protocol_name(p)));
                p
            }
            (None, Some(l)) => l,
            (None, None) => {
                notes.push(format!(
                    "nothing listens on port {port} on this host yet: the fault matches tcp (give protocol=udp or \
                     both for other traffic)"
                ));
                Protocol::Tcp
            }
        };
        // The sockets' addresses: bound to one address each → rules on those addresses; any wildcard socket (or
        // none yet) → any address of this host.
        let addrs: BTreeSet<IpAddr> =
            tcp.iter().chain(udp.iter()).filter(|&&(_, p)| p == port).map(|&(a, _)| a.to_canonical()).collect();
        if addrs.is_empty() || addrs.iter().any(IpAddr::is_unspecified) {
            matches.push(PortMatch::new(port, chosen, direction));
        } else {
            matches.extend(
                addrs.into_iter().map(|a| PortMatch { addr: Some(a), ..PortMatch::new(port, chosen, direction) }),
            );
        }
    }
    (matches, notes)
}

/// Listening TCP ports of some pids.
fn ports_of(pids: &[i32]) -> Vec<u16> {
    let listeners = sockets::tcp_listeners().unwrap_or_default();
    let inodes = listeners.iter().map(|l| l.inode).collect();
    let owners = sockets::owners_among(&inodes, pids);
    let ports: BTreeSet<u16> =
        listeners.into_iter().filter(|l| owners.contains_key(&l.inode)).map(|l| l.port).collect();
    ports.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(pid: i32) -> Candidate {
        Candidate {
            process: Some(ProcInfo {
                pid,
                ppid: 1,
                comm: "x".into(),
                cmdline: "x".into(),
                start_time: 1,
                kthread: false,
                state: 'S',
            }),
            ports: vec![],
            instance: None,
            origin: Origin::Direct,
        }
    }

    #[test]
    fn selection_is_seeded_and_bounded() {
        let all: Vec<Candidate> = (10..20).map(cand).collect();
        let pick = |sel, seed| {
            select(all.clone(), sel, seed).unwrap().iter().map(|c| c.process.as_ref().unwrap().pid).collect::<Vec<_>>()
        };
        assert_eq!(pick(Selection::One, 7), pick(Selection::One, 7));
        assert_eq!(pick(Selection::One, 7).len(), 1);
        assert_eq!(pick(Selection::Count(3), 1).len(), 3);
        assert_eq!(pick(Selection::Count(99), 1).len(), 10);
        assert_eq!(pick(Selection::Percent(25.0), 1).len(), 3);
        assert_eq!(pick(Selection::All, 1).len(), 10);
        // Different seeds explore different choices.
        let distinct: BTreeSet<Vec<i32>> = (0..20).map(|s| pick(Selection::One, s)).collect();
        assert!(distinct.len() > 3);
        assert!(select(all.clone(), Selection::Count(0), 1).is_err());
        assert!(select(all, Selection::Percent(0.0), 1).is_err());
    }
}
