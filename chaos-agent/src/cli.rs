//! The `lymph-chaos` command line: `agent` runs the daemon; every other subcommand is a client of a running agent
//! (lymph RPC to `--agent`, default `tcp://127.0.0.1:4575`).
//!
//! Exit codes: 0 done, 1 the agent refused or failed the request, 2 usage error, 3 no agent answered, 4 lookup
//! failure (ZooKeeper has no agent/service). `run` (an experiment, [`crate::experiment`]) has its own: 0 held,
//! 1 deviated, 2 could not run, 3 aborted.

use std::{path::PathBuf, time::Duration};

use chaos_api::{
    Request, RpcError, Selection, Target,
    fault::{Direction, NetworkParams},
    request::{self, FaultOptions},
    units::{parse_duration, parse_signal},
};
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use serde_json::{Map, Value as Json, json};

use crate::rpc::{ClientError, client::Client};

/// Exit code: the agent refused or failed the request.
pub(crate) const EXIT_REMOTE: i32 = 1;
/// Exit code: bad usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: no agent answered.
pub(crate) const EXIT_UNREACHABLE: i32 = 3;
/// Exit code: lookup failure.
pub(crate) const EXIT_LOOKUP: i32 = 4;

/// lymph-chaos: a chaos monkey for lymph services.
#[derive(Parser, Debug)]
#[command(name = "lymph-chaos", version, about, long_about = None)]
pub struct Cli {
    /// Agent endpoint to talk to.
    #[arg(long, global = true, env = "LYMPH_CHAOS_AGENT", default_value = "tcp://127.0.0.1:4575")]
    pub(crate) agent: String,
    /// Find the agent through ZooKeeper instead (the one on this host, or the only one).
    #[arg(long = "via-zookeeper", global = true, value_name = "HOSTS")]
    pub(crate) via_zookeeper: Option<String>,
    /// Print the agent's answer as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for the agent.
    #[arg(long, global = true, default_value_t = 5.0)]
    pub(crate) timeout: f64,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (as root).
    ///
    /// Example: lymph-chaos agent --zookeeper 127.0.0.1:2181 --dry-run
    Agent(AgentArgs),
    /// Kill instances of a service (one at random unless --count/--percent/--all).
    ///
    /// Example: lymph-chaos kill Echo --signal SIGTERM --all
    Kill {
        /// Which instances.
        #[command(flatten)]
        target: TargetArgs,
        /// Signal name or number.
        #[arg(long, default_value = "SIGKILL")]
        signal: String,
        /// Also remove the instance from ZooKeeper at once.
        #[arg(long)]
        deregister: bool,
        /// Lifetime, dry run and how many instances.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Stop instances (SIGSTOP) for a while, then resume them.
    ///
    /// Example: lymph-chaos pause Echo --lifetime 10
    Pause {
        /// Which instances.
        #[command(flatten)]
        target: TargetArgs,
        /// Lifetime, dry run and how many instances.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Delay packets to a service's ports.
    ///
    /// Example: lymph-chaos latency Echo 0.2 --jitter 0.02 --lifetime 30
    Latency {
        /// Which instances, other than by service name (that is the first word).
        #[command(flatten)]
        target: TargetFlags,
        /// `[SERVICE] DELAY`: the service (unless --pid/--port/… name the target) and the delay in seconds (or
        /// 200ms).
        #[arg(value_name = "SERVICE DELAY", num_args = 1..=2, required = true)]
        words: Vec<String>,
        /// Jitter in seconds (or 20ms).
        #[arg(long)]
        jitter: Option<String>,
        /// to (default), from or both.
        #[arg(long)]
        direction: Option<String>,
        /// Lifetime, dry run and how many instances.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Inject any fault kind with key=value parameters.
    ///
    /// Example: lymph-chaos inject loss Echo loss=30 --lifetime 20
    ///          lymph-chaos inject rate --port 8080 rate=1mbit
    ///          lymph-chaos inject cpu --pid 4242 workers=1 in_target_cgroup=true
    ///          lymph-chaos inject blackhole Payments --peer Billing direction=both
    Inject {
        /// latency, loss, duplicate, corrupt, reorder, rate, blackhole, cpu, memory, disk, kill, terminate, pause.
        kind: String,
        /// Which instances.
        #[command(flatten)]
        target: TargetArgs,
        /// Only the traffic between the target and this peer.
        #[command(flatten)]
        peer: PeerArgs,
        /// Parameters as key=value (numbers and true/false are typed).
        #[arg(value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Lifetime, dry run and how many instances.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// List active faults with their counters and, for network faults, the effect measured by the agent's probes
    /// (loss, added delay per handshake, or why it was not observed).
    ///
    /// Example: lymph-chaos faults --all
    Faults {
        /// Include recently finished faults.
        #[arg(long)]
        all: bool,
    },
    /// Revert one fault.
    ///
    /// Example: lymph-chaos revert f-1a2b3c4d
    Revert {
        /// Fault id.
        id: String,
    },
    /// Revert every fault.
    ///
    /// Example: lymph-chaos clear
    Clear,
    /// Show recorded events.
    ///
    /// With --cluster (and --via-zookeeper), every agent registered there is asked and their events are printed
    /// as one log ordered by time, each with its host; exit code 3 when an agent did not answer (the others'
    /// events are printed all the same).
    ///
    /// Example: lymph-chaos events --since 120 --limit 20
    ///
    /// Example: lymph-chaos --via-zookeeper 10.0.0.1:2181 events --cluster --limit 100
    Events {
        /// Only events with a sequence number above this (per agent: each agent numbers its own events).
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// At most this many (the newest; with --cluster, of the merged log).
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// Keep printing new events.
        #[arg(long, conflicts_with = "cluster")]
        follow: bool,
        /// Every agent in ZooKeeper (needs --via-zookeeper), merged into one log by time, each event with its host.
        #[arg(long)]
        cluster: bool,
    },
    /// The agent's status.
    ///
    /// Example: lymph-chaos status
    Status,
    /// Services and instances the agent sees.
    ///
    /// Example: lymph-chaos services
    Services,
    /// Start unleashed mode (random faults from the configured menu).
    ///
    /// Example: lymph-chaos unleash --seed 42 --mean-interval 600 --min-gap 60
    Unleash {
        /// Seed (recorded; replays the same choices).
        #[arg(long)]
        seed: Option<u64>,
        /// Mean seconds between faults.
        #[arg(long)]
        mean_interval: Option<f64>,
        /// Minimum seconds between faults.
        #[arg(long)]
        min_gap: Option<f64>,
        /// Only report what would be done.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop unleashed mode.
    ///
    /// Example: lymph-chaos leash
    Leash,
    /// Run a chaos experiment: check the steady state, run the method under the safeguards, check it again, revert
    /// everything (also on abort, failure and Ctrl-C), and write a report (report.json, summary.txt, timeline.svg).
    ///
    /// Example: lymph-chaos run experiment.yml --zookeeper 127.0.0.1:2181/lymph --out chaos-report
    ///
    /// Exit codes: 0 the hypothesis held, 1 it deviated, 2 could not run (bad file, no agent, not steady before:
    /// nothing applied), 3 aborted (a safeguard, a failed fault, Ctrl-C: everything reverted).
    Run(RunArgs),
    /// Print the shell completion script for bash, zsh, fish, elvish or powershell (runs locally, no agent).
    ///
    /// Example: lymph-chaos completions bash > ~/.local/share/bash-completion/completions/lymph-chaos
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (roff, one per subcommand) generated from these definitions into DIR.
    #[command(hide = true)]
    Manpages {
        /// Output directory (created when missing).
        dir: PathBuf,
    },
}

/// Options of `lymph-chaos run`.
#[derive(ClapArgs, Debug, Default, Clone)]
pub struct RunArgs {
    /// The experiment file (YAML).
    pub(crate) file: PathBuf,
    /// ZooKeeper hosts (`host:port[,…][/chroot]`); default: the file's `zookeeper`, else lymph's configuration
    /// ($LYMPH_CONFIG or ./.lymph.yml), else 127.0.0.1:2181.
    #[arg(long)]
    pub(crate) zookeeper: Option<String>,
    /// Directory for report.json, summary.txt and timeline.svg (default: <file stem>-report next to the file).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Ask the agents what they would do; apply nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Seed for the agents' random choices (overrides the file's).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Only check the file (and print its steps); contact nobody.
    #[arg(long)]
    pub(crate) check: bool,
    /// Longest lifetime a fault gets at once, renewed while it should last: how long faults outlive a crashed run.
    #[arg(long, default_value = "10s")]
    pub(crate) lease: String,
    /// No progress lines, only the summary.
    #[arg(long, short)]
    pub(crate) quiet: bool,
}

/// Options of `lymph-chaos agent`.
#[derive(ClapArgs, Debug, Default)]
pub struct AgentArgs {
    /// Configuration file (YAML).
    #[arg(long, env = "LYMPH_CHAOS_CONFIG")]
    pub config: Option<PathBuf>,
    /// ZooKeeper hosts (`host:port[,…][/chroot]`); overrides the configuration.
    #[arg(long)]
    pub zookeeper: Option<String>,
    /// Resolve and report, never act.
    #[arg(long)]
    pub dry_run: bool,
    /// Start in unleashed mode.
    #[arg(long)]
    pub unleash: bool,
    /// Do not load the classifier and refuse network faults.
    #[arg(long)]
    pub no_network_control: bool,
    /// RPC bind address.
    #[arg(long)]
    pub bind: Option<String>,
    /// RPC port.
    #[arg(long)]
    pub port: Option<u16>,
    /// State directory (journal, network state).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// bpffs directory for pinned maps.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Event log file.
    #[arg(long)]
    pub events_file: Option<PathBuf>,
    /// IFB device name.
    #[arg(long)]
    pub ifb: Option<String>,
    /// Prometheus endpoint, e.g. 127.0.0.1:9464.
    #[arg(long)]
    pub metrics: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (`info`, `lymph_chaos=debug` …); RUST_LOG also works.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// Log output format.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (no timestamps under systemd, which adds its own).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How to name a target: a service name or one of the flags.
#[derive(ClapArgs, Debug, Default)]
pub struct TargetArgs {
    /// lymph service name.
    #[arg(value_name = "SERVICE")]
    pub(crate) name: Option<String>,
    /// The other ways.
    #[command(flatten)]
    pub(crate) flags: TargetFlags,
}

/// Targets other than a service name.
#[derive(ClapArgs, Debug, Default, Clone)]
pub struct TargetFlags {
    /// Instance id or identity.
    #[arg(long)]
    pub(crate) instance: Option<String>,
    /// Process id.
    #[arg(long)]
    pub(crate) pid: Option<i64>,
    /// Port (whatever listens there; for network faults the port itself).
    #[arg(long)]
    pub(crate) port: Option<i64>,
    /// Processes whose command line contains this (or /regex/).
    #[arg(long)]
    pub(crate) process: Option<String>,
}

/// Options every fault takes.
#[derive(ClapArgs, Debug, Default)]
pub struct CommonArgs {
    /// Lifetime in seconds (or 90s, 2m).
    #[arg(long)]
    pub(crate) lifetime: Option<String>,
    /// Only report what would be done.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Seed for the random choice of instances.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Hit this many instances.
    #[arg(long)]
    pub(crate) count: Option<u32>,
    /// Hit this percentage of instances.
    #[arg(long)]
    pub(crate) percent: Option<f64>,
    /// Hit every instance.
    #[arg(long)]
    pub(crate) all: bool,
    /// Fault id (applying the same id again refreshes it).
    #[arg(long)]
    pub(crate) id: Option<String>,
}

fn seconds(key: &str, text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or_else(|| format!("{key} `{text}` is not a number of seconds ≥ 0 (e.g. 0.2, 200ms, 2m)"))
}

impl TargetArgs {
    fn count(&self) -> usize {
        usize::from(self.name.is_some()) + self.flags.count()
    }

    /// The target named on the command line, if any.
    fn target(&self) -> Result<Option<Target>, String> {
        match &self.name {
            Some(name) => Ok(Some(Target::Service { name: name.clone() })),
            None => self.flags.target(),
        }
    }
}

impl TargetFlags {
    fn count(&self) -> usize {
        [self.instance.is_some(), self.pid.is_some(), self.port.is_some(), self.process.is_some()]
            .iter()
            .filter(|x| **x)
            .count()
    }

    fn target(&self) -> Result<Option<Target>, String> {
        if let Some(id) = &self.instance {
            return Ok(Some(Target::Instance { id: id.clone() }));
        }
        if let Some(pid) = self.pid {
            let pid =
                i32::try_from(pid).ok().filter(|p| *p > 0).ok_or_else(|| format!("pid {pid} is not a process id"))?;
            return Ok(Some(Target::Pid { pid }));
        }
        if let Some(port) = self.port {
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("port {port} is out of range (1-65535)"))?;
            return Ok(Some(Target::Port { port }));
        }
        Ok(self.process.clone().map(|pattern| Target::Process { pattern }))
    }
}

/// The other party of a network fault: only the traffic between the target and it is affected.
#[derive(ClapArgs, Clone, Debug, Default)]
pub struct PeerArgs {
    /// Only traffic between the target and this lymph service (direction=to: its requests to the target;
    /// from: the target's replies to it; both).
    #[arg(long, value_name = "SERVICE")]
    pub peer: Option<String>,
    /// Only traffic from this host name or address to the target.
    #[arg(long, value_name = "HOST")]
    pub peer_host: Option<String>,
    /// Only traffic from this network (address/length) to the target.
    #[arg(long, value_name = "CIDR")]
    pub peer_cidr: Option<String>,
}

/// A target is required: a usage error without one.
fn required(target: Option<Target>) -> Result<Target, String> {
    target.ok_or_else(|| "give a target: SERVICE, --instance, --pid, --port or --process".to_owned())
}

impl CommonArgs {
    fn options(&self) -> Result<FaultOptions, String> {
        let select = match (self.count, self.percent, self.all) {
            (Some(_), Some(_), _) | (Some(_), _, true) | (_, Some(_), true) => {
                return Err("give one of --count, --percent, --all".into());
            }
            (Some(0), ..) => return Err("count must be at least 1".into()),
            (Some(c), None, false) => Some(Selection::Count(c)),
            (None, Some(p), false) => Some(Selection::Percent(p)),
            (None, None, true) => Some(Selection::All),
            (None, None, false) => None,
        };
        let lifetime = self.lifetime.as_deref().map(|l| seconds("lifetime", l)).transpose()?;
        if lifetime.is_some_and(|l| l.is_zero()) {
            return Err("lifetime must be above 0 seconds".into());
        }
        Ok(FaultOptions { id: self.id.clone(), select, lifetime, dry_run: self.dry_run, seed: self.seed })
    }

    /// Puts the options given on the command line over those of a request.
    fn overlay(&self, options: &mut FaultOptions) -> Result<(), String> {
        let given = self.options()?;
        options.id = given.id.or(options.id.take());
        options.select = given.select.or(options.select);
        options.lifetime = given.lifetime.or(options.lifetime);
        options.dry_run |= given.dry_run;
        options.seed = given.seed.or(options.seed);
        Ok(())
    }
}

/// The typed `Chaos` request a client subcommand makes.
///
/// # Errors
/// A usage message for a bad target, a bad value or malformed `key=value` parameters.
pub fn request_for(command: &Command) -> Result<Request, String> {
    if target_count(command) > 1 {
        return Err("give one target: SERVICE, --instance, --pid, --port or --process".into());
    }
    Ok(match command {
        Command::Agent(_) | Command::Completions { .. } | Command::Manpages { .. } => {
            return Err("not a client command".into());
        }
        Command::Run(_) => return Err("`run` is not a single request".into()),
        Command::Kill { target, signal, deregister, common } => request::Kill {
            target: required(target.target()?)?,
            signal: parse_signal(signal).ok_or_else(|| format!("unknown signal `{signal}`"))?,
            deregister: *deregister,
            options: common.options()?,
        }
        .into(),
        Command::Pause { target, common } => {
            request::Pause { target: required(target.target()?)?, options: common.options()? }.into()
        }
        Command::Latency { target, words, jitter, direction, common } => {
            latency_request(target, words, jitter.as_deref(), direction.as_deref(), common)?.into()
        }
        Command::Inject { kind, target, peer, params, common } => {
            inject_request(kind, target, peer, params, common)?.into()
        }
        Command::Faults { all } => request::Faults { all: *all }.into(),
        Command::Revert { id } => request::Revert { id: id.clone() }.into(),
        Command::Clear => request::Clear.into(),
        Command::Events { since, limit, .. } => {
            request::Events { since: *since, limit: usize::try_from(*limit).unwrap_or(usize::MAX) }.into()
        }
        Command::Status => request::Status.into(),
        Command::Services => request::ListServices.into(),
        Command::Unleash { seed, mean_interval, min_gap, dry_run } => {
            let secs = |key: &str, v: &Option<f64>| {
                v.map(|s| {
                    Duration::try_from_secs_f64(s).map_err(|_| format!("{key} {s} is not a number of seconds ≥ 0"))
                })
                .transpose()
            };
            request::Unleash {
                seed: *seed,
                mean_interval: secs("mean_interval", mean_interval)?,
                min_gap: secs("min_gap", min_gap)?,
                dry_run: dry_run.then_some(true),
            }
            .into()
        }
        Command::Leash => request::Leash.into(),
    })
}

/// How many targets a fault subcommand names (a `key=value` in `inject`'s SERVICE slot is a parameter).
fn target_count(command: &Command) -> usize {
    match command {
        Command::Kill { target, .. } | Command::Pause { target, .. } => target.count(),
        Command::Latency { target, words, .. } => target.count() + words.len() - 1,
        Command::Inject { target, .. } => {
            target.count() - usize::from(target.name.as_deref().is_some_and(|n| n.contains('=')))
        }
        _ => 0,
    }
}

/// `lymph-chaos latency [SERVICE] DELAY`: the 2015 `Chaos.inject_latency` call.
fn latency_request(
    target: &TargetFlags,
    words: &[String],
    jitter: Option<&str>,
    direction: Option<&str>,
    common: &CommonArgs,
) -> Result<request::InjectLatency, String> {
    let (name, latency) = match words {
        [name, latency] => (Some(name), latency),
        [latency] => (None, latency),
        _ => return Err("give [SERVICE] DELAY".into()),
    };
    let target = match name {
        Some(name) => Target::Service { name: name.clone() },
        // The 2015 call: without a target, every lymph service on the agent's host.
        None => target.target()?.unwrap_or(Target::AllServices),
    };
    let direction = match direction {
        None => Direction::default(),
        Some(d) => serde_json::from_value(Json::String(d.to_owned()))
            .map_err(|_| format!("direction `{d}` is not one of to, from, both"))?,
    };
    let params = NetworkParams {
        delay: seconds("latency", latency)?,
        jitter: jitter.map(|j| seconds("jitter", j)).transpose()?.unwrap_or_default(),
        direction,
        ..NetworkParams::default()
    };
    Ok(request::InjectLatency { target, params, options: common.options()? })
}

/// `lymph-chaos inject KIND … KEY=VALUE…`: the parameters go through the API's own decoding of `Chaos.inject`
/// ([`request::Inject::from_params`]), so the command line takes exactly what the RPC takes.
fn inject_request(
    kind: &str,
    target: &TargetArgs,
    peer: &PeerArgs,
    params: &[String],
    common: &CommonArgs,
) -> Result<request::Inject, String> {
    // `inject loss --port 80 loss=30`: the first key=value lands in the SERVICE slot.
    let mut params = params.to_vec();
    let mut target_name = target.name.clone();
    if target_name.as_deref().is_some_and(|n| n.contains('=')) {
        params.insert(0, target_name.take().unwrap_or_default());
    }
    let target = TargetArgs { name: target_name, flags: target.flags.clone() };
    let mut map = key_values(&params)?;
    for (key, value) in [("peer", &peer.peer), ("peer_host", &peer.peer_host), ("peer_cidr", &peer.peer_cidr)] {
        if let Some(v) = value {
            map.insert(key.to_owned(), Json::String(v.clone()));
        }
    }
    // Resource faults without a target act on the host; the others say they need one.
    let target = target.target()?.unwrap_or(Target::AllServices);
    let subject = chaos_api::Method::Inject.subject();
    let mut request = request::Inject::from_params(&subject, kind, &map, target).map_err(|err| match err {
        RpcError::Error { message, .. } => message,
        other => other.to_string(),
    })?;
    common.overlay(&mut request.options)?;
    Ok(request)
}

/// `key=value` words as JSON: numbers and true/false are typed, anything else is a string.
fn key_values(params: &[String]) -> Result<Map<String, Json>, String> {
    let mut map = Map::new();
    for p in params {
        let (k, v) = p.split_once('=').ok_or_else(|| format!("parameter `{p}` is not key=value"))?;
        let value = serde_json::from_str::<Json>(v)
            .ok()
            .filter(|j| !j.is_string())
            .unwrap_or_else(|| Json::String(v.to_owned()));
        map.insert(k.to_owned(), value);
    }
    Ok(map)
}

/// `lymph-chaos completions SHELL`: the completion script on stdout.
pub fn print_completions(shell: clap_complete::Shell) -> i32 {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    // Into a buffer first: clap_complete panics on a write error (`… | head` closes the pipe early).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "lymph-chaos", &mut script);
    match std::io::Write::write_all(&mut std::io::stdout(), &script) {
        Ok(()) => 0,
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(err) => {
            eprintln!("lymph-chaos: writing the completion script: {err}");
            EXIT_REMOTE
        }
    }
}

/// `lymph-chaos manpages DIR`: `lymph-chaos.1` and one `lymph-chaos-<subcommand>.1` per visible subcommand.
pub fn write_manpages(dir: &std::path::Path) -> i32 {
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir));
    match written {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("lymph-chaos: writing manual pages into {}: {err}", dir.display());
            EXIT_REMOTE
        }
    }
}

/// Runs a client subcommand; returns the exit code.
pub async fn run_client(cli: &Cli) -> i32 {
    let mut request = match request_for(&cli.command) {
        Ok(r) => r,
        Err(msg) => {
            eprintln!("lymph-chaos: {msg}");
            return EXIT_USAGE;
        }
    };
    let timeout = Duration::from_secs_f64(cli.timeout.max(0.1));
    let client = match Client::new() {
        Ok(c) => c,
        Err(err) => {
            eprintln!("lymph-chaos: cannot open a client socket: {err}");
            return EXIT_UNREACHABLE;
        }
    };
    if let Command::Events { cluster: true, since, limit, .. } = &cli.command {
        let Some(hosts) = &cli.via_zookeeper else {
            eprintln!("lymph-chaos: events --cluster needs --via-zookeeper <hosts> (where the agents register)");
            return EXIT_USAGE;
        };
        return cluster_events(cli, client, hosts, *since, *limit, timeout).await;
    }
    let (client, endpoint) = match &cli.via_zookeeper {
        None => (client, cli.agent.clone()),
        Some(hosts) => match find_agent(client, hosts, timeout).await {
            Ok(x) => x,
            Err((code, msg)) => {
                eprintln!("lymph-chaos: {msg}");
                return code;
            }
        },
    };
    let follow = matches!(cli.command, Command::Events { follow: true, .. });
    let method = request.method().name();
    loop {
        let result = client.chaos(&endpoint, &request, timeout).await;
        match result {
            Ok(value) => {
                let json = value.to_json();
                if follow
                    && let Some(last) = json.as_array().and_then(|a| a.last()).and_then(|e| e["seq"].as_u64())
                    && let Request::Events(events) = &mut request
                {
                    events.since = last;
                }
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
                } else {
                    print!("{}", human(method, &json));
                }
                if !follow {
                    return 0;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => {
                let (code, msg) = match &err {
                    ClientError::Remote { type_name, message } => (EXIT_REMOTE, format!("{type_name}: {message}")),
                    ClientError::Nack { .. } => (
                        EXIT_REMOTE,
                        format!("the agent at {endpoint} refused Chaos.{method} (NACK): is it a lymph-chaos agent?"),
                    ),
                    ClientError::Timeout { .. } => (
                        EXIT_UNREACHABLE,
                        format!(
                            "no agent answered at {endpoint} within {:.1} s (is `lymph-chaos agent` running? see --agent)",
                            cli.timeout
                        ),
                    ),
                    ClientError::LookupFailure { .. } => (EXIT_LOOKUP, err.to_string()),
                    ClientError::Codec(m) => (EXIT_REMOTE, m.clone()),
                };
                if cli.json {
                    println!("{}", json!({"error": err.to_string(), "exit": code}));
                }
                eprintln!("lymph-chaos: {msg}");
                return code;
            }
        }
    }
}

/// `events --cluster`: every agent registered in ZooKeeper `hosts`, merged into one log by time (each event with
/// its `agent` and `host`, [`chaos_api::scenario::merge_events`], as the Scenario clients show it).
async fn cluster_events(cli: &Cli, client: Client, hosts: &str, since: u64, limit: u64, timeout: Duration) -> i32 {
    let client = match client.connect_zookeeper(hosts, timeout).await {
        Ok(c) => c,
        Err(err) => {
            eprintln!("lymph-chaos: {err}");
            return EXIT_LOOKUP;
        }
    };
    let agents = match client.lookup(crate::paths::SERVICE_NAME).await {
        Ok(a) if !a.is_empty() => a,
        Ok(_) => {
            eprintln!("lymph-chaos: no agent registered in ZooKeeper at {hosts}");
            return EXIT_LOOKUP;
        }
        Err(err) => {
            eprintln!("lymph-chaos: {err}");
            return EXIT_LOOKUP;
        }
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let request: Request = request::Events { since, limit }.into();
    let mut per_agent = Vec::new();
    let mut failed = 0;
    for agent in &agents {
        match client.chaos(&agent.endpoint, &request, timeout).await {
            Ok(events) => {
                per_agent.push((agent.endpoint.clone(), events.to_json().as_array().cloned().unwrap_or_default()))
            }
            Err(err) => {
                failed += 1;
                let host = chaos_api::scenario::agent_host(&agent.endpoint);
                eprintln!("lymph-chaos: the agent of host {host} ({}) did not answer: {err}", agent.endpoint);
            }
        }
    }
    let mut merged = chaos_api::scenario::merge_events(per_agent);
    let newest = merged.len().saturating_sub(limit);
    merged.drain(..newest);
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&Json::Array(merged)).unwrap_or_default());
    } else {
        for event in &merged {
            let line = human("events", &json!([event]));
            print!("{:<16} {line}", event["host"].as_str().unwrap_or("-"));
        }
    }
    if failed == 0 { 0 } else { EXIT_UNREACHABLE }
}

async fn find_agent(client: Client, hosts: &str, timeout: Duration) -> Result<(Client, String), (i32, String)> {
    let client = client.connect_zookeeper(hosts, timeout).await.map_err(|e| (EXIT_LOOKUP, e.to_string()))?;
    let agents = client.lookup(crate::paths::SERVICE_NAME).await.map_err(|e| (EXIT_LOOKUP, e.to_string()))?;
    let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok());
    let here = agents.iter().find(|a| a.hostname.is_some() && a.hostname == host).or(if agents.len() == 1 {
        agents.first()
    } else {
        None
    });
    match here {
        Some(a) => {
            let endpoint = a.endpoint.clone();
            Ok((client, endpoint))
        }
        None => Err((EXIT_LOOKUP, format!("{} agents registered and none on this host: use --agent", agents.len()))),
    }
}

/// The measured effect of a network fault, for `faults`: ` [observed: loss 100 %, +0.012 ms]` or the verdict.
fn observed_text(o: &Json) -> String {
    let verdict = o["verdict"].as_str().unwrap_or("-");
    let mut figures = Vec::new();
    if let Some(l) = o["loss_percent"].as_f64() {
        figures.push(format!("loss {l} %"));
    }
    if let Some(d) = o["added_delay_ms"].as_f64() {
        figures.push(format!("delay {d:+.3} ms"));
    }
    if let Some(m) = o["matched_packets"].as_u64().filter(|_| o["probes"].as_u64().unwrap_or(0) > 0) {
        figures.push(format!("{m} packets matched / {} probes", o["probes"]));
    }
    match verdict {
        "observed" => format!(" [observed: {}]", figures.join(", ")),
        "pending" => " [observed: measuring]".to_owned(),
        _ if figures.is_empty() => format!(" [{verdict}: {}]", o["summary"].as_str().unwrap_or("")),
        _ => format!(" [{verdict}: {}; {}]", figures.join(", "), o["summary"].as_str().unwrap_or("")),
    }
}

/// A short human rendering of an answer.
pub(crate) fn human(method: &str, j: &Json) -> String {
    let fault_line = |f: &Json| -> String {
        let mut line = format!(
            "{:<12} {:<10} {:<9} {}",
            f["id"].as_str().unwrap_or("-"),
            f["kind"].as_str().unwrap_or("-"),
            f["state"].as_str().unwrap_or(if f["dry_run"] == true { "dry-run" } else { "-" }),
            f["message"].as_str().unwrap_or("")
        );
        if let Some(c) = f.get("counters").filter(|c| c.is_object()) {
            line.push_str(&format!(" [packets {} bytes {} drops {}]", c["packets"], c["bytes"], c["drops"]));
        }
        if let Some(o) = f.get("observed").filter(|o| o.is_object()) {
            line.push_str(&observed_text(o));
        }
        if let Some(backend) = f["backend"].as_str() {
            line.push_str(&format!(" [backend {backend}]"));
        }
        line.push('\n');
        line
    };
    match method {
        "faults" | "clear" => {
            let list = j.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                return "no faults\n".into();
            }
            list.iter().map(fault_line).collect()
        }
        "events" => j
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        format!(
                            "#{:<5} {:.3} {:<11} {:<8} {:<10} {} {}\n",
                            e["seq"],
                            e["time"].as_f64().unwrap_or(0.0),
                            e["action"].as_str().unwrap_or("-"),
                            e["outcome"].as_str().unwrap_or("-"),
                            e["fault"].as_str().unwrap_or("-"),
                            e["kind"].as_str().unwrap_or(""),
                            e["message"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        "list_services" => {
            let Some(map) = j.as_object() else { return format!("{j}\n") };
            let mut out = String::new();
            for (service, instances) in map {
                out.push_str(&format!("{service}\n"));
                for i in instances.as_array().into_iter().flatten() {
                    let local = if i["local"] == true { format!("local pid {}", i["pid"]) } else { "remote".into() };
                    out.push_str(&format!(
                        "  {:<34} {:<28} {local}\n",
                        i["id"].as_str().unwrap_or("-"),
                        i["endpoint"].as_str().unwrap_or("-")
                    ));
                }
            }
            if out.is_empty() { "no services\n".into() } else { out }
        }
        "status" | "unleash" | "leash" => format!("{}\n", serde_json::to_string_pretty(j).unwrap_or_default()),
        _ if j.get("id").is_some() => fault_line(j),
        _ => format!("{}\n", serde_json::to_string_pretty(j).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use chaos_api::ChaosRequest;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap checks every subcommand's arguments (positional order, conflicts) only when it is used; do it now.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn latency_takes_an_optional_service_before_the_delay() {
        let cli = Cli::try_parse_from(["lymph-chaos", "latency", "--port", "8080", "0.1"]).unwrap();
        let Request::InjectLatency(req) = request_for(&cli.command).unwrap() else { panic!("not inject_latency") };
        assert_eq!((&req.target, req.params.delay), (&Target::Port { port: 8080 }, Duration::from_millis(100)));
        let args = req.to_kwargs();
        assert_eq!((args.get("name"), &args["port"], &args["latency"]), (None, &json!(8080), &json!(0.1)));
        let cli = Cli::try_parse_from(["lymph-chaos", "latency", "Echo", "--port", "8080", "0.1"]).unwrap();
        assert!(request_for(&cli.command).is_err(), "two targets");
    }

    #[test]
    fn subcommands_map_to_rpc_calls() {
        use chaos_api::{Fault, FaultKind, fault::Direction};

        let cli = Cli::try_parse_from(["lymph-chaos", "kill", "Echo", "--all", "--dry-run"]).unwrap();
        let req = request_for(&cli.command).unwrap();
        assert_eq!(req.method().name(), "kill");
        let args = req.to_kwargs();
        assert_eq!(args["name"], "Echo");
        assert_eq!(args["all"], true);
        assert_eq!(args["dry_run"], true);
        let cli = Cli::try_parse_from(["lymph-chaos", "inject", "loss", "Echo", "loss=30", "direction=both"]).unwrap();
        let req = request_for(&cli.command).unwrap();
        assert_eq!(req.method().name(), "inject");
        let Request::Inject(inject) = &req else { panic!("not inject") };
        let Fault::Network { label, params } = &inject.fault else { panic!("not a network fault") };
        assert_eq!((*label, params.loss, params.direction), (FaultKind::Loss, 30.0, Direction::Both));
        let args = req.to_kwargs();
        assert_eq!((&args["loss"], &args["direction"]), (&json!(30.0), &json!("both")));
        let cli = Cli::try_parse_from(["lymph-chaos", "latency", "Echo", "200ms", "--lifetime", "30"]).unwrap();
        let Request::InjectLatency(req) = request_for(&cli.command).unwrap() else { panic!("not inject_latency") };
        assert_eq!(
            (req.params.delay, req.options.lifetime),
            (Duration::from_millis(200), Some(Duration::from_secs(30)))
        );
        let cli = Cli::try_parse_from(["lymph-chaos", "inject", "loss", "Echo", "nonsense"]).unwrap();
        assert!(request_for(&cli.command).is_err());
        let cli = Cli::try_parse_from(["lymph-chaos", "inject", "blackhole", "Payments", "--peer", "Billing"]).unwrap();
        let Request::Inject(inject) = request_for(&cli.command).unwrap() else { panic!("not inject") };
        let Fault::Network { params, .. } = &inject.fault else { panic!("not a network fault") };
        assert_eq!(params.peer, Some(chaos_api::fault::Peer::Service("Billing".into())));
        let cli = Cli::try_parse_from(["lymph-chaos", "inject", "blackhole", "Payments", "--peer-cidr", "10.0.0.0/33"])
            .unwrap();
        let err = request_for(&cli.command).unwrap_err();
        assert!(err.contains("prefix length"), "{err}");
    }

    #[test]
    fn bad_values_are_usage_errors_with_the_agents_words() {
        let cli = Cli::try_parse_from(["lymph-chaos", "kill", "Echo", "--signal", "SIGBOGUS"]).unwrap();
        assert_eq!(request_for(&cli.command).unwrap_err(), "unknown signal `SIGBOGUS`");
        let cli = Cli::try_parse_from(["lymph-chaos", "inject", "loss", "Echo", "loss=130"]).unwrap();
        let err = request_for(&cli.command).unwrap_err();
        assert!(err.contains("`loss` is a percentage between 0 and 100"), "{err}");
        let cli = Cli::try_parse_from(["lymph-chaos", "inject", "loss", "loss=3"]).unwrap();
        let err = request_for(&cli.command).unwrap_err();
        assert!(err.contains("missing target"), "{err}");
        let cli = Cli::try_parse_from(["lymph-chaos", "inject", "cpu", "workers=1", "--lifetime", "5"]).unwrap();
        let Request::Inject(req) = request_for(&cli.command).unwrap() else { panic!("not inject") };
        assert_eq!((req.target, req.options.lifetime), (Target::AllServices, Some(Duration::from_secs(5))));
    }
}
