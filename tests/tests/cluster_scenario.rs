//! Cluster-wide `Scenario` semantics on three hosts (network namespaces on a bridge, [`chaos_tests::cluster`]):
//! real lymph 0.15 `Echo` instances on hosts B and C, one agent per host, every client on host A, which runs no
//! `Echo`.
//!
//! - a kill hits ONE instance of the whole cluster; `count`, `percent`, `all` count over the cluster; the Rust and
//!   the Python `Scenario` pick the same instance ids for the same seed (the rules of `chaos_api::selection`);
//! - `Scenario.events()` (Rust, Python) and `lymph-chaos events --cluster` show one log ordered by time, every event
//!   with its host;
//! - an agent that is down (stopped by pid) is reported with its host by both clients and the CLI, while the others
//!   still act.
//!
//! By hand: `cargo xtask test --tier cluster -- cluster_scenario`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use chaos_agent::scenario::{Scenario, ScenarioError};
use chaos_test_support::{eventually, proc_stat::ProcStat};
use chaos_tests::{
    agent::agent_bin,
    cluster::{Cluster, ClusterAgent, Host, python_scenario, wait_local_pids},
    lymph::{self, Instance, InstanceOptions},
};
use serde_json::{Value as Json, json};

/// How long the Python client may run (interpreter start, ZooKeeper, a few scenarios).
const PYTHON_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a killed instance may take to exit.
const KILL_EXIT: Duration = Duration::from_secs(5);

/// Whether a process has exited (gone, or a zombie waiting for its parent).
fn exited(pid: u32) -> bool {
    ProcStat::read(pid as i32).is_none_or(|p| p.state == 'Z' || p.state == 'X')
}

/// The instance ids a round's answers name (every answer's `instances`), sorted.
fn picked(answers: &[Json]) -> Vec<String> {
    let mut ids: Vec<String> = answers
        .iter()
        .flat_map(|a| a["instances"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i.as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

/// The Rust `Scenario` on host A: queues `kill_with("Echo", options)`, applies it once with `seed`.
fn rust_kill(a: &Host, zk: &str, seed: u64, options: &Json, dry_run: bool) -> Result<Vec<Json>> {
    let (zk, options) = (zk.to_owned(), options.clone());
    a.block_on(|| async move {
        let mut sn = Scenario::from_zookeeper(&zk).await?;
        sn.seed(seed).dry_run(dry_run).kill_with("Echo", options);
        Ok(sn.apply().await?)
    })
}

/// `lymph discover --json` on `host`: service → instance id → endpoint.
fn discover(host: &Host) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
    Ok(lymph::discover(&host.lymph)?
        .into_iter()
        .map(|(service, instances)| {
            let ids = instances
                .iter()
                .filter_map(|i| Some((i["id"].as_str()?.to_owned(), i["endpoint"].as_str()?.to_owned())))
                .collect();
            (service, ids)
        })
        .collect())
}

/// Checks one merged event log: ordered by time, every event with an `agent` and its `host`, and events from every
/// host in `hosts`.
fn check_merged_log(who: &str, events: &[Json], agents: &[&ClusterAgent]) -> Result<()> {
    let times: Vec<f64> = events.iter().map(|e| e["time"].as_f64().unwrap_or(f64::NAN)).collect();
    ensure!(times.windows(2).all(|w| w[0] <= w[1]), "{who}: the log is not ordered by time: {times:?}");
    let host_of: BTreeMap<&str, &str> = agents.iter().map(|a| (a.endpoint.as_str(), a.host.as_str())).collect();
    for e in events {
        let agent = e["agent"].as_str().unwrap_or("");
        ensure!(
            host_of.get(agent).is_some_and(|h| e["host"] == *h),
            "{who}: an event without its agent's host: {e} (agents: {host_of:?})"
        );
    }
    let hosts: BTreeSet<&str> = events.iter().filter_map(|e| e["host"].as_str()).collect();
    let want: BTreeSet<&str> = agents.iter().map(|a| a.host.as_str()).collect();
    ensure!(hosts == want, "{who}: events from hosts {hosts:?}, want every agent's {want:?}");
    Ok(())
}

/// The applied kills of a merged log: (host, pids).
fn kills(events: &[Json]) -> Vec<(String, Vec<u64>)> {
    events
        .iter()
        .filter(|e| e["action"] == "applied" && e["kind"] == "kill")
        .map(|e| {
            let pids = e["pids"].as_array().into_iter().flatten().filter_map(Json::as_u64).collect();
            (e["host"].as_str().unwrap_or("").to_owned(), pids)
        })
        .collect()
}

#[test]
#[ignore = "needs ZooKeeper, the lymph venv and root: run by cargo xtask test --tier cluster"]
fn cluster_kill_selects_over_the_whole_cluster_and_both_clients_agree() -> Result<()> {
    let started = Instant::now();
    let cluster = Cluster::new("cluster-kill", &["A", "B", "C"])?;
    let (a, b, c) = (cluster.host("A"), cluster.host("B"), cluster.host("C"));
    let echo = InstanceOptions::default();
    let instances: Vec<(&Host, Instance<'_>)> =
        vec![(b, b.start_instance(&echo)?), (b, b.start_instance(&echo)?), (c, c.start_instance(&echo)?)];
    let agents = cluster.start_agents()?;
    let [agent_a, agent_b, agent_c] = [&agents[0], &agents[1], &agents[2]];
    wait_local_pids(agent_b, "Echo", &[instances[0].1.pid(), instances[1].1.pid()])?;
    wait_local_pids(agent_c, "Echo", &[instances[2].1.pid()])?;
    wait_local_pids(agent_a, "Echo", &[])?;
    eprintln!("cluster up in {:.1?}", started.elapsed());

    // The registry as the real lymph CLI sees it from host A: every instance and agent with its host's address.
    let registry = discover(a)?;
    let echo_ids = registry.get("Echo").cloned().unwrap_or_default();
    let by_endpoint: BTreeMap<&str, (&Host, u32)> =
        instances.iter().map(|(h, i)| (i.endpoint(), (*h, i.pid()))).collect();
    ensure!(echo_ids.len() == 3, "lymph discover on A lists {echo_ids:?}");
    // instance id → (host, pid)
    let mut where_is: BTreeMap<String, (String, u32)> = BTreeMap::new();
    for (id, endpoint) in &echo_ids {
        let (host, pid) = by_endpoint.get(endpoint.as_str()).ok_or_else(|| anyhow!("unknown Echo {endpoint}"))?;
        ensure!(endpoint.starts_with(&format!("tcp://{}:", host.addr)), "Echo {endpoint} not on its host's address");
        where_is.insert(id.clone(), (host.name.clone(), *pid));
    }
    let chaos: BTreeSet<String> = registry.get("Chaos").map(|c| c.values().cloned().collect()).unwrap_or_default();
    let advertised: BTreeSet<String> = agents.iter().map(|a| a.endpoint.clone()).collect();
    ensure!(chaos == advertised, "Chaos agents in ZooKeeper {chaos:?}, want {advertised:?}");

    // Dry runs: how many instances each amount selects over the cluster, and that the Rust and the Python client
    // pick the same instance ids for the same seed.
    let zk = cluster.zk_hosts();
    // The default kill over 24 seeds (it must land on both hosts: all on B by chance is (2/3)^24 ≈ 6e-5), every
    // other amount over 4.
    let amounts = [(json!({"count": 2}), 2), (json!({"percent": 50}), 2), (json!({"all": true}), 3)];
    let mut cases: Vec<(u64, Json, usize)> = (1..=24).map(|seed| (seed, json!({}), 1)).collect();
    cases.extend((1..=4).flat_map(|seed| amounts.iter().map(move |(o, n)| (seed, o.clone(), *n))));
    let mut runs = Vec::new();
    let mut rust_picks = Vec::new();
    for (seed, options, _) in &cases {
        rust_picks.push(picked(&rust_kill(a, &zk, *seed, options, true)?));
        runs.push(json!({"seed": seed, "actions": [{"method": "kill", "service": "Echo", "params": options}]}));
    }
    let python = python_scenario(a, &json!({"zookeeper": zk, "dry_run": true, "runs": runs}), PYTHON_TIMEOUT)?;
    let python_runs = python["runs"].as_array().cloned().unwrap_or_default();
    ensure!(python_runs.len() == runs.len(), "python answered {python}");
    let mut default_hosts = BTreeSet::new();
    for ((rust, py), (seed, options, want)) in rust_picks.iter().zip(&python_runs).zip(&cases) {
        let py_reports = py["reports"].as_array().cloned().ok_or_else(|| anyhow!("python seed {seed}: {py}"))?;
        let py_picked = picked(&py_reports);
        ensure!(
            rust == &py_picked,
            "seed {seed}, kill {options}: Rust picked {rust:?}, Python {py_picked:?} (instances {where_is:?})"
        );
        ensure!(
            rust.len() == *want && rust.iter().all(|id| where_is.contains_key(id)),
            "seed {seed}, kill {options}: picked {rust:?}, want {want} of the cluster's {where_is:?}"
        );
        if options.as_object().is_some_and(serde_json::Map::is_empty) {
            default_hosts.insert(where_is[&rust[0]].0.clone());
        }
    }
    println!("dry runs: Rust and Python picked the same instances in all {} cases", cases.len());
    ensure!(
        default_hosts.len() == 2,
        "over 24 seeds the single kill always landed on host(s) {default_hosts:?}: not uniform over the cluster"
    );

    // A real kill from the Rust client: exactly the one instance its dry run named dies, in the whole cluster.
    let seed = 3;
    let expected = picked(&rust_kill(a, &zk, seed, &json!({}), true)?);
    let answers = rust_kill(a, &zk, seed, &json!({}), false)?;
    ensure!(picked(&answers) == expected, "the kill hit {:?}, its dry run named {expected:?}", picked(&answers));
    let first = where_is[&expected[0]].1;
    eventually(format_args!("Echo pid {first} to exit"), KILL_EXIT, Duration::from_millis(20), || exited(first))?;
    std::thread::sleep(Duration::from_millis(500));
    let alive: Vec<u32> = instances.iter().map(|(_, i)| i.pid()).filter(|p| !exited(*p)).collect();
    ensure!(alive.len() == 2, "a default kill must end ONE instance of the cluster; alive now: {alive:?}");
    println!("Rust kill: pid {first} on host {} died, {alive:?} alive", where_is[&expected[0]].0);
    for (agent, host) in [(agent_b, b), (agent_c, c)] {
        let pids: Vec<u32> =
            instances.iter().filter(|(h, i)| h.name == host.name && !exited(i.pid())).map(|(_, i)| i.pid()).collect();
        wait_local_pids(agent, "Echo", &pids)?;
    }

    // A real kill from the Python client: one more, of the two left.
    let py = python_scenario(
        a,
        &json!({"zookeeper": zk, "seed": 11, "actions": [{"method": "kill", "service": "Echo"}]}),
        PYTHON_TIMEOUT,
    )?;
    let py_picked = picked(py["reports"].as_array().map(Vec::as_slice).unwrap_or_default());
    ensure!(py_picked.len() == 1, "the Python kill answered {py}");
    let second = where_is.get(&py_picked[0]).ok_or_else(|| anyhow!("python killed {py_picked:?}"))?.1;
    eventually(format_args!("Echo pid {second} to exit"), KILL_EXIT, Duration::from_millis(20), || exited(second))?;
    std::thread::sleep(Duration::from_millis(500));
    let alive: Vec<u32> = instances.iter().map(|(_, i)| i.pid()).filter(|p| !exited(*p)).collect();
    ensure!(alive.len() == 1, "the Python kill must end ONE more instance; alive now: {alive:?}");

    // One log of every agent's events, each with its host: Rust, Python, the CLI.
    let rust_events = a.block_on(|| async {
        let sn = Scenario::from_zookeeper(&zk).await?;
        anyhow::Ok(sn.events().await?)
    })?;
    let all_agents: Vec<&ClusterAgent> = agents.iter().collect();
    check_merged_log("Rust Scenario.events()", &rust_events, &all_agents)?;
    let py = python_scenario(a, &json!({"zookeeper": zk, "events": true}), PYTHON_TIMEOUT)?;
    let py_events = py["events"].as_array().cloned().ok_or_else(|| anyhow!("python events: {py}"))?;
    check_merged_log("Python Scenario.events()", &py_events, &all_agents)?;
    let out = a
        .command(agent_bin())
        .args(["--via-zookeeper", &zk, "--json", "events", "--cluster", "--limit", "100000"])
        .output()
        .context("lymph-chaos events --cluster")?;
    ensure!(out.status.success(), "events --cluster: {}", String::from_utf8_lossy(&out.stderr));
    let cli_events: Vec<Json> = serde_json::from_slice(&out.stdout).context("events --cluster --json")?;
    check_merged_log("lymph-chaos events --cluster", &cli_events, &all_agents)?;
    let human = a
        .command(agent_bin())
        .args(["--via-zookeeper", &zk, "events", "--cluster", "--limit", "5"])
        .output()
        .context("lymph-chaos events --cluster")?;
    println!("lymph-chaos events --cluster --limit 5:\n{}", String::from_utf8_lossy(&human.stdout));

    // The two real kills, in the order they happened, each on the host of the pid it ended, alike in all three.
    let host_of = |pid: u32| {
        let id = where_is.iter().find(|(_, (_, p))| *p == pid).map(|(id, _)| id.clone()).unwrap_or_default();
        cluster.host(&where_is[&id].0).addr.clone()
    };
    let want = vec![(host_of(first), vec![u64::from(first)]), (host_of(second), vec![u64::from(second)])];
    for (who, events) in [("Rust", &rust_events), ("Python", &py_events), ("CLI", &cli_events)] {
        ensure!(kills(events) == want, "{who}: kills in the merged log {:?}, want {want:?}", kills(events));
    }
    println!("cluster_kill took {:.1?}", started.elapsed());
    Ok(())
}

#[test]
#[ignore = "needs ZooKeeper, the lymph venv and root: run by cargo xtask test --tier cluster"]
fn cluster_an_agent_that_is_down_is_reported_with_its_host_while_the_others_act() -> Result<()> {
    let started = Instant::now();
    let cluster = Cluster::new("cluster-down", &["A", "B", "C"])?;
    let (a, b, c) = (cluster.host("A"), cluster.host("B"), cluster.host("C"));
    let echo = InstanceOptions::default();
    let echo_b = b.start_instance(&echo)?;
    let echo_c = c.start_instance(&echo)?;
    let mut agents = cluster.start_agents()?;
    wait_local_pids(&agents[1], "Echo", &[echo_b.pid()])?;
    wait_local_pids(&agents[2], "Echo", &[echo_c.pid()])?;
    let zk = cluster.zk_hosts();

    // Host C's agent goes down. Its registration outlives it by its ZooKeeper session timeout (10 s): within that
    // window every client finds it and must say which host failed. The three clients run at once.
    let down = agents[2].pid();
    agents[2].process.kill9();
    let killed_at = Instant::now();
    eprintln!("stopped the agent of host C (pid {down}, {})", agents[2].endpoint);
    let python = std::thread::scope(|s| {
        let python = s.spawn(|| {
            python_scenario(
                a,
                &json!({"zookeeper": zk, "dry_run": true, "timeout": 2,
                        "actions": [{"method": "kill", "service": "Echo", "params": {"all": true}}], "events": true}),
                PYTHON_TIMEOUT,
            )
        });
        let cli = s.spawn(|| {
            a.command(agent_bin())
                .args(["--via-zookeeper", &zk, "--timeout", "2", "--json", "events", "--cluster"])
                .output()
        });
        let rust = a.block_on(|| async {
            let mut sn = Scenario::from_zookeeper(&zk).await?;
            sn.inject("Echo", "blackhole", json!({"lifetime": 20}));
            let applied = sn.apply().await;
            let events = sn.events().await;
            anyhow::Ok((applied, events))
        });
        (python.join(), cli.join(), rust)
    });
    let (python, cli, rust) = python;
    let took = killed_at.elapsed();
    eprintln!("the three clients finished {took:.1?} after the agent died");
    let (applied, events) = rust?;
    let c_host = c.addr.as_str();

    // Rust: the fault is active on B (the others acted), and the error names host C.
    match applied {
        Err(ScenarioError::Partial { failures, answers }) => {
            ensure!(
                failures.iter().map(|f| f.host.as_str()).collect::<Vec<_>>() == [c_host],
                "Rust: failures {failures:?}, want host {c_host} only"
            );
            ensure!(
                answers.len() == 1 && answers[0]["state"] == "active",
                "Rust: the agent of B did not apply the blackhole: {answers:?}"
            );
            println!("Rust apply: {}", ScenarioError::Partial { failures, answers });
        }
        other => return Err(anyhow!("Rust apply with host C down answered {other:?} ({took:.1?} after the kill)")),
    }
    let faults_b = agents[1].process.ok("faults", json!({}));
    ensure!(
        faults_b.as_array().is_some_and(|f| f.iter().any(|f| f["kind"] == "blackhole")),
        "host B has no blackhole: {faults_b}"
    );
    match events {
        Err(ScenarioError::Partial { failures, answers }) => {
            ensure!(failures.len() == 1 && failures[0].host == c_host, "Rust events: failures {failures:?}");
            let hosts: BTreeSet<&str> = answers.iter().filter_map(|e| e["host"].as_str()).collect();
            ensure!(hosts == BTreeSet::from([a.addr.as_str(), b.addr.as_str()]), "Rust events from {hosts:?}");
        }
        other => return Err(anyhow!("Rust events with host C down answered {other:?}")),
    }

    // Python: the dry run of `all` was answered by B (C's instance is unknown while its agent is down), and the
    // failure names host C; events likewise.
    let python = python.map_err(|_| anyhow!("the Python thread panicked"))??;
    let error = &python["error"];
    ensure!(error["type"] == "Partial", "Python apply: {python}");
    let py_hosts: Vec<&str> =
        error["failures"].as_array().into_iter().flatten().filter_map(|f| f["host"].as_str()).collect();
    ensure!(py_hosts == [c_host], "Python: failed hosts {py_hosts:?}, want [{c_host}]: {python}");
    let reports = error["reports"].as_array().cloned().unwrap_or_default();
    ensure!(
        reports.len() == 1 && reports[0]["host"] == b.addr.as_str() && reports[0]["pids"] == json!([echo_b.pid()]),
        "Python: the agent of B did not act: {reports:?}"
    );
    println!("Python apply: {}", error["message"]);
    let events_error = &python["events_error"];
    ensure!(
        events_error["type"] == "Partial"
            && events_error["failures"].as_array().is_some_and(|f| f.len() == 1 && f[0]["host"] == c_host),
        "Python events: {python}"
    );

    // The CLI: exit 3, host C named on stderr, the others' events on stdout.
    let cli = cli.map_err(|_| anyhow!("the CLI thread panicked"))??;
    let stderr = String::from_utf8_lossy(&cli.stderr);
    ensure!(cli.status.code() == Some(3), "events --cluster with host C down: {} {stderr}", cli.status);
    ensure!(stderr.contains(&format!("host {c_host} ")), "events --cluster does not name host {c_host}: {stderr}");
    let printed: Vec<Json> = serde_json::from_slice(&cli.stdout).context("events --cluster --json")?;
    let hosts: BTreeSet<&str> = printed.iter().filter_map(|e| e["host"].as_str()).collect();
    ensure!(hosts == BTreeSet::from([a.addr.as_str(), b.addr.as_str()]), "CLI events from {hosts:?}");
    println!("CLI: {}", stderr.trim());
    drop((echo_b, echo_c));
    println!("cluster_agent_down took {:.1?}", started.elapsed());
    Ok(())
}
