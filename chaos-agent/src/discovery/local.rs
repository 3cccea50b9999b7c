//! This host's side of discovery: lymph processes found by their process title, and the pid behind each
//! registered endpoint.
//!
//! lymph sets the title `lymph-instance (identity: <id>, endpoint: <ep>, config: <file>)` (`cli/service.py`).
//! An instance is *local* when a process of this host listens on its endpoint; its pid is the owner of that
//! listening socket, cross-checked against the title's identity so a port reused by another process is not
//! mistaken for the instance.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::IpAddr,
};

use super::{
    instance::{Instance, parse_endpoint, split_endpoint},
    sockets::{self, Listener},
};

/// A lymph process found in `/proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LymphProcess {
    /// Its pid.
    pub(crate) pid: i32,
    /// Container identity from the title.
    pub(crate) identity: String,
    /// RPC endpoint from the title.
    pub(crate) endpoint: String,
    /// The whole title.
    pub(crate) title: String,
}

/// Parses a lymph process title.
pub(crate) fn parse_title(cmdline: &str) -> Option<(String, String)> {
    let rest = cmdline.trim().strip_prefix("lymph-instance (")?;
    let identity = rest.strip_prefix("identity: ")?.split(',').next()?.trim().to_owned();
    let endpoint = rest.split("endpoint: ").nth(1)?.split([',', ')']).next()?.trim().to_owned();
    Some((identity, endpoint))
}

pub(crate) use crate::procinfo::cmdline;

/// The network namespace of a process (`net:[<inode>]`).
fn netns_of(pid: &str) -> Option<std::path::PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/net")).ok()
}

/// Every lymph instance process of this host that shares our network namespace (the only ones whose endpoints
/// and ports mean what they say here: two namespaces can each have a `tcp://127.0.0.1:4242`).
pub(crate) fn lymph_processes() -> Vec<LymphProcess> {
    let ours = netns_of("self");
    sockets::all_pids()
        .into_iter()
        .filter(|pid| ours.is_none() || netns_of(&pid.to_string()) == ours)
        .filter_map(|pid| {
            let title = cmdline(pid)?;
            let (identity, endpoint) = parse_title(&title)?;
            Some(LymphProcess { pid, identity, endpoint, title })
        })
        .collect()
}

pub(crate) use chaos_api::node::local_addresses;

/// A one-shot view of this host, used to resolve many instances at once.
#[derive(Debug, Default)]
pub(crate) struct HostView {
    listeners: Vec<Listener>,
    owners: HashMap<u64, i32>,
    processes: Vec<LymphProcess>,
    addresses: HashSet<IpAddr>,
}

impl HostView {
    /// Reads listening sockets, their owners and lymph processes now.
    pub(crate) fn capture() -> HostView {
        let listeners = sockets::tcp_listeners().unwrap_or_default();
        let processes = lymph_processes();
        let inodes: HashSet<u64> = listeners.iter().map(|l| l.inode).collect();
        let lymph_pids: Vec<i32> = processes.iter().map(|p| p.pid).collect();
        // Only lymph processes' sockets are looked up now; a full /proc scan happens lazily in `owner_of` for
        // endpoints no lymph process holds.
        let owners = sockets::owners_among(&inodes, &lymph_pids);
        HostView { listeners, owners, processes, addresses: local_addresses() }
    }

    /// The lymph processes seen.
    pub(crate) fn processes(&self) -> &[LymphProcess] {
        &self.processes
    }

    /// The listener a connection to `ip:port` would reach, if any.
    pub(crate) fn listener_for(&self, ip: IpAddr, port: u16) -> Option<&Listener> {
        // Prefer an exact address match over a wildcard.
        self.listeners
            .iter()
            .find(|l| l.addr == ip && l.port == port)
            .or_else(|| self.listeners.iter().find(|l| l.accepts(ip, port)))
    }

    /// The pid holding a listening socket.
    pub(crate) fn owner_of(&mut self, listener: &Listener) -> Option<i32> {
        if let Some(pid) = self.owners.get(&listener.inode) {
            return Some(*pid);
        }
        let found = sockets::owners_of(&HashSet::from([listener.inode]), &[]);
        let pid = found.get(&listener.inode).copied()?;
        self.owners.insert(listener.inode, pid);
        Some(pid)
    }

    /// Fills `local`, `pid`, `listening` and `process` of an instance. A host name in its endpoint takes its
    /// address from `names` (answers known now, see [`super::names`]); without one the instance is not here.
    pub(crate) fn resolve(&mut self, inst: &mut Instance, names: &HashMap<String, IpAddr>) {
        inst.local = false;
        inst.pid = None;
        inst.listening = false;
        inst.process = None;
        let found = parse_endpoint(&inst.endpoint).or_else(|| {
            let (host, port) = split_endpoint(&inst.endpoint)?;
            names.get(host).map(|ip| (*ip, port))
        });
        let Some((ip, port)) = found else { return };
        inst.port = Some(port);
        // An endpoint on an address this host does not have cannot be here.
        if !ip.is_unspecified() && !self.addresses.contains(&ip) {
            return;
        }
        // A lymph process whose title names this identity/endpoint is ours even if it has stopped listening
        // (e.g. paused): record it, then confirm with the socket.
        let titled = self
            .processes
            .iter()
            .find(|p| (!inst.identity.is_empty() && p.identity == inst.identity) || p.endpoint == inst.endpoint)
            .cloned();
        let Some(listener) = self.listener_for(ip, port).cloned() else {
            if let Some(p) = titled {
                inst.local = true;
                inst.pid = Some(p.pid);
                inst.process = Some(p.title);
            }
            return;
        };
        inst.listening = true;
        let owner = self.owner_of(&listener);
        match (owner, titled) {
            (Some(pid), Some(p)) if p.pid == pid => {
                inst.local = true;
                inst.pid = Some(pid);
                inst.process = Some(p.title);
            }
            (Some(pid), Some(p)) => {
                // The socket belongs to another process than the titled one (e.g. a child holding a shared
                // socket): trust the title, it names the instance.
                inst.local = true;
                inst.pid = Some(p.pid);
                inst.process = Some(format!("{} (socket also held by pid {pid})", p.title));
            }
            (Some(pid), None) => {
                let title = cmdline(pid);
                // A lymph title with another identity means the port was reused by a different instance.
                if title
                    .as_deref()
                    .and_then(parse_title)
                    .is_some_and(|(id, _)| !inst.identity.is_empty() && id != inst.identity)
                {
                    inst.listening = false;
                    return;
                }
                inst.local = true;
                inst.pid = Some(pid);
                inst.process = title;
            }
            (None, _) => {
                // Listening, but the owner is not visible (another pid namespace): local, pid unknown.
                inst.local = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lymph_process_titles() {
        let t = "lymph-instance (identity: 7a8672c2d7fca24129122c4256a811cf, endpoint: tcp://127.0.0.1:42272, config: .lymph.yml)";
        assert_eq!(parse_title(t), Some(("7a8672c2d7fca24129122c4256a811cf".into(), "tcp://127.0.0.1:42272".into())));
        assert_eq!(parse_title("python3 -m http.server"), None);
        // setproctitle pads with spaces/NULs.
        assert!(parse_title(&format!("{t}      ")).is_some());
    }

    #[test]
    fn resolves_a_process_of_ours_listening_on_an_endpoint() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let reg = super::super::instance::Registration {
            id: "i".into(),
            identity: String::new(),
            version: None,
            endpoint: format!("tcp://127.0.0.1:{port}"),
            log_endpoint: None,
            monitoring_endpoint: None,
            backdoor_endpoint: None,
            fqdn: None,
            hostname: None,
            ip: None,
            worker: None,
            extra: Default::default(),
        };
        let mut inst = Instance::from_registration("X", "i", reg);
        let mut view = HostView::capture();
        view.resolve(&mut inst, &HashMap::new());
        assert!(inst.local && inst.listening);
        assert_eq!(inst.pid, Some(std::process::id() as i32));
        drop(listener);
        let mut view = HostView::capture();
        view.resolve(&mut inst, &HashMap::new());
        assert!(!inst.listening && !inst.local, "{inst:?}");
    }
}
