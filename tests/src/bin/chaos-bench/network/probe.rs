//! The network benchmark's configurations (bare, ours, u32), their samples, and one measurement of one
//! configuration: the u32 baseline chain, growing our rules, the SCHED_FIFO measuring threads.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use chaos_tests::{
    measure::{self, EchoServer},
    netns::Netns,
};

use super::*;

/// A configuration of the network benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NetSetup {
    /// Nothing attached.
    Bare,
    /// Our classifier with this many rules requested.
    Ours(usize),
    /// The u32 chain with this many filters.
    U32(usize),
}

impl NetSetup {
    pub(super) fn all() -> Vec<NetSetup> {
        let mut all = vec![NetSetup::Bare];
        all.extend(RULE_COUNTS.map(NetSetup::Ours));
        all.extend(RULE_COUNTS.map(NetSetup::U32));
        all
    }

    pub(super) fn design(self) -> &'static str {
        match self {
            NetSetup::Bare => "bare",
            NetSetup::Ours(_) => "ours",
            NetSetup::U32(_) => "u32",
        }
    }

    pub(super) fn rules(self) -> usize {
        match self {
            NetSetup::Bare => 0,
            NetSetup::Ours(n) | NetSetup::U32(n) => n,
        }
    }
}

/// What one configuration measured over all rounds.
#[derive(Clone, Debug, Default)]
pub(super) struct NetSamples {
    /// Rules actually loaded (per namespace).
    pub(super) loaded: usize,
    /// Bulk runs, Gbit/s, one per round.
    pub(super) runs: Vec<f64>,
    /// RTT samples of all rounds.
    pub(super) rtt: Vec<Duration>,
}

impl NetSamples {
    pub(super) fn sorted_runs(&self) -> Vec<f64> {
        let mut runs = self.runs.clone();
        runs.sort_by(f64::total_cmp);
        runs
    }

    /// Median bulk throughput over the rounds.
    pub(super) fn gbps(&self) -> f64 {
        let runs = self.sorted_runs();
        let n = runs.len();
        if n == 0 {
            0.0
        } else if n % 2 == 1 {
            runs[n / 2]
        } else {
            (runs[n / 2 - 1] + runs[n / 2]) / 2.0
        }
    }

    pub(super) fn rtt(&self) -> Percentiles {
        Percentiles::of(&self.rtt)
    }

    /// Per-round ratios to `base` (measured in the same round, seconds apart): (min, max).
    pub(super) fn paired_range(&self, base: &NetSamples) -> (f64, f64) {
        let ratios: Vec<f64> = self.runs.iter().zip(&base.runs).map(|(a, b)| a / b).collect();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    }

    /// Run-to-run coefficient of variation of the bulk runs, in percent.
    pub(super) fn cv_percent(&self) -> f64 {
        let n = self.runs.len() as f64;
        let mean = self.runs.iter().sum::<f64>() / n;
        let var = self.runs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
        100.0 * var.sqrt() / mean
    }
}

/// Makes the calling thread (and the threads it starts afterwards, which inherit it) SCHED_FIFO, so that other
/// work on a shared machine cannot preempt the measurement. Returns whether it worked.
pub(super) fn realtime() -> bool {
    let param = libc::sched_param { sched_priority: MEASURE_RT_PRIORITY };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid parameter struct.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// Pins the calling thread to `cpu` and makes it real-time (see [`realtime`]).
pub(super) fn measuring_thread(cpu: usize) {
    let _ = measure::pin_to_cpu(cpu);
    let _ = realtime();
}

/// The client namespace, the server namespace and the two servers in it.
pub(super) struct NetProbe {
    pub(super) srv: Netns,
    pub(super) cli: Netns,
    pub(super) srv_ip: String,
    pub(super) bulk: TcpListener,
    pub(super) _echo: EchoServer,
    pub(super) client_cpu: usize,
    pub(super) server_cpu: usize,
}

impl NetProbe {
    pub(super) fn start() -> Result<NetProbe> {
        let srv = Netns::new("bnetsrv");
        let cli = Netns::new("bnetcli");
        let (srv_ip, _) = srv.veth_to(&cli, NET_SUBNET)?;
        // Servers on the last CPU, clients on the first: the two ends never fight over one CPU.
        let server_cpu = measure::available_cpus().saturating_sub(1);
        let (bulk, echo) = srv.run(|| -> io::Result<_> {
            // The echo server's threads inherit the CPU and the real-time policy.
            measuring_thread(server_cpu);
            let bulk = TcpListener::bind(("0.0.0.0", BULK_PORT))?;
            let echo = EchoServer::start(addr(&format!("0.0.0.0:{RTT_PORT}")))?;
            Ok((bulk, echo))
        })?;
        bulk.set_nonblocking(true)?;
        Ok(NetProbe { srv, cli, srv_ip, bulk, _echo: echo, client_cpu: 0, server_cpu })
    }

    pub(super) fn target(&self, port: u16) -> SocketAddr {
        addr(&format!("{}:{port}", self.srv_ip))
    }

    /// One round's measurement of the current configuration into `into`.
    pub(super) fn measure(&self, into: &mut NetSamples) -> Result<()> {
        let rtt_target = self.target(RTT_PORT);
        let cpu = self.client_cpu;
        std::thread::sleep(RT_COOLDOWN);
        let rtt = self.cli.run(|| {
            measuring_thread(cpu);
            measure::tcp_rtt(rtt_target, RTT_PROBE)
        })?;
        into.rtt.extend(rtt);
        std::thread::sleep(RT_COOLDOWN);
        into.runs.push(self.bulk_once()?);
        Ok(())
    }

    /// One bulk transfer of [`BULK_TIME`] from cli to srv; Gbit/s as the receiver saw it.
    pub(super) fn bulk_once(&self) -> Result<f64> {
        let listener = self.bulk.try_clone()?;
        let server_cpu = self.server_cpu;
        let receiver = std::thread::spawn(move || -> io::Result<(u64, Duration)> {
            measuring_thread(server_cpu);
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut conn = loop {
                match listener.accept() {
                    Ok((conn, _)) => break conn,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e),
                }
            };
            conn.set_nonblocking(false)?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            let mut first = None;
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                total += n as u64;
            }
            Ok((total, first.map_or(Duration::ZERO, |f| f.elapsed())))
        });
        let target = self.target(BULK_PORT);
        let client_cpu = self.client_cpu;
        let sent = self.cli.run(|| -> io::Result<()> {
            measuring_thread(client_cpu);
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            let chunk = vec![0x5au8; BULK_CHUNK];
            let started = Instant::now();
            while started.elapsed() < BULK_TIME {
                s.write_all(&chunk)?;
            }
            s.shutdown(Shutdown::Write)
        });
        let received = receiver.join().map_err(|_| anyhow::anyhow!("bulk receiver panicked"))?;
        sent.context("bulk sender")?;
        let (bytes, took) = received.context("bulk receiver")?;
        ensure!(!took.is_zero(), "the bulk receiver got nothing");
        Ok(bytes as f64 * 8.0 / took.as_secs_f64() / 1e9)
    }

    /// (last rule's port: outcome, an unruled port: outcome) of a connection from cli.
    pub(super) fn probe_rules(&self, loaded: usize) -> String {
        let last = RULE_PORT_BASE + loaded.saturating_sub(1) as u16;
        let unruled = RULE_PORT_BASE - 1;
        let (a, b) = self.cli.run(|| (connect_outcome(self.target(last)), connect_outcome(self.target(unruled))));
        format!("a connection to the last rule's port {last} {a}, to the unruled port {unruled} {b}")
    }
}

/// The competitors' design with the kernel this machine has: a root qdisc + one `u32 match ip dport` filter per
/// port, all in one priority (one linear list). Removed on drop.
pub(super) struct U32Chain<'a> {
    pub(super) probe: &'a NetProbe,
    pub(super) filters: usize,
    pub(super) dir: tempfile::TempDir,
}

impl<'a> U32Chain<'a> {
    /// cli: `htb` root (sch_prio is not in this kernel) with default class 1:1 and class 1:2 whose leaf is
    /// `pfifo limit 0` (drops everything: the blackhole); srv: clsact for ingress filters and an IFB they redirect
    /// to on a match.
    pub(super) fn setup(probe: &'a NetProbe) -> Result<U32Chain<'a>> {
        let chain = U32Chain { probe, filters: 0, dir: tempfile::Builder::new().prefix("chaos-bench-u32-").tempdir()? };
        let cli = &probe.cli;
        tc(cli, &["qdisc", "add", "dev", "veth1", "root", "handle", "1:", "htb", "default", "1"])?;
        for class in ["1:1", "1:2"] {
            let args = ["class", "add", "dev", "veth1", "parent", "1:", "classid", class, "htb", "rate", "100gbit"];
            tc(cli, &[&args[..], &["quantum", "60000"]].concat())?;
        }
        tc(cli, &["qdisc", "add", "dev", "veth1", "parent", "1:2", "handle", "20:", "pfifo", "limit", "0"])?;
        probe.srv.ip(&["link", "add", U32_IFB, "type", "ifb"])?;
        probe.srv.ip(&["link", "set", U32_IFB, "up"])?;
        tc(&probe.srv, &["qdisc", "add", "dev", "veth0", "clsact"])?;
        Ok(chain)
    }

    /// Adds filters for rules `self.filters..total` on both sides with `tc -batch`.
    pub(super) fn grow(&mut self, total: usize) -> Result<()> {
        if total <= self.filters {
            return Ok(());
        }
        let mut egress = String::new();
        let mut ingress = String::new();
        for i in self.filters..total {
            let port = RULE_PORT_BASE + i as u16;
            egress.push_str(&format!(
                "filter add dev veth1 parent 1: protocol ip prio 1 u32 match ip dport {port} 0xffff flowid 1:2\n"
            ));
            ingress.push_str(&format!(
                "filter add dev veth0 ingress protocol ip prio 1 u32 match ip dport {port} 0xffff \
                 action mirred egress redirect dev {U32_IFB}\n"
            ));
        }
        for (ns, name, text) in [(&self.probe.cli, "egress", egress), (&self.probe.srv, "ingress", ingress)] {
            let path = self.dir.path().join(format!("{name}.batch"));
            std::fs::write(&path, text)?;
            tc(ns, &["-batch", path.to_str().expect("utf-8 temp path")])?;
        }
        self.filters = total;
        Ok(())
    }
}

impl Drop for U32Chain<'_> {
    fn drop(&mut self) {
        let results = [
            tc(&self.probe.cli, &["qdisc", "del", "dev", "veth1", "root"]).map(drop),
            tc(&self.probe.srv, &["qdisc", "del", "dev", "veth0", "clsact"]).map(drop),
            self.probe.srv.ip(&["link", "del", U32_IFB]).map(drop),
        ];
        for err in results.into_iter().filter_map(Result::err) {
            eprintln!("chaos-bench: removing the u32 baseline: {err:#}");
        }
    }
}

/// Adds blackhole rules `from..to` (one fault per port) to both engines; returns how many are loaded, and the
/// error that stopped it early.
pub(super) fn grow_ours(engines: &[&NsEngine], from: usize, to: usize) -> (usize, Option<String>) {
    let mut loaded = to;
    let mut error = None;
    for ns_engine in engines {
        let (got, err) = ns_engine.block_on(async {
            for i in from..to {
                let port = RULE_PORT_BASE + i as u16;
                let fault = format!("r{i}");
                if let Err(err) = ns_engine.engine.apply(&fault, &[to_port(port)], &blackhole(), RULE_TTL).await {
                    return (i, Some(format!("{:#}", anyhow::Error::new(err))));
                }
            }
            (to, None)
        });
        loaded = loaded.min(got);
        error = error.or(err);
    }
    (loaded, error)
}
