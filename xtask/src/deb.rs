//! `cargo xtask deb`: `target/debian/lymph-chaos_<version>_<arch>.deb` and its debug symbols,
//! `lymph-chaos-dbgsym_<version>_<arch>.deb`, built with `dpkg-deb --build` from staged trees (no cargo-deb,
//! no debhelper needed; the result is what `dh` would make and `lintian` accepts).
//!
//! Same payload as `cargo xtask install` ([`crate::install::Payload`]), at the paths Debian policy wants for a
//! package (`/usr/local` belongs to the administrator):
//! - `/usr/bin/lymph-chaos` — stripped as `dh_strip` does (`strip --remove-section=.comment
//!   --remove-section=.note`, a `.gnu_debuglink` added); its debug information, compressed, goes to the
//!   `-dbgsym` package as `/usr/lib/debug/.build-id/<xx>/<rest>.debug`, where gdb, `coredumpctl debug` and Rust
//!   backtraces look for it
//! - `/etc/lymph-chaos/config.yml` — a conffile: dpkg never overwrites local edits, purge removes it
//! - `/lib/systemd/system/lymph-chaos.service` — `ExecStart=/usr/bin/lymph-chaos agent --config …`
//! - `/usr/share/man/man1/lymph-chaos*.1.gz` and the bash, zsh and fish completions, generated from the clap
//!   definitions by the binary itself ([`crate::install::Docs`])
//! - `/usr/share/doc/lymph-chaos/{copyright,changelog.gz}` and `/usr/share/lintian/overrides/lymph-chaos`, from
//!   `chaos-agent/dist/debian/` (the changelog's first entry must carry the crate's version)
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
const DBGSYM: &str = "lymph-chaos-dbgsym";
const DEB_BIN: &str = "/usr/bin/lymph-chaos";
const DEB_UNIT: &str = "/lib/systemd/system/lymph-chaos.service";
const DEB_CONFIG: &str = install::CONFIG;
const MAINTAINER_SCRIPTS: &[&str] = &["preinst", "postinst", "prerm", "postrm"];
const MAINTAINER: &str = "lymph-chaos maintainers <maintainers@lymph-chaos.invalid>";
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

/// The two packages built.
pub struct Debs {
    /// `lymph-chaos_<version>_<arch>.deb`.
    pub deb: PathBuf,
    /// `lymph-chaos-dbgsym_<version>_<arch>.deb`.
    pub dbgsym: PathBuf,
}

/// The packages of `binary`'s version built earlier, when both are there.
pub fn existing(binary: &Path) -> Option<Debs> {
    let version = util::output(Command::new(binary).arg("--version"))?.split_whitespace().nth(1)?.to_owned();
    let arch = util::output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_owned();
    let dir = util::target_dir().join("debian");
    let debs = Debs {
        deb: dir.join(format!("{PACKAGE}_{version}_{arch}.deb")),
        dbgsym: dir.join(format!("{DBGSYM}_{version}_{arch}.deb")),
    };
    (debs.deb.is_file() && debs.dbgsym.is_file()).then_some(debs)
}

/// Builds the packages; returns their paths.
pub fn run(opts: &DebOptions) -> Result<Debs> {
    for tool in ["dpkg-deb", "dpkg", "strip", "objcopy", "readelf", "gzip"] {
        if !util::have(tool) {
            bail!("{tool} is missing (Debian's dpkg, binutils and gzip provide it)");
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
    let dist = util::root().join("chaos-agent").join("dist").join("debian");
    let read = |name: &str| fs::read(dist.join(name)).with_context(|| format!("reading {}", dist.join(name).display()));
    let changelog = read("changelog")?;
    check_changelog_version(&String::from_utf8_lossy(&changelog), &version)?;

    let out_dir = util::target_dir().join("debian");
    fs::create_dir_all(&out_dir)?;
    let split = split_debug(&payload.binary, &out_dir)?;

    // The package.
    let stage = Stage::new(out_dir.join(format!("{PACKAGE}_{version}_{arch}")))?;
    stage.put(DEB_BIN, &split.stripped, 0o755)?;
    stage.put(DEB_CONFIG, payload.config.as_bytes(), 0o644)?;
    stage.put(DEB_UNIT, payload.unit(DEB_BIN).as_bytes(), 0o644)?;
    for (path, bytes, mode) in payload.docs.files("/usr", "/usr/share/zsh/vendor-completions")? {
        stage.put(&path, &bytes, mode)?;
    }
    stage.put(&format!("/usr/share/doc/{PACKAGE}/copyright"), &read("copyright")?, 0o644)?;
    stage.put(&format!("/usr/share/doc/{PACKAGE}/changelog.gz"), &install::gzip(&changelog)?, 0o644)?;
    stage.put(&format!("/usr/share/lintian/overrides/{PACKAGE}"), &read("lintian-overrides")?, 0o644)?;
    for name in MAINTAINER_SCRIPTS {
        stage.put(&format!("/DEBIAN/{name}"), &read(name)?, 0o755)?;
    }
    stage.put("/DEBIAN/conffiles", format!("{DEB_CONFIG}\n").as_bytes(), 0o644)?;
    let depends = shlib_depends(&stage.path(DEB_BIN));
    let fields = format!(
        "Package: {PACKAGE}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {}\nDepends: {depends}\nSection: admin\nPriority: optional\n\
         Homepage: https://github.com/lymph-chaos/lymph-chaos\nDescription: {DESCRIPTION}\n",
        installed_size_kib(&stage.root)?
    );
    stage.put("/DEBIAN/control", fields.as_bytes(), 0o644)?;
    stage.put("/DEBIAN/md5sums", md5sums(&stage.root)?.as_bytes(), 0o644)?;
    let deb = stage.build(&out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb")))?;

    // Its debug symbols, as dh_strip's automatic -dbgsym package.
    let dbg = Stage::new(out_dir.join(format!("{DBGSYM}_{version}_{arch}")))?;
    dbg.put(&split.debug_path, &split.debug, 0o644)?;
    // /usr/share/doc/<pkg>-dbgsym -> <pkg> (it depends on exactly this version of the package).
    let doc = dbg.path(&format!("/usr/share/doc/{DBGSYM}"));
    fs::create_dir_all(doc.parent().expect("has a parent"))?;
    std::os::unix::fs::symlink(PACKAGE, &doc).with_context(|| format!("linking {}", doc.display()))?;
    let fields = format!(
        "Package: {DBGSYM}\nSource: {PACKAGE}\nVersion: {version}\nAuto-Built-Package: debug-symbols\n\
         Architecture: {arch}\nMaintainer: {MAINTAINER}\nInstalled-Size: {}\nDepends: {PACKAGE} (= {version})\n\
         Section: debug\nPriority: optional\nDescription: debug symbols for {PACKAGE}\nBuild-Ids: {}\n",
        installed_size_kib(&dbg.root)?,
        split.build_id
    );
    dbg.put("/DEBIAN/control", fields.as_bytes(), 0o644)?;
    dbg.put("/DEBIAN/md5sums", md5sums(&dbg.root)?.as_bytes(), 0o644)?;
    let dbgsym = dbg.build(&out_dir.join(format!("{DBGSYM}_{version}_{arch}.deb")))?;

    eprint!("{}", util::output(Command::new("dpkg-deb").arg("--info").arg(&deb)).unwrap_or_default());
    eprint!("{}", util::output(Command::new("dpkg-deb").arg("--contents").arg(&deb)).unwrap_or_default());
    eprint!("{}", util::output(Command::new("dpkg-deb").arg("--contents").arg(&dbgsym)).unwrap_or_default());
    eprintln!("    install: apt-get install ./{}   remove: apt-get purge {PACKAGE}", relative(&deb).display());
    eprintln!("    debug symbols (gdb, coredumpctl, backtraces): apt-get install ./{}", relative(&dbgsym).display());
    Ok(Debs { deb, dbgsym })
}

/// A package tree being staged.
struct Stage {
    root: PathBuf,
}

impl Stage {
    fn new(root: PathBuf) -> Result<Stage> {
        step(format!("staging {}", root.display()));
        if root.exists() {
            fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        }
        fs::create_dir_all(&root)?;
        Ok(Stage { root })
    }

    fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn put(&self, path: &str, bytes: &[u8], mode: u32) -> Result<()> {
        let dest = self.path(path);
        fs::create_dir_all(dest.parent().expect("has a parent"))?;
        fs::write(&dest, bytes).with_context(|| format!("writing {}", dest.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// `dpkg-deb --build` (every file root:root without fakeroot).
    fn build(&self, deb: &Path) -> Result<PathBuf> {
        step(format!("building {}", deb.display()));
        // Directories 0755 whatever the umask (lintian: non-standard-dir-perm).
        set_dir_modes(&self.root)?;
        util::run(Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&self.root).arg(deb))?;
        Ok(deb.to_owned())
    }
}

fn set_dir_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            set_dir_modes(&e.path())?;
        }
    }
    Ok(())
}

/// The binary split as `dh_strip` does it.
struct SplitDebug {
    /// Without symbols or debug information, with a `.gnu_debuglink` to the debug file.
    stripped: Vec<u8>,
    /// The debug information (compressed sections), for the -dbgsym package.
    debug: Vec<u8>,
    /// `/usr/lib/debug/.build-id/<xx>/<rest>.debug`.
    debug_path: String,
    build_id: String,
}

fn split_debug(binary: &Path, work: &Path) -> Result<SplitDebug> {
    step(format!("splitting the debug information off {}", binary.display()));
    let notes = util::output(Command::new("readelf").arg("-n").arg(binary))
        .with_context(|| format!("readelf -n {} failed", binary.display()))?;
    let build_id = parse_build_id(&notes).with_context(|| format!("{} has no GNU build-id note", binary.display()))?;
    let debug_path = format!("/usr/lib/debug/.build-id/{}/{}.debug", &build_id[..2], &build_id[2..]);
    let tmp = work.join(format!("split-{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    let debug_file = tmp.join(format!("{}.debug", &build_id[2..]));
    let stripped_file = tmp.join("lymph-chaos");
    let result = (|| -> Result<SplitDebug> {
        util::run(
            Command::new("objcopy")
                .args(["--only-keep-debug", "--compress-debug-sections"])
                .arg(binary)
                .arg(&debug_file),
        )?;
        util::run(
            Command::new("strip")
                .args(["--remove-section=.comment", "--remove-section=.note", "-o"])
                .arg(&stripped_file)
                .arg(binary),
        )?;
        // The link names the file; gdb finds it by build-id under /usr/lib/debug either way.
        util::run(
            Command::new("objcopy").arg(format!("--add-gnu-debuglink={}", debug_file.display())).arg(&stripped_file),
        )?;
        Ok(SplitDebug {
            stripped: fs::read(&stripped_file)?,
            debug: fs::read(&debug_file)?,
            debug_path: debug_path.clone(),
            build_id: build_id.clone(),
        })
    })();
    let _ = fs::remove_dir_all(&tmp);
    let split = result?;
    eprintln!(
        "    {} MiB stripped, {} MiB of debug information ({debug_path})",
        split.stripped.len() >> 20,
        split.debug.len() >> 20
    );
    Ok(split)
}

/// The build-id in `readelf -n` output (`    Build ID: a560fa…`).
fn parse_build_id(notes: &str) -> Option<String> {
    let id = notes.lines().find_map(|l| l.trim().strip_prefix("Build ID:"))?.trim();
    (id.len() > 2 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// The changelog's first entry must be for the version being packaged (lintian and dpkg read it).
fn check_changelog_version(changelog: &str, version: &str) -> Result<()> {
    let first = changelog.lines().next().unwrap_or_default();
    let expected = format!("{PACKAGE} ({version}) ");
    if !first.starts_with(&expected) {
        bail!(
            "chaos-agent/dist/debian/changelog starts with `{first}`, not with an entry for {version}: add one \
             (`{PACKAGE} ({version}) unstable; urgency=medium`, what changed, maintainer line)"
        );
    }
    Ok(())
}

fn relative(p: &Path) -> PathBuf {
    std::env::current_dir().ok().and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf)).unwrap_or(p.into())
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
            let meta = fs::symlink_metadata(&p)?;
            if meta.is_dir() {
                walk(base, &p, out)?;
            } else if meta.is_file() {
                out.push((rel, meta.len()));
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
    fn finds_the_build_id() {
        let notes = "Displaying notes found in: .note.gnu.build-id\n  Owner                Data size \tDescription\n  \
                     GNU                  0x00000014\tNT_GNU_BUILD_ID (unique build ID bitstring)\n    \
                     Build ID: a560faec38a3376080e0046f27a314f67862e701\n";
        assert_eq!(parse_build_id(notes).as_deref(), Some("a560faec38a3376080e0046f27a314f67862e701"));
        assert_eq!(parse_build_id("no notes"), None);
    }

    #[test]
    fn the_shipped_changelog_is_for_this_version() {
        let changelog = fs::read_to_string(util::root().join("chaos-agent/dist/debian/changelog")).unwrap();
        check_changelog_version(&changelog, env!("CARGO_PKG_VERSION")).unwrap();
        assert!(check_changelog_version(&changelog, "9.9.9").is_err());
    }

    #[test]
    fn md5_matches_coreutils() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    }
}
