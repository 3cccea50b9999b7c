//! Peer faults on the host kernel: a fault between one caller and one service port, with another caller of the
//! same port at the same time left alone. Each test runs in fresh network namespaces with real kernel objects
//! (the classifier on clsact, the socket-owner programs on the cgroup v2 root).
//!
//! Callers are processes of their own (python3), because a caller on this host is recognised by its process:
//! - same host, over 127.0.0.1: the affected caller (by pid) is blocked on a connection it opened before the
//!   engine started (entered from `sock_diag`) and on one it opens after the fault started (recorded by
//!   `cgroup/connect4`); the unaffected caller keeps working on both; the fault expires in the kernel;
//! - remote (another namespace), by address: the caller from one address is blocked, a caller of the same host
//!   from another address is not;
//! - bad input changes nothing.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    process::{ChildStdin, ChildStdout, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use chaos_agent::faults::network::{Impairment, NetConfig, NetError, NetworkEngine, PeerMatch, PeerSender, Protocol};
use chaos_test_support::process::ChildGuard;
use chaos_tests::{measure::EchoServer, netns::Netns};

fn net_config(dir: &std::path::Path) -> NetConfig {
    static N: AtomicU64 = AtomicU64::new(0);
    NetConfig {
        pin_dir: Some(
            format!("/sys/fs/bpf/chaos-peer-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)).into(),
        ),
        state_file: dir.join("network.json"),
        ifb_name: "lchaos0".into(),
        interfaces: None,
        max_packets_per_sec: 100_000,
    }
}

fn blackhole() -> Impairment {
    Impairment { blackhole: true, ..Default::default() }
}

/// A caller process: on `old` it does one request/response on the connection it opened at start, on `new` on a
/// fresh connection; it answers `ok` or `err <why>` (each within `timeout`).
struct Caller {
    child: ChildGuard,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const CALLER: &str = r#"
import socket, sys
host, port, bind, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def connect():
    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if bind != '-':
        s.bind((bind, 0))
    s.connect((host, port))
    return s
def exchange(s):
    s.sendall(b'ping')
    got = b''
    while len(got) < 4:
        d = s.recv(4 - len(got))
        if not d:
            raise Exception('closed')
        got += d
old = connect()
print('ready', flush=True)
for line in sys.stdin:
    try:
        if line.strip() == 'old':
            exchange(old)
        else:
            s = connect(); exchange(s); s.close()
        print('ok', flush=True)
    except Exception as e:
        print('err', repr(e), flush=True)
"#;

impl Caller {
    /// Starts a caller of `target` in `ns` (source address `bind` when given) and waits until its first
    /// connection is open.
    fn start(ns: &Netns, target: SocketAddr, bind: Option<&str>) -> Caller {
        let mut cmd = ns.command("/usr/bin/python3");
        cmd.args(["-c", CALLER, &target.ip().to_string(), &target.port().to_string(), bind.unwrap_or("-"), "1.0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut caller = Caller { child: ChildGuard::new(child), stdin, stdout };
        assert_eq!(caller.line(), "ready", "caller did not connect");
        caller
    }

    fn pid(&self) -> u32 {
        self.child.pid() as u32
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("caller output");
        line.trim().to_owned()
    }

    /// `Ok` when the request/response completed.
    fn call(&mut self, which: &str) -> Result<(), String> {
        writeln!(self.stdin, "{which}").expect("caller input");
        let line = self.line();
        if line == "ok" { Ok(()) } else { Err(line) }
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_local_caller_is_cut_off_by_process_while_another_caller_of_the_same_port_works_until_expiry() {
    let ns = Netns::new("peerl");
    let tmp = tempfile::tempdir().unwrap();
    let port = 7311u16;
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _server = ns.run(|| EchoServer::start(target).unwrap());
    // Both callers connect before the engine (and its connect programs) exists: those sockets are found
    // through sock_diag when the fault starts.
    let mut affected = Caller::start(&ns, target, None);
    let mut other = Caller::start(&ns, target, None);
    ns.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), true).await.expect("engine");
        engine.sock_tracking().await.expect("socket-owner programs attached");
        let lifetime = Duration::from_secs(4);
        let peer = PeerMatch { sender: PeerSender::Process(affected.pid()), addr: None, port, protocol: Protocol::Tcp };
        let h = engine.apply_peer("peer-local", &[peer], &blackhole(), lifetime).await.expect("peer fault");
        let started = std::time::Instant::now();
        assert!(engine.peer_rule_count().await >= 2);
        let results = tokio::task::spawn_blocking(move || {
            let r = [affected.call("old"), affected.call("new"), other.call("old"), other.call("new")];
            (r, affected, other)
        })
        .await
        .unwrap();
        let ([a_old, a_new, o_old, o_new], mut affected, mut other) = results;
        assert!(a_old.is_err(), "the affected caller's connection from before the fault got through");
        assert!(a_new.is_err(), "a connection the affected caller opened after the fault started got through");
        o_old.expect("the other caller's connection must keep working");
        o_new.expect("a new connection of the other caller must work");
        assert!(engine.counters(&h).await.drops > 0, "the peer fault dropped nothing");
        // The rule expires in the kernel: wait past the lifetime, the affected caller gets through again.
        tokio::time::sleep((lifetime + Duration::from_millis(300)).saturating_sub(started.elapsed())).await;
        let (after, other_after) =
            tokio::task::spawn_blocking(move || (affected.call("new"), other.call("new"))).await.unwrap();
        after.expect("the affected caller after the fault's lifetime");
        other_after.expect("the other caller after the fault's lifetime");
        engine.revert(&h).await.unwrap();
        assert_eq!(engine.peer_rule_count().await, 0, "peer rules left after the revert");
        engine.cleanup().await.unwrap();
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_remote_caller_is_cut_off_by_address_while_another_address_of_the_same_host_works() {
    let srv = Netns::new("peerrs");
    let cli = Netns::new("peerrc");
    srv.veth_to(&cli, 37).expect("veth pair");
    cli.ip(&["addr", "add", "10.37.0.3/24", "dev", "veth1"]).expect("second address");
    let tmp = tempfile::tempdir().unwrap();
    let port = 7312u16;
    let _server = srv.run(|| EchoServer::start(format!("0.0.0.0:{port}").parse().unwrap()).unwrap());
    let target: SocketAddr = format!("10.37.0.1:{port}").parse().unwrap();
    let mut affected = Caller::start(&cli, target, Some("10.37.0.2"));
    let mut other = Caller::start(&cli, target, Some("10.37.0.3"));
    srv.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), true).await.expect("engine");
        let sender = PeerSender::Prefix { addr: "10.37.0.2".parse::<IpAddr>().unwrap(), len: 32 };
        let peer = PeerMatch { sender, addr: None, port, protocol: Protocol::Tcp };
        let h = engine.apply_peer("peer-remote", &[peer], &blackhole(), Duration::from_secs(60)).await.unwrap();
        let ([a_old, a_new, o_old, o_new], mut affected) = tokio::task::spawn_blocking(move || {
            ([affected.call("old"), affected.call("new"), other.call("old"), other.call("new")], affected)
        })
        .await
        .unwrap();
        assert!(a_old.is_err() && a_new.is_err(), "the remote caller got through: {a_old:?} {a_new:?}");
        o_old.expect("the other address's connection must keep working");
        o_new.expect("a new connection from the other address must work");
        assert!(engine.counters(&h).await.drops > 0);
        engine.revert(&h).await.unwrap();
        tokio::task::spawn_blocking(move || affected.call("new")).await.unwrap().expect("after the revert");
        // A whole prefix: both addresses are in 10.37.0.0/30.
        let sender = PeerSender::Prefix { addr: "10.37.0.0".parse().unwrap(), len: 30 };
        let peer = PeerMatch { sender, addr: None, port, protocol: Protocol::Tcp };
        let h = engine.apply_peer("peer-cidr", &[peer], &blackhole(), Duration::from_secs(60)).await.unwrap();
        let r = cli.run(|| std::net::TcpStream::connect_timeout(&target, Duration::from_millis(800)).map(|_| ()));
        assert!(r.is_err(), "a caller inside the prefix got through");
        engine.revert(&h).await.unwrap();
        engine.cleanup().await.unwrap();
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn bad_peer_input_is_refused_clearly_and_changes_nothing() {
    let ns = Netns::new("peerbad");
    let tmp = tempfile::tempdir().unwrap();
    ns.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), true).await.expect("engine");
        let bad = PeerMatch {
            sender: PeerSender::Prefix { addr: "10.0.0.0".parse().unwrap(), len: 33 },
            addr: None,
            port: 7313,
            protocol: Protocol::Tcp,
        };
        match engine.apply_peer("bad", &[bad], &blackhole(), Duration::from_secs(5)).await {
            Err(NetError::Invalid(why)) => assert!(why.contains("/33"), "{why}"),
            other => panic!("a /33 IPv4 prefix was not refused: {other:?}"),
        }
        match engine.apply_peer("empty", &[], &blackhole(), Duration::from_secs(5)).await {
            Err(NetError::Invalid(_)) => {}
            other => panic!("a peer fault without a sender was not refused: {other:?}"),
        }
        assert_eq!(engine.peer_rule_count().await, 0);
        assert_eq!(engine.rule_count().await, 0);
        engine.cleanup().await.unwrap();
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn the_agent_applies_a_peer_cidr_fault_refuses_bad_peers_without_changing_anything_and_expires_it() {
    use chaos_tests::agent::{AgentOptions, AgentProcess, EchoProcess};
    use serde_json::json;
    let srv = Netns::new("peeras");
    let cli = Netns::new("peerac");
    srv.veth_to(&cli, 38).expect("veth pair");
    cli.ip(&["addr", "add", "10.38.0.3/24", "dev", "veth1"]).expect("second address");
    let port = 7314u16;
    let _server = EchoProcess::start(&srv, port);
    let config = format!("faults: {{allowed_processes: [\"{}\"]}}\n", EchoProcess::MARKER);
    let agent = AgentProcess::start(Some(&srv), AgentOptions { config_yaml: config, ..Default::default() }).unwrap();
    let target: SocketAddr = format!("10.38.0.1:{port}").parse().unwrap();
    let mut affected = Caller::start(&cli, target, Some("10.38.0.2"));
    let mut other = Caller::start(&cli, target, Some("10.38.0.3"));
    // Bad input: a clear error, and nothing in the kernel.
    let bad = [
        (json!({"kind": "blackhole", "port": port, "peer": "NoSuchService"}), "NoSuchService"),
        (json!({"kind": "blackhole", "port": port, "peer_cidr": "10.38.0.0/40"}), "prefix length"),
        (json!({"kind": "blackhole", "port": port, "peer_cidr": "not-a-network"}), "not a network"),
        (json!({"kind": "blackhole", "port": port, "peer": "A", "peer_cidr": "10.0.0.0/8"}), "one of peer"),
        (json!({"kind": "blackhole", "port": port, "peer_cidr": "10.0.0.0/8", "direction": "from"}), "direction"),
    ];
    for (kwargs, words) in bad {
        match agent.call("inject", kwargs.clone()) {
            Err(e) => assert!(e.to_string().contains(words), "{kwargs}: {e}"),
            Ok(v) => panic!("{kwargs} was accepted: {v}"),
        }
    }
    let status = agent.ok("status", json!({}));
    assert_eq!((status["network"]["rules"].as_u64(), status["network"]["peer_rules"].as_u64()), (Some(0), Some(0)));
    assert!(agent.ok("faults", json!({})).as_array().unwrap().is_empty());
    // A real one: only the caller from 10.38.0.2.
    let fault =
        agent.ok("inject", json!({"kind": "blackhole", "port": port, "peer_cidr": "10.38.0.2/32", "lifetime": 3}));
    assert!(agent.ok("status", json!({}))["network"]["peer_rules"].as_u64().unwrap() >= 2);
    assert!(affected.call("new").is_err(), "the caller in the peer network got through");
    other.call("new").expect("a caller outside the peer network must work");
    other.call("old").expect("its old connection too");
    chaos_test_support::eventually(
        "the peer fault's expiry",
        Duration::from_secs(6),
        Duration::from_millis(100),
        || agent.events().into_iter().any(|e| e["action"] == "expired" && e["fault"] == fault["id"]),
    )
    .unwrap_or_else(|e| panic!("{e}; events: {:?}", agent.events()));
    assert_eq!(agent.ok("status", json!({}))["network"]["peer_rules"], 0, "peer rules left after expiry");
    affected.call("new").expect("the caller after the fault expired");
}

/// Ids of the programs behind the agent's cgroup BPF links (from `/proc/<pid>/fdinfo`).
fn cgroup_link_programs(pid: i32) -> Vec<u32> {
    let mut ids = Vec::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return ids };
    for entry in entries.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else { continue };
        let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()));
        if field("link_type:").as_deref() == Some("cgroup")
            && let Some(id) = field("prog_id:").and_then(|v| v.parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids
}

fn loaded(ids: &[u32]) -> Vec<u32> {
    let live: Vec<u32> = aya::programs::loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect();
    ids.iter().copied().filter(|id| live.contains(id)).collect()
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn the_socket_owner_programs_leave_the_cgroup_when_the_agent_stops_or_is_killed() {
    use chaos_tests::agent::{AgentOptions, AgentProcess};
    let ns = Netns::new("peercg");
    for kill in [true, false] {
        let mut agent = AgentProcess::start(Some(&ns), AgentOptions::default()).unwrap();
        let ids = cgroup_link_programs(agent.pid());
        assert_eq!(ids.len(), 4, "connect4/6 and sendmsg4/6 should be attached through four cgroup links: {ids:?}");
        assert_eq!(loaded(&ids), ids);
        let names: Vec<String> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| ids.contains(&p.id()))
            .filter_map(|p| p.name_as_str().map(str::to_owned))
            .collect();
        assert!(names.iter().all(|n| n.starts_with("chaos_connect") || n.starts_with("chaos_sendmsg")), "{names:?}");
        if kill {
            agent.kill9();
        } else {
            assert!(agent.stop(), "the agent did not stop on SIGTERM");
        }
        chaos_test_support::eventually(
            "the programs of the agent's cgroup links are gone",
            Duration::from_secs(5),
            Duration::from_millis(100),
            || loaded(&ids).is_empty(),
        )
        .unwrap_or_else(|e| panic!("{e} (kill -9: {kill}): still loaded {:?}", loaded(&ids)));
    }
}

const UDP_CALLER: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
print('ready', flush=True)
for line in sys.stdin:
    try:
        s.sendto(b'ping', (host, port))
        s.recvfrom(16)
        print('ok', flush=True)
    except Exception as e:
        print('err', repr(e), flush=True)
"#;

impl Caller {
    /// A caller that sends unconnected UDP datagrams (`sendto`) and waits for the echo.
    fn start_udp(ns: &Netns, target: SocketAddr) -> Caller {
        let mut cmd = ns.command("/usr/bin/python3");
        cmd.args(["-c", UDP_CALLER, &target.ip().to_string(), &target.port().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut caller = Caller { child: ChildGuard::new(child), stdin, stdout };
        assert_eq!(caller.line(), "ready");
        caller
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_local_udp_sender_without_connect_is_cut_off_by_process_while_another_sender_works() {
    let ns = Netns::new("peeru");
    let tmp = tempfile::tempdir().unwrap();
    let port = 7315u16;
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        ns.run(move || {
            let sock = std::net::UdpSocket::bind(target).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            })
        })
    };
    ns.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), true).await.expect("engine");
        let mut affected = Caller::start_udp(&ns, target);
        let mut other = Caller::start_udp(&ns, target);
        let peer = PeerMatch { sender: PeerSender::Process(affected.pid()), addr: None, port, protocol: Protocol::Udp };
        let h = engine.apply_peer("peer-udp", &[peer], &blackhole(), Duration::from_secs(60)).await.unwrap();
        let (a, o) = tokio::task::spawn_blocking(move || (affected.call("send"), other.call("send"))).await.unwrap();
        assert!(a.is_err(), "the affected UDP sender got an answer");
        o.expect("the other UDP sender must get its echo");
        assert!(engine.counters(&h).await.drops > 0);
        engine.cleanup().await.unwrap();
    });
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}
