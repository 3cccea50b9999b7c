//! The network engine on the device stacks of real hosts, each test in fresh network namespaces and against a
//! real agent process (`CHAOS_AGENT_BIN` runs them against another build): a fault's loss, shaping and counters
//! apply once per packet behind a bridge, a macvlan, a container-style veth-into-bridge layout and inside a VXLAN
//! tunnel; traffic the host forwards (routed, bridged, or handed to a container's macvlan) to another machine's
//! port is never touched by a fault on the same local port; the classifier follows 1,000 interfaces that come and
//! go, leaves nothing of them behind and covers the next one; an expired rule does not shadow a live one;
//! `protocol` and the rule's address follow the target's sockets; TCP loss is counted per wire segment.
//!
//! Loss is measured with numbered UDP datagrams from a client namespace to a sink in the agent's namespace
//! (2,000 per run: at 30 % the standard deviation is about one point, so 30 ± 5 % is five of them).

use std::{
    collections::HashSet,
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use chaos_test_support::eventually;
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, UdpProcess},
    netns::Netns,
};
use serde_json::{Value as Json, json};

const PACKETS: u32 = 2000;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// An agent in `ns`. These tests fault ports whose sinks and listeners live in other namespaces (containers,
/// forwarded traffic) or are not bound yet, which the agent refuses by default (it cannot check whose they are):
/// `faults.allow_unbound_ports` lets them through. UDP services bound here are [`UdpProcess`]es, which the agent
/// judges by their owner like any service (a socket of the test process itself would be the agent's parent's).
fn agent_in(ns: &Netns) -> AgentProcess {
    let yaml = format!("faults: {{allow_unbound_ports: true, allowed_processes: [\"{}\"]}}\n", UdpProcess::MARKER);
    let options = AgentOptions { config_yaml: yaml, ..AgentOptions::default() };
    AgentProcess::start(Some(ns), options).expect("agent")
}

/// What one UDP run saw.
#[derive(Debug, Clone, Copy)]
struct Run {
    sent: u32,
    received: u32,
}

impl Run {
    fn loss_pct(&self) -> f64 {
        f64::from(self.sent - self.received) * 100.0 / f64::from(self.sent)
    }
}

/// Sends `count` numbered datagrams from a socket of `from` to a sink bound to `to` inside `sink_ns`.
fn udp_run(sink_ns: &Netns, to: SocketAddr, from: &Netns, count: u32) -> Run {
    let sink = sink_ns.run(|| UdpSocket::bind(to)).expect("sink bind");
    sink.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let unspecified = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sender = from.run(|| UdpSocket::bind(unspecified)).expect("sender bind");
    let sending = Arc::new(AtomicBool::new(true));
    let reader = {
        let sending = Arc::clone(&sending);
        thread::spawn(move || {
            let mut seen = HashSet::new();
            let mut buf = [0u8; 64];
            let mut quiet: Option<Instant> = None;
            loop {
                match sink.recv(&mut buf) {
                    Ok(n) if n >= 4 => {
                        seen.insert(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                        quiet = None;
                    }
                    Ok(_) => {}
                    Err(_) if !sending.load(Ordering::Relaxed) => {
                        if quiet.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(400) {
                            break;
                        }
                    }
                    Err(_) => {}
                }
            }
            seen.len() as u32
        })
    };
    let mut sent = 0;
    while sent < count {
        for _ in 0..20.min(count - sent) {
            sender.send_to(&sent.to_be_bytes(), to).expect("send");
            sent += 1;
        }
        thread::sleep(Duration::from_millis(1));
    }
    sending.store(false, Ordering::Relaxed);
    Run { sent, received: reader.join().expect("reader") }
}

/// The fault's counters as the agent reports them: (packets, drops).
fn counters(agent: &AgentProcess, id: &str) -> (u64, u64) {
    let faults = agent.ok("faults", json!({}));
    let fault = faults.as_array().unwrap().iter().find(|f| f["id"] == id).cloned().unwrap_or(Json::Null);
    let c = &fault["counters"];
    (c["packets"].as_u64().unwrap_or(0), c["drops"].as_u64().unwrap_or(0))
}

fn inject(agent: &AgentProcess, args: Json) -> String {
    agent.ok("inject", args)["id"].as_str().expect("fault id").to_owned()
}

/// Loss 30 % on UDP port `port` of `srv` (the agent's namespace), measured from `cli` to `target`: the loss must
/// be 30 ± 5 % and the fault must have counted every datagram exactly once.
fn assert_loss_once(srv: &Netns, cli: &Netns, target: SocketAddr, layout: &str) -> AgentProcess {
    let agent = agent_in(srv);
    let id =
        inject(&agent, json!({"kind": "loss", "port": target.port(), "loss": 30, "protocol": "udp", "lifetime": 120}));
    let run = udp_run(srv, target, cli, PACKETS);
    let (packets, drops) = counters(&agent, &id);
    let loss = run.loss_pct();
    eprintln!(
        "{layout}: sent {} received {} loss {loss:.1} % counters packets {packets} drops {drops}",
        run.sent, run.received
    );
    assert!((25.0..=35.0).contains(&loss), "{layout}: loss {loss:.1} % is not 30 ± 5 % ({run:?})");
    assert_eq!(packets, u64::from(run.sent), "{layout}: the fault counted {packets} packets for {} sent", run.sent);
    assert_eq!(drops, u64::from(run.sent - run.received), "{layout}: drops {drops} for {run:?}");
    agent
}

fn both_up(ns: &Netns, devs: &[&str]) {
    for dev in devs {
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
}

fn address(ns: &Netns, dev: &str, v4: &str, v6: &str) {
    ns.ip(&["addr", "add", v4, "dev", dev]).unwrap();
    ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"]).unwrap();
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn loss_behind_a_bridge_is_applied_and_counted_once() {
    // srv: br0 (10.61.0.1) with port vp0; cli: veth1 (10.61.0.2), the other end of vp0.
    let srv = Netns::new("brs");
    let cli = Netns::new("brc");
    srv.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    srv.ip(&["link", "add", "vp0", "type", "veth", "peer", "name", "veth1", "netns", cli.name()]).unwrap();
    srv.ip(&["link", "set", "vp0", "master", "br0"]).unwrap();
    both_up(&srv, &["br0", "vp0"]);
    address(&srv, "br0", "10.61.0.1/24", "fd00:61::1/64");
    address(&cli, "veth1", "10.61.0.2/24", "fd00:61::2/64");
    both_up(&cli, &["veth1"]);
    let _agent = assert_loss_once(&srv, &cli, addr("10.61.0.1:17001"), "bridge");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn loss_behind_a_macvlan_is_applied_and_counted_once_and_a_containers_macvlan_is_untouched() {
    // srv: mv0 (macvlan, 10.62.0.1) on vp0; a container k with mv1 (10.62.0.3), a second macvlan on vp0;
    // cli: veth1 (10.62.0.2), the other end of vp0.
    let srv = Netns::new("mvs");
    let cli = Netns::new("mvc");
    let k = Netns::new("mvk");
    srv.ip(&["link", "add", "vp0", "type", "veth", "peer", "name", "veth1", "netns", cli.name()]).unwrap();
    srv.ip(&["link", "add", "mv0", "link", "vp0", "type", "macvlan", "mode", "bridge"]).unwrap();
    srv.ip(&["link", "add", "mv1", "link", "vp0", "type", "macvlan", "mode", "bridge"]).unwrap();
    srv.ip(&["link", "set", "mv1", "netns", k.name()]).unwrap();
    both_up(&srv, &["vp0", "mv0"]);
    address(&srv, "mv0", "10.62.0.1/24", "fd00:62::1/64");
    address(&k, "mv1", "10.62.0.3/24", "fd00:62::3/64");
    both_up(&k, &["mv1"]);
    address(&cli, "veth1", "10.62.0.2/24", "fd00:62::2/64");
    both_up(&cli, &["veth1"]);
    let port = 17002;
    let agent = assert_loss_once(&srv, &cli, addr(&format!("10.62.0.1:{port}")), "macvlan");
    let id = agent.ok("faults", json!({}))[0]["id"].as_str().unwrap().to_owned();
    let before = counters(&agent, &id);
    // The container's macvlan shares the host's lower device: its traffic on the same port is not the host's.
    let target = format!("10.62.0.3:{port}");
    let run = udp_run(&k, addr(&target), &cli, 500);
    assert_eq!(run.received, run.sent, "traffic to the container's macvlan {target} was touched: {run:?}");
    assert_eq!(counters(&agent, &id), before, "the fault counted the container's traffic");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn loss_to_the_host_from_a_container_on_its_bridge_is_once_and_container_traffic_is_untouched() {
    // host: br0 (10.63.0.1) with ports vk1, vk2; containers k1 (10.63.0.2) and k2 (10.63.0.3) behind them.
    let host = Netns::new("cth");
    let k1 = Netns::new("ctk1");
    let k2 = Netns::new("ctk2");
    host.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    for (port, k, v4, v6) in
        [(&"vk1", &k1, "10.63.0.2/24", "fd00:63::2/64"), (&"vk2", &k2, "10.63.0.3/24", "fd00:63::3/64")]
    {
        host.ip(&["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", k.name()]).unwrap();
        host.ip(&["link", "set", port, "master", "br0"]).unwrap();
        both_up(&host, &[port]);
        address(k, "eth0", v4, v6);
        both_up(k, &["eth0"]);
    }
    both_up(&host, &["br0"]);
    address(&host, "br0", "10.63.0.1/24", "fd00:63::1/64");
    let port = 17003;
    let agent = assert_loss_once(&host, &k1, addr(&format!("10.63.0.1:{port}")), "container on the host bridge");
    let id = agent.ok("faults", json!({}))[0]["id"].as_str().unwrap().to_owned();
    let before = counters(&agent, &id);
    // Container to container on the same port, across the host's bridge: not the host's traffic.
    for target in [format!("10.63.0.2:{port}"), format!("[fd00:63::2]:{port}")] {
        let run = udp_run(&k1, addr(&target), &k2, 500);
        assert_eq!(run.received, run.sent, "bridged container traffic to {target} was touched: {run:?}");
    }
    assert_eq!(counters(&agent, &id), before, "the fault counted bridged container traffic");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn traffic_forwarded_to_another_machines_port_is_untouched_by_a_fault_on_the_local_port() {
    // cli (10.64.0.2) ── router (10.64.0.1 | 10.65.0.1, the agent) ── far (10.65.0.2); the same for IPv6.
    let router = Netns::new("fwr");
    let cli = Netns::new("fwc");
    let far = Netns::new("fwf");
    router.veth_to(&cli, 64).unwrap();
    router.ip(&["link", "add", "vf0", "type", "veth", "peer", "name", "vf1", "netns", far.name()]).unwrap();
    address(&router, "vf0", "10.65.0.1/24", "fd00:65::1/64");
    address(&far, "vf1", "10.65.0.2/24", "fd00:65::2/64");
    both_up(&router, &["vf0"]);
    both_up(&far, &["vf1"]);
    for (ns, gw4, gw6) in [(&cli, "10.64.0.1", "fd00:64::1"), (&far, "10.65.0.1", "fd00:65::1")] {
        ns.ip(&["route", "add", "default", "via", gw4]).unwrap();
        ns.ip(&["-6", "route", "add", "default", "via", gw6]).unwrap();
    }
    for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        assert!(router.exec("sysctl", &["-qw", key]).status.success(), "sysctl {key}");
    }
    let port = 17004;
    let agent = agent_in(&router);
    let id = inject(
        &agent,
        json!({"kind": "blackhole", "port": port, "protocol": "udp", "direction": "both", "lifetime": 120}),
    );
    // The fault works on the router's own port …
    let local = udp_run(&router, addr(&format!("10.64.0.1:{port}")), &cli, 200);
    assert_eq!(local.received, 0, "the blackhole on the router's own port let packets through: {local:?}");
    let (packets, _) = counters(&agent, &id);
    assert_eq!(packets, 200);
    // … and never touches what the router forwards to the same port of another machine (after a first exchange
    // in each family, so neighbour discovery is done before counting).
    for target in [format!("10.65.0.2:{}", port + 10), format!("[fd00:65::2]:{}", port + 10)] {
        eventually(format_args!("a path from cli to {target}"), Duration::from_secs(10), Duration::ZERO, || {
            udp_run(&far, addr(&target), &cli, 5).received >= 5
        })
        .unwrap();
    }
    for target in [format!("10.65.0.2:{port}"), format!("[fd00:65::2]:{port}")] {
        let run = udp_run(&far, addr(&target), &cli, 500);
        eprintln!("forwarded to {target}: {run:?}, counters {:?}", counters(&agent, &id));
        assert_eq!(run.received, run.sent, "forwarded traffic to {target} was touched: {run:?}");
    }
    // Nor the replies of that machine, from its port P back through the router.
    let from_far = {
        let sink = cli.run(|| UdpSocket::bind("10.64.0.2:0")).unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let to = sink.local_addr().unwrap();
        let sender = far.run(|| UdpSocket::bind(format!("0.0.0.0:{port}"))).unwrap();
        sender.send_to(b"reply", to).unwrap();
        let mut buf = [0u8; 8];
        sink.recv(&mut buf).is_ok()
    };
    assert!(from_far, "a forwarded packet from the far machine's port {port} was dropped");
    assert_eq!(counters(&agent, &id).0, 200, "the fault counted forwarded traffic");
}

/// ifindexes in the agent's pinned interface map.
fn iface_map_entries(pin_dir: &Path) -> Vec<u32> {
    let data = aya::maps::MapData::from_pin(pin_dir.join(chaos_common::MAP_IFACES)).expect("pinned interface map");
    let map: aya::maps::HashMap<_, u32, [u8; 8]> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("hash map");
    let mut keys: Vec<u32> = map.keys().filter_map(Result::ok).collect();
    keys.sort_unstable();
    keys
}

fn link_indexes(ns: &Netns) -> Vec<u32> {
    let out = ns.ip(&["-o", "link"]).unwrap();
    let mut v: Vec<u32> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split(':').next()?.trim().parse().ok()).collect();
    v.sort_unstable();
    v
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_thousand_interfaces_that_come_and_go_leave_nothing_behind_and_the_next_one_is_covered() {
    let srv = Netns::new("chs");
    let cli = Netns::new("chc");
    let agent = agent_in(&srv);
    let port = 17006;
    let id = inject(&agent, json!({"kind": "observe", "port": port, "protocol": "udp", "lifetime": 300}));
    // 1,000 interfaces, each up for a moment (the way container veths come and go), in one `ip -batch`.
    let batch = agent.dir.path().join("churn.batch");
    let mut text = String::new();
    for i in 0..1000 {
        text.push_str(&format!(
            "link add ch{i} type veth peer name chp{i}\nlink set ch{i} up\nlink set chp{i} up\nlink del ch{i}\n"
        ));
    }
    std::fs::write(&batch, text).unwrap();
    let out = srv.exec("ip", &["-batch", batch.to_str().unwrap()]);
    assert!(out.status.success(), "ip -batch: {}", String::from_utf8_lossy(&out.stderr));
    // The next interface: a veth to a client, created after the churn; its traffic must be counted.
    srv.veth_to(&cli, 66).unwrap();
    eventually(
        "the classifier to attach to an interface created after the churn",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            String::from_utf8_lossy(&srv.exec("tc", &["filter", "show", "dev", "veth0", "ingress"]).stdout)
                .contains("lymph-chaos")
        },
    )
    .unwrap();
    let run = udp_run(&srv, addr(&format!("10.66.0.1:{port}")), &cli, 300);
    assert_eq!(run.received, run.sent);
    assert_eq!(counters(&agent, &id).0, 300, "traffic on the new interface was not counted exactly once");
    // Nothing of the 1,000 left: the interface map holds only interfaces that exist.
    let mut stale: Vec<u32> = Vec::new();
    let (entries, links) = eventually(
        "the interface map to hold only interfaces that exist",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let entries = iface_map_entries(&agent.pin_dir);
            let links = link_indexes(&srv);
            stale = entries.iter().copied().filter(|i| !links.contains(i)).collect();
            stale.is_empty().then_some((entries, links))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {} entries of deleted interfaces: {stale:?}", stale.len()));
    assert!(entries.len() <= links.len(), "{entries:?} vs links {links:?}");
    let status = agent.ok("status", json!({}));
    eprintln!("status network: {}", status["network"]);
}

/// Sends `count` datagrams from `from_port` to `to` on loopback inside `ns`; returns how many arrived.
fn udp_between_ports(ns: &Netns, from_port: u16, to: SocketAddr, count: u32) -> u32 {
    ns.run(|| {
        let sink = UdpSocket::bind(to).unwrap();
        sink.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let sender = UdpSocket::bind(SocketAddr::new(to.ip(), from_port)).unwrap();
        for i in 0..count {
            sender.send_to(&i.to_be_bytes(), to).unwrap();
        }
        let mut n = 0;
        let mut buf = [0u8; 8];
        while sink.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    })
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn an_expired_rule_for_the_destination_does_not_shadow_a_live_rule_for_the_source() {
    let ns = Netns::new("shadow");
    let (p, q) = (17011u16, 17012u16);
    let mut agent = agent_in(&ns);
    // A: observe packets to P for 2 s; B: blackhole packets from Q for a minute. A packet from Q to P is A's while
    // A lives (the destination rule is looked up first) and B's once A has expired.
    inject(&agent, json!({"kind": "observe", "port": p, "protocol": "udp", "lifetime": 2}));
    inject(&agent, json!({"kind": "blackhole", "port": q, "protocol": "udp", "direction": "from", "lifetime": 60}));
    let applied = Instant::now();
    // The kernel alone enforces lifetimes once the agent is gone (no removal of A's rules by the agent).
    agent.kill9();
    let to = addr(&format!("127.0.0.1:{p}"));
    assert_eq!(udp_between_ports(&ns, q, to, 20), 20, "A (observe) should take the packets while it lives");
    thread::sleep(Duration::from_secs(2).saturating_sub(applied.elapsed()) + Duration::from_millis(300));
    assert_eq!(udp_between_ports(&ns, q, to, 20), 0, "A's expired rule shadowed B's blackhole on the source port");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn protocol_defaults_to_what_the_port_listens_on_and_a_mismatch_is_reported() {
    let srv = Netns::new("protos");
    let cli = Netns::new("protoc");
    srv.veth_to(&cli, 67).unwrap();
    let agent = agent_in(&srv);
    let port = 17013;
    // A UDP service on the port (nothing on TCP): a loss fault without `protocol` must hit its datagrams.
    let service = UdpProcess::start(&srv, "0.0.0.0", port);
    let fault = agent.ok("inject", json!({"kind": "loss", "port": port, "loss": 30, "lifetime": 60}));
    let message = fault["message"].as_str().unwrap_or_default().to_owned();
    let id = fault["id"].as_str().unwrap().to_owned();
    drop(service);
    let run = udp_run(&srv, addr(&format!("10.67.0.1:{port}")), &cli, 1000);
    let (packets, drops) = counters(&agent, &id);
    assert_eq!(packets, 1000, "a loss fault on a UDP-only port did not match its datagrams ({message})");
    assert_eq!(drops, u64::from(run.sent - run.received));
    assert!(message.contains("udp"), "the reply does not say which protocol it matched: {message}");
    agent.ok("clear", json!({}));
    // An explicit protocol that nothing listens on is applied, and the reply says so.
    let _service = UdpProcess::start(&srv, "0.0.0.0", port);
    let fault =
        agent.ok("inject", json!({"kind": "loss", "port": port, "loss": 30, "protocol": "tcp", "lifetime": 60}));
    let message = fault["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("nothing listens on tcp port 17013") && message.contains("use protocol=udp"),
        "no warning for a tcp fault on a udp-only port: {message}"
    );
}

/// `Tcp: … RetransSegs …` of the namespace's `/proc/net/snmp` (through `thread-self`: the thread is in `ns`): (OutSegs, RetransSegs).
fn tcp_segments(ns: &Netns) -> (u64, u64) {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp")).unwrap();
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let names: Vec<&str> = rows[0].split_whitespace().collect();
    let values: Vec<&str> = rows[1].split_whitespace().collect();
    let get = |name: &str| values[names.iter().position(|n| *n == name).unwrap()].parse::<u64>().unwrap();
    (get("OutSegs"), get("RetransSegs"))
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn tcp_loss_is_counted_per_wire_segment_and_the_transfer_recovers() {
    // Loss is decided once per skb; counters are in wire segments (a GSO/GRO super-packet counts as its
    // segments). A TCP transfer from a remote caller through 10 % loss: the share of segments dropped is 10 % (±3)
    // of the segments to the port, the sender retransmits, and every byte arrives.
    let srv = Netns::new("tcpls");
    let cli = Netns::new("tcplc");
    srv.veth_to(&cli, 68).unwrap();
    let port = 17014;
    let agent = agent_in(&srv);
    // (The listener is this test's: bound after the fault, the agent would refuse to aim at its own parent.)
    let id = inject(&agent, json!({"kind": "loss", "port": port, "loss": 10, "protocol": "tcp", "lifetime": 120}));
    let listener = srv.run(|| std::net::TcpListener::bind(format!("10.68.0.1:{port}"))).unwrap();
    // 64 MiB: on this path a super-packet carries ~40 segments, so ~1,200 skbs are judged and the share of
    // segments lost has a standard deviation under one point.
    const BYTES: usize = 64 << 20;
    let reader = thread::spawn(move || {
        use std::io::Read;
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let (out0, re0) = tcp_segments(&cli);
    cli.run(|| {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(format!("10.68.0.1:{port}")).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(&vec![7u8; BYTES]).unwrap();
    });
    let received = reader.join().unwrap();
    let (out1, re1) = tcp_segments(&cli);
    let (packets, drops) = counters(&agent, &id);
    let share = drops as f64 * 100.0 / packets as f64;
    eprintln!(
        "tcp 10 %: {packets} segments to the port, {drops} dropped ({share:.1} %); sender: {} segments out, {} \
         retransmitted",
        out1 - out0,
        re1 - re0
    );
    assert_eq!(received, BYTES, "the transfer did not recover from the loss");
    assert!((7.0..=13.0).contains(&share), "segments dropped {share:.1} % of {packets}, not 10 ± 3 %");
    assert!(re1 - re0 >= drops / 2, "the sender retransmitted {} segments for {drops} dropped", re1 - re0);
    assert!(packets >= (out1 - out0) * 9 / 10, "counted {packets} segments, the sender sent {}", out1 - out0);
}

/// Packets the agent's IFB classes sent, summed (`tc -s class show dev lchaos0`).
fn ifb_class_packets(ns: &Netns) -> u64 {
    let text = ns.tc(&["-s", "class", "show", "dev", "lchaos0"]);
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("Sent ")?;
            let words: Vec<&str> = rest.split_whitespace().collect();
            words.get(2).and_then(|w| w.parse::<u64>().ok())
        })
        .sum()
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_shaping_fault_behind_a_bridge_shapes_each_packet_once() {
    // The IFB path (latency, rate) behind a bridge: each datagram must pass the fault's HTB class once, not once
    // at the bridge port and again at the bridge (which would add a delay twice or halve a rate).
    let srv = Netns::new("shbrs");
    let cli = Netns::new("shbrc");
    srv.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    srv.ip(&["link", "add", "vp0", "type", "veth", "peer", "name", "veth1", "netns", cli.name()]).unwrap();
    srv.ip(&["link", "set", "vp0", "master", "br0"]).unwrap();
    both_up(&srv, &["br0", "vp0"]);
    address(&srv, "br0", "10.69.0.1/24", "fd00:69::1/64");
    address(&cli, "veth1", "10.69.0.2/24", "fd00:69::2/64");
    both_up(&cli, &["veth1"]);
    let agent = agent_in(&srv);
    let port = 17015;
    let id =
        inject(&agent, json!({"kind": "rate", "port": port, "rate": "100mbit", "protocol": "udp", "lifetime": 120}));
    let before = ifb_class_packets(&srv);
    let run = udp_run(&srv, addr(&format!("10.69.0.1:{port}")), &cli, 500);
    let shaped = ifb_class_packets(&srv) - before;
    let (packets, _) = counters(&agent, &id);
    eprintln!(
        "bridge + rate: sent {} received {} counted {packets} through the IFB class {shaped}",
        run.sent, run.received
    );
    assert_eq!(run.received, run.sent, "a 100mbit rate limit lost datagrams: {run:?}");
    assert_eq!(packets, 500, "the fault counted {packets} packets for 500 sent");
    assert_eq!(shaped, 500, "the IFB class shaped {shaped} packets for 500 sent");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_socket_bound_to_one_address_gets_rules_on_that_address_only() {
    let srv = Netns::new("bounds");
    let cli = Netns::new("boundc");
    srv.veth_to(&cli, 70).unwrap();
    srv.ip(&["addr", "add", "10.70.0.5/24", "dev", "veth0"]).unwrap();
    let agent = agent_in(&srv);
    let port = 17016;
    // The service listens on 10.70.0.1 only; the host's other address 10.70.0.5 is not the service's.
    let service = UdpProcess::start(&srv, "10.70.0.1", port);
    let id = inject(&agent, json!({"kind": "observe", "port": port, "lifetime": 60}));
    drop(service);
    let run = udp_run(&srv, addr(&format!("10.70.0.1:{port}")), &cli, 200);
    assert_eq!(counters(&agent, &id).0, u64::from(run.sent), "traffic to the service's address was not counted");
    let other = udp_run(&srv, addr(&format!("10.70.0.5:{port}")), &cli, 200);
    assert_eq!(other.received, 200);
    assert_eq!(counters(&agent, &id).0, u64::from(run.sent), "traffic to another address of the host was counted");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn loss_inside_a_vxlan_tunnel_is_applied_once_to_the_inner_packets() {
    // srv and cli joined by a veth (the underlay, 10.71.0.x) and a VXLAN over it (10.72.0.x). The skb that
    // carried the outer packet through the underlay carries the inner one through vx0: the inner packet must be
    // judged at vx0 (the outer one matched nothing), once.
    let srv = Netns::new("vxs");
    let cli = Netns::new("vxc");
    srv.veth_to(&cli, 71).unwrap();
    for (ns, dev, local, remote, inner) in [
        (&srv, "veth0", "10.71.0.1", "10.71.0.2", "10.72.0.1/24"),
        (&cli, "veth1", "10.71.0.2", "10.71.0.1", "10.72.0.2/24"),
    ] {
        ns.ip(&[
            "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789", "local", local, "remote", remote,
            "dev", dev,
        ])
        .unwrap();
        ns.ip(&["addr", "add", inner, "dev", "vx0"]).unwrap();
        both_up(ns, &["vx0"]);
    }
    let _agent = assert_loss_once(&srv, &cli, addr("10.72.0.1:17017"), "vxlan");
}
