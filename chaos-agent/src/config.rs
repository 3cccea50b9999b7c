//! Agent configuration: YAML in the style of lymph's `.lymph.yml`, every field optional with a safe default.
//!
//! Durations are numbers of seconds or strings with a unit (`250ms`, `60s`, `10m`, `1h`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize};

use crate::paths;

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// The YAML is invalid.
    #[error("invalid configuration {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Error.
        source: yaml_serde::Error,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// ZooKeeper of a default lymph deployment.
pub(crate) const DEFAULT_ZOOKEEPER: &str = "127.0.0.1:2181";

/// The whole configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// ZooKeeper hosts (`host:port[,host:port][/chroot]`, chroot `/lymph` by default); lymph's usual
    /// `127.0.0.1:2181` unless configured. Empty (`""`/null) = standalone only. While it is unreachable the agent runs
    /// standalone (local lymph processes) and keeps retrying.
    pub zookeeper: Option<String>,
    /// RPC endpoint settings.
    pub rpc: RpcConfig,
    /// Fault limits and guards.
    pub faults: FaultsConfig,
    /// Network fault settings.
    pub network: NetworkConfig,
    /// Agent-wide dry run: resolve and report, never act.
    pub dry_run: bool,
    /// Random fault schedule.
    pub unleash: UnleashConfig,
    /// Runtime state directory (journal, network state, pid file).
    pub state_dir: PathBuf,
    /// Event log.
    pub events: EventsConfig,
    /// Prometheus endpoint (`127.0.0.1:9464`); off when empty.
    pub metrics_listen: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            zookeeper: Some(DEFAULT_ZOOKEEPER.into()),
            rpc: RpcConfig::default(),
            faults: FaultsConfig::default(),
            network: NetworkConfig::default(),
            dry_run: false,
            unleash: UnleashConfig::default(),
            state_dir: PathBuf::from(paths::STATE_DIR),
            events: EventsConfig::default(),
            metrics_listen: None,
        }
    }
}

/// RPC endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// Address to bind. Default `127.0.0.1` (only this host can command the agent); use the node's address or
    /// `0.0.0.0` to let remote Scenario clients in, together with `allowed_clients`.
    pub bind: String,
    /// Port (fixed so clients find a standalone agent).
    pub port: u16,
    /// Address to advertise in ZooKeeper (defaults to `$LYMPH_NODE_IP`, then the bind address; `0.0.0.0` is
    /// replaced by the host's primary address).
    pub(crate) advertise: Option<String>,
    /// Client networks allowed to connect (CIDR); empty = loopback only, and then `bind` must be a loopback address
    /// (an agent bound elsewhere with neither this nor CURVE refuses to start).
    pub allowed_clients: Vec<String>,
    /// CURVE: path of a file holding the agent's secret key (Z85). When set, clients must use CURVE.
    pub curve_secret_key_file: Option<PathBuf>,
    /// CURVE: Z85 public keys of allowed clients (empty = any client that knows the server key).
    pub(crate) curve_client_keys: Vec<String>,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            bind: "127.0.0.1".into(),
            port: paths::DEFAULT_RPC_PORT,
            advertise: None,
            allowed_clients: Vec::new(),
            curve_secret_key_file: None,
            curve_client_keys: Vec::new(),
        }
    }
}

/// Fault limits and guards.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsConfig {
    /// Lifetime of a fault when the request names none.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub default_lifetime: Duration,
    /// Longest lifetime accepted (longer requests are capped, and say so).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub max_lifetime: Duration,
    /// Largest share (%) of one service's instances a single fault may hit; `None` = no cap.
    pub(crate) max_instance_share: Option<f64>,
    /// Process targets outside lymph instances must match one of these (substring of the command line, or
    /// `/regex/`). Empty = only lymph instances can be targeted.
    pub(crate) allowed_processes: Vec<String>,
    /// Extra processes that are never targeted (same syntax), on top of the built-in guards.
    pub(crate) protected_processes: Vec<String>,
    /// Seconds to wait after SIGTERM before SIGKILL for `terminate` faults.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub(crate) terminate_grace: Duration,
    /// Directories disk faults may fill (a request's `path` must be one of them or lie below one; the first is the
    /// default). Default: `/var/lib/lymph-chaos/fill`, created by the agent (root-only). Empty = no disk faults.
    pub(crate) disk_paths: Vec<PathBuf>,
    /// Allow disk faults on memory-backed filesystems (tmpfs, ramfs): a fill there takes memory, not disk.
    pub(crate) allow_memory_filesystems: bool,
    /// Most faults active at once.
    pub(crate) max_active: usize,
    /// Most memory (% of the machine's total) all memory faults together may hold.
    pub(crate) max_memory_percent: f64,
    /// Allow network faults on ports no local process listens on (e.g. a remote peer's port).
    pub(crate) allow_unbound_ports: bool,
}

impl Default for FaultsConfig {
    fn default() -> Self {
        FaultsConfig {
            default_lifetime: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(3600),
            max_instance_share: None,
            allowed_processes: Vec::new(),
            protected_processes: Vec::new(),
            terminate_grace: Duration::from_secs(5),
            disk_paths: vec![PathBuf::from(paths::DISK_FILL_DIR)],
            allow_memory_filesystems: false,
            max_active: 64,
            max_memory_percent: 50.0,
            allow_unbound_ports: false,
        }
    }
}

/// Network faults.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Allow network faults (`--no-network-control` turns this off).
    pub enabled: bool,
    /// Interfaces to attach to; empty = every interface that is up.
    pub(crate) interfaces: Vec<String>,
    /// Our IFB device's name.
    pub ifb: String,
    /// bpffs directory for our pinned maps.
    pub pin_dir: PathBuf,
    /// Highest packet rate through one fault (sizes netem's queue).
    pub(crate) max_packets_per_sec: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            enabled: true,
            interfaces: Vec::new(),
            ifb: "lchaos0".into(),
            pin_dir: PathBuf::from(paths::BPF_PIN_DIR),
            max_packets_per_sec: 1_000_000,
        }
    }
}

/// One entry of the unleashed menu: a fault template (the same keys as `Chaos.inject`, minus the target).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct MenuItem {
    /// `kill`, `terminate`, `pause`, `latency`, `loss`, `blackhole`, `rate`, `duplicate`, `corrupt`, `reorder`.
    pub(crate) kind: String,
    /// Relative weight (default 1).
    #[serde(default = "one")]
    pub(crate) weight: f64,
    /// Parameters (as for `Chaos.inject`).
    #[serde(default)]
    pub(crate) params: serde_json::Map<String, serde_json::Value>,
}

fn one() -> f64 {
    1.0
}

/// Random fault schedule (Chaos Monkey's random mode).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnleashConfig {
    /// Start unleashed.
    pub enabled: bool,
    /// Seed (random when empty; always recorded).
    pub(crate) seed: Option<u64>,
    /// Mean time between faults.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub(crate) mean_interval: Duration,
    /// Minimum time between faults.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub(crate) min_gap: Duration,
    /// Only act between these local times (`"09:00"`–`"15:00"`); empty = any time.
    pub(crate) window: Option<TimeWindow>,
    /// At most this many active unleashed faults per service.
    pub(crate) max_per_service: u32,
    /// Services never chosen.
    pub(crate) exclude_services: Vec<String>,
    /// Faults to choose from.
    pub(crate) menu: Vec<MenuItem>,
}

impl Default for UnleashConfig {
    fn default() -> Self {
        UnleashConfig {
            enabled: false,
            seed: None,
            mean_interval: Duration::from_secs(600),
            min_gap: Duration::from_secs(60),
            window: None,
            max_per_service: 1,
            exclude_services: Vec::new(),
            menu: vec![MenuItem { kind: "kill".into(), weight: 1.0, params: Default::default() }],
        }
    }
}

/// A daily time window.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct TimeWindow {
    /// Start, `HH:MM` local time.
    pub(crate) start: String,
    /// End, `HH:MM` local time.
    pub(crate) end: String,
    /// Monday to Friday only.
    #[serde(default)]
    pub(crate) weekdays_only: bool,
}

/// Event log.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// JSON lines file; empty = memory only.
    pub file: Option<PathBuf>,
    /// Rotate when the file reaches this size.
    pub(crate) max_bytes: u64,
    /// Rotated files kept (`events.jsonl.1` …).
    pub(crate) keep: u32,
    /// Events kept in memory for `Chaos.events`.
    pub(crate) memory: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig { file: Some(PathBuf::from(paths::EVENTS_FILE)), max_bytes: 10 << 20, keep: 3, memory: 10_000 }
    }
}

impl Config {
    /// Reads a YAML file.
    ///
    /// # Errors
    /// Unreadable file, invalid YAML, unknown keys, out-of-range values.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_yaml(&text, path)
    }

    /// Parses and validates configuration text (`path` names it in errors).
    ///
    /// # Errors
    /// Invalid YAML, unknown keys, out-of-range values.
    pub(crate) fn from_yaml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            yaml_serde::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?
        };
        // `zookeeper: ""` means standalone, like null.
        config.zookeeper = config.zookeeper.filter(|z| !z.trim().is_empty());
        config.validate()?;
        Ok(config)
    }

    /// Checks value ranges.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.faults.default_lifetime.is_zero() || self.faults.default_lifetime > self.faults.max_lifetime {
            return Err(ConfigError::Invalid(
                "faults.default_lifetime must be above 0 and at most faults.max_lifetime".into(),
            ));
        }
        if let Some(share) = self.faults.max_instance_share
            && (!(0.0..=100.0).contains(&share) || share == 0.0)
        {
            return Err(ConfigError::Invalid("faults.max_instance_share is a percentage in (0, 100]".into()));
        }
        if self.faults.max_active == 0 {
            return Err(ConfigError::Invalid("faults.max_active must be at least 1".into()));
        }
        if !(self.faults.max_memory_percent > 0.0 && self.faults.max_memory_percent <= 100.0) {
            return Err(ConfigError::Invalid("faults.max_memory_percent is a percentage in (0, 100]".into()));
        }
        if let Some(p) = self
            .faults
            .disk_paths
            .iter()
            .find(|p| !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)))
        {
            return Err(ConfigError::Invalid(format!(
                "faults.disk_paths: {} must be an absolute path without `..`",
                p.display()
            )));
        }
        if self.unleash.mean_interval.is_zero() {
            return Err(ConfigError::Invalid("unleash.mean_interval must be above 0".into()));
        }
        if self.unleash.menu.iter().any(|m| m.weight <= 0.0 || m.weight.is_nan()) {
            return Err(ConfigError::Invalid("unleash.menu weights must be positive".into()));
        }
        for net in &self.rpc.allowed_clients {
            parse_cidr(net).ok_or_else(|| {
                ConfigError::Invalid(format!("rpc.allowed_clients: `{net}` is not an address or CIDR"))
            })?;
        }
        if let Some(w) = &self.unleash.window {
            parse_hhmm(&w.start)
                .zip(parse_hhmm(&w.end))
                .ok_or_else(|| ConfigError::Invalid("unleash.window times are HH:MM".into()))?;
        }
        Ok(())
    }

    /// Applies lymph's environment when the agent runs under `lymph node`: `LYMPH_NODE_IP` is the address to
    /// advertise (and bind, unless configured).
    pub fn apply_lymph_env(&mut self) {
        if let Ok(ip) = std::env::var("LYMPH_NODE_IP")
            && !ip.is_empty()
            && self.rpc.advertise.is_none()
        {
            self.rpc.advertise = Some(ip.clone());
            if self.rpc.bind == "127.0.0.1" {
                self.rpc.bind = ip;
            }
        }
    }

    /// Path of a file in the state directory.
    pub(crate) fn state_file(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }
}

/// Parses `HH:MM` into minutes after midnight.
pub(crate) fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Parses `a.b.c.d`, `a.b.c.d/n`, `::1`, `fe80::/10`.
pub(crate) fn parse_cidr(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, len) = match s.split_once('/') {
        // Digits only (no sign, no spaces), at most 3 of them.
        Some((a, l)) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => {
            (a, Some(l.parse::<u8>().ok()?))
        }
        Some(_) => return None,
        None => (s, None),
    };
    let ip: std::net::IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    // An IPv4-mapped IPv6 network must keep its 96-bit prefix (`::ffff:10.0.0.0/104` = 10.0.0.0/8).
    if let std::net::IpAddr::V6(v6) = ip
        && v6.to_ipv4_mapped().is_some()
        && len < 96
    {
        return None;
    }
    (len <= max).then_some((ip, len))
}

pub(crate) use chaos_api::units::parse_duration;

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(f64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Num(n) => Duration::try_from_secs_f64(n).map_err(serde::de::Error::custom),
        Raw::Text(t) => parse_duration(&t)
            .ok_or_else(|| serde::de::Error::custom(format!("`{t}` is not a duration (e.g. 30s, 10m)"))),
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_defaults_are_safe() {
        let yaml = r#"
zookeeper: 127.0.0.1:2181
rpc:
  bind: 127.0.0.1
  allowed_clients: [127.0.0.0/8]
faults:
  default_lifetime: 30s
  max_lifetime: 10m
  allowed_processes: ["/postgres: .*/"]
unleash:
  mean_interval: 10m
  min_gap: 90
  window: {start: "09:00", end: "15:00", weekdays_only: true}
  menu:
    - kind: kill
    - kind: latency
      weight: 2
      params: {latency: 0.2, lifetime: 30}
"#;
        let c: Config = yaml_serde::from_str(yaml).unwrap();
        c.validate().unwrap();
        assert_eq!(c.faults.default_lifetime, Duration::from_secs(30));
        assert_eq!(c.unleash.min_gap, Duration::from_secs(90));
        assert_eq!(c.unleash.menu.len(), 2);
        let d = Config::default();
        assert_eq!(d.rpc.bind, "127.0.0.1");
        assert!(!d.dry_run && !d.unleash.enabled);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(yaml_serde::from_str::<Config>("zookeper: x").is_err());
        let c: Config = yaml_serde::from_str("faults: {default_lifetime: 2h, max_lifetime: 1h}").unwrap();
        assert!(c.validate().is_err());
        assert!(yaml_serde::from_str::<Config>("faults: {default_lifetime: soon}").is_err());
    }

    #[test]
    fn durations_and_networks() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_cidr("10.0.0.0/8").map(|c| c.1), Some(8));
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert_eq!(parse_hhmm("09:30"), Some(570));
    }
}
