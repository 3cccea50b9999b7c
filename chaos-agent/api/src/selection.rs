//! Which instances a `Scenario` action hits across hosts: the one definition that both Scenario clients follow.
//!
//! The Rust client (`crate::scenario`) calls [`plan`]; the Python client (`lymph_chaos.scenario.plan`) mirrors it
//! step by step, and a test feeds both the same registry views and seeds and requires identical requests. This
//! module is pure: no I/O, no clock, no global randomness.
//!
//! # Semantics
//!
//! 1. **Service.** The action's name designates a service among every name the agents list
//!    (`Chaos.list_services` of every agent that answered): the name itself, else the only match ignoring ASCII case
//!    (`echo` → `Echo`, as the agents match names), else [`SelectionError::UnknownService`] / [`SelectionError::AmbiguousService`].
//! 2. **Candidates.** Every instance of that service that some agent lists as `local: true`, as the pair
//!    (instance id, agent endpoint). The instance id is lymph's per-instance id (`hash_id(identity, service,
//!    version)`, the registration's znode name): unique per instance of the service, unlike the container identity
//!    that all interfaces of one process share. Instances without an id are left out (they cannot be targeted).
//!    The pairs are sorted by (instance id, agent endpoint); an instance listed as local by more than one agent
//!    keeps only its first pair, so every instance counts once. No candidate: [`SelectionError::NoAgentForService`].
//! 3. **How many** (`n` candidates; one of `count`, `percent`, `all` at most, else
//!    [`SelectionError::BadArguments`]):
//!    - process kinds ([`PROCESS_KINDS`]: kill, terminate, pause): one instance in the whole cluster by default;
//!      `count = c` (an integer ≥ 1) → `min(c, n)`; `percent = p` (`0 < p ≤ 100`) → `clamp(ceil(n·p/100), 1, n)`,
//!      computed in IEEE double as `(n·p)/100`; `all = true` → `n`. Out of range: [`SelectionError::InvalidArgument`].
//!    - network and resource kinds (everything else): every agent with a candidate gets one request with `name=`
//!      (the agent then acts on all its local instances), also with `all = true`; with `count` or `percent` they
//!      are selected over the cluster exactly like process kinds.
//! 4. **Which.** A partial Fisher–Yates shuffle of the candidate list driven by [`SplitMix64`] (a language-neutral
//!    generator, so Python reproduces it bit for bit): for `i` in `0..k`, `j = i + next() % (n − i)`, swap `i` and
//!    `j`; the chosen ones are the first `k`, in that order ([`choose`]). Uniform over instances: a host with 3
//!    instances is 3× as likely to be hit as a host with 1.
//! 5. **Seed.** A scenario has one seed: the one it was given, else a random one, which it logs and exposes so the
//!    run can be replayed. Action `a` (0-based, in queue order) in application round `r` (0-based; every `apply` and
//!    every repeat round that got the agents' listings counts) selects with [`action_seed`]: derived from (seed, `a`)
//!    only for lasting faults, so re-applying them picks the same instances and refreshes the faults instead of
//!    adding new ones; from (seed, `a`, `r`) for instant ones (kill, terminate), so a repeated kill picks anew every
//!    round. An action given its own `seed` option selects with that value in every round.
//! 6. **Sending.** Each chosen instance goes to the agent that lists it, as a request with `instance=<instance id>`
//!    (the agent resolves it to exactly that instance) and without `count`/`percent`/`all`. Fault ids derive from
//!    the action's id ([`fault_id`]): the `k`-th chosen instance (0-based) gets the action's id for `k = 0`,
//!    `<id>.<k>` after, so the same selection sends the same ids again, which the agents treat as a refresh, and
//!    reverting by id finds every fault. Per-host requests (`name=`) all carry the action's id.
//!
//! # Layout
//! [`SplitMix64`], [`choose`], [`action_seed`] (randomness) → [`resolve_service`], [`candidates`] (the registry
//! view) → [`Amount`] (how many) → [`plan`] (the requests) and [`fault_id`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Fault kinds that act on processes: one instance in the whole cluster by default.
pub const PROCESS_KINDS: [&str; 3] = ["kill", "terminate", "pause"];

/// Fault kinds that are over once applied: they select anew every round.
pub const INSTANT_KINDS: [&str; 2] = ["kill", "terminate"];

/// SplitMix64's increment: 2^64 / φ, odd.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 generator (Steele, Lea, Flood 2014): small, fast, and simple enough to reproduce exactly in any
/// language with 64-bit wrapping arithmetic.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting at `seed`.
    pub const fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The next output: `state += γ; z = state; z = (z ^ z>>30)·0xBF58476D1CE4E5B9; z = (z ^ z>>27)·0x94D049BB133111EB;
    /// z ^ z>>31`, all mod 2^64.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The first output of a [`SplitMix64`] started at `seed ^ salt`: one seed from another and a number.
pub fn derive_seed(seed: u64, salt: u64) -> u64 {
    SplitMix64::new(seed ^ salt).next_u64()
}

/// The seed action `action` (0-based, queue order) selects with in round `round` of a scenario seeded with `seed`:
/// `derive_seed(derive_seed(seed, action), round)` for instant kinds, with `round` = 0 for lasting ones (see the
/// module docs, point 5).
pub fn action_seed(seed: u64, action: u64, round: u64, instant: bool) -> u64 {
    derive_seed(derive_seed(seed, action), if instant { round } else { 0 })
}

/// Indices of `k` of `0..n` (`k` ≤ `n`), chosen by a partial Fisher–Yates shuffle driven by [`SplitMix64`] from
/// `seed`, in the order they were drawn.
///
/// # Panics
/// When `k > n`.
pub fn choose(n: usize, k: usize, seed: u64) -> Vec<usize> {
    assert!(k <= n, "cannot choose {k} of {n}");
    let mut rng = SplitMix64::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let left = (n - i) as u64;
        // `left` ≤ n fits a usize, so the remainder does.
        let j = i + (rng.next_u64() % left) as usize;
        order.swap(i, j);
    }
    order.truncate(k);
    order
}

/// One instance in an agent's `Chaos.list_services` answer, as far as selection cares (other fields are ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    /// lymph's instance id (empty when the registration had none).
    #[serde(default)]
    pub id: String,
    /// Whether the instance runs on the listing agent's host.
    #[serde(default)]
    pub local: bool,
}

/// Every agent's `Chaos.list_services` answer: agent endpoint → service name → instances.
pub type RegistryView = BTreeMap<String, BTreeMap<String, Vec<Listed>>>;

/// One candidate: an instance and the agent whose host runs it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Candidate {
    /// The instance id.
    pub instance: String,
    /// The endpoint of the agent that lists it as local.
    pub agent: String,
}

/// Why an action cannot be planned.
#[derive(Clone, Debug, PartialEq)]
pub enum SelectionError {
    /// No agent lists a service of that name.
    UnknownService {
        /// The name asked for.
        name: String,
        /// Every service name the agents list.
        known: Vec<String>,
    },
    /// Several services match the name ignoring case, none exactly.
    AmbiguousService {
        /// The name asked for.
        name: String,
        /// The names it matches.
        matches: Vec<String>,
    },
    /// The service is listed, but no agent has an instance of it on its own host.
    NoAgentForService {
        /// The resolved service name.
        service: String,
    },
    /// `count`, `percent` and `all` combined, or given a value of the wrong type.
    BadArguments(String),
    /// `count` or `percent` out of range.
    InvalidArgument(String),
}

impl std::fmt::Display for SelectionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SelectionError::UnknownService { name, known } => {
                let known = if known.is_empty() { "none".into() } else { known.join(", ") };
                write!(f, "unknown service `{name}`: no Chaos agent lists it; known services: {known}")
            }
            SelectionError::AmbiguousService { name, matches } => write!(
                f,
                "service name `{name}` is ambiguous: it matches {} (ignoring case); use the exact name",
                matches.join(", ")
            ),
            SelectionError::NoAgentForService { service } => write!(
                f,
                "service {service} is registered but no Chaos agent has a running instance of it on its own host"
            ),
            SelectionError::BadArguments(why) | SelectionError::InvalidArgument(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for SelectionError {}

/// The service `name` designates among `known`: itself, else the only match ignoring ASCII case.
///
/// # Errors
/// [`SelectionError::UnknownService`] without a match, [`SelectionError::AmbiguousService`] with several.
pub fn resolve_service<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Result<String, SelectionError> {
    let known: BTreeSet<&str> = known.into_iter().collect();
    if known.contains(name) {
        return Ok(name.to_owned());
    }
    let matches: Vec<String> = known.iter().filter(|k| k.eq_ignore_ascii_case(name)).map(|k| (*k).to_owned()).collect();
    match matches.len() {
        1 => Ok(matches.into_iter().next().expect("one match")),
        0 => Err(SelectionError::UnknownService {
            name: name.to_owned(),
            known: known.into_iter().map(str::to_owned).collect(),
        }),
        _ => Err(SelectionError::AmbiguousService { name: name.to_owned(), matches }),
    }
}

/// The candidates for `service` in `view`: sorted by (instance id, agent), each instance once (module docs, point 2).
pub fn candidates(view: &RegistryView, service: &str) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = view
        .iter()
        .flat_map(|(agent, services)| {
            services
                .get(service)
                .into_iter()
                .flatten()
                .filter(|i| i.local && !i.id.is_empty())
                .map(|i| Candidate { instance: i.id.clone(), agent: agent.clone() })
        })
        .collect();
    all.sort();
    all.dedup_by(|later, first| later.instance == first.instance);
    all
}

/// How many instances an action asks for (module docs, point 3).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    /// No `count`, `percent` or `all`.
    Default,
    /// `count = c`.
    Count(u64),
    /// `percent = p`.
    Percent(f64),
    /// `all = true`.
    All,
}

impl Amount {
    /// The amount from an action's options (`all = false` is no option).
    ///
    /// # Errors
    /// [`SelectionError::BadArguments`] for more than one option, [`SelectionError::InvalidArgument`] for a count
    /// below 1 or a percentage outside (0, 100].
    pub fn from_options(count: Option<i64>, percent: Option<f64>, all: bool) -> Result<Amount, SelectionError> {
        match (count, percent, all) {
            (Some(_), Some(_), _) | (Some(_), _, true) | (_, Some(_), true) => {
                Err(SelectionError::BadArguments("give one of count, percent, all".into()))
            }
            (Some(c), None, false) => u64::try_from(c)
                .ok()
                .filter(|c| *c >= 1)
                .map(Amount::Count)
                .ok_or_else(|| SelectionError::InvalidArgument(format!("count must be at least 1, got {c}"))),
            (None, Some(p), false) if p > 0.0 && p <= 100.0 => Ok(Amount::Percent(p)),
            (None, Some(p), false) => {
                Err(SelectionError::InvalidArgument(format!("percent must be in (0, 100], got {p}")))
            }
            (None, None, true) => Ok(Amount::All),
            (None, None, false) => Ok(Amount::Default),
        }
    }

    /// How many of `n` candidates to choose (for `n` ≥ 1: at least 1, at most `n`); `None`: one request per hosting
    /// agent instead (network and resource kinds without `count` or `percent`).
    pub fn instances(self, n: usize, process_kind: bool) -> Option<usize> {
        match self {
            Amount::Default | Amount::All if !process_kind => None,
            Amount::Default => Some(n.min(1)),
            Amount::Count(c) => Some(usize::try_from(c).unwrap_or(usize::MAX).min(n)),
            // `as` saturates; the clamp bounds it anyway.
            Amount::Percent(p) => Some(((n as f64 * p / 100.0).ceil() as usize).clamp(n.min(1), n)),
            Amount::All => Some(n),
        }
    }
}

/// Whether `kind` acts on processes (module docs, point 3).
pub fn is_process_kind(kind: &str) -> bool {
    PROCESS_KINDS.contains(&kind)
}

/// Whether `kind` is over once applied (module docs, point 5).
pub fn is_instant_kind(kind: &str) -> bool {
    INSTANT_KINDS.contains(&kind)
}

/// What one request targets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `name=<service>`: every local instance of the service on the agent's host.
    Name(String),
    /// `instance=<instance id>`: exactly that instance.
    Instance(String),
}

/// One request of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The agent to send it to.
    pub agent: String,
    /// What it targets.
    pub target: Target,
    /// Its fault id.
    pub id: String,
}

/// The fault id of the `k`-th chosen instance (0-based) of an action with id `base` (module docs, point 6).
pub fn fault_id(base: &str, k: usize) -> String {
    if k == 0 { base.to_owned() } else { format!("{base}.{k}") }
}

/// Where an action goes: the requests for an action named `name` of fault `kind`, asking for `amount`, with fault
/// id `id`, given every agent's services, selecting with `seed` (the module docs define every step).
///
/// # Errors
/// Unknown or ambiguous service, no agent hosting it.
pub fn plan(
    view: &RegistryView,
    name: &str,
    kind: &str,
    amount: Amount,
    seed: u64,
    id: &str,
) -> Result<Vec<Request>, SelectionError> {
    let service = resolve_service(name, view.values().flat_map(|services| services.keys().map(String::as_str)))?;
    let candidates = candidates(view, &service);
    if candidates.is_empty() {
        return Err(SelectionError::NoAgentForService { service });
    }
    let Some(k) = amount.instances(candidates.len(), is_process_kind(kind)) else {
        let agents: BTreeSet<&String> = candidates.iter().map(|c| &c.agent).collect();
        return Ok(agents
            .into_iter()
            .map(|agent| Request { agent: agent.clone(), target: Target::Name(service.clone()), id: id.to_owned() })
            .collect());
    };
    Ok(choose(candidates.len(), k, seed)
        .into_iter()
        .enumerate()
        .map(|(slot, i)| Request {
            agent: candidates[i].agent.clone(),
            target: Target::Instance(candidates[i].instance.clone()),
            id: fault_id(id, slot),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(id: &str, local: bool) -> Listed {
        Listed { id: id.into(), local }
    }

    /// Three agents; `Echo` with 3 instances on a, 1 on b, none on c; `Demo` with 1 on c.
    fn view() -> RegistryView {
        let mut view = RegistryView::new();
        let echo_everywhere = |local_on: &[&str]| {
            ["e1", "e2", "e3", "e4"].iter().map(|id| listed(id, local_on.contains(id))).collect::<Vec<_>>()
        };
        view.insert(
            "tcp://a:4575".into(),
            [("Echo".to_owned(), echo_everywhere(&["e1", "e2", "e3"])), ("Demo".into(), vec![listed("d1", false)])]
                .into(),
        );
        view.insert(
            "tcp://b:4575".into(),
            [("Echo".to_owned(), echo_everywhere(&["e4"])), ("Demo".into(), vec![listed("d1", false)])].into(),
        );
        view.insert(
            "tcp://c:4575".into(),
            [("Echo".to_owned(), echo_everywhere(&[])), ("Demo".into(), vec![listed("d1", true)])].into(),
        );
        view
    }

    #[test]
    fn splitmix64_matches_the_reference_outputs() {
        // Reference: Vigna's splitmix64.c started at 1234567 prints these first five outputs.
        let mut rng = SplitMix64::new(1_234_567);
        let outputs: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
        assert_eq!(
            outputs,
            [
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423,
                4_593_380_528_125_082_431,
                16_408_922_859_458_223_821,
            ]
        );
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn choose_is_a_seeded_partial_permutation() {
        for seed in 0..200 {
            for n in 0..7 {
                for k in 0..=n {
                    let chosen = choose(n, k, seed);
                    assert_eq!(chosen.len(), k);
                    assert!(chosen.iter().all(|i| *i < n));
                    assert_eq!(chosen.iter().collect::<BTreeSet<_>>().len(), k, "distinct");
                    assert_eq!(chosen, choose(n, k, seed), "same seed, same choice");
                    // A prefix: choosing fewer draws the same first ones.
                    assert_eq!(choose(n, k.saturating_sub(1), seed), chosen[..k.saturating_sub(1)]);
                }
            }
        }
        let distinct: BTreeSet<Vec<usize>> = (0..50).map(|seed| choose(10, 3, seed)).collect();
        assert!(distinct.len() > 40, "seeds explore different choices: {}", distinct.len());
    }

    #[test]
    fn choose_is_uniform_over_positions() {
        // 20 000 seeds, 1 of 5: each position ~4000 (σ ≈ 57); 2 of 5: each ~8000.
        for (k, expected) in [(1, 4000), (2, 8000)] {
            let mut hits = [0u32; 5];
            for seed in 0..20_000 {
                for i in choose(5, k, derive_seed(seed, 99)) {
                    hits[i] += 1;
                }
            }
            assert!(hits.iter().all(|h| h.abs_diff(expected) < 300), "k={k}: {hits:?}");
        }
    }

    #[test]
    fn candidates_are_local_sorted_and_each_instance_once() {
        let mut v = view();
        // The same instance listed as local by two agents (two agents on one host) counts once, for the first agent.
        v.get_mut("tcp://c:4575").unwrap().get_mut("Echo").unwrap()[0].local = true;
        v.get_mut("tcp://a:4575").unwrap().get_mut("Echo").unwrap().push(listed("", true));
        let got: Vec<(String, String)> =
            candidates(&v, "Echo").into_iter().map(|c| (c.instance, c.agent.replace("tcp://", ""))).collect();
        let want = [("e1", "a:4575"), ("e2", "a:4575"), ("e3", "a:4575"), ("e4", "b:4575")];
        assert_eq!(got, want.map(|(i, a)| (i.to_owned(), a.to_owned())));
        assert!(candidates(&v, "Nope").is_empty());
    }

    #[test]
    fn amounts_are_bounded() {
        let amount = |c, p, a| Amount::from_options(c, p, a);
        assert_eq!(amount(None, None, false).unwrap().instances(4, true), Some(1));
        assert_eq!(amount(None, None, false).unwrap().instances(4, false), None);
        assert_eq!(amount(None, None, true).unwrap().instances(4, true), Some(4));
        assert_eq!(amount(None, None, true).unwrap().instances(4, false), None);
        assert_eq!(amount(Some(3), None, false).unwrap().instances(4, false), Some(3));
        assert_eq!(amount(Some(9), None, false).unwrap().instances(4, true), Some(4));
        assert_eq!(amount(None, Some(25.0), false).unwrap().instances(4, true), Some(1));
        assert_eq!(amount(None, Some(26.0), false).unwrap().instances(4, true), Some(2));
        assert_eq!(amount(None, Some(0.1), false).unwrap().instances(4, true), Some(1));
        assert_eq!(amount(None, Some(100.0), false).unwrap().instances(4, true), Some(4));
        assert_eq!(amount(None, Some(50.0), false).unwrap().instances(4, false), Some(2));
        assert!(matches!(amount(Some(0), None, false), Err(SelectionError::InvalidArgument(_))));
        assert!(matches!(amount(Some(-2), None, false), Err(SelectionError::InvalidArgument(_))));
        assert!(matches!(amount(None, Some(0.0), false), Err(SelectionError::InvalidArgument(_))));
        assert!(matches!(amount(None, Some(100.5), false), Err(SelectionError::InvalidArgument(_))));
        assert!(matches!(amount(None, Some(f64::NAN), false), Err(SelectionError::InvalidArgument(_))));
        assert!(matches!(amount(Some(1), Some(5.0), false), Err(SelectionError::BadArguments(_))));
        assert!(matches!(amount(Some(1), None, true), Err(SelectionError::BadArguments(_))));
        assert!(matches!(amount(None, Some(5.0), true), Err(SelectionError::BadArguments(_))));
    }

    #[test]
    fn process_kinds_hit_one_instance_in_the_cluster_by_default() {
        let v = view();
        let requests = plan(&v, "echo", "kill", Amount::Default, 7, "sn-x-1").unwrap();
        assert_eq!(requests.len(), 1);
        let r = &requests[0];
        assert_eq!(r.id, "sn-x-1");
        let Target::Instance(instance) = &r.target else { panic!("{r:?}") };
        let want_agent = if instance == "e4" { "tcp://b:4575" } else { "tcp://a:4575" };
        assert_eq!(r.agent, want_agent, "sent to the agent hosting it");
        assert_eq!(requests, plan(&v, "Echo", "kill", Amount::Default, 7, "sn-x-1").unwrap(), "replayable");
    }

    #[test]
    fn the_default_is_uniform_over_instances_not_hosts() {
        // Echo: 3 instances on a, 1 on b. Over 8000 seeds a is hit ~6000 times (σ ≈ 39), b ~2000.
        let v = view();
        let mut per_instance = BTreeMap::<String, u32>::new();
        for seed in 0..8000 {
            let r = plan(&v, "Echo", "pause", Amount::Default, derive_seed(seed, 1), "i").unwrap();
            let Target::Instance(instance) = &r[0].target else { panic!() };
            *per_instance.entry(instance.clone()).or_default() += 1;
        }
        assert!(per_instance.values().all(|n| n.abs_diff(2000) < 200), "{per_instance:?}");
    }

    #[test]
    fn counts_and_percentages_are_cluster_wide() {
        let v = view();
        for seed in 0..100 {
            let r = plan(&v, "Echo", "kill", Amount::Count(2), seed, "i").unwrap();
            assert_eq!(r.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["i", "i.1"]);
            let instances: BTreeSet<&Target> = r.iter().map(|r| &r.target).collect();
            assert_eq!(instances.len(), 2, "two different instances: {r:?}");
            // Network kinds select the same way once a count is given.
            let net = plan(&v, "Echo", "latency", Amount::Count(2), seed, "i").unwrap();
            assert_eq!(net, r);
        }
        assert_eq!(plan(&v, "Echo", "kill", Amount::Count(9), 1, "i").unwrap().len(), 4);
        assert_eq!(plan(&v, "Echo", "terminate", Amount::Percent(50.0), 1, "i").unwrap().len(), 2);
        let all = plan(&v, "Echo", "pause", Amount::All, 1, "i").unwrap();
        let mut targets: Vec<String> = all
            .iter()
            .map(|r| match &r.target {
                Target::Instance(i) => i.clone(),
                Target::Name(_) => panic!("{r:?}"),
            })
            .collect();
        targets.sort();
        assert_eq!(targets, ["e1", "e2", "e3", "e4"]);
    }

    #[test]
    fn network_and_resource_kinds_go_to_every_hosting_agent_by_default() {
        let v = view();
        for (kind, amount) in [("latency", Amount::Default), ("blackhole", Amount::All), ("cpu", Amount::Default)] {
            let r = plan(&v, "ECHO", kind, amount, 3, "sn-x-2").unwrap();
            let want: Vec<Request> = ["tcp://a:4575", "tcp://b:4575"]
                .map(|a| Request { agent: a.into(), target: Target::Name("Echo".into()), id: "sn-x-2".into() })
                .into();
            assert_eq!(r, want);
        }
        let demo = plan(&v, "demo", "loss", Amount::Default, 3, "d").unwrap();
        assert_eq!(
            demo,
            [Request { agent: "tcp://c:4575".into(), target: Target::Name("Demo".into()), id: "d".into() }]
        );
    }

    #[test]
    fn unroutable_actions_say_why() {
        let mut v = view();
        assert!(matches!(
            plan(&v, "nope", "kill", Amount::Default, 1, "i"),
            Err(SelectionError::UnknownService { .. })
        ));
        v.get_mut("tcp://c:4575").unwrap().insert("ECHO".into(), vec![listed("x", true)]);
        assert!(matches!(
            plan(&v, "echo", "kill", Amount::Default, 1, "i"),
            Err(SelectionError::AmbiguousService { .. })
        ));
        assert_eq!(plan(&v, "ECHO", "kill", Amount::Default, 1, "i").unwrap()[0].target, Target::Instance("x".into()));
        let nobody: RegistryView =
            [("tcp://a:1".to_owned(), [("Echo".to_owned(), vec![listed("e1", false)])].into())].into();
        assert_eq!(
            plan(&nobody, "Echo", "kill", Amount::Default, 1, "i"),
            Err(SelectionError::NoAgentForService { service: "Echo".into() })
        );
    }

    #[test]
    fn lasting_faults_keep_their_seed_across_rounds_and_kills_do_not() {
        assert_eq!(action_seed(5, 0, 0, false), action_seed(5, 0, 9, false));
        assert_ne!(action_seed(5, 0, 0, true), action_seed(5, 0, 1, true));
        assert_ne!(action_seed(5, 0, 0, true), action_seed(5, 1, 0, true), "actions select independently");
        assert_eq!(action_seed(5, 0, 0, true), action_seed(5, 0, 0, false), "round 0 is the same for both");
    }
}
