//! `cargo xtask build-ebpf`: the kernel-side classifier, built with Debian's rustc-web + bpf-linker.
//!
//! rustup's toolchains here have no `rust-src` and cannot build `core` for `bpfel-unknown-none`; Debian's
//! `rustc-web` 1.96 ships a prebuilt `core` for that target (`libstd-rust-web-dev-bpf`). bpf-linker 0.13 is built
//! against LLVM 22 (the LLVM of both rustc-web and rustup 1.95).

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::util::{self, apt_install, cargo_bin_dir, run, step};

/// Debian packages the BPF build needs.
const APT_PACKAGES: &[&str] =
    &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf", "llvm-22-dev", "build-essential", "pkg-config"];
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const BPF_TARGET: &str = "bpfel-unknown-none";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Where the built object is copied; `chaos-agent/build.rs` embeds it from here.
pub fn object_path() -> PathBuf {
    util::target_dir().join("bpf").join("chaos-ebpf.o")
}

/// Makes sure the toolchain is there (installing what is missing) and builds the object.
pub fn build() -> Result<PathBuf> {
    ensure_toolchain()?;
    step("building the eBPF classifier (chaos-ebpf) for bpfel-unknown-none");
    let built = build_in(&util::root(), &util::target_dir().join("bpf-build"))?;
    let dest = object_path();
    std::fs::create_dir_all(dest.parent().expect("has a parent"))?;
    let fresh = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    // Copy only when it changed, so cargo does not rebuild the agent for nothing.
    if std::fs::read(&dest).ok().as_deref() != Some(&fresh[..]) {
        std::fs::write(&dest, &fresh).with_context(|| format!("writing {}", dest.display()))?;
    }
    eprintln!("    BPF object: {} ({} bytes)", dest.display(), fresh.len());
    Ok(dest)
}

/// Builds the classifier of git revision `rev` (for benchmarks against an earlier object): its tree is exported
/// with `git archive` under the target directory and built there. Returns the object's path.
pub fn build_revision(rev: &str) -> Result<PathBuf> {
    ensure_toolchain()?;
    step(format!("building the eBPF classifier of git {rev} (the baseline of the classifier benchmark)"));
    let base = util::target_dir().join(format!("bpf-{rev}"));
    let src = base.join("src");
    if !src.join("chaos-ebpf").is_dir() {
        std::fs::create_dir_all(&src)?;
        let archive = Command::new("git")
            .current_dir(util::root())
            .args(["archive", "--format=tar", rev])
            .output()
            .context("running git archive")?;
        if !archive.status.success() {
            bail!("git archive {rev}: {}", String::from_utf8_lossy(&archive.stderr).trim());
        }
        let mut tar = Command::new("tar")
            .args(["-x", "-C"])
            .arg(&src)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("running tar")?;
        std::io::Write::write_all(tar.stdin.as_mut().expect("piped"), &archive.stdout)?;
        drop(tar.stdin.take());
        if !tar.wait()?.success() {
            bail!("unpacking git {rev} into {}", src.display());
        }
    }
    build_in(&src, &base.join("build"))
}

/// Builds `chaos-ebpf` of the workspace at `root` into `build_dir`; returns the built object.
fn build_in(root: &std::path::Path, build_dir: &std::path::Path) -> Result<PathBuf> {
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    // bpf-linker lives in $CARGO_HOME/bin; put it first so cargo finds it.
    path = std::env::join_paths(std::iter::once(cargo_bin_dir()).chain(std::env::split_paths(&path)))?;
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.current_dir(root)
        .args(["build", "--release", "--package", "chaos-ebpf", "--target", BPF_TARGET, "--target-dir"])
        .arg(build_dir)
        .env("PATH", path)
        .env("RUSTC", DEBIAN_RUSTC)
        // core for bpfel is prebuilt by Debian; aya-ebpf uses a few unstable features.
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTUP_TOOLCHAIN");
    run(&mut cmd)?;
    Ok(build_dir.join(BPF_TARGET).join("release").join("chaos-ebpf"))
}

fn ensure_toolchain() -> Result<()> {
    apt_install(APT_PACKAGES, "building the eBPF classifier")?;
    let version = util::output(Command::new(DEBIAN_RUSTC).arg("--version")).unwrap_or_default();
    if !version.starts_with("rustc 1.9") {
        bail!(
            "{DEBIAN_RUSTC} is `{}`; the BPF build needs Debian's rustc-web 1.96 (apt-get install rustc-web)",
            version.trim()
        );
    }
    if !std::path::Path::new("/usr/lib/rustlib").join(BPF_TARGET).is_dir() {
        bail!("Debian's prebuilt core for {BPF_TARGET} is missing: apt-get install libstd-rust-web-dev-bpf");
    }
    let linker = cargo_bin_dir().join("bpf-linker");
    let have = util::output(Command::new(&linker).arg("--version")).unwrap_or_default();
    if have.trim() != format!("bpf-linker {BPF_LINKER_VERSION}") {
        step(format!("installing bpf-linker {BPF_LINKER_VERSION} built against LLVM 22 (about a minute)"));
        let mut cmd = util::cargo();
        cmd.args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--force"])
            .args(["--no-default-features", "--features", "llvm-22"])
            // Without it llvm-sys finds /usr/bin/llvm-config (LLVM 14) and fails with "unable to find -lLLVM".
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env_remove("CARGO_TARGET_DIR");
        run(&mut cmd)?;
    }
    Ok(())
}
