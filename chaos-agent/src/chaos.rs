//! The `Chaos` lymph interface: the agent's RPC surface (listed with help text by `lymph inspect Chaos`).
//!
//! Keeps the 2015 call shapes working: `Chaos.kill {"name"}`, `Chaos.inject_latency {"name", "latency"}` and
//! `{"latency"}` (seconds; without a name: every lymph service on this host), `Chaos.list_services {}` (a map
//! keyed by service name, so iterating it still yields the names the old Scenario expected).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::de::DeserializeOwned;

use crate::{
    discovery::Discovery,
    events::EventLog,
    faults::{
        FaultAction, FaultManager, FaultSpec, Selection, Target,
        network::{Direction, Impairment, JitterDistribution, Protocol},
        process,
        resource::{CpuSpec, DiskSpec, MemorySpec},
    },
    rpc::{BoxFuture, Interface, Kwargs, MethodInfo, RpcError, Value, to_value},
    unleash::Unleasher,
};

/// Parameters every targeted method accepts.
const TARGETING: &[&str] = &["name", "instance", "pid", "port", "process"];
const COMMON: &[&str] = &["lifetime", "dry_run", "seed", "id", "count", "percent", "all"];
const NETWORK: &[&str] = &[
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
];
const RESOURCE: &[&str] = &[
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

macro_rules! params {
    ($($group:expr),* ; $($extra:literal),*) => {{
        let mut v: Vec<&'static str> = Vec::new();
        $(v.extend_from_slice($group);)*
        $(v.push($extra);)*
        v
    }};
}

static METHODS: std::sync::LazyLock<Vec<MethodInfo>> = std::sync::LazyLock::new(|| {
    let leak = |v: Vec<&'static str>| -> &'static [&'static str] { Box::leak(v.into_boxed_slice()) };
    vec![
        MethodInfo { name: "clear", params: &[], help: "Revert every active fault. Returns the reverted faults." },
        MethodInfo {
            name: "events",
            params: &["since", "limit"],
            help: "Recorded events (applied, reverted, expired, refused, dry runs, agent start/stop) with seq > since \
                   (default 0), at most limit (default 100), oldest first.",
        },
        MethodInfo {
            name: "faults",
            params: &["all"],
            help: "Active faults with live counters (packets, bytes, drops) or resource usage; all=true adds recently \
                   finished ones.",
        },
        MethodInfo {
            name: "inject",
            params: leak(params!(TARGETING, COMMON, NETWORK, RESOURCE; "kind", "signal", "deregister")),
            help: "Inject a fault of `kind`: latency, loss, duplicate, corrupt, reorder, rate, blackhole (network, on the \
                   target's ports: latency/delay/jitter in seconds, percentages 0-100, rate like \"1mbit\" or bytes/s, \
                   direction to|from|both, protocol tcp|udp|both, default: what the port listens on), observe (count packets only), cpu (workers|percent_cores, load), memory \
                   (mib|percent_available), disk (path, mib|percent_free, floor_percent), kill, terminate, pause. Target \
                   with name (lymph service), instance, pid, port or process (text or /regex/); lifetime in seconds.",
        },
        MethodInfo {
            name: "inject_latency",
            params: leak(
                params!(TARGETING, COMMON; "latency", "jitter", "correlation", "distribution", "direction", "protocol"),
            ),
            help: "Delay packets to a service's ports by `latency` seconds (default 1) for `lifetime` seconds. Without a \
                   target: every lymph service on this host (the 2015 behaviour).",
        },
        MethodInfo {
            name: "kill",
            params: leak(params!(TARGETING, COMMON; "signal", "deregister")),
            help: "Kill instances of a lymph service (name) or any allowed process (pid, port, process) with `signal` \
                   (default SIGKILL): one at random (seeded) unless count, percent or all=true. deregister=true also \
                   removes the instance from ZooKeeper at once.",
        },
        MethodInfo {
            name: "leash",
            params: &[],
            help: "Stop unleashed mode (faults it started run out their lifetime).",
        },
        MethodInfo {
            name: "list_services",
            params: &[],
            help: "Every service seen (ZooKeeper and local lymph processes) with its instances; local ones carry their pid.",
        },
        MethodInfo {
            name: "pause",
            params: leak(params!(TARGETING, COMMON;)),
            help: "Stop (SIGSTOP) instances for `lifetime` seconds, then resume them (SIGCONT) automatically.",
        },
        MethodInfo { name: "revert", params: &["id"], help: "Revert one active fault by id." },
        MethodInfo {
            name: "status",
            params: &[],
            help: "The agent: version, endpoint, ZooKeeper state, dry run, unleashed, network support, active faults.",
        },
        MethodInfo {
            name: "terminate",
            params: leak(params!(TARGETING, COMMON;)),
            help: "SIGTERM instances, then SIGKILL those still running after the configured grace period.",
        },
        MethodInfo {
            name: "unleash",
            params: &["seed", "mean_interval", "min_gap", "dry_run"],
            help: "Start unleashed mode: faults from the configured menu at random times (mean_interval, min_gap in \
                   seconds). The seed is recorded; the same seed replays the same choices.",
        },
    ]
});

/// Keyword arguments checked against a method's parameter list.
pub struct Args {
    method: String,
    allowed: &'static [&'static str],
    map: BTreeMap<String, Value>,
}

impl Args {
    /// Checks that every argument is a parameter of the method.
    ///
    /// # Errors
    /// A `TypeError` naming the unexpected argument and the accepted ones.
    pub fn new(method: &str, allowed: &'static [&'static str], kwargs: Kwargs) -> Result<Args, RpcError> {
        let map: BTreeMap<String, Value> = kwargs.0.into_iter().collect();
        if let Some(bad) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(RpcError::bad_arguments(format!(
                "{method}() got an unexpected argument `{bad}`; it takes: {}",
                if allowed.is_empty() { "no arguments".to_owned() } else { allowed.join(", ") }
            )));
        }
        Ok(Args { method: method.to_owned(), allowed, map })
    }

    /// Builds from a JSON object (unleash menu parameters).
    ///
    /// # Errors
    /// As [`Args::new`].
    pub fn from_json(
        method: &str,
        allowed: &'static [&'static str],
        json: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Args, RpcError> {
        let kwargs = Kwargs(json.iter().map(|(k, v)| (k.clone(), Value::from_json(v))).collect());
        Args::new(method, allowed, kwargs)
    }

    /// An optional argument of type `T` (nil counts as absent).
    ///
    /// # Errors
    /// A `TypeError` naming the argument and the expected type.
    pub fn opt<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, RpcError> {
        match self.map.get(key) {
            None | Some(Value::Nil) => Ok(None),
            Some(v) => serde_json::from_value(v.to_json())
                .map(Some)
                .map_err(|err| RpcError::bad_arguments(format!("{}(): argument `{key}` = {v}: {err}", self.method))),
        }
    }

    /// A number of seconds: a number or a string with a unit (`250ms`, `2s`, `1m`).
    ///
    /// # Errors
    /// A `ValueError` for negative or unparsable values.
    pub fn seconds(&self, key: &str) -> Result<Option<Duration>, RpcError> {
        let Some(v) = self.map.get(key) else { return Ok(None) };
        let d = match v {
            Value::Nil => return Ok(None),
            Value::Str(s) => crate::config::parse_duration(s),
            other => other.to_json().as_f64().and_then(|s| Duration::try_from_secs_f64(s).ok()),
        };
        d.map(Some).ok_or_else(|| {
            RpcError::error(
                "ValueError",
                format!("{}(): argument `{key}` = {v} is not a number of seconds ≥ 0", self.method),
            )
        })
    }

    /// A percentage in [0, 100].
    ///
    /// # Errors
    /// A `ValueError` out of range.
    pub fn percent(&self, key: &str) -> Result<f64, RpcError> {
        let p = self.opt::<f64>(key)?.unwrap_or(0.0);
        if !(0.0..=100.0).contains(&p) {
            return Err(RpcError::error(
                "ValueError",
                format!("{}(): `{key}` is a percentage between 0 and 100, got {p}", self.method),
            ));
        }
        Ok(p)
    }

    fn target(&self, default: Option<Target>) -> Result<Target, RpcError> {
        let name: Option<String> = self.opt("name")?;
        let instance: Option<String> = self.opt("instance")?;
        let pid: Option<i64> = self.opt("pid")?;
        let port: Option<i64> = self.opt("port")?;
        let process: Option<String> = self.opt("process")?;
        let given = [name.is_some(), instance.is_some(), pid.is_some(), port.is_some(), process.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(RpcError::bad_arguments(format!(
                "{}(): give one target: name, instance, pid, port or process",
                self.method
            )));
        }
        if let Some(port) = port {
            let port = u16::try_from(port).ok().filter(|p| *p > 0).ok_or_else(|| {
                RpcError::error("ValueError", format!("{}(): port {port} is out of range (1-65535)", self.method))
            })?;
            return Ok(Target::Port { port });
        }
        if let Some(pid) = pid {
            let pid = i32::try_from(pid).ok().filter(|p| *p > 0).ok_or_else(|| {
                RpcError::error("ValueError", format!("{}(): pid {pid} is not a process id", self.method))
            })?;
            return Ok(Target::Pid { pid });
        }
        Ok(match (name, instance, process) {
            (Some(name), _, _) => Target::Service { name },
            (_, Some(id), _) => Target::Instance { id },
            (_, _, Some(pattern)) => Target::Process { pattern },
            _ => default.ok_or_else(|| {
                RpcError::bad_arguments(format!(
                    "{}(): missing target: give name (a lymph service), instance, pid, port or process",
                    self.method
                ))
            })?,
        })
    }

    /// Builds a spec with the common arguments.
    fn spec(&self, target: Target, action: FaultAction) -> Result<FaultSpec, RpcError> {
        let count: Option<i64> = self.opt("count")?;
        let percent: Option<f64> = self.opt("percent")?;
        let all: Option<bool> = self.opt("all")?;
        let select = match (count, percent, all.unwrap_or(false)) {
            (Some(_), Some(_), _) | (Some(_), _, true) | (_, Some(_), true) => {
                return Err(RpcError::bad_arguments(format!("{}(): give one of count, percent, all", self.method)));
            }
            (Some(c), None, false) => Some(Selection::Count(
                u32::try_from(c)
                    .ok()
                    .filter(|c| *c > 0)
                    .ok_or_else(|| RpcError::error("ValueError", "count must be at least 1"))?,
            )),
            (None, Some(p), false) => Some(Selection::Percent(p)),
            (None, None, true) => Some(Selection::All),
            (None, None, false) => None,
        };
        let lifetime = self.seconds("lifetime")?;
        if lifetime.is_some_and(|l| l.is_zero()) {
            return Err(RpcError::error("ValueError", "lifetime must be above 0 seconds"));
        }
        Ok(FaultSpec {
            id: self.opt("id")?,
            target,
            action,
            select,
            lifetime,
            dry_run: self.opt("dry_run")?.unwrap_or(false),
            seed: self.opt("seed")?,
            deregister: if self.allowed.contains(&"deregister") {
                self.opt("deregister")?.unwrap_or(false)
            } else {
                false
            },
            origin: "rpc".into(),
        })
    }

    fn network_action(&self, label: &str, defaults: Impairment) -> Result<FaultAction, RpcError> {
        let delay =
            self.seconds("latency")?.or(if self.allowed.contains(&"delay") { self.seconds("delay")? } else { None });
        let mut imp = Impairment {
            delay: delay.unwrap_or(defaults.delay),
            jitter: self.seconds("jitter")?.unwrap_or_default(),
            delay_correlation: self.percent("correlation")?,
            distribution: self.opt::<JitterDistribution>("distribution")?,
            ..defaults
        };
        if self.allowed.contains(&"loss") {
            imp.loss_percent = self.opt::<f64>("loss")?.map_or(Ok(imp.loss_percent), |_| self.percent("loss"))?;
            imp.duplicate_percent =
                self.opt::<f64>("duplicate")?.map_or(Ok(imp.duplicate_percent), |_| self.percent("duplicate"))?;
            imp.corrupt_percent =
                self.opt::<f64>("corrupt")?.map_or(Ok(imp.corrupt_percent), |_| self.percent("corrupt"))?;
            imp.reorder_percent =
                self.opt::<f64>("reorder")?.map_or(Ok(imp.reorder_percent), |_| self.percent("reorder"))?;
            imp.reorder_correlation = self.percent("reorder_correlation")?;
            if let Some(rate) = self.map.get("rate").filter(|v| **v != Value::Nil) {
                imp.rate_bytes_per_sec = Some(parse_rate(rate).ok_or_else(|| {
                    RpcError::error("ValueError", format!("{}(): rate {rate} is not a rate: use bytes per second or \"10mbit\", \"512kbit\", \"1mbps\"", self.method))
                })?);
            }
        }
        imp.validate().map_err(|e| RpcError::error("ValueError", e.to_string()))?;
        Ok(FaultAction::Network {
            label: label.to_owned(),
            impairment: imp,
            direction: self.opt::<Direction>("direction")?.unwrap_or_default(),
            protocol: self.opt::<Protocol>("protocol")?,
        })
    }
}

/// Parses a rate: bytes/s as a number, or text with tc's units (`bit`, `kbit`, `mbit`, `gbit` are bits/s;
/// `bps`, `kbps`, `mbps`, `gbps` are bytes/s).
pub fn parse_rate(v: &Value) -> Option<u64> {
    if let Some(n) = v.to_json().as_f64() {
        return (n >= 1.0).then_some(n as u64);
    }
    let s = v.as_str()?.trim().to_ascii_lowercase();
    let i = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let n: f64 = s[..i].trim().parse().ok()?;
    let bytes = match s[i..].trim() {
        "" | "bps" => n,
        "kbps" => n * 1e3,
        "mbps" => n * 1e6,
        "gbps" => n * 1e9,
        "bit" => n / 8.0,
        "kbit" => n * 1e3 / 8.0,
        "mbit" => n * 1e6 / 8.0,
        "gbit" => n * 1e9 / 8.0,
        _ => return None,
    };
    (bytes >= 1.0).then_some(bytes as u64)
}

/// Every parameter `Chaos.inject` takes (the unleashed menu accepts the same).
pub fn inject_params() -> &'static [&'static str] {
    METHODS.iter().find(|m| m.name == "inject").expect("inject is a method").params
}

/// Builds a fault spec for `Chaos.inject` (also used by the unleashed mode's menu).
///
/// # Errors
/// Argument errors with messages naming the bad argument.
pub fn inject_spec(kind: &str, args: &Args) -> Result<FaultSpec, RpcError> {
    let reject_extra = |used: &[&str]| -> Result<(), RpcError> {
        let allowed: Vec<&str> = TARGETING.iter().chain(COMMON).chain(used).copied().collect();
        if let Some(bad) = args.map.keys().find(|k| k.as_str() != "kind" && !allowed.contains(&k.as_str())) {
            return Err(RpcError::bad_arguments(format!("{}(): `{bad}` does not apply to kind `{kind}`", args.method)));
        }
        Ok(())
    };
    let network = |label: &str, defaults: Impairment| -> Result<FaultSpec, RpcError> {
        reject_extra(NETWORK)?;
        args.spec(args.target(None)?, args.network_action(label, defaults)?)
    };
    match kind {
        "latency" | "delay" => {
            let delay = args.seconds("latency")?.or(args.seconds("delay")?).ok_or_else(|| {
                RpcError::bad_arguments(format!("{}(kind=\"{kind}\"): give latency (seconds)", args.method))
            })?;
            network("latency", Impairment { delay, ..Default::default() })
        }
        "loss" => network("loss", Impairment { loss_percent: require(args, "loss")?, ..Default::default() }),
        "duplicate" => {
            network("duplicate", Impairment { duplicate_percent: require(args, "duplicate")?, ..Default::default() })
        }
        "corrupt" => {
            network("corrupt", Impairment { corrupt_percent: require(args, "corrupt")?, ..Default::default() })
        }
        "reorder" => {
            network("reorder", Impairment { reorder_percent: require(args, "reorder")?, ..Default::default() })
        }
        "rate" => {
            if args.map.get("rate").is_none_or(|v| *v == Value::Nil) {
                return Err(RpcError::bad_arguments(format!(
                    "{}(kind=\"rate\"): give rate (e.g. \"1mbit\")",
                    args.method
                )));
            }
            network("rate", Impairment::default())
        }
        "blackhole" => network("blackhole", Impairment { blackhole: true, ..Default::default() }),
        "observe" => network("observe", Impairment { observe: true, ..Default::default() }),
        "kill" | "terminate" | "pause" => {
            reject_extra(&["signal"])?;
            let action = match kind {
                "kill" => FaultAction::Kill { signal: signal_arg(args)? },
                "terminate" => FaultAction::Terminate,
                _ => FaultAction::Pause,
            };
            args.spec(args.target(None)?, action)
        }
        "cpu" => {
            reject_extra(&["workers", "percent_cores", "load", "in_target_cgroup"])?;
            let spec = CpuSpec {
                workers: args.opt("workers")?,
                percent_cores: args.opt("percent_cores")?,
                load: args.opt("load")?,
                in_target_cgroup: args.opt("in_target_cgroup")?.unwrap_or(false),
            };
            args.spec(resource_target(args, spec.in_target_cgroup)?, FaultAction::Cpu(spec))
        }
        "memory" => {
            reject_extra(&["mib", "percent_available", "in_target_cgroup"])?;
            let spec = MemorySpec {
                mib: args.opt("mib")?,
                percent_available: args.opt("percent_available")?,
                in_target_cgroup: args.opt("in_target_cgroup")?.unwrap_or(false),
            };
            args.spec(resource_target(args, spec.in_target_cgroup)?, FaultAction::Memory(spec))
        }
        "disk" => {
            reject_extra(&["path", "mib", "percent_free", "floor_percent"])?;
            let spec = DiskSpec {
                path: args.opt("path")?,
                mib: args.opt("mib")?,
                percent_free: args.opt("percent_free")?,
                floor_percent: args.opt("floor_percent")?,
            };
            args.spec(resource_target(args, false)?, FaultAction::Disk(spec))
        }
        other => Err(RpcError::error(
            "ValueError",
            format!(
                "unknown fault kind `{other}`; kinds: latency, loss, duplicate, corrupt, reorder, rate, blackhole, observe, cpu, \
                 memory, disk, kill, terminate, pause"
            ),
        )),
    }
}

fn require(args: &Args, key: &str) -> Result<f64, RpcError> {
    if args.opt::<f64>(key)?.is_none() {
        return Err(RpcError::bad_arguments(format!("{}(): give {key} (a percentage)", args.method)));
    }
    args.percent(key)
}

fn signal_arg(args: &Args) -> Result<i32, RpcError> {
    match args.map.get("signal") {
        None | Some(Value::Nil) => Ok(libc::SIGKILL),
        Some(Value::Int(n)) => i32::try_from(*n)
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| RpcError::error("ValueError", format!("signal {n} is out of range"))),
        Some(Value::Str(s)) => {
            process::parse_signal(s).ok_or_else(|| RpcError::error("ValueError", format!("unknown signal `{s}`")))
        }
        Some(other) => Err(RpcError::bad_arguments(format!("signal must be a name or number, got {}", other.kind()))),
    }
}

/// Resource faults act on the host; a target is only needed for cgroup placement.
fn resource_target(args: &Args, needs_process: bool) -> Result<Target, RpcError> {
    let any = TARGETING.iter().any(|k| args.map.get(*k).is_some_and(|v| *v != Value::Nil));
    if !any {
        if needs_process {
            return Err(RpcError::bad_arguments(
                "in_target_cgroup needs a target (name, instance, pid, port or process)",
            ));
        }
        return Ok(Target::AllServices);
    }
    args.target(None)
}

/// The `Chaos` interface.
pub struct Chaos {
    /// Faults.
    pub manager: Arc<FaultManager>,
    /// Discovery.
    pub discovery: Arc<Discovery>,
    /// Events.
    pub events: Arc<EventLog>,
    /// Unleashed mode.
    pub unleasher: Arc<Unleasher>,
    /// Fixed status fields (endpoint, version, network support …).
    pub status: serde_json::Value,
}

fn fault_error(err: crate::faults::FaultError) -> RpcError {
    RpcError::error(err.type_name(), err.to_string())
}

impl Chaos {
    async fn handle(self: Arc<Self>, method: &'static str, kwargs: Kwargs) -> Result<Value, RpcError> {
        let info = METHODS.iter().find(|m| m.name == method).expect("dispatch only routes known methods");
        let args = Args::new(&format!("Chaos.{method}"), info.params, kwargs)?;
        match method {
            "list_services" => {
                let snap = self.discovery.snapshot();
                to_value(&snap.services)
            }
            "status" => {
                let mut status = self.status.clone();
                if let serde_json::Value::Object(map) = &mut status {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64());
                    let started = map.get("started").and_then(serde_json::Value::as_f64).unwrap_or(now);
                    map.insert("uptime".into(), (now - started).into());
                    if let (Some(engine), Some(net)) = (self.manager.network(), map.get_mut("network")) {
                        net["interfaces"] = engine.attached().await.into();
                        net["rules"] = engine.rule_count().await.into();
                    }
                    map.insert("active_faults".into(), self.manager.active_count().await.into());
                    map.insert("unleashed".into(), serde_json::to_value(self.unleasher.state()).unwrap_or_default());
                    map.insert(
                        "zookeeper".into(),
                        serde_json::to_value(&self.discovery.snapshot().zookeeper).unwrap_or_default(),
                    );
                    map.insert("dry_run".into(), self.manager.agent_dry_run().into());
                    map.insert("last_event".into(), self.events.last_seq().into());
                }
                Ok(Value::from_json(&status))
            }
            "kill" => {
                let spec = args.spec(args.target(None)?, FaultAction::Kill { signal: signal_arg(&args)? })?;
                self.manager.apply(spec).await.map_err(fault_error).and_then(|r| to_value(&r))
            }
            "terminate" => {
                let spec = args.spec(args.target(None)?, FaultAction::Terminate)?;
                self.manager.apply(spec).await.map_err(fault_error).and_then(|r| to_value(&r))
            }
            "pause" => {
                let spec = args.spec(args.target(None)?, FaultAction::Pause)?;
                self.manager.apply(spec).await.map_err(fault_error).and_then(|r| to_value(&r))
            }
            "inject_latency" => {
                // 2015 shape: latency in seconds, default 1; no target = every lymph service here.
                let default = Impairment { delay: Duration::from_secs(1), ..Default::default() };
                let action = args.network_action("latency", default)?;
                let spec = args.spec(args.target(Some(Target::AllServices))?, action)?;
                self.manager.apply(spec).await.map_err(fault_error).and_then(|r| to_value(&r))
            }
            "inject" => {
                let kind: String =
                    args.opt("kind")?.ok_or_else(|| RpcError::bad_arguments("Chaos.inject(): give kind"))?;
                let spec = inject_spec(&kind, &args)?;
                self.manager.apply(spec).await.map_err(fault_error).and_then(|r| to_value(&r))
            }
            "faults" => to_value(&self.manager.list(args.opt("all")?.unwrap_or(false)).await),
            "revert" => {
                let id: String = args.opt("id")?.ok_or_else(|| RpcError::bad_arguments("Chaos.revert(): give id"))?;
                self.manager.revert(&id).await.map_err(fault_error).and_then(|r| to_value(&r))
            }
            "clear" => to_value(&self.manager.clear().await),
            "events" => {
                let since: u64 = args.opt("since")?.unwrap_or(0);
                let limit: usize = args.opt("limit")?.unwrap_or(100);
                to_value(&self.events.query(since, limit.clamp(1, 10_000)))
            }
            "unleash" => {
                let seed: Option<u64> = args.opt("seed")?;
                let mean = args.seconds("mean_interval")?;
                let gap = args.seconds("min_gap")?;
                let dry_run: Option<bool> = args.opt("dry_run")?;
                let state =
                    self.unleasher.start(seed, mean, gap, dry_run).map_err(|e| RpcError::error("ValueError", e))?;
                to_value(&state)
            }
            "leash" => to_value(&self.unleasher.stop()),
            _ => Err(RpcError::Nack { reason: format!("Chaos.{method} not implemented") }),
        }
    }
}

impl Interface for Chaos {
    fn name(&self) -> &'static str {
        crate::paths::SERVICE_NAME
    }

    fn methods(&self) -> &'static [MethodInfo] {
        &METHODS
    }

    fn call(self: Arc<Self>, method: &'static str, kwargs: Kwargs) -> BoxFuture<Result<Value, RpcError>> {
        Box::pin(self.handle(method, kwargs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(method: &'static str, kv: &[(&str, Value)]) -> Result<Args, RpcError> {
        let info = METHODS.iter().find(|m| m.name == method).unwrap();
        Args::new(
            &format!("Chaos.{method}"),
            info.params,
            Kwargs(kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()),
        )
    }

    #[test]
    fn old_call_shapes_still_work() {
        let a = args("kill", &[("name", Value::Str("Echo".into()))]).unwrap();
        let spec = a.spec(a.target(None).unwrap(), FaultAction::Kill { signal: 9 }).unwrap();
        assert_eq!(spec.target, Target::Service { name: "Echo".into() });
        let a = args("inject_latency", &[("latency", Value::Int(1))]).unwrap();
        let action = a.network_action("latency", Impairment::default()).unwrap();
        assert!(
            matches!(action, FaultAction::Network { impairment, .. } if impairment.delay == Duration::from_secs(1))
        );
        assert_eq!(a.target(Some(Target::AllServices)).unwrap(), Target::AllServices);
    }

    #[test]
    fn bad_arguments_are_explained() {
        let err = args("kill", &[("nmae", Value::Str("x".into()))]).err().unwrap();
        assert!(err.to_string().contains("unexpected argument `nmae`"), "{err}");
        let a = args("kill", &[("port", Value::Int(70000))]).unwrap();
        assert!(a.target(None).unwrap_err().to_string().contains("out of range"));
        let a = args("kill", &[("name", Value::Int(3))]).unwrap();
        assert!(a.target(None).is_err());
        let a = args("kill", &[]).unwrap();
        assert!(a.target(None).unwrap_err().to_string().contains("missing target"));
        let a = args(
            "inject",
            &[("kind", Value::Str("latency".into())), ("name", Value::Str("E".into())), ("latency", Value::Int(-1))],
        )
        .unwrap();
        assert!(inject_spec("latency", &a).is_err());
        let a = args(
            "inject",
            &[("kind", Value::Str("loss".into())), ("name", Value::Str("E".into())), ("loss", Value::Int(130))],
        )
        .unwrap();
        assert!(inject_spec("loss", &a).unwrap_err().to_string().contains("percentage"));
        let a = args(
            "inject",
            &[
                ("kind", Value::Str("loss".into())),
                ("name", Value::Str("E".into())),
                ("mib", Value::Int(1)),
                ("loss", Value::Int(1)),
            ],
        )
        .unwrap();
        assert!(inject_spec("loss", &a).unwrap_err().to_string().contains("does not apply"));
        let a = args("inject", &[("kind", Value::Str("warp".into()))]).unwrap();
        assert!(inject_spec("warp", &a).unwrap_err().to_string().contains("unknown fault kind"));
    }

    #[test]
    fn rates_in_tc_units() {
        assert_eq!(parse_rate(&Value::Str("1mbit".into())), Some(125_000));
        assert_eq!(parse_rate(&Value::Str("2mbps".into())), Some(2_000_000));
        assert_eq!(parse_rate(&Value::Int(5000)), Some(5000));
        assert_eq!(parse_rate(&Value::Str("fast".into())), None);
        assert_eq!(parse_rate(&Value::Int(0)), None);
    }
}
