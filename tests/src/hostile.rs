//! Attackers for the `hostile` tier: an unprivileged local user created for the test (removed on drop), who runs
//! commands — the `lymph-chaos` CLI against an agent, a shell swapping files — as that user, optionally inside a
//! test's network namespace.

use std::{
    os::unix::process::CommandExt,
    process::{Command, Output},
    sync::atomic::{AtomicU64, Ordering},
};

use crate::{
    agent::{AgentProcess, agent_bin},
    netns::Netns,
};

/// A local user without privileges, created with `useradd` for one test and deleted on drop.
#[derive(Debug)]
pub struct LocalUser {
    /// Login name.
    pub name: String,
    /// Uid.
    pub uid: u32,
    /// Gid of its own group.
    pub gid: u32,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl LocalUser {
    /// Creates the user (system account, no home, no login shell).
    ///
    /// # Panics
    /// When `useradd` fails (the tier needs root).
    pub fn new() -> LocalUser {
        let name = format!("chh{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let ok = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", &name])
            .status()
            .expect("running useradd");
        assert!(ok.success(), "useradd {name} failed (root needed)");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().expect("id");
            String::from_utf8_lossy(&out.stdout).trim().parse().expect("numeric id")
        };
        let (uid, gid) = (id("-u"), id("-g"));
        assert!(uid != 0 && gid != 0);
        LocalUser { name, uid, gid }
    }

    /// `program` run as this user (supplementary groups dropped), inside `ns` when given.
    pub fn command(&self, ns: Option<&Netns>, program: &str) -> Command {
        let mut cmd = Command::new(program);
        // First the namespace (entering it needs root), then the user: pre_exec closures run in order.
        if let Some(n) = ns {
            crate::netns::enter_on_exec(&mut cmd, n.name());
        }
        let (uid, gid) = (self.uid, self.gid);
        // SAFETY: setgroups/setgid/setuid are async-signal-safe and only touch the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.env_clear().env("PATH", "/usr/local/bin:/usr/bin:/bin").current_dir("/");
        cmd
    }

    /// The `lymph-chaos` CLI as this user against `agent` (in `ns`, where the agent runs).
    pub fn cli(&self, ns: Option<&Netns>, agent: &AgentProcess, args: &[&str]) -> Output {
        self.command(ns, agent_bin().to_str().expect("utf-8 path"))
            .args(["--agent", &agent.endpoint])
            .args(args)
            .output()
            .expect("running lymph-chaos as the local user")
    }

    /// `sh -c script` as this user.
    pub fn sh(&self, script: &str) -> Output {
        self.command(None, "/bin/sh").args(["-c", script]).output().expect("running sh as the local user")
    }
}

impl Default for LocalUser {
    fn default() -> Self {
        LocalUser::new()
    }
}

impl Drop for LocalUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// Output as text, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}
