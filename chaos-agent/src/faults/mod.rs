//! Faults: what a request asks for ([`FaultSpec`]), how it is resolved to pids and ports, checked against the
//! guards, applied, and undone at the end of its lifetime.
//!
//! # Layout
//! - [`manager`] — the lifecycle (pending → active → reverted | expired, or refused): target resolution, guards,
//!   one executor per fault kind, the fault table and its expiry task, the journal, events, and following targets
//!   that come back with a new pid/port
//! - [`process`] — signals via pidfd, process information, the guards
//! - [`network`] — the per-port network fault engine (eBPF classifier, IFB, netem)
//! - [`request`] — the API's typed requests as fault specs
//! - [`resource`] — CPU burn, memory pressure, disk fill workers

pub(crate) mod fillfs;
pub(crate) mod manager;
pub mod network;
pub mod process;
pub(crate) mod request;
pub mod resource;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) use self::manager::{FaultError, FaultManager};
use self::network::{Direction, FaultCounters, Impairment, Protocol};

pub(crate) use chaos_api::fault::{Peer, Selection, Target};

/// What to do.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum FaultAction {
    /// Send a signal (SIGKILL by default).
    Kill {
        /// Signal number.
        signal: i32,
    },
    /// SIGTERM, then SIGKILL after the configured grace period.
    Terminate,
    /// SIGSTOP for the lifetime, then SIGCONT.
    Pause,
    /// A network impairment on the targets' ports.
    Network {
        /// The user-facing kind (`latency`, `loss`, `blackhole`, `rate`, …).
        label: String,
        /// What packets suffer.
        impairment: Impairment,
        /// Which packets.
        direction: Direction,
        /// TCP, UDP or both; `None` = what the target listens on (TCP when nothing listens on its port yet).
        protocol: Option<Protocol>,
        /// Only the traffic between the target and this peer.
        #[serde(default)]
        peer: Option<Peer>,
    },
    /// Burn CPU.
    Cpu(resource::CpuSpec),
    /// Hold memory.
    Memory(resource::MemorySpec),
    /// Fill a filesystem.
    Disk(resource::DiskSpec),
}

impl FaultAction {
    /// The kind name used in events and reports.
    pub(crate) fn kind(&self) -> String {
        match self {
            FaultAction::Kill { .. } => "kill".into(),
            FaultAction::Terminate => "terminate".into(),
            FaultAction::Pause => "pause".into(),
            FaultAction::Network { label, .. } => label.clone(),
            FaultAction::Cpu(_) => "cpu".into(),
            FaultAction::Memory(_) => "memory".into(),
            FaultAction::Disk(_) => "disk".into(),
        }
    }

    /// Whether the action acts on processes (and so needs pids).
    pub(crate) fn needs_pids(&self) -> bool {
        matches!(self, FaultAction::Kill { .. } | FaultAction::Terminate | FaultAction::Pause)
    }

    /// Default selection when a request names none: one random instance for process faults (Chaos Monkey's
    /// choice), every instance for network faults ("make every call to the service slower").
    pub(crate) fn default_selection(&self) -> Selection {
        if self.needs_pids() { Selection::One } else { Selection::All }
    }
}

/// A complete fault request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct FaultSpec {
    /// Client-chosen id: applying the same id again refreshes the fault instead of adding one.
    pub(crate) id: Option<String>,
    /// What to aim at.
    pub(crate) target: Target,
    /// What to do.
    pub(crate) action: FaultAction,
    /// How many targets (default per action kind).
    pub(crate) select: Option<Selection>,
    /// Lifetime (default from the configuration; capped at its maximum).
    #[serde(with = "opt_secs", default)]
    pub(crate) lifetime: Option<Duration>,
    /// Only report what would be done.
    pub(crate) dry_run: bool,
    /// Seed for random choices (random and recorded when absent).
    pub(crate) seed: Option<u64>,
    /// For kills: also delete the instance's ZooKeeper registration (clients stop routing to it at once instead
    /// of after its session times out, which is what a real crash looks like).
    pub(crate) deregister: bool,
    /// Who asked (`rpc`, `unleash`, `cli`).
    pub(crate) origin: String,
}

impl FaultSpec {
    /// A spec with defaults for everything but target and action.
    #[cfg(test)]
    pub(crate) fn new(target: Target, action: FaultAction) -> FaultSpec {
        FaultSpec {
            id: None,
            target,
            action,
            select: None,
            lifetime: None,
            dry_run: false,
            seed: None,
            deregister: false,
            origin: "rpc".into(),
        }
    }
}

mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|s| Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Lifecycle state.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum State {
    /// Being applied.
    Pending,
    /// In effect.
    Active,
    /// Undone on request.
    Reverted,
    /// Lifetime over (instantaneous faults such as kills end here at once).
    Expired,
    /// Not applied: guards, unknown target, missing kernel feature…
    Refused,
}

/// What a fault did or would do; the answer to every fault request and an entry of `Chaos.faults`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct FaultReport {
    /// Fault id.
    pub(crate) id: String,
    /// Kind (`kill`, `latency`, …).
    pub(crate) kind: String,
    /// State.
    pub(crate) state: Option<State>,
    /// Target as requested.
    pub(crate) target: Option<Target>,
    /// Service name, when the target resolved to one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) service: Option<String>,
    /// Instances hit.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub(crate) instances: Vec<String>,
    /// Pids hit.
    #[serde(default)]
    pub(crate) pids: Vec<i32>,
    /// Ports hit.
    #[serde(default)]
    pub(crate) ports: Vec<u16>,
    /// Interfaces the network rules apply on.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub(crate) interfaces: Vec<String>,
    /// Nothing was done (dry run).
    pub(crate) dry_run: bool,
    /// Lifetime in seconds.
    pub(crate) lifetime: f64,
    /// Unix time it was applied.
    pub(crate) created: f64,
    /// Unix time it ends.
    pub(crate) expires: f64,
    /// Seed of the random choices.
    pub(crate) seed: u64,
    /// Human-readable summary.
    pub(crate) message: String,
    /// Live counters of network faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) counters: Option<FaultCounters>,
    /// What delays the packets of a latency fault: `netem` or `edt` (see `chaos_api::reply::LatencyBackend`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) backend: Option<chaos_api::reply::LatencyBackend>,
    /// Parameters of the action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) action: Option<FaultAction>,
    /// What resource faults consume now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<serde_json::Value>,
    /// The measured effect of a network fault (added delay, loss, verdict), beside its counters.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) observed: Option<chaos_api::reply::Observation>,
}
