//! The comparisons, one function each (a `compare_*` test runs one): the targets probed, raw netem's legs and the
//! agent's fault requests that should add the same delay.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    compare::{Comparison, Probe, RawLeg, Target, delay_target, echo, lo_leg},
    kernel::Stack,
    *,
};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
const A: u16 = PORT_FAULTED;

/// `<name>-v4` and `<name>-v6`: port A on loopback, port B as control.
fn both_families(name: &str, want_ms: f64) -> Vec<Target> {
    vec![
        delay_target(&format!("{name}-v4"), echo(V4, A), echo(V4, PORT_CONTROL), want_ms),
        delay_target(&format!("{name}-v6"), echo(V6, A), echo(V6, PORT_CONTROL), want_ms),
    ]
}

/// `inject latency --port A latency=0.01` vs netem `delay 10ms`, IPv4 and IPv6.
pub(crate) fn delay_10ms() -> Comparison {
    Comparison {
        targets: both_families("delay-10ms", 10.0),
        raw: vec![lo_leg("30", vec!["delay", "10ms"], vec![("dport", A)])],
        ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.01"]],
        jitter_ms: None,
    }
}

/// The same, IPv4 only: what the mutant self-checks judge.
pub(crate) fn delay_10ms_v4() -> Comparison {
    Comparison { targets: both_families("delay-10ms", 10.0).into_iter().take(1).collect(), ..delay_10ms() }
}

/// The CLI shortcut `latency --port A 0.1` vs netem `delay 100ms`, IPv4 and IPv6.
pub(crate) fn delay_100ms() -> Comparison {
    Comparison {
        targets: both_families("delay-100ms", 100.0),
        raw: vec![lo_leg("30", vec!["delay", "100ms"], vec![("dport", A)])],
        ours: vec![vec!["latency", "--port", "5001", "0.1"]],
        jitter_ms: None,
    }
}

/// `latency=0.05 jitter=0.02 distribution=normal` vs `delay 50ms 20ms distribution normal`: medians and spreads.
pub(crate) fn jitter_50ms_20ms() -> Comparison {
    Comparison {
        targets: vec![Target {
            samples: 15,
            ..delay_target("jitter-50ms-20ms", echo(V4, A), echo(V4, PORT_CONTROL), 50.0)
        }],
        raw: vec![lo_leg("30", vec!["delay", "50ms", "20ms", "distribution", "normal"], vec![("dport", A)])],
        ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.05", "jitter=0.02", "distribution=normal"]],
        jitter_ms: Some(20.0),
    }
}

/// `direction=from` vs netem on the source port: on loopback (module docs of chaos_agent::faults::network) it
/// delays the echo replies, which leave port A; a round trip grows by the delay once.
pub(crate) fn direction_from_50ms() -> Comparison {
    Comparison {
        targets: vec![delay_target("direction-from-50ms", echo(V4, A), echo(V4, PORT_CONTROL), 50.0)],
        raw: vec![lo_leg("30", vec!["delay", "50ms"], vec![("sport", A)])],
        ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.05", "direction=from"]],
        jitter_ms: None,
    }
}

/// `direction=both` vs netem on both ports: requests and replies, a round trip grows twice.
pub(crate) fn direction_both_50ms() -> Comparison {
    Comparison {
        targets: vec![delay_target("direction-both-50ms", echo(V4, A), echo(V4, PORT_CONTROL), 100.0)],
        raw: vec![lo_leg("30", vec!["delay", "50ms"], vec![("dport", A), ("sport", A)])],
        ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.05", "direction=both"]],
        jitter_ms: None,
    }
}

/// Two shaping faults at once (two HTB classes on the IFB, each with its own netem leaf): 30 ms on A and 60 ms on
/// the lymph-style port, vs two netem classes.
pub(crate) fn two_faults() -> Comparison {
    let reply = Probe::Reply(SocketAddr::new(V4, PORT_REPLY));
    Comparison {
        targets: vec![
            delay_target("two-faults-echo-30ms", echo(V4, A), echo(V4, PORT_CONTROL), 30.0),
            delay_target("two-faults-reply-60ms", reply, echo(V4, PORT_CONTROL), 60.0),
        ],
        raw: vec![
            lo_leg("30", vec!["delay", "30ms"], vec![("dport", A)]),
            lo_leg("31", vec!["delay", "60ms"], vec![("dport", PORT_REPLY)]),
        ],
        ours: vec![
            vec!["inject", "latency", "--port", "5001", "latency=0.03"],
            vec!["inject", "latency", "--port", "5002", "latency=0.06"],
        ],
        jitter_ms: None,
    }
}

/// The lymph call pattern on port 5002 (the reply on a separate connection): + the delay once.
pub(crate) fn reply_conn() -> Comparison {
    Comparison {
        targets: vec![delay_target(
            "reply-conn",
            Probe::Reply(SocketAddr::new(V4, PORT_REPLY)),
            echo(V4, PORT_CONTROL),
            100.0,
        )],
        raw: vec![lo_leg("30", vec!["delay", "100ms"], vec![("dport", PORT_REPLY)])],
        ours: vec![vec!["inject", "latency", "--port", "5002", "latency=0.1"]],
        jitter_ms: None,
    }
}

/// The caller in `chaos-cli` calls 10.77.0.1:A / [fd77::1]:A (veth-srv's ingress) vs netem on its veth egress
/// (the caller's requests leave veth-cli: netem there adds what the agent adds at veth-srv's ingress).
pub(crate) fn ingress_veth() -> Comparison {
    let remote = |ip: Ipv4Addr| Probe::Remote(NETNS, SocketAddr::new(IpAddr::V4(ip), A));
    let remote6 = |port| Probe::Remote(NETNS, SocketAddr::new(IpAddr::V6(SRV_V6), port));
    let control = Probe::Remote(NETNS, SocketAddr::new(IpAddr::V4(SRV_V4), PORT_CONTROL));
    Comparison {
        targets: vec![
            delay_target("ingress-veth-v4", remote(SRV_V4), control, 100.0),
            delay_target("ingress-veth-v6", remote6(A), remote6(PORT_CONTROL), 100.0),
        ],
        raw: vec![RawLeg {
            netns: Some(NETNS),
            dev: VETH_CLI,
            class: "30",
            netem: vec!["delay", "100ms"],
            matches: vec![("dport", A)],
        }],
        ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.1"]],
        jitter_ms: None,
    }
}

/// A caller behind a bridge port (the layout of a host running containers) calls 10.78.0.1:A: the agent's
/// classifier sees the request at the port and at the bridge, and must delay it once; vs netem on the caller's
/// veth.
pub(crate) fn bridge_latency_50ms() -> Comparison {
    let addr = |port| Probe::Remote(Stack::BRIDGE.netns, SocketAddr::new(IpAddr::V4(Stack::BRIDGE.host), port));
    Comparison {
        targets: vec![delay_target("bridge-latency-50ms", addr(A), addr(PORT_CONTROL), 50.0)],
        raw: vec![RawLeg {
            netns: Some(Stack::BRIDGE.netns),
            dev: Stack::BRIDGE.peer,
            class: "30",
            netem: vec!["delay", "50ms"],
            matches: vec![("dport", A)],
        }],
        ours: vec![vec!["inject", "latency", "--port", "5001", "latency=0.05"]],
        jitter_ms: None,
    }
}
