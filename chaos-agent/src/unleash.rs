//! Unleashed mode: faults from a configured menu at random times, like Chaos Monkey's random mode.
//!
//! Gaps are exponential with the configured mean, never shorter than the minimum gap. Each round draws, from one
//! seeded generator and in a fixed order: the gap, the menu item (weighted), the service (uniform over the local
//! services, sorted by name, that are not excluded or at their cap), and the fault's own seed (which picks the
//! instance) and id. The seed is recorded in every event, so a run with the same seed over the same targets makes
//! the same choices in the same order.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use chaos_api::{Target, request::Inject};

use crate::{
    config::{UnleashConfig, parse_hhmm},
    discovery::Discovery,
    events::{Action, Event, EventLog},
    faults::{FaultManager, FaultSpec},
};

const ORIGIN: &str = "unleash";

pub(crate) use chaos_api::reply::UnleashState;

/// Why unleashed mode does not start (a `ValueError` on the wire).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum UnleashError {
    /// The configuration names no fault to choose from.
    #[error("unleash.menu is empty: nothing to choose from")]
    EmptyMenu,
    /// A mean interval of zero would fire faults back to back.
    #[error("mean_interval must be above 0")]
    ZeroMeanInterval,
}

/// Runs unleashed mode.
pub(crate) struct Unleasher {
    config: UnleashConfig,
    agent_dry_run: bool,
    manager: Arc<FaultManager>,
    discovery: Arc<Discovery>,
    events: Arc<EventLog>,
    state: Arc<Mutex<UnleashState>>,
    task: Mutex<Option<AbortHandle>>,
}

impl Unleasher {
    /// Creates it (stopped).
    pub(crate) fn new(
        config: UnleashConfig,
        agent_dry_run: bool,
        manager: Arc<FaultManager>,
        discovery: Arc<Discovery>,
        events: Arc<EventLog>,
    ) -> Arc<Unleasher> {
        let state = UnleashState {
            enabled: false,
            seed: config.seed,
            mean_interval: config.mean_interval.as_secs_f64(),
            min_gap: config.min_gap.as_secs_f64(),
            dry_run: agent_dry_run,
            rounds: 0,
        };
        Arc::new(Unleasher {
            config,
            agent_dry_run,
            manager,
            discovery,
            events,
            state: Arc::new(Mutex::new(state)),
            task: Mutex::new(None),
        })
    }

    /// Current state.
    pub(crate) fn state(&self) -> UnleashState {
        self.state.lock().expect("poisoned").clone()
    }

    /// Starts (or restarts) with optional overrides.
    ///
    /// # Errors
    /// [`UnleashError`]: an empty menu or a zero mean interval.
    pub(crate) fn start(
        &self,
        seed: Option<u64>,
        mean: Option<Duration>,
        gap: Option<Duration>,
        dry_run: Option<bool>,
    ) -> Result<UnleashState, UnleashError> {
        if self.config.menu.is_empty() {
            return Err(UnleashError::EmptyMenu);
        }
        let mean = mean.unwrap_or(self.config.mean_interval);
        let gap = gap.unwrap_or(self.config.min_gap);
        if mean.is_zero() {
            return Err(UnleashError::ZeroMeanInterval);
        }
        self.stop_task();
        let seed = seed.or(self.config.seed).unwrap_or_else(rand::random);
        let dry_run = dry_run.unwrap_or(false) || self.agent_dry_run;
        let state = UnleashState {
            enabled: true,
            seed: Some(seed),
            mean_interval: mean.as_secs_f64(),
            min_gap: gap.as_secs_f64(),
            dry_run,
            rounds: 0,
        };
        *self.state.lock().expect("poisoned") = state.clone();
        self.events.record(Event {
            seed: Some(seed),
            detail: Some(serde_json::json!({"mean_interval": mean.as_secs_f64(), "min_gap": gap.as_secs_f64(), "dry_run": dry_run})),
            ..Event::new(Action::Unleash).message(format!("unleashed with seed {seed}"))
        });
        info!(seed, ?mean, ?gap, dry_run, "unleashed");
        let run = Round {
            config: self.config.clone(),
            manager: self.manager.clone(),
            discovery: self.discovery.clone(),
            state: self.state.clone(),
            rng: StdRng::seed_from_u64(seed),
            mean,
            gap,
            dry_run,
        };
        let task = tokio::spawn(async move {
            // A panic in a round must be seen, not swallowed with the task.
            if let Err(panic) = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run.run())).await {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned());
                tracing::error!(what = ?what, "unleashed mode stopped by a bug");
            }
        });
        *self.task.lock().expect("poisoned") = Some(task.abort_handle());
        Ok(state)
    }

    /// Stops; faults already started run out their lifetime.
    pub(crate) fn stop(&self) -> UnleashState {
        let was = self.stop_task();
        let mut state = self.state.lock().expect("poisoned");
        state.enabled = false;
        if was {
            self.events.record(Event {
                seed: state.seed,
                ..Event::new(Action::Leash).message(format!("leashed after {} faults", state.rounds))
            });
        }
        state.clone()
    }

    fn stop_task(&self) -> bool {
        match self.task.lock().expect("poisoned").take() {
            Some(t) => {
                t.abort();
                true
            }
            None => false,
        }
    }
}

struct Round {
    config: UnleashConfig,
    manager: Arc<FaultManager>,
    discovery: Arc<Discovery>,
    state: Arc<Mutex<UnleashState>>,
    rng: StdRng,
    mean: Duration,
    gap: Duration,
    dry_run: bool,
}

impl Round {
    async fn run(mut self) {
        loop {
            // Exponential gap with the configured mean, at least the minimum gap.
            let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
            let wait = self.mean.mul_f64(-u.ln()).max(self.gap);
            tokio::time::sleep(wait).await;
            if !self.in_window() {
                continue;
            }
            let total: f64 = self.config.menu.iter().map(|m| m.weight).sum();
            let mut pick = self.rng.random_range(0.0..total);
            let item = self
                .config
                .menu
                .iter()
                .find(|m| {
                    pick -= m.weight;
                    pick < 0.0
                })
                .unwrap_or(&self.config.menu[self.config.menu.len() - 1])
                .clone();
            let per_service = self.manager.active_per_service(ORIGIN).await;
            let snap = self.discovery.snapshot();
            let services: Vec<String> = snap
                .services
                .iter()
                .filter(|(name, instances)| {
                    instances.iter().any(|i| i.local)
                        && name.as_str() != crate::paths::SERVICE_NAME
                        && name.as_str() != "lymph"
                        && !self.config.exclude_services.contains(name)
                        && per_service.get(*name).copied().unwrap_or(0) < self.config.max_per_service as usize
                })
                .map(|(name, _)| name.clone())
                .collect();
            let fault_seed = self.rng.next_u64();
            if services.is_empty() {
                continue;
            }
            let service = services[self.rng.random_range(0..services.len())].clone();
            let target = Target::Service { name: service.clone() };
            let spec = Inject::from_params("unleash menu", &item.kind, &item.params, target)
                .map(|mut request| {
                    request.options.seed = Some(fault_seed);
                    request.options.id = Some(format!("u-{:08x}", fault_seed as u32));
                    request
                })
                .map_err(|err| err.to_string())
                .and_then(|request| FaultSpec::try_from(request).map_err(|err| err.to_string()));
            let mut spec = match spec {
                Ok(s) => s,
                Err(err) => {
                    warn!(%err, kind = %item.kind, "unleash menu item is invalid");
                    continue;
                }
            };
            spec.origin = ORIGIN.into();
            spec.dry_run |= self.dry_run;
            let _ = self.manager.apply(spec).await;
            self.state.lock().expect("poisoned").rounds += 1;
        }
    }

    fn in_window(&self) -> bool {
        let Some(window) = &self.config.window else { return true };
        let (Some(start), Some(end)) = (parse_hhmm(&window.start), parse_hhmm(&window.end)) else { return true };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        // SAFETY: localtime_r writes into our struct.
        let tm = unsafe {
            let mut tm: libc::tm = std::mem::zeroed();
            let t = now as libc::time_t;
            libc::localtime_r(&t, &mut tm);
            tm
        };
        if window.weekdays_only && (tm.tm_wday == 0 || tm.tm_wday == 6) {
            return false;
        }
        let minute = (tm.tm_hour * 60 + tm.tm_min) as u32;
        if start <= end { (start..end).contains(&minute) } else { minute >= start || minute < end }
    }
}
