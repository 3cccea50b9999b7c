//! The services the ZooKeeper + lymph test tier needs: a private ZooKeeper and a venv with a patched lymph 0.15.
//!
//! Layout:
//! - [`ensure_zookeeper_installed`] — Debian's ZooKeeper 3.8 + a JRE (apt, only when missing)
//! - [`ZooKeeper`] — a loopback-only ZooKeeper on a free port, a child of this process that dies with it;
//!   `Drop` stops it (by pid) and removes its data dir
//! - [`ensure_lymph_venv`] — a venv on Debian's `/usr/bin/python3` with lymph 0.15.0 and the pinned deps of
//!   lymph 0.15 from PyPI, patched by `tests/lymph/patch_lymph.py`; rebuilt only when the stamp
//!   (requirements + patch script hash + python version) changes
//!
//! Tests get both through the environment: `CHAOS_TEST_ZK=127.0.0.1:<port>` and `CHAOS_LYMPH_VENV=<venv>` (read by
//! `chaos-tests`' `zk` and `lymph` modules).

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    child::{die_with_parent, log_tail as tail, stop_child},
    util::{self, apt_install, run, step},
};

/// Environment variable that gives tests the ZooKeeper address (`127.0.0.1:<port>`).
pub const ZK_ENV: &str = "CHAOS_TEST_ZK";
/// Environment variable that gives tests the lymph venv.
pub const LYMPH_VENV_ENV: &str = "CHAOS_LYMPH_VENV";

// ---------------------------------------------------------------------------------------------------------------
// ZooKeeper

/// Debian packages for ZooKeeper. `zookeeper` (jars + scripts), not `zookeeperd`: the latter only adds the init
/// script, and where no `policy-rc.d` forbids it, its postinst starts a system ZooKeeper on 0.0.0.0:2181.
const ZK_APT_PACKAGES: &[&str] = &["zookeeper", "default-jre-headless"];
const JAVA: &str = "/usr/bin/java";
/// The jars `zkServer.sh` puts on the classpath (`zkEnv.sh`), plus the slf4j → log4j 1.2 binding: without it
/// Debian's ZooKeeper logs nothing at all (slf4j falls back to its NOP logger), and a failed start says nothing.
const ZK_CLASSPATH: &[&str] =
    &["/usr/share/java/zookeeper.jar", "/usr/share/java/slf4j-log4j12.jar", "/usr/share/java/log4j-1.2.jar"];
/// Standalone server main (what `QuorumPeerMain` delegates to when the config has no quorum).
const ZK_MAIN_CLASS: &str = "org.apache.zookeeper.server.ZooKeeperServerMain";
const ZK_TICK_MS: u32 = 2000;
const ZK_READY_TIMEOUT: Duration = Duration::from_secs(30);
const ZK_STOP_GRACE: Duration = Duration::from_secs(5);
/// How often a start is retried when another process took the chosen port before ZooKeeper bound it.
const ZK_PORT_ATTEMPTS: usize = 3;
const LOG_TAIL_LINES: usize = 40;

/// Installs ZooKeeper and a JRE when they are missing (needs root for apt).
///
/// # Errors
/// apt fails, or (not root) the packages are missing.
pub fn ensure_zookeeper_installed() -> Result<()> {
    apt_install(ZK_APT_PACKAGES, "the ZooKeeper test tier")?;
    for path in std::iter::once(JAVA).chain(ZK_CLASSPATH.iter().copied()) {
        if !Path::new(path).exists() {
            bail!("{path} is missing although {} are installed", ZK_APT_PACKAGES.join(" "));
        }
    }
    Ok(())
}

/// A private, loopback-only ZooKeeper server started by this process.
///
/// Files under the directory given to [`ZooKeeper::start`]: `zoo.cfg`, `conf/log4j.properties`, `data/`
/// (removed on drop) and `zookeeper.log` (the server's stdout + stderr, kept for post-mortems).
pub struct ZooKeeper {
    /// The client port on 127.0.0.1.
    pub port: u16,
    child: Child,
    data_dir: PathBuf,
    log: PathBuf,
}

impl ZooKeeper {
    /// Starts ZooKeeper with a private config in `dir` on a free 127.0.0.1 port and waits until it answers `ruok`.
    ///
    /// The server is the JVM itself (the command line `zkServer.sh start-foreground` execs, built here because
    /// Debian's `zkEnv.sh` hard-codes `ZOO_LOG_DIR=/var/log/zookeeper` and a classpath without a log binding). It
    /// gets `PR_SET_PDEATHSIG` = SIGKILL, so it dies with the thread that started it even when that is killed.
    /// No JMX (`JMXDISABLE=true` in zkServer.sh terms: no `-Dcom.sun.management.jmxremote`), no admin server;
    /// the four-letter words lymph needs (`envi` for kazoo's `server_version()`) are whitelisted.
    ///
    /// # Errors
    /// The directory cannot be written, java cannot start, or ZooKeeper does not answer `imok` within 30 s (the
    /// error carries the tail of its log).
    pub fn start(dir: &Path) -> Result<ZooKeeper> {
        let mut last_err = None;
        for _ in 0..ZK_PORT_ATTEMPTS {
            match Self::start_once(dir) {
                Ok(zk) => return Ok(zk),
                // The free port was taken between our probe and ZooKeeper's bind: try another one.
                Err(StartError::PortTaken(err)) => last_err = Some(err),
                Err(StartError::Other(err)) => return Err(err),
            }
        }
        Err(last_err
            .expect("at least one attempt")
            .context(format!("ZooKeeper: no free port in {ZK_PORT_ATTEMPTS} tries")))
    }

    fn start_once(dir: &Path) -> Result<ZooKeeper, StartError> {
        let started = Instant::now();
        let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
        let data_dir = dir.join("data");
        let conf_dir = dir.join("conf");
        // A data dir left by a killed run holds nothing we want (sessions, test znodes).
        remove_dir_if_exists(&data_dir)?;
        fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        fs::create_dir_all(&conf_dir).with_context(|| format!("creating {}", conf_dir.display()))?;
        let port = free_loopback_port()?;
        let cfg = dir.join("zoo.cfg");
        write(&cfg, &zoo_cfg(&data_dir, port))?;
        write(&conf_dir.join("log4j.properties"), LOG4J_PROPERTIES)?;
        let log = dir.join("zookeeper.log");
        let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;

        let classpath = std::iter::once(conf_dir.to_string_lossy().into_owned())
            .chain(ZK_CLASSPATH.iter().map(|s| s.to_string()))
            .collect::<Vec<_>>()
            .join(":");
        let mut cmd = Command::new(JAVA);
        cmd.arg(format!("-Dzookeeper.log.dir={}", dir.display()))
            .arg("-Dzookeeper.log.file=zookeeper.log")
            .arg("-Dzookeeper.jmx.log4j.disable=true")
            .args(["-Xmx256m", "-XX:+ExitOnOutOfMemoryError", "-cp", &classpath, ZK_MAIN_CLASS])
            .arg(&cfg)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("duplicating the log fd")?)
            .stderr(log_file);
        die_with_parent(&mut cmd);
        eprintln!("    $ {}", util::show(&cmd));
        let child = cmd.spawn().with_context(|| format!("starting {JAVA}"))?;
        let mut zk = ZooKeeper { port, child, data_dir, log };

        let deadline = Instant::now() + ZK_READY_TIMEOUT;
        loop {
            if let Some(status) = zk.child.try_wait().context("waiting for java")? {
                let tail = tail(&zk.log, LOG_TAIL_LINES);
                let err =
                    anyhow::anyhow!("ZooKeeper exited during start ({status}); tail of {}:\n{tail}", zk.log.display());
                return Err(if tail.contains("Address already in use") {
                    StartError::PortTaken(err)
                } else {
                    err.into()
                });
            }
            if matches!(four_letter_word(zk.port, "ruok"), Ok(answer) if answer == "imok") {
                break;
            }
            if Instant::now() >= deadline {
                return Err(anyhow::anyhow!(
                    "ZooKeeper on 127.0.0.1:{port} did not answer `ruok` within {ZK_READY_TIMEOUT:?}; tail of {}:\n{}",
                    zk.log.display(),
                    tail(&zk.log, LOG_TAIL_LINES)
                )
                .into());
            }
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!("    ZooKeeper ready on {} (pid {}) after {:.1?}", zk.addr(), zk.pid(), started.elapsed());
        Ok(zk)
    }

    /// `127.0.0.1:<port>`, the value for [`ZK_ENV`].
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The pid of the JVM.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log (stdout + stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        if let Err(err) = stop_child(&mut self.child, ZK_STOP_GRACE) {
            eprintln!("xtask: stopping ZooKeeper (pid {}): {err:#}", self.child.id());
        }
        if let Err(err) = remove_dir_if_exists(&self.data_dir) {
            eprintln!("xtask: {err:#}");
        }
    }
}

enum StartError {
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(err: anyhow::Error) -> Self {
        StartError::Other(err)
    }
}

fn zoo_cfg(data_dir: &Path, port: u16) -> String {
    format!(
        "# Written by `cargo xtask` (xtask/src/services.rs): a private, loopback-only test server.\n\
         tickTime={ZK_TICK_MS}\n\
         initLimit=10\n\
         syncLimit=5\n\
         dataDir={data}\n\
         clientPort={port}\n\
         clientPortAddress=127.0.0.1\n\
         # Tests open one session per lymph process, all from 127.0.0.1 (default limit: 60).\n\
         maxClientCnxns=0\n\
         # Test data: no fsync per transaction.\n\
         forceSync=no\n\
         admin.enableServer=false\n\
         # lymph (kazoo's server_version()) needs `envi`.\n\
         4lw.commands.whitelist=ruok,stat,envi,srvr,conf\n",
        data = data_dir.display(),
    )
}

const LOG4J_PROPERTIES: &str = "\
# Written by `cargo xtask`: everything to stdout, which goes to zookeeper.log.
log4j.rootLogger=INFO, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} - %-5p [%t:%C{1}@%L] - %m%n
";

/// A port that was free on 127.0.0.1 a moment ago (bind to port 0, read it back, close).
fn free_loopback_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Sends a four-letter word (`ruok`, `srvr`, …) to the local ZooKeeper and returns its answer.
pub fn four_letter_word(port: u16, word: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(word.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

// ---------------------------------------------------------------------------------------------------------------
// lymph venv

/// Debian packages for building the venv: `venv`, headers and a C compiler for the sdists without cp311 wheels
/// (`netifaces`, `msgpack-python` 0.5.6).
const VENV_APT_PACKAGES: &[&str] = &["python3-venv", "python3-dev", "gcc", "libc6-dev"];
/// Debian's interpreter; never pyenv's (which may come first on PATH).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// Installed first: `pkg_resources` is needed by lymph's CLI, and Debian's bundled setuptools 66 does not find
/// `zope.interface` (installed as `zope_interface-*.dist-info`), so `pkg_resources.require` fails.
const PIP_BOOTSTRAP: &[&str] = &["setuptools==80.10.2"];
/// lymph itself, without its `install_requires` (they pin `gevent==1.1b5`, which does not build on 3.11).
const PIP_LYMPH: &str = "lymph==0.15.0";
/// lymph's dependencies, pinned to versions verified with lymph 0.15 plus pytest.
/// `msgpack-python` must stay < 1.0: lymph passes `encoding='utf-8'` to `msgpack.loads`.
const PIP_DEPS: &[&str] = &[
    "gevent==26.9.0",
    "greenlet==3.5.6",
    "zope.event==6.2",
    "zope.interface==8.7",
    "pyzmq==27.3.0",
    "kazoo==2.11.0",
    "msgpack-python==0.5.6",
    "PyYAML==6.0.4",
    "six==1.17.0",
    "semantic-version==2.10.0",
    "iso8601==2.1.0",
    "docopt==0.6.2",
    "psutil==7.2.2",
    "setproctitle==1.3.8",
    "blessings==1.7",
    "netifaces==0.11.0",
    "Werkzeug==3.1.9",
    "MarkupSafe==3.0.4",
    "kombu==5.7.0",
    "amqp==5.4.2",
    "vine==5.1.0",
    "redis==8.1.0",
    "async-timeout==5.0.1",
    "mock==5.2.0",
    "PyHamcrest==2.1.0",
    "pytz==2026.6",
    "pytest==9.2.0",
];
const STAMP_FILE: &str = ".lymph-chaos-venv-stamp";

/// The patch script, relative to the workspace root.
fn patch_script() -> PathBuf {
    util::root().join("tests").join("lymph").join("patch_lymph.py")
}

/// Creates (or reuses) the lymph 0.15 venv at `dir` and returns its path (the value for [`LYMPH_VENV_ENV`]).
///
/// The venv is rebuilt from scratch when its stamp file differs from what this xtask would build: the pip
/// requirements, the FNV-1a hash of `tests/lymph/patch_lymph.py` and `/usr/bin/python3 --version`. A warm call costs
/// one `python3 --version`. Not safe against two concurrent builds of the same `dir`.
///
/// # Errors
/// apt, `python3 -m venv`, pip or the patch script fails; or `dir` exists and is not a venv (it is never removed
/// then).
pub fn ensure_lymph_venv(dir: &Path) -> Result<PathBuf> {
    let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let script = patch_script();
    let patch_source = fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
    if !Path::new(SYSTEM_PYTHON).exists() {
        apt_install(VENV_APT_PACKAGES, "the lymph venv")?;
    }
    let python_version = util::output(Command::new(SYSTEM_PYTHON).arg("--version"))
        .with_context(|| format!("{SYSTEM_PYTHON} --version failed"))?;
    let stamp = venv_stamp(python_version.trim(), &patch_source);
    let stamp_path = dir.join(STAMP_FILE);
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) && dir.join("bin").join("lymph").is_file() {
        return Ok(dir);
    }

    step(format!("building the lymph 0.15 venv in {}", dir.display()));
    let started = Instant::now();
    apt_install(VENV_APT_PACKAGES, "the lymph venv")?;
    if dir.exists() {
        if !dir.join("pyvenv.cfg").is_file() && fs::read_dir(&dir)?.next().is_some() {
            bail!("{} exists and is not a venv; not removing it", dir.display());
        }
        fs::remove_dir_all(&dir).with_context(|| format!("removing the stale venv {}", dir.display()))?;
    }
    run(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&dir).env_remove("PYTHONHOME"))?;
    let pip = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new(dir.join("bin").join("pip"));
        cmd.args(["install", "--disable-pip-version-check", "--no-input", "--quiet"])
            .args(args)
            .env_remove("PYTHONHOME")
            .env_remove("PYTHONPATH")
            .env_remove("PIP_REQUIRE_VIRTUALENV")
            .env("PIP_DEFAULT_TIMEOUT", std::env::var("PIP_DEFAULT_TIMEOUT").unwrap_or_else(|_| "120".into()));
        run(&mut cmd)
    };
    pip(&[&["--upgrade"], PIP_BOOTSTRAP].concat())?;
    pip(&["--no-deps", PIP_LYMPH])?;
    // pip then says "lymph 0.15.0 requires gevent==1.1b5, but you have gevent 26.9.0": expected, patch_lymph.py
    // relaxes that requirement.
    pip(PIP_DEPS)?;
    run(Command::new(dir.join("bin").join("python")).arg(&script).env_remove("PYTHONPATH"))?;
    write(&stamp_path, &stamp)?;
    eprintln!("    lymph venv ready after {:.1?}", started.elapsed());
    Ok(dir)
}

fn venv_stamp(python_version: &str, patch_source: &[u8]) -> String {
    let mut stamp = format!("python: {python_version}\npatch_lymph.py: {:016x}\n", fnv1a64(patch_source));
    for req in PIP_BOOTSTRAP.iter().chain([&PIP_LYMPH]).chain(PIP_DEPS) {
        stamp.push_str(req);
        stamp.push('\n');
    }
    stamp
}

/// FNV-1a, 64 bit: a hash that is stable across Rust releases (unlike `DefaultHasher`), for stamps.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

// ---------------------------------------------------------------------------------------------------------------
// process and file helpers

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", dir.display())),
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_reference_values() {
        // Reference values of FNV-1a 64 (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn stamp_changes_with_the_patch_script() {
        assert_ne!(venv_stamp("Python 3.11.2", b"one"), venv_stamp("Python 3.11.2", b"two"));
        assert_ne!(venv_stamp("Python 3.11.2", b"one"), venv_stamp("Python 3.13.5", b"one"));
    }

    #[test]
    fn zoo_cfg_is_loopback_only_and_whitelists_envi() {
        let cfg = zoo_cfg(Path::new("/x/data"), 4242);
        assert!(cfg.contains("clientPort=4242\n"));
        assert!(cfg.contains("clientPortAddress=127.0.0.1\n"));
        assert!(cfg.contains("admin.enableServer=false\n"));
        assert!(cfg.contains("4lw.commands.whitelist=ruok,stat,envi,srvr,conf\n"));
    }
}
