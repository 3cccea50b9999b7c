//! What the network benchmarks share: the network engine in a namespace, `tc` in a namespace, short TCP
//! exchanges, a tmpfs state directory.

use std::{
    future::Future,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use chaos_agent::faults::network::{Direction, Impairment, NetConfig, NetworkEngine, PortMatch, Protocol};
use chaos_tests::netns::Netns;

/// Timeout of the benchmarks' RPC calls to an agent.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Lifetime of benchmark rules (the benchmark removes them long before).
pub(crate) const RULE_TTL: Duration = Duration::from_secs(3600);

/// A [`NetworkEngine`] whose netlink socket lives in `ns`, driven by a runtime of its own; cleaned up (filters,
/// clsact qdiscs, IFB, pins) on drop.
pub(crate) struct NsEngine<'n> {
    pub(crate) ns: &'n Netns,
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) engine: NetworkEngine,
    pub(crate) pin_dir: PathBuf,
    pub(crate) _state: tempfile::TempDir,
}

impl<'n> NsEngine<'n> {
    pub(crate) fn start(ns: &'n Netns) -> Result<NsEngine<'n>> {
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
    pub(crate) fn block_on<T: Send>(&self, f: impl Future<Output = T> + Send) -> T {
        self.ns.run(|| self.rt.block_on(f))
    }

    /// Applies and reverts one rule: the classifier is attached afterwards, with no rule in the map.
    pub(crate) fn attach(&self) -> Result<()> {
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
pub(crate) const ATTACH_PORT: u16 = 19_998;

pub(crate) fn to_port(port: u16) -> PortMatch {
    PortMatch::new(port, Protocol::Tcp, Direction::To)
}

pub(crate) fn blackhole() -> Impairment {
    Impairment { blackhole: true, ..Default::default() }
}

/// `tc <args>` inside `ns`; its stdout, or an error with its stderr.
pub(crate) fn tc(ns: &Netns, args: &[&str]) -> Result<String> {
    NsHandle::open(ns)?.tc(args)
}

/// An open handle on a namespace for spawning many commands in it: `Netns::command` opens (and keeps) one fd per
/// command, which hundreds of timed `tc` runs would pile up.
pub(crate) struct NsHandle {
    pub(crate) file: std::fs::File,
}

impl NsHandle {
    pub(crate) fn open(ns: &Netns) -> Result<NsHandle> {
        let path = format!("/var/run/netns/{}", ns.name());
        Ok(NsHandle { file: std::fs::File::open(&path).with_context(|| format!("opening {path}"))? })
    }

    /// `tc <args>` in the namespace (only the network namespace changes, as with `Netns::command`).
    pub(crate) fn tc(&self, args: &[&str]) -> Result<String> {
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
pub(crate) fn exchange(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)
}

/// How a connection attempt to a port without a listener ended: a blackholed SYN times out, a free one is refused.
pub(crate) fn connect_outcome(addr: SocketAddr) -> &'static str {
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
pub(crate) fn tmpfs_state_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("chaos-bench-state-")
        .tempdir_in(TMPFS)
        .with_context(|| format!("a temp dir in {TMPFS}"))
}

/// tmpfs on every Linux with glibc's POSIX shared memory.
pub(crate) const TMPFS: &str = "/dev/shm";

/// How long a probe waits before calling a port blocked.
pub(crate) const VERIFY_TIMEOUT: Duration = Duration::from_millis(300);

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}
