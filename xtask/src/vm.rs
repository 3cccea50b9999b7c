//! `cargo xtask vm-prepare`: what the qemu test tier needs on the host, fetched once and cached under `target/vm/`.
//!
//! The host kernel has no `sch_netem`, so netem scenarios run in a qemu guest booting a stock Debian 12 kernel
//! (see `tests/src/vm.rs` for the guest itself and the measured facts behind its design).
//!
//! # Layout
//! ```text
//! target/vm/
//!   assets.env                 KERNEL= MODULES_DIR= ABI=  (read by tests/src/vm.rs; override with CHAOS_VM_ASSETS)
//!   apt/                       private apt state: sources.list (bookworm + -updates + -security + -backports),
//!     lists/ cache/            lists and caches; the host's /etc/apt and /var/lib/apt/lists are never touched
//!   downloads/                 linux-image-<abi>-amd64_*.deb as fetched by `apt-get download`
//!   linux-<abi>/               `dpkg -x` of that package, then `depmod -b`:
//!     boot/vmlinuz-<abi>         the kernel qemu boots with -kernel
//!     lib/modules/<abi>/         modules + modules.dep (the guest builder resolves dependencies from it)
//! ```
//!
//! # What it does, idempotently
//! 1. host tools from bookworm (`busybox-static cpio kmod iproute2 binutils`) through [`util::apt_install`];
//! 2. `qemu-system-x86` from **bookworm-backports**: the image carries `qemu-utils` 10 from backports, which blocks
//!    bookworm's qemu-system-x86 7.2. Installed with `-t bookworm-backports` through a private sources list
//!    (`-o Dir::Etc::sourcelist=… -o Dir::Etc::sourceparts=- -o Dir::State::lists=… -o Dir::Cache=…`), so the
//!    host's apt configuration is left alone. Skipped when already installed;
//! 3. the kernel package for [`PINNED_ABI`] (falling back, with a warning, to what `linux-image-amd64` depends on
//!    when the pinned ABI has left the mirror), extracted with `dpkg -x`, module index built with `depmod -b`.
//!    Nothing goes into /boot. Skipped when `linux-<abi>/` is complete.
//!
//! A second run only checks: no network, no apt.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::util::{self, apt_install, run, step};

/// Kernel ABI the guests boot: the newest bookworm ABI when this was written (`apt-cache depends
/// linux-image-amd64` on 2026-11-25 → `linux-image-6.1.0-56-amd64`). Generic `amd64` flavour: `cloud-amd64` has no 9p.
pub const PINNED_ABI: &str = "6.1.0-56";
/// Debian kernel flavour; the package is `linux-image-<abi>-<flavour>` and the ABI directory `<abi>-<flavour>`.
const FLAVOUR: &str = "amd64";
/// Metapackage whose dependency names the current ABI (the fallback when [`PINNED_ABI`] is gone).
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
/// Host tools the guest builder uses (busybox becomes the guest's /bin/sh, ip/tc are copied in, kmod's depmod,
/// binutils' objcopy strips the debug info off the agent and test binaries: 160 MB → 33 MB for a debug agent).
const HOST_PACKAGES: &[&str] = &["busybox-static", "cpio", "kmod", "iproute2", "binutils"];
/// qemu comes from backports (see the module docs).
const QEMU_PACKAGE: &str = "qemu-system-x86";
const QEMU_BINARY: &str = "qemu-system-x86_64";
const BACKPORTS: &str = "bookworm-backports";
/// The private sources list: everything qemu's dependencies may come from. `[signed-by]` uses the keyring every
/// Debian host has.
const PRIVATE_SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
";

/// What the VM tests need, as written to `target/vm/assets.env`.
#[derive(Debug, Clone)]
pub struct VmAssets {
    /// `vmlinuz-<abi>-amd64`, booted with `qemu -kernel`.
    pub kernel: PathBuf,
    /// `…/lib/modules/<abi>-amd64` with a fresh `modules.dep`.
    pub modules_dir: PathBuf,
    /// Full kernel release, e.g. `6.1.0-56-amd64` (what `uname -r` prints in the guest).
    pub abi: String,
}

/// `target/vm/`.
pub fn vm_dir() -> PathBuf {
    util::target_dir().join("vm")
}

/// `target/vm/assets.env`.
pub fn assets_env_path() -> PathBuf {
    vm_dir().join("assets.env")
}

/// Installs/downloads whatever is missing and returns the kernel assets (also written to `target/vm/assets.env`).
///
/// # Errors
/// When a package is missing and we are not root (the message names the command to run), when apt or dpkg fail,
/// or when the extracted package lacks the kernel or its modules.
pub fn prepare() -> Result<VmAssets> {
    let dir = vm_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut apt = PrivateApt::new(dir.join("apt"));

    step(format!("checking host tools: {}", HOST_PACKAGES.join(" ")));
    apt_install(HOST_PACKAGES, "the VM test tier")?;

    ensure_qemu(&mut apt)?;
    let assets = ensure_kernel(&mut apt, &dir)?;
    write_assets_env(&assets)?;
    eprintln!("    kernel:  {}", assets.kernel.display());
    eprintln!("    modules: {}", assets.modules_dir.display());
    eprintln!("    assets:  {}", assets_env_path().display());
    Ok(assets)
}

fn ensure_qemu(apt: &mut PrivateApt) -> Result<()> {
    step(format!("checking {QEMU_PACKAGE} (from {BACKPORTS})"));
    if util::dpkg_installed(QEMU_PACKAGE) && util::have(QEMU_BINARY) {
        let version = util::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", QEMU_PACKAGE]));
        eprintln!("    {QEMU_PACKAGE} {} already installed", version.unwrap_or_default().trim());
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "{QEMU_PACKAGE} is not installed and installing it needs root; run as root: cargo xtask vm-prepare \
             (it installs {QEMU_PACKAGE} from {BACKPORTS} through a private apt sources list)"
        );
    }
    step(format!("installing {QEMU_PACKAGE} from {BACKPORTS} (private sources list; host apt config untouched)"));
    let started = Instant::now();
    apt.update()?;
    let mut cmd = apt.command("apt-get");
    cmd.args(["-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends", "-t", BACKPORTS])
        .arg(QEMU_PACKAGE)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut cmd)?;
    eprintln!("    installed {QEMU_PACKAGE} in {:.1} s", started.elapsed().as_secs_f64());
    if !util::have(QEMU_BINARY) {
        bail!("{QEMU_PACKAGE} installed but {QEMU_BINARY} is not on PATH");
    }
    Ok(())
}

fn ensure_kernel(apt: &mut PrivateApt, dir: &Path) -> Result<VmAssets> {
    step(format!("checking the guest kernel linux-image-{PINNED_ABI}-{FLAVOUR}"));
    if let Some(assets) = cached_kernel(dir, PINNED_ABI) {
        eprintln!("    cached in {}", dir.join(format!("linux-{PINNED_ABI}")).display());
        return Ok(assets);
    }
    apt.update()?;
    let abi = if apt.has_package(&kernel_package(PINNED_ABI)) {
        PINNED_ABI.to_string()
    } else {
        let current = apt.current_abi()?;
        eprintln!(
            "\x1b[33mwarning:\x1b[0m {} is gone from the mirror; falling back to {} (what {KERNEL_METAPACKAGE} \
             depends on). Update PINNED_ABI in xtask/src/vm.rs.",
            kernel_package(PINNED_ABI),
            kernel_package(&current)
        );
        if let Some(assets) = cached_kernel(dir, &current) {
            eprintln!("    cached in {}", dir.join(format!("linux-{current}")).display());
            return Ok(assets);
        }
        current
    };
    fetch_kernel(apt, dir, &abi)
}

fn kernel_package(abi: &str) -> String {
    format!("linux-image-{abi}-{FLAVOUR}")
}

fn release(abi: &str) -> String {
    format!("{abi}-{FLAVOUR}")
}

/// The assets of an already extracted and depmod'ed kernel, if complete.
fn cached_kernel(dir: &Path, abi: &str) -> Option<VmAssets> {
    let root = dir.join(format!("linux-{abi}"));
    let assets = kernel_assets(&root, abi);
    (assets.kernel.is_file() && assets.modules_dir.join("modules.dep").is_file()).then_some(assets)
}

fn kernel_assets(root: &Path, abi: &str) -> VmAssets {
    let release = release(abi);
    VmAssets {
        kernel: root.join("boot").join(format!("vmlinuz-{release}")),
        modules_dir: root.join("lib").join("modules").join(&release),
        abi: release,
    }
}

fn fetch_kernel(apt: &PrivateApt, dir: &Path, abi: &str) -> Result<VmAssets> {
    let package = kernel_package(abi);
    let downloads = dir.join("downloads");
    fs::create_dir_all(&downloads)?;
    let started = Instant::now();
    step(format!("downloading {package}"));
    let deb = match find_deb(&downloads, &package)? {
        Some(deb) => {
            eprintln!("    already downloaded: {}", deb.display());
            deb
        }
        None => {
            // `APT::Sandbox::User=root`: the download directory belongs to root, not `_apt`.
            let mut cmd = apt.command("apt-get");
            cmd.current_dir(&downloads).args(["-o", "APT::Sandbox::User=root", "download", &package]);
            run(&mut cmd)?;
            eprintln!("    downloaded in {:.1} s", started.elapsed().as_secs_f64());
            find_deb(&downloads, &package)?
                .with_context(|| format!("apt-get download left no {package}_*.deb in {}", downloads.display()))?
        }
    };

    step(format!("extracting {} and building its module index", deb.display()));
    let started = Instant::now();
    // Extract next to the final place and rename, so an interrupted run never looks cached.
    let root = dir.join(format!("linux-{abi}"));
    let partial = dir.join(format!("linux-{abi}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing incomplete {}", root.display()))?;
    }
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    run(Command::new("depmod").arg("-b").arg(&partial).arg(release(abi)))?;
    let assets = kernel_assets(&partial, abi);
    if !assets.kernel.is_file() {
        bail!("{} has no {}", deb.display(), assets.kernel.display());
    }
    if !assets.modules_dir.join("modules.dep").is_file() {
        bail!("depmod left no modules.dep in {}", assets.modules_dir.display());
    }
    fs::rename(&partial, &root).with_context(|| format!("renaming {} to {}", partial.display(), root.display()))?;
    eprintln!("    extracted and indexed in {:.1} s", started.elapsed().as_secs_f64());
    Ok(kernel_assets(&root, abi))
}

fn find_deb(downloads: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(downloads).with_context(|| format!("reading {}", downloads.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Writes `assets.env` when its content changed.
fn write_assets_env(assets: &VmAssets) -> Result<()> {
    let path = assets_env_path();
    let text = format!(
        "# written by `cargo xtask vm-prepare`; read by tests/src/vm.rs\nKERNEL={}\nMODULES_DIR={}\nABI={}\n",
        assets.kernel.display(),
        assets.modules_dir.display(),
        assets.abi
    );
    if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// apt with its own sources list, lists and caches under `target/vm/apt/`; shares only dpkg's status with the host.
struct PrivateApt {
    dir: PathBuf,
    updated: bool,
}

impl PrivateApt {
    fn new(dir: PathBuf) -> Self {
        Self { dir, updated: false }
    }

    fn sources_list(&self) -> PathBuf {
        self.dir.join("sources.list")
    }

    /// An apt command pointed at the private state.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let opt = |key: &str, value: &Path| format!("{key}={}", value.display());
        cmd.arg("-o")
            .arg(opt("Dir::Etc::sourcelist", &self.sources_list()))
            .args(["-o", "Dir::Etc::sourceparts=-"])
            .arg("-o")
            .arg(opt("Dir::State::lists", &self.dir.join("lists")))
            .arg("-o")
            .arg(opt("Dir::Cache", &self.dir.join("cache")));
        cmd
    }

    /// `apt-get update` on the private lists, once per run.
    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        fs::write(self.sources_list(), PRIVATE_SOURCES)?;
        step("refreshing the private apt lists (target/vm/apt)");
        let mut cmd = self.command("apt-get");
        cmd.args(["-o", "APT::Sandbox::User=root", "update", "-q"]);
        run(&mut cmd)?;
        self.updated = true;
        Ok(())
    }

    /// Whether the mirror (as of the last update) has a package of that name.
    fn has_package(&self, package: &str) -> bool {
        let mut cmd = self.command("apt-cache");
        cmd.args(["show", "--no-all-versions", package]);
        util::output(&mut cmd).is_some_and(|out| out.contains(&format!("Package: {package}")))
    }

    /// The ABI `linux-image-amd64` currently depends on (`6.1.0-56` for `linux-image-6.1.0-56-amd64`).
    fn current_abi(&self) -> Result<String> {
        let mut cmd = self.command("apt-cache");
        cmd.args(["depends", KERNEL_METAPACKAGE]);
        let out = util::output(&mut cmd).with_context(|| format!("apt-cache depends {KERNEL_METAPACKAGE} failed"))?;
        parse_depends_abi(&out).with_context(|| format!("no linux-image-<abi>-{FLAVOUR} among:\n{out}"))
    }
}

/// Picks `<abi>` out of `apt-cache depends linux-image-amd64` (`  Depends: linux-image-6.1.0-56-amd64`).
fn parse_depends_abi(out: &str) -> Option<String> {
    out.lines().find_map(|line| {
        let package = line.trim().strip_prefix("Depends:")?.trim();
        let abi = package.strip_prefix("linux-image-")?.strip_suffix(&format!("-{FLAVOUR}"))?;
        abi.chars().next()?.is_ascii_digit().then(|| abi.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_abi_from_apt_cache_depends() {
        // Captured with `apt-cache depends linux-image-amd64` on Debian 12 (2026-11-25).
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(parse_depends_abi(out).as_deref(), Some("6.1.0-56"));
        assert_eq!(parse_depends_abi("linux-image-amd64\n  Depends: linux-image-amd64-signed-template\n"), None);
    }
}
