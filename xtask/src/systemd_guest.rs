//! The systemd tier's guest image: a Debian 12 root filesystem built from Debian's packages with `mmdebstrap`,
//! as an ext4 image that qemu boots (read-only: every boot runs with `snapshot=on`) with systemd as PID 1.
//!
//! # Cache
//! `target/systemd-guest/rootfs-<key>.img`, where `<key>` hashes everything that goes into the image: the
//! suite, the mirrors, [`PACKAGES`], the customize script (`systemd-guest-customize.sh`) and the stand-in package
//! below. Same inputs → the image is reused (a second run only checks it exists); changed inputs → it is built
//! again and older images are removed. An interrupted build leaves only `*.partial*` files, never an image.
//!
//! # What is in it
//! `mmdebstrap --variant=apt` (Essential packages + apt) and [`PACKAGES`]: systemd as init, iproute2 and bpftool
//! to look at kernel objects, procps, netcat (a listener for the latency faults), and ZooKeeper (`zookeeperd`, started by systemd at boot) on the headless
//! JRE. zookeeper depends on `default-jre`, whose X11/GTK/Mesa stack (~100 packages, half the build time) a
//! server never uses: a local stand-in package, `chaos-test-default-jre`, provides `default-jre` instead, so the
//! image has `default-jre-headless` only. Documentation, man pages and locales are not unpacked. No kernel:
//! the guest boots the pinned Debian kernel of the VM tier (`target/vm/`, `cargo xtask vm-prepare`) with an
//! initramfs the test builds (modules for virtio and ext4, then `switch_root` to `/sbin/init`).
//!
//! The customize script adds `chaos-guest-run.service`, which runs `/payload/run` from the tar archive on the
//! second disk once the system is up: the tests put their script and the packages there, so changing a test
//! never rebuilds the image.
//!
//! Measured (2 cores shared with other builds): 155–200 s cold (~110 packages, ~100 MB downloaded, 392 MiB
//! unpacked, a 1.1 GiB sparse image), most of it dpkg; `cargo xtask test` builds it in the background while the
//! workspace compiles. Under TCG the guest reaches the test run ~15 s after boot, ZooKeeper listens ~15–25 s
//! later.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::util::{self, apt_install, run, step};

/// Debian release of the guest.
const SUITE: &str = "bookworm";
/// Where its packages come from (the same archive as the host's; the security suite for current fixes).
const MIRRORS: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];
/// Installed on top of `--variant=apt`. The agent's own dependencies (libc6, libgcc-s1, libstdc++6) are here so
/// that `apt-get install ./lymph-chaos_….deb` resolves without a network in the guest.
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "iproute2",
    "bpftool",
    "procps",
    "netcat-openbsd",
    "zookeeperd",
    "default-jre-headless",
    "libstdc++6",
    "libgcc-s1",
];
/// Host tools the image build needs.
const HOST_PACKAGES: &[&str] = &["mmdebstrap", "e2fsprogs"];
/// The customize hook (see the module docs).
const CUSTOMIZE: &str = include_str!("systemd-guest-customize.sh");
/// The stand-in for `default-jre` (control file of a package with no files).
const JRE_STANDIN: &str = "Package: chaos-test-default-jre\n\
Version: 1\n\
Architecture: all\n\
Maintainer: lymph-chaos tests <tests@lymph-chaos.invalid>\n\
Provides: default-jre\n\
Description: test guest only: satisfies default-jre without the X11 stack\n \
zookeeper runs on default-jre-headless; the full JRE only adds GUI libraries.\n";
/// Free space left in the image for what the tests install and write (the .deb, ZooKeeper's data, logs).
const HEADROOM_MIB: u64 = 768;

/// `target/systemd-guest/`.
pub fn dir() -> PathBuf {
    util::target_dir().join("systemd-guest")
}

/// The cache key of the image: FNV-1a over every input.
fn cache_key() -> String {
    let mut inputs = String::new();
    for part in [SUITE.to_owned(), MIRRORS.join("\n"), PACKAGES.join(" "), CUSTOMIZE.to_owned(), JRE_STANDIN.to_owned()]
    {
        inputs.push_str(&part);
        inputs.push('\0');
    }
    format!("{:016x}", chaos_test_support::fnv1a64(inputs.as_bytes()))
}

/// The image for the current inputs (it may not be built yet).
pub fn image_path() -> PathBuf {
    dir().join(format!("rootfs-{}.img", cache_key()))
}

/// Whether the image for the current inputs is built.
pub fn is_cached() -> bool {
    image_path().is_file()
}

/// Installs what building the image needs (mmdebstrap, e2fsprogs).
///
/// # Errors
/// When a package is missing and we are not root, or apt fails.
pub fn install_host_packages() -> Result<()> {
    apt_install(HOST_PACKAGES, "the systemd tier (building its Debian 12 guest image)")
}

/// Builds the image unless the cached one matches its inputs; returns its path. With `log`, the build's output
/// goes to that file instead of the terminal (`cargo xtask test` builds the image while it compiles).
///
/// # Errors
/// When a host package is missing and we are not root, or mmdebstrap/mkfs fail.
pub fn prepare(log: Option<&Path>) -> Result<PathBuf> {
    let dir = dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = cache_key();
    let image = image_path();
    if log.is_none() {
        step(format!("checking the systemd guest image ({})", image.display()));
    }
    if image.is_file() {
        if log.is_none() {
            eprintln!("    cached (inputs unchanged)");
        }
        return Ok(image);
    }
    if !util::is_root() {
        bail!("the systemd guest image is not built and building it needs root: run cargo xtask test as root");
    }
    install_host_packages()?;
    let run = |cmd: &mut Command| -> Result<()> {
        let Some(log) = log else { return run(cmd) };
        let file = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let status = cmd.stdout(file.try_clone()?).stderr(file).status()?;
        if !status.success() {
            bail!("command failed ({status}): {} (output in {})", util::show(cmd), log.display());
        }
        Ok(())
    };
    let step = |msg: String| match log {
        Some(_) => {}
        None => step(msg),
    };
    let started = Instant::now();
    let tree = dir.join(format!("rootfs-{key}.partial.d"));
    let partial = dir.join(format!("rootfs-{key}.img.partial"));
    for stale in [&tree, &partial] {
        remove(stale)?;
    }
    // The stand-in package.
    let standin_dir = dir.join("jre-standin");
    remove(&standin_dir)?;
    fs::create_dir_all(standin_dir.join("DEBIAN"))?;
    fs::write(standin_dir.join("DEBIAN/control"), JRE_STANDIN)?;
    let standin = dir.join("chaos-test-default-jre.deb");
    run(Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&standin_dir).arg(&standin))?;
    let customize = dir.join("customize.sh");
    fs::write(&customize, CUSTOMIZE)?;

    step(format!("building the Debian 12 guest with mmdebstrap ({} packages + apt)", PACKAGES.len()));
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=apt", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        // Faster unpacking; the tree is packed into an image right after.
        .arg("--dpkgopt=force-unsafe-io")
        .arg("--dpkgopt=path-exclude=/usr/share/man/*")
        .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
        .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
        // openjdk's postinst registers man pages as alternatives: the directory must exist.
        .arg("--essential-hook=mkdir -p \"$1/usr/share/man/man1\"")
        .arg(format!(
            "--essential-hook=cp {} \"$1/tmp/standin.deb\" && chroot \"$1\" dpkg -i /tmp/standin.deb && rm \"$1/tmp/standin.deb\"",
            standin.display()
        ))
        .arg(format!("--customize-hook=sh {} \"$1\"", customize.display()))
        .arg(SUITE)
        .arg(&tree)
        .args(MIRRORS)
        .env("DEBIAN_FRONTEND", "noninteractive");
    let built = run(&mut cmd);
    if let Err(err) = built {
        remove(&tree)?;
        return Err(err.context("mmdebstrap failed (see its output above)"));
    }
    let tree_bytes = du_bytes(&tree)?;
    let size_mib = tree_bytes / (1 << 20) + HEADROOM_MIB;
    step(format!("packing {} MiB into an ext4 image of {size_mib} MiB", tree_bytes >> 20));
    let packed = (|| -> Result<()> {
        fs::File::create(&partial)?.set_len(size_mib << 20)?;
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "chaos-guest", "-d"]).arg(&tree).arg(&partial))
    })();
    remove(&tree)?;
    packed?;
    fs::rename(&partial, &image)?;
    // Older images (other inputs) go.
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name.starts_with("rootfs-") && path != image {
            remove(&path)?;
        }
    }
    eprintln!("    built the systemd guest image {} in {:.0} s", image.display(), started.elapsed().as_secs_f64());
    Ok(image)
}

fn remove(path: &Path) -> Result<()> {
    let result = if path.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Apparent size of a tree (`du -sb`).
fn du_bytes(tree: &Path) -> Result<u64> {
    let out = util::output(Command::new("du").arg("-sb").arg(tree)).context("du -sb failed")?;
    out.split_whitespace().next().and_then(|n| n.parse().ok()).context("du printed no size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_is_stable_hex() {
        let key = cache_key();
        assert_eq!(key.len(), 16);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(key, cache_key());
    }
}
