//! Test support for the integration tiers.
//!
//! - [`zk`] — the private ZooKeeper the harness started (`CHAOS_TEST_ZK`) and per-test chroots
//! - [`measure`] — RTT samples, statistics, TCP echo server, UDP loss probe (used inside the VM guests)
//! - [`vm`] — the qemu guest tier: initramfs builder, TCG boot, `RESULT` lines from the serial console
//! - [`lymph`] — real lymph 0.15 peers (`CHAOS_LYMPH_VENV`): configs, `Echo` instances, a restart loop, the CLI

pub mod lymph;
pub mod measure;
pub mod vm;
pub mod zk;
