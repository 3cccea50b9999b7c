//! Bad input never crashes the agent, and gets an answer wherever lymph would send one: a raw ZeroMQ
//! peer sends malformed frames, bodies and calls; after each, a normal call still works.

use std::time::{Duration, Instant};

use chaos_agent::rpc::{
    value::{self, Value},
    wire::{self, Headers, Kind},
};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess},
    netns::Netns,
};
use serde_json::json;

/// A raw lymph peer: a bound ROUTER (identity = its endpoint) for replies and a connecting ROUTER for requests.
struct RawPeer {
    _ctx: zmq::Context,
    recv: zmq::Socket,
    send: zmq::Socket,
    agent: String,
}

impl RawPeer {
    fn new(agent: &str) -> RawPeer {
        let ctx = zmq::Context::new();
        let port = chaos_test_support::free_port();
        let me = format!("tcp://127.0.0.1:{port}");
        let recv = ctx.socket(zmq::ROUTER).unwrap();
        recv.set_identity(me.as_bytes()).unwrap();
        recv.set_linger(0).unwrap();
        recv.bind(&me).unwrap();
        let send = ctx.socket(zmq::ROUTER).unwrap();
        send.set_identity(me.as_bytes()).unwrap();
        send.set_router_mandatory(true).unwrap();
        send.set_linger(0).unwrap();
        send.connect(agent).unwrap();
        RawPeer { _ctx: ctx, recv, send, agent: agent.to_owned() }
    }

    fn send(&self, frames: Vec<Vec<u8>>) {
        let sent =
            chaos_tests::raw_peer::send_routed(&self.send, self.agent.as_bytes(), &frames, Duration::from_secs(3));
        assert!(sent.unwrap_or_else(|e| panic!("send: {e}")), "send: the agent stayed unroutable for 3 s");
    }

    /// The reply to request `id` (pings from the agent are skipped), or None after `timeout`.
    fn reply(&self, id: &str, timeout: Duration) -> Option<(Kind, Value)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.recv.poll(zmq::POLLIN, 50).unwrap() == 0 {
                continue;
            }
            let frames = self.recv.recv_multipart(0).unwrap();
            let msg = wire::Incoming::from_frames(frames).expect("the agent sends well-formed messages");
            if msg.subject == id && msg.kind != Kind::Req {
                return Some((msg.kind, value::decode(&msg.body).expect("msgpack reply body")));
            }
        }
        None
    }

    fn request_raw(&self, subject: &[u8], headers: Vec<u8>, body: Vec<u8>) -> String {
        let id = wire::new_id();
        self.send(vec![id.as_bytes().to_vec(), b"REQ".to_vec(), subject.to_vec(), headers, body]);
        id
    }

    fn call(&self, subject: &str, body: Vec<u8>) -> Option<(Kind, Value)> {
        let id = self.request_raw(subject.as_bytes(), Headers::default().encode(), body);
        self.reply(&id, Duration::from_secs(3))
    }
}

fn error_type(reply: &Option<(Kind, Value)>) -> Option<String> {
    match reply {
        Some((Kind::Error, Value::Map(entries))) => {
            entries.iter().find(|(k, _)| k.as_str() == Some("type")).and_then(|(_, v)| v.as_str().map(str::to_owned))
        }
        _ => None,
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn malformed_frames_bodies_and_calls_never_crash_the_agent() {
    let ns = Netns::new("rpcbad");
    let agent = AgentProcess::start(
        Some(&ns),
        AgentOptions { args: vec!["--no-network-control".into()], ..Default::default() },
    )
    .unwrap();
    let endpoint = agent.endpoint.clone();
    let pid = agent.pid();
    ns.run(move || {
        let peer = RawPeer::new(&endpoint);
        let works = |what: &str| {
            let ok = peer.call("Chaos.status", value::encode(&Value::Map(vec![])));
            assert!(matches!(ok, Some((Kind::Rep, _))), "after {what}: a normal call failed: {ok:?}");
        };
        let kwargs = |pairs: &[(&str, Value)]| {
            value::encode(&Value::Map(pairs.iter().map(|(k, v)| (Value::Str((*k).into()), v.clone())).collect()))
        };
        works("start");

        // Envelope errors: lymph drops these (no one to answer); the agent drops them too and stays up.
        peer.send(vec![b"only".to_vec(), b"three".to_vec(), b"frames".to_vec()]);
        works("a message with 3 frames");
        peer.send(vec![
            vec![0xff, 0xfe],
            b"REQ".to_vec(),
            b"Chaos.status".to_vec(),
            Headers::default().encode(),
            vec![0x80],
        ]);
        works("a non-UTF-8 id");
        let id = peer.request_raw(&[0xc3, 0x28], Headers::default().encode(), vec![0x80]);
        assert!(peer.reply(&id, Duration::from_millis(300)).is_none(), "a non-UTF-8 subject was answered");
        works("a non-UTF-8 subject");
        peer.send(vec![b"id".to_vec(), b"HELLO".to_vec(), b"Chaos.status".to_vec(), vec![0x80], vec![0x80]]);
        works("an unknown message type");

        // Payload errors: answered with a clear ERROR.
        let r = peer.call("Chaos.status", b"\xc1\xc1not msgpack".to_vec());
        assert_eq!(error_type(&r).as_deref(), Some("BadRequest"), "{r:?}");
        works("a body that is not msgpack");
        let r = peer.call("Chaos.kill", value::encode(&Value::Array(vec![Value::Int(1)])));
        assert_eq!(error_type(&r).as_deref(), Some("BadRequest"), "{r:?}");
        works("a body that is not a map");
        let id = peer.request_raw(b"Chaos.status", b"\xc1".to_vec(), value::encode(&Value::Map(vec![])));
        assert!(peer.reply(&id, Duration::from_secs(3)).is_some(), "bad headers: no answer");
        works("headers that are not msgpack");

        // Unknown interface/method: NACK, like lymph.
        assert!(matches!(peer.call("Nope.status", kwargs(&[])), Some((Kind::Nack, Value::Nil))));
        assert!(matches!(peer.call("Chaos.teleport", kwargs(&[])), Some((Kind::Nack, Value::Nil))));
        assert!(matches!(peer.call("nodot", kwargs(&[])), Some((Kind::Nack, _))));
        works("unknown methods");

        // Wrong, missing, mistyped arguments: ERROR TypeError/ValueError with the argument named.
        let r = peer.call("Chaos.kill", kwargs(&[("nmae", Value::Str("Echo".into()))]));
        assert_eq!(error_type(&r).as_deref(), Some("TypeError"), "{r:?}");
        let r = peer.call("Chaos.revert", kwargs(&[]));
        assert_eq!(error_type(&r).as_deref(), Some("TypeError"), "{r:?}");
        let r = peer.call("Chaos.kill", kwargs(&[("port", Value::Int(70000))]));
        assert_eq!(error_type(&r).as_deref(), Some("ValueError"), "{r:?}");
        let r = peer.call("Chaos.events", kwargs(&[("limit", Value::Str("many".into()))]));
        assert_eq!(error_type(&r).as_deref(), Some("TypeError"), "{r:?}");
        let r = peer.call("Chaos.kill", kwargs(&[("name", Value::Str("NoSuchService".into()))]));
        assert_eq!(error_type(&r).as_deref(), Some("UnknownService"), "{r:?}");
        works("bad arguments");

        // A 10 MB body.
        let big = value::encode(&Value::Map(vec![(Value::Str("name".into()), Value::Str("x".repeat(10 << 20)))]));
        let r = peer.call("Chaos.kill", big);
        assert_eq!(error_type(&r).as_deref(), Some("BadRequest"), "{r:?}");
        works("a 10 MB body");

        // Deeply nested and hostile msgpack.
        let deep = [[0x81u8, 0xa1, b'a'].repeat(200), vec![0xc0]].concat();
        assert_eq!(error_type(&peer.call("Chaos.status", deep)).as_deref(), Some("BadRequest"));
        let huge_claim = vec![0xdf, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(error_type(&peer.call("Chaos.status", huge_claim)).as_deref(), Some("BadRequest"));
        works("hostile msgpack");

        // Pings are answered with their payload.
        let r = peer.call("lymph.ping", kwargs(&[("payload", Value::Str("p".into()))]));
        assert!(matches!(r, Some((Kind::Rep, Value::Str(ref s))) if s == "p"), "{r:?}");
    });
    let still = chaos_agent::faults::process::proc_info(pid).expect("the agent process is gone");
    assert!(still.state != 'Z', "the agent died");
    let status = agent.ok("status", json!({}));
    assert_eq!(status["agent"], "lymph-chaos");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn lymph_builtins_answer_and_any_version_header_is_accepted() {
    let ns = Netns::new("rpcbuiltin");
    let agent = AgentProcess::start(
        Some(&ns),
        AgentOptions { args: vec!["--no-network-control".into()], ..Default::default() },
    )
    .unwrap();
    let endpoint = agent.endpoint.clone();
    ns.run(move || {
        let peer = RawPeer::new(&endpoint);
        let empty = value::encode(&Value::Map(vec![]));
        let map = |v: &Value| match v {
            Value::Map(e) => e
                .iter()
                .map(|(k, v)| (k.as_str().unwrap_or("").to_owned(), v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>(),
            _ => panic!("not a map: {v}"),
        };
        let Some((Kind::Rep, status)) = peer.call("lymph.status", empty.clone()) else { panic!("lymph.status") };
        assert_eq!(map(&status)["endpoint"], Value::Str(endpoint.clone()));
        let Some((Kind::Rep, inspect)) = peer.call("lymph.inspect", empty.clone()) else { panic!("lymph.inspect") };
        let methods = match &map(&inspect)["methods"] {
            Value::Array(m) => m.iter().map(|m| map(m)["name"].as_str().unwrap().to_owned()).collect::<Vec<_>>(),
            other => panic!("{other}"),
        };
        for m in ["Chaos.kill", "lymph.ping", "lymph.change_loglevel", "lymph.get_metrics"] {
            assert!(methods.contains(&m.to_owned()), "inspect lacks {m}: {methods:?}");
        }
        assert!(matches!(peer.call("lymph.get_metrics", empty.clone()), Some((Kind::Rep, Value::Array(_)))));
        let level = value::encode(&Value::Map(vec![
            (Value::Str("qualname".into()), Value::Str("chaos_agent".into())),
            (Value::Str("loglevel".into()), Value::Str("DEBUG".into())),
            (Value::Str("period".into()), Value::Int(1)),
        ]));
        assert!(matches!(peer.call("lymph.change_loglevel", level), Some((Kind::Rep, Value::Nil))));
        let bad_level = value::encode(&Value::Map(vec![
            (Value::Str("qualname".into()), Value::Str("x".into())),
            (Value::Str("loglevel".into()), Value::Str("LOUDEST".into())),
        ]));
        assert_eq!(error_type(&peer.call("lymph.change_loglevel", bad_level)).as_deref(), Some("ValueError"));
        // lymph sends the interface version it found in ZooKeeper; builtins and Chaos accept any.
        let versioned = Headers { trace_id: Some("t".into()), version: Some("0.15.0".into()) };
        let id = peer.request_raw(b"lymph.status", versioned.encode(), empty.clone());
        assert!(
            matches!(peer.reply(&id, Duration::from_secs(3)), Some((Kind::Rep, _))),
            "versioned lymph.status not answered"
        );
        let id = peer.request_raw(b"Chaos.status", versioned.encode(), empty);
        assert!(
            matches!(peer.reply(&id, Duration::from_secs(3)), Some((Kind::Rep, _))),
            "versioned Chaos.status not answered"
        );
    });
}
