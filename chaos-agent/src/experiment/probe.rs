//! Probes: what is measured (a lymph RPC call, a registry count, an HTTP request), one [`Sample`] at a time, and
//! how a window of samples is judged against a [`Tolerance`] ([`judge`], pure and unit-tested).
//!
//! Samples are taken open-loop: one starts every `every`, whatever the previous ones do, so a slow or hanging
//! service never lowers the sampling rate and its latency shows as it is (a timed-out call counts with its
//! timeout as latency and as a failure).

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;
use serde_json::Value as Json;

use super::{driver::Driver, file::Phase, http::Url};

/// A probe as the file defines it.
#[derive(Clone, Debug)]
pub struct ProbeSpec {
    /// Unique name.
    pub(crate) name: String,
    /// What it measures.
    pub(crate) kind: ProbeKind,
    /// One sample starts every `every`.
    pub(crate) every: Duration,
    /// The window a verdict looks at.
    pub(crate) window: Duration,
    /// Per-sample timeout.
    pub(crate) timeout: Duration,
    /// What must hold.
    pub(crate) tolerance: Tolerance,
    /// When a steady-state probe is judged (safeguards: always, during the method).
    pub(crate) check: Vec<Phase>,
    /// Safeguards: consecutive failed judgements before aborting.
    pub(crate) failure_threshold: u32,
}

/// What a probe measures.
#[derive(Clone, Debug)]
pub(crate) enum ProbeKind {
    /// `Service.method(**args)` through the registry, like any lymph client.
    Rpc {
        /// `Service.method`.
        subject: String,
        /// Keyword arguments.
        args: Json,
    },
    /// Instances of a service registered in ZooKeeper.
    Registry {
        /// The service.
        service: String,
    },
    /// An HTTP request.
    Http {
        /// Where.
        url: Url,
        /// `GET`, `POST` …
        method: String,
        /// Extra headers.
        headers: BTreeMap<String, String>,
        /// Request body.
        body: Option<String>,
    },
}

impl ProbeKind {
    /// `rpc`, `registry` or `http`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            ProbeKind::Rpc { .. } => "rpc",
            ProbeKind::Registry { .. } => "registry",
            ProbeKind::Http { .. } => "http",
        }
    }

    /// What it looks at: `Echo.upper`, `Echo instances`, `GET http://…`.
    pub(crate) fn target(&self) -> String {
        match self {
            ProbeKind::Rpc { subject, .. } => subject.clone(),
            ProbeKind::Registry { service } => format!("{service} instances"),
            ProbeKind::Http { url, method, .. } => format!("{method} {url}"),
        }
    }
}

/// What must hold over a window.
#[derive(Clone, Debug)]
pub(crate) struct Tolerance {
    /// Minimum share of good samples (default 1.0).
    pub(crate) success: f64,
    /// Latency limits by percentile, over every sample of the window (failures included, at the time they took).
    pub(crate) latency: Vec<(Quantile, Duration)>,
    /// rpc: the reply must match.
    pub(crate) reply: Option<Matcher>,
    /// http: accepted status codes (default 200–399).
    pub(crate) status: Option<StatusRange>,
    /// http: the body must match.
    pub(crate) body: Option<Matcher>,
    /// registry: at least this many instances (default 1).
    pub(crate) min_instances: Option<usize>,
    /// registry: at most this many.
    pub(crate) max_instances: Option<usize>,
    /// A window with fewer samples is not judged (not a failure, not a pass: "no data").
    pub(crate) min_samples: usize,
}

/// A reply or body check.
#[derive(Clone, Debug)]
pub(crate) enum Matcher {
    /// Equal to this value (a reply) or text (a body).
    Equals(Json),
    /// Contains this text (the reply rendered as JSON unless it is text).
    Contains(String),
    /// Matches this regular expression (same rendering).
    Regex(regex::Regex),
}

impl Matcher {
    /// Whether `value` matches.
    pub(crate) fn matches(&self, value: &Json) -> bool {
        let text = || match value {
            Json::String(s) => s.clone(),
            other => other.to_string(),
        };
        match self {
            Matcher::Equals(expected) => expected == value,
            Matcher::Contains(s) => text().contains(s.as_str()),
            Matcher::Regex(r) => r.is_match(&text()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Matcher::Equals(v) => format!("equal to {v}"),
            Matcher::Contains(s) => format!("containing {s:?}"),
            Matcher::Regex(r) => format!("matching /{r}/"),
        }
    }
}

/// Accepted HTTP status codes: inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StatusRange(pub Vec<(u16, u16)>);

impl StatusRange {
    /// `200`, `[200, 204]`, `"2xx"`, `"200-299"`.
    ///
    /// # Errors
    /// A message saying what is accepted.
    pub(crate) fn parse(v: &yaml_serde::Value) -> Result<StatusRange, String> {
        fn one(v: &yaml_serde::Value) -> Result<(u16, u16), String> {
            if let Some(n) = v.as_u64() {
                let n = u16::try_from(n).ok().filter(|n| (100..600).contains(n)).ok_or("not a status code")?;
                return Ok((n, n));
            }
            let s = v.as_str().ok_or("write a code (200), a class (\"2xx\") or a range (\"200-299\")")?.trim();
            if let Some(class) = s.strip_suffix("xx").and_then(|c| c.parse::<u16>().ok()).filter(|c| (1..6).contains(c))
            {
                return Ok((class * 100, class * 100 + 99));
            }
            if let Some((a, b)) = s.split_once('-')
                && let (Ok(a), Ok(b)) = (a.trim().parse::<u16>(), b.trim().parse::<u16>())
                && a <= b
            {
                return Ok((a, b));
            }
            Err(format!("`{s}` is not a code, class or range"))
        }
        match v {
            yaml_serde::Value::Sequence(items) => Ok(StatusRange(items.iter().map(one).collect::<Result<_, _>>()?)),
            other => Ok(StatusRange(vec![one(other)?])),
        }
    }

    fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(a, b)| (*a..=*b).contains(&status))
    }
}

/// A latency percentile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Quantile {
    /// `p50`, `p99.9` …
    P(f64),
    /// The largest.
    Max,
}

impl Quantile {
    /// `p50`, `p99`, `p99.9`, `max`.
    pub(crate) fn parse(s: &str) -> Option<Quantile> {
        if s == "max" {
            return Some(Quantile::Max);
        }
        let p: f64 = s.strip_prefix('p')?.parse().ok()?;
        (p > 0.0 && p < 100.0).then_some(Quantile::P(p))
    }

    /// Its name.
    pub(crate) fn label(&self) -> String {
        match self {
            Quantile::Max => "max".into(),
            Quantile::P(p) => format!("p{p}"),
        }
    }

    /// The value over sorted latencies (nearest rank).
    pub(crate) fn of(&self, sorted: &[Duration]) -> Option<Duration> {
        if sorted.is_empty() {
            return None;
        }
        let rank = match self {
            Quantile::Max => sorted.len(),
            Quantile::P(p) => ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()),
        };
        Some(sorted[rank - 1])
    }
}

/// One measurement.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct Sample {
    /// When it started, seconds since the experiment started.
    pub(crate) t: f64,
    /// Whether it met the per-sample checks (answered, matching reply/status/body, instance count).
    pub(crate) ok: bool,
    /// How long it took (a timeout counts as the timeout), seconds; registry samples have none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) latency: Option<f64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// The measured value where there is one (instance count, HTTP status).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) value: Option<Json>,
}

impl Sample {
    /// When it completed.
    pub(crate) fn done(&self) -> f64 {
        self.t + self.latency.unwrap_or(0.0)
    }
}

/// Takes one sample (at `t`, seconds since the start).
pub(crate) async fn sample(driver: &dyn Driver, spec: &ProbeSpec, t: f64) -> Sample {
    let started = tokio::time::Instant::now();
    let mut s = Sample { t, ok: false, latency: None, error: None, value: None };
    let tol = &spec.tolerance;
    match &spec.kind {
        ProbeKind::Rpc { subject, args, .. } => {
            let result = tokio::time::timeout(spec.timeout, driver.call(subject, args, spec.timeout)).await;
            s.latency = Some(started.elapsed().as_secs_f64());
            match result {
                Err(_) => s.error = Some(format!("Timeout after {:.3} s", spec.timeout.as_secs_f64())),
                Ok(Err(err)) => s.error = Some(err),
                Ok(Ok(reply)) => match &tol.reply {
                    Some(m) if !m.matches(&reply) => {
                        s.error = Some(format!("reply {} is not {}", truncate(&reply.to_string()), m.describe()));
                    }
                    _ => s.ok = true,
                },
            }
        }
        ProbeKind::Registry { service } => match tokio::time::timeout(spec.timeout, driver.instances(service)).await {
            Err(_) => s.error = Some("registry did not answer in time".into()),
            Ok(Err(err)) => s.error = Some(err),
            Ok(Ok(n)) => {
                s.value = Some(n.into());
                let min = tol.min_instances.unwrap_or(1);
                if n < min {
                    s.error = Some(format!("{n} instance(s) of {service}, fewer than {min}"));
                } else if let Some(max) = tol.max_instances.filter(|max| n > *max) {
                    s.error = Some(format!("{n} instance(s) of {service}, more than {max}"));
                } else {
                    s.ok = true;
                }
            }
        },
        ProbeKind::Http { url, method, headers, body } => {
            let request = super::http::Request {
                url: url.clone(),
                method: method.clone(),
                headers: headers.clone(),
                body: body.clone(),
            };
            let result = tokio::time::timeout(spec.timeout, driver.http(&request, spec.timeout)).await;
            s.latency = Some(started.elapsed().as_secs_f64());
            match result {
                Err(_) => s.error = Some(format!("Timeout after {:.3} s", spec.timeout.as_secs_f64())),
                Ok(Err(err)) => s.error = Some(err),
                Ok(Ok(resp)) => {
                    s.value = Some(resp.status.into());
                    let accepted = tol.status.clone().unwrap_or(StatusRange(vec![(200, 399)]));
                    if !accepted.contains(resp.status) {
                        s.error = Some(format!("HTTP status {}", resp.status));
                    } else if let Some(m) = tol.body.as_ref().filter(|m| !m.matches(&Json::String(resp.body.clone()))) {
                        s.error = Some(format!("body {} is not {}", truncate(&resp.body), m.describe()));
                    } else {
                        s.ok = true;
                    }
                }
            }
        }
    }
    s
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= 80 { s.to_owned() } else { format!("{}…", s.chars().take(80).collect::<String>()) }
}

/// The judgement of one window.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct Verdict {
    /// `before`, `during`, `after` or `safeguard`.
    pub(crate) phase: String,
    /// Window start and end, seconds since the experiment started.
    pub(crate) from: f64,
    /// End.
    pub(crate) to: f64,
    /// `held`, `deviated`, or `no_data` (fewer samples than `min_samples`: counts as deviated for the hypothesis).
    pub(crate) result: String,
    /// Samples judged.
    pub(crate) samples: usize,
    /// Share of good samples.
    pub(crate) success: f64,
    /// Measured latency percentiles (seconds), for the percentiles the tolerance names.
    pub(crate) latency: BTreeMap<String, f64>,
    /// What did not hold.
    pub(crate) failures: Vec<String>,
}

impl Verdict {
    /// Whether it held.
    pub(crate) fn held(&self) -> bool {
        self.result == "held"
    }
}

/// Judges the samples that *started* in `[from, to)` against `tol`.
pub(crate) fn judge(tol: &Tolerance, samples: &[Sample], phase: &str, from: f64, to: f64) -> Verdict {
    let window: Vec<&Sample> = samples.iter().filter(|s| s.t >= from && s.t < to).collect();
    let good = window.iter().filter(|s| s.ok).count();
    let success = if window.is_empty() { 0.0 } else { good as f64 / window.len() as f64 };
    let mut latencies: Vec<Duration> = window.iter().filter_map(|s| s.latency).map(Duration::from_secs_f64).collect();
    latencies.sort();
    let mut verdict = Verdict {
        phase: phase.to_owned(),
        from,
        to,
        result: String::new(),
        samples: window.len(),
        success,
        latency: BTreeMap::new(),
        failures: Vec::new(),
    };
    if window.len() < tol.min_samples {
        verdict.result = "no_data".into();
        verdict.failures.push(format!("{} sample(s), fewer than {}", window.len(), tol.min_samples));
        return verdict;
    }
    // A tiny tolerance for rounding: 99 % of 100 samples is 0.99 exactly.
    if success + 1e-9 < tol.success {
        let mut errors: Vec<&str> = window.iter().filter_map(|s| s.error.as_deref()).collect();
        errors.sort_unstable();
        errors.dedup();
        verdict.failures.push(format!(
            "success {:.1}% < {:.1}% ({} of {} failed{})",
            success * 100.0,
            tol.success * 100.0,
            window.len() - good,
            window.len(),
            errors.first().map(|e| format!(", e.g. {e}")).unwrap_or_default()
        ));
    }
    for (q, limit) in &tol.latency {
        if let Some(v) = q.of(&latencies) {
            verdict.latency.insert(q.label(), v.as_secs_f64());
            if v > *limit {
                verdict.failures.push(format!(
                    "latency {} {:.1} ms > {:.1} ms",
                    q.label(),
                    v.as_secs_f64() * 1e3,
                    limit.as_secs_f64() * 1e3
                ));
            }
        }
    }
    verdict.result = if verdict.failures.is_empty() { "held" } else { "deviated" }.into();
    verdict
}

/// Splits `[from, to)` into windows of `window` for the during-phase judgement; a remainder shorter than half a
/// window joins the last one.
pub(crate) fn windows(from: f64, to: f64, window: f64) -> Vec<(f64, f64)> {
    if to <= from {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let end = (start + window).min(to);
        out.push((start, end));
        start = end;
    }
    if out.len() > 1
        && let Some(&(s, e)) = out.last()
        && e - s < window / 2.0
    {
        out.pop();
        if let Some(last) = out.last_mut() {
            last.1 = e;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tol() -> Tolerance {
        Tolerance {
            success: 0.9,
            latency: vec![
                (Quantile::P(99.0), Duration::from_millis(100)),
                (Quantile::P(50.0), Duration::from_millis(20)),
            ],
            reply: None,
            status: None,
            body: None,
            min_instances: None,
            max_instances: None,
            min_samples: 3,
        }
    }

    fn s(t: f64, ok: bool, ms: f64) -> Sample {
        Sample { t, ok, latency: Some(ms / 1e3), error: (!ok).then(|| "Timeout".into()), value: None }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(Quantile::P(50.0).of(&v), Some(Duration::from_millis(50)));
        assert_eq!(Quantile::P(99.0).of(&v), Some(Duration::from_millis(99)));
        assert_eq!(Quantile::P(99.9).of(&v), Some(Duration::from_millis(100)));
        assert_eq!(Quantile::Max.of(&v), Some(Duration::from_millis(100)));
        assert_eq!(Quantile::P(50.0).of(&[]), None);
        assert_eq!(Quantile::parse("p99.9"), Some(Quantile::P(99.9)));
        assert_eq!(Quantile::parse("p100"), None);
        assert_eq!(Quantile::parse("99"), None);
    }

    #[test]
    fn a_window_holds_or_deviates_with_reasons() {
        let good: Vec<Sample> = (0..10).map(|i| s(i as f64 * 0.1, true, 5.0)).collect();
        let v = judge(&tol(), &good, "before", 0.0, 1.0);
        assert!(v.held(), "{v:?}");
        assert_eq!((v.samples, v.success), (10, 1.0));
        assert_eq!(v.latency["p99"], 0.005);

        // Two timeouts of ten: 80 % < 90 %, and the p99 is the timeout.
        let mut bad = good.clone();
        bad[3] = s(0.3, false, 1000.0);
        bad[4] = s(0.4, false, 1000.0);
        let v = judge(&tol(), &bad, "during", 0.0, 1.0);
        assert_eq!(v.result, "deviated");
        assert!(v.failures[0].starts_with("success 80.0% < 90.0% (2 of 10 failed, e.g. Timeout)"), "{v:?}");
        assert!(v.failures[1].contains("p99 1000.0 ms > 100.0 ms"), "{v:?}");

        // Outside the window does not count; too few samples is no data.
        let v = judge(&tol(), &bad, "after", 0.5, 0.7);
        assert_eq!((v.result.as_str(), v.samples), ("no_data", 2));
        assert!(!v.held());
    }

    #[test]
    fn during_windows_tile_the_method() {
        assert_eq!(windows(0.0, 10.0, 4.0), vec![(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]);
        assert_eq!(windows(0.0, 9.0, 4.0), vec![(0.0, 4.0), (4.0, 9.0)]);
        assert_eq!(windows(0.0, 1.0, 4.0), vec![(0.0, 1.0)]);
        assert!(windows(1.0, 1.0, 4.0).is_empty());
    }

    #[test]
    fn matchers_and_status_ranges() {
        assert!(Matcher::Equals(Json::from("HI")).matches(&Json::from("HI")));
        assert!(!Matcher::Equals(Json::from("HI")).matches(&Json::from("hi")));
        assert!(Matcher::Contains("pid".into()).matches(&serde_json::json!({"pid": 1})));
        assert!(Matcher::Regex(regex::Regex::new("^H.$").unwrap()).matches(&Json::from("HI")));
        let r = StatusRange::parse(&yaml_serde::from_str("[\"2xx\", 304]").unwrap()).unwrap();
        assert_eq!(r, StatusRange(vec![(200, 299), (304, 304)]));
        assert!(r.contains(204) && !r.contains(404));
        assert!(StatusRange::parse(&yaml_serde::from_str("99").unwrap()).is_err());
    }
}
