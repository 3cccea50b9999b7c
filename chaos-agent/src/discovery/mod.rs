//! Service discovery: a live map service → instances, with the pid behind every instance on this host.
//!
//! # Layout
//! - [`zookeeper`] — lymph's registry: scan, register, watch (`chaos_api::registry`)
//! - [`local`] — lymph process titles, which pid listens on an endpoint
//! - [`sockets`] — listening sockets (`sock_diag`) and their owners (`/proc/<pid>/fd`)
//! - [`instance`] — the registration record and the [`Instance`] the rest of the agent uses (`chaos_api::instance`)
//!
//! One task owns the ZooKeeper session. While connected it keeps a persistent recursive watch on `/services`
//! and rescans on every event (plus every few seconds, since persistent watches can lose events across
//! reconnects); every scan is resolved against a fresh [`local::HostView`] so pids follow restarts. The registry
//! is the truth while connected: lymph processes here that are not registered in it are not its services. Without ZooKeeper
//! (none configured, or unreachable) the agent is *standalone*: instances come from lymph process titles on this
//! host (their interfaces asked with `lymph.inspect`), and the task keeps retrying ZooKeeper in the background.

pub(crate) mod local;
pub(crate) mod names;
pub(crate) mod sockets;

pub(crate) use chaos_api::{instance, registry as zookeeper};

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

pub(crate) use instance::{Instance, Registration, Source};
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zookeeper_client as zk;

use crate::rpc::{Value, node::RpcNode, value};

/// How discovery runs.
#[derive(Clone, Debug)]
pub(crate) struct DiscoveryConfig {
    /// ZooKeeper hosts (lymph style, optional `/chroot`); `None` = standalone only.
    pub(crate) zookeeper: Option<String>,
    /// ZooKeeper session timeout.
    pub(crate) session_timeout: Duration,
    /// How long one connection attempt may take.
    pub(crate) connect_timeout: Duration,
    /// How often the local view (pids, standalone instances) is refreshed when nothing else triggers it.
    pub(crate) local_refresh: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            zookeeper: None,
            session_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            local_refresh: Duration::from_secs(2),
        }
    }
}

/// State of the ZooKeeper connection.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "lowercase")]
pub(crate) enum ZkState {
    /// No ZooKeeper configured: standalone.
    Disabled,
    /// Not connected (yet); `error` says why the last attempt failed.
    Connecting {
        /// Connect string.
        hosts: String,
        /// Last failure.
        error: Option<String>,
    },
    /// Session open.
    Connected {
        /// Connect string.
        hosts: String,
        /// Our registration path, if we registered.
        registered: Option<String>,
    },
}

/// What discovery knows at one moment.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Snapshot {
    /// Service name → instances (sorted by id).
    pub(crate) services: BTreeMap<String, Vec<Instance>>,
    /// ZooKeeper state.
    pub(crate) zookeeper: ZkState,
    /// Increases with every published snapshot.
    pub(crate) generation: u64,
}

impl Snapshot {
    /// Instances of `service`: exact name first, else a unique case-insensitive match (the 2015 Scenario used
    /// node config names such as `echo` for the interface `Echo`).
    pub(crate) fn service(&self, name: &str) -> Option<(&str, &[Instance])> {
        if let Some((k, v)) = self.services.get_key_value(name) {
            return Some((k.as_str(), v.as_slice()));
        }
        let mut matches = self.services.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
        let first = matches.next()?;
        matches.next().is_none().then_some((first.0.as_str(), first.1.as_slice()))
    }

    /// Every instance of every service.
    pub(crate) fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.services.values().flatten()
    }
}

/// Interface names learnt from one process, or when asking it failed.
type InspectResult = (Vec<String>, Option<std::time::Instant>);

/// The discovery service (see the module docs).
pub(crate) struct Discovery {
    config: DiscoveryConfig,
    tx: watch::Sender<Arc<Snapshot>>,
    /// Wakes the discovery task for a scan now (a request, a deregistration, a host name answered).
    rescan: Arc<Notify>,
    names: names::HostNames,
    cancel: CancellationToken,
    client: Mutex<Option<zk::Client>>,
    /// Used in standalone mode to ask local lymph processes which interfaces they serve.
    node: Option<RpcNode>,
    /// identity → interface names, learnt with `lymph.inspect` (failures are remembered for a while, so a process
    /// that does not answer does not stall every scan).
    interfaces: Mutex<HashMap<String, InspectResult>>,
    registration: Option<(String, Registration)>,
}

impl Discovery {
    /// Starts discovery. `registration` is ours (`("Chaos", record)`), registered whenever a session is open.
    pub(crate) fn start(
        config: DiscoveryConfig,
        registration: Option<(String, Registration)>,
        node: Option<RpcNode>,
    ) -> Arc<Discovery> {
        let zookeeper = match &config.zookeeper {
            None => ZkState::Disabled,
            Some(hosts) => ZkState::Connecting { hosts: zookeeper::connect_string(hosts), error: None },
        };
        let (tx, _) = watch::channel(Arc::new(Snapshot { services: BTreeMap::new(), zookeeper, generation: 0 }));
        let rescan = Arc::new(Notify::new());
        let discovery = Arc::new(Discovery {
            config,
            tx,
            names: names::HostNames::new(rescan.clone()),
            rescan,
            cancel: CancellationToken::new(),
            client: Mutex::new(None),
            node,
            interfaces: Mutex::new(HashMap::new()),
            registration,
        });
        tokio::spawn(discovery.clone().run());
        discovery
    }

    /// The current snapshot.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Removes the registrations of a process (all its interfaces) from ZooKeeper, so clients stop routing to it
    /// before its session times out. Returns the paths removed.
    pub(crate) async fn deregister_identity(&self, identity: &str) -> Vec<String> {
        let client = self.client.lock().expect("poisoned").clone();
        let Some(client) = client else { return Vec::new() };
        let mut removed = Vec::new();
        for inst in self.snapshot().instances().filter(|i| i.identity == identity && i.source == Source::Zookeeper) {
            let path = format!("{}/{}/{}", zookeeper::SERVICES, inst.service, inst.id);
            zookeeper::unregister(&client, &path).await;
            removed.push(path);
        }
        self.rescan.notify_one();
        removed
    }

    /// Stops discovery and removes our registration.
    pub(crate) async fn shutdown(&self) {
        self.cancel.cancel();
        let client = self.client.lock().expect("poisoned").take();
        if let (Some(client), Some((service, reg))) = (client, &self.registration) {
            let path = format!("{}/{service}/{}", zookeeper::SERVICES, reg.id);
            zookeeper::unregister(&client, &path).await;
            info!(%path, "removed our ZooKeeper registration");
        }
    }

    fn publish(&self, services: BTreeMap<String, Vec<Instance>>, zookeeper: ZkState) {
        self.tx.send_modify(|snap| {
            *snap = Arc::new(Snapshot { services, zookeeper, generation: snap.generation + 1 });
        });
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        let mut warned = false;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let mut error = None;
            if let Some(hosts) = self.config.zookeeper.clone() {
                match zookeeper::connect(&hosts, self.config.session_timeout, self.config.connect_timeout).await {
                    Ok(client) => {
                        backoff = Duration::from_millis(500);
                        warned = false;
                        self.session(&hosts, client).await;
                        continue;
                    }
                    Err(err) => {
                        if warned {
                            tracing::debug!(%err, "ZooKeeper still unreachable");
                        } else {
                            warn!(%err, "ZooKeeper unreachable; running standalone and retrying in the background");
                            warned = true;
                        }
                        error = Some(err.to_string());
                    }
                }
            }
            // Standalone until the next attempt.
            let state = match &self.config.zookeeper {
                None => ZkState::Disabled,
                Some(hosts) => ZkState::Connecting { hosts: zookeeper::connect_string(hosts), error },
            };
            let until = tokio::time::Instant::now()
                + if self.config.zookeeper.is_some() { backoff } else { Duration::from_secs(3600) };
            while tokio::time::Instant::now() < until {
                let services = self.standalone_services().await;
                self.publish(services, state.clone());
                tokio::select! {
                    _ = tokio::time::sleep(self.config.local_refresh) => {}
                    _ = self.rescan.notified() => {}
                    _ = self.cancel.cancelled() => return,
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// One ZooKeeper session, until it expires or we are cancelled.
    async fn session(&self, hosts: &str, client: zk::Client) {
        let connect = zookeeper::connect_string(hosts);
        info!(hosts = %connect, "connected to ZooKeeper");
        *self.client.lock().expect("poisoned") = Some(client.clone());
        let mut registered = self.register(&client).await;
        let mut watcher = match zookeeper::watch_services(&client).await {
            Ok(w) => Some(w),
            Err(err) => {
                warn!(%err, "no persistent watch (ZooKeeper < 3.6?): polling instead");
                None
            }
        };
        let mut state = client.state_watcher();
        let poll = if watcher.is_some() { Duration::from_secs(5) } else { Duration::from_secs(1) };
        loop {
            match zookeeper::scan(&client).await {
                Ok(zk_services) => {
                    let services = self.merge_local(zk_services).await;
                    self.publish(
                        services,
                        ZkState::Connected { hosts: connect.clone(), registered: registered.clone() },
                    );
                }
                Err(err) => warn!(%err, "ZooKeeper scan failed"),
            }
            let mut check_registration = false;
            tokio::select! {
                event = async { watcher.as_mut().expect("guarded").changed().await }, if watcher.is_some() => {
                    if event.event_type == zk::EventType::Session && event.session_state.is_terminated() {
                        break;
                    }
                    // Coalesce a burst of events (a registration is several node changes) into one scan.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                s = state.changed() => {
                    if s.is_terminated() {
                        break;
                    }
                    check_registration = s == zk::SessionState::SyncConnected;
                }
                _ = tokio::time::sleep(poll.min(self.config.local_refresh)) => check_registration = true,
                _ = self.rescan.notified() => {}
                _ = self.cancel.cancelled() => return,
            }
            if check_registration
                && let Some(path) = &registered
                && !zookeeper::exists(&client, path).await
            {
                warn!(%path, "our registration vanished; registering again");
                registered = self.register(&client).await;
            }
        }
        warn!("ZooKeeper session ended; reconnecting");
        *self.client.lock().expect("poisoned") = None;
    }

    async fn register(&self, client: &zk::Client) -> Option<String> {
        let (service, reg) = self.registration.as_ref()?;
        match zookeeper::register(client, service, reg).await {
            Ok(path) => {
                info!(%path, endpoint = %reg.endpoint, "registered as lymph service {service}");
                Some(path)
            }
            Err(err) => {
                warn!(%err, "could not register in ZooKeeper");
                None
            }
        }
    }

    /// Resolves the pid of every registered instance that runs here. With a registry, the registry is the truth:
    /// lymph processes of this host that are not registered in it (another deployment's, `--isolated` ones) are
    /// not its services and are left out.
    async fn merge_local(&self, mut services: BTreeMap<String, Vec<Instance>>) -> BTreeMap<String, Vec<Instance>> {
        // Host names take the answers known now (DNS never holds up a scan); reading /proc blocks: off the
        // runtime's workers.
        let names = self.names.answers(services.values().flatten().map(|i| i.endpoint.as_str()));
        let copy = services.clone();
        tokio::task::spawn_blocking(move || {
            let mut view = local::HostView::capture();
            for inst in services.values_mut().flatten() {
                view.resolve(inst, &names);
            }
            services
        })
        .await
        .unwrap_or(copy)
    }

    async fn standalone_services(&self) -> BTreeMap<String, Vec<Instance>> {
        let view = tokio::task::spawn_blocking(local::HostView::capture).await.unwrap_or_default();
        let processes = view.processes().to_vec();
        let found = self.local_instances(&processes).await;
        let names = self.names.answers(found.iter().map(|i| i.endpoint.as_str()));
        let resolved = tokio::task::spawn_blocking(move || {
            let mut view = view;
            let mut found = found;
            for inst in &mut found {
                view.resolve(inst, &names);
            }
            found
        })
        .await
        .unwrap_or_default();
        let mut services: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for inst in resolved {
            services.entry(inst.service.clone()).or_default().push(inst);
        }
        services
    }

    /// Instances for lymph processes found by title: their interfaces come from `lymph.inspect` (cached per
    /// identity).
    async fn local_instances(&self, processes: &[local::LymphProcess]) -> Vec<Instance> {
        let mut out = Vec::new();
        let names = futures::future::join_all(processes.iter().map(|p| self.interfaces_of(p))).await;
        for (p, services) in processes.iter().zip(names) {
            for service in services {
                let inst = Instance {
                    service: service.clone(),
                    id: crate::rpc::node::hash_id(&[Some(&p.identity), Some(&service), None]),
                    identity: p.identity.clone(),
                    endpoint: p.endpoint.clone(),
                    version: None,
                    hostname: None,
                    ip: instance::parse_endpoint(&p.endpoint).map(|(ip, _)| ip.to_string()),
                    source: Source::Local,
                    local: true,
                    pid: Some(p.pid),
                    port: None,
                    listening: false,
                    process: Some(p.title.clone()),
                };
                out.push(inst);
            }
        }
        out
    }

    async fn interfaces_of(&self, p: &local::LymphProcess) -> Vec<String> {
        const RETRY_FAILED: Duration = Duration::from_secs(30);
        if let Some((names, failed)) = self.interfaces.lock().expect("poisoned").get(&p.identity)
            && failed.is_none_or(|at| at.elapsed() < RETRY_FAILED)
        {
            return names.clone();
        }
        let Some(node) = &self.node else { return Vec::new() };
        let body = value::encode(&Value::Map(Vec::new()));
        let Ok(reply) = node.request(&p.endpoint, "lymph.inspect", body, Duration::from_millis(1500)).await else {
            self.interfaces
                .lock()
                .expect("poisoned")
                .insert(p.identity.clone(), (Vec::new(), Some(std::time::Instant::now())));
            return Vec::new();
        };
        let mut names: Vec<String> = match value::decode(&reply) {
            Ok(Value::Map(entries)) => entries
                .into_iter()
                .filter(|(k, _)| k.as_str() == Some("methods"))
                .flat_map(|(_, v)| match v {
                    Value::Array(items) => items,
                    _ => Vec::new(),
                })
                .filter_map(|m| match m {
                    Value::Map(fields) => {
                        fields.into_iter().find(|(k, _)| k.as_str() == Some("name")).and_then(|(_, v)| match v {
                            Value::Str(name) => name.rsplit_once('.').map(|(iface, _)| iface.to_owned()),
                            _ => None,
                        })
                    }
                    _ => None,
                })
                .filter(|iface| iface != "lymph")
                .collect(),
            _ => Vec::new(),
        };
        names.sort();
        names.dedup();
        self.interfaces.lock().expect("poisoned").insert(p.identity.clone(), (names.clone(), None));
        names
    }
}
