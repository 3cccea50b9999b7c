//! Resource faults — CPU burn (system-wide and in the target's cgroup), memory pressure, disk fill —
//! bounded, attributable, and always undone (revert, expiry, SIGKILL + restart).
//!
//! The CPU burns are judged against a busy loop of the test's own measured over the same window; the whole
//! machine's busy time is printed beside it, so that test runs alone (`serial_` tests are exclusive under nextest,
//! see .config/nextest.toml).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use chaos_agent::rpc::ClientError;
use chaos_test_support::{eventually, proc_stat::ProcStat};
use chaos_tests::{
    agent::{AgentOptions, AgentProcess, EchoProcess},
    netns::Netns,
};
use serde_json::{Value as Json, json};

fn agent(ns: &Netns, state_dir: Option<PathBuf>) -> AgentProcess {
    agent_filling(ns, state_dir, None)
}

/// An agent whose disk faults may fill `fill_dir` (a tmpfs the test mounted).
fn agent_filling(ns: &Netns, state_dir: Option<PathBuf>, fill_dir: Option<&Path>) -> AgentProcess {
    let disk = fill_dir
        .map(|d| format!(", disk_paths: [\"{}\"], allow_memory_filesystems: true", d.display()))
        .unwrap_or_default();
    let yaml = format!("faults: {{allowed_processes: [\"{}\"]{disk}}}\n", EchoProcess::MARKER);
    AgentProcess::start(
        Some(ns),
        AgentOptions { config_yaml: yaml, state_dir, args: vec!["--no-network-control".into()], ..Default::default() },
    )
    .expect("agent")
}

/// Clock ticks per second of /proc's CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// Total and idle jiffies of all CPUs.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let fields: Vec<u64> =
        stat.lines().next().unwrap().split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    (fields.iter().sum(), idle)
}

/// Busy cores (0..=ncpu) averaged over `d`.
fn busy_cores(d: Duration) -> f64 {
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let (t0, i0) = cpu_times();
    std::thread::sleep(d);
    let (t1, i1) = cpu_times();
    let total = (t1 - t0) as f64;
    if total == 0.0 { 0.0 } else { (total - (i1 - i0) as f64) / total * cpus }
}

/// A busy loop of the test's own (`sh -c 'while :; do :; done'`): what a burn worker is compared with, measured
/// over the same window — a machine busy with other work slows both alike, so the comparison holds where a
/// count of busy cores would not.
struct Spinner {
    child: std::process::Child,
}

impl Spinner {
    fn start() -> Spinner {
        let child = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh");
        Spinner { child }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU clock ticks (user + system) `pid` has used so far.
fn cpu_ticks(pid: i32) -> u64 {
    ProcStat::read(pid).map(|s| s.utime + s.stime).unwrap_or(0)
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn serial_a_one_core_burn_adds_one_busy_core_and_stops_on_time() {
    let ns = Netns::new("cpu");
    let agent = agent(&ns, None);
    let baseline = busy_cores(Duration::from_millis(1000));
    let lifetime = Duration::from_secs(3);
    let started = Instant::now();
    let r = agent.ok("inject", json!({"kind": "cpu", "workers": 1, "lifetime": lifetime.as_secs()}));
    assert_eq!(r["state"], "active", "{r}");
    let worker = r["usage"]["workers"][0]["pid"].as_i64().expect("worker pid") as i32;
    let spinner = Spinner::start();
    std::thread::sleep(Duration::from_millis(300));
    let (w0, s0) = (cpu_ticks(worker), cpu_ticks(spinner.pid()));
    let during = busy_cores(Duration::from_millis(1500));
    let (w1, s1) = (cpu_ticks(worker), cpu_ticks(spinner.pid()));
    drop(spinner);
    let usage = agent.ok("faults", json!({}));
    let ratio = (w1 - w0) as f64 / (s1 - s0).max(1) as f64;
    // Gone once its lifetime is over: the agent's expiry, not a poll of seconds.
    eventually("the burn worker to end", lifetime + Duration::from_secs(10), Duration::from_millis(20), || {
        ProcStat::read(worker).is_none_or(|p| p.is_zombie())
    })
    .expect("worker end");
    let ended = started.elapsed();
    println!(
        "busy cores: {baseline:.2} before, {during:.2} with the burn and a reference busy loop; the worker used \
         {ratio:.2}× the reference's CPU over the same 1.5 s; it ended after {ended:.2?} (lifetime {lifetime:?}); \
         usage {}",
        usage[0]["usage"]
    );
    assert!((0.6..=1.6).contains(&ratio), "the worker burned {ratio:.2}× a busy loop's CPU (one core's worth: ≈ 1)");
    assert!(ended >= lifetime - Duration::from_millis(100), "the worker ended early, after {ended:?}");
    assert!(ended < lifetime + Duration::from_secs(2), "the worker outlived its lifetime: it ended after {ended:?}");
    let cpu_seconds = usage[0]["usage"]["workers"][0]["cpu_seconds"].as_f64().unwrap_or(0.0);
    // Reported after the last reading above, rounded to a tenth: at least what /proc showed then.
    let seen = w1 as f64 / ticks_per_second();
    assert!(
        cpu_seconds > 0.0 && cpu_seconds + 0.1 >= seen,
        "the worker reports {cpu_seconds} s of CPU, /proc {seen:.2} s"
    );
    let ended = agent.events().into_iter().any(|e| e["action"] == "expired" && e["kind"] == "cpu");
    assert!(ended, "no expiry event: {:?}\n{}", agent.events(), agent.log_tail(30));
}

/// A cgroup created (and removed) by the test: v1 `cpuacct` where mounted separately, else v2.
struct TestCgroup {
    dirs: Vec<PathBuf>,
    usage: PathBuf,
    v2: bool,
}

impl TestCgroup {
    fn new(pid: i32) -> TestCgroup {
        let name = format!("chaos-test-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/cpuacct/cpuacct.usage");
        let (dirs, usage, v2) = if v1.exists() {
            let d = PathBuf::from("/sys/fs/cgroup/cpuacct").join(&name);
            (vec![d.clone()], d.join("cpuacct.usage"), false)
        } else {
            let root = if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
                "/sys/fs/cgroup/unified"
            } else {
                "/sys/fs/cgroup"
            };
            let d = PathBuf::from(root).join(&name);
            (vec![d.clone()], d.join("cpu.stat"), true)
        };
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("cgroup.procs"), pid.to_string()).unwrap();
        }
        TestCgroup { dirs, usage, v2 }
    }

    /// CPU time used in the cgroup, seconds.
    fn cpu_seconds(&self) -> f64 {
        let text = std::fs::read_to_string(&self.usage).unwrap();
        if self.v2 {
            let usec: f64 = text.lines().find_map(|l| l.strip_prefix("usage_usec ")).unwrap().trim().parse().unwrap();
            usec / 1e6
        } else {
            text.trim().parse::<f64>().unwrap() / 1e9
        }
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dirs[0].join("cgroup.procs"))
            .unwrap()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            // Move whatever is left back to the parent, then remove the group.
            let parent = d.parent().unwrap().join("cgroup.procs");
            for pid in std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default().lines() {
                let _ = std::fs::write(&parent, pid);
            }
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_burn_placed_in_the_targets_cgroup_shows_in_that_cgroups_usage() {
    let ns = Netns::new("cgroup");
    let target = EchoProcess::start(&ns, 7901);
    let cgroup = TestCgroup::new(target.pid());
    let agent = agent(&ns, None);
    let before = cgroup.cpu_seconds();
    let r = agent.ok(
        "inject",
        json!({"kind": "cpu", "pid": target.pid(), "workers": 1, "in_target_cgroup": true, "lifetime": 2}),
    );
    let worker = r["usage"]["workers"][0]["pid"].as_i64().expect("worker pid") as i32;
    assert!(cgroup.pids().contains(&worker), "worker {worker} is not in the target's cgroup: {:?}", cgroup.pids());
    // Judged against a busy loop of the test's own over the same window (a busy machine slows both alike).
    let spinner = Spinner::start();
    let s0 = cpu_ticks(spinner.pid());
    std::thread::sleep(Duration::from_millis(1500));
    let reference = (cpu_ticks(spinner.pid()) - s0) as f64 / ticks_per_second();
    drop(spinner);
    std::thread::sleep(Duration::from_millis(800));
    let used = cgroup.cpu_seconds() - before;
    println!(
        "the target's cgroup used {used:.2} CPU s during a 2 s, 1-core burn; a reference busy loop got {reference:.2} \
         CPU s in 1.5 s of it"
    );
    assert!(
        used > 0.6 * reference,
        "the cgroup's usage did not show the burn: {used:.2} s (a busy loop got {reference:.2} s in 1.5 s)"
    );
    assert!(!cgroup.pids().contains(&worker), "the worker outlived its fault");
}

fn rss_mib(report: &Json) -> f64 {
    report["usage"]["workers"][0]["rss_mib"].as_f64().unwrap_or(0.0)
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn memory_pressure_holds_the_requested_rss_frees_it_and_refuses_beyond_the_margin() {
    let ns = Netns::new("mem");
    let agent = agent(&ns, None);
    let r = agent.ok("inject", json!({"kind": "memory", "mib": 256, "lifetime": 3}));
    let worker = r["usage"]["workers"][0]["pid"].as_i64().expect("worker pid") as i32;
    let mut rss = 0.0;
    // The RSS it reached is asserted below.
    let _ = eventually("the worker's RSS to reach 250 MiB", Duration::from_secs(3), Duration::from_millis(50), || {
        rss = rss_mib(&agent.ok("faults", json!({}))[0]);
        rss >= 250.0
    });
    println!("memory worker {worker}: RSS {rss:.0} MiB for a 256 MiB fault");
    assert!((230.0..=290.0).contains(&rss), "RSS {rss:.0} MiB");
    let id = agent.ok("faults", json!({}))[0]["id"].as_str().unwrap().to_owned();
    agent.ok("revert", json!({"id": id}));
    assert!(ProcStat::read(worker).is_none_or(|p| p.is_zombie()), "worker {worker} still runs after the revert");
    let available: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    match agent.call("inject", json!({"kind": "memory", "mib": available / 1024, "lifetime": 3})) {
        Err(ClientError::Remote { type_name, message }) => {
            assert_eq!(type_name, "Refused");
            assert!(message.contains("safety margin"), "{message}");
        }
        other => panic!("a request beyond the margin was not refused: {other:?}"),
    }
    assert!(agent.ok("faults", json!({})).as_array().unwrap().is_empty());
}

/// A tmpfs of `mib` MiB mounted by the test; unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn new(mib: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "chaos-test-fill"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free_mib(&self) -> f64 {
        let st = nix::sys::statvfs::statvfs(self.path()).unwrap();
        (st.blocks_available() * st.fragment_size()) as f64 / 1048576.0
    }

    fn fill_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains(".lymph-chaos-fill"))
            .collect()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn disk_fill_reaches_the_level_never_passes_the_floor_and_is_always_removed() {
    let ns = Netns::new("disk");
    let fs = SmallFs::new(64);
    let path = fs.path().display().to_string();
    let mut agent = agent_filling(&ns, None, Some(fs.path()));

    // Reaches the requested level.
    let r = agent.ok("inject", json!({"kind": "disk", "path": path, "mib": 32, "lifetime": 60}));
    let files = fs.fill_files();
    assert_eq!(files.len(), 1, "{files:?}");
    let size = std::fs::metadata(&files[0]).unwrap().len();
    assert_eq!(size, 32 << 20, "fill file size");
    assert!(fs.free_mib() < 33.0, "free space did not drop: {:.1} MiB", fs.free_mib());
    // Gone after revert.
    agent.ok("revert", json!({"id": r["id"]}));
    assert!(fs.fill_files().is_empty(), "fill file left after revert");

    // Never past the floor (5 % of 64 MiB = 3.2 MiB must stay free).
    match agent.call("inject", json!({"kind": "disk", "path": path, "mib": 62})) {
        Err(ClientError::Remote { type_name, message }) => {
            assert!(type_name == "Refused" && message.contains("floor"), "{message}")
        }
        other => panic!("a fill past the floor was not refused: {other:?}"),
    }
    let r = agent.ok("inject", json!({"kind": "disk", "path": path, "percent_free": 100, "floor_percent": 25}));
    assert!(fs.free_mib() >= 15.9, "the 25 % floor was passed: {:.1} MiB free", fs.free_mib());
    agent.ok("revert", json!({"id": r["id"]}));
    assert!(fs.fill_files().is_empty());

    // Gone after expiry.
    agent.ok("inject", json!({"kind": "disk", "path": path, "mib": 8, "lifetime": 1}));
    assert_eq!(fs.fill_files().len(), 1);
    std::thread::sleep(Duration::from_millis(1400));
    assert!(fs.fill_files().is_empty(), "fill file left after expiry");

    // Gone after SIGKILL + restart.
    agent.ok("inject", json!({"kind": "disk", "path": path, "mib": 8, "lifetime": 60}));
    assert_eq!(fs.fill_files().len(), 1);
    let state = agent.state_dir.clone();
    agent.kill9();
    assert_eq!(fs.fill_files().len(), 1, "the file should outlive the killed agent until a restart or its expiry");
    let restarted = agent_filling(&ns, Some(state), Some(fs.path()));
    assert!(fs.fill_files().is_empty(), "fill file survived the restart");
    let reconciled = restarted
        .events()
        .into_iter()
        .any(|e| e["action"] == "reconcile" && e.to_string().contains("lymph-chaos-fill"));
    assert!(reconciled, "no reconcile event names the deleted file");
}
