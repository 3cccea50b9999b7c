//! Network faults: the ports of the chosen targets get an impairment in the network engine.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use tracing::warn;

use super::{Executed, Undo};
use crate::{
    discovery::sockets,
    faults::{
        FaultAction, FaultReport,
        manager::{FaultError, FaultManager, resolve::Candidate},
        network::{Direction, PortMatch, Protocol},
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
        let FaultAction::Network { impairment, direction, protocol, label } = action else {
            unreachable!("dispatched on the action kind")
        };
        let engine = self.network().ok_or_else(|| FaultError::NetworkDisabled("network control is off".into()))?;
        let ports: BTreeSet<u16> = chosen.iter().flat_map(|c| c.ports.clone()).collect();
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
