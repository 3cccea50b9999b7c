//! `cargo xtask install [--uninstall] [--prefix /] [--start]`: the agent as an installed service.
//!
//! Layout:
//! - [`build_release`] — `cargo xtask build-ebpf`, then the release agent (the BPF object is embedded)
//! - [`Payload`] — what is shipped, from `chaos-agent/dist/`: the binary, the default config, the systemd unit
//!   (also used by `cargo xtask deb`)
//! - [`install`] / [`uninstall`] — into a root directory (`--prefix`, default `/`); every file and directory
//!   created is recorded in [`MANIFEST`], so uninstalling removes exactly that, plus what the agent itself writes at
//!   run time (state, event log, pinned maps)
//! - starting and stopping — `systemctl enable --now` where systemd runs; elsewhere the exact command to start
//!   the agent is printed, and `--start` runs it in the background (its pid and start time are recorded; only
//!   that process is ever stopped by `--uninstall`)
//!
//! Installed (under the prefix):
//! - `/usr/local/bin/lymph-chaos` (the BPF object is inside it)
//! - `/etc/lymph-chaos/config.yml` — written only when absent: a reinstall never overwrites it (an unmodified
//!   copy written by an earlier install is updated to the new default)
//! - `/etc/systemd/system/lymph-chaos.service`
//! - `/var/lib/lymph-chaos/install-manifest`

use std::{
    fs,
    io::Write,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    ebpf,
    util::{self, step},
};

/// The installed binary.
pub const BIN: &str = "/usr/local/bin/lymph-chaos";
/// The configuration file (the agent's default, `chaos_agent::paths::CONFIG_FILE`).
pub const CONFIG: &str = "/etc/lymph-chaos/config.yml";
/// The systemd unit (the administrator's directory: it takes precedence over a packaged unit).
pub const UNIT: &str = "/etc/systemd/system/lymph-chaos.service";
/// The unit's name.
pub const UNIT_NAME: &str = "lymph-chaos.service";
/// What this installer put where.
pub const MANIFEST: &str = "/var/lib/lymph-chaos/install-manifest";
/// Log of an agent started with `--start` (no systemd).
pub const START_LOG: &str = "/var/log/lymph-chaos/agent.log";
/// What the agent writes at run time (`chaos_agent::paths`): state dir, event log dir, bpffs pin dir.
const RUNTIME_DIRS: &[&str] = &["/run/lymph-chaos", "/var/log/lymph-chaos", "/sys/fs/bpf/lymph-chaos"];
/// The agent's pid file (state dir + `agent.pid`).
const AGENT_PID_FILE: &str = "/run/lymph-chaos/agent.pid";
/// The agent's default RPC endpoint, probed after `--start`.
const AGENT_RPC: &str = "127.0.0.1:4575";
/// How long an agent gets to revert its faults after SIGTERM (the unit's TimeoutStopSec).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `--start` waits for the agent to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// The Debian package `cargo xtask deb` builds (both installs at once would fight over port and state).
const DEB_PACKAGE: &str = "lymph-chaos";

/// Options of `cargo xtask install`.
pub struct InstallOptions {
    /// Root to install under (`/`, or a staging directory).
    pub prefix: PathBuf,
    /// Remove instead of installing.
    pub uninstall: bool,
    /// Start the agent (without systemd: in the background, recorded for `--uninstall`).
    pub start: bool,
    /// With systemd: install and enable, but do not start.
    pub no_start: bool,
    /// With `--uninstall`: also remove a configuration file that was edited after installing.
    pub purge: bool,
    /// Install this binary instead of building the release agent (tests, packaging pipelines).
    pub binary: Option<PathBuf>,
}

/// The files shipped with the agent (`chaos-agent/dist/`).
pub struct Payload {
    /// The agent binary to install.
    pub binary: PathBuf,
    /// The default configuration (YAML with every key documented).
    pub config: String,
    /// The systemd unit, with `@BINARY@` where the binary's path goes.
    pub unit_template: String,
}

impl Payload {
    /// Reads the shipped files; `binary` is the agent to install.
    pub fn load(binary: PathBuf) -> Result<Payload> {
        let dist = util::root().join("chaos-agent").join("dist");
        let read = |name: &str| {
            fs::read_to_string(dist.join(name)).with_context(|| format!("reading {}", dist.join(name).display()))
        };
        if !binary.is_file() {
            bail!("{} does not exist", binary.display());
        }
        Ok(Payload { binary, config: read("config.yml")?, unit_template: read("lymph-chaos.service")? })
    }

    /// The unit for a binary installed at `bin`.
    pub fn unit(&self, bin: &str) -> String {
        self.unit_template.replace("@BINARY@", bin)
    }
}

/// The binary as installed: without its debug sections (`strip --strip-debug`, as `dh_strip` does; 72 → 13 MiB),
/// symbols kept so backtraces still name functions. The unstripped binary stays in `target/release/`. Falls back
/// to the binary as it is when `strip` is missing or fails.
pub fn installable_binary(binary: &Path) -> Result<Vec<u8>> {
    if util::have("strip") {
        let tmp = util::target_dir().join(format!("lymph-chaos.stripped-{}", std::process::id()));
        let ok = Command::new("strip").arg("--strip-debug").arg("-o").arg(&tmp).arg(binary).status();
        let bytes = if ok.is_ok_and(|s| s.success()) { fs::read(&tmp).ok() } else { None };
        let _ = fs::remove_file(&tmp);
        if let Some(bytes) = bytes {
            return Ok(bytes);
        }
    }
    fs::read(binary).with_context(|| format!("reading {}", binary.display()))
}

/// Builds the BPF object and the release agent; returns the binary.
pub fn build_release() -> Result<PathBuf> {
    ebpf::build()?;
    step("building lymph-chaos (release; the BPF object is embedded)");
    util::run(util::cargo().current_dir(util::root()).args(["build", "--release", "--package", "chaos-agent"]))?;
    Ok(util::target_dir().join("release").join("lymph-chaos"))
}

/// `cargo xtask install …`.
pub fn run(opts: &InstallOptions) -> Result<()> {
    let real_root = opts.prefix == Path::new("/");
    if real_root && !util::is_root() {
        bail!(
            "installing into / needs root: run `sudo -E cargo xtask install{}` (or --prefix <dir> to stage)",
            if opts.uninstall { " --uninstall" } else { "" }
        );
    }
    if opts.uninstall {
        return uninstall(&opts.prefix, opts.purge);
    }
    if real_root && util::dpkg_installed(DEB_PACKAGE) {
        bail!("lymph-chaos is installed as a Debian package; remove it first (apt-get remove {DEB_PACKAGE})");
    }
    let started = Instant::now();
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => build_release()?,
    };
    let payload = Payload::load(binary)?;
    step(format!("installing into {}", opts.prefix.display()));
    let mut manifest = install(&opts.prefix, &payload)?;
    if real_root {
        service(&mut manifest, &opts.prefix, opts)?;
    } else if opts.start {
        eprintln!("    (not starting: --prefix {} is a staging root)", opts.prefix.display());
    }
    manifest.save(&opts.prefix)?;
    eprintln!("    installed in {:.1?}; `cargo xtask install --uninstall` removes it again", started.elapsed());
    Ok(())
}

/// A path under the prefix.
fn under(prefix: &Path, path: &str) -> PathBuf {
    prefix.join(path.trim_start_matches('/'))
}

/// FNV-1a 64: stable across Rust releases; tells "the config we wrote" from "a config somebody edited".
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// One manifest line.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    /// A directory this installer created (removed when empty).
    Dir(String),
    /// A file this installer owns.
    File(String),
    /// The configuration file this installer created, with the hash of what it wrote.
    Config(String, u64),
    /// `systemctl enable` was run.
    SystemdEnabled,
    /// An agent started by `--start`: pid and start time (clock ticks after boot, `/proc/<pid>/stat` field 22).
    Started(i32, u64),
}

/// The record of an install, one entry per line (`kind<TAB>path[<TAB>detail]`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Manifest {
    entries: Vec<Entry>,
}

const MANIFEST_HEADER: &str = "# lymph-chaos install manifest, written by `cargo xtask install`.\n\
     # `cargo xtask install --uninstall` removes exactly what is listed here. Do not edit.\n";

impl Manifest {
    fn parse(text: &str) -> Manifest {
        let entries = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                match f.as_slice() {
                    ["dir", p] => Some(Entry::Dir((*p).to_owned())),
                    ["file", p] => Some(Entry::File((*p).to_owned())),
                    ["config", p, h] => u64::from_str_radix(h, 16).ok().map(|h| Entry::Config((*p).to_owned(), h)),
                    ["systemd", "enabled"] => Some(Entry::SystemdEnabled),
                    ["started", pid, t] => Some(Entry::Started(pid.parse().ok()?, t.parse().ok()?)),
                    _ => None,
                }
            })
            .collect();
        Manifest { entries }
    }

    fn render(&self) -> String {
        let mut out = MANIFEST_HEADER.to_owned();
        for e in &self.entries {
            let line = match e {
                Entry::Dir(p) => format!("dir\t{p}"),
                Entry::File(p) => format!("file\t{p}"),
                Entry::Config(p, h) => format!("config\t{p}\t{h:016x}"),
                Entry::SystemdEnabled => "systemd\tenabled".to_owned(),
                Entry::Started(pid, t) => format!("started\t{pid}\t{t}"),
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    fn load(prefix: &Path) -> Result<Option<Manifest>> {
        let path = under(prefix, MANIFEST);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(Manifest::parse(&text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, prefix: &Path) -> Result<()> {
        write_atomic(&under(prefix, MANIFEST), self.render().as_bytes(), 0o644)
    }

    fn add(&mut self, e: Entry) {
        if !self.entries.contains(&e) {
            self.entries.push(e);
        }
    }

    fn config(&self) -> Option<(&str, u64)> {
        self.entries.iter().find_map(|e| match e {
            Entry::Config(p, h) => Some((p.as_str(), *h)),
            _ => None,
        })
    }

    fn started(&self) -> Option<(i32, u64)> {
        self.entries.iter().find_map(|e| match e {
            Entry::Started(pid, t) => Some((*pid, *t)),
            _ => None,
        })
    }
}

/// Writes `bytes` to a temp file next to `path` and renames it over `path` (replacing a running binary works).
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("lymph-chaos-tmp");
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Creates `path`'s missing ancestors (up to the prefix), recording each one created.
fn create_dirs(prefix: &Path, dir: &str, manifest: &mut Manifest) -> Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(Path::new(dir));
    while let Some(d) = cur {
        if d == Path::new("/") || under(prefix, &d.to_string_lossy()).is_dir() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    for d in missing.iter().rev() {
        let real = under(prefix, &d.to_string_lossy());
        fs::create_dir(&real).with_context(|| format!("creating {}", real.display()))?;
        fs::set_permissions(&real, fs::Permissions::from_mode(0o755))?;
        manifest.add(Entry::Dir(d.to_string_lossy().into_owned()));
    }
    Ok(())
}

/// Copies the payload under `prefix`; returns the manifest (merged with an earlier install's).
fn install(prefix: &Path, payload: &Payload) -> Result<Manifest> {
    let mut manifest = Manifest::load(prefix)?.unwrap_or_default();
    for dir in [BIN, CONFIG, UNIT, MANIFEST].map(|p| Path::new(p).parent().expect("absolute").to_string_lossy()) {
        create_dirs(prefix, &dir, &mut manifest)?;
    }
    let bin = installable_binary(&payload.binary)?;
    write_atomic(&under(prefix, BIN), &bin, 0o755)?;
    manifest.add(Entry::File(BIN.into()));
    eprintln!("    {BIN} ({:.1} MiB)", bin.len() as f64 / (1 << 20) as f64);

    let config_path = under(prefix, CONFIG);
    let shipped_hash = fnv1a64(payload.config.as_bytes());
    match fs::read(&config_path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(&config_path, payload.config.as_bytes(), 0o644)?;
            manifest.entries.retain(|e| !matches!(e, Entry::Config(..)));
            manifest.add(Entry::Config(CONFIG.into(), shipped_hash));
            eprintln!("    {CONFIG} (default configuration)");
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", config_path.display())),
        Ok(existing) => {
            let ours_unmodified = manifest.config().is_some_and(|(_, h)| h == fnv1a64(&existing));
            if ours_unmodified && fnv1a64(&existing) != shipped_hash {
                write_atomic(&config_path, payload.config.as_bytes(), 0o644)?;
                manifest.entries.retain(|e| !matches!(e, Entry::Config(..)));
                manifest.add(Entry::Config(CONFIG.into(), shipped_hash));
                eprintln!("    {CONFIG} (unmodified earlier default: updated to this version's default)");
            } else if ours_unmodified {
                eprintln!("    {CONFIG} (this version's default, unchanged)");
            } else {
                eprintln!("    {CONFIG} exists: kept as it is (never overwritten)");
            }
        }
    }

    write_atomic(&under(prefix, UNIT), payload.unit(BIN).as_bytes(), 0o644)?;
    manifest.add(Entry::File(UNIT.into()));
    eprintln!("    {UNIT}");
    manifest.add(Entry::File(MANIFEST.into()));
    manifest.save(prefix)?;
    eprintln!("    {MANIFEST}");
    // The installed binary runs (the right architecture, nothing missing).
    let version = util::output(Command::new(under(prefix, BIN)).arg("--version"))
        .with_context(|| format!("{} --version failed", under(prefix, BIN).display()))?;
    eprintln!("    {}", version.trim());
    Ok(manifest)
}

/// Whether systemd is the running init (`sd_booted()`).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The command that starts the agent in the background without systemd.
pub fn manual_start_command(bin: &str) -> String {
    format!(
        "mkdir -p {log_dir} && setsid nohup {bin} agent --config {CONFIG} >>{START_LOG} 2>&1 </dev/null &",
        log_dir = Path::new(START_LOG).parent().expect("absolute").display()
    )
}

fn service(manifest: &mut Manifest, prefix: &Path, opts: &InstallOptions) -> Result<()> {
    if systemd_running() {
        util::run(Command::new("systemctl").arg("daemon-reload"))?;
        if opts.no_start {
            util::run(Command::new("systemctl").args(["enable", UNIT_NAME]))?;
            eprintln!("    enabled, not started: systemctl start lymph-chaos");
        } else {
            util::run(Command::new("systemctl").args(["enable", "--now", UNIT_NAME]))?;
            eprintln!("    running: systemctl status lymph-chaos; logs: journalctl -u lymph-chaos");
        }
        manifest.add(Entry::SystemdEnabled);
        return Ok(());
    }
    if let Some((pid, t)) = manifest.started()
        && is_our_agent(pid, t)
    {
        step(format!("stopping the agent started by the previous install (pid {pid})"));
        stop_agent(pid)?;
    }
    manifest.entries.retain(|e| !matches!(e, Entry::Started(..)));
    if !opts.start {
        step("systemd is not running here (no /run/systemd/system): the unit is installed but nothing was started");
        eprintln!("    Start the agent in the background with:");
        eprintln!("        {}", manual_start_command(BIN));
        eprintln!("    or let the installer do it (then `--uninstall` stops it again):");
        eprintln!("        cargo xtask install --start");
        eprintln!("    Stop it (it reverts every fault first) with:");
        eprintln!("        kill -TERM \"$(cat {AGENT_PID_FILE})\"");
        return Ok(());
    }
    if let Some(pid) = running_agent() {
        bail!(
            "an agent is already running (pid {pid}, not started by this installer); stop it first: kill -TERM {pid}"
        );
    }
    step("systemd is not running here: starting the agent in the background");
    let (pid, t) = start_agent(prefix)?;
    manifest.add(Entry::Started(pid, t));
    Ok(())
}

/// Starts the installed agent detached (own session, log file); waits until it listens. Returns pid and start time.
fn start_agent(prefix: &Path) -> Result<(i32, u64)> {
    let log_path = under(prefix, START_LOG);
    fs::create_dir_all(log_path.parent().expect("absolute"))?;
    let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut cmd = Command::new(under(prefix, BIN));
    cmd.args(["agent", "--config", CONFIG])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env_remove("RUST_LOG");
    // SAFETY: setsid is async-signal-safe; the child leaves our session so that it outlives this process and the
    // terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    eprintln!("    $ {} (log {})", util::show(&cmd), log_path.display());
    let mut child = cmd.spawn().with_context(|| format!("starting {BIN}"))?;
    let pid = i32::try_from(child.id()).context("pid")?;
    let t = start_time(pid).context("reading the agent's start time")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the agent exited at once ({status}); see {}", log_path.display());
        }
        if std::net::TcpStream::connect_timeout(&AGENT_RPC.parse().expect("valid"), Duration::from_millis(200)).is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("    (the agent runs but does not listen on {AGENT_RPC} yet; see {})", log_path.display());
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "    agent running: pid {pid}, tcp://{AGENT_RPC}; stop: cargo xtask install --uninstall (or kill -TERM {pid})"
    );
    // Not waited for: it is meant to outlive us (init reaps it).
    drop(child);
    Ok((pid, t))
}

/// `/proc/<pid>/stat` field 22 (start time in clock ticks after boot): with the pid, identifies one process.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields after the last ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still the agent we started (same start time, running our binary).
fn is_our_agent(pid: i32, t: u64) -> bool {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    start_time(pid) == Some(t) && exe.trim_end_matches(" (deleted)") == BIN
}

/// A running agent according to its pid file (any agent, ours or not).
fn running_agent() -> Option<i32> {
    let pid: i32 = fs::read_to_string(AGENT_PID_FILE).ok()?.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("lymph-chaos") && cmdline.contains("agent")).then_some(pid)
}

/// SIGTERM (the agent reverts its faults and exits), SIGKILL after [`STOP_TIMEOUT`].
fn stop_agent(pid: i32) -> Result<()> {
    let t = start_time(pid);
    let alive = || start_time(pid).is_some_and(|now| Some(now) == t) && !is_zombie(pid);
    // SAFETY: kill has no memory-safety preconditions; pid was just identified by pid + start time.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Ok(()); // already gone
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while alive() {
        if Instant::now() > deadline {
            eprintln!("    pid {pid} did not exit within {STOP_TIMEOUT:?} of SIGTERM: SIGKILL");
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("    stopped the agent (pid {pid})");
    Ok(())
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// `cargo xtask install --uninstall`.
fn uninstall(prefix: &Path, purge: bool) -> Result<()> {
    let real_root = prefix == Path::new("/");
    let Some(manifest) = Manifest::load(prefix)? else {
        bail!(
            "nothing to uninstall: no {} (was it installed with `cargo xtask install`?)",
            under(prefix, MANIFEST).display()
        );
    };
    step(format!("uninstalling from {}", prefix.display()));
    if real_root {
        if manifest.entries.contains(&Entry::SystemdEnabled) && systemd_running() {
            util::run(Command::new("systemctl").args(["disable", "--now", UNIT_NAME]))?;
        }
        if let Some((pid, t)) = manifest.started()
            && is_our_agent(pid, t)
        {
            stop_agent(pid)?;
        }
        if let Some(pid) = running_agent() {
            bail!(
                "an agent not started by this installer is running (pid {pid}); stop it first (kill -TERM {pid}), \
                 then uninstall again: nothing was removed"
            );
        }
    }
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    for e in &manifest.entries {
        match e {
            Entry::File(p) if p != MANIFEST => remove_file(&under(prefix, p), &mut removed)?,
            Entry::Config(p, h) => {
                let path = under(prefix, p);
                let unmodified = fs::read(&path).map(|b| fnv1a64(&b) == *h).unwrap_or(true);
                if unmodified || purge {
                    remove_file(&path, &mut removed)?;
                } else {
                    kept.push(format!("{} (edited since installed; --purge removes it)", path.display()));
                }
            }
            _ => {}
        }
    }
    if purge {
        // Also a configuration this installer did not create (kept by an earlier uninstall, or written by hand).
        remove_file(&under(prefix, CONFIG), &mut removed)?;
    }
    // What the agent wrote at run time, and the log of an agent started by --start.
    for dir in RUNTIME_DIRS {
        let path = under(prefix, dir);
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(path.display().to_string());
        }
    }
    remove_file(&under(prefix, MANIFEST), &mut removed)?;
    // Directories we created, deepest first, when empty.
    let config_dir = Path::new(CONFIG).parent().expect("absolute").to_string_lossy().into_owned();
    let mut dirs: Vec<&String> =
        manifest.entries.iter().filter_map(|e| if let Entry::Dir(d) = e { Some(d) } else { None }).collect();
    if purge && !dirs.contains(&&config_dir) {
        dirs.push(&config_dir);
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.len()));
    for d in dirs {
        let path = under(prefix, d);
        match fs::remove_dir(&path) {
            Ok(()) => removed.push(format!("{}/", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => kept.push(format!("{}/ (not empty)", path.display())),
        }
    }
    if real_root && systemd_running() {
        util::run(Command::new("systemctl").arg("daemon-reload"))?;
    }
    for r in &removed {
        eprintln!("    removed {r}");
    }
    for k in &kept {
        eprintln!("    kept    {k}");
    }
    Ok(())
}

fn remove_file(path: &Path, removed: &mut Vec<String>) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {
            removed.push(path.display().to_string());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file under `dir`, relative, sorted.
    fn tree(dir: &Path) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                let rel = p.strip_prefix(base).unwrap().display().to_string();
                if p.is_dir() {
                    out.push(format!("{rel}/"));
                    walk(base, &p, out);
                } else {
                    out.push(rel);
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    fn staging() -> PathBuf {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xtask-install-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A stand-in binary that answers `--version` like the agent.
    fn fake_agent(dir: &Path) -> PathBuf {
        let bin = dir.join("fake-lymph-chaos");
        fs::write(&bin, "#!/bin/sh\necho lymph-chaos 0.0.0-test\n").unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    #[test]
    fn manifest_round_trips() {
        let m = Manifest {
            entries: vec![
                Entry::Dir("/etc/lymph-chaos".into()),
                Entry::File(BIN.into()),
                Entry::Config(CONFIG.into(), 0xdead_beef),
                Entry::SystemdEnabled,
                Entry::Started(42, 1234),
            ],
        };
        assert_eq!(Manifest::parse(&m.render()), m);
    }

    #[test]
    fn install_then_uninstall_leaves_nothing_and_never_overwrites_an_edited_config() {
        let work = staging();
        let root = work.join("root");
        fs::create_dir(&root).unwrap();
        let payload = Payload::load(fake_agent(&work)).unwrap();

        install(&root, &payload).unwrap();
        let files = tree(&root);
        for want in [
            "usr/local/bin/lymph-chaos",
            "etc/lymph-chaos/config.yml",
            "etc/systemd/system/lymph-chaos.service",
            "var/lib/lymph-chaos/install-manifest",
        ] {
            assert!(files.contains(&want.to_owned()), "{want} missing from {files:?}");
        }
        let unit = fs::read_to_string(under(&root, UNIT)).unwrap();
        assert!(unit.contains(&format!("ExecStart={BIN} agent --config {CONFIG}\n")), "{unit}");
        assert_eq!(fs::metadata(under(&root, BIN)).unwrap().permissions().mode() & 0o777, 0o755);

        // Reinstall over an edited config: kept.
        fs::write(under(&root, CONFIG), "dry_run: true\n").unwrap();
        install(&root, &payload).unwrap();
        assert_eq!(fs::read_to_string(under(&root, CONFIG)).unwrap(), "dry_run: true\n");
        // --purge removes it too.
        uninstall(&root, true).unwrap();
        assert_eq!(tree(&root), Vec::<String>::new(), "uninstall --purge leaves nothing behind");

        // Without --purge, an edited config (and the directory holding it) stays.
        install(&root, &payload).unwrap();
        fs::write(under(&root, CONFIG), "dry_run: true\n").unwrap();
        uninstall(&root, false).unwrap();
        assert_eq!(
            tree(&root),
            vec!["etc/".to_owned(), "etc/lymph-chaos/".into(), "etc/lymph-chaos/config.yml".into()]
        );
        // A later install adopts it (never overwriting it), and --purge removes it.
        install(&root, &payload).unwrap();
        assert_eq!(fs::read_to_string(under(&root, CONFIG)).unwrap(), "dry_run: true\n");
        uninstall(&root, true).unwrap();
        assert_eq!(tree(&root), vec!["etc/".to_owned()], "only the pre-existing /etc stays");
        fs::remove_dir(root.join("etc")).unwrap();

        // A clean install/uninstall cycle removes everything without --purge; directories that existed stay.
        fs::create_dir_all(root.join("usr/local/bin")).unwrap();
        install(&root, &payload).unwrap();
        uninstall(&root, false).unwrap();
        assert_eq!(tree(&root), vec!["usr/".to_owned(), "usr/local/".into(), "usr/local/bin/".into()]);
        assert!(uninstall(&root, false).is_err(), "nothing left to uninstall");
        fs::remove_dir_all(&work).unwrap();
    }

    #[test]
    fn an_unmodified_default_config_follows_new_versions() {
        let work = staging();
        let root = work.join("root");
        fs::create_dir(&root).unwrap();
        let mut payload = Payload::load(fake_agent(&work)).unwrap();
        install(&root, &payload).unwrap();
        payload.config.push_str("# a newer default\n");
        install(&root, &payload).unwrap();
        assert!(fs::read_to_string(under(&root, CONFIG)).unwrap().ends_with("# a newer default\n"));
        uninstall(&root, false).unwrap();
        assert_eq!(tree(&root), Vec::<String>::new());
        fs::remove_dir_all(&work).unwrap();
    }

    #[test]
    fn the_manual_start_command_is_complete() {
        let cmd = manual_start_command(BIN);
        assert!(cmd.starts_with("mkdir -p /var/log/lymph-chaos && setsid nohup /usr/local/bin/lymph-chaos agent"));
        assert!(cmd.contains(&format!("--config {CONFIG}")) && cmd.ends_with(" &"));
    }

    #[test]
    fn start_time_identifies_this_process() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(me), start_time(me));
        assert!(!is_our_agent(me, start_time(me).unwrap()), "not running the installed binary");
    }
}
