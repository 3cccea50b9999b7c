//! The guest of the EDT boot (`tests/tests/vm_edt.rs`, `cargo xtask bench accuracy`): the pinned Debian kernel
//! **without `sch_netem`** — left out of the modules `/init` loads and of the image's module tree, module autoload
//! pointed at `/bin/false` so nothing loads it behind the test's back — and with `sch_fq`; the netem module waits
//! at [`NETEM_KO`], outside the module tree, until `chaos-vm-edt` loads it for its raw netem rounds.

use std::path::Path;

use anyhow::Result;

use crate::vm::{Guest, VmAssets};

/// The guest program's path in the image.
pub const GUEST_BIN: &str = "/usr/local/bin/chaos-vm-edt";
/// The agent's path in the image.
pub const AGENT_BIN: &str = "/usr/local/bin/lymph-chaos";
/// Where the netem module waits, outside `/lib/modules`.
pub const NETEM_KO: &str = "/root/later/sch_netem.ko";

/// Builds the EDT guest: `guest_bin` is `chaos-vm-edt`, `args` its extra arguments (name filters, `--rounds N`).
///
/// # Errors
/// As [`crate::vm::GuestBuilder::build`].
pub fn guest(assets: &VmAssets, guest_bin: &Path, agent: &Path, args: &str) -> Result<Guest> {
    Guest::builder(assets)
        .without_module("sch_netem")
        .binary(guest_bin, GUEST_BIN)
        .binary(agent, AGENT_BIN)
        .file(assets.modules_dir.join("kernel/net/sched/sch_netem.ko"), NETEM_KO)
        .command(format!(
            "echo /bin/false > /proc/sys/kernel/modprobe; {GUEST_BIN} --agent-bin {AGENT_BIN} --netem-module {NETEM_KO} \
             {args}"
        ))
        .build()
}
