//! Structured replies of `Chaos` methods: `events` ([`Event`]), `unleash` and `leash` ([`UnleashState`]), the
//! measured effect of a network fault ([`Observation`], in its report and its `applied` event), the
//! kernel capabilities `status` and the `agent_start` event report ([`KernelCapabilities`]) and the backend of a
//! latency fault ([`LatencyBackend`]).
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

/// Which kernel mechanism delays the packets of a latency fault (in `faults`, per fault, as `backend`).
///
/// - `netem`: an `sch_netem` leaf on the agent's IFB. Every netem feature (correlation, duplicate, corrupt,
///   reorder); with jitter, netem reorders packets of one flow (a packet drawn a shorter delay overtakes).
/// - `edt`: earliest departure time: the classifier stamps each packet with `now + delay ± jitter` and an `sch_fq`
///   leaf holds it until then. For kernels without `sch_netem` (RHEL/Fedora ship it in kernel-modules-extra,
///   Ubuntu in linux-modules-extra) that have `sch_fq` (base modules). Delay, jitter (uniform, normal, pareto,
///   paretonormal, as netem draws them) and rate; never reorders a flow (a packet leaves no earlier than the
///   flow's previous one, so with jitter the delays of a busy flow lean towards the larger ones); no correlation,
///   duplicate, corrupt or reorder. The same bounds as netem (delay and jitter up to 60 s each), so the longest
///   hold is 60 s + 4 × 60 s = [`EDT_MAX_HOLD_SECS`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum LatencyBackend {
    /// `sch_netem`.
    Netem,
    /// `sch_fq` with departure times set by the classifier.
    Edt,
}

/// The longest the EDT backend holds a packet, in seconds: delay + 4 × jitter (netem's tables reach ±4 σ; uniform
/// jitter reaches ±1 σ) with both at their 60 s bound. Each fault's `fq` horizon is its own longest hold plus 1 s,
/// set to cap (`horizon_cap`): no departure time the classifier sets is beyond it, and if one were, the packet
/// would leave at the horizon rather than be dropped.
pub const EDT_MAX_HOLD_SECS: u64 = 300;

/// What the running kernel offers network faults, probed once at agent start (on a temporary device the agent
/// creates and deletes; nothing is left behind). Reported by `status` (`network.kernel`) and the `agent_start`
/// event.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelCapabilities {
    /// Queueing disciplines the kernel accepted.
    pub qdiscs: QdiscSupport,
    /// The `ifb` device driver (shaping faults redirect into an IFB).
    pub ifb: bool,
    /// BPF helpers the classifier may use, as the verifier answered for a tc program.
    pub helpers: HelperSupport,
    /// Where a tc BPF program can be attached.
    pub attach: AttachSupport,
    /// What serves a latency fault here: `netem` when the kernel has it, else `edt` with `sch_fq` (and htb, ifb),
    /// else none (latency faults fail with an error naming both modules).
    pub latency_backend: Option<LatencyBackend>,
    /// Why something could not be probed (empty when everything was).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Queueing disciplines (`sch_*` modules) the kernel has.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QdiscSupport {
    /// `sch_netem`: delay, jitter, duplicate, corrupt, reorder.
    pub netem: bool,
    /// `sch_fq`: the EDT latency backend.
    pub fq: bool,
    /// `sch_htb`: classes on the agent's IFB (every shaping fault).
    pub htb: bool,
    /// `sch_tbf`.
    pub tbf: bool,
    /// `sch_ingress`'s clsact: where the classifier is attached.
    pub clsact: bool,
}

/// BPF helpers available to tc programs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelperSupport {
    /// `bpf_ktime_get_ns` (expiry, departure times).
    pub ktime_get_ns: bool,
    /// `bpf_get_prandom_u32` (loss, jitter).
    pub get_prandom_u32: bool,
    /// `bpf_get_hash_recalc` (the EDT flow key).
    pub get_hash_recalc: bool,
    /// `bpf_skb_set_tstamp` (Linux ≥ 5.18; not needed: the classifier writes `skb->tstamp` on egress).
    pub skb_set_tstamp: bool,
}

/// Attach points for tc BPF programs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachSupport {
    /// clsact ingress/egress through netlink (what the agent uses).
    pub clsact: bool,
    /// TCX links (Linux ≥ 6.6; not used by the agent).
    pub tcx: bool,
}
