//! Entering a named network namespace (`/var/run/netns/<name>`, as `ip netns add` makes them): for a command
//! between fork and exec, or for a closure on a thread of its own.
//!
//! Only the network namespace changes: `ip netns exec` also gives the command a mount namespace of its own with
//! a fresh `/sys`, which hides `/sys/fs/cgroup` and `/sys/fs/bpf` from it. `setns(2)` changes only the calling
//! thread, and sockets stay in the namespace they were created in.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

/// The file of a named network namespace.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{name}"))
}

/// Makes `cmd` enter the named namespace (only the network namespace) between fork and exec. The namespace file
/// stays open as long as `cmd` does (the closure owns it) and is closed on exec in the child (CLOEXEC).
///
/// # Panics
/// When the namespace does not exist.
pub fn enter_on_exec(cmd: &mut Command, name: &str) {
    let path = path(name);
    let file = Arc::new(File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())));
    // SAFETY: setns(2) is async-signal-safe and only touches the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `f` on a new thread inside the named namespace and returns its result (panics propagate).
///
/// # Panics
/// When the namespace does not exist or cannot be entered, and when `f` panics.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = path(name);
    try_run_at(&path, f).unwrap_or_else(|e| panic!("entering {}: {e}", path.display()))
}

/// Runs `f` on a new thread inside the network namespace whose file is `netns` (`/run/netns/<name>`,
/// `/proc/<pid>/ns/net`) and returns its result.
///
/// # Errors
/// When the namespace file cannot be opened or `setns(2)` fails; a panic in `f` is propagated.
pub fn try_run_at<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor we own; it changes only this (new) thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_an_error() {
        let err = try_run_at(Path::new("/nonexistent/netns"), || ()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_own_namespace_can_be_entered_where_allowed() {
        // Entering our own namespace needs CAP_SYS_ADMIN; without it setns fails with EPERM, which is returned.
        match try_run_at(Path::new("/proc/self/ns/net"), || 7) {
            Ok(v) => assert_eq!(v, 7),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM)),
        }
    }
}
