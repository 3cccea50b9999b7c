//! The `Chaos` lymph interface: the agent's RPC surface (listed with help text by `lymph inspect Chaos`).
//!
//! Keeps the 2015 call shapes working: `Chaos.kill {"name"}`, `Chaos.inject_latency {"name", "latency"}` and
//! `{"latency"}` (seconds; without a name: every lymph service on this host), `Chaos.list_services {}` (a map
//! keyed by service name, so iterating it still yields the names the old Scenario expected).
//!
//! The methods, their parameters and the checks on them are defined once in [`chaos_api`]: a call's keyword
//! arguments are decoded into the method's typed request ([`chaos_api::Request`]) and dispatched here.

use std::sync::Arc;

use chaos_api::{ErrorCode, Method, Request};

use crate::{
    discovery::Discovery,
    events::EventLog,
    faults::{FaultManager, FaultSpec},
    rpc::{BoxFuture, Interface, Kwargs, MethodInfo, RpcError, Value, to_value},
    unleash::Unleasher,
};

/// The `Chaos` interface.
pub(crate) struct Chaos {
    /// Faults.
    pub(crate) manager: Arc<FaultManager>,
    /// Discovery.
    pub(crate) discovery: Arc<Discovery>,
    /// Events.
    pub(crate) events: Arc<EventLog>,
    /// Unleashed mode.
    pub(crate) unleasher: Arc<Unleasher>,
    /// Fixed status fields (endpoint, version, network support …).
    pub(crate) status: serde_json::Value,
}

fn fault_error(err: crate::faults::FaultError) -> RpcError {
    RpcError::error(err.type_name(), err.to_string())
}

impl Chaos {
    async fn handle(self: Arc<Self>, method: &'static str, kwargs: Kwargs) -> Result<Value, RpcError> {
        let method = Method::from_name(method).expect("dispatch only routes known methods");
        match Request::decode(method, kwargs)? {
            Request::ListServices(_) => {
                let snap = self.discovery.snapshot();
                to_value(&snap.services)
            }
            Request::Status(_) => Ok(Value::from_json(&self.status().await)),
            Request::Kill(req) => self.apply(req.into()).await,
            Request::Terminate(req) => self.apply(req.into()).await,
            Request::Pause(req) => self.apply(req.into()).await,
            Request::InjectLatency(req) => self.apply(FaultSpec::try_from(req).map_err(invalid)?).await,
            Request::Inject(req) => self.apply(FaultSpec::try_from(req).map_err(invalid)?).await,
            Request::Faults(req) => to_value(&self.manager.list(req.all).await),
            Request::Revert(req) => self.manager.revert(&req.id).await.map_err(fault_error).and_then(|r| to_value(&r)),
            Request::Clear(_) => to_value(&self.manager.clear().await),
            Request::Events(req) => to_value(&self.events.query(req.since, req.limit.clamp(1, 10_000))),
            Request::Unleash(req) => {
                let state = self
                    .unleasher
                    .start(req.seed, req.mean_interval, req.min_gap, req.dry_run)
                    .map_err(|e| RpcError::error(ErrorCode::ValueError, e.to_string()))?;
                to_value(&state)
            }
            Request::Leash(_) => to_value(&self.unleasher.stop()),
        }
    }

    async fn apply(&self, spec: FaultSpec) -> Result<Value, RpcError> {
        self.manager.apply(spec).await.map_err(fault_error).and_then(|r| to_value(&r))
    }

    async fn status(&self) -> serde_json::Value {
        let mut status = self.status.clone();
        if let serde_json::Value::Object(map) = &mut status {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            let started = map.get("started").and_then(serde_json::Value::as_f64).unwrap_or(now);
            map.insert("uptime".into(), (now - started).into());
            if let (Some(engine), Some(net)) = (self.manager.network(), map.get_mut("network")) {
                net["interfaces"] = engine.attached().await.into();
                net["rules"] = engine.rule_count().await.into();
                net["peer_rules"] = engine.peer_rule_count().await.into();
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
        status
    }
}

/// A network impairment whose parameters do not go together.
fn invalid(err: crate::faults::network::NetError) -> RpcError {
    RpcError::error(ErrorCode::ValueError, err.to_string())
}

impl Interface for Chaos {
    fn name(&self) -> &'static str {
        crate::paths::SERVICE_NAME
    }

    fn methods(&self) -> &'static [MethodInfo] {
        Method::infos()
    }

    fn call(self: Arc<Self>, method: &'static str, kwargs: Kwargs) -> BoxFuture<Result<Value, RpcError>> {
        Box::pin(self.handle(method, kwargs))
    }
}
