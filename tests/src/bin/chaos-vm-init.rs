//! `chaos-vm-init`: `/init` of the VM tier's initramfs guest (PID 1; its stdout is the serial console). Built on
//! the host and put into the image by `chaos_tests::vm::GuestBuilder::init`, the way aya's test-distro runs its
//! integration tests: mount the pseudo filesystems (`/proc`, `/sys`, `/sys/fs/bpf`, `/dev`, tmpfs `/tmp` and
//! `/run`), load the kernel modules, bring `lo` up, run ONE command — a libtest test binary — and report its exit
//! status, then power off. It reaps every orphan meanwhile (as PID 1 must: a killed agent's guardian becomes ours).
//!
//! What to do comes from `/etc/chaos-vm-init.conf`, one item a line (written by the guest builder):
//! ```text
//! module /lib/modules/<abi>/kernel/net/sched/sch_netem.ko    loaded in this order (dependencies first)
//! env CHAOS_AGENT_BIN=/usr/local/bin/lymph-chaos           the command's environment (besides PATH, HOME)
//! arg /usr/local/bin/chaos-vm-guest                        the command line, one argument a line
//! arg --test-threads=1
//! ```
//! Console lines (`chaos_tests::vm::parse_console` reads them): `GUEST-BOOT uptime=<s> kernel=<release>`,
//! `GUEST-MODULE-FAILED <path> <error>`, and `GUEST-DONE exit=<status> uptime=<s>` once the command returned.

use std::{
    ffi::CString,
    fs,
    os::unix::process::ExitStatusExt as _,
    process::{Command, ExitStatus},
};

const CONFIG: &str = "/etc/chaos-vm-init.conf";
const PATH: &str = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn main() {
    if std::process::id() != 1 {
        eprintln!("chaos-vm-init: this is a VM guest's /init (PID 1); it mounts, loads modules and powers off");
        std::process::exit(2);
    }
    mount_all();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("GUEST-BOOT uptime={} kernel={}", uptime(), release.trim());
    let config = fs::read_to_string(CONFIG).unwrap_or_else(|err| {
        println!("GUEST-DONE exit=90 uptime={} (no {CONFIG}: {err})", uptime());
        power_off()
    });
    let mut argv = Vec::new();
    let mut env = Vec::new();
    for line in config.lines() {
        match line.split_once(' ') {
            Some(("module", path)) => load_module(path),
            Some(("env", kv)) => env.extend(kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))),
            Some(("arg", arg)) => argv.push(arg.to_owned()),
            _ => {}
        }
    }
    if let Err(err) = Command::new("/usr/sbin/ip").args(["link", "set", "lo", "up"]).status() {
        println!("chaos-vm-init: ip link set lo up: {err}");
    }
    let exit = run(&argv, &env);
    println!("GUEST-DONE exit={exit} uptime={}", uptime());
    power_off()
}

/// The pseudo filesystems every guest needs (the ones `/init` scripts of the tier mounted before).
fn mount_all() {
    for (fstype, target) in [
        ("proc", "/proc"),
        ("sysfs", "/sys"),
        ("devtmpfs", "/dev"),
        ("bpf", "/sys/fs/bpf"),
        ("tmpfs", "/tmp"),
        ("tmpfs", "/run"),
    ] {
        let _ = fs::create_dir_all(target);
        let (src, dst) = (CString::new(fstype).expect("no NUL"), CString::new(target).expect("no NUL"));
        // SAFETY: plain mount(2) with NUL-terminated strings that outlive the call.
        if unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), src.as_ptr(), 0, std::ptr::null()) } != 0 {
            println!("chaos-vm-init: mounting {fstype} on {target}: {}", std::io::Error::last_os_error());
        }
    }
}

/// `finit_module(2)` of an uncompressed `.ko`; a failure is reported on the console and the boot goes on (the
/// scenarios that need the module will say so).
fn load_module(path: &str) {
    let loaded = fs::File::open(path).and_then(|file| {
        let params = c"";
        // SAFETY: finit_module reads the open file and a NUL-terminated parameter string.
        let rc = unsafe {
            libc::syscall(libc::SYS_finit_module, std::os::fd::AsRawFd::as_raw_fd(&file), params.as_ptr(), 0)
        };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    });
    match loaded {
        Ok(()) => {}
        // Built in, or a dependency listed twice.
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
        Err(err) => println!("GUEST-MODULE-FAILED {path} {err}"),
    }
}

/// Runs the command (stdout and stderr on the console, cwd `/root`) and reaps orphans until it exits; its exit
/// code (128 + signal when killed, 127 when it could not start).
fn run(argv: &[String], env: &[(String, String)]) -> i32 {
    let Some((program, args)) = argv.split_first() else {
        println!("chaos-vm-init: no command in {CONFIG}");
        return 127;
    };
    let _ = fs::create_dir_all("/root");
    let child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/root")
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(err) => {
            println!("chaos-vm-init: starting {program}: {err}");
            return 127;
        }
    };
    let pid = child.id() as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on any child of ours (PID 1 inherits every orphan).
        let reaped = unsafe { libc::waitpid(-1, &raw mut status, 0) };
        if reaped == pid {
            let status = ExitStatus::from_raw(status);
            return status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        }
        if reaped < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            println!("chaos-vm-init: waitpid: {}", std::io::Error::last_os_error());
            return 126;
        }
    }
}

fn uptime() -> String {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

/// Flushes the file systems and powers the machine off (qemu exits: `-no-reboot`).
fn power_off() -> ! {
    // SAFETY: sync and reboot(2) take no pointers; as PID 1 we may power off.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Only reached when reboot failed: a PID 1 that returns panics the kernel, and `panic=-1` ends qemu too.
    std::process::exit(1)
}
