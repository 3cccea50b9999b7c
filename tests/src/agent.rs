//! A real `lymph-chaos agent` process for integration tests, optionally inside a [`Netns`], with its own state
//! directory, pin directory, event log, IFB name and port, so tests never share anything; stopped (SIGTERM, then
//! SIGKILL) on drop.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chaos_agent::rpc::{ClientError, client::Client};
use serde_json::{Value as Json, json};

use crate::netns::Netns;

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
    /// Agent log.
    pub log: PathBuf,
    netns: Option<String>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A TCP port that was free a moment ago (in the current namespace).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

impl AgentProcess {
    /// Starts an agent (in `netns` when given) and waits until it answers `Chaos.status`.
    ///
    /// # Errors
    /// When it does not come up within 15 s (the log tail is in the error).
    pub fn start(netns: Option<&Netns>, opts: AgentOptions) -> Result<AgentProcess> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new().prefix("chaos-agent-").tempdir()?;
        let state_dir = opts.state_dir.clone().unwrap_or_else(|| dir.path().join("state"));
        let tag = format!("{}-{n}", std::process::id());
        let pin_dir = opts.pin_dir.clone().unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/chaos-test-{tag}")));
        // IFB names are per namespace; outside one, make them unique.
        let ifb = if netns.is_some() {
            "lchaos0".to_owned()
        } else {
            format!("lct{}", tag.chars().rev().take(10).collect::<String>())
        };
        let port = match (opts.port, netns) {
            (Some(p), _) => p,
            (None, Some(ns)) => ns.run(free_port),
            (None, None) => free_port(),
        };
        let config = dir.path().join("config.yml");
        std::fs::write(&config, &opts.config_yaml)?;
        let log = dir.path().join("agent.log");
        let mut cmd = match netns {
            Some(ns) => ns.command(agent_bin().to_str().expect("utf-8 path")),
            None => Command::new(agent_bin()),
        };
        cmd.arg("agent");
        cmd.arg("--config")
            .arg(&config)
            .args(["--port", &port.to_string(), "--state-dir"])
            .arg(&state_dir)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--events-file")
            .arg(dir.path().join("events.jsonl"))
            .args(["--ifb", &ifb, "--log-level", "info,chaos_agent=debug"])
            .args(&opts.args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .env_remove("LYMPH_NODE_IP")
            .envs(opts.env.iter().map(|(k, v)| (k, v)));
        // No ZooKeeper unless the test gives one (the default would try lymph's 127.0.0.1:2181).
        cmd.args(["--zookeeper", opts.zookeeper.as_deref().unwrap_or("")]);
        let inherit = opts.inherit_fds.clone();
        let resolv = match &opts.resolv_conf {
            Some(path) => Some(std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?),
            None => None,
        };
        // SAFETY: prctl, fcntl, unshare and mount in the child only affect the child (and its own mount
        // namespace); the strings were made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
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
                        || libc::mount(
                            resolv.as_ptr(),
                            target.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) != 0
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
        let child = cmd.spawn().context("spawning lymph-chaos agent")?;
        let agent = AgentProcess {
            child: Some(child),
            endpoint: format!("tcp://127.0.0.1:{port}"),
            dir,
            state_dir,
            pin_dir,
            ifb,
            log,
            netns: netns.map(|n| n.name().to_owned()),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if agent.call("status", json!({})).is_ok() {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!("the agent did not answer within 15 s; log:\n{}", agent.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.netns {
            Some(name) => {
                let path = format!("/var/run/netns/{name}");
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let file = std::fs::File::open(&path).expect("netns file");
                        nix::sched::setns(std::os::fd::AsFd::as_fd(&file), nix::sched::CloneFlags::CLONE_NEWNET)
                            .expect("setns");
                        f()
                    })
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
                })
            }
            None => f(),
        }
    }

    /// Calls `Chaos.<method>` with keyword arguments.
    ///
    /// # Errors
    /// The client error (ERROR replies carry the agent's type and message).
    pub fn call(&self, method: &str, kwargs: Json) -> Result<Json, ClientError> {
        let endpoint = self.endpoint.clone();
        let subject = format!("Chaos.{method}");
        self.in_ns(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let client = Client::new().map_err(|e| ClientError::Codec(e.to_string()))?;
                let v = client.call_endpoint(&endpoint, &subject, &kwargs, Duration::from_secs(10)).await?;
                client.node().shutdown();
                Ok(v.to_json())
            })
        })
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
        // SAFETY: signalling our own, not yet reaped child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
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

/// A TCP echo server in a process of its own (python3), e.g. a service the agent may fault; killed on drop.
pub struct EchoProcess {
    child: Child,
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
        cmd.args(["-c", &script, Self::MARKER, tag]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: prctl in the child only affects the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("python3 echo server");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let up = netns.run(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
            if up {
                return EchoProcess { child, port };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("echo server on port {port} did not come up");
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP-only service (a bound socket, no TCP listener) in a process of its own (python3); killed on drop.
pub struct UdpProcess {
    child: Child,
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
        cmd.args(["-c", &script, Self::MARKER]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        // SAFETY: prctl in the child only affects the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("python3 UDP service");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        if line.trim() != "bound" {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the UDP service could not bind {addr}:{port}");
        }
        UdpProcess { child, port }
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for UdpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
