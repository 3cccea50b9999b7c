//! The systemd tier: the agent installed as a sysadmin installs it — from the .deb, and with `cargo xtask
//! install` — in a Debian 12 guest booted under qemu (TCG, the pinned Debian kernel) with systemd as PID 1, and
//! lintian on the packages.
//!
//! `cargo xtask test --tier systemd` prepares the inputs and passes them in the environment:
//! - `CHAOS_SYSTEMD_IMAGE` — the guest's root filesystem (ext4 image built by mmdebstrap from Debian's
//!   packages, cached under `target/systemd-guest/`; booted with `snapshot=on`, so it never changes);
//! - `CHAOS_SYSTEMD_DEB`, `CHAOS_SYSTEMD_DBGSYM` — the packages (`cargo xtask deb` of the debug agent);
//! - `CHAOS_SYSTEMD_XTASK` — the xtask binary (for `cargo xtask install` in the guest);
//! - `CHAOS_VM_ASSETS` — the kernel (`cargo xtask vm-prepare`).
//!
//! One boot: an initramfs (busybox, the virtio/ext4 modules and the tc modules) mounts the image and
//! `switch_root`s to systemd; `chaos-guest-run.service` (part of the image) unpacks the second disk — a tar of
//! `tests/systemd/guest.sh`, the packages, the xtask binary and `chaos-agent/dist/` — and runs the script, which
//! prints one `RESULT` line per step on the serial console ([`STEPS`]; what each proves is in the script) and
//! powers off. The guest has no network card; everything it talks to is on its loopback.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use chaos_tests::vm::{Guest, VmAssets};

/// Every step `guest.sh` reports, in order. A step missing from the console fails the test.
const STEPS: &[&str] = &[
    "systemd-pid1",
    "zookeeper-listening",
    "deb-install",
    "unit-enabled",
    "unit-active-answering",
    "registered-in-zookeeper",
    "man-page-and-completions",
    "dbgsym-install",
    "guardian-own-scope",
    "security-exposure",
    "limits",
    "systemctl-restart",
    "journald-single-timestamps",
    "victim-started",
    "listener-started",
    "kill9-faults-active",
    "kill9-guardian-survives",
    "kill9-restarted",
    "kill9-pause-ended",
    "kill9-cpu-ended",
    "kill9-latency-ended",
    "kill9-fill-ended",
    "kill9-old-guardian-stopped",
    "start-limit-hit",
    "start-limit-faults-kept",
    "start-limit-pause-ended",
    "start-limit-latency-ended",
    "start-limit-guardian-cleans-up",
    "start-after-reset",
    "stop-reverts-everything",
    "stop-dismisses-guardian",
    "apt-remove",
    "apt-purge-leaves-nothing",
    "xtask-install",
    "xtask-uninstall-leaves-nothing",
];
/// Boot, ZooKeeper, install, every step and the poweroff; the runner kills the test after 12 min anyway.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const TAIL_LINES: usize = 120;
/// Modules the initramfs loads: the root disk, then the tc modules the agent uses (autoload of tc modules is
/// unreliable on 6.1, see tests/src/vm.rs), which stay loaded after `switch_root`.
const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];
/// The initramfs hands over to systemd.
const SWITCH_ROOT: &str = "\
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /newroot && mount -t ext4 -o rw /dev/vda /newroot || { echo 'GUEST-DONE exit=90 (no root disk)'; poweroff -f; }
umount /sys/fs/bpf /tmp /run 2>/dev/null
mount --move /dev /newroot/dev && mount --move /proc /newroot/proc && mount --move /sys /newroot/sys
exec switch_root /newroot /sbin/init";

/// The tier's inputs, from the environment `cargo xtask test` sets.
struct Inputs {
    image: PathBuf,
    deb: PathBuf,
    dbgsym: PathBuf,
    xtask: PathBuf,
}

impl Inputs {
    /// Panics when the tier was not prepared: these tests are `#[ignore]`d, and `cargo xtask test` only runs them
    /// after preparing the inputs (or reports the tier as skipped, with the reason, without running them).
    fn from_env() -> Inputs {
        let get = |var: &str| {
            let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
                panic!("{var} is not set: run the systemd tier through cargo xtask test --tier systemd")
            });
            assert!(path.exists(), "{var}={} does not exist", path.display());
            path
        };
        Inputs {
            image: get("CHAOS_SYSTEMD_IMAGE"),
            deb: get("CHAOS_SYSTEMD_DEB"),
            dbgsym: get("CHAOS_SYSTEMD_DBGSYM"),
            xtask: get("CHAOS_SYSTEMD_XTASK"),
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace").to_path_buf()
}

/// The second disk: a tar archive with the script (`run`), the packages, the xtask binary, `env`, and
/// `repo/chaos-agent/dist/` (what `cargo xtask install` reads from the workspace).
fn payload(inputs: &Inputs, dir: &Path) -> PathBuf {
    let stage = dir.join("payload");
    fs::create_dir_all(stage.join("repo/chaos-agent")).unwrap();
    fs::copy(workspace().join("tests/systemd/guest.sh"), stage.join("run")).unwrap();
    for deb in [&inputs.deb, &inputs.dbgsym] {
        fs::copy(deb, stage.join(deb.file_name().unwrap())).unwrap();
    }
    // Without its debug information: 10× smaller, same program.
    let status = Command::new("objcopy").arg("--strip-debug").arg(&inputs.xtask).arg(stage.join("xtask")).status();
    if !status.is_ok_and(|s| s.success()) {
        fs::copy(&inputs.xtask, stage.join("xtask")).unwrap();
    }
    let status = Command::new("cp")
        .arg("-r")
        .arg(workspace().join("chaos-agent/dist"))
        .arg(stage.join("repo/chaos-agent/dist"))
        .status()
        .unwrap();
    assert!(status.success(), "copying chaos-agent/dist");
    fs::write(stage.join("env"), format!("REPO_ROOT={}\n", workspace().display())).unwrap();
    let tar = dir.join("payload.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("--owner=0")
        .arg("--group=0")
        .arg("-C")
        .arg(&stage)
        .arg(".")
        .status();
    assert!(status.is_ok_and(|s| s.success()), "tar of the payload");
    tar
}

#[test]
#[ignore = "boots a Debian guest with systemd under qemu: run by cargo xtask test --tier systemd"]
fn the_package_and_the_service_under_systemd() {
    let inputs = Inputs::from_env();
    let assets = VmAssets::locate().unwrap_or_else(|err| panic!("{err:#}\n(run cargo xtask vm-prepare)"));
    let work = tempfile::Builder::new().prefix("chaos-systemd-tier.").tempdir().unwrap();
    let tar = payload(&inputs, work.path());
    println!(
        "guest: kernel {}, image {}, payload {:.1} MB ({})",
        assets.abi,
        inputs.image.display(),
        fs::metadata(&tar).unwrap().len() as f64 / 1e6,
        inputs.deb.display()
    );
    let mut builder = Guest::builder(&assets)
        .memory_mib(2048)
        .qemu_arg("-drive")
        .qemu_arg(format!("file={},format=raw,if=virtio,snapshot=on", inputs.image.display()))
        .qemu_arg("-drive")
        .qemu_arg(format!("file={},format=raw,if=virtio,readonly=on", tar.display()))
        .kernel_arg("systemd.getty_auto=0")
        .command(SWITCH_ROOT);
    for module in ROOT_MODULES {
        builder = builder.module(*module);
    }
    let guest = builder.build().expect("building the initramfs");

    let started = Instant::now();
    let run = guest.run(BOOT_TIMEOUT).expect("starting qemu");
    println!(
        "boot → poweroff: {:.1} s wall (qemu exit: {}), guest uptime at the end: {}",
        started.elapsed().as_secs_f64(),
        run.status,
        run.done.and_then(|d| d.uptime_s).map_or("-".into(), |s| format!("{s:.1} s"))
    );
    println!("\n{}", run.table());
    let security: Vec<&str> = run.console.lines().filter_map(|l| l.strip_prefix("SECURITY| ")).collect();
    if let Some(overall) = security.iter().find(|l| l.contains("Overall exposure level")) {
        println!("systemd-analyze security lymph-chaos.service: {}", overall.trim_start_matches(['→', ' ']));
    }
    let missing: Vec<&str> = STEPS.iter().copied().filter(|s| run.result(s).is_none()).collect();
    if !run.ok() || !missing.is_empty() {
        for failed in run.failures() {
            println!("FAILED {}: {}", failed.name, failed.values_line());
        }
        for line in run.console.lines().filter(|l| l.starts_with("DETAIL ")) {
            println!("{line}");
        }
        println!("--- guest console (last {TAIL_LINES} lines) ---\n{}", run.console_tail(TAIL_LINES));
    }
    let done = run.done.unwrap_or_else(|| {
        panic!("the guest never printed GUEST-DONE (hung, crashed or killed after {BOOT_TIMEOUT:?}); console above")
    });
    let failed: Vec<&str> = run.failures().map(|r| r.name.as_str()).collect();
    assert!(failed.is_empty(), "steps failed: {failed:?} (measured values, DETAIL lines and console above)");
    assert!(missing.is_empty(), "steps never reported: {missing:?} (console above)");
    assert_eq!(done.exit, 0, "the guest script counted {} failed steps", done.exit);
}

#[test]
#[ignore = "needs the packages built by cargo xtask test --tier systemd, and lintian"]
fn lintian_finds_no_error_or_warning() {
    let inputs = Inputs::from_env();
    // --fail-on error,warning: a tag of either severity fails. Overridden tags (each justified in the package's
    // /usr/share/lintian/overrides/) do not count; `--show-overrides` would list them but also make lintian exit
    // non-zero for them.
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--info"])
        .arg(&inputs.deb)
        .arg(&inputs.dbgsym)
        .output()
        .expect("running lintian (apt-get install lintian)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("lintian {} {}:\n{stdout}", inputs.deb.display(), inputs.dbgsym.display());
    let tags: Vec<&str> = stdout.lines().filter(|l| l.starts_with("E: ") || l.starts_with("W: ")).collect();
    assert!(tags.is_empty(), "lintian errors or warnings: {tags:#?}");
    assert!(out.status.success(), "lintian failed: {}", String::from_utf8_lossy(&out.stderr));
}
