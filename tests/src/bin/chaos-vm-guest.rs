//! `chaos-vm-guest`: the scenarios that run INSIDE the qemu guest (as its `/init` command; see `chaos_tests::vm`),
//! or by hand as root in a throw-away VM (`vagrant/`): each fault applied through a real `lymph-chaos agent` and,
//! in the same boot, interleaved with it, through raw `tc netem` the way an operator would add it — the agent is
//! judged against raw netem measured beside it, never against the clock.
//!
//! Usage: `chaos-vm-guest [--agent-bin PATH] [--mutant KIND] [--accuracy] [--summary] [NAME-FILTER …]` (a
//! scenario runs when its name contains one of the filters, or when there are none; `--summary` ends with the
//! result tables, which the qemu tier prints on the host instead; `--accuracy` runs the comparisons only, with more
//! rounds, for `cargo xtask bench accuracy`). `chaos-vm-guest serve KIND=ADDR …` is the service process it starts
//! for itself (see below).
//!
//! # Layout
//! ```text
//! guest (root netns)                                           netns chaos-cli
//!   lo: 127.0.0.1 / ::1   root qdisc htb 1: (the operator's)     veth-cli 10.77.0.2 fd77::2  root htb 1:
//!   veth-srv 10.77.0.1 fd77::1  ◄──────── veth pair ────────►    (raw netem for the remote caller's requests)
//!            root qdisc fq 2: (the operator's)
//!
//! process "chaos-vm-guest serve" (the services the faults target; a child of ours, pinned to vCPU 0):
//!   echo   127.0.0.1:5001 [::1]:5001 10.77.0.1:5001 [fd77::1]:5001   port A: faulted
//!   echo   127.0.0.1:5000 [::1]:5000 10.77.0.1:5000 [fd77::1]:5000   port B: control, must stay unchanged
//!   reply  127.0.0.1:5002      lymph-style: request in on one connection, reply out on another to the caller
//! process "chaos-vm-guest" (this one, pinned to vCPU 0): the prober, runs `tc` and the `lymph-chaos` CLI
//! process "lymph-chaos agent" (pinned to vCPU 1 when there is one), started/killed/restarted by the scenarios
//! ```
//! The services live in their own process because the agent refuses to fault ports of its own parent process.
//!
//! Device stacks, each a caller in a namespace of its own behind a veth pair whose host end is
//! ```text
//!   a bridge port   vbr-p ─ br-chaos 10.78.0.1        (netns chaos-br:   vbr-c 10.78.0.2, root htb 1:)
//!   a VLAN's parent vvl-p ─ vvl-p.100 10.79.0.1       (netns chaos-vlan: vvl-c.100 10.79.0.2)
//!   a bond's slave  vbd-p ─ bond-chaos 10.80.0.1      (netns chaos-bond: vbd-c 10.80.0.2)
//! ```
//! where a packet crosses two devices of the host and must be judged once.
//!
//! # How a delay is judged
//! A comparison runs **rounds**; each round measures three conditions in a rotating order — no fault, raw netem,
//! the agent's fault — with the same probes (same client, ports and method). Raw netem is an htb class with a netem
//! leaf under the operator's root `htb 1:`, u32 filters on the port(s) steering into it (on `veth-cli` in the
//! caller's namespace for the remote caller); it is switched by adding and removing its filters. The agent's fault
//! is injected and reverted through the CLI. The verdict, per target:
//! - raw netem must add at least half the requested delay (else the boot cannot judge anything);
//! - `diff` = median(agent) − median(raw) must lie within `tol` = 3 × the standard error of that difference of
//!   medians (each σ estimated from its p10–p90, robust against TCG's outliers) + the drift of raw netem's
//!   per-round medians (how much this boot moves between rounds); at least 1 ms, at most half the requested delay
//!   (so a delay on the wrong port, a doubled or a missing delay always fails);
//! - the control port's median may grow by less than a quarter of the requested delay over its own interleaved
//!   no-fault rounds;
//! - with jitter, the agent's p10–p90 spread is within ½–2× raw netem's.
//!
//! A comparison that fails, or whose tolerance had to be capped, gets two more rounds (up to [`MAX_ROUNDS`]); the
//! data accumulates, nothing is measured again to replace it.
//!
//! # Scenarios, in order (each prints `RESULT <name> <pass|fail> key=value …`)
//! ```text
//! baseline                  RTT to A and B, v4 and v6, no fault; guest timer accuracy
//! ── operator's qdiscs: `htb 1:` as root of lo, `fq 2:` as root of veth-srv (must survive everything below)
//! ── agent started: `lymph-chaos agent --config … --state-dir … --pin-dir … --events-file …` (vCPU 1)
//! {tc,agent}-delay-10ms-v{4,6}   `inject latency --port A latency=0.01` vs netem `delay 10ms`
//! {tc,agent}-delay-100ms-v{4,6}  the CLI shortcut `latency --port A 0.1` vs netem `delay 100ms`
//! {tc,agent}-jitter-50ms-20ms    `latency=0.05 jitter=0.02 distribution=normal` vs `delay 50ms 20ms distribution
//!                           normal`
//! {tc,agent}-direction-from-50ms `direction=from` vs netem on the source port (echo replies leave A)
//! {tc,agent}-direction-both-50ms `direction=both` vs netem on both ports: a round trip grows twice
//! {tc,agent}-two-faults-{echo,reply}  30 ms on A and 60 ms on 5002 at once (two IFB classes) vs two netem classes
//! {tc,agent}-ingress-veth-v{4,6} the client in chaos-cli calls 10.77.0.1:A / [fd77::1]:A (veth ingress) vs netem
//!                           on the caller's veth egress
//! {tc,agent}-reply-conn     lymph call pattern on port 5002 (reply on a separate connection) → +delay once
//! {tc,agent}-bridge-latency-50ms  the caller behind the bridge port calls 10.78.0.1:A → +50 ms once (port and
//!                           bridge both see the request) vs netem on the caller's veth
//! {tc,agent}-loss-30pct-udp `inject loss --port A loss=30 protocol=udp` vs netem `loss 30%`, 2000 datagrams each
//! agent-loss-30pct-udp-{vlan,bond}  the same from the caller behind the VLAN / the bond: 30 % ± 5 % lost and the
//!                           classifier counted each datagram exactly once
//! mutant-{wrong-port,double-delay,no-expiry}  the judgement above and the expiry check, run against requests
//!                           made wrong on purpose (the port, twice the delay, a lifetime that never ends): the row
//!                           passes only when the judgement FAILS — the tier proves it can fail
//! agent-kill9-expiry        5 s fault, guardian SIGSTOPped, agent SIGKILLed: delay still there at once, gone after
//!                           5 s with every object still in the kernel; then SIGCONT: the guardian's cleanup, timed
//! agent-restart-clean       restart after that: no filters, IFB, clsact of ours
//! agent-restart-leftovers   fault, SIGKILL agent AND its guardian (leftovers in the kernel), restart: all gone
//! agent-stop-clean          SIGTERM: 0 objects of ours, pins included
//! agent-root-qdisc-kept     the operator's root qdiscs, checked at every step above, never changed
//! ```
//! With `--mutant KIND` every request the agent gets is made wrong that way (the `mutant-*` rows are then skipped):
//! the host side (`tests/tests/vm.rs` with `CHAOS_VM_MUTANT`) requires the rows that kind must break to fail.
//!
//! Time-dependent functional checks (kill -9, restart) use margins of a quarter of the delay: wide enough for a busy
//! host, narrow enough that a fault that never ends fails them. Everything here runs pinned to vCPU 0 (accuracy
//! under TCG, see `PROBE_CPU`).
//!
//! On loopback every packet, in both directions, leaves through `lo` egress: a filter on the destination port
//! delays the requests only (replies go to the client's ephemeral port), so the round trip grows by the delay once.

use std::{
    cell::{Cell, RefCell},
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use chaos_agent::{
    cli::{Cli, request_for},
    rpc::client::Client,
};
use chaos_test_support::{
    eventually, proc_stat,
    process::{terminate, wait_timeout},
};
use chaos_tests::{
    agent::AgentLayout,
    measure::{
        EchoServer, LossProbe, ReplyServer, RttProbe, Stats, available_cpus, in_netns, pin_command_to_cpu, pin_to_cpu,
        reply_rtt, tcp_rtt, udp_loss, udp_loss_from,
    },
    vm::{ScenarioResult, comparison_table, format_table},
};
use clap::Parser as _;
use serde_json::Value as Json;

/// The vCPU the prober and its services (and so netem's timer, armed where packets are enqueued) run on; a
/// cross-vCPU wake-up under TCG costs up to a 4 ms tick (see `chaos_tests::measure::pin_to_cpu`).
const PROBE_CPU: usize = 0;
/// The vCPU the agent (and the CLI) run on, when the guest has two.
const AGENT_CPU: usize = 1;
/// Port A, which the scenarios fault.
const PORT_FAULTED: u16 = 5001;
/// Port B, which must stay untouched.
const PORT_CONTROL: u16 = 5000;
/// The lymph-style service (reply on a separate connection).
const PORT_REPLY: u16 = 5002;
/// The TCP sink the remote caller sends bulk data to through a loss fault.
const PORT_TCP_LOSS: u16 = 5004;
/// TCP loss: the requested share of segments, bytes per transfer, rounds per condition, and how close the
/// classifier's drop share must be to the request (percentage points, over thousands of segments).
const TCP_LOSS_PCT: f64 = 10.0;
const TCP_LOSS_BYTES: usize = 4 << 20;
const TCP_LOSS_ROUNDS: usize = 2;
const TCP_LOSS_TOLERANCE_PCT: f64 = 3.0;
/// The port of the loss scenarios behind device stacks: no service listens there (the UDP sink is the prober's),
/// so the agent's rule covers every address of this host.
const PORT_STACK_LOSS: u16 = 5003;
/// Absolute paths: busybox's ash would run its own `tc`/`ip` applets.
const TC: &str = "/usr/sbin/tc";
const IP: &str = "/usr/sbin/ip";
const LO: &str = "lo";
/// The remote caller's namespace and the veth pair to it.
const NETNS: &str = "chaos-cli";
const VETH_SRV: &str = "veth-srv";
const VETH_CLI: &str = "veth-cli";
const SRV_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CLI_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const SRV_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
const CLI_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
/// The root htb every raw netem class hangs under (the operator's on lo; ours on veth-cli in the caller's netns).
/// Its `default` class does not exist, so unclassified packets pass unshaped.
const HTB_ROOT: &str = "1:";
/// The operator's root qdiscs, installed before the agent starts and checked after every step.
const OPERATOR_QDISCS: &[(&str, &str, &[&str])] =
    &[(LO, "htb 1:", &["handle", "1:", "htb", "default", "1"]), (VETH_SRV, "fq 2:", &["handle", "2:", "fq"])];
/// The agent under test.
const AGENT_ENDPOINT: &str = "tcp://127.0.0.1:4575";
const AGENT_PORT: u16 = 4575;
const AGENT_DIR: &str = "/tmp/chaos-vm-agent";
const AGENT_STATE_DIR: &str = "/run/lymph-chaos-vm";
const AGENT_PIN_DIR: &str = "/sys/fs/bpf/lymph-chaos-vm";
const AGENT_IFB: &str = "lchaos0";
/// Prefix of the agent's tc filter names.
const AGENT_FILTER_PREFIX: &str = "lymph-chaos:";
/// A TCG guest runs a debug agent slowly: generous timeouts.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(90);
const CLI_TIMEOUT_S: &str = "30";
/// Pause after a fault was switched on (raw or ours), before measuring: the CLI process on the other vCPU ends.
const SETTLE: Duration = Duration::from_millis(150);
/// Lifetime of ordinary faults (each is reverted when its round ends).
const FAULT_LIFETIME_S: &str = "120";
/// Lifetime of the fault the agent is SIGKILLed with: long enough to measure the delay after the kill on a busy
/// host (1–2 s), short enough to wait for.
const KILL_FAULT_LIFETIME: Duration = Duration::from_secs(5);
/// Lifetime the no-expiry mutant believes it asked for.
const MUTANT_EXPIRY_LIFETIME: Duration = Duration::from_secs(2);
/// After a lifetime ends, wait this much longer before checking the delay is gone (timer slack, a busy host).
const EXPIRY_MARGIN: Duration = Duration::from_millis(500);
/// How long the guardian may take to clean up once resumed after the last fault expired.
const GUARDIAN_WAIT: Duration = Duration::from_secs(10);
/// Rounds of a comparison, and the most it may grow to when its verdict fails or its tolerance was capped.
const ROUNDS: usize = 4;
const MORE_ROUNDS: usize = 2;
const MAX_ROUNDS: usize = 8;
/// Rounds for `--accuracy` (the benchmark: more data, no verdict extension needed).
const ACCURACY_ROUNDS: usize = 8;
/// Tolerance of `median(agent) − median(raw)`: 3 standard errors + raw netem's drift, within these bounds.
const TOL_SE_FACTOR: f64 = 3.0;
const TOL_MIN_MS: f64 = 1.0;
const TOL_MAX_FRACTION: f64 = 0.5;
/// Raw netem must add at least this share of the requested delay, or nothing can be judged in this boot.
const RAW_MIN_FRACTION: f64 = 0.5;
/// The control port may not grow by this share of the (smallest) requested delay.
const CONTROL_FRACTION: f64 = 0.25;
/// Functional timing checks: "still delayed" means ≥ ¾ of the delay added, "gone" means < ¼.
const STILL_FRACTION: f64 = 0.75;
const GONE_FRACTION: f64 = 0.25;
/// With jitter, the agent's p10–p90 spread over raw netem's must lie within these bounds.
const SPREAD_RATIO: (f64, f64) = (0.5, 2.0);
/// Control-port samples per condition and round.
const CONTROL_SAMPLES: usize = 6;
/// Baseline loopback RTT must be below this for any delay to be measurable.
const BASELINE_MAX_MS: f64 = 20.0;
/// Loss is right within this many percentage points (≈ 5 σ for 2000 datagrams at 30 %).
const LOSS_PCT: f64 = 30.0;
const LOSS_TOLERANCE_PCT: f64 = 5.0;
const CONTROL_LOSS_MAX_PCT: f64 = 1.0;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        return serve(&args[1..]);
    }
    let mut opts = Options::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--agent-bin" => opts.agent_bin = it.next().map(PathBuf::from),
            "--summary" => opts.summary = true,
            "--accuracy" => opts.accuracy = true,
            "--mutant" => match it.next().as_deref().map(Mutant::parse) {
                Some(Some(m)) => opts.mutant = m,
                _ => {
                    println!("--mutant needs one of: {}", Mutant::NAMES.join(", "));
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!(
                    "usage: chaos-vm-guest [--agent-bin PATH] [--mutant {}] [--accuracy] [--summary] [NAME-FILTER …]  \
                     (as root)",
                    Mutant::NAMES.join("|")
                );
                return ExitCode::SUCCESS;
            }
            _ => opts.only.push(arg),
        }
    }
    if let Err(err) = pin_to_cpu(PROBE_CPU) {
        println!("DETAIL setup: pinning to CPU {PROBE_CPU}: {err}");
    }
    let summary = opts.summary;
    let mut run = Run { only: std::mem::take(&mut opts.only), failed: false, results: Vec::new() };
    let code = match scenarios(&mut run, &opts) {
        Ok(()) if !run.failed => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(err) => {
            println!("DETAIL setup: {err:#}");
            println!("RESULT setup fail error=see_detail");
            ExitCode::FAILURE
        }
    };
    teardown();
    if summary {
        println!("\n{}", format_table(&run.results));
        println!("ours vs raw tc netem (RTT in ms; added = median − interleaved no-fault median):");
        println!("{}", comparison_table(&run.results));
    }
    code
}

#[derive(Default)]
struct Options {
    agent_bin: Option<PathBuf>,
    summary: bool,
    accuracy: bool,
    mutant: Mutant,
    only: Vec<String>,
}

fn scenarios(run: &mut Run, opts: &Options) -> Result<()> {
    teardown(); // leftovers of an interrupted run by hand
    let veth = match Topology::create() {
        Ok(()) => true,
        Err(err) => {
            println!("DETAIL setup: no veth pair / namespace (the ingress scenarios will fail): {err:#}");
            false
        }
    };
    let stacks = match Stack::ALL.iter().try_for_each(|s| s.create()) {
        Ok(()) => true,
        Err(err) => {
            println!("DETAIL setup: device stacks (bridge, VLAN, bond; their scenarios will fail): {err:#}");
            false
        }
    };
    let _services = Services::start(veth, stacks).context("starting the services process")?;
    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    run.report("baseline", baseline(v4, v6));

    let Some(bin) = opts.agent_bin.clone().or_else(find_agent_bin) else {
        println!("DETAIL agent-setup: no lymph-chaos binary (give --agent-bin PATH or put it on PATH)");
        run.report("agent-setup", Ok(Outcome::fail(vec![("error", "no_agent_binary".into())])));
        return Ok(());
    };
    let mut qdiscs = QdiscWatch::install(veth)?;
    let mut agent = match Agent::start(&bin, opts.mutant) {
        Ok(agent) => agent,
        Err(err) => {
            run.report("agent-setup", Err(err));
            print_agent_log(60);
            return Ok(());
        }
    };
    let failed_before = run.failed;
    qdiscs.check("agent-started");
    let rounds = if opts.accuracy { ACCURACY_ROUNDS } else { ROUNDS };

    for comparison in comparisons(veth, stacks) {
        if !comparison.targets.iter().any(|t| run.wanted(&t.row)) {
            continue;
        }
        let first = comparison.targets[0].row.clone();
        match comparison.run(&agent, rounds, !opts.accuracy) {
            Ok(rows) => {
                for (name, outcome) in rows {
                    run.report(&name, Ok(outcome));
                }
            }
            Err(err) => {
                println!("DETAIL agent-{first}: {err:#}");
                for target in &comparison.targets {
                    run.report(
                        &format!("agent-{}", target.row),
                        Ok(Outcome::fail(vec![("error", "see_detail".into())])),
                    );
                }
            }
        }
        qdiscs.check(&format!("after-{first}"));
    }
    if opts.accuracy {
        agent.stop();
        return Ok(());
    }
    if run.wanted("loss") {
        let (raw, ours) = loss_comparison(&agent);
        run.report("tc-loss-30pct-udp", raw);
        run.report("agent-loss-30pct-udp", ours);
        if veth {
            let (raw, ours) = tcp_loss_comparison(&agent);
            run.report("tc-loss-10pct-tcp", raw);
            run.report("agent-loss-10pct-tcp", ours);
        }
        for stack in [&Stack::VLAN, &Stack::BOND] {
            let name = format!("agent-loss-30pct-udp-{}", stack.name);
            let outcome = if stacks { stack_loss(&agent, stack) } else { Err(anyhow::anyhow!("no device stacks")) };
            run.report(&name, outcome);
        }
    }
    if opts.mutant == Mutant::None {
        for mutant in [Mutant::WrongPort, Mutant::DoubleDelay, Mutant::NoExpiry] {
            let name = format!("mutant-{}", mutant.name());
            if run.wanted(&name) {
                agent.mutant.set(mutant);
                let outcome = mutant_caught(&agent, mutant);
                agent.mutant.set(Mutant::None);
                run.report(&name, outcome);
            }
        }
    }
    if run.wanted("agent-kill") || run.wanted("agent-restart") {
        let outcome = kill9_expiry(&mut agent);
        qdiscs.check("after-kill9");
        run.report("agent-kill9-expiry", outcome);
        let outcome = agent.restart().and_then(|()| restart_clean());
        qdiscs.check("after-restart");
        run.report("agent-restart-clean", outcome);
        let outcome = restart_with_leftovers(&mut agent);
        qdiscs.check("after-restart-leftovers");
        run.report("agent-restart-leftovers", outcome);
    }
    let stopped = agent.stop();
    let objects = AgentObjects::now();
    let outcome = Outcome {
        passed: stopped && objects.is_empty(),
        values: vec![("stopped_in_time", u8::from(stopped).to_string()), ("objects", objects.summary())],
    };
    qdiscs.check("after-stop");
    run.report("agent-stop-clean", Ok(outcome));
    run.report("agent-root-qdisc-kept", Ok(qdiscs.outcome()));
    if run.failed && !failed_before {
        print_agent_log(80);
    } else {
        print_agent_warnings();
    }
    Ok(())
}

/// Which scenarios run, and whether one failed.
struct Run {
    only: Vec<String>,
    failed: bool,
    /// What was reported, for `--summary`.
    results: Vec<ScenarioResult>,
}

impl Run {
    fn wanted(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }

    fn report(&mut self, name: &str, outcome: Result<Outcome>) {
        let outcome = outcome.unwrap_or_else(|err| {
            println!("DETAIL {name}: {err:#}");
            Outcome::fail(vec![("error", "see_detail".into())])
        });
        self.failed |= !outcome.passed;
        if !outcome.passed {
            // What the kernel had when the scenario failed.
            for dev in [LO, VETH_SRV, AGENT_IFB] {
                if let Ok(out) = Command::new(TC).args(["-s", "qdisc", "show", "dev", dev]).output() {
                    print!("{}", String::from_utf8_lossy(&out.stdout));
                }
            }
        }
        outcome.print(name);
        self.results.push(ScenarioResult {
            name: name.to_owned(),
            passed: outcome.passed,
            values: outcome.values.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
        });
    }
}

/// What a scenario measured and whether that is right.
struct Outcome {
    passed: bool,
    values: Vec<(&'static str, String)>,
}

impl Outcome {
    fn fail(values: Vec<(&'static str, String)>) -> Self {
        Self { passed: false, values }
    }

    fn print(&self, name: &str) {
        let values: Vec<String> = self.values.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("RESULT {name} {} {}", if self.passed { "pass" } else { "fail" }, values.join(" "));
    }
}

fn ms(value: f64) -> String {
    format!("{value:.2}")
}

// ---------------------------------------------------------------------------------------------------------------
// Requests made wrong on purpose

/// How the agent's requests are made wrong: the "deliberately wrong agent" the tier must fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Mutant {
    #[default]
    None,
    /// The fault goes to the control port instead of the target's.
    WrongPort,
    /// Twice the requested delay.
    DoubleDelay,
    /// A lifetime that does not end within the test.
    NoExpiry,
}

impl Mutant {
    const NAMES: [&'static str; 3] = ["wrong-port", "double-delay", "no-expiry"];

    fn parse(s: &str) -> Option<Self> {
        match s {
            "wrong-port" => Some(Self::WrongPort),
            "double-delay" => Some(Self::DoubleDelay),
            "no-expiry" => Some(Self::NoExpiry),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::WrongPort => "wrong-port",
            Self::DoubleDelay => "double-delay",
            Self::NoExpiry => "no-expiry",
        }
    }

    /// The CLI arguments of a fault request, made wrong.
    fn apply(self, args: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let shortcut = out.iter().take(2).any(|a| a == "latency");
        for i in 0..out.len() {
            let after = |flag: &str| i > 0 && out[i - 1] == flag;
            match self {
                Self::None => {}
                Self::WrongPort if after("--port") => out[i] = PORT_CONTROL.to_string(),
                Self::DoubleDelay => {
                    if let Some(v) = out[i].strip_prefix("latency=").and_then(|v| v.parse::<f64>().ok()) {
                        out[i] = format!("latency={}", v * 2.0);
                    } else if shortcut && i >= 2 && out[i - 2] == "--port" {
                        // The shortcut `latency --port A SECONDS`.
                        if let Ok(v) = out[i].parse::<f64>() {
                            out[i] = format!("{}", v * 2.0);
                        }
                    }
                }
                Self::NoExpiry if after("--lifetime") => out[i] = "3600".into(),
                _ => {}
            }
        }
        out
    }
}

/// Runs the check a mutant must break, with the agent's requests made wrong that way; passes when the check
/// failed (the tier caught the wrong agent).
fn mutant_caught(agent: &Agent, mutant: Mutant) -> Result<Outcome> {
    match mutant {
        Mutant::WrongPort | Mutant::DoubleDelay => {
            let comparison = delay_10ms_v4();
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
fn delay_gone(extra_ms: f64, want_ms: f64) -> bool {
    extra_ms < want_ms * GONE_FRACTION
}

// ---------------------------------------------------------------------------------------------------------------
// Interleaved comparisons: raw netem vs the agent

/// How one target is probed.
#[derive(Clone, Copy)]
enum Probe {
    /// Echo round trips from here (the guest's root namespace).
    Echo(SocketAddr),
    /// Echo round trips from a caller's namespace (over the veth pair, or a stack of devices).
    Remote(&'static str, SocketAddr),
    /// Lymph-style request/reply round trips (reply on a separate connection) from here.
    Reply(SocketAddr),
}

impl Probe {
    fn sample(self, samples: usize) -> Result<Vec<Duration>> {
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

fn probe(samples: usize) -> RttProbe {
    RttProbe { samples, warmup: 1, ..RttProbe::default() }
}

/// One measured target of a comparison: its rows are `tc-<row>` and `agent-<row>`.
struct Target {
    row: String,
    probe: Probe,
    /// The port that must stay untouched, probed the same way (an echo).
    control: Probe,
    want_ms: f64,
    samples: usize,
}

/// A raw netem leg: an htb class under [`HTB_ROOT`] with a netem leaf, and the u32 matches steering into it.
struct RawLeg {
    /// `None`: the guest's root namespace; `Some`: the caller's.
    netns: Option<&'static str>,
    dev: &'static str,
    /// Class minor (hex digits as tc writes them), also the netem leaf's handle.
    class: &'static str,
    netem: Vec<&'static str>,
    /// (`sport` or `dport`, port).
    matches: Vec<(&'static str, u16)>,
}

/// A fault measured three ways per round: none, raw netem, the agent.
struct Comparison {
    targets: Vec<Target>,
    raw: Vec<RawLeg>,
    /// One agent fault per entry (CLI arguments after `inject`, or a whole shortcut subcommand).
    ours: Vec<Vec<&'static str>>,
    jitter_ms: Option<f64>,
}

/// `[no fault, raw, ours]` indices in each round's order: every condition is first, second and third equally
/// often over six rounds.
const ORDERS: [[usize; 3]; 6] = [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 2, 1], [2, 1, 0], [1, 0, 2]];
const NONE: usize = 0;
const RAW: usize = 1;
const OURS: usize = 2;

/// Samples of one target: `[condition][round]`.
#[derive(Default, Clone)]
struct Series {
    rounds: [Vec<Vec<Duration>>; 3],
    control: [Vec<Vec<Duration>>; 3],
}

impl Series {
    fn all(&self, condition: usize) -> Stats {
        Stats::of(&self.rounds[condition].concat())
    }

    fn control_all(&self, condition: usize) -> Stats {
        Stats::of(&self.control[condition].concat())
    }
}

fn echo(ip: IpAddr, port: u16) -> Probe {
    Probe::Echo(SocketAddr::new(ip, port))
}

fn delay_target(row: &str, probe: Probe, control: Probe, want_ms: f64) -> Target {
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

fn lo_leg(class: &'static str, netem: Vec<&'static str>, matches: Vec<(&'static str, u16)>) -> RawLeg {
    RawLeg { netns: None, dev: LO, class, netem, matches }
}

fn delay_10ms_v4() -> Comparison {
    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    Comparison {
        targets: vec![delay_target("delay-10ms-v4", echo(v4, PORT_FAULTED), echo(v4, PORT_CONTROL), 10.0)],
        raw: vec![lo_leg("30", vec!["delay", "10ms"], vec![("dport", PORT_FAULTED)])],
        ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.01"]],
        jitter_ms: None,
    }
}

/// Every comparison the tier runs, in order.
fn comparisons(veth: bool, stacks: bool) -> Vec<Comparison> {
    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let a = PORT_FAULTED;
    let both_families = |name: &str, want: f64| {
        vec![
            delay_target(&format!("{name}-v4"), echo(v4, a), echo(v4, PORT_CONTROL), want),
            delay_target(&format!("{name}-v6"), echo(v6, a), echo(v6, PORT_CONTROL), want),
        ]
    };
    let mut list = vec![
        Comparison {
            targets: both_families("delay-10ms", 10.0),
            raw: vec![lo_leg("30", vec!["delay", "10ms"], vec![("dport", a)])],
            ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.01"]],
            jitter_ms: None,
        },
        Comparison {
            targets: both_families("delay-100ms", 100.0),
            raw: vec![lo_leg("30", vec!["delay", "100ms"], vec![("dport", a)])],
            // The shortcut form of the CLI.
            ours: vec![vec!["latency", "--port", "5001", "0.1"]],
            jitter_ms: None,
        },
        Comparison {
            targets: vec![Target {
                samples: 15,
                ..delay_target("jitter-50ms-20ms", echo(v4, a), echo(v4, PORT_CONTROL), 50.0)
            }],
            raw: vec![lo_leg("30", vec!["delay", "50ms", "20ms", "distribution", "normal"], vec![("dport", a)])],
            ours: vec![vec![
                "inject",
                "latency",
                "--port",
                "5001",
                "latency=0.05",
                "jitter=0.02",
                "distribution=normal",
            ]],
            jitter_ms: Some(20.0),
        },
        // Directions on loopback (module docs of chaos_agent::faults::network): `from` delays the echo replies
        // (they leave port A), `both` requests and replies: a round trip grows by the delay once / twice.
        Comparison {
            targets: vec![delay_target("direction-from-50ms", echo(v4, a), echo(v4, PORT_CONTROL), 50.0)],
            raw: vec![lo_leg("30", vec!["delay", "50ms"], vec![("sport", a)])],
            ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.05", "direction=from"]],
            jitter_ms: None,
        },
        Comparison {
            targets: vec![delay_target("direction-both-50ms", echo(v4, a), echo(v4, PORT_CONTROL), 100.0)],
            raw: vec![lo_leg("30", vec!["delay", "50ms"], vec![("dport", a), ("sport", a)])],
            ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.05", "direction=both"]],
            jitter_ms: None,
        },
        // Two shaping faults at once (two HTB classes on the IFB, each with its own netem leaf).
        Comparison {
            targets: vec![
                delay_target("two-faults-echo-30ms", echo(v4, a), echo(v4, PORT_CONTROL), 30.0),
                delay_target(
                    "two-faults-reply-60ms",
                    Probe::Reply(SocketAddr::new(v4, PORT_REPLY)),
                    echo(v4, PORT_CONTROL),
                    60.0,
                ),
            ],
            raw: vec![
                lo_leg("30", vec!["delay", "30ms"], vec![("dport", a)]),
                lo_leg("31", vec!["delay", "60ms"], vec![("dport", PORT_REPLY)]),
            ],
            ours: vec![
                vec!["inject", "latency", "--port", "5001", "latency=0.03"],
                vec!["inject", "latency", "--port", "5002", "latency=0.06"],
            ],
            jitter_ms: None,
        },
        Comparison {
            targets: vec![delay_target(
                "reply-conn",
                Probe::Reply(SocketAddr::new(v4, PORT_REPLY)),
                echo(v4, PORT_CONTROL),
                100.0,
            )],
            raw: vec![lo_leg("30", vec!["delay", "100ms"], vec![("dport", PORT_REPLY)])],
            ours: vec![vec!["inject", "latency", "--port", "5002", "latency=0.1"]],
            jitter_ms: None,
        },
    ];
    if veth {
        let remote = |ip: IpAddr, port| Probe::Remote(NETNS, SocketAddr::new(ip, port));
        let (s4, s6) = (IpAddr::V4(SRV_V4), IpAddr::V6(SRV_V6));
        list.push(Comparison {
            targets: vec![
                delay_target("ingress-veth-v4", remote(s4, a), remote(s4, PORT_CONTROL), 100.0),
                delay_target("ingress-veth-v6", remote(s6, a), remote(s6, PORT_CONTROL), 100.0),
            ],
            // The caller's requests leave veth-cli: netem there adds what the agent adds at veth-srv's ingress.
            raw: vec![RawLeg {
                netns: Some(NETNS),
                dev: VETH_CLI,
                class: "30",
                netem: vec!["delay", "100ms"],
                matches: vec![("dport", a)],
            }],
            ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.1"]],
            jitter_ms: None,
        });
    }
    if stacks {
        // A caller behind a bridge port (the layout of a host running containers): the agent's classifier sees
        // the request at the port and at the bridge, and must delay it once.
        let addr = |port| Probe::Remote(Stack::BRIDGE.netns, SocketAddr::new(IpAddr::V4(Stack::BRIDGE.host), port));
        list.push(Comparison {
            targets: vec![delay_target("bridge-latency-50ms", addr(a), addr(PORT_CONTROL), 50.0)],
            raw: vec![RawLeg {
                netns: Some(Stack::BRIDGE.netns),
                dev: Stack::BRIDGE.peer,
                class: "30",
                netem: vec!["delay", "50ms"],
                matches: vec![("dport", a)],
            }],
            ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.05"]],
            jitter_ms: None,
        });
    }
    list
}

/// A caller in a namespace of its own, joined to this host through a stack of devices: a veth pair whose host end
/// is a bridge port, carries a VLAN, or is a bond's slave; the host's address sits on the top device.
struct Stack {
    name: &'static str,
    netns: &'static str,
    /// The host end of the veth pair, and the caller's end.
    port: &'static str,
    peer: &'static str,
    /// The device the host's address sits on (the bridge, the VLAN device, the bond).
    top: &'static str,
    host: Ipv4Addr,
    caller: Ipv4Addr,
}

impl Stack {
    const BRIDGE: Stack = Stack {
        name: "bridge",
        netns: "chaos-br",
        port: "vbr-p",
        peer: "vbr-c",
        top: "br-chaos",
        host: Ipv4Addr::new(10, 78, 0, 1),
        caller: Ipv4Addr::new(10, 78, 0, 2),
    };
    const VLAN: Stack = Stack {
        name: "vlan",
        netns: "chaos-vlan",
        port: "vvl-p",
        peer: "vvl-c",
        top: "vvl-p.100",
        host: Ipv4Addr::new(10, 79, 0, 1),
        caller: Ipv4Addr::new(10, 79, 0, 2),
    };
    const BOND: Stack = Stack {
        name: "bond",
        netns: "chaos-bond",
        port: "vbd-p",
        peer: "vbd-c",
        top: "bond-chaos",
        host: Ipv4Addr::new(10, 80, 0, 1),
        caller: Ipv4Addr::new(10, 80, 0, 2),
    };
    const ALL: [&'static Stack; 3] = [&Self::BRIDGE, &Self::VLAN, &Self::BOND];

    fn create(&self) -> Result<()> {
        let ns = self.netns;
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["link", "add", self.port, "type", "veth", "peer", "name", self.peer, "netns", ns])?;
        let caller_dev = match self.name {
            "bridge" => {
                ip(&["link", "add", self.top, "type", "bridge"])?;
                ip(&["link", "set", self.port, "master", self.top])?;
                ip(&["link", "set", self.port, "up"])?;
                self.peer.to_owned()
            }
            "vlan" => {
                ip(&["link", "set", self.port, "up"])?;
                ip(&["link", "add", "link", self.port, "name", self.top, "type", "vlan", "id", "100"])?;
                let dev = format!("{}.100", self.peer);
                ip(&["-n", ns, "link", "set", self.peer, "up"])?;
                ip(&["-n", ns, "link", "add", "link", self.peer, "name", &dev, "type", "vlan", "id", "100"])?;
                dev
            }
            _ => {
                ip(&["link", "add", self.top, "type", "bond", "mode", "active-backup"])?;
                ip(&["link", "set", self.port, "master", self.top])?;
                self.peer.to_owned()
            }
        };
        ip(&["addr", "add", &format!("{}/24", self.host), "dev", self.top])?;
        ip(&["link", "set", self.top, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{}/24", self.caller), "dev", &caller_dev])?;
        ip(&["-n", ns, "link", "set", self.peer, "up"])?;
        ip(&["-n", ns, "link", "set", &caller_dev, "up"])?;
        if self.name == "bridge" {
            tc_in(Some(ns), &["qdisc", "add", "dev", self.peer, "root", "handle", HTB_ROOT, "htb", "default", "1"])?;
        }
        // Up and forwarding before the scenarios: a bridge port learns and a bond elects its active slave.
        let probe = SocketAddr::new(IpAddr::V4(self.host), 9);
        let ns_path = Path::new("/run/netns").join(ns);
        eventually(
            format_args!("{}: {} reaching {} from {ns}", self.name, self.caller, self.host),
            Duration::from_secs(10),
            Duration::from_millis(200),
            || {
                in_netns(&ns_path, || {
                    // Refused (RST) means the host answered: the path works.
                    matches!(TcpStream::connect_timeout(&probe, Duration::from_millis(300)),
                        Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
                })
            },
        )
    }

    fn teardown(&self) {
        let _ = Command::new(IP).args(["netns", "del", self.netns]).output();
        let _ = Command::new(IP).args(["link", "del", self.port]).output();
        let _ = Command::new(IP).args(["link", "del", self.top]).output();
    }
}

/// What one bulk transfer from the caller's namespace to the TCP sink cost the sender, from its `TCP_INFO`.
#[derive(Clone, Copy, Default)]
struct Transfer {
    segs_out: u64,
    retrans: u64,
}

/// Sends [`TCP_LOSS_BYTES`] from the caller's namespace to the sink and waits until the sink has read them all
/// (it closes after the sender's FIN); the sender's segment and retransmission counts.
fn tcp_transfer() -> Result<Transfer> {
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
fn tcp_loss_comparison(agent: &Agent) -> (Result<Outcome>, Result<Outcome>) {
    let legs = [RawLeg {
        netns: Some(NETNS),
        dev: VETH_CLI,
        class: "32",
        netem: vec!["loss", "10%"],
        matches: vec![("dport", PORT_TCP_LOSS)],
    }];
    let mut raw_total = Transfer::default();
    let mut ours_total = Transfer::default();
    let (mut packets, mut drops) = (0u64, 0u64);
    let measured = (|| -> Result<()> {
        let raw = RawNetem::install(&legs)?;
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
        Ok(())
    })();
    if let Err(err) = measured {
        return (Err(anyhow::anyhow!("{err:#}")), Err(err));
    }
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

/// UDP loss from a caller behind a VLAN or a bond: 30 % of the datagrams, and each counted once by the classifier
/// (a packet judged at the VLAN device and its parent, or at the bond and its slave, would count twice and be
/// dropped at a higher rate).
fn stack_loss(agent: &Agent, stack: &Stack) -> Result<Outcome> {
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

/// Raw netem switched on and off by its filters; its classes and leaves are removed on drop.
struct RawNetem<'a> {
    legs: &'a [RawLeg],
}

impl<'a> RawNetem<'a> {
    fn install(legs: &'a [RawLeg]) -> Result<Self> {
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
    fn on(&self) -> Result<()> {
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
    fn off(&self) -> Result<()> {
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
    fn run(&self, agent: &Agent, rounds: usize, extend: bool) -> Result<Vec<(String, Outcome)>> {
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
    fn measure(&self, condition: usize, raw: &RawNetem, agent: &Agent, series: &mut [Series]) -> Result<()> {
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

    fn judge(&self, target: &Target, s: &Series, rounds: usize) -> Vec<(String, Outcome)> {
        let (none, raw, ours) = (s.all(NONE), s.all(RAW), s.all(OURS));
        let (c_none, c_raw, c_ours) = (s.control_all(NONE), s.control_all(RAW), s.control_all(OURS));
        let want = target.want_ms;
        let raw_extra = raw.median_ms - none.median_ms;
        let ours_extra = ours.median_ms - none.median_ms;
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
        let tol = wanted_tol.clamp(TOL_MIN_MS, max_tol);
        let diff = ours.median_ms - raw.median_ms;
        let control_limit = self.min_want() * CONTROL_FRACTION;
        let control_extra = c_ours.median_ms - c_none.median_ms;
        let raw_ok = raw_extra >= want * RAW_MIN_FRACTION;
        let (spread_raw, spread_ours) = (raw.p90_ms - raw.p10_ms, ours.p90_ms - ours.p10_ms);
        let spread_ratio = spread_ours / spread_raw.max(0.01);
        let jitter_ok = self.jitter_ms.is_none_or(|_| (SPREAD_RATIO.0..=SPREAD_RATIO.1).contains(&spread_ratio));
        let raw_jitter_ok = self.jitter_ms.is_none_or(|j| spread_raw >= j);
        let delay_ok = diff.abs() <= tol;
        let control_ok = control_extra < control_limit;

        let mut raw_values = vec![
            ("ms", ms(raw.median_ms)),
            ("extra_ms", ms(raw_extra)),
            ("want_ms", ms(want)),
            ("p90_ms", ms(raw.p90_ms)),
            ("stdev_ms", ms(raw.stdev_ms)),
            ("spread_ms", ms(spread_raw)),
            ("base_ms", ms(none.median_ms)),
            ("n", raw.n.to_string()),
            ("round_medians_ms", round_medians.iter().map(|m| format!("{m:.2}")).collect::<Vec<_>>().join(",")),
            ("other_extra_ms", ms(c_raw.median_ms - c_none.median_ms)),
        ];
        if let Some(j) = self.jitter_ms {
            raw_values.push(("jitter_ms", ms(j)));
        }
        let mut ours_values = vec![
            ("ms", ms(ours.median_ms)),
            ("extra_ms", ms(ours_extra)),
            ("want_ms", ms(want)),
            ("p90_ms", ms(ours.p90_ms)),
            ("stdev_ms", ms(ours.stdev_ms)),
            ("spread_ms", ms(spread_ours)),
            ("raw_ms", ms(raw.median_ms)),
            ("raw_extra_ms", ms(raw_extra)),
            ("diff_ms", format!("{diff:+.2}")),
            ("d_p90_ms", format!("{:+.2}", ours.p90_ms - raw.p90_ms)),
            ("tol_ms", ms(tol)),
            ("se_ms", ms(se)),
            ("drift_ms", ms(drift)),
            ("tol_capped", u8::from(wanted_tol > max_tol).to_string()),
            ("rounds", rounds.to_string()),
            ("n", ours.n.to_string()),
            ("base_ms", ms(none.median_ms)),
            ("other_ms", ms(c_ours.median_ms)),
            ("other_base_ms", ms(c_none.median_ms)),
            ("other_extra_ms", ms(control_extra)),
            ("other_limit_ms", ms(control_limit)),
        ];
        if let Some(j) = self.jitter_ms {
            ours_values.push(("jitter_ms", ms(j)));
            ours_values.push(("spread_ratio", ms(spread_ratio)));
        }
        if !raw_ok || !raw_jitter_ok {
            ours_values.push(("error", "raw_netem_did_not_delay".into()));
        }
        vec![
            (format!("tc-{}", target.row), Outcome { passed: raw_ok && raw_jitter_ok, values: raw_values }),
            (
                format!("agent-{}", target.row),
                Outcome { passed: raw_ok && raw_jitter_ok && delay_ok && control_ok && jitter_ok, values: ours_values },
            ),
        ]
    }

    fn min_want(&self) -> f64 {
        self.targets.iter().map(|t| t.want_ms).fold(f64::MAX, f64::min)
    }
}

/// Loopback RTT to A and B, v4 and v6, before anything is installed: a guest too slow to measure a 10 ms delay
/// fails here.
fn baseline(v4: IpAddr, v6: IpAddr) -> Result<Outcome> {
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
fn sleep_stats(wanted: Duration) -> Stats {
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
fn loss_comparison(agent: &Agent) -> (Result<Outcome>, Result<Outcome>) {
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
fn loss_outcome(ip: IpAddr, fault: Option<(&Agent, &str)>) -> Result<Outcome> {
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
fn kill9_expiry(agent: &mut Agent) -> Result<Outcome> {
    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let base = Stats::of(&tcp_rtt(SocketAddr::new(v4, PORT_FAULTED), probe(10))?).median_ms;
    let guardian = agent.guardian_pid();
    let requested = Instant::now();
    let lifetime = format!("{}", KILL_FAULT_LIFETIME.as_secs());
    let _id = agent.inject_lifetime(&["latency", "--port", &PORT_FAULTED.to_string(), "latency=0.1"], &lifetime)?;
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
fn restart_clean() -> Result<Outcome> {
    let objects = AgentObjects::now();
    Ok(Outcome {
        passed: objects.filters.is_empty() && !objects.ifb && objects.clsact.is_empty(),
        values: vec![("objects", objects.summary()), ("own_pins", objects.pins.to_string())],
    })
}

/// A fault, then the agent AND its guardian SIGKILLed: everything of ours stays in the kernel. A restart must remove
/// it all and the delay with it, long before the fault's lifetime ends.
fn restart_with_leftovers(agent: &mut Agent) -> Result<Outcome> {
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

/// How often the waits of the scenarios look.
const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------------------------------
// Kernel objects

/// Everything of the agent's in the kernel: `lymph-chaos:` filters on lo and veth-srv, clsact qdiscs (nothing else
/// here creates one), the IFB, pins.
struct AgentObjects {
    filters: Vec<String>,
    clsact: Vec<String>,
    ifb: bool,
    pins: usize,
}

impl AgentObjects {
    fn now() -> Self {
        let mut filters = Vec::new();
        let mut clsact = Vec::new();
        for dev in [LO, VETH_SRV] {
            for hook in ["ingress", "egress"] {
                let text = tc_output(&["filter", "show", "dev", dev, hook]);
                let n = text.lines().filter(|l| l.contains(AGENT_FILTER_PREFIX)).count();
                if n > 0 {
                    filters.push(format!("{dev}/{hook}:{n}"));
                }
            }
            if tc_output(&["qdisc", "show", "dev", dev]).contains("qdisc clsact") {
                clsact.push(dev.to_string());
            }
        }
        let ifb = Path::new("/sys/class/net").join(AGENT_IFB).exists();
        let pins = std::fs::read_dir(AGENT_PIN_DIR).map_or(0, Iterator::count);
        Self { filters, clsact, ifb, pins }
    }

    fn is_empty(&self) -> bool {
        self.filters.is_empty() && self.clsact.is_empty() && !self.ifb && self.pins == 0
    }

    /// `filters=lo/egress:2,clsact=lo,ifb=1,pins=3` style (no spaces: one console value).
    fn summary(&self) -> String {
        if self.is_empty() {
            return "none".into();
        }
        let mut parts = Vec::new();
        if !self.filters.is_empty() {
            parts.push(format!("filters:{}", self.filters.join("+")));
        }
        if !self.clsact.is_empty() {
            parts.push(format!("clsact:{}", self.clsact.join("+")));
        }
        if self.ifb {
            parts.push(format!("ifb:{AGENT_IFB}"));
        }
        if self.pins > 0 {
            parts.push(format!("pins:{}", self.pins));
        }
        parts.join(",")
    }
}

/// The operator's root qdiscs, installed before the agent starts and compared after every step.
struct QdiscWatch {
    /// (device, expected `tc qdisc show` line start, e.g. `qdisc htb 1: root`)
    expected: Vec<(&'static str, String)>,
    checks: Vec<(String, bool)>,
}

impl QdiscWatch {
    fn install(veth: bool) -> Result<Self> {
        let mut expected = Vec::new();
        for (dev, kind, args) in OPERATOR_QDISCS {
            if *dev == VETH_SRV && !veth {
                continue;
            }
            let _ = Command::new(TC).args(["qdisc", "del", "dev", dev, "root"]).output();
            let mut full = vec!["qdisc", "add", "dev", dev, "root"];
            full.extend_from_slice(args);
            tc(&full)?;
            expected.push((*dev, format!("qdisc {kind} root")));
        }
        let mut watch = Self { expected, checks: Vec::new() };
        watch.check("before-agent");
        Ok(watch)
    }

    fn check(&mut self, step: &str) {
        let ok = self.expected.iter().all(|(dev, line)| {
            let text = tc_output(&["qdisc", "show", "dev", dev]);
            let found = text.lines().any(|l| l.starts_with(line.as_str()));
            if !found {
                println!("DETAIL agent-root-qdisc-kept: at {step}, `{line}` is gone from {dev}:\n{text}");
            }
            found
        });
        self.checks.push((step.to_string(), ok));
    }

    fn outcome(&self) -> Outcome {
        let failed: Vec<&str> = self.checks.iter().filter(|(_, ok)| !ok).map(|(s, _)| s.as_str()).collect();
        let qdiscs: Vec<String> =
            self.expected.iter().map(|(dev, line)| format!("{dev}:{}", line.replace(' ', "_"))).collect();
        Outcome {
            // before-agent, agent-started and after-stop always run; a full run checks 9 times.
            passed: failed.is_empty() && self.checks.len() >= 3,
            values: vec![
                ("qdiscs", qdiscs.join(",")),
                ("checks", self.checks.len().to_string()),
                ("failed", if failed.is_empty() { "none".into() } else { failed.join(",") }),
            ],
        }
    }
}

/// The veth pair to the client namespace.
struct Topology;

impl Topology {
    fn create() -> Result<()> {
        ip(&["netns", "add", NETNS])?;
        ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
        ip(&["link", "add", VETH_SRV, "type", "veth", "peer", "name", VETH_CLI, "netns", NETNS])?;
        // `nodad`: usable at once (duplicate address detection would keep them tentative for a second or two).
        ip(&["addr", "add", &format!("{SRV_V4}/24"), "dev", VETH_SRV])?;
        ip(&["-6", "addr", "add", &format!("{SRV_V6}/64"), "dev", VETH_SRV, "nodad"])?;
        ip(&["link", "set", VETH_SRV, "up"])?;
        ip(&["-n", NETNS, "addr", "add", &format!("{CLI_V4}/24"), "dev", VETH_CLI])?;
        ip(&["-n", NETNS, "-6", "addr", "add", &format!("{CLI_V6}/64"), "dev", VETH_CLI, "nodad"])?;
        ip(&["-n", NETNS, "link", "set", VETH_CLI, "up"])?;
        // The root the raw netem twin of the ingress scenarios hangs its class under.
        tc_in(Some(NETNS), &["qdisc", "add", "dev", VETH_CLI, "root", "handle", HTB_ROOT, "htb", "default", "1"])?;
        Ok(())
    }
}

/// Removes what the scenarios add to the machine (for runs by hand; the qemu guest powers off anyway).
fn teardown() {
    let _ = Command::new(IP).args(["netns", "del", NETNS]).output();
    let _ = Command::new(IP).args(["link", "del", VETH_SRV]).output();
    let _ = Command::new(TC).args(["qdisc", "del", "dev", LO, "root"]).output();
    for stack in Stack::ALL {
        stack.teardown();
    }
}

/// Runs `/usr/sbin/tc <args>`, echoing it; fails with tc's stderr.
fn tc(args: &[&str]) -> Result<()> {
    tc_in(None, args)
}

/// [`tc`] in a named network namespace (`tc -n NAME`), or in ours.
fn tc_in(netns: Option<&str>, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(TC);
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
        println!("+ tc -n {ns} {}", args.join(" "));
    } else {
        println!("+ tc {}", args.join(" "));
    }
    let out = cmd.args(args).output().with_context(|| format!("starting {TC}"))?;
    if !out.status.success() {
        bail!("tc {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `tc <args>`'s stdout, empty when it fails (e.g. no clsact to list filters of).
fn tc_output(args: &[&str]) -> String {
    Command::new(TC).args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// Runs `/usr/sbin/ip <args>`, echoing it.
fn ip(args: &[&str]) -> Result<()> {
    println!("+ ip {}", args.join(" "));
    let out = Command::new(IP).args(args).output().with_context(|| format!("starting {IP}"))?;
    if !out.status.success() {
        bail!("ip {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The services process

/// `chaos-vm-guest serve echo=127.0.0.1:5001 reply=127.0.0.1:5002 …`: binds everything, prints `SERVING`, serves
/// until its stdin closes (the parent exited or dropped it).
fn serve(specs: &[String]) -> ExitCode {
    let mut echo = Vec::new();
    let mut reply = Vec::new();
    for spec in specs {
        let parsed = spec.split_once('=').and_then(|(kind, addr)| Some((kind, addr.parse::<SocketAddr>().ok()?)));
        let started = match parsed {
            Some(("echo", addr)) => EchoServer::start(addr).map(|s| echo.push(s)),
            Some(("reply", addr)) => ReplyServer::start(addr).map(|s| reply.push(s)),
            Some(("sink", addr)) => start_sink(addr),
            _ => {
                println!("ERROR bad service spec {spec} (echo=ADDR, reply=ADDR or sink=ADDR)");
                return ExitCode::FAILURE;
            }
        };
        if let Err(err) = started {
            println!("ERROR {spec}: {err}");
            return ExitCode::FAILURE;
        }
    }
    println!("SERVING");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    ExitCode::SUCCESS
}

/// A TCP sink: reads every connection to its end, then closes it (the sender's read of 0 bytes says everything
/// arrived). Runs until the process exits.
fn start_sink(addr: SocketAddr) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut conn = conn;
                let _ = std::io::copy(&mut conn, &mut std::io::sink());
            });
        }
    });
    Ok(())
}

/// The services process (a child of ours, so it runs on our vCPU); stopped on drop.
struct Services {
    child: Child,
}

impl Services {
    fn start(veth: bool, stacks: bool) -> Result<Self> {
        let mut specs = Vec::new();
        for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
            for port in [PORT_FAULTED, PORT_CONTROL] {
                specs.push(format!("echo={}", SocketAddr::new(ip, port)));
            }
        }
        if veth {
            specs.push(format!("echo={}", SocketAddr::new(IpAddr::V4(SRV_V4), PORT_FAULTED)));
            specs.push(format!("echo={}", SocketAddr::new(IpAddr::V4(SRV_V4), PORT_CONTROL)));
            specs.push(format!("echo={}", SocketAddr::new(IpAddr::V6(SRV_V6), PORT_FAULTED)));
            specs.push(format!("echo={}", SocketAddr::new(IpAddr::V6(SRV_V6), PORT_CONTROL)));
            specs.push(format!("sink={}", SocketAddr::new(IpAddr::V4(SRV_V4), PORT_TCP_LOSS)));
        }
        if stacks {
            for port in [PORT_FAULTED, PORT_CONTROL] {
                specs.push(format!("echo={}", SocketAddr::new(IpAddr::V4(Stack::BRIDGE.host), port)));
            }
        }
        specs.push(format!("reply={}", SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PORT_REPLY)));
        let exe = std::env::current_exe().context("locating myself")?;
        let mut child = Command::new(exe)
            .arg("serve")
            .args(&specs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning chaos-vm-guest serve")?;
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first)?;
        if first.trim() != "SERVING" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the services process said: {}", first.trim());
        }
        println!("services (pid {}): {}", child.id(), specs.join(" "));
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

fn find_agent_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHAOS_AGENT_BIN") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("lymph-chaos")).find(|p| p.is_file())
}

/// A `lymph-chaos agent` process of ours with its own state, pins and log; driven through the `lymph-chaos` CLI.
struct Agent {
    bin: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// How the fault requests are made wrong (normally not at all).
    mutant: Cell<Mutant>,
    /// The in-process client of [`Agent::rpc`], made on first use.
    rpc: RefCell<Option<(tokio::runtime::Runtime, Client)>>,
}

impl Agent {
    fn start(bin: &Path, mutant: Mutant) -> Result<Self> {
        if TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], AGENT_PORT)), Duration::from_millis(300))
            .is_ok()
        {
            bail!(
                "something already listens on 127.0.0.1:{AGENT_PORT} (an installed agent? `systemctl stop \
                 lymph-chaos`): two agents would remove each other's tc filters"
            );
        }
        std::fs::create_dir_all(AGENT_DIR)?;
        // The services are not lymph instances: allow them by command line.
        std::fs::write(
            Path::new(AGENT_DIR).join("config.yml"),
            "# written by chaos-vm-guest\nfaults: {allowed_processes: [\"chaos-vm-guest serve\"], allow_unbound_ports: true}\n",
        )?;
        let _ = std::fs::remove_file(Path::new(AGENT_DIR).join("agent.log"));
        let mut agent =
            Self { bin: bin.to_owned(), child: None, starts: 0, mutant: Cell::new(mutant), rpc: RefCell::new(None) };
        agent.spawn()?;
        let status = agent.cli(&["status"])?;
        println!("agent status: {status}");
        Ok(agent)
    }

    fn log_path() -> PathBuf {
        Path::new(AGENT_DIR).join("agent.log")
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(Self::log_path())?;
        use std::io::Write as _;
        writeln!(&log, "===== chaos-vm-guest: agent start #{} =====", self.starts)?;
        let mut cmd = Command::new(&self.bin);
        if available_cpus() > AGENT_CPU {
            pin_command_to_cpu(&mut cmd, AGENT_CPU);
        }
        let (config, events_file) =
            (Path::new(AGENT_DIR).join("config.yml"), Path::new(AGENT_DIR).join("events.jsonl"));
        // Standalone (no ZooKeeper in here), on the default port; if we die, so does the agent (not its guardian).
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
        let started = Instant::now();
        println!("+ {} agent … (start #{})", self.bin.display(), self.starts);
        self.child = Some(cmd.spawn().with_context(|| format!("spawning {}", self.bin.display()))?);
        let what = format_args!("the agent to answer {AGENT_ENDPOINT}");
        eventually(what, AGENT_START_TIMEOUT, Duration::from_millis(200), || {
            if self.cli_quiet(&["status"]).is_ok() {
                return Ok(true);
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("the agent exited during start-up ({status}); its log follows the results");
            }
            Ok(false)
        })?;
        println!("agent answered after {:.2} s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// `lymph-chaos --agent … --json <args>`, echoed; its JSON answer.
    fn cli(&self, args: &[&str]) -> Result<Json> {
        println!("+ lymph-chaos {}", args.join(" "));
        self.cli_quiet(args)
    }

    fn cli_quiet(&self, args: &[&str]) -> Result<Json> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--agent", AGENT_ENDPOINT, "--timeout", CLI_TIMEOUT_S, "--json"]).args(args);
        if available_cpus() > AGENT_CPU {
            pin_command_to_cpu(&mut cmd, AGENT_CPU);
        }
        let out = cmd.output().with_context(|| format!("running {}", self.bin.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "lymph-chaos {} exited {}: {} {}",
                args.join(" "),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_str(&stdout).with_context(|| format!("lymph-chaos {}: not JSON: {stdout}", args.join(" ")))
    }

    /// `inject <args> --lifetime <FAULT_LIFETIME_S>`; the fault id.
    fn inject(&self, args: &[&str]) -> Result<String> {
        self.inject_lifetime(args, FAULT_LIFETIME_S)
    }

    fn inject_lifetime(&self, args: &[&str], lifetime: &str) -> Result<String> {
        let mut full = vec!["inject"];
        full.extend_from_slice(args);
        self.fault(&full, lifetime)
    }

    /// Any fault subcommand (`inject …`, `latency …`) with `--lifetime`, made wrong when a mutant is set; the
    /// fault id, which must be active.
    fn fault(&self, args: &[&str], lifetime: &str) -> Result<String> {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--lifetime", lifetime]);
        let mutated = self.mutant.get().apply(&full);
        if self.mutant.get() != Mutant::None {
            println!("DETAIL mutant {}: requesting {}", self.mutant.get().name(), mutated.join(" "));
        }
        let mutated: Vec<&str> = mutated.iter().map(String::as_str).collect();
        let answer = self.cli(&mutated)?;
        let id = answer["id"].as_str().with_context(|| format!("no fault id in {answer}"))?;
        ensure!(answer["state"] == "active", "fault {id} is not active: {answer}");
        Ok(id.to_owned())
    }

    /// A fault subcommand's request (`inject latency --port A latency=0.1`) with `--lifetime`, made wrong when a
    /// mutant is set, sent as the CLI would send it (the CLI's own argument parser and request builder) but from
    /// this process: the comparisons switch faults many times, and a debug CLI process costs ~0.8 s under TCG.
    /// The fault id, which must be active.
    fn rpc_fault(&self, args: &[&str], lifetime: &str) -> Result<String> {
        let mut full = vec!["lymph-chaos"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--lifetime", lifetime]);
        let mutated = self.mutant.get().apply(&full);
        println!("+ (rpc) {}", mutated[1..].join(" "));
        let cli = Cli::try_parse_from(&mutated).with_context(|| format!("parsing {}", mutated.join(" ")))?;
        let request = request_for(&cli.command).map_err(|err| anyhow::anyhow!("{err}"))?;
        let answer = self.rpc(request.method().name(), &Json::Object(request.to_kwargs()))?;
        let id = answer["id"].as_str().with_context(|| format!("no fault id in {answer}"))?;
        ensure!(answer["state"] == "active", "fault {id} is not active: {answer}");
        Ok(id.to_owned())
    }

    /// `Chaos.revert` from this process.
    fn rpc_revert(&self, id: &str) -> Result<()> {
        println!("+ (rpc) revert {id}");
        self.rpc("revert", &serde_json::json!({ "id": id })).map(|_| ())
    }

    /// `Chaos.<method>(kwargs)` over lymph RPC from this process; the reply as JSON.
    fn rpc(&self, method: &str, kwargs: &Json) -> Result<Json> {
        let mut slot = self.rpc.borrow_mut();
        if slot.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let client = rt.block_on(async { Client::new() }).context("starting an RPC client")?;
            *slot = Some((rt, client));
        }
        let (rt, client) = slot.as_ref().expect("set above");
        let subject = format!("Chaos.{method}");
        let timeout = Duration::from_secs(CLI_TIMEOUT_S.parse().unwrap_or(30));
        let reply = rt
            .block_on(client.call_endpoint(AGENT_ENDPOINT, &subject, kwargs, timeout))
            .with_context(|| format!("{subject}({kwargs})"))?;
        Ok(reply.to_json())
    }

    fn revert(&self, id: &str) -> Result<()> {
        self.cli(&["revert", id]).map(|_| ())
    }

    /// The classifier's (packets, drops) for a fault.
    fn counters(&self, id: &str) -> Option<(u64, u64)> {
        let faults = self.cli(&["faults"]).ok()?;
        let fault = faults.as_array()?.iter().find(|f| f["id"] == id)?;
        Some((fault["counters"]["packets"].as_u64()?, fault["counters"]["drops"].as_u64()?))
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

    fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// SIGTERM and wait up to 20 s; whether it exited in time.
    fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        println!("+ kill -TERM {} (agent)", child.id());
        let _ = terminate(&child);
        let exited = matches!(wait_timeout(&mut child, Duration::from_secs(20)), Ok(Some(_)));
        if !exited {
            let _ = child.kill();
        }
        let _ = child.wait();
        exited
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn print_agent_log(lines: usize) {
    println!("--- agent log ({}; last {lines} lines) ---", Agent::log_path().display());
    for line in chaos_test_support::process::log_tail(&Agent::log_path(), lines).lines() {
        println!("agent| {line}");
    }
    println!("--- end of agent log ---");
}

/// The agent log's WARN and ERROR lines (a passing run should have few, each worth reading).
fn print_agent_warnings() {
    let text = std::fs::read_to_string(Agent::log_path()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
    println!("agent log {}: {} WARN/ERROR lines", Agent::log_path().display(), lines.len());
    for line in lines {
        println!("agent| {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutants_make_requests_wrong_and_only_their_way() {
        let inject = ["lymph-chaos", "inject", "latency", "--port", "5001", "latency=0.01", "--lifetime", "120"];
        assert_eq!(Mutant::None.apply(&inject), inject);
        assert_eq!(Mutant::WrongPort.apply(&inject)[4], PORT_CONTROL.to_string());
        assert_eq!(Mutant::DoubleDelay.apply(&inject)[5], "latency=0.02");
        assert_eq!(Mutant::NoExpiry.apply(&inject)[7], "3600");
        assert_eq!(Mutant::DoubleDelay.apply(&inject)[7], "120", "the lifetime is no delay");
        let shortcut = ["lymph-chaos", "latency", "--port", "5001", "0.1", "--lifetime", "120"];
        assert_eq!(Mutant::DoubleDelay.apply(&shortcut)[4], "0.2");
        assert_eq!(Mutant::DoubleDelay.apply(&shortcut)[3], "5001", "the port is no delay");
    }
}
