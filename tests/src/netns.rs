//! Network namespaces for privileged tests: every test gets fresh ones, deleted by an RAII guard even when the
//! test fails.
//!
//! Code runs inside a namespace on a thread of its own ([`Netns::run`]): `setns(2)` changes only the calling
//! thread, and sockets (netlink, TCP, zmq's I/O threads, which inherit the namespace of the thread that creates the
//! context) stay in the namespace they were created in.

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, Result, bail};

/// A network namespace created by this test; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn ip(args: &[&str]) -> Result<Output> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

impl Netns {
    /// Creates `ct-<tag>-<pid>-<n>` with `lo` up.
    ///
    /// # Panics
    /// When the namespace cannot be created (the tier needs root).
    pub fn new(tag: &str) -> Netns {
        let tag: String = tag.chars().filter(|c| c.is_ascii_alphanumeric()).take(12).collect();
        let name = format!("ct-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])
            .unwrap_or_else(|e| panic!("cannot create network namespace {name} (root needed): {e}"));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
        ns
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`.
    ///
    /// # Errors
    /// When `ip` fails (its stderr is in the error).
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs a command inside the namespace and returns its output (without checking the status).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap_or_else(|e| panic!("{program} in {}: {e}", self.name))
    }

    /// A command that will run inside the namespace.
    ///
    /// Unlike `ip netns exec`, only the network namespace changes: `ip netns exec` also gives the command a mount
    /// namespace of its own with a fresh `/sys`, which hides `/sys/fs/cgroup` and `/sys/fs/bpf` from it.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        enter_on_exec(&mut cmd, &self.name);
        cmd
    }

    /// Runs `f` on a new thread inside the namespace and returns its result (panics propagate).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        chaos_test_support::netns::run_in(&self.name, f)
    }

    /// Like [`Netns::run`] with a current-thread tokio runtime.
    pub fn block_on<T: Send, F: std::future::Future<Output = T>>(&self, f: impl FnOnce() -> F + Send) -> T {
        self.run(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f()))
    }

    /// Connects this namespace to `other` with a veth pair: `veth0` here, `veth1` there, addresses
    /// `10.<net>.0.1/24` + `fd00:<net>::1/64` here and `.2`/`::2` there. Returns (this side's v4, other's v4).
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn veth_to(&self, other: &Netns, net: u8) -> Result<(String, String)> {
        self.ip(&["link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", other.name()])?;
        let (a4, b4) = (format!("10.{net}.0.1"), format!("10.{net}.0.2"));
        let (a6, b6) = (format!("fd00:{net}::1"), format!("fd00:{net}::2"));
        self.ip(&["addr", "add", &format!("{a4}/24"), "dev", "veth0"])?;
        self.ip(&["-6", "addr", "add", &format!("{a6}/64"), "dev", "veth0", "nodad"])?;
        self.ip(&["link", "set", "veth0", "up"])?;
        other.ip(&["addr", "add", &format!("{b4}/24"), "dev", "veth1"])?;
        other.ip(&["-6", "addr", "add", &format!("{b6}/64"), "dev", "veth1", "nodad"])?;
        other.ip(&["link", "set", "veth1", "up"])?;
        Ok((a4, b4))
    }

    /// `tc <args>` inside the namespace, stdout as text (fails the test when tc fails).
    pub fn tc(&self, args: &[&str]) -> String {
        let out = self.exec("tc", args);
        assert!(out.status.success(), "tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

pub use chaos_test_support::netns::enter_on_exec;

/// A TCP forwarder from a port on the namespace's loopback to an address in the test's own namespace (e.g. the
/// harness's ZooKeeper), so processes in the namespace can reach it. Stops on drop.
pub struct Forwarder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The port inside the namespace.
    pub port: u16,
}

impl Netns {
    /// Forwards `127.0.0.1:<port>` inside this namespace to `target` outside it (`port` 0 picks one).
    ///
    /// # Panics
    /// When the listening socket cannot be created.
    pub fn forward_tcp(&self, port: u16, target: std::net::SocketAddr) -> Forwarder {
        self.forward_tcp_on(std::net::Ipv4Addr::LOCALHOST.into(), port, target)
    }

    /// Forwards `<addr>:<port>` inside this namespace (an address of one of its interfaces, e.g. a bridge that
    /// other namespaces reach) to `target` outside it (`port` 0 picks one).
    ///
    /// # Panics
    /// When the listening socket cannot be created.
    pub fn forward_tcp_on(&self, addr: std::net::IpAddr, port: u16, target: std::net::SocketAddr) -> Forwarder {
        // The listening socket is created inside the namespace and keeps living there.
        let listener = self.run(|| {
            std::net::TcpListener::bind((addr, port))
                .unwrap_or_else(|e| panic!("forwarder listen on {addr}:{port}: {e}"))
        });
        Forwarder::serve(listener, target)
    }
}

impl Forwarder {
    /// Forwards `127.0.0.1:<port>` of the caller's namespace to `target` (e.g. a ZooKeeper that "appears" later).
    ///
    /// # Panics
    /// When the port cannot be bound.
    pub fn start(port: u16, target: std::net::SocketAddr) -> Forwarder {
        Forwarder::serve(std::net::TcpListener::bind(("127.0.0.1", port)).expect("forwarder listen"), target)
    }

    fn serve(listener: std::net::TcpListener, target: std::net::SocketAddr) -> Forwarder {
        use std::{
            net::TcpStream,
            sync::{Arc, atomic::AtomicBool},
        };
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        let _ = inside.set_nonblocking(false);
                        // Outgoing sockets are created by this thread, i.e. in the test's namespace.
                        let Ok(outside) = TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2)) else {
                            continue;
                        };
                        let _ = inside.set_nodelay(true);
                        let _ = outside.set_nodelay(true);
                        for (mut from, mut to) in [
                            (inside.try_clone().expect("clone"), outside.try_clone().expect("clone")),
                            (outside, inside),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                let _ = from.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Forwarder { stop, thread: Some(thread), port }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the name is enough: the kernel frees the namespace (and its devices, qdiscs, filters) when the
        // last process and socket in it are gone.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs root: run by cargo xtask test"]
    fn a_namespace_has_its_own_loopback_and_is_deleted() {
        let name;
        {
            let ns = Netns::new("self");
            name = ns.name().to_owned();
            let links = ns.ip(&["-o", "link"]).unwrap();
            let text = String::from_utf8_lossy(&links.stdout);
            assert!(text.contains("lo:") && text.lines().count() == 1, "{text}");
            let inside = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap());
            assert_eq!(inside.lines().filter(|l| l.contains(':')).count(), 1, "{inside}");
        }
        let list = ip(&["netns", "list"]).unwrap();
        assert!(!String::from_utf8_lossy(&list.stdout).contains(&name));
    }
}
