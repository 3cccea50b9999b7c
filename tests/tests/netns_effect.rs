//! The measured effect of network faults, from a real agent in a fresh network namespace: after applying a
//! fault the agent probes each listened TCP port (handshakes, interleaved with handshakes to an unfaulted port on
//! the same address) and records what it saw in the `applied` event, in `Chaos.faults`, the CLI and the metrics;
//! a fault whose effect is not seen adds a `warning` event.
//!
//! The host kernel has no netem, so delays are not measured here (the qemu tier applies them); blackholes, loss
//! and rate limits are, through the classifier and the IFB. A backend that silently does nothing is made real:
//! the classifier's filters are deleted from the device behind the agent's back, so its rules sit in the map and
//! no packet ever reaches them.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use chaos_test_support::{eventually, free_port};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, EchoProcess, UdpProcess},
    netns::Netns,
};
use serde_json::{Value as Json, json};

/// Priority of the agent's classifier filter on clsact hooks (`chaos_agent::faults::network::PRIO_CLASSIFY`).
const PRIO_CLASSIFY: u16 = chaos_agent::faults::network::PRIO_CLASSIFY;

fn agent_for(ns: &Netns, extra: &str, args: Vec<String>) -> AgentProcess {
    AgentProcess::start(
        Some(ns),
        AgentOptions {
            config_yaml: format!(
                "faults: {{allowed_processes: [\"{}\", \"{}\"]{extra}}}\n",
                EchoProcess::MARKER,
                UdpProcess::MARKER
            ),
            args,
            ..Default::default()
        },
    )
    .expect("agent")
}

/// The events of one fault, once its `applied` event is recorded (it waits for the probes).
fn events_once_applied(agent: &AgentProcess, id: &str) -> Vec<Json> {
    eventually(format!("the applied event of {id}"), Duration::from_secs(15), Duration::from_millis(100), || {
        let mine: Vec<Json> = agent.events().into_iter().filter(|e| e["fault"] == id).collect();
        mine.iter().any(|e| e["action"] == "applied").then_some(mine)
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail(30)))
}

fn applied(events: &[Json]) -> &Json {
    events.iter().find(|e| e["action"] == "applied").expect("an applied event")
}

fn warnings(events: &[Json]) -> Vec<&Json> {
    events.iter().filter(|e| e["action"] == "warning").collect()
}

fn active(agent: &AgentProcess, id: &str) -> Json {
    let faults = agent.ok("faults", json!({}));
    faults.as_array().and_then(|a| a.iter().find(|f| f["id"] == id)).cloned().unwrap_or(Json::Null)
}

fn metrics(ns: &Netns, port: u16) -> String {
    ns.run(|| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    })
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_blackhole_on_a_listened_port_is_observed_as_total_loss_and_a_rate_limit_as_matching() {
    let ns = Netns::new("effbh");
    let (hole, limited) = (7911u16, 7912u16);
    let _echo = EchoProcess::start(&ns, hole);
    let _echo2 = EchoProcess::start_tagged(&ns, limited, "second");
    let mport = ns.run(free_port);
    let agent = agent_for(&ns, "", vec!["--metrics".into(), format!("127.0.0.1:{mport}")]);

    let fault = agent.ok("inject", json!({"kind": "blackhole", "port": hole, "lifetime": 60}));
    let id = fault["id"].as_str().expect("fault id").to_owned();
    // The answer does not wait for the probes.
    assert_eq!(fault["observed"]["verdict"], "pending", "{fault}");
    let events = events_once_applied(&agent, &id);
    let observed = &applied(&events)["detail"]["observed"];
    println!("blackhole: {observed}");
    let took_effect = applied(&events)["detail"]["applied_at"].as_f64().expect("applied_at");
    assert!(took_effect <= applied(&events)["time"].as_f64().unwrap(), "{events:#?}");
    assert_eq!(observed["verdict"], "observed", "{events:#?}");
    assert_eq!(observed["loss_percent"], 100.0, "{observed}");
    let probes = observed["probes"].as_u64().expect("probes");
    assert!(probes >= 4, "{observed}");
    // Every probe handshake crossed the rule: the counter moved by at least as many packets.
    assert!(observed["matched_packets"].as_u64().unwrap() >= probes, "{observed}");
    assert!(
        observed["ports"][0]["baseline_median_ms"].is_number() && observed["ports"][0]["answered"] == 0,
        "the baseline on the same path answered, the faulted port did not: {observed}"
    );
    assert!(warnings(&events).is_empty(), "a fault with its effect seen warned: {events:#?}");

    // `faults` (RPC and CLI) and the metrics show the figure beside the counters.
    let listed = active(&agent, &id);
    assert_eq!(listed["observed"]["loss_percent"], 100.0, "{listed}");
    assert!(listed["counters"]["drops"].as_u64().unwrap() >= probes, "{listed}");
    let cli = agent.cli(&["faults"]);
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(text.contains(&id) && text.contains("[observed: loss 100 %"), "{text}");
    let m = metrics(&ns, mport);
    assert!(
        m.contains(&format!("lymph_chaos_fault_observed_loss_ratio{{fault=\"{id}\",kind=\"blackhole\"}} 1\n"))
            && m.contains(&format!(
                "lymph_chaos_fault_effect{{fault=\"{id}\",kind=\"blackhole\",verdict=\"observed\"}} 1\n"
            )),
        "{m}"
    );

    // A rate limit does not slow a handshake's few bytes: what the probes prove is that the rule matches them.
    let rate = agent.ok("inject", json!({"kind": "rate", "port": limited, "rate": "1mbit", "lifetime": 60}));
    let rid = rate["id"].as_str().unwrap().to_owned();
    let events = events_once_applied(&agent, &rid);
    let observed = &applied(&events)["detail"]["observed"];
    println!("rate 1mbit: {observed}");
    assert_eq!(observed["verdict"], "observed", "{events:#?}");
    assert_eq!(observed["loss_percent"], 0.0, "{observed}");
    assert!(observed["matched_packets"].as_u64().unwrap() >= observed["probes"].as_u64().unwrap(), "{observed}");
    assert!(warnings(&events).is_empty(), "{events:#?}");
    agent.ok("clear", json!({}));

    // Reverted while its probes run: the applied event (not measured) still comes first, and nothing warns.
    let quick = agent.ok("inject", json!({"kind": "blackhole", "port": hole, "lifetime": 60}));
    let qid = quick["id"].as_str().unwrap().to_owned();
    agent.ok("revert", json!({"id": qid}));
    let events = events_once_applied(&agent, &qid);
    let actions: Vec<&str> = events.iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["applied", "reverted"], "{events:#?}");
    assert_eq!(applied(&events)["detail"]["observed"]["verdict"], "not_measured", "{events:#?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_fault_on_a_port_nobody_listens_on_warns_and_udp_or_dry_runs_are_not_probed() {
    let ns = Netns::new("effnl");
    let nobody = 7921u16;
    let udp = UdpProcess::start(&ns, "127.0.0.1", 7922);
    let agent = agent_for(&ns, ", allow_unbound_ports: true", Vec::new());

    let fault = agent.ok("inject", json!({"kind": "loss", "loss": 50, "port": nobody, "lifetime": 60}));
    let id = fault["id"].as_str().unwrap().to_owned();
    assert_eq!(fault["observed"]["verdict"], "no_listener", "{fault}");
    let events = events_once_applied(&agent, &id);
    assert_eq!(applied(&events)["detail"]["observed"]["verdict"], "no_listener", "{events:#?}");
    let warned = warnings(&events);
    assert_eq!(warned.len(), 1, "{events:#?}");
    assert!(warned[0]["message"].as_str().unwrap().contains("nothing listens on tcp port"), "{warned:?}");
    assert!(warned[0]["seq"].as_u64() > applied(&events)["seq"].as_u64(), "the warning follows the applied event");
    assert_eq!(active(&agent, &id)["observed"]["verdict"], "no_listener");

    // UDP: no handshake to time (the agent sends the service no data): not measured, and no warning.
    let fault = agent.ok("inject", json!({"kind": "loss", "loss": 50, "port": udp.port, "lifetime": 60}));
    let uid = fault["id"].as_str().unwrap().to_owned();
    let events = events_once_applied(&agent, &uid);
    assert_eq!(applied(&events)["detail"]["observed"]["verdict"], "not_measured", "{events:#?}");
    assert!(warnings(&events).is_empty(), "{events:#?}");

    // A dry run probes nothing and says nothing about an effect.
    let dry = agent.ok("inject", json!({"kind": "blackhole", "port": nobody + 10, "dry_run": true}));
    assert!(dry.get("observed").is_none(), "{dry}");
    agent.ok("clear", json!({}));
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_rule_the_classifier_never_sees_is_a_warning_not_a_success() {
    let ns = Netns::new("effsil");
    let port = 7931u16;
    let _echo = EchoProcess::start(&ns, port);
    let agent = agent_for(&ns, "", Vec::new());

    // A first fault attaches the classifier to the devices; its effect is seen.
    let first = agent.ok("inject", json!({"kind": "observe", "port": port, "lifetime": 60}));
    let first_id = first["id"].as_str().unwrap().to_owned();
    let events = events_once_applied(&agent, &first_id);
    let observed = &applied(&events)["detail"]["observed"];
    println!("observe, classifier in place: {observed}");
    assert_eq!(observed["verdict"], "observed", "{events:#?}");
    agent.ok("revert", json!({"id": first_id}));

    // Behind the agent's back, its classifier filters leave the loopback device: rules still go into the map,
    // and nothing ever consults them.
    // (On loopback the classifier judges at egress only; other devices have it on both hooks.)
    let prio = PRIO_CLASSIFY.to_string();
    let mut deleted = 0;
    for hook in ["ingress", "egress"] {
        let listed = ns.exec("tc", &["filter", "show", "dev", "lo", hook]);
        if String::from_utf8_lossy(&listed.stdout).contains(&format!("pref {prio} ")) {
            ns.tc(&["filter", "del", "dev", "lo", hook, "pref", &prio]);
            deleted += 1;
        }
    }
    assert!(deleted > 0, "no classifier filter of the agent on lo");
    let fault = agent.ok("inject", json!({"kind": "blackhole", "port": port, "lifetime": 60}));
    let id = fault["id"].as_str().unwrap().to_owned();
    let events = events_once_applied(&agent, &id);
    let observed = &applied(&events)["detail"]["observed"];
    println!("blackhole, classifier filter deleted: {observed}");
    assert_eq!(observed["verdict"], "not_observed", "{events:#?}");
    assert_eq!(observed["matched_packets"], 0, "{observed}");
    assert_eq!(observed["loss_percent"], 0.0, "{observed}");
    let warned = warnings(&events);
    assert_eq!(warned.len(), 1, "{events:#?}");
    let message = warned[0]["message"].as_str().unwrap();
    assert!(message.contains("NOT observed") && message.contains("matched 0 packets"), "{message}");
    let listed = active(&agent, &id);
    assert_eq!(listed["observed"]["verdict"], "not_observed", "{listed}");
    let cli = agent.cli(&["faults"]);
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(text.contains("[not_observed: loss 0 %"), "{text}");
    agent.ok("clear", json!({}));
}
