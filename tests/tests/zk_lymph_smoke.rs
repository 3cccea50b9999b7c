//! Smoke tests of the ZooKeeper + real lymph 0.15 harness: `Echo` registers, answers the real CLI, and leaves
//! ZooKeeper when it stops (at once on SIGTERM, after the session timeout on SIGKILL).
//!
//! They need the services `cargo xtask test` starts (`CHAOS_TEST_ZK`, `CHAOS_LYMPH_VENV`); by hand:
//! `CHAOS_TEST_ZK=127.0.0.1:<port> CHAOS_LYMPH_VENV=<venv> cargo test -p chaos-tests --test zk_lymph_smoke -- --ignored`
//! Each test uses its own ZooKeeper chroot, so they run in parallel.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use chaos_tests::{
    lymph::{self, ECHO_SERVICE, Instance, InstanceOptions, LymphConfig, Supervised},
    zk,
};

/// ZooKeeper's tickTime in the harness: session expiry is checked once per tick.
const ZK_TICK: Duration = Duration::from_secs(2);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[ignore = "needs ZooKeeper and lymph venv: run by cargo xtask test"]
fn echo_upper_answers_the_lymph_cli() -> Result<()> {
    let config = LymphConfig::for_test("echo_upper")?;
    let started = Instant::now();
    let echo = Instance::start(&config)?;
    eprintln!("Echo start -> registered: {:?} ({} pid {})", started.elapsed(), echo.endpoint(), echo.pid());

    let out = lymph::lymph_cli(&config, &["request", "Echo.upper", r#"{"text":"hi"}"#])?;
    ensure!(out.status.success(), "lymph request failed ({}): {}", out.status, stderr(&out));
    // The CLI prints the Python repr of the reply.
    ensure!(stdout(&out) == "'HI'", "unexpected reply {:?}", stdout(&out));

    let out = lymph::lymph_cli(&config, &["request", "--json", "Echo.echo", r#"{"text":"same"}"#])?;
    ensure!(out.status.success() && stdout(&out) == r#""same""#, "Echo.echo: {:?} {}", stdout(&out), stderr(&out));
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper and lymph venv: run by cargo xtask test"]
fn echo_error_replies_reach_the_lymph_cli() -> Result<()> {
    let config = LymphConfig::for_test("echo_errors")?;
    let _echo = Instance::start(&config)?;

    // Declared error -> ERROR reply -> the client raises RemoteError.ValueError.
    let out = lymph::lymph_cli(&config, &["request", "Echo.fail", r#"{"message":"bad"}"#])?;
    ensure!(!out.status.success(), "Echo.fail succeeded: {}", stdout(&out));
    ensure!(stderr(&out).contains("lymph.exceptions.ValueError: bad"), "Echo.fail: {}", stderr(&out));

    // Undeclared error -> NACK.
    let out = lymph::lymph_cli(&config, &["request", "Echo.crash", "{}"])?;
    ensure!(!out.status.success(), "Echo.crash succeeded: {}", stdout(&out));
    ensure!(stderr(&out).contains("lymph.exceptions.Nack"), "Echo.crash: {}", stderr(&out));

    let started = Instant::now();
    let out = lymph::lymph_cli(&config, &["request", "--json", "Echo.sleep", r#"{"seconds":0.3}"#])?;
    ensure!(out.status.success() && stdout(&out) == "0.3", "Echo.sleep: {:?} {}", stdout(&out), stderr(&out));
    ensure!(started.elapsed() >= Duration::from_millis(300), "Echo.sleep returned early");
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper and lymph venv: run by cargo xtask test"]
fn discover_lists_echo_only_in_its_own_chroot() -> Result<()> {
    let config = LymphConfig::for_test("discover")?;
    let echo = Instance::start(&config)?;

    let services = lymph::discover(&config)?;
    let instances = services.get(ECHO_SERVICE).map(Vec::as_slice).unwrap_or_default();
    ensure!(instances.len() == 1, "expected one Echo instance, got {services:?}");
    ensure!(instances[0]["identity"] == echo.identity(), "{:?} vs {}", instances[0], echo.identity());
    ensure!(instances[0]["endpoint"] == echo.endpoint(), "{:?} vs {}", instances[0], echo.endpoint());
    // Every container also registers the builtin `lymph` interface.
    ensure!(services.contains_key("lymph"), "no builtin lymph service in {services:?}");

    let out = lymph::lymph_cli(&config, &["discover"])?;
    ensure!(out.status.success() && stdout(&out).contains("Echo [1]"), "lymph discover: {}", stdout(&out));

    let other = LymphConfig::for_test("discover_other")?;
    let seen = lymph::discover(&other)?;
    ensure!(seen.is_empty(), "a fresh chroot ({}) sees {seen:?}", other.chroot());
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper and lymph venv: run by cargo xtask test"]
fn terminated_instance_leaves_zookeeper_at_once() -> Result<()> {
    let config = LymphConfig::for_test("terminate")?;
    let echo = Instance::start(&config)?;
    let identity = echo.identity().to_owned();

    let stopped = Instant::now();
    let status = echo.terminate()?;
    let stop_took = stopped.elapsed();
    let gone_after = lymph::wait_unregistered(&config, ECHO_SERVICE, &identity, config.session_timeout())?;
    eprintln!("SIGTERM: exited ({status}) after {stop_took:?}; znode gone {:?} after the kill", stopped.elapsed());
    // lymph closes its session on SIGTERM: the first discover after its exit must not list it any more.
    ensure!(gone_after < config.session_timeout(), "gone only after {gone_after:?}");
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper and lymph venv: run by cargo xtask test"]
fn killed_instance_leaves_zookeeper_within_the_session_timeout() -> Result<()> {
    let session_timeout = Duration::from_secs(4); // ZooKeeper's minimum with tickTime 2000
    let config = LymphConfig::with_session_timeout(&zk::zk_addr(), &zk::unique_chroot("sigkill"), session_timeout)?;
    let echo = Instance::start(&config)?;
    let identity = echo.identity().to_owned();

    let killed = Instant::now();
    echo.kill()?;
    ensure!(lymph::is_registered(&config, ECHO_SERVICE, &identity)?, "gone before the session expired");
    let limit = session_timeout + ZK_TICK + Duration::from_secs(2);
    lymph::wait_unregistered(&config, ECHO_SERVICE, &identity, limit)?;
    let gone_after = killed.elapsed();
    eprintln!("SIGKILL: znode gone {gone_after:?} after the kill (session timeout {session_timeout:?})");
    ensure!(gone_after >= session_timeout - Duration::from_millis(500), "gone too early: {gone_after:?}");
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper and lymph venv: run by cargo xtask test"]
fn supervised_echo_comes_back_after_a_kill() -> Result<()> {
    let config = LymphConfig::for_test("supervised")?;
    // A fixed port, as under `lymph node` (shared sockets): the restarted instance has the same endpoint, hence the
    // same identity and znode, which it re-creates at once. On a random port the dead instance's znode would stay
    // until its session expires, and `lymph request` picks instances at random.
    let echo = Supervised::start_with(&config, &InstanceOptions::echo_on_port(chaos_test_support::free_port()))?;
    let first = echo.wait_registered(Duration::from_secs(5))?;

    // Kill our own child, as a chaos agent would.
    let pid = libc::pid_t::try_from(first.pid)?;
    // SAFETY: kill has no memory-safety preconditions; the pid is the supervisor's live child.
    ensure!(unsafe { libc::kill(pid, libc::SIGKILL) } == 0, "kill: {}", std::io::Error::last_os_error());
    let killed = Instant::now();
    let new_pid = echo.wait_for_restart(first.pid, Duration::from_secs(5))?;
    let restart_took = killed.elapsed();
    let second = echo.wait_registered(lymph::REGISTRATION_TIMEOUT)?;
    eprintln!("restart: new pid {new_pid} after {restart_took:?}, registered after {:?}", killed.elapsed());
    ensure!(restart_took < Duration::from_millis(500), "restart took {restart_took:?}");
    ensure!(second.pid == new_pid && echo.restarts() == 1, "{second:?}, restarts {}", echo.restarts());
    ensure!(second.identity == first.identity, "same port, other identity: {first:?} {second:?}");

    let out = lymph::lymph_cli(&config, &["request", "Echo.upper", r#"{"text":"again"}"#])?;
    ensure!(out.status.success(), "lymph request after the restart: {}", stderr(&out));
    ensure!(stdout(&out) == "'AGAIN'", "unexpected reply {:?}", stdout(&out));
    Ok(())
}
