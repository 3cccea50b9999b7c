//! The scenarios that are not a delay comparison: the baseline, loss (UDP, TCP, behind device stacks), the mutant
//! self-checks and the agent's lifecycle (kill -9, restart, leftovers).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use chaos_test_support::{eventually, proc_stat};
use chaos_tests::{
    measure::{LossProbe, RttProbe, Stats, in_netns, tcp_rtt, udp_loss, udp_loss_from},
    mutant::Mutant,
};

use crate::{
    compare::{OURS, RAW, RawLeg, RawNetem, echo, lo_leg, probe},
    fixture::GuestAgent,
    kernel::{AgentObjects, Stack},
    *,
};

/// Runs the check a mutant must break, with the agent's requests made wrong that way; passes when the check
/// failed (the tier caught the wrong agent).
pub(crate) fn mutant_caught(agent: &GuestAgent, mutant: Mutant) -> Result<Outcome> {
    match mutant {
        Mutant::WrongPort | Mutant::DoubleDelay => {
            let comparison = crate::cases::delay_10ms_v4();
            let rows = comparison.run(agent, ROUNDS, false)?;
            let (_, verdict) = rows.into_iter().find(|(n, _)| n.starts_with("agent-")).context("no agent row")?;
            let mut values = vec![("judged", if verdict.passed { "pass" } else { "fail" }.to_string())];
            values.extend(verdict.values.into_iter().filter(|(k, _)| {
                ["extra_ms", "raw_extra_ms", "diff_ms", "tol_ms", "other_extra_ms", "other_limit_ms"].contains(k)
            }));
            Ok(Outcome { passed: !verdict.passed, values })
        }
        Mutant::NoExpiry => {
            let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let base = Stats::of(&tcp_rtt(SocketAddr::new(v4, PORT_FAULTED), probe(10))?).median_ms;
            let lifetime = format!("{}", MUTANT_EXPIRY_LIFETIME.as_secs());
            let id =
                agent.inject_lifetime(&["latency", "--port", &PORT_FAULTED.to_string(), "latency=0.1"], &lifetime)?;
            let applied = Instant::now();
            thread::sleep((applied + MUTANT_EXPIRY_LIFETIME + EXPIRY_MARGIN).saturating_duration_since(Instant::now()));
            let after = Stats::of(&tcp_rtt(SocketAddr::new(v4, PORT_FAULTED), probe(10))?).median_ms;
            let gone = delay_gone(after - base, 100.0);
            let reverted = agent.revert(&id);
            Ok(Outcome {
                passed: !gone && reverted.is_ok(),
                values: vec![
                    ("judged", if gone { "pass" } else { "fail" }.into()),
                    ("after_expiry_extra_ms", ms(after - base)),
                    ("gone_below_ms", ms(100.0 * GONE_FRACTION)),
                ],
            })
        }
        Mutant::None => bail!("not a mutant"),
    }
}

/// The expiry checks' verdict: the delay that remains is less than a quarter of the delay the fault had.
pub(crate) fn delay_gone(extra_ms: f64, want_ms: f64) -> bool {
    extra_ms < want_ms * GONE_FRACTION
}

/// What one bulk transfer from the caller's namespace to the TCP sink cost the sender, from its `TCP_INFO`.
#[derive(Clone, Copy, Default)]
pub(crate) struct Transfer {
    pub(crate) segs_out: u64,
    pub(crate) retrans: u64,
}

/// Sends [`TCP_LOSS_BYTES`] from the caller's namespace to the sink and waits until the sink has read them all
/// (it closes after the sender's FIN); the sender's segment and retransmission counts.
pub(crate) fn tcp_transfer() -> Result<Transfer> {
    use std::io::{Read as _, Write as _};
    let ns = Path::new("/run/netns").join(NETNS);
    let target = SocketAddr::new(IpAddr::V4(SRV_V4), PORT_TCP_LOSS);
    in_netns(&ns, || -> Result<Transfer> {
        let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
        conn.set_write_timeout(Some(Duration::from_secs(60)))?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        let chunk = vec![0x5a_u8; 64 << 10];
        let mut left = TCP_LOSS_BYTES;
        while left > 0 {
            let n = left.min(chunk.len());
            conn.write_all(&chunk[..n])?;
            left -= n;
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut rest = [0u8; 16];
        ensure!(conn.read(&mut rest)? == 0, "the sink answered");
        // SAFETY: a zeroed tcp_info is valid; getsockopt writes at most `len` bytes into it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&conn),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &raw mut len,
            )
        };
        ensure!(rc == 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        Ok(Transfer { segs_out: u64::from(info.tcpi_segs_out), retrans: u64::from(info.tcpi_total_retrans) })
    })
    .with_context(|| format!("entering {}", ns.display()))?
    .with_context(|| format!("sending {TCP_LOSS_BYTES} bytes from {NETNS} to {target}"))
}

/// TCP loss from the remote caller, raw netem `loss 10%` on its veth and the agent's `loss=10` interleaved: the
/// classifier drops 10 % of the wire segments (its counters are in segments) and the sender retransmits about as
/// much as through raw netem, which also decides per (segmentation-offloaded) packet.
pub(crate) fn tcp_loss_comparison(agent: &GuestAgent) -> (Result<Outcome>, Result<Outcome>) {
    let legs = [RawLeg {
        netns: Some(NETNS),
        dev: VETH_CLI,
        class: "32",
        netem: vec!["loss", "10%"],
        matches: vec![("dport", PORT_TCP_LOSS)],
    }];
    let (raw_total, ours_total, packets, drops) = match tcp_loss_rounds(agent, &legs) {
        Ok(totals) => totals,
        Err(err) => return (Err(anyhow::anyhow!("{err:#}")), Err(err)),
    };
    let share = |t: &Transfer| 100.0 * t.retrans as f64 / t.segs_out.max(1) as f64;
    let (raw_share, ours_share) = (share(&raw_total), share(&ours_total));
    let drop_pct = 100.0 * drops as f64 / packets.max(1) as f64;
    let ratio = ours_share / raw_share.max(0.01);
    let raw = Outcome {
        // netem dropped something: the comparison means something.
        passed: raw_total.retrans > 0,
        values: vec![
            ("retrans_pct", ms(raw_share)),
            ("segs_out", raw_total.segs_out.to_string()),
            ("retrans", raw_total.retrans.to_string()),
            ("want_pct", ms(TCP_LOSS_PCT)),
        ],
    };
    let ours = Outcome {
        passed: raw_total.retrans > 0
            && (drop_pct - TCP_LOSS_PCT).abs() <= TCP_LOSS_TOLERANCE_PCT
            && (0.5..=2.0).contains(&ratio),
        values: vec![
            ("retrans_pct", ms(ours_share)),
            ("segs_out", ours_total.segs_out.to_string()),
            ("retrans", ours_total.retrans.to_string()),
            ("want_pct", ms(TCP_LOSS_PCT)),
            ("classifier_packets", packets.to_string()),
            ("classifier_drops", drops.to_string()),
            ("classifier_drop_pct", ms(drop_pct)),
            ("raw_retrans_pct", ms(raw_share)),
            ("retrans_ratio", ms(ratio)),
        ],
    };
    (Ok(raw), Ok(ours))
}

/// [`TCP_LOSS_ROUNDS`] rounds of one transfer through raw netem and one through the agent, in alternating order;
/// the totals (raw, ours) and the classifier's packets and drops.
fn tcp_loss_rounds(agent: &GuestAgent, legs: &[RawLeg]) -> Result<(Transfer, Transfer, u64, u64)> {
    let mut raw_total = Transfer::default();
    let mut ours_total = Transfer::default();
    let (mut packets, mut drops) = (0u64, 0u64);
    let raw = RawNetem::install(legs)?;
    for round in 0..TCP_LOSS_ROUNDS {
        for condition in if round % 2 == 0 { [RAW, OURS] } else { [OURS, RAW] } {
            if condition == RAW {
                raw.on()?;
                let t = tcp_transfer();
                raw.off()?;
                let t = t?;
                raw_total.segs_out += t.segs_out;
                raw_total.retrans += t.retrans;
            } else {
                let id = agent.rpc_fault(
                    &["inject", "loss", "--port", "5004", &format!("loss={TCP_LOSS_PCT}")],
                    FAULT_LIFETIME_S,
                )?;
                let t = tcp_transfer();
                let counters = agent.counters(&id);
                agent.rpc_revert(&id)?;
                let t = t?;
                let (p, d) = counters.context("no counters for the loss fault")?;
                packets += p;
                drops += d;
                ours_total.segs_out += t.segs_out;
                ours_total.retrans += t.retrans;
            }
        }
    }
    Ok((raw_total, ours_total, packets, drops))
}

/// UDP loss from a caller behind a VLAN or a bond: 30 % of the datagrams, and each counted once by the classifier
/// (a packet judged at the VLAN device and its parent, or at the bond and its slave, would count twice and be
/// dropped at a higher rate).
pub(crate) fn stack_loss(agent: &GuestAgent, stack: &Stack) -> Result<Outcome> {
    let id =
        agent.inject(&["loss", "--port", &PORT_STACK_LOSS.to_string(), &format!("loss={LOSS_PCT}"), "protocol=udp"])?;
    thread::sleep(SETTLE);
    let ns = Path::new("/run/netns").join(stack.netns);
    let target = SocketAddr::new(IpAddr::V4(stack.host), PORT_STACK_LOSS);
    let report = udp_loss_from(Some(&ns), target, LossProbe::default()).with_context(|| format!("UDP to {target}"));
    let counters = agent.counters(&id);
    agent.revert(&id)?;
    let report = report?;
    let (packets, drops) = counters.unwrap_or_default();
    let measured = report.loss_pct();
    Ok(Outcome {
        passed: (measured - LOSS_PCT).abs() <= LOSS_TOLERANCE_PCT && packets == u64::from(report.sent),
        values: vec![
            ("loss_pct", ms(measured)),
            ("want_pct", ms(LOSS_PCT)),
            ("sent", report.sent.to_string()),
            ("received", report.received.to_string()),
            ("classifier_packets", packets.to_string()),
            ("classifier_drops", drops.to_string()),
            ("device", stack.top.to_owned()),
        ],
    })
}

/// Loopback RTT to A and B, v4 and v6, before anything is installed: a guest too slow to measure a 10 ms delay
/// fails here.
pub(crate) fn baseline() -> Result<Outcome> {
    let (v4, v6) = (IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST));
    let mut values = Vec::new();
    let mut worst: f64 = 0.0;
    for (ip, a_key, b_key) in [(v4, "v4_a_ms", "v4_b_ms"), (v6, "v6_a_ms", "v6_b_ms")] {
        let a = Stats::of(&echo(ip, PORT_FAULTED).sample(30)?);
        let b = Stats::of(&echo(ip, PORT_CONTROL).sample(30)?);
        worst = worst.max(a.median_ms).max(b.median_ms);
        values.push((a_key, ms(a.median_ms)));
        values.push((b_key, ms(b.median_ms)));
    }
    // Timer accuracy of this guest: how long a 10 ms sleep really takes (TCG stretches it).
    values.push(("sleep_10ms_ms", ms(sleep_stats(Duration::from_millis(10)).median_ms)));
    values.push(("max_ms", ms(BASELINE_MAX_MS)));
    Ok(Outcome { passed: worst < BASELINE_MAX_MS, values })
}

/// How long `thread::sleep(wanted)` takes, over 20 sleeps.
pub(crate) fn sleep_stats(wanted: Duration) -> Stats {
    let samples: Vec<Duration> = (0..20)
        .map(|_| {
            let started = Instant::now();
            thread::sleep(wanted);
            started.elapsed()
        })
        .collect();
    Stats::of(&samples)
}

/// UDP loss to A (B as control) through raw netem `loss 30%`, then through the agent (with its classifier's
/// counters). Loss does not depend on the host's speed: both are checked against the requested rate.
pub(crate) fn loss_comparison(agent: &GuestAgent) -> (Result<Outcome>, Result<Outcome>) {
    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let legs = [lo_leg("30", vec!["loss", "30%"], vec![("dport", PORT_FAULTED)])];
    let raw = (|| {
        let raw = RawNetem::install(&legs)?;
        raw.on()?;
        let outcome = loss_outcome(v4, None);
        raw.off()?;
        outcome
    })();
    let ours = (|| {
        let id = agent.inject(&[
            "loss",
            "--port",
            &PORT_FAULTED.to_string(),
            &format!("loss={LOSS_PCT}"),
            "protocol=udp",
        ])?;
        thread::sleep(SETTLE);
        let outcome = loss_outcome(v4, Some((agent, &id)));
        agent.revert(&id)?;
        outcome
    })();
    (raw, ours)
}

/// UDP loss to A (B as control); with an agent fault, its classifier's counters too.
pub(crate) fn loss_outcome(ip: IpAddr, fault: Option<(&GuestAgent, &str)>) -> Result<Outcome> {
    let probe = LossProbe::default();
    let faulted = udp_loss(SocketAddr::new(ip, PORT_FAULTED), probe).context("UDP probe to the faulted port")?;
    let control = udp_loss(SocketAddr::new(ip, PORT_CONTROL), probe).context("UDP probe to the control port")?;
    let measured = faulted.loss_pct();
    let mut values = vec![
        ("loss_pct", ms(measured)),
        ("want_pct", ms(LOSS_PCT)),
        ("sent", faulted.sent.to_string()),
        ("received", faulted.received.to_string()),
        ("other_loss_pct", ms(control.loss_pct())),
    ];
    if let Some((agent, id)) = fault {
        let counters = agent.counters(id).unwrap_or_default();
        values.push(("classifier_packets", counters.0.to_string()));
        values.push(("classifier_drops", counters.1.to_string()));
    }
    Ok(Outcome {
        passed: (measured - LOSS_PCT).abs() <= LOSS_TOLERANCE_PCT && control.loss_pct() <= CONTROL_LOSS_MAX_PCT,
        values,
    })
}

/// A 5 s fault, the agent SIGKILLed: the delay must still be there at once and be gone after the 5 s although the
/// filters, IFB and rules are all still in the kernel — the classifier ignores expired rules. To tell that apart
/// from the guardian's cleanup (it wakes when the last fault expires), the guardian is SIGSTOPped before the kill
/// and only resumed (SIGCONT) after the post-expiry measurement; its cleanup is then observed (reported, not
/// required: the acceptance is the restart's).
pub(crate) fn kill9_expiry(agent: &mut GuestAgent) -> Result<Outcome> {
    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let base = Stats::of(&tcp_rtt(SocketAddr::new(v4, PORT_FAULTED), probe(10))?).median_ms;
    let guardian = agent.guardian_pid();
    let requested = Instant::now();
    let lifetime = format!("{}", KILL_FAULT_LIFETIME.as_secs());
    // From this process, not through a CLI process: a debug CLI under TCG on a busy host took up to 7.8 s to start,
    // and the delay must be measured within the 5 s lifetime counted from `requested` (the earliest the agent can
    // have applied it).
    let port = PORT_FAULTED.to_string();
    let _id = agent.rpc_fault(&["inject", "latency", "--port", &port, "latency=0.1"], &lifetime)?;
    let applied = Instant::now();
    if let Some(pid) = guardian {
        println!("+ kill -STOP {pid} (guardian)");
        // SAFETY: a pid read from the agent's state directory whose command line is the guardian's.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    agent.kill9();
    let killed_after = requested.elapsed();
    let quick = RttProbe { samples: 5, warmup: 1, ..RttProbe::default() };
    let right_after = Stats::of(&tcp_rtt(SocketAddr::new(v4, PORT_FAULTED), quick)?);
    let measured_after = requested.elapsed();
    let objects_after_kill = AgentObjects::now();
    // The rule expires KILL_FAULT_LIFETIME after the agent applied it (between `requested` and `applied`).
    let expiry = applied + KILL_FAULT_LIFETIME + EXPIRY_MARGIN;
    thread::sleep(expiry.saturating_duration_since(Instant::now()));
    let expired = Stats::of(&tcp_rtt(SocketAddr::new(v4, PORT_FAULTED), probe(20))?);
    let objects_at_expiry = AgentObjects::now();
    let cleaned_in = guardian.and_then(|pid| {
        println!("+ kill -CONT {pid} (guardian)");
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let resumed = Instant::now();
        let cleaned =
            eventually("the guardian to remove our objects", GUARDIAN_WAIT, POLL, || AgentObjects::now().is_empty());
        cleaned.ok().map(|()| resumed.elapsed())
    });
    let extra_after_kill = right_after.median_ms - base;
    let extra_expired = expired.median_ms - base;
    let still_delayed = extra_after_kill >= 100.0 * STILL_FRACTION;
    let measured_in_time = measured_after < KILL_FAULT_LIFETIME;
    // The expiry is the classifier's own only if our objects were still there when the delay was gone.
    let in_kernel = !objects_at_expiry.filters.is_empty() && objects_at_expiry.ifb;
    let gone = delay_gone(extra_expired, 100.0);
    Ok(Outcome {
        passed: still_delayed && measured_in_time && in_kernel && gone,
        values: vec![
            ("after_kill_ms", ms(right_after.median_ms)),
            ("after_kill_extra_ms", ms(extra_after_kill)),
            ("killed_at_s", format!("{:.2}", killed_after.as_secs_f64())),
            ("measured_by_s", format!("{:.2}", measured_after.as_secs_f64())),
            ("objects_after_kill", objects_after_kill.summary()),
            ("after_expiry_ms", ms(expired.median_ms)),
            ("after_expiry_extra_ms", ms(extra_expired)),
            ("objects_at_expiry", objects_at_expiry.summary()),
            ("base_ms", ms(base)),
            ("guardian", guardian.map_or_else(|| "none".into(), |p| p.to_string())),
            (
                "guardian_cleaned_after_cont_s",
                match (guardian, cleaned_in) {
                    (None, _) => "-".into(),
                    (Some(_), None) => format!("not_within_{}s", GUARDIAN_WAIT.as_secs()),
                    (Some(_), Some(d)) => format!("{:.2}", d.as_secs_f64()),
                },
            ),
        ],
    })
}

/// Right after a restart: none of the dead run's filters, IFB or clsact (the new agent attaches only with its first
/// fault; its own fresh pins are counted, not leftovers).
pub(crate) fn restart_clean() -> Result<Outcome> {
    let objects = AgentObjects::now();
    Ok(Outcome {
        passed: objects.filters.is_empty() && !objects.ifb && objects.clsact.is_empty(),
        values: vec![("objects", objects.summary()), ("own_pins", objects.pins.to_string())],
    })
}

/// A fault, then the agent AND its guardian SIGKILLed: everything of ours stays in the kernel. A restart must remove
/// it all and the delay with it, long before the fault's lifetime ends.
pub(crate) fn restart_with_leftovers(agent: &mut GuestAgent) -> Result<Outcome> {
    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let base = Stats::of(&tcp_rtt(SocketAddr::new(v4, PORT_FAULTED), probe(10))?).median_ms;
    let _id = agent.inject(&["latency", "--port", &PORT_FAULTED.to_string(), "latency=0.1"])?;
    let guardian = agent.guardian_pid();
    agent.kill9();
    if let Some(pid) = guardian {
        // SAFETY: signalling a pid we read from the agent's state directory and checked to be the guardian.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = eventually("the guardian to die", Duration::from_secs(5), POLL, || !proc_stat::alive(pid));
    }
    let quick = RttProbe { samples: 3, warmup: 1, ..RttProbe::default() };
    let leftover_delay = Stats::of(&tcp_rtt(SocketAddr::new(v4, PORT_FAULTED), quick)?).median_ms;
    let leftovers = AgentObjects::now();
    agent.restart()?;
    let after = AgentObjects::now();
    let restored = Stats::of(&tcp_rtt(SocketAddr::new(v4, PORT_FAULTED), probe(20))?).median_ms;
    let meaningful = !leftovers.filters.is_empty() && leftovers.ifb && leftovers.pins > 0;
    let clean = after.filters.is_empty() && !after.ifb && after.clsact.is_empty();
    let delay_gone = delay_gone(restored - base, 100.0);
    Ok(Outcome {
        passed: guardian.is_some() && meaningful && clean && delay_gone,
        values: vec![
            ("guardian_killed", u8::from(guardian.is_some()).to_string()),
            ("leftovers", leftovers.summary()),
            ("leftover_delay_ms", ms(leftover_delay)),
            ("after_restart", after.summary()),
            ("own_pins", after.pins.to_string()),
            ("after_restart_ms", ms(restored)),
            ("base_ms", ms(base)),
        ],
    })
}
