//! `Scenario`: chaos from test code.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chaos_api::scenario::ScenarioError> {
//! use std::time::Duration;
//! use chaos_api::scenario::Scenario;
//!
//! let mut sn = Scenario::from_zookeeper("127.0.0.1:2181").await?;
//! sn.kill("echo");
//! sn.inject_latency("demo", Duration::from_secs(1));
//! {
//!     let _chaos = sn.repeat(Duration::from_secs(5)).await?; // applied now, again every 5 s
//!     // … what you want to test while the monkey is loose …
//! } // dropping the guard stops the repeats and reverts every fault it created (also when the test panics)
//! # Ok(()) }
//! ```
//!
//! Multi-host: it finds every `Chaos` agent in ZooKeeper and sends each action to the agent(s) whose host runs an
//! instance of the target service (`Chaos.list_services` marks local instances). Faults get ids derived from the
//! scenario, so re-applying refreshes them instead of stacking new ones, and reverting reverts exactly them.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Map, Value as Json, json};
use tokio::task::JoinHandle;

use crate::{ClientError, client::Client, paths};

/// Errors of a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// No agent found or reachable.
    #[error("no lymph-chaos agent reachable: {0}")]
    NoAgent(String),
    /// No agent has an instance of the service.
    #[error("no agent has an instance of service `{0}` on its host")]
    UnknownService(String),
    /// An agent refused or failed a request.
    #[error("agent {endpoint}: {source}")]
    Agent {
        /// The agent.
        endpoint: String,
        /// What it answered.
        source: ClientError,
    },
}

#[derive(Clone, Debug)]
struct Action {
    method: &'static str,
    service: String,
    kwargs: Map<String, Json>,
    /// Whether the fault lasts (and must be reverted at the end).
    lasting: bool,
}

struct Shared {
    client: Client,
    agents: Mutex<Vec<String>>,
    zookeeper: Option<String>,
    timeout: Duration,
    prefix: String,
    applied: Mutex<BTreeSet<(String, String)>>,
}

/// A scenario (see the module docs).
pub struct Scenario {
    shared: Arc<Shared>,
    actions: Vec<Action>,
    dry_run: bool,
}

impl Scenario {
    /// Finds every `Chaos` agent registered in ZooKeeper (`host:port[/chroot]`, chroot `/lymph` by default).
    ///
    /// # Errors
    /// [`ScenarioError::NoAgent`] when ZooKeeper cannot be reached or lists no agent.
    pub async fn from_zookeeper(hosts: &str) -> Result<Scenario, ScenarioError> {
        let client = Client::new().map_err(|e| ScenarioError::NoAgent(e.to_string()))?;
        let client = client
            .connect_zookeeper(hosts, Duration::from_secs(5))
            .await
            .map_err(|e| ScenarioError::NoAgent(e.to_string()))?;
        let agents = Self::lookup_agents(&client).await?;
        Ok(Self::new(client, agents, Some(hosts.to_owned())))
    }

    /// Uses the agents at these endpoints (no ZooKeeper).
    ///
    /// # Errors
    /// When the client socket cannot be opened.
    pub fn from_agents(endpoints: &[&str]) -> Result<Scenario, ScenarioError> {
        let client = Client::new().map_err(|e| ScenarioError::NoAgent(e.to_string()))?;
        Ok(Self::new(client, endpoints.iter().map(|e| (*e).to_owned()).collect(), None))
    }

    fn new(client: Client, agents: Vec<String>, zookeeper: Option<String>) -> Scenario {
        Scenario {
            shared: Arc::new(Shared {
                client,
                agents: Mutex::new(agents),
                zookeeper,
                timeout: Duration::from_secs(3),
                prefix: format!("sn-{:08x}", rand::random::<u32>()),
                applied: Mutex::new(BTreeSet::new()),
            }),
            actions: Vec::new(),
            dry_run: false,
        }
    }

    async fn lookup_agents(client: &Client) -> Result<Vec<String>, ScenarioError> {
        let agents = client.lookup(paths::SERVICE_NAME).await.map_err(|e| ScenarioError::NoAgent(e.to_string()))?;
        Ok(agents.into_iter().map(|a| a.endpoint).collect())
    }

    /// Makes every request a dry run (agents report what they would do).
    pub fn dry_run(&mut self, on: bool) -> &mut Self {
        self.dry_run = on;
        self
    }

    fn push(&mut self, method: &'static str, service: &str, kwargs: Json, lasting: bool) -> &mut Self {
        let mut map = kwargs.as_object().cloned().unwrap_or_default();
        map.insert("name".into(), service.into());
        map.insert("id".into(), format!("{}-{}", self.shared.prefix, self.actions.len()).into());
        self.actions.push(Action { method, service: service.to_owned(), kwargs: map, lasting });
        self
    }

    /// Queues a kill of one random instance of `service`.
    pub fn kill(&mut self, service: &str) -> &mut Self {
        self.push("kill", service, json!({}), false)
    }

    /// Queues a kill with options (`signal`, `count`, `percent`, `all`, `seed`, `deregister`).
    pub fn kill_with(&mut self, service: &str, options: Json) -> &mut Self {
        self.push("kill", service, options, false)
    }

    /// Queues `latency` on every request to `service`.
    pub fn inject_latency(&mut self, service: &str, latency: Duration) -> &mut Self {
        self.push("inject_latency", service, json!({"latency": latency.as_secs_f64()}), true)
    }

    /// Queues any fault kind with parameters (see `Chaos.inject`).
    pub fn inject(&mut self, service: &str, kind: &str, params: Json) -> &mut Self {
        let mut map = params.as_object().cloned().unwrap_or_default();
        map.insert("kind".into(), kind.into());
        let lasting = !matches!(kind, "kill" | "terminate");
        self.push("inject", service, Json::Object(map), lasting)
    }

    /// Queues a pause of `service` for `lifetime`.
    pub fn pause(&mut self, service: &str, lifetime: Duration) -> &mut Self {
        self.push("pause", service, json!({"lifetime": lifetime.as_secs_f64()}), true)
    }

    /// Applies every queued action once, lasting faults before kills; returns the agents' answers in that order.
    ///
    /// # Errors
    /// Unknown services, unreachable agents, refusals.
    pub async fn apply(&self) -> Result<Vec<Json>, ScenarioError> {
        apply_all(&self.shared, &self.actions, self.dry_run).await
    }

    /// Applies now and then every `interval` until the returned guard is dropped; dropping it reverts every lasting
    /// fault the scenario created (also during a panic).
    ///
    /// # Errors
    /// The first application's errors (later rounds log and carry on, as a monkey should).
    pub async fn repeat(&self, interval: Duration) -> Result<RepeatGuard, ScenarioError> {
        apply_all(&self.shared, &self.actions, self.dry_run).await?;
        let (shared, actions, dry_run) = (self.shared.clone(), self.actions.clone(), self.dry_run);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if let Err(err) = apply_all(&shared, &actions, dry_run).await {
                    tracing::warn!(%err, "scenario round failed");
                }
            }
        });
        Ok(RepeatGuard { shared: self.shared.clone(), task: Some(task) })
    }

    /// Reverts every lasting fault this scenario created.
    pub async fn revert_all(&self) {
        revert_all(&self.shared).await;
    }

    /// Events of every agent, ordered by time.
    ///
    /// # Errors
    /// Unreachable agents.
    pub async fn events(&self) -> Result<Vec<Json>, ScenarioError> {
        let mut all = Vec::new();
        let agents = self.shared.agents.lock().expect("poisoned").clone();
        for endpoint in agents {
            let events = call(&self.shared, &endpoint, "events", json!({"limit": 10000})).await?;
            all.extend(events.as_array().cloned().unwrap_or_default().into_iter().map(|mut e| {
                e["agent"] = endpoint.clone().into();
                e
            }));
        }
        all.sort_by(|a, b| a["time"].as_f64().partial_cmp(&b["time"].as_f64()).unwrap_or(std::cmp::Ordering::Equal));
        Ok(all)
    }
}

/// Returned by [`Scenario::repeat`]: stops the repeats and reverts on drop.
pub struct RepeatGuard {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl RepeatGuard {
    /// Stops and reverts now (awaitable form of dropping the guard).
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        revert_all(&self.shared).await;
    }
}

impl Drop for RepeatGuard {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        task.abort();
        // Drop cannot await: revert on a thread of its own with its own runtime (works while unwinding too).
        let shared = self.shared.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(revert_all(&shared));
            }
        })
        .join();
    }
}

async fn call(shared: &Shared, endpoint: &str, method: &str, kwargs: Json) -> Result<Json, ScenarioError> {
    let subject = format!("{}.{method}", paths::SERVICE_NAME);
    shared
        .client
        .call_endpoint(endpoint, &subject, &kwargs, shared.timeout)
        .await
        .map(|v| v.to_json())
        .map_err(|source| ScenarioError::Agent { endpoint: endpoint.to_owned(), source })
}

/// The agents that have a local instance of each service (names matched like the agent does: exact, else a unique
/// case-insensitive match).
async fn route(shared: &Shared, services: &BTreeSet<String>) -> Result<Vec<(String, String)>, ScenarioError> {
    if let Some(hosts) = &shared.zookeeper {
        // Agents come and go: refresh the list when a registry is known.
        if let Ok(client) = Client::new()
            && let Ok(client) = client.connect_zookeeper(hosts, shared.timeout).await
        {
            if let Ok(agents) = Scenario::lookup_agents(&client).await {
                *shared.agents.lock().expect("poisoned") = agents;
            }
            client.node().shutdown();
        }
    }
    let agents = shared.agents.lock().expect("poisoned").clone();
    if agents.is_empty() {
        return Err(ScenarioError::NoAgent("none registered".into()));
    }
    let mut routes = Vec::new();
    let mut reached = 0;
    let mut last_err = None;
    for endpoint in &agents {
        let listing = match call(shared, endpoint, "list_services", json!({})).await {
            Ok(l) => l,
            Err(err) => {
                last_err = Some(err);
                continue;
            }
        };
        reached += 1;
        let Some(map) = listing.as_object() else { continue };
        for service in services {
            let key = map.keys().find(|k| *k == service).or_else(|| {
                let mut m = map.keys().filter(|k| k.eq_ignore_ascii_case(service));
                let first = m.next();
                if m.next().is_none() { first } else { None }
            });
            let local = key.and_then(|k| map[k].as_array()).is_some_and(|list| list.iter().any(|i| i["local"] == true));
            if local {
                routes.push((service.clone(), endpoint.clone()));
            }
        }
    }
    if reached == 0 {
        return Err(last_err.unwrap_or(ScenarioError::NoAgent("no agent answered".into())));
    }
    Ok(routes)
}

async fn apply_all(shared: &Shared, actions: &[Action], dry_run: bool) -> Result<Vec<Json>, ScenarioError> {
    let services: BTreeSet<String> = actions.iter().map(|a| a.service.clone()).collect();
    let routes = route(shared, &services).await?;
    let mut answers = Vec::new();
    // Lasting faults first, kills last: a kill could end an instance before its agent resolved the round's other
    // faults (a dead instance is no local target).
    let (lasting, instant): (Vec<&Action>, Vec<&Action>) = actions.iter().partition(|a| a.lasting);
    for action in lasting.into_iter().chain(instant) {
        let targets: Vec<&String> = routes.iter().filter(|(s, _)| *s == action.service).map(|(_, e)| e).collect();
        if targets.is_empty() {
            return Err(ScenarioError::UnknownService(action.service.clone()));
        }
        for endpoint in targets {
            let mut kwargs = action.kwargs.clone();
            if dry_run {
                kwargs.insert("dry_run".into(), true.into());
            }
            let answer = call(shared, endpoint, action.method, Json::Object(kwargs)).await?;
            if action.lasting
                && !dry_run
                && let Some(id) = answer["id"].as_str()
            {
                shared.applied.lock().expect("poisoned").insert((endpoint.clone(), id.to_owned()));
            }
            answers.push(answer);
        }
    }
    Ok(answers)
}

async fn revert_all(shared: &Shared) {
    let applied: Vec<(String, String)> =
        std::mem::take(&mut *shared.applied.lock().expect("poisoned")).into_iter().collect();
    for (endpoint, id) in applied {
        match call(shared, &endpoint, "revert", json!({"id": id})).await {
            Ok(_) => {}
            // Already expired: nothing to undo.
            Err(ScenarioError::Agent { source: ClientError::Remote { type_name, .. }, .. })
                if type_name == "UnknownFault" => {}
            Err(err) => tracing::warn!(%err, %id, "could not revert a scenario fault"),
        }
    }
}
