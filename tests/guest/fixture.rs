//! What the scenarios share: the topology (veth pair, device stacks), the services process, the operator's root
//! qdiscs, one agent, and the baseline measured before any qdisc was installed — built once, by the first test
//! that runs, and kept in a mutex every test holds for its whole run, so two scenarios never overlap (whatever
//! `--test-threads` says) and no test depends on which ran before it: each starts from "agent running, no fault
//! of ours active, operator's qdiscs in place" and leaves that state behind (a stopped or killed agent is started
//! again by the next test).

use std::{
    cell::Cell,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chaos_agent::cli::{Cli, request_for};
use chaos_test_support::eventually;
use chaos_tests::{
    agent::{AgentOptions, AgentProcess},
    measure::{available_cpus, pin_to_cpu},
    mutant::Mutant,
};
use clap::Parser as _;
use serde_json::Value as Json;

use crate::{
    kernel::{QdiscWatch, Stack, Topology, teardown},
    *,
};

/// The shared fixture, built by the first test (`None` until then; `Err` when it could not be built).
static FIXTURE: Mutex<Option<Result<Fixture, String>>> = Mutex::new(None);

/// Everything the scenarios share; see the module docs.
pub(crate) struct Fixture {
    /// The agent under test (dropped first: it is stopped before the services go).
    pub(crate) agent: GuestAgent,
    pub(crate) qdiscs: QdiscWatch,
    /// Whether the veth pair to the caller's namespace exists (the ingress and TCP loss scenarios need it).
    pub(crate) veth: bool,
    /// Whether the bridge, VLAN and bond stacks exist.
    pub(crate) stacks: bool,
    /// RTTs measured before any qdisc or agent was there.
    pub(crate) baseline: Result<Outcome, String>,
    _services: Services,
}

/// How often `Agent::measured` asks whether the agent has measured a fault.
const MEASURED_POLL: Duration = Duration::from_millis(100);

impl Fixture {
    fn build() -> Result<Self, String> {
        teardown(); // leftovers of an interrupted run by hand
        // SAFETY: registers a plain `extern "C" fn` to run at exit (libtest exits through `exit`).
        unsafe { libc::atexit(at_exit) };
        let veth = Topology::create()
            .inspect_err(|err| println!("DETAIL setup: no veth pair / namespace (its scenarios will fail): {err:#}"))
            .is_ok();
        let stacks = Stack::ALL
            .iter()
            .try_for_each(|s| s.create())
            .inspect_err(|err| {
                println!("DETAIL setup: device stacks (bridge, VLAN, bond; their scenarios will fail): {err:#}")
            })
            .is_ok();
        let services =
            Services::start(veth, stacks).map_err(|err| format!("starting the services process: {err:#}"))?;
        let baseline = crate::scenarios::baseline().map_err(|err| format!("{err:#}"));
        let mut qdiscs = QdiscWatch::install(veth).map_err(|err| format!("the operator's root qdiscs: {err:#}"))?;
        let agent = GuestAgent::start(Mutant::from_env()).map_err(|err| format!("starting the agent: {err:#}"))?;
        qdiscs.check("agent-started");
        Ok(Self { agent, qdiscs, veth, stacks, baseline, _services: services })
    }

    /// Fails unless the veth pair (`veth`) or the device stacks (`stacks`) were created.
    pub(crate) fn needs(&self, veth: bool, stacks: bool) -> Result<()> {
        ensure!(self.veth || !veth, "no veth pair to the caller's namespace (see DETAIL setup)");
        ensure!(self.stacks || !stacks, "no device stacks (see DETAIL setup)");
        Ok(())
    }
}

/// At exit (runs by hand): stop the agent and the services, remove what the scenarios added to the machine.
extern "C" fn at_exit() {
    if let Ok(mut fixture) = FIXTURE.try_lock() {
        drop(fixture.take());
    }
    teardown();
}

/// Runs one scenario test: pins this thread to [`PROBE_CPU`], takes the fixture (building it on first use),
/// starts the agent again if an earlier test stopped or killed it, runs `body`, prints a `RESULT` line per row and
/// checks the operator's root qdiscs; panics (fails the test) when a row failed or the qdiscs changed.
pub(crate) fn scenario(test: &str, body: impl FnOnce(&mut Fixture) -> Vec<(String, Result<Outcome>)>) {
    // libtest printed `test <name> ... ` without a newline: its verdict then stands on a line of its own.
    println!();
    if let Err(err) = pin_to_cpu(PROBE_CPU) {
        println!("DETAIL {test}: pinning to CPU {PROBE_CPU}: {err}");
    }
    let mut slot = FIXTURE.lock().unwrap_or_else(PoisonError::into_inner);
    let fixture = match slot.get_or_insert_with(Fixture::build) {
        Ok(fixture) => fixture,
        Err(err) => panic!("the scenarios' fixture could not be built: {err}"),
    };
    if let Err(err) = fixture.agent.ensure_running() {
        panic!("the agent could not be started again: {err:#}");
    }
    let rows = body(fixture);
    assert!(!rows.is_empty(), "{test} reported nothing");
    let mut failed: Vec<String> =
        rows.into_iter().filter_map(|(name, outcome)| (!report(&name, outcome)).then_some(name)).collect();
    if !fixture.qdiscs.check(&format!("after-{test}")) {
        failed.push("the operator's root qdiscs (see DETAIL agent-root-qdisc-kept)".into());
    }
    if !failed.is_empty() {
        fixture.agent.print_log(80);
        panic!("{test}: failed {failed:?} (RESULT and DETAIL lines above)");
    }
}

/// Prints a row's `RESULT` line (and, when it failed, why and what the kernel had); whether it passed.
fn report(name: &str, outcome: Result<Outcome>) -> bool {
    let outcome = outcome.unwrap_or_else(|err| {
        println!("DETAIL {name}: {err:#}");
        Outcome::fail(vec![("error", "see_detail".into())])
    });
    if !outcome.passed {
        for dev in [LO, VETH_SRV, AGENT_IFB] {
            if let Ok(out) = Command::new(TC).args(["-s", "qdisc", "show", "dev", dev]).output() {
                print!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
    }
    outcome.print(name);
    outcome.passed
}

/// `CHAOS_VM_ACCURACY=1` (`cargo xtask bench accuracy`): the comparisons run [`ACCURACY_ROUNDS`] rounds and are
/// not extended.
pub(crate) fn accuracy_mode() -> bool {
    std::env::var("CHAOS_VM_ACCURACY").is_ok_and(|v| v == "1")
}

// ---------------------------------------------------------------------------------------------------------------
// The services process

/// The services the faults target, in a process of their own (`chaos-vm-services`; the agent refuses to fault
/// ports of its parent, this process), started from the test thread pinned to [`PROBE_CPU`] so it runs there
/// too; it exits when its stdin closes (this process ended or dropped it).
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
            for ip in [IpAddr::V4(SRV_V4), IpAddr::V6(SRV_V6)] {
                for port in [PORT_FAULTED, PORT_CONTROL] {
                    specs.push(format!("echo={}", SocketAddr::new(ip, port)));
                }
            }
            specs.push(format!("sink={}", SocketAddr::new(IpAddr::V4(SRV_V4), PORT_TCP_LOSS)));
        }
        if stacks {
            for port in [PORT_FAULTED, PORT_CONTROL] {
                specs.push(format!("echo={}", SocketAddr::new(IpAddr::V4(Stack::BRIDGE.host), port)));
            }
        }
        specs.push(format!("reply={}", SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PORT_REPLY)));
        let exe = services_bin()?;
        let mut child = Command::new(&exe)
            .args(&specs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", exe.display()))?;
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

/// `$CHAOS_VM_SERVICES`, else `chaos-vm-services` next to this binary (or next to its `deps/` directory, where
/// cargo puts test binaries), else on `PATH`.
fn services_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CHAOS_VM_SERVICES") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating myself")?;
    let dirs = exe.ancestors().skip(1).take(2).map(Path::to_path_buf);
    let path = std::env::var_os("PATH").unwrap_or_default();
    dirs.chain(std::env::split_paths(&path))
        .map(|d| d.join(SERVICES_BIN))
        .find(|p| p.is_file())
        .with_context(|| format!("no {SERVICES_BIN} next to {} or on PATH (set CHAOS_VM_SERVICES)", exe.display()))
}

// ---------------------------------------------------------------------------------------------------------------
// The agent

/// The agent under test: the shared test agent ([`AgentProcess`]) on the default port with the guest's fixed state
/// directory, pins and IFB, pinned to [`AGENT_CPU`] when there is one, and its fault requests made wrong when a
/// mutant is set.
pub(crate) struct GuestAgent {
    pub(crate) process: AgentProcess,
    /// How the fault requests are made wrong (normally not at all).
    pub(crate) mutant: Cell<Mutant>,
}

impl GuestAgent {
    fn start(mutant: Mutant) -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], AGENT_PORT));
        if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
            bail!(
                "something already listens on {addr} (an installed agent? `systemctl stop lymph-chaos`): two agents \
                 would remove each other's tc filters"
            );
        }
        let opts = AgentOptions {
            // The services are not lymph instances: allow them by command line.
            config_yaml: format!(
                "# written by the VM scenarios\nfaults: {{allowed_processes: [\"{SERVICES_BIN}\"], allow_unbound_ports: true}}\n"
            ),
            port: Some(AGENT_PORT),
            state_dir: Some(AGENT_STATE_DIR.into()),
            pin_dir: Some(AGENT_PIN_DIR.into()),
            ifb: Some(AGENT_IFB.into()),
            cpu: (available_cpus() > AGENT_CPU).then_some(AGENT_CPU),
            start_timeout: Some(AGENT_START_TIMEOUT),
            stop_timeout: Some(AGENT_STOP_TIMEOUT),
            outlive_thread: true,
            ..AgentOptions::default()
        };
        println!("+ lymph-chaos agent … (port {AGENT_PORT}, state {AGENT_STATE_DIR}, pins {AGENT_PIN_DIR})");
        let process = AgentProcess::start(None, opts)?;
        println!("agent log: {}", process.log.display());
        let agent = Self { process, mutant: Cell::new(mutant) };
        println!("agent status: {}", agent.cli(&["status"])?);
        Ok(agent)
    }

    fn ensure_running(&mut self) -> Result<()> {
        if !self.process.running() {
            self.restart()?;
        }
        Ok(())
    }

    /// `lymph-chaos --json <args>`, echoed; its JSON answer.
    pub(crate) fn cli(&self, args: &[&str]) -> Result<Json> {
        println!("+ lymph-chaos {}", args.join(" "));
        self.process.cli_json(args)
    }

    /// `inject <args> --lifetime <FAULT_LIFETIME_S>` through the CLI; the fault id.
    pub(crate) fn inject(&self, args: &[&str]) -> Result<String> {
        self.inject_lifetime(args, FAULT_LIFETIME_S)
    }

    /// `inject <args> --lifetime <lifetime>` through the CLI, made wrong when a mutant is set; the fault id, which
    /// must be active.
    pub(crate) fn inject_lifetime(&self, args: &[&str], lifetime: &str) -> Result<String> {
        let mut full = vec!["inject"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--lifetime", lifetime]);
        let mutated = self.mutated(&full);
        let mutated: Vec<&str> = mutated.iter().map(String::as_str).collect();
        let id = active_id(&self.cli(&mutated)?)?;
        self.measured(&id)?;
        Ok(id)
    }

    /// Waits until the agent has measured the fault's effect (its `observed` verdict is no longer `pending`): the
    /// agent probes a new network fault with a few handshakes right after applying it, and the scenarios time the
    /// fault itself, not the agent's probes beside it.
    fn measured(&self, id: &str) -> Result<()> {
        let timeout = Duration::from_secs(CLI_TIMEOUT_S);
        eventually(format_args!("fault {id} measured by the agent"), timeout, MEASURED_POLL, || -> Result<bool> {
            let faults = self.process.rpc("faults", &serde_json::json!({}), timeout)?;
            let fault = faults.as_array().and_then(|all| all.iter().find(|f| f["id"] == id));
            Ok(fault.is_none_or(|f| f["observed"]["verdict"] != "pending"))
        })
    }

    /// A fault subcommand's request (`inject latency --port A latency=0.1`, or a shortcut) with `--lifetime`, made
    /// wrong when a mutant is set, sent as the CLI would send it (the CLI's own argument parser and request
    /// builder) but from this process: the comparisons switch faults many times. The fault id, which must be
    /// active.
    pub(crate) fn rpc_fault(&self, args: &[&str], lifetime: &str) -> Result<String> {
        let mut full = vec!["lymph-chaos"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--lifetime", lifetime]);
        let mutated = self.mutated(&full);
        println!("+ (rpc) {}", mutated[1..].join(" "));
        let cli = Cli::try_parse_from(&mutated).with_context(|| format!("parsing {}", mutated.join(" ")))?;
        let request = request_for(&cli.command).map_err(|err| anyhow!("{err}"))?;
        let timeout = Duration::from_secs(CLI_TIMEOUT_S);
        let id = active_id(&self.process.rpc(request.method().name(), &Json::Object(request.to_kwargs()), timeout)?)?;
        self.measured(&id)?;
        Ok(id)
    }

    fn mutated(&self, args: &[&str]) -> Vec<String> {
        let mutant = self.mutant.get();
        let mutated = mutant.apply(args, PORT_CONTROL);
        if mutant != Mutant::None {
            println!("DETAIL mutant {}: requesting {}", mutant.name(), mutated.join(" "));
        }
        mutated
    }

    /// `Chaos.revert` from this process.
    pub(crate) fn rpc_revert(&self, id: &str) -> Result<()> {
        println!("+ (rpc) revert {id}");
        let timeout = Duration::from_secs(CLI_TIMEOUT_S);
        self.process.rpc("revert", &serde_json::json!({ "id": id }), timeout).map(|_| ())
    }

    /// `lymph-chaos revert <id>`.
    pub(crate) fn revert(&self, id: &str) -> Result<()> {
        self.cli(&["revert", id]).map(|_| ())
    }

    /// The classifier's (packets, drops) for a fault.
    pub(crate) fn counters(&self, id: &str) -> Option<(u64, u64)> {
        let faults = self.cli(&["faults"]).ok()?;
        let fault = faults.as_array()?.iter().find(|f| f["id"] == id)?;
        Some((fault["counters"]["packets"].as_u64()?, fault["counters"]["drops"].as_u64()?))
    }

    pub(crate) fn guardian_pid(&self) -> Option<i32> {
        self.process.guardian_pid()
    }

    pub(crate) fn kill9(&mut self) {
        println!("+ kill -KILL {} (agent)", self.process.pid());
        self.process.kill9();
    }

    /// SIGKILL (if it runs) and start again on the same state, pins and port.
    pub(crate) fn restart(&mut self) -> Result<()> {
        println!("+ lymph-chaos agent … (restart)");
        self.process.restart()?;
        println!("agent answered again (pid {})", self.process.pid());
        Ok(())
    }

    /// SIGTERM and wait up to [`AGENT_STOP_TIMEOUT`]; whether it exited in time.
    pub(crate) fn stop(&mut self) -> bool {
        println!("+ kill -TERM {} (agent)", self.process.pid());
        self.process.stop()
    }

    /// The last `lines` lines of its log.
    pub(crate) fn print_log(&self, lines: usize) {
        println!("--- agent log ({}; last {lines} lines) ---", self.process.log.display());
        for line in self.process.log_tail(lines).lines() {
            println!("agent| {line}");
        }
        println!("--- end of agent log ---");
    }

    /// The log's WARN and ERROR lines (a passing run should have few, each worth reading).
    pub(crate) fn print_warnings(&self) {
        let text = std::fs::read_to_string(&self.process.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
        println!("agent log {}: {} WARN/ERROR lines", self.process.log.display(), lines.len());
        for line in lines {
            println!("agent| {line}");
        }
    }
}

/// The id of a fault the agent answered with, which must be active.
fn active_id(answer: &Json) -> Result<String> {
    let id = answer["id"].as_str().with_context(|| format!("no fault id in {answer}"))?;
    ensure!(answer["state"] == "active", "fault {id} is not active: {answer}");
    Ok(id.to_owned())
}
