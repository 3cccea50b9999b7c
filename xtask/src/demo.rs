//! `cargo xtask demo`: lymph-chaos against a real lymph service, in two minutes, on a private network.
//!
//! What runs (all inside a fresh network namespace, so the host's loopback and interfaces are never touched;
//! the namespace has no name and disappears with the last process in it):
//! - a private ZooKeeper ([`crate::services::ZooKeeper`]) on the namespace's 127.0.0.1;
//! - a real lymph 0.15 `Echo` (`tests/demo/demo_echo.py`) under a restart loop (like `lymph node`'s);
//! - a real lymph client (`tests/demo/client.py`) calling `Echo.whoami` ten times a second, one line per call
//!   with its latency, the pid that answered, or the error;
//! - the agent, registered in that ZooKeeper as `Chaos`, driven with the `lymph-chaos` CLI.
//!
//! The script: a baseline; `lymph-chaos kill Echo` and the restart loop bringing it back (a new pid answers);
//! `lymph-chaos latency Echo 200ms --lifetime 5` — or, when the kernel has no `sch_netem` (the agent answers
//! `KernelFeatureMissing`), a 5 s blackhole of Echo's port instead; the fault's counters; normal calls again; a
//! summary per phase. Then everything it started is stopped, by pid, in reverse order (the agent reverts its
//! faults and removes its kernel objects on SIGTERM). Ctrl-C jumps to the cleanup.
//!
//! With `--experiment FILE` the same services run an experiment file instead of the script: `lymph-chaos run FILE`
//! inside the namespace, with `LYMPH_CONFIG` pointing at the demo's `.lymph.yml` (so the experiment finds
//! ZooKeeper as any lymph tool would), its report written next to the file; the demo's exit code is the run's.
//!
//! Client lines are prefixed with the phase in which the call *started* (`[baseline]`, `[kill]`, `[recovered]`,
//! `[fault]`, `[after]`; a call that times out is printed a second later), so the test (`tests/tests/zk_demo.rs`)
//! and a reader can attribute every call.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chaos_test_support::{
    eventually,
    process::{DieWithParent, log_tail as tail},
    try_free_port,
};

use crate::{install, services, util};

/// Options of `cargo xtask demo`.
pub struct DemoOptions {
    /// Use this agent binary instead of building the release agent.
    pub agent_bin: Option<PathBuf>,
    /// Use this lymph venv instead of building/checking `target/lymph-venv`.
    pub venv: Option<PathBuf>,
    /// Run this experiment file (`lymph-chaos run`) against the services instead of the script.
    pub experiment: Option<PathBuf>,
    /// Its report directory.
    pub out: Option<PathBuf>,
}

/// The ZooKeeper chroot of the demo's lymph services.
const CHROOT: &str = "/lymph-demo";
/// ZooKeeper session timeout of the lymph processes: how long a SIGKILLed Echo's znode stays (the minimum).
const SESSION_TIMEOUT_S: f64 = 4.0;
/// Client call rate and per-call timeout.
const CLIENT_RATE: &str = "10";
const CLIENT_TIMEOUT: &str = "1.0";
/// The injected delay and the lifetime of the network fault.
const LATENCY: &str = "200ms";
const FAULT_LIFETIME_S: u64 = 5;
const BASELINE: Duration = Duration::from_secs(3);
const STEADY: Duration = Duration::from_secs(2);
const AFTER_STEADY: Duration = Duration::from_secs(3);
const READY_TIMEOUT: Duration = Duration::from_secs(40);
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(40);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// A call answered faster than this is "normal" (they take 1–20 ms here).
const NORMAL_MS: f64 = 100.0;
/// The restart loop's poll period.
const RESTART_POLL: Duration = Duration::from_millis(50);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once Ctrl-C was pressed (a wait gives up then).
fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking early on Ctrl-C.
fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            bail!("interrupted");
        }
        thread::sleep(Duration::from_millis(20).min(end.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

/// Runs the demo.
pub fn run(opts: &DemoOptions) -> Result<()> {
    if !util::is_root() {
        bail!("the demo needs root (a network namespace, BPF, signals): run `sudo -E cargo xtask demo`");
    }
    // Everything that may need the network (apt, pip, cargo) happens before entering the namespace.
    // Absolute: the services run with the demo's run directory as their working directory.
    let agent_bin = match &opts.agent_bin {
        Some(b) => std::path::absolute(b)?,
        None => install::build_release()?,
    };
    let venv = match &opts.venv {
        Some(v) => std::path::absolute(v)?,
        None => {
            services::ensure_zookeeper_installed()?;
            services::ensure_lymph_venv(&util::target_dir().join("lymph-venv"))?
        }
    };
    let run_dir = util::target_dir().join("demo").join(format!("run-{}", std::process::id()));
    fs::create_dir_all(&run_dir)?;
    // Paths as the user gave them, resolved before anything changes directory.
    let experiment = match &opts.experiment {
        Some(file) => {
            let file = fs::canonicalize(file).with_context(|| format!("experiment file {}", file.display()))?;
            let out = match &opts.out {
                Some(o) => std::path::absolute(o)?,
                None => {
                    let stem =
                        file.file_stem().map_or_else(|| "experiment".into(), |s| s.to_string_lossy().into_owned());
                    file.with_file_name(format!("{stem}-report"))
                }
            };
            Some((file, out))
        }
        None => None,
    };
    enter_fresh_netns()?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };

    let demo = Demo { started: Instant::now(), run_dir: run_dir.clone(), agent_bin, venv };
    let result = match &experiment {
        Some((file, out)) => demo.experiment(file, out),
        None => demo.play(),
    };
    match &result {
        Ok(()) => {
            let _ = fs::remove_dir_all(&run_dir);
        }
        Err(_) => eprintln!("logs kept in {}", run_dir.display()),
    }
    result
}

/// Moves this thread (and so every process and thread it starts from now on) into a new network namespace with
/// its loopback up.
fn enter_fresh_netns() -> Result<()> {
    // SAFETY: unshare has no memory-safety preconditions; it only affects the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    util::run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    Ok(())
}

struct Demo {
    started: Instant,
    run_dir: PathBuf,
    agent_bin: PathBuf,
    venv: PathBuf,
}

/// One completed client call.
#[derive(Clone, Debug)]
struct Call {
    phase: &'static str,
    /// The client's call number (calls start in this order, ten a second).
    n: u64,
    ok: bool,
    ms: f64,
    pid: Option<u32>,
    error: Option<String>,
}

impl Call {
    /// `client +12.345s #123 ok 1.8 ms pid 4242` / `client +13.012s #130 error Timeout 1000.4 ms`.
    fn parse(line: &str, phase: &'static str) -> Option<Call> {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["client", _, n, "ok", ms, "ms", "pid", pid] => Some(Call {
                phase,
                n: n.strip_prefix('#')?.parse().ok()?,
                ok: true,
                ms: ms.parse().ok()?,
                pid: pid.parse().ok(),
                error: None,
            }),
            ["client", _, n, "error", kind, ms, "ms"] => Some(Call {
                phase,
                n: n.strip_prefix('#')?.parse().ok()?,
                ok: false,
                ms: ms.parse().ok()?,
                pid: None,
                error: Some((*kind).to_owned()),
            }),
            _ => None,
        }
    }
}

/// The client's calls, and when each phase began.
struct Board {
    phases: Mutex<Vec<(Instant, &'static str)>>,
    calls: Mutex<Vec<Call>>,
}

impl Board {
    /// The phase at `t`.
    fn phase_at(&self, t: Instant) -> &'static str {
        let phases = self.phases.lock().expect("poisoned");
        phases.iter().rev().find(|(start, _)| *start <= t).or(phases.first()).map_or("baseline", |(_, p)| p)
    }
}

/// Whether the `n` most recent calls (by call number, none missing: none still in flight) all succeeded, and
/// `extra` holds for each.
fn last_calls_ok(calls: &[Call], n: usize, extra: impl Fn(&Call) -> bool) -> bool {
    let mut recent: Vec<&Call> = calls.iter().collect();
    recent.sort_by_key(|c| std::cmp::Reverse(c.n));
    recent.len() >= n
        && recent[..n].windows(2).all(|w| w[0].n == w[1].n + 1)
        && recent[..n].iter().all(|c| c.ok && extra(c))
}

impl Demo {
    fn say(&self, msg: impl AsRef<str>) {
        println!("[{:>6.1}s] {}", self.started.elapsed().as_secs_f64(), msg.as_ref());
    }

    fn header(&self, msg: impl AsRef<str>) {
        println!("\n=== [{:>6.1}s] {} ===", self.started.elapsed().as_secs_f64(), msg.as_ref());
    }

    fn play(&self) -> Result<()> {
        self.header("setting up (private network namespace: ZooKeeper, lymph Echo, client, agent)");
        let zk = services::ZooKeeper::start(&self.run_dir.join("zookeeper"))?;
        self.say(format!("ZooKeeper on {} (pid {})", zk.addr(), zk.pid()));
        let hosts = format!("{}{CHROOT}", zk.addr());
        let config = self.lymph_config(&hosts)?;

        let echo = Supervisor::start(self.echo_command(&config), self.run_dir.join("echo"), self.started)?;
        let first = echo.wait_registered(READY_TIMEOUT)?;
        self.say(format!("Echo registered (pid {first}), kept alive by a restart loop"));

        let agent = self.start_agent(&hosts)?;
        self.say(format!(
            "agent on {} (pid {}), registered as Chaos in {hosts}; its maps pinned in {}",
            agent.endpoint,
            agent.pid(),
            agent.pin_dir
        ));

        let board =
            Arc::new(Board { phases: Mutex::new(vec![(Instant::now(), "baseline")]), calls: Mutex::new(Vec::new()) });
        let client = self.start_client(&config, &board)?;
        let outcome = self.script(&board, &echo, &agent);

        self.header("cleaning up (only what the demo started, by pid)");
        let mut client = client;
        client.stop();
        let mut agent = agent;
        agent.stop(self);
        drop(echo);
        self.say("Echo and its restart loop stopped");
        drop(zk);
        self.say("ZooKeeper stopped; the network namespace goes with the last process");
        let pins = Path::new(&agent.pin_dir);
        if pins.exists() {
            let _ = fs::remove_dir_all(pins);
        }
        let summary = outcome?;
        self.header("summary");
        print!("{summary}");
        self.say("demo finished");
        Ok(())
    }

    /// The services, then `lymph-chaos run <file>` against them; fails unless the run exits 0 (held) or 1
    /// (deviated): an abort or a run that could not start is an error of the demo too.
    fn experiment(&self, file: &Path, out: &Path) -> Result<()> {
        self.header("setting up (private network namespace: ZooKeeper, lymph Echo, agent)");
        let zk = services::ZooKeeper::start(&self.run_dir.join("zookeeper"))?;
        self.say(format!("ZooKeeper on {} (pid {})", zk.addr(), zk.pid()));
        let hosts = format!("{}{CHROOT}", zk.addr());
        let config = self.lymph_config(&hosts)?;
        let echo = Supervisor::start(self.echo_command(&config), self.run_dir.join("echo"), self.started)?;
        let first = echo.wait_registered(READY_TIMEOUT)?;
        self.say(format!("Echo registered (pid {first}), kept alive by a restart loop"));
        let mut agent = self.start_agent(&hosts)?;
        self.say(format!("agent on {} (pid {}), registered as Chaos in {hosts}", agent.endpoint, agent.pid()));
        // The agent lists Echo with its pid once discovery has run: wait, so the first fault finds it.
        eventually(
            format_args!("the agent to list Echo pid {first}"),
            READY_TIMEOUT,
            Duration::from_millis(200),
            || -> Result<bool> {
                check_interrupted()?;
                let out = self.cli(&agent, &["services"])?;
                Ok(String::from_utf8_lossy(&out.stdout).contains(&format!("local pid {first}")))
            },
        )
        .map_err(|err| anyhow::anyhow!("{err}; agent log:\n{}", tail(&agent.log, 30)))?;
        self.header(format!("lymph-chaos run {}", file.display()));
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("run").arg(file).arg("--out").arg(out);
        self.lymph_env(&mut cmd, &config);
        cmd.stdin(Stdio::null());
        cmd.die_with_parent();
        // Ctrl-C reaches the run too (same process group): it reverts and exits 3.
        let status = cmd.status().context("running lymph-chaos run")?;
        self.header("cleaning up (only what the demo started, by pid)");
        agent.stop(self);
        drop(echo);
        drop(zk);
        let pins = Path::new(&agent.pin_dir);
        if pins.exists() {
            let _ = fs::remove_dir_all(pins);
        }
        self.say(format!("report in {}", out.display()));
        match status.code() {
            Some(0) => self.say("the hypothesis held"),
            Some(1) => self.say("the hypothesis deviated (see the report)"),
            _ => bail!("lymph-chaos run did not complete the experiment ({status}); see {}", out.display()),
        }
        Ok(())
    }

    fn lymph_config(&self, hosts: &str) -> Result<PathBuf> {
        let template = fs::read_to_string(util::root().join("tests").join("lymph").join("lymph.yml.in"))?;
        let yaml = template
            .replace("@IP@", "127.0.0.1")
            .replace("@ZK_HOSTS@", hosts)
            .replace("@ZK_SESSION_TIMEOUT@", &format!("{SESSION_TIMEOUT_S:.1}"));
        let path = self.run_dir.join(".lymph.yml");
        fs::write(&path, yaml)?;
        Ok(path)
    }

    /// `lymph`/`python` from the venv with a clean lymph environment.
    fn lymph_env(&self, cmd: &mut Command, config: &Path) {
        for var in ["LYMPH_NODE", "LYMPH_NODE_CONFIG", "LYMPH_NODE_IP", "LYMPH_MONITOR", "LYMPH_SHARED_SOCKET_FDS"] {
            cmd.env_remove(var);
        }
        let tests = util::root().join("tests");
        cmd.current_dir(&self.run_dir)
            .env("LYMPH_CONFIG", config)
            .env("PYTHONPATH", format!("{}:{}", tests.join("demo").display(), tests.join("lymph").display()))
            .env_remove("PYTHONHOME")
            .env("PYTHONWARNINGS", "ignore:pkg_resources is deprecated")
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null());
    }

    fn echo_command(&self, config: &Path) -> Command {
        let mut cmd = Command::new(self.venv.join("bin").join("lymph"));
        self.lymph_env(&mut cmd, config);
        cmd.arg("instance")
            .arg("--interface=demo_echo:Echo")
            .arg(format!("--config={}", config.display()))
            .arg("--loglevel=INFO");
        cmd
    }

    fn start_agent(&self, hosts: &str) -> Result<Agent> {
        let port = try_free_port().context("binding 127.0.0.1:0")?;
        let config = self.run_dir.join("agent.yml");
        // An empty file: the agent's defaults, never a system-wide /etc/lymph-chaos/config.yml.
        fs::write(&config, "")?;
        let log = self.run_dir.join("agent.log");
        let pin_dir = format!("/sys/fs/bpf/lymph-chaos-demo-{}", std::process::id());
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("agent")
            .arg("--config")
            .arg(&config)
            .args(["--zookeeper", hosts, "--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--state-dir")
            .arg(self.run_dir.join("agent-state"))
            .args(["--pin-dir", &pin_dir])
            .arg("--events-file")
            .arg(self.run_dir.join("events.jsonl"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::options().append(true).open(&log)?);
        for var in ["LYMPH_NODE_IP", "LYMPH_CONFIG", "LYMPH_NODE_CONFIG", "LYMPH_CHAOS_CONFIG", "RUST_LOG"] {
            cmd.env_remove(var);
        }
        cmd.die_with_parent();
        let child = cmd.spawn().with_context(|| format!("starting {}", self.agent_bin.display()))?;
        let mut agent = Agent { child: Some(child), endpoint: format!("tcp://127.0.0.1:{port}"), log, pin_dir };
        let ready = eventually("the agent to answer `status`", READY_TIMEOUT, Duration::from_millis(200), || {
            if self.cli(&agent, &["status"]).is_ok_and(|o| o.status.success()) {
                return Ok(true);
            }
            if let Some(c) = agent.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("the agent exited ({st})");
            }
            check_interrupted().map(|()| false)
        });
        match ready {
            Ok(()) => Ok(agent),
            Err(err) => {
                agent.stop(self);
                bail!("{err}; log:\n{}", tail(&agent.log, 30))
            }
        }
    }

    fn start_client(&self, config: &Path, board: &Arc<Board>) -> Result<Client> {
        let mut cmd = Command::new(self.venv.join("bin").join("python"));
        self.lymph_env(&mut cmd, config);
        cmd.arg(util::root().join("tests").join("demo").join("client.py"))
            .arg(config)
            .args(["--rate", CLIENT_RATE, "--timeout", CLIENT_TIMEOUT])
            .stdout(Stdio::piped())
            .stderr(fs::File::create(self.run_dir.join("client.log"))?);
        cmd.die_with_parent();
        let mut child = cmd.spawn().context("starting the lymph client")?;
        let stdout = child.stdout.take().expect("piped");
        let board = board.clone();
        let t0 = Instant::now();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // Attributed to the phase in which the call started (it took `ms` until now).
                let took = Call::parse(&line, "").map_or(0.0, |c| c.ms);
                let started = Instant::now().checked_sub(Duration::from_secs_f64(took / 1000.0)).unwrap_or(t0);
                let phase = board.phase_at(started);
                println!("[{phase:<9}] {line}");
                if let Some(call) = Call::parse(&line, phase) {
                    board.calls.lock().expect("poisoned").push(call);
                }
            }
        });
        Ok(Client { child, reader: Some(reader) })
    }

    /// `lymph-chaos --agent <endpoint> <args>`, echoed with its output.
    fn cli(&self, agent: &Agent, args: &[&str]) -> Result<std::process::Output> {
        let out = Command::new(&self.agent_bin)
            .args(["--agent", &agent.endpoint])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running lymph-chaos")?;
        Ok(out)
    }

    fn cli_loud(&self, agent: &Agent, args: &[&str]) -> Result<std::process::Output> {
        self.say(format!("$ lymph-chaos {}", args.join(" ")));
        let out = self.cli(agent, args)?;
        for line in String::from_utf8_lossy(&out.stdout).lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
            println!("           | {line}");
        }
        Ok(out)
    }

    fn set_phase(board: &Board, phase: &'static str) {
        board.phases.lock().expect("poisoned").push((Instant::now(), phase));
    }

    /// Waits until `pred` holds for the calls so far.
    fn wait_calls(&self, board: &Board, timeout: Duration, what: &str, pred: impl Fn(&[Call]) -> bool) -> Result<()> {
        eventually(what, timeout, Duration::from_millis(50), || {
            check_interrupted().map(|()| pred(&board.calls.lock().expect("poisoned")))
        })
    }

    fn script(&self, board: &Board, echo: &Supervisor, agent: &Agent) -> Result<String> {
        self.header(format!("baseline: the client calls Echo.whoami {CLIENT_RATE} times a second"));
        self.wait_calls(board, READY_TIMEOUT, "the client's first answer", |c| c.iter().any(|c| c.ok))?;
        pause(BASELINE)?;

        let old = echo.pid();
        self.header(format!("1. kill Echo (pid {old}); the restart loop brings it back"));
        Self::set_phase(board, "kill");
        let killed_at = Instant::now();
        let out = self.cli_loud(agent, &["kill", "Echo"])?;
        if !out.status.success() {
            bail!("lymph-chaos kill Echo failed; agent log:\n{}", tail(&agent.log, 30));
        }
        self.wait_calls(board, RECOVERY_TIMEOUT, "an answer from a new Echo", |c| {
            c.iter().any(|c| c.phase == "kill" && c.ok && c.pid.is_some_and(|p| p != old))
        })?;
        let new = board
            .calls
            .lock()
            .expect("poisoned")
            .iter()
            .rev()
            .find(|c| c.ok && c.pid.is_some_and(|p| p != old))
            .and_then(|c| c.pid)
            .unwrap_or(0);
        self.say(format!(
            "Echo is back: pid {new} answers (was {old}), {:.1} s after the kill; restarts so far: {}",
            killed_at.elapsed().as_secs_f64(),
            echo.restarts()
        ));
        // Clients still pick the dead instance until ZooKeeper drops its znode (session timeout) or lymph marks
        // the connection unresponsive (3 s without a heartbeat).
        self.wait_calls(board, RECOVERY_TIMEOUT, "every call answered by the new Echo", |c| {
            last_calls_ok(c, 10, |c| c.pid.is_some_and(|p| p != old))
        })?;
        self.say(format!(
            "every call answered again, {:.1} s after the kill (the killed instance left ZooKeeper with its session)",
            killed_at.elapsed().as_secs_f64()
        ));
        Self::set_phase(board, "recovered");
        pause(STEADY)?;

        let lifetime = FAULT_LIFETIME_S.to_string();
        self.header(format!("2. {LATENCY} latency on Echo for {FAULT_LIFETIME_S} s"));
        Self::set_phase(board, "fault");
        let fault_started = Instant::now();
        let out = self.cli_loud(agent, &["latency", "Echo", LATENCY, "--lifetime", &lifetime])?;
        let mut fault = "latency";
        if !out.status.success() {
            if String::from_utf8_lossy(&out.stderr).contains("KernelFeatureMissing") {
                self.say(format!(
                    "this kernel has no sch_netem: falling back to a {FAULT_LIFETIME_S} s blackhole of Echo's port"
                ));
                let out = self.cli_loud(agent, &["inject", "blackhole", "Echo", "--lifetime", &lifetime])?;
                if !out.status.success() {
                    bail!("no network fault could be applied; agent log:\n{}", tail(&agent.log, 30));
                }
                fault = "blackhole";
            } else {
                bail!("lymph-chaos latency failed; agent log:\n{}", tail(&agent.log, 30));
            }
        }
        let lifetime_d = Duration::from_secs(FAULT_LIFETIME_S);
        pause(lifetime_d.saturating_sub(fault_started.elapsed()).saturating_sub(Duration::from_millis(500)))?;
        // The fault's own counters, just before it expires in the kernel.
        self.cli_loud(agent, &["faults"])?;
        pause(lifetime_d.saturating_sub(fault_started.elapsed()))?;
        Self::set_phase(board, "after");
        self.header(format!("3. the {fault} expired: calls are normal again"));
        let after_started = Instant::now();
        self.wait_calls(board, RECOVERY_TIMEOUT, "normal answers after the fault", |c| {
            last_calls_ok(c, 10, |c| c.phase == "after" && c.ms < NORMAL_MS)
        })?;
        self.say(format!("normal again {:.1} s after the fault ended", after_started.elapsed().as_secs_f64()));
        pause(AFTER_STEADY)?;
        self.cli_loud(agent, &["events", "--limit", "8"])?;
        Ok(summary(&board.calls.lock().expect("poisoned"), fault))
    }
}

/// Per phase: calls, ok, errors (by kind), median and max latency of the successful calls.
fn summary(calls: &[Call], fault: &str) -> String {
    let mut out = format!(
        "fault used: {fault}\n{:<10} {:>6} {:>5} {:>7} {:>10} {:>9}  errors\n",
        "phase", "calls", "ok", "failed", "median ms", "max ms"
    );
    for phase in ["baseline", "kill", "recovered", "fault", "after"] {
        let these: Vec<&Call> = calls.iter().filter(|c| c.phase == phase).collect();
        let mut ms: Vec<f64> = these.iter().filter(|c| c.ok).map(|c| c.ms).collect();
        ms.sort_by(f64::total_cmp);
        let median = ms.get(ms.len() / 2).map_or("-".to_owned(), |m| format!("{m:.1}"));
        let max = ms.last().map_or("-".to_owned(), |m| format!("{m:.1}"));
        let mut kinds: Vec<String> = these.iter().filter_map(|c| c.error.clone()).collect();
        kinds.sort();
        kinds.dedup();
        let failed = these.iter().filter(|c| !c.ok).count();
        out.push_str(&format!(
            "{phase:<10} {:>6} {:>5} {failed:>7} {median:>10} {max:>9}  {}\n",
            these.len(),
            ms.len(),
            kinds.join(",")
        ));
    }
    out
}

/// [`chaos_test_support::process::stop_child`], ignoring errors (the demo's cleanup carries on).
fn stop_child(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    chaos_test_support::process::stop_child(child, grace).ok()
}

struct Agent {
    child: Option<Child>,
    endpoint: String,
    log: PathBuf,
    pin_dir: String,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM: the agent reverts its faults, removes its kernel objects and leaves ZooKeeper.
    fn stop(&mut self, demo: &Demo) {
        let Some(mut child) = self.child.take() else { return };
        let pid = child.id();
        let started = Instant::now();
        let status = stop_child(&mut child, STOP_GRACE);
        let last = tail(&self.log, 200)
            .lines()
            .rev()
            .find(|l| l.contains("network objects removed") || l.contains("reverting"))
            .map(|l| format!(" (log: {})", l.trim()))
            .unwrap_or_default();
        demo.say(format!(
            "agent (pid {pid}) stopped in {:.1} s: {}{last}",
            started.elapsed().as_secs_f64(),
            status.map_or("?".to_owned(), |s| s.to_string())
        ));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, STOP_GRACE);
        }
    }
}

struct Client {
    child: Child,
    reader: Option<JoinHandle<()>>,
}

impl Client {
    fn stop(&mut self) {
        stop_child(&mut self.child, STOP_GRACE);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A restart loop for one command (a thread owning the current process; `PR_SET_PDEATHSIG` ties the process to
/// that thread). Prints each exit and restart.
struct Supervisor {
    state: Arc<Mutex<SupervisorState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct SupervisorState {
    pid: u32,
    restarts: u32,
    error: Option<String>,
}

impl Supervisor {
    fn start(mut command: Command, log_prefix: PathBuf, t0: Instant) -> Result<Supervisor> {
        let state = Arc::new(Mutex::new(SupervisorState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new().name("supervisor".into()).spawn({
            let (state, stop) = (state.clone(), stop.clone());
            move || {
                command.die_with_parent();
                let mut n = 0;
                let mut current: Option<Child> = None;
                while !stop.load(Ordering::SeqCst) {
                    let dead = match current.as_mut().map(Child::try_wait) {
                        None => true,
                        Some(Ok(Some(status))) => {
                            println!(
                                "[{:>6.1}s] restart loop: Echo pid {} exited ({status}): restarting it",
                                t0.elapsed().as_secs_f64(),
                                current.as_ref().map_or(0, Child::id)
                            );
                            true
                        }
                        Some(_) => false,
                    };
                    if dead {
                        let log = log_prefix.with_extension(format!("{n}.log"));
                        n += 1;
                        let spawned = fs::File::create(&log).and_then(|f| {
                            command.stdout(f.try_clone()?).stderr(f);
                            command.spawn()
                        });
                        match spawned {
                            Ok(child) => {
                                let mut s = state.lock().expect("poisoned");
                                if s.pid != 0 {
                                    s.restarts += 1;
                                    println!(
                                        "[{:>6.1}s] restart loop: Echo started again as pid {}",
                                        t0.elapsed().as_secs_f64(),
                                        child.id()
                                    );
                                }
                                s.pid = child.id();
                                current = Some(child);
                            }
                            Err(err) => {
                                state.lock().expect("poisoned").error = Some(err.to_string());
                                thread::sleep(Duration::from_millis(500));
                            }
                        }
                    }
                    thread::sleep(RESTART_POLL);
                }
                if let Some(mut c) = current {
                    stop_child(&mut c, STOP_GRACE);
                }
            }
        })?;
        Ok(Supervisor { state, stop, thread: Some(thread) })
    }

    fn pid(&self) -> u32 {
        self.state.lock().expect("poisoned").pid
    }

    fn restarts(&self) -> u32 {
        self.state.lock().expect("poisoned").restarts
    }

    /// Waits until the current process has registered (its title becomes `lymph-instance (identity: …)`).
    fn wait_registered(&self, timeout: Duration) -> Result<u32> {
        eventually("Echo to register", timeout, Duration::from_millis(50), || {
            check_interrupted()?;
            let pid = self.pid();
            let title = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            anyhow::Ok((pid != 0 && title.starts_with(b"lymph-instance (identity: ")).then_some(pid))
        })
        .map_err(|err| {
            let last = self.state.lock().expect("poisoned").error.clone().unwrap_or_default();
            anyhow::anyhow!("{err} {last}")
        })
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_lines_parse() {
        let ok = Call::parse("client +12.345s #123 ok 1.8 ms pid 4242", "kill").unwrap();
        assert!(ok.ok && ok.pid == Some(4242) && (ok.ms - 1.8).abs() < 1e-9 && ok.phase == "kill");
        let err = Call::parse("client +13.012s #130 error Timeout 1000.4 ms", "fault").unwrap();
        assert!(!err.ok && err.error.as_deref() == Some("Timeout") && err.pid.is_none() && err.n == 130);
        assert!(Call::parse("Traceback (most recent call last):", "fault").is_none());
    }

    #[test]
    fn the_last_calls_must_be_contiguous_and_ok() {
        let call = |n: u64, ok: bool| Call { phase: "after", n, ok, ms: 1.0, pid: Some(1), error: None };
        let calls: Vec<Call> = (0..10).map(|n| call(n, true)).collect();
        assert!(last_calls_ok(&calls, 10, |_| true));
        assert!(!last_calls_ok(&calls, 11, |_| true));
        let mut gap = calls.clone();
        gap.remove(4);
        gap.push(call(10, true));
        assert!(!last_calls_ok(&gap, 10, |_| true), "call 4 is still in flight");
        let mut failed = calls.clone();
        failed[9].ok = false;
        assert!(!last_calls_ok(&failed, 10, |_| true));
        assert!(!last_calls_ok(&calls, 10, |c| c.pid == Some(2)));
    }

    #[test]
    fn summary_counts_per_phase() {
        let calls = vec![
            Call::parse("client +0.1s #1 ok 2.0 ms pid 1", "baseline").unwrap(),
            Call::parse("client +0.2s #2 error Timeout 1000.0 ms", "fault").unwrap(),
        ];
        let s = summary(&calls, "blackhole");
        assert!(s.contains("fault used: blackhole"), "{s}");
        assert!(s.lines().any(|l| l.starts_with("baseline") && l.contains(" 1 ")), "{s}");
        assert!(s.lines().any(|l| l.starts_with("fault") && l.ends_with("Timeout")), "{s}");
    }
}
