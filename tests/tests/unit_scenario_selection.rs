//! The Rust and the Python `Scenario` clients select the same instances: for the same registry view, action and seed,
//! `chaos_agent::scenario::plan` and `lymph_chaos.scenario.plan` give the same requests (agent, keyword arguments,
//! fault ids) or fail with the same error. `chaos_api::selection` defines the selection; this test is what keeps
//! the Python mirror of it honest.
//!
//! No ZooKeeper, agents or root: the views are what `Chaos.list_services` answers (several agents, several services,
//! hosts with 1 to 4 instances, plus the quirks of real listings), and Python runs as a child process
//! (`/usr/bin/python3` when present, else `python3`; stdlib only: `plan()` needs neither pyzmq, msgpack nor kazoo,
//! so the driver loads `lymph_chaos.scenario` without the package's `__init__`, which imports the RPC layer).
//!
//! By hand: `cargo test -p chaos-tests --test unit_scenario_selection`.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};
use chaos_agent::{
    scenario::{self, ScenarioError},
    selection::{self, SelectionError},
};
use serde_json::{Map, Value as Json, json};

/// Reads cases as JSON on stdin, answers one result per case on stdout (same shape as [`rust_result`]).
const DRIVER: &str = r#"
import json, sys, types

# The package's __init__ imports the RPC layer (msgpack, pyzmq); plan() needs neither.
package = types.ModuleType("lymph_chaos")
package.__path__ = [sys.argv[1]]
sys.modules["lymph_chaos"] = package
from lymph_chaos import scenario
from lymph_chaos.errors import ChaosError

data = json.load(sys.stdin)
out = {"plans": [], "seeds": []}
for case in data["cases"]:
    action = scenario.Action(case["method"], case["name"], case["params"], case["id"])
    try:
        requests = scenario.plan(action, data["views"][case["view"]], case["seed"])
        out["plans"].append({"requests": [[agent, kwargs] for agent, kwargs in requests]})
    except ChaosError as err:
        out["plans"].append({"error": type(err).__name__})
for seed, index, round_index, method, params in data["seeds"]:
    action = scenario.Action(method, "Echo", params, "x")
    out["seeds"].append(str(scenario.round_seed(seed, index, round_index, action)))
json.dump(out, sys.stdout)
"#;

const AGENTS: [&str; 4] = ["tcp://10.0.0.1:4575", "tcp://10.0.0.2:4575", "tcp://10.0.0.3:4575", "tcp://10.0.0.4:4575"];

/// Instances per host (index into [`AGENTS`]; 4 = a host without agent) of each service.
const SERVICES: &[(&str, &[(usize, usize)])] = &[
    ("Echo", &[(0, 3), (1, 1), (2, 4)]),
    ("Demo", &[(0, 1), (3, 2)]),
    ("Upper", &[(2, 1)]),
    // Registered, but on a host without agent.
    ("Lonely", &[(4, 2)]),
    // Differ only in case: `cache` is ambiguous, `Cache` is not.
    ("Cache", &[(1, 1)]),
    ("CACHE", &[(3, 1)]),
];

/// What every agent answers to `Chaos.list_services`: every registration of every service, `local` where it runs on
/// that agent's host; instance ids are hex strings whose order does not follow the hosts.
fn registry() -> Map<String, Json> {
    let mut registrations = Vec::new();
    for (service, hosts) in SERVICES {
        for (host, count) in *hosts {
            for n in 0..*count {
                let id = format!("{:016x}", selection::derive_seed(registrations.len() as u64, 0x1d));
                registrations.push((*service, *host, n, id));
            }
        }
    }
    AGENTS
        .iter()
        .enumerate()
        .map(|(agent_host, agent)| {
            let mut services = Map::new();
            for (service, host, n, id) in &registrations {
                let local = *host == agent_host;
                let entry = json!({
                    "service": service, "id": id, "identity": format!("identity-{host}-{n}"),
                    "endpoint": format!("tcp://10.0.0.{}:{}", host + 1, 5000 + n), "hostname": format!("host{host}"),
                    "source": "zookeeper", "local": local, "pid": if local { json!(1000 + n) } else { Json::Null },
                    "port": 5000 + n, "listening": local,
                });
                services.entry(service.to_string()).or_insert_with(|| json!([])).as_array_mut().unwrap().push(entry);
            }
            (agent.to_string(), Json::Object(services))
        })
        .collect()
}

/// The quirks of real listings: an instance two agents list as local (two agents on one host), one without id, one
/// with a numeric id, one whose `local` is truthy but not `true`.
fn quirky_registry() -> Map<String, Json> {
    let inst =
        |id: Json, local: Json| json!({"id": id, "identity": "x", "endpoint": "tcp://10.0.0.9:1", "local": local});
    let mut view = registry();
    let echo = |view: &mut Map<String, Json>, agent: usize| -> Vec<Json> {
        view[AGENTS[agent]]["Echo"].as_array().cloned().unwrap()
    };
    let first_on_c = echo(&mut view, 2).into_iter().find(|i| i["local"] == true).unwrap();
    let mut on_b = echo(&mut view, 1);
    on_b.push(first_on_c);
    on_b.push(inst(Json::Null, json!(true)));
    on_b.push(inst(json!(17), json!(true)));
    on_b.push(inst(json!("ffff"), json!(1)));
    view[AGENTS[1]]["Echo"] = Json::Array(on_b);
    view
}

/// Every method/kind, every way to say how many (valid or not), names that resolve or do not.
fn cases() -> Vec<Json> {
    let kinds: &[(&str, Json)] = &[
        ("kill", json!({})),
        ("kill", json!({"signal": "SIGTERM", "deregister": true})),
        ("terminate", json!({})),
        ("pause", json!({"lifetime": 3})),
        ("inject_latency", json!({"latency": 0.1, "lifetime": 5})),
        ("inject", json!({"kind": "loss", "loss": 5})),
        ("inject", json!({"kind": "cpu", "load": 50})),
        ("inject", json!({"kind": "kill"})),
        ("inject", json!({"kind": "pause", "lifetime": 2})),
    ];
    // (options, whether they are valid: invalid ones fail whatever the seed, so two seeds do for them).
    let amounts = [
        json!({}),
        json!({"count": 1}),
        json!({"count": 2}),
        json!({"count": 3}),
        json!({"count": 100}),
        json!({"percent": 1}),
        json!({"percent": 33.3}),
        json!({"percent": 50}),
        json!({"percent": 100}),
        json!({"all": true}),
        json!({"all": false}),
        json!({"count": null}),
    ]
    .map(|a| (a, true))
    .into_iter()
    .chain(
        [
            json!({"count": 0}),
            json!({"count": -1}),
            json!({"percent": 0}),
            json!({"percent": 120}),
            json!({"count": 1, "percent": 5}),
            json!({"percent": 5, "all": true}),
            json!({"count": 2.0}),
            json!({"count": "2"}),
            json!({"all": 1}),
        ]
        .map(|a| (a, false)),
    );
    let names = ["Echo", "echo", "Demo", "Upper", "Lonely", "cache", "Cache", "Nope"];
    let seeds: Vec<u64> = (0..9).chain([u64::MAX, 1 << 63, 0x9E37_79B9_7F4A_7C15]).collect();
    let mut cases = Vec::new();
    for view in [0, 1] {
        for (method, params) in kinds {
            for (amount, valid) in amounts.clone() {
                let mut params = params.as_object().cloned().unwrap();
                params.extend(amount.as_object().cloned().unwrap());
                for name in names {
                    for seed in if valid { &seeds[..] } else { &seeds[seeds.len() - 2..] } {
                        cases.push(json!({
                            "view": view, "method": method, "name": name, "params": params,
                            "id": format!("sn-cross-{}", cases.len() % 7), "seed": seed,
                        }));
                    }
                }
            }
        }
    }
    cases
}

/// The round seeds asked of both sides: (scenario seed, action index, round, method, params).
fn seed_cases() -> Vec<Json> {
    let mut out = Vec::new();
    for seed in [0, 1, 42, u64::MAX] {
        for index in 0..3 {
            for round in [0u64, 1, 2, 1000] {
                out.push(json!([seed, index, round, "kill", {}]));
                out.push(json!([seed, index, round, "pause", {"lifetime": 1}]));
                out.push(json!([seed, index, round, "inject", {"kind": "terminate"}]));
                out.push(json!([seed, index, round, "inject", {"kind": "loss", "seed": 7}]));
            }
        }
    }
    out
}

/// The Rust client's answer for one case, in the shape the driver prints.
fn rust_result(case: &Json, views: &[Map<String, Json>]) -> Json {
    let params = case["params"].as_object().unwrap();
    let seed = case["seed"].as_u64().unwrap();
    let view = &views[case["view"].as_u64().unwrap() as usize];
    let name = case["name"].as_str().unwrap();
    match scenario::plan(case["method"].as_str().unwrap(), name, params, case["id"].as_str().unwrap(), view, seed) {
        Ok(requests) => json!({"requests": requests.into_iter().map(|(a, kw)| json!([a, kw])).collect::<Vec<_>>()}),
        Err(ScenarioError::Selection(err)) => json!({"error": match err {
            // The Python client raises UnknownService for both.
            SelectionError::UnknownService { .. } | SelectionError::AmbiguousService { .. } => "UnknownService",
            SelectionError::NoAgentForService { .. } => "NoAgentForService",
            SelectionError::BadArguments(_) => "BadArguments",
            SelectionError::InvalidArgument(_) => "InvalidArgument",
        }}),
        Err(other) => panic!("plan() is pure, yet: {other}"),
    }
}

fn python() -> PathBuf {
    let system = Path::new("/usr/bin/python3");
    if system.exists() { system.to_owned() } else { PathBuf::from("python3") }
}

fn run_python(input: &Json) -> Result<Json> {
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../chaos-agent/python/src/lymph_chaos");
    let mut child = Command::new(python())
        .args(["-c", DRIVER])
        .arg(&package)
        // Nothing written into the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", python().display()))?;
    // A driver that dies early closes its stdin: its stderr says why, so look at that first.
    let written = child.stdin.take().unwrap().write_all(input.to_string().as_bytes());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the Python driver failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    written.context("cannot write the cases to the Python driver")?;
    serde_json::from_slice(&out.stdout).context("the Python driver's output is no JSON")
}

#[test]
fn rust_and_python_scenarios_select_the_same_instances() -> Result<()> {
    let views = vec![registry(), quirky_registry()];
    let cases = cases();
    let seeds = seed_cases();
    let python = run_python(&json!({"views": views, "cases": cases, "seeds": seeds}))?;

    let plans = python["plans"].as_array().context("no plans")?;
    ensure!(plans.len() == cases.len(), "{} answers for {} cases", plans.len(), cases.len());
    let mut mismatches = Vec::new();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for (case, from_python) in cases.iter().zip(plans) {
        let from_rust = rust_result(case, &views);
        let outcome = match (&from_rust["error"], from_rust["requests"].as_array()) {
            (Json::String(e), _) => e.clone(),
            (_, Some(r)) if r.iter().any(|r| r[1].get("instance").is_some()) => {
                format!("{} instance request(s)", r.len())
            }
            (_, Some(r)) => format!("{} per-host request(s)", r.len()),
            _ => unreachable!(),
        };
        *outcomes.entry(outcome).or_default() += 1;
        if from_rust != *from_python {
            mismatches.push(format!("{case}\n  rust:   {from_rust}\n  python: {from_python}"));
        }
    }
    println!("{} cases: {outcomes:#?}", cases.len());
    ensure!(
        mismatches.is_empty(),
        "{} of {} cases differ; the first ones:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );

    // Every path of the selection was taken (else agreeing would prove little).
    for outcome in ["UnknownService", "NoAgentForService", "BadArguments", "InvalidArgument", "1 instance request(s)"] {
        ensure!(outcomes.contains_key(outcome), "no case ended in {outcome}: {outcomes:?}");
    }
    for outcome in ["8 instance request(s)", "2 per-host request(s)", "3 per-host request(s)", "4 instance request(s)"]
    {
        ensure!(outcomes.contains_key(outcome), "no case ended in {outcome}: {outcomes:?}");
    }
    // ... and the seed matters: over the 12 seeds the default kill hits each of Echo's 8 instances (deterministic).
    let hit: std::collections::BTreeSet<String> = cases
        .iter()
        .filter(|c| c["view"] == 0 && c["method"] == "kill" && c["name"] == "Echo" && c["params"] == json!({}))
        .map(|c| rust_result(c, &views)["requests"][0][1]["instance"].to_string())
        .collect();
    ensure!(hit.len() == 8, "the default kill hit only {} of Echo's 8 instances over the seeds", hit.len());

    // The seeds each action selects with, round after round.
    let python_seeds = python["seeds"].as_array().context("no seeds")?;
    ensure!(python_seeds.len() == seeds.len(), "{} seeds for {} cases", python_seeds.len(), seeds.len());
    for (case, from_python) in seeds.iter().zip(python_seeds) {
        let (seed, index, round) = (case[0].as_u64().unwrap(), case[1].as_u64().unwrap(), case[2].as_u64().unwrap());
        let from_rust =
            scenario::round_seed(seed, index as usize, round, case[3].as_str().unwrap(), case[4].as_object().unwrap());
        ensure!(
            from_python.as_str() == Some(&from_rust.to_string()),
            "seed {case}: rust {from_rust}, python {from_python}"
        );
    }
    Ok(())
}
