//! The guardian: a small process the agent starts that outlives it only if it dies without cleaning up.
//!
//! The agent keeps the write end of a pipe; the guardian blocks reading the other end. A clean shutdown writes
//! one byte ("dismissed") and the guardian exits. If the pipe closes without it (the agent was SIGKILLed or
//! crashed), the guardian reads the journal and, as each fault's lifetime ends, resumes paused processes, kills
//! resource workers and deletes fill files; network rules lapse in the kernel by themselves, and once the last
//! one has expired the guardian removes every network object of ours. Then it exits. A new agent stops a
//! guardian left from the previous run (its pid is in the state directory) as the first thing after claiming the
//! state directory, and starts its own at once: from then on the new guardian covers the journal, including
//! what the earlier run left, so an agent that fails to start still leaves someone behind to undo it.
//!
//! # Under systemd
//! A service's processes all live in its control group, and when the main process dies systemd kills what is
//! left there (`KillMode=mixed`/`control-group`) — the guardian included, exactly when it is needed. So when the
//! agent runs as a systemd service, the guardian is started through `systemd-run --scope` in a transient scope
//! unit of its own, `lymph-chaos-guardian-<agent pid>.scope`: outside the service's control group, it outlives
//! a SIGKILLed agent, a failed service and a start limit, and it leaves when its work is done (the scope is
//! collected). It keeps the agent's sandbox (mount namespace, capabilities). When the scope cannot be created
//! the guardian is started as a plain child and a warning says that it dies with the service.

use std::{
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    config::Config,
    faults::{
        network::{NetConfig, NetworkEngine},
        process::{self, PidFd},
    },
    journal, paths,
};

/// Environment variable carrying the guardian's instructions (JSON).
pub const GUARDIAN_ENV: &str = "LYMPH_CHAOS_GUARDIAN";
const GUARDIAN_PID: &str = "guardian.pid";
const DISMISS: u8 = b'd';

/// What the guardian needs to know.
#[derive(Serialize, Deserialize)]
struct Orders {
    journal: PathBuf,
    net: Option<NetConfig>,
    /// fd number of the pipe's read end in the guardian.
    pipe_fd: i32,
}

/// The agent's side: dismiss it on clean shutdown.
pub(crate) struct Guardian {
    pipe: std::fs::File,
}

impl Guardian {
    /// Tells the guardian the agent shut down cleanly.
    pub(crate) fn dismiss(mut self) {
        let _ = self.pipe.write_all(&[DISMISS]);
    }
}

pub(crate) use crate::procinfo::own_executable;

/// Name the guardian runs under (`argv[0]`): how a new agent recognises a leftover guardian.
const GUARDIAN_ARG0: &str = "lymph-chaos-guardian";
/// How long `systemd-run --scope` gets to move the guardian into its scope.
const SCOPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the guardian (stopping a leftover one first). `None` when this process is not the `lymph-chaos`
/// executable (e.g. the agent library inside a test).
pub(crate) fn spawn(config: &Config) -> Option<Guardian> {
    stop_leftover(&config.state_dir);
    let exe = own_executable()?;
    if let Some(service) = systemd_service() {
        match spawn_with(config, &exe, Some(&service)) {
            Ok(guardian) => return Some(guardian),
            Err(err) => warn!(
                %err,
                service,
                "guardian not in a scope of its own: it runs inside the service's control group and dies with it"
            ),
        }
    }
    match spawn_with(config, &exe, None) {
        Ok(guardian) => Some(guardian),
        Err(err) => {
            warn!(%err, "no guardian: cannot start it");
            None
        }
    }
}

/// The systemd service this process runs in (`lymph-chaos.service`), when systemd manages the machine and the
/// systemd-run tool is there.
fn systemd_service() -> Option<String> {
    if !Path::new("/run/systemd/system").is_dir() {
        return None;
    }
    let service = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|text| service_of_cgroup(&text))?;
    SYSTEMD_RUN.iter().any(|p| Path::new(p).is_file()).then_some(service)
}

/// Where `systemd-run` may be.
const SYSTEMD_RUN: &[&str] = &["/usr/bin/systemd-run", "/bin/systemd-run"];

/// The service unit of a `/proc/<pid>/cgroup` (cgroup v2 line `0::/system.slice/lymph-chaos.service`; on a
/// hybrid hierarchy the `name=systemd` line).
fn service_of_cgroup(text: &str) -> Option<String> {
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| text.lines().find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p)))?;
    let unit = path.trim().rsplit('/').next()?;
    unit.ends_with(".service").then(|| unit.to_owned())
}

/// The cgroup of a process (the whole `/proc/<pid>/cgroup`).
fn cgroup_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()
}

/// Starts the guardian, inside a transient scope of its own when `service` is given.
fn spawn_with(config: &Config, exe: &Path, service: Option<&str>) -> std::io::Result<Guardian> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds we own.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let orders = Orders {
        journal: config.state_file(paths::JOURNAL_NAME),
        net: config.network.enabled.then(|| NetConfig {
            pin_dir: Some(config.network.pin_dir.clone()),
            state_file: config.state_file(paths::NET_STATE_NAME),
            ifb_name: config.network.ifb.clone(),
            interfaces: None,
            max_packets_per_sec: config.network.max_packets_per_sec,
        }),
        pipe_fd: 3,
    };
    let read_raw = read_end.as_raw_fd();
    let mut cmd = match service {
        // systemd-run creates the scope with its own pid in it, then execs the guardian in place (same pid,
        // environment and fd 3); the guardian sets its argv[0] by re-executing itself.
        Some(service) => {
            let program = SYSTEMD_RUN.iter().find(|p| Path::new(p).is_file()).copied().unwrap_or("systemd-run");
            let mut cmd = Command::new(program);
            cmd.args(["--scope", "--quiet", "--collect"])
                .arg(format!("--unit=lymph-chaos-guardian-{}", std::process::id()))
                .arg(format!(
                    "--description=lymph-chaos guardian of {service} (pid {}): undoes its faults if it dies",
                    std::process::id()
                ))
                .arg("--")
                .arg(exe);
            cmd
        }
        None => {
            let mut cmd = Command::new(exe);
            cmd.arg0(GUARDIAN_ARG0);
            cmd
        }
    };
    cmd.env(GUARDIAN_ENV, serde_json::to_string(&orders).expect("plain data"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: between fork and exec we only call async-signal-safe functions on our own fds.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(read_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Its own session: terminal signals aimed at the agent do not reach it.
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(read_end);
    let pid = child.id();
    if service.is_some() {
        // Wait until systemd has moved it out of our control group (or systemd-run gave up).
        let ours = cgroup_of(std::process::id());
        let deadline = std::time::Instant::now() + SCOPE_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!("systemd-run --scope failed ({status})")));
            }
            let theirs = cgroup_of(pid);
            if theirs.is_some() && theirs != ours {
                break;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::other("systemd-run --scope did not move the guardian in time"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::write(config.state_dir.join(GUARDIAN_PID), pid.to_string());
    // Reap it when it exits (it normally outlives us only when we die).
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    match service {
        Some(_) => {
            info!(pid, scope = %format!("lymph-chaos-guardian-{}.scope", std::process::id()), "guardian started")
        }
        None => info!(pid, "guardian started"),
    }
    Ok(Guardian { pipe: std::fs::File::from(write_end) })
}

fn stop_leftover(state_dir: &Path) {
    let file = state_dir.join(GUARDIAN_PID);
    let Some(pid) = std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse::<i32>().ok()) else { return };
    if let Some(info) = process::proc_info(pid).filter(|p| p.cmdline.starts_with(GUARDIAN_ARG0))
        && let Ok(fd) = PidFd::open(&info)
    {
        let _ = fd.signal(libc::SIGKILL);
        fd.wait_exit(Duration::from_secs(2));
        info!(pid, "stopped the guardian of an earlier run");
    }
    let _ = std::fs::remove_file(file);
}

/// Entry point of the guardian process (called by `main` when [`GUARDIAN_ENV`] is set). Never returns.
pub fn guardian_main(orders: &str) -> ! {
    let Ok(orders) = serde_json::from_str::<Orders>(orders) else { std::process::exit(2) };
    // Started through systemd-run, argv[0] is the executable's path: take our name (same pid, environment and
    // fds) so that the next agent recognises us.
    if std::env::args_os().next().is_none_or(|a| a != GUARDIAN_ARG0) {
        // /proc/self/exe: still our binary when a package upgrade has replaced the file.
        let err = Command::new("/proc/self/exe").arg0(GUARDIAN_ARG0).exec();
        eprintln!("lymph-chaos-guardian: cannot re-execute itself: {err}");
    }
    // Without the agent's pipe on fd 3, an end-of-file would read as "the agent died": refuse to run instead.
    // SAFETY: fstat on an fd number only fills the buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(orders.pipe_fd, &raw mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        eprintln!("lymph-chaos-guardian: fd {} is not the agent's pipe", orders.pipe_fd);
        std::process::exit(2);
    }
    // SAFETY: fd 3 was set up for us by the agent.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(orders.pipe_fd) };
    let mut byte = [0u8; 1];
    let n = loop {
        match pipe.read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other.unwrap_or(0),
        }
    };
    if n == 1 && byte[0] == DISMISS {
        std::process::exit(0);
    }
    // The agent died without cleaning up.
    loop {
        let mut entries = journal::read(&orders.journal);
        let before = entries.len();
        let t = crate::util::now_unix();
        entries.retain(|e| {
            if e.expires_at > t {
                return true;
            }
            for p in &e.paused {
                if process::still_running(p)
                    && let Ok(fd) = PidFd::open(p)
                {
                    let _ = fd.signal(libc::SIGCONT);
                }
            }
            for w in &e.workers {
                if process::still_running(w)
                    && let Ok(fd) = PidFd::open(w)
                {
                    let _ = fd.signal(libc::SIGKILL);
                }
            }
            for f in &e.files {
                let _ = crate::faults::fillfs::remove_path(f);
            }
            false
        });
        if entries.len() != before {
            let tmp = orders.journal.with_extension("tmp");
            if std::fs::write(&tmp, serde_json::to_vec_pretty(&entries).unwrap_or_default()).is_ok() {
                let _ = std::fs::rename(&tmp, &orders.journal);
            }
        }
        // Every active network fault has a journal entry: once the last one has expired (its rules lapsed in the
        // kernel at the same moment), nothing of ours carries traffic any more.
        if entries.is_empty() {
            break;
        }
        let next = entries.iter().map(|e| e.expires_at).fold(f64::INFINITY, f64::min).max(t + 0.05);
        std::thread::sleep(Duration::from_secs_f64((next - t).min(1.0)));
    }
    if let Some(net) = orders.net
        && let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build()
    {
        rt.block_on(async {
            if let Ok((engine, _report)) = NetworkEngine::start(net, false).await {
                drop(engine);
            }
        });
    }
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_service_of_a_cgroup() {
        assert_eq!(service_of_cgroup("0::/system.slice/lymph-chaos.service\n").as_deref(), Some("lymph-chaos.service"));
        assert_eq!(service_of_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"), None);
        assert_eq!(service_of_cgroup("0::/\n"), None);
        // Hybrid hierarchy: the name=systemd line.
        let hybrid = "12:cpu,cpuacct:/system.slice/x.service\n1:name=systemd:/system.slice/x.service\n0::/system.slice/x.service\n";
        assert_eq!(service_of_cgroup(hybrid).as_deref(), Some("x.service"));
        assert_eq!(service_of_cgroup("1:name=systemd:/system.slice/y.service\n").as_deref(), Some("y.service"));
    }
}
