//! The VM tier: boots a qemu guest (Debian 12 kernel, TCG) once; its Rust `/init` (`chaos-vm-init`) runs the
//! libtest binary `chaos-vm-guest` (`tests/guest/`: the scenarios as `#[test]`s) with `--ignored --test-threads=1
//! --nocapture`: every fault through a real `lymph-chaos agent` and, interleaved with it in the same boot, through
//! raw `tc netem`; the agent is judged against raw netem, never against the clock (see `tests/guest/main.rs`).
//! Here, on the host: libtest's `test <name> ... ok|FAILED` lines say which tests passed, the `RESULT <row> …`
//! lines the tests print carry the numbers, printed as a raw-netem vs agent table; a test or row that never
//! reported fails the tier.
//!
//! Needs `cargo xtask vm-prepare` first (qemu from bookworm-backports + the pinned kernel under `target/vm/`) and a
//! built agent (`cargo build -p chaos-agent` after `cargo xtask build-ebpf`; or `CHAOS_AGENT_BIN`); the guest's
//! test binary is built here if needed (`chaos_tests::vm::guest_tests_binary`).
//! Run: `cargo test -p chaos-tests --test vm -- --ignored --nocapture` (`CHAOS_VM_ECHO=1` streams the console), or
//! `cargo xtask vm-test`. `CHAOS_VM_GUEST_ARGS="compare_delay agent_kill9"` passes libtest arguments to the guest:
//! test name filters run only the tests whose names contain one of the words (for debugging; the check that every
//! test and row reported is then skipped).
//!
//! `CHAOS_VM_MUTANT=wrong-port|double-delay|no-expiry` (`cargo xtask vm-test --mutant KIND`) runs the same
//! scenarios against a deliberately wrong agent — every fault request made wrong that way — and passes only when
//! every row that kind must break failed: the tier's self-check.

use std::time::{Duration, Instant};

use chaos_tests::{
    agent::agent_bin,
    mutant::{MUTANT_ENV, Mutant},
    vm::{Guest, GuestRun, TestVerdict, VmAssets, comparison_table, guest_tests_binary},
};

/// Upper bound for the boot (`timeout` kills qemu after it). A run takes 3–7 minutes of wall time under TCG on 2
/// cores (failed rounds are measured again, up to 8 rounds), more on a host busy with other work. It stays below
/// the runner's limit for this test (.config/nextest.toml: 8 × 120 s), so a guest that hangs is reported by this
/// test with its console tail instead of being killed silently.
const BOOT_TIMEOUT: Duration = Duration::from_secs(840);
/// Console lines shown when something failed.
const TAIL_LINES: usize = 120;
const GUEST_BIN: &str = "/usr/local/bin/chaos-vm-guest";
const SERVICES_BIN: &str = "/usr/local/bin/chaos-vm-services";
const AGENT_BIN: &str = "/usr/local/bin/lymph-chaos";
/// Extra libtest arguments for `chaos-vm-guest` (test name filters).
const GUEST_ARGS_ENV: &str = "CHAOS_VM_GUEST_ARGS";
/// The guest's tests: each must report `ok` (a test that silently did not run fails the tier).
const TESTS: &[&str] = &[
    "baseline",
    "compare_delay_10ms",
    "compare_delay_100ms",
    "compare_jitter_50ms_20ms",
    "compare_direction_from_50ms",
    "compare_direction_both_50ms",
    "compare_two_faults",
    "compare_reply_conn",
    "compare_ingress_veth",
    "compare_bridge_latency_50ms",
    "loss_udp_30pct",
    "loss_tcp_10pct",
    "loss_udp_30pct_vlan",
    "loss_udp_30pct_bond",
    "mutant_wrong_port",
    "mutant_double_delay",
    "mutant_no_expiry",
    "agent_kill9_then_restart",
    "agent_stop_clean",
    "agent_root_qdisc_kept",
];
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
    let extra = std::env::var(GUEST_ARGS_ENV).unwrap_or_default();
    let mutant = Mutant::from_env();
    let run = boot(&extra, mutant);
    if mutant != Mutant::None {
        return check_mutant_caught(&run, mutant);
    }
    let mut missing: Vec<String> = Vec::new();
    if extra.trim().is_empty() {
        missing.extend(TESTS.iter().filter(|t| run.test(t).is_none()).map(|t| format!("test {t}")));
        missing.extend(expected_rows().into_iter().filter(|name| run.result(name).is_none()));
    } else {
        println!("{GUEST_ARGS_ENV}={extra}: not checking that every test and row reported");
    }
    let failed_tests: Vec<&str> =
        run.tests.iter().filter(|t| t.verdict != TestVerdict::Ok).map(|t| t.name.as_str()).collect();
    if !run.ok() || !missing.is_empty() || !failed_tests.is_empty() {
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
    assert!(!run.tests.is_empty(), "the guest's test binary reported no test (console tail above)");
    assert!(
        failed_tests.is_empty(),
        "guest tests failed or were ignored: {failed_tests:?} (numbers and console above)"
    );
    let failed: Vec<&str> = run.failures().map(|r| r.name.as_str()).collect();
    assert!(failed.is_empty(), "scenarios failed: {failed:?} (measured numbers and console tail above)");
    assert!(missing.is_empty(), "never reported: {missing:?} (console tail above)");
    assert_eq!(done.exit, 0, "the guest's test binary exited {}", done.exit);
}

/// Builds the guest (the Rust init, the test binary, the services, the agent, the device-stack modules), boots it
/// and prints what it reported.
fn boot(extra: &str, mutant: Mutant) -> GuestRun {
    let assets = VmAssets::locate().unwrap_or_else(|err| panic!("{err:#}\n(run cargo xtask vm-prepare)"));
    println!("guest kernel {} ({})", assets.abi, assets.kernel.display());
    let agent = agent_bin();
    println!("agent binary {}", agent.display());
    let tests = guest_tests_binary().unwrap_or_else(|err| panic!("the guest's test binary: {err:#}"));
    println!("guest tests {}", tests.display());
    let mut argv: Vec<String> = [GUEST_BIN, "--ignored", "--test-threads=1", "--nocapture"].map(str::to_owned).to_vec();
    if mutant != Mutant::None {
        // The self-checks set their own mutant; against a wrong agent they would only cost time.
        argv.extend(["--skip".into(), "mutant_".into()]);
    }
    argv.extend(extra.split_whitespace().map(str::to_owned));
    let guest = Guest::builder(&assets)
        .init(env!("CARGO_BIN_EXE_chaos-vm-init"))
        .binary(&tests, GUEST_BIN)
        .binary(env!("CARGO_BIN_EXE_chaos-vm-services"), SERVICES_BIN)
        .binary(&agent, AGENT_BIN)
        // Device stacks the network engine must see through (the caller behind a bridge, a VLAN, a bond).
        .module("bridge")
        .module("8021q")
        .module("bonding")
        .env("CHAOS_AGENT_BIN", AGENT_BIN)
        .env(MUTANT_ENV, if mutant == Mutant::None { "" } else { mutant.name() })
        .env("RUST_BACKTRACE", "1")
        .exec(argv)
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
    let verdicts: Vec<String> = run.tests.iter().map(|t| format!("{} {:?}", t.name, t.verdict)).collect();
    println!("guest tests ({}): {}", run.tests.len(), verdicts.join(", "));
    println!("\n{}", run.table());
    println!("ours vs raw tc netem (same boot, interleaved; RTT in ms; added = median − no-fault median):");
    println!("{}", comparison_table(&run.results));
    run
}

/// A wrong agent must fail every row its kind breaks (a row that passed or never reported is a miss).
fn check_mutant_caught(run: &GuestRun, mutant: Mutant) {
    let kind = mutant.name();
    let must_fail = rows_a_mutant_breaks(kind);
    let caught: Vec<&str> =
        must_fail.iter().map(String::as_str).filter(|r| run.result(r).is_some_and(|r| !r.passed)).collect();
    let missed: Vec<&str> = must_fail.iter().map(String::as_str).filter(|r| !caught.contains(r)).collect();
    println!("mutant {kind}: {} of {} rows it must break failed: {caught:?}", caught.len(), must_fail.len());
    if !missed.is_empty() {
        println!("--- guest console (last {TAIL_LINES} lines) ---\n{}", run.console_tail(TAIL_LINES));
    }
    assert!(
        missed.is_empty(),
        "the tier did NOT catch the wrong agent ({kind}) in {missed:?}: it passed or never reported them"
    );
    assert!(run.done.is_some(), "the guest never finished; console tail:\n{}", run.console_tail(TAIL_LINES));
}
