//! `lymph-chaos run experiment.yml` against real ZooKeeper, a real lymph 0.15 `Echo` (under a restart loop) and a
//! real agent: a hypothesis that holds, one that deviates, a safeguard abort, Ctrl-C mid-run, malformed files —
//! and the README's example experiment against `cargo xtask demo`'s services.
//!
//! Each test runs Echo, the agent and `lymph-chaos run` in a fresh network namespace (the agent owns the tc
//! filters of its namespace; the probes' calls to Echo cross the namespace's loopback), reaching the harness's
//! ZooKeeper through a forwarder on the same port. "Reverted" is checked on the agent's side: its active faults
//! and its event log (`reverted` events with their wall-clock time).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chaos_test_support::{eventually, now_unix, process::wait_timeout};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, agent_bin},
    lymph::{self, LymphConfig, Supervised},
    netns::{self, Netns},
    zk,
};
use serde_json::{Value as Json, json};

/// Longest a run may take before the test kills it.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Echo (restart loop) and an agent in a fresh namespace; `f` gets them and a temp dir.
fn with_echo_and_agent(
    tag: &str,
    f: impl FnOnce(&Netns, &LymphConfig, &AgentProcess, &Path) -> Result<()>,
) -> Result<()> {
    let ns = Netns::new(tag);
    let zk_addr: SocketAddr = zk::zk_addr().parse()?;
    let _forward = ns.forward_tcp(zk_addr.port(), zk_addr);
    let config = LymphConfig::for_test(&format!("zk_experiment-{tag}"))?;
    let echo = ns.run(|| Supervised::start(&config))?;
    let agent =
        AgentProcess::start(Some(&ns), AgentOptions { zookeeper: Some(config.zk_hosts()), ..Default::default() })?;
    let (mut status, mut services) = (Json::Null, Json::Null);
    eventually(
        "the agent to register and see the local Echo",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            status = agent.ok("status", json!({}));
            services = agent.ok("list_services", json!({}));
            let local = services["Echo"]
                .as_array()
                .is_some_and(|l| l.iter().any(|i| i["local"] == true && i["pid"] == echo.pid()));
            status["zookeeper"]["registered"].is_string() && local
        },
    )
    .map_err(|e| anyhow!("{e}: {status} {services}\n{}", agent.log_tail(30)))?;
    let dir = tempfile::Builder::new().prefix("zk-experiment-").tempdir()?;
    let result = f(&ns, &config, &agent, dir.path());
    if result.is_err() {
        eprintln!("--- agent log ---\n{}", agent.log_tail(40));
    }
    drop(echo);
    result
}

/// `lymph-chaos run <file> --zookeeper … --out <dir>/report` inside the namespace.
fn run_command(ns: &Netns, config: &LymphConfig, dir: &Path, yaml: &str) -> Result<Command> {
    let file = dir.join("experiment.yml");
    std::fs::write(&file, yaml)?;
    let mut cmd = Command::new(agent_bin());
    netns::enter_on_exec(&mut cmd, ns.name());
    cmd.arg("run")
        .arg(&file)
        .args(["--zookeeper", &config.zk_hosts(), "--lease", "10s"])
        .arg("--out")
        .arg(dir.join("report"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout"))?)
        .stderr(std::fs::File::create(dir.join("stderr"))?);
    Ok(cmd)
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    report: Option<Json>,
}

impl Run {
    fn context(&self) -> String {
        format!("exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.status, self.stdout, self.stderr)
    }
}

fn wait(mut child: Child, dir: &Path) -> Result<Run> {
    let Some(status) = wait_timeout(&mut child, RUN_TIMEOUT)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("lymph-chaos run did not finish within {RUN_TIMEOUT:?}");
    };
    let report =
        std::fs::read(dir.join("report").join("report.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    Ok(Run {
        status,
        stdout: std::fs::read_to_string(dir.join("stdout")).unwrap_or_default(),
        stderr: std::fs::read_to_string(dir.join("stderr")).unwrap_or_default(),
        report,
    })
}

fn run(ns: &Netns, config: &LymphConfig, dir: &Path, yaml: &str) -> Result<Run> {
    let child = run_command(ns, config, dir, yaml)?.spawn().context("starting lymph-chaos run")?;
    wait(child, dir)
}

/// The agent has no active fault, and every lasting fault of the run was ended (`reverted` or `expired` event).
fn nothing_left(agent: &AgentProcess, report: &Json) -> Result<Vec<Json>> {
    let active = agent.ok("faults", json!({}));
    ensure!(active.as_array().is_some_and(Vec::is_empty), "faults left active on the agent: {active}");
    let events = agent.events();
    for f in report["faults"].as_array().into_iter().flatten().filter(|f| f["lasting"] == true) {
        let ended =
            events.iter().any(|e| e["fault"] == f["id"] && (e["action"] == "reverted" || e["action"] == "expired"));
        ensure!(ended, "no reverted/expired event for {}: {events:?}", f["id"]);
    }
    Ok(events)
}

/// The agent's wall-clock time of `action` for fault `id`.
fn event_time(events: &[Json], id: &Json, action: &str) -> Option<f64> {
    events.iter().find(|e| &e["fault"] == id && e["action"] == action).and_then(|e| e["time"].as_f64())
}

const ECHO_PROBE: &str = r#"
    - name: Echo answers
      rpc: {call: Echo.upper, args: {text: chaos}}
      every: 100ms
      window: 2s
"#;

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn zk_experiment_a_hypothesis_that_holds() -> Result<()> {
    with_echo_and_agent("exhold", |ns, config, agent, dir| {
        // Echo stopped (SIGSTOP) for 800 ms: calls wait, then all are answered — within the tolerance.
        let yaml = format!(
            r#"title: Echo answers every call while it is paused for a moment
steady_state:
  recovery: 500ms
  probes:{ECHO_PROBE}      timeout: 3s
      tolerance:
        success: 100%
        reply: {{equals: CHAOS}}
        latency: {{max: 2.5s}}
    - name: Echo registered
      registry: {{service: Echo}}
      every: 500ms
      window: 1s
method:
  - fault: pause
    service: Echo
    lifetime: 800ms
  - pause: 1s
"#
        );
        let r = run(ns, config, dir, &yaml)?;
        ensure!(r.status.code() == Some(0), "{}", r.context());
        let report = r.report.as_ref().context("no report.json")?;
        ensure!(report["status"] == "held" && report["exit_code"] == 0, "{report}");
        ensure!(r.stdout.contains("HYPOTHESIS HELD"), "{}", r.context());
        // The fault was real: applied by the agent to Echo's pid, and calls during it waited.
        let fault = &report["faults"][0];
        ensure!(fault["kind"] == "pause" && fault["pids"][0].is_i64(), "{fault}");
        let samples = report["probes"][0]["samples"].as_array().context("samples")?;
        let slow = samples.iter().filter(|s| s["latency"].as_f64().unwrap_or(0.0) > 0.3).count();
        ensure!(slow >= 2, "no call felt the pause: {samples:?}");
        let verdicts = report["probes"][0]["verdicts"].as_array().context("verdicts")?;
        for phase in ["before", "during", "after"] {
            ensure!(verdicts.iter().any(|v| v["phase"] == phase && v["result"] == "held"), "{phase}: {verdicts:?}");
        }
        let events = nothing_left(agent, report)?;
        ensure!(events.iter().any(|e| e["action"] == "applied" && e["fault"] == fault["id"]), "{events:?}");
        for f in ["report.json", "summary.txt", "timeline.svg"] {
            ensure!(dir.join("report").join(f).is_file(), "{f} missing");
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn zk_experiment_a_hypothesis_that_deviates_is_reported_and_reverted() -> Result<()> {
    with_echo_and_agent("exdev", |ns, config, agent, dir| {
        let yaml = format!(
            r#"title: Echo answers within 500 ms while its port is blackholed (it cannot)
steady_state:
  recovery: 1s
  probes:{ECHO_PROBE}      timeout: 500ms
      tolerance: {{success: 100%}}
method:
  - fault: blackhole
    service: Echo
    lifetime: 2s
"#
        );
        let r = run(ns, config, dir, &yaml)?;
        ensure!(r.status.code() == Some(1), "{}", r.context());
        let report = r.report.as_ref().context("no report.json")?;
        ensure!(report["status"] == "deviated", "{report}");
        ensure!(
            r.stdout.contains("HYPOTHESIS DEVIATED") && r.stdout.contains("Echo answers during"),
            "{}",
            r.context()
        );
        let samples = report["probes"][0]["samples"].as_array().context("samples")?;
        ensure!(samples.iter().any(|s| s["ok"] == false), "no call failed during the blackhole");
        let faults = report["faults"].as_array().context("faults")?;
        ensure!(faults.len() == 1 && faults[0]["kind"] == "blackhole", "{faults:?}");
        ensure!(faults[0]["outcome"] == "reverted" || faults[0]["outcome"] == "expired", "{faults:?}");
        nothing_left(agent, report)?;
        Ok(())
    })
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn zk_experiment_a_failing_safeguard_aborts_and_reverts_within_a_second() -> Result<()> {
    with_echo_and_agent("exsafe", |ns, config, agent, dir| {
        let yaml = r#"title: stop at once when Echo stops answering
steady_state:
  probes:
    - name: Echo registered
      registry: {service: Echo}
      every: 250ms
      window: 1s
method:
  - fault: blackhole
    service: Echo
  - pause: 30s
safeguards:
  - name: Echo error rate
    rpc: {call: Echo.echo, args: {text: x}}
    every: 100ms
    window: 1s
    timeout: 300ms
    tolerance: {success: 80%}
"#;
        let r = run(ns, config, dir, yaml)?;
        ensure!(r.status.code() == Some(3), "{}", r.context());
        let report = r.report.as_ref().context("no report.json")?;
        ensure!(report["status"] == "aborted", "{report}");
        let abort = &report["abort"];
        ensure!(abort["probe"] == "Echo error rate", "{abort}");
        let method = &report["phases"]["method"];
        let took = method["to"].as_f64().unwrap_or(99.0) - method["from"].as_f64().unwrap_or(0.0);
        ensure!(took < 10.0, "the method ran {took:.1} s: the 30 s pause was not cut short");
        // On the agent's clock: the blackhole's `reverted` event within 1 s of the failing sample.
        let events = nothing_left(agent, report)?;
        let fault = &report["faults"][0];
        let reverted = event_time(&events, &fault["id"], "reverted").context("no reverted event")?;
        let failed = report["started_at"].as_f64().context("started_at")? + abort["at"].as_f64().context("at")?;
        let delay = reverted - failed;
        println!("safeguard failed at {failed:.3}, the agent reverted at {reverted:.3}: {:.0} ms", delay * 1e3);
        ensure!((-0.05..1.0).contains(&delay), "reverted {delay:.3} s after the safeguard failed");
        ensure!(r.stdout.contains("ABORTED") && r.stdout.contains("Echo error rate"), "{}", r.context());
        let svg = std::fs::read_to_string(dir.join("report").join("timeline.svg"))?;
        ensure!(svg.contains("abort at") && svg.contains("Echo error rate"), "the picture does not show the abort");
        Ok(())
    })
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn zk_experiment_ctrl_c_mid_run_reverts() -> Result<()> {
    with_echo_and_agent("exint", |ns, config, agent, dir| {
        let yaml = r#"title: interrupted
steady_state:
  probes:
    - name: Echo registered
      registry: {service: Echo}
      every: 250ms
      window: 1s
method:
  - fault: blackhole
    service: Echo
  - pause: 60s
"#;
        let child = run_command(ns, config, dir, yaml)?.spawn()?;
        let pid = child.id() as i32;
        let id =
            eventually("the blackhole to become active", Duration::from_secs(30), Duration::from_millis(100), || {
                let faults = agent.ok("faults", json!({}));
                faults.as_array().and_then(|l| l.iter().find(|f| f["kind"] == "blackhole")).map(|f| f["id"].clone())
            })?;
        std::thread::sleep(Duration::from_millis(500));
        let interrupted = now_unix();
        // SAFETY: signalling the child this test started and has not reaped.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let r = wait(child, dir)?;
        ensure!(r.status.code() == Some(3), "{}", r.context());
        let report = r.report.as_ref().context("no report.json")?;
        ensure!(
            report["status"] == "aborted"
                && report["abort"]["reason"].as_str().is_some_and(|s| s.contains("interrupted")),
            "{report}"
        );
        let events = nothing_left(agent, report)?;
        // Reverted by the run itself (at once), not by the lease running out 10 s later.
        let reverted = event_time(&events, &id, "reverted").context("no reverted event")?;
        ensure!(reverted - interrupted < 2.0, "reverted {:.1} s after Ctrl-C", reverted - interrupted);
        ensure!(r.stderr.contains("reverting"), "{}", r.context());
        Ok(())
    })
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn zk_experiment_a_malformed_file_names_line_and_key_and_applies_nothing() -> Result<()> {
    with_echo_and_agent("exbad", |ns, config, agent, dir| {
        // A typo on line 6, after a valid fault step.
        let typo = "title: typo\nmethod:\n  - fault: blackhole\n    service: Echo\n  - fault: loss\n    los: 30\n    service: Echo\n";
        let r = run(ns, config, dir, typo)?;
        ensure!(r.status.code() == Some(2), "{}", r.context());
        ensure!(r.stderr.contains("experiment.yml:6:") && r.stderr.contains("`los`"), "{}", r.context());
        ensure!(r.stderr.contains("method[1]") && r.stderr.contains("nothing was applied"), "{}", r.context());
        // A value the agent would refuse, caught before anything is sent.
        let range = "title: range\nmethod:\n  - fault: loss\n    service: Echo\n    loss: 130\n";
        let r = run(ns, config, dir, range)?;
        ensure!(
            r.status.code() == Some(2) && r.stderr.contains("experiment.yml:5:") && r.stderr.contains("loss"),
            "{}",
            r.context()
        );
        // Valid YAML, but a service no agent hosts: refused by the dry-run preflight, before the first fault.
        let unknown =
            "title: unknown\nmethod:\n  - fault: blackhole\n    service: Echo\n  - fault: kill\n    service: Billing\n";
        let r = run(ns, config, dir, unknown)?;
        ensure!(r.status.code() == Some(2), "{}", r.context());
        ensure!(r.stdout.contains("COULD NOT RUN") && r.stdout.contains("Billing"), "{}", r.context());
        let events = agent.events();
        let applied: Vec<&Json> = events.iter().filter(|e| e["action"] == "applied").collect();
        ensure!(applied.is_empty(), "faults were applied: {applied:?}");
        let active = agent.ok("faults", json!({}));
        ensure!(active.as_array().is_some_and(Vec::is_empty), "{active}");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------------------
// the README's example

/// The YAML block that follows `<!-- experiment example -->` in README.md.
fn readme_example() -> Result<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("README.md"))?;
    let rest =
        readme.split("<!-- experiment example -->").nth(1).context("no `<!-- experiment example -->` in README.md")?;
    let block =
        rest.split("```yaml\n").nth(1).and_then(|b| b.split("\n```").next()).context("no ```yaml block after it")?;
    Ok(format!("{block}\n"))
}

fn xtask_bin() -> PathBuf {
    agent_bin().with_file_name("xtask")
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn zk_experiment_the_readme_example_runs_against_the_demo_services() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("readme-experiment-").tempdir()?;
    let file = dir.path().join("echo-experiment.yml");
    std::fs::write(&file, readme_example()?)?;
    let out = dir.path().join("report");
    let started = Instant::now();
    let output = Command::new(xtask_bin())
        .arg("demo")
        .arg("--agent-bin")
        .arg(agent_bin())
        .arg("--venv")
        .arg(lymph::venv())
        .arg("--experiment")
        .arg(&file)
        .arg("--out")
        .arg(&out)
        .stdin(Stdio::null())
        .output()?;
    let context = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{context}\nthe README example took {:.1?}", started.elapsed());
    ensure!(output.status.success(), "the demo with the README example failed ({}):\n{context}", output.status);
    let report: Json = serde_json::from_slice(&std::fs::read(out.join("report.json"))?)?;
    ensure!(report["status"] == "held" || report["status"] == "deviated", "{}", report["reason"]);
    let faults = report["faults"].as_array().context("faults")?;
    ensure!(!faults.is_empty(), "the example applied no fault");
    for f in faults {
        ensure!(
            ["reverted", "expired", "done"].contains(&f["outcome"].as_str().unwrap_or("")),
            "a fault did not end cleanly: {f}"
        );
    }
    ensure!(std::fs::read_to_string(out.join("timeline.svg"))?.starts_with("<svg"), "no picture");
    Ok(())
}

#[test]
fn the_readme_example_is_a_valid_experiment() -> Result<()> {
    let yaml = readme_example()?;
    let exp = chaos_agent::experiment::file::parse(&yaml, "README.md").map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(!exp.method.is_empty() && !exp.steady_state.probes.is_empty() && !exp.safeguards.is_empty());
    ensure!(exp.zookeeper.is_none(), "the example must find ZooKeeper like lymph does, not name one");
    Ok(())
}
