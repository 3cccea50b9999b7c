//! Chaos experiments: a steady-state hypothesis, a method of faults, safeguards, and a report.
//!
//! `lymph-chaos run experiment.yml` reads an experiment file ([`file`]), checks that every fault step is valid and
//! routable (a dry run on the agents: nothing is applied when something is wrong), then:
//!
//! ```text
//!   probes sample continuously ─────────────────────────────────────────────────────────────────────▶
//!   │ before: steady state?  │ method: faults, pauses, repeats │ revert all │ recovery │ after: steady? │
//!   │ (not steady → not run) │ safeguards watch every sample;  │  (always)  │          │                │
//!   │                        │ a failing one aborts at once ───┼──▶ revert  │          │                │
//! ```
//!
//! and writes a [`report::Report`]: JSON, a summary, and a timeline picture ([`svg`]). Every lasting fault is
//! applied with a short lease renewed while it should last ([`method`]), so the agents end it by themselves soon
//! after this process dies; while it lives, everything is reverted on completion, abort, failure and Ctrl-C.
//!
//! # Layout
//! - [`file`] — the YAML format, checked with line and key in every error (the only YAML parser here)
//! - [`probe`] — rpc / registry / http probes, samples, tolerances and their judgement
//! - [`method`] — steps, the fault ledger, leases, revert-all
//! - [`driver`] — the seam to the outside world (lymph RPC, ZooKeeper, agents); faked in tests
//! - [`http`] — the small HTTP client of http probes
//! - [`report`], [`svg`] — the report and its picture
//! - [`command`] — `lymph-chaos run`: ZooKeeper, signals, progress display, files
//! - [`run`] — the phases, here

pub mod command;
pub(crate) mod driver;
pub mod file;
pub(crate) mod http;
pub(crate) mod method;
pub(crate) mod probe;
pub(crate) mod report;
pub(crate) mod svg;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::mpsc,
    task::JoinSet,
    time::{Instant, sleep, sleep_until},
};
use tokio_util::sync::CancellationToken;

use self::{
    driver::Driver,
    file::{Experiment, Phase},
    method::{Ctx, revert_all},
    probe::{ProbeSpec, Sample, Verdict, judge, windows},
    report::{Abort, Log, Phases, ProbeReport, Report, Span, Status},
};

/// Longest lifetime a fault gets at once (renewed while it should last): how long faults outlive a crashed run.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// How to run.
#[derive(Clone, Debug)]
pub(crate) struct RunOptions {
    /// The file (for the report).
    pub(crate) file: String,
    /// ZooKeeper used (for the report).
    pub(crate) zookeeper: String,
    /// Force a dry run.
    pub(crate) dry_run: bool,
    /// Seed (overrides the file's).
    pub(crate) seed: Option<u64>,
    /// Lease of lasting faults.
    pub(crate) lease: Duration,
    /// A status line every this often (0: none).
    pub(crate) progress_every: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            file: String::new(),
            zookeeper: String::new(),
            dry_run: false,
            seed: None,
            lease: DEFAULT_LEASE,
            progress_every: Duration::from_secs(2),
        }
    }
}

struct ProbeState {
    spec: ProbeSpec,
    role: &'static str,
    samples: Mutex<Vec<Sample>>,
    /// Start times of samples not finished yet.
    inflight: Mutex<BTreeMap<u64, f64>>,
}

impl ProbeState {
    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("poisoned").clone()
    }
}

/// How the method phase ended.
enum MethodEnd {
    Completed,
    Failed(String, f64),
    Safeguard { probe: String, at: f64, why: String },
    Interrupted(f64),
}

/// Runs an experiment: never panics, always reverts what it applied (see the module docs). `cancel` is Ctrl-C.
pub(crate) async fn run(
    exp: &Experiment,
    driver: Arc<dyn Driver>,
    opts: RunOptions,
    log: Log,
    cancel: CancellationToken,
) -> Report {
    let seed = opts.seed.or(exp.seed).unwrap_or_else(rand::random);
    let dry_run = opts.dry_run || exp.dry_run;
    let ctx = Arc::new(Ctx::new(driver, &exp.method, seed, dry_run, opts.lease, log.clone()));
    let started_at = crate::util::now_unix() - ctx.t0.elapsed().as_secs_f64();
    let body = {
        let (exp, ctx, opts, cancel) = (exp.clone(), ctx.clone(), opts.clone(), cancel.clone());
        tokio::spawn(async move { phases(&exp, &ctx, &opts, &cancel).await })
    };
    let (status, reason, phases, probes, abort) = match body.await {
        Ok(out) => out,
        Err(err) => {
            // A bug: never leave faults behind because of it.
            let reverted = revert_all(&ctx).await;
            ctx.log.warn(format!("internal error: {err}; {reverted} fault(s) reverted"));
            (Status::Aborted, format!("internal error: {err}"), Phases::default(), Vec::new(), None)
        }
    };
    let faults = ctx.ledger.lock().expect("poisoned").clone();
    Report {
        title: exp.title.clone(),
        tags: exp.tags.clone(),
        file: opts.file,
        status,
        exit_code: status.exit_code(),
        reason,
        seed,
        dry_run,
        zookeeper: opts.zookeeper,
        started_at,
        duration: ctx.now(),
        phases,
        probes,
        faults,
        abort,
        log: log.entries(),
    }
}

/// Preflight: every fault step routed and dry-run on an agent; nothing is applied when one fails.
///
/// # Errors
/// The status and reason of a run that stops here (interrupted, or a step that cannot be applied).
async fn preflight(exp: &Experiment, ctx: &Arc<Ctx>, cancel: &CancellationToken) -> Result<(), (Status, String)> {
    let log = &ctx.log;
    for (step, fault) in exp.method.iter().flat_map(|s| s.faults()) {
        let what = step.name.clone().unwrap_or_else(|| fault.describe());
        let checked = async {
            let hosts = ctx.driver.hosts(fault.service.as_deref()).await?;
            for (agent, count) in method::plan(fault, &hosts, ctx.seed).into_iter().take(1) {
                let mut kwargs =
                    driver::kwargs(fault, &format!("{}-check", ctx.run_id), Some(ctx.seed), ctx.lease, true);
                if let Some(c) = count {
                    kwargs.insert("count".into(), c.into());
                }
                ctx.driver.inject(&agent, &kwargs).await?;
            }
            Ok::<(), driver::DriverError>(())
        };
        let result = tokio::select! {
            r = checked => r,
            () = cancel.cancelled() => {
                log.warn("interrupted before anything was applied");
                return Err((Status::Aborted, "interrupted before anything was applied".into()));
            }
        };
        if let Err(err) = result {
            let reason = format!("{} ({what}) cannot be applied: {err}; nothing was applied", step.path);
            log.warn(&reason);
            return Err((Status::NotRun, reason));
        }
    }
    log.info(format!(
        "preflight: {} fault step(s) checked on the agents (dry run)",
        exp.method.iter().flat_map(|s| s.faults()).count()
    ));
    Ok(())
}

type PhasesOut = (Status, String, Phases, Vec<ProbeReport>, Option<Abort>);

// One sequence of steps — before, method under the safeguards, after — that shares the probes, their verdicts
// and the stop token from start to end; its parts read in order here, and the pieces that stand alone
// (preflight, settle, revert_all, the samplers) are functions of their own.
async fn phases(exp: &Experiment, ctx: &Arc<Ctx>, opts: &RunOptions, cancel: &CancellationToken) -> PhasesOut {
    let mut phases = Phases::default();
    let log = &ctx.log;
    log.info(format!(
        "experiment \"{}\" (seed {}{}), run id {}",
        exp.title,
        ctx.seed,
        if ctx.dry_run { ", dry run" } else { "" },
        ctx.run_id
    ));

    if let Err((status, reason)) = preflight(exp, ctx, cancel).await {
        return (status, reason, phases, Vec::new(), None);
    }

    // Probes sample from now until the end.
    let probes: Arc<Vec<ProbeState>> = Arc::new(
        exp.steady_state
            .probes
            .iter()
            .map(|p| (p, "steady_state"))
            .chain(exp.safeguards.iter().map(|p| (p, "safeguard")))
            .map(|(spec, role)| ProbeState {
                spec: spec.clone(),
                role,
                samples: Mutex::default(),
                inflight: Mutex::default(),
            })
            .collect(),
    );
    let stop = CancellationToken::new();
    let (sample_tx, mut sample_rx) = mpsc::unbounded_channel::<(usize, Sample)>();
    let mut samplers = JoinSet::new();
    for i in 0..probes.len() {
        samplers.spawn(sampler(ctx.clone(), probes.clone(), i, sample_tx.clone(), stop.clone()));
    }
    drop(sample_tx);
    if !opts.progress_every.is_zero() {
        samplers.spawn(progress(ctx.clone(), probes.clone(), opts.progress_every, stop.clone()));
    }
    let finish = |stop: &CancellationToken, probes: &Arc<Vec<ProbeState>>, verdicts: &BTreeMap<usize, Vec<Verdict>>| {
        stop.cancel();
        probes
            .iter()
            .enumerate()
            .map(|(i, p)| ProbeReport {
                name: p.spec.name.clone(),
                role: p.role,
                kind: p.spec.kind.label(),
                target: p.spec.kind.target(),
                limits: p.spec.tolerance.latency.iter().map(|(q, l)| (q.label(), l.as_secs_f64())).collect(),
                verdicts: verdicts.get(&i).cloned().unwrap_or_default(),
                samples: p.samples(),
            })
            .collect::<Vec<_>>()
    };
    let mut verdicts: BTreeMap<usize, Vec<Verdict>> = BTreeMap::new();
    let longest = |phase: Phase| {
        exp.steady_state.probes.iter().filter(|p| p.check.contains(&phase)).map(|p| p.window).max().unwrap_or_default()
    };

    // Before.
    let before = exp.steady_state.before.unwrap_or_else(|| longest(Phase::Before));
    let before_from = ctx.now();
    if !before.is_zero() {
        log.info(format!("before: checking the steady state for {:.1} s", before.as_secs_f64()));
        tokio::select! {
            () = sleep(before) => {}
            () = cancel.cancelled() => {
                let probes = finish(&stop, &probes, &verdicts);
                return (Status::Aborted, "interrupted before anything was applied".into(), phases, probes, None);
            }
        }
    }
    let before_to = ctx.now();
    settle(&probes, before_to).await;
    phases.before = Some(Span { from: before_from, to: before_to });
    let mut steady = true;
    for (i, p) in
        probes.iter().enumerate().filter(|(_, p)| p.role == "steady_state" && p.spec.check.contains(&Phase::Before))
    {
        let v = judge(&p.spec.tolerance, &p.samples(), "before", before_from, before_to);
        if !v.held() {
            steady = false;
            log.warn(format!("before: {} {}: {}", p.spec.name, v.result, v.failures.join("; ")));
        }
        verdicts.entry(i).or_default().push(v);
    }
    if !steady {
        let probes = finish(&stop, &probes, &verdicts);
        return (
            Status::NotRun,
            "the steady state did not hold before the method: nothing was applied".into(),
            phases,
            probes,
            None,
        );
    }
    log.info("before: steady state holds");

    // Method, watched by the safeguards.
    let method_from = ctx.now();
    let method_from_instant = Instant::now();
    log.info("method: starting");
    let watching = Arc::new(AtomicBool::new(true));
    let (abort_tx, mut abort_rx) = mpsc::unbounded_channel::<(String, f64, String)>();
    let watcher = {
        let (probes, watching) = (probes.clone(), watching.clone());
        tokio::spawn(async move {
            let mut consecutive: BTreeMap<usize, u32> = BTreeMap::new();
            while let Some((i, sample)) = sample_rx.recv().await {
                let p = &probes[i];
                if p.role != "safeguard" || !watching.load(Ordering::SeqCst) || sample.t < method_from {
                    continue;
                }
                let done = sample.done();
                let from = (done - p.spec.window.as_secs_f64()).max(method_from);
                let v = judge(&p.spec.tolerance, &p.samples(), "safeguard", from, done + 1e-9);
                match v.result.as_str() {
                    "deviated" => {
                        let n = consecutive.entry(i).or_default();
                        *n += 1;
                        if *n >= p.spec.failure_threshold {
                            let _ = abort_tx.send((p.spec.name.clone(), done, v.failures.join("; ")));
                        }
                    }
                    "held" => {
                        consecutive.insert(i, 0);
                    }
                    _ => {}
                }
            }
        })
    };
    let end = {
        let method = async {
            method::run_steps(ctx, &exp.method).await?;
            // Faults with a lifetime run it out before the method is over.
            let last_end = ctx
                .ledger
                .lock()
                .expect("poisoned")
                .iter()
                .filter(|r| r.lasting && r.outcome == "active")
                .filter_map(|r| r.planned_end)
                .fold(0.0f64, f64::max);
            let wait = last_end - ctx.now();
            if wait > 0.0 {
                sleep_until(method_from_instant + Duration::from_secs_f64(last_end - method_from)).await;
            }
            Ok::<(), method::MethodError>(())
        };
        tokio::select! {
            r = method => match r {
                Ok(()) => MethodEnd::Completed,
                Err(e) => MethodEnd::Failed(e.to_string(), ctx.now()),
            },
            Some((probe, at, why)) = abort_rx.recv() => MethodEnd::Safeguard { probe, at, why },
            () = cancel.cancelled() => MethodEnd::Interrupted(ctx.now()),
        }
    };
    watching.store(false, Ordering::SeqCst);
    let active = ctx.active();
    if active > 0 {
        log.info(format!("reverting {active} active fault(s)"));
    }
    revert_all(ctx).await;
    let method_to = ctx.now();
    phases.method = Some(Span { from: method_from, to: method_to });
    let abort = match &end {
        MethodEnd::Completed => None,
        MethodEnd::Failed(why, at) => {
            Some(Abort { reason: format!("a fault failed: {why}"), probe: None, at: *at, reverted_at: method_to })
        }
        MethodEnd::Safeguard { probe, at, why } => Some(Abort {
            reason: format!("safeguard `{probe}` failed: {why}"),
            probe: Some(probe.clone()),
            at: *at,
            reverted_at: method_to,
        }),
        MethodEnd::Interrupted(at) => {
            Some(Abort { reason: "interrupted (Ctrl-C)".into(), probe: None, at: *at, reverted_at: method_to })
        }
    };
    if let Some(a) = &abort {
        log.warn(format!("aborted: {}; every fault reverted {:.0} ms later", a.reason, (a.reverted_at - a.at) * 1e3));
        if a.probe.is_some() {
            // Show the effect of the revert in the picture for a moment.
            sleep(Duration::from_secs(1)).await;
        }
        watcher.abort();
        settle(&probes, ctx.now()).await;
        let probes = finish(&stop, &probes, &verdicts);
        let reason = a.reason.clone();
        return (Status::Aborted, format!("{reason}; every fault was reverted"), phases, probes, abort);
    }
    log.info(format!("method: done in {:.1} s, every fault reverted", method_to - method_from));

    // After.
    let after = exp.steady_state.after.unwrap_or_else(|| longest(Phase::After));
    if !exp.steady_state.recovery.is_zero() {
        log.info(format!("recovery: {:.1} s", exp.steady_state.recovery.as_secs_f64()));
    }
    let waited = async {
        sleep(exp.steady_state.recovery).await;
        let from = ctx.now();
        if !after.is_zero() {
            log.info(format!("after: checking the steady state for {:.1} s", after.as_secs_f64()));
            sleep(after).await;
        }
        from
    };
    let after_from = tokio::select! {
        from = waited => from,
        () = cancel.cancelled() => {
            watcher.abort();
            let probes = finish(&stop, &probes, &verdicts);
            let at = ctx.now();
            return (
                Status::Aborted,
                "interrupted after the method (every fault was already reverted)".into(),
                phases,
                probes,
                Some(Abort { reason: "interrupted (Ctrl-C)".into(), probe: None, at, reverted_at: method_to }),
            );
        }
    };
    let after_to = ctx.now();
    settle(&probes, after_to).await;
    watcher.abort();
    if !after.is_zero() {
        phases.after = Some(Span { from: after_from, to: after_to });
    }
    let mut deviations = Vec::new();
    for (i, p) in probes.iter().enumerate().filter(|(_, p)| p.role == "steady_state") {
        let samples = p.samples();
        if p.spec.check.contains(&Phase::During) {
            for (from, to) in windows(method_from, method_to, p.spec.window.as_secs_f64()) {
                let v = judge(&p.spec.tolerance, &samples, "during", from, to);
                if !v.held() {
                    deviations.push(format!("{} during {from:.1}–{to:.1} s: {}", p.spec.name, v.failures.join("; ")));
                }
                verdicts.entry(i).or_default().push(v);
            }
        }
        if p.spec.check.contains(&Phase::After) && !after.is_zero() {
            let v = judge(&p.spec.tolerance, &samples, "after", after_from, after_to);
            if !v.held() {
                deviations.push(format!("{} after: {}", p.spec.name, v.failures.join("; ")));
            }
            verdicts.entry(i).or_default().push(v);
        }
    }
    let probes = finish(&stop, &probes, &verdicts);
    if deviations.is_empty() {
        log.info("the hypothesis held");
        (Status::Held, "the steady state held before, during and after the method".into(), phases, probes, None)
    } else {
        for d in &deviations {
            log.warn(format!("deviated: {d}"));
        }
        let more = if deviations.len() > 1 { format!(" (and {} more)", deviations.len() - 1) } else { String::new() };
        (Status::Deviated, format!("deviated: {}{more}; every fault was reverted", deviations[0]), phases, probes, None)
    }
}

/// One probe's sampling loop: a sample starts every `every` (open loop, each in its own task).
async fn sampler(
    ctx: Arc<Ctx>,
    probes: Arc<Vec<ProbeState>>,
    i: usize,
    tx: mpsc::UnboundedSender<(usize, Sample)>,
    stop: CancellationToken,
) {
    let every = probes[i].spec.every;
    let mut next = Instant::now();
    let mut seq = 0u64;
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = sleep_until(next) => {}
        }
        while running.try_join_next().is_some() {}
        let t = ctx.now();
        probes[i].inflight.lock().expect("poisoned").insert(seq, t);
        let (ctx, probes, tx) = (ctx.clone(), probes.clone(), tx.clone());
        running.spawn(async move {
            let p = &probes[i];
            let s = probe::sample(&*ctx.driver, &p.spec, t).await;
            p.samples.lock().expect("poisoned").push(s.clone());
            p.inflight.lock().expect("poisoned").remove(&seq);
            let _ = tx.send((i, s));
        });
        seq += 1;
        next += every;
        let now = Instant::now();
        if next < now {
            next = now;
        }
    }
    running.abort_all();
}

/// Waits (bounded by the probes' timeouts) until every sample that started before `t` has finished.
async fn settle(probes: &[ProbeState], t: f64) {
    let limit = probes.iter().map(|p| p.spec.timeout).max().unwrap_or_default() + Duration::from_millis(500);
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let busy = probes.iter().any(|p| p.inflight.lock().expect("poisoned").values().any(|start| *start < t));
        if !busy {
            return;
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// A status line every `every`: per probe, the samples of the last period; the faults active.
async fn progress(ctx: Arc<Ctx>, probes: Arc<Vec<ProbeState>>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = sleep(every) => {}
        }
        let now = ctx.now();
        let parts: Vec<String> = probes
            .iter()
            .map(|p| {
                let samples = p.samples();
                let recent: Vec<&Sample> = samples.iter().filter(|s| s.done() > now - every.as_secs_f64()).collect();
                let ok = recent.iter().filter(|s| s.ok).count();
                let mut lat: Vec<f64> = recent.iter().filter_map(|s| s.latency).collect();
                lat.sort_by(f64::total_cmp);
                let worst = lat.last().map(|l| format!(", max {:.0} ms", l * 1e3)).unwrap_or_default();
                format!("{} {ok}/{} ok{worst}", p.spec.name, recent.len())
            })
            .collect();
        ctx.log.info(format!("status: {} | {} fault(s) active", parts.join(" | "), ctx.active()));
    }
}

/// The method's steps that are faults, flattened (for listings).
pub(crate) fn fault_steps(exp: &Experiment) -> Vec<String> {
    exp.method
        .iter()
        .flat_map(|s| s.faults())
        .map(|(s, f)| format!("{}: {}", s.path, s.name.clone().unwrap_or_else(|| f.describe())))
        .collect()
}

#[cfg(test)]
mod tests;
