//! The agent as one more instance of a real `lymph node`, as the original lymph-chaos README had it:
//!
//! ```yaml
//! instances:
//!     echo:
//!         command: lymph instance --interface echo:Echo
//!     chaos:
//!         command: lymph-chaos agent --config /etc/lymph-chaos/config.yml
//! ```
//!
//! The node (lymph 0.15, patched venv) starts both; the agent is given no `--zookeeper`: it takes the node's
//! ZooKeeper hosts from `$LYMPH_NODE_CONFIG` (`chaos_agent::lymph_config`), registers as `Chaos` under the test's
//! chroot, advertises `$LYMPH_NODE_IP`, kills Echo on request, and the node restarts Echo; stopping the node stops
//! the agent cleanly (SIGTERM) and it leaves ZooKeeper.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use chaos_agent::rpc::client::Client;
use chaos_test_support::{
    eventually, free_port,
    proc_stat::{self, ProcStat},
    process::{DieWithParent, terminate, wait_timeout},
};
use chaos_tests::{
    agent::agent_bin,
    lymph::{self, LymphConfig},
    zk,
};
use serde_json::{Value as Json, json};

/// ZooKeeper keeps a SIGKILLed Echo's znode this long (the minimum it grants).
const SESSION_TIMEOUT: Duration = Duration::from_secs(4);

/// `lymph node` with `config`, its output in `<config dir>/node.log`; SIGTERM (then SIGKILL) on drop.
struct Node {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Node {
    fn start(config: &LymphConfig) -> Result<Node> {
        let log = config.dir().join("node.log");
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(lymph::lymph_bin());
        for var in ["LYMPH_NODE", "LYMPH_NODE_CONFIG", "LYMPH_NODE_IP", "LYMPH_MONITOR", "LYMPH_SHARED_SOCKET_FDS"] {
            cmd.env_remove(var);
        }
        cmd.current_dir(config.dir())
            .env("LYMPH_CONFIG", config.path())
            .env("PYTHONPATH", lymph::services_dir())
            .env_remove("PYTHONHOME")
            .env("PYTHONWARNINGS", "ignore:pkg_resources is deprecated")
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("RUST_LOG", "info,chaos_agent=debug")
            .args(["node", &format!("--config={}", config.path().display()), "--loglevel=INFO"])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .die_with_parent();
        Ok(Node { child: Some(cmd.spawn().context("starting lymph node")?), log })
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; waits for the node (which stops its instances first) to exit.
    fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        terminate(&child)?;
        if let Some(status) = wait_timeout(&mut child, timeout)? {
            return Ok(status);
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("lymph node did not exit within {timeout:?} of SIGTERM; log:\n{}", self.log());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(Duration::from_secs(15));
        }
        if std::thread::panicking() {
            eprintln!("--- lymph node log ({}) ---\n{}", self.log.display(), self.log());
        }
    }
}

fn call(endpoint: &str, method: &str, kwargs: Json) -> Result<Json> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = Client::new()?;
        let v = client.call_endpoint(endpoint, &format!("Chaos.{method}"), &kwargs, Duration::from_secs(10)).await;
        client.node().shutdown();
        Ok(v?.to_json())
    })
}

fn parent_of(pid: i64) -> Option<i64> {
    ProcStat::read(i32::try_from(pid).ok()?).map(|s| i64::from(s.ppid))
}

fn alive(pid: i64) -> bool {
    i32::try_from(pid).is_ok_and(proc_stat::alive)
}

/// The local pid of the `Echo` instance the agent sees, if any.
fn echo_pid(endpoint: &str) -> Option<i64> {
    let services = call(endpoint, "list_services", json!({})).ok()?;
    services["Echo"].as_array()?.iter().find(|i| i["local"] == true).and_then(|i| i["pid"].as_i64())
}

/// How often the waits below look.
const POLL: Duration = Duration::from_millis(100);

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn a_lymph_node_runs_the_agent_which_registers_as_chaos_and_kills_echo_which_the_node_restarts() -> Result<()> {
    let config = LymphConfig::with_session_timeout(&zk::zk_addr(), &zk::unique_chroot("lymph_node"), SESSION_TIMEOUT)?;
    let port = free_port();
    let agent_config = config.dir().join("chaos.yml");
    // No `zookeeper:` here and no --zookeeper: the node's hosts must be used.
    std::fs::write(&agent_config, "faults: {default_lifetime: 30s}\n")?;
    let pin_dir = format!("/sys/fs/bpf/chaos-test-node-{}", std::process::id());
    // lymph node splits the command on single spaces and runs it without a shell.
    let agent_command = format!(
        "{bin} agent --config {cfg} --port {port} --state-dir {state} --events-file {events} --pin-dir {pin_dir} \
         --no-network-control",
        bin = agent_bin().display(),
        cfg = agent_config.display(),
        state = config.dir().join("chaos-state").display(),
        events = config.dir().join("chaos-events.jsonl").display(),
    );
    let echo_command = format!("{} instance --interface echo:Echo --loglevel=INFO", lymph::lymph_bin().display());
    let snippet = format!(
        "\n# The agent as one more instance of the node.\ninstances:\n    echo:\n        command: {echo_command}\n    \
         chaos:\n        command: {agent_command}\n"
    );
    let mut yaml = std::fs::read_to_string(config.path())?;
    yaml.push_str(&snippet);
    std::fs::write(config.path(), yaml)?;

    let mut node = Node::start(&config)?;
    let endpoint = format!("tcp://127.0.0.1:{port}");
    // Registered as Chaos in the node's ZooKeeper chroot, at the node's IP.
    eventually("Chaos registered under the node's chroot", Duration::from_secs(40), POLL, || {
        let services = lymph::discover(&config).ok()?;
        services.get("Chaos")?.iter().any(|i| i["endpoint"] == endpoint.as_str()).then_some(())
    })
    .with_context(|| format!("node log:\n{}", node.log()))?;
    let status = call(&endpoint, "status", json!({}))?;
    let agent_pid = status["pid"].as_i64().context("status has a pid")?;
    assert_eq!(parent_of(agent_pid), Some(i64::from(node.pid())), "the agent is not the node's child: {status}");
    let events = call(&endpoint, "events", json!({"limit": 100}))?;
    let start = events.as_array().and_then(|e| e.iter().find(|e| e["action"] == "agent_start")).cloned();
    assert_eq!(start.as_ref().map(|s| &s["detail"]["zookeeper"]), Some(&json!(config.zk_hosts())), "{events}");
    assert!(node.log().contains("running as an instance of a lymph node"), "LYMPH_SERVICE_NAME not seen");

    // Echo, started by the node, is a local instance the agent can target.
    let old = eventually("the agent sees the node's Echo", Duration::from_secs(40), POLL, || echo_pid(&endpoint))?;
    assert_eq!(parent_of(old), Some(i64::from(node.pid())), "Echo is not the node's child");
    let killed = call(&endpoint, "kill", json!({"name": "Echo"}))?;
    assert_eq!(killed["kind"], "kill", "{killed}");
    eventually("Echo killed", Duration::from_secs(5), POLL, || !alive(old))?;
    // lymph node's watch_processes restarts it within about a second; it registers again.
    let new = eventually("the node restarts Echo", Duration::from_secs(40), POLL, || {
        echo_pid(&endpoint).filter(|p| *p != old)
    })?;
    assert_eq!(parent_of(new), Some(i64::from(node.pid())), "the new Echo is not the node's child");
    // Once the killed instance's session expired, Echo answers again through ZooKeeper.
    let answered = eventually("Echo answers after the restart", Duration::from_secs(30), POLL, || {
        let out = lymph::lymph_cli(&config, &["request", "Echo.upper", r#"{"text":"back"}"#]).ok()?;
        String::from_utf8_lossy(&out.stdout).contains("BACK").then_some(())
    });
    answered.with_context(|| format!("node log:\n{}", node.log()))?;

    // Stopping the node stops the agent with SIGTERM: it exits cleanly and leaves ZooKeeper.
    let status = node.stop(Duration::from_secs(30))?;
    assert!(status.success(), "lymph node exited with {status}");
    eventually("the agent exits with the node", Duration::from_secs(15), POLL, || !alive(agent_pid))?;
    let services = lymph::discover(&config)?;
    assert!(
        !services.get("Chaos").is_some_and(|c| c.iter().any(|i| i["endpoint"] == endpoint.as_str())),
        "Chaos still registered after the node stopped: {services:?}"
    );
    let log = std::fs::read_to_string(&node.log)?;
    assert!(log.contains("shutting down: reverting every fault"), "the agent did not shut down cleanly:\n{log}");
    let _ = std::fs::remove_dir_all(&pin_dir);
    Ok(())
}
