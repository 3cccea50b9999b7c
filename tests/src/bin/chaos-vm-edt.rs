//! `chaos-vm-edt`: the earliest-departure-time (EDT) latency backend inside a qemu guest whose kernel has **no
//! `sch_netem`** (not loaded, not in the module tree, module autoload off) but has `sch_fq` — the situation of a
//! RHEL/Fedora or Ubuntu host without kernel-modules-extra / linux-modules-extra. Its `/init` command (see
//! `tests/tests/vm_edt.rs`); prints `RESULT` lines (`chaos_tests::vm`'s console protocol).
//!
//! Usage: `chaos-vm-edt --agent-bin PATH --netem-module PATH [--rounds N] [NAME-FILTER …]`;
//! `chaos-vm-edt serve echo=ADDR …` is the services process it starts for itself (the agent refuses to fault ports
//! of its own parent, and the services must not be this process).
//!
//! # Scenarios, in order
//! ```text
//! edt-kernel          sch_netem absent (/sys/module, `tc qdisc add … netem` refused), sch_fq present
//! edt-probe           the agent's `status`: network.kernel says netem=false fq=true latency_backend=edt, and its
//!                     agent_start event carries the same report
//! ── EDT rounds: per case, rounds of (no fault, the agent's fault) in alternating order, port A faulted and
//!    port B as control (lo, TCP echo, one request at a time); `faults` must say backend=edt
//! edt-order           50 ± 20 ms (uniform) through EDT: 300 numbered UDP datagrams to A's UDP echo, 1 ms apart:
//!                     none arrives out of order (EDT keeps a flow's order)
//! edt-kill9-expiry    100 ms for 5 s, guardian SIGSTOPped, agent SIGKILLed: still delayed at once, gone after 5 s
//!                     with the IFB still in the kernel (the classifier's own expiry); then SIGCONT
//! ── `insmod sch_netem.ko` (the module file sits outside the module tree)
//! tc-order            the same 50 ± 20 ms through raw netem: reorders (reported, not required; shows the
//!                     difference)
//! edt-reprobe         a restarted agent now probes netem and picks it (then stopped)
//! cost                busy CPU time of the guest per UDP datagram through a 1 ms delay: EDT (measured before
//!                     netem was loaded) vs the same agent's fault served by netem vs no fault (numbers for
//!                     `cargo xtask bench accuracy`; passes when each backend served its fault)
//! ── raw netem rounds: per case, rounds of (no fault, raw netem: an htb class with a netem leaf and a u32 filter
//!    on A under an htb root on lo), the same probes
//! {tc,agent}-edt-<case>  the verdict per case: the agent's added delay (median − its own no-fault median) within
//!                     the boot's noise of raw netem's (3 standard errors + the drift of raw netem's per-round
//!                     medians, at least 1 ms, at most half the delay); the control port grew by less than a
//!                     quarter of the delay; with jitter the p10–p90 spreads within ½–2× of each other
//! ```
//! The cases: 10 ms, 100 ms, 50 ms ± 20 ms normal — the delays the netem scenarios of `chaos-vm-guest` judge.
//! The EDT and netem rounds cannot be interleaved (netem must be absent while the agent probes): each is judged
//! against its own interleaved no-fault rounds, and the two added delays are compared.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use chaos_test_support::{eventually, process::terminate};
use chaos_tests::{
    agent::AgentLayout,
    measure::{EchoServer, RttProbe, Stats, available_cpus, pin_command_to_cpu, pin_to_cpu, tcp_rtt},
};
use serde_json::Value as Json;

const TC: &str = "/usr/sbin/tc";
const PORT_A: u16 = 5001;
const PORT_B: u16 = 5000;
const AGENT_ENDPOINT: &str = "tcp://127.0.0.1:4575";
const AGENT_DIR: &str = "/tmp/chaos-vm-edt";
const AGENT_STATE_DIR: &str = "/run/lymph-chaos-edt";
const AGENT_PIN_DIR: &str = "/sys/fs/bpf/lymph-chaos-edt";
const AGENT_IFB: &str = "lchaos0";
const PROBE_CPU: usize = 0;
const AGENT_CPU: usize = 1;
const SAMPLES: usize = 20;
const CONTROL_SAMPLES: usize = 8;
const DEFAULT_ROUNDS: usize = 4;
const SETTLE: Duration = Duration::from_millis(200);
const LIFETIME_S: &str = "120";
const KILL_LIFETIME: Duration = Duration::from_secs(5);
const EXPIRY_MARGIN: Duration = Duration::from_millis(1500);
const ORDER_DATAGRAMS: u32 = 300;
/// How long the agent may take to answer after its start: a debug agent under TCG on a busy host loads its BPF
/// object slowly (a guest on a host at load 18 reached `/init` 20× later than on an idle one).
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(300);
/// The UDP sink of the per-packet cost measurement.
const PORT_SINK: u16 = 5005;
const COST_DATAGRAMS: u32 = 40_000;

/// One delay case: the agent's arguments and raw netem's.
struct Case {
    name: &'static str,
    want_ms: f64,
    jitter_ms: Option<f64>,
    agent: &'static [&'static str],
    netem: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case { name: "delay-10ms", want_ms: 10.0, jitter_ms: None, agent: &["latency=0.01"], netem: &["delay", "10ms"] },
    Case { name: "delay-100ms", want_ms: 100.0, jitter_ms: None, agent: &["latency=0.1"], netem: &["delay", "100ms"] },
    Case {
        name: "jitter-50ms-20ms",
        want_ms: 50.0,
        jitter_ms: Some(20.0),
        agent: &["latency=0.05", "jitter=0.02", "distribution=normal"],
        netem: &["delay", "50ms", "20ms", "distribution", "normal"],
    },
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        return serve(&args[1..]);
    }
    let (mut agent_bin, mut netem_module, mut rounds, mut filters) = (None, None, DEFAULT_ROUNDS, Vec::new());
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--agent-bin" => agent_bin = it.next().map(PathBuf::from),
            "--netem-module" => netem_module = it.next().map(PathBuf::from),
            "--rounds" => rounds = it.next().and_then(|r| r.parse().ok()).unwrap_or(DEFAULT_ROUNDS),
            _ => filters.push(arg),
        }
    }
    let (Some(agent_bin), Some(netem_module)) = (agent_bin, netem_module) else {
        println!("usage: chaos-vm-edt --agent-bin PATH --netem-module PATH [--rounds N] [FILTER …]");
        return ExitCode::from(2);
    };
    if let Err(err) = pin_to_cpu(PROBE_CPU) {
        println!("DETAIL not pinned to vCPU {PROBE_CPU}: {err}");
    }
    let run = Run { filters };
    match run.all(&agent_bin, &netem_module, rounds) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            println!("DETAIL chaos-vm-edt stopped: {err:#}");
            print_agent_log(60);
            ExitCode::FAILURE
        }
    }
}

struct Run {
    filters: Vec<String>,
}

impl Run {
    fn wants(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str()))
    }

    fn report(&self, name: &str, outcome: Result<Outcome>) {
        match outcome {
            Ok(o) => {
                let values: Vec<String> = o.values.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("RESULT {name} {} {}", if o.passed { "pass" } else { "fail" }, values.join(" "));
            }
            Err(err) => {
                println!("RESULT {name} fail error=scenario_error");
                println!("DETAIL {name}: {err:#}");
            }
        }
    }

    fn all(&self, agent_bin: &Path, netem_module: &Path, rounds: usize) -> Result<()> {
        self.report("edt-kernel", kernel_state());
        let _services = Services::start()?;
        let mut agent = Agent::start(agent_bin)?;
        self.report("edt-probe", agent.probe_report());

        let cases: Vec<&Case> = CASES.iter().filter(|c| self.wants(&format!("edt-{}", c.name))).collect();
        let mut edt = Vec::new();
        for case in &cases {
            edt.push(measure_agent(&agent, case, rounds));
        }
        if self.wants("edt-order") {
            let args = ["inject", "latency", "--port", "5001", "latency=0.05", "jitter=0.02", "protocol=udp"];
            let outcome = order_through(|| agent.fault(&args), |id| agent.revert(id));
            self.report("edt-order", outcome.map(|o| Outcome { passed: o.passed && o.values[2].1 == "0", ..o }));
        }
        let edt_cost = self.wants("cost").then(|| cost(Some(&agent)));
        if self.wants("edt-kill9-expiry") {
            self.report("edt-kill9-expiry", kill9_expiry(&mut agent));
        }
        agent.stop();

        println!("+ insmod {}", netem_module.display());
        let out = Command::new("insmod").arg(netem_module).output().context("insmod")?;
        ensure!(out.status.success(), "insmod sch_netem: {}", String::from_utf8_lossy(&out.stderr).trim());
        if self.wants("tc-order") {
            let raw = RawNetem::install(&["delay", "50ms", "20ms"])?;
            self.report("tc-order", order_through(|| raw.on("udp").map(|()| String::new()), |_| raw.off()));
        }
        if self.wants("edt-reprobe") {
            self.report("edt-reprobe", reprobe(agent_bin));
        }
        if let Some(edt_cost) = edt_cost {
            // The same fault through the same agent, now served by netem: only the leaf differs.
            let netem_cost = Agent::start(agent_bin).and_then(|agent| cost(Some(&agent)));
            let none = cost(None);
            self.report("cost", cost_outcome(edt_cost, netem_cost, none));
        }
        for (case, ours) in cases.iter().zip(edt) {
            let raw = measure_raw(case, rounds);
            let rows = match (raw, ours) {
                (Ok(raw), Ok(ours)) => judge(case, &raw, &ours),
                (raw, ours) => {
                    let err = raw.err().or(ours.err()).expect("one failed");
                    let tc_err = anyhow::anyhow!("{err:#}");
                    vec![(format!("tc-edt-{}", case.name), Err(tc_err)), (format!("agent-edt-{}", case.name), Err(err))]
                }
            };
            for (name, outcome) in rows {
                self.report(&name, outcome);
            }
        }
        Ok(())
    }
}

/// What one scenario measured.
struct Outcome {
    passed: bool,
    values: Vec<(&'static str, String)>,
}

fn ms(v: f64) -> String {
    format!("{v:.2}")
}

fn tc(args: &[&str]) -> Result<String> {
    println!("+ tc {}", args.join(" "));
    let out = Command::new(TC).args(args).output().context("running tc")?;
    ensure!(out.status.success(), "tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// sch_netem is absent (not loaded, and the kernel refuses the qdisc), sch_fq is there.
fn kernel_state() -> Result<Outcome> {
    let loaded = Path::new("/sys/module/sch_netem").exists();
    let refused = tc(&["qdisc", "add", "dev", "lo", "root", "handle", "9:", "netem", "delay", "1ms"]).is_err();
    if !refused {
        let _ = tc(&["qdisc", "del", "dev", "lo", "root"]);
    }
    let fq = tc(&["qdisc", "add", "dev", "lo", "root", "handle", "9:", "fq"]).is_ok();
    if fq {
        tc(&["qdisc", "del", "dev", "lo", "root"])?;
    }
    Ok(Outcome {
        passed: !loaded && refused && fq,
        values: vec![
            ("netem_loaded", u8::from(loaded).to_string()),
            ("netem_refused", u8::from(refused).to_string()),
            ("fq", u8::from(fq).to_string()),
        ],
    })
}

fn echo(port: u16, samples: usize) -> Result<Vec<Duration>> {
    let probe = RttProbe { samples, warmup: 2, ..RttProbe::default() };
    tcp_rtt(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port), probe).with_context(|| format!("echo to {port}"))
}

/// Per condition (0 = no fault, 1 = fault): the faulted port's and the control port's samples, per round.
#[derive(Default)]
struct Series {
    faulted: [Vec<Vec<Duration>>; 2],
    control: [Vec<Vec<Duration>>; 2],
}

impl Series {
    fn sample(&mut self, condition: usize) -> Result<()> {
        self.faulted[condition].push(echo(PORT_A, SAMPLES)?);
        self.control[condition].push(echo(PORT_B, CONTROL_SAMPLES)?);
        Ok(())
    }

    fn all(rounds: &[Vec<Duration>]) -> Stats {
        Stats::of(&rounds.concat())
    }
}

/// Rounds of (no fault, the agent's fault) in alternating order; checks the backend `faults` reports.
fn measure_agent(agent: &Agent, case: &Case, rounds: usize) -> Result<Series> {
    let mut s = Series::default();
    for round in 0..rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for condition in order {
            if condition == 0 {
                s.sample(0)?;
                continue;
            }
            let mut args = vec!["inject", "latency", "--port", "5001"];
            args.extend_from_slice(case.agent);
            let id = agent.fault(&args)?;
            let backend = agent.backend(&id);
            thread::sleep(SETTLE);
            let measured = s.sample(1);
            agent.revert(&id)?;
            measured?;
            ensure!(backend.as_deref() == Some("edt"), "fault {id} served by {backend:?}, not edt");
        }
    }
    Ok(s)
}

/// Raw netem on lo: an htb root, one class with a netem leaf, a u32 filter on A's port switched on and off.
struct RawNetem;

impl RawNetem {
    fn install(netem: &[&str]) -> Result<RawNetem> {
        let _ = Command::new(TC).args(["qdisc", "del", "dev", "lo", "root"]).output();
        tc(&["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"])?;
        tc(&[
            "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit", "quantum", "60000",
        ])?;
        let mut args = vec!["qdisc", "add", "dev", "lo", "parent", "1:10", "handle", "10:", "netem"];
        args.extend_from_slice(netem);
        tc(&args)?;
        Ok(RawNetem)
    }

    fn on(&self, protocol: &str) -> Result<()> {
        let mut args = vec!["filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "7", "u32"];
        args.extend_from_slice(&["match", "ip", "dport", "5001", "0xffff"]);
        if protocol == "udp" {
            args.extend_from_slice(&["match", "ip", "protocol", "17", "0xff"]);
        }
        args.extend_from_slice(&["flowid", "1:10"]);
        tc(&args).map(|_| ())
    }

    fn off(&self) -> Result<()> {
        tc(&["filter", "del", "dev", "lo", "parent", "1:"]).map(|_| ())
    }
}

impl Drop for RawNetem {
    fn drop(&mut self) {
        let _ = Command::new(TC).args(["qdisc", "del", "dev", "lo", "root"]).output();
    }
}

fn measure_raw(case: &Case, rounds: usize) -> Result<Series> {
    let raw = RawNetem::install(case.netem)?;
    let mut s = Series::default();
    for round in 0..rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for condition in order {
            if condition == 1 {
                raw.on("tcp")?;
                thread::sleep(SETTLE);
            }
            let measured = s.sample(condition);
            if condition == 1 {
                raw.off()?;
            }
            measured?;
        }
    }
    Ok(s)
}

/// The verdict of one case (see the module docs): the raw netem row and the agent's.
fn judge(case: &Case, raw: &Series, ours: &Series) -> Vec<(String, Result<Outcome>)> {
    let want = case.want_ms;
    let (raw_none, raw_on) = (Series::all(&raw.faulted[0]), Series::all(&raw.faulted[1]));
    let (edt_none, edt_on) = (Series::all(&ours.faulted[0]), Series::all(&ours.faulted[1]));
    let raw_extra = raw_on.median_ms - raw_none.median_ms;
    let edt_extra = edt_on.median_ms - edt_none.median_ms;
    let sigma = |s: &Stats| (s.p90_ms - s.p10_ms) / 2.563;
    let se = 1.2533
        * (sigma(&raw_on).powi(2) / raw_on.n.max(1) as f64
            + sigma(&edt_on).powi(2) / edt_on.n.max(1) as f64
            + sigma(&raw_none).powi(2) / raw_none.n.max(1) as f64
            + sigma(&edt_none).powi(2) / edt_none.n.max(1) as f64)
            .sqrt();
    let round_medians: Vec<f64> = raw.faulted[1].iter().map(|r| Stats::of(r).median_ms).collect();
    let drift =
        round_medians.iter().copied().fold(f64::MIN, f64::max) - round_medians.iter().copied().fold(f64::MAX, f64::min);
    let wanted_tol = 3.0 * se + drift;
    let tol = wanted_tol.clamp(1.0, want / 2.0);
    let diff = edt_extra - raw_extra;
    let control_extra = Series::all(&ours.control[1]).median_ms - Series::all(&ours.control[0]).median_ms;
    let control_ok = control_extra < want / 4.0;
    let raw_ok = raw_extra >= want / 2.0;
    let (spread_raw, spread_edt) = (raw_on.p90_ms - raw_on.p10_ms, edt_on.p90_ms - edt_on.p10_ms);
    let ratio = spread_edt / spread_raw.max(0.01);
    let jitter_ok = case.jitter_ms.is_none_or(|_| (0.5..=2.0).contains(&ratio));
    let raw_values = vec![
        ("ms", ms(raw_on.median_ms)),
        ("extra_ms", ms(raw_extra)),
        ("want_ms", ms(want)),
        ("p90_ms", ms(raw_on.p90_ms)),
        ("spread_ms", ms(spread_raw)),
        ("base_ms", ms(raw_none.median_ms)),
        ("n", raw_on.n.to_string()),
    ];
    let mut edt_values = vec![
        ("ms", ms(edt_on.median_ms)),
        ("extra_ms", ms(edt_extra)),
        ("want_ms", ms(want)),
        ("p90_ms", ms(edt_on.p90_ms)),
        ("spread_ms", ms(spread_edt)),
        ("base_ms", ms(edt_none.median_ms)),
        ("raw_extra_ms", ms(raw_extra)),
        ("diff_ms", format!("{diff:+.2}")),
        ("d_p90_ms", format!("{:+.2}", (edt_on.p90_ms - edt_none.median_ms) - (raw_on.p90_ms - raw_none.median_ms))),
        ("tol_ms", ms(tol)),
        ("tol_capped", u8::from(wanted_tol > want / 2.0).to_string()),
        ("other_extra_ms", ms(control_extra)),
        ("n", edt_on.n.to_string()),
    ];
    if case.jitter_ms.is_some() {
        edt_values.push(("spread_ratio", ms(ratio)));
    }
    vec![
        (format!("tc-edt-{}", case.name), Ok(Outcome { passed: raw_ok, values: raw_values })),
        (
            format!("agent-edt-{}", case.name),
            Ok(Outcome { passed: raw_ok && diff.abs() <= tol && control_ok && jitter_ok, values: edt_values }),
        ),
    ]
}

/// Numbered UDP datagrams to A's UDP echo, 1 ms apart, while `on` holds a 50 ± 20 ms delay: how many came back
/// out of order. EDT must reorder none; raw netem's jitter reorders (reported, not required).
fn order_through(on: impl FnOnce() -> Result<String>, off: impl FnOnce(&str) -> Result<()>) -> Result<Outcome> {
    let id = on()?;
    thread::sleep(SETTLE);
    let measured = (|| -> Result<(u32, u32)> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.connect(("127.0.0.1", PORT_A))?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let mut got = Vec::new();
        let mut buf = [0u8; 8];
        for seq in 0..ORDER_DATAGRAMS {
            sock.send(&seq.to_be_bytes())?;
            thread::sleep(Duration::from_millis(1));
            while let Ok(4) = sock.recv(&mut buf) {
                got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
        }
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        while let Ok(4) = sock.recv(&mut buf) {
            got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
        }
        let reordered = got.windows(2).filter(|w| w[1] < w[0]).count() as u32;
        Ok((got.len() as u32, reordered))
    })();
    off(&id)?;
    let (received, reordered) = measured?;
    Ok(Outcome {
        passed: received >= ORDER_DATAGRAMS * 9 / 10,
        values: vec![
            ("sent", ORDER_DATAGRAMS.to_string()),
            ("received", received.to_string()),
            ("reordered", reordered.to_string()),
        ],
    })
}

/// Busy CPU time of the whole guest (every CPU's user, system, irq and softirq time, `/proc/stat`) per datagram
/// while `COST_DATAGRAMS` UDP datagrams of 64 bytes go to the sink through a 1 ms delay of `agent` (or no fault),
/// in µs, and which backend served the fault.
fn cost(agent: Option<&Agent>) -> Result<(f64, String)> {
    let id = match agent {
        Some(agent) => {
            let args = ["inject", "latency", "--port", "5005", "latency=0.001", "protocol=udp"];
            Some(agent.fault(&args)?)
        }
        None => None,
    };
    let backend = match (agent, &id) {
        (Some(agent), Some(id)) => agent.backend(id).unwrap_or_else(|| "none".into()),
        _ => "no_fault".into(),
    };
    thread::sleep(SETTLE);
    let busy = || -> Result<f64> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let cpu = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        ensure!(v.len() >= 7, "short /proc/stat line: {cpu}");
        // user nice system idle iowait irq softirq: USER_HZ (100) ticks.
        Ok((v[0] + v[1] + v[2] + v[5] + v[6]) * 10_000.0)
    };
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(("127.0.0.1", PORT_SINK))?;
    let before = busy()?;
    let payload = [0u8; 64];
    for i in 0..COST_DATAGRAMS {
        sock.send(&payload)?;
        if i % 50 == 49 {
            thread::sleep(Duration::from_micros(200));
        }
    }
    thread::sleep(Duration::from_millis(100));
    let used_us = busy()? - before;
    if let (Some(agent), Some(id)) = (agent, id) {
        agent.revert(&id)?;
    }
    Ok((used_us / f64::from(COST_DATAGRAMS), backend))
}

fn cost_outcome(
    edt: Result<(f64, String)>,
    netem: Result<(f64, String)>,
    none: Result<(f64, String)>,
) -> Result<Outcome> {
    let ((edt, edt_backend), (netem, netem_backend), (none, _)) = (edt?, netem?, none?);
    Ok(Outcome {
        passed: edt_backend == "edt" && netem_backend == "netem",
        values: vec![
            ("edt_us_per_packet", ms(edt)),
            ("netem_us_per_packet", ms(netem)),
            ("no_fault_us_per_packet", ms(none)),
            ("edt_extra_us", ms(edt - none)),
            ("netem_extra_us", ms(netem - none)),
            ("packets", COST_DATAGRAMS.to_string()),
        ],
    })
}

/// A 5 s EDT fault, the guardian SIGSTOPped, the agent SIGKILLed: still delayed right after, gone once the
/// lifetime is over while our IFB is still in the kernel (so the classifier expired it, nobody removed it).
fn kill9_expiry(agent: &mut Agent) -> Result<Outcome> {
    let base = Stats::of(&echo(PORT_A, 10)?).median_ms;
    let lifetime = KILL_LIFETIME.as_secs().to_string();
    let _id = agent.fault_lifetime(&["inject", "latency", "--port", "5001", "latency=0.1"], &lifetime)?;
    let applied = Instant::now();
    let guardian = agent.guardian_pid();
    if let Some(pid) = guardian {
        // SAFETY: a pid read from the agent's state directory whose command line is the guardian's.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    agent.kill9();
    let after_kill = Stats::of(&echo(PORT_A, 5)?).median_ms - base;
    let in_time = applied.elapsed() < KILL_LIFETIME;
    thread::sleep((applied + KILL_LIFETIME + EXPIRY_MARGIN).saturating_duration_since(Instant::now()));
    let expired = Stats::of(&echo(PORT_A, 20)?).median_ms - base;
    let ifb_there = Path::new("/sys/class/net").join(AGENT_IFB).exists();
    if let Some(pid) = guardian {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let _ =
            eventually("the guardian to remove the IFB", Duration::from_secs(20), Duration::from_millis(200), || {
                !Path::new("/sys/class/net").join(AGENT_IFB).exists()
            });
    }
    Ok(Outcome {
        passed: after_kill >= 75.0 && in_time && expired < 25.0 && ifb_there,
        values: vec![
            ("after_kill_extra_ms", ms(after_kill)),
            ("after_expiry_extra_ms", ms(expired)),
            ("ifb_at_expiry", u8::from(ifb_there).to_string()),
            ("base_ms", ms(base)),
            ("guardian", guardian.map_or_else(|| "none".into(), |p| p.to_string())),
        ],
    })
}

/// With netem loaded, a restarted agent probes it and picks it.
fn reprobe(agent_bin: &Path) -> Result<Outcome> {
    let mut agent = Agent::start(agent_bin)?;
    let status = agent.cli(&["status"])?;
    let kernel = &status["network"]["kernel"];
    let backend = kernel["latency_backend"].as_str().unwrap_or("none").to_owned();
    let id = agent.fault(&["inject", "latency", "--port", "5001", "latency=0.01"])?;
    let served = agent.backend(&id);
    agent.revert(&id)?;
    agent.stop();
    Ok(Outcome {
        passed: backend == "netem" && served.as_deref() == Some("netem"),
        values: vec![("latency_backend", backend), ("fault_backend", served.unwrap_or_else(|| "none".into()))],
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The services process

/// `chaos-vm-edt serve`: TCP echo on A and B, UDP echo on A; prints `SERVING`, serves until stdin closes.
fn serve(_specs: &[String]) -> ExitCode {
    let mut servers = Vec::new();
    for port in [PORT_A, PORT_B] {
        match EchoServer::start(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)) {
            Ok(s) => servers.push(s),
            Err(err) => {
                println!("ERROR echo {port}: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    let sink = match UdpSocket::bind(("127.0.0.1", PORT_SINK)) {
        Ok(s) => s,
        Err(err) => {
            println!("ERROR udp {PORT_SINK}: {err}");
            return ExitCode::FAILURE;
        }
    };
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while sink.recv(&mut buf).is_ok() {}
    });
    let udp = match UdpSocket::bind(("127.0.0.1", PORT_A)) {
        Ok(s) => s,
        Err(err) => {
            println!("ERROR udp {PORT_A}: {err}");
            return ExitCode::FAILURE;
        }
    };
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    println!("SERVING");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    ExitCode::SUCCESS
}

struct Services {
    child: Child,
}

impl Services {
    fn start() -> Result<Self> {
        let exe = std::env::current_exe().context("locating myself")?;
        let mut child = Command::new(exe)
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning chaos-vm-edt serve")?;
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first)?;
        if first.trim() != "SERVING" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the services process said: {}", first.trim());
        }
        Ok(Self { child })
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The agent

/// A `lymph-chaos agent` of ours (standalone, its own state and pins), driven through the CLI.
struct Agent {
    bin: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn log_path() -> PathBuf {
        Path::new(AGENT_DIR).join("agent.log")
    }

    fn start(bin: &Path) -> Result<Self> {
        std::fs::create_dir_all(AGENT_DIR)?;
        let config = Path::new(AGENT_DIR).join("config.yml");
        std::fs::write(
            &config,
            "# written by chaos-vm-edt\nfaults: {allowed_processes: [\"chaos-vm-edt serve\"], allow_unbound_ports: true}\n",
        )?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(Self::log_path())?;
        let events_file = Path::new(AGENT_DIR).join("events.jsonl");
        let mut cmd = Command::new(bin);
        if available_cpus() > AGENT_CPU {
            pin_command_to_cpu(&mut cmd, AGENT_CPU);
        }
        AgentLayout {
            config: &config,
            state_dir: Path::new(AGENT_STATE_DIR),
            pin_dir: Path::new(AGENT_PIN_DIR),
            ifb: AGENT_IFB,
            events_file: &events_file,
            zookeeper: None,
            port: None,
        }
        .apply(&mut cmd)
        .stdout(log.try_clone()?)
        .stderr(log);
        println!("+ {} agent …", bin.display());
        let mut agent = Self { bin: bin.to_owned(), child: Some(cmd.spawn().context("spawning the agent")?) };
        let started = Instant::now();
        eventually("the agent to answer", AGENT_START_TIMEOUT, Duration::from_millis(500), || {
            if agent.cli_quiet(&["status"]).is_ok() {
                return Ok(true);
            }
            if let Some(status) = agent.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("the agent exited during start-up ({status})");
            }
            Ok(false)
        })?;
        println!("agent answered after {:.1} s", started.elapsed().as_secs_f64());
        Ok(agent)
    }

    fn cli(&self, args: &[&str]) -> Result<Json> {
        println!("+ lymph-chaos {}", args.join(" "));
        self.cli_quiet(args)
    }

    fn cli_quiet(&self, args: &[&str]) -> Result<Json> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--agent", AGENT_ENDPOINT, "--timeout", "30", "--json"]).args(args);
        if available_cpus() > AGENT_CPU {
            pin_command_to_cpu(&mut cmd, AGENT_CPU);
        }
        let out = cmd.output().context("running lymph-chaos")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "lymph-chaos {} exited {}: {} {}",
            args.join(" "),
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_str(&stdout).with_context(|| format!("not JSON: {stdout}"))
    }

    fn fault(&self, args: &[&str]) -> Result<String> {
        self.fault_lifetime(args, LIFETIME_S)
    }

    fn fault_lifetime(&self, args: &[&str], lifetime: &str) -> Result<String> {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--lifetime", lifetime]);
        let answer = self.cli(&full)?;
        let id = answer["id"].as_str().with_context(|| format!("no fault id in {answer}"))?;
        ensure!(answer["state"] == "active", "fault {id} is not active: {answer}");
        // The agent probes a new network fault with a few handshakes right after applying it: time the fault
        // once that measurement is done, not the probes beside it.
        eventually(format_args!("fault {id} measured by the agent"), Duration::from_secs(30), SETTLE, || {
            self.cli(&["faults"]).map(|faults| {
                let fault = faults.as_array().and_then(|all| all.iter().find(|f| f["id"] == id));
                fault.is_none_or(|f| f["observed"]["verdict"] != "pending")
            })
        })?;
        Ok(id.to_owned())
    }

    fn revert(&self, id: &str) -> Result<()> {
        self.cli(&["revert", id]).map(|_| ())
    }

    /// The backend `faults` reports for a fault.
    fn backend(&self, id: &str) -> Option<String> {
        let faults = self.cli(&["faults"]).ok()?;
        let fault = faults.as_array()?.iter().find(|f| f["id"] == id)?;
        fault["backend"].as_str().map(str::to_owned)
    }

    /// `status` and the `agent_start` event report the same, correct kernel capabilities.
    fn probe_report(&self) -> Result<Outcome> {
        let status = self.cli(&["status"])?;
        let kernel = status["network"]["kernel"].clone();
        println!("DETAIL edt-probe: status network.kernel = {kernel}");
        let events = self.cli(&["events"])?;
        let start = events
            .as_array()
            .and_then(|e| e.iter().find(|e| e["action"] == "agent_start"))
            .map(|e| e["detail"]["network"]["kernel"].clone())
            .unwrap_or_default();
        let q = &kernel["qdiscs"];
        let passed = q["netem"] == false
            && q["fq"] == true
            && q["htb"] == true
            && kernel["ifb"] == true
            && kernel["latency_backend"] == "edt"
            && start == kernel;
        Ok(Outcome {
            passed,
            values: vec![
                ("netem", q["netem"].to_string()),
                ("fq", q["fq"].to_string()),
                ("htb", q["htb"].to_string()),
                ("tbf", q["tbf"].to_string()),
                ("latency_backend", kernel["latency_backend"].to_string()),
                ("in_agent_start", u8::from(start == kernel).to_string()),
            ],
        })
    }

    fn guardian_pid(&self) -> Option<i32> {
        let pid: i32 =
            std::fs::read_to_string(Path::new(AGENT_STATE_DIR).join("guardian.pid")).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        cmdline.starts_with(b"lymph-chaos-guardian").then_some(pid)
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            println!("+ kill -KILL {} (agent)", child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            println!("+ kill -TERM {} (agent)", child.id());
            let _ = terminate(&child);
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn print_agent_log(lines: usize) {
    for line in chaos_test_support::process::log_tail(&Agent::log_path(), lines).lines() {
        println!("agent| {line}");
    }
}
