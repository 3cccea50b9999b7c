//! Hostile tier, registry attacker (here in the zk tier: it needs the harness's ZooKeeper). Anyone who can write to
//! ZooKeeper registers a fake lymph instance whose endpoint is the port of a process that is not a lymph service
//! (a web server), then asks the agent to kill that "service" and, afterwards, its pid directly. The agent must
//! judge the process by what it is, not by where the registry says it is: both requests are refused, the web
//! server lives, and the refusals are in the event log. The same for a stale entry: a real lymph instance's
//! registration, still in ZooKeeper after the instance died, whose port a web server holds now.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, free_port},
    hostile::show,
    lymph::{self, Instance, LymphConfig},
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

#[test]
#[ignore = "needs root and the harness's ZooKeeper: run by cargo xtask test"]
fn a_stale_registry_entry_whose_port_a_web_server_took_does_not_make_it_a_target() -> Result<()> {
    let config = LymphConfig::for_test("hostile-stale")?;
    let agent = AgentProcess::start(
        None,
        AgentOptions {
            zookeeper: Some(config.zk_hosts()),
            args: vec!["--no-network-control".into()],
            ..Default::default()
        },
    )?;
    let instance = Instance::start(&config)?;
    let (lymph_pid, identity) = (instance.pid(), instance.identity().to_owned());
    let port: u16 = instance.endpoint().rsplit(':').next().unwrap_or_default().parse()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let echo_pids = |agent: &AgentProcess| -> Vec<u64> {
        let s = agent.ok("list_services", json!({}));
        s["Echo"]
            .as_array()
            .map_or(Vec::new(), |l| l.iter().filter(|i| i["local"] == true).filter_map(|i| i["pid"].as_u64()).collect())
    };
    while !echo_pids(&agent).contains(&u64::from(lymph_pid)) {
        ensure!(Instant::now() < deadline, "the agent never saw the lymph instance; log:\n{}", agent.log_tail(30));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its registration as ZooKeeper holds it.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let zkc = rt.block_on(zookeeper_client::Client::connect(&config.zk_hosts()))?;
    let registration = rt.block_on(async {
        for child in zkc.list_children("/services/Echo").await? {
            let (data, _) = zkc.get_data(&format!("/services/Echo/{child}")).await?;
            let value: serde_json::Value = serde_json::from_slice(&data)?;
            if value["identity"] == identity.as_str() {
                return anyhow::Ok(data);
            }
        }
        anyhow::bail!("the instance's znode is missing")
    })?;

    // The instance dies without unregistering; its registration stays (the attacker's raw write keeps it for good,
    // as a session that never expires would), and a web server takes its port.
    instance.kill()?;
    rt.block_on(async {
        let opts = zookeeper_client::CreateMode::Persistent.with_acls(zookeeper_client::Acls::anyone_all());
        zkc.create("/services/Echo/stale", &registration, &opts).await?;
        anyhow::Ok(())
    })?;
    let mut web = WebServer(
        Command::new("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("python3 -m http.server")?,
    );
    let web_pid = web.0.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !echo_pids(&agent).contains(&u64::from(web_pid)) {
        ensure!(alive(&mut web.0), "the web server could not take port {port}");
        ensure!(
            Instant::now() < deadline,
            "the agent never resolved the stale entry to the web server: {:?}",
            agent.ok("list_services", json!({}))
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let by_service = agent.cli(&["kill", "Echo", "--all"]);
    std::thread::sleep(Duration::from_millis(300));
    ensure!(alive(&mut web.0), "the web server was killed through a stale registry entry: {}", show(&by_service));
    let by_instance = agent.cli(&["kill", "--instance", &identity]);
    std::thread::sleep(Duration::from_millis(300));
    ensure!(alive(&mut web.0), "the web server was killed as the dead instance: {}", show(&by_instance));
    ensure!(
        !by_service.status.success() && !by_instance.status.success(),
        "{}\n{}",
        show(&by_service),
        show(&by_instance)
    );
    let refused = agent.events().into_iter().filter(|e| e["action"] == "refused" && e["kind"] == "kill").count();
    ensure!(refused == 2, "expected 2 recorded refusals, got {refused}: {:?}", agent.events());
    Ok(())
}

/// A DNS server that never answers: it counts the queries that name `marker` and lets them time out.
struct SilentDns {
    queries: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentDns {
    fn start(addr: &str, marker: &'static str) -> Result<SilentDns> {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize, Ordering},
        };
        let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, s) = (queries.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf)
                    && buf[..n].windows(marker.len()).any(|w| w == marker.as_bytes())
                {
                    q.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(SilentDns { queries, stop, thread: Some(thread) })
    }

    fn queries(&self) -> usize {
        self.queries.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for SilentDns {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
#[ignore = "needs root and the harness's ZooKeeper: run by cargo xtask test"]
fn registry_host_names_that_never_resolve_do_not_stall_discovery_or_rpc() -> Result<()> {
    // The attacker registers instances whose endpoints name hosts that the DNS server never answers for (each
    // lookup then takes timeout × attempts). The agent must go on answering requests and keep its view of the
    // real services current: a lymph instance started after the attack is seen, with its pid, as quickly as
    // without it.
    const MARKER: &str = "chaosdnstest";
    let dns = SilentDns::start("127.0.9.53:53", MARKER)?;
    let dir = tempfile::tempdir()?;
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.9.53\noptions timeout:5 attempts:2\n")?;
    let config = LymphConfig::for_test("hostile-dns")?;
    let agent = AgentProcess::start(
        None,
        AgentOptions {
            zookeeper: Some(config.zk_hosts()),
            args: vec!["--no-network-control".into()],
            resolv_conf: Some(resolv),
            ..Default::default()
        },
    )?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let zkc = zookeeper_client::Client::connect(&config.zk_hosts()).await?;
        let opts = zookeeper_client::CreateMode::Persistent.with_acls(zookeeper_client::Acls::anyone_all());
        zkc.create("/services/Slow", b"", &opts).await?;
        for i in 0..12 {
            let registration = json!({
                "endpoint": format!("tcp://h{i}.{MARKER}.example:4242"),
                "identity": format!("{i:032x}"),
                "ip": "127.0.0.1",
            });
            zkc.create(&format!("/services/Slow/s{i}"), &serde_json::to_vec(&registration)?, &opts).await?;
        }
        anyhow::Ok(())
    })?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while dns.queries() == 0 {
        ensure!(
            Instant::now() < deadline,
            "the agent never asked the test's DNS server for the registered host names (is the agent's \
             /etc/resolv.conf the test's?); log:\n{}",
            agent.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // While the lookups hang: requests are answered, and a new real instance is seen as local with its pid.
    let instance = Instance::start(&config)?;
    let pid = u64::from(instance.pid());
    let started = Instant::now();
    loop {
        let services = agent.call("list_services", json!({})).map_err(|e| {
            anyhow::anyhow!("the agent stopped answering while registry host names were being resolved: {e}")
        })?;
        let echo_local =
            services["Echo"].as_array().is_some_and(|l| l.iter().any(|i| i["local"] == true && i["pid"] == pid));
        if echo_local {
            ensure!(
                services["Slow"]
                    .as_array()
                    .is_some_and(|l| l.iter().all(|i| i["local"] == false && i["pid"].is_null())),
                "an instance whose host name never resolved counts as local: {services}"
            );
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(15),
            "the agent did not see the new lymph instance (pid {pid}) within 15 s while {} DNS queries for registry \
             host names hung: its discovery waits for DNS; list_services: {services}; log:\n{}",
            dns.queries(),
            agent.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.ok("status", json!({}));
    Ok(())
}
