//! classifier: cost per packet of `chaos_ingress` run by the kernel on crafted frames (`BPF_PROG_TEST_RUN`, 10^5
//! single runs each): this build's object (address keys, judged bits, fall-through on expiry) vs the object of
//! the previous classifier (port keys only; `$CHAOS_OLD_EBPF_OBJECT`, built from git a401fe4 by
//! `cargo xtask bench`), same frames, same rules, interleaved rounds.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chaos_tests::netns::Netns;

use crate::{progress, report::*};

/// Single runs per figure. One run each (not the kernel's `repeat`): a repeated run reuses one skb, and ours marks
/// the skb as judged on the first run, so every later repetition would measure the "already judged" exit only.
const CLS_RUNS: u32 = 100_000;
const CLS_ROUNDS: usize = 5;
/// Rules on other ports, so the hash maps are not trivially small.
const CLS_OTHER_RULES: u16 = 1000;
const CLS_PORT: u16 = 5353;

/// A classifier object loaded for test runs, with the rules of the benchmark, in either map layout.
struct ClsObject {
    _ebpf: aya::Ebpf,
    ingress_fd: i32,
}

fn cls_rule_bytes(slot: u32, expires: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&expires.to_ne_bytes());
    b[8..12].copy_from_slice(&chaos_common::action::COUNT.to_ne_bytes());
    b[20..24].copy_from_slice(&slot.to_ne_bytes());
    b
}

/// Loads `object` and fills its maps: `lo` (ifindex 1) classified as a NIC, the local addresses (new layout
/// only), an observe rule on `CLS_PORT` and `CLS_OTHER_RULES` rules on other ports. `new_layout`: 20-byte keys
/// with an address, else the previous 4-byte keys (port, proto, scope).
fn cls_load(object: &[u8], new_layout: bool) -> Result<ClsObject> {
    use aya::maps::HashMap as BpfMap;
    use chaos_common::scope::{HOOK_EGRESS, HOOK_INGRESS, SIDE_DST, encode};
    let mut ebpf = aya::EbpfLoader::new().map_max_entries(chaos_common::MAP_COUNTERS, 2048).load(object)?;
    let program: &mut aya::programs::SchedClassifier =
        ebpf.program_mut(chaos_common::PROG_INGRESS).context("no chaos_ingress")?.try_into()?;
    program.load()?;
    let ingress_fd = {
        use std::os::fd::{AsFd, AsRawFd};
        program.fd()?.as_fd().as_raw_fd()
    };
    let expires = chaos_agent::faults::network::expiry_after(Duration::from_secs(3600));
    let mut ifaces: BpfMap<_, u32, [u8; 8]> =
        BpfMap::try_from(ebpf.map_mut(chaos_common::MAP_IFACES).context("no iface map")?)?;
    ifaces.insert(1, [14, 0, 0, 0, HOOK_INGRESS, HOOK_EGRESS, 0, 0], 0)?;
    let scope = encode(HOOK_INGRESS, SIDE_DST);
    let ports = std::iter::once(CLS_PORT).chain((0..CLS_OTHER_RULES).map(|i| 20000 + i));
    if new_layout {
        let mut addrs: BpfMap<_, [u8; 16], u8> =
            BpfMap::try_from(ebpf.map_mut(chaos_common::MAP_LOCAL_ADDRS).context("no address map")?)?;
        for local in ["10.0.0.1", "fd00::1"] {
            addrs.insert(chaos_agent::faults::network::key_addr(local.parse()?), 1, 0)?;
        }
        let mut rules: BpfMap<_, [u8; 20], [u8; 24]> =
            BpfMap::try_from(ebpf.map_mut(chaos_common::MAP_RULES).context("no rule map")?)?;
        for (slot, port) in ports.enumerate() {
            let mut key = [0u8; 20];
            key[16..18].copy_from_slice(&port.to_ne_bytes());
            key[18] = chaos_common::proto::UDP;
            key[19] = scope;
            rules.insert(key, cls_rule_bytes(slot as u32, expires), 0)?;
        }
    } else {
        let mut rules: BpfMap<_, [u8; 4], [u8; 24]> =
            BpfMap::try_from(ebpf.map_mut(chaos_common::MAP_RULES).context("no rule map")?)?;
        for (slot, port) in ports.enumerate() {
            let p = port.to_ne_bytes();
            rules.insert([p[0], p[1], chaos_common::proto::UDP, scope], cls_rule_bytes(slot as u32, expires), 0)?;
        }
    }
    Ok(ClsObject { _ebpf: ebpf, ingress_fd })
}

/// An Ethernet + IPv4 (or IPv6) + UDP frame from 10.0.0.2:40000 to 10.0.0.`dst`:`dport` (fd00::2 → fd00::`dst`);
/// 10.0.0.1 and fd00::1 are this host's addresses.
fn cls_frame(v6: bool, dst: u8, dport: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&[0, 40, 0, 0]);
    udp.extend_from_slice(&[0u8; 32]);
    if v6 {
        f.extend_from_slice(&[0x86, 0xDD, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[17, 64]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, dst]);
    } else {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, dst]);
    }
    f.extend_from_slice(&udp);
    f
}

pub(crate) fn run() -> Result<()> {
    let old_path = std::env::var_os("CHAOS_OLD_EBPF_OBJECT")
        .context("CHAOS_OLD_EBPF_OBJECT is not set (cargo xtask bench classifier builds the previous object)")?;
    let old = std::fs::read(&old_path).with_context(|| format!("reading {}", old_path.to_string_lossy()))?;
    let new = chaos_agent::faults::network::classifier::embedded_object();
    ensure!(!new.is_empty(), "this build carries no BPF object (cargo xtask build-ebpf)");
    let ns = Netns::new("bench-cls");
    let cases: [(&str, Vec<u8>); 5] = [
        ("IPv4 UDP to this host, a port no rule names", cls_frame(false, 1, 9999)),
        ("IPv4 UDP to this host, the observed port", cls_frame(false, 1, CLS_PORT)),
        ("IPv6 UDP to this host, a port no rule names", cls_frame(true, 1, 9999)),
        ("IPv6 UDP to this host, the observed port", cls_frame(true, 1, CLS_PORT)),
        ("IPv4 UDP forwarded to another machine, the observed port", cls_frame(false, 9, CLS_PORT)),
    ];
    let results = ns.run(|| -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
        let ours = cls_load(new, true)?;
        let before = cls_load(&old, false)?;
        let mut out = vec![(Vec::new(), Vec::new()); cases.len()];
        for round in 0..CLS_ROUNDS {
            progress(format!("classifier: round {}/{CLS_ROUNDS}", round + 1));
            for (i, (_, frame)) in cases.iter().enumerate() {
                for (which, obj) in [(0, &ours), (1, &before)] {
                    let mut total = 0u64;
                    for _ in 0..CLS_RUNS {
                        let run = chaos_agent::faults::network::classifier::test_run_fd(obj.ingress_fd, frame, 1)?;
                        total += u64::from(run.duration_ns);
                    }
                    let ns_per = total as f64 / f64::from(CLS_RUNS);
                    if which == 0 { out[i].0.push(ns_per) } else { out[i].1.push(ns_per) }
                }
            }
        }
        Ok(out)
    })?;
    title("classifier: cost per packet (chaos_ingress, BPF_PROG_TEST_RUN)");
    note(format!(
        "mean of {CLS_RUNS} single runs (the kernel's time per run, its timer included) per figure, median of \
         {CLS_ROUNDS} interleaved rounds; {} rules loaded; ours: address + \
         port keys, judged bits, expired rules fall through; previous: port keys (git a401fe4)",
        CLS_OTHER_RULES + 1
    ));
    let mut table = Table::new(&["frame", "ours ns/packet", "previous ns/packet", "ours − previous"]);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for ((name, _), (mut ours, mut before)) in cases.iter().zip(results) {
        let (o, b) = (median(&mut ours), median(&mut before));
        table.row([(*name).to_owned(), format!("{o:.0}"), format!("{b:.0}"), format!("{:+.0} ns", o - b)]);
    }
    table.print();
    Ok(())
}
