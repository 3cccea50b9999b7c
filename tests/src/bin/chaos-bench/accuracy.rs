//! accuracy: the agent's delay next to raw `tc netem` in a qemu guest (see [`run`]).

use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::{progress, report::*};

/// How long the accuracy guest may run.
const ACCURACY_BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// The agent's delay accuracy next to raw `tc netem`: a qemu guest (Debian 12 kernel, TCG) runs every delay
/// comparison of the VM tier (the guest's `compare_` tests with `CHAOS_VM_ACCURACY=1`: more rounds, no verdict
/// extension) with this release
/// agent; per scenario, the RTT median and p90 through raw netem and through the agent, measured interleaved in the
/// same boot, and their differences.
pub(crate) fn run() -> Result<()> {
    use chaos_tests::vm::{Guest, VmAssets, guest_tests_binary};
    let assets = VmAssets::locate().context("the VM assets (cargo xtask vm-prepare)")?;
    let beside = |name: &str| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join(name)))
            .filter(|p| p.exists())
            .with_context(|| format!("{name} next to chaos-bench (cargo build --release -p chaos-tests --bin {name})"))
    };
    let (init, services) = (beside("chaos-vm-init")?, beside("chaos-vm-services")?);
    let guest_bin = guest_tests_binary().context("the guest's test binary (release)")?;
    let agent = std::env::var_os("CHAOS_AGENT_BIN").map(std::path::PathBuf::from).context("CHAOS_AGENT_BIN")?;
    title("accuracy — added delay through the agent vs raw tc netem, interleaved in one qemu boot");
    note(format!("guest kernel {}, agent {}", assets.abi, agent.display()));
    let guest = Guest::builder(&assets)
        .init(init)
        .binary(&guest_bin, "/usr/local/bin/chaos-vm-guest")
        .binary(services, "/usr/local/bin/chaos-vm-services")
        .binary(&agent, "/usr/local/bin/lymph-chaos")
        .module("bridge")
        .module("8021q")
        .module("bonding")
        .env("CHAOS_AGENT_BIN", "/usr/local/bin/lymph-chaos")
        .env("CHAOS_VM_ACCURACY", "1")
        .exec(["/usr/local/bin/chaos-vm-guest", "--ignored", "--test-threads=1", "--nocapture", "compare_"])
        .build()?;
    progress("accuracy: booting the guest (a few minutes under TCG)");
    let run = guest.run(ACCURACY_BOOT_TIMEOUT)?;
    ensure!(run.done.is_some(), "the guest never finished:\n{}", run.console_tail(60));
    let rows: Vec<(&str, &chaos_tests::vm::ScenarioResult, &chaos_tests::vm::ScenarioResult)> = run
        .results
        .iter()
        .filter_map(|ours| {
            let name = ours.name.strip_prefix("agent-")?;
            let raw = run.results.iter().find(|r| r.name.strip_prefix("tc-") == Some(name))?;
            Some((name, raw, ours))
        })
        .collect();
    ensure!(!rows.is_empty(), "no comparison reported:\n{}", run.console_tail(60));
    println!(
        "  {:<24} {:>9}  {:>9} {:>9} {:>7}  {:>9} {:>9} {:>7}  {:>6}  {:>7}",
        "scenario", "want", "raw p50", "ours p50", "Δp50", "raw p90", "ours p90", "Δp90", "n", "verdict"
    );
    let num = |r: &chaos_tests::vm::ScenarioResult, k: &str| r.number(k).unwrap_or(f64::NAN);
    let (mut d50s, mut d90s) = (Vec::new(), Vec::new());
    for (name, raw, ours) in &rows {
        let (d50, d90) = (num(ours, "ms") - num(raw, "ms"), num(ours, "p90_ms") - num(raw, "p90_ms"));
        let want = match (ours.number("want_ms"), ours.number("jitter_ms")) {
            (Some(w), Some(j)) => format!("{w:.0}±{j:.0} ms"),
            (Some(w), None) => format!("{w:.0} ms"),
            _ => "-".into(),
        };
        if ours.number("jitter_ms").is_none() {
            d50s.push(d50.abs());
            d90s.push(d90.abs());
        }
        println!(
            "  {name:<24} {want:>9}  {:>9.2} {:>9.2} {d50:>+7.2}  {:>9.2} {:>9.2} {d90:>+7.2}  {:>6}  {:>7}",
            num(raw, "ms"),
            num(ours, "ms"),
            num(raw, "p90_ms"),
            num(ours, "p90_ms"),
            ours.value("n").unwrap_or("-"),
            if ours.passed { "pass" } else { "FAIL" },
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    note(format!(
        "RTT in ms. Over the {} fixed-delay scenarios: median |Δp50| {:.2} ms, median |Δp90| {:.2} ms (raw netem is the \
         baseline: 0 would be identical)",
        d50s.len(),
        median(&mut d50s),
        median(&mut d90s)
    ));
    note(format!(
        "boot → done {:.0} s wall; numbers under TCG on a shared host, each comparison interleaved in rounds",
        run.wall.as_secs_f64()
    ));
    Ok(())
}
