//! Network faults on a service take effect on every host that runs it (three hosts on a bridge,
//! [`chaos_tests::cluster`]): real lymph 0.15 `Echo` on hosts B and C, an unaffected `Bystander` next to it on B, one
//! agent per host, the Scenario clients on host A, which runs no `Echo`.
//!
//! Callers sit on host A (the packets enter B and C through their NIC: the ingress path) and on the callee's own
//! host (loopback: the `lo` egress path). A blackhole from the Rust `Scenario` must block every `Echo` call on both
//! paths — also through the real `lymph request` from A — and leave `Bystander` answering in the same run; a rate
//! limit from the Python `Scenario` must slow `Echo` calls with a large payload on both hosts and both paths, judged
//! against the same calls before the fault and the `Bystander` calls interleaved with them. The impairments need no
//! `sch_netem` (the host kernel has none): blackhole drops in the classifier, rate shapes in an htb class.
//!
//! By hand: `cargo xtask test --tier cluster -- cluster_network`.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use chaos_agent::{rpc::client::Client, scenario::Scenario};
use chaos_tests::{
    cluster::{Cluster, Host, python_scenario, wait_local_pids},
    lymph::InstanceOptions,
};
use serde_json::{Value as Json, json};

/// A call that should answer at once (a few ms) is given this long before it counts as blocked.
const BLOCKED_AFTER: Duration = Duration::from_millis(1500);
/// A call that must answer may take this long (tens of ms on an idle host, seconds on a loaded one).
const ANSWER_WITHIN: Duration = Duration::from_secs(8);
/// Payload of the rate-limit probes: 128 KiB take about 1 s at 1 mbit/s.
const PAYLOAD_BYTES: usize = 128 * 1024;
/// The rate limit.
const RATE: &str = "1mbit";
/// Rounds of interleaved calls per condition.
const ROUNDS: usize = 3;

/// One call: from `host` to `service` at `endpoint`.
#[derive(Clone)]
struct Probe<'a> {
    from: &'a Host,
    service: &'static str,
    endpoint: String,
}

impl Probe<'_> {
    fn label(&self) -> String {
        format!("{} → {} {}", self.from.name, self.service, self.endpoint)
    }
}

/// Calls `<service>.echo(text)` at each probe's endpoint from its host, in order, each with `timeout`; returns how
/// long each took, or why it failed.
///
/// Each probe has a client of its own. With `warm_up`, a small call first (up to three tries) makes the service
/// connect back to the client: lymph sends a reply right after connecting to a new caller, sleeping only 20 ms for
/// the handshake, so on a busy host the first reply to a new caller can be lost (lymph `rpc.py` `connect`); the
/// measured call then only measures the network.
fn call_all(probes: &[Probe<'_>], text: &str, timeout: Duration, warm_up: bool) -> Vec<Result<Duration, String>> {
    probes
        .iter()
        .map(|p| {
            let (endpoint, subject, text) = (p.endpoint.clone(), format!("{}.echo", p.service), text.to_owned());
            p.from.block_on(|| async move {
                let client = Client::new().map_err(|e| e.to_string())?;
                if warm_up {
                    let warm = json!({"text": "warm"});
                    for _ in 0..3 {
                        if client.call_endpoint(&endpoint, &subject, &warm, ANSWER_WITHIN).await.is_ok() {
                            break;
                        }
                    }
                }
                let started = Instant::now();
                let reply = client.call_endpoint(&endpoint, &subject, &json!({"text": text}), timeout).await;
                let took = started.elapsed();
                client.node().shutdown();
                match reply {
                    Ok(v) if v.to_json() == Json::String(text) => Ok(took),
                    Ok(v) => Err(format!("wrong reply {:.60}", v.to_json().to_string())),
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect()
}

/// `lymph request <Service>.upper` from host A (the real lymph client: ZooKeeper lookup, a random instance), up to
/// `tries` times until it answers: whether it answered, and what it printed last. (Each run is a new caller, whose
/// first reply lymph may lose on a busy host: see [`call_all`]; a call that must NOT answer is tried once.)
fn lymph_request(a: &Host, service: &str, tries: usize) -> Result<(bool, String)> {
    let timeout = format!("--timeout={}", ANSWER_WITHIN.as_secs());
    let mut printed = String::new();
    for _ in 0..tries {
        let out = a.lymph_cli(&["request", &timeout, &format!("{service}.upper"), r#"{"text": "hi"}"#])?;
        printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("HI") {
            return Ok((true, printed));
        }
    }
    Ok((false, printed))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[test]
#[ignore = "needs ZooKeeper, the lymph venv and root: run by cargo xtask test --tier cluster"]
fn cluster_network_faults_take_effect_on_every_host_of_the_service_and_spare_the_others() -> Result<()> {
    let started = Instant::now();
    let cluster = Cluster::new("cluster-net", &["A", "B", "C"])?;
    let (a, b, c) = (cluster.host("A"), cluster.host("B"), cluster.host("C"));
    let echo_b = b.start_instance(&InstanceOptions::default())?;
    let echo_c = c.start_instance(&InstanceOptions::default())?;
    let bystander =
        b.start_instance(&InstanceOptions { interface: "echo:Bystander".into(), ..InstanceOptions::default() })?;
    let agents = cluster.start_agents()?;
    wait_local_pids(&agents[1], "Echo", &[echo_b.pid()])?;
    wait_local_pids(&agents[1], "Bystander", &[bystander.pid()])?;
    wait_local_pids(&agents[2], "Echo", &[echo_c.pid()])?;
    eprintln!("cluster up in {:.1?}", started.elapsed());

    let probe = |from, service, endpoint: &str| Probe { from, service, endpoint: endpoint.to_owned() };
    // Echo on both hosts from A (NIC ingress) and from its own host (lo); Bystander from A and from B.
    let echo_probes = [
        probe(a, "Echo", echo_b.endpoint()),
        probe(a, "Echo", echo_c.endpoint()),
        probe(b, "Echo", echo_b.endpoint()),
        probe(c, "Echo", echo_c.endpoint()),
    ];
    let bystander_probes = [probe(a, "Bystander", bystander.endpoint()), probe(b, "Bystander", bystander.endpoint())];
    let all: Vec<Probe<'_>> = echo_probes.iter().chain(&bystander_probes).cloned().collect();
    let expect = |when: &str, want_echo_ok: bool| -> Result<()> {
        // A call that must answer gets ANSWER_WITHIN (a busy host can take a second or more); one that must not is
        // given BLOCKED_AFTER.
        let echo_timeout = if want_echo_ok { ANSWER_WITHIN } else { BLOCKED_AFTER };
        // Warming up would let a blocked call's first try count as the warm-up: only calls that must answer warm up.
        let mut results = call_all(&echo_probes, "ping", echo_timeout, want_echo_ok);
        results.extend(call_all(&bystander_probes, "ping", ANSWER_WITHIN, true));
        for (p, r) in all.iter().zip(&results) {
            let want_ok = p.service == "Bystander" || want_echo_ok;
            ensure!(
                r.is_ok() == want_ok,
                "{when}: {} answered {r:?}, want {}",
                p.label(),
                if want_ok { "a reply" } else { "no reply" }
            );
        }
        let outcome = |r: &Result<Duration, String>| if r.is_ok() { "ok" } else { "blocked" };
        let lines: Vec<String> =
            all.iter().zip(&results).map(|(p, r)| format!("{} {}", p.label(), outcome(r))).collect();
        println!("{when}: {}", lines.join("; "));
        Ok(())
    };

    // Blackhole from the Rust Scenario on host A.
    expect("before the blackhole", true)?;
    let (answered, printed) = lymph_request(a, "Echo", 3)?;
    ensure!(answered, "lymph request Echo.upper from A failed before any fault: {printed}");
    let zk = cluster.zk_hosts();
    let scenario = a.block_on(|| async {
        let mut sn = Scenario::from_zookeeper(&zk).await?;
        sn.inject("Echo", "blackhole", json!({"lifetime": 60}));
        let answers = sn.apply().await?;
        anyhow::Ok((sn, answers))
    });
    let (sn, answers) = scenario?;
    ensure!(answers.len() == 2, "the blackhole went to {} agents, want B and C: {answers:?}", answers.len());
    for agent in &agents[1..] {
        let faults = agent.process.ok("faults", json!({}));
        ensure!(
            faults.as_array().is_some_and(|f| f.iter().any(|f| f["kind"] == "blackhole")),
            "no blackhole on host {}: {faults}",
            agent.host
        );
    }
    expect("blackhole on Echo", false)?;
    let (answered, printed) = lymph_request(a, "Echo", 1)?;
    ensure!(!answered, "lymph request Echo.upper from A answered through the blackhole: {printed}");
    let (answered, printed) = lymph_request(a, "Bystander", 3)?;
    ensure!(answered, "lymph request Bystander.upper from A failed during the Echo blackhole: {printed}");
    a.block_on(|| async { sn.revert_all().await });
    expect("after reverting the blackhole", true)?;

    // Rate limit from the Python Scenario on host A: baseline rounds, then the same rounds under the fault, each
    // round interleaving Echo and Bystander calls with the same payload.
    let text = "x".repeat(PAYLOAD_BYTES);
    let measure = |label: &str| -> Result<Vec<Vec<f64>>> {
        let mut seconds = vec![Vec::new(); all.len()];
        for _ in 0..ROUNDS {
            for (i, r) in call_all(&all, &text, Duration::from_secs(20), true).into_iter().enumerate() {
                seconds[i].push(r.map_err(|e| anyhow!("{label}: {}: {e}", all[i].label()))?.as_secs_f64());
            }
        }
        Ok(seconds)
    };
    let before = measure("before the rate limit")?;
    let py = python_scenario(
        a,
        &json!({"zookeeper": zk, "actions": [{"method": "inject", "service": "Echo",
                "params": {"kind": "rate", "rate": RATE, "lifetime": 120}}]}),
        Duration::from_secs(60),
    )?;
    let reports = py["reports"].as_array().cloned().ok_or_else(|| anyhow!("Python rate limit: {py}"))?;
    let hosts: Vec<&str> = reports.iter().filter_map(|r| r["host"].as_str()).collect();
    ensure!(hosts.len() == 2 && hosts.contains(&b.addr.as_str()) && hosts.contains(&c.addr.as_str()), "{py}");
    let during = measure("during the rate limit")?;
    for agent in &agents {
        agent.process.ok("clear", json!({}));
    }
    let bystander_during = median(during[echo_probes.len()..].iter().flatten().copied().collect());
    println!("{:<48} {:>10} {:>10}", format!("{PAYLOAD_BYTES} B echo, median of {ROUNDS} (s)"), "before", RATE);
    for (i, p) in all.iter().enumerate() {
        println!("{:<48} {:>10.3} {:>10.3}", p.label(), median(before[i].clone()), median(during[i].clone()));
    }
    for (i, p) in echo_probes.iter().enumerate() {
        let (was, now) = (median(before[i].clone()), median(during[i].clone()));
        ensure!(
            now > 5.0 * was && now > 5.0 * bystander_during,
            "{}: {now:.3} s under {RATE}, {was:.3} s before, Bystander {bystander_during:.3} s: not slowed",
            p.label()
        );
    }
    for (i, p) in bystander_probes.iter().enumerate() {
        let j = echo_probes.len() + i;
        let (was, now) = (median(before[j].clone()), median(during[j].clone()));
        // Same payload, same run: it must stay far below the slowed Echo calls.
        let slowest_echo = (0..echo_probes.len()).map(|k| median(during[k].clone())).fold(f64::INFINITY, f64::min);
        ensure!(
            now * 5.0 < slowest_echo,
            "{}: {now:.3} s (before {was:.3} s) next to Echo's {slowest_echo:.3} s",
            p.label()
        );
    }
    drop((echo_b, echo_c, bystander));
    println!("cluster_network took {:.1?}", started.elapsed());
    Ok(())
}
