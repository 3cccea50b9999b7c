//! `lymph-chaos`: parses arguments, sets up logging and signals, and calls the library.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use chaos_agent::{
    agent,
    cli::{self, Cli, Command, LogFormat},
    config::Config,
    faults::resource,
    guardian,
    rpc::server::LogControl,
};
use clap::Parser;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};

/// Changes the log filter at runtime (`lymph.change_loglevel`), restoring it after `period`.
struct Reloadable {
    handle: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    base: String,
    generation: Arc<Mutex<u64>>,
}

impl LogControl for Reloadable {
    fn change(&self, qualname: &str, level: &str, period: Duration) -> Result<(), String> {
        let level = level.to_ascii_lowercase();
        let level = match level.as_str() {
            "critical" | "fatal" => "error",
            "warning" => "warn",
            l => l,
        };
        let directive = if qualname.is_empty() {
            level.to_owned()
        } else {
            format!("{},{}={level}", self.base, qualname.replace('.', "::"))
        };
        let filter = EnvFilter::try_new(&directive).map_err(|e| format!("invalid level or name: {e}"))?;
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        let generation = {
            let mut g = self.generation.lock().expect("poisoned");
            *g += 1;
            *g
        };
        let (handle, base, gens) = (self.handle.clone(), self.base.clone(), self.generation.clone());
        tokio::spawn(async move {
            tokio::time::sleep(period).await;
            if *gens.lock().expect("poisoned") == generation {
                let _ = handle.reload(EnvFilter::new(base));
            }
        });
        Ok(())
    }
}

fn init_logging(format: LogFormat, level: &str) -> Arc<dyn LogControl> {
    let base = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_owned());
    let (filter, handle) = reload::Layer::new(EnvFilter::try_new(&base).unwrap_or_else(|_| EnvFilter::new("info")));
    // journald stamps lines itself and cannot show colours.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !under_journald && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init(),
        LogFormat::Text if under_journald => registry
            .with(tracing_subscriber::fmt::layer().without_time().with_ansi(false).with_writer(std::io::stderr))
            .init(),
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)).init()
        }
    }
    Arc::new(Reloadable { handle, base, generation: Arc::new(Mutex::new(0)) })
}

fn main() {
    // The agent re-executes itself for resource workers and the guardian.
    if let Ok(job) = std::env::var(resource::WORKER_ENV) {
        resource::worker_main(&job);
    }
    if let Ok(orders) = std::env::var(guardian::GUARDIAN_ENV) {
        guardian::guardian_main(&orders);
    }
    let cli = Cli::parse();
    // Local commands: no runtime, no agent.
    match &cli.command {
        Command::Completions { shell } => std::process::exit(cli::print_completions(*shell)),
        Command::Manpages { dir } => std::process::exit(cli::write_manpages(dir)),
        _ => {}
    }
    if matches!(cli.command, Command::Agent(_)) {
        // Before any thread exists: the node's shared sockets are closed while nothing else can be handed their
        // numbers, and the descriptor limit is raised for every thread the runtime starts.
        chaos_agent::lymph_config::release_shared_sockets();
        raise_nofile_limit();
    }
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let code = runtime.block_on(async {
        match &cli.command {
            Command::Agent(args) => run_agent(args).await,
            Command::Run(args) => chaos_agent::experiment::command::run(args, cli.json).await,
            _ => cli::run_client(&cli).await,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: idle connections must not starve the agent of the
/// descriptors it needs to end faults.
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

async fn run_agent(args: &cli::AgentArgs) -> i32 {
    let log = init_logging(args.log_format, &args.log_level);
    let path = args.config.clone().or_else(|| {
        let default = std::path::PathBuf::from(chaos_agent::paths::CONFIG_FILE);
        default.exists().then_some(default)
    });
    let mut config = match &path {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(err) => {
                eprintln!("lymph-chaos: {err}");
                return cli::EXIT_USAGE;
            }
        },
        None => Config::default(),
    };
    config.apply_lymph_env();
    chaos_agent::lymph_config::fill_zookeeper(&mut config, path.as_deref());
    if let Some(z) = &args.zookeeper {
        config.zookeeper = (!z.is_empty()).then(|| z.clone());
    }
    config.dry_run |= args.dry_run;
    config.unleash.enabled |= args.unleash;
    if args.no_network_control {
        config.network.enabled = false;
    }
    if let Some(b) = &args.bind {
        config.rpc.bind = b.clone();
    }
    if let Some(p) = args.port {
        config.rpc.port = p;
    }
    if let Some(d) = &args.state_dir {
        config.state_dir = d.clone();
    }
    if let Some(d) = &args.pin_dir {
        config.network.pin_dir = d.clone();
    }
    if let Some(f) = &args.events_file {
        config.events.file = Some(f.clone());
    }
    if let Some(i) = &args.ifb {
        config.network.ifb = i.clone();
    }
    if let Some(m) = &args.metrics {
        config.metrics_listen = Some(m.clone());
    }
    if let Err(err) = config.validate() {
        eprintln!("lymph-chaos: {err}");
        return cli::EXIT_USAGE;
    }
    if !nix::unistd::geteuid().is_root() {
        tracing::warn!("not running as root: signals to other users' processes and network faults will fail");
    }
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    };
    match agent::run(config, Some(log), shutdown).await {
        Ok(()) => 0,
        Err(err) => {
            tracing::error!(%err, "agent failed");
            eprintln!("lymph-chaos: {err}");
            1
        }
    }
}
