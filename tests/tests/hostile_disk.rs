//! A local unprivileged user tries to make the root agent delete or create files outside its reach through a disk
//! fault: a fault id with a `/`, a fill under a directory the user owns whose entries the user swaps for symlinks to
//! a root-owned directory before the fault ends. The agent runs with the built-in defaults (no configuration).
//! And a local user who sends many disk or memory faults at once, each within its budget alone, to fill a filesystem
//! past its floor or hold more memory than the cap together.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    time::Duration,
};

use chaos_tests::{
    agent::{AgentOptions, AgentProcess},
    hostile::{LocalUser, show},
    netns::Netns,
};
use serde_json::json;

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_local_user_cannot_delete_or_create_root_files_through_a_disk_fault() {
    let ns = Netns::new("hdisk");
    let user = LocalUser::new();
    let agent = AgentProcess::start(
        Some(&ns),
        AgentOptions { args: vec!["--no-network-control".into()], ..Default::default() },
    )
    .expect("agent");

    // What root owns: a directory with a file the attacker wants gone.
    let victim = tempfile::Builder::new().prefix("chaos-victim-").tempdir().unwrap();
    std::fs::set_permissions(victim.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let keep = victim.path().join("keep");
    std::fs::write(&keep, b"root's data").unwrap();
    // What the attacker owns: a directory on the same host.
    let mine = tempfile::Builder::new().prefix("chaos-attacker-").tempdir().unwrap();
    std::fs::set_permissions(mine.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(mine.path(), Some(user.uid), Some(user.gid)).unwrap();
    let dir = mine.path().display().to_string();

    // 1. A fault id with a `/`: the fill lands in a directory the attacker prepared, which the attacker then swaps
    //    for a symlink to root's directory; at expiry root would delete `<victim>/keep`.
    let out = user.sh(&format!("mkdir {dir}/.lymph-chaos-fill-x"));
    assert!(out.status.success(), "{}", show(&out));
    let slash = user.cli(
        Some(&ns),
        &agent,
        &["inject", "disk", &format!("path={dir}"), "mib=1", "--id", "x/keep", "--lifetime", "2"],
    );
    let out = user.sh(&format!(
        "mv {dir}/.lymph-chaos-fill-x {dir}/old && ln -s {} {dir}/.lymph-chaos-fill-x",
        victim.path().display()
    ));
    assert!(out.status.success(), "{}", show(&out));

    // 2. A well-formed id, but a directory the attacker owns: swapped for a symlink to root's directory after the
    //    fill was created, the fill's removal would follow it.
    std::fs::create_dir(mine.path().join("sub")).unwrap();
    std::os::unix::fs::chown(mine.path().join("sub"), Some(user.uid), Some(user.gid)).unwrap();
    let own_dir = user.cli(
        Some(&ns),
        &agent,
        &["inject", "disk", &format!("path={dir}/sub"), "mib=1", "--id", "y", "--lifetime", "2"],
    );
    let created_in_user_dir = std::fs::read_dir(mine.path().join("sub"))
        .unwrap()
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.uid() == 0))
        .count();
    // Planted: root's file under the name the fill will have.
    std::fs::write(victim.path().join(".lymph-chaos-fill-y"), b"root's other data").unwrap();
    let out = user.sh(&format!("mv {dir}/sub {dir}/sub-old && ln -s {} {dir}/sub", victim.path().display()));
    assert!(out.status.success(), "{}", show(&out));

    // Let both faults end (expiry runs the removal).
    std::thread::sleep(Duration::from_millis(3000));
    assert!(keep.exists(), "root's file was deleted through a fault id with a `/`");
    assert!(victim.path().join(".lymph-chaos-fill-y").exists(), "root's file was deleted through a swapped directory");
    assert!(!slash.status.success(), "a fault id with `/` was accepted: {}", show(&slash));
    assert!(String::from_utf8_lossy(&slash.stderr).contains("fault id"), "{}", show(&slash));
    assert!(!own_dir.status.success(), "a fill in a user's directory was accepted: {}", show(&own_dir));
    assert!(String::from_utf8_lossy(&own_dir.stderr).contains("disk_paths"), "{}", show(&own_dir));
    assert_eq!(created_in_user_dir, 0, "root created a file in the attacker's directory");
    // Both refusals are in the event log.
    let refused = agent.events().into_iter().filter(|e| e["action"] == "refused" && e["kind"] == "disk").count();
    assert_eq!(refused, 2, "refusals not recorded: {:?}", agent.events());
}

/// A 64 MiB ext4 filesystem on a loop device, mounted under a temp dir; unmounted (and its loop device freed) on
/// drop.
struct LoopFs {
    mnt: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    fn new() -> LoopFs {
        let dir = tempfile::Builder::new().prefix("chaos-loopfs-").tempdir().unwrap();
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
        let run = |program: &str, args: &[&str]| {
            let out = std::process::Command::new(program).args(args).output().expect(program);
            assert!(out.status.success(), "{program} {args:?}: {}", show(&out));
        };
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run("mkfs.ext4", &["-q", "-F", "-m", "0", image.to_str().unwrap()]);
        run("mount", &["-o", "loop", image.to_str().unwrap(), mnt.to_str().unwrap()]);
        LoopFs { mnt, _dir: dir }
    }

    /// (free, total) bytes, as the agent counts them.
    fn space(&self) -> (u64, u64) {
        let st = nix::sys::statvfs::statvfs(&self.mnt).unwrap();
        let block = st.fragment_size() as u64;
        (st.blocks_available() as u64 * block, st.blocks() as u64 * block)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

/// `n` requests sent at once; returns the replies (Ok: accepted).
fn at_once(agent: &AgentProcess, n: usize, kwargs: serde_json::Value) -> Vec<Result<serde_json::Value, String>> {
    std::thread::scope(|s| {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let kwargs = kwargs.clone();
                s.spawn(move || agent.call("inject", kwargs).map_err(|e| e.to_string()))
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    })
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn concurrent_disk_and_memory_faults_stay_within_their_budgets_together() {
    let ns = Netns::new("hbudget");
    let fs = LoopFs::new();
    let yaml = format!("faults:\n  disk_paths: [\"{}\"]\n  max_memory_percent: 1\n", fs.mnt.display());
    let agent = AgentProcess::start(
        Some(&ns),
        AgentOptions { config_yaml: yaml, args: vec!["--no-network-control".into()], ..Default::default() },
    )
    .expect("agent");

    // Disk: each fill leaves more than the 5 % floor alone; eight at once would fill the filesystem 3 times over.
    let (free, total) = fs.space();
    let floor = total / 20;
    let mib = ((free - floor) * 2 / 5) >> 20;
    let disk =
        at_once(&agent, 8, json!({"kind": "disk", "path": fs.mnt.display().to_string(), "mib": mib, "lifetime": 60}));
    let (left, _) = fs.space();
    let accepted = disk.iter().filter(|r| r.is_ok()).count();
    let refusals: Vec<&String> = disk.iter().filter_map(|r| r.as_ref().err()).collect();

    // Memory: the cap is 1 % of this machine's memory; eight faults of 40 % of it each, at once.
    let mem_total_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .unwrap()
        >> 10;
    let cap_mib = mem_total_mib / 100;
    let each = cap_mib * 2 / 5;
    let memory = at_once(&agent, 8, json!({"kind": "memory", "mib": each, "lifetime": 60}));
    let held = memory.iter().filter(|r| r.is_ok()).count() as u64 * each;
    let mem_refusals: Vec<&String> = memory.iter().filter_map(|r| r.as_ref().err()).collect();
    agent.ok("clear", json!({}));

    assert!(accepted >= 1, "no fill was accepted: {refusals:?}");
    assert!(
        left >= floor,
        "{accepted} of 8 fills of {mib} MiB accepted at once: {} MiB left free of {} MiB, below the 5 % floor",
        left >> 20,
        total >> 20
    );
    assert!(refusals.iter().all(|e| e.contains("floor") || e.contains("room")), "{refusals:?}");
    assert!(held >= each, "no memory fault was accepted: {mem_refusals:?}");
    assert!(held <= cap_mib, "memory faults hold {held} MiB together, above the cap of {cap_mib} MiB");
    assert!(mem_refusals.iter().all(|e| e.contains("max_memory_percent")), "{mem_refusals:?}");
}
