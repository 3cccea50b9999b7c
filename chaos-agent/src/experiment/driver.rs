//! The seam between experiments and the outside world: the [`Driver`] trait (call a lymph service, count its
//! instances, send an HTTP request, find the agents that host a service, apply and revert faults) and its real
//! implementation, [`LymphDriver`], over the lymph RPC client and ZooKeeper. Nothing else in the experiment
//! engine talks to agents or services, so the runner and the probes are tested with a fake driver, without
//! sockets; and the checks of fault parameters ([`check_fault`]) use the agent's own argument rules.

use std::{future::Future, pin::Pin, time::Duration};

use serde_json::{Map, Value as Json, json};

use super::{
    file::FaultStep,
    http::{self, Request, Response},
};
use crate::{
    paths,
    rpc::{
        ClientError,
        client::Client,
        node::{NodeConfig, RpcNode},
    },
};

/// lymph's variable for the address a process advertises (and here: binds for replies).
pub(crate) const NODE_IP_ENV: &str = "LYMPH_NODE_IP";

/// A boxed future borrowing the driver.
pub(crate) type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An agent with local instances of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Host {
    /// The agent's endpoint.
    pub(crate) agent: String,
    /// How many instances of the service run on its host (0 for host-wide faults).
    pub(crate) instances: usize,
}

/// Errors talking to agents.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DriverError {
    /// No agent registered or reachable.
    #[error("no lymph-chaos agent reachable: {0}")]
    NoAgent(String),
    /// No agent has an instance of the service on its host.
    #[error("no agent has an instance of service `{0}` on its host")]
    NoHost(String),
    /// An agent answered with an error.
    #[error("agent {agent}: {type_name}: {message}")]
    Agent {
        /// Its endpoint.
        agent: String,
        /// The error type (`KernelFeatureMissing`, `Refused` …).
        type_name: String,
        /// Its message.
        message: String,
    },
    /// An agent did not answer.
    #[error("agent {agent}: {message}")]
    Unreachable {
        /// Its endpoint.
        agent: String,
        /// What happened.
        message: String,
    },
}

/// What the experiment engine needs from the outside world.
pub(crate) trait Driver: Send + Sync + 'static {
    /// Calls `Service.method(**args)` on an instance found in the registry; the reply as JSON, or why not.
    fn call<'a>(&'a self, subject: &'a str, args: &'a Json, timeout: Duration) -> Fut<'a, Result<Json, String>>;
    /// Registered instances of `service` (0 when none).
    fn instances<'a>(&'a self, service: &'a str) -> Fut<'a, Result<usize, String>>;
    /// Sends an HTTP request.
    fn http<'a>(&'a self, request: &'a Request, timeout: Duration) -> Fut<'a, Result<Response, String>> {
        Box::pin(http::send(request, timeout))
    }
    /// The agents whose hosts run `service` (every agent for `None`).
    fn hosts<'a>(&'a self, service: Option<&'a str>) -> Fut<'a, Result<Vec<Host>, DriverError>>;
    /// `Chaos.inject(**kwargs)` on `agent`; the fault report.
    fn inject<'a>(&'a self, agent: &'a str, kwargs: &'a Map<String, Json>) -> Fut<'a, Result<Json, DriverError>>;
    /// `Chaos.revert(id)` on `agent`; `false` when the fault was not active any more (expired, never applied).
    fn revert<'a>(&'a self, agent: &'a str, id: &'a str) -> Fut<'a, Result<bool, DriverError>>;
}

/// Fault kinds of `Chaos.inject`.
pub(crate) const KINDS: &[&str] = &[
    "latency",
    "delay",
    "loss",
    "duplicate",
    "corrupt",
    "reorder",
    "rate",
    "blackhole",
    "observe",
    "cpu",
    "memory",
    "disk",
    "kill",
    "terminate",
    "pause",
];

/// Kinds acting on processes: one instance over all hosts unless `count`, `percent` or `all` say otherwise.
pub(crate) fn is_process_kind(kind: &str) -> bool {
    matches!(kind, "kill" | "terminate" | "pause")
}

/// Checks one parameter of a fault step with the agent's rules (unknown for the kind, out of range, not a
/// duration or rate …).
///
/// # Errors
/// The agent's message.
pub(crate) fn check_fault_param(kind: &str, key: &str, value: &Json) -> Result<(), String> {
    if !KINDS.contains(&kind) {
        return Err(format!("unknown fault kind `{kind}`; kinds: {}", KINDS.join(", ")));
    }
    let mut map = Map::new();
    map.insert("kind".into(), kind.into());
    map.insert("name".into(), "service".into());
    // The kind's required parameter, so the agent's rules get as far as `key`.
    let required: Option<(&str, Json)> = match kind {
        "latency" | "delay" if key != "delay" => Some(("latency", json!(0.1))),
        "loss" | "duplicate" | "corrupt" | "reorder" => Some((kind, json!(1))),
        "rate" => Some(("rate", json!("1mbit"))),
        _ => None,
    };
    if let Some((k, v)) = required {
        map.insert(k.into(), v);
    }
    map.insert(key.to_owned(), value.clone());
    match inject_spec(&map) {
        // Only errors about this key: others (a required parameter not read yet) are checked with the whole step.
        Err(message) if message.contains(key) => Err(message),
        _ => Ok(()),
    }
}

/// Checks a whole fault step with the agent's rules.
///
/// # Errors
/// The agent's message.
pub(crate) fn check_fault(step: &FaultStep) -> Result<(), String> {
    if !KINDS.contains(&step.kind.as_str()) {
        return Err(format!("unknown fault kind `{}`; kinds: {}", step.kind, KINDS.join(", ")));
    }
    if step.service.is_none() && !matches!(step.kind.as_str(), "cpu" | "memory" | "disk") {
        return Err(format!("a {} fault needs `service` (the lymph service to hit)", step.kind));
    }
    inject_spec(&kwargs(step, "check", None, Duration::from_secs(1), false))
}

fn inject_spec(map: &Map<String, Json>) -> Result<(), String> {
    let request = chaos_api::request::Inject::from_json("fault", map).map_err(|e| match e {
        crate::rpc::RpcError::Error { message, .. } => message.replacen("fault(): ", "", 1),
        other => other.to_string(),
    })?;
    crate::faults::FaultSpec::try_from(request).map(|_| ()).map_err(|e| e.to_string())
}

/// The keyword arguments of `Chaos.inject` for a fault step.
pub(crate) fn kwargs(
    step: &FaultStep,
    id: &str,
    seed: Option<u64>,
    lifetime: Duration,
    dry_run: bool,
) -> Map<String, Json> {
    let mut map = step.params.clone();
    map.insert("kind".into(), step.kind.clone().into());
    if let Some(service) = &step.service {
        map.insert("name".into(), service.clone().into());
    }
    map.insert("id".into(), id.into());
    if step.lasting() {
        map.insert("lifetime".into(), json!(lifetime.as_secs_f64()));
    }
    if let Some(seed) = seed {
        map.insert("seed".into(), seed.into());
    }
    if dry_run {
        map.insert("dry_run".into(), true.into());
    }
    map
}

/// The real driver: lymph RPC through one client node, the registry through ZooKeeper.
pub(crate) struct LymphDriver {
    client: Client,
    timeout: Duration,
}

impl LymphDriver {
    /// Connects to ZooKeeper (`host:port[,…][/chroot]`, chroot `/lymph` by default).
    ///
    /// # Errors
    /// When the client cannot bind or ZooKeeper does not answer within `timeout`.
    pub(crate) async fn connect(zookeeper: &str, timeout: Duration) -> Result<LymphDriver, String> {
        // Replies come back to our own endpoint: loopback, unless `LYMPH_NODE_IP` (lymph's variable) names the
        // address agents and services on other hosts can reach.
        let node = match std::env::var(NODE_IP_ENV) {
            Ok(ip) if !ip.trim().is_empty() => {
                NodeConfig { bind_ip: ip.trim().to_owned(), port: None, advertise_ip: None, access: None }
            }
            _ => NodeConfig::loopback(),
        };
        let node = RpcNode::start(&node, None).map_err(|e| format!("cannot open a lymph client socket: {e}"))?;
        let client = Client::with_node(node);
        let client = client.connect_zookeeper(zookeeper, timeout).await.map_err(|e| e.to_string())?;
        Ok(LymphDriver { client, timeout })
    }

    async fn agent_call(&self, agent: &str, method: &str, kwargs: &Json) -> Result<Json, DriverError> {
        let subject = format!("{}.{method}", paths::SERVICE_NAME);
        match self.client.call_endpoint(agent, &subject, kwargs, self.timeout).await {
            Ok(v) => Ok(v.to_json()),
            Err(ClientError::Remote { type_name, message }) => {
                Err(DriverError::Agent { agent: agent.to_owned(), type_name, message })
            }
            Err(other) => Err(DriverError::Unreachable { agent: agent.to_owned(), message: other.to_string() }),
        }
    }
}

impl Drop for LymphDriver {
    fn drop(&mut self) {
        self.client.node().shutdown();
    }
}

/// The name a listing uses for `service`: exact, else the only case-insensitive match (as the agents match).
fn listed_name<'a>(names: impl Iterator<Item = &'a String> + Clone, service: &str) -> Option<&'a String> {
    names.clone().find(|k| *k == service).or_else(|| {
        let mut m = names.filter(|k| k.eq_ignore_ascii_case(service));
        let first = m.next();
        if m.next().is_none() { first } else { None }
    })
}

impl Driver for LymphDriver {
    fn call<'a>(&'a self, subject: &'a str, args: &'a Json, timeout: Duration) -> Fut<'a, Result<Json, String>> {
        Box::pin(async move {
            match self.client.call(subject, args, timeout).await {
                Ok(v) => Ok(v.to_json()),
                Err(ClientError::Remote { type_name, message }) => Err(format!("{type_name}: {message}")),
                Err(ClientError::Nack { .. }) => Err("Nack".into()),
                Err(ClientError::Timeout { after, .. }) => Err(format!("Timeout after {:.3} s", after.as_secs_f64())),
                Err(ClientError::LookupFailure { service, .. }) => {
                    Err(format!("LookupFailure: no instance of {service}"))
                }
                Err(other) => Err(other.to_string()),
            }
        })
    }

    fn instances<'a>(&'a self, service: &'a str) -> Fut<'a, Result<usize, String>> {
        Box::pin(async move {
            match self.client.lookup(service).await {
                Ok(list) => Ok(list.len()),
                Err(ClientError::LookupFailure { detail, .. }) if detail.is_empty() => Ok(0),
                Err(other) => Err(other.to_string()),
            }
        })
    }

    fn hosts<'a>(&'a self, service: Option<&'a str>) -> Fut<'a, Result<Vec<Host>, DriverError>> {
        Box::pin(async move {
            let agents = match self.client.lookup(paths::SERVICE_NAME).await {
                Ok(a) => a,
                Err(err) => return Err(DriverError::NoAgent(err.to_string())),
            };
            let mut hosts = Vec::new();
            let mut last_err = None;
            let mut reached = 0;
            for agent in agents {
                let Some(service) = service else {
                    hosts.push(Host { agent: agent.endpoint, instances: 0 });
                    continue;
                };
                let listing = match self.agent_call(&agent.endpoint, "list_services", &json!({})).await {
                    Ok(l) => l,
                    Err(err) => {
                        last_err = Some(err);
                        continue;
                    }
                };
                reached += 1;
                let Some(map) = listing.as_object() else { continue };
                let local = listed_name(map.keys(), service)
                    .and_then(|k| map[k].as_array())
                    .map_or(0, |list| list.iter().filter(|i| i["local"] == true).count());
                if local > 0 {
                    hosts.push(Host { agent: agent.endpoint, instances: local });
                }
            }
            if let Some(service) = service {
                if reached == 0 {
                    return Err(last_err.unwrap_or_else(|| DriverError::NoAgent("none registered".into())));
                }
                if hosts.is_empty() {
                    return Err(DriverError::NoHost(service.to_owned()));
                }
            }
            Ok(hosts)
        })
    }

    fn inject<'a>(&'a self, agent: &'a str, kwargs: &'a Map<String, Json>) -> Fut<'a, Result<Json, DriverError>> {
        Box::pin(async move { self.agent_call(agent, "inject", &Json::Object(kwargs.clone())).await })
    }

    fn revert<'a>(&'a self, agent: &'a str, id: &'a str) -> Fut<'a, Result<bool, DriverError>> {
        Box::pin(async move {
            // The agent answers a fault that already ended with its report as it ended (`expired` …).
            match self.agent_call(agent, "revert", &json!({"id": id})).await {
                Ok(report) => Ok(report["state"] == "reverted"),
                Err(DriverError::Agent { type_name, .. }) if type_name == "UnknownFault" => Ok(false),
                Err(err) => Err(err),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_parameters_follow_the_agents_rules() {
        assert!(check_fault_param("loss", "loss", &json!(30)).is_ok());
        assert!(check_fault_param("loss", "loss", &json!(130)).unwrap_err().contains("130"));
        assert!(check_fault_param("latency", "jitter", &json!("20ms")).is_ok());
        assert!(check_fault_param("latency", "jitter", &json!("soon")).unwrap_err().contains("jitter"));
        assert!(check_fault_param("kill", "loss", &json!(3)).unwrap_err().contains("does not apply"));
        assert!(check_fault_param("rate", "rate", &json!("fast")).unwrap_err().contains("rate"));
        assert!(check_fault_param("meteor", "x", &json!(1)).unwrap_err().contains("unknown fault kind"));
        let step = |kind: &str, params: Json| FaultStep {
            kind: kind.into(),
            service: Some("Echo".into()),
            lifetime: None,
            params: params.as_object().cloned().unwrap(),
        };
        assert!(check_fault(&step("loss", json!({}))).unwrap_err().contains("give loss"));
        assert!(check_fault(&step("latency", json!({"latency": "200ms"}))).is_ok());
        assert!(check_fault(&FaultStep { service: None, ..step("kill", json!({})) }).unwrap_err().contains("service"));
    }

    #[test]
    fn kwargs_carry_id_lifetime_seed_and_dry_run() {
        let step = FaultStep {
            kind: "latency".into(),
            service: Some("Echo".into()),
            lifetime: None,
            params: json!({"latency": "200ms"}).as_object().cloned().unwrap(),
        };
        let k = kwargs(&step, "ex-1", Some(9), Duration::from_secs(10), true);
        assert_eq!(
            Json::Object(k),
            json!({"kind": "latency", "name": "Echo", "latency": "200ms", "id": "ex-1", "lifetime": 10.0, "seed": 9, "dry_run": true})
        );
        let kill = FaultStep { kind: "kill".into(), params: Map::new(), ..step };
        assert!(!kwargs(&kill, "ex-2", None, Duration::from_secs(10), false).contains_key("lifetime"));
    }
}
