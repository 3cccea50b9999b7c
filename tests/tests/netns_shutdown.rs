//! Shutdown in the right order: an agent asked to stop while requests keep arriving stops taking them, answers or
//! drops the ones it holds, and only then reverts its faults and removes its kernel objects — so no request can
//! put a fault back after the cleanup.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use chaos_agent::rpc::{ClientError, client::Client};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, EchoProcess},
    netns::Netns,
};
use serde_json::{Value as Json, json};

/// Client threads, each with a listener of its own.
const CLIENTS: u16 = 4;

/// Every object of ours in the namespace: filters and clsact qdiscs on any interface, the IFB, pins.
fn leftovers(ns: &Netns, agent: &AgentProcess) -> Vec<String> {
    let mut found = Vec::new();
    let links = String::from_utf8_lossy(&ns.ip(&["-o", "link"]).unwrap().stdout).into_owned();
    for line in links.lines() {
        // `3: lchaos0: <…>` or `4: veth0@if3: <…>`
        let Some(dev) = line.split(": ").nth(1).map(|d| d.split('@').next().unwrap_or(d)) else { continue };
        for hook in ["ingress", "egress"] {
            let out = ns.exec("tc", &["filter", "show", "dev", dev, hook]);
            if String::from_utf8_lossy(&out.stdout).contains("lymph-chaos:") {
                found.push(format!("filter on {dev} {hook}"));
            }
        }
        if ns.tc(&["qdisc", "show", "dev", dev]).contains("clsact") {
            found.push(format!("clsact on {dev}"));
        }
        if dev == agent.ifb {
            found.push(format!("IFB {dev}"));
        }
    }
    if std::fs::read_dir(&agent.pin_dir).is_ok_and(|mut d| d.next().is_some()) {
        found.push(format!("pins in {}", agent.pin_dir.display()));
    }
    found
}

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Ok,
    Error(String),
    NoAnswer,
}

/// Injects and reverts faults on `port` as fast as the agent answers, until `done`.
fn hammer(ns: &Netns, endpoint: &str, client: u16, port: u16, done: &AtomicBool) -> Vec<(String, Outcome)> {
    ns.block_on(|| async {
        let rpc = Client::new().expect("client");
        let mut out = Vec::new();
        let mut n = 0u32;
        while !done.load(Ordering::SeqCst) {
            n += 1;
            let id = format!("c{client}-{n}");
            let kind = if n.is_multiple_of(2) { "blackhole" } else { "loss" };
            for (method, kwargs) in [
                ("Chaos.inject", json!({"kind": kind, "loss": 50, "port": port, "id": id, "lifetime": 60})),
                ("Chaos.revert", json!({"id": id})),
            ] {
                let outcome = match rpc.call_endpoint(endpoint, method, &kwargs, Duration::from_secs(2)).await {
                    Ok(_) => Outcome::Ok,
                    Err(ClientError::Remote { type_name, message }) => {
                        Outcome::Error(format!("{type_name}: {message}"))
                    }
                    Err(ClientError::Timeout { .. }) => Outcome::NoAnswer,
                    Err(other) => Outcome::Error(other.to_string()),
                };
                out.push((format!("{method} {id}"), outcome));
            }
        }
        rpc.node().shutdown();
        out
    })
}

fn state_of(pid: i32) -> Option<char> {
    chaos_agent::faults::process::proc_info(pid).map(|p| p.state)
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn sigterm_during_a_stream_of_injects_leaves_nothing_of_ours() {
    let ns = Netns::new("shutdown");
    let listeners: Vec<EchoProcess> = (0..CLIENTS).map(|i| EchoProcess::start(&ns, 7681 + i)).collect();
    let config = format!("faults: {{allowed_processes: [\"{}\"]}}\n", EchoProcess::MARKER);
    let mut agent = AgentProcess::start(Some(&ns), AgentOptions { config_yaml: config, ..Default::default() }).unwrap();
    let done = AtomicBool::new(false);
    let (results, exited_after) = std::thread::scope(|s| {
        let clients: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (ns, endpoint, done) = (&ns, agent.endpoint.as_str(), &done);
                s.spawn(move || hammer(ns, endpoint, i as u16, l.port, done))
            })
            .collect();
        // Let the stream run, then ask the agent to stop while the requests keep coming.
        std::thread::sleep(Duration::from_millis(1500));
        let pid = agent.pid();
        let asked = Instant::now();
        // SAFETY: signalling our own, not yet reaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        while state_of(pid).is_some_and(|s| s != 'Z') && asked.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let exited_after = asked.elapsed();
        // A moment more of requests to a stopped agent, then stop the clients.
        std::thread::sleep(Duration::from_millis(200));
        done.store(true, Ordering::SeqCst);
        let results: Vec<(String, Outcome)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
        (results, exited_after)
    });
    assert!(agent.stop(), "the agent did not exit on SIGTERM");
    let count = |f: fn(&Outcome) -> bool| results.iter().filter(|(_, o)| f(o)).count();
    println!(
        "{} requests: {} answered, {} errors, {} unanswered; the agent exited {exited_after:?} after SIGTERM",
        results.len(),
        count(|o| matches!(o, Outcome::Ok)),
        count(|o| matches!(o, Outcome::Error(_))),
        count(|o| matches!(o, Outcome::NoAnswer)),
    );
    assert!(exited_after < Duration::from_secs(10), "the agent took {exited_after:?} to stop");
    assert!(count(|o| matches!(o, Outcome::Ok)) > 10, "too few requests answered before the shutdown: {results:?}");
    // An error is either the agent saying it is stopping or an ordinary answer (e.g. a revert of a fault that
    // was never applied because its inject was refused).
    for (what, outcome) in &results {
        if let Outcome::Error(e) = outcome {
            assert!(
                e.starts_with("ShuttingDown:") || e.starts_with("UnknownFault:") || e.starts_with("Conflict:"),
                "{what}: unexpected error {e}"
            );
        }
    }
    // Nothing of ours is left: no filter, qdisc, IFB or pin, and an empty journal.
    let left = leftovers(&ns, &agent);
    assert!(left.is_empty(), "left behind after the shutdown: {left:?}\nagent log:\n{}", agent.log_tail(40));
    let journal = std::fs::read_to_string(agent.state_dir.join("journal.json")).unwrap_or_default();
    let journal: Json = serde_json::from_str(&journal).unwrap_or(Json::Null);
    let entries = journal.as_array().or_else(|| journal["entries"].as_array()).map_or(0, Vec::len);
    assert_eq!(entries, 0, "journal not empty after the shutdown: {journal}");
    // The event log agrees: every applied fault ended, and nothing was applied after the agent stopped.
    let log = agent.dir.path().join("events.jsonl");
    let text: String = ["events.jsonl.3", "events.jsonl.2", "events.jsonl.1", "events.jsonl"]
        .iter()
        .filter_map(|name| std::fs::read_to_string(log.with_file_name(name)).ok())
        .collect();
    let events: Vec<Json> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let stop = events.iter().position(|e| e["action"] == "agent_stop").expect("no agent_stop event");
    let late: Vec<&Json> = events[stop..].iter().filter(|e| e["action"] == "applied").collect();
    assert!(late.is_empty(), "faults applied after the agent stopped: {late:?}");
    for applied in events.iter().filter(|e| e["action"] == "applied") {
        let ended = events
            .iter()
            .any(|e| e["fault"] == applied["fault"] && (e["action"] == "reverted" || e["action"] == "expired"));
        assert!(ended, "fault {} was applied and never ended", applied["fault"]);
    }
}
