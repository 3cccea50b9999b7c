//! `chaos-vm-guest`: the scenarios that run INSIDE the qemu guest (as its `/init` command; see `chaos_tests::vm`).
//!
//! For now the baseline: faults applied with raw `tc` the way other chaos tools do it (prio root qdisc, `netem` on
//! band 3, a u32 filter on the destination port), measured with `chaos_tests::measure`. These numbers are what the
//! agent's own scenarios will be compared against, in the same boot.
//!
//! # Layout
//! ```text
//! echo servers: 127.0.0.1:5001 (faulted)  127.0.0.1:5000 (control)  [::1]:5001  [::1]:5000
//! baseline                     RTT to both ports, no qdisc
//! tc-delay-100ms-v4            prio + netem delay 100ms on 1:3 + u32 ip dport 5001 → 5001 ≈ base + 100, 5000 ≈ base
//! tc-delay-10ms-v4             same, 10 ms
//! tc-delay-100ms-v6            same over ::1 (u32 ip6 dport)
//! tc-loss-30pct-udp            netem loss 30% on 1:3 + u32 ip dport 5001, 2000 UDP datagrams → loss ≈ 30 %,
//!                              port 5000 ≈ 0 %
//! ```
//! Everything here runs pinned to vCPU 0 (accuracy under TCG, see `PROBE_CPU`).
//! Each scenario prints `RESULT <name> <pass|fail> key=value …` and removes its root qdisc before the next one.
//!
//! On loopback every packet, in both directions, leaves through `lo` egress: a filter on the destination port
//! delays the requests only (replies go to the client's ephemeral port), so the round trip grows by the delay once.
//! A match-all filter would delay both directions (≈ 2× the delay; measured 202 ms for 100 ms).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chaos_tests::measure::{EchoServer, LossProbe, RttProbe, Stats, pin_to_cpu, tcp_rtt, udp_loss};

/// The vCPU the prober, its echo servers (and so netem's timer, armed where packets are enqueued) run on; a
/// cross-vCPU wake-up under TCG costs up to a 4 ms tick (see `chaos_tests::measure::pin_to_cpu`).
const PROBE_CPU: usize = 0;
/// Port whose traffic the scenarios fault.
const PORT_FAULTED: u16 = 5001;
/// Port that must stay untouched.
const PORT_CONTROL: u16 = 5000;
/// Absolute path: busybox's ash would run its own `tc` applet.
const TC: &str = "/usr/sbin/tc";
const DEV: &str = "lo";
/// `tc qdisc add dev lo root handle 1: prio` (3 bands; the default priomap uses bands 1 and 2, so band 3 gets only
/// what the filter sends there).
const PRIO_HANDLE: &str = "1:";
const FAULT_BAND: &str = "1:3";
const NETEM_HANDLE: &str = "30:";
const FILTER_PRIO: &str = "1";
/// A delay is right when the fastest round trip got at least `want - SLACK_BELOW` slower (netem never releases early)
/// and the median at most `want + max(5 ms, 5 %)` (TCG accuracy is ~1–3 ms). Measured with the prober pinned to
/// vCPU 0: 101.0–101.1 ms median for 100 ms, 10.5–10.8 ms for 10 ms.
const SLACK_BELOW_MS: f64 = 1.0;
const SLACK_ABOVE_MIN_MS: f64 = 5.0;
const SLACK_ABOVE_FRACTION: f64 = 0.05;
/// The control port may not get slower than its baseline by more than this.
const CONTROL_SLACK_MS: f64 = 5.0;
/// Baseline loopback RTT must be below this for any delay to be measurable.
const BASELINE_MAX_MS: f64 = 20.0;
/// Loss is right within this many percentage points (≈ 5 σ for 2000 datagrams at 30 %).
const LOSS_TOLERANCE_PCT: f64 = 5.0;
const CONTROL_LOSS_MAX_PCT: f64 = 1.0;

fn main() -> ExitCode {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    if let Err(err) = pin_to_cpu(PROBE_CPU) {
        println!("DETAIL setup: pinning to CPU {PROBE_CPU}: {err}");
    }
    // The echo servers run until main returns.
    let _servers = match start_servers() {
        Ok(servers) => servers,
        Err(err) => {
            println!("DETAIL setup: {err:#}");
            println!("RESULT setup fail error=echo_servers");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    let mut report = |name: &str, outcome: Result<Outcome>| {
        let outcome = outcome.unwrap_or_else(|err| {
            println!("DETAIL {name}: {err:#}");
            Outcome { passed: false, values: vec![("error".into(), "see_detail".into())] }
        });
        failed |= !outcome.passed;
        if !outcome.passed {
            // What the kernel had when the scenario failed (empty when the qdisc was already removed).
            if let Ok(out) = Command::new(TC).args(["-s", "qdisc", "show", "dev", DEV]).output() {
                print!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        outcome.print(name);
    };

    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let baseline4 = rtt_pair(v4);
    let baseline6 = rtt_pair(v6);
    if wanted("baseline") {
        report("baseline", baseline(&baseline4, &baseline6));
    }
    let (Ok(base4), Ok(base6)) = (baseline4, baseline6) else {
        return ExitCode::FAILURE;
    };
    for (name, ip, base, delay_ms) in [
        ("tc-delay-100ms-v4", v4, base4, 100.0),
        ("tc-delay-10ms-v4", v4, base4, 10.0),
        ("tc-delay-100ms-v6", v6, base6, 100.0),
    ] {
        if wanted(name) {
            report(name, delay_scenario(ip, base, delay_ms));
        }
    }
    if wanted("tc-loss-30pct-udp") {
        report("tc-loss-30pct-udp", loss_scenario(v4, 30.0));
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// What a scenario measured and whether that is right.
struct Outcome {
    passed: bool,
    values: Vec<(String, String)>,
}

impl Outcome {
    fn print(&self, name: &str) {
        let values: Vec<String> = self.values.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("RESULT {name} {} {}", if self.passed { "pass" } else { "fail" }, values.join(" "));
    }
}

fn ms(value: f64) -> String {
    format!("{value:.2}")
}

fn start_servers() -> Result<Vec<EchoServer>> {
    let mut servers = Vec::new();
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        for port in [PORT_FAULTED, PORT_CONTROL] {
            let addr = SocketAddr::new(ip, port);
            servers.push(EchoServer::start(addr).with_context(|| format!("echo server on {addr}"))?);
        }
    }
    Ok(servers)
}

/// RTT statistics to the faulted and the control port.
#[derive(Clone, Copy)]
struct RttPair {
    faulted: Stats,
    control: Stats,
}

fn rtt_pair(ip: IpAddr) -> Result<RttPair> {
    let probe = RttProbe::default();
    let faulted = tcp_rtt(SocketAddr::new(ip, PORT_FAULTED), probe).context("RTT to the faulted port")?;
    let control = tcp_rtt(SocketAddr::new(ip, PORT_CONTROL), probe).context("RTT to the control port")?;
    Ok(RttPair { faulted: Stats::of(&faulted), control: Stats::of(&control) })
}

fn baseline(v4: &Result<RttPair>, v6: &Result<RttPair>) -> Result<Outcome> {
    let (v4, v6) = match (v4, v6) {
        (Ok(v4), Ok(v6)) => (v4, v6),
        (Err(err), _) | (_, Err(err)) => bail!("baseline RTT: {err:#}"),
    };
    let worst = [v4.faulted, v4.control, v6.faulted, v6.control].iter().map(|s| s.median_ms).fold(0.0, f64::max);
    Ok(Outcome {
        passed: worst < BASELINE_MAX_MS,
        values: vec![
            ("v4_a_ms".into(), ms(v4.faulted.median_ms)),
            ("v4_b_ms".into(), ms(v4.control.median_ms)),
            ("v6_a_ms".into(), ms(v6.faulted.median_ms)),
            ("v6_b_ms".into(), ms(v6.control.median_ms)),
            ("v4_a_p90_ms".into(), ms(v4.faulted.p90_ms)),
            // Timer accuracy of this guest: how long a 10 ms sleep really takes (TCG stretches it).
            ("sleep_10ms_ms".into(), ms(sleep_stats(Duration::from_millis(10)).median_ms)),
            ("max_ms".into(), ms(BASELINE_MAX_MS)),
        ],
    })
}

/// How long `thread::sleep(wanted)` takes, over 20 sleeps.
fn sleep_stats(wanted: Duration) -> Stats {
    let samples: Vec<Duration> = (0..20)
        .map(|_| {
            let started = Instant::now();
            std::thread::sleep(wanted);
            started.elapsed()
        })
        .collect();
    Stats::of(&samples)
}

fn delay_scenario(ip: IpAddr, base: RttPair, delay_ms: f64) -> Result<Outcome> {
    let _qdisc = PrioNetem::install(&["delay", &format!("{delay_ms}ms")], ip)?;
    let during = rtt_pair(ip)?;
    let extra_min = during.faulted.min_ms - base.faulted.min_ms;
    let extra_median = during.faulted.median_ms - base.faulted.min_ms;
    let above = SLACK_ABOVE_MIN_MS.max(delay_ms * SLACK_ABOVE_FRACTION);
    let delay_ok = extra_min >= delay_ms - SLACK_BELOW_MS && extra_median <= delay_ms + above;
    let control_ok = during.control.median_ms <= base.control.median_ms + CONTROL_SLACK_MS;
    Ok(Outcome {
        passed: delay_ok && control_ok,
        values: vec![
            ("netem_ms".into(), ms(during.faulted.median_ms)),
            ("netem_min_ms".into(), ms(during.faulted.min_ms)),
            ("netem_p90_ms".into(), ms(during.faulted.p90_ms)),
            ("want_ms".into(), ms(delay_ms)),
            ("base_ms".into(), ms(base.faulted.median_ms)),
            ("other_ms".into(), ms(during.control.median_ms)),
            ("other_base_ms".into(), ms(base.control.median_ms)),
        ],
    })
}

fn loss_scenario(ip: IpAddr, loss_pct: f64) -> Result<Outcome> {
    let _qdisc = PrioNetem::install(&["loss", &format!("{loss_pct}%")], ip)?;
    let probe = LossProbe::default();
    let faulted = udp_loss(SocketAddr::new(ip, PORT_FAULTED), probe).context("UDP probe to the faulted port")?;
    let control = udp_loss(SocketAddr::new(ip, PORT_CONTROL), probe).context("UDP probe to the control port")?;
    let measured = faulted.loss_pct();
    Ok(Outcome {
        passed: (measured - loss_pct).abs() <= LOSS_TOLERANCE_PCT && control.loss_pct() <= CONTROL_LOSS_MAX_PCT,
        values: vec![
            ("netem_loss_pct".into(), ms(measured)),
            ("want_pct".into(), ms(loss_pct)),
            ("sent".into(), faulted.sent.to_string()),
            ("received".into(), faulted.received.to_string()),
            ("other_loss_pct".into(), ms(control.loss_pct())),
        ],
    })
}

/// The competitors' design on `lo`: prio root, netem on band 3, u32 on the destination port. Removed on drop.
struct PrioNetem;

impl PrioNetem {
    fn install(netem: &[&str], ip: IpAddr) -> Result<Self> {
        // A leftover from a scenario that died half-way would make `add` fail with EEXIST.
        let _ = Command::new(TC).args(["qdisc", "del", "dev", DEV, "root"]).output();
        tc(&["qdisc", "add", "dev", DEV, "root", "handle", PRIO_HANDLE, "prio"])?;
        let guard = Self;
        let mut args = vec!["qdisc", "add", "dev", DEV, "parent", FAULT_BAND, "handle", NETEM_HANDLE, "netem"];
        args.extend_from_slice(netem);
        tc(&args)?;
        let port = PORT_FAULTED.to_string();
        let (protocol, field) = if ip.is_ipv4() { ("ip", "ip") } else { ("ipv6", "ip6") };
        tc(&[
            "filter",
            "add",
            "dev",
            DEV,
            "parent",
            PRIO_HANDLE,
            "protocol",
            protocol,
            "prio",
            FILTER_PRIO,
            "u32",
            "match",
            field,
            "dport",
            &port,
            "0xffff",
            "flowid",
            FAULT_BAND,
        ])?;
        Ok(guard)
    }
}

impl Drop for PrioNetem {
    fn drop(&mut self) {
        if let Err(err) = tc(&["qdisc", "del", "dev", DEV, "root"]) {
            println!("DETAIL cleanup: {err:#}");
        }
    }
}

/// Runs `/usr/sbin/tc <args>`, echoing it; fails with tc's stderr.
fn tc(args: &[&str]) -> Result<()> {
    println!("+ tc {}", args.join(" "));
    let out = Command::new(TC).args(args).output().with_context(|| format!("starting {TC}"))?;
    if !out.status.success() {
        bail!("tc {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
