//! The control plane against real ZooKeeper and real lymph 0.15 `Echo` instances — kill through the real
//! lymph CLI, the Rust `Scenario` with `repeat`, pause, dry run, unleashed mode replayed from its seed, and the
//! guards.
//!
//! Agents that need no network faults run in the test's namespace with `--no-network-control`; the Scenario test
//! also injects a network fault, so it runs everything (agent, Echo) in a fresh namespace whose loopback reaches the
//! harness's ZooKeeper through a forwarder on the same port.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use chaos_agent::{
    rpc::{ClientError, client::Client},
    scenario::Scenario,
};
use chaos_test_support::{eventually, proc_stat::ProcStat};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess},
    lymph::{self, Instance, LymphConfig, Supervised},
    netns::Netns,
    zk,
};
use serde_json::{Value as Json, json};

fn start_agent(netns: Option<&Netns>, config: &LymphConfig, yaml: &str, network: bool) -> Result<AgentProcess> {
    let mut args = Vec::new();
    if !network {
        args.push("--no-network-control".to_owned());
    }
    let agent = AgentProcess::start(
        netns,
        AgentOptions { zookeeper: Some(config.zk_hosts()), config_yaml: yaml.to_owned(), args, ..Default::default() },
    )?;
    eventually("the agent to register as Chaos", Duration::from_secs(10), Duration::from_millis(100), || {
        lymph::discover(config).map(|services| services.contains_key("Chaos"))
    })
    .map_err(|e| anyhow!("{e}; log:\n{}", agent.log_tail(30)))?;
    Ok(agent)
}

fn wait_local(agent: &AgentProcess, pid: u32, timeout: Duration) -> Result<()> {
    let mut s = Json::Null;
    eventually(format_args!("the agent to see Echo pid {pid} as local"), timeout, Duration::from_millis(50), || {
        s = agent.ok("list_services", json!({}));
        s["Echo"].as_array().is_some_and(|l| l.iter().any(|i| i["local"] == true && i["pid"] == pid))
    })
    .map_err(|e| anyhow!("{e}: {s}"))
}

/// Whether a process has exited (gone, or a zombie waiting for its parent).
fn exited(pid: u32) -> bool {
    ProcStat::read(pid as i32).is_none_or(|p| p.state == 'Z' || p.state == 'X')
}

fn kill_events(agent: &AgentProcess) -> Vec<Json> {
    agent.events().into_iter().filter(is_kill).collect()
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn chaos_kill_from_the_real_lymph_cli_kills_echo_and_a_second_kill_hits_the_restarted_pid() -> Result<()> {
    let config = LymphConfig::with_session_timeout(&zk::zk_addr(), &zk::unique_chroot("kill"), Duration::from_secs(4))?;
    let echo = Supervised::start(&config)?;
    let first = echo.wait_registered(Duration::from_secs(30))?;
    let agent = start_agent(None, &config, "", false)?;
    wait_local(&agent, first.pid, Duration::from_secs(10))?;

    // The 2015 call shape through the real lymph CLI.
    let started = Instant::now();
    let out = lymph::lymph_cli(&config, &["request", "--json", "Chaos.kill", r#"{"name": "Echo"}"#])?;
    ensure!(out.status.success(), "lymph request Chaos.kill failed: {}", String::from_utf8_lossy(&out.stderr));
    let reply: Json = serde_json::from_slice(&out.stdout).context("reply is JSON")?;
    ensure!(reply["pids"] == json!([first.pid]), "killed {:?}, expected [{}]: {reply}", reply["pids"], first.pid);
    ensure!(exited(first.pid), "Echo {} still running after Chaos.kill returned ({:?})", first.pid, started.elapsed());
    ensure!(reply["message"].as_str().is_some_and(|m| m.contains(&format!("exited: [{}]", first.pid))), "{reply}");
    let events = kill_events(&agent);
    ensure!(
        events.iter().any(|e| e["pids"] == json!([first.pid])),
        "no kill event names pid {}: {events:?}",
        first.pid
    );
    // A SIGKILLed instance leaves ZooKeeper when its session times out.
    let gone = lymph::wait_unregistered(&config, "Echo", &first.identity, Duration::from_secs(15))?;
    println!("Echo's znode disappeared {gone:?} after the kill (session timeout 4 s)");

    // The supervisor restarted it: the next kill (our client this time) hits the new pid, within 100 ms of a plain call.
    let second = echo.wait_for_restart(first.pid, Duration::from_secs(10))?;
    wait_local(&agent, second, Duration::from_secs(10))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (reply, took, plain) = rt.block_on(async {
        let client = Client::new()?;
        let call = |method: &'static str, args: Json| {
            let client = &client;
            let endpoint = agent.endpoint.clone();
            async move {
                let t = Instant::now();
                let r = client.call_endpoint(&endpoint, method, &args, Duration::from_secs(5)).await?;
                anyhow::Ok((r.to_json(), t.elapsed()))
            }
        };
        // The baseline: the slowest of three plain calls on the same connection, just before.
        let mut plain = Duration::ZERO;
        for _ in 0..3 {
            plain = plain.max(call("Chaos.status", json!({})).await?.1);
        }
        let (reply, took) = call("Chaos.kill", json!({"name": "Echo"})).await?;
        anyhow::Ok((reply, took, plain))
    })?;
    ensure!(reply["pids"] == json!([second]), "second kill hit {:?}, expected [{second}]", reply["pids"]);
    ensure!(exited(second), "Echo {second} still running");
    println!("Chaos.kill request → Echo exited (reply received): {took:?} (a plain Chaos.status call: {plain:?})");
    // Killing and seeing the process gone adds little to a call (`cargo xtask bench kill` has the figures).
    ensure!(took < plain + Duration::from_millis(100), "kill took {took:?}, a plain call {plain:?}");
    let pids: BTreeSet<u64> = kill_events(&agent)
        .iter()
        .flat_map(|e| e["pids"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_u64())
        .collect();
    ensure!(pids == BTreeSet::from([u64::from(first.pid), u64::from(second)]), "kill events: {pids:?}");
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn scenario_repeat_kills_a_new_pid_every_second_and_reverts_its_faults_when_the_block_ends() -> Result<()> {
    let ns = Netns::new("scen");
    let zk_addr: SocketAddr = zk::zk_addr().parse()?;
    // 127.0.0.1:<zk port> inside the namespace reaches the harness's ZooKeeper.
    let _forward = ns.forward_tcp(zk_addr.port(), zk_addr);
    let config = LymphConfig::for_test("scenario")?;
    let echo = ns.run(|| Supervised::start(&config))?;
    let yaml = "faults: {allowed_processes: []}\n";
    let agent = start_agent(Some(&ns), &config, yaml, true)?;
    wait_local(&agent, echo.pid(), Duration::from_secs(10))?;

    let hosts = config.zk_hosts();
    let interval = Duration::from_secs(1);
    // How many kills happen in a given time depends on how fast lymph restarts Echo (a Python start, slow on a
    // busy machine): rounds that find no instance yet kill nothing. What the repeat promises is checked instead:
    // rounds keep coming, each kills the instance that exists at that moment, rounds are `interval` apart, and the
    // block's end reverts its lasting faults.
    let (during, after, took) = std::thread::scope(|s| {
        let rounds = s.spawn(|| {
            eventually("four kill rounds", Duration::from_secs(60), Duration::from_millis(100), || {
                kill_events(&agent).len() >= 4
            })
        });
        ns.block_on(|| async {
            let mut sn = Scenario::from_zookeeper(&hosts).await?;
            // Lower-case like the 2015 snippet; `Echo` is matched case-insensitively.
            sn.kill("echo");
            sn.inject("echo", "loss", json!({"loss": 5, "lifetime": 30}));
            let started = Instant::now();
            let guard = sn.repeat(interval).await?;
            // The rounds run on this runtime: let them while the (bounded) wait above goes on.
            while !rounds.is_finished() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let took = started.elapsed();
            let during = guard_faults(&agent).await;
            guard.stop().await;
            let after = guard_faults(&agent).await;
            anyhow::Ok((during, after, took))
        })
        .and_then(|r| rounds.join().expect("waiting thread").map(|()| r))
    })?;
    ensure!(during.iter().any(|f| f["kind"] == "loss"), "the loss fault was not active during the block: {during:?}");
    ensure!(after.is_empty(), "faults left after the block: {after:?}");
    let kills = kill_events(&agent);
    let pids: BTreeSet<u64> = kills
        .iter()
        .flat_map(|e| e["pids"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_u64())
        .collect();
    println!(
        "{} kills of {} distinct pids in {took:.1?} (supervisor restarts: {})",
        kills.len(),
        pids.len(),
        echo.restarts()
    );
    ensure!(kills.len() >= 4, "only {} kills recorded", kills.len());
    ensure!(pids.len() == kills.len(), "a pid was killed twice: {kills:?}");
    // Rounds sleep `interval` between them: two kills closer than that came from one round or a runaway loop.
    let times: Vec<f64> = kills.iter().filter_map(|e| e["time"].as_f64()).collect();
    ensure!(times.len() == kills.len(), "kill events without a time: {kills:?}");
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        ensure!(gap >= interval.as_secs_f64() * 0.9, "two kills {gap:.3} s apart (interval {interval:?}): {kills:?}");
    }
    Ok(())
}

fn is_kill(e: &Json) -> bool {
    e["action"] == "applied" && e["kind"] == "kill"
}

/// `Chaos.faults` from a blocking context inside an async test.
async fn guard_faults(agent: &AgentProcess) -> Vec<Json> {
    let (endpoint, client) = (agent.endpoint.clone(), Client::new().expect("client"));
    let r = client
        .call_endpoint(&endpoint, "Chaos.faults", &json!({}), Duration::from_secs(5))
        .await
        .expect("Chaos.faults");
    r.to_json().as_array().cloned().unwrap_or_default()
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn pause_stops_echo_answering_and_it_answers_again_after_the_lifetime_on_its_own() -> Result<()> {
    let config = LymphConfig::for_test("pause")?;
    let echo = Instance::start(&config)?;
    let agent = start_agent(None, &config, "", false)?;
    wait_local(&agent, echo.pid(), Duration::from_secs(10))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = Client::new()?;
        let args = json!({"text": "x"});
        let upper = |timeout: Duration| client.call_endpoint(echo.endpoint(), "Echo.upper", &args, timeout);
        ensure!(upper(Duration::from_secs(3)).await?.as_str() == Some("X"), "Echo before the pause");
        let paused = Instant::now();
        let reply = client
            .call_endpoint(
                &agent.endpoint,
                "Chaos.pause",
                &json!({"name": "Echo", "lifetime": 2}),
                Duration::from_secs(5),
            )
            .await?
            .to_json();
        ensure!(reply["state"] == "active" && reply["pids"] == json!([echo.pid()]), "{reply}");
        let state = chaos_test_support::proc_stat::state(echo.pid() as i32);
        ensure!(state == Some('T'), "Echo is not stopped: {state:?}");
        ensure!(
            matches!(upper(Duration::from_millis(700)).await, Err(ClientError::Timeout { .. })),
            "a paused Echo answered"
        );
        // No further call to the agent: the fault's lifetime ends and the agent resumes Echo by itself.
        let deadline = paused + Duration::from_secs(5);
        loop {
            if upper(Duration::from_millis(500)).await.is_ok() {
                break;
            }
            ensure!(Instant::now() < deadline, "Echo did not come back after the 2 s pause");
        }
        let back = paused.elapsed();
        println!("Echo answered again {back:?} after a 2 s pause");
        ensure!(back >= Duration::from_millis(1900), "resumed too early: {back:?}");
        Ok(())
    })?;
    let events = agent.events();
    ensure!(
        events.iter().any(|e| e["action"] == "expired" && e["kind"] == "pause" && e["pids"] == json!([echo.pid()])),
        "{events:?}"
    );
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn dry_runs_kill_nothing_and_report_the_pid_they_would_kill() -> Result<()> {
    let config = LymphConfig::for_test("dryrun")?;
    let echo = Instance::start(&config)?;
    // Per request.
    let agent = start_agent(None, &config, "", false)?;
    wait_local(&agent, echo.pid(), Duration::from_secs(10))?;
    let r = agent.ok("kill", json!({"name": "Echo", "dry_run": true}));
    ensure!(
        r["dry_run"] == true && r["pids"] == json!([echo.pid()]),
        "expected pid {}: {r}\nservices: {}\nps: {}",
        echo.pid(),
        agent.ok("list_services", json!({})),
        String::from_utf8_lossy(&std::process::Command::new("ps").args(["-eo", "pid,ppid,stat,args"]).output()?.stdout)
            .lines()
            .filter(|l| l.contains("lymph"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let message = r["message"].as_str().unwrap_or_default();
    ensure!(message.contains("would send SIGKILL") && message.contains(&echo.pid().to_string()), "{message}");
    drop(agent);
    // Agent-wide --dry-run.
    let agent = AgentProcess::start(
        None,
        AgentOptions {
            zookeeper: Some(config.zk_hosts()),
            args: vec!["--no-network-control".into(), "--dry-run".into()],
            ..Default::default()
        },
    )?;
    wait_local(&agent, echo.pid(), Duration::from_secs(10))?;
    let r = agent.ok("kill", json!({"name": "Echo", "all": true}));
    ensure!(
        r["dry_run"] == true && r["pids"] == json!([echo.pid()]),
        "agent-wide dry run, expected pid {}: {r}",
        echo.pid()
    );
    std::thread::sleep(Duration::from_millis(200));
    ensure!(!exited(echo.pid()), "a dry run killed Echo");
    let dry = agent.events().into_iter().filter(|e| e["action"] == "dry_run").count();
    ensure!(dry == 1, "expected one dry_run event, got {dry}");
    ensure!(kill_events(&agent).is_empty(), "a dry run recorded an applied kill");
    Ok(())
}

/// One unleashed choice: kind, fault id, target, pids, seed.
type Choice = (String, String, Json, Json, Json);

/// The unleashed choices (ignoring times).
fn choices(events: &[Json]) -> Vec<Choice> {
    events
        .iter()
        .filter(|e| e["action"] == "dry_run" && e["detail"]["origin"] == "unleash")
        .map(|e| {
            (e["kind"].to_string(), e["fault"].to_string(), e["target"].clone(), e["pids"].clone(), e["seed"].clone())
        })
        .collect()
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn unleashed_mode_with_the_same_seed_replays_the_same_choices() -> Result<()> {
    let config = LymphConfig::for_test("unleash")?;
    let _echos: Vec<Instance> = (0..3).map(|_| Instance::start(&config)).collect::<Result<_>>()?;
    let yaml = r#"
unleash:
  max_per_service: 100
  menu:
    - {kind: kill}
    - {kind: pause, weight: 2, params: {lifetime: 1}}
    - {kind: kill, params: {signal: SIGTERM, count: 2}}
"#;
    let agent = start_agent(None, &config, yaml, false)?;
    eventually("the agent to see 3 local Echo instances", Duration::from_secs(10), Duration::from_millis(50), || {
        agent.ok("list_services", json!({}))["Echo"]
            .as_array()
            .map_or(0, |l| l.iter().filter(|i| i["local"] == true).count())
            >= 3
    })?;
    let run = |seed: u64| -> Result<Vec<Choice>> {
        let since = agent.ok("status", json!({}))["last_event"].as_u64().unwrap_or(0);
        let state = agent.ok("unleash", json!({"seed": seed, "mean_interval": 0.03, "min_gap": 0.01, "dry_run": true}));
        ensure!(state["enabled"] == true && state["seed"] == seed, "{state}");
        std::thread::sleep(Duration::from_millis(1500));
        agent.ok("leash", json!({}));
        let events: Vec<Json> =
            agent.ok("events", json!({"since": since, "limit": 10000})).as_array().cloned().unwrap_or_default();
        if choices(&events).is_empty() {
            eprintln!(
                "no unleashed choices in {} events: {:?}\nagent log:\n{}",
                events.len(),
                events.iter().take(5).collect::<Vec<_>>(),
                agent.log_tail(20)
            );
        }
        Ok(choices(&events))
    };
    let (a, b, other) = (run(42)?, run(42)?, run(7)?);
    let n = a.len().min(b.len());
    println!("seed 42: {} and {} choices; seed 7: {}", a.len(), b.len(), other.len());
    ensure!(n >= 10, "too few unleashed rounds to compare ({} / {})", a.len(), b.len());
    ensure!(a[..n] == b[..n], "the same seed made different choices:\n{:?}\n{:?}", &a[..n], &b[..n]);
    let m = n.min(other.len());
    ensure!(a[..m] != other[..m], "another seed made exactly the same choices");
    let kinds: BTreeSet<&str> = a.iter().map(|c| c.0.as_str()).collect();
    ensure!(kinds.len() >= 2, "the menu was not sampled: {kinds:?}");
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn guards_refuse_pid_1_the_agent_itself_and_zookeeper_without_sending_a_signal() -> Result<()> {
    let config = LymphConfig::for_test("guards")?;
    let agent = start_agent(None, &config, "faults: {allowed_processes: [\"/.*/\"]}\n", false)?;
    let zk_port: u16 = zk::zk_addr().rsplit_once(':').and_then(|(_, p)| p.parse().ok()).context("zk port")?;
    let refused = |kwargs: Json, why: &str| -> Result<()> {
        match agent.call("kill", kwargs.clone()) {
            Err(ClientError::Remote { type_name, message }) => {
                ensure!(type_name == "Refused" && message.contains(why), "{kwargs}: {type_name}: {message}");
                Ok(())
            }
            other => anyhow::bail!("{kwargs} was not refused: {other:?}"),
        }
    };
    // Even with every process allowed by the configuration.
    refused(json!({"pid": 1}), "pid 1")?;
    refused(json!({"pid": agent.pid()}), "chaos agent itself")?;
    refused(json!({"port": zk_port}), "ZooKeeper")?;
    refused(json!({"pid": std::process::id()}), "parent")?;
    // Nothing was signalled: all of them are alive and well.
    ensure!(agent.ok("status", json!({}))["agent"] == "lymph-chaos");
    ensure!(lymph::discover(&config)?.contains_key("Chaos"), "ZooKeeper stopped answering");
    let events = agent.events();
    ensure!(events.iter().filter(|e| e["action"] == "refused").count() == 4, "{events:?}");
    ensure!(kill_events(&agent).is_empty(), "a kill was applied: {events:?}");
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn a_network_fault_on_a_service_follows_a_restarted_instance_to_its_new_port() -> Result<()> {
    let ns = Netns::new("follow");
    let zk_addr: SocketAddr = zk::zk_addr().parse()?;
    let _forward = ns.forward_tcp(zk_addr.port(), zk_addr);
    let config = LymphConfig::for_test("follow")?;
    // Random ports: the restarted Echo listens somewhere else.
    let echo = ns.run(|| Supervised::start(&config))?;
    let first = echo.wait_registered(Duration::from_secs(30))?;
    let agent = start_agent(Some(&ns), &config, "", true)?;
    wait_local(&agent, first.pid, Duration::from_secs(10))?;
    let fault = agent.ok("inject", json!({"kind": "observe", "name": "Echo", "lifetime": 60}));
    let old_port: u64 = first.endpoint.rsplit(':').next().and_then(|p| p.parse().ok()).context("port")?;
    ensure!(fault["ports"] == json!([old_port]), "{fault}");
    // SAFETY: signalling the Echo this test's supervisor started.
    unsafe { libc::kill(first.pid as i32, libc::SIGKILL) };
    let second = echo.wait_for_restart(first.pid, Duration::from_secs(10))?;
    wait_local(&agent, second, Duration::from_secs(10))?;
    let mut f = Json::Null;
    let moved = eventually(
        format_args!("the fault to leave the dead instance's port {old_port}"),
        Duration::from_secs(5),
        Duration::from_millis(100),
        || -> Result<Option<Json>> {
            let faults = agent.ok("faults", json!({}));
            f = faults
                .as_array()
                .and_then(|l| l.iter().find(|f| f["id"] == fault["id"]))
                .cloned()
                .context("fault gone")?;
            Ok((f["ports"] != json!([old_port])).then(|| f.clone()))
        },
    )
    .map_err(|e| anyhow!("{e}: {f}"))?;
    ensure!(moved["pids"] == json!([second]), "{moved}");
    let new_port = moved["ports"][0].as_u64().context("new port")?;
    // The rule is on the new port: a call to Echo is counted.
    let before = moved["counters"]["packets"].as_u64().unwrap_or(0);
    ns.block_on(|| async {
        let client = Client::new()?;
        client
            .call_endpoint(
                &format!("tcp://127.0.0.1:{new_port}"),
                "Echo.upper",
                &json!({"text": "x"}),
                Duration::from_secs(3),
            )
            .await?;
        anyhow::Ok(())
    })?;
    let after = agent.ok("faults", json!({}))[0]["counters"]["packets"].as_u64().unwrap_or(0);
    ensure!(after > before, "no packets counted on the new port ({before} → {after})");
    ensure!(agent.events().iter().any(|e| e["action"] == "followed"), "no followed event");
    Ok(())
}
