//! The Python `Scenario` client (`chaos-agent/python`) against a real agent, a real lymph 0.15 `Echo` under a
//! restart loop and the harness's ZooKeeper: pip-installs the package, then runs its pytest suite
//! (`chaos-agent/python/tests`) with the setup described in environment variables (see `tests/conftest.py` there).
//!
//! Three installs, one test each:
//! - [`zk_python_scenario_next_to_lymph`]: into the lymph venv (`CHAOS_LYMPH_VENV`), next to lymph 0.15 and its
//!   msgpack-python 0.5.6, with `--no-deps` (the venv is shared with the other zk tests, so nothing but the package
//!   may change there; [`zk_python_plain_install_keeps_lymph_working`] checks the plain install); the tests import
//!   `lymph.chaos.Scenario`, run gevent-patched as lymph programs are, and check lymph itself still works.
//! - [`zk_python_scenario_without_lymph`]: a plain `pip install '<package>[test]'` into a venv without lymph
//!   (`target/python-client-venv`, current pyzmq/kazoo/PyYAML from PyPI, rebuilt when `pyproject.toml` changes);
//!   the tests import `lymph_chaos.Scenario`, with threads.
//! - [`zk_python_plain_install_keeps_lymph_working`]: a plain `pip install` (with dependencies, as the README says)
//!   into a private copy of the lymph venv; lymph 0.15 there must still answer `lymph request`, and the client must
//!   work next to it.
//!
//! Each test runs its agent, Echo and pytest in a fresh network namespace (the agent owns the tc filters of its
//! namespace), reaching ZooKeeper through a TCP forwarder; Echo is on a fixed port, as under `lymph node`, so a
//! restarted instance re-registers at once. pip builds from a copy of `chaos-agent/python`, so nothing is written into
//! the source tree (pytest runs with `-p no:cacheprovider` and `PYTHONDONTWRITEBYTECODE=1` for the same reason).
//!
//! By hand: `cargo xtask test --tier zk -- zk_python`.

use std::{
    fs,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use chaos_test_support::{eventually, fnv1a64, process::wait_timeout};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess},
    lymph::{self, ECHO_SERVICE, Instance, InstanceOptions, LymphConfig, Supervised},
    netns::Netns,
    zk,
};
use serde_json::{Value, json};

/// The interpreter venvs are made from (Debian's; never pyenv's).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// The whole pytest run (pip installs excluded).
const PYTEST_TIMEOUT: Duration = Duration::from_secs(200);
/// How long the agent may take to list Echo as a local instance.
const AGENT_SEES_ECHO: Duration = Duration::from_secs(20);

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn zk_python_scenario_next_to_lymph() -> Result<()> {
    let _lock = Lock::acquire("python-client-lymph-venv")?;
    let venv = lymph::venv();
    let started = Instant::now();
    let copy = package_copy()?;
    pip(&venv, &["install", "--no-deps", "--force-reinstall", &path_str(copy.path())?])?;
    eprintln!("installed into the lymph venv in {:.1?}", started.elapsed());
    // Skipped: the test for a venv without lymph.
    run_suite(
        "pylymph",
        &venv,
        &[("CHAOS_PY_IMPORT", "lymph.chaos"), ("CHAOS_PY_EXPECT_LYMPH", "1"), ("CHAOS_PY_GEVENT", "1")],
        1,
    )
}

#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn zk_python_scenario_without_lymph() -> Result<()> {
    let _lock = Lock::acquire("python-client-venv")?;
    let started = Instant::now();
    let venv = standalone_venv()?;
    eprintln!("standalone venv ready in {:.1?}", started.elapsed());
    // Skipped: the test for lymph's venv, and the codec's comparison with a msgpack module (there is none here).
    run_suite(
        "pystandalone",
        &venv,
        &[("CHAOS_PY_IMPORT", "lymph_chaos"), ("CHAOS_PY_EXPECT_LYMPH", "0"), ("CHAOS_PY_GEVENT", "0")],
        2,
    )
}

/// The README's install next to lymph: a plain `pip install chaos-agent/python`, dependencies included, into a copy
/// of the lymph 0.15 venv (the shared one stays as it is). lymph 0.15 there must still serve and answer a request
/// (before the client carried its own msgpack codec, pip put msgpack 1.x over lymph's msgpack-python 0.5 and every
/// request failed with `unpackb() got an unexpected keyword argument 'encoding'`), and the client, imported as
/// `lymph.chaos`, must find an agent, call Echo through its own RPC peer and have the agent dry-run a kill.
#[test]
#[ignore = "needs ZooKeeper, lymph venv and root: run by cargo xtask test"]
fn zk_python_plain_install_keeps_lymph_working() -> Result<()> {
    let work = tempfile::Builder::new().prefix("lymph-venv-copy-").tempdir()?;
    let venv = {
        // Not while the next-to-lymph test reinstalls the package there.
        let _lock = Lock::acquire("python-client-lymph-venv")?;
        copy_venv(&lymph::venv(), &work.path().join("venv"))?
    };
    let started = Instant::now();
    let package = package_copy()?;
    pip(&venv, &["install", &path_str(package.path())?])?;
    eprintln!("plain pip install into the venv copy took {:.1?}", started.elapsed());
    let msgpack = venv_python(&venv, "import msgpack; print(msgpack.version)")?;

    let config = LymphConfig::for_test("zk_python_plain_install")?;
    let echo = Instance::start_with(&config, &InstanceOptions { venv: Some(venv.clone()), ..Default::default() })?;
    let out = lymph::lymph_cli_in(&venv, &config, &["request", "Echo.upper", r#"{"text": "hi"}"#])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "'HI'",
        "lymph request Echo.upper failed after the plain install (msgpack {}): {}{}\n--- Echo log ---\n{}",
        msgpack.trim(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(echo.log_path()).unwrap_or_default()
    );
    ensure!(msgpack.trim().starts_with("(0, 5,"), "lymph's msgpack-python 0.5 was replaced: msgpack {msgpack}");

    let agent = AgentProcess::start(
        None,
        AgentOptions {
            zookeeper: Some(config.zk_hosts()),
            args: vec!["--no-network-control".into()],
            ..Default::default()
        },
    )?;
    wait_agent_ready(&agent)?;
    let script = format!(
        r#"
from lymph.chaos import Scenario
with Scenario({hosts:?}, timeout=5, dry_run=True) as sn:
    echo = [i for i in sn.services().get("Echo", []) if i.get("pid") == {pid}]
    assert echo, sn.services()
    assert sn.rpc.request(echo[0]["endpoint"], "Echo.upper", {{"text": "hi"}}) == "HI"
    sn.kill("Echo")
    reports = sn.apply()
    assert len(reports) == 1 and reports[0]["dry_run"] is True and reports[0]["pids"] == [{pid}], reports
print("ok")
"#,
        hosts = config.zk_hosts(),
        pid = echo.pid()
    );
    let printed =
        venv_python(&venv, &script).map_err(|err| anyhow::anyhow!("{err:#}\nagent log:\n{}", agent.log_tail(30)))?;
    ensure!(printed.trim() == "ok", "the client script printed {printed:?}");
    ensure!(echo.is_registered()?, "Echo is gone after a dry-run kill");
    Ok(())
}

/// Starts Echo (restart loop) and an agent in a fresh namespace, runs pytest there (`skips` tests are expected to
/// skip), then cross-checks the agent.
fn run_suite(tag: &str, venv: &Path, extra_env: &[(&str, &str)], skips: usize) -> Result<()> {
    let ns = Netns::new(tag);
    let zk_target: SocketAddr = zk::zk_addr().parse().context("CHAOS_TEST_ZK is not ip:port")?;
    let forwarder = ns.forward_tcp(0, zk_target);
    let zk_in_ns = format!("127.0.0.1:{}", forwarder.port);
    let chroot = zk::unique_chroot(&format!("zk_python_client-{tag}"));
    let hosts = zk::hosts_with_chroot(&zk_in_ns, &chroot);
    // Everything below runs on a thread inside the namespace: Echo's supervisor thread (and so Echo) is created
    // there, and pytest is started from there.
    ns.run(|| -> Result<()> {
        let config = LymphConfig::new(&zk_in_ns, &chroot)?;
        // Echo first: its kazoo creates the chroot node, which the agent cannot register without.
        let echo = Supervised::start_with(&config, &InstanceOptions::echo_on_port(chaos_test_support::free_port()))
            .map_err(|err| anyhow::anyhow!("{err:#}\n{}", echo_logs(config.dir())))?;
        let agent =
            AgentProcess::start(Some(&ns), AgentOptions { zookeeper: Some(hosts.clone()), ..Default::default() })?;
        wait_agent_ready(&agent)?;

        let mut env: Vec<(&str, &str)> = vec![
            ("CHAOS_PY_ZK_HOSTS", &hosts),
            ("CHAOS_PY_ZK_ADDR", &zk_in_ns),
            ("CHAOS_PY_SERVICE", ECHO_SERVICE),
            ("CHAOS_PY_REQUIRE_ALL", "1"),
        ];
        env.extend_from_slice(extra_env);
        let restarts_before = echo.restarts();
        let result = pytest(venv, &env, skips);
        let restarts = echo.restarts() - restarts_before;
        if result.is_err() {
            eprintln!("--- agent log ---\n{}", agent.log_tail(60));
        }
        result?;

        // Cross-checks from the agent's side: the scenario's kills hit different pids, every fault is gone.
        let events = agent.events();
        let mut kill_pids: Vec<i64> = events
            .iter()
            .filter(|e| e["action"] == "applied" && e["kind"] == "kill")
            .filter(|e| e["fault"].as_str().is_some_and(|f| f.starts_with("sn-")))
            .flat_map(|e| e["pids"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p.as_i64())
            .collect();
        let kills = kill_pids.len();
        kill_pids.sort_unstable();
        kill_pids.dedup();
        ensure!(kills >= 2 && kill_pids.len() == kills, "kill events of the scenarios: {kills}, pids {kill_pids:?}");
        ensure!(restarts as usize >= kills, "Echo restarted {restarts} times for {kills} kills");
        let faults = agent.ok("faults", json!({}));
        ensure!(faults.as_array().is_some_and(Vec::is_empty), "faults left active: {faults}");
        eprintln!("agent: {kills} kills of distinct Echo pids, Echo restarted {restarts} times, no fault left");
        Ok(())
    })
}

/// The tails of the Echo logs in a config dir (they vanish with it).
fn echo_logs(dir: &Path) -> String {
    let mut logs: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect())
        .unwrap_or_default();
    logs.sort();
    logs.iter()
        .map(|log| format!("--- {} ---\n{}", log.display(), chaos_test_support::process::log_tail(log, 15)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the agent is registered in ZooKeeper and lists a local Echo with its pid.
fn wait_agent_ready(agent: &AgentProcess) -> Result<()> {
    let (mut status, mut services) = (Value::Null, Value::Null);
    let (mut registered, mut echo_local) = (false, false);
    eventually(
        "the agent to register and list a local Echo with its pid",
        AGENT_SEES_ECHO,
        Duration::from_millis(200),
        || {
            status = agent.ok("status", json!({}));
            services = agent.ok("list_services", json!({}));
            registered = status["zookeeper"]["registered"].is_string();
            echo_local = services[ECHO_SERVICE]
                .as_array()
                .is_some_and(|v| v.iter().any(|i| i["local"] == Value::Bool(true) && i["pid"].is_i64()));
            registered && echo_local
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: registered {registered}, local Echo {echo_local}; status {status}; services {services}\n\
             agent log:\n{}",
            agent.log_tail(40)
        )
    })
}

/// Runs the pytest suite with `env`; fails unless everything passed but the `skips` venv-specific tests.
fn pytest(venv: &Path, env: &[(&str, &str)], skips: usize) -> Result<()> {
    let tests = client_dir().join("tests");
    let work = tempfile::Builder::new().prefix("pytest-python-client-").tempdir()?;
    let log = work.path().join("pytest.log");
    let python = venv.join("bin").join("python");
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "pytest", "-p", "no:cacheprovider", "-p", "no:lymph", "-v", "-rA", "--durations=5"])
        .args(["-W", "ignore::pytest.PytestAssertRewriteWarning"])
        .arg(&tests)
        // Not the source tree: the package must come from the venv.
        .current_dir(work.path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONWARNINGS", "ignore:pkg_resources is deprecated")
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env_remove("LYMPH_NODE_IP")
        .env_remove("LYMPH_CONFIG")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::options().append(true).open(&log)?);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {}", python.display()))?;
    let Some(status) = wait_timeout(&mut child, PYTEST_TIMEOUT)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("pytest did not finish within {PYTEST_TIMEOUT:?}:\n{}", fs::read_to_string(&log).unwrap_or_default());
    };
    let output = fs::read_to_string(&log)?;
    eprintln!("{output}");
    eprintln!("pytest took {:.1?}", started.elapsed());
    let summary = output.lines().rev().find(|l| l.starts_with('=')).unwrap_or_default();
    ensure!(status.success(), "pytest failed ({status}): {summary}");
    ensure!(
        summary.contains(" passed")
            && summary.contains(&format!(" {skips} skipped"))
            && !summary.contains("failed")
            && !summary.contains("error"),
        "unexpected pytest summary: {summary}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// venvs and pip

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("chaos-agent").join("python")
}

/// `target/`: `CARGO_TARGET_DIR`, else three levels above this test binary (`target/<profile>/deps/<test>`).
fn target_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    exe.ancestors().nth(3).map(Path::to_path_buf).context("test binary outside target/<profile>/deps")
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str().map(str::to_owned).with_context(|| format!("non-UTF-8 path {}", path.display()))
}

/// A copy of `chaos-agent/python` without tests and caches: pip builds in the source directory it is given.
fn package_copy() -> Result<tempfile::TempDir> {
    fn copy(from: &Path, to: &Path) -> Result<()> {
        fs::create_dir_all(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if matches!(name.as_ref(), "tests" | "build" | "dist" | "__pycache__" | ".pytest_cache")
                || name.ends_with(".egg-info")
            {
                continue;
            }
            let (src, dst) = (entry.path(), to.join(entry.file_name()));
            if entry.file_type()?.is_dir() {
                copy(&src, &dst)?;
            } else {
                fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
            }
        }
        Ok(())
    }
    let dir = tempfile::Builder::new().prefix("lymph-chaos-python-").tempdir()?;
    copy(&client_dir(), dir.path())?;
    Ok(dir)
}

/// A copy of the venv `from` at `to` that is a venv of its own (`cp -a`, then the `#!` lines of the scripts in
/// `bin/` pointed at the copy's interpreter: the copy's `pip` would otherwise install into `from`). Fails unless the
/// copy's `sys.prefix` is `to`.
fn copy_venv(from: &Path, to: &Path) -> Result<PathBuf> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().context("running cp -a")?;
    ensure!(status.success(), "cp -a {} {} failed ({status})", from.display(), to.display());
    let (old, new) = (path_str(from)?, path_str(to)?);
    for entry in fs::read_dir(to.join("bin"))? {
        let path = entry?.path();
        if path.is_symlink() || !path.is_file() {
            continue;
        }
        let Ok(text) = fs::read_to_string(&path) else { continue }; // binaries
        if text.starts_with("#!") && text.contains(&old) {
            // Writing an existing file keeps its mode.
            fs::write(&path, text.replace(&old, &new)).with_context(|| format!("rewriting {}", path.display()))?;
        }
    }
    let prefix = venv_python(to, "import sys; print(sys.prefix)")?;
    ensure!(Path::new(prefix.trim()) == to, "the venv copy at {} has sys.prefix {prefix}", to.display());
    let pip_prefix = fs::read_to_string(to.join("bin").join("pip"))?;
    ensure!(!pip_prefix.contains(&old), "{}/bin/pip still names {old}", to.display());
    Ok(to.to_owned())
}

/// Runs `script` with `<venv>/bin/python` (lymph's environment: no `PYTHONPATH`, no bytecode, no `pkg_resources`
/// warning) and returns its stdout; fails with its output when it fails.
fn venv_python(venv: &Path, script: &str) -> Result<String> {
    let out = Command::new(venv.join("bin").join("python"))
        .args(["-c", script])
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env_remove("LYMPH_NODE_IP")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONWARNINGS", "ignore:pkg_resources is deprecated")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}/bin/python", venv.display()))?;
    ensure!(
        out.status.success(),
        "{}/bin/python failed ({}):\n{}{}",
        venv.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `<venv>/bin/pip <args>` (quiet, no version check); the error carries pip's output.
fn pip(venv: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(venv.join("bin").join("pip"))
        .args(args)
        .args(["--quiet", "--no-input", "--disable-pip-version-check"])
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env_remove("PIP_REQUIRE_VIRTUALENV")
        .env("PIP_DEFAULT_TIMEOUT", std::env::var("PIP_DEFAULT_TIMEOUT").unwrap_or_else(|_| "120".into()))
        .output()
        .with_context(|| format!("running {}/bin/pip", venv.display()))?;
    ensure!(
        out.status.success(),
        "pip {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `target/python-client-venv`: a venv without lymph where a plain `pip install 'chaos-agent/python[test]'` pulled in
/// the dependencies (current pyzmq, kazoo, PyYAML, pytest). Rebuilt when the interpreter or `pyproject.toml` change; else
/// only the package is reinstalled.
fn standalone_venv() -> Result<PathBuf> {
    let dir = target_dir()?.join("python-client-venv");
    let version = Command::new(SYSTEM_PYTHON).arg("--version").output().context("python3 --version")?;
    let pyproject = fs::read(client_dir().join("pyproject.toml"))?;
    let stamp = format!("{}pyproject.toml: {:016x}\n", String::from_utf8_lossy(&version.stdout), fnv1a64(&pyproject));
    let stamp_path = dir.join(".lymph-chaos-client-stamp");
    let copy = package_copy()?;
    let package = path_str(copy.path())?;
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) && dir.join("bin").join("python").is_file() {
        pip(&dir, &["install", "--no-deps", "--force-reinstall", &package])?;
        return Ok(dir);
    }
    if dir.exists() {
        ensure!(dir.join("pyvenv.cfg").is_file(), "{} exists and is not a venv; not removing it", dir.display());
        fs::remove_dir_all(&dir)?;
    }
    let out = Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&dir).env_remove("PYTHONHOME").output()?;
    ensure!(out.status.success(), "python3 -m venv {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    // A plain install, as a user would: pip resolves pyzmq, kazoo, PyYAML, and pytest from the `test` extra.
    pip(&dir, &["install", &format!("{package}[test]")])?;
    fs::write(&stamp_path, stamp)?;
    Ok(dir)
}

/// An exclusive `flock` on `target/<name>.lock`: two test runs sharing a target dir (developers, CI) never
/// reinstall a venv under each other's running pytest.
struct Lock {
    /// Holding the open file holds the lock; closing it (on drop) releases it.
    _file: fs::File,
}

impl Lock {
    fn acquire(name: &str) -> Result<Lock> {
        let path = target_dir()?.join(format!("{name}.lock"));
        let file = fs::File::options().create(true).truncate(false).write(true).open(&path)?;
        // SAFETY: flock on an fd we own; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("flock {}", path.display()));
        }
        Ok(Lock { _file: file })
    }
}
