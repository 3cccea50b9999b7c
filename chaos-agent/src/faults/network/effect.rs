//! Measuring what a network fault does: TCP handshakes to each faulted port through the path a local caller's
//! packets take, interleaved with handshakes to an unfaulted port on the same address (the baseline), while the
//! fault is in place.
//!
//! ```text
//!  round k (every SPACING)     connect(addr:port)           ── SYN ─▶ lo egress (classifier: rule of the fault)
//!                              connect(addr:baseline_port)  ── SYN ─▶ lo egress (classifier: no rule)
//!  after the rounds            counters(rule) − counters before  ≥  faulted handshakes?
//!  verdict                     loss  = unanswered faulted handshakes / faulted handshakes
//!                              delay = median(faulted) − median(baseline)
//! ```
//!
//! # Why it is judged this way
//! - **The baseline is the same handshake on the same path at the same time.** The baseline port is a socket the
//!   probe itself listens on, on the same address (it never accepts: the kernel completes the handshake in its
//!   backlog): its SYN, SYN-ACK and ACK leave through the same device and hooks as the faulted port's, without a
//!   rule, and are sent in the same instant, so a busy host, a slow scheduler or a virtual machine's clock slow
//!   both alike. The added delay is a difference of medians, judged against half the delay
//!   the fault asks for, never against a fixed number of milliseconds.
//! - **A lost packet is one TCP itself would resend.** A handshake unanswered [`ANSWER_WINDOW`] after the delay
//!   the fault adds lost its SYN or its SYN-ACK: the window ends before Linux's first SYN retransmission
//!   (`TCP_TIMEOUT_INIT`, 1 s, RFC 6298 §2.1), so a retransmitted SYN never turns a loss into a slow answer.
//! - **The rule's own counter must move.** Every faulted handshake crosses the rule with at least one packet (the
//!   SYN for `to`, the SYN-ACK for `from`), so a counter that moved by less than the number of handshakes proves
//!   the classifier did not see them, whatever the timings say. The probes' packets are counted like any other:
//!   the observation reports them beside the counter's movement (`probe_packets`, `matched_packets`).
//! - **Random loss is judged only where chance cannot fake it**: zero losses among `n` handshakes is a warning
//!   only when a fault of that loss would show none with a probability below [`CHANCE`].
//!
//! The probes complete real handshakes with the service (the kernel answers them; the service may accept and
//! then sees the connection reset at once, without data). Only local callers' path is probed (loopback): remote
//! callers' packets enter through other interfaces, whose rules the counters still show.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use chaos_api::reply::{Observation, PortObservation, Verdict};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Rounds of handshakes (one to each faulted port and one to its baseline per round).
pub const ROUNDS: u32 = 8;
/// Time between rounds.
pub const SPACING: Duration = Duration::from_millis(20);
/// How long a handshake may take beyond the delay the fault adds before it counts as lost: below Linux's initial
/// SYN retransmission timeout (1 s).
pub const ANSWER_WINDOW: Duration = Duration::from_millis(900);
/// Largest delay per handshake that is verified (probing holds sockets for that long).
pub const MAX_EXPECTED_DELAY: Duration = Duration::from_secs(10);
/// A random loss fault that shows no loss at all is reported only when that happens by chance less often than
/// this.
pub const CHANCE: f64 = 0.01;

/// One faulted port to probe and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbeTarget {
    /// The address its listener takes connections on.
    pub addr: IpAddr,
    /// The port.
    pub port: u16,
}

/// What the fault should do to a handshake.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Expectation {
    /// Delay added to a handshake (the fault's delay once per direction the handshake's packets cross it).
    pub delay: Duration,
    /// Jitter over a handshake (bounds the wait only).
    pub jitter: Duration,
    /// Loss, percent (100 for a blackhole).
    pub loss_percent: f64,
}

impl Expectation {
    /// How long one handshake is waited for.
    pub fn timeout(&self) -> Duration {
        self.delay + self.jitter + ANSWER_WINDOW
    }

    /// How long the probes of one fault take at most.
    pub fn window(&self) -> Duration {
        SPACING * ROUNDS + self.timeout()
    }
}

/// The handshakes of one faulted port: `None` = not answered in time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PortSamples {
    /// The port and address.
    pub target: Option<ProbeTarget>,
    /// The unfaulted port the baseline went to.
    pub baseline_port: u16,
    /// Faulted handshakes.
    pub faulted: Vec<Option<Duration>>,
    /// Baseline handshakes.
    pub baseline: Vec<Option<Duration>>,
    /// Faulted handshakes that were refused: the listener went away.
    pub refused: u32,
}

/// The address a probe of a listener bound to `addr` connects to: itself, or loopback for wildcard listeners.
pub fn probe_addr(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

enum Outcome {
    Answered(Duration),
    Refused,
    Lost,
}

async fn handshake(to: SocketAddr, timeout: Duration) -> Outcome {
    let start = Instant::now();
    match tokio::time::timeout(timeout, TcpStream::connect(to)).await {
        Ok(Ok(stream)) => {
            let took = start.elapsed();
            // Reset instead of a FIN exchange: the service sees the connection end at once.
            let _ = stream.set_zero_linger();
            drop(stream);
            Outcome::Answered(took)
        }
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        Ok(Err(_)) | Err(_) => Outcome::Lost,
    }
}

/// A listener of the probe's own on `addr`, which never accepts (the kernel completes handshakes into its backlog,
/// room for every round): the baseline's destination.
fn baseline_socket(addr: IpAddr) -> std::io::Result<(TcpListener, u16)> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(addr, 0))?;
    let listener = socket.listen(2 * ROUNDS)?;
    let port = listener.local_addr()?.port();
    Ok((listener, port))
}

/// Runs the rounds against every target at once; bounded by [`Expectation::window`].
///
/// # Errors
/// When no baseline socket can be bound on a target's address.
pub async fn probe(targets: &[ProbeTarget], expect: &Expectation) -> std::io::Result<Vec<PortSamples>> {
    let timeout = expect.timeout();
    let mut held = Vec::new();
    let mut out = Vec::new();
    for &target in targets {
        let (socket, baseline_port) = baseline_socket(target.addr)?;
        held.push(socket);
        out.push(PortSamples { target: Some(target), baseline_port, ..Default::default() });
    }
    // One task per round and port: a lost handshake holds up nothing else. Dropping the set (the fault ended, the
    // agent stops) aborts them all.
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..ROUNDS {
        for (index, samples) in out.iter().enumerate() {
            let Some(t) = samples.target else { continue };
            let (faulted, baseline) = (SocketAddr::new(t.addr, t.port), SocketAddr::new(t.addr, samples.baseline_port));
            tasks.spawn(async move {
                tokio::time::sleep(SPACING * round).await;
                // Whichever connect is issued first is timed across the other's syscall too: alternate the order so
                // neither side carries that cost in every round.
                let pair = if round % 2 == 0 {
                    tokio::join!(handshake(faulted, timeout), handshake(baseline, timeout))
                } else {
                    let (b, f) = tokio::join!(handshake(baseline, timeout), handshake(faulted, timeout));
                    (f, b)
                };
                (index, pair)
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        let Ok((index, (faulted, baseline))) = done else { continue };
        let samples = &mut out[index];
        match faulted {
            Outcome::Answered(t) => samples.faulted.push(Some(t)),
            Outcome::Refused => samples.refused += 1,
            Outcome::Lost => samples.faulted.push(None),
        }
        samples.baseline.push(match baseline {
            Outcome::Answered(t) => Some(t),
            Outcome::Refused | Outcome::Lost => None,
        });
    }
    drop(held);
    Ok(out)
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2 })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Judges the samples: `matched` is how far the rule's packet counter moved while the probes ran.
pub fn judge(expect: &Expectation, samples: &[PortSamples], matched: u64) -> Observation {
    let faulted: Vec<Option<Duration>> = samples.iter().flat_map(|s| s.faulted.iter().copied()).collect();
    let probes = faulted.len() as u32;
    let answered: Vec<Duration> = faulted.iter().flatten().copied().collect();
    let baseline: Vec<Duration> = samples.iter().flat_map(|s| s.baseline.iter().flatten().copied()).collect();
    let baseline_sent: usize = samples.iter().map(|s| s.baseline.len()).sum();
    let refused: u32 = samples.iter().map(|s| s.refused).sum();
    let loss = (probes > 0).then(|| 100.0 * f64::from(probes - answered.len() as u32) / f64::from(probes));
    let added = match (median(answered.clone()), median(baseline.clone())) {
        (Some(f), Some(b)) => Some(f.as_secs_f64() - b.as_secs_f64()),
        _ => None,
    };
    let ports = samples
        .iter()
        .filter_map(|s| {
            let t = s.target?;
            Some(PortObservation {
                port: t.port,
                addr: t.addr.to_string(),
                baseline_port: s.baseline_port,
                probes: s.faulted.len() as u32,
                answered: s.faulted.iter().flatten().count() as u32,
                median_ms: median(s.faulted.iter().flatten().copied().collect()).map(ms),
                baseline_median_ms: median(s.baseline.iter().flatten().copied().collect()).map(ms),
            })
        })
        .collect();
    let mut obs = Observation {
        verdict: Verdict::Observed,
        added_delay_ms: added.map(|a| (a * 1e6).round() / 1e3),
        loss_percent: loss.map(|l| (l * 10.0).round() / 10.0),
        expected_delay_ms: (!expect.delay.is_zero()).then(|| ms(expect.delay)),
        expected_loss_percent: (expect.loss_percent > 0.0).then_some(expect.loss_percent),
        probes,
        matched_packets: matched,
        probe_packets: u64::from(probes),
        ports,
        summary: String::new(),
    };
    let seen = format!(
        "{} of {probes} probe handshakes answered, {} added delay; the rule matched {matched} packets",
        answered.len(),
        added.map_or("no".to_owned(), |a| format!("{:+.3} ms", a * 1e3))
    );
    let (verdict, why) = if refused > 0 {
        (Verdict::NotMeasured, format!("{refused} probe handshakes were refused: the listener went away while probing"))
    } else if baseline.len() * 2 < baseline_sent {
        (
            Verdict::NotMeasured,
            format!(
                "only {} of {baseline_sent} baseline handshakes on the unfaulted path were answered: nothing to \
                 compare with",
                baseline.len()
            ),
        )
    } else if matched < u64::from(probes) {
        (
            Verdict::NotObserved,
            format!(
                "the rule matched {matched} packets while {probes} probe handshakes crossed it: the classifier does \
                 not see this path's packets (is its filter still on the device?); {seen}"
            ),
        )
    } else if expect.loss_percent >= 100.0 && !answered.is_empty() {
        (Verdict::NotObserved, format!("everything should be dropped, yet {seen}"))
    } else if expect.loss_percent > 0.0
        && expect.loss_percent < 100.0
        && answered.len() == faulted.len()
        && (1.0 - expect.loss_percent / 100.0).powf(f64::from(probes)) < CHANCE
    {
        (
            Verdict::NotObserved,
            format!("{} % loss should have dropped some probe handshakes, yet {seen}", expect.loss_percent),
        )
    } else if !expect.delay.is_zero()
        && ((answered.is_empty() && expect.loss_percent < 100.0)
            || added.is_some_and(|a| a < expect.delay.as_secs_f64() / 2.0))
    {
        (Verdict::NotObserved, format!("{:.3} ms added delay was expected, yet {seen}", ms(expect.delay)))
    } else {
        (Verdict::Observed, seen)
    };
    obs.verdict = verdict;
    obs.summary = why;
    obs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(faulted: &[Option<u64>], baseline: &[Option<u64>]) -> PortSamples {
        let d = |v: &[Option<u64>]| v.iter().map(|x| x.map(Duration::from_micros)).collect();
        PortSamples {
            target: Some(ProbeTarget { addr: IpAddr::V4(Ipv4Addr::LOCALHOST), port: 7000 }),
            baseline_port: 40000,
            faulted: d(faulted),
            baseline: d(baseline),
            refused: 0,
        }
    }

    fn all(n: usize, v: Option<u64>) -> Vec<Option<u64>> {
        vec![v; n]
    }

    #[test]
    fn a_blackhole_is_seen_only_when_every_handshake_is_lost_and_the_rule_counted_them() {
        let expect = Expectation { loss_percent: 100.0, ..Default::default() };
        let lost = port(&all(8, None), &all(8, Some(40)));
        let obs = judge(&expect, std::slice::from_ref(&lost), 8);
        assert_eq!(obs.verdict, Verdict::Observed, "{obs:?}");
        assert_eq!(obs.loss_percent, Some(100.0));
        // The rule did not count the probes: whatever dropped them, it was not this fault.
        assert_eq!(judge(&expect, &[lost], 3).verdict, Verdict::NotObserved);
        // Handshakes answered through a blackhole.
        let through = judge(&expect, &[port(&all(8, Some(50)), &all(8, Some(40)))], 8);
        assert_eq!(through.verdict, Verdict::NotObserved, "{through:?}");
        assert_eq!(through.loss_percent, Some(0.0));
    }

    #[test]
    fn added_delay_is_judged_against_the_baseline_of_the_same_rounds() {
        let expect = Expectation { delay: Duration::from_millis(100), ..Default::default() };
        // A slow host: the baseline is slow too; the difference is what the fault added.
        let slow = port(&all(8, Some(150_000)), &all(8, Some(48_000)));
        let obs = judge(&expect, &[slow], 16);
        assert_eq!(obs.verdict, Verdict::Observed, "{obs:?}");
        assert_eq!(obs.added_delay_ms, Some(102.0));
        // As slow as the baseline: no delay was added.
        let none = judge(&expect, &[port(&all(8, Some(30_000)), &all(8, Some(29_000)))], 16);
        assert_eq!(none.verdict, Verdict::NotObserved, "{none:?}");
        assert!(none.summary.contains("added delay was expected"), "{}", none.summary);
    }

    #[test]
    fn random_loss_without_losses_is_a_warning_only_when_chance_cannot_explain_it() {
        let fine = port(&all(8, Some(40)), &all(8, Some(40)));
        // 30 %: 0.7^8 = 5.8 % of runs show no loss at all.
        let low = Expectation { loss_percent: 30.0, ..Default::default() };
        assert_eq!(judge(&low, std::slice::from_ref(&fine), 8).verdict, Verdict::Observed);
        // 60 %: 0.4^8 = 0.07 %.
        let high = Expectation { loss_percent: 60.0, ..Default::default() };
        assert_eq!(judge(&high, &[fine], 8).verdict, Verdict::NotObserved);
    }

    #[test]
    fn a_silent_baseline_or_a_vanished_listener_is_not_a_measurement() {
        let expect = Expectation { loss_percent: 100.0, ..Default::default() };
        let dark = judge(&expect, &[port(&all(8, None), &all(8, None))], 8);
        assert_eq!(dark.verdict, Verdict::NotMeasured, "{dark:?}");
        let mut gone = port(&all(4, None), &all(8, Some(40)));
        gone.refused = 4;
        assert_eq!(judge(&expect, &[gone], 8).verdict, Verdict::NotMeasured);
    }

    #[test]
    fn wildcard_listeners_are_probed_on_loopback() {
        assert_eq!(probe_addr("0.0.0.0".parse().unwrap()), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(probe_addr("::".parse().unwrap()), IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(probe_addr("::ffff:10.0.0.5".parse().unwrap()), "10.0.0.5".parse::<IpAddr>().unwrap());
    }
}
