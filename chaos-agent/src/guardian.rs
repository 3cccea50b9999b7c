//! The guardian: a small process the agent starts that outlives it only if it dies without cleaning up.
//!
//! The agent keeps the write end of a pipe; the guardian blocks reading the other end. A clean shutdown writes
//! one byte ("dismissed") and the guardian exits. If the pipe closes without it (the agent was SIGKILLed or
//! crashed), the guardian reads the journal and, as each fault's lifetime ends, resumes paused processes, kills
//! resource workers and deletes fill files; network rules lapse in the kernel by themselves, and once the last
//! one has expired the guardian removes every network object of ours. Then it exits. A new agent stops a
//! guardian left from the previous run (its pid is in the state directory) before reconciling itself.

use std::{
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
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
pub struct Guardian {
    pipe: std::fs::File,
}

impl Guardian {
    /// Tells the guardian the agent shut down cleanly.
    pub fn dismiss(mut self) {
        let _ = self.pipe.write_all(&[DISMISS]);
    }
}

/// Whether this executable is the agent's (guardians and workers re-execute it).
pub fn own_executable() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let name = exe.file_name()?.to_str()?;
    (name == "lymph-chaos").then_some(exe)
}

/// Starts the guardian (stopping a leftover one first). `None` when this process is not the `lymph-chaos`
/// executable (e.g. the agent library inside a test).
pub fn spawn(config: &Config) -> Option<Guardian> {
    stop_leftover(&config.state_dir);
    let exe = own_executable()?;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        warn!("no guardian: pipe2 failed");
        return None;
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
    let mut cmd = Command::new(exe);
    cmd.arg0("lymph-chaos-guardian")
        .env(GUARDIAN_ENV, serde_json::to_string(&orders).expect("plain data"))
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
    match cmd.spawn() {
        Ok(child) => {
            let _ = std::fs::write(config.state_dir.join(GUARDIAN_PID), child.id().to_string());
            drop(read_end);
            // Reap it when it exits (it normally outlives us only when we die).
            std::thread::spawn(move || {
                let mut child = child;
                let _ = child.wait();
            });
            info!("guardian started");
            Some(Guardian { pipe: std::fs::File::from(write_end) })
        }
        Err(err) => {
            warn!(%err, "no guardian: cannot start it");
            None
        }
    }
}

fn stop_leftover(state_dir: &Path) {
    let file = state_dir.join(GUARDIAN_PID);
    let Some(pid) = std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse::<i32>().ok()) else { return };
    if let Some(info) = process::proc_info(pid).filter(|p| p.cmdline.starts_with("lymph-chaos-guardian"))
        && let Ok(fd) = PidFd::open(&info)
    {
        let _ = fd.signal(libc::SIGKILL);
        fd.wait_exit(Duration::from_secs(2));
        info!(pid, "stopped the guardian of an earlier run");
    }
    let _ = std::fs::remove_file(file);
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Entry point of the guardian process (called by `main` when [`GUARDIAN_ENV`] is set). Never returns.
pub fn guardian_main(orders: &str) -> ! {
    let Ok(orders) = serde_json::from_str::<Orders>(orders) else { std::process::exit(2) };
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
        let t = now();
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
                let _ = std::fs::remove_file(f);
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
