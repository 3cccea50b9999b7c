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

use std::{
    future::Future,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    panic::AssertUnwindSafe,
    path::PathBuf,
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use chaos_agent::{
    faults::network::{Direction, Impairment, NetConfig, NetworkEngine, PortMatch, Protocol},
    rpc::{
        client::Client,
        node::{NodeConfig, RpcNode},
        value::{self, Value},
    },
};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, EchoProcess},
    lymph::{self, Instance, LymphConfig},
    measure::{self, EchoServer, RttProbe},
    netns::Netns,
    zk,
};
use serde_json::json;

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
            Bench::Rpc => bench_rpc(),
            Bench::Network => bench_network(),
            Bench::Changes => bench_changes(),
            Bench::Kill => bench_kill(),
            Bench::Classifier => bench_classifier(),
            Bench::Accuracy => bench_accuracy(),
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

// ---------------------------------------------------------------------------------------------------------------
// reporting

/// Nearest-rank percentiles of a set of durations.
#[derive(Clone, Copy, Debug)]
struct Percentiles {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Percentiles {
    fn of(samples: &[Duration]) -> Percentiles {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let at = |pct: f64| {
            if sorted.is_empty() {
                return Duration::ZERO;
            }
            let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        };
        Percentiles { n: sorted.len(), p50: at(50.0), p99: at(99.0), max: sorted.last().copied().unwrap_or_default() }
    }
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10.0 {
        format!("{us:.1} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn fmt_count(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_ratio(r: f64) -> String {
    if !r.is_finite() {
        "—".into()
    } else if r >= 100.0 {
        format!("{r:.0}×")
    } else if r >= 10.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.2}×")
    }
}

fn met(ok: bool) -> String {
    if ok { "yes".into() } else { "NO".into() }
}

/// A plain-text table, columns separated by ` | `.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&str]) -> Table {
        Table { head: head.iter().map(|s| (*s).to_owned()).collect(), rows: Vec::new() }
    }

    /// The verdict table every benchmark ends with.
    fn verdicts() -> Table {
        Table::new(&["metric", "ours", "baseline", "ratio", "goal", "met?"])
    }

    fn row(&mut self, cells: impl IntoIterator<Item = String>) {
        self.rows.push(cells.into_iter().collect());
    }

    fn print(&self) {
        let cols = self.head.len();
        let mut widths: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = (0..cols)
                .map(|i| {
                    let cell = cells.get(i).map_or("", String::as_str);
                    format!("{cell}{}", " ".repeat(widths[i] - cell.chars().count()))
                })
                .collect();
            println!("  {}", padded.join(" | ").trim_end());
        };
        line(&self.head);
        println!("  {}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-"));
        for row in &self.rows {
            line(row);
        }
    }
}

fn title(text: &str) {
    println!("\n{text}\n{}", "=".repeat(text.chars().count()));
}

fn note(text: impl AsRef<str>) {
    println!("  {}", text.as_ref());
}

// ---------------------------------------------------------------------------------------------------------------
// rpc

const PING_PAYLOAD: &str = "chaos-bench";
const PING_TIMEOUT: Duration = Duration::from_secs(10);
const RPC_WARMUP_PINGS: usize = 200;
const RPC_LATENCY_PINGS: usize = 3000;
/// Latency pings alternate between the two services in blocks of this many, so drift hits both alike.
const RPC_LATENCY_BLOCK: usize = 500;
const RPC_IN_FLIGHT: [usize; 3] = [1, 16, 64];
const RPC_RATE_TIME: Duration = Duration::from_millis(1500);
const RPC_GOAL: f64 = 10.0;

fn bench_rpc() -> Result<()> {
    for var in [zk::ZK_ENV, lymph::VENV_ENV] {
        ensure!(
            std::env::var_os(var).is_some_and(|v| !v.is_empty()),
            "{var} is not set: run it through `cargo xtask bench rpc`, which starts ZooKeeper and builds the lymph venv"
        );
    }
    progress("rpc: starting a Python lymph 0.15 Echo instance and the agent (--no-network-control)");
    let config = LymphConfig::for_test("chaos-bench-rpc")?;
    let echo = Instance::start(&config)?;
    let agent =
        AgentProcess::start(None, AgentOptions { args: vec!["--no-network-control".into()], ..Default::default() })?;
    let endpoints = [agent.endpoint.clone(), echo.endpoint().to_owned()];
    progress(format!("rpc: agent {} vs lymph Echo {} (pid {})", endpoints[0], endpoints[1], echo.pid()));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (latency, rates) = rt.block_on(async {
        let node = Arc::new(RpcNode::start(&NodeConfig::loopback(), None)?);
        let body = ping_body();
        for endpoint in &endpoints {
            for _ in 0..RPC_WARMUP_PINGS {
                ping(&node, endpoint, &body).await?;
            }
        }
        let mut latency = [Vec::new(), Vec::new()];
        for _ in 0..RPC_LATENCY_PINGS / RPC_LATENCY_BLOCK {
            for (samples, endpoint) in latency.iter_mut().zip(&endpoints) {
                for _ in 0..RPC_LATENCY_BLOCK {
                    let started = Instant::now();
                    ping(&node, endpoint, &body).await?;
                    samples.push(started.elapsed());
                }
            }
        }
        let mut rates = Vec::new();
        for in_flight in RPC_IN_FLIGHT {
            let ours = ping_rate(&node, &endpoints[0], in_flight).await?;
            let theirs = ping_rate(&node, &endpoints[1], in_flight).await?;
            rates.push((in_flight, ours, theirs));
        }
        node.shutdown();
        anyhow::Ok((latency, rates))
    })?;

    title("rpc — lymph.ping: our agent vs a real Python lymph 0.15 service");
    note("same client for both: chaos_agent's RpcNode (Rust, tokio), one node, N requests in flight");
    note(format!("ours: lymph-chaos agent --no-network-control, {}", endpoints[0]));
    note(format!("baseline: lymph 0.15 `instance --interface echo:Echo` (Python 3, gevent), {}", endpoints[1]));
    note(format!(
        "throughput: {:.1} s per level after {RPC_WARMUP_PINGS} warm-up pings; latency: {RPC_LATENCY_PINGS} pings \
         each at 1 in flight, alternating in blocks of {RPC_LATENCY_BLOCK}",
        RPC_RATE_TIME.as_secs_f64()
    ));
    note("at 1 in flight the rate is 1 / round trip, and the round trip includes the client and zmq (two TCP");
    note("  connections, zmq I/O threads on both sides); with more in flight it measures the services");
    let mut table = Table::verdicts();
    for (in_flight, ours, theirs) in &rates {
        let ratio = ours / theirs;
        table.row([
            format!("lymph.ping/s, {in_flight} in flight"),
            format!("{}/s", fmt_count(*ours)),
            format!("{}/s", fmt_count(*theirs)),
            fmt_ratio(ratio),
            format!("≥ {RPC_GOAL:.0}×"),
            met(ratio >= RPC_GOAL),
        ]);
    }
    let (ours, theirs) = (Percentiles::of(&latency[0]), Percentiles::of(&latency[1]));
    for (name, o, t) in [("p50", ours.p50, theirs.p50), ("p99", ours.p99, theirs.p99)] {
        table.row([
            format!("latency {name}, 1 in flight (n={})", ours.n),
            fmt_dur(o),
            fmt_dur(t),
            fmt_ratio(t.as_secs_f64() / o.as_secs_f64()),
            "(reported)".into(),
            "—".into(),
        ]);
    }
    table.print();
    drop(agent);
    drop(echo);
    Ok(())
}

fn ping_body() -> Vec<u8> {
    value::encode(&Value::Map(vec![(Value::Str("payload".into()), Value::Str(PING_PAYLOAD.into()))]))
}

async fn ping(node: &RpcNode, endpoint: &str, body: &[u8]) -> Result<()> {
    let reply = node.request(endpoint, "lymph.ping", body.to_vec(), PING_TIMEOUT).await?;
    match value::decode(&reply) {
        Ok(Value::Str(s)) if s == PING_PAYLOAD => Ok(()),
        other => bail!("lymph.ping to {endpoint} answered {other:?}, not the payload"),
    }
}

/// Completed pings per second with `in_flight` requests outstanding for [`RPC_RATE_TIME`].
async fn ping_rate(node: &Arc<RpcNode>, endpoint: &str, in_flight: usize) -> Result<f64> {
    let body = ping_body();
    let started = Instant::now();
    let deadline = started + RPC_RATE_TIME;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (node, endpoint, body) = (Arc::clone(node), endpoint.to_owned(), body.clone());
        workers.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                ping(&node, &endpoint, &body).await?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    let mut total = 0u64;
    while let Some(worker) = workers.join_next().await {
        total += worker.context("ping worker panicked")??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------------------------
// shared: the network engine in a namespace, tc, exchanges

/// Lifetime of benchmark rules (the benchmark removes them long before).
const RULE_TTL: Duration = Duration::from_secs(3600);

/// A [`NetworkEngine`] whose netlink socket lives in `ns`, driven by a runtime of its own; cleaned up (filters,
/// clsact qdiscs, IFB, pins) on drop.
struct NsEngine<'n> {
    ns: &'n Netns,
    rt: tokio::runtime::Runtime,
    engine: NetworkEngine,
    pin_dir: PathBuf,
    _state: tempfile::TempDir,
}

impl<'n> NsEngine<'n> {
    fn start(ns: &'n Netns) -> Result<NsEngine<'n>> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let state = tempfile::Builder::new().prefix("chaos-bench-net-").tempdir()?;
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/chaos-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let config = NetConfig {
            pin_dir: Some(pin_dir.clone()),
            state_file: state.path().join("network.json"),
            ifb_name: "lchaos0".into(),
            interfaces: None,
            max_packets_per_sec: 100_000,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let engine = ns
            .run(|| rt.block_on(NetworkEngine::start(config, true)))
            .with_context(|| format!("starting the network engine in {}", ns.name()))?
            .0;
        Ok(NsEngine { ns, rt, engine, pin_dir, _state: state })
    }

    /// Runs `f` on a thread inside the namespace, on this engine's runtime.
    fn block_on<T: Send>(&self, f: impl Future<Output = T> + Send) -> T {
        self.ns.run(|| self.rt.block_on(f))
    }

    /// Applies and reverts one rule: the classifier is attached afterwards, with no rule in the map.
    fn attach(&self) -> Result<()> {
        self.block_on(async {
            let h = self.engine.apply("attach", &[to_port(ATTACH_PORT)], &blackhole(), RULE_TTL).await?;
            self.engine.revert(&h).await?;
            anyhow::Ok(())
        })
    }
}

impl Drop for NsEngine<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.block_on(self.engine.cleanup()) {
            eprintln!("chaos-bench: cleaning up the network engine in {}: {err}", self.ns.name());
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// A port no benchmark traffic uses, for the rule that attaches the classifier.
const ATTACH_PORT: u16 = 19_998;

fn to_port(port: u16) -> PortMatch {
    PortMatch::new(port, Protocol::Tcp, Direction::To)
}

fn blackhole() -> Impairment {
    Impairment { blackhole: true, ..Default::default() }
}

/// `tc <args>` inside `ns`; its stdout, or an error with its stderr.
fn tc(ns: &Netns, args: &[&str]) -> Result<String> {
    NsHandle::open(ns)?.tc(args)
}

/// An open handle on a namespace for spawning many commands in it: `Netns::command` opens (and keeps) one fd per
/// command, which hundreds of timed `tc` runs would pile up.
struct NsHandle {
    file: std::fs::File,
}

impl NsHandle {
    fn open(ns: &Netns) -> Result<NsHandle> {
        let path = format!("/var/run/netns/{}", ns.name());
        Ok(NsHandle { file: std::fs::File::open(&path).with_context(|| format!("opening {path}"))? })
    }

    /// `tc <args>` in the namespace (only the network namespace changes, as with `Netns::command`).
    fn tc(&self, args: &[&str]) -> Result<String> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let mut cmd = Command::new("tc");
        cmd.args(args).stdin(Stdio::null());
        // SAFETY: setns(2) is async-signal-safe; `fd` stays open while `self` lives (the parent keeps it) and is
        // closed in the child by exec (O_CLOEXEC).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().context("running tc")?;
        ensure!(out.status.success(), "tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// One short request/response over a fresh connection.
fn exchange(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)
}

/// How a connection attempt to a port without a listener ended: a blackholed SYN times out, a free one is refused.
fn connect_outcome(addr: SocketAddr) -> &'static str {
    match TcpStream::connect_timeout(&addr, VERIFY_TIMEOUT) {
        Ok(_) => "connected",
        Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => "timed out",
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => "refused",
        Err(_) => "failed",
    }
}

/// A state directory for an agent on tmpfs (`/dev/shm`), as the agent's default `/run/lymph-chaos` is on a real
/// host: its journal is rewritten (write + rename) on every fault change, which on a disk filesystem waits for the
/// filesystem's journal now and then. Removed on drop.
fn tmpfs_state_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("chaos-bench-state-")
        .tempdir_in(TMPFS)
        .with_context(|| format!("a temp dir in {TMPFS}"))
}

/// tmpfs on every Linux with glibc's POSIX shared memory.
const TMPFS: &str = "/dev/shm";

/// How long a probe waits before calling a port blocked.
const VERIFY_TIMEOUT: Duration = Duration::from_millis(300);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

// ---------------------------------------------------------------------------------------------------------------
// network

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

/// A configuration of the network benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NetSetup {
    /// Nothing attached.
    Bare,
    /// Our classifier with this many rules requested.
    Ours(usize),
    /// The u32 chain with this many filters.
    U32(usize),
}

impl NetSetup {
    fn all() -> Vec<NetSetup> {
        let mut all = vec![NetSetup::Bare];
        all.extend(RULE_COUNTS.map(NetSetup::Ours));
        all.extend(RULE_COUNTS.map(NetSetup::U32));
        all
    }

    fn design(self) -> &'static str {
        match self {
            NetSetup::Bare => "bare",
            NetSetup::Ours(_) => "ours",
            NetSetup::U32(_) => "u32",
        }
    }

    fn rules(self) -> usize {
        match self {
            NetSetup::Bare => 0,
            NetSetup::Ours(n) | NetSetup::U32(n) => n,
        }
    }
}

/// What one configuration measured over all rounds.
#[derive(Clone, Debug, Default)]
struct NetSamples {
    /// Rules actually loaded (per namespace).
    loaded: usize,
    /// Bulk runs, Gbit/s, one per round.
    runs: Vec<f64>,
    /// RTT samples of all rounds.
    rtt: Vec<Duration>,
}

impl NetSamples {
    fn sorted_runs(&self) -> Vec<f64> {
        let mut runs = self.runs.clone();
        runs.sort_by(f64::total_cmp);
        runs
    }

    /// Median bulk throughput over the rounds.
    fn gbps(&self) -> f64 {
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

    fn rtt(&self) -> Percentiles {
        Percentiles::of(&self.rtt)
    }

    /// Per-round ratios to `base` (measured in the same round, seconds apart): (min, max).
    fn paired_range(&self, base: &NetSamples) -> (f64, f64) {
        let ratios: Vec<f64> = self.runs.iter().zip(&base.runs).map(|(a, b)| a / b).collect();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    }

    /// Run-to-run coefficient of variation of the bulk runs, in percent.
    fn cv_percent(&self) -> f64 {
        let n = self.runs.len() as f64;
        let mean = self.runs.iter().sum::<f64>() / n;
        let var = self.runs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
        100.0 * var.sqrt() / mean
    }
}

/// Makes the calling thread (and the threads it starts afterwards, which inherit it) SCHED_FIFO, so that other
/// work on a shared machine cannot preempt the measurement. Returns whether it worked.
fn realtime() -> bool {
    let param = libc::sched_param { sched_priority: MEASURE_RT_PRIORITY };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid parameter struct.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// Pins the calling thread to `cpu` and makes it real-time (see [`realtime`]).
fn measuring_thread(cpu: usize) {
    let _ = measure::pin_to_cpu(cpu);
    let _ = realtime();
}

/// The client namespace, the server namespace and the two servers in it.
struct NetProbe {
    srv: Netns,
    cli: Netns,
    srv_ip: String,
    bulk: TcpListener,
    _echo: EchoServer,
    client_cpu: usize,
    server_cpu: usize,
}

impl NetProbe {
    fn start() -> Result<NetProbe> {
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

    fn target(&self, port: u16) -> SocketAddr {
        addr(&format!("{}:{port}", self.srv_ip))
    }

    /// One round's measurement of the current configuration into `into`.
    fn measure(&self, into: &mut NetSamples) -> Result<()> {
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
    fn bulk_once(&self) -> Result<f64> {
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
    fn probe_rules(&self, loaded: usize) -> String {
        let last = RULE_PORT_BASE + loaded.saturating_sub(1) as u16;
        let unruled = RULE_PORT_BASE - 1;
        let (a, b) = self.cli.run(|| (connect_outcome(self.target(last)), connect_outcome(self.target(unruled))));
        format!("a connection to the last rule's port {last} {a}, to the unruled port {unruled} {b}")
    }
}

/// The competitors' design with the kernel this machine has: a root qdisc + one `u32 match ip dport` filter per
/// port, all in one priority (one linear list). Removed on drop.
struct U32Chain<'a> {
    probe: &'a NetProbe,
    filters: usize,
    dir: tempfile::TempDir,
}

impl<'a> U32Chain<'a> {
    /// cli: `htb` root (sch_prio is not in this kernel) with default class 1:1 and class 1:2 whose leaf is
    /// `pfifo limit 0` (drops everything: the blackhole); srv: clsact for ingress filters and an IFB they redirect
    /// to on a match.
    fn setup(probe: &'a NetProbe) -> Result<U32Chain<'a>> {
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
    fn grow(&mut self, total: usize) -> Result<()> {
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
fn grow_ours(engines: &[&NsEngine], from: usize, to: usize) -> (usize, Option<String>) {
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

fn bench_network() -> Result<()> {
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

// ---------------------------------------------------------------------------------------------------------------
// changes

const CHANGE_PORT: u16 = 7301;
const CHANGE_WARMUP: usize = 20;
const CHANGE_ITERATIONS: usize = 300;
const AGENT_CHANGE_ITERATIONS: usize = 200;
const CHANGE_P99_GOAL: Duration = Duration::from_millis(2);
const CHANGE_SPEEDUP_GOAL: f64 = 10.0;
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Timings of one design: request → effective, request → gone.
struct ChangeTimes {
    apply: Vec<Duration>,
    revert: Vec<Duration>,
    verified: String,
}

fn bench_changes() -> Result<()> {
    let target = addr(&format!("127.0.0.1:{CHANGE_PORT}"));
    progress("changes: NetworkEngine::apply/revert in steady state");
    let engine_times = {
        let ns = Netns::new("bchgeng");
        let _server = ns.run(|| EchoServer::start(target))?;
        let engine = NsEngine::start(&ns)?;
        engine.attach()?;
        engine.block_on(async {
            let e = &engine.engine;
            let mut times = ChangeTimes { apply: Vec::new(), revert: Vec::new(), verified: String::new() };
            // "Effective": a connection attempt right after apply returns is blackholed; right after revert it works.
            let h = e.apply("verify", &[to_port(CHANGE_PORT)], &blackhole(), RULE_TTL).await?;
            let during = exchange(target, VERIFY_TIMEOUT);
            let drops = e.counters(&h).await.drops;
            e.revert(&h).await?;
            let after = exchange(target, Duration::from_secs(2));
            ensure!(
                during.is_err() && drops > 0,
                "the rule was not effective right after apply ({during:?}, {drops} drops)"
            );
            ensure!(after.is_ok(), "the rule was still there right after revert: {after:?}");
            times.verified = format!(
                "verified: right after apply a connection to the port timed out ({drops} SYNs dropped by the rule), \
                 right after revert an exchange succeeded"
            );
            for i in 0..CHANGE_WARMUP + CHANGE_ITERATIONS {
                let started = Instant::now();
                let h = e.apply(&format!("c{i}"), &[to_port(CHANGE_PORT)], &blackhole(), RULE_TTL).await?;
                let applied = started.elapsed();
                let started = Instant::now();
                e.revert(&h).await?;
                let reverted = started.elapsed();
                if i >= CHANGE_WARMUP {
                    times.apply.push(applied);
                    times.revert.push(reverted);
                }
            }
            anyhow::Ok(times)
        })?
    };

    progress("changes: spawning tc filter add/del (u32)");
    let tc_times = {
        let ns = Netns::new("bchgtc");
        let _server = ns.run(|| EchoServer::start(target))?;
        tc(&ns, &["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1"])?;
        for class in ["1:1", "1:2"] {
            tc(
                &ns,
                &[
                    "class", "add", "dev", "lo", "parent", "1:", "classid", class, "htb", "rate", "100gbit", "quantum",
                    "60000",
                ],
            )?;
        }
        tc(&ns, &["qdisc", "add", "dev", "lo", "parent", "1:2", "handle", "20:", "pfifo", "limit", "0"])?;
        let port = CHANGE_PORT.to_string();
        let add: Vec<&str> = vec![
            "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "handle", "800::800", "u32",
            "match", "ip", "dport", &port, "0xffff", "flowid", "1:2",
        ];
        let del: Vec<&str> = vec![
            "filter", "del", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "handle", "800::800", "u32",
        ];
        let mut times = ChangeTimes { apply: Vec::new(), revert: Vec::new(), verified: String::new() };
        let handle = NsHandle::open(&ns)?;
        handle.tc(&add)?;
        let during = ns.run(|| exchange(target, VERIFY_TIMEOUT));
        let stats = tc(&ns, &["-s", "qdisc", "show", "dev", "lo", "parent", "1:2"])?;
        handle.tc(&del)?;
        let after = ns.run(|| exchange(target, Duration::from_secs(2)));
        ensure!(during.is_err(), "the tc filter was not effective right after tc returned");
        ensure!(after.is_ok(), "the tc filter was still there right after tc filter del returned: {after:?}");
        let dropped = stats.split("dropped ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("?").to_owned();
        times.verified = format!(
            "verified: right after `tc filter add` returned a connection timed out ({dropped} dropped by pfifo limit 0 \
             in class 1:2), right after `tc filter del` an exchange succeeded"
        );
        for i in 0..CHANGE_WARMUP + CHANGE_ITERATIONS {
            let started = Instant::now();
            handle.tc(&add)?;
            let applied = started.elapsed();
            let started = Instant::now();
            handle.tc(&del)?;
            let reverted = started.elapsed();
            if i >= CHANGE_WARMUP {
                times.apply.push(applied);
                times.revert.push(reverted);
            }
        }
        times
    };

    progress("changes: the agent's Chaos.inject/revert over RPC");
    let (agent_times, agent_pid_apply) = {
        let ns = Netns::new("bchgagent");
        let echo = EchoProcess::start(&ns, CHANGE_PORT);
        let echo_pid = echo.pid();
        let config = format!("faults: {{allowed_processes: [\"{}\"]}}\n", EchoProcess::MARKER);
        let state = tmpfs_state_dir()?;
        let agent = AgentProcess::start(
            Some(&ns),
            AgentOptions { config_yaml: config, state_dir: Some(state.path().join("state")), ..Default::default() },
        )?;
        let endpoint = agent.endpoint.clone();
        let times = ns.block_on(|| async {
            let client = Client::new()?;
            let call = |method: &'static str, kwargs: serde_json::Value| {
                let (client, endpoint) = (&client, &endpoint);
                async move {
                    let reply = client.call_endpoint(endpoint, &format!("Chaos.{method}"), &kwargs, RPC_TIMEOUT).await;
                    reply.map(|v| v.to_json()).with_context(|| format!("Chaos.{method}({kwargs})"))
                }
            };
            let inject = json!({"kind": "blackhole", "port": CHANGE_PORT, "lifetime": 600});
            let id_of = |reply: &serde_json::Value| {
                reply["id"].as_str().map(str::to_owned).with_context(|| format!("no fault id in {reply}"))
            };
            call("status", json!({})).await?;
            let mut times = ChangeTimes { apply: Vec::new(), revert: Vec::new(), verified: String::new() };
            let id = id_of(&call("inject", inject.clone()).await?)?;
            let during = exchange(target, VERIFY_TIMEOUT);
            call("revert", json!({"id": id})).await?;
            let after = exchange(target, Duration::from_secs(2));
            ensure!(during.is_err(), "Chaos.inject's blackhole was not effective when the reply arrived");
            ensure!(after.is_ok(), "Chaos.revert's reply arrived but the blackhole was still there: {after:?}");
            times.verified = "verified: right after the inject reply a connection timed out, right after the revert \
                              reply an exchange succeeded"
                .into();
            for i in 0..CHANGE_WARMUP + AGENT_CHANGE_ITERATIONS {
                let started = Instant::now();
                let id = id_of(&call("inject", inject.clone()).await?)?;
                let applied = started.elapsed();
                let started = Instant::now();
                call("revert", json!({"id": id})).await?;
                let reverted = started.elapsed();
                if i >= CHANGE_WARMUP {
                    times.apply.push(applied);
                    times.revert.push(reverted);
                }
            }
            // Diagnosis: the same fault targeted by pid, which skips resolving the port's owner.
            let by_pid = json!({"kind": "blackhole", "pid": echo_pid, "lifetime": 600});
            let mut pid_apply = Vec::new();
            for i in 0..CHANGE_WARMUP + AGENT_CHANGE_ITERATIONS {
                let started = Instant::now();
                let id = id_of(&call("inject", by_pid.clone()).await?)?;
                let applied = started.elapsed();
                call("revert", json!({"id": id})).await?;
                if i >= CHANGE_WARMUP {
                    pid_apply.push(applied);
                }
            }
            client.node().shutdown();
            anyhow::Ok((times, pid_apply))
        })?;
        drop(agent);
        drop(echo);
        times
    };

    title("changes — request → rule effective, request → rule gone");
    note("ours (engine): NetworkEngine::apply/revert of a blackhole on one tcp port, in-process, in steady state (the");
    note("  classifier already attached by an earlier fault): a map update; the call returns when the kernel has it");
    note("ours (agent RPC): Chaos.inject(kind=blackhole, port=P, lifetime=600) / Chaos.revert(id) to an agent in its");
    note("  namespace, through a persistent Rust client: RPC + targeting (port → allowed process) + journal + map;");
    note(format!("  its state dir (journal) on tmpfs ({TMPFS}) as /run/lymph-chaos is in production; events on disk"));
    note("baseline: spawning `tc filter add dev lo parent 1: protocol ip prio 1 handle 800::800 u32 match ip dport P");
    note(
        "  0xffff flowid 1:2` / `tc filter del … handle 800::800 u32` (as chaosd and Pumba shell out), on an HTB root",
    );
    note("  whose class 1:2 drops everything (pfifo limit 0); the time until tc exits");
    note("effective = a packet to the port is affected right after the call returns; checked once per design:");
    note(format!("  engine   {}", engine_times.verified));
    note(format!("  agent    {}", agent_times.verified));
    note(format!("  tc       {}", tc_times.verified));
    note(format!(
        "iterations: {CHANGE_ITERATIONS} (engine, tc), {AGENT_CHANGE_ITERATIONS} (agent), after {CHANGE_WARMUP} warm-up"
    ));
    let by_pid = Percentiles::of(&agent_pid_apply);
    note(format!(
        "diagnosis: the same Chaos.inject targeted by pid=P instead of port=P (no owner lookup for the port): apply → \
         effective p50 {} p99 {}",
        fmt_dur(by_pid.p50),
        fmt_dur(by_pid.p99)
    ));
    println!();
    let mut table = Table::verdicts();
    let tc_apply = Percentiles::of(&tc_times.apply);
    let tc_revert = Percentiles::of(&tc_times.revert);
    for (label, times) in [("engine", &engine_times), ("agent RPC", &agent_times)] {
        for (what, ours, base) in [
            ("apply → effective", Percentiles::of(&times.apply), tc_apply),
            ("revert → gone", Percentiles::of(&times.revert), tc_revert),
        ] {
            for (pct, o, b) in [("p50", ours.p50, base.p50), ("p99", ours.p99, base.p99)] {
                let speedup = b.as_secs_f64() / o.as_secs_f64();
                let (goal, ok) = if pct == "p99" {
                    (
                        format!("≤ {} and ≥ {CHANGE_SPEEDUP_GOAL:.0}×", fmt_dur(CHANGE_P99_GOAL)),
                        o <= CHANGE_P99_GOAL && speedup >= CHANGE_SPEEDUP_GOAL,
                    )
                } else {
                    (format!("≥ {CHANGE_SPEEDUP_GOAL:.0}×"), speedup >= CHANGE_SPEEDUP_GOAL)
                };
                table.row([
                    format!("{label}: {what} {pct}"),
                    fmt_dur(o),
                    fmt_dur(b),
                    fmt_ratio(speedup),
                    goal,
                    met(ok),
                ]);
            }
        }
    }
    table.print();
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// kill

/// In the command line of kill targets (argv[0]); the agent's config allows exactly these.
const KILL_MARKER: &str = "chaos-bench-kill-target";
const KILL_WARMUP: usize = 5;
const KILL_ITERATIONS: usize = 100;
const KILL_P99_GOAL: Duration = Duration::from_millis(5);

/// A short-lived target: `sleep 300` whose argv[0] is [`KILL_MARKER`]; SIGKILLed by the kernel if the thread that
/// spawned it dies, killed and reaped on drop unless already reaped.
struct Target {
    child: Option<Child>,
}

impl Target {
    fn spawn() -> Result<Target> {
        let mut cmd = Command::new("sleep");
        cmd.arg0(KILL_MARKER).arg("300").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: prctl in the child only affects the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // std's spawn returns after the exec succeeded, so the marker is in /proc/<pid>/cmdline already.
        Ok(Target { child: Some(cmd.spawn().context("spawning sleep")?) })
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// waitpid: returns once the process is reaped.
    fn reap(&mut self) -> Result<()> {
        let mut child = self.child.take().context("already reaped")?;
        let status = child.wait()?;
        ensure!(!status.success(), "the target exited normally ({status}), not by a signal");
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn bench_kill() -> Result<()> {
    progress("kill: Chaos.kill(pid) through an agent in a namespace");
    let ns = Netns::new("bkill");
    let config = format!("faults: {{allowed_processes: [\"{KILL_MARKER}\"]}}\n");
    let state = tmpfs_state_dir()?;
    let agent = AgentProcess::start(
        Some(&ns),
        AgentOptions {
            config_yaml: config,
            args: vec!["--no-network-control".into()],
            state_dir: Some(state.path().join("state")),
            ..Default::default()
        },
    )?;
    let endpoint = agent.endpoint.clone();
    let (reply_times, reaped_times) = ns.block_on(|| async {
        let client = Client::new()?;
        client.call_endpoint(&endpoint, "Chaos.status", &json!({}), RPC_TIMEOUT).await?;
        let (mut replies, mut reaped) = (Vec::new(), Vec::new());
        for i in 0..KILL_WARMUP + KILL_ITERATIONS {
            let mut target = Target::spawn()?;
            let pid = target.pid();
            let started = Instant::now();
            let reply = client.call_endpoint(&endpoint, "Chaos.kill", &json!({"pid": pid}), RPC_TIMEOUT).await?;
            let replied = started.elapsed();
            target.reap()?;
            let gone = started.elapsed();
            let text = reply.to_json().to_string();
            ensure!(text.contains(&format!("exited: [{pid}]")), "Chaos.kill({pid}) did not report the exit: {text}");
            if i >= KILL_WARMUP {
                replies.push(replied);
                reaped.push(gone);
            }
        }
        client.node().shutdown();
        anyhow::Ok((replies, reaped))
    })?;
    drop(agent);

    progress("kill: spawning kill -KILL, and kill(2) in-process");
    let mut spawned = Vec::new();
    let mut floor = Vec::new();
    for i in 0..KILL_WARMUP + KILL_ITERATIONS {
        let mut target = Target::spawn()?;
        let started = Instant::now();
        let status = Command::new("kill").args(["-KILL", &target.pid().to_string()]).status()?;
        ensure!(status.success(), "kill -KILL {} failed: {status}", target.pid());
        target.reap()?;
        let took = started.elapsed();
        let mut target2 = Target::spawn()?;
        let started = Instant::now();
        // SAFETY: signalling our own child, not yet reaped (its pid cannot have been reused).
        ensure!(unsafe { libc::kill(target2.pid(), libc::SIGKILL) } == 0, "kill(2): {}", io::Error::last_os_error());
        target2.reap()?;
        let took2 = started.elapsed();
        if i >= KILL_WARMUP {
            spawned.push(took);
            floor.push(took2);
        }
    }

    title("kill — Chaos.kill request → target reaped");
    note("ours: Chaos.kill(pid=P) over RPC to an agent in a namespace (--no-network-control) whose config allows the");
    note(format!(
        "  target (`sleep 300` with argv[0] = {KILL_MARKER}); the agent replies once the process has exited (pidfd),"
    ));
    note("  the reply says `exited: [P]`; then this process's waitpid returns (reaped); agent state dir on tmpfs");
    note("baseline: spawning `kill -KILL P` then waitpid (as shell-based tools do)");
    let fl = Percentiles::of(&floor);
    note(format!(
        "floor: kill(2) + waitpid from this process: p50 {} p99 {} (no RPC, no targeting)",
        fmt_dur(fl.p50),
        fmt_dur(fl.p99)
    ));
    note(format!("{KILL_ITERATIONS} kills each, after {KILL_WARMUP} warm-up"));
    println!();
    let replies = Percentiles::of(&reply_times);
    let reaped = Percentiles::of(&reaped_times);
    let base = Percentiles::of(&spawned);
    let mut table = Table::verdicts();
    table.row([
        "request → reply (exited) p50".into(),
        fmt_dur(replies.p50),
        "—".into(),
        "—".into(),
        "(reported)".into(),
        "—".into(),
    ]);
    table.row([
        "request → reply (exited) p99".into(),
        fmt_dur(replies.p99),
        "—".into(),
        "—".into(),
        "(reported)".into(),
        "—".into(),
    ]);
    table.row([
        "request → reaped p50".into(),
        fmt_dur(reaped.p50),
        fmt_dur(base.p50),
        fmt_ratio(base.p50.as_secs_f64() / reaped.p50.as_secs_f64()),
        "(reported)".into(),
        "—".into(),
    ]);
    table.row([
        "request → reaped p99".into(),
        fmt_dur(reaped.p99),
        fmt_dur(base.p99),
        fmt_ratio(base.p99.as_secs_f64() / reaped.p99.as_secs_f64()),
        format!("≤ {}", fmt_dur(KILL_P99_GOAL)),
        met(reaped.p99 <= KILL_P99_GOAL),
    ]);
    table.row([
        "request → reaped max".into(),
        fmt_dur(reaped.max),
        fmt_dur(base.max),
        fmt_ratio(base.max.as_secs_f64() / reaped.max.as_secs_f64()),
        "(reported)".into(),
        "—".into(),
    ]);
    table.print();
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// classifier: cost per packet, this object vs the previous one

/// Single runs per figure. One run each (not the kernel's `repeat`): a repeated run reuses one skb, and ours marks
/// the skb as judged on the first run, so every later repetition would measure the "already judged" exit only.
const CLS_RUNS: u32 = 100_000;
const CLS_ROUNDS: usize = 5;
/// Rules on other ports, so the hash maps are not trivially small.
const CLS_OTHER_RULES: u16 = 1000;
const CLS_PORT: u16 = 5353;

/// A classifier object loaded for test runs, with the rules of the benchmark, in either map layout.
struct ClsObject {
    _ebpf: aya::Ebpf,
    ingress_fd: i32,
}

fn cls_rule_bytes(slot: u32, expires: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&expires.to_ne_bytes());
    b[8..12].copy_from_slice(&chaos_common::action::COUNT.to_ne_bytes());
    b[20..24].copy_from_slice(&slot.to_ne_bytes());
    b
}

/// Loads `object` and fills its maps: `lo` (ifindex 1) classified as a NIC, the local addresses (new layout
/// only), an observe rule on `CLS_PORT` and `CLS_OTHER_RULES` rules on other ports. `new_layout`: 20-byte keys
/// with an address, else the previous 4-byte keys (port, proto, scope).
fn cls_load(object: &[u8], new_layout: bool) -> Result<ClsObject> {
    use aya::maps::HashMap as BpfMap;
    use chaos_common::scope::{HOOK_EGRESS, HOOK_INGRESS, SIDE_DST, encode};
    let mut ebpf = aya::EbpfLoader::new().map_max_entries(chaos_common::MAP_COUNTERS, 2048).load(object)?;
    let program: &mut aya::programs::SchedClassifier =
        ebpf.program_mut(chaos_common::PROG_INGRESS).context("no chaos_ingress")?.try_into()?;
    program.load()?;
    let ingress_fd = {
        use std::os::fd::{AsFd, AsRawFd};
        program.fd()?.as_fd().as_raw_fd()
    };
    let expires = chaos_agent::faults::network::expiry_after(Duration::from_secs(3600));
    let mut ifaces: BpfMap<_, u32, [u8; 8]> =
        BpfMap::try_from(ebpf.map_mut(chaos_common::MAP_IFACES).context("no iface map")?)?;
    ifaces.insert(1, [14, 0, 0, 0, HOOK_INGRESS, HOOK_EGRESS, 0, 0], 0)?;
    let scope = encode(HOOK_INGRESS, SIDE_DST);
    let ports = std::iter::once(CLS_PORT).chain((0..CLS_OTHER_RULES).map(|i| 20000 + i));
    if new_layout {
        let mut addrs: BpfMap<_, [u8; 16], u8> =
            BpfMap::try_from(ebpf.map_mut(chaos_common::MAP_LOCAL_ADDRS).context("no address map")?)?;
        for local in ["10.0.0.1", "fd00::1"] {
            addrs.insert(chaos_agent::faults::network::key_addr(local.parse()?), 1, 0)?;
        }
        let mut rules: BpfMap<_, [u8; 20], [u8; 24]> =
            BpfMap::try_from(ebpf.map_mut(chaos_common::MAP_RULES).context("no rule map")?)?;
        for (slot, port) in ports.enumerate() {
            let mut key = [0u8; 20];
            key[16..18].copy_from_slice(&port.to_ne_bytes());
            key[18] = chaos_common::proto::UDP;
            key[19] = scope;
            rules.insert(key, cls_rule_bytes(slot as u32, expires), 0)?;
        }
    } else {
        let mut rules: BpfMap<_, [u8; 4], [u8; 24]> =
            BpfMap::try_from(ebpf.map_mut(chaos_common::MAP_RULES).context("no rule map")?)?;
        for (slot, port) in ports.enumerate() {
            let p = port.to_ne_bytes();
            rules.insert([p[0], p[1], chaos_common::proto::UDP, scope], cls_rule_bytes(slot as u32, expires), 0)?;
        }
    }
    Ok(ClsObject { _ebpf: ebpf, ingress_fd })
}

/// An Ethernet + IPv4 (or IPv6) + UDP frame from 10.0.0.2:40000 to 10.0.0.`dst`:`dport` (fd00::2 → fd00::`dst`);
/// 10.0.0.1 and fd00::1 are this host's addresses.
fn cls_frame(v6: bool, dst: u8, dport: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&[0, 40, 0, 0]);
    udp.extend_from_slice(&[0u8; 32]);
    if v6 {
        f.extend_from_slice(&[0x86, 0xDD, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[17, 64]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, dst]);
    } else {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, dst]);
    }
    f.extend_from_slice(&udp);
    f
}

fn bench_classifier() -> Result<()> {
    let old_path = std::env::var_os("CHAOS_OLD_EBPF_OBJECT")
        .context("CHAOS_OLD_EBPF_OBJECT is not set (cargo xtask bench classifier builds the previous object)")?;
    let old = std::fs::read(&old_path).with_context(|| format!("reading {}", old_path.to_string_lossy()))?;
    let new = chaos_agent::faults::network::classifier::embedded_object();
    ensure!(!new.is_empty(), "this build carries no BPF object (cargo xtask build-ebpf)");
    let ns = Netns::new("bench-cls");
    let cases: [(&str, Vec<u8>); 5] = [
        ("IPv4 UDP to this host, a port no rule names", cls_frame(false, 1, 9999)),
        ("IPv4 UDP to this host, the observed port", cls_frame(false, 1, CLS_PORT)),
        ("IPv6 UDP to this host, a port no rule names", cls_frame(true, 1, 9999)),
        ("IPv6 UDP to this host, the observed port", cls_frame(true, 1, CLS_PORT)),
        ("IPv4 UDP forwarded to another machine, the observed port", cls_frame(false, 9, CLS_PORT)),
    ];
    let results = ns.run(|| -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
        let ours = cls_load(new, true)?;
        let before = cls_load(&old, false)?;
        let mut out = vec![(Vec::new(), Vec::new()); cases.len()];
        for round in 0..CLS_ROUNDS {
            progress(format!("classifier: round {}/{CLS_ROUNDS}", round + 1));
            for (i, (_, frame)) in cases.iter().enumerate() {
                for (which, obj) in [(0, &ours), (1, &before)] {
                    let mut total = 0u64;
                    for _ in 0..CLS_RUNS {
                        let run = chaos_agent::faults::network::classifier::test_run_fd(obj.ingress_fd, frame, 1)?;
                        total += u64::from(run.duration_ns);
                    }
                    let ns_per = total as f64 / f64::from(CLS_RUNS);
                    if which == 0 { out[i].0.push(ns_per) } else { out[i].1.push(ns_per) }
                }
            }
        }
        Ok(out)
    })?;
    title("classifier: cost per packet (chaos_ingress, BPF_PROG_TEST_RUN)");
    note(format!(
        "mean of {CLS_RUNS} single runs (the kernel's time per run, its timer included) per figure, median of \
         {CLS_ROUNDS} interleaved rounds; {} rules loaded; ours: address + \
         port keys, judged bits, expired rules fall through; previous: port keys (git a401fe4)",
        CLS_OTHER_RULES + 1
    ));
    let mut table = Table::new(&["frame", "ours ns/packet", "previous ns/packet", "ours − previous"]);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for ((name, _), (mut ours, mut before)) in cases.iter().zip(results) {
        let (o, b) = (median(&mut ours), median(&mut before));
        table.row([(*name).to_owned(), format!("{o:.0}"), format!("{b:.0}"), format!("{:+.0} ns", o - b)]);
    }
    table.print();
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// accuracy

/// How long the accuracy guest may run.
const ACCURACY_BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// The agent's delay accuracy next to raw `tc netem`: a qemu guest (Debian 12 kernel, TCG) runs every delay
/// comparison of the VM tier (`chaos-vm-guest --accuracy`: more rounds, no verdict extension) with this release
/// agent; per scenario, the RTT median and p90 through raw netem and through the agent, measured interleaved in the
/// same boot, and their differences.
fn bench_accuracy() -> Result<()> {
    use chaos_tests::vm::{Guest, VmAssets};
    let assets = VmAssets::locate().context("the VM assets (cargo xtask vm-prepare)")?;
    let guest_bin =
        std::env::current_exe()?.parent().map(|d| d.join("chaos-vm-guest")).filter(|p| p.exists()).context(
            "chaos-vm-guest next to chaos-bench (cargo build --release -p chaos-tests --bin chaos-vm-guest)",
        )?;
    let agent = std::env::var_os("CHAOS_AGENT_BIN").map(std::path::PathBuf::from).context("CHAOS_AGENT_BIN")?;
    title("accuracy — added delay through the agent vs raw tc netem, interleaved in one qemu boot");
    note(format!("guest kernel {}, agent {}", assets.abi, agent.display()));
    let guest = Guest::builder(&assets)
        .binary(&guest_bin, "/usr/local/bin/chaos-vm-guest")
        .binary(&agent, "/usr/local/bin/lymph-chaos")
        .module("bridge")
        .module("8021q")
        .module("bonding")
        .command("/usr/local/bin/chaos-vm-guest --agent-bin /usr/local/bin/lymph-chaos --accuracy")
        .build()?;
    progress("accuracy: booting the guest (a few minutes under TCG)");
    let run = guest.run(ACCURACY_BOOT_TIMEOUT)?;
    ensure!(run.done.is_some(), "the guest never finished:\n{}", run.console_tail(60));
    let rows: Vec<(&str, &chaos_tests::vm::ScenarioResult, &chaos_tests::vm::ScenarioResult)> = run
        .results
        .iter()
        .filter_map(|ours| {
            let name = ours.name.strip_prefix("agent-")?;
            let raw = run.results.iter().find(|r| r.name.strip_prefix("tc-") == Some(name))?;
            Some((name, raw, ours))
        })
        .collect();
    ensure!(!rows.is_empty(), "no comparison reported:\n{}", run.console_tail(60));
    println!(
        "  {:<24} {:>9}  {:>9} {:>9} {:>7}  {:>9} {:>9} {:>7}  {:>6}  {:>7}",
        "scenario", "want", "raw p50", "ours p50", "Δp50", "raw p90", "ours p90", "Δp90", "n", "verdict"
    );
    let num = |r: &chaos_tests::vm::ScenarioResult, k: &str| r.number(k).unwrap_or(f64::NAN);
    let (mut d50s, mut d90s) = (Vec::new(), Vec::new());
    for (name, raw, ours) in &rows {
        let (d50, d90) = (num(ours, "ms") - num(raw, "ms"), num(ours, "p90_ms") - num(raw, "p90_ms"));
        let want = match (ours.number("want_ms"), ours.number("jitter_ms")) {
            (Some(w), Some(j)) => format!("{w:.0}±{j:.0} ms"),
            (Some(w), None) => format!("{w:.0} ms"),
            _ => "-".into(),
        };
        if ours.number("jitter_ms").is_none() {
            d50s.push(d50.abs());
            d90s.push(d90.abs());
        }
        println!(
            "  {name:<24} {want:>9}  {:>9.2} {:>9.2} {d50:>+7.2}  {:>9.2} {:>9.2} {d90:>+7.2}  {:>6}  {:>7}",
            num(raw, "ms"),
            num(ours, "ms"),
            num(raw, "p90_ms"),
            num(ours, "p90_ms"),
            ours.value("n").unwrap_or("-"),
            if ours.passed { "pass" } else { "FAIL" },
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    note(format!(
        "RTT in ms. Over the {} fixed-delay scenarios: median |Δp50| {:.2} ms, median |Δp90| {:.2} ms (raw netem is the \
         baseline: 0 would be identical)",
        d50s.len(),
        median(&mut d50s),
        median(&mut d90s)
    ));
    note(format!(
        "boot → done {:.0} s wall; numbers under TCG on a shared host, each comparison interleaved in rounds",
        run.wall.as_secs_f64()
    ));
    Ok(())
}
