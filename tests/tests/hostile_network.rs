//! Hostile tier, network faults aimed past the guards: ports nobody on this host listens on (a remote ZooKeeper's
//! 2181, DNS 53, VXLAN 4789 — the guards can only judge a port by its local owner). The agent runs with network
//! control in a namespace of its own, configured for a remote ZooKeeper. (The netem queue bound needs sch_netem,
//! which the host kernel here lacks: `netem_limit_for` checks it as a unit, the VM tier runs netem.)

use chaos_tests::{
    agent::{AgentOptions, AgentProcess},
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
