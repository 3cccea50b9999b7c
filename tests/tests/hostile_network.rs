//! Hostile tier, network faults aimed past the guards: ports nobody on this host listens on (a remote ZooKeeper's
//! 2181, DNS 53, VXLAN 4789 — the guards can only judge a port by its local owner). The agent runs with network
//! control in a namespace of its own, configured for a remote ZooKeeper. A UDP-only service's port is bound here
//! (its socket's owner is judged like a TCP listener's). A delay at a rate whose netem queue would pass its bound
//! is a validation error, given before the agent needs netem (which the host kernel here lacks; the VM tier runs
//! netem).

use chaos_test_support::free_port;
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, EchoProcess, UdpProcess},
    netns::Netns,
};
use serde_json::json;

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn network_faults_on_ports_nobody_here_listens_on_are_refused() {
    let ns = Netns::new("hports");
    // A remote ZooKeeper (TEST-NET-1: unreachable, the agent runs standalone meanwhile).
    let agent =
        AgentProcess::start(Some(&ns), AgentOptions { zookeeper: Some("192.0.2.1:2181".into()), ..Default::default() })
            .expect("agent");
    let mut accepted = Vec::new();
    for port in [2181u16, 53, 4789] {
        match agent.call("inject", json!({"kind": "blackhole", "port": port, "lifetime": 30})) {
            Ok(r) => accepted.push(format!("{port}: {}", r["message"])),
            Err(e) => assert!(e.to_string().contains("Refused"), "port {port}: {e}"),
        }
    }
    agent.ok("clear", json!({}));
    assert!(accepted.is_empty(), "faults on ports the guards cannot judge were applied: {accepted:?}");
    let refused = agent.events().into_iter().filter(|e| e["action"] == "refused").count();
    assert_eq!(refused, 3);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_udp_only_service_is_a_bound_port_and_an_unbound_udp_port_is_still_refused() {
    let ns = Netns::new("hudp");
    let yaml = format!("faults: {{allowed_processes: [\"{}\"]}}\n", UdpProcess::MARKER);
    let agent =
        AgentProcess::start(Some(&ns), AgentOptions { config_yaml: yaml, ..Default::default() }).expect("agent");
    let free_udp_port = || std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).unwrap().port();
    let (port, unbound) = ns.run(|| (free_udp_port(), free_udp_port()));
    let _service = UdpProcess::start(&ns, "0.0.0.0", port);

    // The service's port, with the protocol named and with the default (what the port listens on).
    for kwargs in [
        json!({"kind": "loss", "port": port, "loss": 30, "protocol": "udp", "lifetime": 30}),
        json!({"kind": "loss", "port": port, "loss": 30, "lifetime": 30}),
    ] {
        let reply = agent.call("inject", kwargs.clone());
        agent.ok("clear", json!({}));
        let reply = reply.unwrap_or_else(|e| panic!("a loss fault on a UDP-only service was refused: {kwargs}: {e}"));
        assert!(reply["message"].as_str().is_some_and(|m| m.contains("udp")), "{reply}");
    }
    // A UDP port nobody here is bound to is still refused, and the refusal names the protocol.
    let err = agent
        .call("inject", json!({"kind": "loss", "port": unbound, "loss": 30, "protocol": "udp", "lifetime": 30}))
        .expect_err("a fault on a UDP port nobody is bound to was accepted");
    agent.ok("clear", json!({}));
    let text = err.to_string();
    assert!(text.contains("Refused") && text.contains("UDP port"), "{text}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_delay_with_a_rate_beyond_the_netem_queue_bound_is_refused_before_netem_is_needed() {
    let ns = Netns::new("hqueue");
    let yaml = format!("faults: {{allowed_processes: [\"{}\"]}}\n", EchoProcess::MARKER);
    let agent =
        AgentProcess::start(Some(&ns), AgentOptions { config_yaml: yaml, ..Default::default() }).expect("agent");
    let echo = EchoProcess::start(&ns, ns.run(free_port));
    // 10 gbit/s held 2 s: 58 M packets of 64 bytes in one netem queue (the bound is 1 M).
    let huge = json!({"kind": "latency", "latency": 2, "rate": 1_250_000_000u64, "port": echo.port, "lifetime": 30});
    let reply = agent.call("inject", huge);
    agent.ok("clear", json!({}));
    let err = reply.expect_err("a netem queue beyond its bound was accepted");
    let text = err.to_string();
    assert!(text.contains("ValueError") && text.contains("netem queue"), "not a validation error: {text}");
    // The same request at 1 mbit/s passes validation: whatever this kernel says about netem comes after it.
    let slow = json!({"kind": "latency", "latency": 2, "rate": 125_000, "port": echo.port, "lifetime": 30});
    let reply = agent.call("inject", slow);
    agent.ok("clear", json!({}));
    if let Err(e) = reply {
        assert!(!e.to_string().contains("ValueError"), "{e}");
    }
}
