//! The report: what happened, for machines (JSON) and people (a summary, a progress display while running, and
//! the timeline picture from [`super::svg`]).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};

use super::{
    method::FaultRecord,
    probe::{Sample, Verdict},
};

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    /// The hypothesis held before, during and after the method.
    Held,
    /// It did not hold during or after the method.
    Deviated,
    /// Stopped early (a safeguard, a failed fault, Ctrl-C); everything was reverted.
    Aborted,
    /// Never ran: the file, the agents, or the steady state before the method.
    NotRun,
}

impl Status {
    /// The exit code of `lymph-chaos run`.
    pub(crate) fn exit_code(self) -> i32 {
        match self {
            Status::Held => EXIT_HELD,
            Status::Deviated => EXIT_DEVIATED,
            Status::NotRun => EXIT_NOT_RUN,
            Status::Aborted => EXIT_ABORTED,
        }
    }

    /// Words for people.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Status::Held => "HYPOTHESIS HELD",
            Status::Deviated => "HYPOTHESIS DEVIATED",
            Status::Aborted => "ABORTED",
            Status::NotRun => "COULD NOT RUN",
        }
    }
}

/// `lymph-chaos run` exit code: the hypothesis held.
pub(crate) const EXIT_HELD: i32 = 0;
/// Exit code: it deviated (faults reverted).
pub(crate) const EXIT_DEVIATED: i32 = 1;
/// Exit code: could not run (bad file, no agent, not steady before; nothing applied).
pub(crate) const EXIT_NOT_RUN: i32 = 2;
/// Exit code: aborted (safeguard, failed fault, interrupted; everything reverted).
pub(crate) const EXIT_ABORTED: i32 = 3;

/// A line of the run's log.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct LogEntry {
    /// Seconds since the start.
    pub(crate) t: f64,
    /// `info` or `warn`.
    pub(crate) level: &'static str,
    /// What happened.
    pub(crate) message: String,
}

/// The run's log: kept for the report, and sent to the progress display as it happens.
#[derive(Clone)]
pub(crate) struct Log {
    t0: Instant,
    entries: Arc<Mutex<Vec<LogEntry>>>,
    tx: Option<mpsc::UnboundedSender<LogEntry>>,
}

impl Log {
    /// A log starting now; entries also go to `tx`.
    pub(crate) fn new(tx: Option<mpsc::UnboundedSender<LogEntry>>) -> Log {
        Log { t0: Instant::now(), entries: Arc::default(), tx }
    }

    /// The start.
    pub(crate) fn t0(&self) -> Instant {
        self.t0
    }

    fn push(&self, level: &'static str, message: String) {
        let entry = LogEntry { t: self.t0.elapsed().as_secs_f64(), level, message };
        if let Some(tx) = &self.tx {
            let _ = tx.send(entry.clone());
        }
        self.entries.lock().expect("poisoned").push(entry);
    }

    /// Records something that happened.
    pub(crate) fn info(&self, message: impl Into<String>) {
        self.push("info", message.into());
    }

    /// Records a problem.
    pub(crate) fn warn(&self, message: impl Into<String>) {
        self.push("warn", message.into());
    }

    /// Everything so far.
    pub(crate) fn entries(&self) -> Vec<LogEntry> {
        self.entries.lock().expect("poisoned").clone()
    }
}

/// A phase's span, seconds since the start.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub(crate) struct Span {
    /// Start.
    pub(crate) from: f64,
    /// End.
    pub(crate) to: f64,
}

/// The phases that ran.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Phases {
    /// Steady state before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) before: Option<Span>,
    /// The method (until every fault was reverted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) method: Option<Span>,
    /// Steady state after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) after: Option<Span>,
}

/// A probe's record.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ProbeReport {
    /// Its name.
    pub(crate) name: String,
    /// `steady_state` or `safeguard`.
    pub(crate) role: &'static str,
    /// `rpc`, `registry`, `http`.
    pub(crate) kind: &'static str,
    /// What it looks at.
    pub(crate) target: String,
    /// Latency limits of its tolerance (percentile, seconds).
    pub(crate) limits: Vec<(String, f64)>,
    /// Judgements.
    pub(crate) verdicts: Vec<Verdict>,
    /// Every sample.
    pub(crate) samples: Vec<Sample>,
}

/// Why and how a run was aborted.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Abort {
    /// What happened.
    pub(crate) reason: String,
    /// The safeguard that failed, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) probe: Option<String>,
    /// When the trigger happened (the failing sample completed, Ctrl-C arrived …), seconds since the start.
    pub(crate) at: f64,
    /// When every fault was reverted.
    pub(crate) reverted_at: f64,
}

/// The report.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    /// The experiment's title.
    pub(crate) title: String,
    /// Its tags.
    pub(crate) tags: Vec<String>,
    /// The file.
    pub(crate) file: String,
    /// How it ended.
    pub(crate) status: Status,
    /// `lymph-chaos run`'s exit code.
    pub(crate) exit_code: i32,
    /// One sentence: why.
    pub(crate) reason: String,
    /// Seed used (replays the agents' random choices).
    pub(crate) seed: u64,
    /// Whether faults were only reported, never applied.
    pub(crate) dry_run: bool,
    /// ZooKeeper used.
    pub(crate) zookeeper: String,
    /// Wall-clock start, Unix seconds (every other time is seconds since this).
    pub(crate) started_at: f64,
    /// Total seconds.
    pub(crate) duration: f64,
    /// Phases.
    pub(crate) phases: Phases,
    /// Probes with their samples and verdicts.
    pub(crate) probes: Vec<ProbeReport>,
    /// Every fault application.
    pub(crate) faults: Vec<FaultRecord>,
    /// Set when aborted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) abort: Option<Abort>,
    /// The run's log.
    pub(crate) log: Vec<LogEntry>,
}

impl Report {
    /// The summary for people.
    pub(crate) fn summary(&self) -> String {
        let mut out = format!("{}: {}\n", self.status.label(), self.title);
        out.push_str(&format!("  {}\n", self.reason));
        out.push_str(&format!(
            "  {:.1} s, seed {}{}, ZooKeeper {}\n",
            self.duration,
            self.seed,
            if self.dry_run { ", DRY RUN (nothing applied)" } else { "" },
            self.zookeeper
        ));
        if let Some(a) = &self.abort {
            out.push_str(&format!(
                "  aborted at {:.2} s: {}; every fault reverted at {:.2} s ({:.0} ms later)\n",
                a.at,
                a.reason,
                a.reverted_at,
                (a.reverted_at - a.at) * 1e3
            ));
        }
        out.push_str("\nprobes\n");
        for p in &self.probes {
            let ok = p.samples.iter().filter(|s| s.ok).count();
            out.push_str(&format!(
                "  {} ({}, {}): {ok}/{} samples ok\n",
                p.name,
                p.role.replace('_', "-"),
                p.target,
                p.samples.len()
            ));
            for v in &p.verdicts {
                let lat: Vec<String> = v.latency.iter().map(|(k, s)| format!("{k} {:.1} ms", s * 1e3)).collect();
                out.push_str(&format!(
                    "    {:<9} {:>7.1}–{:<7.1} s  {:<8} {:>4} samples, {:.1}% ok{}{}\n",
                    v.phase,
                    v.from,
                    v.to,
                    v.result,
                    v.samples,
                    v.success * 100.0,
                    if lat.is_empty() { String::new() } else { format!(", {}", lat.join(", ")) },
                    if v.failures.is_empty() { String::new() } else { format!("  ← {}", v.failures.join("; ")) }
                ));
            }
        }
        out.push_str("\nfaults\n");
        if self.faults.is_empty() {
            out.push_str("  none applied\n");
        }
        for f in &self.faults {
            let end = match (f.lasting, f.ended_at) {
                (false, _) => String::new(),
                (true, Some(e)) => format!("–{e:.2} s"),
                (true, None) => "–?".into(),
            };
            out.push_str(&format!(
                "  {:>7.2}{end:<10} {:<26} {:<9} {} on {}: {}\n",
                f.applied_at,
                f.name.clone().unwrap_or_else(|| f.description.clone()),
                f.outcome,
                f.id,
                f.agent,
                f.message
            ));
        }
        out
    }

    /// Writes `report.json`, `summary.txt` and `timeline.svg` into `dir` (created if needed); returns the paths.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub(crate) fn write(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join("report.json");
        std::fs::write(&json, serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        let summary = dir.join("summary.txt");
        std::fs::write(&summary, self.summary())?;
        let svg = dir.join("timeline.svg");
        std::fs::write(&svg, super::svg::render(self))?;
        Ok(vec![json, summary, svg])
    }
}
