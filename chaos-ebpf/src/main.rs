//! lymph-chaos tc classifier (kernel side).
//!
//! Four programs share the maps defined in `chaos-common` (see its module docs for the data path):
//!
//! - `chaos_ingress` / `chaos_egress` (clsact, direct action): skip packets a rule already judged on their way in
//!   (or out) of this host — a bridge after its port, a macvlan or VLAN after its lower device — then parse
//!   Ethernet/loopback or bare L3, up to two 802.1Q/802.1ad tags, IPv4 (non-first fragments skipped) or IPv6 (up
//!   to four extension headers, non-first fragments skipped), TCP/UDP addresses and ports; look up the
//!   destination (address, port) at loopback and ingress hooks, then the source (address, port) at loopback and
//!   egress hooks in `CHAOS_RULES`, each first with the exact
//!   address and then with "any address of this host" when the address is one of `CHAOS_LOCAL_ADDRS`; an expired
//!   rule is skipped and the next candidate tried; count (in wire segments); drop for blackhole or random loss;
//!   mark packets to shape in `tc_index`. Anything that is not ours returns `TC_ACT_UNSPEC` so the next filter
//!   (ours or the operator's) still runs.
//! - `chaos_steer` (clsact, classic mode with an `act_mirred` redirect to the agent's IFB): matches marked packets.
//! - `chaos_ifb` (on the IFB's root HTB, direct action): turns the mark into the HTB class and clears it; for a
//!   class served by the EDT backend (`CHAOS_EDT_CLASSES`) it also sets the packet's departure time, which the
//!   class's `fq` leaf honours.
//! - `chaos_connect4` / `chaos_connect6` / `chaos_sendmsg4` / `chaos_sendmsg6` (cgroup/connect4, connect6,
//!   sendmsg4, sendmsg6 on the cgroup v2 root): record which process connected each socket (or sent an
//!   unconnected UDP datagram on it), for peer rules whose sender is a local process (see `chaos_common::peer`).
//!
//! Peer rules (faults between two parties only) are looked up before the port rules, in `find_peer_rule` and
//! the maps of `chaos_common::peer`; everything about them is kept in the "Peer-scoped rules" section below.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key as LpmKey},
    programs::{SockAddrContext, TcContext},
};
use chaos_common::{
    ANY_LOCAL_ADDR, Counters, EDT_CLASSES, EDT_DIST_LEN, EDT_DIST_SHIFT, EDT_DIST_TABLES, EDT_FLOWS, EdtClass,
    EdtDistTable, Iface, MAX_IFACES, MAX_LOCAL_ADDRS, MAX_RULE_KEYS, MAX_RULES, PeerAddrKey, PeerProcKey, Rule,
    RuleKey, action, edt_dist,
    peer::{ADDR_KEY_FIXED_BITS, MAX_PEER_ADDR_RULES, MAX_PEER_PROC_RULES, MAX_SOCK_OWNERS},
    proto,
    scope::{self, HOOK_EGRESS, HOOK_INGRESS, HOOK_LOCAL, HOOK_NONE},
    tc_index::{EGRESS_ORIGIN, JUDGED, JUDGED_IN, JUDGED_OUT, MINOR_MASK, RETURN as RETURN_MARK, SHAPE as SHAPE_MARK},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const MAX_VLAN_TAGS: usize = 2;
const IPV6_HDR_LEN: usize = 40;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
const IPV6_MAX_EXT_HEADERS: usize = 4;

#[map(name = "CHAOS_RULES")]
static RULES: HashMap<RuleKey, Rule> = HashMap::with_max_entries(MAX_RULE_KEYS, 0);

/// Sized at load time by the agent (see `chaos_common::counter_slots`).
#[map(name = "CHAOS_COUNTERS")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_RULES, 0);

#[map(name = "CHAOS_IFACES")]
static IFACES: HashMap<u32, Iface> = HashMap::with_max_entries(MAX_IFACES, 0);

#[map(name = "CHAOS_LOCAL_ADDRS")]
static LOCAL_ADDRS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

#[map(name = "CHAOS_EDT_CLASSES")]
static EDT_CLASS: Array<EdtClass> = Array::with_max_entries(EDT_CLASSES, 0);

#[map(name = "CHAOS_EDT_FLOWS")]
static EDT_FLOW: LruHashMap<u64, u64> = LruHashMap::with_max_entries(EDT_FLOWS, 0);

#[map(name = "CHAOS_EDT_DIST")]
static EDT_DIST: Array<EdtDistTable> = Array::with_max_entries(EDT_DIST_TABLES, 0);

#[classifier]
pub fn chaos_ingress(ctx: TcContext) -> i32 {
    classify(&ctx, true)
}

#[classifier]
pub fn chaos_egress(ctx: TcContext) -> i32 {
    classify(&ctx, false)
}

/// Classic-mode classifier: a non-zero return means "match" and runs the filter's mirred action.
#[classifier]
pub fn chaos_steer(ctx: TcContext) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel handed us.
    let tc_index = unsafe { (*ctx.skb.skb).tc_index } as u16;
    if tc_index & RETURN_MARK != 0 {
        // Back from the IFB: match so mirred's action runs and consumes the IFB's skip flag (no redirect). The
        // judged bits stay: the devices below this one must not judge the packet again.
        // SAFETY: `tc_index` is writable for tc programs.
        unsafe { (*ctx.skb.skb).tc_index = u32::from(tc_index & JUDGED) };
        -1
    } else if tc_index & SHAPE_MARK != 0 {
        -1 // match: redirect to the IFB, keep the filter's own classid
    } else {
        0 // no match: the next filter runs
    }
}

/// Direct-action classifier on the IFB's HTB root: `tc_classid` takes the minor (the filter carries the major).
#[classifier]
pub fn chaos_ifb(ctx: TcContext) -> i32 {
    // SAFETY: `skb` is the context pointer; `tc_index` and `tc_classid` are writable for tc programs.
    unsafe {
        let skb = ctx.skb.skb;
        let tc_index = (*skb).tc_index as u16;
        if tc_index & SHAPE_MARK != 0 {
            let minor = u32::from(tc_index & MINOR_MASK);
            if let Some(departure) = edt_departure(skb, minor) {
                (*skb).tstamp = departure;
            }
            (*skb).tc_classid = minor;
            let back = if tc_index & EGRESS_ORIGIN != 0 { RETURN_MARK } else { 0 };
            (*skb).tc_index = u32::from(back | (tc_index & JUDGED));
        }
    }
    TC_ACT_OK
}

/// Departure time (CLOCK_MONOTONIC ns) for a packet of IFB class `minor` when the class is served by the EDT
/// backend (`chaos_common::EdtClass`), else `None`: now + a delay drawn as netem draws it, raised to the departure
/// of the flow's previous packet so that `fq` (which sorts a flow's packets by departure time) never reorders it.
#[inline(always)]
fn edt_departure(skb: *mut aya_ebpf::bindings::__sk_buff, minor: u32) -> Option<u64> {
    let class = EDT_CLASS.get(minor)?;
    if class.enabled == 0 {
        return None;
    }
    // SAFETY: helpers without pointer arguments, and `skb` is the context pointer.
    let (now, hash) = unsafe { (bpf_ktime_get_ns(), bpf_get_hash_recalc(skb)) };
    let mut departure = now.wrapping_add(edt_delay(class));
    let key = (u64::from(minor) << 32) | u64::from(hash);
    // SAFETY: the value is copied out at once.
    if let Some(previous) = unsafe { EDT_FLOW.get(key) }
        && *previous > departure
    {
        departure = *previous;
    }
    let _ = EDT_FLOW.insert(key, departure, 0);
    Some(departure)
}

/// One delay (ns) of an EDT class: `delay ± jitter`, uniform or from netem's table, never below zero.
#[inline(always)]
fn edt_delay(class: &EdtClass) -> u64 {
    let (mu, sigma) = (class.delay_ns, class.jitter_ns);
    if sigma == 0 {
        return mu;
    }
    // SAFETY: helpers without arguments.
    let rnd = unsafe { (u64::from(bpf_get_prandom_u32()) << 32) | u64::from(bpf_get_prandom_u32()) };
    // No arithmetic here may panic (a panic path is code the verifier refuses): wrapping operations, a checked
    // remainder and a checked index. The agent bounds delay and jitter to 60 s (6 × 10^10 ns), far from overflow.
    if class.dist == edt_dist::UNIFORM {
        // netem: `(rnd % (2σ)) + μ − σ`.
        let offset = rnd.checked_rem(sigma.wrapping_mul(2)).unwrap_or(0);
        return mu.wrapping_add(offset).saturating_sub(sigma);
    }
    let Some(table) = EDT_DIST.get(class.dist.wrapping_sub(1)) else { return mu };
    let t = table.get((rnd as usize) & (EDT_DIST_LEN - 1)).copied().unwrap_or(0);
    // netem: μ + σ·t / 8192, in unsigned arithmetic (BPF before ISA v4 has no signed division).
    let step = sigma.wrapping_mul(u64::from(t.unsigned_abs())) >> EDT_DIST_SHIFT;
    if t < 0 { mu.saturating_sub(step) } else { mu.wrapping_add(step) }
}

#[inline(always)]
fn classify(ctx: &TcContext, at_ingress: bool) -> i32 {
    match try_classify(ctx, at_ingress) {
        Some(verdict) => verdict,
        None => TC_ACT_UNSPEC,
    }
}

/// What the parser found: IP protocol, addresses (IPv4 as `::ffff:a.b.c.d`) and ports in host byte order.
struct Flow {
    proto: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
}

/// Returns `None` for packets that are not ours (already judged, parse failure, no live rule).
#[inline(always)]
fn try_classify(ctx: &TcContext, at_ingress: bool) -> Option<i32> {
    // SAFETY: reading plain fields of the context.
    let (ifindex, tc_index) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).tc_index as u16) };
    if tc_index & RETURN_MARK != 0 {
        return None; // already shaped on its way out; `chaos_steer` finishes the return trip
    }
    let (judged, other) = if at_ingress { (JUDGED_IN, JUDGED_OUT) } else { (JUDGED_OUT, JUDGED_IN) };
    if tc_index & judged != 0 {
        return None; // judged by a device below (ingress) or above (egress) this one
    }
    // SAFETY: the value is only read, and copied out immediately.
    let iface = *unsafe { IFACES.get(ifindex) }?;
    let hook = if at_ingress { iface.ingress_hook } else { iface.egress_hook };
    if hook == HOOK_NONE {
        return None;
    }
    let flow = parse(ctx, iface.l3_offset as usize)?;
    // Rules for packets *to* a port live at loopback and ingress hooks, rules for packets *from* a port at
    // loopback and egress hooks (see `PortMatch::keys` in the agent): look up only the sides this hook can have.
    // Peer rules (traffic between two parties) first: they are narrower than a port rule.
    // (Written out rather than with `or_else` closures: a closure becomes a BPF subprogram whose stack frame adds
    // to the caller's, and the combined depth must stay within the verifier's 512 bytes on every kernel.)
    let mut found = find_peer_rule(ctx, &flow, hook);
    if found.is_none() && hook != HOOK_EGRESS {
        found = find_rule(&flow, hook, scope::SIDE_DST);
    }
    if found.is_none() && hook != HOOK_INGRESS {
        found = find_rule(&flow, hook, scope::SIDE_SRC);
    }
    let rule = found?;
    // A live rule matched: the packet is judged in this direction, and the devices it crosses next on the same
    // way leave it alone. (A packet no rule matched is not marked: a device above may see a different packet in
    // the same skb — the inner packet of a tunnel after decapsulation — and must judge that one.)
    let mut tc_index = (tc_index & !other) | judged;
    // SAFETY: `tc_index` is writable for tc programs.
    unsafe { (*ctx.skb.skb).tc_index = u32::from(tc_index) };

    // A GSO/GRO super-packet stands for `gso_segs` wire segments: count those.
    // SAFETY: reading a plain field of the context.
    let segs = u64::from(unsafe { (*ctx.skb.skb).gso_segs }.max(1));
    let counters = COUNTERS.get_ptr_mut(rule.slot);
    if let Some(c) = counters {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += segs;
            (*c).bytes += u64::from(ctx.len());
        }
    }
    // Loss is decided once per skb with the rule's probability: every wire segment is lost with that
    // probability, segments of one super-packet together.
    // SAFETY: helper without arguments.
    let lost = rule.loss_threshold != 0 && unsafe { bpf_get_prandom_u32() } < rule.loss_threshold;
    if lost || rule.action == action::DROP {
        if let Some(c) = counters {
            // SAFETY: as above.
            unsafe { (*c).drops += segs };
        }
        return Some(TC_ACT_SHOT);
    }
    if rule.action == action::SHAPE {
        let origin = if at_ingress { 0 } else { EGRESS_ORIGIN };
        tc_index = (tc_index & JUDGED) | SHAPE_MARK | origin | ((rule.class_minor as u16) & MINOR_MASK);
        // SAFETY: `tc_index` is writable for tc programs.
        unsafe { (*ctx.skb.skb).tc_index = u32::from(tc_index) };
    }
    // Fall through to the next filter: `chaos_steer` redirects marked packets, others pass untouched.
    None
}

/// The live rule for one side of the packet: first keyed on the exact address, then on "any address of this
/// host". Rules are only ever keyed on this host's addresses, so an address that is not one of them (traffic the
/// host forwards) needs no rule lookup at all; on loopback every address is the host's. Expired rules are
/// skipped (the clock is read only when a rule is found).
#[inline(always)]
fn find_rule(flow: &Flow, hook: u8, side: u8) -> Option<Rule> {
    let (addr, port) = if side == scope::SIDE_DST { (flow.daddr, flow.dport) } else { (flow.saddr, flow.sport) };
    // SAFETY: only tested for presence.
    if hook != HOOK_LOCAL && unsafe { LOCAL_ADDRS.get(addr) }.is_none() {
        return None;
    }
    let mut key = RuleKey { addr, port, proto: flow.proto, scope: scope::encode(hook, side) };
    // SAFETY: copied out of the map value right away; the helper has no arguments.
    if let Some(rule) = unsafe { RULES.get(key) }
        && unsafe { bpf_ktime_get_ns() } < rule.expires_at_ns
    {
        return Some(*rule);
    }
    key.addr = ANY_LOCAL_ADDR;
    // SAFETY: as above.
    match unsafe { RULES.get(key) } {
        Some(rule) if unsafe { bpf_ktime_get_ns() } < rule.expires_at_ns => Some(*rule),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Peer-scoped rules (see `chaos_common::peer`): the packet's receiver (destination address and port) and its
// sender, by address (LPM trie) or by the process that connected the packet's socket.

#[map(name = "CHAOS_PEER_ADDR")]
static PEER_ADDR_RULES: LpmTrie<PeerAddrKey, Rule> = LpmTrie::with_max_entries(MAX_PEER_ADDR_RULES, 0);

#[map(name = "CHAOS_PEER_PROC")]
static PEER_PROC_RULES: HashMap<PeerProcKey, Rule> = HashMap::with_max_entries(MAX_PEER_PROC_RULES, 0);

#[map(name = "CHAOS_SOCK_OWNERS")]
static SOCK_OWNERS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(MAX_SOCK_OWNERS, 0);

/// Records socket cookie → tgid of the connecting process; never refuses the connect.
#[cgroup_sock_addr(connect4)]
pub fn chaos_connect4(ctx: SockAddrContext) -> i32 {
    record_sock_owner(&ctx);
    1
}

/// As `chaos_connect4`, for IPv6 sockets.
#[cgroup_sock_addr(connect6)]
pub fn chaos_connect6(ctx: SockAddrContext) -> i32 {
    record_sock_owner(&ctx);
    1
}

/// As `chaos_connect4`, for UDP datagrams sent without `connect` (`sendto`/`sendmsg` on IPv4 sockets).
#[cgroup_sock_addr(sendmsg4)]
pub fn chaos_sendmsg4(ctx: SockAddrContext) -> i32 {
    record_sock_owner(&ctx);
    1
}

/// As `chaos_sendmsg4`, for IPv6 sockets.
#[cgroup_sock_addr(sendmsg6)]
pub fn chaos_sendmsg6(ctx: SockAddrContext) -> i32 {
    record_sock_owner(&ctx);
    1
}

#[inline(always)]
fn record_sock_owner(ctx: &SockAddrContext) {
    // SAFETY: the helpers take the program's own context; `bpf_get_socket_cookie` assigns the cookie if the socket
    // has none yet, so the classifier reads the same one later.
    let (cookie, tgid) =
        unsafe { (bpf_get_socket_cookie(ctx.sock_addr.cast()), (bpf_get_current_pid_tgid() >> 32) as u32) };
    let _ = SOCK_OWNERS.insert(cookie, tgid, 0);
}

/// The live peer rule for the packet's receiver and sender, if any.
#[inline(always)]
fn find_peer_rule(ctx: &TcContext, flow: &Flow, hook: u8) -> Option<Rule> {
    let scope = scope::encode(hook, scope::SIDE_DST);
    // The receiver may be this host ("any local address" keys) only when it is one of its addresses.
    // SAFETY: only tested for presence.
    let local = hook == HOOK_LOCAL || unsafe { LOCAL_ADDRS.get(flow.daddr) }.is_some();
    // By sender process: only packets that carry a socket of this host (egress hooks).
    if hook != HOOK_INGRESS {
        // SAFETY: the skb is the program's context; a packet without a socket gives cookie 0.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
        // SAFETY: copied out right away.
        if cookie != 0
            && let Some(tgid) = unsafe { SOCK_OWNERS.get(cookie) }.copied()
        {
            let mut key = PeerProcKey { daddr: flow.daddr, port: flow.dport, proto: flow.proto, scope, tgid };
            // SAFETY: as above.
            if let Some(rule) = live(unsafe { PEER_PROC_RULES.get(key) }) {
                return Some(rule);
            }
            if local {
                key.daddr = ANY_LOCAL_ADDR;
                // SAFETY: as above.
                if let Some(rule) = live(unsafe { PEER_PROC_RULES.get(key) }) {
                    return Some(rule);
                }
            }
        }
    }
    // By sender address.
    let full = ADDR_KEY_FIXED_BITS + 128;
    let mut key = LpmKey::new(
        full,
        PeerAddrKey { proto: flow.proto, scope, port_be: flow.dport.to_be(), daddr: flow.daddr, saddr: flow.saddr },
    );
    if let Some(rule) = live(PEER_ADDR_RULES.get(&key)) {
        return Some(rule);
    }
    if local {
        key.data.daddr = ANY_LOCAL_ADDR;
        return live(PEER_ADDR_RULES.get(&key));
    }
    None
}

/// A copy of the rule when it has not expired.
#[inline(always)]
fn live(rule: Option<&Rule>) -> Option<Rule> {
    let rule = *rule?;
    // SAFETY: helper without arguments.
    (unsafe { bpf_ktime_get_ns() } < rule.expires_at_ns).then_some(rule)
}

/// IPv4 address as `::ffff:a.b.c.d`.
#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// Parses a TCP or UDP packet whose network header starts at `l3_offset` (after up to two VLAN tags).
#[inline(always)]
fn parse(ctx: &TcContext, l3_offset: usize) -> Option<Flow> {
    let mut off = l3_offset;
    let mut ethertype = if l3_offset >= 2 {
        u16::from_be(ctx.load::<u16>(l3_offset - 2).ok()?)
    } else {
        // Bare L3 device: skb->protocol says what follows (network byte order in the u32 field).
        // SAFETY: reading a plain field of the context.
        u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16)
    };
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = u16::from_be(ctx.load::<u16>(off + 2).ok()?);
        off += 4;
    }
    let (proto, l4, saddr, daddr) = match ethertype {
        ETH_P_IP => {
            // The fixed header in one load (each load is a helper call).
            let h: [u8; 20] = ctx.load(off).ok()?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            if h[0] >> 4 != 4 || ihl < 20 {
                return None;
            }
            if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                return None; // not the first fragment: no L4 header
            }
            let saddr = v4_mapped([h[12], h[13], h[14], h[15]]);
            let daddr = v4_mapped([h[16], h[17], h[18], h[19]]);
            (h[9], off + ihl, saddr, daddr)
        }
        ETH_P_IPV6 => {
            let h: [u8; IPV6_HDR_LEN] = ctx.load(off).ok()?;
            let mut next = h[6];
            let mut saddr = [0u8; 16];
            let mut daddr = [0u8; 16];
            saddr.copy_from_slice(&h[8..24]);
            daddr.copy_from_slice(&h[24..40]);
            let mut l4 = off + IPV6_HDR_LEN;
            for _ in 0..IPV6_MAX_EXT_HEADERS {
                match next {
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                        let hdr: [u8; 2] = ctx.load(l4).ok()?;
                        next = hdr[0];
                        l4 += (usize::from(hdr[1]) + 1) * 8;
                    }
                    IPPROTO_FRAGMENT => {
                        let hdr: [u8; 4] = ctx.load(l4).ok()?;
                        if (u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8) != 0 {
                            return None; // not the first fragment
                        }
                        next = hdr[0];
                        l4 += 8;
                    }
                    _ => break,
                }
            }
            (next, l4, saddr, daddr)
        }
        _ => return None,
    };
    if proto != proto::TCP && proto != proto::UDP {
        return None;
    }
    let ports: [u16; 2] = ctx.load(l4).ok()?;
    Some(Flow { proto, saddr, daddr, sport: u16::from_be(ports[0]), dport: u16::from_be(ports[1]) })
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("chaos-ebpf is a BPF object: build it with `cargo xtask build-ebpf`");
}
