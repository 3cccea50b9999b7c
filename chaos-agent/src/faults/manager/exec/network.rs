//! Network faults: the ports of the chosen targets get an impairment in the network engine.

use std::{
    collections::BTreeSet,
    net::{IpAddr, ToSocketAddrs},
    time::Duration,
};

use tracing::warn;

use super::{Executed, Undo};
use crate::{
    discovery::{Snapshot, sockets},
    faults::{
        FaultAction, FaultReport, Peer,
        manager::{FaultError, FaultManager, resolve::Candidate},
        network::{Direction, PeerMatch, PeerSender, PortMatch, Protocol},
    },
};

impl FaultManager {
    pub(super) async fn network_fault(
        &self,
        report: &mut FaultReport,
        action: &FaultAction,
        chosen: &[Candidate],
        lifetime: Duration,
    ) -> Result<Executed, FaultError> {
        let FaultAction::Network { impairment, direction, protocol, label, peer } = action else {
            unreachable!("dispatched on the action kind")
        };
        let engine = self.network().ok_or_else(|| FaultError::NetworkDisabled("network control is off".into()))?;
        let ports: BTreeSet<u16> = chosen.iter().flat_map(|c| c.ports.clone()).collect();
        if let Some(peer) = peer {
            let snap = self.discovery.snapshot();
            let (matches, notes) = peer_matches(&snap, peer, chosen, &ports, *protocol, *direction)?;
            for note in &notes {
                warn!(fault = %report.id, "{note}");
            }
            self.journal(report, label, |e| crate::journal::Entry { network: true, ..e })?;
            let handle = match engine.apply_peer(&report.id, &matches, impairment, lifetime).await {
                Ok(h) => h,
                Err(err) => {
                    self.unjournal(&report.id);
                    return Err(err.into());
                }
            };
            report.interfaces = handle.interfaces.clone();
            report.ports = ports.iter().copied().collect();
            let mut message = format!(
                "{label} between port(s) {:?} and {} ({direction:?}: {} sender/receiver pair(s)) via {} for {:.1} s",
                report.ports,
                describe_peer(peer),
                matches.len(),
                report.interfaces.join(", "),
                lifetime.as_secs_f64()
            );
            for note in notes {
                message.push_str("; warning: ");
                message.push_str(&note);
            }
            return Ok(Executed { message, undo: Undo::Network(handle) });
        }
        let (matches, notes) = port_matches(&ports, *protocol, *direction);
        for note in &notes {
            warn!(fault = %report.id, "{note}");
        }
        self.journal(report, label, |e| crate::journal::Entry { network: true, ..e })?;
        let handle = match engine.apply(&report.id, &matches, impairment, lifetime).await {
            Ok(h) => h,
            Err(err) => {
                self.unjournal(&report.id);
                return Err(err.into());
            }
        };
        report.interfaces = handle.interfaces.clone();
        report.backend = handle.backend;
        report.ports = ports.iter().copied().collect();
        let protocols: BTreeSet<&str> = matches.iter().map(|m| protocol_name(m.protocol)).collect();
        let mut message = format!(
            "{label} on port(s) {:?} ({direction:?}, {}) via {} for {:.1} s",
            report.ports,
            protocols.into_iter().collect::<Vec<_>>().join("+"),
            report.interfaces.join(", "),
            lifetime.as_secs_f64()
        );
        if let Some(backend) = handle.backend {
            message.push_str(match backend {
                chaos_api::reply::LatencyBackend::Netem => "; delayed by netem",
                chaos_api::reply::LatencyBackend::Edt => "; delayed by EDT (sch_fq: this kernel has no sch_netem)",
            });
        }
        for note in notes {
            message.push_str("; warning: ");
            message.push_str(&note);
        }
        Ok(Executed { message, undo: Undo::Network(handle) })
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Both => "tcp+udp",
    }
}

/// What listens on a port here: TCP, UDP, both, or nothing yet.
fn listening(port: u16, tcp: &[(IpAddr, u16)], udp: &[(IpAddr, u16)]) -> Option<Protocol> {
    let on = |socks: &[(IpAddr, u16)]| socks.iter().any(|&(_, p)| p == port);
    match (on(tcp), on(udp)) {
        (true, true) => Some(Protocol::Both),
        (true, false) => Some(Protocol::Tcp),
        (false, true) => Some(Protocol::Udp),
        (false, false) => None,
    }
}

/// The protocol a fault on `port` matches: the one asked for, or else what listens there (TCP when nothing
/// does yet); plus a sentence for the caller when the protocol meets no listener.
fn chosen_protocol(port: u16, asked: Option<Protocol>, listens: Option<Protocol>) -> (Protocol, Option<String>) {
    match (asked, listens) {
        (Some(p), Some(l)) => {
            let meets = p == l || p == Protocol::Both || l == Protocol::Both;
            let note = (!meets).then(|| {
                format!(
                    "nothing listens on {} port {port} on this host (it listens on {}): this fault will not touch \
                     the service's traffic; use protocol={}",
                    protocol_name(p),
                    protocol_name(l),
                    protocol_name(l)
                )
            });
            (p, note)
        }
        (Some(p), None) => {
            (p, Some(format!("nothing listens on port {port} on this host yet ({} assumed)", protocol_name(p))))
        }
        (None, Some(l)) => (l, None),
        (None, None) => (
            Protocol::Tcp,
            Some(format!(
                "nothing listens on port {port} on this host yet: the fault matches tcp (give protocol=udp or both \
                 for other traffic)"
            )),
        ),
    }
}

/// The port matches of a network fault: the protocol asked for, or else what listens on each port (TCP, UDP or
/// both; TCP when nothing listens yet). Also the sentences to tell the caller when the protocol meets no
/// listener on a port (the fault is applied anyway: the service may be about to start).
pub(in crate::faults::manager) fn port_matches(
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
        let (chosen, note) = chosen_protocol(port, protocol, listening(port, &tcp, &udp));
        notes.extend(note);
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

/// How a peer is named in messages.
pub(in crate::faults::manager) fn describe_peer(peer: &Peer) -> String {
    match peer {
        Peer::Service(name) => format!("service {name}"),
        Peer::Host(host) => format!("host {host}"),
        Peer::Cidr { addr, len } => format!("network {addr}/{len}"),
    }
}

/// A full-length prefix for one address.
fn host_prefix(addr: IpAddr) -> PeerSender {
    let addr = addr.to_canonical();
    PeerSender::Prefix { addr, len: if addr.is_ipv4() { 32 } else { 128 } }
}

/// The sender/receiver pairs of a peer fault on the ports of `chosen` (see [`Peer`] for what `direction` means),
/// plus sentences for the caller (instances whose traffic cannot be recognised).
///
/// `to`: the peer's instances (by process when they run here, else by registered address) or the host's / the
/// network's addresses → the target's ports. `from` (service peers only): the target's processes → each peer
/// instance's registered endpoint, the connection lymph sends replies on.
pub(in crate::faults::manager) fn peer_matches(
    snap: &Snapshot,
    peer: &Peer,
    chosen: &[Candidate],
    ports: &BTreeSet<u16>,
    protocol: Option<Protocol>,
    direction: Direction,
) -> Result<(Vec<PeerMatch>, Vec<String>), FaultError> {
    let (matches, notes) = match peer {
        Peer::Service(name) => service_peer_matches(snap, name, chosen, ports, protocol, direction)?,
        Peer::Host(_) | Peer::Cidr { .. } => {
            if direction != Direction::To {
                return Err(FaultError::Invalid(
                    "peer_host and peer_cidr match callers by address: only direction \"to\" applies (give \
                     peer=<service> for the connection lymph replies travel on)"
                        .into(),
                ));
            }
            let senders: Vec<PeerSender> = match peer {
                Peer::Host(host) => resolve_peer_host(host)?.into_iter().map(host_prefix).collect(),
                Peer::Cidr { addr, len } => vec![PeerSender::Prefix { addr: *addr, len: *len }],
                Peer::Service(_) => unreachable!("handled above"),
            };
            let (receivers, notes) = port_matches(ports, protocol, Direction::To);
            let mut matches = BTreeSet::new();
            for sender in senders {
                for r in &receivers {
                    matches.insert(PeerMatch { sender, addr: r.addr, port: r.port, protocol: r.protocol });
                }
            }
            (matches, notes)
        }
    };
    Ok((matches.into_iter().collect(), notes))
}

/// How long a `peer_host` name may take to resolve: the lookup runs on a thread of its own, so a resolver that
/// never answers costs one request this long, never the agent.
const PEER_HOST_LOOKUP: Duration = Duration::from_secs(2);

/// The addresses of a `peer_host`: an address as given, a name through the system resolver (bounded).
fn resolve_peer_host(host: &str) -> Result<BTreeSet<IpAddr>, FaultError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(BTreeSet::from([ip.to_canonical()]));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let name = host.to_owned();
    std::thread::Builder::new()
        .name("peer-host-lookup".into())
        .spawn(move || {
            let _ = tx.send((name.as_str(), 0).to_socket_addrs().map(|a| a.map(|a| a.ip().to_canonical()).collect()));
        })
        .map_err(|e| FaultError::NotFound(format!("peer_host `{host}`: cannot start a lookup: {e}")))?;
    match rx.recv_timeout(PEER_HOST_LOOKUP) {
        Ok(Ok(addrs)) => Ok(addrs),
        Ok(Err(e)) => Err(FaultError::NotFound(format!("peer_host `{host}` does not resolve: {e}"))),
        Err(_) => Err(FaultError::NotFound(format!(
            "peer_host `{host}` did not resolve within {} s (give an address)",
            PEER_HOST_LOOKUP.as_secs()
        ))),
    }
}

/// [`peer_matches`] for `peer=<service>`: its instances (by process when they run here, else by registered
/// address) → the target's ports (`to`); the target's processes → each instance's registered endpoint (`from`).
fn service_peer_matches(
    snap: &Snapshot,
    name: &str,
    chosen: &[Candidate],
    ports: &BTreeSet<u16>,
    protocol: Option<Protocol>,
    direction: Direction,
) -> Result<(BTreeSet<PeerMatch>, Vec<String>), FaultError> {
    let (wants_to, wants_from) = (direction != Direction::From, direction != Direction::To);
    let Some((service, instances)) = snap.service(name) else {
        let known: Vec<&str> = snap.services.keys().map(String::as_str).collect();
        return Err(FaultError::UnknownService {
            name: name.to_owned(),
            known: if known.is_empty() { "none".into() } else { known.join(", ") },
        });
    };
    let (receivers, mut notes) = port_matches(ports, protocol, Direction::To);
    let targets: Vec<u32> = chosen.iter().filter_map(|c| c.process.as_ref().map(|p| p.pid as u32)).collect();
    if wants_from && targets.is_empty() {
        return Err(FaultError::NotFound(
            "direction from/both needs the target's processes on this host (they send the replies)".into(),
        ));
    }
    let mut matches = BTreeSet::new();
    for inst in instances {
        let sender = if inst.local {
            let Some(pid) = inst.pid else {
                notes.push(format!("instance {} of {service} runs here but its process is unknown", inst.id));
                continue;
            };
            PeerSender::Process(pid as u32)
        } else {
            let Some(ip) = instance_ip(inst) else {
                notes.push(format!("instance {} of {service} has no address ({})", inst.id, inst.endpoint));
                continue;
            };
            host_prefix(ip)
        };
        if wants_to {
            for r in &receivers {
                matches.insert(PeerMatch { sender, addr: r.addr, port: r.port, protocol: r.protocol });
            }
        }
        if wants_from && let (Some(ip), Some(port)) = (instance_ip(inst), inst.port) {
            for &tgid in &targets {
                let protocol = protocol.unwrap_or(Protocol::Tcp);
                matches.insert(PeerMatch { sender: PeerSender::Process(tgid), addr: Some(ip), port, protocol });
            }
        }
    }
    if matches.is_empty() {
        return Err(FaultError::NotFound(format!(
            "peer service {service} has no instance whose traffic can be recognised ({} registered{})",
            instances.len(),
            if notes.is_empty() { String::new() } else { format!("; {}", notes.join("; ")) }
        )));
    }
    Ok((matches, notes))
}

/// The registered address of an instance (`ip`, else the endpoint's host).
fn instance_ip(inst: &crate::discovery::Instance) -> Option<IpAddr> {
    if let Some(ip) = inst.ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()) {
        return Some(ip.to_canonical());
    }
    let rest = inst.endpoint.strip_prefix("tcp://")?;
    let (host, _) = rest.rsplit_once(':')?;
    host.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod peer_tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        discovery::{Instance, Snapshot, ZkState, instance::Source},
        faults::process::{Origin, ProcInfo},
    };

    fn instance(service: &str, id: &str, endpoint: &str, local: bool, pid: Option<i32>) -> Instance {
        let port = endpoint.rsplit(':').next().and_then(|p| p.parse().ok());
        let ip = endpoint.strip_prefix("tcp://").and_then(|e| e.rsplit_once(':')).map(|(h, _)| h.to_owned());
        Instance {
            service: service.into(),
            id: id.into(),
            identity: id.into(),
            endpoint: endpoint.into(),
            version: None,
            hostname: None,
            ip,
            source: Source::Zookeeper,
            local,
            pid,
            port,
            listening: local,
            process: None,
        }
    }

    fn snapshot() -> Snapshot {
        let mut services = BTreeMap::new();
        services.insert(
            "Billing".to_owned(),
            vec![
                instance("Billing", "b-here", "tcp://127.0.0.1:41001", true, Some(4001)),
                instance("Billing", "b-there", "tcp://10.9.0.7:41002", false, None),
            ],
        );
        services
            .insert("Payments".to_owned(), vec![instance("Payments", "p", "tcp://127.0.0.1:42000", true, Some(4200))]);
        Snapshot { services, zookeeper: ZkState::Disabled, generation: 1 }
    }

    fn callee() -> Vec<Candidate> {
        let process = ProcInfo {
            pid: 4200,
            ppid: 1,
            comm: "lymph".into(),
            cmdline: "lymph-instance".into(),
            start_time: 1,
            kthread: false,
            state: 'S',
        };
        vec![Candidate { process: Some(process), ports: vec![42000], instance: None, origin: Origin::LymphInstance }]
    }

    fn pairs(direction: Direction) -> Vec<PeerMatch> {
        let ports: BTreeSet<u16> = [42000].into();
        let peer = Peer::Service("Billing".into());
        peer_matches(&snapshot(), &peer, &callee(), &ports, Some(Protocol::Tcp), direction).unwrap().0
    }

    #[test]
    fn to_means_the_peers_requests_by_process_here_and_by_address_elsewhere() {
        let got = pairs(Direction::To);
        let expected = [PeerSender::Process(4001), PeerSender::Prefix { addr: "10.9.0.7".parse().unwrap(), len: 32 }];
        assert_eq!(got.len(), 2, "{got:?}");
        for sender in expected {
            assert!(
                got.iter().any(|m| m.sender == sender && m.port == 42000 && m.addr.is_none()),
                "{sender:?}: {got:?}"
            );
        }
    }

    #[test]
    fn from_means_the_targets_replies_to_each_peer_endpoint_and_both_is_the_union() {
        let from = pairs(Direction::From);
        let endpoints: BTreeSet<(Option<IpAddr>, u16)> = from.iter().map(|m| (m.addr, m.port)).collect();
        assert!(from.iter().all(|m| m.sender == PeerSender::Process(4200)), "{from:?}");
        assert_eq!(
            endpoints,
            [(Some("127.0.0.1".parse().unwrap()), 41001), (Some("10.9.0.7".parse().unwrap()), 41002)].into()
        );
        let both = pairs(Direction::Both);
        let mut union = pairs(Direction::To);
        union.extend(from);
        union.sort();
        assert_eq!(both, union);
    }

    #[test]
    fn unknown_peers_and_address_peers_with_from_are_refused() {
        let ports: BTreeSet<u16> = [42000].into();
        let unknown = peer_matches(&snapshot(), &Peer::Service("Nope".into()), &callee(), &ports, None, Direction::To);
        assert!(matches!(unknown, Err(FaultError::UnknownService { .. })));
        let cidr = Peer::Cidr { addr: "10.0.0.0".parse().unwrap(), len: 8 };
        let from = peer_matches(&snapshot(), &cidr, &callee(), &ports, None, Direction::From);
        assert!(matches!(from, Err(FaultError::Invalid(ref why)) if why.contains("direction")), "{from:?}");
    }
}
