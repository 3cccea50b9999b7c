//! The agent's lifecycle in one place: start everything, serve, and on shutdown stop taking requests, finish the
//! ones in flight, then revert every fault and remove every kernel object before exiting.
//!
//! Start order: state directory and pid file → guardian (stops an earlier run's) → event log → network engine
//! (removes leftovers of earlier runs, loads the classifier) → RPC node → discovery (registers `Chaos` in ZooKeeper
//! when reachable) → fault manager (undoes what the journal says an earlier run left) → unleashed mode → serve.

use std::{future::Future, net::IpAddr, path::PathBuf, sync::Arc};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    chaos::Chaos,
    config::Config,
    discovery::{Discovery, DiscoveryConfig, Registration},
    events::{Action, Event, EventLog},
    faults::{
        FaultManager,
        manager::{ManagerParts, NetworkAccess},
        network::{NetConfig, NetworkEngine},
    },
    journal::Journal,
    paths,
    rpc::{
        node::{self, NodeConfig, RpcNode},
        server::{LogControl, Server},
    },
    unleash::Unleasher,
    util::now_unix,
};

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Another agent runs with the same state directory.
    #[error("another lymph-chaos agent is running (pid {pid}, state directory {dir}); stop it first")]
    AlreadyRunning {
        /// Its pid.
        pid: i32,
        /// The state directory.
        dir: PathBuf,
    },
    /// The state directory cannot be used.
    #[error("state directory {dir}: {source}")]
    StateDir {
        /// The directory.
        dir: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// The RPC node could not bind.
    #[error(transparent)]
    Rpc(#[from] node::NodeError),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
}

/// Runs the agent until `shutdown` resolves.
///
/// # Errors
/// [`AgentError`] when it cannot start.
// Long on purpose: the whole lifecycle in one place, start-up in dependency order and shutdown in the reverse,
// so the order (guardian first, cleanup after the last request) can be read and checked top to bottom.
pub async fn run(
    config: Config,
    log: Option<Arc<dyn LogControl>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let started = now_unix();
    let state_dir = config.state_dir.clone();
    claim_state_dir(&state_dir)?;
    // The guardian before anything else: it stops the guardian of an earlier run (which would otherwise remove
    // the network objects this run is about to create) and covers the journal from here on — including what
    // that run left, if this one fails to start.
    let guardian = crate::guardian::spawn(&config);
    let events = Arc::new(EventLog::open(config.events.clone()));

    // Network engine first: it removes what a crashed run left in the kernel before anything else happens.
    let (network, network_status) = start_network(&config, &events).await;

    let advertise = config.rpc.advertise.clone().unwrap_or_else(|| advertise_ip(&config.rpc.bind));
    let access = crate::rpc::access::Policy::from_config(&config.rpc, &advertise)
        .map_err(|err| AgentError::Config(err.to_string()))?
        .map(|policy| Arc::new(policy) as Arc<dyn node::Gatekeeper>);
    let node_config = NodeConfig {
        bind_ip: config.rpc.bind.clone(),
        port: Some(config.rpc.port),
        advertise_ip: Some(advertise.clone()),
        access,
    };
    let (req_tx, req_rx) = mpsc::channel(node::REQUEST_QUEUE);
    let node = RpcNode::start(&node_config, Some(req_tx))?;
    let endpoint = node.endpoint().to_owned();
    let registration = registration(&node, &advertise);
    let discovery = Discovery::start(
        DiscoveryConfig { zookeeper: config.zookeeper.clone(), ..DiscoveryConfig::default() },
        Some((paths::SERVICE_NAME.to_owned(), registration)),
        Some(node.clone()),
    );

    let (protected_ports, protected_pids) = protected(&config);
    let manager = FaultManager::new(ManagerParts {
        config: config.faults.clone(),
        dry_run: config.dry_run,
        discovery: discovery.clone(),
        network: match &network {
            Some(engine) => NetworkAccess::Enabled(engine.clone()),
            None => NetworkAccess::Disabled(network_status["reason"].as_str().unwrap_or("unavailable").to_owned()),
        },
        events: events.clone(),
        journal: Journal::open(&config.state_file(paths::JOURNAL_NAME)),
        protected_ports,
        protected_pids,
    })
    .map_err(|err| AgentError::Config(err.to_string()))?;
    let undone = manager.reconcile().await;
    if !undone.is_empty() {
        events.record(Event {
            detail: Some(serde_json::json!({"undone": undone})),
            ..Event::new(Action::Reconcile).message("undid faults left by an earlier run")
        });
    }

    let unleasher =
        Unleasher::new(config.unleash.clone(), config.dry_run, manager.clone(), discovery.clone(), events.clone());
    let status = serde_json::json!({
        "agent": "lymph-chaos",
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "endpoint": endpoint,
        "identity": node.identity(),
        "hostname": hostname(),
        "started": started,
        "network": network_status,
    });
    let chaos = Arc::new(Chaos {
        manager: manager.clone(),
        discovery: discovery.clone(),
        events: events.clone(),
        unleasher: unleasher.clone(),
        status,
    });
    let server = Server::new(node.clone(), vec![chaos], log);
    let stop_serving = CancellationToken::new();
    let serving = tokio::spawn(server.clone().serve(req_rx, stop_serving.clone()));
    let metrics = match &config.metrics_listen {
        Some(addr) => match crate::metrics::serve(addr, server.clone(), manager.clone(), events.clone()).await {
            Ok(task) => Some(task),
            Err(err) => {
                error!(%err, "metrics endpoint not started");
                None
            }
        },
        None => None,
    };
    if config.unleash.enabled
        && let Err(err) = unleasher.start(None, None, None, None)
    {
        warn!(%err, "unleashed mode not started");
    }
    events.record(Event {
        detail: Some(serde_json::json!({"endpoint": endpoint, "dry_run": config.dry_run, "network": network_status, "zookeeper": config.zookeeper})),
        ..Event::new(Action::AgentStart).message(format!("agent started on {endpoint}"))
    });
    info!(%endpoint, dry_run = config.dry_run, "lymph-chaos agent ready");

    shutdown.await;
    // In order: no new requests and none running, no new faults from unleashed mode or the expiry task, then
    // revert every fault and remove the kernel objects. Nothing can apply a fault after the cleanup.
    info!("shutting down: answering no new requests, finishing the ones in flight");
    stop_serving.cancel();
    if let Err(err) = serving.await {
        error!(%err, "the request loop ended badly");
    }
    unleasher.stop();
    info!("shutting down: reverting every fault");
    let reverted = manager.shutdown().await;
    if let Some(engine) = &network {
        match engine.cleanup().await {
            Ok(report) => info!(?report, "network objects removed"),
            Err(err) => error!(%err, "network cleanup failed"),
        }
    }
    discovery.shutdown().await;
    if let Some(m) = metrics {
        m.abort();
    }
    node.shutdown();
    if let Some(g) = guardian {
        g.dismiss();
    }
    events
        .record(Event::new(Action::AgentStop).message(format!("agent stopped; {} fault(s) reverted", reverted.len())));
    let _ = manager.reconcile().await;
    let _ = std::fs::remove_file(state_dir.join(paths::PID_NAME));
    Ok(())
}

async fn start_network(config: &Config, events: &EventLog) -> (Option<Arc<NetworkEngine>>, serde_json::Value) {
    if !config.network.enabled {
        return (
            None,
            serde_json::json!({"enabled": false, "reason": "network control is off (--no-network-control)"}),
        );
    }
    let net_config = NetConfig {
        pin_dir: Some(config.network.pin_dir.clone()),
        state_file: config.state_file(paths::NET_STATE_NAME),
        ifb_name: config.network.ifb.clone(),
        interfaces: (!config.network.interfaces.is_empty()).then(|| config.network.interfaces.clone()),
        max_packets_per_sec: config.network.max_packets_per_sec,
    };
    match NetworkEngine::start(net_config, true).await {
        Ok((engine, report)) => {
            if !report.is_empty() {
                events.record(Event {
                    detail: serde_json::to_value(&report).ok(),
                    ..Event::new(Action::Reconcile).message("removed network objects left by an earlier run")
                });
            }
            let kernel = engine.capabilities().await;
            match kernel.latency_backend {
                Some(backend) => info!(?backend, "BPF program loaded: network faults available"),
                None => warn!(
                    "BPF program loaded: network faults available except latency (this kernel has neither sch_netem \
                     nor sch_fq)"
                ),
            }
            (
                Some(Arc::new(engine)),
                serde_json::json!({"enabled": true, "bpf_loaded": true, "kernel": serde_json::to_value(&kernel).unwrap_or_default()}),
            )
        }
        Err(err) => {
            error!(%err, "network faults unavailable");
            (None, serde_json::json!({"enabled": false, "bpf_loaded": false, "reason": err.to_string()}))
        }
    }
}

/// Creates the state directory and the pid file; refuses when another agent holds it.
fn claim_state_dir(dir: &std::path::Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir).map_err(|source| AgentError::StateDir { dir: dir.to_owned(), source })?;
    let pid_file = dir.join(paths::PID_NAME);
    if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
        let alive =
            crate::faults::process::proc_info(pid).is_some_and(|p| p.cmdline.contains("agent") && p.state != 'Z');
        if alive && pid != std::process::id() as i32 {
            return Err(AgentError::AlreadyRunning { pid, dir: dir.to_owned() });
        }
    }
    std::fs::write(&pid_file, std::process::id().to_string())
        .map_err(|source| AgentError::StateDir { dir: dir.to_owned(), source })
}

/// Ports and pids network/process faults must never touch.
fn protected(config: &Config) -> (Vec<u16>, Vec<i32>) {
    // The agent's own port, sshd's, DNS, and every configured ZooKeeper endpoint's (local or remote: a blackholed
    // remote ZooKeeper takes the whole registry away from this host).
    let mut ports = vec![config.rpc.port, 22, 53];
    if let Some(m) = config.metrics_listen.as_deref().and_then(|a| a.rsplit_once(':')).and_then(|(_, p)| p.parse().ok())
    {
        ports.push(m);
    }
    let mut pids = Vec::new();
    if let Some(hosts) = &config.zookeeper {
        let hosts = hosts.split('/').next().unwrap_or_default();
        let local = crate::discovery::local::local_addresses();
        for hp in hosts.split(',') {
            let Some((host, port)) = hp.rsplit_once(':') else { continue };
            let Ok(port) = port.parse::<u16>() else { continue };
            ports.push(port);
            let is_local = host.parse::<IpAddr>().map(|ip| local.contains(&ip)).unwrap_or(host == "localhost");
            if is_local {
                let listeners = crate::discovery::sockets::tcp_listeners().unwrap_or_default();
                let inodes = listeners.iter().filter(|l| l.port == port).map(|l| l.inode).collect();
                pids.extend(crate::discovery::sockets::owners_of(&inodes, &[]).into_values());
            }
        }
    }
    (ports, pids)
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// The address to advertise for a bind address (`0.0.0.0` → the first non-loopback address).
fn advertise_ip(bind: &str) -> String {
    let unspecified = bind.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
    if !unspecified {
        return bind.to_owned();
    }
    let mut addrs: Vec<IpAddr> =
        crate::discovery::local::local_addresses().into_iter().filter(|a| a.is_ipv4() && !a.is_loopback()).collect();
    addrs.sort();
    addrs.first().map_or_else(|| "127.0.0.1".into(), ToString::to_string)
}

/// Our registration record, with the fields lymph writes.
fn registration(node: &RpcNode, ip: &str) -> Registration {
    let identity = node.identity().to_owned();
    let host = hostname();
    Registration {
        id: node::hash_id(&[Some(&identity), Some(paths::SERVICE_NAME), None]),
        identity,
        version: None,
        endpoint: node.endpoint().to_owned(),
        log_endpoint: None,
        monitoring_endpoint: None,
        backdoor_endpoint: None,
        fqdn: Some(host.clone()),
        hostname: Some(host),
        ip: Some(ip.to_owned()),
        worker: Some(serde_json::Value::Bool(false)),
        extra: Default::default(),
    }
}
