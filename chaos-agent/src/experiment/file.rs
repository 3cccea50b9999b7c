//! Experiment files: YAML in, a checked [`Experiment`] out. The only place that parses YAML for experiments.
//!
//! Every error names the file, the line and the key (`experiment.yml:14:7: method[2].lifetime: …`): keys are
//! checked against what each section accepts (a typo is an error, never silently ignored), values are checked
//! where they are read (durations, percentages, regexes, URLs), and each fault step is checked with the agent's
//! own argument rules for `Chaos.inject` before anything is applied. See the README for a complete example.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::{Deserialize, Deserializer, de};
use serde_json::{Map, Value as Json};

use super::{
    driver,
    probe::{Matcher, ProbeKind, ProbeSpec, Quantile, StatusRange, Tolerance},
};

/// A parsed, checked experiment.
#[derive(Clone, Debug)]
pub struct Experiment {
    /// What the experiment shows (required).
    pub(crate) title: String,
    /// Longer text.
    #[expect(dead_code, reason = "checked as part of the file; the report shows the title only")]
    pub(crate) description: Option<String>,
    /// Free labels.
    pub(crate) tags: Vec<String>,
    /// ZooKeeper hosts (`host:port[/chroot]`); the command line and lymph's configuration are used when absent.
    pub zookeeper: Option<String>,
    /// Seed for every random choice the agents make (which instance dies); recorded in the report.
    pub(crate) seed: Option<u64>,
    /// Ask the agents to report what they would do, never act.
    pub(crate) dry_run: bool,
    /// The hypothesis.
    pub steady_state: SteadyState,
    /// What is done.
    pub method: Vec<Step>,
    /// Probes that abort the experiment when they fail.
    pub safeguards: Vec<ProbeSpec>,
}

/// The steady-state hypothesis: probes, and how long to look before and after the method.
#[derive(Clone, Debug)]
pub struct SteadyState {
    /// Probes that must hold.
    pub probes: Vec<ProbeSpec>,
    /// How long to sample before the method (default: the longest probe window).
    pub(crate) before: Option<Duration>,
    /// How long to sample after the method (default: the longest probe window).
    pub(crate) after: Option<Duration>,
    /// Time allowed for recovery between reverting and the after-check (default 0).
    pub(crate) recovery: Duration,
}

/// One step of the method, with its place in the file (`method[2].repeat.steps[0]`).
#[derive(Clone, Debug)]
pub struct Step {
    /// Where it is in the file.
    pub(crate) path: String,
    /// Optional label (shown in the report and the picture).
    pub(crate) name: Option<String>,
    /// What it does.
    pub(crate) action: StepAction,
}

/// What a step does.
#[derive(Clone, Debug)]
pub(crate) enum StepAction {
    /// Apply a fault (returns at once; the fault lasts `lifetime`, else until the method ends).
    Fault(FaultStep),
    /// Wait.
    Pause(Duration),
    /// Run `steps` every `every`, `times` times or for `duration`.
    Repeat {
        /// Period (from the start of one round to the next).
        every: Duration,
        /// Number of rounds.
        times: Option<u32>,
        /// Or: keep starting rounds for this long.
        duration: Option<Duration>,
        /// The steps of one round (in order).
        steps: Vec<Step>,
    },
    /// Run the branches at the same time; done when all are.
    Parallel(Vec<Step>),
    /// Run the steps in order.
    Serial(Vec<Step>),
}

/// A fault to apply through `Chaos.inject`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FaultStep {
    /// `latency`, `loss`, `kill` … (every kind the agent has).
    pub(crate) kind: String,
    /// Target lymph service (optional for host-wide resource faults).
    pub(crate) service: Option<String>,
    /// How long the fault lasts; without one it lasts until the method ends.
    pub(crate) lifetime: Option<Duration>,
    /// The kind's parameters, as `Chaos.inject` takes them.
    pub(crate) params: Map<String, Json>,
}

impl FaultStep {
    /// Whether the fault lasts (and is reverted), as opposed to a kill that is over once sent.
    pub(crate) fn lasting(&self) -> bool {
        !matches!(self.kind.as_str(), "kill" | "terminate")
    }

    /// A short description: `latency Payments (latency=0.2)`.
    pub(crate) fn describe(&self) -> String {
        let mut s = self.kind.clone();
        if let Some(service) = &self.service {
            s.push(' ');
            s.push_str(service);
        }
        if !self.params.is_empty() {
            let params: Vec<String> = self.params.iter().map(|(k, v)| format!("{k}={}", show(v))).collect();
            s.push_str(&format!(" ({})", params.join(", ")));
        }
        s
    }
}

fn show(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Why an experiment file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file cannot be read.
    #[error("cannot read the experiment file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid experiment.
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// What is wrong, starting with the key path (`method[2].lifetime: …`).
        message: String,
    },
}

/// Reads and checks an experiment file.
///
/// # Errors
/// [`FileError`] naming the line and key of the first problem.
pub(crate) fn load(path: &Path) -> Result<Experiment, FileError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.display().to_string(), source })?;
    parse(&text, &path.display().to_string())
}

/// Parses and checks experiment YAML; `file` names it in errors.
///
/// # Errors
/// [`FileError::Invalid`] naming the line and key of the first problem.
pub fn parse(text: &str, file: &str) -> Result<Experiment, FileError> {
    let raw: RawExperiment = yaml_serde::from_str(text).map_err(|err| {
        let (line, column) = err.location().map_or((0, 0), |l| (l.line(), l.column()));
        // yaml_serde appends " at line L column C"; the location leads our message instead.
        let mut message = err.to_string();
        if let Some(i) = message.rfind(" at line ") {
            message.truncate(i);
        }
        if message.starts_with("missing field") || message.starts_with("unknown field") {
            message = format!("(top level): {message}");
        }
        FileError::Invalid { file: file.to_owned(), line, column, message }
    })?;
    let mut experiment = Experiment {
        title: raw.title,
        description: raw.description,
        tags: raw.tags,
        zookeeper: raw.zookeeper,
        seed: raw.seed,
        dry_run: raw.dry_run,
        steady_state: raw.steady_state.map_or_else(
            || SteadyState { probes: Vec::new(), before: None, after: None, recovery: Duration::ZERO },
            |s| SteadyState {
                probes: s.probes,
                before: s.before.map(|d| d.0),
                after: s.after.map(|d| d.0),
                recovery: s.recovery.map_or(Duration::ZERO, |d| d.0),
            },
        ),
        method: raw.method,
        safeguards: raw.safeguards,
    };
    for (i, step) in experiment.method.iter_mut().enumerate() {
        step.set_path(format!("method[{i}]"));
    }
    let names = experiment.steady_state.probes.iter().chain(&experiment.safeguards).map(|p| p.name.as_str());
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(FileError::Invalid {
                file: file.to_owned(),
                line: 0,
                column: 0,
                message: format!("probe name `{name}` is used twice: give every probe and safeguard its own name"),
            });
        }
    }
    Ok(experiment)
}

impl Step {
    fn set_path(&mut self, path: String) {
        match &mut self.action {
            StepAction::Repeat { steps, .. } => {
                for (i, s) in steps.iter_mut().enumerate() {
                    s.set_path(format!("{path}.repeat.steps[{i}]"));
                }
            }
            StepAction::Parallel(steps) => {
                for (i, s) in steps.iter_mut().enumerate() {
                    s.set_path(format!("{path}.parallel[{i}]"));
                }
            }
            StepAction::Serial(steps) => {
                for (i, s) in steps.iter_mut().enumerate() {
                    s.set_path(format!("{path}.serial[{i}]"));
                }
            }
            StepAction::Fault(_) | StepAction::Pause(_) => {}
        }
        self.path = path;
    }

    /// Every fault step in this step (itself included), in file order.
    pub(crate) fn faults(&self) -> Vec<(&Step, &FaultStep)> {
        match &self.action {
            StepAction::Fault(f) => vec![(self, f)],
            StepAction::Pause(_) => Vec::new(),
            StepAction::Repeat { steps, .. } | StepAction::Parallel(steps) | StepAction::Serial(steps) => {
                steps.iter().flat_map(Step::faults).collect()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// raw forms (what serde reads; checked while reading)

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExperiment {
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    zookeeper: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    steady_state: Option<RawSteadyState>,
    method: Vec<Step>,
    #[serde(default)]
    safeguards: Vec<ProbeSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSteadyState {
    probes: Vec<ProbeSpec>,
    #[serde(default)]
    before: Option<Dur>,
    #[serde(default)]
    after: Option<Dur>,
    #[serde(default)]
    recovery: Option<Dur>,
}

/// A duration: seconds as a number, or text with a unit (`200ms`, `5s`, `2m`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor(|v: Scalar| {
            let parsed = match &v {
                Scalar::Num(n) => Duration::try_from_secs_f64(*n).ok(),
                Scalar::Text(s) => crate::config::parse_duration(s),
                Scalar::Other => None,
            };
            parsed.map(Dur).ok_or_else(|| {
                format!("{} is not a duration: write seconds (1.5) or a number with a unit (200ms, 5s, 2m)", v.show())
            })
        }))
    }
}

/// A scalar as read, for visitors that check it where it is written (so errors carry its position).
enum Scalar {
    Num(f64),
    Text(String),
    Other,
}

impl Scalar {
    fn show(&self) -> String {
        match self {
            Scalar::Num(n) => format!("`{n}`"),
            Scalar::Text(s) => format!("`{s}`"),
            Scalar::Other => "the value".into(),
        }
    }
}

struct ScalarVisitor<F>(F);

impl<'de, T, F: FnOnce(Scalar) -> Result<T, String>> de::Visitor<'de> for ScalarVisitor<F> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number or text")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.0)(Scalar::Num(v as f64)).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.0)(Scalar::Num(v as f64)).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.0)(Scalar::Num(v)).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(Scalar::Text(v.to_owned())).map_err(E::custom)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        (self.0)(Scalar::Other).map_err(E::custom)
    }
}

/// A positive duration.
#[derive(Clone, Copy, Debug)]
struct PosDur(Duration);

impl<'de> Deserialize<'de> for PosDur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Dur(d) = Dur::deserialize(d)?;
        if d.is_zero() {
            return Err(de::Error::custom("must be above 0"));
        }
        Ok(PosDur(d))
    }
}

/// A share: `99%` or a ratio in [0, 1].
#[derive(Clone, Copy, Debug)]
struct Share(f64);

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor(|v: Scalar| {
            let share = match &v {
                Scalar::Num(n) => Some(*n).filter(|r| (0.0..=1.0).contains(r)),
                Scalar::Text(s) => s
                    .trim()
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<f64>().ok())
                    .filter(|p| (0.0..=100.0).contains(p))
                    .map(|p| p / 100.0),
                Scalar::Other => None,
            };
            share
                .map(Share)
                .ok_or_else(|| format!("{} is not a share: write a percentage (99%) or a ratio (0.99)", v.show()))
        }))
    }
}

fn yaml_to_json(v: yaml_serde::Value) -> Result<Json, String> {
    serde_json::to_value(&v).map_err(|e| format!("cannot be represented as JSON: {e}"))
}

// --- steps ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepeat {
    every: PosDur,
    #[serde(default)]
    times: Option<u32>,
    #[serde(default, rename = "for")]
    duration: Option<PosDur>,
    steps: Vec<Step>,
}

/// Fault parameters a step may carry, besides `fault`, `service`, `lifetime` and `name` (the targeting and id
/// arguments of `Chaos.inject` are the experiment's business).
const FAULT_PARAMS: &[&str] = &[
    "latency",
    "delay",
    "jitter",
    "correlation",
    "distribution",
    "loss",
    "duplicate",
    "corrupt",
    "reorder",
    "reorder_correlation",
    "rate",
    "direction",
    "protocol",
    "peer",
    "peer_host",
    "peer_cidr",
    "workers",
    "percent_cores",
    "load",
    "in_target_cgroup",
    "mib",
    "percent_available",
    "path",
    "percent_free",
    "floor_percent",
    "signal",
    "count",
    "percent",
    "all",
    "deregister",
];
const STEP_KINDS: &[&str] = &["fault", "pause", "repeat", "parallel", "serial"];

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(StepVisitor)
    }
}

struct StepVisitor;

/// The fault kind, checked where it is written.
struct Kind;

impl<'de> de::DeserializeSeed<'de> for Kind {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> de::Visitor<'de> for Kind {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a fault kind")
    }

    fn visit_str<E: de::Error>(self, kind: &str) -> Result<String, E> {
        if driver::KINDS.contains(&kind) {
            Ok(kind.to_owned())
        } else {
            Err(E::custom(format!("unknown fault kind `{kind}`; kinds: {}", driver::KINDS.join(", "))))
        }
    }
}

/// A fault parameter (a scalar), checked with the agent's rules where it is written.
struct Param<'a> {
    kind: &'a str,
    key: &'a str,
}

impl<'de> de::DeserializeSeed<'de> for Param<'_> {
    type Value = Json;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        d.deserialize_any(self)
    }
}

impl Param<'_> {
    fn check<E: de::Error>(&self, v: Json) -> Result<Json, E> {
        driver::check_fault_param(self.kind, self.key, &v).map_err(E::custom)?;
        Ok(v)
    }
}

impl<'de> de::Visitor<'de> for Param<'_> {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a number, text or true/false for `{}`", self.key)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json, E> {
        self.check(v.into())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json, E> {
        self.check(v.into())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
        self.check(v.into())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        self.check(serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
        self.check(v.into())
    }
}

/// A key of a step, checked against the step's type (fixed by its first key) as it is read, so an unknown key
/// is reported at its own line.
struct StepKey<'a> {
    step: Option<&'a str>,
}

impl<'de> de::DeserializeSeed<'de> for StepKey<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> de::Visitor<'de> for StepKey<'_> {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }

    // Checked here, inside the deserializer's call for the key, so the error carries the key's own position.
    fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
        let key = key.to_owned();
        let ok = match self.step {
            None => STEP_KINDS.contains(&key.as_str()),
            Some("fault") => {
                ["service", "lifetime", "name"].contains(&key.as_str()) || FAULT_PARAMS.contains(&key.as_str())
            }
            Some(_) => key == "name",
        };
        if ok {
            return Ok(key);
        }
        Err(E::custom(match self.step {
            None => format!(
                "a step starts with its type: `{key}` is not one of fault, pause, repeat, parallel, serial \
                 (put the type first, e.g. `- fault: latency`)"
            ),
            Some("fault") => {
                let known = ["service", "lifetime", "name"].iter().chain(FAULT_PARAMS);
                match known.min_by_key(|k| edit_distance(&key, k)).filter(|k| edit_distance(&key, k) <= 2) {
                    Some(close) => format!("unknown key `{key}` in a fault step: did you mean `{close}`?"),
                    None => format!(
                        "unknown key `{key}` in a fault step; it takes service, lifetime, name and the fault's \
                         parameters: {}",
                        FAULT_PARAMS.join(", ")
                    ),
                }
            }
            Some(kind) => format!("unknown key `{key}` in a {kind} step (it takes only `name` besides `{kind}`)"),
        }))
    }
}

impl<'de> de::Visitor<'de> for StepVisitor {
    type Value = Step;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a step: a mapping starting with fault, pause, repeat, parallel or serial")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Step, A::Error> {
        let Some(kind) = map.next_key_seed(StepKey { step: None })? else {
            return Err(de::Error::custom("an empty step: start it with fault, pause, repeat, parallel or serial"));
        };
        let mut name: Option<String> = None;
        let action = match kind.as_str() {
            "fault" => {
                let fault_kind: String = map.next_value_seed(Kind)?;
                let mut service = None;
                let mut lifetime = None;
                let mut params = Map::new();
                while let Some(key) = map.next_key_seed(StepKey { step: Some("fault") })? {
                    match key.as_str() {
                        "service" => service = Some(map.next_value::<String>()?),
                        "lifetime" => lifetime = Some(map.next_value::<PosDur>()?.0),
                        "name" => name = Some(map.next_value()?),
                        _ => {
                            // Each value on its own, with the agent's rules, so the error points at it.
                            let json = map.next_value_seed(Param { kind: &fault_kind, key: &key })?;
                            params.insert(key, json);
                        }
                    }
                }
                let step = FaultStep { kind: fault_kind, service, lifetime, params };
                driver::check_fault(&step).map_err(de::Error::custom)?;
                StepAction::Fault(step)
            }
            "pause" => StepAction::Pause(map.next_value::<Dur>()?.0),
            "repeat" => {
                let r: RawRepeat = map.next_value()?;
                match (r.times, r.duration) {
                    (Some(0), _) => return Err(de::Error::custom("repeat.times must be at least 1")),
                    (Some(_), Some(_)) => return Err(de::Error::custom("repeat takes `times` or `for`, not both")),
                    (None, None) => {
                        return Err(de::Error::custom("repeat needs `times` (rounds) or `for` (a duration)"));
                    }
                    _ => {}
                }
                if r.steps.is_empty() {
                    return Err(de::Error::custom("repeat.steps is empty"));
                }
                StepAction::Repeat {
                    every: r.every.0,
                    times: r.times,
                    duration: r.duration.map(|d| d.0),
                    steps: r.steps,
                }
            }
            "parallel" => StepAction::Parallel(map.next_value()?),
            "serial" => StepAction::Serial(map.next_value()?),
            _ => unreachable!("checked by StepKey"),
        };
        if kind != "fault" {
            while let Some(key) = map.next_key_seed(StepKey { step: Some(&kind) })? {
                debug_assert_eq!(key, "name");
                name = Some(map.next_value()?);
            }
        }
        Ok(Step { path: String::new(), name, action })
    }
}

/// Levenshtein distance (for "did you mean").
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

// --- probes ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    name: String,
    #[serde(default)]
    rpc: Option<RawRpc>,
    #[serde(default)]
    registry: Option<RawRegistry>,
    #[serde(default)]
    http: Option<RawHttp>,
    #[serde(default)]
    every: Option<PosDur>,
    #[serde(default)]
    window: Option<PosDur>,
    #[serde(default)]
    timeout: Option<PosDur>,
    #[serde(default)]
    check: Option<Vec<Phase>>,
    #[serde(default)]
    failure_threshold: Option<u32>,
    #[serde(default)]
    tolerance: Option<RawTolerance>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRpc {
    call: String,
    #[serde(default)]
    args: Option<yaml_serde::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    service: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    url: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
}

/// When a steady-state probe is judged.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    /// Before the method.
    Before,
    /// While the method runs.
    During,
    /// After reverting.
    After,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTolerance {
    #[serde(default)]
    success: Option<Share>,
    #[serde(default)]
    latency: Option<BTreeMap<String, Dur>>,
    #[serde(default)]
    reply: Option<RawMatch>,
    #[serde(default)]
    status: Option<yaml_serde::Value>,
    #[serde(default)]
    body: Option<RawMatch>,
    #[serde(default)]
    min_instances: Option<usize>,
    #[serde(default)]
    max_instances: Option<usize>,
    #[serde(default)]
    min_samples: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    equals: Option<yaml_serde::Value>,
    #[serde(default)]
    contains: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

impl RawMatch {
    fn into_matcher(self, key: &str) -> Result<Matcher, String> {
        match (self.equals, self.contains, self.regex) {
            (Some(v), None, None) => Ok(Matcher::Equals(yaml_to_json(v)?)),
            (None, Some(s), None) => Ok(Matcher::Contains(s)),
            (None, None, Some(r)) => regex::Regex::new(&r)
                .map(Matcher::Regex)
                .map_err(|e| format!("tolerance.{key}.regex is not a regular expression: {e}")),
            _ => Err(format!("tolerance.{key} takes one of equals, contains, regex")),
        }
    }
}

/// Defaults of a probe.
const DEFAULT_EVERY: Duration = Duration::from_millis(500);
const DEFAULT_WINDOW: Duration = Duration::from_secs(5);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

impl<'de> Deserialize<'de> for ProbeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawProbe::deserialize(d)?;
        raw.check().map_err(de::Error::custom)
    }
}

impl RawProbe {
    fn check(self) -> Result<ProbeSpec, String> {
        let name = self.name;
        let kind = match (self.rpc, self.registry, self.http) {
            (Some(rpc), None, None) => {
                let (service, method) = rpc
                    .call
                    .rsplit_once('.')
                    .filter(|(s, m)| !s.is_empty() && !m.is_empty())
                    .ok_or_else(|| format!("probe `{name}`: rpc.call `{}` is not Service.method", rpc.call))?;
                let args = match rpc.args {
                    None | Some(yaml_serde::Value::Null) => Json::Object(Map::new()),
                    Some(v @ yaml_serde::Value::Mapping(_)) => yaml_to_json(v)?,
                    Some(_) => return Err(format!("probe `{name}`: rpc.args is a mapping of keyword arguments")),
                };
                ProbeKind::Rpc { subject: format!("{service}.{method}"), args }
            }
            (None, Some(reg), None) => ProbeKind::Registry { service: reg.service },
            (None, None, Some(http)) => {
                let url = super::http::Url::parse(&http.url).map_err(|e| format!("probe `{name}`: http.url: {e}"))?;
                let method = http.method.unwrap_or_else(|| "GET".into()).to_ascii_uppercase();
                if !method.chars().all(|c| c.is_ascii_alphabetic()) || method.is_empty() {
                    return Err(format!("probe `{name}`: http.method `{method}` is not an HTTP method"));
                }
                ProbeKind::Http { url, method, headers: http.headers, body: http.body }
            }
            (None, None, None) => return Err(format!("probe `{name}` needs one of rpc, registry, http")),
            _ => return Err(format!("probe `{name}` has more than one of rpc, registry, http: give one")),
        };
        let t = self.tolerance.unwrap_or(RawTolerance {
            success: None,
            latency: None,
            reply: None,
            status: None,
            body: None,
            min_instances: None,
            max_instances: None,
            min_samples: None,
        });
        let only = |what: &str, present: bool, allowed: bool| -> Result<(), String> {
            if present && !allowed {
                return Err(format!("probe `{name}`: tolerance.{what} does not apply to a {} probe", kind.label()));
            }
            Ok(())
        };
        let is = |k: &str| kind.label() == k;
        only("reply", t.reply.is_some(), is("rpc"))?;
        only("status", t.status.is_some(), is("http"))?;
        only("body", t.body.is_some(), is("http"))?;
        only("latency", t.latency.is_some(), !is("registry"))?;
        only("min_instances", t.min_instances.is_some(), is("registry"))?;
        only("max_instances", t.max_instances.is_some(), is("registry"))?;
        let mut latency = Vec::new();
        for (key, Dur(limit)) in t.latency.unwrap_or_default() {
            let q = Quantile::parse(&key).ok_or_else(|| {
                format!("probe `{name}`: tolerance.latency.{key}: not a percentile (p50, p90, p99, p99.9, max)")
            })?;
            latency.push((q, limit));
        }
        let status = match t.status {
            None => None,
            Some(v) => Some(StatusRange::parse(&v).map_err(|e| format!("probe `{name}`: tolerance.status: {e}"))?),
        };
        let min_instances = match (&kind, t.min_instances) {
            (ProbeKind::Registry { .. }, None) => Some(1),
            (_, m) => m,
        };
        if let (Some(min), Some(max)) = (min_instances, t.max_instances)
            && min > max
        {
            return Err(format!("probe `{name}`: tolerance.min_instances {min} is above max_instances {max}"));
        }
        let tolerance = Tolerance {
            success: t.success.map_or(1.0, |s| s.0),
            latency,
            reply: t.reply.map(|m| m.into_matcher("reply")).transpose().map_err(|e| format!("probe `{name}`: {e}"))?,
            status,
            body: t.body.map(|m| m.into_matcher("body")).transpose().map_err(|e| format!("probe `{name}`: {e}"))?,
            min_instances,
            max_instances: t.max_instances,
            min_samples: t.min_samples.unwrap_or(1).max(1),
        };
        let every = self.every.map_or(DEFAULT_EVERY, |d| d.0);
        let window = self.window.map_or(DEFAULT_WINDOW, |d| d.0);
        if window < every {
            return Err(format!("probe `{name}`: window ({window:?}) is shorter than every ({every:?})"));
        }
        let check = self.check.unwrap_or_else(|| vec![Phase::Before, Phase::During, Phase::After]);
        Ok(ProbeSpec {
            name,
            kind,
            every,
            window,
            timeout: self.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0),
            tolerance,
            check,
            failure_threshold: self.failure_threshold.unwrap_or(1).max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fault step takes the parameters of `Chaos.inject` except the ones the experiment decides (targeting, id,
    /// seed, dry run) or names otherwise (`fault` for `kind`, `service` for `name`); `lifetime` is its own key.
    #[test]
    fn fault_step_parameters_are_those_of_chaos_inject() {
        let decided = ["name", "instance", "pid", "port", "process", "id", "seed", "dry_run", "kind", "lifetime"];
        let inject = chaos_api::Method::Inject.params();
        for p in FAULT_PARAMS {
            assert!(inject.contains(p), "fault steps take `{p}`, which Chaos.inject does not");
        }
        for p in inject.iter().filter(|p| !decided.contains(p)) {
            assert!(FAULT_PARAMS.contains(p), "Chaos.inject takes `{p}`, which fault steps do not");
        }
    }

    const GOOD: &str = r#"
title: Echo survives
tags: [demo]
seed: 7
steady_state:
  recovery: 1s
  probes:
    - name: echo answers
      rpc: {call: Echo.upper, args: {text: hi}}
      every: 100ms
      window: 2s
      tolerance:
        success: 95%
        reply: {equals: HI}
        latency: {p99: 500ms}
    - name: echo registered
      registry: {service: Echo}
      check: [before, after]
method:
  - fault: loss
    service: Echo
    loss: 30
    lifetime: 5s
  - pause: 1s
  - repeat:
      every: 2s
      times: 2
      steps:
        - fault: kill
          service: Echo
  - parallel:
      - fault: blackhole
        service: Echo
        name: cut
      - serial:
          - pause: 500ms
safeguards:
  - name: not all broken
    rpc: {call: Echo.echo, args: {text: x}}
    window: 1s
    tolerance: {success: 0.5}
"#;

    #[test]
    fn a_complete_file_parses() {
        let e = parse(GOOD, "x.yml").unwrap();
        assert_eq!(e.title, "Echo survives");
        assert_eq!(e.seed, Some(7));
        assert_eq!(e.steady_state.recovery, Duration::from_secs(1));
        assert_eq!(e.steady_state.probes.len(), 2);
        let p = &e.steady_state.probes[0];
        assert_eq!(p.tolerance.success, 0.95);
        assert_eq!(p.tolerance.latency, vec![(Quantile::P(99.0), Duration::from_millis(500))]);
        assert_eq!(e.steady_state.probes[1].tolerance.min_instances, Some(1));
        assert_eq!(e.method.len(), 4);
        let StepAction::Fault(f) = &e.method[0].action else { panic!() };
        assert_eq!(
            (f.kind.as_str(), f.service.as_deref(), f.lifetime),
            ("loss", Some("Echo"), Some(Duration::from_secs(5)))
        );
        assert_eq!(f.params["loss"], 30);
        let StepAction::Repeat { steps, times, .. } = &e.method[2].action else { panic!() };
        assert_eq!((*times, steps[0].path.as_str()), (Some(2), "method[2].repeat.steps[0]"));
        let StepAction::Parallel(branches) = &e.method[3].action else { panic!() };
        assert_eq!(branches[0].name.as_deref(), Some("cut"));
        assert_eq!(branches[1].path, "method[3].parallel[1]");
        assert_eq!(e.safeguards[0].tolerance.success, 0.5);
        let faults: Vec<_> = e.method.iter().flat_map(Step::faults).map(|(s, _)| s.path.clone()).collect();
        assert_eq!(faults, ["method[0]", "method[2].repeat.steps[0]", "method[3].parallel[0]"]);
    }

    fn error(yaml: &str) -> (usize, String) {
        match parse(yaml, "bad.yml").unwrap_err() {
            FileError::Invalid { line, message, .. } => (line, message),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        // A typo in a fault parameter: the line of the key itself.
        let (line, msg) = error("title: t\nmethod:\n  - fault: latency\n    service: Echo\n    latncy: 200ms\n");
        assert_eq!(line, 5, "{msg}");
        assert!(msg.contains("method[0]") && msg.contains("`latncy`"), "{msg}");
        assert!(msg.contains("did you mean `latency`?"), "{msg}");

        // A bad value: the line of the value, the key in the path.
        let (line, msg) =
            error("title: t\nmethod:\n  - fault: loss\n    service: Echo\n    loss: 30\n    lifetime: 5 parsecs\n");
        assert_eq!(line, 6, "{msg}");
        assert!(msg.contains("lifetime") && msg.contains("5 parsecs"), "{msg}");

        // The agent's own rules, per value.
        let (line, msg) = error("title: t\nmethod:\n  - fault: loss\n    service: Echo\n    loss: 130\n");
        assert_eq!(line, 5, "{msg}");
        assert!(msg.contains("loss") && msg.contains("130"), "{msg}");

        // A parameter of another kind.
        let (line, msg) = error("title: t\nmethod:\n  - fault: kill\n    service: Echo\n    loss: 30\n");
        assert_eq!(line, 5, "{msg}");
        assert!(msg.contains("`loss`") && msg.contains("kill"), "{msg}");

        // An unknown fault kind.
        let (line, msg) = error("title: t\nmethod:\n  - fault: meteor\n    service: Echo\n");
        assert!(line == 3 || line == 4, "{line} {msg}");
        assert!(msg.contains("meteor"), "{msg}");

        // Unknown top-level key and a misspelt probe key.
        let (line, msg) = error("title: t\nmehtod: []\n");
        assert_eq!(line, 2, "{msg}");
        assert!(msg.contains("mehtod"), "{msg}");
        let (line, msg) = error(
            "title: t\nmethod: []\nsteady_state:\n  probes:\n    - name: a\n      rpc: {call: Echo.upper}\n      windw: 2s\n",
        );
        assert_eq!(line, 7, "{msg}");
        assert!(msg.contains("windw") && msg.contains("steady_state.probes[0]"), "{msg}");

        // A step that does not start with its type.
        let (line, msg) = error("title: t\nmethod:\n  - service: Echo\n    fault: kill\n");
        assert_eq!(line, 3, "{msg}");
        assert!(msg.contains("`service`") && msg.contains("type first"), "{msg}");

        // Missing title.
        let (_, msg) = error("method: []\n");
        assert!(msg.contains("title"), "{msg}");

        // A share that is neither a percentage nor a ratio.
        let (line, msg) = error(
            "title: t\nmethod: []\nsafeguards:\n  - name: a\n    rpc: {call: A.b}\n    tolerance:\n      success: 99\n",
        );
        assert_eq!(line, 7, "{msg}");
        assert!(msg.contains("success") && msg.contains("99%"), "{msg}");
    }

    #[test]
    fn probe_rules() {
        let (_, msg) = error(
            "title: t\nmethod: []\nsafeguards:\n  - name: a\n    registry: {service: A}\n    tolerance: {latency: {p99: 1s}}\n",
        );
        assert!(msg.contains("latency") && msg.contains("registry"), "{msg}");
        let (_, msg) = error("title: t\nmethod: []\nsafeguards:\n  - name: a\n    http: {url: 'https://x/'}\n");
        assert!(msg.contains("http.url"), "{msg}");
        let (_, msg) = error(
            "title: t\nmethod: []\nsafeguards:\n  - name: a\n    rpc: {call: A.b}\n  - name: a\n    rpc: {call: A.b}\n",
        );
        assert!(msg.contains("used twice"), "{msg}");
        let (_, msg) = error("title: t\nmethod:\n  - repeat: {every: 1s, steps: [{pause: 1s}]}\n");
        assert!(msg.contains("times") && msg.contains("method[0]"), "{msg}");
    }
}
