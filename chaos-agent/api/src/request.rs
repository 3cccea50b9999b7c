//! One typed request per `Chaos` method, used by both sides (as mini-redis's `cmd` types are): clients build
//! them and send them as keyword arguments; the agent decodes the keyword arguments back into them.
//!
//! Decoding checks every argument and explains what is wrong with it: unknown arguments, two targets, wrong types
//! are `TypeError`s; values out of range (a negative duration, a percentage above 100, an unknown fault kind or
//! signal) are `ValueError`s. Serializing a request gives the keyword arguments the agent expects (serde), and
//! deserializing runs the same checks, so `decode(encode(request)) == request`.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value as Json};

use crate::{
    error::RpcError,
    fault::{CpuSpec, DiskSpec, Fault, FaultKind, MemorySpec, NetworkParams, Peer, Selection, Target},
    kwargs::Kwargs,
    method::{COMMON, Method, NETWORK, TARGETING},
    units,
    value::Value,
};

/// Options every fault request takes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultOptions {
    /// Client-chosen id: applying the same id again refreshes the fault instead of adding one.
    pub id: Option<String>,
    /// How many targets (default: one for process faults, all for the others).
    pub select: Option<Selection>,
    /// Lifetime (default from the agent's configuration; capped at its maximum).
    pub lifetime: Option<Duration>,
    /// Only report what would be done.
    pub dry_run: bool,
    /// Seed for random choices (random and recorded when absent).
    pub seed: Option<u64>,
}

/// `Chaos.kill`: send a signal to instances.
#[derive(Clone, Debug, PartialEq)]
pub struct Kill {
    /// What to kill.
    pub target: Target,
    /// Signal number (default SIGKILL).
    pub signal: i32,
    /// Also remove the instance from ZooKeeper at once.
    pub deregister: bool,
    /// Id, selection, lifetime, dry run, seed.
    pub options: FaultOptions,
}

/// Process faults that take a target and the common options and nothing else: the same request shape, a method
/// each.
macro_rules! target_only_requests {
    ($($(#[$doc:meta])* $ty:ident: $what:literal;)*) => {$(
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq)]
        pub struct $ty {
            #[doc = $what]
            pub target: Target,
            /// Id, selection, lifetime, dry run, seed.
            pub options: FaultOptions,
        }

        impl Decode for $ty {
            fn decode(args: &Args) -> Result<$ty, RpcError> {
                Ok($ty { target: args.target(None)?, options: args.options()? })
            }
        }

        impl ChaosRequest for $ty {
            const METHOD: Method = Method::$ty;

            fn from_kwargs(kwargs: Kwargs) -> Result<$ty, RpcError> {
                $ty::decode_kwargs(kwargs)
            }

            fn to_kwargs(&self) -> Map<String, Json> {
                let mut map = Map::new();
                put_target(&mut map, &self.target);
                put_options(&mut map, &self.options);
                map
            }
        }
    )*};
}

target_only_requests! {
    /// `Chaos.terminate`: SIGTERM, then SIGKILL after the agent's grace period.
    Terminate: "What to terminate.";
    /// `Chaos.pause`: SIGSTOP for the lifetime, then SIGCONT.
    Pause: "What to pause.";
}

/// `Chaos.inject_latency`: the 2015 call (latency in seconds, default 1; no target = every local lymph service).
#[derive(Clone, Debug, PartialEq)]
pub struct InjectLatency {
    /// What to slow down ([`Target::AllServices`] when the request names none).
    pub target: Target,
    /// Delay, jitter, correlation, distribution, direction, protocol.
    pub params: NetworkParams,
    /// Id, selection, lifetime, dry run, seed.
    pub options: FaultOptions,
}

/// `Chaos.inject`: a fault of any kind.
#[derive(Clone, Debug, PartialEq)]
pub struct Inject {
    /// What to aim at (resource faults without a target: [`Target::AllServices`], i.e. the host).
    pub target: Target,
    /// The fault and its parameters.
    pub fault: Fault,
    /// Id, selection, lifetime, dry run, seed.
    pub options: FaultOptions,
}

/// `Chaos.faults`: active faults with live counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Include recently finished faults.
    pub all: bool,
}

/// `Chaos.revert`: revert one fault.
#[derive(Clone, Debug, PartialEq)]
pub struct Revert {
    /// The fault's id.
    pub id: String,
}

/// `Chaos.clear`: revert every active fault.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Clear;

/// `Chaos.events`: recorded events, oldest first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Events {
    /// Only events with a sequence number above this.
    pub since: u64,
    /// At most this many (the agent clamps it to 1–10000).
    pub limit: usize,
}

impl Default for Events {
    fn default() -> Events {
        Events { since: 0, limit: 100 }
    }
}

/// `Chaos.status`: the agent's state.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Status;

/// `Chaos.list_services`: every service the agent sees, with its instances.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ListServices;

/// `Chaos.unleash`: start unleashed mode; absent fields keep the agent's configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Unleash {
    /// Seed of the random schedule.
    pub seed: Option<u64>,
    /// Mean time between faults.
    pub mean_interval: Option<Duration>,
    /// Minimum time between faults.
    pub min_gap: Option<Duration>,
    /// Only report the faults.
    pub dry_run: Option<bool>,
}

/// `Chaos.leash`: stop unleashed mode.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Leash;

/// Any `Chaos` request.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// `Chaos.clear`.
    Clear(Clear),
    /// `Chaos.events`.
    Events(Events),
    /// `Chaos.faults`.
    Faults(Faults),
    /// `Chaos.inject`.
    Inject(Inject),
    /// `Chaos.inject_latency`.
    InjectLatency(InjectLatency),
    /// `Chaos.kill`.
    Kill(Kill),
    /// `Chaos.leash`.
    Leash(Leash),
    /// `Chaos.list_services`.
    ListServices(ListServices),
    /// `Chaos.pause`.
    Pause(Pause),
    /// `Chaos.revert`.
    Revert(Revert),
    /// `Chaos.status`.
    Status(Status),
    /// `Chaos.terminate`.
    Terminate(Terminate),
    /// `Chaos.unleash`.
    Unleash(Unleash),
}

/// A typed request of one method: how it decodes from and encodes to keyword arguments.
pub trait ChaosRequest: Sized {
    /// The method it calls.
    const METHOD: Method;

    /// Decodes keyword arguments, checking each.
    ///
    /// # Errors
    /// `TypeError` / `ValueError` [`RpcError`]s naming the argument and what is wrong with it.
    fn from_kwargs(kwargs: Kwargs) -> Result<Self, RpcError>;

    /// The keyword arguments of this request (what a client sends).
    fn to_kwargs(&self) -> Map<String, Json>;
}

/// Decoding from checked arguments (the other half of [`ChaosRequest`]).
trait Decode: ChaosRequest {
    fn decode(args: &Args) -> Result<Self, RpcError>;

    fn decode_kwargs(kwargs: Kwargs) -> Result<Self, RpcError> {
        let args = Args::new(&Self::METHOD.subject(), Self::METHOD.params(), kwargs)?;
        Self::decode(&args)
    }
}

/// Keyword arguments checked against a method's parameter list, with typed accessors whose errors name the method
/// and the argument.
struct Args {
    method: String,
    allowed: &'static [&'static str],
    map: BTreeMap<String, Value>,
}

impl Args {
    fn new(method: &str, allowed: &'static [&'static str], kwargs: Kwargs) -> Result<Args, RpcError> {
        let map: BTreeMap<String, Value> = kwargs.0.into_iter().collect();
        if let Some(bad) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(RpcError::bad_arguments(format!(
                "{method}() got an unexpected argument `{bad}`; it takes: {}",
                if allowed.is_empty() { "no arguments".to_owned() } else { allowed.join(", ") }
            )));
        }
        Ok(Args { method: method.to_owned(), allowed, map })
    }

    fn given(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| **v != Value::Nil)
    }

    /// An optional argument of type `T` (nil counts as absent).
    fn opt<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, RpcError> {
        match self.given(key) {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.to_json())
                .map(Some)
                .map_err(|err| RpcError::bad_arguments(format!("{}(): argument `{key}` = {v}: {err}", self.method))),
        }
    }

    /// A number of seconds: a number or a string with a unit (`250ms`, `2s`, `1m`).
    fn seconds(&self, key: &str) -> Result<Option<Duration>, RpcError> {
        let Some(v) = self.given(key) else { return Ok(None) };
        let d = match v {
            Value::Str(s) => units::parse_duration(s),
            other => other.to_json().as_f64().and_then(|s| Duration::try_from_secs_f64(s).ok()),
        };
        d.map(Some).ok_or_else(|| {
            RpcError::bad_value(format!("{}(): argument `{key}` = {v} is not a number of seconds ≥ 0", self.method))
        })
    }

    /// A percentage in [0, 100] (0 when absent).
    fn percent(&self, key: &str) -> Result<f64, RpcError> {
        let p = self.opt::<f64>(key)?.unwrap_or(0.0);
        if !(0.0..=100.0).contains(&p) {
            return Err(RpcError::bad_value(format!(
                "{}(): `{key}` is a percentage between 0 and 100, got {p}",
                self.method
            )));
        }
        Ok(p)
    }

    /// A required percentage.
    fn require_percent(&self, key: &str) -> Result<f64, RpcError> {
        if self.opt::<f64>(key)?.is_none() {
            return Err(RpcError::bad_arguments(format!("{}(): give {key} (a percentage)", self.method)));
        }
        self.percent(key)
    }

    fn any_target(&self) -> bool {
        TARGETING.iter().any(|k| self.given(k).is_some())
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
                RpcError::bad_value(format!("{}(): port {port} is out of range (1-65535)", self.method))
            })?;
            return Ok(Target::Port { port });
        }
        if let Some(pid) = pid {
            let pid = i32::try_from(pid)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| RpcError::bad_value(format!("{}(): pid {pid} is not a process id", self.method)))?;
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

    /// Resource faults act on the host; a target is only needed for cgroup placement.
    fn resource_target(&self, needs_process: bool) -> Result<Target, RpcError> {
        if !self.any_target() {
            if needs_process {
                return Err(RpcError::bad_arguments(
                    "in_target_cgroup needs a target (name, instance, pid, port or process)",
                ));
            }
            return Ok(Target::AllServices);
        }
        self.target(None)
    }

    fn options(&self) -> Result<FaultOptions, RpcError> {
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
                    .ok_or_else(|| RpcError::bad_value("count must be at least 1"))?,
            )),
            (None, Some(p), false) => Some(Selection::Percent(p)),
            (None, None, true) => Some(Selection::All),
            (None, None, false) => None,
        };
        let lifetime = self.seconds("lifetime")?;
        if lifetime.is_some_and(|l| l.is_zero()) {
            return Err(RpcError::bad_value("lifetime must be above 0 seconds"));
        }
        Ok(FaultOptions {
            id: self.opt("id")?,
            select,
            lifetime,
            dry_run: self.opt("dry_run")?.unwrap_or(false),
            seed: self.opt("seed")?,
        })
    }

    fn deregister(&self) -> Result<bool, RpcError> {
        Ok(if self.allowed.contains(&"deregister") { self.opt("deregister")?.unwrap_or(false) } else { false })
    }

    /// Network parameters over `defaults` (the kind's own value, e.g. its loss).
    fn network(&self, defaults: NetworkParams) -> Result<NetworkParams, RpcError> {
        let delay =
            self.seconds("latency")?.or(if self.allowed.contains(&"delay") { self.seconds("delay")? } else { None });
        let mut params = NetworkParams {
            delay: delay.unwrap_or(defaults.delay),
            jitter: self.seconds("jitter")?.unwrap_or_default(),
            correlation: self.percent("correlation")?,
            distribution: self.opt("distribution")?,
            ..defaults
        };
        if self.allowed.contains(&"loss") {
            let or = |key: &str, current: f64| -> Result<f64, RpcError> {
                self.opt::<f64>(key)?.map_or(Ok(current), |_| self.percent(key))
            };
            params.loss = or("loss", params.loss)?;
            params.duplicate = or("duplicate", params.duplicate)?;
            params.corrupt = or("corrupt", params.corrupt)?;
            params.reorder = or("reorder", params.reorder)?;
            params.reorder_correlation = self.percent("reorder_correlation")?;
            if let Some(rate) = self.given("rate") {
                params.rate = Some(rate_value(rate).ok_or_else(|| {
                    RpcError::bad_value(format!(
                        "{}(): rate {rate} is not a rate: use bytes per second or \"10mbit\", \"512kbit\", \"1mbps\"",
                        self.method
                    ))
                })?);
            }
        }
        params.direction = self.opt("direction")?.unwrap_or_default();
        params.protocol = self.opt("protocol")?;
        params.peer = self.peer()?;
        Ok(params)
    }

    /// `peer`, `peer_host` or `peer_cidr` (at most one).
    fn peer(&self) -> Result<Option<Peer>, RpcError> {
        if !self.allowed.contains(&"peer") {
            return Ok(None);
        }
        let given: Vec<(&str, String)> = ["peer", "peer_host", "peer_cidr"]
            .into_iter()
            .filter_map(|k| self.opt::<String>(k).transpose().map(|v| v.map(|v| (k, v))))
            .collect::<Result<_, _>>()?;
        let [(key, value)] = given.as_slice() else {
            if given.is_empty() {
                return Ok(None);
            }
            return Err(RpcError::bad_arguments(format!("{}(): give one of peer, peer_host, peer_cidr", self.method)));
        };
        if value.trim().is_empty() {
            return Err(RpcError::bad_value(format!("{}(): `{key}` is empty", self.method)));
        }
        let peer = match *key {
            "peer" => Peer::Service(value.clone()),
            "peer_host" => Peer::Host(value.clone()),
            _ => Peer::parse_cidr(value)
                .map_err(|why| RpcError::bad_value(format!("{}(): peer_cidr {why}", self.method)))?,
        };
        if !matches!(peer, Peer::Service(_)) && params_direction(self)? != crate::fault::Direction::To {
            return Err(RpcError::bad_value(format!(
                "{}(): {key} matches callers by address, so only direction \"to\" applies; give peer=<service> for \
                 the reverse connection of lymph replies",
                self.method
            )));
        }
        Ok(Some(peer))
    }

    fn signal(&self) -> Result<i32, RpcError> {
        match self.given("signal") {
            None => Ok(libc::SIGKILL),
            Some(Value::Int(n)) => i32::try_from(*n)
                .ok()
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| RpcError::bad_value(format!("signal {n} is out of range"))),
            Some(Value::Str(s)) => {
                units::parse_signal(s).ok_or_else(|| RpcError::bad_value(format!("unknown signal `{s}`")))
            }
            Some(other) => {
                Err(RpcError::bad_arguments(format!("signal must be a name or number, got {}", other.kind())))
            }
        }
    }

    /// Refuses arguments that do not belong to `kind`.
    fn reject_extra(&self, kind: &str, used: &[&str]) -> Result<(), RpcError> {
        let fits = |k: &str| k == "kind" || TARGETING.contains(&k) || COMMON.contains(&k) || used.contains(&k);
        if let Some(bad) = self.map.keys().find(|k| !fits(k)) {
            return Err(RpcError::bad_arguments(format!("{}(): `{bad}` does not apply to kind `{kind}`", self.method)));
        }
        Ok(())
    }

    /// The fault of `kind` (as written in the request: `delay` is `latency`) and its target.
    fn fault(&self, kind: &str) -> Result<(Target, Fault), RpcError> {
        let network = |label: FaultKind, defaults: NetworkParams| -> Result<(Target, Fault), RpcError> {
            self.reject_extra(kind, NETWORK)?;
            let target = self.target(None)?;
            Ok((target, Fault::Network { label, params: self.network(defaults)? }))
        };
        let Some(known) = FaultKind::from_name(kind) else {
            let kinds: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
            return Err(RpcError::bad_value(format!("unknown fault kind `{kind}`; kinds: {}", kinds.join(", "))));
        };
        let none = NetworkParams::default();
        match known {
            FaultKind::Latency => {
                let delay = self.seconds("latency")?.or(self.seconds("delay")?).ok_or_else(|| {
                    RpcError::bad_arguments(format!("{}(kind=\"{kind}\"): give latency (seconds)", self.method))
                })?;
                network(known, NetworkParams { delay, ..none })
            }
            FaultKind::Loss => network(known, NetworkParams { loss: self.require_percent("loss")?, ..none }),
            FaultKind::Duplicate => {
                network(known, NetworkParams { duplicate: self.require_percent("duplicate")?, ..none })
            }
            FaultKind::Corrupt => network(known, NetworkParams { corrupt: self.require_percent("corrupt")?, ..none }),
            FaultKind::Reorder => network(known, NetworkParams { reorder: self.require_percent("reorder")?, ..none }),
            FaultKind::Rate => {
                if self.given("rate").is_none() {
                    return Err(RpcError::bad_arguments(format!(
                        "{}(kind=\"rate\"): give rate (e.g. \"1mbit\")",
                        self.method
                    )));
                }
                network(known, none)
            }
            FaultKind::Blackhole | FaultKind::Observe => network(known, none),
            FaultKind::Kill | FaultKind::Terminate | FaultKind::Pause => {
                self.reject_extra(kind, &["signal"])?;
                let fault = match known {
                    FaultKind::Kill => Fault::Kill { signal: self.signal()? },
                    FaultKind::Terminate => Fault::Terminate,
                    _ => Fault::Pause,
                };
                Ok((self.target(None)?, fault))
            }
            FaultKind::Cpu => {
                self.reject_extra(kind, known.params())?;
                let spec = CpuSpec {
                    workers: self.opt("workers")?,
                    percent_cores: self.opt("percent_cores")?,
                    load: self.opt("load")?,
                    in_target_cgroup: self.opt("in_target_cgroup")?.unwrap_or(false),
                };
                Ok((self.resource_target(spec.in_target_cgroup)?, Fault::Cpu(spec)))
            }
            FaultKind::Memory => {
                self.reject_extra(kind, known.params())?;
                let spec = MemorySpec {
                    mib: self.opt("mib")?,
                    percent_available: self.opt("percent_available")?,
                    in_target_cgroup: self.opt("in_target_cgroup")?.unwrap_or(false),
                };
                Ok((self.resource_target(spec.in_target_cgroup)?, Fault::Memory(spec)))
            }
            FaultKind::Disk => {
                self.reject_extra(kind, known.params())?;
                let spec = DiskSpec {
                    path: self.opt("path")?,
                    mib: self.opt("mib")?,
                    percent_free: self.opt("percent_free")?,
                    floor_percent: self.opt("floor_percent")?,
                };
                Ok((self.resource_target(false)?, Fault::Disk(spec)))
            }
        }
    }
}

fn params_direction(args: &Args) -> Result<crate::fault::Direction, RpcError> {
    Ok(args.opt("direction")?.unwrap_or_default())
}

/// A rate: bytes/s as a number, or text with tc's units (see [`units::parse_rate`]).
fn rate_value(v: &Value) -> Option<u64> {
    if let Some(n) = v.to_json().as_f64() {
        return units::rate_from_bytes(n);
    }
    units::parse_rate(v.as_str()?)
}

fn secs(d: Duration) -> Json {
    Json::from(d.as_secs_f64())
}

fn put_target(map: &mut Map<String, Json>, target: &Target) {
    match target {
        Target::Service { name } => map.insert("name".into(), name.clone().into()),
        Target::Instance { id } => map.insert("instance".into(), id.clone().into()),
        Target::Port { port } => map.insert("port".into(), (*port).into()),
        Target::Pid { pid } => map.insert("pid".into(), (*pid).into()),
        Target::Process { pattern } => map.insert("process".into(), pattern.clone().into()),
        Target::AllServices => None,
    };
}

fn put_options(map: &mut Map<String, Json>, options: &FaultOptions) {
    if let Some(id) = &options.id {
        map.insert("id".into(), id.clone().into());
    }
    match options.select {
        None => {}
        Some(Selection::One) => {
            map.insert("count".into(), 1.into());
        }
        Some(Selection::Count(n)) => {
            map.insert("count".into(), n.into());
        }
        Some(Selection::Percent(p)) => {
            map.insert("percent".into(), p.into());
        }
        Some(Selection::All) => {
            map.insert("all".into(), true.into());
        }
    }
    if let Some(lifetime) = options.lifetime {
        map.insert("lifetime".into(), secs(lifetime));
    }
    if options.dry_run {
        map.insert("dry_run".into(), true.into());
    }
    if let Some(seed) = options.seed {
        map.insert("seed".into(), seed.into());
    }
}

/// Writes network parameters: those the kind needs, and every other one that is set.
fn put_network(map: &mut Map<String, Json>, params: &NetworkParams, required: &[&str], full: bool) {
    let mut put = |key: &str, value: Json, set: bool| {
        if set || required.contains(&key) {
            map.insert(key.into(), value);
        }
    };
    put("latency", secs(params.delay), !params.delay.is_zero());
    put("jitter", secs(params.jitter), !params.jitter.is_zero());
    put("correlation", params.correlation.into(), params.correlation != 0.0);
    if let Some(d) = params.distribution {
        put("distribution", serde_json::to_value(d).unwrap_or_default(), true);
    }
    if full {
        put("loss", params.loss.into(), params.loss != 0.0);
        put("duplicate", params.duplicate.into(), params.duplicate != 0.0);
        put("corrupt", params.corrupt.into(), params.corrupt != 0.0);
        put("reorder", params.reorder.into(), params.reorder != 0.0);
        put("reorder_correlation", params.reorder_correlation.into(), params.reorder_correlation != 0.0);
        if let Some(rate) = params.rate {
            put("rate", rate.into(), true);
        }
    }
    if params.direction != Default::default() {
        put("direction", serde_json::to_value(params.direction).unwrap_or_default(), true);
    }
    if let Some(p) = params.protocol {
        put("protocol", serde_json::to_value(p).unwrap_or_default(), true);
    }
    if let Some(peer) = &params.peer {
        let (key, value) = peer.to_param();
        put(key, value.into(), true);
    }
}

fn put_opt<T: Serialize>(map: &mut Map<String, Json>, key: &str, value: &Option<T>) {
    if let Some(v) = value {
        map.insert(key.into(), serde_json::to_value(v).unwrap_or_default());
    }
}

impl Decode for Kill {
    fn decode(args: &Args) -> Result<Kill, RpcError> {
        let target = args.target(None)?;
        let signal = args.signal()?;
        Ok(Kill { target, signal, options: args.options()?, deregister: args.deregister()? })
    }
}

impl ChaosRequest for Kill {
    const METHOD: Method = Method::Kill;

    fn from_kwargs(kwargs: Kwargs) -> Result<Kill, RpcError> {
        Kill::decode_kwargs(kwargs)
    }

    fn to_kwargs(&self) -> Map<String, Json> {
        let mut map = Map::new();
        put_target(&mut map, &self.target);
        put_options(&mut map, &self.options);
        map.insert("signal".into(), self.signal.into());
        if self.deregister {
            map.insert("deregister".into(), true.into());
        }
        map
    }
}

impl Decode for InjectLatency {
    fn decode(args: &Args) -> Result<InjectLatency, RpcError> {
        // 2015 shape: latency in seconds, default 1; no target = every lymph service here.
        let params = args.network(NetworkParams { delay: Duration::from_secs(1), ..Default::default() })?;
        let target = args.target(Some(Target::AllServices))?;
        Ok(InjectLatency { target, params, options: args.options()? })
    }
}

impl ChaosRequest for InjectLatency {
    const METHOD: Method = Method::InjectLatency;

    fn from_kwargs(kwargs: Kwargs) -> Result<InjectLatency, RpcError> {
        InjectLatency::decode_kwargs(kwargs)
    }

    fn to_kwargs(&self) -> Map<String, Json> {
        let mut map = Map::new();
        put_target(&mut map, &self.target);
        put_options(&mut map, &self.options);
        put_network(&mut map, &self.params, &["latency"], false);
        map
    }
}

impl Decode for Inject {
    fn decode(args: &Args) -> Result<Inject, RpcError> {
        let kind: String = args.opt("kind")?.ok_or_else(|| RpcError::bad_arguments("Chaos.inject(): give kind"))?;
        let (target, fault) = args.fault(&kind)?;
        Ok(Inject { target, fault, options: args.options()? })
    }
}

impl ChaosRequest for Inject {
    const METHOD: Method = Method::Inject;

    fn from_kwargs(kwargs: Kwargs) -> Result<Inject, RpcError> {
        Inject::decode_kwargs(kwargs)
    }

    fn to_kwargs(&self) -> Map<String, Json> {
        let mut map = Map::new();
        put_target(&mut map, &self.target);
        put_options(&mut map, &self.options);
        map.insert("kind".into(), self.fault.kind().name().into());
        match &self.fault {
            Fault::Network { label, params } => put_network(&mut map, params, label.required(), true),
            Fault::Kill { signal } => {
                map.insert("signal".into(), (*signal).into());
            }
            Fault::Terminate | Fault::Pause => {}
            Fault::Cpu(spec) => {
                put_opt(&mut map, "workers", &spec.workers);
                put_opt(&mut map, "percent_cores", &spec.percent_cores);
                put_opt(&mut map, "load", &spec.load);
                if spec.in_target_cgroup {
                    map.insert("in_target_cgroup".into(), true.into());
                }
            }
            Fault::Memory(spec) => {
                put_opt(&mut map, "mib", &spec.mib);
                put_opt(&mut map, "percent_available", &spec.percent_available);
                if spec.in_target_cgroup {
                    map.insert("in_target_cgroup".into(), true.into());
                }
            }
            Fault::Disk(spec) => {
                put_opt(&mut map, "path", &spec.path);
                put_opt(&mut map, "mib", &spec.mib);
                put_opt(&mut map, "percent_free", &spec.percent_free);
                put_opt(&mut map, "floor_percent", &spec.floor_percent);
            }
        }
        map
    }
}

impl Inject {
    /// A fault of `kind` with `params` (the parameters `Chaos.inject` takes, e.g. a menu item of unleashed mode's
    /// configuration) aimed at `target`. `context` names the source in error messages.
    ///
    /// # Errors
    /// As decoding `Chaos.inject`; a target in `params` as well is "give one target".
    pub fn from_params(
        context: &str,
        kind: &str,
        params: &Map<String, Json>,
        target: Target,
    ) -> Result<Inject, RpcError> {
        let mut map = params.clone();
        map.insert("kind".into(), kind.into());
        put_target(&mut map, &target);
        Inject::from_json(context, &map)
    }

    /// Decodes the keyword arguments of `Chaos.inject` given as JSON, with `context` naming their source in error
    /// messages instead of `Chaos.inject`.
    ///
    /// # Errors
    /// As decoding `Chaos.inject`.
    pub fn from_json(context: &str, map: &Map<String, Json>) -> Result<Inject, RpcError> {
        let kwargs = Kwargs(map.iter().map(|(k, v)| (k.clone(), Value::from_json(v))).collect());
        let args = Args::new(context, Method::Inject.params(), kwargs)?;
        Inject::decode(&args)
    }
}

impl Decode for Faults {
    fn decode(args: &Args) -> Result<Faults, RpcError> {
        Ok(Faults { all: args.opt("all")?.unwrap_or(false) })
    }
}

impl ChaosRequest for Faults {
    const METHOD: Method = Method::Faults;

    fn from_kwargs(kwargs: Kwargs) -> Result<Faults, RpcError> {
        Faults::decode_kwargs(kwargs)
    }

    fn to_kwargs(&self) -> Map<String, Json> {
        let mut map = Map::new();
        if self.all {
            map.insert("all".into(), true.into());
        }
        map
    }
}

impl Decode for Revert {
    fn decode(args: &Args) -> Result<Revert, RpcError> {
        let id: String = args.opt("id")?.ok_or_else(|| RpcError::bad_arguments("Chaos.revert(): give id"))?;
        Ok(Revert { id })
    }
}

impl ChaosRequest for Revert {
    const METHOD: Method = Method::Revert;

    fn from_kwargs(kwargs: Kwargs) -> Result<Revert, RpcError> {
        Revert::decode_kwargs(kwargs)
    }

    fn to_kwargs(&self) -> Map<String, Json> {
        let mut map = Map::new();
        map.insert("id".into(), self.id.clone().into());
        map
    }
}

impl Decode for Events {
    fn decode(args: &Args) -> Result<Events, RpcError> {
        let defaults = Events::default();
        Ok(Events {
            since: args.opt("since")?.unwrap_or(defaults.since),
            limit: args.opt("limit")?.unwrap_or(defaults.limit),
        })
    }
}

impl ChaosRequest for Events {
    const METHOD: Method = Method::Events;

    fn from_kwargs(kwargs: Kwargs) -> Result<Events, RpcError> {
        Events::decode_kwargs(kwargs)
    }

    fn to_kwargs(&self) -> Map<String, Json> {
        let mut map = Map::new();
        map.insert("since".into(), self.since.into());
        map.insert("limit".into(), self.limit.into());
        map
    }
}

impl Decode for Unleash {
    fn decode(args: &Args) -> Result<Unleash, RpcError> {
        Ok(Unleash {
            seed: args.opt("seed")?,
            mean_interval: args.seconds("mean_interval")?,
            min_gap: args.seconds("min_gap")?,
            dry_run: args.opt("dry_run")?,
        })
    }
}

impl ChaosRequest for Unleash {
    const METHOD: Method = Method::Unleash;

    fn from_kwargs(kwargs: Kwargs) -> Result<Unleash, RpcError> {
        Unleash::decode_kwargs(kwargs)
    }

    fn to_kwargs(&self) -> Map<String, Json> {
        let mut map = Map::new();
        put_opt(&mut map, "seed", &self.seed);
        put_opt(&mut map, "mean_interval", &self.mean_interval.map(|d| d.as_secs_f64()));
        put_opt(&mut map, "min_gap", &self.min_gap.map(|d| d.as_secs_f64()));
        put_opt(&mut map, "dry_run", &self.dry_run);
        map
    }
}

macro_rules! no_arguments {
    ($($ty:ident),*) => {$(
        impl Decode for $ty {
            fn decode(_: &Args) -> Result<$ty, RpcError> {
                Ok($ty)
            }
        }

        impl ChaosRequest for $ty {
            const METHOD: Method = Method::$ty;

            fn from_kwargs(kwargs: Kwargs) -> Result<$ty, RpcError> {
                $ty::decode_kwargs(kwargs)
            }

            fn to_kwargs(&self) -> Map<String, Json> {
                Map::new()
            }
        }
    )*};
}

no_arguments!(Clear, Status, ListServices, Leash);

macro_rules! serde_as_kwargs {
    ($($ty:ident),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.to_kwargs().serialize(s)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                let map = Map::<String, Json>::deserialize(d)?;
                let kwargs = Kwargs(map.iter().map(|(k, v)| (k.clone(), Value::from_json(v))).collect());
                $ty::from_kwargs(kwargs).map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_as_kwargs!(
    Clear,
    Events,
    Faults,
    Inject,
    InjectLatency,
    Kill,
    Leash,
    ListServices,
    Pause,
    Revert,
    Status,
    Terminate,
    Unleash
);

macro_rules! requests {
    ($($variant:ident),*) => {
        impl Request {
            /// Decodes the keyword arguments of a call to `method`.
            ///
            /// # Errors
            /// `TypeError` / `ValueError` [`RpcError`]s naming the argument and what is wrong with it.
            pub fn decode(method: Method, kwargs: Kwargs) -> Result<Request, RpcError> {
                Ok(match method {
                    $(Method::$variant => Request::$variant($variant::from_kwargs(kwargs)?),)*
                })
            }

            /// The method this request calls.
            pub fn method(&self) -> Method {
                match self {
                    $(Request::$variant(_) => Method::$variant,)*
                }
            }

            /// The keyword arguments to send.
            pub fn to_kwargs(&self) -> Map<String, Json> {
                match self {
                    $(Request::$variant(r) => r.to_kwargs(),)*
                }
            }
        }

        $(
            impl From<$variant> for Request {
                fn from(r: $variant) -> Request {
                    Request::$variant(r)
                }
            }
        )*
    };
}

requests!(
    Clear,
    Events,
    Faults,
    Inject,
    InjectLatency,
    Kill,
    Leash,
    ListServices,
    Pause,
    Revert,
    Status,
    Terminate,
    Unleash
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{Direction, Protocol};

    fn kwargs(kv: &[(&str, Value)]) -> Kwargs {
        Kwargs(kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
    }

    fn s(text: &str) -> Value {
        Value::Str(text.into())
    }

    /// The parameter table of each method (what `lymph inspect Chaos` and api.json list, and what decoding lets
    /// through) agrees with the decoding: every listed parameter is looked at. Given a value no parameter takes
    /// (a map), decoding fails and names it; a listed parameter the decoder ignored would decode without error.
    #[test]
    fn every_listed_parameter_is_decoded() {
        let junk = Value::Map(vec![(s("x"), Value::Int(1))]);
        for method in Method::ALL {
            for &param in method.params() {
                let mut given = vec![(param, junk.clone())];
                // What a call needs besides the parameter under test: a kind that takes it, its required value.
                if *method == Method::Inject && param != "kind" {
                    let kind = crate::fault::FaultKind::ALL
                        .iter()
                        .find(|k| k.params().contains(&param))
                        .map_or("kill", |k| k.name());
                    given.push(("kind", s(kind)));
                    for (key, value) in [("latency", Value::Float(0.1)), ("loss", Value::Int(1))] {
                        if kind == key && param != key {
                            given.push((key, value));
                        }
                    }
                }
                if method.params().contains(&"name") && !TARGETING.contains(&param) {
                    given.push(("name", s("Echo")));
                }
                if *method == Method::Revert && param != "id" {
                    given.push(("id", s("f1")));
                }
                let err = Request::decode(*method, kwargs(&given)).expect_err(&format!(
                    "{}({param}=<map>) decoded: the parameter is listed but not read",
                    method.subject()
                ));
                assert!(err.to_string().contains(param), "{}({param}=<map>): {err}", method.subject());
            }
        }
    }

    #[test]
    fn old_call_shapes_still_work() {
        let kill = Kill::from_kwargs(kwargs(&[("name", s("Echo"))])).unwrap();
        assert_eq!(kill.target, Target::Service { name: "Echo".into() });
        assert_eq!(kill.signal, libc::SIGKILL);
        let latency = InjectLatency::from_kwargs(kwargs(&[("latency", Value::Int(1))])).unwrap();
        assert_eq!(latency.params.delay, Duration::from_secs(1));
        assert_eq!(latency.target, Target::AllServices);
        let default = InjectLatency::from_kwargs(Kwargs::default()).unwrap();
        assert_eq!(default.params.delay, Duration::from_secs(1), "the 2015 default latency");
    }

    #[test]
    fn bad_arguments_are_explained() {
        let err = Kill::from_kwargs(kwargs(&[("nmae", s("x"))])).unwrap_err();
        assert!(err.to_string().contains("unexpected argument `nmae`"), "{err}");
        let err = Kill::from_kwargs(kwargs(&[("port", Value::Int(70000))])).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        assert!(Kill::from_kwargs(kwargs(&[("name", Value::Int(3))])).is_err());
        let err = Kill::from_kwargs(Kwargs::default()).unwrap_err();
        assert!(err.to_string().contains("missing target"), "{err}");
        let inject = |kv: &[(&str, Value)]| Inject::from_kwargs(kwargs(kv));
        assert!(inject(&[("kind", s("latency")), ("name", s("E")), ("latency", Value::Int(-1))]).is_err());
        let err = inject(&[("kind", s("loss")), ("name", s("E")), ("loss", Value::Int(130))]).unwrap_err();
        assert!(err.to_string().contains("percentage"), "{err}");
        let err = inject(&[("kind", s("loss")), ("name", s("E")), ("mib", Value::Int(1)), ("loss", Value::Int(1))])
            .unwrap_err();
        assert!(err.to_string().contains("does not apply"), "{err}");
        let err = inject(&[("kind", s("warp"))]).unwrap_err();
        assert!(err.to_string().contains("unknown fault kind"), "{err}");
        assert_eq!(err.code(), Some(crate::ErrorCode::ValueError));
        let err = inject(&[("kind", s("kill")), ("name", s("E")), ("signal", s("SIGBOGUS"))]).unwrap_err();
        assert_eq!(err.to_string(), "ValueError: unknown signal `SIGBOGUS`");
        let err = Kill::from_kwargs(kwargs(&[("name", s("E")), ("count", Value::Int(1)), ("all", Value::Bool(true))]))
            .unwrap_err();
        assert_eq!(err.to_string(), "TypeError: Chaos.kill(): give one of count, percent, all");
        let err = Pause::from_kwargs(kwargs(&[("name", s("E")), ("lifetime", Value::Int(0))])).unwrap_err();
        assert_eq!(err.to_string(), "ValueError: lifetime must be above 0 seconds");
        let err = inject(&[("kind", s("cpu")), ("in_target_cgroup", Value::Bool(true))]).unwrap_err();
        assert!(err.to_string().contains("in_target_cgroup needs a target"), "{err}");
    }

    #[test]
    fn rates_in_tc_units_or_bytes() {
        assert_eq!(rate_value(&s("1mbit")), Some(125_000));
        assert_eq!(rate_value(&s("2mbps")), Some(2_000_000));
        assert_eq!(rate_value(&Value::Int(5000)), Some(5000));
        assert_eq!(rate_value(&s("fast")), None);
        assert_eq!(rate_value(&Value::Int(0)), None);
    }

    #[test]
    fn resource_faults_without_a_target_act_on_the_host() {
        let req = Inject::from_kwargs(kwargs(&[("kind", s("memory")), ("mib", Value::Int(64))])).unwrap();
        assert_eq!(req.target, Target::AllServices);
        assert_eq!(
            req.fault,
            Fault::Memory(MemorySpec { mib: Some(64), percent_available: None, in_target_cgroup: false })
        );
    }

    #[test]
    fn peers_decode_one_at_a_time_and_bad_ones_are_value_errors() {
        let inject = |extra: &[(&str, Value)]| {
            let mut args = vec![("kind", s("blackhole")), ("name", s("Payments"))];
            args.extend(extra.iter().cloned());
            Inject::from_kwargs(kwargs(&args))
        };
        let peer_of = |req: Inject| match req.fault {
            Fault::Network { params, .. } => params.peer,
            _ => panic!("not a network fault"),
        };
        assert_eq!(peer_of(inject(&[("peer", s("Billing"))]).unwrap()), Some(Peer::Service("Billing".into())));
        assert_eq!(
            peer_of(inject(&[("peer_cidr", s("10.1.0.0/16"))]).unwrap()),
            Some(Peer::Cidr { addr: "10.1.0.0".parse().unwrap(), len: 16 })
        );
        assert_eq!(
            peer_of(inject(&[("peer_cidr", s("fd00::1"))]).unwrap()),
            Some(Peer::Cidr { addr: "fd00::1".parse().unwrap(), len: 128 })
        );
        let err = |extra: &[(&str, Value)]| inject(extra).unwrap_err().to_string();
        assert!(err(&[("peer_cidr", s("10.1.0.0/33"))]).contains("prefix length must be 0-32"));
        assert!(err(&[("peer_cidr", s("ten/8"))]).contains("not a network"));
        assert!(err(&[("peer", s("A")), ("peer_host", s("b"))]).contains("one of peer"));
        assert!(err(&[("peer", s(" "))]).contains("empty"));
        assert!(err(&[("peer_host", s("b")), ("direction", s("from"))]).contains("direction"));
        let both = inject(&[("peer", s("Billing")), ("direction", s("both"))]).unwrap();
        let back = Kwargs(both.to_kwargs().iter().map(|(k, v)| (k.clone(), Value::from_json(v))).collect());
        assert_eq!(Inject::from_kwargs(back).unwrap(), both);
    }

    #[test]
    fn requests_survive_encoding_and_decoding() {
        let options = FaultOptions {
            id: Some("f-1".into()),
            select: Some(Selection::Percent(50.0)),
            lifetime: Some(Duration::from_millis(1500)),
            dry_run: true,
            seed: Some(7),
        };
        let requests: Vec<Request> = vec![
            Kill { target: Target::Pid { pid: 42 }, signal: 15, deregister: true, options: options.clone() }.into(),
            Terminate { target: Target::Process { pattern: "/echo/".into() }, options: FaultOptions::default() }.into(),
            Pause { target: Target::Instance { id: "abc".into() }, options: options.clone() }.into(),
            InjectLatency {
                target: Target::AllServices,
                params: NetworkParams {
                    delay: Duration::from_millis(200),
                    jitter: Duration::from_millis(20),
                    direction: Direction::Both,
                    protocol: Some(Protocol::Udp),
                    ..Default::default()
                },
                options: options.clone(),
            }
            .into(),
            Inject {
                target: Target::Port { port: 8080 },
                fault: Fault::Network {
                    label: FaultKind::Loss,
                    params: NetworkParams { loss: 30.0, rate: Some(125_000), ..Default::default() },
                },
                options: FaultOptions { select: Some(Selection::All), ..FaultOptions::default() },
            }
            .into(),
            Inject {
                target: Target::Service { name: "Echo".into() },
                fault: Fault::Network { label: FaultKind::Blackhole, params: NetworkParams::default() },
                options: FaultOptions::default(),
            }
            .into(),
            Inject {
                target: Target::AllServices,
                fault: Fault::Cpu(CpuSpec {
                    workers: Some(2),
                    percent_cores: None,
                    load: Some(50.0),
                    in_target_cgroup: false,
                }),
                options: FaultOptions::default(),
            }
            .into(),
            Inject {
                target: Target::AllServices,
                fault: Fault::Disk(DiskSpec {
                    path: Some("/tmp".into()),
                    mib: Some(10),
                    percent_free: None,
                    floor_percent: Some(10.0),
                }),
                options: FaultOptions::default(),
            }
            .into(),
            Inject {
                target: Target::Service { name: "Echo".into() },
                fault: Fault::Kill { signal: 2 },
                options: FaultOptions::default(),
            }
            .into(),
            Faults { all: true }.into(),
            Revert { id: "f-1".into() }.into(),
            Clear.into(),
            Events { since: 3, limit: 20 }.into(),
            Status.into(),
            ListServices.into(),
            Unleash { seed: Some(1), mean_interval: Some(Duration::from_secs(60)), min_gap: None, dry_run: Some(true) }
                .into(),
            Leash.into(),
        ];
        for req in requests {
            let kwargs = Kwargs(req.to_kwargs().iter().map(|(k, v)| (k.clone(), Value::from_json(v))).collect());
            let back = Request::decode(req.method(), kwargs).unwrap_or_else(|e| panic!("{req:?}: {e}"));
            assert_eq!(back, req);
        }
        // serde gives the same keyword arguments, and decodes with the same checks.
        let kill: Kill = serde_json::from_value(serde_json::json!({"name": "Echo", "signal": "term"})).unwrap();
        assert_eq!(kill.signal, libc::SIGTERM);
        assert!(serde_json::from_value::<Kill>(serde_json::json!({"nmae": "Echo"})).is_err());
    }

    #[test]
    fn menu_items_take_their_target_from_the_caller() {
        let params = serde_json::json!({"latency": "100ms", "lifetime": 30}).as_object().cloned().unwrap();
        let req =
            Inject::from_params("unleash menu", "latency", &params, Target::Service { name: "Echo".into() }).unwrap();
        assert_eq!(req.target, Target::Service { name: "Echo".into() });
        assert_eq!(req.options.lifetime, Some(Duration::from_secs(30)));
        let twice = serde_json::json!({"port": 80}).as_object().cloned().unwrap();
        let err = Inject::from_params("unleash menu", "blackhole", &twice, Target::Service { name: "E".into() });
        assert!(err.unwrap_err().to_string().contains("give one target"));
    }
}
