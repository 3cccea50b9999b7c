//! Target resolution: a [`Target`] becomes candidates (process, ports, instance) from discovery, `/proc` and the
//! socket tables of this host.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Mutex,
};

use super::{FaultError, Refusal};
use crate::{
    discovery::{Instance, Snapshot, sockets},
    faults::{
        FaultAction, Target,
        network::Protocol,
        process::{self, Origin, ProcInfo},
    },
};

/// One resolved target.
#[derive(Clone, Debug)]
pub(super) struct Candidate {
    pub(crate) process: Option<ProcInfo>,
    pub(crate) ports: Vec<u16>,
    pub(crate) instance: Option<Instance>,
    pub(crate) origin: Origin,
}

/// What a target resolved to.
pub(super) struct Resolved {
    pub(crate) candidates: Vec<Candidate>,
    pub(crate) service: Option<String>,
    /// All instances of the service (every host), for the share cap.
    pub(crate) total_instances: usize,
}

impl Resolved {
    fn one(candidate: Candidate) -> Resolved {
        Resolved {
            service: candidate.instance.as_ref().map(|i| i.service.clone()),
            candidates: vec![candidate],
            total_instances: 1,
        }
    }

    fn many(candidates: Vec<Candidate>) -> Resolved {
        Resolved { total_instances: candidates.len(), candidates, service: None }
    }
}

/// Resolves targets; remembers who listened on a port last time.
pub(super) struct Resolver {
    /// `faults.allow_unbound_ports`.
    pub(crate) allow_unbound_ports: bool,
    /// Port → the pid that listened there last time (a hint for the next lookup).
    port_owners: Mutex<BTreeMap<u16, i32>>,
}

impl Resolver {
    pub(crate) fn new(allow_unbound_ports: bool) -> Resolver {
        Resolver { allow_unbound_ports, port_owners: Mutex::new(BTreeMap::new()) }
    }

    /// The candidates of `target` for `action` in `snap`.
    pub(crate) fn resolve(
        &self,
        target: &Target,
        action: &FaultAction,
        snap: &Snapshot,
    ) -> Result<Resolved, FaultError> {
        // Resource faults act on the host; a target only matters for cgroup placement.
        if matches!(action, FaultAction::Cpu(_) | FaultAction::Memory(_) | FaultAction::Disk(_))
            && *target == Target::AllServices
        {
            return Ok(Resolved { candidates: Vec::new(), service: None, total_instances: 0 });
        }
        let resolved = match target {
            Target::Service { name } => service(name, snap)?,
            Target::Instance { id } => instance(id, snap)?,
            Target::Port { port } => self.port(*port, action, snap)?,
            Target::Pid { pid } => pid_target(*pid, snap)?,
            Target::Process { pattern } => processes(pattern, action, snap)?,
            Target::AllServices => {
                let candidates: Vec<Candidate> = snap.instances().filter(|i| i.local).map(instance_candidate).collect();
                if candidates.is_empty() {
                    return Err(FaultError::NotFound("no lymph service instance runs on this host".into()));
                }
                Resolved::many(candidates)
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

    /// Whatever holds a port here (for network faults, the port itself, even with no process behind it when
    /// `allow_unbound_ports`).
    fn port(&self, port: u16, action: &FaultAction, snap: &Snapshot) -> Result<Resolved, FaultError> {
        if port == 0 {
            return Err(FaultError::Invalid("port must be between 1 and 65535".into()));
        }
        let instance = snap.instances().find(|i| i.local && i.port == Some(port)).cloned();
        let mut hints: Vec<i32> = instance.iter().filter_map(|i| i.pid).collect();
        hints.extend(self.port_owners.lock().expect("poisoned").get(&port).copied());
        // The owner for the protocol the fault acts on: a UDP-only service has a bound socket, no listener.
        let protocol = match action {
            FaultAction::Network { protocol, .. } => *protocol,
            _ => None,
        };
        let owner = owner_of_port(port, protocol, &hints);
        if let Some(pid) = owner {
            self.port_owners.lock().expect("poisoned").insert(port, pid);
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
        // A port nobody here listens on is someone else's (a remote ZooKeeper, DNS, an overlay network): the
        // guards could not look at its owner.
        if process.is_none() && !self.allow_unbound_ports {
            return Err(Refusal::UnboundPort { on, port }.into());
        }
        Ok(Resolved::one(Candidate { process, ports: vec![port], instance, origin: Origin::Direct }))
    }
}

fn instance_candidate(inst: &Instance) -> Candidate {
    Candidate {
        // A zombie (killed, not yet reaped) is no process to act on.
        process: inst.pid.and_then(process::proc_info).filter(|p| p.state != 'Z' && p.state != 'X'),
        ports: inst.port.into_iter().collect(),
        instance: Some(inst.clone()),
        origin: Origin::LymphInstance,
    }
}

/// Every local instance of a service.
fn service(name: &str, snap: &Snapshot) -> Result<Resolved, FaultError> {
    let Some((service, instances)) = snap.service(name) else {
        let known: Vec<&str> = snap.services.keys().map(String::as_str).collect();
        return Err(FaultError::UnknownService {
            name: name.to_owned(),
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
    Ok(Resolved { candidates: local, service: Some(service.to_owned()), total_instances: instances.len() })
}

/// One instance, by id or identity.
fn instance(id: &str, snap: &Snapshot) -> Result<Resolved, FaultError> {
    let inst = snap
        .instances()
        .find(|i| i.id == id || i.identity == id)
        .ok_or_else(|| FaultError::NotFound(format!("no instance with id or identity `{id}`")))?;
    if !inst.local {
        return Err(FaultError::NotOnThisHost {
            target: format!("instance {id}"),
            detail: format!(" (endpoint {})", inst.endpoint),
        });
    }
    let total = snap.service(&inst.service).map_or(1, |(_, v)| v.len());
    Ok(Resolved {
        candidates: vec![instance_candidate(inst)],
        service: Some(inst.service.clone()),
        total_instances: total,
    })
}

fn pid_target(pid: i32, snap: &Snapshot) -> Result<Resolved, FaultError> {
    let info = process::proc_info(pid).ok_or_else(|| FaultError::NotFound(format!("no process with pid {pid}")))?;
    let ports = ports_of(&[pid]);
    let instance = snap.instances().find(|i| i.pid == Some(pid)).cloned();
    Ok(Resolved::one(Candidate { process: Some(info), ports, instance, origin: Origin::Direct }))
}

/// Processes whose command line matches a pattern (never the agent itself).
fn processes(pattern: &str, action: &FaultAction, snap: &Snapshot) -> Result<Resolved, FaultError> {
    let pat = process::Pattern::parse(pattern)?;
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
        .collect();
    Ok(Resolved::many(candidates))
}

/// The process holding a socket on `port` for `protocol`: a TCP listener, a bound (unconnected) UDP socket, or
/// either when the protocol is both or not given (a TCP listener first). `hints` (the instance registered there,
/// the owner found last time) are looked at first, so the usual answer costs one `/proc/<pid>/fd` read instead of
/// a scan of every process; a stale hint only costs that read.
fn owner_of_port(port: u16, protocol: Option<Protocol>, hints: &[i32]) -> Option<i32> {
    let tcp = || -> HashSet<u64> {
        sockets::tcp_listeners().unwrap_or_default().iter().filter(|l| l.port == port).map(|l| l.inode).collect()
    };
    let udp = || -> HashSet<u64> {
        sockets::udp_bound_sockets().iter().filter(|l| l.port == port).map(|l| l.inode).collect()
    };
    let owner = |inodes: HashSet<u64>| -> Option<i32> {
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

/// Listening TCP ports of some pids.
pub(super) fn ports_of(pids: &[i32]) -> Vec<u16> {
    let listeners = sockets::tcp_listeners().unwrap_or_default();
    let inodes = listeners.iter().map(|l| l.inode).collect();
    let owners = sockets::owners_among(&inodes, pids);
    let ports: BTreeSet<u16> =
        listeners.into_iter().filter(|l| owners.contains_key(&l.inode)).map(|l| l.port).collect();
    ports.into_iter().collect()
}
