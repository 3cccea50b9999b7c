//! Hostile tier, registry attacker (here in the zk tier: it needs the harness's ZooKeeper). Anyone who can write to
//! ZooKeeper registers a fake lymph instance whose endpoint is the port of a process that is not a lymph service
//! (a web server), then asks the agent to kill that "service" and, afterwards, its pid directly. The agent must
//! judge the process by what it is, not by where the registry says it is: both requests are refused, the web
//! server lives, and the refusals are in the event log.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, free_port},
    hostile::show,
    lymph::{self, LymphConfig},
};
use serde_json::json;

struct WebServer(Child);

impl Drop for WebServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn alive(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

#[test]
#[ignore = "needs root and the harness's ZooKeeper: run by cargo xtask test"]
fn a_fake_registry_entry_on_a_web_servers_port_does_not_make_it_a_target() -> Result<()> {
    let config = LymphConfig::for_test("hostile-registry")?;
    let port = free_port();
    let mut web = WebServer(
        Command::new("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("python3 -m http.server")?,
    );
    let web_pid = web.0.id();
    let agent = AgentProcess::start(
        None,
        AgentOptions {
            zookeeper: Some(config.zk_hosts()),
            args: vec!["--no-network-control".into()],
            ..Default::default()
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lymph::discover(&config)?.contains_key("Chaos") {
        ensure!(Instant::now() < deadline, "agent not registered; log:\n{}", agent.log_tail(30));
        std::thread::sleep(Duration::from_millis(100));
    }
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "the web server never listened");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The attacker's raw ZooKeeper write: a `Fake` instance whose endpoint is the web server's port.
    let hostname = nix::unistd::gethostname()?.into_string().unwrap_or_default();
    let registration = json!({
        "endpoint": format!("tcp://127.0.0.1:{port}"),
        "identity": "fa4efa4efa4efa4efa4efa4efa4efa4e",
        "ip": "127.0.0.1",
        "hostname": hostname,
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let zkc = zookeeper_client::Client::connect(&config.zk_hosts()).await?;
        let opts = zookeeper_client::CreateMode::Persistent.with_acls(zookeeper_client::Acls::anyone_all());
        zkc.create("/services/Fake", b"", &opts).await?;
        zkc.create("/services/Fake/f1", &serde_json::to_vec(&registration)?, &opts).await?;
        anyhow::Ok(())
    })?;
    // The agent sees it as a local instance with the web server's pid.
    loop {
        let s = agent.ok("list_services", json!({}));
        if s["Fake"].as_array().is_some_and(|l| l.iter().any(|i| i["local"] == true && i["pid"] == web_pid)) {
            break;
        }
        ensure!(Instant::now() < deadline, "the agent never resolved the fake entry to the web server: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let by_service = agent.cli(&["kill", "Fake", "--all"]);
    std::thread::sleep(Duration::from_millis(300));
    ensure!(alive(&mut web.0), "the web server was killed through a fake registry entry: {}", show(&by_service));
    let by_pid = agent.cli(&["kill", "--pid", &web_pid.to_string()]);
    std::thread::sleep(Duration::from_millis(300));
    ensure!(alive(&mut web.0), "the web server was killed by pid after the fake entry: {}", show(&by_pid));
    ensure!(!by_service.status.success() && !by_pid.status.success(), "{}\n{}", show(&by_service), show(&by_pid));
    let refused = agent.events().into_iter().filter(|e| e["action"] == "refused" && e["kind"] == "kill").count();
    ensure!(refused == 2, "expected 2 recorded refusals, got {refused}: {:?}", agent.events());
    Ok(())
}
