//! `chaos-vm-guest`: the VM scenarios as ordinary `#[test]`s that run INSIDE a qemu guest — its Rust `/init`
//! (`chaos-vm-init`) runs this libtest binary with `--ignored --test-threads=1 --nocapture`, and the host side
//! (`tests/tests/vm.rs`) reads libtest's `test <name> ... ok|FAILED` lines and the `RESULT` rows the tests print
//! — or by hand as root in a throw-away VM (`vagrant/`). Each fault is applied through a real `lymph-chaos agent`
//! and, in the same boot, interleaved with it, through raw `tc netem` the way an operator would add it: the agent
//! is judged against raw netem measured beside it, never against the clock.
//!
//! A test target with `test = false` (tests/Cargo.toml) and every test `#[ignore]`d: nothing here runs on the host
//! by accident (it rewrites `lo`'s root qdisc). Build: `cargo test --no-run -p chaos-tests --test chaos-vm-guest`.
//! Run by hand (as root): `CHAOS_AGENT_BIN=/usr/bin/lymph-chaos chaos-vm-guest --ignored --test-threads=1
//! --nocapture [NAME-FILTER …]`. Environment: `CHAOS_AGENT_BIN` the agent (default: next to this binary's
//! target directory), `CHAOS_VM_SERVICES` the services binary (default: `chaos-vm-services` next to this one or on
//! `PATH`), `CHAOS_VM_MUTANT=KIND` every fault request made wrong that way, `CHAOS_VM_ACCURACY=1` the comparisons
//! with more rounds and no verdict extension (`cargo xtask bench accuracy` runs `compare_` only).
//!
//! # Layout
//! ```text
//! guest (root netns)                                           netns chaos-cli
//!   lo: 127.0.0.1 / ::1   root qdisc htb 1: (the operator's)     veth-cli 10.77.0.2 fd77::2  root htb 1:
//!   veth-srv 10.77.0.1 fd77::1  ◄──────── veth pair ────────►    (raw netem for the remote caller's requests)
//!            root qdisc fq 2: (the operator's)
//!
//! process "chaos-vm-services" (the services the faults target; a child of ours, on vCPU 0):
//!   echo   127.0.0.1:5001 [::1]:5001 10.77.0.1:5001 [fd77::1]:5001   port A: faulted
//!   echo   127.0.0.1:5000 [::1]:5000 10.77.0.1:5000 [fd77::1]:5000   port B: control, must stay unchanged
//!   reply  127.0.0.1:5002      lymph-style: request in on one connection, reply out on another to the caller
//!   sink   10.77.0.1:5004      TCP bulk data through a loss fault
//! process "chaos-vm-guest" (this one; every test pinned to vCPU 0): the prober, runs `tc` and the CLI
//! process "lymph-chaos agent" (vCPU 1 when there is one; `chaos_tests::agent::AgentProcess`), started once,
//!   killed/stopped/restarted by the lifecycle tests
//! ```
//! The services live in their own process because the agent refuses to fault ports of its own parent process.
//! Device stacks, each a caller in a namespace of its own behind a veth pair whose host end is a bridge port
//! (`vbr-p ─ br-chaos 10.78.0.1`, netns chaos-br), a VLAN's parent (`vvl-p ─ vvl-p.100 10.79.0.1`, chaos-vlan) or
//! a bond's slave (`vbd-p ─ bond-chaos 10.80.0.1`, chaos-bond): a packet crosses two devices of the host and must
//! be judged once.
//!
//! # Order: none relied on
//! The first test to run builds the shared fixture (`fixture.rs`: topology, services, the baseline, the operator's
//! qdiscs, the agent) and every test holds it for its whole run, so tests never overlap even with more threads.
//! Each test starts from "agent running, no fault of ours active, operator's qdiscs in place" and restores that
//! (a stopped or killed agent is started again by the next test), so libtest's order (by name) does not matter.
//! What must happen in sequence is ONE test: `agent_kill9_then_restart` (the restart-clean row judges the restart
//! after that kill, the leftovers row needs a restart after killing the guardian too).
//!
//! # How a delay is judged (`compare.rs`)
//! A comparison runs **rounds**; each round measures three conditions in a rotating order — no fault, raw netem,
//! the agent's fault — with the same probes (same client, ports and method). Raw netem is an htb class with a netem
//! leaf under the operator's root `htb 1:`, u32 filters on the port(s) steering into it (on `veth-cli` in the
//! caller's namespace for the remote caller); it is switched by adding and removing its filters. The agent's fault
//! is injected and reverted through the CLI's request builder. The verdict, per target:
//! - raw netem must add at least half the requested delay (else the boot cannot judge anything);
//! - `diff` = median(agent) − median(raw) must lie within `tol` = 3 × the standard error of that difference of
//!   medians (each σ estimated from its p10–p90, robust against TCG's outliers) + the drift of raw netem's
//!   per-round medians; at least 1 ms, at most half the requested delay (so a delay on the wrong port, a doubled
//!   or a missing delay always fails);
//! - the control port's median may grow by less than a quarter of the requested delay over its own interleaved
//!   no-fault rounds;
//! - with jitter, the agent's p10–p90 spread is within ½–2× raw netem's.
//!
//! A comparison that fails, or whose tolerance had to be capped, gets two more rounds (up to [`MAX_ROUNDS`]); the
//! data accumulates, nothing is measured again to replace it.
//!
//! # Tests and the rows they print (`RESULT <row> <pass|fail> key=value …`)
//! ```text
//! baseline                   baseline: RTT to A and B, v4 and v6, before any qdisc; guest timer accuracy
//! compare_delay_10ms         {tc,agent}-delay-10ms-v{4,6}: `inject latency --port A latency=0.01` vs `delay 10ms`
//! compare_delay_100ms        {tc,agent}-delay-100ms-v{4,6}: the CLI shortcut `latency --port A 0.1`
//! compare_jitter_50ms_20ms   {tc,agent}-jitter-50ms-20ms: `latency=0.05 jitter=0.02 distribution=normal`
//! compare_direction_from_50ms / compare_direction_both_50ms   `direction=from` / `direction=both`
//! compare_two_faults         {tc,agent}-two-faults-{echo-30ms,reply-60ms}: two faults at once
//! compare_reply_conn         {tc,agent}-reply-conn: the lymph call pattern (reply on a separate connection)
//! compare_ingress_veth       {tc,agent}-ingress-veth-v{4,6}: the caller in chaos-cli, veth-srv's ingress
//! compare_bridge_latency_50ms  {tc,agent}-bridge-latency-50ms: the caller behind a bridge port, delayed once
//! loss_udp_30pct             {tc,agent}-loss-30pct-udp: `inject loss --port A loss=30 protocol=udp`, 2000 datagrams
//! loss_tcp_10pct             {tc,agent}-loss-10pct-tcp: bulk TCP from chaos-cli, drops and retransmissions
//! loss_udp_30pct_{vlan,bond} agent-loss-30pct-udp-{vlan,bond}: 30 % ± 5 %, each datagram classified once
//! mutant_{wrong_port,double_delay,no_expiry}  mutant-…: the judgement above and the expiry check, run against
//!                            requests made wrong on purpose: the row passes only when the judgement FAILS
//! agent_kill9_then_restart   agent-kill9-expiry (5 s fault, guardian SIGSTOPped, agent SIGKILLed: the delay
//!                            still there at once, gone after 5 s with every object still in the kernel; then
//!                            SIGCONT: the guardian's cleanup, timed), agent-restart-clean (no filters, IFB,
//!                            clsact of ours after the restart), agent-restart-leftovers (fault, agent AND guardian
//!                            SIGKILLed, restart: all gone)
//! agent_stop_clean           agent-stop-clean: a fault injected and reverted, SIGTERM: 0 objects, pins included
//! agent_root_qdisc_kept      agent-root-qdisc-kept: the operator's root qdiscs, checked after every test and
//!                            around a fault, a stop and a start here, never changed
//! ```
//! Every test also fails when the operator's root qdiscs changed during it. With `CHAOS_VM_MUTANT` the host skips
//! `mutant_` and requires the rows that kind must break to fail.
//!
//! Time-dependent functional checks (kill -9, restart) use margins of a quarter of the delay: wide enough for a busy
//! host, narrow enough that a fault that never ends fails them. On loopback every packet, in both directions,
//! leaves through `lo` egress: a filter on the destination port delays the requests only (replies go to the
//! client's ephemeral port), so the round trip grows by the delay once.

mod cases;
mod compare;
mod fixture;
mod kernel;
mod scenarios;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Result, anyhow};
use chaos_tests::mutant::Mutant;

use crate::{
    compare::Comparison,
    fixture::{Fixture, accuracy_mode, scenario},
    kernel::{AgentObjects, Stack},
};

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
/// The operator's root qdiscs, installed before the agent starts and checked after every test.
const OPERATOR_QDISCS: &[(&str, &str, &[&str])] =
    &[(LO, "htb 1:", &["handle", "1:", "htb", "default", "1"]), (VETH_SRV, "fq 2:", &["handle", "2:", "fq"])];
/// The services process's binary (and what the agent's `allowed_processes` names).
const SERVICES_BIN: &str = "chaos-vm-services";
/// The agent under test.
const AGENT_PORT: u16 = 4575;
const AGENT_STATE_DIR: &str = "/run/lymph-chaos-vm";
const AGENT_PIN_DIR: &str = "/sys/fs/bpf/lymph-chaos-vm";
const AGENT_IFB: &str = "lchaos0";
/// Prefix of the agent's tc filter names.
const AGENT_FILTER_PREFIX: &str = "lymph-chaos:";
/// A TCG guest runs a debug agent slowly: generous timeouts.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(90);
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(20);
const CLI_TIMEOUT_S: u64 = 30;
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
/// Rounds with `CHAOS_VM_ACCURACY=1` (the benchmark: more data, no verdict extension needed).
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
/// How often the waits of the scenarios look.
const POLL: Duration = Duration::from_millis(50);

/// What a scenario measured and whether that is right.
#[derive(Clone)]
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

type Rows = Vec<(String, Result<Outcome>)>;

fn row(name: &str, outcome: Result<Outcome>) -> Rows {
    vec![(name.to_owned(), outcome)]
}

/// Runs a comparison (needing the veth pair or the device stacks when asked) and returns its `tc-` and `agent-`
/// rows; when it could not run, every target's `agent-` row fails with the reason.
fn compare(test: &str, comparison: fn() -> Comparison, veth: bool, stacks: bool) {
    scenario(test, |fx: &mut Fixture| {
        let comparison = comparison();
        let (rounds, extend) = if accuracy_mode() { (ACCURACY_ROUNDS, false) } else { (ROUNDS, true) };
        let ran = fx.needs(veth, stacks).and_then(|()| comparison.run(&fx.agent, rounds, extend));
        match ran {
            Ok(rows) => rows.into_iter().map(|(name, outcome)| (name, Ok(outcome))).collect(),
            Err(err) => {
                let message = format!("{err:#}");
                let rows = comparison.targets.iter().map(|t| (format!("agent-{}", t.row), Err(anyhow!("{message}"))));
                rows.collect()
            }
        }
    });
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn baseline() {
    scenario("baseline", |fx| row("baseline", fx.baseline.clone().map_err(|e| anyhow!("{e}"))));
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn compare_delay_10ms() {
    compare("compare_delay_10ms", cases::delay_10ms, false, false);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn compare_delay_100ms() {
    compare("compare_delay_100ms", cases::delay_100ms, false, false);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn compare_jitter_50ms_20ms() {
    compare("compare_jitter_50ms_20ms", cases::jitter_50ms_20ms, false, false);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn compare_direction_from_50ms() {
    compare("compare_direction_from_50ms", cases::direction_from_50ms, false, false);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn compare_direction_both_50ms() {
    compare("compare_direction_both_50ms", cases::direction_both_50ms, false, false);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn compare_two_faults() {
    compare("compare_two_faults", cases::two_faults, false, false);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn compare_reply_conn() {
    compare("compare_reply_conn", cases::reply_conn, false, false);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn compare_ingress_veth() {
    compare("compare_ingress_veth", cases::ingress_veth, true, false);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn compare_bridge_latency_50ms() {
    compare("compare_bridge_latency_50ms", cases::bridge_latency_50ms, false, true);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn loss_udp_30pct() {
    scenario("loss_udp_30pct", |fx| {
        let (raw, ours) = scenarios::loss_comparison(&fx.agent);
        vec![("tc-loss-30pct-udp".into(), raw), ("agent-loss-30pct-udp".into(), ours)]
    });
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn loss_tcp_10pct() {
    scenario("loss_tcp_10pct", |fx| {
        let (raw, ours) = match fx.needs(true, false) {
            Ok(()) => scenarios::tcp_loss_comparison(&fx.agent),
            Err(err) => (Err(anyhow!("{err:#}")), Err(err)),
        };
        vec![("tc-loss-10pct-tcp".into(), raw), ("agent-loss-10pct-tcp".into(), ours)]
    });
}

fn stack_loss(test: &str, stack: &Stack) {
    scenario(test, |fx| {
        let outcome = fx.needs(false, true).and_then(|()| scenarios::stack_loss(&fx.agent, stack));
        row(&format!("agent-loss-30pct-udp-{}", stack.name), outcome)
    });
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn loss_udp_30pct_vlan() {
    stack_loss("loss_udp_30pct_vlan", &Stack::VLAN);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn loss_udp_30pct_bond() {
    stack_loss("loss_udp_30pct_bond", &Stack::BOND);
}

/// The agent's requests made wrong `mutant`'s way for this test only; the row passes when the judgement failed.
fn mutant(test: &str, mutant: Mutant) {
    scenario(test, |fx| {
        let before = fx.agent.mutant.replace(mutant);
        let outcome = scenarios::mutant_caught(&fx.agent, mutant);
        fx.agent.mutant.set(before);
        row(&format!("mutant-{}", mutant.name()), outcome)
    });
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn mutant_wrong_port() {
    mutant("mutant_wrong_port", Mutant::WrongPort);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn mutant_double_delay() {
    mutant("mutant_double_delay", Mutant::DoubleDelay);
}

#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn mutant_no_expiry() {
    mutant("mutant_no_expiry", Mutant::NoExpiry);
}

/// One test, in this order on purpose: the restart-clean row judges the restart that follows the kill -9 (the dead
/// run's objects must be gone), and the leftovers row needs a running agent to kill together with its guardian.
#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn agent_kill9_then_restart() {
    scenario("agent_kill9_then_restart", |fx| {
        let mut rows = row("agent-kill9-expiry", scenarios::kill9_expiry(&mut fx.agent));
        fx.qdiscs.check("after-kill9");
        let clean = fx.agent.restart().and_then(|()| scenarios::restart_clean());
        rows.extend(row("agent-restart-clean", clean));
        fx.qdiscs.check("after-restart");
        rows.extend(row("agent-restart-leftovers", scenarios::restart_with_leftovers(&mut fx.agent)));
        rows
    });
}

/// A fault injected and reverted (so the agent has attached its objects), then SIGTERM: nothing of ours is left,
/// pins included. The next test starts the agent again.
#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn agent_stop_clean() {
    scenario("agent_stop_clean", |fx| {
        let used = fx
            .agent
            .inject(&["latency", "--port", &PORT_FAULTED.to_string(), "latency=0.01"])
            .and_then(|id| fx.agent.revert(&id));
        fx.agent.print_warnings();
        let stopped = fx.agent.stop();
        let objects = AgentObjects::now();
        let outcome = used.map(|()| Outcome {
            passed: stopped && objects.is_empty(),
            values: vec![("stopped_in_time", u8::from(stopped).to_string()), ("objects", objects.summary())],
        });
        row("agent-stop-clean", outcome)
    });
}

/// The operator's root qdiscs around a fault, a SIGTERM and a start, on top of the checks after every test.
#[test]
#[ignore = "runs as root inside a throw-away VM (tests/tests/vm.rs boots one)"]
fn agent_root_qdisc_kept() {
    scenario("agent_root_qdisc_kept", |fx| {
        let exercised = (|| -> Result<()> {
            let id = fx.agent.inject(&["latency", "--port", &PORT_FAULTED.to_string(), "latency=0.01"])?;
            fx.qdiscs.check("fault-active");
            fx.agent.revert(&id)?;
            fx.agent.stop();
            fx.qdiscs.check("agent-stopped");
            fx.agent.restart()?;
            fx.qdiscs.check("agent-started-again");
            Ok(())
        })();
        row("agent-root-qdisc-kept", exercised.map(|()| fx.qdiscs.outcome()))
    });
}
