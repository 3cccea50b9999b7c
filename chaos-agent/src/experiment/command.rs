//! `lymph-chaos run experiment.yml`: finds ZooKeeper, runs the experiment with a progress display, handles
//! Ctrl-C (the first one aborts and reverts; a second one exits at once, leaving the faults to their leases), and
//! writes the report.

use std::{io::IsTerminal, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    RunOptions,
    driver::LymphDriver,
    file::{self, Experiment},
    report::{EXIT_ABORTED, EXIT_NOT_RUN, Log, LogEntry},
};
use crate::cli::RunArgs;

/// ZooKeeper when nothing names one (lymph's default).
const DEFAULT_ZOOKEEPER: &str = "127.0.0.1:2181";

/// Runs the subcommand; returns the exit code.
pub async fn run(args: &RunArgs, json: bool) -> i32 {
    let exp = match file::load(&args.file) {
        Ok(e) => e,
        Err(err) => {
            eprintln!("lymph-chaos: {err}");
            eprintln!("lymph-chaos: nothing was applied");
            return EXIT_NOT_RUN;
        }
    };
    let Some(lease) = crate::config::parse_duration(&args.lease).filter(|l| *l >= Duration::from_secs(1)) else {
        eprintln!("lymph-chaos: --lease {} is not a duration of at least 1 s", args.lease);
        return EXIT_NOT_RUN;
    };
    if args.check {
        print!("{}", describe(&exp));
        return 0;
    }
    let zookeeper = zookeeper(args, &exp);
    let driver = match LymphDriver::connect(&zookeeper, Duration::from_secs(5)).await {
        Ok(d) => Arc::new(d),
        Err(err) => {
            eprintln!("lymph-chaos: {err}; nothing was applied");
            return EXIT_NOT_RUN;
        }
    };
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(watch_signals(cancel.clone(), lease));
    let (tx, rx) = mpsc::unbounded_channel();
    let printer = tokio::spawn(print_progress(rx, args.quiet));
    let opts = RunOptions {
        file: args.file.display().to_string(),
        zookeeper: zookeeper.clone(),
        dry_run: args.dry_run,
        seed: args.seed,
        lease,
        progress_every: if args.quiet { Duration::ZERO } else { Duration::from_secs(2) },
    };
    let report = super::run(&exp, driver, opts, Log::new(Some(tx)), cancel).await;
    signals.abort();
    let _ = printer.await;
    let out = args.out.clone().unwrap_or_else(|| default_out(&args.file));
    let written = report.write(&out);
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        println!("\n{}", report.summary());
    }
    match written {
        Ok(paths) => {
            let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            eprintln!("report: {}", list.join(", "));
        }
        Err(err) => eprintln!("lymph-chaos: cannot write the report into {}: {err}", out.display()),
    }
    report.exit_code
}

fn default_out(file: &std::path::Path) -> PathBuf {
    let stem = file.file_stem().map_or_else(|| "experiment".into(), |s| s.to_string_lossy().into_owned());
    file.with_file_name(format!("{stem}-report"))
}

/// `--zookeeper` > the file's `zookeeper` > lymph's configuration (`$LYMPH_CONFIG`, else `./.lymph.yml`) > default.
fn zookeeper(args: &RunArgs, exp: &Experiment) -> String {
    if let Some(z) = args.zookeeper.clone().or_else(|| exp.zookeeper.clone()) {
        return z;
    }
    let local = std::path::Path::new(".lymph.yml");
    let env = |name: &str| -> Option<String> {
        let v = std::env::var(name).ok().filter(|v| !v.is_empty());
        if name == crate::lymph_config::CONFIG_ENV && v.is_none() && local.exists() {
            return Some(local.display().to_string());
        }
        v
    };
    match crate::lymph_config::zookeeper_from_env(&env) {
        Ok(Some(found)) => found.hosts,
        Ok(None) => DEFAULT_ZOOKEEPER.into(),
        Err(err) => {
            eprintln!("lymph-chaos: lymph configuration not used ({err}); ZooKeeper {DEFAULT_ZOOKEEPER}");
            DEFAULT_ZOOKEEPER.into()
        }
    }
}

async fn watch_signals(cancel: CancellationToken, lease: Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    eprintln!("\nlymph-chaos: stopping: reverting every fault (interrupt again to exit at once)");
    cancel.cancel();
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    eprintln!(
        "lymph-chaos: exiting without waiting: the agents end the remaining faults within {:.0} s (their lease)",
        lease.as_secs_f64()
    );
    std::process::exit(EXIT_ABORTED);
}

async fn print_progress(mut rx: mpsc::UnboundedReceiver<LogEntry>, quiet: bool) {
    let tty = std::io::stderr().is_terminal();
    while let Some(e) = rx.recv().await {
        if quiet && e.level == "info" {
            continue;
        }
        let mark = if e.level == "warn" { "!" } else { " " };
        let line = format!("[{:>7.2}s]{mark} {}", e.t, e.message);
        if tty && e.level == "warn" {
            eprintln!("\x1b[1;31m{line}\x1b[0m");
        } else {
            eprintln!("{line}");
        }
    }
}

/// What `--check` prints: the probes and the steps.
pub(crate) fn describe(exp: &Experiment) -> String {
    let mut out = format!("{}: the file is valid\n", exp.title);
    for p in &exp.steady_state.probes {
        out.push_str(&format!("  steady state: {} ({} {})\n", p.name, p.kind.label(), p.kind.target()));
    }
    for p in &exp.safeguards {
        out.push_str(&format!("  safeguard:    {} ({} {})\n", p.name, p.kind.label(), p.kind.target()));
    }
    for step in super::fault_steps(exp) {
        out.push_str(&format!("  fault:        {step}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn the_subcommand_parses_and_check_lists_what_the_file_does() {
        let cli = Cli::try_parse_from(["lymph-chaos", "run", "exp/echo.yml", "--dry-run", "--seed", "7"]).unwrap();
        let Command::Run(args) = cli.command else { panic!("not run") };
        assert!(args.dry_run && args.seed == Some(7) && args.lease == "10s");
        assert_eq!(default_out(&args.file), PathBuf::from("exp/echo-report"));
        let exp = file::parse(
            "title: t\nsteady_state:\n  probes:\n    - name: up\n      registry: {service: Echo}\nmethod:\n  - fault: kill\n    service: Echo\n",
            "t.yml",
        )
        .unwrap();
        let text = describe(&exp);
        assert!(text.contains("steady state: up (registry Echo instances)"), "{text}");
        assert!(text.contains("fault:        method[0]: kill Echo"), "{text}");
    }
}
