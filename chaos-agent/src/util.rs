//! Small helpers several modules of the agent need; a leaf module (it uses nothing of the crate).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch: the clock of event times, journal entries and `expires_at`.
pub(crate) fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
