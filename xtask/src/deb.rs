//! `cargo xtask deb`: `target/debian/lymph-chaos_<version>_<arch>.deb`, built with `dpkg-deb --build` from a
//! staged tree (no cargo-deb needed).
//!
//! Same payload as `cargo xtask install` ([`crate::install::Payload`]), at the paths Debian policy wants for a
//! package (`/usr/local` belongs to the administrator):
//! - `/usr/bin/lymph-chaos`
//! - `/etc/lymph-chaos/config.yml` — a conffile: dpkg never overwrites local edits, purge removes it
//! - `/lib/systemd/system/lymph-chaos.service` — `ExecStart=/usr/bin/lymph-chaos agent --config …`
//! - `/usr/share/doc/lymph-chaos/copyright`
//!
//! Maintainer scripts (`chaos-agent/dist/debian/`): `postinst` enables the unit like `dh_installsystemd` and starts
//! it only where systemd runs, through `deb-systemd-invoke`, which honours `/usr/sbin/policy-rc.d` (exit 101 in
//! image builds and chroots: nothing starts); without systemd it prints how to start the agent. `prerm` stops the
//! unit; `postrm` purges the unit state and the agent's run-time files; `preinst` refuses to install over a
//! `cargo xtask install`.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    install::{self, Payload},
    util::{self, step},
};

const PACKAGE: &str = "lymph-chaos";
const DEB_BIN: &str = "/usr/bin/lymph-chaos";
const DEB_UNIT: &str = "/lib/systemd/system/lymph-chaos.service";
const DEB_CONFIG: &str = install::CONFIG;
const MAINTAINER_SCRIPTS: &[&str] = &["preinst", "postinst", "prerm", "postrm"];
/// Used when `dpkg-shlibdeps` cannot run: what the agent links (glibc, libgcc_s, and libstdc++ for the vendored
/// libzmq).
const FALLBACK_DEPENDS: &str = "libc6 (>= 2.34), libgcc-s1, libstdc++6";
const DESCRIPTION: &str = "chaos monkey agent for lymph services
 lymph-chaos registers in ZooKeeper as the lymph service Chaos and, on request
 from lymph RPC clients or its CLI, kills, pauses or stresses lymph service
 instances and injects network faults (latency, loss, blackhole, rate) with an
 eBPF tc classifier. Every fault expires by itself and is reverted when the
 agent stops.";

/// Options of `cargo xtask deb`.
pub struct DebOptions {
    /// Package this binary instead of building the release agent.
    pub binary: Option<PathBuf>,
}

/// Builds the package; returns its path.
pub fn run(opts: &DebOptions) -> Result<PathBuf> {
    for tool in ["dpkg-deb", "dpkg"] {
        if !util::have(tool) {
            bail!("{tool} is missing (Debian's dpkg provides it)");
        }
    }
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => install::build_release()?,
    };
    let payload = Payload::load(binary)?;
    let version = util::output(Command::new(&payload.binary).arg("--version"))
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
        .context("`lymph-chaos --version` printed no version")?;
    let arch = util::output(Command::new("dpkg").arg("--print-architecture"))
        .map(|a| a.trim().to_owned())
        .context("dpkg --print-architecture failed")?;
    let out_dir = util::target_dir().join("debian");
    let stage = out_dir.join(format!("{PACKAGE}_{version}_{arch}"));
    step(format!("staging {}", stage.display()));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let put = |path: &str, bytes: &[u8], mode: u32| -> Result<()> {
        let dest = stage.join(path.trim_start_matches('/'));
        fs::create_dir_all(dest.parent().expect("has a parent"))?;
        fs::write(&dest, bytes).with_context(|| format!("writing {}", dest.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put(DEB_BIN, &install::installable_binary(&payload.binary)?, 0o755)?;
    put(DEB_CONFIG, payload.config.as_bytes(), 0o644)?;
    put(DEB_UNIT, payload.unit(DEB_BIN).as_bytes(), 0o644)?;
    put(&format!("/usr/share/doc/{PACKAGE}/copyright"), copyright().as_bytes(), 0o644)?;
    let scripts = util::root().join("chaos-agent").join("dist").join("debian");
    for name in MAINTAINER_SCRIPTS {
        let text = fs::read(scripts.join(name)).with_context(|| format!("reading {}", scripts.join(name).display()))?;
        put(&format!("/DEBIAN/{name}"), &text, 0o755)?;
    }
    put("/DEBIAN/conffiles", format!("{DEB_CONFIG}\n").as_bytes(), 0o644)?;
    let depends = shlib_depends(&stage.join(DEB_BIN.trim_start_matches('/')));
    let control = control(&version, &arch, &depends, installed_size_kib(&stage)?);
    put("/DEBIAN/control", control.as_bytes(), 0o644)?;
    put("/DEBIAN/md5sums", md5sums(&stage)?.as_bytes(), 0o644)?;

    let deb = out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    step(format!("building {}", deb.display()));
    // --root-owner-group: every file root:root without fakeroot.
    util::run(Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&stage).arg(&deb))?;
    eprint!("{}", util::output(Command::new("dpkg-deb").arg("--info").arg(&deb)).unwrap_or_default());
    eprint!("{}", util::output(Command::new("dpkg-deb").arg("--contents").arg(&deb)).unwrap_or_default());
    eprintln!("    install: apt-get install ./{}   remove: apt-get purge {PACKAGE}", relative(&deb).display());
    Ok(deb)
}

fn relative(p: &Path) -> PathBuf {
    std::env::current_dir().ok().and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf)).unwrap_or(p.into())
}

fn control(version: &str, arch: &str, depends: &str, size_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: lymph-chaos maintainers <maintainers@lymph-chaos.invalid>\n\
         Installed-Size: {size_kib}\n\
         Depends: {depends}\n\
         Section: admin\n\
         Priority: optional\n\
         Homepage: https://github.com/lymph-chaos/lymph-chaos\n\
         Description: {DESCRIPTION}\n"
    )
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: lymph-chaos\n\
     Source: https://github.com/lymph-chaos/lymph-chaos\n\n\
     Files: *\n\
     License: MIT or Apache-2.0\n"
        .to_owned()
}

/// The package dependencies of `binary` from `dpkg-shlibdeps` (which wants a `debian/control` around it).
fn shlib_depends(binary: &Path) -> String {
    let run = || -> Option<String> {
        let dir = tempdir()?;
        fs::create_dir_all(dir.join("debian")).ok()?;
        fs::write(dir.join("debian/control"), format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"))
            .ok()?;
        let out = util::output(Command::new("dpkg-shlibdeps").args(["-O", "-e"]).arg(binary).current_dir(&dir));
        let _ = fs::remove_dir_all(&dir);
        out?.lines().find_map(|l| l.strip_prefix("shlibs:Depends=").map(str::to_owned))
    };
    match run() {
        Some(d) if !d.trim().is_empty() => d,
        _ => {
            eprintln!("    (dpkg-shlibdeps unavailable: Depends: {FALLBACK_DEPENDS})");
            FALLBACK_DEPENDS.to_owned()
        }
    }
}

fn tempdir() -> Option<PathBuf> {
    let dir = util::target_dir().join("debian").join(format!("shlibdeps-{}", std::process::id()));
    fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// Sum of the payload's file sizes in KiB (rounded up per file, as dpkg-gencontrol does), DEBIAN/ excluded.
fn installed_size_kib(stage: &Path) -> Result<u64> {
    Ok(payload_files(stage)?.iter().map(|(_, len)| len.div_ceil(1024)).sum())
}

fn md5sums(stage: &Path) -> Result<String> {
    let mut out = String::new();
    for (rel, _) in payload_files(stage)? {
        let bytes = fs::read(stage.join(&rel))?;
        out.push_str(&format!("{}  {rel}\n", md5_hex(&bytes)));
    }
    Ok(out)
}

/// Files of the payload (relative path, size), sorted, without `DEBIAN/`.
fn payload_files(stage: &Path) -> Result<Vec<(String, u64)>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> Result<()> {
        for e in fs::read_dir(dir)? {
            let p = e?.path();
            let rel = p.strip_prefix(base).expect("under base").display().to_string();
            if rel == "DEBIAN" {
                continue;
            }
            if p.is_dir() {
                walk(base, &p, out)?;
            } else {
                out.push((rel, fs::metadata(&p)?.len()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(stage, stage, &mut out)?;
    out.sort();
    Ok(out)
}

/// md5 via coreutils' md5sum (xtask has no hashing crate; dpkg wants md5sums).
fn md5_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("piped").write_all(bytes)?;
            c.wait_with_output()
        });
    child
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_has_the_fields_dpkg_needs() {
        let c = control("0.1.0", "amd64", "libc6 (>= 2.34)", 12345);
        for field in ["Package: lymph-chaos\n", "Version: 0.1.0\n", "Architecture: amd64\n", "Installed-Size: 12345\n"]
        {
            assert!(c.contains(field), "{field} missing from\n{c}");
        }
        // Continuation lines of the description start with a space.
        let desc = c.split("Description: ").nth(1).unwrap();
        assert!(desc.lines().skip(1).all(|l| l.starts_with(' ')), "{desc}");
        assert!(c.ends_with('\n'));
    }

    #[test]
    fn md5_matches_coreutils() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    }
}
