//! A real `lymph-chaos agent` process for integration tests, optionally inside a [`Netns`], with its own state
//! directory, pin directory, event log, IFB name and port, so tests never share anything; stopped (SIGTERM, then
//! SIGKILL) on drop.

use std::{
    io::Write as _,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use chaos_agent::rpc::{ClientError, client::Client};
use chaos_test_support::{
    eventually, free_port,
    process::{ChildGuard, DieWithParent, log_tail, terminate, wait_timeout},
};
use serde_json::{Value as Json, json};

use crate::{
    lymph::{self, LymphConfig},
    netns::Netns,
};

/// The `lymph-chaos` binary of this build (next to the test binary's `deps/` directory).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CHAOS_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = dir.join("lymph-chaos");
    assert!(bin.exists(), "{} is missing: build it first (cargo build -p chaos-agent)", bin.display());
    bin
}

/// The files, names and port of one test agent: the `lymph-chaos agent` command line that [`AgentProcess`] and
/// the VM guest share.
#[derive(Clone, Copy, Debug)]
pub struct AgentLayout<'a> {
    /// Configuration file.
    pub config: &'a Path,
    /// State directory (journal, guardian pid).
    pub state_dir: &'a Path,
    /// bpffs pin directory.
    pub pin_dir: &'a Path,
    /// IFB device name.
    pub ifb: &'a str,
    /// Event log file.
    pub events_file: &'a Path,
    /// ZooKeeper hosts (with chroot); `None`: standalone (the agent's default would try lymph's 127.0.0.1:2181).
    pub zookeeper: Option<&'a str>,
    /// RPC port; `None`: the agent's default.
    pub port: Option<u16>,
}

impl AgentLayout<'_> {
    /// Makes `cmd` (a `lymph-chaos` command, perhaps set up to enter a namespace or pinned to a CPU) run the agent
    /// with this layout, logging `chaos_agent` at debug, stdin from /dev/null, without an inherited
    /// `LYMPH_NODE_IP`, dying with the thread that spawns it. Callers add output, arguments and environment.
    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.arg("agent").arg("--config").arg(self.config);
        if let Some(port) = self.port {
            cmd.args(["--port", &port.to_string()]);
        }
        cmd.arg("--state-dir")
            .arg(self.state_dir)
            .arg("--pin-dir")
            .arg(self.pin_dir)
            .args(["--ifb", self.ifb])
            .args(["--zookeeper", self.zookeeper.unwrap_or("")])
            .arg("--events-file")
            .arg(self.events_file)
            .args(["--log-level", "info,chaos_agent=debug"])
            .stdin(Stdio::null())
            .env_remove("LYMPH_NODE_IP")
            .die_with_parent()
    }
}

/// How to start an agent.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// ZooKeeper hosts (with chroot) or none (standalone).
    pub zookeeper: Option<String>,
    /// Extra YAML configuration (merged as the whole config file).
    pub config_yaml: String,
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// RPC port (default: a free one).
    pub port: Option<u16>,
    /// Keep the state directory at this path (to restart an agent on the same state).
    pub state_dir: Option<PathBuf>,
    /// Pin directory (to restart an agent on the same pins; default: a fresh one).
    pub pin_dir: Option<PathBuf>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Descriptors of this process the agent inherits, at the same numbers (e.g. a socket a `lymph node` shares).
    pub inherit_fds: Vec<std::os::fd::RawFd>,
    /// The agent sees this file as `/etc/resolv.conf` (bind-mounted in a private mount namespace): its own DNS
    /// servers, nobody else's.
    pub resolv_conf: Option<PathBuf>,
    /// IFB device name (default: `lchaos0` in a namespace, a unique name outside one).
    pub ifb: Option<String>,
    /// Run the agent and its CLI calls ([`AgentProcess::cli_json`]) on this CPU only.
    pub cpu: Option<usize>,
    /// How long it may take to answer after a start (default 15 s).
    pub start_timeout: Option<Duration>,
    /// How long [`AgentProcess::stop`] waits after SIGTERM before SIGKILL (default 10 s).
    pub stop_timeout: Option<Duration>,
    /// Spawn it from a thread that lives as long as this process: the agent outlives the (test) thread that started
    /// it, e.g. one shared by the tests of a binary, and still dies with the process.
    pub outlive_thread: bool,
}

impl AgentOptions {
    /// An agent registered in ZooKeeper at `zk_hosts` (with chroot) that controls no network
    /// (`--no-network-control`): it can run in the test's own namespace next to real lymph peers.
    pub fn in_zookeeper(zk_hosts: impl Into<String>) -> AgentOptions {
        AgentOptions {
            zookeeper: Some(zk_hosts.into()),
            args: vec!["--no-network-control".into()],
            ..Default::default()
        }
    }
}

/// A running agent.
pub struct AgentProcess {
    child: Option<Child>,
    /// `tcp://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The temp dir holding state, log and config.
    pub dir: tempfile::TempDir,
    /// State directory.
    pub state_dir: PathBuf,
    /// bpffs pin directory.
    pub pin_dir: PathBuf,
    /// IFB name.
    pub ifb: String,
    /// Agent log (every start appends to it).
    pub log: PathBuf,
    /// RPC port.
    pub port: u16,
    netns: Option<String>,
    opts: AgentOptions,
    starts: u32,
    /// The client of [`AgentProcess::rpc`], made on first use.
    rpc: Mutex<Option<(tokio::runtime::Runtime, Client)>>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl AgentProcess {
    /// Starts an agent (in `netns` when given) and waits until it answers `Chaos.status`.
    ///
    /// # Errors
    /// When it does not come up within 15 s or [`AgentOptions::start_timeout`] (the log tail is in the error).
    pub fn start(netns: Option<&Netns>, opts: AgentOptions) -> Result<AgentProcess> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new().prefix("chaos-agent-").tempdir()?;
        let state_dir = opts.state_dir.clone().unwrap_or_else(|| dir.path().join("state"));
        let tag = format!("{}-{n}", std::process::id());
        let pin_dir = opts.pin_dir.clone().unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/chaos-test-{tag}")));
        // IFB names are per namespace; outside one, make them unique.
        let ifb = match (&opts.ifb, netns) {
            (Some(ifb), _) => ifb.clone(),
            (None, Some(_)) => "lchaos0".to_owned(),
            (None, None) => format!("lct{}", tag.chars().rev().take(10).collect::<String>()),
        };
        let port = match (opts.port, netns) {
            (Some(p), _) => p,
            (None, Some(ns)) => ns.run(free_port),
            (None, None) => free_port(),
        };
        std::fs::write(dir.path().join("config.yml"), &opts.config_yaml)?;
        let log = dir.path().join("agent.log");
        let mut agent = AgentProcess {
            child: None,
            endpoint: format!("tcp://127.0.0.1:{port}"),
            port,
            state_dir,
            pin_dir,
            ifb,
            log,
            dir,
            netns: netns.map(|n| n.name().to_owned()),
            opts,
            starts: 0,
            rpc: Mutex::new(None),
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts the agent process with this layout and waits until it answers `Chaos.status`.
    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let mut log = std::fs::File::options().create(true).append(true).open(&self.log)?;
        writeln!(log, "===== test harness: agent start #{} =====", self.starts)?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new(agent_bin());
                crate::netns::enter_on_exec(&mut cmd, ns);
                cmd
            }
            None => Command::new(agent_bin()),
        };
        if let Some(cpu) = self.opts.cpu {
            crate::measure::pin_command_to_cpu(&mut cmd, cpu);
        }
        let (config, events_file) = (self.dir.path().join("config.yml"), self.dir.path().join("events.jsonl"));
        let layout = AgentLayout {
            config: &config,
            state_dir: &self.state_dir,
            pin_dir: &self.pin_dir,
            ifb: &self.ifb,
            events_file: &events_file,
            zookeeper: self.opts.zookeeper.as_deref(),
            port: Some(self.port),
        };
        layout
            .apply(&mut cmd)
            .args(&self.opts.args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        pre_exec_options(&mut cmd, &self.opts)?;
        let child = if self.opts.outlive_thread { spawn_from_keeper(cmd) } else { cmd.spawn() };
        self.child = Some(child.context("spawning lymph-chaos agent")?);
        let timeout = self.opts.start_timeout.unwrap_or(Duration::from_secs(15));
        let (netns, endpoint, child) = (self.netns.as_deref(), self.endpoint.as_str(), &mut self.child);
        eventually("the agent to answer Chaos.status", timeout, Duration::from_millis(100), || {
            if call_at(netns, endpoint, "status", json!({})).is_ok() {
                return Ok(true);
            }
            match child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Err(anyhow!("the agent exited during start-up ({status})")),
                _ => Ok(false),
            }
        })
        .map_err(|err| anyhow!("{err}; log:\n{}", self.log_tail(40)))
    }

    /// SIGKILLs the agent (if it runs) and starts it again on the same state directory, pins and port.
    ///
    /// # Errors
    /// As [`AgentProcess::start`].
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Whether its process runs (it was started and has neither been stopped nor exited).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until `lymph discover` on `config` lists this agent (its endpoint) as `Chaos`.
    ///
    /// # Errors
    /// Not listed within `timeout` (the log tail is in the error), or `lymph discover` fails.
    pub fn wait_registered(&self, config: &LymphConfig, timeout: Duration) -> Result<()> {
        eventually("the agent to register as Chaos in ZooKeeper", timeout, Duration::from_millis(100), || {
            lymph::discover(config)
                .map(|s| s.get("Chaos").is_some_and(|c| c.iter().any(|i| i["endpoint"] == self.endpoint.as_str())))
        })
        .map_err(|e| anyhow!("{e}; log:\n{}", self.log_tail(30)))
    }

    /// The agent's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Calls `Chaos.<method>` with keyword arguments.
    ///
    /// # Errors
    /// The client error (ERROR replies carry the agent's type and message).
    pub fn call(&self, method: &str, kwargs: Json) -> Result<Json, ClientError> {
        call_at(self.netns.as_deref(), &self.endpoint, method, kwargs)
    }

    /// Calls and panics with the agent's message on error.
    pub fn ok(&self, method: &str, kwargs: Json) -> Json {
        self.call(method, kwargs.clone())
            .unwrap_or_else(|e| panic!("Chaos.{method}({kwargs}) failed: {e}\nagent log:\n{}", self.log_tail(30)))
    }

    /// Runs the `lymph-chaos` CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(agent_bin());
        if let Some(ns) = &self.netns {
            crate::netns::enter_on_exec(&mut cmd, ns);
        }
        cmd.args(["--agent", &self.endpoint]).args(args).output().expect("running lymph-chaos")
    }

    /// `lymph-chaos --agent … --timeout 30 --json <args>` (on the agent's CPU when it is pinned); its JSON answer.
    ///
    /// # Errors
    /// When the CLI cannot run, exits non-zero (its output is in the error) or prints no JSON.
    pub fn cli_json(&self, args: &[&str]) -> Result<Json> {
        let mut cmd = Command::new(agent_bin());
        if let Some(ns) = &self.netns {
            crate::netns::enter_on_exec(&mut cmd, ns);
        }
        if let Some(cpu) = self.opts.cpu {
            crate::measure::pin_command_to_cpu(&mut cmd, cpu);
        }
        cmd.args(["--agent", &self.endpoint, "--timeout", "30", "--json"]).args(args);
        let out = cmd.output().context("running lymph-chaos")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            anyhow::bail!(
                "lymph-chaos {} exited {}: {} {}",
                args.join(" "),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_str(&stdout).with_context(|| format!("lymph-chaos {}: not JSON: {stdout}", args.join(" ")))
    }

    /// `Chaos.<method>(kwargs)` through one client kept for this agent's life (outside a namespace only): for
    /// tests that switch faults many times, where a client per call or a CLI process per call (~0.8 s for a
    /// debug build under TCG) would cost more than what they measure.
    ///
    /// # Errors
    /// When the client cannot start or the call fails (the agent's ERROR replies included).
    pub fn rpc(&self, method: &str, kwargs: &Json, timeout: Duration) -> Result<Json> {
        if self.netns.is_some() {
            return self.call(method, kwargs.clone()).map_err(|e| anyhow!("Chaos.{method}({kwargs}): {e}"));
        }
        let mut slot = self.rpc.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let client = rt.block_on(async { Client::new() }).context("starting an RPC client")?;
            *slot = Some((rt, client));
        }
        let (rt, client) = slot.as_ref().expect("set above");
        let subject = format!("Chaos.{method}");
        let reply = rt
            .block_on(client.call_endpoint(&self.endpoint, &subject, kwargs, timeout))
            .with_context(|| format!("{subject}({kwargs})"))?;
        Ok(reply.to_json())
    }

    /// The pid in the state directory's `guardian.pid`, if that process is a `lymph-chaos-guardian` now.
    pub fn guardian_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.state_dir.join("guardian.pid")).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        cmdline.starts_with(b"lymph-chaos-guardian").then_some(pid)
    }

    /// Events recorded so far.
    pub fn events(&self) -> Vec<Json> {
        self.ok("events", json!({"limit": 10000})).as_array().cloned().unwrap_or_default()
    }

    /// SIGKILLs the agent (no cleanup happens; its guardian takes over).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (clean shutdown); returns whether it exited in time.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else { return true };
        let _ = terminate(&c);
        if let Ok(Some(_)) = wait_timeout(&mut c, self.opts.stop_timeout.unwrap_or(Duration::from_secs(10))) {
            return true;
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.is_some() && !self.stop() {
            eprintln!("agent did not stop on SIGTERM; log:\n{}", self.log_tail(30));
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if std::thread::panicking() {
            eprintln!("--- agent log ({}) ---\n{}", self.log.display(), self.log_tail(60));
        }
    }
}

/// `Chaos.<method>(kwargs)` at `endpoint`, from inside `netns` when given, with a client of its own.
fn call_at(netns: Option<&str>, endpoint: &str, method: &str, kwargs: Json) -> Result<Json, ClientError> {
    let endpoint = endpoint.to_owned();
    let subject = format!("Chaos.{method}");
    let call = move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let client = Client::new().map_err(|e| ClientError::Codec(e.to_string()))?;
            let v = client.call_endpoint(&endpoint, &subject, &kwargs, Duration::from_secs(10)).await?;
            client.node().shutdown();
            Ok(v.to_json())
        })
    };
    match netns {
        Some(name) => chaos_test_support::netns::run_in(name, call),
        None => call(),
    }
}

/// The child-side set-up [`AgentOptions`] asks for: a private `/etc/resolv.conf`, inherited descriptors.
fn pre_exec_options(cmd: &mut Command, opts: &AgentOptions) -> Result<()> {
    let inherit = opts.inherit_fds.clone();
    let resolv = match &opts.resolv_conf {
        Some(path) => Some(std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?),
        None => None,
    };
    if resolv.is_none() && inherit.is_empty() {
        return Ok(());
    }
    // SAFETY: fcntl, unshare and mount in the child only affect the child (and its own mount namespace); the
    // strings were made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(resolv) = &resolv {
                let root = c"/";
                let target = c"/etc/resolv.conf";
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    || libc::mount(resolv.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
                        != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as this process, so that a [`DieWithParent`] child outlives the
/// thread asking for it (libtest runs every test on a thread of its own) and still dies with the process.
fn spawn_from_keeper(cmd: Command) -> std::io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("agent-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    let sent = keeper.lock().unwrap_or_else(std::sync::PoisonError::into_inner).send((cmd, tx));
    sent.map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    rx.recv().map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// A TCP echo server in a process of its own (python3), e.g. a service the agent may fault; killed on drop.
pub struct EchoProcess {
    child: ChildGuard,
    /// Its port.
    pub port: u16,
}

impl EchoProcess {
    /// Text in its command line (for the agent's `faults.allowed_processes`).
    pub const MARKER: &'static str = "chaos-test-echo-server";

    /// Starts it on `[::]:port` (IPv4 and IPv6) inside `netns` and waits until it listens.
    ///
    /// # Panics
    /// When it does not listen within 5 s.
    pub fn start(netns: &Netns, port: u16) -> EchoProcess {
        Self::start_tagged(netns, port, "")
    }

    /// Like [`EchoProcess::start`], with `tag` added to its command line (to target exactly these processes).
    ///
    /// # Panics
    /// As [`EchoProcess::start`].
    pub fn start_tagged(netns: &Netns, port: u16, tag: &str) -> EchoProcess {
        let script = format!(
            "import socket,threading,sys\n\
             s=socket.socket(socket.AF_INET6,socket.SOCK_STREAM)\n\
             s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n\
             s.bind(('::',{port}));s.listen(64)\n\
             def h(c):\n\
             \twhile True:\n\
             \t\td=c.recv(65536)\n\
             \t\tif not d: break\n\
             \t\tc.sendall(d)\n\
             \tc.close()\n\
             while True:\n\
             \tc,_=s.accept();c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n\
             \tthreading.Thread(target=h,args=(c,),daemon=True).start()\n"
        );
        let mut cmd = netns.command("/usr/bin/python3");
        cmd.args(["-c", &script, Self::MARKER, tag])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .die_with_parent();
        let child = ChildGuard::new(cmd.spawn().expect("python3 echo server"));
        eventually(
            format_args!("the echo server to listen on port {port}"),
            Duration::from_secs(5),
            Duration::from_millis(20),
            || netns.run(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
        )
        .unwrap_or_else(|err| panic!("{err}"));
        EchoProcess { child, port }
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.pid()
    }
}

/// A UDP-only service (a bound socket, no TCP listener) in a process of its own (python3); killed on drop.
pub struct UdpProcess {
    child: ChildGuard,
    /// Its port.
    pub port: u16,
}

impl UdpProcess {
    /// Text in its command line (for the agent's `faults.allowed_processes`).
    pub const MARKER: &'static str = "chaos-test-udp-service";

    /// Binds `addr:port` (IPv4) inside `netns` and returns once the socket is bound.
    ///
    /// # Panics
    /// When the socket cannot be bound.
    pub fn start(netns: &Netns, addr: &str, port: u16) -> UdpProcess {
        let script = format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{addr}',{port}))\n\
             print('bound',flush=True)\nwhile True: s.recvfrom(65536)\n"
        );
        let mut cmd = netns.command("/usr/bin/python3");
        cmd.args(["-c", &script, Self::MARKER])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .die_with_parent();
        let mut child = ChildGuard::new(cmd.spawn().expect("python3 UDP service"));
        let mut line = String::new();
        let stdout = child.child().and_then(|c| c.stdout.take()).expect("stdout");
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        // Dropping the guard kills it.
        assert_eq!(line.trim(), "bound", "the UDP service could not bind {addr}:{port}");
        UdpProcess { child, port }
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.pid()
    }
}
