//! The ZooKeeper that the harness (`cargo xtask test`, see `xtask/src/services.rs`) started for this test run.
//!
//! Tests never start ZooKeeper themselves: they read its address from [`ZK_ENV`] and isolate themselves from each
//! other with a chroot of their own ([`unique_chroot`]), so tests that run in parallel never see each other's
//! services (lymph registers under `/<chroot>/services/<name>/<id>` when the hosts string carries a chroot).

use std::sync::atomic::{AtomicU64, Ordering};

/// Environment variable with the ZooKeeper client address, e.g. `127.0.0.1:34567` (no chroot).
pub const ZK_ENV: &str = "CHAOS_TEST_ZK";

/// The ZooKeeper client address the harness gives tests (`127.0.0.1:<port>`).
///
/// # Panics
/// When [`ZK_ENV`] is unset or empty: these tests need the services `cargo xtask test` starts.
pub fn zk_addr() -> String {
    match std::env::var(ZK_ENV) {
        Ok(addr) if !addr.trim().is_empty() => addr.trim().to_owned(),
        _ => panic!(
            "{ZK_ENV} is not set: this test needs the private ZooKeeper that `cargo xtask test` starts \
             (or set {ZK_ENV}=127.0.0.1:<port> of a ZooKeeper you started, plus CHAOS_LYMPH_VENV)"
        ),
    }
}

/// A chroot no other test (in this process or another) uses: `/t-<name>-<pid>-<n>`.
///
/// `test_name` is reduced to `[A-Za-z0-9_-]` (other characters become `-`) and cut to 40 characters.
pub fn unique_chroot(test_name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name: String = test_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
        .take(40)
        .collect();
    format!("/t-{name}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The kazoo hosts string for `addr` under `chroot`: `127.0.0.1:<port>/<chroot>` (`chroot` with or without its
/// leading `/`).
pub fn hosts_with_chroot(addr: &str, chroot: &str) -> String {
    format!("{addr}/{}", chroot.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chroots_are_unique_and_path_safe() {
        let a = unique_chroot("zk_lymph_smoke::upper works");
        let b = unique_chroot("zk_lymph_smoke::upper works");
        assert_ne!(a, b);
        assert!(a.starts_with("/t-zk_lymph_smoke--upper-works-"), "{a}");
        assert!(!a[1..].contains('/'), "{a}");
    }

    #[test]
    fn hosts_string_carries_the_chroot() {
        assert_eq!(hosts_with_chroot("127.0.0.1:2181", "/t-x-1-0"), "127.0.0.1:2181/t-x-1-0");
        assert_eq!(hosts_with_chroot("127.0.0.1:2181", "t-x-1-0"), "127.0.0.1:2181/t-x-1-0");
    }
}
