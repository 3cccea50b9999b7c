//! Host names in registered endpoints, resolved without ever making discovery wait for DNS.
//!
//! An endpoint normally carries an address (`tcp://10.0.0.5:4242`), but ZeroMQ also accepts a host name there.
//! Resolving a name blocks for as long as the system resolver takes — with an unreachable DNS server, `timeout ×
//! attempts` seconds per name — and the names come from the registry: anyone who can write to ZooKeeper chooses
//! them. So a scan never waits for one. It uses the answer cached for each name; a name without an answer yet
//! counts as *not on this host* (so it is never a target) until a lookup in the background answers, which asks
//! discovery for a rescan.
//!
//! Bounds: at most [`MAX_IN_FLIGHT`] lookups at once, each on its own thread outside the async runtime; at most
//! [`MAX_NAMES`] names remembered (names of instances no longer registered are forgotten at the next scan);
//! answers are used for [`FRESH`] and then looked up again in the background while the old answer still serves;
//! a failed lookup is retried after [`RETRY`].

use std::{
    collections::HashMap,
    net::{IpAddr, ToSocketAddrs},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tracing::{debug, warn};

use super::instance::{parse_endpoint, split_endpoint};

/// Lookups running at once.
pub(crate) const MAX_IN_FLIGHT: usize = 4;
/// Names remembered.
pub(crate) const MAX_NAMES: usize = 1024;
/// How long an answer is used before it is refreshed.
pub(crate) const FRESH: Duration = Duration::from_secs(60);
/// How long after a failed lookup the name is tried again.
pub(crate) const RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Entry {
    /// The last answer (the first address the resolver gave).
    answer: Option<IpAddr>,
    /// When the last lookup finished.
    at: Option<Instant>,
    /// A lookup is running.
    pending: bool,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    in_flight: usize,
    warned_full: bool,
}

/// The cache of host-name answers (see the module docs).
#[derive(Debug)]
pub(crate) struct HostNames {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    lookup: fn(&str) -> Option<IpAddr>,
}

/// The system resolver (`getaddrinfo`: /etc/hosts, DNS …): the first address it gives.
fn system_lookup(name: &str) -> Option<IpAddr> {
    (name, 0).to_socket_addrs().ok().and_then(|mut addrs| addrs.next()).map(|a| a.ip())
}

impl HostNames {
    /// A cache whose background lookups call `wake.notify_one()` when a name gets a new answer.
    pub(crate) fn new(wake: Arc<Notify>) -> HostNames {
        HostNames::with_lookup(wake, system_lookup)
    }

    fn with_lookup(wake: Arc<Notify>, lookup: fn(&str) -> Option<IpAddr>) -> HostNames {
        HostNames { state: Arc::new(Mutex::new(State::default())), wake, lookup }
    }

    /// The answers known now for the host names among `endpoints` (endpoints with an address need none); starts
    /// lookups for names without a fresh answer, and forgets names not among `endpoints`. Never blocks on DNS.
    pub(crate) fn answers<'a>(&self, endpoints: impl IntoIterator<Item = &'a str>) -> HashMap<String, IpAddr> {
        let mut names: Vec<&str> = endpoints
            .into_iter()
            .filter(|ep| parse_endpoint(ep).is_none())
            .filter_map(|ep| split_endpoint(ep).map(|(host, _)| host))
            .filter(|host| !host.is_empty())
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut state = self.state.lock().expect("poisoned");
        state.entries.retain(|name, entry| entry.pending || names.binary_search(&name.as_str()).is_ok());
        let mut out = HashMap::new();
        let now = Instant::now();
        for name in names {
            if !state.entries.contains_key(name) {
                if state.entries.len() >= MAX_NAMES {
                    if !state.warned_full {
                        warn!(
                            max = MAX_NAMES,
                            "too many host names in registered endpoints; the rest count as not on this host"
                        );
                        state.warned_full = true;
                    }
                    continue;
                }
                state.entries.insert(name.to_owned(), Entry::default());
            }
            let entry = state.entries.get(name).expect("inserted");
            if let Some(ip) = entry.answer {
                out.insert(name.to_owned(), ip);
            }
            let due = match (entry.at, entry.answer) {
                (None, _) => true,
                (Some(at), Some(_)) => now.duration_since(at) >= FRESH,
                (Some(at), None) => now.duration_since(at) >= RETRY,
            };
            if due && !entry.pending && state.in_flight < MAX_IN_FLIGHT {
                self.start_lookup(&mut state, name);
            }
        }
        out
    }

    fn start_lookup(&self, state: &mut State, name: &str) {
        let shared = Arc::clone(&self.state);
        let wake = Arc::clone(&self.wake);
        let owned = name.to_owned();
        let lookup = self.lookup;
        let spawned = std::thread::Builder::new().name("chaos-dns".into()).spawn(move || {
            let answer = lookup(&owned);
            debug!(name = %owned, ?answer, "host name looked up");
            let mut state = shared.lock().expect("poisoned");
            state.in_flight -= 1;
            let changed = if let Some(entry) = state.entries.get_mut(&owned) {
                let changed = answer.is_some() && entry.answer != answer;
                entry.pending = false;
                entry.at = Some(Instant::now());
                entry.answer = answer;
                changed
            } else {
                false
            };
            drop(state);
            if changed {
                wake.notify_one();
            }
        });
        if spawned.is_ok() {
            state.in_flight += 1;
            let entry = state.entries.get_mut(name).expect("present");
            entry.pending = true;
        } else if let Some(entry) = state.entries.get_mut(name) {
            entry.at = Some(Instant::now());
        }
    }

    /// Lookups running now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.state.lock().expect("poisoned").in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("not reached within 5 s: {what}");
    }

    #[test]
    fn addresses_need_no_lookup_and_names_are_answered_in_the_background() {
        let wake = Arc::new(Notify::new());
        let names = HostNames::new(wake.clone());
        let first = names.answers(["tcp://127.0.0.1:1", "tcp://[::1]:2", "tcp://localhost:3", "tcp://localhost:4"]);
        // Never waits: the first scan has no answer for the name yet.
        assert!(first.is_empty(), "{first:?}");
        eventually("localhost resolved", || names.answers(["tcp://localhost:3"]).contains_key("localhost"));
        let ip = names.answers(["tcp://localhost:3"])["localhost"];
        assert!(ip.is_loopback(), "{ip}");
        assert_eq!(names.in_flight(), 0);
    }

    /// A resolver that takes a while and knows nothing.
    fn slow_nothing(_: &str) -> Option<IpAddr> {
        std::thread::sleep(Duration::from_millis(200));
        None
    }

    #[test]
    fn names_no_longer_registered_are_forgotten_and_the_cache_is_bounded() {
        let names = HostNames::with_lookup(Arc::new(Notify::new()), slow_nothing);
        let many: Vec<String> = (0..MAX_NAMES + 50).map(|i| format!("tcp://h{i}.invalid:1")).collect();
        names.answers(many.iter().map(String::as_str));
        {
            let state = names.state.lock().unwrap();
            assert_eq!(state.entries.len(), MAX_NAMES);
            assert!(state.in_flight <= MAX_IN_FLIGHT);
        }
        // A second scan while the lookups run starts no more of them.
        names.answers(many.iter().map(String::as_str));
        assert!(names.in_flight() <= MAX_IN_FLIGHT);
        eventually("lookups finished", || names.in_flight() == 0);
        // A failed name is not retried before RETRY.
        let tried: Vec<String> = {
            let state = names.state.lock().unwrap();
            state.entries.iter().filter(|(_, e)| e.at.is_some()).map(|(n, _)| format!("tcp://{n}:1")).collect()
        };
        assert_eq!(tried.len(), MAX_IN_FLIGHT);
        names.answers(tried.iter().map(String::as_str));
        assert_eq!(names.in_flight(), 0);
        names.answers(["tcp://127.0.0.1:1"]);
        assert!(names.state.lock().unwrap().entries.is_empty());
    }
}
