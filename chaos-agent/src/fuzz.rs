//! Property-based fuzzing of the inputs an attacker or a careless hand can shape outside the RPC wire (whose
//! fuzzing lives with the codec, in `rpc::value`): the configuration file and the ZooKeeper registration JSON
//! of lymph instances. Nothing may panic; what parses must also pass the checks built on it (access policy,
//! endpoint parsing). `CHAOS_FUZZ_CASES` sets the number of cases per property (default 2000).

use std::path::Path;

use proptest::prelude::*;

use crate::{config::Config, discovery::instance, discovery::zookeeper::parse_registration, rpc::access::Policy};

const SHIPPED_CONFIG: &str = include_str!("../dist/config.yml");

fn cases() -> u32 {
    std::env::var("CHAOS_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)
}

/// Every key the configuration knows, at every level, so generated documents reach deep into the parser.
const KEYS: &[&str] = &[
    "zookeeper",
    "rpc",
    "faults",
    "network",
    "dry_run",
    "unleash",
    "state_dir",
    "events",
    "metrics_listen",
    "bind",
    "port",
    "advertise",
    "allowed_clients",
    "curve_secret_key_file",
    "curve_client_keys",
    "default_lifetime",
    "max_lifetime",
    "max_instance_share",
    "allowed_processes",
    "protected_processes",
    "terminate_grace",
    "disk_paths",
    "allow_memory_filesystems",
    "max_active",
    "max_memory_percent",
    "allow_unbound_ports",
    "enabled",
    "interfaces",
    "ifb",
    "pin_dir",
    "max_packets_per_sec",
    "seed",
    "mean_interval",
    "min_gap",
    "window",
    "start",
    "end",
    "weekdays_only",
    "max_per_service",
    "exclude_services",
    "menu",
    "kind",
    "weight",
    "params",
    "file",
    "max_bytes",
    "keep",
    "memory",
];

fn arb_yaml() -> impl Strategy<Value = yaml_serde::Value> {
    use yaml_serde::Value as Y;
    let leaf = prop_oneof![
        Just(Y::Null),
        any::<bool>().prop_map(Y::Bool),
        any::<i64>().prop_map(|n| Y::Number(n.into())),
        any::<f64>().prop_map(|f| Y::Number(f.into())),
        prop_oneof![
            ".{0,24}",
            "[0-9]{1,4}(ms|s|m|h)?",
            "(::ffff:)?[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9+ ]{0,4})?",
            "[0-9a-f:]{2,20}(/[0-9]{1,3})?",
            "/[a-z./]{0,20}",
            "[0-9]{2}:[0-9]{2}",
        ]
        .prop_map(Y::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Y::Sequence),
            proptest::collection::vec((proptest::sample::select(KEYS), inner), 0..6)
                .prop_map(|kv| { Y::Mapping(kv.into_iter().map(|(k, v)| (Y::String(k.to_owned()), v)).collect()) }),
        ]
    })
}

/// What the agent does with a configuration it accepted, short of starting.
fn use_config(text: &str) {
    if let Ok(config) = Config::from_yaml(text, Path::new("fuzz.yml")) {
        let _ = Policy::from_config(&config.rpc, "127.0.0.1");
        let _ =
            crate::faults::process::Guards::new(&config.faults.protected_processes, &config.faults.allowed_processes);
    }
}

/// What discovery does with a registration node's data.
fn use_registration(data: &[u8]) {
    if let Ok(inst) = parse_registration("Svc", "node", data) {
        let _ = instance::parse_endpoint(&inst.endpoint);
        let _ = instance::endpoint_port(&inst.endpoint);
        let _ = serde_json::to_string(&inst);
    }
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value as J;
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(J::from),
        any::<f64>().prop_map(J::from),
        prop_oneof![".{0,24}", "tcp://[0-9a-z.:\\[\\]]{0,30}:[0-9]{0,6}", "[0-9a-f]{32}"].prop_map(J::String),
    ];
    let fields = proptest::sample::select(
        &[
            "endpoint",
            "identity",
            "id",
            "version",
            "log_endpoint",
            "monitoring_endpoint",
            "backdoor_endpoint",
            "fqdn",
            "hostname",
            "ip",
            "type",
            "other",
        ][..],
    );
    leaf.prop_recursive(3, 32, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(J::Array),
            proptest::collection::vec((fields.clone(), inner), 0..8)
                .prop_map(|kv| J::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        ]
    })
}

const ECHO_REGISTRATION: &str = r#"{"endpoint": "tcp://127.0.0.1:40263", "identity": "8e9cd0312a970c9ebef669296aede987", "log_endpoint": "tcp://127.0.0.1:45679", "backdoor_endpoint": null, "fqdn": "host", "hostname": "host", "ip": "127.0.0.1", "type": "Echo", "version": null}"#;

fn flip(mut bytes: Vec<u8>, flips: &[(prop::sample::Index, u8)]) -> Vec<u8> {
    for (at, byte) in flips {
        if !bytes.is_empty() {
            let i = at.index(bytes.len());
            bytes[i] = *byte;
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn config_text_never_panics(text in ".{0,400}") {
        use_config(&text);
    }

    #[test]
    fn generated_config_documents_never_panic(doc in arb_yaml()) {
        let text = yaml_serde::to_string(&doc).unwrap_or_default();
        use_config(&text);
    }

    #[test]
    fn mutated_shipped_config_never_panics(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let bytes = flip(SHIPPED_CONFIG.as_bytes().to_vec(), &flips);
        use_config(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn registration_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        use_registration(&bytes);
    }

    #[test]
    fn generated_registrations_never_panic(doc in arb_json()) {
        use_registration(doc.to_string().as_bytes());
    }

    #[test]
    fn mutated_registrations_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        use_registration(&flip(ECHO_REGISTRATION.as_bytes().to_vec(), &flips));
    }
}

#[test]
fn the_shipped_config_and_a_real_registration_parse() {
    Config::from_yaml(SHIPPED_CONFIG, Path::new("config.yml")).unwrap();
    let inst = parse_registration("Echo", "n", ECHO_REGISTRATION.as_bytes()).unwrap();
    assert_eq!(inst.port, Some(40263));
}
