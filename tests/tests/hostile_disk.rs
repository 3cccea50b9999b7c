//! A local unprivileged user tries to make the root agent delete or create files outside its reach through a disk
//! fault: a fault id with a `/`, a fill under a directory the user owns whose entries the user swaps for symlinks to
//! a root-owned directory before the fault ends. The agent runs with the built-in defaults (no configuration).

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    time::Duration,
};

use chaos_tests::{
    agent::{AgentOptions, AgentProcess},
    hostile::{LocalUser, show},
    netns::Netns,
};

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
