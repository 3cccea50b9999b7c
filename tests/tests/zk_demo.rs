//! `cargo xtask demo` end to end: runs the demo binary with this build's agent and the harness's lymph
//! venv, and checks from its output that the kill happened, that Echo came back (a new pid answers, the restart
//! loop saw the old one die), that the network fault had its effect (timeouts for a blackhole, +200 ms for
//! latency) and that calls were normal again afterwards, and that everything was cleaned up — in under two
//! minutes.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use chaos_tests::{agent::agent_bin, lymph};

/// A call line as the demo prints it: `[phase    ] client +1.234s #12 ok 1.8 ms pid 4242`.
#[derive(Debug)]
struct Call {
    phase: String,
    n: u64,
    ok: bool,
    ms: f64,
    pid: Option<u64>,
}

fn parse_call(line: &str) -> Option<Call> {
    let (phase, rest) = line.strip_prefix('[')?.split_once(']')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |s: &str| s.strip_prefix('#')?.parse().ok();
    match f.as_slice() {
        ["client", _, num, "ok", ms, "ms", "pid", pid] => {
            Some(Call { phase: phase.trim().into(), n: n(num)?, ok: true, ms: ms.parse().ok()?, pid: pid.parse().ok() })
        }
        ["client", _, num, "error", _, ms, "ms"] => {
            Some(Call { phase: phase.trim().into(), n: n(num)?, ok: false, ms: ms.parse().ok()?, pid: None })
        }
        _ => None,
    }
}

/// The number after `key` in `text` (`pid 123` → 123).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    rest.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn xtask_bin() -> PathBuf {
    let bin = agent_bin().with_file_name("xtask");
    assert!(bin.exists(), "{} is missing: build it first (cargo build --workspace --bins)", bin.display());
    bin
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn the_demo_kills_echo_sees_it_come_back_faults_it_and_cleans_up_in_under_two_minutes() {
    let started = Instant::now();
    let out = Command::new(xtask_bin())
        .arg("demo")
        .arg("--agent-bin")
        .arg(agent_bin())
        .arg("--venv")
        .arg(lymph::venv())
        .stdin(Stdio::null())
        .output()
        .expect("running the demo");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let context = format!("--- demo stdout ---\n{stdout}\n--- demo stderr ---\n{stderr}");
    assert!(out.status.success(), "the demo failed ({}):\n{context}", out.status);
    assert!(took < Duration::from_secs(120), "the demo took {took:?}:\n{context}");

    // The kill, and the restart loop bringing Echo back as a new process that answers.
    let kill_line = stdout.lines().find(|l| l.contains("1. kill Echo (pid")).expect(&context);
    let old = number_after(kill_line, "(pid").expect("killed pid");
    assert!(stdout.contains(&format!("restart loop: Echo pid {old} exited")), "{context}");
    let back = stdout.lines().find(|l| l.contains("Echo is back: pid")).expect(&context);
    let new = number_after(back, "Echo is back: pid").expect("new pid");
    assert_ne!(new, old, "{back}");
    assert!(stdout.contains("every call answered again"), "{context}");

    let calls: Vec<Call> = stdout.lines().filter_map(parse_call).collect();
    let phase = |p: &str| calls.iter().filter(|c| c.phase == p).collect::<Vec<_>>();
    let baseline = phase("baseline");
    assert!(baseline.len() >= 20 && baseline.iter().all(|c| c.ok && c.pid == Some(old)), "{baseline:?}");
    assert!(phase("kill").iter().any(|c| !c.ok), "killing the only Echo cost no call at all: {:?}", phase("kill"));
    assert!(phase("recovered").iter().all(|c| c.ok && c.pid == Some(new)), "{:?}", phase("recovered"));

    // The fault's effect, then normal calls again.
    let fault_calls = phase("fault");
    assert!(fault_calls.len() >= 30, "{fault_calls:?}");
    let hit = fault_calls.iter().filter(|c| !c.ok || c.ms >= 150.0).count();
    if stdout.contains("fault used: blackhole") {
        assert!(stdout.contains("falling back to a 5 s blackhole"), "{context}");
        let timeouts = fault_calls.iter().filter(|c| !c.ok).count();
        assert!(timeouts * 2 >= fault_calls.len(), "a blackhole with few failed calls: {fault_calls:?}");
    } else {
        assert!(stdout.contains("fault used: latency"), "{context}");
    }
    assert!(hit * 10 >= fault_calls.len() * 8, "most calls during the fault should be slow or fail: {fault_calls:?}");
    let mut after = phase("after");
    after.sort_by_key(|c| c.n);
    assert!(after.len() >= 10, "{after:?}");
    assert!(
        after.iter().rev().take(10).all(|c| c.ok && c.ms < 100.0 && c.pid == Some(new)),
        "not normal after: {after:?}"
    );
    // The agent's own counters proved the fault was in effect.
    assert!(stdout.contains("[packets") || stdout.contains("latency"), "{context}");

    // Cleanup: the agent reverted everything and exited 0; nothing of the run is left.
    assert!(stdout.contains("cleaning up") && stdout.contains("demo finished"), "{context}");
    assert!(stdout.lines().any(|l| l.contains("agent (pid") && l.contains("exit status: 0")), "{context}");
    let pids = [old, new];
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "Echo pid {pid} is still running");
    }
    let pins = stdout
        .split("its maps pinned in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the demo names its pin directory");
    assert!(pins.starts_with("/sys/fs/bpf/lymph-chaos-demo-"), "{pins}");
    assert!(!std::path::Path::new(pins).exists(), "pinned maps left in {pins}");
}

#[test]
fn demo_lines_parse() {
    let c = parse_call("[recovered] client +4.401s #44 ok 1.6 ms pid 26435").unwrap();
    assert!(c.ok && c.n == 44 && c.pid == Some(26435) && c.phase == "recovered");
    let e = parse_call("[fault    ] client +10.300s #103 error Timeout 1001.7 ms").unwrap();
    assert!(!e.ok && e.phase == "fault" && e.ms > 1000.0);
    assert_eq!(number_after("=== [ 6.7s] 1. kill Echo (pid 26269); the restart", "(pid"), Some(26269));
    assert!(parse_call("[   6.8s] restart loop: Echo pid 1 exited").is_none());
}
