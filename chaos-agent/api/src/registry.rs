//! lymph's ZooKeeper registry: reading `/<chroot>/services/<name>/<id>` and registering ourselves.
//!
//! Layout (`lymph/discovery/zookeeper.py`): chroot `/lymph` unless the connect string names another; persistent
//! parents `/services/<name>`; one **ephemeral** node per instance holding its JSON registration. lymph deletes an
//! existing node at its path before creating its own, and re-registers after a reconnect; so do we.

use std::{collections::BTreeMap, time::Duration};

use futures::future::join_all;
use tracing::{debug, warn};
use zookeeper_client as zk;

use super::instance::{Instance, Registration};

/// lymph's default chroot (`DEFAULT_CHROOT`).
pub const DEFAULT_CHROOT: &str = "/lymph";
/// lymph's `SERVICE_NAMESPACE`.
pub const SERVICES: &str = "/services";

/// Errors talking to ZooKeeper.
#[derive(Debug, thiserror::Error)]
pub enum ZkError {
    /// Could not connect or open a session.
    #[error("cannot connect to ZooKeeper at {hosts}: {source}")]
    Connect {
        /// The connect string.
        hosts: String,
        /// The client's error.
        source: zk::Error,
    },
    /// A request failed.
    #[error("ZooKeeper {op} {path}: {source}")]
    Request {
        /// Operation.
        op: &'static str,
        /// Path.
        path: String,
        /// The client's error.
        source: zk::Error,
    },
}

/// Splits a lymph-style hosts string into the connect string to use (always with a chroot).
///
/// `127.0.0.1:2181` → `127.0.0.1:2181/lymph`; `h1:2181,h2:2181/foo` keeps `/foo`.
pub fn connect_string(hosts: &str) -> String {
    let hosts = hosts.trim().trim_end_matches('/');
    match hosts.split_once('/') {
        Some((_, chroot)) if !chroot.is_empty() => hosts.to_owned(),
        _ => format!("{hosts}{DEFAULT_CHROOT}"),
    }
}

/// Opens a session.
///
/// # Errors
/// [`ZkError::Connect`] when no server answers within `timeout`.
pub async fn connect(hosts: &str, session_timeout: Duration, timeout: Duration) -> Result<zk::Client, ZkError> {
    let connect = connect_string(hosts);
    let (servers, chroot) = connect.split_once('/').map_or((connect.as_str(), ""), |(s, c)| (s, c));
    let chroot = format!("/{chroot}");
    let attempt = zk::Client::connector()
        .with_session_timeout(session_timeout)
        .with_connection_timeout(timeout)
        .with_fail_eagerly()
        .connect(servers);
    let client = match tokio::time::timeout(timeout + Duration::from_millis(500), attempt).await {
        Ok(Ok(client)) => client,
        Ok(Err(source)) => return Err(ZkError::Connect { hosts: connect, source }),
        Err(_) => return Err(ZkError::Connect { hosts: connect, source: zk::Error::Timeout }),
    };
    // Like kazoo's ensure_path for lymph: the chroot may not exist yet (a fresh deployment, or a test's own).
    let parent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    match client.mkdir(&chroot, &parent).await {
        Ok(()) | Err(zk::Error::NodeExists) => {}
        Err(source) => return Err(ZkError::Request { op: "mkdir", path: chroot, source }),
    }
    client.chroot(chroot.as_str()).map_err(|_| ZkError::Request {
        op: "chroot",
        path: chroot,
        source: zk::Error::BadArguments(&"invalid chroot"),
    })
}

/// One instance from the JSON of its registration node (anyone who can write to ZooKeeper writes these).
///
/// # Errors
/// When the data is not a lymph registration.
pub fn parse_registration(service: &str, id: &str, data: &[u8]) -> Result<Instance, serde_json::Error> {
    serde_json::from_slice::<Registration>(data).map(|reg| Instance::from_registration(service, id, reg))
}

/// Reads every service and instance under `/services`.
///
/// Nodes that vanish while being read are skipped (instances come and go); unparsable registrations are logged
/// and skipped.
///
/// # Errors
/// When listing `/services` fails for another reason than it not existing.
pub async fn scan(client: &zk::Client) -> Result<BTreeMap<String, Vec<Instance>>, ZkError> {
    let services = match client.list_children(SERVICES).await {
        Ok(s) => s,
        Err(zk::Error::NoNode) => return Ok(BTreeMap::new()),
        Err(source) => return Err(ZkError::Request { op: "list", path: SERVICES.into(), source }),
    };
    let listings = join_all(services.iter().map(|name| async move {
        let path = format!("{SERVICES}/{name}");
        (name.clone(), client.list_children(&path).await.unwrap_or_default())
    }))
    .await;
    let reads = listings.iter().flat_map(|(service, ids)| {
        ids.iter().map(move |id| async move {
            let path = format!("{SERVICES}/{service}/{id}");
            let data = client.get_data(&path).await.ok()?.0;
            match parse_registration(service, id, &data) {
                Ok(inst) => Some(inst),
                Err(err) => {
                    warn!(%path, %err, "ignoring a registration that is not lymph's JSON");
                    None
                }
            }
        })
    });
    let instances = join_all(reads).await;
    let mut out: BTreeMap<String, Vec<Instance>> = services.into_iter().map(|s| (s, Vec::new())).collect();
    for inst in instances.into_iter().flatten() {
        out.entry(inst.service.clone()).or_default().push(inst);
    }
    for list in out.values_mut() {
        list.sort_by(|a, b| a.id.cmp(&b.id));
    }
    Ok(out)
}

/// Creates (or replaces) our ephemeral registration at `/services/<service>/<id>`, like lymph's `register`.
///
/// # Errors
/// When ZooKeeper refuses the create.
pub async fn register(client: &zk::Client, service: &str, reg: &Registration) -> Result<String, ZkError> {
    let path = format!("{SERVICES}/{service}/{}", reg.id);
    let data = serde_json::to_vec(reg).expect("registration is plain JSON");
    let parent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    match client.mkdir(&format!("{SERVICES}/{service}"), &parent).await {
        Ok(()) | Err(zk::Error::NodeExists) => {}
        Err(source) => return Err(ZkError::Request { op: "mkdir", path, source }),
    }
    match client.delete(&path, None).await {
        Ok(()) | Err(zk::Error::NoNode) => {}
        Err(source) => return Err(ZkError::Request { op: "delete", path, source }),
    }
    let options = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    client.create(&path, &data, &options).await.map_err(|source| ZkError::Request {
        op: "create",
        path: path.clone(),
        source,
    })?;
    debug!(%path, "registered in ZooKeeper");
    Ok(path)
}

/// Whether our registration node still exists (it vanishes with an expired session).
pub async fn exists(client: &zk::Client, path: &str) -> bool {
    matches!(client.check_stat(path).await, Ok(Some(_)))
}

/// Removes a registration (ours on shutdown, or a killed instance's on request).
pub async fn unregister(client: &zk::Client, path: &str) {
    match client.delete(path, None).await {
        Ok(()) | Err(zk::Error::NoNode) => {}
        Err(err) => warn!(%path, %err, "could not remove registration"),
    }
}

/// A persistent recursive watch on `/services`: every change below it is an event.
///
/// # Errors
/// When the server refuses the watch (ZooKeeper < 3.6).
pub async fn watch_services(client: &zk::Client) -> Result<zk::PersistentWatcher, ZkError> {
    client.watch(SERVICES, zk::AddWatchMode::PersistentRecursive).await.map_err(|source| ZkError::Request {
        op: "watch",
        path: SERVICES.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chroot_defaults_to_lymph_like_lymph_does() {
        assert_eq!(connect_string("127.0.0.1:2181"), "127.0.0.1:2181/lymph");
        assert_eq!(connect_string("a:1,b:2/foo"), "a:1,b:2/foo");
        assert_eq!(connect_string("a:1/"), "a:1/lymph");
    }
}
