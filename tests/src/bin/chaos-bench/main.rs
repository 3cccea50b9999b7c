//! `chaos-bench`: lymph-chaos's performance claims, each measured side by side with the baseline it beats, in one
//! run. `cargo xtask bench [rpc|network|changes|kill|all]` builds it and the agent with `--release`, starts what
//! `rpc` needs (a private ZooKeeper, the lymph 0.15 venv) and runs `target/release/chaos-bench <which>`.
//!
//! Benchmarks print, they never assert: a number that misses its goal is printed as `NO` next to the goal. The
//! process exits non-zero only when a benchmark could not run at all (not root, no ZooKeeper, a tool missing).
//! Everything runs inside network namespaces created here or on loopback; namespaces, processes (stopped by pid),
//! BPF pins and qdiscs are removed by RAII guards.
//!
//! # Layout
//! ```text
//! main ── environment header ── each chosen benchmark ── tables: metric | ours | baseline | ratio | goal | met?
//!
//! rpc      one Rust client (RpcNode) sends lymph.ping to our agent and to a real Python lymph 0.15 Echo, both on
//!          127.0.0.1: requests/s with 1, 16, 64 in flight; p50/p99 at 1 in flight (interleaved blocks)
//! network  ns cli ──veth──▶ ns srv: bulk TCP and request/response RTT to a port no rule names, with 0 … 10,000
//!          rules on other ports. ours: NetworkEngine in both namespaces (classifier on every hook the traffic
//!          crosses). u32: HTB root + one `u32 match ip dport` filter per port on cli veth egress, the same chain on
//!          srv veth ingress (clsact). bare: nothing attached. Every configuration once per round, several rounds
//! changes  request → rule effective / gone: NetworkEngine::apply/revert (steady state) and the agent's
//!          Chaos.inject/revert over RPC, vs spawning `tc filter add|del … u32 match ip dport P`; a namespace each
//! kill     Chaos.kill(pid) → reply, and → our waitpid returns, agent in a namespace; vs spawning `kill -KILL`;
//!          floor: kill(2) + waitpid from this process
//! classifier  cost per packet of chaos_ingress run by the kernel on crafted frames (BPF_PROG_TEST_RUN, 10^5
//!          single runs each): this build's object (address keys, judged bits, fall-through on expiry) vs the
//!          object of the previous classifier (port keys only; $CHAOS_OLD_EBPF_OBJECT, built from git a401fe4 by
//!          `cargo xtask bench`), same frames, same rules, interleaved rounds
//! ```
//!
//! Ratios are always "how many times better ours is": throughput ours/baseline, times baseline/ours.
//!
//! One module per benchmark (`rpc`, `network`, `changes`, `kill`, `classifier`, `accuracy`, each with a `run`);
//! `report` formats the tables, `engine` holds what the network benchmarks share.

use std::{panic::AssertUnwindSafe, process::ExitCode, time::Instant};

use anyhow::Result;
use chaos_tests::measure;

mod accuracy;
mod changes;
mod classifier;
mod engine;
mod kill;
mod network;
mod report;
mod rpc;

// ---------------------------------------------------------------------------------------------------------------
// main

/// The benchmarks, in the order `all` runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bench {
    Rpc,
    Network,
    Changes,
    Kill,
    Classifier,
    Accuracy,
}

impl Bench {
    const ALL: [Bench; 6] =
        [Bench::Rpc, Bench::Network, Bench::Changes, Bench::Kill, Bench::Classifier, Bench::Accuracy];

    fn name(self) -> &'static str {
        match self {
            Bench::Rpc => "rpc",
            Bench::Network => "network",
            Bench::Changes => "changes",
            Bench::Kill => "kill",
            Bench::Classifier => "classifier",
            Bench::Accuracy => "accuracy",
        }
    }

    /// rpc runs the agent without network control on this namespace's loopback; the others create namespaces,
    /// load BPF and signal processes.
    fn needs_root(self) -> bool {
        self != Bench::Rpc
    }

    fn run(self) -> Result<()> {
        match self {
            Bench::Rpc => rpc::run(),
            Bench::Network => network::run(),
            Bench::Changes => changes::run(),
            Bench::Kill => kill::run(),
            Bench::Classifier => classifier::run(),
            Bench::Accuracy => accuracy::run(),
        }
    }
}

fn main() -> ExitCode {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let chosen: Vec<Bench> = match which.as_str() {
        "all" => Bench::ALL.to_vec(),
        name => match Bench::ALL.into_iter().find(|b| b.name() == name) {
            Some(b) => vec![b],
            None => {
                eprintln!(
                    "usage: chaos-bench [rpc|network|changes|kill|classifier|accuracy|all]   (normally run by `cargo xtask bench`)"
                );
                return ExitCode::from(2);
            }
        },
    };
    agent_environment();
    print_environment();
    let mut could_not_run = Vec::new();
    for bench in chosen {
        let started = Instant::now();
        let result = if bench.needs_root() && !nix::unistd::geteuid().is_root() {
            Err(anyhow::anyhow!("needs root (network namespaces, BPF, signals): sudo -E cargo xtask bench"))
        } else {
            // A panic in the test support (e.g. a namespace that cannot be created) is a benchmark that could not
            // run, not a crash of the others.
            std::panic::catch_unwind(AssertUnwindSafe(|| bench.run()))
                .unwrap_or_else(|panic| Err(anyhow::anyhow!("panicked: {}", panic_message(&panic))))
        };
        match result {
            Ok(()) => progress(format!("{} done in {:.1} s", bench.name(), started.elapsed().as_secs_f64())),
            Err(err) => {
                println!("\n{}: COULD NOT RUN — {err:#}", bench.name());
                could_not_run.push(bench.name());
            }
        }
    }
    if could_not_run.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("\nbenchmarks that could not run: {}", could_not_run.join(", "));
        ExitCode::FAILURE
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(no message)".into())
}

/// Agents started here log at the agent's default level (`info`), not at the debug level the test support asks for
/// (a log line per step costs time on every request); `RUST_LOG` overrides `--log-level` in the agent.
const AGENT_LOG_LEVEL: &str = "info";

/// `lymph-chaos` next to this binary (`target/release/`), unless `CHAOS_AGENT_BIN` names one: the test support's
/// default looks for a test binary's `deps/` layout. Also sets the agents' log level (see [`AGENT_LOG_LEVEL`]).
fn agent_environment() {
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: called at the start of main, before this process starts any thread.
        unsafe { std::env::set_var("RUST_LOG", AGENT_LOG_LEVEL) };
    }
    if std::env::var_os("CHAOS_AGENT_BIN").is_some() {
        return;
    }
    if let Some(bin) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join("lymph-chaos")))
        && bin.exists()
    {
        // SAFETY: called at the start of main, before this process starts any thread.
        unsafe { std::env::set_var("CHAOS_AGENT_BIN", bin) };
    }
}

fn print_environment() {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let profile = if cfg!(debug_assertions) { "debug (numbers are NOT representative)" } else { "release" };
    let agent = std::env::var("CHAOS_AGENT_BIN").unwrap_or_else(|_| "(not found)".into());
    println!("lymph-chaos benchmarks");
    println!("environment");
    println!("  kernel   Linux {}", read("/proc/sys/kernel/osrelease").trim());
    println!("  cpus     {} × {model}", measure::available_cpus());
    println!("  build    {profile} (chaos-bench and the agent)");
    let log = std::env::var("RUST_LOG").unwrap_or_default();
    println!("  agent    {agent} (RUST_LOG={log})");
    println!("  load     {} (1/5/15 min load average at start; other work on this machine adds noise)", {
        read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    });
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("chaos-bench: {}", msg.as_ref());
}
