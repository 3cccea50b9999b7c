//! Errors on the wire: the `type` names of lymph ERROR replies the agent sends ([`ErrorCode`]), what a handler
//! returns ([`RpcError`]) and what a caller gets back ([`ClientError`]).
//!
//! A lymph ERROR reply carries `{"type": <exception class name>, "message": <text>}`; lymph clients raise it as
//! `RemoteError.<type>`, the Python client maps it to its own exception classes by the same names.

use std::{fmt, time::Duration};

macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// The error type names `Chaos` methods answer with (the `type` of an ERROR reply).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $name,)*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The name on the wire (`"ValueError"`).
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => stringify!($name),)*
                }
            }

            /// What the code means, for `api.json` and generated documentation.
            pub fn meaning(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => concat!($($doc),*).trim_start(),)*
                }
            }
        }
    };
}

error_codes! {
    /// Wrong keyword arguments: unknown, missing, of the wrong type or combined in a way the method refuses.
    TypeError,
    /// An argument has the right type but an unusable value (a negative duration, a percentage above 100, an unknown
    /// fault kind or signal).
    ValueError,
    /// The request itself is malformed: the body is not a map of keyword arguments, not msgpack, or too large.
    BadRequest,
    /// The agent is busy: too many requests queued; retry later.
    Overloaded,
    /// The agent is shutting down: the request was not carried out.
    ShuttingDown,
    /// The method exists but this process cannot do it (e.g. change its log level).
    NotSupported,
    /// No service of that name is known (ZooKeeper or local lymph processes).
    UnknownService,
    /// The service exists, but has no instance on this agent's host.
    NotOnThisHost,
    /// The target (pid, port, instance, process pattern) matches nothing this agent may act on.
    NotFound,
    /// A guard refused the fault (protected process, caps, the agent itself, a disk floor …).
    Refused,
    /// The kernel lacks what the fault needs (netem, the classifier, shaping).
    KernelFeatureMissing,
    /// The fault would overlap an active fault on the same port and direction.
    Conflict,
    /// A network operation failed.
    NetworkError,
    /// Network faults are off on this agent (`--no-network-control` or no classifier).
    NetworkDisabled,
    /// A resource fault (CPU, memory, disk) could not be started.
    ResourceError,
    /// No active fault has that id (it expired or was reverted).
    UnknownFault,
    /// A bug or an unexpected failure inside the agent.
    InternalError,
}

impl ErrorCode {
    /// The code with this wire name, if it is one of ours (lymph services may raise any exception name).
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.name() == name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<ErrorCode> for String {
    fn from(code: ErrorCode) -> String {
        code.name().to_owned()
    }
}

/// What a handler returns when it cannot produce a result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// NACK (lymph: unknown method, refused request).
    #[error("NACK: {reason}")]
    Nack {
        /// Logged on our side only; a NACK carries no body.
        reason: String,
    },
    /// ERROR reply with `{"type": type_name, "message": message}`.
    #[error("{type_name}: {message}")]
    Error {
        /// Exception class name the client will raise (one of [`ErrorCode`] for `Chaos` methods).
        type_name: String,
        /// Human-readable explanation.
        message: String,
    },
}

impl RpcError {
    /// An ERROR reply of type `type_name` (an [`ErrorCode`], or any name for other interfaces).
    pub fn error(type_name: impl Into<String>, message: impl Into<String>) -> RpcError {
        RpcError::Error { type_name: type_name.into(), message: message.into() }
    }

    /// An ERROR for bad arguments (`TypeError`, as Python would raise for wrong kwargs).
    pub fn bad_arguments(message: impl Into<String>) -> RpcError {
        RpcError::error(ErrorCode::TypeError, message)
    }

    /// An ERROR for an unusable argument value (`ValueError`).
    pub fn bad_value(message: impl Into<String>) -> RpcError {
        RpcError::error(ErrorCode::ValueError, message)
    }

    /// The code of an ERROR, when it is one of ours.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RpcError::Error { type_name, .. } => ErrorCode::from_name(type_name),
            RpcError::Nack { .. } => None,
        }
    }
}

/// Errors of the client side.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The peer answered NACK.
    #[error("{subject} at {endpoint} answered NACK (unknown method, wrong arguments or version)")]
    Nack {
        /// What we called.
        subject: String,
        /// Where.
        endpoint: String,
    },
    /// The peer answered ERROR.
    #[error("remote error {type_name}: {message}")]
    Remote {
        /// Exception type name.
        type_name: String,
        /// Its message.
        message: String,
    },
    /// No reply in time.
    #[error("{subject} at {endpoint}: no reply within {after:?}")]
    Timeout {
        /// What we called.
        subject: String,
        /// Where.
        endpoint: String,
        /// The timeout.
        after: Duration,
    },
    /// No live instance of the service.
    #[error("no instance of service `{service}` is registered{detail}")]
    LookupFailure {
        /// Service name.
        service: String,
        /// Extra context (e.g. the registry error), starting with ": " or empty.
        detail: String,
    },
    /// The request could not be encoded or the reply decoded.
    #[error("{0}")]
    Codec(String),
}

impl ClientError {
    /// The code of an ERROR reply, when it is one a `Chaos` agent sends.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote { type_name, .. } => ErrorCode::from_name(type_name),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_their_wire_names() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_name(code.name()), Some(*code));
            assert!(!code.meaning().is_empty(), "{code} has no meaning");
        }
        assert_eq!(ErrorCode::from_name("KeyError"), None);
        assert_eq!(RpcError::bad_arguments("x").code(), Some(ErrorCode::TypeError));
    }
}
