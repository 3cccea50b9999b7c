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
//! Multi-host: it finds every `Chaos` agent in ZooKeeper, asks each which instances run on its host
//! (`Chaos.list_services` marks them `local`), and sends each action to the agents whose hosts run the instances
//! it selects. Which instances, how many and with which fault ids is defined once in [`crate::selection`] (the
//! Python client follows the same definition): a kill hits one instance of the whole cluster, chosen uniformly
//! over instances with the scenario's seed ([`Scenario::seed`] replays a run); network faults go to every host of
//! the service. Faults get ids derived from the scenario, so re-applying refreshes them instead of stacking new ones,
//! and reverting reverts exactly them.
//!
//! An agent that does not answer does not stop the others: a round plans over the agents that answered, sends every
//! request, and then reports each agent that failed with its host ([`ScenarioError::Partial`], [`AgentFailure`]).
//! [`Scenario::events`] merges every agent's events into one log ordered by time, each with its `agent` and `host`
//! ([`merge_events`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Map, Value as Json, json};
use tokio::task::JoinHandle;

use crate::{
    ClientError,
    client::Client,
    paths,
    selection::{self, Amount, Listed, RegistryView, SelectionError, Target},
};

/// Errors of a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// No agent found or reachable.
    #[error("no lymph-chaos agent reachable: {0}")]
    NoAgent(String),
    /// The action cannot be routed (unknown service, no agent hosting it) or asks for an invalid selection.
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// An agent refused or failed a request.
    #[error("agent {endpoint}: {source}")]
    Agent {
        /// The agent.
        endpoint: String,
        /// What it answered.
        source: ClientError,
    },
    /// Some agents failed (did not answer, refused) while the others acted: the others' answers, and the failures
    /// with their hosts.
    #[error("{}", describe_partial(failures, answers.len()))]
    Partial {
        /// Each agent that failed, with its host and what went wrong.
        failures: Vec<AgentFailure>,
        /// The answers of the requests that succeeded (for [`Scenario::events`]: the merged events of the agents
        /// that answered).
        answers: Vec<Json>,
    },
}

/// An agent that failed during a round: which one, on which host, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AgentFailure {
    /// Its endpoint, as registered.
    pub agent: String,
    /// Its host: the address in its endpoint ([`agent_host`]).
    pub host: String,
    /// What went wrong (a timeout for an agent that is down).
    pub error: String,
}

impl AgentFailure {
    fn new(agent: &str, error: &impl std::fmt::Display) -> AgentFailure {
        AgentFailure { agent: agent.to_owned(), host: agent_host(agent), error: error.to_string() }
    }
}

fn describe_partial(failures: &[AgentFailure], answers: usize) -> String {
    let each: Vec<String> = failures.iter().map(|f| format!("host {} ({}): {}", f.host, f.agent, f.error)).collect();
    format!("{} agent(s) failed while the others acted ({answers} answers): {}", failures.len(), each.join("; "))
}

/// The host of an agent: the address (or name) in its endpoint, `tcp://10.0.0.2:4575` → `10.0.0.2` (the endpoint
/// itself when it has no `tcp://host:port` form).
pub fn agent_host(endpoint: &str) -> String {
    crate::instance::split_endpoint(endpoint).map_or_else(|| endpoint.to_owned(), |(host, _)| host.to_owned())
}

/// One log of every agent's events: each event gets `agent` (the endpoint) and `host` ([`agent_host`]), and the
/// whole is ordered by (`time`, `agent`, `seq`) — the order the Python client's `Scenario.events()` uses too.
pub fn merge_events(per_agent: impl IntoIterator<Item = (String, Vec<Json>)>) -> Vec<Json> {
    let mut all: Vec<Json> = per_agent
        .into_iter()
        .flat_map(|(agent, events)| {
            let host = agent_host(&agent);
            events.into_iter().map(move |mut e| {
                if let Some(map) = e.as_object_mut() {
                    map.insert("agent".into(), agent.clone().into());
                    map.insert("host".into(), host.clone().into());
                }
                e
            })
        })
        .collect();
    let key = |e: &Json| {
        (
            e["time"].as_f64().unwrap_or(0.0),
            e["agent"].as_str().unwrap_or("").to_owned(),
            e["seq"].as_u64().unwrap_or(0),
        )
    };
    all.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.total_cmp(&kb.0).then_with(|| ka.1.cmp(&kb.1)).then_with(|| ka.2.cmp(&kb.2))
    });
    all
}

#[derive(Clone, Debug)]
struct Action {
    method: &'static str,
    /// The service name as given (resolved every round).
    service: String,
    /// Keyword arguments besides the target and `id`.
    params: Map<String, Json>,
    /// The action's fault id (see [`selection::fault_id`]).
    id: String,
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
    /// Rounds applied so far (every `apply` and every repeat round that got the agents' listings).
    rounds: AtomicU64,
}

/// A scenario (see the module docs).
pub struct Scenario {
    shared: Arc<Shared>,
    actions: Vec<Action>,
    dry_run: bool,
    seed: u64,
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
                rounds: AtomicU64::new(0),
            }),
            actions: Vec::new(),
            dry_run: false,
            seed: rand::random(),
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

    /// Selects instances with this seed instead of a random one: the same seed, actions and registry select the
    /// same instances (see [`crate::selection`]), so a run can be replayed.
    pub fn seed(&mut self, seed: u64) -> &mut Self {
        self.seed = seed;
        self
    }

    /// The seed this scenario selects instances with (random unless [`Scenario::seed`] set it; also logged when the
    /// scenario first applies).
    pub fn selection_seed(&self) -> u64 {
        self.seed
    }

    fn push(&mut self, method: &'static str, service: &str, kwargs: Json, lasting: bool) -> &mut Self {
        let mut params = kwargs.as_object().cloned().unwrap_or_default();
        // Your own fault id, else one derived from the scenario's.
        let id = match params.remove("id") {
            Some(Json::String(id)) => id,
            _ => format!("{}-{}", self.shared.prefix, self.actions.len()),
        };
        self.actions.push(Action { method, service: service.to_owned(), params, id, lasting });
        self
    }

    /// Queues a kill of one instance of `service` in the whole cluster (see [`crate::selection`]).
    pub fn kill(&mut self, service: &str) -> &mut Self {
        self.push("kill", service, json!({}), false)
    }

    /// Queues a kill with options (`signal`, `count`, `percent`, `all`, `seed`, `deregister`); `count`, `percent` and
    /// `all` count instances over the whole cluster, `seed` fixes this action's selection.
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
        let lasting = !selection::is_instant_kind(kind);
        self.push("inject", service, Json::Object(map), lasting)
    }

    /// Queues a network partition between services `a` and `b`: a peer fault of `kind` (`blackhole`, `loss` with
    /// `params.loss`, …) on the packets `a` sends to `b` and, unless `one_way`, on those `b` sends to `a`
    /// (`inject(b, kind, peer=a)` and `inject(a, kind, peer=b)`, direction `to`). Everything else the two services
    /// send or receive is untouched.
    ///
    /// lymph replies travel on the connection the replying side opens to the caller's endpoint, so `a`'s packets to
    /// `b` carry `a`'s requests to `b` and its replies to `b`'s calls: a one-way blackhole from `a` to `b` makes
    /// calls fail in both directions (`b`'s requests arrive, `a`'s replies do not).
    pub fn partition(&mut self, a: &str, b: &str, kind: &str, one_way: bool, params: Json) -> &mut Self {
        let mut map = params.as_object().cloned().unwrap_or_default();
        map.remove("id");
        map.insert("direction".into(), "to".into());
        let with_peer = |peer: &str| {
            let mut m = map.clone();
            m.insert("peer".into(), peer.into());
            Json::Object(m)
        };
        self.inject(b, kind, with_peer(a));
        if !one_way {
            self.inject(a, kind, with_peer(b));
        }
        self
    }

    /// Queues a pause of `service` for `lifetime`.
    pub fn pause(&mut self, service: &str, lifetime: Duration) -> &mut Self {
        self.push("pause", service, json!({"lifetime": lifetime.as_secs_f64()}), true)
    }

    /// Applies every queued action once, lasting faults before kills; returns the agents' answers in that order.
    ///
    /// # Errors
    /// Unknown services (nothing sent), no agent answering, refusals; [`ScenarioError::Partial`] when some agents
    /// failed (each with its host) while the others acted (their answers in it).
    pub async fn apply(&self) -> Result<Vec<Json>, ScenarioError> {
        apply_all(&self.shared, &self.actions, self.dry_run, self.seed).await
    }

    /// Applies now and then every `interval` until the returned guard is dropped; dropping it reverts every lasting
    /// fault the scenario created (also during a panic).
    ///
    /// # Errors
    /// The first application's errors, after reverting what it applied (later rounds log and carry on, as a monkey
    /// should).
    pub async fn repeat(&self, interval: Duration) -> Result<RepeatGuard, ScenarioError> {
        if let Err(err) = apply_all(&self.shared, &self.actions, self.dry_run, self.seed).await {
            revert_all(&self.shared).await;
            return Err(err);
        }
        let (shared, actions, dry_run, seed) = (self.shared.clone(), self.actions.clone(), self.dry_run, self.seed);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if let Err(err) = apply_all(&shared, &actions, dry_run, seed).await {
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

    /// Events of every agent in one log ordered by time, each with its `agent` and `host` ([`merge_events`]).
    ///
    /// # Errors
    /// [`ScenarioError::NoAgent`] when no agent answered; [`ScenarioError::Partial`] (with the others' events in
    /// `answers`) when some did not.
    pub async fn events(&self) -> Result<Vec<Json>, ScenarioError> {
        refresh_agents(&self.shared).await;
        let agents = self.shared.agents.lock().expect("poisoned").clone();
        let mut per_agent = Vec::new();
        let mut failures = Vec::new();
        for endpoint in agents {
            match call(&self.shared, &endpoint, "events", json!({"limit": 10000})).await {
                Ok(events) => per_agent.push((endpoint, events.as_array().cloned().unwrap_or_default())),
                Err(err) => failures.push(AgentFailure::new(&endpoint, &err)),
            }
        }
        if per_agent.is_empty() && !failures.is_empty() {
            return Err(ScenarioError::NoAgent(describe_partial(&failures, 0)));
        }
        let merged = merge_events(per_agent);
        if failures.is_empty() { Ok(merged) } else { Err(ScenarioError::Partial { failures, answers: merged }) }
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

/// Agents come and go: refreshes the list when a registry is known (keeps the old one when it cannot be read).
async fn refresh_agents(shared: &Shared) {
    let Some(hosts) = &shared.zookeeper else { return };
    if let Ok(client) = Client::new()
        && let Ok(client) = client.connect_zookeeper(hosts, shared.timeout).await
    {
        if let Ok(agents) = Scenario::lookup_agents(&client).await {
            *shared.agents.lock().expect("poisoned") = agents;
        }
        client.node().shutdown();
    }
}

/// Every reachable agent's `Chaos.list_services` answer, by agent endpoint, and the agents that did not answer.
async fn listings(shared: &Shared) -> Result<(Map<String, Json>, Vec<AgentFailure>), ScenarioError> {
    refresh_agents(shared).await;
    let agents = shared.agents.lock().expect("poisoned").clone();
    if agents.is_empty() {
        return Err(ScenarioError::NoAgent("none registered".into()));
    }
    let mut view = Map::new();
    let mut failures = Vec::new();
    let mut last_err = None;
    for endpoint in &agents {
        match call(shared, endpoint, "list_services", json!({})).await {
            Ok(listing) => {
                view.insert(endpoint.clone(), listing);
            }
            Err(err) => {
                failures.push(AgentFailure::new(endpoint, &err));
                last_err = Some(err);
            }
        }
    }
    if view.is_empty() {
        return Err(last_err.unwrap_or(ScenarioError::NoAgent("no agent answered".into())));
    }
    for failure in &failures {
        tracing::warn!(agent = %failure.agent, host = %failure.host, error = %failure.error,
            "an agent did not answer: its host's instances are left out of this round");
    }
    Ok((view, failures))
}

/// The selection's view of agents' `Chaos.list_services` answers (agent endpoint → answer): entries that are no
/// map, and instances without a string `id`, are left out; `local` counts only when it is `true`.
pub fn registry_view(listings: &Map<String, Json>) -> RegistryView {
    listings
        .iter()
        .map(|(agent, listing)| {
            let services = listing
                .as_object()
                .into_iter()
                .flatten()
                .map(|(service, instances)| {
                    let instances = instances
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|i| {
                            let id = i.get("id")?.as_str()?.to_owned();
                            Some(Listed { id, local: i.get("local") == Some(&Json::Bool(true)) })
                        })
                        .collect();
                    (service.clone(), instances)
                })
                .collect::<BTreeMap<_, _>>();
            (agent.clone(), services)
        })
        .collect()
}

/// The fault kind of an agent method and its arguments (`inject` names it in `kind`).
fn kind_of<'a>(method: &'a str, params: &'a Map<String, Json>) -> &'a str {
    match method {
        "inject" => params.get("kind").and_then(Json::as_str).unwrap_or(""),
        "inject_latency" => "latency",
        other => other,
    }
}

/// An action's `count`, `percent` and `all` options (absent or `null`: not given).
fn amount(params: &Map<String, Json>) -> Result<Amount, SelectionError> {
    let given = |key: &str| params.get(key).filter(|v| !v.is_null());
    let wrong = |key: &str, what: &str| SelectionError::BadArguments(format!("{key} must be {what}"));
    let count = given("count")
        .map(|v| v.as_i64().or_else(|| v.as_u64().map(|_| i64::MAX)).ok_or_else(|| wrong("count", "an integer")))
        .transpose()?;
    let percent = given("percent").map(|v| v.as_f64().ok_or_else(|| wrong("percent", "a number"))).transpose()?;
    let all = given("all").map(|v| v.as_bool().ok_or_else(|| wrong("all", "true or false"))).transpose()?;
    Amount::from_options(count, percent, all.unwrap_or(false))
}

/// The seed action number `index` (queue order, 0-based) of a scenario seeded with `seed` selects with in round
/// `round` (0-based): the action's own `seed` option, else [`selection::action_seed`] from the scenario's seed.
pub fn round_seed(seed: u64, index: usize, round: u64, method: &str, params: &Map<String, Json>) -> u64 {
    let instant = selection::is_instant_kind(kind_of(method, params));
    params
        .get("seed")
        .and_then(Json::as_u64)
        .unwrap_or_else(|| selection::action_seed(seed, index as u64, round, instant))
}

/// One request of a plan: the agent endpoint and the keyword arguments of the agent method.
pub type AgentRequest = (String, Map<String, Json>);

/// Where one action goes: (agent endpoint, keyword arguments) for each request, given every agent's
/// `Chaos.list_services` answer (agent endpoint → answer) and the seed to select with. [`crate::selection`] defines
/// every step; the Python client's `lymph_chaos.scenario.plan` gives the same answer for the same inputs.
///
/// `method` is the agent method (`kill`, `terminate`, `pause`, `inject_latency`, `inject`), `name` the service as
/// given, `params` the other arguments (`count`, `percent`, `all` included), `id` the action's fault id.
///
/// # Errors
/// [`ScenarioError::Selection`]: unknown or ambiguous service, no agent hosting it, invalid `count`/`percent`/`all`.
pub fn plan(
    method: &str,
    name: &str,
    params: &Map<String, Json>,
    id: &str,
    listings: &Map<String, Json>,
    seed: u64,
) -> Result<Vec<AgentRequest>, ScenarioError> {
    let amount = amount(params)?;
    let requests = selection::plan(&registry_view(listings), name, kind_of(method, params), amount, seed, id)?;
    Ok(requests
        .into_iter()
        .map(|request| {
            let mut kwargs = params.clone();
            match request.target {
                Target::Name(service) => {
                    kwargs.insert("name".into(), service.into());
                }
                Target::Instance(instance) => {
                    for key in ["count", "percent", "all"] {
                        kwargs.remove(key);
                    }
                    kwargs.insert("instance".into(), instance.into());
                }
            }
            kwargs.insert("id".into(), request.id.into());
            (request.agent, kwargs)
        })
        .collect())
}

async fn apply_all(shared: &Shared, actions: &[Action], dry_run: bool, seed: u64) -> Result<Vec<Json>, ScenarioError> {
    let (listings, mut failures) = listings(shared).await?;
    let round = shared.rounds.fetch_add(1, Ordering::SeqCst);
    if round == 0 {
        tracing::info!(scenario = %shared.prefix, seed, "selecting instances with this seed (Scenario::seed replays it)");
    }
    // Every action is planned before anything is sent: an unknown service fails the round as a whole.
    let mut planned = Vec::new();
    for (index, action) in actions.iter().enumerate() {
        let seed = round_seed(seed, index, round, action.method, &action.params);
        let requests = plan(action.method, &action.service, &action.params, &action.id, &listings, seed)?;
        planned.push((action, requests));
    }
    let mut answers = Vec::new();
    let mut failed_requests = Vec::new();
    // Lasting faults first, kills last: a kill could end an instance before its agent resolved the round's other
    // faults (a dead instance is no local target).
    let (lasting, instant): (Vec<_>, Vec<_>) = planned.into_iter().partition(|(a, _)| a.lasting);
    for (action, requests) in lasting.into_iter().chain(instant) {
        for (endpoint, mut kwargs) in requests {
            if dry_run {
                kwargs.insert("dry_run".into(), true.into());
            }
            // One agent failing does not keep the others from acting: every request is sent.
            let answer = match call(shared, &endpoint, action.method, Json::Object(kwargs)).await {
                Ok(answer) => answer,
                Err(err) => {
                    failures.push(AgentFailure::new(&endpoint, &err));
                    failed_requests.push(err);
                    continue;
                }
            };
            if action.lasting
                && !dry_run
                && let Some(id) = answer["id"].as_str()
            {
                shared.applied.lock().expect("poisoned").insert((endpoint.clone(), id.to_owned()));
            }
            answers.push(answer);
        }
    }
    match (failures.len(), failed_requests.pop()) {
        (0, _) => Ok(answers),
        // A single agent, the only one asked, refused: its own error, as before any cluster was involved.
        (1, Some(err)) if answers.is_empty() => Err(err),
        _ => Err(ScenarioError::Partial { failures, answers }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn listings() -> Map<String, Json> {
        let inst = |id: &str, local: bool| json!({"id": id, "identity": "i", "endpoint": "tcp://h:1", "local": local});
        json!({
            "tcp://a:4575": {"Echo": [inst("e1", true), inst("e2", true), inst("e3", false)], "Demo": [inst("d", false)]},
            "tcp://b:4575": {"Echo": [inst("e1", false), inst("e2", false), inst("e3", true)], "Demo": [inst("d", true)]},
        })
        .as_object()
        .cloned()
        .unwrap()
    }

    fn params(v: Json) -> Map<String, Json> {
        v.as_object().cloned().unwrap()
    }

    #[tokio::test]
    async fn partitions_queue_a_peer_fault_on_each_side_or_one() {
        let mut sn = Scenario::from_agents(&["tcp://127.0.0.1:9"]).unwrap();
        sn.partition("Billing", "Payments", "blackhole", false, json!({"id": "ignored"}));
        sn.partition("Billing", "Payments", "loss", true, json!({"loss": 30}));
        let got: Vec<(&str, Json)> =
            sn.actions.iter().map(|a| (a.service.as_str(), Json::Object(a.params.clone()))).collect();
        assert_eq!(
            got,
            vec![
                ("Payments", json!({"kind": "blackhole", "direction": "to", "peer": "Billing"})),
                ("Billing", json!({"kind": "blackhole", "direction": "to", "peer": "Payments"})),
                ("Payments", json!({"kind": "loss", "loss": 30, "direction": "to", "peer": "Billing"})),
            ]
        );
        assert!(sn.actions.iter().all(|a| a.lasting && a.method == "inject"));
    }

    #[test]
    fn an_agents_host_is_the_address_in_its_endpoint() {
        assert_eq!(agent_host("tcp://10.77.0.2:4575"), "10.77.0.2");
        assert_eq!(agent_host("tcp://[fd00::2]:4575"), "fd00::2");
        assert_eq!(agent_host("tcp://node-b:1"), "node-b");
        assert_eq!(agent_host("ipc:///run/x"), "ipc:///run/x");
    }

    #[test]
    fn events_of_every_agent_merge_into_one_log_by_time_each_with_its_host() {
        let ev = |seq: u64, time: f64| json!({"seq": seq, "time": time, "action": "applied"});
        let merged = merge_events([
            ("tcp://10.0.0.3:1".to_owned(), vec![ev(1, 5.0), ev(2, 7.0)]),
            ("tcp://10.0.0.2:1".to_owned(), vec![ev(1, 6.0), ev(2, 7.0), ev(3, 7.0)]),
        ]);
        let order: Vec<(String, u64)> =
            merged.iter().map(|e| (e["host"].as_str().unwrap().to_owned(), e["seq"].as_u64().unwrap())).collect();
        let want = [("10.0.0.3", 1), ("10.0.0.2", 1), ("10.0.0.2", 2), ("10.0.0.2", 3), ("10.0.0.3", 2)];
        assert_eq!(order, want.map(|(h, s)| (h.to_owned(), s)));
        assert!(merged.iter().all(|e| e["agent"] == format!("tcp://{}:1", e["host"].as_str().unwrap())));
    }

    #[test]
    fn registry_view_keeps_what_selection_needs_and_skips_the_rest() {
        let mut listings = listings();
        listings.insert("tcp://c:4575".into(), json!(null));
        listings["tcp://a:4575"]["Echo"].as_array_mut().unwrap().extend([
            json!({"local": true}),
            json!({"id": 3, "local": true}),
            json!({"id": "e9", "local": 1}),
            json!("junk"),
        ]);
        let view = registry_view(&listings);
        assert!(view["tcp://c:4575"].is_empty());
        let echo_on_a: Vec<(&str, bool)> =
            view["tcp://a:4575"]["Echo"].iter().map(|l| (l.id.as_str(), l.local)).collect();
        assert_eq!(echo_on_a, [("e1", true), ("e2", true), ("e3", false), ("e9", false)]);
    }

    #[test]
    fn each_chosen_instance_goes_to_its_agent_as_an_instance_request() {
        let listings = listings();
        let kill = plan("kill", "echo", &params(json!({"count": 2, "signal": "SIGTERM"})), "k", &listings, 3).unwrap();
        assert_eq!(kill.len(), 2);
        for (slot, (agent, kwargs)) in kill.iter().enumerate() {
            let instance = kwargs["instance"].as_str().unwrap();
            assert_eq!(agent, if instance == "e3" { "tcp://b:4575" } else { "tcp://a:4575" });
            let id = if slot == 0 { "k".to_owned() } else { format!("k.{slot}") };
            assert_eq!(Json::Object(kwargs.clone()), json!({"instance": instance, "signal": "SIGTERM", "id": id}));
        }
        let latency = plan("inject_latency", "Echo", &params(json!({"latency": 1})), "l", &listings, 3).unwrap();
        let want = ["tcp://a:4575", "tcp://b:4575"]
            .map(|a| (a.to_owned(), params(json!({"latency": 1, "name": "Echo", "id": "l"}))));
        assert_eq!(latency, want);
    }

    #[test]
    fn invalid_or_unroutable_actions_fail_before_anything_is_sent() {
        let listings = listings();
        let err = |method, name, p| plan(method, name, &params(p), "i", &listings, 1).unwrap_err();
        assert!(matches!(
            err("kill", "Echo", json!({"count": 0})),
            ScenarioError::Selection(SelectionError::InvalidArgument(_))
        ));
        assert!(matches!(
            err("kill", "Echo", json!({"count": "2"})),
            ScenarioError::Selection(SelectionError::BadArguments(_))
        ));
        assert!(matches!(
            err("inject", "Nope", json!({"kind": "loss"})),
            ScenarioError::Selection(SelectionError::UnknownService { .. })
        ));
    }

    #[test]
    fn kills_pick_anew_every_round_and_lasting_faults_keep_their_instances() {
        let listings = listings();
        let pick = |method: &str, p: Json, round| {
            let p = params(p);
            let seed = round_seed(11, 0, round, method, &p);
            plan(method, "Echo", &p, "i", &listings, seed).unwrap()[0].1["instance"].clone()
        };
        let pauses: BTreeSet<String> = (0..20).map(|r| pick("pause", json!({"lifetime": 1}), r).to_string()).collect();
        assert_eq!(pauses.len(), 1, "a refreshed pause stays on its instance");
        let kills: BTreeSet<String> = (0..20).map(|r| pick("kill", json!({}), r).to_string()).collect();
        assert_eq!(kills.len(), 3, "kills move around");
        let own: BTreeSet<String> = (0..20).map(|r| pick("kill", json!({"seed": 5}), r).to_string()).collect();
        assert_eq!(own.len(), 1, "an action's own seed fixes its choice");
    }
}
