//! lymph-chaos: a chaos monkey agent for lymph services.
//!
//! All logic lives in this library; the `lymph-chaos` binary parses arguments and calls in here.
//!
//! # Layout
//! - [`agent`] — the lifecycle: start everything, serve, revert and clean up on shutdown
//! - [`rpc`] — lymph RPC (ZeroMQ + msgpack): wire format, socket pair, dispatch, client
//! - [`discovery`] — ZooKeeper registry + local processes → service instances with their pids
//! - [`chaos`] — the `Chaos` RPC interface
//! - [`faults`] — fault model and lifecycle; process, network and resource faults
//! - [`journal`], [`events`], [`guardian`] — what to undo, what happened, who undoes it if the agent dies
//! - [`unleash`] — random fault schedule
//! - [`scenario`] — the client library for test code (`Scenario`, from `chaos_api`); [`selection`] — which
//!   instances it hits
//! - [`experiment`] — chaos experiments: steady state, method, safeguards, report (`lymph-chaos run`)
//! - [`config`], [`paths`], [`metrics`]
#![warn(missing_docs, unreachable_pub)]

pub mod agent;
pub(crate) mod chaos;
pub mod cli;
pub mod config;
pub(crate) mod discovery;
pub(crate) mod events;
pub mod experiment;
pub mod faults;
#[cfg(test)]
mod fuzz;
pub mod guardian;
pub(crate) mod journal;
pub mod lymph_config;
pub(crate) mod metrics;
pub mod paths;
pub(crate) mod procinfo;
pub mod rpc;
pub(crate) mod unleash;
mod util;

pub use chaos_api::{scenario, selection};
