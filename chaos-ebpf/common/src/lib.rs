//! Types shared by the lymph-chaos tc classifier (kernel side, `chaos-ebpf`) and the agent (user side).
//!
//! Everything that both sides must agree on lives here exactly once: map names, program names, key and value
//! layouts (`#[repr(C)]` with explicit padding so the kernel and user views are byte-identical), and the meaning
//! of each field. The user side enables the `user` feature to get `aya::Pod` impls.
//!
//! # Layout of the data path
//!
//! ```text
//!   device clsact (ingress/egress)                    agent-owned IFB (root HTB)
//!   ┌──────────────────────────────┐  mirred redirect ┌───────────────────────────┐
//!   │ prio A: chaos_ingress/egress │ ───────────────▶ │ chaos_ifb: class = tc_idx │
//!   │   (direct action)            │  (prio B filter) │  (EDT class: skb->tstamp) │
//!   │   RULES: address + port      │                  │  HTB class ─▶ netem/fifo  │
//!   │                              │                  │            or fq (EDT)    │
//!   │                              │                  └───────────────────────────┘
//!   │   drop / loss / mark shape   │
//!   │ prio B: chaos_steer          │
//!   │   (classic, + act_mirred)    │
//!   └──────────────────────────────┘
//! ```
//!
//! `chaos_ingress`/`chaos_egress` look the packet's ports up in [`MAP_RULES`]. A rule whose
//! [`Rule::expires_at_ns`] has passed (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) is ignored by the program itself, so
//! faults lapse even when the agent is gone. Drops and random loss happen right there. For shaping the program
//! writes the rule's HTB class minor into `skb->tc_index`; the next filter, `chaos_steer`, matches such packets and
//! its `mirred egress redirect` action hands them to the IFB (mirred rather than `bpf_redirect`, because the IFB
//! driver only accepts redirected packets from `bpf_redirect` since Linux 6.4, and never locally generated egress
//! ones). On the IFB, `chaos_ifb` turns `tc_index` back into the HTB class and clears it.
//!
//! ## Latency without netem: earliest departure time (EDT)
//! Where the kernel has no `sch_netem` but has `sch_fq`, a latency fault's class gets an `fq` leaf instead of
//! netem, and the class is listed in [`MAP_EDT_CLASSES`]. `chaos_ifb` then stamps each of its packets with a
//! departure time (`skb->tstamp` = now + delay ± jitter, CLOCK_MONOTONIC — the clock `fq` compares with, Linux ≥
//! 4.20), kept non-decreasing per flow through [`MAP_EDT_FLOWS`], and `fq` holds the packet until then. The stamp
//! is written on the IFB (egress, after `act_mirred`), not at the clsact hook: `act_mirred` clears the timestamp
//! of packets it takes from an ingress hook (`skb_set_redirected`), and a plain write needs no helper newer than
//! the rest of the classifier (`bpf_skb_set_tstamp` is Linux ≥ 5.18).
#![no_std]

/// Hash map [`RuleKey`] → [`Rule`]: the fault rules.
pub const MAP_RULES: &str = "CHAOS_RULES";
/// Per-CPU array indexed by [`Rule::slot`] → [`Counters`].
pub const MAP_COUNTERS: &str = "CHAOS_COUNTERS";
/// Hash map ifindex (u32) → [`Iface`]: the interfaces the classifier is attached to and how to read them.
pub const MAP_IFACES: &str = "CHAOS_IFACES";
/// Hash map address (`[u8; 16]`, IPv4 as `::ffff:a.b.c.d`) → `u8` (1): the addresses of this host (the network
/// namespace the agent runs in). A rule keyed on [`ANY_LOCAL_ADDR`] matches only packets whose address on the
/// rule's side is in this map, so traffic the host forwards to other machines is never touched.
pub const MAP_LOCAL_ADDRS: &str = "CHAOS_LOCAL_ADDRS";

/// Array indexed by IFB class minor → [`EdtClass`]: the delay of classes served by the EDT backend (an `fq` leaf
/// instead of netem). See [`EdtClass`].
pub const MAP_EDT_CLASSES: &str = "CHAOS_EDT_CLASSES";
/// LRU hash `(class minor << 32) | skb hash` → departure time (ns) of the flow's latest packet: keeps the departure
/// times of one flow non-decreasing, so EDT jitter never reorders a flow.
pub const MAP_EDT_FLOWS: &str = "CHAOS_EDT_FLOWS";
/// Array of [`EDT_DIST_TABLES`] jitter tables ([`EdtDistTable`]), netem's `normal`, `pareto` and `paretonormal`.
pub const MAP_EDT_DIST: &str = "CHAOS_EDT_DIST";

/// Direct-action program for clsact ingress.
pub const PROG_INGRESS: &str = "chaos_ingress";
/// Direct-action program for clsact egress.
pub const PROG_EGRESS: &str = "chaos_egress";
/// Classic (non direct-action) program paired with an `act_mirred` redirect to the IFB.
pub const PROG_STEER: &str = "chaos_steer";
/// Direct-action program on the IFB's root HTB qdisc: picks the class from `tc_index`.
pub const PROG_IFB: &str = "chaos_ifb";

/// Capacity of [`MAP_COUNTERS`]: the number of network faults at once (one counter slot each).
pub const MAX_RULES: u32 = 16_384;
/// Capacity of [`MAP_RULES`]: a fault takes one key per protocol × side × hook it covers (2 for a TCP port
/// `to`, up to 8), so 16,384 faults on single ports fit with room to spare (≈ 3 MiB of kernel memory).
pub const MAX_RULE_KEYS: u32 = 65_536;
/// Largest IFB class minor a rule can name (11 bits travel in `tc_index` next to five flag bits).
pub const MAX_CLASS_MINOR: u32 = 0x07ff;
/// Capacity of [`MAP_IFACES`]. Entries are removed with their interface, so this bounds the interfaces that
/// exist at once, not the interfaces seen over the agent's life.
pub const MAX_IFACES: u32 = 4096;
/// Capacity of [`MAP_LOCAL_ADDRS`].
pub const MAX_LOCAL_ADDRS: u32 = 4096;
/// [`RuleKey::addr`] of a rule that applies to every address of this host (see [`MAP_LOCAL_ADDRS`]).
pub const ANY_LOCAL_ADDR: [u8; 16] = [0; 16];
/// Memory budget of the per-CPU counter map: the agent sizes [`MAP_COUNTERS`] to
/// `min(MAX_RULES, COUNTER_BUDGET_BYTES / (24 × possible CPUs))` slots at load time (16,384 slots up to 42
/// possible CPUs; 10,922 at 64 CPUs, 2,730 at 256 — 16 MiB in every case).
pub const COUNTER_BUDGET_BYTES: u64 = 16 << 20;

/// Entries of [`MAP_EDT_CLASSES`]: every class minor.
pub const EDT_CLASSES: u32 = MAX_CLASS_MINOR + 1;
/// Flows remembered per host in [`MAP_EDT_FLOWS`] (least recently used ones are forgotten first; a forgotten
/// flow only loses its ordering clamp for its next packet).
pub const EDT_FLOWS: u32 = 16_384;
/// Entries of a jitter table (netem's `NETEM_DIST_MAX` tables from iproute2 have 4096).
pub const EDT_DIST_LEN: usize = 4096;
/// Number of jitter tables in [`MAP_EDT_DIST`].
pub const EDT_DIST_TABLES: u32 = 3;
/// Table values are multiples of σ / 2^[`EDT_DIST_SHIFT`] (netem's `NETEM_DIST_SCALE` = 8192).
pub const EDT_DIST_SHIFT: u32 = 13;

/// Counter slots for a machine with `possible_cpus` CPUs (see [`COUNTER_BUDGET_BYTES`]).
pub const fn counter_slots(possible_cpus: u32) -> u32 {
    let cpus = if possible_cpus == 0 { 1 } else { possible_cpus as u64 };
    let fit = COUNTER_BUDGET_BYTES / (core::mem::size_of::<Counters>() as u64 * cpus);
    if fit > MAX_RULES as u64 {
        MAX_RULES
    } else if fit == 0 {
        1
    } else {
        fit as u32
    }
}

/// Where in the packet the rule's port is found and at which hook the rule applies.
///
/// Encoded in [`RuleKey::scope`] as `hook << 1 | side`.
pub mod scope {
    /// The port is the packet's destination port.
    pub const SIDE_DST: u8 = 0;
    /// The port is the packet's source port.
    pub const SIDE_SRC: u8 = 1;
    /// Egress of the loopback device: traffic between two processes of this host.
    pub const HOOK_LOCAL: u8 = 0;
    /// Ingress of a non-loopback device: traffic from other hosts.
    pub const HOOK_INGRESS: u8 = 1;
    /// Egress of a non-loopback device: traffic to other hosts.
    pub const HOOK_EGRESS: u8 = 2;
    /// Marks a hook as not classified (e.g. loopback ingress, which sees the same packets as loopback egress).
    pub const HOOK_NONE: u8 = 0xff;

    /// Builds a [`super::RuleKey::scope`] value.
    pub const fn encode(hook: u8, side: u8) -> u8 {
        (hook << 1) | side
    }
}

/// IP protocol numbers the classifier understands.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// Key of [`MAP_RULES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    /// The target's address on the rule's side of the packet (destination for [`scope::SIDE_DST`], source for
    /// [`scope::SIDE_SRC`]): IPv6, or IPv4 as `::ffff:a.b.c.d`; [`ANY_LOCAL_ADDR`] = any address of this host.
    pub addr: [u8; 16],
    /// Port in host byte order.
    pub port: u16,
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// [`scope::encode`]`(hook, side)`.
    pub scope: u8,
}

/// What a matching packet suffers.
pub mod action {
    /// Count only (observe a port without changing it).
    pub const COUNT: u32 = 0;
    /// Drop every packet (blackhole).
    pub const DROP: u32 = 1;
    /// Send to the IFB class [`super::Rule::class_minor`] (netem, rate limit).
    pub const SHAPE: u32 = 2;
}

/// Value of [`MAP_RULES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rule {
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`) after which the rule no longer matches.
    pub expires_at_ns: u64,
    /// One of [`action`].
    pub action: u32,
    /// HTB class minor on the IFB for [`action::SHAPE`] (1..=[`MAX_CLASS_MINOR`]).
    pub class_minor: u32,
    /// Random loss applied before the action: a packet is dropped when `bpf_get_prandom_u32() < loss_threshold`.
    /// 0 = no loss; `u32::MAX` ≈ 100 %.
    pub loss_threshold: u32,
    /// Index into [`MAP_COUNTERS`].
    pub slot: u32,
}

/// Value of [`MAP_COUNTERS`] (per CPU; the agent sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets that matched the rule while it was live.
    pub packets: u64,
    /// Bytes of those packets (`skb->len`).
    pub bytes: u64,
    /// Packets the rule dropped (blackhole or random loss).
    pub drops: u64,
}

/// Jitter distribution of an [`EdtClass`].
pub mod edt_dist {
    /// Uniform in `[delay − jitter, delay + jitter)` (netem's default without a table).
    pub const UNIFORM: u32 = 0;
    /// netem's `normal` table (index 0 of [`super::MAP_EDT_DIST`]).
    pub const NORMAL: u32 = 1;
    /// netem's `pareto` table (index 1).
    pub const PARETO: u32 = 2;
    /// netem's `paretonormal` table (index 2).
    pub const PARETO_NORMAL: u32 = 3;
}

/// Value of [`MAP_EDT_CLASSES`]: how long packets of one IFB class wait (the earliest-departure-time backend).
///
/// `chaos_ifb` gives each packet of an EDT class the departure time `now + d` (`skb->tstamp`, CLOCK_MONOTONIC),
/// where `d` is drawn like netem draws it (`delay` ± `jitter` from the class's distribution, below 0 taken as 0),
/// raised to the departure time of the flow's previous packet (see [`MAP_EDT_FLOWS`]); the class's `fq` leaf
/// holds every packet until then. `enabled == 0` (every class of netem or rate faults) leaves packets alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EdtClass {
    /// Mean delay in ns.
    pub delay_ns: u64,
    /// Jitter in ns (σ for tables, half the width for uniform).
    pub jitter_ns: u64,
    /// One of [`edt_dist`].
    pub dist: u32,
    /// 1 = the class is served by EDT.
    pub enabled: u32,
}

/// Value of [`MAP_EDT_DIST`]: netem's table format (values in units of σ / 8192).
pub type EdtDistTable = [i16; EDT_DIST_LEN];

/// Value of [`MAP_IFACES`]: how to classify packets on one interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Iface {
    /// Offset of the network header in the packet the tc hook sees (14 for Ethernet and loopback, 0 for L3
    /// devices such as tun or wireguard).
    pub l3_offset: u32,
    /// Hook id (see [`scope`]) used for packets at this interface's ingress, or [`scope::HOOK_NONE`].
    pub ingress_hook: u8,
    /// Hook id used at egress, or [`scope::HOOK_NONE`].
    pub egress_hook: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
}

/// Peer-scoped rules: faults on the traffic between two parties only ("Billing cannot reach Payments").
///
/// A peer rule matches a packet by its *receiver* (destination address and port, as [`RuleKey`] with
/// [`scope::SIDE_DST`]) and by its *sender*, which is either
/// - an address or prefix (remote senders): [`MAP_PEER_ADDR_RULES`], an LPM trie over [`PeerAddrKey`], or
/// - a process (senders on this host, e.g. every service talking over 127.0.0.1): [`MAP_PEER_PROC_RULES`] over
///   [`PeerProcKey`]. The sender's process is known from its socket: `chaos_connect4`/`chaos_connect6` and
///   `chaos_sendmsg4`/`chaos_sendmsg6` (`cgroup/connect4`/`connect6`/`sendmsg4`/`sendmsg6`, attached to the
///   cgroup v2 root through BPF links, always multi-attach, that die with the agent) record socket cookie → tgid
///   in [`MAP_SOCK_OWNERS`] for every connection made (and every unconnected UDP datagram sent) on this host, and
///   the classifier reads the packet's socket with `bpf_get_socket_cookie` (set on locally generated packets at
///   egress hooks, `lo` included). TCP connections made before the programs were attached are
///   entered by the agent from `sock_diag` (socket cookies) and `/proc/<pid>/fd`.
///
/// The classifier looks peer rules up before the port rules of [`MAP_RULES`], first with the exact receiver
/// address, then with [`ANY_LOCAL_ADDR`] when the receiver is this host. A peer rule's value is a [`Rule`]
/// (expiry, action, loss, counter slot) like any other.
pub mod peer {
    /// LPM trie [`super::PeerAddrKey`] → [`super::Rule`]: peer rules whose sender is an address or prefix.
    pub const MAP_PEER_ADDR_RULES: &str = "CHAOS_PEER_ADDR";
    /// Hash map [`super::PeerProcKey`] → [`super::Rule`]: peer rules whose sender is a process of this host.
    pub const MAP_PEER_PROC_RULES: &str = "CHAOS_PEER_PROC";
    /// LRU hash map socket cookie (u64) → tgid (u32) of the process that connected the socket.
    pub const MAP_SOCK_OWNERS: &str = "CHAOS_SOCK_OWNERS";
    /// `cgroup/connect4` program that fills [`MAP_SOCK_OWNERS`] (always allows the connect).
    pub const PROG_CONNECT4: &str = "chaos_connect4";
    /// `cgroup/connect6` program, the same for IPv6 sockets (IPv4-mapped destinations included).
    pub const PROG_CONNECT6: &str = "chaos_connect6";
    /// `cgroup/sendmsg4` program: the same for UDP datagrams sent without `connect`.
    pub const PROG_SENDMSG4: &str = "chaos_sendmsg4";
    /// `cgroup/sendmsg6` program: the same for IPv6 sockets.
    pub const PROG_SENDMSG6: &str = "chaos_sendmsg6";
    /// Every socket-owner program, in the order the agent attaches them.
    pub const SOCK_OWNER_PROGRAMS: [&str; 4] = [PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4, PROG_SENDMSG6];
    /// Capacity of [`MAP_PEER_ADDR_RULES`]: one entry per receiver × sender prefix × protocol × hook (≈ 1.6 MiB).
    pub const MAX_PEER_ADDR_RULES: u32 = 16_384;
    /// Capacity of [`MAP_PEER_PROC_RULES`]: one entry per receiver × sender process × protocol × hook.
    pub const MAX_PEER_PROC_RULES: u32 = 65_536;
    /// Capacity of [`MAP_SOCK_OWNERS`]; least recently used entries (closed connections, mostly) make room.
    /// 262,144 × (8 + 4 bytes + LRU overhead) ≈ 20 MiB at most.
    pub const MAX_SOCK_OWNERS: u32 = 262_144;
    /// Bits of [`super::PeerAddrKey`] before the sender address (protocol, scope, port, receiver address): the
    /// LPM prefix length of a rule is this plus the sender prefix (IPv4 /n is `96 + n` as `::ffff:a.b.c.d`).
    pub const ADDR_KEY_FIXED_BITS: u32 = 32 + 128;
}

/// Data of a [`peer::MAP_PEER_ADDR_RULES`] key. The LPM trie key is `{ prefix_len: u32, data: PeerAddrKey }`
/// (aya's `lpm_trie::Key`); `prefix_len` is [`peer::ADDR_KEY_FIXED_BITS`] + the sender prefix length, and lookups
/// use all 288 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddrKey {
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// [`scope::encode`]`(hook, `[`scope::SIDE_DST`]`)`.
    pub scope: u8,
    /// Receiver port, network byte order (as every field after `prefix_len`, compared byte by byte).
    pub port_be: u16,
    /// Receiver address (IPv4 as `::ffff:a.b.c.d`) or [`ANY_LOCAL_ADDR`].
    pub daddr: [u8; 16],
    /// Sender address (IPv4 as `::ffff:a.b.c.d`); bits past the prefix are zero.
    pub saddr: [u8; 16],
}

/// Key of [`peer::MAP_PEER_PROC_RULES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerProcKey {
    /// Receiver address (IPv4 as `::ffff:a.b.c.d`) or [`ANY_LOCAL_ADDR`].
    pub daddr: [u8; 16],
    /// Receiver port in host byte order.
    pub port: u16,
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// [`scope::encode`]`(hook, `[`scope::SIDE_DST`]`)`.
    pub scope: u8,
    /// The sending process (tgid, as `bpf_get_current_pid_tgid() >> 32` in the initial pid namespace).
    pub tgid: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all five are `#[repr(C)]`, `Copy`, contain only integers and have no implicit padding.
    unsafe impl aya::Pod for super::RuleKey {}
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::Iface {}
    // SAFETY: as above (`#[repr(C)]`, integers only, no implicit padding).
    unsafe impl aya::Pod for super::PeerAddrKey {}
    unsafe impl aya::Pod for super::PeerProcKey {}
    unsafe impl aya::Pod for super::EdtClass {}
}

/// Bits of `skb->tc_index` (16 bits). The kernel leaves `tc_index` alone along the whole path of a packet
/// through one host — bridges, macvlan, VLAN and bond devices, mirred and the IFB — which makes it the field that
/// carries both our shaping decision to the IFB and the fact that a packet was already judged:
/// - [`tc_index::SHAPE`] | [`tc_index::EGRESS_ORIGIN`]? | class minor: set by the classifier, read by the steer
///   program (redirect) and the IFB program (class);
/// - [`tc_index::RETURN`]: set by the IFB program on packets that came from an egress hook and go back into the
///   device's egress path;
/// - [`tc_index::JUDGED_IN`] / [`tc_index::JUDGED_OUT`]: a live rule judged the packet on its way in / out of
///   this host. An ingress hook that finds `JUDGED_IN` (a bridge after its port, a macvlan or VLAN after its lower
///   device) leaves the packet alone; judging at ingress clears `JUDGED_OUT`, and the other way round, so each
///   packet is judged once per direction per host. Packets no rule matched are not marked: after a tunnel's
///   decapsulation the same skb carries another packet, which the tunnel device's hook must judge.
pub mod tc_index {
    /// Packet to shape: redirect to the IFB.
    pub const SHAPE: u16 = 0x8000;
    /// Back from the IFB on the egress path.
    pub const RETURN: u16 = 0x4000;
    /// The shaped packet was taken at an egress hook.
    pub const EGRESS_ORIGIN: u16 = 0x2000;
    /// Judged on its way in.
    pub const JUDGED_IN: u16 = 0x1000;
    /// Judged on its way out.
    pub const JUDGED_OUT: u16 = 0x0800;
    /// Both judged bits.
    pub const JUDGED: u16 = JUDGED_IN | JUDGED_OUT;
    /// IFB class minor.
    pub const MINOR_MASK: u16 = 0x07ff;
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<RuleKey>(), 20);
        assert_eq!(size_of::<Rule>(), 24);
        assert_eq!(size_of::<Counters>(), 24);
        assert_eq!(size_of::<Iface>(), 8);
        assert_eq!(size_of::<PeerAddrKey>(), 36);
        assert_eq!(size_of::<PeerProcKey>(), 24);
        assert_eq!(size_of::<PeerAddrKey>() as u32 * 8, peer::ADDR_KEY_FIXED_BITS + 128);
        assert_eq!(size_of::<EdtClass>(), 24);
        assert_eq!(size_of::<EdtDistTable>(), 8192);
    }

    #[test]
    fn counter_map_memory_stays_within_its_budget() {
        for cpus in [1u32, 2, 42, 64, 256, 1024, 8192] {
            let bytes = u64::from(counter_slots(cpus)) * 24 * u64::from(cpus);
            assert!(bytes <= COUNTER_BUDGET_BYTES, "{cpus} CPUs: {bytes} bytes");
        }
        assert_eq!(counter_slots(2), MAX_RULES);
        assert_eq!(counter_slots(64), 10_922);
        assert_eq!(counter_slots(256), 2_730);
        assert_eq!(tc_index::MINOR_MASK as u32, MAX_CLASS_MINOR);
        assert_eq!(
            tc_index::SHAPE & tc_index::RETURN & tc_index::EGRESS_ORIGIN & tc_index::JUDGED & tc_index::MINOR_MASK,
            0
        );
    }

    #[test]
    fn scope_encoding_is_distinct_per_hook_and_side() {
        let mut seen = std::vec::Vec::new();
        for hook in [scope::HOOK_LOCAL, scope::HOOK_INGRESS, scope::HOOK_EGRESS] {
            for side in [scope::SIDE_DST, scope::SIDE_SRC] {
                let s = scope::encode(hook, side);
                assert!(!seen.contains(&s));
                seen.push(s);
            }
        }
    }
}
