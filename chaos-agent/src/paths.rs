//! Every path and well-known number the agent uses, in one place.

/// Default configuration file.
pub const CONFIG_FILE: &str = "/etc/lymph-chaos/config.yml";
/// Runtime state (tmpfs: a reboot wipes it together with the kernel state it describes).
pub const STATE_DIR: &str = "/run/lymph-chaos";
/// Journal of faults, inside the state directory.
pub(crate) const JOURNAL_NAME: &str = "journal.json";
/// Network state (clsact qdiscs we created), inside the state directory.
pub(crate) const NET_STATE_NAME: &str = "network.json";
/// Pid file of the agent, inside the state directory.
pub(crate) const PID_NAME: &str = "agent.pid";
/// Default network state file.
pub(crate) const NET_STATE_FILE: &str = "/run/lymph-chaos/network.json";
/// Where our BPF maps are pinned (bpffs).
pub const BPF_PIN_DIR: &str = "/sys/fs/bpf/lymph-chaos";
/// Where the agent mounts cgroup v2 for a moment when none is mounted (to attach its socket-owner programs to the
/// root cgroup; unmounted right after).
pub const CGROUP2_MOUNT: &str = "/run/lymph-chaos/cgroup2";
/// Event log (JSON lines, rotated).
pub const EVENTS_FILE: &str = "/var/log/lymph-chaos/events.jsonl";
/// Name prefix of disk-fill files (`<dir>/.lymph-chaos-fill-<fault id>`).
pub(crate) const FILL_FILE_PREFIX: &str = ".lymph-chaos-fill";
/// Default directory of disk-fill files (`faults.disk_paths`), created root-only by the agent.
pub(crate) const DISK_FILL_DIR: &str = "/var/lib/lymph-chaos/fill";
/// Default RPC port of the agent (fixed, so lymph clients and the CLI find a standalone agent).
pub const DEFAULT_RPC_PORT: u16 = 4575;
pub(crate) use chaos_api::SERVICE_NAME;
