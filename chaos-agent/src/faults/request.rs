//! From the API's typed requests ([`chaos_api::request`]) to the agent's fault model ([`FaultSpec`]).

use chaos_api::{
    fault::{Fault, NetworkParams},
    request::{FaultOptions, Inject, InjectLatency, Kill, Pause, Terminate},
};

use super::{
    FaultAction, FaultSpec, Target,
    network::{Impairment, NetError},
};

/// Who asked for faults that come in over RPC.
const RPC_ORIGIN: &str = "rpc";

fn spec(target: Target, action: FaultAction, options: FaultOptions, deregister: bool) -> FaultSpec {
    FaultSpec {
        id: options.id,
        target,
        action,
        select: options.select,
        lifetime: options.lifetime,
        dry_run: options.dry_run,
        seed: options.seed,
        deregister,
        origin: RPC_ORIGIN.into(),
    }
}

/// A network impairment labelled `label`, checked as a whole (each parameter was checked on decoding; here
/// how they combine: reorder needs a delay, a distribution needs a jitter, limits).
///
/// # Errors
/// [`NetError::Invalid`] explaining the combination.
fn network_action(label: &str, params: NetworkParams, blackhole: bool, observe: bool) -> Result<FaultAction, NetError> {
    let impairment = Impairment {
        observe,
        blackhole,
        loss_percent: params.loss,
        delay: params.delay,
        jitter: params.jitter,
        delay_correlation: params.correlation,
        distribution: params.distribution,
        duplicate_percent: params.duplicate,
        corrupt_percent: params.corrupt,
        reorder_percent: params.reorder,
        reorder_correlation: params.reorder_correlation,
        rate_bytes_per_sec: params.rate,
        seed: None,
    };
    impairment.validate()?;
    Ok(FaultAction::Network {
        label: label.to_owned(),
        impairment,
        direction: params.direction,
        protocol: params.protocol,
        peer: params.peer,
    })
}

impl From<Kill> for FaultSpec {
    fn from(req: Kill) -> FaultSpec {
        spec(req.target, FaultAction::Kill { signal: req.signal }, req.options, req.deregister)
    }
}

impl From<Terminate> for FaultSpec {
    fn from(req: Terminate) -> FaultSpec {
        spec(req.target, FaultAction::Terminate, req.options, false)
    }
}

impl From<Pause> for FaultSpec {
    fn from(req: Pause) -> FaultSpec {
        spec(req.target, FaultAction::Pause, req.options, false)
    }
}

impl TryFrom<InjectLatency> for FaultSpec {
    type Error = NetError;

    fn try_from(req: InjectLatency) -> Result<FaultSpec, NetError> {
        let action = network_action("latency", req.params, false, false)?;
        Ok(spec(req.target, action, req.options, false))
    }
}

impl TryFrom<Inject> for FaultSpec {
    type Error = NetError;

    fn try_from(req: Inject) -> Result<FaultSpec, NetError> {
        let action = match req.fault {
            Fault::Network { label, params } => {
                let blackhole = label == chaos_api::FaultKind::Blackhole;
                let observe = label == chaos_api::FaultKind::Observe;
                network_action(label.name(), params, blackhole, observe)?
            }
            Fault::Kill { signal } => FaultAction::Kill { signal },
            Fault::Terminate => FaultAction::Terminate,
            Fault::Pause => FaultAction::Pause,
            Fault::Cpu(spec) => FaultAction::Cpu(spec),
            Fault::Memory(spec) => FaultAction::Memory(spec),
            Fault::Disk(spec) => FaultAction::Disk(spec),
        };
        Ok(spec(req.target, action, req.options, false))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chaos_api::{ChaosRequest, Kwargs, Value};

    use super::*;

    fn inject(kv: &[(&str, Value)]) -> Inject {
        Inject::from_kwargs(Kwargs(kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())).unwrap()
    }

    #[test]
    fn network_requests_become_impairments() {
        let req = inject(&[
            ("kind", Value::Str("delay".into())),
            ("name", Value::Str("Echo".into())),
            ("delay", Value::Str("200ms".into())),
        ]);
        let spec = FaultSpec::try_from(req).unwrap();
        assert_eq!(spec.target, Target::Service { name: "Echo".into() });
        match spec.action {
            FaultAction::Network { label, impairment, .. } => {
                assert_eq!((label.as_str(), impairment.delay), ("latency", Duration::from_millis(200)));
            }
            other => panic!("{other:?}"),
        }
        let blackhole = inject(&[("kind", Value::Str("blackhole".into())), ("port", Value::Int(80))]);
        let spec = FaultSpec::try_from(blackhole).unwrap();
        assert!(matches!(spec.action, FaultAction::Network { impairment, .. } if impairment.blackhole));
    }

    #[test]
    fn combinations_are_checked_by_the_engine() {
        let req = inject(&[
            ("kind", Value::Str("reorder".into())),
            ("name", Value::Str("Echo".into())),
            ("reorder", Value::Int(10)),
        ]);
        let err = FaultSpec::try_from(req).unwrap_err();
        assert!(err.to_string().contains("reorder needs a delay"), "{err}");
    }
}
