//! Structured replies of `Chaos` methods: `events` ([`Event`]), `unleash` and `leash` ([`UnleashState`]), the
//! measured effect of a network fault ([`Observation`], in its report and its `applied` event).
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
    /// A fault is in place but its effect was not seen: no packet matched, no added delay or loss, or nothing
    /// listens on its port. The fault stays; the message says what was (not) seen.
    Warning,
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
    /// `ok`, `error`, or `warning` (an [`Action::Warning`]).
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

/// What verifying a network fault found (see [`Observation`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The probes are still running (the `applied` event waits for them).
    Pending,
    /// The probe's packets matched the fault's rule and the effect the fault promises (drops, added delay) was
    /// seen where it can be measured.
    Observed,
    /// The fault is in place but its effect was not seen (a `warning` event says so).
    NotObserved,
    /// Nothing listens on the fault's TCP ports here: nothing to probe (a `warning` event says so).
    NoListener,
    /// Not measured: UDP-only faults, faults that ended or moved before the probes finished, lifetimes too short
    /// for the probes, probes the unfaulted path did not answer either.
    NotMeasured,
}

/// The measured effect of a network fault: TCP handshakes to each faulted port, interleaved with handshakes to an
/// unfaulted port the probe listens on, on the same address (the baseline: same handshake, same path), while the
/// fault is in place. In the fault's
/// report (`Chaos.faults`, `inject`) and in the `detail.observed` of its `applied` event.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Observation {
    /// The verdict.
    pub verdict: Verdict,
    /// Added delay per handshake seen, milliseconds: median of the faulted probes minus median of the baseline
    /// probes (over every probed port; absent when no faulted probe answered).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub added_delay_ms: Option<f64>,
    /// Share of faulted probes that got no answer before the first SYN retransmission, percent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss_percent: Option<f64>,
    /// The added delay a handshake should see from this fault (its delay once per direction the handshake's
    /// packets cross), milliseconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expected_delay_ms: Option<f64>,
    /// The loss the fault asks for, percent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expected_loss_percent: Option<f64>,
    /// Handshakes sent to the faulted ports.
    pub probes: u32,
    /// Packets the fault's rule matched while the probes ran (the probes' own and any other traffic's).
    pub matched_packets: u64,
    /// Packets of the probes the rule must have matched at least (one per faulted handshake).
    pub probe_packets: u64,
    /// Per probed port.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub ports: Vec<PortObservation>,
    /// What the verdict rests on, in words.
    pub summary: String,
}

/// The probes of one faulted port.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PortObservation {
    /// The faulted port.
    pub port: u16,
    /// The address probed (where its listener is bound; loopback for wildcard listeners).
    pub addr: String,
    /// The unfaulted port on the same address the baseline probes went to.
    pub baseline_port: u16,
    /// Handshakes to the faulted port.
    pub probes: u32,
    /// Of those, answered in time.
    pub answered: u32,
    /// Median handshake time to the faulted port, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub median_ms: Option<f64>,
    /// Median handshake time of the baseline, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub baseline_median_ms: Option<f64>,
}
