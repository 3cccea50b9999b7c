//! Access (issue 8): who can command the agent. The agent runs in `srv`, bound to `0.0.0.0`; clients run in two
//! other namespaces over veth pairs: `good` (10.41.0.2, inside `rpc.allowed_clients`) and `bad` (10.42.0.2,
//! outside). Enforcement is `chaos_agent::rpc::access` (a ZAP handler on the RPC socket): a refused client never
//! completes the ZeroMQ handshake, so it gets no answer at all — not even an error it could probe with.
//!
//! The clients are raw lymph peers (zmq + the agent's wire module) so they can use CURVE: a ROUTER pair as lymph
//! has it, the bound one advertised as the client's endpoint. The agent advertises `tcp://127.0.0.1:<port>` (its
//! routing id), and the clients connect to its veth address but address it by that routing id.
//!
//! CURVE needs a libzmq built with libsodium. zmq-sys vendors libzmq without it, so in a default build the CURVE
//! test checks the other half of the contract instead: an agent configured for CURVE refuses to start rather than
//! run unauthenticated (printed as a skip of the handshake part).

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use chaos_agent::rpc::{
    value::{self, Value},
    wire::{self, Headers, Incoming, Kind},
};
use chaos_tests::{
    agent::{agent_bin, free_port},
    netns::Netns,
};
use serde_json::Value as Json;

/// How long a refused client waits before we call it unanswered.
const REFUSED_WAIT: Duration = Duration::from_secs(3);
/// How long an allowed client may take.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// `srv` with two client namespaces: `good` on 10.41.0.0/24, `bad` on 10.42.0.0/24.
struct Topology {
    srv: Netns,
    good: Netns,
    bad: Netns,
}

fn topology(tag: &str) -> Topology {
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
struct Agent {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent and returns once it logged "agent ready", or `Err(log)` when it exits first.
    fn start(ns: &Netns, config_yaml: &str) -> Result<Agent, String> {
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
            .env_remove("LYMPH_CONFIG");
        // SAFETY: prctl in the child only affects the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("agent ready") {
                return Ok(Agent { child, port, log, _dir: dir });
            }
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's routing id (its advertised endpoint).
    fn routing_id(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own, not yet reaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CURVE keys of a client, and the server key it expects.
struct Curve {
    server_public: [u8; 32],
    public: [u8; 32],
    secret: [u8; 32],
}

/// One `Chaos.status` from a fresh raw lymph client bound at `bind_ip` (call inside the client's namespace):
/// connects to `connect`, addresses the agent by `peer_id`, waits up to `timeout` for the reply on its own
/// bound socket. `None` = no answer (the handshake never completed, or nothing came back).
fn status_call(bind_ip: &str, connect: &str, peer_id: &str, curve: Option<&Curve>, timeout: Duration) -> Option<Json> {
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
    loop {
        let parts = std::iter::once(peer_id.as_bytes().to_vec()).chain(frames.iter().cloned());
        match send.send_multipart(parts, zmq::DONTWAIT) {
            Ok(()) => break,
            Err(zmq::Error::EHOSTUNREACH | zmq::Error::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(zmq::Error::EHOSTUNREACH | zmq::Error::EAGAIN) => return None,
            Err(e) => panic!("send: {e}"),
        }
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

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn only_clients_in_allowed_clients_get_an_answer() {
    let t = topology("acl");
    let agent = Agent::start(
        &t.srv,
        "rpc:\n  bind: 0.0.0.0\n  advertise: 127.0.0.1\n  allowed_clients: [127.0.0.0/8, 10.41.0.0/24]\n",
    )
    .unwrap_or_else(|log| panic!("agent did not start:\n{log}"));
    let id = agent.routing_id();
    let port = agent.port;

    let answer = t.good.run(|| status_call("10.41.0.2", &format!("tcp://10.41.0.1:{port}"), &id, None, ANSWER_WAIT));
    let answer = answer.unwrap_or_else(|| panic!("an allowed client got no answer; agent log:\n{}", agent.log()));
    assert_eq!(answer["agent"], "lymph-chaos", "{answer}");

    let refused = t.bad.run(|| status_call("10.42.0.2", &format!("tcp://10.42.0.1:{port}"), &id, None, REFUSED_WAIT));
    assert!(refused.is_none(), "a client outside rpc.allowed_clients got an answer: {refused:?}");
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("RPC connection rejected") && l.contains("10.42.0.2")),
        "the rejection is not logged:\n{log}"
    );
    // The agent's own loopback address is allowed; the good client still is after the refusal.
    assert!(t.srv.run(|| status_call("127.0.0.1", &id, &id, None, ANSWER_WAIT)).is_some());
    assert!(
        t.good.run(|| status_call("10.41.0.2", &format!("tcp://10.41.0.1:{port}"), &id, None, ANSWER_WAIT)).is_some()
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn without_an_allowlist_a_non_loopback_bind_refuses_to_start_and_a_loopback_one_answers_only_this_host() {
    let t = topology("open");
    let log = Agent::start(&t.srv, "rpc:\n  bind: 0.0.0.0\n  advertise: 127.0.0.1\n  allowed_clients: []\n")
        .err()
        .expect("an agent bound to 0.0.0.0 without allowed_clients started");
    assert!(log.contains("rpc.allowed_clients is empty"), "{log}");
    let agent = Agent::start(&t.srv, "rpc:\n  bind: 127.0.0.1\n").unwrap_or_else(|log| panic!("{log}"));
    let id = agent.routing_id();
    assert!(t.srv.run(|| status_call("127.0.0.1", &id, &id, None, ANSWER_WAIT)).is_some());
}

fn write_secret_key(dir: &Path, secret: &[u8; 32]) -> PathBuf {
    let path = dir.join("agent.key");
    std::fs::write(&path, format!("{}\n", zmq::z85_encode(secret).unwrap())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn with_curve_only_the_listed_client_key_gets_an_answer() {
    let t = topology("curve");
    let dir = tempfile::tempdir().unwrap();
    if zmq::has("curve") != Some(true) {
        // The agent must not run unauthenticated when CURVE is asked for.
        let key = write_secret_key(dir.path(), &[7; 32]);
        let config = format!("rpc:\n  bind: 0.0.0.0\n  curve_secret_key_file: {}\n", key.display());
        match Agent::start(&t.srv, &config) {
            Ok(agent) => panic!("an agent configured for CURVE runs without it; log:\n{}", agent.log()),
            Err(log) => assert!(log.contains("CURVE"), "the refusal does not name CURVE:\n{log}"),
        }
        println!(
            "SKIPPED (CURVE handshakes): this build's libzmq has no CURVE (zmq-sys vendors libzmq without \
             libsodium); checked instead that an agent configured for CURVE refuses to start"
        );
        return;
    }
    let server = zmq::CurveKeyPair::new().unwrap();
    let allowed = zmq::CurveKeyPair::new().unwrap();
    let stranger = zmq::CurveKeyPair::new().unwrap();
    let key = write_secret_key(dir.path(), &server.secret_key);
    let config = format!(
        "rpc:\n  bind: 0.0.0.0\n  advertise: 127.0.0.1\n  curve_secret_key_file: {}\n  curve_client_keys: [\"{}\"]\n",
        key.display(),
        zmq::z85_encode(&allowed.public_key).unwrap()
    );
    let agent = Agent::start(&t.srv, &config).unwrap_or_else(|log| panic!("agent did not start:\n{log}"));
    let (id, port) = (agent.routing_id(), agent.port);
    let target = format!("tcp://10.41.0.1:{port}");
    let call = |curve: Option<Curve>, wait: Duration| {
        let (target, id) = (target.clone(), id.clone());
        t.good.run(move || status_call("10.41.0.2", &target, &id, curve.as_ref(), wait))
    };
    let keys = |pair: &zmq::CurveKeyPair, server_public: [u8; 32]| Curve {
        server_public,
        public: pair.public_key,
        secret: pair.secret_key,
    };
    assert!(call(None, REFUSED_WAIT).is_none(), "a client without CURVE got an answer");
    assert!(call(Some(keys(&stranger, server.public_key)), REFUSED_WAIT).is_none(), "an unlisted key got an answer");
    assert!(call(Some(keys(&allowed, stranger.public_key)), REFUSED_WAIT).is_none(), "a wrong server key worked");
    let answer = call(Some(keys(&allowed, server.public_key)), ANSWER_WAIT);
    assert!(answer.is_some_and(|a| a["agent"] == "lymph-chaos"), "the listed key got no answer; log:\n{}", agent.log());
}
