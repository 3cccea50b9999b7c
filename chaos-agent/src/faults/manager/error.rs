//! Why a fault was not applied, typed all the way to the wire: [`FaultError::type_name`] is the error type lymph
//! clients see, its `Display` the message.

use super::super::{
    network::NetError,
    process::{self, PatternError, Protected},
    resource,
};

/// Why a fault was not applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FaultError {
    /// The service is not known to discovery.
    #[error("unknown service `{name}`; known services: {known}")]
    UnknownService {
        /// Name asked for.
        name: String,
        /// Known names.
        known: String,
    },
    /// The target exists but has nothing on this host.
    #[error("{target} has no instance on this host{detail}")]
    NotOnThisHost {
        /// Target description.
        target: String,
        /// Where its instances are.
        detail: String,
    },
    /// No such instance/process/listener.
    #[error("{0}")]
    NotFound(String),
    /// A guard, a cap or a budget refused.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// Bad parameters.
    #[error("{0}")]
    Invalid(String),
    /// A process pattern that does not parse.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// The network engine refused.
    #[error(transparent)]
    Network(#[from] NetError),
    /// Network faults are off.
    #[error("network faults are disabled on this agent: {0}")]
    NetworkDisabled(String),
    /// A resource fault could not start.
    #[error(transparent)]
    Resource(#[from] resource::ResourceError),
    /// The journal could not be written, so nothing was touched.
    #[error("cannot write the journal ({0}); nothing was done")]
    Journal(#[source] std::io::Error),
    /// No fault with that id.
    #[error("no fault `{0}` (neither active nor recently ended)")]
    UnknownFault(String),
    /// The agent is stopping: it applies nothing more.
    #[error("the agent is shutting down; nothing was done")]
    ShuttingDown,
}

impl From<Refusal> for FaultError {
    fn from(refusal: Refusal) -> Self {
        FaultError::Refused(refusal)
    }
}

impl FaultError {
    /// The error type name lymph clients see.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            FaultError::UnknownService { .. } => "UnknownService",
            FaultError::NotOnThisHost { .. } => "NotOnThisHost",
            FaultError::NotFound(_) => "NotFound",
            FaultError::Refused(_) => "Refused",
            FaultError::Invalid(_) | FaultError::Pattern(_) => "ValueError",
            FaultError::Network(NetError::NetemMissing) => "KernelFeatureMissing",
            FaultError::Network(NetError::NeedsNetem { .. }) => "KernelFeatureMissing",
            FaultError::Network(NetError::ShapingUnavailable { .. }) => "KernelFeatureMissing",
            FaultError::Network(NetError::Classifier(_)) => "KernelFeatureMissing",
            FaultError::Network(NetError::Invalid(_)) => "ValueError",
            FaultError::Network(NetError::Conflict { .. }) => "Conflict",
            FaultError::Network(_) => "NetworkError",
            FaultError::NetworkDisabled(_) => "NetworkDisabled",
            FaultError::Resource(resource::ResourceError::Refused(_)) => "Refused",
            FaultError::Resource(_) => "ResourceError",
            FaultError::Journal(_) => "InternalError",
            FaultError::UnknownFault(_) => "UnknownFault",
            FaultError::ShuttingDown => "ShuttingDown",
        }
    }
}

/// Why a guard, a cap or a budget refused a fault.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The target process is protected (init, the agent, ZooKeeper, sshd, a protected pattern, not a lymph
    /// instance and not allowed by the configuration …).
    #[error(transparent)]
    Protected(#[from] Protected),
    /// The port belongs to the agent, ZooKeeper, sshd or DNS.
    #[error("port {port} is protected (the agent's own ports, ZooKeeper's, sshd's or DNS)")]
    ProtectedPort {
        /// The port.
        port: u16,
    },
    /// Nothing of this host listens on the port, so no guard can look at its owner.
    #[error(
        "no process of this host listens on {on} {port}, so no guard can check whose it is (set \
         faults.allow_unbound_ports to allow faults on such ports)"
    )]
    UnboundPort {
        /// `TCP port`, `UDP port` or `TCP or UDP port`.
        on: &'static str,
        /// The port.
        port: u16,
    },
    /// A signal that stops a process with nothing to resume it.
    #[error("{signal} stops a process with no end: use a pause fault, which resumes it at the end of its lifetime")]
    StoppingSignal {
        /// Its name.
        signal: String,
    },
    /// `faults.max_active` reached.
    #[error(
        "{active} faults are active and {in_flight} being applied, the most faults.max_active allows; revert one first"
    )]
    TooManyFaults {
        /// Active faults.
        active: usize,
        /// Requests being applied besides this one.
        in_flight: usize,
    },
    /// `faults.max_instance_share` would be exceeded.
    #[error(
        "this would hit {hit} of {total} instances of {service} ({share:.0} %), above faults.max_instance_share = \
         {cap} %"
    )]
    InstanceShare {
        /// Instances hit with this fault.
        hit: usize,
        /// Instances of the service.
        total: usize,
        /// The service.
        service: String,
        /// `hit` as a percentage of `total`.
        share: f64,
        /// The cap (percent).
        cap: f64,
    },
    /// `faults.max_memory_percent` would be exceeded.
    #[error(
        "memory faults would hold {mib} MiB together, above faults.max_memory_percent = {percent} % of {total} MiB"
    )]
    MemoryBudget {
        /// What all memory faults would hold.
        mib: u64,
        /// The cap (percent of the machine's memory).
        percent: f64,
        /// The machine's memory (MiB).
        total: u64,
    },
    /// Judged again right before the signal, no process could be signalled: refused by a guard (it changed since it
    /// was resolved), or gone.
    #[error("{}", join(refused, errors))]
    AtSignal {
        /// Processes a guard protects now.
        refused: Vec<Protected>,
        /// Processes that could not be signalled.
        errors: Vec<String>,
    },
}

fn join(refused: &[Protected], errors: &[String]) -> String {
    refused.iter().map(ToString::to_string).chain(errors.iter().cloned()).collect::<Vec<_>>().join("; ")
}

impl Refusal {
    /// A signal that stops a process with no end.
    pub(super) fn stopping_signal(signal: i32) -> Option<Refusal> {
        [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU]
            .contains(&signal)
            .then(|| Refusal::StoppingSignal { signal: process::signal_name(signal) })
    }
}

/// Fault ids name files and journal entries: `[A-Za-z0-9._-]{1,64}`, checked once where requests come in.
///
/// # Errors
/// [`FaultError::Invalid`] for anything else.
pub(crate) fn validate_id(id: &str) -> Result<(), FaultError> {
    let ok = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(FaultError::Invalid("a fault id is 1 to 64 characters among A-Z a-z 0-9 . _ - (no `/`, no spaces)".into()))
    }
}
