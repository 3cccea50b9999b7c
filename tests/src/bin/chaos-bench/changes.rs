//! changes: request → rule effective / gone: `NetworkEngine::apply`/`revert` (steady state) and the agent's
//! `Chaos.inject`/`revert` over RPC, vs spawning `tc filter add|del … u32 match ip dport P`; a namespace each.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chaos_agent::rpc::client::Client;
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, EchoProcess},
    measure::EchoServer,
    netns::Netns,
};
use serde_json::json;

use crate::{engine::*, progress, report::*};

const CHANGE_PORT: u16 = 7301;
const CHANGE_WARMUP: usize = 20;
const CHANGE_ITERATIONS: usize = 300;
const AGENT_CHANGE_ITERATIONS: usize = 200;
const CHANGE_P99_GOAL: Duration = Duration::from_millis(2);
const CHANGE_SPEEDUP_GOAL: f64 = 10.0;

/// Timings of one design: request → effective, request → gone.
struct ChangeTimes {
    apply: Vec<Duration>,
    revert: Vec<Duration>,
    verified: String,
}

pub(crate) fn run() -> Result<()> {
    let target = addr(&format!("127.0.0.1:{CHANGE_PORT}"));
    progress("changes: NetworkEngine::apply/revert in steady state");
    let engine_times = {
        let ns = Netns::new("bchgeng");
        let _server = ns.run(|| EchoServer::start(target))?;
        let engine = NsEngine::start(&ns)?;
        engine.attach()?;
        engine.block_on(async {
            let e = &engine.engine;
            let mut times = ChangeTimes { apply: Vec::new(), revert: Vec::new(), verified: String::new() };
            // "Effective": a connection attempt right after apply returns is blackholed; right after revert it works.
            let h = e.apply("verify", &[to_port(CHANGE_PORT)], &blackhole(), RULE_TTL).await?;
            let during = exchange(target, VERIFY_TIMEOUT);
            let drops = e.counters(&h).await.drops;
            e.revert(&h).await?;
            let after = exchange(target, Duration::from_secs(2));
            ensure!(
                during.is_err() && drops > 0,
                "the rule was not effective right after apply ({during:?}, {drops} drops)"
            );
            ensure!(after.is_ok(), "the rule was still there right after revert: {after:?}");
            times.verified = format!(
                "verified: right after apply a connection to the port timed out ({drops} SYNs dropped by the rule), \
                 right after revert an exchange succeeded"
            );
            for i in 0..CHANGE_WARMUP + CHANGE_ITERATIONS {
                let started = Instant::now();
                let h = e.apply(&format!("c{i}"), &[to_port(CHANGE_PORT)], &blackhole(), RULE_TTL).await?;
                let applied = started.elapsed();
                let started = Instant::now();
                e.revert(&h).await?;
                let reverted = started.elapsed();
                if i >= CHANGE_WARMUP {
                    times.apply.push(applied);
                    times.revert.push(reverted);
                }
            }
            anyhow::Ok(times)
        })?
    };

    progress("changes: spawning tc filter add/del (u32)");
    let tc_times = {
        let ns = Netns::new("bchgtc");
        let _server = ns.run(|| EchoServer::start(target))?;
        tc(&ns, &["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1"])?;
        for class in ["1:1", "1:2"] {
            tc(
                &ns,
                &[
                    "class", "add", "dev", "lo", "parent", "1:", "classid", class, "htb", "rate", "100gbit", "quantum",
                    "60000",
                ],
            )?;
        }
        tc(&ns, &["qdisc", "add", "dev", "lo", "parent", "1:2", "handle", "20:", "pfifo", "limit", "0"])?;
        let port = CHANGE_PORT.to_string();
        let add: Vec<&str> = vec![
            "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "handle", "800::800", "u32",
            "match", "ip", "dport", &port, "0xffff", "flowid", "1:2",
        ];
        let del: Vec<&str> = vec![
            "filter", "del", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "handle", "800::800", "u32",
        ];
        let mut times = ChangeTimes { apply: Vec::new(), revert: Vec::new(), verified: String::new() };
        let handle = NsHandle::open(&ns)?;
        handle.tc(&add)?;
        let during = ns.run(|| exchange(target, VERIFY_TIMEOUT));
        let stats = tc(&ns, &["-s", "qdisc", "show", "dev", "lo", "parent", "1:2"])?;
        handle.tc(&del)?;
        let after = ns.run(|| exchange(target, Duration::from_secs(2)));
        ensure!(during.is_err(), "the tc filter was not effective right after tc returned");
        ensure!(after.is_ok(), "the tc filter was still there right after tc filter del returned: {after:?}");
        let dropped = stats.split("dropped ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("?").to_owned();
        times.verified = format!(
            "verified: right after `tc filter add` returned a connection timed out ({dropped} dropped by pfifo limit 0 \
             in class 1:2), right after `tc filter del` an exchange succeeded"
        );
        for i in 0..CHANGE_WARMUP + CHANGE_ITERATIONS {
            let started = Instant::now();
            handle.tc(&add)?;
            let applied = started.elapsed();
            let started = Instant::now();
            handle.tc(&del)?;
            let reverted = started.elapsed();
            if i >= CHANGE_WARMUP {
                times.apply.push(applied);
                times.revert.push(reverted);
            }
        }
        times
    };

    progress("changes: the agent's Chaos.inject/revert over RPC");
    let (agent_times, agent_pid_apply) = {
        let ns = Netns::new("bchgagent");
        let echo = EchoProcess::start(&ns, CHANGE_PORT);
        let echo_pid = echo.pid();
        let config = format!("faults: {{allowed_processes: [\"{}\"]}}\n", EchoProcess::MARKER);
        let state = tmpfs_state_dir()?;
        let agent = AgentProcess::start(
            Some(&ns),
            AgentOptions { config_yaml: config, state_dir: Some(state.path().join("state")), ..Default::default() },
        )?;
        let endpoint = agent.endpoint.clone();
        let times = ns.block_on(|| async {
            let client = Client::new()?;
            let call = |method: &'static str, kwargs: serde_json::Value| {
                let (client, endpoint) = (&client, &endpoint);
                async move {
                    let reply = client.call_endpoint(endpoint, &format!("Chaos.{method}"), &kwargs, RPC_TIMEOUT).await;
                    reply.map(|v| v.to_json()).with_context(|| format!("Chaos.{method}({kwargs})"))
                }
            };
            let inject = json!({"kind": "blackhole", "port": CHANGE_PORT, "lifetime": 600});
            let id_of = |reply: &serde_json::Value| {
                reply["id"].as_str().map(str::to_owned).with_context(|| format!("no fault id in {reply}"))
            };
            call("status", json!({})).await?;
            let mut times = ChangeTimes { apply: Vec::new(), revert: Vec::new(), verified: String::new() };
            let id = id_of(&call("inject", inject.clone()).await?)?;
            let during = exchange(target, VERIFY_TIMEOUT);
            call("revert", json!({"id": id})).await?;
            let after = exchange(target, Duration::from_secs(2));
            ensure!(during.is_err(), "Chaos.inject's blackhole was not effective when the reply arrived");
            ensure!(after.is_ok(), "Chaos.revert's reply arrived but the blackhole was still there: {after:?}");
            times.verified = "verified: right after the inject reply a connection timed out, right after the revert \
                              reply an exchange succeeded"
                .into();
            for i in 0..CHANGE_WARMUP + AGENT_CHANGE_ITERATIONS {
                let started = Instant::now();
                let id = id_of(&call("inject", inject.clone()).await?)?;
                let applied = started.elapsed();
                let started = Instant::now();
                call("revert", json!({"id": id})).await?;
                let reverted = started.elapsed();
                if i >= CHANGE_WARMUP {
                    times.apply.push(applied);
                    times.revert.push(reverted);
                }
            }
            // Diagnosis: the same fault targeted by pid, which skips resolving the port's owner.
            let by_pid = json!({"kind": "blackhole", "pid": echo_pid, "lifetime": 600});
            let mut pid_apply = Vec::new();
            for i in 0..CHANGE_WARMUP + AGENT_CHANGE_ITERATIONS {
                let started = Instant::now();
                let id = id_of(&call("inject", by_pid.clone()).await?)?;
                let applied = started.elapsed();
                call("revert", json!({"id": id})).await?;
                if i >= CHANGE_WARMUP {
                    pid_apply.push(applied);
                }
            }
            client.node().shutdown();
            anyhow::Ok((times, pid_apply))
        })?;
        drop(agent);
        drop(echo);
        times
    };

    title("changes — request → rule effective, request → rule gone");
    note("ours (engine): NetworkEngine::apply/revert of a blackhole on one tcp port, in-process, in steady state (the");
    note("  classifier already attached by an earlier fault): a map update; the call returns when the kernel has it");
    note("ours (agent RPC): Chaos.inject(kind=blackhole, port=P, lifetime=600) / Chaos.revert(id) to an agent in its");
    note("  namespace, through a persistent Rust client: RPC + targeting (port → allowed process) + journal + map;");
    note(format!("  its state dir (journal) on tmpfs ({TMPFS}) as /run/lymph-chaos is in production; events on disk"));
    note("baseline: spawning `tc filter add dev lo parent 1: protocol ip prio 1 handle 800::800 u32 match ip dport P");
    note(
        "  0xffff flowid 1:2` / `tc filter del … handle 800::800 u32` (as chaosd and Pumba shell out), on an HTB root",
    );
    note("  whose class 1:2 drops everything (pfifo limit 0); the time until tc exits");
    note("effective = a packet to the port is affected right after the call returns; checked once per design:");
    note(format!("  engine   {}", engine_times.verified));
    note(format!("  agent    {}", agent_times.verified));
    note(format!("  tc       {}", tc_times.verified));
    note(format!(
        "iterations: {CHANGE_ITERATIONS} (engine, tc), {AGENT_CHANGE_ITERATIONS} (agent), after {CHANGE_WARMUP} warm-up"
    ));
    let by_pid = Percentiles::of(&agent_pid_apply);
    note(format!(
        "diagnosis: the same Chaos.inject targeted by pid=P instead of port=P (no owner lookup for the port): apply → \
         effective p50 {} p99 {}",
        fmt_dur(by_pid.p50),
        fmt_dur(by_pid.p99)
    ));
    println!();
    let mut table = Table::verdicts();
    let tc_apply = Percentiles::of(&tc_times.apply);
    let tc_revert = Percentiles::of(&tc_times.revert);
    for (label, times) in [("engine", &engine_times), ("agent RPC", &agent_times)] {
        for (what, ours, base) in [
            ("apply → effective", Percentiles::of(&times.apply), tc_apply),
            ("revert → gone", Percentiles::of(&times.revert), tc_revert),
        ] {
            for (pct, o, b) in [("p50", ours.p50, base.p50), ("p99", ours.p99, base.p99)] {
                let speedup = b.as_secs_f64() / o.as_secs_f64();
                let (goal, ok) = if pct == "p99" {
                    (
                        format!("≤ {} and ≥ {CHANGE_SPEEDUP_GOAL:.0}×", fmt_dur(CHANGE_P99_GOAL)),
                        o <= CHANGE_P99_GOAL && speedup >= CHANGE_SPEEDUP_GOAL,
                    )
                } else {
                    (format!("≥ {CHANGE_SPEEDUP_GOAL:.0}×"), speedup >= CHANGE_SPEEDUP_GOAL)
                };
                table.row([
                    format!("{label}: {what} {pct}"),
                    fmt_dur(o),
                    fmt_dur(b),
                    fmt_ratio(speedup),
                    goal,
                    met(ok),
                ]);
            }
        }
    }
    table.print();
    Ok(())
}
