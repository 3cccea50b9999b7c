//! The `lymph-chaos` command line and the targeting/selection rules, against a real agent in a namespace:
//! exit codes, `--json`, help with examples, targets by pid, port and process pattern, count/percent/all,
//! terminate's SIGTERM → SIGKILL, idempotent revert.

use std::time::{Duration, Instant};

use chaos_test_support::{eventually, proc_stat::alive};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, EchoProcess, agent_bin},
    netns::Netns,
};
use serde_json::{Value as Json, json};

fn agent(ns: &Netns) -> AgentProcess {
    let yaml = format!("faults: {{allowed_processes: [\"{}\"], terminate_grace: 1}}\n", EchoProcess::MARKER);
    AgentProcess::start(Some(ns), AgentOptions { config_yaml: yaml, ..Default::default() }).expect("agent")
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn cli_exit_codes_json_output_and_help_examples() {
    let ns = Netns::new("cli");
    let agent = agent(&ns);
    let out = agent.cli(&["--json", "status"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Json = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(status["agent"], "lymph-chaos");
    // Refused by the agent: exit 1 with the agent's message.
    let out = agent.cli(&["kill", "--pid", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pid 1"), "{}", String::from_utf8_lossy(&out.stderr));
    // Usage error: exit 2.
    let out = agent.cli(&["inject", "loss", "Echo", "not-a-pair"]);
    assert_eq!(out.status.code(), Some(2));
    let out = agent.cli(&["kill", "Echo", "--pid", "4242"]);
    assert_eq!(out.status.code(), Some(2), "two targets must be a usage error");
    let out = std::process::Command::new(agent_bin()).args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // No agent: exit 3, within the timeout.
    let started = Instant::now();
    let out = std::process::Command::new(agent_bin())
        .args(["--agent", "tcp://127.0.0.1:1", "--timeout", "0.5", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent answered"));
    // Every subcommand documents itself with an example.
    for sub in [
        "agent", "kill", "pause", "latency", "inject", "faults", "revert", "clear", "events", "status", "services",
        "unleash", "leash",
    ] {
        let out = std::process::Command::new(agent_bin()).args([sub, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && help.contains("Example"), "`{sub} --help` has no example:\n{help}");
    }
    let out = std::process::Command::new(agent_bin()).args(["agent", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--dry-run", "--unleash", "--no-network-control", "--zookeeper", "--config"] {
        assert!(help.contains(flag), "agent --help lacks {flag}");
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn targets_by_pid_port_and_pattern_with_count_percent_and_all() {
    let ns = Netns::new("targets");
    // Processes are looked up host-wide: tag ours so other tests' servers never match.
    let tag = format!("targets-{}", std::process::id());
    let echos: Vec<EchoProcess> = (0..4).map(|i| EchoProcess::start_tagged(&ns, 7701 + i, &tag)).collect();
    let agent = agent(&ns);
    let pids = |r: &Json| {
        r["pids"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(Json::as_i64)
            .map(|p| p as i32)
            .collect::<Vec<_>>()
    };

    // By port: the listener's owner.
    let r = agent.ok("kill", json!({"port": 7701, "dry_run": true}));
    assert_eq!(pids(&r), vec![echos[0].pid()]);
    // By pid.
    let r = agent.ok("kill", json!({"pid": echos[1].pid(), "dry_run": true}));
    assert_eq!(pids(&r), vec![echos[1].pid()]);
    // By pattern: one at random (seeded: the same seed picks the same), count, percent, all.
    let one = agent.ok("kill", json!({"process": tag, "dry_run": true, "seed": 5}));
    assert_eq!(pids(&one).len(), 1);
    assert_eq!(pids(&one), pids(&agent.ok("kill", json!({"process": tag, "dry_run": true, "seed": 5}))));
    assert_eq!(pids(&agent.ok("kill", json!({"process": tag, "dry_run": true, "count": 3}))).len(), 3);
    assert_eq!(pids(&agent.ok("kill", json!({"process": tag, "dry_run": true, "percent": 50}))).len(), 2);
    let mut all = pids(
        &agent.ok("kill", json!({"process": format!("/chaos-test-echo-server {tag}$/"), "dry_run": true, "all": true})),
    );
    all.sort();
    let mut expected: Vec<i32> = echos.iter().map(EchoProcess::pid).collect();
    expected.sort();
    assert_eq!(all, expected);
    // A real kill by pattern with count 2, through the CLI.
    let out = agent.cli(&["--json", "kill", "--process", &tag, "--count", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let killed = pids(&serde_json::from_slice(&out.stdout).unwrap());
    assert_eq!(killed.len(), 2);
    for pid in &killed {
        assert!(!alive(*pid), "pid {pid} survived");
    }
    assert_eq!(echos.iter().filter(|e| alive(e.pid())).count(), 2);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn terminate_sends_sigterm_then_sigkill_and_revert_is_idempotent() {
    let ns = Netns::new("term");
    let echo = EchoProcess::start(&ns, 7711);
    let agent = agent(&ns);
    // python's default SIGTERM handler exits at once.
    let r = agent.ok("terminate", json!({"pid": echo.pid()}));
    assert!(r["message"].as_str().unwrap().contains("SIGTERM"), "{r}");
    eventually("the process to exit", Duration::from_secs(3), Duration::from_millis(20), || !alive(echo.pid()))
        .unwrap_or_else(|e| panic!("terminate left the process running: {e}"));

    // A process that ignores SIGTERM is killed after the grace period.
    let stubborn = EchoProcess::start(&ns, 7712);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(stubborn.pid()), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    agent.ok("terminate", json!({"pid": stubborn.pid()}));
    eventually("the stopped process to die", Duration::from_secs(4), Duration::from_millis(20), || {
        !alive(stubborn.pid())
    })
    .unwrap_or_else(|e| panic!("a process ignoring SIGTERM survived: {e}"));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "SIGKILL came before the 1 s grace: {took:?}");

    // Revert twice: the second call reports the fault as already ended.
    let other = EchoProcess::start(&ns, 7713);
    let fault = agent.ok("inject", json!({"kind": "blackhole", "port": other.port, "lifetime": 30}));
    let id = fault["id"].as_str().unwrap();
    let first = agent.ok("revert", json!({"id": id}));
    assert_eq!(first["state"], "reverted");
    let second = agent.ok("revert", json!({"id": id}));
    assert!(second["message"].as_str().unwrap().contains("already ended"), "{second}");
    match agent.call("revert", json!({"id": "f-never"})) {
        Err(chaos_agent::rpc::ClientError::Remote { type_name, .. }) => assert_eq!(type_name, "UnknownFault"),
        other => panic!("{other:?}"),
    }
}
