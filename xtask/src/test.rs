//! `cargo xtask test`: every test tier, with the services each needs, in one runner invocation.
//!
//! Tiers (a test's tier is its binary: `tests/tests/<tier>_*.rs`; privileged tests are `#[ignore]`d so a plain
//! `cargo test` never runs them half-prepared):
//! 1. `unit` — unit tests, no privileges (plus binaries `unit_*`: integration tests that need nothing either); first
//!    the Python client's checks (ruff, mypy --strict, its pytest tests that need no agent: see [`crate::python`]),
//!    which stop the run when they fail, as `cargo fmt` and clippy do;
//! 2. `netns` — root, each test in fresh network namespaces (binaries `netns_*`, plus `#[ignore]`d unit tests
//!    that need root);
//! 3. `hostile` — root, the agent attacked as a local unprivileged user, a remote peer in another namespace, or a
//!    ZooKeeper writer would (binaries `hostile_*`; registry attacks need ZooKeeper and live in the zk tier as
//!    `zk_hostile_*`);
//! 4. `zk` — a private ZooKeeper started here on 127.0.0.1 and real lymph 0.15 peers in a venv (binaries `zk_*`);
//! 5. `cluster` — root, the same ZooKeeper and venv: three hosts (network namespaces on a bridge, ZooKeeper reached
//!    through the bridge) with real lymph services and one agent each, for cluster-wide Scenario semantics
//!    (binaries `cluster_*`, support in `tests/src/cluster.rs`);
//! 6. `vm` — qemu guests booting the pinned Debian kernel (binaries `vm*`);
//! 7. `systemd` — the .deb (lintian) and the agent as a systemd service in a Debian 12 guest booted with systemd as
//!    PID 1 under qemu (binaries `systemd*`): builds the guest image (`systemd_guest`, cached under `target/`) and
//!    the package from the debug agent, and passes them in `CHAOS_SYSTEMD_*`.
//!
//! A tier that cannot run is announced with its reason before anything runs; with `CI=true` that is an error.
//! The output ends with the test runner's summary (cargo-nextest when installed, else cargo test).

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use chaos_test_support::process::{ChildGuard, DieWithParent};

use crate::{
    deb, ebpf, python, services, systemd_guest,
    util::{self, step},
    vm,
};

/// The tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Unit,
    Netns,
    Hostile,
    Zk,
    Cluster,
    Vm,
    Systemd,
}

impl Tier {
    pub const ALL: [Tier; 7] =
        [Tier::Unit, Tier::Netns, Tier::Hostile, Tier::Zk, Tier::Cluster, Tier::Vm, Tier::Systemd];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Unit => "unit",
            Tier::Netns => "netns",
            Tier::Hostile => "hostile",
            Tier::Zk => "zk",
            Tier::Cluster => "cluster",
            Tier::Vm => "vm",
            Tier::Systemd => "systemd",
        }
    }

    fn parse(s: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.name() == s)
    }

    /// nextest filterset for the test binaries of this tier.
    fn binaries(self) -> &'static str {
        match self {
            Tier::Unit => "",
            Tier::Netns => "binary(/^netns_/)",
            Tier::Hostile => "binary(/^hostile_/)",
            Tier::Zk => "binary(/^zk_/)",
            Tier::Cluster => "binary(/^cluster_/)",
            Tier::Vm => "binary(/^vm/)",
            Tier::Systemd => "binary(/^systemd/)",
        }
    }
}

/// Options of `cargo xtask test`.
pub struct TestOptions {
    /// Tiers asked for (default: all).
    pub tiers: Vec<String>,
    /// Extra arguments for the test runner (e.g. a test name filter).
    pub runner_args: Vec<String>,
    /// Do not install anything (report missing pieces as skips).
    pub no_install: bool,
}

/// Runs the tiers.
pub fn run(opts: &TestOptions) -> Result<()> {
    let wanted: Vec<Tier> = if opts.tiers.is_empty() {
        Tier::ALL.to_vec()
    } else {
        opts.tiers
            .iter()
            .map(|s| {
                Tier::parse(s)
                    .with_context(|| format!("unknown tier `{s}` (unit, netns, hostile, zk, cluster, vm, systemd)"))
            })
            .collect::<Result<_>>()?
    };
    let ci = util::in_ci();
    let mut skipped: Vec<(Tier, String)> = Vec::new();
    let root = util::is_root();
    let mut env: Vec<(String, String)> = Vec::new();

    // The systemd tier's guest image takes minutes to build, mostly waiting on dpkg: build it in the background
    // while the workspace compiles (output in target/systemd-guest/build.log).
    let mut image_job = None;
    if wanted.contains(&Tier::Systemd) && root && !systemd_guest::is_cached() {
        step("preparing: the systemd tier's Debian 12 guest image, in the background");
        match systemd_guest::install_host_packages() {
            Ok(()) => {
                let log = systemd_guest::dir().join("build.log");
                let _ = std::fs::create_dir_all(systemd_guest::dir());
                let _ = std::fs::remove_file(&log);
                eprintln!("    mmdebstrap output: {}", log.display());
                image_job = Some(std::thread::spawn(move || systemd_guest::prepare(Some(&log))));
            }
            Err(err) => eprintln!("    (not in the background: {err:#})"),
        }
    }

    step("preparing: the BPF classifier");
    // Without the object the agent cannot load its classifier; the unit tier still runs.
    if let Err(err) = ebpf::build() {
        if root || ci {
            return Err(err.context("building the BPF object"));
        }
        eprintln!("    (continuing without the BPF object: {err:#})");
    }
    for tier in [Tier::Netns, Tier::Hostile, Tier::Zk, Tier::Cluster, Tier::Vm, Tier::Systemd] {
        if wanted.contains(&tier) && !root {
            skipped.push((tier, "needs root (network namespaces, BPF, signals to other processes, apt)".into()));
        }
    }
    let runnable = |t: Tier, skipped: &[(Tier, String)]| wanted.contains(&t) && !skipped.iter().any(|(s, _)| *s == t);

    for tier in [Tier::Netns, Tier::Hostile, Tier::Cluster] {
        if runnable(tier, &skipped)
            && let Err(reason) = netns_works()
        {
            skipped.push((tier, reason));
        }
    }
    let mut zookeeper = None;
    // The zk and cluster tiers share one ZooKeeper (each test under a chroot of its own) and the venv.
    let needs_zookeeper: Vec<Tier> = [Tier::Zk, Tier::Cluster].into_iter().filter(|t| runnable(*t, &skipped)).collect();
    if !needs_zookeeper.is_empty() {
        step("preparing: ZooKeeper and the lymph 0.15 venv");
        let prepared = (|| -> Result<(services::ZooKeeper, PathBuf)> {
            if !opts.no_install {
                services::ensure_zookeeper_installed()?;
            }
            let venv = services::ensure_lymph_venv(&util::target_dir().join("lymph-venv"))?;
            let zk = services::ZooKeeper::start(&util::target_dir().join("test-zookeeper"))?;
            Ok((zk, venv))
        })();
        match prepared {
            Ok((zk, venv)) => {
                eprintln!("    ZooKeeper {} (log {}), venv {}", zk.addr(), zk.log_path().display(), venv.display());
                env.push((services::ZK_ENV.into(), zk.addr()));
                env.push((services::LYMPH_VENV_ENV.into(), venv.display().to_string()));
                zookeeper = Some(zk);
            }
            Err(err) => skipped.extend(needs_zookeeper.iter().map(|t| (*t, format!("{err:#}")))),
        }
    }
    // The Python client's checks belong to the unit tier; their venv needs PyPI once.
    let mut python_check: Option<std::result::Result<PathBuf, String>> = None;
    if runnable(Tier::Unit, &skipped) {
        step("preparing: the Python check venv (ruff, mypy, pytest)");
        python_check = Some(python::prepare().map_err(|err| format!("{err:#}")));
    }
    if runnable(Tier::Vm, &skipped) {
        step("preparing: qemu and the Debian guest kernel");
        match vm::prepare() {
            Ok(_) => env.push(("CHAOS_VM_ASSETS".into(), vm::assets_env_path().display().to_string())),
            Err(err) => skipped.push((Tier::Vm, format!("{err:#}"))),
        }
    }

    if runnable(Tier::Systemd, &skipped) {
        step("preparing: the Debian 12 guest with systemd, the .deb, lintian");
        match prepare_systemd(opts.no_install, image_job.take()) {
            Ok(vars) => env.extend(vars),
            Err(err) => skipped.push((Tier::Systemd, format!("{err:#}"))),
        }
    }

    // The plan, loudly.
    step("test tiers");
    for tier in Tier::ALL {
        let state = if !wanted.contains(&tier) {
            "not requested".to_owned()
        } else if let Some((_, why)) = skipped.iter().find(|(t, _)| *t == tier) {
            format!("SKIPPED — {why}")
        } else {
            "runs".to_owned()
        };
        eprintln!("    {:<7} {state}", tier.name());
        if tier == Tier::Unit
            && let Some(check) = &python_check
        {
            let state = check.as_ref().map_or_else(|why| format!("SKIPPED — {why}"), |_| "runs".to_owned());
            eprintln!("      + Python client checks: {state}");
        }
    }
    let python_skipped = python_check.as_ref().and_then(|c| c.as_ref().err());
    if ci && (!skipped.is_empty() || python_skipped.is_some()) {
        let mut list: Vec<String> = skipped.iter().map(|(t, why)| format!("{}: {why}", t.name())).collect();
        list.extend(python_skipped.map(|why| format!("Python client checks: {why}")));
        bail!("CI must run every tier, but these cannot run here:\n  {}", list.join("\n  "));
    }
    let run_tiers: Vec<Tier> = Tier::ALL.into_iter().filter(|t| runnable(*t, &skipped)).collect();
    // The guest tiers run on their own, after the rest: the systemd tier measures fault lifetimes in seconds under
    // TCG, the VM tier milliseconds; the VM tier's result table (ours vs raw netem) ends the output, followed by
    // the runner's summary.
    let (guests, rest): (Vec<Tier>, Vec<Tier>) =
        run_tiers.iter().partition(|t| matches!(**t, Tier::Vm | Tier::Systemd));
    if let Some(Ok(venv)) = &python_check {
        python::check(venv).context("the Python client's checks failed")?;
    }
    let mut status = true;
    if !rest.is_empty() {
        status &= run_runner(&rest, &env, &opts.runner_args)?;
    }
    drop(zookeeper);
    if guests.contains(&Tier::Systemd) {
        status &= run_runner(&[Tier::Systemd], &env, &opts.runner_args)?;
    }
    let vm: Vec<Tier> = guests.into_iter().filter(|t| *t == Tier::Vm).collect();
    if !vm.is_empty() {
        status &= run_runner(&vm, &env, &opts.runner_args)?;
    }
    if !skipped.is_empty() || python_skipped.is_some() {
        // Not a pass: say so after the summary as well.
        let mut names: Vec<&str> = skipped.iter().map(|(t, _)| t.name()).collect();
        names.extend(python_skipped.map(|_| "Python client checks"));
        eprintln!("NOTE: tiers skipped (not passed): {}", names.join(", "));
    }
    if !status {
        bail!("tests failed");
    }
    Ok(())
}

type ImageJob = std::thread::JoinHandle<Result<PathBuf>>;

/// The systemd tier's inputs: qemu and the kernel (as the VM tier), the guest image, the packages built from the
/// debug agent (the tier tests packaging and service behaviour, not speed; a release build would add minutes to
/// a cold CI run), lintian. Returns the `CHAOS_*` variables for the tests.
fn prepare_systemd(no_install: bool, image_job: Option<ImageJob>) -> Result<Vec<(String, String)>> {
    vm::prepare()?;
    if !no_install {
        util::apt_install(&["lintian"], "the systemd tier (lintian checks the .deb)")?;
    }
    // The same build as the runner's (`--workspace --bins`): a package-only build would resolve features
    // differently and compile the agent twice.
    step("building the workspace (the debug agent for the .deb)");
    util::run(util::cargo().current_dir(util::root()).args(["build", "--workspace", "--bins"]))?;
    let image = match image_job {
        Some(job) => {
            step("waiting for the systemd guest image (built in the background)");
            job.join().map_err(|_| anyhow::anyhow!("the image build panicked"))??
        }
        None => systemd_guest::prepare(None)?,
    };
    let debs = tier_packages(&util::target_dir().join("debug").join("lymph-chaos"))?;
    // The xtask binary just built (the workspace build above may have replaced the one running now).
    let xtask = Some(util::target_dir().join("debug").join("xtask"))
        .filter(|p| p.is_file())
        .map_or_else(|| std::env::current_exe().context("locating the xtask binary"), Ok)?;
    let path = |p: &std::path::Path| p.display().to_string();
    Ok(vec![
        ("CHAOS_VM_ASSETS".into(), path(&vm::assets_env_path())),
        ("CHAOS_SYSTEMD_IMAGE".into(), path(&image)),
        ("CHAOS_SYSTEMD_DEB".into(), path(&debs.deb)),
        ("CHAOS_SYSTEMD_DBGSYM".into(), path(&debs.dbgsym)),
        ("CHAOS_SYSTEMD_XTASK".into(), path(&xtask)),
    ])
}

/// The packages of the debug agent, rebuilt only when the agent, `chaos-agent/dist/` or xtask itself (the packaging
/// code) changed since the last build (`target/debian/systemd-tier.stamp`): splitting off 130 MB of debug
/// information and compressing it takes a minute on 2 cores.
fn tier_packages(binary: &std::path::Path) -> Result<deb::Debs> {
    let stamp_path = util::target_dir().join("debian").join("systemd-tier.stamp");
    let describe = |stamp: &mut String, p: &std::path::Path| {
        if let Ok(m) = std::fs::metadata(p) {
            let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            stamp.push_str(&format!("{} {} {:?}\n", p.display(), m.len(), mtime));
        }
    };
    // Inputs: the agent, xtask, the shipped files; outputs: the packages (a `cargo xtask deb` in between replaces
    // them with release packages).
    let mut stamp = String::new();
    describe(&mut stamp, binary);
    if let Ok(exe) = std::env::current_exe() {
        describe(&mut stamp, &exe);
    }
    let dist = util::root().join("chaos-agent").join("dist");
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in [dist.clone(), dist.join("debian")] {
        files.extend(std::fs::read_dir(&dir)?.flatten().map(|e| e.path()).filter(|p| p.is_file()));
    }
    files.sort();
    for f in &files {
        describe(&mut stamp, f);
    }
    if let Some(debs) = deb::existing(binary) {
        let mut full = stamp.clone();
        describe(&mut full, &debs.deb);
        describe(&mut full, &debs.dbgsym);
        if std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(full.as_str()) {
            eprintln!("    packages unchanged since the last run: {} and its -dbgsym", debs.deb.display());
            return Ok(debs);
        }
    }
    let debs = deb::run(&deb::DebOptions { binary: Some(binary.to_owned()) })?;
    describe(&mut stamp, &debs.deb);
    describe(&mut stamp, &debs.dbgsym);
    std::fs::write(&stamp_path, stamp)?;
    Ok(debs)
}

fn netns_works() -> std::result::Result<(), String> {
    let name = format!("xtask-probe-{}", std::process::id());
    let ok = Command::new("ip").args(["netns", "add", &name]).status().map_err(|e| format!("cannot run ip: {e}"))?;
    if !ok.success() {
        return Err("`ip netns add` failed (no network namespaces here)".into());
    }
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    Ok(())
}

/// The nextest filterset selecting the tiers' tests.
fn filterset(tiers: &[Tier]) -> String {
    if tiers.contains(&Tier::Unit) {
        // Everything, minus the binaries of tiers not running.
        let excluded: Vec<String> = [Tier::Netns, Tier::Hostile, Tier::Zk, Tier::Cluster, Tier::Vm, Tier::Systemd]
            .into_iter()
            .filter(|t| !tiers.contains(t))
            .map(|t| format!("not {}", t.binaries()))
            .collect();
        return if excluded.is_empty() { "all()".into() } else { excluded.join(" and ") };
    }
    // Only the requested tiers: their binaries (the netns tier also owns the root-only unit tests).
    tiers
        .iter()
        .map(|t| match t {
            Tier::Netns => format!("{} or kind(lib)", t.binaries()),
            other => other.binaries().to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

fn have_nextest() -> bool {
    util::cargo().args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success())
}

/// Runs the test runner once over the selected tiers; returns whether everything passed.
fn run_runner(tiers: &[Tier], env: &[(String, String)], extra: &[String]) -> Result<bool> {
    // Build first (agent binary included: tests start it as a process).
    step("building the workspace and its tests");
    util::run(util::cargo().current_dir(util::root()).args(["build", "--workspace", "--bins"]))?;
    if tiers.contains(&Tier::Vm) {
        // The scenarios the VM tier runs inside its guest: a test target the runner does not build (`test = false`);
        // built here, before the tier's time limit starts (tests/tests/vm.rs asks cargo for the same build).
        step("building the VM guest's test binary (chaos-vm-guest)");
        util::run(util::cargo().current_dir(util::root()).args([
            "test",
            "--no-run",
            "--workspace",
            "--test",
            "chaos-vm-guest",
        ]))?;
    }
    let privileged = tiers.iter().any(|t| *t != Tier::Unit);
    if have_nextest() {
        let mut cmd = util::cargo();
        cmd.current_dir(util::root()).args(["nextest", "run", "--workspace", "--no-fail-fast"]);
        if privileged {
            cmd.args(["--run-ignored", "all"]);
        }
        cmd.args(["-E", &filterset(tiers)]);
        cmd.args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        step(format!(
            "running tiers {} with cargo-nextest",
            tiers.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
        ));
        eprintln!("    $ {}", util::show(&cmd));
        return Ok(cmd.status()?.success());
    }
    // cargo test fallback: the VM binary last so its table and summary end the output.
    let mut ok = true;
    let tests_dir = util::root().join("tests").join("tests");
    let mut binaries: Vec<String> = std::fs::read_dir(&tests_dir)?
        .flatten()
        .filter_map(|e| e.path().file_stem().and_then(|s| s.to_str()).map(str::to_owned))
        .filter(|name| {
            let tier = if name.starts_with("unit_") {
                Tier::Unit
            } else if name.starts_with("hostile_") {
                Tier::Hostile
            } else if name.starts_with("zk_") {
                Tier::Zk
            } else if name.starts_with("cluster_") {
                Tier::Cluster
            } else if name.starts_with("vm") {
                Tier::Vm
            } else if name.starts_with("systemd") {
                Tier::Systemd
            } else {
                Tier::Netns
            };
            tiers.contains(&tier)
        })
        .collect();
    binaries.sort_by_key(|b| b.starts_with("vm"));
    let strs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
    let mut runs: Vec<Vec<String>> =
        vec![strs(&["--workspace", "--exclude", "chaos-tests"]), strs(&["-p", "chaos-tests", "--lib", "--bins"])];
    runs.extend(binaries.iter().map(|b| vec!["-p".into(), "chaos-tests".into(), "--test".into(), b.clone()]));
    for args in runs {
        let mut cmd = util::cargo();
        cmd.current_dir(util::root()).arg("test").args(&args).arg("--").args(extra);
        if privileged {
            cmd.arg("--include-ignored");
        }
        if args.iter().any(|a| a.starts_with("vm") || a.starts_with("systemd")) {
            cmd.arg("--nocapture");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        eprintln!("    $ {}", util::show(&cmd));
        ok &= cmd.status()?.success();
    }
    Ok(ok)
}

/// `cargo xtask vm-test`: the VM tier `runs` times in a row, optionally with one busy loop per core beside it and
/// against a mutant; each run's verdict and time, then a summary. Fails when any run failed.
///
/// # Errors
/// A run that failed (or could not run).
pub fn vm_runs(hog: bool, runs: u32, mutant: Option<&str>) -> Result<()> {
    if let Some(kind) = mutant {
        // Read by tests/tests/vm.rs: the guest makes every fault request wrong this way and the test passes only
        // when the tier failed the rows that kind must break.
        // SAFETY: set before this process starts any thread.
        unsafe { std::env::set_var("CHAOS_VM_MUTANT", kind) };
    }
    let _hogs = if hog { Some(Hogs::start()?) } else { None };
    let mut outcomes = Vec::new();
    for run in 1..=runs.max(1) {
        if runs > 1 {
            step(format!("vm-test run {run} of {runs}{}", if hog { " (CPU hog running)" } else { "" }));
        }
        let started = std::time::Instant::now();
        let result = self::run(&TestOptions { tiers: vec!["vm".into()], runner_args: Vec::new(), no_install: false });
        outcomes.push((result.is_ok(), started.elapsed()));
        if let Err(err) = result {
            eprintln!("    run {run}: {err:#}");
        }
    }
    let passed = outcomes.iter().filter(|(ok, _)| *ok).count();
    eprintln!(
        "\nvm-test: {passed} of {} runs passed{}{}",
        outcomes.len(),
        if hog { " with one busy loop per core beside them" } else { "" },
        mutant.map_or_else(String::new, |m| format!(" (mutant {m}: a pass means the tier caught it)"))
    );
    for (i, (ok, took)) in outcomes.iter().enumerate() {
        eprintln!("    run {}: {} in {:.0} s", i + 1, if *ok { "pass" } else { "FAIL" }, took.as_secs_f64());
    }
    if passed != outcomes.len() {
        bail!("{} of {} vm-test runs failed", outcomes.len() - passed, outcomes.len());
    }
    Ok(())
}

/// One busy-loop process per core (`sh -c 'while :; do :; done'`), stopped by pid on drop.
struct Hogs {
    _busy: Vec<ChildGuard>,
}

impl Hogs {
    fn start() -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let mut hogs = Vec::new();
        for _ in 0..cores {
            let mut cmd = std::process::Command::new("sh");
            // It dies with us even when we are killed.
            cmd.args(["-c", "while :; do :; done"]).stdin(std::process::Stdio::null()).die_with_parent();
            hogs.push(ChildGuard::new(cmd.spawn().context("starting a busy loop")?));
        }
        eprintln!(
            "    CPU hog: {cores} busy loops (pids {})",
            hogs.iter().map(|c| c.pid().to_string()).collect::<Vec<_>>().join(" ")
        );
        Ok(Self { _busy: hogs })
    }
}
