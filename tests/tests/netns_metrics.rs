//! Observability: the agent's Prometheus endpoint (`--metrics 127.0.0.1:<port>`), scraped from a real
//! agent in a fresh network namespace. The exposition is checked as Prometheus would read it (every sample
//! belongs to a family with `# HELP` and `# TYPE`, counters and histograms are consistent), and the numbers are
//! checked to move with what happens: a blackhole on a port with traffic counts matched and dropped packets and an
//! `applied` event; reverting it counts a `reverted` event and removes the fault's series; every RPC call moves
//! the RPC counters and histogram.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use chaos_test_support::{eventually, free_port};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, EchoProcess},
    netns::Netns,
};
use serde_json::json;

/// One sample: metric name, labels, value.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: families (name → TYPE), HELP texts, samples.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    helps: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// Parses the Prometheus text format 0.0.4, failing on anything malformed.
    fn parse(text: &str) -> Result<Exposition, String> {
        let mut e = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').ok_or_else(|| bad("HELP without text"))?;
                if e.helps.insert(name.to_owned(), help.to_owned()).is_some() {
                    return Err(bad("second HELP"));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| bad("TYPE without type"))?;
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(bad("unknown type"));
                }
                if e.samples.iter().any(|s| family(&s.name, &e.types) == name) {
                    return Err(bad("TYPE after samples of its family"));
                }
                if e.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                    return Err(bad("second TYPE"));
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            e.samples.push(parse_sample(line).map_err(|why| bad(&why))?);
        }
        Ok(e)
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v)))
            .map(|s| s.value)
    }

    /// Like [`Exposition::find`], 0 when absent (a counter that has not been created yet).
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or(0.0)
    }
}

/// The family a sample belongs to (`x_bucket`/`x_sum`/`x_count` of a histogram belong to `x`).
fn family<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| t == "histogram" || t == "summary")
        {
            return base;
        }
    }
    name
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{a="x",b="y\"z"} 1.5`
fn parse_sample(line: &str) -> Result<Sample, String> {
    let (head, value) = line.rsplit_once(' ').ok_or("no value")?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    let (name, mut rest) = match head.find('{') {
        Some(i) => (&head[..i], &head[i + 1..]),
        None => (head, ""),
    };
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    if head.contains('{') {
        rest = rest.strip_suffix('}').ok_or("labels not closed")?;
        let mut chars = rest.chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if !valid_name(&key) {
                return Err(format!("bad label name {key:?}"));
            }
            if chars.next() != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("label value not closed")? {
                    '\\' => match chars.next().ok_or("dangling escape")? {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
            match chars.next() {
                None => break,
                Some(',') => {}
                Some(c) => return Err(format!("unexpected {c:?} after a label")),
            }
        }
    }
    Ok(Sample { name: name.to_owned(), labels, value })
}

/// Every sample has a family with HELP and TYPE; histograms have monotone buckets ending in `+Inf` = `_count`.
fn check_format(e: &Exposition) {
    for s in &e.samples {
        let fam = family(&s.name, &e.types);
        assert!(e.types.contains_key(fam), "{} has no # TYPE", s.name);
        assert!(e.helps.contains_key(fam), "{} has no # HELP", s.name);
        if e.types[fam] == "counter" {
            assert!(s.value >= 0.0 && s.value.is_finite(), "counter {} = {}", s.name, s.value);
            assert!(fam.ends_with("_total"), "counter {fam} should end in _total");
        }
    }
    for (fam, _) in e.types.iter().filter(|(_, t)| *t == "histogram") {
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in e.samples.iter().filter(|s| s.name == format!("{fam}_bucket")) {
            let mut key = s.labels.clone();
            let le = key.remove("le").unwrap_or_else(|| panic!("{fam}_bucket without le"));
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().expect("numeric le") };
            series.entry(format!("{key:?}")).or_default().push((le, s.value));
        }
        for (key, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{fam}{key}: buckets not cumulative: {buckets:?}");
            let (le, inf) = *buckets.last().expect("at least one bucket");
            assert!(le.is_infinite(), "{fam}{key}: no +Inf bucket");
            let count = e
                .samples
                .iter()
                .find(|s| s.name == format!("{fam}_count") && format!("{:?}", s.labels) == key)
                .unwrap_or_else(|| panic!("{fam}{key}: no _count"));
            assert_eq!(inf, count.value, "{fam}{key}: +Inf bucket != _count");
        }
    }
}

/// GET `path` from the agent's metrics endpoint inside `ns`: (status line, content type, body).
fn get(ns: &Netns, port: u16, path: &str) -> (String, String, String) {
    let path = path.to_owned();
    ns.run(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // One write: the endpoint reads the request with a single read(2).
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
        let status = head.lines().next().unwrap_or_default().to_owned();
        let ctype = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Type: ").or_else(|| l.strip_prefix("content-type: ")))
            .unwrap_or_default()
            .to_owned();
        (status, ctype, body.to_owned())
    })
}

fn scrape(ns: &Netns, port: u16) -> Exposition {
    let (status, ctype, body) = get(ns, port, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    assert!(ctype.starts_with("text/plain") && ctype.contains("version=0.0.4"), "{ctype}");
    let e = Exposition::parse(&body).unwrap_or_else(|err| panic!("{err}\n{body}"));
    check_format(&e);
    e
}

/// Scrapes until `pred` holds (counters are updated right after the reply is sent, so poll briefly).
fn scrape_until(ns: &Netns, port: u16, what: &str, pred: impl Fn(&Exposition) -> bool) -> Exposition {
    let mut last = None;
    eventually(what, Duration::from_secs(10), Duration::from_millis(100), || {
        let e = scrape(ns, port);
        let held = pred(&e);
        last = Some(e);
        held.then(|| last.take()).flatten()
    })
    .unwrap_or_else(|err| panic!("{err}; last scrape: {:#?}", last.map(|e| e.samples)))
}

#[test]
fn the_parser_accepts_the_format_and_rejects_garbage() {
    let text = "# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"q\\\"uote\",b=\"\"} 3\n\
                # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
    let e = Exposition::parse(text).unwrap();
    check_format(&e);
    assert_eq!(e.find("x_total", &[("a", "q\"uote")]), Some(3.0));
    assert!(Exposition::parse("x{a=\"1\" 2\n").is_err());
    assert!(Exposition::parse("1x 2\n").is_err());
    assert!(Exposition::parse("# TYPE x bogus\n").is_err());
    assert!(Exposition::parse("x{a=1} 2\n").is_err());
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn metrics_follow_faults_packets_drops_events_and_rpc_calls() {
    let ns = Netns::new("metrics");
    let port = 7811u16;
    let echo = EchoProcess::start(&ns, port);
    let mport = ns.run(free_port);
    let agent = AgentProcess::start(
        Some(&ns),
        AgentOptions {
            config_yaml: format!("faults: {{allowed_processes: [\"{}\"]}}\n", EchoProcess::MARKER),
            args: vec!["--metrics".into(), format!("127.0.0.1:{mport}")],
            ..Default::default()
        },
    )
    .unwrap();

    // Anything else than /metrics is a 404; the exposition itself is well-formed.
    assert!(get(&ns, mport, "/nope").0.contains(" 404 "));
    let before = scrape_until(&ns, mport, "the start-up status call counted", |e| {
        e.counter("lymph_chaos_rpc_requests_total", &[("method", "Chaos.status")]) >= 1.0
    });
    assert_eq!(before.find("lymph_chaos_active_faults", &[]), Some(0.0));
    assert_eq!(before.types["lymph_chaos_active_faults"], "gauge");
    assert_eq!(before.types["lymph_chaos_rpc_seconds"], "histogram");
    assert!(before.counter("lymph_chaos_events_total", &[("action", "agent_start")]) >= 1.0, "{:#?}", before.samples);
    let inject_calls = before.counter("lymph_chaos_rpc_requests_total", &[("method", "Chaos.inject")]);
    let inject_timed = before.counter("lymph_chaos_rpc_seconds_count", &[("method", "Chaos.inject")]);
    let applied = before.counter("lymph_chaos_events_total", &[("action", "applied"), ("kind", "blackhole")]);

    // Traffic to the port for the whole test: fresh connections, one request each (SYNs are dropped too).
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (stop, attempts) = (stop.clone(), attempts.clone());
        let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let name = ns.name().to_owned();
        std::thread::spawn(move || {
            chaos_test_support::netns::run_in(&name, || {
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
                        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                        let _ = s.write_all(b"ping");
                        let mut buf = [0u8; 4];
                        let _ = s.read_exact(&mut buf);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
    };

    let fault = agent.ok("inject", json!({"kind": "blackhole", "port": port, "lifetime": 60}));
    let id = fault["id"].as_str().expect("fault id").to_owned();
    let labels = [("fault", id.as_str()), ("kind", "blackhole")];
    // The `applied` event is recorded once the agent has measured the fault's effect (about a second).
    let during = scrape_until(&ns, mport, "packets dropped by the blackhole, its effect measured", |e| {
        e.counter("lymph_chaos_fault_drops_total", &labels) >= 3.0
            && e.counter("lymph_chaos_events_total", &[("action", "applied"), ("kind", "blackhole")]) > applied
    });
    assert_eq!(during.find("lymph_chaos_active_faults", &[]), Some(1.0));
    let packets = during.counter("lymph_chaos_fault_packets_total", &labels);
    let drops = during.counter("lymph_chaos_fault_drops_total", &labels);
    assert!(during.counter("lymph_chaos_fault_bytes_total", &labels) > 0.0);
    assert!(packets >= drops && drops > 0.0, "packets {packets}, drops {drops}");
    assert_eq!(
        during.counter("lymph_chaos_events_total", &[("action", "applied"), ("kind", "blackhole")]),
        applied + 1.0
    );
    assert_eq!(during.counter("lymph_chaos_rpc_requests_total", &[("method", "Chaos.inject")]), inject_calls + 1.0);
    assert_eq!(during.counter("lymph_chaos_rpc_seconds_count", &[("method", "Chaos.inject")]), inject_timed + 1.0);
    assert!(during.counter("lymph_chaos_rpc_seconds_sum", &[("method", "Chaos.inject")]) > 0.0);

    // The counters keep moving while traffic is dropped.
    let later = scrape_until(&ns, mport, "drops keep counting", |e| {
        e.counter("lymph_chaos_fault_drops_total", &labels) > drops
    });
    assert!(later.counter("lymph_chaos_fault_packets_total", &labels) > packets);

    // An RPC error is counted as one (an unknown fault id → ERROR UnknownFault).
    let errors = later.counter("lymph_chaos_rpc_errors_total", &[("method", "Chaos.revert")]);
    assert!(agent.call("revert", json!({"id": "f-never"})).is_err());
    agent.ok("revert", json!({"id": id}));
    let after = scrape_until(&ns, mport, "the revert counted", |e| {
        e.counter("lymph_chaos_events_total", &[("action", "reverted"), ("kind", "blackhole")]) >= 1.0
            && e.counter("lymph_chaos_rpc_requests_total", &[("method", "Chaos.revert")]) >= 2.0
    });
    assert_eq!(after.find("lymph_chaos_active_faults", &[]), Some(0.0));
    assert_eq!(after.counter("lymph_chaos_rpc_errors_total", &[("method", "Chaos.revert")]), errors + 1.0);
    assert!(after.find("lymph_chaos_fault_drops_total", &labels).is_none(), "series of a reverted fault remain");

    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert!(attempts.load(Ordering::Relaxed) >= 3);
    drop(echo);
}
