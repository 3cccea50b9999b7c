//! Real lymph 0.15 peers for integration tests: configs, `Echo` instances, a restart loop and the `lymph` CLI.
//!
//! Layout:
//! - [`venv`] / [`lymph_bin`] — the patched lymph venv the harness built (`CHAOS_LYMPH_VENV`)
//! - [`LymphConfig`] — a `.lymph.yml` (from `tests/lymph/lymph.yml.in`) for one ZooKeeper address + chroot, in a
//!   temp dir that also holds the logs of every process started with it; removed on drop
//! - [`Instance`] — one `lymph instance --interface echo:Echo` (from `tests/lymph/echo.py`), started and waited for
//!   until ZooKeeper lists it; stopped (SIGTERM, then SIGKILL) on drop
//! - [`Supervised`] — a restart loop keeping one `Echo` alive (a node-like supervisor, as `lymph node` would)
//! - [`lymph_cli`] / [`discover`] — `lymph request|discover|inspect …` with a config and a timeout
//!
//! Processes: every process is a child of the thread that starts it, gets `PR_SET_PDEATHSIG` = SIGKILL (it dies
//! when that thread or the whole test binary dies) and is only ever signalled by this module through its own,
//! not yet reaped `Child`, so a recycled pid is never hit. Keep an [`Instance`] on the thread that started it.
//!
//! Identity: `lymph instance` sets its process title to `lymph-instance (identity: <id>, endpoint: <ep>, config:
//! <file>)` right after registering; that is how an [`Instance`] learns its endpoint and identity (the same fields
//! as its znode), before confirming with `lymph discover --json` that ZooKeeper lists it.

use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use chaos_test_support::{
    eventually,
    process::{DieWithParent, log_tail as tail, stop_child, wait_timeout},
};

use crate::zk;

/// Environment variable with the path of the lymph venv (built by `cargo xtask test`).
pub const VENV_ENV: &str = "CHAOS_LYMPH_VENV";
/// `--interface` of the test service (`tests/lymph/echo.py`).
pub const ECHO_INTERFACE: &str = "echo:Echo";
/// The service name `Echo` registers under (the class name).
pub const ECHO_SERVICE: &str = "Echo";
/// kazoo's default session timeout; ZooKeeper clamps a requested timeout to [4 s, 40 s] (2–20 × tickTime 2000).
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Instance::start`] waits for ZooKeeper to list a new instance.
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of [`lymph_cli`] (lymph itself gives up on an unreachable ZooKeeper after 10 s).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`Supervised`] checks whether its instance died.
pub const RESTART_POLL: Duration = Duration::from_millis(50);
/// How long [`Supervised`] waits before retrying a restart whose spawn failed.
const RESTART_BACKOFF: Duration = Duration::from_millis(500);
/// Between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Between two `lymph discover` runs while waiting for ZooKeeper.
const DISCOVER_POLL: Duration = Duration::from_millis(100);
/// Between two reads of a starting instance's process title.
const TITLE_POLL: Duration = Duration::from_millis(20);
const LOG_TAIL_LINES: usize = 30;
const CONFIG_TEMPLATE: &str = include_str!("../lymph/lymph.yml.in");
/// lymph reads these (node supervisor, shared sockets, config): never inherit them from the test environment.
const INHERITED_LYMPH_VARS: &[&str] = &[
    "LYMPH_CONFIG",
    "LYMPH_NODE",
    "LYMPH_NODE_CONFIG",
    "LYMPH_NODE_IP",
    "LYMPH_MONITOR",
    "LYMPH_SHARED_SOCKET_FDS",
    "LYMPH_SERVICE_NAME",
];
/// lymph's `container.ip` unless a host address is given: bind and register on loopback.
const LOOPBACK_IP: &str = "127.0.0.1";
/// setuptools < 81 warns on every `import pkg_resources` (lymph's CLI does it).
const PYTHON_WARNINGS: &str = "ignore:pkg_resources is deprecated";

/// The lymph venv the harness built.
///
/// # Panics
/// When [`VENV_ENV`] is unset or empty.
pub fn venv() -> PathBuf {
    match std::env::var_os(VENV_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => panic!(
            "{VENV_ENV} is not set: this test needs the lymph 0.15 venv that `cargo xtask test` builds \
             (and the ZooKeeper in {})",
            zk::ZK_ENV
        ),
    }
}

/// `<venv>/bin/lymph`.
pub fn lymph_bin() -> PathBuf {
    venv().join("bin").join("lymph")
}

/// `tests/lymph`: `echo.py`, the config template, the patch script (on `PYTHONPATH` of every lymph process).
pub fn services_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lymph")
}

// ---------------------------------------------------------------------------------------------------------------
// config

/// A `.lymph.yml` for one ZooKeeper address and chroot, in a temp dir removed on drop.
///
/// The dir also holds the logs of the processes started with this config (`Echo-<n>.log`), so keep the config alive
/// for as long as they run ([`Instance`] and [`Supervised`] borrow it).
pub struct LymphConfig {
    dir: tempfile::TempDir,
    path: PathBuf,
    zk_addr: String,
    chroot: String,
    session_timeout: Duration,
    /// The network namespace every process started with this config runs in (`None`: the caller's).
    netns: Option<String>,
}

impl LymphConfig {
    /// A config for the harness's ZooKeeper ([`zk::zk_addr`]) under a fresh chroot ([`zk::unique_chroot`]).
    ///
    /// # Panics
    /// When `CHAOS_TEST_ZK` is unset.
    ///
    /// # Errors
    /// The temp dir or the file cannot be written.
    pub fn for_test(test_name: &str) -> Result<Self> {
        Self::new(&zk::zk_addr(), &zk::unique_chroot(test_name))
    }

    /// A config for ZooKeeper `zk_addr` (`127.0.0.1:<port>`) under `chroot`, with kazoo's default session timeout.
    ///
    /// # Errors
    /// The temp dir or the file cannot be written.
    pub fn new(zk_addr: &str, chroot: &str) -> Result<Self> {
        Self::with_session_timeout(zk_addr, chroot, DEFAULT_SESSION_TIMEOUT)
    }

    /// Like [`LymphConfig::new`] with another ZooKeeper session timeout: how long the znodes of a SIGKILLed
    /// instance outlive it (ZooKeeper clamps it to [4 s, 40 s]).
    ///
    /// # Errors
    /// The temp dir or the file cannot be written.
    pub fn with_session_timeout(zk_addr: &str, chroot: &str, session_timeout: Duration) -> Result<Self> {
        Self::render(zk_addr, chroot, session_timeout, LOOPBACK_IP, None)
    }

    /// A config for one host of a multi-host test: every process started with it (instances, the CLI, scripts)
    /// runs in the network namespace `netns` and binds and registers `ip`, the host's address (lymph's
    /// `container.ip`), so peers on other hosts reach it.
    ///
    /// # Errors
    /// The temp dir or the file cannot be written.
    pub fn on_host(zk_addr: &str, chroot: &str, ip: &str, netns: &str) -> Result<Self> {
        Self::render(zk_addr, chroot, DEFAULT_SESSION_TIMEOUT, ip, Some(netns))
    }

    fn render(zk_addr: &str, chroot: &str, session_timeout: Duration, ip: &str, netns: Option<&str>) -> Result<Self> {
        let label: String = chroot.trim_start_matches('/').chars().take(60).collect();
        let dir =
            tempfile::Builder::new().prefix(&format!("lymph-{label}-")).tempdir().context("creating a temp dir")?;
        let path = dir.path().join(".lymph.yml");
        let yaml = render_config(&zk::hosts_with_chroot(zk_addr, chroot), session_timeout, ip);
        fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        Ok(LymphConfig {
            dir,
            path,
            zk_addr: zk_addr.to_owned(),
            chroot: format!("/{}", chroot.trim_start_matches('/')),
            session_timeout,
            netns: netns.map(str::to_owned),
        })
    }

    /// The `.lymph.yml`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temp dir with the config and the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// ZooKeeper's address without chroot.
    pub fn zk_addr(&self) -> &str {
        &self.zk_addr
    }

    /// The chroot, with its leading `/`.
    pub fn chroot(&self) -> &str {
        &self.chroot
    }

    /// The kazoo hosts string, `127.0.0.1:<port>/<chroot>`.
    pub fn zk_hosts(&self) -> String {
        zk::hosts_with_chroot(&self.zk_addr, &self.chroot)
    }

    /// The session timeout written into the config.
    pub fn session_timeout(&self) -> Duration {
        self.session_timeout
    }

    /// The network namespace its processes run in (`None`: the caller's).
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// `lymph` with this config and a clean environment.
    fn lymph_command(&self) -> Command {
        lymph_command(&lymph_bin(), self.dir(), &self.path, self.netns())
    }

    /// `program` (e.g. the venv's `python`) with the environment of a lymph process started with this config
    /// (`LYMPH_CONFIG`, `PYTHONPATH` = [`services_dir`], no inherited `LYMPH_*`), in its namespace.
    pub fn command(&self, program: &Path) -> Command {
        lymph_command(program, self.dir(), &self.path, self.netns())
    }
}

/// `lymph` run in `config_dir` with `LYMPH_CONFIG=config_path`, `PYTHONPATH` = [`services_dir`], no inherited
/// `LYMPH_*`/`PYTHONHOME`, unbuffered output, no bytecode files and without the `pkg_resources` deprecation warning;
/// inside the network namespace `netns` when given.
fn lymph_command(lymph: &Path, config_dir: &Path, config_path: &Path, netns: Option<&str>) -> Command {
    let mut cmd = Command::new(lymph);
    if let Some(name) = netns {
        crate::netns::enter_on_exec(&mut cmd, name);
    }
    for var in INHERITED_LYMPH_VARS {
        cmd.env_remove(var);
    }
    cmd.current_dir(config_dir)
        .env("LYMPH_CONFIG", config_path)
        .env("PYTHONPATH", services_dir())
        .env_remove("PYTHONHOME")
        .env("PYTHONWARNINGS", PYTHON_WARNINGS)
        .env("PYTHONUNBUFFERED", "1")
        // No __pycache__ in tests/lymph (the source tree).
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null());
    cmd
}

fn render_config(zk_hosts: &str, session_timeout: Duration, ip: &str) -> String {
    CONFIG_TEMPLATE
        .replace("@IP@", ip)
        .replace("@ZK_HOSTS@", zk_hosts)
        .replace("@ZK_SESSION_TIMEOUT@", &format!("{:.1}", session_timeout.as_secs_f64()))
}

// ---------------------------------------------------------------------------------------------------------------
// the lymph CLI

/// Runs `lymph <args>` with `config`, with a [`CLI_TIMEOUT`] timeout.
///
/// Examples of `args`: `["request", "Echo.upper", r#"{"text":"hi"}"#]`, `["discover", "--json"]`,
/// `["inspect", "Echo"]`. A non-zero exit is not an error here: check `status` (a NACK, a declared error or a
/// lookup failure all exit 1 with the exception on stderr).
///
/// # Errors
/// lymph cannot start, or does not finish in time (it is killed then).
pub fn lymph_cli(config: &LymphConfig, args: &[&str]) -> Result<Output> {
    lymph_cli_with_timeout(config, args, CLI_TIMEOUT)
}

/// [`lymph_cli`] with another timeout.
///
/// # Errors
/// lymph cannot start, or does not finish within `timeout`.
pub fn lymph_cli_with_timeout(config: &LymphConfig, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut cmd = config.lymph_command();
    cmd.args(args);
    output_with_timeout(cmd, timeout).with_context(|| format!("lymph {}", args.join(" ")))
}

/// [`lymph_cli`] with the `lymph` of another venv than the harness's.
///
/// # Errors
/// As [`lymph_cli`].
pub fn lymph_cli_in(venv: &Path, config: &LymphConfig, args: &[&str]) -> Result<Output> {
    let mut cmd = lymph_command(&venv.join("bin").join("lymph"), config.dir(), &config.path, config.netns());
    cmd.args(args);
    output_with_timeout(cmd, CLI_TIMEOUT).with_context(|| format!("{}/bin/lymph {}", venv.display(), args.join(" ")))
}

/// Runs a Python script from `tests/lymph/` with the venv's interpreter and the same environment as the lymph CLI
/// (`LYMPH_CONFIG`, `PYTHONPATH`); the config path is passed as the first argument.
///
/// # Errors
/// Python cannot start, or does not finish within `timeout`.
pub fn python_script(config: &LymphConfig, script: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut cmd = config.command(&venv().join("bin").join("python"));
    cmd.arg(services_dir().join(script)).arg(&config.path).args(args);
    output_with_timeout(cmd, timeout).with_context(|| format!("python {script} {}", args.join(" ")))
}

/// What `lymph discover --json` prints: every service with at least one instance → its instances' znode data
/// (`id`, `identity`, `endpoint`, `version`, `log_endpoint`, …, the registration lymph 0.15 writes).
///
/// # Errors
/// lymph fails, times out, or prints something that is not such a JSON object.
pub fn discover(config: &LymphConfig) -> Result<BTreeMap<String, Vec<Value>>> {
    discover_with_timeout(config, CLI_TIMEOUT)
}

fn discover_with_timeout(config: &LymphConfig, timeout: Duration) -> Result<BTreeMap<String, Vec<Value>>> {
    let out = lymph_cli_with_timeout(config, &["discover", "--json"], timeout)?;
    if !out.status.success() {
        bail!("lymph discover --json failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("lymph discover --json printed {:?}", String::from_utf8_lossy(&out.stdout)))
}

/// Whether ZooKeeper lists an instance of `service` whose container identity is `identity`.
///
/// # Errors
/// As [`discover`].
pub fn is_registered(config: &LymphConfig, service: &str, identity: &str) -> Result<bool> {
    Ok(lists(&discover(config)?, service, identity))
}

fn lists(services: &BTreeMap<String, Vec<Value>>, service: &str, identity: &str) -> bool {
    services.get(service).is_some_and(|instances| instances.iter().any(|i| i["identity"] == identity))
}

/// Polls `lymph discover` until no instance of `service` has `identity`; returns how long that took.
///
/// # Errors
/// Still listed after `timeout`, or lymph fails.
pub fn wait_unregistered(config: &LymphConfig, service: &str, identity: &str, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    eventually(
        format_args!("{service} instance {identity} gone from ZooKeeper ({})", config.zk_hosts()),
        timeout,
        DISCOVER_POLL,
        || discover(config).map(|services| !lists(&services, service, identity)),
    )?;
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------------------------
// instances

/// What to start: an interface (`module:Class`, module on `PYTHONPATH` = `tests/lymph`) and optionally a port.
#[derive(Clone, Debug)]
pub struct InstanceOptions {
    /// `--interface`; the service name is the class name.
    pub interface: String,
    /// `--port` of the RPC socket; `None` = lymph picks a random one in [35536, 65536).
    pub port: Option<u16>,
    /// The venv whose `bin/lymph` runs it; `None` = the harness's ([`venv`]).
    pub venv: Option<PathBuf>,
}

impl Default for InstanceOptions {
    fn default() -> Self {
        InstanceOptions { interface: ECHO_INTERFACE.to_owned(), port: None, venv: None }
    }
}

impl InstanceOptions {
    /// Echo on a fixed port.
    pub fn echo_on_port(port: u16) -> Self {
        InstanceOptions { port: Some(port), ..Self::default() }
    }

    /// The service name the interface registers under (its class name).
    pub fn service(&self) -> &str {
        self.interface.rsplit_once(':').map_or(&self.interface, |(_, class)| class)
    }
}

/// An instance as ZooKeeper lists it (the fields come from its process title, the same as in its znode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub pid: u32,
    /// Container identity: md5 of the endpoint's Python repr, shared by all interfaces of the process.
    pub identity: String,
    /// `tcp://127.0.0.1:<port>`.
    pub endpoint: String,
}

/// A real `lymph instance` (by default `Echo`), registered in ZooKeeper; stopped on drop (SIGTERM, then SIGKILL
/// after 5 s), which also removes its znodes (lymph closes its ZooKeeper session on SIGTERM).
///
/// Its stdout + stderr (log level INFO) go to `<config dir>/<service>-<n>.log`; when a test panics, dropping the
/// instance prints the tail of that log.
pub struct Instance<'c> {
    process: Process,
    registration: Registration,
    service: String,
    config: &'c LymphConfig,
}

impl<'c> Instance<'c> {
    /// Starts `Echo` on a random port and waits (up to [`REGISTRATION_TIMEOUT`]) until ZooKeeper lists it.
    ///
    /// # Errors
    /// lymph cannot start, exits, or is not listed in time (the error carries the tail of its log).
    pub fn start(config: &'c LymphConfig) -> Result<Self> {
        Self::start_with(config, &InstanceOptions::default())
    }

    /// Starts an instance as `options` say and waits until ZooKeeper lists it.
    ///
    /// # Errors
    /// As [`Instance::start`].
    pub fn start_with(config: &'c LymphConfig, options: &InstanceOptions) -> Result<Self> {
        let mut process = Launcher::new(config, options).spawn()?;
        let service = options.service().to_owned();
        let registration =
            wait_registered(config, &service, REGISTRATION_TIMEOUT, || match process.child.try_wait()? {
                Some(status) => bail!("exited with {status}"),
                None => Ok(process_title(process.pid())),
            })
            .map_err(|err| err.context(process.describe()))?;
        Ok(Instance { process, registration, service, config })
    }

    /// The pid of the lymph process.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Its RPC endpoint, `tcp://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.registration.endpoint
    }

    /// Its container identity (the `identity` of its znodes).
    pub fn identity(&self) -> &str {
        &self.registration.identity
    }

    /// pid, identity and endpoint.
    pub fn registration(&self) -> &Registration {
        &self.registration
    }

    /// The service name (`Echo`).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Its log (stdout + stderr).
    pub fn log_path(&self) -> &Path {
        &self.process.log
    }

    /// Whether ZooKeeper lists it right now.
    ///
    /// # Errors
    /// As [`discover`].
    pub fn is_registered(&self) -> Result<bool> {
        is_registered(self.config, &self.service, self.identity())
    }

    /// Stops it the polite way (SIGTERM, SIGKILL after 5 s): lymph unregisters and closes its session, so its
    /// znodes go at once. Returns its exit status.
    ///
    /// # Errors
    /// Signalling or reaping fails.
    pub fn terminate(mut self) -> Result<ExitStatus> {
        self.process.stop()
    }

    /// SIGKILL, as a crash: its znodes stay until ZooKeeper expires its session
    /// ([`LymphConfig::session_timeout`]). Returns its exit status.
    ///
    /// # Errors
    /// Signalling or reaping fails.
    pub fn kill(mut self) -> Result<ExitStatus> {
        self.process.kill()
    }
}

impl Drop for Instance<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.process.describe());
        }
    }
}

/// Waits until `current()` names a process whose title shows it registered and ZooKeeper lists it.
///
/// `current()` returns `Ok(None)` while the title is not set yet, `Err` when the process is gone for good.
fn wait_registered(
    config: &LymphConfig,
    service: &str,
    timeout: Duration,
    mut current: impl FnMut() -> Result<Option<Registration>>,
) -> Result<Registration> {
    let deadline = Instant::now() + timeout;
    // The title is read every TITLE_POLL; ZooKeeper is asked at most every DISCOVER_POLL.
    let mut next_discover = Instant::now();
    eventually(
        format_args!("registered as {service} in ZooKeeper ({})", config.zk_hosts()),
        timeout,
        TITLE_POLL,
        || -> Result<Option<Registration>> {
            let Some(registration) = current()? else { return Ok(None) };
            if Instant::now() < next_discover {
                return Ok(None);
            }
            let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            let listed = lists(&discover_with_timeout(config, remaining)?, service, &registration.identity);
            next_discover = Instant::now() + DISCOVER_POLL;
            Ok(listed.then_some(registration))
        },
    )
}

/// The registration a lymph process announces in its title, once it has registered.
fn process_title(pid: u32) -> Option<Registration> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let title = String::from_utf8_lossy(&cmdline);
    let (identity, endpoint) = parse_title(title.split('\0').next()?)?;
    Some(Registration { pid, identity, endpoint })
}

/// `lymph-instance (identity: <id>, endpoint: <ep>, config: <file>)` → (id, ep).
fn parse_title(title: &str) -> Option<(String, String)> {
    let rest = title.strip_prefix("lymph-")?.split_once(" (identity: ")?.1;
    let (identity, rest) = rest.split_once(", endpoint: ")?;
    let endpoint = rest.split_once(", config: ").map_or_else(|| rest.trim_end_matches(')'), |(ep, _)| ep);
    (!identity.is_empty() && endpoint.starts_with("tcp://")).then(|| (identity.to_owned(), endpoint.to_owned()))
}

// ---------------------------------------------------------------------------------------------------------------
// supervised

/// A restart loop: a thread that keeps one instance (by default `Echo`) running, starting a new one within
/// [`RESTART_POLL`] (+ spawn time) of the old one's death, until dropped; dropping stops the current instance.
///
/// Like `lymph node`'s `watch_processes` (which restarts within ~1 s), but without the node interface.
pub struct Supervised<'c> {
    shared: Arc<Supervision>,
    thread: Option<JoinHandle<()>>,
    service: String,
    config: &'c LymphConfig,
}

struct Supervision {
    state: Mutex<SupervisorState>,
    changed: Condvar,
}

struct SupervisorState {
    stop: bool,
    /// pid of the current process; 0 before the first spawn.
    pid: u32,
    log: PathBuf,
    restarts: u32,
    last_error: Option<String>,
}

impl<'c> Supervised<'c> {
    /// Starts the loop with `Echo` on a random port and waits until the first instance is registered.
    ///
    /// # Errors
    /// The first instance cannot start or is not registered within [`REGISTRATION_TIMEOUT`].
    pub fn start(config: &'c LymphConfig) -> Result<Self> {
        Self::start_with(config, &InstanceOptions::default())
    }

    /// Starts the loop for `options` and waits until the first instance is registered.
    ///
    /// # Errors
    /// As [`Supervised::start`].
    pub fn start_with(config: &'c LymphConfig, options: &InstanceOptions) -> Result<Self> {
        let shared = Arc::new(Supervision {
            state: Mutex::new(SupervisorState {
                stop: false,
                pid: 0,
                log: PathBuf::new(),
                restarts: 0,
                last_error: None,
            }),
            changed: Condvar::new(),
        });
        let launcher = Launcher::new(config, options);
        let thread = thread::Builder::new()
            .name(format!("supervise-{}", options.service()))
            .spawn({
                let shared = Arc::clone(&shared);
                move || supervise(&shared, &launcher)
            })
            .context("spawning the supervisor thread")?;
        let supervised = Supervised { shared, thread: Some(thread), service: options.service().to_owned(), config };
        supervised.wait_registered(REGISTRATION_TIMEOUT)?;
        Ok(supervised)
    }

    /// The pid of the current instance.
    pub fn pid(&self) -> u32 {
        self.state().pid
    }

    /// How many times it was restarted.
    pub fn restarts(&self) -> u32 {
        self.state().restarts
    }

    /// The log of the current instance.
    pub fn log_path(&self) -> PathBuf {
        self.state().log.clone()
    }

    /// Waits until the current pid is not `old_pid` any more (the loop restarted it); returns the new pid.
    ///
    /// # Errors
    /// No restart within `timeout`.
    pub fn wait_for_restart(&self, old_pid: u32, timeout: Duration) -> Result<u32> {
        let (state, result) = self
            .shared
            .changed
            .wait_timeout_while(self.state(), timeout, |s| s.pid == old_pid || s.pid == 0)
            .map_err(|_| anyhow!("supervisor state poisoned"))?;
        if result.timed_out() {
            let why = state.last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default();
            bail!("{} pid {old_pid} was not restarted within {timeout:?}{why}", self.service);
        }
        Ok(state.pid)
    }

    /// Waits until the process `pid` announces in its title that it has registered (lymph sets the title right
    /// after writing its registration to ZooKeeper); returns that registration. Cheaper and closer to the moment
    /// of registering than [`Supervised::wait_registered`], which also asks lymph's own discovery.
    ///
    /// # Errors
    /// No announcement within `timeout`.
    pub fn wait_announced(&self, pid: u32, timeout: Duration) -> Result<Registration> {
        eventually(format_args!("{} pid {pid} announcing its registration", self.service), timeout, TITLE_POLL, || {
            process_title(pid)
        })
    }

    /// Waits until the current instance is registered in ZooKeeper; returns its registration.
    ///
    /// # Errors
    /// Not registered within `timeout`, or the supervisor thread is gone.
    pub fn wait_registered(&self, timeout: Duration) -> Result<Registration> {
        wait_registered(self.config, &self.service, timeout, || {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                bail!("the supervisor thread ended");
            }
            let pid = self.pid();
            Ok(if pid == 0 { None } else { process_title(pid) })
        })
        .map_err(|err| {
            let state = self.state();
            let why = state.last_error.as_deref().map(|e| format!("; last error: {e}")).unwrap_or_default();
            err.context(format!("supervised {} (log {}){why}", self.service, state.log.display()))
        })
    }

    fn state(&self) -> MutexGuard<'_, SupervisorState> {
        self.shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Supervised<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = self.log_path();
            eprintln!("supervised {}: tail of {}:\n{}", self.service, log.display(), tail(&log, LOG_TAIL_LINES));
        }
        self.state().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("supervised {}: the supervisor thread panicked", self.service);
        }
    }
}

/// The supervisor thread: owns the current process (so `PR_SET_PDEATHSIG` ties it to this thread).
fn supervise(shared: &Supervision, launcher: &Launcher) {
    let lock = || shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut current: Option<Process> = None;
    let mut next_attempt = Instant::now();
    loop {
        {
            let state = lock();
            if state.stop {
                break;
            }
            let (state, _) = shared
                .changed
                .wait_timeout_while(state, RESTART_POLL, |s| !s.stop)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if state.stop {
                break;
            }
        }
        let dead = match current.as_mut().map(|p| p.child.try_wait()) {
            None => true,
            Some(Ok(status)) => status.is_some(),
            Some(Err(err)) => {
                lock().last_error = Some(format!("waiting for pid: {err}"));
                false
            }
        };
        if !dead || Instant::now() < next_attempt {
            continue;
        }
        match launcher.spawn() {
            Ok(process) => {
                let mut state = lock();
                if state.pid != 0 {
                    state.restarts += 1;
                }
                state.pid = process.pid();
                state.log = process.log.clone();
                current = Some(process);
                drop(state);
                shared.changed.notify_all();
            }
            Err(err) => {
                lock().last_error = Some(format!("{err:#}"));
                next_attempt = Instant::now() + RESTART_BACKOFF;
            }
        }
    }
    // Dropping stops it (SIGTERM, then SIGKILL).
    drop(current);
}

// ---------------------------------------------------------------------------------------------------------------
// processes

/// Everything needed to start one more `lymph instance` (cloneable into the supervisor thread).
#[derive(Clone)]
struct Launcher {
    lymph: PathBuf,
    config_dir: PathBuf,
    config_path: PathBuf,
    netns: Option<String>,
    options: InstanceOptions,
}

impl Launcher {
    fn new(config: &LymphConfig, options: &InstanceOptions) -> Self {
        Launcher {
            lymph: options.venv.as_ref().map_or_else(lymph_bin, |venv| venv.join("bin").join("lymph")),
            config_dir: config.dir().to_owned(),
            config_path: config.path().to_owned(),
            netns: config.netns.clone(),
            options: options.clone(),
        }
    }

    fn spawn(&self) -> Result<Process> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let log =
            self.config_dir.join(format!("{}-{}.log", self.options.service(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = lymph_command(&self.lymph, &self.config_dir, &self.config_path, self.netns.as_deref());
        cmd.arg("instance")
            .arg(format!("--interface={}", self.options.interface))
            .arg(format!("--config={}", self.config_path.display()))
            .arg("--loglevel=INFO");
        if let Some(port) = self.options.port {
            cmd.arg(format!("--port={port}"));
        }
        cmd.stdout(file.try_clone().context("duplicating the log fd")?).stderr(file);
        cmd.die_with_parent();
        let child = cmd.spawn().with_context(|| format!("starting {}", self.lymph.display()))?;
        Ok(Process { child, log })
    }
}

/// A child process with a log file; stopped (SIGTERM, then SIGKILL) on drop.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) -> Result<ExitStatus> {
        stop_child(&mut self.child, STOP_GRACE).map_err(Into::into)
    }

    fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.child.kill().with_context(|| format!("SIGKILL to pid {}", self.pid()))?;
        Ok(self.child.wait()?)
    }

    /// pid, state and the tail of the log, for errors and panics.
    fn describe(&mut self) -> String {
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited: {status}"),
            Ok(None) => "running".to_owned(),
            Err(err) => format!("unknown: {err}"),
        };
        format!(
            "lymph pid {} ({state}); tail of {}:\n{}",
            self.pid(),
            self.log.display(),
            tail(&self.log, LOG_TAIL_LINES)
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("stopping lymph pid {}: {err:#}", self.pid());
        }
    }
}

/// Runs `cmd` with stdout/stderr captured (read while it runs, so a large output never blocks it); kills it after
/// `timeout`.
///
/// # Errors
/// It cannot start, or does not finish within `timeout` (its output so far is in the error).
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).die_with_parent();
    let mut child = cmd.spawn().with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
    let readers = [child.stdout.take().map(drain), child.stderr.take().map(drain)];
    let Some(status) = wait_timeout(&mut child, timeout)? else {
        child.kill()?;
        child.wait()?;
        let [stdout, stderr] = readers.map(|r| r.map(|h| h.join().unwrap_or_default()).unwrap_or_default());
        bail!(
            "timed out after {timeout:?}; stdout: {}; stderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    let [stdout, stderr] = readers.map(|r| r.map(|h| h.join().unwrap_or_default()).unwrap_or_default());
    Ok(Output { status, stdout, stderr })
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error ends the capture; what was read so far is kept.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_instance_process_title() {
        let title = "lymph-instance (identity: 8e9cd0312a970c9ebef669296aede987, endpoint: tcp://127.0.0.1:51387, \
                     config: y.yml)";
        assert_eq!(
            parse_title(title),
            Some(("8e9cd0312a970c9ebef669296aede987".to_owned(), "tcp://127.0.0.1:51387".to_owned()))
        );
        assert_eq!(parse_title("/venv/bin/python3 /venv/bin/lymph instance --interface=echo:Echo"), None);
    }

    #[test]
    fn config_template_is_fully_rendered() {
        let yaml = render_config("127.0.0.1:2181/t-x-1-0", Duration::from_secs(4), "10.1.2.3");
        assert!(yaml.contains("ip: 10.1.2.3"), "{yaml}");
        assert!(yaml.contains("hosts: \"127.0.0.1:2181/t-x-1-0\""), "{yaml}");
        assert!(yaml.contains("timeout: 4.0"), "{yaml}");
        assert!(yaml.contains("lymph.events.null:NullEventSystem"), "{yaml}");
        assert!(!yaml.lines().filter(|l| !l.trim_start().starts_with('#')).any(|l| l.contains('@')), "{yaml}");
    }

    #[test]
    fn service_name_is_the_class_name() {
        assert_eq!(InstanceOptions::default().service(), "Echo");
        assert_eq!(
            InstanceOptions { interface: "pkg.mod:Other".into(), ..InstanceOptions::default() }.service(),
            "Other"
        );
    }
}
