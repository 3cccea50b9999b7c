//! The VM tier's EDT boot: the pinned Debian 12 kernel booted **without `sch_netem`** (left out of the modules
//! `/init` loads and of the image's module tree, module autoload pointed at `/bin/false`), `sch_fq` loaded. The
//! agent must serve latency through the earliest-departure-time backend, judged against raw netem measured in the
//! same boot after `insmod` of the netem module (kept in the image outside the module tree). See
//! `tests/src/bin/chaos-vm-edt.rs` for the scenarios and the verdict.
//!
//! Run: `cargo test -p chaos-tests --test vm_edt -- --ignored --nocapture` (after `cargo xtask vm-prepare` and a
//! built agent), or as part of `cargo xtask test --tier vm`. `CHAOS_VM_GUEST_ARGS="edt-delay-10ms"` runs only the
//! scenarios whose names contain one of the words (the check that every scenario reported is then skipped).

use std::time::{Duration, Instant};

use chaos_tests::{agent::agent_bin, vm::VmAssets};

/// Upper bound for the boot (below the runner's limit for `vm*` binaries, .config/nextest.toml).
const BOOT_TIMEOUT: Duration = Duration::from_secs(840);
const TAIL_LINES: usize = 120;
const GUEST_ARGS_ENV: &str = "CHAOS_VM_GUEST_ARGS";
const ROWS: &[&str] = &[
    "edt-kernel",
    "edt-probe",
    "edt-order",
    "edt-kill9-expiry",
    "tc-order",
    "edt-reprobe",
    "cost",
    "tc-edt-delay-10ms",
    "agent-edt-delay-10ms",
    "tc-edt-delay-100ms",
    "agent-edt-delay-100ms",
    "tc-edt-jitter-50ms-20ms",
    "agent-edt-jitter-50ms-20ms",
];

#[test]
#[ignore = "boots a qemu guest: run by cargo xtask test --tier vm"]
fn edt_latency_in_a_guest_without_netem() {
    let assets = VmAssets::locate().unwrap_or_else(|err| panic!("{err:#}\n(run cargo xtask vm-prepare)"));
    let agent = agent_bin();
    let extra = std::env::var(GUEST_ARGS_ENV).unwrap_or_default();
    let guest = chaos_tests::edt::guest(&assets, env!("CARGO_BIN_EXE_chaos-vm-edt").as_ref(), &agent, &extra)
        .expect("building the guest initramfs");
    let started = Instant::now();
    let run = guest.run(BOOT_TIMEOUT).expect("starting qemu");
    println!("boot → done: {:.1} s wall (qemu exit: {})", started.elapsed().as_secs_f64(), run.status);
    println!("\n{}", run.table());
    let missing: Vec<&str> = if extra.trim().is_empty() {
        ROWS.iter().copied().filter(|r| run.result(r).is_none()).collect()
    } else {
        vec![]
    };
    if !run.ok() || !missing.is_empty() || run.done.is_none() {
        for failed in run.failures() {
            println!("FAILED {}: {}", failed.name, failed.values_line());
        }
        println!("--- guest console (last {TAIL_LINES} lines) ---\n{}", run.console_tail(TAIL_LINES));
    }
    let done = run.done.unwrap_or_else(|| panic!("the guest never printed GUEST-DONE; console tail above"));
    assert!(run.module_failures.is_empty(), "modules failed to load in the guest: {:?}", run.module_failures);
    let failed: Vec<&str> = run.failures().map(|r| r.name.as_str()).collect();
    assert!(failed.is_empty(), "scenarios failed: {failed:?} (numbers and console tail above)");
    assert!(missing.is_empty(), "scenarios never reported: {missing:?}");
    assert_eq!(done.exit, 0, "the guest command exited {}", done.exit);
}
