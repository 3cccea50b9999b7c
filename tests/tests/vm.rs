//! The VM tier: boots a qemu guest (Debian 12 kernel, TCG) and runs `chaos-vm-guest` in it.
//!
//! Needs `cargo xtask vm-prepare` first (qemu from bookworm-backports + the pinned kernel under `target/vm/`).
//! Run: `cargo test -p chaos-tests --test vm -- --ignored --nocapture` (`CHAOS_VM_ECHO=1` streams the console).

use std::time::{Duration, Instant};

use chaos_tests::vm::{Guest, VmAssets};

/// Upper bound for one boot (`timeout` kills qemu after it). A normal run takes well under a minute.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Console lines shown when something failed.
const TAIL_LINES: usize = 60;
const GUEST_BIN: &str = "/usr/local/bin/chaos-vm-guest";

#[test]
#[ignore = "boots a qemu guest: run by cargo xtask test / cargo xtask vm-test"]
fn raw_netem_scenarios_in_a_debian_guest() {
    let assets = VmAssets::locate().unwrap_or_else(|err| panic!("{err:#}\n(run cargo xtask vm-prepare)"));
    println!("guest kernel {} ({})", assets.abi, assets.kernel.display());

    let guest = Guest::builder(&assets)
        .binary(env!("CARGO_BIN_EXE_chaos-vm-guest"), GUEST_BIN)
        .command(GUEST_BIN)
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

    if !run.ok() {
        for failed in run.failures() {
            println!("FAILED {}: {}", failed.name, failed.values_line());
        }
        println!("--- guest console (last {TAIL_LINES} lines) ---\n{}", run.console_tail(TAIL_LINES));
    }
    let done = run.done.unwrap_or_else(|| {
        panic!(
            "the guest never printed GUEST-DONE (hung, crashed or killed after {BOOT_TIMEOUT:?}); console tail above"
        )
    });
    assert!(!run.results.is_empty(), "the guest printed no RESULT lines");
    assert!(run.module_failures.is_empty(), "modules failed to load in the guest: {:?}", run.module_failures);
    let failed: Vec<&str> = run.failures().map(|r| r.name.as_str()).collect();
    assert!(failed.is_empty(), "scenarios failed: {failed:?} (measured numbers and console tail above)");
    assert_eq!(done.exit, 0, "the guest command exited {}", done.exit);
}
