//! `cargo xtask bench [rpc|network|changes|kill|classifier|accuracy|all]`: the performance claims, each measured side by side with the
//! baseline it beats, in one run of the release benchmark binary `chaos-bench` (`tests/src/bin/chaos-bench/`).
//!
//! Layout:
//! 1. prepare what the chosen benchmarks need, the way `cargo xtask test` does: the BPF object
//!    ([`ebpf::build`], embedded by the agent), and for `rpc` a private ZooKeeper + the lymph 0.15 venv
//!    ([`services`]) for the real Python service it races against;
//! 2. build `lymph-chaos` and `chaos-bench` with `--release` (benchmarks of debug builds measure the wrong thing);
//! 3. run `target/release/chaos-bench <which>` with `CHAOS_TEST_ZK`, `CHAOS_LYMPH_VENV` and `CHAOS_AGENT_BIN` set.
//!
//! The benchmark prints its tables and never fails for a number; it exits non-zero only when a benchmark could
//! not run (no root, no ZooKeeper …), and so does this task. ZooKeeper is stopped (by pid) when the run ends.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    ebpf, services,
    util::{self, step},
    vm,
};

/// The benchmarks `chaos-bench` knows (`all` runs them in this order).
pub const BENCHMARKS: [&str; 6] = ["rpc", "network", "changes", "kill", "classifier", "accuracy"];

/// The git revision whose classifier the `classifier` benchmark compares against (port-only rule keys).
pub const CLASSIFIER_BASELINE_REV: &str = "a401fe4";

/// Runs `which` (`rpc`, `network`, `changes`, `kill`, `classifier`, `accuracy` or `all`).
///
/// # Errors
/// An unknown benchmark, a failed preparation or build, or a benchmark that could not run.
pub fn run(which: &str) -> Result<()> {
    if which != "all" && !BENCHMARKS.contains(&which) {
        bail!("unknown benchmark `{which}` (one of {}, all)", BENCHMARKS.join(", "));
    }
    let wants = |name: &str| which == "all" || which == name;
    if !util::is_root() {
        eprintln!(
            "    NOTE: not root: network namespaces, BPF and signals need root; benchmarks that need it will say they \
             could not run (sudo -E cargo xtask bench)"
        );
    }

    step("preparing: the BPF classifier");
    ebpf::build()?;

    let mut env: Vec<(&str, String)> = Vec::new();
    if wants("classifier") {
        let old = ebpf::build_revision(CLASSIFIER_BASELINE_REV)?;
        env.push(("CHAOS_OLD_EBPF_OBJECT", old.display().to_string()));
    }
    if wants("accuracy") {
        step("preparing: qemu and the pinned Debian kernel (the accuracy benchmark boots a guest)");
        vm::prepare()?;
        env.push(("CHAOS_VM_ASSETS", vm::assets_env_path().display().to_string()));
    }
    let mut zookeeper = None;
    if wants("rpc") {
        step("preparing: ZooKeeper and the lymph 0.15 venv (the Python service the rpc benchmark races)");
        services::ensure_zookeeper_installed()?;
        let venv = services::ensure_lymph_venv(&util::target_dir().join("lymph-venv"))?;
        let zk = services::ZooKeeper::start(&util::target_dir().join("bench-zookeeper"))?;
        env.push((services::ZK_ENV, zk.addr()));
        env.push((services::LYMPH_VENV_ENV, venv.display().to_string()));
        zookeeper = Some(zk);
    }

    step("building the agent and the benchmark (release)");
    util::run(util::cargo().current_dir(util::root()).args([
        "build",
        "--release",
        "--package",
        "chaos-agent",
        "--bin",
        "lymph-chaos",
        "--package",
        "chaos-tests",
        "--bin",
        "chaos-bench",
        "--bin",
        "chaos-vm-init",
        "--bin",
        "chaos-vm-services",
        "--bin",
        "chaos-vm-edt",
    ]))?;
    if wants("accuracy") {
        // The guest's scenarios are a test target; chaos-bench asks cargo for the same build to find it.
        util::run(util::cargo().current_dir(util::root()).args([
            "test",
            "--no-run",
            "--release",
            "--workspace",
            "--test",
            "chaos-vm-guest",
        ]))?;
    }
    let release = util::target_dir().join("release");
    let mut cmd = Command::new(release.join("chaos-bench"));
    cmd.arg(which).env("CHAOS_AGENT_BIN", release.join("lymph-chaos"));
    for (key, value) in &env {
        cmd.env(key, value);
    }
    step(format!("running chaos-bench {which}"));
    eprintln!("    $ {}", util::show(&cmd));
    let status = cmd.status()?;
    drop(zookeeper);
    if !status.success() {
        bail!("chaos-bench {which}: some benchmark could not run ({status}); see its output");
    }
    Ok(())
}
