//! The `Chaos` methods: names, keyword parameters and help, as `lymph inspect Chaos` lists them.

use std::sync::LazyLock;

/// Parameters naming a target (at most one per request).
pub(crate) const TARGETING: &[&str] = &["name", "instance", "pid", "port", "process"];
/// Parameters every fault request takes.
pub(crate) const COMMON: &[&str] = &["lifetime", "dry_run", "seed", "id", "count", "percent", "all"];
/// Parameters of network faults.
pub(crate) const NETWORK: &[&str] = &[
    "latency",
    "delay",
    "jitter",
    "correlation",
    "distribution",
    "loss",
    "duplicate",
    "corrupt",
    "reorder",
    "reorder_correlation",
    "rate",
    "direction",
    "protocol",
    "peer",
    "peer_host",
    "peer_cidr",
];
/// Parameters of resource faults.
pub(crate) const RESOURCE: &[&str] = &[
    "workers",
    "percent_cores",
    "load",
    "in_target_cgroup",
    "mib",
    "percent_available",
    "path",
    "percent_free",
    "floor_percent",
];

/// One RPC method as `lymph.inspect` lists it.
#[derive(Clone, Debug)]
pub struct MethodInfo {
    /// Method name without the interface (`kill`).
    pub name: &'static str,
    /// Keyword parameters, in declaration order.
    pub params: &'static [&'static str],
    /// Help text (shown by `lymph inspect`).
    pub help: &'static str,
}

/// The methods of the `Chaos` interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// `Chaos.clear`: revert every active fault.
    Clear,
    /// `Chaos.events`: recorded events.
    Events,
    /// `Chaos.faults`: active faults with live counters.
    Faults,
    /// `Chaos.inject`: a fault of any kind.
    Inject,
    /// `Chaos.inject_latency`: the 2015 latency call.
    InjectLatency,
    /// `Chaos.kill`: signal instances.
    Kill,
    /// `Chaos.leash`: stop unleashed mode.
    Leash,
    /// `Chaos.list_services`: services and instances the agent sees.
    ListServices,
    /// `Chaos.pause`: SIGSTOP for a while.
    Pause,
    /// `Chaos.revert`: revert one fault.
    Revert,
    /// `Chaos.status`: the agent's state.
    Status,
    /// `Chaos.terminate`: SIGTERM, then SIGKILL.
    Terminate,
    /// `Chaos.unleash`: start unleashed mode.
    Unleash,
}

fn concat(groups: &[&[&'static str]]) -> &'static [&'static str] {
    let v: Vec<&'static str> = groups.iter().flat_map(|g| g.iter().copied()).collect();
    Box::leak(v.into_boxed_slice())
}

static INJECT_PARAMS: LazyLock<&'static [&'static str]> =
    LazyLock::new(|| concat(&[TARGETING, COMMON, NETWORK, RESOURCE, &["kind", "signal", "deregister"]]));
static INJECT_LATENCY_PARAMS: LazyLock<&'static [&'static str]> = LazyLock::new(|| {
    concat(&[TARGETING, COMMON, &["latency", "jitter", "correlation", "distribution", "direction", "protocol"]])
});
static KILL_PARAMS: LazyLock<&'static [&'static str]> =
    LazyLock::new(|| concat(&[TARGETING, COMMON, &["signal", "deregister"]]));
static PROCESS_PARAMS: LazyLock<&'static [&'static str]> = LazyLock::new(|| concat(&[TARGETING, COMMON]));
static INFOS: LazyLock<Vec<MethodInfo>> = LazyLock::new(|| Method::ALL.iter().map(|m| m.info()).collect());

impl Method {
    /// Every method, in the order `lymph inspect` lists them.
    pub const ALL: &'static [Method] = &[
        Method::Clear,
        Method::Events,
        Method::Faults,
        Method::Inject,
        Method::InjectLatency,
        Method::Kill,
        Method::Leash,
        Method::ListServices,
        Method::Pause,
        Method::Revert,
        Method::Status,
        Method::Terminate,
        Method::Unleash,
    ];

    /// The method name without the interface (`inject_latency`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Clear => "clear",
            Method::Events => "events",
            Method::Faults => "faults",
            Method::Inject => "inject",
            Method::InjectLatency => "inject_latency",
            Method::Kill => "kill",
            Method::Leash => "leash",
            Method::ListServices => "list_services",
            Method::Pause => "pause",
            Method::Revert => "revert",
            Method::Status => "status",
            Method::Terminate => "terminate",
            Method::Unleash => "unleash",
        }
    }

    /// The method with this name.
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.iter().copied().find(|m| m.name() == name)
    }

    /// The RPC subject, `Chaos.<name>`.
    pub fn subject(self) -> String {
        format!("{}.{}", crate::SERVICE_NAME, self.name())
    }

    /// Its keyword parameters, in declaration order.
    pub fn params(self) -> &'static [&'static str] {
        match self {
            Method::Clear | Method::Leash | Method::ListServices | Method::Status => &[],
            Method::Events => &["since", "limit"],
            Method::Faults => &["all"],
            Method::Inject => &INJECT_PARAMS,
            Method::InjectLatency => &INJECT_LATENCY_PARAMS,
            Method::Kill => &KILL_PARAMS,
            Method::Pause | Method::Terminate => &PROCESS_PARAMS,
            Method::Revert => &["id"],
            Method::Unleash => &["seed", "mean_interval", "min_gap", "dry_run"],
        }
    }

    /// Its help text (shown by `lymph inspect Chaos`).
    pub fn help(self) -> &'static str {
        match self {
            Method::Clear => "Revert every active fault. Returns the reverted faults.",
            Method::Events => {
                "Recorded events (applied, reverted, expired, refused, warnings, dry runs, agent start/stop) with seq > since \
                 (default 0), at most limit (default 100), oldest first."
            }
            Method::Faults => {
                "Active faults with live counters (packets, bytes, drops), the observed effect of network faults \
                 (observed: added delay, loss, verdict) or resource usage; all=true adds recently finished ones."
            }
            Method::Inject => {
                "Inject a fault of `kind`: latency, loss, duplicate, corrupt, reorder, rate, blackhole (network, on the \
                 target's ports: latency/delay/jitter in seconds, percentages 0-100, rate like \"1mbit\" or bytes/s, \
                 direction to|from|both, protocol tcp|udp|both, default: what the port listens on; peer=<service>, \
                 peer_host or peer_cidr: only the traffic between the target and that caller), observe (count packets only), cpu (workers|percent_cores, load), memory \
                 (mib|percent_available), disk (path, mib|percent_free, floor_percent), kill, terminate, pause. Target \
                 with name (lymph service), instance, pid, port or process (text or /regex/); lifetime in seconds."
            }
            Method::InjectLatency => {
                "Delay packets to a service's ports by `latency` seconds (default 1) for `lifetime` seconds. Without a \
                 target: every lymph service on this host (the 2015 behaviour)."
            }
            Method::Kill => {
                "Kill instances of a lymph service (name) or any allowed process (pid, port, process) with `signal` \
                 (default SIGKILL): one at random (seeded) unless count, percent or all=true. deregister=true also \
                 removes the instance from ZooKeeper at once."
            }
            Method::Leash => "Stop unleashed mode (faults it started run out their lifetime).",
            Method::ListServices => {
                "Every service seen (ZooKeeper and local lymph processes) with its instances; local ones carry their pid."
            }
            Method::Pause => {
                "Stop (SIGSTOP) instances for `lifetime` seconds, then resume them (SIGCONT) automatically."
            }
            Method::Revert => "Revert one active fault by id.",
            Method::Status => {
                "The agent: version, endpoint, ZooKeeper state, dry run, unleashed, network support, active faults."
            }
            Method::Terminate => {
                "SIGTERM instances, then SIGKILL those still running after the configured grace period."
            }
            Method::Unleash => {
                "Start unleashed mode: faults from the configured menu at random times (mean_interval, min_gap in \
                 seconds). The seed is recorded; the same seed replays the same choices."
            }
        }
    }

    /// Name, parameters and help together.
    pub fn info(self) -> MethodInfo {
        MethodInfo { name: self.name(), params: self.params(), help: self.help() }
    }

    /// The table of every method, for `lymph.inspect`.
    pub fn infos() -> &'static [MethodInfo] {
        &INFOS
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a keyword parameter takes, for `api.json` and generated documentation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParamDoc {
    /// The parameter.
    pub(crate) name: &'static str,
    /// Its type: `str`, `int`, `float`, `bool`, `seconds` (a number, or text with ms/s/m/h), `percent` (0–100),
    /// `rate` (bytes/s, or text with tc units), `signal` (name or number), or `a|b|c` (one of these words).
    pub(crate) ty: &'static str,
    /// Its default (JSON), when it has one that is not "absent".
    pub(crate) default: Option<&'static str>,
    /// What it means.
    pub(crate) help: &'static str,
}

const fn p(name: &'static str, ty: &'static str, default: Option<&'static str>, help: &'static str) -> ParamDoc {
    ParamDoc { name, ty, default, help }
}

/// Every parameter of every method (a name means the same wherever it appears, except where noted).
pub(crate) const PARAM_DOCS: &[ParamDoc] = &[
    p("name", "str", None, "lymph service name (exact, else a unique case-insensitive match)"),
    p("instance", "str", None, "instance id or container identity"),
    p("pid", "int", None, "process id"),
    p("port", "int", None, "port (whatever listens there; for network faults the port itself), 1-65535"),
    p("process", "str", None, "processes whose command line contains this text, or matches /regex/"),
    p("lifetime", "seconds", None, "how long the fault lasts (default and maximum from the agent's configuration)"),
    p("dry_run", "bool", Some("false"), "only report what would be done"),
    p("seed", "int", None, "seed of the random choices (random and recorded when absent)"),
    p("id", "str", None, "fault id for faults, or the fault to revert; applying an id again refreshes that fault"),
    p("count", "int", None, "hit this many targets (at least 1)"),
    p("percent", "float", None, "hit this percentage of the targets (at least one)"),
    p("all", "bool", Some("false"), "hit every target; for Chaos.faults: include recently finished faults"),
    p("latency", "seconds", None, "added delay (Chaos.inject_latency: default 1)"),
    p("delay", "seconds", None, "another name for latency"),
    p("jitter", "seconds", Some("0"), "jitter around the delay"),
    p("correlation", "percent", Some("0"), "correlation of successive delays"),
    p("distribution", "uniform|normal|pareto|paretonormal", None, "jitter distribution (needs a jitter)"),
    p("loss", "percent", Some("0"), "packets dropped"),
    p("duplicate", "percent", Some("0"), "packets duplicated"),
    p("corrupt", "percent", Some("0"), "packets with one bit flipped"),
    p("reorder", "percent", Some("0"), "packets sent out of order (needs a delay)"),
    p("reorder_correlation", "percent", Some("0"), "correlation of reordering"),
    p("rate", "rate", None, "bandwidth limit: bytes/s, or text with tc units (1mbit, 512kbit, 1mbps)"),
    p(
        "direction",
        "to|from|both",
        Some("\"to\""),
        "packets to the port, from it, or both; with a lymph peer: to = the peer's requests to the target, from = \
         the target's replies to the peer's endpoints (the reverse connection), both = both legs of the peer's calls",
    ),
    p(
        "peer",
        "str",
        None,
        "network faults: only traffic between the target and this lymph service (its instances: by address on other \
         hosts, by process on this one; followed as they change)",
    ),
    p("peer_host", "str", None, "network faults: only traffic from this host name or address to the target"),
    p("peer_cidr", "str", None, "network faults: only traffic from this network (address/length) to the target"),
    p("protocol", "tcp|udp|both", None, "transport protocol(s) (default: what the port listens on, else tcp)"),
    p("workers", "int", None, "CPU: busy workers (default 1)"),
    p("percent_cores", "float", None, "CPU: workers as a percentage of the machine's cores"),
    p("load", "float", None, "CPU: load of each worker, % of one core (default 100)"),
    p("in_target_cgroup", "bool", Some("false"), "CPU/memory: run the workers in the target's cgroup"),
    p("mib", "int", None, "memory/disk: MiB to take"),
    p("percent_available", "float", None, "memory: a percentage of the available memory"),
    p("path", "str", None, "disk: a directory on the filesystem to fill"),
    p("percent_free", "float", None, "disk: a percentage of the free space"),
    p("floor_percent", "float", None, "disk: free space (% of the filesystem) left in any case (at least 5)"),
    p("kind", "str", None, "the fault kind (see fault_kinds)"),
    p("signal", "signal", Some("\"SIGKILL\""), "signal name (SIGTERM, term) or number 1-64"),
    p("deregister", "bool", Some("false"), "also remove the killed instance from ZooKeeper at once"),
    p("since", "int", Some("0"), "only events with a sequence number above this"),
    p("limit", "int", Some("100"), "at most this many events (1-10000)"),
    p("mean_interval", "seconds", None, "mean time between faults (default from the configuration)"),
    p("min_gap", "seconds", None, "minimum time between faults (default from the configuration)"),
];

/// The documentation of a parameter.
pub(crate) fn param_doc(name: &str) -> Option<&'static ParamDoc> {
    PARAM_DOCS.iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_is_documented() {
        for method in Method::ALL {
            for param in method.params() {
                assert!(param_doc(param).is_some(), "Chaos.{method}({param}) has no documentation");
            }
            assert_eq!(Method::from_name(method.name()), Some(*method));
        }
    }
}
