//! Small helpers: running commands loudly, root checks, apt installs.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, Result, bail};

/// The workspace root (parent of the xtask crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// `target/` of the workspace (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => root().join("target"),
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Prints a step header.
pub fn step(msg: impl AsRef<str>) {
    eprintln!("\x1b[1m==> {}\x1b[0m", msg.as_ref());
}

/// Runs `cmd`, echoing it first; fails with the command line when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("    $ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("could not start {}", show(cmd)))?;
    if !status.success() {
        bail!("command failed ({status}): {}", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or `None` when it cannot start or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        let a = arg.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Whether a command is found on PATH.
pub fn have(program: &str) -> bool {
    which(program).is_some()
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// Whether a Debian package is installed.
pub fn dpkg_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// Installs Debian packages that are missing. Needs root; otherwise fails with the exact command to run.
pub fn apt_install(packages: &[&str], why: &str) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let command = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() {
        bail!("{why} needs Debian packages that are not installed; run as root:\n    {command}");
    }
    step(format!("installing {} ({why})", missing.join(" ")));
    apt_update_once()?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut cmd)
}

/// `apt-get update`, at most once per xtask run.
pub fn apt_update_once() -> Result<()> {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update", "-q"]))?;
    let _ = DONE.set(());
    Ok(())
}

/// `$CARGO_HOME/bin` (where `cargo install` puts binaries).
pub fn cargo_bin_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"));
    home.join("bin")
}

/// The cargo that runs us (rustup's normally).
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Whether CI asked for every tier (`CI=true`).
#[allow(dead_code)] // used by the test orchestration
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}
