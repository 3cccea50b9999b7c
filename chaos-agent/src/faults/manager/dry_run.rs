//! What a dry run says it would do.

use std::time::Duration;

use super::FaultManager;
use crate::faults::{FaultAction, FaultReport, process};

impl FaultManager {
    /// The sentence a dry run answers with.
    pub(super) async fn describe_plan(&self, action: &FaultAction, report: &FaultReport, lifetime: Duration) -> String {
        let secs = lifetime.as_secs_f64();
        let what = match action {
            FaultAction::Kill { signal } => {
                format!("send {} to pid(s) {:?}", process::signal_name(*signal), report.pids)
            }
            FaultAction::Terminate => {
                format!("send SIGTERM (SIGKILL after {:?}) to pid(s) {:?}", self.config.terminate_grace, report.pids)
            }
            FaultAction::Pause => format!("stop pid(s) {:?} for {secs:.1} s", report.pids),
            FaultAction::Network { label, direction, peer, .. } => {
                let ifaces = match self.network() {
                    Some(engine) => {
                        let a = engine.attached().await;
                        if a.is_empty() { "every interface that is up".to_owned() } else { a.join(", ") }
                    }
                    None => "no interface (network faults disabled)".into(),
                };
                let between = peer
                    .as_ref()
                    .map(|p| format!(" only between them and {}", super::exec::describe_peer(p)))
                    .unwrap_or_default();
                format!(
                    "{label} on port(s) {:?}{between} (direction {direction:?}) on {ifaces} for {secs:.1} s",
                    report.ports
                )
            }
            FaultAction::Cpu(c) => format!("burn CPU ({c:?}) for {secs:.1} s"),
            FaultAction::Memory(m) => format!("hold memory ({m:?}) for {secs:.1} s"),
            FaultAction::Disk(d) => format!("fill disk ({d:?}) for {secs:.1} s"),
        };
        format!("dry run: would {what}; nothing was done")
    }
}
