//! The network fault engine on the host kernel, each test in fresh network namespaces:
//! steering by port for IPv4/IPv6, blackhole, rate limits on egress and ingress, the
//! operator's root qdisc left alone, in-kernel expiry, cleanup after SIGKILL, churn, and the clear error of a
//! kernel without netem.
//!
//! Topology: `srv` runs the services (and the engine), `cli` is a remote caller over a veth pair
//! (`10.<n>.0.1` = srv, `10.<n>.0.2` = cli, and `fd00:<n>::1/2`).

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chaos_agent::faults::network::{
    Direction, Impairment, LatencyBackend, NetConfig, NetError, NetworkEngine, PortMatch, Protocol,
};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, EchoProcess},
    measure::EchoServer,
    netns::Netns,
};
use serde_json::json;

fn net_config(dir: &std::path::Path) -> NetConfig {
    static N: AtomicU64 = AtomicU64::new(0);
    NetConfig {
        pin_dir: Some(
            format!("/sys/fs/bpf/chaos-nt-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)).into(),
        ),
        state_file: dir.join("network.json"),
        ifb_name: "lchaos0".into(),
        interfaces: None,
        max_packets_per_sec: 100_000,
    }
}

fn to(port: u16) -> PortMatch {
    PortMatch::new(port, Protocol::Tcp, Direction::To)
}

fn observe() -> Impairment {
    Impairment { observe: true, ..Default::default() }
}

/// One short request/response over a fresh connection; `Err` when it cannot complete within `timeout`.
fn exchange(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    Ok(())
}

fn two_hosts(tag: &str, net: u8) -> (Netns, Netns) {
    let srv = Netns::new(&format!("{tag}s"));
    let cli = Netns::new(&format!("{tag}c"));
    srv.veth_to(&cli, net).expect("veth pair");
    (srv, cli)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn classifier_loads_and_counts_only_the_chosen_port_v4_v6_local_and_remote() {
    let (srv, cli) = two_hosts("steer", 31);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (7101u16, 7102u16);
    // `[::]` without IPV6_V6ONLY takes IPv4 too.
    let servers = srv.run(|| [a, b].map(|p| EchoServer::start(addr(&format!("[::]:{p}"))).unwrap()));
    srv.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), true).await.expect("engine");
        let ha = engine.apply("obs-a", &[to(a)], &observe(), Duration::from_secs(60)).await.expect("rule on A");
        let hb = engine.apply("obs-b", &[to(b)], &observe(), Duration::from_secs(60)).await.expect("rule on B");
        // Local callers (lo egress) over IPv4 and IPv6.
        tokio::task::spawn_blocking(move || {
            exchange(addr(&format!("127.0.0.1:{a}")), Duration::from_secs(2)).unwrap();
            exchange(addr(&format!("[::1]:{a}")), Duration::from_secs(2)).unwrap();
        })
        .await
        .unwrap();
        let local = engine.counters(&ha).await;
        assert!(local.packets >= 4, "A's counter did not move for local v4+v6 traffic: {local:?}");
        assert_eq!(engine.counters(&hb).await.packets, 0, "B counted traffic that went to A");
        assert_eq!(local.drops, 0);
        engine.cleanup().await.unwrap();
    });
    drop(servers);
    // Remote callers (veth ingress): a fresh engine, traffic from the other namespace.
    let servers = srv.run(|| [a, b].map(|p| EchoServer::start(addr(&format!("[::]:{p}"))).unwrap()));
    srv.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), true).await.expect("engine");
        let ha = engine.apply("obs-a", &[to(a)], &observe(), Duration::from_secs(60)).await.unwrap();
        let hb = engine.apply("obs-b", &[to(b)], &observe(), Duration::from_secs(60)).await.unwrap();
        let before = engine.counters(&ha).await.packets;
        cli.run(|| {
            exchange(addr(&format!("10.31.0.1:{a}")), Duration::from_secs(2)).unwrap();
            exchange(addr(&format!("[fd00:31::1]:{a}")), Duration::from_secs(2)).unwrap();
        });
        let remote = engine.counters(&ha).await;
        assert!(remote.packets >= before + 4, "A's counter did not move for remote v4+v6 traffic: {remote:?}");
        assert_eq!(engine.counters(&hb).await.packets, 0, "B counted traffic that went to A");
        let attached = engine.attached().await;
        assert!(attached.contains(&"lo".to_owned()) && attached.contains(&"veth0".to_owned()), "{attached:?}");
        engine.cleanup().await.unwrap();
    });
    drop(servers);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn blackhole_times_out_one_port_while_the_other_works_and_revert_restores_it_at_once() {
    let ns = Netns::new("bh");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (7201u16, 7202u16);
    let _servers = ns.run(|| [a, b].map(|p| EchoServer::start(addr(&format!("127.0.0.1:{p}"))).unwrap()));
    ns.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), true).await.unwrap();
        let bh = Impairment { blackhole: true, ..Default::default() };
        let h = engine.apply("bh-a", &[to(a)], &bh, Duration::from_secs(60)).await.unwrap();
        let (ra, rb) = tokio::task::spawn_blocking(move || {
            (
                exchange(addr(&format!("127.0.0.1:{a}")), Duration::from_millis(800)),
                exchange(addr(&format!("127.0.0.1:{b}")), Duration::from_secs(2)),
            )
        })
        .await
        .unwrap();
        assert!(ra.is_err(), "A answered through a blackhole");
        rb.expect("B must keep working during A's blackhole");
        assert!(engine.counters(&h).await.drops > 0, "the blackhole dropped nothing");
        engine.revert(&h).await.unwrap();
        let started = Instant::now();
        tokio::task::spawn_blocking(move || exchange(addr(&format!("127.0.0.1:{a}")), Duration::from_secs(2)))
            .await
            .unwrap()
            .expect("A after revert");
        assert!(started.elapsed() < Duration::from_millis(500), "A took {:?} after the revert", started.elapsed());
        engine.cleanup().await.unwrap();
    });
}

/// Receives everything sent to it and reports bytes/second.
fn sink(listener: TcpListener) -> std::thread::JoinHandle<(u64, Duration)> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        let mut first = None;
        loop {
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            total += n as u64;
        }
        (total, first.map_or(Duration::ZERO, |f| f.elapsed()))
    })
}

fn upload(target: SocketAddr, bytes: usize) {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let chunk = vec![7u8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// Measured rate (bytes/s) of a 4 MiB upload to `port`, from `client` to `target_ip`.
fn measure_upload(srv: &Netns, client: &Netns, listen: &str, target: &str) -> f64 {
    let listener = srv.run(|| TcpListener::bind(addr(listen)).unwrap());
    let handle = sink(listener);
    client.run(|| upload(addr(target), 4 << 20));
    let (bytes, took) = handle.join().unwrap();
    assert_eq!(bytes, 4 << 20);
    bytes as f64 / took.as_secs_f64()
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn rate_limit_holds_a_4_mib_transfer_to_the_set_rate_on_egress_and_ingress() {
    let (srv, cli) = two_hosts("rate", 32);
    let tmp = tempfile::tempdir().unwrap();
    let rate: u64 = 2_000_000; // 16 Mbit/s
    let (a, b) = (7301u16, 7302u16);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // The engine lives on a thread in `srv`; transfers run from their own threads.
    let engine = srv.run(|| rt.block_on(async { NetworkEngine::start(net_config(tmp.path()), true).await.unwrap().0 }));
    let engine = Arc::new(engine);
    let imp = Impairment { rate_bytes_per_sec: Some(rate), ..Default::default() };
    let handle = srv.run(|| rt.block_on(engine.apply("rate-a", &[to(a)], &imp, Duration::from_secs(120)))).unwrap();

    let egress = measure_upload(&srv, &srv, &format!("127.0.0.1:{a}"), &format!("127.0.0.1:{a}"));
    let ingress = measure_upload(&srv, &cli, &format!("0.0.0.0:{a}"), &format!("10.32.0.1:{a}"));
    let free = measure_upload(&srv, &cli, &format!("0.0.0.0:{b}"), &format!("10.32.0.1:{b}"));
    let counters = srv.run(|| rt.block_on(engine.counters(&handle)));
    println!(
        "rate limit {:.2} MB/s: egress (lo) {:.2} MB/s, ingress (veth) {:.2} MB/s, unaffected port {:.2} MB/s; {counters:?}",
        rate as f64 / 1e6,
        egress / 1e6,
        ingress / 1e6,
        free / 1e6
    );
    for (name, got) in [("egress", egress), ("ingress", ingress)] {
        let ratio = got / rate as f64;
        assert!((0.8..=1.2).contains(&ratio), "{name}: {got:.0} B/s is {ratio:.2} × the set rate");
    }
    assert!(free > rate as f64 * 3.0, "port B was slowed too: {free:.0} B/s");
    srv.run(|| rt.block_on(engine.cleanup())).unwrap();
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn the_operators_root_qdisc_is_never_replaced_or_deleted() {
    let (srv, cli) = two_hosts("qdisc", 33);
    let tmp = tempfile::tempdir().unwrap();
    srv.tc(&["qdisc", "add", "dev", "veth0", "root", "handle", "7:", "htb", "default", "1"]);
    srv.tc(&["class", "add", "dev", "veth0", "parent", "7:", "classid", "7:1", "htb", "rate", "1gbit"]);
    let root_before = srv.tc(&["qdisc", "show", "dev", "veth0", "root"]);
    assert!(root_before.contains("htb 7: root"), "{root_before}");
    let a = 7401u16;
    let _server = srv.run(|| EchoServer::start(addr(&format!("0.0.0.0:{a}"))).unwrap());
    srv.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), true).await.unwrap();
        let rate = Impairment { rate_bytes_per_sec: Some(1_000_000), ..Default::default() };
        let h1 = engine.apply("r", &[to(a)], &rate, Duration::from_secs(60)).await.unwrap();
        let bh = Impairment { blackhole: true, ..Default::default() };
        let h2 = engine
            .apply("b", &[PortMatch::new(7402, Protocol::Both, Direction::Both)], &bh, Duration::from_secs(60))
            .await
            .unwrap();
        let during = srv.tc(&["qdisc", "show", "dev", "veth0", "root"]);
        assert!(during.contains("htb 7: root"), "root qdisc changed while faults were active: {during}");
        cli.run(|| exchange(addr(&format!("10.33.0.1:{a}")), Duration::from_secs(2))).unwrap();
        engine.revert(&h1).await.unwrap();
        engine.revert(&h2).await.unwrap();
        engine.cleanup().await.unwrap();
    });
    let after = srv.tc(&["qdisc", "show", "dev", "veth0", "root"]);
    assert!(after.contains("htb 7: root"), "root qdisc gone after cleanup: {after}");
    let classes = srv.tc(&["class", "show", "dev", "veth0"]);
    assert!(classes.contains("class htb 7:1"), "the operator's class is gone: {classes}");
    // Our clsact was ours to remove; the operator's qdisc stays.
    let all = srv.tc(&["qdisc", "show", "dev", "veth0"]);
    assert!(!all.contains("clsact"), "clsact we created was left behind: {all}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn expired_rules_stop_matching_in_the_kernel_without_the_agent() {
    let ns = Netns::new("expiry");
    let tmp = tempfile::tempdir().unwrap();
    let a = 7501u16;
    let _server = ns.run(|| EchoServer::start(addr(&format!("127.0.0.1:{a}"))).unwrap());
    let config = net_config(tmp.path());
    let pin_dir = config.pin_dir.clone().unwrap();
    let applied = ns.block_on(|| async {
        let (engine, _) = NetworkEngine::start(config, true).await.unwrap();
        let bh = Impairment { blackhole: true, ..Default::default() };
        engine.apply("bh", &[to(a)], &bh, Duration::from_secs(2)).await.unwrap();
        // "The agent dies": nothing of the engine runs any more; the filter keeps the program and maps alive.
        std::mem::forget(engine);
        Instant::now()
    });
    let target = addr(&format!("127.0.0.1:{a}"));
    let blocked = ns.run(|| exchange(target, Duration::from_millis(500)));
    assert!(blocked.is_err(), "the blackhole was not active");
    std::thread::sleep(Duration::from_secs(2).saturating_sub(applied.elapsed()) + Duration::from_millis(200));
    // The rule is still in the map and the filter still attached: only the program's expiry check lets A through.
    let filters = ns.tc(&["filter", "show", "dev", "lo", "egress"]);
    assert!(filters.contains("lymph-chaos:chaos_egress"), "filter vanished: {filters}");
    assert!(pin_dir.join("CHAOS_RULES").exists());
    ns.run(|| exchange(target, Duration::from_secs(1))).expect("A still blocked after the rule's lifetime");
    let _ = std::fs::remove_dir_all(pin_dir);
}

fn agent_objects(ns: &Netns, pin_dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for dev in ["lo", "veth0"] {
        for hook in ["ingress", "egress"] {
            let out = ns.exec("tc", &["filter", "show", "dev", dev, hook]);
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("lymph-chaos:") {
                found.push(format!("filter on {dev} {hook}"));
            }
        }
        let q = ns.tc(&["qdisc", "show", "dev", dev]);
        if q.contains("clsact") {
            found.push(format!("clsact on {dev}"));
        }
    }
    let links = String::from_utf8_lossy(&ns.ip(&["-o", "link"]).unwrap().stdout).into_owned();
    if links.contains("lchaos0") {
        found.push("IFB lchaos0".into());
    }
    if std::fs::read_dir(pin_dir).is_ok_and(|mut d| d.next().is_some()) {
        found.push(format!("pins in {}", pin_dir.display()));
    }
    found
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_sigkilled_agent_loses_its_faults_on_time_and_a_restart_leaves_nothing_behind() {
    let (srv, _cli) = two_hosts("kill9", 34);
    let a = 7601u16;
    // The service is a process of its own: the agent never targets its own parent (this test).
    let _server = EchoProcess::start(&srv, a);
    // 7602 has no listener: the administrator allows faults on such ports.
    let config = format!("faults: {{allowed_processes: [\"{}\"], allow_unbound_ports: true}}\n", EchoProcess::MARKER);
    let mut agent =
        AgentProcess::start(Some(&srv), AgentOptions { config_yaml: config.clone(), ..Default::default() }).unwrap();
    let pin_dir = agent.pin_dir.clone();
    agent.ok("inject", json!({"kind": "blackhole", "port": a, "lifetime": 3}));
    agent.ok("inject", json!({"kind": "rate", "port": 7602, "rate": "1mbit", "lifetime": 60}));
    let applied = Instant::now();
    assert!(!agent_objects(&srv, &pin_dir).is_empty());
    let state_dir = agent.state_dir.clone();
    agent.kill9();
    let target = addr(&format!("127.0.0.1:{a}"));
    assert!(srv.run(|| exchange(target, Duration::from_millis(500))).is_err(), "fault gone right after the SIGKILL");
    std::thread::sleep(Duration::from_secs(3).saturating_sub(applied.elapsed()) + Duration::from_millis(300));
    srv.run(|| exchange(target, Duration::from_secs(1))).expect("the 3 s fault outlived its lifetime");
    // Restart on the same state: every object of the dead run is removed before the new one serves.
    let mut restarted = AgentProcess::start(
        Some(&srv),
        AgentOptions {
            config_yaml: config,
            state_dir: Some(state_dir),
            pin_dir: Some(pin_dir.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let status = restarted.ok("status", json!({}));
    assert_eq!(status["network"]["rules"], 0, "{status}");
    let leftovers: Vec<String> =
        agent_objects(&srv, &restarted.pin_dir).into_iter().filter(|o| !o.starts_with("pins")).collect();
    assert!(leftovers.is_empty(), "objects of the killed run survived the restart: {leftovers:?}");
    assert!(restarted.stop(), "the agent did not stop on SIGTERM");
    let after = agent_objects(&srv, &restarted.pin_dir);
    assert!(after.is_empty(), "objects left after a clean stop: {after:?}");
    assert!(agent_objects(&srv, &pin_dir).is_empty());
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn serial_ten_thousand_rule_changes_never_disturb_another_port() {
    let ns = Netns::new("churn");
    let tmp = tempfile::tempdir().unwrap();
    let b = 7702u16;
    let _server = ns.run(|| EchoServer::start(addr(&format!("127.0.0.1:{b}"))).unwrap());
    let fds_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
    // Traffic on B for the whole run: one long-lived connection, request/response in a loop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let conn = ns.run(|| TcpStream::connect(addr(&format!("127.0.0.1:{b}"))).unwrap());
    let traffic = {
        let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
        std::thread::spawn(move || {
            let mut conn = conn;
            conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                let r = conn.write_all(&[1u8; 64]).and_then(|()| conn.read_exact(&mut buf));
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let (cycles, took, objects) = ns.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), true).await.unwrap();
        let started = Instant::now();
        let mut cycles = 0;
        for i in 0..10_000u32 {
            let port = 20_000 + (i % 5000) as u16;
            let imp = match i % 100 {
                0 => Impairment { rate_bytes_per_sec: Some(1_000_000), ..Default::default() },
                n if n % 2 == 0 => Impairment { blackhole: true, ..Default::default() },
                _ => Impairment { loss_percent: 50.0, ..Default::default() },
            };
            let m = PortMatch::new(port, Protocol::Both, Direction::Both);
            let h = engine.apply(&format!("c{i}"), &[m], &imp, Duration::from_secs(60)).await.unwrap();
            engine.revert(&h).await.unwrap();
            cycles += 1;
        }
        let took = started.elapsed();
        let objects = (engine.rule_count().await, ns.tc(&["class", "show", "dev", "lchaos0"]));
        engine.cleanup().await.unwrap();
        (cycles, took, objects)
    });
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    println!(
        "{cycles} add/remove cycles in {:.2} s ({:.1} µs/cycle); port B: {} exchanges, {} errors",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / f64::from(cycles),
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0, "port B saw errors or resets during the churn");
    assert!(ok.load(Ordering::Relaxed) > 100, "hardly any traffic on B");
    assert_eq!(objects.0, 0, "rules leaked in the map");
    assert!(objects.1.trim().is_empty(), "IFB classes leaked: {}", objects.1);
    let fds_after = std::fs::read_dir("/proc/self/fd").unwrap().count();
    // nextest runs every test in a process of its own, so the process's fd count is this test's alone.
    if std::env::var_os("NEXTEST").is_some() {
        assert!(fds_after <= fds_before + 4, "fds leaked: {fds_before} → {fds_after}");
    } else {
        eprintln!("NOTE: fd leak check needs a process per test (cargo-nextest); other tests share this process");
    }
}

/// Whether the kernel has a qdisc (`sch_netem` …), asked through `tc` (iproute2, not our netlink code) on the
/// loopback device of a namespace of its own, which is deleted afterwards.
fn kernel_has(module: &str) -> bool {
    let kind = module.trim_start_matches("sch_");
    let ns = Netns::new("qdisc");
    let mut args = vec!["qdisc", "add", "dev", "lo", "root", "handle", "1:", kind];
    if kind == "tbf" {
        args.extend_from_slice(&["rate", "1mbit", "burst", "10k", "latency", "50ms"]);
    }
    ns.exec("tc", &args).status.success()
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn latency_without_netem_fails_clearly_and_leaves_nothing_half_applied() {
    let ns = Netns::new("netem");
    let tmp = tempfile::tempdir().unwrap();
    let (has_netem, has_fq) = (kernel_has("sch_netem"), kernel_has("sch_fq"));
    ns.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), true).await.unwrap();
        let imp = Impairment { delay: Duration::from_millis(100), ..Default::default() };
        let result = engine.apply("lat", &[to(7801)], &imp, Duration::from_secs(30)).await;
        match result {
            Err(NetError::NetemMissing) => {
                assert!(!has_netem && !has_fq, "a latency backend is available but the engine said none is");
                let msg = NetError::NetemMissing.to_string();
                assert!(
                    msg.contains("sch_netem") && msg.contains("sch_fq") && msg.contains("blackhole, loss and rate"),
                    "{msg}"
                );
                assert_eq!(engine.rule_count().await, 0, "a rule was left behind");
                let classes = ns.tc(&["class", "show", "dev", "lchaos0"]);
                assert!(classes.trim().is_empty(), "a class was left behind: {classes}");
                // Jitter alone is a delay too: the same error, nothing left.
                let jitter = Impairment { jitter: Duration::from_millis(5), ..Default::default() };
                let err = engine.apply("jit", &[to(7802)], &jitter, Duration::from_secs(30)).await.unwrap_err();
                assert!(matches!(err, NetError::NetemMissing), "{err}");
                // Faults that need no latency backend still work on the same engine.
                let bh = Impairment { blackhole: true, ..Default::default() };
                engine.apply("bh", &[to(7801)], &bh, Duration::from_secs(30)).await.expect("blackhole without netem");
                let rate = Impairment { rate_bytes_per_sec: Some(125_000), ..Default::default() };
                engine.apply("rate", &[to(7803)], &rate, Duration::from_secs(30)).await.expect("rate without netem");
            }
            Ok(handle) => {
                assert!(has_netem || has_fq, "latency applied on a kernel with neither sch_netem nor sch_fq?");
                let want = if has_netem { LatencyBackend::Netem } else { LatencyBackend::Edt };
                assert_eq!(handle.backend, Some(want));
                eprintln!("this kernel has a latency backend ({want:?}): applied (proven in detail by the VM tier)");
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
        engine.cleanup().await.unwrap();
    });
}

/// Through the agent: `status` and the `agent_start` event carry the probe's report, and a latency request on a
/// kernel with neither backend is a `KernelFeatureMissing` error naming both modules while loss still applies.
#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn the_agent_reports_its_latency_backend_and_refuses_latency_without_one() {
    let ns = Netns::new("backend");
    let _server = EchoProcess::start(&ns, 7811);
    let config = format!("faults: {{allowed_processes: [\"{}\"]}}\n", EchoProcess::MARKER);
    let agent = AgentProcess::start(Some(&ns), AgentOptions { config_yaml: config, ..Default::default() }).unwrap();
    let status = agent.ok("status", json!({}));
    let kernel = &status["network"]["kernel"];
    assert_eq!(kernel["qdiscs"]["netem"], kernel_has("sch_netem"), "{kernel}");
    assert_eq!(kernel["qdiscs"]["fq"], kernel_has("sch_fq"), "{kernel}");
    assert_eq!(kernel["qdiscs"]["htb"], true, "{kernel}");
    let start = agent.events().into_iter().find(|e| e["action"] == "agent_start").expect("an agent_start event");
    assert_eq!(&start["detail"]["network"]["kernel"], kernel, "agent_start and status disagree");
    if kernel_has("sch_netem") || kernel_has("sch_fq") {
        eprintln!(
            "this kernel has a latency backend ({}): the refusal is not testable here",
            kernel["latency_backend"]
        );
        return;
    }
    assert!(kernel["latency_backend"].is_null(), "{kernel}");
    match agent.call("inject_latency", json!({"port": 7811, "latency": 0.05, "lifetime": 10})) {
        Err(chaos_agent::rpc::ClientError::Remote { type_name, message }) => {
            assert_eq!(type_name, "KernelFeatureMissing");
            assert!(message.contains("sch_netem") && message.contains("sch_fq"), "{message}");
        }
        other => panic!("latency without a backend was not refused: {other:?}"),
    }
    assert!(agent.ok("faults", json!({})).as_array().unwrap().is_empty(), "the refused fault is active");
    let loss = agent.ok("inject", json!({"kind": "loss", "port": 7811, "loss": 30, "lifetime": 10}));
    assert_eq!(loss["state"], "active", "{loss}");
    assert!(loss.get("backend").is_none(), "a loss fault has no latency backend: {loss}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn the_kernel_probe_reports_what_the_kernel_has_and_leaves_nothing_behind() {
    let ns = Netns::new("probe");
    let tmp = tempfile::tempdir().unwrap();
    let links = || String::from_utf8_lossy(&ns.ip(&["-o", "link", "show"]).unwrap().stdout).into_owned();
    let before = (links(), ns.tc(&["qdisc", "show"]));
    ns.block_on(|| async {
        let (engine, _) = NetworkEngine::start(net_config(tmp.path()), false).await.unwrap();
        let caps = engine.capabilities().await;
        eprintln!("probed: {caps:?}");
        assert!(caps.ifb, "this kernel has ifb (vm-testing notes): {caps:?}");
        assert_eq!(caps.qdiscs.netem, kernel_has("sch_netem"), "{caps:?}");
        assert_eq!(caps.qdiscs.fq, kernel_has("sch_fq"), "{caps:?}");
        assert_eq!(caps.qdiscs.htb, kernel_has("sch_htb"), "{caps:?}");
        assert_eq!(caps.qdiscs.tbf, kernel_has("sch_tbf"), "{caps:?}");
        assert!(caps.qdiscs.clsact && caps.attach.clsact, "{caps:?}");
        assert!(caps.helpers.ktime_get_ns && caps.helpers.get_prandom_u32 && caps.helpers.get_hash_recalc, "{caps:?}");
        // This kernel (6.18) has both: they are part of every kernel since 5.18 and 6.6.
        assert!(caps.helpers.skb_set_tstamp && caps.attach.tcx, "{caps:?}");
        let expected = match (caps.qdiscs.netem, caps.qdiscs.fq) {
            (true, _) => Some(LatencyBackend::Netem),
            (false, true) => Some(LatencyBackend::Edt),
            (false, false) => None,
        };
        assert_eq!(caps.latency_backend, expected);
        assert!(caps.notes.is_empty(), "{:?}", caps.notes);
    });
    let after = (links(), ns.tc(&["qdisc", "show"]));
    assert_eq!(before, after, "the probe left something behind");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn an_expired_fault_is_removed_from_the_kernel_and_recorded() {
    let ns = Netns::new("expire");
    let _server = EchoProcess::start(&ns, 7901);
    let config = format!("faults: {{allowed_processes: [\"{}\"]}}\n", EchoProcess::MARKER);
    let agent = AgentProcess::start(Some(&ns), AgentOptions { config_yaml: config, ..Default::default() }).unwrap();
    let fault = agent.ok("inject", json!({"kind": "rate", "port": 7901, "rate": "1mbit", "lifetime": 1}));
    assert!(ns.tc(&["class", "show", "dev", "lchaos0"]).contains("c4a0:"), "no IFB class for the rate fault");
    assert_eq!(agent.ok("status", json!({}))["network"]["rules"], 2);
    chaos_test_support::eventually("an expiry event", Duration::from_secs(5), Duration::from_millis(100), || {
        agent.events().into_iter().any(|e| e["action"] == "expired" && e["fault"] == fault["id"])
    })
    .unwrap_or_else(|e| panic!("{e}; events: {:?}", agent.events()));
    assert!(agent.ok("faults", json!({})).as_array().unwrap().is_empty());
    assert_eq!(agent.ok("status", json!({}))["network"]["rules"], 0, "rules left in the map after expiry");
    let classes = ns.tc(&["class", "show", "dev", "lchaos0"]);
    assert!(classes.trim().is_empty(), "IFB class left after expiry: {classes}");
}
