//! Hostile tier, remote peer: a client in another network namespace tries to command the agent. With only a bind
//! address configured (`rpc: {bind: 0.0.0.0}`) the agent must not start; with an IPv4-mapped allowlist entry
//! (`::ffff:10.41.0.2`) only that address gets in — the entry must neither widen to every IPv4 client nor stop the
//! access check (fail open).
//!
//! Topology as in the access tests: the agent in `srv`, bound to `0.0.0.0`; `good` (10.41.0.2) and `bad`
//! (10.42.0.2) over veth pairs.

#[path = "support/access.rs"]
mod access;

use std::time::{Duration, Instant};

use chaos_agent::rpc::{
    value::{self, Value},
    wire::{self, Headers, Incoming, Kind},
};

use access::{ANSWER_WAIT, Agent, REFUSED_WAIT, status_call, topology};

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_remote_peer_cannot_command_an_agent_configured_with_only_a_bind_address() {
    let t = topology("hopen");
    for config in [
        "rpc:\n  bind: 0.0.0.0\n  advertise: 127.0.0.1\n",
        "rpc: {bind: 0.0.0.0, advertise: 127.0.0.1, allowed_clients: []}\n",
    ] {
        match Agent::start(&t.srv, config) {
            Err(log) => assert!(
                log.contains("rpc.allowed_clients is empty") && log.contains("anyone"),
                "the agent did not start, but without saying why:\n{log}"
            ),
            Ok(agent) => {
                let (id, port) = (agent.routing_id(), agent.port);
                let answer =
                    t.bad.run(|| status_call("10.42.0.2", &format!("tcp://10.42.0.1:{port}"), &id, None, REFUSED_WAIT));
                panic!(
                    "the agent started with `{}` and a remote peer {}",
                    config.trim(),
                    if answer.is_some() { "commanded it" } else { "could reach it" }
                );
            }
        }
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn an_ipv4_mapped_allowlist_entry_lets_in_that_address_only() {
    let t = topology("hmap");
    let agent = Agent::start(
        &t.srv,
        "rpc:\n  bind: 0.0.0.0\n  advertise: 127.0.0.1\n  allowed_clients: [\"::ffff:10.41.0.2\"]\n",
    )
    .unwrap_or_else(|log| panic!("agent did not start:\n{log}"));
    let (id, port) = (agent.routing_id(), agent.port);
    let good = t.good.run(|| status_call("10.41.0.2", &format!("tcp://10.41.0.1:{port}"), &id, None, ANSWER_WAIT));
    let bad = t.bad.run(|| status_call("10.42.0.2", &format!("tcp://10.42.0.1:{port}"), &id, None, REFUSED_WAIT));
    assert!(bad.is_none(), "a client outside the allowlist was answered; agent log:\n{}", agent.log());
    assert!(good.is_some(), "the listed client was not answered; agent log:\n{}", agent.log());
    // The check still runs after both (a panic in it would have stopped it).
    let bad = t.bad.run(|| status_call("10.42.0.2", &format!("tcp://10.42.0.1:{port}"), &id, None, REFUSED_WAIT));
    assert!(bad.is_none(), "a client outside the allowlist was answered later; agent log:\n{}", agent.log());
}

/// One raw lymph message from `bind_ip` (inside the client's namespace) with the routing id `identity` (where the
/// agent sends the reply; default: our own bound endpoint), `headers` and `body` as given. Returns the reply if
/// one reaches our own endpoint within `timeout`.
#[allow(clippy::too_many_arguments)]
fn raw_call(
    bind_ip: &str,
    connect: &str,
    peer_id: &str,
    identity: Option<&str>,
    subject: &str,
    headers: Vec<u8>,
    body: Vec<u8>,
    timeout: Duration,
) -> Option<Incoming> {
    let ctx = zmq::Context::new();
    let port = std::net::TcpListener::bind((bind_ip, 0)).unwrap().local_addr().unwrap().port();
    let endpoint = format!("tcp://{bind_ip}:{port}");
    let recv = ctx.socket(zmq::ROUTER).unwrap();
    recv.set_identity(endpoint.as_bytes()).unwrap();
    recv.set_linger(0).unwrap();
    recv.bind(&endpoint).unwrap();
    let send = ctx.socket(zmq::ROUTER).unwrap();
    send.set_identity(identity.unwrap_or(&endpoint).as_bytes()).unwrap();
    send.set_router_mandatory(true).unwrap();
    send.set_linger(0).unwrap();
    send.connect(connect).unwrap();
    let id = wire::new_id();
    let frames = [id.as_bytes().to_vec(), Kind::Req.as_bytes().to_vec(), subject.as_bytes().to_vec(), headers, body];
    let deadline = Instant::now() + timeout;
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
        if let Ok(msg) = Incoming::from_frames(frames)
            && msg.subject == id
        {
            return Some(msg);
        }
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn an_allowed_remote_peer_cannot_redirect_replies_or_send_unbounded_frames() {
    let t = topology("hrep");
    let agent = Agent::start(
        &t.srv,
        "rpc:\n  bind: 0.0.0.0\n  advertise: 127.0.0.1\n  allowed_clients: [127.0.0.0/8, 10.41.0.0/24]\n",
    )
    .unwrap_or_else(|log| panic!("agent did not start:\n{log}"));
    let (id, port) = (agent.routing_id(), agent.port);
    let connect = format!("tcp://10.41.0.1:{port}");
    let status = value::encode(&Value::Map(vec![]));
    // The peer works at all.
    let ok = t.good.run(|| {
        raw_call(
            "10.41.0.2",
            &connect,
            &id,
            None,
            "Chaos.status",
            Headers::default().encode(),
            status.clone(),
            ANSWER_WAIT,
        )
    });
    assert!(ok.is_some_and(|m| m.kind == Kind::Rep), "the allowed peer got no answer; log:\n{}", agent.log());

    // 1. Replies redirected to a third host (the `bad` namespace listens where the spoofed routing id points).
    let trap = t.bad.run(|| std::net::TcpListener::bind("10.42.0.2:0").unwrap());
    trap.set_nonblocking(true).unwrap();
    let spoofed = format!("tcp://10.42.0.2:{}", trap.local_addr().unwrap().port());
    t.good.run(|| {
        raw_call(
            "10.41.0.2",
            &connect,
            &id,
            Some(&spoofed),
            "Chaos.status",
            Headers::default().encode(),
            status.clone(),
            REFUSED_WAIT,
        )
    });
    let connected = trap.accept().is_ok();
    assert!(!connected, "the agent connected to {spoofed}, a host that never asked; log:\n{}", agent.log());

    // 2. A 4 MiB lymph.ping payload is not echoed back (every body has the same 1 MiB bound).
    let ping = value::encode(&Value::Map(vec![(Value::Str("payload".into()), Value::Bin(vec![7; 4 << 20]))]));
    let reply = t.good.run(|| {
        raw_call("10.41.0.2", &connect, &id, None, "lymph.ping", Headers::default().encode(), ping, ANSWER_WAIT)
    });
    if let Some(r) = reply {
        assert!(r.body.len() < 1 << 20, "a 4 MiB ping came back as {} bytes ({:?})", r.body.len(), r.kind);
    }

    // 3. A 1 MiB headers frame is dropped, not decoded.
    let headers = value::encode(&Value::Map(vec![(Value::Str("trace_id".into()), Value::Str("h".repeat(1 << 20)))]));
    let reply = t
        .good
        .run(|| raw_call("10.41.0.2", &connect, &id, None, "Chaos.status", headers, status.clone(), REFUSED_WAIT));
    assert!(reply.is_none(), "a 1 MiB headers frame was accepted");
    // And the agent still answers.
    let ok = t.good.run(|| {
        raw_call(
            "10.41.0.2",
            &connect,
            &id,
            None,
            "Chaos.status",
            Headers::default().encode(),
            status.clone(),
            ANSWER_WAIT,
        )
    });
    assert!(ok.is_some(), "the agent stopped answering; log:\n{}", agent.log());
}
