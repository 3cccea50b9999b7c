//! The files `cargo xtask install` and `cargo xtask deb` ship (chaos-agent/dist/): the default configuration parses
//! with `Config::load`, names every key the agent knows, and keeps the safe defaults; the systemd unit runs the
//! agent on that file.

use std::path::{Path, PathBuf};

use chaos_agent::{config::Config, paths};
use yaml_serde::Value;

fn dist(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist").join(name)
}

/// Every key path of a YAML mapping (`rpc.bind`, `unleash.menu` …); sequences are leaves.
fn key_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Mapping(m) = v {
        for (k, v) in m {
            let key = format!("{prefix}{}", k.as_str().unwrap_or("?"));
            out.push(key.clone());
            key_paths(v, &format!("{key}."), out);
        }
    }
}

#[test]
fn the_shipped_config_loads_and_is_safe() {
    let config = Config::load(&dist("config.yml")).expect("chaos-agent/dist/config.yml must load");
    // Only this host can command a freshly installed agent, and only over loopback.
    assert_eq!(config.rpc.bind, "127.0.0.1");
    assert_eq!(config.rpc.port, paths::DEFAULT_RPC_PORT);
    assert_eq!(config.rpc.allowed_clients, vec!["127.0.0.0/8".to_owned(), "::1".to_owned()]);
    assert!(config.rpc.curve_secret_key_file.is_none());
    // ZooKeeper is left to the lymph node's configuration or the built-in default: the file must not name it
    // (a `zookeeper:` key, even null, would override the node's hosts).
    assert_eq!(config.zookeeper, Config::default().zookeeper);
    let shipped: Value = yaml_serde::from_str(&std::fs::read_to_string(dist("config.yml")).unwrap()).unwrap();
    assert!(shipped.get("zookeeper").is_none(), "zookeeper must stay commented out in the shipped config");
    // Nothing happens by itself: no unleashed mode, and faults always expire.
    assert!(!config.unleash.enabled);
    assert!(!config.dry_run, "dry_run: false is the documented choice (the agent only acts on explicit requests)");
    assert!(config.faults.default_lifetime <= config.faults.max_lifetime);
    assert!(config.metrics_listen.is_none(), "no listening port besides RPC unless asked for");
    // The paths the installer and the unit rely on.
    assert_eq!(config.state_dir, Path::new(paths::STATE_DIR));
    assert_eq!(config.events.file.as_deref(), Some(Path::new(paths::EVENTS_FILE)));
    assert_eq!(config.network.pin_dir, Path::new(paths::BPF_PIN_DIR));
}

#[test]
fn the_shipped_config_names_every_key_the_agent_knows() {
    let shipped: Value = yaml_serde::from_str(&std::fs::read_to_string(dist("config.yml")).unwrap()).unwrap();
    let defaults = yaml_serde::to_value(Config::default()).unwrap();
    let (mut want, mut have) = (Vec::new(), Vec::new());
    key_paths(&defaults, "", &mut want);
    key_paths(&shipped, "", &mut have);
    let text = std::fs::read_to_string(dist("config.yml")).unwrap();
    // A key may be documented commented out (`# zookeeper: 127.0.0.1:2181`) when setting it changes behaviour.
    let commented = |key: &str| {
        let leaf = key.rsplit('.').next().unwrap_or(key);
        text.lines()
            .any(|l| l.trim_start().strip_prefix('#').is_some_and(|c| c.trim_start().starts_with(&format!("{leaf}:"))))
    };
    let missing: Vec<&String> = want.iter().filter(|k| !have.contains(k) && !commented(k)).collect();
    assert!(missing.is_empty(), "keys missing from chaos-agent/dist/config.yml (document them there): {missing:?}");
}

#[test]
fn the_unit_runs_the_agent_on_the_shipped_config_and_stops_it_with_sigterm() {
    let unit = std::fs::read_to_string(dist("lymph-chaos.service")).unwrap();
    let line = |key: &str| unit.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned);
    assert_eq!(line("ExecStart").as_deref(), Some(format!("@BINARY@ agent --config {}", paths::CONFIG_FILE).as_str()));
    assert_eq!(line("KillSignal").as_deref(), Some("SIGTERM"));
    assert_eq!(line("Restart").as_deref(), Some("on-failure"));
    assert_eq!(line("User").as_deref(), Some("root"));
    let stop = line("TimeoutStopSec").expect("TimeoutStopSec");
    let secs: u64 = stop.trim_end_matches('s').parse().expect("TimeoutStopSec in seconds");
    assert!(secs >= 15, "cleanup needs time: TimeoutStopSec={stop}");
}
