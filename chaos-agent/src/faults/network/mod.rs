//! Network faults per service port: an eBPF classifier on each interface's clsact hooks, rules in a BPF map,
//! shaping on an agent-owned IFB.
//!
//! # Layout
//! - [`classifier`] — the embedded BPF object, its programs and maps
//! - [`netlink`] — links, qdiscs, classes, filters over rtnetlink
//! - [`effect`] — probes that measure what a fault does to a caller's handshake
//! - [`encode`] — `TCA_OPTIONS` payloads (netem, fq, htb, fifo, tbf, cls_bpf + mirred), byte-tested against `tc`
//! - [`probe`] — what the running kernel offers (qdiscs, helpers, attach points), asked once at start
//!
//! ```text
//!  lo / eth0 / veth…             clsact (created if absent; the root qdisc is never touched)
//!    ├─ prio 3146  bpf da  chaos_ingress / chaos_egress ── RULES[(addr, port, proto, scope)] → drop | loss | mark
//!    └─ prio 3147  bpf     chaos_steer + mirred egress redirect dev lchaos0   (marked packets only)
//!  lchaos0 (ifb, ours)           root htb c4a0: (unclassified → direct)
//!    ├─ filter bpf da chaos_ifb (tc_index → class)
//!    └─ class c4a0:<n> (rate) ── leaf netem (delay, jitter, dup, corrupt, reorder), fq (EDT delay) or pfifo
//! ```
//!
//! ## Two latency backends
//! A latency fault is served by netem when the kernel has `sch_netem`, else by **EDT** (earliest departure time)
//! when it has `sch_fq`; which one the [`probe`] at start decides, and `faults` reports per fault
//! ([`NetHandle::backend`]). With EDT the class's leaf is `fq` (no pacing, `limit` = `flow_limit` sized like
//! netem's queue, horizon = the fault's longest hold + 1 s, `horizon_cap`), and `chaos_ifb` stamps each packet of
//! the class with its departure time from `CHAOS_EDT_CLASSES` (delay, jitter, distribution — netem's tables).
//! What differs from netem, by design:
//! - **Per-flow order**: a packet never leaves before the previous packet of its flow (the classifier raises its
//!   departure time to the flow's last one), so EDT jitter never reorders a TCP stream; netem's jitter does. With
//!   jitter, the delays a busy flow sees therefore lean towards the larger draws.
//! - **Distributions**: uniform (default), normal, pareto, paretonormal, drawn as netem draws them (the same
//!   tables); no correlation, duplicate, corrupt or reorder ([`NetError::NeedsNetem`]).
//! - **Largest delay**: the same bounds as netem (60 s delay, 60 s jitter); fq's horizon is sized per fault to
//!   cover every draw (delay + 4 × jitter), so no packet is dropped for being beyond it.
//! - **Ingress and egress alike**: the stamp is written on the IFB after `act_mirred`, which clears timestamps of
//!   packets taken at an ingress hook (`skb_set_redirected`). A delayed packet received by a local socket carries
//!   its departure time (CLOCK_MONOTONIC) as its receive timestamp (`SO_TIMESTAMP`); loopback traffic is not
//!   affected (`loopback_xmit` clears it).
//! - **TCP senders on this host** keep their packets charged to the socket while fq holds them (netem orphans
//!   them), so one TCP flow through an EDT delay moves at most about `tcp_limit_output_bytes` per delay.
//!
//! Each packet is judged once per direction per host however many of our hooks it crosses (a bridge and its port,
//! a VLAN and its parent …: judged bits in `tc_index`, see `chaos_common::tc_index`), and only packets to or from
//! the target's own addresses match (`LOCAL_ADDRS`, kept current by [`NetworkEngine::follow_links`] together with
//! the attached interfaces).
//!
//! Adding or removing a fault is a map update, plus at most one class and leaf on our IFB; traffic on other
//! ports never notices. Rules carry their expiry and the classifier ignores expired rules itself, so faults lapse
//! even if the agent dies. Every object is recognisable as ours (filter priorities and names, the IFB's name,
//! pins under the agent's bpffs directory, clsact qdiscs we created recorded in the state file), and
//! [`NetworkEngine::cleanup`] removes all of them — at start (leftovers of a crashed run) and at shutdown.
//!
//! ## Directions (what a lymph call feels)
//! lymph replies travel on a separate connection from the service back to the caller's endpoint, so delaying
//! packets *from* the service port slows nothing but TCP ACKs. [`Direction::To`] (default) delays packets *to* the
//! service port — at `lo` egress for callers on this host, at the ingress of other interfaces for remote callers —
//! which slows every request by the delay (a call's round trip grows by the delay once). [`Direction::From`]
//! matches packets leaving the port (responses of request/response protocols on one connection, e.g. HTTP);
//! [`Direction::Both`] does both (round trip grows twice for single-connection protocols).

//!
//! ## Peer faults (between two parties only)
//! A [`PeerMatch`] narrows a fault to the packets one sender sends to one receiver (address, port): "Billing
//! cannot reach Payments, everything else is fine". The sender is a prefix of addresses (remote callers, matched
//! at the ingress of other interfaces and at `lo` egress) or a process of this host (matched by the socket the
//! packet belongs to: the classifier reads `bpf_get_socket_cookie`, and `cgroup/connect4`/`connect6`/`sendmsg4`/
//! `sendmsg6` programs on the cgroup v2 root record which process connected each socket, see
//! `chaos_common::peer`). TCP connections made before those programs were attached are entered from `sock_diag`
//! when the fault starts ([`NetworkEngine::apply_peer`]). Peer rules are looked up before port rules and never conflict with them.

pub mod classifier;
pub mod effect;
pub mod encode;
pub mod netlink;
pub mod probe;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use chaos_common::{
    ANY_LOCAL_ADDR, Counters, Iface, MAX_CLASS_MINOR, PeerAddrKey, PeerProcKey, Rule, RuleKey, action,
    peer::ADDR_KEY_FIXED_BITS,
    proto,
    scope::{self, HOOK_EGRESS, HOOK_INGRESS, HOOK_LOCAL, HOOK_NONE, SIDE_DST, SIDE_SRC},
};
use chaos_common::{EdtClass, edt_dist};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use self::{
    classifier::{Classifier, ClassifierError},
    netlink::{CLSACT_EGRESS, CLSACT_HANDLE, CLSACT_INGRESS, Link, Netlink, NetlinkError, TC_H_CLSACT, TC_H_ROOT},
};

/// Priority of our direct-action filter on clsact hooks (runs before tc's default priority 49152).
pub const PRIO_CLASSIFY: u16 = 3146;
/// Priority of our mirred filter, right after.
pub const PRIO_STEER: u16 = 3147;
/// Handle of our filters.
pub const FILTER_HANDLE: u32 = 0xC4A0;
/// Prefix of our filters' TCA_BPF_NAME.
pub const FILTER_NAME_PREFIX: &str = "lymph-chaos:";
/// Major of the HTB root on our IFB (`c4a0:`).
pub const IFB_MAJOR: u32 = 0xC4A0;
/// Leaf qdisc handles are `(LEAF_MAJOR_BASE + minor):`.
const LEAF_MAJOR_BASE: u32 = 0x1000;
/// Default IFB device name.
pub const DEFAULT_IFB: &str = "lchaos0";
/// "No limit" for HTB classes that only carry a netem leaf: 100 Gbit/s in bytes.
const UNLIMITED_RATE: u64 = 100_000_000_000 / 8;
/// Packets queued in a pfifo leaf of a rate-limit class.
const FIFO_LIMIT: u32 = 10_000;

/// Configuration of the network engine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetConfig {
    /// Pin the maps here (must be on bpffs; `/sys/fs/bpf` is mounted when needed). `None` = no pins.
    pub pin_dir: Option<PathBuf>,
    /// Records clsact qdiscs we created (so cleanup removes only those).
    pub state_file: PathBuf,
    /// Name of our IFB.
    pub ifb_name: String,
    /// Interfaces to attach to; `None` = every interface that is up (and loopback).
    pub interfaces: Option<Vec<String>>,
    /// Highest packet rate expected through one fault: sizes netem's queue so it never drops silently.
    pub max_packets_per_sec: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            pin_dir: Some(PathBuf::from(crate::paths::BPF_PIN_DIR)),
            state_file: PathBuf::from(crate::paths::NET_STATE_FILE),
            ifb_name: DEFAULT_IFB.into(),
            interfaces: None,
            max_packets_per_sec: 1_000_000,
        }
    }
}

pub use chaos_api::{
    fault::{Direction, JitterDistribution, Protocol},
    reply::{KernelCapabilities, LatencyBackend},
};

/// A port of the target and which of its packets to match.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortMatch {
    /// The port.
    pub port: u16,
    /// Protocol(s).
    pub protocol: Protocol,
    /// Direction.
    pub direction: Direction,
    /// The target's address (a socket bound to one address); `None` = any address of this host. Either way,
    /// packets the host forwards to other machines never match.
    #[serde(default)]
    pub addr: Option<IpAddr>,
}

/// An address as the classifier keys it: IPv6, or IPv4 as `::ffff:a.b.c.d`.
pub fn key_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl PortMatch {
    /// Packets of `port` on any address of this host.
    pub fn new(port: u16, protocol: Protocol, direction: Direction) -> PortMatch {
        PortMatch { port, protocol, direction, addr: None }
    }

    /// The map keys this match needs.
    pub fn keys(&self) -> Vec<RuleKey> {
        let protos: &[u8] = match self.protocol {
            Protocol::Tcp => &[proto::TCP],
            Protocol::Udp => &[proto::UDP],
            Protocol::Both => &[proto::TCP, proto::UDP],
        };
        let scopes: &[(u8, u8)] = match self.direction {
            Direction::To => &[(HOOK_LOCAL, SIDE_DST), (HOOK_INGRESS, SIDE_DST)],
            Direction::From => &[(HOOK_LOCAL, SIDE_SRC), (HOOK_EGRESS, SIDE_SRC)],
            Direction::Both => {
                &[(HOOK_LOCAL, SIDE_DST), (HOOK_INGRESS, SIDE_DST), (HOOK_LOCAL, SIDE_SRC), (HOOK_EGRESS, SIDE_SRC)]
            }
        };
        protos
            .iter()
            .flat_map(|&p| {
                scopes.iter().map(move |&(hook, side)| RuleKey {
                    addr: self.addr.map_or(ANY_LOCAL_ADDR, key_addr),
                    port: self.port,
                    proto: p,
                    scope: scope::encode(hook, side),
                })
            })
            .collect()
    }
}

/// Who sends the packets of a peer fault.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum PeerSender {
    /// A process of this host (its tgid): packets of the sockets it connected, over loopback or out of any
    /// interface.
    Process(u32),
    /// Senders whose address is in `addr/len` (other hosts; this host's own addresses over loopback).
    Prefix {
        /// The network (bits past `len` are ignored).
        addr: IpAddr,
        /// Prefix length (0–32 for IPv4, 0–128 for IPv6).
        len: u8,
    },
}

/// The packets `sender` sends to a receiver: `port` on `addr` (`None` = any address of this host, or of the
/// sender's choice for process senders).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerMatch {
    /// Who sends.
    pub sender: PeerSender,
    /// The receiver's address; `None` = any address of this host.
    pub addr: Option<IpAddr>,
    /// The receiver's port.
    pub port: u16,
    /// Protocol(s).
    pub protocol: Protocol,
}

/// A peer rule's key, as the engine records it (see `chaos_common::peer`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum PeerRuleKey {
    /// Sender by address prefix.
    Addr {
        /// LPM prefix length over the whole key.
        prefix_len: u32,
        /// IP protocol.
        proto: u8,
        /// Scope (hook, destination side).
        scope: u8,
        /// Receiver port.
        port: u16,
        /// Receiver address or any-local.
        daddr: [u8; 16],
        /// Sender network.
        saddr: [u8; 16],
    },
    /// Sender by process.
    Proc {
        /// Receiver address or any-local.
        daddr: [u8; 16],
        /// Receiver port.
        port: u16,
        /// IP protocol.
        proto: u8,
        /// Scope (hook, destination side).
        scope: u8,
        /// Sending process.
        tgid: u32,
    },
}

impl PeerRuleKey {
    fn port(&self) -> u16 {
        match self {
            PeerRuleKey::Addr { port, .. } | PeerRuleKey::Proc { port, .. } => *port,
        }
    }

    fn proto(&self) -> u8 {
        match self {
            PeerRuleKey::Addr { proto, .. } | PeerRuleKey::Proc { proto, .. } => *proto,
        }
    }

    fn addr_key(proto: u8, scope: u8, port: u16, daddr: [u8; 16], saddr: [u8; 16]) -> PeerAddrKey {
        PeerAddrKey { proto, scope, port_be: port.to_be(), daddr, saddr }
    }

    fn set(&self, classifier: &mut Classifier, rule: Rule) -> Result<(), aya::maps::MapError> {
        match *self {
            PeerRuleKey::Addr { prefix_len, proto, scope, port, daddr, saddr } => {
                classifier.set_peer_addr_rule(prefix_len, Self::addr_key(proto, scope, port, daddr, saddr), rule)
            }
            PeerRuleKey::Proc { daddr, port, proto, scope, tgid } => {
                classifier.set_peer_proc_rule(PeerProcKey { daddr, port, proto, scope, tgid }, rule)
            }
        }
    }

    fn get(&self, classifier: &Classifier) -> Option<Rule> {
        match *self {
            PeerRuleKey::Addr { prefix_len, proto, scope, port, daddr, saddr } => {
                classifier.peer_addr_rule(prefix_len, Self::addr_key(proto, scope, port, daddr, saddr))
            }
            PeerRuleKey::Proc { daddr, port, proto, scope, tgid } => {
                classifier.peer_proc_rule(&PeerProcKey { daddr, port, proto, scope, tgid })
            }
        }
    }

    fn remove(&self, classifier: &mut Classifier) -> Result<(), aya::maps::MapError> {
        match *self {
            PeerRuleKey::Addr { prefix_len, proto, scope, port, daddr, saddr } => {
                classifier.remove_peer_addr_rule(prefix_len, Self::addr_key(proto, scope, port, daddr, saddr))
            }
            PeerRuleKey::Proc { daddr, port, proto, scope, tgid } => {
                classifier.remove_peer_proc_rule(&PeerProcKey { daddr, port, proto, scope, tgid })
            }
        }
    }
}

/// `addr` with every bit past `len` cleared, as the classifier keys it.
fn masked(addr: [u8; 16], bits: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, byte) in addr.iter().enumerate() {
        let keep = bits.saturating_sub(i as u32 * 8).min(8);
        out[i] = if keep == 0 { 0 } else { byte & (0xffu8 << (8 - keep)) };
    }
    out
}

impl PeerMatch {
    /// The map keys this match needs.
    ///
    /// # Errors
    /// A prefix length beyond the address family's.
    pub fn keys(&self) -> Result<Vec<PeerRuleKey>, NetError> {
        let protos: &[u8] = match self.protocol {
            Protocol::Tcp => &[proto::TCP],
            Protocol::Udp => &[proto::UDP],
            Protocol::Both => &[proto::TCP, proto::UDP],
        };
        let daddr = self.addr.map_or(ANY_LOCAL_ADDR, key_addr);
        let mut keys = Vec::new();
        match self.sender {
            // A local sender's packets leave through `lo` (to this host) or another interface (to other hosts).
            PeerSender::Process(tgid) => {
                for &p in protos {
                    for hook in [HOOK_LOCAL, HOOK_EGRESS] {
                        keys.push(PeerRuleKey::Proc {
                            daddr,
                            port: self.port,
                            proto: p,
                            scope: scope::encode(hook, SIDE_DST),
                            tgid,
                        });
                    }
                }
            }
            // An address sender arrives on another interface (a remote host) or on `lo` (this host's address).
            PeerSender::Prefix { addr, len } => {
                let (family_bits, offset) = if addr.to_canonical().is_ipv4() { (32, 96) } else { (128, 0) };
                if u32::from(len) > family_bits {
                    return Err(NetError::Invalid(format!(
                        "prefix length /{len} is longer than an IPv{} address",
                        if family_bits == 32 { 4 } else { 6 }
                    )));
                }
                let bits = offset + u32::from(len);
                let saddr = masked(key_addr(addr.to_canonical()), bits);
                for &p in protos {
                    for hook in [HOOK_LOCAL, HOOK_INGRESS] {
                        keys.push(PeerRuleKey::Addr {
                            prefix_len: ADDR_KEY_FIXED_BITS + bits,
                            proto: p,
                            scope: scope::encode(hook, SIDE_DST),
                            port: self.port,
                            daddr,
                            saddr,
                        });
                    }
                }
            }
        }
        Ok(keys)
    }
}

/// What matching packets suffer. Percentages are 0–100.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Impairment {
    /// Change nothing, only count the port's packets (proof that traffic flows where a fault would act).
    #[serde(default)]
    pub observe: bool,
    /// Drop everything (blackhole).
    #[serde(default)]
    pub blackhole: bool,
    /// Random loss, done in the classifier (works without netem).
    #[serde(default)]
    pub loss_percent: f64,
    /// Added delay.
    #[serde(default, with = "duration_ms")]
    pub delay: Duration,
    /// Jitter (± around the delay).
    #[serde(default, with = "duration_ms")]
    pub jitter: Duration,
    /// Correlation of successive delays, %.
    #[serde(default)]
    pub delay_correlation: f64,
    /// Jitter distribution (needs a delay and a jitter).
    #[serde(default)]
    pub distribution: Option<JitterDistribution>,
    /// Duplicate packets, %.
    #[serde(default)]
    pub duplicate_percent: f64,
    /// Corrupt one bit of packets, %.
    #[serde(default)]
    pub corrupt_percent: f64,
    /// Send packets out of order (immediately instead of delayed), % (needs a delay).
    #[serde(default)]
    pub reorder_percent: f64,
    /// Correlation of reordering, %.
    #[serde(default)]
    pub reorder_correlation: f64,
    /// Rate limit in bytes per second.
    #[serde(default)]
    pub rate_bytes_per_sec: Option<u64>,
    /// netem PRNG seed (recorded so a run can be replayed; kernels ≥ 6.4 honour it).
    #[serde(default)]
    pub seed: Option<u64>,
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        Duration::try_from_secs_f64(ms / 1000.0).map_err(serde::de::Error::custom)
    }
}

impl Impairment {
    /// Whether a netem leaf is needed.
    pub fn needs_netem(&self) -> bool {
        !self.delay.is_zero()
            || !self.jitter.is_zero()
            || self.duplicate_percent > 0.0
            || self.corrupt_percent > 0.0
            || self.reorder_percent > 0.0
    }

    /// Whether packets go through the IFB.
    pub fn needs_shaping(&self) -> bool {
        !self.blackhole && (self.needs_netem() || self.rate_bytes_per_sec.is_some())
    }

    /// Checks ranges and combinations.
    ///
    /// # Errors
    /// [`NetError::Invalid`] with a sentence naming the bad parameter.
    pub fn validate(&self) -> Result<(), NetError> {
        let pct = |name: &str, v: f64| {
            if !(0.0..=100.0).contains(&v) || v.is_nan() {
                Err(NetError::Invalid(format!("{name} must be a percentage between 0 and 100, got {v}")))
            } else {
                Ok(())
            }
        };
        pct("loss", self.loss_percent)?;
        pct("delay correlation", self.delay_correlation)?;
        pct("duplicate", self.duplicate_percent)?;
        pct("corrupt", self.corrupt_percent)?;
        pct("reorder", self.reorder_percent)?;
        pct("reorder correlation", self.reorder_correlation)?;
        if self.delay > Duration::from_secs(60) || self.jitter > Duration::from_secs(60) {
            return Err(NetError::Invalid("delay and jitter are limited to 60 s".into()));
        }
        if self.reorder_percent > 0.0 && self.delay.is_zero() {
            return Err(NetError::Invalid("reorder needs a delay (reordered packets are the ones not delayed)".into()));
        }
        if self.distribution.is_some_and(|d| d != JitterDistribution::Uniform) && self.jitter.is_zero() {
            return Err(NetError::Invalid("a jitter distribution needs a jitter".into()));
        }
        if self.rate_bytes_per_sec == Some(0) {
            return Err(NetError::Invalid("rate must be above 0 (use blackhole to drop everything)".into()));
        }
        // A rate given with a delay sizes netem's queue (packets of 64 bytes at that rate, held for the delay). A
        // queue above the bound would be capped, and netem would drop what does not fit: the delay fault would
        // silently be a loss fault too. Checked here, before anything asks whether this kernel has netem at all.
        if let Some(rate) = self.rate_bytes_per_sec
            && self.needs_netem()
        {
            let needed = encode::netem_queue_needed((rate / 64).max(1), self.delay, self.jitter);
            if needed > u128::from(encode::NETEM_MAX_LIMIT) {
                return Err(NetError::Invalid(format!(
                    "rate {rate} bytes/s with a delay of {:.3} s (jitter {:.3} s) needs a netem queue of {needed} \
                     packets, above the bound of {} packets: lower the rate or the delay",
                    self.delay.as_secs_f64(),
                    self.jitter.as_secs_f64(),
                    encode::NETEM_MAX_LIMIT
                )));
            }
        }
        if self.observe && (self.blackhole || self.loss_percent > 0.0 || self.needs_shaping()) {
            return Err(NetError::Invalid(
                "observe counts packets only; it cannot be combined with other impairments".into(),
            ));
        }
        if !self.observe && !self.blackhole && self.loss_percent == 0.0 && !self.needs_shaping() {
            return Err(NetError::Invalid("the fault changes nothing: give a delay, loss, rate, blackhole …".into()));
        }
        Ok(())
    }
}

/// Errors of network faults.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The classifier could not be loaded.
    #[error(transparent)]
    Classifier(#[from] ClassifierError),
    /// A netlink operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The kernel has neither netem nor fq: no latency backend.
    #[error(
        "this kernel has neither sch_netem nor sch_fq: delay and jitter need one of them — modprobe sch_netem \
         (CONFIG_NET_SCH_NETEM; RHEL/Fedora ship it in kernel-modules-extra, Ubuntu in linux-modules-extra) or \
         modprobe sch_fq (CONFIG_NET_SCH_FQ, for the earliest-departure-time backend), then restart the agent; \
         blackhole, loss and rate faults work without them"
    )]
    NetemMissing,
    /// A netem-only feature on a kernel without netem (the EDT backend serves delay and jitter only).
    #[error(
        "{what} needs sch_netem, which this kernel lacks (modprobe sch_netem; RHEL/Fedora: kernel-modules-extra, \
         Ubuntu: linux-modules-extra); the earliest-departure-time backend (sch_fq) serves delay and jitter only"
    )]
    NeedsNetem {
        /// The feature.
        what: &'static str,
    },
    /// The kernel has no IFB or HTB.
    #[error(
        "this kernel lacks {what}, which shaping faults (delay, rate …) need; blackhole and loss faults work without it"
    )]
    ShapingUnavailable {
        /// ifb, sch_htb, act_mirred.
        what: &'static str,
    },
    /// Another fault already holds a port.
    #[error("port {port}/{proto} already has fault {fault} in that direction; revert it first")]
    Conflict {
        /// Port.
        port: u16,
        /// tcp/udp.
        proto: &'static str,
        /// The other fault's id.
        fault: String,
    },
    /// The rule map or class space is full.
    #[error("too many network faults at once ({0})")]
    Full(&'static str),
    /// A parameter is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A BPF map update failed.
    #[error("BPF map update failed: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// A network fault in the kernel.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NetHandle {
    /// Fault id.
    pub fault: String,
    /// Map keys it owns.
    pub keys: Vec<RuleKeyOf>,
    /// Counter slot.
    pub slot: u32,
    /// IFB class minor, for shaping faults.
    pub class_minor: Option<u32>,
    /// CLOCK_MONOTONIC expiry (ns).
    pub expires_at_ns: u64,
    /// Interfaces the classifier was attached to when applied.
    pub interfaces: Vec<String>,
    /// Peer rule keys it owns (peer faults).
    #[serde(default)]
    pub peer_keys: Vec<PeerRuleKey>,
    /// What delays the packets of a latency fault (`None`: no delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<LatencyBackend>,
}

/// A rule key in reports: port, protocol, scope, address (`::ffff:a.b.c.d` for IPv4, `::` = any of this host).
pub type RuleKeyOf = (u16, u8, u8, [u8; 16]);

impl NetHandle {
    fn rule_keys(&self) -> impl Iterator<Item = RuleKey> + '_ {
        self.keys.iter().map(|&(port, proto, scope, addr)| RuleKey { addr, port, proto, scope })
    }
}

/// Live counters of a fault.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FaultCounters {
    /// Packets matched.
    pub packets: u64,
    /// Bytes matched.
    pub bytes: u64,
    /// Packets dropped (blackhole, loss).
    pub drops: u64,
}

/// What [`NetworkEngine::cleanup`] removed.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CleanupReport {
    /// Filters removed (interface, hook, prio).
    pub filters: Vec<String>,
    /// clsact qdiscs removed.
    pub qdiscs: Vec<String>,
    /// IFB devices removed.
    pub links: Vec<String>,
    /// Pins removed.
    pub pins: usize,
}

impl CleanupReport {
    /// Whether nothing had to be removed.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty() && self.qdiscs.is_empty() && self.links.is_empty() && self.pins == 0
    }
}

#[derive(Default, Serialize, Deserialize)]
struct NetState {
    /// ifindexes where we created the clsact qdisc.
    clsact_created: BTreeSet<u32>,
}

struct Attached {
    name: String,
    ingress: bool,
    egress: bool,
}

struct Inner {
    classifier: Option<Classifier>,
    netlink: Netlink,
    attached: HashMap<u32, Attached>,
    ifb: Option<u32>,
    /// Why shaping is unavailable, once found out.
    shaping_error: Option<&'static str>,
    netem_missing: bool,
    /// What the kernel offers, probed at start.
    caps: KernelCapabilities,
    owners: HashMap<RuleKey, String>,
    peer_owners: HashMap<PeerRuleKey, String>,
    free_slots: Vec<u32>,
    free_classes: Vec<u32>,
    state: NetState,
}

/// The network fault engine (see the module docs).
pub struct NetworkEngine {
    config: NetConfig,
    inner: std::sync::Arc<Mutex<Inner>>,
}

fn clock_monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// CLOCK_MONOTONIC `ttl` from now, in ns (the clock `bpf_ktime_get_ns` reads).
pub fn expiry_after(ttl: Duration) -> u64 {
    clock_monotonic_ns().saturating_add(ttl.as_nanos().min(u128::from(u64::MAX)) as u64)
}

fn proto_name(p: u8) -> &'static str {
    if p == proto::UDP { "udp" } else { "tcp" }
}

impl NetworkEngine {
    /// Opens netlink and removes leftovers of earlier runs. The classifier is loaded right away when
    /// `load_now` (the agent does, to report a kernel that refuses it at start); otherwise on first use.
    ///
    /// # Errors
    /// Netlink failures; classifier errors when `load_now`.
    pub async fn start(config: NetConfig, load_now: bool) -> Result<(NetworkEngine, CleanupReport), NetError> {
        let netlink = Netlink::open()?;
        let engine = NetworkEngine {
            inner: std::sync::Arc::new(Mutex::new(Inner {
                classifier: None,
                netlink,
                attached: HashMap::new(),
                ifb: None,
                shaping_error: None,
                netem_missing: false,
                caps: KernelCapabilities::default(),
                owners: HashMap::new(),
                peer_owners: HashMap::new(),
                free_slots: Vec::new(),
                free_classes: (1..=MAX_CLASS_MINOR).rev().collect(),
                state: NetState::default(),
            })),
            config,
        };
        let report = engine.cleanup().await?;
        {
            let mut inner = engine.inner.lock().await;
            inner.caps = probe::probe(&inner.netlink).await;
            info!(caps = ?inner.caps, "kernel capabilities probed");
        }
        engine.follow_links()?;
        if load_now {
            let mut inner = engine.inner.lock().await;
            engine.ensure_classifier(&mut inner)?;
        }
        Ok((engine, report))
    }

    /// What the kernel offers network faults (probed at start).
    pub async fn capabilities(&self) -> KernelCapabilities {
        self.inner.lock().await.caps.clone()
    }

    /// Whether the classifier is loaded.
    pub async fn loaded(&self) -> bool {
        self.inner.lock().await.classifier.is_some()
    }

    fn ensure_classifier<'a>(&self, inner: &'a mut Inner) -> Result<&'a mut Classifier, NetError> {
        if inner.classifier.is_none() {
            let classifier = Classifier::load(self.config.pin_dir.as_deref())?;
            info!(pins = ?classifier.pins(), slots = classifier.slots(), "BPF classifier loaded (chaos_ingress, chaos_egress, chaos_steer, chaos_ifb)");
            inner.free_slots = (0..classifier.slots()).rev().collect();
            inner.classifier = Some(classifier);
        }
        Ok(inner.classifier.as_mut().expect("just loaded"))
    }

    /// Applies a fault: `matches` get `imp` until `ttl` from now.
    ///
    /// # Errors
    /// Invalid parameters, conflicts with other faults, missing kernel features (nothing is left half-applied).
    pub async fn apply(
        &self,
        fault: &str,
        matches: &[PortMatch],
        imp: &Impairment,
        ttl: Duration,
    ) -> Result<NetHandle, NetError> {
        imp.validate()?;
        if matches.is_empty() {
            return Err(NetError::Invalid("a network fault needs at least one port".into()));
        }
        let keys: Vec<RuleKey> = {
            let mut set = BTreeSet::new();
            for m in matches {
                if m.port == 0 {
                    return Err(NetError::Invalid("port 0 is not a port a service listens on".into()));
                }
                set.extend(m.keys());
            }
            set.into_iter().collect()
        };
        self.install(fault, keys, Vec::new(), imp, ttl).await
    }

    /// Applies a peer fault: the packets of `matches` (each a sender and a receiver) get `imp` until `ttl` from
    /// now. Sockets the process senders connected before the socket-owner programs were attached are entered
    /// from `sock_diag` first.
    ///
    /// # Errors
    /// As [`NetworkEngine::apply`]; a process sender when this kernel cannot track socket owners.
    pub async fn apply_peer(
        &self,
        fault: &str,
        matches: &[PeerMatch],
        imp: &Impairment,
        ttl: Duration,
    ) -> Result<NetHandle, NetError> {
        imp.validate()?;
        if matches.is_empty() {
            return Err(NetError::Invalid("a peer fault needs at least one sender and receiver".into()));
        }
        let mut keys = BTreeSet::new();
        for m in matches {
            if m.port == 0 {
                return Err(NetError::Invalid("port 0 is not a port a service listens on".into()));
            }
            keys.extend(m.keys()?);
        }
        let tgids: BTreeSet<u32> = matches
            .iter()
            .filter_map(|m| match m.sender {
                PeerSender::Process(tgid) => Some(tgid),
                PeerSender::Prefix { .. } => None,
            })
            .collect();
        if !tgids.is_empty() {
            let mut inner = self.inner.lock().await;
            let classifier = self.ensure_classifier(&mut inner)?;
            if let Err(why) = classifier.sock_tracking() {
                return Err(NetError::Invalid(format!(
                    "peer faults on callers of this host need the socket-owner programs, which are not attached: {why}"
                )));
            }
            seed_sock_owners(classifier, &tgids);
        }
        self.install(fault, Vec::new(), keys.into_iter().collect(), imp, ttl).await
    }

    async fn install(
        &self,
        fault: &str,
        keys: Vec<RuleKey>,
        peer_keys: Vec<PeerRuleKey>,
        imp: &Impairment,
        ttl: Duration,
    ) -> Result<NetHandle, NetError> {
        let mut inner = self.inner.lock().await;
        for key in &keys {
            if let Some(owner) = inner.owners.get(key).filter(|o| o.as_str() != fault) {
                return Err(NetError::Conflict { port: key.port, proto: proto_name(key.proto), fault: owner.clone() });
            }
        }
        for key in &peer_keys {
            if let Some(owner) = inner.peer_owners.get(key).filter(|o| o.as_str() != fault) {
                return Err(NetError::Conflict {
                    port: key.port(),
                    proto: proto_name(key.proto()),
                    fault: owner.clone(),
                });
            }
        }
        self.ensure_classifier(&mut inner)?;
        let interfaces = self.attach_all(&mut inner).await?;
        let (class_minor, backend) = if imp.needs_shaping() {
            let (minor, backend) = self.add_class(&mut inner, imp).await?;
            (Some(minor), backend)
        } else {
            (None, None)
        };
        let Some(slot) = inner.free_slots.pop() else {
            if let Some(minor) = class_minor {
                self.del_class(&mut inner, minor).await;
            }
            return Err(NetError::Full("counter slots"));
        };
        let expires_at_ns = expiry_after(ttl);
        let rule = Rule {
            expires_at_ns,
            action: if imp.blackhole {
                action::DROP
            } else if class_minor.is_some() {
                action::SHAPE
            } else {
                action::COUNT
            },
            class_minor: class_minor.unwrap_or(0),
            loss_threshold: loss_threshold(imp.loss_percent),
            slot,
        };
        let classifier = inner.classifier.as_mut().expect("loaded above");
        let mut result = classifier.reset_counters(slot).map_err(NetError::from);
        let mut inserted = Vec::new();
        let mut inserted_peer = Vec::new();
        if result.is_ok() {
            for key in &keys {
                match classifier.set_rule(*key, rule) {
                    Ok(()) => inserted.push(*key),
                    Err(err) => {
                        result = Err(map_full(err));
                        break;
                    }
                }
            }
        }
        if result.is_ok() {
            for key in &peer_keys {
                match key.set(classifier, rule) {
                    Ok(()) => inserted_peer.push(*key),
                    Err(err) => {
                        result = Err(map_full(err));
                        break;
                    }
                }
            }
        }
        if let Err(err) = result {
            for key in &inserted {
                let _ = classifier.remove_rule(key);
            }
            for key in &inserted_peer {
                let _ = key.remove(classifier);
            }
            inner.free_slots.push(slot);
            if let Some(minor) = class_minor {
                self.del_class(&mut inner, minor).await;
            }
            return Err(err);
        }
        for key in &keys {
            inner.owners.insert(*key, fault.to_owned());
        }
        for key in &peer_keys {
            inner.peer_owners.insert(*key, fault.to_owned());
        }
        debug!(fault, ?keys, ?peer_keys, ?rule, "network rule installed");
        Ok(NetHandle {
            fault: fault.to_owned(),
            keys: keys.iter().map(|k| (k.port, k.proto, k.scope, k.addr)).collect(),
            slot,
            class_minor,
            expires_at_ns,
            interfaces,
            peer_keys,
            backend,
        })
    }

    /// Moves a fault's expiry to `ttl` from now.
    ///
    /// # Errors
    /// Map update failures.
    pub async fn extend(&self, handle: &mut NetHandle, ttl: Duration) -> Result<(), NetError> {
        let mut inner = self.inner.lock().await;
        let Some(classifier) = inner.classifier.as_mut() else { return Ok(()) };
        let expires_at_ns = expiry_after(ttl);
        let rules: BTreeMap<RuleKey, Rule> = classifier.rules().into_iter().collect();
        for key in handle.rule_keys() {
            if let Some(rule) = rules.get(&key) {
                classifier.set_rule(key, Rule { expires_at_ns, ..*rule })?;
            }
        }
        for key in &handle.peer_keys {
            if let Some(rule) = key.get(classifier) {
                key.set(classifier, Rule { expires_at_ns, ..rule })?;
            }
        }
        handle.expires_at_ns = expires_at_ns;
        Ok(())
    }

    /// Removes a fault from the kernel (idempotent).
    ///
    /// # Errors
    /// Map failures (class removal failures are logged: the class is unreachable once its rules are gone).
    pub async fn revert(&self, handle: &NetHandle) -> Result<(), NetError> {
        let mut inner = self.inner.lock().await;
        let mut owned = false;
        for key in handle.rule_keys() {
            if inner.owners.get(&key).is_some_and(|o| o == &handle.fault) {
                inner.owners.remove(&key);
                owned = true;
            }
            if let Some(classifier) = inner.classifier.as_mut() {
                classifier.remove_rule(&key)?;
            }
        }
        for key in &handle.peer_keys {
            if inner.peer_owners.get(key).is_some_and(|o| o == &handle.fault) {
                inner.peer_owners.remove(key);
                owned = true;
            }
            if let Some(classifier) = inner.classifier.as_mut() {
                key.remove(classifier)?;
            }
        }
        if owned {
            inner.free_slots.push(handle.slot);
            if let Some(minor) = handle.class_minor {
                self.del_class(&mut inner, minor).await;
            }
        }
        Ok(())
    }

    /// Live counters of a fault.
    pub async fn counters(&self, handle: &NetHandle) -> FaultCounters {
        let inner = self.inner.lock().await;
        let c: Counters = inner.classifier.as_ref().map(|c| c.counters(handle.slot)).unwrap_or_default();
        FaultCounters { packets: c.packets, bytes: c.bytes, drops: c.drops }
    }

    /// Number of rules in the kernel map.
    pub async fn rule_count(&self) -> usize {
        self.inner.lock().await.classifier.as_ref().map_or(0, |c| c.rules().len())
    }

    /// Number of peer rules in the kernel maps.
    pub async fn peer_rule_count(&self) -> usize {
        self.inner.lock().await.classifier.as_ref().map_or(0, Classifier::peer_rule_count)
    }

    /// Where the socket-owner programs are attached (the cgroup v2 root), or why peer faults on callers of this
    /// host are unavailable.
    pub async fn sock_tracking(&self) -> Result<PathBuf, String> {
        let mut inner = self.inner.lock().await;
        let classifier = self.ensure_classifier(&mut inner).map_err(|e| e.to_string())?;
        classifier.sock_tracking().map(Path::to_path_buf)
    }

    /// The process the classifier would attribute a socket to (by its cookie), for diagnostics and tests.
    pub async fn sock_owner(&self, cookie: u64) -> Option<u32> {
        self.inner.lock().await.classifier.as_ref().and_then(|c| c.sock_owner(cookie))
    }

    /// Interfaces the classifier is attached to.
    pub async fn attached(&self) -> Vec<String> {
        let inner = self.inner.lock().await;
        let mut names: Vec<String> = inner.attached.values().map(|a| a.name.clone()).collect();
        names.sort();
        names
    }

    /// Follows the interfaces and addresses of this host: attaches to every selected interface not attached yet,
    /// forgets interfaces that are gone (their map entries with them) and refreshes the local addresses; returns
    /// the names of all attached interfaces.
    async fn attach_all(&self, inner: &mut Inner) -> Result<Vec<String>, NetError> {
        let links = inner.netlink.links().await?;
        let gone: Vec<u32> =
            inner.attached.keys().copied().filter(|index| !links.iter().any(|l| l.index == *index)).collect();
        if let Some(classifier) = inner.classifier.as_mut() {
            // Also entries of interfaces we never saw attached (a failure half-way through `attach`).
            for index in classifier.ifaces() {
                if !links.iter().any(|l| l.index == index) {
                    classifier.remove_iface(index);
                }
            }
        }
        for index in &gone {
            inner.attached.remove(index);
        }
        let before = inner.state.clsact_created.len();
        inner.state.clsact_created.retain(|index| links.iter().any(|l| l.index == *index));
        if inner.state.clsact_created.len() != before {
            self.save_state(inner);
        }
        let addrs: BTreeSet<[u8; 16]> = inner.netlink.addresses().await?.into_iter().map(key_addr).collect();
        self.ensure_classifier(inner)?.set_local_addrs(&addrs)?;
        let ifb_ok = self.ensure_ifb(inner).await;
        for link in links.iter().filter(|l| self.selected(l)) {
            if inner.attached.contains_key(&link.index) {
                continue;
            }
            if let Err(err) = self.attach(inner, link, ifb_ok).await {
                if let Some(classifier) = inner.classifier.as_mut() {
                    classifier.remove_iface(link.index);
                }
                // A link deleted while we attached is not worth a warning.
                if inner.netlink.links().await.is_ok_and(|now| now.iter().any(|l| l.index == link.index)) {
                    warn!(iface = %link.name, %err, "could not attach the classifier");
                    if link.loopback {
                        return Err(err);
                    }
                }
            }
        }
        Ok(self.attached_names(inner))
    }

    /// Re-reads links and addresses once a fault has attached the classifier: attaches to new interfaces, forgets
    /// deleted ones (and their map entries), refreshes this host's addresses.
    ///
    /// # Errors
    /// Netlink or map failures.
    pub async fn sync_links(&self) -> Result<(), NetError> {
        let mut inner = self.inner.lock().await;
        if inner.classifier.is_none() || inner.attached.is_empty() {
            return Ok(());
        }
        self.attach_all(&mut inner).await.map(|_| ())
    }

    /// Entries of the classifier's interface map (ifindexes).
    pub async fn iface_entries(&self) -> Vec<u32> {
        let inner = self.inner.lock().await;
        let mut v = inner.classifier.as_ref().map(|c| c.ifaces()).unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Starts following links and addresses as they appear and disappear (a netlink subscription; the task
    /// ends when the engine is dropped).
    ///
    /// # Errors
    /// When the netlink subscription cannot be made.
    pub fn follow_links(&self) -> Result<(), NetError> {
        use futures::StreamExt;
        let mut events = Netlink::watch()?;
        let inner = std::sync::Arc::downgrade(&self.inner);
        let config = self.config.clone();
        tokio::spawn(async move {
            while events.next().await.is_some() {
                // Coalesce a burst of notifications into one pass.
                while events.try_recv().is_ok() {}
                let Some(inner) = inner.upgrade() else { return };
                let engine = NetworkEngine { config: config.clone(), inner };
                if let Err(err) = engine.sync_links().await {
                    debug!(%err, "following links");
                }
            }
        });
        Ok(())
    }

    fn attached_names(&self, inner: &Inner) -> Vec<String> {
        let mut names: Vec<String> = inner.attached.values().map(|a| a.name.clone()).collect();
        names.sort();
        names
    }

    fn selected(&self, link: &Link) -> bool {
        if link.name == self.config.ifb_name {
            return false;
        }
        match &self.config.interfaces {
            Some(list) => list.iter().any(|n| n == &link.name),
            None => link.up || link.loopback,
        }
    }

    async fn attach(&self, inner: &mut Inner, link: &Link, ifb_ok: bool) -> Result<(), NetError> {
        let (ingress_hook, egress_hook) =
            if link.loopback { (HOOK_NONE, HOOK_LOCAL) } else { (HOOK_INGRESS, HOOK_EGRESS) };
        let iface = Iface { l3_offset: if link.l2 { 14 } else { 0 }, ingress_hook, egress_hook, _pad: [0; 2] };
        // clsact: reuse the operator's, or create ours (recorded before, so a crash in between is cleaned up).
        let has_clsact = inner.netlink.qdiscs(link.index).await?.iter().any(|q| q.kind == "clsact");
        if !has_clsact {
            inner.state.clsact_created.insert(link.index);
            self.save_state(inner);
            match inner.netlink.add_qdisc(link.index, CLSACT_HANDLE, TC_H_CLSACT, "clsact", None).await {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                Err(e) => {
                    inner.state.clsact_created.remove(&link.index);
                    self.save_state(inner);
                    return Err(e.into());
                }
            }
        }
        self.ensure_classifier(inner)?.set_iface(link.index, iface)?;
        let fds = inner.classifier.as_ref().expect("loaded").program_fds();
        let hooks = [
            (ingress_hook, CLSACT_INGRESS, fds.ingress, chaos_common::PROG_INGRESS),
            (egress_hook, CLSACT_EGRESS, fds.egress, chaos_common::PROG_EGRESS),
        ];
        let mut attached = Attached { name: link.name.clone(), ingress: false, egress: false };
        for (hook, parent, fd, prog) in hooks {
            if hook == HOOK_NONE {
                continue;
            }
            let name = format!("{FILTER_NAME_PREFIX}{prog}");
            let opts = encode::bpf_da_filter_options(fd as u32, &name, None);
            inner.netlink.add_filter(link.index, parent, PRIO_CLASSIFY, FILTER_HANDLE, "bpf", opts).await?;
            if ifb_ok {
                let ifb = inner.ifb.expect("ifb_ok");
                let name = format!("{FILTER_NAME_PREFIX}{}", chaos_common::PROG_STEER);
                let opts = encode::bpf_mirred_filter_options(fds.steer as u32, &name, ifb);
                if let Err(err) =
                    inner.netlink.add_filter(link.index, parent, PRIO_STEER, FILTER_HANDLE, "bpf", opts).await
                {
                    warn!(iface = %link.name, %err, "no mirred redirect (act_mirred missing?): shaping faults unavailable");
                    inner.shaping_error.get_or_insert("act_mirred");
                }
            }
            if parent == CLSACT_INGRESS {
                attached.ingress = true;
            } else {
                attached.egress = true;
            }
        }
        debug!(iface = %link.name, ingress = attached.ingress, egress = attached.egress, "classifier attached");
        inner.attached.insert(link.index, attached);
        Ok(())
    }

    /// Creates our IFB with its HTB root and class filter; `false` (and the reason remembered) when the kernel
    /// cannot.
    async fn ensure_ifb(&self, inner: &mut Inner) -> bool {
        if inner.ifb.is_some() {
            return true;
        }
        if inner.shaping_error.is_some() {
            return false;
        }
        let name = self.config.ifb_name.clone();
        let link = match inner.netlink.add_ifb(&name, FIFO_LIMIT).await {
            Ok(link) => link,
            Err(err) => {
                warn!(%err, "cannot create the IFB device: shaping faults unavailable");
                inner.shaping_error = Some("the ifb driver");
                return false;
            }
        };
        let root = encode::htb_qdisc_options(0, 10, None);
        if let Err(err) = inner.netlink.add_qdisc(link.index, IFB_MAJOR << 16, TC_H_ROOT, "htb", Some(root)).await {
            warn!(%err, "cannot add HTB on the IFB: shaping faults unavailable");
            inner.shaping_error = Some("sch_htb");
            let _ = inner.netlink.del_link(link.index).await;
            return false;
        }
        let fd = match self.ensure_classifier(inner) {
            Ok(c) => c.program_fds().ifb,
            Err(_) => return false,
        };
        let opts = encode::bpf_da_filter_options(
            fd as u32,
            &format!("{FILTER_NAME_PREFIX}{}", chaos_common::PROG_IFB),
            Some(IFB_MAJOR << 16),
        );
        if let Err(err) =
            inner.netlink.add_filter(link.index, IFB_MAJOR << 16, PRIO_CLASSIFY, FILTER_HANDLE, "bpf", opts).await
        {
            warn!(%err, "cannot add the class filter on the IFB: shaping faults unavailable");
            inner.shaping_error = Some("cls_bpf on the IFB");
            let _ = inner.netlink.del_link(link.index).await;
            return false;
        }
        info!(ifb = %name, "IFB for shaping faults ready");
        inner.ifb = Some(link.index);
        true
    }

    /// The backend for a delay fault on this kernel, or why there is none.
    fn latency_backend(inner: &Inner, imp: &Impairment) -> Result<LatencyBackend, NetError> {
        let mut caps = inner.caps.clone();
        if inner.netem_missing {
            caps.qdiscs.netem = false;
        }
        let backend = probe::choose_backend(&caps).ok_or(NetError::NetemMissing)?;
        if backend == LatencyBackend::Edt {
            let netem_only = [
                (imp.delay_correlation > 0.0, "delay correlation"),
                (imp.duplicate_percent > 0.0, "duplicate"),
                (imp.corrupt_percent > 0.0, "corrupt"),
                (imp.reorder_percent > 0.0, "reorder"),
            ];
            if let Some((_, what)) = netem_only.iter().find(|(asked, _)| *asked) {
                return Err(NetError::NeedsNetem { what });
            }
        }
        Ok(backend)
    }

    async fn add_class(&self, inner: &mut Inner, imp: &Impairment) -> Result<(u32, Option<LatencyBackend>), NetError> {
        let Some(ifb) = inner.ifb else {
            return Err(NetError::ShapingUnavailable { what: inner.shaping_error.unwrap_or("the ifb driver") });
        };
        if let Some(what) = inner.shaping_error {
            return Err(NetError::ShapingUnavailable { what });
        }
        let backend = if imp.needs_netem() { Some(Self::latency_backend(inner, imp)?) } else { None };
        let minor = inner.free_classes.pop().ok_or(NetError::Full("IFB classes"))?;
        let classid = (IFB_MAJOR << 16) | minor;
        let rate = imp.rate_bytes_per_sec.unwrap_or(UNLIMITED_RATE);
        let class = encode::htb_class_options(&encode::HtbClassParams {
            rate,
            ceil: rate,
            burst: None,
            cburst: None,
            quantum: None,
            prio: 0,
        });
        if let Err(err) = inner.netlink.put_class(ifb, classid, IFB_MAJOR << 16, "htb", class).await {
            inner.free_classes.push(minor);
            return Err(err.into());
        }
        let leaf_handle = (LEAF_MAJOR_BASE + minor) << 16;
        let pps = imp.rate_bytes_per_sec.map_or(self.config.max_packets_per_sec, |r| (r / 64).max(1));
        let leaf = match backend {
            Some(LatencyBackend::Netem) => (
                "netem",
                encode::netem_options(&netem_params(imp, encode::netem_limit_for(pps, imp.delay, imp.jitter))),
            ),
            Some(LatencyBackend::Edt) => {
                let (class, hold) = edt_class(imp);
                let params = encode::FqParams {
                    limit: encode::netem_limit_for(pps, imp.delay, hold.saturating_sub(imp.delay)),
                    horizon: hold + EDT_HORIZON_MARGIN,
                    horizon_drop: false,
                };
                if let Err(err) = self.ensure_classifier(inner)?.set_edt_class(minor, Some(class)) {
                    let _ = inner.netlink.del_class(ifb, classid).await;
                    inner.free_classes.push(minor);
                    return Err(err.into());
                }
                ("fq", encode::fq_options(&params))
            }
            None => ("pfifo", encode::fifo_options(FIFO_LIMIT)),
        };
        if let Err(err) = inner.netlink.add_qdisc(ifb, leaf_handle, classid, leaf.0, Some(leaf.1)).await {
            let _ = inner.netlink.del_class(ifb, classid).await;
            if let Some(classifier) = inner.classifier.as_mut() {
                let _ = classifier.set_edt_class(minor, None);
            }
            inner.free_classes.push(minor);
            if leaf.0 == "netem" && err.errno() == Some(libc::ENOENT) {
                // The probe saw netem, the kernel no longer has it: the next fault takes EDT if it can.
                inner.netem_missing = true;
                return Err(NetError::NeedsNetem { what: "this delay" });
            }
            return Err(err.into());
        }
        Ok((minor, backend))
    }

    async fn del_class(&self, inner: &mut Inner, minor: u32) {
        if let Some(ifb) = inner.ifb {
            // Deleting the class deletes its leaf qdisc too.
            if let Err(err) = inner.netlink.del_class(ifb, (IFB_MAJOR << 16) | minor).await {
                warn!(%err, "could not remove an IFB class");
            }
        }
        if let Some(classifier) = inner.classifier.as_mut()
            && let Err(err) = classifier.set_edt_class(minor, None)
        {
            warn!(%err, minor, "could not clear an EDT class entry");
        }
        inner.free_classes.push(minor);
    }

    fn save_state(&self, inner: &Inner) {
        if let Some(dir) = self.config.state_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let json = serde_json::to_vec(&inner.state).expect("plain data");
        if let Err(err) = std::fs::write(&self.config.state_file, json) {
            warn!(file = %self.config.state_file.display(), %err, "cannot record network state");
        }
    }

    /// Removes every kernel object this agent owns, including leftovers of earlier runs: our filters on every
    /// interface, clsact qdiscs we created (when nothing else uses them), our IFB, our pins.
    ///
    /// # Errors
    /// Netlink failures while listing (individual removals that fail are logged).
    pub async fn cleanup(&self) -> Result<CleanupReport, NetError> {
        let mut inner = self.inner.lock().await;
        let mut report = CleanupReport::default();
        let saved: NetState = std::fs::read(&self.config.state_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut created: BTreeSet<u32> = saved.clsact_created;
        created.extend(inner.state.clsact_created.iter().copied());
        let links = inner.netlink.links().await?;
        for link in &links {
            if (link.name == self.config.ifb_name || link.name == probe::PROBE_IFB)
                && link.kind.as_deref() == Some("ifb")
            {
                match inner.netlink.del_link(link.index).await {
                    Ok(()) => report.links.push(link.name.clone()),
                    Err(err) => warn!(%err, "could not remove our IFB"),
                }
                continue;
            }
            let mut remaining = 0;
            for (parent, hook) in [(CLSACT_INGRESS, "ingress"), (CLSACT_EGRESS, "egress")] {
                let filters = match inner.netlink.filters(link.index, parent).await {
                    Ok(f) => f,
                    Err(_) => continue, // no clsact here
                };
                for f in filters {
                    let ours = f.kind == "bpf"
                        && (f.prio() == PRIO_CLASSIFY || f.prio() == PRIO_STEER)
                        && f.bpf_name.as_deref().is_some_and(|n| n.starts_with(FILTER_NAME_PREFIX));
                    if !ours {
                        remaining += 1;
                        continue;
                    }
                    match inner.netlink.del_filter(link.index, parent, f.prio(), f.handle, "bpf").await {
                        Ok(()) => report.filters.push(format!("{} {hook} prio {}", link.name, f.prio())),
                        Err(err) if err.errno() == Some(libc::ENOENT) => {}
                        Err(err) => warn!(%err, "could not remove a filter of ours"),
                    }
                }
            }
            if created.contains(&link.index) && remaining == 0 {
                let has_clsact =
                    inner.netlink.qdiscs(link.index).await.unwrap_or_default().iter().any(|q| q.kind == "clsact");
                if has_clsact {
                    match inner.netlink.del_qdisc(link.index, CLSACT_HANDLE, TC_H_CLSACT).await {
                        Ok(()) => report.qdiscs.push(format!("{} clsact", link.name)),
                        Err(err) => warn!(%err, "could not remove a clsact qdisc we created"),
                    }
                }
            }
        }
        if let Some(dir) = &self.config.pin_dir {
            if let Some(classifier) = inner.classifier.as_mut() {
                report.pins += classifier.pins().len();
                classifier.unpin();
            }
            report.pins += classifier::remove_pins(dir).unwrap_or(0);
        }
        let _ = std::fs::remove_file(&self.config.state_file);
        inner.state = NetState::default();
        inner.attached.clear();
        inner.ifb = None;
        inner.shaping_error = None;
        inner.owners.clear();
        inner.peer_owners.clear();
        inner.free_slots = Vec::new();
        inner.free_classes = (1..=MAX_CLASS_MINOR).rev().collect();
        // Dropping the classifier unloads programs and maps now that no filter holds them.
        inner.classifier = None;
        if !report.is_empty() {
            info!(?report, "removed network objects of ours");
        }
        Ok(report)
    }
}

/// Enters the open TCP connections of `tgids` (this network namespace, from `sock_diag` and `/proc/<pid>/fd`)
/// into the socket-owner map.
fn seed_sock_owners(classifier: &mut Classifier, tgids: &BTreeSet<u32>) {
    let cookies = match crate::discovery::sockets::tcp_socket_cookies() {
        Ok(c) => c,
        Err(err) => {
            warn!(%err, "cannot list socket cookies: connections made before the agent started are not attributed");
            return;
        }
    };
    for &tgid in tgids {
        for inode in crate::discovery::sockets::socket_inodes_of(tgid as i32) {
            if let Some(&cookie) = cookies.get(&inode)
                && let Err(err) = classifier.set_sock_owner(cookie, tgid)
            {
                warn!(%err, tgid, "cannot record a socket owner");
            }
        }
    }
}

/// A full hash map answers E2BIG to an insert: say so in words.
fn map_full(err: aya::maps::MapError) -> NetError {
    if let aya::maps::MapError::SyscallError(e) = &err
        && e.io_error.raw_os_error() == Some(libc::E2BIG)
    {
        return NetError::Full("rule map");
    }
    NetError::Map(err)
}

/// Margin of an EDT class's fq horizon above its longest hold.
const EDT_HORIZON_MARGIN: Duration = Duration::from_secs(1);

/// The EDT map entry of a delay fault and the longest it holds a packet (delay + 4 σ with a table — netem's
/// tables reach ±4 σ —, delay + jitter with uniform jitter).
pub fn edt_class(imp: &Impairment) -> (EdtClass, Duration) {
    let dist = match imp.distribution {
        Some(JitterDistribution::Normal) => edt_dist::NORMAL,
        Some(JitterDistribution::Pareto) => edt_dist::PARETO,
        Some(JitterDistribution::Paretonormal) => edt_dist::PARETO_NORMAL,
        Some(JitterDistribution::Uniform) | None => edt_dist::UNIFORM,
    };
    let reach = if dist == edt_dist::UNIFORM { 1 } else { 4 };
    let class =
        EdtClass { delay_ns: imp.delay.as_nanos() as u64, jitter_ns: imp.jitter.as_nanos() as u64, dist, enabled: 1 };
    (class, imp.delay + imp.jitter * reach)
}

/// `loss_percent` as a threshold for `bpf_get_prandom_u32() < threshold`.
pub fn loss_threshold(percent: f64) -> u32 {
    if percent <= 0.0 {
        0
    } else if percent >= 100.0 {
        u32::MAX
    } else {
        (percent / 100.0 * f64::from(u32::MAX)).round() as u32
    }
}

fn netem_params(imp: &Impairment, limit: u32) -> encode::NetemParams {
    encode::NetemParams {
        delay: imp.delay,
        jitter: imp.jitter,
        delay_correlation: imp.delay_correlation,
        distribution: match imp.distribution {
            Some(JitterDistribution::Normal) => Some(encode::Distribution::Normal),
            Some(JitterDistribution::Pareto) => Some(encode::Distribution::Pareto),
            Some(JitterDistribution::Paretonormal) => Some(encode::Distribution::ParetoNormal),
            _ => None,
        },
        duplicate: imp.duplicate_percent,
        corrupt: imp.corrupt_percent,
        reorder: imp.reorder_percent,
        reorder_correlation: imp.reorder_correlation,
        limit,
        seed: imp.seed,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_matches_requests_locally_and_from_remote_callers() {
        let keys = PortMatch::new(4242, Protocol::Tcp, Direction::To).keys();
        assert_eq!(
            keys,
            vec![
                RuleKey {
                    addr: ANY_LOCAL_ADDR,
                    port: 4242,
                    proto: proto::TCP,
                    scope: scope::encode(HOOK_LOCAL, SIDE_DST)
                },
                RuleKey {
                    addr: ANY_LOCAL_ADDR,
                    port: 4242,
                    proto: proto::TCP,
                    scope: scope::encode(HOOK_INGRESS, SIDE_DST)
                },
            ]
        );
        let both = PortMatch::new(1, Protocol::Both, Direction::Both).keys();
        assert_eq!(both.len(), 8);
        let bound =
            PortMatch { addr: Some("10.0.0.5".parse().unwrap()), ..PortMatch::new(1, Protocol::Tcp, Direction::To) };
        assert!(bound.keys().iter().all(|k| k.addr == key_addr("::ffff:10.0.0.5".parse().unwrap())));
    }

    #[test]
    fn loss_thresholds_span_the_u32_range() {
        assert_eq!(loss_threshold(0.0), 0);
        assert_eq!(loss_threshold(100.0), u32::MAX);
        let t = loss_threshold(30.0);
        assert!((f64::from(t) / f64::from(u32::MAX) - 0.3).abs() < 1e-9);
    }

    #[test]
    fn validation_explains_bad_parameters() {
        let bad = Impairment { loss_percent: 130.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("loss"));
        let reorder = Impairment { reorder_percent: 10.0, ..Default::default() };
        assert!(reorder.validate().unwrap_err().to_string().contains("needs a delay"));
        let nothing = Impairment::default();
        assert!(nothing.validate().unwrap_err().to_string().contains("changes nothing"));
        let ok = Impairment { delay: Duration::from_millis(100), ..Default::default() };
        assert!(ok.validate().is_ok() && ok.needs_netem() && ok.needs_shaping());
        let rate = Impairment { rate_bytes_per_sec: Some(125_000), ..Default::default() };
        assert!(!rate.needs_netem() && rate.needs_shaping());
        // 1 mbit/s held 60 s fits netem's queue; 10 gbit/s held 1 s does not.
        let slow = Impairment { delay: Duration::from_secs(60), ..rate.clone() };
        assert!(slow.validate().is_ok());
        let huge = Impairment { rate_bytes_per_sec: Some(1_250_000_000), delay: Duration::from_secs(1), ..rate };
        assert!(huge.validate().unwrap_err().to_string().contains("netem queue"));
    }
}
