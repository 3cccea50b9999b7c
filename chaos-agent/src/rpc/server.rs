//! Request dispatch: subject → interface method, lymph's built-ins, per-method metrics.
//!
//! Every request runs in its own tokio task, so a slow method never holds up another (pings never even get here:
//! the I/O thread answers them).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::FutureExt;
use serde::Deserialize;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    Interface, Kwargs, MethodInfo, RpcError,
    node::{Outcome, Request, RpcNode},
    value::{self, Value},
};

/// How long a shutdown waits for the requests in flight (a kill waits a second for its process to exit).
pub(crate) const DRAIN: Duration = Duration::from_secs(5);

/// The answer to a request that arrives while the agent shuts down.
pub(crate) fn shutting_down() -> RpcError {
    RpcError::error(chaos_api::ErrorCode::ShuttingDown, "the agent is shutting down; nothing was done")
}

pub(crate) use super::node::MAX_BODY;

/// lymph's built-in interface, served by every node.
const BUILTINS: &[MethodInfo] = &[
    MethodInfo {
        name: "change_loglevel",
        params: &["qualname", "loglevel", "period"],
        help: "Set the log level of a logger (module path) for `period` seconds (default 60).",
    },
    MethodInfo { name: "get_metrics", params: &[], help: "Metrics of this process: [name, value, tags] records." },
    MethodInfo {
        name: "inspect",
        params: &[],
        help: "Every RPC method of this process with its parameters and help text.",
    },
    MethodInfo { name: "ping", params: &["payload"], help: "Heartbeat: returns the payload." },
    MethodInfo { name: "status", params: &[], help: "This process's endpoint and identity." },
];

/// Changes log levels at runtime (implemented by the binary's logging setup).
pub trait LogControl: Send + Sync {
    /// Sets `qualname` (a module path, or "" for everything) to `level` for `period`.
    ///
    /// # Errors
    /// A message when the level or name is not understood.
    fn change(&self, qualname: &str, level: &str, period: Duration) -> Result<(), String>;
}

/// Latency buckets (seconds) for the per-method histogram.
pub(crate) const LATENCY_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];

/// Counters for one method.
#[derive(Clone, Debug, Default)]
pub(crate) struct MethodStats {
    /// Calls.
    pub(crate) calls: u64,
    /// Calls answered with ERROR or NACK.
    pub(crate) errors: u64,
    /// Sum of handling time.
    pub(crate) seconds_sum: f64,
    /// Cumulative counts per [`LATENCY_BUCKETS`] bound.
    pub(crate) buckets: [u64; LATENCY_BUCKETS.len()],
}

/// Dispatches requests to interfaces.
pub(crate) struct Server {
    node: RpcNode,
    interfaces: BTreeMap<&'static str, Arc<dyn Interface>>,
    log: Option<Arc<dyn LogControl>>,
    stats: Mutex<BTreeMap<String, MethodStats>>,
}

impl Server {
    /// A server answering on `node` with the given interfaces.
    pub(crate) fn new(
        node: RpcNode,
        interfaces: Vec<Arc<dyn Interface>>,
        log: Option<Arc<dyn LogControl>>,
    ) -> Arc<Server> {
        Arc::new(Server {
            node,
            interfaces: interfaces.into_iter().map(|i| (i.name(), i)).collect(),
            log,
            stats: Mutex::new(BTreeMap::new()),
        })
    }

    /// The node this server answers on.
    pub(crate) fn node(&self) -> &RpcNode {
        &self.node
    }

    /// Per-method counters (`Interface.method` → stats).
    pub(crate) fn method_stats(&self) -> BTreeMap<String, MethodStats> {
        self.stats.lock().expect("poisoned").clone()
    }

    /// Serves requests until the channel closes or `stop` is cancelled, then shuts down in order (as a server
    /// should before its state goes away): it stops taking requests (the node answers new ones
    /// `ShuttingDown`), answers the queued ones the same, and waits for the ones in flight, at most
    /// [`DRAIN`]. When this returns, no handler runs any more.
    pub(crate) async fn serve(self: Arc<Self>, mut requests: mpsc::Receiver<Request>, stop: CancellationToken) {
        let mut running = JoinSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                req = requests.recv() => match req {
                    Some(req) => {
                        running.spawn(self.clone().answer(req));
                    }
                    None => break,
                },
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
        requests.close();
        while let Some(req) = requests.recv().await {
            self.node.reply(&req.msg, Outcome::Failed(shutting_down()));
        }
        let drained = tokio::time::timeout(DRAIN, async { while running.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(requests = running.len(), "requests still running {DRAIN:?} after the shutdown began: abandoned");
            running.shutdown().await;
        }
    }

    /// Handles one request and replies.
    async fn answer(self: Arc<Self>, req: Request) {
        let subject = req.msg.subject.clone();
        // A handler that panics must not take the request (or the agent) down with it.
        let outcome = match std::panic::AssertUnwindSafe(self.handle(&req)).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(%subject, %what, "handler panicked");
                Outcome::Failed(RpcError::error(
                    "InternalError",
                    format!("the agent failed handling {subject}: {what}"),
                ))
            }
        };
        let failed = matches!(outcome, Outcome::Failed(_));
        if let Outcome::Failed(err) = &outcome {
            debug!(%subject, source = %req.msg.source, %err, "request failed");
        }
        self.node.reply(&req.msg, outcome);
        self.record(&subject, failed, req.received.elapsed());
    }

    fn record(&self, subject: &str, failed: bool, took: Duration) {
        let mut stats = self.stats.lock().expect("poisoned");
        // Only known methods get their own series; the rest share one, so hostile subjects cannot grow the map.
        let key = if self.lookup(subject).is_some() { subject } else { "(unknown)" };
        let entry = stats.entry(key.to_owned()).or_default();
        entry.calls += 1;
        entry.errors += u64::from(failed);
        let secs = took.as_secs_f64();
        entry.seconds_sum += secs;
        for (bucket, bound) in entry.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if secs <= bound {
                *bucket += 1;
            }
        }
    }

    fn lookup(&self, subject: &str) -> Option<(&'static str, Option<&Arc<dyn Interface>>)> {
        let (iface, method) = subject.rsplit_once('.')?;
        if iface == "lymph" {
            return BUILTINS.iter().find(|m| m.name == method).map(|m| (m.name, None));
        }
        let interface = self.interfaces.get(iface)?;
        interface.methods().iter().find(|m| m.name == method).map(|m| (m.name, Some(interface)))
    }

    async fn handle(&self, req: &Request) -> Outcome {
        let Some((method, interface)) = self.lookup(&req.msg.subject) else {
            return Outcome::Failed(RpcError::Nack { reason: format!("unknown method {}", req.msg.subject) });
        };
        let kwargs = match decode_kwargs(&req.msg.body) {
            Ok(kwargs) => kwargs,
            Err(err) => return Outcome::Failed(err),
        };
        let result = match interface {
            Some(interface) => interface.clone().call(method, kwargs).await,
            None => self.builtin(method, &kwargs),
        };
        match result {
            Ok(value) => Outcome::Reply(value::encode(&value)),
            Err(err) => Outcome::Failed(err),
        }
    }

    fn builtin(&self, method: &str, kwargs: &Kwargs) -> Result<Value, RpcError> {
        match method {
            "status" => {
                kwargs.parse::<NoParams>("lymph.status")?;
                super::to_value(&serde_json::json!({
                    "endpoint": self.node.endpoint(),
                    "identity": self.node.identity(),
                }))
            }
            "inspect" => {
                kwargs.parse::<NoParams>("lymph.inspect")?;
                Ok(self.inspect())
            }
            "change_loglevel" => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct P {
                    qualname: String,
                    loglevel: String,
                    #[serde(default = "default_period")]
                    period: f64,
                }
                fn default_period() -> f64 {
                    60.0
                }
                let p: P = kwargs.parse("lymph.change_loglevel")?;
                let log = self
                    .log
                    .as_ref()
                    .ok_or_else(|| RpcError::error("NotSupported", "log levels are fixed in this process"))?;
                let period = Duration::try_from_secs_f64(p.period).map_err(|_| {
                    RpcError::error(
                        "ValueError",
                        format!("period must be a positive number of seconds, got {}", p.period),
                    )
                })?;
                log.change(&p.qualname, &p.loglevel, period).map_err(|msg| RpcError::error("ValueError", msg))?;
                Ok(Value::Nil)
            }
            "get_metrics" => {
                kwargs.parse::<NoParams>("lymph.get_metrics")?;
                Ok(self.metrics())
            }
            // `ping` reaches here only if the I/O thread did not take it (it always does).
            "ping" => Ok(kwargs.0.iter().find(|(k, _)| k == "payload").map(|(_, v)| v.clone()).unwrap_or(Value::Nil)),
            other => Err(RpcError::Nack { reason: format!("unknown built-in lymph.{other}") }),
        }
    }

    /// `lymph.inspect`: `{"methods": [{"name", "version", "params", "help"}, …]}` sorted by name, as lymph does.
    fn inspect(&self) -> Value {
        let mut methods: Vec<(String, &MethodInfo)> =
            BUILTINS.iter().map(|m| (format!("lymph.{}", m.name), m)).collect();
        for (name, interface) in &self.interfaces {
            methods.extend(interface.methods().iter().map(|m| (format!("{name}.{}", m.name), m)));
        }
        methods.sort_by(|a, b| a.0.cmp(&b.0));
        let s = |t: &str| Value::Str(t.to_owned());
        let list = methods
            .into_iter()
            .map(|(name, m)| {
                Value::Map(vec![
                    (s("name"), Value::Str(name)),
                    (s("version"), s("None")),
                    (s("params"), Value::Array(m.params.iter().map(|p| s(p)).collect())),
                    (s("help"), s(m.help)),
                ])
            })
            .collect();
        Value::Map(vec![(s("methods"), Value::Array(list))])
    }

    /// `lymph.get_metrics`: `[name, value, tags]` records like lymph's aggregator.
    fn metrics(&self) -> Value {
        let s = |t: &str| Value::Str(t.to_owned());
        let node = self.node.stats();
        let counter = |name: &str, v: &std::sync::atomic::AtomicU64| {
            Value::Array(vec![
                s(name),
                Value::Int(v.load(std::sync::atomic::Ordering::Relaxed) as i64),
                Value::Map(vec![]),
            ])
        };
        let mut out = vec![
            counter("rpc.requests", &node.requests),
            counter("rpc.pings", &node.pings),
            counter("rpc.malformed", &node.malformed),
            counter("rpc.undeliverable", &node.undeliverable),
        ];
        for (subject, stats) in self.method_stats() {
            let tags = Value::Map(vec![(s("method"), Value::Str(subject))]);
            out.push(Value::Array(vec![s("rpc.calls"), Value::Int(stats.calls as i64), tags.clone()]));
            out.push(Value::Array(vec![s("rpc.errors"), Value::Int(stats.errors as i64), tags]));
        }
        Value::Array(out)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

fn decode_kwargs(body: &[u8]) -> Result<Kwargs, RpcError> {
    if body.len() > MAX_BODY {
        return Err(RpcError::error(
            "BadRequest",
            format!("request body is {} bytes; the agent accepts at most {MAX_BODY}", body.len()),
        ));
    }
    let value = value::decode(body).map_err(|err| {
        warn!(%err, "request body is not msgpack");
        RpcError::error("BadRequest", format!("request body is not valid msgpack: {err}"))
    })?;
    Kwargs::from_body(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_and_garbage_bodies_get_clear_errors() {
        let big = vec![0xc0; MAX_BODY + 1];
        assert!(matches!(decode_kwargs(&big), Err(RpcError::Error { type_name, .. }) if type_name == "BadRequest"));
        let err = decode_kwargs(b"\xc1\xc1").unwrap_err();
        assert!(err.to_string().contains("not valid msgpack"), "{err}");
        let err = decode_kwargs(b"\x93\x01\x02\x03").unwrap_err();
        assert!(err.to_string().contains("got list"), "{err}");
    }
}
