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

pub mod fillfs;
pub mod manager;
pub mod network;
pub mod process;
pub mod request;
pub mod resource;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::manager::{FaultError, FaultManager, Refusal};
use self::network::{Direction, FaultCounters, Impairment, Protocol};

pub use chaos_api::fault::{Selection, Target};

/// What to do.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultAction {
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
    pub fn kind(&self) -> String {
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
    pub fn needs_pids(&self) -> bool {
        matches!(self, FaultAction::Kill { .. } | FaultAction::Terminate | FaultAction::Pause)
    }

    /// Default selection when a request names none: one random instance for process faults (Chaos Monkey's
    /// choice), every instance for network faults ("make every call to the service slower").
    pub fn default_selection(&self) -> Selection {
        if self.needs_pids() { Selection::One } else { Selection::All }
    }
}

/// A complete fault request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FaultSpec {
    /// Client-chosen id: applying the same id again refreshes the fault instead of adding one.
    pub id: Option<String>,
    /// What to aim at.
    pub target: Target,
    /// What to do.
    pub action: FaultAction,
    /// How many targets (default per action kind).
    pub select: Option<Selection>,
    /// Lifetime (default from the configuration; capped at its maximum).
    #[serde(with = "opt_secs", default)]
    pub lifetime: Option<Duration>,
    /// Only report what would be done.
    pub dry_run: bool,
    /// Seed for random choices (random and recorded when absent).
    pub seed: Option<u64>,
    /// For kills: also delete the instance's ZooKeeper registration (clients stop routing to it at once instead
    /// of after its session times out, which is what a real crash looks like).
    pub deregister: bool,
    /// Who asked (`rpc`, `unleash`, `cli`).
    pub origin: String,
}

impl FaultSpec {
    /// A spec with defaults for everything but target and action.
    pub fn new(target: Target, action: FaultAction) -> FaultSpec {
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

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|s| Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Lifecycle state.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum State {
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
pub struct FaultReport {
    /// Fault id.
    pub id: String,
    /// Kind (`kill`, `latency`, …).
    pub kind: String,
    /// State.
    pub state: Option<State>,
    /// Target as requested.
    pub target: Option<Target>,
    /// Service name, when the target resolved to one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Instances hit.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub instances: Vec<String>,
    /// Pids hit.
    #[serde(default)]
    pub pids: Vec<i32>,
    /// Ports hit.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Interfaces the network rules apply on.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub interfaces: Vec<String>,
    /// Nothing was done (dry run).
    pub dry_run: bool,
    /// Lifetime in seconds.
    pub lifetime: f64,
    /// Unix time it was applied.
    pub created: f64,
    /// Unix time it ends.
    pub expires: f64,
    /// Seed of the random choices.
    pub seed: u64,
    /// Human-readable summary.
    pub message: String,
    /// Live counters of network faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<FaultCounters>,
    /// What delays the packets of a latency fault: `netem` or `edt` (see `chaos_api::reply::LatencyBackend`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub backend: Option<chaos_api::reply::LatencyBackend>,
    /// Parameters of the action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<FaultAction>,
    /// What resource faults consume now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<serde_json::Value>,
}
