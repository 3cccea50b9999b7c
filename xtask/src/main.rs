//! `cargo xtask`: the one entry point for developers.
//!
//! Layout:
//! - `ebpf`  — build the kernel-side classifier with Debian's rustc-web + bpf-linker (installs them when missing)
//! - `test`  — every test tier (unit, network namespaces, ZooKeeper + real lymph peers, qemu guests)
//! - `util`  — running commands loudly, apt installs

mod ebpf;
mod util;

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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::BuildEbpf => ebpf::build().map(|_| ()),
        Task::Run { args } => run_agent(&args),
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
