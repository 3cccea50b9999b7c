//! Verifying network faults: once a network fault is in place, probes measure what it does (how, and why it is
//! judged that way: [`crate::faults::network::effect`]) and the fault's report and `applied` event carry the
//! observed added delay and loss.
//!
//! ```text
//! apply ─▶ execute ─▶ plan ─┬─ probe ──▶ report.observed = pending; the RPC answers at once
//!                           │            verifier task: counters, handshakes, counters ─▶ judge
//!                           │              ─▶ report.observed ─▶ `applied` event (detail.observed) [─▶ `warning`]
//!                           └─ no probe ─▶ report.observed = not_measured | no_listener ─▶ `applied` [─▶ `warning`]
//! revert / expiry / shutdown before the probes end ─▶ `applied` (not_measured) ─▶ `reverted` | `expired`
//! ```
//!
//! - **When**: after the fault is in place, in the verifier task, so applying is not slowed; the `applied` event
//!   waits for the measurement (at most [`Expectation::window`]: about 1.1 s plus the delay the fault adds; its
//!   `detail.applied_at` says when the fault took effect) and always precedes the fault's end.
//! - **What is not probed**: dry runs and process or resource faults (no observation at all); UDP-only faults
//!   (there is no handshake to time without sending the service data it would have to parse: `not_measured`,
//!   the counters show the rule matching); TCP ports nothing listens on (`no_listener` and a `warning`: no caller
//!   can be hurt there yet); faults whose lifetime is shorter than twice the probing window or whose delay is
//!   above [`MAX_EXPECTED_DELAY`] (`not_measured`). A fault that follows its service to new ports is not
//!   measured again: its observation becomes `not_measured`, saying so.
//! - **Warnings**: `not_observed` (no packet matched, no loss or delay where one was asked for) and
//!   `no_listener` add a `warning` event after the `applied` one. The fault stays in place either way.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use chaos_api::reply::{Observation, Verdict};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{FaultManager, exec::Undo};
use crate::{
    discovery::sockets,
    events::{Action, Event},
    faults::{
        FaultAction,
        network::{
            Direction, Impairment, NetHandle, Protocol,
            effect::{self, Expectation, MAX_EXPECTED_DELAY, ProbeTarget},
        },
    },
};

/// What to measure for one fault.
pub(super) struct Job {
    fault: String,
    handle: NetHandle,
    targets: Vec<ProbeTarget>,
    expect: Expectation,
    /// TCP ports of the fault that nothing listens on (not probed).
    no_listener: Vec<u16>,
}

/// How a fault is verified: probes, or an observation decided without them.
pub(super) enum Plan {
    Probe(Job),
    Decided(Observation),
}

/// `applied` events waiting for their fault's observation, and the verifier task's queue.
pub(super) struct Effects {
    pending: std::sync::Mutex<HashMap<String, Event>>,
    queue: mpsc::UnboundedSender<Job>,
}

impl Effects {
    /// The verifier's state and the receiving end of its queue.
    pub(super) fn new() -> (Effects, mpsc::UnboundedReceiver<Job>) {
        let (queue, rx) = mpsc::unbounded_channel();
        (Effects { pending: std::sync::Mutex::new(HashMap::new()), queue }, rx)
    }
}

fn decided(verdict: Verdict, summary: String) -> Observation {
    Observation {
        verdict,
        added_delay_ms: None,
        loss_percent: None,
        expected_delay_ms: None,
        expected_loss_percent: None,
        probes: 0,
        matched_packets: 0,
        probe_packets: 0,
        ports: Vec::new(),
        summary,
    }
}

/// What a handshake through this fault should suffer: the delay once per direction its packets cross the rule
/// (`to`: the SYN, `from`: the SYN-ACK, `both`: both), the loss likewise.
fn expectation(imp: &Impairment, direction: Direction) -> Expectation {
    let crossings: u32 = if direction == Direction::Both { 2 } else { 1 };
    let loss = if imp.blackhole { 100.0 } else { imp.loss_percent };
    Expectation {
        // Reordered packets are the ones sent without the delay: from half of them on, the median sees none.
        delay: if imp.reorder_percent >= 50.0 { Duration::ZERO } else { imp.delay * crossings },
        jitter: imp.jitter * crossings,
        loss_percent: 100.0 * (1.0 - (1.0 - loss / 100.0).powi(crossings as i32)),
    }
}

/// How to verify a fault that was just applied; `None` for faults that are not network faults.
pub(super) fn plan(
    action: &FaultAction,
    ports: &[u16],
    handle: &NetHandle,
    lifetime: Duration,
    fault: &str,
) -> Option<Plan> {
    let FaultAction::Network { impairment, direction, protocol, .. } = action else { return None };
    let (matches, _) = super::exec::port_matches(&ports.iter().copied().collect(), *protocol, *direction);
    let listeners = sockets::tcp_listeners().unwrap_or_default();
    let (mut targets, mut no_listener, mut udp_only) = (Vec::new(), Vec::new(), Vec::new());
    for m in &matches {
        if m.protocol == Protocol::Udp {
            udp_only.push(m.port);
            continue;
        }
        let here: Vec<IpAddr> = listeners
            .iter()
            .filter(|l| l.port == m.port && m.addr.is_none_or(|a| l.addr.to_canonical() == a))
            .map(|l| effect::probe_addr(l.addr))
            .collect();
        if here.is_empty() {
            no_listener.push(m.port);
        }
        targets.extend(here.into_iter().map(|addr| ProbeTarget { addr, port: m.port }));
    }
    targets.sort();
    targets.dedup();
    no_listener.sort_unstable();
    no_listener.dedup();
    if targets.is_empty() {
        return Some(Plan::Decided(if no_listener.is_empty() {
            decided(
                Verdict::NotMeasured,
                format!(
                    "udp port(s) {udp_only:?}: not probed (there is no handshake to time without sending the service \
                     data); the counters show the rule matching"
                ),
            )
        } else {
            decided(Verdict::NoListener, no_listener_sentence(&no_listener))
        }));
    }
    let expect = expectation(impairment, *direction);
    if expect.delay > MAX_EXPECTED_DELAY {
        return Some(Plan::Decided(decided(
            Verdict::NotMeasured,
            format!(
                "not probed: a handshake would wait {:.1} s, above the {} s the probes wait",
                expect.delay.as_secs_f64(),
                MAX_EXPECTED_DELAY.as_secs()
            ),
        )));
    }
    if expect.window() * 2 > lifetime {
        return Some(Plan::Decided(decided(
            Verdict::NotMeasured,
            format!(
                "not probed: the lifetime ({:.1} s) is shorter than twice the probing window ({:.1} s)",
                lifetime.as_secs_f64(),
                expect.window().as_secs_f64()
            ),
        )));
    }
    Some(Plan::Probe(Job { fault: fault.to_owned(), handle: handle.clone(), targets, expect, no_listener }))
}

fn no_listener_sentence(ports: &[u16]) -> String {
    format!(
        "nothing listens on tcp port(s) {ports:?} here: no caller's traffic crosses the fault yet, nothing was \
         probed (it acts once a service listens there)"
    )
}

/// A short rendering for messages: `100 % loss, +0.021 ms` or the summary.
fn sentence(obs: &Observation) -> String {
    match obs.verdict {
        Verdict::Observed => {
            let mut parts = Vec::new();
            if let Some(l) = obs.loss_percent {
                parts.push(format!("{l} % loss"));
            }
            if let Some(d) = obs.added_delay_ms {
                parts.push(format!("{d:+.3} ms per handshake"));
            }
            format!(
                "observed {} over {} probe handshakes ({} packets matched)",
                parts.join(", "),
                obs.probes,
                obs.matched_packets
            )
        }
        Verdict::Pending => "effect being measured".to_owned(),
        Verdict::NotObserved => format!("effect NOT observed: {}", obs.summary),
        Verdict::NoListener | Verdict::NotMeasured => obs.summary.clone(),
    }
}

impl FaultManager {
    /// Records the `applied` event of a fault: now, or, when its effect is to be measured, once it is (the report
    /// says `pending` until then).
    pub(super) fn applied(&self, mut event: Event, plan: Option<Plan>) {
        match plan {
            None => {
                self.events.record(event);
            }
            Some(Plan::Decided(obs)) => self.publish(event, &obs),
            Some(Plan::Probe(job)) => {
                // The event is recorded (and timed) once measured; when the fault took effect stays in it.
                if let Some(map) = event.detail.get_or_insert_with(|| serde_json::json!({})).as_object_mut() {
                    map.insert("applied_at".into(), serde_json::json!(super::now_unix()));
                }
                let fault = job.fault.clone();
                let mut pending = self.effects.pending.lock().expect("poisoned");
                if self.effects.queue.send(job).is_err() {
                    // The verifier has stopped (shutdown): nothing will measure it.
                    drop(pending);
                    let obs = decided(Verdict::NotMeasured, "not probed: the agent is stopping".into());
                    set_observed(&mut event, &obs);
                    self.events.record(event);
                    return;
                }
                pending.insert(fault, event);
            }
        }
    }

    /// The observation a report starts with.
    pub(super) fn initial_observation(plan: &Option<Plan>) -> Option<Observation> {
        match plan {
            None => None,
            Some(Plan::Decided(obs)) => Some(obs.clone()),
            Some(Plan::Probe(job)) => Some(decided(
                Verdict::Pending,
                format!(
                    "measuring: {} handshakes to each of {} probed port(s) and as many to an unfaulted port, within \
                     {:.1} s",
                    effect::ROUNDS,
                    job.targets.len(),
                    job.expect.window().as_secs_f64()
                ),
            )),
        }
    }

    /// A fault ends: its `applied` event, if still waiting, is recorded first (not measured). Returns the
    /// observation to keep in its report, if it changed.
    pub(super) fn flush_applied(&self, fault: &str) -> Option<Observation> {
        let mut pending = self.effects.pending.lock().expect("poisoned");
        let mut event = pending.remove(fault)?;
        let obs = decided(Verdict::NotMeasured, "not measured: the fault ended before its probes did".into());
        set_observed(&mut event, &obs);
        self.events.record(event);
        Some(obs)
    }

    /// Records the `applied` event with its observation, and a `warning` when the effect was not seen.
    fn publish(&self, mut event: Event, obs: &Observation) {
        set_observed(&mut event, obs);
        let warning = matches!(obs.verdict, Verdict::NotObserved | Verdict::NoListener).then(|| Event {
            fault: event.fault.clone(),
            kind: event.kind.clone(),
            target: event.target.clone(),
            pids: event.pids.clone(),
            ports: event.ports.clone(),
            interfaces: event.interfaces.clone(),
            outcome: "warning".into(),
            detail: Some(serde_json::json!({"observed": obs})),
            message: format!(
                "{} fault {} is in place but {}",
                event.kind.as_deref().unwrap_or("network"),
                event.fault.as_deref().unwrap_or("-"),
                if obs.verdict == Verdict::NoListener { obs.summary.clone() } else { sentence(obs) }
            ),
            ..Event::new(Action::Warning)
        });
        self.events.record(event);
        if let Some(w) = warning {
            warn!(fault = ?w.fault, "{}", w.message);
            self.events.record(w);
        }
    }

    /// The verifier task: measures each queued fault (several at once) until `stop` is cancelled.
    pub(super) async fn verify(self: Arc<Self>, mut jobs: mpsc::UnboundedReceiver<Job>, stop: CancellationToken) {
        let mut running = JoinSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    running.abort_all();
                    return;
                }
                job = jobs.recv() => match job {
                    Some(job) => { running.spawn(self.clone().verify_one(job)); }
                    None => return,
                },
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
    }

    async fn verify_one(self: Arc<Self>, job: Job) {
        let Some(engine) = self.network().cloned() else { return };
        let before = engine.counters(&job.handle).await.packets;
        let samples = effect::probe(&job.targets, &job.expect).await;
        let after = engine.counters(&job.handle).await.packets;
        let mut obs = match samples {
            Ok(samples) => effect::judge(&job.expect, &samples, after.saturating_sub(before)),
            Err(err) => decided(Verdict::NotMeasured, format!("not probed: no baseline socket: {err}")),
        };
        if !job.no_listener.is_empty() {
            if obs.verdict == Verdict::Observed {
                obs.verdict = Verdict::NoListener;
            }
            obs.summary = format!("{}; {}", obs.summary, no_listener_sentence(&job.no_listener));
        }
        // Still the same fault on the same rules? Holding the table keeps its end from passing this point.
        let mut table = self.table.lock().await;
        let Some(fault) = table.active.get_mut(&job.fault) else { return };
        if !matches!(&fault.undo, Undo::Network(h) if h.slot == job.handle.slot && h.keys == job.handle.keys) {
            obs = decided(Verdict::NotMeasured, "not measured: the fault moved to other ports while probing".into());
        }
        fault.report.observed = Some(obs.clone());
        let event = self.effects.pending.lock().expect("poisoned").remove(&job.fault);
        if let Some(event) = event {
            info!(fault = %job.fault, verdict = ?obs.verdict, "{}", sentence(&obs));
            self.publish(event, &obs);
        }
        drop(table);
    }
}

/// A fault followed its service to new ports: what was measured on the old ones no longer says anything.
pub(super) fn moved(report: &mut crate::faults::FaultReport, ports: &[u16]) {
    if report.observed.is_some() {
        report.observed = Some(decided(
            Verdict::NotMeasured,
            format!("moved to port(s) {ports:?} after it was measured: not measured there"),
        ));
    }
}

/// Puts the observation into an `applied` event (its detail and message).
fn set_observed(event: &mut Event, obs: &Observation) {
    let detail = event.detail.get_or_insert_with(|| serde_json::json!({}));
    if let Some(map) = detail.as_object_mut() {
        map.insert("observed".into(), serde_json::to_value(obs).expect("plain data"));
    }
    event.message = format!("{}; {}", event.message, sentence(obs));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handshake_crosses_the_rule_once_per_direction() {
        let imp = Impairment { delay: Duration::from_millis(100), loss_percent: 50.0, ..Default::default() };
        let to = expectation(&imp, Direction::To);
        assert_eq!((to.delay, to.loss_percent), (Duration::from_millis(100), 50.0));
        let both = expectation(&imp, Direction::Both);
        assert_eq!((both.delay, both.loss_percent), (Duration::from_millis(200), 75.0));
        let hole = expectation(&Impairment { blackhole: true, ..Default::default() }, Direction::From);
        assert_eq!(hole.loss_percent, 100.0);
        let reordered = Impairment { reorder_percent: 60.0, ..imp };
        assert_eq!(expectation(&reordered, Direction::To).delay, Duration::ZERO);
    }
}
