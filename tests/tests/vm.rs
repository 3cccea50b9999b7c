//! The VM tier: boots a qemu guest (Debian 12 kernel, TCG) once and runs `chaos-vm-guest` in it: every fault
//! through a real `lymph-chaos agent` and, interleaved with it in the same boot, through raw `tc netem`; the agent
//! is judged against raw netem, never against the clock (see `tests/src/bin/chaos-vm-guest.rs` for the scenarios
//! and the verdict), and the numbers are printed with a raw-netem vs agent table.
//!
//! Needs `cargo xtask vm-prepare` first (qemu from bookworm-backports + the pinned kernel under `target/vm/`) and a
//! built agent (`cargo build -p chaos-agent` after `cargo xtask build-ebpf`; or `CHAOS_AGENT_BIN`).
//! Run: `cargo test -p chaos-tests --test vm -- --ignored --nocapture` (`CHAOS_VM_ECHO=1` streams the console), or
//! `cargo xtask vm-test`. `CHAOS_VM_GUEST_ARGS="agent-delay tc-delay"` runs only the scenarios whose names contain
//! one of the words (for debugging; the check that every scenario reported is then skipped).
//!
//! `CHAOS_VM_MUTANT=wrong-port|double-delay|no-expiry` (`cargo xtask vm-test --mutant KIND`) runs the same
//! scenarios against a deliberately wrong agent — every fault request made wrong that way — and passes only when
//! every row that kind must break failed: the tier's self-check.

use std::time::{Duration, Instant};

use chaos_tests::{
    agent::agent_bin,
    vm::{Guest, VmAssets, comparison_table},
};

/// Upper bound for the boot (`timeout` kills qemu after it). A run takes 3–7 minutes of wall time under TCG on 2
/// cores (failed rounds are measured again, up to 8 rounds), more on a host busy with other work. It stays below
/// the runner's limit for this test (.config/nextest.toml: 8 × 120 s), so a guest that hangs is reported by this
/// test with its console tail instead of being killed silently.
const BOOT_TIMEOUT: Duration = Duration::from_secs(840);
/// Console lines shown when something failed.
const TAIL_LINES: usize = 120;
const GUEST_BIN: &str = "/usr/local/bin/chaos-vm-guest";
const AGENT_BIN: &str = "/usr/local/bin/lymph-chaos";
/// Extra arguments for `chaos-vm-guest` (scenario name filters, `--summary`).
const GUEST_ARGS_ENV: &str = "CHAOS_VM_GUEST_ARGS";
/// A mutant kind: the run must fail the rows that kind breaks.
const MUTANT_ENV: &str = "CHAOS_VM_MUTANT";
/// The delay comparisons: each reports `tc-<name>` (raw netem) and `agent-<name>` (the verdict).
const DELAY_ROWS: &[&str] = &[
    "delay-10ms-v4",
    "delay-10ms-v6",
    "delay-100ms-v4",
    "delay-100ms-v6",
    "jitter-50ms-20ms",
    "direction-from-50ms",
    "direction-both-50ms",
    "two-faults-echo-30ms",
    "two-faults-reply-60ms",
    "reply-conn",
    "ingress-veth-v4",
    "ingress-veth-v6",
    "bridge-latency-50ms",
];
/// Every other scenario the guest must have reported (a missing one fails the test as much as a failed one).
const OTHER_ROWS: &[&str] = &[
    "baseline",
    "tc-loss-30pct-udp",
    "agent-loss-30pct-udp",
    "tc-loss-10pct-tcp",
    "agent-loss-10pct-tcp",
    "agent-loss-30pct-udp-vlan",
    "agent-loss-30pct-udp-bond",
    "mutant-wrong-port",
    "mutant-double-delay",
    "mutant-no-expiry",
    "agent-kill9-expiry",
    "agent-restart-clean",
    "agent-restart-leftovers",
    "agent-stop-clean",
    "agent-root-qdisc-kept",
];

fn expected_rows() -> Vec<String> {
    let mut rows: Vec<String> = DELAY_ROWS.iter().flat_map(|r| [format!("tc-{r}"), format!("agent-{r}")]).collect();
    rows.extend(OTHER_ROWS.iter().map(|r| (*r).to_owned()));
    rows
}

/// The rows a wrong agent of `kind` must fail.
fn rows_a_mutant_breaks(kind: &str) -> Vec<String> {
    match kind {
        "wrong-port" | "double-delay" => DELAY_ROWS.iter().map(|r| format!("agent-{r}")).collect(),
        "no-expiry" => vec!["agent-kill9-expiry".into()],
        other => panic!("{MUTANT_ENV}={other}: not a mutant (wrong-port, double-delay, no-expiry)"),
    }
}

#[test]
#[ignore = "boots a qemu guest: run by cargo xtask test / cargo xtask vm-test"]
fn netem_and_agent_scenarios_in_a_debian_guest() {
    let assets = VmAssets::locate().unwrap_or_else(|err| panic!("{err:#}\n(run cargo xtask vm-prepare)"));
    println!("guest kernel {} ({})", assets.abi, assets.kernel.display());
    let agent = agent_bin();
    println!("agent binary {}", agent.display());

    let extra = std::env::var(GUEST_ARGS_ENV).unwrap_or_default();
    let mutant = std::env::var(MUTANT_ENV).ok().filter(|m| !m.is_empty());
    let must_fail = mutant.as_deref().map(rows_a_mutant_breaks);
    let mutant_arg = mutant.as_deref().map_or_else(String::new, |m| format!("--mutant {m}"));
    let guest = Guest::builder(&assets)
        .binary(env!("CARGO_BIN_EXE_chaos-vm-guest"), GUEST_BIN)
        .binary(&agent, AGENT_BIN)
        // Device stacks the network engine must see through (the caller behind a bridge, a VLAN, a bond).
        .module("bridge")
        .module("8021q")
        .module("bonding")
        .command(format!("{GUEST_BIN} --agent-bin {AGENT_BIN} {mutant_arg} {extra}"))
        .build()
        .expect("building the guest initramfs");
    println!(
        "guest built in {:.2} s: {} ({:.1} MB)",
        guest.build_time().as_secs_f64(),
        guest.initrd().display(),
        guest.initrd_bytes() as f64 / 1e6
    );

    let started = Instant::now();
    let run = guest.run(BOOT_TIMEOUT).expect("starting qemu");
    println!(
        "boot → done: {:.1} s wall (qemu exit: {}), guest uptime at done: {}",
        started.elapsed().as_secs_f64(),
        run.status,
        run.done.and_then(|d| d.uptime_s).map_or("-".into(), |s| format!("{s:.1} s"))
    );
    println!("\n{}", run.table());
    println!("ours vs raw tc netem (same boot, interleaved; RTT in ms; added = median − no-fault median):");
    println!("{}", comparison_table(&run.results));

    if let (Some(kind), Some(must_fail)) = (&mutant, &must_fail) {
        let caught: Vec<&str> =
            must_fail.iter().map(String::as_str).filter(|r| run.result(r).is_some_and(|r| !r.passed)).collect();
        let missed: Vec<&str> = must_fail.iter().map(String::as_str).filter(|r| !caught.contains(r)).collect();
        println!("mutant {kind}: {} of {} rows it must break failed: {caught:?}", caught.len(), must_fail.len());
        assert!(
            missed.is_empty(),
            "the tier did NOT catch the wrong agent ({kind}) in {missed:?}: it passed or never reported them"
        );
        assert!(run.done.is_some(), "the guest never finished; console tail:\n{}", run.console_tail(TAIL_LINES));
        return;
    }
    let missing: Vec<String> = if extra.trim().is_empty() {
        expected_rows().into_iter().filter(|name| run.result(name).is_none()).collect()
    } else {
        println!("{GUEST_ARGS_ENV}={extra}: not checking that every scenario reported");
        Vec::new()
    };
    if !run.ok() || !missing.is_empty() {
        for failed in run.failures() {
            println!("FAILED {}: {}", failed.name, failed.values_line());
        }
        if !missing.is_empty() {
            println!("MISSING {missing:?}");
        }
        println!("--- guest console (last {TAIL_LINES} lines) ---\n{}", run.console_tail(TAIL_LINES));
    }
    let done = run.done.unwrap_or_else(|| {
        panic!(
            "the guest never printed GUEST-DONE (hung, crashed or killed after {BOOT_TIMEOUT:?}); console tail above"
        )
    });
    assert!(run.module_failures.is_empty(), "modules failed to load in the guest: {:?}", run.module_failures);
    let failed: Vec<&str> = run.failures().map(|r| r.name.as_str()).collect();
    assert!(failed.is_empty(), "scenarios failed: {failed:?} (measured numbers and console tail above)");
    assert!(missing.is_empty(), "scenarios never reported: {missing:?} (console tail above)");
    assert_eq!(done.exit, 0, "the guest command exited {}", done.exit);
}
