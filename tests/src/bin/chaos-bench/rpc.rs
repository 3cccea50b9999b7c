//! rpc: one Rust client (`RpcNode`) sends `lymph.ping` to our agent and to a real Python lymph 0.15 Echo, both on
//! 127.0.0.1: requests/s with 1, 16, 64 in flight; p50/p99 at 1 in flight (interleaved blocks).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use chaos_agent::rpc::{
    node::{NodeConfig, RpcNode},
    value::{self, Value},
};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess},
    lymph::{self, Instance, LymphConfig},
    zk,
};

use crate::{progress, report::*};

const PING_PAYLOAD: &str = "chaos-bench";
const PING_TIMEOUT: Duration = Duration::from_secs(10);
const RPC_WARMUP_PINGS: usize = 200;
const RPC_LATENCY_PINGS: usize = 3000;
/// Latency pings alternate between the two services in blocks of this many, so drift hits both alike.
const RPC_LATENCY_BLOCK: usize = 500;
const RPC_IN_FLIGHT: [usize; 3] = [1, 16, 64];
const RPC_RATE_TIME: Duration = Duration::from_millis(1500);
const RPC_GOAL: f64 = 10.0;

pub(crate) fn run() -> Result<()> {
    for var in [zk::ZK_ENV, lymph::VENV_ENV] {
        ensure!(
            std::env::var_os(var).is_some_and(|v| !v.is_empty()),
            "{var} is not set: run it through `cargo xtask bench rpc`, which starts ZooKeeper and builds the lymph venv"
        );
    }
    progress("rpc: starting a Python lymph 0.15 Echo instance and the agent (--no-network-control)");
    let config = LymphConfig::for_test("chaos-bench-rpc")?;
    let echo = Instance::start(&config)?;
    let agent =
        AgentProcess::start(None, AgentOptions { args: vec!["--no-network-control".into()], ..Default::default() })?;
    let endpoints = [agent.endpoint.clone(), echo.endpoint().to_owned()];
    progress(format!("rpc: agent {} vs lymph Echo {} (pid {})", endpoints[0], endpoints[1], echo.pid()));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (latency, rates) = rt.block_on(async {
        let node = Arc::new(RpcNode::start(&NodeConfig::loopback(), None)?);
        let body = ping_body();
        for endpoint in &endpoints {
            for _ in 0..RPC_WARMUP_PINGS {
                ping(&node, endpoint, &body).await?;
            }
        }
        let mut latency = [Vec::new(), Vec::new()];
        for _ in 0..RPC_LATENCY_PINGS / RPC_LATENCY_BLOCK {
            for (samples, endpoint) in latency.iter_mut().zip(&endpoints) {
                for _ in 0..RPC_LATENCY_BLOCK {
                    let started = Instant::now();
                    ping(&node, endpoint, &body).await?;
                    samples.push(started.elapsed());
                }
            }
        }
        let mut rates = Vec::new();
        for in_flight in RPC_IN_FLIGHT {
            let ours = ping_rate(&node, &endpoints[0], in_flight).await?;
            let theirs = ping_rate(&node, &endpoints[1], in_flight).await?;
            rates.push((in_flight, ours, theirs));
        }
        node.shutdown();
        anyhow::Ok((latency, rates))
    })?;

    title("rpc — lymph.ping: our agent vs a real Python lymph 0.15 service");
    note("same client for both: chaos_agent's RpcNode (Rust, tokio), one node, N requests in flight");
    note(format!("ours: lymph-chaos agent --no-network-control, {}", endpoints[0]));
    note(format!("baseline: lymph 0.15 `instance --interface echo:Echo` (Python 3, gevent), {}", endpoints[1]));
    note(format!(
        "throughput: {:.1} s per level after {RPC_WARMUP_PINGS} warm-up pings; latency: {RPC_LATENCY_PINGS} pings \
         each at 1 in flight, alternating in blocks of {RPC_LATENCY_BLOCK}",
        RPC_RATE_TIME.as_secs_f64()
    ));
    note("at 1 in flight the rate is 1 / round trip, and the round trip includes the client and zmq (two TCP");
    note("  connections, zmq I/O threads on both sides); with more in flight it measures the services");
    let mut table = Table::verdicts();
    for (in_flight, ours, theirs) in &rates {
        let ratio = ours / theirs;
        table.row([
            format!("lymph.ping/s, {in_flight} in flight"),
            format!("{}/s", fmt_count(*ours)),
            format!("{}/s", fmt_count(*theirs)),
            fmt_ratio(ratio),
            format!("≥ {RPC_GOAL:.0}×"),
            met(ratio >= RPC_GOAL),
        ]);
    }
    let (ours, theirs) = (Percentiles::of(&latency[0]), Percentiles::of(&latency[1]));
    for (name, o, t) in [("p50", ours.p50, theirs.p50), ("p99", ours.p99, theirs.p99)] {
        table.row([
            format!("latency {name}, 1 in flight (n={})", ours.n),
            fmt_dur(o),
            fmt_dur(t),
            fmt_ratio(t.as_secs_f64() / o.as_secs_f64()),
            "(reported)".into(),
            "—".into(),
        ]);
    }
    table.print();
    drop(agent);
    drop(echo);
    Ok(())
}

fn ping_body() -> Vec<u8> {
    value::encode(&Value::Map(vec![(Value::Str("payload".into()), Value::Str(PING_PAYLOAD.into()))]))
}

async fn ping(node: &RpcNode, endpoint: &str, body: &[u8]) -> Result<()> {
    let reply = node.request(endpoint, "lymph.ping", body.to_vec(), PING_TIMEOUT).await?;
    match value::decode(&reply) {
        Ok(Value::Str(s)) if s == PING_PAYLOAD => Ok(()),
        other => bail!("lymph.ping to {endpoint} answered {other:?}, not the payload"),
    }
}

/// Completed pings per second with `in_flight` requests outstanding for [`RPC_RATE_TIME`].
async fn ping_rate(node: &Arc<RpcNode>, endpoint: &str, in_flight: usize) -> Result<f64> {
    let body = ping_body();
    let started = Instant::now();
    let deadline = started + RPC_RATE_TIME;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (node, endpoint, body) = (Arc::clone(node), endpoint.to_owned(), body.clone());
        workers.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                ping(&node, &endpoint, &body).await?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    let mut total = 0u64;
    while let Some(worker) = workers.join_next().await {
        total += worker.context("ping worker panicked")??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
