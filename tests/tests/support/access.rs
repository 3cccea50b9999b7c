//! The access tests' harness, shared by the netns tier (`netns_access`) and the hostile tier (`hostile_remote`):
//! a server namespace with two client namespaces, an agent process in it, and a raw lymph `status` call that can
//! use CURVE.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use chaos_agent::rpc::{
    value::{self, Value},
    wire::{self, Headers, Incoming, Kind},
};
use chaos_test_support::{
    eventually, free_port,
    process::{DieWithParent, stop_child},
};
use chaos_tests::{agent::agent_bin, netns::Netns};
use serde_json::Value as Json;

/// How long a refused client waits before we call it unanswered.
pub const REFUSED_WAIT: Duration = Duration::from_secs(3);
/// How long an allowed client may take.
pub const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// `srv` with two client namespaces: `good` on 10.41.0.0/24, `bad` on 10.42.0.0/24.
pub struct Topology {
    pub srv: Netns,
    pub good: Netns,
    pub bad: Netns,
}

pub fn topology(tag: &str) -> Topology {
    let t = Topology {
        srv: Netns::new(&format!("{tag}s")),
        good: Netns::new(&format!("{tag}g")),
        bad: Netns::new(&format!("{tag}b")),
    };
    for (cli, (here, there), net) in [(&t.good, ("vg0", "vg1"), 41u8), (&t.bad, ("vb0", "vb1"), 42)] {
        t.srv.ip(&["link", "add", here, "type", "veth", "peer", "name", there, "netns", cli.name()]).unwrap();
        t.srv.ip(&["addr", "add", &format!("10.{net}.0.1/24"), "dev", here]).unwrap();
        t.srv.ip(&["link", "set", here, "up"]).unwrap();
        cli.ip(&["addr", "add", &format!("10.{net}.0.2/24"), "dev", there]).unwrap();
        cli.ip(&["link", "set", there, "up"]).unwrap();
    }
    t
}

/// An agent process in `ns` with `config_yaml`; stopped (SIGTERM) on drop.
pub struct Agent {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent and returns once it logged "agent ready", or `Err(log)` when it exits first.
    pub fn start(ns: &Netns, config_yaml: &str) -> Result<Agent, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = ns.run(free_port);
        let config = dir.path().join("config.yml");
        std::fs::write(&config, config_yaml).unwrap();
        let log = dir.path().join("agent.log");
        let mut cmd = ns.command(agent_bin().to_str().unwrap());
        cmd.arg("agent")
            .arg("--config")
            .arg(&config)
            .args(["--port", &port.to_string(), "--zookeeper", "", "--no-network-control", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--events-file")
            .arg(dir.path().join("events.jsonl"))
            .args(["--log-level", "info,chaos_agent=debug"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .env_remove("LYMPH_NODE_IP")
            .env_remove("LYMPH_NODE_CONFIG")
            .env_remove("LYMPH_CONFIG")
            .die_with_parent();
        let mut child = cmd.spawn().unwrap();
        let ready =
            eventually("the agent to log `agent ready`", Duration::from_secs(15), Duration::from_millis(50), || {
                if std::fs::read_to_string(&log).unwrap_or_default().contains("agent ready") {
                    return Ok(true);
                }
                match child.try_wait().unwrap() {
                    Some(status) => Err(anyhow::anyhow!("the agent exited ({status})")),
                    None => Ok(false),
                }
            });
        match ready {
            Ok(()) => Ok(Agent { child, port, log, _dir: dir }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::fs::read_to_string(&log).unwrap_or_default())
            }
        }
    }

    /// The agent's routing id (its advertised endpoint).
    pub fn routing_id(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// CURVE keys of a client, and the server key it expects.
pub struct Curve {
    pub server_public: [u8; 32],
    pub public: [u8; 32],
    pub secret: [u8; 32],
}

/// One `Chaos.status` from a fresh raw lymph client bound at `bind_ip` (call inside the client's namespace):
/// connects to `connect`, addresses the agent by `peer_id`, waits up to `timeout` for the reply on its own
/// bound socket. `None` = no answer (the handshake never completed, or nothing came back).
pub fn status_call(
    bind_ip: &str,
    connect: &str,
    peer_id: &str,
    curve: Option<&Curve>,
    timeout: Duration,
) -> Option<Json> {
    let ctx = zmq::Context::new();
    let port = std::net::TcpListener::bind((bind_ip, 0)).unwrap().local_addr().unwrap().port();
    let endpoint = format!("tcp://{bind_ip}:{port}");
    let recv = ctx.socket(zmq::ROUTER).unwrap();
    recv.set_identity(endpoint.as_bytes()).unwrap();
    recv.set_linger(0).unwrap();
    recv.bind(&endpoint).unwrap();
    let send = ctx.socket(zmq::ROUTER).unwrap();
    send.set_identity(endpoint.as_bytes()).unwrap();
    send.set_router_mandatory(true).unwrap();
    send.set_linger(0).unwrap();
    if let Some(c) = curve {
        send.set_curve_serverkey(&c.server_public).unwrap();
        send.set_curve_publickey(&c.public).unwrap();
        send.set_curve_secretkey(&c.secret).unwrap();
    }
    send.connect(connect).unwrap();
    let id = wire::new_id();
    let frames = wire::frames(&id, Kind::Req, "Chaos.status", &Headers::default(), value::encode(&Value::Map(vec![])));
    let deadline = Instant::now() + timeout;
    // With ROUTER_MANDATORY a message can only leave once the agent accepted the handshake.
    if !chaos_tests::raw_peer::send_routed(&send, peer_id.as_bytes(), &frames, timeout)
        .unwrap_or_else(|e| panic!("send: {e}"))
    {
        return None;
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        recv.set_rcvtimeo(i32::try_from(left.as_millis()).unwrap().max(1)).unwrap();
        let Ok(frames) = recv.recv_multipart(0) else { return None };
        let msg = Incoming::from_frames(frames).expect("a lymph message");
        if msg.kind == Kind::Rep && msg.subject == id {
            return Some(value::decode(&msg.body).expect("msgpack").to_json());
        }
    }
}
