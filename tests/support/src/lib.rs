//! What the integration tiers (`chaos-tests`) and `cargo xtask` share, so that each exists once:
//!
//! - [`eventually`] — poll a condition until it holds or a timeout passes; the error names what was awaited
//! - [`process`] — child processes that die with the thread that started them ([`process::DieWithParent`]), a
//!   guard that stops a child on drop, waiting with a timeout, log tails
//! - [`proc_stat`] — `/proc/<pid>/stat`: state, parent, start time, CPU time
//! - [`netns`] — entering a named network namespace, for a command or for a closure on a thread of its own
//! - [`free_port`], [`now_unix`], [`fnv1a64`]
//!
//! Only std, libc and anyhow: xtask builds this crate, and it must not pull in the agent.

pub mod netns;
pub mod proc_stat;
pub mod process;
mod wait;

pub use wait::{Check, TimedOut, eventually};

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as the agent writes times (events, journal, `expires_at`).
pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A TCP port that was free on 127.0.0.1 a moment ago (bind to port 0, read it back, close). Whoever binds it
/// next may find it taken: retry on `EADDRINUSE` where that matters.
///
/// # Errors
/// Binding fails (no loopback in this network namespace).
pub fn try_free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// [`try_free_port`] for tests.
///
/// # Panics
/// When 127.0.0.1 cannot be bound (lo is down in this namespace).
pub fn free_port() -> u16 {
    try_free_port().unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// FNV-1a, 64 bit: a hash that is stable across Rust releases (unlike `DefaultHasher`), for stamps and fixtures.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_reference_values() {
        // Reference values of FNV-1a 64 (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_free_port_can_be_bound() {
        let port = free_port();
        assert_ne!(port, 0);
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }

    #[test]
    fn now_unix_is_after_2020() {
        assert!(now_unix() > 1_577_836_800.0);
    }
}
