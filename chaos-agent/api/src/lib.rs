//! The lymph-chaos `Chaos` API, shared by the agent, its command line, unleashed mode, the Rust `Scenario` client
//! and (through `api.json`) the Python client.
//!
//! This crate holds what both sides of a `Chaos` call agree on and nothing that touches the kernel: no eBPF,
//! netlink or process control lives here, so a test or a tool can depend on it without the agent.
//!
//! # Layout
//! - [`value`] — lymph's msgpack dialect (bounded decoder, encoder, special types, ext 101)
//! - [`wire`] — the 5/6-frame envelope, headers, ids
//! - [`node`] — a lymph RPC node: the ROUTER socket pair and its I/O thread (client and server side)
//! - [`client`] — calling services by name (ZooKeeper lookup) or endpoint
//! - [`method`] — the `Chaos` methods ([`Method`]): names, parameters, help (what `lymph inspect Chaos` shows)
//! - [`request`] — one typed request per method ([`request::Kill`], [`request::Inject`] …), decoded with checks
//! - [`reply`] — structured replies (events, unleashed mode)
//! - [`fault`] — fault kinds, targets, selections and their parameters
//! - [`units`] — durations, rates and signals as requests write them
//! - [`describe`] — the API as JSON (`api.json`, which the Python client checks itself against)
//! - [`error`] — error codes on the wire, handler and client errors
//! - [`scenario`] — `Scenario`: chaos from test code; [`selection`] — which instances a Scenario action hits
//! - [`kwargs`] — keyword arguments of a request
//! - [`registry`] — lymph's ZooKeeper registry: scan, register, watch
//! - [`instance`] — the registration record and the [`instance::Instance`] `Chaos.list_services` lists
#![warn(missing_docs, unreachable_pub)]

pub mod client;
pub mod describe;
pub mod error;
pub mod fault;
pub mod instance;
pub mod kwargs;
pub mod method;
pub mod node;
pub mod registry;
pub mod reply;
pub mod request;
pub mod scenario;
pub mod selection;
pub mod units;
pub mod value;
pub mod wire;

/// The lymph service (interface) name every agent registers as, and the prefix of its RPC subjects (`Chaos.kill`).
pub const SERVICE_NAME: &str = "Chaos";

/// Well-known names, under the path the agent's own `paths` module re-exports them from.
pub(crate) mod paths {
    pub(crate) use super::SERVICE_NAME;
}

pub use describe::describe;
pub use error::{ClientError, ErrorCode, RpcError};
pub use fault::{Fault, FaultKind, Selection, Target};
pub use kwargs::{Kwargs, to_value};
pub use method::{Method, MethodInfo};
pub use request::{ChaosRequest, Request};
pub use value::Value;
