//! kill: `Chaos.kill(pid)` → reply, and → our waitpid returns, agent in a namespace; vs spawning `kill -KILL`;
//! floor: kill(2) + waitpid from this process.

use std::{
    io,
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use chaos_agent::rpc::client::Client;
use chaos_test_support::process::DieWithParent;
use chaos_tests::{
    agent::{AgentOptions, AgentProcess},
    netns::Netns,
};
use serde_json::json;

use crate::{engine::*, progress, report::*};

/// In the command line of kill targets (argv[0]); the agent's config allows exactly these.
const KILL_MARKER: &str = "chaos-bench-kill-target";
const KILL_WARMUP: usize = 5;
const KILL_ITERATIONS: usize = 100;
const KILL_P99_GOAL: Duration = Duration::from_millis(5);

/// A short-lived target: `sleep 300` whose argv[0] is [`KILL_MARKER`]; SIGKILLed by the kernel if the thread that
/// spawned it dies, killed and reaped on drop unless already reaped.
struct Target {
    child: Option<Child>,
}

impl Target {
    fn spawn() -> Result<Target> {
        let mut cmd = Command::new("sleep");
        cmd.arg0(KILL_MARKER)
            .arg("300")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .die_with_parent();
        // std's spawn returns after the exec succeeded, so the marker is in /proc/<pid>/cmdline already.
        Ok(Target { child: Some(cmd.spawn().context("spawning sleep")?) })
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// waitpid: returns once the process is reaped.
    fn reap(&mut self) -> Result<()> {
        let mut child = self.child.take().context("already reaped")?;
        let status = child.wait()?;
        ensure!(!status.success(), "the target exited normally ({status}), not by a signal");
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn run() -> Result<()> {
    progress("kill: Chaos.kill(pid) through an agent in a namespace");
    let ns = Netns::new("bkill");
    let config = format!("faults: {{allowed_processes: [\"{KILL_MARKER}\"]}}\n");
    let state = tmpfs_state_dir()?;
    let agent = AgentProcess::start(
        Some(&ns),
        AgentOptions {
            config_yaml: config,
            args: vec!["--no-network-control".into()],
            state_dir: Some(state.path().join("state")),
            ..Default::default()
        },
    )?;
    let endpoint = agent.endpoint.clone();
    let (reply_times, reaped_times) = ns.block_on(|| async {
        let client = Client::new()?;
        client.call_endpoint(&endpoint, "Chaos.status", &json!({}), RPC_TIMEOUT).await?;
        let (mut replies, mut reaped) = (Vec::new(), Vec::new());
        for i in 0..KILL_WARMUP + KILL_ITERATIONS {
            let mut target = Target::spawn()?;
            let pid = target.pid();
            let started = Instant::now();
            let reply = client.call_endpoint(&endpoint, "Chaos.kill", &json!({"pid": pid}), RPC_TIMEOUT).await?;
            let replied = started.elapsed();
            target.reap()?;
            let gone = started.elapsed();
            let text = reply.to_json().to_string();
            ensure!(text.contains(&format!("exited: [{pid}]")), "Chaos.kill({pid}) did not report the exit: {text}");
            if i >= KILL_WARMUP {
                replies.push(replied);
                reaped.push(gone);
            }
        }
        client.node().shutdown();
        anyhow::Ok((replies, reaped))
    })?;
    drop(agent);

    progress("kill: spawning kill -KILL, and kill(2) in-process");
    let mut spawned = Vec::new();
    let mut floor = Vec::new();
    for i in 0..KILL_WARMUP + KILL_ITERATIONS {
        let mut target = Target::spawn()?;
        let started = Instant::now();
        let status = Command::new("kill").args(["-KILL", &target.pid().to_string()]).status()?;
        ensure!(status.success(), "kill -KILL {} failed: {status}", target.pid());
        target.reap()?;
        let took = started.elapsed();
        let mut target2 = Target::spawn()?;
        let started = Instant::now();
        // SAFETY: signalling our own child, not yet reaped (its pid cannot have been reused).
        ensure!(unsafe { libc::kill(target2.pid(), libc::SIGKILL) } == 0, "kill(2): {}", io::Error::last_os_error());
        target2.reap()?;
        let took2 = started.elapsed();
        if i >= KILL_WARMUP {
            spawned.push(took);
            floor.push(took2);
        }
    }

    title("kill — Chaos.kill request → target reaped");
    note("ours: Chaos.kill(pid=P) over RPC to an agent in a namespace (--no-network-control) whose config allows the");
    note(format!(
        "  target (`sleep 300` with argv[0] = {KILL_MARKER}); the agent replies once the process has exited (pidfd),"
    ));
    note("  the reply says `exited: [P]`; then this process's waitpid returns (reaped); agent state dir on tmpfs");
    note("baseline: spawning `kill -KILL P` then waitpid (as shell-based tools do)");
    let fl = Percentiles::of(&floor);
    note(format!(
        "floor: kill(2) + waitpid from this process: p50 {} p99 {} (no RPC, no targeting)",
        fmt_dur(fl.p50),
        fmt_dur(fl.p99)
    ));
    note(format!("{KILL_ITERATIONS} kills each, after {KILL_WARMUP} warm-up"));
    println!();
    let replies = Percentiles::of(&reply_times);
    let reaped = Percentiles::of(&reaped_times);
    let base = Percentiles::of(&spawned);
    let mut table = Table::verdicts();
    table.row([
        "request → reply (exited) p50".into(),
        fmt_dur(replies.p50),
        "—".into(),
        "—".into(),
        "(reported)".into(),
        "—".into(),
    ]);
    table.row([
        "request → reply (exited) p99".into(),
        fmt_dur(replies.p99),
        "—".into(),
        "—".into(),
        "(reported)".into(),
        "—".into(),
    ]);
    table.row([
        "request → reaped p50".into(),
        fmt_dur(reaped.p50),
        fmt_dur(base.p50),
        fmt_ratio(base.p50.as_secs_f64() / reaped.p50.as_secs_f64()),
        "(reported)".into(),
        "—".into(),
    ]);
    table.row([
        "request → reaped p99".into(),
        fmt_dur(reaped.p99),
        fmt_dur(base.p99),
        fmt_ratio(base.p99.as_secs_f64() / reaped.p99.as_secs_f64()),
        format!("≤ {}", fmt_dur(KILL_P99_GOAL)),
        met(reaped.p99 <= KILL_P99_GOAL),
    ]);
    table.row([
        "request → reaped max".into(),
        fmt_dur(reaped.max),
        fmt_dur(base.max),
        fmt_ratio(base.max.as_secs_f64() / reaped.max.as_secs_f64()),
        "(reported)".into(),
        "—".into(),
    ]);
    table.print();
    Ok(())
}
