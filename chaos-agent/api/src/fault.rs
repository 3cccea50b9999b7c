//! Fault kinds and their parameters: what a `Chaos.inject` (or `kill`, `pause`, …) request asks for, aimed at what.
//!
//! These are the request's terms, validated on decoding ([`crate::request`]); the agent turns them into its own
//! fault model (netem and classifier settings, worker processes, signals).

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// What a fault is aimed at.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Target {
    /// Every local instance of a lymph service (resolved through discovery; re-resolved when instances restart).
    Service {
        /// Service name (`Echo`; a unique case-insensitive match is accepted).
        name: String,
    },
    /// One instance, by instance id or container identity.
    Instance {
        /// Instance id or identity.
        id: String,
    },
    /// Whatever listens on a port (network faults: the port itself).
    Port {
        /// The port.
        port: u16,
    },
    /// A process by pid.
    Pid {
        /// The pid.
        pid: i32,
    },
    /// Processes whose command line contains a text (or matches `/regex/`).
    Process {
        /// The pattern.
        pattern: String,
    },
    /// Every local lymph service instance (the 2015 `inject_latency(latency)` without a name).
    AllServices,
}

impl Target {
    /// A short human description.
    pub fn describe(&self) -> String {
        match self {
            Target::Service { name } => format!("service {name}"),
            Target::Instance { id } => format!("instance {id}"),
            Target::Port { port } => format!("port {port}"),
            Target::Pid { pid } => format!("pid {pid}"),
            Target::Process { pattern } => format!("processes matching {pattern}"),
            Target::AllServices => "every local lymph service".into(),
        }
    }
}

/// How many of the resolved targets to hit.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "mode", content = "value", rename_all = "snake_case")]
pub enum Selection {
    /// One, chosen at random (seeded).
    One,
    /// This many, at random.
    Count(u32),
    /// This percentage (at least one), at random.
    Percent(f64),
    /// All of them.
    All,
}

/// Which packets of a port a rule matches.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Packets to the port (requests to a service). Default.
    #[default]
    To,
    /// Packets from the port.
    From,
    /// Both.
    Both,
}

/// The other party of a peer fault: the fault then touches only the traffic between the target and it.
///
/// For a lymph peer, `direction` means what it means for calls (lymph sends requests and replies on separate
/// connections, each from the sender's ROUTER to the receiver's bound endpoint): `to` = packets the peer sends to
/// the target's port (its requests); `from` = packets the target sends to the peer's registered endpoints (the
/// replies to the peer's calls, on the reverse connection); `both` = both, i.e. the peer's calls to the target
/// fail in both legs. The same two connections also carry the target's own calls to the peer, so a blackhole in
/// either direction breaks calls both ways; a one-way cut of lymph calls is not possible at the packet level.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Peer {
    /// A lymph service: its registered instances, by address on other hosts and by process on this one (followed
    /// as instances come and go).
    Service(String),
    /// A host name or address (every address it resolves to); callers only (`direction` `to`).
    Host(String),
    /// A network of callers (`direction` `to`).
    Cidr {
        /// The network.
        addr: std::net::IpAddr,
        /// Prefix length.
        len: u8,
    },
}

impl Peer {
    /// Parses `addr/len` (a bare address is a single host).
    ///
    /// # Errors
    /// A sentence saying what is wrong.
    pub fn parse_cidr(text: &str) -> Result<Peer, String> {
        let (addr, len) = match text.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text.trim(), None),
        };
        let addr: std::net::IpAddr =
            addr.parse().map_err(|_| format!("`{text}` is not a network: give address/length, e.g. 10.1.0.0/16"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0-{max}"))?,
        };
        Ok(Peer::Cidr { addr, len })
    }

    /// How the peer is written in a request: (parameter, value).
    pub fn to_param(&self) -> (&'static str, String) {
        match self {
            Peer::Service(name) => ("peer", name.clone()),
            Peer::Host(host) => ("peer_host", host.clone()),
            Peer::Cidr { addr, len } => ("peer_cidr", format!("{addr}/{len}")),
        }
    }
}

/// Transport protocol(s).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (lymph's transport). Default.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// TCP and UDP.
    Both,
}

/// Distribution of netem's jitter.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JitterDistribution {
    /// Uniform (netem's default without a table).
    Uniform,
    /// Normal.
    Normal,
    /// Pareto.
    Pareto,
    /// Pareto-normal mix.
    Paretonormal,
}

/// CPU burn.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CpuSpec {
    /// Number of busy workers (default 1).
    pub workers: Option<u32>,
    /// Or: a percentage of the machine's cores.
    pub percent_cores: Option<f64>,
    /// Load of each worker, % of one core (default 100).
    pub load: Option<f64>,
    /// Place the workers in the target process's cgroup (so the contention hits that service).
    pub in_target_cgroup: bool,
}

/// Memory pressure.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MemorySpec {
    /// MiB to allocate and touch.
    pub mib: Option<u64>,
    /// Or: a percentage of the currently available memory.
    pub percent_available: Option<f64>,
    /// Place the worker in the target process's cgroup.
    pub in_target_cgroup: bool,
}

/// Disk fill.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DiskSpec {
    /// Directory on the filesystem to fill.
    pub path: Option<PathBuf>,
    /// MiB to write.
    pub mib: Option<u64>,
    /// Or: a percentage of the current free space.
    pub percent_free: Option<f64>,
    /// Free space (% of the filesystem) to leave in any case (default and minimum 5).
    pub floor_percent: Option<f64>,
}

/// The fault kinds `Chaos.inject` takes (its `kind` argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Delay packets (`latency` seconds, optional `jitter`, `correlation`, `distribution`).
    Latency,
    /// Drop `loss` % of packets.
    Loss,
    /// Duplicate `duplicate` % of packets.
    Duplicate,
    /// Corrupt one bit of `corrupt` % of packets.
    Corrupt,
    /// Send `reorder` % of packets out of order (needs a latency).
    Reorder,
    /// Limit the bandwidth to `rate` (bytes/s, or text like `1mbit`).
    Rate,
    /// Drop every packet.
    Blackhole,
    /// Change nothing, only count the port's packets.
    Observe,
    /// Burn CPU (`workers` or `percent_cores`, `load`).
    Cpu,
    /// Hold memory (`mib` or `percent_available`).
    Memory,
    /// Fill a filesystem (`path`, `mib` or `percent_free`, `floor_percent`).
    Disk,
    /// Send a signal (`signal`, default SIGKILL).
    Kill,
    /// SIGTERM, then SIGKILL after the agent's grace period.
    Terminate,
    /// SIGSTOP for the lifetime, then SIGCONT.
    Pause,
}

impl FaultKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: &'static [FaultKind] = &[
        FaultKind::Latency,
        FaultKind::Loss,
        FaultKind::Duplicate,
        FaultKind::Corrupt,
        FaultKind::Reorder,
        FaultKind::Rate,
        FaultKind::Blackhole,
        FaultKind::Observe,
        FaultKind::Cpu,
        FaultKind::Memory,
        FaultKind::Disk,
        FaultKind::Kill,
        FaultKind::Terminate,
        FaultKind::Pause,
    ];

    /// The name on the wire (`"latency"`).
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Latency => "latency",
            FaultKind::Loss => "loss",
            FaultKind::Duplicate => "duplicate",
            FaultKind::Corrupt => "corrupt",
            FaultKind::Reorder => "reorder",
            FaultKind::Rate => "rate",
            FaultKind::Blackhole => "blackhole",
            FaultKind::Observe => "observe",
            FaultKind::Cpu => "cpu",
            FaultKind::Memory => "memory",
            FaultKind::Disk => "disk",
            FaultKind::Kill => "kill",
            FaultKind::Terminate => "terminate",
            FaultKind::Pause => "pause",
        }
    }

    /// The kind with this name (`delay` is another name for `latency`).
    pub fn from_name(name: &str) -> Option<FaultKind> {
        if name == "delay" {
            return Some(FaultKind::Latency);
        }
        FaultKind::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// Whether it acts on packets of the target's ports.
    pub fn is_network(self) -> bool {
        matches!(
            self,
            FaultKind::Latency
                | FaultKind::Loss
                | FaultKind::Duplicate
                | FaultKind::Corrupt
                | FaultKind::Reorder
                | FaultKind::Rate
                | FaultKind::Blackhole
                | FaultKind::Observe
        )
    }

    /// The parameters of this kind, beyond the target and the common ones.
    pub fn params(self) -> &'static [&'static str] {
        match self {
            k if k.is_network() => crate::method::NETWORK,
            FaultKind::Kill | FaultKind::Terminate | FaultKind::Pause => &["signal"],
            FaultKind::Cpu => &["workers", "percent_cores", "load", "in_target_cgroup"],
            FaultKind::Memory => &["mib", "percent_available", "in_target_cgroup"],
            _ => &["path", "mib", "percent_free", "floor_percent"],
        }
    }

    /// The parameters this kind requires.
    pub fn required(self) -> &'static [&'static str] {
        match self {
            FaultKind::Latency => &["latency"],
            FaultKind::Loss => &["loss"],
            FaultKind::Duplicate => &["duplicate"],
            FaultKind::Corrupt => &["corrupt"],
            FaultKind::Reorder => &["reorder"],
            FaultKind::Rate => &["rate"],
            _ => &[],
        }
    }

    /// Whether the fault lasts (and can be reverted) rather than happening once.
    pub fn is_lasting(self) -> bool {
        !matches!(self, FaultKind::Kill | FaultKind::Terminate)
    }

    /// What the kind does (its doc comment).
    pub fn help(self) -> &'static str {
        match self {
            FaultKind::Latency => {
                "Delay packets (`latency` seconds, optional `jitter`, `correlation`, `distribution`)."
            }
            FaultKind::Loss => "Drop `loss` % of packets.",
            FaultKind::Duplicate => "Duplicate `duplicate` % of packets.",
            FaultKind::Corrupt => "Corrupt one bit of `corrupt` % of packets.",
            FaultKind::Reorder => "Send `reorder` % of packets out of order (needs a latency).",
            FaultKind::Rate => "Limit the bandwidth to `rate` (bytes/s, or text like `1mbit`).",
            FaultKind::Blackhole => "Drop every packet.",
            FaultKind::Observe => "Change nothing, only count the port's packets.",
            FaultKind::Cpu => "Burn CPU (`workers` or `percent_cores`, `load`).",
            FaultKind::Memory => "Hold memory (`mib` or `percent_available`).",
            FaultKind::Disk => "Fill a filesystem (`path`, `mib` or `percent_free`, `floor_percent`).",
            FaultKind::Kill => "Send a signal (`signal`, default SIGKILL).",
            FaultKind::Terminate => "SIGTERM, then SIGKILL after the agent's grace period.",
            FaultKind::Pause => "SIGSTOP for the lifetime, then SIGCONT.",
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parameters of a network fault, checked one by one (the agent checks how they combine, e.g. reorder needs a
/// delay). Percentages are 0–100; zero means "not this impairment".
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkParams {
    /// Added delay.
    pub delay: Duration,
    /// Jitter (± around the delay).
    pub jitter: Duration,
    /// Correlation of successive delays, %.
    pub correlation: f64,
    /// Jitter distribution.
    pub distribution: Option<JitterDistribution>,
    /// Random loss, %.
    pub loss: f64,
    /// Duplicated packets, %.
    pub duplicate: f64,
    /// Corrupted packets, %.
    pub corrupt: f64,
    /// Reordered packets, %.
    pub reorder: f64,
    /// Correlation of reordering, %.
    pub reorder_correlation: f64,
    /// Rate limit, bytes per second.
    pub rate: Option<u64>,
    /// Which packets: to the port (default), from it, or both.
    pub direction: Direction,
    /// TCP, UDP or both; `None` = what the target listens on.
    pub protocol: Option<Protocol>,
    /// Only the traffic between the target and this peer (see [`Peer`] for what `direction` then means).
    #[serde(default)]
    pub peer: Option<Peer>,
}

/// A fault with its typed parameters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// A network impairment on the targets' ports.
    Network {
        /// Which network kind was asked for (`latency`, `loss`, `blackhole`, `observe`, …).
        label: FaultKind,
        /// Its parameters.
        params: NetworkParams,
    },
    /// Send a signal.
    Kill {
        /// Signal number (SIGKILL by default).
        signal: i32,
    },
    /// SIGTERM, then SIGKILL after the agent's grace period.
    Terminate,
    /// SIGSTOP for the lifetime, then SIGCONT.
    Pause,
    /// Burn CPU.
    Cpu(CpuSpec),
    /// Hold memory.
    Memory(MemorySpec),
    /// Fill a filesystem.
    Disk(DiskSpec),
}

impl Fault {
    /// The kind of this fault.
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::Network { label, .. } => *label,
            Fault::Kill { .. } => FaultKind::Kill,
            Fault::Terminate => FaultKind::Terminate,
            Fault::Pause => FaultKind::Pause,
            Fault::Cpu(_) => FaultKind::Cpu,
            Fault::Memory(_) => FaultKind::Memory,
            Fault::Disk(_) => FaultKind::Disk,
        }
    }
}
