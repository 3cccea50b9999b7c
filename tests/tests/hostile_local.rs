//! Hostile tier, local clients: any local user can reach an agent bound to loopback, so every request it can make
//! must stay bounded. Each test drives the real agent as that user would: stop signals as a "kill" (a pause with
//! no end), idle connections exhausting the agent's descriptors while a pause is due to end, huge strings in
//! refused requests growing the event log, the files the agent writes being readable by everyone, and bursts of
//! requests passing the cap on active faults together.

use std::{
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use chaos_test_support::{eventually, free_port};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, EchoProcess},
    hostile::{LocalUser, show},
    netns::Netns,
};
use serde_json::json;

fn agent(ns: &Netns) -> AgentProcess {
    let yaml = format!("faults: {{allowed_processes: [\"{}\"]}}\n", EchoProcess::MARKER);
    AgentProcess::start(
        Some(ns),
        AgentOptions { config_yaml: yaml, args: vec!["--no-network-control".into()], ..Default::default() },
    )
    .expect("agent")
}

fn state(pid: i32) -> char {
    chaos_test_support::proc_stat::state(pid).unwrap_or('?')
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_stop_signal_sent_as_a_kill_is_refused() {
    let ns = Netns::new("hstop");
    let user = LocalUser::new();
    let agent = agent(&ns);
    let victim = EchoProcess::start(&ns, ns.run(free_port));
    let pid = victim.pid().to_string();
    for signal in ["SIGSTOP", "20", "21", "22"] {
        let out = user.cli(Some(&ns), &agent, &["kill", "--pid", &pid, "--signal", signal]);
        std::thread::sleep(Duration::from_millis(200));
        let st = state(victim.pid());
        if st == 'T' {
            // Leave the victim running for the next attempt (and for cleanup).
            // SAFETY: our own child.
            unsafe { libc::kill(victim.pid(), libc::SIGCONT) };
        }
        assert_ne!(st, 'T', "kill --signal {signal} stopped the process with no end: {}", show(&out));
        assert!(!out.status.success(), "kill --signal {signal} was accepted: {}", show(&out));
    }
    let refused = agent.events().into_iter().filter(|e| e["action"] == "refused" && e["kind"] == "kill").count();
    assert_eq!(refused, 4, "{:?}", agent.events());
}

/// Sets this process's soft descriptor limit (the agent inherits it).
fn set_nofile_soft(soft: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard).unwrap();
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn idle_connections_do_not_keep_a_paused_process_stopped() {
    let ns = Netns::new("hfd");
    // The agent starts with the soft limit a shell gives (1024), as when started by hand.
    set_nofile_soft(1024);
    let metrics_port = ns.run(free_port);
    let yaml = format!(
        "faults: {{allowed_processes: [\"{}\"]}}\nmetrics_listen: 127.0.0.1:{metrics_port}\n",
        EchoProcess::MARKER
    );
    let agent = AgentProcess::start(
        Some(&ns),
        AgentOptions { config_yaml: yaml, args: vec!["--no-network-control".into()], ..Default::default() },
    )
    .expect("agent");
    set_nofile_soft(u64::MAX);
    let victim = EchoProcess::start(&ns, ns.run(free_port));
    agent.ok("inject", json!({"kind": "pause", "pid": victim.pid(), "lifetime": 3}));
    assert_eq!(state(victim.pid()), 'T', "the pause did not stop the victim");
    // The attacker: 1,100 idle connections to the RPC port and 1,100 to the metrics port.
    let port: u16 = agent.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let conns: Vec<std::net::TcpStream> = ns.run(|| {
        let mut v = Vec::new();
        for p in [port, metrics_port] {
            let (mut n, mut failures) = (0, 0);
            // A full backlog drops the handshake: retry a while, then go on with what is open.
            while n < 1100 && failures < 20 {
                match std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], p).into(), Duration::from_millis(200)) {
                    Ok(s) => {
                        v.push(s);
                        n += 1;
                    }
                    Err(_) => failures += 1,
                }
            }
        }
        v
    });
    let fds = std::fs::read_dir(format!("/proc/{}/fd", agent.pid())).map_or(0, |d| d.count());
    println!("{} connections open; the agent holds {fds} descriptors", conns.len());
    // The pause ends on time although the connections are still open.
    let resumed =
        eventually("the paused process to resume", Duration::from_secs(8), Duration::from_millis(100), || {
            state(victim.pid()) != 'T'
        });
    let st = state(victim.pid());
    if st == 'T' {
        // SAFETY: our own child; resume it so cleanup is clean.
        unsafe { libc::kill(victim.pid(), libc::SIGCONT) };
    }
    assert_ne!(
        st,
        'T',
        "the paused process stayed stopped after its lifetime ({resumed:?}); agent log:\n{}",
        agent.log_tail(20)
    );
    // And the agent still answers.
    assert!(agent.call("status", json!({})).is_ok(), "the agent stopped answering; log:\n{}", agent.log_tail(20));
    drop(conns);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn refused_requests_with_huge_strings_do_not_grow_the_event_log() {
    let ns = Netns::new("hevents");
    let agent = agent(&ns);
    // 24 requests, each naming a 600 kB service (under the 1 MiB body limit): all refused, all recorded.
    let name = "S".repeat(600 << 10);
    for _ in 0..24 {
        assert!(agent.call("inject", json!({"kind": "kill", "name": name})).is_err());
    }
    let events = agent.ok("events", json!({"limit": 10000}));
    let list = events.as_array().expect("a list");
    assert!(list.iter().filter(|e| e["action"] == "refused").count() >= 24, "refusals not all recorded");
    let bytes = events.to_string().len();
    assert!(bytes < 1 << 20, "24 refused requests hold {bytes} bytes of the event log");
    let file = std::fs::metadata(agent.dir.path().join("events.jsonl")).unwrap().len();
    assert!(file < 1 << 20, "24 refused requests wrote {file} bytes to the event file");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn the_journal_and_event_files_are_readable_by_root_only() {
    let ns = Netns::new("hfiles");
    let agent = agent(&ns);
    let victim = EchoProcess::start(&ns, ns.run(free_port));
    agent.ok("inject", json!({"kind": "pause", "pid": victim.pid(), "lifetime": 30}));
    for file in [agent.dir.path().join("events.jsonl"), agent.state_dir.join("journal.json")] {
        let mode = std::fs::metadata(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())).permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "{} has mode {:o}: others can read what the agent did",
            file.display(),
            mode & 0o777
        );
    }
    agent.ok("clear", json!({}));
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_local_user_cannot_stack_faults_without_bound() {
    let ns = Netns::new("hstack");
    let user = LocalUser::new();
    let agent = agent(&ns);
    // 70 light CPU faults (one worker at 1 % each), as the local user; each lasts longer than the 70 requests can
    // take on a busy machine, so none expires and frees its place before the last request.
    let mut accepted = 0;
    let mut refusal = String::new();
    for _ in 0..70 {
        let out = user.cli(Some(&ns), &agent, &["inject", "cpu", "workers=1", "load=1", "--lifetime", "600"]);
        if out.status.success() {
            accepted += 1;
        } else {
            refusal = String::from_utf8_lossy(&out.stderr).into_owned();
        }
    }
    let active = agent.ok("faults", json!({})).as_array().map_or(0, Vec::len);
    // Cleanup only (64 workers to stop take a while on a busy machine); the agent's shutdown reverts what is left.
    let _ = agent.call("clear", json!({}));
    assert!(accepted <= 64 && active <= 64, "{accepted} faults accepted, {active} active at once");
    assert!(refusal.contains("max_active"), "the refusal does not say why: {refusal}");
}

/// The same cap against requests sent all at once: each used to pass the count of active faults alone (a fault
/// became active only after it was applied), so a burst held far more faults than `faults.max_active` allows.
#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn concurrent_requests_cannot_pass_the_active_fault_cap_together() {
    const CAP: usize = 4;
    const REQUESTS: usize = 24;
    let ns = Netns::new("hburst");
    let user = LocalUser::new();
    let yaml = format!("faults: {{allowed_processes: [\"{}\"], max_active: {CAP}}}\n", EchoProcess::MARKER);
    let agent = AgentProcess::start(
        Some(&ns),
        AgentOptions { config_yaml: yaml, args: vec!["--no-network-control".into()], ..Default::default() },
    )
    .expect("agent");
    let accepted = std::thread::scope(|s| {
        let requests: Vec<_> = (0..REQUESTS)
            .map(|_| {
                s.spawn(|| {
                    let out =
                        user.cli(Some(&ns), &agent, &["inject", "cpu", "workers=1", "load=1", "--lifetime", "30"]);
                    out.status.success()
                })
            })
            .collect();
        requests.into_iter().map(|r| r.join()).filter(|r| matches!(r, Ok(true))).count()
    });
    let active = agent.ok("faults", json!({})).as_array().map_or(0, Vec::len);
    agent.ok("clear", json!({}));
    assert!(
        accepted <= CAP && active <= CAP,
        "{accepted} of {REQUESTS} concurrent faults accepted, {active} active at once; faults.max_active is {CAP}"
    );
    assert!(accepted > 0, "no fault was accepted at all: the test proves nothing");
}

/// A raw lymph peer: a bound ROUTER (where replies arrive, announcing `announce` as its routing id) and a
/// connecting ROUTER (identity `endpoint`, the routing id the agent sees and replies to).
struct RawPeer {
    endpoint: String,
    recv: zmq::Socket,
    send: zmq::Socket,
}

impl RawPeer {
    fn new(ctx: &zmq::Context, agent: &str, announce: Option<&str>) -> RawPeer {
        let port = free_port();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        let recv = ctx.socket(zmq::ROUTER).unwrap();
        recv.set_identity(announce.unwrap_or(&endpoint).as_bytes()).unwrap();
        recv.set_linger(0).unwrap();
        recv.bind(&endpoint).unwrap();
        let send = ctx.socket(zmq::ROUTER).unwrap();
        send.set_identity(endpoint.as_bytes()).unwrap();
        send.set_router_mandatory(true).unwrap();
        send.set_linger(0).unwrap();
        send.connect(agent).unwrap();
        RawPeer { endpoint, recv, send }
    }

    /// Sends `Chaos.status` to the agent; returns the request id.
    fn status(&self, agent: &str) -> String {
        use chaos_agent::rpc::{
            value::{self, Value},
            wire::{self, Headers, Kind},
        };
        let id = wire::new_id();
        let frames =
            wire::frames(&id, Kind::Req, "Chaos.status", &Headers::default(), value::encode(&Value::Map(vec![])));
        let sent = chaos_tests::raw_peer::send_routed(&self.send, agent.as_bytes(), &frames, Duration::from_secs(5));
        assert!(sent.unwrap_or_else(|e| panic!("send: {e}")), "send: the agent stayed unroutable for 5 s");
        id
    }

    /// The request ids of the replies that reach this peer within `wait`.
    fn replies(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut ids = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return ids;
            }
            self.recv.set_rcvtimeo(i32::try_from(left.as_millis()).unwrap().max(1)).unwrap();
            let Ok(frames) = self.recv.recv_multipart(0) else { return ids };
            if let Ok(msg) = chaos_agent::rpc::wire::Incoming::from_frames(frames) {
                ids.push(msg.subject);
            }
        }
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_local_client_cannot_take_over_another_local_clients_replies() {
    let ns = Netns::new("hspoof");
    let agent = agent(&ns);
    let to = agent.endpoint.clone();
    let (victim_got, attacker_got, asked) = ns.run(|| {
        let ctx = zmq::Context::new();
        let victim = RawPeer::new(&ctx, &to, None);
        // The attacker's reply socket announces the victim's endpoint as its routing id: once the agent has
        // connected to it, a reply routed to the victim's endpoint would be the attacker's.
        let attacker = RawPeer::new(&ctx, &to, Some(&victim.endpoint));
        attacker.status(&to);
        attacker.replies(Duration::from_millis(500));
        let asked = victim.status(&to);
        let attacker_got = std::thread::spawn(move || attacker.replies(Duration::from_secs(3)));
        let victim_got = victim.replies(Duration::from_secs(3));
        let attacker_got = attacker_got.join().unwrap();
        (victim_got, attacker_got, asked)
    });
    assert!(
        !attacker_got.contains(&asked),
        "the attacker received the victim's reply; agent log:\n{}",
        agent.log_tail(20)
    );
    assert!(victim_got.contains(&asked), "the victim got no reply; agent log:\n{}", agent.log_tail(20));
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn shared_sockets_are_closed_before_the_runtime_has_descriptors_of_its_own() {
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
    let ns = Netns::new("hshared");
    // A socket a `lymph node` shares with its instances, inherited by the agent at the same number.
    let shared = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let fd = shared.as_raw_fd();
    let inode = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
    // The variable also lists numbers that are not open when the agent starts (it outlived the node's
    // descriptors, e.g. passed down to a child): those numbers are free for the agent's own sockets, which
    // closing the list later would close.
    let listed: serde_json::Map<String, serde_json::Value> =
        (3..=64).chain([fd]).map(|n| (format!("{}", 20000 + n), json!(n))).collect();
    let mut agent = AgentProcess::start(
        Some(&ns),
        AgentOptions {
            args: vec!["--no-network-control".into()],
            env: vec![("LYMPH_SHARED_SOCKET_FDS".into(), serde_json::Value::Object(listed).to_string())],
            inherit_fds: vec![fd],
            ..Default::default()
        },
    )
    .expect("agent");
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    assert!(!held.contains(&format!("socket:[{inode}]")), "the agent still holds the shared socket: {held:?}");
    // The runtime works: it answers, and SIGTERM (delivered through the runtime's own signal socket) stops it.
    agent.ok("status", json!({}));
    assert!(agent.stop(), "the agent did not stop on SIGTERM; log:\n{}", agent.log_tail(20));
    drop(shared);
}
