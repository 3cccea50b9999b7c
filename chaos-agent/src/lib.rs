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
pub mod agent;
pub mod chaos;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod events;
pub mod experiment;
pub mod faults;
#[cfg(test)]
mod fuzz;
pub mod guardian;
pub mod journal;
pub mod lymph_config;
pub mod metrics;
pub mod paths;
pub mod procinfo;
pub mod rpc;
pub mod unleash;
mod util;

pub use chaos_api::{scenario, selection};
