//! Interleaved comparisons: raw netem vs the agent, measured in rounds and judged (see the crate docs).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use chaos_tests::measure::{RttProbe, Stats, in_netns, reply_rtt, tcp_rtt};

use crate::{fixture::GuestAgent, kernel::tc_in, *};

/// How one target is probed.
#[derive(Clone, Copy)]
pub(crate) enum Probe {
    /// Echo round trips from here (the guest's root namespace).
    Echo(SocketAddr),
    /// Echo round trips from a caller's namespace (over the veth pair, or a stack of devices).
    Remote(&'static str, SocketAddr),
    /// Lymph-style request/reply round trips (reply on a separate connection) from here.
    Reply(SocketAddr),
}

impl Probe {
    pub(crate) fn sample(self, samples: usize) -> Result<Vec<Duration>> {
        let p = probe(samples);
        match self {
            Self::Echo(addr) => tcp_rtt(addr, p).with_context(|| format!("RTT to {addr}")),
            Self::Reply(addr) => reply_rtt(addr, p).with_context(|| format!("reply RTT to {addr}")),
            Self::Remote(netns, addr) => {
                let ns = Path::new("/run/netns").join(netns);
                in_netns(&ns, || tcp_rtt(addr, p))
                    .with_context(|| format!("entering {}", ns.display()))?
                    .with_context(|| format!("RTT from {netns} to {addr}"))
            }
        }
    }
}

pub(crate) fn probe(samples: usize) -> RttProbe {
    RttProbe { samples, warmup: 1, ..RttProbe::default() }
}

/// One measured target of a comparison: its rows are `tc-<row>` and `agent-<row>`.
pub(crate) struct Target {
    pub(crate) row: String,
    pub(crate) probe: Probe,
    /// The port that must stay untouched, probed the same way (an echo).
    pub(crate) control: Probe,
    pub(crate) want_ms: f64,
    pub(crate) samples: usize,
}

/// A raw netem leg: an htb class under [`HTB_ROOT`] with a netem leaf, and the u32 matches steering into it.
pub(crate) struct RawLeg {
    /// `None`: the guest's root namespace; `Some`: the caller's.
    pub(crate) netns: Option<&'static str>,
    pub(crate) dev: &'static str,
    /// Class minor (hex digits as tc writes them), also the netem leaf's handle.
    pub(crate) class: &'static str,
    pub(crate) netem: Vec<&'static str>,
    /// (`sport` or `dport`, port).
    pub(crate) matches: Vec<(&'static str, u16)>,
}

/// A fault measured three ways per round: none, raw netem, the agent.
pub(crate) struct Comparison {
    pub(crate) targets: Vec<Target>,
    pub(crate) raw: Vec<RawLeg>,
    /// One agent fault per entry (CLI arguments after `inject`, or a whole shortcut subcommand).
    pub(crate) ours: Vec<Vec<&'static str>>,
    pub(crate) jitter_ms: Option<f64>,
}

/// `[no fault, raw, ours]` indices in each round's order: every condition is first, second and third equally
/// often over six rounds.
pub(crate) const ORDERS: [[usize; 3]; 6] = [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 2, 1], [2, 1, 0], [1, 0, 2]];
pub(crate) const NONE: usize = 0;
pub(crate) const RAW: usize = 1;
pub(crate) const OURS: usize = 2;

/// Samples of one target: `[condition][round]`.
#[derive(Default, Clone)]
pub(crate) struct Series {
    pub(crate) rounds: [Vec<Vec<Duration>>; 3],
    pub(crate) control: [Vec<Vec<Duration>>; 3],
}

impl Series {
    pub(crate) fn all(&self, condition: usize) -> Stats {
        Stats::of(&self.rounds[condition].concat())
    }

    pub(crate) fn control_all(&self, condition: usize) -> Stats {
        Stats::of(&self.control[condition].concat())
    }
}

pub(crate) fn echo(ip: IpAddr, port: u16) -> Probe {
    Probe::Echo(SocketAddr::new(ip, port))
}

pub(crate) fn delay_target(row: &str, probe: Probe, control: Probe, want_ms: f64) -> Target {
    // Each sample costs the delay: fewer for long ones.
    let samples = if want_ms >= 90.0 {
        6
    } else if want_ms >= 40.0 {
        8
    } else {
        12
    };
    Target { row: row.into(), probe, control, want_ms, samples }
}

pub(crate) fn lo_leg(class: &'static str, netem: Vec<&'static str>, matches: Vec<(&'static str, u16)>) -> RawLeg {
    RawLeg { netns: None, dev: LO, class, netem, matches }
}

/// The numbers one target's verdict rests on (ms).
struct Figures {
    want: f64,
    raw_extra: f64,
    ours_extra: f64,
    se: f64,
    drift: f64,
    tol: f64,
    tol_capped: bool,
    diff: f64,
    control_limit: f64,
    control_extra: f64,
    raw_control_extra: f64,
    spread_raw: f64,
    spread_ours: f64,
    spread_ratio: f64,
    round_medians: Vec<f64>,
    none: Stats,
    raw: Stats,
    ours: Stats,
    c_none: Stats,
    c_ours: Stats,
}

/// Raw netem switched on and off by its filters; its classes and leaves are removed on drop.
pub(crate) struct RawNetem<'a> {
    pub(crate) legs: &'a [RawLeg],
}

impl<'a> RawNetem<'a> {
    pub(crate) fn install(legs: &'a [RawLeg]) -> Result<Self> {
        let raw = Self { legs };
        for leg in legs {
            let classid = format!("1:{}", leg.class);
            let handle = format!("{}:", leg.class);
            tc_in(
                leg.netns,
                &[
                    "class", "add", "dev", leg.dev, "parent", HTB_ROOT, "classid", &classid, "htb", "rate", "10gbit",
                    "quantum", "60000",
                ],
            )?;
            let mut args = vec!["qdisc", "add", "dev", leg.dev, "parent", &classid, "handle", &handle, "netem"];
            args.extend_from_slice(&leg.netem);
            // Room for every packet in flight: netem's default queue (1000) is plenty here.
            tc_in(leg.netns, &args)?;
        }
        Ok(raw)
    }

    /// u32 filters for IPv4 and IPv6 on each leg's ports.
    pub(crate) fn on(&self) -> Result<()> {
        for leg in self.legs {
            let classid = format!("1:{}", leg.class);
            for (field, port) in &leg.matches {
                let port = port.to_string();
                for (protocol, prio, family) in [("ip", "7", "ip"), ("ipv6", "8", "ip6")] {
                    tc_in(
                        leg.netns,
                        &[
                            "filter", "add", "dev", leg.dev, "parent", HTB_ROOT, "protocol", protocol, "prio", prio,
                            "u32", "match", family, field, &port, "0xffff", "flowid", &classid,
                        ],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Every filter on the root htb (nothing else puts filters there).
    pub(crate) fn off(&self) -> Result<()> {
        let mut done: Vec<(Option<&str>, &str)> = Vec::new();
        for leg in self.legs {
            if done.contains(&(leg.netns, leg.dev)) {
                continue;
            }
            done.push((leg.netns, leg.dev));
            tc_in(leg.netns, &["filter", "del", "dev", leg.dev, "parent", HTB_ROOT])?;
        }
        Ok(())
    }
}

impl Drop for RawNetem<'_> {
    fn drop(&mut self) {
        let _ = self.off();
        for leg in self.legs {
            if let Err(err) =
                tc_in(leg.netns, &["class", "del", "dev", leg.dev, "classid", &format!("1:{}", leg.class)])
            {
                println!("DETAIL cleanup: {err:#}");
            }
        }
    }
}

impl Comparison {
    /// Runs `rounds` rounds (more when `extend` and the verdict needs them) and judges; the `tc-` and `agent-` row
    /// of every target.
    pub(crate) fn run(&self, agent: &GuestAgent, rounds: usize, extend: bool) -> Result<Vec<(String, Outcome)>> {
        let raw = RawNetem::install(&self.raw)?;
        let mut series = vec![Series::default(); self.targets.len()];
        let mut done = 0;
        let mut goal = rounds;
        loop {
            while done < goal {
                let order = ORDERS[done % ORDERS.len()];
                for condition in order {
                    self.measure(condition, &raw, agent, &mut series)?;
                }
                done += 1;
            }
            let rows: Vec<(String, Outcome)> =
                self.targets.iter().zip(&series).flat_map(|(t, s)| self.judge(t, s, done)).collect();
            let settled =
                rows.iter().all(|(_, o)| o.passed && o.values.iter().all(|(k, v)| *k != "tol_capped" || v == "0"));
            if settled || !extend || done + MORE_ROUNDS > MAX_ROUNDS {
                return Ok(rows);
            }
            println!("DETAIL {}: not settled after {done} rounds; {MORE_ROUNDS} more", self.targets[0].row);
            goal = done + MORE_ROUNDS;
        }
    }

    /// One condition of one round: switch it on, sample every target and its control, switch it off.
    pub(crate) fn measure(
        &self,
        condition: usize,
        raw: &RawNetem,
        agent: &GuestAgent,
        series: &mut [Series],
    ) -> Result<()> {
        let mut ids = Vec::new();
        match condition {
            RAW => raw.on()?,
            OURS => {
                for args in &self.ours {
                    match agent.rpc_fault(args, FAULT_LIFETIME_S) {
                        Ok(id) => ids.push(id),
                        Err(err) => {
                            for id in &ids {
                                let _ = agent.rpc_revert(id);
                            }
                            return Err(err);
                        }
                    }
                }
            }
            _ => {}
        }
        if condition != NONE {
            thread::sleep(SETTLE);
        }
        let measured = (|| {
            for (target, s) in self.targets.iter().zip(series.iter_mut()) {
                s.rounds[condition].push(target.probe.sample(target.samples)?);
                s.control[condition].push(target.control.sample(CONTROL_SAMPLES)?);
            }
            Ok(())
        })();
        let switched_off = match condition {
            RAW => raw.off(),
            OURS => ids.iter().try_for_each(|id| agent.rpc_revert(id)),
            _ => Ok(()),
        };
        measured.and(switched_off)
    }

    /// The `tc-` and `agent-` rows of one target (see the crate docs for the verdict).
    pub(crate) fn judge(&self, target: &Target, s: &Series, rounds: usize) -> Vec<(String, Outcome)> {
        let f = self.figures(target, s);
        let raw_ok = f.raw_extra >= f.want * RAW_MIN_FRACTION && self.jitter_ms.is_none_or(|j| f.spread_raw >= j);
        let jitter_ok = self.jitter_ms.is_none_or(|_| (SPREAD_RATIO.0..=SPREAD_RATIO.1).contains(&f.spread_ratio));
        let delay_ok = f.diff.abs() <= f.tol;
        let control_ok = f.control_extra < f.control_limit;
        let mut ours_values = self.ours_values(&f, rounds);
        if !raw_ok {
            ours_values.push(("error", "raw_netem_did_not_delay".into()));
        }
        vec![
            (format!("tc-{}", target.row), Outcome { passed: raw_ok, values: self.raw_values(&f) }),
            (
                format!("agent-{}", target.row),
                Outcome { passed: raw_ok && delay_ok && control_ok && jitter_ok, values: ours_values },
            ),
        ]
    }

    /// What the verdict of one target is computed from.
    fn figures(&self, target: &Target, s: &Series) -> Figures {
        let (none, raw, ours) = (s.all(NONE), s.all(RAW), s.all(OURS));
        let (c_none, c_raw, c_ours) = (s.control_all(NONE), s.control_all(RAW), s.control_all(OURS));
        let want = target.want_ms;
        // σ of each from its p10–p90 (a normal distribution's is 2.563 σ; robust against TCG's outliers); the
        // standard error of a median is 1.2533 σ/√n.
        let sigma = |s: &Stats| (s.p90_ms - s.p10_ms) / 2.563;
        let se =
            1.2533 * (sigma(&raw).powi(2) / raw.n.max(1) as f64 + sigma(&ours).powi(2) / ours.n.max(1) as f64).sqrt();
        let round_medians: Vec<f64> = s.rounds[RAW].iter().map(|r| Stats::of(r).median_ms).collect();
        let drift = round_medians.iter().copied().fold(f64::MIN, f64::max)
            - round_medians.iter().copied().fold(f64::MAX, f64::min);
        let wanted_tol = TOL_SE_FACTOR * se + drift;
        let max_tol = want * TOL_MAX_FRACTION;
        let (spread_raw, spread_ours) = (raw.p90_ms - raw.p10_ms, ours.p90_ms - ours.p10_ms);
        Figures {
            want,
            raw_extra: raw.median_ms - none.median_ms,
            ours_extra: ours.median_ms - none.median_ms,
            se,
            drift,
            tol_capped: wanted_tol > max_tol,
            tol: wanted_tol.clamp(TOL_MIN_MS, max_tol),
            diff: ours.median_ms - raw.median_ms,
            control_limit: self.min_want() * CONTROL_FRACTION,
            control_extra: c_ours.median_ms - c_none.median_ms,
            raw_control_extra: c_raw.median_ms - c_none.median_ms,
            spread_ratio: spread_ours / spread_raw.max(0.01),
            spread_raw,
            spread_ours,
            round_medians,
            none,
            raw,
            ours,
            c_none,
            c_ours,
        }
    }

    fn raw_values(&self, f: &Figures) -> Vec<(&'static str, String)> {
        let mut values = vec![
            ("ms", ms(f.raw.median_ms)),
            ("extra_ms", ms(f.raw_extra)),
            ("want_ms", ms(f.want)),
            ("p90_ms", ms(f.raw.p90_ms)),
            ("stdev_ms", ms(f.raw.stdev_ms)),
            ("spread_ms", ms(f.spread_raw)),
            ("base_ms", ms(f.none.median_ms)),
            ("n", f.raw.n.to_string()),
            ("round_medians_ms", f.round_medians.iter().map(|m| format!("{m:.2}")).collect::<Vec<_>>().join(",")),
            ("other_extra_ms", ms(f.raw_control_extra)),
        ];
        if let Some(j) = self.jitter_ms {
            values.push(("jitter_ms", ms(j)));
        }
        values
    }

    fn ours_values(&self, f: &Figures, rounds: usize) -> Vec<(&'static str, String)> {
        let mut values = vec![
            ("ms", ms(f.ours.median_ms)),
            ("extra_ms", ms(f.ours_extra)),
            ("want_ms", ms(f.want)),
            ("p90_ms", ms(f.ours.p90_ms)),
            ("stdev_ms", ms(f.ours.stdev_ms)),
            ("spread_ms", ms(f.spread_ours)),
            ("raw_ms", ms(f.raw.median_ms)),
            ("raw_extra_ms", ms(f.raw_extra)),
            ("diff_ms", format!("{:+.2}", f.diff)),
            ("d_p90_ms", format!("{:+.2}", f.ours.p90_ms - f.raw.p90_ms)),
            ("tol_ms", ms(f.tol)),
            ("se_ms", ms(f.se)),
            ("drift_ms", ms(f.drift)),
            ("tol_capped", u8::from(f.tol_capped).to_string()),
            ("rounds", rounds.to_string()),
            ("n", f.ours.n.to_string()),
            ("base_ms", ms(f.none.median_ms)),
            ("other_ms", ms(f.c_ours.median_ms)),
            ("other_base_ms", ms(f.c_none.median_ms)),
            ("other_extra_ms", ms(f.control_extra)),
            ("other_limit_ms", ms(f.control_limit)),
        ];
        if let Some(j) = self.jitter_ms {
            values.push(("jitter_ms", ms(j)));
            values.push(("spread_ratio", ms(f.spread_ratio)));
        }
        values
    }

    pub(crate) fn min_want(&self) -> f64 {
        self.targets.iter().map(|t| t.want_ms).fold(f64::MAX, f64::min)
    }
}
