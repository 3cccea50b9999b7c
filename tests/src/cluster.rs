//! A cluster of hosts for the `cluster` tier: network namespaces joined by a bridge, the harness's ZooKeeper
//! reachable from every host, real lymph 0.15 services and one `lymph-chaos agent` per host.
//!
//! # Layout
//!
//! ```text
//!  test's namespace: ZooKeeper 127.0.0.1:<port> (the harness's, CHAOS_TEST_ZK)
//!        ▲ TCP forwarder (a thread of the test process; its listening socket lives in the switch namespace)
//!  switch (ct-switch-…):  br0 10.77.0.254/24, listens on 10.77.0.254:<port> for ZooKeeper
//!        ├── veth ── host A (ct-hostA-…): eth0 10.77.0.1/24, lo
//!        ├── veth ── host B (ct-hostB-…): eth0 10.77.0.2/24, lo
//!        └── veth ── host C …             eth0 10.77.0.3/24 …
//! ```
//!
//! Every host is a namespace of its own with one address on the bridge. lymph processes started with a host's
//! [`LymphConfig`] ([`Host::lymph`]) run inside it and bind and register that address (`container.ip`), exactly as
//! on separate machines; so do its agent ([`Cluster::start_agent`]: bound to every address, advertising the host's,
//! letting in the cluster's network and loopback) and clients run with [`Host::run`], [`Host::block_on`] or
//! [`Host::command`]. Every cluster uses the same subnet: clusters of tests running in parallel never see each
//! other (each has its own namespaces), and each test's services live under a ZooKeeper chroot of their own.
//!
//! # Cleanup and time
//! The namespaces are RAII guards ([`Netns`]): dropping the cluster (also while a test panics) deletes them, and
//! with them the bridge, the veths and every tc object an agent left; the forwarder thread stops on drop. Processes
//! are started by their owners ([`Instance`], [`AgentProcess`]) and stopped by pid on drop. Every wait has a
//! timeout.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use chaos_test_support::eventually;
use serde_json::Value as Json;

use crate::{
    agent::{AgentOptions, AgentProcess},
    lymph::{self, Instance, InstanceOptions, LymphConfig},
    netns::{Forwarder, Netns},
    zk,
};

/// The cluster's network: `10.77.0.0/24`.
pub const SUBNET: &str = "10.77.0.0/24";
/// The prefix length of [`SUBNET`].
const PREFIX_LEN: u8 = 24;
/// The switch's own address on the bridge, where ZooKeeper is reachable.
pub const SWITCH_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);
/// Host `i` (0-based) gets `10.77.0.<i + 1>`.
const FIRST_HOST_OCTET: u8 = 1;
/// How long an agent may take to register in ZooKeeper and to see a host's instances.
pub const AGENT_READY: Duration = Duration::from_secs(20);

/// The lymph-chaos agent of one host.
pub struct ClusterAgent {
    /// The process (its `endpoint` field is the loopback endpoint inside the host).
    pub process: AgentProcess,
    /// The endpoint it advertises in ZooKeeper: `tcp://<host address>:<port>`.
    pub endpoint: String,
    /// Its host's address.
    pub host: String,
}

impl ClusterAgent {
    /// The agent's pid.
    pub fn pid(&self) -> i32 {
        self.process.pid()
    }
}

/// One host: a namespace with an address on the bridge and a lymph config for processes started on it.
pub struct Host {
    /// `A`, `B`, `C` …
    pub name: String,
    /// Its address on the bridge, e.g. `10.77.0.2`.
    pub addr: String,
    /// The namespace.
    pub netns: Netns,
    /// lymph config for processes on this host: they run in [`Host::netns`] and bind and register [`Host::addr`].
    pub lymph: LymphConfig,
}

impl Host {
    /// Starts a real `lymph instance` on this host (by default `Echo`) and waits until ZooKeeper lists it.
    ///
    /// # Errors
    /// As [`Instance::start_with`].
    pub fn start_instance(&self, options: &InstanceOptions) -> Result<Instance<'_>> {
        Instance::start_with(&self.lymph, options)
            .with_context(|| format!("starting {} on host {}", options.service(), self.name))
    }

    /// Runs `f` on a thread inside this host.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.netns.run(f)
    }

    /// Runs an async block on a current-thread runtime inside this host (sockets it opens live here).
    pub fn block_on<T: Send, F: std::future::Future<Output = T>>(&self, f: impl FnOnce() -> F + Send) -> T {
        self.netns.block_on(f)
    }

    /// A command that runs inside this host.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let program = program.as_ref().to_str().expect("utf-8 program path").to_owned();
        self.netns.command(&program)
    }

    /// `lymph <args>` run on this host (with [`lymph::CLI_TIMEOUT`]).
    ///
    /// # Errors
    /// As [`lymph::lymph_cli`].
    pub fn lymph_cli(&self, args: &[&str]) -> Result<std::process::Output> {
        lymph::lymph_cli(&self.lymph, args)
    }
}

/// Hosts joined by a bridge, with ZooKeeper reachable from each (see the module docs).
pub struct Cluster {
    /// The hosts, in the order asked for.
    pub hosts: Vec<Host>,
    /// ZooKeeper as the hosts reach it: `10.77.0.254:<port>`.
    pub zk_addr: String,
    /// This cluster's chroot.
    pub chroot: String,
    _forwarder: Forwarder,
    // Last: deleted after the hosts' namespaces.
    _switch: Netns,
}

impl Cluster {
    /// Creates hosts named `names` (`["A", "B", "C"]`) on a bridge, with ZooKeeper (the harness's, [`zk::zk_addr`])
    /// reachable at [`SWITCH_ADDR`] and a fresh chroot named after `test_name`.
    ///
    /// # Errors
    /// When a namespace, device or address cannot be set up (the tier needs root), or `CHAOS_TEST_ZK` is not an
    /// address.
    pub fn new(test_name: &str, names: &[&str]) -> Result<Cluster> {
        let target: SocketAddr = zk::zk_addr().parse().context("CHAOS_TEST_ZK is not host:port")?;
        let switch = Netns::new("switch");
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["addr", "add", &format!("{SWITCH_ADDR}/{PREFIX_LEN}"), "dev", "br0"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let chroot = zk::unique_chroot(test_name);
        let forwarder = switch.forward_tcp_on(IpAddr::V4(SWITCH_ADDR), target.port(), target);
        let zk_addr = format!("{SWITCH_ADDR}:{}", forwarder.port);
        let mut hosts = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let octet = FIRST_HOST_OCTET + u8::try_from(i).context("too many hosts")?;
            let addr = Ipv4Addr::new(10, 77, 0, octet).to_string();
            let netns = Netns::new(&format!("host{name}"));
            // The switch's end is named after the host, the host's end is its `eth0`.
            let port = format!("v{name}");
            netns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", switch.name()])?;
            switch.ip(&["link", "set", &port, "master", "br0"])?;
            switch.ip(&["link", "set", &port, "up"])?;
            netns.ip(&["addr", "add", &format!("{addr}/{PREFIX_LEN}"), "dev", "eth0"])?;
            netns.ip(&["link", "set", "eth0", "up"])?;
            let lymph = LymphConfig::on_host(&zk_addr, &chroot, &addr, netns.name())?;
            hosts.push(Host { name: (*name).to_owned(), addr, netns, lymph });
        }
        let cluster = Cluster { hosts, zk_addr, chroot, _forwarder: forwarder, _switch: switch };
        for host in &cluster.hosts {
            let zk = cluster.zk_addr.clone();
            eventually(
                format_args!("host {} to reach ZooKeeper at {zk}", host.name),
                Duration::from_secs(10),
                Duration::from_millis(50),
                || host.run(|| std::net::TcpStream::connect(&zk).is_ok()),
            )?;
        }
        Ok(cluster)
    }

    /// The host named `name`.
    ///
    /// # Panics
    /// When there is none.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    /// The kazoo hosts string every host uses: `10.77.0.254:<port>/<chroot>`.
    pub fn zk_hosts(&self) -> String {
        zk::hosts_with_chroot(&self.zk_addr, &self.chroot)
    }

    /// Starts the agent of host `name` (with network control) and waits until it is registered in ZooKeeper with
    /// its advertised endpoint. `extra_yaml` is appended to its configuration (top-level keys other than `rpc`).
    ///
    /// # Errors
    /// It does not start or register within [`AGENT_READY`].
    pub fn start_agent(&self, name: &str, extra_yaml: &str) -> Result<ClusterAgent> {
        let host = self.host(name);
        // Bound to every address: the host's own for the other hosts (advertised), loopback for the test harness
        // (`AgentProcess` talks to it on 127.0.0.1 inside the namespace).
        let yaml = format!(
            "rpc:\n  bind: 0.0.0.0\n  advertise: {}\n  allowed_clients: [\"{SUBNET}\", \"127.0.0.0/8\"]\n{extra_yaml}",
            host.addr
        );
        let process = AgentProcess::start(
            Some(&host.netns),
            AgentOptions { zookeeper: Some(self.zk_hosts()), config_yaml: yaml, ..Default::default() },
        )
        .with_context(|| format!("starting the agent of host {name}"))?;
        let port = process.endpoint.rsplit_once(':').map(|(_, p)| p.to_owned()).unwrap_or_default();
        let agent = ClusterAgent { endpoint: format!("tcp://{}:{port}", host.addr), host: host.addr.clone(), process };
        eventually(
            format_args!("the agent of host {name} to register as Chaos at {}", agent.endpoint),
            AGENT_READY,
            Duration::from_millis(200),
            || {
                lymph::discover(&host.lymph).map(|services| {
                    services.get("Chaos").is_some_and(|c| c.iter().any(|i| i["endpoint"] == agent.endpoint.as_str()))
                })
            },
        )
        .map_err(|e| anyhow!("{e}; log:\n{}", agent.process.log_tail(30)))?;
        Ok(agent)
    }

    /// Starts one agent per host, in host order.
    ///
    /// # Errors
    /// As [`Cluster::start_agent`].
    pub fn start_agents(&self) -> Result<Vec<ClusterAgent>> {
        self.hosts.iter().map(|h| self.start_agent(&h.name, "")).collect()
    }
}

/// Waits until `agent` lists exactly the pids `pids` as its local instances of `service`.
///
/// # Errors
/// Not within [`AGENT_READY`] (the last listing is in the error).
pub fn wait_local_pids(agent: &ClusterAgent, service: &str, pids: &[u32]) -> Result<()> {
    let mut want: Vec<u64> = pids.iter().map(|p| u64::from(*p)).collect();
    want.sort_unstable();
    let mut last = Json::Null;
    eventually(
        format_args!("the agent of {} to list {service} pids {want:?} as local", agent.host),
        AGENT_READY,
        Duration::from_millis(100),
        || {
            last = agent.process.ok("list_services", serde_json::json!({}));
            let mut local: Vec<u64> = last[service]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i["local"] == true)
                .filter_map(|i| i["pid"].as_u64())
                .collect();
            local.sort_unstable();
            local == want
        },
    )
    .map_err(|e| anyhow!("{e}: {last}"))
}

/// `chaos-agent/python/src`: the Python client, run from the source tree (nothing installed).
pub fn python_client_src() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("chaos-agent").join("python").join("src")
}

/// Runs the Python `Scenario` client on `host` with `request` (see `tests/lymph/cluster_scenario.py`: ZooKeeper,
/// seed, actions, events) with the lymph venv's interpreter and the client from the source tree; returns the JSON
/// it prints.
///
/// # Errors
/// Python fails, prints no JSON, or does not finish within `timeout`.
pub fn python_scenario(host: &Host, request: &Json, timeout: Duration) -> Result<Json> {
    let mut cmd = host.lymph.command(&lymph::venv().join("bin").join("python"));
    let path = std::env::join_paths([lymph::services_dir(), python_client_src()])?;
    cmd.env("PYTHONPATH", path)
        .arg(lymph::services_dir().join("cluster_scenario.py"))
        .arg(host.lymph.path())
        .arg(request.to_string());
    let out = lymph::output_with_timeout(cmd, timeout).context("the Python Scenario")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "the Python Scenario failed ({}): {stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("the Python Scenario printed {stdout:?}; stderr: {stderr}"))
}
