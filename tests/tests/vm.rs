//! The VM tier: boots a qemu guest (Debian 12 kernel, TCG) once and runs `chaos-vm-guest` in it: raw `tc netem`
//! baselines, then the same faults through a real `lymph-chaos agent` (see `tests/src/bin/chaos-vm-guest.rs` for
//! the scenarios), and prints the measured numbers with a raw-netem vs agent table.
//!
//! Needs `cargo xtask vm-prepare` first (qemu from bookworm-backports + the pinned kernel under `target/vm/`) and a
//! built agent (`cargo build -p chaos-agent` after `cargo xtask build-ebpf`; or `CHAOS_AGENT_BIN`).
//! Run: `cargo test -p chaos-tests --test vm -- --ignored --nocapture` (`CHAOS_VM_ECHO=1` streams the console), or
//! `cargo xtask vm-test`. `CHAOS_VM_GUEST_ARGS="agent-delay tc-delay"` runs only the scenarios whose names contain
//! one of the words (for debugging; the check that every scenario reported is then skipped).

use std::time::{Duration, Instant};

use chaos_tests::{
    agent::agent_bin,
    vm::{Guest, VmAssets, comparison_table},
};

/// Upper bound for the boot (`timeout` kills qemu after it). A normal run takes 2–3 minutes of wall time at most.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
/// Console lines shown when something failed.
const TAIL_LINES: usize = 120;
const GUEST_BIN: &str = "/usr/local/bin/chaos-vm-guest";
const AGENT_BIN: &str = "/usr/local/bin/lymph-chaos";
/// Extra arguments for `chaos-vm-guest` (scenario name filters, `--summary`).
const GUEST_ARGS_ENV: &str = "CHAOS_VM_GUEST_ARGS";
/// Every scenario the guest must have reported (a missing one fails the test as much as a failed one).
const EXPECTED: &[&str] = &[
    "baseline",
    "tc-delay-10ms-v4",
    "tc-delay-100ms-v4",
    "tc-delay-10ms-v6",
    "tc-delay-100ms-v6",
    "tc-jitter-50ms-20ms",
    "tc-loss-30pct-udp",
    "agent-baseline",
    "agent-delay-10ms-v4",
    "agent-delay-10ms-v6",
    "agent-delay-100ms-v4",
    "agent-delay-100ms-v6",
    "agent-jitter-50ms-20ms",
    "agent-direction-from-50ms",
    "agent-direction-both-50ms",
    "agent-two-faults",
    "agent-loss-30pct-udp",
    "agent-ingress-veth-v4",
    "agent-ingress-veth-v6",
    "agent-reply-conn",
    "agent-kill9-expiry",
    "agent-restart-clean",
    "agent-restart-leftovers",
    "agent-stop-clean",
    "agent-root-qdisc-kept",
];

#[test]
#[ignore = "boots a qemu guest: run by cargo xtask test / cargo xtask vm-test"]
fn netem_and_agent_scenarios_in_a_debian_guest() {
    let assets = VmAssets::locate().unwrap_or_else(|err| panic!("{err:#}\n(run cargo xtask vm-prepare)"));
    println!("guest kernel {} ({})", assets.abi, assets.kernel.display());
    let agent = agent_bin();
    println!("agent binary {}", agent.display());

    let extra = std::env::var(GUEST_ARGS_ENV).unwrap_or_default();
    let guest = Guest::builder(&assets)
        .binary(env!("CARGO_BIN_EXE_chaos-vm-guest"), GUEST_BIN)
        .binary(&agent, AGENT_BIN)
        .command(format!("{GUEST_BIN} --agent-bin {AGENT_BIN} {extra}"))
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
    println!("ours vs raw tc netem (same boot; RTT in ms; added = median − baseline median):");
    println!("{}", comparison_table(&run.results));

    let missing: Vec<&str> = if extra.trim().is_empty() {
        EXPECTED.iter().copied().filter(|name| run.result(name).is_none()).collect()
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
