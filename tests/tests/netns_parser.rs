//! The classifier's parser, run by the kernel on crafted frames (`BPF_PROG_TEST_RUN`, nothing is sent): VLAN
//! (single and QinQ), IPv4 options and fragments, IPv6 with hop-by-hop, routing, destination-options and fragment
//! headers, truncated packets and addresses that are not this host's — each frame with the verdict it must get
//! from a blackhole rule on its port: `TC_ACT_SHOT` (parsed and judged ours) or `TC_ACT_UNSPEC` (left alone).

use chaos_agent::faults::network::{classifier::Classifier, expiry_after, key_addr};
use chaos_common::{
    ANY_LOCAL_ADDR, Iface, PROG_INGRESS, Rule, RuleKey, action, proto,
    scope::{self, HOOK_EGRESS, HOOK_INGRESS, HOOK_LOCAL, HOOK_NONE, SIDE_DST, SIDE_SRC},
};
use chaos_tests::netns::Netns;
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

const SHOT: i32 = 2;
const UNSPEC: i32 = -1;
const PORT: u16 = 5353;
const LOCAL4: [u8; 4] = [10, 0, 0, 1];
const LOCAL6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const REMOTE4: [u8; 4] = [10, 0, 0, 2];
const REMOTE6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const IPPROTO_UDP: u8 = 17;
const IPPROTO_TCP: u8 = 6;

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn vlan(f: &mut Vec<u8>, next: u16) {
    f.extend_from_slice(&[0x00, 0x2a]); // TCI: VLAN 42
    f.extend_from_slice(&next.to_be_bytes());
}

fn l4(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    if proto == IPPROTO_TCP {
        h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        h.extend_from_slice(&[0, 12, 0, 0]);
    }
    h.extend_from_slice(b"data");
    h
}

/// An IPv4 header (+ `options` 4-byte words) with fragment field `frag` (flags + offset), then `payload`.
fn ipv4(f: &mut Vec<u8>, proto: u8, src: [u8; 4], dst: [u8; 4], frag: u16, options: usize, payload: &[u8]) {
    let ihl = 5 + options as u8;
    let total = (usize::from(ihl) * 4 + payload.len()) as u16;
    f.push(0x40 | ihl);
    f.push(0);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1]);
    f.extend_from_slice(&frag.to_be_bytes());
    f.extend_from_slice(&[64, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend(std::iter::repeat_n(1u8, options * 4)); // NOP options
    f.extend_from_slice(payload);
}

/// IPv6 extension headers by number: 0 hop-by-hop, 43 routing, 60 destination options (8 bytes each), 44 fragment
/// (first fragment unless `non_first`).
fn ipv6(f: &mut Vec<u8>, src: [u8; 16], dst: [u8; 16], ext: &[u8], non_first: bool, proto: u8, payload: &[u8]) {
    let mut body = Vec::new();
    for (i, &h) in ext.iter().enumerate() {
        let next = ext.get(i + 1).copied().unwrap_or(proto);
        match h {
            44 => {
                let off: u16 = if non_first { 185 << 3 } else { 1 }; // offset 185 × 8, or M flag only
                body.extend_from_slice(&[next, 0]);
                body.extend_from_slice(&off.to_be_bytes());
                body.extend_from_slice(&[0, 0, 0, 7]);
            }
            43 => body.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]), // type 0, segments left 0
            _ => body.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),  // PadN
        }
    }
    body.extend_from_slice(payload);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(body.len() as u16).to_be_bytes());
    f.push(ext.first().copied().unwrap_or(proto));
    f.push(64);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&body);
}

fn udp4_to(dst: [u8; 4]) -> Vec<u8> {
    let mut f = eth(0x0800);
    ipv4(&mut f, IPPROTO_UDP, REMOTE4, dst, 0, 0, &l4(IPPROTO_UDP, 40000, PORT));
    f
}

fn udp6_with(ext: &[u8], non_first: bool) -> Vec<u8> {
    let mut f = eth(0x86DD);
    ipv6(&mut f, REMOTE6, LOCAL6, ext, non_first, IPPROTO_UDP, &l4(IPPROTO_UDP, 40000, PORT));
    f
}

/// The frames and the verdict each must get.
fn cases() -> Vec<(&'static str, Vec<u8>, i32)> {
    let mut v = Vec::new();
    v.push(("IPv4 UDP to a local address", udp4_to(LOCAL4), SHOT));
    v.push(("IPv4 UDP to another machine (forwarded)", udp4_to([10, 0, 0, 9]), UNSPEC));
    let mut f = eth(0x0800);
    ipv4(&mut f, IPPROTO_TCP, REMOTE4, LOCAL4, 0, 0, &l4(IPPROTO_TCP, 40000, PORT));
    v.push(("IPv4 TCP", f, SHOT));
    let mut f = eth(0x0800);
    ipv4(&mut f, IPPROTO_UDP, REMOTE4, LOCAL4, 0, 0, &l4(IPPROTO_UDP, 40000, PORT + 1));
    v.push(("IPv4 UDP to another port", f, UNSPEC));
    let mut f = eth(0x0800);
    ipv4(&mut f, IPPROTO_UDP, REMOTE4, LOCAL4, 0, 3, &l4(IPPROTO_UDP, 40000, PORT));
    v.push(("IPv4 with 12 bytes of options", f, SHOT));
    let mut f = eth(0x8100);
    vlan(&mut f, 0x0800);
    ipv4(&mut f, IPPROTO_UDP, REMOTE4, LOCAL4, 0, 0, &l4(IPPROTO_UDP, 40000, PORT));
    v.push(("802.1Q + IPv4", f, SHOT));
    let mut f = eth(0x88A8);
    vlan(&mut f, 0x8100);
    vlan(&mut f, 0x86DD);
    ipv6(&mut f, REMOTE6, LOCAL6, &[], false, IPPROTO_UDP, &l4(IPPROTO_UDP, 40000, PORT));
    v.push(("QinQ (802.1ad + 802.1Q) + IPv6", f, SHOT));
    let mut f = eth(0x88A8);
    vlan(&mut f, 0x8100);
    vlan(&mut f, 0x8100);
    vlan(&mut f, 0x0800);
    ipv4(&mut f, IPPROTO_UDP, REMOTE4, LOCAL4, 0, 0, &l4(IPPROTO_UDP, 40000, PORT));
    v.push(("three VLAN tags (beyond the two parsed)", f, UNSPEC));
    let mut f = eth(0x0800);
    ipv4(&mut f, IPPROTO_UDP, REMOTE4, LOCAL4, 0x2000, 0, &l4(IPPROTO_UDP, 40000, PORT));
    v.push(("IPv4 first fragment (MF, offset 0)", f, SHOT));
    let mut f = eth(0x0800);
    ipv4(&mut f, IPPROTO_UDP, REMOTE4, LOCAL4, 185, 0, &l4(IPPROTO_UDP, 40000, PORT));
    v.push(("IPv4 later fragment (offset 185)", f, UNSPEC));
    v.push(("IPv6 UDP", udp6_with(&[], false), SHOT));
    v.push(("IPv6 hop-by-hop", udp6_with(&[0], false), SHOT));
    v.push(("IPv6 routing", udp6_with(&[43], false), SHOT));
    v.push(("IPv6 destination options", udp6_with(&[60], false), SHOT));
    v.push(("IPv6 first fragment", udp6_with(&[44], false), SHOT));
    v.push(("IPv6 later fragment", udp6_with(&[44], true), UNSPEC));
    v.push(("IPv6 hop-by-hop + dst options + routing + first fragment", udp6_with(&[0, 60, 43, 44], false), SHOT));
    v.push((
        "IPv6 with five extension headers (beyond the four parsed)",
        udp6_with(&[0, 60, 43, 60, 44], false),
        UNSPEC,
    ));
    let mut f = eth(0x86DD);
    ipv6(&mut f, REMOTE6, REMOTE6, &[], false, IPPROTO_UDP, &l4(IPPROTO_UDP, 40000, PORT));
    v.push(("IPv6 to another machine (forwarded)", f, UNSPEC));
    let full = udp4_to(LOCAL4);
    // (The kernel refuses to test-run an untagged IPv4 frame shorter than an IPv4 header; behind a VLAN tag it
    // runs it, as the tc hook would see it.)
    let mut tagged = eth(0x8100);
    vlan(&mut tagged, 0x0800);
    tagged.extend_from_slice(&full[14..14 + 10]);
    v.push(("truncated inside the IPv4 header (behind a VLAN tag)", tagged, UNSPEC));
    v.push(("truncated before the UDP ports", full[..14 + 20 + 2].to_vec(), UNSPEC));
    let full6 = udp6_with(&[0, 60], false);
    v.push(("truncated inside an IPv6 extension header", full6[..14 + 40 + 8 + 1].to_vec(), UNSPEC));
    let mut bare = eth(0x8100);
    bare.extend_from_slice(&[0x00, 0x2a]);
    v.push(("ends inside a VLAN tag", bare, UNSPEC));
    let mut f = eth(0x0800);
    f.push(0x45);
    f.extend_from_slice(&[0; 19]);
    f[14 + 9] = 1; // ICMP
    v.push(("IPv4 ICMP (not TCP or UDP)", f, UNSPEC));
    v
}

/// The classifier with interface 1 (the test run's skb is on the calling thread's namespace's `lo`) classified
/// like a NIC, and this host's addresses `LOCAL4`, `LOCAL6`. Call inside the namespace.
fn load() -> Classifier {
    let mut c = Classifier::load(None).expect("classifier");
    let iface = Iface { l3_offset: 14, ingress_hook: HOOK_INGRESS, egress_hook: HOOK_EGRESS, _pad: [0; 2] };
    c.set_iface(1, iface).unwrap();
    let local: BTreeSet<[u8; 16]> = [IpAddr::from(LOCAL4), IpAddr::from(LOCAL6)].into_iter().map(key_addr).collect();
    c.set_local_addrs(&local).unwrap();
    c
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn every_crafted_frame_gets_the_verdict_it_must() {
    let ns = Netns::new("parser");
    ns.run(parser_verdicts);
}

fn parser_verdicts() {
    let mut c = load();
    let rule = Rule {
        expires_at_ns: expiry_after(Duration::from_secs(600)),
        action: action::DROP,
        slot: 7,
        ..Default::default()
    };
    for p in [proto::UDP, proto::TCP] {
        let key = RuleKey { addr: ANY_LOCAL_ADDR, port: PORT, proto: p, scope: scope::encode(HOOK_INGRESS, SIDE_DST) };
        c.set_rule(key, rule).unwrap();
    }
    c.reset_counters(7).unwrap();
    let mut wrong = Vec::new();
    let mut shot = 0;
    for (name, frame, want) in cases() {
        let got =
            c.test_run(PROG_INGRESS, &frame, 1).unwrap_or_else(|e| panic!("{name}: BPF_PROG_TEST_RUN: {e}")).retval;
        if got != want {
            wrong.push(format!("{name}: got {got}, want {want}"));
        }
        shot += u64::from(want == SHOT);
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
    assert_eq!(c.counters(7).packets, shot, "the rule's counter must count exactly the frames it judged");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn an_expired_destination_rule_falls_through_to_the_live_source_rule_in_the_kernel() {
    let ns = Netns::new("expiry");
    ns.run(expiry_fall_through);
}

fn expiry_fall_through() {
    let mut c = load();
    // Loopback (the hook that has both kinds of rules): destination port PORT has an expired observe rule, source
    // port 40000 a live blackhole.
    let lo = Iface { l3_offset: 14, ingress_hook: HOOK_NONE, egress_hook: HOOK_LOCAL, _pad: [0; 2] };
    c.set_iface(1, lo).unwrap();
    let expired = Rule { expires_at_ns: 1, action: action::COUNT, slot: 1, ..Default::default() };
    let live = Rule {
        expires_at_ns: expiry_after(Duration::from_secs(600)),
        action: action::DROP,
        slot: 2,
        ..Default::default()
    };
    let dst =
        RuleKey { addr: ANY_LOCAL_ADDR, port: PORT, proto: proto::UDP, scope: scope::encode(HOOK_LOCAL, SIDE_DST) };
    let src =
        RuleKey { addr: ANY_LOCAL_ADDR, port: 40000, proto: proto::UDP, scope: scope::encode(HOOK_LOCAL, SIDE_SRC) };
    c.set_rule(dst, expired).unwrap();
    c.set_rule(src, live).unwrap();
    // A packet from port 40000 to PORT, seen at loopback egress.
    let mut f = eth(0x0800);
    ipv4(&mut f, IPPROTO_UDP, LOCAL4, REMOTE4, 0, 0, &l4(IPPROTO_UDP, 40000, PORT));
    let got = c.test_run(chaos_common::PROG_EGRESS, &f, 1).unwrap().retval;
    assert_eq!(got, SHOT, "the expired destination rule shadowed the live source rule");
    // At a NIC's egress, the same packet from a source address that is not this host's is forwarded: left alone;
    // from this host's address it is ours.
    let nic = Iface { l3_offset: 14, ingress_hook: HOOK_INGRESS, egress_hook: HOOK_EGRESS, _pad: [0; 2] };
    c.set_iface(1, nic).unwrap();
    let src = RuleKey { scope: scope::encode(HOOK_EGRESS, SIDE_SRC), ..src };
    c.set_rule(src, live).unwrap();
    for (from, want) in [([10, 0, 0, 9], UNSPEC), (LOCAL4, SHOT)] {
        let mut f = eth(0x0800);
        ipv4(&mut f, IPPROTO_UDP, from, REMOTE4, 0, 0, &l4(IPPROTO_UDP, 40000, PORT));
        assert_eq!(c.test_run(chaos_common::PROG_EGRESS, &f, 1).unwrap().retval, want, "from {from:?}");
    }
}
