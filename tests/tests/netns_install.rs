//! The README's install command on this machine, for real (`/usr/local/bin`, `/etc/lymph-chaos`, the
//! systemd unit): the agent it starts answers `lymph-chaos status`, and `--uninstall` leaves every directory it
//! touched exactly as it was (listed before and after).
//!
//! The install runs inside a fresh network namespace, so the agent it starts (and its tc objects) live there.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use chaos_tests::{agent::agent_bin, netns::Netns};

/// Every directory the install, the agent or the uninstall may write to.
const WATCHED: &[&str] = &[
    "/usr/local/bin",
    "/etc",
    "/etc/systemd/system",
    "/var/lib",
    "/var/log",
    "/run",
    "/sys/fs/bpf",
    "/etc/lymph-chaos",
    "/var/lib/lymph-chaos",
    "/var/log/lymph-chaos",
    "/run/lymph-chaos",
];

fn listing() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in WATCHED {
        out.insert(format!("{dir}{}", if Path::new(dir).exists() { "/" } else { " (absent)" }));
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path().display().to_string();
            // Pin directories of the test agents other test processes run meanwhile (tests/src/agent.rs names
            // them so); the installed agent pins under /sys/fs/bpf/lymph-chaos.
            if !path.starts_with("/sys/fs/bpf/chaos-test-") {
                out.insert(path);
            }
        }
    }
    out
}

fn xtask() -> PathBuf {
    agent_bin().with_file_name("xtask")
}

fn run(ns: &Netns, program: &Path, args: &[&str]) -> Output {
    let out = ns.command(program.to_str().unwrap()).args(args).output().expect("spawn");
    println!(
        "$ {} {}\n{}{}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn serial_install_starts_an_agent_that_answers_status_and_uninstall_leaves_nothing_behind() {
    let before = listing();
    // The acceptance is about a fresh machine: an installed agent, or the state of an agent run here before
    // (uninstall removes the agent's runtime directories), would make the before/after comparison meaningless.
    for path in ["/usr/local/bin/lymph-chaos", "/var/lib/lymph-chaos", "/run/lymph-chaos", "/var/log/lymph-chaos"] {
        assert!(
            !Path::new(path).exists(),
            "{path} exists: this test installs and removes lymph-chaos for real and needs a machine without it"
        );
    }
    let systemd = std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd");
    let ns = Netns::new("install");
    let binary = agent_bin();
    let start = if systemd { "--no-start" } else { "--start" };
    let out = run(&ns, &xtask(), &["install", start, "--binary", binary.to_str().unwrap()]);
    assert!(out.status.success(), "install failed");
    let installed = Path::new("/usr/local/bin/lymph-chaos");
    assert!(installed.exists() && Path::new("/etc/lymph-chaos/config.yml").exists());
    assert!(Path::new("/etc/systemd/system/lymph-chaos.service").exists());
    let mut manual = None;
    if systemd {
        // With systemd the unit would start it; here it is started by hand with the installed files, in the namespace.
        manual = Some(
            ns.command("/usr/local/bin/lymph-chaos")
                .args(["agent", "--config", "/etc/lymph-chaos/config.yml"])
                .spawn()
                .unwrap(),
        );
    }
    let status = chaos_test_support::eventually(
        "the installed agent to answer `lymph-chaos status`",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            let out = run(&ns, installed, &["--json", "status"]);
            out.status.success().then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
        },
    )
    .unwrap();
    assert_eq!(status["agent"], "lymph-chaos");
    assert_eq!(status["endpoint"], "tcp://127.0.0.1:4575");
    let pid = status["pid"].as_i64().unwrap() as i32;
    if let Some(mut child) = manual {
        // SAFETY: signalling the agent this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    let out = run(&ns, &xtask(), &["install", "--uninstall"]);
    assert!(out.status.success(), "uninstall failed");
    assert!(chaos_agent::faults::process::proc_info(pid).is_none_or(|p| p.state == 'Z'), "the agent {pid} still runs");
    let after = listing();
    let added: Vec<&String> = after.difference(&before).collect();
    let removed: Vec<&String> = before.difference(&after).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "uninstall left the machine different: added {added:?}, removed {removed:?}"
    );
}
