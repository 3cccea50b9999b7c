//! Service instances: lymph's registry record and what the agent knows about each instance.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// The JSON lymph writes into `/<chroot>/services/<name>/<id>` (`ServiceInstance.serialize`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Registration {
    /// Instance id (= the znode name).
    #[serde(default)]
    pub id: String,
    /// Container identity (`hash_id(endpoint)`), shared by all interfaces of one process.
    #[serde(default)]
    pub identity: String,
    /// Interface version, or null.
    #[serde(default)]
    pub version: Option<String>,
    /// RPC endpoint `tcp://ip:port`: the only field a client needs.
    pub endpoint: String,
    /// Log PUB socket.
    #[serde(default)]
    pub log_endpoint: Option<String>,
    /// Monitoring PUB socket.
    #[serde(default)]
    pub monitoring_endpoint: Option<String>,
    /// gevent backdoor (`--debug`).
    #[serde(default)]
    pub backdoor_endpoint: Option<String>,
    /// Host FQDN.
    #[serde(default)]
    pub fqdn: Option<String>,
    /// Host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// RPC bind IP.
    #[serde(default)]
    pub ip: Option<String>,
    /// lymph's "worker" flag (misleadingly named `type`).
    #[serde(default, rename = "type")]
    pub worker: Option<serde_json::Value>,
    /// Fields added by interfaces (e.g. an HTTP port), kept as written.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Where the agent learnt about an instance.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A ZooKeeper registration.
    Zookeeper,
    /// A lymph process found in `/proc` (standalone mode, or not registered).
    Local,
}

/// One instance of one service, as the agent sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Instance {
    /// Service (interface) name, e.g. `Echo`.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// Container identity.
    pub identity: String,
    /// RPC endpoint.
    pub endpoint: String,
    /// Interface version.
    pub version: Option<String>,
    /// Host name from the registration.
    pub hostname: Option<String>,
    /// IP from the registration.
    pub ip: Option<String>,
    /// Where it was found.
    pub source: Source,
    /// Whether it runs on this host (a process here listens on its endpoint).
    pub local: bool,
    /// The pid owning the endpoint's listening socket, when local.
    pub pid: Option<i32>,
    /// The endpoint's port.
    pub port: Option<u16>,
    /// Whether the endpoint has a listener here (false for a local instance that died but is still registered).
    pub listening: bool,
    /// The process title (`lymph-instance (identity: …)`) of `pid`.
    pub process: Option<String>,
}

impl Instance {
    /// Builds an instance from a registration (local fields unresolved).
    pub fn from_registration(service: &str, node_name: &str, reg: Registration) -> Instance {
        let port = endpoint_port(&reg.endpoint);
        Instance {
            service: service.to_owned(),
            id: if reg.id.is_empty() { node_name.to_owned() } else { reg.id },
            identity: reg.identity,
            endpoint: reg.endpoint,
            version: reg.version,
            hostname: reg.hostname,
            ip: reg.ip,
            source: Source::Zookeeper,
            local: false,
            pid: None,
            port,
            listening: false,
            process: None,
        }
    }
}

/// Splits `tcp://host:port` into a host and a port (`[v6]` brackets removed).
pub fn split_endpoint(endpoint: &str) -> Option<(&str, u16)> {
    let rest = endpoint.strip_prefix("tcp://")?;
    let (host, port) = rest.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some((host.trim_start_matches('[').trim_end_matches(']'), port))
}

/// Splits `tcp://ip:port` into an address and a port (`[v6]` brackets allowed). Never touches DNS: a host
/// name gives `None` (the agent looks host names up in the background, never while it scans).
pub fn parse_endpoint(endpoint: &str) -> Option<(IpAddr, u16)> {
    let (host, port) = split_endpoint(endpoint)?;
    Some((host.parse::<IpAddr>().ok()?, port))
}

/// The port of `tcp://host:port`, whatever the host.
pub fn endpoint_port(endpoint: &str) -> Option<u16> {
    split_endpoint(endpoint).map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_verified_echo_registration() {
        // Written by a real lymph 0.15 `Echo` (lymph-protocol.md §1).
        let json = r#"{"id": "157630b911a499797ec94827eceb205d", "identity": "7a8672c2d7fca24129122c4256a811cf",
 "version": null, "endpoint": "tcp://127.0.0.1:42272", "log_endpoint": "tcp://127.0.0.1:38145",
 "monitoring_endpoint": "tcp://127.0.0.1:46307", "backdoor_endpoint": null, "fqdn": "localhost",
 "hostname": "vm", "ip": "127.0.0.1", "type": false}"#;
        let reg: Registration = serde_json::from_str(json).unwrap();
        let inst = Instance::from_registration("Echo", "157630b911a499797ec94827eceb205d", reg);
        assert_eq!(inst.endpoint, "tcp://127.0.0.1:42272");
        assert_eq!(inst.port, Some(42272));
        assert_eq!(inst.identity, "7a8672c2d7fca24129122c4256a811cf");
    }

    #[test]
    fn endpoints_with_v4_v6_and_garbage() {
        assert_eq!(parse_endpoint("tcp://127.0.0.1:1"), Some(("127.0.0.1".parse().unwrap(), 1)));
        assert_eq!(parse_endpoint("tcp://[::1]:4575"), Some(("::1".parse().unwrap(), 4575)));
        assert_eq!(parse_endpoint("udp://1.2.3.4:5"), None);
        assert_eq!(parse_endpoint("tcp://1.2.3.4:99999"), None);
    }
}
