//! Calling lymph services: by endpoint, or by name through ZooKeeper (a random registered instance, as lymph's
//! `_pick_instance` does).

use std::{
    collections::HashMap,
    net::{IpAddr, UdpSocket},
    sync::Mutex,
    time::Duration,
};

use rand::seq::IndexedRandom;
use serde::{Serialize, de::DeserializeOwned};
use zookeeper_client as zk;

use crate::{
    error::ClientError,
    instance::Instance,
    node::{NodeConfig, NodeError, RpcNode},
    registry as zookeeper,
    value::{self, Value},
};

/// A lymph client: an [`RpcNode`] (replies come back to its bound endpoint) plus an optional registry.
///
/// A peer sends its replies to the endpoint the request names, so that endpoint must be reachable from the peer: a
/// client made with [`Client::new`] answers from loopback for peers on this host, and from the address this host
/// sends from for any other peer (a node bound to that address, made on first use).
pub struct Client {
    node: RpcNode,
    /// Nodes bound to this host's non-loopback addresses, by address; unused for a client [`Client::with_node`].
    routed: Option<Mutex<HashMap<IpAddr, RpcNode>>>,
    zk: Option<zk::Client>,
}

/// The address this host sends from to reach `endpoint` (`tcp://<ip>:<port>`; `None` for host names). No packet is
/// sent: connecting a UDP socket only picks the route.
fn source_address_for(endpoint: &str) -> Option<IpAddr> {
    let (host, port) = endpoint.strip_prefix("tcp://")?.rsplit_once(':')?;
    let ip: IpAddr = host.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    let port: u16 = port.parse().ok()?;
    let socket = UdpSocket::bind(if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
    socket.connect((ip, port.max(1))).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

impl Client {
    /// A client on a fresh loopback node, without a registry (endpoint calls only).
    ///
    /// # Errors
    /// When the node cannot bind.
    pub fn new() -> Result<Client, NodeError> {
        Ok(Client {
            node: RpcNode::start(&NodeConfig::loopback(), None)?,
            routed: Some(Mutex::new(HashMap::new())),
            zk: None,
        })
    }

    /// A client using an existing node for every call.
    pub fn with_node(node: RpcNode) -> Client {
        Client { node, routed: None, zk: None }
    }

    /// The node whose endpoint `endpoint`'s peer can send replies to.
    fn node_for(&self, endpoint: &str) -> RpcNode {
        let Some(routed) = &self.routed else { return self.node.clone() };
        let Some(source) = source_address_for(endpoint).filter(|ip| !ip.is_loopback()) else {
            return self.node.clone();
        };
        let mut routed = routed.lock().expect("poisoned");
        if let Some(node) = routed.get(&source) {
            return node.clone();
        }
        let config = NodeConfig { bind_ip: source.to_string(), ..NodeConfig::loopback() };
        match RpcNode::start(&config, None) {
            Ok(node) => {
                routed.insert(source, node.clone());
                node
            }
            Err(err) => {
                tracing::debug!(%source, %err, "cannot bind a client node on this address; replies go to loopback");
                self.node.clone()
            }
        }
    }

    /// Adds a ZooKeeper registry for calls by name.
    ///
    /// # Errors
    /// [`ClientError::LookupFailure`] when ZooKeeper cannot be reached within `timeout`.
    pub async fn connect_zookeeper(mut self, hosts: &str, timeout: Duration) -> Result<Client, ClientError> {
        let client = zookeeper::connect(hosts, Duration::from_secs(10), timeout)
            .await
            .map_err(|err| ClientError::LookupFailure { service: "(registry)".into(), detail: format!(": {err}") })?;
        self.zk = Some(client);
        Ok(self)
    }

    /// The node used for calls to peers on this host.
    pub fn node(&self) -> &RpcNode {
        &self.node
    }

    /// Registered instances of `service`.
    ///
    /// # Errors
    /// [`ClientError::LookupFailure`] when there is no registry, or the service has no node.
    pub async fn lookup(&self, service: &str) -> Result<Vec<Instance>, ClientError> {
        let zk = self.zk.as_ref().ok_or_else(|| ClientError::LookupFailure {
            service: service.to_owned(),
            detail: ": no ZooKeeper configured (call by endpoint instead)".into(),
        })?;
        let all = zookeeper::scan(zk)
            .await
            .map_err(|err| ClientError::LookupFailure { service: service.to_owned(), detail: format!(": {err}") })?;
        let instances = all.get(service).cloned().unwrap_or_default();
        if instances.is_empty() {
            return Err(ClientError::LookupFailure { service: service.to_owned(), detail: String::new() });
        }
        Ok(instances)
    }

    /// Calls `Service.method` on a random registered instance.
    ///
    /// # Errors
    /// Lookup failures, NACK, remote errors, timeouts.
    pub async fn call<A: Serialize>(&self, subject: &str, kwargs: &A, timeout: Duration) -> Result<Value, ClientError> {
        let service = subject.rsplit_once('.').map_or(subject, |(s, _)| s);
        let instances = self.lookup(service).await?;
        let instance = instances.choose(&mut rand::rng()).expect("non-empty");
        self.call_endpoint(&instance.endpoint, subject, kwargs, timeout).await
    }

    /// Calls `subject` on `endpoint`.
    ///
    /// # Errors
    /// NACK, remote errors, timeouts, encoding failures.
    pub async fn call_endpoint<A: Serialize>(
        &self,
        endpoint: &str,
        subject: &str,
        kwargs: &A,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let body = rmp_serde::to_vec_named(kwargs)
            .map_err(|err| ClientError::Codec(format!("cannot encode arguments: {err}")))?;
        let reply = self.node_for(endpoint).request(endpoint, subject, body, timeout).await?;
        value::decode(&reply).map_err(|err| ClientError::Codec(format!("reply from {endpoint} is not msgpack: {err}")))
    }

    /// Sends a typed `Chaos` request to the agent at `endpoint`.
    ///
    /// # Errors
    /// NACK, remote errors (see [`ClientError::code`]), timeouts, encoding failures.
    pub async fn chaos(
        &self,
        endpoint: &str,
        request: &crate::Request,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        self.call_endpoint(endpoint, &request.method().subject(), &request.to_kwargs(), timeout).await
    }

    /// Like [`Client::call_endpoint`], decoding the reply into `T`.
    ///
    /// # Errors
    /// As [`Client::call_endpoint`], plus a codec error when the reply does not fit `T`.
    pub async fn call_endpoint_as<A: Serialize, T: DeserializeOwned>(
        &self,
        endpoint: &str,
        subject: &str,
        kwargs: &A,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let value = self.call_endpoint(endpoint, subject, kwargs, timeout).await?;
        serde_json::from_value(value.to_json())
            .map_err(|err| ClientError::Codec(format!("unexpected reply to {subject}: {err}")))
    }
}
