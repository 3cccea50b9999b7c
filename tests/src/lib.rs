//! Test support for the integration tiers (what xtask needs too — waiting, child processes, `/proc`, ports — is
//! in `chaos-test-support`).
//!
//! - [`netns`] — fresh network namespaces (RAII), code and commands inside them
//! - [`agent`] — a real `lymph-chaos agent` process with private state, optionally in a namespace
//! - [`zk`] — the private ZooKeeper the harness started (`CHAOS_TEST_ZK`) and per-test chroots
//! - [`measure`] — RTT samples, statistics, TCP echo server, UDP loss probe (used inside the VM guests)
//! - [`vm`] — the qemu guest tier: initramfs builder, TCG boot, `RESULT` lines from the serial console
//! - [`mutant`] — the VM tier's deliberately wrong agent (fault requests made wrong on purpose)
//! - [`hostile`] — attackers for the hostile tier: an unprivileged local user created per test
//! - [`raw_peer`] — hand-driven ZeroMQ ROUTER peers (sends retried until the peer is routable)
//! - [`lymph`] — real lymph 0.15 peers (`CHAOS_LYMPH_VENV`): configs, `Echo` instances, a restart loop, the CLI
//! - [`cluster`] — hosts (namespaces on a bridge) with ZooKeeper, lymph services and one agent each

pub mod agent;
pub mod cluster;
pub mod edt;
pub mod hostile;
pub mod lymph;
pub mod measure;
pub mod mutant;
pub mod netns;
pub mod raw_peer;
pub mod vm;
pub mod zk;
