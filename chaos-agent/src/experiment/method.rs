//! Running the method: steps (fault, pause, repeat, parallel, serial), the ledger of every fault applied, leases,
//! and reverting everything.
//!
//! Every lasting fault is applied with a *lease*: a lifetime of at most [`Ctx::lease`], renewed (the agent
//! refreshes a fault sent again with the same id) until its own lifetime or the method ends. If this process dies,
//! the agents end every fault within one lease; while it lives, [`revert_all`] undoes them at once — after the
//! method, on a safeguard abort, on Ctrl-C and on failure. A fault is written into the ledger *before* its request
//! is sent, so a request cut short by an abort is reverted too.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde::Serialize;
use serde_json::{Map, Value as Json};
use tokio::{task::JoinSet, time::Instant};

use super::{
    driver::{self, Driver, DriverError, Fut, Host},
    file::{FaultStep, Step, StepAction},
    report::Log,
};

/// One application of a fault on one agent.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct FaultRecord {
    /// The step (`method[2]`).
    pub(crate) step: String,
    /// The step's label, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    /// `latency`, `kill` …
    pub(crate) kind: String,
    /// Target service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) service: Option<String>,
    /// What was asked (`loss Echo (loss=30)`).
    pub(crate) description: String,
    /// The fault id on the agent.
    pub(crate) id: String,
    /// The agent.
    pub(crate) agent: String,
    /// Seconds since the start when it was sent.
    pub(crate) applied_at: f64,
    /// When it was meant to end (its lifetime), if it has one; lasting faults without one end with the method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) planned_end: Option<f64>,
    /// When it ended: reverted by us, or expired on the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ended_at: Option<f64>,
    /// `pending`, `active`, `done` (kills), `dry_run`, `failed`, `reverted`, `expired`, `refreshed` (applied again
    /// by a later round: that record continues it), `revert_failed`.
    pub(crate) outcome: String,
    /// The agent's message.
    pub(crate) message: String,
    /// The pids the agent acted on.
    pub(crate) pids: Vec<i64>,
    /// Whether it lasts (and needed reverting).
    pub(crate) lasting: bool,
}

struct Lease {
    kwargs: Map<String, Json>,
    /// `None`: until the method ends.
    end: Option<Instant>,
}

/// Shared state of one run.
pub(crate) struct Ctx {
    /// The outside world.
    pub(crate) driver: Arc<dyn Driver>,
    /// The start.
    pub(crate) t0: Instant,
    /// The run's id (prefix of fault ids).
    pub(crate) run_id: String,
    /// Seed of the run.
    pub(crate) seed: u64,
    /// Dry run.
    pub(crate) dry_run: bool,
    /// Longest lifetime sent at once.
    pub(crate) lease: Duration,
    /// What happened, for the report and the progress display.
    pub(crate) log: Log,
    /// Every application, in order.
    pub(crate) ledger: Mutex<Vec<FaultRecord>>,
    leases: Mutex<BTreeMap<(String, String), Lease>>,
    renewals: Mutex<JoinSet<()>>,
    /// Renewal requests in flight.
    renewing: Arc<AtomicUsize>,
    /// Fault step path → its number (fault ids are `<run id>-<number>`).
    numbers: BTreeMap<String, usize>,
}

/// Why the method stopped early.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{step} ({what}): {error}")]
pub(crate) struct MethodError {
    /// The step.
    pub(crate) step: String,
    /// What it does.
    pub(crate) what: String,
    /// What went wrong.
    pub(crate) error: DriverError,
}

impl Ctx {
    /// A context for `method`.
    pub(crate) fn new(
        driver: Arc<dyn Driver>,
        method: &[Step],
        seed: u64,
        dry_run: bool,
        lease: Duration,
        log: Log,
    ) -> Ctx {
        let numbers = method.iter().flat_map(Step::faults).enumerate().map(|(i, (s, _))| (s.path.clone(), i)).collect();
        Ctx {
            driver,
            t0: log.t0(),
            run_id: format!("ex-{:08x}", rand::random::<u32>()),
            seed,
            dry_run,
            lease,
            log,
            ledger: Mutex::new(Vec::new()),
            leases: Mutex::new(BTreeMap::new()),
            renewals: Mutex::new(JoinSet::new()),
            renewing: Arc::new(AtomicUsize::new(0)),
            numbers,
        }
    }

    /// Seconds since the start.
    pub(crate) fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn id_for(&self, step: &Step) -> String {
        format!("{}-{}", self.run_id, self.numbers.get(&step.path).copied().unwrap_or(usize::MAX))
    }

    /// Lasting faults still active (or whose request is in flight).
    pub(crate) fn active(&self) -> usize {
        let now = self.now();
        self.ledger
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|r| r.outcome == "active" || r.outcome == "pending")
            .filter(|r| r.planned_end.is_none_or(|end| end > now))
            .count()
    }
}

/// Runs steps in order.
pub(crate) fn run_steps<'a>(ctx: &'a Arc<Ctx>, steps: &'a [Step]) -> Fut<'a, Result<(), MethodError>> {
    Box::pin(async move {
        for step in steps {
            run_step(ctx, step).await?;
        }
        Ok(())
    })
}

fn run_step<'a>(ctx: &'a Arc<Ctx>, step: &'a Step) -> Fut<'a, Result<(), MethodError>> {
    Box::pin(async move {
        match &step.action {
            StepAction::Fault(fault) => apply(ctx, step, fault, 0).await,
            StepAction::Pause(d) => {
                tokio::time::sleep(*d).await;
                Ok(())
            }
            StepAction::Serial(steps) => run_steps(ctx, steps).await,
            StepAction::Parallel(branches) => {
                let results = futures::future::join_all(branches.iter().map(|b| run_step(ctx, b))).await;
                results.into_iter().collect::<Result<Vec<()>, _>>().map(|_| ())
            }
            StepAction::Repeat { every, times, duration, steps } => {
                let start = Instant::now();
                let mut round = 0u32;
                loop {
                    let round_start = start + *every * round;
                    tokio::time::sleep_until(round_start).await;
                    ctx.log.info(format!("{}: round {}", step.path, round + 1));
                    for s in steps {
                        match &s.action {
                            StepAction::Fault(f) => apply(ctx, s, f, round).await?,
                            _ => run_step(ctx, s).await?,
                        }
                    }
                    round += 1;
                    let next = start + *every * round;
                    let more = match (times, duration) {
                        (Some(t), _) => round < *t,
                        (None, Some(d)) => next < start + *d,
                        (None, None) => false,
                    };
                    if !more {
                        break;
                    }
                }
                Ok(())
            }
        }
    })
}

/// Which agents get a fault: process faults hit one instance over all hosts (a host chosen by the seed, weighted
/// by its instances) unless `count`, `percent` or `all` spread them; `count` is split over hosts; every other
/// fault goes to every host.
pub(crate) fn plan(fault: &FaultStep, hosts: &[Host], seed: u64) -> Vec<(String, Option<u64>)> {
    let spread = fault.params.get("all") == Some(&Json::Bool(true)) || fault.params.contains_key("percent");
    if !driver::is_process_kind(&fault.kind) || spread || hosts.len() <= 1 {
        return hosts.iter().map(|h| (h.agent.clone(), None)).collect();
    }
    let mut rng = SmallRng::seed_from_u64(seed);
    if let Some(count) = fault.params.get("count").and_then(Json::as_u64) {
        let mut order: Vec<&Host> = hosts.iter().collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut remaining = count;
        let mut out = Vec::new();
        for h in order {
            if remaining == 0 {
                break;
            }
            let take = remaining.min(h.instances as u64);
            if take > 0 {
                out.push((h.agent.clone(), Some(take)));
                remaining -= take;
            }
        }
        return out;
    }
    let total: usize = hosts.iter().map(|h| h.instances.max(1)).sum();
    let mut pick = rng.random_range(0..total);
    for h in hosts {
        let n = h.instances.max(1);
        if pick < n {
            return vec![(h.agent.clone(), None)];
        }
        pick -= n;
    }
    vec![(hosts[0].agent.clone(), None)]
}

/// Applies a fault step (round `round` of its repeat block).
async fn apply(ctx: &Arc<Ctx>, step: &Step, fault: &FaultStep, round: u32) -> Result<(), MethodError> {
    let what = step.name.clone().unwrap_or_else(|| fault.describe());
    let fail = |error: DriverError| MethodError { step: step.path.clone(), what: what.clone(), error };
    let hosts = ctx.driver.hosts(fault.service.as_deref()).await.map_err(fail)?;
    let id = ctx.id_for(step);
    let step_seed = ctx
        .seed
        .wrapping_add(ctx.numbers.get(&step.path).copied().unwrap_or(0) as u64 * 1_000_003)
        .wrapping_add(u64::from(round) * 7919);
    let targets = plan(fault, &hosts, step_seed);
    let now = Instant::now();
    let end = fault.lifetime.map(|l| now + l);
    let lifetime = fault.lifetime.map_or(ctx.lease, |l| l.min(ctx.lease));
    for (agent, count) in targets {
        let mut kwargs = driver::kwargs(fault, &id, Some(step_seed), lifetime, ctx.dry_run);
        if let Some(c) = count {
            kwargs.insert("count".into(), c.into());
        }
        let index = {
            let mut ledger = ctx.ledger.lock().expect("poisoned");
            // Applying the same id again (a repeat) refreshes the fault: the earlier application ends here.
            let now = ctx.now();
            for r in ledger.iter_mut().filter(|r| r.agent == agent && r.id == id && r.outcome == "active") {
                match r.planned_end {
                    Some(end) if end <= now => {
                        r.outcome = "expired".into();
                        r.ended_at = Some(end);
                    }
                    _ => {
                        r.outcome = "refreshed".into();
                        r.ended_at = Some(now);
                    }
                }
            }
            ledger.push(FaultRecord {
                step: step.path.clone(),
                name: step.name.clone(),
                kind: fault.kind.clone(),
                service: fault.service.clone(),
                description: fault.describe(),
                id: id.clone(),
                agent: agent.clone(),
                applied_at: ctx.now(),
                planned_end: fault.lifetime.map(|l| ctx.now() + l.as_secs_f64()),
                ended_at: None,
                outcome: "pending".into(),
                message: String::new(),
                pids: Vec::new(),
                lasting: fault.lasting(),
            });
            ledger.len() - 1
        };
        let result = ctx.driver.inject(&agent, &kwargs).await;
        let mut ledger = ctx.ledger.lock().expect("poisoned");
        let record = &mut ledger[index];
        match result {
            Err(err) => {
                record.outcome = "failed".into();
                record.message = err.to_string();
                drop(ledger);
                ctx.log.warn(format!("{}: {what} failed: {err}", step.path));
                return Err(fail(err));
            }
            Ok(report) => {
                record.message = report["message"].as_str().unwrap_or_default().to_owned();
                record.pids =
                    report["pids"].as_array().map(|p| p.iter().filter_map(Json::as_i64).collect()).unwrap_or_default();
                record.outcome = if ctx.dry_run || report["dry_run"] == true {
                    "dry_run"
                } else if fault.lasting() {
                    "active"
                } else {
                    "done"
                }
                .into();
                let message = format!("{}: {what} on {agent} (id {id}): {}", step.path, record.message);
                let outcome = record.outcome.clone();
                drop(ledger);
                ctx.log.info(message);
                if outcome == "active" {
                    lease(ctx, &agent, &id, kwargs, end);
                }
            }
        }
    }
    Ok(())
}

/// Counts a renewal request in flight (until dropped, also when its task is aborted).
struct Sending(Arc<AtomicUsize>);

impl Sending {
    fn new(counter: &Arc<AtomicUsize>) -> Sending {
        counter.fetch_add(1, Ordering::SeqCst);
        Sending(counter.clone())
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Keeps a lasting fault alive by renewing its lease until `end` (or until [`revert_all`]).
fn lease(ctx: &Arc<Ctx>, agent: &str, id: &str, kwargs: Map<String, Json>, end: Option<Instant>) {
    let key = (agent.to_owned(), id.to_owned());
    let fresh = {
        let mut leases = ctx.leases.lock().expect("poisoned");
        let fresh = !leases.contains_key(&key);
        leases.insert(key.clone(), Lease { kwargs, end });
        fresh
    };
    if !fresh {
        return;
    }
    let me = ctx.clone();
    ctx.renewals.lock().expect("poisoned").spawn(async move {
        let period = me.lease / 3;
        loop {
            tokio::time::sleep(period).await;
            let (mut kwargs, remaining, _sending) = {
                let leases = me.leases.lock().expect("poisoned");
                let Some(l) = leases.get(&key) else { return };
                let remaining = l.end.map(|e| e.saturating_duration_since(Instant::now()));
                if remaining.is_some_and(|r| r <= period) {
                    // The lifetime already sent covers the rest: the agent ends it on time.
                    return;
                }
                // Counted while the lock is held: revert_all either sees it or this renewal never starts.
                (l.kwargs.clone(), remaining, Sending::new(&me.renewing))
            };
            let lifetime = remaining.map_or(me.lease, |r| r.min(me.lease));
            kwargs.insert("lifetime".into(), serde_json::json!(lifetime.as_secs_f64()));
            if let Err(err) = me.driver.inject(&key.0, &kwargs).await {
                me.log.warn(format!("renewing fault {} on {}: {err}", key.1, key.0));
            }
        }
    });
}

/// Reverts every lasting fault of the run (concurrently), stops the renewals, and marks the ledger. Requests that
/// were still in flight (an application cut short by an abort, a renewal) are reverted again once they must have
/// reached their agent. Returns the number reverted.
pub(crate) async fn revert_all(ctx: &Arc<Ctx>) -> usize {
    // No renewal starts once the leases are gone (they check under this lock); count those already sending.
    let renewing = {
        let mut leases = ctx.leases.lock().expect("poisoned");
        leases.clear();
        ctx.renewing.load(Ordering::SeqCst) > 0
    };
    ctx.renewals.lock().expect("poisoned").abort_all();
    let targets: Vec<(String, String, bool)> = {
        let ledger = ctx.ledger.lock().expect("poisoned");
        let mut keys: Vec<(String, String, bool)> = ledger
            .iter()
            .filter(|r| r.lasting && (r.outcome == "active" || r.outcome == "pending"))
            .map(|r| (r.agent.clone(), r.id.clone(), r.outcome == "pending"))
            .collect();
        keys.sort();
        keys.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        keys
    };
    let mut reverted = revert_pass(ctx, &targets, true).await;
    let again: Vec<(String, String, bool)> =
        targets.iter().filter(|(_, _, pending)| *pending || renewing).cloned().collect();
    if !again.is_empty() {
        // A request cut short may still reach its agent: revert again after it would have.
        tokio::time::sleep(Duration::from_secs(3)).await;
        reverted += revert_pass(ctx, &again, false).await;
    }
    // Anything still marked pending was refused or never sent.
    for r in ctx.ledger.lock().expect("poisoned").iter_mut().filter(|r| r.outcome == "pending") {
        r.outcome = "failed".into();
    }
    reverted
}

async fn revert_pass(ctx: &Arc<Ctx>, targets: &[(String, String, bool)], first: bool) -> usize {
    let results = futures::future::join_all(
        targets
            .iter()
            .map(|(agent, id, pending)| async move { (agent, id, *pending, ctx.driver.revert(agent, id).await) }),
    )
    .await;
    let now = ctx.now();
    let mut reverted = 0;
    let mut ledger = ctx.ledger.lock().expect("poisoned");
    for (agent, id, pending, result) in results {
        for r in ledger
            .iter_mut()
            .filter(|r| &r.agent == agent && &r.id == id && (r.outcome == "active" || r.outcome == "pending"))
        {
            // Its lifetime was over before the end: the agent ended it then.
            if let Some(end) = r.planned_end.filter(|end| *end <= now)
                && r.outcome == "active"
            {
                r.outcome = "expired".into();
                r.ended_at = Some(end);
                continue;
            }
            match &result {
                Ok(true) => {
                    r.outcome = "reverted".into();
                    r.ended_at = Some(now);
                }
                // Maybe still on its way: the second pass decides.
                Ok(false) if pending && first => {}
                Ok(false) => {
                    r.outcome = "expired".into();
                    r.ended_at = Some(r.planned_end.unwrap_or(now).min(now));
                }
                Err(err) => {
                    r.outcome = "revert_failed".into();
                    r.message = format!("{} (revert failed: {err})", r.message);
                }
            }
        }
        match result {
            Ok(true) => {
                reverted += 1;
                let again = if first { "" } else { " (a late request had applied it again)" };
                ctx.log.info(format!("reverted {id} on {agent}{again}"));
            }
            Err(err) => ctx.log.warn(format!(
                "could not revert {id} on {agent}: {err}; the agent ends it within its lease ({:.0} s)",
                ctx.lease.as_secs_f64()
            )),
            Ok(false) => {}
        }
    }
    reverted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(a: &str, n: usize) -> Host {
        Host { agent: a.into(), instances: n }
    }

    fn fault(kind: &str, params: Json) -> FaultStep {
        FaultStep {
            kind: kind.into(),
            service: Some("Echo".into()),
            lifetime: None,
            params: params.as_object().cloned().unwrap(),
        }
    }

    #[test]
    fn plans_follow_the_kind_and_the_seed() {
        let hosts = [host("a", 1), host("b", 3)];
        assert_eq!(plan(&fault("loss", serde_json::json!({"loss": 1})), &hosts, 1).len(), 2);
        let one = plan(&fault("kill", serde_json::json!({})), &hosts, 1);
        assert_eq!(one.len(), 1);
        assert_eq!(one, plan(&fault("kill", serde_json::json!({})), &hosts, 1), "same seed, same choice");
        let picks: std::collections::BTreeSet<String> =
            (0..50).map(|s| plan(&fault("kill", serde_json::json!({})), &hosts, s)[0].0.clone()).collect();
        assert_eq!(picks.len(), 2, "both hosts get picked over seeds");
        let counted = plan(&fault("kill", serde_json::json!({"count": 3})), &hosts, 5);
        assert_eq!(counted.iter().map(|(_, c)| c.unwrap()).sum::<u64>(), 3);
        assert_eq!(plan(&fault("kill", serde_json::json!({"all": true})), &hosts, 5).len(), 2);
    }
}
