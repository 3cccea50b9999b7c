//! The runner against a fake driver, in paused tokio time: phases, verdicts, aborts and reverts without sockets.
//!
//! The fake models one agent hosting `Echo`: an active `blackhole` on Echo makes every call hang (the probe's
//! timeout ends it), anything else leaves calls at 2 ms. It records every inject and revert with its time.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Map, Value as Json, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    RunOptions,
    driver::{Driver, DriverError, Fut, Host},
    file,
    report::{Log, Report, Status},
    run,
};

#[derive(Default)]
struct FakeState {
    /// id → (kind, expires)
    active: BTreeMap<String, (String, Instant)>,
    injects: Vec<(f64, Map<String, Json>)>,
    reverts: Vec<(f64, String, bool)>,
    calls: usize,
}

struct Fake {
    t0: Instant,
    state: Arc<Mutex<FakeState>>,
    /// Every call fails (a broken service).
    broken: bool,
    /// Injects that are not dry runs fail with this.
    refuse: Option<String>,
    /// How long an inject takes to arrive (it takes effect then).
    inject_delay: Duration,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake {
            t0: Instant::now(),
            state: Arc::default(),
            broken: false,
            refuse: None,
            inject_delay: Duration::ZERO,
        })
    }

    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn blackholed(&self) -> bool {
        let now = Instant::now();
        self.state.lock().unwrap().active.values().any(|(kind, exp)| kind == "blackhole" && *exp > now)
    }

    fn real_injects(&self) -> Vec<(f64, Map<String, Json>)> {
        self.state
            .lock()
            .unwrap()
            .injects
            .iter()
            .filter(|(_, k)| k.get("dry_run") != Some(&Json::Bool(true)))
            .cloned()
            .collect()
    }

    fn still_active(&self) -> Vec<String> {
        let now = Instant::now();
        self.state.lock().unwrap().active.iter().filter(|(_, (_, e))| *e > now).map(|(id, _)| id.clone()).collect()
    }
}

impl Driver for Fake {
    fn call<'a>(&'a self, _subject: &'a str, args: &'a Json, _timeout: Duration) -> Fut<'a, Result<Json, String>> {
        Box::pin(async move {
            self.state.lock().unwrap().calls += 1;
            if self.broken {
                return Err("RemoteError: broken".into());
            }
            if self.blackholed() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(Json::String(args["text"].as_str().unwrap_or("").to_uppercase()))
        })
    }

    fn instances<'a>(&'a self, _service: &'a str) -> Fut<'a, Result<usize, String>> {
        Box::pin(async { Ok(2) })
    }

    fn hosts<'a>(&'a self, service: Option<&'a str>) -> Fut<'a, Result<Vec<Host>, DriverError>> {
        Box::pin(async move {
            match service {
                Some("Echo") | None => Ok(vec![Host { agent: "tcp://agent:1".into(), instances: 2 }]),
                Some(other) => Err(DriverError::NoHost(other.into())),
            }
        })
    }

    fn inject<'a>(&'a self, agent: &'a str, kwargs: &'a Map<String, Json>) -> Fut<'a, Result<Json, DriverError>> {
        // Sent now, it lands after `inject_delay` whatever the caller does meanwhile (as a request on the wire).
        let (state, t0, delay, refuse) = (self.state.clone(), self.t0, self.inject_delay, self.refuse.clone());
        let (agent, kwargs) = (agent.to_owned(), kwargs.clone());
        let landed = tokio::spawn(async move {
            let dry = kwargs.get("dry_run") == Some(&Json::Bool(true));
            if !dry {
                tokio::time::sleep(delay).await;
            }
            let now = t0.elapsed().as_secs_f64();
            let mut st = state.lock().unwrap();
            st.injects.push((now, kwargs.clone()));
            if !dry && let Some(why) = refuse {
                return Err(DriverError::Agent { agent, type_name: "KernelFeatureMissing".into(), message: why });
            }
            let id = kwargs["id"].as_str().unwrap().to_owned();
            let kind = kwargs["kind"].as_str().unwrap().to_owned();
            if !dry && let Some(l) = kwargs.get("lifetime").and_then(Json::as_f64) {
                st.active.insert(id.clone(), (kind.clone(), Instant::now() + Duration::from_secs_f64(l)));
            }
            Ok(json!({"id": id, "kind": kind, "dry_run": dry, "message": format!("{kind} applied"), "pids": [42]}))
        });
        Box::pin(async move { landed.await.expect("fake inject") })
    }

    fn revert<'a>(&'a self, _agent: &'a str, id: &'a str) -> Fut<'a, Result<bool, DriverError>> {
        Box::pin(async move {
            let now = self.now();
            let mut st = self.state.lock().unwrap();
            let was = st.active.remove(id).is_some_and(|(_, e)| e > Instant::now());
            st.reverts.push((now, id.to_owned(), was));
            Ok(was)
        })
    }
}

const PROBES: &str = r#"
steady_state:
  probes:
    - name: echo answers
      rpc: {call: Echo.upper, args: {text: hi}}
      every: 100ms
      window: 1s
      timeout: 300ms
      tolerance:
        success: 100%
        reply: {equals: HI}
        latency: {p99: 100ms}
    - name: echo registered
      registry: {service: Echo}
      every: 500ms
      window: 1s
      tolerance: {min_instances: 2}
"#;

fn experiment(method: &str, extra: &str) -> file::Experiment {
    file::parse(&format!("title: test\nseed: 5\n{PROBES}{extra}\nmethod:\n{method}"), "test.yml").unwrap()
}

async fn run_it(exp: &file::Experiment, fake: Arc<Fake>, cancel: CancellationToken) -> Report {
    let opts = RunOptions { file: "test.yml".into(), lease: Duration::from_secs(3), ..Default::default() };
    run(exp, fake, opts, Log::new(None), cancel).await
}

#[tokio::test(start_paused = true)]
async fn a_hypothesis_that_holds() {
    let fake = Fake::new();
    let exp = experiment("  - fault: loss\n    service: Echo\n    loss: 30\n    lifetime: 2s\n", "");
    let report = run_it(&exp, fake.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, Status::Held, "{}", report.summary());
    assert_eq!(report.exit_code, 0);
    // Before (1 s), the method lasting the fault's lifetime (2 s), after (1 s).
    let m = report.phases.method.unwrap();
    assert!((m.to - m.from - 2.0).abs() < 0.2, "{m:?}");
    assert!(report.phases.before.is_some() && report.phases.after.is_some());
    let injects = fake.real_injects();
    assert_eq!(injects.len(), 1);
    assert_eq!((injects[0].1["kind"].as_str(), injects[0].1["lifetime"].as_f64()), (Some("loss"), Some(2.0)));
    assert!(injects[0].1["seed"].as_u64().is_some());
    // It ran out its lifetime on the agent; reverting found it gone.
    assert_eq!(report.faults[0].outcome, "expired", "{:?}", report.faults);
    assert!(fake.still_active().is_empty());
    let echo = &report.probes[0];
    assert_eq!(
        echo.verdicts.iter().map(|v| v.phase.as_str()).collect::<Vec<_>>(),
        ["before", "during", "during", "after"]
    );
    assert!(echo.samples.len() >= 35, "{}", echo.samples.len());
    let svg = super::svg::render(&report);
    assert!(svg.starts_with("<svg") && svg.contains("HYPOTHESIS HELD") && svg.contains("echo answers"), "{svg}");
}

#[tokio::test(start_paused = true)]
async fn a_hypothesis_that_deviates_is_reported_and_its_faults_reverted() {
    let fake = Fake::new();
    let exp = experiment("  - fault: blackhole\n    service: Echo\n    name: cut Echo off\n  - pause: 2s\n", "");
    let report = run_it(&exp, fake.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, Status::Deviated, "{}", report.summary());
    assert_eq!(report.exit_code, 1);
    assert!(report.reason.contains("echo answers during"), "{}", report.reason);
    // The blackhole had no lifetime: it ended with the method, reverted by us.
    assert_eq!(report.faults[0].outcome, "reverted");
    assert!(fake.still_active().is_empty());
    let reverts = fake.state.lock().unwrap().reverts.clone();
    assert_eq!(reverts.len(), 1);
    assert!(reverts[0].2, "it was active when reverted");
    // The after-check held again: the deviation is the during phase only.
    let echo = &report.probes[0];
    assert!(echo.verdicts.iter().any(|v| v.phase == "during" && v.result == "deviated"));
    assert!(echo.verdicts.iter().filter(|v| v.phase == "after").all(|v| v.held()), "{:?}", echo.verdicts);
    assert!(report.summary().contains("HYPOTHESIS DEVIATED"));
}

#[tokio::test(start_paused = true)]
async fn a_failing_safeguard_aborts_and_reverts_at_once() {
    let fake = Fake::new();
    let exp = experiment(
        "  - fault: blackhole\n    service: Echo\n  - pause: 30s\n",
        "safeguards:\n  - name: error rate\n    rpc: {call: Echo.upper, args: {text: x}}\n    every: 100ms\n    window: 1s\n    timeout: 300ms\n    tolerance: {success: 80%}\n",
    );
    let report = run_it(&exp, fake.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, Status::Aborted, "{}", report.summary());
    assert_eq!(report.exit_code, 3);
    let abort = report.abort.clone().unwrap();
    assert_eq!(abort.probe.as_deref(), Some("error rate"));
    assert!(abort.reverted_at - abort.at < 0.1, "{abort:?}");
    let m = report.phases.method.unwrap();
    assert!(m.to - m.from < 3.0, "aborted long before the 30 s pause ended: {m:?}");
    let reverts = fake.state.lock().unwrap().reverts.clone();
    assert!(reverts.iter().any(|(t, _, was)| *was && (t - abort.at).abs() < 0.1), "{reverts:?} {abort:?}");
    assert!(fake.still_active().is_empty());
    // No after-check once aborted, and the picture shows the abort.
    assert!(report.phases.after.is_none());
    assert!(super::svg::render(&report).contains("abort at"));
}

#[tokio::test(start_paused = true)]
async fn ctrl_c_mid_run_reverts() {
    let fake = Fake::new();
    let exp = experiment("  - fault: loss\n    service: Echo\n    loss: 10\n  - pause: 60s\n", "");
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(4500)).await;
        c.cancel();
    });
    let report = run_it(&exp, fake.clone(), cancel).await;
    assert_eq!(report.status, Status::Aborted, "{}", report.summary());
    assert!(report.abort.as_ref().unwrap().reason.contains("interrupted"));
    assert!(report.duration < 6.0, "{}", report.duration);
    assert_eq!(report.faults[0].outcome, "reverted");
    assert!(fake.still_active().is_empty());
}

#[tokio::test(start_paused = true)]
async fn leases_are_renewed_and_never_longer_than_the_lease() {
    let fake = Fake::new();
    let exp = experiment("  - fault: loss\n    service: Echo\n    loss: 10\n  - pause: 10s\n", "");
    let report = run_it(&exp, fake.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, Status::Held, "{}", report.summary());
    let injects = fake.real_injects();
    assert!(injects.len() >= 9, "renewed every second for 10 s: {}", injects.len());
    assert!(injects.iter().all(|(_, k)| k["lifetime"].as_f64().unwrap() <= 3.0));
    assert!(injects.iter().all(|(_, k)| k["id"] == injects[0].1["id"]), "same id: the agent refreshes it");
    assert!(fake.still_active().is_empty());
}

#[tokio::test(start_paused = true)]
async fn nothing_is_applied_when_the_system_is_not_steady_or_a_fault_cannot_be_routed() {
    let fake = Arc::new(Fake {
        t0: Instant::now(),
        state: Arc::default(),
        broken: true,
        refuse: None,
        inject_delay: Duration::ZERO,
    });
    let exp = experiment("  - fault: loss\n    service: Echo\n    loss: 10\n", "");
    let report = run_it(&exp, fake.clone(), CancellationToken::new()).await;
    assert_eq!((report.status, report.exit_code), (Status::NotRun, 2), "{}", report.summary());
    assert!(fake.real_injects().is_empty());
    assert!(report.faults.is_empty());

    let fake = Fake::new();
    let exp =
        experiment("  - fault: loss\n    service: Echo\n    loss: 10\n  - fault: kill\n    service: Billing\n", "");
    let report = run_it(&exp, fake.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, Status::NotRun, "{}", report.summary());
    assert!(report.reason.contains("method[1]") && report.reason.contains("Billing"), "{}", report.reason);
    assert!(fake.real_injects().is_empty());
    assert_eq!(fake.state.lock().unwrap().calls, 0, "no probe ran either");
}

#[tokio::test(start_paused = true)]
async fn a_fault_the_agent_refuses_aborts_and_reverts_the_others() {
    let fake = Arc::new(Fake {
        t0: Instant::now(),
        state: Arc::default(),
        broken: false,
        refuse: Some("no sch_netem".into()),
        inject_delay: Duration::ZERO,
    });
    let exp = experiment("  - fault: latency\n    service: Echo\n    latency: 200ms\n  - pause: 5s\n", "");
    let report = run_it(&exp, fake.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, Status::Aborted, "{}", report.summary());
    assert!(report.reason.contains("no sch_netem"), "{}", report.reason);
    assert_eq!(report.faults[0].outcome, "failed");
}

#[tokio::test(start_paused = true)]
async fn repeats_and_parallel_branches() {
    let fake = Fake::new();
    let exp = experiment(
        "  - repeat:\n      every: 2s\n      times: 3\n      steps:\n        - fault: kill\n          service: Echo\n  - parallel:\n      - fault: loss\n        service: Echo\n        loss: 5\n        lifetime: 1s\n      - fault: rate\n        service: Echo\n        rate: 1mbit\n        lifetime: 1s\n",
        "",
    );
    let report = run_it(&exp, fake.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, Status::Held, "{}", report.summary());
    let injects = fake.real_injects();
    let kills: Vec<&(f64, Map<String, Json>)> = injects.iter().filter(|(_, k)| k["kind"] == "kill").collect();
    assert_eq!(kills.len(), 3);
    let gaps: Vec<f64> = kills.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(gaps.iter().all(|g| (g - 2.0).abs() < 0.05), "{gaps:?}");
    let seeds: std::collections::BTreeSet<u64> = kills.iter().map(|(_, k)| k["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds.len(), 3, "each round its own (recorded) seed");
    let (loss, rate) = (
        injects.iter().find(|(_, k)| k["kind"] == "loss").unwrap().0,
        injects.iter().find(|(_, k)| k["kind"] == "rate").unwrap().0,
    );
    assert!((loss - rate).abs() < 0.01, "parallel branches start together");
    assert_eq!(report.faults.iter().filter(|f| f.outcome == "done").count(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_applies_nothing() {
    let fake = Fake::new();
    let exp = experiment("  - fault: blackhole\n    service: Echo\n  - pause: 1s\n", "dry_run: true\n");
    let report = run_it(&exp, fake.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, Status::Held, "{}", report.summary());
    assert!(report.dry_run);
    assert!(fake.real_injects().is_empty());
    assert_eq!(report.faults[0].outcome, "dry_run");
}

#[tokio::test(start_paused = true)]
async fn repeated_faults_end_when_their_lifetime_does_or_continue_as_the_next_round() {
    let fake = Fake::new();
    let exp = experiment(
        "  - repeat:\n      every: 2s\n      times: 2\n      steps:\n        - fault: pause\n          service: Echo\n          lifetime: 600ms\n        - fault: loss\n          service: Echo\n          loss: 5\n",
        "",
    );
    let report = run_it(&exp, fake.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, Status::Held, "{}", report.summary());
    let pauses: Vec<_> = report.faults.iter().filter(|f| f.kind == "pause").collect();
    assert_eq!(pauses.len(), 2);
    for p in &pauses {
        assert_eq!(p.outcome, "expired", "{p:?}");
        assert!((p.ended_at.unwrap() - p.applied_at - 0.6).abs() < 0.05, "{p:?}");
    }
    let losses: Vec<_> = report.faults.iter().filter(|f| f.kind == "loss").collect();
    assert_eq!((losses[0].outcome.as_str(), losses[1].outcome.as_str()), ("refreshed", "reverted"));
    assert!((losses[0].ended_at.unwrap() - losses[1].applied_at).abs() < 0.01);
    assert!(fake.still_active().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_renewal_in_flight_when_the_run_stops_is_reverted_too() {
    // Injects take 400 ms to land: stop while a renewal is on its way, so it lands after the first revert.
    let fake = Arc::new(Fake {
        t0: Instant::now(),
        state: Arc::default(),
        broken: false,
        refuse: None,
        inject_delay: Duration::from_millis(400),
    });
    let exp = experiment("  - fault: loss\n    service: Echo\n    loss: 10\n  - pause: 60s\n", "");
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let f = fake.clone();
    tokio::spawn(async move {
        // Wait for the first renewal (the second inject) to be sent, then stop while it is in flight.
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if f.state.lock().unwrap().injects.iter().filter(|(_, k)| k.get("dry_run").is_none()).count() >= 1 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(1000 + 200)).await;
        c.cancel();
    });
    let report = run_it(&exp, fake.clone(), cancel).await;
    assert_eq!(report.status, Status::Aborted, "{}", report.summary());
    let reverts = fake.state.lock().unwrap().reverts.clone();
    assert!(reverts.len() >= 2, "a second revert after the late renewal: {reverts:?}");
    assert!(
        reverts.last().unwrap().2,
        "the late renewal had applied it again, and the second pass removed it: {reverts:?}"
    );
    assert!(fake.still_active().is_empty(), "left active: {:?}", fake.still_active());
}
