//! network: ns cli ──veth──▶ ns srv: bulk TCP and request/response RTT to a port no rule names, with 0 … 10,000
//! rules on other ports. ours: `NetworkEngine` in both namespaces (classifier on every hook the traffic
//! crosses). u32: HTB root + one `u32 match ip dport` filter per port on cli veth egress, the same chain on srv
//! veth ingress (clsact). bare: nothing attached. Every configuration once per round, several rounds.
//!
//! [`probe`] holds the configurations, the samples and how one configuration is measured; this file runs the
//! rounds and prints the tables.

use std::time::{Duration, Instant};

use anyhow::Result;
use chaos_tests::measure::RttProbe;

use crate::{engine::*, progress, report::*};

mod probe;

use probe::*;

const NET_SUBNET: u8 = 61;
const RTT_PORT: u16 = 5201;
const BULK_PORT: u16 = 5202;
/// Rules go on ports from here up (below the ephemeral range, so no client port is ever one of them).
const RULE_PORT_BASE: u16 = 20_000;
const RULE_COUNTS: [usize; 4] = [0, 100, 1_000, 10_000];
const NET_GOAL: f64 = 0.98;
/// Every configuration is measured once per round, rounds one after the other, so that drift (other work on the
/// machine, thermal, caches) spreads over all configurations instead of favouring the ones measured first.
const NET_ROUNDS: usize = 6;
/// One bulk run per configuration and round; short enough that a SCHED_FIFO sender never reaches the kernel's
/// real-time throttle (950 ms per second).
const BULK_TIME: Duration = Duration::from_millis(500);
const BULK_CHUNK: usize = 128 << 10;
const RTT_PROBE: RttProbe = RttProbe { samples: 1000, warmup: 100, payload: 32, timeout: Duration::from_secs(5) };
/// Idle time before each measurement phase: keeps the SCHED_FIFO measuring threads far below the kernel's real-time
/// throttle (`sched_rt_runtime_us` 950 ms per 1 s period), which would otherwise stall a run for 50 ms at random.
const RT_COOLDOWN: Duration = Duration::from_millis(200);
/// Priority of the measuring threads (client and server ends), SCHED_FIFO.
const MEASURE_RT_PRIORITY: i32 = 10;
/// The u32 baseline's IFB (ingress filters redirect there on a match, as ingress faults need).
const U32_IFB: &str = "bifb0";

pub(crate) fn run() -> Result<()> {
    let probe = NetProbe::start()?;
    let configs = NetSetup::all();
    let mut samples: Vec<NetSamples> = vec![NetSamples::default(); configs.len()];
    let index = |c: NetSetup| configs.iter().position(|x| *x == c).expect("known configuration");
    let mut notes: Vec<String> = Vec::new();
    let realtime_ok = probe.cli.run(realtime);
    for round in 0..NET_ROUNDS {
        let first = round == 0;
        progress(format!("network: round {}/{NET_ROUNDS}: bare, ours 0…10,000 rules, u32 0…10,000 filters", round + 1));
        probe.measure(&mut samples[index(NetSetup::Bare)])?;

        {
            let srv_engine = NsEngine::start(&probe.srv)?;
            let cli_engine = NsEngine::start(&probe.cli)?;
            srv_engine.attach()?;
            cli_engine.attach()?;
            let engines = [&srv_engine, &cli_engine];
            let mut loaded = 0;
            for requested in RULE_COUNTS {
                if requested > loaded {
                    let started = Instant::now();
                    let (got, err) = grow_ours(&engines, loaded, requested);
                    if first {
                        notes.push(format!(
                            "ours: {loaded} → {got} rules in each namespace in {:.2} s (NetworkEngine::apply, one fault \
                             per port){}",
                            started.elapsed().as_secs_f64(),
                            err.map(|e| format!(" — STOPPED at {got}: {e}")).unwrap_or_default()
                        ));
                    }
                    loaded = got;
                }
                let slot = &mut samples[index(NetSetup::Ours(requested))];
                slot.loaded = loaded;
                probe.measure(slot)?;
            }
            if first {
                notes.push(format!("ours is live: {} (blackholed at srv veth0 ingress)", probe.probe_rules(loaded)));
                let srv_at = srv_engine.block_on(srv_engine.engine.attached());
                let cli_at = cli_engine.block_on(cli_engine.engine.attached());
                notes.push(format!(
                    "ours is attached in srv to {} and in cli to {} (ingress and egress of each)",
                    srv_at.join(", "),
                    cli_at.join(", ")
                ));
            }
        }

        {
            let mut chain = U32Chain::setup(&probe)?;
            for requested in RULE_COUNTS {
                let started = Instant::now();
                chain.grow(requested)?;
                if first && requested > 0 {
                    notes.push(format!(
                        "u32: → {requested} filters on each side in {:.2} s (tc -batch)",
                        started.elapsed().as_secs_f64()
                    ));
                }
                let slot = &mut samples[index(NetSetup::U32(requested))];
                slot.loaded = requested;
                probe.measure(slot)?;
            }
            if first {
                notes.push(format!("u32 is live: {} (dropped in class 1:2)", probe.probe_rules(chain.filters)));
            }
        }
    }
    if !realtime_ok {
        notes.push("WARNING: SCHED_FIFO refused: measuring threads ran under the normal scheduler".into());
    }
    print_network(&configs, &samples, &notes);
    Ok(())
}

fn print_network(configs: &[NetSetup], samples: &[NetSamples], notes: &[String]) {
    title("network — cost for a port no rule names, with 0 … 10,000 rules on other ports");
    note("topology: ns cli (veth1 10.61.0.2) ──veth──▶ ns srv (veth0 10.61.0.1); data crosses cli veth1 egress and");
    note("  srv veth0 ingress, ACKs/replies the other two hooks");
    note("ours: NetworkEngine in both namespaces (the classifier on ingress+egress of veth and lo); rules are");
    note("  blackhole faults on tcp ports 20000+i (to-port), one fault each; every packet: 1 iface + ≤ 2 rule lookups");
    note("u32: the competitors' per-port filter chain. sch_prio is not in this kernel, so an HTB root (default class");
    note("  1:1; class 1:2 → pfifo limit 0 = drop) stands in for `prio` + netem band: the same linear u32 walk. One");
    note("  `u32 match ip dport P 0xffff flowid 1:2` per port on cli veth1 egress, and one `… action mirred egress");
    note("  redirect dev bifb0` per port on srv veth0 ingress (clsact), all in prio 1 (one list), via tc -batch");
    note("bare: nothing attached (veth, noqueue)");
    note(format!(
        "method: {NET_ROUNDS} rounds, each measuring every configuration once (bare, ours 0…, u32 0…); per round and"
    ));
    note(format!(
        "  configuration one bulk TCP stream of {:.2} s and {} × 32-byte request/response on one connection;",
        BULK_TIME.as_secs_f64(),
        RTT_PROBE.samples
    ));
    note(format!(
        "  client threads SCHED_FIFO on CPU 0, server threads SCHED_FIFO on the last CPU ({} ms idle before each",
        RT_COOLDOWN.as_millis()
    ));
    note("  phase keeps them under the real-time throttle); bulk = median of the rounds, RTT over all rounds' samples");
    for n in notes {
        note(n);
    }
    println!();
    let find = |c: NetSetup| &samples[configs.iter().position(|x| *x == c).expect("known")];
    let bare = find(NetSetup::Bare);
    let own0 = |c: NetSetup| match c {
        NetSetup::Bare => bare,
        NetSetup::Ours(_) => find(NetSetup::Ours(0)),
        NetSetup::U32(_) => find(NetSetup::U32(0)),
    };
    let mut detail = Table::new(&[
        "rules",
        "design",
        "loaded",
        "bulk Gbit/s median (rounds)",
        "÷ own 0 [paired range]",
        "÷ bare",
        "RTT p50",
        "RTT p99",
        "p50 ÷ own 0",
    ]);
    for (config, s) in configs.iter().zip(samples) {
        let zero = own0(*config);
        let runs: Vec<String> = s.runs.iter().map(|g| format!("{g:.1}")).collect();
        detail.row([
            fmt_count(config.rules() as f64),
            config.design().to_owned(),
            fmt_count(s.loaded as f64),
            format!("{:.2} ({})", s.gbps(), runs.join(" ")),
            {
                let (lo, hi) = s.paired_range(zero);
                format!("{:.3} [{lo:.2}–{hi:.2}]", s.gbps() / zero.gbps())
            },
            format!("{:.3}", s.gbps() / bare.gbps()),
            fmt_dur(s.rtt().p50),
            fmt_dur(s.rtt().p99),
            format!("{:.3}", s.rtt().p50.as_secs_f64() / zero.rtt().p50.as_secs_f64()),
        ]);
    }
    detail.print();
    note(format!(
        "run-to-run noise of the bulk stream on this machine (bare veth, coefficient of variation over the rounds): \
         {:.1} %; [paired range] = min–max over the rounds of (this run ÷ the own-0 run of the same round)",
        bare.cv_percent()
    ));
    println!();

    let top = *RULE_COUNTS.last().expect("non-empty");
    let (ours, ours0) = (find(NetSetup::Ours(top)), find(NetSetup::Ours(0)));
    let (u32, u320) = (find(NetSetup::U32(top)), find(NetSetup::U32(0)));
    let all_loaded = ours.loaded == top;
    let ours_ratio = ours.gbps() / ours0.gbps();
    let u32_ratio = u32.gbps() / u320.gbps();
    let verdict = if all_loaded {
        met(ours_ratio >= NET_GOAL)
    } else {
        format!(
            "NO: only {} rules fit (at {}: {})",
            fmt_count(ours.loaded as f64),
            fmt_count(ours.loaded as f64),
            if ours_ratio >= NET_GOAL { "≥ goal" } else { "below goal" }
        )
    };
    let shortfall = if all_loaded { String::new() } else { format!(" ({} loaded)", fmt_count(ours.loaded as f64)) };
    let mut table = Table::verdicts();
    let (olo, ohi) = ours.paired_range(ours0);
    let (ulo, uhi) = u32.paired_range(u320);
    table.row([
        format!("bulk at {} rules ÷ own 0 rules", fmt_count(top as f64)),
        format!("{ours_ratio:.3}× [{olo:.2}–{ohi:.2}]{shortfall}"),
        format!("{u32_ratio:.3}× [{ulo:.2}–{uhi:.2}] (u32)"),
        fmt_ratio(ours.gbps() / u32.gbps()),
        format!("ours ≥ {NET_GOAL}×"),
        verdict,
    ]);
    table.row([
        format!("bulk at {} rules ÷ bare veth", fmt_count(top as f64)),
        format!("{:.3}×", ours.gbps() / bare.gbps()),
        format!("{:.3}× (u32)", u32.gbps() / bare.gbps()),
        fmt_ratio(ours.gbps() / u32.gbps()),
        "(reported)".into(),
        "—".into(),
    ]);
    let pick_p50: fn(Percentiles) -> Duration = |p| p.p50;
    let pick_p99: fn(Percentiles) -> Duration = |p| p.p99;
    for (name, pick) in [("p50", pick_p50), ("p99", pick_p99)] {
        let (o, o0, u, u0) = (pick(ours.rtt()), pick(ours0.rtt()), pick(u32.rtt()), pick(u320.rtt()));
        table.row([
            format!("RTT {name} at {} rules (÷ own 0 rules)", fmt_count(top as f64)),
            format!("{} ({:.3}×)", fmt_dur(o), o.as_secs_f64() / o0.as_secs_f64()),
            format!("{} ({:.3}×)", fmt_dur(u), u.as_secs_f64() / u0.as_secs_f64()),
            fmt_ratio(u.as_secs_f64() / o.as_secs_f64()),
            "(reported)".into(),
            "—".into(),
        ]);
    }
    table.print();
}
