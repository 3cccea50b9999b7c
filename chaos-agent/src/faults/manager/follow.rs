//! Following restarted services: a network fault aimed at a service moves to the new ports of its instances, and
//! a peer fault to the instances its peer service has now.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{
    FaultManager,
    exec::{Undo, describe_peer, peer_matches, port_matches},
    now_unix,
    resolve::Candidate,
    table::Fault,
};
use crate::{
    discovery::Snapshot,
    events::{Action, Event},
    faults::{FaultAction, Peer, Target},
};

impl FaultManager {
    /// Follows network faults aimed at services to the ports of restarted instances, until `stop` is cancelled.
    pub(super) async fn follow(self: Arc<Self>, mut rx: watch::Receiver<Arc<Snapshot>>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            let snap = rx.borrow_and_update().clone();
            self.follow_once(&snap).await;
        }
    }

    async fn follow_once(&self, snap: &Snapshot) {
        let mut table = self.table.lock().await;
        for fault in table.active.values_mut() {
            let peer = matches!(&fault.spec.action, FaultAction::Network { peer: Some(_), .. });
            if (peer || matches!(fault.spec.target, Target::Service { .. } | Target::AllServices))
                && matches!(fault.undo, Undo::Network(_))
            {
                self.move_fault(fault, snap).await;
            }
        }
    }

    /// Moves one network fault to the ports its target has now, if they changed.
    async fn move_fault(&self, fault: &mut Fault, snap: &Snapshot) {
        let Some(engine) = self.network() else { return };
        let FaultAction::Network { impairment, direction, protocol, peer, .. } = &fault.spec.action else { return };
        let Ok(resolved) = self.resolver.resolve(&fault.spec.target, &fault.spec.action, snap) else { return };
        if let Some(peer) = peer {
            let peer = peer.clone();
            self.move_peer_fault(fault, snap, &resolved.candidates, &peer).await;
            return;
        }
        let ports: BTreeSet<u16> = resolved.candidates.iter().flat_map(|c| c.ports.clone()).collect();
        let ports: Vec<u16> = ports.into_iter().collect();
        if ports.is_empty() || ports == fault.report.ports {
            return;
        }
        let remaining = Duration::from_secs_f64((fault.report.expires - now_unix()).max(0.05));
        let (matches, _) = port_matches(&ports.iter().copied().collect(), *protocol, *direction);
        if let Undo::Network(handle) = &fault.undo
            && let Err(err) = engine.revert(handle).await
        {
            warn!(%err, "following: could not remove old rules");
        }
        match engine.apply(&fault.report.id, &matches, impairment, remaining).await {
            Ok(new) => {
                let old = std::mem::replace(&mut fault.report.ports, ports.clone());
                fault.report.pids =
                    resolved.candidates.iter().filter_map(|c| c.process.as_ref().map(|p| p.pid)).collect();
                fault.undo = Undo::Network(new);
                super::effect::moved(&mut fault.report, &ports);
                self.events.record(Event {
                    fault: Some(fault.report.id.clone()),
                    kind: Some(fault.report.kind.clone()),
                    ports: ports.clone(),
                    pids: fault.report.pids.clone(),
                    ..Event::new(Action::Followed).message(format!("target moved from port(s) {old:?} to {ports:?}"))
                });
            }
            Err(err) => {
                fault.undo = Undo::Nothing;
                warn!(%err, fault = %fault.report.id, "following: could not re-apply");
            }
        }
    }

    /// Moves a peer fault to the instances its peer (and its target) have now: new instances of the peer service
    /// (new pids, new addresses, new endpoints) are covered, departed ones dropped.
    async fn move_peer_fault(&self, fault: &mut Fault, snap: &Snapshot, candidates: &[Candidate], peer: &Peer) {
        let Some(engine) = self.network() else { return };
        let FaultAction::Network { impairment, direction, protocol, .. } = &fault.spec.action else { return };
        let Undo::Network(handle) = &fault.undo else { return };
        let ports: BTreeSet<u16> = candidates.iter().flat_map(|c| c.ports.clone()).collect();
        if ports.is_empty() {
            return;
        }
        let Ok((matches, _)) = peer_matches(snap, peer, candidates, &ports, *protocol, *direction) else { return };
        let mut keys = BTreeSet::new();
        for m in &matches {
            match m.keys() {
                Ok(k) => keys.extend(k),
                Err(_) => return,
            }
        }
        let current: BTreeSet<_> = handle.peer_keys.iter().copied().collect();
        if keys == current {
            return;
        }
        let remaining = Duration::from_secs_f64((fault.report.expires - now_unix()).max(0.05));
        if let Err(err) = engine.revert(handle).await {
            warn!(%err, "following: could not remove old peer rules");
        }
        match engine.apply_peer(&fault.report.id, &matches, impairment, remaining).await {
            Ok(new) => {
                fault.report.ports = ports.iter().copied().collect();
                fault.undo = Undo::Network(new);
                self.events.record(Event {
                    fault: Some(fault.report.id.clone()),
                    kind: Some(fault.report.kind.clone()),
                    ports: fault.report.ports.clone(),
                    ..Event::new(Action::Followed).message(format!(
                        "peer fault follows {}: {} sender/receiver pair(s)",
                        describe_peer(peer),
                        matches.len()
                    ))
                });
            }
            Err(err) => {
                fault.undo = Undo::Nothing;
                warn!(%err, fault = %fault.report.id, "following: could not re-apply the peer fault");
            }
        }
    }
}
