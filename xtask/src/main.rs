//! `cargo xtask`: the one entry point for developers.
//!
//! Layout:
//! - `bench` — release benchmarks that print our numbers next to the baseline they beat (`chaos-bench`)
//! - `ebpf`  — build the kernel-side classifier with Debian's rustc-web + bpf-linker (installs them when missing)
//! - `test`  — every test tier (unit, network namespaces, ZooKeeper + real lymph peers, qemu guests)
//! - `util`  — running commands loudly, apt installs
//! - `vm`    — qemu, the pinned Debian kernel and its modules for the VM tier (cached under target/vm/)
//! - `systemd_guest` — the systemd tier's Debian 12 guest image, built with mmdebstrap (cached under target/)
//! - `install`, `deb` — the agent as an installed service (files from chaos-agent/dist/), or as a .deb
//! - `demo`  — the agent against a real lymph Echo and client, in a private network namespace

mod bench;
mod deb;
mod demo;
mod ebpf;
mod install;
mod python;
mod services;
mod systemd_guest;
mod test;
mod util;
mod vm;

use std::process::Command;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "lymph-chaos developer tasks", version)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF classifier object (installs rustc-web, bpf-linker … when missing).
    ///
    /// Example: `cargo xtask build-ebpf`
    BuildEbpf,
    /// Build everything and start the agent in the foreground with default settings (needs root).
    ///
    /// Example: `sudo cargo xtask run -- --dry-run`
    Run {
        /// Extra arguments for `lymph-chaos agent`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every test tier: unit, network namespaces (root), ZooKeeper + real lymph peers, a three-host cluster of
    /// namespaces, qemu guests, the .deb under systemd in a Debian 12 guest. Installs and starts what the tiers need (apt packages, bpf-linker,
    /// ZooKeeper, the lymph venv, qemu, the guest kernel, the guest image, lintian).
    ///
    /// Example: `cargo xtask test`, `cargo xtask test --tier unit --tier netns -- kill`
    Test {
        /// Only these tiers (unit, netns, hostile, zk, cluster, vm, systemd); default all.
        #[arg(long = "tier")]
        tiers: Vec<String>,
        /// Do not install missing packages.
        #[arg(long)]
        no_install: bool,
        /// Extra arguments for the test runner (e.g. a name filter).
        #[arg(last = true)]
        runner_args: Vec<String>,
    },
    /// Check the Python client (chaos-agent/python): ruff, mypy --strict and the pytest tests that need no agent,
    /// with the tools of its `test` and `lint` extras in target/python-check-venv. `cargo xtask test` runs this with
    /// the unit tier.
    ///
    /// Example: `cargo xtask python-check`
    PythonCheck,
    /// Run only the VM tier (qemu guests with the pinned Debian kernel; the agent next to raw netem).
    ///
    /// `--hog` keeps one busy-loop process per core running beside it (started and stopped here), `--runs N`
    /// repeats the tier and reports each run, `--mutant KIND` drives it against a deliberately wrong agent
    /// (wrong-port, double-delay, no-expiry), where a run passes only when the tier caught it.
    ///
    /// Example: `cargo xtask vm-test`, `cargo xtask vm-test --hog --runs 5`, `cargo xtask vm-test --mutant wrong-port`
    VmTest {
        /// One busy loop per core beside the tier, for as long as it runs.
        #[arg(long)]
        hog: bool,
        /// Run the tier this many times in a row.
        #[arg(long, default_value_t = 1)]
        runs: u32,
        /// wrong-port, double-delay or no-expiry: every fault request made wrong that way.
        #[arg(long, value_parser = ["wrong-port", "double-delay", "no-expiry"])]
        mutant: Option<String>,
    },
    /// Fetch what the qemu test tier needs: qemu-system-x86 (bookworm-backports), the pinned Debian kernel and its
    /// modules, cached under target/vm/ (a second run only checks).
    ///
    /// Example: `cargo xtask vm-prepare`
    VmPrepare,
    /// Install the agent as a service: builds the release agent (after build-ebpf), installs
    /// /usr/local/bin/lymph-chaos, /etc/lymph-chaos/config.yml (never overwritten) and the systemd unit, recorded
    /// in /var/lib/lymph-chaos/install-manifest. With systemd running it enables and starts the unit; without, it
    /// prints how to start the agent, and --start starts it in the background.
    ///
    /// Example: `sudo -E cargo xtask install`, `sudo -E cargo xtask install --start`,
    /// `sudo -E cargo xtask install --uninstall`
    Install {
        /// Remove what an earlier install put there (and stop the agent it started).
        #[arg(long)]
        uninstall: bool,
        /// Root to install under (a staging directory for packaging).
        #[arg(long, default_value = "/")]
        prefix: std::path::PathBuf,
        /// Without systemd: start the agent in the background (--uninstall stops it).
        #[arg(long, conflicts_with = "uninstall")]
        start: bool,
        /// With systemd: enable the unit but do not start it.
        #[arg(long, conflicts_with_all = ["uninstall", "start"])]
        no_start: bool,
        /// With --uninstall: also remove /etc/lymph-chaos/config.yml when it was edited.
        #[arg(long, requires = "uninstall")]
        purge: bool,
        /// Install this binary instead of building the release agent.
        #[arg(long, value_name = "PATH")]
        binary: Option<std::path::PathBuf>,
    },
    /// Build target/debian/lymph-chaos_<version>_<arch>.deb (dpkg-deb from a staged tree; same files as `install`).
    ///
    /// Example: `cargo xtask deb && sudo apt-get install ./target/debian/lymph-chaos_0.1.0_amd64.deb`
    Deb {
        /// Package this binary instead of building the release agent.
        #[arg(long, value_name = "PATH")]
        binary: Option<std::path::PathBuf>,
    },
    /// The agent against a real lymph Echo service and client, in a private network namespace: kill Echo and
    /// watch it come back, then 200 ms latency (or a blackhole without netem) for 5 s; everything is cleaned up.
    ///
    /// With `--experiment FILE`, the same services (ZooKeeper, Echo under a restart loop, the agent) run the
    /// experiment file with `lymph-chaos run` instead of the script; its report goes next to the file (or `--out`).
    ///
    /// Example: `sudo -E cargo xtask demo`, `sudo -E cargo xtask demo --experiment echo-experiment.yml`
    Demo {
        /// Use this agent binary instead of building the release agent.
        #[arg(long, value_name = "PATH")]
        agent_bin: Option<std::path::PathBuf>,
        /// Use this lymph venv instead of target/lymph-venv.
        #[arg(long, value_name = "DIR")]
        venv: Option<std::path::PathBuf>,
        /// Run this experiment file against the demo's services instead of the demo script.
        #[arg(long, value_name = "FILE")]
        experiment: Option<std::path::PathBuf>,
        /// With --experiment: the report directory (default: <file stem>-report next to the file).
        #[arg(long, value_name = "DIR", requires = "experiment")]
        out: Option<std::path::PathBuf>,
    },
    /// Run the benchmarks (release build): RPC vs a Python lymph service, per-packet cost vs a `tc u32` filter
    /// chain, rule change time vs spawning `tc`, kill latency, the classifier's cost per packet vs the previous
    /// classifier (git a401fe4, built for the comparison), the delay's accuracy vs raw `tc netem` in a qemu guest
    /// (interleaved in one boot). Prints ours | baseline | ratio | goal | met?; a number never fails the task,
    /// only a benchmark that could not run does (needs root).
    ///
    /// Example: `cargo xtask bench`, `cargo xtask bench network`
    Bench {
        /// rpc, network, changes, kill, classifier, accuracy or all.
        #[arg(default_value = "all")]
        which: String,
    },
    /// Temporary: start ZooKeeper + the lymph venv, run a command with CHAOS_TEST_ZK/CHAOS_LYMPH_VENV set.
    #[command(hide = true)]
    WithServices {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::BuildEbpf => ebpf::build().map(|_| ()),
        Task::Run { args } => run_agent(&args),
        Task::WithServices { command } => with_services(&command),
        Task::VmPrepare => vm::prepare().map(|_| ()),
        Task::Bench { which } => bench::run(&which),
        Task::Install { uninstall, prefix, start, no_start, purge, binary } => {
            install::run(&install::InstallOptions { prefix, uninstall, start, no_start, purge, binary })
        }
        Task::Deb { binary } => deb::run(&deb::DebOptions { binary }).map(|_| ()),
        Task::Demo { agent_bin, venv, experiment, out } => {
            demo::run(&demo::DemoOptions { agent_bin, venv, experiment, out })
        }
        Task::Test { tiers, no_install, runner_args } => {
            test::run(&test::TestOptions { tiers, runner_args, no_install })
        }
        Task::VmTest { hog, runs, mutant } => test::vm_runs(hog, runs, mutant.as_deref()),
        Task::PythonCheck => python::run(),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn run_agent(args: &[String]) -> Result<()> {
    if !util::is_root() {
        bail!("the agent needs root (CAP_NET_ADMIN, CAP_BPF, CAP_KILL); run: sudo -E cargo xtask run");
    }
    ebpf::build()?;
    util::step("building lymph-chaos (release)");
    util::run(util::cargo().current_dir(util::root()).args(["build", "--release", "--package", "chaos-agent"]))?;
    let bin = util::target_dir().join("release").join("lymph-chaos");
    util::step(format!("starting {} agent {}", bin.display(), args.join(" ")));
    let err = std::os::unix::process::CommandExt::exec(Command::new(&bin).arg("agent").args(args));
    bail!("could not exec {}: {err}", bin.display())
}

fn with_services(command: &[String]) -> Result<()> {
    let t = std::time::Instant::now();
    services::ensure_zookeeper_installed()?;
    let venv = services::ensure_lymph_venv(&util::target_dir().join("lymph-venv"))?;
    eprintln!("    venv: {:.2?}", t.elapsed());
    let zk = services::ZooKeeper::start(&util::target_dir().join("zookeeper"))?;
    eprintln!("    ZooKeeper at {} (log: {})", zk.addr(), zk.log_path().display());
    let status = Command::new(&command[0])
        .args(&command[1..])
        .env(services::ZK_ENV, zk.addr())
        .env(services::LYMPH_VENV_ENV, &venv)
        .status()?;
    drop(zk);
    if !status.success() {
        bail!("{status}");
    }
    Ok(())
}
