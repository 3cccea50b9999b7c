//! lymph RPC: wire format, the socket pair, request dispatch, the client.
//!
//! # Layout
//! - [`value`] — lymph's msgpack dialect (bounded decoder, encoder, special types, ext 101)
//! - [`wire`] — the 5/6-frame envelope, headers, ids
//! - [`node`] — the ROUTER pair and its I/O thread; pings answered inline; the client side (`request`)
//! - [`server`] — turns requests into calls on [`Interface`]s, with lymph's built-in `lymph.*` methods
//! - [`client`] — calling services by name (ZooKeeper lookup) or endpoint
//! - [`access`] — who may connect: a ZAP handler checking peer addresses (`rpc.allowed_clients`) and CURVE keys
//!
//! Replies follow lymph's rules (`lymph/core/container.py handle_request`): unknown interface or method → NACK;
//! errors a person should read (bad arguments, refused targets, missing kernel features) → ERROR with a type name
//! and a message, which lymph clients raise as `RemoteError.<type>`.

pub mod access;
pub mod client;
pub mod node;
pub mod server;
pub mod value;
pub mod wire;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use serde::de::DeserializeOwned;
pub use value::Value;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

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
        /// Exception class name the client will raise.
        type_name: String,
        /// Human-readable explanation.
        message: String,
    },
}

impl RpcError {
    /// An ERROR reply.
    pub fn error(type_name: impl Into<String>, message: impl Into<String>) -> RpcError {
        RpcError::Error { type_name: type_name.into(), message: message.into() }
    }

    /// An ERROR for bad arguments (`TypeError`, as Python would raise for wrong kwargs).
    pub fn bad_arguments(message: impl Into<String>) -> RpcError {
        RpcError::error("TypeError", message)
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

/// Keyword arguments of a request, in wire order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Kwargs(pub Vec<(String, Value)>);

impl Kwargs {
    /// Builds kwargs from a decoded body, which must be a map with text keys.
    ///
    /// # Errors
    /// A `BadRequest` ERROR when the body is not a map of keyword arguments.
    pub fn from_body(body: Value) -> Result<Kwargs, RpcError> {
        match body {
            Value::Map(entries) => entries
                .into_iter()
                .map(|(k, v)| match k {
                    Value::Str(k) => Ok((k, v)),
                    other => Err(RpcError::error(
                        "BadRequest",
                        format!("keyword argument names must be strings, got {} {other}", other.kind()),
                    )),
                })
                .collect::<Result<_, _>>()
                .map(Kwargs),
            // lymph calls `method(**None)` for a nil body, which only works for methods without parameters.
            Value::Nil => Ok(Kwargs::default()),
            other => Err(RpcError::error(
                "BadRequest",
                format!("the request body must be a map of keyword arguments, got {}", other.kind()),
            )),
        }
    }

    /// Decodes the kwargs into a parameter struct (use `#[serde(deny_unknown_fields)]` on it so unexpected
    /// arguments are refused, as Python refuses them).
    ///
    /// # Errors
    /// A `TypeError` ERROR naming the missing, unexpected or mistyped argument.
    pub fn parse<T: DeserializeOwned>(&self, method: &str) -> Result<T, RpcError> {
        let json = serde_json::Value::Object(self.0.iter().map(|(k, v)| (k.clone(), v.to_json())).collect());
        serde_json::from_value(json).map_err(|err| RpcError::bad_arguments(format!("{method}(): {err}")))
    }

    /// Whether there are no arguments.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A lymph interface served by this node (e.g. `Chaos`).
pub trait Interface: Send + Sync + 'static {
    /// Interface (service) name.
    fn name(&self) -> &'static str;
    /// Methods, for `lymph.inspect` and dispatch.
    fn methods(&self) -> &'static [MethodInfo];
    /// Handles one call. `method` is one of [`Interface::methods`].
    fn call(self: Arc<Self>, method: &'static str, kwargs: Kwargs) -> BoxFuture<Result<Value, RpcError>>;
}

/// Serializes a reply value through JSON (keeps integers as integers, maps with string keys).
///
/// # Errors
/// An `InternalError` ERROR if the value cannot be represented (never for plain data types).
pub fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, RpcError> {
    serde_json::to_value(value)
        .map(|json| Value::from_json(&json))
        .map_err(|err| RpcError::error("InternalError", format!("cannot encode the reply: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct KillParams {
        name: String,
        #[serde(default)]
        count: Option<u32>,
    }

    #[test]
    fn kwargs_parse_reports_missing_extra_and_mistyped_arguments() {
        let ok = Kwargs(vec![("name".into(), Value::Str("Echo".into()))]);
        assert_eq!(ok.parse::<KillParams>("kill").unwrap(), KillParams { name: "Echo".into(), count: None });

        let missing = Kwargs::default().parse::<KillParams>("kill").unwrap_err();
        assert!(missing.to_string().contains("missing field `name`"), "{missing}");

        let extra = Kwargs(vec![("name".into(), Value::Str("x".into())), ("bogus".into(), Value::Int(1))]);
        assert!(extra.parse::<KillParams>("kill").unwrap_err().to_string().contains("unknown field `bogus`"));

        let mistyped = Kwargs(vec![("name".into(), Value::Int(3))]);
        let err = mistyped.parse::<KillParams>("kill").unwrap_err();
        assert!(matches!(&err, RpcError::Error { type_name, .. } if type_name == "TypeError"), "{err}");
    }

    #[test]
    fn body_must_be_a_map_with_text_keys() {
        assert!(Kwargs::from_body(Value::Array(vec![])).is_err());
        assert!(Kwargs::from_body(Value::Map(vec![(Value::Int(1), Value::Nil)])).is_err());
        assert!(Kwargs::from_body(Value::Nil).unwrap().is_empty());
    }
}
