//! The agent is a first-class member of a lymph deployment, proven against real lymph 0.15 peers and a
//! real ZooKeeper (`cargo xtask test` starts both; every test uses its own ZooKeeper chroot).
//!
//! These agents run in the test's own network namespace with `--no-network-control` (no tc objects on the host's
//! loopback); network faults are proven in `netns_*` and the VM tier.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use chaos_agent::rpc::{ClientError, client::Client};
use chaos_test_support::{eventually, free_port};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess},
    lymph::{self, Instance, LymphConfig, Supervised},
};
use serde_json::{Value as Json, json};

/// An agent on `config`'s ZooKeeper chroot, returned once ZooKeeper lists it.
fn agent_for(config: &LymphConfig) -> Result<AgentProcess> {
    let agent = AgentProcess::start(None, AgentOptions::in_zookeeper(config.zk_hosts()))?;
    agent.wait_registered(config, Duration::from_secs(10))?;
    Ok(agent)
}

/// Polls `Chaos.list_services` until `pred` holds (bounded).
fn wait_services(agent: &AgentProcess, timeout: Duration, pred: impl Fn(&Json) -> bool) -> Result<Json> {
    let mut services = Json::Null;
    eventually("list_services to meet the condition", timeout, Duration::from_millis(50), || {
        services = agent.ok("list_services", json!({}));
        pred(&services).then(|| services.clone())
    })
    .map_err(|e| anyhow!("{e}; list_services = {services}"))
}

fn local_echo(services: &Json, pid: u32) -> bool {
    services["Echo"].as_array().is_some_and(|list| list.iter().any(|i| i["local"] == true && i["pid"] == pid))
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn lymph_tools_discover_inspect_and_call_the_agent() -> Result<()> {
    let config = LymphConfig::for_test("tools")?;
    let echo = Instance::start(&config)?;
    let agent = agent_for(&config)?;
    wait_services(&agent, Duration::from_secs(10), |s| local_echo(s, echo.pid()))?;

    let discovered = lymph::discover(&config)?;
    let chaos = discovered.get("Chaos").context("lymph discover does not list Chaos")?;
    ensure!(chaos.len() == 1 && chaos[0]["endpoint"] == agent.endpoint.as_str(), "Chaos in ZooKeeper: {chaos:?}");
    for field in ["id", "identity", "endpoint", "ip", "fqdn", "hostname"] {
        ensure!(chaos[0].get(field).is_some_and(|v| !v.is_null()), "registration lacks `{field}`: {}", chaos[0]);
    }

    let inspect = lymph::lymph_cli(&config, &["inspect", "Chaos"])?;
    let text = stdout(&inspect);
    ensure!(inspect.status.success(), "lymph inspect Chaos failed: {}", String::from_utf8_lossy(&inspect.stderr));
    for method in [
        "Chaos.kill",
        "Chaos.inject_latency",
        "Chaos.list_services",
        "Chaos.faults",
        "Chaos.events",
        "Chaos.unleash",
        "lymph.ping",
    ] {
        ensure!(text.contains(method), "lymph inspect Chaos does not list {method}:\n{text}");
    }
    ensure!(text.contains("one at random"), "help texts missing:\n{text}");

    let out = lymph::lymph_cli(&config, &["request", "--json", "Chaos.list_services", "{}"])?;
    ensure!(out.status.success(), "lymph request Chaos.list_services: {}", String::from_utf8_lossy(&out.stderr));
    let services: Json = serde_json::from_slice(&out.stdout).with_context(|| stdout(&out))?;
    ensure!(
        local_echo(&services, echo.pid()),
        "Echo (pid {}) not listed as local with its pid: {services}",
        echo.pid()
    );
    let instance = &services["Echo"][0];
    ensure!(instance["endpoint"] == echo.endpoint() && instance["identity"] == echo.identity(), "{instance}");
    // The 2015 shape: iterating the answer yields service names.
    ensure!(services.as_object().is_some_and(|m| m.contains_key("Echo") && m.contains_key("Chaos")), "{services}");
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn our_client_calls_a_real_echo_and_maps_every_reply_type() -> Result<()> {
    let config = LymphConfig::for_test("client")?;
    let _echo = Instance::start(&config)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = Client::new()?.connect_zookeeper(&config.zk_hosts(), Duration::from_secs(5)).await?;
        let t = Duration::from_secs(3);
        let hi = client.call("Echo.upper", &json!({"text": "hi"}), t).await?;
        ensure!(hi.as_str() == Some("HI"), "Echo.upper: {hi:?}");
        match client.call("Echo.fail", &json!({"message": "bad"}), t).await {
            Err(ClientError::Remote { type_name, message }) => {
                ensure!(type_name == "ValueError" && message == "bad", "{type_name}: {message}")
            }
            other => anyhow::bail!("Echo.fail: {other:?}"),
        }
        ensure!(
            matches!(client.call("Echo.nosuch", &json!({}), t).await, Err(ClientError::Nack { .. })),
            "unknown method is not a NACK"
        );
        ensure!(
            matches!(client.call("Echo.crash", &json!({}), t).await, Err(ClientError::Nack { .. })),
            "undeclared error is not a NACK"
        );
        ensure!(
            matches!(client.call("Nowhere.thing", &json!({}), t).await, Err(ClientError::LookupFailure { .. })),
            "unknown service is not a LookupFailure"
        );
        let dead = format!("tcp://127.0.0.1:{}", free_port());
        let timeout = Duration::from_millis(500);
        // The call must end with its own timeout, not a default one: judged against a plain sleep of the same
        // length on the same runtime just before (a busy machine delays both alike).
        let slept = Instant::now();
        tokio::time::sleep(timeout).await;
        let slept = slept.elapsed();
        let started = Instant::now();
        let r = client.call_endpoint(&dead, "Echo.upper", &json!({"text": "x"}), timeout).await;
        let took = started.elapsed();
        ensure!(matches!(r, Err(ClientError::Timeout { .. })), "dead endpoint: {r:?}");
        ensure!(
            took < slept + Duration::from_secs(1),
            "a {timeout:?} timeout took {took:?} (a {timeout:?} sleep: {slept:?})"
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn a_real_lymph_peer_that_talked_to_the_agent_keeps_it_responsive() -> Result<()> {
    let config = LymphConfig::for_test("pings")?;
    let agent = agent_for(&config)?;
    // Keep the agent busy meanwhile: heartbeats must not wait behind slow work.
    let busy = std::thread::scope(|s| -> Result<Json> {
        let watcher =
            s.spawn(|| lymph::python_script(&config, "ping_watch.py", &["Chaos", "10"], Duration::from_secs(40)));
        for _ in 0..50 {
            let _ = agent.call("list_services", json!({}));
            std::thread::sleep(Duration::from_millis(150));
        }
        let out = watcher.join().expect("watcher thread")?;
        ensure!(out.status.success(), "ping_watch.py failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).with_context(|| stdout(&out))
    })?;
    println!("lymph's view of the agent over 10 s: {busy}");
    ensure!(busy["endpoint"] == agent.endpoint.as_str(), "{busy}");
    let heartbeats = busy["heartbeats"].as_u64().unwrap_or(0);
    ensure!(heartbeats >= 9, "only {heartbeats} of ~10 pings answered: {busy}");
    // Pings go out every second: a missed one leaves ≥ 2 s of silence. Anything shorter is a late ping or a late
    // sample of lymph's own (gevent) loop on a busy machine, not the agent.
    let silence = busy["max_silence"].as_f64().unwrap_or(99.0);
    ensure!(silence < 1.9, "the agent was silent for {silence:.2} s: {busy}");
    ensure!(
        busy["statuses"].as_array().is_some_and(|s| s.iter().all(|x| x != "unresponsive")),
        "marked unresponsive: {busy}"
    );
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn discovery_shows_a_restarted_instance_with_its_new_pid_and_port_within_two_seconds_of_registering() -> Result<()> {
    let config = LymphConfig::for_test("restart")?;
    let echo = Supervised::start(&config)?;
    let first = echo.wait_registered(Duration::from_secs(30))?;
    let agent = agent_for(&config)?;
    wait_services(&agent, Duration::from_secs(10), |s| local_echo(s, first.pid))?;
    // SAFETY: signalling the Echo the supervisor (this test) started.
    unsafe { libc::kill(first.pid as i32, libc::SIGKILL) };
    // How long lymph takes to start again (a Python start) is not the agent's business: the clock runs from the
    // moment the new instance says it has registered (its process title), which is when a registry watcher can
    // first see it.
    let new_pid = echo.wait_for_restart(first.pid, Duration::from_secs(30))?;
    echo.wait_announced(new_pid, Duration::from_secs(30))?;
    let registered = Instant::now();
    let services = wait_services(&agent, Duration::from_secs(10), |s| local_echo(s, new_pid))?;
    let took = registered.elapsed();
    let new =
        services["Echo"].as_array().and_then(|l| l.iter().find(|i| i["pid"] == new_pid)).cloned().unwrap_or_default();
    println!("registered → discovery shows new pid {new_pid} on {}: {took:?}", new["endpoint"]);
    ensure!(new["endpoint"] != first.endpoint.as_str(), "the restarted Echo kept its endpoint: {new}");
    ensure!(took < Duration::from_secs(2), "took {took:?} (limit 2 s)");
    // The dead instance's znode lingers until its ZooKeeper session times out; the agent marks it not listening.
    if let Some(old) =
        services["Echo"].as_array().and_then(|l| l.iter().find(|i| i["endpoint"] == first.endpoint.as_str()))
    {
        ensure!(old["listening"] == false && old["pid"].is_null(), "dead instance still looks alive: {old}");
    }
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn standalone_until_zookeeper_appears_then_registers_and_re_registers_and_leaves_on_shutdown() -> Result<()> {
    let config = LymphConfig::for_test("standalone")?;
    let echo = Instance::start(&config)?;
    // The agent's ZooKeeper address has nothing behind it yet.
    let port = free_port();
    let hosts = format!("127.0.0.1:{port}{}", config.chroot());
    let mut agent = AgentProcess::start(None, AgentOptions::in_zookeeper(hosts))?;
    // Standalone: the local Echo is found from its process title and asked what it serves.
    let services = wait_services(&agent, Duration::from_secs(10), |s| local_echo(s, echo.pid()))?;
    ensure!(services["Echo"][0]["source"] == "local", "{services}");
    let status = agent.ok("status", json!({}));
    ensure!(status["zookeeper"]["state"] == "connecting" && !status["zookeeper"]["error"].is_null(), "{status}");
    ensure!(!lymph::discover(&config)?.contains_key("Chaos"), "registered without ZooKeeper?");

    // ZooKeeper appears: the agent retries in the background and registers.
    let zk: std::net::SocketAddr = chaos_tests::zk::zk_addr().parse()?;
    let _zk_appears = chaos_tests::netns::Forwarder::start(port, zk);
    let appeared = Instant::now();
    let endpoint = agent.endpoint.clone();
    let registered = |config: &LymphConfig| -> Result<Option<Json>> {
        Ok(lymph::discover(config)?
            .get("Chaos")
            .and_then(|c| c.iter().find(|i| i["endpoint"] == endpoint.as_str()).cloned()))
    };
    let node = eventually(
        "registered after ZooKeeper appeared",
        Duration::from_secs(20).saturating_sub(appeared.elapsed()),
        Duration::from_millis(200),
        || registered(&config),
    )?;
    println!("registered {:?} after ZooKeeper appeared", appeared.elapsed());
    let services = wait_services(&agent, Duration::from_secs(10), |s| s["Echo"][0]["source"] == "zookeeper")?;
    ensure!(local_echo(&services, echo.pid()), "{services}");

    // Someone removes our node (or the session was lost): the agent registers again — a new node (a later
    // creation zxid), which lymph's own discovery lists. (The agent may be back before a slow lymph discovery
    // could see the gap, so the gap itself is not looked for.)
    let path = format!("/services/Chaos/{}", node["id"].as_str().context("id")?);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let zkc = rt.block_on(zookeeper_client::Client::connect(&config.zk_hosts()))?;
    let created = |zkc: &zookeeper_client::Client| -> Result<Option<i64>> {
        Ok(rt.block_on(zkc.check_stat(&path))?.map(|stat| stat.czxid))
    };
    let old = created(&zkc)?.context("our node before the delete")?;
    rt.block_on(zkc.delete(&path, None))?;
    let deleted = Instant::now();
    eventually(
        "re-registered after its node vanished",
        Duration::from_secs(15).saturating_sub(deleted.elapsed()),
        Duration::from_millis(200),
        || -> Result<bool> { Ok(created(&zkc)?.is_some_and(|new| new > old) && registered(&config)?.is_some()) },
    )?;
    println!("re-registered {:?} after its node vanished", deleted.elapsed());

    // A clean shutdown removes the node at once (not after the session timeout).
    ensure!(agent.stop(), "agent did not stop");
    ensure!(registered(&config)?.is_none(), "registration left after a clean shutdown");
    Ok(())
}
