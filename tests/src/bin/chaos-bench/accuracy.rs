//! accuracy: the agent's delay next to raw `tc netem` in a qemu guest (see [`run`]), and the EDT backend next to
//! netem in a guest without `sch_netem` (see [`edt`]).

use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::{progress, report::*};

/// How long the accuracy guest may run.
const ACCURACY_BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// Rounds per delay case in the EDT boot (the VM tier runs 4).
const EDT_ROUNDS: usize = 8;

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
    edt(&assets, &agent)
}

/// The EDT backend next to netem: the EDT boot of the VM tier (`chaos-vm-edt`, kernel without `sch_netem`) with
/// more rounds. Per delay case, the delay added through the agent's EDT fault and through raw netem loaded later in
/// the same boot (each over its own interleaved no-fault rounds); then the guest's busy CPU time per UDP datagram
/// through a 1 ms delay served by EDT and by netem (the same agent, only the leaf differs) next to no fault.
fn edt(assets: &chaos_tests::vm::VmAssets, agent: &std::path::Path) -> Result<()> {
    let guest_bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join("chaos-vm-edt"))
        .filter(|p| p.exists())
        .context("chaos-vm-edt next to chaos-bench (cargo build --release -p chaos-tests --bin chaos-vm-edt)")?;
    title("accuracy (EDT) — delay through the EDT backend (no sch_netem) vs raw tc netem loaded later, one boot");
    let guest = chaos_tests::edt::guest(assets, &guest_bin, agent, &format!("--rounds {EDT_ROUNDS}"))?;
    progress("accuracy: booting the EDT guest (a few minutes under TCG)");
    let run = guest.run(ACCURACY_BOOT_TIMEOUT)?;
    ensure!(run.done.is_some(), "the EDT guest never finished:\n{}", run.console_tail(60));
    let num = |r: &chaos_tests::vm::ScenarioResult, k: &str| r.number(k).unwrap_or(f64::NAN);
    println!(
        "  {:<20} {:>10}  {:>10} {:>10} {:>7}  {:>10} {:>10}  {:>12}  {:>7}",
        "case", "want", "netem +p50", "EDT +p50", "Δp50", "netem p90", "EDT p90", "spread n/E", "verdict"
    );
    for ours in run.results.iter().filter(|r| r.name.starts_with("agent-edt-")) {
        let case = ours.name.trim_start_matches("agent-edt-");
        let Some(raw) = run.result(&format!("tc-edt-{case}")) else { continue };
        println!(
            "  {case:<20} {:>10}  {:>10.2} {:>10.2} {:>+7.2}  {:>10.2} {:>10.2}  {:>5.1}/{:<6.1}  {:>7}",
            format!("{:.0} ms", num(ours, "want_ms")),
            num(raw, "extra_ms"),
            num(ours, "extra_ms"),
            num(ours, "diff_ms"),
            num(raw, "p90_ms") - num(raw, "base_ms"),
            num(ours, "p90_ms") - num(ours, "base_ms"),
            num(raw, "spread_ms"),
            num(ours, "spread_ms"),
            if ours.passed { "pass" } else { "FAIL" },
        );
    }
    note("RTT in ms added over each backend's own no-fault rounds (p90 likewise); spread = p10–p90");
    for (name, what) in [("edt-order", "EDT"), ("tc-order", "netem")] {
        if let Some(r) = run.result(name) {
            note(format!(
                "flow order, 50 ± 20 ms, {} UDP datagrams 1 ms apart through {what}: {} arrived out of order",
                r.value("sent").unwrap_or("-"),
                r.value("reordered").unwrap_or("-")
            ));
        }
    }
    if let Some(c) = run.result("cost") {
        note(format!(
            "busy guest CPU per UDP datagram through a 1 ms delay ({} datagrams): EDT {} µs, netem {} µs, no fault \
             {} µs (TCG: only the comparison means something)",
            c.value("packets").unwrap_or("-"),
            c.value("edt_us_per_packet").unwrap_or("-"),
            c.value("netem_us_per_packet").unwrap_or("-"),
            c.value("no_fault_us_per_packet").unwrap_or("-"),
        ));
    }
    let failed: Vec<&str> = run.failures().map(|r| r.name.as_str()).collect();
    if !failed.is_empty() {
        note(format!("rows that failed their verdict: {failed:?}"));
    }
    note(format!("boot → done {:.0} s wall", run.wall.as_secs_f64()));
    Ok(())
}
