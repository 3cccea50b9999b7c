//! Structured replies of `Chaos` methods: `events` ([`Event`]), `unleash` and `leash` ([`UnleashState`]).
//! `list_services` answers a map of service name to [`crate::instance::Instance`]s.
//!
//! Fault reports (the answer of `kill`, `inject`, `faults`, …) and `status` are not typed here yet: they carry the
//! agent's whole fault model (netem settings, counters, resource usage), so clients read them as JSON.

use serde::{Deserialize, Serialize};

/// What happened.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A fault took effect.
    Applied,
    /// A fault was undone on request (or at shutdown).
    Reverted,
    /// A fault reached the end of its lifetime.
    Expired,
    /// A request was refused (guards, unknown target, missing kernel feature …).
    Refused,
    /// A dry run: what would have been done.
    DryRun,
    /// A fault followed its target to a new pid/port.
    Followed,
    /// The agent started.
    AgentStart,
    /// The agent stopped.
    AgentStop,
    /// Leftovers of an earlier run were cleaned up.
    Reconcile,
    /// Unleashed mode started.
    Unleash,
    /// Unleashed mode stopped.
    Leash,
}

/// One recorded event.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct Event {
    /// Sequence number (increasing; `Chaos.events(since=…)` takes it).
    pub seq: u64,
    /// Unix time in seconds.
    pub time: f64,
    /// What happened.
    pub action: Option<Action>,
    /// Fault id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// Fault kind (`kill`, `latency` …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Target as requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<serde_json::Value>,
    /// Pids acted on.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub pids: Vec<i32>,
    /// Ports acted on.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub ports: Vec<u16>,
    /// Interfaces involved.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub interfaces: Vec<String>,
    /// `ok` or `error`.
    pub outcome: String,
    /// Human-readable detail.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub message: String,
    /// Random seed used for choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Extra structured detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl Event {
    /// A successful event of `action`.
    pub fn new(action: Action) -> Event {
        Event { action: Some(action), outcome: "ok".into(), ..Default::default() }
    }

    /// Marks it failed with a message.
    pub fn failed(mut self, message: impl Into<String>) -> Event {
        self.outcome = "error".into();
        self.message = message.into();
        self
    }

    /// Sets the message.
    pub fn message(mut self, message: impl Into<String>) -> Event {
        self.message = message.into();
        self
    }
}

/// The state of unleashed mode (the answer of `unleash` and `leash`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UnleashState {
    /// Running.
    pub enabled: bool,
    /// Seed in use (or of the last run).
    pub seed: Option<u64>,
    /// Mean gap, seconds.
    pub mean_interval: f64,
    /// Minimum gap, seconds.
    pub min_gap: f64,
    /// Faults are only reported, not applied.
    pub dry_run: bool,
    /// Faults started in this run.
    pub rounds: u64,
}
